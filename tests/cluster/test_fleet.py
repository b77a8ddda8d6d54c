"""A fleet of two replicas on a local Ray (`realizar serve --demo --replicas 2`) against one server with the
same settings: the same answers on every route, sessions kept on one replica, fleet metrics, and a replica
killed with SIGKILL under load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import httpx
import pytest

from tests.cluster.conftest import API_KEY, AUTH, ENGINE_ARGS, ENGINE_ENV, metric, start_fleet, wait_replicas
from tests.conftest import ServerProcess, start_server

pytest.importorskip("ray.serve", reason="the Ray tests need the 'ray' extra: pip install 'realizar[ray]'")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT = "The capital of France is"
VOLATILE = frozenset({"id", "created", "system_fingerprint"})  # differ between any two responses


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """The fleet and the single server, started together: each spends much of its start-up waiting
    (Ray's daemons, the replicas' placement), which the other's start-up fills."""
    fleet = start_fleet(tmp_path_factory.mktemp("fleet"), "--replicas", "2", "--api-key", API_KEY,
                        "--metrics-compat", "vllm", "--max-queued-requests", "4", wait_ready=False)
    single = start_server(tmp_path_factory.mktemp("single"), "--api-key", API_KEY, *ENGINE_ARGS, env=ENGINE_ENV,
                          wait_ready=False)
    try:
        single.wait_until_ready()
        fleet.wait_until_ready()
        wait_replicas(fleet.url, 2)
        yield fleet, single
    finally:
        single.stop()
        assert fleet.stop(90, whole_group=False) == 0, fleet.log()[-3000:]


@pytest.fixture(scope="module")
def fleet(servers: tuple[ServerProcess, ServerProcess]) -> ServerProcess:
    return servers[0]


@pytest.fixture(scope="module")
def single(servers: tuple[ServerProcess, ServerProcess]) -> ServerProcess:
    return servers[1]


def normalized(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: normalized(v) for k, v in body.items() if k not in VOLATILE}
    if isinstance(body, list):
        return [normalized(v) for v in body]
    return body


def parsed(r: httpx.Response) -> Any:
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = []
        for block in r.text.strip().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            data = lines.get("data", "")
            events.append((lines.get("event"), data if data == "[DONE]" else normalized(json.loads(data))))
        return events
    return normalized(r.json())


def requests_table(model: str) -> list[tuple[str, str, Any]]:
    chat = [{"role": "user", "content": "Name a colour."}]
    return [
        ("GET", "/models", None),
        ("GET", "/v1/models", None),
        ("POST", "/tokenize", {"text": PROMPT}),
        ("POST", "/detokenize", {"token_ids": [504, 3575, 282, 4649, 314]}),
        ("POST", "/batch/tokenize", {"texts": [PROMPT, "Hello"]}),
        ("POST", "/generate", {"prompt": PROMPT, "max_tokens": 8}),
        ("POST", "/batch/generate", {"prompts": [PROMPT, "Hello"], "max_tokens": 4}),
        ("POST", "/stream/generate", {"prompt": PROMPT, "max_tokens": 8}),
        ("POST", "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}),
        ("POST", "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 8, "stream": True,
                                     "stream_options": {"include_usage": True}, "temperature": 0}),
        ("POST", "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 8, "seed": 7}),
        ("POST", "/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 8, "logprobs": True,
                                          "temperature": 0}),
        ("POST", "/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 8, "stream": True,
                                          "temperature": 0}),
        # errors keep their statuses and bodies
        ("POST", "/generate", {"prompt": "", "max_tokens": 2}),
        ("POST", "/v1/completions", {"model": model, "prompt": "x", "n": 0}),
        ("POST", "/v1/chat/completions", {"model": "no-such-model", "messages": chat}),
        ("GET", "/no/such/route", None),
        ("POST", "/v1/chat/completions", b"{oops"),
    ]


def send(url: str, method: str, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else None
    data = None if body is None or isinstance(body, bytes) else body
    return httpx.request(method, url + path, json=data, content=content, headers={**AUTH, **(headers or {})},
                         timeout=120)


def test_every_route_answers_as_the_single_server(fleet: ServerProcess, single: ServerProcess) -> None:
    model = send(single.url, "GET", "/v1/models", None).json()["data"][0]["id"]
    for method, path, body in requests_table(model):
        one, many = send(single.url, method, path, body), send(fleet.url, method, path, body)
        assert many.status_code == one.status_code, (path, body, many.text)
        assert parsed(many) == parsed(one), (path, body)
        if path.startswith("/v1/") or path in ("/generate", "/stream/generate"):
            assert many.headers.get("x-realizar-replica"), path


def test_the_front_keeps_the_edge_contract(fleet: ServerProcess, single: ServerProcess) -> None:
    for url in (single.url, fleet.url):
        denied = httpx.post(url + "/generate", json={"prompt": PROMPT, "max_tokens": 1})
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert denied.json() == {"error": "Missing or invalid API key"}
        assert httpx.get(url + "/metrics").status_code == 401
        health, ready = httpx.get(url + "/health"), httpx.get(url + "/ready")  # open routes: probes carry no key
        assert health.status_code == 200 and health.json()["status"] == "healthy"
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert httpx.get(fleet.url + "/health").json()["replicas"] == {"ready": 2, "total": 2}
    for url in (single.url, fleet.url):  # a client's request id comes back once
        r = send(url, "POST", "/tokenize", {"text": "a"}, {"X-Request-Id": "client-id-7"})
        assert r.headers.get_list("x-request-id") == ["client-id-7"]
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    for url in (single.url, fleet.url):
        r = httpx.post(url + "/generate", content=big, headers=AUTH)
        assert r.status_code == 413 and "larger than the limit" in r.json()["error"]


def test_fleet_metrics_label_replicas_and_add_vllm_names(fleet: ServerProcess) -> None:
    assert send(fleet.url, "POST", "/generate", {"prompt": PROMPT, "max_tokens": 2}).status_code == 200
    text = send(fleet.url, "GET", "/metrics", None).text
    ids = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
           if line.startswith("realizar_cluster_replica_info{")}
    assert len(ids) == 2
    for rid in ids:
        assert metric(text, "realizar_uptime_seconds", replica=rid) > 0
    waiting = [line for line in text.splitlines() if line.startswith("vllm:num_requests_waiting{")]
    assert len(waiting) == 3  # the fleet's, and one per replica
    assert metric(text, "realizar_cluster_replicas", state="ready") == 2
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert any(line.startswith(name + "{") for line in text.splitlines())


def run_sessions(url: str, sessions: int, turns: int, use_session_header: bool) -> list[set[str]]:
    """Multi-turn chats (each turn resends the conversation), the sessions side by side as a fleet's
    clients are (the server batches them); returns the replicas each session saw."""
    def session(k: int) -> set[str]:
        history = [{"role": "system", "content": f"Session {k}. You are a terse assistant who answers "
                                                 "in a few words about geography and history."}]
        replicas: set[str] = set()
        for t in range(turns):
            history.append({"role": "user", "content": f"Question {t} of session {k}: name a city."})
            headers = {"x-session-id": f"s-{k}"} if use_session_header else {}
            r = send(url, "POST", "/v1/chat/completions", {"messages": history, "max_tokens": 8}, headers)
            assert r.status_code == 200, r.text
            replicas.add(r.headers.get("x-realizar-replica", "single"))
            history.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
        return replicas

    with ThreadPoolExecutor(max_workers=sessions) as pool:
        return list(pool.map(session, range(sessions)))


def cache_counters(url: str) -> tuple[float, float, float]:
    text = send(url, "GET", "/metrics", None).text
    return (metric(text, "realizar_prefix_cache_hits_total"), metric(text, "realizar_prefix_cache_queries_total"),
            metric(text, "realizar_requests_total"))


def settled_counters(url: str, requests: float, timeout: float = 20.0) -> tuple[float, float]:
    """The fleet's cache counters once every replica's stats include ``requests`` requests (the front's view
    of the replicas' /metrics refreshes every second or so)."""
    deadline = time.monotonic() + timeout
    while True:
        hits, queries, total = cache_counters(url)
        if total >= requests or time.monotonic() > deadline:
            assert total >= requests, (total, requests)
            return hits, queries
        time.sleep(0.5)


def test_sessions_stay_on_one_replica_and_keep_the_cache_hit_rate(fleet: ServerProcess,
                                                                 single: ServerProcess) -> None:
    sessions, turns = 4, 4
    rates = []
    for url, with_header in ((single.url, False), (fleet.url, True)):
        hits0, queries0, total0 = cache_counters(url)
        seen = run_sessions(url, sessions, turns, with_header)
        hits, queries = settled_counters(url, total0 + sessions * turns)
        rates.append((hits - hits0) / (queries - queries0))
        if with_header:
            assert all(len(s) == 1 for s in seen), seen  # (which replica a new session gets is random)
    single_rate, fleet_rate = rates
    assert single_rate > 0.3, rates
    assert fleet_rate >= 0.8 * single_rate, rates


def test_a_client_that_leaves_aborts_its_generation_on_the_replica(fleet: ServerProcess) -> None:
    def aborted() -> float:  # engine requests finished by an abort, fleet-wide (no series before the first)
        text = send(fleet.url, "GET", "/metrics", None).text
        return metric(text, "realizar_request_success_total", finished_reason="abort") \
            if 'finished_reason="abort"' in text else 0.0

    before = aborted()
    body = {"prompt": "Tell a very long story", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", fleet.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        assert sum(1 for _, line in zip(range(4), lines, strict=False) if line.startswith("data: ")) >= 1
    deadline = time.monotonic() + 20
    while aborted() <= before:  # the front's cancel reaches the replica, whose app aborts the engine request
        assert time.monotonic() < deadline, "the generation was not aborted"
        time.sleep(0.5)


def test_overload_is_a_503_with_retry_after_as_on_one_server(fleet: ServerProcess) -> None:
    async def burst() -> list[tuple[int, str, str | None]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            async def one(i: int) -> tuple[int, str, str | None]:
                body = {"prompt": f"Burst {i}: write a list of fruits", "max_tokens": 12, "ignore_eos": True}
                async with session.post(fleet.url + "/generate", json=body, headers=AUTH) as r:
                    return r.status, await r.text(), r.headers.get("retry-after")
            return await asyncio.gather(*(one(i) for i in range(40)))

    before = metric(send(fleet.url, "GET", "/metrics", None).text, "realizar_cluster_retries_total")
    results = asyncio.run(burst())  # 40 at once against 2 x (4 running + 4 queued)
    refused = [(body, retry) for status, body, retry in results if status == 503]
    assert {status for status, _, _ in results} == {200, 503}, results[:3]
    for body, retry in refused:
        assert json.loads(body)["error"].startswith("Server overloaded") and retry is not None
    after = metric(send(fleet.url, "GET", "/metrics", None).text, "realizar_cluster_retries_total")
    assert after > before  # a full replica's refusal was first tried on the other one


async def _stream(session: aiohttp.ClientSession, url: str, key: str, out: dict[str, dict[str, Any]],
                  tokens: int, pinned_to: str) -> None:
    """One streamed completion of ``tokens`` tokens, its session pinned (``x-session-id``) with the others of
    ``pinned_to``; what it saw goes to ``out[key]``."""
    body = {"prompt": f"Story {key}: in a small village by the sea there lived an old fisherman who",
            "max_tokens": tokens, "ignore_eos": True, "stream": True}
    record: dict[str, Any] = {"replica": None, "events": 0, "done": False, "error": None, "finish": None}
    out[key] = record
    async with session.post(url + "/v1/completions", json=body, headers={**AUTH, "x-session-id": pinned_to}) as r:
        record["status"] = r.status
        record["replica"] = r.headers.get("x-realizar-replica")
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                record["done"] = True
            elif b'"error"' in payload:
                record["error"] = json.loads(payload)["error"]
            else:
                record["events"] += 1
                record["finish"] = json.loads(payload)["choices"][0]["finish_reason"] or record["finish"]


def test_a_replica_killed_under_load_fails_only_its_own_streams(fleet: ServerProcess) -> None:
    """The victim holds 4 long streams, running (its --max-num-seqs), and 2 short requests queued behind them;
    the other replica 2 short streams. Sessions place them: the victim's first stream picks a replica, the
    rest of its session follows. Its queued requests stay queued until a long stream ends, long after the
    kill, so the kill never races the queue; and what is left after it is short."""
    long, short = 1000, 48

    async def started(out: dict[str, dict[str, Any]], keys: list[str]) -> None:
        while not all(out.get(k, {}).get("replica") for k in keys):  # its response began: admitted, running
            await asyncio.sleep(0.05)

    async def scenario() -> tuple[dict[str, dict[str, Any]], str, float, float]:
        out: dict[str, dict[str, Any]] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as session:
            async def replica_metrics() -> str:
                return await (await session.get(fleet.url + "/metrics", headers=AUTH)).text()

            retries0 = metric(await replica_metrics(), "realizar_cluster_retries_total")
            tasks = [asyncio.create_task(_stream(session, fleet.url, "running-0", out, long, "victim"))]
            await started(out, ["running-0"])
            victim = out["running-0"]["replica"]
            tasks += [asyncio.create_task(_stream(session, fleet.url, f"running-{i}", out, long, "victim"))
                      for i in (1, 2, 3)]
            await started(out, [f"running-{i}" for i in (1, 2, 3)])
            tasks += [asyncio.create_task(_stream(session, fleet.url, f"queued-{i}", out, short, "victim"))
                      for i in (0, 1)]
            tasks += [asyncio.create_task(_stream(session, fleet.url, f"other-{i}", out, short, "other"))
                      for i in (0, 1)]
            pid, deadline = 0, time.monotonic() + 60
            while not pid:  # the victim's queue as its /metrics shows it (the front's view is a second old)
                assert time.monotonic() < deadline, "the victim's queued requests never showed in /metrics"
                await asyncio.sleep(0.25)
                text = await replica_metrics()
                if metric(text, "realizar_num_requests_waiting", replica=victim) > 0:
                    info = next(line for line in text.splitlines()
                                if line.startswith("realizar_cluster_replica_info{") and f'replica="{victim}"' in line)
                    pid = int(info.split('pid="')[1].split('"')[0])
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            await asyncio.gather(*tasks)  # the client timeout turns a hang into a failure
            return out, victim, killed_at, metric(await replica_metrics(), "realizar_cluster_retries_total") - retries0

    out, victim, killed_at, retried = asyncio.run(scenario())
    for key, r in out.items():
        if key.startswith("running-"):  # the victim's running streams end with an error event
            assert r["replica"] == victim and r["status"] == 200 and r["done"], r
            assert r["error"] is not None and r["error"]["code"] == "replica_failed", r
            assert r["events"] < long, r
        else:  # the victim's queued requests, retried on the other replica, and that replica's own streams
            assert r["error"] is None and r["status"] == 200 and r["done"], r
            assert r["finish"] == "length" and r["replica"] != victim, r
    assert retried >= 2, "the victim's queued requests were retried"
    wait_replicas(fleet.url, 2, timeout=120)  # Ray replaces the dead replica
    assert time.monotonic() > killed_at
    r = send(fleet.url, "POST", "/generate", {"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200
