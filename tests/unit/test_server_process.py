"""ServerProcess's two-step start (start without waiting, then wait_until_ready), which the tests use to
start several servers at once; its ports and its readiness probe."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from realizar.loadtest.server_process import QUIET_PORTS, ServerProcess, ServerStartError, free_port


def test_start_then_wait_until_ready(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], port,
                           tmp_path / "http.log", ready_path="/", startup_timeout_s=60)
    try:
        assert server.start(wait_ready=False) is server and server.ready_s is None
        assert server.wait_until_ready() is server
        assert server.ready_s is not None and server.get("/")[0] == 200
        ready_s = server.ready_s
        assert server.wait_until_ready().ready_s == ready_s  # a second wait returns at once
    finally:
        server.stop(10)
    assert server.proc is not None and server.proc.poll() is not None


def test_a_server_waited_for_after_its_startup_timeout_is_ready_if_it_answers(tmp_path: Path) -> None:
    """A server started early (the shared demo server starts with the session) may be waited for long
    after its startup timeout: it is ready when it answers then."""
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], port,
                           tmp_path / "http.log", ready_path="/", startup_timeout_s=0.5)
    try:
        server.start(wait_ready=False)
        deadline = time.monotonic() + 60
        while server.get("/")[0] != 200:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
        time.sleep(0.6)  # past startup_timeout_s since the start
        assert server.wait_until_ready().ready_s is not None
    finally:
        server.stop(10)


def test_a_server_that_exits_before_it_is_ready_is_an_error(tmp_path: Path) -> None:
    server = ServerProcess([sys.executable, "-c", "import sys; print('no port for me'); sys.exit(3)"], free_port(),
                           tmp_path / "gone.log", name="gone", startup_timeout_s=60)
    server.start(wait_ready=False)
    with pytest.raises(ServerStartError, match="exited with status 3") as raised:
        server.wait_until_ready()
    assert "no port for me" in str(raised.value)


def test_free_ports_stay_out_of_the_kernels_ephemeral_range() -> None:
    """Port-0 binds (a Ray cluster starting beside the server) and outgoing connections take ports from the
    ephemeral range, so a port drawn there could be gone before the server, still importing, binds it."""
    start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if start - QUIET_PORTS[0] < 64:
        pytest.skip(f"this machine's ephemeral range starts at {start}")
    ports = [free_port() for _ in range(20)]
    assert all(QUIET_PORTS[0] <= p < min(start, QUIET_PORTS[1]) for p in ports), ports
    assert len(set(ports)) > 1  # drawn at random: two runs' servers rarely meet
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # and free


def test_a_port_that_answers_another_protocol_is_not_ready(tmp_path: Path) -> None:
    """The readiness probe reads bytes that are not HTTP (another program on the port) as no answer yet, and
    the wait ends as for a server that never answers, naming it, rather than with http.client's error."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer_in_binary() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\xfe\xff\n")

        threading.Thread(target=answer_in_binary, daemon=True).start()
        server = ServerProcess([sys.executable, "-c", "import time; time.sleep(60)"], port, tmp_path / "quiet.log",
                               name="quiet", startup_timeout_s=1.0)
        with pytest.raises(ServerStartError, match="quiet not ready"):
            server.start()
        assert server.proc is not None and server.proc.poll() is not None  # stopped
