"""A server under test as a child process: started on a port, ready once a path answers 200, stopped as a group.

The test suite's real-process tests and the benchmark scripts start their servers (realizar, llama.cpp,
vLLM) through :class:`ServerProcess`, so both wait for readiness, keep logs and clean up the same way.
It starts commands and speaks HTTP; it imports nothing from the engine.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["ServerProcess", "ServerStartError", "free_port"]


# Ports free_port draws from: above Ray's worker ports (10002-19999 by default) and below the kernel's
# ephemeral range, which every port-0 bind and outgoing connection takes from. A port the kernel handed
# out was taken by a Ray process starting beside the server before the server bound it (seconds later,
# after its imports), and the readiness probe then read gRPC bytes.
QUIET_PORTS = (20000, 32768)

# How often a starting server is asked for its ready path. ready_s is late by up to this, so it is kept
# small beside a realizar start of 2-3 s.
READY_POLL_S = 0.05


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return QUIET_PORTS[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, drawn from QUIET_PORTS where the machine's
    ephemeral range leaves them alone."""
    low, high = QUIET_PORTS[0], min(QUIET_PORTS[1], _ephemeral_start())
    candidates = random.sample(range(low, high), 64) if high - low >= 64 else []
    for port in [*candidates, 0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free TCP port on 127.0.0.1")


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message ends with its log tail."""


class ServerProcess:
    """One server command in its own session (so that the children it starts die with it).

    Its output goes to ``log_path``. :meth:`start` returns once ``GET ready_path`` answers 200, or
    raises :class:`ServerStartError`; :meth:`stop` sends SIGTERM to the whole group, waits, then
    SIGKILLs what is left. Servers still running when the interpreter exits are stopped too.
    """

    def __init__(self, argv: Sequence[str], port: int, log_path: Path, *, name: str = "server",
                 env: Mapping[str, str] | None = None, cwd: Path | None = None, ready_path: str = "/health",
                 startup_timeout_s: float = 300.0, preexec_fn: Callable[[], None] | None = None) -> None:
        self.argv = tuple(argv)
        self.port = port
        self.log_path = log_path
        self.name = name
        self.env = dict(env or {})
        self.cwd = cwd
        self.ready_path = ready_path
        self.startup_timeout_s = startup_timeout_s
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None  # wall time from the start to the first 200 seen
        self._started_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self, wait_ready: bool = True) -> ServerProcess:
        """Start the command; with ``wait_ready``, return once it is ready (see :meth:`wait_until_ready`)."""
        self._started_at = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}, cwd=self.cwd,
                                         start_new_session=True, preexec_fn=self.preexec_fn)
        _LIVE.add(self)
        return self.wait_until_ready() if wait_ready else self

    def wait_until_ready(self) -> ServerProcess:
        """Wait for ``GET ready_path`` to answer 200, within ``startup_timeout_s`` of the start (a server
        that answers when this is called passes, however late); on failure stop the server and raise
        :class:`ServerStartError`. Lets a caller start several servers before waiting for any of them."""
        if self.ready_s is not None:
            return self
        try:
            self._wait_ready(self._started_at)
        except BaseException:
            self.stop()
            raise
        return self

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        """``GET path``: (status, body); status 0 when nothing answered."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:  # noqa: S310 (127.0.0.1)
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException):
            return 0, b""  # nothing, or not HTTP (another program's port: the server then fails to bind)

    def _wait_ready(self, t0: float) -> None:
        assert self.proc is not None
        deadline = t0 + self.startup_timeout_s
        while True:  # asks at least once: a server waited for long after its start may be ready by now
            if self.proc.poll() is not None:
                raise ServerStartError(f"{self.name} exited with status {self.proc.returncode} "
                                       f"before it was ready:\n{self.log_tail()}")
            if self.get(self.ready_path)[0] == 200:
                self.ready_s = time.perf_counter() - t0
                return
            if time.perf_counter() >= deadline:
                raise ServerStartError(f"{self.name} not ready after {self.startup_timeout_s:.0f} s:\n"
                                       f"{self.log_tail()}")
            time.sleep(READY_POLL_S)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(no log)"

    def stop(self, timeout: float = 60.0, whole_group: bool = True) -> int | None:
        """SIGTERM the process group (only the leader unless ``whole_group``: a realizar fleet stops
        its local Ray itself, and Ray's daemons share the group), then SIGKILL whatever is left after
        ``timeout`` s (longer than a realizar server's default drain); the leader's exit status (None
        when it was never started)."""
        proc = self.proc
        _LIVE.discard(self)
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if whole_group:
                    os.killpg(proc.pid, signal.SIGTERM)
                else:
                    proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        # the group may outlive its leader (vLLM's engine core), so always sweep it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        return proc.returncode

    def __repr__(self) -> str:
        if self.proc is None:
            state = "not started"
        else:
            code = self.proc.poll()
            state = "running" if code is None else f"exited {code}"
        return f"ServerProcess({self.name!r}, {self.url}, {state})"


_LIVE: set[ServerProcess] = set()


def _stop_all_live() -> None:
    for server in list(_LIVE):
        server.stop()


atexit.register(_stop_all_live)
