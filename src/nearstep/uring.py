"""Store I/O through Linux io_uring: many requests in flight from one thread, no library.

:class:`IORing` is the second backend behind :class:`nearstep.aio.IOQueue`
(the first is the thread pool :class:`nearstep.aio.IOPool`). It talks to the
kernel with the three ``io_uring_*`` system calls through ctypes: a submission
ring and a completion ring shared with the kernel by mmap, one reaper thread
that waits for completions, computes read checksums and refills the ring.

[Note: why a ring] Measured on the development VM (2 cores, virtio disk, 1 GiB
of AdamW state in 6 slice files, DeepSpeed's libaio op on the same files in
the same run, alternating; ``nearstep bench io``): a pool of 4 threads read
0.91 and wrote 0.89 of DeepSpeed's bandwidth, and 8, 16 or 32 threads did not
close the gap. A thread blocked in ``preadv`` holds one request, and each
completion costs a thread wake-up and the GIL. The ring keeps ``queue_depth``
requests in flight for the price of one thread: unchecked, it moved as much as
libaio (0.96-1.04 of DeepSpeed over six runs); with CRC-32s computed in its
I/O path it read 0.96-0.97 and wrote 0.95-1.03 of DeepSpeed, and wrote
1.07-1.23 of the thread pool (quiet runs). Depths 4-32 were within noise of
each other. What the checksums cost in the I/O path is why fp32 state is now
checksummed in the kernel's pass instead (``engine.checked_pass``).

[Note: ring memory ordering] The rings' head and tail indices are shared with
the kernel and need acquire/release ordering, which Python cannot express. We
rely on two things. Submission: the SQEs and the new tail are stored by the
thread that then calls ``io_uring_enter`` under ``_lock``, and a CPU sees its
own stores in order, so the kernel (running on that CPU in that call) sees the
SQEs the tail announces. Completion: the kernel publishes a CQE before the
tail with a release store; reading the tail and then the CQE needs the loads
to stay in order, which x86-64 guarantees (TSO) and weaker architectures do
not. So the ring is offered on x86-64 Linux only; elsewhere ``"auto"`` picks
the thread pool.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import mmap
import os
import platform
import sys
import threading
import time
from collections import deque

from nearstep import aio
from nearstep.errors import StoreIOError

__all__ = ["DEFAULT_QUEUE_DEPTH", "IO_BACKENDS", "IORing", "ring_support", "open_io"]

#: Requests the ring keeps in flight by default: 32 blocks of 8 MiB = 256 MiB, as
#: DeepSpeed's aio handle with 4 threads at queue depth 8 (see [Note: why a ring]).
DEFAULT_QUEUE_DEPTH: int = 32

# The io_uring system calls have the same numbers on every Linux architecture.
_SYS_SETUP, _SYS_ENTER = 425, 426
_ENTER_GETEVENTS = 1 << 0
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_OP_NOP, _OP_READ, _OP_WRITE = 0, 22, 23
_FEAT_RW_CUR_POS = 1 << 3  # came with IORING_OP_READ/WRITE (Linux 5.6)
_WAKE = 0  # user_data of the no-op that wakes the reaper at close; blocks count from 1
_U32 = 0xFFFFFFFF


class _SQRingOffsets(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in
                ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1")] + [
        ("user_addr", ctypes.c_uint64)]


class _CQRingOffsets(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in
                ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1")] + [
        ("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in
                ("sq_entries", "cq_entries", "flags", "sq_thread_cpu", "sq_thread_idle", "features", "wq_fd")] + [
        ("resv", ctypes.c_uint32 * 3), ("sq_off", _SQRingOffsets), ("cq_off", _CQRingOffsets)]


class _SQE(ctypes.Structure):
    _fields_ = [("opcode", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("ioprio", ctypes.c_uint16),
                ("fd", ctypes.c_int32), ("off", ctypes.c_uint64), ("addr", ctypes.c_uint64),
                ("len", ctypes.c_uint32), ("rw_flags", ctypes.c_uint32), ("user_data", ctypes.c_uint64),
                ("buf_index", ctypes.c_uint16), ("personality", ctypes.c_uint16), ("splice_fd_in", ctypes.c_int32),
                ("addr3", ctypes.c_uint64), ("pad", ctypes.c_uint64)]


class _CQE(ctypes.Structure):
    _fields_ = [("user_data", ctypes.c_uint64), ("res", ctypes.c_int32), ("flags", ctypes.c_uint32)]


assert ctypes.sizeof(_Params) == 120 and ctypes.sizeof(_SQE) == 64 and ctypes.sizeof(_CQE) == 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _setup(entries: int, params: _Params) -> int:
    fd = _libc.syscall(ctypes.c_long(_SYS_SETUP), ctypes.c_long(entries), ctypes.byref(params))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _enter(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
    """``io_uring_enter``; ctypes releases the GIL for the call, so a wait blocks only this thread."""
    while True:
        n = _libc.syscall(ctypes.c_long(_SYS_ENTER), ctypes.c_long(fd), ctypes.c_long(to_submit),
                          ctypes.c_long(min_complete), ctypes.c_long(flags), None, ctypes.c_long(0))
        if n >= 0:
            return n
        err = ctypes.get_errno()
        if err != 4:  # EINTR: a signal arrived while waiting; nothing was lost
            raise OSError(err, os.strerror(err))


@functools.lru_cache(maxsize=None)
def ring_support() -> tuple[bool, str]:
    """Whether :class:`IORing` works in this process, and if not, why (for messages).

    Containers often forbid io_uring (Docker's default seccomp profile does, and
    ``sysctl kernel.io_uring_disabled`` can), so this tries to make a ring.
    """
    if not sys.platform.startswith("linux"):
        return False, f"io_uring is Linux-only (this is {sys.platform})"
    if platform.machine() not in ("x86_64", "AMD64"):
        return False, f"the ring is offered on x86-64 only (this is {platform.machine()}): see [Note: ring memory ordering]"
    params = _Params()
    try:
        fd = _setup(2, params)
    except OSError as err:
        return False, f"the kernel refused io_uring_setup ({err.strerror}): disabled by sysctl or a seccomp profile, or too old"
    os.close(fd)
    if not params.features & _FEAT_RW_CUR_POS:
        return False, "the kernel's io_uring predates IORING_OP_READ/WRITE (Linux 5.6)"
    return True, "io_uring"


class _Block:
    """One block of a request: its future, where it goes, how much of it is done, and what is left.

    ``parts`` counts what must finish before the future resolves: the transfer,
    and for a checksummed write also its CRC, which is computed while the write
    is in flight (the buffer is stable until the request resolves). Whatever
    finishes last resolves the future, so no part outlives it (see
    [Note: no block outlives its request] in ``nearstep.aio``).
    """

    __slots__ = ("future", "file", "view", "address", "offset", "writing", "checksum", "done", "crc", "started",
                 "parts", "error")

    def __init__(self, file: aio.AlignedFile, view: memoryview, offset: int, checksum: bool, writing: bool):
        self.future: concurrent.futures.Future[tuple[int, int | None]] = concurrent.futures.Future()
        self.file, self.view, self.offset = file, view, offset
        self.address = aio.address_of(view)
        self.writing, self.checksum = writing, checksum
        self.done = 0
        self.crc: int | None = None
        self.started = 0.0
        self.parts = 2 if writing and checksum else 1
        self.error: BaseException | None = None


class IORing(aio.IOQueue):
    """An :class:`~nearstep.aio.IOQueue` on one io_uring, keeping ``queue_depth`` blocks in flight.

    Requests are cut into ``block_bytes`` blocks, as the thread pool's are; the
    caller's thread puts blocks into the submission ring (up to the depth), and
    the reaper thread refills it as completions arrive. Checksums never stand
    between the disk and its next request: a write's CRC is computed after the
    write is submitted, a read's after the reaper has refilled the ring (see
    [Note: checksums off the issue path]). Short transfers are resumed; errors
    arrive through the request's future exactly as the pool reports them.

    Raises ``OSError`` where :func:`ring_support` says no; use
    :func:`open_io` to fall back to the thread pool.
    """

    def __init__(self, queue_depth: int = DEFAULT_QUEUE_DEPTH, block_bytes: int = aio.DEFAULT_BLOCK_BYTES,
                 nice: int = 0):
        if queue_depth < 1:
            raise ValueError(f"IORing needs a queue depth of at least 1, got {queue_depth}")
        super().__init__(block_bytes)
        ok, why = ring_support()
        if not ok:
            raise OSError(f"io_uring is not available here: {why}")
        self.queue_depth = queue_depth
        params = _Params()
        self._fd = _setup(queue_depth + 1, params)  # +1: the wake-up no-op at close
        try:
            self._map(params)
        except BaseException:
            os.close(self._fd)
            raise
        self._lock = threading.Lock()
        self._pending: deque[_Block] = deque()
        self._in_flight: dict[int, _Block] = {}
        self._next_id = _WAKE + 1
        self._closing = False
        self._woken = False
        self._failure: OSError | None = None
        self._reaper = threading.Thread(target=self._reap, args=(nice,), name="nearstep-ring", daemon=True)
        self._reaper.start()

    def _map(self, p: _Params) -> None:
        flags, prot = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), mmap.PROT_READ | mmap.PROT_WRITE
        self._maps = [
            mmap.mmap(self._fd, p.sq_off.array + p.sq_entries * 4, flags, prot, offset=_OFF_SQ_RING),
            mmap.mmap(self._fd, p.cq_off.cqes + p.cq_entries * ctypes.sizeof(_CQE), flags, prot, offset=_OFF_CQ_RING),
            mmap.mmap(self._fd, p.sq_entries * ctypes.sizeof(_SQE), flags, prot, offset=_OFF_SQES),
        ]
        sq, cq, sqes = self._maps
        self._sq_tail = ctypes.c_uint32.from_buffer(sq, p.sq_off.tail)
        self._sq_mask = ctypes.c_uint32.from_buffer(sq, p.sq_off.ring_mask).value
        array = (ctypes.c_uint32 * p.sq_entries).from_buffer(sq, p.sq_off.array)
        for i in range(p.sq_entries):  # SQE i sits in ring slot i, always
            array[i] = i
        del array
        self._sqes = (_SQE * p.sq_entries).from_buffer(sqes)
        self._cq_head = ctypes.c_uint32.from_buffer(cq, p.cq_off.head)
        self._cq_tail = ctypes.c_uint32.from_buffer(cq, p.cq_off.tail)
        self._cq_mask = ctypes.c_uint32.from_buffer(cq, p.cq_off.ring_mask).value
        self._cqes = (_CQE * p.cq_entries).from_buffer(cq, p.cq_off.cqes)

    @property
    def in_flight(self) -> int:
        """Blocks submitted to the kernel and not completed yet (at most ``queue_depth``)."""
        return len(self._in_flight)

    # -- the caller's side

    def start_blocks(self, file: aio.AlignedFile, view: memoryview, offset: int, checksum: bool,
                      writing: bool) -> list[concurrent.futures.Future[tuple[int, int | None]]]:
        file._fd()  # a closed file fails here, in the caller, not in the reaper
        blocks = [_Block(file, view[s:s + self.block_bytes], offset + s, checksum, writing)
                  for s in range(0, view.nbytes, self.block_bytes)]
        with self._lock:
            if self._failure is not None:
                raise StoreIOError(self._failure.errno, f"the I/O ring failed earlier: {self._failure}", str(file.path))
            self._pending.extend(blocks)
            started = self._fill()
        self._checksum_writes(started)
        return [b.future for b in blocks]

    def _fill(self) -> list[_Block]:
        """Move pending blocks into the submission ring up to the depth and submit them. Under ``_lock``.

        Returns the checksummed writes started here: the caller computes their CRCs once the lock is released.
        """
        count, started = 0, []
        while self._pending and len(self._in_flight) < self.queue_depth:
            block = self._pending.popleft()
            if not block.started:
                if not block.future.set_running_or_notify_cancel():
                    continue  # a sibling block failed and _gather cancelled this one
                block.started = time.perf_counter()
                if block.parts == 2:
                    started.append(block)
            op = _OP_WRITE if block.writing else _OP_READ
            self.push_entry(op, block.file.fd, block.offset + block.done, block.address + block.done,
                       block.view.nbytes - block.done, self._next_id)
            self._in_flight[self._next_id] = block
            self._next_id += 1
            count += 1
        if count:
            self.submit_entries(count)
        return started

    def _checksum_writes(self, blocks: list[_Block]) -> None:
        for block in blocks:
            block.crc = aio.crc32(block.view)  # the disk reads the same stable bytes meanwhile
            self._finish_part(block)

    def _finish_part(self, block: _Block) -> None:
        with self._lock:
            block.parts -= 1
            last = block.parts == 0
        if not last:
            return
        if block.error is not None:
            block.future.set_exception(block.error)
        else:
            self.record(block.writing, block.view.nbytes, time.perf_counter() - block.started)
            block.future.set_result((block.view.nbytes, block.crc))

    def push_entry(self, op: int, fd: int, offset: int, address: int, length: int, user_data: int) -> None:
        tail = self._sq_tail.value
        sqe = self._sqes[tail & self._sq_mask]
        ctypes.memset(ctypes.addressof(sqe), 0, ctypes.sizeof(_SQE))
        sqe.opcode, sqe.fd, sqe.off, sqe.addr, sqe.len, sqe.user_data = op, fd, offset, address, length, user_data
        # Published by the io_uring_enter below, from this thread: see [Note: ring memory ordering].
        self._sq_tail.value = (tail + 1) & _U32

    def submit_entries(self, count: int) -> None:
        while count:
            count -= _enter(self._fd, count, 0, 0)

    # -- the reaper's side

    def _reap(self, nice: int) -> None:
        """The reaper thread: wait for completions, refill the ring, then checksum what landed.

        [Note: checksums off the issue path] The disk idles from the moment its
        queue runs dry until the next request arrives. Completions come in
        batches (tens of blocks at once on the development VM), and a CRC of a
        block just read costs ~0.7 ms (its bytes come from memory, not cache):
        checksumming a batch before refilling left the disk idle ~20 ms per
        batch and cost 10-20% of the bandwidth. So the ring is refilled first.
        """
        aio.lower_priority(nice)
        try:
            while True:
                _enter(self._fd, 0, 1, _ENTER_GETEVENTS)
                head, tail = self._cq_head.value, self._cq_tail.value
                done: list[tuple[int, int]] = []
                while head != tail:
                    cqe = self._cqes[head & self._cq_mask]
                    done.append((cqe.user_data, cqe.res))
                    head = (head + 1) & _U32
                self._cq_head.value = head  # hands the CQ slots back to the kernel
                with self._lock:
                    finished = [(self._in_flight.pop(u), res) for u, res in done if u != _WAKE]
                    stop = any(u == _WAKE for u, _res in done)
                landed, resumed = [], []
                for block, res in finished:
                    (resumed if self._settle(block, res) else landed).append(block)
                with self._lock:
                    self._pending.extendleft(reversed(resumed))
                    started = self._fill()
                    if self._closing and not self._pending and not self._in_flight and not self._woken:
                        self._wake()
                self._checksum_writes(started)
                for block in landed:
                    if block.checksum and not block.writing and block.error is None:
                        block.crc = aio.crc32(block.view)
                    self._finish_part(block)
                if stop:
                    return
        except OSError as err:  # the ring itself failed: fail everything it holds
            with self._lock:
                self._failure = err
                blocks = [*self._in_flight.values(), *self._pending]
                self._in_flight.clear(), self._pending.clear()
            for block in blocks:
                if not block.started:  # never submitted, so no CRC part will come either
                    if not block.future.set_running_or_notify_cancel():
                        continue
                    block.parts = 1
                block.error = aio.wrap_os_error(err, "io_uring_enter", block.file.path)
                self._finish_part(block)  # its transfer; a write's CRC part finishes on its own

    def _settle(self, block: _Block, res: int) -> bool:
        """Account one completion; True when the block has more to move (a short transfer).

        A failed block gets its ``error``; a finished or failed one is resolved by the caller.
        """
        want, at = block.view.nbytes, block.offset + block.done
        op = "write" if block.writing else "read"
        if res < 0:
            block.error = aio.wrap_os_error(OSError(-res, os.strerror(-res)), op, block.file.path, at, want - block.done)
            return False
        block.done += res
        if block.done == want:
            return False
        if block.writing and res == 0:
            err = OSError(5, "write moved 0 bytes")  # EIO: would loop forever; the kernel gave no reason
            block.error = aio.wrap_os_error(err, op, block.file.path, at, want - block.done)
            return False
        if not block.writing and (res == 0 or block.file.size() <= block.offset + block.done):
            block.error = aio.short_read_error(block.file, want, block.offset, block.done)
            return False
        return True

    def _wake(self) -> None:
        """Post a no-op so the reaper's wait returns and it sees that we are closing. Under ``_lock``."""
        self._woken = True
        self.push_entry(_OP_NOP, -1, 0, 0, 0, _WAKE)
        self.submit_entries(1)

    def describe(self) -> str:
        return f"io_uring, queue depth {self.queue_depth}"

    def close(self) -> None:
        """Wait for queued work, stop the reaper, unmap the rings and close the ring's fd."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._closing = True
            if self._failure is None and not self._pending and not self._in_flight:
                self._wake()
        self._reaper.join()
        # The ctypes views export the maps' buffers: drop them first or the unmap is refused.
        del self._sq_tail, self._sqes, self._cq_head, self._cq_tail, self._cqes
        for m in self._maps:
            m.close()
        os.close(self._fd)


# ---------------------------------------------------------------------------
# Choosing a backend

#: What :func:`open_io` accepts: ``"ring"`` (io_uring, :class:`IORing`),
#: ``"threads"`` (:class:`nearstep.aio.IOPool`) or ``"auto"`` (the ring where it works, else threads).
IO_BACKENDS: tuple[str, ...] = ("auto", "ring", "threads")



def open_io(backend: str = "auto", *, threads: int = 4, queue_depth: int = 32,
            block_bytes: int = aio.DEFAULT_BLOCK_BYTES, nice: int = 0) -> aio.IOQueue:
    """The I/O backend ``backend`` names (one of :data:`IO_BACKENDS`).

    ``"auto"`` is the io_uring ring where this kernel, architecture and sandbox
    allow one (see :func:`ring_support`), else the thread pool;
    ``"ring"`` insists on the ring and raises ``OSError`` saying why where there
    is none. ``threads`` sizes the pool, ``queue_depth`` the ring.
    """
    if backend not in IO_BACKENDS:
        raise ValueError(f"io_backend must be one of {', '.join(map(repr, IO_BACKENDS))}, got {backend!r}")
    if backend != "threads":
        ok, why = ring_support()
        if ok:
            return IORing(queue_depth=queue_depth, block_bytes=block_bytes, nice=nice)
        if backend == "ring":
            raise OSError(f"io_backend='ring' is not available here: {why}; use io_backend='auto' or 'threads'")
    return aio.IOPool(threads=threads, block_bytes=block_bytes, nice=nice)
