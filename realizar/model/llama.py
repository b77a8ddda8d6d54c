"""The Llama-family forward pass (llama, SmolLM2, mistral, qwen2) over packed tokens.

One call runs every sequence of an engine step: decode tokens and prefill chunks are
packed into one ``[T, D]`` activation, so the linear layers (``realizar.model.linear``)
see the whole batch. Keys and values live in a paged cache (``realizar.kv_cache.KVCache``)
addressed through block tables.

In float32 on the CPU, compiled kernels (``realizar.kernels``) do the per-token work
(RMSNorm, RoPE, SiLU-and-multiply) and all of a step's attention in one call that reads
the pages directly: each query row, decode or prompt token, attends to its own prefix of
its sequence's cache. Elsewhere the torch code below is the whole path: decode queries
gather their blocks for one padded SDPA call, and each prefill chunk gets one causal SDPA
call. Both paths compute the same math and give the same greedy tokens (tests/golden).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from realizar import kernels
from realizar.config import ModelConfig, RopeScaling
from realizar.kv_cache import KVCache
from realizar.loading.quants import QuantizedTensor
from realizar.model.linear import Linear, QuantLinear, make_linear


@dataclass
class PrefillChunk:
    """One sequence's slice of new prompt tokens in the packed batch."""

    token_start: int  # offset in the packed tokens
    num_tokens: int
    block_table: torch.Tensor  # [blocks] the cache blocks of every token up to this chunk's end
    start_position: int  # position of the chunk's first token (tokens already in the cache)

    def context_slots(self, block_size: int) -> torch.Tensor:
        """[context_len] cache slots of every token up to this chunk's end."""
        offsets = torch.arange(block_size, device=self.block_table.device)
        slots = self.block_table[:, None] * block_size + offsets[None, :]  # [blocks, bs]
        return slots.flatten()[: self.start_position + self.num_tokens]


@dataclass
class AttentionMetadata:
    """Where each packed token's K/V goes, and what each query attends to.

    Packed token order: the ``num_decodes`` decode tokens first, then prefill chunks.
    """

    slot_mapping: torch.Tensor  # [T] cache slot written by each token
    num_decodes: int
    decode_block_tables: torch.Tensor  # [B_dec, max_blocks] block ids (padded with 0)
    decode_context_lens: torch.Tensor  # [B_dec] tokens each decode query attends to, itself included
    prefills: list[PrefillChunk]
    _decode_mask: torch.Tensor | None = field(default=None, repr=False)
    _query_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def query_rows(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What every packed query attends to, for the paged attention kernel, built once per
        step: (block tables [S, max_blocks], the table of each query [T], its context length [T]).
        Decode queries use their own tables; the tokens of a prefill chunk share their
        sequence's table and see the prefix up to themselves."""
        if self._query_rows is None:
            tables = [self.decode_block_tables] + [chunk.block_table[None, :] for chunk in self.prefills]
            rows = [torch.arange(self.num_decodes)]
            lens = [self.decode_context_lens]
            for table, chunk in enumerate(self.prefills, start=self.num_decodes):
                rows.append(torch.full((chunk.num_tokens,), table))
                lens.append(torch.arange(chunk.start_position + 1, chunk.start_position + chunk.num_tokens + 1))
            padded = torch.zeros(self.num_decodes + len(self.prefills), max(t.shape[1] for t in tables),
                                 dtype=torch.int64)
            start = 0
            for t in tables:
                padded[start:start + t.shape[0], :t.shape[1]] = t
                start += t.shape[0]
            self._query_rows = (padded, torch.cat(rows).long(), torch.cat(lens).long())
        return self._query_rows

    def decode_mask(self, block_size: int) -> torch.Tensor:
        """[B_dec, 1, 1, max_blocks * block_size], True at the live slots; built once per step,
        and only by the padded SDPA path that needs it."""
        if self._decode_mask is None:
            b, max_blocks = self.decode_block_tables.shape
            span = torch.arange(max_blocks * block_size, device=self.decode_block_tables.device)
            self._decode_mask = (span[None, :] < self.decode_context_lens[:, None]).view(b, 1, 1, -1)
        return self._decode_mask


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             compiled: kernels.CpuKernels | None = None) -> torch.Tensor:
    """RMSNorm computed in float32, as the reference implementation does."""
    if compiled is not None:
        return compiled.rms_norm(x, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [D]
    qkv: Linear | QuantLinear  # [(H + 2 * KV) * hd, D]  q, k and v projections fused (bias on qwen2)
    o: Linear | QuantLinear  # [D, H * hd]
    mlp_norm: torch.Tensor  # [D]
    gate_up: Linear | QuantLinear  # [2 * I, D]  gate and up projections fused
    down: Linear | QuantLinear  # [D, I]


class LlamaModel:
    """Weights plus the forward pass; holds no per-request state."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor],
                 device: torch.device, dtype: torch.dtype,
                 quantized: dict[str, QuantizedTensor] | None = None, fast: bool = False) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        quantized = quantized or {}

        def take(name: str) -> torch.Tensor:
            return tensors[name].to(device=device, dtype=dtype).contiguous()

        def linear(*names: str, bias: torch.Tensor | None = None) -> Linear | QuantLinear:
            """The weights ``names`` stacked along ``out``, kept quantized where they were loaded so
            (``fast``: multiplied by the fast, not exact, class)."""
            return make_linear([quantized[n] if n in quantized else tensors[n] for n in names], device, dtype, bias,
                               fast)

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
        # the compiled kernels where they apply (float32 on the CPU); torch otherwise
        self.kernels = kernels.for_tensors(device, dtype)

    @property
    def compute_path(self) -> str:
        """What computes this model, for /health, the banner and ``realizar info``: the kernels' ISA,
        the weights' format and the activations' type."""
        linears = [self.lm_head, *(lin for layer in self.layers
                                   for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))]
        quantized = [lin for lin in linears if isinstance(lin, QuantLinear)]
        if self.kernels is None:
            return f"{self.device.type}, torch, {str(self.dtype).removeprefix('torch.')} weights and activations"
        if not quantized:
            return f"cpu kernels {kernels.isa()}, float32 weights and activations"
        formats = sorted({f for lin in quantized for f in lin.formats})
        activations = "int8 activations (fast)" if any(lin.fast for lin in quantized) else "float32 activations"
        kept = "" if len(quantized) == len(linears) else f", {len(linears) - len(quantized)} float32 layers"
        return f"cpu kernels {kernels.isa()}, {'+'.join(formats)} weights kept quantized{kept}, {activations}"

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache: KVCache, logits_indices: torch.Tensor) -> torch.Tensor:
        """Logits [len(logits_indices), V] in float32 for the selected packed tokens."""
        x = self.embed.rows(input_ids)  # [T, D]
        eps = self.config.rms_norm_eps
        for index, layer in enumerate(self.layers):
            x = x + self.attention(layer, index, rms_norm(x, layer.attn_norm, eps, self.kernels),
                                   positions, meta, cache)
            x = x + self.mlp(layer, rms_norm(x, layer.mlp_norm, eps, self.kernels))
        h = rms_norm(x[logits_indices], self.final_norm, eps, self.kernels)
        return self.lm_head(h).float()

    def mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate_up = layer.gate_up(x)  # [T, 2I]
        if self.kernels is not None:
            return layer.down(self.kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
        return layer.down(F.silu(gate) * up)

    def attention(self, layer: LayerWeights, index: int, x: torch.Tensor, positions: torch.Tensor,
                  meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        c = self.config
        t = x.shape[0]
        qkv = layer.qkv(x)  # [T, (H + 2KV) * hd]
        if self.kernels is not None:  # rotates q and k where they lie
            self.kernels.rope(qkv, c.num_heads + c.num_kv_heads, c.head_dim, positions, self.cos, self.sin)
        q, k, v = qkv.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                             c.num_kv_heads * c.head_dim], dim=-1)
        q = q.view(t, c.num_heads, c.head_dim)  # [T, H, hd]
        k = k.view(t, c.num_kv_heads, c.head_dim)  # [T, KV, hd]
        v = v.view(t, c.num_kv_heads, c.head_dim)
        if self.kernels is None:
            cos = self.cos[positions].unsqueeze(1)  # [T, 1, hd]
            sin = self.sin[positions].unsqueeze(1)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        cache.write(index, meta.slot_mapping, k, v)

        if self.kernels is not None:
            tables, rows, lens = meta.query_rows(cache.block_size)
            out = self.kernels.paged_attention(q, cache.keys[index], cache.values[index], tables, lens,
                                               cache.block_size, self.scale, rows)
            return layer.o(out.view(t, c.num_heads * c.head_dim))
        out = torch.empty_like(q)  # [T, H, hd]
        if meta.num_decodes:
            out[: meta.num_decodes] = self.decode_attention(q[: meta.num_decodes], index, meta, cache)
        for chunk in meta.prefills:
            span = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
            out[span] = self.prefill_attention(q[span], index, chunk, cache)
        return layer.o(out.view(t, c.num_heads * c.head_dim))

    def decode_attention(self, q: torch.Tensor, index: int, meta: AttentionMetadata,
                         cache: KVCache) -> torch.Tensor:
        """One query per sequence against its gathered blocks; the query heads that share a
        KV head are laid along SDPA's query-length axis, so no K/V repeat is needed."""
        c = self.config
        b = q.shape[0]
        group = c.num_heads // c.num_kv_heads
        keys, values = cache.gather_blocks(index, meta.decode_block_tables)  # [B, KV, L, hd] each
        q = q.view(b, c.num_kv_heads, group, c.head_dim)  # [B, KV, G, hd]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=meta.decode_mask(cache.block_size),
                                             scale=self.scale)
        return out.reshape(b, c.num_heads, c.head_dim)  # [B, H, hd]

    def prefill_attention(self, q: torch.Tensor, index: int, chunk: PrefillChunk,
                          cache: KVCache) -> torch.Tensor:
        """Causal attention of a prompt chunk over everything cached before it and itself."""
        c = self.config
        n = q.shape[0]
        group = c.num_heads // c.num_kv_heads
        keys, values = cache.gather_slots(index, chunk.context_slots(cache.block_size))  # [KV, L, hd] each
        length = keys.shape[1]
        keys = keys.repeat_interleave(group, dim=0)  # [H, L, hd]
        values = values.repeat_interleave(group, dim=0)
        q = q.transpose(0, 1)  # [H, n, hd]
        if chunk.start_position == 0:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scale)
        else:
            q_pos = torch.arange(chunk.start_position, chunk.start_position + n, device=q.device)
            k_pos = torch.arange(length, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # [n, L]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        return out.transpose(0, 1)  # [n, H, hd]
