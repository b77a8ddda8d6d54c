"""Request validation (realizar.server.protocol) and stop-string text handling, on plain data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from realizar.config import ServerConfig
from realizar.request import SEED_MAX, SEED_MIN
from realizar.server import protocol
from realizar.server.errors import APIError, error_body, error_response
from realizar.server.generation import ChoiceText, check_token_ids

CONFIG = ServerConfig(max_tokens_limit=100, max_batch_size=4)


def rejects(parse: Any, body: Any, status: int, field: str | None, text: str | None = None) -> APIError:
    with pytest.raises(APIError) as info:
        parse(body, CONFIG)
    err = info.value
    assert err.status == status, err.message
    if field is not None:
        assert err.param == field
        assert field in err.message
    if text is not None:
        assert err.message == text
    return err


# -- native ---------------------------------------------------------------------------------------


def test_generate_defaults_are_the_original_servers() -> None:
    req = protocol.parse_generate({"prompt": "hi"}, CONFIG)
    assert req.prompt == "hi" and req.model_id is None
    assert req.params.max_tokens == 50
    assert req.params.greedy and req.params.seed is None


@pytest.mark.parametrize(("body", "temperature", "top_k", "top_p"), [
    ({"strategy": "greedy", "temperature": 0.7, "top_k": 5}, 0.0, 0, 1.0),
    ({"strategy": "top_k", "temperature": 0.7, "top_k": 5}, 0.7, 5, 1.0),
    ({"strategy": "top_k"}, 1.0, 50, 1.0),
    ({"strategy": "top_p", "temperature": 0.5, "top_p": 0.8}, 0.5, 0, 0.8),
    ({"strategy": "top_p"}, 1.0, 0, 0.9),
])
def test_strategy_maps_onto_sampling_params(body: dict[str, Any], temperature: float, top_k: int,
                                            top_p: float) -> None:
    params = protocol.parse_generate({"prompt": "x", "seed": 3, **body}, CONFIG).params
    assert (params.temperature, params.top_k, params.top_p, params.seed) == (temperature, top_k, top_p, 3)


@pytest.mark.parametrize(("body", "status", "field", "text"), [
    ({}, 422, "prompt", None),
    ({"prompt": None}, 422, "prompt", None),
    ({"prompt": 5}, 422, "prompt", None),
    ({"prompt": "x", "strategy": "beam"}, 400, "strategy", "Invalid strategy: beam"),
    ({"prompt": "x", "strategy": 7}, 400, "strategy", "Invalid strategy: 7"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", None),
    ({"prompt": "x", "max_tokens": 101}, 400, "max_tokens", None),
    ({"prompt": "x", "max_tokens": 2.5}, 422, "max_tokens", None),
    ({"prompt": "x", "max_tokens": True}, 422, "max_tokens", None),
    ({"prompt": "x", "temperature": -0.1}, 400, "temperature", None),
    ({"prompt": "x", "temperature": "hot"}, 422, "temperature", None),
    ({"prompt": "x", "strategy": "top_k", "temperature": 0}, 400, "temperature", None),
    ({"prompt": "x", "top_k": 0}, 400, "top_k", None),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", None),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", None),
    ({"prompt": "x", "seed": 1 << 64}, 400, "seed", None),
    ({"prompt": "x", "model_id": 3}, 422, "model_id", None),
])
def test_generate_rejects_naming_the_field(body: dict[str, Any], status: int, field: str, text: str | None) -> None:
    rejects(protocol.parse_generate, body, status, field, text)


@pytest.mark.parametrize("body", [[], "prompt", 3, None])
def test_body_must_be_an_object(body: Any) -> None:
    err = rejects(protocol.parse_generate, body, 422, None)
    assert "JSON object" in err.message


def test_batch_limits() -> None:
    assert protocol.parse_batch_generate({"prompts": ["a", "b"]}, CONFIG).prompts == ("a", "b")
    rejects(protocol.parse_batch_generate, {"prompts": []}, 400, "prompts")
    rejects(protocol.parse_batch_generate, {"prompts": ["a"] * 5}, 400, "prompts")
    rejects(protocol.parse_batch_generate, {"prompts": ["a", 1]}, 422, "prompts")
    rejects(protocol.parse_batch_tokenize, {"texts": ["a"] * 5}, 400, "texts")
    assert protocol.parse_batch_tokenize({"texts": ["a"]}, CONFIG).texts == ("a",)


def test_tokenize_accepts_empty_text() -> None:
    assert protocol.parse_tokenize({"text": ""}).text == ""
    with pytest.raises(APIError) as info:
        protocol.parse_tokenize({"text": ["a"]})
    assert info.value.status == 422 and info.value.param == "text"


def test_tokenize_special_token_switches() -> None:
    plain = protocol.parse_tokenize({"text": "x"})
    assert (plain.add_special, plain.parse_special) == (True, None)  # None: as the server reads prompts
    asked = protocol.parse_tokenize({"text": "x", "add_special": False, "parse_special": True})
    assert (asked.add_special, asked.parse_special) == (False, True)
    batch = protocol.parse_batch_tokenize({"texts": ["x"], "parse_special": False}, CONFIG)
    assert (batch.add_special, batch.parse_special) == (True, False)
    for key in ("add_special", "parse_special"):
        with pytest.raises(APIError) as info:
            protocol.parse_tokenize({"text": "x", key: "yes"})
        assert info.value.status == 422 and info.value.param == key


# -- OpenAI ---------------------------------------------------------------------------------------


def test_completion_defaults() -> None:
    req = protocol.parse_completion({"model": "m", "prompt": "hi"}, CONFIG)
    assert req.prompts == ("hi",)
    assert req.params.max_tokens == 16 and req.params.temperature == 1.0 and req.params.logprobs is None
    assert req.options == protocol.OpenAIOptions(model="m", n=1, stop=(), stream=False, include_usage=False)
    assert not req.echo


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a", ("a",)),
    (["a", "b"], ("a", "b")),
    ([1, 2, 3], ((1, 2, 3),)),
    ([[1, 2], [3]], ((1, 2), (3,))),
])
def test_completion_prompt_forms(prompt: Any, expected: tuple[Any, ...]) -> None:
    assert protocol.parse_completion({"prompt": prompt}, CONFIG).prompts == expected


@pytest.mark.parametrize(("body", "field"), [
    ({}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": ["a", "b", "c"], "n": 2}, "n"),  # 6 sequences over the batch limit of 4
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"prompt": "x", "min_tokens": 20}, "min_tokens"),  # over max_tokens (16)
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "max_tokens": 1000}, "max_tokens"),
])
def test_completion_rejects_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(APIError) as info:
        protocol.parse_completion(body, CONFIG)
    assert info.value.param == field and info.value.status in (400, 422)


def test_completion_extensions() -> None:
    req = protocol.parse_completion({"prompt": "x", "stop": "END", "top_k": -1, "ignore_eos": True,
                                     "min_tokens": 4, "max_tokens": 8, "logprobs": 0, "echo": True,
                                     "stream": True, "stream_options": {"include_usage": True},
                                     "stop_token_ids": [7]}, CONFIG)
    assert req.options.stop == ("END",) and req.options.include_usage and req.echo
    p = req.params
    assert (p.top_k, p.ignore_eos, p.min_tokens, p.max_tokens, p.logprobs, p.stop_token_ids) == (0, True, 4, 8, 0, (7,))


def test_empty_stop_strings_are_dropped() -> None:
    assert protocol.parse_completion({"prompt": "x", "stop": ["", "b"]}, CONFIG).options.stop == ("b",)


def test_chat_parses_messages_and_defaults_to_filling_the_context() -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    req = protocol.parse_chat({"messages": messages}, CONFIG)
    assert req.messages == tuple(messages)
    assert req.auto_max_tokens and req.params.max_tokens == CONFIG.max_tokens_limit
    assert not req.logprobs and req.params.logprobs is None
    explicit = protocol.parse_chat({"messages": messages, "max_completion_tokens": 5, "max_tokens": 9}, CONFIG)
    assert not explicit.auto_max_tokens and explicit.params.max_tokens == 5
    lp = protocol.parse_chat({"messages": messages, "logprobs": True, "top_logprobs": 3}, CONFIG)
    assert lp.logprobs and lp.params.logprobs == 3


@pytest.mark.parametrize(("body", "field"), [
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_chat_rejects_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(APIError) as info:
        protocol.parse_chat(body, CONFIG)
    assert info.value.param == field


CHAT_BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}]}


def test_max_completion_tokens_wins_over_max_tokens_and_is_range_checked() -> None:
    assert protocol.parse_chat({**CHAT_BODY, "max_tokens": 50, "max_completion_tokens": 3}, CONFIG).params.max_tokens == 3
    assert protocol.parse_chat({**CHAT_BODY, "max_completion_tokens": None, "max_tokens": 7}, CONFIG).params.max_tokens == 7
    rejects(protocol.parse_chat, {**CHAT_BODY, "max_completion_tokens": 10_000, "max_tokens": 5}, 400,
            "max_completion_tokens")
    rejects(protocol.parse_chat, {**CHAT_BODY, "max_completion_tokens": "5"}, 422, "max_completion_tokens")


def test_logit_bias_and_penalties_are_parsed() -> None:
    req = protocol.parse_chat({**CHAT_BODY, "logit_bias": {"504": -100, "7": 2.5}, "presence_penalty": 0.5,
                               "frequency_penalty": -1, "repetition_penalty": 1.2}, CONFIG)
    p = req.params
    assert dict(p.logit_bias) == {504: -100.0, 7: 2.5}
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2) and p.penalized
    plain = protocol.parse_completion({"prompt": "x", "logit_bias": {}}, CONFIG).params
    assert not plain.penalized


@pytest.mark.parametrize(("extra", "status", "field"), [
    ({"logit_bias": "nonsense"}, 422, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, 422, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, 422, "logit_bias"),
    ({"logit_bias": {"5": "x"}}, 422, "logit_bias"),
    ({"logit_bias": {"5": True}}, 422, "logit_bias"),
    ({"logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"logit_bias": {"9" * 5000: 1}}, 400, "logit_bias"),
    ({"frequency_penalty": "x"}, 422, "frequency_penalty"),
    ({"frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"presence_penalty": -2.01}, 400, "presence_penalty"),
    ({"presence_penalty": [1]}, 422, "presence_penalty"),
    ({"repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"repetition_penalty": "1"}, 422, "repetition_penalty"),
    ({"user": 5}, 422, "user"),
    ({"metadata": "x"}, 422, "metadata"),
    ({"metadata": {"k": 1}}, 422, "metadata"),
    ({"store": "yes"}, 422, "store"),
    ({"service_tier": 1}, 422, "service_tier"),
    ({"parallel_tool_calls": "no"}, 422, "parallel_tool_calls"),
    ({"n": "2"}, 422, "n"),
    ({"seed": 1.5}, 422, "seed"),
    ({"stream_options": "x"}, 422, "stream_options"),
])
@pytest.mark.parametrize("parse", [protocol.parse_chat, protocol.parse_completion])
def test_every_standard_parameter_is_type_checked(parse: Any, extra: dict[str, Any], status: int,
                                                 field: str) -> None:
    body = {**(CHAT_BODY if parse is protocol.parse_chat else {"prompt": "x"}), **extra}
    rejects(parse, body, status, field)


def test_fields_that_change_nothing_are_accepted() -> None:
    inert = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
             "parallel_tool_calls": True, "response_format": {"type": "text"}, "tool_choice": "none",
             "tools": [], "modalities": ["text"], "best_of": 1, "min_p": 0, "suffix": None}
    assert protocol.parse_chat({**CHAT_BODY, **inert}, CONFIG).params == protocol.parse_chat(CHAT_BODY, CONFIG).params
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    off = protocol.parse_chat({**CHAT_BODY, "tools": tools, "tool_choice": "none"}, CONFIG)  # calls are off
    assert off.tools is None and off.params == protocol.parse_chat(CHAT_BODY, CONFIG).params
    assert protocol.parse_completion({"prompt": "x", "n": 2, "best_of": 2}, CONFIG).options.n == 2


@pytest.mark.parametrize(("extra", "field"), [
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"guided_regex": "a+"}, "guided_regex"),
    ({"guided_choice": ["a", "b"]}, "guided_choice"),
    ({"guided_grammar": "root ::= 'a'"}, "guided_grammar"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"best_of": 3, "n": 2}, "best_of"),
    ({"best_of": "2"}, "best_of"),
    ({"suffix": "tail"}, "suffix"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"min_p": 0.1}, "min_p"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"chat_template": "{{ 1 }}"}, "chat_template"),
])
def test_unimplemented_fields_are_a_400_naming_them(extra: dict[str, Any], field: str) -> None:
    err = rejects(protocol.parse_chat, {**CHAT_BODY, **extra}, 400, field)
    assert err.code == "unsupported_parameter"
    assert field in protocol.UNIMPLEMENTED
    rejects(protocol.parse_completion, {"prompt": "x", **extra}, 400, field)


def test_chat_refuses_logprobs_over_twenty_and_n_over_the_limit_and_echo() -> None:
    rejects(protocol.parse_chat, {**CHAT_BODY, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs")
    rejects(protocol.parse_chat, {**CHAT_BODY, "n": CONFIG.max_batch_size + 1}, 400, "n")
    rejects(protocol.parse_chat, {**CHAT_BODY, "echo": True}, 400, "echo")


def test_content_parts_and_tool_messages() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert protocol.parse_chat({"messages": parts}, CONFIG).messages == tuple(parts)
    err = rejects(protocol.parse_chat, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "http://x"}}]}]},
        400, "messages[0].content[1].type")
    assert "image_url" in err.message
    call = {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{}"}}
    convo = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    assert len(protocol.parse_chat({"messages": convo}, CONFIG).messages) == 3
    no_content = [{"role": "assistant", "tool_calls": [call]}]  # content absent, as some clients send it
    assert protocol.parse_chat({"messages": no_content}, CONFIG).messages[0]["tool_calls"] == [call]
    rejects(protocol.parse_chat, {"messages": [{"role": "user", "content": None}]}, 422, "messages[0].content")
    rejects(protocol.parse_chat, {"messages": [{"role": "assistant", "tool_calls": "x"}]}, 422,
            "messages[0].tool_calls")
    rejects(protocol.parse_chat, {"messages": [{"role": "assistant", "tool_calls": [{"type": "function"}]}]},
            422, "messages[0].tool_calls[0].function")
    rejects(protocol.parse_chat, {"messages": [{"role": "user", "content": "x", "tool_calls": [call]}]},
            400, "messages[0].tool_calls")


def test_tokenize_takes_the_native_and_vllms_shapes() -> None:
    native = protocol.parse_tokenize({"text": "x", "prompt": "ignored"})  # text decides: native
    assert isinstance(native, protocol.TokenizeRequest)
    prompt = protocol.parse_tokenize({"model": "m", "prompt": "hi"})
    assert isinstance(prompt, protocol.VLLMTokenizeRequest)
    assert (prompt.prompt, prompt.model, prompt.add_special, prompt.return_token_strs) == ("hi", "m", True, False)
    chat = protocol.parse_tokenize({"messages": [{"role": "user", "content": "hi"}], "return_token_strs": True})
    assert isinstance(chat, protocol.VLLMTokenizeRequest) and chat.messages is not None
    assert (chat.add_special, chat.add_generation_prompt, chat.return_token_strs) == (False, True, True)
    with pytest.raises(APIError) as info:
        protocol.parse_tokenize({"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    assert info.value.status == 400
    with pytest.raises(APIError) as info:
        protocol.parse_tokenize({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert info.value.param == "messages[0].content[0].type"
    with pytest.raises(APIError) as info:
        protocol.parse_tokenize({})
    assert info.value.param == "text"  # neither shape: the native field is named
    assert protocol.parse_detokenize({"model": "m", "tokens": [1, 2]}).tokens == (1, 2)
    for bad in ({"tokens": "1"}, {"tokens": [1.5]}, {}):
        with pytest.raises(APIError) as info:
            protocol.parse_detokenize(bad)
        assert info.value.param == "tokens"


# -- error bodies ---------------------------------------------------------------------------------


def test_error_shapes_per_api_family() -> None:
    assert error_body("/generate", 400, "bad") == b'{"error":"bad"}'
    assert error_body("/v1/completions", 400, "bad", param="n") == (
        b'{"error":{"message":"bad","type":"invalid_request_error","param":"n","code":null}}')
    # OpenAI clients get 400 where native clients get 422 for a wrong type.
    assert error_response("/v1/chat/completions", APIError(422, "x")).status_code == 400
    assert error_response("/generate", APIError(422, "x")).status_code == 422


# -- stop strings ---------------------------------------------------------------------------------


class CharTokenizer:
    """Token id n is the character chr(n); enough to drive ChoiceText."""

    class Detok:
        def step(self, token_id: int) -> str:
            return chr(token_id)

        def flush(self) -> str:
            return ""

    def detokenizer(self, prompt_ids: Sequence[int]) -> CharTokenizer.Detok:
        return CharTokenizer.Detok()


def feed(text: ChoiceText, chars: str) -> list[str]:
    streamed = []
    for c in chars:
        text.add(ord(c), last=False)
        streamed.append(text.take(final=False))
        if text.stopped:
            break
    return streamed


def test_stop_string_cuts_the_text_and_never_streams_it() -> None:
    text = ChoiceText(CharTokenizer(), [], ["STOP", "xy"])  # type: ignore[arg-type]
    streamed = feed(text, "abcSTOPdef")
    assert text.stopped and text.text == "abc"
    assert "".join(streamed) + text.take(final=True) == "abc"


def test_earliest_stop_string_wins_across_token_boundaries() -> None:
    text = ChoiceText(CharTokenizer(), [], ["cd", "bcde"])  # type: ignore[arg-type]
    feed(text, "abcdef")
    assert text.text == "ab"


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    text = ChoiceText(CharTokenizer(), [], ["STOP"])  # type: ignore[arg-type]
    streamed = feed(text, "aSTOxyz")
    assert not text.stopped
    assert "".join(streamed) == "aSTO"  # the last 3 characters are held back
    assert text.take(final=True) == "xyz"


def test_echoed_prefix_is_not_searched_for_stop_strings() -> None:
    text = ChoiceText(CharTokenizer(), [], ["lo"], prefix="hello")  # type: ignore[arg-type]
    feed(text, "ab")
    assert not text.stopped and text.text == "helloab"


def test_without_stop_strings_nothing_is_held_back() -> None:
    text = ChoiceText(CharTokenizer(), [], [])  # type: ignore[arg-type]
    assert feed(text, "abc") == ["a", "b", "c"]


# -- token ids, temperature, seeds, token-list prompts ---------------------------------------------


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"prompt": "x", "stop_token_ids": [5, -1]}, 400, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": [1.5]}, 422, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": 7}, 422, "stop_token_ids"),
    ({"prompt": [1, -3]}, 400, "prompt"),
    ({"prompt": [[1], [2, -2]]}, 400, "prompt[1]"),
    ({"prompt": "x", "temperature": 100.5}, 400, "temperature"),
    ({"prompt": "x", "temperature": 1e300}, 400, "temperature"),
    ({"prompt": "x", "seed": 1 << 64}, 400, "seed"),
    ({"prompt": "x", "seed": -(1 << 63) - 1}, 400, "seed"),
    ({"prompt": [[1]] * 5}, 400, "prompt"),  # five prompts: over --max-batch-size 4
    ({"prompt": ["a"] * 5}, 400, "prompt"),
])
def test_completion_token_ids_temperature_and_seed_are_range_checked(body: dict[str, Any], status: int,
                                                                     field: str) -> None:
    rejects(protocol.parse_completion, body, status, field)


def test_chat_and_native_refuse_a_temperature_over_the_maximum() -> None:
    rejects(protocol.parse_chat, {"messages": [{"role": "user", "content": "x"}], "temperature": 101}, 400,
            "temperature")
    rejects(protocol.parse_generate, {"prompt": "x", "strategy": "top_k", "temperature": 101}, 400, "temperature")
    assert protocol.parse_generate({"prompt": "x", "strategy": "top_k", "temperature": 100}, CONFIG).params.temperature == 100


def test_an_integer_past_64_bits_is_out_of_range_not_of_the_wrong_type() -> None:
    """orjson, which parses the bodies, reads an integer literal past 64 bits as a float."""
    body = orjson.loads(b'{"prompt": "x", "seed": 99999999999999999999999, "max_tokens": 2}')
    error = rejects(protocol.parse_completion, body, 400, "seed")
    assert str(SEED_MAX) in error.message
    negative = orjson.loads(b'{"prompt": "x", "seed": -99999999999999999999999}')
    assert str(SEED_MIN) in rejects(protocol.parse_completion, negative, 400, "seed").message
    huge = orjson.loads(b'{"prompt": "x", "max_tokens": 99999999999999999999999}')
    rejects(protocol.parse_completion, huge, 400, "max_tokens")
    rejects(protocol.parse_completion, {"prompt": "x", "seed": 2.5}, 422, "seed")  # a fraction: the wrong type


def test_seeds_span_signed_and_unsigned_64_bit() -> None:
    for seed in (-(1 << 63), (1 << 64) - 1, 5 + (1 << 32)):
        assert protocol.parse_completion({"prompt": "x", "seed": seed}, CONFIG).params.seed == seed


def test_a_token_id_prompt_may_be_longer_than_the_batch_limit() -> None:
    """--max-batch-size counts prompts; one prompt of 65 token ids is one prompt."""
    ids = list(range(65))
    assert protocol.parse_completion({"prompt": ids}, CONFIG).prompts == (tuple(ids),)
    # huge ids pass the parser (it does not know the vocabulary); the route checks them
    assert protocol.parse_completion({"prompt": "x", "stop_token_ids": [10 ** 12]}, CONFIG).params.stop_token_ids == (
        10 ** 12,)


@pytest.mark.parametrize("bad", [-1, 64, 10 ** 12])
def test_token_ids_outside_the_vocabulary_are_a_400_naming_the_field(bad: int) -> None:
    check_token_ids([0, 63], 64, "stop_token_ids")
    with pytest.raises(APIError) as info:
        check_token_ids([3, bad], 64, "stop_token_ids")
    assert info.value.status == 400 and info.value.param == "stop_token_ids"
    assert str(bad) in info.value.message


# -- structured outputs ---------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize(("extra", "kind", "param", "strict"), [
    ({"response_format": {"type": "json_object"}}, "json_object", "response_format", True),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
     "json_schema", "response_format.json_schema.schema", False),  # OpenAI's strict defaults to false
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     "json_schema", "response_format.json_schema.schema", True),
    ({"structured_outputs": {"json": SCHEMA}}, "json_schema", "structured_outputs.json", True),
    ({"structured_outputs": {"json": '{"type": "string"}'}}, "json_schema", "structured_outputs.json", True),
    ({"structured_outputs": {"regex": "[a-z]+"}}, "regex", "structured_outputs.regex", True),
    ({"structured_outputs": {"choice": ["a", "b"]}}, "choice", "structured_outputs.choice", True),
    ({"structured_outputs": {"grammar": 'start: "x"'}}, "grammar", "structured_outputs.grammar", True),
    ({"structured_outputs": {"json_object": True}}, "json_object", "structured_outputs.json_object", True),
])
def test_structured_outputs_reach_the_sampling_params(extra: dict[str, Any], kind: str, param: str,
                                                      strict: bool) -> None:
    for parse, base in ((protocol.parse_chat, {"messages": CHAT}), (protocol.parse_completion, {"prompt": "x"})):
        req = parse({**base, **extra}, CONFIG)
        spec = req.params.structured
        assert spec is not None and spec.kind == kind and spec.strict is strict
        assert req.options.structured is not None and req.options.structured.param == param
        assert req.options.structured.spec == spec


def test_text_response_format_and_absent_fields_are_free() -> None:
    assert protocol.parse_chat({"messages": CHAT, "response_format": {"type": "text"}}, CONFIG).params.structured is None
    assert protocol.parse_chat({"messages": CHAT}, CONFIG).params.structured is None
    req = protocol.parse_generate({"prompt": "x", "json_schema": SCHEMA}, CONFIG)
    assert req.params.structured is not None and req.params.structured.kind == "json_schema"
    assert req.structured is not None and req.structured.param == "json_schema"
    batch = protocol.parse_batch_generate({"prompts": ["x"], "strategy": "top_k", "json_schema": SCHEMA}, CONFIG)
    assert batch.params.structured == req.params.structured


@pytest.mark.parametrize(("extra", "status", "field"), [
    ({"response_format": "json"}, 422, "response_format"),
    ({"response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, 422, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 422,
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}, 422,
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{bad"}}}, 400,
     "response_format.json_schema.schema"),
    ({"structured_outputs": {}}, 400, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, 400, "structured_outputs"),
    ({"structured_outputs": {"backend": "x", "regex": "a"}}, 400, "structured_outputs.backend"),
    ({"structured_outputs": {"choice": "a"}}, 422, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": []}}, 400, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": ""}}, 400, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": 5}}, 422, "structured_outputs.regex"),
    ({"structured_outputs": {"json_object": False}}, 400, "structured_outputs.json_object"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, 400, "structured_outputs"),
])
def test_bad_structured_outputs_name_the_field(extra: dict[str, Any], status: int, field: str) -> None:
    rejects(protocol.parse_chat, {"messages": CHAT, **extra}, status, field)


def test_native_json_schema_must_be_a_schema() -> None:
    rejects(protocol.parse_generate, {"prompt": "x", "json_schema": [1]}, 422, "json_schema")


# ---- tool calling ----

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock"}}  # no parameters: an empty argument list


def test_tools_and_tool_choice_are_parsed() -> None:
    auto = protocol.parse_chat({**CHAT_BODY, "tools": [WEATHER, CLOCK]}, CONFIG)
    assert auto.tools is not None and auto.tools.mode == "auto" and not auto.tools.forced
    assert [t.name for t in auto.tools.offered] == ["get_weather", "clock"]
    assert auto.tools.offered[1].parameters == {"type": "object", "properties": {}}
    assert auto.params.structured is None  # auto is free generation, parsed afterwards
    required = protocol.parse_chat({**CHAT_BODY, "tools": [WEATHER, CLOCK], "tool_choice": "required"}, CONFIG)
    assert required.tools is not None and required.tools.forced
    assert required.params.structured is not None and required.params.structured.kind == "grammar"
    assert required.options.structured is not None and required.options.structured.param == "tools"
    named = protocol.parse_chat({**CHAT_BODY, "tools": [WEATHER, CLOCK], "parallel_tool_calls": False,
                                 "tool_choice": {"type": "function", "function": {"name": "clock"}}}, CONFIG)
    assert named.tools is not None and [t.name for t in named.tools.offered] == ["clock"]
    assert not named.tools.parallel
    assert named.params.structured is not None and "get_weather" not in str(named.params.structured.value)


@pytest.mark.parametrize(("extra", "status", "field"), [
    ({"tool_choice": "required"}, 400, "tool_choice"),  # no tools to call
    ({"tool_choice": "auto", "tools": []}, 400, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, 400, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, 400, "tool_choice"),
    ({"tool_choice": {"type": "function"}, "tools": [WEATHER]}, 422, "tool_choice.function"),
    ({"tool_choice": {"type": "retrieval", "function": {"name": "x"}}, "tools": [WEATHER]}, 400, "tool_choice.type"),
    ({"tools": {"type": "function"}}, 422, "tools"),
    ({"tools": [{"type": "code_interpreter"}]}, 400, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, 422, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, 422,
     "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, 400, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, 400, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": 0}, 422, "parallel_tool_calls"),
])
def test_bad_tools_are_a_4xx_naming_the_field(extra: dict[str, Any], status: int, field: str) -> None:
    rejects(protocol.parse_chat, {**CHAT_BODY, **extra}, status, field)


def test_tools_on_completions_are_refused() -> None:
    rejects(protocol.parse_completion, {"prompt": "x", "tools": [WEATHER]}, 400, "tools")
    rejects(protocol.parse_completion, {"prompt": "x", "tool_choice": "auto"}, 400, "tool_choice")
    protocol.parse_completion({"prompt": "x", "tools": [], "tool_choice": "none"}, CONFIG)  # nothing offered
