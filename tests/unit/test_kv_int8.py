"""The int8 KV cache (``--kv-cache-dtype int8``): each token's row of each KV head stored as integers
and one float32 scale, ``row ~= scale * q`` with ``scale = max |row| / 127``. The kernels' write and the
torch path's (``kv_cache.quantize_rows``) store the same bytes; attention over an int8 cache is float32
attention over its dequantized rows, to float32 rounding (the kernels apply each token's scale once, to its
score and its softmax weight, instead of to each element)."""

from __future__ import annotations

import pytest
import torch

from realizar import kernels
from realizar.backends import CpuKernelsBackend, TorchBackend
from realizar.kv_cache import KVCache, dequantize_rows, quantize_rows
from tests.unit.test_kernels import decode_case, prompt_case
from tests.unit.test_kv_half import tile_chunks


def int8_cache(keys: torch.Tensor, values: torch.Tensor) -> list[torch.Tensor]:
    """Float caches [blocks, KV, bs, hd] as int8 keys, int8 values, and their scales [blocks, KV, bs]."""
    (qk, sk), (qv, sv) = quantize_rows(keys), quantize_rows(values)
    return [qk, qv, sk, sv]


def dequantized(qk: torch.Tensor, qv: torch.Tensor, sk: torch.Tensor, sv: torch.Tensor) -> list[torch.Tensor]:
    return [dequantize_rows(qk, sk), dequantize_rows(qv, sv)]


def test_quantized_rows_are_within_half_a_step_of_the_floats() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 3, 64, generator=gen) * torch.logspace(-6, 4, 50)[:, None, None]
    x[0, 0] = 0.0  # a row of zeros: zeros and a zero scale
    q, scales = quantize_rows(x)
    assert q.dtype == torch.int8 and scales.shape == (50, 3) and int(q.abs().max()) == 127
    assert not q[0, 0].any() and scales[0, 0] == 0
    back = dequantize_rows(q, scales)
    assert ((back - x).abs() <= scales.unsqueeze(-1) * 0.5 * (1 + 1e-5)).all()


@pytest.mark.parametrize("head_dim", [64, 24, 12, 5])
def test_write_kv_stores_what_the_torch_path_stores(cpu_kernels: kernels.CpuKernels, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    kv_heads, tokens = 2, 40
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen) * torch.logspace(-9, 5, tokens)[:, None, None]
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    v[3, 1] = 0.0
    v[4, 0, :3] = torch.tensor([127.0, -63.5, 0.5])  # ties of the rounding at a scale of 1
    keys, values = (torch.zeros(8, kv_heads, 16, head_dim, dtype=torch.int8) for _ in range(2))
    key_scales, value_scales = (torch.zeros(8, kv_heads, 16) for _ in range(2))
    slots = torch.randperm(8 * 16, generator=gen)[:tokens]
    cpu_kernels.write_kv(keys, values, slots, k, v, key_scales, value_scales)
    place = (slots // 16, slice(None), slots % 16)
    for q, scales, x in ((keys, key_scales, k), (values, value_scales, v)):
        want_q, want_scales = quantize_rows(x)
        assert torch.equal(q[place], want_q) and torch.equal(scales[place], want_scales)
    assert values[place][4, 0, :3].tolist() == [127, -64, 0]  # round half to even, as torch.round
    unwritten = torch.ones(8 * 16, dtype=torch.bool)
    unwritten[slots] = False
    assert not keys.view(8 * 16 // 16, kv_heads, 16, head_dim).transpose(1, 2).reshape(128, -1)[unwritten].any()


def test_an_int8_cache_needs_its_scales(cpu_kernels: kernels.CpuKernels) -> None:
    caches = torch.zeros(2, 1, 16, 8, dtype=torch.int8)
    x = torch.randn(1, 1, 8)
    with pytest.raises(TypeError, match="scales"):
        cpu_kernels.write_kv(caches, caches.clone(), torch.tensor([0]), x, x)
    with pytest.raises(TypeError, match="scales"):
        cpu_kernels.write_kv(caches, caches.clone(), torch.tensor([0]), x, x, torch.zeros(2, 1, 8), torch.zeros(2, 1, 8))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 64), (8, 2, 128), (6, 2, 40), (2, 1, 12)])
def test_decode_rows_over_an_int8_cache_equal_float32_over_its_rows(cpu_kernels: kernels.CpuKernels, heads: int,
                                                                   kv_heads: int, head_dim: int) -> None:
    # ragged: partial blocks, many blocks; the last splits its context into parts
    c = decode_case(heads * 31 + head_dim, heads, kv_heads, head_dim, [1, 2, 3, 15, 16, 17, 31, 50, 129, 300, 1000])
    keys, values, tables, lens, q, block_size = c.keys, c.values, c.tables, c.lens, c.q, 16
    qk, qv, sk, sv = int8_cache(keys, values)
    scale = head_dim ** -0.5
    got = cpu_kernels.paged_attention(q, qk, qv, tables, lens, block_size, scale, None, sk, sv)
    want = cpu_kernels.paged_attention(q, *dequantized(qk, qv, sk, sv), tables, lens, block_size, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    # and the int8 rounding is all that differs from the float32 cache's attention
    exact = cpu_kernels.paged_attention(q, keys, values, tables, lens, block_size, scale)
    torch.testing.assert_close(got, exact, rtol=0, atol=0.1)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (8, 2, 128, 16), (4, 4, 40, 5)])
def test_prompt_tiles_over_an_int8_cache_equal_float32_over_its_rows(
        cpu_kernels: kernels.CpuKernels, threads: int, heads: int, kv_heads: int, head_dim: int,
        block_size: int) -> None:
    """Prompt chunks (tiles of rows) mixed with decode rows, as test_kv_half's float16 test."""
    cpu_kernels.set_threads(threads)
    try:
        c = prompt_case(heads * 7 + head_dim + block_size, heads, kv_heads, head_dim, block_size, tile_chunks(block_size))
        qk, qv, sk, sv = int8_cache(c.keys, c.values)
        scale = head_dim ** -0.5
        got = cpu_kernels.paged_attention(c.q, qk, qv, c.tables, c.lens, block_size, scale, c.rows, sk, sv)
        want = cpu_kernels.paged_attention(c.q, *dequantized(qk, qv, sk, sv), c.tables, c.lens, block_size, scale,
                                           c.rows)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    finally:
        cpu_kernels.set_threads(2)


def test_an_int8_cache_is_read_only_where_it_is_live(cpu_kernels: kernels.CpuKernels) -> None:
    """As for float32: slots past a row's length and padded table entries are never read, scales included."""
    qk, qv, sk, sv = int8_cache(torch.randn(4, 1, 16, 8), torch.randn(4, 1, 16, 8))
    tables, lens, q = torch.tensor([[2, 0], [1, 3]]), torch.tensor([5, 20]), torch.randn(2, 2, 8)
    before = cpu_kernels.paged_attention(q, qk, qv, tables, lens, 16, 0.35, None, sk, sv)
    qk[2, :, 5:] = 100
    sk[2, :, 5:] = float("nan")
    qv[0] = -100
    sv[0] = float("nan")
    sk[3, :, 4:] = float("inf")
    assert torch.equal(cpu_kernels.paged_attention(q, qk, qv, tables, lens, 16, 0.35, None, sk, sv), before)


def test_both_backends_write_and_read_an_int8_cache_alike(cpu_kernels: kernels.CpuKernels) -> None:
    """The torch backend (CUDA, no compiler) and the kernels store the same bytes and scales, and the
    gathers give back the dequantized rows."""
    caches = [KVCache(2, 4, 4, 2, 8, torch.device("cpu"), torch.int8) for _ in range(2)]
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([9, 0, 15])
    TorchBackend(torch.device("cpu"), torch.float32).write_kv(caches[0], 1, slots, k, v)
    CpuKernelsBackend(cpu_kernels).write_kv(caches[1], 1, slots, k, v)
    for a, b in zip(caches[0].keys + caches[0].values + caches[0].key_scales + caches[0].value_scales,
                    caches[1].keys + caches[1].values + caches[1].key_scales + caches[1].value_scales, strict=True):
        assert torch.equal(a, b)
    keys, values = caches[0].gather_slots(1, slots)  # [KV, L, hd]
    torch.testing.assert_close(keys, k.transpose(0, 1), rtol=0, atol=float(k.abs().max()) / 254 * 1.0001)
    assert torch.equal(values, dequantize_rows(*quantize_rows(v)).transpose(0, 1))
    keys, values = caches[0].gather_blocks(1, torch.tensor([[2, 0], [3, 1]]), torch.float16)
    assert keys.dtype == torch.float16 and torch.equal(keys[0, :, 1], dequantize_rows(*quantize_rows(k))[0].half())
