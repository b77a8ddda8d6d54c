"""The default model with its weights kept quantized (``quant_gemm.c``; the exact class
``REALIZAR_QUANTIZED=exact``, and the fast class
``REALIZAR_QUANTIZED=fast``, not exact) against float32 weights dequantized at load
(``REALIZAR_QUANTIZED=0``), in-process, each mode in a fresh process.

Usage (from the repository root)::

    .venv/bin/python benchmarks/quantized.py                 # float32, quantized and fast; 2 threads
    .venv/bin/python benchmarks/quantized.py --modes quantized --tokens 64

Per mode it reports the load time (``load_engine_model``), the process's RSS after loading,
batch-1 decode tok/s (one greedy sequence, ``--tokens`` tokens after a short prompt, EOS
ignored; the median step time) and the CPU time of such a step (all threads; steadier than
wall time on a shared machine), the median time of a decode step of 16 sequences, and of a
prefill step of a 512-token prompt. Timings on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(tokens: int, threads: int) -> dict[str, Any]:
    from realizar.config import EngineConfig
    from realizar.engine.engine import Engine, load_engine_model
    from realizar.loading import default_model_path
    from realizar.request import Request, SamplingParams

    config = EngineConfig(device="cpu", dtype="float32", threads=threads, max_num_batched_tokens=512)
    start = time.perf_counter()
    served = load_engine_model(default_model_path(), config)
    load_s = time.perf_counter() - start
    rss = _rss_mib()
    engine = Engine(served, config)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly brew potions".split()

    cpu_times: list[float] = []

    def run(prompts: list[list[int]], max_tokens: int) -> list[float]:
        """Step times (s) of the steps after the first (the prefill); their CPU times in cpu_times."""
        for p in prompts:
            engine.add(Request(p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)))
        times = []
        cpu_times.clear()
        while engine.has_work():
            t, c = time.perf_counter(), time.process_time()
            engine.step()
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
        del cpu_times[0]
        return times[1:]

    prompt = served.tokenizer.encode(" ".join(words))
    run([prompt], 8)  # warm-up
    one = run([prompt], tokens)
    one_cpu = statistics.median(cpu_times)
    sixteen = run([served.tokenizer.encode(" ".join(words[: 2 + i % 10]) + f" {i}") for i in range(16)], 24)
    sixteen_cpu = statistics.median(cpu_times)
    long_prompt = (prompt * 64)[:512]
    start = time.perf_counter()
    run([long_prompt], 1)
    prefill = time.perf_counter() - start
    return {"load_s": load_s, "rss_after_load_mib": rss, "decode_tok_s": 1 / statistics.median(one),
            "decode_cpu_ms": one_cpu * 1e3,
            "step16_ms": statistics.median(sixteen) * 1e3, "step16_cpu_ms": sixteen_cpu * 1e3, "prefill512_ms": prefill * 1e3,
            "rss_end_mib": _rss_mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="float32,quantized,fast", help="comma-separated: float32, quantized, fast")
    p.add_argument("--tokens", type=int, default=64, help="tokens of the batch-1 decode (default 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.tokens, args.threads)))
        return
    print("| weights | load s | RSS after load MiB | decode tok/s (1 seq) | CPU ms per decode step (1 seq) "
          "| 16-seq step ms | CPU ms per 16-seq step | 512-token prefill ms |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        env = dict(os.environ, REALIZAR_QUANTIZED={"quantized": "exact", "fast": "fast"}.get(mode, "0"))
        out = subprocess.run([sys.executable, __file__, "--worker", "--tokens", str(args.tokens),
                              "--threads", str(args.threads)], env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {mode} | {r['load_s']:.2f} | {r['rss_after_load_mib']:.0f} | {r['decode_tok_s']:.1f} "
              f"| {r['decode_cpu_ms']:.1f} "
              f"| {r['step16_ms']:.2f} | {r['step16_cpu_ms']:.1f} | {r['prefill512_ms']:.0f} |")


if __name__ == "__main__":
    main()
