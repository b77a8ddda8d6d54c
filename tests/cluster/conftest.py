"""Fleets for the Ray tests: `realizar serve --demo --replicas N` processes (each starts its own local Ray),
and a single server with the same engine settings to compare them with."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.conftest import NOT_MEASURED, ServerProcess, start_server

# one thread per replica, and the fast class of quantized products named rather than timed (auto could choose
# differently in two processes): the same numbers in every process, and two replicas fit two cores
ENGINE_ARGS = ("--threads", "1", "--max-num-seqs", "4", "--no-access-log")
ENGINE_ENV = {"REALIZAR_QUANTIZED": "fast"}
API_KEY = "cluster-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def start_fleet(tmp_dir: Any, *args: str, env: dict[str, str] | None = None, wait_ready: bool = True) -> ServerProcess:
    """A fleet, returned once its front answers /health (one replica ready), or at once without ``wait_ready``
    (then ``server.wait_ready()`` before using it). Coverage leaves it out: its Ray workers run the engine and
    routes that the single servers' measure covers."""
    return start_server(tmp_dir, *args, *ENGINE_ARGS, env={**NOT_MEASURED, **ENGINE_ENV, **(env or {})}, wait_ready=wait_ready,
                        timeout=300)


def wait_replicas(url: str, count: int, timeout: float = 180.0) -> float:
    """Wait until /ready reports ``count`` ready replicas; returns the seconds it took."""
    started = time.monotonic()
    last: Any = None
    while time.monotonic() - started < timeout:
        try:
            last = httpx.get(url + "/ready", timeout=5).json()
            if last.get("replicas") == count:
                return time.monotonic() - started
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not reach {count} ready replicas in {timeout} s (last /ready: {last})")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus exposition (the unlabeled one, at the front: the fleet's sum)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in the exposition")
