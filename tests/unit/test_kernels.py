"""The compiled CPU kernels against torch: the packed matrix product, paged attention (decode
rows and prompt rows), the KV-cache write, RMSNorm, SiLU-and-multiply, RoPE, and the thread
pool they share."""

from __future__ import annotations

import multiprocessing
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from realizar import kernels


def at_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The [L, KV, hd] rows of a cache [blocks, KV, bs, hd] at slots (block * bs + offset)."""
    block_size = cache.shape[2]
    return cache[slots // block_size, :, slots % block_size]


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                        lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Gather each sequence's live slots and run torch's SDPA with K/V repeated per group."""
    group = q.shape[1] // keys.shape[1]
    out = []
    for b in range(q.shape[0]):
        positions = torch.arange(int(lens[b]))
        slots = tables[b, positions // block_size] * block_size + positions % block_size
        k = at_slots(keys, slots).transpose(0, 1).repeat_interleave(group, dim=0)  # [H, L, hd]
        v = at_slots(values, slots).transpose(0, 1).repeat_interleave(group, dim=0)
        out.append(F.scaled_dot_product_attention(q[b][:, None], k, v, scale=scale)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 64), (8, 2, 128), (6, 2, 40), (2, 1, 12)])
def test_paged_attention_decode_rows_match_sdpa(cpu_kernels: kernels.CpuKernels, heads: int, kv_heads: int,
                                       head_dim: int) -> None:
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim)
    block_size, num_blocks = 16, 64
    keys = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=gen)
    values = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=gen)
    lens = torch.tensor([1, 3, 16, 17, 50, 129])  # single token, partial blocks, several blocks
    max_blocks = -(-int(lens.max()) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in lens])
    q = torch.randn(len(lens), heads, head_dim, generator=gen) * 3  # peaked softmax too
    scale = head_dim ** -0.5
    got = cpu_kernels.paged_attention(q, keys, values, tables, lens, block_size, scale)
    want = reference_attention(q, keys, values, tables, lens, block_size, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_paged_attention_ignores_padding_and_unwritten_slots(cpu_kernels: kernels.CpuKernels) -> None:
    """Slots past a sequence's length, and the padded block-table entries, are never read."""
    keys = torch.randn(4, 1, 16, 8)
    values = torch.randn(4, 1, 16, 8)
    tables = torch.tensor([[2, 0], [1, 3]])
    lens = torch.tensor([5, 20])
    q = torch.randn(2, 2, 8)
    before = cpu_kernels.paged_attention(q, keys, values, tables, lens, 16, 0.35)
    keys[2, :, 5:] = float("nan")  # after sequence 0's fifth token
    values[0] = float("nan")  # block 0 is only padding for sequence 0
    keys[3, :, 4:] = float("inf")  # after sequence 1's twentieth token
    after = cpu_kernels.paged_attention(q, keys, values, tables, lens, 16, 0.35)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_paged_attention_prompt_rows_are_causal_over_the_cached_prefix(cpu_kernels: kernels.CpuKernels) -> None:
    """Two decode rows plus the 5-token chunk of a prompt whose first 13 tokens are cached:
    every chunk token sees the prefix and itself, as causal SDPA over the whole context does."""
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, block_size = 6, 2, 16, 4
    keys = torch.randn(20, kv_heads, block_size, head_dim, generator=gen)
    values = torch.randn(20, kv_heads, block_size, head_dim, generator=gen)
    tables = torch.tensor([[3, 9, 0, 0, 0], [11, 0, 0, 0, 0], [5, 1, 17, 2, 8]])  # two decodes, one prompt
    start, n = 13, 5
    rows = torch.tensor([0, 1] + [2] * n)
    lens = torch.tensor([6, 2] + list(range(start + 1, start + n + 1)))
    q = torch.randn(len(rows), heads, head_dim, generator=gen)
    scale = 0.3
    got = cpu_kernels.paged_attention(q, keys, values, tables, lens, block_size, scale, rows)
    want_decode = reference_attention(q[:2], keys, values, tables[:2], lens[:2], block_size, scale)
    positions = torch.arange(start + n)
    slots = tables[2, positions // block_size] * block_size + positions % block_size
    group = heads // kv_heads
    k = at_slots(keys, slots).transpose(0, 1).repeat_interleave(group, dim=0)  # [H, L, hd]
    v = at_slots(values, slots).transpose(0, 1).repeat_interleave(group, dim=0)
    mask = positions[None, :] <= torch.arange(start, start + n)[:, None]
    want_prompt = F.scaled_dot_product_attention(q[2:].transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    torch.testing.assert_close(got, torch.cat([want_decode, want_prompt.transpose(0, 1)]), rtol=1e-5, atol=1e-5)


def prompt_batch(gen: torch.Generator, decode_lens: list[int], chunks: list[tuple[int, int]], block_size: int,
                 num_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block tables, the table of each query row and its context length for ``decode_lens`` decode
    rows followed by prompt chunks ``(start, length)``: row i of a chunk attends to start + i + 1
    tokens of its sequence, whose blocks are scattered over the cache."""
    spans = decode_lens + [start + length for start, length in chunks]
    max_blocks = max(-(-n // block_size) for n in spans)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in spans])
    rows = list(range(len(decode_lens)))
    lens = list(decode_lens)
    for seq, (start, length) in enumerate(chunks, start=len(decode_lens)):
        rows += [seq] * length
        lens += range(start + 1, start + length + 1)
    return tables, torch.tensor(rows), torch.tensor(lens)


@dataclass
class AttentionCase:
    """Random float32 caches ``[blocks, KV, bs, hd]`` and query rows ``q`` over them: row r attends to
    ``lens[r]`` tokens of table ``tables[rows[r]]`` (``rows`` None: ``tables[r]``)."""

    keys: torch.Tensor
    values: torch.Tensor
    tables: torch.Tensor
    rows: torch.Tensor | None
    lens: torch.Tensor
    q: torch.Tensor


def _caches(gen: torch.Generator, num_blocks: int, kv_heads: int, block_size: int,
            head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=gen),
            torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=gen))


def prompt_case(seed: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
                chunks: list[tuple[int, int]], num_blocks: int = 400) -> AttentionCase:
    """The rows of :func:`prompt_batch` for decodes of 1, 40 and 300 tokens and ``chunks``."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = _caches(gen, num_blocks, kv_heads, block_size, head_dim)
    tables, rows, lens = prompt_batch(gen, [1, 40, 300], chunks, block_size, num_blocks)
    q = torch.randn(len(rows), heads, head_dim, generator=gen) * 3  # peaked softmax too
    return AttentionCase(keys, values, tables, rows, lens, q)


def decode_case(seed: int, heads: int, kv_heads: int, head_dim: int, lens: list[int], block_size: int = 16,
                num_blocks: int = 64) -> AttentionCase:
    """A decode row per length of ``lens``, each over blocks scattered over the cache."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = _caches(gen, num_blocks, kv_heads, block_size, head_dim)
    max_blocks = -(-max(lens) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in lens])
    q = torch.randn(len(lens), heads, head_dim, generator=gen) * 3
    return AttentionCase(keys, values, tables, None, torch.tensor(lens), q)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16),   # SmolLM2: the three heads of a group in one pass
    (8, 2, 128, 16),  # groups of 4: a pass of 3 heads and one of 1 (with AVX-512)
    (14, 2, 64, 32),  # groups of 7; two online-softmax steps per block
    (4, 4, 40, 5),    # no grouping; blocks of 5: steps shorter than a pass of keys
    (6, 2, 12, 4),    # head size not a multiple of 8: value columns one at a time at the end
])
def test_prompt_rows_in_tiles_match_sdpa(cpu_kernels: kernels.CpuKernels, threads: int, heads: int, kv_heads: int,
                                         head_dim: int, block_size: int) -> None:
    """Prompt chunks, which the kernel attends in tiles of rows, mixed with decode rows in one
    call: chunks starting inside a block, lengths that are no multiple of the tile (and one too
    short for a tile), contexts of many blocks, against SDPA row by row."""
    cpu_kernels.set_threads(threads)
    try:
        chunks = [(0, 37), (block_size + 3, 29), (11 * block_size - 1, 8), (5, 2), (250, 3), (99, 70)]
        c = prompt_case(heads * 100 + head_dim + block_size, heads, kv_heads, head_dim, block_size, chunks)
        scale = head_dim ** -0.5
        got = cpu_kernels.paged_attention(c.q, c.keys, c.values, c.tables, c.lens, block_size, scale, c.rows)
        want = reference_attention(c.q, c.keys, c.values, c.tables[c.rows], c.lens, block_size, scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        cpu_kernels.set_threads(2)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
@pytest.mark.parametrize("block_size", [16, 5, 320])  # 320: blocks longer than a part's fewest tokens
def test_long_contexts_of_few_rows_split_into_parts_match_sdpa(cpu_kernels: kernels.CpuKernels, threads: int,
                                                               half: bool, block_size: int) -> None:
    """Calls with fewer units of work than the threads can share (one decode row; a short chunk beside a
    decode row) at contexts long enough to split into parts, whose partial softmaxes are merged:
    against SDPA, with scores that grow along the context so that later parts outweigh earlier ones,
    and a context just too short to split."""
    cpu_kernels.set_threads(threads)
    try:
        gen = torch.Generator().manual_seed(block_size * 10 + threads + half)
        heads, kv_heads, head_dim, num_blocks = 9, 3, 64, 24000 // block_size
        keys = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=gen)
        values = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=gen)
        keys += torch.linspace(0, 1, num_blocks)[:, None, None, None]  # scores grow with the block (tables sorted)
        if half:
            keys, values = keys.half(), values.half()
        scale = head_dim ** -0.5
        for decode_lens, chunks in (([3000], []), ([511], []), ([600], []), ([1500], [(2100, 16)]), ([], [(1700, 9)])):
            tables, rows, lens = prompt_batch(gen, decode_lens, chunks, block_size, num_blocks)
            tables = tables.sort(dim=1).values
            q = (torch.randn(len(rows), heads, head_dim, generator=gen) + 1) * 2
            got = cpu_kernels.paged_attention(q, keys, values, tables, lens, block_size, scale, rows)
            want = reference_attention(q, keys.float(), values.float(), tables[rows], lens, block_size, scale)
            case = f"{decode_lens} {chunks}"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, case=case: f"{case}: {m}")
    finally:
        cpu_kernels.set_threads(2)


def test_prompt_tiles_rescale_when_later_keys_score_higher(cpu_kernels: kernels.CpuKernels) -> None:
    """Scores that grow along the context, so that the running max of the online softmax rises
    block after block and every earlier partial sum is rescaled, by factors down to about
    exp(-90) at the larger scale; within float32 rounding of a float64 reference, as torch's
    float32 SDPA is."""
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim, block_size = 6, 2, 32, 16
    keys = torch.randn(64, kv_heads, block_size, head_dim, generator=gen)
    values = torch.randn(64, kv_heads, block_size, head_dim, generator=gen)
    tables, rows, lens = prompt_batch(gen, [], [(100, 60)], block_size, 64)
    slots = tables[0, torch.arange(160) // block_size] * block_size + torch.arange(160) % block_size
    direction = torch.randn(head_dim, generator=gen)
    ramp = torch.linspace(0, 12, 160)[:, None, None] * direction  # key t gains 12 t / 160 along `direction`
    keys[slots // block_size, :, slots % block_size] += ramp
    q = direction.expand(len(rows), heads, head_dim).clone() + 0.1 * torch.randn(len(rows), heads, head_dim,
                                                                                   generator=gen)
    for scale in (0.05, 0.25):
        got = cpu_kernels.paged_attention(q, keys, values, tables, lens, block_size, scale, rows)
        exact = reference_attention(q.double(), keys.double(), values.double(), tables[rows], lens, block_size,
                                    scale)
        # scores up to ~100 carry float32 rounding of ~1e-5 into any float32 result: torch's
        # own SDPA sets the bar
        torch_error = (reference_attention(q, keys, values, tables[rows], lens, block_size, scale) - exact).abs()
        assert (got - exact).abs().max() <= 2 * torch_error.max() + 1e-6


def test_prompt_tiles_read_no_slot_past_their_rows(cpu_kernels: kernels.CpuKernels) -> None:
    """A tile's rows end inside a block: the slots after its last row and the padded block-table
    entries may hold anything (NaN, inf) without changing a result."""
    gen = torch.Generator().manual_seed(9)
    keys = torch.randn(8, 1, 16, 16, generator=gen)
    values = torch.randn(8, 1, 16, 16, generator=gen)
    tables = torch.tensor([[4, 6, 1, 0]])  # 4th entry: padding
    rows = torch.zeros(13, dtype=torch.int64)
    lens = torch.arange(21, 34)  # the chunk's tokens 20..32: the last one is slot 0 of block 1
    q = torch.randn(13, 2, 16, generator=gen)
    before = cpu_kernels.paged_attention(q, keys, values, tables, lens, 16, 0.25, rows)
    keys[1, :, 1:] = float("nan")
    values[1, :, 1:] = float("inf")
    keys[0], values[0] = float("nan"), float("nan")
    after = cpu_kernels.paged_attention(q, keys, values, tables, lens, 16, 0.25, rows)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert torch.isfinite(after).all()


def test_paged_attention_reads_strided_query_rows(cpu_kernels: kernels.CpuKernels) -> None:
    """q as the model passes it: a view into the fused q|k|v rows."""
    qkv = torch.randn(3, 4 * 8 + 2 * 2 * 8)
    q = qkv[:, :32].view(3, 4, 8)
    keys, values = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    tables, lens = torch.tensor([[0, 1], [1, 0], [0, 0]]), torch.tensor([3, 20, 16])
    got = cpu_kernels.paged_attention(q, keys, values, tables, lens, 16, 0.5)
    assert torch.equal(got, cpu_kernels.paged_attention(q.contiguous(), keys, values, tables, lens, 16, 0.5))


def test_write_kv_puts_rows_in_their_slots(cpu_kernels: kernels.CpuKernels) -> None:
    keys = torch.zeros(4, 3, 16, 8)
    values = torch.zeros(4, 3, 16, 8)
    packed = torch.randn(5, 3 * 8 * 3)  # q|k|v packed rows: k and v are strided views, as in the model
    k = packed[:, :24].view(5, 3, 8)
    v = packed[:, 48:].view(5, 3, 8)
    slots = torch.tensor([7, 0, 63, 16, 17])
    cpu_kernels.write_kv(keys, values, slots, k, v)
    want_k, want_v = torch.zeros(4, 3, 16, 8), torch.zeros(4, 3, 16, 8)
    want_k[slots // 16, :, slots % 16] = k
    want_v[slots // 16, :, slots % 16] = v
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    assert torch.equal(at_slots(keys, slots), k) and torch.equal(at_slots(values, slots), v)


def test_kernels_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALIZAR_KERNELS", "0")
    assert kernels.load() is None


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,k", [(16, 1), (17, 5), (40, 64), (100, 576), (1000, 37), (48, 800), (33, 1600)])
def test_gemm_matches_matmul(cpu_kernels: kernels.CpuKernels, threads: int, n: int, k: int) -> None:
    """Every tile shape (1, 2-8 and 9+ rows), partial panels, sums split in passes (k > 768)."""
    cpu_kernels.set_threads(threads)
    try:
        gen = torch.Generator().manual_seed(n * k)
        weight = torch.randn(n, k, generator=gen)
        packed = cpu_kernels.pack(weight)
        for m in (1, 2, 3, 7, 8, 9, 16, 17, 100, 200):
            x = torch.randn(m, k, generator=gen)
            torch.testing.assert_close(cpu_kernels.gemm(x, packed, n), x @ weight.T, rtol=1e-4, atol=1e-4)
    finally:
        cpu_kernels.set_threads(2)


def test_gemm_rows_do_not_depend_on_the_batch(cpu_kernels: kernels.CpuKernels) -> None:
    """A row's product is bit for bit the same alone, in any batch size and any thread count:
    each output is one chain of multiply-adds in a fixed order."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(300, 1000, generator=gen)
    packed = cpu_kernels.pack(weight)
    x = torch.randn(130, 1000, generator=gen)
    alone = cpu_kernels.gemm(x[5:6], packed, 300)[0]
    for threads in (1, 2):
        cpu_kernels.set_threads(threads)
        for m in (6, 8, 16, 130):
            assert torch.equal(cpu_kernels.gemm(x[:m], packed, 300)[5], alone)
    cpu_kernels.set_threads(2)


def test_gemm_reads_strided_rows_and_packs_rows_back(cpu_kernels: kernels.CpuKernels) -> None:
    weight = torch.randn(20, 12)
    packed = cpu_kernels.pack(weight)
    wide = torch.randn(4, 30)
    x = wide[:, 3:15]  # rows 30 floats apart
    torch.testing.assert_close(cpu_kernels.gemm(x, packed, 20), x @ weight.T)
    ids = torch.tensor([19, 0, 16, 5])
    assert torch.equal(packed[ids // kernels.PANEL, :, ids % kernels.PANEL], weight[ids])


def test_rms_norm_matches_torch(cpu_kernels: kernels.CpuKernels) -> None:
    x = torch.randn(70, 576) * 3
    weight = torch.randn(576)
    want = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(cpu_kernels.rms_norm(x, weight, 1e-5), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_kernels.rms_norm(x[:, :100], weight[:100], 1e-5),
                               weight[:100] * (x[:, :100] * torch.rsqrt(x[:, :100].pow(2).mean(-1, keepdim=True) + 1e-5)),
                               rtol=1e-5, atol=1e-5)


def test_silu_mul_matches_torch(cpu_kernels: kernels.CpuKernels) -> None:
    gate_up = torch.randn(40, 2 * 1539) * 5  # not a multiple of 8: the scalar tail too
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, -88.0, 88.0, 1e-30, -1e-30])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=1e-6)


def test_rope_matches_rotate_half(cpu_kernels: kernels.CpuKernels) -> None:
    heads, kv_heads, head_dim = 3, 1, 8
    angles = torch.outer(torch.arange(50.0), 1.0 / (10000 ** (torch.arange(0, head_dim, 2) / head_dim)))
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    qkv = torch.randn(6, (heads + 2 * kv_heads) * head_dim)
    positions = torch.tensor([0, 1, 2, 49, 7, 7])
    rotated = qkv.clone()
    cpu_kernels.rope(rotated, heads + kv_heads, head_dim, positions, cos, sin)
    x = qkv[:, :(heads + kv_heads) * head_dim].view(6, heads + kv_heads, head_dim)
    half = head_dim // 2
    rotate_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    want = x * cos[positions][:, None] + rotate_half * sin[positions][:, None]
    torch.testing.assert_close(rotated[:, :(heads + kv_heads) * head_dim].view_as(want), want)
    assert torch.equal(rotated[:, (heads + kv_heads) * head_dim:], qkv[:, (heads + kv_heads) * head_dim:])  # v untouched


def test_more_threads_than_cores_still_finish_every_call(cpu_kernels: kernels.CpuKernels) -> None:
    """Eight threads on this machine's cores: workers are often descheduled, and a call must
    neither wait for the ones that took no unit nor let a late one take a unit of the next."""
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(200, 64, generator=gen)
    packed = cpu_kernels.pack(weight)
    xs = [torch.randn(m, 64, generator=gen) for m in (1, 5, 16, 40)]
    ok: list[bool] = []

    def calls() -> None:
        ok.extend(torch.allclose(cpu_kernels.gemm(x, packed, 200), x @ weight.T, atol=1e-4)
                  for _ in range(100) for x in xs)

    cpu_kernels.set_threads(8)
    try:
        worker = threading.Thread(target=calls, daemon=True)
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), "a call never returned"
        assert len(ok) == 400 and all(ok)
    finally:
        cpu_kernels.set_threads(2)


def _gemm_in_child(queue: multiprocessing.Queue, x: torch.Tensor, packed: torch.Tensor,  # type: ignore[type-arg]
                   want: np.ndarray) -> None:
    loaded = kernels.load()
    assert loaded is not None
    # numpy compares: torch's own OpenMP ops are not fork-safe, which is torch's matter
    queue.put(bool(np.allclose(loaded.gemm(x, packed, 64).numpy(), want, atol=1e-4)))


def test_a_forked_child_runs_the_kernels_on_its_own(cpu_kernels: kernels.CpuKernels) -> None:
    """A fork keeps none of the parent's pool threads; the child must not wait for them."""
    cpu_kernels.set_threads(2)
    weight, x = torch.randn(64, 32), torch.randn(20, 32)
    packed = cpu_kernels.pack(weight)
    cpu_kernels.gemm(x, packed, 64)  # the parent's workers are up and have run
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_gemm_in_child, args=(queue, x, packed, (x @ weight.T).numpy()))
    child.start()
    child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0 and queue.get(timeout=5) is True


@pytest.mark.parametrize(("flags", "named"), [
    ("fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_int8", "avx512 (vnni)"),
    ("fpu sse2 avx2 avx512f", "avx512"),
    ("fpu sse2 avx2 avx_vnni", "avx2"),
    ("fpu sse2", "generic"),
])
def test_the_isa_names_only_what_the_kernels_use(monkeypatch: pytest.MonkeyPatch, flags: str, named: str) -> None:
    """The banner and /health name the path in use: a CPU's bf16, AVX-VNNI or AMX flags name nothing the
    kernels run."""
    monkeypatch.delenv("REALIZAR_KERNELS_ISA", raising=False)
    monkeypatch.setattr(kernels, "_cpu_signature", lambda: f"x86_64 x86_64 flags : {flags}")
    assert kernels.isa() == named


def test_processes_that_start_together_on_a_cold_cache_build_the_kernels_once(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The build holds a file lock: of several builders that find no kernels (a fleet's replicas starting
    together), one compiles and the others wait and load its file. The compiler is a stand-in here, so that
    the test takes no compile."""
    monkeypatch.setenv("REALIZAR_CACHE_DIR", str(tmp_path))
    compiled: list[Path] = []

    def slow_compile(compiler: str, target: Path, sources: list[Path]) -> Path:
        time.sleep(0.3)  # long enough for every builder to reach the lock
        compiled.append(target)
        target.write_bytes(b"kernels")
        return target

    monkeypatch.setattr(kernels, "_compile", slow_compile)
    monkeypatch.setattr(kernels, "_compiler", lambda: "cc")
    built: list[Path | None] = []
    builders = [threading.Thread(target=lambda: built.append(kernels._build())) for _ in range(4)]
    for b in builders:
        b.start()
    for b in builders:
        b.join(30)
    assert len(compiled) == 1 and built == [compiled[0]] * 4


def test_another_copy_of_the_sources_builds_its_own_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``_build(directory)`` compiles the sources found there (benchmarks/kernel_ab.py times two builds in one
    process): a copy that differs in one byte is another library, built from the copy's files, and this
    package's own build is left as it was."""
    monkeypatch.setenv("REALIZAR_CACHE_DIR", str(tmp_path / "cache"))
    compiled: dict[Path, list[Path]] = {}

    def fake_compile(compiler: str, target: Path, sources: list[Path]) -> Path:
        compiled[target] = sources
        target.write_bytes(b"kernels")
        return target

    monkeypatch.setattr(kernels, "_compile", fake_compile)
    monkeypatch.setattr(kernels, "_compiler", lambda: "cc")
    copy = tmp_path / "other"
    copy.mkdir()
    for path in [*kernels.SOURCES, *kernels.HEADERS]:
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "quant_tiles.c").write_bytes((copy / "quant_tiles.c").read_bytes() + b"\n")
    mine, other = kernels._build(), kernels._build(copy)
    assert mine is not None and other is not None and mine != other
    assert compiled[mine] == kernels.SOURCES
    assert compiled[other] == [copy / name for name in kernels.SOURCE_NAMES]
