"""Batched sampling that honours each row's own parameters and seed.

Rows that ask for them first get their logit bias and penalties (:class:`Penalties`), then the
EOS ban of ``min_tokens``.

Greedy rows take the argmax. Sampling rows apply temperature, then top-k and top-p,
then draw by inverse CDF with a uniform number from the row's own generator, so a seeded
request gives the same tokens whatever else shares its batch.

Rows without top-k or top-p draw straight from the softmax, in vocabulary order (on the
CPU in float32, in one compiled pass per row, ``realizar.kernels``). Filtered
rows look only at their most likely candidates (``CANDIDATES``, or top-k if larger), which
hold the whole top-p nucleus unless the distribution is very flat; then they look at
eight times as many, and only if that is still too few do they sort the whole vocabulary. A full sort of a 49k vocabulary costs about 6 ms a row
on one core, which at 16 rows was longer than the forward pass itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from realizar.backends import Backend, choose_backend
from realizar.backends.torch_backend import inverse_cdf
from realizar.request import Logprob, SamplingParams

if TYPE_CHECKING:
    from realizar.structured import Matcher


class Penalties:
    """One sequence's logit bias and repetition penalties, and the token counts they need.

    Only rows whose request asks for them have one (``SamplingParams.penalized``), so the other
    rows of a batch pay nothing. The engine reports each generated token with :meth:`add`, a
    list append. The counts are kept sparse, as tensors of the distinct tokens seen and their
    counts, grown at each :meth:`apply`: a step touches the sequence's distinct tokens only, never
    the whole vocabulary (dense [V] updates cost milliseconds a row on a busy CPU).
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        self.params = params
        self.pending: list[int] = []  # generated tokens not yet counted
        self.counted = params.presence_penalty != 0 or params.frequency_penalty != 0
        self.repeated = params.repetition_penalty != 1
        self.position: dict[int, int] = {}  # generated token -> its index in ``ids``/``counts``
        self.ids: torch.Tensor | None = None  # [G] long: distinct generated tokens
        self.counts: torch.Tensor | None = None  # [G] float32: how often each was generated
        self.seen: set[int] = set(prompt_ids) if self.repeated else set()
        self.seen_new: list[int] = list(self.seen)  # seen tokens not yet in ``seen_ids``
        self.seen_ids: torch.Tensor | None = None  # [S] long: distinct tokens of the prompt and the output
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # token ids, biases

    def add(self, token_id: int) -> None:
        self.pending.append(token_id)

    def _catch_up(self, device: torch.device) -> None:
        """Fold the pending tokens into the count and seen tensors."""
        if self.ids is None:
            self.ids = torch.empty(0, dtype=torch.long, device=device)
            self.counts = torch.empty(0, dtype=torch.float32, device=device)
            self.seen_ids = torch.empty(0, dtype=torch.long, device=device)
        assert self.counts is not None and self.seen_ids is not None
        if self.pending:
            new: list[int] = []
            bumps: list[int] = []
            for token in self.pending:
                at = self.position.get(token)
                if at is None:
                    self.position[token] = len(self.position)
                    new.append(token)
                else:
                    bumps.append(at)
                if self.repeated and token not in self.seen:
                    self.seen.add(token)
                    self.seen_new.append(token)
            self.pending.clear()
            if new:
                self.ids = torch.cat([self.ids, torch.tensor(new, dtype=torch.long, device=device)])
                self.counts = torch.cat([self.counts, torch.ones(len(new), dtype=torch.float32, device=device)])
            if bumps:  # tokens counted before, or repeated within the pending ones
                self.counts.index_add_(0, torch.tensor(bumps, dtype=torch.long, device=device),
                                       torch.ones(len(bumps), dtype=torch.float32, device=device))
        if self.seen_new:
            self.seen_ids = torch.cat([self.seen_ids, torch.tensor(self.seen_new, dtype=torch.long, device=device)])
            self.seen_new.clear()

    def apply(self, row: torch.Tensor) -> None:
        """Penalize one row of logits [V] (float32) in place: repetition penalty (vLLM's: over the prompt
        and the output), then presence and frequency penalties (OpenAI's: over the output), then the bias."""
        p = self.params
        if self.counted or self.repeated:
            self._catch_up(row.device)
        if self.repeated and self.seen_ids is not None and self.seen_ids.numel():
            values = row[self.seen_ids]
            row[self.seen_ids] = torch.where(values > 0, values / p.repetition_penalty,
                                             values * p.repetition_penalty)
        if self.counted and self.ids is not None and self.counts is not None and self.ids.numel():
            row.index_add_(0, self.ids, self.counts * -p.frequency_penalty - p.presence_penalty)
        if p.logit_bias:
            if self.bias is None:
                self.bias = (torch.tensor([t for t, _b in p.logit_bias], dtype=torch.long, device=row.device),
                             torch.tensor([b for _t, b in p.logit_bias], dtype=torch.float32, device=row.device))
            row.index_add_(0, *self.bias)


@dataclass
class SamplingRow:
    """One sequence's sampling inputs for this step."""

    params: SamplingParams
    generator: np.random.Generator | None  # None for greedy rows
    banned_token_ids: tuple[int, ...] = ()  # EOS and stop ids while under min_tokens
    penalties: Penalties | None = None  # logit bias and penalties; None when the request has none
    matcher: Matcher | None = None  # a structured request's grammar state: the runner masks its logits by it

    def save(self) -> Any:
        """The generator's position, so a step that is run again draws the same numbers."""
        return None if self.generator is None else self.generator.bit_generator.state

    def restore(self, state: Any) -> None:
        if self.generator is not None and state is not None:
            self.generator.bit_generator.state = state


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def make_generator(seed: int | None) -> np.random.Generator:
    """A generator of its own for one request; seeded requests are reproducible, others draw
    fresh entropy from the OS.

    numpy's PCG64 seeded through a SeedSequence, rather than torch's CPU generator: that one
    keeps only the low 32 bits of a seed (its Mersenne Twister takes a 32-bit seed), so seeds
    that differ by 2**32 gave the same tokens. The sign goes into the entropy as a word of its
    own, so every seed of the signed and unsigned 64-bit ranges names a different stream.
    """
    if seed is None:
        return np.random.Generator(np.random.PCG64())
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed < 0), abs(seed)])))


CANDIDATES = 512  # tokens a filtered row considers before it falls back to a full sort


def apply_filters(logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Filtered probabilities in descending order [B, C] and the token ids of that order,
    C <= V: every token the filters keep is among them.

    ``top_k`` of 0 and ``top_p`` of 1 disable those filters for a row.
    """
    scaled = logits / temperatures[:, None]
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab)
    # rows with top-k renormalize over their k tokens, the others over the whole vocabulary
    every_row_top_k = bool((top_k > 0).all())
    log_total = scaled.logsumexp(dim=-1) if not every_row_top_k else None
    largest_k = int(top_k.max().item())
    # rows that all have top-k need only their k best; top-p alone needs candidates
    widths = [largest_k] if every_row_top_k else [max(CANDIDATES, largest_k), max(8 * CANDIDATES, largest_k), vocab]
    for width in (min(w, vocab) for w in widths):
        if width < vocab:
            values, order = scaled.topk(width, dim=-1)  # [B, C], descending
        else:  # numpy's argsort is twice as fast as torch's sort here
            order = torch.from_numpy(scaled.cpu().numpy().argsort(axis=-1, kind="stable")[:, ::-1].copy())
            order = order.to(scaled.device)
            values = scaled.gather(1, order)
        ranks = torch.arange(width, device=logits.device)[None, :]
        values = values.masked_fill(ranks >= k[:, None], float("-inf"))
        local = values.logsumexp(dim=-1)
        probs = (values - (local if log_total is None else torch.where(top_k > 0, local, log_total))[:, None]).exp()
        if width == vocab or not bool(((top_k == 0) & (probs.sum(dim=-1) < top_p)).any()):
            break  # every row's nucleus is among the candidates
    # keep the smallest prefix whose mass reaches top_p; the first token is always kept, even
    # when top_p is below float32's smallest number (1e-46 rounds to 0 and would drop every token)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= top_p[:, None]) & (ranks > 0), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), order


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Index of the largest value of each row; numpy's is ~15x faster than torch's on the CPU."""
    if logits.device.type == "cpu":
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def greedy_argmax(logits: torch.Tensor, rows: list[SamplingRow], found: torch.Tensor | None) -> torch.Tensor:
    """Each greedy row's argmax of ``logits`` [B, V] (other rows: 0, a placeholder for their draw). Row i's is
    ``found[i]`` where the LM head found it as it computed the logits (``LinearLayer.ranked``; -1 where it did
    not) and nothing changed the row since (no penalties or logit bias, no grammar's mask, not a token the row
    bans); otherwise it is read from the row. The found ones spare reading a 64-row step's 12.6 MB of logits
    back from memory (1.2 ms of a 41 ms step on the AMX Xeon, BENCHMARKS.md)."""
    hints = found.tolist() if found is not None else [-1] * len(rows)
    chosen = [h if row.params.greedy and h >= 0 and row.penalties is None and row.matcher is None
              and h not in row.banned_token_ids else -1 for h, row in zip(hints, rows, strict=True)]
    rest = [i for i, row in enumerate(rows) if row.params.greedy and chosen[i] < 0]
    if rest:
        picks = argmax(logits if len(rest) == len(rows) else logits[rest]).tolist()
        for i, token in zip(rest, picks, strict=True):
            chosen[i] = token
    return torch.tensor([max(token, 0) for token in chosen], dtype=torch.long, device=logits.device)


def uniforms(rows: list[SamplingRow]) -> torch.Tensor:
    """One uniform number in [0, 1) per row (float32), from the row's own generator."""
    draws = np.empty(len(rows), dtype=np.float32)
    for i, row in enumerate(rows):
        assert row.generator is not None, "a sampling row has a generator"
        draws[i] = row.generator.random(dtype=np.float32)
    return torch.from_numpy(draws)


def draw(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """One column of each row of ``probs`` [B, C], by inverse CDF with the row's own generator."""
    return inverse_cdf(probs, uniforms(rows).to(probs.device))


def ban(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Every row's banned tokens to -inf, in place, in one indexing operation (the EOS ban of ``min_tokens``
    touches every row of a benchmark's step)."""
    banned = [(i, token) for i, row in enumerate(rows) for token in row.banned_token_ids]
    if banned:
        at = torch.tensor(banned, dtype=torch.long, device=logits.device)
        logits[at[:, 0], at[:, 1]] = float("-inf")


def sample(logits: torch.Tensor, rows: list[SamplingRow], backend: Backend | None = None, *,
           owned: bool = False, found: torch.Tensor | None = None) -> list[SampledToken]:
    """Pick one token per row of ``logits`` [B, V] (float32). Plain temperature draws go to ``backend``,
    by default the one for float32 logits on their device (the CPU kernels draw in one pass per row,
    without a probability tensor).

    Each row's logit bias and penalties, then its bans, come first: before any filter, and before greedy's
    argmax. They go to a copy of ``logits``, except that where the caller gives ``logits`` up (``owned``: a
    step's own logits) and no row has penalties, the bans are set in place: the copy of a 64-row step's
    logits (12.6 MB for the demo model) took longer than the argmax. (Penalties keep the copy: their state's
    tensors must not be made in inference mode, where a model's logits may be written.) ``found``: each row's
    argmax as the LM head found it, or -1 (``greedy_argmax``)."""
    logits = logits.float()
    if any(row.penalties is not None for row in rows):
        logits = logits.clone()
        for i, row in enumerate(rows):
            if row.penalties is not None:
                row.penalties.apply(logits[i])
        ban(logits, rows)
    elif any(row.banned_token_ids for row in rows):
        if not owned:
            logits = logits.clone()
        with torch.inference_mode():  # a model's logits are inference tensors: written only in this mode
            ban(logits, rows)
    chosen = greedy_argmax(logits, rows, found)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    plain = [i for i in sampled if rows[i].params.top_k == 0 and rows[i].params.top_p >= 1.0]
    filtered = sorted(set(sampled) - set(plain))
    if plain:
        index = torch.tensor(plain, device=logits.device)
        temperatures = torch.tensor([rows[i].params.temperature for i in plain], device=logits.device)
        backend = choose_backend(logits.device, logits.dtype) if backend is None else backend
        chosen[index] = backend.sample(logits, index, temperatures, uniforms([rows[i] for i in plain]))
    if filtered:
        index = torch.tensor(filtered, device=logits.device)
        params = [rows[i].params for i in filtered]
        probs, order = apply_filters(
            logits[index],
            torch.tensor([p.temperature for p in params], device=logits.device),
            torch.tensor([p.top_k for p in params], device=logits.device),
            torch.tensor([p.top_p for p in params], device=logits.device),
        )
        picks = draw(probs, [rows[i] for i in filtered])
        chosen[index] = order.gather(1, picks[:, None]).squeeze(1)
    token_ids = chosen.tolist()

    scored = logprobs_of(logits, token_ids, [row.params.logprobs for row in rows])
    return [SampledToken(t) if lp is None else SampledToken(t, lp[0], lp[1])
            for t, lp in zip(token_ids, scored, strict=True)]


def logprobs_of(logits: torch.Tensor, token_ids: list[int], top_counts: list[int | None]) -> list[Logprob | None]:
    """For each row of ``logits`` [R, V]: the log-probability of ``token_ids[r]`` and the
    ``top_counts[r]`` most likely tokens with theirs; None where ``top_counts[r]`` is None."""
    if all(n is None for n in top_counts):
        return [None] * len(token_ids)
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None])[:, 0].tolist()
    top_n = max(n or 0 for n in top_counts)
    top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (None, None)
    out: list[Logprob | None] = []
    for i, n in enumerate(top_counts):
        if n is None:
            out.append(None)
            continue
        top: tuple[tuple[int, float], ...] = ()
        if n and top_ids is not None and top_values is not None:
            top = tuple(zip(top_ids[i, :n].tolist(), top_values[i, :n].tolist(), strict=True))
        out.append((chosen[i], top))
    return out
