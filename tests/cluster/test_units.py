"""The cluster's pure parts, without Ray: prompt prefixes for routing, the fleet's metrics merge, and the
promise that the single-process server imports no Ray code."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from realizar.cluster.fleet import merge
from realizar.cluster.prefix import BLOCK_CHARS, block_hashes, prompt_text
from realizar.metrics import Metrics, Outcome
from tests.conftest import ROOT


def test_single_server_and_cli_import_no_ray() -> None:
    code = ("import sys; import realizar.server.app, realizar.server.runner, realizar.cli; "
            "import realizar.cli as c; c.build_parser(); "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_prompt_text_reads_each_api_shape() -> None:
    assert prompt_text(b'{"prompt": "abc", "max_tokens": 3}') == "abc"
    assert prompt_text(b'{"prompts": ["first", "second"]}') == "first"
    assert prompt_text(b'{"prompt": [1, 2, 3]}') == "1,2,3"
    chat = prompt_text(orjson.dumps({"messages": [{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}))
    assert chat is not None and "be brief" in chat and "hi" in chat
    assert prompt_text(b"{oops") is None
    assert prompt_text(b"[1, 2]") is None
    assert prompt_text(b'{"token_ids": [1, 2]}') is None


def test_a_longer_turn_shares_every_block_of_the_earlier_one() -> None:
    turn1 = "s" * (3 * BLOCK_CHARS)
    turn2 = turn1 + "and the next question"
    h1, h2 = block_hashes(turn1), block_hashes(turn2)
    assert len(h1) == 3 and h2[:3] == h1
    other = block_hashes("t" + turn1[1:])
    assert not set(other) & set(h1)  # a different first block shares nothing, though the rest is equal
    assert block_hashes("") == ()


def test_chat_turns_share_the_prefix_of_their_conversation() -> None:
    history = [{"role": "system", "content": "x" * 200}, {"role": "user", "content": "first question"}]
    first = block_hashes(prompt_text(orjson.dumps({"messages": history})) or "")
    later = block_hashes(prompt_text(orjson.dumps({"messages": [*history, {"role": "assistant", "content": "a"},
                                                                {"role": "user", "content": "b"}]})) or "")
    full = len(first) - 1  # the last block of the first turn was partial; the later turn extends it
    assert full >= 3 and later[:full] == first[:full]


def test_fleet_metrics_label_each_replica_and_sum_the_fleet() -> None:
    texts = {}
    for name, tokens in (("r1", 3), ("r2", 5)):
        m = Metrics()
        m.record_request(Outcome.SUCCESS, tokens, 0.5)
        m.observe_http("/generate", "POST", 200, 0.01)
        texts[name] = m.render().decode()
    merged = merge(texts, extra="")
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("realizar_tokens_generated", ())] == 8
    assert samples[("realizar_tokens_generated", (("replica", "r1"),))] == 3
    assert samples[("realizar_tokens_generated", (("replica", "r2"),))] == 5
    assert samples[("realizar_requests_total", ())] == 2
    assert samples[("realizar_avg_latency_ms", ())] == 500.0  # a mean, not a sum
    bucket = ("realizar_http_request_duration_seconds_count", (("method", "POST"), ("route", "/generate"),
                                                               ("status", "200")))
    assert samples[bucket] == 2
    assert families["realizar_requests"].type == "counter"


def test_app_builder_reads_the_serve_config_arguments() -> None:
    pytest.importorskip("ray.serve", reason="the application builder needs the 'ray' extra")
    from ray import serve

    from realizar.cluster.launch import app_builder

    app = app_builder({"model": "/models/m.gguf", "replicas": "none", "min_replicas": "1", "max_replicas": "3",
                       "threads": "2", "enable_prefix_caching": "false", "metrics_compat": "vllm"})
    assert isinstance(app, serve.Application)
    with pytest.raises(ValueError, match="min_replicas"):
        app_builder({"model": "/m.gguf", "replicas": "none", "min_replicas": "3", "max_replicas": "1"})


def test_the_autoscaling_window_may_be_shortened_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray.serve", reason="the launcher needs the 'ray' extra")
    from realizar.cluster.launch import LOOK_BACK_ENV, LOOK_BACK_S, look_back_s

    monkeypatch.delenv(LOOK_BACK_ENV, raising=False)
    assert look_back_s() == LOOK_BACK_S
    monkeypatch.setenv(LOOK_BACK_ENV, "4")
    assert look_back_s() == 4.0
    for bad in ("0", "-1", "nan"):
        monkeypatch.setenv(LOOK_BACK_ENV, bad)
        with pytest.raises(ValueError, match=LOOK_BACK_ENV):
            look_back_s()
