"""Fixtures for the golden tests: our engine and the transformers reference, loaded once (the reference's
conversion from the GGUF is kept across sessions: tests/conftest.py's ``hf_converted``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from realizar.config import EngineConfig
from realizar.engine.engine import Engine, EngineModel, load_engine_model
from realizar.kv_cache import KVCache
from realizar.loading import default_model_path
from realizar.model.llama import AttentionMetadata, LlamaModel, PrefillChunk
from realizar.request import Request, SamplingParams
from tests.conftest import hf_converted

GOLDEN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is 17 times 23?<|im_end|>\n<|im_start|>assistant\n",
    "Les feux de forêt sont",
]


@pytest.fixture(scope="session")
def ours_f32() -> EngineModel:
    return load_engine_model(default_model_path(), EngineConfig(device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def reference(hf_demo_tokenizer: Any) -> Any:
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    auto = transformers.AutoModelForCausalLM
    model = hf_converted(path, "model-float32",
                         lambda: auto.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32),
                         lambda directory: auto.from_pretrained(directory, dtype=torch.float32), save_dequantized)
    model.eval()
    return model, hf_demo_tokenizer


def save_dequantized(model: Any, directory: Path) -> None:
    """A model transformers read from a GGUF, as a plain float32 checkpoint. ``save_pretrained`` refuses it
    (its config still names the GGUF quantizer, although the weights it holds are dequantized floats), so
    the config goes without that entry, and the weights as they are (tied ones once)."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"))


def prompt_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """Our logits [len(ids), V] for one prompt, through the paged attention path."""
    block = 16
    blocks = -(-len(ids) // block)
    cache = KVCache(model.config.num_layers, blocks, block, model.config.num_kv_heads, model.config.head_dim,
                    model.device, model.dtype)
    slots = torch.arange(len(ids))
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=0,
                             decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
                             decode_context_lens=torch.zeros(0, dtype=torch.long),
                             prefills=[PrefillChunk(0, len(ids), torch.arange(blocks), 0)])
    return model.forward(torch.tensor(ids), torch.arange(len(ids)), meta, cache, torch.arange(len(ids)))


def reference_greedy(hf_model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, up to and with its EOS. One batched ``generate``,
    the prompts padded on the left and masked: the tokens of one ``generate`` per prompt (checked when this
    was written), in a third of the time."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    eos = hf_model.generation_config.eos_token_id
    stops = set(eos) if isinstance(eos, list) else {eos}
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=0)
    continuations = []
    for row in out[:, width:].tolist():
        ends = [i for i, token in enumerate(row) if token in stops]
        continuations.append(row[: ends[0] + 1] if ends else row)  # after its EOS, a row holds padding
    return continuations


def greedy(engine: Engine, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = True) -> list[list[int]]:
    """Run prompts together through the synchronous engine; the generated ids of each."""
    requests = [Request(p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos))
                for p in prompts]
    generated: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add(r)
    while engine.has_work():
        for out in engine.step():
            if out.token_id is not None:
                generated[out.request_id].append(out.token_id)
    return [generated[r.request_id] for r in requests]
