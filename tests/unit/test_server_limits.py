"""Connection cap arithmetic, the new ServerConfig checks, and the outcome series of the metrics."""

from __future__ import annotations

import re
import resource

import pytest

from realizar.config import ServerConfig
from realizar.metrics import Metrics, Outcome
from realizar.server.runner import NOFILE_RESERVE, connection_cap, raise_nofile_limit


def test_the_cap_leaves_descriptors_for_the_rest_of_the_process() -> None:
    assert connection_cap(2048, 1 << 20) == 2048
    assert connection_cap(2048, 1024) == 1024 - NOFILE_RESERVE
    assert connection_cap(2048, 200) == 100  # tiny limits: half for connections
    assert connection_cap(10, 1024) == 10


def test_the_soft_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
        raised = raise_nofile_limit()
        assert raised == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised >= min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else raised >= 512
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("field", ["max_messages", "max_connections", "max_header_bytes", "max_headers",
                                   "idle_timeout", "header_timeout", "body_timeout"])
def test_connection_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError):
        ServerConfig(**{field: 0})


def sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_only_server_side_failures_count_as_failed() -> None:
    m = Metrics()
    for outcome, reason in ((Outcome.SUCCESS, ""), (Outcome.FAILED, ""), (Outcome.REFUSED, "overloaded"),
                            (Outcome.REFUSED, "unavailable"), (Outcome.ABORTED, ""), (Outcome.CLIENT_ERROR, "")):
        m.record_request(outcome, 1, 0.5, reason)
    m.reject_connection("header_timeout")
    text = m.render().decode()
    assert sample(text, "realizar_requests_total") == 6
    assert sample(text, "realizar_requests_successful") == 1
    assert sample(text, "realizar_requests_failed") == 1
    assert sample(text, "realizar_error_rate") == pytest.approx(1 / 6)
    assert sample(text, 'realizar_requests_refused_total{reason="overloaded"}') == 1
    assert sample(text, 'realizar_requests_refused_total{reason="unavailable"}') == 1
    assert sample(text, "realizar_requests_aborted_total") == 1
    assert sample(text, "realizar_requests_client_errors_total") == 1
    assert sample(text, 'realizar_connections_rejected_total{reason="header_timeout"}') == 1
