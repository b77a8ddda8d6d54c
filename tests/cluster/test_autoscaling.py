"""Autoscaling on a local Ray: one replica while idle, two under load, one again after the load."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.cluster.conftest import start_fleet, wait_replicas
from tests.conftest import ServerProcess

pytest.importorskip("ray.serve", reason="the Ray tests need the 'ray' extra: pip install 'realizar[ray]'")
pytestmark = [pytest.mark.ray, pytest.mark.slow]


# Ray Serve's replicas and handles report their ongoing requests to the autoscaler every 10 s by default,
# so realizar averages them over 12 s (LOOK_BACK_S); here they report every half second, averaged over 2 s, so
# that the test waits on the scaling decisions rather than on the reports. The policy (the target of one
# ongoing request per replica, the delays, the limits) is the one given on the command line.
FAST_METRICS = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "REALIZAR_AUTOSCALING_LOOK_BACK_S": "2"}  # realizar.cluster.launch.LOOK_BACK_ENV


@pytest.fixture(scope="module")
def autoscaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_fleet(tmp_path_factory.mktemp("autoscaled"), "--min-replicas", "1", "--max-replicas", "2",
                         "--target-ongoing-requests", "1", "--upscale-delay", "1", "--downscale-delay", "1", env=FAST_METRICS)
    try:
        yield server
    finally:
        assert server.stop(90, whole_group=False) == 0, server.log()[-3000:]


def test_scales_up_under_load_and_back_down(autoscaled: ServerProcess) -> None:
    url = autoscaled.url
    wait_replicas(url, 1)
    stop = threading.Event()
    errors: list[str] = []

    def load(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                r = client.post(url + "/v1/completions", json={"prompt": f"Load {i}: count to ten", "max_tokens": 48,
                                                                "ignore_eos": True})
                if r.status_code != 200:
                    errors.append(r.text)

    workers = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
    for w in workers:
        w.start()
    try:
        wait_replicas(url, 2, timeout=150)  # four requests ongoing against a target of one per replica
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    assert not errors, errors[:3]
    wait_replicas(url, 1, timeout=120)  # idle again: back to --min-replicas
    r = httpx.post(url + "/generate", json={"prompt": "still there?", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
