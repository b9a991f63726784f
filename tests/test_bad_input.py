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


def test_a_slice_mb_that_would_make_too_many_slices_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 40,200 elements; slice_mb=1e-9 cuts them in pieces of SPLIT_ALIGN (64) elements: 629 slices,
    # over a cap lowered to 100 here (the real one, 65,536, would make the advised store slow to write).
    monkeypatch.setattr(nearstep.optim, "MAX_SLICES", 100)
    big = torch.nn.Linear(200, 200)
    with pytest.raises(ValueError, match=r"629 slices.*at most 100\b.*slice_mb=([0-9.e-]+) or more") as refused:
        nearstep.AdamW(big.parameters(), store=tmp_path / "s", device="inline", slice_mb=1e-9)
    assert not (tmp_path / "s").exists()
    # The slice_mb the message names works.
    advised = float(re.search(r"slice_mb=([0-9.e-]+) or more", str(refused.value)).group(1))
    with nearstep.AdamW(big.parameters(), store=tmp_path / "ok", device="inline", slice_mb=advised) as opt:
        assert len(opt.store.manifest.slices) <= 100


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_the_open_file_limit_is_raised_up_to_the_hard_limit_for_many_slices(tmp_path: Path) -> None:
    # 300 slices need 2 * 300 + 256 descriptors: above a soft limit of 400, below a hard one of 2000.
    done = _run(f"""
        import resource, torch, nearstep
        resource.setrlimit(resource.RLIMIT_NOFILE, (400, 2000))
        model = torch.nn.Linear(300 * 64, 1, bias=False)
        slice_mb = 64 * 4 / 2**20  # 64 elements per slice
        with nearstep.AdamW(model.parameters(), store={str(tmp_path / "s")!r}, device="inline", slice_mb=slice_mb) as opt:
            model(torch.randn(2, 300 * 64)).sum().backward()
            opt.step()
            print(len(opt.store.manifest.slices), resource.getrlimit(resource.RLIMIT_NOFILE)[0], opt.stats()["step"])
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    slices, soft, step = map(int, done.stdout.split())
    assert slices == 300 and soft >= 2 * 300 and step == 1


@pytest.mark.parametrize("backend", ["inline", "emulated"])
def test_more_slices_than_the_open_file_limit_allows_train_as_torch(backend: str, tmp_path: Path) -> None:
    # 300 slices of 64 elements are 600 files; a hard limit of 400 leaves the device 144 at once, so it opens
    # and closes them on demand (slicefiles.py), syncing a written file before closing it. The
    # run is torch's AdamW bit for bit, and a second run resumes the store under the same limit.
    done = _run(f"""
        import resource, torch, nearstep
        resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))
        torch.manual_seed(0)
        model = torch.nn.Linear(300 * 64, 1, bias=False)
        twin = torch.nn.Linear(300 * 64, 1, bias=False)
        twin.load_state_dict(model.state_dict())
        ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True)
        batches = [torch.randn(4, 300 * 64) for _ in range(4)]
        def train(opt, m, xs):
            for x in xs:
                m(x).square().sum().backward()
                opt.step()
                opt.zero_grad()
        store = {str(tmp_path / "s")!r}
        with nearstep.AdamW(model.parameters(), lr=1e-2, store=store, device={backend!r}, slice_mb=256 / 2**20) as opt:
            train(opt, model, batches[:2])
            stats = opt.stats()
            print(len(opt.store.manifest.slices))
        with nearstep.AdamW(model.parameters(), lr=1e-2, store=store, device={backend!r}) as opt:
            train(opt, model, batches[2:])
        train(ref, twin, batches)
        print(int(torch.equal(model.weight, twin.weight)), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    slices, equal, soft = map(int, done.stdout.split())
    assert slices == 300 and equal == 1 and soft == 400
    assert nearstep.verify_store(tmp_path / "s").problems == ()


def test_a_70b_parameter_plan_passes_the_checks_under_1024_descriptors() -> None:
    # Automatic slicing of 70B parameters: 64 MiB slices, about 4,200 of them (8,400 files).
    done = _run("""
        import resource
        from nearstep import store, device
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
        specs = tuple(store.ParamSpec(f"layer{i}.weight", (8192, 8192 * 13 // 10), "bfloat16", 0) for i in range(800))
        slice_mb = store.auto_slice_mb(specs)
        planned = len(store.plan_slices(specs, int(slice_mb * 2**20)))
        store.check_slice_count(planned, slice_mb, sum(s.numel for s in specs))
        device.ensure_file_limit(planned)
        from nearstep.slicefiles import file_budget
        print(sum(s.numel for s in specs) // 10**9, slice_mb, planned, file_budget())
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    billions, slice_mb, planned, budget = done.stdout.split()
    assert int(billions) == 69 and float(slice_mb) == 64.0 and int(planned) > 4000 and int(budget) == 1024 - 256
