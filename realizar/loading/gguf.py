"""GGUF files: a bounds-checked, fast ``gguf.GGUFReader``, the ModelConfig they describe, and their weights.

Two things are added to ``gguf.GGUFReader``:

* every read is bounds-checked, so a truncated or corrupt file raises :class:`ModelLoadError` naming
  the file, the byte offset and what was expected, instead of a numpy ``IndexError``;
* arrays are decoded in bulk. The stock reader builds several numpy views per array element, which
  takes seconds for a tokenizer's 100k strings; here a numeric array is one view and a string array
  is walked with ``struct``, so the header of a typical model parses in well under a second.
"""

from __future__ import annotations

import contextlib
import logging
import math
import struct
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, cast

import gguf
import numpy as np
import numpy.typing as npt
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from realizar.config import ModelConfig, RopeScaling
from realizar.loading import names, quants
from realizar.loading.errors import ModelLoadError, ModelNotFoundError
from realizar.loading.loaded_model import LoadedModel

log = logging.getLogger("realizar.loading")

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# GGUF architectures we load. llama.cpp stores Mistral models as "llama"; a file that literally says
# "mistral" is loaded the same way except that Q/K are not un-permuted (transformers does the same).
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")

# Architectures whose Q/K weights llama.cpp's converter permutes (interleaved RoPE halves).
_PERMUTED_ARCHITECTURES = ("llama",)


class StringParts(Sequence[npt.NDArray[Any]]):
    """A string array field's parts as ``gguf.ReaderField`` holds them, ``[*prefix, len_0, bytes_0,
    len_1, bytes_1, ...]``, each a numpy view made when it is read, and all the strings decoded at once
    (:meth:`strings`): the header of a 49,152-token vocabulary and its merges parses in about half the time
    that building 200k views took."""

    def __init__(self, prefix: list[npt.NDArray[Any]], raw: npt.NDArray[np.uint8], starts: list[int],
                 lengths: list[int]) -> None:
        self.prefix, self.raw, self.starts, self.lengths = prefix, raw, starts, lengths

    def with_prefix(self, parts: list[npt.NDArray[Any]]) -> StringParts:
        return StringParts(parts + self.prefix, self.raw, self.starts, self.lengths)

    def __len__(self) -> int:
        return len(self.prefix) + 2 * len(self.starts)

    def __getitem__(self, index: int) -> npt.NDArray[Any]:  # type: ignore[override]
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):
            raise IndexError(index)
        if i < len(self.prefix):
            return self.prefix[i]
        item, is_bytes = divmod(i - len(self.prefix), 2)
        if is_bytes:
            return self.raw[self.starts[item]:self.starts[item] + self.lengths[item]]
        return np.array([self.lengths[item]], dtype=np.uint64)

    def strings(self) -> list[str]:
        """Every string, decoded as UTF-8 (undecodable bytes replaced)."""
        if not self.starts:
            return []
        first = self.starts[0]
        region = self.raw[first:self.starts[-1] + self.lengths[-1]].tobytes()
        return [region[s - first:s - first + n].decode("utf-8", errors="replace")
                for s, n in zip(self.starts, self.lengths, strict=True)]


class GGUFFile(gguf.GGUFReader):
    """A GGUF file opened as a copy-on-write memory map (tensor data is not read until used).

    ``fields`` and ``tensors`` are those of :class:`gguf.GGUFReader`. Numeric arrays are held as one
    part per array rather than one per element; ``ReaderField.contents()`` gives the same values.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._size = _check_header(self.path)
        try:
            # "c" (copy-on-write) makes the map writable, so torch.from_numpy needs no copy and does
            # not warn; nothing writes to it, and the file on disk could never change anyway.
            super().__init__(self.path, "c")
        except ModelLoadError:
            raise
        except (ValueError, KeyError, IndexError, OverflowError, struct.error) as exc:
            raise ModelLoadError(f"{self.path}: not a valid GGUF file: {exc}") from None

    # -- bounds-checked reads -------------------------------------------------------------------

    def _get(
        self, offset: int, dtype: npt.DTypeLike, count: int = 1,
        override_order: None | Literal["I", "S", "<"] = None,
    ) -> npt.NDArray[Any]:
        count = int(count)
        dt = np.dtype(dtype)  # type: ignore[arg-type]
        end = offset + dt.itemsize * count
        if end > self._size:
            what = f"{count} x {dt.name}" if count != 1 else f"a {dt.name}"
            raise ModelLoadError(
                f"{self.path}: truncated or corrupt GGUF: expected {what} ({end - offset} bytes) at byte "
                f"offset {offset}, but the file is {self._size} bytes long"
            )
        arr = self._raw[offset:end].view(dt)
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    @property
    def _raw(self) -> npt.NDArray[np.uint8]:
        # A plain ndarray view of the map: slicing an np.memmap is ~8x slower (its __array_finalize__).
        raw: npt.NDArray[np.uint8] | None = self.__dict__.get("_raw_cache")
        if raw is None:
            raw = self.__dict__["_raw_cache"] = self.data.view(np.ndarray)
        return raw

    # -- metadata -------------------------------------------------------------------------------

    def _get_field_parts(
        self, orig_offs: int, raw_type: int,
    ) -> tuple[int, list[npt.NDArray[Any]], list[int], list[GGUFValueType]]:
        gtype = self._value_type(raw_type, orig_offs - 4)
        if gtype != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype = self._value_type(int(raw_itype[0]), orig_offs)
        offs, count = orig_offs + 12, int(alen[0])
        head: list[npt.NDArray[Any]] = [raw_itype, alen]
        if itype == GGUFValueType.STRING:
            parts, size = self._string_array_parts(offs, count, head)
            return 12 + size, parts, list(range(3, 3 + 2 * count, 2)), [gtype, itype]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            values = self._get(offs, nptype, count)
            return 12 + int(values.nbytes), [*head, values], [2], [gtype, itype]
        # Arrays of arrays: rare enough to keep the reference implementation.
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_fields(self, offs: int, count: int) -> int:
        # The stock loop, with key names checked: a corrupt name would otherwise surface as a bare
        # UnicodeDecodeError with no offset.
        for _ in range(count):
            orig_offs = offs
            kv_klen, kv_kdata = self._get_str(offs)
            offs += int(kv_klen.nbytes + kv_kdata.nbytes)
            raw_kv_type = self._get(offs, np.uint32)
            offs += int(raw_kv_type.nbytes)
            parts: list[npt.NDArray[Any]] = [kv_klen, kv_kdata, raw_kv_type]
            field_size, field_parts, field_idxs, field_types = self._get_field_parts(offs, int(raw_kv_type[0]))
            name = self._utf8(kv_kdata, orig_offs, "metadata key")
            if name in self.fields:
                raise ModelLoadError(f"{self.path}: duplicate metadata key {name!r} at byte offset {orig_offs}")
            every = (cast(StringParts, field_parts).with_prefix(parts) if isinstance(field_parts, StringParts)
                     else parts + field_parts)
            self.fields[name] = gguf.ReaderField(
                orig_offs, name, cast("list[npt.NDArray[Any]]", every), [i + len(parts) for i in field_idxs],
                field_types)
            offs += field_size
        return offs

    def _get_tensor_info_field(self, orig_offs: int) -> gguf.ReaderField:
        _len, name_data = self._get_str(orig_offs)
        self._utf8(name_data, orig_offs, "tensor name")
        return super()._get_tensor_info_field(orig_offs)

    def _utf8(self, data: npt.NDArray[Any], offset: int, what: str) -> str:
        try:
            return data.tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(
                f"{self.path}: corrupt GGUF: the {what} at byte offset {offset} is not valid UTF-8"
            ) from None

    def _value_type(self, raw: int, offset: int) -> GGUFValueType:
        try:
            return GGUFValueType(int(raw))
        except ValueError:
            raise ModelLoadError(
                f"{self.path}: corrupt GGUF: unknown value type {int(raw)} at byte offset {offset}; "
                f"expected one of 0..{max(GGUFValueType)}"
            ) from None

    def _string_array_parts(self, offs: int, count: int,
                            head: list[npt.NDArray[Any]]) -> tuple[list[npt.NDArray[Any]], int]:
        """The parts ``[*head, len_0, bytes_0, len_1, bytes_1, ...]`` of a string array (a
        :class:`StringParts`), and its size in bytes."""
        raw, size = self._raw, self._size
        buffer = raw.data  # a memoryview: struct reads it without copying
        unpack = struct.Struct("<Q" if self.is_little_endian() else ">Q").unpack_from
        starts: list[int] = []
        lengths: list[int] = []
        pos = offs
        for _ in range(count):
            if pos + 8 > size:
                self._truncated_string(pos, 8)
            (length,) = unpack(buffer, pos)
            pos += 8
            if pos + length > size:
                self._truncated_string(pos, length)
            starts.append(pos)
            lengths.append(length)
            pos += length
        return cast("list[npt.NDArray[Any]]", StringParts(head, raw, starts, lengths)), pos - offs

    def _truncated_string(self, offset: int, nbytes: int) -> None:
        raise ModelLoadError(
            f"{self.path}: truncated or corrupt GGUF: expected a string of {nbytes} bytes at byte offset "
            f"{offset}, but the file is {self._size} bytes long"
        )

    def is_little_endian(self) -> bool:
        """Whether the file's numbers are little-endian (as llama.cpp writes them)."""
        return (sys.byteorder == "little") == (self.byte_order == "I")

    # -- tensor index ---------------------------------------------------------------------------

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        # Check what the stock reader would otherwise fail on with a bare ValueError or, for data
        # past the end of the file, a silently short array.
        for field in fields:
            _len, name_data, _ndims, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
                block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ModelLoadError(
                    f"{self.path}: tensor {name!r} (info at byte offset {field.offset}) has unknown GGML "
                    f"type {int(raw_dtype[0])}; expected a GGMLQuantizationType"
                ) from None
            shape = [int(d) for d in dims]
            n_elements = math.prod(shape)
            if shape and shape[0] % block_size:
                raise ModelLoadError(
                    f"{self.path}: tensor {name!r} (info at byte offset {field.offset}) has rows of "
                    f"{shape[0]} elements; expected a multiple of the {qtype.name} block size {block_size}"
                )
            start = start_offs + int(offset_tensor[0])
            end = start + n_elements // block_size * type_size
            if end > self._size:
                raise ModelLoadError(
                    f"{self.path}: truncated GGUF: tensor {name!r} ({qtype.name}, shape "
                    f"{shape[::-1]}) expects data at byte offsets {start}..{end}, but the file is "
                    f"{self._size} bytes long"
                )
        super()._build_tensors(start_offs, fields)

    def metadata(self) -> dict[str, Any]:
        """All key/value metadata as plain Python values (the ``GGUF.*`` header fields excluded)."""
        return metadata_from_reader(self)


def _check_header(path: Path) -> int:
    """Check the file exists and starts with a GGUF magic and a supported version; return its size."""
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file; expected a GGUF model file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file; expected a GGUF model file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path}: bad magic at byte offset 0: expected {GGUF_MAGIC!r}, found {head[:4]!r} "
            "(not a GGUF file)"
        )
    if len(head) < 8:
        raise ModelLoadError(f"{path}: truncated GGUF: expected a uint32 version at byte offset 4")
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0:  # written on a big-endian machine
        version = int.from_bytes(head[4:8], "big")
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(
            f"{path}: unsupported GGUF version {version} at byte offset 4; expected one of {SUPPORTED_VERSIONS}"
        )
    return size


# -- metadata values ------------------------------------------------------------------------------

def field_value(field: gguf.ReaderField) -> Any:
    """Decode one GGUF field into str, int, float, bool or a list of those."""
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        item_type = types[-1]
        if item_type == GGUFValueType.STRING:
            if isinstance(field.parts, StringParts):
                return field.parts.strings()
            return [field.parts[i].tobytes().decode("utf-8", errors="replace") for i in field.data]
        if item_type == GGUFValueType.ARRAY:
            return [field.parts[i].tolist() for i in field.data]
        values: list[Any] = []
        for i in field.data:  # one part per array (GGUFFile) or one per element (stock reader)
            values.extend(field.parts[i].tolist())
        return [bool(v) for v in values] if item_type == GGUFValueType.BOOL else values
    return _scalar(field.parts[field.data[0]], types[0])


def _scalar(part: npt.NDArray[Any], vtype: GGUFValueType) -> Any:
    if vtype == GGUFValueType.STRING:
        return part.tobytes().decode("utf-8", errors="replace")
    value = part.tolist()
    value = value[0] if isinstance(value, list) and len(value) == 1 else value
    if vtype == GGUFValueType.BOOL:
        return bool(value)
    return value


def metadata_from_reader(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value metadata of an open reader as plain Python values (``GGUF.*`` header fields excluded)."""
    return {name: field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


# -- config ---------------------------------------------------------------------------------------

def config_from_gguf(
    path: Path, metadata: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
    rope_freqs: torch.Tensor | None = None,
) -> ModelConfig:
    """The ModelConfig described by GGUF metadata.

    ``tensor_shapes`` maps GGUF tensor names to HF-layout shapes; it decides tied embeddings and the
    vocabulary size (the embedding's rows, which is what the logits have).
    ``rope_freqs`` is llama.cpp's per-frequency RoPE factor tensor, when the file has one.
    """
    try:
        return _config_from_gguf(path, metadata, tensor_shapes, rope_freqs)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as exc:
        # Values of the wrong type or range (a string block_count, zero heads, ...).
        raise ModelLoadError(f"{path}: inconsistent model metadata: {exc}") from None


def _config_from_gguf(
    path: Path, metadata: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
    rope_freqs: torch.Tensor | None,
) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported architecture {arch!r} (general.architecture); "
            f"expected one of {', '.join(GGUF_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if required and value is None:
            raise ModelLoadError(f"{path}: missing metadata key {arch}.{key!s}")
        return value

    hidden = int(get("embedding_length", required=True))
    num_heads = _uniform(path, f"{arch}.attention.head_count", get("attention.head_count", required=True))
    num_kv_heads = _uniform(path, f"{arch}.attention.head_count_kv", get("attention.head_count_kv", num_heads))
    head_dim = get("attention.key_length")
    if head_dim is None and arch != "qwen2":  # qwen2's rope.dimension_count is not its head size
        head_dim = get("rope.dimension_count")
    if head_dim is None:
        head_dim = hidden // num_heads
    if "token_embd.weight" not in tensor_shapes:
        raise ModelLoadError(f"{path}: missing tensor 'token_embd.weight'; expected a token embedding")
    vocab_size = tensor_shapes["token_embd.weight"][0]

    eos: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in eos:
            eos.append(int(value))
    bos = metadata.get("tokenizer.ggml.bos_token_id")

    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_layers=int(get("block_count", required=True)),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(path, arch, metadata, rope_freqs, int(head_dim)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_shapes,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
        name=path.stem,
    )


def _uniform(path: Path, key: str, value: Any) -> int:
    """A per-model count; some files store it per layer, which we accept only when all layers agree."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise ModelLoadError(f"{path}: {key} differs between layers ({value}); expected one value")
        value = value[0]
    return int(value)


def _rope_scaling(
    path: Path, arch: str, metadata: dict[str, Any], rope_freqs: torch.Tensor | None, rope_dim: int,
) -> RopeScaling:
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if kind == "none" and metadata.get(f"{arch}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", metadata[f"{arch}.rope.scale_linear"]
    if rope_freqs is not None:
        if kind != "none":
            raise ModelLoadError(f"{path}: both rope_freqs and rope.scaling.type={kind!r}; expected one")
        theta = float(metadata.get(f"{arch}.rope.freq_base", 10000.0))
        dim = int(metadata.get(f"{arch}.rope.dimension_count", rope_dim))
        return llama3_scaling_from_freqs(path, rope_freqs, theta, dim)
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return RopeScaling()
    if kind == "linear" and factor is not None:
        return RopeScaling(kind="linear", factor=float(factor))
    raise ModelLoadError(
        f"{path}: unsupported RoPE scaling {arch}.rope.scaling.type={kind!r}; expected 'none' or 'linear'"
    )


def llama3_rope_factors(
    theta: float, dim: int, factor: float, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
) -> torch.Tensor:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for Llama 3 RoPE scaling."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def llama3_scaling_from_freqs(path: Path, rope_freqs: torch.Tensor, theta: float, dim: int) -> RopeScaling:
    """Recover Llama 3 RoPE scaling from the per-frequency factors llama.cpp stores instead of it.

    The converter writes only the factors; they match the Llama 3 formula with the largest factor as
    ``factor`` and the converter's defaults for the rest (those of every Llama 3.x release).
    """
    freqs = rope_freqs.to(torch.float32).reshape(-1)
    factor = float(freqs.max())
    scaling = RopeScaling(kind="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    expected = llama3_rope_factors(theta, dim, factor)
    if expected.shape != freqs.shape or not torch.allclose(freqs, expected, rtol=1e-4, atol=1e-6):
        raise ModelLoadError(
            f"{path}: tensor 'rope_freqs.weight' does not match Llama 3 RoPE scaling (factor {factor}, "
            "low/high frequency factors 1/4, original context 8192); arbitrary RoPE factors are unsupported"
        )
    return scaling


# -- weights --------------------------------------------------------------------------------------

def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation, exactly as transformers' ``LlamaTensorProcessor`` does.

    llama.cpp stores each head's rows with the two RoPE halves interleaved (row ``2*d + t``); HF keeps
    them as halves (row ``t*half + d``). Works for weights ``[rows, in]`` and biases ``[rows]``.
    """
    half = weight.shape[0] // n_head // 2
    # [rows, *rest] -> [n_head, half, 2, *rest] -> swap -> [n_head, 2, half, *rest] -> [rows, *rest]
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, keep_quantized: bool = False) -> LoadedModel:
    """Load a Llama-family GGUF file: config from its metadata, weights dequantized to ``dtype``.

    With ``keep_quantized``, the 2-D weights of the types the quantized kernels multiply
    (``quants.INTEGER_UNPACKERS``) stay in their blocks, in ``LoadedModel.quantized``; the
    others are dequantized, with a log line naming their types.
    """
    path = Path(path)
    reader = GGUFFile(path)
    if not reader.is_little_endian():
        # The dequantizers read scales as little-endian, as every llama.cpp release writes them.
        raise ModelLoadError(f"{path}: big-endian GGUF files are unsupported; expected little-endian")
    metadata = reader.metadata()
    index = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in index.items()}

    rope_freqs = None
    for freq_name in names.GGUF_ROPE_FREQS:
        if freq_name in index:
            rope_freqs = _dequantize(path, index.pop(freq_name), shapes.pop(freq_name), torch.float32)
    config = config_from_gguf(path, metadata, shapes, rope_freqs)

    expected = names.expected_shapes(config)
    hf_names: dict[str, str] = {}
    for name, shape in shapes.items():
        hf = names.gguf_to_hf(name)
        if hf is None or hf not in expected:
            raise ModelLoadError(
                f"{path}: unexpected tensor {name!r} (data at byte offset {index[name].data_offset}); "
                f"a {config.architecture} model with this config has no such weight"
            )
        if shape != expected[hf]:
            raise ModelLoadError(
                f"{path}: tensor {name!r} (data at byte offset {index[name].data_offset}) has shape "
                f"{list(shape)}; expected {list(expected[hf])} from the metadata"
            )
        hf_names[name] = hf
    missing = sorted(set(expected) - set(hf_names.values()))
    if missing:
        raise ModelLoadError(f"{path}: missing {len(missing)} tensor(s), e.g. {missing[:3]}")

    permuted = config.architecture in _PERMUTED_ARCHITECTURES

    kept = {name for name in hf_names if keep_quantized and len(shapes[name]) == 2
            and index[name].tensor_type in quants.INTEGER_UNPACKERS}
    dequantized = sorted({index[name].tensor_type.name for name in hf_names
                          if keep_quantized and name not in kept and len(shapes[name]) == 2
                          and index[name].tensor_type not in quants.FLOAT_TYPES})
    if dequantized:
        log.info("%s: weights of type %s have no quantized kernel; dequantized to %s at load",
                 path.name, ", ".join(dequantized), dtype)

    def convert(name: str) -> torch.Tensor | quants.QuantizedTensor:
        weight: torch.Tensor | quants.QuantizedTensor
        if name in kept:
            quantized = _keep_quantized(path, index[name], shapes[name])
            weight = quantized
            if permuted and (".attn_q." in name or ".attn_k." in name):
                # a permutation of whole rows, so it applies to the rows of blocks alike
                rows = unpermute_qk(quantized.raw, config.num_heads if ".attn_q." in name else config.num_kv_heads)
                weight = quants.QuantizedTensor(rows.contiguous(), quantized.qtype, quantized.shape)
            return weight
        weight = _dequantize(path, index[name], shapes[name], dtype)
        if permuted and (".attn_q." in name or ".attn_k." in name):
            weight = unpermute_qk(weight, config.num_heads if ".attn_q." in name else config.num_kv_heads)
        return weight

    with parallel_tensors() as pool:
        converted = dict(zip(hf_names.values(), pool.map(convert, hf_names), strict=True))
    tensors = {name: t for name, t in converted.items() if isinstance(t, torch.Tensor)}
    kept_weights = {name: t for name, t in converted.items() if isinstance(t, quants.QuantizedTensor)}
    return LoadedModel(config=config, tensors=tensors, path=path, format="gguf", metadata=metadata,
                       quantized=kept_weights)


@contextlib.contextmanager
def parallel_tensors() -> Iterator[ThreadPoolExecutor]:
    """A pool that converts whole tensors in parallel while torch's own ops run single-threaded.

    Dequantization is a long series of small elementwise ops. With torch's intra-op threads every op
    ends in a barrier, and on a busy machine (other processes on the cores) a descheduled thread stalls
    each barrier: a 135M-parameter model took 21 s instead of 2 s. One tensor per Python thread (torch
    releases the GIL) uses the same cores without barriers. The thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="realizar-load") as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def _keep_quantized(path: Path, tensor: gguf.ReaderTensor, shape: tuple[int, ...]) -> quants.QuantizedTensor:
    try:
        return quants.keep_quantized(tensor.data, tensor.tensor_type, shape, mapped=True)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name!r} (data at byte offset {tensor.data_offset}): {exc}"
        ) from None


def _dequantize(path: Path, tensor: gguf.ReaderTensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    try:
        return quants.dequantize(tensor.data, tensor.tensor_type, shape, dtype)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name!r} (data at byte offset {tensor.data_offset}): {exc}"
        ) from None
