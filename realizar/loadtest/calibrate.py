"""``realizar loadtest calibrate``: this client's own ceiling on this machine.

It starts the built-in no-op server in a child process, then drives it through
the same runner, client and statistics the real scenarios use, and reports
requests/s on ``GET /health`` and SSE events/s on a long stream. A server
measured near these numbers is being measured by a saturated client.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from realizar.loadtest.client import ClientKind
from realizar.loadtest.config import LoadTestConfig
from realizar.loadtest.monitor import SaturationLimits
from realizar.loadtest.runner import RunOptions, run_scenario
from realizar.loadtest.scenarios import Phase, Scenario, health_request
from realizar.loadtest.workload import RequestSpec, ResponseKind


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def noop_server() -> Iterator[str]:
    """The no-op server in a child process; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "realizar.loadtest.noop_server", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"the no-op server did not start (said {line!r})")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _sse_request(events: int) -> RequestSpec:
    return RequestSpec("GET", f"/sse?n={events}", None, ResponseKind.SSE_NATIVE)


async def calibrate(url: str, *, duration: float, concurrency: int, stream_concurrency: int,
                    events_per_stream: int, clients: tuple[ClientKind, ...]) -> list[CalibrationResult]:
    out = []
    options_limits = SaturationLimits()
    for client in clients:
        options = RunOptions(client=client, limits=options_limits, scrape_metrics=False)
        for what, request, conc in (("requests", health_request, concurrency),
                                    ("sse_events", lambda _i: _sse_request(events_per_stream), stream_concurrency)):
            cfg = LoadTestConfig(concurrency=conc, total_requests=0, duration=duration, base_url=url, timeout=30.0)
            scenario = Scenario(f"calibrate_{what}", f"calibrate {what} ({client})", "",
                                (Phase("main", what, cfg),), request)
            result = await run_scenario(scenario, options)
            s = result.overall
            count = s.output_tokens if what == "sse_events" else s.total_requests
            lat = s.itl if (what == "sse_events" and s.itl is not None) else s.latency
            out.append(CalibrationResult(client, what, conc, s.duration_s, s.total_requests,
                                         round(count / s.duration_s, 1), lat.p50_ms, lat.p99_ms, s.failures,
                                         result.client_health.cpu_max_pct))
    return out


def format_calibration(results: list[CalibrationResult]) -> str:
    lines = ["=== Client calibration (built-in no-op server) ===",
             f"{'client':<10}{'measure':<20}{'rate':>18}{'conc':>6}{'p50':>11}{'p99':>11}{'failed':>8}"]
    for r in results:
        unit = "req/s" if r.what == "requests" else "events/s"
        label = "GET /health" if r.what == "requests" else "SSE events (ITL)"
        lines.append(f"{r.client:<10}{label:<20}{f'{r.per_second:,.0f} {unit}':>18}{r.concurrency:>6}"
                     f"{r.p50_ms:>9.3f}ms{r.p99_ms:>9.3f}ms{r.failures:>8}")
    lines.append("A server measured close to these rates is limited by this client, not by itself.")
    return "\n".join(lines) + "\n"
