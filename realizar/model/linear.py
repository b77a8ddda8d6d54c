"""Linear layers ``y = x W^T (+ b)``, with the fastest matrix multiply each device offers.

On CUDA, and for half-precision weights on the CPU, this is ``torch.nn.functional.linear``.
For float32 on the CPU the weight is stored transposed, ``[in, out]`` row-major, and the
product goes to the OpenBLAS that ships inside numpy. On the AMD EPYC (AVX2) machine this
project is benchmarked on, that sgemm measured faster than torch's own ``F.linear`` (MKL)
at every batch size an engine step produces, with one thread and with two
(``benchmarks/matmul.py``). Both compute the same float32 sums up to rounding order, which
the golden tests bound against transformers.

numpy's OpenBLAS keeps its own thread pool, sized by ``blas_threads``. Its threads spin
briefly between calls and then sleep, and they are not torch's OpenMP pool, so the
matmuls can use every core while torch's many small ops stay on one thread.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("realizar.model")


class Linear:
    """A fixed weight ``[out, in]`` (and optional bias ``[out]``) applied to ``x [T, in]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self._use_blas = weight.device.type == "cpu" and weight.dtype == torch.float32
        if self._use_blas:
            self._weight_t = weight.t().contiguous().numpy()  # [in, out], what sgemm wants
            self.weight: torch.Tensor | None = None
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_blas:
            assert self.weight is not None
            return F.linear(x, self.weight, self.bias)
        y = torch.from_numpy(np.matmul(x.contiguous().numpy(), self._weight_t))
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``W`` ``[len(ids), in]``: the embedding lookup when embeddings are tied."""
        if not self._use_blas:
            assert self.weight is not None
            return F.embedding(ids, self.weight)
        return torch.from_numpy(np.ascontiguousarray(self._weight_t[:, ids.numpy()].T))


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


def blas_threads(threads: int) -> bool:
    """Size numpy's OpenBLAS thread pool; False when no OpenBLAS was found to size."""
    setters = _openblas_setters()
    for setter in setters:
        setter(threads)
    if not setters:
        log.debug("numpy's OpenBLAS not found; its thread count is left as it is")
    return bool(setters)
