"""Drop-in: what a user does between backward() and step() gives torch's numbers, or a loud error.

Each test trains nearstep and ``torch.optim.AdamW`` side by side on the same data
(``conftest.make_model``), with the edit a framework or a user makes, and compares
the weights; ``overlap`` and ``delayed`` are compared with ``sync`` bit for bit
where they promise it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import nearstep
from conftest import batches, loss_of, make_model

SLICE_MB = 0.004  # several slices even for the tiny model: speculation, drops and redos per slice
MODES = ["sync", "overlap", "delayed"]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, edit=None, clip: float | None = None) -> None:
    """The loop users write; ``edit(model, t)`` runs between backward() and step()."""
    for t, batch in enumerate(batches(steps)):
        loss_of(model, batch).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if edit is not None:
            edit(model, t)
        opt.step()
        opt.zero_grad()


def _final_weights(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The trained weights, after a nearstep optimizer landed its last step and closed."""
    if isinstance(opt, nearstep.NearstepOptimizer):
        opt.synchronize()
        opt.close()
    return [p.detach().clone() for p in model.parameters()]


def _torch_reference(steps: int, *, edit=None, clip: float | None = None, lr: float = 1e-2):
    model = make_model()
    _train(model, torch.optim.AdamW(model.parameters(), lr=lr), steps, edit, clip)
    return [p.detach().clone() for p in model.parameters()]


def _nearstep(mode: str, tmp_path, steps: int, *, edit=None, clip: float | None = None, lr: float = 1e-2,
              max_grad_norm: float | None = None, warmup_steps: int = 100, name: str = "s", **options):
    model = make_model()
    opt = nearstep.AdamW(model.named_parameters(), lr=lr, store=tmp_path / f"{name}-{mode}", device="inline",
                         slice_mb=SLICE_MB, mode=mode, model=model, max_grad_norm=max_grad_norm,
                         warmup_steps=warmup_steps, **options)
    with opt:
        _train(model, opt, steps, edit, clip)
        opt.synchronize()
        stats = opt.stats()
    return [p.detach().clone() for p in model.parameters()], stats


def _assert_close(got, want) -> None:
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _assert_equal(got, want) -> None:
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# -- gradients edited after they were staged -------------------------------------------------


@pytest.mark.parametrize("clip", [0.05, 100.0], ids=["fires", "never-fires"])
def test_clip_grad_norm_between_backward_and_step_is_used_in_every_mode(clip, tmp_path) -> None:
    want = _torch_reference(8, clip=clip)
    runs = {}
    for mode in MODES:
        runs[mode] = _nearstep(mode, tmp_path, 8, clip=clip)
        _assert_close(runs[mode][0], want)
    _assert_equal(runs["overlap"][0], runs["sync"][0])
    _assert_equal(runs["delayed"][0], runs["sync"][0])  # warmup_steps covers every step here
    over = runs["overlap"][1]
    if clip == 100.0:
        # clip_grad_norm_ multiplies by exactly 1.0: the version moves, no bit changes, the speculation stands.
        assert over["speculated_steps"] == 8 and over["speculation_misses"] == 0
    else:
        assert over["gradients_changed_after_staging"] >= 1 and over["speculation_misses"] >= 1


def test_a_gradient_replaced_or_removed_after_staging_is_followed(tmp_path) -> None:
    def edit(model: nn.Module, t: int) -> None:
        model.head.weight.grad = model.head.weight.grad * 0.5  # a new tensor
        if t % 2:
            model.proj.bias.grad = None  # torch then leaves proj.bias alone this step

    want = _torch_reference(6, edit=edit)
    for mode in ("sync", "overlap"):
        got, _ = _nearstep(mode, tmp_path, 6, edit=edit)
        _assert_close(got, want)


@pytest.mark.parametrize("offload", [False, True], ids=["keep-grads", "offload-grads"])
def test_gradients_discarded_by_zero_grad_without_a_step_are_not_applied(offload, tmp_path) -> None:
    # GradScaler skips step() on inf/NaN and the loop calls zero_grad(): torch drops those gradients.
    def run(make_opt):
        model = make_model()
        opt = make_opt(model)
        for t, batch in enumerate(batches(6)):
            loss_of(model, batch).backward()
            if t % 3 == 1:
                opt.zero_grad()  # skipped
                continue
            opt.step()
            opt.zero_grad()
        return _final_weights(model, opt)

    want = run(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))
    got = run(lambda m: nearstep.AdamW(m.parameters(), lr=1e-2, store=tmp_path / "s", device="inline",
                                       slice_mb=SLICE_MB, mode="overlap", model=m, offload_gradients=offload,
                                       max_grad_norm=1e3))
    _assert_close(got, want)


def test_max_grad_norm_speculates_and_redoes_only_when_it_clips(tmp_path) -> None:
    sync, _ = _nearstep("sync", tmp_path, 8, max_grad_norm=1e3, name="big")
    over, stats = _nearstep("overlap", tmp_path, 8, max_grad_norm=1e3, name="big")
    _assert_equal(over, sync)
    assert stats["clipped_steps"] == 0 and stats["speculated_steps"] == 8
    want = _torch_reference(8, clip=0.05)
    sync, _ = _nearstep("sync", tmp_path, 8, max_grad_norm=0.05, name="small")
    over, stats = _nearstep("overlap", tmp_path, 8, max_grad_norm=0.05, name="small")
    _assert_equal(over, sync)
    _assert_close(over, want)
    assert stats["clipped_steps"] == 8 and stats["speculation_misses"] >= 2
    assert stats["speculated_steps"] < 8  # two misses in a row pause the speculation


def test_speculation_backs_off_while_clipping_keeps_firing(tmp_path) -> None:
    # Misses at steps 1 and 2 pause it for 10 steps; the retry at step 13 misses: 20 steps; at 33: 40 steps.
    _w, stats = _nearstep("overlap", tmp_path, 40, max_grad_norm=1e-4)
    assert stats["clipped_steps"] == 40
    assert stats["speculation_misses"] == 4 and stats["speculated_steps"] == 0


# -- the model's weights are the truth between steps ------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_load_state_dict_and_in_place_edits_after_construction_are_trained_on(mode, tmp_path) -> None:
    other = {k: v + 0.25 for k, v in make_model(seed=7).state_dict().items()}

    def edit(model: nn.Module, t: int) -> None:
        if t == 2:
            model.load_state_dict(other)
        if t == 4:
            with torch.no_grad():
                model.proj.weight.mul_(0.5)
        if t == 5:
            model.norm.weight.data = model.norm.weight.data.clone() + 1.0  # a new storage

    want = _torch_reference(8, edit=edit)
    got, stats = _nearstep(mode, tmp_path, 8, edit=edit)
    _assert_close(got, want)
    assert stats["weights_adopted"] >= 4


def test_a_lossy_master_format_says_it_rounds_adopted_weights(tmp_path) -> None:
    model = make_model()
    with nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / "s", device="inline", slice_mb=SLICE_MB,
                        mode="sync", state_format="bf16-sr") as opt:
        with torch.no_grad():
            model.head.weight.fill_(0.1 + 2**-12)  # not a bf16 value
        loss_of(model, batches(1)[0]).backward()
        with pytest.warns(UserWarning, match="rounds them"):
            opt.step()
        opt.synchronize()
        # The model got the store's (rounded, updated) master: bf16 values.
        assert torch.equal(model.head.weight, model.head.weight.bfloat16().float())


def test_weights_loaded_before_the_first_step_are_trained_on(tmp_path) -> None:
    state = {k: v * 0.5 for k, v in make_model(seed=3).state_dict().items()}
    ref = make_model()
    ref.load_state_dict(state)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    model = make_model()
    opt = nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / "s", device="inline", slice_mb=SLICE_MB,
                         mode="overlap", model=model)
    model.load_state_dict(state)  # after the optimizer made its store from the old weights
    with opt:
        for batch in batches(4):
            for m, o in ((ref, topt), (model, opt)):
                loss_of(m, batch).backward()
                o.step()
                o.zero_grad()
        opt.synchronize()
        _assert_close(list(model.parameters()), list(ref.parameters()))


def test_writing_a_weight_whose_update_has_not_landed_raises(tmp_path) -> None:
    model = make_model()
    with nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / "s", device="inline", slice_mb=SLICE_MB,
                        mode="overlap", model=model) as opt:
        loss_of(model, batches(1)[0]).backward()
        opt.step()
        with torch.no_grad():
            model.head.weight.mul_(0.5)  # the update of step 1 is still on its way
        with pytest.raises(nearstep.StaleWeightError, match="opt.synchronize"):
            loss_of(model, batches(1)[0])


# -- landing before any read -----------------------------------------------------------------


class ListNet(nn.Module):
    """Parameters read outside their own module's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(24)), nn.Parameter(torch.zeros(24))])
        self.inner = nn.Linear(24, 24)
        self.head = nn.Linear(24, 5)
        self.embed = nn.Embedding(64, 24)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).mean(dim=1) * self.scales[0] + self.scales[1]
        h = torch.relu(self.inner.forward(h))  # forward() called directly: no hooks of its own
        return self.head(h)


def _train_list_net(mode: str, tmp_path, steps: int = 8) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = ListNet()
    with nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / mode, device="inline", slice_mb=0.001,
                        mode=mode, model=model) as opt:
        for batch in batches(steps):
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad()
        opt.synchronize()
    return [p.detach().clone() for p in model.parameters()]


def test_a_parameter_list_read_by_its_parent_lands_before_the_parent_reads_it(tmp_path) -> None:
    _assert_equal(_train_list_net("overlap", tmp_path), _train_list_net("sync", tmp_path))


def test_a_model_that_does_not_hold_the_parameters_is_refused(tmp_path) -> None:
    model = make_model()
    with pytest.raises(nearstep.UnsupportedUsageError, match="not in"):
        nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="inline", mode="overlap", model=model.head)
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir()) or True


def test_check_reads_makes_a_stale_read_raise(tmp_path) -> None:
    model = make_model()
    with nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / "s", device="inline", slice_mb=SLICE_MB,
                        mode="overlap", model=model, check_reads=True) as opt:
        for batch in batches(2):
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad()  # reads p.grad only: not a stale read
        _ = [p.shape for p in model.parameters()]  # metadata: fine
        with pytest.raises(nearstep.StaleWeightError, match="before its new weights"):
            model.head.weight.sum()
        loss_of(model, batches(1)[0]).backward()  # a forward lands everything first: no error
        opt.step()
        opt.synchronize()
        model.head.weight.sum()  # after synchronize(): fine


# -- the trainable set follows requires_grad ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_parameters_frozen_at_construction_are_trained_once_unfrozen(mode, tmp_path) -> None:
    def run(make_opt):
        model = make_model()
        model.embed.weight.requires_grad_(False)
        model.proj.weight.requires_grad_(False)
        opt = make_opt(model)
        for t, batch in enumerate(batches(8)):
            if t == 3:
                model.embed.weight.requires_grad_(True)
                model.proj.weight.requires_grad_(True)
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad()
        return _final_weights(model, opt)

    want = run(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))
    got = run(lambda m: nearstep.AdamW(m.named_parameters(), lr=1e-2, store=tmp_path / mode, device="inline",
                                       slice_mb=SLICE_MB, mode=mode, model=m, warmup_steps=100))
    _assert_close(got, want)
    assert not torch.equal(got[0], make_model().embed.weight)


# -- torch.compile ----------------------------------------------------------------------------

_COMPILED = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import nearstep
    from conftest import batches, loss_of, make_model

    def train(mode, compiled, store):
        model = make_model()
        run = torch.compile(model) if compiled else model
        opt = nearstep.AdamW(model.parameters(), lr=1e-2, store=store, device="inline", slice_mb=0.004,
                             mode=mode, model=run, warmup_steps=2)
        for batch in batches(6):
            loss_of(run, batch).backward()
            opt.step()
            opt.zero_grad()
        opt.synchronize()
        opt.close()
        return [p.detach().clone() for p in model.parameters()]

    base = {tmp!r}
    for mode in ("sync", "overlap", "delayed"):
        eager = train(mode, False, base + "/e-" + mode)
        compiled = train(mode, True, base + "/c-" + mode)
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        print(mode, "ok", flush=True)
""")


def test_torch_compile_in_a_fresh_process_equals_eager(tmp_path) -> None:
    from pathlib import Path

    code = _COMPILED.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["sync", "ok", "overlap", "ok", "delayed", "ok"]


# -- the store grows with the trainable set ----------------------------------------------------


def _store_bytes(path) -> int:
    return sum(f.stat().st_blocks * 512 for f in (path / "slices").iterdir())


def test_frozen_parameters_take_no_store_space_until_their_first_gradient(tmp_path) -> None:
    model = make_model()
    for p in model.parameters():
        p.requires_grad_(False)
    model.head.weight.requires_grad_(True)  # the "adapter": 240 of 3125 elements
    store = tmp_path / "s"
    with nearstep.AdamW(model.named_parameters(), lr=1e-2, store=store, device="inline", mode="overlap",
                        model=model) as opt:
        assert opt.device.manifest().dormant == tuple(i for i, (n, _p) in enumerate(model.named_parameters())
                                                      if n != "head.weight")
        small = _store_bytes(store)
        assert small == 2 * 3 * 4096  # one page per region (master, two moments), two generations: head.weight only
        for t, batch in enumerate(batches(4)):
            if t == 2:
                model.embed.weight.requires_grad_(True)  # unfrozen: the store grows
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad()
        opt.synchronize()
        assert opt.stats()["device_restarts"] == 1
        assert _store_bytes(store) > small
        dormant = opt.device.manifest().dormant
        assert 0 not in dormant and len(dormant) == 5
        trained = [p.detach().clone() for p in model.parameters()]
    assert nearstep.verify_store(store).ok
    # Resumed: the grown store's masters come back; a parameter still dormant keeps the model's weights.
    again = make_model()
    opt = nearstep.AdamW(again.named_parameters(), lr=1e-2, store=store, device="inline")
    _assert_equal([again.embed.weight, again.head.weight], [trained[0], trained[5]])
    _assert_equal([again.proj.weight], [make_model().proj.weight])
    opt.close()


def test_add_param_group_then_resume_supplies_the_group_again(tmp_path) -> None:
    def build(model: nn.Module, store):
        opt = nearstep.AdamW([{"params": [model.embed.weight, model.proj.weight, model.proj.bias]}], lr=1e-2,
                             store=store, device="inline", slice_mb=SLICE_MB)
        return opt

    torch.manual_seed(5)
    model = make_model()
    opt = build(model, tmp_path / "s")
    ref = make_model()
    topt = torch.optim.AdamW([ref.embed.weight, ref.proj.weight, ref.proj.bias], lr=1e-2)
    rest = lambda m: [m.norm.weight, m.norm.bias, m.head.weight, m.head.bias]  # noqa: E731
    data = batches(8)
    for t, batch in enumerate(data[:4]):
        if t == 2:
            opt.add_param_group({"params": rest(model), "lr": 5e-3})
            topt.add_param_group({"params": rest(ref), "lr": 5e-3})
        for m, o in ((model, opt), (ref, topt)):
            loss_of(m, batch).backward()
            o.step()
            o.zero_grad()
    opt.close()
    # A new process would build the optimizer the same way, then add the group again.
    model2 = make_model(seed=9)  # other initial weights: the store's replace them
    opt = build(model2, tmp_path / "s")
    with pytest.raises(nearstep.StoreMismatchError):  # not the group the store holds next
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": rest(model2), "lr": 5e-3})
    for batch in data[4:]:
        for m, o in ((model2, opt), (ref, topt)):
            loss_of(m, batch).backward()
            o.step()
            o.zero_grad()
    opt.synchronize()
    _assert_close(list(model2.parameters()), list(ref.parameters()))
    opt.close()
