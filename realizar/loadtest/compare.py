"""``compare BASE.json NEW.json``: per scenario and metric, the delta, a noise
band, and a verdict.

The noise band is a bootstrap confidence interval over time blocks: each report
carries consecutive blocks of its run (one-second blocks for runs of 10 s or
more, else ten equal-count blocks) with their own percentiles, throughput and
error rate. Resampling whole blocks keeps the run's autocorrelation, which
resampling single requests would hide. A change is a regression only when the
interval excludes zero *and* the change is beyond the tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LOWER_IS_BETTER = ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "error_rate_pct")
HIGHER_IS_BETTER = ("throughput_rps",)
COMPARED = ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "throughput_rps", "error_rate_pct")

REGRESSION = "regression"
IMPROVEMENT = "improvement"
UNCHANGED = "no significant change"
INSUFFICIENT = "insufficient data"


@dataclass(frozen=True)
class CompareOptions:
    tolerance_pct: float = 10.0  # relative change below which a shift is not a verdict
    error_rate_tolerance_pp: float = 1.0  # error rate: absolute percentage points
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0


@dataclass(frozen=True)
class MetricDelta:
    scenario: str
    metric: str
    base: float | None
    new: float | None
    delta: float | None  # new - base, in the metric's unit
    delta_pct: float | None
    ci_low: float | None  # CI of the delta (unit for error rate, % otherwise)
    ci_high: float | None
    ci_unit: str
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Comparison:
    config_mismatches: list[str]
    warnings: list[str]
    deltas: list[MetricDelta]

    @property
    def regressions(self) -> list[MetricDelta]:
        return [d for d in self.deltas if d.verdict == REGRESSION]

    def to_dict(self) -> dict[str, Any]:
        return {"config_mismatches": self.config_mismatches, "warnings": self.warnings,
                "regressed": bool(self.regressions), "deltas": [d.to_dict() for d in self.deltas]}


def _summary_value(summary: dict[str, Any], metric: str) -> float | None:
    if metric in ("p50_ms", "p95_ms", "p99_ms", "mean_ms"):
        lat = summary.get("latency") or {}
        return float(lat[metric]) if lat.get("count") and metric in lat else None
    value = summary.get(metric)
    return None if value is None else float(value)


def bootstrap_delta(base: list[float], new: list[float], *, relative: bool, options: CompareOptions
                    ) -> tuple[float, float] | None:
    """CI of mean(new blocks) - mean(base blocks) (in % of the base mean when
    ``relative``), by resampling blocks with replacement. None with < 2 blocks a side."""
    if len(base) < 2 or len(new) < 2:
        return None
    rng = np.random.default_rng(options.seed)
    b = np.asarray(base, dtype=float)
    n = np.asarray(new, dtype=float)
    bm = b[rng.integers(0, len(b), size=(options.resamples, len(b)))].mean(axis=1)
    nm = n[rng.integers(0, len(n), size=(options.resamples, len(n)))].mean(axis=1)
    diff = nm - bm
    if relative:
        with np.errstate(divide="ignore", invalid="ignore"):
            diff = np.where(bm > 0, 100.0 * diff / bm, 0.0)
    alpha = (1.0 - options.confidence) / 2.0
    lo, hi = np.quantile(diff, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _verdict(metric: str, delta: float, delta_pct: float | None, ci: tuple[float, float] | None,
             options: CompareOptions) -> str:
    if ci is None:
        return INSUFFICIENT
    lo, hi = ci
    if metric == "error_rate_pct":
        size, tol = delta, options.error_rate_tolerance_pp
    else:
        size, tol = (delta_pct if delta_pct is not None else 0.0), options.tolerance_pct
    worse_sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
    if worse_sign * size > tol and (lo > 0 if worse_sign > 0 else hi < 0):
        return REGRESSION
    if -worse_sign * size > tol and (hi < 0 if worse_sign > 0 else lo > 0):
        return IMPROVEMENT
    return UNCHANGED


def config_mismatches(base: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(mismatches that make the comparison meaningless, softer warnings)."""
    problems: list[str] = []
    warnings: list[str] = []
    if base.get("schema_version") != new.get("schema_version"):
        problems.append(f"schema_version {base.get('schema_version')} vs {new.get('schema_version')}")
    if base.get("kind") != new.get("kind"):
        problems.append(f"report kind {base.get('kind')!r} vs {new.get('kind')!r}")
    for name in sorted(set(base.get("scenarios", {})) & set(new.get("scenarios", {}))):
        bh = base["scenarios"][name].get("config_hash")
        nh = new["scenarios"][name].get("config_hash")
        if bh != nh:
            problems.append(f"scenario {name}: configuration differs ({bh} vs {nh})")
    only = sorted(set(base.get("scenarios", {})) ^ set(new.get("scenarios", {})))
    if only:
        warnings.append(f"scenarios in one report only (skipped): {', '.join(only)}")
    benv, nenv = base.get("environment", {}), new.get("environment", {})
    for key in ("hostname", "cpu_count", "client", "python"):
        if benv.get(key) != nenv.get(key):
            warnings.append(f"environment {key} differs: {benv.get(key)} vs {nenv.get(key)}")
    for label, doc in (("base", base), ("new", new)):
        if not doc.get("valid", True):
            warnings.append(f"the {label} run is marked invalid: {'; '.join(doc.get('invalid_reasons', []))}")
    return problems, warnings


def compare_reports(base: dict[str, Any], new: dict[str, Any], options: CompareOptions | None = None) -> Comparison:
    options = options or CompareOptions()
    problems, warnings = config_mismatches(base, new)
    deltas: list[MetricDelta] = []
    for name, bsc in base.get("scenarios", {}).items():
        nsc = new.get("scenarios", {}).get(name)
        if nsc is None:
            continue
        bblocks, nblocks = bsc.get("blocks") or [], nsc.get("blocks") or []
        for metric in COMPARED:
            bv = _summary_value(bsc["summary"], metric)
            nv = _summary_value(nsc["summary"], metric)
            if bv is None or nv is None:
                deltas.append(MetricDelta(name, metric, bv, nv, None, None, None, None, "", INSUFFICIENT))
                continue
            delta = nv - bv
            delta_pct = 100.0 * delta / bv if bv else None
            relative = metric != "error_rate_pct"
            bvals = [blk[metric] for blk in bblocks if metric in blk and (blk.get("n", 1) > 0)]
            nvals = [blk[metric] for blk in nblocks if metric in blk and (blk.get("n", 1) > 0)]
            ci = bootstrap_delta(bvals, nvals, relative=relative, options=options)
            verdict = _verdict(metric, delta, delta_pct, ci, options)
            deltas.append(MetricDelta(name, metric, bv, nv, delta, delta_pct,
                                      None if ci is None else ci[0], None if ci is None else ci[1],
                                      "%" if relative else "pp", verdict))
    return Comparison(problems, warnings, deltas)


def format_comparison(cmp: Comparison) -> str:
    lines = ["=== Comparison ==="]
    for w in cmp.config_mismatches:
        lines.append(f"CONFIG MISMATCH: {w}")
    for w in cmp.warnings:
        lines.append(f"warning: {w}")
    lines.append(f"{'Scenario':<16}{'Metric':<16}{'Base':>12}{'New':>12}{'Delta':>10}{'95% CI':>22}  Verdict")
    for d in cmp.deltas:
        def num(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.2f}"
        if d.delta is None:
            change = "n/a"
        elif d.metric == "error_rate_pct" or d.delta_pct is None:
            change = f"{d.delta:+.2f}"
        else:
            change = f"{d.delta_pct:+.1f}%"
        ci = "n/a" if d.ci_low is None else f"[{d.ci_low:+.1f}, {d.ci_high:+.1f}]{d.ci_unit}"
        lines.append(f"{d.scenario:<16}{d.metric:<16}{num(d.base):>12}{num(d.new):>12}{change:>10}{ci:>22}  "
                     f"{d.verdict}")
    n_reg = len(cmp.regressions)
    lines.append(f"Result: {'REGRESSION' if n_reg else 'OK'} ({n_reg} regressed metric(s))")
    return "\n".join(lines) + "\n"
