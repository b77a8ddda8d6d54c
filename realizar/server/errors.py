"""HTTP errors and their two JSON shapes.

Native routes answer ``{"error": "<message>"}``; ``/v1`` routes answer the OpenAI shape
``{"error": {"message", "type", "param", "code"}}``. Every error body is JSON and never
carries a stack trace or a file path.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response

# OpenAI ``error.type`` for each status we produce.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    499: "client_closed_request",
    500: "internal_server_error",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    """An error answered to the client as JSON with ``status``.

    ``param`` names the offending request field, when there is one.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers) if headers else {}


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_body(path: str, status: int, message: str, *, param: str | None = None,
               code: str | None = None) -> bytes:
    """The JSON error body for ``path``'s API family."""
    if is_openai_path(path):
        return orjson.dumps({"error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }})
    return orjson.dumps({"error": message})


def error_response(path: str, error: APIError) -> Response:
    # OpenAI clients expect 400 for every validation failure; native clients get 422 for types.
    status = 400 if error.status == 422 and is_openai_path(path) else error.status
    body = error_body(path, status, error.message, param=error.param, code=error.code)
    return Response(body, status_code=status, headers=error.headers, media_type="application/json")
