"""A self-contained HTML report, drawn from the JSON document.

Charts are matplotlib PNGs embedded as base64 ``data:`` URIs, so the file has
no external references and opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
from itertools import pairwise
from pathlib import Path
from typing import Any

from realizar.loadtest.report import format_value, metric_label

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
.pass{color:#137333;font-weight:600} .fail{color:#c5221f;font-weight:600}
.invalid{background:#fce8e6;border:1px solid #c5221f;padding:.6em;margin:1em 0}
.meta{color:#666;font-size:.9em} img{max-width:100%;height:auto}
"""


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _throughput_bins(t_req: list[float], lat_req: list[float | None], stride: int
                     ) -> tuple[list[float], list[float], list[float]] | None:
    """Completions per second in 20 bins over a short run (under 20 s), where
    one-second buckets would show one or two points."""
    span = max(t_req)
    if span >= 20.0 or span <= 0:
        return None
    width = span / 20.0
    weight = stride / width  # each kept point stands for ``stride`` requests
    done = [0.0] * 20
    failed = [0.0] * 20
    for t, lat in zip(t_req, lat_req, strict=True):
        k = min(19, int(t / width))
        done[k] += weight
        if lat is None:
            failed[k] += weight
    return [(k + 0.5) * width for k in range(20)], done, failed


def scenario_figure(sc: dict[str, Any]) -> str:
    """A 2x2 chart for one scenario, as base64 PNG: latency over time, latency
    histogram, throughput over time, server queue depth and KV-cache usage."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig = Figure(figsize=(11, 7))
    (ax_lat, ax_hist), (ax_tp, ax_srv) = fig.subplots(2, 2)
    series = sc.get("series") or []
    timeline = sc.get("timeline") or {}
    t_req = timeline.get("t_s") or []
    lat_req = timeline.get("latency_ms") or []
    for phase in sc.get("phases") or []:
        if len(sc["phases"]) > 1:
            for ax in (ax_lat, ax_tp, ax_srv):
                ax.axvspan(phase["start_s"], max(phase["end_s"], phase["start_s"] + 1e-3), alpha=0.08)
    ok = [(t, v) for t, v in zip(t_req, lat_req, strict=True) if v is not None]
    if ok:
        ax_lat.scatter([t for t, _ in ok], [v for _, v in ok], s=4, alpha=0.5, label="request")
    if series and series[-1]["t"] >= 2.0:  # a per-second line needs a few seconds
        t = [row["t"] + 0.5 for row in series]
        ax_lat.plot(t, [row["p50_ms"] for row in series], label="p50 per second")
        ax_lat.plot(t, [row["p99_ms"] for row in series], label="p99 per second")
    ax_lat.set_title("Latency over time")
    ax_lat.set_xlabel("s")
    ax_lat.set_ylabel("ms")
    ax_lat.legend(loc="upper right", fontsize="small")

    hist = sc.get("latency_histogram") or {}
    edges, counts = hist.get("edges_ms") or [], hist.get("counts") or []
    if counts:
        widths = [b - a for a, b in pairwise(edges)]
        ax_hist.bar(edges[:-1], counts, width=widths, align="edge")
        if edges[-1] > 20 * edges[0]:  # log-spaced bins read best on a log axis when wide
            ax_hist.set_xscale("log")
            ax_hist.xaxis.set_major_formatter(ScalarFormatter())
            ax_hist.xaxis.set_minor_formatter(NullFormatter())
    ax_hist.set_title("Latency histogram (successful requests)")
    ax_hist.set_xlabel("ms")
    ax_hist.set_ylabel("requests")

    bins = _throughput_bins(t_req, lat_req, int(timeline.get("stride", 1))) if t_req else None
    if bins is not None:
        centers, done, failed = bins
        ax_tp.plot(centers, done, marker=".", label="completed/s")
        ax_tp.plot(centers, failed, marker=".", label="failed/s")
    else:
        t = [row["t"] + 0.5 for row in series]
        ax_tp.plot(t, [row["throughput_rps"] for row in series], marker=".", label="completed/s")
        ax_tp.plot(t, [row["failures"] for row in series], marker=".", label="failed/s")
    ax_tp.set_title("Throughput over time")
    ax_tp.set_xlabel("s")
    ax_tp.set_ylabel("req/s")
    ax_tp.legend(loc="upper right", fontsize="small")

    metrics = sc.get("server_metrics") or {}
    samples = metrics.get("samples") or []
    ax_srv.set_title("Server queue depth and KV-cache usage (/metrics)")
    ax_srv.set_xlabel("s")
    if samples:
        ts = [s["t"] for s in samples]
        for key, label in (("num_requests_running", "running"), ("num_requests_waiting", "waiting")):
            if any(key in s for s in samples):
                ax_srv.plot(ts, [s.get(key, 0.0) for s in samples], marker=".", label=label)
        ax_srv.set_ylabel("requests")
        if any("kv_cache_usage_ratio" in s for s in samples):
            ax_kv = ax_srv.twinx()
            ax_kv.plot(ts, [s.get("kv_cache_usage_ratio", 0.0) for s in samples], color="tab:red",
                       linestyle="--", marker=".", label="KV usage")
            ax_kv.set_ylim(0, 1.05)
            ax_kv.set_ylabel("KV-cache usage ratio")
            ax_kv.legend(loc="upper left", fontsize="small")
        ax_srv.legend(loc="upper right", fontsize="small")
    else:
        reason = metrics.get("error") or "not scraped"
        ax_srv.text(0.5, 0.5, f"no /metrics samples\n({reason})", ha="center", va="center",
                    transform=ax_srv.transAxes)
    # fixed margins: tight_layout and bbox_inches="tight" each cost another full draw
    fig.subplots_adjust(left=0.07, right=0.93, bottom=0.08, top=0.95, hspace=0.35, wspace=0.28)
    return _png(fig)


def _summary_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    head = ("<tr><th>phase</th><th>requests</th><th>ok</th><th>failed</th><th>duration</th>"
            "<th>throughput</th><th>error rate</th><th>p50</th><th>p95</th><th>p99</th><th>max</th></tr>")
    body = []
    for name, s in rows:
        lat = s["latency"]
        body.append(
            f"<tr><td>{html.escape(name)}</td><td>{s['total_requests']}</td><td>{s['successes']}</td>"
            f"<td>{s['failures']}</td><td>{s['duration_s']:.2f}s</td><td>{s['throughput_rps']:.2f} req/s</td>"
            f"<td>{s['error_rate_pct']:.2f}%</td><td>{lat['p50_ms']:.2f}ms</td><td>{lat['p95_ms']:.2f}ms</td>"
            f"<td>{lat['p99_ms']:.2f}ms</td><td>{lat['max_ms']:.2f}ms</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _targets_table(targets: list[dict[str, Any]]) -> str:
    if not targets:
        return ""
    rows = []
    for t in targets:
        cls = "pass" if t["passed"] else "fail"
        rows.append(f"<tr><td>{html.escape(t.get('scenario', ''))}</td><td>{html.escape(metric_label(t['metric']))}</td>"
                    f"<td>{html.escape(t['op'] + ' ' + format_value(t['metric'], t['threshold']))}</td>"
                    f"<td>{html.escape(format_value(t['metric'], t['value']))}</td>"
                    f"<td class='{cls}'>{'PASS' if t['passed'] else 'FAIL'}</td></tr>")
    return ("<table><tr><th>scenario</th><th>metric</th><th>target</th><th>value</th><th>result</th></tr>"
            + "".join(rows) + "</table>")


def render_html(doc: dict[str, Any]) -> str:
    title = f"realizar load test: {doc.get('base_url', '')}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='meta'>{html.escape(doc['tool']['name'])} {html.escape(doc['tool']['version'])}, "
             f"schema {doc['schema_version']}, {html.escape(doc['created_at'])}, "
             f"config {html.escape(doc['config_hash'])}, exit code {doc['exit_code']}</p>"]
    if not doc.get("valid", True):
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in doc.get("invalid_reasons", []))
        parts.append(f"<div class='invalid'><b>Invalid run.</b> These numbers do not describe the server:"
                     f"<ul>{reasons}</ul></div>")
    targets = doc.get("targets", {})
    if targets.get("results"):
        verdict = "PASS" if targets.get("passed") else "FAIL"
        parts.append(f"<h2>Targets: <span class='{verdict.lower()}'>{verdict}</span></h2>")
        parts.append(_targets_table(targets["results"]))
    for name, sc in doc.get("scenarios", {}).items():
        parts.append(f"<h2 id='{html.escape(name)}'>{html.escape(sc['title'])}</h2>")
        parts.append(f"<p class='meta'>{html.escape(sc.get('description', ''))}; percentiles: "
                     f"{html.escape(sc['summary']['percentile_method'])}, successful requests, "
                     f"latency from the intended start</p>")
        rows = [(p["title"], p["summary"]) for p in sc["phases"]] if len(sc["phases"]) > 1 else []
        rows.append(("overall", sc["summary"]))
        parts.append(_summary_table(rows))
        if sc.get("recovery_time_s") is not None:
            parts.append(f"<p>Recovery time: {sc['recovery_time_s']:.3f}s</p>")
        health = sc.get("client_health", {})
        parts.append(f"<p class='meta'>client: loop lag p99 {health.get('loop_lag_p99_ms', 0):.1f} ms, "
                     f"dispatch lag p99 {health.get('dispatch_lag_p99_ms', 0):.1f} ms, "
                     f"CPU max {health.get('cpu_max_pct', 0):.0f}%</p>")
        if health.get("workers"):
            parts.append(_workers_table(health["workers"]))
        parts.append(f"<img alt='charts for {html.escape(name)}' src='data:image/png;base64,"
                     f"{scenario_figure(sc)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _workers_table(rows: list[dict[str, Any]]) -> str:
    """One row per load worker and phase: what it was given, what it achieved, how it fared."""
    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    head = ("<table><tr><th>phase</th><th>worker</th><th>host:pid</th><th>conns</th><th>requests</th>"
            "<th>scheduled req/s</th><th>achieved req/s</th><th>start late</th><th>loop lag p99</th>"
            "<th>CPU max</th><th>check</th></tr>")
    body = []
    for r in rows:
        verdict = "<span class='fail'>" + html.escape("; ".join(r["reasons"])) + "</span>" if r["reasons"] \
            else "<span class='pass'>OK</span>"
        body.append(f"<tr><td>{html.escape(str(r['phase']))}</td><td>{r['worker'] + 1}/{r['workers']}</td>"
                    f"<td>{html.escape(str(r['host']))}:{r['pid']}</td><td>{r['concurrency']}</td>"
                    f"<td>{r['requests']}</td><td>{num(r['scheduled_rps'], '.1f')}</td>"
                    f"<td>{num(r['achieved_rps'], '.1f')}</td><td>{r['start_late_ms']:.1f} ms</td>"
                    f"<td>{r['loop_lag_p99_ms']:.1f} ms</td><td>{r['cpu_max_pct']:.0f}%</td><td>{verdict}</td></tr>")
    return head + "".join(body) + "</table>"


def write_html(doc: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(render_html(doc), encoding="utf-8")
