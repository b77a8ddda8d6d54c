"""The linear layers of the default model: torch's ``F.linear`` and numpy's OpenBLAS against
realizar's packed-weight kernel.

Usage (from the repository root)::

    .venv/bin/python benchmarks/matmul.py                  # rows 1, 4, 16, 64, 512; 1 and 2 threads
    .venv/bin/python benchmarks/matmul.py --rows 1,16 --threads 2

For each row count (the tokens of an engine step) it times every projection of one
forward pass, each layer with its own weights so that nothing is served from cache that
would not be in a real step: q/k/v (fused), o, gate/up (fused), down for every layer, and
the LM head. ``F.linear`` is torch's float32 path (MKL on x86); OpenBLAS is numpy's sgemm
over the transposed weight (realizar's path without a C compiler); ``packed`` is realizar's
``Linear`` with the compiled kernels (``realizar/kernels/packed_gemm.c``); ``quantized`` is
``QuantLinear`` (``realizar/kernels/quant_gemm.c``) over the default GGUF's own weights kept in
their blocks (Q4_1, and the Q8_0 tied LM head), dequantized exactly on the fly. Each runs with
``--threads`` threads while the other pools have one, so that no idle pool spins against
it. Prints ms per forward pass, GFLOP/s and each peer's time over packed's (above 1:
realizar is faster). Random float weights of the model's shapes; the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from realizar import kernels
from realizar.backends import CpuKernelsBackend, LinearLayer
from realizar.backends.cpu_kernels import PackedLinear
from realizar.backends.torch_backend import openblas_setters
from realizar.loading import default_model_path, load_model


def shapes() -> list[tuple[int, int, int]]:
    """(out, in, count) of each projection in one forward pass of the default model."""
    c = load_model(default_model_path(), dtype=torch.float32).config
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    per_layer = [(qkv, c.hidden_size), (c.hidden_size, c.num_heads * c.head_dim),
                 (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)]
    return [(o, i, c.num_layers) for o, i in per_layer] + [(c.vocab_size, c.hidden_size, 1)]


def quantized_layers(compiled: kernels.CpuKernels) -> list[list[LinearLayer]]:
    """The default model's projections kept quantized, in the order of ``shapes()``."""
    loaded = load_model(default_model_path(), keep_quantized=True)
    weights = {**loaded.tensors, **loaded.quantized}
    c, backend = loaded.config, CpuKernelsBackend(compiled)

    def layer(*names: str) -> LinearLayer:
        return backend.linear([weights[n] for n in names])

    per_layer: list[list[LinearLayer]] = [[], [], [], []]
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        per_layer[0].append(layer(*(p + f"self_attn.{n}_proj.weight" for n in "qkv")))
        per_layer[1].append(layer(p + "self_attn.o_proj.weight"))
        per_layer[2].append(layer(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"))
        per_layer[3].append(layer(p + "mlp.down_proj.weight"))
    head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
    return [*per_layer, [layer(head)]]


def best_ms(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def set_pools(torch_threads: int, blas: int, packed: int) -> None:
    torch.set_num_threads(torch_threads)
    for setter in openblas_setters():
        setter(blas)
    compiled = kernels.load()
    if compiled is not None:
        compiled.set_threads(packed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,4,16,64,512", help="comma-separated row counts (default 1,4,16,64,512)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    compiled = kernels.load()
    if compiled is None:
        raise SystemExit("the compiled kernels are not available (no C compiler, or REALIZAR_KERNELS=0)")
    layout = shapes()
    weights = [[torch.randn(o, i) for _ in range(n)] for o, i, n in layout]
    transposed = [[w.t().contiguous().numpy() for w in ws] for ws in weights]
    linears = [[PackedLinear(w, compiled) for w in ws] for ws in weights]
    quantized = quantized_layers(compiled)
    print("| threads | rows | F.linear ms | OpenBLAS ms | packed ms | quantized ms | packed GFLOP/s "
          "| F.linear / packed | OpenBLAS / packed | packed / quantized |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(rows, i) for _o, i, _n in layout]
            flops = sum(2 * rows * o * i * n for o, i, n in layout)

            def torch_pass(xs=xs) -> None:  # type: ignore[no-untyped-def]
                for x, ws in zip(xs, weights, strict=True):
                    for w in ws:
                        F.linear(x, w)

            def blas_pass(xs=xs) -> None:  # type: ignore[no-untyped-def]
                for x, ws in zip(xs, transposed, strict=True):
                    for w in ws:
                        np.matmul(x.numpy(), w)

            def packed_pass(xs=xs) -> None:  # type: ignore[no-untyped-def]
                for x, ls in zip(xs, linears, strict=True):
                    for layer in ls:
                        layer(x)

            set_pools(threads, 1, 1)
            t_torch = best_ms(torch_pass, args.repeats)
            set_pools(1, threads, 1)
            t_blas = best_ms(blas_pass, args.repeats)
            def quantized_pass(xs=xs) -> None:  # type: ignore[no-untyped-def]
                for x, ls in zip(xs, quantized, strict=True):
                    for layer in ls:
                        layer(x)

            set_pools(1, 1, threads)
            t_packed = best_ms(packed_pass, args.repeats)
            t_quant = best_ms(quantized_pass, args.repeats)
            print(f"| {threads} | {rows} | {t_torch:.1f} | {t_blas:.1f} | {t_packed:.1f} | {t_quant:.1f} "
                  f"| {flops / t_packed / 1e6:.0f} | {t_torch / t_packed:.2f}x | {t_blas / t_packed:.2f}x "
                  f"| {t_packed / t_quant:.2f}x |")


if __name__ == "__main__":
    main()
