"""``nearstep bench step``: training steps/s with no optimizer step, torch AdamW, and nearstep sync, overlap, delayed.

The same model, data and number of steps under five variants:

- ``none``: forward and backward only, no optimizer step: the compute-only limit;
- ``torch``: ``torch.optim.AdamW(fused=True)`` in memory: what users run today;
- ``sync``: ``nearstep.AdamW(mode="sync")``: state on the store, update inline (offload without overlap);
- ``overlap``: ``nearstep.AdamW(mode="overlap", model=model)``: exact, the update overlaps the next forward;
- ``delayed``: ``nearstep.AdamW(mode="delayed")``: weights one step stale, after its sync warm-up.

Two more on request (``--variants``): ``overlap-clip``, overlap with ``max_grad_norm=1.0``, and
``overlap-userclip``, overlap with ``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`` in the
loop between ``backward()`` and ``step()``, as HF Trainer does by default. Both speculate (apply each
slice as backward finishes it) and redo the step when the clipping fires; the table shows how often
it fired and what clipping costs next to ``overlap``.

Each variant runs in a fresh process, so none inherits another's warm caches or threads, and the
variants alternate (A B C D E A B C D E ...) so that the drift of a shared machine hits all of them
alike. The training loop gets one core and one torch thread, the device the other core. The
``sync`` worker's trace gives the device-only step time; with the compute-only step it gives the
ideal overlapped step, ``max(compute, device)``, which ``overlap`` is measured against.

One table on stdout, every number in a JSON file. Everything the run writes under ``--dir`` is
deleted at the end, also when a worker fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

import nearstep
from nearstep.bench.report import WorkerError, machine, run_worker, scratch, table_line, verdict
from nearstep.bench.workload import (DEFAULT_BATCH, DEFAULT_SEQ_LEN, DELAYED_WARMUP_STEPS, INSTALL, LR, MODELS, SEED,
                                     WORKER_TIMEOUT, FirstModule, WorkerSpec, build_workload, cores,
                                     missing_packages, source_digest, steady_allocator, to_cuda)
from nearstep.device import parse_bytes

__all__ = ["main"]

VARIANTS = ("none", "torch", "sync", "overlap", "delayed", "overlap-clip", "overlap-userclip")
DEFAULT_VARIANTS = VARIANTS[:5]
NEARSTEP_VARIANTS = ("sync", "overlap", "delayed", "overlap-clip", "overlap-userclip")
CLIP_NORM = 1.0  # HF Trainer's default max_grad_norm
OVERLAP_SLACK = 1.10  # overlap at or under 1.10 x ideal PASSes
SPEEDUP_TARGET = 0.9  # (sync/overlap) / (sync/ideal) at or above this PASSes
FRACTION_TARGET = 0.9  # overlap fraction at or above this PASSes
MiB = 2**20

@dataclass(frozen=True, kw_only=True, slots=True)
class Options:
    """What to run, and where.

    Attributes:
        model: ``mlp``, ``minilm`` or ``smollm2``.
        batch: examples (sequences) per step.
        seq_len: tokens per sequence (minilm, smollm2).
        width: width of the mlp's square linears.
        steps: timed steps per worker.
        warmup: untimed steps before them (delayed runs its own sync warm-up steps first).
        rounds: how many times each variant runs, alternating.
        variants: which of ``VARIANTS`` to run, in that order.
        memory_budget: the emulated device's memory budget, like ``"2GiB"``.
        slice_mb: MiB of fp32 parameters per slice.
        dir: scratch directory for the stores; the run works in a fresh subdirectory of it.
        json: where the results are written.
        trace_dir: where the nearstep workers of the last round save their Chrome/Perfetto traces, if set.
        quick: tiny sizes, for smoke tests.
        device: where the model computes: ``cpu`` or ``cuda``.
        nproc: with more than 1, compare one rank with this many gloo ranks (``bench/ranks.py``).
        state_formats: the nearstep variants run once per state format; a format other than
            fp32 shows up as ``variant@format`` (e.g. ``overlap@bf16-sr+8bit``).
        allocator: ``steady`` (every worker's allocator keeps and reuses freed blocks, see
            :func:`~nearstep.bench.workload.steady_allocator`) or ``default`` (the platform's).
    """

    model: str
    batch: int
    seq_len: int
    width: int
    steps: int
    warmup: int
    rounds: int
    variants: tuple[str, ...]
    memory_budget: str
    slice_mb: float | None
    dir: pathlib.Path
    json: pathlib.Path
    trace_dir: pathlib.Path | None
    quick: bool
    device: str = "cpu"
    nproc: int = 1
    state_formats: tuple[str, ...] = ("fp32",)
    allocator: str = "steady"


def _parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="nearstep bench step", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--model", choices=MODELS, default="mlp", help="workload (default: mlp)")
    parser.add_argument("--batch", type=int, default=None,
                        help="examples per step (default: mlp 32, minilm 16, smollm2 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: minilm 96, smollm2 128)")
    parser.add_argument("--width", type=int, default=4096, help="mlp width (default 4096: about 50M parameters)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per worker (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2; delayed: 2 more)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all variants, alternating (default 3)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--memory-budget", default="2GiB", help="device memory budget (default 2GiB)")
    parser.add_argument("--slice-mb", type=float, default=None,
                        help="MiB of fp32 parameters per slice (default: the optimizer's automatic choice)")
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path(".nearstep/bench-step"),
                        help="scratch directory for the stores (default: ./.nearstep/bench-step)")
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("bench-step.json"), help="results file")
    parser.add_argument("--trace-dir", type=pathlib.Path, default=None,
                        help="save Chrome/Perfetto traces of the last round's nearstep workers here")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 1 round (and mlp width 512)")
    parser.add_argument("--allocator", choices=("steady", "default"), default="steady",
                        help="steady (default): each worker's allocator reuses what it frees, so every variant's "
                             "forward and backward cost the same; default: the platform's, whose page faults vary "
                             "between processes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model computes (default cpu; cuda: the model on the GPU, the state on the store)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="compare 1 rank with this many gloo ranks on this machine, the global batch split over them: "
                             "per-rank store size, host-link and collective bytes, steps/s (sync and overlap)")
    parser.add_argument("--state-formats", default="fp32",
                        help="comma-separated state formats for the nearstep variants, side by side "
                             "(e.g. fp32,bf16-sr+8bit; default fp32)")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.steps, args.rounds = 512, 2, 1
    try:
        state_formats = tuple(dict.fromkeys(nearstep.StateFormat.parse(f.strip()).name
                                            for f in args.state_formats.split(",") if f.strip()))
    except ValueError as exc:
        parser.error(f"--state-formats: {exc}")
    if not state_formats:
        parser.error("--state-formats: give at least one format")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: {','.join(unknown) or 'none given'}; pick from {','.join(VARIANTS)}")
    batch = DEFAULT_BATCH[args.model] if args.batch is None else args.batch
    seq_len = DEFAULT_SEQ_LEN[args.model] if args.seq_len is None else args.seq_len
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if batch < 1 or args.width < 1 or args.steps < 1 or args.warmup < 0 or args.rounds < 1 or not (args.slice_mb or 1) > 0:
        parser.error("--batch, --width, --steps and --rounds must be >= 1, --warmup >= 0, --slice-mb > 0")
    if args.nproc < 1 or (args.nproc > 1 and args.device != "cpu"):
        parser.error("--nproc must be >= 1, and runs on --device cpu (gloo)")
    if args.model != "mlp" and seq_len < 2:
        parser.error("--seq-len must be >= 2")
    try:
        parse_bytes(args.memory_budget)
    except ValueError as exc:
        parser.error(f"--memory-budget: {exc}")
    return Options(model=args.model, batch=batch, seq_len=seq_len, width=args.width, steps=args.steps,
                   warmup=args.warmup, rounds=args.rounds, variants=tuple(v for v in VARIANTS if v in variants),
                   memory_budget=args.memory_budget, slice_mb=args.slice_mb, dir=args.dir, json=args.json,
                   trace_dir=args.trace_dir, quick=args.quick, device=args.device, nproc=args.nproc,
                   state_formats=state_formats, allocator=args.allocator)


# ---------------------------------------------------------------------------
# The worker: one variant, one round, in a process of its own


def _worker(spec: WorkerSpec) -> dict[str, Any]:
    started = time.perf_counter()
    allocator = steady_allocator() if spec.allocator == "steady" else "the platform's default"
    source = source_digest()
    # Made before the training loop pins itself to its own core: a DeviceConfig may check
    # its cores against this process's affinity.
    device = nearstep.DeviceConfig(cores=(spec.device_core,), memory_budget=spec.memory_budget)
    os.sched_setaffinity(0, {spec.compute_core})
    torch.set_num_threads(1)
    warm_steps = spec.warmup + (DELAYED_WARMUP_STEPS if spec.variant == "delayed" else 0)
    work = build_workload(spec, warm_steps)
    if spec.device == "cuda":
        work = work._replace(model=work.model.cuda(), timed=to_cuda(work.timed), warm=to_cuda(work.warm))
    model = work.model
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt: Any = None
    if spec.variant == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    elif spec.variant in NEARSTEP_VARIANTS:
        extra = {"overlap": {"model": model}, "delayed": {"warmup_steps": DELAYED_WARMUP_STEPS},
                 "overlap-clip": {"model": model, "max_grad_norm": CLIP_NORM},
                 "overlap-userclip": {"model": model}}.get(spec.variant, {})
        mode = spec.variant.split("-", 1)[0]
        opt = nearstep.AdamW(model.named_parameters(), lr=LR, store=spec.store, mode=mode, device=device,
                             slice_mb=spec.slice_mb, state_format=spec.state_format, **extra)
    ours = isinstance(opt, nearstep.NearstepOptimizer)

    def one_step(batch: Any) -> torch.Tensor:
        loss = work.loss(model, batch)
        loss.backward()
        if spec.variant == "overlap-userclip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        if opt is None:
            model.zero_grad(set_to_none=True)
        else:
            opt.step()
            opt.zero_grad()
        return loss.detach()

    first = FirstModule(model)
    try:
        torch.manual_seed(SEED)  # the same dropout masks in every variant
        for batch in work.warm:
            one_step(batch)
        first.close()
        before: dict[str, Any] = {}
        if ours:
            opt.synchronize()  # the timed steps start with nothing in flight, and end so
            before = opt.stats()
            opt.trace.clear()  # only the timed steps count in the summary
        losses, marks = [], [time.perf_counter()]
        for batch in work.timed:
            losses.append(one_step(batch))
            marks.append(time.perf_counter())
        if ours:
            opt.synchronize()  # inside the timed region: overlap and delayed cannot hide unfinished work
        if spec.device == "cuda":
            torch.cuda.synchronize()  # the GPU's queued work is part of the timed steps
        end = time.perf_counter()
        result: dict[str, Any] = {
            "variant": spec.variant, "state_format": spec.state_format, "round": spec.round, "params": params, "describe": work.describe,
            "warm_steps": warm_steps, "steps": spec.steps, "seconds": end - marks[0],
            "ms_per_step": (end - marks[0]) * 1e3 / spec.steps,
            "step_ms": [(b - a) * 1e3 for a, b in zip(marks, marks[1:])], "tail_ms": (end - marks[-1]) * 1e3,
            "losses": [float(x) for x in losses], "torch_threads": torch.get_num_threads(),
            "affinity": sorted(os.sched_getaffinity(0)), "source": source, "allocator": allocator,
            "first_module": first.name, "first_share": first.share,
        }
        if ours:
            result |= _nearstep_numbers(opt, before, spec)
    finally:
        if ours:
            opt.close()
            shutil.rmtree(spec.store, ignore_errors=True)  # a big model's store is GBs: not one per worker
    result["worker_seconds"] = time.perf_counter() - started
    return result


def _nearstep_numbers(opt: Any, before: dict[str, Any], spec: WorkerSpec) -> dict[str, Any]:
    summary = opt.trace.summary()
    after = opt.stats()
    if spec.trace:
        opt.trace.save(spec.trace)
    # Every byte and time counter of the device, per timed step.
    per_step = {k: (v - before[k]) / spec.steps for k, v in after.items()
                if k.startswith("device_") and k.endswith(("_bytes", "_seconds")) and k != "device_slot_bytes"
                and isinstance(v, (int, float)) and isinstance(before.get(k), (int, float))}
    info = opt.device.info
    return {
        "trace": summary,
        "device_busy_ms_per_step": summary["device_busy_seconds"] * 1e3 / spec.steps,
        "wait_ms_per_step": summary["wait_seconds"] * 1e3 / spec.steps,
        "overlap_fraction": summary["overlap_fraction"],
        "store_bytes_per_step": per_step["device_store_read_bytes"] + per_step["device_store_write_bytes"],
        "store_bytes_per_param_per_step": (per_step["device_store_read_bytes"] + per_step["device_store_write_bytes"])
        / sum(p.numel() for group in opt.param_groups for p in group["params"]),
        "link_bytes_per_step": per_step["device_link_in_bytes"] + per_step["device_link_out_bytes"],
        "per_step": per_step,
        # As opt.stats() reports them: averaged over every host step, warm-up included.
        "stats_store_bytes_per_step": after["store_bytes_per_step"],
        "stats_link_bytes_per_step": after["link_bytes_per_step"],
        "stats_overlap_fraction": after["overlap_fraction"],
        "stats_step_ms": after["step_ms"],
        "slices": len(opt.device.manifest().slices),
        "speculation": {k: after[k] - before.get(k, 0) for k in
                        ("clipped_steps", "speculated_steps", "speculation_misses", "gradients_changed_after_staging")},
        "device": {"pid": info.pid, "cores": list(info.cores), "slots": info.slots, "slot_bytes": info.slot_bytes,
                   "direct_io": info.direct_io, "memory_budget": info.memory_budget},
        "trace_file": spec.trace,
    }


def _worker_entry() -> None:
    """Entry point of a worker process: ``python -c ... SPEC_JSON RESULT_PATH``."""
    spec = WorkerSpec(**json.loads(sys.argv[1]))
    result = _worker(spec)
    pathlib.Path(sys.argv[2]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------
# The parent: rounds of workers, the table, the JSON


def _run_worker(spec: WorkerSpec, work: pathlib.Path) -> dict[str, Any]:
    key = _key(spec.variant, spec.state_format)
    return run_worker("nearstep.bench.step", asdict(spec), work / f"result-{key}-{spec.round}.json",
                      label=f"{key} worker of round {spec.round}", timeout=WORKER_TIMEOUT, store=spec.store)


def _key(variant: str, state_format: str) -> str:
    """A run's name: the variant, with ``@format`` unless the state is fp32."""
    return variant if state_format == "fp32" else f"{variant}@{state_format}"


def _base(key: str) -> str:
    return key.split("@", 1)[0]


def _median(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def _summarize(opts: Options, runs: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    variants: dict[str, Any] = {}
    for name, rounds in runs.items():
        ms = _median(rounds, "ms_per_step")
        entry = {"ms_per_step": ms, "steps_per_second": 1e3 / ms, "round_ms_per_step": [r["ms_per_step"] for r in rounds],
                 "rounds": rounds}
        if _base(name) in NEARSTEP_VARIANTS:
            for key in ("overlap_fraction", "device_busy_ms_per_step", "wait_ms_per_step", "store_bytes_per_step",
                        "link_bytes_per_step", "store_bytes_per_param_per_step"):
                entry[key] = _median(rounds, key)
        variants[name] = entry
    ms = {name: v["ms_per_step"] for name, v in variants.items()}
    derived: dict[str, Any] = {}
    if "sync" in ms:
        derived["device_only_ms"] = variants["sync"]["device_busy_ms_per_step"]
    if "none" in ms:
        derived["compute_only_ms"] = ms["none"]
    if "sync" in ms and "none" in ms:
        derived["sync_minus_none_ms"] = ms["sync"] - ms["none"]
        derived["ideal_ms"] = max(derived["compute_only_ms"], derived["device_only_ms"])
        derived["ideal_speedup"] = ms["sync"] / derived["ideal_ms"]
    if "torch" in ms and "none" in ms:
        derived["torch_minus_none_ms"] = ms["torch"] - ms["none"]
    for name in ("overlap", "delayed"):
        if "sync" in ms and name in ms:
            derived[f"{name}_speedup"] = ms["sync"] / ms[name]
        if "ideal_ms" in derived and name in ms:
            # (sync/x) / (sync/ideal) is ideal/x: the efficiency and the speed-up ratio are one number.
            derived[f"{name}_efficiency"] = derived["ideal_ms"] / ms[name]
    if "overlap_efficiency" in derived:
        derived["overlap_within_slack"] = ms["overlap"] <= OVERLAP_SLACK * derived["ideal_ms"]
        derived["speedup_vs_ideal_speedup"] = derived["overlap_speedup"] / derived["ideal_speedup"]
        derived["speedup_vs_ideal_pass"] = derived["speedup_vs_ideal_speedup"] >= SPEEDUP_TARGET
    if "overlap" in ms:
        derived["overlap_fraction"] = variants["overlap"]["overlap_fraction"]
        derived["overlap_fraction_pass"] = derived["overlap_fraction"] >= FRACTION_TARGET
    for name in ("overlap-clip", "overlap-userclip"):
        if name in ms:
            spec = [r["speculation"] for r in runs[name]]
            derived[name] = {"vs_overlap": ms[name] / ms["overlap"] if "overlap" in ms else None,
                             "timed_steps": opts.steps * len(spec),
                             **{k: sum(x[k] for x in spec) for k in spec[0]}}
    if "sync" in runs and "overlap" in runs:
        # Overlap is exact: the same losses as sync, step for step, in every round.
        derived["overlap_losses_equal_sync"] = all(a["losses"] == b["losses"] for a, b in zip(runs["sync"], runs["overlap"]))
    formats = {}
    for fmt in opts.state_formats:
        if fmt == "fp32" or f"sync@{fmt}" not in ms:
            continue
        sync_f = variants[f"sync@{fmt}"]
        entry = {"bytes_per_param_per_step": sync_f["store_bytes_per_param_per_step"],
                 "device_ms": sync_f["device_busy_ms_per_step"], "sync_ms": ms[f"sync@{fmt}"]}
        if "sync" in ms:
            entry["fp32_bytes_per_param_per_step"] = variants["sync"]["store_bytes_per_param_per_step"]
            entry["device_ms_saved"] = variants["sync"]["device_busy_ms_per_step"] - entry["device_ms"]
            entry["sync_speedup"] = ms["sync"] / ms[f"sync@{fmt}"]
        if "overlap" in ms and f"overlap@{fmt}" in ms:
            entry["overlap_ms"] = ms[f"overlap@{fmt}"]
            entry["overlap_ms_saved"] = ms["overlap"] - ms[f"overlap@{fmt}"]
            entry["overlap_speedup"] = ms["overlap"] / ms[f"overlap@{fmt}"]
            if "none" in ms and "device_ms_saved" in entry:
                # What the ideal overlapped step, max(compute, device), gains from the smaller device step.
                compute = ms["none"]
                entry["ideal_overlap_ms_saved"] = (max(compute, variants["sync"]["device_busy_ms_per_step"])
                                                   - max(compute, entry["device_ms"]))
        formats[fmt] = entry
    if formats:
        derived["state_formats"] = formats
    return variants, derived


def _mib(n: float) -> str:
    return f"{n / MiB:,.1f}"


def _render(res: dict[str, Any]) -> str:
    o, var, d, cores, src = res["options"], res["variants"], res["derived"], res["cores"], res["source"]
    first = next(iter(var.values()))["rounds"][0]
    warm = f"{o['warmup']} warm-up" + (f" (delayed: {o['warmup'] + DELAYED_WARMUP_STEPS})" if "delayed" in var else "")
    core_line = (f"cores: training loop on core {cores['compute']} (1 torch thread), device on core {cores['device']}"
                 if not cores["shared"] else
                 f"cores: ONE core: the training loop (1 torch thread) and the device SHARE core {cores['compute']}")
    out = [f"nearstep bench step --model {o['model']}", f"machine: {res['machine']}, {res['date']}",
           f"workload: {first['describe']}; {first['params'] / 1e6:.1f} M params",
           f"{o['steps']} timed steps after {warm}, {o['rounds']} round(s) alternating, each variant in a fresh process",
           f"{core_line}; memory budget {o['memory_budget']}, {'automatic' if o['slice_mb'] is None else format(o['slice_mb'], 'g') + ' MiB'} slices",
           f"allocator in each worker: {first.get('allocator', 'the platform default')}",
           f"code: nearstep {src['version']} at {src['path']}, sources sha1 {src['sha1']}"]
    if src["workers_sha1"] != [src["sha1"]]:
        out.append(f"WARNING: the nearstep sources changed during the run (workers saw {', '.join(src['workers_sha1'])}): "
                   f"rounds may not be comparable")
    width = max([9] + [len(name) + 1 for name in var])
    out += ["",
           f"  {'variant':<{width}}{'ms/step':>10}{'steps/s':>9}  {'rounds ms/step':<24}{'overlap':>8}{'device ms':>11}"
           f"{'wait ms':>10}{'store MiB':>11}{'B/param':>9}{'link MiB':>10}   (last six: per step)"]
    for name, v in var.items():
        rounds = " ".join(f"{x:.1f}" for x in v["round_ms_per_step"])
        row = f"  {name:<{width}}{v['ms_per_step']:>10.1f}{v['steps_per_second']:>9.3f}  {rounds:<24}"
        if _base(name) in NEARSTEP_VARIANTS:
            row += (f"{v['overlap_fraction']:>8.3f}{v['device_busy_ms_per_step']:>11.1f}{v['wait_ms_per_step']:>10.1f}"
                    f"{_mib(v['store_bytes_per_step']):>11}{v['store_bytes_per_param_per_step']:>9.2f}"
                    f"{_mib(v['link_bytes_per_step']):>10}")
        out.append(row.rstrip())
    out.append("")
    if "device_only_ms" in d:
        out.append(table_line("device-only step", f"{d['device_only_ms']:.1f} ms", "sync worker: trace device busy / steps"))
    if "sync_minus_none_ms" in d:
        out.append(table_line("sync - none", f"{d['sync_minus_none_ms']:.1f} ms", "cross-check of the device-only step"))
    if "torch_minus_none_ms" in d:
        out.append(table_line("torch - none", f"{d['torch_minus_none_ms']:.1f} ms", "the in-memory fused AdamW step"))
    if "ideal_ms" in d:
        out.append(table_line("ideal = max(compute, device)", f"{d['ideal_ms']:.1f} ms",
                         f"compute-only (none) {d['compute_only_ms']:.1f} ms, device-only {d['device_only_ms']:.1f} ms"))
    for name in ("overlap", "delayed"):
        if f"{name}_speedup" in d:
            out.append(table_line(f"{name}/sync speed-up", f"{d[f'{name}_speedup']:.3f}x", "sync ms / " + name + " ms"))
    if "overlap_efficiency" in d:
        limit = OVERLAP_SLACK * d["ideal_ms"]
        out.append(table_line("overlap efficiency", f"{d['overlap_efficiency']:.3f}", verdict(
            d["overlap_within_slack"],
            f"ideal/overlap; target overlap <= {OVERLAP_SLACK:.2f} x ideal: {var['overlap']['ms_per_step']:.1f} "
            f"{'<=' if d['overlap_within_slack'] else '>'} {limit:.1f} ms")))
        out.append(table_line("speed-up vs ideal speed-up", f"{d['speedup_vs_ideal_speedup']:.3f}", verdict(
            d["speedup_vs_ideal_pass"], f"target >= {SPEEDUP_TARGET}; ideal speed-up {d['ideal_speedup']:.3f}x")))
    if "delayed_efficiency" in d:
        out.append(table_line("delayed efficiency", f"{d['delayed_efficiency']:.3f}", "ideal/delayed (no target)"))
    if "overlap_fraction" in d:
        out.append(table_line("overlap fraction (overlap)", f"{d['overlap_fraction']:.3f}", verdict(
            d["overlap_fraction_pass"], f"target >= {FRACTION_TARGET}; device busy while the loop computes")))
    for name in ("overlap-clip", "overlap-userclip"):
        if name in d:
            c = d[name]
            fired = c["clipped_steps"] if name == "overlap-clip" else c["gradients_changed_after_staging"]
            ratio = f"{c['vs_overlap']:.3f}" if c["vs_overlap"] is not None else "n/a"
            out.append(table_line(f"{name} / overlap", ratio,
                                  f"clipping fired in {fired} of {c['timed_steps']} timed steps; speculated "
                                  f"{c['speculated_steps']}, redone {c['speculation_misses']}"))
    if "overlap_losses_equal_sync" in d:
        out.append(table_line("overlap losses == sync", "yes" if d["overlap_losses_equal_sync"] else "NO",
                         "overlap is exact: bitwise the same losses"))
    for fmt, f in d.get("state_formats", {}).items():
        out.append(table_line(f"{fmt}: store bytes/param/step", f"{f['bytes_per_param_per_step']:.3f}",
                              f"fp32 {f.get('fp32_bytes_per_param_per_step', float('nan')):.3f}"))
        if "sync_speedup" in f:
            out.append(table_line(f"{fmt}: device step", f"{f['device_ms']:.1f} ms",
                                  f"{f['device_ms_saved']:+.1f} ms saved vs fp32; sync {f['sync_speedup']:.3f}x"))
        if "overlap_speedup" in f:
            ideal = f" (ideal max(compute, device) model: {f['ideal_overlap_ms_saved']:.1f} ms)" if "ideal_overlap_ms_saved" in f else ""
            out.append(table_line(f"{fmt}: overlap step", f"{f['overlap_ms']:.1f} ms",
                                  f"{f['overlap_ms_saved']:+.1f} ms saved vs fp32 overlap{ideal}"))
    return "\n".join(out)


def _progress(what: str) -> None:
    print(f"nearstep bench step: {what}", file=sys.stderr, flush=True)


def _run_rounds(opts: Options, runs: dict[str, list[dict[str, Any]]], work: pathlib.Path,
                compute_core: int, device_core: int) -> None:
    for r in range(opts.rounds):
        # Alternate A B C D E A B C D E: a shared VM drifts between runs; side by side, every variant sees it.
        for variant, fmt in _run_keys(opts):
            key = _key(variant, fmt)
            trace = None
            if opts.trace_dir is not None and r == opts.rounds - 1 and variant in NEARSTEP_VARIANTS:
                trace = str(opts.trace_dir.resolve() / f"bench-step-{opts.model}-{key.replace('@', '-')}.json")
            spec = WorkerSpec(model=opts.model, variant=variant, round=r + 1, batch=opts.batch,
                              seq_len=opts.seq_len, width=opts.width, steps=opts.steps, warmup=opts.warmup,
                              memory_budget=opts.memory_budget, slice_mb=opts.slice_mb,
                              store=str((work / f"store-{key.replace('@', '-')}-{r + 1}").resolve()),
                              compute_core=compute_core, device_core=device_core, trace=trace,
                              device=opts.device, state_format=fmt, allocator=opts.allocator)
            result = _run_worker(spec, work)
            runs[key].append(result)
            _progress(f"round {r + 1}/{opts.rounds} {key}: {result['ms_per_step']:.1f} ms/step "
                      f"(worker process {result['process_seconds']:.1f} s)")


def _run_keys(opts: Options) -> list[tuple[str, str]]:
    """(variant, state format) of every run of a round: the nearstep variants once per format."""
    return [(v, f) for v in opts.variants for f in (opts.state_formats if v in NEARSTEP_VARIANTS else ("fp32",))]


def main(argv: list[str] | None = None) -> int:
    """Run every variant in rounds, print the table, write the JSON; returns 0 (PASS/MISS are reported).

    Returns 2 when the model's packages are missing (after saying how to install them), 1 when a worker fails.
    """
    opts = _parse(argv)
    if opts.nproc > 1:
        from nearstep.bench.ranks import run

        return run(opts, opts.nproc)
    missing = missing_packages(opts.model)
    if missing:
        print(f"nearstep bench step: --model {opts.model} needs {', '.join(missing)}, not installed here.\n"
              f"Install them with: {INSTALL[opts.model]}", file=sys.stderr)
        return 2
    compute_core, device_core = cores()
    options = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in asdict(opts).items()}
    res: dict[str, Any] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "options": options,
                           "cores": {"compute": compute_core, "device": device_core,
                                     "shared": compute_core == device_core},
                           "targets": {"overlap_slack": OVERLAP_SLACK, "speedup_vs_ideal": SPEEDUP_TARGET,
                                       "overlap_fraction": FRACTION_TARGET},
                           "lr": LR, "delayed_warmup_steps": DELAYED_WARMUP_STEPS,
                           "source": {"version": nearstep.__version__,
                                      "path": str(pathlib.Path(nearstep.__file__).resolve().parent),
                                      "sha1": source_digest()}}
    runs: dict[str, list[dict[str, Any]]] = {_key(v, f): [] for v, f in _run_keys(opts)}
    started = time.perf_counter()
    with scratch(opts.dir) as work:
        res["machine"] = machine(opts.dir)
        try:
            _run_rounds(opts, runs, work, compute_core, device_core)
        except WorkerError as exc:
            print(f"nearstep bench step: {exc}", file=sys.stderr)
            return 1
    res["run_seconds"] = time.perf_counter() - started
    res["variants"], res["derived"] = _summarize(opts, runs)
    res["source"]["workers_sha1"] = sorted({r["source"] for rounds in runs.values() for r in rounds})
    print(_render(res))
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0
