"""Dequantization: our torch ports against gguf's numpy reference, block for block and end to end."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from realizar.loading import ModelLoadError, default_model_path, load_model, quants
from tests.tiny_model import TinySpec, hf_to_gguf_name, random_blocks, tiny_weights, write_tiny_gguf

BLOCK_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
ALL_TYPES = [QT.F32, QT.F16, QT.BF16, *BLOCK_TYPES]
# Types gguf.quants.quantize can produce; the others are built from random blocks with valid scales.
QUANTIZABLE = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]


def spec_for(qtype: QT) -> TinySpec:
    """The smallest tiny model whose rows hold whole blocks of ``qtype`` (K-quants: 256 elements)."""
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return TinySpec(hidden=256, intermediate=256) if block_size == 256 else TinySpec(hidden=64, intermediate=128)


def reference(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """gguf's own dequantization, float32."""
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)


def hf_reverse_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' LlamaTensorProcessor._reverse_permute_weights, verbatim."""
    dim = weight.shape[0] // n_head // 2
    w = weight.reshape(n_head, dim, 2, *weight.shape[1:])
    return w.swapaxes(2, 1).reshape(weight.shape)


def blocks_for(qtype: QT, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A (rows, bytes) array of ``qtype`` data: quantized normal weights, or random valid blocks."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE and qtype not in (QT.F32, QT.F16):
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return random_blocks(qtype, rows * cols // block_size, rng).reshape(rows, -1)


@pytest.mark.parametrize("qtype", [QT.BF16, *BLOCK_TYPES], ids=lambda q: q.name)
def test_blocks_match_gguf_reference_exactly(qtype: QT) -> None:
    raw = blocks_for(qtype, rows=8, cols=512)
    expected = reference(raw, qtype)
    ours = quants.dequantize(raw, qtype, (8, 512))
    assert ours.dtype == torch.float32 and ours.shape == (8, 512)
    assert np.isfinite(expected).all()
    assert torch.equal(ours, torch.from_numpy(expected))  # bit-identical, not just close
    as_bf16 = quants.dequantize(raw, qtype, (8, 512), torch.bfloat16)
    assert torch.equal(as_bf16, torch.from_numpy(expected).to(torch.bfloat16))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_chunked_dequantization_matches(qtype: QT, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = blocks_for(qtype, rows=4, cols=1024, seed=1)
    monkeypatch.setattr(quants, "CHUNK_ELEMENTS", 300)  # forces several chunks, the last one partial
    ours = quants.dequantize(raw, qtype, (4, 1024))
    assert torch.equal(ours, torch.from_numpy(reference(raw, qtype)))


def test_q8_0_known_values() -> None:
    block = np.zeros(34, dtype=np.uint8)
    block[0:2] = np.array([0.5], dtype=np.float16).view(np.uint8)
    block[2:] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    out = quants.dequantize(block, QT.Q8_0, (32,))
    assert out.tolist() == [0.5 * q for q in range(-16, 16)]


def test_q4_1_known_values() -> None:
    # Element j < 16 is the low nibble of byte j, element j >= 16 the high nibble of byte j - 16.
    block = np.zeros(20, dtype=np.uint8)
    block[0:2] = np.array([2.0], dtype=np.float16).view(np.uint8)
    block[2:4] = np.array([-1.0], dtype=np.float16).view(np.uint8)
    block[4:] = np.arange(16, dtype=np.uint8) | (np.uint8(15) - np.arange(16, dtype=np.uint8)) << 4
    out = quants.dequantize(block, QT.Q4_1, (32,)).tolist()
    assert out == [2.0 * q - 1.0 for q in list(range(16)) + list(range(15, -1, -1))]


def test_float_types_cast_exactly() -> None:
    w = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    assert torch.equal(quants.dequantize(w, QT.F32, (3, 64)), torch.from_numpy(w))
    half = w.astype(np.float16)
    assert torch.equal(quants.dequantize(half, QT.F16, (3, 64)), torch.from_numpy(half.astype(np.float32)))
    bf = gguf.quants.quantize(w, QT.BF16)
    assert torch.equal(quants.dequantize(bf, QT.BF16, (3, 64), torch.bfloat16),
                       torch.from_numpy(w).to(torch.bfloat16))


def test_result_does_not_alias_input() -> None:
    w = np.ones((2, 32), dtype=np.float32)
    out = quants.dequantize(w, QT.F32, (2, 32))
    out.zero_()
    assert w.sum() == 64


def test_type_without_torch_port_uses_gguf_reference() -> None:
    raw = blocks_for(QT.IQ4_NL, rows=2, cols=64)
    assert quants.is_supported(QT.IQ4_NL) and QT.IQ4_NL not in quants.BLOCK_DEQUANTIZERS
    assert torch.equal(quants.dequantize(raw, QT.IQ4_NL, (2, 64)), torch.from_numpy(reference(raw, QT.IQ4_NL)))


def test_unsupported_type_raises() -> None:
    assert not quants.is_supported(QT.I8)
    with pytest.raises(ModelLoadError, match="unsupported tensor type I8"):
        quants.dequantize(np.zeros((2, 32), dtype=np.int8), QT.I8, (2, 32))


def test_wrong_byte_count_raises() -> None:
    with pytest.raises(ModelLoadError, match="Q8_0 tensor of shape \\[2, 64\\] needs 136 bytes"):
        quants.dequantize(np.zeros(100, dtype=np.uint8), QT.Q8_0, (2, 64))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_tiny_gguf_of_each_type_loads_end_to_end(tmp_path: Path, qtype: QT) -> None:
    spec = spec_for(qtype)
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    stored = write_tiny_gguf(path, spec, qtype)
    model = load_model(path)

    assert model.format == "gguf" and model.config.num_layers == 2 and model.config.hidden_size == spec.hidden
    hf_names = {hf_to_gguf_name(hf): hf for hf in model.tensors}
    assert set(hf_names) == set(stored)
    for name, data in stored.items():
        if data.dtype == np.uint8:
            expected = reference(data, qtype)
        else:
            expected = data.astype(np.float32)
        if ".attn_q." in name:
            expected = hf_reverse_permute(expected, spec.heads)
        elif ".attn_k." in name:
            expected = hf_reverse_permute(expected, spec.kv_heads)
        got = model.tensors[hf_names[name]]
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(expected))), name


@pytest.mark.parametrize("qtype", QUANTIZABLE[1:], ids=lambda q: q.name)
def test_quantized_weights_approximate_the_originals(tmp_path: Path, qtype: QT) -> None:
    spec = spec_for(qtype)
    write_tiny_gguf(tmp_path / "m.gguf", spec, qtype)
    model = load_model(tmp_path / "m.gguf")
    for name, original in tiny_weights(spec).items():
        got = model.tensors[name].numpy()
        err = np.abs(got - original).max() / np.abs(original).max()
        assert err < 0.2, (name, err)  # 4-bit types: ~1/15 of the range; the permutation must be undone



def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are released through Linux's madvise")
def test_released_pages_leave_memory_and_read_back_the_same() -> None:
    """A weight kept quantized is a view of the file's map: once packed, its pages leave the process, and
    a later read (an `auto` timing's second build) gets the same bytes from the file again."""
    loaded = load_model(default_model_path(), keep_quantized=True)
    # all but the q and k projections, whose rows the loader un-permutes into memory of its own
    assert sum(q.mapped for q in loaded.quantized.values()) == len(loaded.quantized) - 2 * loaded.config.num_layers
    weights = [q for q in loaded.quantized.values() if q.mapped and q.raw.nbytes >= 1 << 20]
    copies = [q.raw.clone() for q in weights]  # reading every byte makes the pages resident
    before = _rss_bytes()
    for q in weights:
        q.release_pages()
    released = before - _rss_bytes()
    assert released >= sum(q.raw.nbytes for q in weights) // 2, (released, before)
    for q, copy in zip(weights, copies, strict=True):
        assert torch.equal(q.raw, copy)


def test_weights_in_memory_are_never_released() -> None:
    """Only a file's unwritten pages may be dropped: bytes in memory would be lost."""
    raw = blocks_for(QT.Q8_0, 256, 1024)
    q = quants.keep_quantized(raw, QT.Q8_0, (256, 1024), mapped=False)
    kept = q.raw.clone()
    q.release_pages()
    assert not q.mapped and torch.equal(q.raw, kept)
    assert not quants.QuantizedTensor.cat([q, q]).mapped
