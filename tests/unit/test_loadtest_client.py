"""Failure classification against real in-test socket servers, for both clients."""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest

from realizar.loadtest.client import AiohttpClient, RawClient, make_client
from realizar.loadtest.config import LoadTestConfig
from realizar.loadtest.runner import RunOptions, run_scenario, run_sync
from realizar.loadtest.scenarios import Phase, Scenario
from realizar.loadtest.stats import FailureClass, RequestRecord
from realizar.loadtest.workload import Check, RequestSpec, ResponseKind, check_tokenize

CLIENTS = ("raw", "aiohttp")
_COUNTER = itertools.count()


def _response(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (status, len(body), extra)) + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
TOKEN = _chunk(b'event: token\ndata: {"token_id": 1, "text": "a"}\n\n')
DONE = _chunk(b'event: done\ndata: {"num_generated": 3}\n\n')


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER on with a zero timeout."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _faulty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers by path: status codes, resets, stalls, cut and unterminated streams."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":")[1]))
            if path.startswith("/status/"):
                code = int(path.rsplit("/", 1)[1])
                writer.write(_response(code, b'{"error": "nope"}', b"Retry-After: 1\r\n" if code == 503 else b""))
            elif path == "/ok":
                writer.write(_response(200, b'{"status": "healthy"}'))
            elif path == "/tokenize_bad":
                writer.write(_response(200, b'{"tokens": "not what you asked for"}'))
            elif path == "/not_json":
                writer.write(_response(200, b"<html>oops</html>"))
            elif path == "/reset":
                _reset(writer)
                return
            elif path == "/close":
                writer.close()
                return
            elif path == "/stall":
                await asyncio.sleep(30)
            elif path == "/short_body":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"status\":")
                await writer.drain()
                writer.close()
                return
            elif path == "/sse_ok":
                writer.write(SSE_HEAD + TOKEN * 3 + DONE + b"0\r\n\r\n")
            elif path == "/sse_cut":
                writer.write(SSE_HEAD + TOKEN * 2)
                await writer.drain()
                await asyncio.sleep(0.05)
                _reset(writer)
                return
            elif path == "/sse_no_done":
                writer.write(SSE_HEAD + TOKEN * 2 + b"0\r\n\r\n")
            elif path == "/sse_stall":
                writer.write(SSE_HEAD + TOKEN)
                await writer.drain()
                await asyncio.sleep(30)
            elif path == "/sse_wrong_count":
                writer.write(SSE_HEAD + TOKEN * 2 + DONE + b"0\r\n\r\n")
            elif path == "/openai_ok":
                piece = _chunk(b'data: {"choices": [{"index": 0, "text": " a"}]}\n\n')
                usage = _chunk(b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}\n\n')
                writer.write(SSE_HEAD + piece * 4 + usage + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            elif path == "/openai_no_done":
                piece = _chunk(b'data: {"choices": [{"index": 0, "text": " a"}]}\n\n')
                writer.write(SSE_HEAD + piece * 2 + b"0\r\n\r\n")
            elif path == "/every_fourth_503":
                busy = next(_COUNTER) % 4 == 0
                writer.write(_response(503, b'{"error": "busy"}') if busy else _response(200, b'{"status": "ok"}'))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        return


@asynccontextmanager
async def faulty_server() -> AsyncIterator[str]:
    server = await asyncio.start_server(_faulty, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


def send_one(kind: str, path: str, *, stream: ResponseKind = ResponseKind.JSON, check: Check | None = None,
             timeout: float = 5.0, connect_timeout: float = 2.0, url: str | None = None) -> RequestRecord:
    async def go() -> RequestRecord:
        async with faulty_server() as base:
            client = make_client(kind, url or base, max_connections=2, timeout=timeout,  # type: ignore[arg-type]
                                 connect_timeout=connect_timeout)
            try:
                spec = RequestSpec("GET", path, None, stream, check)
                return await client.send(client.prepare(spec), 0, time.perf_counter())
            finally:
                await client.aclose()
    return run_sync(go)


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize(("code", "expected"), [
    (503, FailureClass.HTTP_503), (429, FailureClass.HTTP_429),
    (404, FailureClass.HTTP_4XX), (500, FailureClass.HTTP_5XX),
])
def test_http_status_classes(kind: str, code: int, expected: FailureClass) -> None:
    rec = send_one(kind, f"/status/{code}")
    assert rec.status == code
    assert rec.failure is expected
    assert not rec.ok


@pytest.mark.parametrize("kind", CLIENTS)
def test_success_is_not_a_failure(kind: str) -> None:
    rec = send_one(kind, "/ok")
    assert rec.ok and rec.status == 200 and rec.failure is None
    assert rec.end >= rec.sent


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("path", ["/reset", "/close"])
def test_reset_and_close_before_response(kind: str, path: str) -> None:
    rec = send_one(kind, path)
    assert rec.failure is FailureClass.CONNECTION_ERROR, rec.error


@pytest.mark.parametrize("kind", CLIENTS)
def test_connection_refused(kind: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        rec = send_one(kind, "/ok", url=f"http://127.0.0.1:{port}")
    assert rec.failure is FailureClass.CONNECTION_ERROR
    assert rec.status == 0


@pytest.mark.parametrize("kind", CLIENTS)
def test_stall_is_a_total_timeout(kind: str) -> None:
    rec = send_one(kind, "/stall", timeout=0.3)
    assert rec.failure is FailureClass.TOTAL_TIMEOUT
    assert 0.25 <= rec.end - rec.sent < 5.0


@pytest.mark.parametrize("kind", CLIENTS)
def test_stalled_stream_is_a_total_timeout(kind: str) -> None:
    rec = send_one(kind, "/sse_stall", stream=ResponseKind.SSE_NATIVE, timeout=0.3)
    assert rec.failure is FailureClass.TOTAL_TIMEOUT


@pytest.mark.parametrize("kind", CLIENTS)
def test_connect_timeout(kind: str) -> None:
    # a listener that never accepts, its backlog already full: SYNs go unanswered
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    try:
        rec = send_one(kind, "/ok", url=f"http://127.0.0.1:{port}", timeout=5.0, connect_timeout=0.3)
    finally:
        for c in fillers:
            c.close()
        srv.close()
    assert rec.failure is FailureClass.CONNECT_TIMEOUT, rec.error


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("path", ["/sse_cut", "/sse_no_done", "/short_body"])
def test_truncated_streams(kind: str, path: str) -> None:
    stream = ResponseKind.JSON if path == "/short_body" else ResponseKind.SSE_NATIVE
    rec = send_one(kind, path, stream=stream)
    assert rec.failure is FailureClass.TRUNCATED_STREAM, (rec.failure, rec.error)


@pytest.mark.parametrize("kind", CLIENTS)
def test_openai_stream_without_done_is_truncated(kind: str) -> None:
    rec = send_one(kind, "/openai_no_done", stream=ResponseKind.SSE_OPENAI)
    assert rec.failure is FailureClass.TRUNCATED_STREAM


@pytest.mark.parametrize("kind", CLIENTS)
def test_complete_native_stream_records_tokens_and_chunk_times(kind: str) -> None:
    rec = send_one(kind, "/sse_ok", stream=ResponseKind.SSE_NATIVE)
    assert rec.ok, rec.error
    assert rec.output_tokens == 3
    assert rec.chunk_times is not None and len(rec.chunk_times) == 3
    assert rec.first_token is not None and rec.sent <= rec.first_token <= rec.end


@pytest.mark.parametrize("kind", CLIENTS)
def test_openai_stream_uses_usage_counts(kind: str) -> None:
    rec = send_one(kind, "/openai_ok", stream=ResponseKind.SSE_OPENAI)
    assert rec.ok, rec.error
    assert rec.output_tokens == 4 and rec.input_tokens == 7
    assert rec.chunk_times is not None and len(rec.chunk_times) == 4


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("path", ["/tokenize_bad", "/not_json"])
def test_content_check_failures(kind: str, path: str) -> None:
    rec = send_one(kind, path, check=check_tokenize)
    assert rec.status == 200
    assert rec.failure is FailureClass.CONTENT_CHECK


@pytest.mark.parametrize("kind", CLIENTS)
def test_stream_whose_done_disagrees_fails_content_check(kind: str) -> None:
    rec = send_one(kind, "/sse_wrong_count", stream=ResponseKind.SSE_NATIVE)
    assert rec.failure is FailureClass.CONTENT_CHECK


@pytest.mark.parametrize("kind", CLIENTS)
def test_runner_counts_error_rate_and_classes(kind: str) -> None:
    """40 requests, every fourth answered 503: 25 % errors, all in the 503 class."""
    global _COUNTER
    _COUNTER = itertools.count()

    async def go() -> tuple[int, int, float, dict[str, int], float]:
        async with faulty_server() as base:
            cfg = LoadTestConfig(concurrency=4, total_requests=40, timeout=5.0, base_url=base)
            sc = Scenario("t", "T", "", (Phase("main", "T", cfg),),
                          lambda i: RequestSpec("GET", "/every_fourth_503"))
            r = await run_scenario(sc, RunOptions(client=kind, scrape_metrics=False))  # type: ignore[arg-type]
            s = r.overall
            return s.total_requests, s.failures, s.error_rate_pct, s.failures_by_class, s.throughput_rps

    total, failures, rate, classes, throughput = run_sync(go)
    assert total == 40 and failures == 10
    assert rate == pytest.approx(25.0)
    assert classes["http_503"] == 10 and sum(classes.values()) == 10
    assert throughput > 0


def test_raw_client_reuses_connections() -> None:
    async def go() -> int:
        async with faulty_server() as base:
            client = RawClient(base, max_connections=1, timeout=5.0)
            try:
                req = client.prepare(RequestSpec("GET", "/ok"))
                for i in range(20):
                    assert (await client.send(req, i, 0.0)).ok
                return len(client._all)
            finally:
                await client.aclose()

    assert run_sync(go) == 1


def test_make_client_picks_by_scheme() -> None:
    async def go() -> tuple[type, type]:
        a = make_client("auto", "http://127.0.0.1:9", max_connections=1, timeout=1.0)
        b = make_client("auto", "https://127.0.0.1:9", max_connections=1, timeout=1.0)
        await a.aclose()
        await b.aclose()
        return type(a), type(b)

    assert run_sync(go) == (RawClient, AiohttpClient)


def test_a_stopped_stream_ends_at_its_next_chunk_with_what_arrived() -> None:
    """The benchmarks close their background streams this way (``AiohttpClient.send(stop=...)``)."""
    async def go() -> RequestRecord:
        async with faulty_server() as base:
            client = AiohttpClient(base, max_connections=2, timeout=20.0, keep_alive=False)
            try:
                stop = asyncio.Event()
                stop.set()  # the stream stalls after its first token: only the stop can end it early
                req = client.prepare(RequestSpec("GET", "/sse_stall", None, ResponseKind.SSE_NATIVE))
                return await client.send(req, 0, time.perf_counter(), stop=stop)
            finally:
                await client.aclose()

    rec = run_sync(go)
    # truncated, not a total timeout: the stop ended it, with the one token that had arrived
    assert rec.failure is FailureClass.TRUNCATED_STREAM
    assert rec.chunk_times is not None and len(rec.chunk_times) == 1 and rec.output_tokens == 1
