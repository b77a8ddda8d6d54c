"""``Front``: the HTTP ingress of the fleet, one Ray Serve deployment in front of the replicas.

It answers what the single server answers at its edge: 401 without the API key, ``/health``, ``/ready``
and ``/metrics`` (for the whole fleet), 413 past the body limit, 503 while draining. Every other request
is forwarded, body and headers as received, to a replica chosen by ``PrefixAffinityRouter``; the replica's
response is relayed as it streams, with an ``x-realizar-replica`` header naming the replica.

When a replica dies (``SIGKILL``, a lost node), a request it had not begun answering (no body bytes relayed:
replicas hold them back until the first token) is retried once on another replica, where it waits for room
(``route_timeout`` s, backing off) if that one's queue is full: the fleet had accepted it; a response already
streaming ends with an SSE error event in its API's shape (502 ``replica_failed``), and a response not
yet begun whose retry failed too gets a JSON 502. Nothing waits forever: routing that finds no replica
within ``route_timeout`` s answers 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from realizar.cluster import fleet
from realizar.cluster.messages import Accepted, ForwardedRequest, Reply, ResponseHead
from realizar.cluster.prefix import block_hashes, prompt_text
from realizar.cluster.router import fleet_view, router_for
from realizar.metrics import CONTENT_TYPE
from realizar.server.errors import APIError, error_body, error_response, is_openai_path
from realizar.server.generation import sse

log = logging.getLogger("realizar.cluster")

OPEN_ROUTES = frozenset({"/health", "/ready"})
REPLICA_HEADER = b"x-realizar-replica"
SESSION_HEADER = b"x-session-id"
HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length"})
# Ray's proxy sets X-Request-Id on the request (the client's own when it sent a sane one) and on the
# response; the replica echoes it too, so the replica's copy is dropped rather than sent twice.
DROPPED_RESPONSE_HEADERS = frozenset({b"x-request-id"})


@dataclass(frozen=True)
class FrontConfig:
    api_key: str | None
    max_body_bytes: int
    app_name: str
    replica_deployment: str
    route_timeout: float = 30.0  # seconds to find a replica with room before 503
    max_retries: int = 1  # of a request whose replica died before answering


ROOM_BACKOFF_S = 0.2  # between tries of a request that waits for room after its replica died


class _ReplicaFailed(Exception):
    """The replica died before answering, or (``overloaded``) refused the request with a full queue."""

    def __init__(self, replica_id: str | None, overloaded: bool = False) -> None:
        super().__init__(replica_id)
        self.replica_id = replica_id
        self.overloaded = overloaded


@serve.ingress()
class Front:
    """The Ray Serve ingress deployment (see the module docstring)."""

    def __init__(self, replicas: DeploymentHandle, config: FrontConfig) -> None:
        self.config = config
        self.replicas = replicas.options(stream=True)
        self.expected_auth = f"Bearer {config.api_key}".encode() if config.api_key else None
        self.draining = False
        self.inflight = 0
        self.retries = 0
        self.replica_failures = 0  # forwarded requests whose replica died under them
        self._kick: asyncio.Task[None] | None = None

    def __serve_build_asgi_app__(self) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await self._asgi(scope, receive, send)

        return app  # a plain coroutine function: uvicorn takes a bound method for an ASGI2 app

    # -- lifecycle (called by the driver through the app handle) --

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests (503, /ready 503) and wait up to ``timeout`` s for those in flight."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight == 0

    async def fleet_ready(self) -> int:
        """How many replicas report ready (the driver waits for one before it prints the banner)."""
        self._ensure_router()
        return sum(1 for _, s in fleet_view(self.config.app_name, self.config.replica_deployment) if s.get("ready"))

    def _ensure_router(self) -> None:
        # Ray builds the handle's router on its first request; the fleet view needs it before any traffic.
        if self._kick is None:
            self._kick = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        request = ForwardedRequest("GET", "/ready", b"", (), b"")
        gen: DeploymentResponseGenerator[Any] = self.replicas.handle.remote(request)  # type: ignore[assignment]
        async for _ in gen:
            pass

    # -- HTTP --

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self._ensure_router()
        path: str = scope["path"]
        if self.expected_auth is not None and path not in OPEN_ROUTES:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected_auth):
                await error_response(path, APIError(401, "Missing or invalid API key", code="invalid_api_key",
                                                    headers={"WWW-Authenticate": "Bearer"}))(scope, receive, send)
                return
        if path == "/health" and scope["method"] in ("GET", "HEAD"):
            await self._health()(scope, receive, send)
        elif path == "/ready" and scope["method"] in ("GET", "HEAD"):
            await self._ready()(scope, receive, send)
        elif path == "/metrics" and scope["method"] in ("GET", "HEAD"):
            await Response(self._metrics(), media_type=CONTENT_TYPE)(scope, receive, send)
        elif self.draining:
            await error_response(path, APIError(503, "The server is shutting down", code="unavailable",
                                                headers={"Retry-After": "1", "Connection": "close"}))(
                scope, receive, send)
        else:
            self.inflight += 1
            try:
                await self._forward(scope, receive, send)
            finally:
                self.inflight -= 1

    def _fleet(self) -> list[tuple[str, dict[str, Any]]]:
        return fleet_view(self.config.app_name, self.config.replica_deployment)

    def _health(self) -> Response:
        view = self._fleet()
        ready = [s for _, s in view if s.get("ready")]
        if self.draining:
            return _json({"status": "draining"}, 503)
        if not ready:
            return _json({"status": "loading" if not view or not any(s for _, s in view) else "unhealthy",
                          "replicas": {"ready": 0, "total": len(view)}}, 503)
        body = orjson.loads(ready[0]["health"])
        body["replicas"] = {"ready": len(ready), "total": len(view)}
        return _json(body, 200)

    def _ready(self) -> Response:
        ready = sum(1 for _, s in self._fleet() if s.get("ready"))
        if self.draining or not ready:
            return Response(orjson.dumps({"status": "draining" if self.draining else "loading"}), 503,
                            media_type="application/json", headers={"Retry-After": "1"})
        return _json({"status": "ready", "replicas": ready}, 200)

    def _metrics(self) -> bytes:
        view = self._fleet()
        texts = {rid: s["metrics"] for rid, s in view if "metrics" in s}
        ready = sum(1 for _, s in view if s.get("ready"))
        extra = fleet.gauge("realizar_cluster_replicas", "Replicas the front routes to, by state",
                            [({"state": "ready"}, ready), ({"state": "total"}, len(view))])
        extra += fleet.gauge("realizar_cluster_replica_info", "One series per live replica: its id and process",
                             [({"replica": rid, "pid": str(s.get("pid", ""))}, 1) for rid, s in view])
        extra += fleet.gauge("realizar_cluster_retries", "Requests retried on another replica (the first one "
                             "died before answering, or was overloaded)", [({}, self.retries)], kind="counter")
        extra += fleet.gauge("realizar_cluster_replica_failures",
                             "Forwarded requests whose replica died under them", [({}, self.replica_failures)],
                             kind="counter")
        router = router_for(self.config.app_name, self.config.replica_deployment)
        if router is not None:
            extra += fleet.gauge("realizar_cluster_routed", "Requests placed by the router, by rule",
                                 [({"rule": k}, v) for k, v in router.routed.items()], kind="counter")
        return fleet.merge(texts, extra).encode()

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        try:
            body = await _read_body(receive, self.config.max_body_bytes)
        except APIError as exc:
            await error_response(path, exc)(scope, receive, send)
            return
        headers = tuple((k, v) for k, v in scope["headers"] if k not in HOP_HEADERS)
        session = next((v.decode("latin-1") for k, v in headers if k == SESSION_HEADER), None) or None
        text = prompt_text(body) if scope["method"] == "POST" else None
        request = ForwardedRequest(scope["method"], path, scope.get("query_string", b""), headers, body,
                                   block_hashes(text) if text else (), session)
        tried: set[str] = set()
        retries = self.config.max_retries
        room_until: float | None = None  # once a replica died holding the request: until when it waits for room
        while True:
            waits = room_until is not None and time.monotonic() < room_until
            try:
                await self._relay(dataclasses.replace(request, exclude=frozenset(tried)), send,
                                  last=retries == 0 and not waits)
                return
            except _ReplicaFailed as failed:
                if failed.overloaded and waits:  # an accepted request is not refused for its replica's death
                    await asyncio.sleep(ROOM_BACKOFF_S)
                    continue
                if retries == 0:
                    break
                retries -= 1
                self.retries += 1
                if failed.replica_id:
                    tried.add(failed.replica_id)
                if not failed.overloaded and room_until is None:
                    room_until = time.monotonic() + self.config.route_timeout
            except (asyncio.TimeoutError, BackPressureError, DeploymentUnavailableError):
                await error_response(path, APIError(503, "No replica has room for the request", code="overloaded",
                                                    headers={"Retry-After": "1"}))(scope, receive, send)
                return
        await error_response(path, APIError(502, "The replica serving the request failed; retry it",
                                            code="replica_failed"))(scope, receive, send)

    async def _relay(self, request: ForwardedRequest, send: Send, last: bool) -> None:
        """Forward once; raises _ReplicaFailed when the replica died (or, unless ``last``, refused as overloaded)
        before any byte reached the client, which the caller may retry elsewhere."""
        gen: DeploymentResponseGenerator[Any] = self.replicas.handle.remote(request)  # type: ignore[assignment]
        replica: str | None = None
        started = False
        sse_stream = False
        try:
            first = await asyncio.wait_for(gen.__anext__(), self.config.route_timeout)
            replica = first.replica_id
            async for part in _chain(first, gen):
                if isinstance(part, Accepted):
                    continue
                if isinstance(part, ResponseHead):
                    if not last and _overloaded(part):
                        raise _ReplicaFailed(replica, overloaded=True)  # another replica, or later, may have room
                    sse_stream = any(k == b"content-type" and v.startswith(b"text/event-stream")
                                     for k, v in part.headers)
                    headers = [(k, v) for k, v in part.headers if k not in DROPPED_RESPONSE_HEADERS]
                    await send({"type": "http.response.start", "status": part.status,
                                "headers": [*headers, (REPLICA_HEADER, replica.encode())]})
                    started = True
                await send({"type": "http.response.body", "body": part.body, "more_body": part.more_body})
            if not started:  # the replica's app ended without a response (a bug there): as if it died
                raise _ReplicaFailed(replica)
        except RayActorError as exc:
            self.replica_failures += 1
            log.warning("replica %s died under %s %s (%s)", replica, request.method, request.path,
                        "mid-response" if started else "before answering", exc_info=False)
            if not started:
                raise _ReplicaFailed(replica) from exc
            await send({"type": "http.response.body", "body": _failure_tail(request.path, sse_stream),
                        "more_body": False})
        except BaseException:
            gen.cancel()  # the client left (the proxy cancelled us), or the routing timed out
            raise


async def _chain(first: Reply, rest: DeploymentResponseGenerator[Any]) -> AsyncIterator[Reply]:
    yield first
    async for part in rest:
        yield part


def _overloaded(head: ResponseHead) -> bool:
    if head.status != 503 or head.more_body:
        return False
    try:
        err = orjson.loads(head.body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return False
    # the OpenAI shape names the code; the native one says it in its message
    return (isinstance(err, dict) and err.get("code") == "overloaded") or (
        isinstance(err, str) and err.startswith("Server overloaded"))


def _failure_tail(path: str, sse_stream: bool) -> bytes:
    """The end of a response whose replica died mid-stream: an error event in the route's shape."""
    if not sse_stream:
        return b""
    message = "The replica serving this request failed mid-response"
    if is_openai_path(path):
        return sse(error_body(path, 502, message, code="replica_failed")) + sse(b"[DONE]")
    return sse({"error": message}, "error")


def _json(body: Any, status: int) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"Request body is larger than the limit of {limit} bytes",
                           headers={"Connection": "close"})
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
