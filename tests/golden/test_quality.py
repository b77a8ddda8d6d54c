"""The quality gate (realizar.model.quality) on the default model over a short text: each quantized
class that ``auto`` may choose passes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from realizar import kernels
from realizar.engine.engine import EngineModel
from realizar.loading import default_model_path, load_model
from realizar.model.llama import LlamaModel
from realizar.model.quality import QUANTIZED_CLASSES_PASSING_GATE, compare, teacher_forced

TEXT = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "quality_text.md"


def test_quantized_classes_against_float32_on_a_short_text(ours_f32: EngineModel) -> None:
    compiled = kernels.load()
    if compiled is None:
        pytest.skip("no C compiler: no quantized kernels")
    cpu = torch.device("cpu")
    loaded = load_model(default_model_path(), keep_quantized=True)
    ids = ours_f32.tokenizer.encode(TEXT.read_text())[:320]
    floats = {**loaded.tensors, **{name: q.dequantize() for name, q in loaded.quantized.items()}}
    reference = teacher_forced(LlamaModel(loaded.config, floats, cpu, torch.float32), ids, chunk=128)
    exact = compare(teacher_forced(LlamaModel(loaded.config, loaded.tensors, cpu, torch.float32,
                                              loaded.quantized), ids, chunk=128), reference)
    assert exact.tokens == 320 and exact.passed
    assert exact.agreement == 1.0 and abs(exact.perplexity_ratio - 1) < 1e-4
    fast = compare(teacher_forced(LlamaModel(loaded.config, loaded.tensors, cpu, torch.float32,
                                             loaded.quantized, fast=True), ids, chunk=compiled.fast_max_rows),
                   reference)  # steps of as many rows as take the integer products: every position does
    # every class ``auto`` may choose passes the gate here too (over 2,048 tokens, benchmarks/quality.py:
    # fast 99.90 % agreement, perplexity x1.0000, every position through the integer products)
    assert QUANTIZED_CLASSES_PASSING_GATE["exact"]
    if QUANTIZED_CLASSES_PASSING_GATE["fast"]:
        assert fast.passed, fast
    assert fast.agreement >= 0.9 and abs(fast.perplexity_ratio - 1) <= 0.03
