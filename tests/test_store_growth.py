"""Dormant parameters and growing a store: state only for what is trained.

A parameter frozen when the store is made has no slice and no bytes on disk
("dormant"); ``Store.grow`` gives dormant parameters state and appends param
groups (``add_param_group``) in one atomic commit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import nearstep
from nearstep import cli, tools
from nearstep import store as st

ADAM_STATE = ("exp_avg", "exp_avg_sq")
HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def values_for(params: tuple[st.ParamSpec, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in params]


def make_store(path: Path, params: tuple[st.ParamSpec, ...], trainable: list[bool] | None, *, slice_bytes: int = 4096,
               state_format: str = "fp32", seed: int = 0) -> st.Store:
    values = values_for(params, seed)

    def masters(i: int) -> torch.Tensor:
        assert trainable is None or trainable[i], f"masters({i}) was asked for a frozen parameter"
        return values[i]

    return st.Store.create(path, params=params, masters=masters, optimizer="adamw", state_names=ADAM_STATE,
                           hyperparameters=[{"lr": 1e-3}], slice_bytes=slice_bytes, state_format=state_format,
                           trainable=trainable)


def slice_files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((path / st.SLICES).iterdir())}


def lora_specs(dim: int = 1024, rank: int = 8) -> tuple[st.ParamSpec, ...]:
    return (st.ParamSpec("base.weight", (dim, dim), "float32", 0),
            st.ParamSpec("lora_A", (rank, dim), "float32", 0),
            st.ParamSpec("lora_B", (dim, rank), "float32", 0))


def three_specs() -> tuple[st.ParamSpec, ...]:
    return (st.ParamSpec("a", (1500,), "float32", 0), st.ParamSpec("frozen", (700,), "float32", 0),
            st.ParamSpec("c", (300,), "float32", 0))


def at_step_five(store: st.Store) -> st.Manifest:
    """Pretend five steps were committed, with per-parameter telemetry, so a grow has something to keep."""
    m = store.manifest
    n = len(m.params)
    store.commit(st.replace(m, step=5, param_steps=tuple(0 if m.is_dormant(i) else 5 for i in range(n)),
                            counters={"skipped_steps": 1},
                            param_stats={"spike_clipped": [float(i) for i in range(n)]}))
    return store.manifest


# -- planning and creating ----------------------------------------------------------


def test_plan_slices_over_a_subset_keeps_the_parameter_indices() -> None:
    params = (st.ParamSpec("a", (10,), "float32", 0), st.ParamSpec("b", (3000,), "float32", 0),
              st.ParamSpec("c", (20,), "float32", 0), st.ParamSpec("d", (5,), "float32", 0))
    slices = st.plan_slices(params, 1024 * 4, include=[True, False, True, False], first_index=7)
    assert [s.index for s in slices] == [7]
    assert [(g.param, g.start, g.length) for g in slices[0].segments] == [(2, 0, 20), (0, 0, 10)]  # backward order
    assert st.plan_slices(params, 1024 * 4, include=None) == st.plan_slices(params, 1024 * 4)
    with pytest.raises(ValueError, match="one per parameter"):
        st.plan_slices(params, 4096, include=[True])


def test_a_lora_store_holds_only_the_adapters(tmp_path: Path) -> None:
    params = lora_specs()
    with make_store(tmp_path / "s", params, [False, True, True], slice_bytes=64 << 20) as store:
        m = store.manifest
        assert m.dormant == (0,) and m.is_dormant(0) and not m.is_dormant(1)
        assert all(g.param != 0 for s in m.slices for g in s.segments)
        adapters = params[1].numel + params[2].numel
        assert m.state_bytes == 3 * adapters * 4  # master + two moments, fp32, nothing for the base
        on_disk = sum(len(b) for b in slice_files(tmp_path / "s").values())
        assert on_disk == 2 * m.state_bytes < params[0].numel * 4 // 4  # well under a quarter of the base's masters
        masters = store.read_params()["master"]
        assert masters[0] is None
        values = values_for(params)
        assert torch.equal(masters[1], values[1].reshape(-1)) and torch.equal(masters[2], values[2].reshape(-1))
        assert store.verify() == []
    doc = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert doc["format_version"] == st.DORMANT_FORMAT_VERSION and doc["dormant"] == [0]
    with st.Store.open(tmp_path / "s") as again:
        assert again.manifest == m


def test_trainable_none_is_every_parameter_and_writes_format_version_1(tmp_path: Path) -> None:
    with make_store(tmp_path / "s", three_specs(), None) as store:
        assert store.manifest.dormant == () and store.manifest.format_version == st.FORMAT_VERSION
        assert all(t is not None for t in store.read_params()["master"])
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["format_version"] == 1
    with pytest.raises(ValueError, match="one per parameter"):
        make_store(tmp_path / "t", three_specs(), [True])
    assert not (tmp_path / "t").exists()  # refused before anything was made


def test_every_parameter_frozen_makes_a_store_without_slices(tmp_path: Path) -> None:
    with make_store(tmp_path / "s", three_specs(), [False, False, False]) as store:
        assert store.manifest.slices == () and store.manifest.state_bytes == 0 and store.verify() == []
        grown = store.grow([0, 1, 2], lambda i: values_for(three_specs())[i], slice_bytes=4096)
        assert grown.dormant == () and len(grown.slices) >= 1 and store.verify() == []


# -- the manifest ----------------------------------------------------------------


def test_a_manifest_without_the_dormant_field_still_loads(tmp_path: Path) -> None:
    with make_store(tmp_path / "s", three_specs(), None) as store:
        doc = json.loads(store.manifest.to_json())
    doc.pop("dormant")  # what every store before dormant parameters holds
    assert doc["format_version"] == 1
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(doc))
    with st.Store.open(tmp_path / "s") as store:
        assert store.manifest.dormant == () and store.verify() == []
        assert len(store.read_params()["master"]) == 3


@pytest.mark.parametrize("mutate, why", [
    (lambda d: d.update(dormant=[0]), "dormant \\(no state\\) but the slices cover"),  # a param with segments
    (lambda d: d.update(dormant=[2, 1]), "increasing order"),
    (lambda d: d.update(dormant=[1, 1]), "increasing order"),
    (lambda d: d.update(dormant=[9]), "increasing order"),
    (lambda d: d.update(dormant=[]), "cover 0 of the 700 elements"),  # lost its flag: uncovered
    (lambda d: d.update(format_version=1), "format version 1 with 1 dormant"),
])
def test_an_inconsistent_dormant_table_is_a_clear_error(tmp_path: Path, mutate, why) -> None:
    with make_store(tmp_path / "s", three_specs(), [True, False, True]) as store:
        doc = json.loads(store.manifest.to_json())
    mutate(doc)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(nearstep.StoreCorruptError, match=why):
        st.Store.open(tmp_path / "s")


# -- growing ---------------------------------------------------------------------


@pytest.mark.parametrize("state_format", ["fp32", "bf16-sr+8bit"])
def test_grow_keeps_old_slices_bit_for_bit_and_writes_the_new_ones(tmp_path: Path, state_format: str) -> None:
    params = three_specs()
    path = tmp_path / "s"
    with make_store(path, params, [True, False, True], slice_bytes=1024 * 4, state_format=state_format) as store:
        before = at_step_five(store)
        old_files = slice_files(path)
        new_master = torch.linspace(-2, 2, 700)
        grown = store.grow([1], lambda i: new_master if i == 1 else pytest.fail(f"masters({i})"), slice_bytes=512 * 4)
        assert grown is store.manifest
    with st.Store.open(path) as store:
        m = store.manifest
        assert m == grown
        assert m.dormant == () and m.format_version == 1
        assert m.slices[: len(before.slices)] == before.slices and m.committed[: len(before.slices)] == before.committed
        assert (m.step, m.param_steps, m.counters, m.hyperparameters) == (5, (5, 0, 5), {"skipped_steps": 1}, before.hyperparameters)
        assert m.param_stats == before.param_stats  # no new parameter: lists unchanged
        files = slice_files(path)
        assert {k: files[k] for k in old_files} == old_files  # untouched
        new = m.slices[len(before.slices):]
        assert [s.index for s in new] == [len(before.slices), len(before.slices) + 1]  # 700 elements, 512 a slice
        assert [(g.param, g.start, g.length) for s in new for g in s.segments] == [(1, 0, 512), (1, 512, 188)]
        for s in new:
            assert m.committed[s.index].generation == 0
            assert store.slice_path(s.index, 1).stat().st_size == m.slice_file_bytes(s.index)  # spare allocated
        got = store.read_params(m.state_names)
        if state_format == "fp32":
            assert torch.equal(got["master"][1], new_master)
        else:
            torch.testing.assert_close(got["master"][1], new_master, rtol=1e-2, atol=1e-2)
        assert not got["exp_avg"][1].any() and not got["exp_avg_sq"][1].any()
        assert store.verify() == []
    assert tools.verify_store(path).ok


def test_grow_rounds_lossy_masters_with_the_stores_seeds(tmp_path: Path) -> None:
    """The same grow on two copies of one store writes the same bytes (seeds from the store id and step)."""
    import shutil

    params = three_specs()
    with make_store(tmp_path / "a", params, [True, False, True], state_format="bf16-sr") as store:
        at_step_five(store)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    master = torch.randn(700, generator=torch.Generator().manual_seed(3)) * 1e-3
    for name in ("a", "b"):
        with st.Store.open(tmp_path / name) as store:
            store.grow([1], lambda i: master, slice_bytes=4096)
    assert slice_files(tmp_path / "a") == slice_files(tmp_path / "b")
    with st.Store.open(tmp_path / "a") as store:
        got = store.read_params()["master"][1]
        assert not torch.equal(got, master) and torch.equal(got, got.bfloat16().float())  # rounded to bf16


def test_grow_adds_a_param_group(tmp_path: Path) -> None:
    params = three_specs()
    path = tmp_path / "s"
    added = (st.ParamSpec("head.weight", (40, 10), "float32", 1), st.ParamSpec("head.frozen", (10,), "float32", 1),
             st.ParamSpec("head.bias", (40,), "float32", 1))
    head = values_for(added, seed=9)
    with make_store(path, params, [True, False, True]) as store:
        at_step_five(store)
        store.grow([3, 5], lambda i: head[i - 3], new_params=added, new_hyperparameters=[{"lr": 1e-4}],
                   slice_bytes=4096)
    with st.Store.open(path) as store:
        m = store.manifest
        assert m.params == params + added and m.hyperparameters == ({"lr": 1e-3}, {"lr": 1e-4})
        assert m.dormant == (1, 4)
        assert m.param_steps == (5, 0, 5, 0, 0, 0)
        assert m.param_stats == {"spike_clipped": [0.0, 1.0, 2.0, 0.0, 0.0, 0.0]}
        new = [g for s in m.slices if s.index >= 1 for g in s.segments if g.param >= 3]
        assert [g.param for g in new] == [5, 3]  # backward order among the new ones
        masters = store.read_params()["master"]
        assert masters[4] is None and masters[1] is None
        assert torch.equal(masters[3], head[0].reshape(-1)) and torch.equal(masters[5], head[2].reshape(-1))
        assert store.verify() == []

        # A resumed run passes its first group and adds the second later.
        pending = store.check_model(params, "adamw", groups=1)
        assert pending == st.PendingGroups(range(3, 6), range(1, 2))
        assert store.check_model(params + added, "adamw", groups=2) == st.PendingGroups(range(6, 6), range(2, 2))
        assert store.check_added(added, 3) is True
        renamed = (added[0], st.ParamSpec("head.other", (10,), "float32", 1), added[2])
        with pytest.raises(nearstep.StoreMismatchError, match="its parameter 1 \\(parameter 4 of the table\\) is 'head.other'"):
            store.check_added(renamed, 3)
        with pytest.raises(nearstep.StoreMismatchError, match="has 3 parameters in the store but 2 were added"):
            store.check_added(added[:2], 3)
        with pytest.raises(nearstep.StoreMismatchError, match="does not line up"):
            store.check_added(added, 2)
        third = (st.ParamSpec("extra", (4,), "float32", 2),)
        assert store.check_added(third, 6) is False  # new: the caller grows the store with it
        with pytest.raises(nearstep.StoreMismatchError, match="does not line up"):
            store.check_added((st.ParamSpec("extra", (4,), "float32", 3),), 6)


def test_check_model_ignores_trainability_and_refuses_partial_groups(tmp_path: Path) -> None:
    params = three_specs()
    with make_store(tmp_path / "s", params, [True, False, True]) as store:
        # The same parameters, whatever their requires_grad now: the table has no such field.
        assert store.check_model(params, "adamw") == st.PendingGroups(range(3, 3), range(1, 1))
    with make_store(tmp_path / "t", params, None) as store:
        assert store.check_model(params, "adamw", groups=1) == st.PendingGroups(range(3, 3), range(1, 1))
        # Fewer parameters of the same group are not a trailing group: the old message.
        with pytest.raises(nearstep.StoreMismatchError, match="has 3 parameters but the optimizer was given 2; "
                           "the first 2 agree.*only whole and at the end"):
            store.check_model(params[:2], "adamw")
        with pytest.raises(nearstep.StoreMismatchError, match="has 3 parameters but the optimizer was given 4"):
            store.check_model(params + (st.ParamSpec("d", (3,), "float32", 0),), "adamw")
        with pytest.raises(nearstep.StoreMismatchError, match="parameter 1 is 'frozen' \\[700\\]"):
            store.check_model((params[0], st.ParamSpec("frozen", (701,), "float32", 0), params[2]), "adamw")


def test_grow_refuses_bad_requests_and_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s"
    with make_store(path, three_specs(), [True, False, True]) as store:
        text, files = (path / "manifest.json").read_text(), slice_files(path)
        with pytest.raises(ValueError, match="parameter 0 \\('a'\\) already has state"):
            store.grow([0], lambda i: torch.zeros(1500), slice_bytes=4096)
        with pytest.raises(ValueError, match="there is no parameter 7"):
            store.grow([7], lambda i: torch.zeros(1), slice_bytes=4096)
        with pytest.raises(ValueError, match="new parameters belong to the new groups 1 to 1"):
            store.grow([], lambda i: torch.zeros(1), new_params=[st.ParamSpec("x", (3,), "float32", 0)],
                       new_hyperparameters=[{"lr": 1.0}], slice_bytes=4096)
        with pytest.raises(ValueError, match="new parameters belong to the new groups"):
            store.grow([], lambda i: torch.zeros(1), new_params=[st.ParamSpec("x", (3,), "float32", 1)], slice_bytes=4096)
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(st.shutil, "disk_usage", lambda _p: usage(10**9, 10**9, 1000))
        with pytest.raises(nearstep.DiskFullError, match="growing the store needs .* GiB"):
            store.grow([1], lambda i: torch.zeros(700), slice_bytes=4096)
        monkeypatch.undo()
        assert (path / "manifest.json").read_text() == text and slice_files(path) == files
        view = st.Store(path, store.manifest, lock_fd=-1)
        with pytest.raises(nearstep.StoreError, match="takes its lock"):
            view.grow([1], lambda i: torch.zeros(700), slice_bytes=4096)


def test_grow_reads_the_committed_manifest_not_a_stale_copy(tmp_path: Path) -> None:
    """A device process commits steps through its own Store object; the caller's copy may be old."""
    path = tmp_path / "s"
    with make_store(path, three_specs(), [True, False, True]) as store:
        stale = store.manifest
        at_step_five(store)
        store.manifest = stale
        store.grow([1], lambda i: torch.ones(700), slice_bytes=4096)
        assert store.manifest.step == 5 and store.manifest.param_steps == (5, 0, 5)


def test_an_interrupted_grow_leaves_the_store_as_before_and_the_next_grow_works(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s"
    with make_store(path, three_specs(), [True, False, True]) as store:
        at_step_five(store)
        text, files = (path / "manifest.json").read_text(), slice_files(path)

        def no_rename(src, dst):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(st.os, "replace", no_rename)
        with pytest.raises(nearstep.StoreIOError, match=r"commit step \d+ \(the store stays at step \d+\)"):
            store.grow([1], lambda i: torch.full((700,), 3.0), slice_bytes=8 * 4)  # 11 small slices (split at 64 elements)
        monkeypatch.undo()
        strays = set(slice_files(path)) - set(files)
        assert len(strays) == 2 * 11  # written, never committed
        assert store.manifest.to_json() == text  # the object still names the old commit
    assert tools.verify_store(path).ok  # the strays are not the store's
    with st.Store.open(path) as store:
        assert (path / "manifest.json").read_text() == text
        assert store.verify() == []
        assert store.read_params()["master"][1] is None
        # The next grow plans fewer, larger slices: each new file holds exactly the new slice.
        grown = store.grow([1], lambda i: torch.full((700,), 4.0), slice_bytes=4096)
        assert len(grown.slices) == len(st.Manifest.from_json(text, path).slices) + 1
        assert set(slice_files(path)) == {store.slice_path(k, g).name for k, g, _ in store.iter_slice_paths()}
        for k, g, file in store.iter_slice_paths():
            assert file.stat().st_size == grown.slice_file_bytes(k), file
        assert torch.equal(store.read_params()["master"][1], torch.full((700,), 4.0))
    assert tools.verify_store(path).ok


def test_a_grow_whose_directory_fsync_fails_after_the_rename_is_committed(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s"
    with make_store(path, three_specs(), [True, False, True]) as store:
        real = st.fsync_path

        def fail_on_store_dir(p):
            if Path(p) == path:
                raise OSError(5, "Input/output error")
            real(p)

        monkeypatch.setattr(st, "fsync_path", fail_on_store_dir)
        with pytest.raises(nearstep.StoreIOError):
            store.grow([1], lambda i: torch.full((700,), 2.0), slice_bytes=4096)
        monkeypatch.undo()
        assert store.manifest.dormant == ()  # what a reopen sees, so what this object holds
    with st.Store.open(path) as store:
        assert store.manifest.dormant == () and store.verify() == []
        assert torch.equal(store.read_params()["master"][1], torch.full((700,), 2.0))


# A fork server: torch is imported once, and each grow runs in a forked child that
# the test kills (importing torch in a fresh process per trial takes seconds).
_GROWER = r"""
import os, sys, time, traceback
sys.path.insert(0, sys.argv[1])
import torch
from nearstep import aio, store as st
real_sync = aio.AlignedFile.sync
def slow_sync(self):  # spreads the grow over time, so that kills land everywhere in it
    time.sleep(0.004)
    real_sync(self)
aio.AlignedFile.sync = slow_sync
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            with st.Store.open(line.strip()) as store:
                m = store.manifest
                store.grow(list(m.dormant), lambda i: torch.full(m.params[i].shape, float(i)), slice_bytes=256 * 4)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"{status} {time.perf_counter() - t:.4f}", flush=True)
"""


def test_a_grow_killed_at_any_instant_reopens_as_before_or_after(tmp_path: Path) -> None:
    import shutil

    params = tuple(st.ParamSpec(f"p{i}", (1000 + 37 * i,), "float32", 0) for i in range(12))
    trainable = [i % 3 == 0 for i in range(12)]
    template = tmp_path / "template"
    with make_store(template, params, trainable) as store:
        at_step_five(store)
        before = store.manifest
    before_text = (template / "manifest.json").read_text()
    old_files = slice_files(template)

    server = subprocess.Popen([sys.executable, "-c", _GROWER, str(SRC)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout.readline().strip() == "ready"

        def grow_in_child(path: Path, kill_after: float | None) -> tuple[int, float]:
            server.stdin.write(f"{path}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            if kill_after is not None:
                time.sleep(kill_after)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # already done (and reaped by the server)
            status, seconds = server.stdout.readline().split()
            return int(status), float(seconds)

        # How long an uninterrupted grow takes.
        shutil.copytree(template, tmp_path / "calibrate")
        status, duration = grow_in_child(tmp_path / "calibrate", None)
        assert status == 0
        with st.Store.open(tmp_path / "calibrate") as store:
            after = store.manifest
        assert after.dormant == ()

        rng = random.Random(1234)
        outcomes = []
        for trial in range(10):
            path = tmp_path / f"t{trial}"
            shutil.copytree(template, path)
            status, _ = grow_in_child(path, rng.uniform(0, 1.2 * duration))
            assert status in (0, signal.SIGKILL), status  # finished, or killed; never failed
            with st.Store.open(path) as store:
                m = store.manifest
                assert {k: v for k, v in slice_files(path).items() if k in old_files} == old_files
                if m.dormant:
                    outcomes.append("before")
                    assert (path / "manifest.json").read_text() == before_text and m == before
                else:
                    outcomes.append("after")
                    assert (m.slices, m.params, m.committed, m.step) == (after.slices, after.params, after.committed, 5)
                assert store.verify() == [], trial
                if m.dormant:  # the next grow works over whatever the killed one left
                    store.grow(list(m.dormant), lambda i: torch.full(params[i].shape, -1.0), slice_bytes=300 * 4)
                    assert store.verify() == [] and store.manifest.dormant == ()
                    assert set(slice_files(path)) == {f.name for _k, _g, f in store.iter_slice_paths()}  # strays gone
                masters = store.read_params()["master"]
                for i in range(12):
                    if not trainable[i]:
                        assert masters[i].unique().numel() == 1 and float(masters[i][0]) in (float(i), -1.0)
            assert tools.verify_store(path).ok
        assert len(outcomes) == 10, outcomes
    finally:
        server.stdin.close()
        server.wait(timeout=60)

# -- the tools -------------------------------------------------------------------


@pytest.fixture
def lora_store(tmp_path: Path) -> Path:
    path = tmp_path / "lora"
    with make_store(path, lora_specs(dim=256), [False, True, True], slice_bytes=64 << 20):
        pass
    return path


def test_inspect_shows_the_frozen_parameters(lora_store: Path, capsys) -> None:
    assert cli.main(["inspect", str(lora_store)]) == 0
    out = capsys.readouterr().out
    assert "frozen       1 of 3 parameters (65,536 elements) have no state in the store" in out
    base_row = next(line for line in out.splitlines() if "base.weight" in line)
    assert base_row.rstrip().endswith("frozen, no state")
    adapter_row = next(line for line in out.splitlines() if line.lstrip().startswith("1  lora_A"))
    assert "frozen" not in adapter_row
    assert "base.weight" not in out.split("slices (")[1]  # no slice holds it
    assert cli.main(["inspect", str(lora_store), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dormant"] == [0] and doc["format_version"] == 2
    assert doc["sizes"]["dormant_params"] == 1 and doc["sizes"]["dormant_numel"] == 65536
    assert doc["sizes"]["state_bytes_per_generation"] == 3 * 2 * 8 * 256 * 4


def test_verify_counts_the_frozen_parameters(lora_store: Path, capsys) -> None:
    assert cli.main(["verify", str(lora_store)]) == 0
    assert capsys.readouterr().out.strip() == \
        "1 slices, all checksums match (step 0); 1 frozen parameters have no state to check"
    report = tools.verify_store(lora_store)
    assert report.ok and report.dormant == 1


def test_export_leaves_the_frozen_parameters_out(lora_store: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "w.safetensors"
    assert cli.main(["export", str(lora_store), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 tensors" in printed and "1 frozen parameters have no state in the store and were left out (base.weight)" in printed
    tensors = load_file(out)
    values = values_for(lora_specs(dim=256))
    assert set(tensors) == {"lora_A", "lora_B"}
    assert torch.equal(tensors["lora_A"], values[1]) and torch.equal(tensors["lora_B"], values[2])
    result = tools.export_safetensors(lora_store, out, force=True)
    assert result.left_out == ("base.weight",) and result.nbytes == 2 * 8 * 256 * 4
    manifest, masters = tools.read_masters(lora_store)
    assert masters[0] is None and masters[1].shape == (8, 256)


def test_convert_carries_the_dormant_flags(lora_store: Path, tmp_path: Path) -> None:
    result = tools.convert_store(lora_store, tmp_path / "bf16", "bf16-sr")
    assert result.state_bytes < result.source_state_bytes
    with st.Store.open(tmp_path / "bf16") as store:
        assert store.manifest.dormant == (0,) and store.manifest.format.name == "bf16-sr"
        masters = store.read_params()["master"]
        assert masters[0] is None
        torch.testing.assert_close(masters[1], values_for(lora_specs(dim=256))[1].reshape(-1), rtol=1e-2, atol=1e-2)
        assert store.verify() == []
