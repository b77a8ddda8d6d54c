"""Linear layers: the packed-kernel and OpenBLAS float32 paths against torch's F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from realizar import kernels
from realizar.backends import LinearLayer, choose_backend, matmul_threads
from realizar.backends.cpu_kernels import PackedLinear
from realizar.backends.torch_backend import TorchLinear, openblas_setters


@pytest.fixture(autouse=True, params=["kernels", "openblas"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs on both float32 CPU paths: the compiled kernels, and numpy's OpenBLAS."""
    if request.param == "openblas":
        monkeypatch.setenv("REALIZAR_KERNELS", "0")
    elif kernels.load() is None:
        pytest.skip("no C compiler: only the OpenBLAS path exists here")
    return str(request.param)


def Linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> LinearLayer:  # noqa: N802
    """The layer the backend for the weight's device and dtype builds."""
    return choose_backend(weight.device, weight.dtype).linear([weight], bias)


def test_each_path_builds_its_own_layer(cpu_path: str) -> None:
    layer = Linear(torch.randn(4, 3))
    assert isinstance(layer, PackedLinear if cpu_path == "kernels" else TorchLinear)


@pytest.mark.parametrize("rows", [1, 3, 16, 70])
def test_float32_cpu_matches_f_linear(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    x = torch.randn(rows, 32, generator=gen)
    torch.testing.assert_close(Linear(weight)(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Linear(weight, bias)(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_rows() -> None:
    weight = torch.randn(10, 6)
    layer = Linear(weight)
    x = torch.randn(6, 4).t()  # [4, 6], not contiguous
    torch.testing.assert_close(layer(x), F.linear(x, weight))
    ids = torch.tensor([3, 0, 9, 3])
    assert torch.equal(layer.rows(ids), weight[ids])


def test_half_precision_falls_back_to_torch() -> None:
    weight = torch.randn(8, 4).to(torch.bfloat16)
    x = torch.randn(2, 4).to(torch.bfloat16)
    layer = Linear(weight)
    assert layer(x).dtype == torch.bfloat16
    assert torch.equal(layer(x), F.linear(x, weight))
    assert torch.equal(layer.rows(torch.tensor([1, 7])), weight[[1, 7]])


def test_matmul_threads_sizes_both_pools(cpu_path: str) -> None:
    np_config = pytest.importorskip("numpy").show_config(mode="dicts")
    if "openblas" in str(np_config.get("Build Dependencies", {}).get("blas", {})).lower():
        assert openblas_setters(), "numpy's OpenBLAS was not found to size"
    compiled = kernels.load()
    for threads in (1, 2):
        matmul_threads(threads)
        if compiled is not None:
            assert compiled.threads() == threads
    assert (cpu_path == "openblas") == (compiled is None)
