"""Tool calling on /v1/chat/completions with the demo model, through the stock `openai` client: forced calls
(``required`` and a named function), streamed and not, parse into ``tool_calls`` whose arguments follow the
tool's parameter schema; the call and its result go back into the conversation for a final answer; ``auto``
gives a well-formed response whatever the model chooses; bad tool fields are 400s naming them."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

jsonschema = pytest.importorskip("jsonschema")

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
    "required": ["timezone"], "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time in a timezone",
                                      "parameters": TIME_PARAMETERS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
CHOICES: list[Any] = ["required", {"type": "function", "function": {"name": "get_weather"}},
                      {"type": "function", "function": {"name": "get_time"}}]




Answer = tuple[list[dict[str, Any]], str | None, str | None]  # (tool_calls, finish_reason, content)


def _tool_calls(client: OpenAI, model: str, stream: bool, **kwargs: Any) -> Answer:
    """(tool_calls as OpenAI's message holds them, finish_reason, content) of one chat completion; a stream's
    deltas are put together the way OpenAI's documentation says to (by index; fragments appended)."""
    if not stream:
        c = client.chat.completions.create(model=model, **kwargs)
        [choice] = c.choices
        calls = [call.model_dump(include={"id", "type", "function"}) for call in choice.message.tool_calls or []]
        return calls, choice.finish_reason, choice.message.content
    built: dict[int, dict[str, Any]] = {}
    finish, content = None, ""
    for chunk in client.chat.completions.create(model=model, stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                # this server sends each call whole, in one delta, once its block closes
                assert delta.index not in built and delta.id and delta.type == "function"
                assert delta.function is not None and delta.function.name and delta.function.arguments
                call = built.setdefault(delta.index, {"id": None, "type": None,
                                                      "function": {"name": "", "arguments": ""}})
                call["id"] = delta.id or call["id"]
                call["type"] = delta.type or call["type"]
                if delta.function is not None:
                    call["function"]["name"] += delta.function.name or ""
                    call["function"]["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return [built[i] for i in sorted(built)], finish, content or None


def _check_call(call: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    assert call["type"] == "function"
    assert isinstance(call["id"], str) and call["id"].startswith("call_")
    name = call["function"]["name"]
    assert name in allowed
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, SCHEMAS[name])
    return arguments


CHOICE_IDS = ("required", "named-weather", "named-time")
STREAMS = {"whole": False, "stream": True}


def _all_at_once(jobs: dict[Any, Callable[[], Answer]]) -> dict[Any, Answer]:
    """Run the jobs concurrently: the server batches them, so the whole set costs about as many engine
    steps as its longest answer instead of the sum of all of them."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.fixture(scope="module")
def sampled(client: OpenAI, model: str) -> dict[Any, Answer]:
    """Every sampled tool-call request of this module, sent together; the tests below judge them one by one."""
    jobs: dict[Any, Callable[[], Answer]] = {}
    for choice_id, tool_choice in zip(CHOICE_IDS, CHOICES, strict=True):
        for stream_id, stream in STREAMS.items():
            for seed in range(2):
                # room for the most calls the grammar allows (MAX_PARALLEL_CALLS): the demo model often repeats
                # its call
                jobs["forced", choice_id, stream_id, seed] = functools.partial(
                    _tool_calls, client, model, stream, messages=QUESTION, tools=TOOLS, tool_choice=tool_choice,
                    max_tokens=300, temperature=0.8, seed=seed)
    for seed in range(3):
        jobs["one", seed] = functools.partial(
            _tool_calls, client, model, False, messages=QUESTION, tools=TOOLS, tool_choice="required",
            parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=seed)
        for stream_id, stream in STREAMS.items():
            jobs["auto", stream_id, seed] = functools.partial(
                _tool_calls, client, model, stream, messages=QUESTION, tools=TOOLS, max_tokens=60, temperature=1.0,
                seed=seed)
    return _all_at_once(jobs)


def _answer_to(client: OpenAI, model: str, call: dict[str, Any]) -> Answer:
    """The call and its result go back to the model, which answers (the template renders both)."""
    follow_up: list[Any] = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
                            {"role": "tool", "tool_call_id": call["id"],
                             "content": json.dumps({"result": "sunny, 21 C"})}]
    answer = client.chat.completions.create(model=model, messages=follow_up, max_tokens=30, temperature=0)
    [choice] = answer.choices
    return [], choice.finish_reason, choice.message.content if choice.message.tool_calls is None else None


@pytest.fixture(scope="module")
def follow_ups(client: OpenAI, model: str, sampled: dict[Any, Answer]) -> dict[Any, Answer]:
    """The answer to each forced case's first call of its last seed, all sent together."""
    return _all_at_once({(choice_id, stream_id): functools.partial(_answer_to, client, model,
                                                                   sampled["forced", choice_id, stream_id, 1][0][0])
                         for choice_id in CHOICE_IDS for stream_id in STREAMS
                         if sampled["forced", choice_id, stream_id, 1][0]})


@pytest.mark.parametrize("stream_id", STREAMS)
@pytest.mark.parametrize("choice_id", CHOICE_IDS)
def test_a_forced_call_parses_and_the_conversation_goes_on(sampled: dict[Any, Answer], follow_ups: dict[Any, Answer],
                                                          choice_id: str, stream_id: str) -> None:
    tool_choice = CHOICES[CHOICE_IDS.index(choice_id)]
    named = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
    for seed in range(2):
        calls, finish, _ = sampled["forced", choice_id, stream_id, seed]
        assert finish == "tool_calls"
        assert calls, "a forced tool choice always calls"
        for call in calls:
            _check_call(call, {named} if named else set(SCHEMAS))
    _, finish, content = follow_ups[choice_id, stream_id]
    assert finish in ("stop", "length")
    assert content  # text, and no tool call


def test_parallel_tool_calls_false_gives_one_call(sampled: dict[Any, Answer]) -> None:
    for seed in range(3):
        calls, finish, _ = sampled["one", seed]
        assert finish == "tool_calls" and len(calls) == 1
        _check_call(calls[0], set(SCHEMAS))


@pytest.mark.parametrize("stream_id", STREAMS)
def test_auto_is_well_formed_whatever_the_model_chooses(sampled: dict[Any, Answer], stream_id: str) -> None:
    for seed in range(3):
        calls, finish, content = sampled["auto", stream_id, seed]
        if calls:
            assert finish == "tool_calls"
            for call in calls:
                _check_call(call, set(SCHEMAS))
        else:
            assert finish in ("stop", "length") and content


def test_tool_choice_none_offers_no_tools(client: OpenAI, model: str, server_url: str) -> None:
    with_none = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS,  # type: ignore[call-overload]
                                               tool_choice="none", max_tokens=5, temperature=0)
    plain = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=5,  # type: ignore[arg-type]
                                           temperature=0)
    assert with_none.usage is not None and plain.usage is not None
    assert with_none.usage.prompt_tokens == plain.usage.prompt_tokens  # nothing about tools in the prompt
    assert with_none.choices[0].message.tool_calls is None
    offered = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS,  # type: ignore[arg-type]
                                             max_tokens=1, temperature=0)
    assert offered.usage is not None and offered.usage.prompt_tokens > plain.usage.prompt_tokens + 50


@pytest.mark.parametrize(("extra", "field"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "send_mail"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_fields_are_a_400_naming_them(model: str, server_url: str, extra: dict[str, Any],
                                               field: str) -> None:
    r = httpx.post(server_url + "/v1/chat/completions",
                   json={"model": model, "messages": QUESTION, "max_tokens": 1, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_tools_on_completions_are_refused(client: OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="x", max_tokens=1, extra_body={"tools": TOOLS})
    assert "tools" in str(info.value)
