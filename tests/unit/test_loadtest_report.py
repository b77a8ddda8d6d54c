"""Report outputs: the seed's text block, the JSON schema, the HTML file."""

from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path

import pytest

from realizar.loadtest.html import write_html
from realizar.loadtest.noop_server import NoopServer
from realizar.loadtest.report import (
    SCHEMA_VERSION,
    build_report,
    format_block,
    format_scenario,
    read_json,
    validate_report,
    write_json,
)
from realizar.loadtest.runner import RunOptions, ScenarioResult, run_scenario, run_sync
from realizar.loadtest.scenarios import seed_scenarios
from realizar.loadtest.stats import Collector, RequestRecord
from realizar.loadtest.targets import Targets


async def _run_against_noop(names: tuple[str, ...]) -> list[ScenarioResult]:
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.get_running_loop().create_task(NoopServer().serve("127.0.0.1", 0, ready))
    port = await ready
    try:
        scenarios = seed_scenarios(f"http://127.0.0.1:{port}", scale=0.05)
        return [await run_scenario(scenarios[n], RunOptions()) for n in names]
    finally:
        server.cancel()


@pytest.fixture(scope="module")
def report_doc() -> dict[str, object]:
    results = run_sync(lambda: _run_against_noop(("health", "spike")))
    verdicts = [v for r in results for v in Targets.default().check(r)]
    return build_report(results, verdicts, kind="suite", base_url=results[0].scenario.config.base_url,
                        config={"scale": 0.05}, client="auto", exit_code=0)


def test_block_has_the_seeds_lines_in_order() -> None:
    col = Collector()
    col.start(0.0)
    for i, ms in enumerate((10.0, 20.0, 30.0, 40.0)):
        col.add(RequestRecord(i, 0.0, 0.0, ms / 1000, 200))
    col.t_end = 2.0
    text = format_block(col.summary())
    assert text.splitlines()[:12] == [
        "Total requests: 4", "Successes: 4", "Failures: 0", "Duration: 2.00s", "Throughput: 2.00 req/s",
        "Error rate: 0.00%", "", "Latency Percentiles:", "  p50: 20.00ms", "  p95: 40.00ms", "  p99: 40.00ms",
        "  max: 40.00ms"]
    assert "exact nearest-rank" in text


def test_report_json_schema(report_doc: dict[str, object], tmp_path: Path) -> None:
    assert validate_report(report_doc) == []
    path = tmp_path / "r.json"
    write_json(report_doc, path)
    doc = read_json(path)
    assert validate_report(doc) == []
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["tool"]["name"] == "realizar-loadtest" and doc["tool"]["version"]
    assert len(doc["config_hash"]) == 16
    assert {"python", "cpu_count", "client", "event_loop"} <= set(doc["environment"])
    health = doc["scenarios"]["health"]
    assert health["summary"]["total_requests"] == 5
    assert health["series"] and health["series"][0]["completed"] >= 1
    assert health["client_health"]["series"] is not None
    assert health["server_metrics"]["available"] is True
    assert "num_requests_running" in health["server_metrics"]["samples"][0]
    assert {t["metric"] for t in health["targets"]} >= {"p50_ms", "throughput_rps"}
    spike = doc["scenarios"]["spike"]
    assert [p["name"] for p in spike["phases"]] == ["baseline", "spike", "recovery"]
    assert spike["recovery_time_s"] is not None
    assert doc["targets"]["passed"] is True


def test_validate_report_catches_damage(report_doc: dict[str, object]) -> None:
    broken = dict(report_doc)
    del broken["config_hash"]
    assert "report.config_hash is missing" in validate_report(broken)
    assert validate_report({"schema_version": 1}) != []


def test_text_for_spike_shows_phases_and_recovery() -> None:
    results = run_sync(lambda: _run_against_noop(("spike",)))
    text = format_scenario(results[0])
    for header in ("=== Spike Traffic Test ===", "=== Baseline Load ===", "=== Spike Load (10x) ===",
                   "=== Recovery Load ===", "Recovery time:"):
        assert header in text


def test_html_is_self_contained_with_images(report_doc: dict[str, object], tmp_path: Path) -> None:
    path = tmp_path / "r.html"
    write_html(report_doc, path)
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 2  # one chart panel per scenario
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page)  # nothing fetched from elsewhere
