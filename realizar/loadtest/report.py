"""Reports: the seed's plain-text block, the targets table, the versioned JSON
document, and the live progress bar.

The text goes to stdout and its format is stable, so two runs diff line by
line; everything transient (progress, notices) goes to stderr.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import orjson

from realizar.loadtest.runner import ScenarioResult
from realizar.loadtest.scenarios import config_hash
from realizar.loadtest.stats import FAILURE_LABELS, FailureClass, Summary
from realizar.loadtest.targets import TargetResult

SCHEMA_VERSION = 1
TOOL_NAME = "realizar-loadtest"


def tool_version() -> str:
    try:
        return version("realizar")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0.0.0"


# ---------------------------------------------------------------- text

def format_block(summary: Summary) -> str:
    """The seed's result block, plus a line naming the percentile method, and the
    failure classes and generation numbers where there are any."""
    lat = summary.latency
    lines = [
        f"Total requests: {summary.total_requests}",
        f"Successes: {summary.successes}",
        f"Failures: {summary.failures}",
        f"Duration: {summary.duration_s:.2f}s",
        f"Throughput: {summary.throughput_rps:.2f} req/s",
        f"Error rate: {summary.error_rate_pct:.2f}%",
        "",
        "Latency Percentiles:",
        f"  p50: {lat.p50_ms:.2f}ms",
        f"  p95: {lat.p95_ms:.2f}ms",
        f"  p99: {lat.p99_ms:.2f}ms",
        f"  max: {lat.max_ms:.2f}ms",
        f"Percentile method: {summary.percentile_method}, successful requests",
    ]
    failed = {k: v for k, v in summary.failures_by_class.items() if v}
    if failed:
        labels = {fc.value: FAILURE_LABELS[fc] for fc in FailureClass}
        lines.append("Failures by class: " + ", ".join(f"{labels.get(k, k)}={v}" for k, v in failed.items()))
    if summary.tokens_per_s is not None:
        lines.append(f"Tokens/s: {summary.tokens_per_s:.2f} ({summary.output_tokens} tokens)")
    for name, part in (("TTFT", summary.ttft), ("TPOT", summary.tpot), ("ITL", summary.itl)):
        if part is not None and part.count:
            lines.append(f"{name}: mean {part.mean_ms:.2f}ms, p50 {part.p50_ms:.2f}ms, p99 {part.p99_ms:.2f}ms")
    return "\n".join(lines)


def format_scenario(result: ScenarioResult) -> str:
    sc = result.scenario
    if len(result.phases) == 1:
        return f"=== {sc.title} ===\n{format_block(result.overall)}\n"
    parts = [f"=== {sc.title} ==="]
    for p in result.phases:
        parts.append(f"\n=== {p.phase.title} ===\n{format_block(p.summary)}")
    if [p.phase.name for p in result.phases] == ["baseline", "spike", "recovery"]:
        if result.recovery_time_s is None:
            parts.append(f"\nRecovery time: not recovered (latency never back under "
                         f"{result.recovery_threshold_ms or 0:.2f}ms)")
        else:
            parts.append(f"\nRecovery time: {result.recovery_time_s:.2f}s "
                         f"(latency back under {result.recovery_threshold_ms or 0:.2f}ms)")
    return "\n".join(parts) + "\n"


_METRIC_LABELS = {
    "p50_ms": "p50 latency", "p90_ms": "p90 latency", "p95_ms": "p95 latency", "p99_ms": "p99 latency",
    "max_ms": "max latency", "mean_ms": "mean latency", "error_rate_pct": "error rate",
    "throughput_rps": "throughput", "tokens_per_s": "tokens/s", "goodput_rps": "goodput",
    "successful_rps": "successful req/s",
}


def metric_label(metric: str) -> str:
    phase, _, base = metric.rpartition(".")
    label = _METRIC_LABELS.get(base, base.replace("_", " "))
    return f"{label} ({phase})" if phase else label


def format_value(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if metric.endswith("_ms"):
        return f"{value:.2f}ms"
    if metric.endswith("_pct"):
        return f"{value:.2f}%"
    if metric.endswith("tokens_per_s"):
        return f"{value:.2f} tok/s"
    return f"{value:.2f} req/s"


def format_targets(results: list[TargetResult]) -> str:
    lines = ["=== Performance Targets ===",
             f"{'Scenario':<16}{'Metric':<26}{'Target':>16}{'Value':>16}  Result"]
    for r in results:
        lines.append(f"{r.scenario:<16}{metric_label(r.metric):<26}"
                     f"{r.op + ' ' + format_value(r.metric, r.threshold):>16}"
                     f"{format_value(r.metric, r.value):>16}  {'PASS' if r.passed else 'FAIL'}")
    passed = sum(r.passed for r in results)
    verdict = "PASS" if passed == len(results) else "FAIL"
    lines.append(f"Overall: {verdict} ({passed}/{len(results)} targets met)")
    return "\n".join(lines) + "\n"


def format_validity(results: list[ScenarioResult]) -> str:
    bad = [r for r in results if not r.valid]
    if not bad:
        return "Client health: OK (the client was not the bottleneck)\n"
    lines = ["INVALID RUN: the load client was the bottleneck; these numbers describe the client:"]
    for r in bad:
        lines.append(f"  {r.scenario.name}: " + "; ".join(r.client_health.reasons))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- JSON

def environment(client: str, workers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where the load came from. ``workers``: the load workers' ``describe()`` (default: this
    one process)."""
    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux/macOS
        load = []
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "client": client,
        "load_workers": workers or {"count": 1, "kind": "in-process"},
        "event_loop": f"uvloop {ver('uvloop')}" if ver("uvloop") else "asyncio",
        "aiohttp": ver("aiohttp"),
        "httptools": ver("httptools"),
        "argv": sys.argv,
    }


def scenario_doc(result: ScenarioResult, targets: list[TargetResult]) -> dict[str, Any]:
    sc = result.scenario
    described = sc.describe()
    return {
        "name": sc.name,
        "title": sc.title,
        "description": sc.description,
        "config": described,
        "config_hash": config_hash(described),
        "summary": result.overall.to_dict(),
        "phases": [{"name": p.phase.name, "title": p.phase.title, "start_s": round(p.start_s, 6),
                    "end_s": round(p.end_s, 6), "summary": p.summary.to_dict()} for p in result.phases],
        "recovery_time_s": result.recovery_time_s,
        "recovery_threshold_ms": result.recovery_threshold_ms,
        "series": _series(result),
        "timeline": _timeline(result),
        "blocks": _blocks(result),
        "latency_histogram": result.overall_collector.latency.histogram(),
        "client_health": result.client_health.to_dict(),
        "server_metrics": result.server_metrics.to_dict(),
        "targets": [t.to_dict() for t in targets],
        "valid": result.valid,
    }


def _series(result: ScenarioResult) -> list[dict[str, float]]:
    """Per-second rows on the scenario's clock (phases laid end to end)."""
    rows: list[dict[str, float]] = []
    for p in result.phases:
        for row in p.collector.series():
            rows.append({**row, "t": round(row["t"] + p.start_s, 3)})
    return rows


def _timeline(result: ScenarioResult, limit: int = 5000) -> dict[str, Any]:
    """Per-request (completion time, latency ms; None if failed) on the scenario's
    clock, keeping every ``stride``-th request so at most ``limit`` points remain;
    empty past the exact limit."""
    points = [(end + p.start_s, lat) for p in result.phases for end, lat in p.collector.timeline()]
    step = max(1, -(-len(points) // limit))
    points = points[::step]
    return {"stride": step, "t_s": [round(t, 6) for t, _ in points],
            "latency_ms": [None if math.isnan(lat) else round(lat * 1e3, 4) for _, lat in points]}


def _blocks(result: ScenarioResult) -> list[dict[str, float]]:
    out: list[dict[str, float]] = []
    for p in result.phases:
        out.extend(p.collector.blocks())
    return out


def build_report(results: list[ScenarioResult], target_results: list[TargetResult], *, kind: str,
                 base_url: str, config: dict[str, Any], client: str, exit_code: int,
                 invalid_reasons: list[str] | None = None, extra: dict[str, Any] | None = None,
                 workers: dict[str, Any] | None = None) -> dict[str, Any]:
    """The versioned JSON document (``schema_version``) that compare and the HTML read
    (``workers``: how the load was spread, see ``environment``)."""
    reasons = list(invalid_reasons or [])
    for r in results:
        reasons.extend(f"{r.scenario.name}: {why}" for why in r.client_health.reasons)
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": TOOL_NAME, "version": tool_version()},
        "kind": kind,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_url": base_url,
        "config": config,
        "config_hash": config_hash(config),
        "environment": environment(client, workers),
        "valid": not reasons,
        "invalid_reasons": reasons,
        "scenarios": {r.scenario.name: scenario_doc(r, [t for t in target_results if t.scenario == r.scenario.name])
                      for r in results},
        "targets": {"passed": all(t.passed for t in target_results),
                    "results": [t.to_dict() for t in target_results]},
        "exit_code": exit_code,
    }
    if extra:
        doc.update(extra)
    return doc


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema_version": int, "tool": dict, "kind": str, "created_at": str, "base_url": str, "config": dict,
    "config_hash": str, "environment": dict, "valid": bool, "invalid_reasons": list, "scenarios": dict,
    "targets": dict, "exit_code": int,
}
_SCENARIO_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "name": str, "title": str, "config": dict, "config_hash": str, "summary": dict, "phases": list,
    "series": list, "blocks": list, "latency_histogram": dict, "client_health": dict,
    "server_metrics": dict, "targets": list, "valid": bool,
}
_SUMMARY_REQUIRED = ("total_requests", "successes", "failures", "duration_s", "throughput_rps",
                     "error_rate_pct", "latency", "service_latency", "failures_by_class", "percentile_method")


def validate_report(doc: Any) -> list[str]:
    """Schema problems in a report document (empty when it conforms)."""
    errors: list[str] = []

    def need(obj: Any, spec: dict[str, type | tuple[type, ...]], where: str) -> None:
        if not isinstance(obj, dict):
            errors.append(f"{where} is not an object")
            return
        for key, typ in spec.items():
            if key not in obj:
                errors.append(f"{where}.{key} is missing")
            elif not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
                errors.append(f"{where}.{key} should be {getattr(typ, '__name__', typ)}")

    need(doc, _REQUIRED, "report")
    if errors:
        return errors
    if doc["schema_version"] != SCHEMA_VERSION:
        errors.append(f"schema_version {doc['schema_version']} is not {SCHEMA_VERSION}")
    need(doc["tool"], {"name": str, "version": str}, "report.tool")
    for name, sc in doc["scenarios"].items():
        need(sc, _SCENARIO_REQUIRED, f"scenarios.{name}")
        if not isinstance(sc, dict) or not isinstance(sc.get("summary"), dict):
            continue
        for key in _SUMMARY_REQUIRED:
            if key not in sc["summary"]:
                errors.append(f"scenarios.{name}.summary.{key} is missing")
        lat = sc["summary"].get("latency")
        if isinstance(lat, dict):
            for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "method"):
                if key not in lat:
                    errors.append(f"scenarios.{name}.summary.latency.{key} is missing")
        for phase in sc.get("phases") or []:
            if not isinstance(phase, dict) or not {"name", "summary", "start_s", "end_s"} <= set(phase):
                errors.append(f"scenarios.{name}.phases has a malformed phase")
    targets = doc["targets"]
    if not isinstance(targets.get("passed"), bool) or not isinstance(targets.get("results"), list):
        errors.append("report.targets needs passed (bool) and results (list)")
    return errors


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def read_json(path: str | Path) -> dict[str, Any]:
    doc = orjson.loads(Path(path).read_bytes())
    if not isinstance(doc, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return doc


# ---------------------------------------------------------------- live progress

class ConsoleProgress:
    """A rich progress bar on stderr, one task per phase."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("failed: {task.fields[failed]}"), TimeElapsedColumn(),
                                  console=Console(stderr=True), transient=False,
                                  redirect_stdout=False, redirect_stderr=False)
        self._task: Any = None

    def begin(self, label: str, total: int | None) -> None:
        if self._task is None:
            self._progress.start()
        self._task = self._progress.add_task(label, total=total, failed=0)

    def update(self, done: int, failed: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=done, failed=failed)

    def end(self) -> None:
        pass

    def close(self) -> None:
        if self._task is not None:
            self._progress.stop()
