"""nearstep plan: the step model against a hand computation, parameter counts, the CLI, calibration."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import pytest

from nearstep import planner
from nearstep.planner import Drive, PlanInputs, Profile, plan

PROFILE = Profile(drive=Drive(read_gbps=2.0, write_gbps=1.0, capacity_tb=2.0, dwpd=1.0, warranty_years=5.0),
                  drives_per_node=2, update_rate={"fp32": 2e8, "bf16-sr+8bit": 1e8}, second_core_gain=1.5,
                  link_gbps=8.0, staging_gbps=6.0, commit_s=0.01, loop_slowdown=0.4, device_slowdown=0.2)


def by_hand(params, compute, fmt_bytes, rate, *, ranks=1, nodes=1, cores=1, link_bytes=4, slices=16, p=PROFILE):
    per_rank = params / ranks
    generation = per_rank * fmt_bytes
    node = generation * ranks // nodes
    io = node / (p.drives_per_node * p.drive.read_gbps * 1e9) + node / (p.drives_per_node * p.drive.write_gbps * 1e9)
    update = per_rank / (rate * min(cores, 1 + (cores - 1) * (p.second_core_gain - 1)))
    link = 2 * per_rank * link_bytes / (p.link_gbps * 1e9)
    staging = 2 * per_rank * link_bytes / ((p.staging_gbps or p.link_gbps) * 1e9)
    device = (max(io, update) if p.pass_overlaps_io else io + update) + link + p.commit_s
    # Beside each other (overlap, delayed), loop and device slow each other for the shorter of the
    # compute and the device's own work; delayed's next applies wait for the weights to land.
    beside = min(compute, update + link)
    loop, dev = compute + staging + p.loop_slowdown * beside, device + p.device_slowdown * beside
    return {"sync": compute + staging + device, "overlap": max(loop + dev / slices, compute / 3 + dev),
            "delayed": max(loop, dev + link / 2)}, io, update, node / p.drives_per_node


@pytest.mark.parametrize("fmt, fmt_bytes, rate", [("fp32", 12.0, 2e8), ("bf16-sr+8bit", None, 1e8)])
@pytest.mark.parametrize("ranks, nodes, cores", [(1, 1, 1), (8, 2, 4), (64, 8, 2)])
def test_the_step_model_is_the_hand_computation(fmt, fmt_bytes, rate, ranks, nodes, cores) -> None:
    params, compute = 7e9, 1.5
    pl = plan(PlanInputs(params=int(params), compute_s=compute, profile=PROFILE, state_format=fmt, ranks=ranks,
                         nodes=nodes, device_cores=cores))
    if fmt_bytes is None:
        fmt_bytes = pl.bytes_per_param
        assert 4.0 <= fmt_bytes < 4.1  # bf16 master with stochastic rounding, 8-bit moments and their scales
    want, io, update, per_drive = by_hand(params, compute, fmt_bytes, rate, ranks=ranks, nodes=nodes, cores=cores)
    for mode in planner.MODES:
        assert pl.step_s[mode] == pytest.approx(want[mode], rel=1e-9)
        day = per_drive * 86400 / want[mode]
        assert pl.drive_write_bytes_per_day[mode] == pytest.approx(day, rel=1e-9)
        assert pl.drive_writes_per_day[mode] == pytest.approx(day / 2e12, rel=1e-9)
        assert pl.drive_life_days[mode] == pytest.approx(1.0 * 2.0 * 365 * 5 * 1e12 / day, rel=1e-9)
    assert pl.io_s == pytest.approx(io) and pl.update_s == pytest.approx(update)
    assert pl.store_bytes == math.ceil(2 * params / ranks * fmt_bytes)
    assert pl.bound["sync"] in ("compute", "drives", "device cores", "host link")


def test_the_bound_follows_the_slowest_part() -> None:
    fast_disk = Profile(drive=Drive(read_gbps=100.0, write_gbps=100.0), update_rate={"fp32": 1e6}, link_gbps=1e3)
    slow_disk = Profile(drive=Drive(read_gbps=0.01, write_gbps=0.01), update_rate={"fp32": 1e12}, link_gbps=1e3)
    assert plan(PlanInputs(params=10**8, compute_s=1000.0, profile=fast_disk)).bound["overlap"] == "compute"
    assert plan(PlanInputs(params=10**8, compute_s=0.001, profile=fast_disk)).bound["overlap"] == "device cores"
    assert plan(PlanInputs(params=10**8, compute_s=0.001, profile=slow_disk)).bound["overlap"] == "drives"
    slow_link = Profile(drive=Drive(read_gbps=100.0, write_gbps=100.0), update_rate={"fp32": 1e12}, link_gbps=0.001)
    assert plan(PlanInputs(params=10**8, compute_s=0.001, profile=slow_link)).bound["overlap"] == "host link"
    # Overlap hides the device behind the compute; sync adds them up.
    pl = plan(PlanInputs(params=10**8, compute_s=1000.0, profile=fast_disk))
    assert pl.step_s["delayed"] == 1000.0 + pl.link_s and pl.step_s["sync"] > pl.step_s["overlap"] > pl.step_s["delayed"]


def test_a_format_the_profile_has_not_measured_is_refused() -> None:
    with pytest.raises(ValueError, match="no update rate for state format 'fp8'.*--calibrate"):
        plan(PlanInputs(params=10**6, compute_s=1.0, profile=PROFILE, state_format="fp8"))


@pytest.mark.parametrize("bad, match", [
    (dict(params=0), "params must be a positive"), (dict(compute_s=-1.0), "compute_s"),
    (dict(ranks=3, nodes=2), "evenly"), (dict(optimizer="rmsprop"), "optimizer must be"),
    (dict(state_format="fp4"), "fp4"),
])
def test_bad_inputs_are_refused(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        PlanInputs(**{"params": 10**6, "compute_s": 1.0, "profile": PROFILE, **bad})


def test_llama_configs_count_their_parameters(tmp_path) -> None:
    # Llama-2-7B (6,738,415,616 parameters) and a grouped-KV, tied-embedding model.
    llama = {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000, "intermediate_size": 11008,
             "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "model_type": "llama"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(llama))
    assert planner.params_from_config(path) == 6_738_415_616
    # SmolLM2-135M: 134,515,008 parameters (tied embeddings, 3 KV heads of 64).
    smol = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152, "intermediate_size": 1536,
            "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_act": "silu", "model_type": "llama",
            "tie_word_embeddings": True}
    path.write_text(json.dumps(smol))
    assert planner.params_from_config(path) == 134_515_008
    path.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="--params"):
        planner.params_from_config(path)


def test_the_command_prints_a_table_writes_json_and_a_png(tmp_path, capsys) -> None:
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(PROFILE.to_json()))
    assert planner.main(["--params", "7e9", "--compute-ms", "1500", "--profile", str(profile),
                         "--state-format", "fp32,bf16-sr+8bit", "--json", str(out), "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "fp32" in printed and "bf16-sr+8bit" in printed and "DWPD" in printed
    rows = json.loads(out.read_text())
    want, *_ = by_hand(7e9, 1.5, 12.0, 2e8)
    assert rows[0]["step_s"]["overlap"] == pytest.approx(want["overlap"])
    assert png.stat().st_size > 1000
    # The command line overrides the profile's drives.
    assert planner.main(["--params", "7e9", "--compute-ms", "1500", "--profile", str(profile), "--drives", "8",
                         "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["io_s"] < rows[0]["io_s"] / 3.9


def test_the_command_counts_a_store(tmp_path, capsys) -> None:
    import torch

    import nearstep

    model = torch.nn.Linear(10, 3)
    with nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="inline"):
        pass
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(PROFILE.to_json()))
    assert planner.main(["--store", str(tmp_path / "s"), "--compute-ms", "10", "--profile", str(profile),
                         "--json", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())[0]["inputs"]["params"] == 33


def test_the_command_needs_a_model_and_a_compute_time(capsys) -> None:
    with pytest.raises(SystemExit):
        planner.main(["--compute-ms", "1"])
    with pytest.raises(SystemExit):
        planner.main(["--params", "1e9"])


def test_calibration_measures_this_machine(tmp_path) -> None:
    shm = set(pathlib.Path("/dev/shm").glob("nearstep-*")) if pathlib.Path("/dev/shm").is_dir() else set()
    profile = planner.calibrate(tmp_path / "c", state_mib=8, params=1 << 14, formats_to_measure=("fp32", "bf16-sr+8bit"),
                                contention_rounds=1)
    if pathlib.Path("/dev/shm").is_dir():
        assert set(pathlib.Path("/dev/shm").glob("nearstep-*")) <= shm  # the link test's memory is gone
    assert set(profile.update_rate) == {"fp32", "bf16-sr+8bit"} and all(v > 0 for v in profile.update_rate.values())
    assert profile.drive.read_gbps > 0 and profile.drive.write_gbps > 0 and profile.link_gbps > 0
    assert profile.second_core_gain > 0 and "calibrated" in profile.source
    assert profile.staging_gbps > 0 and profile.loop_slowdown >= 0 and profile.device_slowdown >= 0
    again = Profile.from_json(json.loads(json.dumps(profile.to_json())))
    assert again == profile


def test_stats_report_the_bytes_written_and_their_pace(tmp_path) -> None:
    import torch

    import nearstep

    model = torch.nn.Linear(64, 64)
    with nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="inline") as opt:
        for _ in range(3):
            model(torch.randn(4, 64)).sum().backward()
            opt.step()
            opt.zero_grad()
        stats = opt.stats()
    params = sum(p.numel() for p in model.parameters())
    assert stats["store_bytes_written"] >= 3 * 12 * params  # one fp32 generation per step
    assert stats["store_write_bytes_per_day"] > stats["store_bytes_written"]  # three steps took under a day


def test_a_drive_that_needs_the_device_cores_adds_its_time_to_the_pass() -> None:
    serial = dataclasses.replace(PROFILE, pass_overlaps_io=False)
    a = plan(PlanInputs(params=10**9, compute_s=0.1, profile=PROFILE))
    b = plan(PlanInputs(params=10**9, compute_s=0.1, profile=serial))
    assert a.device_s == pytest.approx(max(a.io_s, a.update_s) + a.link_s + PROFILE.commit_s)
    assert b.device_s == pytest.approx(a.io_s + a.update_s + a.link_s + PROFILE.commit_s)
    assert b.step_s["sync"] - a.step_s["sync"] == pytest.approx(min(a.io_s, a.update_s))


def test_the_device_copies_the_links_bytes_too() -> None:
    # The loop stages gradients and lands weights; the device reads the same gradients and posts the
    # same weights, at the link's rate, after each slice's pass: a slower link lengthens the device's step.
    fast = plan(PlanInputs(params=10**9, compute_s=0.1, profile=PROFILE))
    slow = plan(PlanInputs(params=10**9, compute_s=0.1, profile=dataclasses.replace(PROFILE, link_gbps=2.0)))
    assert slow.device_s - fast.device_s == pytest.approx(slow.link_s - fast.link_s)
    assert fast.device_s == pytest.approx(max(fast.io_s, fast.update_s) + fast.link_s + PROFILE.commit_s)


def test_contention_slows_only_the_modes_that_run_loop_and_device_together() -> None:
    alone = dataclasses.replace(PROFILE, loop_slowdown=0.0, device_slowdown=0.0)
    for compute in (0.05, 100.0):  # device-bound (a 10 s device step) and compute-bound
        a = plan(PlanInputs(params=10**9, compute_s=compute, profile=alone))
        b = plan(PlanInputs(params=10**9, compute_s=compute, profile=PROFILE))
        assert b.step_s["sync"] == a.step_s["sync"]  # the loop waits while the device works: nothing beside
        assert b.step_s["overlap"] > a.step_s["overlap"] and b.step_s["delayed"] > a.step_s["delayed"]
        beside = min(compute, a.update_s + a.link_s)
        # overlap = max(loop + device / slices, forward + device)
        extra = (PROFILE.loop_slowdown + PROFILE.device_slowdown / 16 if compute > 1 else PROFILE.device_slowdown) * beside
        assert b.step_s["overlap"] - a.step_s["overlap"] == pytest.approx(extra, rel=1e-9)
        assert b.bound["overlap"] == ("compute" if compute > 1 else "drives")


def test_contention_is_measured_on_two_cores_and_is_zero_on_one(monkeypatch) -> None:
    loop, device = planner.contention(seconds=0.05, rounds=1, width=256, batch=8, params=1 << 16)
    assert math.isfinite(loop) and math.isfinite(device) and loop >= 0 and device >= 0
    import nearstep.bench.workload as workload

    monkeypatch.setattr(workload, "cores", lambda: (0, 0))
    assert planner.contention(seconds=0.05, rounds=1) == (0.0, 0.0)


def test_validate_compares_each_nearstep_row_with_its_plan(tmp_path, capsys) -> None:
    rounds = lambda fmt: [{"params": 10**7, "slices": 8, "state_format": fmt}]  # noqa: E731
    run = {"options": {"model": "mlp"}, "variants": {
        "none": {"ms_per_step": 100.0, "rounds": rounds("fp32")},
        "torch": {"ms_per_step": 120.0, "rounds": rounds("fp32")},
        "sync": {"ms_per_step": 400.0, "rounds": rounds("fp32")},
        "delayed@bf16-sr+8bit": {"ms_per_step": 150.0, "rounds": rounds("bf16-sr+8bit")}}}
    rows = planner.validate(run, PROFILE)
    assert [r["row"] for r in rows] == ["sync", "delayed@bf16-sr+8bit"]  # not none, not torch
    for r in rows:
        want = plan(PlanInputs(params=10**7, compute_s=0.1, profile=PROFILE, state_format=r["state_format"], slices=8))
        assert r["predicted_ms"] == pytest.approx(want.step_s[r["mode"]] * 1e3)
        assert r["ratio"] == pytest.approx(r["predicted_ms"] / r["measured_ms"])
        assert r["within_15_percent"] == (abs(r["ratio"] - 1) <= 0.15)
    path, profile = tmp_path / "run.json", tmp_path / "profile.json"
    path.write_text(json.dumps(run))
    profile.write_text(json.dumps(PROFILE.to_json()))
    assert planner.main(["--validate", str(path), "--profile", str(profile)]) == 0
    assert "of 2 within +-15%" in capsys.readouterr().out
    del run["variants"]["none"]
    with pytest.raises(ValueError, match="no 'none' row"):
        planner.validate(run, PROFILE)


def test_the_overlap_waits_for_the_first_modules_update() -> None:
    # Compute-bound: the next forward waits for the first module's update after the loop's side.
    one_slice = plan(PlanInputs(params=10**9, compute_s=100.0, profile=PROFILE))
    embeddings = plan(PlanInputs(params=10**9, compute_s=100.0, profile=PROFILE, first_share=0.25))
    loop = 100.0 + 8e9 / 6e9 + PROFILE.loop_slowdown * min(100.0, one_slice.update_s + one_slice.link_s)
    device = 16 * (one_slice.step_s["overlap"] - loop)  # one slice's tail: the device's step / 16
    assert device > one_slice.device_s
    assert embeddings.step_s["overlap"] - one_slice.step_s["overlap"] == pytest.approx((0.25 - 1 / 16) * device, rel=1e-9)
    assert embeddings.step_s["sync"] == one_slice.step_s["sync"] and embeddings.step_s["delayed"] == one_slice.step_s["delayed"]
    with pytest.raises(ValueError, match="first_share"):
        PlanInputs(params=10, compute_s=1.0, profile=PROFILE, first_share=1.5)


def test_a_config_gives_the_embeddings_share(tmp_path) -> None:
    smol = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152, "intermediate_size": 1536,
            "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_act": "silu", "model_type": "llama",
            "tie_word_embeddings": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(smol))
    assert planner.first_share_from_config(path) == pytest.approx(49152 * 576 / 134_515_008)


def test_the_bench_finds_the_first_module_of_a_forward() -> None:
    import torch

    from nearstep.bench.workload import FirstModule

    model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    first = FirstModule(model)
    model(torch.tensor([[1, 2]])).sum().backward()
    assert first.name == "0" and first.share == pytest.approx(800 / (800 + 72 + 36))
    model(torch.tensor([[1, 2]]))  # the hooks are gone
    assert first.name == "0"


def test_a_bad_machine_rate_on_the_command_line_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit):
        planner.main(["--params", "1e8", "--compute-ms", "100", "--loop-slowdown", "-1"])
    assert "loop_slowdown must be a number >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="commit_s must be a number >= 0"):
        dataclasses.replace(PROFILE, commit_s=-0.1)
