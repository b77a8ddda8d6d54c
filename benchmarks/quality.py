"""The quality gate of the paths that trade exactness for speed or memory, against float32 on the
default model: the quantized fast class (int8 activations, integer dot products; and where the CPU has
AMX, its products on the tiles, which ``REALIZAR_TILES`` or ``auto`` turn on), the exact quantized class for
comparison, and the float16 and int8 KV caches (``--kv-cache-dtype``) with each of them.

Usage (from the repository root)::

    .venv/bin/python benchmarks/quality.py                    # 2,048 tokens of the fixed text
    .venv/bin/python benchmarks/quality.py --tokens 4096 --text some.txt

Teacher-forced over the first ``--tokens`` tokens of ``--text`` (default: the frozen copy of the
architecture notes in ``benchmarks/data/quality_text.md``, repeated if it is shorter), in prefill
chunks of ``--chunk`` tokens that attend to the earlier ones through the paged cache: argmax agreement
with float32 weights and a float32 cache (>= 99 % required) and perplexity within 1 % of theirs
(``realizar.model.quality``). Exits 1 when a configuration ``auto`` may choose fails the gate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from realizar import kernels
from realizar.loading import default_model_path, load_model
from realizar.model.llama import LlamaModel
from realizar.model.quality import KV_CACHE_DTYPES_PASSING_GATE, compare, teacher_forced
from realizar.tokenizer import Tokenizer

TEXT = Path(__file__).with_name("data") / "quality_text.md"
TILES = "quantized fast, AMX tiles"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the text (default 2048)")
    p.add_argument("--text", type=Path, default=TEXT)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (default 256)")
    args = p.parse_args()
    cpu = torch.device("cpu")
    compiled = kernels.load()
    if compiled is None:
        sys.exit("the quantized kernels need a C compiler")
    loaded = load_model(default_model_path(), keep_quantized=True)
    tokenizer = Tokenizer.from_gguf_metadata(loaded.metadata)
    ids = tokenizer.encode(args.text.read_text())
    while len(ids) < args.tokens:
        ids = ids + ids
    ids = ids[:args.tokens]
    floats = {**loaded.tensors, **{name: q.dequantize() for name, q in loaded.quantized.items()}}
    float_model = LlamaModel(loaded.config, floats, cpu, torch.float32)
    reference = teacher_forced(float_model, ids, args.chunk)
    print(f"{len(ids)} tokens; float32 perplexity {reference.perplexity:.4f}")
    print("| weights | KV cache | argmax agreement | perplexity | ratio to float32 | gate |")
    print("|---|---|---|---|---|---|")
    failed = False
    models = {"float32": float_model,
              "quantized exact": LlamaModel(loaded.config, loaded.tensors, cpu, torch.float32, loaded.quantized),
              "quantized fast": LlamaModel(loaded.config, loaded.tensors, cpu, torch.float32, loaded.quantized, True)}
    runs = [("quantized exact", torch.float32), ("quantized fast", torch.float32), ("float32", torch.float16),
            ("quantized exact", torch.float16), ("quantized fast", torch.float16), ("float32", torch.int8),
            ("quantized exact", torch.int8), ("quantized fast", torch.int8)]
    # the fast class's products of many rows on AMX tiles (REALIZAR_TILES), where this CPU and build have them:
    # chunks of at least tile_min_rows rows (of every kind) put every position through them (a shorter last
    # chunk's take the integer products; the default 2,048 tokens in chunks of 256 leave none)
    if compiled.tiles_available() and args.chunk >= compiled.tile_min_rows_every_kind:
        models[TILES] = models["quantized fast"]
        runs += [(TILES, torch.float32), (TILES, torch.float16), (TILES, torch.int8)]
    for name, kv in runs:
        compiled.set_tiles(name == TILES)
        # the fast class multiplies only a few rows at a time with integer products (more exactly):
        # steps of that many rows put every position through them
        chunk = min(args.chunk, compiled.fast_max_rows) if name == "quantized fast" else args.chunk
        report = compare(teacher_forced(models[name], ids, chunk, kv), reference)
        kv_name = str(kv).removeprefix("torch.")
        # auto may choose any class of weights, over a cache it may choose (an int8 one is only ever asked for)
        choosable = kv == torch.float32 or KV_CACHE_DTYPES_PASSING_GATE.get(kv_name, False)
        failed |= choosable and not report.passed
        print(f"| {name} | {kv_name} | {report.agreement:.2%} | {report.perplexity:.4f} "
              f"| {report.perplexity_ratio:.4f} | {'pass' if report.passed else 'FAIL'} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
