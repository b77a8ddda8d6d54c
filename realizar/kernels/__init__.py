"""Small C kernels for the CPU engine, compiled on first use and loaded with ctypes.

``paged_attention.c`` holds decode attention straight over the paged KV cache and the
KV-cache write. They replace a gather of every sequence's blocks plus a padded, masked
SDPA call, which cost more than the attention arithmetic itself (BENCHMARKS.md).

The library is built once per source version and CPU with the system C compiler
(``$CC``, ``cc``, ``gcc`` or ``clang``) into ``~/.cache/realizar/kernels`` (or
``$REALIZAR_CACHE_DIR``). Without a compiler, or with ``REALIZAR_KERNELS=0``, ``load()``
returns None and the model keeps its pure-torch path, which gives the same results.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("realizar.kernels")

SOURCE = Path(__file__).with_name("paged_attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-std=gnu11", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    if "REALIZAR_CACHE_DIR" in os.environ:
        return Path(os.environ["REALIZAR_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "realizar" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> Path | None:
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found; the CPU engine uses its pure-torch attention path")
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_signature().encode())
    target = _cache_dir() / f"paged_attention-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log.warning("building the CPU kernels failed; using the pure-torch path:\n%s", result.stderr[-2000:])
            return None
        os.replace(built, target)  # atomic, so concurrent builders never load a half-written file
    return target


class CpuKernels:
    """ctypes bindings of ``paged_attention.c``; the calls release the GIL."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._attention = lib.realizar_decode_attention
        self._attention.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, ctypes.c_float]
        self._attention.restype = ctypes.c_int
        self._write = lib.realizar_write_kv
        self._write.argtypes = [p, p, p, p, i64, i64, p, i64, i64]
        self._write.restype = None
        self.path = path

    def decode_attention(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                         scale: float) -> torch.Tensor:
        """q [B, H, hd]; caches [slots, KV, hd]; block tables [B, max_blocks]; lens [B] -> [B, H, hd]."""
        q = q.contiguous()
        b, heads, head_dim = q.shape
        kv_heads = key_cache.shape[1]
        out = torch.empty_like(q)
        tables = block_tables.contiguous()
        lens = context_lens.contiguous()
        status = self._attention(q.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                                 tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
                                 b, tables.shape[1], block_size, heads, kv_heads, head_dim, scale)
        if status != 0:
            raise MemoryError("decode attention could not allocate its score buffer")
        return out

    def write_kv(self, key_cache: torch.Tensor, value_cache: torch.Tensor, slots: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> None:
        """key_cache[slots] = k; value_cache[slots] = v, for k, v [T, KV, hd] with contiguous rows."""
        row = key_cache.shape[1] * key_cache.shape[2]
        k, v = _rows(k, row), _rows(v, row)
        self._write(key_cache.data_ptr(), value_cache.data_ptr(), k.data_ptr(), v.data_ptr(),
                    k.stride(0), v.stride(0), slots.data_ptr(), slots.shape[0], row)


def _rows(x: torch.Tensor, row: int) -> torch.Tensor:
    """``x`` [T, KV, hd] whose every row is one contiguous run of ``row`` floats."""
    if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]:
        return x
    return x.contiguous()


def enabled() -> bool:
    return os.environ.get("REALIZAR_KERNELS", "1").lower() not in ("0", "false", "no", "off")


@functools.cache
def _built() -> CpuKernels | None:
    try:
        path = _build()
        return CpuKernels(path) if path is not None else None
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("the CPU kernels could not be loaded (%s); using the pure-torch path", exc)
        return None


def load() -> CpuKernels | None:
    """The compiled kernels, or None where they cannot be built or are switched off."""
    return _built() if enabled() else None


def for_tensors(device: torch.device, dtype: torch.dtype) -> CpuKernels | None:
    """The kernels where they apply, float32 on the CPU; None elsewhere (torch's path)."""
    return load() if device.type == "cpu" and dtype == torch.float32 else None
