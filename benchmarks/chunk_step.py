"""Time of one engine step (forward pass and sampling) against the size of the prefill chunk it
carries and how deep into a long prompt that chunk sits, with a batch of running decodes.

This is what the scheduler's ``--long-prefill-token-threshold`` is chosen from: while streams
are decoding, every step that carries a chunk of a long prompt delays each of their tokens by
that step's time, so a chunk must stay small enough that such a step stays within a few
unloaded inter-token latencies.

Usage (from the repository root)::

    .venv/bin/python benchmarks/chunk_step.py
    .venv/bin/python benchmarks/chunk_step.py --contexts 0 4096 7936 --chunks 0 64 128 256 --decodes 8

The model is the default one (or ``--model``); the KV cache holds garbage at the positions the
chunk attends to, which costs the same time as real keys. Medians of ``--repeats`` runs, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from realizar.config import KV_CACHE_DTYPES, EngineConfig
from realizar.engine.engine import Engine, load_engine_model
from realizar.engine.scheduler import ScheduledSequence, SchedulerOutput, Sequence
from realizar.request import Request, SamplingParams
from realizar.sampling import SamplingRow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the demo model")
    parser.add_argument("--contexts", type=int, nargs="+", default=[0, 2048, 4096, 7936],
                        help="tokens of the long prompt already in the cache before the chunk")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 32, 64, 128, 256, 512])
    parser.add_argument("--decodes", type=int, default=8, help="running decodes in the same step")
    parser.add_argument("--decode-context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    args = parser.parse_args()

    if args.model is None:
        from realizar.loading import default_model_path

        args.model = default_model_path()
    longest = max(max(args.contexts) + max(args.chunks), args.decode_context) + 1  # the decodes' context too
    config = EngineConfig(device="cpu", max_model_len=longest, max_num_seqs=args.decodes + 1,
                          threads=args.threads, kv_cache_dtype=args.kv_cache_dtype)
    engine = Engine(load_engine_model(args.model, config), config)
    alloc, runner = engine.allocator, engine.runner
    greedy = SamplingParams(temperature=0, max_tokens=1)

    def sequence(tokens: int, computed: int) -> Sequence:
        ids = [(i * 7919) % 1000 + 10 for i in range(tokens)]
        seq = Sequence(Request(ids, greedy), ids, tokens, num_computed=computed)
        seq.block_table = [alloc.allocate() for _ in range(alloc.blocks_needed(tokens))]
        return seq

    decodes = [sequence(args.decode_context + 1, args.decode_context) for _ in range(args.decodes)]
    rows = {s.request_id: SamplingRow(greedy, None) for s in decodes}
    print(f"{args.decodes} decodes at context {args.decode_context}; step time in ms (median of {args.repeats})")
    print("context \\ chunk " + "".join(f"{c:>8}" for c in args.chunks))
    for context in args.contexts:
        cells = []
        for chunk in args.chunks:
            prefills = []
            if chunk:
                long = sequence(context + chunk, context)
                prefills = [ScheduledSequence(long, chunk, False)]
            output = SchedulerOutput([ScheduledSequence(s, 1, True) for s in decodes], prefills)
            times = []
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                runner.execute(output, rows)
                times.append(time.perf_counter() - start)
            if chunk:
                alloc.free_all(long.block_table)
            cells.append(statistics.median(times[1:]) * 1000)  # the first run warms the pages
        print(f"{context:>15} " + "".join(f"{t:8.1f}" for t in cells))


if __name__ == "__main__":
    main()
