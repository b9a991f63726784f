"""The protocol between the host and a computational storage device.

This module is the whole vocabulary the two sides share: the requests a host
queues, the completions it waits on, the timeline events a device reports, what
a device says it offers, and the interface every device implements. The host
side (``optim``, ``pipeline``, ``checkpoint``, ``trace``) and the device side
(``engine`` and the backends in ``device``) import it; it imports neither, so a
real computational-storage backend speaks it without importing the emulator.
The update rules the requests carry are in :mod:`nearstep.rules`.

The shape follows the SNIA Computational Storage API: a host opens a device,
asks what it offers (:class:`DeviceInfo`), allocates memory both sides address
(:meth:`Device.alloc`), queues compute requests (:meth:`Device.submit`, the
``queue compute request`` verb) and waits on their completions.

[Note: a step on the device]
Between two commits a device is in one of the states of :class:`StepState`.
``Prefetch``, ``Stage`` and ``Apply`` requests open a step; ``Commit`` makes
everything applied since the last commit durable as one optimizer step, or
nothing of it; ``Abort`` forgets it (the committed generation is the rollback).
When a request of a step fails, the device drops the step and refuses its
remaining applies and its commit, naming the first failure, until the host
ends the step with ``Abort`` or the refused ``Commit``: a step is committed
whole or not at all. ``Query`` and ``MapMemory`` never change the state.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from . import rules

__all__ = [
    "Lane",
    "QueryKind",
    "StepState",
    "MapMemory",
    "Prefetch",
    "Stage",
    "Apply",
    "Commit",
    "Abort",
    "LoadState",
    "Query",
    "Request",
    "TraceEvent",
    "DeviceInfo",
    "DeviceMemory",
    "Completion",
    "Device",
    "describe",
]


class Lane(enum.StrEnum):
    """The timeline lanes events are drawn on (see :mod:`nearstep.trace`)."""

    COMPUTE = "compute"  # the training loop: forward/backward, step(), waits on the device
    LINK = "link"  # gradients into staging, new weights into the model
    DEVICE_IO = "device-io"  # store reads, writes and commits
    DEVICE_COMPUTE = "device-compute"  # the update kernels


class QueryKind(enum.StrEnum):
    """What a :class:`Query` asks the device for."""

    STATS = "stats"  # counters: bytes on the store and the link, busy times, slots
    MANIFEST = "manifest"  # the manifest as last committed
    TRACE = "trace"  # the timeline events since the last ask


class StepState(enum.Enum):
    """Where a device is between two commits; see [Note: a step on the device]."""

    IDLE = "idle"  # nothing applied since the last commit
    OPEN = "open"  # slices applied (or state loaded) since the last commit, not yet durable
    FAILED = "failed"  # a request of this step failed: its applies and commit are refused


# ---------------------------------------------------------------------------
# Requests


@dataclass(frozen=True, slots=True)
class MapMemory:
    """Map a staging arena the host allocated (a device in another process)."""

    memory: int
    path: str
    nbytes: int


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Start reading these slices' state, in this order (the order applies will come in)."""

    slices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Stage:
    """The gradients of a slice are complete in staging memory (the ``stage`` verb).

    With the emulated device the bytes are already in shared memory, so this only
    tells the device that the slice's inputs are ready; a drive that copies them
    into its own memory would start that copy here.
    """

    slice: int


@dataclass(frozen=True, slots=True)
class Apply:
    """Update one slice with the gradients staged in ``memory`` and post its new weights there.

    Attributes:
        slice: the slice index.
        hypers: per param group, the hyperparameters of this step.
        steps: per segment of the slice, the parameter's step after this update;
            0 means the parameter has no gradient this step and is left alone.
        grad_scale: multiplies every gradient first (global-norm clipping).
        guards: the error-reduction guards.
        memory: id of the staging arena.
        adopt: per segment (empty: none), whether the host wrote new weights into the
            parameter since they last landed (``load_state_dict``, an in-place edit): the
            segment's master takes the weights the host put in the slice's weight region of
            ``memory`` before the kernel runs, and its new weights are posted back even
            without a gradient (a lossy master format rounds them; the model gets the
            rounded values). See [Note: the model's weights are the truth] in pipeline.py.
    """

    slice: int
    hypers: tuple[rules.Hyper, ...]
    steps: tuple[int, ...]
    grad_scale: float
    guards: rules.Guards
    memory: int
    adopt: tuple[bool, ...] = ()


@dataclass(frozen=True, slots=True)
class Commit:
    """Make every slice applied since the last commit durable, as optimizer step ``step``."""

    step: int
    param_steps: tuple[int, ...]
    hyperparameters: tuple[dict[str, Any], ...]
    counters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Abort:
    """Drop everything queued or applied since the last commit (a skipped or failed step)."""


@dataclass(frozen=True, slots=True)
class LoadState:
    """Replace a slice's state (``load_state_dict``); durable at the next Commit."""

    slice: int
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Query:
    """Ask the device for something it knows (:class:`QueryKind`)."""

    kind: QueryKind

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", QueryKind(self.kind))  # a bad kind fails on the host


Request = MapMemory | Prefetch | Stage | Apply | Commit | Abort | LoadState | Query


def describe(request: Request) -> str:
    """A request for people: ``"apply slice 3"``, ``"commit"``."""
    name = type(request).__name__.lower()
    k = getattr(request, "slice", None)
    return f"{name} slice {k}" if k is not None else name


class TraceEvent(NamedTuple):
    """One interval on a timeline lane; times are CLOCK_MONOTONIC nanoseconds, shared by all processes."""

    lane: Lane
    name: str
    start_ns: int
    end_ns: int


# ---------------------------------------------------------------------------
# Devices


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What a device is and offers (its capabilities)."""

    backend: str
    pid: int
    cores: tuple[int, ...]
    memory_budget: int
    slot_bytes: int
    slots: int
    kernels: tuple[str, ...]
    store: str
    direct_io: bool
    io_backend: str = ""  # what keeps store I/O in flight, e.g. "io_uring, queue depth 32"


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """Staging memory the host writes gradients into and reads new weights from."""

    id: int
    nbytes: int
    bytes: torch.Tensor  # uint8 view of the whole allocation


class Completion:
    """The completion of one queued request; :meth:`wait` returns its result or raises.

    The device finishes it (:meth:`finish`) once; the host waits on it.
    """

    __slots__ = ("_event", "_result", "_error", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self._event = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """The device's side: the request is done, with this result or this error."""
        self._result, self._error = result, error
        self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        if not self._event.wait(timeout):
            raise TimeoutError(f"the device did not complete {self.what} within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result


class Device(ABC):
    """A computational storage device bound to one store: what every backend implements."""

    info: DeviceInfo

    @abstractmethod
    def submit(self, request: Request) -> Completion:
        """Queue a request; returns at once with its completion."""

    @abstractmethod
    def alloc(self, nbytes: int) -> DeviceMemory:
        """Allocate staging memory both the host and the device can address."""

    @abstractmethod
    def close(self) -> None:
        """Drop uncommitted work, stop the device and release the store. Idempotent."""

    @property
    @abstractmethod
    def alive(self) -> bool: ...

    def stats(self) -> dict[str, Any]:
        """Bytes read/written on the store, bytes over the host link, busy time per lane."""
        return self.submit(Query(QueryKind.STATS)).wait()

    def manifest(self) -> Any:
        """The manifest as last committed by the device."""
        return self.submit(Query(QueryKind.MANIFEST)).wait()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
