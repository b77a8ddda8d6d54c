"""Aggregate output tokens/s against concurrency, for realizar and its peers.

Usage (from the repository root)::

    # realizar alone, concurrency 1, 4, 16 and 64, 128 output tokens (EOS ignored)
    .venv/bin/python benchmarks/throughput.py

    # the same for llama.cpp and vLLM in the same run, with realizar/peer ratios
    .venv/bin/python benchmarks/throughput.py --peers llama.cpp,vllm --json /tmp/throughput.json

    # llama-cpp-python's server too (it runs one request at a time)
    .venv/bin/python benchmarks/throughput.py --peers llama.cpp,llama-cpp-python,vllm

    # a quick smoke run: one wave per level, short prompts
    .venv/bin/python benchmarks/throughput.py --concurrency 1,4 --waves 1 --min-requests 2 --prompt-len 32

    # a realizar server you started yourself (its RSS is read only with --pid)
    .venv/bin/python benchmarks/throughput.py --url http://127.0.0.1:8080 --pid 12345

    # every server three times, in turn, and the median of each realizar/peer ratio
    .venv/bin/python benchmarks/throughput.py --peers llama.cpp,vllm --concurrency 1,16,64 --rounds 3

Each server is started on a free port (one at a time, so they never share the
CPU), warmed up, then driven by a closed loop of streaming ``/v1/completions``
requests at each concurrency level: ``max(min_requests, waves * concurrency)``
requests of ``--prompt-len`` words (about as many tokens) and exactly
``--output-len`` output tokens (``ignore_eos``/``min_tokens``, or the peer's
equivalent; the table flags any level whose output lengths differ). Output
tok/s = output tokens / wall time of the level. Prints markdown tables: tok/s,
the ratio of each level to concurrency 1 (how well batching scales), and with
``--peers`` the ratio realizar/peer at each level, then latency details.

Every server computes with ``--threads`` threads (default one per physical
core): realizar's ``--threads`` (its kernel threads), vLLM's OpenMP threads
(VLLM_CPU_OMP_THREADS_BIND) and llama.cpp's ``-t``/``-tb``. Each peer otherwise
runs in the configuration its docs recommend for this CPU, chosen in
``benchmarks/common.py`` (``llama_server_config``, ``vllm_config``); the report
lists it, and each CPU's speed before and after the server's levels
(``dot_peak.core_speeds``): a shared VM's vCPUs can run at half speed for a
while, which slows whichever server runs then. ``--rounds N`` runs the whole
sequence of servers N times and ends with each realizar/peer ratio by round and
its median, so that one slow stretch does not decide a ratio.

Peers are built by ``make peers`` into ``.peers/`` (see ``benchmarks/common.py``
and BENCHMARKS.md). A peer that cannot start is reported with the reason and
skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from common import (
    SERVER_NAMES,
    ManagedServer,
    ServerSpec,
    ServerStartError,
    add_url_options,
    check_lengths,
    default_threads,
    fmt,
    install_signal_handlers,
    llamacpp_spec,
    load_line,
    machine_line,
    realizar_spec,
    run,
    run_closed_loop,
    vllm_spec,
    warm_up,
    workload_for,
)
from dot_peak import core_speeds


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return levels


def _peers(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        if name not in SERVER_NAMES[1:]:
            raise argparse.ArgumentTypeError(f"unknown peer {name!r}; choose from {', '.join(SERVER_NAMES[1:])}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=_peers, default=[],
                   help="comma-separated: llama.cpp (llama-server), llama-cpp-python, vllm")
    p.add_argument("--concurrency", type=_levels, default=[1, 4, 16, 64], help="levels (default 1,4,16,64)")
    p.add_argument("--waves", type=int, default=2, help="requests per level = waves * concurrency (default 2)")
    p.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt words, about tokens (default 128)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (default 128)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of every request (default 0: greedy)")
    p.add_argument("--realizar-threads", type=int, default=None, metavar="N",
                   help="realizar's --threads alone (default: --threads)")
    p.add_argument("--dtype", default="auto", help="realizar --dtype (default auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads of every server (default: one per physical core): realizar's --threads, "
                        "vLLM's OpenMP threads, llama.cpp's -t/-tb")
    p.add_argument("--vllm-dtype", default=None, help="vLLM --dtype (default: bfloat16 where the CPU has native "
                   "bf16, else float32; see common.vllm_config)")
    p.add_argument("--realizar-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for realizar serve (repeatable, e.g. --realizar-arg=--max-num-seqs=64)")
    add_url_options(p, "measure this running realizar server instead of starting one (the peers are still started)")
    p.add_argument("--log-dir", type=Path, default=None, help="keep server logs here (default: the temp dir)")
    p.add_argument("--json", type=Path, help="write every measurement here as JSON")
    p.add_argument("--plot", type=Path, help="draw tok/s against concurrency for every server into this PNG "
                   "(with --rounds, each level's median)")
    p.add_argument("--rounds", type=_positive, default=1,
                   help="run every server this many times, in turn, and report each realizar/peer ratio by round "
                        "and its median (default 1)")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def spec_for(name: str, args: argparse.Namespace) -> ServerSpec:
    threads = args.threads or default_threads()
    # tokens per sequence: prompt words are about one token each; the margin covers the rest
    ctx = args.prompt_len * 2 + args.output_len + 64
    if name == "realizar":
        return realizar_spec(dtype=args.dtype, threads=args.realizar_threads or threads, extra_args=args.realizar_arg,
                             output_len=args.output_len)
    if name in ("llama.cpp", "llama-cpp-python"):
        return llamacpp_spec(threads=threads, parallel=max(args.concurrency), ctx_per_slot=ctx,
                             output_len=args.output_len, native=None if name == "llama.cpp" else False)
    if name == "vllm":
        return vllm_spec(max_num_seqs=max(args.concurrency), output_len=args.output_len, dtype=args.vllm_dtype,
                         ctx_per_seq=ctx, threads=threads)
    raise ValueError(name)


def measure_server(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start one server (or attach to realizar's ``--url``), run every level, stop it. Never raises for a
    peer that cannot run."""
    out: dict[str, Any] = {"server": name, "levels": {}}
    attached = name == "realizar" and args.url
    try:
        spec = spec_for(name, args)
    except FileNotFoundError as exc:
        out["error"] = str(exc)
        return out
    out["note"] = f"attached to {args.url}" if attached else spec.note
    out["config"] = {"url": args.url} if attached else dict(spec.config)
    try:
        with (ManagedServer.attach(args.url, args.pid, output_len=args.output_len) if attached
              else ManagedServer(spec, args.log_dir)) as server:
            out["ready_s"] = server.ready_s
            out["model"] = server.model
            workload = workload_for(server, prompt_len=args.prompt_len, output_len=args.output_len,
                                    temperature=args.temperature)
            warm_up(server, workload)
            out["core_speeds_before"] = core_speeds()
            first = 0
            for c in args.concurrency:
                n = max(args.min_requests, args.waves * c)
                print(f"[{name}] concurrency {c}: {n} requests ...", file=sys.stderr, flush=True)
                with RssPeak(server) as peak:
                    result = run(run_closed_loop(server.url, workload, c, n, first_index=first))
                first += n
                summary = result.summary()
                summary["length_warning"] = check_lengths(summary, args.output_len)
                summary["rss_peak_mib"] = peak.mib
                time.sleep(SETTLE_S)  # what the server keeps once the level is over, not what it frees on its way
                summary["rss_mib"] = server.rss_mib()
                out["levels"][c] = summary
                print(f"[{name}] concurrency {c}: {summary['output_tok_s']:.1f} output tok/s, "
                      f"TTFT p50 {fmt(summary['ttft_p50_ms'], 0)} ms, ITL p50 {fmt(summary['itl_p50_ms'], 1)} ms, "
                      f"{summary['failed']} failed {summary['length_warning']}", file=sys.stderr, flush=True)
            out["core_speeds_after"] = core_speeds()
    except (ServerStartError, RuntimeError, OSError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _tok_s(result: dict[str, Any], c: int) -> float | None:
    level = result["levels"].get(c)
    return level["output_tok_s"] if level and level["failed"] < level["requests"] else None


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    names = [r["server"] for r in results]
    lines = [f"Machine: {machine_line()}; {load_line()}",
             f"Workload: {args.prompt_len}-word prompts, {args.output_len} output tokens (EOS ignored), "
             f"temperature {args.temperature:g}, "
             f"streaming /v1/completions, closed loop, requests per level = max({args.min_requests}, "
             f"{args.waves} x concurrency)", ""]
    for r in results:
        if "error" in r:
            lines.append(f"- **{r['server']}** could not be measured: {r['error'].splitlines()[0]}")
        else:
            lines.append(f"- **{r['server']}**: {r.get('note', '')}, ready in {fmt(r.get('ready_s'))} s")
            before, after = r.get("core_speeds_before"), r.get("core_speeds_after")
            if before is not None and after is not None:
                lines.append(f"  - the CPUs' speed (dot_peak.core_speeds), before: {before.line()}; "
                             f"after: {after.line()}")
    lines.append("")
    head = ["concurrency"]
    for name in names:
        head += [f"{name} tok/s", f"{name} vs c={args.concurrency[0]}"]
    for name in names[1:]:
        head.append(f"realizar/{name}")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r["server"]: _tok_s(r, args.concurrency[0]) for r in results}
    for c in args.concurrency:
        row = [str(c)]
        for r in results:
            v = _tok_s(r, c)
            warn = " (!)" if r["levels"].get(c, {}).get("length_warning") else ""
            row += [fmt(v) + warn, _ratio(v, base[r["server"]])]
        mine = _tok_s(results[0], c)
        for r in results[1:]:
            row.append(_ratio(mine, _tok_s(r, c)))
        lines.append("| " + " | ".join(row) + " |")
    if any(s.get("length_warning") for r in results for s in r["levels"].values()):
        lines += ["", "(!) output lengths were not all exactly the requested length; see the details."]
    lines += ["", "| server | c | requests | failed | out len min..max | TTFT p50 / p99 ms | ITL p50 / p99 ms "
              f"| E2E p50 ms | RSS MiB peak / {SETTLE_S:g} s after |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for c in args.concurrency:
            s = r["levels"].get(c)
            if not s:
                continue
            lines.append(
                f"| {r['server']} | {c} | {s['requests']} | {s['failed']} | {s['output_len_min']}..{s['output_len_max']}"
                f" ({s['tokens_from']}) | {fmt(s['ttft_p50_ms'], 0)} / {fmt(s['ttft_p99_ms'], 0)} "
                f"| {fmt(s['itl_p50_ms'])} / {fmt(s['itl_p99_ms'])} | {fmt(s['e2e_p50_ms'], 0)} "
                f"| {fmt(s.get('rss_peak_mib'), 0)} / {fmt(s['rss_mib'], 0)} |")
    errors = [(r["server"], c, s["errors"]) for r in results for c, s in r["levels"].items() if s["errors"]]
    for name, c, errs in errors:
        lines.append(f"\n{name} at concurrency {c}: errors {errs}")
    return "\n".join(lines) + "\n"


def ratios_by_round(rounds: list[list[dict[str, Any]]], args: argparse.Namespace) -> str:
    """realizar's tok/s and each realizar/peer ratio at each level, round by round, and their medians."""
    names = [r["server"] for r in rounds[0]]
    head = ["concurrency", "realizar tok/s by round", "median"]
    for name in names[1:]:
        head += [f"realizar/{name} by round", "median"]
    lines = [f"Every server {len(rounds)} times, in turn:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in args.concurrency:
        mine = [_tok_s(results[0], c) for results in rounds]
        row = [str(c), ", ".join(fmt(v) for v in mine), fmt(_median(mine))]
        for i in range(1, len(names)):
            peer = [_tok_s(results[i], c) for results in rounds]
            ratios = [m / p if m is not None and p else None for m, p in zip(mine, peer, strict=True)]
            middle = _median(ratios)
            row += [", ".join("n/a" if r is None else f"{r:.2f}x" for r in ratios),
                    "n/a" if middle is None else f"{middle:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _median(values: list[float | None]) -> float | None:
    """The median of the values that exist (None when none does)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_results(rounds: list[list[dict[str, Any]]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One result per server whose tok/s at each level is its median over the rounds (for the plot)."""
    out = []
    for i, first in enumerate(rounds[0]):
        levels = {}
        for c in args.concurrency:
            value = _median([_tok_s(results[i], c) for results in rounds])
            if value is not None:
                levels[c] = {"output_tok_s": value, "failed": 0, "requests": 1}
        out.append({"server": first["server"], "levels": levels})
    return out


SETTLE_S = 1.0  # seconds between the end of a level and the RSS read after it


class RssPeak:
    """The largest RSS of a server (and its children) sampled every 0.2 s while the block runs."""

    def __init__(self, server: ManagedServer) -> None:
        self.server, self.mib = server, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.mib = max(self.mib, self.server.rss_mib())
            if self._done.wait(0.2):
                return

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.mib = max(self.mib, self.server.rss_mib())


def plot(results: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """Output tok/s against concurrency, one line per server, on a log-2 concurrency axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in results:
        points = [(c, _tok_s(r, c)) for c in args.concurrency]
        xs = [c for c, v in points if v is not None]
        if xs:
            ax.plot(xs, [v for _, v in points if v is not None], marker="o", label=r["server"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.concurrency, [str(c) for c in args.concurrency])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{args.prompt_len}-token prompts, {args.output_len} output tokens\n{machine_line()}", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_signal_handlers()
    machine_line()  # the load average at the start
    rounds = []
    for k in range(args.rounds):
        if args.rounds > 1:
            print(f"round {k + 1} of {args.rounds}", file=sys.stderr, flush=True)
        rounds.append([measure_server(name, args) for name in ["realizar", *args.peers]])
        print((f"## Round {k + 1}\n\n" if args.rounds > 1 else "") + markdown(rounds[-1], args), flush=True)
    if args.rounds > 1:
        print(ratios_by_round(rounds, args))
    if args.json:
        document: dict[str, Any] = {"machine": machine_line(), "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "results": rounds[0]}
        if args.rounds > 1:
            document["rounds"] = rounds
        args.json.write_text(json.dumps(document, indent=2, default=lambda o: asdict(o) if is_dataclass(o) and not
                                        isinstance(o, type) else str(o)))
    if args.plot:
        plot(median_results(rounds, args) if args.rounds > 1 else rounds[0], args, args.plot)
    return 1 if any("error" in results[0] for results in rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
