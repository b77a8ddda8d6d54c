"""The ``realizar`` command: serve, generate, info and loadtest."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from realizar import __version__
from realizar.config import DEFAULT_MAX_TOKENS, KV_CACHE_DTYPES, EngineConfig, ServerConfig


class CLIError(Exception):
    """A user mistake reported as one sentence, with exit status 1."""


def _model_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true",
                        help="the default model that ships with the install (SmolLM2-135M-Instruct, Q4_1)")
    source.add_argument("--model", metavar="PATH", help="a .gguf file or a Hugging Face model directory")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: measured at start-up (float32 on CPUs without native bf16)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="what the KV cache stores. auto: float16 on the CPU kernels (half the memory; passed the "
                        "quality gate against float32), except with --dtype float32, which is float32 throughout; "
                        "the model's dtype elsewhere. int8: a quarter of float32's memory, with a scale per token "
                        "and KV head; below the quality gate, never auto's choice (default %(default)s)")


def _engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="sequences in the running batch (default %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="tokens computed per engine step, prefill chunks included; beside decodes the prefill chunks take "
                        "half of it at most (default %(default)s)")
    p.add_argument("--long-prefill-token-threshold", type=int, default=d.long_prefill_token_threshold,
                   help="most tokens of one prompt computed in a step shared with decodes (a prompt whose "
                        "rest fits in twice that goes whole); smaller keeps inter-token latency steady while "
                        "long prompts prefill (default %(default)s)")
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests allowed to wait beyond the running batch before 503, those not yet "
                        "seen by the engine thread included (default %(default)s)")
    p.add_argument("--max-queued-tokens", type=int, default=d.max_queued_tokens,
                   help="prompt tokens allowed to wait for a seat before 503 (default %(default)s)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length, prompt plus output (default: the model's, at most 8192)")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV-cache blocks of 16 tokens (default: sized from memory)")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="compute every prompt in full instead of reusing the cached K/V of a prefix an "
                        "earlier request computed (prefix caching is on by default)")
    p.add_argument("--prefix-cache-mib", type=int, default=-1 if d.prefix_cache_bytes is None else d.prefix_cache_bytes >> 20,
                   metavar="MIB", help="CPU memory the cached K/V of prefixes no running request holds may keep; "
                        "past it the least recently used are evicted rather than new memory touched, and given "
                        "back when the server is idle; -1: no bound (default %(default)s)")
    _threads_arg(p)


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model's compiled kernels (default: one per core); "
                        "torch's other ops get one fewer, at least 1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realizar", description=__doc__)
    parser.add_argument("--version", action="version", version=f"realizar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a model over HTTP (native and OpenAI APIs)")
    _model_args(s)
    sd = ServerConfig()
    s.add_argument("-H", "--host", default=sd.host, help="address to bind (default %(default)s)")
    s.add_argument("-p", "--port", type=int, default=sd.port, help="port (default %(default)s)")
    s.add_argument("--api-key", default=os.environ.get("REALIZAR_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $REALIZAR_API_KEY)")
    _engine_args(s)
    s.add_argument("--request-timeout", type=float, default=sd.request_timeout,
                   help="seconds a request may spend queued and generating before 504; a response still "
                        "unfinished 2 s later (its client does not read) loses its connection (default %(default)s)")
    s.add_argument("--shutdown-timeout", type=float, default=sd.shutdown_timeout,
                   help="seconds SIGTERM waits for in-flight requests, then aborts them and drops "
                        "connections whose clients do not read (default %(default)s)")
    s.add_argument("--max-body-bytes", type=int, default=sd.max_body_bytes,
                   help="largest request body before 413 (default %(default)s)")
    s.add_argument("--max-batch-size", type=int, default=sd.max_batch_size,
                   help="most prompts or texts in one batch request (default %(default)s)")
    s.add_argument("--max-tokens-limit", type=int, default=sd.max_tokens_limit,
                   help="largest max_tokens a request may ask for (default %(default)s)")
    s.add_argument("--max-messages", type=int, default=sd.max_messages,
                   help="most messages in one chat request before 400 (default %(default)s)")
    c = s.add_argument_group("connection limits", "what a client may hold before its request reaches the app")
    c.add_argument("--max-connections", type=int, default=sd.max_connections,
                   help="open HTTP connections; past it new ones get 503 and are closed. Kept below the "
                        "file descriptor limit, whose soft value is raised to the hard one (default %(default)s)")
    c.add_argument("--idle-timeout", type=float, default=sd.idle_timeout,
                   help="seconds a connection may wait for a request's first byte, new or kept alive "
                        "(default %(default)s)")
    c.add_argument("--header-timeout", type=float, default=sd.header_timeout,
                   help="seconds from a request's first byte to the end of its headers, else 408 "
                        "(default %(default)s)")
    c.add_argument("--body-timeout", type=float, default=sd.body_timeout,
                   help="seconds from the end of the headers to the end of the body, else 408 (default %(default)s)")
    c.add_argument("--max-header-bytes", type=int, default=sd.max_header_bytes,
                   help="request line and headers together, else 431 (default %(default)s)")
    c.add_argument("--max-headers", type=int, default=sd.max_headers,
                   help="headers in one request, else 431 (default %(default)s)")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow cross-origin requests from ORIGIN (repeatable; CORS is off by default)")
    s.add_argument("--allow-special-tokens-in-content", action="store_true",
                   help="read special tokens typed in prompts and chat messages (<|im_start|>) as control tokens; "
                        "by default they are text, and only the chat template's markup makes control tokens")
    s.add_argument("--served-model-name", nargs="+", default=[], metavar="NAME",
                   help="the model's names in the API: the first is the id /v1/models reports, every one is "
                        "accepted in requests (default: the model's own name)")
    s.add_argument("--metrics-compat", choices=("vllm",), default=None,
                   help="also expose /metrics series under another server's names (vllm: "
                        "vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc), "
                        "for dashboards and autoscalers built for it")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    s.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    r = s.add_argument_group("Ray cluster", "serve from several engine replicas on Ray Serve (needs the "
                             "'realizar[ray]' extra; see docs/scale-out.md)")
    r.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="engine replicas, each holding one model copy (starts a local Ray without --ray-address)")
    r.add_argument("--min-replicas", type=int, default=None, metavar="N",
                   help="autoscale between --min-replicas and --max-replicas on the requests ongoing per replica")
    r.add_argument("--max-replicas", type=int, default=None, metavar="N")
    r.add_argument("--target-ongoing-requests", type=float, default=None, metavar="N",
                   help="autoscaling target of requests per replica, running and queued (default: half of "
                        "--max-num-seqs)")
    r.add_argument("--upscale-delay", type=float, default=5.0, metavar="S",
                   help="seconds of load over the target before a replica is added (default %(default)s)")
    r.add_argument("--downscale-delay", type=float, default=60.0, metavar="S",
                   help="seconds of load under the target before a replica is removed (default %(default)s)")
    r.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="join this Ray cluster ('auto': the one this machine belongs to) instead of starting one")
    r.add_argument("--replica-cpus", type=float, default=None, metavar="N",
                   help="Ray CPUs each replica reserves (default: --threads, else 1)")

    g = sub.add_parser("generate", help="generate text once, without a server")
    _model_args(g)
    _threads_arg(g)
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS["/generate"],
                   help="as /generate's default (%(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")

    sub.add_parser("info", help="versions, devices and the default model")

    # everything after `loadtest` goes to realizar.loadtest.cli's own parser, so that its usage errors exit 4
    # (argparse's 2 means "regression" there); the load tester is imported only when run (0.2 s of a server's start)
    lt = sub.add_parser("loadtest", help="load-test a server: the seed's suite, compare, llm, calibrate",
                        description="see `realizar loadtest --help`", add_help=False,
                        prefix_chars="\x00")  # no option prefix: every argument lands in loadtest_argv
    lt.add_argument("loadtest_argv", nargs=argparse.REMAINDER)
    return parser


def resolve_model_path(args: argparse.Namespace) -> Path:
    from realizar.loading import ModelNotFoundError, default_model_path

    if args.demo:
        try:
            return default_model_path()
        except ModelNotFoundError as exc:
            raise CLIError(str(exc)) from None
    path = Path(args.model).expanduser()
    if not path.exists():
        raise CLIError(f"The model path {path} does not exist; pass a .gguf file or a Hugging Face "
                       "model directory to --model, or use --demo.")
    return path


def engine_config(args: argparse.Namespace) -> EngineConfig:
    fields = dict(device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype)
    for name in ("max_num_seqs", "max_num_batched_tokens", "long_prefill_token_threshold",
                 "max_queued_requests", "max_queued_tokens", "max_model_len", "num_kv_blocks", "threads",
                 "enable_prefix_caching"):
        if hasattr(args, name):
            fields[name] = getattr(args, name)
    if getattr(args, "prefix_cache_mib", None) is not None:
        mib = args.prefix_cache_mib
        if mib < -1:
            raise CLIError("Invalid engine setting: --prefix-cache-mib must be >= 0, or -1 for no bound.")
        fields["prefix_cache_bytes"] = None if mib == -1 else mib << 20
    try:
        return EngineConfig(**fields)  # type: ignore[arg-type]
    except ValueError as exc:
        raise CLIError(f"Invalid engine setting: {exc}.") from None


def _banner(url: str, model_id: str, load_seconds: float, extra: str, endpoints: list[str]) -> str:
    lines = [f"realizar {__version__} serving {model_id} at {url} (loaded in {load_seconds:.1f} s{extra})",
             "Endpoints:"]
    lines += [f"  {e}" for e in endpoints]
    lines.append("Try:")
    lines.append(f"  curl -s {url}/generate -H 'Content-Type: application/json' "
                 "-d '{\"prompt\": \"Hello\", \"max_tokens\": 16}'")
    return "\n".join(lines)


def cmd_serve(args: argparse.Namespace) -> int:
    from realizar.engine.engine import AsyncEngine
    from realizar.server.runner import serve

    path = resolve_model_path(args)
    econfig = engine_config(args)
    try:
        sconfig = ServerConfig(
            host=args.host, port=args.port, api_key=args.api_key or None,
            max_tokens_limit=args.max_tokens_limit, max_batch_size=args.max_batch_size,
            max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
            shutdown_timeout=args.shutdown_timeout, cors_origins=tuple(args.cors_origin),
            access_log=not args.no_access_log,
            allow_special_tokens_in_content=args.allow_special_tokens_in_content, max_messages=args.max_messages,
            max_connections=args.max_connections, idle_timeout=args.idle_timeout,
            header_timeout=args.header_timeout, body_timeout=args.body_timeout,
            max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
            served_model_names=tuple(args.served_model_name), metrics_compat=args.metrics_compat)
    except ValueError as exc:
        raise CLIError(f"Invalid server setting: {exc}.") from None
    if _wants_cluster(args):
        return _serve_cluster(args, path, econfig, sconfig)
    holder: dict[str, AsyncEngine] = {}

    def factory() -> AsyncEngine:
        engine = AsyncEngine.from_path(path, econfig)
        holder["engine"] = engine
        return engine

    def ready(url: str, endpoints: list[str]) -> None:
        engine = holder["engine"]
        extra = f", {engine.compute_path}"
        print(_banner(url, engine.model_id, engine.load_seconds, extra, endpoints), flush=True)

    # What this process has imported lives as long as it: out of the collector's sight now, the load's collections
    # (and the engine's at its start) scan only what the load allocates, 1 ms instead of 55-100 (BENCHMARKS.md)
    gc.freeze()
    print(f"realizar: loading {path} ...", flush=True)
    return serve(factory, sconfig, log_level=args.log_level, on_ready=ready)


def _wants_cluster(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None for name in ("replicas", "min_replicas", "max_replicas", "ray_address"))


def _serve_cluster(args: argparse.Namespace, path: Path, econfig: EngineConfig, sconfig: ServerConfig) -> int:
    """``serve`` on Ray Serve: the same model, engine and server settings, in each of several replicas."""
    import dataclasses
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise CLIError("--replicas and --ray-address need Ray Serve: pip install 'realizar[ray]'.")
    from realizar.cluster.launch import ClusterOptions, serve_cluster
    from realizar.cluster.replica import ReplicaSpec

    autoscale = args.min_replicas is not None or args.max_replicas is not None
    if autoscale and args.replicas is not None:
        raise CLIError("Pass either --replicas or --min-replicas/--max-replicas, not both.")
    low = args.min_replicas if args.min_replicas is not None else 1
    try:
        options = ClusterOptions(
            replicas=None if autoscale else (args.replicas or 1),
            min_replicas=low, max_replicas=args.max_replicas if args.max_replicas is not None else max(low, 1),
            target_ongoing_requests=args.target_ongoing_requests or max(1.0, econfig.max_num_seqs / 2),
            upscale_delay_s=args.upscale_delay, downscale_delay_s=args.downscale_delay,
            replica_cpus=args.replica_cpus if args.replica_cpus is not None else float(econfig.threads or 1))
    except ValueError as exc:
        raise CLIError(f"Invalid cluster setting: {exc}.") from None
    # the front checks the API key; the replicas are reached only through it
    spec = ReplicaSpec(str(path), econfig, dataclasses.replace(sconfig, api_key=None))
    print(f"realizar: starting {path} on Ray ...", flush=True)
    return serve_cluster(spec, options, api_key=sconfig.api_key, ray_address=args.ray_address,
                         log_level=args.log_level)


def cmd_generate(args: argparse.Namespace) -> int:
    from realizar.engine.engine import AsyncEngine
    from realizar.request import Request, SamplingParams

    path = resolve_model_path(args)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=args.seed, max_tokens=args.max_tokens)
    except ValueError as exc:
        raise CLIError(f"Invalid sampling setting: {exc}.") from None
    from realizar.loading import ModelLoadError

    try:
        engine = AsyncEngine.from_path(path, engine_config(args))
    except (ModelLoadError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    print(f"[loaded {engine.model_id} in {engine.load_seconds:.1f} s: {engine.compute_path}]", file=sys.stderr)
    if args.chat:
        prompt_ids = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = engine.tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise CLIError("The prompt is empty; pass some text to generate from.")

    async def run() -> None:
        await engine.start()
        try:
            detok = engine.tokenizer.detokenizer(prompt_ids)
            pieces: list[str] = []
            async for out in engine.submit(Request(prompt_ids, params)):
                if out.token_id is not None and not (out.finished and out.token_id in engine.tokenizer.eos_token_ids):
                    piece = detok.step(out.token_id)
                    pieces.append(piece)
                    if args.stream:
                        print(piece, end="", flush=True)
                if out.finished and out.error:
                    raise CLIError(f"Generation failed: {out.error}.")
            tail = detok.flush()
            print(tail if args.stream else "".join(pieces) + tail)
        finally:
            await engine.stop()

    asyncio.run(run())
    return 0


def cmd_info() -> int:
    import platform

    import torch

    from realizar.loading import ModelNotFoundError, default_model_path

    print(f"realizar {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    from realizar import kernels

    compiled = kernels.load()
    quantized = "GGUF weights kept quantized" if kernels.quantized_weights(torch.device("cpu"), torch.float32) \
        else "GGUF weights dequantized to float32"
    print(f"cpu kernels: {kernels.isa() + ', ' + quantized if compiled else 'not built (pure-torch path)'}")
    if compiled is not None:
        print("amx bf16 tiles: " + (f"on, the fast class's products from {compiled.tile_min_rows(kernels.FAST_NIBBLES)}"
                                    f" rows (Q6_K's from {compiled.tile_min_rows_every_kind})"
                                    if compiled.tiles else f"available, {kernels.tiles_setting()} (REALIZAR_TILES: on, off, "
                                    "or auto, which a server times at its first start)"
                                    if compiled.tiles_available() else "not on this CPU or build"))
    from realizar.engine.engine import dtype_name, resolve_kv_cache_dtype

    kv = dtype_name(resolve_kv_cache_dtype(EngineConfig(), torch.device("cpu"), torch.float32))
    print(f"kv cache on the cpu: {kv} (--kv-cache-dtype auto; float32 with --dtype float32)")
    if torch.cuda.is_available():
        print(f"cuda: {torch.cuda.get_device_name(0)}")
    else:
        print("cuda: not available")
    try:
        path = default_model_path()
        print(f"default model: {path} ({path.stat().st_size / 1e6:.0f} MB)")
    except ModelNotFoundError as exc:
        print(f"default model: missing. {exc}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "info":
            return cmd_info()
        from realizar.loadtest.cli import run as run_loadtest

        return run_loadtest(args)
    except CLIError as exc:
        print(f"realizar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
