"""Batched sampling that honours each row's own parameters and seed.

Greedy rows take the argmax. Sampling rows apply temperature, then top-k and top-p
on one descending sort, then draw by inverse CDF with a uniform number from the
row's own generator, so a seeded request gives the same tokens whatever else shares
its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from realizar.request import SamplingParams


@dataclass
class SamplingRow:
    """One sequence's sampling inputs for this step."""

    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    banned_token_ids: tuple[int, ...] = ()  # EOS and stop ids while under min_tokens


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator; seeded requests are reproducible, others draw a fresh seed."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def apply_filters(logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Filtered probabilities in descending order [B, V] and the token ids of that order.

    ``top_k`` of 0 and ``top_p`` of 1 disable those filters for a row.
    """
    scaled = logits / temperatures[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), order


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
    """Pick one token per row of ``logits`` [B, V] (float32)."""
    logits = logits.float()
    if any(row.banned_token_ids for row in rows):
        logits = logits.clone()
        for i, row in enumerate(rows):
            if row.banned_token_ids:
                logits[i, list(row.banned_token_ids)] = float("-inf")
    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=logits.device)
        params = [rows[i].params for i in sampled_rows]
        probs, order = apply_filters(
            logits[index],
            torch.tensor([p.temperature for p in params], device=logits.device),
            torch.tensor([p.top_k for p in params], device=logits.device),
            torch.tensor([p.top_p for p in params], device=logits.device),
        )
        draws = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampled_rows])
        cdf = probs.cumsum(dim=-1)
        picks = torch.searchsorted(cdf, draws.to(cdf.device)[:, None]).clamp_(max=probs.shape[-1] - 1)
        chosen[index] = order.gather(1, picks).squeeze(1)
    token_ids = chosen.tolist()

    want = [row.params.logprobs for row in rows]
    if all(n is None for n in want):
        return [SampledToken(t) for t in token_ids]
    logprobs = logits.log_softmax(dim=-1)
    top_n = max(n or 0 for n in want)
    top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (None, None)
    out = []
    for i, token in enumerate(token_ids):
        n = want[i]
        if n is None:
            out.append(SampledToken(token))
            continue
        top: tuple[tuple[int, float], ...] = ()
        if n and top_ids is not None and top_values is not None:
            top = tuple(zip(top_ids[i, :n].tolist(), top_values[i, :n].tolist(), strict=True))
        out.append(SampledToken(token, float(logprobs[i, token]), top))
    return out
