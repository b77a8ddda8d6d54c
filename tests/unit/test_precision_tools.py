"""The emulated precisions of benchmarks/precision.py and the instruction loops of
benchmarks/dot_peak.py: the roundings stay within their formats' error, and each loop's assembly
builds and runs where the CPU has its instruction."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent.parent


def _module(name: str) -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        sys.modules.pop(name, None)
        yield importlib.import_module(name)
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def precision() -> Iterator[ModuleType]:
    yield from _module("precision")


@pytest.fixture(scope="module")
def dot_peak() -> Iterator[ModuleType]:
    yield from _module("dot_peak")


@pytest.mark.parametrize("group", [32, 16, 8])
def test_one_int8_term_is_within_half_a_step_of_each_group(precision: ModuleType, group: int) -> None:
    x = torch.randn(5, 96) * torch.logspace(-3, 2, 96)  # groups of very different sizes
    x[2, :group] = 0  # an all-zero group stays zero
    y = precision.one_int8_term(x, group)
    step = x.reshape(5, -1, group).abs().amax(-1, keepdim=True) / 127
    err = (y - x).reshape(5, -1, group).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-12)
    assert torch.all(y[2, :group] == 0)
    # integers of the step: at most 255 levels per group, and the largest value exact
    levels = (y.reshape(5, -1, group) / torch.where(step == 0, torch.ones_like(step), step)).round()
    assert levels.abs().max() <= 127
    peak = x.reshape(5, -1, group).abs().argmax(-1, keepdim=True)
    assert torch.allclose(y.reshape(5, -1, group).gather(-1, peak), x.reshape(5, -1, group).gather(-1, peak))


@pytest.mark.parametrize("group", [32, 0])
def test_two_int8_terms_are_within_half_a_fine_step(precision: ModuleType, group: int) -> None:
    """x ~= d (256 a + b) with 256 d = max |x| / 127 per group (0: the whole row): within d / 2, 256 times
    finer than one int8 term; a zero group stays zero."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(group)) * torch.logspace(-2, 1, 64)
    x[3] = 0
    y = precision.two_int8_terms(x, group)
    g = precision.grouped(x, group)
    d = g.abs().amax(-1, keepdim=True) / 127 / 256
    assert torch.all((precision.grouped(y, group) - g).abs() <= d / 2 * (1 + 1e-4) + 1e-12)
    assert torch.all(y[3] == 0)
    assert precision.grouped(x, 0).shape == (4, 1, 64)


def test_layer_weights_are_told_from_the_tied_embedding(precision: ModuleType) -> None:
    assert precision.in_layers("model.layers.3.mlp.down_proj.weight")
    assert not precision.in_layers("model.embed_tokens.weight")
    x = torch.tensor([1.0 + 2**-10, -3.0])
    assert torch.equal(precision.bfloat16(x), torch.tensor([1.0, -3.0]))  # 8 bits of mantissa
    floats = {"model.embed_tokens.weight": x, "model.layers.0.mlp.up_proj.weight": x, "model.norm.weight": x}
    quantized = {"model.embed_tokens.weight": None, "model.layers.0.mlp.up_proj.weight": None}
    layers = precision.rounded_weights(floats, quantized, precision.bfloat16, layers_only=True)
    every = precision.rounded_weights(floats, quantized, precision.bfloat16, layers_only=False)
    assert torch.equal(layers["model.layers.0.mlp.up_proj.weight"], torch.tensor([1.0, -3.0]))
    assert torch.equal(layers["model.embed_tokens.weight"], x) and torch.equal(every["model.norm.weight"], x)
    assert torch.equal(every["model.embed_tokens.weight"], torch.tensor([1.0, -3.0]))


def test_int8_per_head_rounds_each_token_and_head_alone(precision: ModuleType) -> None:
    k = torch.randn(4, 3, 64)
    k[1, 2] *= 1000  # one head of one token much larger: the others keep their own scale
    y = precision.one_int8_term(k, 64)
    step = k.abs().amax(-1, keepdim=True) / 127
    assert torch.all((y - k).abs() <= step / 2 * (1 + 1e-5))
    assert (y - k)[0].abs().max() < 0.05


def test_rounded_input_rounds_before_the_layer_and_its_ranking(precision: ModuleType) -> None:
    seen: list[torch.Tensor] = []

    class Layer:
        out_features = 7

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x

        def ranked(self, x: torch.Tensor, argmax: torch.Tensor | None = None) -> torch.Tensor:
            seen.append(x)
            return x

    wrapped = precision.RoundedInput(Layer(), lambda x: x.round())
    x = torch.tensor([[0.4, 1.6]])
    assert torch.equal(wrapped(x), torch.tensor([[0.0, 2.0]]))
    assert torch.equal(wrapped.ranked(x), torch.tensor([[0.0, 2.0]]))
    assert wrapped.out_features == 7 and len(seen) == 2


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler")
def test_each_instruction_loop_builds_and_runs_where_the_cpu_has_it(dot_peak: ModuleType, tmp_path: Path) -> None:
    flags = dot_peak.cpu_info().flags
    compiler = shutil.which("cc") or shutil.which("gcc")
    ran = 0
    for instruction, width, flag, macs, _path in dot_peak.INSTRUCTIONS:
        # a vector instruction's lanes, or a tile instruction's 16 x 16 sums of 32 products
        assert macs in ((16 * 16 * 32,) if width == "tile" else (8, 16, 32))
        if flag not in flags:
            continue
        iterations = 14 * 10_000 if width != "tile" else 4 * 100
        binary = dot_peak.build(compiler, tmp_path, f"{instruction}_{width}", dot_peak.source(instruction, width, iterations))
        rate = float(subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout)
        assert rate > 0 or width == "tile"  # 0: Linux lends no AMX state to the process
        ran += 1
    if not ran:
        pytest.skip("this CPU has none of the timed instructions (needs fma, avx2 or AVX-512)")


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler")
def test_tile_wake_program_builds_and_runs_where_the_cpu_has_amx_bf16(dot_peak: ModuleType, tmp_path: Path) -> None:
    """The runs of tile products between stretches of vector code: each gap prints the time of both, of the
    vector code alone, and a checksum of the sums (0: Linux lends no AMX state; - -: the compiler builds no AMX
    code); no timing is asserted."""
    if "amx_bf16" not in dot_peak.cpu_info().flags:
        pytest.skip("the CPU has no amx_bf16")
    binary = dot_peak.build(shutil.which("cc") or shutil.which("gcc"), tmp_path, "wake", dot_peak.WAKE_SOURCE)
    for gap in (0, 40):
        fields = dot_peak.amx_fields(binary, gap)
        if isinstance(fields, str):
            pytest.skip(fields)
        both, alone, checksum = (float(f) for f in fields)
        assert both > 0 and alone >= 0 and checksum == 0.0  # zero operands: every sum and chain stays 0


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler")
def test_integer_tile_loop_program_builds_and_runs_where_the_cpu_has_amx_bf16(dot_peak: ModuleType,
                                                                             tmp_path: Path) -> None:
    """The integer tiles' loop alone, in each of its modes: ns per step and a checksum of the sums (0: Linux
    lends no AMX state; - -: the compiler builds no AMX code); no timing is asserted."""
    if "amx_bf16" not in dot_peak.cpu_info().flags:
        pytest.skip("the CPU has no amx_bf16")
    binary = dot_peak.build(shutil.which("cc") or shutil.which("gcc"), tmp_path, "loop", dot_peak.LOOP_SOURCE)
    for mode in range(len(dot_peak.LOOP_MODES)):
        fields = dot_peak.amx_fields(binary, mode)
        if isinstance(fields, str):
            pytest.skip(fields)
        per_step, checksum = (float(f) for f in fields)
        assert per_step > 0 and checksum == 0.0  # zero operands: every sum stays 0


@pytest.mark.skipif((shutil.which("cc") is None and shutil.which("gcc") is None) or shutil.which("taskset") is None,
                    reason="needs a C compiler and taskset")
def test_core_speeds_time_every_cpu_the_process_may_use(dot_peak: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Timings per CPU, pinned there: the integer tiles' loop where the CPU has amx_bf16 (and Linux lends AMX
    state), the FMA loop otherwise, and reading memory; no timing is asserted."""
    info = dot_peak.cpu_info()
    if "fma" not in info.flags and "amx_bf16" not in info.flags:
        assert dot_peak.core_speeds() is None
        pytest.skip("the CPU has neither fma nor amx_bf16")
    speeds = dot_peak.core_speeds()
    assert speeds is not None and set(speeds.by_cpu) == set(info.cpus)
    assert set(speeds.read_gb_s) == set(info.cpus)
    assert all(v > 0 for v in (*speeds.by_cpu.values(), *speeds.read_gb_s.values()))
    assert speeds.line().startswith(speeds.unit) and "reading memory, GB/s" in speeds.line()
    if "fma" in info.flags:  # the fallback, as on a CPU without AMX
        monkeypatch.setattr(dot_peak, "cpu_info", lambda: type(info)(info.cpus, info.physical, info.flags - {"amx_bf16"}))
        fallback = dot_peak.core_speeds()
        assert fallback is not None and fallback.unit.startswith("vfmadd231ps") and set(fallback.by_cpu) == set(info.cpus)
