"""The optimizers in sync mode against torch.optim, on both device backends."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

import nearstep
from conftest import batches, loss_of, make_model

SLICE_MB = 0.004  # ~1000 fp32 params per slice: several slices, split parameters


def groups_of(model: nn.Module, named: bool) -> list[dict]:
    decay = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [(n, p) for n, p in model.named_parameters() if p.ndim < 2]
    pick = (lambda xs: xs) if named else (lambda xs: [p for _, p in xs])
    return [{"params": pick(decay), "weight_decay": 0.1}, {"params": pick(rest), "weight_decay": 0.0, "lr": 3e-3}]


def train(model: nn.Module, opt: torch.optim.Optimizer, data, sched=None, clip: float | None = None, accumulate: int = 1) -> None:
    for i, batch in enumerate(data):
        loss_of(model, batch).div(accumulate).backward()
        if (i + 1) % accumulate:
            continue
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def assert_same_weights(a: nn.Module, b: nn.Module, **tol) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, msg=lambda m: f"{name}: {m}", **tol)


CASES = {
    "adamw": (lambda ps, **kw: torch.optim.AdamW(ps, lr=1e-2, foreach=False, **kw), lambda ps, **kw: nearstep.AdamW(ps, lr=1e-2, **kw)),
    "adam": (lambda ps, **kw: torch.optim.Adam(ps, lr=1e-2, foreach=False, **kw), lambda ps, **kw: nearstep.Adam(ps, lr=1e-2, **kw)),
    "sgd": (
        lambda ps, **kw: torch.optim.SGD(ps, lr=5e-2, momentum=0.9, dampening=0.1, foreach=False, **kw),
        lambda ps, **kw: nearstep.SGD(ps, lr=5e-2, momentum=0.9, dampening=0.1, **kw),
    ),
    "sgd-nesterov": (
        lambda ps, **kw: torch.optim.SGD(ps, lr=5e-2, momentum=0.9, nesterov=True, foreach=False, **kw),
        lambda ps, **kw: nearstep.SGD(ps, lr=5e-2, momentum=0.9, nesterov=True, **kw),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_optim_with_groups_and_scheduler(case: str, backend: str, tmp_path) -> None:
    make_ref, make_ours = CASES[case]
    ref_model, our_model = make_model(), make_model()
    ref = make_ref(groups_of(ref_model, named=False))
    ours = make_ours(groups_of(our_model, named=True), store=tmp_path / "s", device=backend, slice_mb=SLICE_MB)
    with ours:
        assert len(ours.store.manifest.slices) >= 3
        data = batches(20)
        ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=5, gamma=0.5)
        our_sched = torch.optim.lr_scheduler.StepLR(ours, step_size=5, gamma=0.5)
        train(ref_model, ref, data, ref_sched)
        train(our_model, ours, data, our_sched)
        assert ours.stats()["step"] == 20
    assert_same_weights(ref_model, our_model)


def test_max_grad_norm_and_accumulation_match_torch(backend: str, compute_device: str, tmp_path) -> None:
    ref_model, our_model = make_model(device=compute_device), make_model(device=compute_device)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    ours = nearstep.AdamW(our_model.parameters(), lr=1e-2, store=tmp_path / "s", device=backend, slice_mb=SLICE_MB, max_grad_norm=0.05)
    with ours:
        data = batches(20)
        train(ref_model, ref, data, clip=0.05, accumulate=2)
        train(our_model, ours, data, accumulate=2)
        assert ours.stats()["step"] == 10
    assert_same_weights(ref_model, our_model)


def test_bf16_weights_follow_fp32_master_reference(backend: str, tmp_path) -> None:
    """bf16 model weights with fp32 masters: the reference keeps fp32 masters by hand."""
    model = make_model(dtype=torch.bfloat16)
    shadow = make_model(dtype=torch.bfloat16)  # the reference's bf16 working copy
    masters = [p.detach().float().clone().requires_grad_(True) for p in shadow.parameters()]
    ref = torch.optim.AdamW(masters, lr=1e-2, foreach=False)
    ours = nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / "s", device=backend, slice_mb=SLICE_MB)
    with ours:
        for batch in batches(20):
            loss_of(shadow, batch).backward()
            for m, p in zip(masters, shadow.parameters()):
                m.grad = p.grad.float()
                p.grad = None
            ref.step()
            with torch.no_grad():
                for m, p in zip(masters, shadow.parameters()):
                    p.copy_(m)
            loss_of(model, batch).backward()
            ours.step()
            ours.zero_grad()
        state = ours.full_state_dict()["state"]
    for i, (m, p) in enumerate(zip(masters, model.parameters())):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(state[i]["master"], m.detach())
        torch.testing.assert_close(p, m.detach().to(torch.bfloat16), rtol=1e-2, atol=1e-2)


def lion_reference(params, grads_per_step, lr, betas, wd):
    """Lion, one element at a time (Chen et al. 2023, Algorithm 2)."""
    params = [p.detach().double().clone().view(-1) for p in params]
    moms = [torch.zeros_like(p) for p in params]
    b1, b2 = betas
    for grads in grads_per_step:
        for p, m, g in zip(params, moms, grads):
            g = g.double().view(-1)
            for j in range(p.numel()):
                c = b1 * m[j] + (1 - b1) * g[j]
                sign = (c > 0).double() - (c < 0).double()
                p[j] = p[j] * (1 - lr * wd) - lr * sign
                m[j] = b2 * m[j] + (1 - b2) * g[j]
    return params


def test_lion_matches_for_loop_reference(backend: str, tmp_path) -> None:
    torch.manual_seed(3)
    params = [nn.Parameter(torch.randn(37)), nn.Parameter(torch.randn(5, 9))]
    start = [p.detach().clone() for p in params]
    grads = [[torch.randn_like(p) for p in params] for _ in range(6)]
    with nearstep.Lion(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, store=tmp_path / "s", device=backend, slice_mb=0.0002) as opt:
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
    expected = lion_reference(start, grads, 1e-2, (0.9, 0.99), 0.1)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().view(-1), e.float())


def test_params_without_grad_are_left_alone_like_torch(tmp_path) -> None:
    ref_model, our_model = make_model(), make_model()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    with nearstep.AdamW(our_model.parameters(), lr=1e-2, store=tmp_path / "s", device="inline", slice_mb=SLICE_MB) as ours:
        for i, batch in enumerate(batches(8)):
            for model, opt in ((ref_model, ref), (our_model, ours)):
                loss_of(model, batch).backward()
                if i % 2:
                    model.head.weight.grad = None  # skipped on odd steps: its own step count lags
                opt.step()
                opt.zero_grad()
        steps = {i: int(s["step"]) for i, s in ours.full_state_dict()["state"].items()}
    assert_same_weights(ref_model, our_model)
    head_index = [n for n, _ in our_model.named_parameters()].index("head.weight")
    assert steps[head_index] == 4 and steps[0] == 8


def test_resume_after_close_equals_uninterrupted_run(backend: str, tmp_path) -> None:
    data = batches(20)
    straight = make_model()
    with nearstep.AdamW(straight.parameters(), lr=1e-2, store=tmp_path / "a", device=backend, slice_mb=SLICE_MB) as opt:
        train(straight, opt, data)
    first = make_model()
    with nearstep.AdamW(first.parameters(), lr=1e-2, store=tmp_path / "b", device=backend, slice_mb=SLICE_MB) as opt:
        train(first, opt, data[:10])
    resumed = make_model(seed=99)  # different initial weights: the store's must win
    with nearstep.AdamW(resumed.named_parameters(), lr=1e-2, store=tmp_path / "b", device=backend) as opt:
        assert opt.stats()["step"] == 10
        assert_same_weights(first, resumed, rtol=0, atol=0)
        train(resumed, opt, data[10:])
    assert_same_weights(straight, resumed, rtol=0, atol=0)


def test_state_dict_round_trip_through_torch_save(tmp_path) -> None:
    data = batches(16)
    straight = make_model()
    with nearstep.AdamW(straight.parameters(), lr=1e-2, store=tmp_path / "a", device="inline", slice_mb=SLICE_MB) as opt:
        train(straight, opt, data)
    model = make_model()
    with nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / "b", device="inline", slice_mb=SLICE_MB) as opt:
        train(model, opt, data[:8])
        torch.save(opt.state_dict(), tmp_path / "opt.pt")
    other = make_model(seed=5)
    with nearstep.AdamW(other.parameters(), lr=1e-2, store=tmp_path / "c", device="inline", slice_mb=SLICE_MB) as opt:
        opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
        assert opt.stats()["step"] == 8
        train(other, opt, data[8:])
    assert_same_weights(straight, other, rtol=0, atol=0)


def test_state_dict_loads_into_torch_adamw(tmp_path) -> None:
    model = make_model()
    with nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / "s", device="inline", slice_mb=SLICE_MB) as opt:
        train(model, opt, batches(3))
        sd = opt.full_state_dict()
    ref = torch.optim.AdamW(make_model().parameters(), lr=1e-2)
    ref.load_state_dict(sd)
    assert float(ref.state_dict()["state"][0]["step"]) == 3


def test_non_finite_gradient_skips_the_step(backend: str, tmp_path) -> None:
    model = make_model()
    with nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / "s", device=backend, slice_mb=SLICE_MB) as opt:
        train(model, opt, batches(2))
        before = [p.detach().clone() for p in model.parameters()]
        loss_of(model, batches(1)[0]).backward()
        model.proj.weight.grad[0, 0] = float("nan")
        opt.step()
        stats = opt.stats()
        assert stats["skipped_steps"] == 1 and stats["step"] == 2
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)


def test_wrong_gradient_shape_is_refused_and_nothing_changes(tmp_path) -> None:
    model = make_model()
    with nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / "s", device="inline", slice_mb=SLICE_MB) as opt:
        before = [p.detach().clone() for p in model.parameters()]
        loss_of(model, batches(1)[0]).backward()
        model.head.bias.grad.data = torch.ones(7)  # what a buggy hook could leave behind
        with pytest.raises(ValueError, match="head.bias|group1|expected"):
            opt.step()
        assert opt.stats()["step"] == 0
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)


def test_second_opener_is_refused_with_the_holders_pid(tmp_path) -> None:
    model = make_model()
    with nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="inline"):
        with pytest.raises(nearstep.StoreLockedError, match=str(os.getpid())):
            nearstep.AdamW(make_model().parameters(), store=tmp_path / "s", device="inline")
    # Released on close: a new opener gets in.
    nearstep.AdamW(make_model().parameters(), store=tmp_path / "s", device="inline").close()


def test_store_of_another_model_is_refused_naming_the_parameter(tmp_path) -> None:
    with nearstep.AdamW(make_model().named_parameters(), store=tmp_path / "s", device="inline"):
        pass
    other = nn.Sequential(nn.Embedding(64, 24), nn.Linear(24, 40))
    with pytest.raises(nearstep.StoreMismatchError, match="parameter 0|0.weight|embed.weight"):
        nearstep.AdamW(other.named_parameters(), store=tmp_path / "s", device="inline")
    with pytest.raises(nearstep.StoreMismatchError, match="adamw"):
        nearstep.SGD(make_model().named_parameters(), store=tmp_path / "s", device="inline")


def test_killed_device_process_makes_the_next_call_raise_quickly(tmp_path) -> None:
    model = make_model()
    opt = nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="emulated")
    try:
        train(model, opt, batches(2))
        opt.device.kill()
        loss_of(model, batches(1)[0]).backward()
        t0 = time.monotonic()
        with pytest.raises(nearstep.DeviceDiedError, match="died"):
            opt.step()
        assert time.monotonic() - t0 < 1.0
    finally:
        opt.close()
    # The store kept step 2 and reopens there.
    with nearstep.AdamW(make_model().parameters(), store=tmp_path / "s", device="inline") as again:
        assert again.stats()["step"] == 2


def test_corrupted_state_file_is_reported_with_the_device_traceback(backend: str, tmp_path) -> None:
    model = make_model()
    with nearstep.AdamW(model.parameters(), store=tmp_path / "s", device=backend, slice_mb=SLICE_MB) as opt:
        train(model, opt, batches(1))
        manifest = opt.device.manifest()
        victim = opt.store.slice_path(0, manifest.committed[0].generation)
        with open(victim, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
        loss_of(model, batches(1)[0]).backward()
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(nearstep.StoreCorruptError, match="corrupted") as info:
            opt.step()
        assert "Device-side traceback" in str(info.value.__cause__)
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(mode="fast"), ValueError, "mode"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (dict(slice_mb=0), ValueError, "slice_mb"),
        (dict(guards={"spike_clip": 3}), TypeError, "Guards"),
        (dict(device="gpu"), ValueError, "backend"),
        (dict(device=nearstep.DeviceConfig(backend="inline", memory_budget="4KiB")), ValueError, "memory_budget"),
        (dict(betas=(0.9, 1.5)), ValueError, "beta"),
    ],
)
def test_invalid_arguments_get_clear_errors(kwargs, error, match, tmp_path) -> None:
    with pytest.raises(error, match=match):
        nearstep.AdamW(make_model().parameters(), store=tmp_path / "s", **kwargs)


def test_spike_clip_needs_a_second_moment(tmp_path) -> None:
    with pytest.raises(ValueError, match="second moment"):
        nearstep.SGD(make_model().parameters(), store=tmp_path / "s", guards=nearstep.Guards(spike_clip=3.0))


def test_default_store_goes_under_dot_nearstep(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with nearstep.AdamW(make_model().parameters(), device="inline") as opt:
        assert opt.store_path.parent == tmp_path / ".nearstep" or opt.store_path.parent.resolve() == (tmp_path / ".nearstep").resolve()
        assert (opt.store_path / "manifest.json").exists()


def test_guards_report_telemetry(tmp_path) -> None:
    model = make_model()
    guards = nearstep.Guards(telemetry=True, update_clip=1e-3, spike_clip=2.0, spike_warmup=2)
    with nearstep.AdamW(model.named_parameters(), lr=1e-1, store=tmp_path / "s", device="inline", guards=guards) as opt:
        train(model, opt, batches(6))
        rows = {t.name: t for t in opt.telemetry()}
        stats = opt.stats()
    assert set(rows) == {n for n, _ in model.named_parameters()}
    assert all(0 < t.update_rms <= 1e-3 * 1.0001 for t in rows.values())
    assert stats["update_clipped"] > 0
    assert stats["spike_clipped"] == sum(t.spike_clipped for t in rows.values())
