"""Request records, failure classes and latency statistics.

Percentiles are exact (nearest rank) while the samples fit in memory; past
``exact_limit`` samples a recorder folds them into an HDR histogram with three
significant digits, which is what long runs report. Every summary says which
method produced its numbers.
"""

from __future__ import annotations

import math
import random
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from itertools import pairwise
from typing import Any

from hdrh.histogram import HdrHistogram

from realizar.loadtest.workload import Validity

EXACT_METHOD = "exact nearest-rank"
HDR_METHOD = "HDR histogram (3 significant digits)"
DEFAULT_EXACT_LIMIT = 1_000_000
_HDR_LOWEST_US = 1
_HDR_HIGHEST_US = 3_600_000_000  # one hour
_RESERVOIR = 1000  # latency samples kept per second for the per-second series


class FailureClass(str, Enum):
    """Why a request failed. The values are the JSON keys."""

    CONNECT_TIMEOUT = "connect_timeout"
    TOTAL_TIMEOUT = "total_timeout"
    CONNECTION_ERROR = "connection_refused_or_reset"
    HTTP_4XX = "http_4xx"
    HTTP_429 = "http_429"
    HTTP_5XX = "http_5xx"
    HTTP_503 = "http_503"
    TRUNCATED_STREAM = "truncated_stream"
    CONTENT_CHECK = "content_check_failed"
    OTHER = "other"


FAILURE_LABELS: dict[FailureClass, str] = {
    FailureClass.CONNECT_TIMEOUT: "connect timeout",
    FailureClass.TOTAL_TIMEOUT: "total timeout",
    FailureClass.CONNECTION_ERROR: "connection refused/reset",
    FailureClass.HTTP_4XX: "HTTP 4xx (not 429)",
    FailureClass.HTTP_429: "HTTP 429",
    FailureClass.HTTP_5XX: "HTTP 5xx (not 503)",
    FailureClass.HTTP_503: "HTTP 503",
    FailureClass.TRUNCATED_STREAM: "truncated stream",
    FailureClass.CONTENT_CHECK: "failed content check",
    FailureClass.OTHER: "other (protocol error, 1xx/3xx)",
}


def classify_status(status: int) -> FailureClass | None:
    """The failure class of an HTTP status, or None for a 2xx."""
    if 200 <= status < 300:
        return None
    if status == 429:
        return FailureClass.HTTP_429
    if status == 503:
        return FailureClass.HTTP_503
    if 400 <= status < 500:
        return FailureClass.HTTP_4XX
    if 500 <= status < 600:
        return FailureClass.HTTP_5XX
    return FailureClass.OTHER


@dataclass(slots=True)
class RequestRecord:
    """One request's timeline, in ``time.perf_counter()`` seconds.

    ``intended`` is when the load model wanted the request sent (the schedule
    slot in open loop and paced runs; the worker's turn in a plain closed loop);
    ``sent`` is when its bytes went out. Latency from ``intended`` is free of
    coordinated omission; latency from ``sent`` is the service time.
    """

    index: int
    intended: float
    sent: float
    end: float
    status: int = 0
    failure: FailureClass | None = None
    first_byte: float | None = None
    first_token: float | None = None
    chunk_times: list[float] | None = None
    output_tokens: int = 0
    input_tokens: int = 0
    cached_tokens: int | None = None  # prompt tokens the server took from its prefix cache, if it says
    validity: Validity | None = None  # what the output text is, where the request judges it
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def latency(self) -> float:
        """End to end, from the intended start."""
        return self.end - self.intended

    @property
    def service_latency(self) -> float:
        """End to end, from the actual send."""
        return self.end - self.sent


def nearest_rank(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) by the nearest-rank method: the smallest value
    such that at least p % of the samples are less than or equal to it."""
    n = len(sorted_values)
    if n == 0:
        return 0.0
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    rank = max(1, math.ceil(p / 100.0 * n))
    return float(sorted_values[min(rank, n) - 1])


def _new_hdr() -> HdrHistogram:
    return HdrHistogram(_HDR_LOWEST_US, _HDR_HIGHEST_US, 3)


def _recorded(hdr: HdrHistogram) -> list[tuple[int, int]]:
    """(highest equivalent value, count) of each non-empty bucket, in value order: what
    ``hdr.get_recorded_iterator()`` yields, without its Python loop's many steps through every empty
    bucket below the largest value (about 870,000 steps for 600 samples: 0.1 s per pass)."""
    out = []
    for index in range(hdr.counts_len):
        count = hdr.get_count_at_index(index)
        if count:
            out.append((hdr.get_highest_equivalent_value(hdr.get_value_from_index(index)), count))
    return out


def _hdr_stddev(hdr: HdrHistogram) -> float:
    """``hdr.get_stddev()`` over the non-empty buckets (``_recorded``): the same sums in the same order,
    so the same float, at a fraction of the library's two iterator passes."""
    if not hdr.total_count:
        return 0.0
    buckets = [(hdr._hdr_median_equiv_value(value), count) for value, count in _recorded(hdr)]
    mean = float(sum(count * median for median, count in buckets)) / hdr.total_count
    total = 0.0
    for median, count in buckets:
        dev = (median * 1.0) - mean
        total += (dev * dev) * count
    return math.sqrt(total / hdr.total_count)


def _to_us(seconds: float) -> int:
    return min(_HDR_HIGHEST_US, max(_HDR_LOWEST_US, round(seconds * 1e6)))


class LatencyRecorder:
    """Durations in seconds: exact samples up to ``exact_limit``, then an HDR histogram."""

    def __init__(self, exact_limit: int = DEFAULT_EXACT_LIMIT) -> None:
        self.exact_limit = exact_limit
        self._exact: array[float] | None = array("d")
        self._sorted: list[float] | None = None
        self._hdr: HdrHistogram | None = None
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    @property
    def method(self) -> str:
        return EXACT_METHOD if self._exact is not None else HDR_METHOD

    def record(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        if seconds < self.min:
            self.min = seconds
        if seconds > self.max:
            self.max = seconds
        if self._exact is not None:
            self._exact.append(seconds)
            self._sorted = None
            if len(self._exact) > self.exact_limit:
                self._to_hdr()
        else:
            assert self._hdr is not None
            self._hdr.record_value(_to_us(seconds))

    def _to_hdr(self) -> None:
        hdr = _new_hdr()
        assert self._exact is not None
        for value in self._exact:
            hdr.record_value(_to_us(value))
        self._hdr, self._exact, self._sorted = hdr, None, None

    def _hdr_view(self) -> HdrHistogram:
        if self._hdr is not None:
            return self._hdr
        hdr = _new_hdr()
        for value in self._exact or ():
            hdr.record_value(_to_us(value))
        return hdr

    def merge(self, other: LatencyRecorder) -> None:
        """Add ``other``'s samples to this recorder. Stays exact while both are exact
        and the union fits; otherwise the union is an HDR histogram."""
        if other.count == 0:
            return
        if self._exact is not None and other._exact is not None \
                and len(self._exact) + len(other._exact) <= self.exact_limit:
            self._exact.extend(other._exact)
            self._sorted = None
        else:
            if self._exact is not None:
                self._to_hdr()
            assert self._hdr is not None
            self._hdr.add(other._hdr_view())
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def __getstate__(self) -> dict[str, Any]:
        # HdrHistogram's ctypes counts do not pickle; its own compressed encoding is lossless
        state = dict(self.__dict__)
        state["_sorted"] = None
        if self._hdr is not None:
            state["_hdr"] = self._hdr.encode()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("_hdr") is not None:
            state["_hdr"] = HdrHistogram.decode(state["_hdr"])
        self.__dict__.update(state)

    def percentile(self, p: float) -> float:
        """The p-th percentile in seconds (0 when empty)."""
        if self.count == 0:
            return 0.0
        if self._exact is not None:
            if self._sorted is None:
                self._sorted = sorted(self._exact)
            return nearest_rank(self._sorted, p)
        assert self._hdr is not None
        return float(self._hdr.get_value_at_percentile(p)) / 1e6

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def stdev(self) -> float:
        if self.count < 2:
            return 0.0
        if self._exact is not None:
            mean = self.mean
            return math.sqrt(sum((x - mean) ** 2 for x in self._exact) / (self.count - 1))
        assert self._hdr is not None
        return _hdr_stddev(self._hdr) / 1e6

    def histogram(self, bins: int = 40) -> dict[str, list[float]]:
        """Log-spaced bucket edges (ms) and counts, for the report's histogram chart."""
        if self.count == 0:
            return {"edges_ms": [], "counts": []}
        lo = max(self.min * 1e3, 1e-3)
        hi = max(self.max * 1e3, lo * 1.001)
        ratio = (hi / lo) ** (1.0 / bins)
        edges = [lo * ratio**i for i in range(bins + 1)]
        counts = [0] * bins

        def add(ms: float, n: int) -> None:
            if ms <= lo:
                k = 0
            else:
                k = min(bins - 1, int(math.log(ms / lo) / math.log(ratio)))
            counts[k] += n

        if self._exact is not None:
            for value in self._exact:
                add(value * 1e3, 1)
        else:
            assert self._hdr is not None
            for value, count in _recorded(self._hdr):
                add(value / 1e3, int(count))
        return {"edges_ms": [round(e, 4) for e in edges], "counts": [float(c) for c in counts]}


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of one latency-like quantity, in milliseconds."""

    count: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    method: str

    @classmethod
    def of(cls, recorder: LatencyRecorder) -> LatencySummary:
        def ms(seconds: float) -> float:
            return round(seconds * 1e3, 4)

        return cls(
            count=recorder.count,
            mean_ms=ms(recorder.mean),
            std_ms=ms(recorder.stdev()),
            min_ms=ms(recorder.min if recorder.count else 0.0),
            p50_ms=ms(recorder.percentile(50)),
            p90_ms=ms(recorder.percentile(90)),
            p95_ms=ms(recorder.percentile(95)),
            p99_ms=ms(recorder.percentile(99)),
            max_ms=ms(recorder.max),
            method=recorder.method,
        )


@dataclass(frozen=True)
class Slo:
    """Per-request service-level objectives; a request meeting all of them counts
    toward goodput. None means no objective on that quantity."""

    e2el_ms: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met_by(self, record: RequestRecord, ttft: float | None, tpot: float | None) -> bool:
        if not record.ok:
            return False
        if self.e2el_ms is not None and record.latency * 1e3 > self.e2el_ms:
            return False
        if self.ttft_ms is not None and (ttft is None or ttft * 1e3 > self.ttft_ms):
            return False
        return not (self.tpot_ms is not None and tpot is not None and tpot * 1e3 > self.tpot_ms)


@dataclass
class Summary:
    """The numbers the seed reports for a scenario or a phase, plus our additions."""

    total_requests: int
    successes: int
    failures: int
    duration_s: float
    throughput_rps: float
    error_rate_pct: float
    latency: LatencySummary
    service_latency: LatencySummary
    failures_by_class: dict[str, int]
    percentile_method: str
    output_tokens: int = 0
    input_tokens: int = 0
    tokens_per_s: float | None = None
    ttft: LatencySummary | None = None
    tpot: LatencySummary | None = None
    itl: LatencySummary | None = None
    e2el: LatencySummary | None = None
    goodput_rps: float | None = None
    good_requests: int = 0
    successful_rps: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metric(self, name: str) -> float | None:
        """A flat metric by name, as used by targets and compare (``p95_ms``,
        ``throughput_rps``, ``ttft_p99_ms``...); None where the run has no value."""
        direct = {
            "throughput_rps": self.throughput_rps,
            "error_rate_pct": self.error_rate_pct,
            "tokens_per_s": self.tokens_per_s,
            "goodput_rps": self.goodput_rps,
            "successful_rps": self.successful_rps,
            "duration_s": self.duration_s,
        }
        if name in direct:
            return direct[name]
        # a latency of no request at all is not a number (it must not pass a target)
        if name in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms"):
            return float(getattr(self.latency, name)) if self.latency.count else None
        for group in ("ttft", "tpot", "itl", "e2el"):
            prefix = group + "_"
            if name.startswith(prefix):
                summary: LatencySummary | None = getattr(self, group)
                if summary is None or summary.count == 0:
                    return None
                return float(getattr(summary, name[len(prefix):]))
        raise KeyError(name)


@dataclass
class _Second:
    completed: int = 0
    successes: int = 0
    tokens: int = 0
    max_latency: float = 0.0
    seen: int = 0
    sample: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class GroupSummary:
    """The successful requests of one group (a conversation turn): TTFT and prompt tokens,
    ``mean_cached_tokens`` over those whose server reported cached tokens (None: none did)."""

    group: int
    requests: int
    ttft: LatencySummary | None
    mean_input_tokens: float
    mean_cached_tokens: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Group:
    def __init__(self, exact_limit: int) -> None:
        self.requests = 0
        self.ttft = LatencyRecorder(exact_limit)
        self.input_tokens = 0
        self.cached_tokens = 0
        self.cached_reports = 0


class Collector:
    """Aggregates the records of one phase as they complete.

    It keeps exact per-request columns while under ``exact_limit`` (they give
    exact percentiles and the time blocks compare bootstraps over) and, always,
    per-second buckets with a bounded reservoir of latencies. With ``group`` (request
    index -> group, e.g. a conversation's turn) it also keeps TTFT and prompt tokens per group.
    """

    def __init__(self, *, slo: Slo | None = None, exact_limit: int = DEFAULT_EXACT_LIMIT,
                 seed: int = 0, group: Callable[[int], int] | None = None) -> None:
        self.slo = slo or Slo()
        self.group = group
        self._groups: dict[int, _Group] = {}
        self.exact_limit = exact_limit
        self.t0 = 0.0
        self.t_end = 0.0
        self.latency = LatencyRecorder(exact_limit)
        self.service = LatencyRecorder(exact_limit)
        self.ttft = LatencyRecorder(exact_limit)
        self.tpot = LatencyRecorder(exact_limit)
        self.itl = LatencyRecorder(exact_limit)
        self.e2el = LatencyRecorder(exact_limit)
        self.failures: Counter[FailureClass] = Counter()
        self.completed = 0
        self.successes = 0
        self.output_tokens = 0
        self.input_tokens = 0
        self.good = 0
        self.streaming = False
        self.validity: Counter[Validity] = Counter()  # successful requests whose output was judged
        self._seconds: dict[int, _Second] = {}
        self._rng = random.Random(seed)
        # exact timeline, in completion order: relative end time, latency (s, NaN if failed)
        self._ends: array[float] | None = array("d")
        self._lats: array[float] | None = array("d")

    def start(self, t0: float) -> None:
        self.t0 = t0
        self.t_end = t0

    def add(self, rec: RequestRecord) -> None:
        """Fold one finished request in. Called on the hot path: keep it cheap."""
        self.completed += 1
        if rec.end > self.t_end:
            self.t_end = rec.end
        rel_end = rec.end - self.t0
        ok = rec.failure is None
        lat = rec.end - rec.intended
        second = self._seconds.get(int(rel_end))
        if second is None:
            second = self._seconds[int(rel_end)] = _Second()
        second.completed += 1
        if self._ends is not None and self._lats is not None:
            self._ends.append(rel_end)
            self._lats.append(lat if ok else math.nan)
            if len(self._ends) > self.exact_limit:
                self._ends = self._lats = None
        if not ok:
            assert rec.failure is not None
            self.failures[rec.failure] += 1
            return
        self.successes += 1
        second.successes += 1
        second.tokens += rec.output_tokens
        if lat > second.max_latency:
            second.max_latency = lat
        second.seen += 1
        if len(second.sample) < _RESERVOIR:
            second.sample.append(lat)
        else:
            k = self._rng.randrange(second.seen)
            if k < _RESERVOIR:
                second.sample[k] = lat
        self.latency.record(lat)
        self.service.record(rec.end - rec.sent)
        self.output_tokens += rec.output_tokens
        self.input_tokens += rec.input_tokens
        if rec.validity is not None:
            self.validity[rec.validity] += 1
        ttft = tpot = None
        group = None
        if self.group is not None:
            key = self.group(rec.index)
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(self.exact_limit)
            group.requests += 1
            group.input_tokens += rec.input_tokens
            if rec.cached_tokens is not None:
                group.cached_tokens += rec.cached_tokens
                group.cached_reports += 1
        if rec.first_token is not None:
            self.streaming = True
            ttft = rec.first_token - rec.sent
            self.ttft.record(ttft)
            if group is not None:
                group.ttft.record(ttft)
            e2e = rec.end - rec.sent
            self.e2el.record(e2e)
            if rec.output_tokens > 1:
                tpot = (e2e - ttft) / (rec.output_tokens - 1)
                self.tpot.record(tpot)
            times = rec.chunk_times
            if times:
                for a, b in pairwise(times):
                    self.itl.record(b - a)
        if self.slo.met_by(rec, ttft, tpot):
            self.good += 1

    def merge(self, other: Collector) -> None:
        """Fold another phase in (used for a scenario's overall numbers)."""
        if self.completed == 0:
            self.t0, self.t_end = other.t0, other.t_end
        else:
            self.t0 = min(self.t0, other.t0)
            self.t_end = max(self.t_end, other.t_end)
        self._add_counts(other)
        self._ends = self._lats = None  # timelines of different phases do not concatenate
        self._seconds = {}

    def _add_counts(self, other: Collector) -> None:
        """Add ``other``'s distributions, counts and failures to this collector's."""
        for mine, theirs in ((self.latency, other.latency), (self.service, other.service),
                             (self.ttft, other.ttft), (self.tpot, other.tpot),
                             (self.itl, other.itl), (self.e2el, other.e2el)):
            mine.merge(theirs)
        self.failures.update(other.failures)
        self.completed += other.completed
        self.successes += other.successes
        self.output_tokens += other.output_tokens
        self.input_tokens += other.input_tokens
        self.good += other.good
        self.validity.update(other.validity)
        self.streaming = self.streaming or other.streaming

    def __getstate__(self) -> dict[str, Any]:
        # ``group`` may be a lambda; a worker's collector has already applied it, and the
        # coordinator's collector that absorbs it has its own
        return {**self.__dict__, "group": None}

    def rebase(self, t0: float) -> None:
        """Move this phase onto another clock whose phase start is ``t0`` (times kept
        relative to the start stay as they are)."""
        self.t_end += t0 - self.t0
        self.t0 = t0

    def merge_worker(self, other: Collector) -> None:
        """Fold in what another load worker recorded of the same phase, on the same clock
        (``other.t0 == self.t0``; see ``rebase``). Counts add; exact samples stay exact
        while the union fits ``exact_limit`` and HDR histograms add otherwise, so every
        percentile is the one of all the requests pooled; per-second buckets, groups and
        the completion-order timeline combine as if one process had seen every request."""
        if abs(other.t0 - self.t0) > 1e-9:
            raise ValueError("merge_worker needs collectors of the same phase on one clock (rebase first)")
        self.t_end = max(self.t_end, other.t_end)
        self._add_counts(other)
        for key, theirs_group in other._groups.items():
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(self.exact_limit)
            group.requests += theirs_group.requests
            group.ttft.merge(theirs_group.ttft)
            group.input_tokens += theirs_group.input_tokens
            group.cached_tokens += theirs_group.cached_tokens
            group.cached_reports += theirs_group.cached_reports
        for t, sec in other._seconds.items():
            self._merge_second(t, sec)
        if self._ends is None or self._lats is None or other._ends is None or other._lats is None \
                or len(self._ends) + len(other._ends) > self.exact_limit:
            self._ends = self._lats = None  # one process would have dropped it past the limit too
        else:
            pairs = sorted(zip(list(self._ends) + list(other._ends), list(self._lats) + list(other._lats),
                               strict=True), key=lambda pair: pair[0])
            self._ends = array("d", (end for end, _ in pairs))
            self._lats = array("d", (lat for _, lat in pairs))

    def _merge_second(self, t: int, other: _Second) -> None:
        sec = self._seconds.get(t)
        if sec is None:
            self._seconds[t] = _Second(other.completed, other.successes, other.tokens, other.max_latency,
                                       other.seen, list(other.sample))
            return
        sec.completed += other.completed
        sec.successes += other.successes
        sec.tokens += other.tokens
        sec.max_latency = max(sec.max_latency, other.max_latency)
        if len(sec.sample) + len(other.sample) <= _RESERVOIR:
            sec.sample.extend(other.sample)
        else:
            # two uniform reservoirs -> one uniform reservoir of the union: draw from each
            # in proportion to the requests it stands for
            mine = round(_RESERVOIR * sec.seen / (sec.seen + other.seen))
            mine = min(max(mine, _RESERVOIR - len(other.sample)), len(sec.sample))
            sec.sample = self._rng.sample(sec.sample, mine) + self._rng.sample(other.sample, _RESERVOIR - mine)
        sec.seen += other.seen

    @property
    def duration(self) -> float:
        return max(self.t_end - self.t0, 1e-9)

    def group_summaries(self) -> list[GroupSummary]:
        """Per group, in group order (empty without ``group``)."""
        return [GroupSummary(key, g.requests, LatencySummary.of(g.ttft) if g.ttft.count else None,
                             round(g.input_tokens / g.requests, 2),
                             round(g.cached_tokens / g.cached_reports, 2) if g.cached_reports else None)
                for key, g in sorted(self._groups.items())]

    def validity_counts(self) -> dict[str, int]:
        """Successful requests by what their output was (every class, zeros included; all zero
        when no request judged its output)."""
        return {v.value: self.validity.get(v, 0) for v in Validity}

    def timeline(self) -> list[tuple[float, float]]:
        """(end from the phase start, latency or NaN if it failed), in completion
        order; empty once the run outgrew the exact limit."""
        if self._ends is None or self._lats is None:
            return []
        return list(zip(self._ends, self._lats, strict=True))

    def summary(self) -> Summary:
        duration = self.duration
        total = self.completed
        failures = total - self.successes
        generating = self.output_tokens > 0
        return Summary(
            total_requests=total,
            successes=self.successes,
            failures=failures,
            duration_s=round(duration, 6),
            throughput_rps=round(total / duration, 4) if total else 0.0,
            error_rate_pct=round(100.0 * failures / total, 4) if total else 0.0,
            latency=LatencySummary.of(self.latency),
            service_latency=LatencySummary.of(self.service),
            failures_by_class={fc.value: self.failures.get(fc, 0) for fc in FailureClass},
            percentile_method=self.latency.method,
            output_tokens=self.output_tokens,
            input_tokens=self.input_tokens,
            tokens_per_s=round(self.output_tokens / duration, 4) if generating else None,
            ttft=LatencySummary.of(self.ttft) if self.streaming else None,
            tpot=LatencySummary.of(self.tpot) if self.streaming else None,
            itl=LatencySummary.of(self.itl) if self.streaming else None,
            e2el=LatencySummary.of(self.e2el) if self.streaming else None,
            goodput_rps=round(self.good / duration, 4),
            good_requests=self.good,
            successful_rps=round(self.successes / duration, 4),
        )

    def series(self) -> list[dict[str, float]]:
        """Per-second rows, from second 0 to the last second with a completion."""
        if not self._seconds:
            return []
        rows = []
        for t in range(max(self._seconds) + 1):
            sec = self._seconds.get(t, _Second())
            sample = sorted(sec.sample)
            rows.append({
                "t": float(t),
                "completed": float(sec.completed),
                "successes": float(sec.successes),
                "failures": float(sec.completed - sec.successes),
                "throughput_rps": float(sec.completed),
                "tokens": float(sec.tokens),
                "p50_ms": round(nearest_rank(sample, 50) * 1e3, 4),
                "p99_ms": round(nearest_rank(sample, 99) * 1e3, 4),
                "max_ms": round(sec.max_latency * 1e3, 4),
            })
        return rows

    def blocks(self, n_blocks: int = 10) -> list[dict[str, float]]:
        """Consecutive time blocks with their own p50/p95/p99, mean latency, error rate
        and throughput: the units compare resamples for its confidence intervals.

        Runs of 10 s or more use one-second blocks; shorter runs split the requests,
        in completion order, into ``n_blocks`` blocks of equal count."""
        if self.duration >= 10.0 or self._ends is None or self._lats is None:
            out = []
            for row in self.series():
                sec = self._seconds.get(int(row["t"]))
                if sec is None or sec.completed == 0:
                    continue
                sample = sorted(sec.sample)
                out.append(_block_row(sample, sec.completed, sec.completed - sec.successes, 1.0))
            return out
        n = len(self._ends)
        if n == 0:
            return []
        k = max(1, min(n_blocks, n // 2 if n >= 4 else 1))
        bounds = [round(i * n / k) for i in range(k + 1)]
        out = []
        prev_end = 0.0
        for a, b in pairwise(bounds):
            ends = self._ends[a:b]
            lats = self._lats[a:b]
            span = max(ends[-1] - prev_end, 1e-6)
            prev_end = ends[-1]
            ok = sorted(x for x in lats if not math.isnan(x))
            out.append(_block_row(ok, b - a, (b - a) - len(ok), span))
        return out


def _block_row(sorted_ok: list[float], n: int, failed: int, span: float) -> dict[str, float]:
    mean = sum(sorted_ok) / len(sorted_ok) if sorted_ok else 0.0
    return {
        "n": float(n),
        "p50_ms": nearest_rank(sorted_ok, 50) * 1e3,
        "p95_ms": nearest_rank(sorted_ok, 95) * 1e3,
        "p99_ms": nearest_rank(sorted_ok, 99) * 1e3,
        "mean_ms": mean * 1e3,
        "error_rate_pct": 100.0 * failed / n if n else 0.0,
        "throughput_rps": n / span,
    }
