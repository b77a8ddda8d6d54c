"""The one interface the model computes through, and the step's attention metadata it takes.

A backend does the per-token work of the Llama forward pass: RMSNorm, RoPE, SiLU-and-multiply,
the KV-cache write and attention over the paged cache, plus the linear layers it builds at load
and the sampler's plain draws. ``realizar.backends.choose_backend`` picks one per (device,
dtype), once; the model then calls it without asking which it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from realizar.config import ModelConfig
from realizar.kv_cache import KVCache
from realizar.loading.quants import QuantizedTensor


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


class LinearLayer(Protocol):
    """``y = x W^T (+ b)`` for a fixed weight ``W [out, in]``, built by a backend at load."""

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, in]`` -> ``[T, out]``."""
        ...

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of ``W``, ``[len(ids), in]``: the embedding lookup."""
        ...

    def ranked(self, x: torch.Tensor, argmax: torch.Tensor | None = None) -> torch.Tensor:
        """``self(x)`` where only each row's largest outputs need the layer's precision (an LM head's
        logits): a layer with a cheaper way to compute the others approximately may take it. ``argmax``
        (int64 ``[rows]``, filled with -1 by the caller): a layer that finds a row's argmax over the outputs
        it returns on the way (the first of several largest, as numpy's) writes it there; -1 stays elsewhere."""
        ...


class LayerStack(Protocol):
    """What a backend reads to run a model's decoder layers (``realizar.model.llama.LlamaModel``):
    its layers' weights, its shape, the RoPE tables, and the per-operation definition of the layers,
    which any backend may run instead of a fused form of its own."""

    config: ModelConfig
    cos: torch.Tensor
    sin: torch.Tensor
    scale: float

    @property
    def layers(self) -> Sequence[Any]:
        """LayerWeights: attn_norm, qkv, o, mlp_norm, gate_up, down."""
        ...

    def layers_forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       cache: KVCache) -> torch.Tensor:
        ...


class Backend(Protocol):
    """What computes the model: every operation the forward pass and the sampler need."""

    device: torch.device
    dtype: torch.dtype

    def linear(self, parts: Sequence[torch.Tensor | QuantizedTensor], bias: torch.Tensor | None = None,
               fast: bool = False) -> LinearLayer:
        """The layer for the weights ``parts`` stacked along ``out`` (float or GGUF block-quantized);
        ``fast`` asks for the not-exact fast class where the backend has one."""
        ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``rms_norm(x) * weight`` of ``x [T, D]``, computed in float32."""
        ...

    def rope(self, qkv: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotates the first ``heads`` heads of each row of ``qkv [T, >= heads * head_dim]`` in place by
        the row's position; ``cos``, ``sin`` are ``[max_position, head_dim]`` tables."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for ``gate_up = [gate | up]`` ``[T, 2I]`` -> ``[T, I]``."""
        ...

    def write_kv(self, cache: KVCache, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys and values ``[T, KV, hd]`` into layer ``layer`` of the cache at ``slots [T]``."""
        ...

    def attention(self, q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata,
                  scale: float) -> torch.Tensor:
        """Queries ``q [T, H, hd]`` over the cache (already holding this step's K/V) -> ``[T, H, hd]``:
        each decode query over its sequence's context, each prompt token causally over its prefix."""
        ...

    def run_layers(self, model: LayerStack, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                   cache: KVCache) -> torch.Tensor:
        """``model``'s decoder layers over ``x [T, D]``: its own per-operation ``layers_forward``, or a
        fused form of the same operations in the same order (equal bit for bit)."""
        ...

    def sample(self, logits: torch.Tensor, rows: torch.Tensor, temperatures: torch.Tensor,
               uniforms: torch.Tensor) -> torch.Tensor:
        """For each ``r``, the token drawn from ``softmax(logits[rows[r]] / temperatures[r])`` by inverse
        CDF at ``uniforms[r]`` (float32 in [0, 1)); tokens at -inf are never drawn."""
        ...

    def describe(self, linears: Sequence[LinearLayer]) -> str:
        """What computes a model of these layers (the LM head first), for /health, the banner and ``realizar info``."""
        ...
