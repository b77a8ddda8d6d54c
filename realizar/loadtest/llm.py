"""LLM serving benchmarks against any OpenAI-compatible server
(``/v1/completions`` or ``/v1/chat/completions``, streaming).

Numbers follow vLLM's ``bench serve``: TTFT from the send to the first chunk
with text; TPOT = (E2EL - TTFT) / (output tokens - 1) per request; ITL = the
gaps between chunks, pooled; E2EL end to end; goodput = the rate of requests
meeting every SLO. Output tokens come from the server's ``usage`` (we ask for
it with ``stream_options.include_usage``), else from the number of chunks.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from realizar.loadtest.config import LoadTestConfig
from realizar.loadtest.runner import RunOptions, ScenarioResult, run_scenario
from realizar.loadtest.scenarios import Phase, Scenario
from realizar.loadtest.stats import LatencySummary, Slo
from realizar.loadtest.workload import RequestSpec, ResponseKind, Validate, Validity, json_request

try:  # a test dependency, not a runtime one: without it the report checks JSON syntax only, and says so
    import jsonschema
except ImportError:  # pragma: no cover - exercised by passing check_schema=False
    jsonschema = None

HAVE_JSONSCHEMA = jsonschema is not None

Endpoint = Literal["completions", "chat"]
Workload = Literal["random", "multi-turn", "prefix-shared", "json-schema"]
WORKLOADS: tuple[Workload, ...] = ("random", "multi-turn", "prefix-shared", "json-schema")

# Short, frequent English words: one token each in the common BPE vocabularies,
# so N words make a prompt of about N tokens. The server's usage reports the
# exact count, and that is what the report shows.
_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "at", "be", "by",
    "this", "had", "not", "but", "from", "or", "have", "an", "they", "which", "one", "you", "were", "her",
    "all", "she", "there", "would", "their", "we", "him", "been", "has", "when", "who", "will", "more",
    "no", "if", "out", "so", "said", "what", "up", "its", "about", "into", "than", "them", "can", "only",
    "other", "new", "some", "time", "could", "these", "two", "may", "then", "do", "first", "any", "my",
    "now", "such", "like", "our", "over", "man", "me", "even", "most", "made", "after", "also", "did",
    "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well", "down",
    "should", "because", "each", "just", "those", "people", "how", "too", "little", "state", "good",
    "very", "make", "world", "still", "own", "see", "men", "work", "long", "get", "here", "between",
    "both", "life", "being", "under", "never", "day", "same", "another", "know", "while", "last", "might",
    "us", "great", "old", "year", "off", "come", "since", "against", "go", "came", "right", "used", "take",
    "three",
)


class DatasetError(ValueError):
    """A prompts file that cannot be used (usage error)."""


@dataclass(frozen=True)
class Prompt:
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    turn: int | None = None  # a conversation's turn (1, 2, ...), reported apart
    response_format: dict[str, Any] | None = None  # sent as is (chat); ``validate`` judges the answer
    validate: Validate | None = None


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, n)))


def _transcript(messages: list[dict[str, Any]]) -> str:
    """A conversation as plain text for /v1/completions: each turn's prompt extends the last one's."""
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


def multi_turn_prompts(conversations: int, turns: int, system_len: int, user_len: int, reply_len: int,
                       *, seed: int = 0) -> list[Prompt]:
    """Agent-like conversations: one system prompt of ``system_len`` words shared by all of them,
    then ``turns`` turns each, every turn carrying the whole history before it.

    The assistant's earlier replies in the history are synthetic (``reply_len`` words), not what the
    server answered: every request is known up front, so the run is the same against any server and
    works open loop. The prompts come turn by turn (all first turns, then all second turns...), so
    a conversation's turn is sent after its previous one, and a server with prefix caching finds the
    previous turn's prompt cached (its reply, replaced by the synthetic one, is computed again)."""
    rng = random.Random(seed)
    system = {"role": "system", "content": _words(rng, system_len)}
    histories: list[list[dict[str, Any]]] = [[system] for _ in range(conversations)]
    out: list[Prompt] = []
    for turn in range(1, turns + 1):
        for history in histories:
            if turn > 1:
                history.append({"role": "assistant", "content": _words(rng, reply_len)})
            history.append({"role": "user", "content": _words(rng, user_len)})
            messages = list(history)
            out.append(Prompt(text=_transcript(messages), messages=messages, turn=turn))
    return out


def prefix_shared_prompts(n: int, system_len: int, user_len: int, *, seed: int = 0) -> list[Prompt]:
    """``n`` one-turn requests: the same system prompt of ``system_len`` words, then a distinct
    question of ``user_len`` words each."""
    rng = random.Random(seed)
    system = {"role": "system", "content": _words(rng, system_len)}
    out = []
    for _ in range(n):
        messages = [system, {"role": "user", "content": _words(rng, user_len)}]
        out.append(Prompt(text=_transcript(messages), messages=messages))
    return out


# Small, bounded schemas: every string has a maxLength, every integer a range, every object a fixed set of
# required keys and no others, so a constrained 135M model finishes each in well under 100 tokens.
JSON_SCHEMAS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("person", "Describe a person.", {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "role": {"type": "string", "enum": ["admin", "user", "guest"]}},
        "required": ["name", "age", "role"], "additionalProperties": False}),
    ("weather", "Report the weather in a city.", {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                       "temperature": {"type": "integer", "minimum": -50, "maximum": 60}},
        "required": ["city", "unit", "temperature"], "additionalProperties": False}),
    ("ticket", "File a support ticket.", {
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 32},
                       "priority": {"type": "string", "enum": ["low", "medium", "high"]},
                       "done": {"type": "boolean"}},
        "required": ["title", "priority", "done"], "additionalProperties": False}),
    ("tool_call", "Choose a tool and its query.", {
        "type": "object",
        "properties": {"tool": {"type": "string", "enum": ["search", "calculator", "weather"]},
                       "query": {"type": "string", "maxLength": 40}},
        "required": ["tool", "query"], "additionalProperties": False}),
)


class SchemaValidator:
    """Judges a response's text: not JSON, JSON breaking ``schema``, valid; or, with ``check_schema``
    false (jsonschema absent), JSON whose schema went unchecked. A class, not a closure, so that
    prompts pickle to load workers; the compiled checker is rebuilt on the other side."""

    def __init__(self, schema: dict[str, Any], *, check_schema: bool = HAVE_JSONSCHEMA) -> None:
        if check_schema and jsonschema is None:
            raise RuntimeError("check_schema needs the jsonschema package")
        self.schema = schema
        self.check_schema = check_schema
        self._checker: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"schema": self.schema, "check_schema": self.check_schema, "_checker": None}

    def __call__(self, text: str) -> Validity:
        try:
            obj = json.loads(text)
        except ValueError:  # JSONDecodeError, and the empty text
            return Validity.NOT_JSON
        if not self.check_schema or jsonschema is None:  # a worker without jsonschema: syntax only
            return Validity.JSON_ONLY
        if self._checker is None:
            self._checker = jsonschema.Draft202012Validator(self.schema)
        return Validity.VALID if self._checker.is_valid(obj) else Validity.SCHEMA_MISMATCH


def make_validator(schema: dict[str, Any], *, check_schema: bool = HAVE_JSONSCHEMA) -> Validate:
    """A ``SchemaValidator`` for ``schema``."""
    return SchemaValidator(schema, check_schema=check_schema)


def json_schema_prompts(n: int, *, seed: int = 0, check_schema: bool = HAVE_JSONSCHEMA) -> list[Prompt]:
    """``n`` chat requests cycling through :data:`JSON_SCHEMAS`, each with ``response_format``
    ``json_schema`` and a validator for its answer. The prompt also spells the schema out, as a model
    without constrained decoding needs it; a few random words make the prompts distinct."""
    rng = random.Random(seed)
    validators = [make_validator(schema, check_schema=check_schema) for _, _, schema in JSON_SCHEMAS]
    out = []
    for i in range(n):
        k = i % len(JSON_SCHEMAS)
        name, task, schema = JSON_SCHEMAS[k]
        text = (f"{task} Reply with one JSON object only, matching this JSON schema: "
                f"{json.dumps(schema, separators=(',', ':'))}. Topic: {_words(rng, 6)}")
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        out.append(Prompt(text=text, messages=[{"role": "user", "content": text}], response_format=fmt,
                          validate=validators[k]))
    return out


def synthetic_prompts(n: int, input_len: int, *, seed: int = 0) -> list[Prompt]:
    """``n`` distinct prompts of ``input_len`` words (about as many tokens); distinct
    so prefix caching cannot turn the benchmark into a cache test."""
    rng = random.Random(seed)
    return [Prompt(text=_words(rng, input_len)) for _ in range(n)]


def load_jsonl(path: str | Path) -> list[Prompt]:
    """Prompts from JSONL: ``{"prompt": str}`` or ``{"messages": [...]}``, with an
    optional ``max_tokens`` (or ``output_len``) per line."""
    prompts = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: not JSON ({exc})") from None
        if not isinstance(obj, dict) or not ("prompt" in obj or "messages" in obj):
            raise DatasetError(f"{path}:{lineno}: needs a 'prompt' or 'messages' field")
        out = obj.get("max_tokens", obj.get("output_len"))
        if out is not None and not isinstance(out, int):
            raise DatasetError(f"{path}:{lineno}: max_tokens must be an integer")
        prompts.append(Prompt(text=obj.get("prompt"), messages=obj.get("messages"), max_tokens=out))
    if not prompts:
        raise DatasetError(f"{path} holds no prompts")
    return prompts


@dataclass(frozen=True)
class LlmWorkload:
    endpoint: Endpoint
    model: str
    prompts: tuple[Prompt, ...]
    output_len: int
    ignore_eos: bool = True
    temperature: float = 0.0
    api_key: str | None = None

    def request(self, i: int) -> RequestSpec:
        prompt = self.prompts[i % len(self.prompts)]
        max_tokens = prompt.max_tokens or self.output_len
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "stream": True,
                                "stream_options": {"include_usage": True}, "temperature": self.temperature}
        if self.ignore_eos:
            body["ignore_eos"] = True
            body["min_tokens"] = max_tokens
        if prompt.response_format is not None:
            body["response_format"] = prompt.response_format
        if self.endpoint == "chat":
            body["messages"] = prompt.messages or [{"role": "user", "content": prompt.text or ""}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = prompt.text if prompt.text is not None else str(prompt.messages)
            path = "/v1/completions"
        headers = (("Authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        return json_request("POST", path, body, None, ResponseKind.SSE_OPENAI, headers, prompt.validate)


@dataclass(frozen=True)
class TurnOf:
    """Request index -> its conversation's turn (a picklable ``Scenario.group``)."""

    turns: tuple[int, ...]

    def __call__(self, i: int) -> int:
        return self.turns[i % len(self.turns)]


def llm_scenario(workload: LlmWorkload, config: LoadTestConfig, slo: Slo, name: str = "llm") -> Scenario:
    mode = (f"{config.arrival} arrivals at {config.rate:g} req/s" if config.open_loop and config.rate
            else f"{config.concurrency} concurrent streams")
    title = f"LLM serving: {workload.endpoint}, {mode}"
    prompts = workload.prompts
    turns = tuple(p.turn or 0 for p in prompts)
    group = TurnOf(turns) if any(turns) else None
    return Scenario(name, title, f"model {workload.model}, {len(prompts)} prompts",
                    (Phase("main", title, config),), workload.request, slo, group=group)


def per_turn(result: ScenarioResult) -> list[dict[str, Any]]:
    """TTFT and cached prompt tokens by conversation turn (empty for one-turn workloads)."""
    return [g.to_dict() for g in result.overall_collector.group_summaries()]


def format_turns(turns: list[dict[str, Any]]) -> str:
    """A table of TTFT and prompt tokens (cached ones where the server reports them) per turn."""
    if not turns:
        return ""

    def ms(summary: dict[str, Any] | None, key: str) -> str:
        return "n/a" if summary is None else f"{summary[key]:.1f}"

    lines = [f"{'-' * 10}Per turn{'-' * 10}",
             f"{'turn':>4} {'requests':>8} {'prompt tok':>10} {'cached tok':>10} "
             f"{'mean TTFT ms':>12} {'p50 TTFT ms':>11} {'p99 TTFT ms':>11}"]
    for t in turns:
        cached = "n/a" if t["mean_cached_tokens"] is None else f"{t['mean_cached_tokens']:.0f}"
        lines.append(f"{t['group']:>4} {t['requests']:>8} {t['mean_input_tokens']:>10.0f} {cached:>10} "
                     f"{ms(t['ttft'], 'mean_ms'):>12} {ms(t['ttft'], 'p50_ms'):>11} {ms(t['ttft'], 'p99_ms'):>11}")
    return "\n".join(lines) + "\n"


def format_prefix_cache(result: ScenarioResult) -> str:
    """The server's prefix-cache hit rate over the run, where its /metrics counts them."""
    rate = result.server_metrics.prefix_cache_hit_rate()
    if rate is None:
        return ""
    return f"{'Prefix cache hits (server /metrics):':<40}{100.0 * rate:.1f}% of prompt tokens\n"


def schema_validity(result: ScenarioResult, *, schema_checked: bool = HAVE_JSONSCHEMA) -> dict[str, Any]:
    """How many successful responses parse as JSON and (where jsonschema is importable) match
    their schema. Failed requests (HTTP errors, cut streams) are counted as failures, not here."""
    counts = result.overall_collector.validity_counts()
    judged = sum(counts.values())
    parsed = judged - counts[Validity.NOT_JSON.value]
    valid = counts[Validity.VALID.value] if schema_checked else None
    return {"judged": judged, "json": parsed, "valid": valid, "schema_checked": schema_checked,
            "json_fraction": parsed / judged if judged else None,
            "valid_fraction": (valid / judged if judged else None) if valid is not None else None,
            "counts": counts}


def format_validity(v: dict[str, Any]) -> str:
    """The structured-output lines of the report."""
    def share(n: int) -> str:
        return f"{n} ({100.0 * n / v['judged']:.1f}%)" if v["judged"] else f"{n}"

    lines = [f"{'-' * 10}Structured output (response_format json_schema){'-' * 10}",
             f"{'Responses judged (successful):':<40}{v['judged']}",
             f"{'Parse as JSON:':<40}{share(v['json'])}"]
    if v["schema_checked"]:
        lines.append(f"{'Parse and match their schema:':<40}{share(v['valid'])}")
    else:
        lines.append(f"{'Match their schema:':<40}not checked (jsonschema is not installed; JSON syntax only)")
    return "\n".join(lines) + "\n"


def _ms_keys(prefix: str, summary: LatencySummary | None) -> dict[str, float | None]:
    if summary is None or summary.count == 0:
        return {f"{k}_{prefix}_ms": None for k in ("mean", "median", "std", "p50", "p90", "p95", "p99")}
    return {
        f"mean_{prefix}_ms": summary.mean_ms, f"median_{prefix}_ms": summary.p50_ms,
        f"std_{prefix}_ms": summary.std_ms, f"p50_{prefix}_ms": summary.p50_ms,
        f"p90_{prefix}_ms": summary.p90_ms, f"p95_{prefix}_ms": summary.p95_ms,
        f"p99_{prefix}_ms": summary.p99_ms,
    }


def vllm_metrics(result: ScenarioResult, workload: LlmWorkload, config: LoadTestConfig, slo: Slo) -> dict[str, Any]:
    """The run in ``vllm bench serve``'s JSON key names."""
    s = result.overall
    duration = s.duration_s
    out: dict[str, Any] = {
        "backend": "openai-chat" if workload.endpoint == "chat" else "openai",
        "model_id": workload.model,
        "request_rate": config.rate if config.open_loop else math.inf,
        "burstiness": config.burstiness,
        "max_concurrency": config.concurrency,
        "duration": duration,
        "completed": s.successes,
        "failed": s.failures,
        "num_prompts": s.total_requests,
        "total_input_tokens": s.input_tokens,
        "total_output_tokens": s.output_tokens,
        "request_throughput": s.successes / duration if duration else 0.0,
        "request_goodput": s.goodput_rps if (slo.ttft_ms or slo.tpot_ms or slo.e2el_ms) else None,
        "output_throughput": s.output_tokens / duration if duration else 0.0,
        "total_token_throughput": (s.input_tokens + s.output_tokens) / duration if duration else 0.0,
        "slo_attainment": s.good_requests / s.total_requests if s.total_requests else 0.0,
    }
    for prefix, part in (("ttft", s.ttft), ("tpot", s.tpot), ("itl", s.itl), ("e2el", s.e2el)):
        out.update(_ms_keys(prefix, part))
    if out["request_rate"] == math.inf:
        out["request_rate"] = "inf"
    return out


def meets_slo(metrics: dict[str, Any], result: ScenarioResult, attainment: float) -> bool:
    return result.valid and metrics["completed"] > 0 and metrics["slo_attainment"] >= attainment


@dataclass(frozen=True)
class SweepStep:
    rate: float
    result: ScenarioResult
    metrics: dict[str, Any]
    ok: bool


async def sweep(workload: LlmWorkload, base: LoadTestConfig, slo: Slo, options: RunOptions, *,
                start_rate: float, max_rate: float, refine_steps: int, attainment: float) -> list[SweepStep]:
    """The highest arrival rate whose SLO attainment stays >= ``attainment``:
    double the rate from ``start_rate`` until it fails (or passes ``max_rate``),
    then bisect ``refine_steps`` times between the last pass and the first failure."""
    steps: list[SweepStep] = []

    async def trial(rate: float) -> SweepStep:
        cfg = replace(base, rate=rate, arrival=base.arrival if base.open_loop else "poisson")
        result = await run_scenario(llm_scenario(workload, cfg, slo, name=f"rate_{rate:g}"), options)
        metrics = vllm_metrics(result, workload, cfg, slo)
        step = SweepStep(rate, result, metrics, meets_slo(metrics, result, attainment))
        steps.append(step)
        return step

    good: float | None = None
    bad: float | None = None
    rate = start_rate
    while rate <= max_rate:
        if (await trial(rate)).ok:
            good = rate
            rate *= 2.0
        else:
            bad = rate
            break
    if good is not None and bad is not None:
        lo, hi = good, bad
        for _ in range(refine_steps):
            mid = (lo + hi) / 2.0
            if (await trial(mid)).ok:
                lo = mid
            else:
                hi = mid
    return steps


def format_llm(metrics: dict[str, Any], title: str) -> str:
    """A text block shaped like ``vllm bench serve``'s."""
    def fmt(v: Any, digits: int = 2) -> str:
        return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    lines = [f"{'=' * 12} {title} {'=' * 12}",
             f"{'Successful requests:':<40}{metrics['completed']}",
             f"{'Failed requests:':<40}{metrics['failed']}",
             f"{'Benchmark duration (s):':<40}{fmt(metrics['duration'])}",
             f"{'Total input tokens:':<40}{metrics['total_input_tokens']}",
             f"{'Total generated tokens:':<40}{metrics['total_output_tokens']}",
             f"{'Request throughput (req/s):':<40}{fmt(metrics['request_throughput'])}",
             f"{'Request goodput (req/s):':<40}{fmt(metrics['request_goodput'])}",
             f"{'Output token throughput (tok/s):':<40}{fmt(metrics['output_throughput'])}",
             f"{'Total token throughput (tok/s):':<40}{fmt(metrics['total_token_throughput'])}"]
    for key, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{'-' * 10}{label}{'-' * 10}")
        for stat in ("mean", "median", "p99"):
            lines.append(f"{f'{stat.capitalize()} {key.upper()} (ms):':<40}{fmt(metrics[f'{stat}_{key}_ms'])}")
    return "\n".join(lines) + "\n"


def parse_goodput(items: list[str]) -> Slo:
    """``["ttft:500", "tpot:50", "e2el:10000"]`` (ms), vLLM's --goodput syntax."""
    values: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput takes ttft:MS tpot:MS e2el:MS, got {item!r}")
        try:
            values[f"{key}_ms"] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {key} needs a number of milliseconds, got {value!r}") from None
    return Slo(**values)
