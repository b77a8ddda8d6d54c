"""Serving behaviour under stress and misuse, each against a real server process.

Overload, API keys, limits, timeouts, CORS, fault isolation, client disconnects
and the SIGTERM drain (last, since it ends its server).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from tests.conftest import ServerProcess, servers_together, start_server
from tests.faulty_server import FAULT_SEED

API_KEY = "test-secret-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """The module's own servers, started together (a start-up is mostly one core's work: imports and the
    model load) and all ready before the first test, so that no start-up competes with a test.

    overload: four running and four queued at most. guarded: an API key, tight limits, a short request
    timeout and one CORS origin. faulty: tests.faulty_server (requests seeded FAULT_SEED fail in the engine
    step), with a long shutdown timeout for the drain test."""
    started = {
        "overload": start_server(tmp_path_factory.mktemp("overload"), "--max-num-seqs", "4",
                                 "--max-queued-requests", "4", wait_ready=False),
        "guarded": start_server(tmp_path_factory.mktemp("guarded"), "--api-key", API_KEY, "--max-body-bytes", "4096",
                                "--max-batch-size", "4", "--max-tokens-limit", "4000", "--request-timeout", "4",
                                "--cors-origin", "http://allowed.example", wait_ready=False),
        "faulty": start_server(tmp_path_factory.mktemp("faulty"), "--shutdown-timeout", "120",
                               module="tests.faulty_server", wait_ready=False),
    }
    with servers_together(started) as ready:
        yield ready


@pytest.fixture(scope="module")
def guarded(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["guarded"]


@pytest.fixture(scope="module")
def faulty(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["faulty"]


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30, headers=AUTH).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def wait_idle(url: str, timeout: float = 90.0) -> None:
    """Until the engine holds no request and no KV block."""
    deadline = time.monotonic() + timeout
    names = ("realizar_num_requests_running", "realizar_num_requests_waiting", "realizar_kv_cache_usage_ratio")
    values: list[float] = []
    while time.monotonic() < deadline:
        values = [metric(url, n) for n in names]
        if values == [0, 0, 0]:
            return
        time.sleep(0.25)
    raise AssertionError(f"engine not idle after {timeout}s: {dict(zip(names, values, strict=True))}")


def sse_data(body: str) -> list[Any]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


# -- overload ---------------------------------------------------------------------------------------


def test_overload_is_refused_at_once_and_the_server_recovers(servers: dict[str, ServerProcess]) -> None:
    server = servers["overload"]
    try:
        results = asyncio.run(_flood(server.url, 200))
        # Refusals are counted as refusals, not as server failures.
        assert metric(server.url, 'realizar_requests_refused_total{reason="overloaded"}') == \
            sum(status == 503 for status, _, _ in results)
        assert metric(server.url, "realizar_requests_failed") == 0
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        ok = [elapsed for status, elapsed, _ in results if status == 200]
        refused = [(elapsed, headers) for status, elapsed, headers in results if status == 503]
        assert len(ok) >= 8 and len(refused) >= 100, (len(ok), len(refused))
        assert all("retry-after" in headers for _, headers in refused)
        # Refusals come back at once, not after waiting in a queue or for a timeout...
        assert max(elapsed for elapsed, _ in refused) < 5.0
        # ...typically within 100 ms of the server taking the request up (its access log's
        # latency; the client's clock also counts the rest of the burst queued ahead of it).
        server_ms = sorted(float(ms) for ms in re.findall(r"route=/generate status=503 latency_ms=(\S+)",
                                                           server.log()))
        assert len(server_ms) == len(refused)
        assert server_ms[len(server_ms) // 2] < 100, server_ms
        # ...and the server serves normally afterwards.
        r = httpx.post(server.url + "/generate", json={"prompt": "Hello", "max_tokens": 2}, timeout=120)
        assert r.status_code == 200 and r.json()["num_generated"] >= 1
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()


async def _flood(url: str, n: int) -> list[tuple[int, float, dict[str, str]]]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def warm() -> None:
            async with session.get(url + "/health") as r:
                await r.read()

        # Open the connections first, so the burst measures the server, not connection setup.
        await asyncio.gather(*(warm() for _ in range(n)))

        async def one(i: int) -> tuple[int, float, dict[str, str]]:
            started = time.monotonic()
            # Greedy counting never meets end-of-sequence, so admitted requests hold their seats.
            body = {"prompt": f"{i}, {i + 1}, {i + 2}, {i + 3},", "max_tokens": 12}
            async with session.post(url + "/generate", json=body) as r:
                answer = await r.json()
                assert ("error" in answer) == (r.status != 200)
                return r.status, time.monotonic() - started, {k.lower(): v for k, v in r.headers.items()}

        return await asyncio.gather(*(one(i) for i in range(n)))


# -- auth, limits, timeout, CORS --------------------------------------------------------------------


def test_openai_client_with_and_without_the_key(guarded: ServerProcess) -> None:
    with openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with openai.OpenAI(base_url=guarded.url + "/v1", api_key=API_KEY, max_retries=0) as good:
        assert good.models.list().data


def test_body_size_limit(guarded: ServerProcess) -> None:
    big = {"prompt": "x" * 5000, "max_tokens": 1}
    r = httpx.post(guarded.url + "/generate", json=big, headers=AUTH)
    assert r.status_code == 413 and "4096" in r.json()["error"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the server counts what arrives
        yield b'{"text": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(guarded.url + "/tokenize", content=chunked(), headers=AUTH)
    assert r.status_code == 413
    r = httpx.post(guarded.url + "/v1/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["message"]


def test_batch_and_max_tokens_limits(guarded: ServerProcess) -> None:
    for route, body in (("/batch/generate", {"prompts": ["a"] * 5, "max_tokens": 1}),
                        ("/batch/tokenize", {"texts": ["a"] * 5})):
        r = httpx.post(guarded.url + route, json=body, headers=AUTH)
        assert r.status_code == 400 and "limit is 4" in r.json()["error"]
    r = httpx.post(guarded.url + "/generate", json={"prompt": "x", "max_tokens": 4001}, headers=AUTH)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]
    r = httpx.post(guarded.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4001}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_request_timeout_aborts_and_answers_504(guarded: ServerProcess) -> None:
    long = {"prompt": "Tell me a story.", "max_tokens": 4000, "ignore_eos": True}
    started = time.monotonic()
    # whole and streamed at once: each waits out the same --request-timeout
    with ThreadPoolExecutor(2) as pool:
        whole, streamed = pool.map(lambda body: httpx.post(guarded.url + "/v1/completions", json=body, headers=AUTH,
                                                           timeout=120), [long, {**long, "stream": True}])
    r = whole
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert time.monotonic() - started < 60
    r = streamed
    assert r.status_code == 200
    assert sse_data(r.text)[-1]["error"]["code"] == "timeout"
    assert r.text.endswith("data: [DONE]\n\n")
    wait_idle(guarded.url)


def test_cors_only_for_configured_origins(guarded: ServerProcess) -> None:
    preflight = {"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(guarded.url + "/generate", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://allowed.example"
    r = httpx.get(guarded.url + "/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_is_off_by_default(server_url: str) -> None:
    r = httpx.get(server_url + "/health", headers={"Origin": "http://allowed.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# -- fault isolation --------------------------------------------------------------------------------


def test_a_failing_request_fails_alone(faulty: ServerProcess) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=faulty.url, timeout=120) as c:
            body = {"prompt": "Hello there", "max_tokens": 3}
            return await asyncio.gather(
                c.post("/generate", json={**body, "seed": FAULT_SEED}),
                c.post("/generate", json=body),
                c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}),
            )

    failed, ok, ok_v1 = asyncio.run(run())
    assert failed.status_code == 500
    rid = failed.headers["x-request-id"]
    message = failed.json()["error"]
    assert rid in message
    assert "Traceback" not in failed.text and ".py" not in failed.text
    assert rid in faulty.log()
    assert ok.status_code == 200 and ok.json()["num_generated"] >= 1
    assert ok_v1.status_code == 200
    r = httpx.post(faulty.url + "/v1/chat/completions", timeout=120,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "seed": FAULT_SEED})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
    r = httpx.post(faulty.url + "/stream/generate", json={"prompt": "Hi", "max_tokens": 2, "seed": FAULT_SEED},
                   timeout=120)
    assert r.status_code == 200 and "event: error" in r.text and "event: done" not in r.text
    assert httpx.get(faulty.url + "/health").json()["status"] == "healthy"
    wait_idle(faulty.url)


# -- disconnects ------------------------------------------------------------------------------------


def test_client_disconnects_abort_and_free_everything(server_url: str) -> None:
    tokens_before = metric(server_url, "realizar_generation_tokens_total")
    aborted_before = metric(server_url, "realizar_requests_aborted_total")
    failed_before = metric(server_url, "realizar_requests_failed")
    long = 150
    asyncio.run(_disconnect_midway(server_url, long))
    wait_idle(server_url)
    # 16 requests of `long` tokens each were cut short, so far fewer tokens were generated.
    assert metric(server_url, "realizar_generation_tokens_total") - tokens_before < 16 * long / 2
    # A client that leaves is counted as an abort (499), not as a server failure.
    assert metric(server_url, "realizar_requests_aborted_total") - aborted_before == 16
    assert metric(server_url, "realizar_requests_failed") == failed_before


async def _disconnect_midway(url: str, max_tokens: int) -> None:
    started = asyncio.Event()
    streamed = 0

    async def stream(session: aiohttp.ClientSession, route: str, body: dict[str, Any]) -> None:
        nonlocal streamed
        async with session.post(url + route, json={**body, "stream": True} if route.startswith("/v1") else body) as r:
            assert r.status == 200
            async for _ in r.content.iter_any():
                streamed += 1
                if streamed >= 8:
                    started.set()
                await asyncio.sleep(0)

    async def plain(session: aiohttp.ClientSession, route: str, body: dict[str, Any]) -> None:
        async with session.post(url + route, json=body) as r:
            await r.read()
        raise AssertionError(f"{route} finished although it was to be cancelled")

    counting = "1, 2, 3, 4, 5, 6, 7,"  # greedy keeps counting: no early end of sequence
    native = {"prompt": counting, "max_tokens": max_tokens}
    v1 = {"prompt": counting, "max_tokens": max_tokens, "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        tasks = [asyncio.create_task(coro) for coro in (
            *(stream(session, "/stream/generate", native) for _ in range(4)),
            *(stream(session, "/v1/completions", v1) for _ in range(4)),
            *(plain(session, "/v1/completions", v1) for _ in range(8)),
        )]
        await asyncio.wait_for(started.wait(), timeout=120)
        assert metric(url, "realizar_num_requests_running") + metric(url, "realizar_num_requests_waiting") > 0
        for task in tasks:
            task.cancel()  # closes each connection mid-request
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results


# -- long conversations and chat templates ------------------------------------------------------------


def test_more_messages_than_the_limit_is_a_400(server_url: str) -> None:
    messages = [{"role": "user", "content": ""}] * 1025  # the default --max-messages is 1024
    r = httpx.post(server_url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages" and "1024" in error["message"]


def test_health_answers_while_long_conversations_render(server_url: str) -> None:
    async def run() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=server_url, timeout=120) as c:
            # ~15k tokens once rendered: past the context, so each ends in a 400 once rendered and tokenized
            body = {"messages": [{"role": "user", "content": "one two three four five six seven"}] * 1024,
                    "max_tokens": 1}
            chats = [asyncio.create_task(c.post("/v1/chat/completions", json=body)) for _ in range(8)]
            health: list[int] = []
            while not all(t.done() for t in chats):
                health.append((await c.get("/health")).status_code)
            return [(await t).status_code for t in chats], health

    chats, health = asyncio.run(run())
    assert set(chats) == {400}, chats
    assert health and set(health) == {200}


def test_a_malformed_tool_call_is_named(server_url: str) -> None:
    # A well-formed tool call with null content renders (test_openai_api); one without its function is
    # the client's 400, naming the field, before any template sees it.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]}]
    r = httpx.post(server_url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages[2].tool_calls[0].function" and error["param"] in error["message"]
    assert "Undefined" not in error["message"] and "dict object" not in error["message"]


# -- start-up ---------------------------------------------------------------------------------------


def test_a_busy_port_is_one_sentence_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = start_server(tmp_path, "--port", str(port), wait_ready=False)
        assert server.proc.wait(timeout=120) == 1
    log = server.log()
    assert "already in use" in log and "Traceback" not in log


# -- SIGTERM drain (last: it ends the faulty server) ---------------------------------------------------


def test_sigterm_drains_in_flight_requests_then_exits_0(faulty: ServerProcess) -> None:
    async def run() -> tuple[list[Any], int]:
        async with httpx.AsyncClient(base_url=faulty.url, timeout=180) as c:
            first_token = asyncio.Event()

            async def stream() -> str:
                body = ""
                async with c.stream("POST", "/stream/generate", json={"prompt": "Once upon a time", "max_tokens": 6}) as r:
                    assert r.status_code == 200
                    async for text in r.aiter_text():
                        body += text
                        first_token.set()
                return body

            async def plain() -> httpx.Response:
                # long enough that the server is still draining when the late request comes
                return await c.post("/v1/completions", json={"prompt": "Once", "max_tokens": 200, "ignore_eos": True})

            tasks = [asyncio.create_task(stream()), asyncio.create_task(stream()),
                     asyncio.create_task(plain()), asyncio.create_task(plain())]
            await asyncio.wait_for(first_token.wait(), timeout=120)
            faulty.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            refused = await c.post("/generate", json={"prompt": "late", "max_tokens": 1})
            return list(await asyncio.gather(*tasks)), refused.status_code

    (stream1, stream2, plain1, plain2), refused = asyncio.run(run())
    assert refused == 503
    for body in (stream1, stream2):
        assert "event: done" in body and "event: error" not in body
    for r in (plain1, plain2):
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 200
    assert faulty.proc.wait(timeout=120) == 0
