"""``LoadTestConfig``: the seed's four knobs plus the load model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from realizar.loadtest.workload import ARRIVALS, Arrival

DEFAULT_URL = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class LoadTestConfig:
    """How one scenario (or one phase of it) loads the server.

    The first four fields are the seed's. The load model:

    - ``arrival="closed"`` (the default): ``concurrency`` workers, each sending
      its next request when the last one returns. With ``duration`` (or
      ``rate``) set, sends are paced on an absolute clock so that
      ``total_requests`` spread over ``duration`` seconds.
    - ``arrival`` in ``constant | poisson | gamma``: open loop; requests arrive
      at ``rate`` req/s whatever the server does, and ``concurrency`` caps the
      requests in flight.

    ``total_requests=0`` with a ``duration`` means "as many as fit".
    """

    concurrency: int = 10
    total_requests: int = 100
    timeout: float = 30.0
    base_url: str = DEFAULT_URL
    duration: float | None = None
    rate: float | None = None
    arrival: Arrival = "closed"
    burstiness: float = 1.0
    connect_timeout: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.total_requests < 0:
            raise ValueError(f"total_requests must be >= 0, got {self.total_requests}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 req/s, got {self.rate}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if self.arrival != "closed" and self.rate is None:
            raise ValueError(f"open-loop arrival {self.arrival!r} needs a rate")
        if self.total_requests == 0 and self.duration is None:
            raise ValueError("total_requests=0 (unbounded) needs a duration")
        if self.total_requests == 0 and self.rate is not None:
            raise ValueError("total_requests=0 (unbounded) is for unpaced closed loops; give total or rate")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if not self.connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0, got {self.connect_timeout}")

    @property
    def open_loop(self) -> bool:
        return self.arrival != "closed"

    @property
    def request_count(self) -> int:
        """How many requests the run sends (0: until the duration ends)."""
        if self.rate is not None and self.duration is not None:
            return max(1, math.ceil(self.rate * self.duration))
        return self.total_requests

    @property
    def send_rate(self) -> float | None:
        """Requests per second on the schedule, or None for an unpaced closed loop."""
        if self.rate is not None:
            return self.rate
        if self.duration is not None and self.total_requests > 0:
            return self.total_requests / self.duration
        return None

    def scaled(self, factor: float) -> LoadTestConfig:
        """Request counts and durations times ``factor`` (for quick CI runs);
        concurrency, timeouts and rates stay."""
        if not factor > 0:
            raise ValueError(f"scale must be > 0, got {factor}")
        total = self.total_requests and max(1, math.ceil(self.total_requests * factor))
        duration = None if self.duration is None else self.duration * factor
        return replace(self, total_requests=total, duration=duration)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def split(self, workers: int) -> list[Share]:
        """This load cut into one share per load worker (fewer when the phase has fewer
        connections or requests than workers). Combined, the shares send exactly the
        requests of one process, on the same global schedule."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        active = min(workers, self.concurrency)
        if self.request_count:  # 0: unbounded, until the duration ends
            active = min(active, self.request_count)
        base, extra = divmod(self.concurrency, active)
        return [Share(k, active, base + (1 if k < extra else 0)) for k in range(active)]


@dataclass(frozen=True)
class Share:
    """One load worker's part of a phase: the requests ``index, index + count, ...`` of the
    phase's single global schedule (round robin, so the shares' arrivals together are the
    one-process schedule), over ``concurrency`` of the phase's connections (0: all of them)."""

    index: int = 0
    count: int = 1
    concurrency: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"share index {self.index} not in [0, {self.count})")
        if self.concurrency < 0:
            raise ValueError(f"share concurrency must be >= 0, got {self.concurrency}")

    def requests(self, n: int) -> int:
        """How many of a phase's ``n`` requests fall in this share."""
        return len(range(self.index, n, self.count))
