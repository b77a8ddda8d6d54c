"""Requests and their outputs: pure data shared by the engine and the server (no torch)."""

from __future__ import annotations

import enum
import itertools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # client disconnect or cancel
    TIMEOUT = "timeout"  # --request-timeout expired
    ERROR = "error"  # an exception while processing this request


# Below this temperature sampling is greedy (see SamplingParams).
GREEDY_TEMPERATURE = 1e-5
# Above this, a softmax of any real model's logits is uniform to within float32 rounding: the
# request is noise, most likely a unit mistake, and is refused at the edge.
MAX_TEMPERATURE = 100.0
# Seeds are signed or unsigned 64-bit integers; every one of them names its own stream
# (realizar.sampling.make_generator).
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty
# vLLM only asks for > 0; past this a seen token's logit is divided into noise, most likely a unit mistake
MAX_REPETITION_PENALTY = 100.0


StructuredKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
_KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "choice", "grammar")

class GrammarError(ValueError):
    """A structured-output spec that cannot be compiled; the message names the problem (fit for an HTTP 400)."""


@dataclass(frozen=True)
class StructuredSpec:
    """What a request constrains its output to. Hashable: it keys the compiled-grammar cache.

    ``value`` is the spec text: a JSON schema as canonical JSON text (sorted keys), a regex, a grammar (Lark, or
    GBNF as llama.cpp writes it), or for ``choice`` a tuple of the allowed strings; ``json_object`` has none.
    ``strict`` (JSON schema only): False ignores schema keywords the library does not implement (such as
    ``uniqueItems``) instead of refusing the schema; the output still follows every keyword it implements.
    Build one with the class methods, which accept the shapes the HTTP APIs carry.
    """

    kind: StructuredKind
    value: str | tuple[str, ...] = ""
    strict: bool = True

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise GrammarError(f"unknown structured output kind {self.kind!r}: expected one of {', '.join(_KINDS)}")
        if self.kind == "choice":
            if not isinstance(self.value, tuple) or not self.value:
                raise GrammarError("choice needs a non-empty list of strings")
            if not all(isinstance(c, str) for c in self.value):
                raise GrammarError("choice must hold only strings")
        elif not isinstance(self.value, str):
            raise GrammarError(f"{self.kind} needs a string")
        elif self.kind in ("regex", "grammar", "json_schema") and not self.value.strip():
            raise GrammarError(f"{self.kind} must not be empty")

    @classmethod
    def json_object(cls) -> StructuredSpec:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str | bool, strict: bool = True) -> StructuredSpec:
        """A JSON value valid under ``schema`` (a dict, a boolean schema, or its JSON text). ``strict`` as
        OpenAI's ``json_schema.strict``: see the class docstring."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"json schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (Mapping, bool)):
            raise GrammarError(f"json schema must be an object, got {type(schema).__name__}")
        try:
            text = json.dumps(schema, sort_keys=True, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise GrammarError(f"json schema is not serialisable as JSON: {exc}") from None
        return cls("json_schema", text, strict)

    @classmethod
    def regex(cls, pattern: str) -> StructuredSpec:
        """Text matching ``pattern`` in full (Rust ``regex`` syntax, as in vLLM's ``regex``)."""
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> StructuredSpec:
        """Exactly one of ``choices``."""
        if isinstance(choices, str):
            raise GrammarError("choice needs a list of strings, not one string")
        return cls("choice", tuple(choices))

    @classmethod
    def grammar(cls, text: str) -> StructuredSpec:
        """Text of a context-free grammar: Lark (``start: ...``, llguidance's dialect) or GBNF (``root ::= ...``)."""
        return cls("grammar", text)



@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings.

    A ``temperature`` below ``GREEDY_TEMPERATURE`` (0 included) means greedy: dividing logits
    by a temperature that small leaves only the argmax anyway, and in float32 it overflows to
    inf/NaN. ``temperature`` above ``MAX_TEMPERATURE`` is refused. ``top_k == 0`` and
    ``top_p == 1`` switch those filters off; the most likely token always survives top-p.
    The native API's ``strategy`` field maps onto these at the edge.
    With ``structured``, the request finishes with STOP as soon as its output is complete (its grammar
    allows nothing more), whatever ``ignore_eos`` and ``min_tokens`` say.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # how many top alternatives to report; None: no logprobs
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo); None: none
    # OpenAI's logit_bias: (token id, bias) pairs added to the logits, bias in [-100, 100]
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    # vLLM: logits of tokens seen in the prompt or the output are divided (if > 0) or multiplied by it
    repetition_penalty: float = 1.0
    # what the output must follow (a JSON schema, a regex ...); None: free text. The engine compiles it
    # (realizar.structured) and masks each step's logits; the server compiles it first, to refuse a bad one.
    structured: StructuredSpec | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.min_tokens < 0:
            raise ValueError("min_tokens must be >= 0")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}]")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be >= 0")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError("prompt_logprobs must be >= 0")
        if any(not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for _t, b in self.logit_bias):
            raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if not (-MAX_PENALTY <= self.presence_penalty <= MAX_PENALTY
                and -MAX_PENALTY <= self.frequency_penalty <= MAX_PENALTY):
            raise ValueError(f"presence_penalty and frequency_penalty must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}]")

    @property
    def penalized(self) -> bool:
        """Whether any logit bias or penalty applies: only such rows pay for them in the sampler."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0 \
            or self.repetition_penalty != 1

    @property
    def reads_every_logit(self) -> bool:
        """Whether the request reads logits beyond the largest few: logprobs it returns, or logits that a
        bias, a penalty or a grammar's mask reorders before sampling (``LlamaModel.forward``'s
        ``exact_logits``)."""
        return self.logprobs is not None or self.penalized or self.structured is not None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


_ids = itertools.count(1)


def next_request_id() -> str:
    return f"req-{next(_ids)}"


@dataclass
class Request:
    """One generation request as the engine sees it."""

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=next_request_id)
    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic time after which the request times out


# a token's log-probability and its top alternatives (token id, log-probability)
Logprob = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class TokenOutput:
    """One engine event for a request: a new token, or the end of the request.

    ``token_id`` is None only on a final event that carries no token (abort, error,
    zero max_tokens). ``finish_reason`` is set on the last event. With
    ``SamplingParams.prompt_logprobs``, the first token's event carries ``prompt_logprobs``:
    one entry for each prompt token after the first, which has nothing to be predicted from.
    ``num_cached_tokens`` is the number of prompt tokens whose K/V came from the prefix cache.
    """

    request_id: str
    token_id: int | None
    finish_reason: FinishReason | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    num_prompt_tokens: int = 0
    num_generated: int = 0
    error: str | None = None
    time: float = 0.0  # monotonic time the engine produced this event
    queue_time: float | None = None  # on the final event: seconds from arrival to first schedule
    prompt_logprobs: tuple[Logprob, ...] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
