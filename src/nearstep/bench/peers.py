"""``nearstep bench peers``: nearstep side by side with DeepSpeed ZeRO-Infinity on one model, one disk, one run.

The same model, data, seed, steps and store directory under these variants:

- ``ds-nvme``: DeepSpeed ZeRO-3 with the optimizer state on NVMe (ZeRO-Infinity): ``DeepSpeedCPUAdam``
  and its swapper, reading and writing the state through its async I/O op (libaio);
- ``ds-cpu``: DeepSpeed ZeRO-3 with the optimizer state in host memory, for reference;
- ``none``: forward and backward only, no optimizer, on every core: the floor that no optimizer,
  however well hidden, can go under;
- ``sync``, ``overlap``, ``delayed``: ``nearstep.AdamW`` in each mode, state on the store, the loop's
  threads on every core, the device's core included (they compete for it while the device works);
- ``overlap-lend``: overlap mode with ``DeviceConfig(lend_idle_cores=True)``: the loop steps down to
  the cores the device does not use while it has a step queued;
- ``overlap-own``: overlap mode with the loop held to a core of its own (one torch thread), the
  device on the other (how this benchmark ran until 2026-12-03).

Each variant runs in a fresh process and the variants alternate (A B C D E A B C D E ...), as in
``nearstep bench step``. The machine is shared out the way each system is built to use it: DeepSpeed's
process gets every core (its forward/backward and its CPU Adam run on all of them); so does nearstep's
training loop, with its device process pinned to the last core (``overlap-lend`` and ``overlap-own``
share that core out otherwise; see [Note: lending cores to the loop] in ``nearstep/cores.py``). Both are measured the same
way: wall time around forward, backward and ``step()``; bytes from ``/proc/<pid>/io`` of every process
of the variant (for nearstep the device process too); peak memory as the processes' ``VmHWM``.

Installs nothing. Without DeepSpeed it says how to install it (``bench/peers-setup.sh``) and runs the
nearstep rows alone. One table on stdout, every number in a JSON file; everything written under
``--dir`` is deleted at the end, also when a worker fails.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import pathlib
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

import nearstep
from nearstep import aio
from nearstep.bench.report import WorkerError, machine, read_text, run_worker, scratch, table_line, verdict
from nearstep.bench.workload import (DEFAULT_BATCH, DEFAULT_SEQ_LEN, DELAYED_WARMUP_STEPS, INSTALL, LR, MODELS, SEED,
                                  build_workload, missing_packages)
from nearstep.protocol import Lane
from nearstep.trace import merge_intervals
from nearstep.device import parse_bytes

__all__ = ["main", "DeepSpeedStatus", "deepspeed_status", "load_deepspeed_aio", "collapse_to_huge_pages", "VARIANTS"]

SETUP = "bash bench/peers-setup.sh"
DEEPSPEED_VARIANTS = ("ds-nvme", "ds-cpu")
NEARSTEP_VARIANTS = ("sync", "overlap", "delayed", "overlap-lend", "overlap-own")
OWN_CORE = "overlap-own"  # the loop on a core of its own, one torch thread
LEND = "overlap-lend"  # the loop on every core while the device is idle, off its core while it works
VARIANTS = (*DEEPSPEED_VARIANTS, "none", *NEARSTEP_VARIANTS)
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.01  # torch.optim.AdamW's defaults, on both sides
RATIO_TARGET = 0.6  # nearstep overlap ms/iteration over DeepSpeed NVMe's, at or under this PASSes
# DeepSpeed's aio section. Its defaults (1 MiB blocks, queue depth 8, 1 thread) read 15-20% slower
# on a 2-core VM than 32 in flight on 2 threads. The block stays 1 MiB: the swapper keeps in memory
# any tensor smaller than one block (so small models would never touch the disk).
DS_AIO = {"block_size": 1 << 20, "queue_depth": 32, "intra_op_parallelism": 2, "single_submit": False,
          "overlap_events": True}
WORKER_TIMEOUT = 1800  # seconds
_MADV_COLLAPSE = 25  # linux/mman.h
MiB = 2**20


# ---------------------------------------------------------------------------
# Is DeepSpeed here?


@dataclass(frozen=True, slots=True)
class DeepSpeedStatus:
    """Whether DeepSpeed can run its rows here: ``usable``, its ``version``, and ``why`` not."""

    usable: bool
    version: str | None
    why: str


def _cpu_accelerator() -> None:
    # DeepSpeed picks its accelerator at import; on a machine without CUDA it must be told "cpu".
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def deepspeed_status() -> DeepSpeedStatus:
    """Import deepspeed and ask whether its async I/O op (libaio) can be built here. Installs nothing."""
    _cpu_accelerator()
    try:
        import deepspeed
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except Exception as exc:  # ImportError, or any failure of a broken install
        return DeepSpeedStatus(False, None, f"deepspeed does not import here ({type(exc).__name__}: {exc})")
    version = str(getattr(deepspeed, "__version__", "?"))
    try:
        compatible, detail = AsyncIOBuilder().is_compatible(verbose=False), ""
    except Exception as exc:
        compatible, detail = False, f" ({type(exc).__name__}: {exc})"
    if not compatible:
        return DeepSpeedStatus(False, version, f"deepspeed {version} imports but its async I/O op cannot be built "
                                               f"here{detail}: libaio-dev missing?")
    return DeepSpeedStatus(True, version, "")


def collapse_to_huge_pages(tensor: torch.Tensor) -> bool:
    """Back ``tensor``'s memory with transparent huge pages now (``MADV_COLLAPSE``, Linux >= 6.1).

    nearstep's I/O buffers ask for huge pages (``nearstep.aio.AlignedBuffer``); DeepSpeed's
    page-locked buffers come from ``posix_memalign`` in small pages. A direct request is cut into at
    most ``max_segments`` physically contiguous pieces (254 on a virtio disk), so the same request
    from scattered small pages reaches the disk in smaller pieces: measured 15-40% slower reads.
    This gives DeepSpeed's buffers what nearstep's have. Best effort: False where refused.
    """
    huge = 2 << 20
    start = -(-tensor.data_ptr() // huge) * huge
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // huge * huge
    if end <= start:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_COLLAPSE) == 0


def load_deepspeed_aio() -> Any:
    """DeepSpeed's compiled async I/O op (it compiles on first use, minutes; then it is cached)."""
    _cpu_accelerator()
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().load(verbose=False)


# ---------------------------------------------------------------------------
# Options


@dataclass(frozen=True, kw_only=True, slots=True)
class Options:
    """What to run, and where.

    Attributes:
        model: ``mlp``, ``minilm`` or ``smollm2``.
        batch: examples (sequences) per step.
        seq_len: tokens per sequence (minilm, smollm2).
        width: width of the mlp's square linears.
        steps: timed steps per worker.
        warmup: untimed steps before them, the same for every variant (delayed's sync warm-up is part of them).
        rounds: how many times each variant runs, alternating.
        variants: which of ``VARIANTS`` to run, in that order.
        memory_budget: nearstep's device memory budget, like ``"2GiB"``.
        ds_threads: torch threads of every training loop but overlap-own's (default: every core this process may use).
        dir: scratch directory for the stores and DeepSpeed's swap files; the run works in a fresh subdirectory.
        json: where the results are written.
        quick: tiny sizes, for smoke tests.
        deepspeed: run the DeepSpeed rows where DeepSpeed is installed.
        ds_zero: extra keys for DeepSpeed's ``zero_optimization`` section (its tuning knobs).
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
    ds_threads: int
    dir: pathlib.Path
    json: pathlib.Path
    quick: bool
    deepspeed: bool
    ds_zero: dict[str, Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerSpec:
    """Everything one worker process needs; travels as JSON on its command line."""

    model: str
    variant: str
    round: int
    batch: int
    seq_len: int
    width: int
    steps: int
    warmup: int
    memory_budget: str
    store: str
    cores: list[int]
    device_core: int
    threads: int
    master_port: int
    ds_zero: dict[str, Any] | None = None
    lend: bool = False


def _parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="nearstep bench peers", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--model", choices=MODELS, default="mlp", help="workload (default: mlp, about 50M params)")
    parser.add_argument("--batch", type=int, default=None,
                        help="examples per step (default: mlp 32, minilm 16, smollm2 4)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: minilm 96, smollm2 128)")
    parser.add_argument("--width", type=int, default=4096, help="mlp width (default 4096: about 50M parameters)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per worker (default 10)")
    parser.add_argument("--warmup", type=int, default=3,
                        help=f"untimed steps first, every variant (default 3; delayed runs its first "
                             f"{DELAYED_WARMUP_STEPS} as sync)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all variants, alternating (default 3)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    parser.add_argument("--memory-budget", default="2GiB", help="nearstep's device memory budget (default 2GiB)")
    parser.add_argument("--ds-threads", type=int, default=None,
                        help="torch threads of the training loop, DeepSpeed's and nearstep's but overlap-own's "
                             "(default: every core this process may use)")
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path(".nearstep/bench-peers"),
                        help="scratch directory on the disk under test (default: ./.nearstep/bench-peers)")
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("bench-peers.json"), help="results file")
    parser.add_argument("--quick", action="store_true", help="smoke test: mlp width 512, 2 steps, 1 round")
    parser.add_argument("--no-deepspeed", dest="deepspeed", action="store_false",
                        help="run the nearstep rows only, even where DeepSpeed is installed")
    parser.add_argument("--ds-zero", default="{}", metavar="JSON",
                        help="extra keys for DeepSpeed's zero_optimization section, e.g. "
                             "'{\"overlap_comm\": false}' (default: none)")
    args = parser.parse_args(argv)
    try:
        ds_zero = json.loads(args.ds_zero)
    except json.JSONDecodeError as exc:
        parser.error(f"--ds-zero: not JSON: {exc}")
    if not isinstance(ds_zero, dict):
        parser.error("--ds-zero: give a JSON object")
    if args.quick:
        args.width, args.steps, args.rounds = 512, 2, 1
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: {','.join(unknown) or 'none given'}; pick from {','.join(VARIANTS)}")
    batch = DEFAULT_BATCH[args.model] if args.batch is None else args.batch
    seq_len = DEFAULT_SEQ_LEN[args.model] if args.seq_len is None else args.seq_len
    ds_threads = len(os.sched_getaffinity(0)) if args.ds_threads is None else args.ds_threads
    if min(batch, args.width, args.steps, args.rounds, ds_threads) < 1 or args.warmup < 0:
        parser.error("--batch, --width, --steps, --rounds and --ds-threads must be >= 1, --warmup >= 0")
    if args.model != "mlp" and seq_len < 2:
        parser.error("--seq-len must be >= 2")
    try:
        parse_bytes(args.memory_budget)
    except ValueError as exc:
        parser.error(f"--memory-budget: {exc}")
    return Options(model=args.model, batch=batch, seq_len=seq_len, width=args.width, steps=args.steps,
                   warmup=args.warmup, rounds=args.rounds, variants=tuple(v for v in VARIANTS if v in variants),
                   memory_budget=args.memory_budget, ds_threads=ds_threads, dir=args.dir, json=args.json,
                   quick=args.quick, deepspeed=args.deepspeed, ds_zero=ds_zero)


# ---------------------------------------------------------------------------
# The worker: one variant, one round, in a process of its own


class Workload(NamedTuple):
    """A model, its loss, and the batches of every step in order: warm-up first, then the timed ones."""

    model: torch.nn.Module
    loss: Callable[[Any, Any], torch.Tensor]
    batches: list[Any]
    describe: str


def _workload(spec: WorkerSpec) -> Workload:
    """The model and data ``nearstep bench step`` trains (its own builder), batches in training order."""
    built = build_workload(spec, spec.warmup)
    return Workload(built.model, built.loss, built.warm + built.timed, built.describe)


def _proc_io(pid: int) -> dict[str, int]:
    """rchar, wchar, read_bytes, write_bytes of ``/proc/<pid>/io`` (all of the process's threads)."""
    fields = (line.partition(":") for line in read_text(f"/proc/{pid}/io").splitlines())
    return {k: int(v) for k, _, v in fields if k in ("rchar", "wchar", "read_bytes", "write_bytes")}


def _hwm(pid: int) -> int:
    """The process's resident high-water mark (VmHWM), in bytes; 0 if it is gone."""
    for line in read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _io_delta(before: dict[int, dict[str, int]], after: dict[int, dict[str, int]]) -> dict[str, int]:
    total = dict.fromkeys(("rchar", "wchar", "read_bytes", "write_bytes"), 0)
    for pid, counters in after.items():
        for k in total:
            total[k] += counters.get(k, 0) - before.get(pid, {}).get(k, 0)
    return total


def _overlap_ns(intervals: list[tuple[int, int]], start: int, end: int) -> int:
    """How much of [start, end) the (merged, disjoint) ``intervals`` cover."""
    return sum(max(0, min(end, b) - max(start, a)) for a, b in intervals)


class _Loop:
    """The timed training loop both systems run: forward, backward, step, with a clock around each."""

    def __init__(self, forward: Callable[[Any], torch.Tensor], backward: Callable[[torch.Tensor], None],
                 step: Callable[[], None]) -> None:
        self.forward, self.backward, self.step = forward, backward, step
        self.losses: list[float] = []
        self.phase_ns = {"forward": 0, "backward": 0, "step": 0}
        self.step_intervals: list[tuple[int, int]] = []
        self.window = (0, 0)  # from the first timed forward to the end of the last timed step()

    def run(self, batch: Any, timed: bool) -> None:
        t0 = time.monotonic_ns()
        loss = self.forward(batch)
        t1 = time.monotonic_ns()
        self.backward(loss)
        t2 = time.monotonic_ns()
        self.step()
        t3 = time.monotonic_ns()
        self.losses.append(float(loss.detach()))
        if timed:
            self.phase_ns["forward"] += t1 - t0
            self.phase_ns["backward"] += t2 - t1
            self.phase_ns["step"] += t3 - t2
            self.step_intervals.append((t2, t3))


def deepspeed_config(spec: WorkerSpec) -> dict[str, Any]:
    """The DeepSpeed configuration of one peer worker (ZeRO-3, optimizer offloaded to NVMe or CPU)."""
    offload: dict[str, Any] = {"device": "cpu", "pin_memory": False}
    if spec.variant == "ds-nvme":
        # buffer_count 4: the swapper's page-locked buffers, as many as nearstep's 4 store buffers in flight.
        offload = {"device": "nvme", "nvme_path": spec.store, "pin_memory": False, "buffer_count": 4,
                   "fast_init": False}
    return {
        "train_micro_batch_size_per_gpu": spec.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # nearstep runs without max_grad_norm too
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                  "weight_decay": WEIGHT_DECAY}},
        "zero_optimization": {"stage": 3, "offload_optimizer": offload, **(spec.ds_zero or {})},
        "aio": DS_AIO,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _deepspeed_worker(spec: WorkerSpec, work: Workload) -> dict[str, Any]:
    _cpu_accelerator()
    import deepspeed

    torch.set_num_threads(spec.threads)
    params = sum(p.numel() for p in work.model.parameters())  # before ZeRO-3 partitions them away
    deepspeed.init_distributed(dist_backend="gloo")  # the CPU default, ccl, is not there on a plain CPU build
    engine, *_ = deepspeed.initialize(model=work.model, model_parameters=work.model.parameters(),
                                      config=deepspeed_config(spec))
    engine.train()
    # The swapper's page-locked buffers on huge pages, as nearstep's are (see collapse_to_huge_pages).
    swapper = getattr(getattr(engine, "optimizer", None), "optimizer_swapper", None)
    buffers = getattr(getattr(swapper, "swap_buffer_manager", None), "all_buffers", [])
    huge = [collapse_to_huge_pages(b) for b in buffers]
    loop = _Loop(lambda b: work.loss(engine, b), engine.backward, engine.step)
    pid = os.getpid()
    try:
        result = _timed_loop(spec, work, loop, [pid], finish=lambda: None) | {"params": params}
        optimizer = type(getattr(engine, "optimizer", None)).__name__
        inner = type(getattr(getattr(engine, "optimizer", None), "optimizer", None)).__name__
        result |= {"deepspeed": {"version": deepspeed.__version__, "config": deepspeed_config(spec),
                                 "zero_optimizer": optimizer, "optimizer": inner,
                                 "swap_buffers": len(huge), "swap_buffers_on_huge_pages": sum(huge)},
                   "swap_files": sorted(str(p.relative_to(spec.store)) for p in pathlib.Path(spec.store).rglob("*")
                                        if p.is_file())[:20]}
    finally:
        if hasattr(engine, "destroy"):
            engine.destroy()
        torch.distributed.destroy_process_group()
    return result


def _compute_only_worker(spec: WorkerSpec, work: Workload) -> dict[str, Any]:
    os.sched_setaffinity(0, set(spec.cores))
    torch.set_num_threads(spec.threads)
    model = work.model
    model.train()
    loop = _Loop(lambda b: work.loss(model, b), lambda loss: loss.backward(), lambda: model.zero_grad(set_to_none=True))
    return _timed_loop(spec, work, loop, [os.getpid()], finish=lambda: None)


def _nearstep_worker(spec: WorkerSpec, work: Workload) -> dict[str, Any]:
    device = nearstep.DeviceConfig(cores=(spec.device_core,), memory_budget=spec.memory_budget,
                                   lend_idle_cores=spec.lend)
    os.sched_setaffinity(0, set(spec.cores))
    torch.set_num_threads(spec.threads)
    model = work.model
    model.train()
    mode = "overlap" if spec.variant in (OWN_CORE, LEND) else spec.variant
    extra = {"overlap": {"model": model}, "delayed": {"warmup_steps": DELAYED_WARMUP_STEPS}}.get(mode, {})
    opt = nearstep.AdamW(model.named_parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                         store=spec.store, mode=mode, device=device, **extra)

    def step() -> None:
        opt.step()
        opt.zero_grad()

    loop = _Loop(lambda b: work.loss(model, b), lambda loss: loss.backward(), step)
    try:
        before = {}

        def start() -> None:
            opt.synchronize()  # the timed steps start with nothing in flight
            before.update(opt.stats())
            opt.trace.clear()

        result = _timed_loop(spec, work, loop, [os.getpid(), opt.device.info.pid], finish=opt.synchronize,
                             start=start)
        after = opt.stats()
        # The loop's waits for the optimizer outside step(): forward pre-hooks waiting for new weights,
        # backward waiting for a staging buffer. Inside step() they are already in its time.
        # The final synchronize() is already in the tail, so only the waits of the timed iterations count.
        waits = merge_intervals([(e.start_ns, e.end_ns) for e in opt.trace.events()
                        if e.lane == Lane.COMPUTE and e.name.startswith("wait")])
        inside = sum(_overlap_ns(waits, a, b) for a, b in loop.step_intervals)
        outside_ns = _overlap_ns(waits, *loop.window) - inside
        result["exposed_step_ms"] += outside_ns / 1e6 / spec.steps
        result["waits_outside_step_ms"] = outside_ns / 1e6 / spec.steps
        counters = ("device_store_read_bytes", "device_store_write_bytes", "device_link_in_bytes",
                    "device_link_out_bytes")
        per_step = {k: (after[k] - before[k]) / spec.steps for k in counters}
        result |= {"stats_per_step": per_step, "overlap_fraction": opt.trace.summary()["overlap_fraction"],
                   "lent_core_switches": after["lent_core_switches"] - before["lent_core_switches"],
                   "device": {"pid": opt.device.info.pid, "cores": list(opt.device.info.cores),
                              "direct_io": opt.device.info.direct_io}}
    finally:
        opt.close()
    return result


def _timed_loop(spec: WorkerSpec, work: Workload, loop: _Loop, pids: list[int], finish: Callable[[], None],
                start: Callable[[], None] | None = None) -> dict[str, Any]:
    torch.manual_seed(SEED)  # the same dropout masks in every variant
    for batch in work.batches[: spec.warmup]:
        loop.run(batch, timed=False)
    if start is not None:
        start()
    io_before = {pid: _proc_io(pid) for pid in pids}
    t0 = time.monotonic_ns()
    marks = [t0]
    for batch in work.batches[spec.warmup:]:
        loop.run(batch, timed=True)
        marks.append(time.monotonic_ns())
    loop.window = (t0, marks[-1])
    finish()  # inside the timed region: nothing hides unfinished work
    end = time.monotonic_ns()
    io = _io_delta(io_before, {pid: _proc_io(pid) for pid in pids})
    tail_ms = (end - marks[-1]) / 1e6
    return {
        "variant": spec.variant, "round": spec.round, "describe": work.describe,
        "params": sum(p.numel() for p in work.model.parameters()),
        "ms_per_iteration": (end - t0) / 1e6 / spec.steps,
        "iteration_ms": [(b - a) / 1e6 for a, b in zip(marks, marks[1:])],
        "forward_ms": loop.phase_ns["forward"] / 1e6 / spec.steps,
        "backward_ms": loop.phase_ns["backward"] / 1e6 / spec.steps,
        "step_call_ms": loop.phase_ns["step"] / 1e6 / spec.steps,
        # The time the loop spends on the optimizer: step() itself, the final wait, and (added by the
        # nearstep worker) its waits outside step().
        "exposed_step_ms": (loop.phase_ns["step"] / 1e6 + tail_ms) / spec.steps,
        "tail_ms": tail_ms,
        "io_per_step": {k: v / spec.steps for k, v in io.items()},
        "peak_rss": {str(pid): _hwm(pid) for pid in pids},
        "losses": loop.losses, "warmup": spec.warmup,
        "torch_threads": torch.get_num_threads(), "affinity": sorted(os.sched_getaffinity(0)),
    }


def _worker(spec: WorkerSpec) -> dict[str, Any]:
    started = time.perf_counter()
    if spec.variant in DEEPSPEED_VARIANTS:
        os.sched_setaffinity(0, set(spec.cores))
        torch.set_num_threads(spec.threads)
    work = _workload(spec)
    if spec.variant in DEEPSPEED_VARIANTS:
        result = _deepspeed_worker(spec, work)
    elif spec.variant == "none":
        result = _compute_only_worker(spec, work)
    else:
        result = _nearstep_worker(spec, work)
    result["worker_seconds"] = time.perf_counter() - started
    return result


def _worker_entry() -> None:
    """Entry point of a worker process: ``python -c ... SPEC_JSON RESULT_PATH``."""
    spec = WorkerSpec(**json.loads(sys.argv[1]))
    result = _worker(spec)
    pathlib.Path(sys.argv[2]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------
# The parent: rounds of workers, the table, the JSON


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_worker(spec: WorkerSpec, work: pathlib.Path) -> dict[str, Any]:
    env = dict(os.environ)
    if spec.variant in DEEPSPEED_VARIANTS:
        # One process is a whole "world" of one rank.
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(spec.master_port), "RANK": "0", "WORLD_SIZE": "1",
                "LOCAL_RANK": "0"}
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    pathlib.Path(spec.store).mkdir(parents=True, exist_ok=True)
    return run_worker("nearstep.bench.peers", asdict(spec), work / f"result-{spec.variant}-{spec.round}.json",
                      label=f"{spec.variant} worker of round {spec.round}", timeout=WORKER_TIMEOUT, store=spec.store,
                      env=env)


def _cores() -> tuple[list[int], int, int]:
    """(every core this process may use, nearstep's training-loop core, nearstep's device core)."""
    available = sorted(os.sched_getaffinity(0))
    return available, available[0], available[1] if len(available) > 1 else available[0]


def _run_rounds(opts: Options, variants: tuple[str, ...], runs: dict[str, list[dict[str, Any]]],
                work: pathlib.Path) -> None:
    available, loop_core, device_core = _cores()
    for r in range(opts.rounds):
        # Alternate A B C D E A B C D E: a shared VM drifts between runs; side by side, every variant sees it.
        for variant in variants:
            ours = variant not in DEEPSPEED_VARIANTS
            own = variant == OWN_CORE
            spec = WorkerSpec(model=opts.model, variant=variant, round=r + 1, batch=opts.batch, seq_len=opts.seq_len,
                              width=opts.width, steps=opts.steps, warmup=opts.warmup,
                              memory_budget=opts.memory_budget,
                              store=str((work / f"state-{variant}-{r + 1}").resolve()),
                              cores=[loop_core] if own else available, device_core=device_core,
                              threads=1 if own else opts.ds_threads, master_port=0 if ours else _free_port(),
                              ds_zero=None if ours else opts.ds_zero,
                              lend=variant == LEND)
            result = _run_worker(spec, work)
            runs[variant].append(result)
            _progress(f"round {r + 1}/{opts.rounds} {variant}: {result['ms_per_iteration']:.1f} ms/iteration, "
                      f"step exposed {result['exposed_step_ms']:.1f} ms "
                      f"(worker process {result['process_seconds']:.1f} s)")


def _median(rounds: list[dict[str, Any]], get: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(get(r) for r in rounds)


def _summarize(runs: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    variants: dict[str, Any] = {}
    for name, rounds in runs.items():
        variants[name] = {
            "ms_per_iteration": _median(rounds, lambda r: r["ms_per_iteration"]),
            "round_ms_per_iteration": [r["ms_per_iteration"] for r in rounds],
            **{key: _median(rounds, lambda r, key=key: r[key])
               for key in ("forward_ms", "backward_ms", "step_call_ms", "exposed_step_ms")},
            "read_bytes_per_step": _median(rounds, lambda r: r["io_per_step"]["read_bytes"]),
            "write_bytes_per_step": _median(rounds, lambda r: r["io_per_step"]["write_bytes"]),
            "peak_rss_bytes": _median(rounds, lambda r: sum(r["peak_rss"].values())),
            "losses": rounds[0]["losses"],
            "rounds": rounds,
        }
    derived: dict[str, Any] = {}
    ms = {name: v["ms_per_iteration"] for name, v in variants.items()}
    if "ds-nvme" in ms:
        for name in ("ds-cpu", "none", *NEARSTEP_VARIANTS):
            if name in ms:
                derived[f"{name}_over_ds_nvme"] = ms[name] / ms["ds-nvme"]
                derived[f"{name}_exposed_step_over_ds_nvme"] = (
                    variants[name]["exposed_step_ms"] / variants["ds-nvme"]["exposed_step_ms"])
        if "overlap" in ms:
            derived["overlap_target"] = RATIO_TARGET
            derived["overlap_pass"] = derived["overlap_over_ds_nvme"] <= RATIO_TARGET
    if "none" in ms:
        for name in NEARSTEP_VARIANTS:
            if name in ms:  # 1.0: the optimizer step is completely hidden
                derived[f"{name}_hidden"] = ms["none"] / ms[name]
    reference = next((name for name in ("ds-nvme", "ds-cpu", "sync") if name in variants), None)
    if reference is not None:
        derived["loss_reference"] = reference
        ref = variants[reference]["losses"]
        for name, v in variants.items():
            if name not in (reference, "none"):  # none does not train
                diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(v["losses"], ref)]
                derived[f"{name}_max_loss_rel_diff"] = max(diffs) if diffs else math.nan
    for name in ("overlap", LEND, OWN_CORE):
        if "sync" in runs and name in runs:
            derived[f"{name}_losses_equal_sync"] = all(a["losses"] == b["losses"]
                                                       for a, b in zip(runs["sync"], runs[name]))
    return variants, derived


def _deepspeed_line(res: dict[str, Any]) -> str:
    ds = res["deepspeed"]
    if not ds["available"]:
        return f"DeepSpeed: not run: {ds['why']}"
    line = (f"DeepSpeed: {ds['version']} ZeRO-3, aio {DS_AIO['block_size'] // MiB} MiB blocks, queue depth "
            f"{DS_AIO['queue_depth']}, {DS_AIO['intra_op_parallelism']} threads")
    nvme = res["variants"].get("ds-nvme")
    if nvme is not None:
        info = nvme["rounds"][0]["deepspeed"]
        line += (f"; NVMe swapper: {info['swap_buffers']} page-locked buffers, {info['swap_buffers_on_huge_pages']} "
                 f"of them moved to huge pages (as nearstep's are)")
    return line


def _render(res: dict[str, Any]) -> str:
    o, var, d = res["options"], res["variants"], res["derived"]
    first = next(iter(var.values()))["rounds"][0]
    out = [f"nearstep bench peers --model {o['model']}", f"machine: {res['machine']}, {res['date']}",
           f"workload: {first['describe']}; {first['params'] / 1e6:.1f} M params; fp32, AdamW lr {LR:g}, "
           f"betas {BETAS}, eps {EPS:g}, weight decay {WEIGHT_DECAY:g}, no clipping",
           f"{o['steps']} timed steps after {o['warmup']} warm-up, {o['rounds']} round(s) alternating, "
           f"each variant in a fresh process",
           f"cores: every loop on {res['cores']['deepspeed']} with {o['ds_threads']} torch thread(s) (overlap-own: "
           f"core {res['cores']['loop']}, 1 thread); nearstep's device on core {res['cores']['device']}, lent to the "
           f"loop while idle in overlap-lend only; memory budget {o['memory_budget']}",
           _deepspeed_line(res), "",
           f"  {'variant':<15}{'ms/iter':>9}  {'rounds':<22}{'fwd':>7}{'bwd':>7}{'step()':>8}{'exposed':>9}"
           f"{'read MiB':>10}{'write MiB':>10}{'peak RSS MiB':>13}{'last loss':>11}"]
    for name, v in var.items():
        rounds = " ".join(f"{x:.0f}" for x in v["round_ms_per_iteration"])
        out.append(f"  {name:<15}{v['ms_per_iteration']:>9.1f}  {rounds:<22}{v['forward_ms']:>7.1f}"
                   f"{v['backward_ms']:>7.1f}{v['step_call_ms']:>8.1f}{v['exposed_step_ms']:>9.1f}"
                   f"{v['read_bytes_per_step'] / MiB:>10.1f}"
                   f"{v['write_bytes_per_step'] / MiB:>10.1f}{v['peak_rss_bytes'] / MiB:>13.0f}"
                   f"{v['losses'][-1]:>11.5g}")
    out += ["  (ms per iteration, median of rounds; fwd/bwd/step(): time in each call; exposed: step() + the loop's "
            "other waits for the optimizer; read/write: /proc/<pid>/io bytes per step, every process of the variant; "
            "peak RSS: VmHWM summed over them)", ""]
    for name in ("ds-cpu", "none", *NEARSTEP_VARIANTS):
        key = f"{name}_over_ds_nvme"
        if key in d:
            note = f"exposed step {d[f'{name}_exposed_step_over_ds_nvme']:.3f} of DeepSpeed NVMe's"
            if name == "none":
                note = "the floor: forward and backward only, on every core"
            if name == "overlap":
                out.append(table_line("overlap / ds-nvme ms/iter", f"{d[key]:.3f}",
                                      verdict(d["overlap_pass"], f"target <= {RATIO_TARGET}; {note}")))
            else:
                out.append(table_line(f"{name} / ds-nvme ms/iter", f"{d[key]:.3f}", note))
    if "loss_reference" in d:
        for name in var:
            key = f"{name}_max_loss_rel_diff"
            if key in d:
                out.append(table_line(f"loss vs {d['loss_reference']}: {name}", f"{d[key]:.2e}",
                                      "largest relative difference over every step, round 1"))
    for name in NEARSTEP_VARIANTS:
        if f"{name}_hidden" in d:
            out.append(table_line(f"none / {name} ms/iter", f"{d[f'{name}_hidden']:.3f}",
                                  "how much of the step is hidden; 1.0: completely"))
    why = {"overlap": "overlap is exact: bitwise the same losses",
           LEND: "the loop's thread count follows the device's phase, so its forward and backward may round "
                 "otherwise than sync's; the update is exact",
           OWN_CORE: "one thread against sync's two: matrix products may sum in another order"}
    for name, note in why.items():
        key = f"{name}_losses_equal_sync"
        if key in d:
            out.append(table_line(f"{name} losses == sync", "yes" if d[key] else "no", note))
    steps = len(first["losses"])
    out += ["", "  losses, round 1 (" + ", ".join(f"{n}" for n in var) + "):"]
    for i in range(steps):
        tag = "warm" if i < o["warmup"] else "timed"
        out.append(f"  {i + 1:>4} {tag:<6}" + "".join(f"{v['losses'][i]:>14.7g}" for v in var.values()))
    return "\n".join(out)


def _progress(what: str) -> None:
    print(f"nearstep bench peers: {what}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run every variant in rounds, print the table, write the JSON; returns 0 (PASS/MISS are reported).

    Returns 2 when the model's packages are missing (after saying how to install them), 1 when a worker fails.
    """
    opts = _parse(argv)
    missing = missing_packages(opts.model)
    if missing:
        print(f"nearstep bench peers: --model {opts.model} needs {', '.join(missing)}, not installed here.\n"
              f"Install them with: {INSTALL[opts.model]}", file=sys.stderr)
        return 2
    variants = opts.variants
    wanted_ds = [v for v in variants if v in DEEPSPEED_VARIANTS]
    status = DeepSpeedStatus(False, None, "left out (--no-deepspeed)")
    if wanted_ds and opts.deepspeed:
        status = deepspeed_status()
    if wanted_ds and not status.usable:
        variants = tuple(v for v in variants if v not in DEEPSPEED_VARIANTS)
        if opts.deepspeed:
            print(f"nearstep bench peers: DeepSpeed rows skipped: {status.why}.\n"
                  f"To compare with DeepSpeed ZeRO-Infinity, install it (DeepSpeed 0.19.8 and libaio-dev; torch is "
                  f"kept) with:\n    {SETUP}\nRunning the nearstep rows alone.", file=sys.stderr)
        if not variants:
            print("nearstep bench peers: nothing left to run", file=sys.stderr)
            return 2
    available, loop_core, device_core = _cores()
    options = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in asdict(opts).items()}
    res: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "options": options,
        "cores": {"deepspeed": available, "loop": loop_core, "device": device_core},
        "deepspeed": {"available": status.usable, "version": status.version, "why": status.why,
                      "install": SETUP, "aio": DS_AIO},
        "nearstep": {"version": nearstep.__version__, "crc32": aio.CRC32_IMPLEMENTATION},
        "hyperparameters": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY,
                            "delayed_warmup_steps": DELAYED_WARMUP_STEPS, "seed": SEED},
    }
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    started = time.perf_counter()
    with scratch(opts.dir) as work:
        res["machine"] = machine(opts.dir)
        try:
            _run_rounds(opts, variants, runs, work)
        except WorkerError as exc:
            print(f"nearstep bench peers: {exc}", file=sys.stderr)
            return 1
    res["run_seconds"] = time.perf_counter() - started
    res["variants"], res["derived"] = _summarize(runs)
    print(_render(res))
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0
