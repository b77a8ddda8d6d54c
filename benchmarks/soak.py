"""Soak test: mixed traffic for N minutes while the server's RSS is sampled.

Usage (from the repository root)::

    .venv/bin/python benchmarks/soak.py --minutes 30                 # starts realizar --demo itself
    .venv/bin/python benchmarks/soak.py --minutes 2 --warmup-s 30 --json /tmp/soak.json
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8080 --pid 1234 --minutes 10

``--concurrency`` workers (default 8) each loop over randomly chosen requests,
weighted as ``--mix`` says (default: health 30, tokenize 20, generate 20,
stream 15, chat 15): ``GET /health``, ``POST /tokenize``, ``POST /generate``,
``POST /stream/generate`` (SSE, read to the end) and ``POST
/v1/chat/completions``, with short random prompts and 8 to ``--max-tokens``
output tokens. Every ``--sample-s`` seconds (default 10) the server's RSS
(with its child processes) is sampled. Prints the RSS over time, the drift
(last sample against the first sample after ``--warmup-s``, in percent), and
per-route counts, failures and latency percentiles. Exit status 1 when any
request failed or the drift exceeds ``--max-drift-pct`` (default 10).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import defaultdict
from typing import Any

import aiohttp
from common import (
    ManagedServer,
    add_server_options,
    fmt,
    install_signal_handlers,
    load_line,
    machine_line,
    percentile,
    prompts,
    run,
    server_from_options,
)

OPS = ("health", "tokenize", "generate", "stream", "chat")


def _mix(text: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, _, value = item.partition(":")
        if name not in OPS:
            raise argparse.ArgumentTypeError(f"unknown op {name!r}; choose from {', '.join(OPS)}")
        weights[name] = float(value or 1)
    return weights


class Soak:
    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url = url
        self.args = args
        self.texts = prompts(64, 24, seed=1)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.failures: dict[str, int] = defaultdict(int)
        self.errors: dict[str, set[str]] = defaultdict(set)

    async def _op(self, session: aiohttp.ClientSession, op: str, rng: random.Random) -> None:
        text = rng.choice(self.texts)
        n = rng.randint(8, self.args.max_tokens)
        if op == "health":
            async with session.get(self.url + "/health") as resp:
                await resp.read()
                status = resp.status
        elif op == "tokenize":
            async with session.post(self.url + "/tokenize", json={"text": text}) as resp:
                await resp.read()
                status = resp.status
        elif op == "generate":
            async with session.post(self.url + "/generate", json={"prompt": text, "max_tokens": n}) as resp:
                await resp.read()
                status = resp.status
        elif op == "stream":
            async with session.post(self.url + "/stream/generate", json={"prompt": text, "max_tokens": n}) as resp:
                async for _ in resp.content:
                    pass
                status = resp.status
        else:
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": n,
                    "stream": rng.random() < 0.5}
            async with session.post(self.url + "/v1/chat/completions", json=body) as resp:
                async for _ in resp.content:
                    pass
                status = resp.status
        if status != 200:
            raise RuntimeError(f"HTTP {status}")

    async def _worker(self, session: aiohttp.ClientSession, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        names, weights = list(self.args.mix), list(self.args.mix.values())
        while time.monotonic() < deadline:
            op = rng.choices(names, weights)[0]
            t0 = time.perf_counter()
            try:
                await self._op(session, op, rng)
                self.latency[op].append((time.perf_counter() - t0) * 1e3)
            except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as exc:
                self.failures[op] += 1
                self.errors[op].add(f"{type(exc).__name__}: {exc}"[:120])

    async def run(self, server: ManagedServer) -> list[tuple[float, float]]:
        deadline = time.monotonic() + self.args.minutes * 60
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=self.args.timeout)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.args.concurrency + 2),
                                         timeout=timeout) as session:
            workers = [asyncio.create_task(self._worker(session, i, deadline))
                       for i in range(self.args.concurrency)]
            while time.monotonic() < deadline:
                samples.append((time.monotonic() - t0, server.rss_mib()))
                done = sum(len(v) for v in self.latency.values())
                print(f"t={samples[-1][0]:6.0f} s  RSS {samples[-1][1]:7.1f} MiB  requests {done}",
                      file=sys.stderr, flush=True)
                await asyncio.sleep(min(self.args.sample_s, max(0.0, deadline - time.monotonic())))
            await asyncio.gather(*workers)
        samples.append((time.monotonic() - t0, server.rss_mib()))
        return samples


def drift(samples: list[tuple[float, float]], warmup_s: float) -> tuple[float | None, float | None, float | None]:
    """(first RSS after warm-up, last RSS, drift %)."""
    after = [rss for t, rss in samples if t >= warmup_s and rss > 0]
    if len(after) < 2:
        return None, None, None
    first, last = after[0], after[-1]
    return first, last, (last - first) / first * 100.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="duration (default 10)")
    add_server_options(p, "soak")
    p.add_argument("--concurrency", type=int, default=8, help="workers (default 8)")
    p.add_argument("--mix", type=_mix, default=_mix("health:30,tokenize:20,generate:20,stream:15,chat:15"),
                   help="op:weight list (default health:30,tokenize:20,generate:20,stream:15,chat:15)")
    p.add_argument("--max-tokens", type=int, default=64, help="largest max_tokens per request (default 64)")
    p.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period (default 10 s)")
    p.add_argument("--warmup-s", type=float, default=60.0,
                   help="drift is measured from the first sample at or after this time (default 60 s)")
    p.add_argument("--max-drift-pct", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (default 300 s)")
    args = p.parse_args(argv)
    install_signal_handlers()
    machine_line()  # the load average at the start

    server = server_from_options(args)
    with server:
        soak = Soak(server.url, args)
        samples = run(soak.run(server))
    first, last, pct = drift(samples, args.warmup_s)

    print(f"Machine: {machine_line()}; {load_line()}")
    print(f"Soak: {args.minutes:g} min, {args.concurrency} workers, mix {args.mix}, max_tokens 8..{args.max_tokens}\n")
    print("| t (s) | RSS (MiB) |\n|---|---|")
    for t, rss in samples:
        print(f"| {t:.0f} | {rss:.1f} |")
    print(f"\nRSS drift after {args.warmup_s:g} s warm-up: {fmt(first)} -> {fmt(last)} MiB = {fmt(pct, 2)} %\n")
    print("| route | ok | failed | p50 ms | p99 ms |\n|---|---|---|---|---|")
    ops: dict[str, Any] = {}
    for op in args.mix:
        lat = soak.latency[op]
        ops[op] = {"ok": len(lat), "failed": soak.failures[op], "p50_ms": percentile(lat, 50),
                   "p99_ms": percentile(lat, 99), "errors": sorted(soak.errors[op])[:5]}
        print(f"| {op} | {len(lat)} | {soak.failures[op]} | {fmt(ops[op]['p50_ms'])} | {fmt(ops[op]['p99_ms'])} |")
    for op, info in ops.items():
        if info["errors"]:
            print(f"{op} errors: {info['errors']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "samples": samples, "first_mib": first,
                                         "last_mib": last, "drift_pct": pct, "ops": ops}, indent=2))
    failed = sum(soak.failures.values())
    if failed or (pct is not None and abs(pct) > args.max_drift_pct):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
