"""``nearstep bench peers`` without DeepSpeed: it says how to install it and runs the nearstep rows alone.

The DeepSpeed rows themselves never run here (DeepSpeed takes minutes to build its ops); the
"not installed" path is simulated even where DeepSpeed is installed.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from conftest import assert_positive
from nearstep.bench import peers
from nearstep.bench.peers import DEEPSPEED_VARIANTS, main


@pytest.fixture
def no_deepspeed(monkeypatch):
    """``import deepspeed`` fails, as on a machine without it (a None entry makes the import raise)."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)


def test_without_deepspeed_it_says_how_to_install_it_and_runs_the_nearstep_rows(no_deepspeed, tmp_path, capsys):
    scratch, out = tmp_path / "b", tmp_path / "out.json"

    # delayed is left out for the suite's time (its row is sync's and overlap's code with a one-step delay)
    variants = (*DEEPSPEED_VARIANTS, "none", "sync", "overlap", "overlap-lend", "overlap-own")
    assert main(["--quick", "--warmup", "2", "--variants", ",".join(variants), "--dir", str(scratch),
                 "--json", str(out)]) == 0

    captured = capsys.readouterr()
    assert "bench/peers-setup.sh" in captured.err and "DeepSpeed rows skipped" in captured.err
    res = json.loads(out.read_text())
    assert res["deepspeed"]["available"] is False and "does not import" in res["deepspeed"]["why"]
    assert res["deepspeed"]["install"] == "bash bench/peers-setup.sh"
    assert list(res["variants"]) == list(variants[len(DEEPSPEED_VARIANTS):])
    for name, v in res["variants"].items():
        assert_positive(v, "ms_per_iteration", "forward_ms", "backward_ms", "exposed_step_ms", "peak_rss_bytes")
        assert v["read_bytes_per_step"] >= 0 and v["write_bytes_per_step"] >= 0
        (run,) = v["rounds"]
        assert len(v["losses"]) == len(run["iteration_ms"]) + 2 == 2 + 2  # warm-up and timed steps
        if name == "overlap-own":
            assert run["affinity"] == [res["cores"]["loop"]] and run["torch_threads"] == 1
        else:  # every core, the device's lent while it is idle
            assert run["affinity"] == res["cores"]["deepspeed"] and run["torch_threads"] == res["options"]["ds_threads"]
            if name == "overlap-lend" and len(run["affinity"]) > 1:
                assert run["lent_core_switches"] > 0
            elif name != "none":
                assert run["lent_core_switches"] == 0
        if name == "none":
            assert len(run["peak_rss"]) == 1 and v["losses"][0] == res["variants"]["sync"]["losses"][0]
            continue
        # AdamW state (master, exp_avg, exp_avg_sq) is read and written once per step.
        assert run["stats_per_step"]["device_store_read_bytes"] >= 12 * run["params"]
        assert run["stats_per_step"]["device_store_write_bytes"] >= 12 * run["params"]
        assert len(run["peak_rss"]) == 2  # the training loop and the device process
    derived = res["derived"]
    # The update is exact: with the loop's threads fixed (as in sync's forward and backward) overlap is
    # bitwise sync; lending changes the thread count mid-forward, which may change rounding there.
    assert derived["overlap_losses_equal_sync"] is True
    assert derived["loss_reference"] == "sync" and derived["overlap_max_loss_rel_diff"] == 0
    assert derived["overlap-lend_max_loss_rel_diff"] < 1e-5 and derived["overlap-own_max_loss_rel_diff"] < 1e-5
    assert "none_max_loss_rel_diff" not in derived  # it does not train
    assert_positive(derived, "sync_hidden", "overlap_hidden")
    assert not any(key.endswith("_over_ds_nvme") for key in derived)  # no ratio without DeepSpeed

    table = captured.out
    for label in ("machine:", "DeepSpeed: not run:", "none", "sync", "overlap", "ms/iter", "exposed",
                  "none / overlap ms/iter",
                  "peak RSS MiB", "overlap losses == sync", "losses, round 1"):
        assert label in table, label
    assert "ds-nvme" not in table
    assert not scratch.exists() or not any(scratch.rglob("*"))


def test_only_deepspeed_rows_without_deepspeed_is_an_error(no_deepspeed, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["--quick", "--variants", "ds-nvme,ds-cpu", "--dir", str(tmp_path / "b"), "--json", str(out)]) == 2
    assert "bench/peers-setup.sh" in capsys.readouterr().err and not out.exists()


def test_status_explains_an_import_failure(no_deepspeed):
    status = peers.deepspeed_status()
    assert not status.usable and status.version is None and "deepspeed does not import" in status.why


def test_deepspeed_config_matches_the_nearstep_rows():
    spec = peers.WorkerSpec(model="mlp", variant="ds-nvme", round=1, batch=8, seq_len=0, width=64, steps=1, warmup=0,
                            memory_budget="1GiB", store="/data/state", cores=[0], device_core=0, threads=1,
                            master_port=1)
    nvme = peers.deepspeed_config(spec)
    assert nvme["zero_optimization"]["stage"] == 3
    assert nvme["zero_optimization"]["offload_optimizer"]["device"] == "nvme"
    assert nvme["zero_optimization"]["offload_optimizer"]["nvme_path"] == "/data/state"
    assert nvme["optimizer"] == {"type": "AdamW", "params": {"lr": peers.LR, "betas": list(peers.BETAS),
                                                              "eps": peers.EPS, "weight_decay": peers.WEIGHT_DECAY}}
    assert nvme["gradient_clipping"] == 0.0 and nvme["train_micro_batch_size_per_gpu"] == 8
    assert "bf16" not in nvme and "fp16" not in nvme  # fp32, as the nearstep rows
    cpu = peers.deepspeed_config(dataclasses.replace(spec, variant="ds-cpu"))
    assert cpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_a_failing_worker_still_removes_what_the_run_made(no_deepspeed, tmp_path, monkeypatch, capsys):
    def fail(spec, work):
        (work / "state-sync-1").mkdir()
        (work / "state-sync-1" / "s000000.g0").write_bytes(b"x" * 4096)
        raise peers.WorkerError("the sync worker of round 1 exited with code 1: disk gone")

    monkeypatch.setattr(peers, "_run_worker", fail)
    scratch = tmp_path / "deep" / "b"

    assert main(["--quick", "--variants", "sync", "--dir", str(scratch), "--json", str(tmp_path / "out.json")]) == 1

    assert "disk gone" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists() and not (tmp_path / "out.json").exists()


def test_variants_are_checked():
    with pytest.raises(SystemExit):
        main(["--variants", "sync,zero-infinity"])
