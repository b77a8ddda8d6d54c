"""Grammar-constrained decoding: JSON (any object, or a schema), regex, a choice of strings, a Lark/GBNF grammar.

Which library, and why. Measured with ``benchmarks/structured_masks.py`` (``--batch 1,64 --steps 40``) on
the demo model's vocabulary (SmolLM2-135M, 49,152 tokens, loaded through realizar's Tokenizer), with a 1.1 kB
JSON schema (nested object, array of objects, enums, bounded integers and strings, a pattern): each step every
row fills its bitmask row, the masks are applied to random [B, V] float32 logits, each row takes its argmax and
its matcher accepts it. CPU, one torch thread, on the shared 2-core dev machine at a load average of ~8, so
indicative only: the ranges span four runs (30 to 60 steps). Setup = building the library's view of the
vocabulary (modules already imported); compile = schema to a matcher-ready grammar with the library's cache
off; the rest in ms per step for the whole batch::

    library               setup   compile    B  fill        accept      fill+accept  lib apply   CFG
    xgrammar 0.2.8        0.12 s  1.9-2.6 s  1  0.002       0.005-0.008 0.007-0.010  0.21        EBNF
                                            64  4.1-13.4    0.32-0.35   4.5-13.7     20-32
    llguidance 1.9.1      0.28 s  1-4 ms     1  0.018-0.028 0.005-0.014 0.023-0.042  0.08-0.16   Lark (+GBNF)
                                            64  1.06-1.25   0.33-0.40   1.41-1.64    16-28 (numpy)
    outlines-core 0.2.14  0.65 s  2.4-9.3 s  1  0.006-0.007 0.002-0.004 0.009-0.010  0.07-0.09   none
                                            64  0.60-0.79   0.08-0.10   0.69-0.87    1.6-2.8 (torch.compile)

All three compile JSON schema, regex and choice (as an alternation); only outlines-core lacks context-free
grammars. We use llguidance: its per-step cost is about 2x the fastest's at batch 64 (and 3-8x below
xgrammar's), while its compile is three orders of magnitude cheaper than either other's (a new schema costs
milliseconds, not seconds, on the request path, which also makes compile-to-validate cheap enough to answer a
bad schema with a 400 at the edge); it handles all four request kinds, llama.cpp's GBNF through its own
converter; it is maintained by the guidance project and used by vLLM and llama.cpp; and its wheel depends on
nothing (xgrammar's pulls torch, transformers, triton and tvm-ffi). Its parallel batch fill (``LLExecutor``)
measured 15-34 ms at batch 64 here against 1.1 ms for the plain loop (threads fighting over two busy cores), so
rows are filled one after another.

The masks are applied by :func:`apply_bitmask` (a byte-table lookup added in place), not by the library:
llguidance's CPU apply is numpy bit unpacking (16-28 ms at batch 64) and its fast one a ``torch.compile``
kernel that needs a C toolchain and seconds of warm-up. Ours measured 0.03-0.09 ms at batch 1 and 2.3 ms (best)
to 7 ms (median under load) at batch 64, equal bit for bit to each library's own apply.

Nothing outside this module imports the library: the rest of realizar sees :class:`StructuredSpec`,
:class:`StructuredCompiler`, :class:`CompiledGrammar`, :class:`Matcher` and :func:`apply_masks`.

End of sequence: the matcher allows the model's EOS tokens whenever the text so far is complete
(:meth:`Matcher.allowed_eos`), and only EOS once nothing can follow (:meth:`Matcher.is_terminated`). The engine
samples as usual and finishes on EOS; it may instead finish as soon as ``is_terminated()`` turns true after a
non-EOS token, which saves one step. A row whose EOS is banned (``min_tokens``) while its grammar allows only
EOS would be left with no token: the engine must not ban EOS on a terminated constrained row.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llguidance
import torch
from llguidance.gbnf_to_lark import any_to_lark

from realizar.request import GrammarError, StructuredKind, StructuredSpec
from realizar.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = [
    "CompiledGrammar",
    "GrammarError",
    "Matcher",
    "StructuredCompiler",
    "StructuredKind",
    "StructuredSpec",
    "apply_bitmask",
    "apply_masks",
]

# JSON may be laid out as the model likes (compact, or pretty-printed), but each gap holds at most 40 whitespace
# characters (room for 4-space indents ten levels deep): with unbounded whitespace, a small model can emit
# newlines forever inside an object and never close it.
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": True, "whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,40}"}


def _grammar_text(spec: StructuredSpec) -> str:
    """The llguidance grammar (JSON text) for ``spec``; library-side validation comes later, in compile."""
    value = spec.value
    make = llguidance.LLMatcher
    try:
        if spec.kind == "json_object":
            return make.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if spec.kind == "json_schema":
            assert isinstance(value, str)
            return make.grammar_from_json_schema(value, defaults=_JSON_OPTIONS,
                                                 overrides=None if spec.strict else {"lenient": True})
        if spec.kind == "regex":
            assert isinstance(value, str)
            return make.grammar_from_regex(value)
        if spec.kind == "choice":
            # Lark string literals take JSON escapes, so quotes, backslashes and newlines in a choice are literal
            return make.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
        assert isinstance(value, str)
        return make.grammar_from_lark(any_to_lark(value))
    except Exception as exc:  # the GBNF converter and the JSON reader raise their own error types
        raise GrammarError(f"invalid {spec.kind}: {exc}") from None


class _TokenizerView:
    """What ``llguidance.TokenizerWrapper`` reads: each id's bytes, the special ids, EOS/BOS and an encoder.

    Ids past the tokenizer's vocabulary (a model whose logits are wider) get no bytes and count as special,
    so no grammar ever allows them.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.tokens += [b""] * (vocab_size - tokenizer.vocab_size)
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
        self.special_token_ids += list(range(tokenizer.vocab_size, vocab_size))
        self.eos_token_id = tokenizer.eos_token_ids[0]
        self.bos_token_id = tokenizer.bos_token_id
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tokenizer.encode(text, add_special_tokens=False)


class Matcher:
    """One request's grammar state: which tokens may come next, and the tokens taken so far.

    Not thread-safe; the engine thread owns it. Never raises for a token outside the grammar: ``accept``
    returns False and the matcher stays in error (its mask then allows only EOS).
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed next tokens into ``bitmask_row``: int32, contiguous, on the CPU, ``ceil(V / 32)``
        words, bit ``t % 32`` of word ``t // 32`` set for an allowed token ``t``."""
        if (bitmask_row.dtype != torch.int32 or bitmask_row.device.type != "cpu"
                or not bitmask_row.is_contiguous() or bitmask_row.numel() != _words(self.vocab_size)):
            raise ValueError(f"bitmask row must be {_words(self.vocab_size)} contiguous int32 words on the CPU")
        self._matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it (see :attr:`error`)."""
        return self._matcher.consume_token(token_id)

    def is_terminated(self) -> bool:
        """Whether the output is complete and nothing may follow but EOS (or it already took EOS, or failed)."""
        return self._matcher.is_stopped()

    def allowed_eos(self) -> bool:
        """Whether the text so far is a complete match, so EOS is allowed now."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a refused token), or None."""
        return self._matcher.get_error() if self._matcher.is_error() else None


@dataclass(frozen=True)
class CompiledGrammar:
    """A spec compiled for one tokenizer; makes a fresh :class:`Matcher` per request (a copy, microseconds)."""

    spec: StructuredSpec
    _template: llguidance.LLMatcher  # never advanced: only copied
    vocab_size: int

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy(), self.vocab_size)


class StructuredCompiler:
    """Compiles :class:`StructuredSpec` for one tokenizer, with a bounded cache of compiled grammars.

    Build once per model with :meth:`from_tokenizer`. Thread-safe: the server compiles to validate a request
    (a bad spec is a :class:`GrammarError`), the engine compiles again (a cache hit) to make the matcher.
    """

    def __init__(self, lltokenizer: llguidance.LLTokenizer, vocab_size: int, cache_size: int = 256) -> None:
        self._tokenizer = lltokenizer
        self.vocab_size = vocab_size
        self._cache: OrderedDict[StructuredSpec, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, vocab_size: int | None = None,
                       cache_size: int = 256) -> StructuredCompiler:
        """A compiler for ``tokenizer``; ``vocab_size`` is the model's logits width when it exceeds the
        tokenizer's vocabulary (the extra ids are never allowed). Takes about 0.25 s for a 49k vocabulary."""
        width = max(tokenizer.vocab_size, vocab_size or 0)
        if not tokenizer.eos_token_ids:
            raise ValueError("structured outputs need the tokenizer's end-of-sequence token, and it has none")
        view = _TokenizerView(tokenizer, width)
        lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(view), n_vocab=width,
                                             eos_token=list(tokenizer.eos_token_ids))
        return cls(lltokenizer, width, cache_size)

    def compile(self, spec: StructuredSpec) -> CompiledGrammar:
        """The compiled grammar of ``spec``, from the cache when seen before.

        Raises :class:`GrammarError` naming the problem: a bad regex, an unknown schema keyword or type, a
        dangling ``$ref``, an undefined grammar rule, grammar size limits.
        """
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        text = _grammar_text(spec)
        # building a matcher is llguidance's compile (it drops the GIL); errors come back as its state
        template = llguidance.LLMatcher(self._tokenizer, text, log_level=0)
        if template.is_error():
            raise GrammarError(f"invalid {spec.kind}: {_shorten(template.get_error().strip())}")
        compiled = CompiledGrammar(spec, template, self.vocab_size)
        with self._lock:  # another thread may have compiled the same spec meanwhile: keep the first
            compiled = self._cache.setdefault(spec, compiled)
            self._cache.move_to_end(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredSpec) -> Matcher:
        """A fresh matcher for one request (compiling ``spec`` if needed)."""
        return self.compile(spec).matcher()


def _shorten(message: str, limit: int = 2000) -> str:
    """A library error message cut to a size fit for an HTTP error body (it may quote the whole grammar)."""
    return message if len(message) <= limit else message[:limit] + " ..."


def _words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


# Row b of the table is the additive mask of byte value b: 0 where bit k is set (allowed), -inf where not.
_BYTE_TABLE = torch.tensor([[0.0 if (b >> k) & 1 else float("-inf") for k in range(8)] for b in range(256)])
_tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_tables_lock = threading.Lock()
_CHUNK = 8  # rows masked per table lookup


def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (device, dtype)
    table = _tables.get(key)
    if table is None:
        with _tables_lock:
            table = _tables.setdefault(key, _BYTE_TABLE.to(device=device, dtype=dtype))
    return table


def apply_masks(logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> None:
    """Set the logits of the tokens each constrained row's grammar forbids to -inf, in place.

    ``logits`` is [B, V] (any float dtype, any device); ``matchers[i]`` is row i's matcher, or None for a free
    row, whose logits are left untouched bit for bit. The masks are filled into one int32 bitmask on the CPU
    (one row per constrained row), turned into additive 0/-inf rows by a byte lookup and added to the
    constrained rows with one ``index_add_``. Columns past the matchers' vocabulary are forbidden too.
    """
    if logits.dim() != 2 or len(matchers) != logits.shape[0]:
        raise ValueError(f"logits must be [B, V] with one matcher (or None) per row; got {tuple(logits.shape)} "
                         f"and {len(matchers)} matchers")
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    vocab = next(m.vocab_size for m in matchers if m is not None)
    width = logits.shape[1]
    if width < vocab:
        raise ValueError(f"logits have {width} columns, fewer than the grammar's vocabulary of {vocab}")
    bitmask = torch.empty((len(rows), _words(vocab)), dtype=torch.int32)
    for slot, i in enumerate(rows):
        matcher = matchers[i]
        assert matcher is not None
        matcher.fill_mask(bitmask[slot])
    apply_bitmask(logits, bitmask, rows, vocab)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int], vocab_size: int) -> None:
    """Add -inf to ``logits[rows[j], t]`` wherever bit t of ``bitmask[j]`` is clear, and for every id t at or
    past ``vocab_size``; other rows are untouched. ``bitmask`` is int32 [len(rows), ceil(vocab_size / 32)] on
    the CPU (it is copied to the logits' device).

    Each mask byte indexes a [256, 8] table of 0 / -inf, and the looked-up rows are added in place with
    ``index_add_``, ``_CHUNK`` rows at a time so that the additive rows stay small (a 64-row batch at once
    would be a 12.5 MB temporary). Measured 0.03 ms for 1 row and 2.5 ms for 64 rows of 49,152 (one thread;
    ``benchmarks/structured_masks.py``).
    """
    width = logits.shape[1]
    table = _byte_table(logits.device, logits.dtype)
    byte_index = bitmask.view(torch.uint8).to(device=logits.device, dtype=torch.int32)  # [R, 4W]
    row_ids = torch.tensor(list(rows), device=logits.device)
    covered = min(width, byte_index.shape[1] * 8)
    for start in range(0, len(row_ids), _CHUNK):
        part = byte_index[start:start + _CHUNK]
        # [r, 4W] bytes -> [r * 4W, 8] additive values -> [r, 32W]; little-endian words: byte j holds ids 8j..8j+7
        bias = table.index_select(0, part.reshape(-1)).view(part.shape[0], -1)[:, :covered]
        bias[:, vocab_size:] = float("-inf")  # ids past the vocabulary, whatever the last word's spare bits say
        logits[:, :covered].index_add_(0, row_ids[start:start + _CHUNK], bias)
    if covered < width:  # the model's logits are wider than the words cover: those ids are never allowed
        logits[row_ids, covered:] = float("-inf")
