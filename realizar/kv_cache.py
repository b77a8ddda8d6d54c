"""The paged KV cache: a pure-Python block allocator and the tensors it indexes.

The allocator hands out block ids and never touches tensors, so the scheduler can be
tested without a model. ``KVCache`` holds one K and one V tensor per layer, laid out as
``[num_blocks, KV, block_size, hd]``: slot ``block * block_size + offset`` names the token at
``offset`` within that block, and one KV head's tokens of a block are one contiguous run, which
the attention kernel streams.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import heapq
import mmap
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch


class OutOfBlocks(Exception):
    """The allocator has no free block left."""


BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], salt: bytes = b"") -> BlockHash:
    """The key of a full block: a hash chain over every token up to the block's end.

    It covers the parent block's key, so equal keys mean equal whole prefixes, not merely equal
    blocks. ``salt`` holds anything else that changes a block's K/V (none today; a per-model or
    per-request salt would go there). SHA-256, not Python's ``hash``: a 64-bit hash lets a client
    craft a prompt whose block collides with another user's and read back a wrong answer."""
    digest = hashlib.sha256(parent or b"")
    digest.update(salt)
    digest.update(array.array("q", token_ids).tobytes())
    return digest.digest()


class BlockAllocator:
    """Reference-counted fixed-size blocks; ids are 0..num_blocks-1.

    With prefix caching, a full block whose K/V are computed is registered under its
    :func:`hash_block` key. A registered block whose last reference goes stays cached: it counts as
    free, and :meth:`share` revives it for a sequence with the same prefix until :meth:`allocate`
    needs it for new tokens, which evicts cached blocks least recently freed first, dropping their
    keys.

    On the CPU a block costs memory only once it is first written (``KVCache``'s pages are mapped on
    first touch), so :meth:`allocate` prefers blocks whose memory is already in use: a plain free
    block that held tokens before (the most recently freed first), then, once ``max_idle_cached``
    cached blocks nobody holds are kept, the least recently freed of those, and only then a block
    never written (lowest id first, so that the touched part of the cache stays one compact range).
    Without that bound a run of distinct prompts would register every full block and keep touching
    new ones, until the whole pool was resident. When the engine has nothing to do,
    :meth:`release_idle` trims the cached blocks to the bound, packs them at the lowest ids and names
    the blocks whose memory must stay (``KVCache.release_blocks`` gives back the rest)."""

    def __init__(self, num_blocks: int, block_size: int, max_idle_cached: int | None = None) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        if max_idle_cached is not None and max_idle_cached < 0:
            raise ValueError("max_idle_cached must be >= 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # cached blocks nobody holds that may keep their memory before eviction beats touching a new
        # block (None: no bound, every never-written block goes first: memory allocated up front)
        self.max_idle_cached = max_idle_cached
        self._fresh: list[int] = list(range(num_blocks))  # never written (or released): a min-heap
        self._reused: list[int] = []  # free, not cached, written before: a stack, last freed on top
        self._refs = [0] * num_blocks
        # cached blocks nobody holds, least recently freed first (the dict keeps insertion order)
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks that :meth:`allocate` can hand out: plain free blocks and evictable cached ones."""
        return len(self._fresh) + len(self._reused) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered under a key, held or not."""
        return len(self._cached)

    @property
    def num_touched(self) -> int:
        """Blocks whose memory may be in use: held, cached, or freed since the last :meth:`release_idle`."""
        return self.num_blocks - len(self._fresh)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, count: int) -> bool:
        return count <= self.num_free

    def _over_budget(self) -> bool:
        return self.max_idle_cached is not None and len(self._evictable) > self.max_idle_cached

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        key = self._hash_of[block]
        assert key is not None
        del self._cached[key]
        self._hash_of[block] = None
        return block

    def allocate(self) -> int:
        if self._reused:
            block = self._reused.pop()
        elif self._evictable and (not self._fresh or self._over_budget()):
            block = self._evict()
        elif self._fresh:
            block = heapq.heappop(self._fresh)
        else:
            raise OutOfBlocks("no free KV-cache block")
        self._refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """Take another reference to a block in use (a shared prompt prefix), or revive a cached
        block nobody holds."""
        if self._refs[block] == 0:
            assert block in self._evictable, f"block {block} is neither allocated nor cached"
            del self._evictable[block]
        self._refs[block] += 1
        return block

    def free(self, block: int) -> None:
        assert self._refs[block] > 0, f"double free of block {block}"
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if self._hash_of[block] is not None:
                self._evictable[block] = None  # the most recently freed: evicted last
            else:
                self._reused.append(block)

    def free_all(self, blocks: list[int]) -> None:
        """Free a sequence's blocks, its last first: a prefix's tail is evicted before its head,
        which more sequences share."""
        for block in reversed(blocks):
            self.free(block)
        blocks.clear()

    def release_idle(self) -> tuple[list[int], list[tuple[int, int]]]:
        """Between bursts of work: evict the least recently freed cached blocks beyond
        ``max_idle_cached``, move the cached blocks that stay into the lowest ids no sequence holds,
        and count every other block as never written from now on.

        Returns the held and cached blocks in increasing order, the only ones whose memory must be
        kept (``KVCache.release_blocks`` gives back the rest), and the moves ``(from, to)`` whose K/V
        the caller copies first (``KVCache.copy_blocks``). Without the moves the kept blocks would lie
        scattered among the freed ones (a sequence's blocks interleave with its batch's), and the
        pages they share with freed blocks, up to twice their own size, would stay."""
        while self._over_budget():
            self._evict()
        moves: list[tuple[int, int]] = []
        if self.max_idle_cached is not None:  # else the memory is allocated up front: nothing to pack
            # the lowest ids no sequence holds, as many as there are cached blocks: those already
            # there stay, the others move into the rest of them
            free = [block for block in range(self.num_blocks) if not self._refs[block]]
            targets = set(free[:len(self._evictable)])
            spots = sorted(targets.difference(self._evictable))
            moves = list(zip([block for block in self._evictable if block not in targets], spots, strict=True))
        for block, spot in moves:
            key = self._hash_of[block]
            assert key is not None
            self._hash_of[spot], self._hash_of[block] = key, None
            self._cached[key] = spot
        renamed = dict(moves)
        self._evictable = OrderedDict((renamed.get(block, block), None) for block in self._evictable)  # same order
        self._reused.clear()
        keep = [block for block in range(self.num_blocks) if self._refs[block] or block in self._evictable]
        kept = set(keep)
        self._fresh = [block for block in range(self.num_blocks) if block not in kept]  # sorted: a heap
        return keep, moves

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def lookup(self, key: BlockHash) -> int | None:
        """The cached block registered under ``key``, held or evictable, or None."""
        return self._cached.get(key)

    def register(self, block: int, key: BlockHash) -> None:
        """Record that a held, full block's K/V are those of the prefix ``key`` names. When another
        block already holds that prefix (two equal prompts computed side by side), this one stays
        unregistered and goes back to the plain free list when freed."""
        assert self._refs[block] > 0, f"block {block} is not allocated"
        if self._hash_of[block] is not None or key in self._cached:
            return
        self._hash_of[block] = key
        self._cached[key] = block

    def block_hash(self, block: int) -> BlockHash | None:
        return self._hash_of[block]


class KVCache:
    """Per-layer K and V tensors addressed by slot (block * block_size + offset), of ``dtype``
    (``--kv-cache-dtype``): the model's own, float16 where it computes in float32, or int8.

    An int8 cache holds each token's row of each KV head as integers and one float32 scale,
    ``row ~= scale * q`` with ``scale = max |row| / 127`` (``key_scales`` and ``value_scales``, per layer
    ``[num_blocks, KV, block_size]``): 68 bytes a row of 64 values, against 128 in float16."""

    _host_area: mmap.mmap | None = None  # the CPU tensors' one mapping
    _host_offsets: tuple[int, ...] = ()  # where each CPU tensor starts in it, bytes

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        if dtype not in KV_ELEMENT_BYTES:
            raise ValueError(f"a KV cache holds {', '.join(map(str, KV_ELEMENT_BYTES))}, not {dtype}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        shapes: list[tuple[int, ...]] = [(num_blocks, num_kv_heads, block_size, head_dim)] * (2 * num_layers)
        dtypes = [dtype] * (2 * num_layers)
        if self.quantized:
            shapes += [(num_blocks, num_kv_heads, block_size)] * (2 * num_layers)
            dtypes += [torch.float32] * (2 * num_layers)
        if device.type == "cpu":
            storage, self._host_area, self._host_offsets = _host_zeros(shapes, dtypes)
            # each tensor's start, bytes of one block, and where its reserved span ends in the mapping
            ends = [*self._host_offsets[1:], len(self._host_area)][:len(storage)]
            self._host_spans = [(offset, t.numel() // num_blocks * t.element_size(), end)
                                for t, offset, end in zip(storage, self._host_offsets, ends, strict=True)]
        else:
            storage = [torch.zeros(shape, device=device, dtype=t) for shape, t in zip(shapes, dtypes, strict=True)]
        self.keys, self.values = storage[:num_layers], storage[num_layers:2 * num_layers]
        # the int8 rows' scales, per layer (empty for a float cache)
        self.key_scales, self.value_scales = storage[2 * num_layers:3 * num_layers], storage[3 * num_layers:]

    @property
    def quantized(self) -> bool:
        """Whether the rows are int8 with a scale each."""
        return self.dtype == torch.int8

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A layer's key and value scales ``[num_blocks, KV, block_size]`` of an int8 cache, else Nones."""
        return (self.key_scales[layer], self.value_scales[layer]) if self.quantized else (None, None)

    @property
    def on_host(self) -> bool:
        """Whether the tensors live in the CPU mapping whose pages :meth:`release_blocks` can give back
        (a CUDA cache is allocated up front)."""
        return self._host_area is not None

    def copy_blocks(self, moves: Sequence[tuple[int, int]]) -> None:
        """Copy the K/V of block ``a`` into block ``b`` for each ``(a, b)`` of ``moves``, every layer (no
        ``b`` may be an ``a``)."""
        if not moves:
            return
        source, target = [a for a, _ in moves], [b for _, b in moves]
        for tensor in (*self.keys, *self.values, *self.key_scales, *self.value_scales):
            if tensor.device.type == "cpu":  # numpy's fancy indexing over the bytes: half torch's time
                rows = tensor.view(torch.uint8).numpy()
                rows[target] = rows[source]
            else:
                tensor[target] = tensor[source]

    def release_blocks(self, keep: Sequence[int]) -> None:
        """Give back the pages of a CPU cache that hold no block of ``keep`` (increasing block ids);
        the other blocks read as zeros when next touched. Every free block's pages go, written or
        not: a block's first write maps a whole 2 MiB huge page around it, hundreds of blocks, and
        this splits such a page and frees all of it but the kept blocks' pages. A page shared with a
        kept block stays."""
        if self._host_area is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        gaps, start = [], 0  # runs [a, b) of blocks to give back
        for block in [*keep, self.num_blocks]:
            if block > start:
                gaps.append((start, block))
            start = block + 1
        page = mmap.PAGESIZE
        for offset, size, span_end in self._host_spans:
            for a, b in gaps:
                first = -(-(offset + a * size) // page) * page  # whole pages only
                # the last run takes the padding up to the next tensor too, which a huge page may hold
                end = span_end if b == self.num_blocks else (offset + b * size) // page * page
                if end > first:
                    self._host_area.madvise(mmap.MADV_DONTNEED, first, end - first)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """K and V of every layer, and an int8 cache's scales (4 bytes a row)."""
        row = head_dim * KV_ELEMENT_BYTES[dtype] + (4 if dtype == torch.int8 else 0)
        return 2 * num_layers * block_size * num_kv_heads * row

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values [T, KV, hd] at ``slots`` [T] by torch indexing, in the cache's dtype (the
        CPU kernels write the same places themselves: ``realizar.backends``)."""
        place = self._places(slots)
        for rows, scales, x in ((self.keys[layer], self.key_scales, k), (self.values[layer], self.value_scales, v)):
            if self.quantized:
                rows[place], scales[layer][place] = quantize_rows(x)
            else:
                rows[place] = x.to(self.dtype)

    def gather_blocks(self, layer: int, block_tables: torch.Tensor,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, KV, max_blocks * block_size, hd] for block tables [B, max_blocks], as ``dtype``
        (None: the cache's own, float32 for an int8 cache, which is dequantized)."""
        b, nblocks = block_tables.shape

        def whole(x: torch.Tensor) -> torch.Tensor:  # [B, max_blocks, KV, bs, hd] -> [B, KV, max_blocks * bs, hd]
            return x.transpose(1, 2).reshape(b, x.shape[2], nblocks * self.block_size, -1).to(dtype or x.dtype)

        return whole(self._read(layer, block_tables, True)), whole(self._read(layer, block_tables, False))

    def gather_slots(self, layer: int, slots: torch.Tensor,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [KV, L, hd] of the tokens at ``slots`` [L], as ``dtype`` (as ``gather_blocks``)."""
        place = self._places(slots)
        keys, values = self._read(layer, place, True), self._read(layer, place, False)
        return keys.transpose(0, 1).to(dtype or keys.dtype), values.transpose(0, 1).to(dtype or values.dtype)

    def _read(self, layer: int, index: torch.Tensor | tuple[torch.Tensor, slice, torch.Tensor],
              key: bool) -> torch.Tensor:
        """A layer's key (or value) rows at ``index``, an int8 cache's dequantized to float32."""
        rows = (self.keys if key else self.values)[layer][index]
        if not self.quantized:
            return rows
        return dequantize_rows(rows, (self.key_scales if key else self.value_scales)[layer][index])

    def _places(self, slots: torch.Tensor) -> tuple[torch.Tensor, slice, torch.Tensor]:
        """The index of the rows [L, KV, hd] of ``slots`` in a layer's tensor."""
        return slots // self.block_size, slice(None), slots % self.block_size


# what a cache's element may be, and its bytes
KV_ELEMENT_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.int8: 1}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x [..., hd]`` as int8 and a float32 scale each: ``q = round(x * (127 / max |x|))``,
    ``scale = max |x| / 127`` (a row of zeros: zeros and 0), in the float32 steps of the kernels' write_kv
    (``paged_attention.c``), so both paths store the same bytes."""
    x = x.float()
    top = x.abs().amax(dim=-1)
    inverse = torch.where(top > 0, 127.0 / top, torch.zeros_like(top))
    return torch.round(x * inverse.unsqueeze(-1)).to(torch.int8), top / 127.0


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``scale * q`` (float32) for int8 rows ``q [..., hd]`` and their scales ``[...]``."""
    return q.float() * scales.unsqueeze(-1)


HUGE_PAGE = 2 << 20


def _host_zeros(shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[torch.dtype]) -> tuple[list[torch.Tensor], mmap.mmap, tuple[int, ...]]:
    """Zeroed CPU tensors of ``shapes`` and ``dtypes`` in one anonymous mapping, and where each starts in it.

    Its pages cost no memory until a block is first written, so RSS follows the cache's real
    use. Where the kernel allows it, the mapping is advised as transparent huge pages and each
    tensor starts on a 2 MiB boundary: a block's first write then maps 2 MiB at once rather
    than faulting in 4 KiB pages one by one, which at 16 sequences cost several milliseconds
    per decode step while new blocks were being touched."""
    sizes = [int(np.prod(shape)) * KV_ELEMENT_BYTES[dtype] for shape, dtype in zip(shapes, dtypes, strict=True)]
    spans = [-(-size // HUGE_PAGE) * HUGE_PAGE for size in sizes]
    area = mmap.mmap(-1, sum(spans) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            area.madvise(mmap.MADV_HUGEPAGE)
    whole = np.frombuffer(area, dtype=np.uint8)
    start = -whole.ctypes.data % HUGE_PAGE
    offsets = tuple(start + sum(spans[:i]) for i in range(len(spans)))
    tensors = [torch.from_numpy(whole[at: at + size]).view(dtype).view(shape)
               for at, size, shape, dtype in zip(offsets, sizes, shapes, dtypes, strict=True)]
    return tensors, area, offsets
