"""Tensor names: GGUF (llama.cpp) names to Hugging Face names, and the set a model must have."""

from __future__ import annotations

import re

from realizar.config import ModelConfig

# Whole-model tensors, GGUF -> HF.
GGUF_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Per-layer tensors: "blk.{i}.<key>" -> "model.layers.{i}.<value>".
GGUF_LAYER_NAMES: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Tensors llama.cpp stores that carry no weights of ours: RoPE frequency factors (Llama 3.1+),
# which the GGUF loader turns into ``RopeScaling`` instead.
GGUF_ROPE_FREQS = ("rope_freqs.weight", "rope.freqs.weight")

_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_to_hf(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None when the Llama family has no such tensor."""
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    match = _GGUF_LAYER_RE.match(name)
    if match is None:
        return None
    suffix = GGUF_LAYER_NAMES.get(match.group(2))
    return None if suffix is None else f"model.layers.{int(match.group(1))}.{suffix}"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model with this config must have, with its HF shape."""
    h, i = config.hidden_size, config.intermediate_size
    q_dim = config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_dim)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_dim,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    return shapes
