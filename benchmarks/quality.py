"""The quality gate of the quantized fast class (int8 activations, integer dot products) and,
for comparison, of the exact quantized class, against float32 weights, on the default model.

Usage (from the repository root)::

    .venv/bin/python benchmarks/quality.py                    # 2,048 tokens of the fixed text
    .venv/bin/python benchmarks/quality.py --tokens 4096 --text some.txt

Teacher-forced over the first ``--tokens`` tokens of ``--text`` (default: the frozen copy of the
architecture notes in ``benchmarks/data/quality_text.md``, repeated if it is shorter): argmax
agreement with float32 (>= 99 % required) and perplexity within 1 % of float32's
(``realizar.model.quality``). Exits 1 when the fast class fails the gate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from realizar import kernels
from realizar.loading import default_model_path, load_model
from realizar.model.llama import LlamaModel
from realizar.model.quality import compare, teacher_forced
from realizar.tokenizer import Tokenizer

TEXT = Path(__file__).with_name("data") / "quality_text.md"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the text (default 2048)")
    p.add_argument("--text", type=Path, default=TEXT)
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
    reference = teacher_forced(LlamaModel(loaded.config, floats, cpu, torch.float32), ids)
    print(f"{len(ids)} tokens; float32 perplexity {reference.perplexity:.4f}")
    print("| weights | argmax agreement | perplexity | ratio to float32 | gate |")
    print("|---|---|---|---|---|")
    failed = False
    for name, fast in (("quantized exact", False), ("quantized fast", True)):
        model = LlamaModel(loaded.config, loaded.tensors, cpu, torch.float32, loaded.quantized, fast)
        # the fast class multiplies only a few rows at a time with integer products (more exactly):
        # steps of that many rows put every position through them
        report = compare(teacher_forced(model, ids, chunk=compiled.fast_max_rows if fast else 256), reference)
        failed |= fast and not report.passed
        print(f"| {name} | {report.agreement:.2%} | {report.perplexity:.4f} | {report.perplexity_ratio:.4f} "
              f"| {'pass' if report.passed else 'FAIL'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
