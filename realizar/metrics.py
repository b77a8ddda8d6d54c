"""Prometheus series for ``GET /metrics``, in a registry of their own.

The engine keeps plain numbers (``EngineStats``) and per-request timings
(``LatencyObservations``); this module maps them onto Prometheus series. The engine never
imports it. Every method runs on the event loop thread, so nothing here takes a lock.

Two groups of series:

* the ten series of the original realizar server, fed by every generation route
  (``realizar_requests_total`` ... ``realizar_uptime_seconds``); their names are kept as
  they were, so the counts that lack a ``_total`` suffix are exposed as gauges;
* serving series named after vLLM's: latency histograms, engine gauges and token counters.
"""

from __future__ import annotations

import enum
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from realizar.engine.stats import EngineStats, LatencyObservations

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket edges as vLLM chose them, so dashboards built for vLLM read realizar the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                 120.0, 300.0, 600.0)
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 120.0, 300.0)


class Outcome(str, enum.Enum):
    """How a generation HTTP request ended, from the server's side."""

    SUCCESS = "success"  # 2xx, and a stream that ended normally
    CLIENT_ERROR = "client_error"  # 4xx: bad input, auth, limits, a body that did not arrive in time
    REFUSED = "refused"  # 503 before any work: overloaded, loading, shutting down
    ABORTED = "aborted"  # the client went away (499)
    FAILED = "failed"  # server-side failure: 5xx, a timeout, a stream that ended in error


class StatsSource(Protocol):
    def stats(self) -> EngineStats: ...

    def drain_observations(self) -> LatencyObservations: ...


class Metrics:
    """The server's metrics; ``render()`` gives the Prometheus text exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._source: StatsSource | None = None
        self._started = time.monotonic()
        # The original ten, counted per generation HTTP request.
        self.requests_total = 0
        self.requests_successful = 0
        self.requests_failed = 0
        self.tokens_generated = 0
        self.inference_seconds = 0.0  # summed over successful requests
        # The other outcomes of generation requests, apart from failures (see Outcome).
        self.requests_refused: Tally[str] = Tally()  # by reason: overloaded, unavailable
        self.requests_aborted = 0
        self.requests_client_errors = 0
        # Connections: open now (uvicorn's set, attached by the runner), and those closed before a request
        # reached the app, by reason (realizar.server.connection.Rejection).
        self.open_connections: Callable[[], int] | None = None
        self.connections_rejected: Tally[str] = Tally()
        # Unregistered children of our one collector, which drops their *_created samples.
        self.ttft = Histogram("realizar_time_to_first_token_seconds",
                              "Time from arrival to the first generated token", buckets=TTFT_BUCKETS,
                              registry=None)
        self.itl = Histogram("realizar_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of one request",
                             buckets=ITL_BUCKETS, registry=None)
        self.e2e = Histogram("realizar_e2e_request_latency_seconds",
                             "Time from arrival to the last token of a request", buckets=E2E_BUCKETS,
                             registry=None)
        self.queue = Histogram("realizar_request_queue_time_seconds",
                               "Time a request waited before its first scheduling", buckets=QUEUE_BUCKETS,
                               registry=None)
        self.http = Histogram("realizar_http_request_duration_seconds",
                              "HTTP request duration by route template, method and status",
                              ["route", "method", "status"], buckets=HTTP_BUCKETS, registry=None)
        self.finished = Counter("realizar_request_success",
                                "Finished engine requests by finish reason", ["finished_reason"],
                                registry=None)
        self._http_children: dict[tuple[str, str, int], Histogram] = {}
        self.registry.register(_Collector(self))

    def attach(self, source: StatsSource) -> None:
        self._source = source

    def add_compat(self, compat: str, model_name: str) -> None:
        """Also expose the engine gauges under another server's names (``--metrics-compat``), so
        dashboards and autoscalers built for it (KEDA or KubeRay scaling on vLLM's queue) read realizar."""
        if compat != "vllm":
            raise ValueError(f"unknown metrics compat {compat!r}")
        self.registry.register(_VllmCollector(self, model_name))

    def uptime(self) -> float:
        return time.monotonic() - self._started

    def record_request(self, outcome: Outcome, tokens: int, seconds: float, reason: str = "") -> None:
        """One generation HTTP request ended; ``reason`` says why a refused one was refused.

        ``realizar_requests_failed`` counts server-side failures only, as the original server's
        did; refusals, client aborts and client errors have series of their own.
        """
        self.requests_total += 1
        self.tokens_generated += tokens
        if outcome is Outcome.SUCCESS:
            self.requests_successful += 1
            self.inference_seconds += seconds
        elif outcome is Outcome.FAILED:
            self.requests_failed += 1
        elif outcome is Outcome.REFUSED:
            self.requests_refused[reason or "unavailable"] += 1
        elif outcome is Outcome.ABORTED:
            self.requests_aborted += 1
        else:
            self.requests_client_errors += 1

    def reject_connection(self, reason: str) -> None:
        self.connections_rejected[reason] += 1

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        child = self._http_children.get(key)
        if child is None:
            child = self._http_children[key] = self.http.labels(route, method, str(status))
        child.observe(seconds)

    def absorb(self) -> None:
        """Move the engine's per-request timings gathered since the last call into histograms."""
        if self._source is None:
            return
        obs = self._source.drain_observations()
        for hist, values in ((self.ttft, obs.ttft), (self.itl, obs.itl), (self.e2e, obs.e2e),
                             (self.queue, obs.queue)):
            for v in values:
                hist.observe(v)
        for reason in obs.finished:
            self.finished.labels(reason).inc()

    def render(self) -> bytes:
        self.absorb()
        return generate_latest(self.registry)

    def engine_stats(self) -> EngineStats | None:
        return self._source.stats() if self._source is not None else None



# The engine's own series, read from one EngineStats snapshot per scrape: (family, name, help, EngineStats field).
_ENGINE_SERIES: tuple[tuple[type[GaugeMetricFamily] | type[CounterMetricFamily], str, str, str], ...] = (
    (GaugeMetricFamily, "realizar_num_requests_running", "Requests in the running batch", "num_running"),
    (GaugeMetricFamily, "realizar_num_requests_waiting", "Requests waiting to be scheduled", "num_waiting"),
    (GaugeMetricFamily, "realizar_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1)", "kv_cache_usage"),
    (CounterMetricFamily, "realizar_prompt_tokens", "Prompt tokens processed", "prompt_tokens_total"),
    (CounterMetricFamily, "realizar_generation_tokens", "Tokens generated by the engine", "generation_tokens_total"),
    (CounterMetricFamily, "realizar_num_preemptions", "Sequences preempted for lack of KV blocks",
     "num_preemptions_total"),
    (CounterMetricFamily, "realizar_prefix_cache_queries",
     "Prompt tokens looked up in the prefix cache, at each request's first admission", "prefix_cache_queries_total"),
    (CounterMetricFamily, "realizar_prefix_cache_hits", "Prompt tokens whose K/V were found in the prefix cache",
     "prefix_cache_hits_total"),
)

class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Metric]:
        yield from self._original_series()
        yield from self._outcome_series()
        yield from self._engine_series()
        for child in (self.m.ttft, self.m.itl, self.m.e2e, self.m.queue, self.m.http, self.m.finished):
            for family in child.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family

    def _original_series(self) -> Iterator[Metric]:
        m = self.m
        uptime = m.uptime()
        yield CounterMetricFamily("realizar_requests", "Total number of generation requests",
                                  value=m.requests_total)
        yield GaugeMetricFamily("realizar_requests_successful", "Successful generation requests",
                                value=m.requests_successful)
        yield GaugeMetricFamily("realizar_requests_failed", "Failed generation requests",
                                value=m.requests_failed)
        yield GaugeMetricFamily("realizar_tokens_generated", "Total tokens generated",
                                value=m.tokens_generated)
        yield GaugeMetricFamily("realizar_inference_time_seconds",
                                "Total time spent serving successful generation requests",
                                value=m.inference_seconds)
        yield GaugeMetricFamily("realizar_requests_per_second", "Generation requests per second of uptime",
                                value=m.requests_total / uptime if uptime > 0 else 0.0)
        yield GaugeMetricFamily("realizar_tokens_per_second", "Generated tokens per second of uptime",
                                value=m.tokens_generated / uptime if uptime > 0 else 0.0)
        avg_ms = m.inference_seconds * 1000.0 / m.requests_successful if m.requests_successful else 0.0
        yield GaugeMetricFamily("realizar_avg_latency_ms",
                                "Average latency of successful generation requests in milliseconds",
                                value=avg_ms)
        yield GaugeMetricFamily("realizar_error_rate", "Failed over total generation requests (0.0-1.0)",
                                value=m.requests_failed / m.requests_total if m.requests_total else 0.0)
        yield GaugeMetricFamily("realizar_uptime_seconds", "Seconds since the server started", value=uptime)

    def _outcome_series(self) -> Iterator[Metric]:
        m = self.m
        refused = CounterMetricFamily("realizar_requests_refused",
                                      "Generation requests refused with 503 before any work, by reason "
                                      "(overloaded: the queue is full; unavailable: loading or shutting down)",
                                      labels=["reason"])
        for reason in ("overloaded", "unavailable", *sorted(set(m.requests_refused) - {"overloaded", "unavailable"})):
            refused.add_metric([reason], m.requests_refused[reason])
        yield refused
        yield CounterMetricFamily("realizar_requests_aborted",
                                  "Generation requests whose client went away before the answer (499)",
                                  value=m.requests_aborted)
        yield CounterMetricFamily("realizar_requests_client_errors",
                                  "Generation requests answered 4xx (bad input, auth, limits, 408)",
                                  value=m.requests_client_errors)
        yield GaugeMetricFamily("realizar_http_connections", "Open HTTP connections",
                                value=m.open_connections() if m.open_connections is not None else 0)
        rejected = CounterMetricFamily("realizar_connections_rejected",
                                       "Connections closed before a request reached the app, by reason",
                                       labels=["reason"])
        for reason in sorted(m.connections_rejected):
            rejected.add_metric([reason], m.connections_rejected[reason])
        yield rejected

    def _engine_series(self) -> Iterator[Metric]:
        s = self.m.engine_stats()
        for family, name, doc, field in _ENGINE_SERIES:
            yield family(name, doc, value=getattr(s, field) if s else 0)


class _VllmCollector(Collector):
    """vLLM's names for the engine gauges, with its ``model_name`` label (``--metrics-compat vllm``).

    ``vllm:kv_cache_usage_perc`` is a fraction (0-1) despite its name, as in vLLM."""

    def __init__(self, metrics: Metrics, model_name: str) -> None:
        self.m = metrics
        self.model_name = model_name

    def collect(self) -> Iterable[Metric]:
        s = self.m.engine_stats()
        for name, doc, value in (
                ("vllm:num_requests_running", "Number of requests in model execution batches",
                 s.num_running if s else 0),
                ("vllm:num_requests_waiting", "Number of requests waiting to be processed",
                 s.num_waiting if s else 0),
                ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage",
                 s.kv_cache_usage if s else 0.0)):
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
