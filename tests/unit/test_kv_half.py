"""The float16 KV cache of the CPU kernels (``--kv-cache-dtype float16``): the write rounds to nearest
even as torch does, and attention over a float16 cache is float32 attention over the same rounded
values: bit for bit in prompt tiles (a block is converted, then the float32 code runs), to a few ulp
in decode rows (converted in registers, where the compiler fuses multiply-adds differently)."""

from __future__ import annotations

import pytest
import torch

from realizar import kernels
from tests.unit.test_kernels import decode_case, prompt_case


def tile_chunks(block_size: int) -> list[tuple[int, int]]:
    """Prompt chunks starting inside a block and ending inside one, and one too short for a tile (5, 3)."""
    return [(0, 37), (block_size + 3, 29), (11 * block_size - 1, 8), (5, 3), (250, 70)]


def halves(*caches: torch.Tensor) -> list[torch.Tensor]:
    return [cache.half() for cache in caches]


def test_write_kv_rounds_to_nearest_even_as_torch(cpu_kernels: kernels.CpuKernels) -> None:
    gen = torch.Generator().manual_seed(3)
    kv_heads, head_dim, tokens = 2, 24, 64  # 24: three vectors of 8 per head, and a scalar tail below
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen) * torch.logspace(-9, 5, tokens)[:, None, None]
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    # ties of float16's last bit (odd and even), its subnormals, the largest half, overflow, inf and zeros
    v[0, 0, :8] = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 2 ** -24, 3 * 2 ** -25, 65504, 65520, float("inf"), -0.0])
    v[1, 1, :4] = torch.tensor([-(2 ** -14) * 1.5, 1e-30, -65519.0, 2 ** -25])
    keys, values = (torch.zeros(8, kv_heads, 16, head_dim, dtype=torch.float16) for _ in range(2))
    slots = torch.randperm(8 * 16, generator=gen)[:tokens]
    cpu_kernels.write_kv(keys, values, slots, k, v)
    got_k = keys[slots // 16, :, slots % 16]
    got_v = values[slots // 16, :, slots % 16]
    assert torch.equal(got_k.view(torch.int16), k.half().view(torch.int16))
    assert torch.equal(got_v.view(torch.int16), v.half().view(torch.int16))
    for width in (12, 5):  # heads whose size is not a multiple of 8: the scalar conversions
        small = torch.zeros(2, 1, 16, width, dtype=torch.float16)
        x = torch.randn(3, 1, width, generator=gen)
        cpu_kernels.write_kv(small, small.clone(), torch.tensor([0, 17, 5]), x, x)
        assert torch.equal(small[0, :, 0], x[0].half()) and torch.equal(small[1, :, 1], x[1].half())


def test_write_kv_refuses_a_cache_of_another_dtype(cpu_kernels: kernels.CpuKernels) -> None:
    caches = torch.zeros(2, 1, 16, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32, float16 or int8"):
        cpu_kernels.write_kv(caches, caches.clone(), torch.tensor([0]), torch.randn(1, 1, 8), torch.randn(1, 1, 8))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 64), (8, 2, 128), (6, 2, 40), (2, 1, 12)])
def test_decode_rows_over_a_float16_cache_equal_float32_over_its_values(cpu_kernels: kernels.CpuKernels, heads: int,
                                                                      kv_heads: int, head_dim: int) -> None:
    # ragged: partial blocks, many blocks
    c = decode_case(heads * 31 + head_dim, heads, kv_heads, head_dim, [1, 2, 3, 15, 16, 17, 31, 50, 129, 300])
    keys, values, tables, lens, q, block_size = c.keys, c.values, c.tables, c.lens, c.q, 16
    half_keys, half_values = halves(keys, values)
    scale = head_dim ** -0.5
    got = cpu_kernels.paged_attention(q, half_keys, half_values, tables, lens, block_size, scale)
    want = cpu_kernels.paged_attention(q, half_keys.float(), half_values.float(), tables, lens, block_size, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0], want[0])  # one token: its value row, exactly
    # and the rounding of the cache is all that differs from the float32 cache's attention
    exact = cpu_kernels.paged_attention(q, keys, values, tables, lens, block_size, scale)
    torch.testing.assert_close(got, exact, rtol=0, atol=5e-3)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16), (8, 2, 128, 16), (14, 2, 64, 32), (4, 4, 40, 5), (6, 2, 12, 4)])
def test_prompt_tiles_over_a_float16_cache_equal_float32_over_its_values(
        cpu_kernels: kernels.CpuKernels, threads: int, heads: int, kv_heads: int, head_dim: int,
        block_size: int) -> None:
    """Prompt chunks (tiles of rows) mixed with decode rows, chunks starting inside a block and ending
    inside one, as test_kernels' float32 test of the tiles."""
    cpu_kernels.set_threads(threads)
    try:
        c = prompt_case(heads * 7 + head_dim + block_size, heads, kv_heads, head_dim, block_size, tile_chunks(block_size))
        rows = c.rows
        half_keys, half_values = halves(c.keys, c.values)
        scale = head_dim ** -0.5
        got = cpu_kernels.paged_attention(c.q, half_keys, half_values, c.tables, c.lens, block_size, scale, rows)
        want = cpu_kernels.paged_attention(c.q, half_keys.float(), half_values.float(), c.tables, c.lens, block_size,
                                           scale, rows)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # the rows attended in tiles (chunks of 4 rows or more: all but the decodes and the 3-row chunk)
        tiled = torch.ones(len(rows), dtype=torch.bool)
        tiled[:3] = False
        tiled[3 + 37 + 29 + 8:3 + 37 + 29 + 8 + 3] = False
        assert torch.equal(got[tiled], want[tiled])
    finally:
        cpu_kernels.set_threads(2)


def test_a_float16_cache_is_read_only_where_it_is_live(cpu_kernels: kernels.CpuKernels) -> None:
    """As for float32: slots past a row's length and padded table entries are never read."""
    keys, values = torch.randn(4, 1, 16, 8).half(), torch.randn(4, 1, 16, 8).half()
    tables, lens, q = torch.tensor([[2, 0], [1, 3]]), torch.tensor([5, 20]), torch.randn(2, 2, 8)
    before = cpu_kernels.paged_attention(q, keys, values, tables, lens, 16, 0.35)
    keys[2, :, 5:] = float("nan")
    values[0] = float("nan")
    keys[3, :, 4:] = float("inf")
    assert torch.equal(cpu_kernels.paged_attention(q, keys, values, tables, lens, 16, 0.35), before)
