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
``vpmaddwd`` (realizar's AVX2 fast class, one int16 term) is 16 a ymm. AMX's tile instructions (Sapphire
Rapids and later) multiply whole 16 x 16 tiles: ``tdpbf16ps`` is vLLM's bfloat16 where oneDNN finds AMX, and
``tdpbssd`` what an int8 tile path of realizar's fast class would get (two terms: half its products count).

Where the CPU has ``amx_bf16``, a second table times a run of 18 ``tdpbf16ps`` (three tiles of sums, operands
loaded from L1: what one 16-key step of a prompt tile's scores would take) between stretches of vector code
(chains of dependent ``vfmadd231ps``) of growing length: the run's own cost is the time of both, less that of
the vector code alone. On the AMX Xeon of BENCHMARKS.md, a run that follows more than 250-300 ns of vector
code cost about 250 ns more than one that follows less, as if the idle tiles woke up late.

A third table, there too, times the loop of ``realizar/kernels/quant_tiles.c``'s integer tiles on its own, one
core, a unit's weights in L2: steps of two tile products, a tile store of the sums and the vector scaling of a
step LAG steps back, as shipped, with the tile instructions alone, and with the scaling alone. On the AMX Xeon,
19-21 ns a step as shipped against 11 and 7.5: the two add up instead of overlapping.

``core_speeds`` times two short programs on each CPU this process may use, pinned there: the integer tiles' loop
where the CPU has ``amx_bf16`` (else a ``vfmadd231ps`` loop), and one core reading 512 MiB;
``benchmarks/throughput.py`` prints both before and after each server. The vCPUs of a shared VM do not all run at
one speed: on the AMX Xeon, one vCPU ran this loop at 27 ns a step while the other took 50-60, and which one was
slow changed within seconds (a busy neighbour on the same physical core, as it seemed). Every server measured in
such a stretch is slowed alike, so the probe says when to distrust a run, not how to correct it.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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
    # AMX: one tile instruction multiplies a 16 x 64-byte tile by a 16 x 64-byte one into 16 x 16 sums
    ("tdpbssd", "tile", "amx_int8", 16 * 16 * 64 // 2, "int8 tiles, as realizar's 2 int8 terms would count them"),
    ("tdpbf16ps", "tile", "amx_bf16", 16 * 16 * 32, "bfloat16 tiles (vLLM bf16, oneDNN with AMX)"),
]
ITERATIONS = 400_000_000


def _timed(chains: list[str], iterations: int, clobbers: str, setup: str = "", teardown: str = "") -> str:
    """C source that runs ``setup``, then prints the best of 3 timings of ``iterations`` instructions
    (the asm lines ``chains``, one instruction each, repeated), in G instructions per second."""
    lines = " ".join(f'"{chain}\\n"' for chain in chains)
    return f"""#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
static double now(void) {{ struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }}
int main(void) {{
    {setup}
    const long n = {iterations};
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {{
        const double t = now();
        __asm__ volatile("mov %0, %%rcx\\n" "1:\\n" {lines} "sub ${len(chains)}, %%rcx\\n" "jg 1b\\n"
                         :: "r"(n) : "rcx", "cc"{clobbers});
        const double d = now() - t;
        best = d < best ? d : best;
    }}
    {teardown}
    printf("%.4f\\n", n / best / 1e9);
    return 0;
}}
"""


def program(instruction: str, width: str, iterations: int = ITERATIONS) -> str:
    """C source that prints the best of 3 timings of ``iterations`` of ``instruction`` on ``width``
    registers, in G instructions per second: 14 independent chains."""
    chains = [f"{instruction} %%{width}14, %%{width}15, %%{width}{i}" for i in range(14)]
    return _timed(chains, iterations, "".join(f', "xmm{i}"' for i in range(16)))


# Ask Linux for the tiles' state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA; it lends it only to a process
# that asks, and the program prints 0 where it refuses), then configure every tile as 16 rows of 64 bytes
# (palette 1: the bytes per row of tiles 0-15, 16 bits each, from byte 16, then their rows from byte 48).
TILE_SETUP = """if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) { printf("0\\n"); return 0; }
    unsigned char config[64];
    memset(config, 0, sizeof config);
    config[0] = 1;
    for (int t = 0; t < 8; t++) { config[16 + 2 * t] = 64; config[48 + t] = 16; }
    __asm__ volatile("ldtilecfg %0" :: "m"(config));"""


def tile_program(instruction: str, iterations: int = ITERATIONS // 100) -> str:
    """C source that times ``iterations`` of an AMX ``instruction`` as :func:`program` does, in 4 chains
    (tiles 0-3 the sums, 4-7 the operands), after TILE_SETUP."""
    chains = [f"{instruction} %%tmm{4 + i % 2}, %%tmm{6 + i // 2}, %%tmm{i}" for i in range(4)]
    return _timed(chains, iterations, "", TILE_SETUP, '__asm__ volatile("tilerelease");')


def source(instruction: str, width: str, iterations: int | None = None) -> str:
    """The timing program of one entry of INSTRUCTIONS (``iterations``: the default of its kind)."""
    if width == "tile":
        return tile_program(instruction, iterations or ITERATIONS // 100)
    return program(instruction, width, iterations or ITERATIONS)


# Runs of 18 tile products (tiles 0-2 the sums, 3-4 and 5-7 the operands, reloaded from a 32 KB buffer each run),
# alternating with `gap` rounds of 8 dependent float32 FMA chains; prints ns per run of tiles and vector code
# together, of the vector code alone, and a checksum; "0" where Linux lends no AMX state (TILE_SETUP), "- -"
# where the compiler builds no AMX code.
WAKE_SOURCE = """#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__)
int main(void) { printf("- -\\n"); return 0; }
#else
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static unsigned char operands[32768] __attribute__((aligned(64)));
static float sums[768] __attribute__((aligned(64)));
static void tiles(void) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2);
    for (int c = 0; c < 2; c++) {
        _tile_loadd(3, operands + 2048 * c, 64); _tile_loadd(4, operands + 2048 * c + 1024, 64);
        for (int term = 0; term < 2; term++) {
            const unsigned char *q = operands + 8192 + 1024 * (2 * term + c);
            _tile_loadd(5, q, 64); _tile_loadd(6, q + 4096, 64); _tile_loadd(7, q + 8192, 64);
            _tile_dpbf16ps(0, 3, 5); _tile_dpbf16ps(1, 3, 6); _tile_dpbf16ps(2, 3, 7);
            if (term == 0) { _tile_dpbf16ps(0, 4, 5); _tile_dpbf16ps(1, 4, 6); _tile_dpbf16ps(2, 4, 7); }
        }
    }
    _tile_stored(0, sums, 64); _tile_stored(1, sums + 256, 64); _tile_stored(2, sums + 512, 64);
}
static __m512 chains[8];
static void vector_code(int gap) {
    for (int r = 0; r < gap; r++)
        for (int i = 0; i < 8; i++) chains[i] = _mm512_fmadd_ps(chains[i], chains[(i + 1) & 7], chains[i]);
}
int main(int argc, char **argv) {
    """ + TILE_SETUP + """
    for (int i = 0; i < 8; i++) chains[i] = _mm512_set1_ps(0.0f);
    const int gap = atoi(argv[1]);
    const long n = 200000;
    double both = 1e30, alone = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        double t = now();
        for (long i = 0; i < n; i++) { tiles(); vector_code(gap); }
        double d = now() - t;
        both = d < both ? d : both;
        t = now();
        for (long i = 0; i < n; i++) vector_code(gap);
        d = now() - t;
        alone = d < alone ? d : alone;
    }
    _tile_release();
    printf("%.1f %.1f %g\\n", both / n * 1e9, alone / n * 1e9, sums[0] + chains[0][0]);
    return 0;
}
#endif
"""
WAKE_GAPS = [0, 10, 20, 30, 40, 50, 60, 80, 120]


def build(compiler: str, tmp: Path, name: str, source_text: str) -> Path:
    """``source_text`` compiled for this CPU into ``tmp``: the program's path."""
    source_file, binary = tmp / f"{name}.c", tmp / name
    source_file.write_text(source_text)
    subprocess.run([compiler, "-O2", "-march=native", "-o", str(binary), str(source_file)], check=True)
    return binary


def amx_fields(binary: Path, argument: int) -> list[str] | str:
    """What an AMX timing program (WAKE_SOURCE, LOOP_SOURCE) prints for ``argument``, split into fields; or why it
    timed nothing: Linux lends no AMX state to the process, or the compiler builds no AMX code."""
    fields = subprocess.run([str(binary), str(argument)], check=True, capture_output=True, text=True).stdout.split()
    if fields == ["0"]:
        return "Linux lends no AMX state here"
    if fields == ["-", "-"]:
        return "this compiler builds no AMX code"
    return fields


def wake_table(compiler: str, tmp: Path) -> None:
    """The second table (see the module docstring)."""
    binary = build(compiler, tmp, "wake", WAKE_SOURCE)
    print("\n| vector code between runs, ns | a run of 18 `tdpbf16ps` after it, ns |")
    print("|---|---|")
    for gap in WAKE_GAPS:
        fields = amx_fields(binary, gap)
        if isinstance(fields, str):
            print(f"| - | ({fields}) |")
            return
        both, alone = fields[:2]
        print(f"| {float(alone):.0f} | {float(both) - float(alone):.0f} |", flush=True)


# The integer tiles' loop (quant_tiles.c's integer_unit, kinds with a min): 16 panels' weight tiles (in L2), a
# row tile's two terms of 18 blocks, LAG 4; argv[1]: 0 as shipped, 1 the tile instructions alone, 2 the scaling
# alone. Prints ns per step (16 rows by 16 outputs by 32 terms) and a checksum; "0" and "- -" as WAKE_SOURCE.
LOOP_SOURCE = """#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__)
int main(void) { printf("- -\\n"); return 0; }
#else
#define BLOCKS 18
#define PANELS 16
#define LAG 4
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static unsigned char weights[PANELS * BLOCKS * 1024] __attribute__((aligned(64)));
static unsigned short hi[BLOCKS * 512] __attribute__((aligned(64))), lo[BLOCKS * 512] __attribute__((aligned(64)));
static float partial[PANELS * 256] __attribute__((aligned(64))), sums[LAG * 256] __attribute__((aligned(64)));
static float scales[PANELS * BLOCKS * 32] __attribute__((aligned(64))), xsums[16 * BLOCKS];
static inline __attribute__((always_inline)) void scale(float *acc, const float *s, const float *sc, long b) {
    const __m512 d = _mm512_load_ps(sc), min = _mm512_load_ps(sc + 16);
#pragma GCC unroll 16
    for (int r = 0; r < 16; r++) {
        __m512 a = b ? _mm512_load_ps(acc + 16 * r) : _mm512_setzero_ps();
        a = _mm512_fmadd_ps(_mm512_load_ps(s + 16 * r), d, a);
        a = _mm512_fmadd_ps(_mm512_set1_ps(xsums[r * BLOCKS + b]), min, a);
        _mm512_store_ps(acc + 16 * r, a);
    }
}
#define PRODUCTS(AH, AL, BT, CT) do { _tile_loadd(BT, weights + (q * BLOCKS + b) * 1024, 64); _tile_zero(CT); \\
    _tile_dpbf16ps(CT, AH, BT); _tile_dpbf16ps(CT, AL, BT); } while (0)
static void unit(int mode) {
    long k = 0, rq = 0, rb = 0;
    for (long b = 0; b < BLOCKS; b++) {
        if (mode != 2) {
            if (b & 1) { _tile_loadd(5, hi + b * 512, 64); _tile_loadd(6, lo + b * 512, 64); }
            else { _tile_loadd(2, hi + b * 512, 64); _tile_loadd(3, lo + b * 512, 64); }
        }
        for (long q = 0; q < PANELS; q++, k++) {
            if (mode != 2 && (k & 1)) {
                if (b & 1) PRODUCTS(5, 6, 7, 1); else PRODUCTS(2, 3, 7, 1);
                _tile_stored(0, sums + 256 * ((k - 1) % LAG), 64);
            } else if (mode != 2) {
                if (b & 1) PRODUCTS(5, 6, 4, 0); else PRODUCTS(2, 3, 4, 0);
                if (k >= 1) _tile_stored(1, sums + 256 * ((k - 1) % LAG), 64);
            }
            if (mode != 1 && k >= LAG) {
                scale(partial + rq * 256, sums + 256 * ((k - LAG) % LAG), scales + (rq * BLOCKS + rb) * 32, rb);
                if (++rq == PANELS) rq = 0, rb++;
            }
        }
    }
}
int main(int argc, char **argv) {
    """ + TILE_SETUP + """
    const int mode = atoi(argv[1]);
    /* zeros written, so that each page is memory of its own (untouched, they would all read one zero page) */
    memset(weights, 0, sizeof weights), memset(hi, 0, sizeof hi), memset(lo, 0, sizeof lo);
    memset(scales, 0, sizeof scales), memset(xsums, 0, sizeof xsums);
    double best = 1e30;
    for (int rep = 0; rep < 200; rep++) {
        const double t = now();
        for (int i = 0; i < 4; i++) unit(mode);  /* 4 row tiles: 64 rows */
        const double d = now() - t;
        best = d < best ? d : best;
    }
    _tile_release();
    printf("%.2f %g\\n", best / (4.0 * BLOCKS * PANELS) * 1e9, partial[0] + partial[PANELS * 256 - 1]);
    return 0;
}
#endif
"""
LOOP_MODES = ["as shipped", "the tile instructions alone", "the scaling alone"]


def loop_table(compiler: str, tmp: Path) -> None:
    """The third table (see the module docstring)."""
    binary = build(compiler, tmp, "loop", LOOP_SOURCE)
    print("\n| the integer tiles' loop | ns per step |")
    print("|---|---|")
    for mode, name in enumerate(LOOP_MODES):
        fields = amx_fields(binary, mode)
        if isinstance(fields, str):
            print(f"| - | ({fields}) |")
            return
        print(f"| {name} | {float(fields[0]):.1f} |", flush=True)


# One core's reading of a buffer larger than the caches (512 MiB, twice over the best of 2 passes): GB/s.
READ_SOURCE = """#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(void) {
    const size_t bytes = (size_t)512 << 20;
    uint64_t *a = aligned_alloc(64, bytes), sum = 0;
    if (!a) return 1;
    memset(a, 1, bytes);
    double best = 1e30;
    for (int rep = 0; rep < 2; rep++) {
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        const double t = now();
        for (size_t i = 0; i < bytes / 8; i += 4) s0 += a[i], s1 += a[i + 1], s2 += a[i + 2], s3 += a[i + 3];
        const double d = now() - t;
        best = d < best ? d : best;
        sum += s0 + s1 + s2 + s3;
    }
    printf("%.2f %d\\n", bytes / best / 1e9, (int)(sum & 1));
    return 0;
}
"""


@dataclass(frozen=True)
class CoreSpeeds:
    """Timings on each CPU, each program pinned to its CPU: ``unit`` says what ``by_cpu``'s numbers are (lower is
    faster), ``read_gb_s`` how fast the CPU read a buffer larger than the caches."""

    unit: str
    by_cpu: dict[int, float]
    read_gb_s: dict[int, float]

    def line(self) -> str:
        def each(values: dict[int, float]) -> str:
            return ", ".join(f"{cpu}: {v:.1f}" for cpu, v in sorted(values.items()))

        return f"{self.unit} by CPU: {each(self.by_cpu)}; reading memory, GB/s: {each(self.read_gb_s)}"


_probes: dict[str, Path] = {}  # the probe programs of this process, built once


def _probe(compiler: str, name: str, source_text: str) -> Path:
    if name not in _probes:
        tmp = Path(tempfile.mkdtemp(prefix="realizar-probe-"))
        atexit.register(shutil.rmtree, tmp, True)
        _probes[name] = build(compiler, tmp, name, source_text)
    return _probes[name]


def c_compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def core_speeds() -> CoreSpeeds | None:
    """On each CPU: the integer tiles' loop as shipped (ns a step) where the CPU has ``amx_bf16`` and Linux lends
    AMX state, else ns per 1,000 ``vfmadd231ps`` ymm (14 independent chains), and GB/s reading memory. None where
    there is no C compiler, no ``taskset`` to pin the programs with, or neither instruction (see the module
    docstring)."""
    compiler, taskset = c_compiler(), shutil.which("taskset")
    info = cpu_info()
    if compiler is None or taskset is None or not {"amx_bf16", "fma"} & info.flags:
        return None

    def on(cpu: int, binary: Path, *arguments: str) -> list[str]:
        return subprocess.run([taskset, "-c", str(cpu), str(binary), *arguments], check=True, capture_output=True,
                              text=True).stdout.split()

    reader = _probe(compiler, "read", READ_SOURCE)
    read = {cpu: float(on(cpu, reader)[0]) for cpu in info.cpus}
    if "amx_bf16" in info.flags:
        loop = _probe(compiler, "loop", LOOP_SOURCE)
        by_cpu = {}
        for cpu in info.cpus:
            fields = on(cpu, loop, "0")
            if fields in (["0"], ["-", "-"]):  # no AMX state lent, or no AMX code built
                break
            by_cpu[cpu] = float(fields[0])
        else:
            return CoreSpeeds("integer-tile loop, ns a step", by_cpu, read)
    if "fma" not in info.flags:
        return None
    fma = _probe(compiler, "fma", source("vfmadd231ps", "ymm", 14 * 2_000_000))
    return CoreSpeeds("vfmadd231ps ymm, ns per 1,000", {cpu: 1000 / float(on(cpu, fma)[0]) for cpu in info.cpus},
                      read)


def main() -> int:
    compiler = c_compiler()
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
            binary = build(compiler, Path(tmp), "peak", source(instruction, width))
            rate = float(subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout)
            if not rate:
                print(f"| `{instruction}` {width} | (Linux lends no AMX state here) | {macs} | - | {path} |")
                continue
            print(f"| `{instruction}` {width} | {rate:.2f} | {macs} | {rate * macs:.0f} | {path} |", flush=True)
        if "amx_bf16" in flags:
            wake_table(compiler, Path(tmp))
            loop_table(compiler, Path(tmp))
    speeds = core_speeds()
    if speeds is not None:
        print(f"\n{speeds.line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
