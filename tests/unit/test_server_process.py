"""ServerProcess's two-step start (start without waiting, then wait_until_ready), which the tests use to
start several servers at once."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from realizar.loadtest.server_process import ServerProcess, ServerStartError, free_port


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
