"""Tiny random Llama-family checkpoints (GGUF or safetensors), written by the tests that need a model file.

The GGUF writer does what llama.cpp's converter does: it permutes Q/K of llama-arch models and
stores 2-D weights in the requested GGML type. For types ``gguf.quants.quantize`` cannot produce
(the K-quants and most others), it writes random blocks whose float16 scales are valid, so the
values a loader must recover are exactly ``gguf.quants.dequantize`` of the bytes written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType as QT

from realizar.loading import names

# Byte offsets of the float16 scale fields inside one block, per type: random bytes there could be
# NaN or huge, so they are overwritten with small normal values.
F16_FIELDS: dict[QT, tuple[int, ...]] = {
    QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
    QT.IQ4_NL: (0,), QT.IQ4_XS: (0,),
}


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model. ``hidden`` and ``intermediate`` are multiples of 256 so K-quants fit."""

    arch: str = "llama"
    vocab: int = 64
    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    tied: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    context: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def bias(self) -> bool:
        return self.arch == "qwen2"


def tiny_weights(spec: TinySpec, seed: int = 0) -> dict[str, npt.NDArray[np.float32]]:
    """Random float32 weights under Hugging Face names and layout."""
    rng = np.random.default_rng(seed)
    h, i, q, kv = spec.hidden, spec.intermediate, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim

    def rand(*shape: int) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w = {"model.embed_tokens.weight": rand(spec.vocab, h), "model.norm.weight": 1 + rand(h)}
    if not spec.tied:
        w["lm_head.weight"] = rand(spec.vocab, h)
    for layer in range(spec.layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = 1 + rand(h)
        w[p + "self_attn.q_proj.weight"] = rand(q, h)
        w[p + "self_attn.k_proj.weight"] = rand(kv, h)
        w[p + "self_attn.v_proj.weight"] = rand(kv, h)
        w[p + "self_attn.o_proj.weight"] = rand(h, q)
        if spec.bias:
            w[p + "self_attn.q_proj.bias"] = rand(q)
            w[p + "self_attn.k_proj.bias"] = rand(kv)
            w[p + "self_attn.v_proj.bias"] = rand(kv)
        w[p + "post_attention_layernorm.weight"] = 1 + rand(h)
        w[p + "mlp.gate_proj.weight"] = rand(i, h)
        w[p + "mlp.up_proj.weight"] = rand(i, h)
        w[p + "mlp.down_proj.weight"] = rand(h, i)
    return w


def llama_cpp_permute(weight: npt.NDArray[np.float32], n_head: int) -> npt.NDArray[np.float32]:
    """The Q/K row permutation of llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``)."""
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def random_blocks(qtype: QT, n_blocks: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """``n_blocks`` random blocks of ``qtype`` with valid float16 scales, shape ``(n_blocks, type_size)``."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS.get(qtype, ()):
        scale = (np.abs(rng.standard_normal((n_blocks, 1))) * 0.01).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8)
    return blocks


def encode(weight: npt.NDArray[np.float32], qtype: QT, rng: np.random.Generator) -> npt.NDArray[np.generic]:
    """A 2-D weight in ``qtype`` as GGUFWriter takes it: float arrays for F32/F16, else ``(rows, bytes)`` uint8.

    Types gguf cannot quantize get random blocks instead (the weight only gives the shape).
    """
    if qtype == QT.F32:
        return weight.astype(np.float32)
    if qtype == QT.F16:
        return weight.astype(np.float16)
    try:
        return gguf.quants.quantize(weight, qtype)
    except NotImplementedError:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = weight.shape
        return random_blocks(qtype, rows * cols // block_size, rng).reshape(rows, cols // block_size * type_size)


# Hugging Face -> GGUF, the inverse of the loader's map.
_GGUF_LAYER = {hf: g for g, hf in names.GGUF_LAYER_NAMES.items()}
_GGUF_GLOBAL = {hf: g for g, hf in names.GGUF_GLOBAL_NAMES.items()}


def hf_to_gguf_name(name: str) -> str:
    """The llama.cpp name of a Hugging Face tensor name."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER[rest]}"


def write_tiny_gguf(
    path: str | Path, spec: TinySpec = TinySpec(), qtype: QT = QT.F32, seed: int = 0,
    weights: dict[str, npt.NDArray[np.float32]] | None = None,
    extra_metadata: Mapping[str, str | int | float] | None = None,
    extra_tensors: Mapping[str, npt.NDArray[np.generic]] | None = None,
) -> dict[str, npt.NDArray[np.generic]]:
    """Write a tiny model as GGUF; return what was stored, by GGUF name (after permutation/encoding).

    2-D weights are stored in ``qtype``; norms and biases in F32, as llama.cpp does.
    ``extra_metadata`` (str -> string, int -> uint32, float -> float32) and ``extra_tensors`` (GGUF
    names, written as given) let tests add what real files carry, or what they should not.
    """
    rng = np.random.default_rng(seed + 1)
    weights = tiny_weights(spec, seed) if weights is None else weights
    writer = gguf.GGUFWriter(str(path), spec.arch)
    writer.add_name(Path(path).stem)
    writer.add_block_count(spec.layers)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.intermediate)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_vocab_size(spec.vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(spec.vocab)])
    writer.add_token_types([1] * spec.vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)

    stored: dict[str, npt.NDArray[np.generic]] = {}
    for hf_name, weight in weights.items():
        name = hf_to_gguf_name(hf_name)
        if spec.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            weight = llama_cpp_permute(weight, spec.heads if ".attn_q." in name else spec.kv_heads)
        data: npt.NDArray[np.generic] = weight if weight.ndim == 1 else encode(weight, qtype, rng)
        raw_dtype = qtype if data.dtype == np.uint8 else None
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
        stored[name] = data
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
        stored[name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def write_tiny_safetensors(
    directory: str | Path, spec: TinySpec = TinySpec(), seed: int = 0, shards: int = 1,
) -> dict[str, npt.NDArray[np.float32]]:
    """Write a tiny Hugging Face model directory (config.json + safetensors); return its weights."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = tiny_weights(spec, seed)
    config = {
        "model_type": spec.arch,
        "architectures": ["Qwen2ForCausalLM" if spec.arch == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "max_position_embeddings": spec.context,
        "tie_word_embeddings": spec.tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (directory / "config.json").write_text(json.dumps(config))
    order = list(weights)
    weight_map: dict[str, str] = {}
    for shard in range(shards):
        part = order[shard::shards]
        file = "model.safetensors" if shards == 1 else f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: torch.from_numpy(weights[n]) for n in part}, str(directory / file))
        weight_map.update(dict.fromkeys(part, file))
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weights
