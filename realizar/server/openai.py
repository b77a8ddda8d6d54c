"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions.

Each prompt times ``n`` is one engine request (a "choice"); choices run concurrently and a
stream interleaves their chunks as tokens come. Stop strings are matched here, on the
detokenized text: the text is cut at the stop string and the engine request is aborted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from realizar.request import FinishReason, SamplingParams, TokenOutput
from realizar.server import protocol
from realizar.server.errors import APIError, error_body
from realizar.server.generation import (
    ChoiceText,
    CompletionLogprobs,
    EventStream,
    Generation,
    Stream,
    TokenText,
    chat_logprob,
    check_model,
    check_prompt,
    check_structured,
    encode,
    fit_params,
    merge,
    sse,
)
from realizar.server.http import GenerationRoute, context, json_response, parse_json, read_body, read_json
from realizar.server.state import ServerState
from realizar.server.tools import CLOSE_TAG, ToolCallStream, ToolChoice, parse_tool_calls, with_tools_section

if TYPE_CHECKING:
    from realizar.server.engine_client import EngineClient
    from realizar.tokenizer import Tokenizer

DONE = sse(b"[DONE]")
OFFLOAD_BODY_BYTES = 16_384  # chat bodies past this are parsed, rendered and tokenized in a worker thread
# What a chat template raises when a message lacks what it reads or holds the wrong type: internals, not news.
_TEMPLATE_FAILURES = (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError)
_MISSING_FIELD = re.compile(r"has no attribute '([^']+)'|'([^']+)' is undefined")


class Choice:
    """One generated sequence of a response, fed TokenOutputs in order."""

    def __init__(self, index: int, gen: Generation, stream: Stream, text: ChoiceText,
                 token_text: TokenText, completion_logprobs: CompletionLogprobs | None,
                 chat_logprobs: list[dict[str, Any]] | None) -> None:
        self.index = index
        self.gen = gen
        self.stream = stream
        self.text = text
        self.token_text = token_text
        self.completion_logprobs = completion_logprobs
        self.chat_logprobs = chat_logprobs
        self.logprobs_sent = 0
        self.num_tokens = 0
        self.cached_tokens = 0  # prompt tokens the engine took from its prefix cache
        self.finish_reason: str | None = None
        self.done = False

    def feed(self, out: TokenOutput) -> None:
        if self.done:
            return  # the rest of a sequence already cut at a stop string
        self.cached_tokens = max(self.cached_tokens, out.num_cached_tokens)
        if out.prompt_logprobs is not None and self.completion_logprobs is not None:
            self.completion_logprobs.set_prompt_logprobs(out.prompt_logprobs)
        if out.token_id is not None:
            self.num_tokens += 1
            offset = self.text.add(out.token_id, out.finished)
            if self.completion_logprobs is not None:
                self.completion_logprobs.add_output(out, offset, self.text.last_bytes())
            if self.chat_logprobs is not None:
                self.chat_logprobs.append(chat_logprob(self.token_text, out, self.text.last_bytes()))
            if self.text.stopped:
                self.done = True
                self.finish_reason = "stop"
                self.gen.abort(self.stream.request_id)
                return
        if out.finished:
            self.done = True
            self.finish_reason = _finish_reason(out)

    async def run(self) -> None:
        async for out in self.stream:
            self.feed(out)

    def new_logprobs(self) -> Any:
        """The logprobs not yet streamed, in this choice's format (None when not asked for)."""
        if self.completion_logprobs is not None:
            start, self.logprobs_sent = self.logprobs_sent, len(self.completion_logprobs.tokens)
            return self.completion_logprobs.since(start)
        if self.chat_logprobs is not None:
            start, self.logprobs_sent = self.logprobs_sent, len(self.chat_logprobs)
            return {"content": self.chat_logprobs[start:]}
        return None


def _chat_message(choice: Choice, tools: ToolChoice | None) -> dict[str, Any]:
    """A finished chat choice's ``message`` and ``finish_reason``: with tools offered, the text's tool call
    blocks become ``tool_calls`` and the rest the content (None when nothing is left)."""
    if tools is None:
        return {"message": {"role": "assistant", "content": choice.text.text}, "finish_reason": choice.finish_reason}
    parsed = parse_tool_calls(choice.text.text, tools)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.calls:
        message["tool_calls"] = [c.openai() for c in parsed.calls]
    return {"message": message, "finish_reason": _tool_finish_reason(choice.finish_reason, bool(parsed.calls))}


def _tool_finish_reason(finish: str | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" for a choice that ended (not cut at max_tokens) with calls to make."""
    return "tool_calls" if called and finish == "stop" else finish


def _finish_reason(out: TokenOutput) -> str:
    """OpenAI's finish_reason: "length" at max_tokens or the context limit, else "stop"."""
    return "length" if out.finish_reason is FinishReason.LENGTH else "stop"


class OpenAIAPI:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.config = state.config

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            GenerationRoute("/v1/completions", self.completions, methods=["POST"]),
            GenerationRoute("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]

    async def models(self, request: Request) -> Response:
        engine = self.state.require_engine()
        return json_response({"object": "list", "data": [{
            "id": self.state.model_id, "object": "model", "created": int(self.state.started_at),
            "owned_by": "realizar", "root": engine.model_id, "parent": None,
            "max_model_len": engine.max_model_len,
        }]})

    # -- /v1/completions -----------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        engine = self.state.require_engine()
        req = protocol.parse_completion(await read_json(request, self.config.max_body_bytes), self.config)
        check_model(self.state.model_names, req.options.model)
        await check_structured(self.state.offload, engine, req.options.structured)
        tokenizer = engine.tokenizer
        prompts = [await self._prompt_ids(engine, p, i) for i, p in enumerate(req.prompts)]
        token_text = TokenText(tokenizer, undecodable_prefix="bytes:")  # OpenAI's legacy spelling
        want_logprobs = req.params.logprobs is not None

        def make_text(ids: list[int], prompt: protocol.Prompt) -> tuple[ChoiceText, CompletionLogprobs | None]:
            prefix = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) if req.echo else ""
            logprobs = CompletionLogprobs(token_text) if want_logprobs else None
            if logprobs is not None and req.echo:
                logprobs.add_prompt(ids, skip_special_tokens=isinstance(prompt, str))
            return ChoiceText(tokenizer, ids, req.options.stop, prefix), logprobs

        gen = self.state.generation(engine, context(request))
        choices: list[Choice] = []
        params = fit_params(req.params, engine)
        if req.echo and want_logprobs:  # the echoed prompt's tokens get logprobs too, as in OpenAI's API
            params = dataclasses.replace(params, prompt_logprobs=params.logprobs)
        async with gen.closed_on_error():
            for ids, prompt in zip(prompts, req.prompts, strict=True):
                for j in range(req.options.n):
                    stream = gen.submit(ids, _params_for_choice(params, j))
                    text, logprobs = make_text(ids, prompt)
                    choices.append(Choice(len(choices), gen, stream, text, token_text, logprobs, None))
        response_id = f"cmpl-{gen.ctx.request_id}"
        created = int(time.time())
        usage = _Usage(sum(map(len, prompts)), choices, req.options.n)
        if req.options.stream:
            events = self._completion_events(gen, choices, response_id, created, self.state.model_id,
                                             req.options.include_usage, usage)
            return EventStream(events, gen)
        await _run_all(gen, choices, request)
        return json_response({
            "id": response_id, "object": "text_completion", "created": created, "model": self.state.model_id,
            "choices": [{"index": c.index, "text": c.text.text, "logprobs": c.new_logprobs(),
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": usage.body(),
        })

    async def _completion_events(self, gen: Generation, choices: list[Choice], response_id: str,
                                 created: int, model: str, include_usage: bool,
                                 usage: _Usage) -> AsyncGenerator[bytes, None]:
        head = {"id": response_id, "object": "text_completion", "created": created, "model": model}
        async with aclosing(_choice_updates(choices, "tokens")) as updates:
            async for index, choice, text, logprobs in updates:
                item = {"index": index, "text": text, "logprobs": logprobs,
                        "finish_reason": choice.finish_reason if choice.done else None}
                yield sse({**head, "choices": [item], **({"usage": None} if include_usage else {})})
        async for chunk in _stream_tail(gen, head, include_usage, usage):
            yield chunk

    # -- /v1/chat/completions ------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        engine = self.state.require_engine()
        tokenizer = engine.tokenizer
        data = await read_body(request, self.config.max_body_bytes)
        if len(data) > OFFLOAD_BODY_BYTES:
            # Parsing, checking, rendering and tokenizing a long conversation takes milliseconds to tens of
            # them, all pure Python: on the server's worker thread, not on the event loop.
            req, prompt_ids = await self.state.offload(self._prepare_chat, tokenizer, data)
        else:
            req, prompt_ids = self._prepare_chat(tokenizer, data)
        check_model(self.state.model_names, req.options.model)
        await check_structured(self.state.offload, engine, req.options.structured)
        params = fit_params(req.params, engine)
        if req.auto_max_tokens:
            room = engine.max_model_len - len(prompt_ids)
            if room <= 0:
                raise APIError(400, f"The conversation has {len(prompt_ids)} tokens; this model's context "
                                    f"is {engine.max_model_len}", param="messages", code="context_length_exceeded")
            params = dataclasses.replace(params, max_tokens=min(params.max_tokens, room),
                                         min_tokens=min(params.min_tokens, room))
        token_text = TokenText(tokenizer)
        gen = self.state.generation(engine, context(request))
        choices: list[Choice] = []
        stops = req.options.stop
        if req.tools is not None and not req.tools.forced and not req.tools.parallel:
            stops += (CLOSE_TAG,)  # one call at most: the output ends where the first call block closes
        async with gen.closed_on_error():
            for j in range(req.options.n):
                stream = gen.submit(prompt_ids, _params_for_choice(params, j))
                choices.append(Choice(j, gen, stream, ChoiceText(tokenizer, prompt_ids, stops),
                                      token_text, None, [] if req.logprobs else None))
        response_id = f"chatcmpl-{gen.ctx.request_id}"
        created = int(time.time())
        usage = _Usage(len(prompt_ids), choices, req.options.n)
        if req.options.stream:
            events = self._chat_events(gen, choices, response_id, created, self.state.model_id,
                                       req.options.include_usage, usage, req.tools)
            return EventStream(events, gen)
        await _run_all(gen, choices, request)
        return json_response({
            "id": response_id, "object": "chat.completion", "created": created, "model": self.state.model_id,
            "choices": [{"index": c.index, **_chat_message(c, req.tools), "logprobs": c.new_logprobs()}
                        for c in choices],
            "usage": usage.body(),
        })

    async def _chat_events(self, gen: Generation, choices: list[Choice], response_id: str, created: int,
                           model: str, include_usage: bool, usage: _Usage,
                           tools: ToolChoice | None) -> AsyncGenerator[bytes, None]:
        head = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model}
        extra = {"usage": None} if include_usage else {}
        # with tools offered, each choice's text goes through a parser that holds back <tool_call> blocks and
        # sends each as one tool_calls delta once it closes
        calls = [ToolCallStream(tools) for _ in choices] if tools is not None else None
        for choice in choices:
            first = {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            yield sse({**head, "choices": [first], **extra})
        async with aclosing(_choice_updates(choices, "content")) as updates:
            async for index, choice, text, logprobs in updates:
                delta: dict[str, Any] = {"content": text} if text else {}
                finish = choice.finish_reason if choice.done else None
                if calls is not None:
                    parser = calls[index]
                    before = len(parser.calls)
                    content, new = parser.feed(text, final=choice.done)
                    delta = {"content": content} if content else {}
                    if new:
                        delta["tool_calls"] = [c.openai(before + k) for k, c in enumerate(new)]
                    if finish is not None:
                        finish = _tool_finish_reason(finish, bool(parser.calls))
                if not delta and finish is None and not (logprobs and logprobs["content"]):
                    continue  # text held back inside a call block, with nothing else to send
                item = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                yield sse({**head, "choices": [item], **extra})
        async for chunk in _stream_tail(gen, head, include_usage, usage):
            yield chunk

    def _prepare_chat(self, tokenizer: Tokenizer, data: bytes) -> tuple[protocol.ChatRequest, list[int]]:
        """The parsed request and its prompt ids (may run in a worker thread: it touches no server state)."""
        body = parse_json(data)
        _check_message_count(body, self.config.max_messages)
        req = protocol.parse_chat(body, self.config)
        prompt_ids = check_prompt(chat_prompt_ids(tokenizer, list(req.messages),
                                                  self.config.allow_special_tokens_in_content, tools=req.tools),
                                  "messages")
        return req, prompt_ids

    # -- shared ----------------------------------------------------------------------------------

    async def _prompt_ids(self, engine: EngineClient, prompt: protocol.Prompt, index: int) -> list[int]:
        param = "prompt" if index == 0 else f"prompt[{index}]"
        if isinstance(prompt, str):
            return check_prompt(await encode(engine.tokenizer, prompt, param=param,
                                             parse_special=self.config.allow_special_tokens_in_content), param)
        vocab = engine.model_config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"Token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param)
        return check_prompt(list(prompt), param)


@dataclasses.dataclass
class _Usage:
    prompt_tokens: int
    choices: Sequence[Choice]
    n: int  # choices per prompt, which follow each other in ``choices``

    def body(self) -> dict[str, Any]:
        completion = sum(c.num_tokens for c in self.choices)
        # a prompt counts once, however many choices it has: its first choice's cached tokens
        cached = sum(c.cached_tokens for c in self.choices[::self.n])
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def _params_for_choice(params: SamplingParams, index: int) -> SamplingParams:
    """With a seed and n > 1, each choice gets its own seed, so the choices differ yet repeat."""
    if index == 0 or params.seed is None:
        return params
    seed = params.seed + index if params.seed + index <= protocol.SEED_MAX else params.seed - index
    return dataclasses.replace(params, seed=seed)


async def _run_all(gen: Generation, choices: list[Choice], request: Request) -> None:
    try:
        gen.watch(request.receive)
        await asyncio.gather(*(c.run() for c in choices))
    finally:
        await gen.close()
    gen.raise_for_problem()


async def _choice_updates(choices: list[Choice], logprobs_key: str
                          ) -> AsyncGenerator[tuple[int, Choice, str, Any], None]:
    """(index, choice, new text, new logprobs) for each engine output with something to send;
    ``logprobs_key`` is where the new logprob entries sit (completions and chat differ)."""
    async with aclosing(merge([c.stream for c in choices])) as outputs:
        async for index, out in outputs:
            choice = choices[index]
            if choice.done:
                continue
            choice.feed(out)
            text = choice.text.take(final=choice.done)
            logprobs = choice.new_logprobs()
            if text or choice.done or (logprobs and logprobs[logprobs_key]):
                yield index, choice, text, logprobs


def _check_message_count(body: Any, limit: int) -> None:
    """400 before any parsing when a conversation has more than ``limit`` messages."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if isinstance(messages, list) and len(messages) > limit:
        raise APIError(400, f"messages has {len(messages)} entries; the limit is {limit} (--max-messages)",
                       param="messages")


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]], special_in_content: bool,
                    add_generation_prompt: bool = True, tools: ToolChoice | None = None) -> list[int]:
    """The conversation rendered with the model's chat template and tokenized (the template writes its BOS);
    special tokens in the messages are text unless ``special_in_content``. ``tools`` offered go to a template
    that renders them; for one that does not, they are described in the system prompt (Hermes style)."""
    offered = None
    if tools is not None:
        if tokenizer.renders_tools:
            offered = [t.openai() for t in tools.offered]
        else:
            messages = with_tools_section(messages, tools)
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt, parse_special_in_content=special_in_content,
                                     tools=offered)
    except ValueError as exc:
        raise _template_error(tokenizer, messages, exc) from None


def _template_error(tokenizer: Tokenizer, messages: list[dict[str, Any]], exc: ValueError) -> APIError:
    """A 400 for a conversation the chat template cannot render, naming the message and field at fault.

    The tokenizer's own checks and a template's ``raise_exception`` give clean messages, passed on
    as they are; a template that fails inside Jinja (a field it reads is missing, or of a type it
    cannot use) is explained in the request's terms instead of Jinja's.
    """
    failure = exc.__context__
    if not isinstance(failure, _TEMPLATE_FAILURES):
        return APIError(400, str(exc), param="messages")
    where = f"messages[{_first_failing_message(tokenizer, messages)}]"
    missing = _MISSING_FIELD.search(str(failure)) if isinstance(failure, jinja2.UndefinedError) else None
    if missing is not None:
        field = missing.group(1) or missing.group(2)
        return APIError(400, f"{where} has no '{field}', which this model's chat template needs",
                        param=f"{where}.{field}")
    return APIError(400, f"{where} has a field this model's chat template cannot use; check its role, "
                         "content and any tool_calls", param=where)


def _first_failing_message(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> int:
    """The index of the message at fault: the last of the shortest conversation prefix that fails to
    render, found by bisection (templates read messages in order; the whole conversation fails)."""

    def fails(count: int) -> bool:
        try:
            tokenizer.apply_chat_template(messages[:count])
        except ValueError as exc:
            return isinstance(exc.__context__, _TEMPLATE_FAILURES)
        return False

    lo, hi = 1, len(messages)  # the whole conversation fails; find the shortest failing prefix
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


async def _stream_tail(gen: Generation, head: dict[str, Any], include_usage: bool,
                       usage: _Usage) -> AsyncGenerator[bytes, None]:
    """After the last token: an error event if the generation failed, the usage chunk, [DONE]."""
    problem = gen.problem()
    if problem is not None:
        gen.ctx.failed = True
        yield sse(error_body("/v1/", problem.status, problem.message, code=problem.code))
    elif include_usage:
        yield sse({**head, "choices": [], "usage": usage.body()})
    yield DONE
