"""Plain engine statistics. The engine keeps these; realizar.metrics maps them to Prometheus."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineStats:
    """A point-in-time snapshot, cheap to take from any thread."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    num_preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_steps_total: int
    healthy: bool
    # prefix caching, counted in tokens at each request's first admission (as vLLM counts them):
    # prompt tokens looked up, and those whose K/V were found in the cache
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0


@dataclass(frozen=True)
class LatencyObservations:
    """Per-request timings (seconds) gathered since the previous drain."""

    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # FinishReason values


class StatsRecorder:
    """Written by the engine thread, read by the event loop; a lock guards the swap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = LatencyObservations()
        self.num_preemptions_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_steps_total = 0

    def observe_first_token(self, ttft: float, queue: float) -> None:
        with self._lock:
            self._pending.ttft.append(ttft)
            self._pending.queue.append(queue)

    def observe_tokens(self, gaps: list[float]) -> None:
        if gaps:
            with self._lock:
                self._pending.itl.extend(gaps)

    def observe_finished(self, e2e: float, reason: str) -> None:
        with self._lock:
            self._pending.e2e.append(e2e)
            self._pending.finished.append(reason)

    def drain(self) -> LatencyObservations:
        with self._lock:
            out, self._pending = self._pending, LatencyObservations()
        return out
