"""``nearstep bench io``: store bandwidth against raw O_DIRECT and DeepSpeed aio, update rate, device peak memory.

Three measurements, one table on stdout, every number in a JSON file:

1. Store bandwidth: one generation of AdamW state read and written the way the engine
   moves a step's state (IOPool, checksums, fdatasync), side by side with a plain
   single-threaded O_DIRECT loop over the same bytes in the same directory and, where
   DeepSpeed is installed, with DeepSpeed's async I/O op (libaio, the one its
   ZeRO-Infinity swapper uses) over the same slice files; then full inline-device
   ``nearstep.AdamW`` steps over that much state.
2. Update rate per core: ``kernels.update_`` against ``torch.optim.AdamW(fused=True)``.
3. Peak memory of the emulated device process during one step, against its budget.

Everything the run writes under ``--dir`` is deleted at the end, also on error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import mmap
import os
import pathlib
import shutil
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

import nearstep
from nearstep import aio, engine, formats, kernels, rules, uring
from nearstep.formats import native
from nearstep.device import DeviceConfig, parse_bytes
from nearstep.store import ParamSpec, Store
from nearstep.uring import IORing
from nearstep.bench.report import machine, read_text, scratch, table_line, verdict

__all__ = ["main"]

TARGET = 0.9  # store/raw and nearstep/torch ratios at or above this PASS
PEER_TARGET = 1.0  # store/DeepSpeed ratios at or above this PASS
# DeepSpeed's aio handle as measured best over the store's slice files on a 2-core VM: 8 MiB
# blocks, 4 threads each keeping 8 in flight. Its defaults (1 MiB, 8, 1 thread) read 15-20%
# slower, so the yardstick is the stronger one.
DS_BLOCK, DS_QUEUE_DEPTH, DS_THREADS = 8 << 20, 8, 4
GB, GiB, MiB = 1e9, 2**30, 2**20  # bandwidth in decimal GB/s, as drives are rated
RAW_BLOCK = 8 << 20
ADAMW_BYTES_PER_PARAM = 12  # fp32 master weights, exp_avg, exp_avg_sq
STORE_BUFFERS = 4  # slice-sized buffers the store passes reuse: the engine's slot count at a 1 GiB budget
UPDATE_ROUNDS = 5
SAMPLE_SECONDS = 0.005
STATUS_FIELDS = ("RssAnon", "VmRSS", "RssShmem", "VmHWM")


@dataclass(frozen=True, kw_only=True, slots=True)
class Options:
    """What to measure, and where.

    Attributes:
        dir: a directory on the file system under test; the run works in a fresh subdirectory of it.
        json: where the results are written.
        state_bytes: bytes of one generation of AdamW state in the bandwidth test.
        repeats: rounds of the bandwidth test, and timed steps of the end-to-end step.
        update_params: parameters of the update-rate test.
        peak_params: parameters of the peak-memory test.
        budget: device memory budget of the peak-memory test, like ``"1GiB"``.
        skip_peak: leave the peak-memory test out.
        quick: tiny sizes, for smoke tests.
        io_backend: the store pass's I/O backend (the engine's ``DeviceConfig.io_backend``). Where it is the
            io_uring ring, the thread pool runs alongside as its own side ("pool"), for comparison.
        io_threads: threads of the thread-pool backend (``DeviceConfig.io_threads``).
        queue_depth: blocks the ring keeps in flight (``DeviceConfig.queue_depth``).
        deepspeed: add DeepSpeed's async I/O to the bandwidth test where it is installed.
        cores: device cores of the per-format rows' second column (1: one column).
        update_rounds: alternating rounds of the update-rate test (its rows are medians of these).
    """

    dir: pathlib.Path
    json: pathlib.Path
    state_bytes: int
    repeats: int
    update_params: int
    peak_params: int
    budget: str
    skip_peak: bool
    quick: bool
    io_backend: str = DeviceConfig().io_backend
    io_threads: int = DeviceConfig().io_threads
    queue_depth: int = DeviceConfig().queue_depth
    deepspeed: bool = True
    cores: int = 2
    update_rounds: int = UPDATE_ROUNDS


def _parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="nearstep bench io", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path(".nearstep/bench-io"),
                        help="scratch directory on the disk to test (default: ./.nearstep/bench-io)")
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("bench-io.json"), help="results file")
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of AdamW state in the bandwidth test")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the bandwidth test")
    parser.add_argument("--update-params", type=int, default=16_000_000)
    parser.add_argument("--peak-params", type=int, default=250_000_000)
    parser.add_argument("--budget", default="1GiB", help="device memory budget of the peak-memory test")
    parser.add_argument("--skip-peak", action="store_true", help="leave out the peak-memory test")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 16 MiB of state, 1M update params, 2M peak params, 1 repeat")
    parser.add_argument("--io-backend", choices=uring.IO_BACKENDS, default=DeviceConfig().io_backend,
                        help="the store pass's I/O backend (default: the device's default, %(default)s)")
    parser.add_argument("--io-threads", type=int, default=DeviceConfig().io_threads,
                        help="threads of the thread-pool backend (default: the device's default, %(default)s)")
    parser.add_argument("--queue-depth", type=int, default=DeviceConfig().queue_depth,
                        help="blocks the io_uring backend keeps in flight (default: %(default)s)")
    parser.add_argument("--cores", type=int, default=min(2, len(os.sched_getaffinity(0))),
                        help="device cores (pass threads) of the per-format rows' second column, beside 1 "
                             "(default: 2 where the machine has them)")
    parser.add_argument("--update-rounds", type=int, default=UPDATE_ROUNDS,
                        help="alternating rounds of the update-rate rows, each a median of them (default: "
                             "%(default)s; this VM's noise between rounds is about +-7%%, so 9 or more for ratios "
                             "near 1)")
    parser.add_argument("--no-deepspeed", dest="deepspeed", action="store_false",
                        help="leave DeepSpeed's async I/O out of the bandwidth test even where it is installed")
    args = parser.parse_args(argv)
    if args.quick:
        args.gib, args.update_params, args.peak_params, args.repeats = 1 / 64, 1_000_000, 2_000_000, 1
    if not args.gib > 0 or args.repeats < 1 or args.update_params < 4 or args.peak_params < 8 or args.io_threads < 1 \
            or args.queue_depth < 1 or args.cores < 1 or args.update_rounds < 1:
        parser.error("--gib must be > 0, --repeats >= 1, --io-threads >= 1, --queue-depth >= 1, --update-params >= 4, "
                     "--peak-params >= 8, --cores >= 1 and --update-rounds >= 1")
    try:
        parse_bytes(args.budget)
    except ValueError as exc:
        parser.error(f"--budget: {exc}")
    return Options(dir=args.dir, json=args.json, state_bytes=int(args.gib * GiB), repeats=args.repeats,
                   update_params=args.update_params, peak_params=args.peak_params, budget=args.budget,
                   skip_peak=args.skip_peak, quick=args.quick, io_backend=args.io_backend,
                   io_threads=args.io_threads, queue_depth=args.queue_depth, deepspeed=args.deepspeed,
                   cores=args.cores, update_rounds=args.update_rounds)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bf16_params(sizes: list[int]) -> list[torch.nn.Parameter]:
    """Flat bf16 parameters with small random gradients: the host side stays a third of the fp32 state."""
    params = [torch.nn.Parameter(torch.empty(n, dtype=torch.bfloat16).uniform_(-1, 1)) for n in sizes]
    for p in params:
        p.grad = torch.empty_like(p).uniform_(-1e-3, 1e-3)
    return params


# ---------------------------------------------------------------------------
# 1. Store bandwidth against raw O_DIRECT


class _RawFile:
    """The yardstick: one thread, one 8 MiB mmap buffer (huge pages), sequential O_DIRECT pwritev/preadv."""

    def __init__(self, path: pathlib.Path, nbytes: int) -> None:
        self.nbytes = nbytes
        self.buffer = mmap.mmap(-1, RAW_BLOCK)  # page-aligned, as O_DIRECT needs
        if hasattr(mmap, "MADV_HUGEPAGE"):  # as the store's buffers: see [Note: what the I/O path costs] in aio
            self.buffer.madvise(mmap.MADV_HUGEPAGE)
        self.buffer.write(os.urandom(RAW_BLOCK))
        self.view = memoryview(self.buffer)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            self.fd, self.direct = os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd, self.direct = os.open(path, flags, 0o644), False  # no O_DIRECT here: buffered, as aio does
        try:
            os.posix_fallocate(self.fd, 0, nbytes)  # as the store preallocates its slice files
            self.write()  # untimed fill: never-written extents read back as zeros without touching the disk
        except BaseException:
            self.close()
            raise

    def _sweep(self, op: Callable[[int, list[memoryview], int], int]) -> None:
        offset = 0
        while offset < self.nbytes:
            done = op(self.fd, [self.view[: min(RAW_BLOCK, self.nbytes - offset)]], offset)
            if done <= 0:
                raise OSError(errno.EIO, f"{op.__name__} moved nothing at offset {offset} of {self.nbytes}")
            offset += done

    def read(self) -> float:
        return _timed(lambda: self._sweep(os.preadv))

    def write(self) -> float:
        # fdatasync inside the timing, as the store's write: see _StorePass.write.
        return _timed(lambda: (self._sweep(os.pwritev), os.fdatasync(self.fd)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.view.release()
        self.buffer.close()


def _synthetic_store(path: pathlib.Path, state_bytes: int) -> Store:
    """A real AdamW store over four fp32 parameters, about ``state_bytes`` per generation."""
    sizes = _split(max(state_bytes // ADAMW_BYTES_PER_PARAM, 4), 4)
    values = torch.randn(max(sizes), generator=torch.Generator().manual_seed(0))
    return Store.create(path, params=[ParamSpec(f"p{i}", (n,), "float32", 0) for i, n in enumerate(sizes)],
                        masters=lambda i: values[: sizes[i]], optimizer="adamw",
                        state_names=rules.state_names(rules.AdamWHyper),
                        hyperparameters=[asdict(rules.AdamWHyper(lr=1e-3))])


class _StorePass:
    """A step's state traffic, moved as the engine moves it (engine.Engine._load_loop and _commit).

    The engine computes an fp32 slice's checksums in the kernel's pass (engine.checked_pass), so its
    reads and writes carry none; every other state format has them computed in the I/O path.
    ``checksum=True`` forces the latter (the side "checked": fp32 state as the store moved it before).
    """

    def __init__(self, store: Store, opts: Options, backend: str, *, checksum: bool | None = None) -> None:
        m = self.manifest = store.manifest
        self.store = store
        self.checksum = not m.format.is_identity if checksum is None else checksum
        self.pool = uring.open_io(backend, threads=opts.io_threads, queue_depth=opts.queue_depth,
                                block_bytes=m.checksum_block)
        self.about = self.pool.describe()
        size = max(m.slice_file_bytes(s.index) for s in m.slices)
        self.buffers = [aio.AlignedBuffer(size) for _ in range(min(STORE_BUFFERS, len(m.slices)))]
        self.files = {(k, g): aio.AlignedFile.open(path) for k, g, path in store.iter_slice_paths()}

    def _view(self, k: int) -> memoryview:
        return self.buffers[k % len(self.buffers)].memoryview(0, self.manifest.slice_file_bytes(k))

    def read(self) -> float:
        """Read and verify every committed slice file, as many in flight as there are buffers."""
        start, in_flight = time.perf_counter(), deque()
        for spec in self.manifest.slices:
            if len(in_flight) == len(self.buffers):
                self._verify(*in_flight.popleft())  # its buffer is the one this slice takes
            gen = self.manifest.committed[spec.index].generation
            future = self.pool.read(self.files[spec.index, gen], self._view(spec.index), 0, checksum=self.checksum)
            in_flight.append((spec.index, gen, future))
        while in_flight:
            self._verify(*in_flight.popleft())
        return time.perf_counter() - start

    def _verify(self, k: int, gen: int, future: Any) -> None:
        result = future.result()
        if self.checksum:
            self.store.check_checksum(k, self.store.slice_path(k, gen), result.crcs or ())

    def write(self) -> float:
        """Write every slice to its other generation with checksums, then fdatasync each file.

        The buffers hold whatever the last read left: only the bytes and the checksum work matter.
        The fdatasync is timed because a step cannot commit before it returns: O_DIRECT skips the
        page cache, not the drive's (or the VM host's) volatile cache nor the extents' metadata.
        """
        start, writes = time.perf_counter(), []
        for spec in self.manifest.slices:
            if len(writes) >= len(self.buffers):
                writes[-len(self.buffers)][2].result()  # the write that last used this slice's buffer
            gen = self.manifest.committed[spec.index].generation ^ 1
            future = self.pool.write(self.files[spec.index, gen], self._view(spec.index), 0, checksum=self.checksum)
            writes.append((spec.index, gen, future))
        for k, gen, future in writes:
            future.result()
            self.files[k, gen].sync()
        return time.perf_counter() - start

    def close(self) -> None:
        self.pool.close()
        for f in self.files.values():
            f.close()
        for buf in self.buffers:
            buf.close()


class _DeepSpeedPass:
    """DeepSpeed's async I/O op over the store's own slice files, moved the way its ZeRO-Infinity
    swapper moves optimizer state: page-locked buffers, a batch of async reads (or writes) as
    large as the buffer count, then ``wait()``. Writes go to each slice's other generation, as
    the store's do, and are followed by fdatasync, as the store's are: without it they would be
    timed into the host's cache.
    """

    def __init__(self, ops: Any, store: Store, block_bytes: int = DS_BLOCK, queue_depth: int = DS_QUEUE_DEPTH,
                 threads: int = DS_THREADS) -> None:
        m = self.manifest = store.manifest
        from nearstep.bench.peers import collapse_to_huge_pages

        self.config = {"block_bytes": block_bytes, "queue_depth": queue_depth, "intra_op_parallelism": threads}
        # (block size, queue depth, single submit, overlap events, intra-op parallelism)
        self.handle = ops.aio_handle(block_bytes, queue_depth, False, True, threads)
        size = max(m.slice_file_bytes(s.index) for s in m.slices)
        example = torch.empty(0, dtype=torch.uint8)
        self.buffers = [self.handle.new_cpu_locked_tensor(size, example)
                        for _ in range(min(STORE_BUFFERS, len(m.slices)))]
        # On huge pages, as the store's buffers are: without, its reads vary 15-40% with how
        # scattered its small pages happen to be (see peers.collapse_to_huge_pages).
        self.huge_pages = all([collapse_to_huge_pages(b) for b in self.buffers])
        self.paths = {(k, g): str(path) for k, g, path in store.iter_slice_paths()}

    def _batches(self) -> list[list[int]]:
        order = [s.index for s in self.manifest.slices]
        return [order[i:i + len(self.buffers)] for i in range(0, len(order), len(self.buffers))]

    def _run(self, submit: Callable[..., int], flip: int) -> list[str]:
        touched = []
        for batch in self._batches():
            for buffer, k in zip(self.buffers, batch):
                path = self.paths[k, self.manifest.committed[k].generation ^ flip]
                if submit(buffer[: self.manifest.slice_file_bytes(k)], path, 0) != 0:
                    raise OSError(errno.EIO, f"DeepSpeed's aio handle refused a request on {path}")
                touched.append(path)
            done = self.handle.wait()
            if done != len(batch):
                raise OSError(errno.EIO, f"DeepSpeed's aio handle completed {done} of {len(batch)} requests")
        return touched

    def read(self) -> float:
        start = time.perf_counter()
        self._run(self.handle.async_pread, flip=0)
        return time.perf_counter() - start

    def write(self) -> float:
        start = time.perf_counter()
        for path in self._run(self.handle.async_pwrite, flip=1):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        return time.perf_counter() - start

    def close(self) -> None:
        for buffer in self.buffers:
            self.handle.free_cpu_locked_tensor(buffer)
        self.buffers = []


def _deepspeed_aio() -> tuple[Any, str]:
    """(DeepSpeed's compiled async I/O op, deepspeed's version), or (None, why not)."""
    from nearstep.bench.peers import deepspeed_status, load_deepspeed_aio

    status = deepspeed_status()
    if not status.usable:
        return None, status.why
    _progress("loading DeepSpeed's async I/O op (it compiles on first use: minutes)")
    return load_deepspeed_aio(), status.version or "?"


def _bandwidth(opts: Options, work: pathlib.Path) -> dict[str, Any]:
    store = _synthetic_store(work / "store", opts.state_bytes)
    ops, ds_version = _deepspeed_aio() if opts.deepspeed else (None, "left out (--no-deepspeed)")
    sides: dict[str, Any] = {}
    try:
        sides["store"] = _StorePass(store, opts, opts.io_backend)
        if isinstance(sides["store"].pool, IORing):
            sides["pool"] = _StorePass(store, opts, "threads")
        sides["checked"] = _StorePass(store, opts, opts.io_backend, checksum=True)
        nbytes = store.manifest.state_bytes  # the raw loop moves exactly the store's bytes
        sides["raw"] = _RawFile(work / "raw.bin", nbytes)
        if ops is not None:
            sides["deepspeed"] = _DeepSpeedPass(ops, store)
        # Untimed warm-up of every side: the first touches of fresh buffers fault pages in and the
        # first write into fallocated extents converts them; either would weigh on one side's round 1.
        for side in sides.values():
            side.read(), side.write()
        names = sorted(sides, key=("raw", "store", "pool", "checked", "deepspeed").index)
        times: dict[str, list[float]] = {f"{name}_{op}": [] for name in names for op in ("read", "write")}
        for r in range(opts.repeats):
            _progress(f"bandwidth round {r + 1}/{opts.repeats}")
            # Alternate A B C A B C: a VM disk drifts 2-5x between runs (host cache, neighbours); rounds
            # side by side see the same drift, so the ratio holds where the absolute numbers do not.
            # The order rotates each round: the side that reads right after another's writes and
            # fdatasyncs was measured to pay for them.
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[f"{name}_read"].append(sides[name].read())
                times[f"{name}_write"].append(sides[name].write())
        direct = sides["raw"].direct and all(f.direct for f in sides["store"].files.values())
        about = {name: sides[name].about for name in ("store", "pool") if name in sides}
        ds = sides.get("deepspeed")
        ds_config = None if ds is None else ds.config | {"huge_pages": ds.huge_pages}
    finally:
        for thing in (*sides.values(), store):
            thing.close()
        shutil.rmtree(work / "store", ignore_errors=True)
        (work / "raw.bin").unlink(missing_ok=True)
    median = {k: nbytes / statistics.median(v) / GB for k, v in times.items()}
    ratios = {op: median[f"store_{op}"] / median[f"raw_{op}"] for op in ("read", "write")}
    out = {"bytes": nbytes, "slices": len(store.manifest.slices), "direct_io": direct, "seconds": times,
           "io_backend": about["store"], "pool_io": about.get("pool"), "io_threads": opts.io_threads,
           "queue_depth": opts.queue_depth, "crc32": aio.CRC32_IMPLEMENTATION,
           "rounds_gbps": [{k: nbytes / v[r] / GB for k, v in times.items()} for r in range(opts.repeats)],
           "median_gbps": median, "target": TARGET, "read_ratio": ratios["read"], "write_ratio": ratios["write"],
           "read_pass": ratios["read"] >= TARGET, "write_pass": ratios["write"] >= TARGET,
           "deepspeed": {"available": ds_config is not None, "about": ds_version, "aio": ds_config}}
    if ds_config is not None:
        for op in ("read", "write"):
            ratio = median[f"store_{op}"] / median[f"deepspeed_{op}"]
            out["deepspeed"] |= {f"{op}_ratio": ratio, f"{op}_pass": ratio >= PEER_TARGET}
        out["deepspeed"]["target"] = PEER_TARGET
    return out


def _end_to_end(opts: Options, work: pathlib.Path, backend: str = "inline", fp32: bool = False) -> dict[str, Any]:
    """Full AdamW steps over as many parameters as the bandwidth test's state holds (on the inline
    device, or on ``backend``; bf16 parameters, or fp32 ones, as most models train on the CPU)."""
    sizes = _split(max(opts.state_bytes // ADAMW_BYTES_PER_PARAM, 4), 4)
    device = DeviceConfig(backend=backend, io_backend=opts.io_backend, io_threads=opts.io_threads,
                          queue_depth=opts.queue_depth)
    params = _bf16_params(sizes)
    if fp32:
        params = [torch.nn.Parameter(p.detach().float()) for p in params]
        for p in params:
            p.grad = torch.empty_like(p).uniform_(-1e-3, 1e-3)
    opt = nearstep.AdamW(params, lr=1e-3, store=work / "e2e", device=device)
    try:
        opt.step()  # warm-up: first touches of slots and staging, first writes into generation 1
        before = opt.stats()
        times = [_timed(opt.step) for _ in range(opts.repeats)]
        after = opt.stats()
    finally:
        opt.close()
        shutil.rmtree(work / "e2e", ignore_errors=True)
    # Every byte and time counter the optimizer reports, per timed step (whichever this version has).
    per_step = {k: (v - before[k]) / opts.repeats for k, v in after.items() if k.endswith(("_bytes", "_seconds"))
                and isinstance(v, (int, float)) and isinstance(before.get(k), (int, float))}
    moved = per_step["device_store_read_bytes"] + per_step["device_store_write_bytes"]
    step = statistics.median(times)
    return {"params": sum(sizes), "step_seconds": times, "per_step": per_step, "params_per_second": sum(sizes) / step,
            "state_bytes_per_step": moved, "state_gbps": moved / step / GB}


# ---------------------------------------------------------------------------
# 2. Update rate per core


def _update_rate(opts: Options) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: the emulated device runs its kernels on one pinned core
    try:
        return _race_update(opts.update_params, opts.update_rounds) | {
            "formats": _race_formats(opts.update_params, opts.cores, opts.update_rounds),
            "codecs": native.status(), "cores": opts.cores, "rounds": opts.update_rounds}
    finally:
        torch.set_num_threads(threads)


FORMATS = ("fp32", "bf16-kahan", "bf16-sr", "8bit", "bf16-kahan+8bit", "bf16-sr+8bit", "16bit", "bf16-sr+16bit",
           "fp8", "bf16-sr+fp8")
UNCHECKED = "fp32, no checksums"  # the fp32 row without the checksums of its pass: what they cost
UNFUSED = -1  # a run's thread count for one thread without the fused Adam pass (native.unfused)
TORCH_CODECS = "bf16-sr+8bit, torch codecs"  # the compressed row with formats.native off: what the native pass gives


def _race_formats(n: int, cores: int = 1, rounds: int = UPDATE_ROUNDS) -> dict[str, Any]:
    """Per state format: bytes per parameter per step, and the device's update rate: the engine's pass
    (engine.checked_pass) over a state file image, each chunk checksummed, decoded, updated by the fused
    AdamW kernel, encoded and checksummed again (fp32: the kernel on the image itself), on 1 thread and,
    with ``cores`` > 1, on that many (engine.PassThreads), alternating formats and thread counts."""
    names = ("master",) + rules.state_names(rules.AdamWHyper)
    hyper, guards = rules.AdamWHyper(lr=1e-3), rules.Guards(skip_nonfinite=False)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(n, generator=gen).mul_(1e-3)
    counts = (1,) if cores <= 1 else (1, cores)
    pools = {count: engine.PassThreads(count) if count > 1 else None for count in counts}
    spaces = [formats.Workspace() for _ in range(max(counts))]
    cases = {}
    rows = (*FORMATS, UNCHECKED, TORCH_CODECS)
    for name in rows:
        fmt = formats.StateFormat.parse(name.split(",")[0])
        image = torch.zeros(fmt.file_bytes(names, n), dtype=torch.uint8)
        coded = formats.views(fmt, image, names, n)
        specs = fmt.regions(names, n)
        block = fmt.block if fmt.block_aligned else 1
        spans = [(r.offset, r.end, r.dtype.itemsize, block if formats.per_block(r.name) else 1) for r in specs]
        # The engine works on an fp32 part in the file image itself (SliceImage.work).
        plain = {r.name: image[r.offset:r.end].view(torch.float32) for r in specs if r.dtype == torch.float32
                 and r.name in names}
        work = {k: plain[k] if k in plain else torch.zeros(n) for k in names}
        work["master"].copy_(torch.randn(n, generator=gen))
        formats.encode_(fmt, work, names, coded, seed=0)
        with native.disabled() if name == TORCH_CODECS else contextlib.nullcontext():
            coder = formats.SliceCoder(fmt, coded, names, [work[k] for k in names], n)
        cases[name] = (fmt, coder, work, [0], memoryview(image.numpy()), spans, block)

    def one(name: str, count: int) -> None:
        """One pass; ``count`` 0: one thread with the codecs left out (the kernel on whatever the
        working copy holds, the checksums of the format's bytes), the most a faster codec could give."""
        fmt, coder, work, step, image, spans, block = cases[name]
        codecs = count != 0
        step[0] += 1
        lanes = native.adam_lanes() if count > 0 and coder.adam is not None else 0
        fuse = engine.fusable([step[0]], guards, [(hyper, [0], [grad])]) if lanes else {}

        def update(pieces: list[tuple[int, int, int]], at: int, worker: int) -> None:
            # As the engine does ([Note: one pass per chunk]): a compressed chunk goes through the
            # fused Adam pass where it may (count >= 1 and native.adam_lanes()), else is decoded to
            # the start of the working state (this share's part of it), updated there and encoded back.
            if fuse:
                pieces = engine.fused_pass(coder, fuse, lanes, [(0, n)], pieces, step[0], adam_work[worker], [])
            cut = []
            for _j, lo, hi in pieces:
                a, b = (lo, hi) if fmt.is_identity else coder.span(lo, hi)
                cut.append((a, b, lo if fmt.is_identity else at))
                at += b - a
            if not fmt.is_identity and codecs:
                for a, b, where in cut:
                    coder.decode(a, b, where, spaces[worker])

            def part(k: str, a: int, b: int, w: int) -> torch.Tensor:
                return work[k][w : w + b - a] if coder.packed[k] else work[k][a:b]

            kernels.update_(hyper, [part("master", *c) for c in cut], {k: [part(k, *c) for c in cut] for k in names[1:]},
                            [grad[a:b] for a, b, _w in cut], [step[0]] * len(cut), guards)
            if not fmt.is_identity and codecs:
                for a, b, where in cut:
                    coder.encode_(a, b, step[0], where, spaces[worker])

        if name == UNCHECKED:
            update([(0, 0, n)], 0, 0)
            return
        engine.checked_pass(image, aio.DEFAULT_BLOCK_BYTES, spans, n, [0], [(0, n)], engine.PASS_CHUNK, update,
                            align=block, threads=pools[max(count, 1)])

    adam_work = [torch.empty(3 * native.ADAM_TILE) for _ in range(max(counts))]
    fused = [name for name in FORMATS if cases[name][1].adam is not None and native.adam_lanes()]
    runs = [(name, count) for name in rows for count in counts if not (name == UNCHECKED and count > 1)]
    runs += [(name, 0) for name in FORMATS if not cases[name][0].is_identity]
    runs += [(name, UNFUSED) for name in fused]  # the codecs and torch's kernel one after the other
    for name, count in runs:
        one(name, count)  # warm-up
    times: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    try:
        for _ in range(rounds):
            for name, count in runs:  # alternating, as everywhere
                times[(name, count)].append(_timed(lambda: one(name, count)))
    finally:
        for pool in pools.values():
            if pool is not None:
                pool.close()
    out: dict[str, Any] = {}
    for name in rows:
        fmt = cases[name][0]
        out[name] = {"bytes_per_param_per_step": 2 * fmt.file_bytes(names, n) / n,
                     "params_per_second": n / statistics.median(times[(name, 1)]), "seconds": times[(name, 1)]}
        if (name, 0) in times:
            out[name]["params_per_second_codec_free"] = n / statistics.median(times[(name, 0)])
        if (name, UNFUSED) in times:
            out[name]["params_per_second_unfused"] = n / statistics.median(times[(name, UNFUSED)])
        if cores > 1 and (name, cores) in times:
            out[name]["cores"] = cores
            out[name]["params_per_second_cores"] = n / statistics.median(times[(name, cores)])
            out[name]["seconds_cores"] = times[(name, cores)]
    return out


def _race_update(n: int, rounds: int = UPDATE_ROUNDS) -> dict[str, Any]:
    sizes = _split(n, 4)
    gen = torch.Generator().manual_seed(0)
    master, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen).mul_(1e-3)
    masters, grads = kernels.flat_views(master, sizes), kernels.flat_views(grad, sizes)
    states = {name: kernels.flat_views(torch.zeros(n), sizes) for name in ("exp_avg", "exp_avg_sq")}
    hyper, guards = rules.AdamWHyper(lr=1e-3), rules.Guards(skip_nonfinite=False)
    params = [torch.nn.Parameter(m.clone()) for m in masters]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    reference = torch.optim.AdamW(params, lr=1e-3, fused=True)  # the same defaults as AdamWHyper
    step = [0]

    def ours() -> None:
        step[0] += 1
        kernels.update_(hyper, masters, states, grads, [step[0]] * len(sizes), guards)

    ours(), reference.step()  # warm-up: torch.optim allocates its moments in its first step
    times: dict[str, list[float]] = {"nearstep": [], "torch": []}
    for _ in range(rounds):  # alternating, for the same reason as the bandwidth rounds
        times["nearstep"].append(_timed(ours))
        times["torch"].append(_timed(reference.step))
    rates = {k: n / statistics.median(v) for k, v in times.items()}
    ratio = rates["nearstep"] / rates["torch"]
    return {"params": n, "segments": len(sizes), "threads": 1, "seconds": times,
            "nearstep_params_per_second": rates["nearstep"], "torch_params_per_second": rates["torch"],
            "target": TARGET, "ratio": ratio, "pass": ratio >= TARGET}


# ---------------------------------------------------------------------------
# 3. Device peak memory


def _status(pid: int) -> dict[str, int]:
    """RssAnon, VmRSS, RssShmem and VmHWM from /proc/<pid>/status, in bytes."""
    fields = (line.split() for line in read_text(f"/proc/{pid}/status").splitlines())
    return {f[0][:-1]: int(f[1]) * 1024 for f in fields if f and f[0][:-1] in STATUS_FIELDS}


def _smaps(pid: int) -> dict[str, int]:
    """Resident bytes by kind, from /proc/<pid>/smaps.

    [Note: shared anonymous memory] ``AlignedBuffer`` maps its memory MAP_PRIVATE, so the
    device's slots count in RssAnon. A shared anonymous mapping ("/dev/zero (deleted)") would
    count in RssShmem instead; it is added to private memory so that no such regression can
    hide a slot from the budget check. The staging file (/dev/shm/nearstep-*) is told apart
    by its name: it is host-link memory, not the device's.
    """
    out, name = {"anon": 0, "shared_anon": 0, "staging": 0}, ""
    for line in read_text(f"/proc/{pid}/smaps").splitlines():
        head = line.split(None, 5)
        if head and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else ""
        elif head and head[0] == "Anonymous:":
            out["anon"] += int(head[1]) * 1024
        elif head and head[0] == "Rss:":
            kind = "shared_anon" if name.startswith("/dev/zero") else "staging" if "/nearstep-" in name else None
            if kind:
                out[kind] += int(head[1]) * 1024
    return out | {"private": out["anon"] + out["shared_anon"]}


def _run_sampled(pid: int, fn: Callable[[], object]) -> tuple[float, dict[str, int], int]:
    """Time ``fn()`` while a thread keeps the peaks of process ``pid``'s memory; returns (seconds, peaks, samples).

    /proc status is read every 5 ms, smaps every 50 ms: it walks every mapping (about 2 ms with
    torch loaded), and what it adds are the slots, which live until the device closes.
    """
    peaks = dict.fromkeys((*STATUS_FIELDS, "anon", "shared_anon", "staging", "private"), 0)
    samples, stop = [0], threading.Event()

    def sample(smaps: bool) -> None:
        for key, value in (_status(pid) | (_smaps(pid) if smaps else {})).items():
            peaks[key] = max(peaks[key], value)
        samples[0] += 1

    def loop() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            sample(smaps=samples[0] % 10 == 0)

    sample(smaps=True)
    thread = threading.Thread(target=loop, name="nearstep-bench-sampler", daemon=True)
    thread.start()
    try:
        seconds = _timed(fn)
    finally:
        stop.set()
        thread.join()
    sample(smaps=True)
    return seconds, peaks, samples[0]


def _peak_memory(opts: Options, work: pathlib.Path) -> dict[str, Any]:
    budget, sizes = parse_bytes(opts.budget), _split(opts.peak_params, 8)
    opt = nearstep.AdamW(_bf16_params(sizes), lr=1e-3, store=work / "peak",
                         device=nearstep.DeviceConfig(memory_budget=opts.budget))
    try:
        pid = opt.device.info.pid
        # The process baseline (interpreter, torch, engine threads), taken before any slot exists.
        baseline, baseline_private = _status(pid).get("RssAnon", 0), _smaps(pid)["private"]
        step_seconds, peak, samples = _run_sampled(pid, opt.step)
        stats, state_bytes = opt.stats(), opt.device.manifest().state_bytes
    finally:
        opt.close()
        shutil.rmtree(work / "peak", ignore_errors=True)
    slots = int(stats["device_peak_slots"]) * int(stats["device_slot_bytes"])
    return {"params": sum(sizes), "state_bytes": state_bytes, "budget_bytes": budget, "step_seconds": step_seconds,
            "samples": samples, "baseline_rss_anon": baseline, "baseline_private": baseline_private,
            "peak_rss_anon": peak["RssAnon"], "peak_vm_rss": peak["VmRSS"], "peak_rss_shmem": peak["RssShmem"],
            "vm_hwm": peak["VmHWM"], "peak_shared_anon": peak["shared_anon"], "peak_staging": peak["staging"],
            "peak_private": peak["private"], "peak_slots": int(stats["device_peak_slots"]),
            "slot_bytes": int(stats["device_slot_bytes"]), "peak_slot_memory": slots,
            "slot_ratio": slots / budget, "slot_pass": slots <= budget,
            "rss_anon_ratio": peak["RssAnon"] / (budget + baseline),
            "rss_anon_pass": peak["RssAnon"] <= budget + baseline,
            "private_ratio": peak["private"] / (budget + baseline_private),
            "private_over_bytes": peak["private"] - budget - baseline_private,
            "private_pass": peak["private"] <= budget + baseline_private}


# ---------------------------------------------------------------------------
# The table and the run


def _mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


def _signed_mib(over: float) -> str:
    return f"{abs(over) / MiB:,.1f} MiB {'over' if over > 0 else 'to spare'}"


def _render(res: dict[str, Any]) -> str:
    bw, e2e, up, pk = res["bandwidth"], res["end_to_end"], res["update"], res.get("peak")
    cols, target = tuple(bw["median_gbps"]), f"target >= {TARGET}"
    ds = bw["deepspeed"]
    peer = (f"DeepSpeed {ds['about']} async I/O: {ds['aio']['block_bytes'] // MiB} MiB blocks, queue depth "
            f"{ds['aio']['queue_depth']}, {ds['aio']['intra_op_parallelism']} thread(s), page-locked buffers"
            f"{' on huge pages' if ds['aio']['huge_pages'] else ''}"
            if ds["available"] else f"DeepSpeed async I/O: not run: {ds['about']}")
    out = ["nearstep bench io", f"machine: {res['machine']}, {res['date']}", "",
           f"1. store bandwidth vs raw O_DIRECT{' and DeepSpeed' if ds['available'] else ''}, GB/s (1e9 B/s): "
           f"{bw['bytes'] / GiB:.2f} GiB of AdamW state, {bw['slices']} slice file(s)"
           f"{'' if bw['direct_io'] else ', BUFFERED: no O_DIRECT on this file system'}",
           f"  store: {bw['io_backend']}, the {bw['crc32']} CRC-32s of fp32 state in the kernel's pass (row 2)"
           f"{'; pool: the store pass on a ' + bw['pool_io'] if bw.get('pool_io') else ''}"
           f"; checked: the store pass with CRC-32s in the I/O path; {peer}",
           f"  {'round':<10}" + "".join(f"{c.replace('deepspeed', 'ds').replace('_', ' '):>14}" for c in cols)]
    rows = [(str(i + 1), r) for i, r in enumerate(bw["rounds_gbps"])] + [("median", bw["median_gbps"])]
    out += [f"  {name:<10}" + "".join(f"{r[c]:>14.3f}" for c in cols) for name, r in rows]
    out += [table_line("store/raw read", f"{bw['read_ratio']:.3f}", verdict(bw["read_pass"], target)),
            table_line("store/raw write", f"{bw['write_ratio']:.3f}", verdict(bw["write_pass"], target))]
    if ds["available"]:
        out += [table_line(f"store/DeepSpeed {op}", f"{ds[f'{op}_ratio']:.3f}",
                           verdict(ds[f"{op}_pass"], f"target >= {PEER_TARGET}; same files, writes with fdatasync"))
                for op in ("read", "write")]
    if "pool_read" in bw["median_gbps"]:
        out += [table_line(f"store/pool {op}", f"{bw['median_gbps'][f'store_{op}'] / bw['median_gbps'][f'pool_{op}']:.3f}",
                           "the ring against the thread pool, for information") for op in ("read", "write")]
    if ds["available"]:
        out += [table_line(f"checked/DeepSpeed {op}",
                           f"{bw['median_gbps'][f'checked_{op}'] / bw['median_gbps'][f'deepspeed_{op}']:.3f}",
                           "CRC-32s in the I/O path, as other formats have them; for information")
                for op in ("read", "write")]
    out += [table_line("end-to-end inline AdamW step", f"{e2e['params_per_second'] / 1e6:.1f} M params/s",
                       f"{e2e['params'] / 1e6:.1f} M params, {statistics.median(e2e['step_seconds']):.3f} s/step, "
                       f"{e2e['state_gbps']:.3f} GB/s of state read + written"),
            "", f"2. update rate per core: 1 thread, {up['params'] / 1e6:.1f} M fp32 params in {up['segments']} "
            f"segments, median of {up.get('rounds', UPDATE_ROUNDS)}",
            table_line("nearstep kernels.update_", f"{up['nearstep_params_per_second'] / 1e6:.1f} M params/s"),
            table_line("torch.optim.AdamW(fused=True)", f"{up['torch_params_per_second'] / 1e6:.1f} M params/s"),
            table_line("nearstep/torch", f"{up['ratio']:.3f}", verdict(up["pass"], target)), "",
            f"  per state format (the device's pass: each chunk checksummed, decoded, updated, encoded, checksummed; "
            f"codecs: {up['codecs']};",
            "  fp32: the kernel on the image itself; the I/O side from the 'store' bandwidth above, checksums being in the pass):",
            "  codec-free: the same pass with decode and encode left out, the most a faster codec could give;",
            "  unfused: the codecs and torch's kernel one after the other per chunk, without the fused Adam pass;",
            f"  {'format':<28}{'B/param/step':>13}{'M params/s':>12}{'vs fp32':>9}{'codec-free':>11}{'unfused':>9}"
            f"{'I/O-bound M params/s':>22}"
            + (f"{str(up['cores']) + ' cores':>10}{'vs fp32':>9}{'scaling':>9}" if up.get("cores", 1) > 1 else "")]
    def io_gbps(side: str) -> float:  # reads and writes of equal size, one after the other
        return 2 / (1 / bw["median_gbps"][f"{side}_read"] + 1 / bw["median_gbps"][f"{side}_write"])

    fp32_rate = up["formats"]["fp32"]["params_per_second"]
    for name, f in up["formats"].items():
        line = (f"  {name:<28}{f['bytes_per_param_per_step']:>13.3f}{f['params_per_second'] / 1e6:>12.1f}"
                f"{f['params_per_second'] / fp32_rate:>9.2f}"
                + (f"{f['params_per_second_codec_free'] / fp32_rate:>11.2f}" if "params_per_second_codec_free" in f
                   else f"{'':>11}")
                + (f"{f['params_per_second_unfused'] / fp32_rate:>9.2f}" if "params_per_second_unfused" in f
                   else f"{'':>9}")
                + f"{io_gbps('store') * 1e9 / f['bytes_per_param_per_step'] / 1e6:>22.1f}")
        if "params_per_second_cores" in f:
            line += (f"{f['params_per_second_cores'] / 1e6:>10.1f}"
                     f"{f['params_per_second_cores'] / up['formats']['fp32']['params_per_second_cores']:>9.2f}"
                     f"{f['params_per_second_cores'] / f['params_per_second']:>8.2f}x")
        out.append(line)
    out.append("")
    if pk is None:
        return "\n".join(out + ["3. device peak memory: skipped (--skip-peak)"])
    out += [f"3. device peak memory: emulated device, {pk['params'] / 1e6:.1f} M bf16 params, one step of "
            f"{pk['step_seconds']:.2f} s, /proc read every {SAMPLE_SECONDS * 1e3:.0f} ms (achieved: {pk['samples']} "
            f"samples, one per {pk['step_seconds'] / max(pk['samples'], 1) * 1e3:.1f} ms)",
            table_line("state size (one generation)", f"{pk['state_bytes'] / GiB:.2f} GiB"),
            table_line("budget", _mib(pk["budget_bytes"])),
            table_line("baseline RssAnon", _mib(pk["baseline_rss_anon"]), "device process before the step"),
            table_line("peak slot memory", _mib(pk["peak_slot_memory"]), verdict(
                pk["slot_pass"], f"<= budget; {pk['peak_slots']} slot(s) x {_mib(pk['slot_bytes'])}")),
            table_line("peak RssAnon", _mib(pk["peak_rss_anon"]), verdict(
                pk["rss_anon_pass"], "<= budget + baseline")),
            table_line("peak private memory", _mib(pk["peak_private"]), verdict(
                pk["private_pass"],
                f"<= budget + {_mib(pk['baseline_private'])}, {_signed_mib(pk['private_over_bytes'])}; "
                f"RssAnon + {_mib(pk['peak_shared_anon'])} of shared anonymous memory")),
            table_line("peak VmRSS", _mib(pk["peak_vm_rss"]), f"VmHWM {_mib(pk['vm_hwm'])}"),
            table_line("peak RssShmem", _mib(pk["peak_rss_shmem"]), "shared memory: the staging below"),
            table_line("  of which staging", _mib(pk["peak_staging"]),
                  "model-sized host-link staging (grads in, weights out): not device memory")]
    return "\n".join(out)


def _progress(what: str) -> None:
    print(f"nearstep bench io: {what}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements, print the table, write the JSON; returns 0 (PASS/MISS are reported)."""
    opts = _parse(argv)
    options = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in asdict(opts).items()}
    res: dict[str, Any] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "options": options}
    with scratch(opts.dir) as work:
        res["machine"] = machine(opts.dir)
        _progress("store bandwidth")
        res["bandwidth"] = _bandwidth(opts, work)
        _progress("end-to-end inline step")
        res["end_to_end"] = _end_to_end(opts, work)
        _progress("update rate")
        res["update"] = _update_rate(opts)
        if not opts.skip_peak:
            _progress("device peak memory")
            res["peak"] = _peak_memory(opts, work)
    print(_render(res))
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0
