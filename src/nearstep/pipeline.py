"""The host side of a step: staging slices, backward and forward hooks, landing weights.

One step moves through three phases (see ``docs/design.md``, "One step in
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

[Note: speculation then validation]
In overlap and delayed mode a slice is applied as soon as backward finished its
gradients (``Apply`` with a clip scale of 1), before anything global is known.
That is a speculation: the new state goes to the slice's uncommitted generation
and its new weights to staging, and ``step()`` validates it. It is dropped
(``Abort``; the committed generation is the rollback) and the slice applied again
at ``step()`` when the global gradient norm clips (``max_grad_norm``), when a
gradient is not finite, when a gradient was changed after it was staged (framework
clipping such as HF Trainer's or Lightning's ``clip_grad_norm_``, GradScaler's
unscale, any in-place edit of ``p.grad`` or a new ``p.grad`` tensor), or when a
weight it read was written by the user. A staged gradient counts as changed when
``p.grad`` is another tensor or its version counter moved *and* its values differ
from the staged copy: ``clip_grad_norm_`` multiplies by exactly 1.0 when it does
not clip, which moves the counter but changes no bit, and the speculation stands.
It is dropped too when the hyperparameters or guards of the step differ from those
the speculative applies used (a learning rate set after backward, before ``step()``).
After two misses in a row the pipeline stops speculating for ten steps (the redo
reads the state a second time), then tries again; when that first try misses
too, the pause doubles (up to 160 steps), and a speculation that stands resets it.

[Note: the model's weights are the truth]
Between steps the parameters hold what the user sees and what torch would update:
weights written into them after they last landed (``model.load_state_dict``, an
in-place edit under ``no_grad``, ``p.data = ...``) are noticed by the tensor's
version counter or storage pointer and sent to the device with the next
``Apply`` of their slice (``adopt``), which puts them into the master before the
kernel runs. Writes through ``p.data.copy_()`` bypass the version counter and are
not seen. A write to a parameter whose new weights have not landed yet (overlap
mode, between ``step()`` and the module's forward) would be overwritten by the
landing; it raises :class:`~nearstep.StaleWeightError` instead.

[Note: landing before any read]
A forward pre-hook on a module lands its own parameters' slices, and those of
child modules that never run their own forward (an ``nn.ParameterList`` read by
its parent, a submodule whose ``forward`` is called directly): which modules run
is learnt from the hooks themselves during the first forward, which needs no
landing. Reads outside any forward (EMA, logging, saving by hand) are the user's
to order: ``opt.synchronize()`` first, or ``check_reads=True`` (or the
environment variable ``NEARSTEP_CHECK_READS=1``) to make any such stale read
raise while testing.

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
import itertools
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.overrides import TorchFunctionMode

from . import rules
from .protocol import Abort, Apply, Commit, Completion, Device, DeviceMemory, Lane, Prefetch, Stage
from .errors import StaleWeightError
from .interrupts import interrupts_deferred
from .image import StagedSegment
from .staging import StagedSlice, StagingLayout
from .trace import Trace
from .cores import CoreLending

__all__ = ["Phase", "InFlight", "PipelineConfig", "StepInputs", "Pipeline", "ReadCheck"]

# A miss streak this long pauses speculation for _PAUSE_STEPS launches, doubled (up to _MAX_PAUSE_STEPS)
# each time the first speculation after a pause misses again (see [Note: speculation then validation]).
_MISS_STREAK = 2
_PAUSE_STEPS = 10
_MAX_PAUSE_STEPS = 160


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineConfig:
    """How a pipeline moves a step (fixed for its life; the optimizer builds a new one to change it).

    Attributes:
        arenas: staging arenas: 1, or 2 in delayed mode (a step stages while the last lands).
        offload_gradients: free each ``p.grad`` once staged (accumulating micro-batches in staging).
        need_norms: take each gradient's norm while staging it (clipping or ``skip_nonfinite``).
        speculate: apply each slice as soon as backward finished it, before ``step()`` validates
            the step (see [Note: speculation then validation]); overlap and delayed mode.
        track_weights: notice weights written between steps (see [Note: the model's weights are the
            truth]); off with many ranks, whose pieces are views the other ranks' weights land in.
    """

    arenas: int = 1
    offload_gradients: bool = False
    need_norms: bool = True
    speculate: bool = False
    track_weights: bool = True

    def __post_init__(self) -> None:
        if self.arenas not in (1, 2):
            raise ValueError(f"arenas must be 1 or 2, got {self.arenas!r}")


class StepInputs(NamedTuple):
    """What an update needs from the optimizer, read when the update is queued (a scheduler may have
    changed the learning rate since the last step)."""

    hypers: tuple[rules.Hyper, ...]  # per param group
    param_steps: Sequence[int]  # per parameter, its committed step count
    guards: rules.Guards


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
    updated: frozenset[int]  # parameters that had a gradient or were adopted (their segments land)
    landed: set[int] = field(default_factory=set)
    reports: dict[int, list[rules.SegmentReport]] = field(default_factory=dict)


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
        config: PipelineConfig,
        *,
        step_inputs: Callable[[], StepInputs],
        on_failure: Callable[[bool, int | None], int | None],
    ) -> None:
        """``step_inputs`` gives the hyperparameters, step counts and guards of the step being staged;
        ``on_failure(weights_reached_model, step)`` puts the model and the optimizer at the store's
        committed step after the launched ``step`` failed, and returns that step (None when the
        store cannot be read): see :meth:`_fail`."""
        self.params = list(params)
        self.config = config
        self._ids = {id(p): i for i, p in enumerate(self.params)}
        self.names = list(names)
        self.layout = layout
        self.device = device
        self.trace = trace
        self._step_inputs = step_inputs
        self._on_failure = on_failure
        self.arenas = [device.alloc(layout.nbytes) for _ in range(config.arenas)]
        self.current = 0
        self.phase = Phase.IDLE
        self.inflight: InFlight | None = None
        # param -> [(slice, segment)], slice -> the params with state in it
        self.segments: list[list[tuple[StagedSlice, StagedSegment]]] = [[] for _ in self.params]
        self.slice_params: list[set[int]] = []
        for staged in layout.slices:
            members = set()
            for seg in staged.segments:
                self.segments[seg.param].append((staged, seg))
                members.add(seg.param)
            self.slice_params.append(members)
        # Slices are formed in backward order, but a grown store appends slices: order by parameter.
        self.forward_order = [s.index for s in sorted(layout.slices, key=lambda s: (min(g.param for g in s.segments), -s.index))]
        self.staged = [False] * len(self.params)
        self.norms: list[torch.Tensor | None] = [None] * len(self.params)
        self._remaining = self._trainable_counts()
        self._prefetched = False
        self._prefetch_order: tuple[int, ...] = ()
        # Each slice is applied as soon as backward finished its gradients (see [Note: speculation
        # then validation]) until gradient accumulation shows up.
        self._speculate = config.speculate
        self._early: dict[int, Completion] = {}
        self._early_inputs: tuple[Any, ...] | None = None  # the hyperparameters and guards they used
        self._launches = 0
        self._miss_streak = 0
        self._paused_until = 0
        self._pause = _PAUSE_STEPS
        self.counters = {"speculated_steps": 0, "speculation_misses": 0, "gradients_changed_after_staging": 0,
                         "weights_adopted": 0}
        # What each staged gradient and each parameter's weights were when last seen (tensor, version).
        self._grad_seen: list[tuple[Any, int] | None] = [None] * len(self.params)
        self._adopted_early: set[int] = set()
        self._adopting: set[int] = set()  # parameters whose weights this step's applies adopt
        self._weights_seen: list[tuple[int, int]] = [(0, -1)] * len(self.params)
        self.note_weights()
        self._handles: list[Any] = []
        self._hooked: set[int] = set()
        self._owned: dict[int, frozenset[int]] = {}  # id(module) -> the parameters it holds itself
        self._called: set[int] = set()
        self._landing_sets: dict[int, tuple[int, ...]] = {}
        self._pending: dict[int, int] = {}  # id(param) -> slices of it not landed (for ReadCheck)
        self.landing = False
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device; got {sorted(map(str, devices))}")
        self.cuda = next(iter(devices)).type == "cuda"
        self._side = torch.cuda.Stream() if self.cuda else None
        self._landed_events: dict[int, Any] = {}
        if self.cuda:
            for arena in self.arenas:
                _pin(arena)
        # The loop's threads on the device's cores while it is idle (see [Note: lending cores to
        # the loop] in cores.py); the optimizer sets it where the device lends them.
        self.lending: CoreLending | None = None

    def _trainable_counts(self) -> list[int]:
        return [sum(1 for i in members if self.params[i].requires_grad) for members in self.slice_params]

    # -- hooks -----------------------------------------------------------------

    def attach_grad_hooks(self) -> None:
        """A post-accumulate-grad hook on every parameter that requires grad and has none yet.

        Called again at each step, so parameters unfrozen later get theirs too.
        """
        for i, p in enumerate(self.params):
            if p.requires_grad and i not in self._hooked and self.segments[i]:
                self._hooked.add(i)
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook))

    def attach_forward_hooks(self, model: torch.nn.Module) -> None:
        """A pre-hook on each module that holds parameters here: land their slices before its forward.

        See [Note: landing before any read].
        """
        for module in model.modules():
            self._owned[id(module)] = frozenset(self._ids[id(p)] for p in module.parameters(recurse=False) if id(p) in self._ids)
        for module in model.modules():
            if any(id(p) in self._ids for p in module.parameters()):
                self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(module)))

    def add_handle(self, handle: Any) -> None:
        """A hook installed elsewhere that :meth:`detach` removes too."""
        self._handles.append(handle)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        if self.lending is not None:
            self.lending.close()

    def _device_busy(self) -> None:
        if self.lending is not None:
            self.lending.device_busy()

    def poll_lending(self) -> None:
        """Give the loop the device's cores back once the device has finished what was queued."""
        lending = self.lending
        if lending is None or not lending.busy:
            return
        inflight = self.inflight
        if (inflight is None or inflight.commit.done()) and all(done.done() for done in self._early.values()):
            lending.device_idle()

    def _landing_set(self, module: torch.nn.Module) -> tuple[int, ...]:
        key = id(module)
        cached = self._landing_sets.get(key)
        if cached is not None:
            return cached
        params: set[int] = set()

        def collect(m: torch.nn.Module) -> None:
            params.update(self._owned.get(id(m), ()))
            for child in m.children():
                if id(child) not in self._called:
                    collect(child)

        collect(module)
        slices = tuple(sorted({staged.index for i in params for staged, _seg in self.segments[i]}))
        self._landing_sets[key] = slices
        return slices

    def _make_pre_hook(self, module: torch.nn.Module) -> Callable[..., None]:
        ref = weakref.ref(self)
        key = id(module)

        # Kept out of dynamo's tracing: its decisions depend on which step is in flight,
        # which a compiled graph would freeze at trace time.
        @torch.compiler.disable
        def pre_hook(mod: torch.nn.Module, _args: Any) -> None:
            pipeline = ref()
            if pipeline is None:
                return
            if key not in pipeline._called:
                pipeline._called.add(key)
                pipeline._landing_sets.clear()
            if pipeline.inflight is not None:
                try:
                    pipeline._land_slices(pipeline._landing_set(mod))
                except KeyboardInterrupt as exc:
                    pipeline.settle(exc)
                    raise
            pipeline.poll_lending()

        return pre_hook

    def gradient_ready(self, p: torch.Tensor) -> None:
        """``p.grad`` is final (a hook outside the pipeline saw it, as FSDP2's): stage it now."""
        self._on_grad(p)

    @torch.compiler.disable
    def _grad_hook(self, p: torch.Tensor) -> None:
        self._on_grad(p)

    def _on_grad(self, p: torch.Tensor) -> None:
        try:
            if self.phase is not Phase.STAGING:
                self._begin_staging()
            i = self._ids[id(p)]
            if self.staged[i] and self._early and any(staged.index in self._early for staged, _seg in self.segments[i]):
                self._cancel_early(i)
            self.stage(i, p)
        except KeyboardInterrupt as exc:
            # A Ctrl-C in backward reaches Python in a hook, often this one (staging, an early
            # apply's send): drop what was staged, so the loop can redo this batch.
            self.settle(exc)
            raise
        self.poll_lending()

    # -- staging -----------------------------------------------------------------

    def _speculating(self) -> bool:
        return self._speculate and self._launches >= self._paused_until

    def _begin_staging(self) -> None:
        """First gradient of a step: the device may start reading state (in apply order)."""
        self.phase = Phase.STAGING
        self._remaining = self._trainable_counts()
        if not self._prefetched:
            self._prefetched = True
            # Loads follow the order the applies will come in (see engine's [Note: the slot
            # pipeline]): backward order when slices are applied as backward finishes them.
            order = reversed(self.forward_order) if self._speculating() else self.forward_order
            self._prefetch_order = tuple(k for k in order if self._remaining[k])
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
        self._wait_staging_free(i)
        arena = self.arenas[self.current].bytes
        flat = grad.detach().reshape(-1)
        accumulate = self.staged[i] and self.config.offload_gradients
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
        if accumulate or not self.config.need_norms:
            self.norms[i] = None  # computed from staging at step(), if needed
        else:
            self.norms[i] = _norm(grad)
        first = not self.staged[i]
        self.staged[i] = True
        if self.config.offload_gradients:
            if self.cuda:
                assert self._side is not None
                grad.record_stream(self._side)
            p.grad = None
            self._grad_seen[i] = None
        else:
            self._grad_seen[i] = (grad, grad._version)
        self.trace.add(Lane.LINK, f"grad {self.names[i]}", start, time.monotonic_ns())
        if first:
            for staged, _seg in self.segments[i]:
                self._remaining[staged.index] -= 1
                if self._remaining[staged.index] == 0:
                    self.device.submit(Stage(staged.index))
                    if self._speculating():
                        self._submit_early(staged.index)

    def _submit_early(self, k: int) -> None:
        inflight = self.inflight
        if inflight is not None and inflight.arena == self.current and k in inflight.applies and k not in inflight.landed:
            self.land(k)  # the early apply posts new weights where the last step's still wait
        if k not in self._prefetch_order:
            self._prefetch_order += (k,)
            self.device.submit(Prefetch((k,)))
        # No clip scale yet: step() validates the step and redoes the slice if it clips.
        staged = {i for i in self.slice_params[k] if self.staged[i]}
        adopt = self._adopt_flags(k, self.edited_weights(self.slice_params[k]))
        self._device_busy()
        inputs = self._step_inputs()
        self._early[k] = self.device.submit(self._apply_request(k, inputs, staged, 1.0, adopt))
        if self._early_inputs is None:
            self._early_inputs = (inputs.hypers, inputs.guards)
        elif self._early_inputs != (inputs.hypers, inputs.guards):
            self._early_inputs = ("mixed",)  # changed during backward: never matches step()'s

    def speculated_with_other_inputs(self, inputs: StepInputs) -> bool:
        """Whether the speculative applies of this step used other hyperparameters or guards than
        ``inputs`` (the step's, at ``step()``): then they are dropped and redone."""
        return bool(self._early) and self._early_inputs != (inputs.hypers, inputs.guards)

    def _cancel_early(self, i: int) -> None:
        warnings.warn(
            f"the gradient of {self.names[i]!r} was accumulated over several backward passes after its slice "
            "had been applied; nearstep now waits for step() before applying (gradient accumulation detected)",
            RuntimeWarning,
            stacklevel=5,
        )
        self._speculate = False
        self.drop_early()

    def drop_early(self) -> None:
        """Drop the speculative applies of this step; the slices are applied again at ``step()``."""
        if not self._early:
            return
        for done in self._early.values():
            try:
                done.wait()
            except BaseException:
                pass  # dropped below either way
        self._early.clear()
        self._early_inputs = None
        for i in self._adopted_early:
            self._weights_seen[i] = (0, -1)  # the adoption was dropped with the apply: adopt again
        self._adopted_early.clear()
        self._adopting.clear()
        # The committed generation is the rollback: Abort forgets the uncommitted writes.
        self.device.submit(Abort())
        self._prefetch_order = tuple(k for k in self.forward_order if self._remaining_any(k))
        self.device.submit(Prefetch(self._prefetch_order))

    def _remaining_any(self, k: int) -> bool:
        return any(self.staged[i] or self.params[i].requires_grad for i in self.slice_params[k])

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
                self.trace.add(Lane.COMPUTE, f"wait s{staged.index}", start, time.monotonic_ns())

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

    def revalidate(self, present: Sequence[int]) -> tuple[list[int], list[int]]:
        """``step()``: are the staged gradients still the parameters' gradients?

        Returns (changed, removed): gradients edited or replaced after they were staged
        (now staged again, their speculative applies dropped), and gradients the user set
        to None after they were staged (no longer staged). See [Note: speculation then validation].
        """
        changed: list[int] = []
        removed: list[int] = []
        for i in present:
            seen = self._grad_seen[i]
            if not self.staged[i] or seen is None:
                continue  # not staged by a hook, or offloaded (p.grad was freed at staging)
            grad = self.params[i].grad
            if grad is None:
                removed.append(i)
            elif grad is not seen[0] or grad._version != seen[1]:
                if self._same_as_staged(i, grad):
                    self._grad_seen[i] = (grad, grad._version)
                else:
                    changed.append(i)
        if not changed and not removed:
            return changed, removed
        self.counters["gradients_changed_after_staging"] += 1
        if any(staged.index in self._early for i in changed + removed for staged, _seg in self.segments[i]):
            self.drop_early()
        for i in removed:
            self.staged[i] = False
            self.norms[i] = None
            self._grad_seen[i] = None
        for i in changed:
            self.stage(i, self.params[i])
        if self._side is not None:
            self._side.synchronize()
        return changed, removed

    def _same_as_staged(self, i: int, grad: torch.Tensor) -> bool:
        arena = self.arenas[self.current].bytes
        flat = grad.detach().reshape(-1)
        for staged, seg in self.segments[i]:
            view = self.layout.grad_view(arena, seg, staged)
            piece = flat[seg.start : seg.start + seg.length].to(device=view.device, dtype=view.dtype)
            if not torch.equal(view, piece):
                return False
        return True

    def restore_gradients(self) -> None:
        """Put the gradients staging holds back into ``p.grad`` where staging freed them (offload), and
        forget that they were staged: the step is staged afresh (a new device, after the store grew)."""
        if self._side is not None:
            self._side.synchronize()
        arena = self.arenas[self.current].bytes
        for i, p in enumerate(self.params):
            if self.staged[i] and self.config.offload_gradients:
                grad = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
                for staged, seg in self.segments[i]:
                    grad[seg.start : seg.start + seg.length].copy_(self.layout.grad_view(arena, seg, staged))
                p.grad = grad.view(p.shape)
            self.staged[i] = False

    def grad_norm(self, i: int) -> torch.Tensor:
        norm = self.norms[i]
        if norm is None:
            p = self.params[i]
            if p.grad is not None and not self.config.offload_gradients:
                norm = _norm(p.grad)
            else:
                arena = self.arenas[self.current].bytes
                pieces = [self.layout.grad_view(arena, seg, staged) for staged, seg in self.segments[i]]
                norm = _norm(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
            self.norms[i] = norm
        return norm

    def has_gradient(self, i: int) -> bool:
        return self.staged[i] or self.params[i].grad is not None

    @property
    def speculated(self) -> bool:
        """Whether some slice of this step was applied before ``step()``."""
        return bool(self._early)

    # -- the model's weights ------------------------------------------------------------

    def note_weights(self, params: Sequence[int] | None = None) -> None:
        """The parameters' current weights are the store's masters (after landing or loading)."""
        for i in range(len(self.params)) if params is None else params:
            p = self.params[i]
            self._weights_seen[i] = (p.data_ptr(), p._version)

    def mark_edited(self, params: Sequence[int]) -> None:
        """These parameters hold weights the store's masters do not have yet: adopt them at the next apply."""
        for i in params:
            self._weights_seen[i] = (0, -1)

    def edited_weights(self, params: Sequence[int] | set[int] | None = None) -> list[int]:
        """Parameters written since they last landed (see [Note: the model's weights are the truth])."""
        out = []
        for i in range(len(self.params)) if params is None else sorted(params):
            p = self.params[i]
            if self._weights_seen[i] != (p.data_ptr(), p._version) and self.segments[i]:
                out.append(i)
        return out

    def _adopt_flags(self, k: int, edited: Sequence[int]) -> tuple[bool, ...]:
        """Put the edited parameters' weights into slice k's weight staging; their flags for Apply."""
        staged = self.layout.slices[k]
        # A parameter split over several slices is adopted in each of them this step.
        wanted = set(edited) | self._adopting
        if not wanted:
            return ()
        flags = tuple(seg.param in wanted for seg in staged.segments)
        if any(flags):
            arena = self.arenas[self.current].bytes
            with torch.no_grad():
                for seg, flag in zip(staged.segments, flags):
                    if flag:
                        p = self.params[seg.param]
                        flat = p.detach().reshape(-1)
                        self.layout.weight_view(arena, seg, staged).copy_(flat[seg.start : seg.start + seg.length])
                        # The master takes these values with this apply: they are the store's now.
                        self._weights_seen[seg.param] = (p.data_ptr(), p._version)
                        self._adopting.add(seg.param)
                        if self.phase is Phase.STAGING:
                            self._adopted_early.add(seg.param)
            self.counters["weights_adopted"] += sum(flags)
        return flags

    def adopts_late(self, edited: Sequence[int]) -> bool:
        """Whether a speculative apply of this step ran on weights the user has written since."""
        return any(staged.index in self._early for i in edited for staged, _seg in self.segments[i])

    # -- launching and landing ----------------------------------------------------------

    def _apply_request(self, k: int, inputs: StepInputs, has: set[int] | frozenset[int], scale: float,
                       adopt: tuple[bool, ...]) -> Apply:
        """The update of slice k: the parameters in ``has`` take their next step, the others none."""
        steps = tuple(inputs.param_steps[s.param] + 1 if s.param in has else 0 for s in self.layout.slices[k].segments)
        return Apply(k, inputs.hypers, steps, scale, inputs.guards, self.arenas[self.current].id, adopt)

    def launch(self, step: int, updated: Sequence[int], scale: float, commit: Commit,
               edited: Sequence[int] = ()) -> InFlight:
        """Queue the updates of every slice in forward order and the commit; returns at once.

        ``updated``: the parameters with a gradient this step; ``scale``: the clip scale.
        ``edited``: parameters whose weights the user wrote since they last landed; their
        masters take the new weights (the slices are applied even without gradients).
        """
        if self.cuda:
            assert self._side is not None
            self._side.synchronize()  # the device reads the gradients from host memory
            for event in self._landed_events.values():
                event.synchronize()  # the device overwrites the staging weights
            self._landed_events.clear()
        has = frozenset(updated)
        touched = has | frozenset(edited) | frozenset(self._adopting)
        wanted = [k for k in self.forward_order if self.slice_params[k] & touched]
        if self._prefetched:
            order = list(self._prefetch_order)
            extra = [k for k in wanted if k not in order]
            if extra:
                # Parameters without a hook that got a gradient (unfrozen since), or edited weights:
                # loaded after the announced ones, in the order they are applied.
                self.device.submit(Prefetch(tuple(extra)))
                order += extra
        else:
            order = wanted
            self.device.submit(Prefetch(tuple(order)))
        inputs = self._step_inputs()
        applies: dict[int, Completion] = {}
        self._device_busy()
        if self._early:
            self.counters["speculated_steps"] += 1
            self._miss_streak = 0
            self._pause = _PAUSE_STEPS  # it pays again: back to short pauses
        try:
            for k in order:
                if k in self._early:
                    applies[k] = self._early[k]
                    continue
                adopt = self._adopt_flags(k, edited)
                applies[k] = self.device.submit(self._apply_request(k, inputs, has, scale, adopt))
            touched |= frozenset(self._adopting)
            commit_done = self.device.submit(commit)
        except BaseException as exc:
            # Interrupted (Ctrl-C) or refused before the commit was queued: the device drops
            # what it applied (Abort follows those applies in its queue), nothing lands.
            self._abandon(applies, exc, step)
            raise
        inflight = InFlight(step, self.current, applies, commit_done, touched)
        self.inflight = inflight
        self.phase = Phase.LAUNCHED
        for k in applies:
            for seg in self.layout.slices[k].segments:
                if seg.param in touched:
                    pid = id(self.params[seg.param])
                    self._pending[pid] = self._pending.get(pid, 0) + 1
        self._reset_staging()
        self._launches += 1
        self.current = (self.current + 1) % len(self.arenas)
        return inflight

    def _abandon(self, applies: dict[int, Completion], exc: BaseException, step: int) -> None:
        """A launch that failed before its commit was queued: drop its applies on the device."""
        aborted = self.device.submit(Abort())
        for done in (*applies.values(), aborted):
            try:
                done.wait()
            except BaseException:
                pass
        self.abort()
        committed = self._on_failure(False, step)
        tell_committed_step(exc, committed, step)

    def missed(self) -> None:
        """The step's speculation failed validation (clipping, a non-finite or edited gradient)."""
        self.counters["speculation_misses"] += 1
        resumed = self._paused_until > 0 and self._launches == self._paused_until
        self._miss_streak += 1
        if resumed:
            # The first try after a pause missed: clipping still fires, wait twice as long.
            self._pause = min(2 * self._pause, _MAX_PAUSE_STEPS)
            self._paused_until = self._launches + self._pause
            self._miss_streak = 0
        elif self._miss_streak >= _MISS_STREAK:
            self._paused_until = self._launches + self._pause
            self._miss_streak = 0

    def _reset_staging(self) -> None:
        self.staged = [False] * len(self.params)
        self.norms = [None] * len(self.params)
        self._grad_seen = [None] * len(self.params)
        self._remaining = self._trainable_counts()
        self._prefetched = False
        self._early = {}
        self._early_inputs = None
        self._adopted_early = set()
        self._adopting = set()

    def abort(self) -> None:
        """The step is skipped: forget its staged gradients, release prefetched slots."""
        for i in self._adopted_early:
            self._weights_seen[i] = (0, -1)  # dropped with the step: adopt at the next one
        if self._prefetched:
            self.device.submit(Abort())
        for i in range(len(self.params)):
            if self.staged[i] and self.config.offload_gradients:
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
        except BaseException as exc:
            self._fail(exc)
            raise
        waited = time.monotonic_ns()
        if waited - start > 20_000:
            self.trace.add(Lane.COMPUTE, f"wait s{k}", start, waited)
        arena = self.arenas[inflight.arena].bytes
        staged = self.layout.slices[k]
        overwritten = []
        # A slice lands whole: a Ctrl-C during the copy is raised once the slice is in.
        with interrupts_deferred():
            self.landing = True
            try:
                with torch.no_grad():
                    for seg in staged.segments:
                        if seg.param in inflight.updated:
                            p = self.params[seg.param]
                            if self.config.track_weights and self._weights_seen[seg.param] != (p.data_ptr(), p._version):
                                overwritten.append(seg.param)
                            flat = p.view(-1)
                            flat[seg.start : seg.start + seg.length].copy_(self.layout.weight_view(arena, seg, staged), non_blocking=self.cuda)
                            self._weights_seen[seg.param] = (p.data_ptr(), p._version)
                            pid = id(p)
                            left = self._pending.get(pid, 1) - 1
                            if left > 0:
                                self._pending[pid] = left
                            else:
                                self._pending.pop(pid, None)
            finally:
                self.landing = False
            if self.cuda:
                event = torch.cuda.Event()
                event.record()
                self._landed_events[k] = event
            inflight.landed.add(k)
        self.trace.add(Lane.LINK, f"weights s{k}", waited, time.monotonic_ns())
        if overwritten:
            names = ", ".join(repr(self.names[i]) for i in sorted(set(overwritten))[:3])
            raise StaleWeightError(
                f"{names} {'was' if len(set(overwritten)) == 1 else 'were'} written while the update of step "
                f"{inflight.step} was still on its way to the model (overlap mode); the update has now overwritten "
                f"the write. Call opt.synchronize() before writing weights between step() and the next forward "
                f"(model.load_state_dict does so by itself)."
            )

    def pending(self, p: torch.Tensor) -> bool:
        """Whether parameter ``p`` waits for new weights of the launched step (not landed yet)."""
        return id(p) in self._pending

    def indices(self, params: Sequence[torch.Tensor]) -> list[int]:
        """The positions of these tensors among the pipeline's parameters (ValueError for another tensor)."""
        try:
            return [self._ids[id(p)] for p in params]
        except KeyError:
            raise ValueError("a tensor that is not one of this optimizer's parameters") from None

    def land_params(self, params: Sequence[int]) -> None:
        """Land the launched step's slices that hold these parameters (the rest land where they are read).

        For reads no forward pre-hook sees: see :meth:`NearstepOptimizer.land_weights`.
        """
        if self.inflight is None:
            return
        self._land_slices(sorted({staged.index for i in params for staged, _seg in self.segments[i]}))
        self.poll_lending()

    def _land_slices(self, slices: Sequence[int]) -> None:
        """Land those of ``slices`` that the launched step updates and that have not landed yet."""
        inflight = self.inflight
        for k in slices:
            if inflight is not None and k not in inflight.landed and k in inflight.applies:
                self.land(k)

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
            except BaseException as exc:
                self._fail(exc)
                raise
        error: StaleWeightError | None = None
        for k in inflight.applies:
            if k not in inflight.landed:
                try:
                    self.land(k)
                except StaleWeightError as exc:
                    error = error or exc  # every slice lands first
        try:
            inflight.commit.wait()
        except BaseException as exc:
            self._fail(exc)
            raise
        if time.monotonic_ns() - start > 20_000:
            self.trace.add(Lane.COMPUTE, "wait commit", start, time.monotonic_ns())
        self.inflight = None
        self._pending.clear()
        if self.phase is Phase.LAUNCHED:
            self.phase = Phase.IDLE
        self.poll_lending()
        if error is not None:
            raise error
        return inflight

    def _fail(self, exc: BaseException) -> None:
        """A launched step failed: drain it, bring the model and the optimizer to the store's
        committed step, and say in ``exc`` which step that is.

        [Note: a failure after the commit point]
        The rename of the manifest is the commit point, and the host hears of it only
        with the commit's completion. Whatever fails in between (Ctrl-C while step()
        waits, the device dying before its reply, the directory fsync failing after the
        rename) leaves a store that may already be at the launched step while nothing of
        it reached the model. So the store decides: the step counters are read back from
        its manifest, and the model takes the store's masters whenever the store is at
        the launched step or some new weights had landed. Model, optimizer and store then
        name the same step, and the error says which one.
        """
        inflight, self.inflight = self.inflight, None
        self._pending.clear()
        if inflight is None:
            return
        # A second Ctrl-C must not stop this half way (weights half reloaded): it is held,
        # and dropped, since ``exc`` is on its way to the training loop already.
        with interrupts_deferred(reraise=False):
            for done in (*inflight.applies.values(), inflight.commit):
                try:
                    done.wait()
                except BaseException:
                    pass
            self.phase = Phase.STAGING if self.phase is Phase.STAGING else Phase.IDLE
            # See [Note: a failure after the commit point].
            committed = self._on_failure(bool(inflight.landed), inflight.step)
            tell_committed_step(exc, committed, inflight.step)

    def settle(self, exc: BaseException) -> None:
        """A Ctrl-C (``exc``) reached nearstep's code: finish the launched step or drop the one being
        staged, so that model, optimizer and store agree, and say at which step in ``exc``."""
        with interrupts_deferred(reraise=False):
            if self.inflight is not None:
                try:
                    self.finish()
                except BaseException:
                    pass  # _fail brought model and optimizer to the committed step
            elif self.phase is Phase.STAGING:
                self.restore_gradients()  # offloaded gradients go back to p.grad: a retry stages them again
                self.abort()
            tell_committed_step(exc, self._on_failure(False, None), None)


def tell_committed_step(exc: BaseException, committed: int | None, launched: int | None) -> None:
    """Say in ``exc`` (a note, and ``exc.committed_step``) at which step the model, the
    optimizer and the store are after step ``launched`` failed (None: after an interrupt
    between steps or while one was staged)."""
    if committed is None:
        return
    try:
        exc.committed_step = committed  # type: ignore[attr-defined]
    except AttributeError:
        pass  # an exception type with __slots__: the note below still says it
    if launched is None:
        text = (f"nearstep: interrupted; the model's weights, the optimizer's step count and the store are all at "
                f"step {committed}. Continue from the batch of step {committed + 1}.")
    elif committed >= launched:
        text = (f"nearstep: step {launched} was committed before this error reached the training loop; the "
                f"model's weights, the optimizer's step count and the store are all at step {committed}. "
                f"Continue with the batch after the one of step {committed}.")
    else:
        text = (f"nearstep: step {launched} was not committed; the model's weights, the optimizer's step count "
                f"and the store are all at step {committed}. Continue from the batch of step {committed + 1}.")
    if text not in getattr(exc, "__notes__", ()):
        exc.add_note(text)


# Tensor attributes that do not read a parameter's values: reading them is never stale.
_METADATA = frozenset({
    "grad", "requires_grad", "shape", "dtype", "device", "is_leaf", "grad_fn", "ndim", "layout", "is_cuda",
    "is_sparse", "is_quantized", "is_meta", "names", "_version", "_base", "is_nested", "itemsize", "nbytes",
    "size", "dim", "numel", "nelement", "stride", "data_ptr", "element_size", "is_floating_point", "is_complex",
    "is_contiguous", "storage_offset", "requires_grad_", "register_hook", "register_post_accumulate_grad_hook",
    "retain_grad", "untyped_storage", "__hash__", "__len__", "__repr__", "__format__", "is_pinned", "get_device",
})


class ReadCheck(TorchFunctionMode):
    """Debugging aid: raise on any torch operation that reads a parameter still waiting for its new weights.

    Active for an overlap-mode optimizer made with ``check_reads=True`` (or with
    ``NEARSTEP_CHECK_READS=1`` in the environment), from its construction to its
    ``close()``. Costs a Python call per torch operation: for test runs, not for
    training. See [Note: landing before any read].
    """

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self._pipeline = weakref.ref(pipeline)

    def watch(self, pipeline: Pipeline) -> None:
        """Check this pipeline from now on (the optimizer made a new one)."""
        self._pipeline = weakref.ref(pipeline)

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        pipeline = self._pipeline()
        if pipeline is not None and pipeline._pending and not pipeline.landing and not torch.compiler.is_compiling():
            name = getattr(getattr(func, "__self__", None), "__name__", None) if getattr(func, "__name__", "") in ("__get__", "__set__") else getattr(func, "__name__", "")
            if name not in _METADATA:
                for value in itertools.chain(args, kwargs.values()):
                    for item in value if isinstance(value, (list, tuple)) else (value,):
                        if isinstance(item, torch.Tensor) and pipeline.pending(item):
                            raise StaleWeightError(
                                f"parameter {pipeline.names[pipeline._ids[id(item)]]!r} was read ({name}) before its "
                                f"new weights from step {pipeline.inflight.step if pipeline.inflight else '?'} landed "
                                f"(overlap mode): this read would see the previous step's weights. Call "
                                f"opt.synchronize() before reading weights outside a forward, or read it inside a "
                                f"module's forward."
                            )
        return func(*args, **kwargs)
