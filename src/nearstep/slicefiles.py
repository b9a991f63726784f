"""The slice files the device has open, kept within the process's descriptor limit.

A store has two files per slice (its two generations). A 70B-parameter model cut
automatically (64 MiB of fp32 masters a slice) has about 4,200 slices, 8,400
files, while many systems give a process 1,024 descriptors (``ulimit -n``) and
some do not let it raise that. So the device does not keep every file open: it
keeps the most recently used ones, up to a budget, and closes the others.

[Note: closing a file with a write in it]
A step's commit makes every slice it wrote durable (fdatasync) before the manifest
that names the new generations replaces the old one. A file evicted between its
write and the commit is fdatasync()ed before it is closed; fdatasync acts on the
file, not on the descriptor, so the write is as durable as if the commit had synced
it, and :meth:`SliceFiles.sync` has nothing left to do for it. A file with I/O in
flight (``uses`` > 0) is never closed: a read or a write in the ring or the thread
pool still holds its descriptor number.
"""

from __future__ import annotations

import resource
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from . import aio

__all__ = ["SliceFiles", "file_budget", "FD_MARGIN"]

# Descriptors the device needs besides its slice files: the socket, shared memory, the ring,
# the interpreter's own files and torch's.
FD_MARGIN = 256
# Below this many files open at once every read or write of a step would reopen its file.
_MIN_FILES = 16


def file_budget() -> int:
    """How many slice files this process may keep open at once: its soft RLIMIT_NOFILE
    less :data:`FD_MARGIN`, and at least a few (the device opens files on demand)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(_MIN_FILES, soft - FD_MARGIN)


class _Entry:
    __slots__ = ("file", "uses", "dirty")

    def __init__(self, file: aio.AlignedFile) -> None:
        self.file = file
        self.uses = 0  # reads and writes in flight on it
        self.dirty = False  # written since its last fdatasync


class SliceFiles:
    """Open slice files by (slice, generation), least recently used closed first.

    Thread-safe: the loader thread opens files for reads, the engine's thread for
    writes and the commit's syncs, and the I/O threads release them when their
    requests finish.

    Args:
        path_of: ``path_of(k, gen)``: the file of slice ``k``'s generation ``gen``.
        budget: files kept open at most (:func:`file_budget` by default). When every
            open file has I/O in flight, one more is opened past it rather than waiting.
    """

    def __init__(self, path_of: Callable[[int, int], Path], budget: int | None = None) -> None:
        self._path_of = path_of
        self.budget = file_budget() if budget is None else max(1, budget)
        self._open: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.opened = 0  # files opened so far (reopens after an eviction included)
        self.evicted = 0

    def acquire(self, k: int, gen: int) -> aio.AlignedFile:
        """The open file of slice ``k``'s generation ``gen``, held for one read or write until
        :meth:`release`."""
        with self._lock:
            entry = self._open.get((k, gen))
            if entry is None:
                self._make_room()
                entry = _Entry(aio.AlignedFile.open(self._path_of(k, gen)))
                self._open[(k, gen)] = entry
                self.opened += 1
            else:
                self._open.move_to_end((k, gen))
            entry.uses += 1
            return entry.file

    def release(self, k: int, gen: int, *, wrote: bool) -> None:
        """The read or write :meth:`acquire` was for has finished (``wrote``: it changed the file)."""
        with self._lock:
            entry = self._open[(k, gen)]
            entry.uses -= 1
            entry.dirty = entry.dirty or wrote

    def sync(self, k: int, gen: int) -> None:
        """fdatasync what was written to the file (the commit's durability point). A file closed
        since its write was synced when it was closed (see [Note: closing a file with a write in it]).

        An open file is synced whether or not it is marked dirty: a write's future can report
        its result before the callback that marks the file ran.
        """
        with self._lock:
            entry = self._open.get((k, gen))
            if entry is None:
                return
            entry.uses += 1  # not closed while it syncs outside the lock
        try:
            entry.file.sync()
            with self._lock:
                entry.dirty = False
        finally:
            with self._lock:
                entry.uses -= 1

    def _make_room(self) -> None:
        """Close least recently used idle files until one more fits the budget (lock held)."""
        while len(self._open) >= self.budget:
            idle = next((key for key, e in self._open.items() if e.uses == 0), None)
            if idle is None:
                return  # every open file has I/O in flight: go past the budget for now
            entry = self._open.pop(idle)
            try:
                if entry.dirty:
                    entry.file.sync()  # see [Note: closing a file with a write in it]
            except BaseException:
                self._open[idle] = entry  # still dirty and open: the commit's sync reports the error
                self._open.move_to_end(idle, last=False)
                raise
            entry.file.close()
            self.evicted += 1

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        """Close every file (nothing may be in flight)."""
        with self._lock:
            for entry in self._open.values():
                entry.file.close()
            self._open.clear()
