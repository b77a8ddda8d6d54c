"""The result of loading a model: its config and its weights under Hugging Face names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from realizar.config import ModelConfig


@dataclass
class LoadedModel:
    """A loaded Llama-family model.

    ``tensors`` uses Hugging Face names and layout (``[out_features, in_features]`` for linear
    weights), lives on the CPU and has the dtype asked of :func:`realizar.loading.load_model`.
    ``lm_head.weight`` is absent when ``config.tie_word_embeddings`` is true.
    ``metadata`` holds the GGUF key/values, or the ``config.json`` dict of a safetensors directory.
    """

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    path: Path
    format: str  # "gguf" | "safetensors"
    metadata: dict[str, Any]

    def num_parameters(self) -> int:
        """Number of weight elements held (tied embeddings counted once)."""
        return sum(t.numel() for t in self.tensors.values())
