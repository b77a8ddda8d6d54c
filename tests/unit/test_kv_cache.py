"""The KV cache's CPU storage (zeroed, separate per layer, laid out for huge pages) and the block
allocator's prefix cache (hash chain, reference counts, LRU eviction)."""

from __future__ import annotations

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
    cache.release_memory()
    assert not cache.keys[1].any() and not cache.values[1].any()
    cache.write(1, torch.tensor([5]), kv[:1], kv[:1])
    assert cache.keys[1][0, :, 5].eq(1).all() and cache.keys[1].sum().item() == 3 * 64
