"""Smoke test of ``nearstep bench io``: it runs at tiny sizes, prints its table, writes JSON, cleans up."""

from __future__ import annotations

import json

import pytest

from conftest import assert_positive
from nearstep.bench import io
from nearstep.bench.io import main


def test_quick_run_reports_every_section_and_leaves_nothing_behind(tmp_path, capsys):
    scratch = tmp_path / "b"
    out = tmp_path / "out.json"

    assert main(["--quick", "--dir", str(scratch), "--json", str(out)]) == 0

    res = json.loads(out.read_text())
    assert res["machine"] and res["date"] and res["options"]["quick"] is True

    bw = res["bandwidth"]
    assert_positive(bw, "bytes", "read_ratio", "write_ratio")
    assert_positive(bw["median_gbps"], "raw_read", "raw_write", "store_read", "store_write")
    assert len(bw["rounds_gbps"]) == res["options"]["repeats"] == 1
    assert isinstance(bw["read_pass"], bool) and isinstance(bw["write_pass"], bool)
    assert_positive(res["end_to_end"], "params", "params_per_second", "state_bytes_per_step", "state_gbps")

    update = res["update"]
    assert_positive(update, "nearstep_params_per_second", "torch_params_per_second", "ratio")
    assert isinstance(update["pass"], bool)

    peak = res["peak"]
    assert_positive(peak, "state_bytes", "budget_bytes", "baseline_rss_anon", "peak_rss_anon", "peak_vm_rss",
              "peak_rss_shmem", "peak_private", "peak_slot_memory", "slot_ratio", "rss_anon_ratio", "private_ratio")
    # Tiny sizes sit far inside a 1 GiB budget: a MISS here is a wrong measurement, not a slow disk.
    assert peak["slot_pass"] and peak["private_pass"]
    assert peak["peak_slot_memory"] <= peak["peak_shared_anon"] + peak["peak_rss_anon"]

    table = capsys.readouterr().out
    for label in ("machine:", "raw read", "raw write", "store read", "store write", "median", "store/raw read",
                  "store/raw write", "end-to-end inline AdamW step", "nearstep kernels.update_",
                  "torch.optim.AdamW(fused=True)", "nearstep/torch", "peak slot memory", "peak RssAnon",
                  "peak private memory", "peak RssShmem", "host-link staging"):
        assert label in table, label

    assert not scratch.exists() or not any(scratch.rglob("*"))


def test_a_failing_measurement_still_removes_what_the_run_made(tmp_path, monkeypatch):
    def fail(opts, work):
        (work / "store").mkdir()
        (work / "store" / "s000000.g0").write_bytes(b"x" * 4096)
        raise RuntimeError("disk gone")

    monkeypatch.setattr(io, "_bandwidth", fail)
    scratch = tmp_path / "deep" / "b"
    with pytest.raises(RuntimeError, match="disk gone"):
        main(["--quick", "--dir", str(scratch), "--json", str(tmp_path / "out.json")])
    assert not (tmp_path / "deep").exists() and not (tmp_path / "out.json").exists()
