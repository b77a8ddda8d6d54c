"""The result of loading a model: its config and its weights under Hugging Face names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from realizar.config import ModelConfig
from realizar.loading.quants import QuantizedTensor


@dataclass
class LoadedModel:
    """A loaded Llama-family model.

    ``tensors`` uses Hugging Face names and layout (``[out_features, in_features]`` for linear
    weights), lives on the CPU and has the dtype asked of :func:`realizar.loading.load_model`.
    ``lm_head.weight`` is absent when ``config.tie_word_embeddings`` is true.
    ``metadata`` holds the GGUF key/values, or the ``config.json`` dict of a safetensors directory.
    ``quantized`` holds the weights left in their GGUF blocks (``load_model(keep_quantized=True)``),
    under Hugging Face names and absent from ``tensors``.
    """

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    path: Path
    format: str  # "gguf" | "safetensors"
    metadata: dict[str, Any]
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)

    def num_parameters(self) -> int:
        """Number of weight elements held (tied embeddings counted once)."""
        return (sum(t.numel() for t in self.tensors.values())
                + sum(q.shape[0] * q.shape[1] for q in self.quantized.values()))
