"""GGUF key/value metadata as plain Python values (used by the loader and the tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from realizar.loading.gguf import GGUFFile, field_value, metadata_from_reader

__all__ = ["field_value", "metadata_from_reader", "read_metadata"]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (tensor data is memory-mapped, not read).

    Raises :class:`realizar.loading.ModelLoadError` for a missing, truncated or corrupt file.
    """
    return GGUFFile(path).metadata()
