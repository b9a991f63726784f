"""Compressed optimizer state end to end: store, device, optimizer, tools.

The codecs themselves are tested against for-loop references in test_formats.py;
here the question is whether the store and the device use them at the right
places: a training run with a compressed format must equal a plain torch.optim
run whose state is rounded through the same codec, with the same seeds, after
every step.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import nearstep
from nearstep import aio, formats
from nearstep.store import Store, read_manifest, rounding_seed
from nearstep.tools import convert_store, main as tools_main
from conftest import batches, loss_of, make_model

SLICE_MB = 0.004  # ~1000 fp32 params per slice: several slices, 8-bit blocks that straddle parameters
LOSSY = ["bf16-kahan", "bf16-sr", "8bit", "8bit-linear", "bf16-sr+8bit", "bf16-kahan+8bit",
         "16bit", "fp8", "bf16-sr+fp8"]


def _round_like_the_store(manifest, step: int, params: list[torch.Tensor], state: dict[str, list[torch.Tensor]]) -> None:
    """Round ``params`` (fp32) and ``state`` through the store's codec, slice by slice, in place.

    Uses the slice image's own ``encode`` (layout, padding, seeds); the engine's path
    under test decodes into and encodes from its slot instead.
    """
    for spec in manifest.slices:
        values = {}
        for name in manifest.state_names:
            source = params if name == "master" else state[name]
            values[name] = torch.cat([source[s.param].detach().reshape(-1)[s.start : s.start + s.length] for s in spec.segments])
        with aio.AlignedBuffer(manifest.slice_file_bytes(spec.index)) as buf:
            manifest.image(spec.index).encode(values, buf, rounding_seed(manifest, step, spec.index))
        offset = 0
        for s in spec.segments:
            for name in manifest.state_names:
                target = params if name == "master" else state[name]
                target[s.param].data.view(-1)[s.start : s.start + s.length] = values[name][offset : offset + s.length]
            offset += s.length


def assert_same_but_for_rare_ulps(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal bit for bit except for a few elements one rounding step apart.

    The device runs torch's fused kernel over slice segments, the reference over
    whole tensors; where an element falls in the vectorised loop or in its tail
    can change its last fp32 bit, and once in a few hundred such cases that bit
    carries through a stochastic or 8-bit rounding. A wrong seed or a missed
    encode changes a large share of the elements instead.
    """
    differ = got != want
    share = float(differ.float().mean())
    assert share <= 0.01, f"{what}: {share:.2%} of the elements differ"
    if differ.any():
        torch.testing.assert_close(got[differ], want[differ], rtol=0.07, atol=1e-30, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("state_format", LOSSY)
def test_training_equals_torch_adamw_rounded_through_the_codec(state_format: str, tmp_path) -> None:
    ours, ref = make_model(), make_model()
    opt = nearstep.AdamW(ours.named_parameters(), lr=1e-2, weight_decay=0.1, store=tmp_path / "s",
                         slice_mb=SLICE_MB, device="inline", state_format=state_format)
    manifest = read_manifest(tmp_path / "s")
    assert manifest.state_format == formats.StateFormat.parse(state_format).name
    assert len(manifest.slices) > 1
    ref_params = list(ref.parameters())
    torch_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, fused=True)
    state = {n: [torch.zeros_like(p) for p in ref_params] for n in ("exp_avg", "exp_avg_sq")}
    with torch.no_grad():
        _round_like_the_store(manifest, 0, ref_params, state)
    for p_ours, p_ref in zip(ours.parameters(), ref_params):  # the store's rounding of the initial weights
        torch.testing.assert_close(p_ours, p_ref, rtol=0, atol=0)
    for step, batch in enumerate(batches(8), start=1):
        for model in (ours, ref):
            loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad()
        torch_opt.step()
        torch_opt.zero_grad()
        with torch.no_grad():
            live = {n: [torch_opt.state[p][n] for p in ref_params] for n in state}
            _round_like_the_store(manifest, step, ref_params, live)
        for (name, p_ours), p_ref in zip(ours.named_parameters(), ref_params):
            assert_same_but_for_rare_ulps(p_ours.detach(), p_ref.detach(), f"step {step}, {name}")
            p_ref.data.copy_(p_ours.detach())  # a rare last-bit difference must not grow over the steps
    saved = opt.full_state_dict()["state"]
    for i, p in enumerate(ref_params):
        for n in ("exp_avg", "exp_avg_sq"):
            assert_same_but_for_rare_ulps(saved[i][n], torch_opt.state[p][n], f"{n} of parameter {i}")
    opt.close()


@pytest.mark.parametrize("state_format", ["fp32", "bf16-kahan", "bf16-sr", "8bit", "bf16-sr+8bit"])
def test_store_holds_the_documented_bytes_per_parameter(state_format: str, tmp_path) -> None:
    model = torch.nn.Linear(1024, 512)  # large slices: page padding is negligible
    opt = nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="inline", state_format=state_format, slice_mb=1)
    m = read_manifest(tmp_path / "s")
    numel = sum(p.numel() for p in model.parameters())
    per_param = m.state_bytes / numel
    want = formats.StateFormat.parse(state_format).bytes_per_param(m.state_names)
    assert want <= per_param <= want * 1.02 + 4096 * len(m.slices) * 6 / numel, (per_param, want)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "s" / "slices").glob("*.g0"))
    assert on_disk == m.state_bytes
    expected = {"fp32": 12.0, "bf16-kahan": 11.0, "bf16-sr": 10.0}
    if state_format in expected:
        assert want == expected[state_format]
    else:
        assert want < (6.01 if state_format == "8bit" else 4.01)
    opt.close()


def test_the_compressed_target_moves_at_most_8_bytes_per_parameter_per_step(tmp_path) -> None:
    model = torch.nn.Linear(2048, 1024, bias=False)
    results = {}
    for fmt in ("fp32", "bf16-sr+8bit"):
        # One 8 MiB slice: the page padding of its small scale regions is then negligible.
        opt = nearstep.AdamW(model.parameters(), store=tmp_path / fmt, device="inline", state_format=fmt, slice_mb=8)
        for _ in range(2):
            model(torch.randn(4, 2048)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        stats = opt.stats()
        results[fmt] = stats["store_bytes_per_step"] / sum(p.numel() for p in model.parameters())
        opt.close()
    assert 23.9 < results["fp32"] < 24.2, results
    # 2 bytes of bf16 master + 2 x (1 code + 4/2048 of a scale) = 4.004 bytes, read and written.
    assert 8.0 < results["bf16-sr+8bit"] < 8.02, results


def _twin_stores(tmp_path, names: tuple[str, ...], state_format: str) -> None:
    """Stores at step 0 that share one store id, so their stochastic rounding is the same."""
    model = make_model()
    nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / names[0], slice_mb=SLICE_MB, device="inline",
                   state_format=state_format).close()
    for name in names[1:]:
        shutil.copytree(tmp_path / names[0], tmp_path / name)


def _train(model, opt, data) -> None:
    for batch in data:
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad()


def test_resume_is_bitwise_the_uninterrupted_run(tmp_path) -> None:
    data = batches(8)
    _twin_stores(tmp_path, ("a", "b"), "bf16-sr+8bit")
    straight = make_model(seed=1)  # the weights come from the store
    with nearstep.AdamW(straight.parameters(), lr=1e-2, store=tmp_path / "a", device="inline") as opt:
        _train(straight, opt, data)
    first = make_model(seed=2)
    with nearstep.AdamW(first.parameters(), lr=1e-2, store=tmp_path / "b", device="emulated") as opt:
        _train(first, opt, data[:4])
    resumed = make_model(seed=3)
    with nearstep.AdamW(resumed.parameters(), lr=1e-2, store=tmp_path / "b", device="inline",
                        state_format="bf16-sr+8bit") as opt:
        assert opt.store.manifest.step == 4
        _train(resumed, opt, data[4:])
    for p_resumed, p_straight in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(p_resumed, p_straight, rtol=0, atol=0)


def test_overlap_equals_sync_bitwise_with_a_lossy_format(tmp_path) -> None:
    _twin_stores(tmp_path, ("sync", "overlap"), "bf16-kahan+8bit")
    results = []
    for mode in ("sync", "overlap"):
        model = make_model(seed=4)
        with nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / mode, mode=mode, model=model, device="emulated") as opt:
            _train(model, opt, batches(6))
            opt.synchronize()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_parameters_without_gradient_keep_their_state_bitwise(tmp_path) -> None:
    model = make_model()
    opt = nearstep.AdamW(model.named_parameters(), lr=1e-2, store=tmp_path / "s", slice_mb=SLICE_MB, device="inline",
                         state_format="bf16-kahan+8bit")
    for batch in batches(3):
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad()
    before = opt.full_state_dict()["state"]
    frozen = model.embed.weight.detach().clone()
    model.embed.weight.requires_grad_(False)
    for batch in batches(2, seed=3):
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad()
    after = opt.full_state_dict()["state"]
    torch.testing.assert_close(model.embed.weight, frozen, rtol=0, atol=0)
    for name in ("master", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(after[0][name], before[0][name], rtol=0, atol=0)
    assert not torch.equal(after[1]["master"], before[1]["master"])
    opt.close()


def test_compressed_state_stays_close_to_fp32(tmp_path) -> None:
    finals = {}
    for fmt in ("fp32", "bf16-kahan", "bf16-sr+8bit"):
        model = make_model()
        with nearstep.AdamW(model.parameters(), lr=3e-3, store=tmp_path / fmt, device="inline", state_format=fmt) as opt:
            for batch in batches(20):
                loss_of(model, batch).backward()
                opt.step()
                opt.zero_grad()
        finals[fmt] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for fmt in ("bf16-kahan", "bf16-sr+8bit"):
        drift = (finals[fmt] - finals["fp32"]).norm() / finals["fp32"].norm()
        assert drift < (1e-3 if fmt == "bf16-kahan" else 2e-2), (fmt, float(drift))


def test_a_store_refuses_another_explicit_format_and_converts(tmp_path, capsys) -> None:
    model = make_model()
    with nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="inline") as opt:
        for batch in batches(2):
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad()
    with pytest.raises(nearstep.StoreMismatchError, match=r"'fp32', not 'bf16-sr\+8bit'.*nearstep convert"):
        nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="inline", state_format="bf16-sr+8bit")
    with pytest.raises(ValueError, match="state format"):
        nearstep.AdamW(model.parameters(), store=tmp_path / "new", device="inline", state_format="int4")
    assert not (tmp_path / "new").exists()
    with nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="inline", state_format=None) as opt:
        assert opt.store.manifest.state_format == "fp32"

    assert tools_main(["convert", str(tmp_path / "s"), str(tmp_path / "c"), "--state-format", "bf16-sr+8bit"]) == 0
    assert "as bf16-sr+8bit" in capsys.readouterr().out
    src, dst = read_manifest(tmp_path / "s"), read_manifest(tmp_path / "c")
    assert (dst.step, dst.param_steps, dst.state_format) == (src.step, src.param_steps, "bf16-sr+8bit")
    assert dst.format.bytes_per_param(dst.state_names) < src.format.bytes_per_param(src.state_names) / 2.9
    with Store.open(tmp_path / "s") as a, Store.open(tmp_path / "c") as b:
        sa, sb = a.read_params(src.state_names), b.read_params(dst.state_names)
    for name in src.state_names:
        for x, y in zip(sa[name], sb[name]):
            scale = x.abs().max().clamp_min(1e-30)
            assert float((x - y).abs().max() / scale) < 0.07, name
    # Converting back to fp32 keeps the rounded values exactly.
    convert_store(tmp_path / "c", tmp_path / "back", "fp32")
    with Store.open(tmp_path / "back") as c:
        back = c.read_params(dst.state_names)
    for name in dst.state_names:
        for x, y in zip(sb[name], back[name]):
            assert torch.equal(x, y)
    assert tools_main(["convert", str(tmp_path / "s"), str(tmp_path / "c2"), "--state-format", "int4"]) == 1


def test_sensitivity_report_ranks_the_spiked_parameter(tmp_path, capsys) -> None:
    model = make_model()
    guards = nearstep.Guards(spike_clip=50.0, spike_warmup=3, telemetry=True)  # only the injected spike clips
    opt = nearstep.AdamW(model.named_parameters(), lr=1e-3, store=tmp_path / "s", device="inline", guards=guards)
    assert not opt.report().spike_measured
    for i, batch in enumerate(batches(8)):
        loss_of(model, batch).backward()
        if i >= 5:
            model.proj.weight.grad.mul_(1e4)  # a spike in one parameter
        opt.step()
        opt.zero_grad()
    report = opt.report()
    assert report.spike_measured and report.updates_measured
    assert report.ranked("spike_rate")[0].name == "proj.weight"
    top = report.ranked("spike_rate")[0]
    assert top.spike_clipped > 0 and 0 < top.spike_rate <= 1
    assert all(not math.isnan(p.update_to_weight) for p in report.params)
    assert "proj.weight" in report.table()
    opt.close()

    assert tools_main(["inspect", str(tmp_path / "s"), "--sensitivity", "--png", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "most spike-clipped" in out and out.index("proj.weight") < out.index("largest update")
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert tools_main(["inspect", str(tmp_path / "s"), "--sensitivity", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["spike_measured"] and {p["name"] for p in doc["params"]} == {n for n, _ in model.named_parameters()}


def test_sensitivity_without_guards_says_what_to_turn_on(tmp_path, capsys) -> None:
    model = make_model()
    with nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="inline") as opt:
        loss_of(model, batches(1)[0]).backward()
        opt.step()
    assert tools_main(["inspect", str(tmp_path / "s"), "--sensitivity"]) == 0
    assert "no guard statistics yet" in capsys.readouterr().out
    assert tools_main(["inspect", str(tmp_path / "s"), "--png", str(tmp_path / "x.png")]) == 2
