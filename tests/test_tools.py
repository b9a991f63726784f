"""Store tools: inspect, verify, export, resume; through ``nearstep.cli.main`` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import nearstep
from nearstep import cli
from nearstep.store import Store, read_manifest

from conftest import batches, loss_of, make_model

SLICE_MB = 0.004  # about 1000 fp32 elements a slice: TinyNet's embedding is split across slices
HERE = Path(__file__).resolve().parent


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, data: list) -> None:
    for batch in data:
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A closed AdamW store at step 3, made from named parameters."""
    path = tmp_path / "s"
    model = make_model()
    with nearstep.AdamW(model.named_parameters(), store=path, device="inline", slice_mb=SLICE_MB) as opt:
        train(model, opt, batches(3))
    return path


def committed_file(path: Path, k: int) -> Path:
    manifest = read_manifest(path)
    return Store(path, manifest, lock_fd=-1).slice_path(k, manifest.committed[k].generation)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file() and f.name != "LOCK"}


# -- inspect -----------------------------------------------------------------


def test_inspect_prints_every_field(store: Path, capsys) -> None:
    before = snapshot(store)
    assert cli.main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    manifest = read_manifest(store)
    for expected in (f"store id     {manifest.store_id}", "in use       no", "optimizer    adamw (nearstep.AdamW)",
                     "step         3", "state        master, exp_avg, exp_avg_sq", "per generation",
                     "for the two generations", "allocated on disk", f"slices       {len(manifest.slices)}",
                     "skipped_steps 0", "spike_clipped 0", "update_clipped 0", "group 0: ", "lr=0.001",
                     "embed.weight  [64, 24]  float32  1,536", "embed.weight[0:"):
        assert expected in out, expected
    committed = out.split("committed    ")[1].split()[0]
    assert abs(datetime.fromisoformat(committed).timestamp() - manifest.committed_at) < 1
    assert snapshot(store) == before  # read only


def test_inspect_json_has_the_same_fields(store: Path, capsys) -> None:
    assert cli.main(["inspect", str(store), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    manifest = read_manifest(store)
    assert doc["step"] == 3 and doc["optimizer"] == "adamw" and doc["store_id"] == manifest.store_id
    assert doc["in_use"] is False and doc["lock_holder_pid"] is None
    assert [p["name"] for p in doc["params"]] == [n for n, _ in make_model().named_parameters()]
    assert doc["params"][0] == {"name": "embed.weight", "shape": [64, 24], "dtype": "float32", "numel": 1536,
                                "group": 0, "steps": 3}
    assert doc["sizes"]["state_bytes_per_generation"] == manifest.state_bytes
    assert doc["sizes"]["store_bytes_two_generations"] == 2 * manifest.state_bytes
    assert doc["sizes"]["disk_bytes"] >= 2 * manifest.state_bytes
    assert doc["sizes"]["slice_count"] == len(doc["slices"]) == len(manifest.slices)
    assert sum(s["file_bytes"] for s in doc["slices"]) == manifest.state_bytes
    assert doc["counters"] == {"skipped_steps": 0, "spike_clipped": 0, "spike_checked": 0, "update_clipped": 0}
    assert doc["hyperparameters"][0]["lr"] == 1e-3
    assert datetime.fromisoformat(doc["committed_at"]).timestamp() == pytest.approx(manifest.committed_at, abs=1)


def test_a_store_in_use_is_inspected_without_its_lock_and_refused_by_verify(tmp_path: Path, capsys) -> None:
    model = make_model()
    path = tmp_path / "s"
    with nearstep.AdamW(model.named_parameters(), store=path, device="inline", slice_mb=SLICE_MB) as opt:
        train(model, opt, batches(1))
        assert cli.main(["inspect", str(path)]) == 0
        assert f"in use       yes, LOCK held by process {os.getpid()}" in capsys.readouterr().out
        assert cli.main(["verify", str(path)]) == 2
        assert f"in use by process {os.getpid()}" in capsys.readouterr().err
        train(model, opt, batches(1, seed=2))  # the probes took nothing away from the owner
        assert nearstep.inspect_store(path).step == 2


# -- verify ------------------------------------------------------------------


def test_verify_finds_corrupted_truncated_and_missing_files(store: Path, capsys) -> None:
    before = snapshot(store)
    assert cli.main(["verify", str(store)]) == 0
    n = len(read_manifest(store).slices)
    assert capsys.readouterr().out.strip() == f"{n} slices, all checksums match (step 3)"
    assert snapshot(store) == before  # verify writes nothing

    victim = committed_file(store, 1)
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x20
    victim.write_bytes(bytes(data))
    assert cli.main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert f"slice 1 of store {store} is corrupted: {victim.name}" in out and f"1 of {n} slices bad" in out

    victim.write_bytes(before[str(victim.relative_to(store))])
    os.truncate(victim, 4096)
    assert cli.main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert f"{victim}: 4,096 bytes, expected" in out and "truncated" in out and f"1 of {n} slices bad" in out

    victim.write_bytes(before[str(victim.relative_to(store))])
    spare = victim.with_name(victim.name[:-1] + str(1 - int(victim.name[-1])))
    spare.unlink()
    assert cli.main(["verify", str(store)]) == 1
    assert f"{spare}: missing (slice 1, spare" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["inspect"], ["verify"], ["export"]])
def test_no_store_and_unreadable_manifest_exit_2_with_the_reason(command: list[str], store: Path, tmp_path: Path, capsys) -> None:
    extra = [str(tmp_path / "out.safetensors")] if command == ["export"] else []
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, why in ((tmp_path / "nowhere", "it does not exist"), (empty, "has no manifest.json")):
        assert cli.main([*command, str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nearstep {command[0]}: error: {path} holds no nearstep store") and why in err
    assert list(empty.iterdir()) == []  # no LOCK left behind in a directory that is not a store
    (store / "manifest.json").write_text('{"format_version": 1, "step": ')
    assert cli.main([*command, str(store), *extra]) == 2
    assert "is not a valid nearstep manifest (not JSON" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_usage_errors_exit_2(capsys) -> None:
    assert cli.main(["verify"]) == 2
    assert cli.main(["export", "only-a-store"]) == 2
    assert "required" in capsys.readouterr().err


# -- export ------------------------------------------------------------------


def test_export_writes_the_master_weights_by_name(tmp_path: Path, capsys) -> None:
    model = make_model()
    path = tmp_path / "s"
    out = tmp_path / "w.safetensors"
    with nearstep.AdamW(model.named_parameters(), store=path, device="inline", slice_mb=SLICE_MB) as opt:
        train(model, opt, batches(3))
        # The optimizer is still open: export reads without the lock.
        assert cli.main(["export", str(path), str(out)]) == 0
        state = opt.full_state_dict()["state"]
    assert "wrote 7 tensors" in capsys.readouterr().out
    tensors = load_file(out)
    assert set(tensors) == {n for n, _ in model.named_parameters()}
    for i, (name, p) in enumerate(model.named_parameters()):
        assert tensors[name].dtype == torch.float32 and tensors[name].shape == p.shape
        assert torch.equal(tensors[name], state[i]["master"].reshape(p.shape))
    fresh = make_model(seed=5)
    fresh.load_state_dict(tensors, strict=True)
    for (name, p), (_, q) in zip(fresh.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), name
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["nearstep.step"] == "3" and meta["nearstep.store_id"] == read_manifest(path).store_id


def test_export_refuses_to_overwrite_without_force(store: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"mine")
    assert cli.main(["export", str(store), str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert cli.main(["export", str(store), str(out), "--force"]) == 0
    assert set(load_file(out)) == {n for n, _ in make_model().named_parameters()}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["s", "w.safetensors"]  # no temporary file left


def test_export_of_a_corrupted_store_fails_naming_the_file(store: Path, tmp_path: Path, capsys) -> None:
    victim = committed_file(store, 0)
    data = bytearray(victim.read_bytes())
    data[0] ^= 0x01
    victim.write_bytes(bytes(data))
    assert cli.main(["export", str(store), str(tmp_path / "w.safetensors")]) == 1
    assert f"slice 0 of store {store} is corrupted: {victim.name}" in capsys.readouterr().err
    assert [f.name for f in tmp_path.iterdir()] == ["s"]  # neither OUT nor a temporary file


# -- resume ------------------------------------------------------------------


@pytest.mark.parametrize("cls", [nearstep.AdamW, nearstep.Adam, nearstep.SGD, nearstep.Lion])
def test_resume_constructs_the_optimizer_the_store_holds(cls: type, tmp_path: Path) -> None:
    model = make_model()
    with cls(model.named_parameters(), store=tmp_path / "s", device="inline", lr=1e-2) as opt:
        train(model, opt, batches(2))
    fresh = make_model(seed=7)
    with nearstep.resume(fresh.named_parameters(), tmp_path / "s", device="inline") as again:
        assert type(again) is cls and again.stats()["step"] == 2
    for p, q in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(p, q)


_CRASHING_RUN = """
import os, sys
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(1)
import nearstep
from conftest import batches, loss_of, make_model
model = make_model()
opt = nearstep.SGD(model.named_parameters(), lr=0.1, momentum=0.9, store=sys.argv[1], device="inline", slice_mb=0.004)
for batch in batches(6)[:3]:
    loss_of(model, batch).backward()
    opt.step()
    opt.zero_grad()
os._exit(9)  # a crash: no close(), no finalizers
"""


@pytest.fixture
def one_thread():
    """Bit-for-bit comparisons across processes: with several threads some CPU reductions
    (the embedding's backward among them) may add in a different order from run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_after_a_crash_continues_bit_for_bit(tmp_path: Path, one_thread: None) -> None:
    data = batches(6)
    reference = make_model()
    with nearstep.SGD(reference.named_parameters(), lr=0.1, momentum=0.9, store=tmp_path / "ref", device="inline",
                      slice_mb=SLICE_MB) as opt:
        train(reference, opt, data)

    run = subprocess.run([sys.executable, "-c", _CRASHING_RUN, str(tmp_path / "s"), str(HERE)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 9, run.stderr
    model = make_model(seed=3)  # whatever the weights were: the store's come in
    with nearstep.resume(model.named_parameters(), tmp_path / "s", lr=0.1, momentum=0.9, device="inline") as opt:
        assert isinstance(opt, nearstep.SGD) and opt.stats()["step"] == 3
        train(model, opt, data[3:])
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name


def test_resume_without_a_store_says_so(tmp_path: Path) -> None:
    with pytest.raises(nearstep.StoreError, match="holds no nearstep store: it does not exist. There is nothing to resume"):
        nearstep.resume(make_model().parameters(), tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()  # not created as a side effect
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("[]")
    with pytest.raises(nearstep.StoreCorruptError, match="not a valid nearstep manifest"):
        nearstep.resume(make_model().parameters(), tmp_path / "bad")
