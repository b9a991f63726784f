"""The device backends: open a device on a store, the emulated one and the inline one.

What a device is (its requests, completions, capabilities and interface) is
:mod:`nearstep.protocol`; this module implements that interface. A host opens
one with :func:`open_device` (or :func:`build_device` from a
:class:`DeviceConfig`). Two backends run the same engine (``engine.py``):

- ``emulated`` (the default): a separate process (a fresh interpreter) that
  owns the store, pinned to its own core(s), talking over a socket pair
  (requests and completions) and shared memory (gradients in, weights out). It stands in for
  the DSP of a computational SSD.
- ``inline``: the engine runs in the caller's process, synchronously, for
  debugging (breakpoints and tracebacks in one place); nothing overlaps.
"""

from __future__ import annotations

import itertools
import multiprocessing.connection
import multiprocessing.reduction
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from . import aio, rules, uring
from .engine import Engine, EngineConfig
from .protocol import Commit, Completion, Device, DeviceInfo, DeviceMemory, MapMemory, Request, describe
from .staging import SharedMemory
from .errors import DeviceDiedError, DeviceError, DeviceStalledError, NearstepError
from .interrupts import interrupts_deferred
from .slicefiles import FD_MARGIN
from .store import Store
from .uring import DEFAULT_QUEUE_DEPTH

__all__ = [
    "DeviceConfig",
    "InlineDevice",
    "EmulatedDevice",
    "open_device",
    "build_device",
    "ensure_file_limit",
    "slice_file_capacity",
    "parse_bytes",
]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """``"1GiB"`` -> 1073741824; ints pass through. Raises ValueError with the accepted forms."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"a memory size must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size; write it like 512MiB, 2GiB or 1073741824")
    n = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if n <= 0:
        raise ValueError(f"a memory size must be positive, got {value!r}")
    return n


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceConfig:
    """How to open a device.

    Attributes:
        backend: ``"emulated"`` (a separate process) or ``"inline"`` (this process).
        cores: CPU cores the emulated device is pinned to; ``None`` picks the last
            core when the machine has more than one (the training loop keeps the rest).
            Each slice's pass runs on one thread per core (``cores=(2, 3)``: two); the
            inline device, which runs in the caller's process and is not pinned, runs it
            on ``len(cores)`` threads where cores are given, else one.
        memory_budget: device memory for the slices being updated, like ``"1GiB"``.
            Host memory used by the device is bounded by this, not by model size.
        io_backend: how store reads and writes are kept in flight: ``"ring"``
            (Linux io_uring), ``"threads"`` (a thread pool) or ``"auto"`` (the ring
            where the kernel and sandbox allow it, else threads). See ``nearstep.uring``.
        io_threads: threads of the thread-pool backend.
        queue_depth: blocks the io_uring backend keeps in flight.
        lend_idle_cores: the training loop's torch threads run on the device's cores while
            the device is idle, and step down to the other cores while it has a step queued
            (see [Note: lending cores to the loop] in cores.py). For training on the CPU the
            device shares; give the loop every core (``torch.set_num_threads``) and the
            device ``cores``. Emulated device only.
        stall_timeout: seconds the emulated device may go without completing a request while
            requests are queued, on top of what their I/O needs at ``stall_min_rate``; past it
            the device is taken for stopped or stuck (SIGSTOP, a hung disk), killed, and the
            waiting call raises :class:`~nearstep.DeviceStalledError` (the store keeps its last
            committed step; the next ``step()`` starts a new device). None: wait forever.
        stall_min_rate: the slowest store bandwidth (bytes/s, like ``"16MiB"``) the allowance
            assumes for the I/O in flight: a commit may have to write and sync a whole
            generation of the state, an update a few slices.
        staging_dir: where the emulated device's staging memory (one step's gradients and weights,
            shared by the two processes) is made: ``/dev/shm`` by default. A directory on a local
            disk works where /dev/shm is too small (Docker's default is 64 MiB), at the cost of the
            page cache writing it back.
    """

    backend: Literal["emulated", "inline"] = "emulated"
    cores: tuple[int, ...] | None = None
    memory_budget: int | str = "1GiB"
    io_backend: Literal["auto", "ring", "threads"] = "auto"
    io_threads: int = 4
    queue_depth: int = DEFAULT_QUEUE_DEPTH
    lend_idle_cores: bool = False
    stall_timeout: float | None = 60.0
    stall_min_rate: int | str = "16MiB"
    staging_dir: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("emulated", "inline"):
            raise ValueError(f"backend must be 'emulated' or 'inline', got {self.backend!r}")
        if self.lend_idle_cores and self.backend != "emulated":
            raise ValueError("lend_idle_cores lends the emulated device's cores to the training loop; the inline "
                             "device runs in the loop's own threads and has none to lend: drop lend_idle_cores "
                             "or use backend='emulated'")
        parse_bytes(self.memory_budget)
        parse_bytes(self.stall_min_rate)
        if self.stall_timeout is not None and (isinstance(self.stall_timeout, bool) or not isinstance(self.stall_timeout, (int, float))
                                               or not 0 < self.stall_timeout < float("inf")):
            raise ValueError(f"stall_timeout must be a positive number of seconds or None (wait forever), "
                             f"got {self.stall_timeout!r}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads}")
        if self.queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {self.queue_depth}")
        if self.io_backend not in uring.IO_BACKENDS:
            raise ValueError(f"io_backend must be one of {', '.join(map(repr, uring.IO_BACKENDS))}, "
                             f"got {self.io_backend!r}")
        if self.cores is not None:
            count = os.cpu_count() or 1
            if not self.cores or not all(isinstance(c, int) and 0 <= c < count for c in self.cores):
                raise ValueError(f"cores must be a non-empty tuple of core numbers in 0..{count - 1}, got {self.cores!r}")

    def engine_config(self, threads: int | None = None) -> EngineConfig:
        """The engine's share of this configuration; ``threads`` of its pass (default: one per
        core given in ``cores``, else one)."""
        threads = threads if threads is not None else (len(self.cores) if self.cores else 1)
        return EngineConfig(memory_budget=parse_bytes(self.memory_budget), io_backend=self.io_backend,
                            io_threads=self.io_threads, queue_depth=self.queue_depth, threads=threads)

    def resolved_cores(self) -> tuple[int, ...]:
        if self.cores is not None:
            return tuple(self.cores)
        available = sorted(os.sched_getaffinity(0))
        return (available[-1],) if len(available) > 1 else tuple(available)


def _remote_error(what: str, exc: BaseException | None, text: str, tb: str) -> BaseException:
    """Rebuild a device-side error for the host: nearstep errors keep their type."""
    cause = DeviceError(f"the device failed to {what}. Device-side traceback:\n{tb}")
    if isinstance(exc, NearstepError):
        exc.__cause__ = cause
        return exc
    cause.args = (f"the device failed to {what}: {text}\nDevice-side traceback:\n{tb}",)
    return cause


class InlineDevice(Device):
    """The engine in the caller's process; every request completes before submit returns."""

    def __init__(self, store: Store, config: DeviceConfig) -> None:
        budget = parse_bytes(config.memory_budget)
        self._engine = Engine(store, config.engine_config())
        self._ids = itertools.count(1)
        self._closed = False
        self.info = DeviceInfo(
            "inline", os.getpid(), tuple(sorted(os.sched_getaffinity(0))), budget, self._engine.slot_bytes,
            self._engine.max_slots, tuple(rules.KERNELS), str(store.path), _direct_io(store),
            self._engine.io_backend,
        )

    @property
    def alive(self) -> bool:
        return not self._closed

    def alloc(self, nbytes: int) -> DeviceMemory:
        mem_id = next(self._ids)
        buf = aio.AlignedBuffer(nbytes)
        view = buf.tensor(torch.uint8)
        self._engine.memory[mem_id] = view
        return DeviceMemory(mem_id, buf.nbytes, view)

    def submit(self, request: Request) -> Completion:
        done = Completion(describe(request))
        if self._closed:
            done.finish(error=DeviceError("the device is closed; open a new optimizer or device"))
            return done
        try:
            done.finish(self._engine.handle(request))
        except Exception as exc:  # the engine has dropped the step
            done.finish(error=_remote_error(done.what, exc, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except BaseException as exc:
            # Ctrl-C inside the engine: it dropped the step; the interrupt surfaces where the
            # host waits for this request, which brings model and optimizer to the committed step.
            done.finish(error=exc)
        return done

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine.close()


def _direct_io(store: Store) -> bool:
    probe = store.slice_path(0, 0) if store.manifest.slices else None
    if probe is None or not probe.exists():
        return False
    with aio.AlignedFile.open(probe, writable=False) as f:
        return f.direct


# ---------------------------------------------------------------------------
# The emulated device: a process of its own


def _device_entry() -> None:
    """Entry point of the emulated device process: ``python -c ... CONN_FD LOCK_FD``."""
    conn = multiprocessing.connection.Connection(int(sys.argv[1]))
    try:
        store_path, config, cores = conn.recv()
    except (EOFError, OSError):
        return  # the trainer stopped (Ctrl-C) before it said what to open: nothing to do, nothing to say
    if os.environ.get("NEARSTEP_FAULT"):
        from .faults import install_from_env  # the reliability tests' injected failures (faults.py)

        install_from_env()
    _device_main(conn, store_path, int(sys.argv[2]), config, cores)


def _device_main(conn: Any, store_path: str, lock_fd: int, config: DeviceConfig, cores: tuple[int, ...]) -> None:
    try:
        os.sched_setaffinity(0, cores)
    except OSError:
        pass
    # The pass spreads each chunk over one thread per core (see [Note: a pass on several cores]
    # in engine.py), so torch's own kernels run single-threaded inside it.
    torch.set_num_threads(1)
    try:
        store = Store.adopt(store_path, lock_fd)
        engine = Engine(store, config.engine_config(threads=len(cores)))
        conn.send(("ready", (engine.slot_bytes, engine.max_slots, _direct_io(store), engine.io_backend), None))
    except BaseException as exc:
        try:
            conn.send(("failed", None, _pack_error(exc)))
        except OSError:
            pass  # the trainer is gone already (interrupted while we started): nobody to tell
        return
    try:
        while True:
            try:
                rid, request = conn.recv()
            except (EOFError, OSError):
                break  # the training process is gone: drop uncommitted work and stop
            if request is None:
                break
            try:
                try:
                    conn.send((rid, engine.handle(request), None))
                except Exception as exc:  # the engine has dropped the step
                    conn.send((rid, None, _pack_error(exc)))
            except OSError:
                break  # the trainer died while we worked (its end closed): stop as on EOF, quietly
    finally:
        engine.close()
        try:
            conn.send(("closed", None, None))
        except (OSError, ValueError):
            pass


def _pack_error(exc: BaseException) -> tuple[BaseException | None, str, str]:
    text = f"{type(exc).__name__}: {exc}"
    tb = traceback.format_exc()
    try:
        multiprocessing.reduction.ForkingPickler.dumps(exc)
        return exc, text, tb
    except Exception:
        return None, text, tb


class EmulatedDevice(Device):
    """The engine in a process of its own, pinned to its own core(s)."""

    def __init__(self, store: Store, config: DeviceConfig, start_timeout: float = 120.0) -> None:
        # A fresh interpreter rather than multiprocessing's spawn: spawn re-runs the
        # user's main module in the child, which breaks training scripts that lack an
        # ``if __name__ == "__main__"`` guard. The child gets one end of a socket pair
        # and the store's lock fd; sharing that open file description keeps the flock()
        # held while either process lives.
        parent, child = socket.socketpair()
        cores = config.resolved_cores()
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        # [Note: interrupts reach the training process only]
        # A terminal sends Ctrl-C (SIGINT), and SIGHUP when it closes, to its whole
        # foreground process group. The device is not the user's job: in that group it
        # would die of the same Ctrl-C mid-request, print a second traceback, and turn
        # the trainer's KeyboardInterrupt into a DeviceDiedError. So it runs in a session
        # of its own (setsid; also no controlling terminal, so no SIGTTOU on its writes),
        # and ignores SIGINT from its first line on, before the slow imports. Its life
        # stays tied to the trainer's through the socket, not through signals: when the
        # trainer exits, is killed or crashes, its end closes and the device's recv()
        # sees EOF, drops uncommitted work and exits (see _device_main).
        self._proc = subprocess.Popen(
            [sys.executable, "-c",
             "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
             "from nearstep.device import _device_entry; _device_entry()",
             str(child.fileno()), str(store.lock_fd)],
            pass_fds=(child.fileno(), store.lock_fd),
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        child.close()
        self._conn = multiprocessing.connection.Connection(parent.detach())
        try:
            self._conn.send((str(store.path), config, cores))
        except BaseException:
            # Ctrl-C (or a device that died at once): stop it before it takes the store's lock.
            self._proc.kill()
            self._proc.wait()
            self._conn.close()
            raise
        self._send_lock = threading.Lock()
        self._pending: dict[int, Completion] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._shared: list[SharedMemory] = []
        self._dead: BaseException | None = None
        self._closed = False
        self._hung_up = False  # the receiver saw the device's end of the socket close
        # The liveness allowance (see [Note: a device that stops answering]).
        self._staging_dir = config.staging_dir
        self._stall_timeout = config.stall_timeout
        self._stall_rate = parse_bytes(config.stall_min_rate)
        self._commit_ids: set[int] = set()
        # Wait for the engine to open the store: failures there (budget too small,
        # store unreadable) belong to open_device, not to the first step.
        try:
            if not self._conn.poll(start_timeout):
                self._proc.kill()
                raise DeviceDiedError(f"the emulated device process did not start within {start_timeout:.0f} s")
            try:
                tag, payload, error = self._conn.recv()
            except (EOFError, OSError):
                code = self._proc.wait(5)
                raise DeviceDiedError(f"the emulated device process exited while starting (exit code {code}); see its output above") from None
        except KeyboardInterrupt:
            # Ctrl-C while the device starts (its imports take seconds): it shares the
            # store's lock and would hold it until it noticed we are gone, refusing a
            # rerun meanwhile. It has done nothing yet, so stop it now.
            self._proc.kill()
            self._proc.wait()
            self._conn.close()
            raise
        if tag != "ready":
            self._proc.wait(5)
            assert error is not None
            raise _remote_error("open the store", error[0], error[1], error[2])
        slot_bytes, slots, direct, io_backend = payload
        self.info = DeviceInfo(
            "emulated", self._proc.pid, cores, parse_bytes(config.memory_budget), slot_bytes, slots,
            tuple(rules.KERNELS), str(store.path), direct, io_backend,
        )
        sizes = [store.manifest.slice_file_bytes(spec.index) for spec in store.manifest.slices]
        self._state_bytes, self._update_bytes = sum(sizes), 3 * max(sizes, default=0)
        # One thread receives every completion, so waiting on any of them also notices
        # a dead device at once (its end of the socket closes), never after a timeout.
        self._receiver = threading.Thread(target=self._receive, name="nearstep-completions", daemon=True)
        self._receiver.start()

    @property
    def alive(self) -> bool:
        # /proc as well: poll() answers None while the receiver thread waits for the exit code.
        return (self._dead is None and not self._closed and not self._hung_up and self._proc.poll() is None
                and _process_state(self._proc.pid) not in ("Z", "X", ""))

    # [Note: a device that stops answering]
    # A device process that exits closes its socket and the receiver sees it at once. One
    # that is stopped (SIGSTOP, a debugger) or stuck (a hung disk: uninterruptible I/O)
    # keeps it open and answers nothing, and the trainer would wait forever. So while
    # requests are queued, the receiver allows the device ``stall_timeout`` seconds plus
    # what the I/O in flight needs at ``stall_min_rate`` (a whole generation of the state
    # when a commit is queued, three slices' worth for an update) between completions.
    # Past that it names the process state (/proc: T stopped, D in disk I/O), kills it
    # and fails what is queued; the store is crash-consistent, so nothing committed is
    # lost, and the optimizer reopens a device at its next step.

    def _allowance(self) -> float:
        assert self._stall_timeout is not None
        with self._pending_lock:
            commit = bool(self._commit_ids & self._pending.keys())
        return self._stall_timeout + (self._state_bytes if commit else self._update_bytes) / self._stall_rate

    def _receive(self) -> None:
        last = time.monotonic()
        while True:
            try:
                if self._stall_timeout is not None and not self._conn.poll(min(1.0, self._stall_timeout / 4)):
                    with self._pending_lock:
                        idle = not self._pending
                    now = time.monotonic()
                    if idle or self._closed:
                        last = now
                    elif now - last > self._allowance():
                        self._stalled(now - last)
                        break
                    continue
                rid, result, error = self._conn.recv()
            except (EOFError, OSError):
                break  # the process is gone: its end of the socket closed
            last = time.monotonic()
            if rid == "closed":
                break
            with self._pending_lock:
                done = self._pending.pop(rid, None)
                self._commit_ids.discard(rid)
            if done is not None:
                done.finish(result, None if error is None else _remote_error(done.what, *error))
        self._hung_up = True  # before the wait below: poll() answers None while another thread waits
        if not self._closed and self._dead is None:
            try:
                code = self._proc.wait(1)
            except subprocess.TimeoutExpired:
                code = None
            self._dead = DeviceDiedError(
                f"the emulated device process {self._proc.pid} died (exit code {code}). The store keeps "
                f"its last committed step; the next step() starts a new device process on it (or reopen the "
                f"optimizer on the same store to resume)."
            )
        self._fail_pending()

    def _stalled(self, silent: float) -> None:
        """The device answered nothing for ``silent`` seconds with work queued: kill it, say why."""
        state = _process_state(self._proc.pid)
        why = {"T": "is stopped (SIGSTOP, or a debugger holds it)", "t": "is stopped by a debugger",
               "D": "is stuck in disk I/O (uninterruptible: the store's disk or its driver hangs)"}.get(
            state, f"is running (state {state or 'unknown'}) but not answering")
        with self._pending_lock:
            queued = len(self._pending)
        self._dead = DeviceStalledError(
            f"the emulated device process {self._proc.pid} {why}: it completed nothing for {silent:.0f} s with "
            f"{queued} request(s) queued, more than their work allows (DeviceConfig.stall_timeout="
            f"{self._stall_timeout:g} s plus their I/O at stall_min_rate). It was killed; the store keeps its last "
            f"committed step and the next step() starts a new device. Raise stall_timeout if the disk is that slow."
        )
        self._proc.kill()

    def _fail_pending(self) -> None:
        error = self._dead or DeviceError("the device was closed while this request was queued")
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for done in pending.values():
            done.finish(error=error)

    def submit(self, request: Request) -> Completion:
        done = Completion(describe(request))
        if self._dead is not None or self._closed:
            done.finish(error=self._dead or DeviceError("the device is closed; open a new optimizer or device"))
            return done
        rid = next(self._ids)
        with self._pending_lock:
            self._pending[rid] = done
            if isinstance(request, Commit):
                self._commit_ids.add(rid)
        try:
            # A Ctrl-C inside send() could leave half a request on the socket, which the device
            # would read as the start of the next one: the request is written whole, then the
            # interrupt is raised (its completion is registered, so settling the step finds it).
            with self._send_lock, interrupts_deferred():
                self._conn.send((rid, request))
        except (OSError, ValueError):
            pass  # the receiver thread sees the dead process and fails this completion
        return done

    def alloc(self, nbytes: int) -> DeviceMemory:
        shared = SharedMemory(nbytes, directory=self._staging_dir)
        mem_id = next(self._ids)
        try:
            self.submit(MapMemory(mem_id, shared.path, shared.nbytes)).wait()
        finally:
            shared.unlink()  # both sides have it mapped (or the device failed): no name left behind
        self._shared.append(shared)
        return DeviceMemory(mem_id, shared.nbytes, shared.bytes)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._proc.poll() is None:
            try:
                with self._send_lock:
                    self._conn.send((0, None))
                self._proc.wait(30)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(5)
        self._receiver.join(5)
        self._conn.close()
        for shared in self._shared:
            shared.close()
        self._fail_pending()

    def kill(self) -> None:
        """Kill the device process (for tests of what a crash does)."""
        self._proc.kill()


def _process_state(pid: int) -> str:
    """The one-letter state of process ``pid`` from /proc (R, S, D, T, Z, ...); "" where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def open_device(
    store: Store,
    backend: Literal["emulated", "inline"] = "emulated",
    cores: tuple[int, ...] | None = None,
    memory_budget: int | str = "1GiB",
    *,
    io_backend: Literal["auto", "ring", "threads"] = "auto",
    io_threads: int = 4,
    queue_depth: int = DEFAULT_QUEUE_DEPTH,
) -> Device:
    """Open a computational storage device on ``store``.

    Args:
        store: an open :class:`~nearstep.store.Store`; the device owns its state
            from now on (the host reads it only through the device).
        backend: ``"emulated"`` (separate process) or ``"inline"`` (this process).
        cores: cores to pin the emulated device to (default: the last one).
        memory_budget: device memory for slices in flight, like ``"1GiB"``.
        io_backend: ``"auto"``, ``"ring"`` (io_uring) or ``"threads"``: see :class:`DeviceConfig`.
        io_threads: threads of the thread-pool backend.
        queue_depth: blocks the io_uring backend keeps in flight.

    Returns:
        A :class:`Device`; close it (or use ``with``) to stop it.

    Example::

        with Store.open("run/.nearstep") as store, open_device(store, "inline") as dev:
            print(dev.info)
    """
    config = DeviceConfig(backend=backend, cores=cores, memory_budget=memory_budget, io_backend=io_backend,
                          io_threads=io_threads, queue_depth=queue_depth)
    return build_device(store, config)


def slice_file_capacity() -> int | None:
    """How many slice files the device may keep open at once here (after :func:`ensure_file_limit`
    raised the soft limit); None: no limit. More slices than that still work: the device opens
    their files on demand (``slicefiles.py``)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return None if hard == resource.RLIM_INFINITY else max(0, hard - FD_MARGIN)


def ensure_file_limit(slices: int) -> None:
    """Let the device keep both generations of ``slices`` slice files open where the system allows.

    The engine keeps a slice's files open between steps when it may (each step reads one
    generation and writes the other). Where the soft ``RLIMIT_NOFILE`` is lower than that
    needs, it is raised up to the hard limit (for this process and the device it starts);
    past the hard limit the device opens and closes files on demand, which costs an open
    per request, so nothing is refused.
    """
    need = 2 * slices + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # a sandbox may refuse: the device works within the soft limit


def build_device(store: Store, config: DeviceConfig) -> Device:
    ensure_file_limit(len(store.manifest.slices))
    if config.backend == "inline":
        return InlineDevice(store, config)
    return EmulatedDevice(store, config)
