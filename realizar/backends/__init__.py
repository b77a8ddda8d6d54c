"""Compute backends behind one interface (``Backend``), chosen once per (device, dtype).

- ``cpu_kernels.CpuKernelsBackend``: float32 on the CPU, in the compiled kernels.
- ``torch_backend.TorchBackend``: everything else (CUDA, half precision), and float32 on the
  CPU where the kernels cannot be built or are switched off (``REALIZAR_KERNELS=0``).
"""

from __future__ import annotations

import logging

import torch

from realizar import kernels
from realizar.backends.backend import AttentionMetadata, Backend, LinearLayer, PrefillChunk
from realizar.backends.cpu_kernels import CpuKernelsBackend
from realizar.backends.torch_backend import TorchBackend, openblas_setters

__all__ = ["AttentionMetadata", "Backend", "CpuKernelsBackend", "LinearLayer", "PrefillChunk", "TorchBackend",
           "choose_backend", "matmul_threads"]

log = logging.getLogger("realizar.backends")


def choose_backend(device: torch.device, dtype: torch.dtype) -> Backend:
    """The CPU kernels where they apply (float32 on the CPU, built and switched on); torch elsewhere."""
    compiled = kernels.for_tensors(device, dtype)
    if compiled is not None:
        return CpuKernelsBackend(compiled)
    return TorchBackend(device, dtype)


def matmul_threads(threads: int) -> None:
    """Size the CPU matmuls' thread pools: the compiled kernels' and numpy's OpenBLAS (the torch
    backend's float32 products)."""
    compiled = kernels.load()
    if compiled is not None:
        compiled.set_threads(threads)
    setters = openblas_setters()
    for setter in setters:
        setter(threads)
    if not setters:
        log.debug("numpy's OpenBLAS not found; its thread count is left as it is")
