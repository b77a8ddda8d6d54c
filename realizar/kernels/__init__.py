"""Small C kernels for the CPU engine, compiled on first use and loaded with ctypes.

- ``paged_attention.c``: attention straight over the paged KV cache, and the KV-cache
  write. They replace a gather of every sequence's blocks plus a padded, masked SDPA call,
  which cost more than the attention arithmetic itself (BENCHMARKS.md). Decode rows are
  attended one by one; the rows of a prompt chunk in tiles (``prefill_attention.c``: a
  flash-attention-style pass that reads the context once per 8 rows, not once per row).
- ``packed_gemm.c``: the linear layers' matrix products, over weights packed once at load
  time. A BLAS sgemm repacks the weight on every call, which at a decode step's few rows
  costs as much as the arithmetic.
- ``quant_gemm.c``: the same products over GGUF's block-quantized weights, kept quantized
  (repacked once into 16-row records) and dequantized exactly on the fly: a decode step
  reads 0.6-1.1 bytes per weight instead of 4. ``quant_fast.c`` holds their fast class (each
  activation as two int8 terms, integer dot products: AVX512-VNNI, AVX2, or plain C, by the build's
  feature macros), not exact but passing the quality gate; ``quant_blocks.h`` what the two
  share. ``REALIZAR_QUANTIZED`` picks ``exact``, ``fast`` or ``auto`` (the default: the faster,
  timed at load). ``quant_tiles.c``: the fast class's products of many rows on AMX's bfloat16 tiles,
  each operand as two bfloat16 terms, where the CPU has them and they are faster (``REALIZAR_TILES``).
- ``pointwise.c``: RMSNorm, SiLU-and-multiply and RoPE, one pass
  each instead of several torch ops with a temporary apiece.
- ``sampling.c``: draws from softmax(logits / temperature) in one pass per row, without
  a sort or a probability tensor.
- ``thread_pool.c``: the threads they all share (``set_threads``), apart from torch's.

The library is built once per source version and CPU with the system C compiler
(``$CC``, ``cc``, ``gcc`` or ``clang``) into ``~/.cache/realizar/kernels`` (or
``$REALIZAR_CACHE_DIR``). Without a compiler, or with ``REALIZAR_KERNELS=0``, ``load()``
returns None and the model keeps its pure-torch path, which gives the same results.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

try:
    import fcntl
except ImportError:  # not POSIX: concurrent builders each build (the result is replaced atomically)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("realizar.kernels")

SOURCE_NAMES = ("thread_pool.c", "packed_gemm.c", "paged_attention.c", "prefill_attention.c", "pointwise.c",
                "sampling.c", "quant_gemm.c", "quant_fast.c", "quant_tiles.c", "decoder.c")
HEADER_NAMES = ("cpu_kernels.h", "quant_blocks.h")
SOURCES = [Path(__file__).with_name(name) for name in SOURCE_NAMES]
HEADERS = [Path(__file__).with_name(name) for name in HEADER_NAMES]
FLAGS = ["-O3", "-fopenmp-simd", "-std=gnu11", "-shared", "-fPIC", "-pthread"]
# REALIZAR_KERNELS_ISA builds for less than this CPU has, so each code path can be tested and timed
# on one machine: ``avx512`` (Skylake-SP's AVX-512, without VNNI), ``avx2`` (Haswell's AVX2, FMA and F16C,
# no AVX-512) or ``generic`` (x86-64's SSE2).
TARGETS = {"native": "-march=native", "avx512": "-march=skylake-avx512", "avx2": "-march=haswell",
           "generic": "-march=x86-64"}


def target() -> str:
    """The instruction set the kernels are built for: ``native`` (this CPU's), or what
    ``REALIZAR_KERNELS_ISA`` asks for on x86-64."""
    wanted = os.environ.get("REALIZAR_KERNELS_ISA", "native").lower()
    return wanted if wanted in TARGETS and platform.machine() in ("x86_64", "AMD64") else "native"


def _flags() -> list[str]:
    return [*FLAGS, TARGETS[target()]]
PANEL = 16  # output columns per packed weight panel (NR in packed_gemm.c)
QUANT_BLOCK = 32  # terms of the sums per quantized record (QK in quant_gemm.c)


@dataclass(frozen=True)
class QuantFormat:
    """How ``quant_gemm.c`` stores one kind of quantized weight: ``w = (q - offset) * d (+ min)``,
    ``q`` of ``bits`` bits, one ``d`` per ``group`` terms (32, or 16 for Q6_K), and a ``min`` per
    32 terms when ``has_min``. ``code`` is the format's number in ``quant_gemm.c``."""

    code: int
    bits: int
    offset: int
    has_min: bool
    group: int = 32
    half: bool = False  # float16 scales (where each is a float16 exactly), else float32

    @property
    def record_bytes(self) -> int:
        ints = 512 if self.bits == 8 else 256 + (self.bits - 4) * 64
        return ints + (32 if self.has_min or self.group == 16 else 16) * (2 if self.half else 4)


HALF_SCALES = 8  # quant_gemm.c's HALF flag on a format's code
_BASE_FORMATS = [QuantFormat(0, 4, 8, False), QuantFormat(1, 4, 0, True), QuantFormat(2, 5, 16, False),
                 QuantFormat(3, 5, 0, True), QuantFormat(4, 6, 32, False, 16), QuantFormat(5, 8, 0, False)]
# The formats of quant_gemm.c (its enum), by (bits, offset, has_min, group, half).
QUANT_FORMATS = _BASE_FORMATS + [dataclasses.replace(f, code=f.code | HALF_SCALES, half=True) for f in _BASE_FORMATS]


def quant_format(bits: int, offset: int, has_min: bool, group: int, half: bool = False) -> QuantFormat | None:
    """The kernel format of integers of ``bits`` bits, or None where quant_gemm.c has none."""
    for fmt in QUANT_FORMATS:
        if (fmt.bits, fmt.offset, fmt.has_min, fmt.group, fmt.half) == (bits, offset, has_min, group, half):
            return fmt
    return None


def exact_in_half(*scales: torch.Tensor | None) -> bool:
    """Whether every value of ``scales`` is a float16 exactly, so records may store them in half the
    bytes and still dequantize bit for bit (GGUF's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 scales are float16)."""
    return all(t is None or torch.equal(t.half().float(), t) for t in scales)


@dataclass(frozen=True)
class QuantPacked:
    """A quantized weight ``[n, k]`` repacked for ``quant_gemm.c``: ``records [panels, k / 32, bytes]``."""

    records: torch.Tensor
    fmt: QuantFormat
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.records.numel()


FAST_NIBBLES, FAST_BYTES, FAST_SIGNED_BYTES, FAST_SIXES = 0, 1, 2, 3  # quant_fast.c's kinds of a fast record's integers
FAST_HALF, FAST_TWO_D, FAST_MIN, FAST_SUPER = 8, 16, 32, 64  # quant_fast.c's flags of a fast record's scales
# GGUF types whose blocks the C side lays out as fast records directly (CpuKernels.pack_fast_blocks): its code for
# the type, the records' kind (Q8_0: FAST_BYTES or FAST_SIGNED_BYTES, as the build takes bytes) and integer offset
FAST_BLOCK_FORMATS = {"Q4_0": (0, FAST_NIBBLES | FAST_HALF, 8), "Q4_1": (1, FAST_NIBBLES | FAST_HALF | FAST_MIN, 0),
                      "Q8_0": (2, FAST_HALF, 0), "Q4_K": (3, FAST_NIBBLES | FAST_MIN | FAST_SUPER, 0),
                      "Q6_K": (4, FAST_SIXES | FAST_TWO_D | FAST_SUPER, 32), "Q5_0": (5, FAST_BYTES | FAST_HALF, 16),
                      "Q5_1": (6, FAST_BYTES | FAST_HALF | FAST_MIN, 0), "Q5_K": (7, FAST_BYTES | FAST_MIN | FAST_SUPER, 0)}
SUPER_BLOCKS = 8  # blocks of 32 terms in a k-quant's super-block
FAST_EVERY_ROW = 1 << 30  # quant_fast.c's FAST_MAX_ROWS where every row takes the integer products (VNNI, AVX2)


@dataclass(frozen=True)
class FastPacked:
    """A quantized weight ``[n, k]`` in ``quant_fast.c``'s records for integer dot products (the fast
    class): ``records [panels, bytes]`` (each panel's records in a row), ``kind`` (bits 0-1: FAST_NIBBLES,
    FAST_BYTES (unsigned), FAST_SIGNED_BYTES or FAST_SIXES; then the FAST_* flags of the scales' layout)
    and ``c``, the integer offset taken off the stored integers."""

    records: torch.Tensor
    kind: int
    c: int
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.records.numel()


class FactoredScales(Protocol):
    """A k-quant's scales as stored (``realizar.loading.quants.FactoredScales``): ``scales = d * ints`` and
    ``mins = neg_dmin * min_ints``, per 256-term super-block d."""

    @property
    def scales(self) -> torch.Tensor: ...  # [n, k // group] uint8 or int8

    @property
    def mins(self) -> torch.Tensor | None: ...  # uint8 [n, k // 32]

    @property
    def d(self) -> torch.Tensor: ...  # float16 [n, k // 256]

    @property
    def neg_dmin(self) -> torch.Tensor | None: ...  # float16 [n, k // 256]


def cache_dir() -> Path:
    """Where realizar keeps what it builds or measures once per machine (``REALIZAR_CACHE_DIR``)."""
    if "REALIZAR_CACHE_DIR" in os.environ:
        return Path(os.environ["REALIZAR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "realizar"


def _cache_dir() -> Path:
    return cache_dir() / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def isa() -> str:
    """The instruction set the kernels are built for (``-march=native`` unless ``REALIZAR_KERNELS_ISA``
    asks for less), as users name it: ``avx512``, with ``(vnni)`` where its integer dot products run
    (``quant_fast.c``), ``avx2``, or ``generic``. Only what the kernels use is named: they have no code for
    AVX512-BF16, AVX-VNNI or AMX, so a CPU's flags for those change nothing here."""
    if target() != "native":
        return target()
    flags = set(_cpu_signature().split())
    if "avx512f" in flags:
        return "avx512" + (" (vnni)" if "avx512_vnni" in flags else "")
    if "avx2" in flags:
        return "avx2"
    return "generic"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


BUILD_TIMEOUT_S = 600  # a generic x86-64 build takes ~2 min


def _build(directory: Path | None = None) -> Path | None:
    """The library built from this package's sources, or from those in ``directory`` (another copy of
    ``realizar/kernels``, which ``benchmarks/kernel_ab.py`` times against this one); cached by their digest."""
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found; the CPU engine uses its pure-torch path")
        return None
    sources, headers = ((SOURCES, HEADERS) if directory is None else
                        ([directory / name for name in SOURCE_NAMES], [directory / name for name in HEADER_NAMES]))
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in [*headers, *sources])
                            + " ".join(_flags()).encode() + _cpu_signature().encode())
    target = _cache_dir() / f"cpu_kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _held(target.with_suffix(".lock")):
        if target.exists():  # another process built it while this one waited
            return target
        return _compile(compiler, target, sources)


@contextlib.contextmanager
def _held(lock: Path) -> Iterator[None]:
    """An exclusive lock on the file ``lock`` (created if missing) for the block: processes that start
    together on a cold cache (a fleet's replicas, a test run's servers) build the kernels once, the others
    waiting for it, where each had compiled its own copy (about 18 s of CPU each)."""
    with open(lock, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _compile(compiler: str, target: Path, sources: list[Path]) -> Path | None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        objects = [Path(tmp) / f"{source.stem}.o" for source in sources]
        # every source at once (the cores share them): the two quantized-product files are most of the time
        compiles = [subprocess.Popen([compiler, *_flags(), "-c", str(source), "-o", str(obj)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    for source, obj in zip(sources, objects, strict=True)]
        failures = [_finished(compile_, source) for compile_, source in zip(compiles, sources, strict=True)]
        if not any(failures):
            link = subprocess.run([compiler, *_flags(), *map(str, objects), "-o", str(built), "-lm"],
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            failures.append(link.stderr if link.returncode else "")
        if any(failures):
            log.warning("building the CPU kernels failed; using the pure-torch path:\n%s",
                        "".join(failures)[-2000:])
            return None
        os.replace(built, target)  # atomic, so concurrent builders never load a half-written file
    return target


def _finished(compile_: subprocess.Popen[str], source: Path) -> str:
    """'' when the compile ended well, else its errors (killed past BUILD_TIMEOUT_S)."""
    try:
        _out, errors = compile_.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        compile_.kill()
        compile_.communicate()
        return f"{source.name}: no result after {BUILD_TIMEOUT_S} s\n"
    return f"{source.name}: {errors}" if compile_.returncode else ""


LINEAR_PACKED, LINEAR_QUANT, LINEAR_FAST = 0, 1, 2  # decoder.c's kinds of linear layer
MAX_LINEAR_PARTS = 4


class DecoderLinear(ctypes.Structure):
    """decoder.c's ``struct realizar_linear``: one linear layer's weight as the kernels hold it."""

    _fields_ = [("parts", ctypes.c_int64), ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64),
                ("weights", ctypes.c_void_p * MAX_LINEAR_PARTS), ("rows", ctypes.c_int64 * MAX_LINEAR_PARTS),
                ("kind", ctypes.c_int32 * MAX_LINEAR_PARTS), ("format", ctypes.c_int32 * MAX_LINEAR_PARTS),
                ("offset", ctypes.c_int32 * MAX_LINEAR_PARTS), ("bias", ctypes.c_void_p)]


class DecoderLayer(ctypes.Structure):
    """decoder.c's ``struct realizar_layer``."""

    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("qkv", DecoderLinear),
                ("o", DecoderLinear), ("gate_up", DecoderLinear), ("down", DecoderLinear),
                ("key_cache", ctypes.c_void_p), ("value_cache", ctypes.c_void_p),
                ("key_scales", ctypes.c_void_p), ("value_scales", ctypes.c_void_p)]


class DecoderStep(ctypes.Structure):
    """decoder.c's ``struct realizar_step``: what one step's layers read besides their weights."""

    _fields_ = [("positions", ctypes.c_void_p), ("slots", ctypes.c_void_p), ("tables", ctypes.c_void_p),
                ("rows", ctypes.c_void_p), ("lens", ctypes.c_void_p), ("cos", ctypes.c_void_p),
                ("sin", ctypes.c_void_p), ("max_blocks", ctypes.c_int64), ("block_size", ctypes.c_int64),
                ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("hidden", ctypes.c_int64), ("intermediate", ctypes.c_int64), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("kv", ctypes.c_int64)]


class CpuKernels:
    """ctypes bindings of the compiled kernels; the calls release the GIL."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int

        def bind(name: str, restype: Any, *argtypes: Any) -> Any:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = list(argtypes), restype
            return fn

        self._set_threads = bind("realizar_set_threads", i32, i32)
        self.threads = bind("realizar_threads", i32)  # the pool's size, the caller included
        self._gemm = bind("realizar_gemm", i32, p, i64, p, p, i64, i64, i64)
        self._attention = bind("realizar_paged_attention", i32, p, i64, p, p, p, p, p, p, p, p,
                               i64, i64, i64, i64, i64, i64, f32, i32)
        self._write = bind("realizar_write_kv", None, p, p, p, p, p, p, i64, i64, p, i64, i64, i64, i64, i32)
        self._rms_norm = bind("realizar_rms_norm", None, p, i64, p, p, i64, i64, f32)
        self._silu_mul = bind("realizar_silu_mul", None, p, i64, p, i64, i64)
        self._rope = bind("realizar_rope", None, p, i64, p, p, p, i64, i64, i64)
        self._sample = bind("realizar_sample", None, p, i64, i64, p, p, p, p, i64)
        self._quant_gemm = bind("realizar_quant_gemm", i32, p, i64, p, i32, p, i64, i64, i64, i64)
        self._quant_rows = bind("realizar_quant_rows", i32, p, i32, p, i64, i64, i64, p)
        self._fast_rows = bind("realizar_fast_rows", i32, p, i32, i32, p, i64, i64, i64, p)
        self._quant_gemm_fast_ranked = bind("realizar_quant_gemm_fast_ranked", i32, p, i64, p, i32, i32, p, i64, i64,
                                            i64, i64, i64, p)
        # the fast class's dot products take unsigned bytes up to 255 (not AVX2's saturating maddubs)
        self._fast_wide_bytes = bind("realizar_fast_wide_bytes", i32)
        self.wide_bytes = bool(self._fast_wide_bytes())
        # the most rows quant_gemm_fast multiplies with integer dot products; more take the exact path
        self._fast_max_rows = bind("realizar_fast_max_rows", i32)
        self.fast_max_rows = int(self._fast_max_rows())
        # the fast class's activations: 16 (one int16 term, AVX2) or 8 (two int8 terms) bits an integer
        self._fast_activation_bits = bind("realizar_fast_activation_bits", i32)
        self.fast_activation_bits = int(self._fast_activation_bits())
        self._fast_ranked_rows = bind("realizar_fast_ranked_rows", i32)
        # the fewest rows quant_gemm_fast_ranked ranks (0: this build never does)
        self.ranked_rows = int(self._fast_ranked_rows())
        # the fast class's products of many rows on AMX tiles (quant_tiles.c), where the build and CPU have
        # them and REALIZAR_TILES asks for them (or auto's timing turns them on); from tile_min_rows(kind) rows
        self._set_tiles = bind("realizar_set_tiles", i32, i32)
        self._tile_min_rows = bind("realizar_tile_min_rows", i32, i32)
        self._tile_ranks = bind("realizar_tile_ranks", i32, i32, i64)
        self.tiles = bool(self._set_tiles(int(tiles_setting() == "on")))
        self._pack_quantized = bind("realizar_pack_quantized", None, p, p, i64, i64, i32, p)
        self._pack_fast = bind("realizar_pack_fast", None, p, p, p, i64, i64, i32, p)
        self._pack_fast_blocks = bind("realizar_pack_fast_blocks", None, p, i32, i64, i64, i32, p)
        self._fast_panel_bytes = bind("realizar_fast_panel_bytes", i64, i32, i64)
        self._decoder_layers = bind("realizar_decoder_layers", i32, p, i64, p, i64, p, p)
        self._decoder_workspace = bind("realizar_decoder_workspace", i64, p, i64)
        self.path = path

    def set_tiles(self, on: bool) -> bool:
        """Let the fast class multiply many rows on AMX tiles (``on``) or not; whether it now does."""
        self.tiles = bool(self._set_tiles(int(on)))
        return self.tiles

    def tiles_available(self) -> bool:
        """Whether this build, CPU and kernel let the fast class use AMX tiles, whatever ``REALIZAR_TILES`` says
        (the setting is left as it was)."""
        on = self.tiles
        available = self.set_tiles(True)
        self.set_tiles(on)
        return available

    def tile_min_rows(self, kind: int) -> int:
        """The fewest rows from which the fast class multiplies weights of ``kind`` (:attr:`FastPacked.kind`)
        on AMX tiles where they are on: fewer for the kinds with one scale per 32-term block, whose integers
        the tiles take as they are, than for Q6_K's, which they take dequantized (0: a build without tiles)."""
        return int(self._tile_min_rows(kind))

    def tile_ranks(self, kind: int) -> bool:
        """Whether a ranked product (an LM head's) of weights of ``kind`` takes its first pass, the activations'
        coarse int8 term alone, on AMX's int8 tiles, from :meth:`tile_min_rows` rows: bytes with one d per block
        (Q8_0), with the tiles on."""
        return bool(self._tile_ranks(kind, 1 << 30))

    @property
    def tile_min_rows_every_kind(self) -> int:
        """The fewest rows from which the products of every kind go on the tiles (Q6_K's, the most)."""
        return self.tile_min_rows(FAST_SIXES | FAST_TWO_D | FAST_SUPER)

    def set_threads(self, threads: int) -> int:
        """Threads for every kernel (the caller and ``threads - 1`` workers); the number in use."""
        return int(self._set_threads(threads))

    @staticmethod
    def pack(weight: torch.Tensor) -> torch.Tensor:
        """``weight [N, K]`` as ``gemm`` reads it: panels of 16 rows, each stored k-major,
        ``packed[p, k, j] = weight[16 p + j, k]``, zero-padded to whole panels."""
        n, k = weight.shape
        padded = torch.zeros(-(-n // PANEL) * PANEL, k, dtype=torch.float32)
        padded[:n] = weight
        return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()

    def pack_quantized(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                       fmt: QuantFormat) -> QuantPacked:
        """Repack a quantized weight into ``quant_gemm.c``'s records; its header comment has the layout, and
        ``realizar_pack_quantized`` lays it out.

        ``q [n, k]`` uint8 holds the stored integers (int8 bits for 8-bit formats), before the offset is
        taken off; ``scales [n, k / group]`` and ``mins [n, k / 32]`` (float32) are the factors the
        reference dequantization applies. Rows are zero-padded to whole panels of 16."""
        n, k = q.shape
        assert k % QUANT_BLOCK == 0 and q.dtype == torch.uint8 and scales.dtype == torch.float32
        blocks = k // QUANT_BLOCK
        f = torch.cat([scales.reshape(n, blocks, -1)] + ([] if mins is None else [mins.reshape(n, blocks, 1)]), dim=2)
        if fmt.half:
            assert exact_in_half(f), "a scale is not a float16 exactly"
            f = f.half()
        records = torch.empty(-(-n // PANEL), blocks, fmt.record_bytes, dtype=torch.uint8)
        self._pack_quantized(q.contiguous().data_ptr(), f.contiguous().data_ptr(), n, k, fmt.code, records.data_ptr())
        return QuantPacked(records, fmt, n, k)

    def pack_fast(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int, offset: int,
                  group: int, factored: FactoredScales | None = None, wide_bytes: bool | None = None) -> FastPacked:
        """Repack a quantized weight for ``realizar_quant_gemm_fast``; ``quant_fast.c`` has the layout and
        lays it out (``realizar_pack_fast``). The arguments are those of :meth:`pack_quantized`. Scales are
        float16 where each is one exactly, and a record holds a second d (16-term groups) or a min only
        where the format has them.

        Where this build's dot products take unsigned bytes up to 255 (:attr:`wide_bytes`; ``wide_bytes``
        False keeps them signed), signed 8-bit integers are stored plus 128, as unsigned bytes with an
        offset of 128: the same integers, without the sign trick signed bytes need.

        With ``factored`` (a k-quant's scales as its file stores them), the records keep those small
        integers and their super-blocks' float16 factors (once per group of a super-block's 8 records),
        which the kernel multiplies out to the same float32 scales and mins: a Q4_K record takes 296 bytes
        rather than 384, Q5_K's 552 rather than 640 and Q6_K's, in 6 bits, 424."""
        n, k = q.shape
        if mins is not None and offset != 0:  # the kernel leaves c S out where there is a min
            raise ValueError("a quantized format with a min and an integer offset has no fast layout")
        assert k % QUANT_BLOCK == 0 and q.dtype == torch.uint8 and group in (16, 32)
        kind = {4: FAST_NIBBLES, 6: FAST_SIXES}.get(bits, FAST_BYTES)
        if bits == 8 and offset == 0:
            if self.wide_bytes if wide_bytes is None else wide_bytes:
                q, offset = q ^ 0x80, 128  # int8 v as the byte v + 128
            else:
                kind = FAST_SIGNED_BYTES
        blocks = k // QUANT_BLOCK
        kind |= (FAST_TWO_D if group == 16 else 0) | (0 if mins is None else FAST_MIN)
        factors: torch.Tensor | None = None
        if factored is not None:
            assert k % (SUPER_BLOCKS * QUANT_BLOCK) == 0
            kind |= FAST_SUPER
            # each block's two small integers: its scale and min, or the scales of its two halves
            small = (torch.stack([factored.scales.view(torch.uint8), factored.mins], dim=2) if factored.mins is not None
                     else factored.scales.view(torch.uint8).reshape(n, blocks, 2))
            neg_dmin = factored.neg_dmin if factored.neg_dmin is not None else torch.zeros_like(factored.d)
            factors = torch.stack([factored.d, neg_dmin], dim=2).contiguous()
            block_scales = small.contiguous()
        else:
            f = torch.cat([scales.reshape(n, blocks, -1)] + ([] if mins is None else [mins.reshape(n, blocks, 1)]),
                          dim=2)
            if exact_in_half(f):
                f, kind = f.half(), kind | FAST_HALF
            block_scales = f.contiguous()
        q = q.contiguous()
        panels = -(-n // PANEL)
        records = torch.empty(panels, int(self._fast_panel_bytes(kind, blocks)), dtype=torch.uint8)
        self._pack_fast(q.data_ptr(), block_scales.data_ptr(), None if factors is None else factors.data_ptr(),
                        n, k, kind, records.data_ptr())
        return FastPacked(records, kind, offset, n, k)

    def pack_fast_blocks(self, parts: Sequence[torch.Tensor], qtype: str, k: int,
                         wide_bytes: bool | None = None) -> FastPacked:
        """:meth:`pack_fast`'s records, byte for byte, straight from the uint8 blocks of GGUF weights of one type in
        :data:`FAST_BLOCK_FORMATS` and width ``k``, each ``[n_i, k / block * type_size]``, stacked along the outputs
        (the fused q/k/v or gate/up): nothing is unpacked in torch (``realizar_pack_fast_blocks``). Each part is
        laid out where its rows go in the records, without concatenating them first, unless it starts inside a
        panel of 16 rows: it is then joined to the one before it."""
        code, kind, offset = FAST_BLOCK_FORMATS[qtype]
        assert k % QUANT_BLOCK == 0 and all(p.dtype == torch.uint8 and p.dim() == 2 for p in parts)
        if qtype == "Q8_0":
            wide = self.wide_bytes if wide_bytes is None else wide_bytes
            kind, offset = (kind | FAST_BYTES, 128) if wide else (kind | FAST_SIGNED_BYTES, offset)
        groups: list[list[torch.Tensor]] = []
        rows = 0
        for part in parts:
            if groups and rows % PANEL:
                groups[-1].append(part)
            else:
                groups.append([part])
            rows += part.shape[0]
        records = torch.empty(-(-rows // PANEL), int(self._fast_panel_bytes(kind, k // QUANT_BLOCK)), dtype=torch.uint8)
        first = 0
        for group in groups:
            blocks = (group[0] if len(group) == 1 else torch.cat(group)).contiguous()
            self._pack_fast_blocks(blocks.data_ptr(), code, blocks.shape[0], k, kind, records[first // PANEL].data_ptr())
            first += blocks.shape[0]
        return FastPacked(records, kind, offset, rows, k)

    def gemm(self, x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
        """``x [M, K] @ W.T -> [M, n]`` for ``packed = pack(W)``, W ``[n, K]``."""
        x = _unit_stride(x)
        m, k = x.shape
        y = torch.empty(m, n, dtype=torch.float32)
        if m and self._gemm(x.data_ptr(), x.stride(0), packed.data_ptr(), y.data_ptr(), m, n, k) != 0:
            raise MemoryError("the matrix product could not allocate its buffer for x")
        return y

    def quant_gemm(self, x: torch.Tensor, weight: QuantPacked, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x [M, K] @ W.T -> [M, n]`` for a quantized ``W [n, K]``, with each weight dequantized
        exactly. With ``out`` (``[M, >= n]``, unit column stride, any row stride) the product is
        written there, e.g. into the columns of a wider output, and ``out`` is returned."""
        x = _unit_stride(x)
        m, k = x.shape
        assert k == weight.k, (k, weight.k)
        y = torch.empty(m, weight.n, dtype=torch.float32) if out is None else out
        assert y.stride(-1) == 1 and y.shape[0] == m and y.dtype == torch.float32
        if m and self._quant_gemm(x.data_ptr(), x.stride(0), weight.records.data_ptr(), weight.fmt.code,
                                  y.data_ptr(), y.stride(0), m, weight.n, k) != 0:
            raise MemoryError("the quantized matrix product could not allocate its buffers")
        return y

    def quant_gemm_fast(self, x: torch.Tensor, weight: FastPacked, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x [M, K] @ W.T`` approximately, the fast class: x as two int8 terms per row and 32 terms
        (``quant_fast.c``'s quantize_rows), integer dot products with the weights' integers, for up
        to :attr:`fast_max_rows` rows; more rows are multiplied exactly, as :meth:`quant_gemm` does.
        ``out`` as in :meth:`quant_gemm`."""
        return self.quant_gemm_fast_ranked(x, weight, 0, out)

    def quant_gemm_fast_ranked(self, x: torch.Tensor, weight: FastPacked, top: int,
                               out: torch.Tensor | None = None, argmax: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`quant_gemm_fast` where only each row's largest outputs need its precision (an LM head's
        logits): from 8 rows, every output first from the activations' coarse int8 term alone (half the
        dot products), then the ``top`` panels of 16 outputs (at most 16) with the largest of them again
        with both terms, the floats :meth:`quant_gemm_fast` gives; the rest keep the coarse term's error.
        ``top`` = 0, fewer rows, a d per 16 terms or a build without 8-row tiles: :meth:`quant_gemm_fast`.
        ``argmax`` (int64 ``[M]``): each ranked row's argmax over the returned outputs, numpy's, found from
        the panels' maxima the ranking keeps; -1 in rows not ranked and rows with a NaN."""
        x = _unit_stride(x)
        m, k = x.shape
        assert k == weight.k, (k, weight.k)
        y = torch.empty(m, weight.n, dtype=torch.float32) if out is None else out
        assert y.stride(-1) == 1 and y.shape[0] == m and y.dtype == torch.float32
        if argmax is not None:
            assert argmax.dtype == torch.int64 and argmax.shape == (m,) and argmax.is_contiguous()
        if m and self._quant_gemm_fast_ranked(x.data_ptr(), x.stride(0), weight.records.data_ptr(), weight.kind,
                                              weight.c, y.data_ptr(), y.stride(0), m, weight.n, k, top,
                                              None if argmax is None else argmax.data_ptr()) != 0:
            raise MemoryError("the quantized matrix product could not allocate its buffers")
        return y

    def quant_rows(self, weight: QuantPacked, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of a quantized ``W`` dequantized exactly, ``[len(ids), K]``: an embedding lookup."""
        return self._rows(lambda i, out: self._quant_rows(weight.records.data_ptr(), weight.fmt.code, i.data_ptr(),
                                                          i.shape[0], weight.n, weight.k, out.data_ptr()),
                          ids, weight.n, weight.k)

    def fast_rows(self, weight: FastPacked, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`quant_rows` for fast records: the same floats, as the exact class dequantizes them."""
        return self._rows(lambda i, out: self._fast_rows(weight.records.data_ptr(), weight.kind, weight.c, i.data_ptr(),
                                                         i.shape[0], weight.n, weight.k, out.data_ptr()),
                          ids, weight.n, weight.k)

    @staticmethod
    def _rows(call: Callable[[torch.Tensor, torch.Tensor], int], ids: torch.Tensor, n: int, k: int) -> torch.Tensor:
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty(ids.shape[0], k, dtype=torch.float32)
        status = call(ids, out)
        if status == -2:
            raise IndexError(f"a row id is outside [0, {n})")
        if status != 0:
            raise MemoryError("dequantizing rows could not allocate its buffer")
        return out

    def paged_attention(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                        scale: float, row_tables: torch.Tensor | None = None,
                        key_scales: torch.Tensor | None = None,
                        value_scales: torch.Tensor | None = None) -> torch.Tensor:
        """Query rows ``q [R, H, hd]`` over the paged caches ``[blocks, KV, bs, hd]`` (float32, float16,
        or int8 with its rows' scales ``[blocks, KV, bs]``: ``KVCache``) -> ``[R, H, hd]`` float32.

        Row r attends to the first ``context_lens[r]`` tokens of block table
        ``block_tables[row_tables[r]]`` (``block_tables[r]`` without ``row_tables``)."""
        q = _rows(q)
        rows, heads, head_dim = q.shape
        out = torch.empty(rows, heads, head_dim, dtype=torch.float32)
        tables, lens = block_tables.contiguous(), context_lens.contiguous()
        row_ptr = None if row_tables is None else row_tables.contiguous()
        kind = kv_kind(key_cache, value_cache, key_scales, value_scales)
        status = self._attention(q.data_ptr(), q.stride(0), key_cache.data_ptr(), value_cache.data_ptr(),
                                 _pointer(key_scales), _pointer(value_scales),
                                 tables.data_ptr(), None if row_ptr is None else row_ptr.data_ptr(),
                                 lens.data_ptr(), out.data_ptr(), rows, tables.shape[1], block_size,
                                 heads, key_cache.shape[1], head_dim, scale, kind)
        if status != 0:
            raise MemoryError("paged attention could not allocate its score buffer")
        return out

    def write_kv(self, key_cache: torch.Tensor, value_cache: torch.Tensor, slots: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, key_scales: torch.Tensor | None = None,
                 value_scales: torch.Tensor | None = None) -> None:
        """Keys and values ``[T, KV, hd]`` float32 (contiguous rows) into the caches ``[blocks, KV, bs, hd]``
        at ``slots`` (block * bs + offset); a float16 cache gets them rounded to nearest even, an int8 cache
        each row quantized with its scale (``kv_cache.quantize_rows``)."""
        _blocks, kv_heads, block_size, head_dim = key_cache.shape
        k, v = _rows(k), _rows(v)
        assert k.dtype == v.dtype == torch.float32
        slots = slots.contiguous()
        kind = kv_kind(key_cache, value_cache, key_scales, value_scales)
        self._write(key_cache.data_ptr(), value_cache.data_ptr(), _pointer(key_scales), _pointer(value_scales),
                    k.data_ptr(), v.data_ptr(), k.stride(0), v.stride(0), slots.data_ptr(), slots.shape[0],
                    kv_heads, block_size, head_dim, kind)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``rms_norm(x) * weight`` of ``x [T, D]``."""
        x = _unit_stride(x)
        t, d = x.shape
        y = torch.empty(t, d, dtype=torch.float32)
        self._rms_norm(x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), t, d, eps)
        return y

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for ``gate_up = [gate | up]`` ``[T, 2I]`` -> ``[T, I]``."""
        gate_up = _unit_stride(gate_up)
        t, width = gate_up.shape
        y = torch.empty(t, width // 2, dtype=torch.float32)
        self._silu_mul(gate_up.data_ptr(), gate_up.stride(0), y.data_ptr(), t, width // 2)
        return y

    def rope(self, x: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotates the first ``heads`` heads of each row of ``x [T, >= heads * head_dim]`` in
        place by its position; ``cos``, ``sin`` are ``[max_position, head_dim]`` tables."""
        assert x.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
        positions = positions.contiguous()
        self._rope(x.data_ptr(), x.stride(0), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                   x.shape[0], heads, head_dim)

    def decoder_layers(self, x: torch.Tensor, layers: ctypes.Array[DecoderLayer], step: DecoderStep) -> None:
        """Every layer of ``layers`` over the packed tokens ``x [T, D]`` (contiguous; updated in place),
        in one call (``decoder.c``)."""
        assert x.is_contiguous() and x.dtype == torch.float32
        t = x.shape[0]
        workspace = torch.empty(int(self._decoder_workspace(ctypes.byref(step), t)), dtype=torch.float32)
        if t and self._decoder_layers(x.data_ptr(), t, layers, len(layers), ctypes.byref(step),
                                      workspace.data_ptr()) != 0:
            raise MemoryError("a decoder layer's kernel could not allocate its buffers")

    def sample(self, logits: torch.Tensor, rows: torch.Tensor, temperatures: torch.Tensor,
               uniforms: torch.Tensor) -> torch.Tensor:
        """For each ``r``, a token drawn from ``softmax(logits[rows[r]] / temperatures[r])`` by
        inverse CDF at ``uniforms[r]``; tokens at -inf are never drawn. ``logits [B, V]``."""
        logits = _unit_stride(logits)
        rows, temperatures, uniforms = rows.contiguous(), temperatures.float().contiguous(), uniforms.float().contiguous()
        out = torch.empty(rows.shape[0], dtype=torch.int64)
        self._sample(logits.data_ptr(), logits.stride(0), logits.shape[1], rows.data_ptr(), temperatures.data_ptr(),
                     uniforms.data_ptr(), out.data_ptr(), rows.shape[0])
        return out


KV_DTYPES = (torch.float32, torch.float16, torch.int8)  # the caches the attention kernels read: cpu_kernels.h's KV_*


def kv_kind(key_cache: torch.Tensor, value_cache: torch.Tensor, key_scales: torch.Tensor | None = None,
            value_scales: torch.Tensor | None = None) -> int:
    """The kernels' code for a pair of caches (cpu_kernels.h's KV_FLOAT32, KV_FLOAT16, KV_INT8); an int8
    pair needs its float32 scales ``[blocks, KV, bs]``. Anything else is an error."""
    if key_cache.dtype != value_cache.dtype or key_cache.dtype not in KV_DTYPES:
        raise TypeError(f"the CPU kernels read float32, float16 or int8 caches, not "
                        f"{key_cache.dtype}/{value_cache.dtype}")
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    kind = KV_DTYPES.index(key_cache.dtype)
    if kind == KV_DTYPES.index(torch.int8):
        for scales in (key_scales, value_scales):
            if scales is None or scales.dtype != torch.float32 or scales.shape != key_cache.shape[:3]:
                raise TypeError("an int8 cache needs float32 scales [blocks, KV, block_size] for its keys and values")
            assert scales.is_contiguous()
    return kind


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` [rows, n] with contiguous rows (any row stride)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` [T, heads, hd] whose every row is one contiguous run of heads * hd floats."""
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


def quantized_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether GGUF's block-quantized weights stay quantized (``quant_gemm.c``): wherever the
    kernels apply, unless ``REALIZAR_QUANTIZED=0`` asks for float32 weights dequantized at load."""
    quantized = os.environ.get("REALIZAR_QUANTIZED", "1").lower() not in ("0", "false", "no", "off")
    return quantized and for_tensors(device, dtype) is not None


def tiles_setting() -> str:
    """What ``REALIZAR_TILES`` asks of the fast class's AMX tiles (``quant_tiles.c``): ``on``, ``off``, or ``auto``
    (the default: a server times a step with them and without at its first start, where the CPU has them,
    and keeps the faster; ``realizar.engine.engine.choose_tiles``). The kernels start with them off unless ``on``."""
    value = os.environ.get("REALIZAR_TILES", "auto").lower()
    return "on" if value in ("1", "true", "yes", "on") else "off" if value in ("0", "false", "no", "off") else "auto"


def quantized_class() -> str:
    """The class of the quantized products ``REALIZAR_QUANTIZED`` asks for: ``exact`` (dequantized in
    float32), ``fast`` (two int8 terms per activation, integer dot products), or ``auto`` (the
    default: the faster of those that pass the quality gate, timed at load)."""
    value = os.environ.get("REALIZAR_QUANTIZED", "auto").lower()
    return value if value in ("exact", "fast") else "auto"
