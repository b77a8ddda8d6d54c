"""Connection limits and timeouts that end sockets, with raw sockets against real server processes.

One server with small limits serves most tests (each a second or two); the file descriptor
limit and SIGTERM with clients that never read get servers of their own.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ServerProcess, servers_together, start_server

LIMIT_FLAGS = ("--idle-timeout", "1", "--header-timeout", "1", "--body-timeout", "1", "--max-connections", "16",
               "--max-header-bytes", "8192", "--max-headers", "20", "--request-timeout", "3",
               "--max-body-bytes", "4000000")
BIG_TEXT = "\u9f98" * 600_000  # 1.8 MB of JSON in, ~3.6 MB of token ids out: more than the socket buffers hold


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """The module's servers, started together (a start-up is mostly one core's work: imports and the
    model load) and all ready before the first test, so that no start-up competes with a test.

    limited: small limits, for most tests. low_fds: 256 file descriptors. stuck_readers: a short shutdown
    timeout and a long request timeout, for the SIGTERM test (which ends it)."""
    started = {
        "limited": start_server(tmp_path_factory.mktemp("limited"), *LIMIT_FLAGS, wait_ready=False),
        "low_fds": start_server(tmp_path_factory.mktemp("low_fds"), preexec_fn=_low_fd_limit, wait_ready=False),
        "stuck_readers": start_server(tmp_path_factory.mktemp("stuck_readers"), "--shutdown-timeout", "3",
                                      "--request-timeout", "600", "--max-body-bytes", "4000000", wait_ready=False),
    }
    with servers_together(started) as ready:
        yield ready


@pytest.fixture(scope="module")
def limited(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["limited"]


def connect(server: ServerProcess, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # a small window, so that a client that does not read blocks the server's sends
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def metric(server: ServerProcess, sample: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    values = [float(v) for v in re.findall(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)]
    assert values, sample
    return values[0]


def wait_for_connections(server: ServerProcess, count: int, timeout: float = 60.0) -> None:
    """Until the server holds ``count`` connections besides the one asking."""
    deadline = time.monotonic() + timeout
    while metric(server, "realizar_http_connections") - 1 != count:
        assert time.monotonic() < deadline, "the server kept the connection open"
        time.sleep(0.2)


# -- before the request reaches the app ----------------------------------------------------------------


def test_an_idle_connection_is_closed(limited: ServerProcess) -> None:
    with connect(limited) as sock:
        assert read_until_closed(sock) == b""  # closed without a word: nothing was asked
    with connect(limited) as sock:  # stray line breaks begin no request and do not keep it open
        sock.sendall(b"\r\n")
        assert read_until_closed(sock) == b""


def test_a_keep_alive_connection_is_closed_when_idle(limited: ServerProcess) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _ = status_and_body(read_until_closed(sock))
        assert status == 200


def test_headers_that_never_end_get_408(limited: ServerProcess) -> None:
    before = metric(limited, 'realizar_connections_rejected_total{reason="header_timeout"}')
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        status, body = status_and_body(read_until_closed(sock))
    assert status == 408 and "headers" in json.loads(body)["error"]
    assert metric(limited, 'realizar_connections_rejected_total{reason="header_timeout"}') == before + 1


def test_a_body_shorter_than_its_length_gets_408(limited: ServerProcess) -> None:
    before = metric(limited, "realizar_requests_client_errors_total")
    failed = metric(limited, "realizar_requests_failed")
    with connect(limited) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        status, body = status_and_body(read_until_closed(sock))
    assert status == 408 and "body" in json.loads(body)["error"]["message"]
    assert metric(limited, "realizar_requests_client_errors_total") == before + 1
    assert metric(limited, "realizar_requests_failed") == failed


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"a" * 9000 + b"\r\n\r\n",  # complete but too large
    b"X-Big: " + b"a" * 200_000,  # never ends: must not grow without bound
    b"".join(b"X-%d: 1\r\n" % i for i in range(25)) + b"\r\n",  # too many
])
def test_oversized_headers_get_431(limited: ServerProcess, headers: bytes) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers)
        status, body = status_and_body(read_until_closed(sock))
    assert status == 431 and json.loads(body)["error"]


def test_headers_within_the_limits_are_served(limited: ServerProcess) -> None:
    headers = {f"X-{i}": "v" * 600 for i in range(12)}  # with httpx's own five: 17 headers, ~7.4 KB
    r = httpx.get(limited.url + "/health", headers=headers)
    assert r.status_code == 200


def test_connections_over_the_cap_get_503_and_the_server_recovers(limited: ServerProcess) -> None:
    held = [connect(limited) for _ in range(16)]  # idle, so they fill the cap for the idle timeout (1 s)
    try:
        time.sleep(0.2)
        with connect(limited) as extra:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            raw = read_until_closed(extra)
        status, body = status_and_body(raw)
        assert status == 503 and b"retry-after: 1" in raw.lower() and json.loads(body)["error"]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(limited.url + "/health").status_code == 200
    assert metric(limited, 'realizar_connections_rejected_total{reason="max_connections"}') >= 1


def test_the_cap_stays_below_the_file_descriptor_limit(servers: dict[str, ServerProcess]) -> None:
    server = servers["low_fds"]
    try:
        assert "using 128" in server.log()
        held = []
        try:
            for _ in range(200):  # past the cap and, without it, past the process's 256 descriptors
                held.append(connect(server))
            time.sleep(0.3)
            assert httpx.get(server.url + "/health").status_code in (200, 503)
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.3)
        assert httpx.get(server.url + "/health").status_code == 200
        assert metric(server, 'realizar_connections_rejected_total{reason="max_connections"}') >= 200 - 128
    finally:
        server.stop()


# -- responses that outlive --request-timeout ------------------------------------------------------------


def test_a_response_nobody_reads_loses_its_connection(limited: ServerProcess) -> None:
    with connect(limited, rcvbuf=4096) as sock:
        sock.sendall(post("/tokenize", json.dumps({"text": BIG_TEXT}).encode()))
        # Never read: the answer fills the socket buffers and the server's send blocks until the
        # request timeout (3 s) and its grace have passed; then the server drops the connection.
        wait_for_connections(limited, 0)
        data = read_until_closed(sock)  # returns: the connection is gone
    # Cut short (a reset may also drop what the kernel held): fewer bytes than the answer has.
    declared = re.search(rb"content-length: (\d+)", data)
    body = data.partition(b"\r\n\r\n")[2]
    assert declared is None or len(body) < int(declared.group(1))
    assert "no complete response" in limited.log()


def test_a_stream_nobody_reads_ends_at_the_timeout(limited: ServerProcess) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with connect(limited) as sock:
        sock.sendall(post("/v1/completions", json.dumps(body).encode()))
        wait_for_connections(limited, 0)  # finished and closed, although nothing was read yet
        data = read_until_closed(sock).decode()
    assert '"code":"timeout"' in data
    assert data.rstrip("\r\n0").endswith("data: [DONE]")


# -- SIGTERM with clients that never read ----------------------------------------------------------------


def test_sigterm_with_stuck_readers_exits_cleanly(servers: dict[str, ServerProcess]) -> None:
    server = servers["stuck_readers"]
    stream = {"prompt": "Once", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    socks = [connect(server, rcvbuf=4096), connect(server, rcvbuf=4096)]
    try:
        socks[0].sendall(post("/tokenize", json.dumps({"text": BIG_TEXT}).encode()))
        socks[1].sendall(post("/v1/completions", json.dumps(stream).encode()))
        socks[0].settimeout(120)
        assert socks[0].recv(1, socket.MSG_PEEK)  # the tokenize answer is being written, and cannot finish
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0  # before, it waited for the clients to leave
    finally:
        for sock in socks:
            sock.close()
        server.stop()
    log = server.log()
    assert "Traceback" not in log and "CancelledError" not in log
