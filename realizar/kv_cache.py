"""The paged KV cache: a pure-Python block allocator and the tensors it indexes.

The allocator hands out block ids and never touches tensors, so the scheduler can be
tested without a model. ``KVCache`` holds one K and one V tensor per layer, laid out as
``[num_blocks, KV, block_size, hd]``: slot ``block * block_size + offset`` names the token at
``offset`` within that block, and one KV head's tokens of a block are one contiguous run, which
the attention kernel streams.
"""

from __future__ import annotations

import contextlib
import mmap

import numpy as np
import torch

from realizar import kernels


class OutOfBlocks(Exception):
    """The allocator has no free block left."""


class BlockAllocator:
    """Reference-counted fixed-size blocks; ids are 0..num_blocks-1."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives low ids first
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("no free KV-cache block")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """Take another reference to a block in use (e.g. a shared prompt prefix)."""
        assert self._refs[block] > 0, f"block {block} is not allocated"
        self._refs[block] += 1
        return block

    def free(self, block: int) -> None:
        assert self._refs[block] > 0, f"double free of block {block}"
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def free_all(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self.free(block)
        blocks.clear()

    def ref_count(self, block: int) -> int:
        return self._refs[block]


class KVCache:
    """Per-layer K and V tensors addressed by slot (block * block_size + offset)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.block_size = block_size
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.kernels = kernels.for_tensors(device, dtype)
        if device.type == "cpu":
            storage = _host_zeros(2 * num_layers, shape, dtype)
        else:
            storage = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(2 * num_layers)]
        self.keys, self.values = storage[:num_layers], storage[num_layers:]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values [T, KV, hd] at ``slots`` [T]."""
        if self.kernels is not None:
            self.kernels.write_kv(self.keys[layer], self.values[layer], slots, k, v)
            return
        place = self._places(slots)
        self.keys[layer][place] = k
        self.values[layer][place] = v

    def gather_blocks(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, KV, max_blocks * block_size, hd] for block tables [B, max_blocks]."""
        b, nblocks = block_tables.shape
        out = []
        for cache in (self.keys[layer], self.values[layer]):
            gathered = cache[block_tables]  # [B, max_blocks, KV, bs, hd]
            out.append(gathered.transpose(1, 2).reshape(b, cache.shape[1], nblocks * self.block_size, -1))
        return out[0], out[1]

    def gather_slots(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [KV, L, hd] of the tokens at ``slots`` [L]."""
        place = self._places(slots)
        return self.keys[layer][place].transpose(0, 1), self.values[layer][place].transpose(0, 1)

    def _places(self, slots: torch.Tensor) -> tuple[torch.Tensor, slice, torch.Tensor]:
        """The index of the rows [L, KV, hd] of ``slots`` in a layer's tensor."""
        return slots // self.block_size, slice(None), slots % self.block_size


HUGE_PAGE = 2 << 20


def _host_zeros(count: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """``count`` zeroed CPU tensors of ``shape`` in one anonymous mapping.

    Its pages cost no memory until a block is first written, so RSS follows the cache's real
    use. Where the kernel allows it, the mapping is advised as transparent huge pages and each
    tensor starts on a 2 MiB boundary: a block's first write then maps 2 MiB at once rather
    than faulting in 4 KiB pages one by one, which at 16 sequences cost several milliseconds
    per decode step while new blocks were being touched."""
    element = torch.empty(0, dtype=dtype).element_size()
    size = int(np.prod(shape)) * element
    stride = -(-size // HUGE_PAGE) * HUGE_PAGE
    area = mmap.mmap(-1, stride * count + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            area.madvise(mmap.MADV_HUGEPAGE)
    whole = np.frombuffer(area, dtype=np.uint8)
    start = -whole.ctypes.data % HUGE_PAGE
    return [torch.from_numpy(whole[start + i * stride: start + i * stride + size]).view(dtype).view(shape)
            for i in range(count)]
