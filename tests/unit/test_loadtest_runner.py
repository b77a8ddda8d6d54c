"""Load models and honesty: open-loop schedules, coordinated omission, the
client monitor, the spike's recovery time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from realizar.loadtest.config import LoadTestConfig
from realizar.loadtest.monitor import ClientMonitor, SaturationLimits, ServerMetrics, parse_prometheus
from realizar.loadtest.runner import PhaseResult, RunOptions, recovery_time, run_scenario, run_sync
from realizar.loadtest.scenarios import Phase, Scenario
from realizar.loadtest.stats import Collector, RequestRecord
from realizar.loadtest.workload import RequestSpec


@asynccontextmanager
async def slow_server(delay: float) -> AsyncIterator[str]:
    """An aiohttp.web server whose /slow answers after ``delay`` seconds."""
    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.json_response({"status": "ok"})

    async def fast(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/fast", fast)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _scenario(cfg: LoadTestConfig, path: str) -> Scenario:
    return Scenario("t", "T", "", (Phase("main", "T", cfg),), lambda _i: RequestSpec("GET", path))


@pytest.mark.serial  # the load client's own health is checked, so it runs alone (make test)
def test_open_loop_sends_on_schedule_and_charges_waiting_to_latency() -> None:
    """Open loop at 40 req/s against a server that takes 100 ms, capped at 2 in flight:
    the cap makes requests wait, which latency from the intended start must show
    (no coordinated omission) while the service latency stays near 100 ms."""
    async def go() -> tuple[float, float, float, int, bool]:
        async with slow_server(0.1) as url:
            cfg = LoadTestConfig(concurrency=2, total_requests=20, timeout=10.0, base_url=url, rate=40.0,
                                 arrival="constant")
            r = await run_scenario(_scenario(cfg, "/slow"), RunOptions(scrape_metrics=False))
            return r.overall.latency.p99_ms, r.overall.service_latency.p50_ms, r.overall.duration_s, \
                r.overall.successes, r.valid

    p99_intended, p50_service, duration, ok, valid = run_sync(go)
    assert ok == 20
    assert valid  # waiting on a slow server is not the client's lag
    assert 90 <= p50_service < 400
    # 20 requests through 2 slots of 100 ms take ~1 s, though the schedule ends at 0.475 s
    assert duration >= 0.9
    assert p99_intended > p50_service + 300


@pytest.mark.serial  # the load client's own health is checked, so it runs alone (make test)
def test_open_loop_without_a_cap_keeps_the_rate() -> None:
    async def go() -> tuple[float, bool, float]:
        async with slow_server(0.05) as url:
            cfg = LoadTestConfig(concurrency=100, total_requests=60, timeout=10.0, base_url=url, rate=100.0,
                                 arrival="poisson", seed=1)
            r = await run_scenario(_scenario(cfg, "/slow"), RunOptions(scrape_metrics=False))
            return r.overall.latency.p50_ms, r.valid, r.client_health.dispatch_lag_p99_ms

    p50, valid, lag = run_sync(go)
    assert valid and p50 < 400 and lag < 50


def test_paced_closed_loop_lasts_for_the_duration() -> None:
    async def go() -> tuple[int, float]:
        async with slow_server(0.0) as url:
            cfg = LoadTestConfig(concurrency=3, total_requests=12, duration=1.2, base_url=url)
            r = await run_scenario(_scenario(cfg, "/fast"), RunOptions(scrape_metrics=False))
            return r.overall.total_requests, r.overall.duration_s

    total, duration = run_sync(go)
    assert total == 12
    assert 1.0 <= duration < 2.5  # the last of 12 slots at 10/s starts at 1.1 s


def test_unbounded_closed_loop_stops_at_the_duration() -> None:
    async def go() -> tuple[int, float]:
        async with slow_server(0.0) as url:
            cfg = LoadTestConfig(concurrency=2, total_requests=0, duration=0.5, base_url=url)
            r = await run_scenario(_scenario(cfg, "/fast"), RunOptions(scrape_metrics=False))
            return r.overall.total_requests, r.overall.duration_s

    total, duration = run_sync(go)
    assert total > 10 and 0.45 <= duration < 1.5


def test_monitor_flags_a_blocked_event_loop() -> None:
    async def go() -> tuple[bool, list[str], int]:
        monitor = ClientMonitor(SaturationLimits(loop_lag_p99_ms=50.0))
        monitor.start(time.perf_counter())
        for _ in range(12):
            time.sleep(0.12)  # hog the loop: what a saturated client looks like
            await asyncio.sleep(0.011)
        health = await monitor.stop()
        return health.saturated, health.reasons, len(health.series)

    saturated, reasons, seconds = run_sync(go)
    assert saturated and any("event-loop lag" in r for r in reasons)
    assert seconds >= 1


@pytest.mark.serial  # the load client's own health is checked, so it runs alone (make test)
def test_monitor_is_quiet_for_an_idle_client() -> None:
    async def go() -> bool:
        monitor = ClientMonitor()
        monitor.start(time.perf_counter())
        await asyncio.sleep(0.3)
        return (await monitor.stop()).saturated

    assert run_sync(go) is False


def _phase(name: str, t0: float, items: list[tuple[float, float]]) -> PhaseResult:
    col = Collector()
    col.start(t0)
    for i, (end, lat) in enumerate(items):
        col.add(RequestRecord(i, t0 + end - lat, t0 + end - lat, t0 + end, 200))
    col.t_end = t0 + max(e for e, _ in items)
    cfg = LoadTestConfig()
    return PhaseResult(Phase(name, name, cfg), col, col.summary(), 0.0, 0.0)


def test_recovery_time() -> None:
    baseline = _phase("baseline", 0.0, [(0.1 * i, 0.010) for i in range(1, 11)])  # p95 10 ms
    spike = _phase("spike", 2.0, [(0.5, 0.300)])  # ends at 2.5
    # recovery starts at 2.5: three slow requests, then fast ones from 0.4 s on
    recovery = _phase("recovery", 2.5, [(0.1, 0.2), (0.2, 0.2), (0.3, 0.2), (0.4, 0.01), (0.5, 0.01),
                                        (0.6, 0.01), (0.7, 0.01)])
    seconds, threshold = recovery_time(baseline, spike, recovery)
    assert threshold == pytest.approx(20.0)  # max(2 x 10 ms, 10 ms + 5 ms)
    assert seconds == pytest.approx(0.4)
    never = _phase("recovery", 2.5, [(0.1, 0.2), (0.2, 0.2)])
    assert recovery_time(baseline, spike, never)[0] is None


def test_parse_prometheus_watched_series() -> None:
    text = """# HELP realizar_num_requests_running Requests in the running batch
# TYPE realizar_num_requests_running gauge
realizar_num_requests_running 3.0
realizar_num_requests_waiting 7
realizar_kv_cache_usage_ratio 0.25
vllm:num_requests_running{model_name="m"} 2
realizar_requests_total 100
"""
    assert parse_prometheus(text) == {"num_requests_running": 5.0, "num_requests_waiting": 7.0,
                                      "kv_cache_usage_ratio": 0.25}


def test_prefix_cache_hit_rate_from_the_servers_counters() -> None:
    def sample(t: float, queries: float, hits: float) -> dict[str, float]:
        text = f"realizar_prefix_cache_queries_total {queries}\nrealizar_prefix_cache_hits_total {hits}\n"
        return {"t": t, **parse_prometheus(text)}

    # the run's own growth counts, not what the counters held before it
    metrics = ServerMetrics(available=True, samples=[sample(0, 1000, 900), sample(1, 3000, 2400), sample(2, 5000, 4100)])
    assert metrics.prefix_cache_hit_rate() == (4100 - 900) / (5000 - 1000)
    assert metrics.to_dict()["prefix_cache_hit_rate"] == metrics.prefix_cache_hit_rate()
    vllm = parse_prometheus('vllm:prefix_cache_queries_total{model_name="m"} 10\nvllm:prefix_cache_hits_total{model_name="m"} 4\n')
    assert vllm == {"prefix_cache_queries": 10.0, "prefix_cache_hits": 4.0}
    assert ServerMetrics(available=True, samples=[{"t": 0, "num_requests_running": 1.0}] * 2).prefix_cache_hit_rate() is None
    assert ServerMetrics(available=True, samples=[sample(0, 10, 5), sample(1, 10, 5)]).prefix_cache_hit_rate() is None
