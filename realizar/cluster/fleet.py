"""Fleet metrics: the replicas' Prometheus expositions merged into one.

Each replica's series keep their names and gain a ``replica`` label; the series without that label is the
fleet's: the sum over replicas (counters, histograms, and gauges that add up), or the mean for the gauges
that are ratios or averages. So the single server's dashboards and the load tester, which read the
unlabeled series, read the fleet total; ``{replica!=""}`` selects the replicas in PromQL.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"
# gauges whose fleet value is the mean over replicas, not the sum
MEAN_GAUGES = frozenset({
    "realizar_avg_latency_ms", "realizar_error_rate", "realizar_uptime_seconds", "realizar_kv_cache_usage_ratio",
    "vllm:kv_cache_usage_perc",
})


@dataclass
class _Family:
    name: str
    kind: str
    doc: str
    per_replica: list[tuple[str, dict[str, str], float]] = field(default_factory=list)  # sample, labels, value
    fleet: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = field(default_factory=dict)


def merge(expositions: Mapping[str, str], extra: str = "") -> str:
    """One exposition from ``{replica id: its /metrics text}``; ``extra`` (the front's own series) is appended."""
    families: dict[str, _Family] = {}
    for replica in sorted(expositions):
        for parsed in text_string_to_metric_families(expositions[replica]):
            fam = families.get(parsed.name)
            if fam is None:
                fam = families[parsed.name] = _Family(parsed.name, parsed.type, parsed.documentation)
            for s in parsed.samples:
                fam.per_replica.append((s.name, {**s.labels, REPLICA_LABEL: replica}, s.value))
                key = (s.name, tuple(sorted(s.labels.items())))
                fam.fleet.setdefault(key, []).append(s.value)
    lines: list[str] = []
    for fam in families.values():
        lines.append(f"# HELP {_exposed_name(fam)} {_escape_doc(fam.doc)}")
        lines.append(f"# TYPE {_exposed_name(fam)} {fam.kind}")
        mean = fam.kind == "gauge" and fam.name in MEAN_GAUGES
        for (sample, pairs), values in fam.fleet.items():
            lines.append(_sample(sample, dict(pairs), sum(values) / len(values) if mean else sum(values)))
        for sample, labels, value in fam.per_replica:
            lines.append(_sample(sample, labels, value))
    text = "\n".join(lines) + "\n" if lines else ""
    return text + extra


def _exposed_name(fam: _Family) -> str:
    # the parser strips a counter's _total from the family name; the samples keep it
    return f"{fam.name}_total" if fam.kind == "counter" and not fam.name.endswith("_total") else fam.name


def _sample(name: str, labels: Mapping[str, str], value: float) -> str:
    body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
    return f"{name}{{{body}}} {_number(value)}" if body else f"{name} {_number(value)}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_doc(doc: str) -> str:
    return doc.replace("\\", "\\\\").replace("\n", "\\n")


def gauge(name: str, doc: str, samples: Iterable[tuple[Mapping[str, str], float]], kind: str = "gauge") -> str:
    """The exposition of one family of the front's own (``kind`` gauge or counter)."""
    exposed = f"{name}_total" if kind == "counter" else name
    lines = [f"# HELP {exposed} {_escape_doc(doc)}", f"# TYPE {exposed} {kind}"]
    lines += [_sample(exposed, labels, value) for labels, value in samples]
    return "\n".join(lines) + "\n"
