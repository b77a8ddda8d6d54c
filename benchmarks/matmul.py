"""The linear layers of the default model: torch's ``F.linear`` against realizar's ``Linear``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/matmul.py                  # rows 1, 4, 16, 64; 1 and 2 threads
    .venv/bin/python benchmarks/matmul.py --rows 1,16 --threads 2

For each row count (the tokens of an engine step) it times every projection of one
forward pass, each layer with its own weights so that nothing is served from cache that
would not be in a real step: q/k/v (fused), o, gate/up (fused), down for every layer, and
the LM head. ``F.linear`` is torch's float32 path (MKL on x86); realizar's ``Linear`` is
numpy's OpenBLAS over the transposed weight. Prints ms per forward pass, GFLOP/s and the
ratio F.linear / Linear (above 1: realizar is faster). Random weights of the model's shapes;
the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from realizar.loading import default_model_path, load_model
from realizar.model.linear import Linear, blas_threads


def shapes() -> list[tuple[int, int, int]]:
    """(out, in, count) of each projection in one forward pass of the default model."""
    c = load_model(default_model_path(), dtype=torch.float32).config
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    per_layer = [(qkv, c.hidden_size), (c.hidden_size, c.num_heads * c.head_dim),
                 (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)]
    return [(o, i, c.num_layers) for o, i in per_layer] + [(c.vocab_size, c.hidden_size, 1)]


def best_ms(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,4,16,64", help="comma-separated row counts (default 1,4,16,64)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    layout = shapes()
    weights = [[torch.randn(o, i) for _ in range(n)] for o, i, n in layout]
    linears = [[Linear(w) for w in ws] for ws in weights]
    print("| threads | rows | F.linear ms | Linear ms | F.linear GFLOP/s | Linear GFLOP/s | F.linear / Linear |")
    print("|---|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        blas_threads(threads)
        for rows in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(rows, i) for _o, i, _n in layout]
            flops = sum(2 * rows * o * i * n for o, i, n in layout)

            def torch_pass(xs=xs) -> None:  # type: ignore[no-untyped-def]
                for x, ws in zip(xs, weights, strict=True):
                    for w in ws:
                        F.linear(x, w)

            def realizar_pass(xs=xs) -> None:  # type: ignore[no-untyped-def]
                for x, ls in zip(xs, linears, strict=True):
                    for layer in ls:
                        layer(x)

            t_torch, t_ours = best_ms(torch_pass, args.repeats), best_ms(realizar_pass, args.repeats)
            print(f"| {threads} | {rows} | {t_torch:.1f} | {t_ours:.1f} | {flops / t_torch / 1e6:.0f} "
                  f"| {flops / t_ours / 1e6:.0f} | {t_torch / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
