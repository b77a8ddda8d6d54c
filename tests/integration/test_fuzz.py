"""A fuzz run over every route of a real server: thousands of hostile or careless bodies,
none of which may get a 5xx or disturb a well-behaved client streaming beside them.

Each route gets ``EXAMPLES_PER_ROUTE`` bodies drawn by hypothesis: valid fields, fields of
the wrong type, out-of-range numbers, token ids past the vocabulary, unknown fields and
plain junk. Valid generations stay a token or two long, so the run fits in CI time. A
canary thread streams ordinary chat completions the whole time; every one of them must
finish normally.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ServerProcess

POST_ROUTES = ("/tokenize", "/detokenize", "/generate", "/batch/tokenize", "/batch/generate", "/stream/generate",
               "/v1/completions", "/v1/chat/completions")
GET_ROUTES = ("/health", "/metrics", "/models", "/v1/models")
# 8 routes: 2,000 bodies, plus raw bytes and methods below. Derandomized, so every run sends the same cases.
# (It was 650 a route; 250 halves this module's time, and the bodies' strategies reach every field at that count.)
EXAMPLES_PER_ROUTE = 250


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                  st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
_junk = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
# Valid values stay small, so a fuzzed body never asks for a long generation.
_max_tokens = st.one_of(st.integers(0, 2), st.integers(5000, 2**70), st.integers(-(2**70), -1),
                        _junk.filter(lambda v: not isinstance(v, int) or isinstance(v, bool)))
_text = st.one_of(st.text(max_size=30), st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "🐉" * 3]),
                  _junk)
_texts = st.one_of(st.lists(st.text(max_size=15), max_size=3), _junk)
_number = st.one_of(st.floats(-2, 3, allow_nan=False), st.sampled_from([1e-40, 1e-46, 1e300, -0.0, 1e6]), _junk)
_int = st.one_of(st.integers(-3, 60), st.sampled_from([2**32, 2**63, 2**64, -(2**63)]), _junk)
_token_id = st.one_of(st.integers(-5, 50000), st.sampled_from([49151, 49152, 10**12, -(2**63)]))
_token_ids = st.one_of(st.lists(_token_id, max_size=4), _junk)
_logit_bias = st.one_of(st.dictionaries(st.one_of(st.integers(-3, 60000).map(str), st.text(max_size=4)),
                                        st.one_of(st.floats(-200, 200), _junk), max_size=3), _junk)
_message = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | _junk,
    "content": st.one_of(_text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
                                         max_size=2)),
    "name": _text, "tool_call_id": _text,
    "tool_calls": st.one_of(_junk, st.lists(st.fixed_dictionaries({"type": st.just("function")}, optional={
        "id": _text, "function": st.fixed_dictionaries({}, optional={"name": _text, "arguments": _text})}),
        max_size=2)),
})
_openai_extra = {
    "stop_token_ids": _token_ids, "logit_bias": _logit_bias, "presence_penalty": _number,
    "frequency_penalty": _number, "repetition_penalty": _number, "user": _text, "best_of": _int,
    "response_format": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "x"])}),
                                 _junk),
    "tools": _junk, "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]), _junk),
    "metadata": _junk, "store": _junk, "service_tier": _junk, "parallel_tool_calls": _junk, "suffix": _text,
    "modalities": _junk, "min_p": _number, "max_completion_tokens": _max_tokens,
}
FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "/tokenize": {"text": _text, "model_id": _text, "add_special": _junk, "parse_special": _junk,
                  # vLLM's shape, chosen when "text" is absent
                  "prompt": _text, "messages": st.one_of(st.lists(_message, max_size=2), _junk), "model": _text,
                  "add_special_tokens": _junk, "add_generation_prompt": _junk, "return_token_strs": _junk},
    "/detokenize": {"tokens": _token_ids, "model": _text},
    "/batch/tokenize": {"texts": _texts, "model_id": _text},
    "/generate": {"prompt": _text, "strategy": st.sampled_from(["greedy", "top_k", "top_p", "beam"]) | _junk,
                  "temperature": _number, "top_k": _int, "top_p": _number, "seed": _int, "model_id": _text},
    "/v1/completions": {"prompt": st.one_of(_text, _texts, _token_ids, st.lists(_token_ids, max_size=2)),
                        "n": st.one_of(st.integers(-1, 2), _junk.filter(lambda v: not isinstance(v, int))),
                        "temperature": _number, "top_p": _number, "top_k": _int, "seed": _int, "stop": _texts,
                        "stream": st.booleans() | _junk, "echo": st.booleans() | _junk,
                        "logprobs": _int, "ignore_eos": st.booleans() | _junk, "min_tokens": _int,
                        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | _junk}) | _junk,
                        "model": _text, **_openai_extra},
}
FIELDS["/stream/generate"] = FIELDS["/generate"]
FIELDS["/batch/generate"] = {**FIELDS["/generate"], "prompts": _texts}
FIELDS["/v1/chat/completions"] = {**{k: v for k, v in FIELDS["/v1/completions"].items() if k not in ("prompt", "echo")},
                                  "messages": st.one_of(st.lists(_message, max_size=3), _junk),
                                  "logprobs": st.booleans() | _junk, "top_logprobs": _int}


def _body(route: str) -> st.SearchStrategy[Any]:
    fields = FIELDS[route]
    generates = route.startswith("/v1/") or route.endswith("generate")
    as_object = st.fixed_dictionaries({"max_tokens": _max_tokens} if generates else {}, optional=fields)
    return st.one_of(as_object, _junk)


@dataclass
class Canary:
    """Streams ordinary chat completions until stopped; records anything abnormal."""

    url: str
    completed: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        body = {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 6, "stream": True,
                "temperature": 0}
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self._stop.is_set():
                try:
                    with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                    chunks = [json.loads(line[6:]) for line in lines[:-1]]
                    if r.status_code != 200 or lines[-1] != "data: [DONE]" or \
                            chunks[-1]["choices"][0]["finish_reason"] not in ("stop", "length"):
                        self.failures.append(f"{r.status_code}: {lines[-3:]}")
                    else:
                        self.completed += 1
                except (httpx.HTTPError, json.JSONDecodeError, IndexError, KeyError) as exc:
                    self.failures.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()


@pytest.fixture(scope="module")
def canary(demo_server: ServerProcess) -> Iterator[Canary]:
    bird = Canary(demo_server.url)
    thread = threading.Thread(target=bird.run, daemon=True)
    thread.start()
    yield bird
    bird.stop()
    thread.join(120)


@pytest.fixture(scope="module")
def client(demo_server: ServerProcess, canary: Canary) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=demo_server.url, timeout=180) as c:
        yield c


@pytest.mark.parametrize("route", POST_ROUTES)
@fuzz_settings(EXAMPLES_PER_ROUTE)
@given(data=st.data())
def test_fuzzed_bodies_never_get_a_5xx(client: httpx.Client, route: str, data: st.DataObject) -> None:
    body = data.draw(_body(route))
    if route == "/v1/chat/completions" and isinstance(body, dict) and "max_tokens" in body:
        body["max_completion_tokens"] = body["max_tokens"]  # chat without it would fill the context
    r = client.post(route, json=body)
    assert r.status_code < 500, (route, body, r.text)
    if r.status_code >= 400:
        assert "error" in r.json(), r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert "Internal" not in r.text and "internal_error" not in r.text, (body, r.text)


@fuzz_settings(300)
@given(raw=st.binary(max_size=64), route=st.sampled_from(POST_ROUTES))
def test_fuzzed_raw_bytes_are_4xx(client: httpx.Client, raw: bytes, route: str) -> None:
    r = client.post(route, content=raw)
    assert 400 <= r.status_code < 500 or (r.status_code == 200 and route == "/tokenize"), (raw, r.text)
    assert "error" in r.json()


@fuzz_settings(200)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       route=st.sampled_from(POST_ROUTES + GET_ROUTES + ("/", "/v1", "/v1/models/x", "/generate/")),
       query=st.text(alphabet="abc=&%?/0", max_size=8))
def test_fuzzed_methods_and_paths_never_get_a_5xx(client: httpx.Client, method: str, route: str, query: str) -> None:
    r = client.request(method, f"{route}?{query}")
    assert r.status_code < 500, (method, route, query, r.text)
    if r.status_code >= 400 and method != "HEAD":
        assert "error" in r.json()


def test_the_canary_never_noticed(client: httpx.Client, canary: Canary) -> None:
    """Runs after the fuzz tests of this module (pytest keeps file order)."""
    deadline = time.monotonic() + 30
    while canary.completed < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    canary.stop()
    assert canary.failures == []
    assert canary.completed >= 3
