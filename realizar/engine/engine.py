"""The engine: ``step() = schedule -> execute -> update``, and its asyncio face.

``Engine`` is synchronous and owned by one thread. ``AsyncEngine`` runs that thread,
takes requests from the event loop through a lock-free inbox, and hands each token
back to its request's queue with ``loop.call_soon_threadsafe``, so the event loop
never waits on the model.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from realizar import kernels
from realizar.backends import matmul_threads
from realizar.config import EngineConfig, ModelConfig
from realizar.engine.errors import EngineDead, EngineOverloaded, InvalidRequest, RequestTooLong
from realizar.engine.runner import ModelRunner, StepResult
from realizar.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput, Sequence
from realizar.engine.stats import EngineStats, LatencyObservations, StatsRecorder
from realizar.kv_cache import BlockAllocator, KVCache
from realizar.model.llama import AttentionMetadata, LlamaModel
from realizar.model.quality import KV_CACHE_DTYPES_PASSING_GATE, QUANTIZED_CLASSES_PASSING_GATE
from realizar.request import FinishReason, Logprob, Request, SamplingParams, StructuredSpec, TokenOutput
from realizar.sampling import Penalties, SamplingRow, make_generator
from realizar.structured import StructuredCompiler
from realizar.tokenizer import Tokenizer

log = logging.getLogger("realizar.engine")

KV_CACHE_BYTES_CPU = 2 << 30  # default KV budget on the CPU
MAX_DEFAULT_MODEL_LEN = 8192
FATAL_AFTER_CONSECUTIVE_FAILURES = 3


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map ``--dtype`` to a torch dtype.

    On CUDA, ``auto`` is bfloat16 (float16 where bf16 is missing). On the CPU it is
    float32: the whole float32 step runs in the compiled kernels (``realizar.kernels``),
    while any other dtype falls back to torch's per-op path, which measured 1.3-1.7x
    slower than float32 even on an AVX-512 CPU with native bf16 (BENCHMARKS.md), and
    bfloat16 also changes greedy tokens against the float32 reference.
    """
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_kv_cache_dtype(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """What the KV cache stores for ``--kv-cache-dtype``. ``auto``: float16 where the CPU kernels compute
    (float32 on the CPU, compiled), which halves the cache's memory and the bytes attention reads and
    passed the quality gate (``KV_CACHE_DTYPES_PASSING_GATE``), except with ``--dtype float32``, the
    exact configuration; the model's own dtype anywhere else (torch's path). An explicit dtype is
    taken as asked: the torch backend casts what it reads and writes."""
    if config.kv_cache_dtype != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}[config.kv_cache_dtype]
    if (config.dtype != "float32" and KV_CACHE_DTYPES_PASSING_GATE["float16"]
            and kernels.for_tensors(device, dtype) is not None):
        return torch.float16
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class EngineModel:
    """What the engine serves: the model, its tokenizer and where it came from."""

    model: LlamaModel
    tokenizer: Tokenizer
    config: ModelConfig
    model_id: str
    path: Path
    format: str
    load_seconds: float


def resolve_threads(threads: int | None) -> tuple[int, int]:
    """(kernel threads, torch intra-op threads) for the CPU engine.

    Nearly all of a step's time is in the compiled kernels (``realizar.kernels``; numpy's
    OpenBLAS for the linear layers where they cannot be built), which run on ``threads``
    threads, by default one per core: batched decode is compute-bound. Torch's own ops are
    few and short; torch gets one thread fewer, because its OpenMP pool waits at a barrier
    after every op, and with every core in it a step measured 7x slower whenever the event
    loop or a load client took a core for a moment.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    matmul = threads if threads is not None else cores
    return matmul, max(1, matmul - 1)


def _trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc keeps them otherwise, much of it in other
    threads' malloc arenas; not glibc: nothing to trim)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _return_free_heap() -> None:
    """Give the heap that loading freed back to the OS: idle RSS then holds the model, not the load's
    peak (23 MiB less for the demo model with quantized weights)."""
    gc.collect()
    _trim_heap()


def load_engine_model(path: str | Path, config: EngineConfig) -> EngineModel:
    from realizar.loading import load_model  # heavy imports stay out of module import time

    start = time.perf_counter()
    device = resolve_device(config.device)
    if device.type == "cpu":
        matmul, torch_threads = resolve_threads(config.threads)
        matmul_threads(matmul)
        torch.set_num_threads(torch_threads)
    dtype = resolve_dtype(config.dtype, device)
    kv_dtype = resolve_kv_cache_dtype(config, device, dtype)
    loaded = load_model(path, dtype=dtype, keep_quantized=kernels.quantized_weights(device, dtype))
    if loaded.format == "gguf":
        tokenizer = Tokenizer.from_gguf_metadata(loaded.metadata)
    else:
        tokenizer = Tokenizer.from_pretrained_dir(loaded.path)
    def build(kind: str, layers: int | None = None) -> LlamaModel:
        """The model in class ``kind``; ``layers``: only its first layers (and its head), to time."""
        mc = loaded.config if layers is None else dataclasses.replace(loaded.config, num_layers=layers)
        if kind == "float32":  # the reference: every weight dequantized at load
            floats = {**loaded.tensors, **{n: q.dequantize() for n, q in loaded.quantized.items()}}
            return LlamaModel(mc, floats, device, dtype)
        return LlamaModel(mc, loaded.tensors, device, dtype, loaded.quantized, kind == "fast")

    float_bytes = 4 * sum(math.prod(q.shape) for q in loaded.quantized.values())
    file_bytes = sum(q.raw.numel() for q in loaded.quantized.values())
    key = _choice_key(Path(path), kv_dtype)
    model = choose_quantized_class(
        build, bool(loaded.quantized) and kernels.for_tensors(device, dtype) is not None,
        exact=config.dtype == "float32", remember=key,
        float32_allowed=float_bytes <= FLOAT32_CANDIDATE_BYTES, kv_dtype=kv_dtype,
        timing_layers=min(TIMING_LAYERS, loaded.config.num_layers) if file_bytes > TIMING_PREFIX_BYTES else None)
    choose_tiles(model, key, kv_dtype)
    del loaded.tensors, loaded.quantized
    _return_free_heap()
    return EngineModel(model, tokenizer, loaded.config, loaded.config.name, loaded.path, loaded.format,
                       time.perf_counter() - start)


def decode_step_seconds(model: LlamaModel, sequences: int, repeats: int = 3,
                        kv_dtype: torch.dtype | None = None) -> float:
    """The best of ``repeats`` timed decode steps of ``sequences`` one-token sequences (after one
    untimed step), each in its own block of a scratch cache of ``kv_dtype`` (default: the model's)."""
    c = model.config
    block = 16
    cache = KVCache(c.num_layers, sequences, block, c.num_kv_heads, c.head_dim, model.device,
                    kv_dtype or model.dtype)
    seqs = torch.arange(sequences)
    meta = AttentionMetadata(slot_mapping=seqs * block, num_decodes=sequences, decode_block_tables=seqs[:, None],
                             decode_context_lens=torch.ones(sequences, dtype=torch.long), prefills=[])
    ids, positions = (seqs * 7919 + 11) % c.vocab_size, torch.zeros(sequences, dtype=torch.long)
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        model.forward(ids, positions, meta, cache, seqs)
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def _choice_key(path: Path, kv_dtype: torch.dtype) -> str | None:
    """What ``auto``'s timed choice depends on: the model file, the KV cache's dtype and the kernels'
    build (their sources, flags and this CPU). None when the model cannot be identified."""
    compiled = kernels.load()
    try:
        stat = path.stat()
    except OSError:
        return None
    if compiled is None:
        return None
    ident = (f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{compiled.path.name}|"
             f"{sorted(QUANTIZED_CLASSES_PASSING_GATE.items())}|{dtype_name(kv_dtype)}")
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _choices_file() -> Path:
    return kernels.cache_dir() / "quantized-class-choices.json"


def _remembered(key: str, allowed: Collection[str] | None = None) -> str | None:
    """The choice kept for ``key``, if it is one of ``allowed`` (default: the classes that pass the gate)."""
    if allowed is None:
        allowed = [name for name, passed in QUANTIZED_CLASSES_PASSING_GATE.items() if passed]
    with contextlib.suppress(OSError, ValueError):
        choice = json.loads(_choices_file().read_text()).get(key)
        if choice in allowed:
            return str(choice)
    return None


def _remember(key: str, choice: str) -> None:
    """Keep ``auto``'s choice for the next start (best effort: a read-only cache just times again)."""
    with contextlib.suppress(OSError, ValueError):
        path = _choices_file()
        choices = json.loads(path.read_text()) if path.exists() else {}
        choices[key] = choice
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(choices))
        os.replace(tmp, path)


# auto also times float32 weights (dequantized at load) where they take at most this much: a safety
# net for a CPU whose quantized kernels are slow (a generic x86-64 build's; the AVX2 build's were, 20x,
# before their 8-lane tiles), never a 4 GiB model
FLOAT32_CANDIDATE_BYTES = 1 << 30
# auto times a larger model's classes on its first TIMING_LAYERS layers and its head, then builds the
# chosen class whole: the 1B Q4_K_M model's first start had built both classes whole (about 10 s, and
# a peak of 1.96 GiB against 1.25 once the choice is remembered), and a 7B model's would take minutes
TIMING_PREFIX_BYTES = 256 << 20
TIMING_LAYERS = 4


def choose_quantized_class(build: Callable[[str, int | None], LlamaModel], quantized: bool, exact: bool = False,
                           remember: str | None = None, float32_allowed: bool = False,
                           kv_dtype: torch.dtype | None = None, timing_layers: int | None = None) -> LlamaModel:
    """The model ``build(kind)`` in the class of quantized products ``REALIZAR_QUANTIZED`` asks for
    (``exact``: ``--dtype float32`` asked for float32 arithmetic, so the exact class); with ``auto``
    (the default), the fastest of the classes that pass the quality gate
    (``QUANTIZED_CLASSES_PASSING_GATE``; ``float32`` weights only when ``float32_allowed``), timed
    here on this CPU: a decode step of 1 sequence and one of 16, the two ends of what a server runs,
    each relative to the fastest class there. The timings, over a KV cache of ``kv_dtype`` (None: the
    model's dtype), are logged. With ``remember`` (a key of the model file and the kernels' build) the
    choice is kept in the cache directory, and a later start with the same key takes it without
    timing (about 1 s less to a healthy server). With ``timing_layers``, each class is timed on a model of
    that many layers (``build(name, timing_layers)``: the first ones, and the head) and the chosen one is
    then built whole."""
    wanted = "exact" if exact else kernels.quantized_class()
    if not quantized or wanted != "auto":
        return build("exact" if wanted == "auto" else wanted, None)
    candidates = [name for name, passed in QUANTIZED_CLASSES_PASSING_GATE.items()
                  if passed and (name != "float32" or float32_allowed)]
    if len(candidates) < 2:
        return build(candidates[0] if candidates else "exact", None)
    known = _remembered(remember) if remember else None
    if known is not None and known in candidates:
        log.info("quantized products: %s (auto, timed at an earlier start on this CPU)", known)
        return build(known, None)
    timings: dict[str, tuple[float, float]] = {}
    model: LlamaModel | None = None
    for name in candidates:
        model = None
        gc.collect()  # one class's weights in memory at a time: a 1B model's are 0.8 GiB
        model = build(name, timing_layers)
        timings[name] = (decode_step_seconds(model, 1, kv_dtype=kv_dtype),
                         decode_step_seconds(model, 16, kv_dtype=kv_dtype))
    # each class's time at each end relative to the best there, summed: both ends weigh the same,
    # though a step of 16 sequences takes several times one of 1
    fastest = [min(t[i] for t in timings.values()) for i in range(2)]
    best = min(timings, key=lambda name: sum(t / f for t, f in zip(timings[name], fastest, strict=True)))
    log.info("quantized products: %s (auto; a decode step of 1 | 16 sequences%s: %s)", best,
             "" if timing_layers is None else f", the first {timing_layers} layers and the head",
             ", ".join(f"{n} {a * 1000:.1f} | {b * 1000:.1f} ms" for n, (a, b) in timings.items()))
    if remember:
        _remember(remember, best)
    if best != candidates[-1] or model is None or timing_layers is not None:
        model = None
        gc.collect()
        model = build(best, None)
    return model


# auto times the AMX tiles on a decode step of this many sequences: the fewest rows they take
# (quant_tiles.c's TILE_MIN_ROWS), where they gain least
TILE_TIMING_SEQUENCES = 64


def choose_tiles(model: LlamaModel, remember: str | None = None, kv_dtype: torch.dtype | None = None) -> None:
    """Where the fast class's model runs on kernels with AMX tiles and ``REALIZAR_TILES`` is ``auto`` (the
    default): a decode step of ``TILE_TIMING_SEQUENCES`` sequences timed with the tiles off and on, alternated
    (the best of each), and the faster kept, logged and, with ``remember``, kept for the next start. Their
    speed on the shared VM where they were measured swung with the moment (BENCHMARKS.md): this measures
    the machine as it is at the first start."""
    compiled = getattr(model.backend, "kernels", None)
    if not getattr(model, "fast", False) or compiled is None or kernels.tiles_setting() != "auto":
        return
    if not compiled.tiles_available():
        return
    key = None if remember is None else remember + "|tiles"
    known = _remembered(key, ("on", "off")) if key else None
    if known is not None:
        compiled.set_tiles(known == "on")
        log.info("AMX tiles: %s (auto, timed at an earlier start on this CPU)", known)
        return
    best = {False: float("inf"), True: float("inf")}
    for _ in range(2):
        for on in (False, True):
            compiled.set_tiles(on)
            best[on] = min(best[on], decode_step_seconds(model, TILE_TIMING_SEQUENCES, kv_dtype=kv_dtype))
    chosen = best[True] < best[False]
    compiled.set_tiles(chosen)
    log.info("AMX tiles: %s (auto; a decode step of %d sequences: off %.1f | on %.1f ms)", "on" if chosen else "off",
             TILE_TIMING_SEQUENCES, best[False] * 1000, best[True] * 1000)
    if key:
        _remember(key, "on" if chosen else "off")


def attention_context(mc: ModelConfig) -> int:
    """The context length at which one token's attention (QK and PV: 4 * heads * head_dim
    flops per earlier token per layer) costs as much as its linear layers (2 flops per weight
    of a layer, the LM head left out). 3072 for SmolLM2-135M: a prompt chunk 8k tokens deep
    costs 3.6x as much per token as one at the start, before any kernel's own inefficiency."""
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    linear = mc.hidden_size * (q + 2 * kv) + q * mc.hidden_size + 3 * mc.hidden_size * mc.intermediate_size
    return max(1, linear // (2 * q))


@dataclass
class _Live:
    """Engine-thread bookkeeping for one request."""

    seq: Sequence
    row: SamplingRow
    stop_ids: frozenset[int]
    prompt_logprobs_sent: bool = False


class Engine:
    """Synchronous continuous-batching engine; one thread owns it."""

    def __init__(self, served: EngineModel, config: EngineConfig) -> None:
        self.served = served
        self.config = config
        mc = served.config
        model = served.model
        self.max_model_len = min(config.max_model_len or min(mc.max_position_embeddings, MAX_DEFAULT_MODEL_LEN),
                                 mc.max_position_embeddings)
        self.kv_dtype = resolve_kv_cache_dtype(config, model.device, model.dtype)
        per_block = KVCache.bytes_per_block(mc.num_layers, config.block_size, mc.num_kv_heads, mc.head_dim,
                                            self.kv_dtype)
        blocks_per_seq = -(-self.max_model_len // config.block_size)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            budget = self._kv_budget(model.device)
            num_blocks = min(budget // per_block, blocks_per_seq * config.max_num_seqs)
            num_blocks = max(num_blocks, blocks_per_seq)
        if num_blocks < blocks_per_seq:
            # a full-length sequence must fit in the cache, or it could never finish
            self.max_model_len = num_blocks * config.block_size
        idle_cached = None  # a CUDA cache is allocated up front: nothing to bound
        if model.device.type == "cpu" and config.prefix_cache_bytes is not None:
            idle_cached = config.prefix_cache_bytes // per_block
        self.allocator = BlockAllocator(num_blocks, config.block_size, idle_cached)
        self._memory_in_use = True  # blocks may have been touched since the last release_idle_memory
        cache = KVCache(mc.num_layers, num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim,
                        model.device, self.kv_dtype)
        self.runner = ModelRunner(model, cache)
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.long_prefill_token_threshold, attention_context(mc),
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.vocab_size = mc.vocab_size
        self.stats = StatsRecorder()
        self.live: dict[str, _Live] = {}
        # an end id the model cannot produce (a tokenizer's added token past the model's vocabulary)
        # could never be sampled, and banning it under min_tokens would index past the logits
        self.eos_ids = frozenset(t for t in (*served.tokenizer.eos_token_ids, *mc.eos_token_ids)
                                 if 0 <= t < mc.vocab_size)
        self._structured: StructuredCompiler | None = None
        self._structured_lock = threading.Lock()

    @property
    def structured(self) -> StructuredCompiler:
        """The compiler of structured-output specs for this model's tokenizer, built on first use (about
        0.25 s for a 49k vocabulary, so servers that never see a constrained request never pay it). Thread-safe:
        the server compiles with it to validate requests, the engine thread to make each request's matcher."""
        compiler = self._structured
        if compiler is None:
            with self._structured_lock:
                if self._structured is None:
                    self._structured = StructuredCompiler.from_tokenizer(self.served.tokenizer, self.vocab_size)
                compiler = self._structured
        return compiler

    @staticmethod
    def _kv_budget(device: torch.device) -> int:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free * 0.5)
        return KV_CACHE_BYTES_CPU

    def warm_up(self) -> None:
        """Run one short request so kernel selection and allocation happen before the first user."""
        prompt = list(range(1, 9))
        self.add(Request(prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)))
        while self.has_work():
            self.step()
        self.stats = StatsRecorder()
        self.scheduler.prefix_cache_queries = self.scheduler.prefix_cache_hits = 0
        # the warm-up touched a 2 MiB huge page of every layer's K and V (120 MiB of idle RSS for
        # the demo model's float32 cache) for blocks no one needs
        self.release_idle_memory()

    def release_idle_memory(self) -> None:
        """Between bursts of work: give back the CPU pages of every KV block that no sequence holds,
        except the cached prefixes within ``prefix_cache_bytes`` (``BlockAllocator.release_idle``).
        A no-op until a step has run since the last call."""
        if self._memory_in_use and not self.has_work() and self.runner.cache.on_host:
            start = time.perf_counter()
            keep, moves = self.allocator.release_idle()
            cache = self.runner.cache
            # the blocks neither kept nor still to be copied go first (most of the memory, at once),
            # then the cached prefixes kept are packed at the lowest ids, then their old places go
            cache.release_blocks(sorted({*keep, *(a for a, _ in moves)}))
            cache.copy_blocks(moves)
            cache.release_blocks(keep)
            _trim_heap()  # what the burst's requests allocated and freed, kept by glibc otherwise
            self._memory_in_use = False
            log.debug("idle: KV blocks kept %d (%d moved), the rest given back, in %.1f ms", len(keep), len(moves),
                      (time.perf_counter() - start) * 1000)

    # -- admission -------------------------------------------------------------------------

    def check_request(self, request: Request) -> None:
        """Refuse what could never run: over the context, or a token id outside the vocabulary
        (which would fail inside a step). The server checks the ids first and names the field;
        this check keeps any other caller from breaking a batch."""
        total = len(request.prompt_ids) + request.params.max_tokens
        if total > self.max_model_len:
            raise RequestTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{len(request.prompt_ids)} prompt tokens plus max_tokens {request.params.max_tokens}")
        for name, ids in (("prompt", request.prompt_ids), ("stop_token_ids", request.params.stop_token_ids),
                          ("logit_bias", tuple(t for t, _b in request.params.logit_bias))):
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"Token id {bad} in '{name}' is outside the vocabulary "
                                     f"(0..{self.vocab_size - 1})", param=name)

    def add(self, request: Request) -> list[TokenOutput]:
        """Queue a request; returns its final output at once when there is nothing to generate.
        Raises ValueError for a request :meth:`check_request` refuses."""
        self.check_request(request)
        if request.params.max_tokens == 0 and request.params.prompt_logprobs is None:
            return [TokenOutput(request.request_id, None, FinishReason.LENGTH,
                                num_prompt_tokens=len(request.prompt_ids), time=time.monotonic())]
        params = request.params
        # a spec the server did not compile first (another caller) may be bad: GrammarError is a ValueError
        matcher = None if params.structured is None else self.structured.matcher(params.structured)
        seq = Sequence(request, list(request.prompt_ids), len(request.prompt_ids))
        generator = None if params.greedy else make_generator(params.seed)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        # EOS and stop ids stay banned until min_tokens are out, the first token included
        banned = tuple(stop_ids) if params.min_tokens > 0 else ()
        penalties = Penalties(params, request.prompt_ids) if params.penalized else None
        self.live[request.request_id] = _Live(seq, SamplingRow(params, generator, banned, penalties, matcher),
                                              stop_ids)
        self.scheduler.add(seq)
        return []

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT,
              error: str | None = None) -> list[TokenOutput]:
        live = self.live.get(request_id)
        if live is None:
            return []
        return [self._finish(live, reason, None, error=error)]

    def expire(self, now: float) -> list[TokenOutput]:
        """Finish every request whose deadline has passed."""
        expired = [rid for rid, live in self.live.items()
                   if live.seq.request.deadline is not None and live.seq.request.deadline <= now]
        return [out for rid in expired for out in self.abort(rid, FinishReason.TIMEOUT)]

    # -- the step --------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[TokenOutput]:
        """Schedule, run and sample one batch; returns the events it produced.

        A failure inside the forward pass or the sampler commits nothing (only K/V at positions
        not yet counted as computed were written), so the batch can be run again. When the whole
        batch fails, it is split in halves and each half run again, recursively, until the
        requests that fail on their own are found: those end with an error, the others go on
        from where they were, as if the step had gone well. Only when every request fails on its
        own is the failure the engine's, and ``step`` raises (``AsyncEngine`` fails the batch
        and counts the step toward ``FATAL_AFTER_CONSECUTIVE_FAILURES``).
        """
        output = self.scheduler.schedule()
        self._memory_in_use = True
        if output.empty:
            return []
        now = time.monotonic()
        items = [*output.decodes, *output.prefills]
        for item in items:
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = now
        self.stats.num_preemptions_total = self.scheduler.num_preemptions
        rows = {item.seq.request_id: self.live[item.seq.request_id].row for item in items if item.samples}
        # where each row's generator stands, so a rerun draws what the first run would have
        states = {rid: row.save() for rid, row in rows.items()}
        failed: list[tuple[ScheduledSequence, Exception]] = []
        try:
            done = [(output, self.runner.execute(output, rows))]
        except Exception as exc:
            if len(items) == 1:
                raise
            log.warning("engine step of %d requests failed (%s: %s); isolating the cause",
                        len(items), type(exc).__name__, exc)
            done = self._isolate(items, rows, states, failed)
            if not done:
                raise  # every request fails on its own: the engine's failure, not a request's
        outputs: list[TokenOutput] = []
        for item, error in failed:
            log.error("request %s failed in the engine step: %s: %s", item.seq.request_id,
                      type(error).__name__, error)
            live = self.live[item.seq.request_id]
            outputs.append(self._finish(live, FinishReason.ERROR, None, error=f"{type(error).__name__}: {error}"))
        for part, result in done:
            outputs.extend(self._update(part, result))
        self.stats.num_steps_total += 1
        return outputs

    def _isolate(self, items: list[ScheduledSequence], rows: dict[str, SamplingRow], states: dict[str, object],
                 failed: list[tuple[ScheduledSequence, Exception]]) -> list[tuple[SchedulerOutput, StepResult]]:
        """Run the two halves of a failed batch again, recursively; a request that fails alone
        goes to ``failed``. Returns the parts that ran."""
        done: list[tuple[SchedulerOutput, StepResult]] = []
        mid = len(items) // 2
        for half in (items[:mid], items[mid:]):
            if not half:
                continue
            part = SchedulerOutput([i for i in half if i.num_tokens == 1], [i for i in half if i.num_tokens > 1])
            for item in half:
                rid = item.seq.request_id
                if rid in rows:
                    rows[rid].restore(states[rid])
            try:
                done.append((part, self.runner.execute(part, rows)))
            except Exception as exc:
                if len(half) == 1:
                    failed.append((half[0], exc))
                else:
                    done.extend(self._isolate(half, rows, states, failed))
        return done

    def _update(self, output: SchedulerOutput, result: StepResult) -> list[TokenOutput]:
        """Commit what a (part of a) step computed and turn its samples into events."""
        for seq, scored in result.prompt_logprobs:
            seq.prompt_logprobs.extend(scored)
        self.scheduler.commit(output)
        self.stats.prompt_tokens_total += sum(
            min(i.num_tokens, max(0, i.seq.num_prompt_tokens - (i.seq.num_computed - i.num_tokens)))
            for i in (*output.decodes, *output.prefills))
        outputs: list[TokenOutput] = []
        now = time.monotonic()
        for seq, token in result.sampled:
            live = self.live[seq.request_id]
            if seq.request.params.max_tokens == 0:  # the prompt was only there to be scored
                outputs.append(self._finish(live, FinishReason.LENGTH, None))
                continue
            try:
                outputs.append(self._accept(live, token.token_id, token.logprob, token.top_logprobs, now))
            except Exception as exc:  # a fault in one request fails that request alone
                log.exception("request %s failed", seq.request_id)
                outputs.append(self._finish(live, FinishReason.ERROR, None, error=str(exc) or type(exc).__name__))
        return outputs

    def _accept(self, live: _Live, token_id: int, logprob: float | None,
                top: tuple[tuple[int, float], ...], now: float) -> TokenOutput:
        seq = live.seq
        seq.token_ids.append(token_id)
        if live.row.penalties is not None:
            live.row.penalties.add(token_id)
        self.stats.generation_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.stats.observe_first_token(now - seq.request.arrival_time,
                                           (seq.first_scheduled_time or now) - seq.request.arrival_time)
        elif seq.last_token_time is not None:
            self.stats.observe_tokens([now - seq.last_token_time])
        seq.last_token_time = now
        params = seq.request.params
        reason = None
        matcher = live.row.matcher
        if matcher is not None:
            # The mask allowed only what the grammar allows, so a refusal is a fault (of the library, or of a
            # sampler that ignored the mask): it ends this request alone. Once the output is complete and
            # nothing may follow (EOS taken, or the grammar closed), the request is done, whatever ignore_eos
            # and min_tokens say: the grammar would allow only EOS from here on.
            if not matcher.accept(token_id):
                return self._finish(live, FinishReason.ERROR, None,
                                    error=f"token {token_id} is outside the request's structured output grammar: "
                                          f"{matcher.error}")
            if matcher.is_terminated():
                return self._finish(live, FinishReason.STOP, token_id, logprob, top)
        if token_id in live.stop_ids and seq.num_generated > params.min_tokens - 1:
            reason = FinishReason.STOP
        elif seq.num_generated >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            return self._finish(live, reason, token_id, logprob, top)
        # EOS and stop ids stay banned until min_tokens are out
        live.row.banned_token_ids = tuple(live.stop_ids) if seq.num_generated < params.min_tokens else ()
        return TokenOutput(seq.request_id, token_id, None, logprob, top, seq.num_prompt_tokens,
                           seq.num_generated, time=now, prompt_logprobs=self._prompt_logprobs(live),
                           num_cached_tokens=seq.num_cached_tokens or 0)

    @staticmethod
    def _prompt_logprobs(live: _Live) -> tuple[Logprob, ...] | None:
        """The prompt's logprobs, once the whole prompt is scored, on the next event of a request
        that asked for them: its first token's, or its last when max_tokens is 0."""
        seq = live.seq
        if (seq.request.params.prompt_logprobs is None or live.prompt_logprobs_sent
                or seq.num_prompt_scored < seq.num_prompt_tokens - 1):
            return None
        live.prompt_logprobs_sent = True
        return tuple(seq.prompt_logprobs)

    def _finish(self, live: _Live, reason: FinishReason, token_id: int | None, logprob: float | None = None,
                top: tuple[tuple[int, float], ...] = (), error: str | None = None) -> TokenOutput:
        seq = live.seq
        self.scheduler.finish(seq)
        del self.live[seq.request_id]
        now = time.monotonic()
        self.stats.observe_finished(now - seq.request.arrival_time, reason.value)
        return TokenOutput(seq.request_id, token_id, reason, logprob, top, seq.num_prompt_tokens,
                           seq.num_generated, error=error, time=now,
                           queue_time=None if seq.first_scheduled_time is None
                           else seq.first_scheduled_time - seq.request.arrival_time,
                           prompt_logprobs=self._prompt_logprobs(live),
                           num_cached_tokens=seq.num_cached_tokens or 0)

    def fail_all(self, error: str) -> list[TokenOutput]:
        return [out for rid in list(self.live) for out in self.abort(rid, FinishReason.ERROR, error)]

    def snapshot(self, healthy: bool, inbox: int) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + inbox,
            kv_cache_usage=self.allocator.usage,
            num_preemptions_total=self.scheduler.num_preemptions,
            prompt_tokens_total=self.stats.prompt_tokens_total,
            generation_tokens_total=self.stats.generation_tokens_total,
            num_steps_total=self.stats.num_steps_total,
            healthy=healthy,
            prefix_cache_queries_total=self.scheduler.prefix_cache_queries,
            prefix_cache_hits_total=self.scheduler.prefix_cache_hits,
        )


class RequestStream:
    """The outputs of one submitted request, ending with its finished event.

    ``aclose()`` before the end aborts the request, also when the stream was never iterated
    (an async generator's ``finally`` would not run then, and the request would keep its seat
    and its queue until it finished on its own)."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue[TokenOutput]) -> None:
        self.engine = engine
        self.request_id = request_id
        self.queue = queue
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self.queue.get()
        except BaseException:  # cancelled while waiting: nobody will read the rest
            await self.aclose()
            raise
        if out.finished:
            self.finished = True
            self.engine.release(self.request_id, abort=False)
        return out

    async def aclose(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.release(self.request_id, abort=True)


class AsyncEngine:
    """The asyncio face of the engine thread (see the module docstring)."""

    def __init__(self, served: EngineModel, config: EngineConfig) -> None:
        self.engine = Engine(served, config)
        self.engine.warm_up()
        self.config = config
        self.tokenizer = served.tokenizer
        self.model_config = served.config
        self.model_id = served.model_id
        self.model_format = served.format
        self.compute_mode = served.model.device.type
        self.kv_cache_dtype = dtype_name(self.engine.kv_dtype)
        self.compute_path = f"{served.model.compute_path}, {self.kv_cache_dtype} KV cache"
        self.dtype = dtype_name(served.model.dtype)
        self.load_seconds = served.load_seconds
        self.max_model_len = self.engine.max_model_len
        self.healthy = True
        self.fatal_error: str | None = None
        self._inbox: collections.deque[Request] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._shutting_down = False
        self._queues: dict[str, asyncio.Queue[TokenOutput]] = {}
        self._inbox_tokens = 0  # prompt tokens of the requests in the inbox
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_path(cls, path: str | Path, config: EngineConfig) -> AsyncEngine:
        return cls(load_engine_model(path, config), config)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Everything allocated so far (weights' wrappers, tokenizer, modules) lives as long as
        # the server: move it out of the garbage collector's sight, so that collections while
        # serving scan only what requests allocate and stay short (no multi-ms pauses in a step).
        gc.collect()
        gc.freeze()
        self._thread = threading.Thread(target=self._run, name="realizar-engine", daemon=True)
        self._thread.start()

    def begin_shutdown(self) -> None:
        self._shutting_down = True

    @property
    def num_in_flight(self) -> int:
        """Admitted requests whose streams have not ended."""
        return len(self._queues)

    async def drain(self, timeout: float) -> bool:
        """Wait until every admitted request has finished; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.num_in_flight

    async def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # -- requests --------------------------------------------------------------------------

    def submit(self, request: Request) -> RequestStream:
        """Admit a request and return the stream of its outputs (see errors.py for refusals)."""
        if not self.healthy:
            raise EngineDead(f"the engine has stopped after a fatal error: {self.fatal_error}")
        if self._shutting_down:
            raise EngineDead("the server is shutting down")
        self.engine.check_request(request)
        scheduler = self.engine.scheduler
        tokens = len(request.prompt_ids)
        # What waits is the inbox plus the scheduler's waiting queue: the engine thread moves a
        # request from one to the other under the same lock, so it is always counted once.
        with self._lock:
            free_seats = max(0, self.config.max_num_seqs - len(scheduler.running))
            queued = len(self._inbox) + len(scheduler.waiting)
            if queued >= free_seats + self.config.max_queued_requests:
                raise EngineOverloaded(f"server overloaded: {queued} requests are already queued",
                                       retry_after=1.0)
            waiting_tokens = self._inbox_tokens + scheduler.num_waiting_tokens
            if waiting_tokens + tokens > self.config.max_queued_tokens and queued > 0:
                raise EngineOverloaded(f"server overloaded: {waiting_tokens} prompt tokens are already queued",
                                       retry_after=1.0)
            self._inbox_tokens += tokens
            queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
            self._queues[request.request_id] = queue
            self._inbox.append(request)
        self._wake.set()
        return RequestStream(self, request.request_id, queue)

    def release(self, request_id: str, abort: bool) -> None:
        """Forget a request's output queue (its stream is done with), aborting it if it has not
        finished."""
        self._queues.pop(request_id, None)
        if abort:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed on the next engine step. Idempotent."""
        self._aborts.append(request_id)
        self._wake.set()

    def compile_structured(self, spec: StructuredSpec) -> None:
        """Compile ``spec`` into the engine's cache, so that a bad one is refused before it is queued: raises
        :class:`GrammarError` naming the problem. Milliseconds for a new spec (the first one also builds the
        compiler, about 0.25 s), microseconds for a cached one; the server calls it off the event loop."""
        self.engine.structured.compile(spec)

    def stats(self) -> EngineStats:
        return self.engine.snapshot(self.healthy, len(self._inbox))

    def drain_observations(self) -> LatencyObservations:
        return self.engine.stats.drain()

    # -- the engine thread -----------------------------------------------------------------

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _publish(self, outputs: list[TokenOutput]) -> None:
        if outputs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _admit(self) -> list[TokenOutput]:
        outputs: list[TokenOutput] = []
        while self._inbox:
            with self._lock:
                request = self._inbox.popleft()
                self._inbox_tokens -= len(request.prompt_ids)
                try:
                    outputs.extend(self.engine.add(request))
                except ValueError as exc:  # submit checked it; this is the engine's own guard
                    outputs.append(TokenOutput(request.request_id, None, FinishReason.ERROR, error=str(exc),
                                               num_prompt_tokens=len(request.prompt_ids), time=time.monotonic()))
        while self._aborts:
            outputs.extend(self.engine.abort(self._aborts.popleft()))
        return outputs

    def _run(self) -> None:
        failures = 0
        engine = self.engine
        while not self._stop:
            self._wake.clear()
            outputs = self._admit()
            outputs.extend(engine.expire(time.monotonic()))
            if engine.has_work():
                try:
                    outputs.extend(engine.step())
                    failures = 0
                except Exception as exc:  # the whole batch failed: fail its requests, keep serving
                    failures += 1
                    log.exception("engine step failed (%d in a row)", failures)
                    outputs.extend(engine.fail_all(f"engine step failed: {type(exc).__name__}"))
                    if failures >= FATAL_AFTER_CONSECUTIVE_FAILURES:
                        self.fatal_error = f"{type(exc).__name__}: {exc}"
                        self.healthy = False
            self._publish(outputs)
            if not self.healthy:
                self._publish(self._admit() + engine.fail_all("engine is dead"))
                self._wake.wait(0.1)
            elif not engine.has_work() and not self._inbox and not self._aborts:
                engine.release_idle_memory()  # RSS follows the load: a few ms, once per burst
                self._wake.wait(0.5)
