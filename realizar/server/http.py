"""Small HTTP helpers shared by the routes: per-request context, JSON in and out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from realizar.server.errors import APIError

SCOPE_KEY = "realizar"


class GenerationRoute(Route):
    """A route that runs generations on the engine: its requests count in the outcome metrics
    (succeeded, failed, refused, aborted)."""


@dataclass
class RequestContext:
    """What the middleware and a route share about one HTTP request."""

    request_id: str
    started: float  # time.monotonic() at arrival
    tokens: int = 0  # generated tokens, for the access log and the original metrics
    failed: bool = False  # a server-side failure (a 5xx, or a stream that ended in error)
    refused: str | None = None  # a 503 refusal before any work: "overloaded" or "unavailable"
    client_gone: bool = False  # the client disconnected before the answer was complete


def context(request: Request) -> RequestContext:
    """The context the serving middleware put in the request's scope."""
    ctx: RequestContext = request.scope[SCOPE_KEY]
    return ctx


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def read_json(request: Request, limit: int) -> Any:
    """The parsed JSON body; 413 past ``limit`` bytes (declared or streamed), 400 if not JSON."""
    return parse_json(await read_body(request, limit))


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body; 413 past ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(data: bytes) -> Any:
    """``data`` parsed as JSON; 400 if empty or not JSON."""
    if not data.strip():
        raise APIError(400, "Request body is empty; expected a JSON object")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}") from None


def _too_large(limit: int) -> APIError:
    # The rest of the body may still be on the wire: close the connection rather than read it.
    return APIError(413, f"Request body is larger than the limit of {limit} bytes",
                    headers={"Connection": "close"})
