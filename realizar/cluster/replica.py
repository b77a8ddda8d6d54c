"""``Replica``: one engine and the single-server app over it, answering the requests the front forwards.

A replica builds exactly what ``realizar serve`` builds in one process (``AsyncEngine.from_path`` loads and
warms the model; ``build_app`` makes the native and OpenAI routes over it) and runs each forwarded request
through that app in-process, so that every route answers as the single server does. The response goes
back to the front as a stream of ``messages`` items. Body bytes are held back until the engine produced
the request's first token (or the response ended): a reply that carries no body bytes yet is one the
front may still retry on another replica when this one dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve
from starlette.applications import Starlette
from starlette.types import Message

from realizar.cluster.messages import Accepted, ForwardedRequest, Reply, ResponseBody, ResponseHead
from realizar.config import EngineConfig, ServerConfig
from realizar.server.app import begin_shutdown, build_app, drain, server_state
from realizar.server.http import SCOPE_KEY

log = logging.getLogger("realizar.cluster")

# A reply's head ready this soon goes first, with the replica's id; a slower one is preceded by Accepted,
# so that the front learns the request was placed without waiting for the answer. (Each item is a message
# between processes: the fast routes save one.)
ACCEPT_WITHIN_S = 0.005


@dataclass(frozen=True)
class ReplicaSpec:
    """What each replica loads and how it serves (the API key is checked by the front)."""

    model_path: str
    engine: EngineConfig
    server: ServerConfig


class Replica:
    """The Ray Serve deployment class of the engine replicas (see the module docstring)."""

    async def __init__(self, spec: ReplicaSpec) -> None:  # type: ignore[misc]  # Ray Serve awaits it
        from realizar.engine.engine import AsyncEngine  # torch: only in the replica processes

        self.spec = spec
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        engine = await asyncio.to_thread(AsyncEngine.from_path, spec.model_path, spec.engine)
        await engine.start()
        self.engine = engine
        self.app: Starlette = build_app(engine, spec.server)
        self.state = server_state(self.app)
        self._observations = asyncio.create_task(self._absorb())
        log.info("replica %s serving %s (%s, pid %d)", self.replica_id, engine.model_id, engine.compute_path,
                 os.getpid())

    async def _absorb(self) -> None:
        # what the app's lifespan does in the single server: move engine timings into the histograms
        while True:
            await asyncio.sleep(1.0)
            self.state.metrics.absorb()

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[Reply]:
        """Run one forwarded request through the app; yields the response in parts (Accepted first when the
        head takes more than ACCEPT_WITHIN_S)."""
        sent: asyncio.Queue[Message | None] = asyncio.Queue()
        gone = asyncio.Event()
        body_given = False

        async def receive() -> Message:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()  # the front's client left, or the front cancelled the call
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.put_nowait(message)

        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
            "method": request.method, "path": request.path, "raw_path": request.path.encode(),
            "root_path": "", "query_string": request.query_string, "headers": list(request.headers),
            "client": None, "server": None,
        }
        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: sent.put_nowait(None))
        head: Message | None = None
        held: list[bytes] = []
        accepted = False
        try:
            while True:
                if accepted:
                    message = await sent.get()
                else:
                    try:
                        message = await asyncio.wait_for(sent.get(), ACCEPT_WITHIN_S)
                    except asyncio.TimeoutError:
                        accepted = True
                        yield Accepted(self.replica_id)
                        continue
                if message is None:  # the app returned without finishing its response: end what was begun
                    if head is not None:
                        yield ResponseHead(head["status"], tuple(head.get("headers", ())), b"".join(held), False,
                                           self.replica_id)
                    elif accepted and held:
                        yield ResponseBody(b"".join(held), False)
                    break
                if message["type"] == "http.response.start":
                    head = message
                    continue
                if message["type"] != "http.response.body":
                    continue
                held.append(message.get("body", b""))
                more = bool(message.get("more_body", False))
                ctx = scope.get(SCOPE_KEY)
                if more and (ctx is None or ctx.tokens == 0):
                    continue  # nothing generated yet: keep the reply retryable
                body, held = b"".join(held), []
                if head is not None:
                    accepted = True
                    yield ResponseHead(head["status"], tuple(head.get("headers", ())), body, more, self.replica_id)
                    head = None
                else:
                    yield ResponseBody(body, more)
                if not more:
                    break
        finally:
            gone.set()  # the app's disconnect listener ends a generation still running
            task.add_done_callback(_retrieve)

    async def ping(self) -> str:
        return self.replica_id

    async def record_routing_stats(self) -> dict[str, Any]:
        """What the router and the front know of this replica (Ray Serve polls it every second or so).
        A coroutine, so it runs on the event loop that owns the server state, as /metrics does."""
        stats = self.engine.stats()
        ready = self.state.ready()
        return {
            "ready": ready.status_code == 200,
            "health": bytes(self.state.health().body),
            "running": stats.num_running, "waiting": stats.num_waiting, "kv_cache_usage": stats.kv_cache_usage,
            "metrics": self.state.metrics.render().decode(),
            "pid": os.getpid(),
        }

    async def check_health(self) -> None:
        """Ray Serve's health check: an engine that stopped after a fatal error gets its replica replaced."""
        if not self.engine.healthy:
            raise RuntimeError(f"the engine stopped: {self.engine.fatal_error}")

    async def __del__(self) -> None:
        # Ray Serve has stopped routing here and waited for the ongoing requests (graceful_shutdown_timeout_s)
        begin_shutdown(self.app)
        with contextlib.suppress(Exception):
            await drain(self.app, 1.0)
        self._observations.cancel()
        await self.engine.stop()


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a forwarded request failed in the app", exc_info=task.exception())
