"""The seed's seven scenarios, with the seed's defaults."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from realizar.loadtest.config import DEFAULT_URL, LoadTestConfig
from realizar.loadtest.stats import Slo
from realizar.loadtest.workload import (
    RequestSpec,
    ResponseKind,
    check_health,
    check_tokenize,
    json_request,
    make_batch_generate_check,
    make_batch_tokenize_check,
    make_generate_check,
)

SCENARIO_NAMES = ("health", "tokenize", "generate", "batch_tokenize", "batch_generate", "sustained", "spike")
# beyond the seed, run only when named: /stream/generate, with TTFT and ITL
EXTRA_SCENARIO_NAMES = ("stream_generate",)
_POOL_LIMIT = 10_000  # distinct pre-encoded bodies; unbounded runs cycle through them


@dataclass(frozen=True)
class Phase:
    """A stretch of a scenario with its own load and its own statistics."""

    name: str
    title: str
    config: LoadTestConfig


@dataclass(frozen=True)
class Scenario:
    """A named load test: what request ``i`` is, and the phases that send them."""

    name: str
    title: str
    description: str
    phases: tuple[Phase, ...]
    request: Callable[[int], RequestSpec]
    slo: Slo = Slo()
    group: Callable[[int], int] | None = None  # request index -> group reported apart (a turn)

    @property
    def config(self) -> LoadTestConfig:
        """The main phase's config (the spike phase for ``spike``)."""
        for phase in self.phases:
            if phase.name in ("main", "spike"):
                return phase.config
        return self.phases[0].config

    def requests(self, n: int) -> list[RequestSpec]:
        """Request specs for a phase of ``n`` requests (0: unbounded), encoded now."""
        return [self.request(i) for i in range(min(n, _POOL_LIMIT) if n else _POOL_LIMIT)]

    def with_base_url(self, base_url: str) -> Scenario:
        phases = tuple(replace(p, config=replace(p.config, base_url=base_url)) for p in self.phases)
        return replace(self, phases=phases)

    def scaled(self, factor: float) -> Scenario:
        if factor == 1.0:
            return self
        return replace(self, phases=tuple(replace(p, config=p.config.scaled(factor)) for p in self.phases))

    def describe(self) -> dict[str, Any]:
        """The scenario's configuration as data: phases, and request 0 as an example."""
        example = self.request(0)
        return {
            "name": self.name,
            "phases": [{"name": p.name, **{k: v for k, v in p.config.to_dict().items() if k != "base_url"}}
                       for p in self.phases],
            "request": {"method": example.method, "path": example.path, "kind": example.kind.value,
                        "body_example": example.body.decode() if example.body else None},
            "slo": {"e2el_ms": self.slo.e2el_ms, "ttft_ms": self.slo.ttft_ms, "tpot_ms": self.slo.tpot_ms},
        }


def config_hash(data: Any) -> str:
    """A stable hash of a configuration document (keys sorted)."""
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


# ---------------------------------------------------------------- request builders

def health_request(_: int) -> RequestSpec:
    return json_request("GET", "/health", None, check_health)


def tokenize_request(i: int) -> RequestSpec:
    return json_request("POST", "/tokenize", {"text": f"Hello world test message {i}"}, check_tokenize)


_GENERATE_CHECK = make_generate_check(5)
_BATCH_TOKENIZE_CHECK = make_batch_tokenize_check(3)
_BATCH_GENERATE_CHECK = make_batch_generate_check(2, 5)


def generate_request(i: int) -> RequestSpec:
    return json_request("POST", "/generate", {"prompt": f"Hello {i}", "max_tokens": 5, "strategy": "greedy"},
                        _GENERATE_CHECK)


def stream_generate_request(i: int) -> RequestSpec:
    return json_request("POST", "/stream/generate", {"prompt": f"Hello {i}", "max_tokens": 5, "strategy": "greedy"},
                        None, ResponseKind.SSE_NATIVE)


def batch_tokenize_request(i: int) -> RequestSpec:
    texts = [f"Text 1 batch {i}", f"Text 2 batch {i}", f"Text 3 batch {i}"]
    return json_request("POST", "/batch/tokenize", {"texts": texts}, _BATCH_TOKENIZE_CHECK)


def batch_generate_request(i: int) -> RequestSpec:
    body = {"prompts": [f"Prompt 1 batch {i}", f"Prompt 2 batch {i}"], "max_tokens": 5, "strategy": "greedy"}
    return json_request("POST", "/batch/generate", body, _BATCH_GENERATE_CHECK)


# ---------------------------------------------------------------- the seven

def _single(name: str, title: str, description: str, request: Callable[[int], RequestSpec],
            config: LoadTestConfig) -> Scenario:
    # goodput counts requests that succeed within the p99 latency target
    return Scenario(name, title, description, (Phase("main", title, config),), request, Slo(e2el_ms=500.0))


def seed_scenarios(base_url: str = DEFAULT_URL, scale: float = 1.0, *, extra: bool = False) -> dict[str, Scenario]:
    """The seven scenarios of the load-testing guide, keyed by name, in order
    (with ``extra``, followed by the opt-in ones of EXTRA_SCENARIO_NAMES)."""
    cfg = LoadTestConfig(base_url=base_url)
    scenarios = [
        _single("health", "Health Endpoint Load Test", "System responsiveness under concurrent health checks",
                health_request, replace(cfg, concurrency=10, total_requests=100, timeout=30.0)),
        _single("tokenize", "Tokenize Endpoint Load Test", "Tokenization throughput",
                tokenize_request, replace(cfg, concurrency=5, total_requests=50, timeout=30.0)),
        _single("generate", "Generate Endpoint Load Test", "Generation latency and stability",
                generate_request, replace(cfg, concurrency=5, total_requests=25, timeout=60.0)),
        _single("batch_tokenize", "Batch Tokenize Load Test", "Batch tokenization efficiency (3 texts each)",
                batch_tokenize_request, replace(cfg, concurrency=5, total_requests=25, timeout=30.0)),
        _single("batch_generate", "Batch Generate Load Test", "Batch generation throughput (2 prompts each)",
                batch_generate_request, replace(cfg, concurrency=3, total_requests=15, timeout=60.0)),
        _single("sustained", "Sustained Load Test (30s)", "System stability under sustained load",
                health_request, replace(cfg, concurrency=10, total_requests=200, timeout=30.0, duration=30.0)),
        Scenario(
            "spike", "Spike Traffic Test", "System resilience under traffic spikes (2 -> 20 clients)",
            (Phase("baseline", "Baseline Load", replace(cfg, concurrency=2, total_requests=10)),
             Phase("spike", "Spike Load (10x)", replace(cfg, concurrency=20, total_requests=100)),
             Phase("recovery", "Recovery Load", replace(cfg, concurrency=2, total_requests=10))),
            health_request, Slo(e2el_ms=500.0)),
    ]
    if extra:
        scenarios.append(_single("stream_generate", "Stream Generate Load Test",
                                 "Streaming generation: TTFT and inter-token latency (SSE)",
                                 stream_generate_request, replace(cfg, concurrency=5, total_requests=25, timeout=60.0)))
    return {s.name: s.scaled(scale) for s in scenarios}
