"""The update rules' vocabulary: what the host tells the device to run, and what it reports back.

An optimizer step on the device is one of a few update rules (AdamW, Adam, SGD
with momentum, Lion), each with its hyperparameters, plus the guards of error
reduction around it. The host builds these values and sends them with every
``Apply`` request (see :mod:`nearstep.protocol`); the device's kernels
(:mod:`nearstep.kernels`) run them. They are frozen and validated on
construction, so a bad value fails on the host, before anything is queued.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "AdamWHyper", "AdamHyper", "SGDHyper", "LionHyper", "Hyper", "KERNELS", "state_names",
    "Guards", "SegmentReport", "UNWATCHED",
]


def _check_number(
    obj: object, name: str, *, low: float = 0.0, high: float | None = None, positive: bool = False
) -> None:
    """Check that ``obj.name`` is a finite real in [low, high), >= low or > 0; store it as a float."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0 (or None to turn it off), got {value!r}")
    if high is None and value < low:
        raise ValueError(f"{name} must be >= {low:g}, got {value!r}")
    if high is not None and not low <= value < high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}), got {value!r}")
    # Frozen dataclass: the only way to normalise ints and numpy scalars to float.
    object.__setattr__(obj, name, float(value))


def _check_flag(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


@dataclass(frozen=True, slots=True)
class AdamWHyper:
    """AdamW (decoupled weight decay), as ``torch.optim.AdamW``."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    maximize: bool = False

    def __post_init__(self) -> None:
        _check_adam_fields(self)


@dataclass(frozen=True, slots=True)
class AdamHyper:
    """Adam with L2 weight decay (added to the gradient), as ``torch.optim.Adam``."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    maximize: bool = False

    def __post_init__(self) -> None:
        _check_adam_fields(self)


def _check_adam_fields(hyper: AdamWHyper | AdamHyper) -> None:
    _check_number(hyper, "lr")
    _check_number(hyper, "beta1", high=1.0)
    _check_number(hyper, "beta2", high=1.0)
    _check_number(hyper, "eps")
    _check_number(hyper, "weight_decay")
    _check_flag(hyper, "maximize")


@dataclass(frozen=True, slots=True)
class SGDHyper:
    """SGD with optional (Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD``.

    ``decoupled_weight_decay``: the weights are multiplied by ``1 - lr * weight_decay`` before the
    step instead of the decay being added to the gradient (as AdamW and Keras' optimizers decay).
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    maximize: bool = False
    decoupled_weight_decay: bool = False

    def __post_init__(self) -> None:
        _check_number(self, "lr")
        _check_number(self, "momentum")
        _check_number(self, "dampening")
        _check_number(self, "weight_decay")
        _check_flag(self, "nesterov")
        _check_flag(self, "maximize")
        _check_flag(self, "decoupled_weight_decay")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum > 0 and zero dampening, "
                f"got momentum={self.momentum}, dampening={self.dampening}"
            )


@dataclass(frozen=True, slots=True)
class LionHyper:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0
    maximize: bool = False

    def __post_init__(self) -> None:
        _check_number(self, "lr")
        _check_number(self, "beta1", high=1.0)
        _check_number(self, "beta2", high=1.0)
        _check_number(self, "weight_decay")
        _check_flag(self, "maximize")


Hyper = AdamWHyper | AdamHyper | SGDHyper | LionHyper

KERNELS: dict[str, type] = {"adamw": AdamWHyper, "adam": AdamHyper, "sgd": SGDHyper, "lion": LionHyper}

_STATE_NAMES: dict[type, tuple[str, ...]] = {
    AdamWHyper: ("exp_avg", "exp_avg_sq"),
    AdamHyper: ("exp_avg", "exp_avg_sq"),
    # Kept even when momentum == 0 so a store's layout does not depend on a hyperparameter.
    SGDHyper: ("momentum_buffer",),
    LionHyper: ("exp_avg",),
}


def state_names(hyper_type: type) -> tuple[str, ...]:
    """The optimizer-state regions kept besides the fp32 master weights, in file order."""
    try:
        return _STATE_NAMES[hyper_type]
    except (KeyError, TypeError):
        known = ", ".join(t.__name__ for t in _STATE_NAMES)
        raise TypeError(f"no kernel for {hyper_type!r}; the kernels take one of {known}") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class Guards:
    """Error reduction applied around the update; every guard is optional.

    Attributes:
        skip_nonfinite: skip the whole step when any gradient element is non-finite.
            Decided on the host, which sees every slice; carried here so the
            configuration lives in one place. The kernels do not look at it.
        spike_clip: theta. Before the update, a gradient element with
            ``g**2 > theta**2 * v_hat`` is clipped to ``sign(g) * theta * sqrt(v_hat)``,
            where ``v_hat = v / (1 - beta2**(t - 1))`` is the bias-corrected second moment
            before this step (step ``t``): theta counts the element's own standard
            deviations. Elements with ``v == 0`` have no history and are left alone. Adam and AdamW only; for Adam the raw gradient
            is clipped, before L2 weight decay is added.
        spike_warmup: spike clipping starts once ``step > spike_warmup``, so early,
            noisy estimates of ``v`` do not clip.
        update_clip: cap on the RMS of each segment's weight update
            (``new_master - old_master``, weight decay included). A larger update is
            scaled down to RMS ``update_clip``; moments keep their unclipped values.
        telemetry: report each segment's update RMS and update-to-weight ratio even
            when ``update_clip`` is off. Costs one copy of the segment's master weights.
    """

    skip_nonfinite: bool = True
    spike_clip: float | None = None
    spike_warmup: int = 100
    update_clip: float | None = None
    telemetry: bool = False

    def __post_init__(self) -> None:
        _check_flag(self, "skip_nonfinite")
        _check_flag(self, "telemetry")
        for name in ("spike_clip", "update_clip"):
            value = getattr(self, name)
            if value is not None:
                _check_number(self, name, positive=True)
        warmup = self.spike_warmup
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral):
            raise TypeError(f"spike_warmup must be an int, got {type(warmup).__name__} ({warmup!r})")
        if warmup < 0:
            raise ValueError(f"spike_warmup must be >= 0, got {warmup!r}")

    def check_for(self, hyper_type: type) -> None:
        """Raise ValueError if these guards cannot run with the optimizer ``hyper_type``."""
        if self.spike_clip is not None and state_names(hyper_type) != ("exp_avg", "exp_avg_sq"):
            raise ValueError(
                "spike_clip needs the second moment, which only Adam and AdamW keep; "
                "remove spike_clip or use nearstep.AdamW"
            )


class SegmentReport(NamedTuple):
    """What the guards did to one segment during one step."""

    spike_clipped: int  # elements spike-clipped (0 when the guard is off or in warm-up)
    update_rms: float  # RMS of the applied update (after update_clip); nan when not computed
    update_to_weight: float  # ||applied update|| / ||old master|| (0 for an all-zero master); nan when not computed
    update_clipped: bool  # update_clip scaled this segment's update


#: The report of a segment no guard watched (nothing clipped, nothing measured).
UNWATCHED = SegmentReport(0, math.nan, math.nan, False)

