"""The scheduler: which sequences run this step, and how many tokens each computes.

Pure Python: it moves sequences between the waiting and running queues and hands
out KV blocks, but never touches a tensor. Each step it

1. continues the running sequences, oldest first (a decode is one token; a prompt
   still being prefilled gets a chunk of what is left of the token budget);
2. preempts the newest running sequence, by recompute, when a block cannot be had;
3. admits waiting sequences while the token and sequence budgets and the free
   blocks allow, unless it just had to preempt.
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

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            count = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, count, preempted):
                break  # seq itself was preempted: everything after it is gone too
            scheduled.append(ScheduledSequence(seq, count, seq.num_computed + count == len(seq.token_ids)))
            budget -= count
            index += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            count = min(seq.num_uncomputed, budget)
            need = self.allocator.blocks_needed(seq.num_computed + count) - len(seq.block_table)
            # keep one block per running sequence in hand so admission does not force a preemption
            if not self.allocator.can_allocate(need + len(self.running)):
                break
            self.waiting.popleft()
            self._allocate(seq, need)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, count, seq.num_computed + count == len(seq.token_ids)))
            budget -= count

        return SchedulerOutput(
            decodes=[s for s in scheduled if s.num_tokens == 1],
            prefills=[s for s in scheduled if s.num_tokens > 1],
            preempted=preempted,
        )

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
        self.allocator.free_all(seq.block_table)
        seq.status = SequenceStatus.FINISHED
