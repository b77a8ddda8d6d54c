"""Start each built peer once and get one completion from it: a check of
``make peers`` and of the configuration ``benchmarks/common.py`` chooses.

Usage (from the repository root)::

    .venv/bin/python benchmarks/peers/smoke.py                 # llama.cpp and vllm
    .venv/bin/python benchmarks/peers/smoke.py --peers llama.cpp

Prints, for each peer, the configuration it ran with, its start-up time and the
completion; exits 1 when a peer fails to start or to answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402  (after the path above)
    ManagedServer,
    ServerSpec,
    ServerStartError,
    install_signal_handlers,
    llamacpp_spec,
    vllm_spec,
)


def complete(server: ManagedServer, prompt: str, max_tokens: int, timeout_s: float) -> dict[str, Any]:
    body = json.dumps({"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(server.url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (127.0.0.1)
        return json.loads(resp.read())


def spec_for(name: str, startup_timeout_s: float) -> ServerSpec:
    if name == "llama.cpp":
        spec = llamacpp_spec(native=True, parallel=4)
    elif name == "vllm":
        spec = vllm_spec(max_num_seqs=4)
    else:
        raise ValueError(name)
    return dataclasses.replace(spec, startup_timeout_s=startup_timeout_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", default="llama.cpp,vllm", help="comma-separated: llama.cpp, vllm")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for each server")
    p.add_argument("--log-dir", type=Path, default=None)
    args = p.parse_args(argv)
    install_signal_handlers()
    failed = 0
    for name in [x.strip() for x in args.peers.split(",") if x.strip()]:
        try:
            spec = spec_for(name, args.startup_timeout)
            print(f"[{name}] {spec.note}\n[{name}] argv: {' '.join(spec.argv)}\n[{name}] env: {dict(spec.env)}",
                  flush=True)
            with ManagedServer(spec, args.log_dir) as server:
                print(f"[{name}] ready in {server.ready_s:.1f} s on {server.url} (log {server.log_path})", flush=True)
                t0 = time.perf_counter()
                out = complete(server, args.prompt, args.max_tokens, timeout_s=120.0)
                text = out["choices"][0]["text"]
                print(f"[{name}] completion in {time.perf_counter() - t0:.2f} s: {text!r} "
                      f"(usage {out.get('usage')})", flush=True)
                if not text:
                    raise RuntimeError("empty completion")
        except (ServerStartError, FileNotFoundError, RuntimeError, OSError, KeyError, ValueError) as exc:
            failed += 1
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
