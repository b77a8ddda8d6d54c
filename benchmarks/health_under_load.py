"""Latency of ``GET /health`` while realizar is saturated with generation.

Usage (from the repository root)::

    .venv/bin/python benchmarks/health_under_load.py                  # starts realizar --demo itself
    .venv/bin/python benchmarks/health_under_load.py --probes 200 --concurrency 64 --json /tmp/h.json
    .venv/bin/python benchmarks/health_under_load.py --url http://127.0.0.1:8080   # a running server

First ``--probes`` sequential ``GET /health`` requests on an idle server (the
baseline), then the same while ``--concurrency`` streaming ``/v1/completions``
requests (EOS ignored, ``--output-len`` tokens each, replaced as they finish)
keep the engine saturated. Probing starts once the whole batch is running and
decoding (realizar's /metrics), or after ``--settle`` s. The probes run in a
separate process, on one keep-alive connection, ``--interval-ms`` apart, so
that neither the load client's event loop nor its GIL adds to the latency. Prints p50, p90,
p99 and max for both phases, and the generation throughput during the probe
window as proof that the load was on.

The design target (docs/architecture.md, the two threads): /health answers in about a millisecond
while the engine is saturated, because the event loop never blocks on the model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from common import (
    ManagedServer,
    add_server_options,
    fmt,
    install_signal_handlers,
    load_line,
    machine_line,
    percentile,
    run,
    run_closed_loop,
    server_from_options,
    warm_up,
    workload_for,
)


def probe_health(url: str, probes: int, interval_s: float, timeout_s: float = 30.0) -> list[float]:
    """Sequential GET /health on one keep-alive connection; latencies in ms (a failure counts as -1)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout_s)
    out: list[float] = []
    for _ in range(probes):
        t0 = time.perf_counter()
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            ok = resp.status == 200
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout_s)
            ok = False
        out.append((time.perf_counter() - t0) * 1e3 if ok else -1.0)
        if interval_s > 0:
            time.sleep(interval_s)
    conn.close()
    return out


def summarize(latencies: list[float]) -> dict[str, Any]:
    ok = [x for x in latencies if x >= 0]
    return {"probes": len(latencies), "failed": len(latencies) - len(ok),
            "p50_ms": percentile(ok, 50), "p90_ms": percentile(ok, 90), "p99_ms": percentile(ok, 99),
            "max_ms": max(ok) if ok else None}


def metric(url: str, name: str) -> float | None:
    """One unlabelled series from the server's /metrics, ``None`` if absent."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:  # noqa: S310 (127.0.0.1)
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def _loaded_probes(server: ManagedServer, args: argparse.Namespace,
                         pool: ProcessPoolExecutor) -> dict[str, Any]:
    workload = workload_for(server, prompt_len=args.prompt_len, output_len=args.output_len)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    load = asyncio.create_task(run_closed_loop(server.url, workload, args.concurrency, 1_000_000, stop=stop))
    # saturated = the whole batch is running and decoding (realizar's gauge and token
    # counter: prefill is over once every stream got a few tokens), or --settle seconds at most
    deadline = time.perf_counter() + args.settle
    running = None
    start_tokens = await loop.run_in_executor(None, metric, server.url, "realizar_generation_tokens_total")
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.5)
        running = await loop.run_in_executor(None, metric, server.url, "realizar_num_requests_running")
        tokens = await loop.run_in_executor(None, metric, server.url, "realizar_generation_tokens_total")
        if (running is not None and running >= args.concurrency and tokens is not None
                and start_tokens is not None and tokens - start_tokens >= 2 * args.concurrency):
            break
    tokens0 = await loop.run_in_executor(None, metric, server.url, "realizar_generation_tokens_total")
    t0 = time.perf_counter()
    latencies = await loop.run_in_executor(pool, probe_health, server.url, args.probes, args.interval_ms / 1e3)
    window = time.perf_counter() - t0
    tokens1 = await loop.run_in_executor(None, metric, server.url, "realizar_generation_tokens_total")
    running_end = await loop.run_in_executor(None, metric, server.url, "realizar_num_requests_running")
    stop.set()
    load.cancel()  # closing the streams aborts the requests in flight
    with contextlib.suppress(asyncio.CancelledError):
        await load
    generated = tokens1 - tokens0 if tokens0 is not None and tokens1 is not None else None
    return {"latencies": latencies, "window_s": window, "running_at_start": running,
            "running_at_end": running_end, "generated_tokens": generated,
            "generation_tok_s": generated / window if generated is not None and window > 0 else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_options(p, "measure")
    p.add_argument("--probes", type=int, default=500, help="sequential probes per phase (default 500)")
    p.add_argument("--interval-ms", type=float, default=10.0, help="pause between probes (default 10)")
    p.add_argument("--concurrency", type=int, default=64, help="generation streams in flight (default 64)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--settle", type=float, default=120.0,
                   help="most seconds to wait for the batch to be full and decoding before probing (default 120)")
    args = p.parse_args(argv)
    install_signal_handlers()
    machine_line()  # the load average at the start

    server = server_from_options(args, output_len=args.output_len)
    with server, ProcessPoolExecutor(max_workers=1) as pool:
        warm_up(server, workload_for(server, prompt_len=args.prompt_len, output_len=8))
        print(f"idle: {args.probes} probes ...", file=sys.stderr, flush=True)
        idle = pool.submit(probe_health, server.url, args.probes, args.interval_ms / 1e3).result()
        print(f"loaded: {args.concurrency} streams, then {args.probes} probes ...",
              file=sys.stderr, flush=True)
        loaded = run(_loaded_probes(server, args, pool))
        rss = server.rss_mib()

    report = {"machine": machine_line(), "idle": summarize(idle), "loaded": summarize(loaded.pop("latencies")),
              "load": loaded, "rss_mib": rss}
    rows = [("idle", report["idle"]), (f"{args.concurrency} streams generating", report["loaded"])]
    print(f"Machine: {report['machine']}; {load_line()}\n")
    print("| phase | probes | failed | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s['probes']} | {s['failed']} | {fmt(s['p50_ms'], 2)} | {fmt(s['p90_ms'], 2)} "
              f"| {fmt(s['p99_ms'], 2)} | {fmt(s['max_ms'], 2)} |")
    print(f"\nDuring the {loaded['window_s']:.1f} s of loaded probes the engine generated "
          f"{fmt(loaded['generated_tokens'], 0)} tokens ({fmt(loaded['generation_tok_s'])} tok/s), with "
          f"{fmt(loaded['running_at_start'], 0)} requests running at the start and "
          f"{fmt(loaded['running_at_end'], 0)} at the end (realizar's /metrics); server RSS {fmt(rss, 0)} MiB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
