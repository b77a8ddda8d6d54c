"""Errors the engine raises at submission; the server maps each to an HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for engine admission errors."""


class EngineOverloaded(EngineError):
    """The queue bounds are exceeded (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDead(EngineError):
    """The engine is not accepting work: a fatal error, or shutting down (HTTP 503)."""


class RequestTooLong(EngineError, ValueError):
    """Prompt plus max_tokens exceeds the context window (HTTP 400)."""


class InvalidRequest(EngineError, ValueError):
    """A request the engine cannot run, e.g. a token id outside the vocabulary (HTTP 400).

    The server checks these at the edge; the engine checks again, so that no caller can put a
    request into a batch that would fail the whole step."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
