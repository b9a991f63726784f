"""Page-aligned host buffers and O_DIRECT file I/O with many requests in flight.

O_DIRECT bypasses the page cache, so the optimizer state streamed through a
step does not evict everything else; in exchange the kernel insists that the
buffer address, the file offset and the length are all multiples of the page
size. :class:`AlignedBuffer` provides such memory, :class:`AlignedFile` checks
every request before it reaches the kernel (an EINVAL from deep inside a step
says nothing about which argument was wrong), and an :class:`IOQueue` splits
large requests into blocks so that several are in flight on the SSD at once.
:func:`nearstep.uring.open_io` makes one: the io_uring ring of :mod:`nearstep.uring` where the
kernel allows it, else :class:`IOPool`, a small thread pool.

[Note: what the I/O path costs] Measured side by side with DeepSpeed's libaio
op on the same file (``nearstep bench io``): with O_DIRECT the kernel moves
the data, so a pool of threads blocked in ``preadv``/``pwritev`` keeps as many
requests in flight as libaio does, at almost no CPU. Two things made the
difference. (1) The checksums: ``zlib.crc32`` runs at about 2.7 GB/s on one
core, which on a 2-core machine is half a core per GB/s of store traffic;
where the optional ``isal`` package is installed, its CRC-32 (the same
polynomial and values, with carry-less multiply) runs at about 27 GB/s.
For fp32 state the engine computes them in the kernel's pass instead, where the
bytes are in cache (``engine.checked_pass``), and reads and writes without.
(2) Physically contiguous buffers: the kernel cuts a direct request into at
most ``max_segments`` contiguous pieces (254 on a virtio disk), so from
scattered 4 KiB pages a request reaches the disk in pieces of about 1 MiB,
while 2 MiB transparent huge pages let it go out whole (up to the disk's
``max_sectors_kb``). Huge-page buffers read 15-40% faster on the development VM.
(3) Requests in flight: see [Note: why a ring] in :mod:`nearstep.uring`.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import mmap
import os
import pathlib
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch

from nearstep.errors import DiskFullError, MisalignedIOError, StoreCorruptError, StoreIOError, StorePermissionError

__all__ = [
    "PAGE", "DEFAULT_BLOCK_BYTES", "CRC32_IMPLEMENTATION", "align_up", "address_of", "crc32",
    "combine_crcs", "wrap_os_error", "short_read_error", "lower_priority", "AlignedBuffer", "AlignedFile", "IOResult",
    "IOStats", "IOQueue", "IOPool",
]

PAGE: int = 4096
HUGE_PAGE: int = 2 << 20
DEFAULT_BLOCK_BYTES: int = 8 << 20

try:  # see [Note: what the I/O path costs]
    from isal.isal_zlib import crc32 as _fast_crc32
except ImportError:
    _fast_crc32 = None

#: "isal" or "zlib": what :func:`crc32` runs. Both give the same values.
CRC32_IMPLEMENTATION: str = "zlib" if _fast_crc32 is None else "isal"


def crc32(data: memoryview | bytes, value: int = 0) -> int:
    """``zlib.crc32(data, value)``, computed by ISA-L where the ``isal`` package is installed.

    Both release the GIL on large buffers, so the I/O workers checksum in parallel.
    """
    if _fast_crc32 is not None:
        return _fast_crc32(data, value)
    return zlib.crc32(data, value)


class _ContextManager:
    """``with obj:`` closes ``obj`` on the way out."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def align_up(n: int, to: int = PAGE) -> int:
    """Round ``n`` up to the next multiple of ``to``."""
    return -(-n // to) * to


def combine_crcs(crcs: Iterable[int]) -> int:
    """One CRC standing for a whole file's per-block CRCs.

    It is ``zlib.crc32`` over each block CRC written as 4 little-endian bytes.
    It is *not* the CRC of the file's contents, so it depends on the block size
    the file was read or written with: compare only values made with the same
    ``block_bytes``.
    """
    crcs = [c & 0xFFFFFFFF for c in crcs]
    return zlib.crc32(struct.pack(f"<{len(crcs)}I", *crcs))


def _as_byte_view(buf: memoryview | AlignedBuffer) -> memoryview:
    view = buf.memoryview() if isinstance(buf, AlignedBuffer) else memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("nearstep I/O needs a contiguous buffer")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def address_of(view: memoryview) -> int:
    """The address of a buffer's first byte (numpy reads it for read-only buffers too, which ctypes cannot)."""
    return np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]


def _check_aligned(path: pathlib.Path, view: memoryview, offset: int) -> None:
    for what, value in (("buffer address", address_of(view)), ("offset", offset), ("length", view.nbytes)):
        if value % PAGE:
            raise MisalignedIOError(
                f"O_DIRECT I/O on {path}: {what} {value} ({value:#x}) is not a multiple of {PAGE}; "
                f"use nearstep.aio.AlignedBuffer and offsets/lengths that are multiples of {PAGE}"
            )


def wrap_os_error(err: OSError, op: str, path: str | os.PathLike, offset: int | None = None,
                  length: int | None = None) -> StoreIOError:
    """Translate an OSError from a syscall on a store file into the nearstep error to raise.

    ``op`` says what was being done ("write", "commit the manifest", ...). The
    result keeps ``err.errno`` and names the file, the range and what to do.
    """
    where = "" if offset is None else f" at offset {offset}" + ("" if length is None else f", length {length}")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        cls, todo = DiskFullError, (
            "free space on that file system or move the store to a bigger disk; the last committed step is untouched")
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cls, todo = StorePermissionError, "check the ownership and mode of the store directory"
    elif err.errno == errno.EIO:
        cls, todo = StoreIOError, "the disk may be failing; check dmesg"
    else:
        cls, todo = StoreIOError, "check that the store directory exists and is on a healthy local disk"
    reason = err.strerror or str(err)
    return cls(err.errno, f"{path}: {op}{where} failed: {reason}; {todo}", str(path))


class AlignedBuffer(_ContextManager):
    """Anonymous-mmap-backed, page-aligned host memory.

    O_DIRECT needs 4096-aligned addresses and ``torch.empty`` only promises 64
    bytes. The mapping is rounded up to a whole number of pages; ``nbytes`` is
    the rounded size. Views from :meth:`memoryview`, :meth:`numpy` and
    :meth:`tensor` share the memory without copying. Buffers of 2 MiB and more
    ask for transparent huge pages (``huge_pages=False`` to not): direct I/O
    goes out in larger pieces (see [Note: what the I/O path costs]).

    Example::

        with AlignedBuffer(1 << 20) as buf:
            buf.tensor(torch.float32).fill_(0.5)
    """

    def __init__(self, nbytes: int, *, huge_pages: bool = True):
        if nbytes <= 0:
            raise ValueError(f"AlignedBuffer needs a positive size, got {nbytes}")
        self.nbytes = align_up(nbytes)
        # Private, so the memory counts (and is budgeted) as the process's own, not as shared memory.
        self._mmap: mmap.mmap | None = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge_pages and self.nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass  # a hint: kernels without transparent huge pages refuse it, and small pages work
        # The ctypes object exports the mmap's buffer; drop it at once or close() could never unmap.
        anchor = ctypes.c_char.from_buffer(self._mmap)
        self.address = ctypes.addressof(anchor)
        del anchor

    def _open_mmap(self) -> mmap.mmap:
        if self._mmap is None:
            raise ValueError("AlignedBuffer is closed")
        return self._mmap

    def _span(self, offset: int, nbytes: int | None) -> int:
        nbytes = self.nbytes - offset if nbytes is None else nbytes
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"range [{offset}, {offset + nbytes}) is outside the {self.nbytes}-byte AlignedBuffer")
        return nbytes

    def memoryview(self, offset: int = 0, nbytes: int | None = None) -> memoryview:
        nbytes = self._span(offset, nbytes)
        return memoryview(self._open_mmap())[offset:offset + nbytes]

    def numpy(self, dtype=np.uint8, offset: int = 0, count: int = -1) -> np.ndarray:
        return np.frombuffer(self._open_mmap(), dtype=dtype, count=count, offset=offset)

    def tensor(self, dtype: torch.dtype, offset: int = 0, numel: int | None = None) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        if numel is None:
            numel = (self.nbytes - offset) // itemsize
        self._span(offset, numel * itemsize)
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self._open_mmap(), dtype=dtype, count=numel, offset=offset)

    def close(self) -> None:
        if self._mmap is None:
            return
        try:
            self._mmap.close()
        except BufferError:
            # numpy/tensor views still point into the mapping: unmapping now would
            # leave them dangling. Let the last view's garbage collection unmap it.
            pass
        self._mmap = None


# st_dev of each file system we already warned about falling back to buffered I/O.
_warned_devices: set[int] = set()
_warned_lock = threading.Lock()


class AlignedFile(_ContextManager):
    """One file opened for O_DIRECT I/O, or buffered I/O where the file system refuses O_DIRECT.

    Reads and writes are positional (``preadv``/``pwritev``), so one file may be
    used from several threads at once. In direct mode every request must be
    page-aligned (buffer address, offset and length); in buffered mode any
    request is accepted and :meth:`sync` is what makes writes durable.
    """

    def __init__(self, path: pathlib.Path, fd: int, direct: bool):
        self.path = path
        self.fd = fd
        self.direct = direct

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = False, writable: bool = True,
             direct: bool = True) -> AlignedFile:
        path = pathlib.Path(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        use_direct = direct and hasattr(os, "O_DIRECT")
        try:
            try:
                fd = os.open(path, flags | (os.O_DIRECT if use_direct else 0), 0o644)
            except OSError as err:
                if not (use_direct and err.errno == errno.EINVAL):
                    raise
                fd = os.open(path, flags, 0o644)
                use_direct = False
                _warn_buffered_fallback(path, fd)
        except OSError as err:
            raise wrap_os_error(err, "open", path) from err
        return cls(path, fd, use_direct)

    def _fd(self) -> int:
        if self.fd < 0:
            raise ValueError(f"{self.path} is closed")
        return self.fd

    def size(self) -> int:
        try:
            return os.fstat(self._fd()).st_size
        except OSError as err:
            raise wrap_os_error(err, "stat", self.path) from err

    def allocate(self, nbytes: int) -> None:
        """Reserve ``nbytes`` on disk now, so a full disk shows up here and not mid-step."""
        if nbytes <= 0:
            return
        try:
            os.posix_fallocate(self._fd(), 0, nbytes)
        except OSError as err:
            raise wrap_os_error(err, "fallocate", self.path, 0, nbytes) from err

    def read_into(self, buf: memoryview | AlignedBuffer, offset: int) -> int:
        view = _as_byte_view(buf)
        if view.readonly:
            raise ValueError(f"cannot read {self.path} into a read-only buffer")
        if self.direct:
            _check_aligned(self.path, view, offset)
        fd, done, want = self._fd(), 0, view.nbytes
        while done < want:
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as err:
                raise wrap_os_error(err, "read", self.path, offset + done, want - done) from err
            done += n
            # A short read is EOF unless the file still extends past it (then just keep going).
            if done < want and (n == 0 or self.size() <= offset + done):
                raise short_read_error(self, want, offset, done)
        return done

    def write_from(self, buf: memoryview | AlignedBuffer, offset: int) -> int:
        view = _as_byte_view(buf)
        if self.direct:
            _check_aligned(self.path, view, offset)
        fd, done, want = self._fd(), 0, view.nbytes
        while done < want:
            try:
                n = os.pwritev(fd, [view[done:]], offset + done)
                if n == 0:  # would loop forever; the kernel gave no reason
                    raise OSError(errno.EIO, "pwritev wrote 0 bytes")
            except OSError as err:
                raise wrap_os_error(err, "write", self.path, offset + done, want - done) from err
            done += n
        return done

    def sync(self) -> None:
        try:
            os.fdatasync(self._fd())
        except OSError as err:
            raise wrap_os_error(err, "fdatasync", self.path) from err

    def close(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            os.close(fd)
        except OSError as err:
            raise wrap_os_error(err, "close", self.path) from err

    def __repr__(self) -> str:
        return f"AlignedFile({str(self.path)!r}, direct={self.direct}, fd={self.fd})"


def short_read_error(file: AlignedFile, want: int, offset: int, done: int) -> StoreCorruptError:
    """The error for a read that met the end of ``file`` after ``done`` of ``want`` bytes."""
    return StoreCorruptError(
        f"{file.path} is shorter than expected: reading {want} bytes at offset {offset} "
        f"got only {done} (file size {file.size()}); truncated? run `nearstep verify`"
    )


def _warn_buffered_fallback(path: pathlib.Path, fd: int) -> None:
    try:
        device = os.fstat(fd).st_dev
    except OSError:  # never let a warning leak the fd that open() just made
        device = -1
    with _warned_lock:
        if device in _warned_devices:
            return
        _warned_devices.add(device)
    warnings.warn(
        f"the file system holding {path.parent} refuses O_DIRECT; nearstep uses buffered I/O there, "
        "and writes are made durable with fdatasync instead",
        RuntimeWarning,
        stacklevel=3,
    )


class IOResult(NamedTuple):
    nbytes: int
    crcs: tuple[int, ...] | None  # zlib.crc32 of each block, in block order, when checksum=True


@dataclass
class IOStats:
    """Running totals of an IOQueue; the seconds are summed over blocks, each from start to completion."""

    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    requests: int = 0


def lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (Linux: per thread); best effort."""
    if nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except (OSError, AttributeError):
            pass  # best effort: priorities are a scheduling hint, not a requirement


class IOQueue(_ContextManager):
    """Keeps several block-sized reads and writes of store files in flight.

    Each request is cut into ``block_bytes`` blocks that run concurrently; the
    returned future resolves to an :class:`IOResult` once every block is done
    (with one CRC per block when ``checksum=True``). The caller must keep the
    buffer alive and untouched until then. Argument errors (misalignment, a
    read-only buffer, a closed queue) are raised by :meth:`read`/:meth:`write`
    themselves; I/O errors come through the future, as nearstep errors naming
    file and range. The backends, made by :func:`nearstep.uring.open_io`, differ only in how
    the blocks are kept in flight.
    """

    def __init__(self, block_bytes: int) -> None:
        if block_bytes <= 0 or block_bytes % PAGE:
            raise ValueError(f"block_bytes must be a positive multiple of {PAGE}, got {block_bytes}")
        self.block_bytes = block_bytes
        self.stats = IOStats()
        self._stats_lock = threading.Lock()
        self._closed = False

    def counters(self) -> dict[str, int | float]:
        with self._stats_lock:
            return asdict(self.stats)

    def record(self, writing: bool, nbytes: int, seconds: float) -> None:
        """Count one finished block in :attr:`stats`."""
        with self._stats_lock:
            if writing:
                self.stats.bytes_written += nbytes
                self.stats.write_seconds += seconds
            else:
                self.stats.bytes_read += nbytes
                self.stats.read_seconds += seconds

    def read(self, file: AlignedFile, buf: memoryview | AlignedBuffer, offset: int, *,
             checksum: bool = False) -> concurrent.futures.Future[IOResult]:
        view = _as_byte_view(buf)
        if view.readonly:
            raise ValueError(f"cannot read {file.path} into a read-only buffer")
        return self._request(file, view, offset, checksum, writing=False)

    def write(self, file: AlignedFile, buf: memoryview | AlignedBuffer, offset: int, *,
              checksum: bool = False) -> concurrent.futures.Future[IOResult]:
        return self._request(file, _as_byte_view(buf), offset, checksum, writing=True)

    def _request(self, file: AlignedFile, view: memoryview, offset: int, checksum: bool,
                 writing: bool) -> concurrent.futures.Future[IOResult]:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if file.direct:
            _check_aligned(file.path, view, offset)
        with self._stats_lock:
            self.stats.requests += 1
        request: concurrent.futures.Future[IOResult] = concurrent.futures.Future()
        # RUNNING from the start: the caller cannot cancel a request whose blocks are already queued.
        request.set_running_or_notify_cancel()
        if not view.nbytes:
            request.set_result(IOResult(0, () if checksum else None))
            return request
        _gather(request, self.start_blocks(file, view, offset, checksum, writing), checksum)
        return request

    def start_blocks(self, file: AlignedFile, view: memoryview, offset: int, checksum: bool,
                      writing: bool) -> list[concurrent.futures.Future[tuple[int, int | None]]]:
        """Queue the request's blocks; one future per block resolving to (bytes moved, CRC or None).

        A block future still PENDING may be cancelled (after a sibling failed) and must then not run.
        """
        raise NotImplementedError

    def describe(self) -> str:
        """What keeps the blocks in flight, for people: "thread pool of 4", "io_uring, queue depth 32"."""
        raise NotImplementedError

    def close(self) -> None:
        """Wait for queued work, then release the backend's threads and kernel objects."""
        raise NotImplementedError


class IOPool(IOQueue):
    """An :class:`IOQueue` on a small thread pool: each thread runs one block at a time.

    Works everywhere O_DIRECT does; it is what ``io_backend="auto"`` falls back to
    where io_uring is unavailable (see :func:`nearstep.uring.open_io`).
    """

    def __init__(self, threads: int = 4, block_bytes: int = DEFAULT_BLOCK_BYTES, nice: int = 0):
        """``nice`` > 0 lowers the workers' CPU priority (Linux: per thread), so that on a
        shared core the checksums and copies of I/O yield to whatever else runs there."""
        if threads <= 0:
            raise ValueError(f"IOPool needs at least one thread, got {threads}")
        super().__init__(block_bytes)
        self.threads = threads
        self._executor = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="nearstep-io", initializer=lower_priority, initargs=(nice,)
        )

    def start_blocks(self, file: AlignedFile, view: memoryview, offset: int, checksum: bool,
                      writing: bool) -> list[concurrent.futures.Future[tuple[int, int | None]]]:
        return [self._executor.submit(self._run_block, file, view[s:s + self.block_bytes], offset + s,
                                      checksum, writing) for s in range(0, view.nbytes, self.block_bytes)]

    def _run_block(self, file: AlignedFile, view: memoryview, offset: int, checksum: bool,
                   writing: bool) -> tuple[int, int | None]:
        crc = crc32(view) if checksum and writing else None
        start = time.perf_counter()
        nbytes = file.write_from(view, offset) if writing else file.read_into(view, offset)
        seconds = time.perf_counter() - start
        if checksum and not writing:
            crc = crc32(view)
        self.record(writing, nbytes, seconds)
        return nbytes, crc

    def describe(self) -> str:
        return f"thread pool of {self.threads}"

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True)


def _gather(request: concurrent.futures.Future[IOResult],
            blocks: list[concurrent.futures.Future[tuple[int, int | None]]], checksum: bool) -> None:
    """Resolve ``request`` once every block has finished or been cancelled.

    [Note: no block outlives its request] After a failure the caller may reuse
    the buffer at once, so we cancel the blocks not yet started and wait for
    the running ones before reporting the (lowest-numbered) block's error.
    """
    lock = threading.Lock()
    remaining = [len(blocks)]
    failed = [False]

    def on_block_done(block: concurrent.futures.Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
            first_failure = not failed[0] and not block.cancelled() and block.exception() is not None
            failed[0] = failed[0] or first_failure
        if first_failure:
            for other in blocks:  # outside the lock: cancel() runs this callback again
                other.cancel()
        if last:
            errors = [b.exception() for b in blocks if not b.cancelled() and b.exception() is not None]
            if errors:
                request.set_exception(errors[0])
            else:
                results = [b.result() for b in blocks]
                crcs = tuple(crc for _nbytes, crc in results) if checksum else None
                request.set_result(IOResult(sum(nbytes for nbytes, _crc in results), crcs))

    for block in blocks:
        block.add_done_callback(on_block_done)
