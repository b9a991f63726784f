"""The host side of a step: staging slices, backward and forward hooks, landing weights.

One step moves through three phases (see ``../shared/DESIGN.md``, "One step, in
overlap mode"):

- ``IDLE``: every slice's current weights are in the model.
- ``STAGING``: backward is running; each parameter's gradient is copied into
  staging memory as soon as it is final (post-accumulate-grad hooks), and the
  device has been told to start reading the state it will need.
- ``LAUNCHED``: ``step()`` queued the updates; each slice's new weights *land*
  in the model when a module needs them (forward pre-hooks, overlap mode), at
  the next ``step()`` (delayed mode), or before ``step()`` returns (sync mode).

[Note: staging buffers in delayed mode]
In delayed mode the device is still updating step t while backward of step t+1
produces new gradients, and the first gradients of a backward belong to the
slice the device updates last (it goes in forward order). One staging arena
would make backward wait for the whole device step, so delayed mode alternates
between two arenas; sync and overlap need one, because by the time backward of
step t+1 reaches slice k, forward of step t+1 has already waited for it.

[Note: CUDA]
On CUDA, gradients go device-to-host on a side stream after an event recorded on
the compute stream (the gradient is final there), into page-locked staging;
``p.grad`` is kept alive for that stream (``record_stream``) before it is freed.
``launch`` synchronises the side stream before the device may read the
gradients. New weights go host-to-device on the compute stream, so the module's
forward kernels are ordered after them; an event per slice tells the next launch
when the staging weights may be overwritten.
"""

from __future__ import annotations

import contextlib
import enum
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import kernels
from .device import Completion, Device, DeviceMemory
from .engine import Abort, Apply, Commit, Prefetch, Stage
from .staging import StagedSegment, StagedSlice, StagingLayout
from .trace import Trace

__all__ = ["Phase", "InFlight", "Pipeline"]


class Phase(enum.Enum):
    IDLE = "idle"
    STAGING = "staging"
    LAUNCHED = "launched"


@dataclass
class InFlight:
    """One launched step: its completions and which slices have landed."""

    step: int
    arena: int
    applies: dict[int, Completion]
    commit: Completion
    updated: frozenset[int]  # parameters that had a gradient (their segments land)
    landed: set[int] = field(default_factory=set)
    reports: dict[int, list[kernels.SegmentReport]] = field(default_factory=dict)


def _norm(grad: torch.Tensor) -> torch.Tensor:
    """A gradient's L2 norm as torch's clip_grad_norm_ takes it: in the gradient's dtype.

    fp16 is the exception: its norms overflow at 65504, which would read as a
    non-finite gradient, so they are taken in fp32.
    """
    if grad.dtype == torch.float16:
        return torch.linalg.vector_norm(grad, dtype=torch.float32)
    return torch.linalg.vector_norm(grad)


def _pin(memory: DeviceMemory) -> bool:
    """Page-lock staging memory for asynchronous copies; False where CUDA refuses."""
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(memory.bytes.data_ptr(), memory.nbytes, 0)
    return int(err) == 0 if not isinstance(err, tuple) else int(err[0]) == 0


class Pipeline:
    """Moves gradients to a device and new weights back, per slice."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        layout: StagingLayout,
        device: Device,
        trace: Trace,
        *,
        arenas: int,
        offload_gradients: bool,
        rollback: Callable[[bool], None],
    ) -> None:
        self.params = list(params)
        self._ids = {id(p): i for i, p in enumerate(self.params)}
        self.names = list(names)
        self.layout = layout
        self.device = device
        self.trace = trace
        self.offload_gradients = offload_gradients
        self.need_norms = True  # the optimizer clears it when no guard needs the global norm
        self._rollback = rollback
        self.arenas = [device.alloc(layout.nbytes) for _ in range(arenas)]
        self.current = 0
        self.phase = Phase.IDLE
        self.inflight: InFlight | None = None
        # param -> [(slice, segment)], slice -> trainable params
        self.segments: list[list[tuple[StagedSlice, StagedSegment]]] = [[] for _ in self.params]
        self.slice_params: list[set[int]] = []
        for staged in layout.slices:
            members = set()
            for seg in staged.segments:
                self.segments[seg.param].append((staged, seg))
                if self.params[seg.param].requires_grad:
                    members.add(seg.param)
            self.slice_params.append(members)
        self.forward_order = [s.index for s in reversed(layout.slices)]
        self.staged = [False] * len(self.params)
        self.norms: list[torch.Tensor | None] = [None] * len(self.params)
        self._remaining = [len(m) for m in self.slice_params]
        self._prefetched = False
        self._prefetch_order: tuple[int, ...] = ()
        # Set by the optimizer when no global scalar rescales the gradients: each slice is
        # then applied as soon as backward finished its gradients (see [Note: early apply]).
        self.early_apply: Callable[[int], Apply] | None = None
        self._early: dict[int, Completion] = {}
        self._handles: list[Any] = []
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device; got {sorted(map(str, devices))}")
        self.cuda = next(iter(devices)).type == "cuda"
        self._side = torch.cuda.Stream() if self.cuda else None
        self._landed_events: dict[int, Any] = {}
        if self.cuda:
            for arena in self.arenas:
                _pin(arena)

    # -- hooks -----------------------------------------------------------------

    def attach_grad_hooks(self) -> None:
        for p in self.params:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def attach_forward_hooks(self, model: torch.nn.Module) -> None:
        """A pre-hook on each module with parameters here: land its slices before its forward."""
        for module in model.modules():
            mine = sorted({staged.index for p in module.parameters(recurse=False) if id(p) in self._ids
                           for staged, _seg in self.segments[self._ids[id(p)]]})
            if mine:
                self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(tuple(mine))))

    def add_handle(self, handle: Any) -> None:
        """A hook installed elsewhere that :meth:`detach` removes too."""
        self._handles.append(handle)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_pre_hook(self, slices: tuple[int, ...]) -> Callable[..., None]:
        def pre_hook(_module: torch.nn.Module, _args: Any) -> None:
            inflight = self.inflight
            if inflight is not None:
                for k in slices:
                    if k not in inflight.landed and k in inflight.applies:
                        self.land(k)

        return pre_hook

    def gradient_ready(self, p: torch.Tensor) -> None:
        """``p.grad`` is final (a hook outside the pipeline saw it, as FSDP2's): stage it now."""
        self._on_grad(p)

    def _on_grad(self, p: torch.Tensor) -> None:
        if self.phase is not Phase.STAGING:
            self._begin_staging()
        self.stage(self._ids[id(p)], p)

    # -- staging -----------------------------------------------------------------

    def _begin_staging(self) -> None:
        """First gradient of a step: the device may start reading state (in apply order)."""
        self.phase = Phase.STAGING
        if not self._prefetched:
            self._prefetched = True
            # Loads follow the order the applies will come in (see engine's [Note: the slot
            # pipeline]): backward order when slices are applied as backward finishes them.
            order = reversed(self.forward_order) if self.early_apply is not None else self.forward_order
            self._prefetch_order = tuple(k for k in order if self.slice_params[k])
            self.device.submit(Prefetch(self._prefetch_order))

    def stage(self, i: int, p: torch.Tensor) -> None:
        """Copy (or, after an offloaded micro-batch, add) parameter i's gradient into staging."""
        grad = p.grad
        if grad is None:
            return
        if grad.is_sparse or grad.shape != p.shape:
            raise ValueError(
                f"the gradient of {self.names[i]!r} has shape {tuple(grad.shape)}{' (sparse)' if grad.is_sparse else ''}, "
                f"expected {tuple(p.shape)} dense; nothing was updated"
            )
        start = time.monotonic_ns()
        if self._early and any(staged.index in self._early for staged, _seg in self.segments[i]):
            self._cancel_early(i)
        self._wait_staging_free(i)
        arena = self.arenas[self.current].bytes
        flat = grad.detach().reshape(-1)
        accumulate = self.staged[i] and self.offload_gradients
        stream = torch.cuda.stream(self._side) if self.cuda else contextlib.nullcontext()
        if self.cuda:
            assert self._side is not None
            self._side.wait_stream(torch.cuda.current_stream())
        with stream:
            for staged, seg in self.segments[i]:
                view = self.layout.grad_view(arena, seg, staged)
                piece = flat[seg.start : seg.start + seg.length]
                if accumulate:
                    # A blocking copy: the host adds it at once, so it must have arrived.
                    view.add_(piece.to(view.device))
                else:
                    view.copy_(piece, non_blocking=self.cuda)
        # The global norm is taken over each whole gradient, the way sync mode does,
        # so both modes compute the same clip scale to the last bit.
        if accumulate or not self.need_norms:
            self.norms[i] = None  # computed from staging at step(), if needed
        else:
            self.norms[i] = _norm(grad)
        first = not self.staged[i]
        self.staged[i] = True
        if self.offload_gradients:
            if self.cuda:
                assert self._side is not None
                grad.record_stream(self._side)
            p.grad = None
        self.trace.add("link", f"grad {self.names[i]}", start, time.monotonic_ns())
        if first:
            for staged, _seg in self.segments[i]:
                self._remaining[staged.index] -= 1
                if self._remaining[staged.index] == 0:
                    self.device.submit(Stage(staged.index))
                    if self.early_apply is not None:
                        self._early[staged.index] = self.device.submit(self.early_apply(staged.index))

    # [Note: early apply]
    # Without global-norm clipping nothing rescales the gradients, so a slice can be
    # updated as soon as backward has finished its gradients: no barrier at step().
    # It is speculative: the new state goes to the slice's other generation and the
    # new weights to staging, and neither counts until step() commits. If step()
    # finds a non-finite gradient, Abort drops them and the store keeps its last
    # commit. If another backward adds to a slice already applied (gradient
    # accumulation), the early applies of the step are dropped the same way and the
    # optimizer falls back to applying at step() from then on.

    def _cancel_early(self, i: int) -> None:
        warnings.warn(
            f"the gradient of {self.names[i]!r} was accumulated over several backward passes after its slice "
            "had been applied; nearstep now waits for step() before applying (gradient accumulation detected)",
            RuntimeWarning,
            stacklevel=4,
        )
        self.early_apply = None
        for done in self._early.values():
            try:
                done.wait()
            except BaseException:
                pass  # dropped below either way
        self._early.clear()
        self.device.submit(Abort())
        self._prefetch_order = tuple(k for k in self.forward_order if self.slice_params[k])
        self.device.submit(Prefetch(self._prefetch_order))

    def _wait_staging_free(self, i: int) -> None:
        """Staging of a slice is reused only after the device finished reading it."""
        inflight = self.inflight
        if inflight is None or inflight.arena != self.current:
            return
        for staged, _seg in self.segments[i]:
            done = inflight.applies.get(staged.index)
            if done is not None and not done.done():
                start = time.monotonic_ns()
                done.wait()
                self.trace.add("compute", f"wait s{staged.index}", start, time.monotonic_ns())

    def stage_rest(self, present: Sequence[int]) -> None:
        """Stage the gradients no hook staged (sync mode, or parameters without hooks).

        On return every staged gradient is in host memory (norms may read it).
        """
        if self.phase is not Phase.STAGING:
            self._begin_staging()  # the device reads state while the host copies gradients
        for i in present:
            if not self.staged[i]:
                self.stage(i, self.params[i])
        if self._side is not None:
            self._side.synchronize()

    def grad_norm(self, i: int) -> torch.Tensor:
        norm = self.norms[i]
        if norm is None:
            p = self.params[i]
            if p.grad is not None and not self.offload_gradients:
                norm = _norm(p.grad)
            else:
                arena = self.arenas[self.current].bytes
                pieces = [self.layout.grad_view(arena, seg, staged) for staged, seg in self.segments[i]]
                norm = _norm(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
            self.norms[i] = norm
        return norm

    def has_gradient(self, i: int) -> bool:
        return self.staged[i] or self.params[i].grad is not None

    # -- launching and landing ----------------------------------------------------------

    def launch(self, step: int, updated: Sequence[int], hypers: tuple[kernels.Hyper, ...], param_steps: Sequence[int],
               scale: float, guards: kernels.Guards, commit: Commit) -> InFlight:
        """Queue the updates of every slice in forward order and the commit; returns at once."""
        if self.cuda:
            assert self._side is not None
            self._side.synchronize()  # the device reads the gradients from host memory
            for event in self._landed_events.values():
                event.synchronize()  # the device overwrites the staging weights
            self._landed_events.clear()
        has = frozenset(updated)
        if self._prefetched:
            order = list(self._prefetch_order)
        else:
            order = [k for k in self.forward_order if self.slice_params[k] & has]
            self.device.submit(Prefetch(tuple(order)))
        arena_id = self.arenas[self.current].id
        applies = {}
        for k in order:
            if k in self._early:
                applies[k] = self._early[k]
                continue
            steps = tuple(param_steps[s.param] if s.param in has else 0 for s in self.layout.slices[k].segments)
            applies[k] = self.device.submit(Apply(k, hypers, steps, scale, guards, arena_id))
        inflight = InFlight(step, self.current, applies, self.device.submit(commit), has)
        self.inflight = inflight
        self.phase = Phase.LAUNCHED
        self._reset_staging()
        self.current = (self.current + 1) % len(self.arenas)
        return inflight

    def _reset_staging(self) -> None:
        self.staged = [False] * len(self.params)
        self.norms = [None] * len(self.params)
        self._remaining = [len(m) for m in self.slice_params]
        self._prefetched = False
        self._early = {}

    def abort(self) -> None:
        """The step is skipped: forget its staged gradients, release prefetched slots."""
        if self._prefetched:
            self.device.submit(Abort())
        for i in range(len(self.params)):
            if self.staged[i] and self.offload_gradients:
                self.params[i].grad = None
        self._reset_staging()
        self.phase = Phase.LAUNCHED if self.inflight is not None else Phase.IDLE

    def land(self, k: int) -> None:
        """Wait for slice k's update and copy its new weights into the parameters."""
        inflight = self.inflight
        assert inflight is not None
        start = time.monotonic_ns()
        try:
            inflight.reports[k] = inflight.applies[k].wait()
        except BaseException:
            self._fail()
            raise
        waited = time.monotonic_ns()
        if waited - start > 20_000:
            self.trace.add("compute", f"wait s{k}", start, waited)
        arena = self.arenas[inflight.arena].bytes
        staged = self.layout.slices[k]
        with torch.no_grad():
            for seg in staged.segments:
                if seg.param in inflight.updated:
                    flat = self.params[seg.param].view(-1)
                    flat[seg.start : seg.start + seg.length].copy_(self.layout.weight_view(arena, seg, staged), non_blocking=self.cuda)
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
            self._landed_events[k] = event
        inflight.landed.add(k)
        self.trace.add("link", f"weights s{k}", waited, time.monotonic_ns())

    def finish(self) -> InFlight | None:
        """Land every slice of the launched step and wait for its commit.

        If any part of it failed, the model's weights are rolled back to the
        store's last committed step and the error is raised.
        """
        inflight = self.inflight
        if inflight is None:
            return None
        start = time.monotonic_ns()
        if not inflight.landed:
            # Nothing has reached the model yet: keep it that way until the step is
            # durable, so a failure leaves model and store at the same step.
            try:
                for done in (*inflight.applies.values(), inflight.commit):
                    done.wait()
            except BaseException:
                self._fail()
                raise
        for k in inflight.applies:
            if k not in inflight.landed:
                self.land(k)
        try:
            inflight.commit.wait()
        except BaseException:
            self._fail()
            raise
        if time.monotonic_ns() - start > 20_000:
            self.trace.add("compute", "wait commit", start, time.monotonic_ns())
        self.inflight = None
        if self.phase is Phase.LAUNCHED:
            self.phase = Phase.IDLE
        return inflight

    def _fail(self) -> None:
        """A launched step failed: drain it, and put the committed weights back into the model."""
        inflight, self.inflight = self.inflight, None
        if inflight is None:
            return
        for done in (*inflight.applies.values(), inflight.commit):
            try:
                done.wait()
            except BaseException:
                pass
        self.phase = Phase.STAGING if self.phase is Phase.STAGING else Phase.IDLE
        # The step counters go back to the store's last commit in any case; the weights
        # only if some new ones already reached the model.
        self._rollback(bool(inflight.landed))

