"""Bad arguments to an optimizer are refused with what to do, before anything is written."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nearstep


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))


def test_only_empty_param_groups_are_refused_before_a_store_is_made(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every param group is empty"):
        nearstep.AdamW([{"params": []}, {"params": []}], store=tmp_path / "s", device="inline")
    assert not (tmp_path / "s").exists()
    # One empty group beside a full one is fine, as in torch.
    model = _model()
    with nearstep.AdamW([{"params": []}, {"params": list(model.parameters())}], store=tmp_path / "t",
                        device="inline") as opt:
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        assert opt.stats()["step"] == 1


def test_an_empty_store_path_creates_nothing_in_the_current_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="empty path"):
        nearstep.AdamW(_model().parameters(), store="", device="inline")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_a_store_path_that_is_a_file_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"not a store")
    with pytest.raises(nearstep.StoreError, match="is a file, not a directory"):
        nearstep.AdamW(_model().parameters(), store=target, device="inline")
    assert target.read_bytes() == b"not a store"


@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0, 0.0, "1", True])
def test_slice_mb_must_be_a_positive_finite_number(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match="slice_mb must be a positive, finite number"):
        nearstep.AdamW(_model().parameters(), store=tmp_path / "s", device="inline", slice_mb=value)
    assert not (tmp_path / "s").exists()


def test_a_slice_mb_that_would_make_too_many_slices_is_refused_before_writing(tmp_path: Path) -> None:
    big = torch.nn.Linear(400, 400)  # 160,400 elements: one per slice at slice_mb=1e-9
    with pytest.raises(ValueError, match=r"160,400 slices.*at most [0-9,]+.*slice_mb=([0-9.e-]+) or more") as refused:
        nearstep.AdamW(big.parameters(), store=tmp_path / "s", device="inline", slice_mb=1e-9)
    assert not (tmp_path / "s").exists()
    # The slice_mb the message names works.
    advised = float(re.search(r"slice_mb=([0-9.e-]+) or more", str(refused.value)).group(1))
    with nearstep.AdamW(big.parameters(), store=tmp_path / "ok", device="inline", slice_mb=advised) as opt:
        assert len(opt.store.manifest.slices) <= nearstep.store.MAX_SLICES


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_the_open_file_limit_is_raised_up_to_the_hard_limit_for_many_slices(tmp_path: Path) -> None:
    # 300 slices need 2 * 300 + 256 descriptors: above a soft limit of 400, below a hard one of 2000.
    done = _run(f"""
        import resource, torch, nearstep
        resource.setrlimit(resource.RLIMIT_NOFILE, (400, 2000))
        model = torch.nn.Linear(300, 1, bias=False)
        slice_mb = 1 / 2**20 * 4  # one element per slice
        with nearstep.AdamW(model.parameters(), store={str(tmp_path / "s")!r}, device="inline", slice_mb=slice_mb) as opt:
            model(torch.randn(2, 300)).sum().backward()
            opt.step()
            print(len(opt.store.manifest.slices), resource.getrlimit(resource.RLIMIT_NOFILE)[0], opt.stats()["step"])
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    slices, soft, step = map(int, done.stdout.split())
    assert slices == 300 and soft >= 2 * 300 and step == 1


def test_the_slice_cap_follows_a_low_hard_open_file_limit() -> None:
    done = _run("""
        import resource, torch, nearstep
        resource.setrlimit(resource.RLIMIT_NOFILE, (400, 1000))
        try:
            nearstep.AdamW(torch.nn.Linear(1000, 1).parameters(), store="/nonexistent/never", slice_mb=4 / 2**20)
        except ValueError as exc:
            print(exc)
    """)
    assert "files of at most 372 open" in done.stdout and "Nothing was written" in done.stdout, done.stderr[-2000:]


def test_a_store_with_more_slices_than_the_hard_limit_allows_is_refused_at_open(tmp_path: Path) -> None:
    model = torch.nn.Linear(300, 1, bias=False)
    with nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="inline", slice_mb=4 / 2**20) as opt:
        assert len(opt.store.manifest.slices) == 300
    before = sorted(p.name for p in (tmp_path / "s" / "slices").iterdir())
    done = _run(f"""
        import resource, torch, nearstep
        resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))
        model = torch.nn.Linear(300, 1, bias=False)
        try:
            nearstep.AdamW(model.parameters(), store={str(tmp_path / "s")!r}, device="inline")
        except nearstep.DeviceError as exc:
            print("refused:", exc)
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "300 slices" in done.stdout and "RLIMIT_NOFILE" in done.stdout
    assert sorted(p.name for p in (tmp_path / "s" / "slices").iterdir()) == before
    assert nearstep.verify_store(tmp_path / "s").problems == ()
