"""The server's lifecycle state: loading, ready, draining; the engine it serves; its metrics."""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import orjson
from starlette.responses import Response

from realizar import __version__
from realizar.config import ServerConfig
from realizar.metrics import Metrics
from realizar.server.engine_client import EngineClient  # the engine's interface, not its module (torch)
from realizar.server.errors import APIError
from realizar.server.generation import Generation
from realizar.server.http import RequestContext, json_response

if TYPE_CHECKING:
    from realizar.server.connection import ConnectionHandle


T = TypeVar("T")


class Phase(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"  # the model did not load


class ServerState:
    """One server's mutable state. Only the event loop thread touches it."""

    def __init__(self, config: ServerConfig, engine: EngineClient | None = None) -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = Metrics()
        self.engine: EngineClient | None = None
        self.model_names: tuple[str, ...] = config.served_model_names  # what requests may name; set at attach
        self.phase = Phase.LOADING
        self.inflight = 0  # HTTP requests being handled, for the shutdown drain
        self.generations: set[Generation] = set()  # those with engine requests, to abort at shutdown
        self.responding: set[ConnectionHandle] = set()  # connections of in-flight requests, to drop at shutdown
        self._rid_prefix = os.urandom(3).hex()
        self._rid_counter = itertools.count(1)
        self._healthy_body = b""
        # Long chat templates render here, one at a time: rendering is pure Python and holds the GIL, so
        # each thread doing it is one more contender the event loop waits behind (see offload()).
        self._render_pool: ThreadPoolExecutor | None = None
        if engine is not None:
            self.attach(engine)

    @property
    def model_id(self) -> str:
        """The id the server reports for its model: the first --served-model-name, else the model's own."""
        return self.model_names[0]

    def next_request_id(self) -> str:
        return f"{self._rid_prefix}-{next(self._rid_counter)}"

    async def offload(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the server's one worker thread for GIL-bound request work."""
        if self._render_pool is None:
            self._render_pool = ThreadPoolExecutor(1, thread_name_prefix="realizar-render")
        return await asyncio.get_running_loop().run_in_executor(self._render_pool, fn, *args)

    def generation(self, engine: EngineClient, ctx: RequestContext) -> Generation:
        """A generation for one HTTP request, under --request-timeout, aborted by a shutdown past its deadline."""
        return Generation(engine, ctx, self.config.request_timeout, self.generations)

    def attach(self, engine: EngineClient) -> None:
        """The model is loaded and the engine started: begin serving."""
        self.engine = engine
        self.metrics.attach(engine)
        self.model_names = self.config.served_model_names or (engine.model_id,)
        if self.config.metrics_compat is not None and self.phase is Phase.LOADING:
            self.metrics.add_compat(self.config.metrics_compat, self.model_id)
        self._healthy_body = orjson.dumps({
            "status": "healthy", "version": __version__, "model": self.model_id,
            "compute_mode": engine.compute_mode, "compute_path": engine.compute_path,
        })
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY

    def fail(self) -> None:
        """The model did not load."""
        self.phase = Phase.FAILED

    def require_engine(self) -> EngineClient:
        if self.engine is None or self.phase is not Phase.READY:
            raise APIError(503, self.unavailable_reason(), headers={"Retry-After": "1"})
        return self.engine

    def unavailable_reason(self) -> str:
        if self.phase is Phase.LOADING:
            return "The model is still loading"
        if self.phase is Phase.DRAINING:
            return "The server is shutting down"
        if self.phase is Phase.FAILED:
            return "The model failed to load"
        return "The engine is not available"

    def health(self) -> Response:
        engine = self.engine
        if self.phase is Phase.READY and engine is not None:
            if engine.healthy:
                return Response(self._healthy_body, media_type="application/json")
            return json_response({"status": "unhealthy", "model": self.model_id,
                                  "error": "the engine stopped after a fatal error"}, 503)
        return json_response({"status": self.phase.value}, 503)

    def ready(self) -> Response:
        """``/ready``: 200 once the model is loaded and warmed (the engine warms up before it is attached)
        and while it serves; 503 while loading, draining, failed or after a fatal engine error, so that a
        load balancer or Kubernetes readiness probe sends traffic only where it will be served."""
        engine = self.engine
        if self.phase is Phase.READY and engine is not None and engine.healthy:
            return json_response({"status": "ready", "model": self.model_id})
        status = "unhealthy" if self.phase is Phase.READY else self.phase.value
        return Response(orjson.dumps({"status": status}), status_code=503, media_type="application/json",
                        headers={"Retry-After": "1"})

    def abort_all(self, error: APIError) -> None:
        """End every generation in flight with ``error`` (the shutdown deadline passed)."""
        for generation in list(self.generations):
            generation.cancel(error)

    def abort_connections(self) -> int:
        """Drop the connection of every request still answering (the shutdown deadline passed:
        their clients do not read); returns how many there were."""
        stuck = [conn for conn in self.responding if not conn.finished]
        for conn in stuck:
            conn.abort()
        return len(stuck)

    def begin_shutdown(self) -> None:
        """Stop admitting: new requests get 503, in-flight ones carry on."""
        if self.phase in (Phase.READY, Phase.LOADING):
            self.phase = Phase.DRAINING
        if self.engine is not None:
            self.engine.begin_shutdown()
