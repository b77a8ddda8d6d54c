"""Dequantization of GGML tensor types into torch tensors.

Each ``_dequant_*`` function below ports the matching ``dequantize_blocks`` of ``gguf.quants``
(llama.cpp's own Python reference) to torch, keeping its float32 operation order so the results are
bit-identical to the reference (tests compare block for block). Torch is used rather than the numpy
reference because it is several times faster on the large tensors of a real model.
Types without a port here fall back to ``gguf.quants.dequantize`` when the library knows them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from realizar.loading.errors import ModelLoadError

QK_K = 256

# Elements dequantized per chunk: bounds the float32 temporaries of one tensor (about 16 MiB each)
# so a large embedding never needs several full-size float32 copies at once.
CHUNK_ELEMENTS = 1 << 22

BlockFn = Callable[[torch.Tensor], torch.Tensor]


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 stored at byte ``start`` of each block, as float32 of shape (n, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _shifts(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def _nibble_groups(qs: torch.Tensor, width: int) -> torch.Tensor:
    """For each ``width`` bytes of a row, their low nibbles then their high ones: (n, k) uint8 -> (n, 2k)."""
    x = qs.reshape(qs.shape[0], -1, 1, width)
    return torch.cat([x & 0x0F, x >> 4], dim=2).reshape(qs.shape[0], -1)


def _crumb_groups(qs: torch.Tensor, width: int) -> torch.Tensor:
    """For each ``width`` bytes of a row, their bits 0-1, then 2-3, 4-5 and 6-7: (n, k) uint8 -> (n, 4k)."""
    x = qs.reshape(qs.shape[0], -1, 1, width)
    return torch.cat([x & 3, (x >> 2) & 3, (x >> 4) & 3, x >> 6], dim=2).reshape(qs.shape[0], -1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Low nibbles then high nibbles of each row: (n, k) uint8 -> (n, 2k) uint8."""
    return _nibble_groups(qs, qs.shape[1])


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """The 32 bits of a little-endian uint32 stored as 4 bytes: (n, 4) -> (n, 32), bit i at column i."""
    n = qh.shape[0]
    return ((qh.view(n, 4, 1) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8)) & 1).reshape(n, 32)


def _dequant_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:18]).to(torch.float32).sub_(8)
    return q.mul_(d)


def _dequant_q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:20]).to(torch.float32)
    return q.mul_(d).add_(m)


def _dequant_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = (_nibbles(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4)).to(torch.float32).sub_(16)
    return q.mul_(d)


def _dequant_q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = (_nibbles(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4)).to(torch.float32)
    return q.mul_(d).add_(m)


def _dequant_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    x = b[:, 2:34].contiguous().view(torch.int8).to(torch.float32)
    return x.mul_(d)


def _dequant_q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    q = _crumb_groups(qs, 32).reshape(n, 16, 16).to(torch.float32)
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _dequant_q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    # 16 6-bit scales: low 4 bits from bytes 0..7 (two per byte), high 2 bits from bytes 8..11.
    lscales = (scales[:, :8].reshape(n, 1, 8) >> _shifts(0, 4).view(1, 2, 1)).reshape(n, 16)
    hscales = (scales[:, 8:].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6).view(1, 4, 1)).reshape(n, 16)
    sc = ((lscales & 0x0F) | ((hscales & 0x03) << 4)).to(torch.int16) - 32
    dl = (d * sc.to(torch.float32)).view(n, 16, 1)
    ql = _crumb_groups(qs, 32).reshape(n, 16, 16)
    qh = ((hmask.reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)) & 1)
    # The high bit subtracts 4 when it is *clear* (llama.cpp's convention).
    qh = qh.reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int16) - (qh.to(torch.int16) << 2)).to(torch.float32)
    return q.mul_(dl).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the eight 6-bit scales and mins of a Q4_K/Q5_K block from 12 bytes."""
    # bytes 0-3 (d), 4-7 (m) and 8-11 (m_d) as one int32 each: the byte-wise masks and shifts act on four
    # bytes at once (3x faster than on the bytes' strided columns); an arithmetic shift's sign fill is masked
    w = scales.contiguous().view(torch.int32)
    d, m, m_d = w[:, 0:1], w[:, 1:2], w[:, 2:3]
    low6, low4, top2 = 0x3F3F3F3F, 0x0F0F0F0F, 0x30303030
    sc = torch.cat([d & low6, (m_d & low4) | ((d >> 2) & top2)], dim=1)
    mn = torch.cat([m & low6, ((m_d >> 4) & low4) | ((m >> 2) & top2)], dim=1)
    return sc.view(torch.uint8), mn.view(torch.uint8)


def _sub_block_scale_min_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-block scale and min [n, 8, 1] of Q4_K/Q5_K blocks: super-block d and dmin times
    the 6-bit sub-block scales and mins (the min positive: dmin times the stored min)."""
    n = b.shape[0]
    f = _factored_k4(b)
    mins = f.float_mins()
    assert mins is not None
    return f.float_scales().view(n, 8, 1), (-mins).view(n, 8, 1)  # negation is exact


def _dequant_q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dd, dm = _sub_block_scale_min_k4(b)
    q = _q4_k_ints(b).reshape(n, 8, 32).to(torch.float32)
    return q.mul_(dd).sub_(dm).reshape(n, QK_K)


def _dequant_q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dd, dm = _sub_block_scale_min_k4(b)
    q = _q5_k_ints(b).reshape(n, 8, 32).to(torch.float32)
    return q.mul_(dd).sub_(dm).reshape(n, QK_K)


def _dequant_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dd = _factored_q6_k(b).float_scales().view(n, 16, 1)
    q = (_q6_k_ints(b).to(torch.int16) - 32).reshape(n, 16, 16).to(torch.float32)
    return q.mul_(dd).reshape(n, QK_K)


BLOCK_DEQUANTIZERS: dict[QT, BlockFn] = {
    QT.Q4_0: _dequant_q4_0,
    QT.Q4_1: _dequant_q4_1,
    QT.Q5_0: _dequant_q5_0,
    QT.Q5_1: _dequant_q5_1,
    QT.Q8_0: _dequant_q8_0,
    QT.Q2_K: _dequant_q2_k,
    QT.Q3_K: _dequant_q3_k,
    QT.Q4_K: _dequant_q4_k,
    QT.Q5_K: _dequant_q5_k,
    QT.Q6_K: _dequant_q6_k,
}

# Plain float types: a reinterpretation of the bytes, then a cast.
FLOAT_TYPES: dict[QT, torch.dtype] = {
    QT.F32: torch.float32,
    QT.F16: torch.float16,
    QT.BF16: torch.bfloat16,
    QT.F64: torch.float64,
}


def is_supported(qtype: QT) -> bool:
    """Whether tensors of this GGML type can be dequantized (natively or by gguf's reference)."""
    return qtype in FLOAT_TYPES or qtype in BLOCK_DEQUANTIZERS or _has_reference(qtype)


def _has_reference(qtype: QT) -> bool:
    return qtype in gguf.quants._type_traits


def _as_tensor(raw: np.ndarray) -> torch.Tensor:
    """A uint8 torch view of an array's bytes, without a copy."""
    flat = raw.reshape(-1).view(np.uint8)
    if flat.flags.writeable:
        return torch.from_numpy(flat)
    # A read-only memory map: torch warns that writes would be undefined; nothing here writes to it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(flat)


def dequantize(raw: np.ndarray, qtype: QT, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize the raw data of one GGML tensor into a new torch tensor.

    ``raw`` holds the tensor's bytes (any numpy dtype; a memory map is fine and is never written).
    ``shape`` is the logical shape, outermost first (the reverse of GGUF's ``ne`` order).
    The result is a fresh, contiguous tensor of ``dtype`` that does not alias ``raw``.
    """
    shape = tuple(int(s) for s in shape)
    n_elements = int(np.prod(shape)) if shape else 1
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if raw.nbytes != n_elements // block_size * type_size or n_elements % block_size:
        raise ModelLoadError(
            f"{qtype.name} tensor of shape {list(shape)} needs {n_elements // block_size * type_size} bytes "
            f"in blocks of {block_size} elements, got {raw.nbytes} bytes"
        )
    data = _as_tensor(np.ascontiguousarray(raw))

    if qtype in FLOAT_TYPES:
        return data.view(FLOAT_TYPES[qtype]).to(dtype, copy=True).reshape(shape)

    fn = BLOCK_DEQUANTIZERS.get(qtype)
    if fn is None:
        if not _has_reference(qtype):
            raise ModelLoadError(f"unsupported tensor type {qtype.name}")
        # No torch port: use gguf's numpy reference (slower, but exact by definition).
        row_bytes = (shape[-1] if shape else 1) // block_size * type_size
        ref = gguf.quants.dequantize(data.numpy().reshape(-1, row_bytes), qtype)
        return torch.from_numpy(np.ascontiguousarray(ref)).to(dtype, copy=True).reshape(shape)

    n_blocks = n_elements // block_size
    blocks = data.view(n_blocks, type_size)
    step = max(1, CHUNK_ELEMENTS // block_size)
    if n_blocks <= step and dtype == torch.float32:
        return fn(blocks).reshape(shape)  # one chunk: the block function's output is the result
    out = torch.empty((n_blocks, block_size), dtype=dtype)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        out[start:stop] = fn(blocks[start:stop])
    return out.reshape(shape)


@dataclass(frozen=True)
class IntegerWeights:
    """A block-quantized weight ``[n, k]`` as its stored integers and float32 factors:

        w[r, c] = (q[r, c] - offset) * scales[r, c // group]  (+ mins[r, c // 32])

    with the product rounded to float32 before the min is added, which is exactly what the
    dequantizers above compute. ``q`` is uint8 (the int8 bits for Q8_0)."""

    q: torch.Tensor  # uint8 [n, k]
    scales: torch.Tensor  # float32 [n, k // group]
    mins: torch.Tensor | None  # float32 [n, k // 32]
    bits: int
    offset: int
    group: int
    factored: FactoredScales | None = None  # the k-quants' scales and mins as the file stores them


@dataclass(frozen=True)
class FactoredScales:
    """A k-quant's scales as its file stores them: small integers under float16 factors of each 256-term
    super-block, ``IntegerWeights.scales = d * scales`` and ``IntegerWeights.mins = neg_dmin * mins``,
    each product exact in float32 (11 bits by at most 8)."""

    scales: torch.Tensor  # [n, k // group]: uint8 (Q4_K, Q5_K: 6 bits) or int8 (Q6_K)
    mins: torch.Tensor | None  # uint8 [n, k // 32] (Q4_K, Q5_K)
    d: torch.Tensor  # float16 [n, k // 256]
    neg_dmin: torch.Tensor | None  # float16 [n, k // 256]: -dmin (negation is exact)

    def float_scales(self) -> torch.Tensor:
        """``IntegerWeights.scales``: d times each scale, in float32."""
        return self.d.float() * self.scales.float()

    def float_mins(self) -> torch.Tensor | None:
        return None if self.mins is None or self.neg_dmin is None else self.neg_dmin.float() * self.mins.float()

    def rows(self, n: int) -> FactoredScales:
        """The same, per row of an ``[n, k]`` weight rather than per block."""
        return FactoredScales(self.scales.reshape(n, -1), None if self.mins is None else self.mins.reshape(n, -1),
                              self.d.reshape(n, -1), None if self.neg_dmin is None else self.neg_dmin.reshape(n, -1))


# An unpacker's result for (n, type_size) blocks: the integers, their scales and mins in float32, and a k-quant's
# scales as stored
Unpacked = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, FactoredScales | None]


def _ints_q4_0(b: torch.Tensor) -> Unpacked:
    return _nibbles(b[:, 2:18]), _f16(b, 0), None, None


def _ints_q4_1(b: torch.Tensor) -> Unpacked:
    return _nibbles(b[:, 4:20]), _f16(b, 0), _f16(b, 2), None


def _ints_q5_0(b: torch.Tensor) -> Unpacked:
    return _nibbles(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4), _f16(b, 0), None, None


def _ints_q5_1(b: torch.Tensor) -> Unpacked:
    return _nibbles(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4), _f16(b, 0), _f16(b, 2), None


def _ints_q8_0(b: torch.Tensor) -> Unpacked:
    return b[:, 2:34], _f16(b, 0), None, None


def _factored_k4(b: torch.Tensor) -> FactoredScales:
    """Q4_K's and Q5_K's scales and mins as stored: per super-block d and dmin, then 8 6-bit scales and mins."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    return FactoredScales(sc, mn, b[:, 0:2].contiguous().view(torch.float16), -b[:, 2:4].contiguous().view(torch.float16))


def _factored_q6_k(b: torch.Tensor) -> FactoredScales:
    """Q6_K's scales as stored: per super-block d, then 16 signed 8-bit scales."""
    return FactoredScales(b[:, 192:208].contiguous().view(torch.int8), None,
                          b[:, 208:210].contiguous().view(torch.float16), None)


def _q4_k_ints(b: torch.Tensor) -> torch.Tensor:
    """Q4_K's 256 integers of each block (n, 256): each 32 bytes' low nibbles, then their high ones."""
    return _nibble_groups(b[:, 16:144], 32)


def _q5_k_ints(b: torch.Tensor) -> torch.Tensor:
    """Q5_K's: Q4_K's nibbles at bytes 48-175, and bit s of byte i of bytes 16-47 as bit 4 of term 32 s + i."""
    n = b.shape[0]
    high = (b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)) & 1
    return _nibble_groups(b[:, 48:176], 32) | (high.reshape(n, QK_K) << 4)


def _q6_k_ints(b: torch.Tensor) -> torch.Tensor:
    """Q6_K's: for each 128 terms, 64 bytes of low nibbles and 32 of 2-bit high parts (bits 4-5)."""
    return _nibble_groups(b[:, 0:128], 64) | (_crumb_groups(b[:, 128:192], 32) << 4)


def _ints_q4_k(b: torch.Tensor) -> Unpacked:
    f = _factored_k4(b)
    # d * sc and -dmin * m, as the dequantizer's d * sc and dmin * m: products of a float16 by a 6-bit
    # integer are exact in float32, and q * dd - dm == q * dd + (-dm)
    return _q4_k_ints(b), f.float_scales(), f.float_mins(), f


def _ints_q5_k(b: torch.Tensor) -> Unpacked:
    f = _factored_k4(b)
    return _q5_k_ints(b), f.float_scales(), f.float_mins(), f


def _ints_q6_k(b: torch.Tensor) -> Unpacked:
    f = _factored_q6_k(b)
    return _q6_k_ints(b), f.float_scales(), None, f


# type -> (integers and factors of (n, type_size) blocks, bits, offset, terms per scale)
INTEGER_UNPACKERS: dict[QT, tuple[Callable[[torch.Tensor], Unpacked], int, int, int]] = {
    QT.Q4_0: (_ints_q4_0, 4, 8, 32),
    QT.Q4_1: (_ints_q4_1, 4, 0, 32),
    QT.Q5_0: (_ints_q5_0, 5, 16, 32),
    QT.Q5_1: (_ints_q5_1, 5, 0, 32),
    QT.Q8_0: (_ints_q8_0, 8, 0, 32),
    QT.Q4_K: (_ints_q4_k, 4, 0, 32),
    QT.Q5_K: (_ints_q5_k, 5, 0, 32),
    QT.Q6_K: (_ints_q6_k, 6, 32, 16),
}


@dataclass(frozen=True)
class QuantizedTensor:
    """A GGUF weight ``[n, k]`` left in its blocks: ``raw [n, k / block * type_size]`` uint8.

    ``mapped``: ``raw`` is a view of the file's memory map that nothing has written, so its pages can
    leave the process (:meth:`release_pages`) and be read again from the file if it is used again."""

    raw: torch.Tensor
    qtype: QT
    shape: tuple[int, int]
    mapped: bool = False

    def release_pages(self) -> None:
        """Once a backend has its own copy of the weight: the file's pages under ``raw`` leave this
        process's memory (they stay in the page cache). Loading a 1B Q4_K_M model (638 MiB) peaked
        at 2,063 MiB of RSS with every page of the file resident beside the repacked records, and at
        1,430 MiB releasing each weight's pages once it is packed; the steady RSS is 1,158 MiB either way."""
        if self.mapped:
            _drop_pages(self.raw)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.raw.numpy(), self.qtype, self.shape, dtype)

    def integers(self) -> IntegerWeights:
        """The stored integers and their float32 factors (``qtype`` must be in ``INTEGER_UNPACKERS``)."""
        fn, bits, offset, group = INTEGER_UNPACKERS[self.qtype]
        n, k = self.shape
        block_size, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        blocks = self.raw.contiguous().view(-1, type_size)
        q, scales, mins, factored = fn(blocks)
        return IntegerWeights(q.reshape(n, k).contiguous(), scales.reshape(n, -1).contiguous(),
                              None if mins is None else mins.reshape(n, -1).contiguous(), bits, offset, group,
                              None if factored is None else factored.rows(n))

    @staticmethod
    def cat(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
        """Row-wise concatenation of weights of one type and width."""
        assert len({p.qtype for p in parts}) == 1 and len({p.shape[1] for p in parts}) == 1
        return QuantizedTensor(torch.cat([p.raw for p in parts]), parts[0].qtype,
                               (sum(p.shape[0] for p in parts), parts[0].shape[1]))


def keep_quantized(raw: np.ndarray, qtype: QT, shape: Sequence[int], mapped: bool = False) -> QuantizedTensor:
    """The 2-D weight ``raw`` of type ``qtype`` kept in its blocks: a view of ``raw``, which the
    caller repacks and drops (the file's map is not kept alive by the loaded model). ``mapped``: ``raw``
    lies in a file's memory map, unwritten (``QuantizedTensor.mapped``)."""
    n, k = (int(s) for s in shape)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if raw.nbytes != n * (k // block_size) * type_size or k % block_size:
        raise ModelLoadError(f"{qtype.name} tensor of shape {[n, k]} needs {n * (k // block_size) * type_size} "
                             f"bytes in blocks of {block_size} elements, got {raw.nbytes} bytes")
    contiguous = np.ascontiguousarray(raw)
    return QuantizedTensor(_as_tensor(contiguous).view(n, -1), qtype, (n, k),
                           mapped=mapped and np.shares_memory(contiguous, raw))


_MADV_DONTNEED = 4  # Linux: a private file mapping's untouched pages are read from the file again


def _drop_pages(data: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) over the whole pages inside ``data``'s bytes, which must lie in a file's
    memory map that nothing has written (anything else would lose its contents). Linux only; a no-op
    elsewhere or where the call fails."""
    if not sys.platform.startswith("linux"):
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-data.data_ptr() // page) * page
    end = (data.data_ptr() + data.numel() * data.element_size()) // page * page
    if end > start:
        _libc().madvise(start, end - start, _MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc
