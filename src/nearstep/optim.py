"""The front end: ``torch.optim.Optimizer`` subclasses whose state lives on a store.

``nearstep.AdamW`` (and ``Adam``, ``SGD``, ``Lion``) replace their torch
counterparts in an unchanged training loop. The fp32 master weights and the
moments live in a store on the SSD, owned by a device (an emulated
computational-storage process by default). ``step()`` ships each slice's
gradients to the device, the device updates the slice next to its state, and
the new weights come back into the model's parameters.

NOTE: these classes subclass ``torch.optim.Optimizer`` so that LR schedulers,
``zero_grad`` and param groups work as users expect; ``self.state`` stays empty
because the state is on the store (``state_dict()`` reads it from there).
"""

from __future__ import annotations

import contextlib
import enum
import math
import numbers
import os
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from . import checkpoint, formats, rules
from .device import DeviceConfig, build_device, ensure_file_limit, parse_bytes
from .image import SliceImage, slot_count
from .distributed import Sharding, ShardingConfig, build_sharding
from .protocol import Commit, Completion, Device, Lane, LoadState, Query, QueryKind
from .staging import StagingLayout
from .cores import CoreLending
from .pipeline import (InFlight, Phase, Pipeline, PipelineConfig, ReadCheck, StepInputs, interrupts_deferred,
                       tell_committed_step)
from .sensitivity import SensitivityReport, sensitivity_report
from .trace import Trace
from .errors import DeviceDiedError, NearstepError, StoreError, StoreMismatchError, UnsupportedUsageError
from .store import (MANIFEST, MAX_SLICES, ParamSpec, PendingGroups, Store, auto_slice_mb, check_slice_count, is_positional_name,
                    param_specs, plan_slices)

__all__ = ["Mode", "NearstepOptimizer", "AdamW", "Adam", "SGD", "Lion", "ParamTelemetry", "default_store_path"]

class Mode(enum.StrEnum):
    """When an update reaches the model (see the README's "Modes"). A plain string names one too."""

    SYNC = "sync"  # inside step(): the baseline, torch's numbers
    OVERLAP = "overlap"  # just before each module's next forward: sync's numbers, the update overlapped
    DELAYED = "delayed"  # at the next step(): weights one step stale, after warmup_steps sync steps


@dataclass(frozen=True, slots=True)
class ParamTelemetry:
    """What the guards saw of one parameter in the last step (and in total).

    Attributes:
        name: the parameter's name.
        update_rms: RMS of its last weight update (nan unless telemetry or update_clip is on).
        update_to_weight: ||update|| / ||weight|| of its last update (nan likewise).
        spike_clipped: gradient elements spike-clipped, summed over all steps.
        update_clipped: steps in which update_clip scaled its update.
    """

    name: str
    update_rms: float
    update_to_weight: float
    spike_clipped: int
    update_clipped: int


def _store_dir(store: Any) -> Path:
    """``store=`` as a directory path; refused before anything is created when it cannot be one."""
    try:
        text = os.fspath(store)
    except TypeError:
        raise TypeError(f"store= must be a directory path, an open nearstep.Store or None, got {type(store).__name__}") from None
    if not str(text).strip():
        raise ValueError("store= is an empty path; pass a directory (created if new) or None for a fresh one under ./.nearstep/")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise StoreError(f"store={text!r} is a file, not a directory: a store is a directory. Pass a directory path "
                         f"(created if new), or move the file away.")
    return path


def default_store_path(kind: str) -> Path:
    """A fresh directory under ``./.nearstep/`` for a run that named no store."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(".nearstep") / f"{kind}-{stamp}-{os.getpid()}-{time.monotonic_ns() % 10**6:06d}"


def _split_names(params: Any) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Accept tensors, (name, tensor) pairs or group dicts of either; return groups and names."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or param-group dicts, not a single tensor; wrap it in a list")
    items = list(params)
    if not items:
        raise ValueError("the optimizer got an empty parameter list; pass model.parameters() or model.named_parameters()")
    groups = [dict(item) for item in items] if isinstance(items[0], dict) else [{"params": items}]
    names: list[list[str]] = []
    for g, group in enumerate(groups):
        entries = group["params"]
        entries = [entries] if isinstance(entries, torch.Tensor) else list(entries)
        tensors, group_names = [], []
        for i, entry in enumerate(entries):
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], torch.Tensor):
                group_names.append(str(entry[0]))
                tensors.append(entry[1])
            elif isinstance(entry, torch.Tensor):
                group_names.append(f"group{g}.param{i}")
                tensors.append(entry)
            else:
                raise TypeError(f"param group {g} entry {i} is a {type(entry).__name__}; expected a tensor or a (name, tensor) pair")
        group["params"] = tensors
        group.pop("param_names", None)
        names.append(group_names)
    return groups, names


class NearstepOptimizer(torch.optim.Optimizer):
    """Base of the nearstep optimizers; see :class:`AdamW` for the arguments."""

    kind: ClassVar[str]

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        store: str | os.PathLike | Store | None = None,
        mode: Mode | str = Mode.SYNC,
        max_grad_norm: float | None = None,
        guards: rules.Guards | None = None,
        device: DeviceConfig | str | None = None,
        slice_mb: float | None = None,
        model: torch.nn.Module | None = None,
        warmup_steps: int = 10,
        offload_gradients: bool = False,
        state_format: str | formats.StateFormat | None = None,
        process_group: Any = None,
        sharding: ShardingConfig | None = None,
        check_reads: bool | None = None,
        keep_snapshots: int = checkpoint.DEFAULT_KEEP_SNAPSHOTS,
        hooks: bool = True,
    ) -> None:
        if mode not in tuple(Mode):
            raise ValueError(f"mode must be 'sync', 'overlap' or 'delayed', got {mode!r}")
        mode = Mode(mode)
        if mode is Mode.OVERLAP and model is None and hooks:
            raise ValueError(
                "mode='overlap' needs the model, to wait for each module's new weights just before its "
                "forward: pass model=model (or use mode='sync')"
            )
        if not hooks and mode is Mode.DELAYED:
            raise ValueError("hooks=False is for sync and overlap mode (delayed mode lands at step(), so there is "
                             "nothing for the caller to land): use hooks=True")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        if slice_mb is not None and (isinstance(slice_mb, bool) or not isinstance(slice_mb, numbers.Real)
                                     or not (math.isfinite(slice_mb) and slice_mb > 0)):
            raise ValueError(f"slice_mb must be a positive, finite number of MiB or None (automatic), got {slice_mb!r}")
        if state_format is not None:
            state_format = formats.StateFormat.parse(state_format)  # a bad name fails here, before a store is made
        guards = rules.Guards() if guards is None else guards
        if not isinstance(guards, rules.Guards):
            raise TypeError(f"guards must be a nearstep.Guards, got {type(guards).__name__}")
        hyper_type = rules.KERNELS[self.kind]
        guards.check_for(hyper_type)
        if isinstance(device, str):
            device = DeviceConfig(backend=device)  # type: ignore[arg-type]
        device = DeviceConfig() if device is None else device
        if not isinstance(device, DeviceConfig):
            raise TypeError(f"device must be a nearstep.DeviceConfig, 'emulated', 'inline' or None, got {type(device).__name__}")

        groups, names = _split_names(params)
        if not any(group["params"] for group in groups):
            raise ValueError("every param group is empty: the optimizer has no parameters to update; pass "
                             "model.parameters() or model.named_parameters()")
        super().__init__(groups, defaults)
        self._check_params()
        for group in self.param_groups:
            self._hyper(group)  # validate every group's values up front

        self.mode = mode
        self.max_grad_norm = max_grad_norm
        self.guards = guards
        self.warmup_steps = warmup_steps
        self.keep_snapshots = keep_snapshots
        self._params: list[torch.Tensor] = [p for group in self.param_groups for p in group["params"]]
        self._names = [n for group_names in names for n in group_names]
        specs = param_specs([list(zip(gn, g["params"])) for gn, g in zip(names, self.param_groups)])
        self._slice_bytes = int((slice_mb or auto_slice_mb(specs)) * 2**20)
        # The optimizer works on this process's share (all of it on one rank; see distributed.py);
        # param_groups keep the model's parameters.
        self._ranks: Sharding = build_sharding(self._params, self._names, specs, model=model,
                                               process_group=process_group, config=sharding)
        self._params, self._names, specs = list(self._ranks.local_params), list(self._ranks.local_names), self._ranks.local_specs
        device = self._ranks.device_config(device)
        self._device_config = device  # _open_store checks its memory budget against the slices
        # Parameters frozen now stay dormant (no state) until their first gradient; many ranks
        # give every local piece state up front (see Sharding.alone).
        trainable = [p.requires_grad for p in self._params] if self._ranks.alone else None
        opened: list[PendingGroups | None] = []

        def open_one(path: Any) -> tuple[Store, bool]:
            got, was_resumed, pend = self._open_store(path, specs, hyper_type, state_format, trainable=trainable)
            opened.append(pend)
            return got, was_resumed

        self._store, resumed = self._ranks.open_store(store, lambda: default_store_path(self.kind), open_one)
        pending = opened[-1] if opened else None
        if pending is not None and pending.params and not self._ranks.alone:
            self._store.close()
            raise UnsupportedUsageError("with many ranks, the store must hold exactly the parameters given; "
                                        "add_param_group is not supported there")
        if not hooks and not self._ranks.alone:
            self._store.close()
            raise UnsupportedUsageError("hooks=False works on one rank; with many ranks use hooks=True and model=")
        self._closed = False
        self._device_config = device
        self._model = model
        self._hooks = hooks
        self._offload = offload_gradients and mode is not Mode.SYNC
        if self._offload and max_grad_norm is None:
            # Not an error: a loop that clips nothing is right as it is. But clip_grad_norm_
            # (HF Trainer's and Lightning's clipping) would see no gradient and clip nothing.
            warnings.warn(
                "offload_gradients=True frees each p.grad during backward, so code that reads or clips "
                "gradients between backward() and step() (torch.nn.utils.clip_grad_norm_, HF Trainer's "
                "max_grad_norm, Lightning's gradient_clip_val, GradScaler's unscale_ for fp16) sees none and "
                "does nothing. Clip with nearstep's max_grad_norm= (and train in bf16, not fp16 with a "
                "GradScaler), or leave offload_gradients off.",
                UserWarning, stacklevel=3,
            )
        if check_reads is None:
            check_reads = os.environ.get("NEARSTEP_CHECK_READS", "") not in ("", "0")
        self._read_check: ReadCheck | None = None
        self._want_read_check = bool(check_reads) and mode is Mode.OVERLAP and (model is not None or not hooks)
        try:
            manifest = self._store.manifest
            # Param groups an earlier run added with add_param_group and this one has not yet:
            # stand-ins hold their place until add_param_group supplies them (see add_param_group).
            self._standins = set(pending.params) if pending is not None else set()
            self._pending_hypers = [dict(manifest.hyperparameters[g]) for g in pending.groups] if pending is not None else []
            where = self._params[0].device
            for i in sorted(self._standins):
                spec = manifest.params[i]
                self._params.append(torch.zeros(spec.shape, dtype=spec.torch_dtype, device=where))
                self._names.append(spec.name)
            self._dormant = set(manifest.dormant)
            self._step = manifest.step
            self._param_steps = list(manifest.param_steps)
            self._counters = {"skipped_steps": 0, "spike_clipped": 0, "update_clipped": 0, **manifest.counters}
            self._spike_by_param = [0] * len(self._params)
            self._uclip_by_param = [0] * len(self._params)
            self._last = [(math.nan, math.nan)] * len(self._params)
            if resumed or self._store.manifest.format.lossy_master:
                # A lossy master format rounded the initial weights: the model starts from
                # what the store holds, as a resumed run would.
                self._load_masters_into_params()
            self._ranks.publish_all()  # every rank starts from the owners' weights
        except BaseException:
            self._store.close()
            raise
        self.trace = Trace(collect=self._device_events)
        self._device_failure_seen = False  # whether an error has told the loop that the device failed
        self._start()
        self._times = {"steps": 0, "step_seconds": 0.0, "wait_seconds": 0.0}
        self._opened_at = time.monotonic()  # for the drive-write pace (stats)
        self._clipped_steps = 0
        self._restarts = 0
        self._warned_rounding = False

    def _start(self) -> None:
        """Open the device on the store and build the pipeline and its hooks (at construction, and
        after the store grew: see [Note: growing the store])."""
        mode, model = self.mode, self._model
        self._layout = StagingLayout.from_manifest(self._store.manifest)
        try:
            self._device: Device = build_device(self._store, self._device_config)
        except BaseException:
            self._store.close()
            raise
        # Stop the device process even when the user forgets close().
        self._finalizer = weakref.finalize(self, _close_quietly, self._device, self._store)
        # Speculation then validation (see pipeline.py): with many ranks the clip scale is a
        # collective, so slices are applied early there only when nothing clips.
        config = PipelineConfig(
            arenas=2 if mode is Mode.DELAYED else 1,
            offload_gradients=self._offload,
            need_norms=self.max_grad_norm is not None or self.guards.skip_nonfinite,
            speculate=mode is not Mode.SYNC and (self._ranks.alone or self.max_grad_norm is None),
            track_weights=self._ranks.alone,
        )
        self._pipeline = Pipeline(self._params, self._names, self._layout, self._device, self.trace, config,
                                  step_inputs=self._step_inputs, on_failure=self._rollback)
        if self._device_config.lend_idle_cores:
            self._pipeline.lending = CoreLending(self._device.info.cores)
        if mode is not Mode.SYNC and self._hooks:
            self._pipeline.attach_grad_hooks()
            self._ranks.attach_grad_hooks(self._pipeline)
        if model is not None:
            if mode is Mode.OVERLAP and self._hooks:
                self._ranks.attach_forward_hooks(model, self._pipeline)
            # Whatever reads the weights through model.state_dict() sees the updated ones, and
            # whatever loads weights writes them after the last update landed.
            sync = _synchronizer(weakref.ref(self))
            self._pipeline.add_handle(model.register_state_dict_pre_hook(sync))
            self._pipeline.add_handle(model.register_load_state_dict_pre_hook(sync))
        if self._want_read_check:
            if self._read_check is None:
                self._read_check = ReadCheck(self._pipeline)
                self._read_check.__enter__()
            else:
                self._read_check.watch(self._pipeline)

    # [Note: growing the store]
    # A parameter frozen when the optimizer was built has no state on the store (it is
    # dormant: LoRA over model.named_parameters() stores the adapters only). When it gets
    # its first gradient, or when add_param_group adds parameters, the optimizer lands
    # the step in flight, stops the device, grows the store (new slice files written and
    # synced before the manifest that names them replaces the old one: a crash leaves
    # the store as it was before or after), and opens a new device on the grown store.
    # That costs a device start (a second or two), once per such change.

    def _restart(self, grow: Callable[[], Any]) -> None:
        """Stop the device, run ``grow`` on the store, start again on the grown store."""
        edited = self._pipeline.edited_weights()  # written by the user, not adopted yet: the new pipeline adopts them
        self._pipeline.detach()
        self._finalizer.detach()
        try:
            self._device.close()
        finally:
            if self._store.lock_fd < 0:  # the inline device closes the store it ran on
                self._store = Store.open(self._store.path)
        try:
            grow()
        finally:
            manifest = self._store.refresh()
            self._dormant = set(manifest.dormant)
            self._param_steps = list(manifest.param_steps)
            grown = len(self._params) - len(self._spike_by_param)
            self._spike_by_param += [0] * grown
            self._uclip_by_param += [0] * grown
            self._last += [(math.nan, math.nan)] * grown
            self._restarts += 1
            self._start()
            self._pipeline.mark_edited(edited)

    def _revive(self) -> None:
        """The device process died (or was killed as stalled): start a new one on the store.

        The error of the step it failed was raised already, and model, optimizer and store
        agree on the committed step (see [Note: a failure after the commit point] in
        pipeline.py); gradients staged since go back to ``p.grad`` for the new device.
        """
        warnings.warn(f"the device process {self._device.info.pid} is gone; starting a new one on store "
                      f"{self._store.path}, which is at step {self._store.refresh().step}", RuntimeWarning, stacklevel=3)
        pipeline = self._pipeline
        pipeline.restore_gradients()
        pipeline.abort()
        self._rollback(reload_weights=False)
        self._restart(lambda: None)
        self._device_failure_seen = False

    def _wake_dormant(self) -> None:
        """Parameters without state that now have a gradient (unfrozen): give them state."""
        wake = sorted(i for i in self._dormant if i not in self._standins and self._params[i].grad is not None)
        if not wake:
            return
        pipeline = self._pipeline
        pipeline.restore_gradients()  # what backward staged goes back to p.grad: the new device stages it again
        pipeline.abort()
        self._restart(lambda: self._store.grow(wake, masters=lambda i: self._params[i], slice_bytes=self._slice_bytes))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as ``torch.optim.Optimizer.add_param_group``: its parameters get state
        on the store (those that require grad now; the others at their first gradient).

        A store that already holds this group (an earlier run added it, and this run is
        resuming) gives its parameters the store's committed weights, as resuming does.
        """
        if "_store" not in self.__dict__:
            super().add_param_group(param_group)  # torch's __init__ adds the first groups
            return
        self._check_open()
        if not self._ranks.alone:
            raise UnsupportedUsageError("add_param_group is not supported with many ranks: pass every param group "
                                        "when the optimizer is built")
        g = len(self.param_groups)
        groups, names = _split_names([param_group])
        names = [[n.replace("group0.", f"group{g}.", 1) if is_positional_name(n) else n for n in names[0]]]
        super().add_param_group(groups[0])
        group = self.param_groups[-1]
        try:
            self._hyper(group)
            self._check_params()
            specs = param_specs([[(n, p) for n, p in zip(names[0], group["params"])]])
            specs = tuple(replace(spec, group=g) for spec in specs)
            first = len(self._params) - len(self._standins)
            known = self._store.check_added(specs, first, group=g)
        except BaseException:
            self.param_groups.pop()
            raise
        self._account(self._finish())  # the step in flight lands before the device stops
        tensors = list(group["params"])
        if known:
            for j, p in enumerate(tensors):
                self._params[first + j], self._names[first + j] = p, names[0][j]
                self._standins.discard(first + j)
            self._pending_hypers.pop(0)
            self._pipeline.abort()
            self._restart(lambda: None)
            self._load_masters_into_params(range(first, first + len(tensors)))
            return
        self._params += tensors
        self._names += names[0]
        add = [first + j for j, p in enumerate(tensors) if p.requires_grad]
        self._pipeline.abort()
        self._restart(lambda: self._store.grow(add, masters=lambda i: self._params[i], new_params=specs,
                                               new_hyperparameters=[self._group_json(group)],
                                               slice_bytes=self._slice_bytes))

    def _groups_json(self) -> tuple[dict[str, Any], ...]:
        """Every param group's hyperparameters as committed: this run's, then those of groups an
        earlier run added that add_param_group has not supplied again yet."""
        return tuple(self._group_json(g) for g in self.param_groups) + tuple(self._pending_hypers)

    # -- set-up helpers --------------------------------------------------------

    def _check_params(self) -> None:
        seen: set[int] = set()
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError(f"a parameter appears twice (again in param group {g}); pass each parameter once")
                seen.add(id(p))
                if p.is_sparse or p.is_complex():
                    raise TypeError("nearstep optimizers handle dense real parameters only")

    def _open_store(self, store: Any, specs: tuple[ParamSpec, ...], hyper_type: type,
                    state_format: formats.StateFormat | None,
                    trainable: list[bool] | None) -> tuple[Store, bool, PendingGroups | None]:
        groups = len(self.param_groups)
        if isinstance(store, Store):
            pending = store.check_model(specs, self.kind, state_format, groups=groups)
            return store, True, pending  # its committed masters become the model's weights
        path = _store_dir(store)  # the sharding chose the default for store=None
        if (path / MANIFEST).exists():
            opened = Store.open(path)
            try:
                pending = opened.check_model(specs, self.kind, state_format, groups=groups)
                m = opened.manifest
                slot = max((m.image(sl.index).slot_bytes for sl in m.slices), default=0)
                if slot:  # before a device process starts: a resumed store keeps its slices
                    slot_count(parse_bytes(self._device_config.memory_budget), slot, store_exists=True)
            except BaseException:
                opened.close()
                raise
            return opened, True, pending
        # Checked before anything is written: a plan the device could not run leaves no files behind.
        plan = plan_slices(specs, self._slice_bytes, include=trainable)
        planned = len(plan)
        check_slice_count(planned, self._slice_bytes / 2**20, sum(s.numel for s in specs), MAX_SLICES)
        fmt = state_format or formats.StateFormat()
        names = ("master", *rules.state_names(hyper_type))
        slot = max((SliceImage.build(sl.index, [(g.param, g.start, g.length, specs[g.param].group, specs[g.param].dtype)
                                                for g in sl.segments], fmt, names).slot_bytes for sl in plan), default=0)
        if slot:
            slot_count(parse_bytes(self._device_config.memory_budget), slot, store_exists=False)
        ensure_file_limit(planned)
        created = Store.create(
            path,
            params=specs,
            masters=lambda i: self._params[i],
            optimizer=self.kind,
            state_names=rules.state_names(hyper_type),
            hyperparameters=[self._group_json(g) for g in self.param_groups],
            slice_bytes=self._slice_bytes,
            state_format=state_format or formats.StateFormat(),
            trainable=trainable,
        )
        return created, False, None

    @torch.no_grad()
    def _load_masters_into_params(self, which: range | None = None) -> None:
        """Resuming: the store's committed master weights become the model's weights (of the
        parameters in ``which``, default all). Dormant parameters have none and keep theirs.

        Every slice is read (and its checksum verified) before any parameter changes,
        so a damaged store leaves the model as it was.
        """
        masters = self._store.read_params()["master"]
        for i in range(len(self._params)) if which is None else which:
            if masters[i] is not None:
                self._params[i].view(-1).copy_(masters[i])
        if "_pipeline" in self.__dict__:
            self._pipeline.note_weights(which)  # the model holds the store's masters again

    def _group_json(self, group: dict[str, Any]) -> dict[str, Any]:
        return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in asdict(self._hyper(group)).items()}

    def _hyper(self, group: dict[str, Any]) -> rules.Hyper:
        raise NotImplementedError

    # -- the step ----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Update every parameter that has a gradient; returns the closure's loss.

        In ``sync`` mode the update is complete (and committed) when this returns. In
        ``overlap`` mode it returns once the updates are queued; each module's new
        weights land just before its next forward. In ``delayed`` mode the new
        weights land at the next ``step()``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_open()
        try:
            return self._step_once(loss)
        except KeyboardInterrupt as exc:
            # See [Note: a failure after the commit point] in pipeline.py: a Ctrl-C anywhere in
            # here finishes the launched step or drops the staged one, and says at which step
            # model, optimizer and store are.
            self._pipeline.settle(exc)
            raise

    def _step_once(self, loss: Any) -> Any:
        t0 = time.monotonic_ns()
        if self.trace.loop_start_ns is not None:
            self.trace.add(Lane.COMPUTE, "forward/backward", self.trace.loop_start_ns, t0)
        pipeline = self._pipeline
        # The barrier: the previous step must be in the model before this one starts.
        self._account(self._finish())
        if self._times["steps"] % _TRACE_COLLECT_STEPS == _TRACE_COLLECT_STEPS - 1 and self._device.alive:
            # The device keeps its events until asked; asked here, where it has little queued
            # (the previous step is done), so that what it holds stays bounded.
            self.trace.collect()
        if not self._device.alive:
            if not self._device_failure_seen:
                # Died between steps: nobody has heard yet. Say so once, loudly; the next
                # step() starts a new device (the store is at its last commit either way).
                self._device_failure_seen = True
                error = DeviceDiedError(f"the device process {self._device.info.pid} died between steps (its last "
                                        f"committed step is kept); step() again to start a new device and continue, "
                                        f"or reopen the optimizer on the same store")
                pipeline.restore_gradients()  # offloaded ones back to p.grad: the retry stages them again
                pipeline.abort()
                tell_committed_step(error, self._rollback(reload_weights=False), None)
                raise error
            self._revive()
            pipeline = self._pipeline
        if self._dormant and self._ranks.alone:
            self._wake_dormant()
            pipeline = self._pipeline  # a new one if the store grew
        self._ranks.take_gradients()  # this rank's share, averaged over the ranks
        present = [i for i in range(len(self._params)) if pipeline.has_gradient(i)]
        if not present and not self._ranks.any_gradient:
            pipeline.abort()
            return self._end_step(t0, loss)
        for i in present:
            g = self._params[i].grad
            if g is not None and (g.is_sparse or g.shape != self._params[i].shape):
                pipeline.abort()
                raise ValueError(
                    f"the gradient of {self._names[i]!r} has shape {tuple(g.shape)}{' (sparse)' if g.is_sparse else ''}, "
                    f"expected {tuple(self._params[i].shape)} dense; nothing was updated"
                )
        pipeline.stage_rest(present)
        speculated = pipeline.speculated
        edited: list[int] = []
        if self._ranks.alone:
            # [Note: speculation then validation] in pipeline.py: what backward staged is checked here.
            _changed, removed = pipeline.revalidate(present)
            if removed:
                present = [i for i in present if i not in set(removed)]
            edited = pipeline.edited_weights()
            if edited and pipeline.speculated and pipeline.adopts_late(edited):
                pipeline.drop_early()
                edited = pipeline.edited_weights()
            if not present:
                if speculated:
                    pipeline.missed()
                pipeline.abort()
                return self._end_step(t0, loss)
        if pipeline.speculated and pipeline.speculated_with_other_inputs(self._step_inputs()):
            # The learning rate (or another hyperparameter, or a guard) was set between backward and
            # step(): the slices applied during backward used the old one. See [Note: speculation
            # then validation] in pipeline.py.
            pipeline.drop_early()
        scale = 1.0
        if pipeline.config.need_norms:
            norms = [pipeline.grad_norm(i) for i in present]
            where = self._params[0].device  # norms come from p.grad (there) or from staging (host)
            total = (torch.linalg.vector_norm(torch.stack([n.to(where, torch.float32) for n in norms])) if norms
                     else torch.zeros((), device=where))
            total = self._ranks.global_norm(total)
            if self.guards.skip_nonfinite and not bool(torch.isfinite(total)):
                self._counters["skipped_steps"] += 1
                if speculated:
                    pipeline.missed()
                pipeline.abort()
                return self._end_step(t0, loss)
            if self.max_grad_norm is not None:
                # The same rounding as torch.nn.utils.clip_grad_norm_: an fp32 coefficient.
                scale = float(torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0))
                if scale != 1.0:
                    self._clipped_steps += 1
                    pipeline.drop_early()  # they were applied unscaled: redo them with the scale
        if speculated and not pipeline.speculated:
            pipeline.missed()
        new_steps = list(self._param_steps)
        for i in present:
            new_steps[i] += 1
        commit = Commit(self._step + 1, tuple(new_steps), self._groups_json(),
                        {"skipped_steps": self._counters["skipped_steps"]})
        if edited and not self._warned_rounding and self._store.manifest.format.lossy_master:
            self._warned_rounding = True
            warnings.warn(
                f"weights written into {len(edited)} parameter(s) since they last landed (e.g. {self._names[edited[0]]!r}) "
                f"become the store's master in its {self._store.manifest.format.name!r} format, which rounds them "
                f"(the master keeps {self._store.manifest.format.master}); the model gets the rounded values. "
                f"Use state_format='fp32' to keep them exactly.",
                UserWarning, stacklevel=3,
            )
        with interrupts_deferred():  # a Ctrl-C here is raised once the launch and its counters agree
            pipeline.launch(self._step + 1, present, scale, commit, edited)
            self._ranks.launched()
            self._param_steps = new_steps
            self._step += 1
        if self.mode is Mode.SYNC or (self.mode is Mode.DELAYED and self._step <= self.warmup_steps):
            self._account(self._finish())
        if self.mode is not Mode.SYNC and self._ranks.alone and self._hooks:
            pipeline.attach_grad_hooks()  # parameters unfrozen since get theirs
        return self._end_step(t0, loss)

    def _step_inputs(self) -> StepInputs:
        """The hyperparameters (as the param groups hold them now), committed step counts and guards
        of the step being staged: what the pipeline builds its Apply requests from."""
        return StepInputs(tuple(self._hyper(g) for g in self.param_groups), self._param_steps, self.guards)

    def _finish(self) -> InFlight | None:
        """Land the launched step; with many ranks, also send its new weights to every rank (collective)."""
        inflight = self._pipeline.finish()
        self._ranks.publish_pending()
        return inflight

    def _end_step(self, t0: int, loss: Any) -> Any:
        self._ranks.release_gradients()
        end = time.monotonic_ns()
        self.trace.add(Lane.COMPUTE, "step", t0, end)
        self._times["steps"] += 1
        self._times["step_seconds"] += (end - t0) / 1e9
        self.trace.loop_start_ns = end
        return loss

    def _device_events(self) -> list[Any]:
        if self._closed or not self._device.alive:
            return []
        return self._device.submit(Query(QueryKind.TRACE)).wait()

    @torch.no_grad()
    def _rollback(self, reload_weights: bool, launched: int | None = None) -> int | None:
        """After a failed step: the step counters, and the weights where they may differ, from the
        store's committed step, which this returns (None: the store cannot be read).

        ``launched``: the step that failed. The store may have committed it although its
        completion never arrived (see [Note: a failure after the commit point] in pipeline.py):
        then the model takes its weights from the store even if none had landed.
        """
        self._device_failure_seen = True  # the error being raised reports it: a dead device is replaced next
        try:
            manifest = self._store.refresh()
            if reload_weights or (launched is not None and manifest.step == launched):
                self._load_masters_into_params()
        except NearstepError:
            return None  # nothing readable to roll back to; the error being raised says why
        self._step = manifest.step
        self._param_steps = list(manifest.param_steps)
        return manifest.step

    def _account(self, inflight: InFlight | None) -> None:
        if inflight is None:
            return
        sums: dict[int, list[float]] = {}
        for k, rep in inflight.reports.items():
            for seg, r in zip(self._layout.slices[k].segments, rep):
                self._spike_by_param[seg.param] += r.spike_clipped
                self._uclip_by_param[seg.param] += int(r.update_clipped)
                if not math.isnan(r.update_rms):
                    acc = sums.setdefault(seg.param, [0.0, 0.0, 0.0])
                    acc[0] += r.update_rms**2 * seg.length
                    acc[1] += seg.length
                    acc[2] += (r.update_to_weight**2) * seg.length
        for i, (energy, n, ratio_energy) in sums.items():
            self._last[i] = (math.sqrt(energy / n), math.sqrt(ratio_energy / n))

    # -- everything else a torch optimizer has --------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise NearstepError("this optimizer is closed; create a new one on the same store to continue")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; gradients staged since the last ``step()`` are
        discarded too (a step skipped without calling ``step()``, as GradScaler does on inf/NaN),
        with any slice the device had applied from them speculatively."""
        pipeline = self.__dict__.get("_pipeline")
        if pipeline is not None and not self._closed and pipeline.phase is Phase.STAGING:
            pipeline.abort()
        super().zero_grad(set_to_none=set_to_none)

    def synchronize(self) -> None:
        """Wait until every queued update has reached the model and the store.

        ``state_dict()`` (the optimizer's, and the model's when ``model=`` was given)
        calls it; call it yourself before reading weights in other ways between steps,
        for example before ``model.to()`` or an evaluation in delayed mode.
        """
        self._check_open()
        try:
            self._account(self._finish())
        except KeyboardInterrupt as exc:
            self._pipeline.settle(exc)
            raise

    def weights_pending(self, p: torch.Tensor) -> bool:
        """Overlap mode: whether parameter ``p`` still waits for its new weights from the step in flight."""
        return not self._closed and self._pipeline.pending(p)

    def land_weights(self, params: Sequence[torch.Tensor]) -> None:
        """Overlap mode: wait for these parameters' new weights from the step in flight and copy them in now.

        For a front end that sees reads the forward pre-hooks cannot (``hooks=False``):
        nearstep.keras calls it when a Keras variable's value is read. Parameters that wait
        for nothing are skipped; the others' slices land whole (with any other parameter in
        them), the rest of the step keeps landing where it is read.
        """
        if self._closed:
            return
        pipeline = self._pipeline
        try:
            pipeline.land_params(pipeline.indices(params))
        except KeyboardInterrupt as exc:
            pipeline.settle(exc)
            raise

    def telemetry(self) -> list[ParamTelemetry]:
        """Per parameter: last update RMS and update-to-weight ratio, and guard counts."""
        self.synchronize()
        return [
            ParamTelemetry(self._names[i], self._last[i][0], self._last[i][1], self._spike_by_param[i], self._uclip_by_param[i])
            for i in range(len(self._params))
        ]

    def report(self) -> SensitivityReport:
        """Which parameters the guards suppressed most, as of the last step.

        ``print(opt.report().table())`` ranks the parameters by spike-clipped rate and
        by update-to-weight ratio; ``opt.report().plot("sensitivity.png")`` draws
        them. Needs ``Guards(spike_clip=...)`` and ``Guards(telemetry=True)`` (or
        ``update_clip``) to have something to rank; see ``nearstep.sensitivity``.
        """
        self.synchronize()
        return sensitivity_report(self._device.manifest())

    def stats(self) -> dict[str, Any]:
        """Counters of the host and the device: steps, times, bytes, guard counts, overlap."""
        self._check_open()
        device = self._device.stats()
        committed = device.pop("counters")
        steps = max(self._times["steps"], 1)
        summary = self.trace.summary()
        return {
            "mode": self.mode,
            "step": self._step,
            "store": str(self._store.path),
            "backend": self._device.info.backend,
            "spike_clipped": committed.get("spike_clipped", 0),
            "update_clipped": committed.get("update_clipped", 0),
            "skipped_steps": self._counters["skipped_steps"],
            "clipped_steps": self._clipped_steps,
            "device_restarts": self._restarts,
            **self._pipeline.counters,
            "lent_core_switches": self._pipeline.lending.switches if self._pipeline.lending else 0,
            "step_ms": 1e3 * self._times["step_seconds"] / steps,
            "host_steps": self._times["steps"],
            "overlap_fraction": summary["overlap_fraction"],
            "link_bytes_per_step": (device["link_in_bytes"] + device["link_out_bytes"]) / steps,
            "store_bytes_per_step": (device["store_read_bytes"] + device["store_write_bytes"]) / steps,
            # What this run writes to the drive, and at what pace (nearstep plan's drive-wear input).
            "store_bytes_written": device["store_write_bytes"],
            "store_write_bytes_per_day": device["store_write_bytes"] * 86400.0 / max(time.monotonic() - self._opened_at, 1e-9),
            **{f"device_{k}": v for k, v in device.items()},
            **self._ranks.stats(steps),
        }

    @property
    def store_path(self) -> Path:
        return self._store.path

    @property
    def store(self) -> Store:
        """The host's handle on the store: its path, slice files and the manifest as this process
        last read it (``opt.device.manifest()`` asks the device for the committed one). The device
        owns the state: read it through the store's tools, never write it while the optimizer runs."""
        return self._store

    @property
    def sharding(self) -> Sharding:
        """This process's share of the state (:class:`~nearstep.distributed.Unsharded` on one rank)."""
        return self._ranks

    @property
    def device(self) -> Device:
        return self._device

    @property
    def keep_snapshots(self) -> int:
        """How many snapshots of its store :meth:`state_dict` keeps (default 2); it deletes older ones.

        Each snapshot holds one generation of the state on the store's disk. Keep at
        least as many as the checkpoints your framework keeps (HF ``save_total_limit``,
        plus one for ``load_best_model_at_end``): a checkpoint whose snapshot was
        deleted cannot be loaded. Set it with ``opt.keep_snapshots = 5``.
        """
        return self.__dict__.get("_keep_snapshots", checkpoint.DEFAULT_KEEP_SNAPSHOTS)

    @keep_snapshots.setter
    def keep_snapshots(self, keep: int) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep_snapshots must be an int >= 1, got {keep!r}")
        self.__dict__["_keep_snapshots"] = keep

    def state_dict(self) -> dict[str, Any]:
        """A small *reference* to the state: what frameworks ``torch.save`` as the optimizer's checkpoint.

        The state stays on the SSD: this copies the store's last commit into a
        snapshot directory inside the store, ``STORE/snapshots/step-NNNNNN-DIGEST/``
        (in the kernel, so no state passes through host memory; itself a valid
        store that ``nearstep verify`` reads), keeps the newest :attr:`keep_snapshots`
        of them, and returns::

            {"state": {},                       # nothing per parameter: it is in the snapshot
             "param_groups": [...],             # as torch.optim has them (LR schedulers read them)
             "nearstep": {"layout": "reference", "version": 1, "kind": "adamw", "step": 500,
                          "counters": {...}, "names": [...], "store": "/abs/STORE",
                          "store_id": "...", "snapshot": {"path": "/abs/STORE/snapshots/step-000500-...",
                                                          "name": ..., "step": 500, "digest": ...}}}

        Plain Python values only (dicts, lists, tuples, str, numbers; tensors where
        a param group holds one): ``torch.load(weights_only=True)`` reads it. :meth:`load_state_dict` restores it, bit for bit. The checkpoint is
        valid only together with its snapshot: keep the store (or copy the snapshot
        with the checkpoint). For a self-contained state dict that holds the whole
        state in host memory, use :meth:`full_state_dict`.
        """
        self.synchronize()
        manifest = self._device.manifest()
        self._store.manifest = manifest
        snapshot = checkpoint.take_snapshot(self._store, manifest, self.keep_snapshots)
        counters = {**manifest.counters, "skipped_steps": self._counters["skipped_steps"]}
        reference = checkpoint.Reference(snapshot.store, manifest.store_id, manifest.step, snapshot.path.resolve(),
                                         snapshot.digest, counters)
        return {"state": {}, "param_groups": checkpoint.pack_param_groups(self.param_groups),
                "nearstep": reference.to_meta(self.kind, self._names)}

    def full_state_dict(self) -> dict[str, Any]:
        """The whole optimizer state in ``torch.optim``'s layout, read from the store's last commit.

        Each parameter with a step has ``step`` and its moments shaped like the
        parameter (as torch's optimizers keep them), plus ``master``: the fp32 master
        weights. It is built in host memory (12 bytes per parameter for AdamW), so
        for checkpoints prefer :meth:`state_dict`; this one is for moving the state
        to another store or to ``torch.optim`` (which ignores ``master``). Loadable
        with :meth:`load_state_dict`, also into an optimizer on a different store.
        """
        self.synchronize()
        manifest = self._device.manifest()
        self._store.manifest = manifest
        flats = self._store.read_params(manifest.state_names)
        state_out: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(self._params):
            if self._param_steps[i] == 0:
                continue
            entry: dict[str, Any] = {"step": torch.tensor(float(self._param_steps[i]))}
            for n in manifest.state_names:
                entry[n] = flats[n][i].view(p.shape)
            state_out[i] = entry
        return {
            "state": state_out,
            "param_groups": checkpoint.pack_param_groups(self.param_groups),
            "nearstep": {"layout": checkpoint.FULL_LAYOUT, "kind": self.kind, "step": self._step, "counters": dict(self._counters),
                         "names": list(self._names)},
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace the state (on the store) and the hyperparameters with ``state_dict``'s.

        ``state_dict`` is a reference from :meth:`state_dict` or the full layout of
        :meth:`full_state_dict` (or of an earlier nearstep). The master weights it
        holds become the model's weights, as when resuming from a store.

        A reference to this store's current state (the step the store is at, and the
        same bytes) only restores the hyperparameters and copies the store's masters
        into the parameters. Any other reference is restored from its snapshot, one
        slice at a time, and committed at the snapshot's step: resuming continues bit
        for bit as the run that saved it. A snapshot of another store loads if its
        parameter table matches (a checkpoint copied to a new store).

        Raises:
            StoreError: the reference's snapshot no longer exists (pruned: see
                :attr:`keep_snapshots`). StoreMismatchError: the state dict is for other
                parameters or another optimizer. Either way nothing changed.
        """
        self.synchronize()
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise StoreMismatchError(f"the state dict has {len(groups) if isinstance(groups, list) else 'no'} param groups, this optimizer {len(self.param_groups)}")
        for g, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise StoreMismatchError(f"param group {g} has {len(saved['params'])} parameters in the state dict, {len(mine['params'])} here")
        meta = state_dict.get("nearstep", {})
        if meta.get("kind", self.kind) != self.kind:
            raise StoreMismatchError(f"the state dict is from nearstep.{meta['kind']}, not {self.kind}")
        if checkpoint.is_reference(state_dict):
            self._load_reference(checkpoint.Reference.from_meta(meta), groups)
        else:
            self._load_full_state_dict(state_dict, groups, meta)
        self._pipeline.note_weights()  # the model holds the store's masters: nothing to adopt
        self._ranks.publish_all()

    def _load_reference(self, reference: checkpoint.Reference, groups: list[dict[str, Any]]) -> None:
        """load_state_dict of a reference (see there); the param groups are checked already."""
        manifest = self._device.manifest()
        self._store.manifest = manifest
        merged = [{**mine, **{k: v for k, v in saved.items() if k != "params"}} for mine, saved in zip(self.param_groups, groups)]
        hyperparameters = tuple(self._group_json(g) for g in merged)  # validates them before anything changes
        if reference.store_id == manifest.store_id and reference.digest == checkpoint.state_digest(manifest):
            # The store holds exactly the checkpoint's state: nothing to restore but the
            # hyperparameters, and the weights (the model may have been changed since).
            checkpoint.copy_masters_into(self._store, self._params)
            counters = {**self._counters, **reference.counters}
        else:
            snapshot = checkpoint.open_snapshot(reference, self._store)
            checkpoint.check_snapshot_fits(snapshot, self._store, self.kind)
            saved = snapshot.manifest
            counters = {**dict.fromkeys(manifest.counters, 0), **saved.counters,
                        "skipped_steps": reference.counters.get("skipped_steps", saved.counters.get("skipped_steps", 0))}
            commit = Commit(saved.step, tuple(saved.param_steps), hyperparameters, counters)
            try:
                manifest = checkpoint.restore_snapshot(snapshot, self._store, self._device, self._params, commit)
            except BaseException:
                self._rollback(reload_weights=False)  # step counters from whatever is committed now
                with contextlib.suppress(NearstepError):  # the error being raised says what failed first
                    checkpoint.copy_masters_into(self._store, self._params)
                    self._pipeline.note_weights()
                raise
            counters = {"skipped_steps": 0, "spike_clipped": 0, "update_clipped": 0, **counters}
        for group, values in zip(self.param_groups, merged):
            group.update({k: v for k, v in values.items() if k != "params"})
        self._step, self._param_steps, self._counters = manifest.step, list(manifest.param_steps), counters

    def _load_full_state_dict(self, state_dict: dict[str, Any], groups: list[dict[str, Any]], meta: dict[str, Any]) -> None:
        """load_state_dict of the full layout (see there); the param groups are checked already."""
        manifest = self._store.manifest
        saved_state = state_dict.get("state", {})
        ids = [i for saved in groups for i in saved["params"]]
        by_param: dict[int, dict[str, Any]] = {pos: saved_state.get(i, {}) for pos, i in enumerate(ids)}
        flats: dict[str, list[torch.Tensor]] = {n: [] for n in manifest.state_names}
        steps = []
        for pos, p in enumerate(self._params):
            entry = by_param[pos]
            steps.append(int(float(entry.get("step", 0))))
            for n in manifest.state_names:
                value = entry.get(n, p if n == "master" else None)
                if value is None:
                    value = torch.zeros_like(p, dtype=torch.float32)
                if tuple(value.shape) != tuple(p.shape):
                    raise StoreMismatchError(f"state {n!r} of {self._names[pos]!r} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")
                flats[n].append(value.detach().to(torch.float32, copy=True).reshape(-1))
        completions = []
        for spec in manifest.slices:
            arrays = {}
            for n in manifest.state_names:
                arrays[n] = torch.cat([flats[n][s.param][s.start : s.start + s.length] for s in spec.segments]).numpy()
            completions.append(self._device.submit(LoadState(spec.index, arrays)))
        for group, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k != "params":
                    group[k] = v
        step = int(meta.get("step", max(steps, default=0)))
        counters = {**self._counters, **meta.get("counters", {})}
        completions.append(self._device.submit(Commit(step, tuple(steps), self._groups_json(), counters)))
        _wait_all(completions)
        for pos, p in enumerate(self._params):
            p.copy_(flats["master"][pos].view(p.shape))
        self._step, self._param_steps, self._counters = step, steps, counters

    def close(self) -> None:
        """Finish the last step, stop the device and release the store. Idempotent.

        The store keeps the last committed step; reopen it to continue.
        """
        if self._closed:
            return
        try:
            self._account(self._finish())
        finally:
            self._closed = True
            self._pipeline.detach()
            if self._read_check is not None:
                check, self._read_check = self._read_check, None
                with contextlib.suppress(Exception):  # another mode pushed later may sit above it
                    check.__exit__(None, None, None)
            self._finalizer()

    def __enter__(self) -> NearstepOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self._ranks.abandon()  # unwinding: the other ranks may be gone; no collective now
        self.close()

    def __repr__(self) -> str:
        return f"nearstep.{type(self).__name__}(params={len(self._params)}, step={self._step}, mode={self.mode!r}, store='{self._store.path}')"


# Steps between two collections of the device's trace events (a Query on the device).
_TRACE_COLLECT_STEPS = 256


def _synchronizer(ref: weakref.ref[NearstepOptimizer]) -> Any:
    """A state_dict pre-hook that does not keep the optimizer alive."""

    def hook(*_args: Any, **_kwargs: Any) -> None:
        opt = ref()
        if opt is not None and not opt._closed:
            opt._ranks.before_state_dict(opt.synchronize)

    return hook


def _wait_all(completions: list[Completion]) -> None:
    """Wait for every completion (none is left running), then raise the first error."""
    error: BaseException | None = None
    for done in completions:
        try:
            done.wait()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


def _close_quietly(device: Device, store: Store) -> None:
    try:
        device.close()
    finally:
        store.close()


# ---------------------------------------------------------------------------
# The optimizers


def _value(x: Any) -> float:
    return float(x) if isinstance(x, torch.Tensor) else x


class AdamW(NearstepOptimizer):
    """AdamW with its state on a store; the same results as ``torch.optim.AdamW``.

    Args:
        params: ``model.parameters()``, ``model.named_parameters()`` (names make
            errors and telemetry readable), or param-group dicts of either.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        store: a store directory (created if new, resumed if it holds a store), an
            open :class:`~nearstep.Store`, or None for a fresh directory under ``./.nearstep/``.
        mode: ``"sync"``: the update completes inside ``step()``.
        max_grad_norm: clip the global gradient norm to this (as ``clip_grad_norm_``).
        guards: a :class:`~nearstep.Guards`; default skips steps with non-finite gradients.
        device: a :class:`~nearstep.DeviceConfig`, ``"emulated"`` (default) or ``"inline"``.
        slice_mb: about how many MiB of fp32 parameters move and update as one slice;
            None picks about 16 slices of 1 to 64 MiB (:func:`nearstep.store.auto_slice_mb`).
        state_format: how the state is kept on the store: ``"fp32"`` (default for a new
            store), ``"bf16-kahan"``, ``"bf16-sr"``, ``"8bit"``, ``"16bit"``, ``"fp8"``, or a
            combination such as ``"bf16-sr+8bit"`` (see ``docs/accuracy.md``). None: the
            store's own format when resuming. A store is never converted silently: a different explicit
            format is refused.
        process_group: shard the state across this group's ranks. With an initialised
            default group (torchrun) that one is used without asking; without either,
            nothing is sharded. Each rank's store then holds its part: ``store`` gets a
            ``rank<N>`` subdirectory per rank, or may be a template with ``{rank}``.
            See the README's "Many ranks" and ``nearstep/distributed.py``.
        sharding: a :class:`~nearstep.ShardingConfig` (collective timeout, whether the
            gradients arrive averaged already).
        check_reads: overlap mode: make any torch operation that reads a parameter whose new
            weights have not landed yet raise :class:`~nearstep.StaleWeightError` (a Python
            call per torch operation: for test runs). None: on when the environment has
            ``NEARSTEP_CHECK_READS=1``. See the README's "What the training loop may do".
        keep_snapshots: how many store snapshots ``state_dict()`` keeps (a checkpoint refers
            to one; older ones are deleted). At least the number of checkpoints your
            framework keeps. See ``nearstep/checkpoint.py``.
        hooks: False: no hooks on the parameters or the model. Every gradient is staged at
            ``step()``, and in ``overlap`` mode the caller lands each parameter's new weights
            with :meth:`land_weights` before anything reads them (``model=`` is then optional;
            its ``state_dict()`` still synchronises). For front ends that set gradients or
            hyperparameters between backward and ``step()`` and see every read themselves:
            nearstep.keras.

    Example::

        opt = nearstep.AdamW(model.named_parameters(), lr=3e-4, store="run/state")
        for x, y in data:
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        opt.close()
    """

    kind = "adamw"

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, maximize: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize), **options)

    def _hyper(self, group: dict[str, Any]) -> rules.Hyper:
        b1, b2 = group["betas"]
        return rules.AdamWHyper(lr=_value(group["lr"]), beta1=_value(b1), beta2=_value(b2), eps=group["eps"],
                                  weight_decay=group["weight_decay"], maximize=group["maximize"])


class Adam(AdamW):
    """Adam (L2 weight decay added to the gradient, as ``torch.optim.Adam``); see :class:`AdamW`."""

    kind = "adam"

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, **options)

    def _hyper(self, group: dict[str, Any]) -> rules.Hyper:
        b1, b2 = group["betas"]
        return rules.AdamHyper(lr=_value(group["lr"]), beta1=_value(b1), beta2=_value(b2), eps=group["eps"],
                                 weight_decay=group["weight_decay"], maximize=group["maximize"])


class SGD(NearstepOptimizer):
    """SGD with momentum, dampening and Nesterov, as ``torch.optim.SGD``; see :class:`AdamW`."""

    kind = "sgd"

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 decoupled_weight_decay: bool = False, **options: Any) -> None:
        """``decoupled_weight_decay=True`` multiplies the weights by ``1 - lr * weight_decay`` before
        the step (as AdamW decays) instead of adding ``weight_decay * w`` to the gradient."""
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay), **options)

    def _hyper(self, group: dict[str, Any]) -> rules.Hyper:
        return rules.SGDHyper(lr=_value(group["lr"]), momentum=group["momentum"], dampening=group["dampening"],
                                nesterov=group["nesterov"], weight_decay=group["weight_decay"], maximize=group["maximize"],
                                decoupled_weight_decay=group.get("decoupled_weight_decay", False))


class Lion(NearstepOptimizer):
    """Lion (Chen et al., 2023): sign of an interpolated momentum, decoupled weight decay."""

    kind = "lion"

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize), **options)

    def _hyper(self, group: dict[str, Any]) -> rules.Hyper:
        b1, b2 = group["betas"]
        return rules.LionHyper(lr=_value(group["lr"]), beta1=_value(b1), beta2=_value(b2),
                                 weight_decay=group["weight_decay"], maximize=group["maximize"])

