"""A scripted engine client: the server's :class:`~realizar.server.engine_client.EngineClient` without a model.

It holds a real tokenizer (the demo model's, in the tests), so prompts, chat templates, detokenization and
stop strings run exactly as they do in production; only the engine's answers are scripted. Each submitted
request takes the next :class:`Script` (or the default one): the tokens it generates, how it finishes
(a stop, the length limit, an engine error), or a refusal at admission (overloaded, dead). A script can
also hold its request before a given token until the test opens its gate, to have requests in flight
while the test drains, times out or shuts down the server.

Everything it was asked (requests, aborts, structured specs) is recorded for the tests to assert on.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

from realizar.config import ModelConfig
from realizar.engine.errors import EngineDead, EngineOverloaded, RequestTooLong
from realizar.engine.stats import EngineStats, LatencyObservations
from realizar.request import FinishReason, Request, StructuredSpec, TokenOutput
from realizar.tokenizer import Tokenizer


@dataclass(frozen=True)
class Script:
    """What the scripted engine does with one request.

    ``tokens`` are generated one event each, cut at the request's ``max_tokens`` (which then finishes it
    with LENGTH). ``finish`` rides on the last token's event, as the engine's does; ERROR comes as a final
    event of its own carrying ``error``. ``refuse`` ("overloaded" or "dead") makes ``submit`` raise instead.
    With ``gate``, the stream waits before its token number ``gate_at`` until the gate is set (or the
    request is aborted, which ends it with ABORT, as the engine does).
    """

    tokens: tuple[int, ...] = ()
    finish: FinishReason = FinishReason.STOP
    error: str | None = None
    refuse: str | None = None
    retry_after: float = 1.0
    gate: asyncio.Event | None = None
    gate_at: int = 0

    @classmethod
    def text(cls, tokenizer: Tokenizer, text: str, finish: FinishReason = FinishReason.STOP) -> Script:
        """Generate ``text`` (as the tokenizer spells it, no special tokens added)."""
        return cls(tuple(tokenizer.encode(text, add_special_tokens=False)), finish)

    @classmethod
    def failing(cls, tokens: tuple[int, ...] = (), error: str = "scripted engine failure") -> Script:
        """Generate ``tokens``, then fail in the engine (FinishReason.ERROR)."""
        return cls(tokens, FinishReason.ERROR, error=error)

    @classmethod
    def overloaded(cls, retry_after: float = 1.0) -> Script:
        return cls(refuse="overloaded", retry_after=retry_after)

    @classmethod
    def dead(cls) -> Script:
        return cls(refuse="dead")

    @classmethod
    def held(cls, tokens: tuple[int, ...], gate: asyncio.Event, at: int = 0) -> Script:
        """Generate ``tokens``, pausing before token ``at`` until ``gate`` is set."""
        return cls(tokens, FinishReason.STOP, gate=gate, gate_at=at)


class ScriptedStream:
    """The outputs of one scripted request; ``aclose()`` before the end aborts it, as the engine's stream does."""

    def __init__(self, engine: ScriptedEngine, request: Request, script: Script) -> None:
        self.engine = engine
        self.request = request
        self.script = script
        self.events = _events(request, script)
        self.next = 0
        self.finished = False
        self.aborted = asyncio.Event()

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> TokenOutput:
        if self.finished:
            raise StopAsyncIteration
        gate = self.script.gate
        if gate is not None and self.next == self.script.gate_at and not gate.is_set():
            await _first_of(gate, self.aborted)
        await asyncio.sleep(0)  # one loop turn per event, as tokens from the engine thread arrive
        if self.aborted.is_set():
            out = TokenOutput(self.request.request_id, None, FinishReason.ABORT,
                              num_prompt_tokens=len(self.request.prompt_ids), num_generated=self.next,
                              time=time.monotonic())
        else:
            out = self.events[self.next]
            self.next += 1
        if out.token_id is not None:
            self.engine.generation_tokens_total += 1
        if out.finished:
            self.finished = True
            self.engine.finish(self.request.request_id, out)
        return out

    async def aclose(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request.request_id)
            self.engine.finish(self.request.request_id, None)

    def abort(self) -> None:
        self.aborted.set()


def _events(request: Request, script: Script) -> list[TokenOutput]:
    """The events the engine would send for ``script``: one per token, the finish on the last."""
    rid, prompt = request.request_id, len(request.prompt_ids)
    tokens = script.tokens[:request.params.max_tokens]
    finish = FinishReason.LENGTH if len(tokens) < len(script.tokens) else script.finish
    now = time.monotonic()
    events = [TokenOutput(rid, t, None, num_prompt_tokens=prompt, num_generated=i + 1, time=now)
              for i, t in enumerate(tokens)]
    if finish is FinishReason.ERROR or not events:
        events.append(TokenOutput(rid, None, finish, num_prompt_tokens=prompt, num_generated=len(tokens),
                                  error=script.error if finish is FinishReason.ERROR else None, time=now))
    else:
        last = events[-1]
        events[-1] = TokenOutput(rid, last.token_id, finish, num_prompt_tokens=prompt,
                                 num_generated=last.num_generated, time=now)
    return events


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


@dataclass
class ScriptedEngine:
    """An :class:`~realizar.server.engine_client.EngineClient` whose answers are scripted (see the module doc)."""

    tokenizer: Tokenizer
    default: Script = field(default_factory=Script)  # for requests submitted past the queued scripts
    model_id: str = "scripted-model"
    max_model_len: int = 2048
    model_format: str = "gguf"
    compute_mode: str = "cpu"
    compute_path: str = "scripted (no model)"
    load_seconds: float = 0.0
    healthy: bool = True
    scripts: collections.deque[Script] = field(default_factory=collections.deque)
    submitted: list[Request] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    compiled: list[StructuredSpec] = field(default_factory=list)
    live: dict[str, ScriptedStream] = field(default_factory=dict)
    shutting_down: bool = False
    started: bool = False
    stopped: bool = False
    generation_tokens_total: int = 0
    finished_reasons: list[str] = field(default_factory=list)
    model_config: ModelConfig = field(init=False)

    def __post_init__(self) -> None:
        self.model_config = ModelConfig(
            architecture="llama", vocab_size=self.tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
            num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64, max_position_embeddings=self.max_model_len,
            bos_token_id=self.tokenizer.bos_token_id, eos_token_ids=self.tokenizer.eos_token_ids,
            name=self.model_id)

    def script(self, *scripts: Script) -> None:
        """Queue ``scripts`` for the next requests, in order."""
        self.scripts.extend(scripts)

    # -- EngineClient ------------------------------------------------------------------------

    def submit(self, request: Request) -> ScriptedStream:
        if not self.healthy:
            raise EngineDead("the engine has stopped after a fatal error: scripted")
        if self.shutting_down:
            raise EngineDead("the server is shutting down")
        if len(request.prompt_ids) + request.params.max_tokens > self.max_model_len:
            raise RequestTooLong(f"This model's maximum context length is {self.max_model_len} tokens; the "
                                 f"request has {len(request.prompt_ids)} prompt tokens plus max_tokens "
                                 f"{request.params.max_tokens}")
        script = self.scripts.popleft() if self.scripts else self.default
        if script.refuse == "overloaded":
            raise EngineOverloaded("server overloaded (scripted)", retry_after=script.retry_after)
        if script.refuse == "dead":
            raise EngineDead("the server is shutting down")
        self.submitted.append(request)
        stream = ScriptedStream(self, request, script)
        self.live[request.request_id] = stream
        return stream

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        stream = self.live.get(request_id)
        if stream is not None:
            stream.abort()

    def compile_structured(self, spec: StructuredSpec) -> None:
        self.compiled.append(spec)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.live), num_waiting=0, kv_cache_usage=0.0, num_preemptions_total=0,
                           prompt_tokens_total=sum(len(r.prompt_ids) for r in self.submitted),
                           generation_tokens_total=self.generation_tokens_total, num_steps_total=0,
                           healthy=self.healthy)

    def drain_observations(self) -> LatencyObservations:
        reasons, self.finished_reasons = self.finished_reasons, []
        return LatencyObservations(finished=reasons)

    async def start(self) -> None:
        self.started = True

    def begin_shutdown(self) -> None:
        self.shutting_down = True

    async def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.live and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return not self.live

    async def stop(self) -> None:
        self.stopped = True

    # -- bookkeeping ---------------------------------------------------------------------------

    def finish(self, request_id: str, out: TokenOutput | None) -> None:
        """A stream ended (``out``: its final event; None: released before its end)."""
        self.live.pop(request_id, None)
        if out is not None and out.finish_reason is not None:
            self.finished_reasons.append(out.finish_reason.value)
