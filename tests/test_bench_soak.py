"""The soak benchmark: a quick run writes its samples and verdicts, and nothing grows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nearstep import cli
from nearstep.bench import soak
from conftest import process_running


def test_a_quick_soak_samples_both_processes_and_nothing_grows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "soak.json"
    assert cli.main(["bench", "soak", "--steps", "90", "--sample-every", "10", "--warmup", "20", "--width", "64",
                     "--dir", str(tmp_path / "store"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "host_rss_mib" in printed and "device_fds" in printed and f"wrote {out}" in printed
    doc = json.loads(out.read_text())
    assert doc["committed_step"] == 90 and len(doc["samples"]) == 9
    # Another process, live at every sample (a gone or zombie pid has no VmRSS: NaN fails the > 10
    # below), and gone with the optimizer.
    assert doc["device_pid"] != os.getpid() and not process_running(doc["device_pid"])
    kept = [s for s in doc["samples"] if s["step"] > 20]
    # /dev/shm is machine-wide (other users' entries come and go); the staging memory each
    # process maps is its own, and both map the same buffers.
    for name in ("host_fds", "host_threads", "device_threads", "host_shm_maps", "device_shm_maps",
                 "host_shm_mapped_mib", "device_shm_mapped_mib"):
        assert len({s[name] for s in kept}) == 1, (name, [s[name] for s in kept])
        assert doc["summary"][name]["flat"]
    assert kept[0]["host_shm_maps"] == kept[0]["device_shm_maps"] >= 1
    assert kept[0]["host_shm_mapped_mib"] == kept[0]["device_shm_mapped_mib"] > 0
    assert max(s["device_fds"] for s in kept) - min(s["device_fds"] for s in kept) <= 2
    assert all(s["device_rss_mib"] > 10 and s["host_rss_mib"] > 10 and s["steps_per_s"] > 0 for s in doc["samples"])
    assert not (tmp_path / "store").exists()


def test_the_slope_is_least_squares() -> None:
    assert soak.slope_per_1000([0, 1000, 2000], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert soak.slope_per_1000([10, 20, 30, 40], [5.0, 5.0, 5.0, 5.0]) == 0.0
    assert soak.slope_per_1000([10, 20, 30], [1.0, 3.0, 2.0]) == pytest.approx(50.0)
