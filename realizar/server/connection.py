"""Connection-level limits, on top of uvicorn's httptools protocol.

uvicorn bounds none of what a client controls before a request reaches the app: a socket
that never sends a byte, headers that never end, a body shorter than its Content-Length,
headers of any size or number, any number of open sockets. :class:`GuardedProtocol` is
uvicorn's ``HttpToolsProtocol`` with those bounds (``ServerConfig`` names them):

* ``idle_timeout``: a connection with no request in progress (new, or between keep-alive
  requests) is closed after this long, even if stray bytes that begin no request arrive;
* ``header_timeout``: the request line and headers must be complete this long after the
  request's first byte, else 408 and close;
* ``body_timeout``: the body must be complete this long after the headers, else 408 and close;
* ``max_header_bytes`` (request line and headers together) and ``max_headers``: past
  either, 431 and close; bytes of unfinished headers count too, so a header that never
  ends cannot grow the parser's buffers without bound;
* ``max_connections``: a connection over the cap is answered 503 and closed at once, so
  file descriptors never run out (``runner`` keeps the cap below ``RLIMIT_NOFILE``).

Each request's scope also carries a :class:`ConnectionHandle` under
``scope["extensions"]["realizar.connection"]``, through which the app can drop the
connection when a response outlives its deadline (a client that stops reading blocks a
send forever otherwise; ``transport.close()`` would wait for it, ``abort()`` does not).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from realizar.config import ServerConfig
from realizar.server.errors import error_body

log = logging.getLogger("realizar.server")

EXTENSION_KEY = "realizar.connection"
SHED_LOG_PERIOD_S = 10.0  # at most one "shedding connections" warning per period


class Phase(enum.Enum):
    IDLE = "idle"  # no request begun: waiting for its first byte
    HEADERS = "headers"  # request begun, headers not complete
    BODY = "body"  # headers complete, body not complete
    HANDLED = "handled"  # the whole request is read; the app has it


class Rejection(str, enum.Enum):
    """Why a connection was refused or closed before the app saw its request (a metrics label)."""

    MAX_CONNECTIONS = "max_connections"
    IDLE_TIMEOUT = "idle_timeout"
    HEADER_TIMEOUT = "header_timeout"
    BODY_TIMEOUT = "body_timeout"
    HEADERS_TOO_LARGE = "headers_too_large"
    TOO_MANY_HEADERS = "too_many_headers"


class _HeadersOverLimit(Exception):
    """Raised inside a parser callback to stop parsing; httptools wraps it in HttpParserCallbackError."""


class ConnectionHandle:
    """What the app may do to the connection of one request."""

    def __init__(self, protocol: GuardedProtocol, cycle: RequestResponseCycle) -> None:
        self._protocol = protocol
        self._cycle = cycle
        self.read_timed_out = False  # the body did not arrive in time; the client got a 408

    @property
    def finished(self) -> bool:
        """The response is complete and its last byte handed to the kernel (uvicorn calls a response
        complete once it is buffered; a client that does not read keeps it in the buffer)."""
        return self._cycle.response_complete and not self._protocol.transport.get_write_buffer_size()

    def abort(self) -> None:
        """Drop the connection now, unsent bytes included, unless the response is finished."""
        if not self.finished:
            self._protocol.transport.abort()

    def close_after_response(self) -> None:
        """Close the connection once this response is sent, instead of keeping it alive."""
        self._cycle.keep_alive = False


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of the module docstring.

    Build it with :func:`guarded_protocol`, which binds the limits; uvicorn instantiates
    the class once per connection.
    """

    config_limits: ServerConfig
    max_connections: int
    on_reject: Callable[[Rejection], None]
    _last_shed_log = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = Phase.IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # request line and complete headers of the request being read
        self._unparsed_bytes = 0  # bytes received while its headers were still incomplete
        self._header_count = 0
        self._over_limit: Rejection | None = None
        self._messages_completed = 0
        self._header_timer_deferred = False
        self._handle: ConnectionHandle | None = None

    # -- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._shed()
            return
        self._arm(self.config_limits.idle_timeout, self._idle_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _shed(self) -> None:
        now = time.monotonic()
        if now - GuardedProtocol._last_shed_log >= SHED_LOG_PERIOD_S:
            GuardedProtocol._last_shed_log = now
            log.warning("%d connections open, the limit (--max-connections %d): new connections get 503",
                        len(self.connections) - 1, self.max_connections)
        self.on_reject(Rejection.MAX_CONNECTIONS)
        self._reply_and_close(503, "The server has too many open connections; retry shortly", b"/",
                              extra=b"retry-after: 1\r\n")

    def shutdown(self) -> None:
        # uvicorn closes idle connections gracefully; one whose client stopped reading a
        # finished response would keep its unsent bytes, and the process, waiting.
        if (self.cycle is None or self.cycle.response_complete) and self.transport.get_write_buffer_size():
            self.transport.abort()
            return
        super().shutdown()

    # -- reading ---------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()  # uvicorn's keep-alive timer; ours runs on
        if self.transport.is_closing():
            return
        phase_before = self._phase
        completed_before = self._messages_completed
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if self._over_limit is None:
                self._bad_request()
                return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        if self._over_limit is None and self._phase is Phase.HEADERS:
            # Bytes of headers that have not ended yet sit in the parser's buffers: bound them too.
            # When a message ended in this chunk, its share of the chunk is unknown: count none.
            if phase_before is Phase.HEADERS or self._messages_completed == completed_before:
                self._unparsed_bytes += len(data)
            if self._unparsed_bytes > self.config_limits.max_header_bytes:
                self._over_limit = Rejection.HEADERS_TOO_LARGE
        if self._over_limit is not None:
            self._reject_headers(self._over_limit)

    def _bad_request(self) -> None:
        self.logger.debug("Invalid HTTP request received.")
        self._reply_and_close(400, "Invalid HTTP request", self._path())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = Phase.HEADERS
        self._header_bytes = 0
        self._unparsed_bytes = 0
        self._header_count = 0
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request behind one still being answered: its clock starts when that one ends.
            self._disarm()
            self._header_timer_deferred = True
        else:
            self._arm(self.config_limits.header_timeout, self._header_expired)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.config_limits.max_headers:
            self._over_limit = Rejection.TOO_MANY_HEADERS
            raise _HeadersOverLimit
        self._count_header_bytes(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.config_limits.max_header_bytes:
            self._over_limit = Rejection.HEADERS_TOO_LARGE
            raise _HeadersOverLimit

    def on_headers_complete(self) -> None:
        self._phase = Phase.BODY
        if self._header_timer_deferred:
            self._header_timer_deferred = False  # pipelined: reading pauses until its turn
        else:
            self._arm(self.config_limits.body_timeout, self._body_expired)
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope:
            self._handle = ConnectionHandle(self, self.cycle)
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})  # type: ignore[assignment]
            extensions[EXTENSION_KEY] = self._handle

    def on_message_complete(self) -> None:
        self._messages_completed += 1
        super().on_message_complete()
        if self._phase is not Phase.BODY:
            return
        if self._no_response_pending():  # answered before its body was read: wait for the next request
            self._phase = Phase.IDLE
            self._arm(self.config_limits.idle_timeout, self._idle_expired)
        else:
            self._phase = Phase.HANDLED
            self._disarm()

    def _no_response_pending(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next pipelined request, if there is one
        if self.transport.is_closing():
            return
        if self._phase is Phase.HANDLED and self._no_response_pending():
            self._phase = Phase.IDLE
            self._arm(self.config_limits.idle_timeout, self._idle_expired)
        elif self._header_timer_deferred:
            self._header_timer_deferred = False
            self._arm(self.config_limits.header_timeout, self._header_expired)

    # -- timers ----------------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_expired(self) -> None:
        self._timer = None
        if self.transport.get_write_buffer_size() and not self.transport.is_closing():
            # The client is still taking the last response in (its request's deadline bounds that).
            self._arm(self.config_limits.idle_timeout, self._idle_expired)
            return
        if self._phase is Phase.IDLE and self._no_response_pending() and not self.transport.is_closing():
            self.on_reject(Rejection.IDLE_TIMEOUT)
            self.transport.close()

    def _header_expired(self) -> None:
        self._timer = None
        if self._phase is Phase.HEADERS:
            self.on_reject(Rejection.HEADER_TIMEOUT)
            self._reply_and_close(408, f"The request headers did not arrive within "
                                       f"{self.config_limits.header_timeout:g} s", self._path())

    def _body_expired(self) -> None:
        self._timer = None
        if self._phase is not Phase.BODY:
            return
        self.on_reject(Rejection.BODY_TIMEOUT)
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            # The app waits for the rest of the body: it sees a disconnect, the client a 408.
            if self._handle is not None:
                self._handle.read_timed_out = True
            cycle.disconnected = True
            cycle.message_event.set()
            self._reply_and_close(408, f"The request body did not arrive within "
                                       f"{self.config_limits.body_timeout:g} s", self._path())
        else:
            self.transport.abort()

    # -- answers of our own ----------------------------------------------------------------------

    def _reject_headers(self, why: Rejection) -> None:
        self.on_reject(why)
        limits = self.config_limits
        message = (f"The request has more than {limits.max_headers} headers"
                   if why is Rejection.TOO_MANY_HEADERS
                   else f"The request line and headers are larger than {limits.max_header_bytes} bytes")
        self._reply_and_close(431, message, self._path())

    def _path(self) -> bytes:
        url = getattr(self, "url", b"") or b"/"
        return url.split(b"?", 1)[0][:256]

    def _reply_and_close(self, status: int, message: str, path: bytes, extra: bytes = b"") -> None:
        """Answer ``status`` with a JSON error and close, before (or instead of) the app."""
        self._disarm()
        self._phase = Phase.HANDLED
        if self.transport.is_closing():
            return
        body = error_body(path.decode("latin-1"), status, message)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                 b"\r\nconnection: close\r\n", extra, b"\r\n", body]
        self.transport.write(b"".join(head))
        self.transport.close()


def guarded_protocol(config: ServerConfig, max_connections: int,
                     on_reject: Callable[[Rejection], None]) -> type[GuardedProtocol]:
    """A :class:`GuardedProtocol` subclass bound to ``config``'s limits, for ``uvicorn.Config(http=...)``."""
    return type("BoundGuardedProtocol", (GuardedProtocol,), {
        "config_limits": config, "max_connections": max_connections, "on_reject": staticmethod(on_reject),
    })
