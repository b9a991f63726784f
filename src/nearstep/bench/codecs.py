"""``nearstep bench codecs``: decode/encode ns per element of each state-format codec on one thread.

Each codec (every master part, the 8-bit moments with each map and the 16bit and
fp8 moments, signed and unsigned) decodes and encodes a region of ``--numel``
elements; the table shows the best of ``--repeat`` timed runs per element. With the comparison (the
default; ``--no-compare`` leaves it out) the run also times the alternatives the
design rejected (see :mod:`nearstep.formats.maps` and :func:`nearstep.formats.sr_noise`):
seeded ``torch.randint`` noise, a per-element integer hash, ``torch.bucketize``
over a 256-entry codebook and torch's fp8 E4M3 casts.

One table on stdout, every number in a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import pathlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from nearstep import formats
from nearstep.formats import native
from nearstep.bench.report import machine

__all__ = ["main", "measure"]

# (row label, state format, state name): every codec, and each moment codec signed and unsigned.
CASES: tuple[tuple[str, str, str], ...] = (
    ("master fp32 (a copy)", "fp32", "master"),
    ("master bf16-sr", "bf16-sr", "master"),
    ("master bf16-kahan", "bf16-kahan", "master"),
    ("moment 8bit dynamic signed", "8bit", "exp_avg"),
    ("moment 8bit dynamic unsigned", "8bit", "exp_avg_sq"),
    ("moment 8bit linear signed", "8bit-linear", "exp_avg"),
    ("moment 8bit linear unsigned", "8bit-linear", "exp_avg_sq"),
    ("moment 16bit signed", "16bit", "exp_avg"),
    ("moment 16bit unsigned", "16bit", "exp_avg_sq"),
    ("moment fp8 e4m3 signed", "fp8", "exp_avg"),
    ("moment fp8 e5m2 unsigned", "fp8", "exp_avg_sq"),
)


DEFAULT_NUMEL, DEFAULT_REPEAT = 1 << 22, 5  # 16 MiB of fp32 per region: well past the caches, as a slice is


@dataclass(frozen=True, kw_only=True, slots=True)
class Options:
    """What to time.

    Attributes:
        numel: elements of each region timed.
        repeat: timed runs of each operation (after one untimed warm-up); the best counts.
        compare: also time the alternatives the design rejected.
        json: where the results are written.
    """

    numel: int = DEFAULT_NUMEL
    repeat: int = DEFAULT_REPEAT
    compare: bool = True
    json: pathlib.Path = pathlib.Path("bench-codecs.json")  # beside bench-io.json and the others


def _parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="nearstep bench codecs",
                                     description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--numel", type=int, default=DEFAULT_NUMEL, help="elements per region (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT,
                        help="timed runs of each operation; the best counts (default: %(default)s)")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="leave out the alternatives the design rejected")
    parser.add_argument("--json", type=pathlib.Path, default=Options().json, help="results file (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.numel < 1 or args.repeat < 1:
        parser.error("--numel and --repeat must be >= 1")
    return Options(numel=args.numel, repeat=args.repeat, compare=args.compare, json=args.json)


def measure(
    numel: int = DEFAULT_NUMEL, repeat: int = DEFAULT_REPEAT, compare: bool = True
) -> dict[str, dict[str, float]]:
    """Time decode and encode of each codec on one thread: ns per element, best of ``repeat``.

    Returns:
        ``{"codecs": {row: ns}, "alternatives": {row: ns}}`` (the latter empty without ``compare``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the device runs the codecs on one thread
    try:
        workspace = formats.Workspace()
        generator = torch.Generator().manual_seed(0)
        codecs: dict[str, float] = {}
        alternatives: dict[str, float] = {}

        def timed(into: dict[str, float], label: str, fn: Callable[[], object]) -> None:
            fn()  # warm-up: first-touch page faults and cached tables stay out of the timing
            best = math.inf
            for _ in range(repeat):
                begin = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - begin)
            into[label] = best / numel * 1e9

        for label, name, state in CASES:
            fmt = formats.StateFormat.parse(name)
            buf = torch.zeros(fmt.file_bytes([state], numel), dtype=torch.uint8)
            regions = formats.views(fmt, buf, [state], numel)
            values = {state: torch.randn(numel, generator=generator)}
            if state.endswith("_sq"):
                values[state].square_()
            formats.encode_(fmt, values, [state], regions, seed=1, workspace=workspace)
            # The native codecs where they are built, then the torch ones they are checked against.
            for suffix, mode in (("", contextlib.nullcontext), (" (torch codecs)", native.disabled)):
                if not suffix and not native.available():
                    continue
                with mode():
                    timed(codecs, f"{label}: decode{suffix}",
                          lambda: formats.decode_(fmt, regions, [state], values, workspace=workspace))
                    timed(codecs, f"{label}: encode{suffix}",
                          lambda: formats.encode_(fmt, values, [state], regions, seed=2, workspace=workspace))
                    if state != "master":
                        timed(codecs, f"{label}: encode, decode_moments=False{suffix}", lambda: formats.encode_(
                            fmt, values, [state], regions, seed=2, workspace=workspace, decode_moments=False))
        if compare:
            x, scratch = torch.randn(numel, generator=generator), torch.empty(numel, dtype=torch.int32)
            timed(alternatives, "sr_noise (16 bits)", lambda: formats.sr_noise(3, 0, numel, 16, out=scratch))
            timed(alternatives, "torch.randint noise", lambda: torch.randint(
                0, 1 << 16, (numel,), generator=generator, dtype=torch.int32, out=scratch))
            timed(alternatives, "integer hash noise", lambda: _hash_noise(3, scratch))
            codebook = formats.code_table("dynamic", True).sort().values
            timed(alternatives, "bucketize over 256 codes",
                  lambda: torch.bucketize(x, codebook, out_int32=True, out=scratch))
            fp8 = torch.empty(numel, dtype=torch.float8_e4m3fn)
            timed(alternatives, "fp32 -> fp8 e4m3 cast", lambda: fp8.copy_(x))
            timed(alternatives, "fp8 e4m3 -> fp32 cast", lambda: x.copy_(fp8))
    finally:
        torch.set_num_threads(threads)
    return {"codecs": codecs, "alternatives": alternatives}


def _hash_noise(seed: int, out: Tensor) -> None:
    """The rejected alternative to sr_noise: hash each element's index (two multiply-xorshift rounds)."""
    chunk = formats.CHUNK
    index = torch.arange(chunk, dtype=torch.int32)
    shifted = torch.empty(chunk, dtype=torch.int32)
    for start in range(0, out.numel(), chunk):
        stop = min(start + chunk, out.numel())
        h, t = out[start:stop], shifted[: stop - start]
        torch.add(index[: stop - start], (start ^ seed) & 0x7FFFFFFF, out=h).mul_(-1640531535)
        h.bitwise_xor_(torch.bitwise_right_shift(h, 15, out=t).bitwise_and_(0x1FFFF)).mul_(0x2C1B3C6D)
        h.bitwise_xor_(torch.bitwise_right_shift(h, 12, out=t).bitwise_and_(0xFFFFF))
        h.bitwise_right_shift_(16).bitwise_and_(0xFFFF)


def _render(res: dict[str, Any]) -> str:
    rows = list(res["codecs"].items()) + [(f"alt: {k}", v) for k, v in res["alternatives"].items()]
    head = f"one thread, {res['numel']:,} elements"
    width = max(len(head), *(len(label) for label, _ in rows))
    out = ["nearstep bench codecs", f"machine: {res['machine']}, {res['date']}", "",
           f"{head:{width}}  ns/element"]
    out += [f"{label:{width}}  {ns:6.2f}" for label, ns in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Time the codecs, print the table, write the JSON; returns 0."""
    opts = _parse(argv)
    options = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in asdict(opts).items()}
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "options": options, "machine": machine(opts.json.parent),
                           "unit": "ns/element", "threads": 1, "numel": opts.numel}
    res.update(measure(opts.numel, opts.repeat, opts.compare))
    print(_render(res))
    opts.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
