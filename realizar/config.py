"""Frozen configuration dataclasses shared by every layer.

Nothing writes to a config after it is built; checks live in ``__post_init__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
KVCacheDType = Literal["auto", "float32", "float16", "int8"]
KV_CACHE_DTYPES = ("auto", "float32", "float16", "int8")

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

# max_tokens of a request that gives none, by the route whose body defines the field (/batch/generate
# and /stream/generate take /generate's body; `realizar generate` follows /generate). None: the room
# left in the context, at most --max-tokens-limit. docs/api.md states each; a unit test holds them equal.
DEFAULT_MAX_TOKENS: dict[str, int | None] = {
    "/generate": 50,
    "/v1/completions": 16,
    "/v1/chat/completions": None,
}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_scaling`` in HF configs). ``kind`` is one of
    ``none``, ``linear`` or ``llama3``."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("none", "linear", "llama3"):
            raise ValueError(f"unsupported rope scaling type {self.kind!r}")
        if self.factor <= 0:
            raise ValueError("rope scaling factor must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model, read from GGUF metadata or config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"expected one of {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches and where it runs."""

    device: Device = "auto"
    dtype: DType = "auto"
    # what the KV cache stores (--kv-cache-dtype, vLLM's flag): auto is float16 on the CPU kernels, which
    # passed the quality gate (realizar.model.quality), and the model's dtype elsewhere and with
    # --dtype float32 (the exact configuration: float32 everywhere)
    kv_cache_dtype: KVCacheDType = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from max_num_seqs * max_model_len
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    # the prompt tokens' worth of compute of each prompt's chunk in a step that also carries decodes (a
    # prompt whose rest costs at most twice that goes whole; without decodes a chunk may use all of
    # max_num_batched_tokens); chosen with benchmarks/long_prompt.py, see docs/api.md "Scheduling"
    long_prefill_token_threshold: int = 16
    max_model_len: int | None = None  # None: the model's own context, capped at 2048
    max_queued_requests: int = 256
    max_queued_tokens: int = 262144
    seed: int = 0
    threads: int | None = None  # CPU kernel threads (torch gets one fewer); None: one per core
    # reuse the K/V of cached full blocks of an earlier request's prefix (--no-prefix-caching: off)
    enable_prefix_caching: bool = True
    # CPU memory the K/V of cached prefixes that no running request holds may keep (--prefix-cache-mib).
    # Past it the least recently used are evicted before a never-written block is touched, and given
    # back to the OS when the engine goes idle: RSS then follows the load, not the pool's size. 128 MiB
    # keeps ~5,800 tokens of the demo model's float16 K/V (a long shared system prompt and the recent
    # conversations' histories). None: no bound. A CUDA cache is allocated up front and is never bounded.
    prefix_cache_bytes: int | None = 128 << 20

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError("threads must be > 0")
        if self.block_size <= 0:
            raise ValueError("block_size must be > 0")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be > 0")
        if self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be > 0")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # every running sequence's decode must fit in one step, or the newest would starve
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs})")
        if self.long_prefill_token_threshold <= 0:
            raise ValueError("long_prefill_token_threshold must be > 0")
        if self.max_queued_requests < 0 or self.max_queued_tokens < 0:
            raise ValueError("queue bounds must be >= 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError("num_kv_blocks must be > 0")
        if self.prefix_cache_bytes is not None and self.prefix_cache_bytes < 0:
            raise ValueError("prefix_cache_bytes must be >= 0 (or None: no bound)")


METRICS_COMPAT = frozenset({None, "vllm"})


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-level settings."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_tokens_limit: int = 4096
    max_batch_size: int = 64
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0
    shutdown_timeout: float = 30.0
    cors_origins: tuple[str, ...] = ()
    access_log: bool = True
    # Special tokens typed in prompts and messages are text unless this is set; only a chat template's own
    # markup makes control tokens.
    allow_special_tokens_in_content: bool = False
    max_messages: int = 1024  # chat messages in one request
    # --served-model-name: the names the model answers to; the first is the id reported. Empty: the model's own.
    served_model_names: tuple[str, ...] = ()
    # Connection limits (realizar.server.connection): what a client may hold before the app sees a request.
    max_connections: int = 2048  # open HTTP connections; kept below RLIMIT_NOFILE at start
    idle_timeout: float = 5.0  # a connection with no request begun (new, or kept alive)
    header_timeout: float = 10.0  # from a request's first byte to the end of its headers
    body_timeout: float = 30.0  # from the end of the headers to the end of the body
    max_header_bytes: int = 65536  # request line and headers together
    max_headers: int = 100
    # --metrics-compat: extra /metrics series named as another server names them ("vllm"), for dashboards
    # and autoscalers built for it. None: realizar's own series only.
    metrics_compat: str | None = None

    def __post_init__(self) -> None:
        if self.metrics_compat not in METRICS_COMPAT:
            raise ValueError(f"metrics_compat must be one of {sorted(c for c in METRICS_COMPAT if c)} or unset")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in 0..65535")
        if min(self.max_tokens_limit, self.max_batch_size, self.max_body_bytes, self.max_messages,
               self.max_connections, self.max_header_bytes, self.max_headers) <= 0:
            raise ValueError("limits must be > 0")
        if self.request_timeout <= 0 or self.shutdown_timeout < 0:
            raise ValueError("timeouts must be positive")
        if any(not name.strip() for name in self.served_model_names):
            raise ValueError("served model names must not be empty")
        if min(self.idle_timeout, self.header_timeout, self.body_timeout) <= 0:
            raise ValueError("connection timeouts must be > 0")
