"""The ``nearstep`` command: ``nearstep demo``, ``nearstep bench io``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="nearstep",
        description="Run the optimizer step next to the optimizer state on the SSD.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("demo", help="train a model with its optimizer state in a store (no configuration)", add_help=False)
    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON")
    bench.add_argument("which", choices=["io"], help="io: store bandwidth, update rate, device memory")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv[0] == "bench":
        known, rest = bench.parse_known_args(argv[1:])
        if known.which == "io":
            from .bench.io import main as io_main

            return io_main(rest)
    parser.parse_args(argv)  # prints the usage error for an unknown command
    return 2


if __name__ == "__main__":
    sys.exit(main())
