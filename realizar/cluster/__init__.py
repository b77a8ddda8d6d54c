"""realizar on Ray Serve: replicas that each hold one engine, behind one front (optional extra ``realizar[ray]``).

* ``replica.Replica``: one engine and the single-server app built over it, as ``realizar serve`` builds them;
* ``front.Front``: the HTTP ingress. It keeps the single server's contract (API key, /health, /ready,
  /metrics, 503 while draining) and forwards every other request to a replica;
* ``router.PrefixAffinityRouter``: Ray Serve's request-router interface, choosing the replica by
  ``x-session-id``, then by the longest shared prompt prefix, else by power of two choices;
* ``fleet``: the replicas' /metrics merged, each series with a ``replica`` label, plus fleet sums;
* ``launch``: the ``realizar serve --replicas N`` driver, and ``app_builder`` for ``serve run``/KubeRay.

Only ``messages``, ``prefix`` and ``fleet`` import without Ray; the single-process server imports none of this.
"""
