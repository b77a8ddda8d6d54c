"""What the server needs of an engine: the :class:`EngineClient` protocol.

The server sits above the engine and talks to it only through this interface, so the ASGI app
can be built over any object that has this shape. :class:`realizar.engine.engine.AsyncEngine` is
the real one (mypy checks that it conforms, where ``realizar serve`` passes it to the server);
the tests' scripted client (``tests/scripted_engine.py``) is another, which lets the whole HTTP
surface run in-process in milliseconds without a model.

This module imports no torch: the request, config and stats types it names are plain data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from realizar.config import ModelConfig
    from realizar.engine.stats import EngineStats, LatencyObservations
    from realizar.request import Request, StructuredSpec, TokenOutput
    from realizar.tokenizer import Tokenizer


class EngineStream(Protocol):
    """The outputs of one admitted request, an async iterator ending with its finished event.

    ``aclose()`` before the end aborts the request (also when the stream was never iterated)."""

    def __aiter__(self) -> EngineStream: ...

    async def __anext__(self) -> TokenOutput: ...

    async def aclose(self) -> None: ...


class EngineClient(Protocol):
    """The engine as the server uses it (see ``realizar.engine.engine.AsyncEngine`` for the semantics).

    ``submit`` refuses with the errors of ``realizar.engine.errors`` (``EngineOverloaded``,
    ``EngineDead``, ``InvalidRequest``, ``RequestTooLong``), which the server maps to HTTP statuses.
    """

    # -- what the model is (read by /health, /models, validation and tokenization) --

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def model_config(self) -> ModelConfig: ...

    @property
    def model_id(self) -> str: ...

    @property
    def model_format(self) -> str: ...

    @property
    def compute_mode(self) -> str: ...

    @property
    def compute_path(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def load_seconds(self) -> float: ...

    @property
    def healthy(self) -> bool:
        """False once the engine stopped after a fatal error."""
        ...

    # -- requests --

    def submit(self, request: Request) -> EngineStream:
        """Admit ``request`` and return the stream of its outputs, or raise an admission error."""
        ...

    def abort(self, request_id: str) -> None:
        """Cancel a request; idempotent, and a no-op for one that has finished."""
        ...

    def compile_structured(self, spec: StructuredSpec) -> None:
        """Compile a structured-output spec; raises ``GrammarError`` naming the problem. Blocking (the
        server calls it on a worker thread)."""
        ...

    # -- metrics (the shape of realizar.metrics.StatsSource) --

    def stats(self) -> EngineStats: ...

    def drain_observations(self) -> LatencyObservations: ...

    # -- lifecycle --

    async def start(self) -> None: ...

    def begin_shutdown(self) -> None:
        """Refuse new requests (``EngineDead``); admitted ones carry on."""
        ...

    async def drain(self, timeout: float) -> bool:
        """Wait until every admitted request has finished; False on timeout."""
        ...

    async def stop(self) -> None: ...
