"""What the front and a replica send each other through Ray (plain data, picklable, no Ray imports)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request as the front received it, with what the router needs to place it."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    prefix_hashes: tuple[int, ...] = ()  # chained hashes of the prompt's leading blocks (realizar.cluster.prefix)
    session_id: str | None = None  # the x-session-id header: the session's requests stay on one replica
    exclude: frozenset[str] = field(default_factory=frozenset)  # replicas a retry must avoid


@dataclass(frozen=True)
class Accepted:
    """First item of a reply whose head is not ready at once: the replica has the request (its id, for the
    retry and the header). A reply whose head is ready at once starts with the head, one item fewer."""

    replica_id: str


@dataclass(frozen=True)
class ResponseHead:
    """The response's status and headers, with the first body bytes (held back until the engine produced
    its first token, so that a reply with no body bytes is one the front may still retry elsewhere)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    more_body: bool
    replica_id: str


@dataclass(frozen=True)
class ResponseBody:
    body: bytes
    more_body: bool


Reply = Accepted | ResponseHead | ResponseBody
