"""``realizar info``: what this machine computes with, without changing it."""

from __future__ import annotations

import pytest

from realizar import cli, kernels


def test_info_names_the_kernels_and_the_tiles_and_leaves_them_as_they_were(capsys: pytest.CaptureFixture[str]) -> None:
    compiled = kernels.load()
    before = compiled.tiles if compiled is not None else None
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("realizar ") and "cpu kernels: " in out and "kv cache on the cpu: " in out
    if compiled is None:
        assert "not built (pure-torch path)" in out
        return
    assert compiled.tiles == before
    line = next(row for row in out.splitlines() if row.startswith("amx bf16 tiles: "))
    assert line.removeprefix("amx bf16 tiles: ").startswith(
        ("on, the fast class's products from", "available, ", "not on this CPU or build"))
    assert line.startswith("amx bf16 tiles: on, ") == before
