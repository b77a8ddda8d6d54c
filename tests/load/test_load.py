"""The seed's load tests, as opt-in pytest tests.

    pytest tests/load -m load --run-load -k health -s     # one scenario, report printed
    REALIZAR_LOAD_TESTS=1 pytest tests/load -s            # all seven

They run against $REALIZAR_URL when it is set, else against a demo server the
session starts. $REALIZAR_LOAD_SCALE (default 1) shrinks request counts and
durations. Each test prints the seed's report block and asserts the targets
(the seed's defaults; see realizar/loadtest/targets.py).
"""

from __future__ import annotations

import os

import pytest

from realizar.loadtest.report import format_scenario, format_targets
from realizar.loadtest.runner import RunOptions, run_scenario, run_sync
from realizar.loadtest.scenarios import seed_scenarios
from realizar.loadtest.targets import Targets

pytestmark = pytest.mark.load


@pytest.fixture(scope="module")
def load_url(request: pytest.FixtureRequest) -> str:
    url = os.environ.get("REALIZAR_URL")
    if url:
        return url.rstrip("/")
    return str(request.getfixturevalue("server_url"))


def _run_and_check(url: str, name: str) -> None:
    scale = float(os.environ.get("REALIZAR_LOAD_SCALE", "1"))
    scenario = seed_scenarios(url, scale)[name]
    result = run_sync(lambda: run_scenario(scenario, RunOptions()))
    print("\n" + format_scenario(result))
    verdicts = Targets.default().check(result)
    print(format_targets(verdicts))
    assert result.valid, f"the client was the bottleneck: {result.client_health.reasons}"
    assert result.overall.total_requests == sum(p.phase.config.request_count for p in result.phases)
    failed = [f"{v.metric} = {v.value} (target {v.op} {v.threshold})" for v in verdicts if not v.passed]
    assert not failed, f"{name}: targets missed: {'; '.join(failed)}"


def test_health_endpoint_load(load_url: str) -> None:
    _run_and_check(load_url, "health")


def test_tokenize_endpoint_load(load_url: str) -> None:
    _run_and_check(load_url, "tokenize")


def test_generate_endpoint_load(load_url: str) -> None:
    _run_and_check(load_url, "generate")


def test_batch_tokenize_load(load_url: str) -> None:
    _run_and_check(load_url, "batch_tokenize")


def test_batch_generate_load(load_url: str) -> None:
    _run_and_check(load_url, "batch_generate")


def test_sustained_load(load_url: str) -> None:
    _run_and_check(load_url, "sustained")


def test_spike_traffic(load_url: str) -> None:
    _run_and_check(load_url, "spike")
