"""Load workers, without processes: how a phase is cut into shares, the exact merge of
what the workers measured, the per-worker self-check, and what pickles to a worker."""

from __future__ import annotations

import math
import pickle
import random
import sys
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realizar.loadtest.config import LoadTestConfig, Share
from realizar.loadtest.llm import (
    LlmWorkload,
    json_schema_prompts,
    llm_scenario,
    multi_turn_prompts,
    synthetic_prompts,
)
from realizar.loadtest.monitor import ClientHealth, SaturationLimits
from realizar.loadtest.runner import PhaseResult
from realizar.loadtest.scenarios import SCENARIO_NAMES, Phase, seed_scenarios
from realizar.loadtest.stats import (
    EXACT_METHOD,
    HDR_METHOD,
    Collector,
    FailureClass,
    LatencyRecorder,
    RequestRecord,
    Slo,
)
from realizar.loadtest.workers import ShareResult, WorkerError, combine_health, import_ray, make_pool
from realizar.loadtest.workload import Validity, arrival_offsets

PERCENTILES = (0, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9, 100)


# ---------------------------------------------------------------- shares

@given(concurrency=st.integers(1, 64), total=st.integers(1, 500), workers=st.integers(1, 16))
def test_shares_partition_the_requests_and_the_connections(concurrency: int, total: int, workers: int) -> None:
    cfg = LoadTestConfig(concurrency=concurrency, total_requests=total)
    shares = cfg.split(workers)
    assert len(shares) == min(workers, concurrency, total)
    assert sum(s.concurrency for s in shares) == concurrency
    assert all(s.concurrency >= 1 and s.count == len(shares) for s in shares)
    assert max(s.concurrency for s in shares) - min(s.concurrency for s in shares) <= 1
    # round robin: every request index in exactly one share
    taken = sorted(i for s in shares for i in range(s.index, total, s.count))
    assert taken == list(range(total))
    assert sum(s.requests(total) for s in shares) == total


def test_round_robin_shares_together_are_the_one_process_schedule() -> None:
    cfg = LoadTestConfig(concurrency=64, total_requests=1000, rate=500.0, arrival="gamma", burstiness=0.5, seed=7)
    offsets = arrival_offsets(cfg.request_count, 500.0, "gamma", seed=7, burstiness=0.5)
    for workers in (2, 3, 4):
        combined = sorted(offsets[i] for s in cfg.split(workers) for i in range(s.index, cfg.request_count, s.count))
        assert combined == sorted(offsets)
        # each share is spread over the whole run, not a slice of it
        for s in cfg.split(workers):
            mine = [offsets[i] for i in range(s.index, cfg.request_count, s.count)]
            assert mine[0] <= offsets[workers - 1] and mine[-1] >= offsets[-workers]


def test_unbounded_and_small_phases_use_fewer_workers() -> None:
    # an until-the-duration-ends loop: every worker runs, indices interleave without end
    unbounded = LoadTestConfig(concurrency=8, total_requests=0, duration=1.0)
    assert [s.concurrency for s in unbounded.split(3)] == [3, 3, 2]
    # the spike's baseline has 2 connections: 2 of 4 workers take part
    assert len(LoadTestConfig(concurrency=2, total_requests=10).split(4)) == 2
    assert len(LoadTestConfig(concurrency=20, total_requests=3).split(4)) == 3
    with pytest.raises(ValueError):
        LoadTestConfig().split(0)
    with pytest.raises(ValueError):
        Share(index=2, count=2)


# ---------------------------------------------------------------- exact merge

def _split(samples: list[float], parts: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    out: list[list[float]] = [[] for _ in range(parts)]
    for x in samples:
        out[rng.randrange(parts)].append(x)
    return out


@settings(max_examples=40, deadline=None)
@given(samples=st.lists(st.floats(1e-5, 30.0), min_size=1, max_size=400), parts=st.integers(1, 5),
       exact_limit=st.sampled_from([10, 1_000_000]), seed=st.integers(0, 1000))
def test_merged_recorders_give_the_percentiles_of_the_pooled_samples(
        samples: list[float], parts: int, exact_limit: int, seed: int) -> None:
    """Whether the workers' recorders are exact or HDR histograms (exact_limit 10 forces HDR),
    and after a pickle round trip (how they travel), the merge is the pooled recorder."""
    pooled = LatencyRecorder(exact_limit)
    for x in samples:
        pooled.record(x)
    merged = LatencyRecorder(exact_limit)
    for part in _split(samples, parts, seed):
        rec = LatencyRecorder(exact_limit)
        for x in part:
            rec.record(x)
        merged.merge(pickle.loads(pickle.dumps(rec)))
    assert merged.count == pooled.count and merged.method == pooled.method
    assert merged.min == pooled.min and merged.max == pooled.max
    for p in PERCENTILES:
        assert merged.percentile(p) == pooled.percentile(p), p
    assert math.isclose(merged.mean, pooled.mean, rel_tol=1e-12)


def _records(n: int, seed: int) -> list[RequestRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        intended = rng.uniform(0.0, 5.0)
        sent = intended + rng.uniform(0.0, 0.01)
        end = sent + rng.lognormvariate(-4.0, 1.0)
        rec = RequestRecord(i, intended, sent, end, status=200)
        roll = rng.random()
        if roll < 0.05:
            rec.status, rec.failure = 503, FailureClass.HTTP_503
        elif roll < 0.08:
            rec.failure = FailureClass.TOTAL_TIMEOUT
        else:
            rec.output_tokens = rng.randint(1, 20)
            rec.input_tokens = rng.randint(5, 50)
            times = sorted(rng.uniform(sent, end) for _ in range(rec.output_tokens))
            rec.chunk_times, rec.first_token = times, times[0]
            rec.cached_tokens = rng.choice([None, 4])
            rec.validity = rng.choice([None, Validity.VALID, Validity.NOT_JSON])
        out.append(rec)
    return sorted(out, key=lambda r: r.end)  # completion order


@pytest.mark.parametrize("exact_limit", [100_000, 50])
@pytest.mark.parametrize("workers", [2, 3])
def test_collectors_of_the_workers_merge_into_the_one_process_collector(exact_limit: int, workers: int) -> None:
    """Requests recorded by several workers, each on its own clock (offset), shipped by
    pickle, rebased and merged, summarise exactly as one collector that saw them all."""
    slo = Slo(e2el_ms=60.0, ttft_ms=30.0)
    records = _records(600, seed=3)

    def group(i: int) -> int:
        return i % 3 + 1

    single = Collector(slo=slo, exact_limit=exact_limit, group=group)
    single.start(0.0)
    for rec in records:
        single.add(rec)
    single.t_end = max(single.t_end, 6.0)

    merged = Collector(slo=slo, exact_limit=exact_limit, group=group)
    merged.start(100.0)  # the coordinator's clock
    for k in range(workers):
        skew = 1000.0 * (k + 1)  # each worker's perf_counter reads differently
        part = Collector(slo=slo, exact_limit=exact_limit, group=group)
        part.start(skew)
        for rec in records[k::workers]:
            part.add(replace(rec, intended=rec.intended + skew, sent=rec.sent + skew, end=rec.end + skew,
                             first_token=None if rec.first_token is None else rec.first_token + skew,
                             chunk_times=None if rec.chunk_times is None else [t + skew for t in rec.chunk_times]))
        part.t_end = max(part.t_end, skew + 6.0)
        shipped = pickle.loads(pickle.dumps(part))
        assert shipped.group is None  # the worker applied it; the coordinator's collector has its own
        shipped.rebase(100.0)
        merged.merge_worker(shipped)

    a, b = single.summary(), merged.summary()
    assert b.latency.method == (EXACT_METHOD if exact_limit > 600 else HDR_METHOD)
    for field in ("total_requests", "successes", "failures", "failures_by_class", "output_tokens",
                  "input_tokens", "good_requests", "percentile_method"):
        assert getattr(a, field) == getattr(b, field), field
    assert math.isclose(a.duration_s, b.duration_s, abs_tol=1e-6)
    for part_name in ("latency", "service_latency", "ttft", "tpot", "itl", "e2el"):
        sa, sb = getattr(a, part_name), getattr(b, part_name)
        for key in ("count", "min_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "method"):
            assert getattr(sa, key) == getattr(sb, key), (part_name, key)
        assert math.isclose(sa.mean_ms, sb.mean_ms, abs_tol=1e-3)
    assert single.validity_counts() == merged.validity_counts()
    assert [g.to_dict() for g in single.group_summaries()] == [g.to_dict() for g in merged.group_summaries()]
    # the per-second buckets and the completion-order timeline combine too
    assert [(r["t"], r["completed"], r["successes"], r["tokens"], r["max_ms"]) for r in single.series()] == \
        [(r["t"], r["completed"], r["successes"], r["tokens"], r["max_ms"]) for r in merged.series()]
    ta, tb = single.timeline(), merged.timeline()
    # past the exact limit neither keeps a timeline
    assert len(ta) == len(tb) == (len(records) if exact_limit >= len(records) else 0)
    assert [round(t, 9) for t, _ in ta] == [round(t, 9) for t, _ in tb]
    assert all((math.isnan(x) and math.isnan(y)) or math.isclose(x, y, abs_tol=1e-9)
               for (_, x), (_, y) in zip(ta, tb, strict=True))


def test_merge_worker_refuses_collectors_on_different_clocks() -> None:
    a, b = Collector(), Collector()
    a.start(0.0)
    b.start(5.0)
    with pytest.raises(ValueError, match="rebase"):
        a.merge_worker(b)


def test_per_second_reservoirs_merge_to_a_bounded_sample_of_both() -> None:
    a, b = Collector(), Collector()
    a.start(0.0)
    b.start(0.0)
    for i in range(1500):
        a.add(RequestRecord(i, 0.0, 0.0, 0.5))  # 500 ms, second 0
        b.add(RequestRecord(i, 0.0, 0.0, 0.25))  # 250 ms, second 0
    a.merge_worker(b)
    row = a.series()[0]
    assert row["completed"] == 3000 and row["max_ms"] == 500.0
    sample = a._seconds[0].sample
    assert len(sample) == 1000 and {0.5, 0.25} == set(sample)
    assert 400 <= sample.count(0.5) <= 600  # in proportion to the requests behind each


# ---------------------------------------------------------------- per-worker self-check

def _share_result(index: int, count: int, concurrency: int, completed: int, duration: float, *,
                  late: float = 0.0, health: ClientHealth | None = None) -> ShareResult:
    col = Collector()
    col.start(0.0)
    for i in range(completed):
        col.add(RequestRecord(i, 0.0, 0.0, (i + 1) * duration / completed))
    col.t_end = duration
    return ShareResult(Share(index, count, concurrency), col, health or ClientHealth(), late, "host", 100 + index)


def _phase(cfg: LoadTestConfig) -> PhaseResult:
    col = Collector()
    return PhaseResult(Phase("main", "Main", cfg), col, col.summary(), 0.0, 1.0)


def test_a_worker_far_behind_the_others_is_flagged() -> None:
    cfg = LoadTestConfig(concurrency=20, total_requests=0, duration=1.0)
    shares = [_share_result(0, 2, 10, 1000, 1.0), _share_result(1, 2, 10, 400, 1.0)]
    health = combine_health([(_phase(cfg), shares)], SaturationLimits())
    assert health.saturated
    assert len(health.reasons) == 1 and health.reasons[0].startswith("worker 2/2: achieved")
    rows = {row["worker"]: row for row in health.workers}
    assert rows[0]["saturated"] is False and rows[1]["saturated"] is True
    assert rows[0]["behind"] is False and rows[1]["behind"] is True
    assert rows[0]["achieved_rps"] == 1000.0 and rows[1]["achieved_rps"] == 400.0
    assert rows[1]["rate_ratio"] < 0.75 * rows[0]["rate_ratio"]


def test_balanced_workers_pass_and_their_rows_add_up() -> None:
    cfg = LoadTestConfig(concurrency=21, total_requests=300, duration=1.5)  # paced: 200 req/s
    shares = [_share_result(k, 3, 7, 100, 1.5) for k in range(3)]
    health = combine_health([(_phase(cfg), shares)], SaturationLimits())
    assert not health.saturated and health.reasons == []
    assert sum(row["requests"] for row in health.workers) == 300
    assert [row["scheduled_rps"] for row in health.workers] == [pytest.approx(200 / 3)] * 3


def test_few_requests_are_not_judged_but_a_late_start_and_a_saturated_worker_are() -> None:
    cfg = LoadTestConfig(concurrency=4, total_requests=30)
    tired = ClientHealth(loop_lag_p99_ms=80.0, saturated=True, reasons=["event-loop lag p99 80.0 ms > 50 ms"])
    shares = [_share_result(0, 2, 2, 20, 0.1), _share_result(1, 2, 2, 10, 0.5, late=0.2, health=tired)]
    two_phases = [(_phase(cfg), shares), (_phase(cfg), [_share_result(0, 2, 2, 20, 0.1),
                                                        _share_result(1, 2, 2, 10, 0.1)])]
    health = combine_health(two_phases, SaturationLimits())
    assert health.saturated and health.loop_lag_p99_ms == 80.0
    assert health.reasons == ["worker 2/2 (main): event-loop lag p99 80.0 ms > 50 ms",
                              "worker 2/2 (main): started 200.0 ms after the common start (> 50 ms)"]
    assert len(health.workers) == 4


# ---------------------------------------------------------------- what travels to a worker

def test_every_scenario_pickles_for_worker_processes() -> None:
    for name, sc in seed_scenarios(extra=True).items():
        back = pickle.loads(pickle.dumps(sc))
        assert back.phases == sc.phases, name
        assert (back.request(3).path, back.request(3).body) == (sc.request(3).path, sc.request(3).body), name
    assert set(SCENARIO_NAMES) <= set(seed_scenarios())


@pytest.mark.parametrize("prompts", [
    synthetic_prompts(5, 8),
    multi_turn_prompts(3, 2, 10, 5, 5),
    json_schema_prompts(4),
], ids=["random", "multi-turn", "json-schema"])
def test_llm_scenarios_pickle_with_their_turns_and_validators(prompts: list) -> None:  # type: ignore[type-arg]
    workload = LlmWorkload("chat", "m", tuple(prompts), 8)
    sc = llm_scenario(workload, LoadTestConfig(concurrency=2, total_requests=len(prompts)), Slo())
    back = pickle.loads(pickle.dumps(sc))
    for i in range(len(prompts)):
        assert back.request(i).body == sc.request(i).body
        assert (back.group is None) == (sc.group is None)
        if sc.group is not None and back.group is not None:
            assert back.group(i) == sc.group(i)
        validate = back.request(i).validate
        if validate is not None:
            assert validate('{"not": "it"}') in (Validity.SCHEMA_MISMATCH, Validity.JSON_ONLY)
            assert validate("prose") is Validity.NOT_JSON


def test_without_ray_an_address_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(WorkerError, match="needs Ray"):
        import_ray()
    pool = make_pool(2, "auto")
    assert pool is not None and pool.kind == "ray"
    with pytest.raises(WorkerError, match="pip install"):
        pool.start()


def test_make_pool_chooses_the_workers() -> None:
    assert make_pool(1, None) is None
    pool = make_pool(3, None)
    assert pool is not None and pool.kind == "processes" and pool.size == 3
    pool.close()
    with pytest.raises(ValueError):
        make_pool(0, None)
