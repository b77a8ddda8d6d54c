"""What is sent and when: request specs with pre-encoded bodies, response checks,
SSE stream parsing, and arrival schedules on an absolute clock."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import orjson

Arrival = Literal["closed", "constant", "poisson", "gamma"]
ARRIVALS: tuple[Arrival, ...] = ("closed", "constant", "poisson", "gamma")


class ContentError(Exception):
    """A 2xx response whose body is not what the endpoint promises."""


class ResponseKind(str, Enum):
    JSON = "json"
    SSE_NATIVE = "sse_native"  # realizar's /stream/generate: event: token ... event: done
    SSE_OPENAI = "sse_openai"  # data: {...} ... data: [DONE]


Check = Callable[[bytes], int]
"""Validates a 2xx body and returns the number of output tokens it carries;
raises ContentError when the body is wrong."""


class Validity(str, Enum):
    """What a complete response's text is, for workloads that ask for structured output.
    Not a failure class: a server that ignores ``response_format`` answers 200 with prose,
    and the run reports how many answers were usable rather than failing them."""

    VALID = "valid"  # parses as JSON and matches its schema
    JSON_ONLY = "json_unchecked"  # parses as JSON; its schema was not checked (no jsonschema)
    SCHEMA_MISMATCH = "schema_mismatch"  # parses as JSON, breaks its schema
    NOT_JSON = "not_json"


Validate = Callable[[str], Validity]
"""Judges the whole text of a complete response (a stream's content pieces joined)."""


@dataclass(frozen=True)
class RequestSpec:
    """One request, with its body encoded once up front."""

    method: str
    path: str
    body: bytes | None = None
    kind: ResponseKind = ResponseKind.JSON
    check: Check | None = None
    headers: tuple[tuple[str, str], ...] = ()
    validate: Validate | None = None  # judge the output text (streams keep their text only when set)


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ContentError(f"body is not JSON: {exc}") from None


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ContentError(message)


def check_health(body: bytes) -> int:
    """realizar answers ``{"status": ...}``; other servers (vLLM) answer an empty 200."""
    if body.strip():
        obj = _json(body)
        _require(isinstance(obj, dict), "health body is not a JSON object")
    return 0


def check_tokenize(body: bytes) -> int:
    obj = _json(body)
    _require(isinstance(obj, dict) and isinstance(obj.get("token_ids"), list), "no token_ids list")
    _require(len(obj["token_ids"]) > 0, "token_ids is empty")
    _require(obj.get("num_tokens", len(obj["token_ids"])) == len(obj["token_ids"]),
             "num_tokens does not match token_ids")
    return 0


def _generated(obj: Any, max_tokens: int) -> int:
    _require(isinstance(obj, dict), "generate result is not an object")
    n = obj.get("num_generated")
    _require(isinstance(n, int) and 0 <= n <= max_tokens, f"num_generated {n!r} not in [0, {max_tokens}]")
    _require(isinstance(obj.get("text"), str), "no text")
    return int(n)


def make_generate_check(max_tokens: int) -> Check:
    def check(body: bytes) -> int:
        return _generated(_json(body), max_tokens)
    return check


def make_batch_tokenize_check(n: int) -> Check:
    def check(body: bytes) -> int:
        obj = _json(body)
        results = obj.get("results") if isinstance(obj, dict) else None
        _require(isinstance(results, list) and len(results) == n, f"expected {n} results")
        assert isinstance(results, list)
        for r in results:
            _require(isinstance(r, dict) and isinstance(r.get("token_ids"), list) and len(r["token_ids"]) > 0,
                     "a result has no token_ids")
        return 0
    return check


def make_batch_generate_check(n: int, max_tokens: int) -> Check:
    def check(body: bytes) -> int:
        obj = _json(body)
        results = obj.get("results") if isinstance(obj, dict) else None
        _require(isinstance(results, list) and len(results) == n, f"expected {n} results")
        assert isinstance(results, list)
        return sum(_generated(r, max_tokens) for r in results)
    return check


def json_request(method: str, path: str, payload: Any | None, check: Check | None,
                 kind: ResponseKind = ResponseKind.JSON,
                 headers: tuple[tuple[str, str], ...] = (), validate: Validate | None = None) -> RequestSpec:
    body = None if payload is None else orjson.dumps(payload)
    return RequestSpec(method, path, body, kind, check, headers, validate)


@dataclass
class StreamState:
    """Incremental parser for one SSE response, recording when content arrives.

    ``chunk_times`` are the arrival times of the events that carry output (the
    gaps between them are vLLM's ITL); ``done`` says the terminal event arrived,
    without which the stream counts as truncated.
    """

    kind: ResponseKind
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    usage_output: int | None = None
    usage_input: int | None = None
    usage_cached: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    done: bool = False
    error: str = ""
    declared: int | None = None
    keep_text: bool = False  # keep the content pieces in ``pieces`` (for a Validate)
    pieces: list[str] = field(default_factory=list)
    _buf: bytes = b""

    def feed(self, data: bytes, now: float) -> None:
        buf = self._buf + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        start = 0
        while True:
            i = buf.find(b"\n\n", start)
            if i < 0:
                break
            self._event(buf[start:i], now)
            start = i + 2
        self._buf = buf[start:]

    def _event(self, raw: bytes, now: float) -> None:
        event = b"message"
        data = b""
        for line in raw.split(b"\n"):
            if line.startswith(b"data:"):
                chunk = line[5:].lstrip(b" ")
                data = chunk if not data else data + b"\n" + chunk
            elif line.startswith(b"event:"):
                event = line[6:].strip()
        if self.kind is ResponseKind.SSE_NATIVE:
            self._native(event, data, now)
        else:
            self._openai(data, now)

    def _native(self, event: bytes, data: bytes, now: float) -> None:
        if event == b"token":
            self.tokens += 1
            self.chunk_times.append(now)
            if self.keep_text:
                try:
                    piece = orjson.loads(data).get("text")
                except (orjson.JSONDecodeError, AttributeError):
                    piece = None
                if isinstance(piece, str):
                    self.pieces.append(piece)
        elif event == b"done":
            self.done = True
            try:
                n = orjson.loads(data).get("num_generated")
                self.declared = n if isinstance(n, int) else None
            except (orjson.JSONDecodeError, AttributeError):
                self.error = "done event without a JSON body"
        elif event == b"error":
            self.error = data.decode(errors="replace")[:200] or "error event"

    def _openai(self, data: bytes, now: float) -> None:
        if not data:
            return
        if data == b"[DONE]":
            self.done = True
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.error = "chunk is not JSON"
            return
        if not isinstance(obj, dict):
            return
        if "error" in obj:
            err = obj["error"]
            self.error = str(err.get("message") if isinstance(err, dict) else err)[:200]
            return
        for choice in obj.get("choices") or ():
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or {}).get("content")
            if text:
                self.tokens += 1
                self.chunk_times.append(now)
                if self.keep_text:
                    self.pieces.append(str(text))
                break
        usage = obj.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                self.usage_output = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                self.usage_input = usage["prompt_tokens"]
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                self.usage_cached = details["cached_tokens"]

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def output_tokens(self) -> int:
        return self.usage_output if self.usage_output is not None else self.tokens

    def content_error(self) -> str:
        """Why a complete stream still fails its content check ("" when it passes)."""
        if self.error:
            return self.error
        if self.declared is not None and self.declared != self.tokens:
            return f"done says {self.declared} tokens, {self.tokens} token events arrived"
        return ""


# ---------------------------------------------------------------- arrivals

def arrival_offsets(n: int, rate: float, kind: Arrival, *, seed: int = 0,
                    burstiness: float = 1.0) -> list[float]:
    """Send times, in seconds from the start, of ``n`` requests at ``rate`` req/s.

    ``constant`` spaces them evenly; ``poisson`` draws exponential gaps;
    ``gamma`` draws gamma gaps with shape ``burstiness`` and the same mean
    (1 is Poisson, below 1 burstier, above 1 smoother), like vLLM's bench.
    The first request goes at 0. The same seed gives the same schedule.
    """
    if n <= 0:
        return []
    if not rate > 0 or math.isinf(rate):
        return [0.0] * n
    if kind in ("closed", "constant"):
        return [i / rate for i in range(n)]
    rng = random.Random(seed)
    shape = 1.0 if kind == "poisson" else burstiness
    if shape <= 0:
        raise ValueError("burstiness must be > 0")
    scale = 1.0 / (rate * shape)
    out = [0.0]
    t = 0.0
    for _ in range(n - 1):
        t += rng.gammavariate(shape, scale)
        out.append(t)
    return out
