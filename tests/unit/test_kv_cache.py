"""The KV cache's CPU storage: zeroed, separate per layer, and laid out for huge pages."""

from __future__ import annotations

import pytest
import torch

from realizar.kv_cache import HUGE_PAGE, KVCache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_tensors_are_zeroed_separate_and_aligned(dtype: torch.dtype) -> None:
    cache = KVCache(num_layers=3, num_blocks=10, block_size=16, num_kv_heads=2, head_dim=8,
                    device=torch.device("cpu"), dtype=dtype)
    tensors = cache.keys + cache.values
    assert len(tensors) == 6
    for tensor in tensors:
        assert tensor.shape == (10, 2, 16, 8) and tensor.dtype == dtype and tensor.is_contiguous()
        assert tensor.data_ptr() % HUGE_PAGE == 0
        assert not tensor.any()
    cache.keys[1][5, 0, 3] = 1.0
    cache.values[2][-1, 1, -1] = 2.0
    assert cache.keys[1].sum().item() == 8 and cache.values[2].sum().item() == 16
    assert not any(t.any() for i, t in enumerate(tensors) if i not in (1, 5))


@pytest.mark.parametrize("compiled", [True, False])
def test_written_tokens_come_back_from_both_gathers(compiled: bool) -> None:
    cache = KVCache(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=8,
                    device=torch.device("cpu"), dtype=torch.float32)
    if not compiled:
        cache.kernels = None  # the pure-torch path (CUDA, no compiler)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([9, 0, 15])  # block 2 offset 1, block 0 offset 0, block 3 offset 3
    cache.write(1, slots, k, v)
    keys, values = cache.gather_slots(1, slots)  # [KV, L, hd]
    assert torch.equal(keys, k.transpose(0, 1)) and torch.equal(values, v.transpose(0, 1))
    keys, values = cache.gather_blocks(1, torch.tensor([[2, 0], [3, 1]]))  # [B, KV, 8, hd]
    assert torch.equal(keys[0, :, 1], k[0]) and torch.equal(keys[0, :, 4], k[1])
    assert torch.equal(values[1, :, 3], v[2])
    assert int((keys != 0).any(-1).sum()) == 3 * 2  # three tokens of two heads, nothing else
    assert not cache.keys[0].any() and not cache.values[0].any()
