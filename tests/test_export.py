"""`nearstep export` keeps every tensor, and gets one consistent step from a store that commits fast."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import nearstep
from nearstep import tools
from conftest import batches, loss_of, make_model


def _groups_by_submodule(model: torch.nn.Module) -> list[dict]:
    # named_parameters() of each submodule: "weight" and "bias" in every group.
    return [{"params": list(model.proj.named_parameters())}, {"params": list(model.head.named_parameters())},
            {"params": list(model.embed.named_parameters()) + list(model.norm.named_parameters())}]


def test_repeated_names_are_refused_naming_them_and_by_position_keeps_every_tensor(tmp_path: Path) -> None:
    model = make_model()
    with nearstep.AdamW(_groups_by_submodule(model), lr=1e-2, store=tmp_path / "s", device="inline") as opt:
        for batch in batches(2):
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad()
    with pytest.raises(nearstep.StoreError, match=r"names 2 of its parameter names more than once \('bias', 'weight'; "
                                                  r"7 of its 7 tensors share them\).*--by-position.*Nothing was written"):
        tools.export_safetensors(tmp_path / "s", tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()
    result = tools.export_safetensors(tmp_path / "s", tmp_path / "w.safetensors", by_position=True)
    loaded = load_file(tmp_path / "w.safetensors")
    order = [p for group in _groups_by_submodule(model) for _name, p in group["params"]]
    assert result.tensors == len(order) == len(loaded) == 7 and result.positional_names
    names = [f"group{g}.param{i}" for g, group in enumerate(_groups_by_submodule(model)) for i in range(len(group["params"]))]
    assert sorted(loaded) == sorted(names) and all(nearstep.store.is_positional_name(n) for n in names)
    assert all(torch.equal(loaded[n], p.detach()) for n, p in zip(names, order))
    assert not torch.equal(loaded["group0.param0"], make_model().proj.weight.detach())  # trained, not initial
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        original = json.loads(f.metadata()["nearstep.names"])
    assert original == dict(zip(names, [n for group in _groups_by_submodule(model) for n, _p in group["params"]]))


def test_the_command_takes_by_position(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model()
    with nearstep.AdamW(_groups_by_submodule(model), lr=1e-2, store=tmp_path / "s", device="inline"):
        pass
    assert tools.main(["export", str(tmp_path / "s"), str(tmp_path / "a.safetensors")]) == 1
    assert "more than once" in capsys.readouterr().err
    assert tools.main(["export", str(tmp_path / "s"), str(tmp_path / "a.safetensors"), "--by-position"]) == 0
    assert "wrote 7 tensors" in capsys.readouterr().out


def test_export_while_training_commits_fast_gets_one_whole_step(tmp_path: Path) -> None:
    # Training commits every few milliseconds in a thread; every export names a step and holds
    # exactly the weights the model had after that step.
    model = make_model()
    path = tmp_path / "s"
    after: dict[int, list[torch.Tensor]] = {}
    stop = threading.Event()
    opt = nearstep.AdamW(model.named_parameters(), lr=1e-2, store=path, device="emulated", slice_mb=0.004)
    after[0] = [p.detach().clone() for p in model.parameters()]
    failures: list[BaseException] = []

    def train() -> None:
        try:
            data = batches(8)
            step = 0
            while not stop.is_set() and step < 2000:
                loss_of(model, data[step % 8]).backward()
                opt.step()  # sync mode: committed and in the model when it returns
                opt.zero_grad()
                step += 1
                after[step] = [p.detach().clone() for p in model.parameters()]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    trainer = threading.Thread(target=train)
    trainer.start()
    exported = []
    try:
        for k in range(12):
            out = tmp_path / f"w{k}.safetensors"
            result = tools.export_safetensors(path, out)
            exported.append((result.step, load_file(out)))
    finally:
        stop.set()
        trainer.join(60)
        opt.close()
    assert not failures, failures
    names = [n for n, _p in make_model().named_parameters()]
    steps = [s for s, _t in exported]
    assert steps == sorted(steps) and steps[-1] > steps[0]  # the store moved while we exported
    for step, tensors in exported:
        assert all(torch.equal(tensors[n], w) for n, w in zip(names, after[step])), step


# -- the read rule, with the race made to happen: training steps run inside the read ---------


class _Trainer:
    """An inline optimizer on a model in several slices; ``weights[k]`` are the model's after step k."""

    def __init__(self, path: Path) -> None:
        self.model = make_model()
        self.opt = nearstep.AdamW(self.model.named_parameters(), lr=1e-2, store=path, device="inline", slice_mb=0.004)
        self.data = batches(4)
        self.weights = {0: self._now()}

    def _now(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            loss_of(self.model, self.data[len(self.weights) % 4]).backward()
            self.opt.step()  # inline: committed when it returns
            self.opt.zero_grad()
            self.weights[len(self.weights)] = self._now()


def _train_during_reads(monkeypatch: pytest.MonkeyPatch, trainer: _Trainer, steps: int, reads: int) -> list[int]:
    """After the first slice of each of the first ``reads`` reads, ``steps`` training steps commit.
    Returns the manifest step each read started from."""
    started: list[int] = []

    class SlowView(tools.Store):
        def read_slice(self, index, pool=None):  # type: ignore[no-untyped-def]
            out = super().read_slice(index, pool)
            if index == 0:
                started.append(self.manifest.step)
                if len(started) <= reads:
                    trainer.step(steps)  # the rest of this read sees the store moved on
            return out

    monkeypatch.setattr(tools, "Store", SlowView)
    return started


def _assert_step(result: tuple, trainer: _Trainer, step: int) -> None:
    manifest, masters = result
    assert manifest.step == step and len(manifest.slices) >= 3
    names = [p.name for p in manifest.params]
    assert all(torch.equal(m, trainer.weights[step][n]) for n, m in zip(names, masters)), step
    # ...and those are no other step's: every step changed the weights.
    assert all(not torch.equal(w["embed.weight"], trainer.weights[step]["embed.weight"])
               for k, w in trainer.weights.items() if k != step)


def test_a_read_the_store_moved_one_commit_past_is_taken_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Step 2 writes the generation step 1 does not name: the rest of step 1's slices are intact,
    # so the read is that commit even though the manifest moved meanwhile.
    trainer = _Trainer(tmp_path / "s")
    try:
        trainer.step()
        started = _train_during_reads(monkeypatch, trainer, steps=1, reads=1)
        result = tools.read_masters(tmp_path / "s")
        assert started == [1] and tools.read_manifest(tmp_path / "s").step == 2
        _assert_step(result, trainer, 1)
    finally:
        trainer.opt.close()


def test_a_read_the_step_after_the_next_overwrote_is_never_mixed_but_read_again(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Slice 0 is read from step 1; then steps 2 and 3 commit, and step 3 rewrote every slice of step
    # 1's generation. Taking the read would mix step 1 (slice 0) with step 3: the checksums refuse
    # it and the read starts over from step 3's manifest.
    trainer = _Trainer(tmp_path / "s")
    try:
        trainer.step()
        started = _train_during_reads(monkeypatch, trainer, steps=2, reads=1)
        result = tools.read_masters(tmp_path / "s")
        assert started == [1, 3]
        _assert_step(result, trainer, 3)
    finally:
        trainer.opt.close()


def test_a_store_that_never_holds_still_long_enough_gives_up_in_time_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _Trainer(tmp_path / "s")
    try:
        started = _train_during_reads(monkeypatch, trainer, steps=2, reads=10**6)
        with pytest.raises(nearstep.StoreError, match=r"committed a new step during each of \d+ reads in 0.5 s.*"
                                                      r"when training pauses.*longer timeout") as caught:
            tools.export_safetensors(tmp_path / "s", tmp_path / "w.safetensors", timeout=0.5)
        # Each read started from the newest manifest (two steps on from the last) and was counted.
        assert started == [2 * k for k in range(len(started))]
        assert f"during each of {len(started)} reads" in str(caught.value)
        assert not list(tmp_path.glob("*.safetensors*")) and not list(tmp_path.glob(".w.safetensors*"))
    finally:
        trainer.opt.close()
