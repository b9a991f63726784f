"""Framework checkpoints of a store: reference state dicts and the store snapshots they name.

HF Trainer and Lightning checkpoint an optimizer with
``torch.save(opt.state_dict(), path)`` and restore it with
``opt.load_state_dict(torch.load(path, weights_only=True))``. A state dict that
held the whole fp32 state would be built in host RAM (12 bytes per parameter
for AdamW), the very thing keeping the state on the SSD avoids. So a nearstep
optimizer's ``state_dict()`` is a *reference*: torch's ``param_groups``, an empty
``state``, and a ``"nearstep"`` entry naming the store and a **snapshot** of its
committed generation, which ``state_dict()`` writes into the store::

    STORE/
      manifest.json, LOCK, slices/      the store itself (see store.py)
      snapshots/
        step-000500-3f2a9c1d04be/       one snapshot, itself a valid store:
          manifest.json                   the store's manifest as committed at step 500
          snapshot.json                   which store it is of, its step, digest and time
          slices/s000003.g1               each slice's committed generation, copied
          slices/s000003.g0               the spare generation: sparse, no blocks on disk
        .tmp-step-000510-.../           a snapshot being written (or left by a crash)

A snapshot is named by its step and the first hex digits of :func:`state_digest`
(the store id, the step, the per-parameter steps and every slice's checksum), so
two different states at one step (after a rewind) never share a name, and a
second ``state_dict()`` at the same state reuses the snapshot already there.
The newest ``keep`` snapshots are kept (``opt.keep_snapshots``, default
:data:`DEFAULT_KEEP_SNAPSHOTS`); older ones are deleted when a new one is taken.
A reference whose snapshot is gone fails to load with a :class:`StoreError`
that says so.

``load_state_dict`` restores a snapshot slice by slice (:func:`restore_snapshot`):
host memory holds a few slices at a time, never the whole state.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import aio
from .protocol import Abort, Commit, Completion, Device, LoadState
from .errors import DiskFullError, NearstepError, StoreCorruptError, StoreError, StoreMismatchError
from .store import (MANIFEST, MASTER, SLICES, Manifest, Segment, SliceSpec, Store, fsync_path, is_positional_name,
                    read_manifest, write_synced)

__all__ = [
    "SNAPSHOTS",
    "DEFAULT_KEEP_SNAPSHOTS",
    "Snapshot",
    "Reference",
    "state_digest",
    "take_snapshot",
    "copy_file",
    "list_snapshots",
    "prune_snapshots",
    "open_snapshot",
    "check_snapshot_fits",
    "restore_snapshot",
    "copy_masters_into",
    "pack_param_groups",
    "is_reference",
]

SNAPSHOTS = "snapshots"
SNAPSHOT_INFO = "snapshot.json"
DEFAULT_KEEP_SNAPSHOTS = 2
REFERENCE_LAYOUT = "reference"
FULL_LAYOUT = "full"
REFERENCE_VERSION = 1
_PARTIAL = ".tmp-"  # prefix of a snapshot being written or deleted
_COPY_CHUNK = 8 << 20  # bytes per read/write where the kernel cannot copy by itself
_CACHED_SLICES = 2  # decoded snapshot slices kept while restoring (slice tables may differ)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One snapshot of a store's committed generation (see the module docstring).

    Attributes:
        path: its directory, ``STORE/snapshots/step-NNNNNN-DIGEST``.
        store: the store it is a snapshot of (absolute path).
        store_id: that store's id.
        step: the committed optimizer step it holds.
        digest: :func:`state_digest` of its manifest.
        taken_at: UNIX time of the last ``state_dict()`` that took or reused it (pruning keeps the newest).
        state_bytes: bytes of its slice files.
    """

    path: Path
    store: Path
    store_id: str
    step: int
    digest: str
    taken_at: float
    state_bytes: int

    def to_json(self) -> str:
        return json.dumps({"store": str(self.store), "store_id": self.store_id, "step": self.step,
                           "digest": self.digest, "taken_at": self.taken_at, "state_bytes": self.state_bytes},
                          indent=1, sort_keys=True)


@dataclass(frozen=True, slots=True)
class Reference:
    """What a reference state dict's ``"nearstep"`` entry says (see :meth:`from_meta`).

    Attributes:
        store: the store the checkpoint was taken of (absolute path).
        store_id: its id.
        step: the committed step of the snapshot.
        snapshot: the snapshot directory (absolute path).
        digest: the snapshot's :func:`state_digest`.
        counters: the guard counters at that step.
    """

    store: Path
    store_id: str
    step: int
    snapshot: Path
    digest: str
    counters: dict[str, int]

    def to_meta(self, kind: str, names: Sequence[str]) -> dict[str, Any]:
        """Plain dicts, lists, str and int only: ``torch.load(weights_only=True)`` reads them."""
        return {
            "layout": REFERENCE_LAYOUT,
            "version": REFERENCE_VERSION,
            "kind": kind,
            "step": self.step,
            "counters": dict(self.counters),
            "names": list(names),
            "store": str(self.store),
            "store_id": self.store_id,
            "snapshot": {"path": str(self.snapshot), "name": self.snapshot.name, "step": self.step, "digest": self.digest},
        }

    @classmethod
    def from_meta(cls, meta: Any) -> Reference:
        try:
            snap = meta["snapshot"]
            if meta.get("version", REFERENCE_VERSION) != REFERENCE_VERSION:
                raise ValueError(f"version {meta.get('version')!r}")
            return cls(Path(str(meta["store"])), str(meta["store_id"]), int(snap["step"]), Path(str(snap["path"])),
                       str(snap["digest"]), {str(k): int(v) for k, v in dict(meta.get("counters", {})).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(
                f"the state dict's 'nearstep' entry is not a reference this nearstep reads "
                f"({type(exc).__name__}: {exc}); it was written by another release or edited. Load it "
                f"with the release that wrote it, or save a new checkpoint."
            ) from None


def is_reference(state_dict: dict[str, Any]) -> bool:
    """Whether ``state_dict`` is a reference (else the full layout, whose state is in the dict)."""
    meta = state_dict.get("nearstep")
    return isinstance(meta, dict) and (meta.get("layout") == REFERENCE_LAYOUT or "snapshot" in meta)


def pack_param_groups(param_groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """torch's ``param_groups`` of a state dict: each group's options, its parameters as indices."""
    groups, index = [], 0
    for group in param_groups:
        packed = {k: v for k, v in group.items() if k != "params"}
        packed["params"] = list(range(index, index + len(group["params"])))
        index += len(group["params"])
        groups.append(packed)
    return groups


def state_digest(manifest: Manifest) -> str:
    """A hex digest of what a commit holds: store id, step, per-parameter steps, slice checksums.

    Two manifests with one digest name the same state (the checksums cover every
    byte of every slice), whichever generation holds it.
    """
    doc = [manifest.store_id, manifest.step, list(manifest.param_steps), manifest.state_format,
           [c.checksum for c in manifest.committed]]
    return hashlib.blake2b(json.dumps(doc).encode(), digest_size=16).hexdigest()


def snapshot_name(manifest: Manifest) -> str:
    return f"step-{manifest.step:06d}-{state_digest(manifest)[:12]}"


# ---------------------------------------------------------------------------
# Taking snapshots

# [Note: snapshots are copied while the device owns the store]
# The device keeps the store's lock and may write to it, but a step writes only each
# slice's *uncommitted* generation; the committed one is rewritten by the step after
# the next commit at the earliest. state_dict() copies the committed generation of
# the manifest the device returned after synchronize(), between steps, and returns
# only when the copy is complete and fsynced: no commit can happen while it copies.
# The copy runs in the kernel (copy_file_range: a reflink or an in-kernel copy on
# the same file system), so no state passes through this process's memory; where
# the kernel cannot, it goes through one 8 MiB chunk at a time.


def take_snapshot(store: Store, manifest: Manifest, keep: int = DEFAULT_KEEP_SNAPSHOTS) -> Snapshot:
    """Copy ``manifest``'s committed generation into ``STORE/snapshots/``; keep the newest ``keep``.

    ``manifest`` is the store's last commit, and no commit may happen until this
    returns (see [Note: snapshots are copied while the device owns the store]); the
    caller holds the store's lock. Crash-safe: the snapshot is written into a
    temporary directory, fsynced, and renamed into place; leftovers of an interrupted
    one are deleted by the next. A snapshot of the same state already there is reused.

    Raises:
        DiskFullError: the file system has no room for one more generation of the state.
        StoreIOError: another I/O error; the store itself is untouched either way.
    """
    if not (isinstance(keep, int) and keep >= 1):
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    root = store.path / SNAPSHOTS
    name = snapshot_name(manifest)
    digest = state_digest(manifest)
    try:
        root.mkdir(exist_ok=True)
        for leftover in root.glob(_PARTIAL + "*"):
            shutil.rmtree(leftover, ignore_errors=True)  # only the lock holder writes here: nobody else's
        existing = _read_info(root / name)
        if existing is not None and existing.digest == digest:
            snapshot = _write_info(_replace_time(existing, time.time()))
        else:
            if (root / name).exists():
                _discard(root / name)  # not a snapshot of this state after all (edited or damaged)
            snapshot = _write_snapshot(store, manifest, root, name, digest)
        prune_snapshots(store.path, keep, protect=snapshot.path)
    except NearstepError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                exc.errno,
                f"no room for a snapshot of store {store.path} in {root} ({manifest.state_bytes / 2**20:.1f} MiB: one "
                f"generation of the state). Free space there, lower keep_snapshots (now {keep}), or checkpoint with "
                f"opt.full_state_dict() instead. The store is untouched.",
                str(root),
            ) from None
        raise aio.wrap_os_error(exc, "write a snapshot of the store", root) from None
    return snapshot


def _write_snapshot(store: Store, manifest: Manifest, root: Path, name: str, digest: str) -> Snapshot:
    tmp = root / f"{_PARTIAL}{name}-{os.getpid()}"
    source = Store(store.path, manifest, lock_fd=-1)  # for slice_path only
    target = Store(tmp, manifest, lock_fd=-1)
    snapshot = Snapshot(root / name, store.path.resolve(), manifest.store_id, manifest.step, digest, time.time(),
                        manifest.state_bytes)
    try:
        (tmp / SLICES).mkdir(parents=True)
        for spec in manifest.slices:
            k = spec.index
            gen = manifest.committed[k].generation
            nbytes = manifest.slice_file_bytes(k)
            copy_file(source.slice_path(k, gen), target.slice_path(k, gen), nbytes)
            # The spare generation: at full size, as a store has it (nearstep verify checks
            # that), but sparse, so a snapshot costs one generation of disk, not two.
            fd = os.open(target.slice_path(k, gen ^ 1), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, nbytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_path(tmp / SLICES)
        write_synced(tmp / MANIFEST, manifest.to_json().encode())
        write_synced(tmp / SNAPSHOT_INFO, snapshot.to_json().encode())
        fsync_path(tmp)
        os.rename(tmp, snapshot.path)  # the snapshot appears complete or not at all
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return snapshot


def copy_file(src: Path, dst: Path, nbytes: int) -> None:
    """Copy the first ``nbytes`` of ``src`` into a new file ``dst`` and fsync it, in the kernel if it can."""
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            done = _copy_range(fin, fout, nbytes)
            if done < nbytes:
                raise StoreCorruptError(
                    f"{src} is shorter than expected ({done:,} of {nbytes:,} bytes), so no snapshot was taken. "
                    f"Run `nearstep verify` on the store; restore it from a backup if it reports damage."
                )
            os.fsync(fout)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _copy_range(fin: int, fout: int, nbytes: int) -> int:
    done = 0
    in_kernel = hasattr(os, "copy_file_range")
    while done < nbytes:
        if in_kernel:
            try:
                n = os.copy_file_range(fin, fout, nbytes - done, done, done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                in_kernel = False  # another file system, or a kernel or sandbox without it
                continue
        else:
            chunk = memoryview(os.pread(fin, min(_COPY_CHUNK, nbytes - done), done))
            n = len(chunk)
            while chunk:
                chunk = chunk[os.pwrite(fout, chunk, done + n - len(chunk)) :]
        if n == 0:
            break  # end of the source file
        done += n
    return done


def _read_info(path: Path) -> Snapshot | None:
    """The snapshot in directory ``path``, or None when there is none (or its snapshot.json is unreadable)."""
    try:
        doc = json.loads((path / SNAPSHOT_INFO).read_text())
        return Snapshot(path, Path(doc["store"]), str(doc["store_id"]), int(doc["step"]), str(doc["digest"]),
                        float(doc["taken_at"]), int(doc["state_bytes"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _replace_time(snapshot: Snapshot, taken_at: float) -> Snapshot:
    return Snapshot(snapshot.path, snapshot.store, snapshot.store_id, snapshot.step, snapshot.digest, taken_at,
                    snapshot.state_bytes)


def _write_info(snapshot: Snapshot) -> Snapshot:
    """Replace a snapshot's snapshot.json atomically."""
    tmp = snapshot.path / (SNAPSHOT_INFO + ".tmp")
    write_synced(tmp, snapshot.to_json().encode())
    os.replace(tmp, snapshot.path / SNAPSHOT_INFO)
    fsync_path(snapshot.path)
    return snapshot


def _discard(path: Path) -> None:
    """Delete a snapshot directory; the rename first makes it vanish at once, even if a crash interrupts the rest."""
    doomed = path.parent / f"{_PARTIAL}deleting-{path.name}-{os.getpid()}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_snapshots(store_path: str | os.PathLike) -> list[Snapshot]:
    """The store's snapshots, oldest first (by when a ``state_dict()`` last took or reused each)."""
    root = Path(store_path) / SNAPSHOTS
    if not root.is_dir():
        return []
    found = [_read_info(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(_PARTIAL)]
    return sorted((s for s in found if s is not None), key=lambda s: (s.taken_at, s.path.name))


def prune_snapshots(store_path: str | os.PathLike, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` snapshots of a store (never ``protect``); returns the deleted directories."""
    snapshots = [s for s in list_snapshots(store_path) if s.path != protect]
    doomed = [s.path for s in snapshots[: max(len(snapshots) - (keep - (protect is not None)), 0)]]
    for path in doomed:
        _discard(path)
    return doomed


# ---------------------------------------------------------------------------
# Loading snapshots


def open_snapshot(reference: Reference, here: Store) -> Store:
    """A lock-free, read-only view of the snapshot ``reference`` names.

    The snapshot is looked for where the reference says, then (for a reference to
    ``here``'s own store) under ``here``'s ``snapshots/`` by name, so a store moved
    with its snapshots still loads its checkpoints.

    Raises:
        StoreError: the snapshot does not exist (pruned, deleted, or not copied along).
        StoreCorruptError: it exists but its manifest is not the state the reference names.
    """
    candidates = [reference.snapshot]
    if reference.store_id == here.manifest.store_id:
        candidates.append(here.path / SNAPSHOTS / reference.snapshot.name)
    for path in candidates:
        if (path / MANIFEST).is_file():
            manifest = read_manifest(path)
            if state_digest(manifest) != reference.digest:
                raise StoreCorruptError(
                    f"store snapshot {path} does not hold the state the checkpoint names (step {reference.step}, "
                    f"digest {reference.digest[:12]}, found step {manifest.step}, digest {state_digest(manifest)[:12]}). "
                    f"It was replaced or edited; load a checkpoint whose snapshot is intact."
                )
            return Store(path, manifest, lock_fd=-1)
    kept = [s.path.name for s in list_snapshots(reference.store)]
    raise StoreError(
        f"this checkpoint refers to the store snapshot {reference.snapshot} (step {reference.step} of store "
        f"{reference.store}), which does not exist. A nearstep state dict is a reference: the optimizer state "
        f"itself is in that snapshot, which must be kept along with the checkpoint. nearstep keeps only the "
        f"newest keep_snapshots snapshots of a store (default {DEFAULT_KEEP_SNAPSHOTS}; that store now has "
        f"{', '.join(kept) if kept else 'none'}), so it was pruned, deleted, or not copied with the checkpoint. "
        f"Resume from a checkpoint whose snapshot exists; to keep more, set opt.keep_snapshots to at least the "
        f"number of checkpoints your framework keeps (e.g. save_total_limit), or save opt.full_state_dict() "
        f"for a self-contained checkpoint."
    )


def check_snapshot_fits(snapshot: Store, store: Store, kind: str) -> None:
    """Raise StoreMismatchError unless ``snapshot`` holds state for ``store``'s parameters and optimizer ``kind``.

    Slicing and state format may differ (a checkpoint copied into a new store):
    :func:`restore_snapshot` re-slices and re-encodes.
    """
    theirs, mine = snapshot.manifest, store.manifest
    where = f"the checkpoint's store snapshot {snapshot.path}"
    if theirs.optimizer != kind or theirs.state_names != mine.state_names:
        raise StoreMismatchError(
            f"{where} holds {theirs.optimizer} state ({', '.join(theirs.state_names)}), not {kind} "
            f"({', '.join(mine.state_names)}). Load it into the optimizer class that saved it."
        )
    if len(theirs.params) != len(mine.params):
        raise StoreMismatchError(
            f"{where} has {len(theirs.params)} parameters, this optimizer {len(mine.params)}. Load it into an "
            f"optimizer over the parameters (and param groups) it was saved from."
        )
    frozen_here = sorted(_with_state(theirs) - _with_state(mine))
    if frozen_here:
        names = ", ".join(repr(mine.params[i].name) for i in frozen_here[:3])
        raise StoreMismatchError(
            f"{where} holds state for {len(frozen_here)} parameters ({names} ...) that have none in store "
            f"{store.path} (they were frozen when it was made). Make them trainable (requires_grad=True) before loading, so the store "
            f"gives them state, or load the checkpoint into an optimizer on a fresh store."
        )
    for i, (have, want) in enumerate(zip(theirs.params, mine.params)):
        same_name = have.name == want.name or is_positional_name(have.name) or is_positional_name(want.name)
        if (have.shape, have.dtype, have.group) != (want.shape, want.dtype, want.group) or not same_name:
            raise StoreMismatchError(
                f"{where} was saved from a different model: parameter {i} is {have.name!r} {list(have.shape)} "
                f"{have.dtype} (group {have.group}) there but {want.name!r} {list(want.shape)} {want.dtype} "
                f"(group {want.group}) here. Load it into an optimizer over the parameters it was saved from."
            )


def _with_state(manifest: Manifest) -> set[int]:
    """The parameters that have state on disk (a segment in some slice)."""
    return {seg.param for spec in manifest.slices for seg in spec.segments}


class _SnapshotReader:
    """A store's state by parameter range, read (and checksum-verified) one slice at a time.

    Keeps the last :data:`_CACHED_SLICES` decoded slices: both stores plan their
    slices in backward order, so a target slice needs at most a couple of source
    slices and each is read about once, even when the slicing differs.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        m = store.manifest
        # Per parameter: (start, length, slice, offset in the slice), sorted by start.
        self._pieces: list[list[tuple[int, int, int, int]]] = [[] for _ in m.params]
        for spec in m.slices:
            offset = 0
            for seg in spec.segments:
                self._pieces[seg.param].append((seg.start, seg.length, spec.index, offset))
                offset += seg.length
        self._starts = [[piece[0] for piece in pieces] for pieces in self._pieces]
        self._same = {spec.segments: spec.index for spec in m.slices}  # a target slice that is a source slice
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._pool = aio.IOPool(threads=2, block_bytes=m.checksum_block)

    def __enter__(self) -> _SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cache.clear()
        self._pool.close()

    def _slice(self, k: int) -> dict[str, torch.Tensor]:
        state = self._cache.pop(k, None)
        if state is None:
            state = self.store.read_slice(k, self._pool)
            while len(self._cache) >= _CACHED_SLICES:
                self._cache.popitem(last=False)
        self._cache[k] = state
        return state

    def gather(self, segments: Sequence[Segment], names: Sequence[str], params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Flat fp32 tensors holding ``segments``' elements, one per state name.

        A parameter the snapshot holds no state for (dormant there: frozen when it was
        taken) starts as a grown one does: its master is the parameter's weight (which
        the framework has loaded from the same checkpoint), its moments are zero.
        """
        same = self._same.get(tuple(segments))
        if same is not None:
            return dict(self._slice(same))  # the same slicing (the usual case): nothing to assemble
        total = sum(seg.length for seg in segments)
        out = {name: torch.zeros(total, dtype=torch.float32) for name in names}
        pos = 0
        for seg in segments:
            pieces, end = self._pieces[seg.param], seg.start + seg.length
            if not pieces:
                out[MASTER][pos : pos + seg.length] = params[seg.param].detach().reshape(-1)[seg.start : end]
            first = max(bisect.bisect_right(self._starts[seg.param], seg.start) - 1, 0)
            for start, length, k, offset in pieces[first:]:
                if start >= end:
                    break
                lo, hi = max(start, seg.start), min(start + length, end)
                if lo >= hi:
                    continue
                state = self._slice(k)
                for name in names:
                    out[name][pos + lo - seg.start : pos + hi - seg.start] = state[name][offset + lo - start : offset + hi - start]
            pos += seg.length
        return out


def _scatter(spec: SliceSpec, master: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    offset = 0
    for seg in spec.segments:
        params[seg.param].view(-1)[seg.start : seg.start + seg.length].copy_(master[offset : offset + seg.length])
        offset += seg.length


@torch.no_grad()
def copy_masters_into(store: Store, params: Sequence[torch.Tensor]) -> None:
    """The store's committed master weights into ``params``, one slice at a time.

    Unlike :meth:`Store.read_params` this never holds more than one slice: a slice
    that fails its checksum raises with the slices before it already copied (the
    store is damaged then, and the error says how to recover).
    """
    m = store.manifest
    with aio.IOPool(threads=2, block_bytes=m.checksum_block) as pool:
        for spec in m.slices:
            _scatter(spec, store.read_slice(spec.index, pool)[MASTER], params)


def _quietly(done: Completion | None) -> None:
    if done is None:
        return
    try:
        done.wait()
    except BaseException:
        pass


def restore_snapshot(snapshot: Store, store: Store, device: Device, params: Sequence[torch.Tensor], commit: Commit) -> Manifest:
    """Replace ``store``'s state with ``snapshot``'s, through ``device``, and its masters into ``params``.

    Slice by slice: each of the store's slices is assembled from the snapshot's
    (read and checksum-verified one at a time, re-sliced and re-encoded when the
    two stores differ in slicing or state format) and sent as a ``LoadState``; one
    is in flight while the next is read. Then ``commit`` (the snapshot's step,
    per-parameter steps and counters) makes them durable at once: killed before it,
    the store reopens at its old state. On an error nothing is committed and the
    device drops what it was sent; ``params`` may hold part of the snapshot's
    masters then, so the caller copies the store's back (:func:`copy_masters_into`).

    Host memory: about :data:`_CACHED_SLICES` decoded snapshot slices, one assembled
    slice and the one in flight, whatever the model's size. Returns the new manifest.
    """
    mine = store.manifest
    pending: Completion | None = None
    try:
        with _SnapshotReader(snapshot) as reader:
            for spec in mine.slices:
                arrays = reader.gather(spec.segments, mine.state_names, params)
                if pending is not None:
                    pending.wait()  # at most one slice in flight: bounded memory on both sides
                pending = device.submit(LoadState(spec.index, {n: t.numpy() for n, t in arrays.items()}))
                _scatter(spec, arrays[MASTER], params)
        if pending is not None:
            pending.wait()
        manifest = device.submit(commit).wait()
    except BaseException:
        _quietly(pending)
        _quietly(device.submit(Abort()))  # drop the loaded slices (and the failure) on the device
        with contextlib.suppress(NearstepError, OSError):
            store.refresh()  # the commit may have happened before a later part failed
        raise
    store.manifest = manifest
    if mine.format.lossy_master:
        copy_masters_into(store, params)  # a lossy master format rounded what was loaded
    return manifest

