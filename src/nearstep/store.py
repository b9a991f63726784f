"""The store: one model's optimizer state in a directory on the SSD.

A store is a manifest plus one state file per slice and generation::

    STORE/
      manifest.json          what is committed: step, parameters, slices, checksums
      LOCK                   flock()ed by the process that has the store open
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

from . import aio, formats
from .image import SliceImage
from .errors import (
    DiskFullError,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
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
        """Parse and validate a manifest; anything malformed is a StoreCorruptError."""

        def bad(why: str) -> StoreCorruptError:
            return StoreCorruptError(
                f"{where} is not a valid nearstep manifest ({why}). The store cannot be "
                f"opened; restore it from a backup or delete the directory to start over."
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
        try:
            params = tuple(
                ParamSpec(str(p["name"]), tuple(int(d) for d in p["shape"]), str(p["dtype"]), int(p["group"]))
                for p in doc["params"]
            )
            slices = tuple(
                SliceSpec(
                    int(s["index"]),
                    tuple(Segment(int(g["param"]), int(g["start"]), int(g["length"])) for g in s["segments"]),
                )
                for s in doc["slices"]
            )
            committed = tuple(SliceState(int(c["generation"]), int(c["checksum"])) for c in doc["committed"])
            manifest = cls(
                store_id=str(doc["store_id"]),
                optimizer=str(doc["optimizer"]),
                state_names=tuple(str(n) for n in doc["state_names"]),
                hyperparameters=tuple(dict(h) for h in doc["hyperparameters"]),
                params=params,
                slices=slices,
                step=int(doc["step"]),
                param_steps=tuple(int(s) for s in doc["param_steps"]),
                committed=committed,
                checksum_block=int(doc["checksum_block"]),
                counters={str(k): int(v) for k, v in dict(doc.get("counters", {})).items()},
                created_at=float(doc.get("created_at", 0.0)),
                committed_at=float(doc.get("committed_at", 0.0)),
                state_format=str(doc.get("state_format", "fp32")),  # stores from before formats
                param_stats={str(k): [float(x) for x in v] for k, v in dict(doc.get("param_stats", {})).items()},
                dormant=tuple(int(i) for i in doc.get("dormant", ())),  # stores from before dormant parameters
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise bad(f"{type(exc).__name__}: {exc}") from None
        manifest._check(bad)
        if version != manifest.format_version:
            raise bad(f"format version {version} with {len(manifest.dormant)} dormant parameters")
        return manifest

    def _check(self, bad: Callable[[str], Exception]) -> None:
        if not self.state_names or self.state_names[0] != MASTER:
            raise bad("state_names must start with 'master'")
        if self.step < 0 or self.checksum_block <= 0 or self.checksum_block % aio.PAGE:
            raise bad("step or checksum_block out of range")
        if len(self.param_steps) != len(self.params) or len(self.committed) != len(self.slices):
            raise bad("table lengths disagree")
        for p in self.params:
            if p.dtype not in _DTYPES or any(d < 0 for d in p.shape) or not 0 <= p.group < len(self.hyperparameters):
                raise bad(f"parameter {p.name!r} has an invalid dtype, shape or group")
        if list(self.dormant) != sorted(set(self.dormant)) or not all(0 <= i < len(self.params) for i in self.dormant):
            raise bad("dormant must list parameter indices in increasing order, each once")
        covered = [0] * len(self.params)
        for i, s in enumerate(self.slices):
            if s.index != i:
                raise bad(f"slice {i} has index {s.index}")
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
        why = (f"a store holds at most {limit:,}" if limit == MAX_SLICES else
               f"this process can keep the files of at most {limit:,} open (two per slice, RLIMIT_NOFILE)")
        raise ValueError(
            f"slice_mb={slice_mb:.3g} cuts the parameters into {count:,} slices (two state files each); {why}. "
            f"Use slice_mb={enough:.2g} or more, or leave it None (automatic: about 16 slices). Nothing was written."
        )


def plan_slices(
    params: Sequence[ParamSpec], slice_bytes: int, *, include: Sequence[bool] | None = None, first_index: int = 0
) -> tuple[SliceSpec, ...]:
    """Cut the parameters into slices of about ``slice_bytes`` of fp32 master weights.

    Slices are formed in backward order (the reverse of registration), which is the
    order in which backward finishes their gradients. A parameter that does not fit
    in what is left of the current slice starts a new one; a parameter larger than a
    whole slice is split into slice-sized chunks.

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
            if room == 0:
                close()
            take = min(numel - start, room)
            current.append(Segment(index, start, take))
            start += take
            room -= take
    close()
    return tuple(slices)


# ---------------------------------------------------------------------------
# Locking


def _acquire_lock(path: Path) -> int:
    lock_path = path / LOCK
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
            raise StorePermissionError(
                exc.errno, f"cannot open {lock_path} for writing: {exc.strerror}. Check the ownership and mode of "
                f"the store directory, and that its file system is mounted read-write.", str(lock_path)
            ) from None
        raise aio.wrap_os_error(exc, "open the lock file", lock_path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise StoreLockedError(
            f"store {path} is in use by process {holder} (or by its device process, which exits within "
            f"a second of it). Stop that process (or wait for it to "
            f"close the optimizer), or give this run a different store directory."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


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
        path = Path(path)
        if (path / MANIFEST).exists():
            raise StoreError(f"{path} already holds a store; use Store.open() to continue it, or pick another directory.")
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / SLICES).mkdir(exist_ok=True)
        except PermissionError as exc:
            raise StorePermissionError(
                exc.errno, f"cannot create the store directory {path}: permission denied. "
                "Check the ownership and mode of its parent, or choose another location.", str(path)
            ) from None
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
            slices = plan_slices(params, slice_bytes, include=trainable)
            names = (MASTER, *state_names)
            manifest = Manifest(
                store_id=uuid.uuid4().hex,
                optimizer=optimizer,
                state_names=names,
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
            need = 2 * manifest.state_bytes
            free = shutil.disk_usage(path).free
            if need > free:
                raise DiskFullError(
                    _errno.ENOSPC,
                    f"the store needs {need / 2**30:.2f} GiB (two generations of "
                    f"{manifest.state_bytes / 2**30:.2f} GiB) but {path} has only {free / 2**30:.2f} GiB "
                    f"free. Free space there or put the store on a bigger disk.",
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
    def open(cls, path: str | os.PathLike) -> Store:
        """Open an existing store and take its lock."""
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"{path} is not a directory; create the store first (nearstep does so when the optimizer is given a new path).")
        lock_fd = _acquire_lock(path)
        try:
            return cls(path, read_manifest(path), lock_fd)
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
        free = shutil.disk_usage(self.path).free
        if need > free:
            raise DiskFullError(
                _errno.ENOSPC,
                f"growing the store needs {need / 2**30:.2f} GiB (two generations of the new slices) but "
                f"{self.path} has only {free / 2**30:.2f} GiB free. Free space there or move the store to a "
                f"bigger disk; the store is as it was.",
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
        """
        self.write_manifest(replace(manifest, committed_at=time.time()))

    def write_manifest(self, manifest: Manifest) -> None:
        """Replace the manifest atomically: write a temporary file, fsync it, rename it over
        ``manifest.json``, fsync the directory (the commit point of every step; fault tests inject here)."""
        tmp = self.path / (MANIFEST + ".tmp")
        try:
            write_synced(tmp, manifest.to_json().encode())
            # The rename is the commit point: before it the old manifest (and the old
            # generation it names) is what a reopen sees, after it the new one.
            os.replace(tmp, self.path / MANIFEST)
            # From here on the new manifest is what a reopen may see: the next step must
            # write the other generations, even if the directory fsync below fails.
            self.manifest = manifest
            fsync_path(self.path)
        except OSError as exc:
            raise aio.wrap_os_error(exc, "commit the manifest", tmp) from None


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
