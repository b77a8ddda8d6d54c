"""The single server's /ready (loaded and warmed, not draining) and --metrics-compat vllm, in-process."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from realizar.config import ServerConfig
from realizar.server.app import attach_engine, begin_shutdown, build_app, fail_loading
from realizar.tokenizer import Tokenizer
from tests.scripted_engine import ScriptedEngine


def get(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    import asyncio

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://realizar.test") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(main())


def test_ready_is_503_until_loaded_200_while_serving_and_503_while_draining(tokenizer: Tokenizer) -> None:
    app = build_app(None, ServerConfig(access_log=False, api_key="k"))
    loading = get(app, "/ready")  # no API key: readiness probes carry none
    assert loading.status_code == 503 and loading.json() == {"status": "loading"}
    assert loading.headers["retry-after"] == "1"
    engine = ScriptedEngine(tokenizer)
    attach_engine(app, engine)
    ready = get(app, "/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "model": "scripted-model"}
    engine.healthy = False
    assert get(app, "/ready").json() == {"status": "unhealthy"}
    engine.healthy = True
    begin_shutdown(app)
    draining = get(app, "/ready")
    assert draining.status_code == 503 and draining.json() == {"status": "draining"}


def test_ready_says_failed_when_the_model_did_not_load() -> None:
    app = build_app(None, ServerConfig(access_log=False))
    fail_loading(app)
    r = get(app, "/ready")
    assert r.status_code == 503 and r.json() == {"status": "failed"}


@pytest.mark.parametrize("compat", [None, "vllm"])
def test_metrics_compat_adds_vllm_gauge_names(tokenizer: Tokenizer, compat: str | None) -> None:
    app = build_app(ScriptedEngine(tokenizer), ServerConfig(access_log=False, metrics_compat=compat))
    text = get(app, "/metrics").text
    names = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
    for name in names:
        line = f'{name}{{model_name="scripted-model"}} 0.0'
        assert (line in text.splitlines()) == (compat == "vllm"), name
    assert "realizar_num_requests_waiting 0.0" in text.splitlines()  # realizar's own names stay


def test_unknown_metrics_compat_is_refused() -> None:
    with pytest.raises(ValueError, match="metrics_compat"):
        ServerConfig(metrics_compat="tgi")
