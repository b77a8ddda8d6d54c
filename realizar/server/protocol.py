"""Request validation at the edge: JSON bodies in, frozen request dataclasses out.

Every check raises :class:`APIError` naming the field: a missing field or a wrong type is a
422, a value out of range is a 400 (``/v1`` routes turn both into 400, as OpenAI does).
Nothing here touches the engine or the tokenizer, so it is unit-tested on plain dicts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from realizar.config import DEFAULT_MAX_TOKENS, ServerConfig
from realizar.request import (
    MAX_LOGIT_BIAS,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    SEED_MAX,
    SEED_MIN,
    GrammarError,
    SamplingParams,
    StructuredSpec,
)
from realizar.server.errors import APIError
from realizar.server.tools import Tool, ToolChoice, tool_call_spec
from realizar.tokenizer import CHAT_ROLES

STRATEGIES = ("greedy", "top_k", "top_p")
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16

_MISSING = object()


class Fields:
    """Typed, field-naming access to one JSON object."""

    def __init__(self, body: Any, where: str = "") -> None:
        if not isinstance(body, dict):
            raise APIError(422, f"{where or 'Request body'} must be a JSON object", param=where or None)
        self.body: dict[str, Any] = body
        self.where = where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def raw(self, key: str, *, required: bool = False) -> Any:
        value = self.body.get(key, _MISSING)
        if value is _MISSING or value is None:
            if required:
                raise APIError(422, f"Missing required field '{self.name(key)}'", param=self.name(key))
            return None
        return value

    def type_error(self, key: str, what: str) -> APIError:
        return APIError(422, f"'{self.name(key)}' must be {what}", param=self.name(key))

    def range_error(self, key: str, what: str) -> APIError:
        return APIError(400, f"'{self.name(key)}' must be {what}", param=self.name(key))

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw(key, required=required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.type_error(key, "a string")
        return value

    def required_string(self, key: str) -> str:
        value = self.string(key, required=True)
        assert value is not None  # required=True raises instead of returning None
        return value

    def integer(self, key: str, default: int, *, minimum: int | None = None,
                maximum: int | None = None) -> int:
        value = self.optional_integer(key, minimum=minimum, maximum=maximum)
        return default if value is None else value

    def optional_integer(self, key: str, *, minimum: int | None = None,
                         maximum: int | None = None) -> int | None:
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer() and abs(value) >= 2.0 ** 63:
            # an integer literal past 64 bits, which orjson reads as a float: out of range, not a wrong type
            if value > 0 and maximum is not None:
                raise self.range_error(key, f"<= {maximum}")
            if value < 0 and minimum is not None:
                raise self.range_error(key, f">= {minimum}")
            raise self.range_error(key, "an integer of at most 64 bits")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.type_error(key, "an integer")
        if minimum is not None and value < minimum:
            raise self.range_error(key, f">= {minimum}")
        if maximum is not None and value > maximum:
            raise self.range_error(key, f"<= {maximum}")
        return value

    def number(self, key: str, default: float, *, minimum: float | None = None,
               maximum: float | None = None, exclusive_minimum: bool = False) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.type_error(key, "a number")
        if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
            raise self.range_error(key, f"{'>' if exclusive_minimum else '>='} {minimum:g}")
        if maximum is not None and value > maximum:
            raise self.range_error(key, f"<= {maximum:g}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.type_error(key, "a boolean")
        return value

    def string_list(self, key: str, *, max_len: int) -> tuple[str, ...]:
        value = self.raw(key, required=True)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.type_error(key, "a list of strings")
        check_batch_length(self.name(key), len(value), max_len)
        return tuple(value)

    def seed(self) -> int | None:
        return self.optional_integer("seed", minimum=SEED_MIN, maximum=SEED_MAX)


def check_batch_length(name: str, length: int, max_len: int) -> None:
    if length == 0:
        raise APIError(400, f"'{name}' must not be empty", param=name)
    if length > max_len:
        raise APIError(400, f"'{name}' has {length} entries; the limit is {max_len}", param=name)


def check_max_tokens(f: Fields, route: str, limit: int, key: str = "max_tokens") -> int:
    """max_tokens, else ``route``'s default (config.DEFAULT_MAX_TOKENS; None there is ``limit``).
    Over the server's limit is a 400, never a silent clamp."""
    default = DEFAULT_MAX_TOKENS[route]
    value = f.integer(key, limit if default is None else default, minimum=0)
    if value > limit:
        raise APIError(400, f"'{key}' is {value}; this server's limit is {limit}", param=key)
    return value


# ---------------------------------------------------------------------------------------------
# Structured outputs
# ---------------------------------------------------------------------------------------------

# vLLM's ``structured_outputs`` kinds this server implements; exactly one per request
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredField:
    """A request's structured-output spec and the field it came from, which a 400 for a spec that does not
    compile names (the server compiles every spec before queueing the request)."""

    spec: StructuredSpec
    param: str


def _spec(param: str, make: Any, *args: Any) -> StructuredField:
    """``make(*args)``, with the spec's own checks (an empty regex, a non-string choice ...) as a 400."""
    try:
        return StructuredField(make(*args), param)
    except GrammarError as exc:
        raise APIError(400, f"Invalid '{param}': {exc}", param=param) from None


def _json_schema_value(f: Fields, key: str) -> Any:
    value = f.raw(key, required=True)
    if not isinstance(value, (dict, bool, str)):
        raise f.type_error(key, "a JSON schema (an object, or its JSON text)")
    return value


def parse_response_format(f: Fields) -> StructuredField | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (free text), ``{"type": "json_object"}`` (any JSON
    object), ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": bool}}``.
    ``strict`` false (OpenAI's default) lets a schema use keywords the grammar library does not implement,
    which are then not enforced; true refuses such a schema with a 400."""
    value = f.raw("response_format")
    if value is None:
        return None
    rf = Fields(value, "response_format")
    kind = rf.required_string("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredField(StructuredSpec.json_object(), "response_format")
    if kind != "json_schema":
        raise rf.range_error("type", "one of 'text', 'json_object', 'json_schema'")
    js = Fields(rf.raw("json_schema", required=True), rf.name("json_schema"))
    js.string("name")  # OpenAI's label for the schema: only its type is checked
    js.string("description")
    schema = _json_schema_value(js, "schema")
    return _spec(js.name("schema"), StructuredSpec.json_schema, schema, js.boolean("strict", False))


def parse_structured_outputs(f: Fields) -> StructuredField | None:
    """vLLM's ``structured_outputs``: exactly one of ``json`` (a schema, or its JSON text), ``regex``,
    ``choice`` (a list of strings), ``grammar`` (Lark, or llama.cpp's GBNF), ``json_object`` (true: any
    JSON object). Other keys (vLLM's backend options) are refused, not silently ignored."""
    value = f.raw("structured_outputs")
    if value is None:
        return None
    so = Fields(value, "structured_outputs")
    unknown = sorted(k for k in so.body if k not in STRUCTURED_OUTPUT_KINDS)
    if unknown:
        raise APIError(400, f"Unsupported field(s) {', '.join(repr(so.name(k)) for k in unknown)}; "
                            f"'structured_outputs' takes exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)}",
                       param=so.name(unknown[0]))
    given = [k for k in STRUCTURED_OUTPUT_KINDS if so.body.get(k) is not None]
    if len(given) != 1:
        raise APIError(400, f"'structured_outputs' must give exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)}"
                            f"{'; it gives ' + ', '.join(given) if given else ''}", param="structured_outputs")
    kind = given[0]
    param = so.name(kind)
    if kind == "json":
        return _spec(param, StructuredSpec.json_schema, _json_schema_value(so, "json"), True)
    if kind == "json_object":
        if so.body["json_object"] is not True:
            raise so.range_error("json_object", "true")
        return StructuredField(StructuredSpec.json_object(), param)
    if kind == "choice":
        choices = so.raw("choice")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise so.type_error("choice", "a list of strings")
        return _spec(param, StructuredSpec.choice, choices)
    text = so.required_string(kind)
    return _spec(param, StructuredSpec.regex if kind == "regex" else StructuredSpec.grammar, text)


def openai_structured(f: Fields) -> StructuredField | None:
    """The structured output an OpenAI-route request asks for, from ``response_format`` or
    ``structured_outputs``; asking through both is a 400."""
    fmt = parse_response_format(f)
    outputs = parse_structured_outputs(f)
    if fmt is not None and outputs is not None:
        raise APIError(400, "Give either 'response_format' or 'structured_outputs', not both",
                       param="structured_outputs")
    return fmt or outputs


def native_structured(f: Fields) -> StructuredField | None:
    """The native routes' ``json_schema``: a JSON schema (an object, or its JSON text) the output follows."""
    if f.raw("json_schema") is None:
        return None
    return _spec("json_schema", StructuredSpec.json_schema, _json_schema_value(f, "json_schema"), True)


# ---------------------------------------------------------------------------------------------
# Native API
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizeRequest:
    text: str
    model_id: str | None
    add_special: bool = True  # BOS/EOS where the model's metadata asks for them
    parse_special: bool | None = None  # special tokens in the text are control tokens; None: as /generate reads them


@dataclass(frozen=True)
class BatchTokenizeRequest:
    texts: tuple[str, ...]
    model_id: str | None
    add_special: bool = True
    parse_special: bool | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """``/generate`` and ``/stream/generate``."""

    prompt: str
    params: SamplingParams
    model_id: str | None
    structured: StructuredField | None = None  # also in params; here with the field a 400 names


@dataclass(frozen=True)
class BatchGenerateRequest:
    prompts: tuple[str, ...]
    params: SamplingParams
    model_id: str | None
    structured: StructuredField | None = None


def _optional_boolean(f: Fields, key: str) -> bool | None:
    value = f.raw(key)
    if value is not None and not isinstance(value, bool):
        raise f.type_error(key, "a boolean")
    return value


@dataclass(frozen=True)
class VLLMTokenizeRequest:
    """``/tokenize`` in vLLM's shape: ``prompt`` (text) or ``messages`` (a conversation, rendered with the
    chat template first), answered with ``{"count", "max_model_len", "tokens", "token_strs"}``."""

    prompt: str | None
    messages: tuple[dict[str, Any], ...] | None
    model: str | None
    add_special: bool  # vLLM's defaults: True for a prompt, False for messages (the template writes them)
    add_generation_prompt: bool
    return_token_strs: bool


@dataclass(frozen=True)
class DetokenizeRequest:
    """``/detokenize`` in vLLM's shape: ``{"model", "tokens"}`` -> ``{"prompt"}``."""

    tokens: tuple[int, ...]
    model: str | None


def parse_tokenize(body: Any) -> TokenizeRequest | VLLMTokenizeRequest:
    """``/tokenize`` takes two shapes, told apart by their fields: the native ``{"text"}`` (answered with
    ``token_ids``/``num_tokens``), and vLLM's ``{"prompt"}`` or ``{"messages"}`` (answered in vLLM's shape).
    A body with ``text`` is native, whatever else it holds."""
    f = Fields(body)
    if f.raw("text") is None and (f.raw("prompt") is not None or f.raw("messages") is not None):
        return _parse_vllm_tokenize(f)
    return TokenizeRequest(text=f.required_string("text"), model_id=f.string("model_id"),
                           add_special=f.boolean("add_special", True),
                           parse_special=_optional_boolean(f, "parse_special"))


def _parse_vllm_tokenize(f: Fields) -> VLLMTokenizeRequest:
    model = f.string("model")
    if f.raw("prompt") is not None and f.raw("messages") is not None:
        raise APIError(400, "Give either 'prompt' or 'messages', not both", param="messages")
    return_token_strs = f.boolean("return_token_strs", False)
    if f.raw("prompt") is not None:
        return VLLMTokenizeRequest(prompt=f.required_string("prompt"), messages=None, model=model,
                                   add_special=f.boolean("add_special_tokens", True),
                                   add_generation_prompt=False, return_token_strs=return_token_strs)
    messages = _messages(f)
    return VLLMTokenizeRequest(prompt=None, messages=messages, model=model,
                               add_special=f.boolean("add_special_tokens", False),
                               add_generation_prompt=f.boolean("add_generation_prompt", True),
                               return_token_strs=return_token_strs)


def parse_detokenize(body: Any) -> DetokenizeRequest:
    f = Fields(body)
    value = f.raw("tokens", required=True)
    if not isinstance(value, list):
        raise f.type_error("tokens", "a list of integers")
    return DetokenizeRequest(tokens=_token_id_list(f, "tokens"), model=f.string("model"))


def parse_batch_tokenize(body: Any, config: ServerConfig) -> BatchTokenizeRequest:
    f = Fields(body)
    return BatchTokenizeRequest(texts=f.string_list("texts", max_len=config.max_batch_size),
                                model_id=f.string("model_id"), add_special=f.boolean("add_special", True),
                                parse_special=_optional_boolean(f, "parse_special"))


def native_sampling(f: Fields, config: ServerConfig) -> SamplingParams:
    """Map the native ``strategy`` fields onto :class:`SamplingParams`.

    greedy -> temperature 0; top_k -> temperature + top_k; top_p -> temperature + top_p.
    Every given value is range-checked, whichever strategy uses it.
    """
    max_tokens = check_max_tokens(f, "/generate", config.max_tokens_limit)
    strategy = f.raw("strategy")
    if strategy is None:
        strategy = "greedy"
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        shown = strategy if isinstance(strategy, str) else _json_repr(strategy)
        raise APIError(400, f"Invalid strategy: {shown}", param="strategy")
    temperature = f.number("temperature", 1.0, minimum=0.0, maximum=MAX_TEMPERATURE)
    top_k = f.integer("top_k", 50, minimum=1)
    top_p = f.number("top_p", 0.9, minimum=0.0, exclusive_minimum=True, maximum=1.0)
    seed = f.seed()
    structured = native_structured(f)
    spec = None if structured is None else structured.spec
    if strategy == "greedy":
        return SamplingParams(temperature=0.0, seed=seed, max_tokens=max_tokens, structured=spec)
    if temperature <= 0:
        raise APIError(400, f"'temperature' must be > 0 for the {strategy} strategy", param="temperature")
    if strategy == "top_k":
        return SamplingParams(temperature=temperature, top_k=top_k, seed=seed, max_tokens=max_tokens,
                              structured=spec)
    return SamplingParams(temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens, structured=spec)


def parse_generate(body: Any, config: ServerConfig) -> GenerateRequest:
    f = Fields(body)
    prompt = f.required_string("prompt")
    return GenerateRequest(prompt=prompt, params=native_sampling(f, config), model_id=f.string("model_id"),
                           structured=native_structured(f))


def parse_batch_generate(body: Any, config: ServerConfig) -> BatchGenerateRequest:
    f = Fields(body)
    prompts = f.string_list("prompts", max_len=config.max_batch_size)
    return BatchGenerateRequest(prompts=prompts, params=native_sampling(f, config),
                                model_id=f.string("model_id"), structured=native_structured(f))


def _json_repr(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


# ---------------------------------------------------------------------------------------------
# OpenAI API
# ---------------------------------------------------------------------------------------------

Prompt = str | tuple[int, ...]  # text, or token ids


@dataclass(frozen=True)
class OpenAIOptions:
    """What the completions and chat routes share beyond :class:`SamplingParams`."""

    model: str | None
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    structured: StructuredField | None = None  # also in the params; here with the field a 400 names


@dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple[Prompt, ...]
    params: SamplingParams
    options: OpenAIOptions
    echo: bool


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict[str, Any], ...]
    params: SamplingParams
    options: OpenAIOptions
    auto_max_tokens: bool  # no max_tokens given: fill the context, up to the server's limit
    logprobs: bool
    tools: ToolChoice | None = None  # the tools offered to the model; None when none are (no tools, or "none")


# ---- fields that are accepted but change nothing, and fields refused because they are not implemented ----

def _no_function_call(value: Any, body: dict[str, Any]) -> bool:
    return value == "none"


def _best_of_at_most_n(value: Any, body: dict[str, Any]) -> bool:
    n = body.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) else 1
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= n


def _text_modalities(value: Any, body: dict[str, Any]) -> bool:
    return value == ["text"]


def _empty_text(value: Any, body: dict[str, Any]) -> bool:
    return value == ""


def _empty_list(value: Any, body: dict[str, Any]) -> bool:
    return value == []


def _false(value: Any, body: dict[str, Any]) -> bool:
    return value is False


def _true(value: Any, body: dict[str, Any]) -> bool:
    return value is True


def _zero(value: Any, body: dict[str, Any]) -> bool:
    return value == 0 and not isinstance(value, bool)


def _never(value: Any, body: dict[str, Any]) -> bool:
    return False


# THE place where a field that would change the output but is not implemented yet is refused: a 400 that
# names the field, never a silent drop. Each entry: the field, what the request would need to be accepted
# (said in the error), and the test of the values that change nothing (null is always accepted).
UNIMPLEMENTED: dict[str, tuple[str, Callable[[Any, dict[str, Any]], bool]]] = {
    # vLLM's older guided_* fields: structured_outputs is their current spelling
    "guided_json": ("use structured_outputs.json", _never),
    "guided_regex": ("use structured_outputs.regex", _never),
    "guided_choice": ("use structured_outputs.choice", _never),
    "guided_grammar": ("use structured_outputs.grammar", _never),
    "guided_decoding_backend": ("the structured-output backend is fixed (llguidance)", _never),
    "guided_whitespace_pattern": ("a whitespace pattern is not supported", _never),
    # OpenAI's deprecated spelling of tools and tool_choice
    "functions": ("use tools (the deprecated functions field is not supported)", _empty_list),
    "function_call": ('use tool_choice (the deprecated function_call field accepts only "none")', _no_function_call),
    "best_of": ("best_of above n is not supported", _best_of_at_most_n),
    "suffix": ("suffix (insertion) is not supported", _empty_text),
    "prediction": ("predicted outputs are not supported", _never),
    "audio": ("audio output is not supported", _never),
    "modalities": ('only ["text"] is supported', _text_modalities),
    "web_search_options": ("web search is not supported", _never),
    "reasoning_effort": ("reasoning effort is not supported", _never),
    # vLLM's sampling extensions not implemented here
    "min_p": ("min_p is not supported; only 0 is accepted", _zero),
    "use_beam_search": ("beam search is not supported", _false),
    "allowed_token_ids": ("allowed_token_ids is not supported", _never),
    "bad_words": ("bad_words is not supported", _empty_list),
    "prompt_logprobs": ("prompt_logprobs is not supported; use echo with logprobs on /v1/completions", _never),
    "truncate_prompt_tokens": ("prompt truncation is not supported", _never),
    "include_stop_str_in_output": ("include_stop_str_in_output is not supported", _false),
    "skip_special_tokens": ("only skip_special_tokens true is supported", _true),
    "chat_template": ("a per-request chat template is not supported", _never),
    "chat_template_kwargs": ("chat template arguments are not supported", _never),
    "continue_final_message": ("continue_final_message is not supported", _false),
    "add_generation_prompt": ("only add_generation_prompt true is supported", _true),
    "documents": ("documents are not supported", _never),
}


def refuse_unimplemented(f: Fields) -> None:
    """400 naming the first field of :data:`UNIMPLEMENTED` whose value would change the output."""
    for key, (why, harmless) in UNIMPLEMENTED.items():
        value = f.raw(key)
        if value is not None and not harmless(value, f.body):
            raise APIError(400, f"'{key}' is not supported by this server: {why}", param=key,
                           code="unsupported_parameter")


def check_inert_fields(f: Fields) -> None:
    """Fields that change nothing in the output are accepted, but typed as OpenAI types them."""
    f.string("user")
    f.string("service_tier")
    f.boolean("store", False)
    f.boolean("parallel_tool_calls", True)
    metadata = f.raw("metadata")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(v, str) for v in metadata.values())):
        raise f.type_error("metadata", "an object of string values")


def _logit_bias(f: Fields) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: token ids (as strings) to biases in [-100, 100]. The ids are checked against
    the vocabulary once the model is known (``generation.fit_params``)."""
    value = f.raw("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise f.type_error("logit_bias", "an object mapping token ids to numbers")
    bias: dict[int, float] = {}
    for key, number in value.items():
        if not (key.isascii() and key.isdigit()):
            raise f.type_error("logit_bias", f"an object whose keys are token ids; got key {key!r}")
        if len(key) > 18:  # no vocabulary is this large; and int() refuses keys past 4300 digits
            raise f.range_error("logit_bias", f"an object whose keys are token ids in the vocabulary; got {key[:24]}...")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise f.type_error("logit_bias", f"an object whose values are numbers; got {_json_repr(number)} "
                                             f"for token {key}")
        if not -MAX_LOGIT_BIAS <= number <= MAX_LOGIT_BIAS:
            raise f.range_error("logit_bias", f"an object whose values are in [-{MAX_LOGIT_BIAS:g}, "
                                              f"{MAX_LOGIT_BIAS:g}]; got {number:g} for token {key}")
        bias[int(key)] = float(number)
    return tuple(bias.items())


def _openai_options(f: Fields, config: ServerConfig, num_prompts: int,
                    structured: StructuredField | None) -> OpenAIOptions:
    n = f.integer("n", 1, minimum=1)
    if n * num_prompts > config.max_batch_size:
        raise APIError(400, f"'n' times the number of prompts is {n * num_prompts}; "
                            f"the limit is {config.max_batch_size}", param="n")
    stream = f.boolean("stream", False)
    include_usage = False
    options = f.raw("stream_options")
    if options is not None:
        include_usage = Fields(options, "stream_options").boolean("include_usage", False)
    return OpenAIOptions(model=f.string("model"), n=n, stop=_stop_strings(f), stream=stream,
                         include_usage=include_usage, structured=structured)


def _stop_strings(f: Fields) -> tuple[str, ...]:
    value = f.raw("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise f.type_error("stop", "a string or a list of strings")
    if len(value) > MAX_STOP_STRINGS:
        raise f.range_error("stop", f"at most {MAX_STOP_STRINGS} strings")
    return tuple(s for s in value if s)  # an empty stop string would match everywhere


def _token_id_list(f: Fields, key: str) -> tuple[int, ...]:
    """A list of token ids: integers >= 0. Whether each is inside the vocabulary is checked
    when the request is submitted (``Engine.check_request``: a 400 naming the field)."""
    value = f.raw(key)
    assert isinstance(value, list)
    if any(isinstance(t, bool) or not isinstance(t, int) for t in value):
        raise f.type_error(key, "a list of integers")
    check_token_ids_sign(f.name(key), value)
    return tuple(value)


def check_token_ids_sign(name: str, ids: list[int]) -> None:
    bad = next((t for t in ids if t < 0), None)
    if bad is not None:
        raise APIError(400, f"'{name}' holds token id {bad}; token ids are >= 0", param=name)


def _openai_sampling(f: Fields, config: ServerConfig, max_tokens: int, logprobs: int | None,
                     structured: StructuredField | None) -> SamplingParams:
    temperature = f.number("temperature", 1.0, minimum=0.0, maximum=MAX_TEMPERATURE)
    top_p = f.number("top_p", 1.0, minimum=0.0, exclusive_minimum=True, maximum=1.0)
    top_k = f.integer("top_k", 0, minimum=-1)  # vLLM spells "no filter" -1, we spell it 0
    min_tokens = f.integer("min_tokens", 0, minimum=0)
    if min_tokens > max_tokens:
        raise f.range_error("min_tokens", f"<= max_tokens ({max_tokens})")
    stop_ids = f.raw("stop_token_ids")
    stop_token_ids: tuple[int, ...] = ()
    if stop_ids is not None:
        if not isinstance(stop_ids, list):
            raise f.type_error("stop_token_ids", "a list of integers")
        stop_token_ids = _token_id_list(f, "stop_token_ids")
    refuse_unimplemented(f)
    check_inert_fields(f)
    return SamplingParams(
        temperature=temperature, top_k=max(top_k, 0), top_p=top_p, seed=f.seed(),
        max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=f.boolean("ignore_eos", False),
        stop_token_ids=stop_token_ids, logprobs=logprobs, logit_bias=_logit_bias(f),
        presence_penalty=f.number("presence_penalty", 0.0, minimum=-MAX_PENALTY, maximum=MAX_PENALTY),
        frequency_penalty=f.number("frequency_penalty", 0.0, minimum=-MAX_PENALTY, maximum=MAX_PENALTY),
        repetition_penalty=f.number("repetition_penalty", 1.0, minimum=0.0, exclusive_minimum=True,
                                    maximum=MAX_REPETITION_PENALTY),
        structured=None if structured is None else structured.spec,
    )


def _prompts(f: Fields, config: ServerConfig) -> tuple[Prompt, ...]:
    value = f.raw("prompt", required=True)
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise f.type_error("prompt", "a string, a list of strings, or token ids")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value) and value:
        # one prompt given as token ids: as long as the context allows (checked by the engine),
        # whatever --max-batch-size, which counts prompts
        check_token_ids_sign("prompt", value)
        return (tuple(value),)
    check_batch_length("prompt", len(value), config.max_batch_size)
    if all(isinstance(p, str) for p in value):
        return tuple(value)
    if all(isinstance(p, list) for p in value):
        for i, p in enumerate(value):
            if not p or any(isinstance(t, bool) or not isinstance(t, int) for t in p):
                raise f.type_error("prompt", "a list of non-empty token id lists")
            check_token_ids_sign(f"prompt[{i}]", p)
        return tuple(tuple(p) for p in value)
    raise f.type_error("prompt", "a string, a list of strings, or token ids")


def parse_completion(body: Any, config: ServerConfig) -> CompletionRequest:
    f = Fields(body)
    _refuse_tools_on_completions(f)
    prompts = _prompts(f, config)
    max_tokens = check_max_tokens(f, "/v1/completions", config.max_tokens_limit)
    logprobs = f.optional_integer("logprobs", minimum=0, maximum=MAX_LOGPROBS)
    structured = openai_structured(f)
    return CompletionRequest(
        prompts=prompts,
        params=_openai_sampling(f, config, max_tokens, logprobs, structured),
        options=_openai_options(f, config, len(prompts), structured),
        echo=f.boolean("echo", False),
    )


def _message(value: Any, index: int) -> dict[str, Any]:
    """Check one chat message's shape; the tokenizer's chat template gets it as given."""
    m = Fields(value, f"messages[{index}]")
    role = m.required_string("role")
    if role not in CHAT_ROLES:
        raise m.range_error("role", f"one of {', '.join(CHAT_ROLES)}")
    content = m.raw("content")
    if isinstance(content, list):
        for i, part in enumerate(content):
            p = Fields(part, m.name(f"content[{i}]"))
            kind = p.required_string("type")
            if kind != "text":
                raise APIError(400, f"'{p.name('type')}' is {kind!r}: only 'text' content parts are supported",
                               param=p.name("type"), code="unsupported_content")
            p.required_string("text")
    elif content is not None and not isinstance(content, str):
        raise m.type_error("content", "a string or a list of content parts")
    m.string("name")
    tool_calls = m.raw("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise m.range_error("tool_calls", "given only on assistant messages")
        if not isinstance(tool_calls, list):
            raise m.type_error("tool_calls", "a list of tool calls")
        for i, call in enumerate(tool_calls):
            c = Fields(call, m.name(f"tool_calls[{i}]"))
            c.string("id")
            if c.string("type", "function") != "function":
                raise c.range_error("type", "'function'")
            fn = Fields(c.raw("function", required=True), c.name("function"))
            fn.required_string("name")
            arguments = fn.raw("arguments")
            if arguments is not None and not isinstance(arguments, (str, dict)):
                raise fn.type_error("arguments", "a JSON string")
    elif content is None:
        raise APIError(422, f"Missing required field '{m.name('content')}' (it may be null only with tool_calls)",
                       param=m.name("content"))
    if role == "tool":
        m.string("tool_call_id")
    return m.body


def _messages(f: Fields) -> tuple[dict[str, Any], ...]:
    messages = f.raw("messages", required=True)
    if not isinstance(messages, list):
        raise f.type_error("messages", "a list of messages")
    check_batch_length("messages", len(messages), 1 << 16)
    return tuple(_message(m, i) for i, m in enumerate(messages))


# ---- tool calling (chat only) ----

TOOL_CHOICE_MODES = ("none", "auto", "required")
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _refuse_tools_on_completions(f: Fields) -> None:
    """Tools are a chat feature; on /v1/completions a field that would offer them is a 400, not silently dropped."""
    tools = f.raw("tools")
    if tools is not None and tools != []:
        raise APIError(400, "'tools' is supported on /v1/chat/completions only", param="tools",
                       code="unsupported_parameter")
    choice = f.raw("tool_choice")
    if choice is not None and choice != "none":
        raise APIError(400, "'tool_choice' is supported on /v1/chat/completions only", param="tool_choice",
                       code="unsupported_parameter")


def _tool(value: Any, index: int) -> Tool:
    t = Fields(value, f"tools[{index}]")
    if t.required_string("type") != "function":
        raise t.range_error("type", "'function' (the only tool type supported)")
    fn = Fields(t.raw("function", required=True), t.name("function"))
    name = fn.required_string("name")
    if not _FUNCTION_NAME.fullmatch(name):
        raise fn.range_error("name", "1 to 64 letters, digits, underscores or dashes")
    parameters = fn.raw("parameters")
    if parameters is None:  # OpenAI: a function without parameters takes an empty argument list
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise fn.type_error("parameters", "a JSON schema object")
    return Tool(name=name, description=fn.string("description"), parameters=parameters,
                strict=fn.boolean("strict", False))


def parse_tool_choice(f: Fields) -> ToolChoice | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls``: the tools offered to the model, or None when none
    are (no tools, or ``tool_choice`` "none"). A choice that calls for a tool that is not there is a 400."""
    value = f.raw("tools")
    if value is not None and not isinstance(value, list):
        raise f.type_error("tools", "a list of tools")
    tools = tuple(_tool(t, i) for i, t in enumerate(value or []))
    names = [t.name for t in tools]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate is not None:
        raise APIError(400, f"'tools' names the function {duplicate!r} twice", param="tools")
    parallel = f.boolean("parallel_tool_calls", True)
    raw = f.raw("tool_choice")
    name: str | None = None
    if raw is None:
        mode = "auto" if tools else "none"
    elif isinstance(raw, str):
        if raw not in TOOL_CHOICE_MODES:
            raise f.range_error("tool_choice", "'none', 'auto', 'required' or {'type': 'function', "
                                               "'function': {'name': ...}}")
        mode = raw
    else:
        c = Fields(raw, "tool_choice")
        if c.required_string("type") != "function":
            raise c.range_error("type", "'function'")
        name = Fields(c.raw("function", required=True), c.name("function")).required_string("name")
        mode = "function"
        if name not in names:
            raise APIError(400, f"'tool_choice' names the function {name!r}, which is not in 'tools'"
                                f"{' (' + ', '.join(names) + ')' if names else ' (none given)'}", param="tool_choice")
    if mode != "none" and not tools:
        raise APIError(400, f"'tool_choice' is {mode!r} but no 'tools' are given", param="tool_choice")
    if mode == "none":
        return None
    return ToolChoice(tools=tools, mode=mode, name=name, parallel=parallel)  # type: ignore[arg-type]


def _chat_structured(f: Fields, tools: ToolChoice | None) -> StructuredField | None:
    """The chat request's constraint: a forced tool call's grammar, or its structured output (not both)."""
    structured = openai_structured(f)
    if tools is None or not tools.forced:
        return structured
    if structured is not None:
        raise APIError(400, f"'tool_choice' {tools.mode!r} forces a tool call, which cannot also follow "
                            f"'{structured.param.split('.')[0]}'", param="tool_choice")
    return StructuredField(tool_call_spec(tools), "tools")


def parse_chat(body: Any, config: ServerConfig) -> ChatRequest:
    f = Fields(body)
    parsed = _messages(f)
    if f.boolean("echo", False):
        raise APIError(400, "'echo' is not supported on chat completions", param="echo",
                       code="unsupported_parameter")
    # max_completion_tokens is the newer spelling of max_tokens; it wins when both are given.
    key = "max_completion_tokens" if f.raw("max_completion_tokens") is not None else "max_tokens"
    auto = f.raw(key) is None
    max_tokens = check_max_tokens(f, "/v1/chat/completions", config.max_tokens_limit, key)
    want_logprobs = f.boolean("logprobs", False)
    top = f.optional_integer("top_logprobs", minimum=0, maximum=MAX_LOGPROBS)
    if top is not None and not want_logprobs:
        raise f.range_error("top_logprobs", "used only with 'logprobs': true")
    tools = parse_tool_choice(f)
    structured = _chat_structured(f, tools)
    return ChatRequest(
        messages=parsed,
        params=_openai_sampling(f, config, max_tokens, (top or 0) if want_logprobs else None, structured),
        options=_openai_options(f, config, 1, structured),
        auto_max_tokens=auto,
        logprobs=want_logprobs,
        tools=tools,
    )
