"""Hugging Face model directories: ``config.json`` plus ``*.safetensors`` (optionally sharded with an index)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from realizar.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from realizar.loading import names
from realizar.loading.errors import ModelLoadError, ModelNotFoundError
from realizar.loading.loaded_model import LoadedModel

INDEX_FILE = "model.safetensors.index.json"

# Buffers some older checkpoints saved alongside the weights; they are recomputed, not loaded.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def config_from_hf(path: Path, cfg: dict[str, Any]) -> ModelConfig:
    """The ModelConfig described by a Hugging Face ``config.json`` dict (``path`` is for messages)."""
    try:
        return _config_from_hf(path, cfg)
    except (ValueError, TypeError, AttributeError, ZeroDivisionError, OverflowError) as exc:
        # Values of the wrong type or range (a string hidden_size, zero heads, a list for a dict...).
        raise ModelLoadError(f"{path}: inconsistent config.json: {exc}") from None


def _config_from_hf(path: Path, cfg: dict[str, Any]) -> ModelConfig:
    arch = cfg.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported model_type {arch!r}; expected one of {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if cfg.get("mlp_bias") or (arch != "qwen2" and cfg.get("attention_bias")):
        # HF's llama/mistral attention_bias also puts a bias on o_proj, which ModelConfig cannot express.
        raise ModelLoadError(f"{path}: attention_bias/mlp_bias on a {arch} model is unsupported")

    def req(key: str) -> Any:
        if cfg.get(key) is None:
            raise ModelLoadError(f"{path}: config.json lacks {key!r}")
        return cfg[key]

    hidden = int(req("hidden_size"))
    num_heads = int(req("num_attention_heads"))
    # transformers 5 writes rope_theta/rope_type into "rope_parameters"; older configs use the top level.
    rope_params: dict[str, Any] = cfg.get("rope_parameters") or {}
    rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    eos = cfg.get("eos_token_id")
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(req("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(req("intermediate_size")),
        num_layers=int(req("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=_rope_scaling(path, cfg.get("rope_scaling") or rope_params),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2",
        bos_token_id=None if cfg.get("bos_token_id") is None else int(cfg["bos_token_id"]),
        eos_token_ids=eos_ids,
        name=path.name,
    )


def _rope_scaling(path: Path, rope: dict[str, Any]) -> RopeScaling:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return RopeScaling()
    if kind not in ("linear", "llama3"):
        raise ModelLoadError(f"{path}: unsupported rope_scaling type {kind!r}; expected linear or llama3")
    defaults = RopeScaling()
    try:
        return RopeScaling(
            kind=kind,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", defaults.low_freq_factor)),
            high_freq_factor=float(rope.get("high_freq_factor", defaults.high_freq_factor)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", defaults.original_max_position_embeddings)),
        )
    except ValueError as exc:
        raise ModelLoadError(f"{path}: bad rope_scaling in config.json: {exc}") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: expected JSON with a 'weight_map' object ({exc})") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors files; expected the model weights there")
    for f in files:
        if not f.is_file():
            raise ModelNotFoundError(f"{f}: listed in {INDEX_FILE} but missing")
    return files


def load_safetensors(directory: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a Hugging Face model directory (``config.json`` and safetensors weights) in ``dtype``."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory}: no config.json; expected a Hugging Face model directory")
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_path}: expected a JSON object ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{config_path}: expected a JSON object")
    config = config_from_hf(directory, cfg)
    expected = names.expected_shapes(config)

    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if _IGNORED.match(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
                        continue
                    if name not in expected:
                        raise ModelLoadError(
                            f"{file}: unexpected tensor {name!r}; a {config.architecture} model with this "
                            "config has no such weight"
                        )
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != expected[name]:
                        raise ModelLoadError(
                            f"{file}: tensor {name!r} has shape {list(tensor.shape)}; expected "
                            f"{list(expected[name])} from config.json"
                        )
                    tensors[name] = tensor.to(dtype)
        except SafetensorError as exc:
            raise ModelLoadError(f"{file}: not a valid safetensors file: {exc}") from None
        except OSError as exc:
            raise ModelLoadError(f"{file}: cannot read: {exc}") from None
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ModelLoadError(f"{directory}: missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    return LoadedModel(config=config, tensors=tensors, path=directory, format="safetensors", metadata=cfg)
