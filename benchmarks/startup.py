"""Launch to a healthy ``/health``: several starts of realizar, and of llama.cpp's ``llama-server`` with
``--peers llama.cpp``, one after the other in turn.

Usage (from the repository root)::

    .venv/bin/python benchmarks/startup.py                         # 6 starts of realizar --demo
    .venv/bin/python benchmarks/startup.py --starts 8 --peers llama.cpp --json /tmp/startup.json

Every start is a new process; the servers alternate, so a slow stretch of a shared VM falls on each of them.
Before the timed starts, one start of realizar is not counted: a new build's first start compiles the C
kernels and times each class of products (``auto``), which later starts find remembered.

For each start: the wall time from launch to the first 200 from ``/health`` (``ready``), realizar's own
load time (its banner's "loaded in", the GGUF read and its weights packed), and the server's RSS then. Also,
before each start of realizar, two fresh interpreters time ``import torch`` and then the server's modules
(``realizar.server.app``), the floor under ``ready`` that Python's imports set on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    ManagedServer,
    fmt,
    install_signal_handlers,
    llamacpp_spec,
    load_line,
    machine_line,
    realizar_spec,
)

IMPORTS = {"import torch": "import torch",
           "import realizar.server.app": "import torch; import realizar.server.app"}


def import_seconds(statement: str) -> float:
    """Wall time of a fresh interpreter that runs ``statement`` and exits."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True, timeout=120)
    return time.perf_counter() - t0


def one_start(name: str, extra_args: list[str]) -> dict[str, Any]:
    spec = realizar_spec(extra_args=extra_args) if name == "realizar" else llamacpp_spec()
    with ManagedServer(spec) as server:
        return {"server": name, "ready_s": server.ready_s, "loaded_in_s": server.reported_load_s(),
                "rss_mib": server.rss_mib()}


def summary(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    return " / ".join(fmt(v, digits) for v in (min(values), statistics.median(values), max(values)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", type=int, default=6, help="timed starts of each server (default 6)")
    p.add_argument("--peers", default="", help="llama.cpp: llama-server's starts too, alternated")
    p.add_argument("--realizar-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for realizar serve (repeatable)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    install_signal_handlers()
    peers = [name for name in args.peers.split(",") if name]
    if any(name != "llama.cpp" for name in peers):
        p.error("--peers takes llama.cpp alone")
    servers = ["realizar", *peers]

    print(machine_line())
    print(load_line())
    first = one_start("realizar", args.realizar_arg)
    print(f"untimed first start of realizar: ready in {fmt(first['ready_s'], 2)} s")
    starts: list[dict[str, Any]] = []
    for i in range(args.starts):
        for name in servers:
            imports = {label: import_seconds(code) for label, code in IMPORTS.items()} if name == "realizar" else {}
            res = {**one_start(name, args.realizar_arg), "start": i + 1, "imports_s": imports}
            starts.append(res)
            took = ", ".join(f"{label} {fmt(s, 2)} s" for label, s in imports.items())
            loaded = f", loaded in {fmt(res['loaded_in_s'], 2)} s" if res["loaded_in_s"] is not None else ""
            print(f"[{name}] start {i + 1}: ready in {fmt(res['ready_s'], 2)} s{loaded}, RSS {fmt(res['rss_mib'], 0)} MiB"
                  + (f" ({took})" if took else ""))

    print("\n| server | starts | ready s (min / median / max) | its own load s | RSS at ready MiB |")
    print("|---|---|---|---|---|")
    for name in servers:
        mine = [s for s in starts if s["server"] == name]
        loads = [s["loaded_in_s"] for s in mine if s["loaded_in_s"] is not None]
        print(f"| {name} | {len(mine)} | {summary([s['ready_s'] for s in mine if s['ready_s'] is not None])} | "
              f"{summary(loads)} | {summary([s['rss_mib'] for s in mine], 0)} |")
    print()
    for label in IMPORTS:
        took = [s["imports_s"][label] for s in starts if label in s["imports_s"]]
        print(f"{label} in a fresh interpreter (min / median / max): {summary(took)} s")
    if args.json:
        args.json.write_text(json.dumps({"first": first, "starts": starts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
