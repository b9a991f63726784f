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
    with pytest.raises(nearstep.StoreError, match=r"names 2 of its parameter names more than once \('bias', 'weight'\).*"
                                                  r"--by-position.*Nothing was written"):
        tools.export_safetensors(tmp_path / "s", tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()
    result = tools.export_safetensors(tmp_path / "s", tmp_path / "w.safetensors", by_position=True)
    loaded = load_file(tmp_path / "w.safetensors")
    order = [p for group in _groups_by_submodule(model) for _name, p in group["params"]]
    assert result.tensors == len(order) == len(loaded) == 7 and result.positional_names
    names = [f"group{g}.param{i}" for g, group in enumerate(_groups_by_submodule(model)) for i in range(len(group["params"]))]
    assert all(torch.equal(loaded[n], p.detach()) for n, p in zip(names, order))
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        original = json.loads(f.metadata()["nearstep.names"])
    assert original == [n for group in _groups_by_submodule(model) for n, _p in group["params"]]


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
