"""Runs scenarios: the closed and open load models, with the client monitor and
the /metrics scraper alongside, and the spike's recovery time."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from realizar.loadtest.client import Client, ClientKind, PreparedRequest, Target, make_client, prepare
from realizar.loadtest.config import LoadTestConfig, Share
from realizar.loadtest.monitor import (
    ClientHealth,
    ClientMonitor,
    MetricsScraper,
    SaturationLimits,
    ServerMetrics,
)
from realizar.loadtest.scenarios import Phase, Scenario
from realizar.loadtest.stats import Collector, RequestRecord, Summary
from realizar.loadtest.workload import RequestSpec, arrival_offsets

if TYPE_CHECKING:
    from realizar.loadtest.workers import WorkerPool

T = TypeVar("T")
_perf = time.perf_counter


class ProgressSink(Protocol):
    """Where the runner reports progress (the console's live bar, or nothing)."""

    def begin(self, label: str, total: int | None) -> None: ...

    def update(self, done: int, failed: int) -> None: ...

    def end(self) -> None: ...


class NoProgress:
    def begin(self, label: str, total: int | None) -> None:
        pass

    def update(self, done: int, failed: int) -> None:
        pass

    def end(self) -> None:
        pass


@dataclass
class PhaseResult:
    phase: Phase
    collector: Collector
    summary: Summary
    start_s: float  # from the scenario's start
    end_s: float
    start_late_s: float = 0.0  # how late the load began after its agreed start (load workers)


@dataclass
class ScenarioResult:
    scenario: Scenario
    phases: list[PhaseResult]
    overall: Summary
    overall_collector: Collector
    client_health: ClientHealth
    server_metrics: ServerMetrics
    recovery_time_s: float | None = None
    recovery_threshold_ms: float | None = None

    @property
    def valid(self) -> bool:
        return not self.client_health.saturated

    def phase(self, name: str) -> PhaseResult:
        for p in self.phases:
            if p.phase.name == name:
                return p
        raise KeyError(name)


@dataclass
class RunOptions:
    client: ClientKind = "auto"
    limits: SaturationLimits = field(default_factory=SaturationLimits)
    scrape_metrics: bool = True
    metrics_path: str = "/metrics"
    progress: ProgressSink = field(default_factory=NoProgress)
    # spread each phase over these load workers (processes or Ray actors); None: this process
    pool: WorkerPool | None = None


class _Tally:
    """Counters shared by the workers of one phase."""

    def __init__(self) -> None:
        self.done = 0
        self.failed = 0


async def _phase_load(client: Client, prepared: list[PreparedRequest], cfg: LoadTestConfig,
                      collector: Collector, monitor: ClientMonitor, tally: _Tally, share: Share = Share()) -> None:
    """Send one phase's requests (``share``'s part of them) with its load model; returns
    when all have finished. Request ``i`` keeps its place ``offsets[i]`` in the phase's one
    global schedule, so the shares of several workers add up to the one-process schedule."""
    n = cfg.request_count
    pool = len(prepared)
    t0 = collector.t0
    rate = cfg.send_rate
    concurrency = share.concurrency or cfg.concurrency
    offsets = arrival_offsets(n, rate, cfg.arrival, seed=cfg.seed, burstiness=cfg.burstiness) \
        if (rate is not None and n) else None
    # one iterator shared by this process's workers: each takes the next index of the share
    indices: Iterator[int] = iter(range(share.index, n, share.count)) if n \
        else itertools.count(share.index, share.count)

    async def one(i: int, intended: float) -> None:
        monitor.in_flight += 1
        rec: RequestRecord = await client.send(prepared[i % pool], i, intended)
        monitor.in_flight -= 1
        collector.add(rec)
        tally.done += 1
        if rec.failure is not None:
            tally.failed += 1

    if not cfg.open_loop:
        stop_at = t0 + cfg.duration if (cfg.duration is not None and n == 0) else math.inf

        async def worker() -> None:
            for i in indices:
                if _perf() >= stop_at:
                    return
                if offsets is not None:
                    target = t0 + offsets[i]
                    delay = target - _perf()
                    if delay > 0:  # on time: a late wake-up is the client's lag
                        await asyncio.sleep(delay)
                        monitor.dispatch_lag(_perf() - target)
                    # else the worker was busy past the slot: the server's latency, charged
                    # to the request through its intended start
                    await one(i, target)
                else:
                    await one(i, _perf())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return

    assert offsets is not None
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def capped(i: int, intended: float) -> None:
        try:
            await one(i, intended)
        finally:
            slots.release()

    ready = t0  # when the dispatcher last got a free slot
    for sent, i in enumerate(indices):
        target = t0 + offsets[i]
        delay = target - _perf()
        if delay > 0:
            await asyncio.sleep(delay)
        elif sent % 64 == 0:
            await asyncio.sleep(0)  # behind schedule: still let responses in
        # the client's own lateness; time spent waiting for a slot under the in-flight
        # cap is the server's, and shows in latency from the intended start instead
        monitor.dispatch_lag(max(0.0, _perf() - max(target, ready)))
        await slots.acquire()
        ready = _perf()
        task = asyncio.get_running_loop().create_task(capped(i, target))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def _ticker(progress: ProgressSink, tally: _Tally) -> None:
    while True:
        progress.update(tally.done, tally.failed)
        await asyncio.sleep(0.1)


def prepare_phase(scenario: Scenario, phase: Phase) -> list[PreparedRequest]:
    """The phase's requests, encoded once, before its clock starts."""
    target = Target.parse(phase.config.base_url)
    return [prepare(spec, target) for spec in scenario.requests(phase.config.request_count)]


async def run_phase(scenario: Scenario, phase: Phase, monitor: ClientMonitor, options: RunOptions,
                    scenario_t0: float, *, share: Share = Share(), start_at: float | None = None,
                    prepared: list[PreparedRequest] | None = None) -> PhaseResult:
    """Run ``share``'s part of one phase. With ``start_at`` (a ``perf_counter`` time, the
    common start that a coordinator gave every load worker) the phase's clock starts
    exactly then, however late this process gets there."""
    cfg = phase.config
    client = make_client(options.client, cfg.base_url, max_connections=share.concurrency or cfg.concurrency,
                         timeout=cfg.timeout, connect_timeout=cfg.connect_timeout)
    if prepared is None:
        prepared = prepare_phase(scenario, phase)
    collector = Collector(slo=scenario.slo, seed=cfg.seed + share.index, group=scenario.group)
    tally = _Tally()
    label = scenario.title if len(scenario.phases) == 1 else f"{scenario.title}: {phase.title}"
    options.progress.begin(label, share.requests(cfg.request_count) or None)
    ticker = asyncio.get_running_loop().create_task(_ticker(options.progress, tally))
    late = 0.0
    if start_at is None:
        t0 = _perf()
    else:
        # timers may fire up to a millisecond early: wait until the start has truly come
        while (wait := start_at - _perf()) > 0:
            await asyncio.sleep(wait)
        t0 = start_at
        late = max(0.0, _perf() - start_at)
    collector.start(t0)
    try:
        await _phase_load(client, prepared, cfg, collector, monitor, tally, share)
        collector.t_end = max(collector.t_end, _perf())
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        options.progress.update(tally.done, tally.failed)
        options.progress.end()
        await client.aclose()
    return PhaseResult(phase, collector, collector.summary(), t0 - scenario_t0, collector.t_end - scenario_t0, late)


def recovery_time(baseline: PhaseResult, spike: PhaseResult, recovery: PhaseResult,
                  window: int = 3) -> tuple[float | None, float]:
    """Seconds from the end of the spike until the recovery phase's latency is back
    near the baseline: the end of the first of ``window`` consecutive successful
    recovery requests (in completion order) at or under the threshold
    ``max(2 x baseline p95, baseline p95 + 5 ms)``. None if it never got there."""
    p95 = baseline.summary.latency.p95_ms / 1e3
    threshold = max(2.0 * p95, p95 + 0.005)
    timeline = recovery.collector.timeline()
    if not timeline:
        return None, threshold * 1e3
    w = min(window, len(timeline))
    gap = recovery.collector.t0 - spike.collector.t_end
    for k in range(len(timeline) - w + 1):
        lats = [lat for _, lat in timeline[k:k + w]]
        if all(not math.isnan(lat) and lat <= threshold for lat in lats):
            return max(0.0, gap + timeline[k][0]), threshold * 1e3
    return None, threshold * 1e3


async def run_scenario(scenario: Scenario, options: RunOptions | None = None) -> ScenarioResult:
    """Run every phase of ``scenario`` back to back (spread over ``options.pool``'s load
    workers when there is one)."""
    options = options or RunOptions()
    if options.pool is not None:
        from realizar.loadtest.workers import run_distributed  # the workers module builds on this one
        return await run_distributed(scenario, options, options.pool)
    monitor = ClientMonitor(options.limits)
    target = Target.parse(scenario.phases[0].config.base_url)
    scraper = MetricsScraper(target.url(options.metrics_path)) if options.scrape_metrics else None
    t0 = _perf()
    monitor.start(t0)
    if scraper is not None:
        scraper.start(t0)
    phases: list[PhaseResult] = []
    try:
        for phase in scenario.phases:
            phases.append(await run_phase(scenario, phase, monitor, options, t0))
    finally:
        health = await monitor.stop()
        metrics = await scraper.stop() if scraper is not None else ServerMetrics()
    return assemble(scenario, phases, health, metrics)


def assemble(scenario: Scenario, phases: list[PhaseResult], health: ClientHealth,
             metrics: ServerMetrics) -> ScenarioResult:
    """A scenario's result from its phases: the overall numbers and the spike's recovery."""
    if len(phases) == 1:
        overall_collector = phases[0].collector
        overall = phases[0].summary
    else:
        overall_collector = Collector(slo=scenario.slo)
        for p in phases:
            overall_collector.merge(p.collector)
        overall = overall_collector.summary()
    result = ScenarioResult(scenario, phases, overall, overall_collector, health, metrics)
    names = [p.phase.name for p in phases]
    if names == ["baseline", "spike", "recovery"]:
        result.recovery_time_s, result.recovery_threshold_ms = recovery_time(phases[0], phases[1], phases[2])
    return result


async def probe(base_url: str, path: str = "/health", timeout: float = 5.0) -> str | None:
    """None when something answers HTTP at ``base_url``; else why not."""
    target = Target.parse(base_url)
    client = make_client("auto", base_url, max_connections=1, timeout=timeout, connect_timeout=timeout)
    try:
        rec = await client.send(client.prepare(RequestSpec("GET", path)), 0, _perf())
    finally:
        await client.aclose()
    if rec.status == 0:
        return f"no server answers at {target.url(path)}: {rec.error}"
    return None


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on uvloop (plain asyncio where uvloop is missing)."""
    async def main() -> T:
        return await make()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(main())
    return uvloop.run(main())
