"""Deploy realizar on Ray Serve: ``realizar serve --replicas N`` (``serve_cluster``), and the application
builder that ``serve run`` / a KubeRay RayService import (``app_builder``).

The application is two deployments: ``Replica`` (one engine each; a fixed count, or autoscaled between
``min_replicas`` and ``max_replicas`` on the requests ongoing per replica, which are the engine's running
batch plus its queue) and ``Front`` (the HTTP ingress, no CPU reserved). Ray Serve's HTTP proxy listens on
``host:port`` and hands each request to the front.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from realizar import __version__
from realizar.cluster.front import Front, FrontConfig
from realizar.cluster.replica import Replica, ReplicaSpec
from realizar.cluster.router import DEFAULT_IMBALANCE, PrefixAffinityRouter
from realizar.config import EngineConfig, ServerConfig

log = logging.getLogger("realizar.cluster")

APP_NAME = "realizar"
REPLICA_DEPLOYMENT = "Replica"
FRONT_DEPLOYMENT = "Front"
STATS_PERIOD_S = 1.0  # how often each replica's readiness, queue and /metrics reach the front
LOOK_BACK_S = 12.0  # the window Ray averages the ongoing requests over; it must outlast Ray's metrics push (10 s)
LOOK_BACK_ENV = "REALIZAR_AUTOSCALING_LOOK_BACK_S"


def look_back_s() -> float:
    """The autoscaling window: ``LOOK_BACK_S``, or ``$REALIZAR_AUTOSCALING_LOOK_BACK_S`` for a Ray whose
    replicas and handles push their metrics more often than every 10 s (Ray's
    ``RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S`` and ``..._HANDLE_...``), where a shorter window
    reacts sooner (the Ray tests push every second and average over a few)."""
    value = os.environ.get(LOOK_BACK_ENV)
    if not value:
        return LOOK_BACK_S
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"{LOOK_BACK_ENV} must be a positive number of seconds, not {value!r}")
    return seconds


@dataclass(frozen=True)
class ClusterOptions:
    """How many replicas, and how they scale. ``replicas`` fixes the count; else ``min_replicas`` ..
    ``max_replicas`` autoscale on ``target_ongoing_requests`` per replica."""

    replicas: int | None = 2
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    replica_cpus: float = 1.0  # Ray CPUs each replica reserves
    imbalance: int = DEFAULT_IMBALANCE  # queue-length gap past which prefix affinity yields to balance
    route_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if self.target_ongoing_requests <= 0 or self.replica_cpus < 0 or self.imbalance < 1:
            raise ValueError("target_ongoing_requests and imbalance must be > 0, replica_cpus >= 0")

    @property
    def most_replicas(self) -> int:
        return self.replicas if self.replicas is not None else self.max_replicas


def build_application(spec: ReplicaSpec, options: ClusterOptions, api_key: str | None) -> serve.Application:
    """The Serve application: the front bound to the replicas."""
    engine = spec.engine
    scaling: dict[str, Any]
    if options.replicas is not None:
        scaling = {"num_replicas": options.replicas}
    else:
        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=options.min_replicas, max_replicas=options.max_replicas,
            initial_replicas=max(1, options.min_replicas),
            target_ongoing_requests=options.target_ongoing_requests,
            upscale_delay_s=options.upscale_delay_s, downscale_delay_s=options.downscale_delay_s,
            look_back_period_s=look_back_s())}
    router: dict[str, Any] = {
        "request_router_class": PrefixAffinityRouter,
        "request_router_kwargs": {"imbalance": options.imbalance},
        "request_routing_stats_period_s": STATS_PERIOD_S,
        "request_routing_stats_timeout_s": 10.0,
    }
    replica = serve.deployment(
        name=REPLICA_DEPLOYMENT,
        # The engine's own admission (503 past --max-queued-requests) decides overload, not Ray's queue.
        max_ongoing_requests=engine.max_num_seqs + engine.max_queued_requests + 16,
        ray_actor_options={"num_cpus": options.replica_cpus},
        request_router_config=RequestRouterConfig(**router),
        health_check_period_s=2.0,
        logging_config={"enable_access_log": False},  # the replica's app logs each request (realizar.access)
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=spec.server.shutdown_timeout,
        graceful_shutdown_wait_loop_s=0.5,
        **scaling,
    )(Replica)
    front = serve.deployment(
        name=FRONT_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": False},
        max_ongoing_requests=options.most_replicas * (engine.max_num_seqs + engine.max_queued_requests + 16) + 64,
        graceful_shutdown_timeout_s=spec.server.shutdown_timeout)(Front)
    config = FrontConfig(api_key=api_key, max_body_bytes=spec.server.max_body_bytes, app_name=APP_NAME,
                         replica_deployment=REPLICA_DEPLOYMENT, route_timeout=options.route_timeout)
    return front.bind(replica.bind(spec), config)


def app_builder(args: dict[str, str]) -> serve.Application:
    """For ``serve run realizar.cluster.launch:app_builder model=PATH replicas=2`` and a RayService's
    ``import_path``: every ``EngineConfig``/``ClusterOptions`` field may be given as ``name=value``,
    plus ``model`` (a path on every node), ``api_key``, ``metrics_compat`` and ``shutdown_timeout``."""
    typed: dict[str, dict[str, Any]] = {"engine": {}, "cluster": {}}
    for group, cls in (("engine", EngineConfig), ("cluster", ClusterOptions)):
        for f in fields(cls):
            if f.name in args:
                typed[group][f.name] = _parse(args[f.name], f.type)
    server = ServerConfig(api_key=None, metrics_compat=args.get("metrics_compat") or None,
                          shutdown_timeout=float(args.get("shutdown_timeout", 30.0)), access_log=False)
    spec = ReplicaSpec(args["model"], EngineConfig(**typed["engine"]), server)
    return build_application(spec, ClusterOptions(**typed["cluster"]), args.get("api_key") or None)


def _parse(value: str, annotation: Any) -> Any:
    kind = str(annotation)
    if value.lower() in ("none", "") and "None" in kind:
        return None
    if "bool" in kind:
        return value.lower() in ("1", "true", "yes")
    if "int" in kind:
        return int(value)
    if "float" in kind:
        return float(value)
    return value


def serve_cluster(spec: ReplicaSpec, options: ClusterOptions, *, api_key: str | None, ray_address: str | None,
                  log_level: str = "info") -> int:
    """Run the fleet until SIGTERM/SIGINT; returns the exit status (as ``runner.serve`` does).

    Without ``ray_address`` a local Ray starts here (and stops at exit); with one (``auto``, or
    ``ray://host:10001``) the fleet joins that cluster, whose nodes must have realizar and the model."""
    from realizar.server.runner import bind

    host, port = spec.server.host, spec.server.port
    try:  # the single server's early, one-sentence answer to a busy port, before minutes of start-up
        bind(host, port).close()
    except OSError as exc:
        print(f"realizar: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    local = ray_address is None
    if local:
        # Ray's logical CPUs only place actors: enough for every replica, whatever the core count.
        ray.init(num_cpus=max(os.cpu_count() or 1, int(options.most_replicas * options.replica_cpus + 0.999)),
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=log_level == "debug")
    else:
        ray.init(address=ray_address, logging_level=logging.WARNING, log_to_driver=log_level == "debug")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        started = time.monotonic()
        handle = serve.run(build_application(spec, options, api_key), name=APP_NAME, route_prefix="/",
                           blocking=False)
        while not stop.is_set() and handle.fleet_ready.remote().result() < 1:
            time.sleep(0.2)
        if stop.is_set():
            return 0
        count = f"{options.replicas} replicas" if options.replicas is not None else \
            f"{options.min_replicas}-{options.max_replicas} replicas (autoscaled)"
        print(f"realizar {__version__} serving {spec.model_path} at http://{host}:{port} with {count} on Ray "
              f"({'local' if local else ray_address}), ready in {time.monotonic() - started:.1f} s", flush=True)
        while not stop.wait(0.5):  # a signal may land on one of Ray's threads: the main one must wake to see it
            pass
        print(f"realizar: draining in-flight requests for up to {spec.server.shutdown_timeout:g} s", flush=True)
        if not handle.drain.remote(spec.server.shutdown_timeout).result():
            log.warning("the shutdown timeout passed with requests in flight")
        print("realizar: stopping the replicas", flush=True)
        serve.delete(APP_NAME)
        return 0
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
            print("realizar: Ray stopped", flush=True)
