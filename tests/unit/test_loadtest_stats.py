"""Percentile maths, error rate, throughput, HDR merging and the per-phase collector."""

from __future__ import annotations

import math
import pickle
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from realizar.loadtest.stats import (
    EXACT_METHOD,
    HDR_METHOD,
    Collector,
    FailureClass,
    LatencyRecorder,
    RequestRecord,
    Slo,
    classify_status,
    nearest_rank,
)


def test_nearest_rank_textbook_values() -> None:
    # the classic example: 15, 20, 35, 40, 50
    data = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert nearest_rank(data, 5) == 15.0
    assert nearest_rank(data, 30) == 20.0
    assert nearest_rank(data, 40) == 20.0
    assert nearest_rank(data, 50) == 35.0
    assert nearest_rank(data, 100) == 50.0
    assert nearest_rank(data, 0) == 15.0
    assert nearest_rank([], 50) == 0.0
    with pytest.raises(ValueError):
        nearest_rank(data, 101)


def test_nearest_rank_on_1_to_100() -> None:
    data = [float(i) for i in range(1, 101)]
    assert [nearest_rank(data, p) for p in (50, 95, 99, 100)] == [50.0, 95.0, 99.0, 100.0]


@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), min_size=1, max_size=200),
       st.floats(min_value=0.0, max_value=100.0))
def test_nearest_rank_is_a_sample_with_enough_mass_below(data: list[float], p: float) -> None:
    data.sort()
    value = nearest_rank(data, p)
    assert value in data
    at_or_below = sum(1 for x in data if x <= value)
    assert at_or_below >= math.ceil(p / 100 * len(data))
    below = sum(1 for x in data if x < value)
    assert below < max(1, math.ceil(p / 100 * len(data)))


def test_recorder_exact_then_hdr() -> None:
    rec = LatencyRecorder(exact_limit=1000)
    for i in range(1, 1001):
        rec.record(i / 1000)  # 1 ms .. 1000 ms
    assert rec.method == EXACT_METHOD
    assert rec.percentile(50) == pytest.approx(0.5)
    assert rec.percentile(99) == pytest.approx(0.99)
    rec.record(2.0)  # one past the limit: folds into HDR
    assert rec.method == HDR_METHOD
    assert rec.count == 1001 and rec.max == 2.0
    # 3 significant digits: within 0.1 % of the exact answer
    assert rec.percentile(50) == pytest.approx(0.501, rel=2e-3)
    assert rec.percentile(99) == pytest.approx(0.991, rel=2e-3)


def test_hdr_merging_matches_the_union() -> None:
    rng = random.Random(1)
    a_vals = [rng.expovariate(1 / 0.05) for _ in range(3000)]
    b_vals = [rng.expovariate(1 / 0.2) for _ in range(2000)]
    a, b = LatencyRecorder(exact_limit=100), LatencyRecorder(exact_limit=100)  # both HDR
    for v in a_vals:
        a.record(v)
    for v in b_vals:
        b.record(v)
    a.merge(b)
    union = sorted(a_vals + b_vals)
    assert a.method == HDR_METHOD
    assert a.count == 5000
    assert a.max == pytest.approx(max(union))
    for p in (50, 90, 99):
        assert a.percentile(p) == pytest.approx(nearest_rank(union, p), rel=2e-3, abs=2e-6)


def test_merge_stays_exact_when_it_fits_and_mixes_exact_into_hdr() -> None:
    a, b = LatencyRecorder(exact_limit=10), LatencyRecorder(exact_limit=10)
    for v in (0.001, 0.002, 0.003):
        a.record(v)
    for v in (0.004, 0.005):
        b.record(v)
    a.merge(b)
    assert a.method == EXACT_METHOD and a.percentile(100) == 0.005 and a.percentile(50) == 0.003
    big = LatencyRecorder(exact_limit=10)
    for i in range(20):
        big.record(0.010 + i / 1000)
    a.merge(big)  # 5 exact + 20 HDR
    assert a.method == HDR_METHOD and a.count == 25
    assert a.percentile(0) == pytest.approx(0.001, rel=2e-3)


def _rec(i: int, start: float, latency: float, failure: FailureClass | None = None, tokens: int = 0,
         chunks: list[float] | None = None) -> RequestRecord:
    rec = RequestRecord(i, start, start, start + latency, 200 if failure is None else 503, failure,
                        output_tokens=tokens, chunk_times=chunks)
    if chunks:
        rec.first_token = chunks[0]
    return rec


def test_collector_error_rate_throughput_and_classes() -> None:
    col = Collector()
    col.start(100.0)
    # 8 successes and 2 failures finishing within 2 seconds
    for i in range(8):
        col.add(_rec(i, 100.0 + i * 0.25, 0.010 * (i + 1)))
    col.add(_rec(8, 101.0, 0.5, FailureClass.HTTP_503))
    col.add(_rec(9, 101.5, 0.5, FailureClass.TOTAL_TIMEOUT))
    col.t_end = 102.0
    s = col.summary()
    assert (s.total_requests, s.successes, s.failures) == (10, 8, 2)
    assert s.error_rate_pct == pytest.approx(20.0)
    assert s.duration_s == pytest.approx(2.0)
    assert s.throughput_rps == pytest.approx(5.0)
    assert s.failures_by_class["http_503"] == 1 and s.failures_by_class["total_timeout"] == 1
    assert s.latency.count == 8  # percentiles over successes only
    assert s.latency.p50_ms == pytest.approx(40.0)
    assert s.latency.max_ms == pytest.approx(80.0)
    assert s.percentile_method == EXACT_METHOD


def test_latency_from_intended_start_and_from_send() -> None:
    col = Collector()
    col.start(0.0)
    rec = RequestRecord(0, intended=1.0, sent=1.5, end=1.6, status=200)  # sent 500 ms late
    col.add(rec)
    s = col.summary()
    assert s.latency.p50_ms == pytest.approx(600.0)
    assert s.service_latency.p50_ms == pytest.approx(100.0)


def test_streaming_metrics_follow_vllm_definitions() -> None:
    col = Collector(slo=Slo(ttft_ms=150.0, tpot_ms=60.0))
    col.start(0.0)
    # sent at 0, chunks at 0.1, 0.15, 0.25, 0.30; done at 0.30; 4 output tokens
    col.add(_rec(0, 0.0, 0.30, tokens=4, chunks=[0.1, 0.15, 0.25, 0.30]))
    # slow first token: misses the TTFT SLO
    col.add(_rec(1, 0.0, 0.50, tokens=2, chunks=[0.4, 0.5]))
    s = col.summary()
    assert s.ttft is not None and s.ttft.p50_ms == pytest.approx(100.0) and s.ttft.max_ms == pytest.approx(400.0)
    assert s.tpot is not None
    # (0.30 - 0.10) / 3 = 66.7 ms and (0.50 - 0.40) / 1 = 100 ms
    assert s.tpot.min_ms == pytest.approx(66.6667, rel=1e-3) and s.tpot.max_ms == pytest.approx(100.0)
    assert s.itl is not None and s.itl.count == 4  # 3 gaps + 1 gap, pooled
    assert s.itl.p50_ms == pytest.approx(50.0)
    assert s.e2el is not None and s.e2el.max_ms == pytest.approx(500.0)
    assert s.output_tokens == 6
    assert s.good_requests == 0  # first misses TPOT (66.7 > 60), second misses TTFT


def test_goodput_counts_requests_within_slo() -> None:
    col = Collector(slo=Slo(e2el_ms=100.0))
    col.start(0.0)
    col.add(_rec(0, 0.0, 0.05))
    col.add(_rec(1, 0.0, 0.20))
    col.add(_rec(2, 0.0, 0.05, FailureClass.HTTP_503))
    col.t_end = 1.0
    s = col.summary()
    assert s.good_requests == 1 and s.goodput_rps == pytest.approx(1.0)


def test_series_and_blocks() -> None:
    col = Collector()
    col.start(0.0)
    for i in range(30):
        col.add(_rec(i, i * 0.1, 0.01 if i < 20 else 0.05, FailureClass.HTTP_429 if i == 25 else None))
    rows = col.series()
    assert [r["completed"] for r in rows] == [10.0, 10.0, 10.0]
    assert rows[2]["failures"] == 1.0 and rows[2]["p50_ms"] == pytest.approx(50.0)
    blocks = col.blocks()
    assert len(blocks) == 10 and sum(b["n"] for b in blocks) == 30
    assert blocks[0]["p50_ms"] == pytest.approx(10.0) and blocks[-1]["p50_ms"] == pytest.approx(50.0)
    assert any(b["error_rate_pct"] > 0 for b in blocks)


def test_classify_status() -> None:
    assert classify_status(200) is None and classify_status(204) is None
    assert classify_status(429) is FailureClass.HTTP_429
    assert classify_status(400) is FailureClass.HTTP_4XX
    assert classify_status(503) is FailureClass.HTTP_503
    assert classify_status(502) is FailureClass.HTTP_5XX
    assert classify_status(302) is FailureClass.OTHER


def test_collector_groups_ttft_and_cached_tokens_by_turn() -> None:
    col = Collector(group=lambda i: i % 2 + 1)
    col.start(0.0)
    for i in range(6):
        cached = None if i == 0 else 100 * (i % 2)
        col.add(RequestRecord(i, 0.0, 0.0, 1.0, 200, first_token=0.1 * (i % 2 + 1), output_tokens=2,
                              input_tokens=10 + i % 2, cached_tokens=cached))
    col.add(RequestRecord(6, 0.0, 0.0, 1.0, 500, failure=FailureClass.HTTP_5XX))
    first, second = col.group_summaries()
    assert (first.group, first.requests, second.group, second.requests) == (1, 3, 2, 3)
    assert first.ttft is not None and first.ttft.p50_ms == pytest.approx(100.0)
    assert second.ttft is not None and second.ttft.p50_ms == pytest.approx(200.0)
    assert (first.mean_input_tokens, second.mean_input_tokens) == (10, 11)
    assert (first.mean_cached_tokens, second.mean_cached_tokens) == (0, 100)  # over those reported
    assert Collector().group_summaries() == []


@pytest.mark.parametrize("seed", range(2))
def test_the_hdr_standard_deviation_and_histogram_are_the_librarys(seed: int) -> None:
    """stats walks only the non-empty buckets; the numbers are HdrHistogram's own, to the last bit,
    also after a merge and a trip through pickle (the workers' path). (The library's own walk is the
    slow part of this test: two seeds.)"""
    rng = random.Random(seed)
    recorder, other = LatencyRecorder(exact_limit=10), LatencyRecorder(exact_limit=10)
    for _ in range(600 + 2400 * seed):
        recorder.record(rng.choice([rng.lognormvariate(-4, 1), rng.uniform(0, 0.001), rng.uniform(1, 100)]))
    for _ in range(30):
        other.record(rng.lognormvariate(-2, 2))
    shipped = pickle.loads(pickle.dumps(recorder))
    shipped.merge(other)
    for rec in (recorder, shipped):
        hdr = rec._hdr
        assert rec.method == HDR_METHOD and hdr is not None
        assert rec.stdev() == hdr.get_stddev() / 1e6
        histogram = rec.histogram()
        lo = max(rec.min * 1e3, 1e-3)
        assert len(histogram["edges_ms"]) == 41 and histogram["edges_ms"][0] == round(lo, 4)
        ratio = (max(rec.max * 1e3, lo * 1.001) / lo) ** (1 / 40)
        from_library = [0.0] * 40
        for item in hdr.get_recorded_iterator():
            ms = item.value_iterated_to / 1e3
            k = 0 if ms <= lo else min(39, int(math.log(ms / lo) / math.log(ratio)))
            from_library[k] += item.count_at_value_iterated_to
        assert histogram["counts"] == from_library
