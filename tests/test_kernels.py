"""Tests of nearstep.kernels against plain references and torch.optim.

The references below are written from the published update rules, one tensor at
a time with plain torch ops (no foreach, no fused), so they share no code path
with the kernels under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from nearstep import kernels, rules
from nearstep.kernels import flat_views, update_
from nearstep.rules import KERNELS, AdamHyper, AdamWHyper, Guards, LionHyper, SegmentReport, SGDHyper, state_names

SIZES = (1, 0, 7, 64, 300)
FIRST_STEPS = (1, 5, 1, 2, 40)  # segments at different steps in one call
NUM_STEPS = 8

CONFIGS = [
    pytest.param(AdamWHyper(lr=1e-2), id="adamw"),
    pytest.param(AdamWHyper(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, maximize=True), id="adamw-max"),
    pytest.param(AdamHyper(lr=1e-2), id="adam"),
    pytest.param(AdamHyper(lr=1e-2, weight_decay=0.1), id="adam-l2"),
    pytest.param(AdamHyper(lr=1e-2, weight_decay=0.1, maximize=True), id="adam-l2-max"),
    pytest.param(SGDHyper(lr=0.1), id="sgd"),
    pytest.param(SGDHyper(lr=0.1, weight_decay=0.05, maximize=True), id="sgd-wd-max"),
    pytest.param(SGDHyper(lr=0.1, momentum=0.9, dampening=0.1), id="sgd-momentum-dampening"),
    pytest.param(SGDHyper(lr=0.1, momentum=0.9, nesterov=True), id="sgd-nesterov"),
    pytest.param(SGDHyper(lr=0.1, momentum=0.9, weight_decay=0.05), id="sgd-momentum-wd"),
    pytest.param(
        SGDHyper(lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.05, maximize=True), id="sgd-nesterov-wd-max"
    ),
    pytest.param(SGDHyper(lr=0.1, weight_decay=0.05, decoupled_weight_decay=True), id="sgd-decoupled"),
    pytest.param(SGDHyper(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05, decoupled_weight_decay=True),
                 id="sgd-nesterov-decoupled"),
    pytest.param(LionHyper(lr=1e-3), id="lion"),
    pytest.param(LionHyper(lr=1e-3, beta1=0.95, beta2=0.98, weight_decay=0.1, maximize=True), id="lion-wd-max"),
]
TORCH_CONFIGS = [c for c in CONFIGS if not isinstance(c.values[0], LionHyper)
                 and not getattr(c.values[0], "decoupled_weight_decay", False)]  # torch.optim.SGD couples its decay


# ---------------------------------------------------------------- references


def ref_spike_clip_(grad: Tensor, exp_avg_sq: Tensor, theta: float, correction: float = 1.0) -> int:
    """Element by element: with v_hat = v / correction (Adam's bias correction of the second
    moment before this step), clip g to sign(g)*theta*sqrt(v_hat) where g^2 > theta^2*v_hat (v > 0)."""
    count = 0
    for j in range(grad.numel()):
        g, v = grad[j].item(), exp_avg_sq[j].item() / correction
        if v > 0 and g * g > theta * theta * v:
            grad[j] = math.copysign(theta * math.sqrt(v), g)
            count += 1
    return count


def ref_adam_(hyper, master, states, grad, step) -> None:
    """Adam (Kingma & Ba) with L2 decay, or AdamW (Loshchilov & Hutter) with decoupled decay."""
    exp_avg, exp_avg_sq = states["exp_avg"], states["exp_avg_sq"]
    g = -grad if hyper.maximize else grad.clone()
    if isinstance(hyper, AdamWHyper):
        master.mul_(1 - hyper.lr * hyper.weight_decay)
    elif hyper.weight_decay != 0:
        g = g + hyper.weight_decay * master
    exp_avg.mul_(hyper.beta1).add_((1 - hyper.beta1) * g)
    exp_avg_sq.mul_(hyper.beta2).add_((1 - hyper.beta2) * g * g)
    bias_correction1 = 1 - hyper.beta1**step
    bias_correction2 = 1 - hyper.beta2**step
    denom = exp_avg_sq.sqrt() / math.sqrt(bias_correction2) + hyper.eps
    master.sub_(hyper.lr / bias_correction1 * exp_avg / denom)


def ref_sgd_(hyper, master, states, grad, step) -> None:
    """SGD with momentum (Sutskever et al.), torch's convention: buffer = gradient on the first step."""
    buf = states["momentum_buffer"]
    g = -grad if hyper.maximize else grad.clone()
    if hyper.weight_decay != 0 and hyper.decoupled_weight_decay:
        master.mul_(1 - hyper.lr * hyper.weight_decay)
    elif hyper.weight_decay != 0:
        g = g + hyper.weight_decay * master
    if hyper.momentum != 0:
        if step == 1:
            buf.copy_(g)
        else:
            buf.mul_(hyper.momentum).add_((1 - hyper.dampening) * g)
        g = g + hyper.momentum * buf if hyper.nesterov else buf
    master.sub_(hyper.lr * g)


def ref_lion_(hyper, master, states, grad, step) -> None:
    """Lion (Chen et al. 2023, Algorithm 2)."""
    exp_avg = states["exp_avg"]
    g = -grad if hyper.maximize else grad
    direction = hyper.beta1 * exp_avg + (1 - hyper.beta1) * g
    master.mul_(1 - hyper.lr * hyper.weight_decay).sub_(hyper.lr * torch.sign(direction))
    exp_avg.mul_(hyper.beta2).add_((1 - hyper.beta2) * g)


def ref_step_(hyper, master, states, grad, step, guards: Guards) -> SegmentReport:
    grad = grad.clone()
    spiked = 0
    if guards.spike_clip is not None and step > guards.spike_warmup and step > 1:
        spiked = ref_spike_clip_(grad, states["exp_avg_sq"], guards.spike_clip, 1 - hyper.beta2 ** (step - 1))
    old = master.clone()
    match hyper:
        case AdamWHyper() | AdamHyper():
            ref_adam_(hyper, master, states, grad, step)
        case SGDHyper():
            ref_sgd_(hyper, master, states, grad, step)
        case LionHyper():
            ref_lion_(hyper, master, states, grad, step)
    if guards.update_clip is None and not guards.telemetry:
        return SegmentReport(spiked, math.nan, math.nan, False)
    update = (master - old).double()
    rms = update.square().mean().sqrt().item() if master.numel() else 0.0
    old_norm = old.double().norm().item()
    ratio = update.norm().item() / old_norm if old_norm > 0 else 0.0
    clipped = guards.update_clip is not None and rms > guards.update_clip
    if clipped:
        scale = guards.update_clip / rms
        master.copy_(old + (update * scale).float())
        rms, ratio = guards.update_clip, ratio * scale
    return SegmentReport(spiked, rms, ratio, clipped)


# ---------------------------------------------------------------- helpers


@pytest.fixture(params=["default-blocks", "tiny-blocks"])
def block(request, monkeypatch):
    """The guards work in cache-sized blocks; tiny blocks split every segment and batch several."""
    if request.param == "tiny-blocks":
        monkeypatch.setattr(kernels, "_BLOCK", 16)


def initial_state(name: str, numel: int, step: int, gen: torch.Generator) -> Tensor:
    if step == 1 and name != "momentum_buffer":
        return torch.zeros(numel)
    if name == "exp_avg_sq":
        return torch.rand(numel, generator=gen) * 0.01
    # A first-step momentum buffer holds garbage: the kernel must overwrite it.
    return torch.randn(numel, generator=gen) * 0.1


class Problem:
    """Flat buffers carved into segments (the kernel's side) and per-segment clones (the reference's)."""

    def __init__(self, hyper, sizes, first_steps, num_steps, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.hyper, self.sizes, self.first_steps = hyper, list(sizes), list(first_steps)
        self.names = state_names(type(hyper))
        masters = [torch.randn(n, generator=gen) for n in sizes]
        states = {name: [initial_state(name, n, s, gen) for n, s in zip(sizes, first_steps)] for name in self.names}
        self.grads = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(num_steps)]
        self.flat_master = torch.cat(masters)
        self.flat_states = {name: torch.cat(states[name]) for name in self.names}
        self.masters = flat_views(self.flat_master, sizes)
        self.states = {name: flat_views(self.flat_states[name], sizes) for name in self.names}
        self.ref_masters = [m.clone() for m in masters]
        self.ref_states = {name: [t.clone() for t in states[name]] for name in self.names}

    def steps(self, t: int) -> list[int]:
        return [s + t for s in self.first_steps]

    def kernel_step(self, t: int, guards: Guards) -> list[SegmentReport]:
        return update_(self.hyper, self.masters, self.states, [g.clone() for g in self.grads[t]], self.steps(t), guards)

    def reference_step(self, t: int, guards: Guards) -> list[SegmentReport]:
        return [
            ref_step_(self.hyper, self.ref_masters[i], {k: v[i] for k, v in self.ref_states.items()},
                      self.grads[t][i], step, guards)
            for i, step in enumerate(self.steps(t))
        ]

    def assert_matches_reference(self, **tolerances) -> None:
        torch.testing.assert_close(self.flat_master, torch.cat(self.ref_masters), **tolerances)
        for name in self.names:
            torch.testing.assert_close(self.flat_states[name], torch.cat(self.ref_states[name]), **tolerances)


def torch_optimizer(hyper, params) -> torch.optim.Optimizer:
    common = dict(lr=hyper.lr, weight_decay=hyper.weight_decay, maximize=hyper.maximize, foreach=False, fused=False)
    match hyper:
        case AdamWHyper():
            return torch.optim.AdamW(params, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps, **common)
        case AdamHyper():
            return torch.optim.Adam(params, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps, **common)
        case SGDHyper():
            return torch.optim.SGD(
                params, momentum=hyper.momentum, dampening=hyper.dampening, nesterov=hyper.nesterov, **common
            )
    raise AssertionError(hyper)


# ---------------------------------------------------------------- the update rules


@pytest.mark.parametrize("hyper", CONFIGS)
def test_update_matches_loop_reference(hyper):
    problem = Problem(hyper, SIZES, FIRST_STEPS, NUM_STEPS)
    pointers = [m.data_ptr() for m in problem.masters]
    for t in range(NUM_STEPS):
        reports = problem.kernel_step(t, Guards())
        problem.reference_step(t, Guards())
        problem.assert_matches_reference()
        assert all(r.spike_clipped == 0 and not r.update_clipped for r in reports)
        assert all(math.isnan(r.update_rms) and math.isnan(r.update_to_weight) for r in reports)
    assert [m.data_ptr() for m in problem.masters] == pointers  # updated in place


@pytest.mark.parametrize("hyper", TORCH_CONFIGS)
def test_update_matches_torch_optim(hyper):
    # Parameter i first gets a gradient at step i, so torch.optim keeps a different
    # step count per parameter and update_ sees first and later steps in one call.
    gen = torch.Generator().manual_seed(1)
    sizes = [5, 33, 128, 1]
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]
    optimizer = torch_optimizer(hyper, params)
    names = state_names(type(hyper))
    flat_master = torch.cat([p.detach() for p in params])
    masters = flat_views(flat_master, sizes)
    flat_states = {name: torch.zeros(sum(sizes)) for name in names}
    states = {name: flat_views(flat_states[name], sizes) for name in names}
    for t in range(NUM_STEPS):
        active = [i for i in range(len(sizes)) if i <= t]
        grads = [torch.randn(n, generator=gen) for n in sizes]
        for i in active:
            params[i].grad = grads[i].clone()
        optimizer.step()
        update_(
            hyper,
            [masters[i] for i in active],
            {name: [states[name][i] for i in active] for name in names},
            [grads[i].clone() for i in active],
            [t - i + 1 for i in active],
            Guards(),
        )
        for i in active:
            torch.testing.assert_close(masters[i], params[i].detach())
            for name in names:
                expected = optimizer.state[params[i]].get(name)
                if expected is None:  # torch keeps no momentum buffer at momentum 0
                    assert not states[name][i].any()
                else:
                    torch.testing.assert_close(states[name][i], expected)


def test_update_empty_call_is_a_no_op():
    assert update_(AdamWHyper(lr=1e-3), [], {"exp_avg": [], "exp_avg_sq": []}, [], [], Guards()) == []


# ---------------------------------------------------------------- spike clip


@pytest.mark.parametrize("hyper_type", [AdamWHyper, AdamHyper])
def test_spike_clip_clips_known_elements(hyper_type, block):
    theta, warmup = 2.0, 10
    correction = 1 - 0.999 ** warmup  # the bias correction of v before step warmup + 1
    exp_avg_sq = torch.full((20,), 0.25 * correction)  # bound = theta * sqrt(v / correction) = 1.0
    exp_avg_sq[7] = 0.0  # no history: never clipped
    grad = torch.linspace(-0.9, 0.9, 20)
    spikes = {3: 5.0, 10: -3.0, 17: 1.5}
    for j, value in spikes.items():
        grad[j] = value
    grad[7] = 100.0
    expected = grad.clone()
    for j, value in spikes.items():
        expected[j] = math.copysign(1.0, value)
    # beta1 = 0 and a zero first moment make the new first moment the clipped gradient.
    hyper = hyper_type(lr=1e-3, beta1=0.0, weight_decay=0.0)
    guards = Guards(spike_clip=theta, spike_warmup=warmup)

    def fresh_segment() -> list[Tensor]:  # master, exp_avg, exp_avg_sq, grad
        return [t.clone() for t in (torch.ones(20), torch.zeros(20), exp_avg_sq, grad)]

    active, warming = fresh_segment(), fresh_segment()
    reports = update_(
        hyper,
        [active[0], warming[0]],
        {"exp_avg": [active[1], warming[1]], "exp_avg_sq": [active[2], warming[2]]},
        [active[3], warming[3]],
        [warmup + 1, warmup],
        guards,
    )
    assert [r.spike_clipped for r in reports] == [len(spikes), 0]
    torch.testing.assert_close(active[1], expected)
    torch.testing.assert_close(warming[1], grad)  # not applied during warm-up
    loop_grad = grad.clone()
    assert ref_spike_clip_(loop_grad, exp_avg_sq, theta, correction) == len(spikes)
    torch.testing.assert_close(loop_grad, expected)


def test_spike_clip_with_nonfinite_gradients(block):
    # Only reachable with skip_nonfinite off on the host: inf is a spike like any
    # other, nan is not comparable and passes through (and is not counted).
    exp_avg_sq = torch.full((6,), 4.0 * (1 - 0.999**4))  # before step 5: bound = 1 * sqrt(v_hat) = 2
    grad = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 1.0, -3.0])
    exp_avg = torch.zeros(6)
    reports = update_(
        AdamWHyper(lr=0.0, beta1=0.0), [torch.ones(6)], {"exp_avg": [exp_avg], "exp_avg_sq": [exp_avg_sq]},
        [grad], [5], Guards(spike_clip=1.0, spike_warmup=0, skip_nonfinite=False),
    )
    assert reports[0].spike_clipped == 3
    torch.testing.assert_close(exp_avg, torch.tensor([2.0, -2.0, math.nan, -0.0, 1.0, -2.0]), equal_nan=True)


@pytest.mark.parametrize("hyper", [AdamWHyper(lr=1e-2), AdamHyper(lr=1e-2, weight_decay=0.1, maximize=True)])
def test_spike_clip_over_steps_matches_loop_reference(hyper, block):
    guards = Guards(spike_clip=1.5, spike_warmup=3)
    problem = Problem(hyper, (3, 50, 200), (1, 3, 9), NUM_STEPS, seed=2)
    total = 0
    for t in range(NUM_STEPS):
        reports = problem.kernel_step(t, guards)
        expected = problem.reference_step(t, guards)
        assert [r.spike_clipped for r in reports] == [r.spike_clipped for r in expected]
        problem.assert_matches_reference()
        total += sum(r.spike_clipped for r in reports)
    assert total > 0  # the data really exercised the guard


@pytest.mark.parametrize("hyper_type", [SGDHyper, LionHyper])
def test_spike_clip_refused_without_second_moment(hyper_type):
    guards = Guards(spike_clip=3.0)
    with pytest.raises(ValueError, match="spike_clip needs the second moment.*nearstep.AdamW"):
        guards.check_for(hyper_type)
    hyper = hyper_type(lr=0.1)
    names = state_names(hyper_type)
    with pytest.raises(ValueError, match="spike_clip needs the second moment"):
        update_(hyper, [torch.ones(3)], {n: [torch.zeros(3)] for n in names}, [torch.ones(3)], [1], guards)
    Guards(spike_clip=3.0).check_for(AdamWHyper)
    Guards(spike_clip=3.0).check_for(AdamHyper)
    Guards(update_clip=1.0, telemetry=True).check_for(hyper_type)


# ---------------------------------------------------------------- update clip and telemetry


def test_update_clip_caps_large_update_only(block):
    cap = 0.1
    gen = torch.Generator().manual_seed(3)
    big_grad, small_grad = torch.randn(100, generator=gen), torch.randn(50, generator=gen) * 1e-3
    flat = torch.ones(150)
    masters = flat_views(flat, [100, 50])
    buffers = flat_views(torch.zeros(150), [100, 50])
    reports = update_(
        SGDHyper(lr=1.0), masters, {"momentum_buffer": buffers}, [big_grad.clone(), small_grad.clone()], [1, 1],
        Guards(update_clip=cap),
    )
    big_update = masters[0] - 1.0
    rms = lambda x: x.double().square().mean().sqrt()  # noqa: E731
    # fp32 rounding of 1 + update limits how exactly the applied RMS hits the cap.
    torch.testing.assert_close(rms(big_update), torch.tensor(cap, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(big_update, -big_grad * (cap / rms(big_grad).item()), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(masters[1], 1.0 - small_grad)
    assert reports[0].update_clipped and not reports[1].update_clipped
    assert reports[0].update_rms == pytest.approx(cap)  # the applied update
    assert reports[0].update_to_weight == pytest.approx(big_update.double().norm().item() / 10.0, rel=1e-5)
    assert reports[1].update_rms == pytest.approx(rms(small_grad).item(), rel=1e-4)


@pytest.mark.parametrize("hyper", [AdamWHyper(lr=0.5), LionHyper(lr=0.5)])
def test_update_clip_leaves_moments_alone(hyper, block):
    guarded = Problem(hyper, (40, 9), (1, 4), 3, seed=4)
    plain = Problem(hyper, (40, 9), (1, 4), 3, seed=4)
    for t in range(3):
        reports = guarded.kernel_step(t, Guards(update_clip=0.05))
        plain.kernel_step(t, Guards())
        expected = guarded.reference_step(t, Guards(update_clip=0.05))
        assert all(r.update_clipped for r in reports)
        for report, want in zip(reports, expected):
            assert report.update_rms == pytest.approx(0.05)
            assert report.update_to_weight == pytest.approx(want.update_to_weight, rel=1e-4)
        for name in guarded.names:
            assert torch.equal(guarded.flat_states[name], plain.flat_states[name])
        guarded.assert_matches_reference(rtol=1e-5, atol=1e-5)


def test_telemetry_matches_hand_computation(block):
    hyper = AdamWHyper(lr=1e-2, weight_decay=0.1)
    watched = Problem(hyper, (64, 0, 10, 5), (1, 1, 3, 1), 2, seed=5)
    plain = Problem(hyper, (64, 0, 10, 5), (1, 1, 3, 1), 2, seed=5)
    watched.masters[3].zero_()
    plain.masters[3].zero_()
    for t in range(2):
        olds = [m.clone().double() for m in watched.masters]
        reports = watched.kernel_step(t, Guards(telemetry=True))
        plain.kernel_step(t, Guards())
        assert torch.equal(watched.flat_master, plain.flat_master)  # telemetry changes nothing
        for old, new, report in zip(olds, watched.masters, reports):
            update = new.double() - old
            expected_rms = math.sqrt(update.square().sum().item() / update.numel()) if update.numel() else 0.0
            expected_ratio = update.norm().item() / old.norm().item() if old.norm() > 0 else 0.0
            assert report.update_rms == pytest.approx(expected_rms, rel=1e-5)
            assert report.update_to_weight == pytest.approx(expected_ratio, rel=1e-5)
            assert not report.update_clipped and report.spike_clipped == 0
        if t == 0:  # segment 3 started from all-zero weights
            assert reports[3].update_to_weight == 0.0 and reports[3].update_rms > 0


# ---------------------------------------------------------------- validation and helpers


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: AdamWHyper(lr=-1), ValueError, r"lr must be >= 0, got -1"),
        (lambda: AdamWHyper(lr=1e-3, beta1=1.5), ValueError, r"beta1 must be in \[0, 1\), got 1.5"),
        (lambda: AdamHyper(lr=1e-3, beta2=1.0), ValueError, r"beta2 must be in \[0, 1\), got 1.0"),
        (lambda: AdamHyper(lr=1e-3, eps=-1e-8), ValueError, r"eps must be >= 0"),
        (lambda: AdamWHyper(lr=1e-3, weight_decay=-0.1), ValueError, r"weight_decay must be >= 0"),
        (lambda: AdamWHyper(lr=float("nan")), ValueError, r"lr must be finite, got nan"),
        (lambda: AdamWHyper(lr="0.1"), TypeError, r"lr must be a real number, got str"),
        (lambda: AdamWHyper(lr=1e-3, maximize=1), TypeError, r"maximize must be a bool"),
        (lambda: SGDHyper(lr=0.1, momentum=-0.9), ValueError, r"momentum must be >= 0"),
        (lambda: SGDHyper(lr=0.1, nesterov=True), ValueError, r"Nesterov momentum requires a momentum"),
        (lambda: SGDHyper(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError, r"zero dampening"),
        (lambda: LionHyper(lr=1e-4, beta2=-0.1), ValueError, r"beta2 must be in \[0, 1\), got -0.1"),
        (lambda: Guards(spike_clip=0.0), ValueError, r"spike_clip must be > 0"),
        (lambda: Guards(spike_clip=-2), ValueError, r"spike_clip must be > 0.*got -2"),
        (lambda: Guards(spike_warmup=-1), ValueError, r"spike_warmup must be >= 0, got -1"),
        (lambda: Guards(spike_warmup=1.5), TypeError, r"spike_warmup must be an int"),
        (lambda: Guards(update_clip=0), ValueError, r"update_clip must be > 0"),
        (lambda: Guards(update_clip=float("inf")), ValueError, r"update_clip must be finite"),
    ],
)
def test_validation_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_hypers_are_frozen_and_normalised():
    hyper = AdamWHyper(lr=1, beta1=0)
    assert isinstance(hyper.lr, float) and isinstance(hyper.beta1, float)
    with pytest.raises(AttributeError):
        hyper.lr = 0.5  # type: ignore[misc]
    assert AdamHyper(lr=1e-3).weight_decay == 0.0 and AdamWHyper(lr=1e-3).weight_decay == 1e-2
    with pytest.raises(TypeError):
        Guards(True)  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m, s, g: (m, s, g[:1], [1, 1]), r"grads has 1 segments but masters has 2"),
        (lambda m, s, g: (m, s, g, [1]), r"steps has 1 segments"),
        (lambda m, s, g: (m, {"exp_avg": s["exp_avg"]}, g, [1, 1]), r"states must hold exactly the regions"),
        (lambda m, s, g: (m, s, [g[0], torch.ones(2)], [1, 1]), r"segment 1: master has 3 elements"),
        (lambda m, s, g: (m, s, g, [1, 0]), r"segment 1: steps are counted from 1"),
    ],
)
def test_update_rejects_inconsistent_segments(make, match):
    masters = [torch.ones(4), torch.ones(3)]
    states = {"exp_avg": [torch.zeros(4), torch.zeros(3)], "exp_avg_sq": [torch.zeros(4), torch.zeros(3)]}
    grads = [torch.ones(4), torch.ones(3)]
    with pytest.raises(ValueError, match=match):
        update_(AdamWHyper(lr=1e-3), *make(masters, states, grads), Guards())


def test_state_names_and_kernels():
    assert state_names(AdamWHyper) == ("exp_avg", "exp_avg_sq")
    assert state_names(AdamHyper) == ("exp_avg", "exp_avg_sq")
    assert state_names(SGDHyper) == ("momentum_buffer",)
    assert state_names(LionHyper) == ("exp_avg",)
    assert KERNELS == {"adamw": AdamWHyper, "adam": AdamHyper, "sgd": SGDHyper, "lion": LionHyper}
    with pytest.raises(TypeError, match="no kernel for"):
        state_names(dict)


def test_flat_views_are_consecutive_views():
    buf = torch.arange(10, dtype=torch.float32)
    views = flat_views(buf, [3, 0, 4])
    assert [v.tolist() for v in views] == [[0, 1, 2], [], [3, 4, 5, 6]]
    views[2].fill_(-1)
    assert buf[3:7].eq(-1).all() and buf[7:].tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="numels sum to 11, but the buffer holds only 10"):
        flat_views(buf, [5, 6])
    with pytest.raises(ValueError, match="contiguous 1-D"):
        flat_views(buf.view(2, 5), [2])
    with pytest.raises(ValueError, match="numels must be >= 0"):
        flat_views(buf, [-1])


@pytest.mark.parametrize("hyper", [
    rules.AdamWHyper(lr=0.1, weight_decay=0.1, maximize=True),
    rules.AdamHyper(lr=0.1, weight_decay=0.1, maximize=True),
    rules.SGDHyper(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True, maximize=True),
    rules.SGDHyper(lr=0.1, momentum=0.5, dampening=0.2, weight_decay=0.1),
], ids=["adamw", "adam", "sgd-nesterov", "sgd-dampening"])
def test_unguarded_fused_kernels_leave_the_gradients_untouched(hyper) -> None:
    # The engine hands staged fp32 gradients to these kernels in place (no copy); see
    # [Note: gradients in place] in engine.py.
    torch.manual_seed(0)
    masters = [torch.randn(1000), torch.randn(37)]
    grads = [torch.randn(1000), torch.randn(37)]
    before = [g.clone() for g in grads]
    states = {name: [torch.rand(1000), torch.rand(37)] for name in kernels.state_names(type(hyper))}
    for step in (1, 2, 3):
        kernels.update_(hyper, masters, states, grads, [step, step], rules.Guards())
    for g, b in zip(grads, before):
        assert torch.equal(g, b)
