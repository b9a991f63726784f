"""Limits of the machine are checked when the optimizer is built, with errors that say what to do:
the shared staging memory against /dev/shm, the memory budget against the slices, and a Ctrl-C
while the device starts leaves one traceback and a free store.

(The open-file limit against the slice count is in test_bad_input.py.)
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import nearstep
from nearstep import staging
from nearstep.store import read_manifest
from conftest import batches, loss_of, make_model


def _same_as_reference(model: torch.nn.Module, steps: int, **opt_kwargs: object) -> None:
    """``model`` trained ``steps`` steps equals the same training with the inline device."""
    ref = make_model()
    with nearstep.AdamW(ref.named_parameters(), lr=1e-2, device="inline", slice_mb=0.004,
                        store=opt_kwargs.pop("ref_store")) as opt:
        for batch in batches(steps):
            loss_of(ref, batch).backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def _train(model: torch.nn.Module, opt: nearstep.AdamW, steps: int) -> None:
    for batch in batches(steps):
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 256 KiB tmpfs: a /dev/shm far too small for TinyNet's staging arena (Docker's default
    64 MiB is the same situation for a model of 20M parameters)."""
    where = tmp_path / "shm"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_staging_larger_than_its_tmpfs_is_refused_when_the_optimizer_is_built(tiny_tmpfs: Path, tmp_path: Path) -> None:
    model = torch.nn.Linear(512, 512)  # 1 MiB of fp32 weights: 2 MiB of staging, 8x the tmpfs
    config = nearstep.DeviceConfig(staging_dir=str(tiny_tmpfs))
    with pytest.raises(nearstep.StagingSpaceError, match=r"needs 2\.0 MiB but .* has 0\.\d MiB free.*--shm-size.*staging_dir"):
        nearstep.AdamW(model.parameters(), store=tmp_path / "s", device=config, mode="sync")
    assert list(tiny_tmpfs.iterdir()) == []  # nothing left behind on the tmpfs
    # The store it made is sound and at step 0; staging on a local disk directory trains on it.
    assert read_manifest(tmp_path / "s").step == 0
    disk = tmp_path / "staging"
    disk.mkdir()
    with nearstep.AdamW(model.parameters(), store=tmp_path / "s", device=nearstep.DeviceConfig(staging_dir=str(disk))) as opt:
        model(torch.randn(4, 512)).square().mean().backward()
        opt.step()
        assert opt.stats()["step"] == 1
    assert nearstep.verify_store(tmp_path / "s").ok


def test_a_full_shm_is_a_clear_error_even_where_tmpfs_cannot_be_mounted(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging.os, "posix_fallocate", full)
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(nearstep.StagingSpaceError, match="staging memory .* needs .* free. Give it more"):
        staging.SharedMemory(1 << 20)
    assert set(os.listdir("/dev/shm")) <= before


def test_staging_on_a_disk_directory_trains_as_the_default(tmp_path: Path) -> None:
    disk = tmp_path / "staging"
    disk.mkdir()
    model = make_model()
    config = nearstep.DeviceConfig(staging_dir=str(disk))
    with nearstep.AdamW(model.named_parameters(), lr=1e-2, store=tmp_path / "s", device=config, mode="overlap",
                        model=model, slice_mb=0.004) as opt:
        _train(model, opt, 4)
        assert list(disk.iterdir()) == []  # unlinked once both processes mapped it
    _same_as_reference(model, 4, ref_store=tmp_path / "ref")


def test_a_memory_budget_below_one_slice_is_refused_before_the_store_is_made(tmp_path: Path) -> None:
    model = torch.nn.Linear(2000, 2000)  # 16 MiB slices: about 61 MiB of device memory each
    small = nearstep.DeviceConfig(backend="inline", memory_budget="20MiB")
    with pytest.raises(ValueError, match=r"cannot hold one slice's working set .* at least \d+ MiB, or make slices smaller"):
        nearstep.AdamW(model.parameters(), store=tmp_path / "s", device=small, slice_mb=16)
    assert not (tmp_path / "s").exists()
    # The advice works: smaller slices fit.
    with nearstep.AdamW(model.parameters(), store=tmp_path / "s", device=small, slice_mb=0.5) as opt:
        assert len(opt.store.manifest.slices) > 4


def test_resuming_with_too_small_a_budget_says_the_store_keeps_its_slices(tmp_path: Path) -> None:
    model = torch.nn.Linear(2000, 2000)
    with nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="inline", slice_mb=16):
        pass
    small = nearstep.DeviceConfig(memory_budget="20MiB")  # emulated: refused before its process starts
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"at least \d+ MiB\. The store keeps the slices it was made with \(slice_mb "
                                         r"shapes new stores only\)"):
        nearstep.AdamW(model.parameters(), store=tmp_path / "s", device=small, slice_mb=1)
    assert time.monotonic() - started < 1.0  # no device process was started
    with nearstep.Store.open(tmp_path / "s") as store:  # and the lock was released
        assert store.manifest.step == 0


_STARTUP = """
    import os, sys, torch, nearstep
    model = torch.nn.Linear(64, 64)
    print("building", flush=True)
    opt = nearstep.AdamW(model.parameters(), store=sys.argv[1], slice_mb=0.01)
    print("built", flush=True)
    import time; time.sleep(60)
"""


@pytest.mark.parametrize("delay", [0.05, 0.4, 1.0])
def test_ctrl_c_during_device_start_up_prints_one_traceback(delay: float, tmp_path: Path) -> None:
    # The device takes a second or two to import torch; Ctrl-C at any moment of it.
    err = tmp_path / "err"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_STARTUP), str(tmp_path / "s")],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
                                cwd=Path(__file__).parent)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "building"
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    time.sleep(0.3)  # a device still starting would write its traceback now
    text = err.read_text()
    assert "BrokenPipeError" not in text and "EOFError" not in text, text
    assert text.count("Traceback") <= 1, text
    if (tmp_path / "s" / "manifest.json").exists():
        deadline = time.monotonic() + 5
        while True:  # the lock is free at once (the device was stopped), or within its exit
            try:
                nearstep.Store.open(tmp_path / "s").close()
                break
            except nearstep.StoreLockedError:
                assert time.monotonic() < deadline, "the store stayed locked after Ctrl-C"
                time.sleep(0.05)


def test_slice_files_stay_within_their_budget_and_sync_a_written_file_before_closing_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nearstep import aio
    from nearstep.slicefiles import SliceFiles

    for k in range(6):
        (tmp_path / f"f{k}").write_bytes(b"\0" * 4096)
    synced: list[str] = []
    real_sync = aio.AlignedFile.sync
    monkeypatch.setattr(aio.AlignedFile, "sync", lambda self: (synced.append(Path(self.path).name), real_sync(self))[1])
    files = SliceFiles(lambda k, gen: tmp_path / f"f{k}", budget=2)
    busy = files.acquire(0, 0)  # I/O in flight on it: never closed
    files.acquire(1, 0)
    files.release(1, 0, wrote=True)
    files.acquire(2, 0)  # closes f1, which was written: synced first
    assert len(files) == 2 and synced == ["f1"] and files.evicted == 1
    files.release(2, 0, wrote=False)
    files.acquire(3, 0)  # f2 closes without a sync (only read); f0 stays (busy)
    assert synced == ["f1"] and files.evicted == 2 and len(files) == 2
    files.sync(1, 0)  # closed since its write: nothing left to sync
    assert synced == ["f1"]
    files.sync(3, 0)  # open: synced whatever its flag says (a write's callback may not have run yet)
    assert synced == ["f1", "f3"]
    files.acquire(4, 0)  # every open file busy: goes past the budget rather than wait
    assert len(files) == 3
    assert busy.fd >= 0
    files.close()
