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
