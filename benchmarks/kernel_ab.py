"""Two builds of the CPU kernels in one process, their layer products timed turn by turn.

On a shared VM the CPU's speed swings by 2x within seconds (BENCHMARKS.md, "AMX Xeon"), so two
builds timed one after the other, even alternated run by run, differ by more than most changes
to a kernel. Here both libraries are loaded at once: this checkout's, and the one built from
another copy's ``realizar/kernels`` (``--other``). Every repetition times each build on the same
products, in turns whose order alternates, and the best time of each is kept, so a slow stretch
costs both builds alike.

Usage (from the repository root)::

    git worktree add /tmp/base HEAD          # the build to compare against
    # ... change realizar/kernels/*.c here ...
    .venv/bin/python benchmarks/kernel_ab.py --other /tmp/base
    .venv/bin/python benchmarks/kernel_ab.py --other /tmp/base --rows 16,64,512 --layers 4 --repeats 40
    .venv/bin/python benchmarks/kernel_ab.py --other /tmp/base --rows "" --steps 1,64 --context 96
    .venv/bin/python benchmarks/kernel_ab.py --other /tmp/base --rows 64 --layers 0 --head

The weights are the default model's (or ``--model``'s), packed by this checkout, so the other build
must read the same records: the printed max difference between the two builds' outputs says whether
it does. The fast class, with AMX tiles where the CPU has them unless ``--tiles off``. Prints, per
kind of product and in all, the best milliseconds of each build, this build's best over the other's,
and the median over the turns of this build's time over the other's in the same turn (below 1: this
build is faster). An ``--other`` with the same sources loads the same library: the ratios of that A/A
run are the noise left. ``--steps``: whole decode steps too (every layer, attention over ``--context``
tokens of a float16 cache, the LM head), for a change outside the products.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from realizar import kernels
from realizar.backends.cpu_kernels import QuantLinear
from realizar.config import EngineConfig
from realizar.engine.engine import load_engine_model
from realizar.kv_cache import KVCache
from realizar.loading import default_model_path
from realizar.model.llama import AttentionMetadata, LlamaModel

KINDS = ("qkv", "o", "gate_up", "down")
POOL_SPIN_S = 0.003  # an idle pool's workers spin for 2 ms (thread_pool.c): the other build's are asleep first


def use(model: LlamaModel, build: kernels.CpuKernels) -> None:
    """Every kernel call of ``model`` through ``build``: its backend's and each quantized layer's."""
    model.backend.kernels = build  # type: ignore[attr-defined]
    for lin in [model.lm_head, *(getattr(layer, kind) for layer in model.layers for kind in KINDS)]:
        if isinstance(lin, QuantLinear):
            lin.kernels = build


def in_turn(builds: dict[str, kernels.CpuKernels], turn: int) -> list[str]:
    """The builds' order in a turn: alternated, so that neither always runs first."""
    return list(builds) if turn % 2 == 0 else list(reversed(builds))


def compared(this: list[float], that: list[float]) -> str:
    """Each build's best time (ms), this over the other's best, and the median over the turns of this over the
    other in the same turn, as table cells."""
    ratios = sorted(a / b for a, b in zip(this, that, strict=True))
    return (f"{min(this) * 1e3:.2f} | {min(that) * 1e3:.2f} | {min(this) / min(that):.3f} | "
            f"{ratios[len(ratios) // 2]:.3f}")


def decode_step(model: LlamaModel, sequences: int,
                context: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, KVCache, torch.Tensor]:
    """A decode step of ``sequences`` sequences ``context`` tokens deep, each in its own blocks of a float16
    cache whose earlier positions hold garbage (the same time as real keys), as ``model.forward``'s arguments."""
    c, block = model.config, 16
    blocks = context // block + 1
    cache = KVCache(c.num_layers, sequences * blocks, block, c.num_kv_heads, c.head_dim, model.device, torch.float16)
    seqs = torch.arange(sequences)
    tables = seqs[:, None] * blocks + torch.arange(blocks)[None, :]
    meta = AttentionMetadata(slot_mapping=tables[:, context // block] * block + context % block,
                             num_decodes=sequences, decode_block_tables=tables,
                             decode_context_lens=torch.full((sequences,), context + 1), prefills=[])
    ids, positions = (seqs * 7919 + 11) % c.vocab_size, torch.full((sequences,), context)
    return ids, positions, meta, cache, seqs


def time_steps(model: LlamaModel, builds: dict[str, kernels.CpuKernels], counts: list[int], context: int,
               turns: int) -> None:
    print("\n| decode step | this | other | this / other, best | this / other, median of turns |\n|---|---|---|---|---|")
    for sequences in counts:
        args = decode_step(model, sequences, context)
        times: dict[str, list[float]] = {name: [] for name in builds}
        for turn in range(turns + 1):
            for name in in_turn(builds, turn):
                use(model, builds[name])
                time.sleep(POOL_SPIN_S)
                start = time.perf_counter()
                model.forward(*args)
                if turn:  # the first turn warms each build's buffers
                    times[name].append(time.perf_counter() - start)
        use(model, builds["this"])
        print(f"| {sequences} sequences at context {context} | {compared(times['this'], times['other'])} |")


def time_head(model: LlamaModel, builds: dict[str, kernels.CpuKernels], counts: list[int], turns: int) -> None:
    """The LM head's ranked product (``QuantLinear.ranked``) of ``counts`` rows, each build in turn, and whether
    the two builds' logits and greedy tokens agree."""
    head = model.lm_head
    assert isinstance(head, QuantLinear), "a quantized LM head only"
    print("\n| LM head, rows | this | other | this / other, best | this / other, median of turns | max difference |"
          " same argmax |\n|---|---|---|---|---|---|---|")
    for m in counts:
        x = torch.randn(m, head.in_features)
        times: dict[str, list[float]] = {name: [] for name in builds}
        found = {name: torch.empty(m, dtype=torch.int64) for name in builds}
        logits = {}
        for turn in range(turns + 1):
            for name in in_turn(builds, turn):
                use(model, builds[name])
                time.sleep(POOL_SPIN_S)
                start = time.perf_counter()
                logits[name] = head.ranked(x, found[name])
                if turn:  # the first turn warms each build's buffers
                    times[name].append(time.perf_counter() - start)
        use(model, builds["this"])
        difference = float((logits["this"] - logits["other"]).abs().max())
        print(f"| {m} | {compared(times['this'], times['other'])} | {difference:.1e} | "
              f"{bool(torch.equal(found['this'], found['other']))} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", type=Path, required=True, help="another realizar checkout (its realizar/kernels)")
    parser.add_argument("--model", type=Path, default=None, help="default: the demo model")
    parser.add_argument("--rows", default="64,512", help="rows of each product (tokens of a step), comma-separated")
    parser.add_argument("--layers", type=int, default=6, help="the first N layers' products, each with its own weights")
    parser.add_argument("--repeats", type=int, default=20, help="turns of each build")
    parser.add_argument("--tiles", choices=("on", "off"), default="on", help="AMX tiles, where the CPU has them")
    parser.add_argument("--head", action="store_true",
                        help="also the LM head's ranked product (what a decode step's logits come from) at each --rows")
    parser.add_argument("--steps", default="", help="also whole decode steps of these many sequences, comma-separated")
    parser.add_argument("--context", type=int, default=96, help="--steps: tokens each sequence attends to")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    steps = [int(r) for r in args.steps.split(",") if r.strip()]
    directory = args.other / "realizar" / "kernels"
    if not (directory / "quant_tiles.c").is_file():
        parser.error(f"{args.other} is not a realizar checkout (no realizar/kernels/quant_tiles.c)")

    os.environ["REALIZAR_QUANTIZED"] = "fast"
    os.environ["REALIZAR_TILES"] = args.tiles
    mine = kernels.load()
    path = kernels._build(directory.resolve())
    if mine is None or path is None:
        print("no C compiler, or the kernels are switched off: nothing to compare", file=sys.stderr)
        return 1
    other = kernels.CpuKernels(path)
    config = EngineConfig(device="cpu", max_model_len=256, max_num_seqs=4)
    model = load_engine_model(args.model or default_model_path(), config).model
    other.set_threads(mine.threads())
    for k in (mine, other):
        k.set_tiles(args.tiles == "on")
    builds = {"this": mine, "other": other}
    same = " (the same sources: an A/A run, whose ratios show the noise left)" if path == kernels._build() else ""
    print(f"this build: {kernels._build()}\nother build: {path}{same}\n"
          f"{args.layers} layers, fast class, tiles {args.tiles} (this build can use them: {mine.tiles}); "
          f"best of {args.repeats} turns each, in ms")
    if steps:
        time_steps(model, builds, steps, args.context, args.repeats)
    if args.head:
        time_head(model, builds, rows, args.repeats)
    if not rows:
        return 0
    print("\n| rows | product | this | other | this / other, best | this / other, median of turns | max difference |"
          "\n|---|---|---|---|---|---|---|")
    for m in rows:
        layers = {kind: [getattr(layer, kind) for layer in model.layers[:args.layers]] for kind in KINDS}
        assert all(isinstance(lin, QuantLinear) for lins in layers.values() for lin in lins), "quantized layers only"
        xs = {kind: torch.randn(m, lins[0].in_features) for kind, lins in layers.items()}
        times: dict[str, dict[str, list[float]]] = {name: {kind: [] for kind in (*KINDS, "all")} for name in builds}
        # outputs written in place, each build's its own: a fresh tensor per product was a fault on each of its
        # pages whenever the allocator had given the previous ones back, and that fell on one build more than
        # the other (an A/A run read 1.5-1.8x at 512 rows)
        outputs = {name: {kind: [torch.empty(m, lin.out_features) for lin in lins] for kind, lins in layers.items()}
                   for name in builds}
        for turn in range(args.repeats):
            for name in in_turn(builds, turn):
                use(model, builds[name])
                time.sleep(POOL_SPIN_S)
                for kind, lins in layers.items():
                    start = time.perf_counter()
                    for lin, out in zip(lins, outputs[name][kind], strict=True):
                        lin(xs[kind], out)
                    times[name][kind].append(time.perf_counter() - start)
                times[name]["all"].append(sum(times[name][kind][-1] for kind in KINDS))
        use(model, mine)
        for kind in (*KINDS, "all"):
            pairs = [] if kind == "all" else list(zip(outputs["this"][kind], outputs["other"][kind], strict=True))
            difference = f"{max(float((a - b).abs().max()) for a, b in pairs):.1e}" if pairs else ""
            print(f"| {m} | {'all four' if kind == 'all' else kind} | "
                  f"{compared(times['this'][kind], times['other'][kind])} | {difference} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
