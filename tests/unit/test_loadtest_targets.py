"""Targets: the seed's defaults, overrides from a file, PASS/FAIL evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from realizar.loadtest.stats import Collector, FailureClass, RequestRecord, Summary
from realizar.loadtest.targets import Targets, TargetsError, evaluate


def _summary(latency_s: float, failures: int = 0, n: int = 20, duration: float = 1.0) -> Summary:
    col = Collector()
    col.start(0.0)
    for i in range(n):
        col.add(RequestRecord(i, 0.0, 0.0, latency_s, 200))
    for i in range(failures):
        col.add(RequestRecord(n + i, 0.0, 0.0, latency_s, 503, FailureClass.HTTP_503))
    col.t_end = duration
    return col.summary()


def test_defaults_are_the_seeds() -> None:
    t = Targets.default()
    health = {x.metric: (x.op, x.threshold) for x in t.for_scenario("health")}
    assert health == {"p50_ms": ("<", 100.0), "p95_ms": ("<", 200.0), "p99_ms": ("<", 500.0),
                      "error_rate_pct": ("<", 5.0), "throughput_rps": (">", 10.0)}
    spike = {x.metric: x.threshold for x in t.for_scenario("spike")}
    assert spike["spike.error_rate_pct"] == 15.0 and "error_rate_pct" not in spike
    generate = {x.metric for x in t.for_scenario("generate")}
    assert generate == {"error_rate_pct"}  # latency targets are for simple operations


def test_evaluate_pass_and_fail() -> None:
    targets = Targets.default().for_scenario("health")
    fast = evaluate("health", _summary(0.01), {}, targets)
    assert all(r.passed for r in fast)
    slow = evaluate("health", _summary(0.3), {}, targets)
    failed = {r.metric for r in slow if not r.passed}
    assert failed == {"p95_ms", "p50_ms"}


def test_error_rate_target() -> None:
    result = evaluate("health", _summary(0.01, failures=2, n=18), {}, Targets.default().for_scenario("health"))
    assert {r.metric for r in result if not r.passed} == {"error_rate_pct"}  # 10 % > 5 %


def test_metric_without_data_fails() -> None:
    col = Collector()
    col.start(0.0)
    col.add(RequestRecord(0, 0.0, 0.0, 0.1, 200))
    col.t_end = 1.0
    empty = Collector()
    empty.start(0.0)
    empty.t_end = 1.0
    result = evaluate("x", empty.summary(), {}, Targets.default().for_scenario("x"))
    assert not any(r.passed for r in result if r.metric.endswith("_ms"))
    phased = evaluate("spike", col.summary(), {}, Targets.default().for_scenario("spike"))
    assert not any(r.passed for r in phased if r.metric.startswith("spike."))  # no such phase


def test_file_overrides_and_disables(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    path.write_text(json.dumps({"defaults": {"p50_ms": 50}, "scenarios": {"health": {"p99_ms": None},
                                                                        "generate": {"p50_ms": 2000}}}))
    t = Targets.load(path)
    health = {x.metric: x.threshold for x in t.for_scenario("health")}
    assert health["p50_ms"] == 50.0 and "p99_ms" not in health and health["throughput_rps"] == 10.0
    assert {x.metric: x.threshold for x in t.for_scenario("generate")}["p50_ms"] == 2000.0


@pytest.mark.parametrize("doc", [{"defaults": {"p42_ms": 1}}, {"defaults": {"p50_ms": "fast"}},
                                 {"nonsense": {}}, {"scenarios": []}])
def test_bad_files_are_usage_errors(tmp_path: Path, doc: object) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(TargetsError):
        Targets.load(path)
    with pytest.raises(TargetsError):
        Targets.load(tmp_path / "missing.json")
