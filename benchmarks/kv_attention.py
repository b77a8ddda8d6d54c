"""Decode attention over each KV-cache dtype (``--kv-cache-dtype``): the time of one engine step's
attention for a batch of decoding sequences, every layer, read from memory as a step reads it.

Usage (from the repository root)::

    .venv/bin/python benchmarks/kv_attention.py
    .venv/bin/python benchmarks/kv_attention.py --contexts 96 400 2000 --sequences 64 --threads 2

The caches are the engine's own (``KVCache``: one mapping, huge pages where the kernel allows) with the demo
model's shape (30 layers, 3 KV heads of 64, 9 query heads, blocks of 16), filled with random rows, and the
blocks of the sequences shuffled over the pool as a server's are. Each round calls the kernels'
``paged_attention`` for every layer, once per dtype, alternated so that the machine's slow stretches fall on
all of them alike; medians of ``--rounds`` rounds, in ms, and each dtype's bytes per token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from realizar import kernels
from realizar.kv_cache import KVCache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[96, 400], help="tokens of each sequence's context")
    p.add_argument("--sequences", type=int, default=64, help="decoding sequences (one query row each)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["float16", "int8"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: one per core)")
    args = p.parse_args()
    compiled = kernels.load()
    if compiled is None:
        sys.exit("the kernels need a C compiler")
    compiled.set_threads(args.threads or len(os.sched_getaffinity(0)))
    layers, kv_heads, block, head_dim, heads = 30, 3, 16, 64, 9
    gen = torch.Generator().manual_seed(0)
    print(f"{args.sequences} sequences, {layers} layers, {compiled.threads()} threads; ms per step (median of "
          f"{args.rounds}), each dtype's KV bytes per token")
    print("| context | " + " | ".join(args.dtypes) + " |")
    print("|---|" + "---|" * len(args.dtypes))
    for context in args.contexts:
        per_sequence = -(-context // block)
        blocks = args.sequences * per_sequence
        tables = torch.randperm(blocks, generator=gen).reshape(args.sequences, per_sequence)
        lens = torch.full((args.sequences,), context)
        q = torch.randn(args.sequences, heads, head_dim, generator=gen)
        caches = {}
        for name in args.dtypes:
            cache = KVCache(layers, blocks, block, kv_heads, head_dim, torch.device("cpu"), DTYPES[name])
            slots = torch.arange(blocks * block)
            for layer in range(layers):
                rows = torch.randn(len(slots), kv_heads, head_dim, generator=gen)
                compiled.write_kv(cache.keys[layer], cache.values[layer], slots, rows, rows * 0.5, *cache.scales(layer))
            caches[name] = cache
        times: dict[str, list[float]] = {name: [] for name in args.dtypes}
        for _ in range(args.rounds + 1):
            for name, cache in caches.items():
                start = time.perf_counter()
                for layer in range(layers):
                    compiled.paged_attention(q, cache.keys[layer], cache.values[layer], tables, lens, block,
                                             head_dim ** -0.5, None, *cache.scales(layer))
                times[name].append(time.perf_counter() - start)
        cells = [f"{statistics.median(times[name][1:]) * 1e3:.1f}" for name in args.dtypes]  # the first warms up
        print(f"| {context} | " + " | ".join(cells) + " |", flush=True)
        del caches
    print("bytes per token: " + ", ".join(
        f"{name} {KVCache.bytes_per_block(layers, 1, kv_heads, head_dim, DTYPES[name]):,}" for name in args.dtypes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
