"""What a cheaper precision would cost in the quality gate, measured by emulation before any kernel
is written for it: the default model's float32 weights, run through torch, with the activations of
one kind of linear layer (or the KV cache) rounded as the cheaper kernel would round them.

Usage (from the repository root)::

    .venv/bin/python benchmarks/precision.py                          # the default set (about 10 min)
    .venv/bin/python benchmarks/precision.py --groups 32,16,8 --kinds qkv --no-kv
    .venv/bin/python benchmarks/precision.py --bf16                   # bfloat16 instead (about 4 min)
    .venv/bin/python benchmarks/precision.py --int8-weights 0,64      # int8 weights per row / 64 terms

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


def grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x``'s last dimension in groups of ``group`` terms (0: one group)."""
    group = group or x.shape[-1]
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def one_int8_term(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` rounded to one int8 term per ``group`` consecutive terms of its last dimension (0: all of
    them), each group with the scale max |x| / 127."""
    g = grouped(x, group)
    d = g.abs().amax(-1, keepdim=True) / 127
    d = torch.where(d == 0, torch.ones_like(d), d)
    return (torch.round(g / d).clamp(-127, 127) * d).reshape(x.shape)


class RoundedInput:
    """A linear layer whose input is rounded first (``ranked`` too, for an LM head)."""

    def __init__(self, linear: Any, rounding: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.linear, self.rounding = linear, rounding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rounding(x))

    def ranked(self, x: torch.Tensor, argmax: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear.ranked(self.rounding(x), argmax)

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


def in_layers(name: str) -> bool:
    """Whether the tensor ``name`` is a decoder layer's (not the embedding, which is also the tied LM head)."""
    return ".layers." in name


def bfloat16(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


def rounded_weights(floats: dict[str, torch.Tensor], quantized: dict[str, Any],
                    rounding: Callable[[torch.Tensor], torch.Tensor], layers_only: bool) -> dict[str, torch.Tensor]:
    """``floats`` with the quantized weights (``layers_only``: the decoder layers') rounded by ``rounding``."""
    return {name: rounding(t) if name in quantized and (in_layers(name) or not layers_only) else t
            for name, t in floats.items()}


def round_inputs(m: LlamaModel, rounding: Callable[[torch.Tensor], torch.Tensor],
                 kinds: tuple[str, ...] = LAYER_KINDS, head: bool = False) -> LlamaModel:
    """``m`` with the inputs of every layer's ``kinds`` of product (and, with ``head``, the LM head's)
    rounded by ``rounding``."""
    for layer in m.layers:
        for kind in kinds:
            setattr(layer, kind, RoundedInput(getattr(layer, kind), rounding))
    if head:
        m.lm_head = RoundedInput(m.lm_head, rounding)  # type: ignore[assignment]
    return m


def bf16_rows(quantized: dict[str, Any], floats: dict[str, torch.Tensor],
              model: Callable[..., LlamaModel], report: Callable[[str, LlamaModel], None]) -> None:
    """The gate's figures with the quantized weights rounded to bfloat16 (every one, or all but the tied
    embedding / LM head), and with the inputs of every layer's four products (and the LM head's) rounded."""
    rounded = rounded_weights(floats, quantized, bfloat16, layers_only=False)
    but_head = rounded_weights(floats, quantized, bfloat16, layers_only=True)
    rows = [("quantized weights in bf16", rounded, False, False),
            ("activations in bf16, the layers' products", floats, True, False),
            ("activations in bf16, the layers' products and the LM head", floats, True, True),
            ("weights and activations in bf16, layers and LM head", rounded, True, True),
            ("weights and activations in bf16, layers only (LM head float32)", but_head, True, False)]
    for label, weights, activations, head in rows:
        m = model(weights=weights)
        report(label, round_inputs(m, bfloat16, head=head) if activations else m)


def two_int8_terms(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` as the fast class rounds it, x ~= d (256 a + b) with 256 d = max |x| / 127, per ``group`` terms."""
    g = grouped(x, group)
    coarse = g.abs().amax(-1, keepdim=True) / 127
    coarse = torch.where(coarse == 0, torch.ones_like(coarse), coarse)
    a = torch.round(g / coarse)
    b = torch.round((g - a * coarse) / (coarse / 256)).clamp(-127, 127)
    return ((256 * a + b) * (coarse / 256)).reshape(x.shape)


def int8_weight_rows(quantized: dict[str, Any], floats: dict[str, torch.Tensor], group: int,
                     model: Callable[..., LlamaModel], report: Callable[[str, LlamaModel], None]) -> None:
    """The gate's figures with the layers' quantized weights requantized to int8, one scale per ``group``
    terms of a row (what integer tiles could sum over all of K, 0: the whole row, with no per-block scales
    to apply), the LM head kept; alone, and with the activations in two int8 terms per as many terms."""
    weights = rounded_weights(floats, quantized, lambda t: one_int8_term(t, group), layers_only=True)
    per = f"{group} terms" if group else "row"
    report(f"layers' weights requantized to int8, one scale per {per}", model(weights=weights))
    report(f"the same, and activations in two int8 terms per {per}",
           round_inputs(model(weights=weights), lambda x: two_int8_terms(x, group)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the text (default 2048)")
    p.add_argument("--text", type=Path, default=TEXT)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (default 256)")
    p.add_argument("--kinds", default="qkv,o,gate_up,down,lm_head", help="layer kinds, comma-separated")
    p.add_argument("--groups", default="32,16", help="terms per int8 scale, comma-separated (default 32,16)")
    p.add_argument("--no-kv", action="store_true", help="leave out the int8 KV cache rows")
    p.add_argument("--bf16", action="store_true",
                   help="instead: bfloat16 weights and/or activations, as AMX's bf16 tiles would take them")
    p.add_argument("--int8-weights", default="", metavar="GROUPS",
                   help="instead: the layers' quantized weights as int8 with one scale per GROUPS terms (0: per row), "
                        "comma-separated, alone and with two int8 activation terms per as many terms")
    args = p.parse_args()
    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    loaded = load_model(default_model_path(), keep_quantized=True)
    ids = Tokenizer.from_gguf_metadata(loaded.metadata).encode(args.text.read_text())
    while len(ids) < args.tokens:
        ids = ids + ids
    ids = ids[:args.tokens]
    floats = {**loaded.tensors, **{name: q.dequantize() for name, q in loaded.quantized.items()}}

    def model(backend: TorchBackend | None = None, weights: dict[str, torch.Tensor] | None = None) -> LlamaModel:
        return LlamaModel(loaded.config, floats if weights is None else weights, cpu, torch.float32,
                          backend=backend or TorchBackend(cpu, torch.float32))

    reference = teacher_forced(model(), ids, args.chunk)
    print(f"{len(ids)} tokens; float32 perplexity {reference.perplexity:.4f}")
    print("| emulated change | argmax agreement | perplexity ratio | gate |")
    print("|---|---|---|---|")

    def report(label: str, candidate: LlamaModel) -> None:
        r = compare(teacher_forced(candidate, ids, args.chunk), reference)
        print(f"| {label} | {r.agreement:.2%} | {r.perplexity_ratio:.4f} | {'pass' if r.passed else 'FAIL'} |",
              flush=True)

    if args.bf16:
        bf16_rows(loaded.quantized, floats, model, report)
        return
    if args.int8_weights:
        for group in (int(g) for g in args.int8_weights.split(",")):
            int8_weight_rows(loaded.quantized, floats, group, model, report)
        return
    for group in (int(g) for g in args.groups.split(",")):
        def rounding(x: torch.Tensor, group: int = group) -> torch.Tensor:
            return one_int8_term(x, group)
        for kind in args.kinds.split(","):
            if kind != "lm_head" and kind not in LAYER_KINDS:
                raise SystemExit(f"unknown kind {kind!r}: one of {', '.join(LAYER_KINDS)}, lm_head")
            m = round_inputs(model(), rounding, kinds=() if kind == "lm_head" else (kind,), head=kind == "lm_head")
            report(f"{kind}: one int8 term per {group} activations", m)
    if not args.no_kv:
        for label, keys, values in (("keys", True, False), ("values", False, True), ("keys and values", True, True)):
            report(f"KV cache: {label} int8, one scale per token and head", model(RoundedKV(cpu, keys, values)))


if __name__ == "__main__":
    main()
