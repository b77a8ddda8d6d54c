"""Run the server under uvicorn: bind, load the model in the background, drain on SIGTERM.

``serve(engine_factory, config)`` is what ``realizar serve`` calls. It returns the process
exit status:

* 0 after a signal-driven shutdown (SIGTERM or SIGINT: stop admitting, drain in-flight
  requests for up to ``config.shutdown_timeout`` s, stop the engine, exit; a second signal
  exits at once);
* 1 when the address cannot be bound (one sentence on stderr, no traceback) or the model
  fails to load.

The socket is bound first, so a busy port is reported before minutes of model loading;
then the model loads in a background thread while ``/health`` answers 503
``{"status": "loading"}``.

Connections run under :class:`realizar.server.connection.GuardedProtocol` (timeouts and
size limits before a request reaches the app, and a connection cap). The soft
``RLIMIT_NOFILE`` is raised to the hard limit at start, and the cap kept below it, so that
shedding starts before ``accept()`` runs out of file descriptors.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import logging
import math
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

import uvicorn

from realizar.config import ServerConfig
from realizar.server.app import (
    attach_engine,
    begin_shutdown,
    build_app,
    drain,
    endpoints,
    fail_loading,
    server_state,
)
from realizar.server.connection import Rejection, guarded_protocol

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from realizar.server.engine_client import EngineClient

log = logging.getLogger("realizar.server")
T = TypeVar("T")

# uvicorn's own wait for connections once our drain is over; the drain has dropped every
# connection still answering by then, so this only covers the last few bytes.
GRACE_AFTER_DRAIN_S = 1.0
NOFILE_RESERVE = 128  # descriptors kept back from the connection cap: model files, logs, pipes, threads
NOFILE_TARGET = 1 << 20  # what "unlimited" hard limits are raised to (the kernel's usual nr_open)


def serve(engine_factory: Callable[[], EngineClient], config: ServerConfig, *, log_level: str = "info",
          on_ready: Callable[[str, list[str]], None] | None = None) -> int:
    """Serve until a signal; returns the exit status.

    ``engine_factory`` loads the model and builds the engine (blocking; it runs in a
    background thread). ``on_ready(url, endpoints)`` runs once the model is loaded and serving; ``endpoints``
    lists the app's routes (see ``app.endpoints``).
    """
    _configure_logging(log_level)
    try:
        sock = bind(config.host, config.port)
    except OSError as exc:
        print(f"realizar: cannot listen on {config.host}:{config.port}: {_why(exc)}", file=sys.stderr)
        return 1
    max_connections = connection_cap(config.max_connections, raise_nofile_limit())
    if max_connections < config.max_connections:
        log.warning("--max-connections %d is over what the file descriptor limit allows; using %d",
                    config.max_connections, max_connections)
    app = build_app(None, config)
    metrics = server_state(app).metrics
    for reason in Rejection:
        metrics.connections_rejected[reason.value] += 0  # every reason is a series from the start
    uv_config = uvicorn.Config(
        app,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=guarded_protocol(config, max_connections, lambda why: metrics.reject_connection(why.value)),
        lifespan="on",
        access_log=False,  # realizar.access logs each request with its id
        log_config=None,
        log_level=log_level,
        timeout_keep_alive=max(1, math.ceil(config.idle_timeout)),  # ours closes at idle_timeout exactly
        timeout_graceful_shutdown=int(GRACE_AFTER_DRAIN_S),
    )
    server = _Server(uv_config, app, engine_factory, config.shutdown_timeout, on_ready, sock)
    connections = server.server_state.connections
    metrics.open_connections = lambda: len(connections)
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits this way when the app's startup fails
        return _exit_past_workers(exc.code if isinstance(exc.code, int) else 1)
    return _exit_past_workers(server.exit_code)


# threads that may still be inside a long call when serving ends: the model loader, and the
# executors that tokenize and render large bodies (asyncio.to_thread's and the server's own)
_UNJOINABLE_THREADS = ("realizar-load", "realizar-render", "asyncio_")


def _exit_past_workers(code: int) -> int:
    """Return ``code``, or end the process at once if a worker thread is still alive.

    A signal during loading leaves the loader thread inside torch; letting the interpreter
    tear down around it aborts in C++ ("terminate called without an active exception").
    An executor thread still tokenizing a megabyte-long body would hold the interpreter's
    exit for seconds past --shutdown-timeout, since executors join their threads at exit.
    Serving is over and nothing is left to write but the flushed streams, so when such a
    thread exists the process exits without the teardown.
    """
    if any(t.name.startswith(_UNJOINABLE_THREADS) and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in force after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return NOFILE_TARGET if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # e.g. a hard limit above the kernel's nr_open
        log.debug("cannot raise RLIMIT_NOFILE to %d: %s", target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(requested: int, nofile: int) -> int:
    """``requested``, lowered so that the connections leave ``NOFILE_RESERVE`` descriptors of ``nofile``."""
    room = nofile - NOFILE_RESERVE if nofile > 2 * NOFILE_RESERVE else nofile // 2
    return max(1, min(requested, room))


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (is another server running? pick another port with --port)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges; pick another port with --port)"
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve"
    return exc.strerror or str(exc)


def _configure_logging(level: str) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a daemon thread, so a signal during a long load does not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=run, name="realizar-load", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]


class _Server(uvicorn.Server):
    """uvicorn, plus model loading after startup and a draining signal handler."""

    def __init__(self, config: uvicorn.Config, app: Starlette, engine_factory: Callable[[], EngineClient],
                 shutdown_timeout: float, on_ready: Callable[[str, list[str]], None] | None, sock: socket.socket) -> None:
        super().__init__(config)
        self.app = app
        self.engine_factory = engine_factory
        self.shutdown_timeout = shutdown_timeout
        self.on_ready = on_ready
        self.url = _url(sock)
        self.exit_code = 0
        self.engine: EngineClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()
        log.info("listening on %s; loading the model", self.url)
        if not self.should_exit:
            self._spawn(self._load())

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self) -> None:
        try:
            engine = await _in_daemon_thread(self.engine_factory)
            await engine.start()
        except Exception as exc:
            log.error("the model failed to load: %s", exc)
            log.debug("model load failure", exc_info=True)
            fail_loading(self.app)
            self.exit_code = 1
            self.should_exit = True
            return
        self.engine = engine
        if self._draining:  # a signal came while loading: nothing to serve
            return
        attach_engine(self.app, engine)
        log.info("serving %s on %s (%s), loaded in %.1f s", engine.model_id, self.url, engine.compute_path,
                 engine.load_seconds)
        if self.on_ready is not None:
            self.on_ready(self.url, endpoints(self.app))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread, which is the event loop's thread, between two callbacks.
        if self._draining or self._loop is None:
            self.force_exit = self._draining
            self.should_exit = True
            return
        self._draining = True
        log.info("%s: draining in-flight requests for up to %g s", signal.Signals(sig).name,
                 self.shutdown_timeout)
        self._loop.call_soon_threadsafe(self._spawn, self._drain())

    async def _drain(self) -> None:
        begin_shutdown(self.app)
        # uvicorn's own wait and the engine's stop come after the drain: keep room for them.
        budget = self.shutdown_timeout
        budget = budget - GRACE_AFTER_DRAIN_S if budget >= 2 * GRACE_AFTER_DRAIN_S else budget / 2
        if not await drain(self.app, budget):
            log.warning("the shutdown timeout passed with requests in flight; they were aborted")
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.engine is not None:
            await self.engine.stop()


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
