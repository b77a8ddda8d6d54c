"""The peak rate of the dot-product instructions each compute path is built on, one core: the ceiling
that a decode step of many sequences, bound by its matrix products, runs under.

Usage (from the repository root)::

    .venv/bin/python benchmarks/dot_peak.py

Compiles (with ``cc``) and runs a loop of 14 independent chains of each instruction this CPU has, and
prints instructions per second and the multiply-adds per second each path gets from them. The
multiply-adds an instruction is worth depend on the path: ``vpdpbusd`` multiplies 64 byte pairs, but
realizar's fast class spends two of them per product (the activations' two int8 terms, see
``realizar/kernels/quant_fast.c``), so 32 of its multiply-adds count; ``vdpbf16ps`` is vLLM's bfloat16
(oneDNN without AMX) at 32 a zmm instruction; float32 FMAs are 16 a zmm and 8 a ymm; AVX2's
``vpmaddwd`` (realizar's AVX2 fast class, one int16 term) is 16 a ymm.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import cpu_info

# instruction, operands' register width, the CPU flag it needs, multiply-adds a path gets from one, the path
INSTRUCTIONS = [
    ("vpdpbusd", "zmm", "avx512_vnni", 32, "realizar fast class (2 int8 terms), AVX-512 VNNI"),
    ("vpdpwssd", "zmm", "avx512_vnni", 32, "one int16 term with VNNI (not used)"),
    ("vdpbf16ps", "zmm", "avx512_bf16", 32, "bfloat16 products (vLLM bf16, oneDNN without AMX)"),
    ("vfmadd231ps", "zmm", "avx512f", 16, "float32 FMA (realizar exact class, vLLM float32)"),
    ("vpmaddwd", "ymm", "avx2", 16, "realizar fast class on AVX2 (one int16 term; plus an add each)"),
    ("vfmadd231ps", "ymm", "fma", 8, "float32 FMA, AVX2"),
]
ITERATIONS = 400_000_000


def program(instruction: str, width: str, iterations: int = ITERATIONS) -> str:
    """C source that prints the best of 3 timings of ``iterations`` of ``instruction`` on ``width``
    registers, in G instructions per second."""
    chains = " ".join(f'"{instruction} %%{width}14, %%{width}15, %%{width}{i}\\n"' for i in range(14))
    clobbers = ", ".join(f'"xmm{i}"' for i in range(16))
    return f"""#include <stdio.h>
#include <time.h>
static double now(void) {{ struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }}
int main(void) {{
    const long n = {iterations};
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {{
        const double t = now();
        __asm__ volatile("mov %0, %%rcx\\n" "1:\\n" {chains} "sub $14, %%rcx\\n" "jg 1b\\n"
                         :: "r"(n) : "rcx", "cc", {clobbers});
        const double d = now() - t;
        best = d < best ? d : best;
    }}
    printf("%.4f\\n", n / best / 1e9);
    return 0;
}}
"""


def main() -> int:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        sys.exit("dot_peak.py needs a C compiler (cc)")
    flags = cpu_info().flags
    print("| instruction | G instructions/s, one core | multiply-adds each | G multiply-adds/s | path |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for instruction, width, flag, macs, path in INSTRUCTIONS:
            if flag not in flags:
                print(f"| `{instruction}` {width} | (no `{flag}` here) | {macs} | - | {path} |")
                continue
            source, binary = Path(tmp) / "peak.c", Path(tmp) / "peak"
            source.write_text(program(instruction, width))
            subprocess.run([compiler, "-O2", "-march=native", "-o", str(binary), str(source)], check=True)
            rate = float(subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout)
            print(f"| `{instruction}` {width} | {rate:.2f} | {macs} | {rate * macs:.0f} | {path} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
