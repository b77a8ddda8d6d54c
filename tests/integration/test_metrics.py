"""GET /metrics: the series docs/api.md names, fed by the generation routes, valid for promtool."""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest

ORIGINAL = {  # the original realizar server's ten series, names kept as they were
    "realizar_requests_total": "counter",
    "realizar_requests_successful": "gauge",
    "realizar_requests_failed": "gauge",
    "realizar_tokens_generated": "gauge",
    "realizar_inference_time_seconds": "gauge",
    "realizar_requests_per_second": "gauge",
    "realizar_tokens_per_second": "gauge",
    "realizar_avg_latency_ms": "gauge",
    "realizar_error_rate": "gauge",
    "realizar_uptime_seconds": "gauge",
}
SERVING = {
    "realizar_time_to_first_token_seconds": "histogram",
    "realizar_inter_token_latency_seconds": "histogram",
    "realizar_e2e_request_latency_seconds": "histogram",
    "realizar_request_queue_time_seconds": "histogram",
    "realizar_http_request_duration_seconds": "histogram",
    "realizar_num_requests_running": "gauge",
    "realizar_num_requests_waiting": "gauge",
    "realizar_kv_cache_usage_ratio": "gauge",
    "realizar_prompt_tokens_total": "counter",
    "realizar_generation_tokens_total": "counter",
    "realizar_request_success_total": "counter",
    "realizar_num_preemptions_total": "counter",
    "realizar_prefix_cache_queries_total": "counter",
    "realizar_prefix_cache_hits_total": "counter",
}
OUTCOMES = {  # how generation requests ended other than success or server failure, and the connections
    "realizar_requests_refused_total": "counter",
    "realizar_requests_aborted_total": "counter",
    "realizar_requests_client_errors_total": "counter",
    "realizar_http_connections": "gauge",
    "realizar_connections_rejected_total": "counter",
}
# The one name promtool's linter objects to ("abbreviated units"); docs/api.md keeps it from the original server.
KNOWN_LINT = "realizar_avg_latency_ms metric names should not contain abbreviated units"


def scrape(url: str) -> str:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def types(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


def value(text: str, sample: str, *, missing_is_zero: bool = False) -> float:
    """The sum of every sample named exactly ``sample`` (any labels)."""
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(sample)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)]
    assert values or missing_is_zero, f"no sample {sample}"
    return sum(values)


def test_every_series_is_exposed_with_its_type(server_url: str) -> None:
    found = types(scrape(server_url))
    for name, kind in {**ORIGINAL, **SERVING, **OUTCOMES}.items():
        assert found.get(name) == kind, name
    assert not [n for n in found if n.endswith("_created")]


def test_generation_routes_feed_the_series(server_url: str) -> None:
    before = scrape(server_url)
    r = httpx.post(server_url + "/generate", json={"prompt": "Count: one, two,", "max_tokens": 2}, timeout=120)
    assert r.status_code == 200
    generated = r.json()["num_generated"]
    r = httpx.post(server_url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0},
                   timeout=120)
    assert r.status_code == 200
    generated += r.json()["usage"]["completion_tokens"]
    r = httpx.post(server_url + "/generate", json={"prompt": "x", "strategy": "nope"})
    assert r.status_code == 400
    after = scrape(server_url)

    def delta(sample: str) -> float:
        # labelled series have no sample before their first observation
        return value(after, sample) - value(before, sample, missing_is_zero=True)

    assert delta("realizar_requests_total") == 3
    assert delta("realizar_requests_successful") == 2
    # A bad request is the client's error, not a server failure (the original server's meaning of failed).
    assert delta("realizar_requests_failed") == 0
    assert delta("realizar_requests_client_errors_total") == 1
    assert delta("realizar_tokens_generated") == generated
    assert delta("realizar_generation_tokens_total") >= generated
    assert delta("realizar_prompt_tokens_total") > 0
    assert delta("realizar_inference_time_seconds") > 0
    assert delta("realizar_time_to_first_token_seconds_count") >= 2
    assert delta("realizar_e2e_request_latency_seconds_count") >= 2
    assert delta("realizar_request_queue_time_seconds_count") >= 2
    assert delta("realizar_request_success_total") >= 2
    assert value(after, "realizar_avg_latency_ms") > 0
    assert 0 <= value(after, "realizar_error_rate") <= 1
    assert value(after, "realizar_uptime_seconds") > 0
    assert 'realizar_http_request_duration_seconds_count{method="POST",route="/generate",status="200"}' in after


def test_http_route_label_is_the_template_not_the_raw_path(server_url: str) -> None:
    for i in range(3):
        assert httpx.get(f"{server_url}/no/such/path/{i}").status_code == 404
    text = scrape(server_url)
    assert "/no/such/path" not in text
    assert 'route="unmatched",status="404"' in text


def test_promtool_accepts_the_exposition(server_url: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (apt-get install prometheus provides it)")
    # Some traffic first, so histograms and labelled series have samples.
    assert httpx.post(server_url + "/generate", json={"prompt": "Hi", "max_tokens": 1}, timeout=120).status_code == 200
    result = subprocess.run([promtool, "check", "metrics"], input=scrape(server_url), capture_output=True,
                            text=True, timeout=60)
    problems = {line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()}
    # Exit status 3 means lint findings only (1 would be a parse error).
    assert result.returncode in (0, 3), problems
    assert problems <= {KNOWN_LINT}, problems
