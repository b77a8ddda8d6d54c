"""Linear layers ``y = x W^T (+ b)``, with the fastest matrix multiply each device offers.

- **CPU, float32, with the compiled kernels** (``realizar.kernels``): the weight is packed
  once into 16-column panels and multiplied by ``packed_gemm.c``. A BLAS sgemm repacks the
  weight on every call; at the 1-64 rows of a decode step that costs as much as the
  arithmetic, and the packed product measured 1.2-2.1x numpy's OpenBLAS there
  (``benchmarks/matmul.py``). Each output is one multiply-add chain in a fixed order, so a
  row's result does not depend on the other rows of the batch.
- **CPU, float32, without a compiler** (or ``REALIZAR_KERNELS=0``): the weight is stored
  transposed, ``[in, out]``, and the product goes to the OpenBLAS inside numpy, which
  measured faster than torch's ``F.linear`` (MKL) on the AMD EPYC (AVX2) benchmark machine.
- **CUDA, and half-precision weights:** ``torch.nn.functional.linear``.
- **GGUF block-quantized weights, CPU with the kernels** (:class:`QuantLinear`): kept in
  their blocks, repacked once into ``quant_gemm.c``'s records, dequantized exactly in the
  kernel. A decode step then reads 0.6-1.1 bytes per weight instead of 4. Its fast class
  (``fast=True``: int8 activations and integer dot products) is not exact and is never chosen
  by default; ``benchmarks/quality.py`` is its quality gate.

All compute the same float32 sums up to rounding order, which the golden tests bound
against transformers. The CPU paths keep their own thread pools, sized by
``matmul_threads``, apart from torch's OpenMP pool: the matmuls use every core while
torch's many small ops stay on one thread.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from realizar import kernels
from realizar.loading.quants import QuantizedTensor

log = logging.getLogger("realizar.model")


class Linear:
    """A fixed weight ``[out, in]`` (and optional bias ``[out]``) applied to ``x [T, in]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.weight: torch.Tensor | None = None
        self._packed: torch.Tensor | None = None  # [panels, in, 16], for the kernels
        self._weight_t: np.ndarray | None = None  # [in, out], for numpy's sgemm
        self._kernels = kernels.for_tensors(weight.device, weight.dtype)
        if self._kernels is not None:
            self._packed = self._kernels.pack(weight)
        elif weight.device.type == "cpu" and weight.dtype == torch.float32:
            self._weight_t = weight.t().contiguous().numpy()
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels is not None:
            assert self._packed is not None
            y = self._kernels.gemm(x, self._packed, self.out_features)
        elif self._weight_t is not None:
            y = torch.from_numpy(np.matmul(x.contiguous().numpy(), self._weight_t))
        else:
            assert self.weight is not None
            return F.linear(x, self.weight, self.bias)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``W`` ``[len(ids), in]``: the embedding lookup when embeddings are tied."""
        if self._packed is not None:
            return self._packed[ids // kernels.PANEL, :, ids % kernels.PANEL]
        if self._weight_t is not None:
            return torch.from_numpy(np.ascontiguousarray(self._weight_t[:, ids.numpy()].T))
        assert self.weight is not None
        return F.embedding(ids, self.weight)


class QuantLinear:
    """A block-quantized weight ``[out, in]`` (and optional bias) applied to ``x [T, in]`` by the
    compiled kernels, exactly as :class:`Linear` applies its dequantized float32 weight.

    The weight may come in parts stacked along ``out`` (the fused q/k/v or gate/up projections)
    of different GGUF types, as Q4_K_M files mix Q4_K and Q6_K: parts of one type are
    concatenated, and each remaining part writes its own columns of the output.
    """

    def __init__(self, parts: list[QuantizedTensor], compiled: kernels.CpuKernels,
                 bias: torch.Tensor | None = None, fast: bool = False) -> None:
        self.kernels = compiled
        self.bias = bias
        self.fast = fast
        self.in_features = parts[0].shape[1]
        assert all(p.shape[1] == self.in_features for p in parts)
        runs: list[list[QuantizedTensor]] = []
        for part in parts:
            if runs and runs[-1][0].qtype == part.qtype:
                runs[-1].append(part)
            else:
                runs.append([part])
        self.formats = tuple(run[0].qtype.name for run in runs)  # the GGUF types, e.g. ("Q4_K", "Q6_K")
        self.parts: list[kernels.QuantPacked | kernels.FastPacked] = []
        for run in runs:
            ints = QuantizedTensor.cat(run).integers() if len(run) > 1 else run[0].integers()
            if fast:
                self.parts.append(kernels.pack_fast(ints.q, ints.scales, ints.mins, ints.bits, ints.offset,
                                                    ints.group))
                continue
            # float16 scales where that is exact: fewer bytes to read, the same floats
            fmt = kernels.quant_format(ints.bits, ints.offset, ints.mins is not None, ints.group,
                                       kernels.exact_in_half(ints.scales, ints.mins))
            assert fmt is not None, f"no kernel format for {run[0].qtype.name}"
            self.parts.append(kernels.pack_quantized(ints.q, ints.scales, ints.mins, fmt))
        self.out_features = sum(p.n for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def _product(self, x: torch.Tensor, part: kernels.QuantPacked | kernels.FastPacked,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(part, kernels.FastPacked):
            return self.kernels.quant_gemm_fast(x, part, out)
        return self.kernels.quant_gemm(x, part, out)

    def _rows(self, part: kernels.QuantPacked | kernels.FastPacked, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(part, kernels.FastPacked):
            if bool(((ids < 0) | (ids >= part.n)).any()):
                raise IndexError(f"a row id is outside [0, {part.n})")
            return part.rows(ids)
        return self.kernels.quant_rows(part, ids)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            y = self._product(x, self.parts[0])
        else:
            y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
            start = 0
            for part in self.parts:
                self._product(x, part, y[:, start:start + part.n])
                start += part.n
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``W`` ``[len(ids), in]``, dequantized exactly: the embedding lookup."""
        if len(self.parts) == 1:
            return self._rows(self.parts[0], ids)
        if bool(((ids < 0) | (ids >= self.out_features)).any()):
            raise IndexError(f"a row id is outside [0, {self.out_features})")
        out = torch.empty(ids.shape[0], self.in_features, dtype=torch.float32)
        start = 0
        for part in self.parts:
            mine = (ids >= start) & (ids < start + part.n)
            if bool(mine.any()):
                out[mine] = self._rows(part, ids[mine] - start)
            start += part.n
        return out


def make_linear(parts: list[torch.Tensor | QuantizedTensor], device: torch.device, dtype: torch.dtype,
                bias: torch.Tensor | None = None, fast: bool = False) -> Linear | QuantLinear:
    """The layer for weights ``parts`` stacked along ``out``: :class:`QuantLinear` when they are all
    quantized and the kernels apply (float32 on the CPU), else :class:`Linear` over the float weights.
    ``fast`` picks the quantized layer's fast class (int8 activations), which is not exact."""
    compiled = kernels.for_tensors(device, dtype)
    quantized = [p for p in parts if isinstance(p, QuantizedTensor)]
    if compiled is not None and len(quantized) == len(parts):
        return QuantLinear(quantized, compiled, bias, fast)
    floats = [p.dequantize(dtype) if isinstance(p, QuantizedTensor) else p for p in parts]
    weight = floats[0] if len(floats) == 1 else torch.cat(floats)
    return Linear(weight.to(device=device, dtype=dtype).contiguous(), bias)


def _openblas_setters() -> list[Any]:
    """``set_num_threads`` of each OpenBLAS that numpy loaded (its wheels bundle one)."""
    setters = []
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    candidates = sorted(libs.glob("*openblas*.so*")) if libs.is_dir() else []
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter.restype = None
                setters.append(setter)
                break
    return setters


def matmul_threads(threads: int) -> None:
    """Size the CPU matmuls' thread pools: the compiled kernels' and numpy's OpenBLAS."""
    compiled = kernels.load()
    if compiled is not None:
        compiled.set_threads(threads)
    setters = _openblas_setters()
    for setter in setters:
        setter(threads)
    if not setters:
        log.debug("numpy's OpenBLAS not found; its thread count is left as it is")
