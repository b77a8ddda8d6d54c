"""Batch-1 latency of the default model: realizar in float32 and bfloat16, then
Hugging Face transformers on the same GGUF, run right after.

Usage (from the repository root)::

    .venv/bin/python benchmarks/latency.py                      # 5 requests per setting
    .venv/bin/python benchmarks/latency.py --requests 3 --dtypes float32 --json /tmp/latency.json
    .venv/bin/python benchmarks/latency.py --no-hf              # realizar only

For each dtype, realizar serves the default model (SmolLM2-135M-Instruct, Q4_1
GGUF) and gets ``--requests`` requests one at a time:

- streaming ``/v1/completions`` (``--prompt-len`` words, exactly
  ``--output-len`` tokens, EOS ignored): TTFT = send to the first token;
  decode tok/s = (tokens - 1) / (E2E - TTFT); overall tok/s = tokens / E2E;
- ``/generate`` (the native route, not streamed, greedy, stops at EOS or
  ``max_tokens``): tok/s = ``num_generated`` / request latency.

It also reports the model load time (realizar's own figure, and the wall time
from process start to a 200 from /health) and the server's RSS when idle after
loading and after the requests.

Then, in a fresh process per dtype, transformers loads the same GGUF
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=...)``;
transformers dequantizes it), and greedy ``generate`` on the same prompts
gives TTFT (``max_new_tokens=1``: prefill plus one token), and tok/s for
``--output-len`` new tokens (``min_new_tokens`` forces the length), with its
load time and RSS. Medians are printed; every run is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    ManagedServer,
    fmt,
    install_signal_handlers,
    load_line,
    machine_line,
    prompts,
    realizar_spec,
    run,
    run_closed_loop,
    warm_up,
    workload_for,
)

GENERATE_FIRST = 1000  # /generate uses prompts from this index on


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


async def _generate_native(url: str, texts: list[str], max_tokens: int) -> list[dict[str, float]]:
    """POST /generate one at a time; tok/s = num_generated / latency."""
    out = []
    async with aiohttp.ClientSession() as session:
        for text in texts:
            t0 = time.perf_counter()
            async with session.post(url + "/generate", json={"prompt": text, "max_tokens": max_tokens,
                                                             "strategy": "greedy"}) as resp:
                body = await resp.json()
                resp.raise_for_status()
            latency = time.perf_counter() - t0
            n = int(body["num_generated"])
            out.append({"latency_s": latency, "num_generated": n, "tok_s": n / latency if latency else 0.0})
    return out


def measure_realizar(dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    with ManagedServer(realizar_spec(dtype=dtype, output_len=args.output_len, threads=args.torch_threads)) as server:
        res: dict[str, Any] = {"engine": "realizar", "dtype": dtype, "ready_wall_s": server.ready_s,
                               "load_s": server.reported_load_s(), "rss_idle_mib": server.rss_mib()}
        workload = workload_for(server, prompt_len=args.prompt_len, output_len=args.output_len)
        warm_up(server, workload, concurrency=1, max_tokens=8)
        result = run(run_closed_loop(server.url, workload, 1, args.requests))
        if result.failures:
            raise RuntimeError(f"realizar {dtype}: {result.summary()['errors']}")
        runs = []
        for r in result.records:
            assert r.ttft_s is not None
            n = r.output_tokens
            runs.append({"ttft_ms": r.ttft_s * 1e3, "e2e_s": r.e2e_s, "tokens": n,
                         "prompt_tokens": r.prompt_tokens,
                         "decode_tok_s": (n - 1) / (r.e2e_s - r.ttft_s) if n > 1 else None,
                         "overall_tok_s": n / r.e2e_s})
        res["stream_runs"] = runs
        # other prompts than the streamed ones, so that no prefix cache helps
        texts = prompts(args.requests, args.prompt_len, first=GENERATE_FIRST)
        res["generate_runs"] = run(_generate_native(server.url, texts, args.output_len))
        res["rss_after_mib"] = server.rss_mib()
    return res


def measure_hf(dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """transformers in a child process, so that its RSS and threads are its own."""
    cmd = [sys.executable, __file__, "--hf-worker", dtype, "--requests", str(args.requests),
           "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.hf_timeout, env=env)
    if proc.returncode != 0:
        return {"engine": "transformers", "dtype": dtype, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hf_worker(dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    import psutil
    import torch
    from common import default_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    rss_idle = psutil.Process().memory_info().rss / 2**20
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def gen(ids: torch.Tensor, n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad)
        assert out.shape[1] - ids.shape[1] == n
        return time.perf_counter() - t

    texts = prompts(args.requests, args.prompt_len)
    first = tok(texts[0], return_tensors="pt").input_ids
    gen(first, 8)  # warm-up
    runs = []
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids
        ttft = gen(ids, 1)
        total = gen(ids, args.output_len)
        runs.append({"ttft_ms": ttft * 1e3, "e2e_s": total, "tokens": args.output_len,
                     "prompt_tokens": int(ids.shape[1]),
                     "decode_tok_s": (args.output_len - 1) / (total - ttft) if total > ttft else None,
                     "overall_tok_s": args.output_len / total})
    return {"engine": "transformers", "dtype": dtype, "load_s": load_s, "ready_wall_s": None,
            "rss_idle_mib": rss_idle, "rss_after_mib": psutil.Process().memory_info().rss / 2**20,
            "stream_runs": runs, "torch_threads": torch.get_num_threads()}


def _row(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"| {res['engine']} | {res['dtype']} | error: {res['error']} |||||||"
    runs = res["stream_runs"]
    gen = res.get("generate_runs") or []
    return (f"| {res['engine']} | {res['dtype']} | {fmt(_median([r['ttft_ms'] for r in runs]))} "
            f"| {fmt(_median([r['decode_tok_s'] for r in runs if r['decode_tok_s']]))} "
            f"| {fmt(_median([r['overall_tok_s'] for r in runs]))} "
            f"| {fmt(_median([g['tok_s'] for g in gen])) if gen else 'n/a'} "
            f"| {fmt(res['load_s'], 2)} / {fmt(res['ready_wall_s'])} "
            f"| {fmt(res['rss_idle_mib'], 0)} / {fmt(res['rss_after_mib'], 0)} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="realizar's --threads and transformers' OMP_NUM_THREADS (default: each one's own)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    p.add_argument("--requests", type=int, default=5, help="requests per setting (default 5)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt words, about tokens (default 128)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens (default 128)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--hf-timeout", type=float, default=1800.0)
    p.add_argument("--json", type=Path)
    p.add_argument("--hf-worker", metavar="DTYPE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_worker:
        print(json.dumps(hf_worker(args.hf_worker, args)))
        return 0
    install_signal_handlers()
    machine_line()  # the load average at the start
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    results = []
    for dtype in dtypes:
        print(f"realizar {dtype} ...", file=sys.stderr, flush=True)
        results.append(measure_realizar(dtype, args))
    if not args.no_hf:
        for dtype in dtypes:
            print(f"transformers {dtype} ...", file=sys.stderr, flush=True)
            results.append(measure_hf(dtype, args))
    print(f"Machine: {machine_line()}; {load_line()}")
    print(f"Batch 1, {args.prompt_len}-word prompts ({fmt(_median([r['prompt_tokens'] for r in results[0]['stream_runs'] if r['prompt_tokens']]), 0)} tokens), "
          f"{args.output_len} output tokens, medians of {args.requests} requests\n")
    print("| engine | dtype | TTFT ms | decode tok/s | overall tok/s | /generate tok/s | load s (own / wall to ready) "
          "| RSS MiB (idle / after) |\n|---|---|---|---|---|---|---|---|")
    for res in results:
        print(_row(res))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
