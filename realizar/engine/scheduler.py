"""The scheduler: which sequences run this step, and how many tokens each computes.

Pure Python: it moves sequences between the waiting and running queues and hands
out KV blocks, but never touches a tensor. Each step it

1. schedules every running decode (one token each), oldest first; a decode that cannot
   get a block preempts the newest running sequence, by recompute;
2. continues the prompts still being prefilled, oldest first, then
3. admits waiting sequences while the token and sequence budgets and the free blocks
   allow (keeping one free block per running sequence in hand), unless it just had to
   preempt.

A prompt's chunk may use the whole token budget (``max_num_batched_tokens``) only when it
is the step's only work. When the step also carries decodes, or other prompts want to
start or continue, each prompt's chunk is at most ``long_prefill_token_threshold`` tokens:
a step's time grows with its chunk, and every running stream waits for that step. What the
capped chunk leaves of the budget admits waiting requests, so a short request starts while
a long prompt is still being prefilled, instead of waiting for all of it. Both caps shrink
with the chunk's depth into its prompt (``attention_context``), since a token deep into a
long prompt attends to all the tokens before it (``benchmarks/chunk_step.py``).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from realizar.kv_cache import BlockAllocator
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
    preempted: list[Sequence]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.decodes) + sum(s.num_tokens for s in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Waiting and running queues under token, sequence and block budgets."""

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int | None = None, attention_context: int | None = None) -> None:
        self.allocator = allocator
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

        # 2. prompts still being prefilled, then 3. new admissions; a prompt takes the whole
        # budget only when it is the step's only work, otherwise a chunk of at most
        # long_prefill_token_threshold, so decodes keep their pace and newcomers get a seat
        partial = [s for s in self.running if s.num_uncomputed > 1]
        seats = self.max_num_seqs - len(self.running)
        contenders = len(partial) + (min(len(self.waiting), seats) if not preempted else 0)
        cap = self.long_prefill_token_threshold if decodes or contenders > 1 else budget
        for seq in partial:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            count = min(seq.num_uncomputed, budget, self._deep(seq, cap))
            # without preempting what this step already runs: a chunk shrinks to the room left
            count = min(count, self._room(seq))
            if count == 0:
                if decodes or prefills:
                    continue  # blocks come back as others finish, or a decode preempts
                count = min(seq.num_uncomputed, budget, self._deep(seq, cap))
                if not self._reserve(seq, count, preempted):
                    continue
            else:
                self._allocate(seq, self.allocator.blocks_needed(seq.num_computed + count) - len(seq.block_table))
            prefills.append(ScheduledSequence(seq, count, seq.num_computed + count == len(seq.token_ids)))
            budget -= count

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            count = min(seq.num_uncomputed, budget, cap)
            need = self.allocator.blocks_needed(seq.num_computed + count) - len(seq.block_table)
            # keep one block per running sequence in hand so admission does not force a preemption
            if not self.allocator.can_allocate(need + len(self.running)):
                break
            self.waiting.popleft()
            self.num_waiting_tokens -= len(seq.token_ids)
            self._allocate(seq, need)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            prefills.append(ScheduledSequence(seq, count, seq.num_computed + count == len(seq.token_ids)))
            budget -= count

        # a one-token chunk (a one-token prompt, or a prompt's last token) runs as a decode
        return SchedulerOutput(
            decodes=decodes + [s for s in prefills if s.num_tokens == 1],
            prefills=[s for s in prefills if s.num_tokens > 1],
            preempted=preempted,
        )

    def _deep(self, seq: Sequence, cap: int) -> int:
        """``cap`` for a chunk that starts ``seq.num_computed`` tokens into its sequence.

        Each token of a chunk attends to every token before it, so a chunk deep into a long
        prompt costs more per token: at depth ``attention_context`` twice what it costs at the
        start. The cap shrinks in proportion, so a step's time stays about the same whatever the
        depth (measured with benchmarks/chunk_step.py)."""
        if self.attention_context is None:
            return cap
        return max(1, int(cap / (1 + seq.num_computed / self.attention_context)))

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
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_waiting_tokens += len(seq.token_ids)

    def commit(self, output: SchedulerOutput) -> None:
        """Record that the scheduled tokens' K/V are now in the cache."""
        for item in output.decodes:
            item.seq.num_computed += item.num_tokens
        for item in output.prefills:
            item.seq.num_computed += item.num_tokens

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence from whichever queue holds it and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self.num_waiting_tokens -= len(seq.token_ids)
        self.allocator.free_all(seq.block_table)
        seq.status = SequenceStatus.FINISHED
