"""``realizar loadtest``: the seed's suite, ``compare``, ``llm`` and ``calibrate``.

Exit codes: 0 all targets pass; 1 a target failed; 2 a regression against the
baseline; 3 an invalid run (server unreachable, or the client saturated);
4 a usage error.

The top-level ``realizar`` parser (``realizar.cli``) hands everything after
``loadtest`` to this module's own parser, so that usage errors exit 4
(argparse's default is 2, which here means "regression").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn

from realizar.loadtest.client import ClientKind
from realizar.loadtest.config import DEFAULT_URL, LoadTestConfig
from realizar.loadtest.runner import (
    NoProgress,
    ProgressSink,
    RunOptions,
    ScenarioResult,
    probe,
    run_scenario,
    run_sync,
)
from realizar.loadtest.scenarios import EXTRA_SCENARIO_NAMES, SCENARIO_NAMES, Scenario, seed_scenarios
from realizar.loadtest.targets import Targets, TargetsError

if TYPE_CHECKING:
    from realizar.loadtest.workers import WorkerPool

EXIT_OK, EXIT_TARGET_FAILED, EXIT_REGRESSION, EXIT_INVALID, EXIT_USAGE = 0, 1, 2, 3, 4
SUBCOMMANDS = ("compare", "llm", "calibrate")


class UsageError(Exception):
    """Bad command-line input: exit 4."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(f"{self.prog}: error: {message}")


def _default_url() -> str:
    return os.environ.get("REALIZAR_URL", DEFAULT_URL)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _common_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="FILE", help="write the versioned JSON report here")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report here")
    p.add_argument("--baseline", metavar="FILE", help="compare against this JSON report; exit 2 on regression")
    p.add_argument("--tolerance", type=float, default=10.0, metavar="PCT",
                   help="relative change a regression must exceed (default 10%%)")
    p.add_argument("--client", choices=("auto", "raw", "aiohttp"), default="auto",
                   help="load client: raw asyncio+httptools (auto for http://) or aiohttp (auto for https://)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar on stderr")
    p.add_argument("--no-metrics", action="store_true", help="do not scrape the server's /metrics")
    _worker_options(p)


def _worker_options(p: argparse.ArgumentParser, ray: bool = True) -> None:
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                   help="spread the load client over N worker processes (one schedule, one report; "
                        "default 1: this process)")
    if ray:
        p.add_argument("--ray-address", metavar="ADDR",
                       help="run the N workers as Ray actors on this cluster instead ('auto': the running "
                            "cluster, 'local': start one here, ray://host:port; needs ray installed)")


def build_parser(prog: str = "realizar loadtest") -> _Parser:
    epilog = ("subcommands:\n"
              "  compare BASE.json NEW.json   per-metric deltas with confidence intervals\n"
              "  llm --url URL ...            LLM serving benchmark (OpenAI API, streaming)\n"
              "  calibrate                    this client's own ceiling (req/s, SSE events/s)\n"
              f"scenarios: {', '.join(SCENARIO_NAMES)} (default: all seven); opt-in: "
              f"{', '.join(EXTRA_SCENARIO_NAMES)}\n"
              "exit codes: 0 pass, 1 target failed, 2 regression, 3 invalid run, 4 usage error")
    p = _Parser(prog=prog, description="Run the seven load-test scenarios against a server.",
                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=_default_url(), help="server base URL (default $REALIZAR_URL or %(default)s)")
    p.add_argument("--scenario", action="append", choices=SCENARIO_NAMES + EXTRA_SCENARIO_NAMES, metavar="NAME",
                   help="run only this scenario (repeatable)")
    p.add_argument("--targets", metavar="FILE", help="JSON targets overriding the seed's defaults")
    p.add_argument("--scale", type=_positive_float, default=1.0, metavar="X",
                   help="multiply request counts and durations by X (e.g. 0.1 for CI)")
    p.add_argument("--concurrency", type=_positive_int, help="override concurrency (single-phase scenarios)")
    p.add_argument("--requests", type=_positive_int, help="override total requests (single-phase scenarios)")
    p.add_argument("--timeout", type=_positive_float, help="override the request timeout in seconds")
    p.add_argument("--arrival", choices=("closed", "constant", "poisson", "gamma"),
                   help="load model for single-phase scenarios (open loop needs --rate)")
    p.add_argument("--rate", type=_positive_float, help="arrival rate (req/s) for open loop or pacing")
    _common_output(p)
    return p


def build_compare_parser(prog: str = "realizar loadtest compare") -> _Parser:
    p = _Parser(prog=prog, description="Compare two JSON reports: deltas, noise bands, verdicts. "
                "Exit 2 on a regression, 4 when the configurations differ (unless allowed).")
    p.add_argument("base", help="baseline JSON report")
    p.add_argument("new", help="new JSON report")
    p.add_argument("--allow-config-mismatch", action="store_true",
                   help="warn instead of refusing when the two runs were configured differently")
    p.add_argument("--tolerance", type=float, default=10.0, metavar="PCT")
    p.add_argument("--error-tolerance", type=float, default=1.0, metavar="PP",
                   help="error-rate change (percentage points) a regression must exceed")
    p.add_argument("--json", metavar="FILE", help="write the comparison as JSON")
    return p


def build_llm_parser(prog: str = "realizar loadtest llm") -> _Parser:
    p = _Parser(prog=prog, description="LLM serving benchmark against an OpenAI-compatible server, "
                "with vLLM bench serve's metric names.")
    p.add_argument("--url", default=_default_url(), help="server base URL")
    p.add_argument("--endpoint", choices=("completions", "chat"), default=None,
                   help="default: chat for --workload json-schema, else completions")
    p.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=_positive_float, help="open loop: arrivals per second")
    mode.add_argument("--concurrency", type=_positive_int, help="closed loop: streams in flight")
    mode.add_argument("--sweep", action="store_true", help="find the highest rate that meets the SLOs")
    p.add_argument("--max-concurrency", type=_positive_int, default=256,
                   help="cap on requests in flight in rate mode (default 256)")
    p.add_argument("--arrival", choices=("poisson", "constant", "gamma"), default="poisson")
    p.add_argument("--burstiness", type=_positive_float, default=1.0, help="gamma shape (1 = Poisson)")
    p.add_argument("--num-prompts", type=_positive_int, default=100,
                   help="requests; with --workload multi-turn, conversations (default %(default)s)")
    p.add_argument("--input-len", type=_positive_int, default=128,
                   help="synthetic prompt length, or each user turn's with a shared system prompt (words ~ tokens)")
    p.add_argument("--workload", choices=("random", "multi-turn", "prefix-shared", "json-schema"), default="random",
                   help="random: distinct prompts (no prefix to reuse); multi-turn: conversations sharing one "
                        "system prompt, each turn carrying the history (synthetic assistant replies of "
                        "--output-len words), reported per turn; prefix-shared: one system prompt, then a "
                        "distinct question per request; json-schema: chat requests with response_format "
                        "json_schema (small bounded schemas), reporting how many answers parse and match "
                        "(default %(default)s)")
    p.add_argument("--system-prompt-len", type=_positive_int, default=2000,
                   help="shared system prompt of multi-turn and prefix-shared, in words ~ tokens (default %(default)s)")
    p.add_argument("--turns", type=_positive_int, default=4, help="turns per multi-turn conversation (default %(default)s)")
    p.add_argument("--output-len", type=_positive_int, default=128, help="max_tokens per request")
    p.add_argument("--dataset", metavar="FILE.jsonl", help="prompts from JSONL instead of synthetic ones")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos/min_tokens")
    p.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    p.add_argument("--slo-attainment", type=float, default=0.9,
                   help="share of requests that must meet the SLOs (default 0.9)")
    p.add_argument("--sweep-start", type=_positive_float, default=1.0)
    p.add_argument("--sweep-max", type=_positive_float, default=256.0)
    p.add_argument("--sweep-steps", type=int, default=3, help="bisection steps after the doubling")
    p.add_argument("--timeout", type=_positive_float, default=300.0)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("REALIZAR_API_KEY"))
    p.add_argument("--seed", type=int, default=0)
    _common_output(p)
    return p


def build_calibrate_parser(prog: str = "realizar loadtest calibrate") -> _Parser:
    p = _Parser(prog=prog, description="Measure this client's ceiling against a built-in no-op server.")
    p.add_argument("--duration", type=_positive_float, default=3.0, help="seconds per measurement")
    p.add_argument("--concurrency", type=_positive_int, default=64)
    p.add_argument("--stream-concurrency", type=_positive_int, default=8)
    p.add_argument("--events", type=_positive_int, default=2000, help="SSE events per stream")
    p.add_argument("--client", choices=("both", "raw", "aiohttp"), default="both")
    p.add_argument("--json", metavar="FILE")
    _worker_options(p, ray=False)
    p.add_argument("--server-processes", type=_positive_int, metavar="N",
                   help="no-op server processes sharing the port (default: as many as --workers)")
    return p


# ---------------------------------------------------------------- shared steps

def _progress(args: argparse.Namespace) -> ProgressSink:
    if args.no_progress or not sys.stderr.isatty():
        return NoProgress()
    from realizar.loadtest.report import ConsoleProgress
    return ConsoleProgress()


def _close_progress(progress: ProgressSink) -> None:
    close = getattr(progress, "close", None)
    if close is not None:
        close()


@contextlib.contextmanager
def _pool(args: argparse.Namespace) -> Iterator[WorkerPool | None]:
    """The load workers ``--workers``/``--ray-address`` ask for, started, and stopped on exit."""
    from realizar.loadtest.workers import make_pool

    pool = make_pool(args.workers, getattr(args, "ray_address", None))
    if pool is None:
        yield None
        return
    pool.start()
    try:
        yield pool
    finally:
        pool.close()


def _workers_info(pool: WorkerPool | None) -> dict[str, Any] | None:
    return pool.describe() if pool is not None else None


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _read_report(path: str) -> dict[str, Any]:
    from realizar.loadtest.report import read_json, validate_report
    try:
        doc = read_json(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read report {path}: {exc}") from None
    problems = validate_report(doc)
    if problems:
        raise UsageError(f"{path} is not a load-test report: {'; '.join(problems[:3])}")
    return doc


def _finish(doc: dict[str, Any], args: argparse.Namespace, baseline: dict[str, Any] | None,
            code: int) -> int:
    """Compare with the baseline, settle the exit code, write JSON/HTML."""
    from realizar.loadtest.compare import CompareOptions, compare_reports, format_comparison
    from realizar.loadtest.report import write_json

    if baseline is not None and doc["scenarios"]:
        cmp = compare_reports(baseline, doc, CompareOptions(tolerance_pct=args.tolerance))
        sys.stdout.write("\n" + format_comparison(cmp))
        doc["comparison"] = cmp.to_dict()
        if cmp.regressions and code in (EXIT_OK, EXIT_TARGET_FAILED):
            code = EXIT_REGRESSION
    doc["exit_code"] = code
    if args.json:
        write_json(doc, args.json)
        _note(f"JSON report: {args.json}")
    if args.html:
        from realizar.loadtest.html import write_html
        write_html(doc, args.html)
        _note(f"HTML report: {args.html}")
    return code


def _exit_code(results: list[ScenarioResult], targets_passed: bool) -> int:
    if any(not r.valid for r in results):
        return EXIT_INVALID
    return EXIT_OK if targets_passed else EXIT_TARGET_FAILED


# ---------------------------------------------------------------- suite

def _select(args: argparse.Namespace) -> list[Scenario]:
    try:
        every = seed_scenarios(args.url, args.scale, extra=True)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    names = list(dict.fromkeys(args.scenario or SCENARIO_NAMES))
    out = []
    for name in names:
        sc = every[name]
        if len(sc.phases) == 1:
            cfg = sc.phases[0].config
            changes: dict[str, Any] = {}
            if args.concurrency:
                changes["concurrency"] = args.concurrency
            if args.requests:
                changes["total_requests"] = args.requests
            if args.rate:
                changes["rate"] = args.rate
            if args.arrival:
                changes["arrival"] = args.arrival
            if changes:
                try:
                    cfg = replace(cfg, **changes)
                except ValueError as exc:
                    raise UsageError(str(exc)) from None
                sc = replace(sc, phases=(replace(sc.phases[0], config=cfg),))
        if args.timeout:
            sc = replace(sc, phases=tuple(replace(p, config=replace(p.config, timeout=args.timeout))
                                          for p in sc.phases))
        out.append(sc)
    return out


def run_suite(args: argparse.Namespace) -> int:
    from realizar.loadtest.report import build_report, format_scenario, format_targets, format_validity

    scenarios = _select(args)
    try:
        targets = Targets.load(args.targets)
    except TargetsError as exc:
        raise UsageError(str(exc)) from None
    baseline = _read_report(args.baseline) if args.baseline else None
    from realizar.loadtest.workers import WorkerError

    progress = _progress(args)
    workers: dict[str, Any] | None = None

    async def go(options: RunOptions) -> tuple[str | None, list[ScenarioResult]]:
        unreachable = await probe(args.url)
        if unreachable:
            return unreachable, []
        return None, [await run_scenario(sc, options) for sc in scenarios]

    try:
        with _pool(args) as pool:
            workers = _workers_info(pool)
            options = RunOptions(client=args.client, scrape_metrics=not args.no_metrics, progress=progress,
                                 pool=pool)
            unreachable, results = run_sync(lambda: go(options))
    except WorkerError as exc:
        unreachable, results = f"load workers: {exc}", []
    finally:
        _close_progress(progress)
    config = {"scale": args.scale, "client": args.client,
              "scenarios": {sc.name: sc.describe() for sc in scenarios}, "targets": targets.to_dict()}
    if unreachable:
        _note(f"error: {unreachable}")
        if not unreachable.startswith("load workers:"):
            _note("Start a server (realizar serve --demo) or pass --url.")
        doc = build_report([], [], kind="suite", base_url=args.url, config=config, client=args.client,
                           exit_code=EXIT_INVALID, invalid_reasons=[unreachable], workers=workers)
        return _finish(doc, args, None, EXIT_INVALID)
    target_results = [verdict for r in results for verdict in targets.check(r)]
    out = sys.stdout
    for r in results:
        out.write("\n" + format_scenario(r))
    out.write("\n" + format_targets(target_results))
    out.write(format_validity(results))
    code = _exit_code(results, all(t.passed for t in target_results))
    doc = build_report(results, target_results, kind="suite", base_url=args.url, config=config,
                       client=args.client, exit_code=code, workers=workers)
    code = _finish(doc, args, baseline, code)
    out.flush()
    return code


# ---------------------------------------------------------------- compare

def run_compare(args: argparse.Namespace) -> int:
    from realizar.loadtest.compare import CompareOptions, compare_reports, format_comparison
    from realizar.loadtest.report import write_json

    base, new = _read_report(args.base), _read_report(args.new)
    cmp = compare_reports(base, new, CompareOptions(tolerance_pct=args.tolerance,
                                                    error_rate_tolerance_pp=args.error_tolerance))
    sys.stdout.write(format_comparison(cmp))
    if args.json:
        write_json(cmp.to_dict(), args.json)
    if cmp.config_mismatches and not args.allow_config_mismatch:
        _note("refusing to compare runs with different configurations "
              "(pass --allow-config-mismatch to compare anyway)")
        return EXIT_USAGE
    return EXIT_REGRESSION if cmp.regressions else EXIT_OK


# ---------------------------------------------------------------- llm

async def _first_model(url: str, api_key: str | None) -> str | None:
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
                session.get(url.rstrip("/") + "/v1/models", headers=headers) as resp:
            doc = await resp.json(content_type=None)
        return str(doc["data"][0]["id"])
    except (aiohttp.ClientError, OSError, KeyError, IndexError, TypeError, ValueError):
        return None


def run_llm(args: argparse.Namespace) -> int:
    from realizar.loadtest.llm import (
        DatasetError,
        LlmWorkload,
        format_llm,
        format_prefix_cache,
        format_turns,
        format_validity,
        json_schema_prompts,
        llm_scenario,
        load_jsonl,
        meets_slo,
        multi_turn_prompts,
        parse_goodput,
        per_turn,
        prefix_shared_prompts,
        schema_validity,
        sweep,
        synthetic_prompts,
        vllm_metrics,
    )
    from realizar.loadtest.report import build_report

    structured = args.workload == "json-schema"
    try:
        slo = parse_goodput(args.goodput)
        if args.dataset and args.workload != "random":
            raise UsageError("--dataset brings its own prompts; it does not go with --workload")
        if args.endpoint is None:
            args.endpoint = "chat" if structured else "completions"
        if structured and args.endpoint != "chat":
            raise UsageError("--workload json-schema sends response_format, a chat field: use --endpoint chat")
        if args.dataset:
            prompts = load_jsonl(args.dataset)
        elif args.workload == "multi-turn":
            prompts = multi_turn_prompts(args.num_prompts, args.turns, args.system_prompt_len, args.input_len,
                                         args.output_len, seed=args.seed)
        elif args.workload == "prefix-shared":
            prompts = prefix_shared_prompts(args.num_prompts, args.system_prompt_len, args.input_len, seed=args.seed)
        elif structured:
            prompts = json_schema_prompts(args.num_prompts, seed=args.seed)
        else:
            prompts = synthetic_prompts(args.num_prompts, args.input_len, seed=args.seed)
    except (ValueError, DatasetError) as exc:
        raise UsageError(str(exc)) from None
    # every prompt once (multi-turn: each conversation's every turn)
    num_requests = len(prompts) if args.workload in ("multi-turn", "prefix-shared") else args.num_prompts
    # a schema answer ends where its JSON ends: forcing max_tokens of output would run past it
    ignore_eos = not args.no_ignore_eos and not structured
    if args.sweep and not (slo.ttft_ms or slo.tpot_ms or slo.e2el_ms):
        raise UsageError("--sweep needs SLOs: --goodput ttft:MS tpot:MS e2el:MS")
    if not 0 < args.slo_attainment <= 1:
        raise UsageError("--slo-attainment must be in (0, 1]")
    baseline = _read_report(args.baseline) if args.baseline else None
    try:
        if args.concurrency:
            cfg = LoadTestConfig(concurrency=args.concurrency, total_requests=num_requests,
                                 timeout=args.timeout, base_url=args.url, seed=args.seed)
        else:
            cfg = LoadTestConfig(concurrency=args.max_concurrency, total_requests=num_requests,
                                 timeout=args.timeout, base_url=args.url, rate=args.rate or args.sweep_start,
                                 arrival=args.arrival, burstiness=args.burstiness, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from realizar.loadtest.workers import WorkerError

    progress = _progress(args)
    workers: dict[str, Any] | None = None

    async def go(options: RunOptions) -> tuple[str | None, str, list[LlmRun]]:
        unreachable = await probe(args.url, "/v1/models")
        if unreachable:
            return unreachable, "", []
        model = args.model or await _first_model(args.url, args.api_key)
        if model is None:
            return "could not read a model id from GET /v1/models; pass --model", "", []
        workload = LlmWorkload(args.endpoint, model, tuple(prompts), args.output_len,
                               ignore_eos=ignore_eos, api_key=args.api_key)
        if args.sweep:
            steps = await sweep(workload, cfg, slo, options, start_rate=args.sweep_start, max_rate=args.sweep_max,
                                refine_steps=args.sweep_steps, attainment=args.slo_attainment)
            return None, model, [LlmRun(s.result, s.metrics, s.ok, s.rate) for s in steps]
        result = await run_scenario(llm_scenario(workload, cfg, slo), options)
        metrics = vllm_metrics(result, workload, cfg, slo)
        return None, model, [LlmRun(result, metrics, meets_slo(metrics, result, args.slo_attainment), cfg.rate)]

    try:
        with _pool(args) as pool:
            workers = _workers_info(pool)
            options = RunOptions(client=args.client, scrape_metrics=not args.no_metrics, progress=progress,
                                 pool=pool)
            problem, model, runs = run_sync(lambda: go(options))
    except WorkerError as exc:
        problem, model, runs = f"load workers: {exc}", "", []
    finally:
        _close_progress(progress)
    config = {"mode": "sweep" if args.sweep else ("rate" if args.rate else "concurrency"),
              "endpoint": args.endpoint, "input_len": args.input_len, "output_len": args.output_len,
              "dataset": args.dataset, "num_prompts": args.num_prompts, "ignore_eos": ignore_eos,
              "goodput": args.goodput, "slo_attainment": args.slo_attainment, "arrival": args.arrival,
              "burstiness": args.burstiness, "rate": args.rate, "concurrency": args.concurrency,
              "max_concurrency": args.max_concurrency, "workload": args.workload,
              "system_prompt_len": args.system_prompt_len, "turns": args.turns}
    if problem:
        _note(f"error: {problem}")
        doc = build_report([], [], kind="llm", base_url=args.url, config=config, client=args.client,
                           exit_code=EXIT_INVALID, invalid_reasons=[problem], workers=workers)
        return _finish(doc, args, None, EXIT_INVALID)
    for run in runs:
        sys.stdout.write("\n" + format_llm(run.metrics, run.result.scenario.title))
        sys.stdout.write(format_turns(per_turn(run.result)))
        sys.stdout.write(format_prefix_cache(run.result))
        if structured:
            sys.stdout.write(format_validity(schema_validity(run.result)))
    extra: dict[str, Any] = {"model": model}
    if args.sweep:
        best = max((run.rate for run in runs if run.ok and run.rate is not None), default=None)
        extra["sweep"] = {"steps": [{"rate": run.rate, "meets_slo": run.ok, **run.metrics} for run in runs],
                          "max_rate_meeting_slo": best}
        sys.stdout.write(f"\nHighest rate meeting the SLOs: {'none' if best is None else f'{best:g} req/s'}\n")
        passed = best is not None
    else:
        extra.update(runs[0].metrics)
        turns = per_turn(runs[0].result)
        if turns:
            extra["per_turn"] = turns
        if structured:
            extra["schema_validity"] = schema_validity(runs[0].result)
        passed = runs[0].ok if (slo.ttft_ms or slo.tpot_ms or slo.e2el_ms) else True
    results = [run.result for run in runs]
    code = EXIT_INVALID if any(not r.valid for r in results) else (EXIT_OK if passed else EXIT_TARGET_FAILED)
    doc = build_report(results, [], kind="llm", base_url=args.url, config=config, client=args.client,
                       exit_code=code, extra=extra, workers=workers)
    return _finish(doc, args, baseline, code)


@dataclass(frozen=True)
class LlmRun:
    result: ScenarioResult
    metrics: dict[str, Any]
    ok: bool
    rate: float | None


# ---------------------------------------------------------------- calibrate

def run_calibrate(args: argparse.Namespace) -> int:
    from realizar.loadtest.calibrate import calibrate, format_calibration, noop_server
    from realizar.loadtest.report import environment, write_json

    clients: tuple[ClientKind, ...] = ("raw", "aiohttp") if args.client == "both" else (args.client,)
    if args.concurrency < args.workers:
        raise UsageError(f"--concurrency {args.concurrency} gives {args.workers} workers less than a connection each")
    _note("starting the no-op server and measuring the client ...")
    workers: dict[str, Any] | None = None
    try:
        with noop_server(args.server_processes or args.workers) as url, _pool(args) as pool:
            workers = _workers_info(pool)
            results = run_sync(lambda: calibrate(url, duration=args.duration, concurrency=args.concurrency,
                                                 stream_concurrency=args.stream_concurrency,
                                                 events_per_stream=args.events, clients=clients, pool=pool))
    except RuntimeError as exc:  # WorkerError included
        _note(f"error: {exc}")
        return EXIT_INVALID
    sys.stdout.write(format_calibration(results))
    if args.json:
        from realizar.loadtest.report import SCHEMA_VERSION, TOOL_NAME, tool_version
        write_json({"schema_version": SCHEMA_VERSION, "tool": {"name": TOOL_NAME, "version": tool_version()},
                    "kind": "calibrate", "environment": environment(args.client, workers),
                    "results": [r.to_dict() for r in results]}, args.json)
    return EXIT_OK


# ---------------------------------------------------------------- entry points

def main(argv: Sequence[str] | None = None, prog: str = "realizar loadtest") -> int:
    """Parse ``argv`` (what follows ``loadtest``) and run; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            sub = argv[0]
            builders = {"compare": (build_compare_parser, run_compare), "llm": (build_llm_parser, run_llm),
                        "calibrate": (build_calibrate_parser, run_calibrate)}
            build, handler = builders[sub]
            return handler(build(f"{prog} {sub}").parse_args(argv[1:]))
        return run_suite(build_parser(prog).parse_args(argv))
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    except KeyboardInterrupt:
        _note("interrupted")
        return 130


def run(args: argparse.Namespace) -> int:
    """Run ``realizar loadtest`` for a namespace of the ``realizar`` parser (``realizar.cli.build_parser``)."""
    return main(list(getattr(args, "loadtest_argv", None) or []))
