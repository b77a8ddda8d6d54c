"""The scheduler: which sequences run this step, and how many tokens each computes.

Pure Python: it moves sequences between the waiting and running queues and hands
out KV blocks, but never touches a tensor. Each step it

1. schedules every running decode (one token each), oldest first; a decode that cannot
   get a block preempts the newest running sequence, by recompute;
2. continues the prompts still being prefilled, oldest first, then
3. admits waiting sequences while the token and sequence budgets and the free blocks
   allow (keeping one free block per running sequence in hand), unless it just had to
   preempt.

A prompt's chunk may use the whole token budget (``max_num_batched_tokens``) when the step
carries no decodes. Beside decodes, each prompt's chunk is at most
``long_prefill_token_threshold`` tokens, and all the prompts' chunks together at most half the
budget: a step's time grows with its chunks, and every running stream waits for that step. A
prompt whose rest fits in twice the threshold goes whole, rather than in a last small chunk and
one step more. While requests wait, the prompts already being prefilled take at
most half of the budget, and the rest admits waiting requests, so a short request starts while
a long prompt is still being prefilled, instead of waiting for all of it. Chunks deep into a
long prompt are shorter, since each of their tokens attends to all the tokens before it
(``attention_context``, ``benchmarks/chunk_step.py``).

With prefix caching, a sequence admitted from the waiting queue first takes the longest run
of cached full blocks that starts its tokens (``kv_cache.hash_block`` keys), by reference,
and computes only what follows; at least its last token is always computed, since a step
must produce the logits to sample from. A waiting sequence whose next blocks past its cached prefix a
running prompt is computing now (a quarter of a step's budget or more) waits until they are cached
(``_later``), and the others are admitted past it: a burst of requests that share a system prompt computes
it once. A request that scores its prompt
(``prompt_logprobs``) reuses nothing: it needs the logits of every prompt position. Each
commit registers the blocks that became full, generated tokens' blocks too.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from realizar.kv_cache import BlockAllocator, BlockHash, hash_block
from realizar.request import Logprob, Request


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """A request's tokens and its place in the KV cache."""

    request: Request
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    # with SamplingParams.prompt_logprobs: those of prompt tokens 1, 2, ... computed so far
    prompt_logprobs: list[Logprob] = field(default_factory=list)
    # prefix caching: the keys of token_ids' first full blocks, extended as they are looked up or
    # registered (they stay valid across preemption: tokens never change), and how many blocks at
    # the head of block_table are registered in the cache (or were taken from it)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_blocks: int = 0
    # prompt tokens taken from the cache at the first admission; None until admitted
    num_cached_tokens: int | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_prompt_scored(self) -> int:
        """Prompt positions whose next token's logprob has been computed."""
        return len(self.prompt_logprobs)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass(frozen=True)
class ScheduledSequence:
    """``num_tokens`` new tokens of ``seq`` are computed this step."""

    seq: Sequence
    num_tokens: int
    samples: bool  # the chunk reaches the last known token, so a new token is sampled


@dataclass(frozen=True)
class SchedulerOutput:
    decodes: list[ScheduledSequence]  # one token each
    prefills: list[ScheduledSequence]  # chunks of more than one token

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Waiting and running queues under token, sequence and block budgets."""

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int | None = None, attention_context: int | None = None,
                 enable_prefix_caching: bool = False, cache_salt: bytes = b"") -> None:
        self.allocator = allocator
        self.enable_prefix_caching = enable_prefix_caching
        # mixed into every block key: whatever besides the tokens changes a block's K/V
        self.cache_salt = cache_salt
        # at first admissions (as vLLM counts them): prompt tokens looked up, and those found cached
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # a prompt's chunk in a step it shares with other work; None: no cap but the budget
        self.long_prefill_token_threshold = long_prefill_token_threshold or max_num_batched_tokens
        # the depth at which a token's attention costs as much as the rest of its forward pass;
        # None: chunks are not shortened with depth
        self.attention_context = attention_context
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # tokens of the waiting sequences (all uncomputed: a waiting sequence holds no blocks);
        # kept as a running count so that admission control on the event loop's thread reads
        # one int instead of walking a deque the engine thread is changing
        self.num_waiting_tokens = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.num_waiting_tokens += len(seq.token_ids)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work (see the module docstring for the order and the caps)."""
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledSequence] = []
        prefills: list[ScheduledSequence] = []
        preempted: list[Sequence] = []

        # 1. every running decode, oldest first; a decode short of a block preempts the newest
        for seq in [s for s in self.running if s.num_uncomputed == 1]:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted for an older decode
            if not self._reserve(seq, 1, preempted):
                continue  # seq itself was the newest: it waits for recompute
            decodes.append(ScheduledSequence(seq, 1, True))
            budget -= 1

        # 2. prompts still being prefilled, then 3. new admissions. Beside decodes, each prompt's
        # chunk is at most long_prefill_token_threshold tokens (fewer deep into a long prompt, see
        # _depth_factor), so the decodes' gap stays short. Without decodes a prompt may take the
        # whole budget; but while requests wait, the prompts already prefilling take at most half
        # of what is left, so a short request is never stuck behind a long prompt.
        if decodes:  # every decode waits for the step's prompt tokens: half the budget at most beside them
            budget = min(budget, max(1, self.max_num_batched_tokens // 2))
        partial = [s for s in self.running if s.num_uncomputed > 1]
        seats = self.max_num_seqs - len(self.running)
        later = self._later(seats) if not preempted else set()
        newcomers = min(len(self.waiting) - len(later), seats) if not preempted else 0
        cap = self.long_prefill_token_threshold if decodes else budget
        partial_units = float(budget // 2 if newcomers and partial else budget)
        for seq in partial:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if partial_units < 1 and (decodes or prefills):
                continue  # what is left is for the newcomers
            # without preempting what this step already runs: a chunk shrinks to the room left
            units = min(cap, partial_units)
            count = self._chunk(seq.num_computed, seq.num_uncomputed, units, min(budget, self._room(seq)))
            if count == 0:
                if decodes or prefills:
                    continue  # blocks come back as others finish, or a decode preempts
                count = self._chunk(seq.num_computed, seq.num_uncomputed, units, budget)
                if not self._reserve(seq, count, preempted):
                    continue
            else:
                self._allocate(seq, self.allocator.blocks_needed(seq.num_computed + count) - len(seq.block_table))
            prefills.append(ScheduledSequence(seq, count, seq.num_computed + count == len(seq.token_ids)))
            budget -= count
            partial_units -= count

        passed: list[Sequence] = []  # waiting for the blocks a running prompt is computing (_later)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if id(seq) in later:
                passed.append(self.waiting.popleft())
                continue
            hits = self._cached_prefix(seq)
            computed = len(hits) * self.allocator.block_size
            count = self._chunk(computed, len(seq.token_ids) - computed, cap, budget)
            # a cached block nobody holds leaves the free count when taken; a held one costs nothing
            revived = sum(1 for b in hits if self.allocator.ref_count(b) == 0)
            need = self.allocator.blocks_needed(computed + count) - len(hits)
            # keep one block per running sequence in hand so admission does not force a preemption
            if not self.allocator.can_allocate(revived + need + len(self.running)):
                break
            self.waiting.popleft()
            self.num_waiting_tokens -= len(seq.token_ids)
            self._take_prefix(seq, hits)
            self._allocate(seq, need)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            prefills.append(ScheduledSequence(seq, count, seq.num_computed + count == len(seq.token_ids)))
            budget -= count
        self.waiting.extendleft(reversed(passed))

        # a one-token chunk (a one-token prompt, or a prompt's last token) runs as a decode
        return SchedulerOutput(
            decodes=decodes + [s for s in prefills if s.num_tokens == 1],
            prefills=[s for s in prefills if s.num_tokens > 1],
        )

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding the longest run of ``seq``'s full blocks from its start, its
        last token left out (it must be computed for its logits); none without prefix caching or
        for a request that scores its prompt."""
        if not self.enable_prefix_caching or seq.request.params.prompt_logprobs is not None:
            return []
        limit = (len(seq.token_ids) - 1) // self.allocator.block_size
        self._hash_blocks(seq, limit)
        hits: list[int] = []
        for key in seq.block_hashes[:limit]:
            block = self.allocator.lookup(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def _later(self, seats: int) -> set[int]:
        """The ids of the waiting sequences, among the first ``seats`` that could be admitted, whose blocks
        past their cached prefix running prompts are computing now, for at least a quarter of a step's
        budget: admitted later, once those are cached, they compute only what follows. So a burst of
        requests that share a system prompt computes it once, not once per request admitted before the
        first had cached it (8 agents' first turns with a 2,000-token system prompt: TTFT p50 1.42-1.45 s
        against 3.87-3.97, BENCHMARKS.md). A shorter shared run is computed within the step the request
        would wait for, so waiting would cost it a step to save less than a quarter of one."""
        if not self.enable_prefix_caching or not self.waiting:
            return set()
        coming = {key for s in self.running if s.num_computed < s.num_prompt_tokens
                  for key in s.block_hashes[s.num_cached_blocks:]}
        later: set[int] = set()
        if not coming:
            return later
        admissible = 0
        worth = -(-self.max_num_batched_tokens // (4 * self.allocator.block_size))  # blocks
        for seq in self.waiting:
            if admissible >= seats:
                break
            hits = len(self._cached_prefix(seq))
            run = seq.block_hashes[hits:hits + worth]
            if len(run) == worth and all(key in coming for key in run):
                later.add(id(seq))
            else:
                admissible += 1
        return later

    def _take_prefix(self, seq: Sequence, hits: list[int]) -> None:
        """Admit ``seq`` onto the cached blocks ``hits``: shared, and counted as computed."""
        for block in hits:
            seq.block_table.append(self.allocator.share(block))
        seq.num_cached_blocks = len(hits)
        seq.num_computed = len(hits) * self.allocator.block_size
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = seq.num_computed
            if self.enable_prefix_caching and seq.request.params.prompt_logprobs is None:
                self.prefix_cache_queries += len(seq.token_ids)
                self.prefix_cache_hits += seq.num_computed

    def _hash_blocks(self, seq: Sequence, count: int) -> None:
        """Extend ``seq.block_hashes`` to its first ``count`` full blocks."""
        bs = self.allocator.block_size
        hashes = seq.block_hashes
        while len(hashes) < count:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs],
                                     self.cache_salt))

    def _register(self, seq: Sequence) -> None:
        """Register the blocks of ``seq`` that its last chunk filled."""
        full = seq.num_computed // self.allocator.block_size
        if full <= seq.num_cached_blocks:
            return
        self._hash_blocks(seq, full)
        for i in range(seq.num_cached_blocks, full):
            self.allocator.register(seq.block_table[i], seq.block_hashes[i])
        seq.num_cached_blocks = full

    def _depth_factor(self, depth: int) -> float:
        """What a token of a chunk that starts ``depth`` tokens into its sequence costs, against one
        at the start. Each token attends to every token before it, so at depth ``attention_context``
        a token costs twice what it costs at the start (measured with benchmarks/chunk_step.py)."""
        return 1.0 if self.attention_context is None else 1 + depth / self.attention_context

    def _fit(self, depth: int, units: float) -> int:
        """The tokens of a chunk starting at ``depth`` that ``units`` tokens' worth of compute buys
        (at least one), so a step's time stays about the same whatever the depth."""
        return max(1, int(units / self._depth_factor(depth)))

    def _chunk(self, depth: int, left: int, units: float, limit: int) -> int:
        """A prompt's next chunk, from ``depth`` with ``left`` tokens to go and at most ``limit``: what ``units``
        tokens' worth of compute buys, or all that is left where it costs at most twice that, so that a short
        prompt (or a long one's tail) is not split into a last small chunk that costs a step more. 64 prompts of
        32 tokens arriving at 64 running streams got their first token 340-360 ms after it, against 470-600 when
        split in two (BENCHMARKS.md, AMX Xeon, third session)."""
        if left <= min(limit, self._fit(depth, 2 * units)):
            return left
        return min(left, limit, self._fit(depth, units))

    def _room(self, seq: Sequence) -> int:
        """Tokens ``seq`` can add with the blocks it holds and the free ones, less one free block
        per other running sequence, kept in hand so their decodes need not preempt."""
        free = self.allocator.num_free - (len(self.running) - 1)
        return max(0, (len(seq.block_table) + free) * self.allocator.block_size - seq.num_computed)

    def _reserve(self, seq: Sequence, count: int, preempted: list[Sequence]) -> bool:
        """Give ``seq`` the blocks for ``count`` more tokens, preempting newer sequences."""
        need = self.allocator.blocks_needed(seq.num_computed + count) - len(seq.block_table)
        while not self.allocator.can_allocate(need):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        self._allocate(seq, need)
        return True

    def _allocate(self, seq: Sequence, count: int) -> None:
        for _ in range(count):
            seq.block_table.append(self.allocator.allocate())

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: drop the cache; the prompt and the generated tokens
        are prefilled again when the sequence is readmitted first."""
        self.allocator.free_all(seq.block_table)
        seq.num_computed = seq.num_cached_blocks = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_waiting_tokens += len(seq.token_ids)

    def commit(self, output: SchedulerOutput) -> None:
        """Record that the scheduled tokens' K/V are now in the cache."""
        for item in (*output.decodes, *output.prefills):
            item.seq.num_computed += item.num_tokens
            if self.enable_prefix_caching:
                self._register(item.seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence from whichever queue holds it and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self.num_waiting_tokens -= len(seq.token_ids)
        self.allocator.free_all(seq.block_table)
        seq.status = SequenceStatus.FINISHED
