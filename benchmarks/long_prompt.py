"""Long prompts: prefill speed, and what one long prefill does to the other requests.

Usage (from the repository root)::

    # realizar, and llama.cpp's llama-server when its binary exists (LLAMA_SERVER_BIN)
    .venv/bin/python benchmarks/long_prompt.py

    # a quick run: a 2,000-token prompt, realizar alone
    .venv/bin/python benchmarks/long_prompt.py --prompt-len 2000 --no-peer

For each server, started one at a time on 127.0.0.1 with ``--threads`` compute threads:

(a) **prefill alone**: the TTFT of one ``--prompt-len``-token prompt (streaming
    ``/v1/completions``, 2 output tokens), on an idle server; prefill speed = prompt
    tokens / TTFT.
(b) **a short request during a long prefill**: a new prompt of the same length is sent;
    ``--short-delay`` seconds later a short request (``--short-len`` words, 4 tokens) is
    sent, then up to ``--short-requests`` in all, one after another, while the long prompt
    has no first token yet. Their TTFTs are reported (target: the worst at most 2 s).
(c) **streams during a long prefill**: in the same run as (b), two streams (short prompts,
    ``ignore_eos``) were started ``--baseline`` seconds before the long prompt. Their
    inter-token gaps that ended before the long prompt was sent are the unloaded ITL; those
    that ended between its send and its first token are the ITL during the prefill
    (target: p99 during at most 5x the unloaded p99). The streams are closed once the long
    prompt has its first token.

The long prompt's text is trimmed until realizar's ``/tokenize`` counts exactly
``--prompt-len`` tokens, and every server gets the same texts (the prompt tokens each server
reports are printed). Each long prompt is new (no prefix or slot cache can serve it).
Servers: ``benchmarks/common.py`` (``realizar_spec``, ``llamacpp_spec``); realizar gets
``--max-model-len`` of the prompt plus room, llama-server 4 slots of that context each.
Every request count is fixed, so a run is bounded: two long prefills per server.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import (
    LLAMA_SERVER_BIN,
    ManagedServer,
    ServerSpec,
    ServerStartError,
    completion_body,
    completion_client,
    fmt,
    install_signal_handlers,
    llamacpp_spec,
    load_line,
    machine_line,
    percentile,
    prompt_text,
    realizar_spec,
    run,
    server_lines,
    stream_completion,
    table_head,
    ttft_s,
    warm_up,
    workload_for,
)

from realizar.loadtest.stats import FailureClass, RequestRecord

MAX_STREAM_TOKENS = 4096  # realizar's max_tokens limit; streams are closed once the long prompt has its first token
SHORT_TOKENS = 4
LONG_TOKENS = 2
LONG_TIMEOUT_S = 1800.0
TARGET_SHORT_TTFT_S = 2.0
TARGET_ITL_P99_RATIO = 5.0
TARGET_PREFILL_RATIO = 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=8000, help="tokens of the long prompt (default 8000)")
    p.add_argument("--short-len", type=int, default=32, help="words of the short prompts (default 32)")
    p.add_argument("--short-requests", type=int, default=3,
                   help="short requests sent during the long prefill, at most (default 3)")
    p.add_argument("--short-delay", type=float, default=1.0,
                   help="seconds after the long prompt before the first short request, and between them (default 1)")
    p.add_argument("--baseline", type=float, default=5.0,
                   help="seconds the two streams run before the long prompt is sent (default 5)")
    p.add_argument("--threads", type=int, default=2,
                   help="compute threads of every server (default 2): realizar's --threads, llama.cpp's -t/-tb")
    p.add_argument("--dtype", default="auto", help="realizar --dtype (default auto)")
    p.add_argument("--realizar-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for realizar serve (repeatable)")
    p.add_argument("--no-peer", action="store_true", help="realizar alone, even when llama-server exists")
    p.add_argument("--log-dir", type=Path, default=None, help="keep server logs here (default: the temp dir)")
    p.add_argument("--json", type=Path, help="write every measurement here as JSON")
    return p


def context_len(args: argparse.Namespace) -> int:
    """Each server's context per sequence: the long prompt plus room for its output, and at
    least 2,048 tokens, so that the streams can outlast a short long-prompt's prefill."""
    return max(args.prompt_len + 64, 2048)


def stream_tokens(args: argparse.Namespace) -> int:
    """The streams' max_tokens: as many as their context holds (a short prompt is at most about
    two tokens a word)."""
    return min(MAX_STREAM_TOKENS, context_len(args) - 2 * args.short_len - 16)


def specs(args: argparse.Namespace) -> list[ServerSpec | str]:
    """realizar, then llama.cpp when it can run; a string says why a server is left out."""
    out: list[ServerSpec | str] = [realizar_spec(
        dtype=args.dtype, threads=args.threads, output_len=stream_tokens(args),
        extra_args=["--max-model-len", str(context_len(args)), "--max-num-seqs", "8", *args.realizar_arg])]
    if args.no_peer:
        return out
    if not LLAMA_SERVER_BIN.exists():
        return [*out, f"llama.cpp: no llama-server at {LLAMA_SERVER_BIN} (set LLAMA_SERVER_BIN)"]
    # 4 slots: the long prompt, the short requests and the two streams each have one
    out.append(llamacpp_spec(threads=args.threads, parallel=4, ctx_per_slot=context_len(args),
                             output_len=stream_tokens(args), native=True))
    return out


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310 (127.0.0.1)
        return dict(json.loads(resp.read()))


def long_prompts(url: str, args: argparse.Namespace) -> list[str]:
    """Two long prompts of exactly ``--prompt-len`` tokens by realizar's tokenizer (the same
    GGUF vocabulary as the peer's): random words, trimmed until the count is right."""
    texts = []
    for index in (0, 1):
        words = prompt_text(10_000 + index, args.prompt_len + 200).split(" ")
        count = args.prompt_len
        for _ in range(20):
            n = int(_post_json(url + "/tokenize", {"text": " ".join(words[:count])})["num_tokens"])
            if n == args.prompt_len:
                break
            count -= n - args.prompt_len
        texts.append(" ".join(words[:count]))
    return texts


def body(server: ManagedServer, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A streaming completion of exactly ``max_tokens`` tokens (the server's own length fields)."""
    assert server.model is not None
    return completion_body(server.model, prompt, max_tokens, server.spec.fixed_length_fields)


def gaps_between(records: list[RequestRecord], start: float, end: float) -> list[float]:
    """The inter-token gaps (ms) of ``records`` that ended in [start, end)."""
    out = []
    for rec in records:
        times = rec.chunk_times or []
        out += [(b - a) * 1e3 for a, b in itertools.pairwise(times) if start <= b < end]
    return out


def _record(rec: RequestRecord) -> dict[str, Any]:
    return {"ok": rec.ok, "ttft_s": ttft_s(rec), "prompt_tokens": rec.input_tokens or None,
            "output_tokens": rec.output_tokens, "error": rec.error}


async def prefill_alone(server: ManagedServer, prompt: str) -> RequestRecord:
    client = completion_client(server.url, 1, LONG_TIMEOUT_S)
    try:
        return await stream_completion(client, body(server, prompt, LONG_TOKENS))
    finally:
        await client.aclose()


async def prefill_under_load(server: ManagedServer, prompt: str, args: argparse.Namespace) -> dict[str, Any]:
    """(b) and (c): two streams, then the long prompt, then short requests while it prefills."""
    stop = asyncio.Event()
    client = completion_client(server.url, 16, LONG_TIMEOUT_S)
    try:
        streams = [asyncio.create_task(stream_completion(
            client, body(server, prompt_text(20_000 + i, args.short_len), stream_tokens(args)), i, stop=stop))
            for i in range(2)]
        await asyncio.sleep(args.baseline)
        long_sent = time.perf_counter()
        long_task = asyncio.create_task(stream_completion(client, body(server, prompt, LONG_TOKENS), 2))
        shorts: list[RequestRecord] = []
        await asyncio.sleep(args.short_delay)
        while len(shorts) < args.short_requests and not long_task.done():
            shorts.append(await stream_completion(
                client, body(server, prompt_text(30_000 + len(shorts), args.short_len), SHORT_TOKENS), 3 + len(shorts)))
            if not long_task.done():
                await asyncio.sleep(args.short_delay)
        long_rec = await long_task
        stop.set()
        stream_recs = list(await asyncio.gather(*streams))
    finally:
        await client.aclose()
    long_first = long_rec.first_token if long_rec.first_token is not None else long_rec.end
    before = gaps_between(stream_recs, 0.0, long_sent)
    during = gaps_between(stream_recs, long_sent, long_first)
    short_ttft = [t for r in shorts if (t := ttft_s(r)) is not None]
    return {
        "long": _record(long_rec), "shorts": [_record(r) for r in shorts], "streams": [_record(r) for r in stream_recs],
        "short_ttft_max_s": max(short_ttft) if short_ttft else None,
        "short_ttft_p50_s": percentile(short_ttft, 50),
        "itl_unloaded_p50_ms": percentile(before, 50), "itl_unloaded_p99_ms": percentile(before, 99),
        "itl_during_p50_ms": percentile(during, 50), "itl_during_p99_ms": percentile(during, 99),
        "itl_during_max_ms": max(during) if during else None,
        "gaps_unloaded": len(before), "gaps_during": len(during),
        # the streams are cut on purpose (a truncated record): only another failure counts
        "failed": sum(not r.ok for r in [long_rec, *shorts])
                  + sum(r.failure not in (None, FailureClass.TRUNCATED_STREAM) for r in stream_recs),
    }


def measure(spec: ServerSpec, args: argparse.Namespace, texts: list[str] | None) -> tuple[dict[str, Any], list[str] | None]:
    """One server: (a), then (b) and (c). ``texts``: the long prompts, made on the first server."""
    out: dict[str, Any] = {"server": spec.name, "note": spec.note}
    try:
        with ManagedServer(spec, args.log_dir) as server:
            out["ready_s"] = server.ready_s
            if texts is None:
                texts = long_prompts(server.url, args)
            warm_up(server, workload_for(server, prompt_len=args.short_len, output_len=16))
            print(f"[{spec.name}] (a) one {args.prompt_len}-token prompt alone ...", file=sys.stderr, flush=True)
            alone: RequestRecord = run(prefill_alone(server, texts[0]))
            out["alone"] = _record(alone)
            alone_ttft = ttft_s(alone)
            if alone.ok and alone_ttft:
                out["prefill_s"] = alone_ttft
                out["prefill_tok_s"] = (alone.input_tokens or args.prompt_len) / alone_ttft
            print(f"[{spec.name}] (a) TTFT {fmt(alone_ttft, 2)} s, {alone.input_tokens} prompt tokens "
                  f"{alone.error}", file=sys.stderr, flush=True)
            print(f"[{spec.name}] (b, c) the same length again, with 2 streams and short requests ...",
                  file=sys.stderr, flush=True)
            out["loaded"] = run(prefill_under_load(server, texts[1], args))
            loaded = out["loaded"]
            print(f"[{spec.name}] (b) short TTFT max {fmt(loaded['short_ttft_max_s'], 2)} s; (c) ITL p99 "
                  f"{fmt(loaded['itl_unloaded_p99_ms'])} -> {fmt(loaded['itl_during_p99_ms'])} ms; "
                  f"{loaded['failed']} failed", file=sys.stderr, flush=True)
    except (ServerStartError, RuntimeError, OSError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out, texts


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def _get(result: dict[str, Any], *keys: str) -> Any:
    value: Any = result
    for key in keys:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


def markdown(results: list[dict[str, Any]], skipped: list[str], args: argparse.Namespace) -> str:
    mine = results[0]
    peer = results[1] if len(results) > 1 else None
    lines = [f"Machine: {machine_line()}; {load_line()}",
             f"Long prompt: {args.prompt_len} tokens; short requests: {args.short_len} words; "
             f"{args.threads} compute threads per server; streaming /v1/completions on 127.0.0.1", ""]
    lines += server_lines(results)
    lines += [f"- {why}" for why in skipped]
    names = [r["server"] for r in results]
    lines += table_head(["metric", *names] + ([f"{names[0]} / {names[1]}"] if peer else []))
    rows: list[tuple[str, tuple[str, ...], int]] = [
        ("(a) prefill alone: TTFT s", ("prefill_s",), 2),
        ("(a) prefill speed, prompt tok/s", ("prefill_tok_s",), 0),
        ("(b) short-request TTFT during the prefill, p50 s", ("loaded", "short_ttft_p50_s"), 2),
        ("(b) short-request TTFT during the prefill, max s", ("loaded", "short_ttft_max_s"), 2),
        ("(c) ITL of 2 streams, unloaded p50 ms", ("loaded", "itl_unloaded_p50_ms"), 1),
        ("(c) ITL of 2 streams, unloaded p99 ms", ("loaded", "itl_unloaded_p99_ms"), 1),
        ("(c) ITL during the prefill, p50 ms", ("loaded", "itl_during_p50_ms"), 1),
        ("(c) ITL during the prefill, p99 ms", ("loaded", "itl_during_p99_ms"), 1),
        ("(c) ITL during the prefill, max ms", ("loaded", "itl_during_max_ms"), 1),
        ("(c) long prompt's TTFT with the streams, s", ("loaded", "long", "ttft_s"), 2),
    ]
    for label, keys, digits in rows:
        values = [_get(r, *keys) for r in results]
        row = [label, *(fmt(v, digits) for v in values)]
        if peer:
            row.append(_ratio(values[0], values[1]))
        lines.append("| " + " | ".join(row) + " |")

    def itl_ratio(r: dict[str, Any]) -> float | None:
        during, before = _get(r, "loaded", "itl_during_p99_ms"), _get(r, "loaded", "itl_unloaded_p99_ms")
        return during / before if during is not None and before else None

    short = _get(mine, "loaded", "short_ttft_max_s")
    speed, peer_speed = _get(mine, "prefill_tok_s"), _get(peer, "prefill_tok_s") if peer else None
    ratio = itl_ratio(mine)
    lines += ["", "| target | realizar | met |", "|---|---|---|",
              f"| short-request TTFT during the prefill <= {TARGET_SHORT_TTFT_S:g} s (worst) | {fmt(short, 2)} s | "
              f"{_verdict(None if short is None else short <= TARGET_SHORT_TTFT_S)} |",
              f"| ITL p99 during the prefill <= {TARGET_ITL_P99_RATIO:g}x unloaded p99 | "
              f"{'n/a' if ratio is None else f'{ratio:.1f}x'} | "
              f"{_verdict(None if ratio is None else ratio <= TARGET_ITL_P99_RATIO)} |",
              f"| prefill speed >= {TARGET_PREFILL_RATIO:g}x llama.cpp's | {_ratio(speed, peer_speed)} | "
              f"{_verdict(None if speed is None or not peer_speed else speed / peer_speed >= TARGET_PREFILL_RATIO)} |"]
    if peer is not None and itl_ratio(peer) is not None:
        lines.append(f"\n{peer['server']}: ITL p99 during / unloaded {itl_ratio(peer):.1f}x, short-request TTFT "
                     f"max {fmt(_get(peer, 'loaded', 'short_ttft_max_s'), 2)} s.")
    for r in results:
        failed = _get(r, "loaded", "failed")
        if failed:
            lines.append(f"\n{r['server']}: {failed} request(s) failed: "
                         f"{[x['error'] for x in [r['loaded']['long'], *r['loaded']['shorts'], *r['loaded']['streams']] if x['error']]}")
        prompt_tokens = _get(r, "alone", "prompt_tokens")
        if prompt_tokens is not None and prompt_tokens != args.prompt_len:
            lines.append(f"\n{r['server']} counted {prompt_tokens} prompt tokens (realizar's tokenizer: {args.prompt_len}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prompt_len < 16 or args.short_requests < 0 or args.baseline <= 0 or args.short_delay < 0:
        print("--prompt-len >= 16, --short-requests >= 0, --baseline > 0 and --short-delay >= 0", file=sys.stderr)
        return 2
    install_signal_handlers()
    machine_line()  # the load average at the start
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    texts: list[str] | None = None
    for spec in specs(args):
        if isinstance(spec, str):
            skipped.append(spec)
            continue
        result, texts = measure(spec, args, texts)
        results.append(result)
        if texts is None:  # realizar did not start: no prompt of the right length for the peer
            break
    print(markdown(results, skipped, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "results": results,
            "skipped": skipped}, indent=2, default=str))
    return 1 if "error" in results[0] else 0


if __name__ == "__main__":
    sys.exit(main())
