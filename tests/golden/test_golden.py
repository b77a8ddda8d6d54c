"""Golden tests: the default GGUF through our engine against transformers loading the same file."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from realizar.backends import CpuKernelsBackend, TorchBackend
from realizar.config import EngineConfig
from realizar.engine.engine import Engine, EngineModel, load_engine_model
from realizar.loading import default_model_path
from tests.golden.conftest import GOLDEN_PROMPTS, greedy, prompt_logits, reference_greedy


def test_logits_match_transformers_in_float32(ours_f32: EngineModel, reference: Any) -> None:
    hf_model, hf_tok = reference
    for text in GOLDEN_PROMPTS:
        ids = ours_f32.tokenizer.encode(text, parse_special=True)  # transformers reads the ChatML markup
        assert ids == hf_tok(text)["input_ids"]
        with torch.no_grad():
            expected = hf_model(torch.tensor([ids])).logits[0]
        ours = prompt_logits(ours_f32.model, ids)
        rel = ((ours - expected).abs().max() / expected.abs().max()).item()
        assert rel <= 1e-3, f"{text!r}: relative error {rel:.2e}"


def test_greedy_32_tokens_match_transformers(ours_f32: EngineModel, reference: Any) -> None:
    hf_model, _ = reference
    engine = Engine(ours_f32, EngineConfig(device="cpu", dtype="float32"))
    prompts = [ours_f32.tokenizer.encode(t, parse_special=True) for t in GOLDEN_PROMPTS]
    ours = greedy(engine, prompts, 32, ignore_eos=False)  # both stop at EOS, which both emit
    assert ours == reference_greedy(hf_model, prompts, 32)


def test_batch_invariance_alone_and_in_a_batch_of_16(ours_f32: EngineModel) -> None:
    engine = Engine(ours_f32, EngineConfig(device="cpu", dtype="float32", max_num_batched_tokens=256))
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly brew potions".split()
    prompts = [ours_f32.tokenizer.encode(" ".join(words[: 2 + (i * 5) % len(words)]) + f" {i}")
               for i in range(16)]
    alone = [greedy(engine, [p], 12)[0] for p in prompts[:4]]
    together = greedy(engine, prompts, 12)
    assert together[:4] == alone
    assert engine.allocator.num_used == 0


def test_prefix_caching_keeps_the_real_models_greedy_tokens(ours_f32: EngineModel) -> None:
    """A long shared system prompt served from the prefix cache gives the tokens of a cold engine."""
    tok = ours_f32.tokenizer
    system = tok.encode(" ".join(f"Rule {i}: keep answers short and cite page {i * 3}." for i in range(20)))
    prompts = [system + tok.encode(q) for q in (" Which page has rule 4?", " Summarise rule 7.",
                                                 " Which page has rule 4? And 5?")]
    cold = Engine(ours_f32, EngineConfig(device="cpu", dtype="float32", enable_prefix_caching=False))
    expected = greedy(cold, prompts, 12)
    warm = Engine(ours_f32, EngineConfig(device="cpu", dtype="float32"))
    assert greedy(warm, prompts[:1], 12) == expected[:1]  # alone: fills the cache
    assert greedy(warm, prompts[1:2], 12) == expected[1:2]  # alone, on the cached system prompt
    assert greedy(warm, prompts, 12) == expected  # together, all on cached blocks
    assert warm.scheduler.prefix_cache_hits >= 4 * (len(system) // 16 * 16)
    assert warm.allocator.num_used == 0


def test_auto_dtype_agrees_with_float32_for_8_tokens(ours_f32: EngineModel) -> None:
    """``--dtype auto`` may trade precision for speed only while greedy output still agrees."""
    auto = load_engine_model(default_model_path(), EngineConfig(device="cpu", dtype="auto"))
    prompts = [ours_f32.tokenizer.encode(t, parse_special=True) for t in GOLDEN_PROMPTS]
    f32 = greedy(Engine(ours_f32, EngineConfig(device="cpu", dtype="float32")), prompts, 8)
    low = greedy(Engine(auto, EngineConfig(device="cpu", dtype="auto")), prompts, 8)
    assert low == f32, f"auto chose {auto.model.dtype}"


def test_compiled_kernels_and_the_pure_torch_path_agree(ours_f32: EngineModel) -> None:
    """The C decode attention and KV write give the greedy output of torch's SDPA path."""
    model = ours_f32.model
    if not isinstance(model.backend, CpuKernelsBackend):
        pytest.skip("the compiled kernels are not in use on this machine")
    prompts = [ours_f32.tokenizer.encode(t, parse_special=True) for t in GOLDEN_PROMPTS]
    compiled = greedy(Engine(ours_f32, EngineConfig(device="cpu", dtype="float32")), prompts, 24)
    saved = model.backend
    try:
        model.backend = TorchBackend(model.device, model.dtype)  # the layers stay the kernels' own
        pure_torch = greedy(Engine(ours_f32, EngineConfig(device="cpu", dtype="float32")), prompts, 24)
    finally:
        model.backend = saved
    assert compiled == pure_torch


def test_a_float16_kv_cache_on_the_kernels_and_on_the_torch_path_agree(ours_f32: EngineModel) -> None:
    """``--kv-cache-dtype float16``: the C kernels (converting in registers) and torch's SDPA path (casting
    the gathered cache) compute float32 attention over the same rounded K/V, so greedy output agrees;
    and for these prompts it is float32's too."""
    model = ours_f32.model
    if not isinstance(model.backend, CpuKernelsBackend):
        pytest.skip("the compiled kernels are not in use on this machine")
    prompts = [ours_f32.tokenizer.encode(t, parse_special=True) for t in GOLDEN_PROMPTS]
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_dtype="float16")
    engine = Engine(ours_f32, config)
    assert engine.runner.cache.keys[0].dtype == torch.float16
    compiled = greedy(engine, prompts, 24)
    saved = model.backend
    try:
        model.backend = TorchBackend(model.device, model.dtype)
        pure_torch = greedy(Engine(ours_f32, config), prompts, 24)
    finally:
        model.backend = saved
    assert compiled == pure_torch
    assert [c[:8] for c in compiled] == greedy(Engine(ours_f32, EngineConfig(device="cpu", dtype="float32")),
                                               prompts, 8)
