"""The model runner: turns a SchedulerOutput into tensors, runs one forward pass, samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from realizar.engine.scheduler import ScheduledSequence, SchedulerOutput, Sequence
from realizar.kv_cache import KVCache
from realizar.model.llama import AttentionMetadata, LlamaModel, PrefillChunk
from realizar.request import Logprob
from realizar.sampling import SampledToken, SamplingRow, logprobs_of, sample
from realizar.structured import apply_masks


@dataclass(frozen=True)
class StepResult:
    """The token sampled for each sequence whose chunk reached its last known token, and the
    logprobs of the prompt tokens scored this step, for sequences that asked for them."""

    sampled: list[tuple[Sequence, SampledToken]]
    prompt_logprobs: list[tuple[Sequence, list[Logprob]]]


class ModelRunner:
    """Owns the model and the KV tensors; used by the engine thread only."""

    def __init__(self, model: LlamaModel, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device
        self.block_size = cache.block_size

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        table = seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _blocks(self, seq: Sequence, length: int) -> torch.Tensor:
        """The blocks holding the sequence's first ``length`` tokens."""
        return torch.tensor(seq.block_table[: -(-length // self.block_size)], dtype=torch.long, device=self.device)

    def _decode_tables(self, decodes: list[ScheduledSequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables [B, max_blocks] (padded with block 0) and context lengths [B]."""
        if not decodes:
            return (torch.zeros(0, 1, dtype=torch.long, device=self.device),
                    torch.zeros(0, dtype=torch.long, device=self.device))
        max_blocks = max(len(i.seq.block_table) for i in decodes)
        tables = [i.seq.block_table + [0] * (max_blocks - len(i.seq.block_table)) for i in decodes]
        block_tables = torch.tensor(tables, dtype=torch.long, device=self.device)
        lens = torch.tensor([i.seq.num_computed + 1 for i in decodes], dtype=torch.long, device=self.device)
        return block_tables, lens

    def execute(self, output: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepResult:
        """Run one step. ``rows`` maps request ids to sampling inputs for sampling sequences."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sampling: list[ScheduledSequence] = []
        scoring: list[tuple[Sequence, int, int]] = []  # sequence, first position, count
        score_indices: list[int] = []

        for item in output.decodes:
            seq = item.seq
            pos = seq.num_computed
            input_ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.extend(self._slots(seq, pos, pos + 1))
            if item.samples:
                logits_indices.append(len(input_ids) - 1)
                sampling.append(item)

        num_decodes = len(output.decodes)
        block_tables, context_lens = self._decode_tables(output.decodes)

        prefills: list[PrefillChunk] = []
        for item in output.prefills:
            seq = item.seq
            start, end = seq.num_computed, seq.num_computed + item.num_tokens
            prefills.append(PrefillChunk(len(input_ids), item.num_tokens,
                                         self._blocks(seq, end), start))
            # a prompt token's logprob comes from the logits at the position before it
            first = max(start, seq.num_prompt_scored)
            last = min(end, seq.num_prompt_tokens - 1)
            if seq.request.params.prompt_logprobs is not None and first < last:
                scoring.append((seq, first, last - first))
                score_indices.extend(range(len(input_ids) + first - start, len(input_ids) + last - start))
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq, start, end))
            if item.samples:
                logits_indices.append(len(input_ids) - 1)
                sampling.append(item)

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decodes=num_decodes,
            decode_block_tables=block_tables,
            decode_context_lens=context_lens,
            prefills=prefills,
        )
        # every logit of a row exact where its request reads more than the largest (SamplingParams.reads_every_logit)
        # or scores a prompt; the others' approximate below their row's largest (LlamaModel.forward)
        exact = [rows[item.seq.request_id].params.reads_every_logit for item in sampling]
        exact += [True] * len(score_indices)
        # each row's argmax where the LM head finds it on the way (-1 elsewhere): greedy rows then skip reading
        # their logits back (sampling.sample)
        argmax = torch.full((len(exact),), -1, dtype=torch.long)
        logits = self.model.forward(
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            meta, self.cache,
            torch.tensor(logits_indices + score_indices, dtype=torch.long, device=self.device),
            torch.tensor(exact, dtype=torch.bool, device=self.device) if any(exact) else None,
            argmax,
        )
        tokens = self._sample(logits[: len(sampling)], [rows[item.seq.request_id] for item in sampling],
                              argmax[: len(sampling)])
        return StepResult([(item.seq, token) for item, token in zip(sampling, tokens, strict=True)],
                          self._score(logits[len(sampling):], scoring))

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[SamplingRow], argmax: torch.Tensor) -> list[SampledToken]:
        """Sample one token per row, after masking the logits of constrained rows by their grammars (in place:
        these logits are this step's own). Free rows are untouched, and with no constrained row nothing runs.
        Masking here, before the sampler, keeps every sampling path (greedy, plain, top-k/p) the same for
        constrained rows. Their logprobs are the model's own, as for every row (the raw logits, like vLLM's
        default): from the masked logits, a forbidden top alternative would be -inf, which JSON cannot carry."""
        if not rows:
            return []
        if not any(row.matcher is not None for row in rows):
            return sample(logits, rows, owned=True, found=argmax)
        scored = [i for i, row in enumerate(rows) if row.matcher is not None and row.params.logprobs is not None]
        raw = logits[scored].clone() if scored else None
        with torch.inference_mode():  # the model's logits are inference tensors: written only in this mode
            apply_masks(logits, [row.matcher for row in rows])
        tokens = sample(logits, rows, owned=True, found=argmax)  # sample takes no found argmax of a masked row
        if raw is not None:
            ids = [tokens[i].token_id for i in scored]
            model_logprobs = logprobs_of(raw, ids, [rows[i].params.logprobs for i in scored])
            for i, token_id, lp in zip(scored, ids, model_logprobs, strict=True):
                assert lp is not None  # every scored row asked for logprobs
                tokens[i] = SampledToken(token_id, lp[0], lp[1])
        return tokens

    @staticmethod
    def _score(logits: torch.Tensor, scoring: list[tuple[Sequence, int, int]]) -> list[tuple[Sequence, list[Logprob]]]:
        """The logprobs of the prompt tokens after the scored positions, from their logits rows."""
        if not scoring:
            return []
        targets = [seq.token_ids[p + 1] for seq, first, count in scoring for p in range(first, first + count)]
        counts = [seq.request.params.prompt_logprobs for seq, _first, count in scoring for _ in range(count)]
        scored = logprobs_of(logits, targets, counts)
        out, at = [], 0
        for seq, _first, count in scoring:
            out.append((seq, [lp for lp in scored[at: at + count] if lp is not None]))
            at += count
        return out
