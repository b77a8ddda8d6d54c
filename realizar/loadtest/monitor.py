"""The client watching itself, and the server's /metrics scraped during a run.

``ClientMonitor`` samples, every second: event-loop lag (from a 10 ms ticker),
dispatch lag (how late scheduled sends went out), this process's CPU and the
requests in flight. If the client was the bottleneck the run is invalid: its
numbers describe the client, not the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import psutil

from realizar.loadtest.stats import nearest_rank

_TICK = 0.01


@dataclass(frozen=True)
class SaturationLimits:
    """When the client counts as saturated. Loop and dispatch lag are p99s over the
    run; CPU is the share of one-second samples at or above ``cpu_pct``."""

    loop_lag_p99_ms: float = 50.0
    dispatch_lag_p99_ms: float = 50.0
    cpu_pct: float = 95.0
    cpu_busy_fraction: float = 0.5
    min_cpu_samples: int = 3
    # with several load workers: one whose achieved rate, relative to its schedule (or its
    # share of the connections), falls below this fraction of the best other worker's
    worker_rate_fraction: float = 0.75
    min_worker_requests: int = 100  # fewer requests than this in a share: too noisy to judge


@dataclass
class ClientHealth:
    series: list[dict[str, float]] = field(default_factory=list)
    loop_lag_p99_ms: float = 0.0
    loop_lag_max_ms: float = 0.0
    dispatch_lag_p99_ms: float = 0.0
    dispatch_lag_max_ms: float = 0.0
    cpu_max_pct: float = 0.0
    saturated: bool = False
    reasons: list[str] = field(default_factory=list)
    # one row per load worker and phase when the load was spread over workers (empty in one process)
    workers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ClientMonitor:
    """Run ``start()`` before the load and ``stop()`` after it."""

    def __init__(self, limits: SaturationLimits | None = None) -> None:
        self.limits = limits or SaturationLimits()
        self.in_flight = 0
        self._t0 = 0.0
        self._lags: list[float] = []
        self._dispatch: list[float] = []
        self._sec_lags: list[float] = []
        self._sec_dispatch: list[float] = []
        self._series: list[dict[str, float]] = []
        self._task: asyncio.Task[None] | None = None
        self._proc = psutil.Process()

    def dispatch_lag(self, seconds: float) -> None:
        """How late a scheduled send went out (called by the load models)."""
        self._sec_dispatch.append(seconds)

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._proc.cpu_percent(None)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        next_second = time.perf_counter() + 1.0
        while True:
            before = time.perf_counter()
            await asyncio.sleep(_TICK)
            now = time.perf_counter()
            self._sec_lags.append(max(0.0, now - before - _TICK))
            if now >= next_second:
                self._sample(now)
                next_second += 1.0

    def _sample(self, now: float) -> None:
        lags = sorted(self._sec_lags)
        disp = sorted(self._sec_dispatch)
        self._series.append({
            "t": round(now - self._t0, 3),
            "loop_lag_max_ms": round((lags[-1] if lags else 0.0) * 1e3, 3),
            "loop_lag_p99_ms": round(nearest_rank(lags, 99) * 1e3, 3),
            "dispatch_lag_max_ms": round((disp[-1] if disp else 0.0) * 1e3, 3),
            "dispatch_lag_p99_ms": round(nearest_rank(disp, 99) * 1e3, 3),
            "cpu_pct": float(self._proc.cpu_percent(None)),
            "in_flight": float(self.in_flight),
        })
        self._lags.extend(self._sec_lags)
        self._dispatch.extend(self._sec_dispatch)
        self._sec_lags = []
        self._sec_dispatch = []

    async def stop(self) -> ClientHealth:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sec_lags or self._sec_dispatch:
            self._sample(time.perf_counter())
        return self.health()

    def health(self) -> ClientHealth:
        lims = self.limits
        lags = sorted(self._lags)
        disp = sorted(self._dispatch)
        # the last partial-second CPU sample is noisy; judge CPU on full seconds only
        cpus = [row["cpu_pct"] for row in self._series[:-1]] if len(self._series) > 1 else []
        out = ClientHealth(
            series=list(self._series),
            loop_lag_p99_ms=round(nearest_rank(lags, 99) * 1e3, 3),
            loop_lag_max_ms=round((lags[-1] if lags else 0.0) * 1e3, 3),
            dispatch_lag_p99_ms=round(nearest_rank(disp, 99) * 1e3, 3),
            dispatch_lag_max_ms=round((disp[-1] if disp else 0.0) * 1e3, 3),
            cpu_max_pct=max(cpus, default=0.0),
        )
        if out.loop_lag_p99_ms > lims.loop_lag_p99_ms:
            out.reasons.append(f"event-loop lag p99 {out.loop_lag_p99_ms:.1f} ms > {lims.loop_lag_p99_ms:g} ms")
        if out.dispatch_lag_p99_ms > lims.dispatch_lag_p99_ms:
            out.reasons.append(
                f"dispatch lag p99 {out.dispatch_lag_p99_ms:.1f} ms > {lims.dispatch_lag_p99_ms:g} ms")
        if len(cpus) >= lims.min_cpu_samples:
            busy = sum(1 for c in cpus if c >= lims.cpu_pct) / len(cpus)
            if busy >= lims.cpu_busy_fraction:
                out.reasons.append(f"client CPU >= {lims.cpu_pct:g}% in {busy:.0%} of the seconds")
        out.saturated = bool(out.reasons)
        return out


# ---------------------------------------------------------------- server /metrics

# canonical name -> the series that carry it on realizar, vLLM and llama.cpp
WATCHED_SERIES: dict[str, tuple[str, ...]] = {
    "num_requests_running": ("realizar_num_requests_running", "vllm:num_requests_running",
                             "llamacpp:requests_processing"),
    "num_requests_waiting": ("realizar_num_requests_waiting", "vllm:num_requests_waiting",
                             "llamacpp:requests_deferred"),
    "kv_cache_usage_ratio": ("realizar_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc",
                             "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio"),
    # prompt tokens looked up in the prefix cache, and those found there (counters)
    "prefix_cache_queries": ("realizar_prefix_cache_queries_total", "vllm:prefix_cache_queries_total",
                             "vllm:prefix_cache_queries"),
    "prefix_cache_hits": ("realizar_prefix_cache_hits_total", "vllm:prefix_cache_hits_total",
                          "vllm:prefix_cache_hits"),
}
_SOURCE = {name: canon for canon, names in WATCHED_SERIES.items() for name in names}


def parse_prometheus(text: str) -> dict[str, float]:
    """The watched gauges from a Prometheus text exposition, under their canonical
    names. Label sets are summed for counts and maxed for usage ratios."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_end = len(line)
        for sep in ("{", " "):
            i = line.find(sep)
            if 0 < i < name_end:
                name_end = i
        canon = _SOURCE.get(line[:name_end])
        if canon is None:
            continue
        parts = line[line.rfind("}") + 1:].split() if "}" in line else line[name_end:].split()
        try:
            value = float(parts[0])
        except (IndexError, ValueError):
            continue
        if canon == "kv_cache_usage_ratio":
            out[canon] = max(out.get(canon, 0.0), value)
        else:
            out[canon] = out.get(canon, 0.0) + value
    return out


@dataclass
class ServerMetrics:
    available: bool = False
    url: str = ""
    samples: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prefix_cache_hit_rate": self.prefix_cache_hit_rate()}

    def prefix_cache_hit_rate(self) -> float | None:
        """The share of prompt tokens the server found in its prefix cache during the run, from its
        counters' growth between the first and the last sample; None when it exposes none."""
        counted = [s for s in self.samples if "prefix_cache_queries" in s and "prefix_cache_hits" in s]
        if len(counted) < 2:
            return None
        queries = counted[-1]["prefix_cache_queries"] - counted[0]["prefix_cache_queries"]
        hits = counted[-1]["prefix_cache_hits"] - counted[0]["prefix_cache_hits"]
        return hits / queries if queries > 0 else None


class MetricsScraper:
    """Scrapes ``GET /metrics`` once a second on its own connection, and once more
    at the end, so even a sub-second scenario gets a sample."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        self.result = ServerMetrics(url=url)
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._t0 = 0.0
        self._gone = False  # the server has no /metrics: stop asking

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(self.interval, 2.0)),
                                              connector=aiohttp.TCPConnector(limit=1))
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _scrape(self) -> None:
        assert self._session is not None
        t = time.perf_counter() - self._t0
        try:
            async with self._session.get(self.result.url) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            if not self.result.samples:
                self.result.error = str(exc) or type(exc).__name__
                self._gone = True
            return
        self.result.available = True
        self.result.samples.append({"t": round(t, 3), **parse_prometheus(text)})

    async def _run(self) -> None:
        while not self._gone:
            await self._scrape()
            await asyncio.sleep(self.interval)

    async def stop(self) -> ServerMetrics:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            if not self._gone:
                await self._scrape()
            await self._session.close()
        return self.result
