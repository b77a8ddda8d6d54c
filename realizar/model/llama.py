"""The Llama-family forward pass (llama, SmolLM2, mistral, qwen2) over packed tokens.

One call runs every sequence of an engine step: decode tokens and prefill chunks are
packed into one ``[T, D]`` activation, so the linear layers see the whole batch. Keys and
values live in a paged cache (``realizar.kv_cache.KVCache``) addressed through block tables.

Every operation goes through one backend (``realizar.backends``), chosen once for the
device and dtype: the compiled CPU kernels in float32 on the CPU, torch elsewhere. Both
compute the same math and give the same greedy tokens (tests/golden).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from realizar.backends import AttentionMetadata, Backend, LinearLayer, PrefillChunk, choose_backend
from realizar.config import ModelConfig, RopeScaling
from realizar.kv_cache import KVCache
from realizar.loading.quants import QuantizedTensor

# AttentionMetadata and PrefillChunk are the step's input, defined with the backends that read them
__all__ = ["AttentionMetadata", "LayerWeights", "LlamaModel", "PrefillChunk", "rope_frequencies"]


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with linear or llama3 scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "llama3":
        # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between smoothed
        old_ctx = scaling.original_max_position_embeddings
        low_wavelen = old_ctx / scaling.low_freq_factor
        high_wavelen = old_ctx / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        between = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = torch.where(between, blended, scaled)
    return inv_freq.float()


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [D]
    qkv: LinearLayer  # [(H + 2 * KV) * hd, D]  q, k and v projections fused (bias on qwen2)
    o: LinearLayer  # [D, H * hd]
    mlp_norm: torch.Tensor  # [D]
    gate_up: LinearLayer  # [2 * I, D]  gate and up projections fused
    down: LinearLayer  # [D, I]


class LlamaModel:
    """Weights plus the forward pass; holds no per-request state."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor],
                 device: torch.device, dtype: torch.dtype,
                 quantized: dict[str, QuantizedTensor] | None = None, fast: bool = False,
                 backend: Backend | None = None) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.fast = fast and bool(quantized)  # its quantized layers multiplied by the fast class
        # what computes every operation, chosen once: the CPU kernels in float32 on the CPU, torch elsewhere
        self.backend = backend if backend is not None else choose_backend(device, dtype)
        if (self.backend.device.type, self.backend.dtype) != (device.type, dtype):
            raise ValueError(f"a backend for {self.backend.device.type} {self.backend.dtype} cannot compute a "
                             f"{device.type} {dtype} model")
        quantized = quantized or {}

        def take(name: str) -> torch.Tensor:
            return tensors[name].to(device=device, dtype=dtype).contiguous()

        def linear(*names: str, bias: torch.Tensor | None = None) -> LinearLayer:
            """The weights ``names`` stacked along ``out``, kept quantized where they were loaded so
            (``fast``: multiplied by the fast, not exact, class). The backend keeps its own copy: the
            file's pages of a quantized weight leave memory as it is packed, not all at the end."""
            layer = self.backend.linear([quantized[n] if n in quantized else tensors[n] for n in names], bias, fast)
            for n in names:
                if n in quantized:
                    quantized[n].release_pages()
            return layer

        self.lm_head = linear("lm_head.weight" if not config.tie_word_embeddings
                              else "model.embed_tokens.weight")  # [V, D]
        # a tied embedding is read out of the head's weight rather than kept twice
        self.embed = self.lm_head if config.tie_word_embeddings else linear("model.embed_tokens.weight")
        self.final_norm = take("model.norm.weight")
        self.layers: list[LayerWeights] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            bias = None
            if config.attention_bias:
                bias = torch.cat([tensors[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
                bias = bias.to(device=device, dtype=dtype)
            self.layers.append(LayerWeights(
                attn_norm=take(p + "input_layernorm.weight"),
                qkv=linear(*(p + f"self_attn.{n}_proj.weight" for n in "qkv"), bias=bias),
                o=linear(p + "self_attn.o_proj.weight"),
                mlp_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=linear(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                down=linear(p + "mlp.down_proj.weight"),
            ))
        inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # [P, hd/2]
        angles = torch.cat((angles, angles), dim=-1)  # [P, hd]
        self.cos = angles.cos().to(device=device, dtype=dtype)
        self.sin = angles.sin().to(device=device, dtype=dtype)
        self.scale = 1.0 / math.sqrt(config.head_dim)

    @property
    def compute_path(self) -> str:
        """What computes this model, for /health, the banner and ``realizar info``: the kernels' ISA,
        the weights' format and the activations' type (or torch's device and dtype)."""
        linears = [self.lm_head, *(lin for layer in self.layers
                                   for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))]
        return self.backend.describe(linears)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache: KVCache, logits_indices: torch.Tensor,
                exact_logits: torch.Tensor | None = None, argmax: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(logits_indices), V] in float32 for the selected packed tokens. Each row's largest
        logits are the model's own, the others may be approximate (``LinearLayer.ranked``: sampling
        draws from the largest), except in the rows where ``exact_logits`` (bool) is set, whose every
        logit is (a request's logprobs, a prompt's scores). ``argmax`` (int64, one per row, filled with
        -1): where none is exact, the LM head writes each row's argmax that it finds on the way."""
        x = self.embed.rows(input_ids)  # [T, D]
        x = self.backend.run_layers(self, x, positions, meta, cache)  # layers_forward, or a fused form of it
        h = self.backend.rms_norm(x[logits_indices], self.final_norm, self.config.rms_norm_eps)
        if exact_logits is None or not bool(exact_logits.any()):
            return self.lm_head.ranked(h, argmax).float()
        if bool(exact_logits.all()):
            return self.lm_head(h).float()
        logits = torch.empty(h.shape[0], self.lm_head.out_features, dtype=torch.float32, device=h.device)
        logits[exact_logits] = self.lm_head(h[exact_logits]).float()
        logits[~exact_logits] = self.lm_head.ranked(h[~exact_logits]).float()
        return logits

    def layers_forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       cache: KVCache) -> torch.Tensor:
        """The decoder layers over the packed tokens ``x [T, D]``, one backend operation at a time."""
        norm = self.backend.rms_norm
        eps = self.config.rms_norm_eps
        for index, layer in enumerate(self.layers):
            x = x + self.attention(layer, index, norm(x, layer.attn_norm, eps), positions, meta, cache)
            x = x + self.mlp(layer, norm(x, layer.mlp_norm, eps))
        return x

    def mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate_up = layer.gate_up(x)  # [T, 2I]
        return layer.down(self.backend.silu_mul(gate_up))  # [T, I] -> [T, D]

    def attention(self, layer: LayerWeights, index: int, x: torch.Tensor, positions: torch.Tensor,
                  meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        c = self.config
        t = x.shape[0]
        qkv = layer.qkv(x)  # [T, (H + 2KV) * hd]
        # q and k rotated where they lie: they are the first H + KV heads of each row
        self.backend.rope(qkv, c.num_heads + c.num_kv_heads, c.head_dim, positions, self.cos, self.sin)
        q, k, v = qkv.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                             c.num_kv_heads * c.head_dim], dim=-1)
        q = q.view(t, c.num_heads, c.head_dim)  # [T, H, hd]
        k = k.view(t, c.num_kv_heads, c.head_dim)  # [T, KV, hd]
        v = v.view(t, c.num_kv_heads, c.head_dim)
        self.backend.write_kv(cache, index, meta.slot_mapping, k, v)
        out = self.backend.attention(q, cache, index, meta, self.scale)  # [T, H, hd]
        return layer.o(out.view(t, c.num_heads * c.head_dim))
