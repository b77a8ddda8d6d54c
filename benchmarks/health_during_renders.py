"""Latency of ``GET /health`` while long chat conversations are being rendered.

Usage (from the repository root, with a server already running)::

    .venv/bin/python benchmarks/health_during_renders.py --url http://127.0.0.1:8080
    .venv/bin/python benchmarks/health_during_renders.py --url ... --in-flight 8 --messages 1024 --seconds 20

``--in-flight`` clients each keep one ``/v1/chat/completions`` request of ``--messages``
messages in flight (replaced as it finishes) for ``--seconds``. The messages overflow the
model's context once rendered, so each request ends in a 400 after its template is rendered
and its text tokenized: the load is the rendering, not generation. Meanwhile a separate
process sends sequential ``GET /health`` probes on one keep-alive connection, ``--interval-ms``
apart. Prints p50, p90, p99 and max of the probes, and how many chat requests ran.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import time
import urllib.parse
from concurrent.futures import ProcessPoolExecutor

import aiohttp


def probe(url: str, seconds: float, interval_s: float) -> list[float]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        out.append((time.perf_counter() - t0) * 1000.0 if response.status == 200 else -1.0)
        time.sleep(interval_s)
    return out


async def load(url: str, in_flight: int, messages: int, seconds: float) -> dict[int, int]:
    body = json.dumps({"messages": [{"role": "user", "content": "one two three four five six seven"}] * messages,
                       "max_tokens": 1})
    statuses: dict[int, int] = {}
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def client() -> None:
            while time.monotonic() < end:
                async with session.post(url + "/v1/chat/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1

        await asyncio.gather(*(client() for _ in range(in_flight)))
    return statuses


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--in-flight", type=int, default=8)
    p.add_argument("--messages", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--interval-ms", type=float, default=5.0)
    args = p.parse_args()
    with ProcessPoolExecutor(1) as pool:
        idle = pool.submit(probe, args.url, 3.0, args.interval_ms / 1000).result()
        probes = pool.submit(probe, args.url, args.seconds, args.interval_ms / 1000)
        statuses = asyncio.run(load(args.url, args.in_flight, args.messages, args.seconds))
        busy = probes.result()
    for name, values in (("idle", idle), (f"{args.in_flight} x {args.messages} messages", busy)):
        failed = sum(v < 0 for v in values)
        ok = [v for v in values if v >= 0]
        print(f"/health {name}: n={len(values)} failed={failed} p50={percentile(ok, 0.5):.2f} ms "
              f"p90={percentile(ok, 0.9):.2f} ms p99={percentile(ok, 0.99):.2f} ms max={max(ok):.2f} ms")
    print(f"chat requests: {statuses}")


if __name__ == "__main__":
    main()
