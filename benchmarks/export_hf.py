"""Write the default model as a Hugging Face directory, for peers that cannot
read our GGUF (vLLM's CPU build).

Usage (from the repository root)::

    .venv/bin/python benchmarks/export_hf.py .peers/smollm2-hf

``make peers`` (``benchmarks/peers/setup.sh hf-model``) runs it into ``.peers/``.

transformers reads SmolLM2-135M-Instruct Q4_1 GGUF, dequantizes it to float32
and writes ``config.json``, ``model.safetensors`` (about 540 MB), the tokenizer
(``tokenizer.json``, ``tokenizer_config.json``) and the chat template. The
weights are the GGUF's dequantized values, so the peer computes with the same
numbers as realizar does after its own dequantization.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import default_gguf


def export(out: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    t0 = time.perf_counter()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # the weights are dequantized already; without the GGUF quantizer they can be saved
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output directory")
    args = p.parse_args(argv)
    seconds = export(args.out)
    print(f"wrote {args.out} in {seconds:.1f} s: {', '.join(sorted(x.name for x in args.out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
