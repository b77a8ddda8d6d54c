"""The ASGI application: routes, the serving middleware, and the shutdown hooks.

``build_app(engine, config)`` gives a Starlette app serving the native and the OpenAI API.
Pass ``engine=None`` to start serving before the model is loaded (``/health`` answers 503
``{"status": "loading"}``) and call ``attach_engine(app, engine)`` once it is.

Shutdown, as ``realizar.server.runner.serve`` drives it on SIGTERM/SIGINT::

    begin_shutdown(app)                  # new requests get 503; /health says "draining"
    await drain(app, timeout)            # in-flight requests finish (engine + HTTP responses)
    ...then stop uvicorn, then ``await engine.stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from realizar.config import ServerConfig
from realizar.metrics import CONTENT_TYPE, Outcome
from realizar.server.connection import EXTENSION_KEY, ConnectionHandle
from realizar.server.errors import APIError, error_body, error_response
from realizar.server.http import SCOPE_KEY, GenerationRoute, RequestContext
from realizar.server.native import NativeAPI
from realizar.server.openai import OpenAIAPI
from realizar.server.state import Phase, ServerState

if TYPE_CHECKING:
    from realizar.server.engine_client import EngineClient

log = logging.getLogger("realizar.server")
access_log = logging.getLogger("realizar.access")

OPEN_ROUTES = frozenset({"/health", "/ready"})  # no API key needed (probes carry none)
ALWAYS_SERVED = frozenset({"/health", "/ready", "/metrics"})  # answered while loading and draining too
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others: "other"
OBSERVATIONS_PERIOD_S = 1.0  # how often engine timings move into the histograms
# After --request-timeout the engine work is aborted and the error sent; a response still not
# finished this much later is stuck on a client that does not read: its connection is dropped.
RESPONSE_GRACE_S = 2.0
FLUSH_AT_SHUTDOWN_S = 1.0  # of the shutdown timeout, kept for the last bytes of each response
MAX_CLIENT_REQUEST_ID = 256  # bytes of a client's X-Request-Id that are echoed; a longer one gets ours


def build_app(engine: EngineClient | None, config: ServerConfig) -> Starlette:
    """The realizar ASGI app. ``engine`` must be started already, or None while it loads."""
    state = ServerState(config, engine)
    native, openai = NativeAPI(state), OpenAIAPI(state)

    async def health(request: Request) -> Response:
        return state.health()

    async def ready(request: Request) -> Response:
        return state.ready()

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *native.routes(),
        *openai.routes(),
    ]
    known = frozenset(r.path for r in routes)
    generation = frozenset(r.path for r in routes if isinstance(r, GenerationRoute))
    middleware = [Middleware(ServingMiddleware, state=state, known_routes=known, generation_routes=generation)]
    if config.cors_origins:
        # Outside the serving middleware, so preflight requests need no API key.
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                        allow_methods=["GET", "POST", "OPTIONS"],
                                        allow_headers=["Authorization", "Content-Type"]))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(_absorb_observations(state))
        try:
            yield
        finally:
            task.cancel()

    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={APIError: _api_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.realizar = state
    return app


def endpoints(app: Starlette) -> list[str]:
    """Every route the app serves, as "METHOD /path" (HEAD, which Starlette adds to GET, left out)."""
    out = []
    for route in app.routes:
        if isinstance(route, Route):
            out += [f"{method:<4} {route.path}" for method in sorted((route.methods or set()) - {"HEAD"})]
    return out


def server_state(app: Starlette) -> ServerState:
    state: ServerState = app.state.realizar
    return state


def attach_engine(app: Starlette, engine: EngineClient) -> None:
    """The model is loaded and ``engine`` started: start serving it."""
    server_state(app).attach(engine)


def fail_loading(app: Starlette) -> None:
    """The model did not load: /health answers 503 {"status": "failed"}."""
    server_state(app).fail()


def begin_shutdown(app: Starlette) -> None:
    """Stop admitting: new requests get 503 at once, in-flight ones carry on."""
    server_state(app).begin_shutdown()


async def drain(app: Starlette, timeout: float) -> bool:
    """Wait up to ``timeout`` s in all for in-flight requests (engine work, then HTTP responses).

    The engine gets the timeout less a short flush; then what is left of the engine work is
    aborted, and the last bytes of each response go out. A response still unfinished at the
    deadline (its client stopped reading) loses its connection. Returns False when something
    was still running at the deadline.
    """
    state = server_state(app)
    deadline = time.monotonic() + timeout
    drained = True
    if state.engine is not None:
        flush = min(FLUSH_AT_SHUTDOWN_S, timeout / 4)
        drained = bool(await state.engine.drain(max(0.0, timeout - flush)))
    if not drained:
        state.abort_all(APIError(503, "The server shut down before the request finished", code="unavailable"))
    while state.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if state.inflight:
        drained = False
        stuck = state.abort_connections()
        if stuck:
            log.warning("closed %d connection(s) whose clients did not read their responses", stuck)
    return drained


async def _absorb_observations(state: ServerState) -> None:
    # Keeps the engine's timing lists short even when nothing scrapes /metrics.
    while True:
        await asyncio.sleep(OBSERVATIONS_PERIOD_S)
        state.metrics.absorb()


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    ctx: RequestContext = request.scope[SCOPE_KEY]
    if exc.status == 503 and not ctx.failed:  # refused before any work (a generation that failed is marked)
        ctx.refused = exc.code or "unavailable"
    elif exc.status >= 500:
        ctx.failed = True
    return error_response(request.url.path, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    message = {404: f"Not found: {path}", 405: f"Method {request.method} not allowed on {path}"}.get(
        exc.status_code, exc.detail)
    headers = dict(exc.headers or {})
    return error_response(path, APIError(exc.status_code, message, headers=headers))


class ServingMiddleware:
    """Request ids, API key, admission while loading/draining, fault barrier, access log, metrics.

    One plain ASGI class, so the hot routes pay for one wrapper, not a stack of them.
    """

    def __init__(self, app: ASGIApp, state: ServerState, known_routes: frozenset[str],
                 generation_routes: frozenset[str]) -> None:
        self.app = app
        self.state = state
        self.known_routes = known_routes
        self.generation_routes = generation_routes
        key = state.config.api_key
        self.expected_auth = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        started = time.monotonic()
        path: str = scope["path"]
        route = path if path in self.known_routes else "unmatched"
        ctx = RequestContext(state.next_request_id(), started)
        scope[SCOPE_KEY] = ctx
        extensions = scope.get("extensions")
        conn: ConnectionHandle | None = extensions.get(EXTENSION_KEY) if extensions else None
        status = 0
        completed = False
        rid_header = (b"x-request-id", _client_request_id(scope) or ctx.request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, completed
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
                if conn is not None and (ctx.failed or (status >= 500 and ctx.refused is None)):
                    conn.close_after_response()  # before the headers, so that they say "connection: close"
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
                if conn is not None and ctx.failed:
                    conn.close_after_response()  # a stream that timed out or failed ends its connection
            await send(message)

        state.inflight += 1
        expiry: asyncio.TimerHandle | None = None
        if conn is not None:
            state.responding.add(conn)
            expiry = asyncio.get_running_loop().call_later(
                state.config.request_timeout + RESPONSE_GRACE_S, self._expired, ctx, conn)
        try:
            refusal = self._refusal(scope, path, ctx)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if state.phase is not Phase.DRAINING:
                raise
            # uvicorn cancels what outlives the shutdown drain (work still in a thread); its connection
            # is dropped already, and a traceback per request would only hide the shutdown's log.
            status = status or 503
            ctx.failed = True
        except ClientDisconnect:
            if conn is not None and conn.read_timed_out:
                status = 408  # the connection layer answered it
            else:
                status = status or 499
                ctx.client_gone = True
        except Exception:
            log.exception("request %s (%s %s) failed", ctx.request_id, scope["method"], path)
            ctx.failed = True
            if status == 0:
                body = error_body(path, 500, f"Internal server error (request id {ctx.request_id})",
                                  code="internal_error")
                await Response(body, status_code=500, media_type="application/json")(scope, receive, send_with_id)
            elif not completed:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            state.inflight -= 1
            if conn is not None:
                state.responding.discard(conn)
            if expiry is not None and (conn is None or conn.finished):
                expiry.cancel()  # else it stays: a complete response can still sit unread in the buffer
            elapsed = time.monotonic() - started
            method: str = scope["method"] if scope["method"] in METHODS else "other"
            state.metrics.observe_http(route, method, status, elapsed)
            if route in self.generation_routes:
                state.metrics.record_request(_outcome(status, ctx), ctx.tokens, elapsed, ctx.refused or "")
            if state.config.access_log:
                access_log.info(
                    "rid=%s method=%s route=%s status=%d latency_ms=%.2f tokens=%d",
                    ctx.request_id, method, route, status, elapsed * 1000.0, ctx.tokens,
                    extra={"request_id": ctx.request_id, "method": method, "route": route, "status": status,
                           "latency_ms": round(elapsed * 1000.0, 3), "tokens": ctx.tokens},
                )

    def _expired(self, ctx: RequestContext, conn: ConnectionHandle) -> None:
        if not conn.finished:
            log.warning("request %s: no complete response %g s past --request-timeout (the client does not "
                        "read); its connection is closed", ctx.request_id, RESPONSE_GRACE_S)
            conn.abort()

    def _refusal(self, scope: Scope, path: str, ctx: RequestContext) -> ASGIApp | None:
        """A response that refuses the request before routing, or None to route it."""
        state = self.state
        if self.expected_auth is not None and path not in OPEN_ROUTES:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected_auth):
                return error_response(path, APIError(401, "Missing or invalid API key", code="invalid_api_key",
                                                     headers={"WWW-Authenticate": "Bearer"}))
        if state.phase is not Phase.READY and path not in ALWAYS_SERVED:
            ctx.refused = "unavailable"
            headers = {"Retry-After": "1"}
            if state.phase is Phase.DRAINING:
                headers["Connection"] = "close"
            return error_response(path, APIError(503, state.unavailable_reason(), code="unavailable",
                                                 headers=headers))
        return None


def _client_request_id(scope: Scope) -> bytes | None:
    """The client's X-Request-Id, echoed on the response as OpenAI and vLLM do, when it is a sane token
    (visible ASCII, at most MAX_CLIENT_REQUEST_ID bytes); else None and the server's own id is sent.

    Only echoed: engine request ids stay the server's, so two clients sending the same id cannot collide."""
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            if 0 < len(value) <= MAX_CLIENT_REQUEST_ID and all(0x21 <= b <= 0x7E for b in value):
                return bytes(value)
            return None
    return None


def _outcome(status: int, ctx: RequestContext) -> Outcome:
    """How a generation request ended, for the metrics (a client that left is no server failure)."""
    if ctx.client_gone or status == 499:
        return Outcome.ABORTED
    if ctx.failed or (status >= 500 and ctx.refused is None):
        return Outcome.FAILED
    if ctx.refused is not None:
        return Outcome.REFUSED
    if status >= 400 or status == 0:
        return Outcome.CLIENT_ERROR
    return Outcome.SUCCESS
