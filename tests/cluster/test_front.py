"""The front's retries, in-process: ``Front._forward`` against scripted replicas (no Ray cluster starts)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest

pytest.importorskip("ray.serve", reason="the front needs the 'ray' extra: pip install 'realizar[ray]'")

from ray.exceptions import RayActorError  # noqa: E402

from realizar.cluster import front as front_module  # noqa: E402
from realizar.cluster.front import Front, FrontConfig  # noqa: E402
from realizar.cluster.messages import Accepted, ForwardedRequest, ResponseHead  # noqa: E402

OVERLOADED = orjson.dumps({"error": {"message": "Server overloaded", "type": "server_error", "code": "overloaded"}})


class Reply:
    """A replica's streamed reply: its parts, then the end (or the replica dying, for a RayActorError)."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    async def __anext__(self) -> Any:
        if not self.parts:
            raise StopAsyncIteration
        part = self.parts.pop(0)
        if isinstance(part, BaseException):
            raise part
        return part

    def __aiter__(self) -> Reply:
        return self

    def cancel(self) -> None:
        pass


class Replicas:
    """The deployment handle: each forwarded request gets the next scripted reply."""

    def __init__(self, replies: list[Callable[[ForwardedRequest], list[Any]]]) -> None:
        self.replies = replies
        self.requests: list[ForwardedRequest] = []
        self.handle = self

    def options(self, **_: Any) -> Replicas:
        return self

    def remote(self, request: ForwardedRequest) -> Reply:
        self.requests.append(request)
        return Reply(self.replies.pop(0)(request))


FRONT = Front.__bases__[0]  # the class as written: serve.ingress subclasses it, with an async __del__


def head(status: int, body: bytes, replica: str) -> ResponseHead:
    return ResponseHead(status, ((b"content-type", b"application/json"),), body, False, replica)


def dies(replica: str) -> Callable[[ForwardedRequest], list[Any]]:
    return lambda _: [Accepted(replica), RayActorError()]


def answers(status: int, body: bytes, replica: str) -> Callable[[ForwardedRequest], list[Any]]:
    return lambda _: [head(status, body, replica)]


def forward(replies: list[Callable[[ForwardedRequest], list[Any]]]) -> tuple[int, bytes, Front, Replicas]:
    replicas = Replicas(replies)
    front = FRONT.__new__(FRONT)  # the deployment's state, without Ray Serve's constructor
    front.config = FrontConfig(api_key=None, max_body_bytes=1 << 20, app_name="app", replica_deployment="replica")
    front.replicas, front.retries, front.replica_failures = replicas, 0, 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"prompt": "hi"}', "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"", "headers": []}
    asyncio.run(front._forward(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), front, replicas


def test_a_request_whose_replica_died_waits_for_room_on_another(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front_module, "ROOM_BACKOFF_S", 0.01)
    status, body, front, replicas = forward([dies("a"), answers(503, OVERLOADED, "b"),
                                             answers(503, OVERLOADED, "b"), answers(200, b'{"ok": 1}', "b")])
    assert (status, body) == (200, b'{"ok": 1}')
    assert front.retries == 1 and front.replica_failures == 1
    assert [r.exclude for r in replicas.requests] == [frozenset(), *[frozenset({"a"})] * 3]


def test_a_new_request_is_refused_when_both_replicas_it_tries_are_full() -> None:
    status, body, front, _ = forward([answers(503, OVERLOADED, "a"), answers(503, OVERLOADED, "b")])
    assert status == 503 and orjson.loads(body)["error"]["code"] == "overloaded"
    assert front.retries == 1


def test_a_request_whose_retry_dies_too_gets_a_502() -> None:
    status, body, _, _ = forward([dies("a"), dies("b")])
    assert status == 502 and orjson.loads(body)["error"]["code"] == "replica_failed"
