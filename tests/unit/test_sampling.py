"""Batched sampling: greedy, filters, seeds, per-row independence, logprobs."""

from __future__ import annotations

import pytest
import torch

from realizar.request import GREEDY_TEMPERATURE, MAX_TEMPERATURE, SEED_MAX, SEED_MIN, SamplingParams
from realizar.sampling import Penalties, SamplingRow, apply_filters, make_generator, sample


def row(seed: int | None = None, **kw: float) -> SamplingRow:
    params = SamplingParams(seed=seed, **kw)  # type: ignore[arg-type]
    return SamplingRow(params, None if params.greedy else make_generator(seed))


def test_greedy_takes_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    assert [t.token_id for t in sample(logits, [row(temperature=0), row(temperature=0)])] == [1, 0]


def test_greedy_rows_take_the_argmax_the_lm_head_found_where_nothing_changed_their_row() -> None:
    """``found``: the LM head's argmax of each row (-1: not found). A greedy row takes it as it is (here a token
    that is not the row's largest, to tell the two apart), unless the row bans it, has a logit bias or penalties,
    or the head found none: then the row's own argmax. Sampling rows draw whatever was found."""
    logits = torch.tensor([[0.0, 9.0, 1.0, 2.0]] * 5)
    rows = [row(temperature=0), SamplingRow(SamplingParams(temperature=0), None, (2,)), row(temperature=0),
            penalized(temperature=0, logit_bias=((0, 1.0),)), row(seed=5, temperature=1.0, top_k=1)]
    found = torch.tensor([2, 2, -1, 2, 2])
    out = sample(logits.clone(), rows, found=found)
    assert [t.token_id for t in out] == [2, 1, 1, 1, 1]
    assert [t.token_id for t in sample(logits.clone(), rows)] == [1, 1, 1, 1, 1]


def test_top_k_one_is_greedy_and_top_p_tiny_keeps_first() -> None:
    logits = torch.randn(4, 50)
    best = logits.argmax(-1).tolist()
    out = sample(logits, [row(seed=i, temperature=1.0, top_k=1) for i in range(2)]
                 + [row(seed=i, temperature=1.0, top_p=1e-6) for i in range(2)])
    assert [t.token_id for t in out] == best


def test_filters_zero_out_tokens_beyond_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs, order = apply_filters(logits, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.8]))
    assert order[0].tolist() == [0, 1, 2, 3]
    assert probs[0, 2:].sum() == 0 and torch.allclose(probs[0, :2], torch.tensor([0.625, 0.375]))
    probs, order = apply_filters(logits, torch.tensor([1.0]), torch.tensor([3]), torch.tensor([1.0]))
    kept = {int(t) for t, p in zip(order[0], probs[0], strict=True) if p > 0}
    assert kept == {0, 1, 2} and torch.isclose(probs.sum(), torch.tensor(1.0))


def test_a_flat_distribution_keeps_its_whole_nucleus() -> None:
    """When the top-p nucleus is wider than the candidates, the filter widens to find it all."""
    logits = torch.zeros(2, 6000)
    logits[1, :10] = 20.0  # a peaked row beside the flat one
    probs, order = apply_filters(logits, torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), torch.tensor([0.9, 0.9]))
    assert int((probs[0] > 0).sum()) == 5400  # 90 % of a uniform 6000-token vocabulary
    assert {int(t) for t in order[1][probs[1] > 0]} == set(range(10))
    assert torch.allclose(probs.sum(dim=-1), torch.ones(2))


def test_the_compiled_draw_follows_the_distribution_and_skips_banned_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.0, 0.3, 0.2] + [0.0] * 13]))  # -inf: banned or impossible
    r = row(seed=3, temperature=1.0)
    counts = [0] * 17
    for _ in range(3000):
        counts[sample(logits, [r])[0].token_id] += 1
    assert counts[1] == 0 and sum(counts[4:]) == 0
    assert abs(counts[0] / 3000 - 0.5) < 0.04 and abs(counts[3] / 3000 - 0.2) < 0.03
    cold = row(seed=4, temperature=0.5)  # p^2 renormalized: 0.25, 0.09, 0.04 of 0.38
    counts = [0] * 17
    for _ in range(3000):
        counts[sample(logits, [cold])[0].token_id] += 1
    assert abs(counts[0] / 3000 - 0.25 / 0.38) < 0.04 and abs(counts[3] / 3000 - 0.04 / 0.38) < 0.03


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    logits = torch.randn(1, 1000)
    alone = [sample(logits, [row(seed=42, temperature=1.0)])[0].token_id for _ in range(3)]
    assert len(set(alone)) == 1
    mixed = sample(torch.cat([torch.randn(3, 1000), logits]),
                   [row(temperature=0), row(seed=1, temperature=0.7), row(seed=2, temperature=1.0, top_p=0.9),
                    row(seed=42, temperature=1.0)])
    assert mixed[3].token_id == alone[0]


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    r = row(seed=0, temperature=1.0)
    counts = [0, 0, 0]
    for _ in range(2000):
        counts[sample(logits, [r])[0].token_id] += 1
    assert abs(counts[0] / 2000 - 0.7) < 0.05 and abs(counts[2] / 2000 - 0.1) < 0.03


def test_banned_tokens_are_never_chosen() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    r = row(temperature=0)
    r.banned_token_ids = (0,)
    assert sample(logits, [r])[0].token_id != 0


def test_bans_go_to_a_copy_unless_the_caller_gives_the_logits_up() -> None:
    """A step's own logits (``owned``, inference tensors as the model returns them) take the bans in place;
    anyone else's logits are left as they were. Both choose the same tokens, with the same logprobs."""
    with torch.inference_mode():
        step = torch.tensor([[10.0, 0.0, 3.0, 1.0], [9.0, 8.0, 0.0, 7.0], [0.0, 5.0, 1.0, 2.0]])
    rows = [row(temperature=0, logprobs=1), row(temperature=0), row(seed=3, temperature=1.0)]
    rows[0].banned_token_ids, rows[1].banned_token_ids, rows[2].banned_token_ids = (0,), (0, 1), (1, 3)
    kept = step.clone()
    copied = sample(step, rows)
    assert torch.equal(step, kept)
    rows[2] = row(seed=3, temperature=1.0)
    rows[2].banned_token_ids = (1, 3)
    owned = sample(step, rows, owned=True)
    assert owned == copied
    assert [t.token_id for t in owned[:2]] == [2, 3]
    assert owned[2].token_id in (0, 2)
    assert owned[0].logprob is not None and owned[0].logprob > -0.2  # the bans' -inf weigh nothing
    assert step[0, 0] == step[1, 0] == step[1, 1] == step[2, 1] == step[2, 3] == float("-inf")


def test_logprobs_and_top_alternatives() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    out = sample(logits, [row(temperature=0, logprobs=2)])[0]
    expected = torch.log_softmax(logits, -1)[0]
    assert abs(out.logprob - expected[0].item()) < 1e-6  # type: ignore[operator]
    assert [t for t, _ in out.top_logprobs] == [0, 1]


def test_a_temperature_below_the_epsilon_is_greedy() -> None:
    logits = torch.randn(8, 300) * 5
    for temperature in (1e-40, 1e-6, 0.0):
        params = SamplingParams(temperature=temperature, top_k=5, seed=1)
        assert params.greedy
        rows = [SamplingRow(params, None) for _ in range(8)]
        assert [t.token_id for t in sample(logits, rows)] == logits.argmax(-1).tolist()
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy


def test_temperature_over_the_maximum_is_refused() -> None:
    SamplingParams(temperature=MAX_TEMPERATURE)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=MAX_TEMPERATURE * 1.01)


def test_a_tiny_top_p_keeps_exactly_the_top_token() -> None:
    """1e-46 is below float32's smallest subnormal: as a tensor it is 0, which dropped every token."""
    logits = torch.randn(16, 1000) * 3
    rows = [row(seed=i, temperature=1.0, top_p=1e-46) for i in range(8)]
    rows += [row(seed=i, temperature=1.0, top_p=1e-46, top_k=5) for i in range(8)]
    assert [t.token_id for t in sample(logits, rows)] == logits.argmax(-1).tolist()
    probs, order = apply_filters(logits[:1], torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1e-46]))
    assert int((probs > 0).sum()) == 1 and probs[0, 0] == 1.0 and order[0, 0] == logits[0].argmax()


def draws(seed: int, n: int = 8) -> list[int]:
    logits = torch.zeros(1, 1000)  # uniform: the drawn token is the uniform number, scaled
    r = row(seed=seed, temperature=1.0)
    return [sample(logits, [r])[0].token_id for _ in range(n)]


def test_seeds_are_full_64_bit() -> None:
    """torch's CPU generator seeded a 32-bit Mersenne Twister: seeds 2**32 apart were the same."""
    base = draws(5)
    assert draws(5) == base
    assert draws(5 + (1 << 32)) != base
    assert draws(-5) != base
    assert draws(SEED_MAX) != draws(SEED_MAX - (1 << 32))
    assert draws(SEED_MIN) != draws(SEED_MAX)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=SEED_MAX + 1)


def test_a_row_replayed_from_its_saved_state_draws_the_same() -> None:
    r = row(seed=9, temperature=1.0)
    logits = torch.zeros(1, 1000)
    state = r.save()
    first = [sample(logits, [r])[0].token_id for _ in range(4)]
    r.restore(state)
    assert [sample(logits, [r])[0].token_id for _ in range(4)] == first


# -- logit bias and penalties -------------------------------------------------------------------------


def penalized(prompt_ids: tuple[int, ...] = (), seed: int | None = None, **kw: object) -> SamplingRow:
    params = SamplingParams(seed=seed, **kw)  # type: ignore[arg-type]
    return SamplingRow(params, None if params.greedy else make_generator(seed), (),
                       Penalties(params, prompt_ids) if params.penalized else None)


def test_logit_bias_bans_and_forces_tokens_under_greedy_and_sampling() -> None:
    logits = torch.tensor([[0.0, 9.0, 1.0, 2.0]] * 4)
    out = sample(logits, [penalized(temperature=0, logit_bias=((1, -100.0),)),
                          penalized(temperature=0, logit_bias=((0, 100.0),)),
                          penalized(seed=3, temperature=1.0, logit_bias=((1, -100.0), (2, -100.0), (3, -100.0))),
                          penalized(seed=4, temperature=1.0, top_k=2, logit_bias=((2, 100.0),))])
    assert [t.token_id for t in out] == [3, 0, 0, 2]


def test_frequency_and_presence_penalties_count_generated_tokens() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    freq = penalized(temperature=0, frequency_penalty=0.6)
    presence = penalized(temperature=0, presence_penalty=1.5)
    for p in (freq, presence):
        assert p.penalties is not None
        p.penalties.add(0)
    assert sample(logits, [freq])[0].token_id == 0  # 5 - 0.6 > 4: one occurrence is not enough
    assert sample(logits, [presence])[0].token_id == 1  # 5 - 1.5 < 4
    assert freq.penalties is not None
    freq.penalties.add(0)
    assert sample(logits, [freq])[0].token_id == 1  # 5 - 1.2 < 4: the count grows the penalty
    batched = penalized(temperature=0, frequency_penalty=0.6)  # two tokens reported before one step
    assert batched.penalties is not None
    batched.penalties.add(0)
    batched.penalties.add(0)
    after = logits.clone()
    batched.penalties.apply(after[0])
    assert torch.allclose(after[0], torch.tensor([3.8, 4.0, 0.0]))
    negative = penalized(temperature=0, presence_penalty=-2.0)  # a negative penalty favours repeats
    assert negative.penalties is not None
    negative.penalties.add(1)
    assert sample(logits, [negative])[0].token_id == 1


def test_repetition_penalty_covers_the_prompt_and_both_signs() -> None:
    logits = torch.tensor([[4.0, 3.0, -1.0, -1.5]])
    assert sample(logits, [penalized((0,), temperature=0, repetition_penalty=2.0)])[0].token_id == 1  # 4/2 < 3
    row = penalized((0, 1, 2), temperature=0, repetition_penalty=2.0)  # -1 * 2 < -1.5
    after = logits.clone()
    assert row.penalties is not None
    row.penalties.apply(after[0])
    assert after[0].tolist() == [2.0, 1.5, -2.0, -1.5]


def test_rows_with_and_without_penalties_share_a_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    plain = [row(temperature=0), row(seed=5, temperature=0.8), row(seed=6, temperature=0.8, top_p=0.9)]
    alone = [t.token_id for t in sample(logits[:3].clone(), plain)]
    best = int(logits[3].argmax())
    mixed = [row(temperature=0), row(seed=5, temperature=0.8), row(seed=6, temperature=0.8, top_p=0.9),
             penalized(temperature=0, logit_bias=((best, -100.0),)),
             penalized(seed=7, temperature=0.8, frequency_penalty=2.0),
             penalized(temperature=0, repetition_penalty=1.3, logit_bias=((42, 100.0),))]
    before = logits.clone()
    out = [t.token_id for t in sample(logits, mixed)]
    assert out[:3] == alone  # the unpenalized rows draw exactly what they draw alone
    assert out[3] != best and out[5] == 42
    assert torch.equal(logits, before)  # the caller's logits are left as they were
    assert all(r.penalties is None for r in mixed[:3])


def test_penalty_settings_are_range_checked() -> None:
    for bad in ({"logit_bias": ((1, 101.0),)}, {"presence_penalty": 2.5}, {"frequency_penalty": -3.0},
                {"repetition_penalty": 0.0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)  # type: ignore[arg-type]
    assert not SamplingParams().penalized and SamplingParams(repetition_penalty=1.1).penalized
