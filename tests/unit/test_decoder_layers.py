"""decoder.c runs a step's decoder layers in one kernel call: the same kernels in the same order as
the per-operation forward (``LlamaModel.layers_forward``), so its residual stream must equal that
one bit for bit, for every kind of layer the CPU backend builds and for mixed steps of decodes and
prompt chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from realizar import kernels
from realizar.backends.cpu_kernels import CpuKernelsBackend
from realizar.kv_cache import KVCache
from realizar.loading import load_model
from realizar.model.llama import AttentionMetadata, LlamaModel, PrefillChunk
from tests.tiny_model import TinySpec, write_tiny_gguf

CPU = torch.device("cpu")


def steps() -> list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]]:
    """(ids, positions, metadata) of three steps over one cache of 8 blocks of 16: a 20-token prompt
    of sequence 0, then its decode beside a 5-token prompt of sequence 1, then both decoding."""
    def meta(slots: list[int], decodes: list[tuple[int, int]], prefills: list[PrefillChunk]) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots), num_decodes=len(decodes),
            decode_block_tables=torch.tensor([[b, b + 1] for b, _ in decodes], dtype=torch.long).reshape(-1, 2),
            decode_context_lens=torch.tensor([n for _, n in decodes], dtype=torch.long), prefills=prefills)
    first = meta(list(range(20)), [], [PrefillChunk(0, 20, torch.tensor([0, 1]), 0)])
    second = meta([20, 64, 65, 66, 67, 68], [(0, 21)], [PrefillChunk(1, 5, torch.tensor([4]), 0)])
    third = meta([21, 69], [(0, 22), (4, 6)], [])
    return [(torch.arange(3, 23) % 60, torch.arange(20), first),
            (torch.tensor([7, 9, 11, 13, 15, 17]), torch.tensor([20, 0, 1, 2, 3, 4]), second),
            (torch.tensor([5, 8]), torch.tensor([21, 5]), third)]


@pytest.mark.parametrize("qtype,fast,bias", [(QT.F32, False, False), (QT.Q4_1, False, False), (QT.Q4_1, True, False),
                                             (QT.Q6_K, True, False), (QT.Q8_0, False, True)],
                         ids=["float32", "q4_1-exact", "q4_1-fast", "q6_k-fast", "q8_0-bias"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8],
                         ids=["kv-float32", "kv-float16", "kv-int8"])
def test_fused_layers_equal_the_per_operation_forward(cpu_kernels: kernels.CpuKernels, tmp_path: Path, qtype: QT,
                                                     fast: bool, bias: bool, kv_dtype: torch.dtype) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(arch="qwen2" if bias else "llama"), qtype)
    loaded = load_model(path, keep_quantized=qtype != QT.F32)
    model = LlamaModel(loaded.config, loaded.tensors, CPU, torch.float32, loaded.quantized, fast)
    assert isinstance(model.backend, CpuKernelsBackend)
    assert model.backend._described(model) is not None  # the fused call runs, not the per-operation fallback
    c = model.config
    fused_cache, plain_cache = (KVCache(c.num_layers, 8, 16, c.num_kv_heads, c.head_dim, CPU, kv_dtype)
                                for _ in range(2))
    for ids, positions, meta in steps():
        x = model.embed.rows(ids)
        with torch.inference_mode():
            expected = model.layers_forward(x.clone(), positions, meta, plain_cache)
            got = model.backend.run_layers(model, x.clone(), positions, meta, fused_cache)
        assert torch.equal(got, expected)
        for layer in range(c.num_layers):
            assert torch.equal(fused_cache.keys[layer], plain_cache.keys[layer])
            assert torch.equal(fused_cache.values[layer], plain_cache.values[layer])
        for fused, plain in zip(fused_cache.key_scales + fused_cache.value_scales,
                                plain_cache.key_scales + plain_cache.value_scales, strict=True):
            assert torch.equal(fused, plain)


def test_the_fused_layers_write_to_the_cache_of_each_call(cpu_kernels: kernels.CpuKernels, tmp_path: Path) -> None:
    """The described layers keep pointing at one cache between calls; a call with another cache (another
    engine's, or a dtype's) moves them to it, and a call with the first moves them back."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(), QT.Q4_1)
    loaded = load_model(path, keep_quantized=True)
    model = LlamaModel(loaded.config, loaded.tensors, CPU, torch.float32, loaded.quantized)
    c = model.config
    caches = [KVCache(c.num_layers, 8, 16, c.num_kv_heads, c.head_dim, CPU, dtype)
              for dtype in (torch.float32, torch.int8, torch.float32)]
    ids, positions, meta = steps()[0]
    for cache in (*caches, caches[0]):
        for other in caches:
            for tensor in (*other.keys, *other.values, *other.key_scales, *other.value_scales):
                tensor.zero_()
        with torch.inference_mode():
            model.backend.run_layers(model, model.embed.rows(ids), positions, meta, cache)
        for other in caches:  # only the call's own cache was written, every layer of it
            assert all(t.any() == (other is cache) for t in (*other.keys, *other.values, *other.key_scales))
