"""Text <-> token ids, chat templates and streaming detokenization.

A :class:`Tokenizer` is built either from a GGUF file's ``tokenizer.ggml.*`` metadata or from a Hugging Face
directory (``tokenizer.json``). Encoding always runs on a Hugging Face ``tokenizers.Tokenizer``; for GGUF files
we assemble that object ourselves so that the ids equal what ``transformers`` gives for the same file.

Decoding works on bytes: every token id has a byte spelling (``_Decoding.pieces``), so ``decode`` is a join and a
UTF-8 decode, and :class:`IncrementalDetokenizer` streams text with an incremental UTF-8 decoder that never splits a
character. Tokenizers whose decoder we do not recognise fall back to windowed re-decoding.

Special tokens written in text are text by default: ``encode`` reads ``<|im_start|>`` typed by a user as the
characters it is made of, and ``encode_chat`` lets only the chat template's own markup become control tokens, so a
message cannot forge a turn. ``parse_special`` (and ``parse_special_in_content``) restore the permissive reading.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from realizar.loading.gguf_metadata import read_metadata

__all__ = ["CHATML_TEMPLATE", "CHAT_ROLES", "IncrementalDetokenizer", "Tokenizer"]

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_GGUF_MAGIC = b"GGUF"

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
"""Roles :meth:`Tokenizer.apply_chat_template` accepts."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The chat template used when a model ships none."""


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as one printable character.

    Bytes that are printable Latin-1 stand for themselves; the other 68 are shifted to U+0100 onwards, in order.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(0x100, 0x200))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


_BYTE_TO_CHAR = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
# Maps each alphabet character to the Latin-1 character of its byte, so `.translate().encode("latin-1")` decodes.
_ALPHABET_TO_LATIN1 = {ord(c): chr(b) for c, b in _CHAR_TO_BYTE.items()}
_OUTSIDE_ALPHABET = re.compile("[^" + re.escape("".join(_CHAR_TO_BYTE)) + "]")

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as transformers applies them to a GGUF. Names not listed
# (gpt2, smollm, starcoder, ...) get the GPT-2 pattern built into the ByteLevel pre-tokenizer. llama.cpp further
# isolates digits for smollm/starcoder; the vocabularies have no multi-digit tokens, so that only changes a run of
# spaces right before a digit. We follow transformers, which is our reference.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


@dataclass(frozen=True)
class _Decoding:
    """How ids turn back into text: each id's bytes, which ids are special, and SentencePiece's space strip."""

    pieces: list[bytes]
    special_ids: frozenset[int]
    strip_leading_space: bool


LONG_TEXT_CHARS = 16_384


def _encode_ids(backend: BackendTokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """``backend.encode(text).ids``. A long text goes through ``encode_batch``, which lets go of the GIL where
    ``encode`` does not: from a worker thread, a 1 MB text through ``encode`` held the event loop for 2.5 s,
    through ``encode_batch`` for at most 40 ms."""
    if len(text) > LONG_TEXT_CHARS:
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    return backend.encode(text, add_special_tokens=add_special_tokens).ids


@dataclass(frozen=True)
class _SpecialText:
    """Keeps special tokens that a client spells in text from becoming control tokens.

    ``backend`` is a copy of the tokenizer that reads special tokens as text (``encode_special_tokens``) and
    holds one extra added token, a *marker*, per special token, with the special token's strip flags. It is the
    only backend a :class:`Tokenizer` keeps (the original's tables had cost 8 MiB more of idle RSS for the demo
    model). To encode a rendered chat prompt, or any text whose special spellings are control tokens, those
    spellings are swapped for their markers, the text is encoded in one call (so the splits around them, and
    SentencePiece's first-word space, are those of a normal encode) and the marker ids are mapped to the special
    ids. Before rendering, special tokens inside the messages' strings are
    swapped for *escapes* that the template passes through untouched (private-use characters, unchanged by
    strip, case and ``tojson`` filters, unless ``ensure_ascii`` is asked for), and swapped back after, so the
    template's own markup is the only special text in the render, even where a template transforms the content.
    Markers and escapes carry a random per-process nonce, so no client can write one; a text that holds the
    nonce is refused.
    """

    backend: BackendTokenizer
    pattern: re.Pattern[str] | None  # the special spellings, longest first: leftmost-longest, as tokenizers matches
    markers: dict[str, str]  # spelling -> marker
    escapes: dict[str, str]  # spelling -> escape
    marker_ids: dict[int, int]  # marker id -> special token id
    nonce: str

    @classmethod
    def of(cls, backend: BackendTokenizer, copy: bool = True) -> _SpecialText:
        """The special text of ``backend``, in a copy of it (``copy``), or in ``backend`` itself, changed."""
        text_backend = BackendTokenizer.from_str(backend.to_str()) if copy else backend
        text_backend.encode_special_tokens = True
        nonce = os.urandom(8).hex()
        special: dict[str, AddedToken] = {}
        for _, token in sorted(backend.get_added_tokens_decoder().items()):
            if token.special and token.content:
                special.setdefault(token.content, token)
        markers = {spelling: f"\ue000{nonce}.{k}\ue001" for k, spelling in enumerate(special)}
        escapes = {spelling: f"\ue002{nonce}.{k}\ue003" for k, spelling in enumerate(special)}
        text_backend.add_tokens([
            AddedToken(markers[spelling], special=False, normalized=False, lstrip=token.lstrip, rstrip=token.rstrip,
                       single_word=token.single_word)
            for spelling, token in special.items()
        ])
        marker_ids: dict[int, int] = {}
        for spelling in special:
            marker_id, special_id = text_backend.token_to_id(markers[spelling]), backend.token_to_id(spelling)
            assert marker_id is not None and special_id is not None  # both were just added or are in the vocabulary
            marker_ids[marker_id] = special_id
        pattern = (re.compile("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)))
                   if special else None)
        return cls(text_backend, pattern, markers, escapes, marker_ids, nonce)

    def plain(self, ids: list[int]) -> list[int]:
        """Ids of a text encoded by ``backend`` as plain text, which must hold no marker."""
        if not self.marker_ids.keys().isdisjoint(ids):
            raise ValueError("the text holds a sequence reserved by the tokenizer")
        return ids

    def escape(self, value: Any) -> tuple[Any, bool]:
        """``value`` (a message, with nested dicts and lists) with special tokens in its strings escaped; and
        whether any was."""
        if isinstance(value, str):
            if self.nonce in value:
                raise ValueError("a message holds a sequence reserved by the tokenizer")
            if self.pattern is None or self.pattern.search(value) is None:
                return value, False
            return self.pattern.sub(lambda m: self.escapes[m.group()], value), True
        if isinstance(value, dict):
            pairs = [(key, self.escape(item)) for key, item in value.items()]
            return {key: item for key, (item, _) in pairs}, any(hit for _, (_, hit) in pairs)
        if isinstance(value, (list, tuple)):
            items = [self.escape(item) for item in value]
            return [item for item, _ in items], any(hit for _, hit in items)
        return value, False

    def marked(self, text: str) -> str:
        """``text`` with its special spellings swapped for their markers."""
        return text if self.pattern is None else self.pattern.sub(lambda m: self.markers[m.group()], text)

    def parsed(self, ids: list[int]) -> list[int]:
        """Ids of a marked text with each marker's id mapped to its special token's."""
        return [self.marker_ids.get(i, i) for i in ids]

    def encode_rendered(self, rendered: str, escaped: bool) -> list[int]:
        """Ids of a prompt rendered from escaped messages: its special spellings (the template's) are control
        tokens, the escaped ones text."""
        text = self.marked(rendered)
        if escaped:
            for spelling, escape in self.escapes.items():
                text = text.replace(escape, spelling)
        return self.parsed(_encode_ids(self.backend, text, add_special_tokens=False))


class Tokenizer:
    """Encodes text to token ids and back, renders chat templates and makes streaming detokenizers.

    Build one with :meth:`from_model_path`, :meth:`from_gguf_metadata` or :meth:`from_pretrained_dir`.
    Instances are immutable after construction and safe to share between threads.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        vocab_size: int,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        chat_template: str | None,
        decoding: _Decoding | None,
        source: str = "<memory>",
        owned: bool = False,
    ) -> None:
        """Wrap a ready ``tokenizers.Tokenizer``: it is copied, not changed, unless ``owned`` says that nothing
        else holds it (the ``from_*`` constructors, which build it: copying the demo model's took 0.1-0.15 s of
        every start). Prefer those constructors."""
        self.vocab_size: int = vocab_size
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self.chat_template: str | None = chat_template
        self._decoding = decoding
        self._special_ids = decoding.special_ids if decoding is not None else frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._source = source
        self._template = _compile_chat_template(chat_template or CHATML_TEMPLATE, source)
        # A template that never reads tool_calls would drop an assistant's calls from the conversation: those
        # are written into the content instead, in the Hermes convention (see _inline_tool_calls).
        self._renders_tool_calls = "tool_calls" in (chat_template or CHATML_TEMPLATE)
        # Hugging Face templates that offer tools read a ``tools`` variable; one that never names it would drop them
        self.renders_tools: bool = re.search(r"\btools\b", chat_template or CHATML_TEMPLATE) is not None
        self._special_text = _SpecialText.of(backend, copy=not owned)
        self._backend = self._special_text.backend  # see _SpecialText
        self._template_tokens = {
            name: backend.id_to_token(token_id)
            for name, token_id in (("bos_token", bos_token_id), ("eos_token", next(iter(self.eos_token_ids), None)))
            if token_id is not None and backend.id_to_token(token_id) is not None
        }

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_model_path(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a model: a GGUF file, or a Hugging Face directory with ``tokenizer.json``.

        A file is recognised as GGUF by its magic bytes, not by its name.
        """
        path = Path(path)
        if path.is_dir():
            return cls.from_pretrained_dir(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such model file or directory")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != _GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (magic {magic!r} at offset 0, expected {_GGUF_MAGIC!r})")
        return cls.from_gguf_metadata(read_metadata(path), source=str(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], *, source: str = "GGUF metadata") -> Tokenizer:
        """Build the tokenizer a GGUF file describes from its ``tokenizer.ggml.*`` / ``tokenizer.chat_template`` keys.

        Supports ``tokenizer.ggml.model`` "gpt2" (byte-level BPE) and "llama" (SentencePiece-style BPE with
        byte fallback). Token ids equal those of ``transformers`` loading the same file, except that control
        tokens spelled outside the byte alphabet are kept whole (transformers splits them into bytes).
        ``source`` names the file in error messages.
        """
        kind = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens list")
        types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries, expected {len(tokens)}")

        def token_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            if not 0 <= int(value) < len(tokens):
                raise ValueError(f"tokenizer.ggml.{key} = {value} is outside the vocabulary (size {len(tokens)})")
            return int(value)

        bos_id, eos_id, unk_id, pad_id = (token_id(k) for k in
                                          ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"))
        named = {i for i in (bos_id, eos_id, unk_id, pad_id) if i is not None}

        if kind == "gpt2":
            backend, decoding = _byte_level_bpe(metadata, tokens, types, named)
            add_bos_default = False
        elif kind == "llama":
            backend, decoding = _sentencepiece_bpe(metadata, tokens, types, named)
            # llama.cpp and transformers add BOS for a SentencePiece vocabulary that does not say otherwise.
            add_bos_default = True
        else:
            raise ValueError(f"unsupported tokenizer.ggml.model {kind!r}: supported are 'gpt2' and 'llama'")

        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        backend.post_processor = _bos_eos_processor(
            tokens[bos_id] if add_bos and bos_id is not None else None, bos_id,
            tokens[eos_id] if add_eos and eos_id is not None else None, eos_id,
        )
        eos_ids = [i for i in (eos_id, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
        template = metadata.get("tokenizer.chat_template")
        return cls(
            backend,
            vocab_size=len(tokens),
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            chat_template=template if isinstance(template, str) and template else None,
            decoding=decoding,
            source=source,
            owned=True,
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer directory.

        Reads ``tokenizer.json``; ``tokenizer_config.json`` for the chat template, BOS/EOS tokens and
        ``add_bos_token``/``add_eos_token`` (which, when present, replace the post-processor of tokenizer.json,
        as transformers does); ``chat_template.jinja``/``chat_template.json`` when present; and the EOS ids of
        ``generation_config.json`` and ``config.json``.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (only tokenizer.json directories are supported)")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        model_config = _read_json(path / "config.json")
        generation_config = _read_json(path / "generation_config.json")

        def id_of(token: Any) -> int | None:
            content = token.get("content") if isinstance(token, dict) else token
            return backend.token_to_id(content) if isinstance(content, str) else None

        bos_id = id_of(config.get("bos_token"))
        if bos_id is None and isinstance(model_config.get("bos_token_id"), int):
            bos_id = model_config["bos_token_id"]
        eos_ids = [i for i in [id_of(config.get("eos_token"))] if i is not None]
        for source in (generation_config, model_config):
            value = source.get("eos_token_id")
            eos_ids += [value] if isinstance(value, int) else [v for v in value or () if isinstance(v, int)]

        if "add_bos_token" in config or "add_eos_token" in config:
            bos = backend.id_to_token(bos_id) if bos_id is not None and config.get("add_bos_token") else None
            eos_id = id_of(config.get("eos_token"))
            eos = backend.id_to_token(eos_id) if eos_id is not None and config.get("add_eos_token") else None
            backend.post_processor = _bos_eos_processor(bos, bos_id, eos, eos_id)

        return cls(
            backend,
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            chat_template=_chat_template_of_dir(path, config),
            decoding=_decoding_from_backend(backend),
            source=str(path),
            owned=True,
        )

    # ---------------------------------------------------------------- encoding and decoding

    def encode(self, text: str, add_special_tokens: bool = True, *, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``.

        ``add_special_tokens`` adds BOS/EOS only where the model's metadata asks for them
        (``tokenizer.ggml.add_bos_token``). ``parse_special`` makes special tokens written in the text
        (``<|im_start|>``) their control ids, as transformers does by default; without it they are plain text,
        so untrusted input cannot inject control tokens (transformers' ``split_special_tokens=True``).
        Raises ValueError for text holding this process's private marker (see ``_SpecialText``), which no
        client can know.
        """
        special = self._special_text
        if parse_special:
            return special.parsed(_encode_ids(self._backend, special.marked(text), add_special_tokens))
        return special.plain(_encode_ids(self._backend, text, add_special_tokens))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True, *,
                     parse_special: bool = False) -> list[list[int]]:
        """:meth:`encode` for many texts at once, on the tokenizers thread pool."""
        special = self._special_text
        if parse_special:
            encodings = self._backend.encode_batch([special.marked(t) for t in texts],
                                                   add_special_tokens=add_special_tokens)
            return [special.parsed(e.ids) for e in encodings]
        encodings = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [special.plain(e.ids) for e in encodings]

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *,
                    parse_special_in_content: bool = False, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt ids of a conversation: :meth:`apply_chat_template`, then encoded without BOS/EOS (the
        template writes its own).

        Only the template's markup becomes control tokens: a special token spelled inside a message (in its
        content or any other string field) is encoded as text, so ``<|im_end|>\n<|im_start|>system`` in a user
        message cannot open a system turn. ``parse_special_in_content`` encodes the whole rendered prompt with
        special tokens parsed, wherever they come from. ``tools`` (OpenAI's tool objects) go to the template's
        ``tools`` variable, escaped like the messages. Raises ValueError as :meth:`apply_chat_template`.
        """
        if parse_special_in_content:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools=tools),
                               add_special_tokens=False, parse_special=True)
        special = self._special_text
        chat, escaped = special.escape(_validate_messages(messages, not self._renders_tool_calls))
        escaped_tools, tools_escaped = special.escape(tools) if tools is not None else (None, False)
        return special.encode_rendered(self._render(chat, add_generation_prompt, escaped_tools),
                                       escaped or tools_escaped)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``. Invalid UTF-8 becomes U+FFFD; ids outside the vocabulary are ignored.

        Equals transformers' decode, except for invalid byte-fallback runs in SentencePiece vocabularies, where we
        replace each invalid sequence (like llama.cpp and byte-level BPE) rather than every byte of the run.
        """
        if self._decoding is None:
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        pieces, special = self._decoding.pieces, self._decoding.special_ids
        n = len(pieces)
        data = b"".join(
            pieces[i] for i in ids if 0 <= i < n and not (skip_special_tokens and i in special)
        )
        text = data.decode("utf-8", "replace")
        if self._decoding.strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A streaming detokenizer for one sequence that continues after ``prompt_ids``.

        The prompt gives context only (SentencePiece spacing, a character split across the prompt's end); its
        text is not emitted. Special tokens are skipped by default, as an API response wants.
        """
        if self._decoding is None:
            return _WindowDetokenizer(self, prompt_ids, skip_special_tokens)
        return _ByteDetokenizer(self._decoding, prompt_ids, skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to decoded text, out of context: a byte-fallback token (``<0xF0>``) or a
        byte-level piece of a character gives its raw bytes, which may be incomplete UTF-8; a special token
        gives its spelling; an id outside the vocabulary gives nothing. For a decoder we do not map to bytes it
        is the UTF-8 of the token decoded alone (lossy for partial characters).
        """
        if self._decoding is None:
            if not 0 <= token_id < self.vocab_size:
                return b""
            return self._backend.decode([token_id], skip_special_tokens=False).encode()
        pieces = self._decoding.pieces
        return pieces[token_id] if 0 <= token_id < len(pieces) else b""

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special (control) token, which decoding skips by default."""
        return token_id in self._special_ids

    def token_to_id(self, token: str) -> int | None:
        """The id of a token spelled as in the vocabulary, or None."""
        token_id = self._backend.token_to_id(token)
        return None if token_id in self._special_text.marker_ids else token_id

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary spelling of a token id, or None."""
        return None if token_id in self._special_text.marker_ids else self._backend.id_to_token(token_id)

    # ---------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render a conversation with the model's chat template (ChatML when it has none) into prompt text.

        Each message needs a ``role`` from :data:`CHAT_ROLES` and a ``content`` that is a string, a list of
        ``{"type": "text", "text": ...}`` parts (joined with newlines), or None (dropped, as transformers does).
        ``tools`` is given to the template as its ``tools`` variable (see :attr:`renders_tools`).
        Raises ValueError, fit for an HTTP 400, for a bad conversation or one the template rejects.
        """
        return self._render(_validate_messages(messages, not self._renders_tool_calls), add_generation_prompt, tools)

    def _render(self, chat: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
        try:
            return self._template.render(
                messages=chat,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                documents=None,
                **self._template_tokens,
            )
        except _ChatTemplateRejected as exc:
            raise ValueError(f"chat template rejected the conversation: {exc}") from None
        except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise ValueError(f"chat template failed on the conversation: {type(exc).__name__}: {exc}") from None

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self._source!r}, vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id},"
                f" eos_token_ids={self.eos_token_ids})")


# -------------------------------------------------------------------- GGUF vocabularies


def _byte_level_bpe(
    metadata: dict[str, Any], tokens: list[str], types: list[int], named: set[int]
) -> tuple[BackendTokenizer, _Decoding]:
    """GPT-2-style byte-level BPE from ``tokenizer.ggml.tokens`` and ``tokenizer.ggml.merges``."""
    merges_text = metadata.get("tokenizer.ggml.merges")
    if not isinstance(merges_text, list):
        raise ValueError("GGUF tokenizer 'gpt2' has no tokenizer.ggml.merges list")
    merges = _parse_merges(merges_text)

    # Normal tokens are spelled in the byte alphabet; a GGUF writer may have stored one as plain text, so respell
    # it. Control, user-defined and named tokens keep their spelling: they are matched whole as added tokens.
    keep = {i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)} | named
    vocab: dict[str, int] = {}
    pieces: list[bytes] = []
    joined = "".join(tokens)
    if _OUTSIDE_ALPHABET.search(joined) is None:
        # every token spelled in the byte alphabet (as GGUF writers store them): one translation for all, a
        # byte per character, sliced into each token's bytes
        vocab = {token: index for index, token in enumerate(tokens)}
        spelled_bytes = joined.translate(_ALPHABET_TO_LATIN1).encode("latin-1")
        ends = list(itertools.accumulate(len(token) for token in tokens))
        pieces = [spelled_bytes[end - len(token):end] for token, end in zip(tokens, ends, strict=True)]
    else:
        for index, token in enumerate(tokens):
            in_alphabet = _OUTSIDE_ALPHABET.search(token) is None
            spelled = token if in_alphabet or index in keep else "".join(_BYTE_TO_CHAR[b] for b in token.encode())
            vocab[spelled] = index
            # The ByteLevel decoder maps a token made of alphabet characters to bytes, and any other as UTF-8.
            pieces.append(spelled.translate(_ALPHABET_TO_LATIN1).encode("latin-1")
                          if _OUTSIDE_ALPHABET.search(spelled) is None else spelled.encode())

    backend = BackendTokenizer(models.BPE(
        vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
        fuse_unk=False, byte_fallback=False,
    ))
    split = _PRE_TOKENIZER_SPLITS.get(str(metadata.get("tokenizer.ggml.pre")))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    special_ids = _add_gguf_tokens(backend, tokens, types, named, vocab)
    return backend, _Decoding(pieces, special_ids, strip_leading_space=False)


def _sentencepiece_bpe(
    metadata: dict[str, Any], tokens: list[str], types: list[int], named: set[int]
) -> tuple[BackendTokenizer, _Decoding]:
    """SentencePiece-style BPE (llama.cpp's "llama" tokenizer): ▁ for spaces, <0xNN> byte fallback, merges
    from the file or, as usual, ranked by ``tokenizer.ggml.scores``."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges_text = metadata.get("tokenizer.ggml.merges")
    if isinstance(merges_text, list):
        merges = _parse_merges(merges_text)
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise ValueError("GGUF tokenizer 'llama' needs tokenizer.ggml.merges or one tokenizer.ggml.scores "
                             f"entry per token ({len(tokens)})")
        merges = _merges_from_scores(tokens, scores, vocab)

    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend = BackendTokenizer(models.BPE(
        vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True,
    ))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPM_SPACE, prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    special_ids = _add_gguf_tokens(backend, tokens, types, named, vocab)
    return backend, _Decoding(_sentencepiece_pieces(tokens, byte_fallback=True), special_ids, add_space_prefix)


def _parse_merges(merges: list[str]) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` entries ("left right") as pairs."""
    pairs = []
    for index, merge in enumerate(merges):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"tokenizer.ggml.merges[{index}] = {merge!r}: expected two tokens separated by a space")
        pairs.append((left, right))
    return pairs


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Recover BPE merges from SentencePiece scores: every split of a token into two vocabulary tokens is a
    merge ranked by the token's score (best first), ties broken by longer left then longer right part, then by
    the ids of the parts. This is the order transformers uses, so the ids agree with it."""
    candidates: list[tuple[float, str, str]] = []
    for piece, score in dict(zip(tokens, scores, strict=True)).items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        found = sorted(((a, b) for a, b in splits if a in vocab and b in vocab), key=lambda p: (vocab[p[0]], vocab[p[1]]))
        candidates += [(score, a, b) for a, b in found]
    # A stable descending sort keeps the id order among equal keys.
    candidates.sort(key=lambda c: (c[0], len(c[1]), len(c[2])), reverse=True)
    return [(a, b) for _, a, b in candidates]


def _add_gguf_tokens(
    backend: BackendTokenizer, tokens: list[str], types: list[int], named: set[int], vocab: dict[str, int]
) -> frozenset[int]:
    """Make control tokens (and BOS/EOS/UNK/PAD) special and user-defined tokens plain added tokens, so both are
    matched whole in text. All are already in the vocabulary, so no id moves."""
    special = [i for i, t in enumerate(types) if t == _CONTROL]
    special += sorted(named.difference(special))
    user = [i for i, t in enumerate(types) if t == _USER_DEFINED and i not in named]
    # A duplicated spelling resolves to the id the vocabulary holds for it.
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    return frozenset(vocab[tokens[i]] for i in special) | frozenset(special)


def _bos_eos_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None) -> Any:
    """A post-processor that puts BOS before and EOS after each sequence, or None when neither is wanted."""
    if bos is None and eos is None:
        return None
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    special = [(tok, tid) for tok, tid in ((bos, bos_id), (eos, eos_id)) if tok is not None and tid is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(special)))


# -------------------------------------------------------------------- decoding tables


def _sentencepiece_pieces(tokens: Sequence[str], byte_fallback: bool) -> list[bytes]:
    pieces = []
    for token in tokens:
        match = _BYTE_TOKEN.fullmatch(token) if byte_fallback else None
        pieces.append(bytes([int(match.group(1), 16)]) if match else token.replace(_SPM_SPACE, " ").encode())
    return pieces


def _decoding_from_backend(backend: BackendTokenizer) -> _Decoding | None:
    """The byte spelling of every id for the decoders LLMs use (ByteLevel; SentencePiece's Replace/ByteFallback/
    Fuse/Strip sequence; Metaspace), or None for any other decoder."""
    if backend.decoder is None:
        return None
    spec = json.loads(backend.decoder.__getstate__())
    size = backend.get_vocab_size(with_added_tokens=True)
    tokens = [backend.id_to_token(i) or "" for i in range(size)]
    special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    kind = spec.get("type")
    if kind == "ByteLevel":
        pieces = [t.translate(_ALPHABET_TO_LATIN1).encode("latin-1") if _OUTSIDE_ALPHABET.search(t) is None
                  else t.encode() for t in tokens]
        return _Decoding(pieces, special, strip_leading_space=False)
    if kind == "Metaspace" and spec.get("replacement") == _SPM_SPACE:
        strip = spec.get("prepend_scheme", "always") != "never" and spec.get("add_prefix_space", True)
        return _Decoding(_sentencepiece_pieces(tokens, byte_fallback=False), special, bool(strip))
    if kind == "Sequence":
        steps = spec.get("decoders") or []
        names = [s.get("type") for s in steps]
        replaces_space = any(s.get("type") == "Replace" and s.get("pattern") == {"String": _SPM_SPACE}
                             and s.get("content") == " " for s in steps)
        strips = [s for s in steps if s.get("type") == "Strip"]
        if (replaces_space and set(names) <= {"Replace", "ByteFallback", "Fuse", "Strip"}
                and names.count("Replace") == 1
                and all(s.get("content") == " " and s.get("start", 0) <= 1 and s.get("stop", 0) == 0 for s in strips)):
            strip = any(s.get("start") == 1 for s in strips)
            return _Decoding(_sentencepiece_pieces(tokens, "ByteFallback" in names), special, strip)
    return None


# -------------------------------------------------------------------- streaming


class IncrementalDetokenizer(ABC):
    """Turns a stream of generated token ids into text deltas for one sequence.

    The deltas concatenate to the decode of the generated ids (given the prompt as context). A delta never
    ends inside a UTF-8 character: bytes of an unfinished character wait for the tokens that finish it.
    """

    last_bytes: bytes = b""
    """The bytes the last :meth:`step` added to the text (nothing for a skipped special token). Over a sequence
    they join into the UTF-8 of the text, partial characters included, so logprobs can report each token's
    true bytes."""

    @abstractmethod
    def step(self, token_id: int) -> str:
        """Take one generated token; return the text it completes (possibly empty)."""

    @abstractmethod
    def flush(self) -> str:
        """At the end of the sequence: return whatever is still held back (an unfinished character is U+FFFD)."""


class _ByteDetokenizer(IncrementalDetokenizer):
    """Joins token bytes through an incremental UTF-8 decoder: exact, and O(1) per token."""

    def __init__(self, decoding: _Decoding, prompt_ids: Sequence[int], skip_special_tokens: bool) -> None:
        self._pieces = decoding.pieces
        self._skip = decoding.special_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        # Only an unfinished character at the prompt's end matters: prime the decoder with the prompt's last
        # bytes (at most one character's worth) and drop that text.
        tail = b""
        for token_id in reversed(prompt_ids):
            tail = self._piece(token_id) + tail
            if len(tail) >= 4:
                break
        self._utf8.decode(tail)
        # SentencePiece strips the space in front of the very first text only. The first byte of the first
        # non-empty piece is the first byte of the text, so the strip is done on bytes, which keeps
        # ``last_bytes`` equal to what the text holds.
        self._strip_pending = decoding.strip_leading_space and not tail

    def _piece(self, token_id: int) -> bytes:
        if token_id in self._skip or not 0 <= token_id < len(self._pieces):
            return b""
        return self._pieces[token_id]

    def step(self, token_id: int) -> str:
        piece = self._piece(token_id)
        if self._strip_pending and piece:
            self._strip_pending = False
            if piece.startswith(b" "):
                piece = piece[1:]
        self.last_bytes = piece
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class _WindowDetokenizer(IncrementalDetokenizer):
    """For decoders we cannot map to bytes: re-decode a short window of recent ids and emit the growth,
    holding back text that ends in U+FFFD (an unfinished character)."""

    _CONTEXT = 6  # prompt tokens kept as context for the decoder's spacing rules

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-self._CONTEXT:])
        self._prefix = 0  # window start: text of ids[_prefix:_read] was already emitted
        self._read = len(self._ids)

    def _delta(self, final: bool) -> str:
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix:self._read], self._skip)
        text = decode(self._ids[self._prefix:], self._skip)
        if len(text) <= len(emitted) or (text.endswith("\ufffd") and not final):
            return ""
        # The next window starts at the tokens emitted now; older ids are no longer needed.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return text[len(emitted):]

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        delta = self._delta(final=False)
        # Without a byte table the text that a token completes is all we can attribute to it.
        self.last_bytes = delta.encode()
        return delta

    def flush(self) -> str:
        return self._delta(final=True)


# -------------------------------------------------------------------- chat templates


class _ChatTemplateRejected(Exception):
    """Raised by a template's ``raise_exception(...)``: the conversation is invalid for this model."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise _ChatTemplateRejected(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str, origin: str) -> jinja2.Template:
    """Compile a chat template in a sandbox, with the helpers Hugging Face templates expect."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"{origin}: chat template does not compile (line {exc.lineno}): {exc.message}") from None


def _validate_messages(messages: Any, inline_tool_calls: bool = False) -> list[dict[str, Any]]:
    """Check a conversation and return the copy the template sees (text parts joined, None values dropped).

    An assistant message with ``tool_calls`` and no content gets content ``""``, since templates concatenate
    it; with ``inline_tool_calls`` (a template that does not render tool calls), the calls are appended to
    its content as Hermes-style ``<tool_call>`` blocks, so the model still sees what it called.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    chat = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(CHAT_ROLES)}; got {role!r}")
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(_text_part(part, f"{where}.content[{i}]") for i, part in enumerate(content))
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")
        tool_calls = message.get("tool_calls")
        if content is None and not tool_calls:
            raise ValueError(f"{where}.content is required (it may be null only with tool_calls)")
        if tool_calls:
            content = content or ""
            if inline_tool_calls:
                content = _inline_tool_calls(content, tool_calls, where)
        chat.append({k: v for k, v in {**message, "content": content}.items() if v is not None})
    return chat


def _inline_tool_calls(content: str, tool_calls: Any, where: str) -> str:
    """``content`` followed by one ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block per call
    (the Hermes convention that Qwen2.5 and SmolLM2's tool-use templates write)."""
    if not isinstance(tool_calls, list):
        raise ValueError(f"{where}.tool_calls must be a list of tool calls")
    blocks = []
    for i, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where}.tool_calls[{i}] must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
        arguments = function.get("arguments")
        if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string; show them as JSON
            with contextlib.suppress(json.JSONDecodeError):  # not JSON: shown as the string it is
                arguments = json.loads(arguments) if arguments.strip() else {}
        call_json = json.dumps({"name": function["name"], "arguments": arguments if arguments is not None else {}},
                               ensure_ascii=False)
        blocks.append(f"<tool_call>\n{call_json}\n</tool_call>")
    return "\n".join(filter(None, [content, *blocks]))


def _text_part(part: Any, where: str) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return str(part["text"])
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise ValueError(f"{where} must be a {{'type': 'text', 'text': ...}} part; {kind!r} content is not supported")


# -------------------------------------------------------------------- Hugging Face directories


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return value if isinstance(value, dict) else {}


def _chat_template_of_dir(path: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja, then chat_template.json, then tokenizer_config.json."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) and template else None
