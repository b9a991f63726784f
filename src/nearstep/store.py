"""The store: one model's optimizer state in a directory on the SSD.

A store is a manifest plus one state file per slice and generation::

    STORE/
      manifest.json          what is committed: step, parameters, slices, checksums
      LOCK                   the pid of the process that has the store open (the lock
                             itself is an flock() of the directory: see _acquire_lock)
      slices/s000003.g1      master weights, then each moment, 4096-aligned regions
                             in the store's state format (``formats/``)

It is also the checkpoint. A step writes every slice's *other* generation,
fsyncs it, and only then replaces the manifest (write a temporary file, fsync,
rename, fsync the directory). Until that rename the manifest names the old
generation, so a crash at any instant reopens at the last committed step and
never at a torn mix. See ``docs/guarantees.md`` in the repository.
"""

from __future__ import annotations

import bisect
import contextlib
import errno as _errno
import fcntl
import functools
import gc
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import aio, formats, rules
from .image import SliceImage
from .errors import (
    DiskFullError,
    StoreCorruptError,
    StoreError,
    StoreIOError,
    StoreLockedError,
    StoreMismatchError,
    StorePathError,
    StorePermissionError,
)

__all__ = [
    "FORMAT_VERSION",
    "DORMANT_FORMAT_VERSION",
    "ParamSpec",
    "Segment",
    "SliceSpec",
    "SliceState",
    "Manifest",
    "PendingGroups",
    "Store",
    "plan_slices",
    "auto_slice_mb",
    "check_slice_count",
    "MAX_SLICES",
    "param_specs",
    "read_manifest",
    "fsync_path",
    "write_synced",
    "is_positional_name",
    "rounding_seed",
    "PARAM_STATS",
    "MAX_STEP",
    "try_lock",
    "lock_holder",
]

FORMAT_VERSION = 1
# Manifests with dormant parameters (no state on disk) say version 2, so that a
# release from before them refuses the store by its version instead of calling
# the uncovered parameters corruption. Without dormant ones a store stays version 1.
DORMANT_FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LOCK = "LOCK"
SLICES = "slices"
MASTER = "master"
# Per-parameter guard statistics the device keeps in the manifest (what
# ``nearstep inspect --sensitivity`` reports): totals, then the last step's values.
PARAM_STATS = ("spike_clipped", "update_clipped", "update_rms", "update_to_weight")
#: The largest step count a manifest may hold: a million steps a second for 285 years, and
#: still exact as a float (``state_dict()`` holds steps as float tensors).
MAX_STEP = 2**53
_MAX_COUNTER = 2**63 - 1  # guard counters count elements: int64
_MAX_CHECKSUM_BLOCK = 1 << 30
# Timestamps are only shown (``nearstep inspect``), so any time a clock may have said is
# kept, up to the last second datetime can show (9999-12-31); 0 means "not recorded".
_LATEST_TIME = 253402300799.0
_STORE_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as Store.create makes it

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise TypeError(
        f"nearstep keeps fp32 master weights for float32, bfloat16 and float16 "
        f"parameters; got a {dtype} parameter. Convert it, or leave it out of the optimizer."
    )


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One parameter as the store knows it.

    Attributes:
        name: the parameter's name (``model.named_parameters()``) or ``group{g}.param{i}``.
        shape: its shape.
        dtype: the model-side dtype name (``float32``, ``bfloat16``, ``float16``).
        group: index of its optimizer param group.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    group: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of ``length`` elements of parameter ``param``, starting at element ``start``."""

    param: int
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class SliceSpec:
    """A group of parameters (or chunks of a large one) that moves and is updated as a unit."""

    index: int
    segments: tuple[Segment, ...]

    @property
    def numel(self) -> int:
        return sum(s.length for s in self.segments)



@dataclass(frozen=True, slots=True)
class SliceState:
    """Which generation of a slice is committed, and its checksum."""

    generation: int
    checksum: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything the store commits, in one JSON file replaced atomically.

    Attributes:
        store_id: a random id, fixed at creation.
        optimizer: the kernel name (``adamw``, ``adam``, ``sgd``, ``lion``).
        state_names: the state kept per element, master first (how each is encoded on
            disk is ``state_format``'s business).
        hyperparameters: per param group, as last committed (JSON values).
        params: the parameter table.
        slices: the slice table.
        step: the committed optimizer step (0 right after creation).
        param_steps: per parameter, how many updates it has had.
        committed: per slice, the committed generation and its checksum.
        checksum_block: block size the per-file checksums are computed over.
        counters: guard counters (skipped steps, spike-clipped elements, ...).
        created_at, committed_at: UNIX times.
        state_format: how the state is encoded (:class:`~nearstep.formats.StateFormat` name).
        param_stats: per name in :data:`PARAM_STATS`, one value per parameter (empty
            until a guard or telemetry produced one).
        dormant: the indices (increasing) of the parameters that have no state on disk
            and no segment in any slice: frozen (``requires_grad=False``) when the store
            was made or the group added, and not trained since. :meth:`Store.grow` gives
            them state. Empty (every parameter has state) in manifests from before it.
    """

    store_id: str
    optimizer: str
    state_names: tuple[str, ...]
    hyperparameters: tuple[dict[str, Any], ...]
    params: tuple[ParamSpec, ...]
    slices: tuple[SliceSpec, ...]
    step: int
    param_steps: tuple[int, ...]
    committed: tuple[SliceState, ...]
    checksum_block: int
    counters: dict[str, int] = field(default_factory=dict)
    created_at: float = 0.0
    committed_at: float = 0.0
    state_format: str = "fp32"
    param_stats: dict[str, list[float]] = field(default_factory=dict)
    dormant: tuple[int, ...] = ()

    @property
    def format_version(self) -> int:
        """The version :meth:`to_json` writes: :data:`DORMANT_FORMAT_VERSION` while a
        parameter is dormant, else :data:`FORMAT_VERSION`."""
        return DORMANT_FORMAT_VERSION if self.dormant else FORMAT_VERSION

    def is_dormant(self, index: int) -> bool:
        """Whether parameter ``index`` has no state in the store (see ``dormant``)."""
        at = bisect.bisect_left(self.dormant, index)
        return at < len(self.dormant) and self.dormant[at] == index

    @property
    def format(self) -> formats.StateFormat:
        return _parse_format(self.state_format)

    def image(self, index: int) -> SliceImage:
        """Slice ``index``'s layout on disk, in a device slot and in staging, with its codec (``image.py``)."""
        segments = tuple((seg.param, seg.start, seg.length, self.params[seg.param].group, self.params[seg.param].dtype)
                         for seg in self.slices[index].segments)
        return SliceImage.build(index, segments, self.format, self.state_names)

    def slice_file_bytes(self, index: int) -> int:
        """Size of slice ``index``'s state file (``self.image(index).file_bytes``)."""
        return self.image(index).file_bytes

    @property
    def state_bytes(self) -> int:
        """Bytes of one generation of the whole state."""
        return sum(self.slice_file_bytes(s.index) for s in self.slices)

    def to_json(self) -> str:
        doc = asdict(self)
        doc["format_version"] = self.format_version
        return json.dumps(doc, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        """Parse and validate a manifest; anything malformed is a StoreCorruptError.

        Each field must have its JSON type (no coercion: ``"5"``, ``true`` and ``0.5`` are
        not step counts) and a meaning that agrees with the others (:meth:`_check`). The
        error names the field. What needs the slice files is :meth:`Store.open`'s.
        """

        def bad(why: str) -> StoreCorruptError:
            return StoreCorruptError(
                f"{where} is not a valid nearstep manifest ({why}). The store was not opened and nothing "
                f"in it was read or changed. Restore manifest.json (or the whole store) from a backup, or "
                f"undo the edit that made it; or start a fresh store in another directory."
            )

        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise bad(f"not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise bad("top level is not an object")
        version = doc.get("format_version")
        if version not in (FORMAT_VERSION, DORMANT_FORMAT_VERSION):
            raise StoreCorruptError(
                f"{where} has format version {version!r}; this nearstep reads versions "
                f"{FORMAT_VERSION} and {DORMANT_FORMAT_VERSION}. Use the nearstep release that wrote it."
            )
        at = "the top level"

        def take(name: str, convert: Callable[[Any], Any], *default: Any) -> Any:
            nonlocal at
            at = name  # what an error names
            return convert(doc[name]) if name in doc or not default else default[0]

        def param(p: Any) -> ParamSpec:
            p = _object(p)
            return ParamSpec(_text(p["name"]), tuple(_integer(d) for d in _array(p["shape"])), _text(p["dtype"]),
                             _integer(p["group"]))

        def slice_spec(s: Any) -> SliceSpec:
            s = _object(s)
            return SliceSpec(_integer(s["index"]), tuple(
                Segment(_integer(g["param"]), _integer(g["start"]), _integer(g["length"]))
                for g in map(_object, _array(s["segments"]))))

        try:
            # Keyword arguments are evaluated in order: ``at`` names the field being read.
            manifest = cls(
                store_id=take("store_id", _text),
                optimizer=take("optimizer", _text),
                state_names=take("state_names", lambda v: tuple(map(_text, _array(v)))),
                hyperparameters=take("hyperparameters", lambda v: tuple(dict(_object(h)) for h in _array(v))),
                params=take("params", lambda v: tuple(map(param, _array(v)))),
                slices=take("slices", lambda v: tuple(map(slice_spec, _array(v)))),
                step=take("step", _integer),
                param_steps=take("param_steps", lambda v: tuple(map(_integer, _array(v)))),
                committed=take("committed", lambda v: tuple(
                    SliceState(_integer(c["generation"]), _integer(c["checksum"])) for c in map(_object, _array(v)))),
                checksum_block=take("checksum_block", _integer),
                counters=take("counters", lambda v: {k: _integer(n) for k, n in _object(v).items()}, {}),
                created_at=take("created_at", _real, 0.0),
                committed_at=take("committed_at", _real, 0.0),
                state_format=take("state_format", _text, "fp32"),  # stores from before formats
                param_stats=take("param_stats", lambda v: {k: list(map(_real, _array(n))) for k, n in _object(v).items()}, {}),
                dormant=take("dormant", lambda v: tuple(map(_integer, _array(v))), ()),  # stores from before dormant parameters
            )
        except KeyError as exc:
            raise bad(f"{at}: {exc} is missing (KeyError)") from None
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise bad(f"{at}: {type(exc).__name__}: {exc}") from None
        manifest._check(bad)
        if version != manifest.format_version:
            raise bad(f"format version {version} with {len(manifest.dormant)} dormant parameters")
        return manifest

    def _check(self, bad: Callable[[str], Exception]) -> None:
        """Raise ``bad(why)`` unless every field makes sense, alone and with the others.

        Beyond the tables' shapes: the optimizer is one of :data:`rules.KERNELS` and
        ``state_names`` are exactly its state, in file order (a permutation would swap
        moments, another kernel's would read its files wrongly); steps are counts, no
        parameter's beyond ``step``, none beyond :data:`MAX_STEP`; counters are counts;
        timestamps are times a clock can show; hyperparameters are JSON values. A dormant
        parameter may have a step count: ``load_state_dict`` keeps one it was given.
        """
        if not isinstance(self.store_id, str) or not _STORE_ID.fullmatch(self.store_id):
            raise bad(f"store_id {_shown(self.store_id)} is not the 32 hexadecimal digits Store.create makes")
        kernel = rules.KERNELS.get(self.optimizer) if isinstance(self.optimizer, str) else None
        if kernel is None:
            raise bad(f"optimizer {_shown(self.optimizer)} is none of nearstep's: {', '.join(rules.KERNELS)}")
        expected = (MASTER, *rules.state_names(kernel))
        if tuple(self.state_names) != expected:
            raise bad(f"state_names {_shown(list(self.state_names))} are not the state {self.optimizer} keeps, "
                      f"{list(expected)} in this order")
        if not _is_count(self.step, MAX_STEP):
            raise bad(f"step {_shown(self.step)} is not a step count (an integer from 0 to 2**53)")
        if not _is_count(self.checksum_block, _MAX_CHECKSUM_BLOCK) or self.checksum_block == 0 \
                or self.checksum_block % aio.PAGE:
            raise bad(f"checksum_block {_shown(self.checksum_block)} is not a multiple of {aio.PAGE} bytes up to 1 GiB")
        if len(self.param_steps) != len(self.params) or len(self.committed) != len(self.slices):
            raise bad(f"table lengths disagree: {len(self.params)} params but {len(self.param_steps)} param_steps, "
                      f"{len(self.slices)} slices but {len(self.committed)} committed")
        for i, steps in enumerate(self.param_steps):
            if not _is_count(steps, self.step):
                raise bad(f"param_steps[{i}] ({self.params[i].name!r}) is {_shown(steps)}; a parameter's update "
                          f"count is an integer from 0 to the store's step, {self.step}")
        for name, value in self.counters.items():
            if not isinstance(name, str) or not _is_count(value, _MAX_COUNTER):
                raise bad(f"counters[{_shown(name)}] is {_shown(value)}, not a count (an integer from 0 to 2**63 - 1)")
        for name in ("created_at", "committed_at"):
            when = getattr(self, name)
            if isinstance(when, bool) or not isinstance(when, (int, float)) or not 0 <= when <= _LATEST_TIME:
                raise bad(f"{name} {_shown(when)} is not a UNIX time from 0 (not recorded) to the year 9999")
        for g, hyper in enumerate(self.hyperparameters):
            if not isinstance(hyper, dict) or not all(isinstance(k, str) and _is_json_value(v) for k, v in hyper.items()):
                raise bad(f"hyperparameters[{g}] is not an object of finite numbers, strings, booleans, nulls "
                          f"and lists of them")
        for p in self.params:
            if p.dtype not in _DTYPES or any(d < 0 for d in p.shape) or not 0 <= p.group < len(self.hyperparameters):
                raise bad(f"parameter {p.name!r} has an invalid dtype, shape or group")
        if list(self.dormant) != sorted(set(self.dormant)) or not all(0 <= i < len(self.params) for i in self.dormant):
            raise bad("dormant must list parameter indices in increasing order, each once")
        covered = [0] * len(self.params)
        for i, s in enumerate(self.slices):
            if s.index != i:
                raise bad(f"slice {i} has index {s.index}")
            if not s.segments:
                raise bad(f"slice {i} has no segments (Store.create and grow never make an empty slice)")
            for g in s.segments:
                if not 0 <= g.param < len(self.params) or g.start != covered[g.param] or g.length <= 0:
                    raise bad(f"slice {i} has a segment that does not continue its parameter")
                covered[g.param] += g.length
        dormant = set(self.dormant)
        for i, p in enumerate(self.params):
            if i in dormant:
                if covered[i]:
                    raise bad(f"{p.name!r} is dormant (no state) but the slices cover {covered[i]} of its elements")
            elif covered[i] != p.numel:
                raise bad(f"the slices cover {covered[i]} of the {p.numel} elements of {p.name!r}")
        for c in self.committed:
            if c.generation not in (0, 1) or not 0 <= c.checksum < 2**32:
                raise bad("a committed generation or checksum is out of range")
        try:
            self.format  # noqa: B018 - parses and validates
        except ValueError as exc:
            raise bad(f"unknown state format: {exc}") from None
        for name, values in self.param_stats.items():
            if name not in PARAM_STATS or len(values) != len(self.params):
                raise bad(f"param_stats {name!r} is unknown or does not have one value per parameter")


@functools.lru_cache(maxsize=16)
def _parse_format(name: str) -> formats.StateFormat:
    return formats.StateFormat.parse(name)


# -- the manifest's JSON types: no coercion, so that what _check sees is what the file says


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(value: object) -> int:
    """A JSON integer; an integral float (``3.0``) too. Not a bool, a string or ``0.5``."""
    if isinstance(value, float) and value.is_integer():  # inf and nan are not integral
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_shown(value)} is not an integer")
    return value


def _real(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_shown(value)} is not a number")
    return float(value)  # OverflowError for an int beyond a float's range


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{_shown(value)} is not a string")
    return value


def _array(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{_shown(value)} is not a list")
    return value


def _object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{_shown(value)} is not an object")
    return value


def _is_count(value: object, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high


def _is_json_value(value: object) -> bool:
    """Whether ``value`` is a JSON scalar (finite if a number) or a list of such, at any depth."""
    todo = [value]  # a loop, not recursion: json.loads accepts lists nested deeper than the stack
    while todo:
        item = todo.pop()
        if isinstance(item, (list, tuple)):
            todo.extend(item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif item is not None and not isinstance(item, (bool, int, str)):
            return False
    return True


def rounding_seed(manifest: Manifest, step: int, index: int) -> int:
    """The seed of slice ``index``'s stochastic rounding at optimizer step ``step``.

    Derived from the store's id, the step and the slice, so a step redone after a
    crash (or by a resumed run) rounds exactly as the uninterrupted run did.
    """
    digest = hashlib.blake2b(f"{manifest.store_id}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def param_specs(groups: Sequence[Sequence[tuple[str, torch.Tensor]]]) -> tuple[ParamSpec, ...]:
    """The parameter table for named parameters grouped like the optimizer's param groups."""
    return tuple(
        ParamSpec(name, tuple(p.shape), _dtype_name(p.dtype), g)
        for g, group in enumerate(groups)
        for name, p in group
    )


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


#: Slices a store may hold: 4 TiB of fp32 parameters at 64 MiB a slice. Far more only comes from a
#: tiny ``slice_mb``, which would make one state file (of at least a page per tensor) per few elements.
MAX_SLICES = 1 << 16


def check_slice_count(count: int, slice_mb: float, elements: int, limit: int = MAX_SLICES) -> None:
    """Refuse a plan of more than ``limit`` slices of ``elements`` parameters, saying which ``slice_mb``
    would do (twice the even cut: packing whole parameters can leave slices half full)."""
    if count > limit:
        enough = 2 * elements * 4 / limit / 2**20
        why = f"a store holds at most {limit:,}"
        raise ValueError(
            f"slice_mb={slice_mb:.3g} cuts the parameters into {count:,} slices (two state files each); {why}. "
            f"Use slice_mb={enough:.2g} or more, or leave it None (automatic: about 16 slices). Nothing was written."
        )


#: Where a parameter split over slices may be cut: multiples of this many elements from its start
#: (see [Note: split points on vector lengths]), a multiple of every CPU vector length (AVX-512: 16 fp32).
SPLIT_ALIGN = 64


def plan_slices(
    params: Sequence[ParamSpec], slice_bytes: int, *, include: Sequence[bool] | None = None, first_index: int = 0
) -> tuple[SliceSpec, ...]:
    """Cut the parameters into slices of about ``slice_bytes`` of fp32 master weights.

    Slices are formed in backward order (the reverse of registration), which is the
    order in which backward finishes their gradients. A parameter that does not fit
    in what is left of the current slice starts a new one; a parameter larger than a
    whole slice is split into slice-sized chunks, cut at multiples of :data:`SPLIT_ALIGN`
    elements (so a slice may hold up to ``SPLIT_ALIGN - 1`` elements less than it could, and
    never fewer than ``SPLIT_ALIGN`` of a split parameter).

    Args:
        params: the whole parameter table; segments name parameters by their index in it.
        slice_bytes: target bytes of fp32 master weights per slice.
        include: one flag per parameter; only the flagged ones are planned (the others
            stay dormant, with no segment). None plans every parameter.
        first_index: the index of the first slice (:meth:`Store.grow` appends slices).
    """
    if include is not None and len(include) != len(params):
        raise ValueError(f"include has {len(include)} flags for {len(params)} parameters; give one per parameter")
    capacity = max(slice_bytes // 4, 1)
    slices: list[SliceSpec] = []
    current: list[Segment] = []
    room = capacity

    def close() -> None:
        nonlocal current, room
        if current:
            slices.append(SliceSpec(first_index + len(slices), tuple(current)))
        current, room = [], capacity

    for index in reversed(range(len(params))):
        if include is not None and not include[index]:
            continue  # dormant: no state, no segment
        numel = params[index].numel
        if numel == 0:
            continue  # nothing to update; the manifest check expects no segment for it
        if numel <= capacity and numel > room:
            close()
        start = 0
        while start < numel:
            left = numel - start
            if left <= room:
                take = left  # the parameter's last piece: any length
            else:
                # [Note: split points on vector lengths] A piece that does not end the parameter
                # is a whole number of SPLIT_ALIGN elements: torch's fused kernels run their
                # vectorised body from a tensor's start and a scalar tail on its last elements,
                # with different rounding (an FMA), so a piece ending off a vector boundary
                # would put elements in the scalar tail that torch.optim computes vectorised.
                take = room // SPLIT_ALIGN * SPLIT_ALIGN
                if take == 0:
                    if current:
                        close()
                        continue
                    take = min(left, max(SPLIT_ALIGN, capacity // SPLIT_ALIGN * SPLIT_ALIGN))
            current.append(Segment(index, start, take))
            start += take
            room = max(room - take, 0)
            if room == 0:
                close()
    close()
    return tuple(slices)


# ---------------------------------------------------------------------------
# Locking


# [Note: the lock is an flock of the store directory]
# A store has one writer: the process that opened it, with the emulated device process
# that inherits its descriptor (device.py passes Store.lock_fd). The lock is an exclusive,
# non-blocking flock() of the store directory itself, not of a file in it: a file can be
# deleted while a run holds its lock ("clearing a stale lock"), and the next opener would
# create and lock a new one while the first run still writes. An flock belongs to the open
# directory, which no unlink takes away, and it goes when the last descriptor sharing it
# closes: when the holder and its device process close the store or die, never left behind.
# LOCK only records the holder's pid, for the messages that name it; it is written once the
# lock is held, and a missing or stale one changes nothing about who holds the lock.
# Releases before this one flock()ed LOCK; that lock is probed too (and let go at once), so a
# process of such a release that has the store open is still respected. (They do not see
# this release's lock: do not run both on one store.)


def try_lock(path: Path, *, shared: bool = False) -> int | None:
    """Take the store's lock without waiting: the descriptor that holds it, or None while
    another holder has it (see [Note: the lock is an flock of the store directory]).

    ``shared=True`` takes it shared: a probe, refused by a store's owner and refusing only
    openers, while it lasts. Closing the descriptor releases the lock.

    Raises:
        OSError: ``path`` cannot be opened as a directory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        held = not _earlier_release_lock_free(path, shared)
    except BlockingIOError:
        held = True
    except BaseException:
        os.close(fd)
        raise
    if held:
        os.close(fd)
        return None
    return fd


def _earlier_release_lock_free(path: Path, shared: bool) -> bool:
    """Whether no process of an earlier release holds the flock of LOCK it took for the store."""
    try:
        fd = os.open(path / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True  # no LOCK: nobody of an earlier release has the store open
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True  # cannot tell; the directory's lock is the one that counts
    finally:
        os.close(fd)  # releases the probe's flock
    return True


def lock_holder(path: Path) -> str:
    """The pid the store's lock holder recorded in LOCK, or ``"unknown"`` (no LOCK, or no pid in it)."""
    try:
        with open(path / LOCK, "rb") as f:
            text = f.read(64).decode(errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _acquire_lock(path: Path) -> int:
    """Take the store's exclusive lock and record this process's pid in LOCK; returns the
    descriptor whose flock is the lock (``Store.lock_fd``). See [Note: the lock is an flock of
    the store directory].

    Raises:
        StoreLockedError: another holder has the lock (the message names its pid).
        StorePermissionError: the store directory or LOCK cannot be written (read-only file system included).
    """
    lock_path = path / LOCK
    # Opened (created) before the lock is tried: a store this process could not write is
    # refused as such, not taken.
    try:
        pid_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _lock_file_error(exc, path, lock_path) from None
    try:
        try:
            fd = try_lock(path)
            if fd is None and lock_holder(path) == str(os.getpid()):
                # Held by this process: an optimizer (or Store) dropped without close() keeps
                # the lock until the garbage collector runs its finalizer. Unreachable, it lets go now.
                gc.collect()
                fd = try_lock(path)
        except OSError as exc:
            if exc.errno in (_errno.EACCES, _errno.EPERM):
                raise StorePermissionError(
                    exc.errno, f"cannot open the store directory {path} to lock it: {exc.strerror}. Check its "
                    f"ownership and mode: the store's user needs to read, write and enter it.", str(path)) from None
            raise aio.wrap_os_error(exc, "open the store directory to lock it", path) from None
        if fd is None:
            raise _locked_error(path)
        # Recorded only once the lock is held, so a refused opener never overwrites the
        # holder's pid. It only names the holder in messages: a full disk must not keep
        # `nearstep verify` out, so a failed write is let be.
        with contextlib.suppress(OSError):
            os.ftruncate(pid_fd, 0)
            os.pwrite(pid_fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    finally:
        os.close(pid_fd)


def _lock_file_error(exc: OSError, path: Path, lock_path: Path) -> StoreIOError:
    if exc.errno == _errno.EROFS:
        return StorePermissionError(
            exc.errno, f"cannot open {lock_path} for writing: {exc.strerror}. The file system holding {path} is "
            f"mounted read-only, and a store is written at every step: remount it read-write, or copy the store "
            f"to a writable disk (cp -a {path} NEW_DIR) and pass the copy's path; `nearstep inspect` and "
            f"`nearstep export` read it where it is. Check the ownership and mode of the copy if it is refused too.",
            str(lock_path))
    if exc.errno in (_errno.EACCES, _errno.EPERM):
        return StorePermissionError(
            exc.errno, f"cannot open {lock_path} for writing: {exc.strerror}. Check the ownership and mode of "
            f"the store directory, and that its file system is mounted read-write.", str(lock_path))
    return aio.wrap_os_error(exc, "open the lock file", lock_path)


def _locked_error(path: Path) -> StoreLockedError:
    holder = lock_holder(path)
    if holder == str(os.getpid()):
        return StoreLockedError(
            f"store {path} is in use by process {holder}, which is this process: an optimizer (or Store) made in "
            f"it still has the store open. Call that object's close() (or make it in a `with` block) before "
            f"opening the store again; there is no other process to stop."
        )
    if holder == "unknown":
        holder = "unknown (LOCK, where the holder records its pid, is missing or empty)"
    return StoreLockedError(
        f"store {path} is in use by process {holder} (or by its device process, which exits within "
        f"a second of it). Stop that process (or wait for it to close the optimizer), or give this run a "
        f"different store directory. Deleting LOCK does not release the lock: it is held on the directory."
    )


# ---------------------------------------------------------------------------
# The store


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` as the whole of file ``path`` and fsync it (before a rename makes it count)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class PendingGroups:
    """What a store holds beyond the parameters a caller supplied (:meth:`Store.check_model`).

    An earlier run on the store may have called ``add_param_group``; a resumed run
    passes the optimizer's first groups and adds the rest later, checking each with
    :meth:`Store.check_added`. Both ranges are empty when everything was supplied.

    Attributes:
        params: indices into the store's parameter table of the parameters not supplied
            yet (always a tail of it).
        groups: indices of the param groups not supplied yet (always the last ones);
            their committed hyperparameters are ``manifest.hyperparameters[g]``.
    """

    params: range
    groups: range


class Store:
    """A directory holding one model's optimizer state; see the module docstring.

    Open one with :meth:`create` or :meth:`open`; both take the store's exclusive
    lock, which :meth:`close` releases. ``with Store.open(path) as store:`` works.
    The emulated device process adopts the same lock (see :meth:`adopt`).
    """

    def __init__(self, path: Path, manifest: Manifest, lock_fd: int) -> None:
        self.path = path
        self.manifest = manifest
        self.lock_fd = lock_fd

    # -- opening -----------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        params: Sequence[ParamSpec],
        masters: Callable[[int], torch.Tensor],
        optimizer: str,
        state_names: Sequence[str],
        hyperparameters: Sequence[dict[str, Any]],
        slice_bytes: int = 64 << 20,
        checksum_block: int = aio.DEFAULT_BLOCK_BYTES,
        pool: aio.IOQueue | None = None,
        state_format: str | formats.StateFormat = "fp32",
        moments: Callable[[str, int], torch.Tensor] | None = None,
        trainable: Sequence[bool] | None = None,
    ) -> Store:
        """Make a new store and write step 0.

        Args:
            path: a directory that does not exist yet or is empty.
            params: the parameter table (see :func:`param_specs`).
            masters: ``masters(i)`` returns parameter ``i``'s initial values (any dtype).
            optimizer: the kernel name.
            state_names: the moment names after ``master`` (``rules.state_names``).
            hyperparameters: one JSON-able dict per param group.
            slice_bytes: target bytes of fp32 master weights per slice.
            checksum_block: block size of the per-file checksums.
            pool: the I/O pool to write with (one is made if omitted).
            state_format: how the state is encoded on disk (:class:`~nearstep.formats.StateFormat`
                or its name, e.g. ``"bf16-sr+8bit"``).
            moments: ``moments(name, i)`` returns parameter ``i``'s initial state ``name``;
                omitted, every moment starts at zero.
            trainable: one flag per parameter (``p.requires_grad``). Only flagged parameters
                get slices and state; the others are dormant (``Manifest.dormant``): no bytes
                on disk, and ``masters``/``moments`` are never called for them, until
                :meth:`grow` gives them state. None: every parameter gets state.
        """
        fmt_name = formats.StateFormat.parse(state_format).name  # a bad name fails before anything is made
        if trainable is not None and len(trainable) != len(params):
            raise ValueError(f"trainable has {len(trainable)} flags for {len(params)} parameters; give one per parameter")
        path = _store_path(path)
        slices = plan_slices(params, slice_bytes, include=trainable)
        manifest = Manifest(
            store_id=uuid.uuid4().hex,
            optimizer=optimizer,
            state_names=(MASTER, *state_names),
            hyperparameters=tuple(dict(h) for h in hyperparameters),
            params=tuple(params),
            slices=slices,
            step=0,
            param_steps=(0,) * len(params),
            committed=(SliceState(0, 0),) * len(slices),
            checksum_block=checksum_block,
            created_at=time.time(),
            state_format=fmt_name,
            dormant=() if trainable is None else tuple(i for i, t in enumerate(trainable) if not t),
        )
        # What Store.open would refuse is refused before anything is made.
        manifest._check(lambda why: ValueError(f"cannot create a store at {path}: {why}. Nothing was created."))
        if path.is_dir() and (path / MANIFEST).exists():
            raise StoreError(f"{path} already holds a store; use Store.open() to continue it, or pick another directory.")
        _refuse_a_file_in_the_way(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / SLICES).mkdir(exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            _refuse_a_file_in_the_way(path)  # one appeared meanwhile
            raise
        except PermissionError as exc:
            raise StorePermissionError(
                exc.errno, f"cannot create the store directory {path}: permission denied. "
                "Check the ownership and mode of its parent, or choose another location.", str(path)
            ) from None
        except OSError as exc:
            if exc.errno == _errno.EROFS:
                raise StorePermissionError(
                    exc.errno, f"cannot create the store directory {path}: the file system there is mounted "
                    f"read-only, and a store is written at every step. Pass a directory on a writable disk "
                    f"instead (under your home directory or a local SSD's mount point); nothing was created.",
                    str(path)) from None
            raise aio.wrap_os_error(exc, "create the store directory", path) from None
        # [Note: an interrupted creation never blocks the next run]
        # A creation stopped (Ctrl-C, kill, crash) before its first commit leaves only
        # nearstep's own files: LOCK, slices/sNNNNNN.g0|g1 and manifest.json.tmp. They
        # hold nothing committed (step 0 is the model's own weights), so they are
        # removed and the creation starts over. Any other file may be the user's and
        # is never touched. The decision is made again under the lock: a live process
        # holding it may be creating this store right now (StoreLockedError names it).
        def listing() -> tuple[list[Path], list[str]]:
            """(nearstep's own creation files, the names of every other entry)."""
            own: list[Path] = []
            foreign: list[str] = []
            entries = [p for p in path.iterdir() if p.name not in (LOCK, SLICES)]
            for p in entries + list((path / SLICES).iterdir()):
                pattern = re.escape(MANIFEST + ".tmp") if p.parent == path else r"s\d{6,}\.g[01]"
                if re.fullmatch(pattern, p.name) and p.is_file() and not p.is_symlink():
                    own.append(p)
                else:
                    foreign.append(p.name if p.parent == path else f"{SLICES}/{p.name}")
            return own, foreign

        def refuse(foreign: list[str]) -> StoreError:
            return StoreError(
                f"{path} is not empty ({', '.join(sorted(foreign)[:3])} ...) and holds no committed store; "
                f"those files are not nearstep's. Move them away, delete the directory, or pick another directory."
            )

        leftovers, foreign = listing()
        if foreign:
            raise refuse(foreign)
        if leftovers:
            lock_fd = _acquire_lock(path)  # raises StoreLockedError while a live process creates or uses it
            try:
                if (path / MANIFEST).exists():
                    raise StoreError(f"{path} already holds a store (another process just created it); "
                                     f"use Store.open() to continue it, or pick another directory.")
                leftovers, foreign = listing()
                if foreign:
                    raise refuse(foreign)
                for p in leftovers:
                    p.unlink()
                fsync_path(path / SLICES)
            finally:
                # Released and retaken below: a creator that wins the lock in between is
                # refused there as StoreLockedError, never mixed with this one.
                os.close(lock_fd)
        lock_fd = _acquire_lock(path)
        try:
            need = 2 * manifest.state_bytes
            disk = shutil.disk_usage(path)
            if need > disk.free:
                raise DiskFullError(
                    _errno.ENOSPC,
                    f"the store needs {_size_text(need)} (two generations of {_size_text(manifest.state_bytes)}) "
                    f"but {path} has only {_size_text(disk.free)} free, on a file system of "
                    f"{disk.total / 2**30:.3g} GiB. Free space there or put the store on a bigger disk; "
                    f"no state was written.",
                    str(path),
                )
            store = cls(path, manifest, lock_fd)
            committed = store._write_initial(masters, moments, pool)
            store.write_manifest(replace(manifest, committed=committed, committed_at=time.time()))
            return store
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, *, check_files: bool = True) -> Store:
        """Open an existing store and take its lock.

        The manifest is validated for meaning (:meth:`Manifest.from_json`) and, with
        ``check_files``, held against the slice files (one stat per file; see
        :meth:`_check_file_sizes`) before anything is read or written.
        ``nearstep verify`` passes False to report each file itself.

        Raises:
            StoreCorruptError: the manifest is invalid or does not describe the slice files.
            StoreLockedError: another holder has the store open.
            StoreError: ``path`` holds no store (StorePathError: it is empty or a file).
        """
        path = _store_path(path)
        if not path.is_dir():
            _refuse_a_file_in_the_way(path)
            raise StoreError(f"{path} is not a directory; create the store first (nearstep does so when the optimizer is given a new path).")
        lock_fd = _acquire_lock(path)
        try:
            store = cls(path, read_manifest(path), lock_fd)
            if check_files:
                store._check_file_sizes()
            return store
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def adopt(cls, path: str | os.PathLike, lock_fd: int) -> Store:
        """Open a store whose lock this process inherited from its owner (the device process)."""
        path = Path(path)
        return cls(path, read_manifest(path), lock_fd)

    def close(self) -> None:
        """Release the lock. Idempotent."""
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> Manifest:
        """Re-read the manifest (after another process committed)."""
        self.manifest = read_manifest(self.path)
        return self.manifest

    # -- checks ------------------------------------------------------------

    def check_model(
        self, params: Sequence[ParamSpec], optimizer: str | None = None, state_format: formats.StateFormat | None = None,
        *, groups: int | None = None,
    ) -> PendingGroups:
        """Raise StoreMismatchError naming the first difference from ``params`` (and the
        optimizer and state format, when given).

        Which parameters are trainable is not part of the check: a parameter frozen
        now may have state in the store, and a dormant one may be trainable now
        (:meth:`grow` gives it state). The store may hold more parameters than
        ``params`` when the extra ones form whole param groups after the supplied ones
        (added by ``add_param_group`` in an earlier run); the result names them.

        Args:
            groups: how many param groups the caller has (``len(optimizer.param_groups)``);
                default one past the largest group in ``params``, which miscounts trailing
                empty groups.

        Returns:
            the parameters and groups of the store not supplied yet (empty ranges when none).
        """
        m = self.manifest
        given_groups = groups if groups is not None else max((p.group for p in params), default=-1) + 1
        if optimizer is not None and optimizer != m.optimizer:
            raise StoreMismatchError(
                f"store {self.path} holds {m.optimizer} state, not {optimizer}. Use nearstep."
                f"{_class_name(m.optimizer)} with it, or give this optimizer a new store."
            )
        if state_format is not None and state_format.name != m.format.name:
            raise StoreMismatchError(
                f"store {self.path} keeps its state as {m.format.name!r}, not {state_format.name!r}. "
                f"Pass state_format={m.format.name!r} (or None) to continue it, convert it with "
                f"`nearstep convert {self.path} NEW_STORE --state-format {state_format.name}`, or give "
                f"this optimizer a new store."
            )
        for i, (have, want) in enumerate(zip(m.params, params)):
            if (have.shape, have.dtype) != (want.shape, want.dtype) or not _same_name(have.name, want.name):
                raise StoreMismatchError(
                    f"store {self.path} was made for a different model: parameter {i} is "
                    f"{have.name!r} {list(have.shape)} {have.dtype} in the store but {want.name!r} "
                    f"{list(want.shape)} {want.dtype} in the model. Pass the model it was made for, "
                    f"or a new store path."
                )
        # Extra parameters are fine when they are whole groups the caller has not added yet.
        later_groups = all(p.group >= given_groups for p in m.params[len(params) :])
        if len(m.params) < len(params) or not later_groups:
            raise StoreMismatchError(
                f"store {self.path} has {len(m.params)} parameters but the optimizer was given "
                f"{len(params)}; the first {min(len(m.params), len(params))} agree. Pass the same "
                f"parameters (and param groups) it was made for, or a new store path."
                + (" Param groups added later with add_param_group may be left out, but only whole "
                   "and at the end." if len(m.params) > len(params) else "")
            )
        for i, (have, want) in enumerate(zip(m.params, params)):
            if have.group != want.group:
                raise StoreMismatchError(
                    f"store {self.path}: parameter {i} {have.name!r} was in param group {have.group}, "
                    f"now in group {want.group}. Keep the param groups as they were."
                )
        return PendingGroups(range(len(params), len(m.params)), range(given_groups, len(m.hyperparameters)))

    def check_added(self, params: Sequence[ParamSpec], first_index: int, group: int | None = None) -> bool:
        """Check a param group added now (``add_param_group``) against the store.

        Args:
            params: the new group's parameter table entries (their ``group`` is its index).
            first_index: the index its first parameter has in the whole parameter table
                (how many parameters the optimizer had before it).
            group: the group's index; needed only when ``params`` is empty.

        Returns:
            True when the store holds exactly this group already (an earlier run added it;
            its state is there, and only its dormant parameters that are trainable now
            need :meth:`grow`). False when the store ends right before it: the group is
            new, and ``grow(..., new_params=params, new_hyperparameters=[...])`` adds it.

        Raises:
            StoreMismatchError: the store holds other parameters there, or the group
                does not follow the ones the store has.
        """
        m = self.manifest
        if group is None:
            if not params:
                raise ValueError("an empty param group has no parameter to tell its index: pass group=")
            group = params[0].group
        if any(p.group != group for p in params):
            raise ValueError(f"the added parameters name different groups; all must be in group {group}")
        if group == len(m.hyperparameters) and first_index == len(m.params):
            return False
        stored = [i for i, p in enumerate(m.params) if p.group == group]
        if group >= len(m.hyperparameters) or first_index > len(m.params) or stored[:1] not in ([], [first_index]):
            raise StoreMismatchError(
                f"store {self.path} has {len(m.hyperparameters)} param groups and {len(m.params)} parameters; "
                f"a param group added as group {group} at parameter {first_index} does not line up with them. "
                f"Add the param groups in the order the run that wrote the store did, or use a new store path."
            )
        for j, want in enumerate(params):
            i = first_index + j
            have = m.params[i] if i < len(m.params) else None
            if have is None or have.group != group or (have.shape, have.dtype) != (want.shape, want.dtype) \
                    or not _same_name(have.name, want.name):
                held = f"{have.name!r} {list(have.shape)} {have.dtype} in group {have.group}" if have else "nothing"
                raise StoreMismatchError(
                    f"store {self.path}: the param group added as group {group} does not match the one the "
                    f"store holds: its parameter {j} (parameter {i} of the table) is {want.name!r} "
                    f"{list(want.shape)} {want.dtype} but the store has {held}. Add the same param groups "
                    f"as the run that wrote the store, or use a new store path."
                )
        if len(stored) != len(params):
            raise StoreMismatchError(
                f"store {self.path}: param group {group} has {len(stored)} parameters in the store but "
                f"{len(params)} were added. Add the same param groups as the run that wrote the store, "
                f"or use a new store path."
            )
        return True

    # -- files -------------------------------------------------------------

    def slice_path(self, index: int, generation: int) -> Path:
        return self.path / SLICES / f"s{index:06d}.g{generation}"

    def iter_slice_paths(self) -> Iterator[tuple[int, int, Path]]:
        for s in self.manifest.slices:
            for g in (0, 1):
                yield s.index, g, self.slice_path(s.index, g)

    def _write_initial(
        self, masters: Callable[[int], torch.Tensor], moments: Callable[[str, int], torch.Tensor] | None,
        pool: aio.IOQueue | None, *, manifest: Manifest | None = None, indices: Sequence[int] | None = None,
    ) -> tuple[SliceState, ...]:
        """Write slices ``indices`` of ``manifest`` (default: all of this store's) afresh:
        generation 0 holds the state, generation 1 is allocated; both fdatasync()ed, and
        the slices directory fsync()ed. Returns their committed states, in order."""
        m = manifest or self.manifest
        own_pool = pool is None
        pool = pool or aio.IOPool(block_bytes=m.checksum_block)
        states = []
        try:
            for spec in (m.slices if indices is None else [m.slices[k] for k in indices]):
                nbytes = m.slice_file_bytes(spec.index)
                with aio.AlignedBuffer(nbytes) as buf:
                    values = {name: torch.zeros(spec.numel) for name in m.state_names}
                    offset = 0
                    for seg in spec.segments:
                        for name, value in values.items():
                            source = masters(seg.param) if name == MASTER else moments(name, seg.param) if moments else None
                            if source is not None:
                                flat = source.detach().reshape(-1)
                                value[offset : offset + seg.length].copy_(flat[seg.start : seg.start + seg.length])
                        offset += seg.length
                    # The committed step's seed: 0 at creation; a grow rounds as of the step it follows.
                    m.image(spec.index).encode(values, buf, rounding_seed(m, m.step, spec.index))
                    for g in (0, 1):
                        with aio.AlignedFile.open(self.slice_path(spec.index, g), create=True) as f:
                            # open(create=True) keeps what a file holds: one an interrupted grow
                            # left may be longer than this slice's, and fallocate never shrinks.
                            _truncate(f)
                            f.allocate(nbytes)
                            if g == 0:
                                result = pool.write(f, buf, 0, checksum=True).result()
                                states.append(SliceState(0, aio.combine_crcs(result.crcs or ())))
                            f.sync()
        finally:
            if own_pool:
                pool.close()
        fsync_path(self.path / SLICES)
        return tuple(states)

    def read_slice(self, index: int, pool: aio.IOQueue | None = None) -> dict[str, torch.Tensor]:
        """Read the committed state of one slice, verifying its checksum.

        Returns one flat fp32 tensor per state name (``master`` first), each a copy,
        decoded from the store's state format.
        ``pool`` (made with this store's ``checksum_block``) saves making one per call.
        """
        m = self.manifest
        state = m.committed[index]
        nbytes = m.slice_file_bytes(index)
        path = self.slice_path(index, state.generation)
        with contextlib.ExitStack() as stack:
            buf = stack.enter_context(aio.AlignedBuffer(nbytes))
            if pool is None:
                pool = stack.enter_context(aio.IOPool(threads=2, block_bytes=m.checksum_block))
            with aio.AlignedFile.open(path, writable=False) as f:
                result = pool.read(f, buf, 0, checksum=True).result()
            self.check_checksum(index, path, result.crcs or ())
            return m.image(index).decode(buf)

    def read_params(self, names: Sequence[str] = (MASTER,)) -> dict[str, list[torch.Tensor | None]]:
        """The committed state by parameter: for each of ``names``, one flat fp32 tensor per
        parameter, reassembled from the slices (split parameters included).

        A dormant parameter (``manifest.is_dormant(i)``) has no state: its entry is None,
        never zeros, so that a caller restoring weights from the store leaves it as it is.

        Every slice is read and its checksum verified before this returns, so a caller
        that applies the result changes nothing when any slice is damaged.
        """
        m = self.manifest
        live = {name: {i: torch.zeros(p.numel, dtype=torch.float32) for i, p in enumerate(m.params) if not m.is_dormant(i)}
                for name in names}
        with aio.IOPool(threads=2, block_bytes=m.checksum_block) as pool:
            for spec in m.slices:  # into fresh tensors: nothing the caller holds changes on an error
                state = self.read_slice(spec.index, pool)
                offset = 0
                for seg in spec.segments:
                    for name in names:
                        live[name][seg.param][seg.start : seg.start + seg.length] = state[name][offset : offset + seg.length]
                    offset += seg.length
        return {name: [by_param.get(i) for i in range(len(m.params))] for name, by_param in live.items()}

    def check_checksum(self, index: int, path: Path, crcs: Sequence[int]) -> int:
        got = aio.combine_crcs(crcs)
        want = self.manifest.committed[index].checksum
        if got != want:
            raise StoreCorruptError(
                f"slice {index} of store {self.path} is corrupted: {path.name} has checksum "
                f"{got:#010x}, the manifest committed {want:#010x}. Nothing was loaded from it. "
                f"Restore the store from a backup, or start from a fresh store."
            )
        return got

    def verify(self) -> list[str]:
        """Check every committed slice file; return one line per problem (empty when sound)."""
        problems = []
        for spec in self.manifest.slices:
            try:
                self.read_slice(spec.index)
            except (StoreError, OSError) as exc:
                text = str(exc)
                problems.append(text if text.startswith(f"slice {spec.index} ") else f"slice {spec.index}: {text}")
        return problems

    def layout_disagreement(self, index: int, sizes: Sequence[int]) -> str | None:
        """Why slice ``index``'s files, of ``sizes`` bytes (both generations), show that the
        manifest does not describe them; None when they do not show it.

        Both files of one size other than the manifest's layout gives (``slice_file_bytes``)
        were written for another layout: the manifest was edited (a shape, a dtype, a segment,
        the state format) or comes from another store. One file of another size is damage to
        that file, which :meth:`verify` and the checksum of a read name.
        """
        want = self.manifest.slice_file_bytes(index)
        if len(sizes) != 2 or sizes[0] != sizes[1] or sizes[0] == want:
            return None
        m = self.manifest
        names = ", ".join(dict.fromkeys(m.params[g.param].name for g in m.slices[index].segments))
        names = names if len(names) <= 60 else names[:57] + "..."
        return (f"{self.path / MANIFEST} does not describe the slice files: by its shapes, dtypes, segments and state "
                f"format {m.format.name!r}, slice {index} ({names}) takes {want:,} bytes a file, but both "
                f"its files hold {sizes[0]:,}. The manifest was edited or comes from another store. Restore "
                f"manifest.json from a backup of this store (or undo the edit), or start a fresh store elsewhere.")

    def _check_file_sizes(self) -> None:
        """Refuse a manifest that does not describe the slice files (:meth:`layout_disagreement`),
        with one stat per file, before anything is read or written."""
        for spec in self.manifest.slices:
            sizes = []
            for g in (0, 1):
                try:
                    sizes.append(os.stat(self.slice_path(spec.index, g)).st_size)
                except OSError:
                    break  # a missing file is damage to it: verify() and the read say so
            why = self.layout_disagreement(spec.index, sizes)
            if why is not None:
                raise StoreCorruptError(f"{why} The store was not opened; nothing in it was read or changed.")

    # -- growing -------------------------------------------------------------

    def grow(
        self,
        add: Sequence[int],
        masters: Callable[[int], torch.Tensor],
        *,
        new_params: Sequence[ParamSpec] = (),
        new_hyperparameters: Sequence[dict[str, Any]] = (),
        slice_bytes: int,
        pool: aio.IOQueue | None = None,
    ) -> Manifest:
        """Give dormant parameters state, and add param groups; one atomic commit.

        New slices for the parameters ``add`` are planned like :func:`plan_slices` (backward
        order among themselves) and numbered after the existing ones. Their files are
        written (generation 0: masters from ``masters(i)``, moments zero, in the store's
        state format and rounding seeds; generation 1 allocated), fdatasync()ed with the
        slices directory, and only then is the manifest replaced (:meth:`commit`'s path)
        by one with the new parameters, groups and slices. Killed at any instant, the
        store reopens as before or as after the grow, never torn; the slice files an
        interrupted grow left (numbered past the manifest's slices) are ignored by
        :meth:`open` and :meth:`verify`, and the next grow removes or overwrites them.
        The state of existing slices and the committed step are not touched.

        The caller holds the store's lock (:meth:`open`) and no device process is
        using the store meanwhile.

        Args:
            add: indices into the parameter table after the grow (``new_params`` are
                appended to it) of the dormant parameters to give state.
            masters: ``masters(i)`` returns parameter ``i``'s values (any dtype), for each ``i`` in ``add``.
            new_params: parameters to append (``add_param_group``), in the new groups, in
                order; those not in ``add`` stay dormant.
            new_hyperparameters: one JSON-able dict per new param group (groups
                ``len(manifest.hyperparameters)`` and on).
            slice_bytes: target bytes of fp32 master weights per new slice.
            pool: the I/O pool to write with (one is made if omitted).

        Returns:
            the committed manifest (also ``self.manifest``).

        Raises:
            ValueError: an index that is not a dormant parameter, or new parameters
                outside the new groups (nothing is written).
            DiskFullError: the new slices' two generations do not fit (nothing is committed).
        """
        if self.lock_fd < 0:
            raise StoreError(f"growing store {self.path} changes it: open it with Store.open(), which takes its lock.")
        # From the disk: a device process may have committed steps this object never saw,
        # and a grow on a stale manifest would name generations those steps overwrote.
        m = self.refresh()
        new_params = tuple(new_params)
        hyper = m.hyperparameters + tuple(dict(h) for h in new_hyperparameters)
        last = len(m.hyperparameters)
        for p in new_params:
            if not last <= p.group < len(hyper):
                raise ValueError(
                    f"new parameter {p.name!r} is in param group {p.group}; new parameters belong to the new "
                    f"groups {len(m.hyperparameters)} to {len(hyper) - 1}, in order (give their hyperparameters)"
                )
            last = p.group
        params = m.params + new_params
        dormant = set(m.dormant) | set(range(len(m.params), len(params)))
        grown_now: set[int] = set()
        for i in add:
            if not 0 <= i < len(params) or i not in dormant:
                what = f"parameter {i} ({params[i].name!r}) already has state" if 0 <= i < len(params) else \
                    f"there is no parameter {i} (the table has {len(params)})"
                raise ValueError(f"cannot grow store {self.path}: {what}. Pass only dormant parameters.")
            grown_now.add(i)
        new_slices = plan_slices(params, slice_bytes, include=[i in grown_now for i in range(len(params))],
                                 first_index=len(m.slices))
        extra = len(new_params)
        grown = replace(
            m,
            params=params,
            hyperparameters=hyper,
            dormant=tuple(sorted(dormant - grown_now)),
            slices=m.slices + new_slices,
            param_steps=m.param_steps + (0,) * extra,
            committed=m.committed + (SliceState(0, 0),) * len(new_slices),
            param_stats={name: [*values, *[0.0] * extra] for name, values in m.param_stats.items()},
        )
        grown._check(lambda why: ValueError(f"cannot grow store {self.path}: {why}"))
        self._remove_stray_slices()
        need = 2 * sum(grown.slice_file_bytes(s.index) for s in new_slices)
        disk = shutil.disk_usage(self.path)
        if need > disk.free:
            raise DiskFullError(
                _errno.ENOSPC,
                f"growing the store needs {_size_text(need)} (two generations of the new slices) but "
                f"{self.path} has only {_size_text(disk.free)} free, on a file system of {disk.total / 2**30:.3g} "
                f"GiB. Free space there or move the store to a bigger disk; the store is as it was.",
                str(self.path),
            )
        states = self._write_initial(masters, None, pool, manifest=grown, indices=[s.index for s in new_slices])
        self.commit(replace(grown, committed=m.committed + states))
        return self.manifest

    def _remove_stray_slices(self) -> None:
        """Delete slice files numbered past the manifest's slices (an interrupted grow's)."""
        count = len(self.manifest.slices)
        for file in (self.path / SLICES).iterdir():
            found = _SLICE_FILE.fullmatch(file.name)
            if found and int(found[1]) >= count and file.is_file() and not file.is_symlink():
                try:
                    file.unlink()
                except OSError as exc:
                    raise aio.wrap_os_error(exc, "remove a slice file an interrupted grow left", file) from None

    # -- committing --------------------------------------------------------

    def commit(self, manifest: Manifest) -> None:
        """Atomically make ``manifest`` the committed state.

        The caller has written and fdatasync()ed every slice file it names.

        Raises:
            ValueError: ``manifest`` is one :meth:`open` would refuse (a step count beyond
                ``step``, say); nothing is committed and the store stays at its last step.
        """
        manifest = replace(manifest, committed_at=time.time())
        # Checked here, not only at open: a manifest that could not be reopened would lose the run.
        manifest._check(lambda why: ValueError(
            f"cannot commit step {manifest.step} to store {self.path}: {why}. Nothing was committed; the store "
            f"stays at step {self.manifest.step}."))
        self.write_manifest(manifest)

    def _holds(self, text: str) -> bool:
        """Whether ``manifest.json`` is ``text`` now (a commit's rename took effect)."""
        try:
            return (self.path / MANIFEST).read_text() == text
        except (OSError, UnicodeDecodeError):
            return False

    def write_manifest(self, manifest: Manifest) -> None:
        """Replace the manifest atomically: write a temporary file, fsync it, rename it over
        ``manifest.json``, fsync the directory (the commit point of every step; fault tests inject here)."""
        tmp = self.path / (MANIFEST + ".tmp")
        text = manifest.to_json()
        try:
            write_synced(tmp, text.encode())
            # The rename is the commit point: before it the old manifest (and the old
            # generation it names) is what a reopen sees, after it the new one.
            os.replace(tmp, self.path / MANIFEST)
        except BaseException as exc:
            # An error (or Ctrl-C) may come after the rename took effect: then the new
            # manifest is what a reopen sees, and this object must say so too, or the next
            # step would overwrite the generations it names.
            took_effect = self._holds(text)
            if took_effect:
                self.manifest = manifest
            if not isinstance(exc, OSError):
                raise
            if took_effect:
                raise aio.wrap_os_error(exc, f"rename of the manifest of step {manifest.step}, which took effect "
                                             f"(step {manifest.step} is committed)", tmp) from None
            raise aio.wrap_os_error(exc, f"commit step {manifest.step} (the store stays at step "
                                         f"{self.manifest.step})", tmp) from None
        # From here on the new manifest is what a reopen may see: the next step must
        # write the other generations, even if the directory fsync below fails.
        self.manifest = manifest
        try:
            fsync_path(self.path)
        except OSError as exc:
            raise aio.wrap_os_error(
                exc, f"fsync of the directory after committing step {manifest.step} (step {manifest.step} is "
                     f"committed: manifest.json names it and training continues from it, but a power loss before "
                     f"the next commit could bring back step {manifest.step - 1})", self.path,
            ) from None


def read_manifest(path: Path) -> Manifest:
    where = path / MANIFEST
    try:
        text = where.read_text()
    except FileNotFoundError:
        raise StoreError(
            f"{path} holds no manifest.json, so it is not a nearstep store (or its creation was "
            f"interrupted before the first commit). Delete it or pass a new path to create a store."
        ) from None
    except PermissionError as exc:
        raise StorePermissionError(
            exc.errno, f"cannot read {where}: permission denied. Check the ownership and mode of the store directory.", str(where)
        ) from None
    except UnicodeDecodeError:
        raise StoreCorruptError(f"{where} is not text; the store is corrupted. Restore it from a backup or start over.") from None
    return Manifest.from_json(text, where)


def _store_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path; an empty one is refused (``Path("")`` is the current directory)."""
    if os.fspath(path) in ("", b""):
        raise StorePathError(
            "an empty path is not a store directory: Path('') means the current directory, which nearstep "
            "does not fill with store files. Pass the store's own directory, e.g. 'runs/exp1/state'; "
            "nothing was created."
        )
    return Path(path)


def _refuse_a_file_in_the_way(path: Path) -> None:
    """Raise StorePathError when ``path``, or a directory it would be made in, exists as something else."""
    for place in (path, *path.parents):
        if place.is_dir():
            return
        if place.exists() or place.is_symlink():
            what = "is a file, not a directory" if place.is_file() else "exists and is not a directory"
            inside = "" if place == path else f", so the store directory {path} cannot be made in it"
            raise StorePathError(
                f"{place} {what}{inside}. A store is a directory (manifest.json, LOCK, slices/): pass a directory "
                f"that does not exist yet or is empty. {place} was left as it is."
            )


def _size_text(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps the number at 1 or more (``2.29 MiB``)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:,} B"


def _truncate(f: aio.AlignedFile) -> None:
    try:
        os.ftruncate(f.fd, 0)
    except OSError as exc:
        raise aio.wrap_os_error(exc, "truncate", f.path) from None


def _same_name(a: str, b: str) -> bool:
    """Names count only when both are real: ``parameters()`` gives only positional ones."""
    return a == b or is_positional_name(a) or is_positional_name(b)


_SLICE_FILE = re.compile(r"s(\d{6,})\.g[01]")  # slice_path()'s names
_POSITIONAL = re.compile(r"group\d+\.param\d+")  # the names of parameters given without names


def is_positional_name(name: str) -> bool:
    """Whether ``name`` is one nearstep made up for a parameter passed without a name."""
    return bool(_POSITIONAL.fullmatch(name))


def _class_name(kind: str) -> str:
    return {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "lion": "Lion"}.get(kind, kind)
