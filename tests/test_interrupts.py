"""Interrupts: Ctrl-C, kill -9 and interrupted store creation never cost more than the step in flight.

The trainer runs in a subprocess started in a session of its own, so it is its
own process group, like a terminal's foreground job: ``os.killpg(pgid, SIGINT)``
is exactly what Ctrl-C sends. Also here: ``python -m nearstep`` and the demo's
default store (replaced by each run, so stores do not pile up).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import nearstep
from nearstep import cli, demo
from nearstep.store import Store, read_manifest
from nearstep.data import Filter, MemoryCorpus
from nearstep.workloads import DedupSummary, TextSplit
from conftest import process_running, wait_gone

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)}
START_SECONDS = 120.0  # a cold start imports torch twice (trainer and device): generous for slow CI
GONE_SECONDS = 5.0  # the device must be gone this soon after its trainer

# A trainer that steps until it is interrupted or killed. It says "opening" before it
# makes the optimizer, prints the device's pid once it is open, and "looping" once
# three steps have returned (so step 2 at least is committed).
TRAINER = r"""
import json, sys
import torch
from torch import nn
import nearstep

store, mode = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
if len(sys.argv) > 3:  # "poll": say when the trainer starts waiting for its device to come up
    import multiprocessing.connection as mpc
    original = mpc.Connection.poll
    def poll(self, *args):
        print("polling", flush=True)
        mpc.Connection.poll = original
        return original(self, *args)
    mpc.Connection.poll = poll
print("opening", flush=True)
opt = nearstep.AdamW(model.named_parameters(), lr=1e-2, store=store, model=model, mode=mode, slice_mb=0.001)
print(json.dumps({"device_pid": opt.device.info.pid}), flush=True)
step = 0
while True:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    step += 1
    if step == 3:
        print("looping", flush=True)
"""


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))




def _ignores_sigint(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    raise AssertionError(f"no SigIgn line for process {pid}")


class Trainer:
    """The trainer script in a subprocess and session of its own; output goes to files."""

    def __init__(self, tmp_path: Path, mode: str = "overlap", *extra: str) -> None:
        self.store = tmp_path / "store"
        script = tmp_path / "trainer.py"
        script.write_text(TRAINER)
        self.out, self.err = tmp_path / "stdout", tmp_path / "stderr"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(script), str(self.store), mode, *extra],
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=ENV,
                                         start_new_session=True)

    def wait_for(self, line: str, timeout: float = START_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.out.read_text().splitlines():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the trainer never said {line!r}; its stderr:\n{self.err.read_text()}")
            time.sleep(0.005)

    def device_pid(self) -> int:
        self.wait_for("looping")
        return next(json.loads(line)["device_pid"] for line in self.out.read_text().splitlines() if line.startswith("{"))

    def stderr(self) -> str:
        return self.err.read_text()

    def exit_code(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the trainer did not exit within {timeout:.0f} s; its stderr:\n{self.stderr()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def trainers():
    started: list[Trainer] = []
    yield started
    for t in started:  # a failed assertion must not leave a trainer stepping forever
        t.kill()


def _assert_committed_and_sound(store: Path, at_least: int) -> None:
    assert read_manifest(store).step >= at_least
    with Store.open(store) as opened:  # also: no process holds the lock any more
        assert opened.verify() == []


# ---------------------------------------------------------------------------
# (a) Ctrl-C: one KeyboardInterrupt, the store at its last committed step


@pytest.mark.parametrize("mode", ["sync", "overlap"])
def test_ctrl_c_stops_the_run_with_one_keyboard_interrupt(mode: str, tmp_path: Path, trainers: list[Trainer]) -> None:
    run = Trainer(tmp_path, mode)
    trainers.append(run)
    device_pid = run.device_pid()
    # The device is outside the terminal's process group, and ignores SIGINT besides.
    assert os.getpgid(device_pid) != os.getpgid(run.proc.pid)
    assert os.getsid(device_pid) != os.getsid(run.proc.pid)
    assert _ignores_sigint(device_pid)
    time.sleep(0.2)  # well inside the loop of steps
    os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    code = run.exit_code()
    err = run.stderr()
    assert code == -signal.SIGINT, err  # Python exits "by SIGINT" after an unhandled KeyboardInterrupt
    assert err.count("KeyboardInterrupt") == 1 and err.count("Traceback") == 1, err
    assert "DeviceDiedError" not in err and "DeviceError" not in err, err
    assert wait_gone(device_pid, GONE_SECONDS)
    _assert_committed_and_sound(run.store, at_least=2)


def test_ctrl_c_while_the_device_starts_leaves_the_store_free(tmp_path: Path, trainers: list[Trainer]) -> None:
    run = Trainer(tmp_path, "overlap", "poll")
    trainers.append(run)
    run.wait_for("polling")  # the store exists; the device process is importing torch
    os.killpg(run.proc.pid, signal.SIGINT)
    run.exit_code()
    err = run.stderr()
    assert err.count("KeyboardInterrupt") == 1 and err.count("Traceback") == 1, err
    assert "DeviceDiedError" not in err, err
    # At once, not after the device notices: the trainer stopped the device it was starting.
    model = _model()
    with nearstep.AdamW(model.named_parameters(), lr=1e-2, store=run.store, device="inline", slice_mb=0.001) as opt:
        assert opt.stats()["step"] == 0


# ---------------------------------------------------------------------------
# (b) kill -9 of the trainer: the device exits by itself, quietly


def test_killing_the_trainer_stops_its_device(tmp_path: Path, trainers: list[Trainer]) -> None:
    run = Trainer(tmp_path, "overlap")
    trainers.append(run)
    device_pid = run.device_pid()
    assert process_running(device_pid)
    os.kill(run.proc.pid, signal.SIGKILL)  # the trainer only: its device is in another session
    assert run.exit_code() == -signal.SIGKILL
    assert wait_gone(device_pid, GONE_SECONDS), f"device process {device_pid} outlived its trainer"
    assert "Traceback" not in run.stderr(), run.stderr()  # the device shares this stderr
    _assert_committed_and_sound(run.store, at_least=2)


# ---------------------------------------------------------------------------
# (c) an interrupted creation does not block the next run; foreign files are refused


def _interrupted_creation(path: Path) -> None:
    """What a creation killed before its first commit leaves behind."""
    (path / "slices").mkdir(parents=True)
    (path / "LOCK").write_text("999999\n")
    (path / "slices" / "s000000.g0").write_bytes(b"\1" * 4096)
    (path / "slices" / "s000000.g1").write_bytes(b"")
    (path / "manifest.json.tmp").write_text('{"step": 0, "trunc')


def _train_one_step(path: Path) -> int:
    model = _model()
    with nearstep.AdamW(model.named_parameters(), lr=1e-2, store=path, device="inline", slice_mb=0.001) as opt:
        nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
        opt.step()
    return read_manifest(path).step


def test_an_interrupted_creation_does_not_block_the_next_run(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _interrupted_creation(store)
    assert _train_one_step(store) == 1
    assert not (store / "manifest.json.tmp").exists()
    with Store.open(store) as opened:
        assert opened.verify() == []
        assert (store / "slices" / "s000000.g0").stat().st_size == opened.manifest.slice_file_bytes(0)


@pytest.mark.parametrize("foreign", ["notes.txt", "slices/notes.txt", "slices/s000000.g2", "slices/sub/"])
def test_foreign_files_beside_an_interrupted_creation_are_refused_and_kept(foreign: str, tmp_path: Path) -> None:
    store = tmp_path / "store"
    _interrupted_creation(store)
    if foreign.endswith("/"):
        (store / foreign).mkdir()
    else:
        (store / foreign).write_text("mine")
    before = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    with pytest.raises(nearstep.StoreError, match="not empty") as caught:
        _train_one_step(store)
    assert foreign.rstrip("/") in str(caught.value)  # it names what is in the way
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*")) == before  # nothing was deleted


def test_a_creation_in_progress_is_not_cleared(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _interrupted_creation(store)
    import fcntl

    holder = os.open(store / "LOCK", os.O_RDWR)  # a live creator: flock is per open file, so this one conflicts
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(nearstep.StoreLockedError, match="in use by process"):
            _train_one_step(store)
        assert (store / "slices" / "s000000.g0").read_bytes() == b"\1" * 4096
        assert (store / "manifest.json.tmp").exists()
    finally:
        os.close(holder)
    assert _train_one_step(store) == 1  # once the creator is gone, the leftovers go


CREATOR = r"""
import sys, time
import torch
from nearstep.store import ParamSpec, Store

params = tuple(ParamSpec(f"p{i}", (1024,), "float32", 0) for i in range(4))
def masters(i):
    if i == 1:  # slices are written in backward order: p3, p2 are on disk by now
        print("inside", flush=True)
        time.sleep(60)
    return torch.ones(1024)
Store.create(sys.argv[1], params=params, masters=masters, optimizer="adamw", state_names=("exp_avg", "exp_avg_sq"),
             hyperparameters=[{"lr": 1e-3}], slice_bytes=4096)
"""


def test_a_creation_killed_midway_does_not_block_the_next_run(tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", CREATOR, str(store)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "inside", proc.stderr
        assert list((store / "slices").iterdir()) and not (store / "manifest.json").exists()
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    model = nn.Sequential(*[nn.Linear(32, 32, bias=False) for _ in range(4)])  # not even the same model
    with nearstep.AdamW(model.parameters(), lr=1e-2, store=store, device="inline") as opt:
        assert opt.stats()["step"] == 0
    assert read_manifest(store).params[0].shape == (32, 32)


# ---------------------------------------------------------------------------
# (d) python -m nearstep is the nearstep command


def test_python_dash_m_nearstep_is_the_nearstep_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    _train_one_step(store)
    as_module = subprocess.run([sys.executable, "-m", "nearstep", "inspect", str(store)], capture_output=True,
                               text=True, timeout=120, env=ENV)
    assert as_module.returncode == 0, as_module.stderr
    assert cli.main(["inspect", str(store)]) == 0
    assert as_module.stdout == capsys.readouterr().out
    assert f"{store}" in as_module.stdout
    script = shutil.which("nearstep")
    if script is not None:  # the console script, where installed on PATH
        command = subprocess.run([script, "inspect", str(store)], capture_output=True, text=True, timeout=120, env=ENV)
        assert (command.returncode, command.stdout) == (0, as_module.stdout)


@pytest.mark.parametrize("argv, code", [(["--help"], 0), ([], 2), (["verify", "/nonexistent/store"], None)])
def test_python_dash_m_nearstep_exit_codes(argv: list[str], code: int | None, capsys: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "nearstep", *argv], capture_output=True, text=True, timeout=120, env=ENV)
    expected = cli.main(list(argv)) if code is None else code
    capsys.readouterr()
    assert done.returncode == expected, done.stderr
    if argv == ["--help"]:
        assert done.stdout.startswith("usage: nearstep")
    if code is None:
        assert expected != 0  # a missing store is an error, the same through both doors


# ---------------------------------------------------------------------------
# (e) the demo's default store: one directory, replaced by each run without --store


def test_replace_demo_store_deletes_only_an_unlocked_nearstep_store(tmp_path: Path) -> None:
    path = tmp_path / ".nearstep" / "demo"
    assert demo.replace_demo_store(path) == path and not path.exists()  # nothing there: nothing made
    _train_one_step(path)
    with Store.open(path):  # in use: refused, and kept
        with pytest.raises(nearstep.StoreLockedError, match=f"in use by process {os.getpid()}"):
            demo.replace_demo_store(path)
    assert read_manifest(path).step == 1
    assert demo.replace_demo_store(path) == path and not path.exists()


def test_replace_demo_store_leaves_what_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "demo"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    assert demo.replace_demo_store(path) == path
    assert (path / "notes.txt").read_text() == "mine"  # no manifest: not deleted (Store.create refuses it)
    with pytest.raises(nearstep.StoreError, match="not empty"):
        _train_one_step(path)
    file = tmp_path / "file"
    file.write_text("mine")
    with pytest.raises(nearstep.StoreError, match="not a directory"):
        demo.replace_demo_store(file)
    assert file.read_text() == "mine"
    interrupted = tmp_path / "interrupted"
    _interrupted_creation(interrupted)
    assert demo.replace_demo_store(interrupted) == interrupted  # left to Store.create, which clears it
    assert _train_one_step(interrupted) == 1


class _TinyClassifier(nn.Module):
    """Stands in for MiniLM: the demo's param groups (decay, LayerNorm, head) in a few hundred parameters."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.LayerNorm = nn.LayerNorm(16)
        self.head = nn.Linear(16, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.LayerNorm(self.embed(input_ids).mean(1)))


def _tiny_tokenize(_tokenizer: object, texts, seq_len: int) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[int(w) for w in t.split()][:seq_len] for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def tiny_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The demo on a tiny model and data, run from ``tmp_path`` (its default store is ./.nearstep/demo)."""
    g = torch.Generator().manual_seed(0)
    labels = [i % 3 for i in range(50)]
    texts = tuple(" ".join(str(int(x)) for x in torch.randint(0, 32, (8,), generator=g) + 0 * y) for y in labels)
    split = lambda a, b: TextSplit(texts[a:b], tuple(labels[a:b]), ("a", "b", "c"))  # noqa: E731
    report = Filter(MemoryCorpus(list(texts)), state_dir=tmp_path / "scan").scan()
    none = TextSplit((), (), ("a", "b", "c"))
    monkeypatch.setattr(demo, "load_bbc_news_deduplicated",
                        lambda _state: (split(0, 40), split(40, 50), DedupSummary(report, 10, none, none)))
    monkeypatch.setattr(demo, "load_minilm_classifier", lambda classes: (_TinyClassifier(classes), None))
    monkeypatch.setattr(demo, "tokenize", _tiny_tokenize)
    monkeypatch.chdir(tmp_path)
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    yield tmp_path
    os.sched_setaffinity(0, affinity)  # the demo pins its process to the training cores
    torch.set_num_threads(threads)


def _run_demo(capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    rc = demo.main(["--steps", "2", "--batch", "4", "--seq-len", "8", "--eval-docs", "8", "--no-progress", *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_demo_names_the_real_committed_step_and_replaces_its_default_store(tiny_demo: Path, capsys) -> None:
    store = Path(".nearstep") / "demo"
    rc, out, err = _run_demo(capsys, "--compare-steps", "1")
    assert rc == 0, err
    last = out.strip().splitlines()[-1]
    # 2 steps, then the timing table's warm-up and timed step of sync and of overlap.
    assert read_manifest(store).step == 6
    assert last.startswith(f"store: {store} (committed step 6); run again with --store {store} to continue it"), last
    assert "without --store replaces it" in last
    first_id = read_manifest(store).store_id

    rc, out, err = _run_demo(capsys, "--compare-steps", "0")  # a second run: a new store in the same place
    assert rc == 0, err
    assert read_manifest(store).step == 2 and read_manifest(store).store_id != first_id
    assert sorted(p.name for p in (tiny_demo / ".nearstep").iterdir() if p.is_dir()) == ["demo"]  # no pile-up
    assert "(committed step 2)" in out.strip().splitlines()[-1]

    rc, out, err = _run_demo(capsys, "--compare-steps", "0", "--store", str(store))  # --store continues it
    assert rc == 0, err
    last = out.strip().splitlines()[-1]
    assert read_manifest(store).step == 4 and "(committed step 4)" in last and "replaces" not in last


def test_demo_refuses_to_replace_a_store_in_use(tiny_demo: Path, capsys) -> None:
    store = Path(".nearstep") / "demo"
    _train_one_step(store)
    with Store.open(store):
        rc, out, err = _run_demo(capsys)
    assert rc == 2 and "in use by process" in err and "--store" in err, err
    assert read_manifest(store).step == 1  # untouched
