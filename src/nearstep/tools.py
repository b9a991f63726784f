"""Store tools: look inside a store, check it, export its weights, resume from it.

The functions are the API; :func:`main` is ``nearstep inspect|verify|export``.
None of them changes the store's state. They differ in how they share it with
a training process that may have it open:

- :func:`inspect_store` reads only the manifest, which is replaced atomically,
  and never takes the lock; it reports whether someone holds it.
- :func:`verify_store` takes the lock (:meth:`Store.open`, which writes this
  process's pid into ``LOCK``), so a store in use is refused with
  :class:`~nearstep.StoreLockedError`.
- :func:`export_safetensors` reads without the lock and checks afterwards that
  nothing was committed meanwhile (see [Note: reading a store in use]).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from . import formats
from .distributed import store_set_optimizer
from .errors import NearstepError, StoreError, StoreLockedError
from .sensitivity import sensitivity_report
from .optim import SGD, Adam, AdamW, Lion, NearstepOptimizer
from .store import (MANIFEST, Manifest, ParamSpec, Segment, Store, fsync_path, is_positional_name, lock_holder,
                    read_manifest, try_lock)

__all__ = [
    "LockState", "StoreInfo", "VerifyReport", "ExportResult",
    "inspect_store", "format_store_info", "verify_store", "read_masters", "export_safetensors", "resume",
    "ConvertResult", "convert_store", "main",
]

_OPTIMIZERS: dict[str, type[NearstepOptimizer]] = {cls.kind: cls for cls in (AdamW, Adam, SGD, Lion)}
_GUARD_COUNTERS = ("skipped_steps", "spike_clipped", "update_clipped")


def _require_store(path: Path, todo: str = "Check the path: a store is the directory given to the optimizer as store=.") -> Manifest:
    """The manifest at ``path``, or a StoreError that says the path holds no store."""
    if not (path / MANIFEST).is_file():
        what = "does not exist" if not path.exists() else "is not a directory" if not path.is_dir() else f"has no {MANIFEST}"
        raise StoreError(f"{path} holds no nearstep store: it {what}. {todo}")
    return read_manifest(path)


# ---------------------------------------------------------------------------
# inspect


@dataclass(frozen=True, slots=True)
class LockState:
    """Whether a process holds the store's lock, as seen at one instant.

    Attributes:
        in_use: True when the lock is held, False when free, None when it could not be probed.
        holder_pid: the pid the holder wrote into ``LOCK`` (the training process; its
            emulated device process shares the lock), when in use.
        detail: why ``in_use`` is None.
    """

    in_use: bool | None
    holder_pid: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """What :func:`inspect_store` found.

    Attributes:
        path: the store directory.
        manifest: the committed manifest.
        lock: whether the store is in use.
        disk_bytes: bytes allocated on disk by the slice files of both generations and the manifest.
        missing_files: slice files the manifest implies but the directory lacks (see ``nearstep verify``).
    """

    path: Path
    manifest: Manifest
    lock: LockState
    disk_bytes: int
    missing_files: int

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def counters(self) -> dict[str, int]:
        return {**dict.fromkeys(_GUARD_COUNTERS, 0), **self.manifest.counters}

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": str(self.path),
            "store_id": m.store_id,
            "format_version": m.format_version,
            "optimizer": m.optimizer,
            "optimizer_class": f"nearstep.{_OPTIMIZERS[m.optimizer].__name__}" if m.optimizer in _OPTIMIZERS else None,
            "step": m.step,
            "created_at": _iso(m.created_at),
            "committed_at": _iso(m.committed_at),
            "committed_at_unix": m.committed_at,
            "in_use": self.lock.in_use,
            "lock_holder_pid": self.lock.holder_pid,
            "state_names": list(m.state_names),
            "state_format": m.format.name,
            "bytes_per_param": m.format.bytes_per_param(m.state_names),
            "hyperparameters": [dict(h) for h in m.hyperparameters],
            "params": [
                {"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "numel": p.numel, "group": p.group,
                 "steps": m.param_steps[i]}
                for i, p in enumerate(m.params)
            ],
            # Frozen when the store was made (or their group added) and not trained since:
            # no state on disk, no slice (Manifest.dormant).
            "dormant": list(m.dormant),
            "slices": [
                {"index": s.index, "numel": s.numel, "file_bytes": m.slice_file_bytes(s.index),
                 "generation": m.committed[s.index].generation,
                 "segments": [{"param": g.param, "start": g.start, "length": g.length} for g in s.segments]}
                for s in m.slices
            ],
            "sizes": {
                "numel": sum(p.numel for p in m.params),
                "dormant_params": len(m.dormant),
                "dormant_numel": sum(m.params[i].numel for i in m.dormant),
                "state_bytes_per_generation": m.state_bytes,
                "store_bytes_two_generations": 2 * m.state_bytes,
                "disk_bytes": self.disk_bytes,
                "slice_count": len(m.slices),
                "slice_file_bytes_min": min((m.slice_file_bytes(s.index) for s in m.slices), default=0),
                "slice_file_bytes_max": max((m.slice_file_bytes(s.index) for s in m.slices), default=0),
                "missing_files": self.missing_files,
            },
            "counters": self.counters,
        }


def _probe_lock(path: Path) -> LockState:
    """Whether another process holds the store's lock, without taking it for longer than a probe.

    The probe is the store's own lock (the flock of its directory, :func:`~nearstep.store.try_lock`)
    taken shared and non-blocking on a descriptor of our own, released at once. For that
    instant a training process opening the store would be refused, as by any other holder;
    a shared lock keeps two probes from refusing each other. Nothing is created or written.
    """
    try:
        fd = try_lock(path, shared=True)
    except OSError as exc:
        return LockState(None, detail=f"cannot open {path} to probe its lock: {exc.strerror}")
    if fd is None:
        holder = lock_holder(path)  # the pid the holder recorded; "unknown" if LOCK was removed
        return LockState(True, int(holder) if holder.isdigit() else None)
    os.close(fd)  # releases the probe
    return LockState(False)


def inspect_store(path: str | os.PathLike) -> StoreInfo:
    """Read a store's manifest (without its lock) and say whether it is in use.

    Raises:
        StoreError: ``path`` holds no store; StoreCorruptError if its manifest is invalid.
    """
    path = Path(path)
    manifest = _require_store(path)
    view = Store(path, manifest, lock_fd=-1)  # for slice_path only; holds no lock
    disk_bytes, missing = 0, 0
    for _k, _g, file in view.iter_slice_paths():
        try:
            disk_bytes += os.stat(file).st_blocks * 512
        except FileNotFoundError:
            missing += 1
    disk_bytes += os.stat(path / MANIFEST).st_blocks * 512  # os.replace() never leaves the name missing
    return StoreInfo(path, manifest, _probe_lock(path), disk_bytes, missing)


def _iso(unix: float) -> str | None:
    """Local ISO time of a UNIX time; None for 0 (not recorded). The manifest check refuses
    times no clock can show, but a Manifest made in code is shown too, never an OverflowError."""
    if not unix > 0:
        return None
    try:
        return datetime.fromtimestamp(unix).astimezone().isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{unix!r} (not a time this system can show)"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _table(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  " + "  ".join(cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def _segment_text(params: tuple[ParamSpec, ...], seg: Segment) -> str:
    p = params[seg.param]
    if seg.length == p.numel:
        return p.name
    return f"{p.name}[{seg.start}:{seg.start + seg.length}]"


def format_store_info(info: StoreInfo) -> str:
    """The text ``nearstep inspect`` prints."""
    m = info.manifest
    lock = info.lock
    if lock.in_use is None:
        in_use = f"unknown ({lock.detail})"
    elif lock.in_use:
        who = f"process {lock.holder_pid}" if lock.holder_pid is not None else "an unknown process"
        in_use = f"yes, LOCK held by {who}; what follows is its last commit"
    else:
        in_use = "no"
    kind = f"{m.optimizer} (nearstep.{_OPTIMIZERS[m.optimizer].__name__})" if m.optimizer in _OPTIMIZERS else m.optimizer
    file_sizes = sorted({m.slice_file_bytes(s.index) for s in m.slices}) or [0]
    size_range = _size(file_sizes[0]) if len(file_sizes) == 1 else f"{_size(file_sizes[0])} to {_size(file_sizes[-1])}"
    counters = info.counters
    lines = [
        f"store        {info.path}",
        f"store id     {m.store_id}",
        f"in use       {in_use}",
        f"optimizer    {kind}",
        f"step         {m.step}",
        f"committed    {_iso(m.committed_at) or 'never'}",
        f"created      {_iso(m.created_at) or 'unknown'}",
        f"state        {', '.join(m.state_names)} ({m.format.name}: {m.format.bytes_per_param(m.state_names):.2f} bytes per parameter)",
        f"size         {_size(m.state_bytes)} per generation ({m.state_bytes:,} bytes); "
        f"{_size(2 * m.state_bytes)} for the two generations; {_size(info.disk_bytes)} allocated on disk",
        f"slices       {len(m.slices)}, {size_range} per file",
        "guards       " + ", ".join(f"{k} {counters[k]}" for k in _GUARD_COUNTERS),
    ]
    if m.dormant:
        frozen = sum(m.params[i].numel for i in m.dormant)
        lines.append(f"frozen       {len(m.dormant)} of {len(m.params)} parameters ({frozen:,} elements) have no state "
                     f"in the store; they get it when first trained")
    if info.missing_files:
        lines.append(f"WARNING      {info.missing_files} slice files are missing; run `nearstep verify {info.path}`")
    lines += ["", f"hyperparameters (per param group, as committed at step {m.step})"]
    for g, hyper in enumerate(m.hyperparameters):
        lines.append(f"  group {g}: " + " ".join(f"{k}={v}" for k, v in hyper.items()))
    total = sum(p.numel for p in m.params)
    lines += ["", f"parameters ({len(m.params)}, {total:,} elements)"]
    rows = [("#", "name", "shape", "dtype", "numel", "group", "steps")]
    rows += [(str(i), p.name, str(list(p.shape)), p.dtype, f"{p.numel:,}", str(p.group), str(m.param_steps[i]))
             for i, p in enumerate(m.params)]
    if m.dormant:  # the column only where it says something
        rows = [(*rows[0], "state")] + [(*row, "frozen, no state" if m.is_dormant(i) else "")
                                        for i, row in enumerate(rows[1:])]
    lines += _table(rows, right={0, 4, 5, 6})
    lines += ["", f"slices ({len(m.slices)}; one file per generation)"]
    rows = [("#", "numel", "file bytes", "gen", "parameters")]
    for s in m.slices:
        names = ", ".join(_segment_text(m.params, g) for g in s.segments)
        rows.append((str(s.index), f"{s.numel:,}", f"{m.slice_file_bytes(s.index):,}", str(m.committed[s.index].generation),
                     names if len(names) <= 72 else names[:69] + "..."))
    lines += _table(rows, right={0, 1, 2, 3})
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# verify


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify_store` found.

    Attributes:
        path: the store directory.
        step: the committed step that was checked.
        slices: how many slices the store has.
        bad_slices: the indices of slices with at least one problem.
        problems: one line per problem, each naming the file.
        dormant: how many parameters have no state to check (frozen, ``Manifest.dormant``).
    """

    path: Path
    step: int
    slices: int
    bad_slices: tuple[int, ...]
    problems: tuple[str, ...]
    dormant: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        frozen = f"; {self.dormant} frozen parameters have no state to check" if self.dormant else ""
        if self.ok:
            return f"{self.slices} slices, all checksums match (step {self.step}){frozen}"
        return f"{len(self.bad_slices)} of {self.slices} slices bad (step {self.step}){frozen}"


def verify_store(path: str | os.PathLike) -> VerifyReport:
    """Check every slice file of a store: present, the expected size, and (committed ones) the checksum.

    Takes the store's lock for a consistent view; changes nothing but the pid in ``LOCK``.
    Both generations must exist at full size: the committed one holds the state,
    the other is where the next step writes (it is opened, not created, then).

    The manifest is validated for meaning first (:meth:`Manifest.from_json`: a wrong one
    raises before any file is looked at); a slice whose two files agree in size with each
    other but not with the manifest gets a line saying the manifest does not describe them,
    besides each file's line.

    Raises:
        StoreLockedError: another process has the store open (the message names its pid).
        StoreError: ``path`` holds no store (StoreCorruptError: its manifest is invalid).
    """
    _require_store(Path(path))  # before Store.open, which would create LOCK in any directory
    problems: dict[int, list[str]] = {}
    try:
        store = Store.open(path, check_files=False)  # the files are checked below, one line each
    except StoreLockedError as exc:
        raise StoreLockedError(
            f"cannot verify {path} while it is in use: {exc} Verify reads every file and needs the store to "
            f"itself, so that no step rewrites a file under it; nothing was checked. `nearstep inspect` "
            f"works on a store in use."
        ) from None
    with store:
        m = store.manifest
        for spec in m.slices:
            k = spec.index
            want = m.slice_file_bytes(k)
            committed = m.committed[k].generation
            readable = False
            sizes = []
            for gen in (committed, committed ^ 1):
                role = "committed" if gen == committed else "spare: the next step writes it"
                file = store.slice_path(k, gen)
                try:
                    size = os.stat(file).st_size
                except FileNotFoundError:
                    problems.setdefault(k, []).append(f"{file}: missing (slice {k}, {role})")
                    continue
                except OSError as exc:
                    problems.setdefault(k, []).append(f"{file}: cannot stat: {exc.strerror} (slice {k}, {role})")
                    continue
                sizes.append(size)
                if size != want:
                    how = "truncated" if size < want else "longer than written"
                    problems.setdefault(k, []).append(f"{file}: {size:,} bytes, expected {want:,}: {how} (slice {k}, {role})")
                if gen == committed:
                    readable = size >= want
            layout = store.layout_disagreement(k, sizes)
            if layout is not None:
                problems[k].append(f"slice {k}: {layout}")
                readable = False  # decoding it by a layout it was not written in proves nothing more
            if readable:
                try:
                    store.read_slice(k)  # verifies the checksum the manifest committed
                except (NearstepError, OSError) as exc:
                    problems.setdefault(k, []).append(str(exc))
    return VerifyReport(Path(path), m.step, len(m.slices), tuple(sorted(problems)),
                        tuple(line for k in sorted(problems) for line in problems[k]), len(m.dormant))


# ---------------------------------------------------------------------------
# export


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What :func:`export_safetensors` wrote.

    Attributes:
        left_out: the names of the dormant parameters, which the store holds no master
            weights for and the file leaves out.
    """

    path: Path
    step: int
    store_id: str
    tensors: int
    nbytes: int
    positional_names: bool
    left_out: tuple[str, ...] = ()


# [Note: reading a store in use]
# A step writes each slice's generation that the manifest does *not* name, and
# the generation it names is rewritten only by the step after the next, once a new
# manifest has replaced this one. So if the manifest is the same before and after
# reading every slice, nothing read was being written: the snapshot is exactly
# that commit. A store that commits every few milliseconds rarely stays that still
# for a whole read, so a read whose every slice matched the checksum the starting
# manifest committed for it is taken as well: a slice the step after the next had
# begun to overwrite would hold a mix of two steps' bytes, which matches the
# committed CRC32 with a chance of 2**-32. A mismatch while the manifest changed is
# such an overwrite, not corruption: the read starts over from the new manifest.
#
# Step by step, for manifest N naming generation g of slice s with checksum c:
# step N+1 writes the other generation and commits N+1; step N+2 starts writing g
# only once N+1 is committed. Hence "the store moved by at most one commit during
# the read" does *not* mean g was untouched: a reader that sees N+1 afterwards may
# have read s while N+2 was overwriting it. Only "still N afterwards" rules every
# writer of g out, which is why the moved case rests on the checksum instead: bytes
# of s that match c are N's bytes (a torn N/N+2 mix, or a whole later version of g,
# differs from them and matches c only by a CRC32 collision; a later version equal
# to N's bytes is N's state anyway). Every slice matching its c therefore gives
# step N's state and nothing of another step; asking also for "at most one commit
# since" would not lower that chance, only refuse more reads of a fast store. A
# store whose whole read takes longer than about two commit intervals keeps failing
# the check: read_masters gives up after its timeout and says to export when
# training pauses.


def positional_names(manifest: Manifest) -> list[str]:
    """Every parameter's place in the optimizer, ``group{g}.param{i}`` (``i`` counted within its group)."""
    seen: dict[int, int] = {}
    out = []
    for p in manifest.params:
        out.append(f"group{p.group}.param{seen.get(p.group, 0)}")
        seen[p.group] = seen.get(p.group, 0) + 1
    return out


def _same_commit(a: Manifest, b: Manifest) -> bool:
    return (a.step, a.committed_at, a.committed) == (b.step, b.committed_at, b.committed)


def read_masters(path: str | os.PathLike, timeout: float = 30.0) -> tuple[Manifest, list[torch.Tensor | None]]:
    """The committed fp32 master weights, one tensor per parameter (shaped), without the lock.

    A dormant parameter (no state in the store, ``manifest.is_dormant(i)``) gets None.
    Reads of a store that a training run is committing to are retried for up to
    ``timeout`` seconds (see [Note: reading a store in use]).

    Raises:
        StoreCorruptError: a slice file does not match its checksum (and the store did not move).
        StoreError: no read of the store succeeded within ``timeout`` seconds.
    """
    path = Path(path)
    _require_store(path)
    deadline = time.monotonic() + timeout
    pause, attempts = 0.001, 0
    while True:
        attempts += 1
        manifest = read_manifest(path)
        view = Store(path, manifest, lock_fd=-1)  # reads only; see [Note: reading a store in use]
        try:
            flats = view.read_params()["master"]
        except (NearstepError, OSError):
            if _same_commit(read_manifest(path), manifest):
                raise  # the store did not move: the damage is real
        else:
            # Every slice matched the checksum ``manifest`` committed for it, whether or not the
            # store moved meanwhile: each slice holds that commit's bytes, so no slice can come
            # from another step (short of a CRC32 collision; see the Note).
            return manifest, [None if flat is None else flat.view(p.shape) for flat, p in zip(flats, manifest.params)]
        if time.monotonic() + pause > deadline:
            raise StoreError(
                f"store {path} committed a new step during each of {attempts} reads in {timeout:g} s; export it "
                f"when training pauses or after it stops, or allow a longer timeout."
            )
        time.sleep(pause)
        pause = min(2 * pause, 0.25)


def export_safetensors(store: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                       by_position: bool = False, timeout: float = 30.0) -> ExportResult:
    """Write the store's committed fp32 master weights to a safetensors file, by parameter name.

    The file loads with ``safetensors.torch.load_file`` and, when the store was made
    from ``model.named_parameters()``, into the model with ``model.load_state_dict``
    (``strict=False`` if the model has buffers). Stores made from ``model.parameters()``
    have positional names (``group0.param3``); map those by position. Its metadata
    holds ``nearstep.step``, ``nearstep.store_id`` and ``nearstep.optimizer``.

    Dormant parameters (frozen, never trained: the store holds no master weights for
    them) are left out of the file, and ``left_out`` names them; load it with
    ``strict=False`` so that the model keeps its own weights for those.

    The store is read without its lock (a running training keeps running) and is
    not modified. ``out`` appears complete or not at all: the tensors go to a
    temporary file in the same directory, which is fsynced and then renamed.

    Parameter names repeat when param groups were built from submodules'
    ``named_parameters()`` ("weight" in every group): such a store is refused, naming
    the repeated names, unless ``by_position`` is True, which names every tensor
    ``group{g}.param{i}`` (its place in the optimizer) and keeps the original names in
    the metadata: ``nearstep.names``, a JSON object from each positional name to the
    original one (an object, not a list: ``safe_open(...).keys()`` sorts the names,
    ``group0.param10`` before ``group0.param2``).

    A store that training is committing to is read as in :func:`read_masters`, for up
    to ``timeout`` seconds.

    Raises:
        FileExistsError: ``out`` exists and ``force`` is False.
        StoreError: parameter names repeat and ``by_position`` is False, or no consistent
            read within ``timeout`` (nothing written either way).
    """
    from safetensors.torch import save_file

    store, out = Path(store), Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force (force=True) to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent} does not exist; create it first or write {out.name} elsewhere")
    manifest, masters = read_masters(store, timeout=timeout)
    kept = [(i, p, t) for i, (p, t) in enumerate(zip(manifest.params, masters)) if t is not None]
    names = positional_names(manifest) if by_position else [p.name for p in manifest.params]
    counts = collections.Counter(names[i] for i, _p, _t in kept)
    repeated = sorted(n for n, c in counts.items() if c > 1)
    if repeated:
        shown = ", ".join(repr(n) for n in repeated[:5]) + (", ..." if len(repeated) > 5 else "")
        sharing = sum(counts[n] for n in repeated)
        raise StoreError(
            f"store {store} names {len(repeated)} of its parameter names more than once ({shown}; {sharing} of its "
            f"{len(kept)} tensors share them): its param groups were built from submodules' named_parameters(), and "
            f"a file keyed by name would keep one tensor per name. Export with --by-position (by_position=True): "
            f"every tensor named group{{g}}.param{{i}}, the original names kept in the metadata. Nothing was written."
        )
    tensors = {names[i]: t for i, _p, t in kept}
    metadata = {"format": "pt", "nearstep.step": str(manifest.step), "nearstep.store_id": manifest.store_id,
                "nearstep.optimizer": manifest.optimizer}
    if by_position:
        metadata["nearstep.names"] = json.dumps({names[i]: p.name for i, p, _t in kept})
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, tmp, metadata=metadata)
        fsync_path(tmp)
        if force:
            os.replace(tmp, out)
        else:
            # link() fails if out appeared meanwhile, where replace() would overwrite it.
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise FileExistsError(f"{out} exists; pass --force (force=True) to replace it") from None
            tmp.unlink()
        fsync_path(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    positional = by_position or any(is_positional_name(p.name) for p in manifest.params)
    return ExportResult(out, manifest.step, manifest.store_id, len(tensors), sum(t.numel() * 4 for t in tensors.values()),
                        positional, tuple(manifest.params[i].name for i in manifest.dormant))


# ---------------------------------------------------------------------------
# resume



def resume(params: Any, store: str | os.PathLike | Store, **kwargs: Any) -> NearstepOptimizer:
    """Continue training from a store's last committed step, with the optimizer it was made by.

    Reads the manifest (without the lock) to learn which optimizer the store holds
    (``adamw``, ``adam``, ``sgd`` or ``lion``), then constructs that class with
    ``params``, ``store`` and ``kwargs``; as for any nearstep optimizer on an
    existing store, its committed master weights become the parameters' values.

    Args:
        params: the same parameters (and param groups) the store was made for.
        store: the store directory (or an open :class:`~nearstep.Store`).
        kwargs: the optimizer's arguments (``lr``, ``mode``, ``device``, ...). The
            store records the last hyperparameters (``nearstep inspect`` shows them)
            but does not impose them: pass the ones you want.

    Dormant parameters (frozen so far, no state in the store) have no master weights
    to restore; they keep the values ``params`` have.

    Raises:
        StoreError: ``store`` holds no store; StoreMismatchError: it was made for
            other parameters; StoreLockedError: another process has it open.

    Example::

        opt = nearstep.resume(model.named_parameters(), "runs/exp1/state", lr=3e-4)
    """
    if isinstance(store, Store):
        kind = store.manifest.optimizer
    else:
        # Many ranks: store= names the store set (see nearstep.distributed), each rank reads its own.
        kind = store_set_optimizer(store, kwargs.get("process_group"))
        if kind is None:
            kind = _require_store(Path(store), "There is nothing to resume; to start a new store there, construct "
                                  "the optimizer, e.g. nearstep.AdamW(params, store=...).").optimizer
    cls = _OPTIMIZERS.get(kind)
    if cls is None:
        raise StoreError(f"store {store} holds {kind!r} state, which this nearstep has no optimizer for "
                         f"(it knows {', '.join(sorted(_OPTIMIZERS))}); use the release that wrote it.")
    return cls(params, store=store, **kwargs)


# ---------------------------------------------------------------------------
# convert


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What :func:`convert_store` wrote."""

    path: Path
    step: int
    source_format: str
    state_format: str
    state_bytes: int
    source_state_bytes: int


def convert_store(source: str | os.PathLike, out: str | os.PathLike, state_format: str) -> ConvertResult:
    """Write a new store at ``out`` holding ``source``'s committed state in ``state_format``.

    The source is opened with its lock (it must not be in use) and left as it was;
    the new store has the same parameters (dormant ones stay dormant), optimizer, step,
    per-parameter steps, hyperparameters and guard counters. Converting to a lossy format rounds the
    state once, exactly as training in that format would.

    Raises:
        StoreError: ``source`` holds no store or ``out`` is not a fresh directory;
        StoreLockedError: ``source`` is in use; StoreCorruptError: a slice is damaged
        (nothing is written then); ValueError: an unknown format name.
    """
    fmt = formats.StateFormat.parse(state_format)
    _require_store(Path(source))
    with Store.open(source) as src:
        m = src.manifest
        state = src.read_params(m.state_names)  # every slice verified before anything is written
        largest = max((s.numel for s in m.slices), default=1)
        with Store.create(
            out, params=m.params, masters=lambda i: state["master"][i], optimizer=m.optimizer,
            state_names=m.state_names[1:], hyperparameters=m.hyperparameters, slice_bytes=largest * 4,
            checksum_block=m.checksum_block, state_format=fmt, moments=lambda name, i: state[name][i],
            trainable=[not m.is_dormant(i) for i in range(len(m.params))],
        ) as dst:
            dst.commit(replace(dst.manifest, step=m.step, param_steps=m.param_steps, counters=dict(m.counters),
                               param_stats=dict(m.param_stats)))
            return ConvertResult(Path(out), m.step, m.format.name, fmt.name, dst.manifest.state_bytes, m.state_bytes)


# ---------------------------------------------------------------------------
# the command line: nearstep inspect | verify | export | convert


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nearstep", description="Store tools. Exit codes: 0 done, "
                                     "1 the store has problems or the command failed, 2 usage or unreadable store.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("inspect", help="print a store's step, optimizer, parameters, sizes and counters")
    p.add_argument("store", help="the store directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--sensitivity", action="store_true",
                   help="rank the parameters by what the guards did to them (spike-clipped rate, update/weight)")
    p.add_argument("--top", type=int, default=15, help="how many parameters --sensitivity lists (default 15)")
    p.add_argument("--png", help="with --sensitivity: also draw the ranking as a bar chart into this PNG")
    p = sub.add_parser("verify", help="check every slice file's presence, size and checksum")
    p.add_argument("store", help="the store directory")
    p = sub.add_parser("export", help="write the fp32 master weights to a safetensors file")
    p.add_argument("store", help="the store directory")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--by-position", action="store_true",
                   help="name tensors group{g}.param{i} (needed when parameter names repeat); names go to the metadata")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to keep retrying a read of a store that training commits to (default 30)")
    p = sub.add_parser("convert", help="copy a store into a new one with another state format")
    p.add_argument("store", help="the store directory (left unchanged)")
    p.add_argument("out", help="the new store directory (must not exist or be empty)")
    p.add_argument("--state-format", required=True, help="e.g. fp32, bf16-kahan, bf16-sr, 8bit, bf16-sr+8bit")
    return parser


def main(argv: list[str]) -> int:
    """``nearstep inspect|verify|export ...``; ``argv`` starts with the command."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0) return, not exit
        return int(exc.code or 0)
    command = {"inspect": _inspect_command, "verify": _verify_command, "export": _export_command,
               "convert": _convert_command}[args.command]
    try:
        return command(args)
    except BrokenPipeError:  # `nearstep inspect STORE | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def _fail(command: str, exc: BaseException, code: int) -> int:
    print(f"nearstep {command}: error: {exc}", file=sys.stderr)
    return code


def _inspect_command(args: argparse.Namespace) -> int:
    try:
        info = inspect_store(args.store)
    except (NearstepError, OSError) as exc:
        return _fail("inspect", exc, 2)
    if args.png and not args.sensitivity:
        return _fail("inspect", ValueError("--png draws the sensitivity chart: add --sensitivity"), 2)
    if not args.sensitivity:
        print(json.dumps(info.to_dict(), indent=1) if args.json else format_store_info(info))
        return 0
    report = sensitivity_report(info.manifest)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.table(args.top))
    if args.png:
        print(f"chart: {report.plot(args.png, args.top)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _verify_command(args: argparse.Namespace) -> int:
    try:
        report = verify_store(args.store)
    except (NearstepError, OSError) as exc:  # no store, invalid manifest, in use: nothing was checked
        return _fail("verify", exc, 2)
    for line in report.problems:
        print(line)
    print(report.summary())
    return 0 if report.ok else 1


def _export_command(args: argparse.Namespace) -> int:
    try:
        _require_store(Path(args.store))
    except (NearstepError, OSError) as exc:
        return _fail("export", exc, 2)
    try:
        result = export_safetensors(args.store, args.out, force=args.force, by_position=args.by_position,
                                    timeout=args.timeout)
    except (NearstepError, OSError) as exc:  # OUT exists, a corrupted slice, a write error
        return _fail("export", exc, 1)
    print(f"wrote {result.tensors} tensors ({_size(result.nbytes)} of fp32 master weights) of step {result.step} "
          f"of store {result.store_id} to {result.path}")
    if args.by_position:
        print("note: tensors are named group{g}.param{i} (--by-position); the original name of each is in the "
              "file's metadata: nearstep.names, a JSON object from positional name to original name")
    elif result.positional_names:
        print("note: the store was made from model.parameters(), so tensors are named group{g}.param{i}; "
              "map them to the model's parameters by position")
    if result.left_out:
        names = ", ".join(result.left_out[:5]) + (", ..." if len(result.left_out) > 5 else "")
        print(f"note: {len(result.left_out)} frozen parameters have no state in the store and were left out ({names}); "
              f"load the file with strict=False and keep the model's own weights for them")
    return 0


def _convert_command(args: argparse.Namespace) -> int:
    try:
        _require_store(Path(args.store))
    except (NearstepError, OSError) as exc:
        return _fail("convert", exc, 2)
    try:
        r = convert_store(args.store, args.out, args.state_format)
    except (NearstepError, OSError, ValueError) as exc:
        return _fail("convert", exc, 1)
    print(f"wrote step {r.step} of {args.store} ({r.source_format}, {_size(r.source_state_bytes)} per generation) "
          f"to {r.path} as {r.state_format} ({_size(r.state_bytes)} per generation)")
    return 0
