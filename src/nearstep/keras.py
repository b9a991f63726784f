"""Keras 3 optimizers whose state lives in a nearstep store and whose update runs on the device.

    import nearstep.keras
    model.compile(optimizer=nearstep.keras.AdamW(learning_rate=1e-3), loss="mse")
    model.fit(x, y)

:class:`AdamW`, :class:`Adam`, :class:`SGD` and :class:`Lion` are
``keras.optimizers.Optimizer`` subclasses with Keras' arguments and Keras' update
rules (epsilon outside the bias-corrected square root, SGD's velocity with the
learning rate inside it, decoupled weight decay for every optimizer). Keras does
what it does around the update itself -- learning-rate schedules,
``clipnorm``/``clipvalue``/``global_clipnorm``, ``gradient_accumulation_steps``,
loss-scale unscaling, ``exclude_from_weight_decay`` -- and hands the update to a
:class:`nearstep.AdamW`, :class:`nearstep.SGD` or :class:`nearstep.Lion` over the
same weights, whose moments live in the store: Keras holds no slot variables.

Backends: TensorFlow (``tf.keras`` is Keras 3) and torch. See ``docs/keras.md``.

[Note: Keras' update rules on torch's kernels]
The device runs torch's fused kernels, whose conventions differ from Keras';
each step's hyperparameters are chosen on the host so that the kernel computes
Keras' update (in float64, from Keras' iteration count ``k`` and the store's
step count ``n`` of the variables, which differ after gradient accumulation
or a skipped step):

- Adam/AdamW: Keras steps by ``lr * sqrt(1 - b2**k) / (1 - b1**k) * m / (sqrt(v) + eps)``,
  torch by ``L / (1 - b1**n) * m / (sqrt(v) / sqrt(1 - b2**n) + E)``. Equal with
  ``E = eps / sqrt(1 - b2**n)`` and ``L = lr * sqrt(1 - b2**k) / (1 - b1**k) * (1 - b1**n) / sqrt(1 - b2**n)``;
  torch decays by ``1 - L * WD``, Keras by ``1 - lr * wd``: ``WD = lr * wd / L``.
- SGD: Keras keeps the velocity ``u = mu * u - lr * g`` and adds it; torch keeps
  ``b = mu * b + g`` and subtracts ``lr * b``. With the gradient scaled by ``lr`` on
  the host and torch's ``lr`` 1, ``b = -u`` at every step, also when the learning rate
  changes (Nesterov likewise); the decay is decoupled (``SGD(decoupled_weight_decay=True)``).
- Lion: the same rule; ``lr``, betas and decay pass through.

[Note: landing at Keras' reads]
``mode="overlap"`` (torch backend) returns from the update once the device has it queued,
as the torch front end's overlap mode does; each variable's new weights land when
something first uses that variable. The torch front end lands in a module's forward
pre-hook, but Keras uses its variables outside any layer call (``get_weights``,
``model.save`` and ``ModelCheckpoint``, the constraints the base optimizer applies right
after the update, ``set_weights`` and ``assign``, callbacks, metrics, ``evaluate``,
``predict``, regularization losses), so here the landing is at the variable itself: the
optimizer's variables get a subclass of their class (:class:`_LandsBeforeUse`) whose
``value`` lands the variable's slices first. On the torch backend every use of a
Keras variable's value goes through ``value``: ops (``Variable.__torch_function__``,
``convert_to_tensor``), ``numpy()`` and ``__array__``, ``assign``/``assign_add``/
``assign_sub`` (``_direct_assign`` copies into ``value``), and only ``__repr__`` reads
``_value`` itself (guarded as well). So a read sees the new weights and a write lands
the update before it writes, as in sync mode; a layer's call lands its kernel at its
first op, so the early layers of step t+1 run while the device updates the later ones.
What it does not see are torch's own reads of the tensors behind the variables, which
Keras itself does not make in ``fit``/``evaluate``/``predict``/saving:

- torch modules inside the model (``TorchModuleWrapper``): a forward pre-hook on each
  Keras layer that holds one lands that module's parameters before the layer's call;
- ``model.state_dict()`` / ``load_state_dict()`` (torch's API on a Keras model): pre-hooks
  synchronise, as the torch front end's do;
- a torch tensor taken from ``variable.value`` earlier and read after an update, or
  ``model.parameters()`` read directly: the user's to order (``optimizer.synchronize()``;
  ``NEARSTEP_CHECK_READS=1`` makes such a read raise while testing).

The model is found without being passed in: a global forward pre-hook (torch's
``register_module_forward_pre_hook``, removed once found) notes the Keras models called
while the optimizer is open, and the first update refuses to go on, with what to do,
when none of them holds every variable the optimizer updates. ``jit_compile=True`` is
refused: a compiled graph would read the weights without passing through ``value``.
The end of ``fit`` (``finalize_variable_values``), ``save_own_variables``,
``get_config`` and ``close()`` synchronise. Keras' ``iterations`` and learning rate are
read by the update as in sync mode, and the device receives them with the step, so the
numbers are sync's bit for bit.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import pathlib
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import keras
import numpy as np
import torch

from . import optim as _optim
from .device import DeviceConfig
from .errors import StoreError, StoreLockedError, StoreMismatchError, UnsupportedUsageError
from .store import MANIFEST, read_manifest
from .rules import Guards

__all__ = ["AdamW", "Adam", "SGD", "Lion", "DeviceOptimizer", "MODES"]

BACKENDS = ("tensorflow", "torch")
MODES = ("sync", "overlap")
_STATE_PREFIX = "nearstep."  # keys of the nearstep state in a Keras weights store, beside Keras' "0", "1", ...


def _backend() -> str:
    name = keras.backend.backend()
    if name not in BACKENDS:
        raise UnsupportedUsageError(
            f"nearstep.keras runs with the TensorFlow and torch backends of Keras; this Keras uses {name!r}. "
            f"Set KERAS_BACKEND=tensorflow or KERAS_BACKEND=torch before importing keras.")
    return name


def _check_mode(mode: Any, backend: str) -> str:
    if mode not in MODES:
        why = (" (delayed mode leaves the weights one step stale, which is another optimizer than Keras')"
               if mode == "delayed" else "")
        raise ValueError(f"nearstep.keras mode must be 'sync' or 'overlap', got {mode!r}{why}")
    if mode == "overlap" and backend != "torch":
        raise ValueError(
            "mode='overlap' needs Keras' torch backend (KERAS_BACKEND=torch). On TensorFlow, model.fit runs each "
            "step as one call of a compiled graph that reads the weights inside it, with no point where one "
            "layer's new weights could arrive while the next batch starts; returning early would let the next "
            "step read the old weights. Use mode='sync' (the default) there; docs/keras.md says what it costs.")
    return mode


def _number(value: Any, name: str) -> float:
    if callable(value) or isinstance(value, bool):
        raise TypeError(f"nearstep.keras needs {name} as a number, got {type(value).__name__}; callables and "
                        f"tensors are not supported (the learning rate may be a schedule)")
    return float(value)


def _device_from_config(device: Any) -> DeviceConfig | str | None:
    if isinstance(device, dict):
        fields = dict(device)
        if fields.get("cores") is not None:
            fields["cores"] = tuple(fields["cores"])
        return DeviceConfig(**fields)
    return device


class _HostSide:
    """What the device's update needs on the host: the nearstep optimizer over a torch view of the
    weights. One plain object, so Keras' attribute tracking never wraps its lists."""

    def __init__(self) -> None:
        self.engine: _optim.NearstepOptimizer | None = None
        self.params: list[torch.Tensor] = []  # in the order of the optimizer's variables
        self.positions: list[int] = []  # variable index -> position in the engine's parameters
        self.groups: list[list[int]] = []  # engine param group -> variable indices
        self.group_decay: list[bool] = []  # engine param group -> whether its variables decay
        self.shadow = True  # TensorFlow: torch copies of the weights; torch backend: the weights themselves
        self.landing: _ReadLanding | None = None  # overlap mode: lands each variable where it is used


class _LandsBeforeUse:
    """Mixed into the class of an overlap-mode optimizer's variables: their value lands first.

    See [Note: landing at Keras' reads]. The variable's ``_nearstep_landing`` says by whom. (No
    ``__slots__``: with them CPython refuses to assign the class to an existing variable.)
    """

    @property
    def value(self) -> Any:
        _land_variable(self)
        return super().value  # type: ignore[misc]

    def __repr__(self) -> str:
        _land_variable(self)
        return super().__repr__()


# Kept out of dynamo's tracing: whether a variable waits depends on the step in flight, which a
# compiled graph would freeze at trace time (jit_compile=True is refused in overlap mode anyway).
@torch.compiler.disable
def _land_variable(variable: Any) -> None:
    landing = variable.__dict__.get("_nearstep_landing")
    if landing is not None:
        landing.land(variable)


_GUARDED_CLASSES: dict[type, type] = {}


def _guarded_class(cls: type) -> type:
    """``cls`` with :class:`_LandsBeforeUse` in front (one per Keras variable class; the same name)."""
    if issubclass(cls, _LandsBeforeUse):
        return cls
    guarded = _GUARDED_CLASSES.get(cls)
    if guarded is None:
        guarded = type(cls.__name__, (_LandsBeforeUse, cls), {"__module__": __name__})
        _GUARDED_CLASSES[cls] = guarded
    return guarded


class _ReadLanding:
    """Overlap mode on the torch backend: each variable's new weights land where it is used.

    Owns the three landing points of [Note: landing at Keras' reads]: the variables' value,
    forward pre-hooks on the Keras layers that hold torch modules, and ``state_dict`` hooks on
    the model, which it finds by a global forward pre-hook while none holds the variables.
    """

    def __init__(self) -> None:
        self.engine: _optim.NearstepOptimizer | None = None
        self.variables: list[Any] = []
        self._tracked: frozenset[int] = frozenset()  # id() of the torch tensors behind the variables
        self._models: list[weakref.ref[Any]] = []  # Keras models called while no model is hooked
        self._model: weakref.ref[Any] | None = None  # the model hooked
        self._handles: list[Any] = []
        ref = weakref.ref(self)

        @torch.compiler.disable
        def note_model(module: torch.nn.Module, _args: Any) -> None:
            landing = ref()
            if landing is not None and isinstance(module, keras.Model):
                landing._note_model(module)

        self._finder = torch.nn.modules.module.register_module_forward_pre_hook(note_model)
        weakref.finalize(self, self._finder.remove)

    # -- the variables ---------------------------------------------------------------------------

    def watch(self, engine: _optim.NearstepOptimizer, variables: Sequence[Any]) -> None:
        """Land ``engine``'s updates into these variables (its parameters are their tensors)."""
        self.engine = engine
        self.variables = list(variables)
        self._tracked = frozenset(id(v._value) for v in self.variables)
        for v in self.variables:
            other = v.__dict__.get("_nearstep_landing")
            if other is not None and other is not self:
                other.synchronize()  # a variable given to a new optimizer: the old one's update first
            v._nearstep_landing = self
            v.__class__ = _guarded_class(type(v))
        for ref in self._models:
            model = ref()
            if model is not None and self._model is None:
                self._hook_model(model)

    def land(self, variable: Any) -> None:
        """Before ``variable``'s value is used: its new weights, if they are still on their way."""
        engine = self.engine
        if engine is not None:
            tensor = variable._value
            if engine.weights_pending(tensor):
                engine.land_weights((tensor,))

    def synchronize(self) -> None:
        engine = self.engine
        if engine is not None and not engine._closed:
            engine.synchronize()

    def release(self) -> None:
        """The optimizer is closed (its last update landed): the variables and the model as they were."""
        self.engine = None
        for v in self.variables:
            if v.__dict__.get("_nearstep_landing") is self:
                del v._nearstep_landing
                v.__class__ = type(v).__bases__[1]  # (_LandsBeforeUse, the class it had)
        self.variables = []
        self._model = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._finder.remove()

    # -- the model -------------------------------------------------------------------------------

    def _note_model(self, model: Any) -> None:
        if self._model is not None:
            return
        if self.engine is not None:
            self._hook_model(model)
        elif not any(ref() is model for ref in self._models):
            self._models = [ref for ref in self._models if ref() is not None][-7:] + [weakref.ref(model)]

    def _hook_model(self, model: Any) -> None:
        """Hook ``model`` if it holds every variable: its torch modules and its ``state_dict``."""
        held = {id(p) for p in model.parameters()}
        if not self._tracked <= held:
            return
        ref = weakref.ref(self)
        for layer in model.modules():
            if not isinstance(layer, keras.layers.Layer):
                continue
            # A torch module inside a Keras layer (TorchModuleWrapper) reads its parameters
            # itself, not through the variables' value: they land before the layer's call.
            inner = [p for name, child in layer.named_children()
                     if name != "_torch_params" and not isinstance(child, keras.layers.Layer)
                     for p in child.parameters() if id(p) in self._tracked]
            if inner:
                self._handles.append(layer.register_forward_pre_hook(_land_torch_module(ref, inner)))

        def synchronize(*_args: Any, **_kwargs: Any) -> None:
            landing = ref()
            if landing is not None:
                landing.synchronize()

        # torch's state_dict() on a Keras model reads the tensors directly.
        self._handles.append(model.register_state_dict_pre_hook(synchronize))
        self._handles.append(model.register_load_state_dict_pre_hook(synchronize))
        self._model = weakref.ref(model)
        self._models = []
        self._finder.remove()

    def check_model(self) -> None:
        """At an update: refuse to launch it unless a model holding every variable is hooked."""
        if self._model is not None and self._model() is not None:
            return
        raise UnsupportedUsageError(
            "mode='overlap' found no Keras model holding all of this optimizer's variables among the models called "
            "since it was made: it hooks that model to land the new weights where torch reads them directly "
            "(torch modules inside it, model.state_dict()). Train through model.fit or call the keras.Model before "
            "the first update, or use mode='sync'.")


def _land_torch_module(ref: weakref.ref[_ReadLanding], params: list[torch.Tensor]) -> Any:
    @torch.compiler.disable
    def pre_hook(_layer: Any, _args: Any) -> None:
        landing = ref()
        engine = None if landing is None else landing.engine
        if engine is not None and any(engine.weights_pending(p) for p in params):
            engine.land_weights(params)

    return pre_hook


@dataclasses.dataclass(frozen=True, slots=True)
class _Step:
    """One update's inputs, as the host sees them."""

    k: int  # Keras' local step: iterations + 1
    lr: float


class DeviceOptimizer(keras.optimizers.Optimizer):
    """A Keras optimizer whose state is in a nearstep store and whose update runs on the device.

    Arguments beyond Keras' own:
        store: directory of the store (created; default: a fresh one under ``./.nearstep/``). A
            directory that holds a store from an earlier run is refused unless the optimizer is
            being restored from a Keras checkpoint, whose state then replaces the store's.
        device: a :class:`nearstep.DeviceConfig`, ``"emulated"`` (default) or ``"inline"``.
        state_format: how the state is stored, as for :class:`nearstep.AdamW` (default fp32).
        slice_mb: slice size in MiB (default: automatic).
        guards: nearstep's error reduction (:class:`nearstep.Guards`). Its default skips a step
            whose gradients are not finite, where Keras' own optimizers would write NaN.
        mode: ``"sync"`` (default): the update is done when Keras' step returns. ``"overlap"``
            (torch backend only): the step returns once the device has the update, and each
            variable's new weights land where it is next used, so the device's update runs while
            the next batch is prepared and its forward starts; the same numbers as sync (see
            [Note: landing at Keras' reads]). Refused on TensorFlow and with ``jit_compile=True``.

    ``use_ema`` is refused (the average would be a second copy of the weights in Keras). See
    docs/keras.md for what each mode costs.
    """

    _kind: ClassVar[str]

    def __init__(self, learning_rate: Any, *, store: str | os.PathLike | None = None,
                 device: DeviceConfig | str | dict | None = None, state_format: str | None = None,
                 slice_mb: float | None = None, guards: Guards | dict | None = None, mode: str = "sync",
                 **kwargs: Any) -> None:
        backend = _backend()  # before Keras' __init__, which refuses attributes set earlier
        mode = _check_mode(mode, backend)
        super().__init__(learning_rate=learning_rate, **kwargs)
        self._nearstep_backend = backend
        self._nearstep_mode = mode
        if self.use_ema:
            raise UnsupportedUsageError(
                "nearstep.keras does not support use_ema=True: Keras would keep the moving average as a second "
                "copy of every weight. Drop use_ema, or average checkpoints instead.")
        self._nearstep_store = None if store is None else os.fspath(store)
        self._nearstep_device = _device_from_config(device)
        self._nearstep_format = state_format
        self._nearstep_slice_mb = slice_mb
        self._nearstep_guards = Guards(**guards) if isinstance(guards, dict) else guards
        self._host = _HostSide()
        if mode == "overlap":
            # From now on, to see the model's first call (see [Note: landing at Keras' reads]).
            self._host.landing = _ReadLanding()

    # -- what each optimizer maps to (see [Note: Keras' update rules on torch's kernels]) -------

    def _engine_class(self) -> tuple[type[_optim.NearstepOptimizer], dict[str, Any]]:
        raise NotImplementedError

    def _group_settings(self, step: _Step, n: int, decay: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _scale(self, step: _Step) -> float | None:
        """A factor for the gradients before they are staged (SGD's velocity), or None."""
        return None

    # -- building --------------------------------------------------------------------------------

    def build(self, variables: list[Any]) -> None:
        super().build(variables)
        # The nearstep optimizer is made at the first update (or when a checkpoint is loaded),
        # eagerly, where the initial weights can be read; build may run inside a traced function.

    def _weight_decay_for(self, variable: Any) -> bool:
        return self.weight_decay is not None and self.weight_decay != 0 and self._use_weight_decay(variable)

    def _open(self, values: list[torch.Tensor] | None, restoring: bool = False) -> _optim.NearstepOptimizer:
        host = self._host
        if host.engine is not None:
            return host.engine
        variables = list(self._trainable_variables)
        _refuse_half_precision_variables(variables)
        if self._nearstep_backend == "torch":
            host.params, host.shadow = [v.value for v in variables], False
        else:
            if values is None:
                values = [torch.from_numpy(np.array(v.numpy())) for v in variables]
            host.params = [torch.tensor(np.asarray(v), requires_grad=True) if not isinstance(v, torch.Tensor)
                           else v.detach().clone().requires_grad_(True) for v in values]
        names, seen = [], set()
        for i, v in enumerate(variables):
            # Layer and variable ("dense/kernel"): Keras prefixes the model's name only when the
            # layers were built inside it, so a loaded model's paths lose it; these stay the same.
            name = "/".join(str(getattr(v, "path", None) or v.name).split("/")[-2:])
            if name in seen:
                name = f"{name}#{i}"
            seen.add(name)
            names.append(name)
        decays = [self._weight_decay_for(v) for v in variables]
        if self._nearstep_mode == "overlap":
            # The device updates in the order of the nearstep parameters, and a layer's forward waits
            # for its own variables only: groups of consecutive variables keep the model's order
            # (two groups, decaying and not, would put every bias after every kernel).
            split = [(d, [i for i, _ in run]) for d, run in itertools.groupby(enumerate(decays), key=lambda e: e[1])]
        else:
            split = [(True, [i for i, d in enumerate(decays) if d]),
                     (False, [i for i, d in enumerate(decays) if not d])]
        host.groups = [idx for _decay, idx in split if idx]
        host.group_decay = [decay for decay, idx in split if idx]
        host.positions = [0] * len(variables)
        for pos, i in enumerate(i for group in host.groups for i in group):
            host.positions[i] = pos
        cls, defaults = self._engine_class()
        groups = [{"params": [(names[i], host.params[i]) for i in group]} for group in host.groups]
        path = self._nearstep_store or _optim.default_store_path(f"keras-{self._kind}")
        if not restoring and (pathlib.Path(path) / MANIFEST).is_file():
            # Refused before anything opens it: opening a store puts its masters into the weights
            # (on the torch backend, into the model's own variables).
            at = read_manifest(pathlib.Path(path)).step
            if at > 0:
                raise StoreError(
                    f"the store {str(path)!r} holds the state of an earlier run (step {at}); a new Keras "
                    f"optimizer starts from zero state. Pass a new directory as store=, or delete that one; to "
                    f"resume a Keras run, load its checkpoint (keras.saving.load_model, model.load_weights or "
                    f"BackupAndRestore), which puts the saved state into the store.")
        options = dict(mode="sync", device=self._nearstep_device, state_format=self._nearstep_format,
                       slice_mb=self._nearstep_slice_mb, guards=self._nearstep_guards)
        if self._nearstep_mode == "overlap":
            # No hooks: Keras sets the gradients and the step's hyperparameters after backward, and
            # the landing is at the variables (see [Note: landing at Keras' reads]).
            options.update(mode="overlap", hooks=False)
        try:
            engine = cls(groups, **defaults, store=path, **options)
        except (StoreLockedError, StoreMismatchError) as exc:
            if not restoring:
                raise
            # A model loaded while the one that saved it still trains on that store, or loaded
            # under other variable paths (Keras names a loaded model's variables afresh): the
            # checkpoint holds the whole state, so a store of its own serves as well.
            why = "is in use by another optimizer" if isinstance(exc, StoreLockedError) else \
                "holds a store made for other variables"
            path = f"{path}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6:06d}"
            warnings.warn(f"{str(self._nearstep_store)!r} {why}; the restored optimizer {self.name!r} keeps "
                          f"its state in {path!r}", UserWarning, stacklevel=3)
            engine = cls(groups, **defaults, store=path, **options)
        host.engine = engine
        if host.landing is not None:
            host.landing.watch(engine, variables)
        return engine

    # -- the update ------------------------------------------------------------------------------

    def _apply_weight_decay(self, variables: list[Any]) -> None:
        # Decoupled decay is part of the device's update (see [Note: Keras' update rules on torch's
        # kernels]): Keras must not decay the weights a second time.
        return None

    def _backend_update_step(self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any) -> None:
        known = self._trainable_variables
        if len(trainable_variables) != len(known):
            have = {id(v) for v in trainable_variables}
            missing = [v.path for v in known if id(v) not in have]
            raise UnsupportedUsageError(
                f"no gradient for {', '.join(map(repr, missing[:3]))}{' ...' if len(missing) > 3 else ''}: "
                f"nearstep.keras updates every trainable variable at every step (the store counts each "
                f"variable's steps, Keras one count for all). Set trainable=False on variables the loss does "
                f"not use.")
        order = [self._get_variable_index(v) for v in trainable_variables]
        ordered: list[Any] = [None] * len(known)
        for g, i in zip(grads, order):
            ordered[i] = g
        if self._nearstep_backend == "tensorflow":
            self._tf_update(ordered, learning_rate)
        else:
            # Known here, where dynamo traces (jit_compile=True); inside _torch_update it is not.
            self._torch_update(ordered, learning_rate, torch.compiler.is_compiling())

    # Kept out of torch.compile (Keras' jit_compile=True on the torch backend): the update goes to
    # the device, which no graph can hold.
    @torch.compiler.disable
    def _torch_update(self, grads: list[Any], learning_rate: Any, compiled: bool = False) -> None:
        landing = self._host.landing
        if landing is not None and compiled:
            raise UnsupportedUsageError(
                "mode='overlap' lands each variable's new weights when Keras reads its value, which a graph "
                "compiled by torch.compile reads without asking: use model.compile(..., jit_compile=False), "
                "or mode='sync' with jit_compile=True.")
        with torch.no_grad():
            k = int(keras.ops.convert_to_numpy(self.iterations)) + 1
            if landing is not None:
                self._open(None)
                landing.check_model()  # before anything is in flight
            self._host_update(_Step(k, float(learning_rate)), grads, None)

    def _tf_update(self, grads: list[Any], learning_rate: Any) -> None:
        import tensorflow as tf

        if tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise UnsupportedUsageError(
                "nearstep.keras updates on one replica; this model trains under a tf.distribute strategy with "
                f"{tf.distribute.get_strategy().num_replicas_in_sync} replicas. Train without the strategy, or use "
                "nearstep's torch front end for many ranks (README, \"Many ranks\").")
        variables = list(self._trainable_variables)
        if self._host.engine is None:
            # Open the store and the device now, while Keras traces the step, so that what can go
            # wrong there (a store of an earlier run, a full disk) is raised as itself; inside the
            # py_function TensorFlow would turn it into an InvalidArgumentError. init_scope reads
            # the initial weights eagerly.
            with tf.init_scope():
                self._open(None)
        grads = [tf.convert_to_tensor(g) for g in grads]  # IndexedSlices (embeddings) become dense
        values = [tf.convert_to_tensor(v.value) for v in variables]
        # Keras' local step counts updates, not accumulated micro-batches (its ``iterations``); the
        # learning rate Keras passes in already follows its schedule.
        k = tf.cast(tf.convert_to_tensor(self.iterations), tf.int64) + 1
        lr = tf.cast(learning_rate, tf.float64)
        # [Note: the update inside Keras' compiled step] tf.py_function runs the device's update
        # where the graph reaches it: after the gradients and their clipping, before the new
        # weights are assigned (the assignments read its outputs). XLA cannot compile it: see
        # _refuse_xla.
        if tf.executing_eagerly():
            # run_eagerly=True: no graph, so the update is called as it is and its errors keep their type.
            new = [tf.convert_to_tensor(a) for a in self._tf_host_update(k, lr, *grads, *values)]
        else:
            _refuse_xla()
            # Inside the graph TensorFlow reports an error of the update as an InvalidArgumentError
            # that carries nearstep's message.
            new = tf.py_function(func=self._tf_host_update, inp=[k, lr, *grads, *values],
                                 Tout=[tf.as_dtype(v.dtype) for v in variables])
        for v, value in zip(variables, new):
            value.set_shape(v.shape)
            v.assign(value)

    def _tf_host_update(self, k: Any, lr: Any, *tensors: Any) -> list[np.ndarray]:
        count = len(tensors) // 2
        grads = [torch.from_numpy(np.array(t.numpy())) for t in tensors[:count]]
        values = [torch.from_numpy(np.array(t.numpy())) for t in tensors[count:]]
        with torch.no_grad():
            self._host_update(_Step(int(k.numpy()), float(lr.numpy())), grads, values)
        return [p.detach().numpy().copy() for p in self._host.params]

    @torch.no_grad()
    def _host_update(self, step: _Step, grads: list[torch.Tensor], values: list[torch.Tensor] | None) -> None:
        engine = self._open(values)
        host = self._host
        if values is not None and host.shadow:
            for p, v in zip(host.params, values):
                if not torch.equal(p, v):
                    p.copy_(v)  # weights set since the last step (set_weights, a load): the store adopts them
        scale = self._scale(step)
        for p, g in zip(host.params, grads):
            g = g.to(dtype=p.dtype, device=p.device)
            p.grad = g * scale if scale is not None else g
        steps = engine._param_steps
        for g, (group, members) in enumerate(zip(engine.param_groups, host.groups)):
            counts = {steps[host.positions[i]] for i in members}
            if len(counts) != 1:  # every variable is updated at every step: cannot happen
                raise AssertionError(f"variables of one group at different steps: {sorted(counts)}")
            decays = {self._weight_decay_for(self._trainable_variables[i]) for i in members}
            if decays != {host.group_decay[g]}:
                raise UnsupportedUsageError(
                    "the variables that decay changed after the first update (exclude_from_weight_decay or "
                    "weight_decay set late): nearstep.keras groups them when it opens the store. Set them before "
                    "training starts, on a new optimizer.")
            group.update(self._group_settings(step, counts.pop() + 1, decays.pop()))
        try:
            engine.step()
        finally:
            for p in host.params:
                p.grad = None

    # -- state in Keras' checkpoints -------------------------------------------------------------

    def finalize_variable_values(self, var_list: Any) -> None:
        # The end of fit (Keras calls it before on_train_end): the last update lands and commits.
        self.synchronize()
        super().finalize_variable_values(var_list)

    def save_own_variables(self, store: Any) -> None:
        """Keras' own variables, then the nearstep state (moments, masters, steps) read from the store."""
        self.synchronize()  # the weights Keras saves beside this state are the last step's
        for i, variable in enumerate(self.variables):
            store[str(i)] = variable.numpy()
        engine = self._host.engine
        if engine is None:
            return
        full = engine.full_state_dict()
        by_position = {pos: i for i, pos in enumerate(self._host.positions)}
        for pos, entry in full["state"].items():
            for name, tensor in entry.items():
                store[f"{_STATE_PREFIX}{by_position[pos]}.{name}"] = tensor.detach().cpu().numpy()
        store[f"{_STATE_PREFIX}step"] = np.asarray(full["nearstep"]["step"], dtype=np.int64)

    def load_own_variables(self, store: Any) -> None:
        keys = list(store.keys())
        own = [k for k in keys if not k.startswith(_STATE_PREFIX)]
        if len(own) != len(self.variables):
            warnings.warn(f"Skipping variable loading for optimizer {self.name!r}: it has {len(self.variables)} "
                          f"variables, the saved optimizer {len(own)}.", stacklevel=2)
            return
        for i, variable in enumerate(self.variables):
            variable.assign(np.asarray(store[str(i)]))
        if f"{_STATE_PREFIX}step" not in keys:
            return  # saved before any update: the state is zero
        # Keras loaded the model's weights before this (layers come first). Taken now: opening the
        # store and loading its state put the store's masters into the weights on the torch backend.
        loaded = [torch.from_numpy(np.array(v.numpy())) for v in self._trainable_variables]
        engine = self._open(None, restoring=True)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key in keys:
            if key.startswith(_STATE_PREFIX) and key != f"{_STATE_PREFIX}step":
                index, name = key[len(_STATE_PREFIX):].split(".", 1)
                state.setdefault(self._host.positions[int(index)], {})[name] = torch.from_numpy(np.array(store[key]))
        from .checkpoint import FULL_LAYOUT, pack_param_groups

        engine.load_state_dict({"state": state, "param_groups": pack_param_groups(engine.param_groups),
                                "nearstep": {"layout": FULL_LAYOUT, "kind": engine.kind,
                                             "step": int(np.asarray(store[f"{_STATE_PREFIX}step"]))}})
        # The model's weights are the truth (loaded with the model). They can differ from the masters
        # saved beside them: a variable constraint applies after the update, and the run that saved
        # them would have adopted the constrained weights into the store at its next update. So
        # would this one: those weights go back into the parameters, marked as edited.
        host = self._host
        edited = []
        with torch.no_grad():
            for i, (p, weights) in enumerate(zip(host.params, loaded)):
                if not torch.equal(p, weights):
                    p.copy_(weights)
                    edited.append(host.positions[i])
        engine._pipeline.note_weights()
        engine._pipeline.mark_edited(edited)

    def get_config(self) -> dict[str, Any]:
        self.synchronize()  # model.save asks for it with the weights: they are the last step's
        config = super().get_config()
        device = self._nearstep_device
        config.update({
            "mode": self._nearstep_mode,
            "store": self._nearstep_store,
            "device": dataclasses.asdict(device) if isinstance(device, DeviceConfig) else device,
            "state_format": self._nearstep_format,
            "slice_mb": self._nearstep_slice_mb,
            "guards": dataclasses.asdict(self._nearstep_guards) if self._nearstep_guards is not None else None,
        })
        return config

    # -- nearstep's side -------------------------------------------------------------------------

    @property
    def nearstep_optimizer(self) -> _optim.NearstepOptimizer | None:
        """The nearstep optimizer doing the update (None before the first update)."""
        return self._host.engine

    @property
    def store_path(self) -> str | None:
        """The store's directory (None before the first update): ``nearstep inspect`` reads it."""
        engine = self._host.engine
        return None if engine is None else str(engine.store_path)

    def stats(self) -> dict[str, Any]:
        """nearstep's counters (see :meth:`nearstep.AdamW.stats`); empty before the first update."""
        engine = self._host.engine
        return {} if engine is None else engine.stats()

    @property
    def mode(self) -> str:
        """``"sync"`` or ``"overlap"``: see :class:`DeviceOptimizer`."""
        return self._nearstep_mode

    def synchronize(self) -> None:
        """Land the update in flight (overlap mode) into every variable and wait for its commit.

        Keras' own reads need it not (each variable lands when it is used); call it before
        reading the torch tensors behind the variables directly (``model.parameters()``).
        """
        engine = self._host.engine
        if engine is not None:
            engine.synchronize()

    def close(self) -> None:
        """Land the last update, stop the device and release the store (the store keeps the last
        step). Idempotent."""
        host = self._host
        engine = host.engine
        try:
            if engine is not None:
                engine.close()
        finally:
            host.engine = None
            if host.landing is not None:
                host.landing.release()


_HALF_PRECISION = ("float16", "bfloat16")


def _refuse_half_precision_variables(variables: Sequence[Any]) -> None:
    """Refuse variables stored in half precision (a ``"float16"``/``"bfloat16"`` policy, not a mixed one).

    Keras' own optimizers update such a variable in its own precision (bf16 updates of 1e-3 often
    round to nothing; fp16 moments overflow), the device against an fp32 master: the numbers would
    differ from Keras' without a word. Mixed policies keep the variables in float32 and are Keras'.
    """
    half = [v for v in variables if keras.backend.standardize_dtype(v.dtype) in _HALF_PRECISION]
    if half:
        names = ", ".join(f"{v.path!r} ({keras.backend.standardize_dtype(v.dtype)})" for v in half[:3])
        raise UnsupportedUsageError(
            f"nearstep.keras updates float32 variables; {names}{' ...' if len(half) > 3 else ''} "
            f"{'is' if len(half) == 1 else 'are'} stored in half precision, which Keras' own optimizers update "
            f"in half-precision arithmetic and the device in float32: the numbers would differ from Keras'. Keep "
            f"the variables in float32 with a mixed policy (keras.mixed_precision.set_global_policy("
            f"'mixed_bfloat16') or 'mixed_float16': half-precision compute, float32 variables), or use Keras' "
            f"own optimizer for half-precision variables.")


def _refuse_xla() -> None:
    """Raise at trace time inside an XLA-compiled function, where ``tf.py_function`` cannot run."""
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - TensorFlow moved its internals; the XLA error will say it
        return
    graph = tf_ops.get_default_graph()
    if control_flow_util.GraphOrParentsInXlaContext(graph) or getattr(graph, "_xla_compile", False):
        raise UnsupportedUsageError(
            "nearstep.keras runs the update on the device, outside the compiled graph, which XLA cannot "
            "compile: use model.compile(..., jit_compile=False). (jit_compile='auto' is False on a machine "
            "without a GPU, True with one.)")


def _adam_settings(opt: DeviceOptimizer, step: _Step, n: int, decay: bool) -> dict[str, Any]:
    b1, b2 = _number(opt.beta_1, "beta_1"), _number(opt.beta_2, "beta_2")
    eps = _number(opt.epsilon, "epsilon")
    k, lr = step.k, step.lr
    root_n = math.sqrt(1.0 - b2**n)
    scale = lr * math.sqrt(1.0 - b2**k) / (1.0 - b1**k) * (1.0 - b1**n) / root_n
    wd = _number(opt.weight_decay, "weight_decay") if decay else 0.0
    return {"lr": scale, "eps": eps / root_n, "weight_decay": lr * wd / scale if scale > 0 else 0.0,
            "betas": (b1, b2)}


@keras.saving.register_keras_serializable(package="nearstep")
class Adam(DeviceOptimizer):
    """``keras.optimizers.Adam`` with its state in a nearstep store; see :class:`DeviceOptimizer`."""

    _kind = "adam"

    def __init__(self, learning_rate: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, amsgrad: bool = False, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if amsgrad:
            raise UnsupportedUsageError("nearstep.keras does not support amsgrad=True (no AMSGrad kernel on the "
                                        "device); use amsgrad=False")
        self.beta_1, self.beta_2, self.epsilon, self.amsgrad = beta_1, beta_2, epsilon, amsgrad
        for name_, value in (("beta_1", beta_1), ("beta_2", beta_2), ("epsilon", epsilon)):
            _number(value, name_)

    def _engine_class(self) -> tuple[type[_optim.NearstepOptimizer], dict[str, Any]]:
        return _optim.AdamW, {"lr": 0.0, "betas": (float(self.beta_1), float(self.beta_2)), "eps": float(self.epsilon),
                              "weight_decay": 0.0}

    def _group_settings(self, step: _Step, n: int, decay: bool) -> dict[str, Any]:
        return _adam_settings(self, step, n, decay)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon, "amsgrad": self.amsgrad})
        return config


@keras.saving.register_keras_serializable(package="nearstep")
class AdamW(Adam):
    """``keras.optimizers.AdamW`` with its state in a nearstep store; see :class:`DeviceOptimizer`."""

    _kind = "adamw"

    def __init__(self, learning_rate: Any = 0.001, weight_decay: float = 0.004, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False, name: str | None = None,
                 **kwargs: Any) -> None:
        if weight_decay is None:
            raise ValueError("Argument `weight_decay` must be a float. Received: weight_decay=None")
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, amsgrad=amsgrad,
                         name=name, weight_decay=weight_decay, **kwargs)


@keras.saving.register_keras_serializable(package="nearstep")
class SGD(DeviceOptimizer):
    """``keras.optimizers.SGD`` with its state in a nearstep store; see :class:`DeviceOptimizer`."""

    _kind = "sgd"

    def __init__(self, learning_rate: Any = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 name: str | None = None, **kwargs: Any) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not isinstance(momentum, float | int) or isinstance(momentum, bool) or not 0 <= momentum <= 1:
            raise ValueError("`momentum` must be a float between [0, 1].")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs a momentum > 0 (Keras' Nesterov step without momentum is "
                             "plain SGD: drop nesterov)")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def _engine_class(self) -> tuple[type[_optim.NearstepOptimizer], dict[str, Any]]:
        return _optim.SGD, {"lr": 1.0, "momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": 0.0,
                            "decoupled_weight_decay": True}

    def _group_settings(self, step: _Step, n: int, decay: bool) -> dict[str, Any]:
        wd = _number(self.weight_decay, "weight_decay") if decay else 0.0
        return {"lr": 1.0, "weight_decay": step.lr * wd}

    def _scale(self, step: _Step) -> float | None:
        return step.lr

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"momentum": self.momentum, "nesterov": self.nesterov})
        return config


@keras.saving.register_keras_serializable(package="nearstep")
class Lion(DeviceOptimizer):
    """``keras.optimizers.Lion`` with its state in a nearstep store; see :class:`DeviceOptimizer`."""

    _kind = "lion"

    def __init__(self, learning_rate: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.99,
                 name: str | None = None, **kwargs: Any) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0 < _number(beta_1, "beta_1") <= 1:
            raise ValueError(f"Argument for `beta_1` must be in range (0, 1]. Received: beta_1={beta_1}.")
        self.beta_1, self.beta_2 = float(beta_1), _number(beta_2, "beta_2")

    def _engine_class(self) -> tuple[type[_optim.NearstepOptimizer], dict[str, Any]]:
        return _optim.Lion, {"lr": 0.0, "betas": (self.beta_1, self.beta_2), "weight_decay": 0.0}

    def _group_settings(self, step: _Step, n: int, decay: bool) -> dict[str, Any]:
        wd = _number(self.weight_decay, "weight_decay") if decay else 0.0
        return {"lr": step.lr, "weight_decay": wd}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2})
        return config
