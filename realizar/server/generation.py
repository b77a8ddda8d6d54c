"""One HTTP request's generations on the engine, and the text they turn into.

:class:`Generation` owns the engine requests of one HTTP request. It submits them (mapping
admission errors to HTTP statuses), aborts them when the request times out or the client
goes away, and releases them when the route is done. :class:`ChoiceText` turns a token
stream into text: incremental detokenization, server-side stop strings, held-back text for
streaming, and OpenAI-style logprobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from realizar.engine.errors import EngineDead, EngineOverloaded, InvalidRequest
from realizar.request import FinishReason, GrammarError, Logprob, Request, SamplingParams, TokenOutput
from realizar.server.errors import APIError
from realizar.server.http import RequestContext

if TYPE_CHECKING:
    from realizar.server.engine_client import EngineClient, EngineStream
    from realizar.server.protocol import StructuredField
    from realizar.tokenizer import Tokenizer

log = logging.getLogger("realizar.server")

OFFLOAD_CHARS = 32_768  # texts longer than this are tokenized off the event loop


async def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True, *,
                 parse_special: bool = False, param: str = "prompt") -> list[int]:
    """Token ids of a client's text; special tokens in it are text unless ``parse_special``."""
    try:
        if len(text) > OFFLOAD_CHARS:
            return await asyncio.to_thread(functools.partial(tokenizer.encode, text, add_special_tokens,
                                                             parse_special=parse_special))
        return tokenizer.encode(text, add_special_tokens, parse_special=parse_special)
    except ValueError as exc:  # the text holds the tokenizer's private marker
        raise APIError(400, f"Cannot tokenize '{param}': {exc}", param=param) from None


async def encode_many(tokenizer: Tokenizer, texts: Sequence[str], add_special_tokens: bool = True, *,
                      parse_special: bool = False, param: str = "prompts") -> list[list[int]]:
    """:func:`encode` for a batch of texts."""
    try:
        if sum(map(len, texts)) > OFFLOAD_CHARS:
            return await asyncio.to_thread(functools.partial(tokenizer.encode_batch, list(texts), add_special_tokens,
                                                             parse_special=parse_special))
        return [tokenizer.encode(t, add_special_tokens, parse_special=parse_special) for t in texts]
    except ValueError as exc:
        raise APIError(400, f"Cannot tokenize '{param}': {exc}", param=param) from None


def check_prompt(ids: list[int], param: str = "prompt") -> list[int]:
    if not ids:
        raise APIError(400, "Prompt cannot be empty", param=param)
    return ids


def check_model(names: Sequence[str], model: str | None) -> None:
    """A request that names a model must name one of ``names`` (the served names, aliases included)."""
    if model is not None and model not in names:
        raise APIError(404, f"Model '{model}' not found", param="model", code="model_not_found")


async def check_structured(offload: Callable[..., Awaitable[None]], engine: EngineClient,
                           structured: StructuredField | None) -> None:
    """Compile a request's structured-output spec (into the engine's cache, which the engine then hits) before
    anything is queued, so that a bad schema, regex or grammar is a 400 naming its field and the problem.
    Off the event loop (``offload``: the server's worker thread): a new spec takes milliseconds, the very
    first one also builds the compiler."""
    if structured is None:
        return
    try:
        await offload(engine.compile_structured, structured.spec)
    except GrammarError as exc:
        raise APIError(400, f"Invalid '{structured.param}': {exc}", param=structured.param) from None


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """Every token id a request carries must name a vocabulary entry: 400 naming the field."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"Token id {bad} in '{param}' is outside the vocabulary (0..{vocab_size - 1})",
                       param=param)


def fit_params(params: SamplingParams, engine: EngineClient) -> SamplingParams:
    """A top_k at or over the vocabulary filters nothing: say so the engine's way (0). (The token
    ids the parameters carry are checked against the vocabulary by the engine when the request is
    submitted, for every caller: a 400 naming the field, see :meth:`Generation.submit`.)"""
    if params.top_k >= engine.model_config.vocab_size:
        return dataclasses.replace(params, top_k=0)
    return params


class Stream:
    """The outputs of one engine request, with the bookkeeping its :class:`Generation` needs."""

    def __init__(self, generation: Generation, request_id: str, source: EngineStream) -> None:
        self.generation = generation
        self.request_id = request_id
        self.source = source
        self.finished = False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> TokenOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.source.__anext__()
        gen = self.generation
        if out.token_id is not None:
            gen.ctx.tokens += 1
        if out.finish_reason is not None:
            self.finished = True
            gen.live.discard(self.request_id)
            if out.finish_reason is FinishReason.TIMEOUT and gen.cancelled is None:
                gen.cancelled = gen.timeout_error()
            elif out.finish_reason is FinishReason.ERROR:
                gen.errors.append(out.error or "unknown engine error")
                log.error("request %s failed in the engine: %s", self.request_id, out.error)
        return out

    async def close(self) -> None:
        """Release the engine request (the engine aborts it if it has not finished)."""
        await self.source.aclose()


class Generation:
    """The engine requests of one HTTP request, under one deadline and one connection.

    ``cancel(error)`` aborts every unfinished engine request and records why; the first
    reason wins (a timeout, the client going away, the server shutting down).
    """

    def __init__(self, engine: EngineClient, ctx: RequestContext, timeout: float,
                 registry: set[Generation]) -> None:
        self.engine = engine
        self.ctx = ctx
        self.timeout = timeout  # s from the request's arrival (ctx.started)
        self.registry = registry  # the server's generations in flight (a shutdown aborts them); joined on submit
        self.deadline = ctx.started + self.timeout
        self.streams: list[Stream] = []
        self.live: set[str] = set()
        self.errors: list[str] = []
        self.cancelled: APIError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Stream:
        request_id = f"{self.ctx.request_id}.{len(self.streams)}"
        request = Request(prompt_ids, params, request_id=request_id, arrival_time=self.ctx.started,
                          deadline=self.deadline)
        try:
            source = self.engine.submit(request)
        except EngineOverloaded as exc:
            retry = str(max(1, math.ceil(exc.retry_after)))
            raise APIError(503, f"Server overloaded; retry in {retry} s", code="overloaded",
                           headers={"Retry-After": retry}) from None
        except EngineDead:
            message = ("The server is shutting down" if self.engine.healthy
                       else "The engine stopped after a fatal error")
            raise APIError(503, message, code="unavailable", headers={"Retry-After": "1"}) from None
        except InvalidRequest as exc:  # a token id outside the vocabulary (prompt, stop ids, logit bias)
            raise APIError(400, str(exc), param=exc.param) from None
        except ValueError as exc:  # RequestTooLong: prompt plus max_tokens over the context
            raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
        stream = Stream(self, request_id, source)
        self.streams.append(stream)
        self.live.add(request_id)
        if self._timer is None:
            self.registry.add(self)
            delay = max(0.0, self.deadline - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self.cancel, self.timeout_error())
        return stream

    def timeout_error(self) -> APIError:
        return APIError(504, f"Request timed out after {self.timeout:g} s", code="timeout")

    def abort(self, request_id: str) -> None:
        """Abort one engine request (a stop string ended it); the others carry on."""
        if request_id in self.live:
            self.engine.abort(request_id)

    def cancel(self, error: APIError) -> None:
        if self.cancelled is None:
            self.cancelled = error
        for request_id in list(self.live):
            self.engine.abort(request_id)

    def watch(self, receive: Receive) -> None:
        """Abort everything when the client disconnects (the body must already be read)."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if self.cancelled is None and self.live:  # the first reason wins: it is a client abort
                    self.ctx.client_gone = True
                self.cancel(APIError(499, "Client closed the request"))
                return

    @contextlib.asynccontextmanager
    async def closed_on_error(self) -> AsyncIterator[None]:
        """Close this generation if the block raises, e.g. when a later submit is refused."""
        try:
            yield
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the timer and the watcher; abort and release whatever has not finished."""
        self.registry.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
        for stream in self.streams:
            await stream.close()
        self.live.clear()

    def problem(self) -> APIError | None:
        """Why the generation did not complete normally, as the error the client should get."""
        if self.cancelled is not None:
            return self.cancelled
        if self.errors:
            return APIError(500, f"Internal error while generating (request id {self.ctx.request_id})",
                            code="internal_error")
        return None

    def raise_for_problem(self) -> None:
        error = self.problem()
        if error is not None:
            self.ctx.failed = True
            raise error


async def merge(streams: Sequence[Stream]) -> AsyncGenerator[tuple[int, TokenOutput], None]:
    """Interleave several streams' outputs as they come, tagged with each stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, TokenOutput | None]] = asyncio.Queue()

    async def pump(index: int, stream: Stream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(data: Any, event: str | None = None) -> bytes:
    """One Server-Sent Event frame: ``data`` as JSON (``bytes`` go as they are: ``b"[DONE]"``, a
    body already encoded), named ``event`` when given. The payload holds no newline (orjson's
    output never does), so one ``data:`` line carries it."""
    payload = data if isinstance(data, bytes) else orjson.dumps(data)
    if event is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


class EventStream(Response):
    """A Server-Sent Events response that owns its :class:`Generation`.

    Each chunk is sent as soon as the body iterator yields it. A client disconnect aborts the
    engine requests at once, even while they still wait in the queue.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], generation: Generation) -> None:
        self.events = events
        self.generation = generation
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            self.generation.watch(receive)
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.events.aclose()
            await self.generation.close()


class ChoiceText:
    """The text of one generated sequence: detokenized, cut at stop strings, held back for streaming.

    With stop strings, the last ``len(longest stop) - 1`` characters are held back from a
    stream until they can no longer begin a stop string, so a stop string never reaches the
    client. ``prefix`` (the echoed prompt) is part of the text but never searched.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stops: Sequence[str],
                 prefix: str = "") -> None:
        self.detok = tokenizer.detokenizer(prompt_ids)
        self.stops = tuple(stops)
        self.hold = max(map(len, self.stops), default=1) - 1
        self.text = prefix
        self.search_from = len(prefix)
        self.sent = 0
        self.stopped = False  # a stop string ended the text

    def add(self, token_id: int, last: bool) -> int:
        """Append one token's text; returns the text offset where that token begins."""
        offset = len(self.text)
        delta = self.detok.step(token_id)
        if last:
            delta += self.detok.flush()
        if delta:
            start = max(self.search_from, offset - self.hold)
            self.text += delta
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        return offset

    def last_bytes(self) -> bytes:
        """The bytes the last token added to the text (before any cut at a stop string)."""
        return self.detok.last_bytes

    def take(self, final: bool) -> str:
        """The text not yet streamed that is safe to send now."""
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out


class TokenText:
    """How logprobs show a token: its string and its bytes (cached per id, since the same ids recur).

    ``bytes`` are the token's raw bytes in the text: a byte-fallback token (``<0xF0>``) or a byte-level piece of
    a character gives its partial UTF-8, and a special token that the text skips gives none. So the bytes of a
    sequence's tokens join into the UTF-8 of its text. ``token`` is those bytes decoded when they are valid
    UTF-8, else escaped as OpenAI shows them: ``undecodable_prefix`` (``"bytes:"`` in the completions format,
    nothing in the chat format) then ``\\xf0\\x9f``-style escapes of the invalid bytes. A skipped special token
    shows its spelling (``<|im_end|>``).
    """

    def __init__(self, tokenizer: Tokenizer, undecodable_prefix: str = "") -> None:
        self.tokenizer = tokenizer
        self.undecodable_prefix = undecodable_prefix
        self.cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        """A token out of context (a top alternative): its string and bytes."""
        shown = self.cache.get(token_id)
        if shown is None:
            raw = b"" if self.tokenizer.is_special(token_id) else self.tokenizer.token_bytes(token_id)
            shown = self.cache[token_id] = (self.show(token_id, raw), raw)
        return shown

    def in_text(self, token_id: int, raw: bytes) -> tuple[str, bytes]:
        """A token of a sequence, given the bytes its text got from it (a detokenizer's ``last_bytes``): they
        differ from the token's own where the text strips SentencePiece's first space or keeps a special token."""
        shown = self(token_id)
        return shown if shown[1] == raw else (self.show(token_id, raw), raw)

    def show(self, token_id: int, raw: bytes) -> str:
        if not raw and self.tokenizer.is_special(token_id):
            return self.tokenizer.decode([token_id])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return self.undecodable_prefix + raw.decode("utf-8", "backslashreplace")


class CompletionLogprobs:
    """``choices[i].logprobs`` of a text completion (the legacy OpenAI format).

    ``text_offset`` is the character offset in the choice's text where each token begins: the offset of the
    character its first byte belongs to, so a character split over several tokens gives them one offset and the
    offsets never decrease.
    """

    def __init__(self, token_text: TokenText) -> None:
        self.token_text = token_text
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add_prompt(self, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        """Echoed prompt tokens: their text and offsets, as the echoed text (the prompt decoded, skipping
        special tokens or not) holds them. Their logprobs come with the first generated token
        (``set_prompt_logprobs``); the first prompt token's stays null."""
        detok = self.token_text.tokenizer.detokenizer(skip_special_tokens=skip_special_tokens)
        offset = 0
        for token_id in prompt_ids:
            text = detok.step(token_id)
            self.add(self.token_text.in_text(token_id, detok.last_bytes)[0], None, None, offset)
            offset += len(text)

    def set_prompt_logprobs(self, scored: Sequence[Logprob]) -> None:
        """The logprobs of echoed prompt tokens 1, 2, ... (added by ``add_prompt``)."""
        for i, (logprob, top) in enumerate(scored, start=1):
            self.token_logprobs[i] = logprob
            self.top_logprobs[i] = {self.token_text(t)[0]: lp for t, lp in top}

    def add_output(self, out: TokenOutput, offset: int, raw: bytes) -> None:
        """A generated token that begins at ``offset`` and added ``raw`` to the text."""
        assert out.token_id is not None
        top = {self.token_text(t)[0]: lp for t, lp in out.top_logprobs}
        self.add(self.token_text.in_text(out.token_id, raw)[0], out.logprob, top, offset)

    def add(self, token: str, logprob: float | None, top: dict[str, float] | None, offset: int) -> None:
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)

    def since(self, start: int) -> dict[str, Any]:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


def chat_logprob(token_text: TokenText, out: TokenOutput, raw: bytes) -> dict[str, Any]:
    """One entry of ``choices[i].logprobs.content`` (the chat format), for a generated token that added
    ``raw`` to the text; see :class:`TokenText` for ``token`` and ``bytes``."""
    assert out.token_id is not None
    token, raw = token_text.in_text(out.token_id, raw)
    top = []
    for token_id, logprob in out.top_logprobs:
        alternative, alternative_raw = token_text(token_id)
        top.append({"token": alternative, "logprob": logprob, "bytes": list(alternative_raw)})
    return {"token": token, "logprob": out.logprob, "bytes": list(raw), "top_logprobs": top}
