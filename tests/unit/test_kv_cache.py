"""The KV cache's CPU storage (zeroed, separate per layer, laid out for huge pages) and the block
allocator's prefix cache (hash chain, reference counts, LRU eviction)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from realizar import kernels
from realizar.backends import Backend, CpuKernelsBackend, TorchBackend
from realizar.kv_cache import HUGE_PAGE, BlockAllocator, KVCache, OutOfBlocks, hash_block


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
    assert not cache.quantized and cache.scales(1) == (None, None)
    backend: Backend = TorchBackend(torch.device("cpu"), torch.float32)  # the pure-torch path (CUDA, no compiler)
    if compiled:
        loaded = kernels.load()
        if loaded is None:
            pytest.skip("the kernels are not built here or are switched off")
        backend = CpuKernelsBackend(loaded)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([9, 0, 15])  # block 2 offset 1, block 0 offset 0, block 3 offset 3
    backend.write_kv(cache, 1, slots, k, v)
    keys, values = cache.gather_slots(1, slots)  # [KV, L, hd]
    assert torch.equal(keys, k.transpose(0, 1)) and torch.equal(values, v.transpose(0, 1))
    keys, values = cache.gather_blocks(1, torch.tensor([[2, 0], [3, 1]]))  # [B, KV, 8, hd]
    assert torch.equal(keys[0, :, 1], k[0]) and torch.equal(keys[0, :, 4], k[1])
    assert torch.equal(values[1, :, 3], v[2])
    assert int((keys != 0).any(-1).sum()) == 3 * 2  # three tokens of two heads, nothing else
    assert not cache.keys[0].any() and not cache.values[0].any()


# -- the block allocator's prefix cache ----------------------------------------------------------


def test_block_keys_chain_over_the_whole_prefix() -> None:
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4]) and len(a) == 32
    assert a != hash_block(None, [1, 2, 3, 5])
    assert a != hash_block(None, [1, 2, 3, 4], salt=b"other model")
    # the same block after different prefixes is a different key
    b = hash_block(a, [5, 6, 7, 8])
    assert b != hash_block(hash_block(None, [9, 2, 3, 4]), [5, 6, 7, 8])
    assert b != hash_block(None, [5, 6, 7, 8])
    # token ids past 32 bits do not wrap onto small ones
    assert hash_block(None, [1 << 32]) != hash_block(None, [0])


def test_shared_blocks_are_freed_with_their_last_reference() -> None:
    alloc = BlockAllocator(4, 4)
    block = alloc.allocate()
    alloc.register(block, hash_block(None, [1, 2, 3, 4]))
    assert alloc.share(block) == block and alloc.ref_count(block) == 2
    alloc.free(block)
    assert alloc.ref_count(block) == 1 and alloc.num_free == 3
    alloc.free(block)
    # the last reference went: free to allocate, but still found under its key
    assert alloc.ref_count(block) == 0 and alloc.num_free == 4 and alloc.num_used == 0
    assert alloc.lookup(hash_block(None, [1, 2, 3, 4])) == block
    with pytest.raises(AssertionError):
        alloc.free(block)
    alloc.share(block)  # revived by a sequence with the same prefix
    assert alloc.ref_count(block) == 1 and alloc.num_free == 3
    with pytest.raises(AssertionError):
        alloc.share(alloc.allocate() + 1)  # neither held nor cached


def test_cached_blocks_are_evicted_least_recently_freed_first_and_only_when_needed() -> None:
    alloc = BlockAllocator(4, 4)
    blocks = [alloc.allocate() for _ in range(3)]
    keys = [hash_block(None, [i]) for i in range(3)]
    for block, key in zip(blocks, keys, strict=True):
        alloc.register(block, key)
    alloc.free(blocks[1])
    alloc.free(blocks[0])
    alloc.free(blocks[2])
    # the never-cached free block goes first, then the cached ones in the order they were freed
    plain = alloc.allocate()
    assert plain not in blocks and alloc.num_cached == 3
    assert alloc.allocate() == blocks[1]
    assert alloc.lookup(keys[1]) is None and alloc.block_hash(blocks[1]) is None
    assert alloc.lookup(keys[0]) == blocks[0] and alloc.lookup(keys[2]) == blocks[2]
    alloc.share(blocks[0])  # reused: no longer evictable
    assert alloc.allocate() == blocks[2]
    with pytest.raises(OutOfBlocks):
        alloc.allocate()
    assert alloc.num_cached == 1


def test_freeing_a_sequence_evicts_its_tail_before_its_head() -> None:
    alloc = BlockAllocator(3, 4)
    table = [alloc.allocate() for _ in range(3)]
    key = None
    for i, block in enumerate(table):
        key = hash_block(key, [i])
        alloc.register(block, key)
    head = table[0]
    alloc.free_all(table)
    assert table == [] and alloc.num_free == 3
    assert alloc.allocate() != head and alloc.allocate() != head
    assert alloc.allocate() == head


def test_a_second_block_with_a_registered_prefix_stays_unregistered() -> None:
    alloc = BlockAllocator(4, 4)
    key = hash_block(None, [1, 2, 3, 4])
    first, second = alloc.allocate(), alloc.allocate()
    alloc.register(first, key)
    alloc.register(second, key)  # the same prompt computed side by side
    assert alloc.lookup(key) == first and alloc.block_hash(second) is None
    alloc.free(second)
    alloc.free(first)
    assert alloc.num_cached == 1 and alloc.num_free == 4


def test_released_memory_reads_as_zeros_and_the_cache_still_works() -> None:
    cache = KVCache(2, 4, 16, 3, 64, torch.device("cpu"), torch.float32)
    kv = torch.ones(2, 3, 64)
    cache.write(1, torch.tensor([0, 17]), kv, 2 * kv)
    cache.release_blocks([])  # keep no block: every page goes
    assert not cache.keys[1].any() and not cache.values[1].any()
    cache.write(1, torch.tensor([5]), kv[:1], kv[:1])
    assert cache.keys[1][0, :, 5].eq(1).all() and cache.keys[1].sum().item() == 3 * 64


# -- what the allocator touches, and what it gives back ------------------------------------------


def test_a_freed_block_is_reused_before_a_never_written_one() -> None:
    alloc = BlockAllocator(8, 4)
    first = [alloc.allocate() for _ in range(3)]
    assert first == [0, 1, 2] and alloc.num_touched == 3  # never-written blocks lowest id first
    alloc.free(first[0])
    alloc.free(first[2])
    assert alloc.allocate() == first[2] and alloc.allocate() == first[0]  # the last freed first
    assert alloc.num_touched == 3
    assert alloc.allocate() == 3 and alloc.num_touched == 4


def register_run(alloc: BlockAllocator, count: int, seed: int) -> list[int]:
    """A sequence's ``count`` full blocks, each registered under its own prefix key."""
    table, key = [], None
    for i in range(count):
        key = hash_block(key, [seed, i])
        table.append(alloc.allocate())
        alloc.register(table[-1], key)
    return table


def test_cached_blocks_past_the_bound_are_evicted_before_a_new_block_is_touched() -> None:
    alloc = BlockAllocator(16, 4, max_idle_cached=2)
    alloc.free_all(register_run(alloc, 4, seed=1))  # 4 cached blocks nobody holds: over the bound
    assert alloc.num_cached == 4 and alloc.num_touched == 4
    head = alloc.lookup(hash_block(None, [1, 0]))
    # the least recently freed (the tail: a sequence is freed last block first) is evicted, not block 4 touched
    assert [alloc.allocate(), alloc.allocate()] == [3, 2]
    assert alloc.num_touched == 4 and alloc.num_cached == 2
    # 2 cached blocks may keep their memory: a never-written block rather than one of them
    assert alloc.allocate() == 4 and alloc.lookup(hash_block(None, [1, 0])) == head


def test_without_a_bound_cached_blocks_stay_until_the_pool_runs_out() -> None:
    alloc = BlockAllocator(16, 4)  # max_idle_cached=None: memory allocated up front (CUDA)
    alloc.free_all(register_run(alloc, 4, seed=1))
    assert [alloc.allocate() for _ in range(12)] == list(range(4, 16))
    assert alloc.num_cached == 4 and alloc.allocate() == 3  # only now one is evicted


@pytest.mark.parametrize("bound", [None, 0, 8])
def test_a_run_of_distinct_prompts_touches_at_most_its_peak_plus_the_bound(bound: int | None) -> None:
    """64 waves of 4 sequences of 5 registered blocks each (distinct prompts): an unbounded prefix
    cache walks over the whole pool; a bounded one keeps reusing what the first waves touched."""
    alloc = BlockAllocator(2048, 16, max_idle_cached=bound)
    for wave in range(64):
        tables = [register_run(alloc, 5, seed=wave * 4 + s) for s in range(4)]
        for table in tables:
            alloc.free_all(table)
    if bound is None:
        assert alloc.num_touched == 64 * 4 * 5  # every block ever written is still cached
    else:
        assert alloc.num_touched <= 4 * 5 + bound
        assert alloc.num_cached <= 4 * 5 + bound
    assert alloc.num_free == 2048


def test_release_idle_trims_the_cache_to_its_bound_packs_it_low_and_names_the_blocks_to_keep() -> None:
    alloc = BlockAllocator(16, 4, max_idle_cached=3)
    old = register_run(alloc, 3, seed=1)  # blocks 0-2
    held = register_run(alloc, 2, seed=2)  # 3-4
    plain = [alloc.allocate() for _ in range(2)]  # 5-6
    alloc.free_all(old[:])  # cached, least recently freed
    recent = register_run(alloc, 3, seed=3)  # 7-9
    alloc.free_all(recent[:])  # cached, most recently freed
    alloc.free_all(plain[:])
    assert (old, held, plain, recent) == ([0, 1, 2], [3, 4], [5, 6], [7, 8, 9]) and alloc.num_touched == 10
    keep, moves = alloc.release_idle()
    # the 3 older cached blocks are evicted; the 3 recent ones move into the lowest ids nobody holds
    assert sorted(moves) == [(7, 2), (8, 1), (9, 0)]  # freed last first: 9 is the least recently freed
    assert keep == [0, 1, 2, 3, 4] and alloc.num_cached == 2 + 3
    key = None
    for i, block in enumerate((2, 1, 0)):  # the recent run's prefix keys follow its blocks
        key = hash_block(key, [3, i])
        assert alloc.lookup(key) == block and alloc.block_hash(block) == key
    assert all(alloc.block_hash(b) is None for b in range(5, 16)) and alloc.lookup(hash_block(None, [1, 0])) is None
    # held blocks are untouched; what was released counts as never written: the lowest ids go first
    assert alloc.ref_count(3) == alloc.ref_count(4) == 1 and alloc.num_touched == 5
    assert alloc.allocate() == 5
    # the order of eviction survives the move: the least recently freed goes first
    for block in held:
        alloc.free(block)
    alloc.max_idle_cached = 0
    while alloc.num_cached:
        alloc.allocate()
    assert alloc.num_touched == 6


def test_without_a_bound_release_idle_moves_nothing() -> None:
    alloc = BlockAllocator(8, 4)
    table = register_run(alloc, 4, seed=1)
    alloc.free_all(table[2:])
    keep, moves = alloc.release_idle()
    assert moves == [] and keep == [0, 1, 2, 3] and alloc.num_cached == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_copied_blocks_carry_their_keys_and_values(dtype: torch.dtype) -> None:
    cache = KVCache(2, 8, 16, 1, 64, torch.device("cpu"), dtype)
    assert len(cache.key_scales) == len(cache.value_scales) == (2 if dtype == torch.int8 else 0)
    for layer in range(2):
        for block in range(8):
            cache.keys[layer][block] = block
            cache.values[layer][block] = -block
            for scales in (cache.key_scales + cache.value_scales)[layer::2]:
                scales[block] = block / 2
    cache.copy_blocks([(6, 1), (7, 0)])
    for layer in range(2):
        assert cache.keys[layer][0].eq(7).all() and cache.values[layer][1].eq(-6).all()
        assert cache.keys[layer][6].eq(6).all() and cache.keys[layer][2].eq(2).all()
        for scales in (cache.key_scales + cache.value_scales)[layer::2]:
            assert scales[0].eq(3.5).all() and scales[1].eq(3.0).all() and scales[6].eq(3.0).all()


def page_block_cache(num_blocks: int) -> KVCache:
    """A CPU cache whose block is one 4 KiB page per tensor (1 head x 16 tokens x 64 floats)."""
    return KVCache(2, num_blocks, 16, 1, 64, torch.device("cpu"), torch.float32)


def test_released_blocks_read_as_zeros_and_the_kept_ones_keep_their_contents() -> None:
    cache = page_block_cache(64)
    for layer in range(2):
        cache.keys[layer][:] = 1.0
        cache.values[layer][:] = 2.0
    keep = [0, 5, 6, 63]
    cache.release_blocks(keep)
    for layer in range(2):
        for tensor, value in ((cache.keys[layer], 1.0), (cache.values[layer], 2.0)):
            assert tensor[keep].eq(value).all()
            assert not tensor[[b for b in range(64) if b not in keep]].any()
    cache.keys[1][7] = 3.0  # a released block works again
    assert cache.keys[1][7].eq(3.0).all() and cache.keys[1][6].eq(1.0).all()


def test_released_blocks_of_an_int8_cache_give_back_its_scales_too() -> None:
    """The scales are tensors of their own (4 bytes a row): 1,024 blocks of 16 rows are 64 KiB each."""
    cache = KVCache(1, 1024, 16, 1, 64, torch.device("cpu"), torch.int8)
    assert cache.bytes_per_block(1, 16, 1, 64, torch.int8) == 2 * 16 * (64 + 4)
    for tensor in (*cache.keys, *cache.values):
        tensor.fill_(5)
    for tensor in (*cache.key_scales, *cache.value_scales):
        tensor.fill_(0.25)
    keep = [0, 511, 1023]
    cache.release_blocks(keep)
    for tensor, value in ((cache.keys[0], 5), (cache.values[0], 5), (cache.key_scales[0], 0.25),
                          (cache.value_scales[0], 0.25)):
        assert tensor[keep].eq(value).all()
        assert not tensor[256:400].any()  # whole pages of blocks no one keeps


def anon_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssAnon")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
def test_released_blocks_leave_resident_memory() -> None:
    cache = page_block_cache(8192)  # 2 x 2 tensors of 32 MiB
    for tensor in cache.keys + cache.values:
        tensor.fill_(1.0)
    before = anon_kib()
    cache.release_blocks(list(range(0, 8192, 1024)))  # 8 blocks of each tensor stay
    assert before - anon_kib() > 100 * 1024  # of 128 MiB written
