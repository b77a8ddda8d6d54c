"""benchmarks/kernel_ab.py, the tool that times two builds of the kernels in one process: an A/A run (the other
build from this checkout's own sources) loads one library for both, computes the same floats with each, and
prints every table it was asked for (the LM head's too); an --other that is no realizar checkout is refused. No timing is asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from realizar import kernels

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "benchmarks" / "kernel_ab.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


@pytest.mark.skipif(kernels.load() is None, reason="the CPU kernels are not built here (no C compiler)")
def test_an_a_a_run_gives_the_same_floats_with_both_builds() -> None:
    done = run("--other", str(ROOT), "--rows", "16", "--layers", "1", "--repeats", "2", "--steps", "2",
               "--context", "3", "--head")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "the same sources: an A/A run" in out
    assert "| 2 sequences at context 3 |" in out
    products = re.findall(r"^\| 16 \| (qkv|o|gate_up|down) \|.*\| ([0-9.e+-]+) \|$", out, re.MULTILINE)
    assert [kind for kind, _ in products] == ["qkv", "o", "gate_up", "down"]
    assert all(float(difference) == 0.0 for _, difference in products)
    assert "| 16 | all four |" in out
    head = re.search(r"^\| 16 \| [^\n]*\| ([0-9.e+-]+) \| (True|False) \|$", out, re.MULTILINE)
    assert head is not None, out
    assert float(head.group(1)) == 0.0 and head.group(2) == "True"  # the LM head's logits and greedy tokens


def test_another_directory_than_a_checkout_is_refused(tmp_path: Path) -> None:
    done = run("--other", str(tmp_path))
    assert done.returncode == 2
    assert "is not a realizar checkout" in done.stderr
