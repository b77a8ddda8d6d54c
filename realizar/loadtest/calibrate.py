"""``realizar loadtest calibrate``: this client's own ceiling on this machine.

It starts the built-in no-op server in a child process, then drives it through
the same runner, client and statistics the real scenarios use, and reports
requests/s on ``GET /health`` and SSE events/s on a long stream. A server
measured near these numbers is being measured by a saturated client.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from realizar.loadtest.client import ClientKind
from realizar.loadtest.config import LoadTestConfig
from realizar.loadtest.monitor import SaturationLimits
from realizar.loadtest.runner import RunOptions, run_scenario
from realizar.loadtest.scenarios import Phase, Scenario, health_request
from realizar.loadtest.workload import RequestSpec, ResponseKind

if TYPE_CHECKING:
    from realizar.loadtest.workers import WorkerPool


@dataclass(frozen=True)
class CalibrationResult:
    client: str
    what: str  # "requests" or "sse_events"
    concurrency: int
    duration_s: float
    requests: int
    per_second: float
    p50_ms: float
    p99_ms: float
    failures: int
    cpu_max_pct: float
    workers: int = 1
    # per worker (with --workers): its requests/s, or events/s for the SSE measure
    worker_rates: tuple[float, ...] = ()
    # workers (0-based) that fell well behind the others: the total is held back by them
    workers_behind: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def noop_server(processes: int = 1) -> Iterator[str]:
    """The no-op server in child processes (sharing one port with SO_REUSEPORT when more
    than one); yields its base URL."""
    procs: list[subprocess.Popen[str]] = []

    def spawn(port: int) -> int:
        argv = [sys.executable, "-m", "realizar.loadtest.noop_server", "--port", str(port)]
        proc = subprocess.Popen(argv + (["--reuse-port"] if processes > 1 else []), stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"the no-op server did not start (said {line!r})")
        return int(line.split()[1])

    try:
        port = spawn(0)
        for _ in range(processes - 1):
            spawn(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        for proc in procs:
            _stop(proc)


def _sse_request(events: int, _index: int = 0) -> RequestSpec:
    return RequestSpec("GET", f"/sse?n={events}", None, ResponseKind.SSE_NATIVE)


async def calibrate(url: str, *, duration: float, concurrency: int, stream_concurrency: int,
                    events_per_stream: int, clients: tuple[ClientKind, ...],
                    pool: WorkerPool | None = None) -> list[CalibrationResult]:
    """The client's ceilings; with ``pool``, of all its load workers together (each takes
    its share of the connections)."""
    out = []
    options_limits = SaturationLimits()
    for client in clients:
        options = RunOptions(client=client, limits=options_limits, scrape_metrics=False, pool=pool)
        for what, request, conc in (("requests", health_request, concurrency),
                                    ("sse_events", functools.partial(_sse_request, events_per_stream),
                                     stream_concurrency)):
            cfg = LoadTestConfig(concurrency=conc, total_requests=0, duration=duration, base_url=url, timeout=30.0)
            scenario = Scenario(f"calibrate_{what}", f"calibrate {what} ({client})", "",
                                (Phase("main", what, cfg),), request)
            result = await run_scenario(scenario, options)
            s = result.overall
            count = s.output_tokens if what == "sse_events" else s.total_requests
            lat = s.itl if (what == "sse_events" and s.itl is not None) else s.latency
            # a worker's events/s are its requests/s times the events in each stream
            per = events_per_stream if what == "sse_events" else 1
            rows = result.client_health.workers
            rates = tuple(round(w["achieved_rps"] * per, 1) for w in rows)
            behind = tuple(w["worker"] for w in rows if w["behind"])
            out.append(CalibrationResult(client, what, conc, s.duration_s, s.total_requests,
                                         round(count / s.duration_s, 1), lat.p50_ms, lat.p99_ms, s.failures,
                                         result.client_health.cpu_max_pct, pool.size if pool else 1, rates,
                                         behind))
    return out


def format_calibration(results: list[CalibrationResult]) -> str:
    lines = ["=== Client calibration (built-in no-op server) ===",
             f"{'client':<10}{'measure':<20}{'rate':>18}{'conc':>6}{'p50':>11}{'p99':>11}{'failed':>8}"]
    for r in results:
        unit = "req/s" if r.what == "requests" else "events/s"
        label = "GET /health" if r.what == "requests" else "SSE events (ITL)"
        lines.append(f"{r.client:<10}{label:<20}{f'{r.per_second:,.0f} {unit}':>18}{r.concurrency:>6}"
                     f"{r.p50_ms:>9.3f}ms{r.p99_ms:>9.3f}ms{r.failures:>8}")
        if r.worker_rates:
            lines.append(f"{'':<10}{f'{r.workers} workers:':<20}"
                         + ", ".join(f"{rate:,.0f}" for rate in r.worker_rates) + f" {unit} each")
        if r.workers_behind:
            lines.append(f"{'':<10}worker(s) {', '.join(str(k + 1) for k in r.workers_behind)} fell well behind "
                         "the others (a starved CPU?): the total understates the ceiling")
    lines.append("A server measured close to these rates is limited by this client, not by itself.")
    return "\n".join(lines) + "\n"
