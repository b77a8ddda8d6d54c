"""Scheduler and block allocator, without a model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realizar.engine.scheduler import Scheduler, SchedulerOutput, Sequence, SequenceStatus
from realizar.kv_cache import BlockAllocator, OutOfBlocks
from realizar.request import Request, SamplingParams


def make_seq(prompt_len: int, max_tokens: int = 8) -> Sequence:
    ids = list(range(1, prompt_len + 1))
    return Sequence(Request(ids, SamplingParams(temperature=0, max_tokens=max_tokens)), list(ids), prompt_len)


def batched_tokens(out: SchedulerOutput) -> int:
    return sum(i.num_tokens for i in (*out.decodes, *out.prefills))


def run_step(sched: Scheduler) -> list[Sequence]:
    """Schedule, pretend the model ran, append a token to sampling sequences."""
    return complete(sched, sched.schedule())


def complete(sched: Scheduler, out: SchedulerOutput) -> list[Sequence]:
    """Commit a scheduled step as if the model ran it; append a token to the sampling sequences."""
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
            preemptions = sched.num_preemptions
            streaming = {s.request_id for s in sched.running if s.num_uncomputed == 1}
            out = sched.schedule()
            # every running decode is in the step, and beside the decodes of running streams each prompt's
            # chunk is capped, the last at twice the cap, and all of them together at half the budget (a
            # one-token prompt's only chunk also runs as a decode, but no stream waits on it: the other
            # prompts then keep the whole budget)
            decoding = [s for s in sched.running if s.num_uncomputed == 1]
            assert {i.seq.request_id for i in out.decodes} >= {s.request_id for s in decoding}
            if streaming & {i.seq.request_id for i in out.decodes}:
                assert all(i.num_tokens <= (2 if i.samples else 1) * threshold for i in out.prefills)
                assert sum(i.num_tokens for i in out.prefills) <= max(1, budget // 2)
            assert batched_tokens(out) <= budget
            assert not had_work or not out.empty or sched.num_preemptions > preemptions  # no step without progress
            for seq in complete(sched, out):
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
    # while a request waits, the long prompt takes at most half of the budget, the newcomer the rest
    assert chunks == {long.request_id: 256, short.request_id: 10}
    assert [i.seq.request_id for i in out.prefills if i.samples] == [short.request_id]
    assert long.num_computed + 256 < long.num_prompt_tokens


def test_newcomers_start_beside_decodes_and_a_long_prompt_within_half_the_budget() -> None:
    """Beside decodes every prompt's chunk is capped and all of them together take at most half the
    budget; the long prompt keeps moving, and short requests that arrive together start in the next
    step as far as that half goes, the rest in the step after."""
    sched = Scheduler(BlockAllocator(512, 16), max_num_seqs=16, max_num_batched_tokens=512,
                      long_prefill_token_threshold=64)
    stream = make_seq(3, max_tokens=100)
    sched.add(stream)
    run_step(sched)  # the stream decodes from now on
    long = make_seq(3000)
    sched.add(long)
    run_step(sched)
    shorts = [make_seq(40) for _ in range(6)]
    for seq in shorts:
        sched.add(seq)
    out = sched.schedule()
    assert stream.request_id in {i.seq.request_id for i in out.decodes}
    assert all(i.num_tokens <= 64 for i in out.prefills)
    chunks = {i.seq.request_id: i.num_tokens for i in out.prefills}
    assert sum(chunks.values()) == 256
    assert chunks == {long.request_id: 64, **{s.request_id: 40 for s in shorts[:4]}, shorts[4].request_id: 32}
    complete(sched, out)
    out = sched.schedule()
    chunks = {i.seq.request_id: i.num_tokens for i in out.prefills}
    assert chunks[shorts[4].request_id] == 8 and chunks[shorts[5].request_id] == 40
    assert sum(chunks.values()) <= 256


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
        assert stream.request_id in {i.seq.request_id for i in out.decodes}
        complete(sched, out)
    assert stream.num_preemptions == 0


def test_a_prompt_that_fits_in_twice_the_cap_goes_whole_beside_decodes() -> None:
    """Beside a stream's decode, a 32-token prompt takes one chunk of 32 with a 16-token cap (not 16 and a
    step more); a 33-token one takes 16, then 17; what the budget or the blocks leave still bounds a chunk."""
    sched = Scheduler(BlockAllocator(64, 4), max_num_seqs=8, max_num_batched_tokens=128, long_prefill_token_threshold=16)
    stream = make_seq(3, max_tokens=20)
    sched.add(stream)
    run_step(sched)
    short, longer = make_seq(32), make_seq(33)
    sched.add(short)
    sched.add(longer)
    out = sched.schedule()
    assert [i.seq.request_id for i in out.decodes] == [stream.request_id]
    assert [(i.seq.request_id, i.num_tokens, i.samples) for i in out.prefills] == [
        (short.request_id, 32, True), (longer.request_id, 16, False)]
    complete(sched, out)
    out = sched.schedule()
    assert [(i.seq.request_id, i.num_tokens, i.samples) for i in out.prefills] == [(longer.request_id, 17, True)]
    tight = Scheduler(BlockAllocator(64, 4), max_num_seqs=8, max_num_batched_tokens=24, long_prefill_token_threshold=16)
    stream = make_seq(3, max_tokens=20)
    tight.add(stream)
    run_step(tight)
    tight.add(make_seq(30))
    out = tight.schedule()  # beside a decode, half the budget: 12 tokens, not all 30 nor the cap's 16
    assert [i.num_tokens for i in out.prefills] == [12]


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


# -- prefix caching ------------------------------------------------------------------------------


def make_cached(num_blocks: int, block_size: int = 4, **kw: int) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks, block_size), max_num_seqs=kw.pop("max_num_seqs", 8),
                     max_num_batched_tokens=kw.pop("max_num_batched_tokens", 64), enable_prefix_caching=True, **kw)


def seq_of(ids: list[int], max_tokens: int = 4, prompt_logprobs: int | None = None) -> Sequence:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=prompt_logprobs)
    return Sequence(Request(ids, params), list(ids), len(ids))


def finish_all(sched: Scheduler) -> None:
    while sched.has_work:
        for seq in run_step(sched):
            if seq.num_generated >= seq.request.params.max_tokens:
                sched.finish(seq)


def test_a_cached_prefix_is_shared_and_only_the_rest_is_computed() -> None:
    sched = make_cached(32)
    system = list(range(100, 112))  # three full blocks of 4
    first = seq_of(system + [1, 2])
    sched.add(first)
    finish_all(sched)
    assert first.num_cached_tokens == 0 and sched.allocator.num_cached >= 3
    second = seq_of(system + [3, 4, 5])
    sched.add(second)
    out = sched.schedule()
    assert second.num_cached_tokens == 12 and [i.num_tokens for i in out.prefills] == [3]
    assert [sched.allocator.block_hash(b) for b in second.block_table[:3]] == second.block_hashes[:3]
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (14 + 15, 12)
    third = seq_of(system + [3, 4, 5])  # while the second holds the blocks: shared, refcount 2
    sched.add(third)
    sched.commit(out)
    out = sched.schedule()
    assert third.block_table[:3] == second.block_table[:3]
    assert all(sched.allocator.ref_count(b) == 2 for b in third.block_table[:3])


def test_a_burst_that_shares_a_prompt_computes_it_once() -> None:
    """Requests that arrive together with a shared system prompt: the first computes it and the others
    wait for its blocks instead of computing them too, while an unrelated request starts at once; then
    they take the shared blocks and compute only their own tails. One whose first request is aborted
    mid-prompt is admitted at once."""
    sched = make_cached(64, max_num_batched_tokens=8)
    system = list(range(100, 124))  # six full blocks of 4: three steps of 8 tokens
    first, second, third = seq_of(system + [1]), seq_of(system + [2, 3]), seq_of(system + [4])
    other = seq_of(list(range(300, 306)))
    for seq in (first, second, other, third):
        sched.add(seq)
    computed = {seq.request_id: 0 for seq in (first, second, third, other)}
    while second.num_cached_tokens is None or third.num_cached_tokens is None:
        out = sched.schedule()
        for item in out.prefills + out.decodes:
            computed[item.seq.request_id] += item.num_tokens
        complete(sched, out)
        if first.num_computed < len(system):
            assert second.status is third.status is SequenceStatus.WAITING
    assert other.status is not SequenceStatus.WAITING and computed[other.request_id] > 0  # it started meanwhile
    assert (second.num_cached_tokens, third.num_cached_tokens) == (24, 24)
    finish_all(sched)
    assert computed[second.request_id] <= 3 and computed[third.request_id] <= 2

    sched = make_cached(64, max_num_batched_tokens=8)
    first, second = seq_of(system + [1]), seq_of(system + [2])
    sched.add(first)
    sched.add(second)
    run_step(sched)
    run_step(sched)
    assert second.status is SequenceStatus.WAITING and first.num_computed == 16
    sched.finish(first)  # aborted: its last blocks will never come
    out = sched.schedule()
    assert second.status is SequenceStatus.RUNNING and second.num_cached_tokens == 16
    assert [(i.seq, i.num_tokens) for i in out.prefills] == [(second, 8)]

    # a shared run shorter than a quarter of the budget (16 tokens: 4 blocks) is not waited for
    sched = make_cached(64, max_num_batched_tokens=64, long_prefill_token_threshold=8)
    sched.add(seq_of([9, 9]))
    run_step(sched)  # a decode, so that prompts go in chunks of 8
    first, second = seq_of(system + [1]), seq_of(system[:12] + [2, 2, 2, 2, 2])
    sched.add(first)
    run_step(sched)
    sched.add(second)
    out = sched.schedule()
    assert first.num_computed == 8 and second.status is SequenceStatus.RUNNING and second.num_cached_tokens == 8


def test_the_last_prompt_token_is_always_computed() -> None:
    sched = make_cached(32)
    ids = list(range(100, 108))  # exactly two blocks
    sched.add(seq_of(ids))
    finish_all(sched)
    again = seq_of(ids)
    sched.add(again)
    out = sched.schedule()
    # the first block only: the second holds the last token, whose logits are sampled
    assert again.num_cached_tokens == 4
    assert [(i.seq, i.num_tokens, i.samples) for i in (*out.decodes, *out.prefills)] == [(again, 4, True)]


def test_a_request_that_scores_its_prompt_reuses_nothing() -> None:
    sched = make_cached(32)
    ids = list(range(100, 113))
    sched.add(seq_of(ids))
    finish_all(sched)
    scoring = seq_of(ids, prompt_logprobs=1)
    sched.add(scoring)
    out = sched.schedule()
    assert scoring.num_cached_tokens == 0 and out.prefills[0].num_tokens == 13
    assert sched.prefix_cache_queries == 13  # scoring requests are not lookups


def test_caching_off_shares_nothing() -> None:
    sched = Scheduler(BlockAllocator(32, 4), max_num_seqs=8, max_num_batched_tokens=64)
    ids = list(range(100, 113))
    sched.add(seq_of(ids))
    finish_all(sched)
    again = seq_of(ids)
    sched.add(again)
    sched.schedule()
    assert again.num_cached_tokens == 0 and sched.allocator.num_cached == 0


def test_generated_tokens_blocks_are_cached_too() -> None:
    sched = make_cached(32)
    first = seq_of([100, 101, 102], max_tokens=6)
    sched.add(first)
    finish_all(sched)  # 3 + 6 tokens; the last sampled one never computed: 8 computed, two blocks
    assert sched.allocator.num_cached == 2
    turn = seq_of(first.token_ids + [50, 51])
    sched.add(turn)
    sched.schedule()
    assert turn.num_cached_tokens == 8


def test_admission_counts_cached_blocks_nobody_holds_as_taken_and_held_ones_as_free() -> None:
    # 6 blocks of 4: a 12-token prefix (3 blocks) cached, nobody holding it
    sched = make_cached(6, max_num_seqs=4)
    prefix = list(range(100, 112))
    sched.add(seq_of(prefix + [1]))
    finish_all(sched)
    assert sched.allocator.num_free == 6
    holder = seq_of(prefix + [2])
    sched.add(holder)
    run_step(sched)  # takes the 3 cached blocks and one more: 2 free
    assert sched.allocator.num_free == 2 and holder.num_cached_tokens == 12
    # the same prefix costs no block now; 1 for the new token, 1 kept in hand for the holder
    sharer = seq_of(prefix + [3])
    sched.add(sharer)
    run_step(sched)
    assert sharer.status is SequenceStatus.RUNNING and sharer.num_cached_tokens == 12
    assert sched.allocator.num_free == 1


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "add", "step", "step", "step", "abort", "preempt"]),
                          st.integers(0, 10_000)), min_size=10, max_size=100),
       st.integers(6, 24), st.integers(1, 6), st.integers(8, 48), st.integers(1, 32))
def test_random_ops_with_shared_prefixes_leak_nothing_and_never_free_a_held_block(
        ops: list[tuple[str, int]], num_blocks: int, max_seqs: int, budget: int, threshold: int) -> None:
    bs = 4
    alloc = BlockAllocator(num_blocks, bs)
    sched = Scheduler(alloc, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                      long_prefill_token_threshold=threshold, enable_prefix_caching=True)
    prefixes = [[200 + i for i in range(9)], list(range(300, 316)), [5, 6, 7, 8] * 3]
    # what each block's slots hold: the token whose K/V a step wrote there (the model's stand-in)
    content: dict[int, list[int | None]] = {b: [None] * bs for b in range(num_blocks)}
    live: list[Sequence] = []

    def commit(out: SchedulerOutput) -> None:
        """Commit a step: a token for each sampling sequence, and those at max_tokens finish."""
        sched.commit(out)
        for item in (*out.decodes, *out.prefills):
            if item.samples:
                item.seq.token_ids.append(item.seq.num_generated % 3 + 1)
                if item.seq.num_generated >= item.seq.request.params.max_tokens:
                    sched.finish(item.seq)
                    live.remove(item.seq)

    for op, n in ops:
        if op == "add":
            ids = prefixes[n % 3][: 3 + n % 14] + [n % 7 + 1] * (n % 5)
            ids = ids[: num_blocks * bs - 8] or [1]
            seq = seq_of(ids, max_tokens=min(1 + n % 9, num_blocks * bs - len(ids)),
                         prompt_logprobs=1 if n % 11 == 0 else None)
            sched.add(seq)
            live.append(seq)
        elif op == "step":
            out = sched.schedule()
            assert batched_tokens(out) <= budget
            for item in (*out.decodes, *out.prefills):
                seq = item.seq
                for p in range(seq.num_computed, seq.num_computed + item.num_tokens):
                    block = seq.block_table[p // bs]
                    # a step writes only into blocks that its sequence holds alone
                    assert alloc.ref_count(block) == 1 and alloc.block_hash(block) is None
                    content[block][p % bs] = seq.token_ids[p]
            commit(out)
        elif op == "abort" and live:
            sched.finish(live.pop(n % len(live)))
        elif op == "preempt" and sched.running:
            victim = sched.running.pop(n % len(sched.running))
            sched._preempt(victim)  # as _reserve does when a decode is short of a block
        # every block's count is the number of sequences that hold it; the rest is free
        holders: dict[int, int] = {}
        for seq in sched.running:
            for block in seq.block_table:
                holders[block] = holders.get(block, 0) + 1
        assert all(alloc.ref_count(b) == holders.get(b, 0) for b in range(num_blocks))
        assert alloc.num_used == len(holders)
        assert all(not s.block_table for s in sched.waiting)
        # the cache holds what each running sequence computed, shared blocks included
        for seq in sched.running:
            assert all(content[seq.block_table[p // bs]][p % bs] == seq.token_ids[p]
                       for p in range(seq.num_computed))
        assert len(sched.running) <= max_seqs
    # and every request still in the queues finishes, none waiting forever for blocks another computes
    for _ in range(20 * num_blocks * bs):
        if not live:
            break
        commit(sched.schedule())
    assert not live
    assert alloc.num_free == num_blocks and alloc.num_used == 0
    assert all(alloc.ref_count(b) == 0 for b in range(num_blocks))
