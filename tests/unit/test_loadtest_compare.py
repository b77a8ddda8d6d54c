"""compare: config checks, bootstrap noise bands and verdicts."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

from realizar.loadtest.cli import main
from realizar.loadtest.compare import (
    IMPROVEMENT,
    INSUFFICIENT,
    REGRESSION,
    UNCHANGED,
    compare_reports,
    format_comparison,
)
from realizar.loadtest.report import SCHEMA_VERSION, write_json


def _doc(latency_ms: float, *, seed: int, throughput: float = 100.0, blocks: int = 20,
         config_hash: str = "abc") -> dict[str, Any]:
    rng = random.Random(seed)
    rows = []
    for _ in range(blocks):
        m = latency_ms * rng.uniform(0.95, 1.05)
        rows.append({"n": 50.0, "p50_ms": m, "p95_ms": 1.5 * m, "p99_ms": 2 * m, "mean_ms": 1.1 * m,
                     "error_rate_pct": 0.0, "throughput_rps": throughput * rng.uniform(0.95, 1.05)})
    summary = {"total_requests": 1000, "successes": 1000, "failures": 0, "duration_s": 10.0,
               "throughput_rps": throughput, "error_rate_pct": 0.0, "failures_by_class": {},
               "percentile_method": "exact nearest-rank", "service_latency": {},
               "latency": {"count": 1000, "p50_ms": latency_ms, "p95_ms": 1.5 * latency_ms,
                           "p99_ms": 2 * latency_ms, "mean_ms": 1.1 * latency_ms, "max_ms": 3 * latency_ms,
                           "method": "exact nearest-rank"}}
    return {"schema_version": SCHEMA_VERSION, "tool": {"name": "realizar-loadtest", "version": "0"},
            "kind": "suite", "created_at": "now", "base_url": "http://x", "config": {}, "config_hash": "h",
            "environment": {"hostname": "a", "cpu_count": 2}, "valid": True, "invalid_reasons": [],
            "targets": {"passed": True, "results": []}, "exit_code": 0,
            "scenarios": {"health": {"name": "health", "title": "H", "config": {}, "config_hash": config_hash,
                                     "summary": summary, "phases": [], "series": [], "blocks": rows,
                                     "latency_histogram": {}, "client_health": {}, "server_metrics": {},
                                     "targets": [], "valid": True}}}


def _verdicts(base: dict[str, Any], new: dict[str, Any]) -> dict[str, str]:
    return {d.metric: d.verdict for d in compare_reports(base, new).deltas}


def test_same_distribution_is_no_change() -> None:
    v = _verdicts(_doc(10.0, seed=1), _doc(10.0, seed=2))
    assert set(v.values()) == {UNCHANGED}


def test_twice_as_slow_is_a_regression_with_a_ci_above_zero() -> None:
    cmp = compare_reports(_doc(10.0, seed=1), _doc(20.0, seed=2, throughput=50.0))
    by = {d.metric: d for d in cmp.deltas}
    for metric in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "throughput_rps"):
        assert by[metric].verdict == REGRESSION, metric
    assert by["p50_ms"].delta_pct == 100.0
    assert by["p50_ms"].ci_low is not None and 80.0 < by["p50_ms"].ci_low <= by["p50_ms"].ci_high < 120.0  # type: ignore[operator]
    assert by["throughput_rps"].ci_high is not None and by["throughput_rps"].ci_high < 0
    assert "REGRESSION" in format_comparison(cmp)


def test_faster_is_an_improvement() -> None:
    v = _verdicts(_doc(20.0, seed=1), _doc(10.0, seed=2))
    assert v["p50_ms"] == IMPROVEMENT


def test_small_shift_inside_tolerance_is_not_a_regression() -> None:
    v = _verdicts(_doc(10.0, seed=1), _doc(10.5, seed=2))  # +5 % < 10 % tolerance
    assert v["p50_ms"] != REGRESSION


def test_too_few_blocks_is_insufficient() -> None:
    v = _verdicts(_doc(10.0, seed=1, blocks=1), _doc(30.0, seed=2, blocks=1))
    assert v["p50_ms"] == INSUFFICIENT


def test_config_mismatch_is_reported() -> None:
    cmp = compare_reports(_doc(10.0, seed=1), _doc(10.0, seed=2, config_hash="other"))
    assert cmp.config_mismatches and "health" in cmp.config_mismatches[0]


def test_cli_exit_codes(tmp_path: Path) -> None:
    base, same, slow, other = (tmp_path / f"{n}.json" for n in ("base", "same", "slow", "other"))
    write_json(_doc(10.0, seed=1), base)
    write_json(_doc(10.0, seed=2), same)
    write_json(_doc(25.0, seed=2), slow)
    write_json(_doc(10.0, seed=2, config_hash="other"), other)
    assert main(["compare", str(base), str(same)]) == 0
    assert main(["compare", str(base), str(slow)]) == 2
    assert main(["compare", str(base), str(other)]) == 4  # refused
    assert main(["compare", str(base), str(other), "--allow-config-mismatch"]) == 0
    assert main(["compare", str(base), str(tmp_path / "missing.json")]) == 4
    broken = copy.deepcopy(_doc(10.0, seed=1))
    del broken["scenarios"]
    write_json(broken, tmp_path / "broken.json")
    assert main(["compare", str(base), str(tmp_path / "broken.json")]) == 4
