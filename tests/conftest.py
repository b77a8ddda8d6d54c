"""Shared fixtures: real `realizar serve` processes on free loopback ports, and the load-test opt-in."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-load", action="store_true", default=False,
                     help="run the opt-in load tests (marker 'load'); REALIZAR_LOAD_TESTS=1 does the same")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-load") or os.environ.get("REALIZAR_LOAD_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="load tests are opt-in: pass --run-load or set REALIZAR_LOAD_TESTS=1")
    for item in items:
        if "load" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A real `realizar serve` child process."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_server(tmp_dir: Path, *args: str, env: dict[str, str] | None = None,
                 wait_ready: bool = True, timeout: float = 180.0,
                 preexec_fn: Callable[[], None] | None = None, module: str = "realizar") -> ServerProcess:
    """Start `realizar serve --demo` (plus ``args``) on a free port and wait for /health.

    ``preexec_fn`` runs in the child before it starts (e.g. to lower a resource limit); ``module``
    is what ``python -m`` runs (a test launcher that wraps the CLI, e.g. ``tests.faulty_server``)."""
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", module, "serve", "--demo", "--port", str(port), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
                                preexec_fn=preexec_fn)
    server = ServerProcess(proc, port, log_path)
    if wait_ready:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early ({proc.returncode}):\n{server.log()}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return server
            except OSError:
                pass
            time.sleep(0.3)
        server.stop()
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{server.log()}")
    return server


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared demo server for the HTTP tests that do not change server flags."""
    server = start_server(tmp_path_factory.mktemp("demo"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_url(demo_server: ServerProcess) -> str:
    return demo_server.url
