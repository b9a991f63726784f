"""The store: slicing, the manifest, generations and commits, the lock, disk space."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import nearstep
from nearstep import store as st

ADAM_STATE = ("exp_avg", "exp_avg_sq")


def specs(*shapes: tuple[int, ...], group: int = 0) -> tuple[st.ParamSpec, ...]:
    return tuple(st.ParamSpec(f"p{i}", shape, "float32", group) for i, shape in enumerate(shapes))


def make_store(path: Path, params: tuple[st.ParamSpec, ...], slice_bytes: int = 4096, seed: int = 0) -> st.Store:
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(p.shape, generator=g) for p in params]
    return st.Store.create(path, params=params, masters=lambda i: values[i], optimizer="adamw",
                           state_names=ADAM_STATE, hyperparameters=[{"lr": 1e-3}], slice_bytes=slice_bytes)


def test_slices_follow_backward_order_and_split_large_parameters() -> None:
    params = specs((10,), (3000,), (20,), (5,))
    slices = st.plan_slices(params, slice_bytes=1024 * 4)  # 1024 elements per slice
    flat = [(g.param, g.start, g.length) for s in slices for g in s.segments]
    # Backward order: last registered first; the 3000-element parameter is cut in chunks.
    assert [p for p, _, _ in flat][:2] == [3, 2]
    covered = {i: 0 for i in range(len(params))}
    for p, start, length in flat:
        assert start == covered[p]
        covered[p] += length
    assert covered == {i: p.numel for i, p in enumerate(params)}
    assert all(s.numel <= 1024 for s in slices)
    assert sum(1 for p, _, _ in flat if p == 1) == 3


def test_a_parameter_that_fits_is_never_split() -> None:
    slices = st.plan_slices(specs((600,), (600,)), slice_bytes=1000 * 4)
    assert [[(g.param, g.length) for g in s.segments] for s in slices] == [[(1, 600)], [(0, 600)]]


def test_create_writes_step_zero_and_read_slice_returns_the_masters(tmp_path) -> None:
    params = specs((7, 5), (300,), (2,))
    with make_store(tmp_path / "s", params) as store:
        m = store.manifest
        assert m.step == 0 and m.state_names == ("master", *ADAM_STATE)
        assert all(c.generation == 0 for c in m.committed)
        got = torch.zeros(sum(p.numel for p in params))
        g = torch.Generator().manual_seed(0)
        expected = torch.cat([torch.randn(p.shape, generator=g).reshape(-1) for p in params])
        offsets = [0, 35, 335]
        for spec in m.slices:
            state = store.read_slice(spec.index)
            assert torch.count_nonzero(state["exp_avg"]) == 0
            pos = 0
            for seg in spec.segments:
                got[offsets[seg.param] + seg.start: offsets[seg.param] + seg.start + seg.length] = state["master"][pos: pos + seg.length]
                pos += seg.length
        assert torch.equal(got, expected)
        for _k, _g, path in store.iter_slice_paths():
            assert path.stat().st_size % 4096 == 0
        assert store.verify() == []


def test_manifest_round_trips(tmp_path) -> None:
    with make_store(tmp_path / "s", specs((100,), (9, 9))) as store:
        text = store.manifest.to_json()
    assert st.Manifest.from_json(text, tmp_path) == st.Manifest.from_json(text, tmp_path)
    assert st.Manifest.from_json(text, tmp_path).to_json() == text


@pytest.mark.parametrize("mutate, why", [
    (lambda d: d.pop("slices"), "KeyError"),
    (lambda d: d.update(format_version=99), "format version"),
    (lambda d: d["params"][0].update(dtype="int8"), "dtype"),
    (lambda d: d["slices"][0]["segments"][0].update(length=1), "cover"),
    (lambda d: d["committed"][0].update(generation=2), "generation"),
    (lambda d: d.update(step=-1), "step"),
])
def test_malformed_manifest_is_a_clear_error(tmp_path, mutate, why) -> None:
    with make_store(tmp_path / "s", specs((100,), (9, 9))) as store:
        doc = json.loads(store.manifest.to_json())
    mutate(doc)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(nearstep.StoreCorruptError, match=why):
        st.Store.open(tmp_path / "s")


def test_not_json_and_missing_manifest(tmp_path) -> None:
    with make_store(tmp_path / "s", specs((10,))):
        pass
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(nearstep.StoreCorruptError, match="not JSON"):
        st.Store.open(tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(nearstep.StoreError, match="no manifest"):
        st.Store.open(tmp_path / "empty")


def test_commit_replaces_the_manifest_atomically(tmp_path) -> None:
    with make_store(tmp_path / "s", specs((10,))) as store:
        new = st.Manifest.from_json(store.manifest.to_json(), tmp_path)
        store.commit(new.__class__(**{**{f: getattr(new, f) for f in new.__dataclass_fields__}, "step": 5}))
        assert not (tmp_path / "s" / "manifest.json.tmp").exists()
    with st.Store.open(tmp_path / "s") as again:
        assert again.manifest.step == 5


def test_lock_names_the_holder_in_another_process(tmp_path) -> None:
    with make_store(tmp_path / "s", specs((10,))):
        code = ("import sys; from nearstep.store import Store\n"
                "try:\n    Store.open(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True, timeout=60)
    assert "StoreLockedError" in out.stdout and f"process {os.getpid()}" in out.stdout


def test_create_refuses_a_directory_with_other_files(tmp_path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(nearstep.StoreError, match="not empty"):
        make_store(tmp_path / "s", specs((10,)))
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"


def test_create_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(st.shutil, "disk_usage", lambda _p: usage(10**9, 10**9, 1000))
    with pytest.raises(nearstep.DiskFullError, match="needs .* GiB"):
        make_store(tmp_path / "s", specs((100_000,)))


def test_check_model_names_the_first_difference(tmp_path) -> None:
    with make_store(tmp_path / "s", specs((10,), (4, 4))) as store:
        store.check_model(specs((10,), (4, 4)), "adamw")
        with pytest.raises(nearstep.StoreMismatchError, match="parameter 1 is 'p1' \\[4, 4\\]"):
            store.check_model(specs((10,), (4, 5)), "adamw")
        with pytest.raises(nearstep.StoreMismatchError, match="2 parameters"):
            store.check_model(specs((10,), (4, 4), (3,)), "adamw")
        with pytest.raises(nearstep.StoreMismatchError, match="holds adamw state"):
            store.check_model(specs((10,), (4, 4)), "sgd")


def test_corrupted_and_truncated_slice_files_are_found_by_verify(tmp_path) -> None:
    with make_store(tmp_path / "s", specs((3000,)), slice_bytes=4096 * 4) as store:
        victim = store.slice_path(0, 0)
        data = bytearray(victim.read_bytes())
        data[10] ^= 0x01
        victim.write_bytes(bytes(data))
        problems = store.verify()
        assert len(problems) == 1 and "slice 0" in problems[0] and victim.name in problems[0]
        os.truncate(victim, 4096)
        assert "shorter than expected" in store.verify()[0]
