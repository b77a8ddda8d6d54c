"""The quantized matrix product (``quant_gemm.c``) and the layers and loading around it: each
GGUF type's product against dequantize-then-matmul, its rows bit for bit against the
reference dequantization, and a tiny model kept quantized against the same model in float32."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from realizar import kernels
from realizar.backends import CpuKernelsBackend, TorchBackend, choose_backend
from realizar.backends.cpu_kernels import QuantLinear
from realizar.backends.torch_backend import TorchLinear
from realizar.kv_cache import KVCache
from realizar.loading import load_model, quants
from realizar.model.llama import AttentionMetadata, LlamaModel, PrefillChunk
from tests.tiny_model import TinySpec, random_blocks, write_tiny_gguf

KERNEL_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
QUANTIZABLE = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)



def quantized(qtype: QT, n: int, k: int, seed: int = 0) -> quants.QuantizedTensor:
    """An ``[n, k]`` weight of ``qtype``: quantized normal values, or random valid blocks (K-quants)."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    else:
        block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
        raw = random_blocks(qtype, n * k // block_size, rng).reshape(n, -1)
    return quants.keep_quantized(raw, qtype, (n, k))


def packed(weight: quants.QuantizedTensor, half: bool | None = None) -> kernels.QuantPacked:
    """The weight's records; with float16 scales where they are exact (as QuantLinear packs) unless
    ``half`` says otherwise."""
    ints = weight.integers()
    if half is None:
        half = kernels.exact_in_half(ints.scales, ints.mins)
    fmt = kernels.quant_format(ints.bits, ints.offset, ints.mins is not None, ints.group, half)
    compiled = kernels.load()
    assert fmt is not None and compiled is not None
    return compiled.pack_quantized(ints.q, ints.scales, ints.mins, fmt)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0], ids=lambda q: q.name)
def test_float16_scales_give_the_same_products_in_fewer_bytes(cpu_kernels: kernels.CpuKernels, qtype: QT) -> None:
    """GGUF stores these types' scales as float16, so their records keep them so: the products and
    rows equal those of float32 scales bit for bit, and a Q4 record is as small as GGUF's blocks."""
    weight = quantized(qtype, 37, 96, seed=7)
    half, single = packed(weight), packed(weight, half=False)
    assert half.fmt.half and not single.fmt.half and half.nbytes < single.nbytes
    if qtype in (QT.Q4_0, QT.Q4_1):
        assert half.nbytes == -(-37 // 16) * 16 * 96 // 32 * (18 if qtype == QT.Q4_0 else 20)
    if qtype == QT.Q4_1:  # the fast class's records are as small (others are padded to 64 bytes)
        assert fast_packed(cpu_kernels, weight).nbytes == half.nbytes
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    for rows in (1, 5):
        assert torch.equal(cpu_kernels.quant_gemm(x[:rows], half), cpu_kernels.quant_gemm(x[:rows], single))
    ids = torch.tensor([36, 0, 17])
    assert torch.equal(cpu_kernels.quant_rows(half, ids), weight.dequantize()[ids])


def test_scales_that_are_not_float16_keep_float32(cpu_kernels: kernels.CpuKernels) -> None:
    weight = quantized(QT.Q4_K, 16, 256, seed=2)
    ints = weight.integers()
    assert not kernels.exact_in_half(ints.scales, ints.mins) and not packed(weight).fmt.half


def assert_close_to_max(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """``got`` within ``rel`` of ``expected``'s largest magnitude (how the golden tests bound logits)."""
    assert got.shape == expected.shape
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= rel


def widths(qtype: QT) -> list[int]:
    """Ragged widths: one block, an odd number of blocks, and more than one pass (256 terms) of the sums."""
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return [256, 768, 1536] if block_size == 256 else [32, 96, 608]


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_integers_rebuild_the_reference_dequantization_exactly(qtype: QT) -> None:
    weight = quantized(qtype, 8, 512)
    ints = weight.integers()
    scales = ints.scales.repeat_interleave(ints.group, dim=1)
    w = (ints.q.view(torch.int8) if ints.bits == 8 else ints.q).to(torch.float32).sub_(ints.offset).mul_(scales)
    if ints.mins is not None:
        w = w.add_(ints.mins.repeat_interleave(32, dim=1))
    assert torch.equal(w, weight.dequantize())


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_rows_dequantize_bit_for_bit(cpu_kernels: kernels.CpuKernels, qtype: QT) -> None:
    for n in (16, 37):
        weight = quantized(qtype, n, widths(qtype)[1], seed=n)
        expected = weight.dequantize()
        ids = torch.tensor([n - 1, 0, 17 % n, 5, 5])
        assert torch.equal(cpu_kernels.quant_rows(packed(weight), ids), expected[ids])


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_product_matches_dequantize_then_matmul(cpu_kernels: kernels.CpuKernels, qtype: QT) -> None:
    """Ragged N (not a multiple of the 16-row panel), ragged K, M of 1, 3, 17 and 64 (every tile
    shape), on one and two threads."""
    try:
        for threads in (1, 2):
            cpu_kernels.set_threads(threads)
            for n, k in zip((37, 16, 100), widths(qtype), strict=True):
                weight = quantized(qtype, n, k, seed=n + k)
                w, p = weight.dequantize(), packed(weight)
                gen = torch.Generator().manual_seed(k)
                for m in (1, 3, 17, 64):
                    x = torch.randn(m, k, generator=gen)
                    expected = x.double() @ w.double().T
                    got = cpu_kernels.quant_gemm(x, p)
                    assert got.shape == (m, n)
                    # float32 sums of k terms against float64: the error of any summation order
                    bound = 1e-6 * k * (x.abs().double() @ w.abs().double().T)
                    assert bool(((got.double() - expected).abs() <= bound).all()), (n, k, m)
                    assert_close_to_max(got, x @ w.T)  # today's float32 path: the dequantized weights
    finally:
        cpu_kernels.set_threads(2)


def test_rows_do_not_depend_on_the_batch(cpu_kernels: kernels.CpuKernels) -> None:
    """A row's product is bit for bit the same alone and in any batch, through registers (up to 4
    rows) or the dequantized buffer: one chain of multiply-adds per output in a fixed order,
    which keeps greedy decoding batch-invariant."""
    weight = packed(quantized(QT.Q4_K, 300, 1024))
    x = torch.randn(130, 1024, generator=torch.Generator().manual_seed(1))
    alone = cpu_kernels.quant_gemm(x[5:6], weight)[0]
    try:
        for threads in (1, 2):
            cpu_kernels.set_threads(threads)
            for m in (6, 8, 16, 130):  # registers alone, the dequantized buffer in a batch
                assert torch.equal(cpu_kernels.quant_gemm(x[:m], weight)[5], alone)
            for start in (2, 3, 4):  # the row among 2, 3 or 4 rows, in registers
                assert torch.equal(cpu_kernels.quant_gemm(x[start:6], weight)[5 - start], alone)
    finally:
        cpu_kernels.set_threads(2)


def test_writes_into_columns_of_a_wider_output_and_reads_strided_rows(cpu_kernels: kernels.CpuKernels) -> None:
    weight = quantized(QT.Q8_0, 20, 64)
    wide = torch.randn(4, 100)
    x = wide[:, 10:74]  # rows 100 floats apart
    out = torch.full((4, 50), 7.0)
    cpu_kernels.quant_gemm(x, packed(weight), out[:, 5:25])
    assert_close_to_max(out[:, 5:25], x @ weight.dequantize().T)
    assert bool((out[:, :5] == 7).all()) and bool((out[:, 25:] == 7).all())


def test_rows_out_of_range_raise(cpu_kernels: kernels.CpuKernels) -> None:
    weight = packed(quantized(QT.Q4_0, 20, 64))
    with pytest.raises(IndexError, match="outside"):
        cpu_kernels.quant_rows(weight, torch.tensor([3, 20]))
    with pytest.raises(IndexError, match="outside"):
        cpu_kernels.quant_rows(weight, torch.tensor([-1]))


def test_layer_of_mixed_types_matches_f_linear(cpu_kernels: kernels.CpuKernels) -> None:
    """Fused q/k/v of a Q4_K_M file: Q4_K, Q4_K and Q6_K parts, with a bias."""
    parts = [quantized(QT.Q4_K, 48, 256, 1), quantized(QT.Q4_K, 16, 256, 2), quantized(QT.Q6_K, 21, 256, 3)]
    bias = torch.randn(85)
    layer = CpuKernelsBackend(cpu_kernels).linear(list(parts), bias)
    assert isinstance(layer, QuantLinear) and len(layer.parts) == 2 and layer.out_features == 85
    dense = torch.cat([p.dequantize() for p in parts])
    x = torch.randn(5, 256)
    assert_close_to_max(layer(x), F.linear(x, dense, bias))
    ids = torch.tensor([84, 0, 63, 64, 47])
    assert torch.equal(layer.rows(ids), dense[ids])


def test_float_weights_or_no_kernels_give_a_float_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = quantized(QT.Q4_1, 32, 64)
    monkeypatch.setenv("REALIZAR_KERNELS", "0")
    backend = choose_backend(torch.device("cpu"), torch.float32)
    assert isinstance(backend, TorchBackend)
    layer = backend.linear([weight])
    assert isinstance(layer, TorchLinear)
    x = torch.randn(2, 64)
    assert_close_to_max(layer(x), x @ weight.dequantize().T)
    assert not kernels.quantized_weights(torch.device("cpu"), torch.float32)


def test_a_model_refuses_a_backend_of_another_dtype(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(), QT.Q8_0)
    loaded = load_model(path)
    with pytest.raises(ValueError, match="cannot compute"):
        LlamaModel(loaded.config, loaded.tensors, torch.device("cpu"), torch.float32,
                   backend=TorchBackend(torch.device("cpu"), torch.bfloat16))


def tiny_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    cache = KVCache(model.config.num_layers, 4, 16, model.config.num_kv_heads, model.config.head_dim,
                    model.device, model.dtype)
    meta = AttentionMetadata(slot_mapping=torch.arange(len(ids)), num_decodes=0,
                             decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
                             decode_context_lens=torch.zeros(0, dtype=torch.long),
                             prefills=[PrefillChunk(0, len(ids), torch.arange(4), 0)])
    return model.forward(torch.tensor(ids), torch.arange(len(ids)), meta, cache, torch.arange(len(ids)))


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0, QT.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("tied", [True, False])
def test_tiny_model_kept_quantized_matches_float32(cpu_kernels: kernels.CpuKernels, tmp_path: Path, qtype: QT,
                                                   tied: bool) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(tied=tied), qtype)
    float_load = load_model(path)
    kept = load_model(path, keep_quantized=True)
    assert not float_load.quantized
    assert set(kept.quantized) | set(kept.tensors) == set(float_load.tensors)
    assert all(name.endswith("norm.weight") for name in kept.tensors)  # every matrix stayed quantized
    for name, weight in kept.quantized.items():
        assert torch.equal(weight.dequantize(), float_load.tensors[name]), name  # Q/K un-permuted alike
    assert kept.num_parameters() == float_load.num_parameters()
    cpu = torch.device("cpu")
    reference = LlamaModel(float_load.config, float_load.tensors, cpu, torch.float32)
    model = LlamaModel(kept.config, kept.tensors, cpu, torch.float32, kept.quantized)
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.layers[0].down, QuantLinear)
    ids = [1, 5, 9, 33, 2, 60, 7]
    expected = tiny_logits(reference, ids)
    got = tiny_logits(model, ids)
    assert_close_to_max(got, expected)


def test_types_without_a_kernel_are_dequantized_with_a_log_line(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(), QT.Q2_K)
    with caplog.at_level(logging.INFO, logger="realizar.loading"):
        kept = load_model(path, keep_quantized=True)
    assert not kept.quantized and "model.layers.0.mlp.down_proj.weight" in kept.tensors
    assert "Q2_K" in caplog.text and "dequantized" in caplog.text


def coarse_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row and 32 terms of ``x [m, k]``: the blocks ``[m, k / 32, 32]``, the coarse scale 256 d =
    max |x| / 127 and the coarse int8 term a = round(x / (256 d))."""
    m, k = x.shape
    blocks = x.view(m, k // 32, 32)
    coarse = blocks.abs().amax(-1, keepdim=True) / 127.0
    return blocks, coarse, torch.round(blocks * torch.where(coarse > 0, 1.0 / coarse, torch.zeros_like(coarse)))


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the fast class sees it, per row and 32 terms: two int8 terms, x ~= d (256 a + b), with
    256 d = max |x| / 127, a = round(x / (256 d)) and b the remainder in units of d (|b| <= 127)."""
    blocks, coarse, a = coarse_terms(x)
    d = coarse / 256.0
    b = torch.round((blocks - a * coarse) * torch.where(d > 0, 1.0 / d, torch.zeros_like(d))).clamp(-127, 127)
    return ((256 * a + b) * d).view(x.shape)


def fast_packed(compiled: kernels.CpuKernels, weight: quants.QuantizedTensor, wide_bytes: bool = False,
                factored: bool = True) -> kernels.FastPacked:
    """The weight's fast records as QuantLinear packs them (a k-quant's scales factored as its file stores
    them), or with every scale and min multiplied out to float32 (``factored=False``)."""
    ints = weight.integers()
    return compiled.pack_fast(ints.q, ints.scales, ints.mins, ints.bits, ints.offset, ints.group,
                              ints.factored if factored else None, wide_bytes)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K],
                         ids=lambda q: q.name)
@pytest.mark.parametrize("wide_bytes", [False, True], ids=["signed", "wide"])
def test_records_copied_from_the_files_blocks_are_the_packed_integers(cpu_kernels: kernels.CpuKernels, qtype: QT,
                                                                      wide_bytes: bool) -> None:
    """Every format's records are laid out from the file's blocks in C (how a load packs them), byte for byte the
    records packed from the integers and scales unpacked in torch, at ragged N (a panel's padding rows zero) and
    several widths, for signed and unsigned (+128) bytes alike."""
    assert qtype.name in kernels.FAST_BLOCK_FORMATS
    k_quant = qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K)
    for n, k in ((1, 256), (37, 512), (16, 768)) if k_quant else ((1, 32), (37, 64), (16, 96), (50, 576)):
        weight = quantized(qtype, n, k, seed=n * k)
        copied = cpu_kernels.pack_fast_blocks([weight.raw], qtype.name, k, wide_bytes)
        unpacked = fast_packed(cpu_kernels, weight, wide_bytes)
        assert (copied.kind, copied.c, copied.n, copied.k) == (unpacked.kind, unpacked.c, n, k)
        assert torch.equal(copied.records, unpacked.records), (n, k)


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0, QT.Q5_K], ids=lambda q: q.name)
def test_stacked_parts_are_laid_out_where_their_rows_go(cpu_kernels: kernels.CpuKernels, qtype: QT) -> None:
    """Parts stacked along the outputs (q/k/v, gate/up) are laid out into their own panels of the records, each from
    its own blocks: the records are those of the parts' blocks concatenated, byte for byte, where a part starts on a
    panel's first row and where it starts inside one (then joined to the part before it)."""
    k = 256
    for rows in ((32, 16, 16), (37, 5, 16, 20), (3, 64, 13)):
        parts = [quantized(qtype, n, k, seed=n + i) for i, n in enumerate(rows)]
        stacked = cpu_kernels.pack_fast_blocks([p.raw for p in parts], qtype.name, k)
        whole = cpu_kernels.pack_fast_blocks([quants.QuantizedTensor.cat(parts).raw], qtype.name, k)
        assert (stacked.n, stacked.k, stacked.kind, stacked.c) == (sum(rows), k, whole.kind, whole.c)
        assert torch.equal(stacked.records, whole.records), rows


def test_a_fast_layer_is_laid_out_from_the_files_blocks(cpu_kernels: kernels.CpuKernels,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast layer of Q4_1 parts (q/k/v stacked) never unpacks its integers in torch, and neither does one of any
    other format the fast class takes; the exact class's layers still do."""
    unpacked: list[QT] = []
    integers = quants.QuantizedTensor.integers

    def spy(self: quants.QuantizedTensor) -> quants.IntegerWeights:
        unpacked.append(self.qtype)
        return integers(self)

    monkeypatch.setattr(quants.QuantizedTensor, "integers", spy)
    parts = [quantized(QT.Q4_1, n, 64, seed=n) for n in (32, 16, 16)]
    layer = QuantLinear(parts, cpu_kernels, fast=True)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    whole = quants.QuantizedTensor.cat(parts)
    assert torch.equal(layer(x), cpu_kernels.quant_gemm_fast(x, fast_packed(cpu_kernels, whole, cpu_kernels.wide_bytes)))
    assert unpacked == [QT.Q4_1]  # the reference's own records above, not the layer's
    out = torch.empty(3, layer.out_features)
    assert layer(x, out) is out and torch.equal(out, layer(x))  # the products written where asked, the same floats
    assert set(kernels.FAST_BLOCK_FORMATS) == {q.name for q in quants.INTEGER_UNPACKERS}
    for qtype in quants.INTEGER_UNPACKERS:
        QuantLinear([quantized(qtype, 16, 256)], cpu_kernels, fast=True)
    assert unpacked == [QT.Q4_1]
    QuantLinear([quantized(QT.Q5_K, 16, 256)], cpu_kernels, fast=False)
    assert unpacked == [QT.Q4_1, QT.Q5_K]


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda q: q.name)
def test_k_quant_records_keep_the_files_scales_and_give_the_same_floats(cpu_kernels: kernels.CpuKernels,
                                                                         qtype: QT) -> None:
    """A k-quant's records hold its small integer scales under the super-block's float16 factors, as the file
    does, where they held float32 products: the kernel multiplies them out to the same floats, so every
    product (ragged N, 1 to 70 rows, the ranked head) and row is the float32-scaled records' bit for bit.
    The factors come once for a super-block's 8 records, and Q6_K's integers take 6 bits: 4.625 bits a weight
    for Q4_K where it was 6, 6.625 for Q6_K where it was 10."""
    for n, k in zip((37, 16, 100), widths(qtype), strict=True):
        weight = quantized(qtype, n, k, seed=n + k)
        factored, multiplied = fast_packed(cpu_kernels, weight), fast_packed(cpu_kernels, weight, factored=False)
        assert factored.kind & kernels.FAST_SUPER and not multiplied.kind & kernels.FAST_SUPER
        assert factored.nbytes < multiplied.nbytes
        gen = torch.Generator().manual_seed(k)
        for m in (1, 3, 8, 17, 70):
            x = torch.randn(m, k, generator=gen)
            assert torch.equal(cpu_kernels.quant_gemm_fast(x, factored), cpu_kernels.quant_gemm_fast(x, multiplied))
            assert torch.equal(cpu_kernels.quant_gemm_fast_ranked(x, factored, 2),
                               cpu_kernels.quant_gemm_fast_ranked(x, multiplied, 2)), (n, k, m)
        ids = torch.tensor([n - 1, 0, n // 2])
        assert torch.equal(cpu_kernels.fast_rows(factored, ids), weight.dequantize()[ids])
    bits = factored.records.shape[1] * 8 / (16 * k)  # a weight: the file's 4.5, 5.5 and 6.5625
    assert bits == {QT.Q4_K: 4.625, QT.Q5_K: 8.625, QT.Q6_K: 6.625}[qtype]


def byte_layouts(cpu_kernels: kernels.CpuKernels) -> list[bool]:
    """The ways this build may store 8-bit integers: signed, and also offset by 128 where its dot
    products take unsigned bytes up to 255 (VNNI)."""
    return [False, True] if cpu_kernels.wide_bytes else [False]


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_fast_class_is_the_product_with_int8_activations(cpu_kernels: kernels.CpuKernels, qtype: QT) -> None:
    """Up to ``fast_max_rows`` rows, the fast class equals (to float32 rounding) the exact product of
    the dequantized weights with x rounded to two int8 terms per 32-term block; ragged N, M of 1, 3
    and the most rows it takes."""
    for (n, k), wide in itertools.product(zip((37, 16, 100), widths(qtype), strict=True), byte_layouts(cpu_kernels)):
        weight = quantized(qtype, n, k, seed=n + k)
        w, p = weight.dequantize().double(), fast_packed(cpu_kernels, weight, wide)
        gen = torch.Generator().manual_seed(k)
        for m in sorted({1, 3, min(cpu_kernels.fast_max_rows, 70)}):
            x = torch.randn(m, k, generator=gen)
            if k > 32:
                x[0, :32] = 0  # an all-zero block has d = 0
            got = cpu_kernels.quant_gemm_fast(x, p).double()
            expected = int8_activations(x).double() @ w.T
            # float32 rounding may flip a b term by one unit, d = max |x| / 32512, in either computation
            assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4, (n, k, m)
            # and it is within about 16 bits' resolution of the exact product
            assert_close_to_max(got.float(), x @ w.float().T, rel=1e-3)
        assert not cpu_kernels.quant_gemm_fast(torch.zeros(2, k), p).any()


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_fast_rows_do_not_depend_on_the_batch(cpu_kernels: kernels.CpuKernels, qtype: QT) -> None:
    """The fast class's rows as the exact class's (test_rows_do_not_depend_on_the_batch): a row's product is
    the same floats alone (a narrow tile), among 8 rows (one 8-row tile) or among 43 (8-row tiles, then narrower
    ones), on one thread or two, so greedy decoding stays batch-invariant. Ragged N, both byte layouts, without
    AMX tiles (from ``tile_min_rows`` rows their products are other floats), up to ``fast_max_rows`` rows (a build
    without VNNI or AVX2 multiplies more rows in the exact class)."""
    tiles, rows = cpu_kernels.tiles, min(43, cpu_kernels.fast_max_rows)
    cpu_kernels.set_tiles(False)
    try:
        for (n, k), wide in itertools.product(zip((37, 100), widths(qtype)[1:], strict=True),
                                              byte_layouts(cpu_kernels)):
            p = fast_packed(cpu_kernels, quantized(qtype, n, k, seed=n + k), wide)
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k))
            alone = torch.cat([cpu_kernels.quant_gemm_fast(x[i:i + 1], p) for i in range(rows)])
            for threads in (1, 2):
                cpu_kernels.set_threads(threads)
                in_eights = torch.cat([cpu_kernels.quant_gemm_fast(x[i:i + 8], p) for i in range(0, rows, 8)])
                assert torch.equal(cpu_kernels.quant_gemm_fast(x, p), alone), (n, k, wide, threads)
                assert torch.equal(in_eights, alone), (n, k, wide, threads)
    finally:
        cpu_kernels.set_threads(2)
        cpu_kernels.set_tiles(tiles)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_tile_products_are_within_16_bits_of_the_exact_product(amx_tiles: kernels.CpuKernels, qtype: QT) -> None:
    """From ``tile_min_rows(kind)`` rows, the fast class on AMX tiles multiplies x as two bfloat16 terms
    by the weights' integers (Q6_K: by its dequantized weights, as two terms too): within about 2^-16 of
    the product of the dequantized weights, 5 times closer than the integer products' bound; ragged N
    and M, a zero row, both byte layouts, into columns of a wider output, K from one block to 72 blocks of 32
    terms. Fewer rows keep the integer products."""
    longest = 1280 if gguf.GGML_QUANT_SIZES[qtype][0] == 32 else 2304  # 40 and 72 blocks of 32 terms
    for (n, k), wide in itertools.product(zip((37, 16, 100, 21), [*widths(qtype), longest], strict=True),
                                          byte_layouts(amx_tiles)):
        weight = quantized(qtype, n, k, seed=n + k)
        w, p = weight.dequantize().double(), fast_packed(amx_tiles, weight, wide)
        gen = torch.Generator().manual_seed(k)
        fewest = amx_tiles.tile_min_rows(p.kind)
        assert 0 < fewest <= 64
        for m in (fewest, fewest + 13, 130):
            x = torch.randn(m, k, generator=gen)
            x[1] = 0
            wider = torch.full((m, n + 7), 5.0)
            amx_tiles.quant_gemm_fast(x, p, wider[:, 3:3 + n])
            expected = x.double() @ w.T
            assert ((wider[:, 3:3 + n].double() - expected).abs().max() / expected.abs().max()).item() <= 2e-5
            assert not wider[1, 3:3 + n].any() and bool((wider[:, :3] == 5).all() and (wider[:, 3 + n:] == 5).all())
        x = torch.randn(fewest - 1, k, generator=gen)
        amx_tiles.set_tiles(False)
        integer = amx_tiles.quant_gemm_fast(x, p)
        amx_tiles.set_tiles(True)
        assert torch.equal(amx_tiles.quant_gemm_fast(x, p), integer)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_fast_class_beyond_its_rows_is_the_exact_product(cpu_kernels: kernels.CpuKernels, qtype: QT) -> None:
    """More rows than ``fast_max_rows`` are multiplied exactly from the fast records: the exact class's
    products bit for bit (ragged N, two widths, both byte layouts)."""
    if cpu_kernels.fast_max_rows >= 70:
        pytest.skip(f"this build ({kernels.isa()}) multiplies every row with integer products")
    for (n, k), wide in itertools.product(zip((37, 100), widths(qtype)[1:], strict=True), byte_layouts(cpu_kernels)):
        weight = quantized(qtype, n, k, seed=n + k)
        gen = torch.Generator().manual_seed(k)
        for m in (cpu_kernels.fast_max_rows + 1, 70):
            x = torch.randn(m, k, generator=gen)
            exact = cpu_kernels.quant_gemm(x, packed(weight))
            assert torch.equal(cpu_kernels.quant_gemm_fast(x, fast_packed(cpu_kernels, weight, wide)), exact), (n, k, m, wide)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_fast_layout_rows_dequantize_bit_for_bit(cpu_kernels: kernels.CpuKernels, qtype: QT) -> None:
    weight = quantized(qtype, 37, widths(qtype)[1], seed=4)
    ids = torch.tensor([36, 0, 17, 5, 5])
    for wide in (False, True):  # Q8_0's bytes signed, or offset by 128
        assert torch.equal(cpu_kernels.fast_rows(fast_packed(cpu_kernels, weight, wide), ids), weight.dequantize()[ids])
        with pytest.raises(IndexError, match="outside"):
            cpu_kernels.fast_rows(fast_packed(cpu_kernels, weight, wide), torch.tensor([37]))


def coarse_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the ranked products' first pass sees it: the coarse int8 term alone, x ~= 256 d a."""
    _blocks, coarse, a = coarse_terms(x)
    return (a * coarse).view(x.shape)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q6_K], ids=lambda q: q.name)
def test_ranked_products_keep_the_fast_class_where_a_row_is_largest(cpu_kernels: kernels.CpuKernels,
                                                                    qtype: QT) -> None:
    """An LM head's ranked products: in each row, the ``top`` panels (16 outputs each) that are largest
    from the coarse term alone hold the fast class's own floats, bit for bit, so the argmax and what
    sampling draws from are the fast class's; the other outputs are the coarse term's product. Under
    ``ranked_rows`` rows (a build that never ranks, AVX2's: always), over ``fast_max_rows`` (the exact path),
    with top 0 or a d per 16 terms (Q6_K): the fast class."""
    n, k = 16 * 40 + 5, 256
    gen = torch.Generator().manual_seed(7)
    for wide in byte_layouts(cpu_kernels):
        weight = quantized(qtype, n, k, seed=3)
        w, p = weight.dequantize().double(), fast_packed(cpu_kernels, weight, wide)
        for m, top in ((1, 4), (7, 4), (13, 4), (64, 3), (64, 0), (20, 40)):
            x = torch.randn(m, k, generator=gen)
            fast = cpu_kernels.quant_gemm_fast(x, p)
            got = cpu_kernels.quant_gemm_fast_ranked(x, p, top)
            if (not cpu_kernels.ranked_rows or not cpu_kernels.ranked_rows <= m <= cpu_kernels.fast_max_rows
                    or top == 0 or qtype is QT.Q6_K):
                assert torch.equal(got, fast), (m, top)
                continue
            assert torch.equal(got.argmax(1), fast.argmax(1)), (m, top)
            mins = weight.integers().mins
            if mins is None:
                coarse = (coarse_activations(x).double() @ w.T).float()
            else:  # the min's term takes x's sums from both terms
                m_w = mins.double().repeat_interleave(32, dim=1)
                coarse = (coarse_activations(x).double() @ (w - m_w).T + int8_activations(x).double() @ m_w.T).float()
            kept = min(top, 16)
            pad = (0, -n % 16)
            for row in range(m - m % 8):  # rows in 8-row tiles; the rest take both terms throughout
                # the panels the kernel multiplied again: their every output is the fast class's
                same = torch.nn.functional.pad(got[row] == fast[row], pad, value=True).view(-1, 16).all(1)
                assert int(same.sum()) >= kept, (m, top, row)
                # they are the panels whose largest coarse output ranks among the `kept` largest (up to
                # float32 rounding of the ranking between the two computations)
                panel_max = torch.nn.functional.pad(coarse[row], pad, value=-float("inf")).view(-1, 16).amax(1)
                threshold = panel_max.topk(kept).values[-1]
                assert bool(same[panel_max > threshold + 1e-4 * panel_max.abs().max()].all()), (m, top, row)
                outside = ~same.repeat_interleave(16)[:n]
                assert_close_to_max(got[row, outside], coarse[row, outside], rel=1e-4)


def ranked_argmax_matches_numpy(kernels_: kernels.CpuKernels, x: torch.Tensor, p: kernels.FastPacked,
                                top: int) -> torch.Tensor:
    """``quant_gemm_fast_ranked``'s ``argmax`` against numpy's over the outputs it returned: equal in every row
    it gives (>= 0), -1 in the others; returns it."""
    found = torch.full((x.shape[0],), 7, dtype=torch.long)  # overwritten in every row
    got = kernels_.quant_gemm_fast_ranked(x, p, top, argmax=found)
    expected = torch.from_numpy(got.numpy().argmax(axis=1))
    given = found >= 0
    assert bool((found[~given] == -1).all()), found
    assert torch.equal(found[given], expected[given]), (found, expected)
    return found


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q6_K], ids=lambda q: q.name)
def test_ranked_products_find_each_ranked_rows_argmax(cpu_kernels: kernels.CpuKernels, qtype: QT) -> None:
    """The ranked products' argmax, found from the panels' maxima: numpy's over the returned outputs in every ranked
    row (rows in 8-row tiles where the kinds rank, ragged N), the first of equal largest outputs (a row of zeros:
    every output 0, or every output the min's term), -1 in the rows not ranked and where an output is a NaN."""
    n, k = 16 * 40 + 5, 256
    gen = torch.Generator().manual_seed(13)
    for wide in byte_layouts(cpu_kernels):
        p = fast_packed(cpu_kernels, quantized(qtype, n, k, seed=4), wide)
        for m, top in ((1, 4), (13, 4), (64, 3), (64, 0), (24, 16)):
            x = torch.randn(m, k, generator=gen)
            x[m // 2] = 0.0  # ties: every output of the row is the same
            found = ranked_argmax_matches_numpy(cpu_kernels, x, p, top)
            ranks = (cpu_kernels.ranked_rows and cpu_kernels.ranked_rows <= m <= cpu_kernels.fast_max_rows
                     and top > 0 and qtype is not QT.Q6_K)
            tiled = m - m % 8
            if ranks:
                assert bool((found[:tiled] >= 0).all()), (m, top, found)
            else:
                assert bool((found == -1).all()), (m, top, found)
            if ranks:
                x[1, 5] = float("nan")
                found = ranked_argmax_matches_numpy(cpu_kernels, x, p, top)
                assert int(found[1]) == -1 and bool((found[2:tiled] >= 0).all()), found


def test_ranked_products_on_int8_tiles_rank_with_the_dot_products_floats(amx_tiles: kernels.CpuKernels) -> None:
    """From 16 rows, a Q8_0 LM head's ranked first pass (the coarse term alone) runs on AMX's int8 tiles where the
    build has them: a block's signed bytes are a tile of weights as stored. The coarse outputs are the dot
    products' floats bit for bit, so every row in 8-row tiles is the tiles-off result exactly; the last M % 8 rows,
    which the dot products multiply with both terms throughout, are ranked too, keeping the integer products'
    argmax and largest outputs (ragged N, M of 16 to 70)."""
    n, k = 16 * 40 + 5, 256
    gen = torch.Generator().manual_seed(11)
    for wide in byte_layouts(amx_tiles):  # signed bytes, and bytes offset by 128 (not taken: the dot products')
        p = fast_packed(amx_tiles, quantized(QT.Q8_0, n, k, seed=5), wide)
        for m, top in ((16, 4), (29, 3), (64, 4), (70, 16)):
            x = torch.randn(m, k, generator=gen)
            got = amx_tiles.quant_gemm_fast_ranked(x, p, top)
            amx_tiles.set_tiles(False)
            dots = amx_tiles.quant_gemm_fast_ranked(x, p, top)
            fast = amx_tiles.quant_gemm_fast(x, p)  # the integer dot products, which re-multiply the top panels
            amx_tiles.set_tiles(True)
            tiled = m - m % 8
            assert torch.equal(got[:tiled], dots[:tiled]), (m, top, wide)
            assert torch.equal(got.argmax(1), fast.argmax(1)) and torch.equal(got.max(1).values, fast.max(1).values)
            assert bool((ranked_argmax_matches_numpy(amx_tiles, x, p, top) >= 0).all()), (m, top, wide)


def test_the_path_names_the_ranking_pass_on_int8_tiles_where_the_head_takes_it(amx_tiles: kernels.CpuKernels) -> None:
    """``describe`` (the compute path of /health and the banner) names the LM head's first pass on int8 tiles
    where the tiles are on and the head's records are Q8_0's bytes, and only then."""
    backend = CpuKernelsBackend(amx_tiles)
    head = backend.linear([quantized(QT.Q8_0, 48, 256, 1)], fast=True)
    layer = backend.linear([quantized(QT.Q4_1, 32, 256, 2)], fast=True)
    if not amx_tiles.tile_ranks(head.parts[0].kind):
        pytest.skip("this build has no AMX int8 tiles")
    assert ", the LM head's ranking pass on AMX int8 tiles" in backend.describe([head, layer])
    assert "int8 tiles" not in backend.describe([layer, head])  # a Q4_1 head: its first pass stays on the dot products
    amx_tiles.set_tiles(False)
    assert "tiles" not in backend.describe([head, layer])
    amx_tiles.set_tiles(True)


def test_fast_layer_of_mixed_types(cpu_kernels: kernels.CpuKernels) -> None:
    parts = [quantized(QT.Q4_K, 48, 256, 1), quantized(QT.Q6_K, 21, 256, 3)]
    layer = CpuKernelsBackend(cpu_kernels).linear(list(parts), fast=True)
    assert isinstance(layer, QuantLinear) and all(isinstance(p, kernels.FastPacked) for p in layer.parts)
    dense = torch.cat([p.dequantize() for p in parts])
    x = torch.randn(5, 256)
    assert_close_to_max(layer(x), int8_activations(x) @ dense.T)
    ids = torch.tensor([68, 0, 47, 48])
    assert torch.equal(layer.rows(ids), dense[ids])
    with pytest.raises(IndexError, match="outside"):
        layer.rows(torch.tensor([69]))


def test_fast_layout_refuses_a_min_with_an_integer_offset(cpu_kernels: kernels.CpuKernels) -> None:
    # the fast tile leaves the offset's term out where a format has a min (every GGUF one has c = 0)
    q = torch.zeros(16, 32, dtype=torch.uint8)
    scales, mins = torch.ones(16, 1), torch.zeros(16, 1)
    with pytest.raises(ValueError, match="min and an integer offset"):
        cpu_kernels.pack_fast(q, scales, mins, 4, 8, 32)
    assert cpu_kernels.pack_fast(q, scales, mins, 4, 0, 32).kind & kernels.FAST_MIN
