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

import math
import os
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from . import formats, kernels
from .device import Completion, Device, DeviceConfig, build_device
from .distributed import Sharding, ShardingConfig, build_sharding
from .engine import Apply, Commit, LoadState, Query
from .staging import StagingLayout
from .pipeline import InFlight, Pipeline
from .sensitivity import SensitivityReport, sensitivity_report
from .trace import Trace
from .errors import NearstepError, StoreMismatchError
from .store import MANIFEST, ParamSpec, Store, param_specs

__all__ = ["NearstepOptimizer", "AdamW", "Adam", "SGD", "Lion", "ParamTelemetry", "auto_slice_mb", "default_store_path"]

Mode = Literal["sync", "overlap", "delayed"]


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


def auto_slice_mb(specs: tuple[ParamSpec, ...]) -> float:
    """About 16 slices, each between 1 and 64 MiB of fp32 parameters.

    Fewer, larger slices cost less per request; more, smaller ones let the device
    start on the first slices while backward still works on the rest, and let the
    next forward start before the last ones are updated. Measured on MiniLM-L6
    (91 MiB of fp32 parameters): 2 slices of 64 MiB left 0.80 of the ideal overlap,
    12 of 8 MiB 0.94.
    """
    total_mib = sum(p.numel for p in specs) * 4 / 2**20
    return min(64.0, max(1.0, total_mib / 16))


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
        mode: Mode = "sync",
        max_grad_norm: float | None = None,
        guards: kernels.Guards | None = None,
        device: DeviceConfig | str | None = None,
        slice_mb: float | None = None,
        model: torch.nn.Module | None = None,
        warmup_steps: int = 10,
        offload_gradients: bool = False,
        state_format: str | formats.StateFormat | None = None,
        process_group: Any = None,
        sharding: ShardingConfig | None = None,
    ) -> None:
        if mode not in ("sync", "overlap", "delayed"):
            raise ValueError(f"mode must be 'sync', 'overlap' or 'delayed', got {mode!r}")
        if mode == "overlap" and model is None:
            raise ValueError(
                "mode='overlap' needs the model, to wait for each module's new weights just before its "
                "forward: pass model=model (or use mode='sync')"
            )
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        if slice_mb is not None and not slice_mb > 0:
            raise ValueError(f"slice_mb must be positive or None (automatic), got {slice_mb!r}")
        if state_format is not None:
            state_format = formats.StateFormat.parse(state_format)  # a bad name fails here, before a store is made
        guards = kernels.Guards() if guards is None else guards
        if not isinstance(guards, kernels.Guards):
            raise TypeError(f"guards must be a nearstep.Guards, got {type(guards).__name__}")
        hyper_type = kernels.KERNELS[self.kind]
        guards.check_for(hyper_type)
        if isinstance(device, str):
            device = DeviceConfig(backend=device)  # type: ignore[arg-type]
        device = DeviceConfig() if device is None else device
        if not isinstance(device, DeviceConfig):
            raise TypeError(f"device must be a nearstep.DeviceConfig, 'emulated', 'inline' or None, got {type(device).__name__}")

        groups, names = _split_names(params)
        super().__init__(groups, defaults)
        self._check_params()
        for group in self.param_groups:
            self._hyper(group)  # validate every group's values up front

        self.mode = mode
        self.max_grad_norm = max_grad_norm
        self.guards = guards
        self.warmup_steps = warmup_steps
        self._params: list[torch.Tensor] = [p for group in self.param_groups for p in group["params"]]
        self._names = [n for group_names in names for n in group_names]
        specs = param_specs([list(zip(gn, g["params"])) for gn, g in zip(names, self.param_groups)])
        # Many ranks: the optimizer works on this rank's share (see distributed.py); param_groups keep the model's.
        self._ranks: Sharding | None = build_sharding(self._params, self._names, specs, model=model,
                                                      process_group=process_group, config=sharding)
        if self._ranks is None:
            self._store, resumed = self._open_store(store, specs, hyper_type, slice_mb, state_format)
        else:
            self._params, self._names, specs = list(self._ranks.local_params), list(self._ranks.local_names), self._ranks.local_specs
            device = self._ranks.device_config(device)
            self._store, resumed = self._ranks.open_store(
                store, lambda: default_store_path(self.kind),
                lambda path: self._open_store(path, specs, hyper_type, slice_mb, state_format))
        self._closed = False
        try:
            manifest = self._store.manifest
            self._layout = StagingLayout.from_manifest(manifest)
            self._step = manifest.step
            self._param_steps = list(manifest.param_steps)
            self._counters = {"skipped_steps": 0, "spike_clipped": 0, "update_clipped": 0, **manifest.counters}
            self._spike_by_param = [0] * len(self._params)
            self._uclip_by_param = [0] * len(self._params)
            self._last = [(math.nan, math.nan)] * len(self._params)
            if resumed or self._store.manifest.format.master != "fp32":
                # A lossy master format rounded the initial weights: the model starts from
                # what the store holds, as a resumed run would.
                self._load_masters_into_params()
            if self._ranks is not None:
                self._ranks.publish_all()  # every rank starts from the owners' weights
            self._device: Device = build_device(self._store, device)
        except BaseException:
            self._store.close()
            raise
        self.trace = Trace(collect=self._device_events)
        # Stop the device process even when the user forgets close().
        self._finalizer = weakref.finalize(self, _close_quietly, self._device, self._store)
        self._pipeline = Pipeline(
            self._params, self._names, self._layout, self._device, self.trace,
            arenas=2 if mode == "delayed" else 1,
            offload_gradients=offload_gradients and mode != "sync",
            rollback=self._rollback,
        )
        self._pipeline.need_norms = max_grad_norm is not None or guards.skip_nonfinite
        if mode != "sync" and max_grad_norm is None:
            self._pipeline.early_apply = self._early_apply
        if mode != "sync":
            self._pipeline.attach_grad_hooks()
            if self._ranks is not None:
                self._ranks.attach_grad_hooks(self._pipeline)
        if model is not None:
            if mode == "overlap":
                if self._ranks is None:
                    self._pipeline.attach_forward_hooks(model)
                else:
                    self._ranks.attach_forward_hooks(model, self._pipeline)
            # Whatever reads the weights through model.state_dict() sees the updated ones.
            self._pipeline.add_handle(model.register_state_dict_pre_hook(_synchronizer(weakref.ref(self))))
        self._times = {"steps": 0, "step_seconds": 0.0, "wait_seconds": 0.0}

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

    def _open_store(self, store: Any, specs: tuple[ParamSpec, ...], hyper_type: type, slice_mb: float | None,
                    state_format: formats.StateFormat | None) -> tuple[Store, bool]:
        if isinstance(store, Store):
            store.check_model(specs, self.kind, state_format)
            return store, True  # its committed masters become the model's weights
        path = Path(store) if store is not None else default_store_path(self.kind)
        if (path / MANIFEST).exists():
            opened = Store.open(path)
            try:
                opened.check_model(specs, self.kind, state_format)
            except BaseException:
                opened.close()
                raise
            return opened, True
        created = Store.create(
            path,
            params=specs,
            masters=lambda i: self._params[i],
            optimizer=self.kind,
            state_names=kernels.state_names(hyper_type),
            hyperparameters=[self._group_json(g) for g in self.param_groups],
            slice_bytes=int((slice_mb or auto_slice_mb(specs)) * 2**20),
            state_format=state_format or formats.StateFormat(),
        )
        return created, False

    @torch.no_grad()
    def _load_masters_into_params(self) -> None:
        """Resuming: the store's committed master weights become the model's weights.

        Every slice is read (and its checksum verified) before any parameter changes,
        so a damaged store leaves the model as it was.
        """
        for p, master in zip(self._params, self._store.read_params()["master"]):
            p.view(-1).copy_(master)

    def _group_json(self, group: dict[str, Any]) -> dict[str, Any]:
        return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in asdict(self._hyper(group)).items()}

    def _hyper(self, group: dict[str, Any]) -> kernels.Hyper:
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
        t0 = time.monotonic_ns()
        if self.trace.loop_start_ns is not None:
            self.trace.add("compute", "forward/backward", self.trace.loop_start_ns, t0)
        pipeline = self._pipeline
        # The barrier: the previous step must be in the model before this one starts.
        self._account(self._finish())
        if self._ranks is not None:
            self._ranks.take_gradients()  # this rank's share, averaged over the ranks
        present = [i for i in range(len(self._params)) if pipeline.has_gradient(i)]
        if not present and (self._ranks is None or not self._ranks.any_gradient):
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
        scale = 1.0
        if pipeline.need_norms:
            norms = [pipeline.grad_norm(i) for i in present]
            where = self._params[0].device  # norms come from p.grad (there) or from staging (host)
            total = (torch.linalg.vector_norm(torch.stack([n.to(where, torch.float32) for n in norms])) if norms
                     else torch.zeros((), device=where))
            if self._ranks is not None:
                total = self._ranks.global_norm(total)
            if self.guards.skip_nonfinite and not bool(torch.isfinite(total)):
                self._counters["skipped_steps"] += 1
                pipeline.abort()
                return self._end_step(t0, loss)
            if self.max_grad_norm is not None:
                # The same rounding as torch.nn.utils.clip_grad_norm_: an fp32 coefficient.
                scale = float(torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0))
        new_steps = list(self._param_steps)
        for i in present:
            new_steps[i] += 1
        hypers = tuple(self._hyper(g) for g in self.param_groups)
        commit = Commit(self._step + 1, tuple(new_steps), tuple(self._group_json(g) for g in self.param_groups),
                        {"skipped_steps": self._counters["skipped_steps"]})
        pipeline.launch(self._step + 1, present, hypers, new_steps, scale, self.guards, commit)
        if self._ranks is not None:
            self._ranks.launched()
        self._param_steps = new_steps
        self._step += 1
        if self.mode == "sync" or (self.mode == "delayed" and self._step <= self.warmup_steps):
            self._account(self._finish())
        return self._end_step(t0, loss)

    def _early_apply(self, k: int) -> Apply:
        """The update of slice k, built while backward runs (no clip scale: see [Note: early apply])."""
        pipeline = self._pipeline
        steps = tuple(self._param_steps[s.param] + 1 if pipeline.staged[s.param] else 0
                      for s in self._layout.slices[k].segments)
        hypers = tuple(self._hyper(g) for g in self.param_groups)
        return Apply(k, hypers, steps, 1.0, self.guards, pipeline.arenas[pipeline.current].id)

    def _finish(self) -> InFlight | None:
        """Land the launched step; with many ranks, also send its new weights to every rank (collective)."""
        inflight = self._pipeline.finish()
        if self._ranks is not None:
            self._ranks.publish_pending()
        return inflight

    def _end_step(self, t0: int, loss: Any) -> Any:
        if self._ranks is not None:
            self._ranks.release_gradients()
        end = time.monotonic_ns()
        self.trace.add("compute", "step", t0, end)
        self._times["steps"] += 1
        self._times["step_seconds"] += (end - t0) / 1e9
        self.trace.loop_start_ns = end
        return loss

    def _device_events(self) -> list[Any]:
        if self._closed or not self._device.alive:
            return []
        return self._device.submit(Query("trace")).wait()

    @torch.no_grad()
    def _rollback(self, reload_weights: bool) -> None:
        """After a failed step: back to the store's last commit (step counters, and weights if asked)."""
        try:
            manifest = self._store.refresh()
            if reload_weights:
                self._load_masters_into_params()
        except NearstepError:
            return  # nothing readable to roll back to; the error being raised says why
        self._step = manifest.step
        self._param_steps = list(manifest.param_steps)

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

    def synchronize(self) -> None:
        """Wait until every queued update has reached the model and the store.

        ``state_dict()`` (the optimizer's, and the model's when ``model=`` was given)
        calls it; call it yourself before reading weights in other ways between steps,
        for example before ``model.to()`` or an evaluation in delayed mode.
        """
        self._check_open()
        self._account(self._finish())

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
            "step_ms": 1e3 * self._times["step_seconds"] / steps,
            "host_steps": self._times["steps"],
            "overlap_fraction": summary["overlap_fraction"],
            "link_bytes_per_step": (device["link_in_bytes"] + device["link_out_bytes"]) / steps,
            "store_bytes_per_step": (device["store_read_bytes"] + device["store_write_bytes"]) / steps,
            **{f"device_{k}": v for k, v in device.items()},
            **(self._ranks.stats(steps) if self._ranks is not None else {}),
        }

    @property
    def store_path(self) -> Path:
        return self._store.path

    @property
    def device(self) -> Device:
        return self._device

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state in ``torch.optim``'s layout, read from the store's last commit.

        Each parameter with a step has ``step`` and its moments shaped like the
        parameter (as torch's optimizers keep them), plus ``master``: the fp32 master
        weights. Loadable with :meth:`load_state_dict`, also into an optimizer on a
        different store.
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
        groups = []
        index = 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
            groups.append(packed)
        return {
            "state": state_out,
            "param_groups": groups,
            "nearstep": {"kind": self.kind, "step": self._step, "counters": dict(self._counters), "names": list(self._names)},
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace the state (on the store) and the hyperparameters with ``state_dict``'s.

        The master weights it carries become the model's weights, as when resuming
        from a store. Nothing changes unless the whole state dict fits this optimizer.
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
        completions.append(self._device.submit(Commit(step, tuple(steps), tuple(self._group_json(g) for g in self.param_groups), counters)))
        _wait_all(completions)
        for pos, p in enumerate(self._params):
            p.copy_(flats["master"][pos].view(p.shape))
        if self._ranks is not None:
            self._ranks.publish_all()
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
            self._finalizer()

    def __enter__(self) -> NearstepOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and self._ranks is not None:
            self._ranks.abandon()  # unwinding: the other ranks may be gone; no collective now
        self.close()

    def __repr__(self) -> str:
        return f"nearstep.{type(self).__name__}(params={len(self._params)}, step={self._step}, mode={self.mode!r}, store='{self._store.path}')"


def _synchronizer(ref: weakref.ref[NearstepOptimizer]) -> Any:
    """A state_dict pre-hook that does not keep the optimizer alive."""

    def hook(*_args: Any, **_kwargs: Any) -> None:
        opt = ref()
        if opt is not None and not opt._closed:
            if opt._ranks is not None:
                opt._ranks.before_state_dict(opt.synchronize)
            else:
                opt.synchronize()

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
            None picks about 16 slices of 1 to 64 MiB (:func:`auto_slice_mb`).
        state_format: how the state is kept on the store: ``"fp32"`` (default for a new
            store), ``"bf16-kahan"``, ``"bf16-sr"``, ``"8bit"``, or a combination such as
            ``"bf16-sr+8bit"`` (see ``docs/accuracy.md``). None: the store's own format
            when resuming. A store is never converted silently: a different explicit
            format is refused.
        process_group: shard the state across this group's ranks. With an initialised
            default group (torchrun) that one is used without asking; without either,
            nothing is sharded. Each rank's store then holds its part: ``store`` gets a
            ``rank<N>`` subdirectory per rank, or may be a template with ``{rank}``.
            See the README's "Many ranks" and ``nearstep/distributed.py``.
        sharding: a :class:`~nearstep.ShardingConfig` (collective timeout, whether the
            gradients arrive averaged already).

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

    def _hyper(self, group: dict[str, Any]) -> kernels.Hyper:
        b1, b2 = group["betas"]
        return kernels.AdamWHyper(lr=_value(group["lr"]), beta1=_value(b1), beta2=_value(b2), eps=group["eps"],
                                  weight_decay=group["weight_decay"], maximize=group["maximize"])


class Adam(AdamW):
    """Adam (L2 weight decay added to the gradient, as ``torch.optim.Adam``); see :class:`AdamW`."""

    kind = "adam"

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, **options)

    def _hyper(self, group: dict[str, Any]) -> kernels.Hyper:
        b1, b2 = group["betas"]
        return kernels.AdamHyper(lr=_value(group["lr"]), beta1=_value(b1), beta2=_value(b2), eps=group["eps"],
                                 weight_decay=group["weight_decay"], maximize=group["maximize"])


class SGD(NearstepOptimizer):
    """SGD with momentum, dampening and Nesterov, as ``torch.optim.SGD``; see :class:`AdamW`."""

    kind = "sgd"

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize), **options)

    def _hyper(self, group: dict[str, Any]) -> kernels.Hyper:
        return kernels.SGDHyper(lr=_value(group["lr"]), momentum=group["momentum"], dampening=group["dampening"],
                                nesterov=group["nesterov"], weight_decay=group["weight_decay"], maximize=group["maximize"])


class Lion(NearstepOptimizer):
    """Lion (Chen et al., 2023): sign of an interpolated momentum, decoupled weight decay."""

    kind = "lion"

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize), **options)

    def _hyper(self, group: dict[str, Any]) -> kernels.Hyper:
        b1, b2 = group["betas"]
        return kernels.LionHyper(lr=_value(group["lr"]), beta1=_value(b1), beta2=_value(b2),
                                 weight_decay=group["weight_decay"], maximize=group["maximize"])

