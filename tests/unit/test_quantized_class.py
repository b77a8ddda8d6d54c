"""``auto``'s choice of the quantized products' class: the faster of the classes that pass the
quality gate, never one the gate rejects (realizar.engine.engine.choose_quantized_class)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from realizar.engine import engine as engine_module
from realizar.engine.engine import choose_quantized_class, choose_tiles


class Built:
    """What the builder made: a stand-in for the model, timed by the patched step timer. ``alive``
    counts the instances not yet collected, and ``most_alive`` the most at one time."""

    alive = 0
    most_alive = 0
    made: list[tuple[str, int | None]] = []  # (kind, layers) of every model made

    def __init__(self, kind: str, layers: int | None = None) -> None:
        self.kind = kind
        self.fast = kind == "fast"
        self.layers = layers
        Built.made.append((kind, layers))
        Built.alive += 1
        Built.most_alive = max(Built.most_alive, Built.alive)

    def __del__(self) -> None:
        Built.alive -= 1


@pytest.fixture
def timings(monkeypatch: pytest.MonkeyPatch) -> dict[bool, float]:
    """Step seconds per class (keyed by ``fast``), returned by the patched timer."""
    table = {False: 0.010, True: 0.004}
    monkeypatch.setattr(engine_module, "decode_step_seconds",
                        lambda model, n, **_kw: (0.05 if model.kind == "float32" else table[model.fast]) * n)
    monkeypatch.delenv("REALIZAR_QUANTIZED", raising=False)
    return table


def choose(quantized: bool = True, exact: bool = False, float32_allowed: bool = False) -> Any:
    return choose_quantized_class(Built, quantized, exact, float32_allowed=float32_allowed)  # type: ignore[arg-type]


def test_auto_takes_the_faster_class_that_passes(timings: dict[bool, float]) -> None:
    Built.most_alive = Built.alive
    assert choose().fast
    timings[True] = 0.02
    assert not choose().fast
    assert Built.most_alive <= Built.alive + 1  # one class's weights in memory at a time


def test_auto_never_takes_a_class_the_gate_rejects(timings: dict[bool, float],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(engine_module.QUANTIZED_CLASSES_PASSING_GATE, "fast", False)
    timings[True] = 1e-9  # however fast it is
    for _ in range(3):
        assert not choose().fast


def test_explicit_choices_are_kept(timings: dict[bool, float], monkeypatch: pytest.MonkeyPatch) -> None:
    assert not choose(exact=True).fast  # --dtype float32 means float32 arithmetic
    assert not choose(quantized=False).fast  # nothing quantized: nothing to choose
    monkeypatch.setenv("REALIZAR_QUANTIZED", "exact")
    assert not choose().fast
    monkeypatch.setenv("REALIZAR_QUANTIZED", "fast")
    assert choose().fast


def test_a_real_decode_step_is_timed() -> None:
    """The timer runs the real model: a positive time for 1 and for 3 sequences."""
    from realizar.config import EngineConfig
    from realizar.engine.engine import decode_step_seconds, load_engine_model
    from realizar.loading import default_model_path

    served = load_engine_model(default_model_path(), EngineConfig(device="cpu", dtype="float32"))
    assert decode_step_seconds(served.model, 1, repeats=1) > 0
    assert decode_step_seconds(served.model, 3, repeats=1) > 0


def test_a_timed_choice_is_remembered_for_the_next_start(timings: dict[bool, float], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALIZAR_CACHE_DIR", str(tmp_path))
    timed: list[bool] = []
    monkeypatch.setattr(engine_module, "decode_step_seconds",
                        lambda model, n, **_kw: timed.append(model.fast) or timings[model.fast] * n)  # type: ignore[func-returns-value]
    assert choose_quantized_class(Built, True, remember="key-1").fast  # type: ignore[arg-type]
    assert timed and (tmp_path / "quantized-class-choices.json").exists()
    timed.clear()
    timings[True] = 1.0  # slower now, but the remembered choice is taken without timing
    assert choose_quantized_class(Built, True, remember="key-1").fast  # type: ignore[arg-type]
    assert not timed
    assert not choose_quantized_class(Built, True, remember="key-2").fast  # type: ignore[arg-type]
    assert timed  # another model or build: timed again
    # a remembered class the gate now rejects is not taken
    monkeypatch.setitem(engine_module.QUANTIZED_CLASSES_PASSING_GATE, "fast", False)
    assert not choose_quantized_class(Built, True, remember="key-1").fast  # type: ignore[arg-type]


def test_float32_weights_are_a_candidate_only_where_allowed(timings: dict[bool, float],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU whose quantized kernels are slow gets float32 weights, if the model is small enough."""
    timings[False] = timings[True] = 1.0
    assert choose(float32_allowed=True).kind == "float32"
    assert choose(float32_allowed=False).kind != "float32"


def test_a_large_model_is_timed_on_its_first_layers_then_built_whole(timings: dict[bool, float]) -> None:
    """With ``timing_layers`` (a model over TIMING_PREFIX_BYTES), each class is timed on its first layers
    and the head, and only the chosen class is built whole: one model's memory at a time, and the
    packing of one class."""
    Built.made.clear()
    chosen = choose_quantized_class(Built, True, timing_layers=4)  # type: ignore[arg-type]
    assert chosen.fast and chosen.layers is None
    assert Built.made == [("exact", 4), ("fast", 4), ("fast", None)]
    timings[True] = 0.02
    Built.made.clear()
    assert not choose_quantized_class(Built, True, timing_layers=4).fast  # type: ignore[arg-type]
    assert Built.made == [("exact", 4), ("fast", 4), ("exact", None)]
    Built.made.clear()
    choose()  # a small model: timed whole, the last class timed kept
    assert all(layers is None for _, layers in Built.made)


class Tiles:
    """A stand-in for the kernels' AMX tile switch (``CpuKernels.tiles_available`` and ``set_tiles``)."""

    def __init__(self, available: bool) -> None:
        self.available, self.tiles = available, False

    def tiles_available(self) -> bool:
        return self.available

    def set_tiles(self, on: bool) -> bool:
        self.tiles = on and self.available
        return self.tiles


class TileModel:
    """A stand-in model of the fast class or not, on ``kernels``."""

    def __init__(self, fast: bool, tiles: Tiles) -> None:
        self.fast, self.backend = fast, SimpleNamespace(kernels=tiles)


@pytest.fixture
def tile_timings(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[bool, float], list[int]]:
    """Decode step seconds with the tiles off and on (keyed by the switch), and the sequences of each timing."""
    table, timed = {False: 0.010, True: 0.008}, []

    def timer(model: TileModel, n: int, **_kw: Any) -> float:
        timed.append(n)
        return table[model.backend.kernels.tiles]

    monkeypatch.setattr(engine_module, "decode_step_seconds", timer)
    monkeypatch.delenv("REALIZAR_TILES", raising=False)
    return table, timed


def test_auto_turns_the_tiles_on_only_where_they_are_faster(tile_timings: tuple[dict[bool, float], list[int]]) -> None:
    table, timed = tile_timings
    tiles = Tiles(True)
    choose_tiles(TileModel(True, tiles))  # type: ignore[arg-type]
    assert tiles.tiles and set(timed) == {engine_module.TILE_TIMING_SEQUENCES} and len(timed) == 4
    table[True] = 0.02
    choose_tiles(TileModel(True, tiles))  # type: ignore[arg-type]
    assert not tiles.tiles


def test_tiles_are_not_timed_without_the_fast_class_tiles_or_auto(tile_timings: tuple[dict[bool, float], list[int]],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, timed = tile_timings
    for fast, available, setting in ((False, True, "auto"), (True, False, "auto"), (True, True, "off"),
                                     (True, True, "on")):
        monkeypatch.setenv("REALIZAR_TILES", setting)
        tiles = Tiles(available)
        choose_tiles(TileModel(fast, tiles))  # type: ignore[arg-type]
        assert not tiles.tiles and not timed  # "on" was set by the kernels at load: nothing to choose here


def test_a_timed_tile_choice_is_remembered_for_the_next_start(tile_timings: tuple[dict[bool, float], list[int]],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table, timed = tile_timings
    monkeypatch.setenv("REALIZAR_CACHE_DIR", str(tmp_path))
    tiles = Tiles(True)
    choose_tiles(TileModel(True, tiles), remember="key-1")  # type: ignore[arg-type]
    assert tiles.tiles and timed
    timed.clear()
    table[True] = 1.0  # slower now, but the remembered choice is taken without timing
    tiles = Tiles(True)
    choose_tiles(TileModel(True, tiles), remember="key-1")  # type: ignore[arg-type]
    assert tiles.tiles and not timed
    choose_tiles(TileModel(True, tiles), remember="key-2")  # type: ignore[arg-type]
    assert not tiles.tiles and timed  # another model or build: timed again
