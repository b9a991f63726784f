"""The device's program: what runs next to the store, in whichever process owns it.

The engine executes the requests a host queues on a device (see ``device.py``):
it reads each slice's state from the store into a slot of device memory, applies
the optimizer kernel with the staged gradients, posts the new weights back to
the host's staging memory, writes the new state to the slice's other
generation, and commits a step once every slice of it is durable. Both the
emulated backend (a separate process) and the inline backend (the caller's
process) run this same code.

[Note: the slot pipeline]
Device memory is a fixed number of slots, each big enough for one slice's state
plus an fp32 gradient scratch area; the count comes from the memory budget, not
from the model size. A loader thread reads slices into free slots in the order
the host announced (``Prefetch``) or, failing that, in the order of ``Apply``
requests; an applied slot is written back asynchronously and returns to the
free list when that write finishes. Reads of slice k+1, the kernel of slice k
and the write of slice k-1 thus run at the same time. Loads follow the apply
order, so a slot a pending apply needs is always freed by an earlier apply:
the pipeline cannot deadlock as long as the host prefetches in apply order.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from . import aio, formats, kernels, rules, uring
from .errors import StoreCorruptError
from .protocol import (Abort, Apply, Commit, Lane, LoadState, MapMemory, Prefetch, Query, QueryKind, Request, Stage,
                       StepState, TraceEvent)
from .slicefiles import SliceFiles
from .image import slot_count
from .staging import SharedMemory, StagingLayout
from .store import PARAM_STATS, Manifest, SliceState, Store, rounding_seed

__all__ = [
    "EngineConfig",
    "Engine",
    "checked_pass",
    "PassThreads",
    "PASS_CHUNK",
    "fusable",
    "fused_pass",
]

_IO_NICE = 10
_MAX_TRACE_EVENTS = 50_000  # the latest kept: a bound on memory between two collections


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineConfig:
    """How the engine uses its memory and the disk.

    Attributes:
        memory_budget: bytes of device memory for slots (state + gradient scratch).
        io_backend: ``"auto"``, ``"ring"`` or ``"threads"``: see :func:`nearstep.uring.open_io`.
        io_threads: threads of the thread-pool backend.
        queue_depth: blocks the io_uring backend keeps in flight.
        threads: threads each slice's pass runs on (a device with that many cores; see
            [Note: a pass on several cores]).
    """

    memory_budget: int
    io_backend: str = "auto"
    io_threads: int = 4
    queue_depth: int = uring.DEFAULT_QUEUE_DEPTH
    threads: int = 1


# ---------------------------------------------------------------------------
# The engine


def _reads_grads_only(hyper: rules.Hyper, guards: rules.Guards) -> bool:
    """Whether the kernel leaves the gradients as it found them (no guard uses them as scratch)."""
    unguarded = guards.spike_clip is None and guards.update_clip is None and not guards.telemetry
    return unguarded and isinstance(hyper, (rules.AdamWHyper, rules.AdamHyper, rules.SGDHyper))


class _Slot:
    __slots__ = ("buffer",)

    def __init__(self, nbytes: int) -> None:
        self.buffer = aio.AlignedBuffer(nbytes)


class _Ticket:
    """A slice being loaded into a slot; ``ready`` is set once ``future`` exists."""

    __slots__ = ("slot", "future", "ready")

    def __init__(self, slot: _Slot) -> None:
        self.slot = slot
        self.future: Future[aio.IOResult] | None = None
        self.ready = threading.Event()


# Elements per region in one chunk of the kernel's pass: 1 MiB of fp32 per region, so
# that a chunk's state and gradient stay in cache from checksum to kernel to checksum.
PASS_CHUNK = 1 << 18


class _PassCrcs:
    """Per-block CRC-32s of a slice's file image, computed during the kernel's pass over it.

    Blocks lying inside one of ``spans`` (the regions' data) are fed a chunk at a
    time, in file order, while the chunk is in cache (:meth:`feed`); the few
    others, which straddle a region's end, its page padding or the next region,
    are computed whole by :meth:`edges`. With no spans every block is an edge.
    """

    def __init__(self, block: int, nbytes: int, spans: list[tuple[int, int]], straddling: Sequence[int] = ()) -> None:
        self.block, self.nbytes = block, nbytes
        count = -(-nbytes // block)
        self.crcs = [0] * count
        shared = {at // block for at in straddling if at % block}  # blocks split between two threads
        self.next = {b: b * block for b in range(count) if b not in shared
                     and any(lo <= b * block and min(nbytes, (b + 1) * block) <= hi for lo, hi in spans)}
        self.edge_blocks = [b for b in range(count) if b not in self.next]

    def edges(self, image: memoryview) -> None:
        for b in self.edge_blocks:
            self.crcs[b] = aio.crc32(image[b * self.block : min(self.nbytes, (b + 1) * self.block)])

    def feed(self, image: memoryview, start: int, stop: int) -> None:
        """Continue the CRCs of the blocks holding bytes [start, stop) of ``image`` (edges skipped)."""
        while start < stop:
            b = start // self.block
            end = min(stop, (b + 1) * self.block)
            if b in self.next:
                if self.next[b] != start:
                    raise AssertionError(f"block {b} fed at {start}, expected {self.next[b]}")
                self.crcs[b] = aio.crc32(image[start:end], self.crcs[b])
                self.next[b] = end
            start = end

    def result(self) -> list[int]:
        for b, at in self.next.items():
            if at != min(self.nbytes, (b + 1) * self.block):
                raise AssertionError(f"block {b} was fed only up to {at}")
        return self.crcs


def _merge_reports(pieces: list[tuple[int, int, rules.SegmentReport]], reports: list[rules.SegmentReport]) -> None:
    """A segment's report from its pieces' (segment, offset, report): the first piece's, with the
    spike-clipped counts of all (only elementwise guards run in pieces, so the counts add up)."""
    for j, o, rep in sorted(pieces, key=lambda p: (p[0], p[1])):
        reports[j] = rep if o == 0 else rep._replace(spike_clipped=reports[j].spike_clipped + rep.spike_clipped)


def _byte(span: tuple[int, int, int, int], element: int) -> int:
    """Where element ``element`` of the slice starts in a region ``(first byte, end, itemsize, per)``
    holding one ``itemsize``-byte value per ``per`` elements (a block's scale: per = block)."""
    lo, _hi, itemsize, per = span
    return lo + itemsize * -(-element // per)


class PassThreads:
    """The threads a device with several cores runs each chunk of its pass on (``cores=N``).

    [Note: a pass on several cores] A slice's updated elements are cut into
    ``threads`` ranges of about equal length, at multiples of :data:`SPLIT`
    elements from their segment's start (or at a segment's start), and each
    thread makes the whole pass over its range on its own: its chunks' checksums
    before, decode, update, encode, checksums after, in its own part of the
    working area. The threads meet once per slice. Meeting three times per chunk
    (checksums, update, checksums, as this pass first did) held two threads to
    1.10-1.24x one thread's rate; see docs/benchmarks.md. A checksum block that a
    cut splits between two threads, in any region, is computed whole before the
    threads start and after they end, as the edges are. The fused kernels
    compute each element with the same vector lanes whatever the range (cuts at
    multiples of their vector length), and the codecs are elementwise within
    blocks (cuts on blocks), so the numbers are those of one thread. The work
    releases the GIL: the native codecs
    through ctypes, the fused kernels and the CRC-32s in their C code.
    """

    def __init__(self, threads: int) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"the device's pass needs at least 1 thread, got {threads!r}")
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="nearstep-pass") if threads > 1 else None

    def run(self, jobs: list[Callable[[], None]]) -> None:
        """Run ``jobs``, the first on this thread; re-raise the first failure after all are done."""
        if self._pool is None or len(jobs) < 2:
            for job in jobs:
                job()
            return
        futures = [self._pool.submit(job) for job in jobs[1:]]
        error: BaseException | None = None
        try:
            jobs[0]()
        except BaseException as exc:  # the others still run to the end: they share the slot
            error = exc
        for future in futures:
            try:
                future.result()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


# Runs of a chunk given to different threads start at multiples of this many elements from their
# segment's start: a multiple of every block size of 8-bit moments' blocks up to 2048 and of the
# fused kernels' vector lengths (see [Note: a pass on several cores]).
SPLIT = 1 << 11


def checked_pass(image: memoryview, block: int, spans: Sequence[tuple[int, int, int, int]], extent: int,
                 segments: list[int], bounds: list[tuple[int, int]], chunk: int,
                 update: Callable[[list[tuple[int, int, int]], int, int], None], align: int = 1,
                 threads: PassThreads | None = None) -> tuple[list[int], list[int]]:
    """The kernel's pass over a slice's file image, with its checksums; returns the per-block
    CRC-32s of the image before and after.

    [Note: checksums in the kernel's pass] A slice arrives unchecked (the loader
    reads it without checksums) and leaves unchecked (the write-back computes
    none): the checksums of the old image and of the new one are computed here, a
    chunk at a time, right before and right after ``update`` works on that chunk's
    ``pieces`` (segment, first element, stop), while its bytes are in cache. In
    the I/O path they were one more pass over memory the disk was filling or
    emptying: 3-6% of the read bandwidth on the development VM. The device's CPU
    per step did not change (the same work, elsewhere). The caller compares the
    "before" CRCs with the manifest before anything leaves the slot, so a
    corrupted slice is still refused and the update made to it is discarded with
    the slot.

    ``spans`` are the regions' data, ``(first byte, end, itemsize, per)`` each: one
    ``itemsize``-byte value per ``per`` elements of the slice's ``0..extent`` (fp32
    state: 4 bytes per element; a block's scale: 4 bytes per ``per = block``
    elements). A chunk reaches up to a multiple of ``align`` (the format's block),
    or ``extent``, so that a block's scale is checksummed only once the whole block
    is written. ``chunk`` >= ``extent`` makes one chunk (then the CRCs are
    whole-block passes before and after).

    ``update(pieces, at, worker)`` works on one chunk's ``pieces``, told ``at``, where the
    chunk goes in the working area (its pieces widened to ``align`` packed one after the
    other from there), and ``worker``, its thread's number; with ``threads``, each thread
    works through its own range of the slice (see [Note: a pass on several cores]), its
    chunks at its own ``at``.
    """
    spans = list(spans) if chunk < extent else []
    plain = [(lo, hi) for lo, hi, *_ in spans]
    count = threads.threads if threads is not None else 1
    cuts = _cuts(segments, bounds, extent, count, max(SPLIT, align)) if count > 1 and spans else [0, extent]
    # Blocks holding a cut, in any region, belong to two threads: they are checksummed whole,
    # before the threads start and after they are done, with the edges.
    straddling = [_byte(span, e) for e in cuts[1:-1] for span in spans]
    verify = _PassCrcs(block, len(image), plain, straddling)
    written = _PassCrcs(block, len(image), plain, straddling)
    parts = [_pieces_between(segments, bounds, lo, hi) for lo, hi in zip(cuts, cuts[1:])]
    # Each thread takes whole chunks: two half-size chunks a thread measured 1.02-1.44x one thread's
    # rate, whole ones 1.53-1.64x (more calls a thread, and more of them wait for the GIL).
    room = [_room(part, chunk, align, extent) for part in parts]
    if len(parts) > 1 and sum(room) > extent:  # the threads' working areas would overlap: one thread
        return checked_pass(image, block, spans, extent, segments, bounds, chunk, update, align, None)

    def work(worker: int, start: int, end: int, pieces: list[tuple[int, int, int]], at: int) -> None:
        done = start
        for stop, chunk_pieces in _chunks(pieces, chunk):
            stop = min(-(-stop // align) * align, end)
            for span in spans:
                verify.feed(image, _byte(span, done), _byte(span, stop))
            update(chunk_pieces, at, worker)
            for span in spans:
                written.feed(image, _byte(span, done), _byte(span, stop))
            done = stop
        for span in spans:  # what lies past this thread's last updated segment
            verify.feed(image, _byte(span, done), _byte(span, end))
            written.feed(image, _byte(span, done), _byte(span, end))

    verify.edges(image)  # before the update touches them
    jobs, at = [], 0
    for worker, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        jobs.append(lambda w=worker, lo=lo, hi=hi, at=at: work(w, lo, hi, parts[w], at))
        at += room[worker]
    if threads is not None and len(jobs) > 1:
        # [Note: a pass on several cores]: one meeting per slice, not three per chunk
        threads.run(jobs)
    else:
        for job in jobs:
            job()
    written.edges(image)
    return verify.result(), written.result()


def fusable(steps: Sequence[int], guards: rules.Guards, work: list[tuple[rules.Hyper, list[int], list[torch.Tensor]]],
            adopted: Container[int] = ()) -> dict[int, tuple[int, Any, int]]:
    """The segments whose pieces the codecs' fused Adam pass may update ([Note: Adam in the codecs'
    pass] in native.c): Adam and AdamW without the spike guard and without ``maximize`` (see
    :func:`formats.native.adam_constants`), whose masters are not taken from the host. Segment -> (address of its gradient's first element, the pass's constants, its flags).
    ``work``: (hyper, segments, their fp32 gradients) per group; ``steps``: each segment's step."""
    if guards.spike_clip is not None:
        return {}
    out: dict[int, tuple[int, Any, int]] = {}
    for hyper, members, grads in work:
        if not isinstance(hyper, (rules.AdamWHyper, rules.AdamHyper)) or hyper.maximize:
            continue
        made: dict[int, tuple[Any, int]] = {}
        for j, g in zip(members, grads):
            if j in adopted:
                continue
            step = steps[j]
            if step not in made:
                made[step] = formats.native.adam_constants(
                    hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay,
                    decoupled=isinstance(hyper, rules.AdamWHyper), step=step)
            out[j] = (g.data_ptr(), *made[step])
    return out


def fused_pass(coder: formats.SliceCoder, fused: dict[int, tuple[int, Any, int]], lanes: int,
               bounds: Sequence[tuple[int, int]], pieces: list[tuple[int, int, int]], seed: int,
               work: torch.Tensor, collected: list[tuple[int, int, rules.SegmentReport]]) -> list[tuple[int, int, int]]:
    """Update the pieces (segment, first element, stop) of :func:`fusable` segments with the fused
    pass, appending their reports to ``collected``; returns what is left for the torch kernel: the
    other segments' pieces, and the end of each piece that torch's kernel computes in its scalar loop
    (the last ``(hi - lo) % lanes`` elements, with the rest of their block), where it rounds
    otherwise. ``work``: ``3 * formats.native.ADAM_TILE`` floats of this thread's own."""
    rest = []
    block, address = coder.block, work.data_ptr()
    for j, lo, hi in pieces:
        entry = fused.get(j)
        tail = (hi - lo) % lanes
        cut = hi - tail if tail == 0 or block == 1 else (hi - tail) - (hi - tail) % block
        if entry is None or cut <= lo or (cut - lo) % lanes:
            rest.append((j, lo, hi))
            continue
        grad, constants, flags = entry
        first = bounds[j][0]
        a, b = coder.span(lo, hi)
        coder.adam.run(a, b if cut == hi else cut, lo, cut, grad + 4 * (lo - first), constants, flags, seed, address)
        collected.append((j, lo - first, rules.UNWATCHED))
        if cut < hi:
            rest.append((j, cut, hi))
    return rest


def _cuts(segments: list[int], bounds: list[tuple[int, int]], extent: int, threads: int, step: int) -> list[int]:
    """Where the threads' element ranges of a slice begin: 0, then up to ``threads - 1`` cuts near equal
    shares of the updated elements, each a multiple of ``step`` from its segment's start (or a segment's
    start), then ``extent``."""
    total = sum(bounds[j][1] - bounds[j][0] for j in segments)
    cuts = [0]
    if total:
        seen = 0
        targets = [total * t // threads for t in range(1, threads)]
        for j in segments:
            lo, hi = bounds[j]
            while targets and seen + (hi - lo) > targets[0]:
                cut = lo + -(-(targets.pop(0) - seen) // step) * step
                if cuts[-1] < cut < hi:
                    cuts.append(cut)
            seen += hi - lo
    return cuts + [extent]


def _pieces_between(segments: list[int], bounds: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """The updated segments' parts in elements [lo, hi), as (segment, first element, stop)."""
    return [(j, max(a, lo), min(b, hi)) for j in segments for a, b in (bounds[j],) if max(a, lo) < min(b, hi)]


def _chunks(pieces: list[tuple[int, int, int]], chunk: int) -> Iterator[tuple[int, list[tuple[int, int, int]]]]:
    """The kernel's pass over ``pieces`` (segment, first element, stop; in slice order) in chunks of about
    ``chunk`` elements: yields (the element the chunk reaches, its pieces).

    A piece is cut only at multiples of ``chunk`` from where it starts, which is its segment's start or a
    thread's cut (a multiple of :data:`SPLIT` from it), so every piece but a segment's last is a whole
    number of vector lengths: the fused kernels' vectorised body and scalar tail then see each element
    as they would see the whole segment, and chunking changes no bit.
    """
    out: list[tuple[int, int, int]] = []
    filled = 0
    for j, lo, hi in pieces:
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            out.append((j, start, stop))
            filled += stop - start
            if filled >= chunk:
                yield stop, out
                out, filled = [], 0
    if out:
        yield out[-1][2], out


def _room(pieces: list[tuple[int, int, int]], chunk: int, align: int, extent: int) -> int:
    """Elements of working area the largest chunk of ``pieces`` needs, its pieces widened to ``align``."""
    return max((sum(min(-(-hi // align) * align, extent) - (lo - lo % align) for _j, lo, hi in chunk_pieces)
                for _stop, chunk_pieces in _chunks(pieces, chunk)), default=0)


class Engine:
    """Runs device requests against one store. Not thread-safe: one caller at a time."""

    def __init__(self, store: Store, config: EngineConfig) -> None:
        self.store = store
        self.manifest: Manifest = store.manifest
        self.layout = StagingLayout.from_manifest(self.manifest)
        m = self.manifest
        # Every slot can hold any slice (see [Note: slot layout] in image.py).
        self.images = [m.image(spec.index) for spec in m.slices]
        self.slot_bytes = max((image.slot_bytes for image in self.images), default=aio.PAGE)
        self.max_slots = min(slot_count(config.memory_budget, self.slot_bytes), max(len(m.slices), 1))
        # [Note: kernels before I/O] The next forward waits for the kernels (new weights),
        # never for the write-back, which only has to finish before the commit; on a
        # shared core the I/O threads' checksums and copies therefore run at a lower priority.
        self.pool = uring.open_io(config.io_backend, threads=config.io_threads, queue_depth=config.queue_depth,
                                block_bytes=m.checksum_block, nice=_IO_NICE)
        self.io_backend = self.pool.describe()
        self.memory: dict[int, torch.Tensor] = {}
        self._shared: list[SharedMemory] = []
        # Opened on demand, at most what RLIMIT_NOFILE allows at once (see slicefiles.py).
        self.files = SliceFiles(store.slice_path)
        self._cv = threading.Condition()
        self._free: list[_Slot] = []
        self._made = 0
        self._order: deque[int] = deque()
        self._tickets: dict[int, _Ticket] = {}
        self._writes: dict[int, tuple[Future[aio.IOResult], int, list[int] | None]] = {}
        self._closing = False
        # See [Note: a step on the device] in protocol.py; _failure is the request that failed it.
        self.step_state = StepState.IDLE
        self._failure: BaseException | None = None
        self._trace: deque[TraceEvent] = deque(maxlen=_MAX_TRACE_EVENTS)
        # Guard counts of the applies since the last commit; the commit adds them to the manifest's.
        self._kernel_counts = {"spike_clipped": 0, "spike_checked": 0, "update_clipped": 0}
        # Per parameter, what the guards did since the last commit: (spike-clipped elements,
        # update-clipped segments, sum of update_rms**2 * length, sum of ratio**2 * length, length).
        self._param_counts: dict[int, list[float]] = {}
        # The threads of the pass (cores=N) and each one's scratch for the torch codecs.
        self._threads = PassThreads(config.threads) if config.threads > 1 else None
        self._workspaces = [formats.Workspace() for _ in range(config.threads)]
        self._adam_work = [torch.empty(3 * formats.native.ADAM_TILE) for _ in range(config.threads)]
        self.counters = {
            "link_in_bytes": 0,
            "link_out_bytes": 0,
            "compute_seconds": 0.0,
            "load_wait_seconds": 0.0,
            "commit_seconds": 0.0,
            "slices_applied": 0,
            "slices_staged": 0,
            "steps_committed": 0,
            "peak_slots": 0,
        }
        self._loader = threading.Thread(target=self._load_loop, name="nearstep-loader", daemon=True)
        self._loader.start()

    # -- request dispatch ----------------------------------------------------

    def handle(self, request: Request) -> Any:
        """Run one request; on failure the step in progress is dropped (see :meth:`_refuse_if_failed`)."""
        try:
            return self._dispatch(request)
        except BaseException as exc:  # Ctrl-C in the inline device too: the step is dropped whole
            self.abort_step()
            if isinstance(request, (Commit, Abort)):
                self._end_step()
            elif not isinstance(request, Query) and self.step_state is not StepState.FAILED:
                # This step's remaining applies and its commit are refused.
                self.step_state, self._failure = StepState.FAILED, exc
            raise

    def _end_step(self) -> None:
        """The host ended the step (committed or aborted it): what follows starts afresh."""
        self.step_state, self._failure = StepState.IDLE, None

    def _dispatch(self, request: Request) -> Any:
        if isinstance(request, Apply):
            return self._apply(request)
        if isinstance(request, Prefetch):
            return self._prefetch(request.slices)
        if isinstance(request, Stage):
            self._check_slice(request.slice)
            self.counters["slices_staged"] += 1
            return None
        if isinstance(request, Commit):
            return self._commit(request)
        if isinstance(request, Abort):
            self.abort_step()
            self._end_step()
            return None
        if isinstance(request, LoadState):
            return self._load_state(request)
        if isinstance(request, MapMemory):
            shared = SharedMemory(request.nbytes, request.path)
            self._shared.append(shared)
            self.memory[request.memory] = shared.bytes
            return None
        if isinstance(request, Query):
            return self._query(request.kind)
        raise ValueError(f"the device does not know the request {request!r}")

    def _query(self, kind: QueryKind) -> Any:
        if kind is QueryKind.STATS:
            return self.stats()
        if kind is QueryKind.MANIFEST:
            return self.manifest
        with self._cv:  # QueryKind.TRACE
            events, self._trace = list(self._trace), deque(maxlen=_MAX_TRACE_EVENTS)
        return events

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.counters)
        io = self.pool.counters()
        out["store_read_bytes"] = io["bytes_read"]
        out["store_write_bytes"] = io["bytes_written"]
        out["io_read_seconds"] = io["read_seconds"]
        out["io_write_seconds"] = io["write_seconds"]
        out["slots"] = self.max_slots
        out["files_open"] = len(self.files)
        out["files_opened"] = self.files.opened
        out["slot_bytes"] = self.slot_bytes
        out["step"] = self.manifest.step
        out["counters"] = dict(self.manifest.counters)
        return out

    def _event(self, lane: Lane, name: str, start_ns: int, end_ns: int) -> None:
        with self._cv:
            self._trace.append(TraceEvent(lane, name, start_ns, end_ns))

    def _timed(self, future: Future[aio.IOResult], lane: Lane, name: str) -> Future[aio.IOResult]:
        start = time.monotonic_ns()
        future.add_done_callback(lambda _f: self._event(lane, name, start, time.monotonic_ns()))
        return future

    # -- loading -------------------------------------------------------------

    def _prefetch(self, slices: Sequence[int]) -> None:
        with self._cv:
            for k in slices:
                self._check_slice(k)
                if k not in self._tickets and k not in self._order:
                    self._order.append(k)
            self._cv.notify_all()

    def _load_loop(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not (self._order and (self._free or self._made < self.max_slots)):
                    self._cv.wait()
                if self._closing:
                    return
                k = self._order.popleft()
                if self._free:
                    slot = self._free.pop()
                else:
                    slot = _Slot(self.slot_bytes)
                    self._made += 1
                    self.counters["peak_slots"] = max(self.counters["peak_slots"], self._made)
                ticket = _Ticket(slot)
                self._tickets[k] = ticket
                self._cv.notify_all()
            try:
                gen = self.manifest.committed[k].generation
                nbytes = self.images[k].file_bytes
                # Every slice is verified in the kernel's pass (see [Note: checksums in the kernel's pass]).
                checksum = False
                ticket.future = self._timed(
                    self._io(k, gen, slot.buffer.memoryview(0, nbytes), write=False, checksum=checksum),
                    Lane.DEVICE_IO, f"read s{k}",
                )
            except BaseException as exc:  # surfaced by the apply that waits on this ticket
                failed: Future[aio.IOResult] = Future()
                failed.set_exception(exc)
                ticket.future = failed
            ticket.ready.set()

    def _take_loaded(self, k: int) -> tuple[_Slot, aio.IOResult]:
        t0 = time.perf_counter()
        with self._cv:
            if k not in self._tickets:
                # Not announced: load it next (see [Note: the slot pipeline]).
                if k in self._order:
                    self._order.remove(k)
                self._order.appendleft(k)
                self._cv.notify_all()
                while k not in self._tickets:
                    self._cv.wait()
            ticket = self._tickets.pop(k)
        ticket.ready.wait()
        assert ticket.future is not None
        try:
            result = ticket.future.result()
            if result.crcs is not None:
                self._verify(k, result.crcs)
        except BaseException:
            self._release(ticket.slot)
            raise
        self.counters["load_wait_seconds"] += time.perf_counter() - t0
        return ticket.slot, result

    def _verify(self, k: int, crcs: Sequence[int]) -> None:
        got = aio.combine_crcs(crcs)
        state = self.manifest.committed[k]
        if got != state.checksum:
            path = self.store.slice_path(k, state.generation)
            raise StoreCorruptError(
                f"slice {k} of store {self.store.path} is corrupted: {path.name} has checksum "
                f"{got:#010x}, the manifest committed {state.checksum:#010x}. Nothing was updated. "
                f"Restore the store from a backup, or start from a fresh store."
            )

    def _release(self, slot: _Slot) -> None:
        with self._cv:
            self._free.append(slot)
            self._cv.notify_all()

    def _io(self, k: int, gen: int, view: memoryview, *, write: bool, checksum: bool) -> Future[aio.IOResult]:
        """Read into (``write`` False) or write from ``view`` the whole of slice ``k``'s generation
        ``gen``; its file stays open until the request is done (and is synced before it may close,
        when written: see [Note: closing a file with a write in it] in slicefiles.py)."""
        op, wrote = (self.pool.write, True) if write else (self.pool.read, False)
        f = self.files.acquire(k, gen)
        try:
            future = op(f, view, 0, checksum=checksum)
        except BaseException:
            self.files.release(k, gen, wrote=wrote)
            raise
        future.add_done_callback(lambda _f: self.files.release(k, gen, wrote=wrote))
        return future

    def _check_slice(self, k: int) -> None:
        if not 0 <= k < len(self.manifest.slices):
            raise ValueError(f"slice {k} does not exist; the store has {len(self.manifest.slices)} slices")

    # -- applying ------------------------------------------------------------

    def _apply(self, req: Apply) -> list[rules.SegmentReport]:
        self._refuse_if_failed()
        k = req.slice
        self._check_slice(k)
        staged = self.layout.slices[k]
        if len(req.steps) != len(staged.segments):
            raise ValueError(f"slice {k} has {len(staged.segments)} segments but {len(req.steps)} step values came")
        if req.adopt and len(req.adopt) != len(staged.segments):
            raise ValueError(f"slice {k} has {len(staged.segments)} segments but {len(req.adopt)} adopt flags came")
        arena = self.memory.get(req.memory)
        if arena is None:
            raise ValueError(f"staging memory {req.memory} is not mapped on this device")
        if k in self._writes:
            raise RuntimeError(f"slice {k} was already applied in this step; commit before applying it again")
        slot, _ = self._take_loaded(k)
        if not any(req.steps) and not any(req.adopt):
            # Prefetched, but nothing of it had a gradient this step: the state is unchanged.
            self._release(slot)
            return [rules.SegmentReport(0, float("nan"), float("nan"), False)] * len(staged.segments)
        try:
            start = time.monotonic_ns()
            reports, crcs = self._run_kernel(req, slot, arena)
            self._event(Lane.DEVICE_COMPUTE, f"apply s{k}", start, time.monotonic_ns())
            self._write_back(k, slot, crcs)
        except BaseException:
            self._release(slot)
            raise
        return reports

    def _run_kernel(self, req: Apply, slot: _Slot,
                    arena: torch.Tensor) -> tuple[list[rules.SegmentReport], list[int] | None]:
        """Update slice ``req.slice`` in its slot; returns the segments' reports and, for an fp32
        slice, the per-block CRC-32s of the new file image (else None: the write computes them)."""
        t0 = time.perf_counter()
        m = self.manifest
        staged = self.layout.slices[req.slice]
        image = self.images[req.slice]  # see [Note: quantisation blocks per parameter] in image.py
        identity = image.format.is_identity
        regions = image.work(slot.buffer)
        scratch = image.scratch(slot.buffer)
        bounds = list(image.bounds)
        by_group: dict[int, list[int]] = {}
        for j, seg in enumerate(staged.segments):
            if req.steps[j] > 0:
                by_group.setdefault(seg.group, []).append(j)
        adopted = {j: self.layout.weight_view(arena, staged.segments[j], staged) for j, flag in enumerate(req.adopt) if flag}
        reports = [rules.SegmentReport(0, float("nan"), float("nan"), False)] * len(staged.segments)
        link_in = 0
        work = []
        for group, members in by_group.items():
            hyper = req.hypers[group]
            grads = []
            for j in members:
                seg = staged.segments[j]
                lo, hi = bounds[j]
                src = self.layout.grad_view(arena, seg, staged)
                link_in += src.numel() * src.element_size()
                if src.dtype == torch.float32 and _reads_grads_only(hyper, req.guards):
                    # [Note: gradients in place] The fused kernels only read the gradient, and
                    # the host is done with staged gradients once it queued this apply (a
                    # scale != 1 comes only with step()'s barrier, never with an early apply
                    # that could be dropped and redone): use them where they lie.
                    g = src
                    if req.grad_scale != 1.0:
                        g.mul_(req.grad_scale)
                elif req.grad_scale != 1.0:
                    g = torch.mul(src, req.grad_scale, out=scratch[lo:hi])
                else:
                    g = scratch[lo:hi].copy_(src)
                grads.append(g)
            work.append((hyper, members, grads))
        link_in += sum(w.numel() * w.element_size() for w in adopted.values())
        passed = sorted({j for _h, members, _g in work for j in members} | set(adopted))
        # Chunked only where every guard is elementwise: a chunk's report then adds up.
        elementwise = not (req.guards.telemetry or req.guards.update_clip is not None)
        chunk = PASS_CHUNK if elementwise else max(image.extent, 1)

        collected: list[tuple[int, int, rules.SegmentReport]] = []

        if identity:
            def update(pieces: list[tuple[int, int, int]], at: int, worker: int) -> None:
                self._update(req, work, bounds, regions, pieces, collected, adopted)
        else:
            # [Note: one pass per chunk] A compressed slice is decoded, updated and encoded a
            # chunk at a time, between the chunk's two checksums, so that its bytes and its fp32
            # working copy stay in cache through all four steps (one pass over memory, where
            # decoding and encoding the whole slice took three). The chunk's fp32 copy lies at the
            # start of the slot's working regions, the same memory for every chunk: fresh memory
            # per chunk would be read from DRAM before each write (1.07 against 0.36 ns per
            # element to decode bf16-sr+8bit, measured). Only the segments with work are decoded
            # and encoded; the bytes of the others are left as they are, which is what
            # re-encoding their decoded values would write (every codec maps what it decodes to
            # the same bytes). The moments' fp32 copies die with the chunk. Adam's and AdamW's
            # pieces go through the native fused pass instead, a tile at a time with no Python
            # between the steps ([Note: Adam in the codecs' pass] in native.c; fused_pass), except
            # for the few last elements of a segment that torch's kernel rounds in its scalar loop.
            coder = image.coder(slot.buffer, regions, self._workspaces[0])
            packed = [coder.packed[name] for name in m.state_names]
            seed = rounding_seed(m, m.step + 1, req.slice)
            fused = fusable(req.steps, req.guards, work, adopted) if elementwise and coder.adam is not None else {}
            lanes = formats.native.adam_lanes() if fused else 0

            def update(pieces: list[tuple[int, int, int]], at: int, worker: int) -> None:
                spans, shift = [], {}
                if fused:
                    pieces = fused_pass(coder, fused, lanes, bounds, pieces, seed, self._adam_work[worker], collected)
                for j, lo, hi in pieces:
                    a, b = coder.span(lo, hi)
                    spans.append((a, b, at))
                    shift[j] = a - at
                    at += b - a
                space = self._workspaces[worker]
                for a, b, where in spans:
                    coder.decode(a, b, where, space)
                self._update(req, work, bounds, regions, pieces, collected, adopted, shift, packed)
                for a, b, where in spans:
                    coder.encode_(a, b, seed, where, space)

        before, written = checked_pass(
            slot.buffer.memoryview(0, image.file_bytes), m.checksum_block, image.crc_spans(), image.extent,
            passed, bounds, chunk, update, align=image.block,
            threads=self._threads if elementwise else None,  # a per-tensor guard needs whole segments
        )
        self._verify(req.slice, before)
        _merge_reports(collected, reports)
        for _hyper, members, _grads in work:
            for j in members:
                checked = req.guards.spike_clip is not None and req.steps[j] > req.guards.spike_warmup
                self._count(staged.segments[j].param, staged.segments[j].length, reports[j], checked)
        # Post the new weights, cast to the model dtype, where the host will pick them up: for a
        # compressed slice decoded from the verified image, which holds exactly the rounded
        # master that encoding left in the working copy, a chunk at a time.
        link_out = 0
        for j in passed:
            seg = staged.segments[j]
            dst = self.layout.weight_view(arena, seg, staged)
            lo, hi = bounds[j]
            if identity or not packed[0]:
                dst.copy_(regions[0][lo:hi])
            else:
                for start in range(lo, hi, PASS_CHUNK):
                    stop = min(start + PASS_CHUNK, hi)
                    coder.decode_master(start, stop, regions[0][: stop - start])
                    dst[start - lo : stop - lo].copy_(regions[0][: stop - start])
            link_out += dst.numel() * dst.element_size()
        self.counters["link_in_bytes"] += link_in
        self.counters["link_out_bytes"] += link_out
        self.counters["compute_seconds"] += time.perf_counter() - t0
        self.counters["slices_applied"] += 1
        return reports, written

    def _update(self, req: Apply, work: list[tuple[rules.Hyper, list[int], list[torch.Tensor]]],
                bounds: list[tuple[int, int]], regions: list[torch.Tensor], pieces: list[tuple[int, int, int]],
                reports: list[tuple[int, int, rules.SegmentReport]], adopted: dict[int, torch.Tensor],
                shift: dict[int, int] | None = None, packed: Sequence[bool] = ()) -> None:
        """Run the kernels on ``pieces`` (segment, first element, stop) of the slice, one fused call per
        group; each piece's report is appended to ``reports`` as (segment, offset in the segment,
        report), which :func:`_merge_reports` adds up (threads append at once). Adopted segments' masters first take
        the host's weights (``adopted``: segment -> its weight view in staging). Element ``e`` of
        segment ``j`` is at ``regions[r][e - shift[j]]`` where ``packed[r]`` (a chunk's working copy),
        else at ``regions[r][e]``."""
        names = self.manifest.state_names
        shift = shift or {}
        moved = [bool(packed[r]) if r < len(packed) else False for r in range(len(names))]
        # per piece: (first element, stop) in each region, and the piece's offset in its segment
        wanted = {j: ([(lo - shift.get(j, 0) if move else lo) for move in moved], hi - lo, lo - bounds[j][0])
                  for j, lo, hi in pieces}
        for j, lo, hi in pieces:
            if j in adopted:
                # After the pass checksummed the old image of this chunk, before the kernel reads it.
                first, at = bounds[j][0], wanted[j][0][0]
                regions[0][at : at + hi - lo].copy_(adopted[j][lo - first : hi - first])
        for hyper, members, grads in work:
            cut = [(j, g, *wanted[j]) for j, g in zip(members, grads) if j in wanted]
            if not cut:
                continue
            out = kernels.update_(
                hyper,
                [regions[0][at[0] : at[0] + n] for _j, _g, at, n, _o in cut],
                {name: [regions[r][at[r] : at[r] + n] for _j, _g, at, n, _o in cut]
                 for r, name in enumerate(names[1:], start=1)},
                [g[o : o + n] for _j, g, _at, n, o in cut],
                [req.steps[j] for j, *_ in cut],
                req.guards,
            )
            reports.extend((j, o, rep) for (j, _g, _at, _n, o), rep in zip(cut, out))

    def _count(self, param: int, length: int, rep: rules.SegmentReport, spike_checked: bool) -> None:
        self._kernel_counts["spike_clipped"] += rep.spike_clipped
        self._kernel_counts["spike_checked"] += length if spike_checked else 0
        self._kernel_counts["update_clipped"] += int(rep.update_clipped)
        acc = self._param_counts.setdefault(param, [0, 0, 0.0, 0.0, 0])
        acc[0] += rep.spike_clipped
        acc[1] += int(rep.update_clipped)
        if not math.isnan(rep.update_rms):
            acc[2] += rep.update_rms**2 * length
            acc[3] += rep.update_to_weight**2 * length
            acc[4] += length

    def _param_stats(self, m: Manifest) -> dict[str, list[float]]:
        """The manifest's per-parameter statistics with this step's counts merged in."""
        if not self._param_counts:
            return m.param_stats
        n = len(m.params)
        stats = {name: list(m.param_stats.get(name, [0.0] * n)) for name in PARAM_STATS}
        for i, (spiked, clipped, rms_energy, ratio_energy, length) in self._param_counts.items():
            stats["spike_clipped"][i] += spiked
            stats["update_clipped"][i] += clipped
            if length:
                stats["update_rms"][i] = math.sqrt(rms_energy / length)
                stats["update_to_weight"][i] = math.sqrt(ratio_energy / length)
        return stats

    def _write_back(self, k: int, slot: _Slot, crcs: list[int] | None) -> None:
        """Write the slot to slice ``k``'s other generation; ``crcs``: its block CRCs, when known already."""
        gen = self.manifest.committed[k].generation ^ 1
        nbytes = self.images[k].file_bytes
        future = self._timed(
            self._io(k, gen, slot.buffer.memoryview(0, nbytes), write=True, checksum=crcs is None),
            Lane.DEVICE_IO, f"write s{k}",
        )
        # The slot is free only once the write has read its bytes.
        future.add_done_callback(lambda _f, slot=slot: self._release(slot))
        self._writes[k] = (future, gen, crcs)
        self.step_state = StepState.OPEN

    def _load_state(self, req: LoadState) -> None:
        self._refuse_if_failed()  # a load is part of the step like an apply: never reopen a dropped step
        k = req.slice
        self._check_slice(k)
        m = self.manifest
        spec = m.slices[k]
        if set(req.arrays) != set(m.state_names):
            raise ValueError(f"slice {k} needs state {list(m.state_names)}, got {sorted(req.arrays)}")
        nbytes = self.images[k].file_bytes
        values = {}
        for name in m.state_names:
            arr = np.ascontiguousarray(req.arrays[name], dtype=np.float32).reshape(-1)
            if arr.size != spec.numel:
                raise ValueError(f"state {name!r} of slice {k} has {arr.size} elements, expected {spec.numel}")
            values[name] = torch.from_numpy(arr.copy())
        buf = aio.AlignedBuffer(nbytes)
        self.images[k].encode(values, buf, rounding_seed(m, m.step + 1, k))
        gen = m.committed[k].generation ^ 1
        future = self._io(k, gen, buf.memoryview(0, nbytes), write=True, checksum=True)
        future.add_done_callback(lambda _f, buf=buf: buf.close())
        self._writes[k] = (future, gen, None)
        self.step_state = StepState.OPEN

    # -- committing ----------------------------------------------------------

    def _commit(self, req: Commit) -> Manifest:
        try:
            self._refuse_if_failed()
        finally:
            self._end_step()  # the next step starts afresh, whether this commit succeeds or not
        t0 = time.perf_counter()
        start_ns = time.monotonic_ns()
        m = self.manifest
        committed = list(m.committed)
        counters = {**m.counters, **req.counters}
        for name, value in self._kernel_counts.items():
            counters[name] = m.counters.get(name, 0) + value
        param_stats = self._param_stats(m)  # before the finally below forgets this step's counts
        try:
            for k, (future, gen, crcs) in sorted(self._writes.items()):
                result = future.result()
                # O_DIRECT skips the page cache, not the drive's cache or the metadata of
                # the file's (fallocated, so far unwritten) extents: fdatasync both.
                self.files.sync(k, gen)
                committed[k] = SliceState(gen, aio.combine_crcs(result.crcs if crcs is None else crcs))
        finally:
            self._writes_abort()
        manifest = replace(
            m,
            step=req.step,
            param_steps=tuple(req.param_steps),
            hyperparameters=tuple(req.hyperparameters),
            counters=counters,
            committed=tuple(committed),
            param_stats=param_stats,
        )
        try:
            self.store.commit(manifest)
        finally:
            self.manifest = self.store.manifest  # the new one, if the rename happened
        self._event(Lane.DEVICE_IO, f"commit {req.step}", start_ns, time.monotonic_ns())
        self.counters["steps_committed"] += 1
        self.counters["commit_seconds"] += time.perf_counter() - t0
        return self.manifest

    def _writes_abort(self) -> None:
        self._kernel_counts = dict.fromkeys(self._kernel_counts, 0)
        self._param_counts = {}
        for future, _gen, _crcs in self._writes.values():
            try:
                future.result()
            except BaseException:
                pass
        self._writes.clear()

    def _refuse_if_failed(self) -> None:
        """A step is committed whole or not at all: after one of its requests failed, its
        remaining applies and its commit are refused, naming the first failure."""
        if self.step_state is StepState.FAILED:
            raise RuntimeError(
                f"an earlier request of this step failed ({type(self._failure).__name__}: {self._failure}); "
                f"the step is dropped and the store stays at step {self.manifest.step}"
            )

    def abort_step(self) -> None:
        """Forget everything applied since the last commit (after an error).

        The store still names the last committed generation of every slice, so
        dropping the uncommitted writes loses nothing that was committed.
        """
        self._writes_abort()
        if self.step_state is StepState.OPEN:
            self.step_state = StepState.IDLE  # nothing applied is left; a failed step stays refused
        with self._cv:
            self._order.clear()
            tickets = list(self._tickets.values())
            self._tickets.clear()
        for ticket in tickets:
            ticket.ready.wait()
            try:
                if ticket.future is not None:
                    ticket.future.result()
            except BaseException:
                pass
            self._release(ticket.slot)

    # -- closing -------------------------------------------------------------

    def close(self) -> None:
        """Drop uncommitted work, stop the loader, close files and release the store."""
        self.abort_step()
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._loader.join()
        self.pool.close()
        if self._threads is not None:
            self._threads.close()
        self.files.close()
        for slot in self._free:
            slot.buffer.close()
        self._free.clear()
        self.memory.clear()
        for shared in self._shared:
            shared.close()
        self.store.close()

