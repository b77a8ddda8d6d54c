"""The native realizar API: /models, /tokenize, /detokenize, /generate, /batch/*, /stream/generate.

``/tokenize`` also answers vLLM's shape (``{"prompt"}`` or ``{"messages"}``), and ``/detokenize`` is
vLLM's, so tools written for vLLM's tokenizer endpoints work unchanged.

Field names, defaults and response shapes follow the original realizar v0.2 server
(``docs/api.md``): ``token_ids`` holds the prompt ids followed by the generated ids, ``text``
is the decoded text of all of them, ``num_generated`` counts the generated ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from realizar.server import protocol
from realizar.server.errors import APIError
from realizar.server.generation import (
    EventStream,
    Generation,
    Stream,
    check_model,
    check_prompt,
    check_structured,
    check_token_ids,
    encode,
    encode_many,
    fit_params,
    sse,
)
from realizar.server.http import GenerationRoute, context, json_response, read_json
from realizar.server.openai import chat_prompt_ids
from realizar.server.state import ServerState

if TYPE_CHECKING:
    from realizar.server.engine_client import EngineClient
    from realizar.tokenizer import Tokenizer


class NativeAPI:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.config = state.config

    def routes(self) -> list[Route]:
        return [
            Route("/models", self.models, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            GenerationRoute("/generate", self.generate, methods=["POST"]),
            Route("/batch/tokenize", self.batch_tokenize, methods=["POST"]),
            GenerationRoute("/batch/generate", self.batch_generate, methods=["POST"]),
            GenerationRoute("/stream/generate", self.stream_generate, methods=["POST"]),
        ]

    async def models(self, request: Request) -> Response:
        engine = self.state.require_engine()
        mc = engine.model_config
        return json_response({"models": [{
            "id": self.state.model_id,
            "name": mc.name,
            "description": (f"{mc.architecture} model, {mc.num_layers} layers, hidden size {mc.hidden_size}, "
                            f"context {engine.max_model_len} tokens, on {engine.compute_mode}"),
            "format": engine.model_format,
            "loaded": True,
        }]})

    async def tokenize(self, request: Request) -> Response:
        engine = self.state.require_engine()
        req = protocol.parse_tokenize(await read_json(request, self.config.max_body_bytes))
        if isinstance(req, protocol.VLLMTokenizeRequest):
            return await self._vllm_tokenize(engine, req)
        check_model(self.state.model_names, req.model_id)
        ids = await encode(engine.tokenizer, req.text, req.add_special, param="text",
                           parse_special=self._parse_special(req.parse_special))
        return json_response({"token_ids": ids, "num_tokens": len(ids)})

    async def _vllm_tokenize(self, engine: EngineClient, req: protocol.VLLMTokenizeRequest) -> Response:
        check_model(self.state.model_names, req.model)
        tokenizer = engine.tokenizer
        special = self.config.allow_special_tokens_in_content
        if req.prompt is not None:
            ids = await encode(tokenizer, req.prompt, req.add_special, param="prompt", parse_special=special)
        else:
            assert req.messages is not None
            messages = list(req.messages)
            if len(messages) > self.config.max_messages:
                raise APIError(400, f"messages has {len(messages)} entries; the limit is {self.config.max_messages} "
                                    "(--max-messages)", param="messages")
            ids = await self.state.offload(chat_prompt_ids, tokenizer, messages, special, req.add_generation_prompt)
            bos = tokenizer.bos_token_id
            if req.add_special and bos is not None and ids[:1] != [bos]:
                ids = [bos, *ids]  # the template wrote no BOS of its own
        token_strs = [tokenizer.id_to_token(t) for t in ids] if req.return_token_strs else None
        return json_response({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                              "token_strs": token_strs})

    async def detokenize(self, request: Request) -> Response:
        """vLLM's ``/detokenize``: ``{"model", "tokens"}`` -> ``{"prompt"}``, special tokens kept as vLLM does."""
        engine = self.state.require_engine()
        req = protocol.parse_detokenize(await read_json(request, self.config.max_body_bytes))
        check_model(self.state.model_names, req.model)
        check_token_ids(req.tokens, engine.model_config.vocab_size, "tokens")
        return json_response({"prompt": engine.tokenizer.decode(req.tokens)})

    async def batch_tokenize(self, request: Request) -> Response:
        engine = self.state.require_engine()
        req = protocol.parse_batch_tokenize(await read_json(request, self.config.max_body_bytes), self.config)
        check_model(self.state.model_names, req.model_id)
        batch = await encode_many(engine.tokenizer, req.texts, req.add_special, param="texts",
                                  parse_special=self._parse_special(req.parse_special))
        return json_response({"results": [{"token_ids": ids, "num_tokens": len(ids)} for ids in batch]})

    def _parse_special(self, asked: bool | None) -> bool:
        """/tokenize reads special tokens as /generate does unless the request says otherwise."""
        return self.config.allow_special_tokens_in_content if asked is None else asked

    async def _single(self, request: Request) -> tuple[EngineClient, protocol.GenerateRequest, list[int], Generation]:
        """Parse and tokenize a one-prompt generation request (/generate, /stream/generate)."""
        engine = self.state.require_engine()
        req = protocol.parse_generate(await read_json(request, self.config.max_body_bytes), self.config)
        check_model(self.state.model_names, req.model_id)
        await check_structured(self.state.offload, engine, req.structured)
        prompt_ids = check_prompt(await encode(engine.tokenizer, req.prompt,
                                               parse_special=self.config.allow_special_tokens_in_content))
        return engine, req, prompt_ids, self.state.generation(engine, context(request))

    async def generate(self, request: Request) -> Response:
        engine, req, prompt_ids, gen = await self._single(request)
        try:
            stream = gen.submit(prompt_ids, fit_params(req.params, engine))
            gen.watch(request.receive)
            generated = await _collect(stream)
        finally:
            await gen.close()
        gen.raise_for_problem()
        return json_response(_result(engine.tokenizer, prompt_ids, generated))

    async def batch_generate(self, request: Request) -> Response:
        engine = self.state.require_engine()
        req = protocol.parse_batch_generate(await read_json(request, self.config.max_body_bytes), self.config)
        check_model(self.state.model_names, req.model_id)
        await check_structured(self.state.offload, engine, req.structured)
        batch = await encode_many(engine.tokenizer, req.prompts,
                                  parse_special=self.config.allow_special_tokens_in_content)
        for i, ids in enumerate(batch):
            check_prompt(ids, f"prompts[{i}]")
        params = fit_params(req.params, engine)
        gen = self.state.generation(engine, context(request))
        try:
            streams = [gen.submit(ids, params) for ids in batch]  # all admitted, or none
            gen.watch(request.receive)
            outputs = await asyncio.gather(*map(_collect, streams))
        finally:
            await gen.close()
        gen.raise_for_problem()
        return json_response({"results": [_result(engine.tokenizer, p, g) for p, g in zip(batch, outputs, strict=True)]})

    async def stream_generate(self, request: Request) -> Response:
        engine, req, prompt_ids, gen = await self._single(request)
        async with gen.closed_on_error():
            stream = gen.submit(prompt_ids, fit_params(req.params, engine))
        return EventStream(self._events(gen, stream, prompt_ids), gen)

    async def _events(self, gen: Generation, stream: Stream, prompt_ids: list[int]) -> AsyncGenerator[bytes, None]:
        detok = gen.engine.tokenizer.detokenizer(prompt_ids)
        num_generated = 0
        async for out in stream:
            if out.token_id is None:
                continue
            num_generated += 1
            text = detok.step(out.token_id) + (detok.flush() if out.finished else "")
            yield sse({"token_id": out.token_id, "text": text}, "token")
        problem = gen.problem()
        if problem is not None:
            gen.ctx.failed = True
            yield sse({"error": problem.message}, "error")
            return
        yield sse({"num_generated": num_generated}, "done")



def _result(tokenizer: Tokenizer, prompt_ids: list[int], generated: list[int]) -> dict[str, object]:
    ids = prompt_ids + generated
    return {"token_ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True),
            "num_generated": len(generated)}


async def _collect(stream: Stream) -> list[int]:
    return [out.token_id async for out in stream if out.token_id is not None]
