"""One route list: the app's routes are what the banner shows and what the metrics count."""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.routing import Route

from realizar.cli import _banner
from realizar.config import ServerConfig
from realizar.server.app import ServingMiddleware, build_app, endpoints

GENERATION = {"/generate", "/batch/generate", "/stream/generate", "/v1/completions", "/v1/chat/completions"}


def test_the_banner_lists_every_route_of_the_app() -> None:
    app = build_app(None, ServerConfig())
    listed = endpoints(app)
    assert "GET  /health" in listed and "POST /v1/chat/completions" in listed
    assert not any(e.startswith("HEAD") for e in listed)
    paths = {e.split()[-1] for e in listed}
    assert paths == {r.path for r in app.routes if isinstance(r, Route)}
    banner = _banner("http://127.0.0.1:8000", "m", 1.0, "", listed)
    for endpoint in listed:
        assert f"\n  {endpoint}\n" in banner


def test_the_generation_routes_are_the_apps_generating_routes() -> None:
    app = build_app(None, ServerConfig())
    serving = [m for m in app.user_middleware if isinstance(m, Middleware) and m.cls is ServingMiddleware]
    assert len(serving) == 1
    assert serving[0].kwargs["generation_routes"] == GENERATION
