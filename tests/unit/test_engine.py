"""The engine in-process, on a tiny random model: stops, aborts, deadlines, preemption, failure
isolation, the fatal-failure rule, admission limits, fair scheduling of long prompts and prefix
caching."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from realizar import kernels
from realizar.config import EngineConfig
from realizar.engine.engine import (
    FATAL_AFTER_CONSECUTIVE_FAILURES,
    AsyncEngine,
    Engine,
    EngineModel,
    RequestStream,
)
from realizar.engine.errors import EngineDead, EngineOverloaded, InvalidRequest, RequestTooLong
from realizar.engine.runner import StepResult
from realizar.engine.scheduler import SchedulerOutput
from realizar.kv_cache import KVCache
from realizar.loading import load_model
from realizar.model.llama import LlamaModel
from realizar.request import FinishReason, GrammarError, Request, SamplingParams, StructuredSpec, TokenOutput
from realizar.sampling import SamplingRow
from realizar.tokenizer import Tokenizer
from tests.tiny_model import TinySpec, write_tiny_gguf

VOCAB = 64
EOS = 2  # the tiny model's end-of-sequence id


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> EngineModel:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(vocab=VOCAB, context=2048))
    loaded = load_model(path, dtype=torch.float32)
    # the tiny file's vocabulary has no merges; an empty list makes it a (trivial) BPE
    tokenizer = Tokenizer.from_gguf_metadata({**loaded.metadata, "tokenizer.ggml.merges": []})
    model = LlamaModel(loaded.config, loaded.tensors, torch.device("cpu"), torch.float32)
    return EngineModel(model, tokenizer, loaded.config, "tiny", Path(path), "gguf", 0.0)


def config(**kw: int | bool | str | None) -> EngineConfig:
    return EngineConfig(device="cpu", dtype="float32", **kw)  # type: ignore[arg-type]


def greedy(max_tokens: int = 12, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)  # type: ignore[arg-type]


def prompt(i: int, length: int = 6) -> list[int]:
    return [(i * 7 + j * 3) % (VOCAB - 4) + 3 for j in range(length)]


def run(engine: Engine, max_steps: int = 10_000) -> dict[str, list[TokenOutput]]:
    """Step until idle; every request's events, in order."""
    events: dict[str, list[TokenOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return events
        for out in engine.step():
            events.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not finish")


def tokens(events: list[TokenOutput]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def generate_alone(served: EngineModel, prompt_ids: list[int], params: SamplingParams, **kw: str) -> list[int]:
    engine = Engine(served, config(**kw))
    engine.add(Request(prompt_ids, params, request_id="alone"))
    return tokens(run(engine)["alone"])


def assert_no_leak(engine: Engine) -> None:
    assert not engine.live and not engine.has_work()
    assert engine.allocator.num_free == engine.allocator.num_blocks


# -- stops, aborts, deadlines ------------------------------------------------------------------


def test_stop_token_ids_end_the_sequence_and_min_tokens_holds_them_off(served: EngineModel) -> None:
    ids = prompt(1)
    free = generate_alone(served, ids, greedy(12))
    stop = free[0]
    engine = Engine(served, config())
    engine.add(Request(ids, greedy(12, stop_token_ids=(stop,)), request_id="stop"))
    engine.add(Request(ids, greedy(12, stop_token_ids=(stop,), min_tokens=4), request_id="min"))
    events = run(engine)
    assert tokens(events["stop"]) == [stop] and events["stop"][-1].finish_reason is FinishReason.STOP
    held = tokens(events["min"])
    assert len(held) >= 4 and stop not in held[:4]
    assert events["min"][-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    if events["min"][-1].finish_reason is FinishReason.STOP:
        assert held[-1] == stop and stop not in held[:-1]
    assert_no_leak(engine)


def test_eos_stops_unless_ignored(served: EngineModel) -> None:
    engine = Engine(served, config())
    engine.add(Request(prompt(2), SamplingParams(temperature=0, max_tokens=5, stop_token_ids=(EOS,)),
                       request_id="a"))
    events = run(engine)["a"]
    assert events[-1].finished and len(tokens(events)) <= 5
    assert EOS not in tokens(events)[:-1]


def test_abort_ends_one_request_and_frees_its_blocks(served: EngineModel) -> None:
    engine = Engine(served, config())
    engine.add(Request(prompt(3), greedy(30), request_id="keep"))
    engine.add(Request(prompt(4), greedy(30), request_id="drop"))
    first = engine.step() + engine.step()
    assert {o.request_id for o in first} == {"keep", "drop"}
    aborted = engine.abort("drop")
    assert len(aborted) == 1 and aborted[0].finish_reason is FinishReason.ABORT
    assert engine.abort("drop") == []  # idempotent
    events = run(engine)
    assert set(events) == {"keep"} and len(tokens(events["keep"])) == 28
    assert_no_leak(engine)


def test_deadline_expiry_times_out_waiting_and_running_requests(served: EngineModel) -> None:
    engine = Engine(served, config())
    now = time.monotonic()
    engine.add(Request(prompt(5), greedy(50), request_id="running", deadline=now + 60))
    engine.step()
    engine.add(Request(prompt(6), greedy(50), request_id="waiting", deadline=now + 60))
    engine.add(Request(prompt(7), greedy(50), request_id="later", deadline=now + 3600))
    assert engine.expire(now) == []
    expired = engine.expire(now + 61)
    assert {o.request_id for o in expired} == {"running", "waiting"}
    assert all(o.finish_reason is FinishReason.TIMEOUT for o in expired)
    events = run(engine)
    assert set(events) == {"later"} and len(tokens(events["later"])) == 50
    assert_no_leak(engine)


def assert_preemption_keeps_greedy_tokens(served: EngineModel, prompts: list[list[int]], num_kv_blocks: int) -> None:
    """Run ``prompts`` side by side in a cache too small for all of them: some are preempted and
    recomputed, and each still gets the greedy tokens it gets alone."""
    alone = [generate_alone(served, p, greedy(40)) for p in prompts]
    engine = Engine(served, config(num_kv_blocks=num_kv_blocks))
    for i, p in enumerate(prompts):
        engine.add(Request(p, greedy(40), request_id=f"r{i}"))
    events = run(engine)
    assert engine.scheduler.num_preemptions > 0
    assert [tokens(events[f"r{i}"]) for i in range(len(prompts))] == alone
    assert_no_leak(engine)


def test_preemption_with_few_blocks_keeps_greedy_tokens(served: EngineModel) -> None:
    # 8 blocks of 16 tokens: each request needs 4 at its end, so four cannot all stay
    assert_preemption_keeps_greedy_tokens(served, [prompt(i, 20) for i in range(4)], 8)


def test_a_token_id_outside_the_vocabulary_is_refused_before_it_can_break_a_batch(served: EngineModel) -> None:
    engine = Engine(served, config())
    for bad in (Request([1, 2], greedy(4, stop_token_ids=(10 ** 12,))), Request([1, VOCAB], greedy(4)),
                Request([-1], greedy(4))):
        with pytest.raises(InvalidRequest) as info:
            engine.add(bad)
        assert info.value.param in ("prompt", "stop_token_ids")
    assert not engine.has_work()


# -- failure isolation -------------------------------------------------------------------------

Execute = Callable[[SchedulerOutput, dict[str, SamplingRow]], StepResult]


def fail_for(engine: Engine, culprit: str, after_tokens: int, late: bool) -> None:
    """Make the runner raise on any batch that holds ``culprit`` once it has generated
    ``after_tokens`` tokens (a wrapper around the real runner; no hook in the engine). A
    ``late`` fault comes after the forward pass and the sampler ran: K/V written, numbers drawn."""
    original: Execute = engine.runner.execute

    def execute(output: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepResult:
        hit = any(item.seq.request_id == culprit and item.seq.num_generated >= after_tokens
                  for item in (*output.decodes, *output.prefills))
        if hit and not late:
            raise RuntimeError("injected fault")
        result = original(output, rows)
        if hit:
            raise RuntimeError("injected fault")
        return result

    engine.runner.execute = execute  # type: ignore[method-assign]


def batch_of_eight() -> list[tuple[str, list[int], SamplingParams]]:
    batch = [(f"r{i}", prompt(i, 5 + i), greedy(10)) for i in range(6)]
    # seeded sampling rows: a rerun of the step must draw what the first run would have
    batch += [(f"s{i}", prompt(10 + i), SamplingParams(temperature=1.0, seed=100 + i, max_tokens=10,
                                                       ignore_eos=True)) for i in range(2)]
    return batch


@pytest.mark.parametrize("late", [False, True])
def test_a_request_failing_inside_a_step_fails_alone(served: EngineModel, late: bool) -> None:
    batch = batch_of_eight()
    reference = Engine(served, config())
    for rid, ids, params in batch:
        reference.add(Request(ids, params, request_id=rid))
    expected = {rid: tokens(ev) for rid, ev in run(reference).items()}

    engine = Engine(served, config())
    for rid, ids, params in batch:
        engine.add(Request(ids, params, request_id=rid))
    culprit = "r3"
    fail_for(engine, culprit, after_tokens=3, late=late)
    events = run(engine)
    assert events[culprit][-1].finish_reason is FinishReason.ERROR
    assert "injected fault" in (events[culprit][-1].error or "")
    assert tokens(events[culprit]) == expected[culprit][:3]
    for rid, _ids, _params in batch:
        if rid != culprit:
            assert events[rid][-1].finish_reason is FinishReason.LENGTH
            assert tokens(events[rid]) == expected[rid], rid
    assert_no_leak(engine)


def test_a_fault_in_the_sampler_fails_only_its_row(served: EngineModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from realizar.engine import runner as runner_module

    real_sample = runner_module.sample

    def sample(logits: torch.Tensor, rows: list[SamplingRow], **options: object) -> list:  # type: ignore[type-arg]
        if any(r.params.max_tokens == 7 for r in rows):  # the culprit's marker
            raise IndexError("injected sampler fault")
        return real_sample(logits, rows, **options)

    monkeypatch.setattr(runner_module, "sample", sample)
    engine = Engine(served, config())
    engine.add(Request(prompt(1), greedy(9), request_id="ok1"))
    engine.add(Request(prompt(2), greedy(7), request_id="bad"))
    engine.add(Request(prompt(3), greedy(9), request_id="ok2"))
    events = run(engine)
    assert events["bad"][-1].finish_reason is FinishReason.ERROR and not tokens(events["bad"])
    assert len(tokens(events["ok1"])) == 9 and len(tokens(events["ok2"])) == 9


def test_greedy_tokens_are_the_same_where_the_lm_head_finds_the_argmax(cpu_kernels: kernels.CpuKernels, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast-class model's ranked LM head finds the argmax of each row it ranks (12 greedy rows a step, 8 of them
    in ranked tiles where the build ranks; 32 panels of logits), and the runner hands it to the sampler: the
    greedy tokens are those the sampler finds by reading every row's logits."""
    from realizar.engine import runner as runner_module

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(vocab=8 * VOCAB, context=256), QT.Q8_0)
    loaded = load_model(path, keep_quantized=True)
    tokenizer = Tokenizer.from_gguf_metadata({**loaded.metadata, "tokenizer.ggml.merges": []})
    model = LlamaModel(loaded.config, loaded.tensors, torch.device("cpu"), torch.float32, loaded.quantized, True)
    fast = EngineModel(model, tokenizer, loaded.config, "tiny-fast", path, "gguf", 0.0)
    real_sample = runner_module.sample
    found_rows: list[int] = []

    def handed(logits: torch.Tensor, rows: list[SamplingRow], **options: object) -> list:  # type: ignore[type-arg]
        found = options["found"]
        assert isinstance(found, torch.Tensor)
        found_rows.append(int((found >= 0).sum()))
        return real_sample(logits, rows, **options)  # type: ignore[arg-type]

    def read(logits: torch.Tensor, rows: list[SamplingRow], **options: object) -> list:  # type: ignore[type-arg]
        return real_sample(logits, rows, owned=True)

    results = []
    for sampler in (handed, read):
        monkeypatch.setattr(runner_module, "sample", sampler)
        engine = Engine(fast, config())
        for i in range(12):
            engine.add(Request(prompt(i), greedy(10), request_id=f"r{i}"))
        results.append({rid: tokens(ev) for rid, ev in run(engine).items()})
    assert results[0] == results[1]
    assert all(len(t) == 10 for t in results[0].values())
    assert (sum(found_rows) > 0) == bool(cpu_kernels.ranked_rows), found_rows


def test_a_failure_of_every_request_is_the_engines(served: EngineModel) -> None:
    engine = Engine(served, config())

    def broken(output: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepResult:
        raise RuntimeError("device lost")

    engine.runner.execute = broken  # type: ignore[method-assign]
    engine.add(Request(prompt(1), greedy(4), request_id="a"))
    engine.add(Request(prompt(2), greedy(4), request_id="b"))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()


# -- AsyncEngine: fatal failures and admission ------------------------------------------------


async def collect(stream: RequestStream) -> list[TokenOutput]:
    return [out async for out in stream]


def test_three_consecutive_failed_steps_are_fatal(served: EngineModel) -> None:
    async def main() -> None:
        engine = AsyncEngine(served, config())

        def broken(output: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepResult:
            raise RuntimeError("device lost")

        engine.engine.runner.execute = broken  # type: ignore[method-assign]
        await engine.start()
        try:
            for i in range(FATAL_AFTER_CONSECUTIVE_FAILURES):
                assert engine.healthy
                events = await asyncio.wait_for(collect(engine.submit(Request(prompt(i), greedy(4)))), 30)
                assert events[-1].finish_reason is FinishReason.ERROR
            for _ in range(100):
                if not engine.healthy:
                    break
                await asyncio.sleep(0.01)
            assert not engine.healthy and "device lost" in (engine.fatal_error or "")
            with pytest.raises(EngineDead):
                engine.submit(Request(prompt(9), greedy(4)))
        finally:
            await engine.stop()

    asyncio.run(main())


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_queued_tokens_count_the_inbox_and_the_waiting_queue_together(served: EngineModel) -> None:
    async def main() -> None:
        engine = AsyncEngine(served, config(max_num_seqs=1, max_queued_tokens=1000, max_queued_requests=10))
        await engine.start()
        try:
            seat = engine.submit(Request(prompt(0), greedy(2000)))  # holds the only seat
            await until(lambda: len(engine.engine.scheduler.running) == 1)
            first = engine.submit(Request(prompt(1, 600), greedy(4)))
            # the engine thread moves it from the inbox to the scheduler's waiting queue
            await until(lambda: len(engine.engine.scheduler.waiting) == 1)
            with pytest.raises(EngineOverloaded, match="600 prompt tokens"):
                engine.submit(Request(prompt(2, 600), greedy(4)))
            small = engine.submit(Request(prompt(3, 300), greedy(4)))  # 900 tokens in all: fits
            for stream in (seat, first, small):
                await stream.aclose()
            await until(lambda: not engine.engine.has_work() and not engine.num_in_flight)
            assert engine.engine.scheduler.num_waiting_tokens == 0
        finally:
            await engine.stop()

    asyncio.run(main())


def test_queued_requests_count_the_inbox_and_the_waiting_queue_together(served: EngineModel) -> None:
    async def main() -> None:
        engine = AsyncEngine(served, config(max_num_seqs=1, max_queued_requests=2))
        await engine.start()
        try:
            streams = [engine.submit(Request(prompt(0), greedy(2000)))]
            await until(lambda: len(engine.engine.scheduler.running) == 1)
            streams += [engine.submit(Request(prompt(i), greedy(4))) for i in (1, 2)]
            await until(lambda: len(engine.engine.scheduler.waiting) == 2)
            with pytest.raises(EngineOverloaded, match="2 requests"):
                engine.submit(Request(prompt(3), greedy(4)))
            for stream in streams:
                await stream.aclose()  # never read: closing it still aborts the request
            await until(lambda: not engine.engine.has_work() and not engine.num_in_flight)
        finally:
            await engine.stop()

    asyncio.run(main())


def test_async_engine_lifecycle_stats_drain_and_shutdown(served: EngineModel) -> None:
    async def main() -> None:
        engine = AsyncEngine(served, config())
        await engine.start()
        try:
            # a prompt scored for nothing (max_tokens 0) finishes at once, without a step
            [done] = await asyncio.wait_for(collect(engine.submit(Request(prompt(0), greedy(0)))), 30)
            assert done.finish_reason is FinishReason.LENGTH and done.token_id is None
            assert done.num_prompt_tokens == len(prompt(0))
            with pytest.raises(RequestTooLong, match="maximum context length"):
                engine.submit(Request(prompt(1), greedy(engine.engine.max_model_len)))
            events = await asyncio.wait_for(collect(engine.submit(Request(prompt(2), greedy(5)))), 30)
            assert len(tokens(events)) == 5
            stats = engine.stats()
            assert stats.healthy and stats.generation_tokens_total >= 5 and stats.num_running == 0
            observed = engine.drain_observations()
            assert FinishReason.LENGTH.value in observed.finished and len(observed.ttft) >= 1
            assert engine.drain_observations().finished == []  # drained once
            # drain waits for what was admitted, and gives up at its timeout
            long = engine.submit(Request(prompt(3), greedy(2000)))
            assert await engine.drain(0.05) is False
            await long.aclose()
            assert await engine.drain(30) is True
            await until(lambda: not engine.engine.live)  # the engine thread has taken the abort
            engine.begin_shutdown()
            with pytest.raises(EngineDead, match="shutting down"):
                engine.submit(Request(prompt(4), greedy(4)))
        finally:
            await engine.stop()
        assert_no_leak(engine.engine)

    asyncio.run(main())


def test_a_reader_cancelled_while_waiting_aborts_its_request(served: EngineModel) -> None:
    async def main() -> None:
        engine = AsyncEngine(served, config(max_num_seqs=1))
        await engine.start()
        try:
            seat = engine.submit(Request(prompt(5), greedy(2000)))  # holds the only seat
            await until(lambda: len(engine.engine.scheduler.running) == 1)
            queued = engine.submit(Request(prompt(6), greedy(4)))
            await until(lambda: len(engine.engine.scheduler.waiting) == 1)
            reader = asyncio.ensure_future(queued.__anext__())
            await asyncio.sleep(0.05)
            assert not reader.done()  # no token can come while the seat is held
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            # nobody reads the rest, so the queued request is aborted
            await until(lambda: not engine.engine.scheduler.waiting)
            await seat.aclose()
            await until(lambda: not engine.engine.has_work() and not engine.num_in_flight)
        finally:
            await engine.stop()
        assert_no_leak(engine.engine)

    asyncio.run(main())


# -- fair scheduling of long prompts -----------------------------------------------------------


def test_a_short_request_starts_while_a_long_prompt_prefills(served: EngineModel) -> None:
    engine = Engine(served, config(max_num_batched_tokens=256, long_prefill_token_threshold=32))
    steps: list[SchedulerOutput] = []
    original: Execute = engine.runner.execute

    def recording(output: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepResult:
        steps.append(output)
        return original(output, rows)

    engine.runner.execute = recording  # type: ignore[method-assign]
    engine.add(Request(prompt(1), greedy(200), request_id="stream"))
    engine.step()  # the stream's prompt; from now on it decodes
    engine.add(Request(prompt(2, 1500), greedy(4), request_id="long"))
    for _ in range(3):
        engine.step()
    engine.add(Request(prompt(3, 8), greedy(2), request_id="short"))
    events: dict[str, list[TokenOutput]] = {}
    long_seq = engine.live["long"].seq
    while "short" not in events or not events["short"][-1].finished:
        for out in engine.step():
            events.setdefault(out.request_id, []).append(out)
    assert long_seq.num_computed < long_seq.num_prompt_tokens  # the long prompt is still prefilling
    for output in steps[1:]:
        assert "stream" in {i.seq.request_id for i in output.decodes}  # decodes every step
        long_chunks = [i.num_tokens for i in output.prefills if i.seq.request_id == "long"]
        assert all(n <= 32 for n in long_chunks)  # capped while the stream decodes
    run(engine)
    assert_no_leak(engine)


def test_a_prompt_alone_uses_the_whole_budget(served: EngineModel) -> None:
    engine = Engine(served, config(max_num_batched_tokens=256, long_prefill_token_threshold=32))
    engine.add(Request(prompt(2, 600), greedy(2), request_id="long"))
    engine.step()
    assert engine.live["long"].seq.num_computed == 256


def test_engine_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        EngineConfig(long_prefill_token_threshold=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=600)  # 600 decodes cannot fit in a step of 512 tokens
    from realizar.cli import build_parser, engine_config

    args = build_parser().parse_args(["serve", "--demo", "--long-prefill-token-threshold", "48"])
    assert engine_config(args).long_prefill_token_threshold == 48
    assert engine_config(args).enable_prefix_caching
    assert not engine_config(build_parser().parse_args(["serve", "--demo", "--no-prefix-caching"])).enable_prefix_caching


# -- prefix caching ----------------------------------------------------------------------------


def run_requests(served: EngineModel, caching: bool, batches: list[list[tuple[str, list[int]]]],
                 **kw: int) -> tuple[Engine, dict[str, list[TokenOutput]]]:
    """Run ``batches`` one after another (each batch's requests side by side) on one engine."""
    engine = Engine(served, config(enable_prefix_caching=caching, **kw))
    events: dict[str, list[TokenOutput]] = {}
    for batch in batches:
        for rid, ids in batch:
            engine.add(Request(ids, greedy(10), request_id=rid))
        events.update(run(engine))
    assert_no_leak(engine)
    return engine, events


def test_prefix_caching_keeps_greedy_tokens_alone_and_in_a_batch(served: EngineModel) -> None:
    system = prompt(40, 100)
    batches = [
        [("first", system + prompt(1, 5))],  # alone: fills the cache
        [("second", system + prompt(2, 7))],  # alone, on the cached prefix
        # side by side: a cached prefix, the same prompt twice, a longer run of the first's tokens
        [("b1", system + prompt(3, 4)), ("b2", system + prompt(3, 4)), ("b3", system + prompt(1, 40)),
         ("b4", prompt(5, 30))],
    ]
    on_engine, on = run_requests(served, True, batches)
    _, off = run_requests(served, False, batches)
    assert {rid: tokens(ev) for rid, ev in on.items()} == {rid: tokens(ev) for rid, ev in off.items()}
    assert on["first"][-1].num_cached_tokens == 0
    assert on["second"][0].num_cached_tokens == on["second"][-1].num_cached_tokens == 96  # 6 blocks of 16
    assert on["b1"][-1].num_cached_tokens == 96 and on["b4"][-1].num_cached_tokens == 0
    assert all(ev[-1].num_cached_tokens == 0 for ev in off.values())
    stats = on_engine.snapshot(True, 0)
    assert stats.prefix_cache_hits_total >= 4 * 96
    assert stats.prefix_cache_queries_total == sum(len(ids) for batch in batches for _rid, ids in batch)


def test_a_cached_prefix_is_not_computed_again(served: EngineModel) -> None:
    system = prompt(41, 200)
    engine = Engine(served, config())
    engine.add(Request(system + prompt(1, 10), greedy(4), request_id="a"))
    run(engine)
    computed = engine.stats.prompt_tokens_total
    assert computed == 210
    engine.add(Request(system + prompt(2, 10), greedy(4), request_id="b"))
    events = run(engine)
    assert events["b"][-1].num_cached_tokens == 192  # 12 full blocks of the shared 200 tokens
    assert engine.stats.prompt_tokens_total - computed == 210 - 192
    assert_no_leak(engine)


@pytest.mark.parametrize("kv", ["float32", "int8"])
def test_idle_release_keeps_the_bounded_prefix_cache_and_its_tokens(served: EngineModel, kv: str) -> None:
    """Between bursts the engine gives back every block's memory but the held and cached ones within
    ``prefix_cache_bytes``; the prefix kept still serves its K/V (an int8 cache's scales moved and kept
    with it), and the greedy tokens do not change."""
    system = prompt(45, 96)  # 6 full blocks
    c = served.model.config
    per_block = KVCache.bytes_per_block(c.num_layers, 16, c.num_kv_heads, c.head_dim, getattr(torch, kv))
    engine = Engine(served, config(prefix_cache_bytes=8 * per_block, kv_cache_dtype=kv))
    assert engine.allocator.max_idle_cached == 8
    engine.add(Request(system + prompt(1, 10), greedy(4), request_id="a"))
    run(engine)
    for i in range(2, 6):  # other prompts push the cached blocks past the bound
        engine.add(Request(prompt(i, 40), greedy(4), request_id=f"other{i}"))
    engine.add(Request(system + prompt(6, 10), greedy(4), request_id="b"))  # the system prompt, most recent
    run(engine)
    engine.release_idle_memory()
    assert engine.allocator.num_cached <= 8 and engine.allocator.num_touched <= 8
    engine.add(Request(system + prompt(7, 10), greedy(6), request_id="c"))
    events = run(engine)["c"]
    assert events[-1].num_cached_tokens == 96
    assert tokens(events) == generate_alone(served, system + prompt(7, 10), greedy(6), kv_cache_dtype=kv)
    assert_no_leak(engine)


def test_the_kv_cache_dtype_follows_the_flag_and_auto_is_float16_only_on_the_kernels(served: EngineModel) -> None:
    from realizar import kernels
    from realizar.cli import build_parser
    from realizar.cli import engine_config as from_args
    from realizar.engine.engine import resolve_kv_cache_dtype

    cpu = torch.device("cpu")
    on_kernels = kernels.for_tensors(cpu, torch.float32) is not None
    auto = EngineConfig(device="cpu")
    assert resolve_kv_cache_dtype(auto, cpu, torch.float32) == (torch.float16 if on_kernels else torch.float32)
    # --dtype float32 is the exact configuration: float32 everywhere, the cache too
    assert resolve_kv_cache_dtype(config(), cpu, torch.float32) == torch.float32
    # torch's path (bfloat16 here) keeps the model's dtype unless asked
    assert resolve_kv_cache_dtype(auto, cpu, torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype(config(kv_cache_dtype="float16"), cpu, torch.float32) == torch.float16  # type: ignore[arg-type]
    assert resolve_kv_cache_dtype(EngineConfig(kv_cache_dtype="float32"), cpu, torch.float32) == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")  # type: ignore[arg-type]
    args = build_parser().parse_args(["serve", "--demo", "--kv-cache-dtype", "float16"])
    assert from_args(args).kv_cache_dtype == "float16"
    assert from_args(build_parser().parse_args(["generate", "--demo", "hi"])).kv_cache_dtype == "auto"
    assert from_args(build_parser().parse_args(["serve", "--demo", "--kv-cache-dtype", "int8"])).kv_cache_dtype == "int8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--demo", "--kv-cache-dtype", "fp8"])
    for kv, dtype in (("float16", torch.float16), ("int8", torch.int8)):
        engine = Engine(served, config(kv_cache_dtype=kv))  # type: ignore[arg-type]
        assert engine.kv_dtype == dtype and engine.runner.cache.keys[0].dtype == dtype
        assert len(engine.runner.cache.key_scales) == (served.config.num_layers if kv == "int8" else 0)
        engine.add(Request(prompt(1, 20), greedy(5), request_id="x"))
        assert len(tokens(run(engine)["x"])) == 5


def test_the_torch_path_casts_what_it_writes_to_and_reads_from_a_smaller_cache(served: EngineModel) -> None:
    """A bfloat16 model (torch's path, as on CUDA) over an asked-for float16 cache: K/V are cast on the way
    in and out, and this prompt's greedy tokens are those of the model's own bfloat16 cache."""
    path = served.path
    loaded = load_model(path, dtype=torch.bfloat16)
    model = LlamaModel(loaded.config, loaded.tensors, torch.device("cpu"), torch.bfloat16)
    bf16 = EngineModel(model, served.tokenizer, loaded.config, "tiny-bf16", path, "gguf", 0.0)
    runs = {}
    for kv in ("auto", "float16", "int8"):
        engine = Engine(bf16, EngineConfig(device="cpu", dtype="bfloat16", kv_cache_dtype=kv))  # type: ignore[arg-type]
        assert engine.runner.cache.keys[0].dtype == {"auto": torch.bfloat16, "float16": torch.float16,
                                                     "int8": torch.int8}[kv]
        engine.add(Request(prompt(3, 20), greedy(8), request_id="x"))
        runs[kv] = tokens(run(engine)["x"])
    assert len(runs["float16"]) == 8 and runs["float16"] == runs["auto"], runs
    assert len(runs["int8"]) == 8  # an int8 cache (quantized and dequantized by torch) serves too


def test_the_compute_path_names_the_kv_cache_dtype(served: EngineModel) -> None:
    engine = AsyncEngine(served, config(kv_cache_dtype="float16"))  # type: ignore[arg-type]
    assert engine.kv_cache_dtype == "float16" and engine.compute_path.endswith(", float16 KV cache")
    assert AsyncEngine(served, config()).compute_path.endswith(", float32 KV cache")


def test_prefix_cache_mib_reaches_the_config() -> None:
    from realizar.cli import CLIError, build_parser, engine_config

    def parsed(*argv: str) -> EngineConfig:
        return engine_config(build_parser().parse_args(["serve", "--demo", *argv]))

    assert parsed().prefix_cache_bytes == 128 << 20
    assert parsed("--prefix-cache-mib", "0").prefix_cache_bytes == 0
    assert parsed("--prefix-cache-mib", "-1").prefix_cache_bytes is None
    with pytest.raises(CLIError, match="prefix-cache-mib"):
        parsed("--prefix-cache-mib", "-2")
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        EngineConfig(prefix_cache_bytes=-1)


def test_prefix_caching_survives_preemption_with_few_blocks(served: EngineModel) -> None:
    system = prompt(42, 40)
    assert_preemption_keeps_greedy_tokens(served, [system + prompt(i, 10) for i in range(5)], 12)


def test_prompt_logprobs_are_the_same_with_a_cached_prefix(served: EngineModel) -> None:
    system = prompt(43, 64)
    ids = system + prompt(1, 5)
    cold = Engine(served, config(enable_prefix_caching=False))
    cold.add(Request(ids, greedy(2, prompt_logprobs=1), request_id="x"))
    expected = run(cold)["x"][0].prompt_logprobs
    engine = Engine(served, config())
    engine.add(Request(ids, greedy(2), request_id="warm"))
    run(engine)
    engine.add(Request(ids, greedy(2, prompt_logprobs=1), request_id="x"))
    events = run(engine)["x"]
    assert events[-1].num_cached_tokens == 0  # it scores its prompt: nothing skipped
    assert events[0].prompt_logprobs is not None and len(events[0].prompt_logprobs) == len(ids) - 1
    assert events[0].prompt_logprobs == expected


def test_aborting_or_timing_out_a_sharer_leaves_the_others_blocks_alone(served: EngineModel) -> None:
    system = prompt(44, 80)
    ids = {rid: system + prompt(i, 6) for i, rid in enumerate(("first", "second", "third"))}
    alone = {rid: generate_alone(served, p, greedy(30)) for rid, p in ids.items()}
    engine = Engine(served, config())
    engine.add(Request(ids["first"], greedy(30), request_id="first"))
    engine.step()  # the first's prompt is computed and its full blocks registered
    engine.add(Request(ids["second"], greedy(30), request_id="second", deadline=time.monotonic() + 60))
    engine.add(Request(ids["third"], greedy(30), request_id="third"))
    early = [out.token_id for out in engine.step() if out.request_id == "third"]
    shared = engine.live["first"].seq.block_table[:5]
    assert engine.live["third"].seq.block_table[:5] == shared
    assert all(engine.allocator.ref_count(b) == 3 for b in shared)
    engine.abort("first")
    engine.expire(time.monotonic() + 61)  # the second times out
    assert all(engine.allocator.ref_count(b) == 1 for b in shared)
    events = run(engine)
    assert set(events) == {"third"} and early + tokens(events["third"]) == alone["third"]


# -- logit bias and penalties --------------------------------------------------------------------


def test_penalties_apply_per_row_and_leave_other_rows_alone(served: EngineModel) -> None:
    ids = prompt(3)
    free = generate_alone(served, ids, greedy(30))
    most = max(free.count(t) for t in set(free))
    assert most > 2, "the baseline must repeat itself for the penalty to show"
    engine = Engine(served, config())
    engine.add(Request(ids, greedy(30), request_id="plain"))
    engine.add(Request(ids, greedy(30, frequency_penalty=2.0), request_id="freq"))
    engine.add(Request(ids, greedy(30, logit_bias=((free[0], -100.0),)), request_id="ban"))
    engine.add(Request(ids, greedy(5, logit_bias=((7, 100.0),)), request_id="force"))
    events = run(engine)
    assert tokens(events["plain"]) == free  # sharing the batch with penalized rows changes nothing
    penalized = tokens(events["freq"])
    assert max(penalized.count(t) for t in set(penalized)) < most
    assert len(set(penalized)) > len(set(free))
    assert tokens(events["ban"])[0] != free[0]
    assert tokens(events["force"]) == [7] * 5
    assert_no_leak(engine)


def test_a_logit_bias_outside_the_vocabulary_is_refused(served: EngineModel) -> None:
    engine = Engine(served, config())
    with pytest.raises(InvalidRequest) as info:
        engine.add(Request(prompt(1), greedy(3, logit_bias=((VOCAB, 5.0),)), request_id="bad"))
    assert info.value.param == "logit_bias"
    assert_no_leak(engine)


# -- structured outputs ------------------------------------------------------------------------

# A 64-token byte-level vocabulary that can spell small JSON documents: three control tokens (EOS is id 2, as
# in the tiny file), JSON punctuation, digits, letters, a space ("Ġ" in byte-level spelling) and a few words.
JSON_VOCAB = ["<unk>", "<s>", "</s>", "{", "}", "[", "]", '"', ":", ",", "-", ".", "Ġ",
              *"0123456789", *"abcdefghijklmnopqrstuvwxyz", "true", "false", "null", '{"', '":', '",', '"}',
              "id", "ok", "ab", "xy", "red", "blue", "Ġ\"", "color"]
STRUCTURED_SCHEMAS: list[dict[str, object]] = [
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "ok": {"type": "boolean"}},
     "required": ["id", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}, "tag": {"type": "string", "maxLength": 4}},
     "required": ["color", "tag"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
]


@pytest.fixture(scope="module")
def json_served(served: EngineModel) -> EngineModel:
    """The tiny model with a vocabulary that spells JSON (its random weights are the same)."""
    assert len(JSON_VOCAB) == VOCAB
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": JSON_VOCAB, "tokenizer.ggml.merges": [],
                "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (VOCAB - 3),
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": EOS}
    return dataclasses.replace(served, tokenizer=Tokenizer.from_gguf_metadata(metadata))


def test_constrained_and_free_rows_share_a_batch(json_served: EngineModel) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    free_prompt = prompt(11)
    alone = generate_alone(json_served, free_prompt, greedy(40))
    engine = Engine(json_served, config())
    engine.add(Request(free_prompt, greedy(40), request_id="free"))
    for i, schema in enumerate(STRUCTURED_SCHEMAS):
        spec = StructuredSpec.json_schema(schema)
        # a greedy and two sampled rows per schema; ignore_eos and min_tokens must not keep a finished one going
        engine.add(Request(prompt(i), SamplingParams(temperature=0, max_tokens=300, structured=spec),
                           request_id=f"s{i}-greedy"))
        for seed in range(2):
            engine.add(Request(prompt(i + 20), SamplingParams(temperature=1.0, seed=seed, max_tokens=300,
                                                              ignore_eos=seed == 1, min_tokens=3 * seed,
                                                              structured=spec),
                               request_id=f"s{i}-seed{seed}"))
    events = run(engine)
    # the free row's greedy tokens do not change with constrained neighbours in its batch
    assert tokens(events["free"]) == alone
    for i, schema in enumerate(STRUCTURED_SCHEMAS):
        for name in ("greedy", "seed0", "seed1"):
            out = events[f"s{i}-{name}"]
            assert out[-1].finish_reason is FinishReason.STOP, (name, out[-1])
            text = json_served.tokenizer.decode(tokens(out), skip_special_tokens=True)
            jsonschema.validate(json.loads(text), schema)
    assert_no_leak(engine)


def test_a_bad_spec_fails_at_add_and_leaves_the_engine_clean(json_served: EngineModel) -> None:
    engine = Engine(json_served, config())
    bad = StructuredSpec.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}})
    with pytest.raises(GrammarError, match="nope"):
        engine.add(Request(prompt(1), SamplingParams(max_tokens=5, structured=bad), request_id="bad"))
    assert_no_leak(engine)


def test_choice_and_regex_rows_finish_on_their_own(json_served: EngineModel) -> None:
    engine = Engine(json_served, config())
    engine.add(Request(prompt(1), SamplingParams(temperature=1.0, seed=3, max_tokens=50,
                                                 structured=StructuredSpec.choice(["red", "blue", "ok"])),
                       request_id="choice"))
    engine.add(Request(prompt(2), SamplingParams(temperature=1.0, seed=4, max_tokens=50,
                                                 structured=StructuredSpec.regex(r"[a-f]{2}-[0-9]{1,3}")),
                       request_id="regex"))
    events = run(engine)
    decode = json_served.tokenizer.decode
    assert decode(tokens(events["choice"]), skip_special_tokens=True) in ("red", "blue", "ok")
    assert re.fullmatch(r"[a-f]{2}-[0-9]{1,3}", decode(tokens(events["regex"]), skip_special_tokens=True))
    assert all(events[r][-1].finish_reason is FinishReason.STOP for r in ("choice", "regex"))


def test_constrained_logprobs_are_the_models_own(json_served: EngineModel) -> None:
    """A constrained row reports the model's logprobs (finite, as a free row's), not the masked ones."""
    engine = Engine(json_served, config())
    spec = StructuredSpec.json_schema(STRUCTURED_SCHEMAS[0])
    engine.add(Request(prompt(5), SamplingParams(temperature=0, max_tokens=30, logprobs=5, structured=spec),
                       request_id="constrained"))
    engine.add(Request(prompt(5), SamplingParams(temperature=0, max_tokens=1, logprobs=5), request_id="free"))
    events = run(engine)
    first, free = events["constrained"][0], events["free"][0]
    assert first.top_logprobs == free.top_logprobs  # the same prompt: the same first-step distribution
    for out in events["constrained"]:
        if out.token_id is not None:
            assert out.logprob is not None and math.isfinite(out.logprob)
            assert len(out.top_logprobs) == 5 and all(math.isfinite(lp) for _t, lp in out.top_logprobs)


def test_constrained_rows_survive_preemption(json_served: EngineModel) -> None:
    """A preempted constrained request is recomputed, not re-sampled: its matcher, which holds only generated
    tokens, carries on, and its greedy tokens equal those of a run alone."""
    pattern = r"[a-z]{20,40}"  # no whitespace for a random model to linger in: 20 to 40 tokens
    params = SamplingParams(temperature=0, max_tokens=100, structured=StructuredSpec.regex(pattern))
    prompts = [prompt(i, 20) for i in range(6)]
    alone = [generate_alone(json_served, p, params) for p in prompts]
    engine = Engine(json_served, config(num_kv_blocks=8))
    for i, p in enumerate(prompts):
        engine.add(Request(p, params, request_id=f"r{i}"))
    events = run(engine)
    assert engine.scheduler.num_preemptions > 0
    assert [tokens(events[f"r{i}"]) for i in range(6)] == alone
    for i in range(6):
        assert events[f"r{i}"][-1].finish_reason is FinishReason.STOP
        text = json_served.tokenizer.decode(tokens(events[f"r{i}"]), skip_special_tokens=True)
        assert re.fullmatch(pattern, text), text
    assert_no_leak(engine)


def test_rows_that_read_more_than_the_largest_logits_ask_for_every_logit_exact(
        served: EngineModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner asks the model for every logit of a row (``exact_logits``) where its request reads more
    than the largest: logprobs, a bias or penalty, a grammar, or a prompt's scores; plain sampling rows
    may take the ranked LM head's approximate tail (LlamaModel.forward)."""
    engine = Engine(served, config())
    seen: list[list[bool] | None] = []
    forward = served.model.forward

    def spy(*args: object) -> torch.Tensor:
        exact = args[5] if len(args) > 5 else None
        seen.append(None if exact is None else exact.tolist())  # type: ignore[attr-defined]
        return forward(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(served.model, "forward", spy)
    params = [greedy(2), greedy(2, logprobs=1), greedy(2, presence_penalty=0.5), greedy(2, prompt_logprobs=0),
              greedy(2)]
    for i, p in enumerate(params):
        engine.add(Request(prompt(i), p, request_id=f"r{i}"))
    run(engine)
    # the first step: five prompts, each sampling its row; then the prompt scores of r3's five tokens
    assert seen[0] == [False, True, True, False, False, True, True, True, True, True]
    assert seen[1] == [False, True, True, False, False]  # decode rows: nothing scores a prompt now
    engine.add(Request(prompt(9), greedy(2), request_id="plain"))
    seen.clear()
    run(engine)
    assert seen == [None, None]  # no row asks: no mask at all
