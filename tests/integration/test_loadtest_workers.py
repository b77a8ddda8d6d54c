"""Load workers for real: worker processes (and Ray actors, where Ray is installed) against
the built-in no-op server and a recording server. Correctness only, never timing: every
request of the schedule is sent once, counts add up, and the report has the shape of a
one-process run's."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from realizar.loadtest.calibrate import noop_server
from realizar.loadtest.cli import main
from realizar.loadtest.config import LoadTestConfig
from realizar.loadtest.report import read_json, validate_report
from realizar.loadtest.runner import RunOptions, ScenarioResult, run_scenario, run_sync
from realizar.loadtest.scenarios import Phase, Scenario, health_request
from realizar.loadtest.workers import ProcessPool, RayPool, WorkerError
from realizar.loadtest.workload import RequestSpec
from tests.conftest import NOT_MEASURED


@pytest.fixture(autouse=True)
def _workers_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The load workers (processes, Ray's daemons and actors) run nothing the coverage report holds."""
    for name, value in NOT_MEASURED.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def noop_url() -> Iterator[str]:
    with noop_server() as url:
        yield url


def indexed_request(i: int) -> RequestSpec:
    """Request ``i`` says which it is (module level: it pickles to the worker processes)."""
    return RequestSpec("GET", f"/hit?i={i}")


def broken_request(i: int) -> RequestSpec:
    raise RuntimeError(f"request {i} cannot be built")


@asynccontextmanager
async def recording_server(seen: Counter[int]) -> AsyncIterator[str]:
    async def hit(request: web.Request) -> web.Response:
        seen[int(request.query["i"])] += 1
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/hit", hit)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _shape(value: Any) -> Any:
    """Keys all the way down; lists and scalars are leaves (their lengths and values differ by run)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return "list" if isinstance(value, list) else "leaf"


def test_every_request_of_one_schedule_is_sent_once_across_workers() -> None:
    """An open-loop Poisson schedule of 300 requests over 3 worker processes: the server
    sees each index exactly once, and the merged result counts each once."""
    seen: Counter[int] = Counter()

    async def go(pool: ProcessPool) -> ScenarioResult:
        async with recording_server(seen) as url:
            cfg = LoadTestConfig(concurrency=30, total_requests=300, rate=600.0, arrival="poisson", seed=5,
                                 base_url=url, timeout=10.0)
            scenario = Scenario("hits", "Hits", "", (Phase("main", "Hits", cfg),), indexed_request)
            return await run_scenario(scenario, RunOptions(scrape_metrics=False, pool=pool))

    with ProcessPool(3) as pool:
        result = run_sync(lambda: go(pool))
    assert sorted(seen) == list(range(300)) and set(seen.values()) == {1}
    assert result.overall.total_requests == result.overall.successes == 300
    assert result.overall.latency.count == 300
    rows = result.client_health.workers
    assert [row["worker"] for row in rows] == [0, 1, 2]
    assert [row["requests"] for row in rows] == [100, 100, 100]
    assert [row["concurrency"] for row in rows] == [10, 10, 10]
    assert len({row["pid"] for row in rows}) == 3
    assert all(row["scheduled_rps"] == pytest.approx(200.0) for row in rows)


def test_a_failing_worker_is_a_clear_error() -> None:
    async def go(pool: ProcessPool) -> ScenarioResult:
        cfg = LoadTestConfig(concurrency=2, total_requests=4, base_url="http://127.0.0.1:9")
        scenario = Scenario("broken", "Broken", "", (Phase("main", "Broken", cfg),), broken_request)
        return await run_scenario(scenario, RunOptions(scrape_metrics=False, pool=pool))

    with ProcessPool(2) as pool:
        with pytest.raises(WorkerError, match="cannot be built"):
            run_sync(lambda: go(pool))
        with pytest.raises(WorkerError, match="out of step"):
            run_sync(lambda: go(pool))


def test_two_workers_give_the_report_of_one(noop_url: str, tmp_path: Path) -> None:
    """The suite with --workers 2: the same requests, the same text blocks, and a JSON
    document with the same keys everywhere as the one-process run's; plus the HTML."""
    docs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.json"
        html = tmp_path / f"w{workers}.html"
        argv = ["--url", noop_url, "--scenario", "health", "--scenario", "spike", "--scenario", "tokenize",
                "--scale", "0.5", "--workers", str(workers), "--json", str(out), "--html", str(html), "--no-progress"]
        # a run is judged invalid (3) when a worker started late or lagged: on a machine busy with the rest of
        # the suite that is the client's timing, not the reports this test compares, so it runs again
        for _ in range(3):
            code = main(argv)
            if code != 3:
                break
        assert code == 0, (workers, read_json(out).get("scenarios", {}))
        docs[workers] = read_json(out)
        assert validate_report(docs[workers]) == []
        page = html.read_text()
        assert "data:image/png;base64," in page
        assert ("<th>achieved req/s</th>" in page) == (workers > 1)  # the per-worker table
    one, two = docs[1], docs[2]
    assert _shape(one) == _shape(two)
    assert one["environment"]["load_workers"] == {"count": 1, "kind": "in-process"}
    assert two["environment"]["load_workers"] == {"count": 2, "kind": "processes"}
    for name in ("health", "spike", "tokenize"):
        a, b = one["scenarios"][name], two["scenarios"][name]
        assert a["summary"]["total_requests"] == b["summary"]["total_requests"] > 0, name
        assert b["summary"]["successes"] == b["summary"]["total_requests"], name
        assert [p["summary"]["total_requests"] for p in a["phases"]] == \
            [p["summary"]["total_requests"] for p in b["phases"]], name
        assert a["client_health"]["workers"] == []
        rows = b["client_health"]["workers"]
        for phase in b["phases"]:
            mine = [row for row in rows if row["phase"] == phase["name"]]
            assert sum(row["requests"] for row in mine) == phase["summary"]["total_requests"], (name, phase["name"])
        # the merged timeline keeps every request, in completion order
        assert len(b["timeline"]["t_s"]) == b["summary"]["total_requests"]
        assert b["timeline"]["t_s"] == sorted(b["timeline"]["t_s"]) or len(b["phases"]) > 1
    # spike: its baseline and recovery have 2 connections, so 2 workers take 1 each; the spike 10 each
    spike_rows = two["scenarios"]["spike"]["client_health"]["workers"]
    assert [(r["phase"], r["concurrency"]) for r in spike_rows] == \
        [("baseline", 1), ("baseline", 1), ("spike", 10), ("spike", 10), ("recovery", 1), ("recovery", 1)]
    assert two["scenarios"]["spike"]["recovery_time_s"] is not None


def test_llm_mode_spreads_over_workers(noop_url: str, tmp_path: Path) -> None:
    out = tmp_path / "llm.json"
    code = main(["llm", "--url", noop_url, "--rate", "400", "--num-prompts", "60", "--input-len", "8",
                 "--output-len", "6", "--workload", "multi-turn", "--turns", "2", "--system-prompt-len", "20",
                 "--workers", "2", "--json", str(out), "--no-progress"])
    assert code == 0
    doc = read_json(out)
    assert doc["completed"] == 120 and doc["failed"] == 0  # 60 conversations x 2 turns
    assert [t["requests"] for t in doc["per_turn"]] == [60, 60]
    assert doc["total_output_tokens"] == 120 * 6
    rows = doc["scenarios"]["llm"]["client_health"]["workers"]
    assert sum(row["requests"] for row in rows) == 120 and len(rows) == 2


def test_calibrate_measures_the_ceiling_of_all_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cal.json"
    code = main(["calibrate", "--workers", "2", "--duration", "0.5", "--client", "raw", "--concurrency", "8",
                 "--stream-concurrency", "2", "--events", "200", "--json", str(out)])
    assert code == 0
    assert "2 workers:" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["environment"]["load_workers"]["count"] == 2
    for r in doc["results"]:
        assert r["workers"] == 2 and len(r["worker_rates"]) == 2
        assert r["requests"] > 0 and r["failures"] == 0 and r["per_second"] > 0


@pytest.mark.slow
def test_ray_actors_run_the_shares(noop_url: str) -> None:
    """Two Ray actors on a local ray.init(num_cpus=2) run the health scenario's two shares."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray[default]')")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
    try:
        cfg = LoadTestConfig(concurrency=4, total_requests=200, base_url=noop_url)
        scenario = Scenario("health", "Health", "", (Phase("main", "Health", cfg),), health_request)
        with RayPool(2, None) as pool:
            assert len(pool.hosts) == 2
            result = run_sync(lambda: run_scenario(scenario, RunOptions(scrape_metrics=False, pool=pool)))
            assert pool.describe()["kind"] == "ray"
    finally:
        ray.shutdown()
    assert result.overall.total_requests == result.overall.successes == 200
    rows = result.client_health.workers
    assert [row["requests"] for row in rows] == [100, 100]
    assert len({row["pid"] for row in rows}) == 2


def test_workers_flag_is_checked() -> None:
    assert main(["--workers", "0"]) == 4
    assert main(["llm", "--rate", "1", "--workers", "x"]) == 4
