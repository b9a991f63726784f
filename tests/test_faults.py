"""Reliability: nothing committed is lost, whatever fails and whenever.

DESIGN.md promises that the store is crash-consistent (killed at any instant, it
reopens at the last committed step, never a torn mix) and that bad input gets a
clear error and loses nothing. These tests break things on purpose and check both:

- kill -9, seeded: the device process at a random moment; the training process at
  a random moment; the process running the engine while it is inside each phase of
  a step (staging, reading, writing, fdatasync, the manifest write, the rename);
- a full disk, corrupted and truncated state files, permission denied, malformed
  manifests (property-based), and a second process on a store in use.

[Note: what a trial checks]
After every kill the store must open (its lock released within seconds, also when
the killed process was the trainer and its device process has to notice), report
``verify() == []``, and hold, bit for bit, what an uninterrupted run holds after
the committed step S: master weights and both moments of every parameter. Then a
new optimizer resumes from it and trains to :data:`STEPS`; the final weights must
equal the uninterrupted run's, bit for bit. Both sides run sync-mode arithmetic
(overlap mode is exact too) with one torch thread, so any difference is real. A
trial with any failed check counts as lost data; the last test prints the tally.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import ctypes
import errno
import faulthandler
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import configuration as hypothesis_configuration
from hypothesis import strategies as st

import nearstep
from conftest import loss_of, make_model, process_running, wait_gone
from fault_worker import PHASES, STEPS, data, open_optimizer
from nearstep import errors
from nearstep import store as store_module

WORKER = Path(__file__).resolve().parent / "fault_worker.py"
SEED = 20240611  # every random choice below derives from it: a failing trial names its seed
STATE = ("master", "exp_avg", "exp_avg_sq")

DEVICE_KILL_TRIALS = 20  # kill the emulated device process at a random moment
TRAINER_KILL_TRIALS = 10  # kill the training process (emulated backend) at a random moment
PHASE_ROUNDS = 3  # kill the process running the engine inside each phase, this many times per phase
TOTAL_TRIALS = DEVICE_KILL_TRIALS + TRAINER_KILL_TRIALS + PHASE_ROUNDS * len(PHASES) + 1  # + the lock test
assert TOTAL_TRIALS >= 50

LOCK_RELEASE_SECONDS = 10.0  # a dead trainer's device process must let go of the store by then
START_SECONDS = 60.0  # a worker imports torch and starts its device: generous on a loaded machine


# ---------------------------------------------------------------------------
# Fixtures: one torch thread, no hangs, the uninterrupted reference run


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The device process computes with one thread; so do the host and the reference here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A test stuck waiting on a dead device ends the run with every thread's traceback."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run: ``weights[s]`` and ``states[s][i][name]`` (flat fp32) after s steps."""

    weights: tuple[tuple[torch.Tensor, ...], ...]
    states: tuple[dict[int, dict[str, torch.Tensor]], ...]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    model = make_model()
    weights = [_weights(model)]
    states = [{i: {"master": w.float().reshape(-1), "exp_avg": torch.zeros(w.numel()), "exp_avg_sq": torch.zeros(w.numel())}
               for i, w in enumerate(weights[0])}]
    with open_optimizer(model, tmp_path_factory.mktemp("reference") / "store") as opt:
        for batch in data():
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad()
            weights.append(_weights(model))
            states.append({i: {n: entry[n].reshape(-1).clone() for n in STATE} for i, entry in opt.full_state_dict()["state"].items()})
    return Reference(tuple(weights), tuple(states))


def _weights(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    return tuple(p.detach().clone() for p in model.parameters())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaNs included), not just equal values."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _differences(got: dict[int, dict[str, torch.Tensor]], want: dict[int, dict[str, torch.Tensor]], what: str) -> list[str]:
    if sorted(got) != sorted(want):
        return [f"{what}: parameters {sorted(got)} instead of {sorted(want)}"]
    return [f"{what}: {name} of parameter {i} differs" for i in want for name in STATE
            if not _same(got[i][name].reshape(-1), want[i][name])]


def test_the_reference_is_what_an_emulated_overlapped_run_computes(reference: Reference, tmp_path: Path) -> None:
    """The ground the trials stand on: inline == emulated and sync == overlap, bit for bit, here."""
    model = make_model()
    with open_optimizer(model, tmp_path / "store", backend="emulated", mode="overlap") as opt:
        for batch in data():
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad()
        opt.synchronize()
    assert all(_same(a, b) for a, b in zip(_weights(model), reference.weights[STEPS]))


# ---------------------------------------------------------------------------
# Recovery: reopen, compare with the reference, resume, compare again


def committed_state(store: nearstep.Store) -> dict[int, dict[str, torch.Tensor]]:
    """Every parameter's committed state, read from the store's files (checksums verified)."""
    m = store.manifest
    out = {i: {n: torch.empty(p.numel) for n in STATE} for i, p in enumerate(m.params)}
    for spec in m.slices:
        flat = store.read_slice(spec.index)
        offset = 0
        for seg in spec.segments:
            for n in STATE:
                out[seg.param][n][seg.start : seg.start + seg.length] = flat[n][offset : offset + seg.length]
            offset += seg.length
    return out


def open_when_released(path: Path, timeout: float = LOCK_RELEASE_SECONDS) -> nearstep.Store:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return nearstep.Store.open(path)
        except nearstep.StoreLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def recover(path: Path, ref: Reference, *, at_least: int = 0, at_most: int = STEPS) -> tuple[int | None, list[str]]:
    """Reopen a store after a fault and check it (see [Note: what a trial checks]).

    Returns the committed step and the problems found: none means nothing was lost.
    """
    try:
        store = open_when_released(path)
    except nearstep.StoreLockedError as exc:
        return None, [f"the store is still locked {LOCK_RELEASE_SECONDS:.0f} s after the crash: {exc}"]
    except nearstep.NearstepError as exc:
        return None, [f"the store does not open: {type(exc).__name__}: {exc}"]
    with store:
        m = store.manifest
        step = m.step
        if not (at_least <= step <= at_most and 0 <= step <= STEPS):
            return step, [f"committed step {step}, expected {at_least}..{min(at_most, STEPS)}"]
        problems = [f"verify(): {p}" for p in store.verify()]
        if set(m.param_steps) != {step}:
            problems.append(f"param_steps {m.param_steps} disagree with step {step}")
        if problems:
            return step, problems
        problems += _differences(committed_state(store), ref.states[step], f"committed state at step {step}")
    if problems:
        return step, problems
    # Resume: the store's masters become the weights of a model that starts out different.
    model = make_model(seed=12345)
    try:
        with open_optimizer(model, path) as opt:
            problems += [f"resumed weight {i} differs from the reference at step {step}"
                         for i, (a, b) in enumerate(zip(_weights(model), ref.weights[step])) if not _same(a, b)]
            for batch in data()[step:]:
                loss_of(model, batch).backward()
                opt.step()
                opt.zero_grad()
            final = {i: {n: e[n].reshape(-1) for n in STATE} for i, e in opt.full_state_dict()["state"].items()}
    except nearstep.NearstepError as exc:
        return step, problems + [f"resuming failed: {type(exc).__name__}: {exc}"]
    problems += [f"final weight {i} differs from the uninterrupted run's"
                 for i, (a, b) in enumerate(zip(_weights(model), ref.weights[STEPS])) if not _same(a, b)]
    problems += _differences(final, ref.states[STEPS], "final state")
    return step, problems


@dataclass
class Ledger:
    """Every kill trial of the module, for the tally the last test prints."""

    trials: int = 0
    lost: list[str] = field(default_factory=list)

    def record(self, trial: str, problems: list[str]) -> None:
        self.trials += 1
        if problems:
            self.lost.append(f"{trial}: {'; '.join(problems)}")


LEDGER = Ledger()


def _shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("nearstep-*")} if Path("/dev/shm").is_dir() else set()


SHM_BEFORE = _shm_files()

# Hypothesis caches what it learns under ./.hypothesis, from collection on and even without an
# example database; these tests leave nothing behind, so it goes to a temporary directory,
# removed when the module is done (or at exit, after --collect-only).
_HYPOTHESIS_HOME = Path(tempfile.mkdtemp(prefix="test_faults-hypothesis-"))
hypothesis_configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, True)


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home() -> Iterator[None]:
    yield
    hypothesis_configuration.set_hypothesis_home_dir(None)  # back to $HYPOTHESIS_STORAGE_DIRECTORY or ./.hypothesis
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)


# ---------------------------------------------------------------------------
# 1a. kill -9 of the device process at a random moment


@pytest.mark.parametrize("trial", range(DEVICE_KILL_TRIALS))
def test_killing_the_device_process_loses_nothing(trial: int, reference: Reference, tmp_path: Path) -> None:
    rng = random.Random(SEED + trial)
    mode = ("sync", "overlap")[trial % 2]
    # A random step, then a random delay of up to about one step and a half: the kill
    # lands in forward/backward (prefetching), the update, the write-back or the commit.
    kill_step, delay = rng.randrange(STEPS), rng.uniform(0.0, 0.03)
    name = f"device kill {trial} (seed {SEED + trial}, {mode}, step {kill_step + 1} + {delay * 1e3:.1f} ms)"
    model = make_model()
    opt = open_optimizer(model, tmp_path / "store", backend="emulated", mode=mode)
    device_pid = opt.device.info.pid
    problems: list[str] = []
    killer: threading.Timer | None = None
    returned = 0
    try:
        for i, batch in enumerate(data()):
            if i == kill_step:
                killer = threading.Timer(delay, opt.device.kill)
                killer.start()
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad()
            returned = i + 1
    except Exception as exc:  # noqa: BLE001 - which error a dead device gives is what we check
        problems += _check_died_error(exc)
    finally:
        if killer is not None:
            killer.join()
        try:
            opt.close()
        except Exception as exc:  # noqa: BLE001 - overlap mode: the last commit was still in flight
            problems += _check_died_error(exc)
    if process_running(device_pid):
        problems.append(f"device process {device_pid} still runs after close()")
    # Sync mode: a step() that returned is committed. Overlap: the next step() waits for that commit.
    at_least = returned if mode == "sync" else max(returned - 1, 0)
    step, found = recover(tmp_path / "store", reference, at_least=at_least, at_most=returned + 1)
    LEDGER.record(f"{name}: committed {step}", problems + found)
    assert not problems + found, name


def _check_died_error(exc: BaseException) -> list[str]:
    if isinstance(exc, nearstep.DeviceDiedError) and "died" in str(exc) and "reopen" in str(exc):
        return []
    return [f"a dead device gave {type(exc).__name__}: {exc} (expected DeviceDiedError saying to reopen)"]




# ---------------------------------------------------------------------------
# 1b. kill -9 of the training process (a subprocess: tests/fault_worker.py)


class ForkServer:
    """``fault_worker.py serve``: forks a training process per spec (see its docstring)."""

    def __init__(self, log: Path) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, str(WORKER), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log)

    def start(self, spec: dict[str, Any]) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(spec) + "\n").encode())
        self.proc.stdin.flush()
        line = _readline(self.proc.stdout, START_SECONDS)
        if not line:
            raise RuntimeError(f"the fork server died: {Path(self._log.name).read_text()[-2000:]}")
        return int(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def _readline(stream: Any, timeout: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else b""


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path_factory.mktemp("fork-server") / "log")
    yield server
    server.close()


@dataclass
class Worker:
    """A training process the test started, and what it reported."""

    pid: int
    status: Path
    ready: dict[str, Any]

    def progress(self) -> int:
        """The last step whose ``step()`` returned (it may have returned one more)."""
        lines = (self.status / "progress").read_text().split() if (self.status / "progress").exists() else []
        return int(lines[-1]) if lines else self.ready["start"]

    def log(self) -> str:
        return _log_tail(self.status)


def _log_tail(status: Path) -> str:
    path = status / "log"
    return path.read_text()[-3000:] if path.exists() else ""


def _wait_file(path: Path, pid: int, timeout: float) -> dict[str, Any]:
    """The JSON a worker writes into ``path`` (its status directory), once it is there."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not process_running(pid):
            if path.exists():
                break
            raise AssertionError(f"worker {pid} exited before writing {path.name}:\n{_log_tail(path.parent)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"worker {pid} wrote no {path.name} within {timeout:.0f} s:\n{_log_tail(path.parent)}")
        time.sleep(0.002)
    return json.loads(path.read_text())


def start_worker(fork_server: ForkServer, tmp_path: Path, **spec: Any) -> Worker:
    status = tmp_path / "status"
    status.mkdir()
    pid = fork_server.start({"store": str(tmp_path / "store"), "status": str(status), **spec})
    return Worker(pid, status, _wait_file(status / "ready.json", pid, START_SECONDS))


def kill_worker(worker: Worker) -> list[str]:
    """SIGKILL the trainer; its device process (if any) must exit on its own, and promptly."""
    problems = []
    try:
        os.kill(worker.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it finished first
    if not wait_gone(worker.pid, 10):
        problems.append(f"worker {worker.pid} survived SIGKILL")
    device = worker.ready["device_pid"]
    if device != worker.pid and not wait_gone(device, LOCK_RELEASE_SECONDS):
        problems.append(f"device process {device} still runs {LOCK_RELEASE_SECONDS:.0f} s after its trainer died")
        with contextlib.suppress(ProcessLookupError):
            os.kill(device, signal.SIGKILL)  # leave nothing behind
    return problems


@pytest.mark.parametrize("trial", range(TRAINER_KILL_TRIALS))
def test_killing_the_training_process_loses_nothing(trial: int, reference: Reference, fork_server: ForkServer,
                                                    tmp_path: Path) -> None:
    rng = random.Random(SEED + 1000 + trial)
    mode = ("sync", "overlap")[trial % 2]
    delay = rng.uniform(0.0, 0.3)  # 12 steps take about 0.25 s here
    name = f"trainer kill {trial} (seed {SEED + 1000 + trial}, {mode}, after {delay * 1e3:.0f} ms)"
    worker = start_worker(fork_server, tmp_path, backend="emulated", mode=mode)
    try:
        time.sleep(delay)
        problems = kill_worker(worker)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
    returned = worker.progress()
    at_least = returned if mode == "sync" else max(returned - 1, 0)
    step, found = recover(tmp_path / "store", reference, at_least=at_least, at_most=returned + 2)
    LEDGER.record(f"{name}: returned {returned}, committed {step}", problems + found)
    assert not problems + found, f"{name}:\n{worker.log()}"


@pytest.mark.parametrize("phase", sorted(PHASES))
@pytest.mark.parametrize("round_", range(PHASE_ROUNDS))
def test_killing_the_engine_inside_each_phase_loses_nothing(phase: str, round_: int, reference: Reference,
                                                            fork_server: ForkServer, tmp_path: Path) -> None:
    """The inline backend runs the engine in the training process: stop it inside the phase, kill it there."""
    rng = random.Random(f"{SEED}-{phase}-{round_}")
    mode = rng.choice(["sync", "overlap"])
    pause_step = rng.randint(1, STEPS)
    name = f"{phase} kill {round_} ({mode}, step {pause_step}: {PHASES[phase][0]})"
    worker = start_worker(fork_server, tmp_path, backend="inline", mode=mode, pause=phase, pause_step=pause_step)
    try:
        _wait_file(worker.status / "paused.json", worker.pid, 30)
        problems = kill_worker(worker)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
    # The rename of the manifest is the commit point: before it, the paused step is not committed.
    expected = pause_step if PHASES[phase][1] else pause_step - 1
    step, found = recover(tmp_path / "store", reference, at_least=expected, at_most=expected)
    LEDGER.record(f"{name}: committed {step}", problems + found)
    assert not problems + found, f"{name}:\n{worker.log()}"


# ---------------------------------------------------------------------------
# 6. Two processes, one store: while a trainer runs, a second process is refused


def test_a_store_in_use_by_a_training_process_is_refused_naming_its_pid(reference: Reference, tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.mkdir()
    pause_step = random.Random(SEED + 2000).randint(2, STEPS)
    spec = {"store": str(tmp_path / "store"), "status": str(status), "backend": "emulated", "mode": "sync",
            "pause": "stage", "pause_step": pause_step}
    # A fresh interpreter this time (not a fork): the way a user starts training.
    with (status / "log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(WORKER), "run", json.dumps(spec)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    try:
        ready = _wait_file(status / "ready.json", proc.pid, START_SECONDS)
        _wait_file(status / "paused.json", proc.pid, 30)  # mid-step: the device is reading state
        with pytest.raises(nearstep.StoreLockedError, match=f"in use by process {proc.pid}\\b") as info:
            nearstep.Store.open(tmp_path / "store")
        assert "Stop that process" in str(info.value)
        with pytest.raises(nearstep.StoreLockedError, match=f"process {proc.pid}\\b"):
            open_optimizer(make_model(), tmp_path / "store")
        worker = Worker(proc.pid, status, ready)
        proc.kill()
        proc.wait(10)
        problems = kill_worker(worker)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    step, found = recover(tmp_path / "store", reference, at_least=pause_step - 1, at_most=pause_step - 1)
    LEDGER.record(f"lock test (stage, step {pause_step}): committed {step}", problems + found)
    assert not problems + found


# ---------------------------------------------------------------------------
# 2. A full disk


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where``, unmounted on the way out whatever happens."""
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run mount to make a small file system to fill: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root outside a locked-down container): "
                    f"{done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):
            while True:
                try:
                    if not f.write(chunk):
                        break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return filler


def punch_holes(path: Path) -> None:
    """Give a file's blocks back to the file system, keeping its size (FALLOC_FL_PUNCH_HOLE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, 0x02 | 0x01, 0, os.path.getsize(path)) != 0:
            pytest.skip(f"cannot punch holes on this file system: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def uncommitted_files(path: Path) -> list[Path]:
    m = store_module.read_manifest(path)
    return [path / "slices" / f"s{k:06d}.g{c.generation ^ 1}" for k, c in enumerate(m.committed)]


def train_steps(model: torch.nn.Module, opt: nearstep.AdamW, steps: range) -> None:
    batches = data()
    for i in steps:
        loss_of(model, batches[i]).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.filterwarnings("ignore:the file system holding:RuntimeWarning")
@pytest.mark.parametrize("backend", ["inline", "emulated"])
@pytest.mark.parametrize("runs_out_at", ["manifest", "state-write"])
def test_a_full_disk_mid_step_is_a_clear_error_and_loses_nothing(runs_out_at: str, backend: str, reference: Reference,
                                                                 tmp_path: Path) -> None:
    # Store.create preallocates both generations, so on an ordinary file system a step
    # overwrites blocks it already owns and the first thing that needs new space is the
    # commit's manifest.json.tmp: fill the disk after three steps and the fourth runs out
    # there ("manifest"). On copy-on-write file systems (btrfs, ZFS) preallocation does
    # not cover overwrites, so the write-back itself runs out; punching holes in the
    # generation the step will write, then filling the disk, makes that happen here
    # ("state-write").
    with small_filesystem(tmp_path / "mnt") as mnt:
        path = mnt / "store"
        model = make_model()
        filler = None
        with open_optimizer(model, path, backend=backend) as opt:
            train_steps(model, opt, range(3))
            if runs_out_at == "state-write":
                for victim in uncommitted_files(path):
                    punch_holes(victim)
            filler = fill(mnt)
            loss_of(model, data()[3]).backward()
            before = _weights(model)
            with pytest.raises(nearstep.DiskFullError) as info:
                opt.step()
            message = str(info.value)
            assert "free space" in message and "last committed step is untouched" in message
            assert ("manifest.json.tmp" if runs_out_at == "manifest" else "/slices/s0000") in message
            assert info.value.errno == errno.ENOSPC
            assert all(_same(a, b) for a, b in zip(_weights(model), before)), "a failed step changed the weights"
        with nearstep.Store.open(path) as store:
            assert store.manifest.step == 3
            assert store.verify() == []
        filler.unlink()
        step, problems = recover(path, reference, at_least=3, at_most=3)
        assert not problems


# ---------------------------------------------------------------------------
# 3. Corrupted and truncated state files


def damage(victim: Path, how: str) -> None:
    if how == "flip":
        with victim.open("r+b") as f:  # a bit of the master weights of the slice's first parameter
            f.seek(6)
            byte = f.read(1)
            f.seek(6)
            f.write(bytes([byte[0] ^ 0x10]))
    else:
        os.truncate(victim, 4096 + 100)  # not even a whole number of pages


def committed_file(path: Path, k: int) -> Path:
    return path / "slices" / f"s{k:06d}.g{store_module.read_manifest(path).committed[k].generation}"


def trained_store(path: Path, steps: int) -> None:
    model = make_model()
    with open_optimizer(model, path) as opt:
        train_steps(model, opt, range(steps))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_verify_names_the_damaged_file_and_its_slice(how: str, tmp_path: Path) -> None:
    path = tmp_path / "store"
    trained_store(path, 3)
    victim = committed_file(path, 1)
    damage(victim, how)
    with nearstep.Store.open(path) as store:
        problems = store.verify()
    assert len(problems) == 1 and victim.name in problems[0] and problems[0].startswith("slice 1")


@pytest.mark.parametrize("backend", ["inline", "emulated"])
def test_a_step_that_fails_on_one_slice_commits_nothing(backend: str, tmp_path: Path) -> None:
    # One slice's apply fails (its committed file fails the checksum): the device must
    # refuse the rest of the step, its commit included, so no step is committed torn.
    path = tmp_path / "store"
    model = make_model()
    with open_optimizer(model, path, backend=backend) as opt:
        train_steps(model, opt, range(3))
        damage(committed_file(path, 1), "flip")
        loss_of(model, data()[3]).backward()
        before = _weights(model)
        with pytest.raises(nearstep.StoreCorruptError, match="slice 1"):
            opt.step()
        assert all(_same(a, b) for a, b in zip(_weights(model), before))
        assert opt.stats()["step"] == 3
    m = store_module.read_manifest(path)
    assert m.step == 3 and set(m.param_steps) == {3}


def test_resuming_from_a_corrupted_store_leaves_the_model_untouched(tmp_path: Path) -> None:
    path = tmp_path / "store"
    trained_store(path, 3)
    last = len(store_module.read_manifest(path).slices) - 1
    damage(committed_file(path, last), "flip")
    model = make_model(seed=7)
    before = _weights(model)
    with pytest.raises(nearstep.StoreCorruptError):
        open_optimizer(model, path)
    assert all(_same(a, b) for a, b in zip(_weights(model), before))
    with nearstep.Store.open(path):  # and the failed resume left no lock behind
        pass


# ---------------------------------------------------------------------------
# 4. Permission denied, and retrying a step whose commit failed


def test_permission_errors_are_exported_and_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert nearstep.StorePermissionError is errors.StorePermissionError
    assert nearstep.StoreIOError is errors.StoreIOError
    path = tmp_path / "store"
    trained_store(path, 1)
    real_open = os.open

    def denied(file: Any, *args: Any, **kwargs: Any) -> int:
        if str(file).startswith(str(path)):
            raise OSError(errno.EROFS if "ro" in denied.mode else errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    for mode in ("ro", "acces"):
        denied.mode = mode  # type: ignore[attr-defined]
        monkeypatch.setattr(os, "open", denied)
        with pytest.raises(nearstep.StorePermissionError, match="LOCK for writing: .* Check the ownership"):
            nearstep.Store.open(path)
        monkeypatch.setattr(os, "open", real_open)
    with nearstep.Store.open(path) as store:
        assert store.verify() == []


def test_after_a_failed_commit_the_same_optimizer_retries_the_step(reference: Reference, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The manifest cannot be written once: the step fails, the optimizer's step counters go
    # back to the store's, and retrying the same step gives the uninterrupted run's numbers.
    path = tmp_path / "store"
    model = make_model()
    with open_optimizer(model, path) as opt:
        train_steps(model, opt, range(3))
        real_replace = store_module.Store.write_manifest
        calls = {"n": 0}

        def full_once(self: Any, manifest: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise errors.DiskFullError(errno.ENOSPC, "disk full (injected); free space", "manifest.json.tmp")
            real_replace(self, manifest)

        monkeypatch.setattr(store_module.Store, "write_manifest", full_once)
        loss_of(model, data()[3]).backward()
        with pytest.raises(nearstep.DiskFullError):
            opt.step()
        assert opt.stats()["step"] == 3
        opt.step()  # the gradients are still there: retry
        opt.zero_grad()
        train_steps(model, opt, range(4, STEPS))
    assert all(_same(a, b) for a, b in zip(_weights(model), reference.weights[STEPS]))


# ---------------------------------------------------------------------------
# 5. Malformed manifests (property-based)

NESTED = ["__nested__"]
odd_numbers = st.sampled_from([-1, 0, 2, 3, 2**31, 2**64, -2**63, 0.5, -0.0, 1e300])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture
def manifest_store(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "store"
    trained_store(path, 1)
    return path, json.loads((path / "manifest.json").read_text())


@st.composite
def malformed_manifests(draw: Any, valid: dict[str, Any]) -> bytes:
    """A valid manifest with one place changed, or arbitrary JSON, or bytes that are not UTF-8."""
    how = draw(st.sampled_from(["mutate", "mutate", "mutate", "arbitrary", "bytes", "truncate"]))
    text = json.dumps(valid)
    if how == "arbitrary":
        return json.dumps(draw(json_values)).encode()
    if how == "bytes":
        cut = draw(st.integers(0, len(text)))
        return text[:cut].encode() + draw(st.binary(min_size=1, max_size=8)) + b"\xff\xfe" + text[cut:].encode()
    if how == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))].encode()
    doc = copy.deepcopy(valid)
    parent: Any = doc
    key: Any = draw(st.sampled_from(sorted(doc)))
    while isinstance(parent[key], (dict, list)) and parent[key] and draw(st.booleans()):
        parent = parent[key]
        key = draw(st.sampled_from(sorted(parent))) if isinstance(parent, dict) else draw(st.integers(0, len(parent) - 1))
    kind = draw(st.sampled_from(["drop", "replace", "number", "nest"]))
    if kind == "drop":
        del parent[key]
    elif kind == "replace":
        parent[key] = draw(json_values)
    elif kind == "number":
        parent[key] = draw(odd_numbers | st.integers(-2**70, 2**70))
    else:  # a value nested deeper than Python's recursion limit, or nearly as deep
        parent[key] = NESTED
        depth = draw(st.integers(1, 3000))
        return json.dumps(doc).replace(json.dumps(NESTED), "[" * depth + "0" + "]" * depth).encode()
    return json.dumps(doc).encode()


def _read_and_open(path: Path) -> None:
    store_module.read_manifest(path)
    nearstep.Store.open(path).close()


@settings(max_examples=150, deadline=2000, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(st.data())
@example(None)
def test_malformed_manifests_raise_store_errors_only(manifest_store: tuple[Path, dict[str, Any]], data_: Any) -> None:
    path, valid = manifest_store
    blob = b"\xff\xfe{" + b"[" * 100_000 if data_ is None else data_.draw(malformed_manifests(valid))
    (path / "manifest.json").write_bytes(blob)
    try:
        _read_and_open(path)  # some mutations leave a valid manifest: then it opens
        event("outcome: opened")
    except nearstep.StoreError as exc:
        event(f"outcome: {type(exc).__name__}")
        assert "manifest.json" in str(exc), str(exc)
    # Any other exception (KeyError, TypeError, RecursionError, ...) fails the test.


@pytest.mark.parametrize("key, value", [("step", "1e999"), ("step", "Infinity"), ("created_at", "1" + "0" * 400),
                                        ("counters", '{"skipped_steps": -Infinity}')],
                         ids=["step=1e999", "step=Infinity", "created_at=10**400", "counter=-Infinity"])
def test_numbers_too_large_for_python_are_store_errors(manifest_store: tuple[Path, dict[str, Any]], key: str, value: str) -> None:
    path, valid = manifest_store
    doc = {**valid, key: NESTED}
    (path / "manifest.json").write_text(json.dumps(doc).replace(json.dumps(NESTED), value))
    with pytest.raises(nearstep.StoreCorruptError, match="manifest.json"):
        _read_and_open(path)


# ---------------------------------------------------------------------------
# The tally


def test_fault_injection_tally(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints ``fault injection: N trials, 0 lost`` (also without ``-s``); runs last."""
    if LEDGER.trials == 0:
        pytest.skip("no kill trial ran: run the whole module")
    with capsys.disabled():
        print(f"\nfault injection: {LEDGER.trials} trials, {len(LEDGER.lost)} lost")
    assert not LEDGER.lost, "\n".join(LEDGER.lost)
    leaked = _shm_files() - SHM_BEFORE
    assert not leaked, f"staging memory left in /dev/shm: {sorted(leaked)}"
