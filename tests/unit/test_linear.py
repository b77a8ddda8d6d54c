"""Linear layers: the OpenBLAS float32 path against torch's F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from realizar.model.linear import Linear, blas_threads


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


def test_blas_threads_finds_numpys_openblas() -> None:
    np_config = pytest.importorskip("numpy").show_config(mode="dicts")
    if "openblas" not in str(np_config.get("Build Dependencies", {}).get("blas", {})).lower():
        pytest.skip("this numpy is not built on OpenBLAS")
    assert blas_threads(1) is True
