"""GGUF key/value metadata as plain Python values (used by the loader and the tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np


def field_value(field: gguf.ReaderField) -> Any:
    """Decode one GGUF field into str, int, float, bool or a list of those."""
    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        item_type = types[-1]
        if item_type == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [_scalar(field.parts[i], item_type) for i in field.data]
    return _scalar(field.parts[field.data[0]], types[0])


def _scalar(part: np.ndarray, vtype: gguf.GGUFValueType) -> Any:
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    value = part.tolist()
    value = value[0] if isinstance(value, list) and len(value) == 1 else value
    if vtype == gguf.GGUFValueType.BOOL:
        return bool(value)
    return value


def metadata_from_reader(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {name: field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (tensor data is memory-mapped, not read)."""
    return metadata_from_reader(gguf.GGUFReader(str(path), "r"))
