"""A training process for ``test_faults.py`` to kill: it trains on a store and reports how far it got.

Two ways to start it, both with ``sys.executable``:

- ``python fault_worker.py run SPEC``: one training run in this process.
- ``python fault_worker.py serve``: a fork server. It imports torch and nearstep
  once, then for each JSON spec read from stdin forks a training process and
  answers with its pid. Importing torch takes about two seconds; forking takes a
  few milliseconds, which is what lets the crash tests afford dozens of trials.
  Only the forked child runs torch code, so the fork happens before any thread
  or OpenMP pool exists.

A spec (JSON) names ``store``, ``status`` (a directory for the files below),
``backend`` (``emulated`` or ``inline``), ``mode`` (``sync`` or ``overlap``) and,
optionally, ``pause`` (one of :data:`PHASES`) with ``pause_step``. The worker
writes, in ``status``:

- ``ready.json`` once the optimizer is open: its pid, the device process's pid
  and the step it resumed at;
- ``progress``: one line per ``step()`` that returned, with that step's number;
- ``paused.json`` when it reaches the pause point; it then sleeps there until
  the test kills it (see [Note: pausing at a phase]);
- ``done.json`` when it trained all :data:`STEPS` steps and closed the optimizer.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest: the model and data every test uses

import torch

import nearstep
from nearstep import aio, pipeline, uring
from conftest import batches, loss_of, make_model

STEPS = 12
LR = 1e-2
SLICE_MB = 0.004  # ~1000 fp32 parameters per slice: TinyNet has 3 slices, one parameter split across two
PAUSE_SECONDS = 60.0  # far longer than any test waits: the pause ends with SIGKILL

# [Note: pausing at a phase]
# A kill after a random delay lands mostly in forward/backward, where nothing is
# written. To kill the process that runs the engine (the inline backend runs it
# here) inside each phase of a step for certain, the worker wraps the function
# doing that phase and, in the step named by ``pause_step``, stops inside it and
# says so; the test kills it there. Which committed step the store must reopen at
# follows from the phase: the rename of the manifest is the commit point.
PHASES = {
    # phase: (what runs when the worker stops, whether the paused step is committed)
    "stage": ("a gradient was copied to staging (a grad hook in overlap mode)", False),
    "read": ("the engine is about to read a slice's committed state", False),
    "write": ("half of a slice's new state is written to its other generation", False),
    "sync": ("a slice's new state is written, not yet fdatasync()ed", False),
    "manifest-write": ("half of the new manifest is written to manifest.json.tmp", False),
    "rename": ("manifest.json.tmp is complete and fsync()ed, not yet renamed", False),
    "dir-fsync": ("manifest.json.tmp was renamed over manifest.json; the directory is not fsync()ed", True),
}


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return batches(STEPS)


def open_optimizer(model: torch.nn.Module, store: str | os.PathLike, *, backend: str = "inline",
                   mode: str = "sync") -> nearstep.AdamW:
    """The optimizer every run of the crash tests uses: a new store, or a resume of an existing one."""
    return nearstep.AdamW(model.named_parameters(), lr=LR, store=store, device=backend, mode=mode,
                          slice_mb=SLICE_MB, model=model)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)  # the test never reads half a file


class _Pause:
    """Stops the process once, inside ``phase`` of step ``step`` (see [Note: pausing at a phase])."""

    def __init__(self, phase: str, step: int, status: Path) -> None:
        self.phase = phase
        self.step = step
        self.status = status
        self.current_step = 0  # the step the training loop is computing
        self._lock = threading.Lock()
        self._fired = False

    def due(self, phase: str) -> bool:
        with self._lock:
            if self._fired or phase != self.phase or self.current_step != self.step:
                return False
            self._fired = True
            return True

    def stop(self) -> None:
        _write_json(self.status / "paused.json", {"phase": self.phase, "step": self.step})
        time.sleep(PAUSE_SECONDS)


def _install(pause: _Pause) -> None:
    """Wrap the functions of each phase; only the chosen one ever stops."""
    stage, read_into, write_from, sync = (
        pipeline.Pipeline.stage, aio.AlignedFile.read_into, aio.AlignedFile.write_from, aio.AlignedFile.sync)
    real_write, real_replace = os.write, os.replace

    def paused_stage(self, i, p):
        stage(self, i, p)
        if pause.due("stage"):
            pause.stop()

    def paused_read_into(self, buf, offset):
        if pause.due("read"):
            pause.stop()
        return read_into(self, buf, offset)

    def paused_write_from(self, buf, offset):
        if pause.due("write"):
            view = memoryview(buf.memoryview() if isinstance(buf, aio.AlignedBuffer) else buf).cast("B")
            half = view.nbytes // 2 // aio.PAGE * aio.PAGE  # O_DIRECT wants whole pages
            write_from(self, view[:half], offset)  # a torn write of the uncommitted generation
            pause.stop()
        return write_from(self, buf, offset)

    ring_start_blocks = uring.IORing.start_blocks

    def paused_ring_start_blocks(self, file, view, offset, checksum, writing):
        # The io_uring backend never calls read_into/write_from: the same pauses, at its door.
        if writing and pause.due("write"):
            half = view.nbytes // 2 // aio.PAGE * aio.PAGE
            write_from(file, view[:half], offset)  # a torn write of the uncommitted generation
            pause.stop()
        elif not writing and pause.due("read"):
            pause.stop()
        return ring_start_blocks(self, file, view, offset, checksum, writing)

    def paused_sync(self):
        if pause.due("sync"):
            pause.stop()
        return sync(self)

    def paused_write(fd, data):
        if _is_manifest_tmp(fd) and pause.due("manifest-write"):
            half = max(len(data) // 2, 1)
            real_write(fd, data[:half])
            pause.stop()
        return real_write(fd, data)

    def paused_replace(src, dst, *args, **kwargs):
        commit = str(dst).endswith("manifest.json")
        if commit and pause.due("rename"):
            pause.stop()
        result = real_replace(src, dst, *args, **kwargs)
        if commit and pause.due("dir-fsync"):
            pause.stop()
        return result

    pipeline.Pipeline.stage = paused_stage
    aio.AlignedFile.read_into = paused_read_into
    aio.AlignedFile.write_from = paused_write_from
    aio.AlignedFile.sync = paused_sync
    uring.IORing.start_blocks = paused_ring_start_blocks
    os.write = paused_write
    os.replace = paused_replace


def _is_manifest_tmp(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith("manifest.json.tmp")
    except OSError:
        return False


def train(spec: dict[str, Any]) -> None:
    """One training run as ``spec`` says; see the module docstring."""
    torch.set_num_threads(1)  # as the tests' reference run, so the numbers agree bit for bit
    status = Path(spec["status"])
    pause = None
    if spec.get("pause"):
        pause = _Pause(spec["pause"], int(spec["pause_step"]), status)
        _install(pause)
    model = make_model()
    opt = open_optimizer(model, spec["store"], backend=spec["backend"], mode=spec["mode"])
    start = opt.stats()["step"]
    _write_json(status / "ready.json", {"pid": os.getpid(), "device_pid": opt.device.info.pid, "start": start})
    progress = os.open(status / "progress", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    batches_ = data()
    for i in range(start, STEPS):
        if pause is not None:
            pause.current_step = i + 1
        loss_of(model, batches_[i]).backward()
        opt.step()
        opt.zero_grad()
        os.write(progress, f"{i + 1}\n".encode())
    opt.close()
    _write_json(status / "done.json", {"step": STEPS})


def _child(spec: dict[str, Any]) -> None:
    """A forked training process: its own output, default signal handling, no way back into the server."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it; subprocess needs it
    log = os.open(Path(spec["status"]) / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 0
    try:
        train(spec)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """The fork server: one JSON spec per line in, one pid per line out; stops at EOF."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel: no zombies
    # The first torch.optim.Optimizer imports torch._dynamo (about a second, no threads started):
    # import it once here rather than in every child.
    import torch._dynamo  # noqa: F401
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(spec)
        sys.stdout.write(f"{pid}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        train(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: fault_worker.py serve | fault_worker.py run SPEC_JSON")
