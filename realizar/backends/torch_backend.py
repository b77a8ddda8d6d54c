"""The torch backend: CUDA, half precision on the CPU, and float32 on the CPU without the compiled
kernels (no C compiler, or ``REALIZAR_KERNELS=0``).

Each operation is a few torch ops. Attention gathers each decode query's blocks for one padded
SDPA call, and runs one causal SDPA call per prefill chunk. Linear layers are
``F.linear``, except float32 on the CPU: there the weight is stored transposed, ``[in, out]``,
and the product goes to the OpenBLAS inside numpy, which measured faster than torch's
``F.linear`` (MKL) on the AMD EPYC (AVX2) benchmark machine. It computes the math of the
CPU-kernel backend (``realizar.backends.cpu_kernels``) and gives the same greedy tokens
(tests/golden).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from realizar.backends.backend import AttentionMetadata, LayerStack, LinearLayer, PrefillChunk
from realizar.kv_cache import KVCache
from realizar.loading.quants import QuantizedTensor


class TorchLinear:
    """A fixed weight ``[out, in]`` (and optional bias ``[out]``) applied to ``x [T, in]`` by numpy's
    sgemm (float32 on the CPU) or ``F.linear`` (elsewhere)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.weight: torch.Tensor | None = None
        self._weight_t: np.ndarray | None = None  # [in, out], for numpy's sgemm
        if weight.device.type == "cpu" and weight.dtype == torch.float32:
            self._weight_t = weight.t().contiguous().numpy()
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight_t is not None:
            y = torch.from_numpy(np.matmul(x.contiguous().numpy(), self._weight_t))
            return y if self.bias is None else y + self.bias
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``W`` ``[len(ids), in]``: the embedding lookup when embeddings are tied."""
        if self._weight_t is not None:
            return torch.from_numpy(np.ascontiguousarray(self._weight_t[:, ids.numpy()].T))
        assert self.weight is not None
        return F.embedding(ids, self.weight)

    def ranked(self, x: torch.Tensor, argmax: torch.Tensor | None = None) -> torch.Tensor:
        return self(x)  # no cheaper way, and no argmax on the way


def float_weight(parts: Sequence[torch.Tensor | QuantizedTensor], device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """The weights ``parts`` stacked along ``out`` as one contiguous ``dtype`` tensor on ``device``,
    quantized parts dequantized."""
    floats = [p.dequantize(dtype) if isinstance(p, QuantizedTensor) else p for p in parts]
    weight = floats[0] if len(floats) == 1 else torch.cat(floats)
    return weight.to(device=device, dtype=dtype).contiguous()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The column of each row of ``probs [B, C]`` where its cumulative sum passes ``uniforms[b]``."""
    cdf = probs.cumsum(dim=-1)
    return torch.searchsorted(cdf, uniforms[:, None]).squeeze(1).clamp_(max=probs.shape[-1] - 1)


class TorchBackend:
    """Every operation of the forward pass in torch ops, on any device and dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype

    def linear(self, parts: Sequence[torch.Tensor | QuantizedTensor], bias: torch.Tensor | None = None,
               fast: bool = False) -> LinearLayer:
        """Float weights only: quantized parts are dequantized (there is no fast class here)."""
        return TorchLinear(float_weight(parts, self.device, self.dtype), bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm computed in float32, as the reference implementation does."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def rope(self, qkv: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor) -> None:
        x = qkv[:, : heads * head_dim].view(qkv.shape[0], heads, head_dim)  # [T, heads, hd]
        c = cos[positions].unsqueeze(1)  # [T, 1, hd]
        s = sin[positions].unsqueeze(1)
        x.copy_(x * c + rotate_half(x) * s)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
        return F.silu(gate) * up

    def write_kv(self, cache: KVCache, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        cache.write(layer, slots, k, v)

    def attention(self, q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata,
                  scale: float) -> torch.Tensor:
        out = torch.empty_like(q)  # [T, H, hd]
        if meta.num_decodes:
            out[: meta.num_decodes] = self.decode_attention(q[: meta.num_decodes], cache, layer, meta, scale)
        for chunk in meta.prefills:
            span = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
            out[span] = self.prefill_attention(q[span], cache, layer, chunk, scale)
        return out

    @staticmethod
    def decode_attention(q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata,
                         scale: float) -> torch.Tensor:
        """One query per sequence against its gathered blocks; the query heads that share a
        KV head are laid along SDPA's query-length axis, so no K/V repeat is needed."""
        b, heads, head_dim = q.shape
        kv_heads = cache.keys[layer].shape[1]
        # [B, KV, L, hd] each, in q's dtype (a float16 or int8 cache of a float32 model)
        keys, values = cache.gather_blocks(layer, meta.decode_block_tables, q.dtype)
        q = q.reshape(b, kv_heads, heads // kv_heads, head_dim)  # [B, KV, G, hd]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=meta.decode_mask(cache.block_size),
                                             scale=scale)
        return out.reshape(b, heads, head_dim)  # [B, H, hd]

    @staticmethod
    def prefill_attention(q: torch.Tensor, cache: KVCache, layer: int, chunk: PrefillChunk,
                          scale: float) -> torch.Tensor:
        """Causal attention of a prompt chunk over everything cached before it and itself."""
        n, heads, _head_dim = q.shape
        group = heads // cache.keys[layer].shape[1]
        keys, values = cache.gather_slots(layer, chunk.context_slots(cache.block_size), q.dtype)  # [KV, L, hd] each
        length = keys.shape[1]
        keys = keys.repeat_interleave(group, dim=0)  # [H, L, hd]
        values = values.repeat_interleave(group, dim=0)
        q = q.transpose(0, 1)  # [H, n, hd]
        if chunk.start_position == 0:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale)
        else:
            q_pos = torch.arange(chunk.start_position, chunk.start_position + n, device=q.device)
            k_pos = torch.arange(length, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # [n, L]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
        return out.transpose(0, 1)  # [n, H, hd]

    def run_layers(self, model: LayerStack, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                   cache: KVCache) -> torch.Tensor:
        return model.layers_forward(x, positions, meta, cache)

    def sample(self, logits: torch.Tensor, rows: torch.Tensor, temperatures: torch.Tensor,
               uniforms: torch.Tensor) -> torch.Tensor:
        probs = (logits[rows] / temperatures[:, None]).softmax(dim=-1)
        return inverse_cdf(probs, uniforms.to(probs.device))

    def describe(self, linears: Sequence[LinearLayer]) -> str:
        return f"{self.device.type}, torch, {str(self.dtype).removeprefix('torch.')} weights and activations"


def openblas_setters() -> list[Any]:
    """``set_num_threads`` of each OpenBLAS that numpy loaded (its wheels bundle one)."""
    setters = []
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    candidates = sorted(libs.glob("*openblas*.so*")) if libs.is_dir() else []
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter.restype = None
                setters.append(setter)
                break
    return setters
