"""Framework checkpoints: reference state dicts, the store snapshots they name, and bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import nearstep
from nearstep import checkpoint
from nearstep.store import read_manifest
from conftest import batches, loss_of, make_model

SLICE_MB = 0.004  # ~1000 fp32 params per slice: several slices, split parameters


def train(model: nn.Module, opt: torch.optim.Optimizer, data) -> None:
    for batch in data:
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad()


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"parameter {i} differs by up to {(a - b).abs().max().item()}"


def make_opt(model: nn.Module, store: Path, backend: str = "inline", mode: str = "sync", **kw) -> nearstep.AdamW:
    extra = {"model": model} if mode != "sync" else {}
    return nearstep.AdamW(model.named_parameters(), lr=1e-2, store=store, device=backend, slice_mb=SLICE_MB,
                          mode=mode, **extra, **kw)


def saved_types(obj: object) -> set[type]:
    if isinstance(obj, dict):
        return {dict} | set().union(*(saved_types(k) | saved_types(v) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return {type(obj)} | set().union(*(saved_types(v) for v in obj))
    return {type(obj)}


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("mode", ["sync", "overlap"])
def test_reference_round_trip_is_bit_for_bit(backend: str, mode: str, tmp_path: Path) -> None:
    data = batches(12)
    model = make_model()
    with make_opt(model, tmp_path / "s", backend, mode) as opt:
        train(model, opt, data[:4])
        sd = opt.state_dict()
        at_save = weights(model)
        torch.save(sd, tmp_path / "optimizer.pt")
        train(model, opt, data[4:10])
        opt.synchronize()  # overlap mode: the last step's weights land before we read them
        first = weights(model)
        assert opt.stats()["step"] == 10
        opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
        assert opt.stats()["step"] == 4
        assert_bitwise(weights(model), at_save)  # the snapshot's masters are the model's weights again
        train(model, opt, data[4:10])
        opt.synchronize()
        assert_bitwise(weights(model), first)
    # A reference, not the state: nothing per parameter, and a file of a few KiB.
    assert sd["state"] == {}
    assert sd["nearstep"]["layout"] == "reference" and sd["nearstep"]["step"] == 4
    assert os.path.getsize(tmp_path / "optimizer.pt") < 16 << 10


def test_resume_on_a_new_optimizer_over_the_same_store(backend: str, tmp_path: Path) -> None:
    data = batches(12)
    model = make_model()
    with make_opt(model, tmp_path / "s", backend) as opt:
        train(model, opt, data[:5])
        torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
        at_save = weights(model)
        train(model, opt, data[5:9])
        first = weights(model)
    resumed = make_model(seed=3)
    with make_opt(resumed, tmp_path / "s", backend) as opt:
        assert opt.stats()["step"] == 9  # the store's own last commit
        opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
        assert opt.stats()["step"] == 5
        assert_bitwise(weights(resumed), at_save)
        train(resumed, opt, data[5:9])
    assert_bitwise(weights(resumed), first)
    with nearstep.Store.open(tmp_path / "s") as store:
        assert store.manifest.step == 9


@pytest.mark.parametrize("state_format", ["bf16-sr+8bit", "bf16-kahan"])
def test_reference_round_trip_with_a_lossy_state_format(state_format: str, tmp_path: Path) -> None:
    data = batches(10)
    model = make_model()
    with make_opt(model, tmp_path / "s", state_format=state_format) as opt:
        train(model, opt, data[:4])
        sd = opt.state_dict()
        train(model, opt, data[4:8])
        first, first_state = weights(model), opt.full_state_dict()["state"]
        opt.load_state_dict(sd)
        train(model, opt, data[4:8])
        again = opt.full_state_dict()["state"]
    assert_bitwise(weights(model), first)
    for i, entry in first_state.items():
        for name, value in entry.items():
            assert torch.equal(again[i][name], value), (i, name)


def test_reference_to_the_current_state_restores_only_hyperparameters(tmp_path: Path) -> None:
    model = make_model()
    with make_opt(model, tmp_path / "s") as opt:
        train(model, opt, batches(3))
        sd = opt.state_dict()
        masters = weights(model)
        committed = opt.device.manifest()
        opt.param_groups[0]["lr"] = 5e-4
        with torch.no_grad():
            model.proj.weight.zero_()  # the model was changed since: the store's masters win
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 1e-2
        assert_bitwise(weights(model), masters)
        after = opt.device.manifest()
    # Nothing was written: the same commit (generations and time) as before the load.
    assert (after.committed, after.committed_at, after.step) == (committed.committed, committed.committed_at, 3)
    assert len(checkpoint.list_snapshots(tmp_path / "s")) == 1


def test_hyperparameters_come_back_with_the_reference(tmp_path: Path) -> None:
    model = make_model()
    with make_opt(model, tmp_path / "s") as opt:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for batch in batches(3):
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        sd = opt.state_dict()
        lr_at_save = opt.param_groups[0]["lr"]
        train(model, opt, batches(2, seed=7))
        opt.param_groups[0]["lr"] = 123.0
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == lr_at_save == 5e-3
        assert opt.param_groups[0]["initial_lr"] == 1e-2  # what the scheduler put there
        assert opt.device.manifest().hyperparameters[0]["lr"] == lr_at_save  # committed with the restored state


# ---------------------------------------------------------------------------
# snapshots


def test_snapshot_is_a_valid_store_of_the_committed_step(backend: str, tmp_path: Path) -> None:
    model = make_model()
    with make_opt(model, tmp_path / "s", backend) as opt:
        train(model, opt, batches(4))
        sd = opt.state_dict()
        full = opt.full_state_dict()["state"]
        train(model, opt, batches(3, seed=2))  # rewrites both generations of the store
        path = Path(sd["nearstep"]["snapshot"]["path"])
        assert path.parent == (tmp_path / "s" / checkpoint.SNAPSHOTS).resolve()
        assert path.name.startswith("step-000004-")
    report = nearstep.verify_store(path)
    assert report.ok and report.step == 4, report.problems
    with nearstep.Store.open(path) as snap:
        assert snap.manifest.store_id == sd["nearstep"]["store_id"]
        state = snap.read_params(snap.manifest.state_names)
        # Only the committed generation takes disk space: the spare one is sparse.
        for spec in snap.manifest.slices:
            spare = snap.slice_path(spec.index, snap.manifest.committed[spec.index].generation ^ 1)
            assert spare.stat().st_size == snap.manifest.slice_file_bytes(spec.index)
            assert spare.stat().st_blocks == 0
    for i, entry in full.items():
        for name in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name][i], entry[name].reshape(-1)), (i, name)
    info = json.loads((path / checkpoint.SNAPSHOT_INFO).read_text())
    assert info["step"] == 4 and info["digest"] == sd["nearstep"]["snapshot"]["digest"]


def test_the_same_state_twice_reuses_its_snapshot(tmp_path: Path) -> None:
    model = make_model()
    with make_opt(model, tmp_path / "s") as opt:
        train(model, opt, batches(2))
        a = opt.state_dict()
        b = opt.state_dict()
        assert a["nearstep"]["snapshot"] == b["nearstep"]["snapshot"]
        assert [s.step for s in checkpoint.list_snapshots(tmp_path / "s")] == [2]


def test_a_rewound_run_at_the_same_step_gets_its_own_snapshot(tmp_path: Path) -> None:
    model = make_model()
    with make_opt(model, tmp_path / "s") as opt:
        train(model, opt, batches(2))
        at2 = opt.state_dict()
        train(model, opt, batches(1, seed=4))
        opt.load_state_dict(at2)
        train(model, opt, batches(1, seed=5))  # step 3 again, from other data
        at3b = opt.state_dict()
        assert at3b["nearstep"]["step"] == 3
        names = [s.path.name for s in checkpoint.list_snapshots(tmp_path / "s")]
        assert len(names) == 2 and at3b["nearstep"]["snapshot"]["name"] in names


def test_old_snapshots_are_pruned_and_their_checkpoints_fail_loudly(tmp_path: Path) -> None:
    model = make_model()
    with make_opt(model, tmp_path / "s") as opt:
        assert opt.keep_snapshots == checkpoint.DEFAULT_KEEP_SNAPSHOTS == 2
        saved = []
        for batch in batches(3):
            train(model, opt, [batch])
            saved.append(opt.state_dict())
        assert [s.step for s in checkpoint.list_snapshots(tmp_path / "s")] == [2, 3]
        assert not Path(saved[0]["nearstep"]["snapshot"]["path"]).exists()
        before = weights(model)
        with pytest.raises(nearstep.StoreError) as caught:
            opt.load_state_dict(saved[0])
        message = str(caught.value)
        assert saved[0]["nearstep"]["snapshot"]["path"] in message
        assert "does not exist" in message and "keep_snapshots" in message and "kept along with" in message
        # Nothing changed.
        assert opt.stats()["step"] == 3
        assert_bitwise(weights(model), before)
        opt.load_state_dict(saved[1])  # the kept ones still load
        assert opt.stats()["step"] == 2
        opt.keep_snapshots = 1
        opt.state_dict()
        assert len(checkpoint.list_snapshots(tmp_path / "s")) == 1
        with pytest.raises(ValueError, match="keep_snapshots"):
            opt.keep_snapshots = 0


def test_an_interrupted_snapshot_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    with make_opt(model, tmp_path / "s") as opt:
        train(model, opt, batches(2))
        copied = []

        def copy_then_fail(src: Path, dst: Path, nbytes: int) -> None:
            if copied:
                raise OSError(28, "No space left on device")  # the second file: disk full
            copied.append(src)
            real_copy(src, dst, nbytes)

        real_copy = checkpoint.copy_file
        monkeypatch.setattr(checkpoint, "copy_file", copy_then_fail)
        with pytest.raises(nearstep.DiskFullError, match="keep_snapshots"):
            opt.state_dict()
        assert list((tmp_path / "s" / checkpoint.SNAPSHOTS).iterdir()) == []  # no partial snapshot
        monkeypatch.setattr(checkpoint, "copy_file", real_copy)
        # A crash mid-copy leaves a temporary directory: the next snapshot removes it.
        leftover = tmp_path / "s" / checkpoint.SNAPSHOTS / ".tmp-step-000002-dead-1"
        leftover.mkdir()
        sd = opt.state_dict()
        assert [p.name for p in (tmp_path / "s" / checkpoint.SNAPSHOTS).iterdir()] == [sd["nearstep"]["snapshot"]["name"]]
        train(model, opt, batches(1))
        assert opt.stats()["step"] == 3  # training goes on


# ---------------------------------------------------------------------------
# other stores, other layouts


def test_a_snapshot_restores_into_a_different_store(backend: str, tmp_path: Path) -> None:
    data = batches(10)
    model = make_model()
    with make_opt(model, tmp_path / "a", backend) as opt:
        train(model, opt, data[:4])
        torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
        at_save, state_at_save = weights(model), opt.full_state_dict()["state"]
        train(model, opt, data[4:8])
        first = weights(model)
    other = make_model(seed=9)
    with make_opt(other, tmp_path / "b", backend) as opt:  # another store id, the same parameters
        opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
        assert opt.stats()["step"] == 4
        assert_bitwise(weights(other), at_save)
        train(other, opt, data[4:8])
    assert_bitwise(weights(other), first)
    # A store sliced differently: the snapshot is re-sliced, slice by slice, exactly.
    resliced = make_model(seed=10)
    with nearstep.AdamW(resliced.named_parameters(), lr=1e-2, store=tmp_path / "c", device=backend, slice_mb=0.0015) as opt:
        assert len(opt.store.manifest.slices) > len(read_manifest(tmp_path / "a").slices)
        opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
        assert_bitwise(weights(resliced), at_save)
        state = opt.full_state_dict()["state"]
        assert state.keys() == state_at_save.keys()
        for i, entry in state_at_save.items():
            for name, value in entry.items():
                assert torch.equal(state[i][name], value), (i, name)
        train(resliced, opt, data[4:8])
    # Other slices cut the kernels' vectorised loops elsewhere: equal to rounding, not to the bit.
    for a, b in zip(weights(resliced), first):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_snapshot_of_another_model_is_refused(tmp_path: Path) -> None:
    model = make_model()
    with make_opt(model, tmp_path / "a") as opt:
        train(model, opt, batches(2))
        sd = opt.state_dict()
    torch.manual_seed(0)
    other = nn.Sequential(nn.Embedding(64, 24), nn.Linear(24, 40), nn.LayerNorm(40), nn.Linear(40, 5))  # same count
    with nearstep.AdamW(other.parameters(), lr=1e-2, store=tmp_path / "b", device="inline") as opt:
        before = weights(other)
        with pytest.raises(nearstep.StoreMismatchError, match="different model"):
            opt.load_state_dict(sd)
        assert opt.stats()["step"] == 0
        assert_bitwise(weights(other), before)
    with nearstep.SGD(make_model().parameters(), lr=1e-2, store=tmp_path / "c", device="inline") as sgd:
        with pytest.raises(nearstep.StoreMismatchError, match="adamw"):
            sgd.load_state_dict(sd)


def test_a_reference_is_plain_data_for_weights_only_loading(tmp_path: Path) -> None:
    model = make_model()
    with make_opt(model, tmp_path / "s") as opt:
        train(model, opt, batches(2))
        sd = opt.state_dict()
    assert saved_types(sd) <= {dict, list, tuple, str, int, float, bool, type(None)}
    torch.save(sd, tmp_path / "optimizer.pt")
    assert torch.load(tmp_path / "optimizer.pt", weights_only=True) == sd
    # torch.optim takes it too (LR schedulers and frameworks read param_groups); it has no state to give.
    ref = torch.optim.AdamW(make_model().parameters(), lr=1e-3)
    ref.load_state_dict(sd)
    assert ref.param_groups[0]["lr"] == 1e-2 and ref.state_dict()["state"] == {}


def test_the_full_layout_still_round_trips(backend: str, tmp_path: Path) -> None:
    data = batches(10)
    model = make_model()
    with make_opt(model, tmp_path / "a", backend) as opt:
        train(model, opt, data[:4])
        full = opt.full_state_dict()
        torch.save(full, tmp_path / "full.pt")
        train(model, opt, data[4:8])
        first = weights(model)
    assert full["nearstep"]["layout"] == "full" and set(full["state"][0]) == {"step", "master", "exp_avg", "exp_avg_sq"}
    assert not (tmp_path / "a" / checkpoint.SNAPSHOTS).exists()  # full_state_dict takes no snapshot
    other = make_model(seed=4)
    with make_opt(other, tmp_path / "b", backend) as opt:
        opt.load_state_dict(torch.load(tmp_path / "full.pt", weights_only=True))
        assert opt.stats()["step"] == 4
        train(other, opt, data[4:8])
    assert_bitwise(weights(other), first)
    # An older release's full state dict has no "layout": still the full layout.
    legacy = dict(full, nearstep={k: v for k, v in full["nearstep"].items() if k != "layout"})
    assert not checkpoint.is_reference(legacy)
    with make_opt(make_model(seed=6), tmp_path / "c") as opt:
        opt.load_state_dict(legacy)
        assert opt.stats()["step"] == 4
    ref = torch.optim.AdamW(make_model().parameters(), lr=1e-2)
    ref.load_state_dict(full)
    assert float(ref.state_dict()["state"][0]["step"]) == 4


# ---------------------------------------------------------------------------
# through the frameworks


class _Classifier(nn.Module):
    """TinyNet with the (inputs, labels) -> {"loss"} interface HF Trainer calls."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(tokens)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_hf_trainer_resumes_from_a_reference_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    g = torch.Generator().manual_seed(1)
    data = [{"tokens": torch.randint(0, 64, (6,), generator=g), "labels": torch.randint(0, 5, (), generator=g)}
            for _ in range(64)]

    def run(out: Path, resume: Path | None = None) -> list[torch.Tensor]:
        model = _Classifier()
        opt = nearstep.AdamW(model.named_parameters(), lr=1e-2, store=tmp_path / "store", device="inline", slice_mb=SLICE_MB)
        args = transformers.TrainingArguments(str(out), max_steps=8, per_device_train_batch_size=8, save_strategy="steps",
                                              save_steps=4, logging_steps=100, report_to=[], use_cpu=True, seed=0,
                                              disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)  # loads with weights_only=True
        opt.close()
        return weights(model)

    first = run(tmp_path / "a")
    saved = torch.load(tmp_path / "a" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert saved["state"] == {} and saved["nearstep"]["step"] == 4
    # The same store (now at step 8) resumed from checkpoint-4: the snapshot is restored.
    assert_bitwise(run(tmp_path / "b", resume=tmp_path / "a" / "checkpoint-4"), first)


def test_lightning_resumes_from_a_reference_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    data = batches(4)  # an epoch of 4 steps: Lightning resumes a plain DataLoader at an epoch boundary

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, batch, _index):
            return loss_of(self.net, batch)

        def configure_optimizers(self):
            self.opt = nearstep.AdamW(self.net.named_parameters(), lr=1e-2, store=tmp_path / "store", device="inline",
                                      slice_mb=SLICE_MB)
            return self.opt

    def run(root: Path, ckpt: Path | None = None) -> list[torch.Tensor]:
        module = Module()
        every4 = pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=4, save_top_k=-1, filename="{step}")
        trainer = pl.Trainer(default_root_dir=root, max_steps=8, accelerator="cpu", logger=False, callbacks=[every4],
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None), ckpt_path=ckpt)
        module.opt.close()
        return weights(module.net)

    first = run(tmp_path / "a")
    assert_bitwise(run(tmp_path / "b", ckpt=tmp_path / "a" / "step=4.ckpt"), first)


# ---------------------------------------------------------------------------
# host memory

# The child prints how much each process's peak RSS rose over its RSS just before
# each operation (/proc/PID/clear_refs "5" resets the peak). Large buffers are
# mmapped and returned to the system when freed (MALLOC_MMAP_THRESHOLD_), so the
# peak is what was live at once, not what glibc's heap happened to keep.
_MEMORY_CHILD = """
import json, sys
import torch
from torch import nn
import nearstep

def rss(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def peak_rise(fn, pids):
    before = {pid: rss(pid, "VmRSS") for pid in pids}
    for pid in pids:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    fn()
    return max(rss(pid, "VmHWM") - before[pid] for pid in pids)

store, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(3)])  # 12.6M parameters: 151 MB of AdamW state
opt = nearstep.AdamW(model.parameters(), lr=1e-3, store=store, slice_mb=2,
                     device=nearstep.DeviceConfig(backend="emulated", memory_budget="64MiB"))
x = torch.randn(4, 2048)

def step():
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

pids = ["self", opt.device.info.pid]  # the training process and the device process
step()
save = peak_rise(lambda: torch.save(opt.state_dict(), out + ".ref.pt"), pids)
step()  # the store moves on: loading must restore the snapshot
load = peak_rise(lambda: opt.load_state_dict(torch.load(out + ".ref.pt", weights_only=True)), pids)
restored = opt.stats()["step"]

def full():
    torch.save(opt.full_state_dict(), out + ".full.pt")
    opt.load_state_dict(torch.load(out + ".full.pt", weights_only=True))

full_rise = peak_rise(full, pids)
print(json.dumps({"save": save, "load": load, "full": full_rise, "restored_step": restored,
                  "state_bytes": opt.device.manifest().state_bytes}))
opt.close()
"""


def test_checkpoint_host_memory_is_bounded_by_slices_not_by_the_state(tmp_path: Path) -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here ({exc}); the measurement needs Linux's /proc/PID/clear_refs")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_MEMORY_CHILD))
    src = str(Path(nearstep.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p),
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "s"), str(tmp_path / "ckpt")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    state = got["state_bytes"]
    assert state > 150 * 10**6 and got["restored_step"] == 1
    # The reference path holds a few slices at a time (a slice of 2 MiB of masters has
    # 6 MiB of AdamW state; the decoded snapshot slices, the one being sent and the
    # device's copy of it come to ~25-40 MB), whatever the model's size; the full
    # layout holds all of the state and more. A third of the state sits between them
    # with room on both sides, and also under the device's 64 MiB memory_budget.
    bound = min(state // 3, 64 << 20)
    assert got["save"] < bound, got
    assert got["load"] < bound, got
    assert got["full"] > state > bound, got  # the measurement sees a whole state in memory
