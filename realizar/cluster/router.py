"""``PrefixAffinityRouter``: where the front sends each request, through Ray Serve's request-router interface.

Ray Serve calls ``choose_replicas`` for each request the front's handle sends to the replicas, and sends it
to the least loaded replica of the first rank that has room (each replica reports its queue length; a full
one rejects). The ranks are, in order:

1. a session's replica: requests with the same ``x-session-id`` go to the replica that served the session's
   first request, as long as it lives (and has room);
2. the prefix's replica: the replica that last served the longest leading run of prompt blocks this request
   shares with an earlier one (``realizar.cluster.prefix``), unless its queue is ``imbalance`` or more
   requests longer than the shortest queue's: then the cache hit is not worth the wait;
3. power of two choices: two replicas at random, the one with the shorter queue.

The tables are per front process and bounded (least recently used entries go first); a replica that dies
leaves them at once. The router also keeps the replicas' routing stats (``Replica.record_routing_stats``:
readiness, engine queue, /metrics text) that the front reads for /health, /ready and /metrics, through
``fleet_view``.
"""

from __future__ import annotations

import importlib
import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from realizar.cluster.messages import ForwardedRequest

DEFAULT_IMBALANCE = 4
MAX_PREFIX_ENTRIES = 200_000
MAX_SESSIONS = 100_000

# The one way from the front to the router that Ray builds inside the front's handle: Ray constructs the
# router itself and passes it only picklable keyword arguments, so the router registers here under its
# deployment, and the front (same process) looks it up. Keyed by "app#deployment". Ray ships the router
# class pickled by value, so its methods do not see this module's globals: they register through
# ``importlib.import_module(MODULE)``, which is this module as the front imported it.
MODULE = "realizar.cluster.router"
_ROUTERS: dict[str, PrefixAffinityRouter] = {}


def router_for(app_name: str, deployment_name: str) -> PrefixAffinityRouter | None:
    """The router this process's handle built for the deployment, once it has."""
    return _ROUTERS.get(f"{app_name}#{deployment_name}")


def fleet_view(app_name: str, deployment_name: str) -> list[tuple[str, dict[str, Any]]]:
    """The live replicas this process routes to, as (replica id, its latest routing stats); empty until the
    front's handle has built its router and heard of replicas."""
    router = router_for(app_name, deployment_name)
    if router is None:
        return []
    return [(rid.unique_id, dict(r.routing_stats or {})) for rid, r in list(router.curr_replicas.items())]


class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Session pinning, then prefix affinity while the replica is not overloaded, else power of two choices."""

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **kwargs: Any) -> None:
        self.imbalance = int(imbalance)
        self.by_prefix: OrderedDict[int, ReplicaID] = OrderedDict()
        self.by_session: OrderedDict[str, ReplicaID] = OrderedDict()
        self.routed = {"session": 0, "prefix": 0, "balanced": 0}  # how each request was placed
        registry = importlib.import_module(MODULE)._ROUTERS
        registry[f"{self._deployment_id.app_name}#{self._deployment_id.name}"] = self

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        request = _forwarded(pending_request)
        candidates = candidate_replicas
        if request is not None and request.exclude:
            others = [r for r in candidates if r.replica_id.unique_id not in request.exclude]
            candidates = others or candidates  # the only replicas left: better than none
        if pending_request is not None:
            # ranks that all reject (full queues) are retried with backoff, not in a busy loop
            pending_request.routing_context.should_backoff = True
        ranks: list[list[RunningReplica]] = []
        if request is not None:
            preferred, how = self._preferred(request, candidates)
            if preferred is not None:
                self.routed[how] += 1
                ranks.append([preferred])
                candidates = [r for r in candidates if r is not preferred] or candidates
            else:
                self.routed["balanced"] += 1
        ranks.append(_two_choices(candidates))
        return ranks

    def _preferred(self, request: ForwardedRequest,
                   candidates: list[RunningReplica]) -> tuple[RunningReplica | None, str]:
        by_id = {r.replica_id: r for r in candidates}
        if request.session_id:
            rid = self.by_session.get(request.session_id)
            if rid is not None and rid in by_id:
                return by_id[rid], "session"
        for h in reversed(request.prefix_hashes):
            rid = self.by_prefix.get(h)
            if rid is not None and rid in by_id:
                return (None, "") if self._overloaded(rid, candidates) else (by_id[rid], "prefix")
        return None, ""

    def _overloaded(self, rid: ReplicaID, candidates: list[RunningReplica]) -> bool:
        cache = self.replica_queue_len_cache
        mine = cache.get(rid)
        if mine is None:
            return False  # unknown: the replica rejects the request itself if its queue is full
        shortest = min((q for q in (cache.get(r.replica_id) for r in candidates) if q is not None), default=mine)
        return mine - shortest >= self.imbalance

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request = _forwarded(pending_request)
        if request is None:
            return
        if request.session_id:
            _remember(self.by_session, request.session_id, replica_id, MAX_SESSIONS)
        for h in request.prefix_hashes:
            _remember(self.by_prefix, h, replica_id, MAX_PREFIX_ENTRIES)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget({replica_id})

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self.curr_replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        if gone:
            self._forget(gone)

    def _forget(self, gone: set[ReplicaID]) -> None:
        for h in [h for h, rid in self.by_prefix.items() if rid in gone]:
            del self.by_prefix[h]
        for session in [k for k, rid in self.by_session.items() if rid in gone]:
            del self.by_session[session]


def _forwarded(pending_request: PendingRequest | None) -> ForwardedRequest | None:
    if pending_request is None or not pending_request.args:
        return None
    arg = pending_request.args[0]
    return arg if isinstance(arg, ForwardedRequest) else None


def _remember(table: OrderedDict[Any, ReplicaID], key: Any, rid: ReplicaID, cap: int) -> None:
    table[key] = rid
    table.move_to_end(key)
    if len(table) > cap:
        table.popitem(last=False)


def _two_choices(candidates: list[RunningReplica]) -> list[RunningReplica]:
    return random.sample(candidates, 2) if len(candidates) > 2 else list(candidates)
