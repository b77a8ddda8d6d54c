"""A no-op HTTP server that answers the realizar and OpenAI routes with canned
bodies as fast as it can: ``realizar loadtest calibrate`` measures the client's
own ceiling against it, and tests use it as a stand-in server.

Run: ``python -m realizar.loadtest.noop_server --port 0`` prints
``LISTENING <port>`` once it accepts connections; with ``--reuse-port`` several
processes share that port, so it keeps up with several load workers.

Routes: GET /health, GET /metrics, POST /tokenize, /generate, /batch/tokenize,
/batch/generate, /stream/generate (SSE, ``max_tokens`` events), GET /sse?n=N
(N native SSE events), POST /v1/completions and /v1/chat/completions (with
``stream``), GET /v1/models. A chat request with ``response_format`` ``json_schema`` gets the
schema's smallest instance (first enum value, minimum integer, one-letter string), streamed in
4-character pieces, so structured-output runs have a server that honours the field.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import cast
from urllib.parse import parse_qs, urlsplit

import httptools
import orjson

from realizar.loadtest.runner import run_sync

_CHUNK_EVENTS = 64  # events per transport write; each is its own HTTP chunk on the wire


def _response(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 400: b"Bad Request"}.get(status, b"Error")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (status, reason, content_type, len(body))) + body


_HEALTH = _response(200, b'{"status":"healthy","version":"noop","model":"noop","compute_mode":"cpu"}')
_NOT_FOUND = _response(404, b'{"error":"not found"}')
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n")
_TOKEN_EVENT = b'event: token\ndata: {"token_id":42,"text":" a"}\n\n'
_TOKEN_CHUNK = b"%x\r\n%s\r\n" % (len(_TOKEN_EVENT), _TOKEN_EVENT)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _minimal_instance(schema: object) -> object:
    """The smallest value a simple schema accepts (objects, enums, strings, integers, numbers, booleans)."""
    if not isinstance(schema, dict):
        return None
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: _minimal_instance(props.get(k, {})) for k in schema.get("required", list(props))}
    if kind == "array":
        return [_minimal_instance(schema.get("items", {})) for _ in range(int(schema.get("minItems", 0)))]
    if kind == "string":
        return "x" * max(1, int(schema.get("minLength", 1)))
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return True
    return None


def _schema_pieces(payload: dict[str, object]) -> list[bytes] | None:
    """The answer to a ``response_format`` ``json_schema`` request, in content pieces (None: not one)."""
    fmt = payload.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    spec = fmt.get("json_schema")
    text = orjson.dumps(_minimal_instance(spec.get("schema") if isinstance(spec, dict) else None)).decode()
    return [text[i:i + 4].encode() for i in range(0, len(text), 4)]


def _generate_result(prompt: str, n: int) -> dict[str, object]:
    return {"token_ids": [1] * (len(prompt.split()) + n), "text": prompt + " a" * n, "num_generated": n}


class NoopProtocol(asyncio.Protocol):
    """Keep-alive HTTP/1.1, one parser per connection."""

    def __init__(self, server: NoopServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url, body = self.url, b"".join(self.body)
        self.url, self.body = b"", []
        method = self.parser.get_method()
        assert self.transport is not None
        if url == b"/health":
            self.transport.write(_HEALTH)
            return
        try:
            payload = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            self.transport.write(_response(400, b'{"error":"body is not JSON"}'))
            return
        parts = urlsplit(url.decode())
        path = parts.path
        if method == b"GET" and path == "/sse":
            n = int(parse_qs(parts.query).get("n", ["100"])[0])
            self.server.loop.create_task(self._native_stream(n))
        elif path == "/stream/generate":
            self.server.loop.create_task(self._native_stream(int(payload.get("max_tokens", 50))))
        elif path in ("/v1/completions", "/v1/chat/completions"):
            self._openai(path, payload)
        elif path == "/metrics":
            text = ("# TYPE realizar_num_requests_running gauge\n"
                    f"realizar_num_requests_running {self.server.streams}\n"
                    "# TYPE realizar_num_requests_waiting gauge\nrealizar_num_requests_waiting 0\n"
                    "# TYPE realizar_kv_cache_usage_ratio gauge\nrealizar_kv_cache_usage_ratio 0.0\n")
            self.transport.write(_response(200, text.encode(), b"text/plain; version=0.0.4"))
        elif path == "/tokenize":
            n = max(1, len(str(payload.get("text", "")).split()))
            self.transport.write(_response(200, orjson.dumps({"token_ids": [1] * n, "num_tokens": n})))
        elif path == "/batch/tokenize":
            results = [{"token_ids": [1] * max(1, len(str(t).split())), "num_tokens": max(1, len(str(t).split()))}
                       for t in payload.get("texts", [])]
            self.transport.write(_response(200, orjson.dumps({"results": results})))
        elif path == "/generate":
            result = _generate_result(str(payload.get("prompt", "")), int(payload.get("max_tokens", 50)))
            self.transport.write(_response(200, orjson.dumps(result)))
        elif path == "/batch/generate":
            n = int(payload.get("max_tokens", 50))
            results = [_generate_result(str(p), n) for p in payload.get("prompts", [])]
            self.transport.write(_response(200, orjson.dumps({"results": results})))
        elif path == "/v1/models":
            self.transport.write(_response(200, b'{"object":"list","data":[{"id":"noop","object":"model"}]}'))
        else:
            self.transport.write(_NOT_FOUND)

    async def _native_stream(self, n: int) -> None:
        transport = self.transport
        assert transport is not None
        self.server.streams += 1
        try:
            transport.write(_SSE_HEAD)
            sent = 0
            while sent < n and not transport.is_closing():
                k = min(_CHUNK_EVENTS, n - sent)
                transport.write(_TOKEN_CHUNK * k)
                sent += k
                await asyncio.sleep(0)
            done = b'event: done\ndata: {"num_generated":%d}\n\n' % n
            transport.write(_chunk(done) + b"0\r\n\r\n")
        finally:
            self.server.streams -= 1

    def _openai(self, path: str, payload: dict[str, object]) -> None:
        assert self.transport is not None
        chat = path.endswith("chat/completions")
        raw_n = payload.get("max_tokens", 16)
        n = raw_n if isinstance(raw_n, int) else 16
        prompt = str(payload.get("prompt", payload.get("messages", "")))
        prompt_tokens = max(1, len(prompt.split()))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        if not payload.get("stream"):
            choice: dict[str, object] = {"index": 0, "finish_reason": "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": " a" * n}
            else:
                choice["text"] = " a" * n
            obj = {"id": "x", "object": "chat.completion" if chat else "text_completion",
                   "model": "noop", "choices": [choice], "usage": usage}
            self.transport.write(_response(200, orjson.dumps(obj)))
            return
        pieces = _schema_pieces(payload) if chat else None
        if pieces is not None:
            n = len(pieces)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            events = b"".join(
                _chunk(b"data: " + orjson.dumps({"id": "x", "object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": p.decode()}}]}) + b"\n\n") for p in pieces)
        else:
            if chat:
                piece = b'{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" a"}}]}'
            else:
                piece = b'{"id":"x","object":"text_completion","choices":[{"index":0,"text":" a"}]}'
            events = _chunk(b"data: " + piece + b"\n\n") * n
        tail = b""
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            tail = _chunk(b"data: " + orjson.dumps({"id": "x", "choices": [], "usage": usage}) + b"\n\n")
        self.transport.write(_SSE_HEAD + events + tail + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


class NoopServer:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.streams = 0

    async def serve(self, host: str, port: int, ready: asyncio.Future[int] | None = None, *,
                    reuse_port: bool = False) -> None:
        server = await self.loop.create_server(lambda: NoopProtocol(self), host, port, backlog=1024,
                                               reuse_port=reuse_port or None)
        bound = int(server.sockets[0].getsockname()[1])
        if ready is not None:
            ready.set_result(bound)
        else:
            print(f"LISTENING {bound}", flush=True)
        async with server:
            await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realizar.loadtest.noop_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reuse-port", action="store_true",
                        help="bind with SO_REUSEPORT, so several of these processes share one port "
                             "(the kernel spreads connections over them)")
    args = parser.parse_args(argv)

    with contextlib.suppress(KeyboardInterrupt):
        run_sync(lambda: NoopServer().serve(args.host, args.port, reuse_port=args.reuse_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
