"""``nearstep bench soak``: thousands of overlap steps on the emulated device, watching for leaks.

Every ``--sample-every`` steps it samples, for the training process and the device
process: resident memory (VmRSS), open file descriptors and threads (from /proc),
plus the entries of /dev/shm (the staging memory; nearstep unlinks its own as soon
as both processes mapped it, so each process's ``nearstep-*`` mappings in
/proc/PID/maps are counted as well: a leaked staging buffer shows there; the
/dev/shm listing is machine-wide, other users' entries included) and the steps
per second of the window. After a
warm-up it fits a least-squares line to each series and calls it flat when the
slope per 1000 steps is within the noise band: counts exactly constant (the
device's descriptors within the two a commit holds for a moment), RSS
within 1 MiB per 1000 steps (the allocator's pools move in steps of a few hundred
KiB; a leak of one tensor per step of this model would be 250 KiB per step).

Prints a table (one row per sample) and a summary; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import time
from typing import Any

import torch

from .report import machine, read_text, table_line, verdict

__all__ = ["main", "mapped_staging", "sample_process", "slope_per_1000", "summarise"]

RSS_BAND_MIB = 1.0  # per 1000 steps
_COMMIT_FDS = 2


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nearstep bench soak", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--steps", type=int, default=3000, help="steps to run (default 3000)")
    parser.add_argument("--sample-every", type=int, default=100, help="steps between samples (default 100)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before the fit starts (default: a tenth, at least one sample)")
    parser.add_argument("--width", type=int, default=256, help="width of the MLP's layers (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="linear layers (default 4)")
    parser.add_argument("--state-format", default="fp32", help="the store's state format (default fp32)")
    parser.add_argument("--mode", default="overlap", choices=("overlap", "sync", "delayed"), help="default overlap")
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path(".nearstep/bench-soak"), help="store directory (replaced)")
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("bench-soak.json"), help="results file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.sample_every < 1 or args.steps < 3 * args.sample_every:
        parser.error("--steps must be at least three samples (--sample-every) long")
    return args


def sample_process(pid: int) -> dict[str, float]:
    """RSS (MiB), open descriptors and threads of process ``pid`` from /proc (NaN where it is gone)."""
    status = dict(line.split(":", 1) for line in read_text(f"/proc/{pid}/status").splitlines() if ":" in line)
    try:
        fds = float(len(os.listdir(f"/proc/{pid}/fd")))
    except OSError:
        fds = float("nan")
    rss = status.get("VmRSS", "nan kB").split()[0]
    return {"rss_mib": float(rss) / 1024, "fds": fds, "threads": float(status.get("Threads", "nan"))}


def mapped_staging(pid: int) -> dict[str, float]:
    """The staging memory process ``pid`` maps: distinct ``nearstep-*`` files and their MiB.

    Their names are unlinked as soon as both sides mapped them (staging.SharedMemory), so
    /dev/shm does not list them; /proc/PID/maps still does, as ``... (deleted)``. This is
    where a leaked staging buffer would show.
    """
    sizes: dict[str, int] = {}
    for line in read_text(f"/proc/{pid}/maps").splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and os.path.basename(fields[5].removesuffix(" (deleted)")).startswith("nearstep-"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            sizes[fields[5]] = sizes.get(fields[5], 0) + end - start
    return {"shm_maps": float(len(sizes)), "shm_mapped_mib": sum(sizes.values()) / 2**20}


def _shm() -> dict[str, float]:
    """Entries of /dev/shm: all of them, and nearstep's (``nearstep-*``), with their bytes."""
    out = {"shm_entries": 0.0, "shm_nearstep": 0.0, "shm_mib": 0.0}
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return out
    for name in names:
        try:
            size = os.stat(os.path.join("/dev/shm", name)).st_blocks * 512
        except OSError:
            continue  # removed meanwhile
        out["shm_entries"] += 1
        out["shm_mib"] += size / 2**20
        out["shm_nearstep"] += name.startswith("nearstep-")
    return out


def slope_per_1000(steps: list[int], values: list[float]) -> float:
    """The least-squares slope of ``values`` against ``steps``, per 1000 steps."""
    n = len(steps)
    if n < 2:
        return 0.0
    mx, my = sum(steps) / n, sum(values) / n
    var = sum((x - mx) ** 2 for x in steps)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(steps, values)) / var if var else 0.0


def _model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    parts: list[torch.nn.Module] = []
    for _ in range(layers):
        parts += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*parts[:-1])


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import nearstep

    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.parent.mkdir(parents=True, exist_ok=True)
    model = _model(args.width, args.layers)
    x = torch.randn(32, args.width)
    target = torch.randn(32, args.width)
    samples: list[dict[str, float]] = []
    with nearstep.AdamW(model.parameters(), lr=1e-4, store=args.dir, mode=args.mode, model=model,
                        state_format=args.state_format, max_grad_norm=1.0) as opt:
        device_pid = opt.device.info.pid
        window = time.perf_counter()
        for step in range(1, args.steps + 1):
            torch.nn.functional.mse_loss(model(x), target).backward()
            opt.step()
            opt.zero_grad()
            if step % args.sample_every == 0:
                now = time.perf_counter()
                row: dict[str, float] = {"step": step, "steps_per_s": args.sample_every / (now - window)}
                for side, pid in (("host", os.getpid()), ("device", device_pid)):
                    row.update({f"{side}_{k}": v for k, v in sample_process(pid).items()})
                    row.update({f"{side}_{k}": v for k, v in mapped_staging(pid).items()})
                row.update(_shm())
                samples.append(row)
                window = time.perf_counter()
        stats = opt.stats()
    shutil.rmtree(args.dir, ignore_errors=True)
    return {"samples": samples, "device_pid": device_pid, "params": sum(p.numel() for p in model.parameters()),
            "committed_step": stats["step"]}


_COLUMNS = [("step", "{:>7.0f}"), ("steps_per_s", "{:>8.1f}"), ("host_rss_mib", "{:>9.1f}"), ("host_fds", "{:>5.0f}"),
            ("host_threads", "{:>5.0f}"), ("host_shm_maps", "{:>5.0f}"), ("device_rss_mib", "{:>9.1f}"),
            ("device_fds", "{:>5.0f}"), ("device_threads", "{:>5.0f}"), ("device_shm_maps", "{:>5.0f}"),
            ("shm_entries", "{:>5.0f}"), ("shm_nearstep", "{:>5.0f}")]
_HEADS = ["step", "steps/s", "host RSS", "fds", "thr", "maps", "dev RSS", "fds", "thr", "maps", "shm", "ns-shm"]
_SERIES = ["host_rss_mib", "host_fds", "host_threads", "host_shm_maps", "host_shm_mapped_mib", "device_rss_mib",
           "device_fds", "device_threads", "device_shm_maps", "device_shm_mapped_mib", "shm_entries", "shm_nearstep",
           "shm_mib"]


def summarise(samples: list[dict[str, float]], warmup: int) -> dict[str, dict[str, Any]]:
    """Per series: value after warm-up, last value, slope per 1000 steps and whether it is flat."""
    kept = [s for s in samples if s["step"] > warmup] or samples[-2:]
    steps = [int(s["step"]) for s in kept]
    out: dict[str, dict[str, Any]] = {}
    for name in _SERIES:
        values = [s[name] for s in kept]
        slope = slope_per_1000(steps, values)
        if name.endswith("_mib"):
            flat, rule = abs(slope) <= RSS_BAND_MIB, f"|slope| <= {RSS_BAND_MIB:g} MiB per 1000 steps"
        elif name == "device_fds":
            # A sample may fall inside a commit, which holds two more for a moment
            # (manifest.json.tmp, then the directory it fsyncs).
            flat, rule = max(values) - min(values) <= _COMMIT_FDS, f"within {_COMMIT_FDS} (a commit in flight)"
        else:
            flat, rule = len(set(values)) == 1, "exactly constant"
        out[name] = {"first": values[0], "last": values[-1], "min": min(values), "max": max(values),
                     "slope_per_1000_steps": slope, "flat": flat, "rule": rule}
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    warmup = args.warmup if args.warmup is not None else max(args.sample_every, args.steps // 10)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    result = _run(args)
    summary = summarise(result["samples"], warmup)
    where = machine(args.dir.parent)
    lines = [f"nearstep bench soak: {args.steps} {args.mode} steps of a {args.layers}x{args.width} MLP "
             f"({result['params']:,} parameters, state {args.state_format}), sampled every {args.sample_every}",
             f"machine: {where}; started {started}", ""]
    lines.append(" ".join(f"{h:>{len(f.format(0))}}" for h, (_k, f) in zip(_HEADS, _COLUMNS)))
    for row in result["samples"]:
        lines.append(" ".join(f.format(row[k]) for k, f in _COLUMNS))
    lines += ["", f"after {warmup} steps of warm-up (least squares over the samples after it):"]
    for name, s in summary.items():
        lines.append(table_line(name, f"{s['first']:.1f} -> {s['last']:.1f}",
                                f"slope {s['slope_per_1000_steps']:+.3f}/1000 steps  {verdict(s['flat'], s['rule'])}"))
    print("\n".join(lines))
    doc = {"benchmark": "soak", "machine": where, "started": started, "args": {k: str(v) for k, v in vars(args).items()},
           "warmup_steps": warmup, **result, "summary": summary, "all_flat": all(s["flat"] for s in summary.values())}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {args.json}")
    return 0
