"""Q4_K and Q6_K quantizers in numpy, for writing test models (``benchmarks/big_model.py``).

Not a script. The installed ``gguf`` package dequantizes the k-quants but raises
``NotImplementedError`` when asked to quantize them, and llama.cpp's ``llama-quantize`` is not
always built, so the two block formats of a Q4_K_M file are written here. The block layouts are
the ones ``realizar/loading/quants.py`` reads (and llama.cpp's ``block_q4_K`` / ``block_q6_K``).

The scales are chosen in one pass, from each sub-block's range (Q4_K) or largest magnitude
(Q6_K), without llama.cpp's iterative search for the scale that minimises the squared error:
these files hold random weights, and the error stays within the format's step (the round trip
through realizar's dequantizer is tested in ``tests/unit/test_kquants.py``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

QK_K = 256  # elements per super-block of both formats
Q4_K_BYTES = 144  # f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
Q6_K_BYTES = 210  # 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, f16 d

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


def _blocks(x: npt.ArrayLike) -> F32:
    """``x [..., k]`` as float32 super-blocks ``[n, 256]`` (``k`` a multiple of 256)."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 0 or a.shape[-1] % QK_K:
        raise ValueError(f"rows of {a.shape[-1] if a.ndim else 0} elements; k-quants need a multiple of {QK_K}")
    return a.reshape(-1, QK_K)


def _f16_away(x: F32) -> tuple[npt.NDArray[np.float16], F32]:
    """``x`` stored as float16, rounded away from zero, and the float32 value the dequantizer
    reads back. Rounding to nearest could make the factor smaller than ``x``, and then the
    largest sub-block's scale index would overflow its bits: small factors are float16
    subnormals (Gaussian weights of std 0.02 give Q6_K factors near 1e-5) with few bits left."""
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError("a block factor overflows float16: the weights are too large (or not finite) for k-quants")
    short = np.abs(h.astype(np.float32)) < np.abs(x)
    h[short] = np.nextafter(h[short], np.copysign(np.inf, x[short]).astype(np.float16))
    return h, h.astype(np.float32)


def _safe_div(num: F32, den: F32) -> F32:
    """``num / den`` where ``den`` is not zero, 0 elsewhere (an all-zero sub-block)."""
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float32)
    np.divide(num, den, out=out, where=den != 0)
    return out


def quantize_q4_k(x: npt.ArrayLike) -> U8:
    """``x [..., k]`` as Q4_K blocks: returns uint8 ``[..., k / 256 * 144]``.

    Each super-block of 256 has eight sub-blocks of 32, each with a 4-bit scale index and min
    index (6 bits each) relative to the super-block's float16 ``d`` and ``dmin``:
    ``w = q * (d * sc) - dmin * m``, ``q`` in 0..15.
    """
    a = np.asarray(x, dtype=np.float32)
    b = _blocks(a).reshape(-1, 8, 32)
    n = b.shape[0]
    lo = np.minimum(b.min(axis=2), 0.0)  # [n, 8] (the min is subtracted, so never above 0)
    hi = b.max(axis=2)
    scale = (hi - lo) / 15.0  # [n, 8] the step each sub-block wants
    mins = -lo  # [n, 8] >= 0
    d16, d = _f16_away(scale.max(axis=1) / 63.0)  # [n]
    dm16, dm = _f16_away(mins.max(axis=1) / 63.0)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), 0, 63).astype(np.uint8)  # [n, 8]
    mn = np.clip(np.rint(_safe_div(mins, dm[:, None])), 0, 63).astype(np.uint8)
    # the factors exactly as the dequantizer forms them, in float32
    step = d[:, None] * sc.astype(np.float32)  # [n, 8]
    offset = dm[:, None] * mn.astype(np.float32)
    q = np.clip(np.rint(_safe_div(b + offset[:, :, None], step[:, :, None])), 0, 15).astype(np.uint8)

    out = np.empty((n, Q4_K_BYTES), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(n, 2)
    out[:, 2:4] = dm16.view(np.uint8).reshape(n, 2)
    # scales and mins of sub-blocks 0..3 in the low 6 bits of bytes 0..3 / 4..7; those of
    # sub-blocks 4..7 split into a low nibble (bytes 8..11) and 2 high bits (bits 6-7 of 0..7)
    out[:, 4:8] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    # sub-blocks 2c and 2c+1 share 32 bytes: low nibbles hold 2c, high nibbles 2c+1
    pairs = q.reshape(n, 4, 2, 32)
    out[:, 16:] = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return out.reshape(*a.shape[:-1], a.shape[-1] // QK_K * Q4_K_BYTES)


def quantize_q6_k(x: npt.ArrayLike) -> U8:
    """``x [..., k]`` as Q6_K blocks: returns uint8 ``[..., k / 256 * 210]``.

    Each super-block of 256 has sixteen sub-blocks of 16, each with an int8 scale relative to
    the super-block's float16 ``d``: ``w = (q - 32) * (d * sc)``, ``q`` in 0..63.
    """
    a = np.asarray(x, dtype=np.float32)
    b = _blocks(a).reshape(-1, 16, 16)
    n = b.shape[0]
    # each sub-block's largest magnitude maps to -32, as llama.cpp's reference does, so that
    # the full range -32..31 is used and only the opposite extreme can clip (to 31)
    pick = np.take_along_axis(b, np.abs(b).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]  # [n, 16]
    scale = pick / -32.0
    big = np.take_along_axis(scale, np.abs(scale).argmax(axis=1)[:, None], axis=1)[:, 0]  # [n]
    d16, d = _f16_away(big / -128.0)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), -128, 127).astype(np.int8)  # [n, 16]
    step = d[:, None] * sc.astype(np.float32)
    q = (np.clip(np.rint(_safe_div(b, step[:, :, None])), -32, 31) + 32).astype(np.uint8)  # [n, 16, 16]

    # element 128 h + 64 s + j (h half, s in 0..1, j in 0..63): low nibble in bit 4s of ql[64 h + j];
    # element 128 h + 32 t + j (t in 0..3, j in 0..31): high 2 bits in bits 2t of qh[32 h + j]
    halves = q.reshape(n, 2, 128)
    low = (halves & 0x0F).reshape(n, 2, 2, 64)
    high = (halves >> 4).reshape(n, 2, 4, 32)
    out = np.empty((n, Q6_K_BYTES), dtype=np.uint8)
    out[:, 0:128] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    out[:, 128:192] = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4)
                       | (high[:, :, 3] << 6)).reshape(n, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d16.view(np.uint8).reshape(n, 2)
    return out.reshape(*a.shape[:-1], a.shape[-1] // QK_K * Q6_K_BYTES)
