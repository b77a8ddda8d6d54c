"""Scheduler and block allocator, without a model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realizar.engine.scheduler import Scheduler, Sequence, SequenceStatus
from realizar.kv_cache import BlockAllocator, OutOfBlocks
from realizar.request import Request, SamplingParams


def make_seq(prompt_len: int, max_tokens: int = 8) -> Sequence:
    ids = list(range(1, prompt_len + 1))
    return Sequence(Request(ids, SamplingParams(temperature=0, max_tokens=max_tokens)), list(ids), prompt_len)


def run_step(sched: Scheduler) -> list[Sequence]:
    """Schedule, pretend the model ran, append a token to sampling sequences."""
    out = sched.schedule()
    sched.commit(out)
    sampled = []
    for item in (*out.decodes, *out.prefills):
        if item.samples:
            item.seq.token_ids.append(7)
            sampled.append(item.seq)
    return sampled


def test_allocator_refcounts_and_double_free() -> None:
    alloc = BlockAllocator(4, 16)
    a = alloc.allocate()
    alloc.share(a)
    assert alloc.ref_count(a) == 2
    alloc.free(a)
    assert alloc.num_free == 3
    alloc.free(a)
    assert alloc.num_free == 4
    with pytest.raises(AssertionError):
        alloc.free(a)
    for _ in range(4):
        alloc.allocate()
    with pytest.raises(OutOfBlocks):
        alloc.allocate()
    assert alloc.usage == 1.0


def test_token_budget_chunks_prefill() -> None:
    sched = Scheduler(BlockAllocator(64, 16), max_num_seqs=8, max_num_batched_tokens=32)
    seq = make_seq(80)
    sched.add(seq)
    out = sched.schedule()
    assert [i.num_tokens for i in out.prefills] == [32]
    assert not out.prefills[0].samples
    sched.commit(out)
    out = sched.schedule()
    assert out.prefills[0].num_tokens == 32
    sched.commit(out)
    out = sched.schedule()
    assert out.prefills[0].num_tokens == 16 and out.prefills[0].samples
    assert seq.num_computed == 64


def test_sequence_budget_limits_running() -> None:
    sched = Scheduler(BlockAllocator(64, 16), max_num_seqs=2, max_num_batched_tokens=512)
    for _ in range(5):
        sched.add(make_seq(4))
    out = sched.schedule()
    assert len(out.prefills) == 2
    assert len(sched.running) == 2 and len(sched.waiting) == 3


def test_decodes_and_prefills_share_a_step() -> None:
    sched = Scheduler(BlockAllocator(64, 16), max_num_seqs=8, max_num_batched_tokens=512)
    first = make_seq(5)
    sched.add(first)
    run_step(sched)
    sched.add(make_seq(6))
    out = sched.schedule()
    assert [i.seq for i in out.decodes] == [first]
    assert len(out.prefills) == 1


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    alloc = BlockAllocator(4, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=64)
    old, new = make_seq(4), make_seq(3)
    sched.add(old)
    run_step(sched)  # old: 5 tokens, 2 blocks
    sched.add(new)
    run_step(sched)  # new admitted: 4 tokens, 1 block
    for _ in range(6):
        run_step(sched)
    assert sched.num_preemptions >= 1
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    assert alloc.num_used == sum(len(s.block_table) for s in sched.running)


def test_finish_frees_blocks_from_either_queue() -> None:
    alloc = BlockAllocator(16, 4)
    sched = Scheduler(alloc, max_num_seqs=1, max_num_batched_tokens=64)
    running, waiting = make_seq(9), make_seq(2)
    sched.add(running)
    sched.add(waiting)
    run_step(sched)
    assert running.status is SequenceStatus.RUNNING and waiting.status is SequenceStatus.WAITING
    sched.finish(waiting)
    sched.finish(running)
    assert alloc.num_free == 16
    assert not sched.has_work


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(1, 40)), max_size=60),
       st.integers(4, 24), st.integers(1, 6), st.integers(8, 64), st.integers(1, 64))
def test_random_add_step_abort_leaks_no_blocks(ops: list[tuple[str, int]], num_blocks: int, max_seqs: int,
                                               budget: int, threshold: int) -> None:
    alloc = BlockAllocator(num_blocks, 4)
    sched = Scheduler(alloc, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                      long_prefill_token_threshold=threshold)
    live: list[Sequence] = []
    for op, n in ops:
        if op == "add":
            # a sequence must fit in the cache on its own, as the engine guarantees
            prompt = min(n, num_blocks * 4 - 8)
            if prompt > 0:
                seq = make_seq(prompt, max_tokens=min(8, num_blocks * 4 - prompt))
                sched.add(seq)
                live.append(seq)
        elif op == "step":
            had_work = sched.has_work
            out = sched.schedule()
            # every running decode is in the step, and a shared step caps each prompt's chunk
            decoding = [s for s in sched.running if s.num_uncomputed == 1]
            assert {i.seq.request_id for i in out.decodes} >= {s.request_id for s in decoding}
            if out.decodes or len(out.prefills) > 1:
                assert all(i.num_tokens <= threshold for i in out.prefills)
            assert out.num_batched_tokens <= budget
            assert not had_work or not out.empty or out.preempted  # no step without progress
            sched.commit(out)
            sampled = []
            for item in (*out.decodes, *out.prefills):
                if item.samples:
                    item.seq.token_ids.append(7)
                    sampled.append(item.seq)
            for seq in sampled:
                if seq.num_generated >= seq.request.params.max_tokens:
                    sched.finish(seq)
                    live.remove(seq)
        elif live:
            seq = live.pop(n % len(live))
            sched.finish(seq)
        used = sum(len(s.block_table) for s in sched.running)
        assert alloc.num_used == used
        assert all(not s.block_table for s in sched.waiting)
        assert sched.num_waiting_tokens == sum(len(s.token_ids) for s in sched.waiting)
        assert len(sched.running) <= max_seqs
    for seq in live:
        sched.finish(seq)
    assert alloc.num_free == num_blocks


def test_decodes_come_first_and_a_long_prompt_is_chunked_beside_them() -> None:
    sched = Scheduler(BlockAllocator(256, 16), max_num_seqs=8, max_num_batched_tokens=512,
                      long_prefill_token_threshold=64)
    long = make_seq(2000)
    sched.add(long)  # the long prompt is older than the streams
    out = sched.schedule()
    assert [i.num_tokens for i in out.prefills] == [512]  # alone: the whole budget
    sched.commit(out)
    streams = [make_seq(4) for _ in range(3)]
    for seq in streams:
        sched.add(seq)
    run_step(sched)  # the streams' prompts (each capped, the long one too)
    for _ in range(5):
        out = sched.schedule()
        assert [i.seq.request_id for i in out.decodes] == [s.request_id for s in streams]
        assert [(i.seq.request_id, i.num_tokens) for i in out.prefills] == [(long.request_id, 64)]
        sched.commit(out)
        for item in out.decodes:
            item.seq.token_ids.append(7)


def test_a_waiting_request_is_admitted_while_a_long_prompt_prefills() -> None:
    sched = Scheduler(BlockAllocator(256, 16), max_num_seqs=8, max_num_batched_tokens=512,
                      long_prefill_token_threshold=64)
    long = make_seq(3000)
    sched.add(long)
    run_step(sched)
    short = make_seq(10)
    sched.add(short)
    out = sched.schedule()
    chunks = {i.seq.request_id: i.num_tokens for i in out.prefills}
    assert chunks == {long.request_id: 64, short.request_id: 10}
    assert [i.seq.request_id for i in out.prefills if i.samples] == [short.request_id]
    assert long.num_computed + 64 < long.num_prompt_tokens


def test_a_long_prompt_chunk_shrinks_to_the_blocks_at_hand_instead_of_preempting() -> None:
    alloc = BlockAllocator(10, 4)  # 40 tokens
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    stream = make_seq(3, max_tokens=20)
    sched.add(stream)
    run_step(sched)  # stream: 4 tokens, 1 block
    long = make_seq(60)
    sched.add(long)
    for _ in range(12):
        out = sched.schedule()
        assert all(s is long for s in out.preempted)
        assert stream.request_id in {i.seq.request_id for i in out.decodes}
        sched.commit(out)
        for item in (*out.decodes, *out.prefills):
            if item.samples:
                item.seq.token_ids.append(7)
    assert stream.num_preemptions == 0


def test_chunks_shrink_with_their_depth_into_a_long_prompt() -> None:
    sched = Scheduler(BlockAllocator(512, 16), max_num_seqs=8, max_num_batched_tokens=512,
                      long_prefill_token_threshold=64, attention_context=1000)
    long = make_seq(6000)
    sched.add(long)
    sizes = []
    while long.num_computed < 3000:
        out = sched.schedule()
        sizes.append((long.num_computed, out.prefills[0].num_tokens))
        sched.commit(out)
    assert sizes[0] == (0, 512)  # alone at the start: the whole budget
    # alone, deeper: the budget over (1 + depth / attention_context)
    assert all(n == int(512 / (1 + depth / 1000)) for depth, n in sizes)
    stream = make_seq(3)
    sched.add(stream)
    run_step(sched)
    out = sched.schedule()
    depth = long.num_computed
    assert [i.num_tokens for i in out.prefills] == [int(64 / (1 + depth / 1000))]
