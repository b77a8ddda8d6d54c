"""The numpy Q4_K / Q6_K quantizers of benchmarks/kquants.py (which write benchmarks/big_model.py's
test model): their blocks must read back through realizar's dequantizer, and through gguf's own
reference, to the quantized values within each format's step."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from realizar.loading import quants

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def kquants() -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        sys.modules.pop("kquants", None)
        yield importlib.import_module("kquants")
        sys.modules.pop("kquants", None)


def _matrix(seed: int, rows: int = 48, cols: int = 768) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
    # rows of other scales and shapes: all positive (Q4_K's min at 0), a constant, all zeros,
    # a large outlier, and sub-blocks of very different magnitudes within one super-block
    x[0] = np.abs(x[0])
    x[1] = 0.5
    x[2] = 0.0
    x[3, 7] = 3.0
    x[4] *= np.repeat(np.logspace(-3, 1, cols // 16, dtype=np.float32), 16)
    return x


@pytest.mark.parametrize(("qtype", "name"), [(QT.Q4_K, "quantize_q4_k"), (QT.Q6_K, "quantize_q6_k")])
@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_through_realizar(kquants: ModuleType, qtype: QT, name: str, seed: int) -> None:
    x = _matrix(seed)
    raw = getattr(kquants, name)(x)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert raw.dtype == np.uint8 and raw.shape == (x.shape[0], x.shape[1] // block * type_size)

    y = quants.dequantize(raw, qtype, x.shape).numpy()
    # the blocks are those llama.cpp's format defines: gguf's reference reads the same values
    np.testing.assert_array_equal(y, gguf.quants.dequantize(raw, qtype))
    assert np.isfinite(y).all()

    # every element within one quantization step of its sub-block (half a step from rounding,
    # half from clipping at the far end), plus what the sub-block scales, integers relative to
    # the super-block's largest, lose: half of that unit on up to 15 or 32 levels, and on the
    # min, at most a quarter of the super-block's largest step. The step is the sub-block's
    # range over its levels (15 for 4 bits, 63 for 6).
    sub, levels = (32, 15.0) if qtype == QT.Q4_K else (16, 63.0)
    xs, ys = x.reshape(-1, sub), y.reshape(-1, sub)
    lo = np.minimum(xs.min(axis=1, keepdims=True), 0.0) if qtype == QT.Q4_K else -np.abs(xs).max(1, keepdims=True)
    hi = xs.max(axis=1, keepdims=True) if qtype == QT.Q4_K else np.abs(xs).max(1, keepdims=True)
    step = (hi - lo) / levels
    super_step = step.reshape(-1, 256 // sub).max(axis=1, keepdims=True)
    bound = (step.reshape(-1, 256 // sub) + super_step / 4).reshape(-1, 1) + 1e-7
    assert (np.abs(ys - xs) <= bound).all()

    # and overall as precise as the format allows on Gaussian weights (llama.cpp's own
    # quantizer, with its scale search, reaches about 0.07 and 0.016 here)
    g = x[8:]
    rel = np.sqrt(((y[8:] - g) ** 2).mean()) / g.std()
    assert rel < (0.09 if qtype == QT.Q4_K else 0.022)
    # exact where the values are exactly representable: zeros and the all-zero row
    assert (y[2] == 0).all()


def test_leading_dimensions_and_bad_widths(kquants: ModuleType) -> None:
    x = _matrix(2, rows=6, cols=512).reshape(2, 3, 512)
    assert kquants.quantize_q4_k(x).shape == (2, 3, 2 * 144)
    assert kquants.quantize_q6_k(x).shape == (2, 3, 2 * 210)
    np.testing.assert_array_equal(kquants.quantize_q4_k(x).reshape(6, -1), kquants.quantize_q4_k(x.reshape(6, 512)))
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize_q4_k(np.zeros((2, 100), dtype=np.float32))
