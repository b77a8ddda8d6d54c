"""The native realizar API (docs/api.md) against a real `realizar serve --demo` process."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from realizar import __version__

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=180) as c:
        yield c


def sse_events(body: str) -> list[tuple[str, Any]]:
    """(event name, parsed data) for each Server-Sent Event in ``body``."""
    events = []
    for block in body.strip().split("\n\n"):
        name, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data += line[len("data: "):]
        events.append((name, json.loads(data)))
    return events


def tokenize(client: httpx.Client, text: str) -> list[int]:
    r = client.post("/tokenize", json={"text": text})
    assert r.status_code == 200, r.text
    ids: list[int] = r.json()["token_ids"]
    return ids


def generate(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


# -- GET routes -----------------------------------------------------------------------------------


def test_health(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "healthy"
    assert body["version"] == __version__
    assert body["model"]
    assert body["compute_mode"] in ("cpu", "cuda")
    # the path in use: on the CPU with the kernels, their ISA and the demo GGUF's formats kept quantized
    if body["compute_mode"] == "cpu" and "kernels" in body["compute_path"]:
        assert "Q4_1" in body["compute_path"] and "Q8_0" in body["compute_path"], body
        # and the activations' type with the class of quantized products (auto's choice on this CPU)
        assert re.search(r"(float32|int8) activations.*\((exact|fast) class\)", body["compute_path"]), body
    # and what the KV cache stores (float16 on the CPU kernels unless --dtype float32)
    assert body["compute_path"].endswith((", float16 KV cache", ", float32 KV cache", ", bfloat16 KV cache")), body
    assert r.headers["x-request-id"]


def test_models(client: httpx.Client) -> None:
    r = client.get("/models")
    assert r.status_code == 200
    [model] = r.json()["models"]
    assert set(model) == {"id", "name", "description", "format", "loaded"}
    assert model["id"] == client.get("/health").json()["model"]
    assert model["format"] in ("gguf", "safetensors") and model["loaded"] is True


def test_unknown_route_and_method_give_json_errors(client: httpx.Client) -> None:
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert "/no/such/route" in r.json()["error"]
    r = client.get("/generate")
    assert r.status_code == 405 and isinstance(r.json()["error"], str)


# -- tokenize -------------------------------------------------------------------------------------


def test_tokenize(client: httpx.Client) -> None:
    r = client.post("/tokenize", json={"text": "Hello world", "model_id": None})
    assert r.status_code == 200
    body = r.json()
    assert body["num_tokens"] == len(body["token_ids"]) > 0
    assert all(isinstance(t, int) for t in body["token_ids"])
    assert tokenize(client, "Hello world") == body["token_ids"]


def test_batch_tokenize_keeps_input_order(client: httpx.Client) -> None:
    texts = ["first text", "a second, longer text", "3"]
    r = client.post("/batch/tokenize", json={"texts": texts})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [res["token_ids"] for res in results] == [tokenize(client, t) for t in texts]
    assert [res["num_tokens"] for res in results] == [len(res["token_ids"]) for res in results]


# -- generate -------------------------------------------------------------------------------------


def test_generate_returns_prompt_then_generated_ids(client: httpx.Client) -> None:
    prompt_ids = tokenize(client, PROMPT)
    body = generate(client, prompt=PROMPT, max_tokens=3, strategy="greedy")
    assert 1 <= body["num_generated"] <= 3
    assert body["token_ids"][:len(prompt_ids)] == prompt_ids
    assert len(body["token_ids"]) == len(prompt_ids) + body["num_generated"]
    assert body["text"].startswith(PROMPT)
    # Greedy is deterministic.
    assert generate(client, prompt=PROMPT, max_tokens=3)["token_ids"] == body["token_ids"]


def test_generate_with_zero_max_tokens_returns_the_prompt(client: httpx.Client) -> None:
    body = generate(client, prompt=PROMPT, max_tokens=0)
    assert body["num_generated"] == 0
    assert body["token_ids"] == tokenize(client, PROMPT)


@pytest.mark.parametrize("strategy", [{"strategy": "top_k", "top_k": 5}, {"strategy": "top_p", "top_p": 0.8}])
def test_seeded_sampling_repeats(client: httpx.Client, strategy: dict[str, Any]) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0.9, "seed": 1234, **strategy}
    first = generate(client, **body)
    assert first["num_generated"] >= 1
    assert generate(client, **body)["token_ids"] == first["token_ids"]


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"prompt": ""}, 400, "Prompt cannot be empty"),
    ({"prompt": "x", "strategy": "beam"}, 400, "Invalid strategy: beam"),
    ({"prompt": "x", "model_id": "no-such-model"}, 404, "Model 'no-such-model' not found"),
])
def test_generate_errors_with_the_exact_messages(client: httpx.Client, body: dict[str, Any], status: int,
                                                 message: str) -> None:
    for route in ("/generate", "/stream/generate"):
        r = client.post(route, json={"max_tokens": 1, **body})
        assert r.status_code == status
        assert r.json() == {"error": message}


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"max_tokens": 1}, 422, "prompt"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "x", "max_tokens": "ten"}, 422, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "strategy": "top_k", "temperature": 0}, 400, "temperature"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "seed": "s"}, 422, "seed"),
])
def test_generate_rejects_bad_fields_naming_them(client: httpx.Client, body: dict[str, Any], status: int,
                                                 field: str) -> None:
    r = client.post("/generate", json=body)
    assert r.status_code == status
    assert field in r.json()["error"]


@pytest.mark.parametrize("route", ["/tokenize", "/generate", "/batch/tokenize", "/batch/generate",
                                   "/stream/generate"])
@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_non_json_or_non_object_bodies_are_4xx(client: httpx.Client, route: str, raw: bytes) -> None:
    r = client.post(route, content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)
    assert isinstance(r.json()["error"], str)


# -- batch and stream -----------------------------------------------------------------------------


def test_batch_generate_matches_single_requests_in_order(client: httpx.Client) -> None:
    prompts = ["The sky is", "One, two, three,"]
    r = client.post("/batch/generate", json={"prompts": prompts, "max_tokens": 2})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 2
    for prompt, result in zip(prompts, results, strict=True):
        assert result == generate(client, prompt=prompt, max_tokens=2)


def test_batch_generate_rejects_an_empty_prompt(client: httpx.Client) -> None:
    r = client.post("/batch/generate", json={"prompts": ["fine", ""], "max_tokens": 1})
    assert r.status_code == 400
    assert r.json() == {"error": "Prompt cannot be empty"}
    r = client.post("/batch/generate", json={"prompts": [], "max_tokens": 1})
    assert r.status_code == 400 and "prompts" in r.json()["error"]


def test_stream_generate_sends_tokens_then_done(client: httpx.Client) -> None:
    reads = 0
    raw = b""
    with client.stream("POST", "/stream/generate", json={"prompt": PROMPT, "max_tokens": 4}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for chunk in r.iter_raw():
            reads += 1
            raw += chunk
    events = sse_events(raw.decode())
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"token"}
    tokens = [data for name, data in events if name == "token"]
    assert events[-1][1] == {"num_generated": len(tokens)}
    assert all(set(t) == {"token_id", "text"} for t in tokens)
    # Each token is sent when it exists, not all at the end.
    assert reads > 1
    same = generate(client, prompt=PROMPT, max_tokens=4)
    assert [t["token_id"] for t in tokens] == same["token_ids"][-same["num_generated"]:]
    assert same["text"].endswith("".join(t["text"] for t in tokens))


# -- special tokens -------------------------------------------------------------------------------


def test_tokenize_reads_special_tokens_as_text_unless_asked(client: httpx.Client) -> None:
    as_text = tokenize(client, "<|im_start|>")
    assert len(as_text) > 1 and 1 not in as_text
    r = client.post("/tokenize", json={"text": "<|im_start|>", "parse_special": True})
    assert r.json() == {"token_ids": [1], "num_tokens": 1}
    r = client.post("/batch/tokenize", json={"texts": ["<|im_start|>", "a<|im_end|>"], "parse_special": True,
                                             "add_special": False})
    assert [res["token_ids"] for res in r.json()["results"]] == [[1], [*tokenize(client, "a"), 2]]
    r = client.post("/batch/tokenize", json={"texts": ["<|im_start|>"]})
    assert r.json()["results"][0]["token_ids"] == as_text
    # The prompt of a generation is read the same way.
    assert generate(client, prompt="<|im_start|>", max_tokens=0)["token_ids"] == as_text
    r = client.post("/tokenize", json={"text": "x", "parse_special": "yes"})
    assert r.status_code == 422 and "parse_special" in r.json()["error"]
