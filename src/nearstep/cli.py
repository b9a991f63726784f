"""The ``nearstep`` command: ``nearstep demo``, ``nearstep bench io|step|peers|accuracy|codecs|soak|...``,
``nearstep inspect|verify|export|convert STORE``, ``nearstep reshard SRC DST --world-size N``,
``nearstep data scan|dedup`` (duplicates, repetition and boilerplate in a corpus)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]

_BENCHES = {
    "io": (".bench.io", "store bandwidth, update rate, device memory"),
    "step": (".bench.step", "steps/s of no step, torch AdamW, sync, overlap, delayed (--nproc N: 1 rank vs N ranks)"),
    "accuracy": (".bench.accuracy", "held-out accuracy/loss per state format, and with injected gradient spikes per guard"),
    "peers": (".bench.peers", "side by side with DeepSpeed ZeRO-3 (optimizer on NVMe, on CPU) where installed"),
    "filter-effect": (".bench.filter_effect", "MiniLM on BBC trained with and without the data filter, several seeds; what a leaky split overstates"),
    "keras": (".bench.keras", "model.fit with nearstep.keras.AdamW vs keras.optimizers.AdamW, alternating"),
    "codecs": (".bench.codecs", "decode/encode ns per element of each state-format codec on one thread"),
    "soak": (".bench.soak", "thousands of overlap steps: RSS, descriptors, threads and /dev/shm of both processes, sampled; flat or not"),
    "data": (".bench.data", "near-duplicate detection vs datasketch MinHashLSH: precision/recall/F1, docs/s and MB/s per core, memory per document"),
}

# The store tools; each is a function in nearstep.tools, which also parses their arguments.
_TOOLS = {
    "inspect": "print a store's step, optimizer, parameters, sizes and guard counters (--json)",
    "verify": "check every slice file of a store (presence, size, checksum); exit 1 if any is bad",
    "export": "write a store's fp32 master weights to a safetensors file",
    "convert": "copy a store into a new one with another state format (--state-format)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="nearstep",
        description="Run the optimizer step next to the optimizer state on the SSD.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("demo", help="train a model with its optimizer state in a store (no configuration)", add_help=False)
    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON")
    bench.add_argument("which", choices=sorted(_BENCHES), help="; ".join(f"{k}: {v[1]}" for k, v in sorted(_BENCHES.items())))
    for name, text in _TOOLS.items():
        sub.add_parser(name, help=text, add_help=False)
    sub.add_parser("reshard", help="rewrite a sharded run's store set for another number of ranks", add_help=False)
    sub.add_parser("data", help="scan|dedup: exact and near duplicates, repetition, boilerplate, leakage in a corpus", add_help=False)
    sub.add_parser("plan", help="step time per mode, store size, bytes per step and drive wear before a run (--calibrate)",
                   add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv[0] == "reshard":
        from .reshard import main as reshard_main

        return reshard_main(argv[1:])
    if argv[0] == "data":
        from .data.tools import main as data_main

        return data_main(argv[1:])
    if argv[0] == "plan":
        from .planner import main as plan_main

        return plan_main(argv[1:])
    if argv[0] in _TOOLS:
        from .tools import main as tools_main

        return tools_main(argv)
    if argv[0] == "bench" and len(argv) > 1 and argv[1] in _BENCHES:
        import importlib

        module = importlib.import_module(_BENCHES[argv[1]][0], __package__)
        return module.main(argv[2:])
    parser.parse_args(argv)  # prints the usage error for an unknown command
    return 2


if __name__ == "__main__":
    sys.exit(main())
