"""Spreading the load client over several load workers: processes on this machine,
or Ray actors anywhere in a Ray cluster.

One Python process tops out at one core's worth of requests; past that, the client,
not the server, sets the numbers. With ``--workers N`` the coordinator (the
``realizar loadtest`` process) runs every phase on N workers at once:

1. it cuts the phase into shares (``LoadTestConfig.split``): worker k of N takes the
   requests k, k + N, ... of the phase's one global schedule, over its part of the
   connections, so the shares together send what one process would;
2. every worker encodes its requests, says it is ready, and gets one start time on
   the wall clock, which it turns into its own monotonic clock: all shares run on
   the same absolute schedule;
3. each worker watches itself (event-loop lag, dispatch lag, CPU) and sends back its
   collector; the coordinator merges them exactly (counts add, exact samples or HDR
   histograms combine, so percentiles are those of every request pooled) into one
   result, one report, one JSON, one HTML, shaped as a one-process run's;
4. the self-check flags any worker that saturated, started late, or fell behind the
   others (its achieved rate against its schedule or its share of the connections).

Processes (``multiprocessing`` spawn) are the default; ``--ray-address`` uses Ray
actors instead (Ray is optional and imported only then).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any, Protocol

from realizar.loadtest.client import ClientKind, PreparedRequest, Target
from realizar.loadtest.config import Share
from realizar.loadtest.monitor import (
    ClientHealth,
    ClientMonitor,
    MetricsScraper,
    SaturationLimits,
    ServerMetrics,
)
from realizar.loadtest.runner import (
    PhaseResult,
    RunOptions,
    ScenarioResult,
    assemble,
    prepare_phase,
    run_phase,
    run_sync,
)
from realizar.loadtest.scenarios import Scenario
from realizar.loadtest.stats import Collector

_perf = time.perf_counter
Progress = Callable[[int, int], None]  # (requests done, of which failed), summed over the workers
PROCESS_START_LEAD_S = 0.1  # from "go" to the common start: a pipe message and a new event loop
RAY_START_LEAD_S = 0.5  # a remote call per actor, perhaps on other nodes
RAY_PLACEMENT_TIMEOUT_S = 60.0


class WorkerError(RuntimeError):
    """A load worker could not be started, or failed during a run."""


@dataclass(frozen=True)
class ShareJob:
    """What one worker runs: ``share`` of phase ``phase_index`` of ``scenario``."""

    scenario: Scenario
    phase_index: int
    share: Share
    client: ClientKind
    limits: SaturationLimits


@dataclass
class ShareResult:
    """What one worker measured of its share, on its own clock (``collector.t0`` is its
    ``perf_counter`` at the common start)."""

    share: Share
    collector: Collector
    health: ClientHealth
    start_late_s: float
    host: str
    pid: int


class WorkerPool(Protocol):
    """Load workers that run the shares of a phase together."""

    size: int
    kind: str  # "processes" or "ray"

    def start(self) -> None: ...

    def close(self) -> None: ...

    async def run(self, jobs: list[ShareJob], progress: Progress) -> tuple[list[ShareResult], float]:
        """Run ``jobs`` (job k on worker ``jobs[k].share.index``) from one common start;
        returns their results and that start on this process's ``perf_counter``."""
        ...

    def describe(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------- the worker side

class _Relay:
    """The progress sink inside a worker: keeps the counts and hands them on."""

    def __init__(self, runner: ShareRunner, report: Progress | None) -> None:
        self.runner = runner
        self.report = report

    def begin(self, label: str, total: int | None) -> None:
        pass

    def update(self, done: int, failed: int) -> None:
        if (done, failed) != (self.runner.done, self.runner.failed):
            self.runner.done, self.runner.failed = done, failed
            if self.report is not None:
                self.report(done, failed)

    def end(self) -> None:
        pass


class ShareRunner:
    """One load worker, in a process or a Ray actor: ``prepare`` a share (encode its
    requests), then ``run`` it from the common start time."""

    def __init__(self) -> None:
        self._job: ShareJob | None = None
        self._prepared: list[PreparedRequest] | None = None
        self.done = 0
        self.failed = 0

    def where(self) -> tuple[str, int]:
        return socket.gethostname(), os.getpid()

    def prepare(self, job: ShareJob) -> None:
        self._job = job
        self._prepared = prepare_phase(job.scenario, job.scenario.phases[job.phase_index])
        self.done = self.failed = 0

    def progress(self) -> tuple[int, int]:
        return self.done, self.failed

    def run(self, start_at: float, report: Progress | None = None) -> ShareResult:
        """Run the prepared share from ``start_at`` (wall-clock seconds, ``time.time()``)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return run_sync(lambda: self._run(start_at, report))
        # a Ray actor's method thread already runs an event loop: the load gets a thread and loop of its own
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loadtest-share") as pool:
            return pool.submit(run_sync, lambda: self._run(start_at, report)).result()

    async def _run(self, start_at: float, report: Progress | None) -> ShareResult:
        job, prepared = self._job, self._prepared
        if job is None or prepared is None:
            raise RuntimeError("run() before prepare()")
        self._prepared = None
        # the wall clock is what the workers share; the monotonic clock is what we measure with
        start = _perf() + (start_at - time.time())
        monitor = ClientMonitor(job.limits)
        monitor.start(start)
        options = RunOptions(client=job.client, limits=job.limits, scrape_metrics=False,
                             progress=_Relay(self, report))
        try:
            phase = await run_phase(job.scenario, job.scenario.phases[job.phase_index], monitor, options, start,
                                    share=job.share, start_at=start, prepared=prepared)
        finally:
            health = await monitor.stop()
        host, pid = self.where()
        return ShareResult(job.share, phase.collector, health, phase.start_late_s, host, pid)


def _process_main(conn: Connection) -> None:
    """A worker process: answer the coordinator's messages until it says stop (None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    runner = ShareRunner()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        except Exception:  # a job that does not unpickle here
            conn.send(("error", traceback.format_exc()))
            continue
        if msg is None:
            return
        kind, payload = msg
        try:
            if kind == "prepare":
                runner.prepare(payload)
                conn.send(("ready", runner.where()))
            elif kind == "go":
                result = runner.run(payload, lambda done, failed: conn.send(("progress", (done, failed))))
                conn.send(("result", result))
            else:
                conn.send(("error", f"unknown message {kind!r}"))
        except Exception:
            conn.send(("error", traceback.format_exc()))


# ---------------------------------------------------------------- processes

class ProcessPool:
    """Worker processes on this machine (multiprocessing, spawn: no state inherited by fork)."""

    kind = "processes"

    def __init__(self, size: int, *, start_lead_s: float = PROCESS_START_LEAD_S) -> None:
        if size < 1:
            raise ValueError(f"workers must be >= 1, got {size}")
        self.size = size
        self.start_lead_s = start_lead_s
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[Connection] = []
        self._broken = False
        # one thread per worker blocks in recv(), so no worker ever waits on a full pipe
        self._io = ThreadPoolExecutor(max_workers=size, thread_name_prefix="loadtest-worker-io")

    def describe(self) -> dict[str, Any]:
        return {"count": self.size, "kind": self.kind}

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        for k in range(self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_process_main, args=(child,), name=f"realizar-loadtest-worker-{k}",
                               daemon=True)
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():  # pragma: no cover - a worker stuck past SIGTERM
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        self._io.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ProcessPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _recv(self, k: int) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        try:
            kind, payload = await loop.run_in_executor(self._io, self._conns[k].recv)
        except (EOFError, OSError):
            raise WorkerError(f"load worker {k} exited (exit code {self._procs[k].exitcode})") from None
        if kind == "error":
            raise WorkerError(f"load worker {k} failed:\n{payload}")
        return str(kind), payload

    async def _send(self, k: int, msg: tuple[str, Any]) -> None:
        try:
            # a large scenario fills the pipe; the worker drains it while we wait off the loop
            await asyncio.get_running_loop().run_in_executor(self._io, self._conns[k].send, msg)
        except OSError:
            raise WorkerError(f"load worker {k} is gone (exit code {self._procs[k].exitcode})") from None

    async def run(self, jobs: list[ShareJob], progress: Progress) -> tuple[list[ShareResult], float]:
        if not self._procs:
            raise WorkerError("the worker pool is not started")
        if self._broken:
            raise WorkerError("a load worker failed earlier; this pool's workers are out of step")
        try:
            return await self._run(jobs, progress)
        except BaseException:
            self._broken = True  # answers may still be in flight: never read them as the next phase's
            raise

    async def _run(self, jobs: list[ShareJob], progress: Progress) -> tuple[list[ShareResult], float]:
        workers = [job.share.index for job in jobs]
        await asyncio.gather(*(self._send(k, ("prepare", job)) for k, job in zip(workers, jobs, strict=True)))
        for k in workers:
            kind, _ = await self._recv(k)
            if kind != "ready":
                raise WorkerError(f"load worker {k} said {kind!r} where 'ready' was due")
        start_at = time.time() + self.start_lead_s
        t0 = _perf() + self.start_lead_s
        for k in workers:
            await self._send(k, ("go", start_at))
        counts = {k: (0, 0) for k in workers}

        async def drain(k: int) -> ShareResult:
            while True:
                kind, payload = await self._recv(k)
                if kind == "progress":
                    counts[k] = payload
                    progress(sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()))
                elif kind == "result":
                    assert isinstance(payload, ShareResult)
                    return payload

        return list(await asyncio.gather(*(drain(k) for k in workers))), t0


# ---------------------------------------------------------------- Ray actors

def import_ray() -> ModuleType:
    """Ray, or a clear error: it is an optional dependency."""
    try:
        import ray
    except ImportError:
        raise WorkerError("--ray-address needs Ray, which is not installed: pip install 'ray[default]' "
                          "(or run without --ray-address to use worker processes)") from None
    return ray


class RayPool:
    """Load workers as Ray actors, one CPU each, spread over the cluster's nodes. Every node
    must be able to import realizar (the same environment as this process)."""

    kind = "ray"

    def __init__(self, size: int, address: str | None, *, start_lead_s: float = RAY_START_LEAD_S,
                 num_cpus: float = 1.0, placement_timeout_s: float = RAY_PLACEMENT_TIMEOUT_S) -> None:
        if size < 1:
            raise ValueError(f"workers must be >= 1, got {size}")
        self.size = size
        self.address = address
        self.start_lead_s = start_lead_s
        self.num_cpus = num_cpus
        self.placement_timeout_s = placement_timeout_s
        self._ray: ModuleType | None = None
        self._actors: list[Any] = []
        self._started_ray = False
        self.hosts: list[str] = []

    def describe(self) -> dict[str, Any]:
        return {"count": self.size, "kind": self.kind, "ray_address": self.address, "hosts": self.hosts}

    def start(self) -> None:
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, logging_level="warning", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise WorkerError(f"cannot join the Ray cluster at {self.address!r}: {exc}") from None
            self._started_ray = True
        actor_cls = ray.remote(num_cpus=self.num_cpus, max_concurrency=2)(ShareRunner)  # run + progress at once
        self._actors = [actor_cls.options(scheduling_strategy="SPREAD").remote() for _ in range(self.size)]
        refs = [actor.where.remote() for actor in self._actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.placement_timeout_s)
        if len(ready) < len(refs):
            cpus = ray.cluster_resources().get("CPU", 0)
            self.close()
            raise WorkerError(f"Ray placed {len(ready)} of {self.size} load workers within "
                              f"{self.placement_timeout_s:g} s (each asks for {self.num_cpus:g} CPU; "
                              f"the cluster has {cpus:g})")
        try:
            self.hosts = [f"{host}:{pid}" for host, pid in ray.get(refs)]
        except ray.exceptions.RayError as exc:
            self.close()
            raise WorkerError(f"a Ray load worker failed to start: {exc}") from None

    def close(self) -> None:
        ray = self._ray
        if ray is None:
            return
        for actor in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self._actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> RayPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _get(self, ref: Any) -> Any:
        assert self._ray is not None
        try:
            return await asyncio.wrap_future(ref.future())
        except self._ray.exceptions.RayError as exc:
            raise WorkerError(f"a Ray load worker failed: {exc}") from None

    async def run(self, jobs: list[ShareJob], progress: Progress) -> tuple[list[ShareResult], float]:
        if not self._actors:
            raise WorkerError("the Ray workers are not started")
        actors = [self._actors[job.share.index] for job in jobs]
        await asyncio.gather(*(self._get(a.prepare.remote(job)) for a, job in zip(actors, jobs, strict=True)))
        start_at = time.time() + self.start_lead_s
        t0 = _perf() + self.start_lead_s
        runs = [asyncio.ensure_future(self._get(a.run.remote(start_at))) for a in actors]
        while True:
            _, pending = await asyncio.wait(runs, timeout=0.25)
            if not pending:
                break
            counts = await asyncio.gather(*(self._get(a.progress.remote()) for a in actors))
            progress(sum(c[0] for c in counts), sum(c[1] for c in counts))
        return list(await asyncio.gather(*runs)), t0


def make_pool(workers: int, ray_address: str | None) -> WorkerPool | None:
    """Ray actors with an address, worker processes for more than one worker, else None
    (the load runs in this process, as it always has)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if ray_address:
        return RayPool(workers, ray_address)
    return ProcessPool(workers) if workers > 1 else None


# ---------------------------------------------------------------- the coordinator

async def run_distributed(scenario: Scenario, options: RunOptions, pool: WorkerPool) -> ScenarioResult:
    """``run_scenario`` over ``pool``'s workers: each phase split into shares, run from one
    common start, merged exactly; the server's /metrics are scraped from here."""
    target = Target.parse(scenario.phases[0].config.base_url)
    scraper = MetricsScraper(target.url(options.metrics_path)) if options.scrape_metrics else None
    t0 = _perf()
    if scraper is not None:
        scraper.start(t0)
    parts: list[tuple[PhaseResult, list[ShareResult]]] = []
    try:
        for k, phase in enumerate(scenario.phases):
            cfg = phase.config
            jobs = [ShareJob(scenario, k, share, options.client, options.limits) for share in cfg.split(pool.size)]
            label = scenario.title if len(scenario.phases) == 1 else f"{scenario.title}: {phase.title}"
            options.progress.begin(label, cfg.request_count or None)
            try:
                shares, phase_t0 = await pool.run(jobs, options.progress.update)
            finally:
                options.progress.end()
            collector = Collector(slo=scenario.slo, seed=cfg.seed, group=scenario.group)
            collector.start(phase_t0)
            for r in sorted(shares, key=lambda r: r.share.index):
                r.collector.rebase(phase_t0)
                collector.merge_worker(r.collector)
            options.progress.update(collector.completed, collector.completed - collector.successes)
            late = max((r.start_late_s for r in shares), default=0.0)
            parts.append((PhaseResult(phase, collector, collector.summary(), phase_t0 - t0,
                                      collector.t_end - t0, late), shares))
    finally:
        metrics = await scraper.stop() if scraper is not None else ServerMetrics()
    return assemble(scenario, [p for p, _ in parts], combine_health(parts, options.limits), metrics)


def _worker_rows(phase: PhaseResult, shares: list[ShareResult], limits: SaturationLimits,
                 label: Callable[[ShareResult], str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-worker rows of one phase and the reasons to call the run invalid: each worker's own
    self-check, a late start, and an achieved rate well behind the other workers'."""
    cfg = phase.phase.config
    n = cfg.request_count
    achieved = {id(r): r.collector.completed / r.collector.duration for r in shares}
    total_conc = sum(r.share.concurrency for r in shares) or 1
    pooled = sum(achieved.values())
    rows: list[tuple[ShareResult, dict[str, Any]]] = []
    for r in shares:
        scheduled = cfg.send_rate * r.share.requests(n) / n if (cfg.send_rate is not None and n) else None
        # unpaced: every connection sees the same server, so a worker should do its share of the pooled rate
        expected = scheduled if scheduled is not None else pooled * r.share.concurrency / total_conc
        rows.append((r, {
            "worker": r.share.index, "workers": r.share.count, "phase": phase.phase.name,
            "host": r.host, "pid": r.pid, "concurrency": r.share.concurrency,
            "requests": r.collector.completed, "failures": r.collector.completed - r.collector.successes,
            "scheduled_rps": None if scheduled is None else round(scheduled, 4),
            "achieved_rps": round(achieved[id(r)], 4),
            "rate_ratio": round(achieved[id(r)] / expected, 4) if expected > 0 else None,
            "start_late_ms": round(r.start_late_s * 1e3, 3),
            "loop_lag_p99_ms": r.health.loop_lag_p99_ms, "dispatch_lag_p99_ms": r.health.dispatch_lag_p99_ms,
            "cpu_max_pct": r.health.cpu_max_pct, "reasons": list(r.health.reasons),
        }))
    ratios: list[float | None] = [row["rate_ratio"] for _, row in rows]
    for idx, (r, row) in enumerate(rows):
        if r.start_late_s * 1e3 > limits.dispatch_lag_p99_ms:
            row["reasons"].append(f"started {r.start_late_s * 1e3:.1f} ms after the common start "
                                  f"(> {limits.dispatch_lag_p99_ms:g} ms)")
        others = [x for j, x in enumerate(ratios) if j != idx and x is not None]
        ratio = ratios[idx]
        row["behind"] = False
        if others and ratio is not None and r.collector.completed >= limits.min_worker_requests:
            best = max(others)
            if ratio < limits.worker_rate_fraction * best:
                row["behind"] = True
                row["reasons"].append(f"achieved {100 * ratio:.0f}% of its expected rate "
                                      f"({row['achieved_rps']:.1f} req/s) while another worker achieved "
                                      f"{100 * best:.0f}%: this worker was the bottleneck")
        row["saturated"] = bool(row["reasons"])
    reasons = [f"{label(r)}: {why}" for r, row in rows for why in row["reasons"]]
    return [row for _, row in rows], reasons


def combine_health(parts: list[tuple[PhaseResult, list[ShareResult]]], limits: SaturationLimits) -> ClientHealth:
    """One ``ClientHealth`` for a scenario run by several workers: the worst worker's lags and
    CPU, per-second rows merged across workers (max lag, max per-process CPU, summed in-flight),
    one row per worker and phase in ``workers``, and every worker's reasons, labelled."""
    out = ClientHealth()
    multi_phase = len(parts) > 1
    for phase, shares in parts:
        def label(r: ShareResult, name: str = phase.phase.name) -> str:
            where = f"worker {r.share.index + 1}/{r.share.count}"
            return f"{where} ({name})" if multi_phase else where

        rows, reasons = _worker_rows(phase, shares, limits, label)
        out.workers.extend(rows)
        out.reasons.extend(reasons)
        for r in shares:
            h = r.health
            out.loop_lag_p99_ms = max(out.loop_lag_p99_ms, h.loop_lag_p99_ms)
            out.loop_lag_max_ms = max(out.loop_lag_max_ms, h.loop_lag_max_ms)
            out.dispatch_lag_p99_ms = max(out.dispatch_lag_p99_ms, h.dispatch_lag_p99_ms)
            out.dispatch_lag_max_ms = max(out.dispatch_lag_max_ms, h.dispatch_lag_max_ms)
            out.cpu_max_pct = max(out.cpu_max_pct, h.cpu_max_pct)
        # every worker's monitor started at the phase's common start: row j of each is the same second
        for j in range(max((len(r.health.series) for r in shares), default=0)):
            same = [r.health.series[j] for r in shares if len(r.health.series) > j]
            out.series.append({
                "t": round(phase.start_s + max(row["t"] for row in same), 3),
                "loop_lag_max_ms": max(row["loop_lag_max_ms"] for row in same),
                "loop_lag_p99_ms": max(row["loop_lag_p99_ms"] for row in same),
                "dispatch_lag_max_ms": max(row["dispatch_lag_max_ms"] for row in same),
                "dispatch_lag_p99_ms": max(row["dispatch_lag_p99_ms"] for row in same),
                "cpu_pct": max(row["cpu_pct"] for row in same),
                "in_flight": math.fsum(row["in_flight"] for row in same),
            })
    out.saturated = bool(out.reasons)
    return out
