"""thread_pool.c under back-to-back calls of unequal sizes: every unit runs once, before its call returns.

A C program (``thread_pool_check.c``) drives the pool directly, without Python between calls, which is
the timing a forward pass gives it. A worker that read one call's claim word and the next call's
number of units once ran a unit of the next call twice, and that call returned with a unit still
running on a worker, whose arguments on the caller's stack were by then another call's (a server
crashed on it under 64 streams)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from realizar import kernels

KERNELS = Path(kernels.__file__).parent


@pytest.fixture(scope="module")
def check_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = kernels._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    program = tmp_path_factory.mktemp("pool") / "thread_pool_check"
    subprocess.run([compiler, "-O2", "-pthread", f"-I{KERNELS}", str(Path(__file__).with_name("thread_pool_check.c")),
                    str(KERNELS / "thread_pool.c"), "-o", str(program)], check=True, timeout=120)
    return program


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_every_unit_runs_once_before_its_call_returns(check_program: Path, threads: int) -> None:
    """Three threads on two cores (the engine, a worker, and the server's event loop, as served) is where
    the race showed: before the fix, 8 of 9 runs of these (2, 3 and 8 threads) failed."""
    result = subprocess.run([str(check_program), str(threads), "300000"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every unit ran once" in result.stdout
