"""The load client: sends one prepared request and returns its timeline and verdict.

Two implementations share one contract and one set of failure classes:

- ``RawClient``: asyncio protocols with llhttp (``httptools``) parsing and a
  keep-alive connection pool. On this project's 2-core machines aiohttp tops out
  near 5-6k req/s on ``/health``, which is below what a fast server answers, so
  plain ``http://`` runs use this one by default (``realizar loadtest calibrate``
  prints both ceilings).
- ``AiohttpClient``: aiohttp, for ``https://`` and as a cross-check
  (``--client aiohttp``).

Each request's bytes are built once, before the clock starts.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, Protocol, cast
from urllib.parse import urlsplit

import aiohttp
import httptools

from realizar.loadtest.stats import FailureClass, RequestRecord, classify_status
from realizar.loadtest.workload import ContentError, RequestSpec, ResponseKind, StreamState

ClientKind = Literal["auto", "raw", "aiohttp"]
_MAX_ERROR_BODY = 64 * 1024
_perf = time.perf_counter


@dataclass(frozen=True)
class Target:
    """Where requests go, parsed once."""

    scheme: str
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, base_url: str) -> Target:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base URL must be http(s)://host[:port], got {base_url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.authority}{self.base_path}{path}"


@dataclass(frozen=True)
class PreparedRequest:
    spec: RequestSpec
    url: str
    wire: bytes  # the whole HTTP/1.1 request, for RawClient


def prepare(spec: RequestSpec, target: Target) -> PreparedRequest:
    lines = [f"{spec.method} {target.base_path}{spec.path} HTTP/1.1", f"Host: {target.authority}",
             "User-Agent: realizar-loadtest"]
    if spec.kind is not ResponseKind.JSON:
        lines.append("Accept: text/event-stream")
    for name, value in spec.headers:
        lines.append(f"{name}: {value}")
    if spec.body is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(spec.body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return PreparedRequest(spec, target.url(spec.path), head + (spec.body or b""))


class Client(Protocol):
    """Sends requests; never raises for a failed request, it records why."""

    async def send(self, req: PreparedRequest, index: int, intended: float) -> RequestRecord: ...

    async def aclose(self) -> None: ...


def new_stream(spec: RequestSpec) -> StreamState | None:
    """The parser for a streamed response (None for plain JSON); it keeps the text when the spec judges it."""
    if spec.kind is ResponseKind.JSON:
        return None
    return StreamState(spec.kind, keep_text=spec.validate is not None)


def finish_body(rec: RequestRecord, spec: RequestSpec, body: bytes,
                stream: StreamState | None, complete: bool) -> None:
    """Classify a response whose status line arrived: HTTP status, truncation, content."""
    failure = classify_status(rec.status)
    if failure is not None:
        rec.failure = failure
        rec.error = body[:200].decode(errors="replace")
        return
    if stream is not None:
        rec.chunk_times = stream.chunk_times
        rec.first_token = stream.chunk_times[0] if stream.chunk_times else None
        rec.output_tokens = stream.output_tokens
        rec.input_tokens = stream.usage_input or 0
        rec.cached_tokens = stream.usage_cached
        if not complete or not stream.done:
            rec.failure = FailureClass.TRUNCATED_STREAM
            rec.error = "stream ended before its terminal event"
        elif msg := stream.content_error():
            rec.failure = FailureClass.CONTENT_CHECK
            rec.error = msg
        elif spec.validate is not None:
            rec.validity = spec.validate(stream.text)
        return
    if not complete:
        rec.failure = FailureClass.TRUNCATED_STREAM
        rec.error = "response body cut short"
        return
    if spec.check is not None:
        try:
            rec.output_tokens = spec.check(body)
        except ContentError as exc:
            rec.failure = FailureClass.CONTENT_CHECK
            rec.error = str(exc)


# ---------------------------------------------------------------- raw client

class _Outcome(Exception):
    def __init__(self, failure: FailureClass, message: str) -> None:
        super().__init__(message)
        self.failure = failure


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.stream: StreamState | None = None
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = True
        self.framed = False  # Content-Length or chunked: the body has a known end
        self.body: list[bytes] = []
        self.body_len = 0
        self.first_byte: float | None = None

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for: the connection is unusable
            self.abort()
            return
        if self.first_byte is None:
            self.first_byte = _perf()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._resolve(_Outcome(FailureClass.OTHER, f"HTTP protocol error: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.complete:
            if self.headers_done and not self.framed and self.stream is None:
                self.complete = True  # a body delimited by the close itself
                self._resolve(None)
            elif self.headers_done:
                self._resolve(_Outcome(FailureClass.TRUNCATED_STREAM, "connection closed mid-response"))
            else:
                reason = f"connection reset ({exc})" if exc else "connection closed before a response"
                self._resolve(_Outcome(FailureClass.CONNECTION_ERROR, reason))
        self.client._forget(self)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        if self.stream is not None and not 200 <= self.status < 300:
            self.stream = None  # an error answer to a stream request: keep its body instead

    def on_body(self, body: bytes) -> None:
        if self.stream is not None:
            self.stream.feed(body, _perf())
        elif self.body_len < _MAX_ERROR_BODY or 200 <= self.status < 300:
            self.body.append(body)
            self.body_len += len(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._resolve(None)

    # our side
    def _resolve(self, outcome: _Outcome | None) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if outcome is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(outcome)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timeout(self) -> None:
        self.timer = None
        self._resolve(_Outcome(FailureClass.TOTAL_TIMEOUT, "no complete response before the timeout"))
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def start(self, req: PreparedRequest, deadline: float) -> asyncio.Future[None]:
        loop = self.client.loop
        self.waiter = loop.create_future()
        self.stream = new_stream(req.spec)
        self.status = 0
        self.headers_done = self.complete = self.framed = False
        self.body = []
        self.body_len = 0
        self.first_byte = None
        # perf_counter and loop.time() are both monotonic; convert the deadline
        self.timer = loop.call_at(loop.time() + (deadline - _perf()), self._on_timeout)
        assert self.transport is not None
        self.transport.write(req.wire)
        return self.waiter

    def reset(self) -> None:
        self.waiter = None
        self.stream = None
        self.body = []


class RawClient:
    """asyncio + httptools client with a bounded keep-alive pool."""

    def __init__(self, base_url: str, *, max_connections: int, timeout: float,
                 connect_timeout: float = 10.0) -> None:
        self.target = Target.parse(base_url)
        self.max_connections = max_connections
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self._ssl = ssl.create_default_context() if self.target.scheme == "https" else None

    def prepare(self, spec: RequestSpec) -> PreparedRequest:
        return prepare(spec, self.target)

    def _forget(self, conn: _Conn) -> None:
        if conn in self._all:
            self._all.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            self._wake(None)

    def _wake(self, conn: _Conn | None) -> bool:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    def _release(self, conn: _Conn) -> None:
        conn.reset()
        if conn.closed:
            return
        if not conn.keep_alive:
            conn.abort()
            return
        if not self._wake(conn):
            self._idle.append(conn)

    async def _connect(self, deadline: float) -> _Conn:
        budget = deadline - _perf()
        limit = min(self.connect_timeout, budget)
        self._connecting += 1
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Conn(self), self.target.host, self.target.port,
                                            ssl=self._ssl),
                timeout=max(limit, 0.0))
        except (asyncio.TimeoutError, TimeoutError):
            kind = FailureClass.CONNECT_TIMEOUT if limit < budget else FailureClass.TOTAL_TIMEOUT
            raise _Outcome(kind, f"connect took longer than {limit:.3g}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise _Outcome(FailureClass.CONNECTION_ERROR, f"connect failed: {exc}") from None
        finally:
            self._connecting -= 1
        self._all.add(conn)
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    async def _acquire(self, deadline: float) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn, True
        while len(self._all) + self._connecting >= self.max_connections:
            fut: asyncio.Future[_Conn | None] = self.loop.create_future()
            self._waiters.append(fut)
            try:
                got = await asyncio.wait_for(fut, max(deadline - _perf(), 0.0))
            except (asyncio.TimeoutError, TimeoutError):
                raise _Outcome(FailureClass.TOTAL_TIMEOUT, "no free connection before the timeout") from None
            if got is not None and not got.closed:
                return got, True
        return await self._connect(deadline), False

    async def send(self, req: PreparedRequest, index: int, intended: float) -> RequestRecord:
        start = _perf()
        rec = RequestRecord(index, intended, start, start)
        deadline = start + self.timeout
        for attempt in (0, 1):
            conn: _Conn | None = None
            try:
                conn, reused = await self._acquire(deadline)
                rec.sent = _perf()
                await conn.start(req, deadline)
            except _Outcome as out:
                # A kept-alive connection the server closed while idle fails before any
                # byte comes back; that is not the server failing this request: retry once.
                if (attempt == 0 and conn is not None and reused and conn.first_byte is None
                        and out.failure is FailureClass.CONNECTION_ERROR):
                    conn.reset()
                    continue
                rec.failure, rec.error = out.failure, str(out)
            break
        rec.end = _perf()
        if conn is not None:
            rec.first_byte = conn.first_byte
            rec.status = conn.status
            if rec.failure is None or (rec.failure is FailureClass.TRUNCATED_STREAM and conn.headers_done):
                truncated = rec.failure is not None
                rec.failure = None
                finish_body(rec, req.spec, b"".join(conn.body), conn.stream, not truncated)
            if conn.complete:
                self._release(conn)
            else:
                conn.abort()
                conn.reset()
        return rec

    async def aclose(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)


# ---------------------------------------------------------------- aiohttp client

class AiohttpClient:
    """The same contract on aiohttp."""

    def __init__(self, base_url: str, *, max_connections: int, timeout: float,
                 connect_timeout: float = 10.0, keep_alive: bool = True) -> None:
        self.target = Target.parse(base_url)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # keep_alive=False: a connection per request, for servers that close idle kept-alive connections
        # under the client (llama.cpp's llama-server), where a request written to one fails
        connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections,
                                         ttl_dns_cache=300, enable_cleanup_closed=True, force_close=not keep_alive)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(connect_timeout, timeout)),
            skip_auto_headers=("User-Agent",))

    def prepare(self, spec: RequestSpec) -> PreparedRequest:
        return prepare(spec, self.target)

    async def send(self, req: PreparedRequest, index: int, intended: float,
                   stop: asyncio.Event | None = None) -> RequestRecord:
        """``stop``, once set, ends a stream at its next chunk: the connection is closed (so the server
        aborts the request) and the record is a truncated stream with what arrived until then."""
        spec = req.spec
        start = _perf()
        rec = RequestRecord(index, intended, start, start)
        complete = True
        headers = {"User-Agent": "realizar-loadtest", **dict(spec.headers)}
        if spec.body is not None:
            headers["Content-Type"] = "application/json"
        stream = new_stream(spec)
        body = b""
        got_headers = False
        try:
            async with self.session.request(spec.method, req.url, data=spec.body, headers=headers) as resp:
                got_headers = True
                rec.status = resp.status
                rec.first_byte = _perf()
                if stream is not None and 200 <= resp.status < 300:
                    async for chunk in resp.content.iter_any():
                        stream.feed(chunk, _perf())
                        if stop is not None and stop.is_set() and not stream.done:
                            complete = False
                            resp.close()
                            break
                else:
                    stream = None
                    body = await resp.read()
            rec.end = _perf()
            finish_body(rec, spec, body, stream, complete)
            return rec
        except aiohttp.ConnectionTimeoutError as exc:
            rec.failure, rec.error = FailureClass.CONNECT_TIMEOUT, str(exc) or "connect timeout"
        except (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError) as exc:
            rec.failure, rec.error = FailureClass.TOTAL_TIMEOUT, str(exc) or "timeout"
        except aiohttp.ClientPayloadError as exc:
            rec.failure, rec.error = FailureClass.TRUNCATED_STREAM, str(exc)
        except (aiohttp.ClientConnectionError, OSError) as exc:
            # after the status line a dropped connection cuts the response short
            rec.failure = FailureClass.TRUNCATED_STREAM if got_headers else FailureClass.CONNECTION_ERROR
            rec.error = str(exc) or type(exc).__name__
        except aiohttp.ClientResponseError as exc:
            rec.failure, rec.error = FailureClass.OTHER, str(exc)
        rec.end = _perf()
        if stream is not None and rec.failure is FailureClass.TRUNCATED_STREAM and 200 <= rec.status < 300:
            rec.chunk_times = stream.chunk_times
            rec.output_tokens = stream.output_tokens
        return rec

    async def aclose(self) -> None:
        await self.session.close()


def make_client(kind: ClientKind, base_url: str, *, max_connections: int, timeout: float,
                connect_timeout: float = 10.0) -> RawClient | AiohttpClient:
    """``auto`` is the raw client for http:// and aiohttp for https://."""
    if kind == "auto":
        kind = "aiohttp" if base_url.startswith("https://") else "raw"
    cls = RawClient if kind == "raw" else AiohttpClient
    return cls(base_url, max_connections=max_connections, timeout=timeout, connect_timeout=connect_timeout)
