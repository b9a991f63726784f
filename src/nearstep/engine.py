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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from . import aio, formats, kernels, rules, uring
from .errors import StoreCorruptError
from .protocol import (Abort, Apply, Commit, Lane, LoadState, MapMemory, Prefetch, Query, QueryKind, Request, Stage,
                       StepState, TraceEvent)
from .staging import SharedMemory, StagingLayout
from .store import PARAM_STATS, Manifest, SliceState, Store, rounding_seed

__all__ = [
    "EngineConfig",
    "Engine",
    "checked_pass",
    "PASS_CHUNK",
]

_MARGIN_BYTES = 16 << 20
_IO_NICE = 10
_MAX_TRACE_EVENTS = 200_000  # a bound on memory when nobody collects the trace


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineConfig:
    """How the engine uses its memory and the disk.

    Attributes:
        memory_budget: bytes of device memory for slots (state + gradient scratch).
        io_backend: ``"auto"``, ``"ring"`` or ``"threads"``: see :func:`nearstep.uring.open_io`.
        io_threads: threads of the thread-pool backend.
        queue_depth: blocks the io_uring backend keeps in flight.
    """

    memory_budget: int
    io_backend: str = "auto"
    io_threads: int = 4
    queue_depth: int = uring.DEFAULT_QUEUE_DEPTH


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


def _chunks(segments: list[int], bounds: list[tuple[int, int]],
            chunk: int) -> Iterator[tuple[int, list[tuple[int, int, int]]]]:
    """The kernel's pass over ``segments`` (in slice order) in chunks of about ``chunk`` elements:
    yields (the element the chunk reaches, its pieces (segment, first element, stop)).

    A segment is cut only at multiples of ``chunk`` from its own start, so every piece but its
    last is a whole number of vector lengths: the fused kernels' vectorised body and scalar tail
    then see each element as they would see the whole segment, and chunking changes no bit.
    """
    pieces: list[tuple[int, int, int]] = []
    filled = 0
    for j in segments:
        lo, hi = bounds[j]
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            pieces.append((j, start, stop))
            filled += stop - start
            if filled >= chunk:
                yield stop, pieces
                pieces, filled = [], 0
    if pieces:
        yield pieces[-1][2], pieces


class _PassCrcs:
    """Per-block CRC-32s of a slice's file image, computed during the kernel's pass over it.

    Blocks lying inside one of ``spans`` (the regions' data) are fed a chunk at a
    time, in file order, while the chunk is in cache (:meth:`feed`); the few
    others, which straddle a region's end, its page padding or the next region,
    are computed whole by :meth:`edges`. With no spans every block is an edge.
    """

    def __init__(self, block: int, nbytes: int, spans: list[tuple[int, int]]) -> None:
        self.block, self.nbytes = block, nbytes
        count = -(-nbytes // block)
        self.crcs = [0] * count
        self.next = {b: b * block for b in range(count)
                     if any(lo <= b * block and min(nbytes, (b + 1) * block) <= hi for lo, hi in spans)}
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


def checked_pass(image: memoryview, block: int, spans: list[tuple[int, int]], extent: int, segments: list[int],
                 bounds: list[tuple[int, int]], chunk: int,
                 update: Callable[[list[tuple[int, int, int]]], None]) -> tuple[list[int], list[int]]:
    """The kernel's pass over an fp32 slice image, with its checksums; returns the per-block
    CRC-32s of the image before and after.

    [Note: checksums in the kernel's pass] An fp32 slice arrives unchecked (the
    loader reads it without checksums) and leaves unchecked (the write-back
    computes none): the checksums of the old image and of the new one are
    computed here, a chunk at a time, right before and right after ``update``
    works on that chunk's ``pieces`` (segment, first element, stop), while its
    bytes are in cache. In the I/O path they were one more pass over memory the
    disk was filling or emptying: 3-6% of the read bandwidth on the development
    VM. The device's CPU per step did not change (the same work, elsewhere).
    The caller compares the "before" CRCs with the manifest before anything
    leaves the slot, so a corrupted slice is still refused and the update made
    to it is discarded with the slot.

    ``spans`` are the regions' data, ``(first byte, end)`` each, at element
    offsets 0..``extent`` within them; ``chunk`` >= ``extent`` makes one chunk
    (then the CRCs are whole-block passes before and after).
    """
    spans = spans if chunk < extent else []
    verify, written = _PassCrcs(block, len(image), spans), _PassCrcs(block, len(image), spans)
    verify.edges(image)  # before the update touches them
    done = 0
    for stop, pieces in _chunks(segments, bounds, chunk):
        for lo, _hi in spans:
            verify.feed(image, lo + 4 * done, lo + 4 * stop)
        update(pieces)
        for lo, _hi in spans:
            written.feed(image, lo + 4 * done, lo + 4 * stop)
        done = stop
    for lo, _hi in spans:  # what lies past the last updated segment
        verify.feed(image, lo + 4 * done, lo + 4 * extent)
        written.feed(image, lo + 4 * done, lo + 4 * extent)
    written.edges(image)
    return verify.result(), written.result()


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
        # Slots get the budget less a margin for what else the engine allocates while it
        # works (the guards' block scratch, I/O bookkeeping, thread stacks).
        usable = config.memory_budget - max(_MARGIN_BYTES, config.memory_budget // 32)
        self.max_slots = max(usable, 0) // self.slot_bytes
        if self.max_slots < 1:
            raise ValueError(
                f"memory_budget of {config.memory_budget / 2**20:.0f} MiB cannot hold one slice's "
                f"working set ({self.slot_bytes / 2**20:.0f} MiB: its state plus a gradient scratch "
                f"area) and a {max(_MARGIN_BYTES, config.memory_budget // 32) / 2**20:.0f} MiB margin. "
                f"Raise memory_budget or make slices smaller (slice_mb)."
            )
        self.max_slots = min(self.max_slots, max(len(m.slices), 1))
        # [Note: kernels before I/O] The next forward waits for the kernels (new weights),
        # never for the write-back, which only has to finish before the commit; on a
        # shared core the I/O threads' checksums and copies therefore run at a lower priority.
        self.pool = uring.open_io(config.io_backend, threads=config.io_threads, queue_depth=config.queue_depth,
                                block_bytes=m.checksum_block, nice=_IO_NICE)
        self.io_backend = self.pool.describe()
        self.memory: dict[int, torch.Tensor] = {}
        self._shared: list[SharedMemory] = []
        self._files: dict[tuple[int, int], aio.AlignedFile] = {}
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
        self._trace: list[TraceEvent] = []
        # Guard counts of the applies since the last commit; the commit adds them to the manifest's.
        self._kernel_counts = {"spike_clipped": 0, "spike_checked": 0, "update_clipped": 0}
        # Per parameter, what the guards did since the last commit: (spike-clipped elements,
        # update-clipped segments, sum of update_rms**2 * length, sum of ratio**2 * length, length).
        self._param_counts: dict[int, list[float]] = {}
        self._workspace = formats.Workspace()  # the codecs' scratch; kernels run on one thread
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
        except Exception as exc:
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
            events, self._trace = self._trace, []
        return events

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.counters)
        io = self.pool.counters()
        out["store_read_bytes"] = io["bytes_read"]
        out["store_write_bytes"] = io["bytes_written"]
        out["io_read_seconds"] = io["read_seconds"]
        out["io_write_seconds"] = io["write_seconds"]
        out["slots"] = self.max_slots
        out["slot_bytes"] = self.slot_bytes
        out["step"] = self.manifest.step
        out["counters"] = dict(self.manifest.counters)
        return out

    def _event(self, lane: Lane, name: str, start_ns: int, end_ns: int) -> None:
        with self._cv:
            if len(self._trace) < _MAX_TRACE_EVENTS:
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
                # An fp32 slice is verified in the kernel's pass (see [Note: checksums in the kernel's pass]).
                checksum = not self.manifest.format.is_identity
                ticket.future = self._timed(
                    self.pool.read(self._file(k, gen), slot.buffer.memoryview(0, nbytes), 0, checksum=checksum),
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

    def _file(self, k: int, gen: int) -> aio.AlignedFile:
        f = self._files.get((k, gen))
        if f is None:
            f = aio.AlignedFile.open(self.store.slice_path(k, gen))
            self._files[(k, gen)] = f
        return f

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
        if not identity:
            image.decode_work(slot.buffer, regions, self._workspace)
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
        if not identity:
            self._update(req, work, bounds, regions, [(j, *bounds[j]) for j in passed], reports, adopted)
        else:
            # Chunked only where every guard is elementwise: a chunk's report then adds up.
            elementwise = not (req.guards.telemetry or req.guards.update_clip is not None)
            before, written = checked_pass(
                slot.buffer.memoryview(0, image.file_bytes), m.checksum_block, image.crc_spans(), image.extent,
                passed, bounds,
                PASS_CHUNK if elementwise else max(image.extent, 1),
                lambda pieces: self._update(req, work, bounds, regions, pieces, reports, adopted),
            )
            self._verify(req.slice, before)
        for _hyper, members, _grads in work:
            for j in members:
                checked = req.guards.spike_clip is not None and req.steps[j] > req.guards.spike_warmup
                self._count(staged.segments[j].param, staged.segments[j].length, reports[j], checked)
        if not identity:
            # Encoding rounds the fp32 state to what the store holds, in place: the weights
            # posted below are then exactly the master a resumed run reads back.
            # The moments' fp32 copies die with the slot, so they are not rewritten.
            image.encode_work(slot.buffer, regions, rounding_seed(m, m.step + 1, req.slice), self._workspace)
        # Post the new weights, cast to the model dtype, where the host will pick them up.
        link_out = 0
        for j in passed:
            seg = staged.segments[j]
            dst = self.layout.weight_view(arena, seg, staged)
            dst.copy_(regions[0][bounds[j][0] : bounds[j][1]])
            link_out += dst.numel() * dst.element_size()
        self.counters["link_in_bytes"] += link_in
        self.counters["link_out_bytes"] += link_out
        self.counters["compute_seconds"] += time.perf_counter() - t0
        self.counters["slices_applied"] += 1
        return reports, written if identity else None

    def _update(self, req: Apply, work: list[tuple[rules.Hyper, list[int], list[torch.Tensor]]],
                bounds: list[tuple[int, int]], regions: list[torch.Tensor], pieces: list[tuple[int, int, int]],
                reports: list[rules.SegmentReport], adopted: dict[int, torch.Tensor]) -> None:
        """Run the kernels on ``pieces`` (segment, first element, stop) of the slice, one fused call per
        group; a segment's reports over several pieces add up. Adopted segments' masters first take
        the host's weights (``adopted``: segment -> its weight view in staging)."""
        names = self.manifest.state_names
        wanted = {j: (lo, hi) for j, lo, hi in pieces}
        for j, lo, hi in pieces:
            if j in adopted:
                # After the pass checksummed the old image of this chunk, before the kernel reads it.
                first = bounds[j][0]
                regions[0][lo:hi].copy_(adopted[j][lo - first : hi - first])
        for hyper, members, grads in work:
            cut = [(j, g, *wanted[j]) for j, g in zip(members, grads) if j in wanted]
            if not cut:
                continue
            out = kernels.update_(
                hyper,
                [regions[0][lo:hi] for _j, _g, lo, hi in cut],
                {name: [regions[r][lo:hi] for _j, _g, lo, hi in cut] for r, name in enumerate(names[1:], start=1)},
                [g[lo - bounds[j][0] : hi - bounds[j][0]] for j, g, lo, hi in cut],
                [req.steps[j] for j, *_ in cut],
                req.guards,
            )
            for (j, _g, lo, _hi), rep in zip(cut, out):
                first = lo == bounds[j][0]
                reports[j] = rep if first else rep._replace(spike_clipped=reports[j].spike_clipped + rep.spike_clipped)

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
            self.pool.write(self._file(k, gen), slot.buffer.memoryview(0, nbytes), 0, checksum=crcs is None),
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
        future = self.pool.write(self._file(k, gen), buf.memoryview(0, nbytes), 0, checksum=True)
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
                self._file(k, gen).sync()
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
        for f in self._files.values():
            f.close()
        self._files.clear()
        for slot in self._free:
            slot.buffer.close()
        self._free.clear()
        self.memory.clear()
        for shared in self._shared:
            shared.close()
        self.store.close()

