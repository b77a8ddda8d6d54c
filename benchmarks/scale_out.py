"""1 vs 2 engine replicas on Ray Serve, and what the Ray front costs per request, against one server.

    .venv/bin/python benchmarks/scale_out.py                 # single server, fleets of 1 and 2 replicas
    .venv/bin/python benchmarks/scale_out.py --setups 0 2    # 0 is the single server

Each setup is started as ``realizar serve --demo`` on 127.0.0.1 (``--replicas N`` for a fleet, each starting
its own local Ray), measured, and stopped:

* routing overhead: sequential requests, one at a time, to a route that does no model work (``POST /tokenize``)
  and to a one-token generation (``POST /generate``, ``max_tokens`` 1); the front's extra latency is the
  difference of the medians against the single server;
* throughput: a short closed loop of streaming ``/v1/completions`` (``--concurrency`` in flight).

The threads are split so every setup uses the same cores: the single server and the one-replica fleet get
``--threads`` threads, each of two replicas half of them. On a 2-core machine two replicas cannot add compute,
so the 2-replica row shows the fleet's overhead, not its scaling: scaling needs cores (or nodes) per replica.
Numbers on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    ManagedServer,
    fmt,
    install_signal_handlers,
    load_line,
    machine_line,
    realizar_spec,
    run,
    run_closed_loop,
    table_head,
    workload_for,
)


def wait_replicas(url: str, count: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as r:  # noqa: S310 (127.0.0.1)
                if json.loads(r.read()).get("replicas", 1) >= count:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}: {count} replicas not ready in {timeout} s")


async def sequential_ms(url: str, path: str, body: dict[str, Any], n: int) -> list[float]:
    """Latencies of ``n`` requests sent one at a time on one keep-alive connection, ms."""
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            t0 = time.perf_counter()
            async with session.post(url + path, json=body) as r:
                await r.read()
                assert r.status == 200, r.status
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure(replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    threads = args.threads if replicas <= 1 else max(1, args.threads // replicas)
    extra = ["--max-num-seqs", str(args.concurrency)]
    if replicas:
        extra += ["--replicas", str(replicas), "--replica-cpus", str(threads)]
    spec = realizar_spec(dtype="float32", threads=threads, extra_args=extra, output_len=args.output_len)
    label = f"{replicas} replica{'s' if replicas > 1 else ''} on Ray" if replicas else "single server"
    with ManagedServer(spec) as server:
        if replicas:
            wait_replicas(server.url, replicas)
        tokenize = run(sequential_ms(server.url, "/tokenize", {"text": "The capital of France is"}, args.requests))
        generate = run(sequential_ms(server.url, "/generate", {"prompt": "The capital of France is",
                                                                "max_tokens": 1}, args.requests // 4))
        workload = workload_for(server, prompt_len=args.prompt_len, output_len=args.output_len)
        run(run_closed_loop(server.url, workload, args.concurrency, args.concurrency))  # warm-up
        load = run(run_closed_loop(server.url, workload, args.concurrency, args.concurrency * args.rounds,
                                   first_index=1000)).summary()
    return {"setup": label, "replicas": replicas, "threads_each": threads,
            "tokenize_p50_ms": statistics.median(tokenize), "generate_p50_ms": statistics.median(generate),
            **{k: load[k] for k in ("output_tok_s", "request_s", "ttft_p50_ms", "itl_p50_ms", "failed")}}


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["# Scale-out on Ray Serve", "", machine_line(),
             f"float32, prompts of {args.prompt_len} words, {args.output_len} output tokens, concurrency "
             f"{args.concurrency}; {args.requests} sequential /tokenize and {args.requests // 4} /generate "
             "(max_tokens 1) per setup"]
    lines += table_head(["setup", "threads each", "/tokenize p50 ms", "/generate p50 ms", "output tok/s",
                         "req/s", "TTFT p50 ms", "ITL p50 ms", "failed"])
    for r in results:
        lines.append(f"| {r['setup']} | {r['threads_each']} | {fmt(r['tokenize_p50_ms'], 2)} | "
                     f"{fmt(r['generate_p50_ms'], 1)} | {fmt(r['output_tok_s'])} | {fmt(r['request_s'], 2)} | "
                     f"{fmt(r['ttft_p50_ms'])} | {fmt(r['itl_p50_ms'])} | {r['failed']} |")
    single = next((r for r in results if r["replicas"] == 0), None)
    if single is not None:
        lines.append("")
        for r in results:
            if r["replicas"]:
                lines.append(f"- routing overhead of the Ray front ({r['setup']}): "
                             f"{r['tokenize_p50_ms'] - single['tokenize_p50_ms']:+.2f} ms per /tokenize, "
                             f"{r['generate_p50_ms'] - single['generate_p50_ms']:+.2f} ms per /generate (p50)")
    lines += ["", load_line()]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", type=int, nargs="+", default=[0, 1, 2],
                   help="0: the single server; N: a fleet of N replicas (default: 0 1 2)")
    p.add_argument("--threads", type=int, default=2, help="threads of the single server, split among replicas")
    p.add_argument("--requests", type=int, default=200, help="sequential /tokenize requests (and a quarter as "
                   "many /generate) per setup")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="closed-loop requests = concurrency x rounds")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    install_signal_handlers()
    machine_line()
    results = [measure(n, args) for n in args.setups]
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
