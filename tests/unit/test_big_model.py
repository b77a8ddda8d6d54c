"""The random-weight Q4_K_M model of benchmarks/big_model.py, written in a tiny shape: realizar loads
it with every matrix kept quantized in the types llama.cpp's Q4_K_M picks, reads the demo model's
tokenizer from it, and one seed always gives the same bytes. No server is started here."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from realizar import kernels
from realizar.config import EngineConfig
from realizar.engine.engine import load_engine_model
from realizar.loading import default_model_path, load_model
from realizar.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def big_model() -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        for name in ("big_model", "common", "kquants"):
            sys.modules.pop(name, None)
        yield importlib.import_module("big_model")
        for name in ("big_model", "common", "kquants"):
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def tiny(big_model: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, dict]:
    shape = big_model.Shape(layers=3, hidden=256, heads=4, kv_heads=2, ffn=512, context=256)
    path = tmp_path_factory.mktemp("big") / shape.file_name(7)
    info = big_model.make_model(path, shape, 7, default_model_path())
    return path, shape, info


def test_use_more_bits_is_llama_cpps_half_of_the_layers(big_model: ModuleType) -> None:
    assert [i for i in range(16) if big_model.use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert sum(big_model.use_more_bits(i, 22) for i in range(22)) == 10


def test_default_shape_is_about_one_billion_parameters(big_model: ModuleType) -> None:
    assert 1.0e9 < big_model.Shape().params(49152) < 1.1e9
    with pytest.raises(ValueError, match="multiples of 256"):
        big_model.Shape(hidden=2000, heads=20, kv_heads=4)


def test_realizar_loads_it_with_every_matrix_quantized(big_model: ModuleType, tiny: tuple[Path, object, dict]) -> None:
    path, shape, info = tiny
    assert info["bytes"] == path.stat().st_size and not path.with_name(path.name + ".partial").exists()
    loaded = load_model(path, keep_quantized=True)
    c = loaded.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size, c.head_dim) == (
        3, 256, 4, 2, 512, 64)
    assert c.vocab_size == 49152 and c.tie_word_embeddings and c.max_position_embeddings == 256
    # the norms are the only float tensors; every matrix stays in its blocks
    assert all(name.endswith("norm.weight") for name in loaded.tensors)
    assert loaded.quantized["model.embed_tokens.weight"].qtype == QT.Q6_K
    for i in range(3):
        more = QT.Q6_K if big_model.use_more_bits(i, 3) else QT.Q4_K
        p = f"model.layers.{i}."
        assert loaded.quantized[p + "self_attn.v_proj.weight"].qtype == more
        assert loaded.quantized[p + "mlp.down_proj.weight"].qtype == more
        assert loaded.quantized[p + "mlp.gate_proj.weight"].qtype == QT.Q4_K
    # the weights are the seeded Gaussians, within Q4_K's precision
    w = loaded.quantized["model.layers.0.mlp.up_proj.weight"].dequantize()
    assert torch.isfinite(w).all() and abs(float(w.std()) - big_model.WEIGHT_STD) < 0.002


def test_it_serves_the_demo_tokenizer(tiny: tuple[Path, object, dict]) -> None:
    path, _, _ = tiny
    ours = Tokenizer.from_model_path(path)
    demo = Tokenizer.from_model_path(default_model_path())
    text = "The capital of France is Paris. 日本語"
    assert ours.encode(text) == demo.encode(text)
    assert ours.decode(ours.encode(text)) == text


def test_the_engine_model_keeps_it_quantized(tiny: tuple[Path, object, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _, _ = tiny
    if kernels.load() is None:
        pytest.skip("no C compiler: the quantized kernels are not built")
    monkeypatch.setenv("REALIZAR_QUANTIZED", "exact")  # auto may find float32 weights faster on a model this small
    served = load_engine_model(path, EngineConfig(device="cpu", dtype="auto", threads=1))
    assert "Q4_K+Q6_K weights kept quantized, " in served.model.compute_path  # either class, as auto timed them
    assert "float32 layers" not in served.model.compute_path


def test_one_seed_one_file(big_model: ModuleType, tiny: tuple[Path, object, dict], tmp_path: Path) -> None:
    path, shape, _ = tiny
    again = big_model.make_model(tmp_path / "again.gguf", shape, 7, default_model_path())
    assert Path(again["path"]).read_bytes() == path.read_bytes()
    other = big_model.make_model(tmp_path / "other.gguf", shape, 8, default_model_path())
    assert Path(other["path"]).read_bytes() != path.read_bytes()
