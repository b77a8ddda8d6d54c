"""The kernels' narrower code paths, built on this CPU with ``REALIZAR_KERNELS_ISA``: the AVX2 build
(its own 8-lane tiles: int16 madd products, F16C conversions) and the AVX-512 build without VNNI (the
16-lane tiles with maddubs dot products, up to 8 rows) must give the same products as the native build's
tests demand, and a row the same floats alone or in a batch (registers up to their row limit, the
dequantized buffer beyond). Each runs the quantized-product tests in a child process, where the build
is chosen before the kernels load."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NOT_MEASURED, ROOT

CPU_FLAGS = set(next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                     "").split()) if Path("/proc/cpuinfo").exists() else set()


def run_on_build(isa: str, needs: set[str], *pytest_args: str) -> None:
    """``pytest pytest_args`` in a child process whose kernels are built for ``isa``."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("REALIZAR_KERNELS_ISA builds x86-64 targets")
    missing = needs - CPU_FLAGS
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}")
    env = {**os.environ, **NOT_MEASURED, "REALIZAR_KERNELS_ISA": isa, "PYTHONPATH": str(ROOT)}
    # one child process (a second one would import torch again): it reports the build the kernels loaded,
    # then runs the tests on that build
    code = ("import sys\nfrom realizar import kernels\nprint('isa:', kernels.isa(), flush=True)\nimport pytest\n"
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *{list(pytest_args)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.stdout.startswith(f"isa: {isa}\n"), result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


# The generic x86-64 build (plain C loops) is left out: GCC takes about 2 minutes to scalarize its
# 512-bit vector code, too long for the suite.
@pytest.mark.parametrize("isa,needs", [("avx2", {"avx2", "fma", "f16c"}),
                                       ("avx512", {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"})])
def test_quantized_products_and_float16_kv_attention_on_a_narrower_build(isa: str, needs: set[str]) -> None:
    """The quantized products, the float16 KV cache's F16C conversions (vcvtph2ps/vcvtps2ph on 8 lanes),
    the int8 cache's (vpmovsxbd on 8 lanes), and the prompt tiles of one query head at a time (16 registers);
    in one child process, which imports torch and collects once."""
    run_on_build(isa, needs, "tests/unit/test_quant_gemm.py", "tests/unit/test_kv_half.py", "tests/unit/test_kv_int8.py",
                 "-k", "product_matches or fast_class or float16_scales or depend_on_the_batch or k_quant or test_kv_half "
                 "or test_kv_int8")
