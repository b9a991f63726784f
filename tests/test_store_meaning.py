"""A store's manifest is checked for meaning, its lock cannot be stolen, and paths are refused clearly.

- Manifest values of the right JSON type but the wrong meaning (negative or huge steps, a
  parameter updated more often than the store stepped, permuted ``state_names``, another
  optimizer's state, times no clock shows, a layout the slice files were not written in)
  are StoreCorruptErrors at ``Store.open`` and in ``verify_store``, before anything is read
  or written; harmless edits still open, verify and train exactly as the original does
  (property-based: each generated edit names the outcomes it may have).
- The lock is an flock of the store directory: deleting ``LOCK`` lets no second trainer
  in, and the probes (``inspect``, the demo) still see the holder.
- A path that is a file, an empty path, a read-only file system, a small disk and an
  optimizer dropped without ``close()`` each get an error that says what to do.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections import namedtuple
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import configuration as hypothesis_configuration
from hypothesis import strategies as st

import nearstep
from nearstep import cli, demo, errors, formats, rules, tools
from nearstep import store as store_module
from nearstep.store import MAX_STEP, ParamSpec, Store, read_manifest
from conftest import batches, loss_of, make_model

SLICE_MB = 0.008  # two slices of about 1500 elements: every state format but bf16-kahan changes their files' size
LR = 1e-2
SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)}

# Hypothesis keeps what it learns under ./.hypothesis even without an example database; these
# tests leave nothing behind (as test_faults.py), so it goes to a directory removed afterwards.
_HYPOTHESIS_HOME = Path(tempfile.mkdtemp(prefix="test_store_meaning-hypothesis-"))
hypothesis_configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME)


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home() -> Iterator[None]:
    hypothesis_configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME)  # another module may have reset it
    yield
    hypothesis_configuration.set_hypothesis_home_dir(None)
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)


def _optimizer(model: torch.nn.Module, path: Path, device: str = "inline") -> nearstep.AdamW:
    return nearstep.AdamW(model.named_parameters(), lr=LR, store=path, device=device, slice_mb=SLICE_MB)


def one_step_from(path: Path) -> tuple[torch.Tensor, ...]:
    """The weights after one more step from the store at ``path`` (its masters replace the model's)."""
    model = make_model(seed=11)
    with _optimizer(model, path) as opt:
        loss_of(model, batches(1, seed=99)[0]).backward()
        opt.step()
    return tuple(p.detach().clone() for p in model.parameters())


def files(path: Path) -> dict[str, bytes]:
    """Every file of a store but LOCK (which holds only a pid)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file() and f.name != "LOCK"}


@dataclasses.dataclass(frozen=True)
class Original:
    path: Path
    doc: dict[str, Any]
    weights_after_one_step: tuple[torch.Tensor, ...]


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Original:
    """A store at step 2, kept as it is (tests work on copies), and the weights one step from it."""
    path = tmp_path_factory.mktemp("original") / "store"
    model = make_model()
    with _optimizer(model, path) as opt:
        for batch in batches(2, seed=7):
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad()
    reference = path.with_name("reference")
    shutil.copytree(path, reference)
    return Original(path, json.loads((path / "manifest.json").read_text()), one_step_from(reference))


def store_with(original: Original, where: Path, doc: dict[str, Any]) -> Path:
    """A copy of the original store whose manifest is ``doc``."""
    path = where / "store"
    shutil.copytree(original.path, path)
    (path / "manifest.json").write_text(json.dumps(doc))
    return path


def assert_refused(path: Path, match: str = "manifest.json") -> None:
    """Store.open refuses the store as corrupt, and so does verify_store (by raising, or when
    only the files show it, by reporting); nothing but LOCK changes."""
    before = files(path)
    with pytest.raises(nearstep.StoreCorruptError, match=match):
        Store.open(path)
    try:
        report = nearstep.verify_store(path)
    except nearstep.StoreCorruptError as exc:
        assert "manifest.json" in str(exc), str(exc)
    else:
        assert not report.ok and any("does not describe the slice files" in line for line in report.problems), report
    assert files(path) == before


# ---------------------------------------------------------------------------
# (a) the manifest's meaning: the values the adversary found, one by one


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.update({key: value})


def _first(table: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        if isinstance(d[table], list) and not isinstance(d[table][0], dict):
            d[table][0] = value
        else:
            (d[table][0] if isinstance(d[table], list) else d[table])[key] = value
    return edit


MEANINGLESS = [
    ("param_steps<0", _first("param_steps", "", -1), r"param_steps\[0\] \('embed.weight'\) is -1"),
    ("param_steps>step", _set("step", 1), r"param_steps\[0\] .* is 2; .* from 0 to the store's step, 1"),
    ("state_names reordered", _set("state_names", ["master", "exp_avg_sq", "exp_avg"]),
     r"state_names \['master', 'exp_avg_sq', 'exp_avg'\] are not the state adamw keeps"),
    ("optimizer sgd", _set("optimizer", "sgd"), r"state_names .* are not the state sgd keeps, \['master', 'momentum_buffer'\]"),
    ("optimizer rmsprop", _set("optimizer", "rmsprop"), r"optimizer 'rmsprop' is none of nearstep's: adamw, adam, sgd, lion"),
    ("created_at=1e300", _set("created_at", 1e300), r"created_at 1e\+300 is not a UNIX time"),
    ("committed_at=-1", _set("committed_at", -1.0), r"committed_at -1.0 is not a UNIX time"),
    ("step=1e30", _set("step", 1e30), r"step 1000000000000000019884624838656 is not a step count"),
    ("step=true", _set("step", True), r"step: TypeError: True is not an integer"),
    ("step=0.5", _set("step", 2.5), r"step: TypeError: 2.5 is not an integer"),
    ("counter<0", _set("counters", {"skipped_steps": -3}), r"counters\['skipped_steps'\] is -3, not a count"),
    ("hyperparameter object", _first("hyperparameters", "lr", {"value": 1}), r"hyperparameters\[0\] is not an object of"),
    ("hyperparameter inf", _first("hyperparameters", "lr", math.inf), r"hyperparameters\[0\]"),
    ("store_id", _set("store_id", "mine"), r"store_id 'mine' is not the 32 hexadecimal digits"),
    ("checksum_block", _set("checksum_block", 2**31), r"checksum_block 2147483648 is not a multiple of 4096 bytes up to 1 GiB"),
]


@pytest.mark.parametrize("edit, match", [pytest.param(e, m, id=i) for i, e, m in MEANINGLESS])
def test_a_meaningless_manifest_value_is_refused_naming_its_field(original: Original, tmp_path: Path, capsys,
                                                                   edit: Callable[[dict[str, Any]], None], match: str) -> None:
    doc = copy.deepcopy(original.doc)
    edit(doc)
    path = store_with(original, tmp_path, doc)
    assert_refused(path, match)
    for command in ("inspect", "verify"):  # an exit code and the reason, never a traceback
        assert cli.main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nearstep {command}: error: {path / 'manifest.json'} is not a valid nearstep manifest")
        assert "Restore manifest.json" in err


@pytest.mark.parametrize("edit", [
    pytest.param(_set("state_format", "8bit"), id="state_format"),
    pytest.param(lambda d: d.update(optimizer="lion", state_names=["master", "exp_avg"]), id="lion with its state"),
])
def test_a_manifest_that_does_not_describe_the_files_is_refused_at_open_and_reported_by_verify(
        original: Original, tmp_path: Path, capsys, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = copy.deepcopy(original.doc)
    edit(doc)
    path = store_with(original, tmp_path, doc)
    assert_refused(path, r"manifest.json does not describe the slice files: .* slice 0 \(head.bias, head.weight, .*\) "
                         r"takes [0-9,]+ bytes a file, but both its files hold 24,576")
    assert cli.main(["verify", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    for role in ("committed", "spare: the next step writes it"):  # each file keeps its own line
        assert any(line.endswith(f"(slice 0, {role})") and ": 24,576 bytes, expected" in line for line in out), out
    assert any(line.startswith("slice 0: ") and "does not describe the slice files" in line for line in out), out
    assert re.fullmatch(r"[12] of 2 slices bad \(step 2\)", out[-1]), out


def test_one_damaged_file_still_opens_for_verify_to_name(original: Original, tmp_path: Path) -> None:
    # Damage to one file is not a manifest that lies about the layout: the store opens (so
    # that Store.verify and the checksum of the read name the file), as before.
    path = store_with(original, tmp_path, original.doc)
    victim = path / "slices" / f"s000001.g{original.doc['committed'][1]['generation']}"
    os.truncate(victim, 4096)
    with Store.open(path) as store:
        problems = store.verify()
    assert len(problems) == 1 and problems[0].startswith("slice 1") and victim.name in problems[0]
    report = nearstep.verify_store(path)
    assert report.bad_slices == (1,) and not any("does not describe" in line for line in report.problems)


def test_create_and_commit_refuse_what_open_would_refuse(tmp_path: Path) -> None:
    path = tmp_path / "s"
    for kwargs, match in (({"optimizer": "rmsprop"}, "optimizer 'rmsprop'"),
                          ({"state_names": ("exp_avg_sq", "exp_avg")}, "state_names"),
                          ({"hyperparameters": [{"lr": math.nan}]}, r"hyperparameters\[0\]")):
        with pytest.raises(ValueError, match=f"cannot create a store at {path}: .*{match}.*Nothing was created"):
            _small_store(path, **kwargs)
        assert not path.exists()
    with _small_store(path) as store:
        text = (path / "manifest.json").read_text()
        with pytest.raises(ValueError, match=r"cannot commit step 1 .* param_steps\[0\] .* is 2; .* Nothing was "
                                             r"committed; the store stays at step 0"):
            store.commit(dataclasses.replace(store.manifest, step=1, param_steps=(2,)))
        assert (path / "manifest.json").read_text() == text and store.manifest.step == 0
        store.commit(dataclasses.replace(store.manifest, step=1, param_steps=(1,)))
    with Store.open(path) as again:
        assert again.manifest.step == 1 and again.verify() == []


def test_inspect_shows_a_time_it_cannot_convert_instead_of_failing(original: Original) -> None:
    manifest = dataclasses.replace(read_manifest(original.path), created_at=1e300, committed_at=1e18)
    info = tools.StoreInfo(original.path, manifest, tools.LockState(False), 0, 0)
    text = tools.format_store_info(info)
    assert "created      1e+300 (not a time this system can show)" in text
    assert info.to_dict()["committed_at"].startswith("1e+18 (not a time")


# ---------------------------------------------------------------------------
# (a) the property: a meaningful-looking edit is refused as corrupt, or is harmless

CORRUPT, MISMATCH, HARMLESS = "corrupt", "mismatch", "harmless"
huge_counts = st.sampled_from([MAX_STEP + 1, 2**63, 2**64, 10**30]) | st.floats(min_value=2.0**53 * 1.01, max_value=1e308)
not_integers = st.sampled_from([0.5, 2.5, True, False, "2", None, [2], {"n": 2}])
bad_times = (st.floats(min_value=2.6e11, max_value=1e308) | st.floats(min_value=-1e308, max_value=-1e-3)
             | st.sampled_from([math.inf, -math.inf, math.nan]))
json_scalars = (st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=6))
OTHER_FORMATS = [f for f in formats.FORMAT_NAMES if f not in ("fp32", "bf16-kahan")]  # bf16-kahan: same size as fp32


def _single_segment_params(d: dict[str, Any]) -> list[int]:
    seen: dict[int, int] = {}
    for s in d["slices"]:
        for g in s["segments"]:
            seen[g["param"]] = seen.get(g["param"], 0) + 1
    return sorted(i for i, n in seen.items() if n == 1)


def _grow_a_param(draw: Any, d: dict[str, Any]) -> set[str]:
    """A parameter's shape and its segment grown together: consistent, but not this model's."""
    i = draw(st.sampled_from(_single_segment_params(d)))
    shape = d["params"][i]["shape"]
    shape[0] += draw(st.integers(1, 300))
    for s in d["slices"]:
        for g in s["segments"]:
            if g["param"] == i:
                g["length"] = math.prod(shape)
    return {CORRUPT, MISMATCH}  # the files' size tells, when the growth crosses a page


def _transpose_a_param(draw: Any, d: dict[str, Any]) -> set[str]:
    i = draw(st.sampled_from([i for i, p in enumerate(d["params"]) if len(p["shape"]) == 2]))
    d["params"][i]["shape"].reverse()
    return {MISMATCH}  # the same elements: only the model can tell


def _param_steps_wrong(draw: Any, d: dict[str, Any]) -> set[str]:
    i = draw(st.integers(0, len(d["param_steps"]) - 1))
    d["param_steps"][i] = draw(st.integers(-2**70, -1) | st.integers(d["step"] + 1, 2**70) | huge_counts | not_integers)
    return {CORRUPT}


def _optimizer_with_another_state(draw: Any, d: dict[str, Any]) -> set[str]:
    kind = draw(st.sampled_from(["sgd", "lion"]))
    d["optimizer"] = kind
    if draw(st.booleans()):  # and its state names: then only the files' size tells
        d["state_names"] = ["master", *rules.state_names(rules.KERNELS[kind])]
    return {CORRUPT}


def _counter(draw: Any, d: dict[str, Any], value: Any) -> None:
    d["counters"][draw(st.sampled_from(["skipped_steps", "spike_clipped", "update_clipped"]))] = draw(value)


def _hyperparameter(draw: Any, d: dict[str, Any], value: Any) -> None:
    d["hyperparameters"][0][draw(st.sampled_from(["lr", "beta1", "note"]))] = draw(value)


EDITS: dict[str, Callable[[Any, dict[str, Any]], set[str]]] = {
    "step<0": lambda draw, d: d.update(step=draw(st.integers(-2**70, -1))) or {CORRUPT},
    "step huge": lambda draw, d: d.update(step=draw(huge_counts)) or {CORRUPT},
    "step not an integer": lambda draw, d: d.update(step=draw(not_integers)) or {CORRUPT},
    "step<param_steps": lambda draw, d: d.update(step=draw(st.integers(0, max(d["param_steps"]) - 1))) or {CORRUPT},
    "step raised": lambda draw, d: d.update(step=draw(st.integers(d["step"], 2**40))) or {HARMLESS},
    "param_steps": _param_steps_wrong,
    "state_names permuted": lambda draw, d: d.update(
        state_names=draw(st.permutations(d["state_names"]).filter(lambda p: p != d["state_names"]))) or {CORRUPT},
    "state_names of another kernel": lambda draw, d: d.update(state_names=draw(st.sampled_from(
        [["master", "momentum_buffer"], ["master", "exp_avg"], ["master"], ["master", "exp_avg", "exp_avg_sq", "exp_avg"]]))) or {CORRUPT},
    "optimizer with another state": _optimizer_with_another_state,
    "optimizer unknown": lambda draw, d: d.update(optimizer=draw(st.text(max_size=8).filter(lambda s: s not in rules.KERNELS))) or {CORRUPT},
    "optimizer adam": lambda draw, d: d.update(optimizer="adam") or {MISMATCH},  # adamw's state; nearstep.AdamW refuses it
    "time wrong": lambda draw, d: d.update({draw(st.sampled_from(["created_at", "committed_at"])): draw(bad_times)}) or {CORRUPT},
    "time moved": lambda draw, d: d.update({draw(st.sampled_from(["created_at", "committed_at"])):
                                            draw(st.floats(min_value=0.0, max_value=253402300799.0))}) or {HARMLESS},
    "counter wrong": lambda draw, d: _counter(draw, d, st.integers(-2**70, -1) | st.integers(2**63, 2**70) | not_integers) or {CORRUPT},
    "counter set": lambda draw, d: _counter(draw, d, st.integers(0, 2**40)) or {HARMLESS},
    "hyperparameter wrong": lambda draw, d: _hyperparameter(draw, d, st.sampled_from([math.inf, -math.inf, math.nan, {"a": 1}])
                                                            | st.lists(st.just({"a": 1}), min_size=1, max_size=2)) or {CORRUPT},
    "hyperparameter group wrong": lambda draw, d: d["hyperparameters"].__setitem__(0, draw(json_scalars | st.lists(json_scalars, max_size=3)))
                                                  or {CORRUPT},
    "hyperparameter changed": lambda draw, d: _hyperparameter(draw, d, json_scalars | st.lists(json_scalars, max_size=3)) or {HARMLESS},
    "checksum_block": lambda draw, d: d.update(checksum_block=draw(st.sampled_from([0, -4096, 4097, 2**31, 2**40]) | not_integers)) or {CORRUPT},
    "store_id wrong": lambda draw, d: d.update(store_id=draw(st.text(max_size=40).filter(lambda s: not store_module._STORE_ID.fullmatch(s))))
                                      or {CORRUPT},
    "store_id new": lambda draw, d: d.update(store_id=draw(st.uuids()).hex) or {HARMLESS},
    "param_stats": lambda draw, d: d["param_stats"].update({draw(st.sampled_from(store_module.PARAM_STATS)): draw(
        st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=len(d["params"]), max_size=len(d["params"])))}) or {HARMLESS},
    "state_format": lambda draw, d: d.update(state_format=draw(st.sampled_from(OTHER_FORMATS))) or {CORRUPT},
    "param grown": _grow_a_param,
    "param transposed": _transpose_a_param,
    "param renamed": lambda draw, d: d["params"][draw(st.integers(0, len(d["params"]) - 1))].update(name="renamed") or {MISMATCH},
    "param dtype": lambda draw, d: d["params"][draw(st.integers(0, len(d["params"]) - 1))].update(
        dtype=draw(st.sampled_from(["bfloat16", "float16"]))) or {CORRUPT, MISMATCH},
}


@st.composite
def edited_manifests(draw: Any, valid: dict[str, Any]) -> tuple[str, dict[str, Any], set[str]]:
    name = draw(st.sampled_from(sorted(EDITS)))
    doc = copy.deepcopy(valid)
    allowed = EDITS[name](draw, doc)
    return name, doc, allowed


def _outcome(path: Path, original: Original) -> str:
    """What the store does: refused as corrupt, refused by the optimizer as another model's, or the original's step."""
    before = files(path)
    try:
        Store.open(path).close()
    except nearstep.StoreCorruptError:
        assert_refused(path)
        return CORRUPT
    report = nearstep.verify_store(path)
    assert report.ok, report.problems
    try:
        weights = one_step_from(path)
    except nearstep.StoreMismatchError:
        assert files(path) == before  # refused before anything was written
        return MISMATCH
    same = all(torch.equal(a, b) for a, b in zip(weights, original.weights_after_one_step))
    return HARMLESS if same else "trained to other weights"


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_edited_manifest_is_refused_as_corrupt_or_is_harmless(original: Original, data: Any) -> None:
    name, doc, allowed = data.draw(edited_manifests(original.doc))
    with tempfile.TemporaryDirectory() as where:
        got = _outcome(store_with(original, Path(where), doc), original)
    event(f"{name}: {got}")
    assert got in allowed, f"{name}: {got}, expected {sorted(allowed)}"
    # Any other exception (ValueError, OverflowError, KeyError, ...) fails the test.


# ---------------------------------------------------------------------------
# (b) the lock cannot be stolen by deleting LOCK

HOLDER = """
import sys
from nearstep.store import Store
store = Store.open(sys.argv[1])
print("holding", flush=True)
sys.stdin.readline()
store.close()
"""


def test_deleting_lock_lets_no_second_trainer_in(original: Original, tmp_path: Path, capsys) -> None:
    path = store_with(original, tmp_path, original.doc)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(nearstep.StoreLockedError, match=f"in use by process {holder.pid} "):
            Store.open(path)
        (path / "LOCK").unlink()  # "clearing a stale lock" by hand
        before = files(path)
        with pytest.raises(nearstep.StoreLockedError, match="in use by process unknown .*LOCK.* missing or empty"):
            Store.open(path)
        with pytest.raises(nearstep.StoreLockedError, match="in use by process unknown"):
            _optimizer(make_model(), path)
        assert files(path) == before  # the refused trainer wrote nothing
        assert nearstep.inspect_store(path).lock == tools.LockState(True, None)
        with pytest.raises(nearstep.StoreLockedError, match=f"cannot verify {path} while it is in use: .*nothing was checked"):
            nearstep.verify_store(path)
        assert cli.main(["verify", str(path)]) == 2
        assert "while it is in use" in capsys.readouterr().err
        with pytest.raises(nearstep.StoreLockedError, match="the demo store .* is in use"):
            demo.replace_demo_store(path)
        assert files(path) == before
    finally:
        with contextlib.suppress(BrokenPipeError):  # a holder that failed to start says so on stderr
            holder.stdin.write("\n")
            holder.stdin.close()
        holder.wait(60)
    assert nearstep.inspect_store(path).lock == tools.LockState(False)
    with Store.open(path) as store:  # released when its holder closed it
        assert (path / "LOCK").read_text() == f"{os.getpid()}\n" and store.verify() == []


def test_a_store_held_in_this_process_is_named_as_such(original: Original, tmp_path: Path) -> None:
    path = store_with(original, tmp_path, original.doc)
    with Store.open(path):
        with pytest.raises(nearstep.StoreLockedError, match=f"in use by process {os.getpid()}, which is this process: "
                                                            r"an optimizer \(or Store\) .* Call that object's close\(\)") as caught:
            Store.open(path)
        assert "Stop that process" not in str(caught.value)
        assert nearstep.inspect_store(path).lock == tools.LockState(True, os.getpid())


@pytest.mark.parametrize("device", ["inline", "emulated"])
def test_an_optimizer_dropped_without_close_lets_the_next_one_in(original: Original, tmp_path: Path, device: str) -> None:
    path = store_with(original, tmp_path, original.doc)
    model = make_model()
    gc.disable()  # only the collector (called by the next open) may free the dropped optimizer
    try:
        dropped = _optimizer(model, path, device)
        dropped.cycle = dropped  # unreachable once dropped, but freed only by the garbage collector
        alive = weakref.ref(dropped)
        del dropped
        assert alive() is not None
        with _optimizer(model, path, device) as opt:
            assert alive() is None and opt.stats()["step"] == 2
    finally:
        gc.enable()


# ---------------------------------------------------------------------------
# (c) paths, read-only file systems, free space


def _small_store(path: Path | str, **kwargs: Any) -> Store:
    args: dict[str, Any] = dict(params=[ParamSpec("w", (3000,), "float32", 0)], masters=lambda i: torch.zeros(3000),
                                optimizer="adamw", state_names=rules.state_names(rules.AdamWHyper),
                                hyperparameters=[{"lr": 1e-3}])
    return Store.create(path, **{**args, **kwargs})


def test_a_path_that_is_a_file_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"not a store")
    for attempt in (_small_store, Store.open):
        with pytest.raises(errors.StorePathError, match=f"{target} is a file, not a directory. A store is a directory"):
            attempt(target)
    with pytest.raises(errors.StorePathError, match=f"{target} is a file, not a directory, so the store directory "
                                                    f"{target / 'sub'} cannot be made in it"):
        _small_store(target / "sub")
    assert target.read_bytes() == b"not a store" and sorted(tmp_path.iterdir()) == [target]


def test_an_empty_path_is_refused_before_anything_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("a user's file")
    for attempt in (_small_store, Store.open):
        with pytest.raises(errors.StorePathError, match="an empty path is not a store directory") as caught:
            attempt("")
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, nearstep.StoreError)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_a_read_only_file_system_is_a_permission_error_saying_where_to_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _small_store(tmp_path / "s"):
        pass
    real_mkdir, real_open = os.mkdir, os.open

    def read_only(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(file: Any, flags: Any = 0o777, *args: Any, **kwargs: Any) -> Any:
            writes = real is real_mkdir or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if str(file).startswith(str(tmp_path)) and writes:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            return real(file, flags, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "mkdir", read_only(real_mkdir))
    monkeypatch.setattr(os, "open", read_only(real_open))
    with pytest.raises(nearstep.StorePermissionError, match="file system there is mounted read-only.*Pass a directory "
                                                            "on a writable disk") as caught:
        _small_store(tmp_path / "new" / "s")
    assert caught.value.errno == errno.EROFS
    for attempt in (Store.open, nearstep.verify_store):
        with pytest.raises(nearstep.StorePermissionError, match="is mounted read-only.*copy the store to a writable disk"):
            attempt(tmp_path / "s")
    assert nearstep.inspect_store(tmp_path / "s").lock == tools.LockState(False)  # reading needs no write access
    monkeypatch.undo()
    assert not (tmp_path / "new").exists()


def test_the_free_space_message_gives_small_sizes_in_small_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda _p: usage(3 * 2**30, 3 * 2**30, 1000))
    with pytest.raises(nearstep.DiskFullError) as caught:
        _small_store(tmp_path / "s")
    text = str(caught.value)
    assert "needs 72.00 KiB (two generations of 36.00 KiB) but" in text and "has only 1,000 B free" in text, text
    assert "0.00" not in text and "of 3 GiB" in text
    assert store_module._size_text(5 * 2**20 + 2**19) == "5.50 MiB" and store_module._size_text(3 * 2**30) == "3.00 GiB"
