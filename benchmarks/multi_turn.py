"""Agent-like conversations with and without prefix caching: TTFT per turn.

Usage (from the repository root)::

    # realizar with prefix caching, then with --no-prefix-caching
    .venv/bin/python benchmarks/multi_turn.py

    # and vLLM with --enable-prefix-caching, then --no-enable-prefix-caching
    .venv/bin/python benchmarks/multi_turn.py --peers vllm --json /tmp/multi_turn.json

The workload is ``realizar loadtest llm --workload multi-turn``'s (``realizar.loadtest.llm``'s
``multi_turn_prompts``, sent by the load tester's own client): ``--conversations`` conversations
share one system prompt of ``--system-prompt-len`` words (about as many tokens), each has
``--turns`` turns of a ``--user-len``-word user message, and every turn's request carries the whole
history before it (the earlier assistant replies are synthetic, ``--output-len`` words, so every
server gets the same requests). All first turns are sent, then all second turns, and so on, through
``/v1/chat/completions`` with ``--concurrency`` streams in flight and ``--output-len`` output tokens
(``ignore_eos``). With prefix caching a turn finds its history's K/V cached (the system prompt from
turn 1 on; the previous turn's whole prompt from turn 3 on, as the synthetic reply differs from the
one the server generated), so its TTFT stays near that of a short prompt; without it every turn
prefills its whole history.

Each configuration gets a fresh server (``benchmarks/common.py``'s ``realizar_spec`` and
``vllm_spec``), a warm-up of short requests, then one run. The report: per turn, prompt tokens,
cached prompt tokens (``usage.prompt_tokens_details.cached_tokens``, where the server reports it)
and TTFT p50 for each configuration, and the turn-``--turns`` TTFT p50 without caching over with
caching (the target: at least 5x).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import (
    ManagedServer,
    ServerSpec,
    ServerStartError,
    fmt,
    install_signal_handlers,
    load_line,
    machine_line,
    realizar_spec,
    run,
    server_lines,
    table_head,
    vllm_spec,
    warm_up,
    workload_for,
)

from realizar.loadtest.config import LoadTestConfig
from realizar.loadtest.llm import LlmWorkload, llm_scenario, multi_turn_prompts, per_turn
from realizar.loadtest.runner import RunOptions, run_scenario
from realizar.loadtest.stats import Slo

TARGET_RATIO = 5.0
REQUEST_TIMEOUT_S = 1800.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system-prompt-len", type=int, default=2000, help="words (~tokens) of the shared system prompt")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8, help="streams in flight (default 8)")
    p.add_argument("--user-len", type=int, default=32, help="words of each user message (default 32)")
    p.add_argument("--output-len", type=int, default=16,
                   help="output tokens per request, and words of the synthetic replies (default 16)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads of every server (default: each server's own)")
    p.add_argument("--dtype", default="auto", help="realizar --dtype (default auto)")
    p.add_argument("--realizar-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for realizar serve (repeatable)")
    p.add_argument("--peers", default="", help="'vllm': also vLLM with and without --enable-prefix-caching")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", type=Path, default=None, help="keep server logs here (default: the temp dir)")
    p.add_argument("--json", type=Path, help="write every measurement here as JSON")
    return p


def max_model_len(args: argparse.Namespace) -> int:
    """Room for the last turn: the history is ~1 token a word; the chat markup and
    multi-token words get the same again for the turns, and 256 for the rest."""
    words = args.system_prompt_len + args.turns * (args.user_len + args.output_len)
    return int(words * 1.25) + 256


def configurations(args: argparse.Namespace) -> list[tuple[str, ServerSpec | str]]:
    """(label, spec) pairs: caching on, then off, per server; a string spec says why it is left out."""
    ctx = max_model_len(args)
    seqs = max(args.concurrency, 1)
    common_args = ["--max-model-len", str(ctx), "--max-num-seqs", str(seqs), *args.realizar_arg]
    out: list[tuple[str, ServerSpec | str]] = [
        ("realizar, prefix caching", realizar_spec(dtype=args.dtype, threads=args.threads,
                                                   output_len=args.output_len, extra_args=common_args)),
        ("realizar, --no-prefix-caching", realizar_spec(dtype=args.dtype, threads=args.threads,
                                                        output_len=args.output_len,
                                                        extra_args=[*common_args, "--no-prefix-caching"])),
    ]
    if "vllm" in [p.strip() for p in args.peers.split(",") if p.strip()]:
        # --enable-prompt-tokens-details: vLLM reports cached prompt tokens only when asked
        for label, flag in (("vllm, --enable-prefix-caching", "--enable-prefix-caching"),
                            ("vllm, --no-enable-prefix-caching", "--no-enable-prefix-caching")):
            try:
                spec: ServerSpec | str = vllm_spec(
                    max_num_seqs=seqs, output_len=args.output_len, ctx_per_seq=ctx, threads=args.threads,
                    max_model_len=ctx, extra_args=[flag, "--enable-prompt-tokens-details"])
            except FileNotFoundError as exc:
                spec = str(exc)
            out.append((label, spec))
    return out


async def conversations(server: ManagedServer, args: argparse.Namespace) -> dict[str, Any]:
    """One run of the multi-turn workload through the load tester; its per-turn table and totals."""
    prompts = multi_turn_prompts(args.conversations, args.turns, args.system_prompt_len, args.user_len,
                                 args.output_len, seed=args.seed)
    workload = LlmWorkload("chat", server.model or "default", tuple(prompts), args.output_len, ignore_eos=True)
    cfg = LoadTestConfig(concurrency=args.concurrency, total_requests=len(prompts), timeout=REQUEST_TIMEOUT_S,
                         base_url=server.url, seed=args.seed)
    result = await run_scenario(llm_scenario(workload, cfg, Slo(), name="multi_turn"),
                                RunOptions(scrape_metrics=False))
    s = result.overall
    return {"turns": per_turn(result), "completed": s.successes, "failed": s.failures,
            "failures_by_class": {k: v for k, v in s.failures_by_class.items() if v},
            "duration_s": s.duration_s, "output_tokens": s.output_tokens, "client_valid": result.valid}


def measure(label: str, spec: ServerSpec, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"config": label, "server": spec.name, "note": spec.note}
    try:
        with ManagedServer(spec, args.log_dir) as server:
            out["ready_s"] = server.ready_s
            warm_up(server, workload_for(server, prompt_len=args.user_len, output_len=args.output_len))
            print(f"[{label}] {args.conversations} conversations x {args.turns} turns ...", file=sys.stderr, flush=True)
            out.update(run(conversations(server, args)))
            last = ttft_p50(out, args.turns)
            print(f"[{label}] turn-{args.turns} TTFT p50 {fmt(last)} ms, {out['failed']} failed, "
                  f"{out['duration_s']:.1f} s", file=sys.stderr, flush=True)
    except (ServerStartError, RuntimeError, OSError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _turn(result: dict[str, Any], turn: int) -> dict[str, Any] | None:
    return next((t for t in result.get("turns", ()) if t["group"] == turn), None)


def ttft_p50(result: dict[str, Any], turn: int) -> float | None:
    t = _turn(result, turn)
    return None if t is None or t["ttft"] is None else float(t["ttft"]["p50_ms"])


def ratios(results: list[dict[str, Any]], turn: int) -> list[tuple[str, float | None]]:
    """Per server: turn ``turn``'s TTFT p50 without caching over with it (results come in on/off pairs)."""
    out = []
    for on, off in zip(results[0::2], results[1::2], strict=False):
        a, b = ttft_p50(on, turn), ttft_p50(off, turn)
        out.append((on["server"], b / a if a and b is not None else None))
    return out


def markdown(results: list[dict[str, Any]], skipped: list[str], args: argparse.Namespace) -> str:
    lines = [f"Machine: {machine_line()}; {load_line()}",
             f"{args.conversations} conversations x {args.turns} turns, {args.system_prompt_len}-word shared system "
             f"prompt, {args.user_len}-word user turns, {args.output_len} output tokens, concurrency "
             f"{args.concurrency}, streaming /v1/chat/completions on 127.0.0.1 (realizar.loadtest's client)", ""]
    lines += server_lines(results, "config")
    lines += [f"- {why}" for why in skipped]
    head = ["turn", "prompt tok"]
    for r in results:
        head += [f"{r['config']}: cached tok", f"{r['config']}: TTFT p50 ms"]
    lines += table_head(head)
    for turn in range(1, args.turns + 1):
        first = next((t for r in results if (t := _turn(r, turn)) is not None), None)
        row = [str(turn), "n/a" if first is None else f"{first['mean_input_tokens']:.0f}"]
        for r in results:
            t = _turn(r, turn)
            cached = None if t is None else t["mean_cached_tokens"]
            row += ["n/a" if cached is None else f"{cached:.0f}", fmt(ttft_p50(r, turn))]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for server, ratio in ratios(results, args.turns):
        verdict = "n/a" if ratio is None else ("met" if ratio >= TARGET_RATIO else "NOT met")
        lines.append(f"- {server}: turn-{args.turns} TTFT p50 without caching / with caching = "
                     f"{'n/a' if ratio is None else f'{ratio:.1f}x'} (target >= {TARGET_RATIO:g}x: {verdict})")
    for r in results:
        if r.get("failed"):
            lines.append(f"- {r['config']}: {r['failed']} request(s) failed: {r['failures_by_class']}")
        if r.get("client_valid") is False:
            lines.append(f"- {r['config']}: the load client was saturated; its numbers are not trustworthy")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.system_prompt_len, args.turns, args.conversations, args.concurrency, args.user_len,
           args.output_len) < 1:
        print("every length and count must be >= 1", file=sys.stderr)
        return 2
    install_signal_handlers()
    machine_line()  # the load average at the start
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    for label, spec in configurations(args):
        if isinstance(spec, str):
            skipped.append(f"{label}: {spec}")
            continue
        results.append(measure(label, spec, args))
    print(markdown(results, skipped, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "results": results,
            "skipped": skipped}, indent=2, default=str))
    return 1 if any("error" in r for r in results if r["server"] == "realizar") else 0


if __name__ == "__main__":
    sys.exit(main())
