"""Structured outputs over HTTP on the demo model: every constrained output parses and validates, batched with
free requests, streaming and not; a spec that does not compile is a 400 naming its field."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest

from tests.unit.test_structured import CHOICES, REGEXES, SCHEMAS

jsonschema = pytest.importorskip("jsonschema")

# 20 schemas x 3 seeds + 3 free requests = 63: one batch under the default --max-num-seqs 64 (5 seeds took two)
SEEDS = range(3)
MAX_TOKENS = 200  # the schemas bound their strings and arrays, so a valid output is far shorter than this
FREE_CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


def _bounded(schema: Any) -> bool:
    """Whether every value ``schema`` allows is short: no ``number`` (its fraction may run on: at temperature 1
    the model writes digits until max_tokens) and no integer without a ``maximum``."""
    if isinstance(schema, list):
        return all(map(_bounded, schema))
    if not isinstance(schema, dict):
        return True
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if "number" in types or ("integer" in types and "maximum" not in schema and "exclusiveMaximum" not in schema):
        return False
    return all(_bounded(v) for v in schema.values())


# The unit tests' schemas whose outputs are short, topped up to twenty with bounded ones of our own
EXTRA_SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}, "label": {"type": "string", "maxLength": 5}},
     "required": ["level", "label"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "code": {"type": "integer", "minimum": 100, "maximum": 599}},
     "required": ["ok", "code"], "additionalProperties": False},
    {"enum": ["alpha", "beta", {"nested": True}]},
]
JSON_SCHEMAS = ([s for s in SCHEMAS if _bounded(s)] + EXTRA_SCHEMAS)[:20]


def _ask(what: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Reply with {what} and nothing else."}]


async def _chat(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, str | None]:
    """The content and finish_reason of one chat completion, streamed or not as ``body`` says."""
    if not body.get("stream"):
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        [choice] = r.json()["choices"]
        return choice["message"]["content"], choice["finish_reason"]
    content, finish = [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                content.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    return "".join(content), finish


async def _together(server_url: str, bodies: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """Send every request at once, so that constrained and free ones share the engine's batches."""
    async with httpx.AsyncClient(base_url=server_url, timeout=300) as client:
        return await asyncio.gather(*(_chat(client, b) for b in bodies))


def test_json_schemas_at_temperature_one_all_validate_beside_free_requests(server_url: str) -> None:
    assert len(JSON_SCHEMAS) == 20 and len([s for s in SCHEMAS if _bounded(s)]) >= 16
    free = {"messages": FREE_CHAT, "max_tokens": 24, "temperature": 0}
    alone = asyncio.run(_together(server_url, [free]))[0]
    constrained = [
        {"messages": _ask("a JSON value"), "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": seed,
         "stream": seed % 2 == 1,
         "response_format": {"type": "json_schema",
                             "json_schema": {"name": f"schema{i}", "schema": schema, "strict": True}}}
        for i, schema in enumerate(JSON_SCHEMAS) for seed in SEEDS]
    frees = [free, {**free, "stream": True}, {**free, "temperature": 1.0, "seed": 1}]
    results = asyncio.run(_together(server_url, constrained + frees))
    for body, (text, finish) in zip(constrained, results[:len(constrained)], strict=True):
        schema = body["response_format"]["json_schema"]["schema"]
        assert finish == "stop", (text, schema)
        jsonschema.validate(json.loads(text), schema)
    # a free greedy request gets the same text with constrained neighbours in its batches, streamed or not
    assert results[len(constrained)] == alone and results[len(constrained) + 1] == alone
    text, finish = results[-1]
    assert text and finish in ("stop", "length")


def test_regex_and_choice_via_structured_outputs(server_url: str) -> None:
    bodies: list[dict[str, Any]] = []
    for seed in range(3):
        for pattern in REGEXES[:3]:
            bodies.append({"messages": _ask("text"), "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": seed,
                           "stream": seed == 1, "structured_outputs": {"regex": pattern}})
        for choices in CHOICES[:3]:
            bodies.append({"messages": _ask("one word"), "max_tokens": MAX_TOKENS, "temperature": 1.0,
                           "seed": seed, "stream": seed == 2, "structured_outputs": {"choice": choices}})
    results = asyncio.run(_together(server_url, [*bodies, {"messages": FREE_CHAT, "max_tokens": 16}]))
    for body, (text, finish) in zip(bodies, results[:len(bodies)], strict=True):
        assert finish == "stop", (text, body)
        spec = body["structured_outputs"]
        if "regex" in spec:
            assert re.fullmatch(spec["regex"], text), (text, spec["regex"])
        else:
            assert text in spec["choice"]


def test_completions_route_and_json_text_schema(server_url: str) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    r = httpx.post(server_url + "/v1/completions", timeout=120, json={
        "prompt": "Is water wet? Answer in JSON:", "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 7, "n": 2,
        "structured_outputs": {"json": json.dumps(schema)}})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), schema)


def test_json_object_gives_a_parseable_object(server_url: str) -> None:
    r = httpx.post(server_url + "/v1/chat/completions", timeout=120, json={
        "messages": _ask('a JSON object with the key "a" set to 1'), "max_tokens": MAX_TOKENS, "temperature": 0,
        "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert choice["finish_reason"] == "stop"
    assert isinstance(json.loads(choice["message"]["content"]), dict)
    text_format = httpx.post(server_url + "/v1/chat/completions", timeout=120, json={
        "messages": FREE_CHAT, "max_tokens": 4, "temperature": 0, "response_format": {"type": "text"}})
    assert text_format.status_code == 200, text_format.text


def test_native_generate_json_schema(server_url: str) -> None:
    schema = SCHEMAS[1]
    for route in ("/generate", "/batch/generate"):
        body: dict[str, Any] = {"max_tokens": MAX_TOKENS, "strategy": "top_p", "temperature": 1.0, "seed": 3,
                                "json_schema": schema}
        body.update({"prompt": "JSON:"} if route == "/generate" else {"prompts": ["JSON:", "Data:"]})
        r = httpx.post(server_url + route, json=body, timeout=120)
        assert r.status_code == 200, r.text
        results = r.json()["results"] if route == "/batch/generate" else [r.json()]
        prompts = body.get("prompts") or [body["prompt"]]
        for prompt, result in zip(prompts, results, strict=True):
            # ``text`` decodes the prompt's ids and the generated ones together (EOS skipped)
            assert result["text"].startswith(prompt) and 0 < result["num_generated"] < MAX_TOKENS
            jsonschema.validate(json.loads(result["text"].removeprefix(prompt)), schema)
    # the streamed tokens' texts make the object
    with httpx.stream("POST", server_url + "/stream/generate", timeout=120,
                      json={"prompt": "JSON:", "max_tokens": MAX_TOKENS, "json_schema": schema}) as r:
        assert r.status_code == 200
        texts = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line.startswith("data: ")]
    text = "".join(t.get("text", "") for t in texts if "token_id" in t)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(("route", "body", "param", "fragment"), [
    ("/v1/chat/completions",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema", "foo"),
    ("/v1/chat/completions",
     {"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"properties": {"a": {"$ref": "#/$defs/no"}}}}}},
     "response_format.json_schema.schema", "/$defs/no"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "regex"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "exactly one"),
    ("/v1/chat/completions", {"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    ("/v1/chat/completions", {"structured_outputs": {"grammar": "root ::= nowhere"}}, "structured_outputs.grammar",
     "nowhere"),
    ("/v1/chat/completions", {"structured_outputs": {"backend": "xgrammar"}}, "structured_outputs.backend",
     "Unsupported field"),
    ("/v1/completions", {"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
    ("/generate", {"json_schema": {"type": "string", "format": "weird"}}, "json_schema", "weird"),
])
def test_a_spec_that_does_not_compile_is_a_400_naming_the_field(server_url: str, route: str, body: dict[str, Any],
                                                                 param: str, fragment: str) -> None:
    base: dict[str, Any] = ({"messages": FREE_CHAT} if route == "/v1/chat/completions" else
                            {"prompt": "Hi"})
    r = httpx.post(server_url + route, json={**base, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert fragment in message, message
    if isinstance(error, dict):
        assert error["param"] == param
    else:
        assert param in message
