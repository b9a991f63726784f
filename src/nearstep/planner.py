"""What a run will cost before it starts: step time per mode and what bounds it, store size, bytes
per step, and what the state's writes do to the drives (``nearstep plan``, :func:`plan`).

[Note: the planner's step model]
One step of one rank, from the rates of its parts:

- the store: each update reads and writes one generation of the state,
  ``params/rank x bytes/param`` each way (fp32 AdamW: 12 + 12 bytes); a node's
  ranks share its drives: ``io = node_bytes / (drives x read_bw) + node_bytes /
  (drives x write_bw)`` (one disk does the reads and the writes);
- the device's pass: ``update = params/rank / rate(format, cores)``, the
  measured per-core rate of the format's decode, update and encode, scaled by
  the measured gain of a second core (extrapolated linearly, never above the
  core count);
- the device overlaps its reads, pass and writes slice by slice (the engine's
  slot pipeline), so the drive's and the pass's times enter as ``max(io,
  update)`` (plus the commit: the fdatasyncs and the manifest) where the drive
  moves the bytes by itself, and as ``io + update`` where moving them takes the
  device's own cores (``pass_overlaps_io``, which calibration finds out);
- the host link: gradients in and new weights out, ``link = 2 x params/rank x
  bytes/element / link_bw``. Every such byte passes through memory twice, once
  on each side: the loop copies the gradients into staging and the weights out
  of it, and the device reads the gradients there (fp32 ones in place, the
  others copied) and posts each slice's weights after its pass.
  The device's copies run on its own cores, so they add ``link`` to its step,
  ``device = max(io, update) + link + commit`` (``io + update + link + commit``
  without ``pass_overlaps_io``): the link's copy rate is the profile's, measured
  on the same shared memory (docs/planner.md, "Validation on this machine",
  says what this term does and does not explain);
- where the device's cores share the machine's caches and memory bandwidth
  with the loop's (the emulated device on host cores), each side computes
  slower while the other computes beside it: ``loop = compute + staging +
  loop_slowdown x beside`` (``staging``: the link's bytes at the loop's
  measured rate, copies and gradient norms) and ``device' = device +
  device_slowdown x beside``, ``beside = min(compute, update + link)`` (the
  device's own work);
  both slowdowns are measured by calibration (a dense layer's forward and
  backward alone and beside the fused AdamW kernel on the other core), 0 for a
  device of its own;
- ``sync = compute + staging + device``: the loop waits for all of it
  (nothing runs beside);
  ``overlap = max(loop + first x device', forward + device')``: the
  link's copies run on the loop's thread; a slice's update starts when
  backward has its gradients, so the device's window opens a forward (a third
  of the compute) into the step; and the next forward needs the first
  module's weights first, whose gradients come last in backward, so it waits
  for their update after the loop's own side: ``first`` is that module's
  share of the parameters (a transformer's embeddings; one slice where not
  known; ``bench step`` records it, ``first_share``, for ``--validate``).
  ``delayed = max(loop, device' + link / 2)``: its weights land at the next
  ``step()``, all at once, and the next step's applies reach the device only
  after that landing (the link's outbound half). The bound is the larger
  side: compute (or the link), else the drives or the device's cores.

The rates come from a profile that ``nearstep plan --calibrate`` measures on
this machine (``nearstep.bench.io``'s store pass and per-format pass), or from
the command line for a machine that is not this one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Any

from . import formats, rules

__all__ = ["Drive", "Profile", "PlanInputs", "Plan", "plan", "params_from_config", "first_share_from_config",
           "default_profile_path", "load_profile", "calibrate", "contention", "validate", "MODES"]

MODES = ("sync", "overlap", "delayed")
FORWARD_SHARE = 1 / 3  # of forward + backward: backward computes about twice the forward's FLOPs
GB, TB = 1e9, 1e12
SECONDS_PER_DAY = 86400.0
_HYPERS = {"adamw": rules.AdamWHyper, "adam": rules.AdamHyper, "sgd": rules.SGDHyper, "lion": rules.LionHyper}


def _positive(obj: object, *names: str, zero: bool = False) -> None:
    """Refuse any of these attributes that is not a finite number above 0 (at or above it with ``zero``)."""
    for name in names:
        value = getattr(obj, name)
        if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                or value < 0 or (value == 0 and not zero)):
            raise ValueError(f"{name} must be a {'number >= 0' if zero else 'positive number'}, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Drive:
    """One drive of a node: sequential read and write bandwidth (decimal GB/s, as drives are rated),
    capacity (TB) and endurance (drive writes per day over ``warranty_years``)."""

    read_gbps: float
    write_gbps: float
    capacity_tb: float = 3.84
    dwpd: float = 1.0
    warranty_years: float = 5.0

    def __post_init__(self) -> None:
        _positive(self, "read_gbps", "write_gbps", "capacity_tb", "dwpd", "warranty_years")

    @property
    def tbw(self) -> float:
        """Terabytes written over the rating: ``dwpd x capacity x 365 x years``."""
        return self.dwpd * self.capacity_tb * 365.0 * self.warranty_years


@dataclass(frozen=True, kw_only=True, slots=True)
class Profile:
    """The machine's rates: its drives, the device's update rate per state format on one core and the
    gain of a second core, the host link, and the commit's fixed cost per step.

    ``update_rate``: parameters per second on one device core, by state format name (AdamW's pass).
    ``pass_overlaps_io``: the drive moves the bytes while the cores run the pass (DMA, as an SSD does);
    False where moving them takes the same cores (a VM's disk, page-cache copies): then they add up.
    ``link_gbps``: plain copies into and out of the staging memory (the device's side);
    ``staging_gbps``: the loop's side of the same bytes, which also takes each gradient's norm
    (clipping, the non-finite guard) as it stages it; ``link_gbps`` where not measured.
    ``loop_slowdown``, ``device_slowdown``: how much slower the loop's compute and the device's pass
    run while the other computes beside it (0.5: half as long again), where the two share a machine's
    caches and memory bandwidth (the emulated device on host cores); 0 for a device of its own.
    """

    drive: Drive
    drives_per_node: int = 1
    update_rate: dict[str, float] = field(default_factory=lambda: {"fp32": 300e6})
    second_core_gain: float = 1.15
    link_gbps: float = 10.0
    staging_gbps: float | None = None
    commit_s: float = 0.005
    pass_overlaps_io: bool = True
    loop_slowdown: float = 0.0
    device_slowdown: float = 0.0
    source: str = "defaults"

    def __post_init__(self) -> None:
        _positive(self, "drives_per_node", "second_core_gain", "link_gbps")
        if self.staging_gbps is not None:
            _positive(self, "staging_gbps")
        _positive(self, "commit_s", "loop_slowdown", "device_slowdown", zero=True)
        if not self.update_rate:
            raise ValueError("update_rate needs at least one state format's rate")

    def rate(self, state_format: str, cores: int) -> float:
        """Parameters per second of the device's pass on ``cores`` cores (see [Note: the planner's step
        model]). A format the profile has not measured is refused: its codecs change the rate."""
        name = formats.StateFormat.parse(state_format).name
        if name not in self.update_rate:
            raise ValueError(f"the profile has no update rate for state format {name!r} (it has "
                             f"{', '.join(sorted(self.update_rate))}); run nearstep plan --calibrate, or give "
                             f"--update-rate {name}=PARAMS_PER_SECOND")
        gain = 1.0 + (cores - 1) * (self.second_core_gain - 1.0)
        return self.update_rate[name] * max(1.0, min(gain, float(cores)))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Profile:
        fields = dict(doc)
        fields["drive"] = Drive(**fields["drive"])
        fields["update_rate"] = {str(k): float(v) for k, v in fields.get("update_rate", {}).items()}
        return cls(**fields)


def default_profile_path() -> pathlib.Path:
    """Where ``--calibrate`` writes the profile and the planner looks first (``$NEARSTEP_CACHE`` or
    ``~/.cache/nearstep``)."""
    base = os.environ.get("NEARSTEP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nearstep")
    return pathlib.Path(base) / "profile.json"


def load_profile(path: str | os.PathLike | None = None) -> Profile | None:
    """The calibrated profile at ``path`` (default: :func:`default_profile_path`), or None if there is none."""
    where = pathlib.Path(path) if path is not None else default_profile_path()
    if not where.exists():
        if path is not None:
            raise FileNotFoundError(f"no profile at {str(where)!r}; make one with nearstep plan --calibrate --profile {where}")
        return None
    try:
        return Profile.from_json(json.loads(where.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"the profile {str(where)!r} is not one nearstep wrote ({exc}); calibrate again") from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanInputs:
    """A run to plan.

    Attributes:
        params: trainable parameters of the model.
        compute_s: forward and backward time of one step on one rank, in seconds (measured, or
            ``6 x params x tokens / (accelerators x FLOP/s x utilisation)``).
        optimizer: ``adamw``, ``adam``, ``sgd`` (with momentum) or ``lion``.
        state_format: the store's format (``fp32``, ``bf16-sr+8bit``, ...).
        ranks: ranks in all; each keeps ``params / ranks`` of the state. nodes: machines they span.
        device_cores: cores of each rank's device.
        link_bytes: bytes per element crossing the host link each way (gradients in, weights out):
            4 for fp32 parameters, 2 for bf16.
        slices: slices of each rank's store.
        first_share: the share of the parameters the forward needs first (its first module with
            parameters: a transformer's embeddings), whose update the next forward waits for in
            overlap; None: one slice's worth (``1 / slices``).
    """

    params: int
    compute_s: float
    profile: Profile
    optimizer: str = "adamw"
    state_format: str = "fp32"
    ranks: int = 1
    nodes: int = 1
    device_cores: int = 1
    link_bytes: int = 4
    slices: int = 16
    first_share: float | None = None

    def __post_init__(self) -> None:
        _positive(self, "params", "compute_s", "ranks", "nodes", "device_cores", "link_bytes", "slices")
        if self.first_share is not None and not 0.0 < self.first_share <= 1.0:
            raise ValueError(f"first_share must be in (0, 1], got {self.first_share!r}")
        if self.optimizer not in _HYPERS:
            raise ValueError(f"optimizer must be one of {', '.join(_HYPERS)}, got {self.optimizer!r}")
        if self.ranks % self.nodes:
            raise ValueError(f"{self.ranks} ranks do not spread evenly over {self.nodes} nodes")
        formats.StateFormat.parse(self.state_format)  # a bad name fails here


@dataclass(frozen=True, slots=True)
class Plan:
    """What :func:`plan` predicts (seconds, bytes; per rank unless the name says node or drive)."""

    inputs: PlanInputs
    bytes_per_param: float
    store_bytes: int
    state_bytes_per_step: int
    link_bytes_per_step: int
    io_s: float
    update_s: float
    link_s: float
    device_s: float
    step_s: dict[str, float]
    bound: dict[str, str]
    drive_write_bytes_per_day: dict[str, float]
    drive_writes_per_day: dict[str, float]
    drive_life_days: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "inputs"}
        inputs = dataclasses.asdict(self.inputs)
        return {"inputs": inputs, **out}


def _state_names(optimizer: str) -> tuple[str, ...]:
    return ("master",) + rules.state_names(_HYPERS[optimizer])


def plan(inputs: PlanInputs) -> Plan:
    """The step time per mode and what bounds it, the store's size and traffic, and the drives' wear."""
    p = inputs.profile
    fmt = formats.StateFormat.parse(inputs.state_format)
    per_rank = inputs.params / inputs.ranks
    bpp = fmt.bytes_per_param(_state_names(inputs.optimizer))
    generation = per_rank * bpp
    ranks_per_node = inputs.ranks // inputs.nodes
    node_bytes = generation * ranks_per_node
    drives = p.drives_per_node
    io_s = node_bytes / (drives * p.drive.read_gbps * GB) + node_bytes / (drives * p.drive.write_gbps * GB)
    update_s = per_rank / p.rate(fmt.name, inputs.device_cores)
    link_bytes = 2 * per_rank * inputs.link_bytes
    link_s = link_bytes / (p.link_gbps * GB)
    # The device copies every staged byte too: it reads the gradients out of staging and posts the new
    # weights into it, on its own cores, after each slice's pass (see [Note: the planner's step model]).
    device_s = (max(io_s, update_s) if p.pass_overlaps_io else io_s + update_s) + link_s + p.commit_s
    c = inputs.compute_s
    # Where the device's cores share the machine with the loop's (the emulated device), the two slow
    # each other down while both compute: for as long as the shorter of the loop's compute and the
    # device's own work (its pass and its copies) in overlap and delayed; never in sync, where the
    # loop waits while the device works.
    beside = min(c, update_s + link_s)
    staging_s = link_bytes / ((p.staging_gbps or p.link_gbps) * GB)  # the loop's copies and norms
    loop_side = c + staging_s + p.loop_slowdown * beside
    device_side = device_s + p.device_slowdown * beside
    # The link's copies run on the loop's thread (staging in the gradient hooks, landing in the
    # forward pre-hooks), so in overlap and delayed they add to the loop's side, not the device's.
    # Overlap has two limits. The device's whole step, whose window opens when backward starts (a
    # third into the step: backward costs about twice the forward). And the chain through the first
    # module: its gradients come last in backward, the next forward needs its weights first, so the
    # loop waits for their update after its own side. Delayed lands the whole step in step(), after
    # the device's last slice: the next step's applies reach the device only once the loop has
    # copied the weights out (the link's outbound half).
    forward = c * FORWARD_SHARE
    tail = (inputs.first_share if inputs.first_share is not None else 1.0 / inputs.slices) * device_side
    step = {"sync": c + staging_s + device_s,
            "overlap": max(loop_side + tail, forward + device_side),
            "delayed": max(loop_side, device_side + link_s / 2)}
    # The bound: in sync everything adds up, so the largest term; with the update hidden, the
    # compute if it covers the device's whole step, else the largest of the device's terms.
    terms = {"compute": c, "drives": io_s, "device cores": update_s, "host link": staging_s}
    device_terms = {k: v for k, v in terms.items() if k != "compute"}
    bound = {"sync": max(terms, key=terms.__getitem__)}
    for mode in ("overlap", "delayed"):
        device_window = device_side + (forward if mode == "overlap" else link_s / 2)
        if loop_side + (tail if mode == "overlap" else 0.0) >= device_window:
            bound[mode] = "compute" if c >= staging_s else "host link"
        else:
            bound[mode] = max(device_terms, key=device_terms.__getitem__)  # the link's copies are the device's too
    per_drive_write = node_bytes / drives  # each step writes one generation, spread over the node's drives
    written = {m: per_drive_write * SECONDS_PER_DAY / step[m] for m in MODES}
    capacity = p.drive.capacity_tb * TB
    dwpd = {m: written[m] / capacity for m in MODES}
    life = {m: p.drive.tbw * TB / written[m] for m in MODES}
    return Plan(inputs, bpp, int(math.ceil(2 * generation)), int(round(2 * generation)), int(round(link_bytes)),
                io_s, update_s, link_s, device_s, step, bound, written, dwpd, life)


def params_from_config(path: str | os.PathLike) -> int:
    """Trainable parameters of a decoder-only transformer from its Hugging Face ``config.json``
    (Llama, Mistral, Qwen, GPT-NeoX-style keys): embeddings, attention with grouped KV heads, a gated
    or plain MLP, norms, and an untied output head unless ``tie_word_embeddings``."""
    cfg = json.loads(pathlib.Path(path).read_text())
    try:
        d = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
        ffn = int(cfg.get("intermediate_size", 4 * d))
        heads = int(cfg.get("num_attention_heads", 1))
    except KeyError as exc:
        raise ValueError(f"{str(path)!r} has no {exc.args[0]!r}: give the parameter count with --params") from None
    kv_heads = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim", d // heads))
    attention = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
    gated = cfg.get("hidden_act", "silu") in ("silu", "swiglu", "gelu_pytorch_tanh") or "llama" in str(cfg.get("model_type", ""))
    mlp = (3 if gated else 2) * d * ffn
    per_layer = attention + mlp + 2 * d
    head = 0 if cfg.get("tie_word_embeddings", False) else vocab * d
    return vocab * d + layers * per_layer + d + head


def first_share_from_config(path: str | os.PathLike) -> float:
    """The share of a decoder-only transformer's parameters that its forward needs first: the token
    embeddings (see :attr:`PlanInputs.first_share`)."""
    cfg = json.loads(pathlib.Path(path).read_text())
    return int(cfg["hidden_size"]) * int(cfg["vocab_size"]) / params_from_config(path)


# ---------------------------------------------------------------------------
# Calibration: this machine's rates


def calibrate(where: pathlib.Path, *, state_mib: int = 2048, params: int = 1 << 24,
              formats_to_measure: tuple[str, ...] | None = None, contention_rounds: int = 5) -> Profile:
    """Measure this machine into a :class:`Profile`: the store pass's read and write bandwidth over
    ``state_mib`` of AdamW state in ``where`` (``nearstep bench io``'s pass: O_DIRECT, checksums,
    fdatasync), a whole step of the emulated device over as much state (which sets the drive's
    effective rate and whether the pass adds to its I/O), each state format's pass over ``params``
    parameters on one and two device cores, the host link's copies into shared memory (what
    staging does, with and without the gradients' norms), and how much the loop and the device
    slow each other when both compute (:func:`contention`, ``contention_rounds`` alternations)."""
    import statistics
    import time

    import torch

    from .bench import io as bench_io
    from .bench.report import machine, scratch
    from .staging import SharedMemory

    with scratch(where) as work:
        opts = bench_io.Options(dir=work, json=work / "unused.json", state_bytes=state_mib << 20, repeats=3,
                                update_params=params, peak_params=0, budget="1GiB", skip_peak=True, quick=False,
                                deepspeed=False)
        bw = bench_io._bandwidth(opts, work)
        # The engine's whole step over as much state (the emulated device, fp32 parameters):
        # the store moves less than its bare I/O path does, and the planner predicts steps.
        e2e = bench_io._end_to_end(opts, work, backend="emulated", fp32=True)
        where_text = machine(work)
    rates = bench_io._race_formats(params, cores=2)
    update = {name: row["params_per_second"] for name, row in rates.items()
              if name in bench_io.FORMATS and (formats_to_measure is None or name in formats_to_measure)}
    gains = [row["params_per_second_cores"] / row["params_per_second"] for name, row in rates.items()
             if name in update and "params_per_second_cores" in row]
    loop_slowdown, device_slowdown = contention(rounds=contention_rounds)
    n = 64 << 20  # bytes
    shared = SharedMemory(n)
    shared.unlink()  # mapped: no name needs to outlive this function, even if it is killed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loop stages on its one thread, the device copies on its core
    try:
        host = torch.empty(n // 4).normal_()
        arena = shared.bytes[: n].view(torch.float32)
        times, staged = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            arena.copy_(host)  # gradients in
            host.copy_(arena)  # weights out
            t1 = time.perf_counter()
            # The loop's side: staging also takes the gradient's norm (pipeline.stage).
            arena.copy_(host)
            torch.linalg.vector_norm(host)
            host.copy_(arena)
            times.append(t1 - t0)
            staged.append(time.perf_counter() - t1)
    finally:
        torch.set_num_threads(threads)
        shared.close()
    link = 2 * n / statistics.median(times[1:]) / GB
    staging = 2 * n / statistics.median(staged[1:]) / GB
    median = bw["median_gbps"]
    # The drive as a whole step sees it: the emulated device's step (staging, pass, I/O, commit)
    # less its link and pass gives the time the state's bytes take; whether the pass
    # hid behind them or added to them is whichever of the two models the measured step fits.
    moved = e2e["state_bytes_per_step"]
    step = statistics.median(e2e["step_seconds"])
    pass_s = e2e["params"] / update.get("fp32", math.inf)
    link_s = 2 * e2e["params"] * 4 / (link * GB)  # fp32 parameters: 4 bytes each way
    bare_io = moved / 2 / (median["store_read"] * GB) + moved / 2 / (median["store_write"] * GB)
    serial = abs(bare_io + pass_s + link_s - step) < abs(max(bare_io, pass_s) + link_s - step)
    io_s = max(step - link_s - 0.005 - (pass_s if serial else 0.0), 1e-6)
    effective = moved / io_s / GB
    drive = Drive(read_gbps=effective, write_gbps=effective, capacity_tb=1.0, dwpd=1.0)
    return Profile(drive=drive, update_rate=update, second_core_gain=statistics.median(gains) if gains else 1.0,
                   link_gbps=link, staging_gbps=staging, commit_s=0.005, pass_overlaps_io=not serial,
                   loop_slowdown=loop_slowdown, device_slowdown=device_slowdown,
                   source=(f"calibrated {time.strftime('%Y-%m-%d %H:%M')} on {where_text}; bare store I/O "
                           f"{median['store_read']:.2f} GB/s read, {median['store_write']:.2f} write; a whole "
                           f"step {moved / step / GB:.2f} GB/s"))


def contention(*, width: int = 4096, batch: int = 32, params: int = 1 << 24, seconds: float = 0.5,
               rounds: int = 5) -> tuple[float, float]:
    """(loop_slowdown, device_slowdown): how much slower a training loop's compute and the device's
    pass run while the other computes beside it on this machine's next core.

    The loop: forward and backward of a ``width``-wide linear layer on ``batch`` rows (one torch
    thread on the first core); the device: the fused AdamW kernel over ``params`` fp32 parameters
    (one thread on the second), as the emulated device's fp32 pass runs. Each is timed alone and
    while the other runs without pause in a second thread, alternating, ``rounds`` times; the
    medians of the ratios. (0, 0) on a machine with one core.
    """
    import statistics
    import threading
    import time

    import torch

    from .bench.workload import cores

    loop_core, device_core = cores()
    if loop_core == device_core:
        return 0.0, 0.0
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(width, width)
    x = torch.randn(batch, width, generator=gen)
    p, g = torch.randn(params, generator=gen), torch.randn(params, generator=gen).mul_(1e-3)
    m, v, t = torch.zeros(params), torch.zeros(params), torch.tensor(1.0)

    def loop_once() -> None:
        layer(x).square().mean().backward()
        layer.zero_grad(set_to_none=False)  # the same buffers each time: no page faults in the timing

    def device_once() -> None:
        torch._fused_adamw_([p], [g], [m], [v], [], [t], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01,
                            eps=1e-8, amsgrad=False, maximize=False)

    def timed(work: Any, until: float) -> float:
        """Median seconds of one ``work`` on ``core``, repeated until ``until`` (monotonic)."""
        times = []
        while time.monotonic() < until or len(times) < 3:
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    def pinned(work: Any, core: int, stop: threading.Event) -> None:
        os.sched_setaffinity(0, {core})  # this thread only (Linux)
        torch.set_num_threads(1)  # per thread (OpenMP): else its kernels would spread over both cores
        while not stop.is_set():
            work()

    def measure(work: Any, core: int, other: Any, other_core: int | None) -> float:
        stop = threading.Event()
        helper = threading.Thread(target=pinned, args=(other, other_core, stop), daemon=True) if other_core is not None else None
        old = os.sched_getaffinity(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            os.sched_setaffinity(0, {core})
            if helper is not None:
                helper.start()
                time.sleep(0.05)  # running before the timing starts
            return timed(work, time.monotonic() + seconds)
        finally:
            stop.set()
            if helper is not None:
                helper.join()
            os.sched_setaffinity(0, old)
            torch.set_num_threads(threads)

    loop_once(), device_once()  # first calls: kernels chosen, pages touched
    loop, device = [], []
    for _ in range(rounds):  # alone and beside, alternating: this VM's speed drifts within seconds
        loop.append(measure(loop_once, loop_core, device_once, device_core) / measure(loop_once, loop_core, None, None))
        device.append(measure(device_once, device_core, loop_once, loop_core) / measure(device_once, device_core, None, None))
    return max(0.0, statistics.median(loop) - 1.0), max(0.0, statistics.median(device) - 1.0)


# ---------------------------------------------------------------------------
# Validation against nearstep bench step


def validate(bench_step: dict[str, Any], profile: Profile) -> list[dict[str, Any]]:
    """Predicted against measured step time for each nearstep row of a ``nearstep bench step`` JSON:
    the model's parameters, slices and compute time (its ``none`` row) as inputs, one device core, the
    loop's fp32 gradients and weights over the link."""
    rows = bench_step["variants"]
    if "none" not in rows:
        raise ValueError("the bench step run has no 'none' row (its compute time); run it with the none variant")
    compute = rows["none"]["ms_per_step"] / 1e3
    out = []
    for key, row in rows.items():
        mode, _, fmt = key.partition("@")
        if mode not in MODES:
            continue
        first = row["rounds"][0]
        pl = plan(PlanInputs(params=int(first["params"]), compute_s=compute, profile=profile,
                             state_format=fmt or first.get("state_format", "fp32"), slices=int(first.get("slices", 16)),
                             first_share=first.get("first_share")))
        measured = row["ms_per_step"] / 1e3
        out.append({"row": key, "mode": mode, "state_format": pl.inputs.state_format, "predicted_ms": pl.step_s[mode] * 1e3,
                    "measured_ms": measured * 1e3, "ratio": pl.step_s[mode] / measured, "bound": pl.bound[mode],
                    "within_15_percent": abs(pl.step_s[mode] / measured - 1.0) <= 0.15})
    return out


# ---------------------------------------------------------------------------
# nearstep plan


def _parse(argv: list[str] | None) -> Any:
    import argparse

    parser = argparse.ArgumentParser(prog="nearstep plan", description=__doc__.splitlines()[0].replace("``", ""))
    model = parser.add_argument_group("the model")
    model.add_argument("--params", type=float, help="trainable parameters, e.g. 7e9")
    model.add_argument("--config", help="a Hugging Face config.json to count them from")
    model.add_argument("--store", help="a nearstep store to count them from")
    run = parser.add_argument_group("the run")
    run.add_argument("--compute-ms", type=float, help="forward and backward per step on one rank, ms (measured)")
    run.add_argument("--tokens", type=float, help="tokens per step over all ranks (with --tflops: compute from FLOPs)")
    run.add_argument("--tflops", type=float, help="each accelerator's dense TFLOP/s (bf16)")
    run.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation (default 0.4)")
    run.add_argument("--optimizer", default="adamw", choices=sorted(_HYPERS))
    run.add_argument("--state-format", default="fp32", help="one format or a comma-separated list (default fp32)")
    run.add_argument("--ranks", type=int, default=1)
    run.add_argument("--nodes", type=int, default=1)
    run.add_argument("--device-cores", type=int, default=1)
    run.add_argument("--link-bytes", type=int, default=4, help="bytes per element of gradients and weights (4 fp32, 2 bf16)")
    run.add_argument("--slices", type=int, default=16, help="slices per store (default 16)")
    run.add_argument("--first-share", type=float, help="share of the parameters the forward needs first (its first "
                     "module; default: the embeddings with --config, else one slice)")
    hw = parser.add_argument_group("the machine (default: the calibrated profile)")
    hw.add_argument("--profile", help=f"a profile file (default {default_profile_path()}, if it exists)")
    hw.add_argument("--calibrate", action="store_true", help="measure this machine into the profile, then plan")
    hw.add_argument("--dir", default=".nearstep/calibrate", help="where --calibrate writes its test state")
    hw.add_argument("--drives", type=int, help="drives per node")
    hw.add_argument("--read-gbps", type=float, help="each drive's read bandwidth, GB/s")
    hw.add_argument("--write-gbps", type=float, help="each drive's write bandwidth, GB/s")
    hw.add_argument("--capacity-tb", type=float, help="each drive's capacity, TB (default 3.84)")
    hw.add_argument("--dwpd", type=float, help="each drive's rated drive writes per day (default 1)")
    hw.add_argument("--warranty-years", type=float, help="the rating's years (default 5)")
    hw.add_argument("--update-rate", action="append", default=[], metavar="FORMAT=PARAMS_PER_S",
                    help="the device's per-core rate for a format, e.g. fp32=3e8 (repeatable)")
    hw.add_argument("--link-gbps", type=float, help="host link bandwidth per rank, GB/s")
    hw.add_argument("--staging-gbps", type=float, help="the loop's staging rate (copies and gradient norms), GB/s")
    hw.add_argument("--loop-slowdown", type=float, help="how much slower the loop computes beside the device "
                    "(0 for a device of its own; the emulated device on host cores: measured by --calibrate)")
    hw.add_argument("--device-slowdown", type=float, help="how much slower the device's pass runs beside the loop")
    parser.add_argument("--validate", action="append", default=[], metavar="BENCH_STEP_JSON",
                        help="instead of planning: predicted against measured for a nearstep bench step run (repeatable)")
    parser.add_argument("--json", help="also write the plan as JSON here")
    parser.add_argument("--png", help="also draw where each mode's step time goes into this PNG")
    args = parser.parse_args(argv)
    if args.validate:
        return parser, args
    if sum(x is not None for x in (args.params, args.config, args.store)) != 1:
        parser.error("give the model as exactly one of --params, --config or --store")
    if args.compute_ms is None and (args.tokens is None or args.tflops is None):
        parser.error("give the compute time per step: --compute-ms, or --tokens and --tflops")
    return parser, args


def _profile(parser: Any, args: Any) -> Profile:
    path = pathlib.Path(args.profile) if args.profile else default_profile_path()
    if args.calibrate:
        profile = calibrate(pathlib.Path(args.dir))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(profile.to_json(), indent=2))
        print(f"nearstep plan: calibrated; profile written to {path}", file=sys.stderr)
    else:
        profile = load_profile(args.profile) or Profile(drive=Drive(read_gbps=3.0, write_gbps=2.0))
    drive = dataclasses.replace(profile.drive, **{k: v for k, v in (
        ("read_gbps", args.read_gbps), ("write_gbps", args.write_gbps), ("capacity_tb", args.capacity_tb),
        ("dwpd", args.dwpd), ("warranty_years", args.warranty_years)) if v is not None})
    rates = dict(profile.update_rate)
    for item in args.update_rate:
        name, sep, value = item.partition("=")
        try:
            rates[formats.StateFormat.parse(name).name] = float(value)
        except ValueError as exc:
            parser.error(f"--update-rate {item!r}: {exc if sep else 'give FORMAT=PARAMS_PER_S'}")
    changes: dict[str, Any] = {"drive": drive, "update_rate": rates}
    if args.drives is not None:
        changes["drives_per_node"] = args.drives
    for name in ("link_gbps", "staging_gbps", "loop_slowdown", "device_slowdown"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    try:
        return dataclasses.replace(profile, **changes)
    except ValueError as exc:
        parser.error(f"the machine's rates: {exc}")


def _model_params(args: Any) -> int:
    if args.params is not None:
        return int(args.params)
    if args.config is not None:
        return params_from_config(args.config)
    from .tools import inspect_store

    return int(sum(math.prod(spec.shape) for spec in inspect_store(args.store).manifest.params))


def _days(d: float) -> str:
    return f"{d / 365:.1f} years" if d >= 365 else f"{d:.0f} days"


def _render(plans: list[Plan]) -> str:
    first = plans[0]
    i, p = first.inputs, first.inputs.profile
    out = [f"nearstep plan: {i.params / 1e9:.3g} B params, {i.optimizer}, {i.ranks} rank(s) on {i.nodes} node(s), "
           f"compute {i.compute_s * 1e3:.1f} ms/step per rank, device cores {i.device_cores}",
           f"machine: {p.drives_per_node} drive(s)/node at {p.drive.read_gbps:.2f}/{p.drive.write_gbps:.2f} GB/s "
           f"read/write, {p.drive.capacity_tb:g} TB, {p.drive.dwpd:g} DWPD over {p.drive.warranty_years:g} years; "
           f"link {p.link_gbps:.1f} GB/s; profile: {p.source}", ""]
    out.append(f"  {'format':<16}{'B/param':>8}{'store GB':>10}{'GB/step':>9}{'io ms':>8}{'update ms':>10}"
               f"{'link ms':>8}  " + "".join(f"{m + ' ms':>11}{'bound':>14}" for m in MODES))
    for pl in plans:
        out.append(f"  {pl.inputs.state_format:<16}{pl.bytes_per_param:>8.2f}{pl.store_bytes / GB:>10.2f}"
                   f"{pl.state_bytes_per_step / GB:>9.2f}{pl.io_s * 1e3:>8.1f}{pl.update_s * 1e3:>10.1f}"
                   f"{pl.link_s * 1e3:>8.1f}  " + "".join(f"{pl.step_s[m] * 1e3:>11.1f}{pl.bound[m]:>14}" for m in MODES))
    out += ["", "  drive wear per drive (writes of one generation per step):"]
    for pl in plans:
        out.append(f"  {pl.inputs.state_format:<16}" + "; ".join(
            f"{m}: {pl.drive_write_bytes_per_day[m] / TB:.2f} TB/day = {pl.drive_writes_per_day[m]:.2f} DWPD, "
            f"rating used up in {_days(pl.drive_life_days[m])}" for m in MODES))
    out += ["", "  (per rank; store: two generations; see [Note: the planner's step model] in nearstep/planner.py)"]
    return "\n".join(out)


def _draw(plans: list[Plan], path: str) -> None:
    """One bar per format and mode: the compute, then what the loop waits for beyond it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(pl, m) for pl in plans for m in MODES]
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.4 * len(rows)))
    for y, (pl, m) in enumerate(rows):
        compute = pl.inputs.compute_s * 1e3
        waits = pl.step_s[m] * 1e3 - compute
        ax.barh(y, compute, color="#4c72b0", label="forward + backward" if y == 0 else None)
        ax.barh(y, waits, left=compute, color="#c44e52", label="waiting for the device (link, drives, pass)" if y == 0 else None)
    ax.set_yticks(range(len(rows)), [f"{pl.inputs.state_format} {m} ({pl.bound[m]})" for pl, m in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms per step")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _validate(args: Any, profile: Profile) -> int:
    rows = []
    for path in args.validate:
        doc = json.loads(pathlib.Path(path).read_text())
        for row in validate(doc, profile):
            rows.append({"run": str(path), "model": doc["options"]["model"], **row})
    out = [f"nearstep plan --validate: predicted against measured ms/step; profile: {profile.source}", "",
           f"  {'model':<9}{'row':<24}{'predicted':>11}{'measured':>10}{'ratio':>8}  {'bound':<14}"]
    for r in rows:
        out.append(f"  {r['model']:<9}{r['row']:<24}{r['predicted_ms']:>11.1f}{r['measured_ms']:>10.1f}"
                   f"{r['ratio']:>8.3f}  {r['bound']:<14}{'' if r['within_15_percent'] else 'outside +-15%'}")
    inside = sum(r["within_15_percent"] for r in rows)
    out += ["", f"  {inside} of {len(rows)} within +-15%"]
    print("\n".join(out))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"profile": profile.to_json(), "rows": rows}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, args = _parse(argv)
    profile = _profile(parser, args)
    if args.validate:
        try:
            return _validate(args, profile)
        except (ValueError, KeyError, OSError) as exc:
            parser.error(f"--validate: {exc}")
    params = _model_params(args)
    if args.compute_ms is not None:
        compute = args.compute_ms / 1e3
    else:
        compute = 6.0 * params * args.tokens / (args.ranks * args.tflops * 1e12 * args.mfu)
    first_share = args.first_share
    if first_share is None and args.config is not None:
        first_share = first_share_from_config(args.config)
    try:
        plans = [plan(PlanInputs(params=params, compute_s=compute, profile=profile, optimizer=args.optimizer,
                                 state_format=name.strip(), ranks=args.ranks, nodes=args.nodes,
                                 device_cores=args.device_cores, link_bytes=args.link_bytes, slices=args.slices,
                                 first_share=first_share))
                 for name in args.state_format.split(",") if name.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    print(_render(plans))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps([pl.to_json() for pl in plans], indent=2, default=str))
    if args.png:
        _draw(plans, args.png)
    return 0
