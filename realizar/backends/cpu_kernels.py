"""The CPU-kernel backend: float32 on the CPU, every operation in the compiled kernels
(``realizar.kernels``), which read and write the paged KV cache in place.

- **Linear layers, float32 weights** (:class:`PackedLinear`): the weight is packed once into
  16-column panels and multiplied by ``packed_gemm.c``. A BLAS sgemm repacks the weight on
  every call; at the 1-64 rows of a decode step that costs as much as the arithmetic, and the
  packed product measured 1.2-2.1x numpy's OpenBLAS there (``benchmarks/matmul.py``). Each
  output is one multiply-add chain in a fixed order, so a row's result does not depend on the
  other rows of the batch.
- **GGUF block-quantized weights** (:class:`QuantLinear`): kept in their blocks, repacked once
  into ``quant_gemm.c``'s records, dequantized exactly in the kernel. A decode step then reads
  0.6-1.1 bytes per weight instead of 4. Its fast class (``fast=True``: each activation as two
  int8 terms, integer dot products: every row with VNNI or AVX2, up to ``fast_max_rows`` rows elsewhere and
  the exact products for more) is not exact but passes the quality gate
  (``benchmarks/quality.py``); ``auto`` times both classes at load and keeps the faster. On a CPU with
  AMX, its products of many rows may go to ``quant_tiles.c`` instead (each operand as two bfloat16 terms
  on the tiles), where ``REALIZAR_TILES`` asks or ``auto`` finds them faster at the first start.
- **RMSNorm, RoPE, SiLU-and-multiply** (``pointwise.c``): one pass each.
- **Attention** (``paged_attention.c``, ``prefill_attention.c``): all of a step's queries in one
  call that reads the pages directly; each query row, decode or prompt token, attends to its own
  prefix of its sequence's cache.
- **Sampling** (``sampling.c``): one pass per row, without a probability tensor.

All compute the float32 sums of the torch backend (``realizar.backends.torch_backend``) up to
rounding order, which the golden tests bound against transformers. The kernels keep their own
thread pool, sized by ``matmul_threads``, apart from torch's OpenMP pool: the matmuls use every
core while torch's many small ops stay on one thread.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence

import torch

from realizar import kernels
from realizar.backends.backend import AttentionMetadata, LayerStack, LinearLayer
from realizar.backends.torch_backend import float_weight
from realizar.kv_cache import KVCache
from realizar.loading.quants import QuantizedTensor


class PackedLinear:
    """A fixed float32 weight ``[out, in]`` (and optional bias ``[out]``) applied to ``x [T, in]`` by
    ``packed_gemm.c``, over the weight packed once into panels."""

    def __init__(self, weight: torch.Tensor, compiled: kernels.CpuKernels, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.kernels = compiled
        self._packed = compiled.pack(weight)  # [panels, in, 16]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernels.gemm(x, self._packed, self.out_features)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``W`` ``[len(ids), in]``: the embedding lookup when embeddings are tied."""
        return self._packed[ids // kernels.PANEL, :, ids % kernels.PANEL]

    def ranked(self, x: torch.Tensor, argmax: torch.Tensor | None = None) -> torch.Tensor:
        return self(x)  # float32 weights: no cheaper way, and no argmax on the way


# Logits computed again with both terms per row of a ranked LM head (16 each): the greedy token and
# what sampling draws from are among them (quality gate: benchmarks/quality.py)
RANKED_PANELS = 8


class QuantLinear:
    """A block-quantized weight ``[out, in]`` (and optional bias) applied to ``x [T, in]`` by the
    compiled kernels, exactly as :class:`Linear` applies its dequantized float32 weight.

    The weight may come in parts stacked along ``out`` (the fused q/k/v or gate/up projections)
    of different GGUF types, as Q4_K_M files mix Q4_K and Q6_K: parts of one type are
    packed into one weight (the fast class lays each out from its own blocks into its panels; the
    exact class concatenates them), and each remaining part writes its own columns of the output.
    """

    def __init__(self, parts: list[QuantizedTensor], compiled: kernels.CpuKernels,
                 bias: torch.Tensor | None = None, fast: bool = False) -> None:
        self.kernels = compiled
        self.bias = bias
        self.fast = fast
        self.in_features = parts[0].shape[1]
        assert all(p.shape[1] == self.in_features for p in parts)
        runs: list[list[QuantizedTensor]] = []
        for part in parts:
            if runs and runs[-1][0].qtype == part.qtype:
                runs[-1].append(part)
            else:
                runs.append([part])
        self.formats = tuple(run[0].qtype.name for run in runs)  # the GGUF types, e.g. ("Q4_K", "Q6_K")
        self.parts: list[kernels.QuantPacked | kernels.FastPacked] = []
        for run in runs:
            if fast:  # laid out from the file's blocks in C, for every format kept quantized, part by part
                self.parts.append(compiled.pack_fast_blocks([p.raw for p in run], run[0].qtype.name, self.in_features))
                continue
            weight = QuantizedTensor.cat(run) if len(run) > 1 else run[0]
            ints = weight.integers()
            # float16 scales where that is exact: fewer bytes to read, the same floats
            fmt = kernels.quant_format(ints.bits, ints.offset, ints.mins is not None, ints.group,
                                       kernels.exact_in_half(ints.scales, ints.mins))
            assert fmt is not None, f"no kernel format for {run[0].qtype.name}"
            self.parts.append(compiled.pack_quantized(ints.q, ints.scales, ints.mins, fmt))
        self.out_features = sum(p.n for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def _product(self, x: torch.Tensor, part: kernels.QuantPacked | kernels.FastPacked,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(part, kernels.FastPacked):
            return self.kernels.quant_gemm_fast(x, part, out)
        return self.kernels.quant_gemm(x, part, out)

    def _rows(self, part: kernels.QuantPacked | kernels.FastPacked, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(part, kernels.FastPacked):
            return self.kernels.fast_rows(part, ids)
        return self.kernels.quant_rows(part, ids)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x W^T (+ b)``; the products written into ``out`` ``[T, out_features]`` where given (a bias is then
        added in a new tensor)."""
        if len(self.parts) == 1 and out is None:
            y = self._product(x, self.parts[0])
        else:
            y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32) if out is None else out
            start = 0
            for part in self.parts:
                self._product(x, part, y[:, start:start + part.n])
                start += part.n
        return y if self.bias is None else y + self.bias

    def ranked(self, x: torch.Tensor, argmax: torch.Tensor | None = None) -> torch.Tensor:
        """``self(x)`` for an LM head: with the fast class, each row's ``RANKED_PANELS`` panels of 16
        logits with the largest values as ``self(x)`` gives them, the others from the activations'
        coarse int8 term alone (``CpuKernels.quant_gemm_fast_ranked``, which finds the ranked rows'
        ``argmax`` too); the exact class, as ``self(x)``."""
        part = self.parts[0]
        if len(self.parts) == 1 and self.bias is None and isinstance(part, kernels.FastPacked):
            return self.kernels.quant_gemm_fast_ranked(x, part, RANKED_PANELS, argmax=argmax)
        return self(x)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``W`` ``[len(ids), in]``, dequantized exactly: the embedding lookup."""
        if len(self.parts) == 1:
            return self._rows(self.parts[0], ids)
        if bool(((ids < 0) | (ids >= self.out_features)).any()):
            raise IndexError(f"a row id is outside [0, {self.out_features})")
        out = torch.empty(ids.shape[0], self.in_features, dtype=torch.float32)
        start = 0
        for part in self.parts:
            mine = (ids >= start) & (ids < start + part.n)
            if bool(mine.any()):
                out[mine] = self._rows(part, ids[mine] - start)
            start += part.n
        return out



def _describe(linear: LinearLayer) -> kernels.DecoderLinear:
    """A layer of this backend as ``decoder.c``'s ``struct realizar_linear`` (TypeError for any other)."""
    d = kernels.DecoderLinear(in_features=linear.in_features, out_features=linear.out_features)
    if isinstance(linear, PackedLinear):
        d.parts, d.weights[0], d.rows[0], d.kind[0] = 1, linear._packed.data_ptr(), linear.out_features, \
            kernels.LINEAR_PACKED
    elif isinstance(linear, QuantLinear) and len(linear.parts) <= kernels.MAX_LINEAR_PARTS:
        d.parts = len(linear.parts)
        for i, part in enumerate(linear.parts):
            d.weights[i], d.rows[i] = part.records.data_ptr(), part.n
            if isinstance(part, kernels.FastPacked):
                d.kind[i], d.format[i], d.offset[i] = kernels.LINEAR_FAST, part.kind, part.c
            else:
                d.kind[i], d.format[i] = kernels.LINEAR_QUANT, part.fmt.code
    else:
        raise TypeError(f"{type(linear).__name__} has no decoder.c form")
    bias = getattr(linear, "bias", None)
    if bias is not None:
        assert bias.is_contiguous() and bias.dtype == torch.float32
        d.bias = bias.data_ptr()
    return d


class CpuKernelsBackend:
    """Every operation of the forward pass in the compiled kernels: float32 on the CPU only."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, compiled: kernels.CpuKernels) -> None:
        self.kernels = compiled
        # each model's layers as decoder.c reads them, by id (the weak reference tells a reused id)
        self._layers: dict[int, tuple[weakref.ref[LayerStack], ctypes.Array[kernels.DecoderLayer] | None]] = {}
        # the cache whose tensors each model's described layers point at, by the model's id: an engine's cache
        # is the same every step, and pointing 30 layers at it took 18-27 us of Python a step
        self._bound: dict[int, weakref.ref[KVCache]] = {}

    def linear(self, parts: Sequence[torch.Tensor | QuantizedTensor], bias: torch.Tensor | None = None,
               fast: bool = False) -> LinearLayer:
        """:class:`QuantLinear` when the parts are all quantized, else :class:`PackedLinear` over the
        float weights. ``fast`` picks the quantized layer's fast class (two int8 terms per
        activation), which is not exact."""
        quantized = [p for p in parts if isinstance(p, QuantizedTensor)]
        if len(quantized) == len(parts):
            return QuantLinear(quantized, self.kernels, bias, fast)
        return PackedLinear(float_weight(parts, self.device, self.dtype), self.kernels, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.kernels.rms_norm(x, weight, eps)

    def rope(self, qkv: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.kernels.rope(qkv, heads, head_dim, positions, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_mul(gate_up)

    def write_kv(self, cache: KVCache, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kernels.write_kv(cache.keys[layer], cache.values[layer], slots, k, v, *cache.scales(layer))

    def attention(self, q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata,
                  scale: float) -> torch.Tensor:
        tables, rows, lens = meta.query_rows(cache.block_size)
        return self.kernels.paged_attention(q, cache.keys[layer], cache.values[layer], tables, lens,
                                            cache.block_size, scale, rows, *cache.scales(layer))

    def run_layers(self, model: LayerStack, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                   cache: KVCache) -> torch.Tensor:
        """Every layer in one kernel call (``decoder.c``): the same kernels in the same order as
        ``model.layers_forward``, without the ~450 Python calls and allocations between them."""
        layers = self._described(model)
        if layers is None:  # a layer the fused call cannot describe
            return model.layers_forward(x, positions, meta, cache)
        bound = self._bound.get(id(model))
        if bound is None or bound() is not cache:
            for i in range(len(layers)):
                layers[i].key_cache, layers[i].value_cache = cache.keys[i].data_ptr(), cache.values[i].data_ptr()
                key_scales, value_scales = cache.scales(i)
                layers[i].key_scales = None if key_scales is None else key_scales.data_ptr()
                layers[i].value_scales = None if value_scales is None else value_scales.data_ptr()
            self._bound[id(model)] = weakref.ref(cache)
        c = model.config
        tables, rows, lens = meta.query_rows(cache.block_size)
        positions, slots = positions.contiguous(), meta.slot_mapping.contiguous()
        step = kernels.DecoderStep(
            positions=positions.data_ptr(), slots=slots.data_ptr(), tables=tables.data_ptr(), rows=rows.data_ptr(),
            lens=lens.data_ptr(), cos=model.cos.data_ptr(), sin=model.sin.data_ptr(), max_blocks=tables.shape[1],
            block_size=cache.block_size, heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
            hidden=c.hidden_size, intermediate=c.intermediate_size, eps=c.rms_norm_eps, scale=model.scale,
            kv=kernels.kv_kind(cache.keys[0], cache.values[0], *cache.scales(0)))
        x = x.contiguous()
        self.kernels.decoder_layers(x, layers, step)
        return x

    def _described(self, model: LayerStack) -> ctypes.Array[kernels.DecoderLayer] | None:
        """The model's layers as ``decoder.c`` reads them, built once per model (None where a layer is
        not one of this backend's)."""
        cached = self._layers.get(id(model))
        if cached is not None and cached[0]() is model:
            return cached[1]
        try:
            described = (kernels.DecoderLayer * len(model.layers))(*(
                kernels.DecoderLayer(attn_norm=layer.attn_norm.data_ptr(), mlp_norm=layer.mlp_norm.data_ptr(),
                                     qkv=_describe(layer.qkv), o=_describe(layer.o),
                                     gate_up=_describe(layer.gate_up), down=_describe(layer.down))
                for layer in model.layers))
        except TypeError:
            described = None
        self._layers[id(model)] = (weakref.ref(model), described)
        self._bound.pop(id(model), None)  # new layers point at no cache yet
        return described

    def sample(self, logits: torch.Tensor, rows: torch.Tensor, temperatures: torch.Tensor,
               uniforms: torch.Tensor) -> torch.Tensor:
        return self.kernels.sample(logits, rows, temperatures, uniforms)

    def describe(self, linears: Sequence[LinearLayer]) -> str:
        """The kernels' ISA, the weights' format and the activations' type (``linears[0]``: the LM head)."""
        quantized = [lin for lin in linears if isinstance(lin, QuantLinear)]
        if not quantized:
            return f"cpu kernels {kernels.isa()}, float32 weights and activations"
        formats = sorted({f for lin in quantized for f in lin.formats})
        rows = self.kernels.fast_max_rows
        terms = "int16 activations" if self.kernels.fast_activation_bits == 16 else "2 x int8 activations"
        int8 = terms + (f" up to {rows} rows, float32 beyond" if rows < kernels.FAST_EVERY_ROW else "")
        if self.kernels.tiles:
            kinds = {part.kind for lin in quantized for part in lin.parts if isinstance(part, kernels.FastPacked)}
            fewest = "/".join(str(r) for r in sorted({self.kernels.tile_min_rows(k) for k in kinds}))
            int8 += f", 2 x bfloat16 on AMX tiles from {fewest} rows"
            head = linears[0]
            if isinstance(head, QuantLinear) and head.fast and all(
                    isinstance(part, kernels.FastPacked) and self.kernels.tile_ranks(part.kind) for part in head.parts):
                int8 += ", the LM head's ranking pass on AMX int8 tiles"
        exact = "float32 activations (exact class)"
        activations = f"{int8} (fast class)" if any(lin.fast for lin in quantized) else exact
        kept = "" if len(quantized) == len(linears) else f", {len(linears) - len(quantized)} float32 layers"
        return f"cpu kernels {kernels.isa()}, {'+'.join(formats)} weights kept quantized{kept}, {activations}"
