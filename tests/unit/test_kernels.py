"""The compiled CPU kernels against torch: paged decode attention and the KV-cache write."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from realizar import kernels


@pytest.fixture(scope="module")
def cpu_kernels() -> kernels.CpuKernels:
    loaded = kernels.load()
    if loaded is None:
        # a machine with a C compiler must build them; only a compiler-less one may skip
        assert not any(shutil.which(c) for c in ("cc", "gcc", "clang")), "the kernels failed to build"
        pytest.skip("no C compiler: the engine uses its pure-torch path")
    return loaded


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                        lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Gather each sequence's live slots and run torch's SDPA with K/V repeated per group."""
    group = q.shape[1] // keys.shape[1]
    out = []
    for b in range(q.shape[0]):
        positions = torch.arange(int(lens[b]))
        slots = tables[b, positions // block_size] * block_size + positions % block_size
        k = keys[slots].transpose(0, 1).repeat_interleave(group, dim=0)  # [H, L, hd]
        v = values[slots].transpose(0, 1).repeat_interleave(group, dim=0)
        out.append(F.scaled_dot_product_attention(q[b][:, None], k, v, scale=scale)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 64), (8, 2, 128), (6, 2, 40), (2, 1, 12)])
def test_decode_attention_matches_sdpa(cpu_kernels: kernels.CpuKernels, heads: int, kv_heads: int,
                                       head_dim: int) -> None:
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim)
    block_size, num_blocks = 16, 64
    keys = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen)
    values = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen)
    lens = torch.tensor([1, 3, 16, 17, 50, 129])  # single token, partial blocks, several blocks
    max_blocks = -(-int(lens.max()) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in lens])
    q = torch.randn(len(lens), heads, head_dim, generator=gen) * 3  # peaked softmax too
    scale = head_dim ** -0.5
    got = cpu_kernels.decode_attention(q, keys, values, tables, lens, block_size, scale)
    want = reference_attention(q, keys, values, tables, lens, block_size, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_attention_ignores_padding_and_unwritten_slots(cpu_kernels: kernels.CpuKernels) -> None:
    """Slots past a sequence's length, and the padded block-table entries, are never read."""
    keys = torch.randn(4 * 16, 1, 8)
    values = torch.randn(4 * 16, 1, 8)
    tables = torch.tensor([[2, 0], [1, 3]])
    lens = torch.tensor([5, 20])
    q = torch.randn(2, 2, 8)
    before = cpu_kernels.decode_attention(q, keys, values, tables, lens, 16, 0.35)
    keys[2 * 16 + 5:3 * 16] = float("nan")  # after sequence 0's fifth token
    values[0:16] = float("nan")  # block 0 is only padding for sequence 0
    keys[3 * 16 + 4:] = float("inf")  # after sequence 1's twentieth token
    after = cpu_kernels.decode_attention(q, keys, values, tables, lens, 16, 0.35)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_write_kv_matches_index_copy(cpu_kernels: kernels.CpuKernels) -> None:
    keys = torch.zeros(64, 3, 8)
    values = torch.zeros(64, 3, 8)
    packed = torch.randn(5, 3 * 8 * 3)  # q|k|v packed rows: k and v are strided views, as in the model
    k = packed[:, :24].view(5, 3, 8)
    v = packed[:, 48:].view(5, 3, 8)
    slots = torch.tensor([7, 0, 63, 16, 17])
    cpu_kernels.write_kv(keys, values, slots, k, v)
    want_k, want_v = torch.zeros(64, 3, 8), torch.zeros(64, 3, 8)
    want_k.index_copy_(0, slots, k)
    want_v.index_copy_(0, slots, v)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)


def test_kernels_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALIZAR_KERNELS", "0")
    assert kernels.load() is None
