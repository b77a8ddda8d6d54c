"""What a cheaper precision would cost in the quality gate, measured by emulation before any kernel
is written for it: the default model's float32 weights, run through torch, with the activations of
one kind of linear layer (or the KV cache) rounded as the cheaper kernel would round them.

Usage (from the repository root)::

    .venv/bin/python benchmarks/precision.py                          # the default set (about 10 min)
    .venv/bin/python benchmarks/precision.py --groups 32,16,8 --kinds qkv --no-kv

Activations: each row's terms in groups of ``G``, each group one int8 term with the scale
max |x| / 127 (what llama.cpp's Q8 activations do with G = 32), where realizar's fast class keeps two
int8 terms (``quant_fast.c``: the error 256 times smaller, for twice the integer dot products). A kind
is ``qkv``, ``o``, ``gate_up``, ``down`` (in every layer) or ``lm_head``. KV cache: keys and/or values
as int8 with one scale per token and KV head, stored back as float32.

The gate is the one ``benchmarks/quality.py`` applies (``realizar.model.quality``): argmax agreement
with float32 >= 99 % and perplexity within 1 %, teacher-forced over the same fixed text. Each row of
the table changes one thing, so it shows what that one change spends of the 1 % the gate allows.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from realizar.backends import TorchBackend
from realizar.kv_cache import KVCache
from realizar.loading import default_model_path, load_model
from realizar.model.llama import LlamaModel
from realizar.model.quality import compare, teacher_forced
from realizar.tokenizer import Tokenizer

TEXT = Path(__file__).with_name("data") / "quality_text.md"
LAYER_KINDS = ("qkv", "o", "gate_up", "down")


def one_int8_term(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` rounded to one int8 term per ``group`` consecutive terms of its last dimension, each group
    with the scale max |x| / 127."""
    g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    d = g.abs().amax(-1, keepdim=True) / 127
    d = torch.where(d == 0, torch.ones_like(d), d)
    return (torch.round(g / d).clamp(-127, 127) * d).reshape(x.shape)


class RoundedInput:
    """A linear layer whose input is rounded first (``ranked`` too, for an LM head)."""

    def __init__(self, linear: Any, rounding: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.linear, self.rounding = linear, rounding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rounding(x))

    def ranked(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear.ranked(self.rounding(x))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.linear, name)


class RoundedKV(TorchBackend):
    """The torch backend, writing keys and/or values rounded to int8 per token and head."""

    def __init__(self, device: torch.device, keys: bool, values: bool) -> None:
        super().__init__(device, torch.float32)
        self.keys, self.values = keys, values

    def write_kv(self, cache: KVCache, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        head_dim = k.shape[-1]  # [T, KV, hd]: one scale per token and head
        super().write_kv(cache, layer, slots, one_int8_term(k, head_dim) if self.keys else k,
                         one_int8_term(v, head_dim) if self.values else v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the text (default 2048)")
    p.add_argument("--text", type=Path, default=TEXT)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (default 256)")
    p.add_argument("--kinds", default="qkv,o,gate_up,down,lm_head", help="layer kinds, comma-separated")
    p.add_argument("--groups", default="32,16", help="terms per int8 scale, comma-separated (default 32,16)")
    p.add_argument("--no-kv", action="store_true", help="leave out the int8 KV cache rows")
    args = p.parse_args()
    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    loaded = load_model(default_model_path(), keep_quantized=True)
    ids = Tokenizer.from_gguf_metadata(loaded.metadata).encode(args.text.read_text())
    while len(ids) < args.tokens:
        ids = ids + ids
    ids = ids[:args.tokens]
    floats = {**loaded.tensors, **{name: q.dequantize() for name, q in loaded.quantized.items()}}

    def model(backend: TorchBackend | None = None) -> LlamaModel:
        return LlamaModel(loaded.config, floats, cpu, torch.float32, backend=backend or TorchBackend(cpu, torch.float32))

    reference = teacher_forced(model(), ids, args.chunk)
    print(f"{len(ids)} tokens; float32 perplexity {reference.perplexity:.4f}")
    print("| emulated change | argmax agreement | perplexity ratio | gate |")
    print("|---|---|---|---|")

    def report(label: str, candidate: LlamaModel) -> None:
        r = compare(teacher_forced(candidate, ids, args.chunk), reference)
        print(f"| {label} | {r.agreement:.2%} | {r.perplexity_ratio:.4f} | {'pass' if r.passed else 'FAIL'} |",
              flush=True)

    for group in (int(g) for g in args.groups.split(",")):
        def rounding(x: torch.Tensor, group: int = group) -> torch.Tensor:
            return one_int8_term(x, group)
        for kind in args.kinds.split(","):
            m = model()
            if kind == "lm_head":
                m.lm_head = RoundedInput(m.lm_head, rounding)  # type: ignore[assignment]
            elif kind in LAYER_KINDS:
                for layer in m.layers:
                    setattr(layer, kind, RoundedInput(getattr(layer, kind), rounding))
            else:
                raise SystemExit(f"unknown kind {kind!r}: one of {', '.join(LAYER_KINDS)}, lm_head")
            report(f"{kind}: one int8 term per {group} activations", m)
    if not args.no_kv:
        for label, keys, values in (("keys", True, False), ("values", False, True), ("keys and values", True, True)):
            report(f"KV cache: {label} int8, one scale per token and head", model(RoundedKV(cpu, keys, values)))


if __name__ == "__main__":
    main()
