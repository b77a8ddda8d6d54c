"""The routing key of a request: chained hashes of its prompt's leading blocks of text.

Two requests whose prompts start with the same blocks share the leading hashes, so the router can send
the later one where the earlier one's KV blocks are cached. A chat's next turn repeats the whole earlier
conversation, so it shares every block of the previous turn. Text is hashed, not tokens, so that the
front needs no tokenizer: a block of ``BLOCK_CHARS`` characters is some 16 tokens of English, one KV block.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

BLOCK_CHARS = 64
MAX_BLOCKS = 256  # past 16k characters the prefix says little more about where the cache is
_PROMPT_FIELDS = ("prompt", "prompts", "input", "text")


def prompt_text(body: bytes) -> str | None:
    """The text a generation request's prompt starts with, or None when the body names none (or is not
    JSON: the replica answers that with the usual 4xx)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    messages = data.get("messages")
    if isinstance(messages, list):
        return "".join(_message_text(m) for m in messages)
    for name in _PROMPT_FIELDS:
        if name in data:
            return _text(data[name])
    return None


def block_hashes(text: str) -> tuple[int, ...]:
    """Hash i covers the first i+1 blocks (the last one may be partial), so prefixes compare by equality."""
    out: list[int] = []
    digest = b""
    for start in range(0, min(len(text), BLOCK_CHARS * MAX_BLOCKS), BLOCK_CHARS):
        digest = hashlib.blake2b(digest + text[start:start + BLOCK_CHARS].encode("utf-8", "surrogatepass"),
                                 digest_size=8).digest()
        out.append(int.from_bytes(digest, "little"))
    return tuple(out)


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    # the role is part of the rendered prompt, and a separator keeps "ab"+"c" apart from "a"+"bc"
    return f"{message.get('role', '')}\x1f{_text(message.get('content'))}\x1e"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # a batch of prompts (the first places it), token ids, or content parts
        if value and all(isinstance(v, int) for v in value):
            return ",".join(map(str, value))
        return _text(value[0]) if value and not isinstance(value[0], dict) else "".join(map(_text, value))
    if isinstance(value, dict):
        return _text(value.get("text", ""))
    return ""
