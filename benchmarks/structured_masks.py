"""Per-step cost of grammar-constrained decoding: xgrammar, llguidance and outlines-core side by side.

Usage (from the repository root)::

    .venv/bin/python benchmarks/structured_masks.py                 # batch 1 and 64, 40 steps
    .venv/bin/python benchmarks/structured_masks.py --batch 1,16,64 --steps 60

Each library gets the demo model's vocabulary through realizar's ``Tokenizer`` (each token's bytes, the special
tokens, EOS), compiles one mid-size JSON schema (``SCHEMA``: nested object, array of objects, enum, bounded
integers, bounded strings), and then drives ``B`` matchers of that grammar for ``--steps`` decoding steps. In a
step every row fills its bitmask row (one int32 bitmask tensor ``[B, ceil(V/32)]``), the masks are applied to
random logits, each row takes its argmax and its matcher accepts that token. The table gives, per step for the
whole batch: ``fill`` (filling every row's mask, one row after another), ``accept`` (advancing every matcher),
``apply`` (the library's CPU apply-bitmask on ``[B, V]`` float32 logits), ``ours`` (realizar's
``structured.apply_bitmask`` on the same mask and logits, checked equal), and where the library has a parallel
batch fill, the same fill through it. Compile is the time to turn the schema into a matcher-ready grammar, with
the library's cache off (mean of ``--compiles`` runs). Times are medians over the steps, in ms.

Setup is building the library's view of the vocabulary, after the library's modules are imported.
Features: which request kinds each library compiles here (JSON schema, regex, choice, EBNF/Lark grammar), each
checked by compiling a small example. outlines-core has no context-free grammars.

Timing is indicative only: a shared 2-core machine, numbers differ between runs by 1.5x or more.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from realizar.loading import default_model_path
from realizar.structured import _TokenizerView, apply_bitmask
from realizar.tokenizer import Tokenizer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "name": {"type": "string", "maxLength": 24},
        "email": {"type": "string", "maxLength": 32},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer", "guest"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 30},
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 5},
        "orders": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "status": {"enum": ["pending", "shipped", "delivered"]},
                },
                "required": ["sku", "quantity", "status"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["id", "name", "active", "role", "address", "tags", "orders"],
    "additionalProperties": False,
}

FEATURE_EXAMPLES = {
    "json_schema": json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
    "regex": r"[a-z]{3}-[0-9]{2,4}",
    "choice": ["yes", "no", "maybe"],
    "grammar": 'start: "(" expr ")"\nexpr: /[0-9]+/ | start',
}


@dataclass
class Row:
    """One library's driver: build matchers, fill one bitmask row, accept a token, apply masks."""

    compile: Callable[[], Any]
    matcher: Callable[[Any], Any]
    fill: Callable[[Any, torch.Tensor, int], None]
    accept: Callable[[Any, int], bool]
    done: Callable[[Any], bool]
    apply: Callable[[torch.Tensor, torch.Tensor], None]
    fill_batch: Callable[[list[Any], torch.Tensor], None] | None
    features: Callable[[], dict[str, str]]


def _vocabulary(tokenizer: Tokenizer) -> tuple[list[bytes], list[int], list[int]]:
    """Each token's bytes, the special ids and the EOS ids, from realizar's tokenizer."""
    pieces = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    special = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
    return pieces, special, list(tokenizer.eos_token_ids)


def _check(compile_one: Callable[[str, Any], Any]) -> dict[str, str]:
    out = {}
    for kind, example in FEATURE_EXAMPLES.items():
        try:
            compile_one(kind, example)
            out[kind] = "yes"
        except Exception as exc:  # a feature the library lacks: report it, do not stop the comparison
            out[kind] = f"no ({type(exc).__name__})"
    return out


def xgrammar_row(tokenizer: Tokenizer, vocab_size: int) -> Row:
    import xgrammar as xgr

    pieces, special, eos = _vocabulary(tokenizer)
    # xgrammar takes an empty piece as a special token, which it never allows except as a stop token
    raw = [b"" if i in set(special) else p for i, p in enumerate(pieces)]
    info = xgr.TokenizerInfo(raw, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    schema = json.dumps(SCHEMA)
    batch = xgr.BatchGrammarMatcher()

    def compile_one(kind: str, example: Any) -> Any:
        if kind == "json_schema":
            return compiler.compile_json_schema(example, any_whitespace=False, strict_mode=True)
        if kind == "regex":
            return compiler.compile_regex(example)
        if kind == "choice":
            return compiler.compile_regex("|".join(_regex_escape(c) for c in example))
        return compiler.compile_grammar(xgr.Grammar.from_ebnf('root ::= "(" expr ")"\nexpr ::= [0-9]+ | root'))

    return Row(
        compile=lambda: compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True),
        matcher=lambda g: xgr.GrammarMatcher(g),
        fill=lambda m, mask, i: m.fill_next_token_bitmask(mask, i),
        accept=lambda m, t: m.accept_token(t),
        done=lambda m: m.is_terminated(),
        apply=lambda logits, mask: xgr.apply_token_bitmask_inplace(logits, mask, backend="cpu"),
        fill_batch=lambda ms, mask: batch.batch_fill_next_token_bitmask(ms, mask),
        features=lambda: _check(compile_one),
    )


def llguidance_row(tokenizer: Tokenizer, vocab_size: int) -> Row:
    import llguidance
    import llguidance.numpy as llg_numpy
    import llguidance.torch as llg_torch

    wrapper = llguidance.TokenizerWrapper(_TokenizerView(tokenizer, vocab_size))
    lltok = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False})
    executor = llguidance.LLExecutor()

    def compile_one(kind: str, example: Any) -> Any:
        text = {
            "json_schema": lambda: llguidance.LLMatcher.grammar_from_json_schema(example),
            "regex": lambda: llguidance.LLMatcher.grammar_from_regex(example),
            "choice": lambda: llguidance.LLMatcher.grammar_from_regex("|".join(_regex_escape(c) for c in example)),
            "grammar": lambda: llguidance.LLMatcher.grammar_from_lark(example),
        }[kind]()
        matcher = llguidance.LLMatcher(lltok, text)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def apply(logits: torch.Tensor, mask: torch.Tensor) -> None:
        # llguidance.torch's apply is a torch.compile kernel (needs a C toolchain, seconds to warm up);
        # its numpy apply is the CPU path
        llg_numpy.apply_token_bitmask_inplace(logits.numpy(), mask.numpy())

    def compile_grammar() -> Any:
        matcher = llguidance.LLMatcher(lltok, grammar)  # llguidance compiles lazily: a matcher is the compile
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    return Row(
        compile=compile_grammar,
        matcher=lambda g: llguidance.LLMatcher(lltok, g),
        fill=lambda m, mask, i: llg_torch.fill_next_token_bitmask(m, mask, i),
        accept=lambda m, t: m.consume_token(t),
        done=lambda m: m.is_stopped(),
        apply=apply,
        fill_batch=lambda ms, mask: llg_torch.fill_next_token_bitmask_par(
            executor, [(m, i) for i, m in enumerate(ms)], mask),
        features=lambda: _check(compile_one),
    )


def outlines_row(tokenizer: Tokenizer, vocab_size: int) -> Row:
    import outlines_core as oc
    from outlines_core.kernels import torch as oc_torch

    pieces, special, eos = _vocabulary(tokenizer)
    by_piece: dict[bytes, list[int]] = {}
    for i, piece in enumerate(pieces):
        if i not in set(special) and piece:
            by_piece.setdefault(piece, []).append(i)
    vocabulary = oc.Vocabulary(eos[0], by_piece)
    regex = oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA))

    def compile_one(kind: str, example: Any) -> Any:
        if kind == "grammar":
            raise NotImplementedError("outlines-core compiles regular languages only")
        pattern = {
            "json_schema": lambda: oc.json_schema.build_regex_from_schema(example),
            "regex": lambda: example,
            "choice": lambda: "|".join(_regex_escape(c) for c in example),
        }[kind]()
        return oc.Index(pattern, vocabulary)

    def fill(guide: Any, mask: torch.Tensor, i: int) -> None:
        row = mask[i]
        guide.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    return Row(
        compile=lambda: oc.Index(regex, vocabulary),
        matcher=lambda index: oc.Guide(index),
        fill=fill,
        accept=lambda g, t: (g.advance(t, return_tokens=False), True)[1],
        done=lambda g: g.is_finished(),
        apply=lambda logits, mask: oc_torch.apply_token_bitmask_inplace(logits, mask),
        fill_batch=None,
        features=lambda: _check(compile_one),
    )


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}/" else c for c in text)


def compile_time(row: Row, compiles: int) -> tuple[Any, float]:
    """The compiled grammar, and the mean time in ms to compile it."""
    times = []
    for _ in range(compiles):
        start = time.perf_counter()
        grammar = row.compile()
        times.append(time.perf_counter() - start)
    return grammar, statistics.mean(times) * 1000.0


def measure(row: Row, grammar: Any, vocab_size: int, batch: int, steps: int) -> dict[str, float]:
    matchers = [row.matcher(grammar) for _ in range(batch)]
    mask = torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    generator = torch.Generator().manual_seed(0)
    fill, accept, apply, ours, fill_batch = [], [], [], [], []
    for _ in range(steps):
        if any(row.done(m) for m in matchers):
            matchers = [row.matcher(grammar) if row.done(m) else m for m in matchers]
        if row.fill_batch is not None:
            start = time.perf_counter()
            row.fill_batch(matchers, mask)
            fill_batch.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            row.fill(m, mask, i)
        fill.append(time.perf_counter() - start)
        logits = torch.randn(batch, vocab_size, generator=generator)
        mine = logits.clone()
        start = time.perf_counter()
        row.apply(logits, mask)
        apply.append(time.perf_counter() - start)
        start = time.perf_counter()
        apply_bitmask(mine, mask, range(batch), vocab_size)
        ours.append(time.perf_counter() - start)
        if not torch.equal(mine, logits):
            raise RuntimeError("realizar's apply_bitmask disagrees with the library's")
        chosen = logits.argmax(dim=-1).tolist()
        start = time.perf_counter()
        for m, t in zip(matchers, chosen, strict=True):
            if not row.accept(m, t):
                raise RuntimeError(f"matcher refused token {t} that its own mask allowed")
        accept.append(time.perf_counter() - start)
    ms = 1000.0
    return {
        "fill": statistics.median(fill) * ms,
        "accept": statistics.median(accept) * ms,
        "apply": statistics.median(apply) * ms,
        "ours": statistics.median(ours) * ms,
        "fill_batch": statistics.median(fill_batch) * ms if fill_batch else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--compiles", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the apply step)")
    parser.add_argument("--libraries", default="xgrammar,llguidance,outlines-core")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_model_path(default_model_path())
    vocab_size = tokenizer.vocab_size
    builders = {"xgrammar": xgrammar_row, "llguidance": llguidance_row, "outlines-core": outlines_row}
    # imported up front so that "setup" is building the vocabulary, not importing (llguidance.torch and
    # outlines' kernels import torch's compiler, seconds on the first import)
    modules = {"xgrammar": ["xgrammar"], "llguidance": ["llguidance.torch", "llguidance.numpy"],
               "outlines-core": ["outlines_core", "outlines_core.kernels.torch"]}
    for name in args.libraries.split(","):
        for module in modules[name]:
            importlib.import_module(module)
    print(f"vocabulary {vocab_size}; schema {len(json.dumps(SCHEMA))} chars; {args.steps} steps; "
          f"{torch.get_num_threads()} torch thread(s); ms")
    print(f"{'library':<14}{'setup':>8}{'compile':>9}{'B':>4}{'fill':>9}{'accept':>9}{'apply':>8}{'ours':>7}"
          f"{'fill+acc':>10}{'par fill':>10}  features")
    for name in args.libraries.split(","):
        start = time.perf_counter()
        row = builders[name](tokenizer, vocab_size)
        setup = (time.perf_counter() - start) * 1000.0
        features = row.features()
        grammar, compile_ms = compile_time(row, args.compiles)
        for batch in (int(b) for b in args.batch.split(",")):
            r = measure(row, grammar, vocab_size, batch, args.steps)
            print(f"{name:<14}{setup:8.0f}{compile_ms:9.1f}{batch:4d}{r['fill']:9.3f}{r['accept']:9.3f}"
                  f"{r['apply']:8.3f}{r['ours']:7.3f}{r['fill'] + r['accept']:10.3f}{r['fill_batch']:10.3f}  "
                  + ", ".join(f"{k}: {v}" for k, v in features.items()))


if __name__ == "__main__":
    main()
