"""The host side of a step (``Pipeline``) against a fake device, through the protocol only.

``FakeDevice`` implements :class:`nearstep.protocol.Device` here: it records every
request it is given and completes it according to a script. By default it hands
each request to a real in-process :class:`~nearstep.engine.Engine` (so the new
weights can be compared with ``torch.optim.AdamW``); without an engine it
completes an ``Apply`` by posting ``-gradient`` as the new weights. It can hold
completions and finish them later, fail a chosen request, or die (every pending
and later completion fails with ``DeviceDiedError``).
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from nearstep import rules
from nearstep.engine import Engine, EngineConfig
from nearstep.errors import DeviceDiedError, DeviceError, StaleWeightError
from nearstep.pipeline import Phase, Pipeline, PipelineConfig, StepInputs
from nearstep.protocol import (Abort, Apply, Commit, Completion, Device, DeviceInfo, DeviceMemory, Prefetch, Request,
                               Stage, StepState, describe)
from nearstep.staging import StagingLayout
from nearstep.store import Store, param_specs
from nearstep.trace import Trace

LR, WD = 1e-2, 1e-2
HYPER = rules.AdamWHyper(lr=LR, weight_decay=WD)
HPARAMS = ({"lr": LR, "weight_decay": WD},)
SLICE_BYTES = 512  # 128 fp32 elements: b.weight is split over four slices
BUDGET = 64 << 20


class Chain(nn.Module):
    """Three linear layers in a chain, so backward finishes them last to first.

    With ``extra``, a parameter no loss uses (it never has a gradient) shares the last
    slice with ``a``'s parameters.
    """

    def __init__(self, extra: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        if extra:
            self.extra = nn.Parameter(torch.randn(10))
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 24)
        self.c = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(5, 6, generator=g), torch.randn(5, 4, generator=g)


class FakeDevice(Device):
    """A device that records requests and completes them by script (see the module docstring)."""

    def __init__(self, layout: StagingLayout, engine: Engine | None = None) -> None:
        self.layout = layout
        self.engine = engine
        self.requests: list[Request] = []
        self.hold = False  # completions wait for release()
        self.held: list[tuple[Request, Completion]] = []
        self.failures: list[tuple[Callable[[Request], bool], BaseException]] = []
        self.dead = False
        self.die_when: Callable[[Request], bool] | None = None  # dies on the first request it accepts
        self.closed = False
        self.memories: dict[int, DeviceMemory] = {}
        self.info = DeviceInfo("fake", os.getpid(), (), BUDGET, 0, 0, tuple(rules.KERNELS), "fake", False)

    @property
    def alive(self) -> bool:
        return not self.dead and not self.closed

    def alloc(self, nbytes: int) -> DeviceMemory:
        mem = DeviceMemory(len(self.memories) + 1, nbytes, torch.zeros(nbytes, dtype=torch.uint8))
        self.memories[mem.id] = mem
        if self.engine is not None:
            self.engine.memory[mem.id] = mem.bytes
        return mem

    def submit(self, request: Request) -> Completion:
        self.requests.append(request)
        done = Completion(describe(request))
        if self.die_when is not None and self.die_when(request):
            self.die()
        if self.dead:
            done.finish(error=DeviceDiedError(f"the fake device died before {done.what}"))
        elif self.hold:
            self.held.append((request, done))
        else:
            self.complete(request, done)
        return done

    def fail(self, predicate: Callable[[Request], bool], error: BaseException) -> None:
        """The next request ``predicate`` accepts fails with ``error``."""
        self.failures.append((predicate, error))

    def complete(self, request: Request, done: Completion) -> None:
        for j, (predicate, error) in enumerate(self.failures):
            if predicate(request):
                del self.failures[j]
                done.finish(error=error)
                return
        if self.engine is not None:
            try:
                result = self.engine.handle(request)
            except Exception as exc:
                done.finish(error=exc)
                return
            done.finish(result)
        else:
            done.finish(self.fake_result(request))

    def fake_result(self, request: Request):
        if not isinstance(request, Apply):
            return None
        arena = self.memories[request.memory].bytes
        staged = self.layout.slices[request.slice]
        for seg, step in zip(staged.segments, request.steps):
            if step:
                self.layout.weight_view(arena, seg, staged).copy_(-self.layout.grad_view(arena, seg, staged))
        return [rules.UNWATCHED] * len(staged.segments)

    def release(self, n: int | None = None) -> None:
        """Complete the first ``n`` held requests (all of them by default), in order."""
        n = len(self.held) if n is None else n
        now, self.held = self.held[:n], self.held[n:]
        for request, done in now:
            self.complete(request, done)

    def die(self) -> None:
        self.dead = True
        held, self.held = self.held, []
        for _request, done in held:
            done.finish(error=DeviceDiedError(f"the fake device died with {done.what} pending"))

    def of(self, kind: type, since: int = 0) -> list:
        return [r for r in self.requests[since:] if isinstance(r, kind)]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.engine is not None:
                self.engine.close()


class Rig:
    """A model, its store, a fake device (on a real engine unless ``engine=False``) and a pipeline."""

    def __init__(self, path: Path, model: Chain, config: PipelineConfig = PipelineConfig(), engine: bool = True) -> None:
        self.model = model
        named = list(model.named_parameters())
        self.names = [n for n, _p in named]
        self.params = [p for _n, p in named]
        self.index = {n: i for i, n in enumerate(self.names)}
        store = Store.create(path, params=param_specs([named]), masters=lambda i: self.params[i].detach(),
                             optimizer="adamw", state_names=rules.state_names(rules.AdamWHyper),
                             hyperparameters=HPARAMS, slice_bytes=SLICE_BYTES)
        self.layout = StagingLayout.from_manifest(store.manifest)
        self.engine = Engine(store, EngineConfig(memory_budget=BUDGET)) if engine else None
        if self.engine is None:
            store.close()
        self.device = FakeDevice(self.layout, self.engine)
        self.step = 0
        self.param_steps = [0] * len(self.params)
        self.failures: list[bool] = []
        self.pipeline = Pipeline(self.params, self.names, self.layout, self.device, Trace(collect=lambda: []),
                                 config, step_inputs=self.step_inputs,
                                 on_failure=lambda landed, _step: self.failures.append(landed))
        # The reference: torch's AdamW on a copy of the model, fed the very same gradients.
        self.ref_model = copy.deepcopy(model)
        self.ref_params = list(self.ref_model.parameters())
        self.ref = torch.optim.AdamW(self.ref_params, lr=LR, weight_decay=WD, foreach=False, fused=False)

    def step_inputs(self) -> StepInputs:
        return StepInputs((HYPER,), tuple(self.param_steps), rules.Guards())

    def backward(self, seed: int) -> list[int]:
        """Zero the gradients, run forward and backward on batch ``seed``; the parameters with a gradient."""
        for p in self.params:
            p.grad = None
        x, y = batch(seed)
        nn.functional.mse_loss(self.model(x), y).backward()
        return [i for i, p in enumerate(self.params) if p.grad is not None]

    def commit(self, present: list[int]) -> Commit:
        steps = tuple(s + 1 if i in present else s for i, s in enumerate(self.param_steps))
        return Commit(self.step + 1, steps, HPARAMS)

    def launch(self, present: list[int], scale: float = 1.0):
        inflight = self.pipeline.launch(self.step + 1, present, scale, self.commit(present))
        self.reference_step(present, scale)
        self.step += 1
        self.param_steps = [s + 1 if i in present else s for i, s in enumerate(self.param_steps)]
        return inflight

    def reference_step(self, present: list[int], scale: float) -> None:
        for i, (p, q) in enumerate(zip(self.params, self.ref_params)):
            q.grad = p.grad.detach().clone() * scale if i in present else None
        self.ref.step()

    def sync_step(self, seed: int, scale: float = 1.0) -> list[int]:
        present = self.backward(seed)
        self.pipeline.stage_rest(present)
        self.launch(present, scale)
        self.pipeline.finish()
        return present

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def assert_matches_reference(self, only: list[int] | None = None) -> None:
        for i, (p, q) in enumerate(zip(self.params, self.ref_params)):
            if only is None or i in only:
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6,
                                           msg=lambda m, i=i: f"{self.names[i]}: {m}")

    def slices_of(self, i: int) -> list[int]:
        return [s.index for s in self.layout.slices if any(seg.param == i for seg in s.segments)]

    def close(self) -> None:
        self.pipeline.detach()
        self.device.close()


@pytest.fixture
def make_rig(tmp_path):
    rigs: list[Rig] = []

    def make(model: Chain | None = None, config: PipelineConfig = PipelineConfig(), engine: bool = True) -> Rig:
        rig = Rig(tmp_path / f"s{len(rigs)}", model or Chain(), config, engine)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def expected_completion_order(rig: Rig, grad_order: list[int]) -> list[int]:
    """The slices in the order their last gradient is staged, given the order gradients arrive in."""
    waiting = {s.index: {seg.param for seg in s.segments if rig.params[seg.param].requires_grad}
               for s in rig.layout.slices}
    order = []
    for i in grad_order:
        for k in rig.slices_of(i):  # a split parameter's slices in index order
            waiting[k].discard(i)
            if not waiting[k] and k not in order:
                order.append(k)
    return order


# ---------------------------------------------------------------------------------------------
# Sync mode: the request sequence of one step


def test_a_sync_step_submits_prefetch_applies_then_commit(make_rig) -> None:
    rig = make_rig(Chain(extra=True))
    extra = rig.index["extra"]
    assert any(len({seg.param for seg in s.segments}) > 1 and any(seg.param == extra for seg in s.segments)
               for s in rig.layout.slices), "extra must share a slice with parameters that have gradients"
    n = len(rig.layout.slices)
    forward = tuple(rig.pipeline.forward_order)
    # Forward order: every slice once, by the first parameter it holds.
    assert sorted(forward) == list(range(n))
    firsts = [min(seg.param for seg in rig.layout.slices[k].segments) for k in forward]
    assert firsts == sorted(firsts)
    for step, scale in ((1, 0.3), (2, 1.0)):
        since = len(rig.device.requests)
        steps_before = list(rig.param_steps)
        present = rig.backward(step)
        assert extra not in present
        rig.pipeline.stage_rest(present)
        assert rig.pipeline.phase is Phase.STAGING
        staging = rig.device.requests[since:]
        assert isinstance(staging[0], Prefetch) and staging[0].slices == forward
        assert all(isinstance(r, Stage) for r in staging[1:])
        # Every slice but the one waiting for extra's gradient is staged, once.
        assert sorted(r.slice for r in staging[1:]) == sorted(k for k in range(n) if k not in rig.slices_of(extra))
        since = len(rig.device.requests)
        commit = rig.commit(present)
        rig.pipeline.launch(step, present, scale, commit)
        rig.reference_step(present, scale)
        rig.step, rig.param_steps = step, list(commit.param_steps)
        launched = rig.device.requests[since:]
        applies, last = launched[:-1], launched[-1]
        assert last is commit
        assert [a.slice for a in applies] == list(forward)
        arena = rig.pipeline.arenas[0].id
        for a in applies:
            assert isinstance(a, Apply) and a.grad_scale == scale and a.hypers == (HYPER,) and a.memory == arena
            want = tuple(steps_before[seg.param] + 1 if seg.param in present else 0
                         for seg in rig.layout.slices[a.slice].segments)
            assert a.steps == want
            assert a.adopt == () or not any(a.adopt)
        assert rig.pipeline.phase is Phase.LAUNCHED
        rig.pipeline.finish()
        assert rig.pipeline.phase is Phase.IDLE and rig.pipeline.inflight is None
        rig.assert_matches_reference()  # extra included: it never moved
    assert rig.engine.manifest.step == 2 and rig.engine.manifest.param_steps == tuple(rig.param_steps)


# ---------------------------------------------------------------------------------------------
# Speculation: early applies during backward


def test_speculation_applies_each_slice_as_backward_finishes_it(make_rig) -> None:
    rig = make_rig(Chain(), PipelineConfig(speculate=True))
    pipeline, device = rig.pipeline, rig.device
    pipeline.attach_grad_hooks()
    grad_order: list[int] = []
    for i, p in enumerate(rig.params):  # after the pipeline's own hooks: they see the order it staged in
        p.register_post_accumulate_grad_hook(lambda _p, i=i: grad_order.append(i))
    forward = list(pipeline.forward_order)

    def speculative_backward(seed: int) -> tuple[list[int], list[Request]]:
        grad_order.clear()
        since = len(device.requests)
        present = rig.backward(seed)
        return present, device.requests[since:]

    # Step 1: the speculation stands.
    present, during = speculative_backward(1)
    order = expected_completion_order(rig, grad_order)
    assert sorted(order) == list(range(len(rig.layout.slices)))
    # Backward order: the first slice finished holds the last registered parameter.
    assert len(rig.params) - 1 in {seg.param for seg in rig.layout.slices[order[0]].segments}
    assert isinstance(during[0], Prefetch) and list(during[0].slices) == forward[::-1]
    assert [r.slice for r in during if isinstance(r, Stage)] == order
    early = [r for r in during if isinstance(r, Apply)]
    assert [a.slice for a in early] == order
    for a in early:
        assert a.grad_scale == 1.0
        assert a.steps == tuple(rig.param_steps[seg.param] + 1 for seg in rig.layout.slices[a.slice].segments)
    # Each slice's Stage comes before its early Apply.
    for a in early:
        assert during.index(next(r for r in during if isinstance(r, Stage) and r.slice == a.slice)) < during.index(a)
    assert pipeline.speculated
    pipeline.stage_rest(present)
    since = len(device.requests)
    rig.launch(present)
    assert [type(r) for r in device.requests[since:]] == [Commit]  # every slice was applied already
    assert pipeline.counters["speculated_steps"] == 1 and pipeline.counters["speculation_misses"] == 0
    pipeline.finish()
    rig.assert_matches_reference()

    # Steps 2 and 3: validation clips, the early applies are dropped and redone with the scale.
    for step in (2, 3):
        present, during = speculative_backward(step)
        assert len([r for r in during if isinstance(r, Apply)]) == len(rig.layout.slices)
        pipeline.stage_rest(present)
        since = len(device.requests)
        pipeline.drop_early()
        assert not pipeline.speculated
        dropped = device.requests[since:]
        assert isinstance(dropped[0], Abort) and isinstance(dropped[1], Prefetch)
        assert list(dropped[1].slices) == forward and len(dropped) == 2
        pipeline.missed()
        since = len(device.requests)
        rig.launch(present, scale=0.5)
        redo = device.requests[since:]
        assert [r.slice for r in redo[:-1]] == forward and all(r.grad_scale == 0.5 for r in redo[:-1])
        assert isinstance(redo[-1], Commit)
        pipeline.finish()
        rig.assert_matches_reference()
        assert pipeline.counters["speculated_steps"] == 1 and pipeline.counters["speculation_misses"] == step - 1

    # Two misses in a row: speculation pauses for ten launches (the missed step's own redo is the
    # first of them), so steps 4 to 12 apply only at launch and step 13 speculates again.
    for step in range(4, 14):
        present, during = speculative_backward(step)
        resumed = step == 13
        assert any(isinstance(r, Apply) for r in during) == resumed == pipeline.speculated, step
        assert isinstance(during[0], Prefetch)
        assert list(during[0].slices) == (forward[::-1] if resumed else forward)
        assert sorted(r.slice for r in during if isinstance(r, Stage)) == sorted(forward)  # still staged
        pipeline.stage_rest(present)
        since = len(device.requests)
        rig.launch(present)
        assert [r.slice for r in device.requests[since:-1]] == ([] if resumed else forward)
        pipeline.finish()
        rig.assert_matches_reference()
    assert pipeline.counters["speculated_steps"] == 2 and pipeline.counters["speculation_misses"] == 2
    assert rig.engine.manifest.step == 13


def test_drop_early_without_early_applies_submits_nothing(make_rig) -> None:
    rig = make_rig(Chain(), PipelineConfig(speculate=True))
    present = rig.backward(1)  # no hooks attached: nothing staged, nothing applied early
    rig.pipeline.drop_early()
    assert rig.device.requests == [] and not rig.pipeline.speculated
    # Staged by stage_rest instead of hooks, each slice is still applied early as it completes.
    rig.pipeline.stage_rest(present)
    early = rig.device.of(Apply)
    assert rig.pipeline.speculated and len(early) == len(rig.layout.slices)
    assert all(a.grad_scale == 1.0 for a in early)
    rig.launch(present)
    assert rig.device.of(Apply) == early  # launch used them
    rig.pipeline.finish()
    rig.assert_matches_reference()


# ---------------------------------------------------------------------------------------------
# Landing


def test_land_copies_each_slice_and_finish_lands_the_rest(make_rig) -> None:
    rig = make_rig(Chain(extra=True))
    pipeline = rig.pipeline
    extra, split = rig.index["extra"], rig.index["b.weight"]
    assert len(rig.slices_of(split)) > 1
    before = rig.snapshot()
    present = rig.backward(1)
    assert not any(pipeline.pending(p) for p in rig.params)
    pipeline.stage_rest(present)
    inflight = rig.launch(present)
    # The engine has posted every slice's new weights already; none reached the model.
    assert all(torch.equal(p, b) for p, b in zip(rig.snapshot(), before))
    assert all(pipeline.pending(rig.params[i]) for i in present) and not pipeline.pending(rig.params[extra])
    first, *rest = rig.slices_of(split)
    pipeline.land(first)
    assert first in inflight.landed
    staged = rig.layout.slices[first]
    (seg,) = [s for s in staged.segments if s.param == split]
    got = rig.params[split].detach().reshape(-1)
    want = rig.ref_params[split].detach().reshape(-1)
    lo, hi = seg.start, seg.start + seg.length
    torch.testing.assert_close(got[lo:hi], want[lo:hi], rtol=1e-5, atol=1e-6)
    old = before[split].reshape(-1)
    assert torch.equal(torch.cat([got[:lo], got[hi:]]), torch.cat([old[:lo], old[hi:]]))  # only that slice moved
    assert pipeline.pending(rig.params[split])  # its other slices have not landed yet
    for i in {seg.param for seg in staged.segments} - {split}:
        assert not pipeline.pending(rig.params[i])
        rig.assert_matches_reference(only=[i])
    done = pipeline.finish()
    assert done is inflight and inflight.landed == set(inflight.applies)
    assert not any(pipeline.pending(p) for p in rig.params)
    rig.assert_matches_reference()
    assert torch.equal(rig.params[extra], before[extra])
    assert pipeline.finish() is None  # nothing in flight


def test_land_in_fake_mode_copies_exactly_what_the_device_posted(make_rig) -> None:
    rig = make_rig(Chain(), engine=False)
    present = rig.backward(1)
    grads = [p.grad.detach().clone() for p in rig.params]
    rig.pipeline.stage_rest(present)
    rig.launch(present)
    rig.pipeline.finish()
    for p, g in zip(rig.params, grads):
        assert torch.equal(p.detach(), -g)
    assert rig.failures == []


def test_finish_waits_for_completions_the_device_holds(make_rig) -> None:
    rig = make_rig(Chain())
    present = rig.backward(1)
    rig.pipeline.stage_rest(present)
    rig.device.hold = True
    inflight = rig.launch(present)
    assert len(rig.device.held) == len(rig.layout.slices) + 1  # every apply and the commit
    assert not any(done.done() for done in inflight.applies.values())
    releaser = threading.Timer(0.05, rig.device.release)  # the engine's only caller meanwhile
    releaser.start()
    try:
        rig.pipeline.finish()
    finally:
        releaser.join()
    assert rig.device.held == [] and inflight.commit.done()
    rig.assert_matches_reference()
    assert rig.engine.manifest.step == 1


# ---------------------------------------------------------------------------------------------
# Failures: a dead device, a failed request


def test_a_device_dying_before_anything_landed_rolls_back_nothing(make_rig) -> None:
    rig = make_rig(Chain(), engine=False)
    before = rig.snapshot()
    present = rig.backward(1)
    rig.pipeline.stage_rest(present)
    rig.device.hold = True
    rig.launch(present)
    rig.device.die()
    with pytest.raises(DeviceDiedError):
        rig.pipeline.finish()
    assert rig.failures == [False]
    assert all(torch.equal(p, b) for p, b in zip(rig.snapshot(), before))
    assert rig.pipeline.inflight is None and rig.pipeline.phase is Phase.IDLE
    assert not any(rig.pipeline.pending(p) for p in rig.params)
    assert rig.pipeline.finish() is None and rig.failures == [False]  # reported once, not again
    # Later requests fail at once too.
    with pytest.raises(DeviceDiedError):
        rig.device.submit(Abort()).wait(1)


def test_a_device_dying_after_a_slice_landed_reports_that_weights_reached_the_model(make_rig) -> None:
    rig = make_rig(Chain(), engine=False)
    before = rig.snapshot()
    present = rig.backward(1)
    grads = [p.grad.detach().clone() for p in rig.params]
    rig.pipeline.stage_rest(present)
    rig.device.hold = True
    inflight = rig.launch(present)
    first = rig.pipeline.forward_order[0]
    rig.device.release(1)  # the first apply completes
    rig.pipeline.land(first)
    landed = {seg.param for seg in rig.layout.slices[first].segments}
    for i in landed:
        assert torch.equal(rig.params[i].detach(), -grads[i])
    rig.device.die()
    with pytest.raises(DeviceDiedError):
        rig.pipeline.finish()
    assert rig.failures == [True]
    assert inflight.landed == {first}
    for i, (p, b) in enumerate(zip(rig.snapshot(), before)):
        if i not in landed:
            assert torch.equal(p, b)
    assert rig.pipeline.inflight is None


def test_a_device_dying_during_speculative_backward_fails_the_step(make_rig) -> None:
    rig = make_rig(Chain(), PipelineConfig(speculate=True))
    rig.pipeline.attach_grad_hooks()
    before = rig.snapshot()
    early: list[Apply] = []

    def third_early_apply(r: Request) -> bool:
        if isinstance(r, Apply):
            early.append(r)
        return len(early) == 3

    rig.device.die_when = third_early_apply
    present = rig.backward(1)  # two slices applied early on the engine, then the device died
    assert rig.device.dead and len(rig.device.of(Apply)) == len(rig.layout.slices)
    rig.pipeline.stage_rest(present)
    rig.launch(present)
    with pytest.raises(DeviceDiedError):
        rig.pipeline.finish()
    assert rig.failures == [False]
    assert all(torch.equal(p, b) for p, b in zip(rig.snapshot(), before))
    assert rig.engine.manifest.step == 0  # nothing was committed


def test_a_failed_commit_keeps_every_weight_out_of_the_model(make_rig) -> None:
    rig = make_rig(Chain(), engine=False)
    before = rig.snapshot()
    rig.device.fail(lambda r: isinstance(r, Commit), DeviceError("the commit failed: disk full"))
    present = rig.backward(1)
    rig.pipeline.stage_rest(present)
    rig.launch(present)
    with pytest.raises(DeviceError, match="disk full"):
        rig.pipeline.finish()
    assert rig.failures == [False]
    assert all(torch.equal(p, b) for p, b in zip(rig.snapshot(), before))


def test_a_failed_apply_fails_the_step_once(make_rig) -> None:
    rig = make_rig(Chain(), engine=False)
    before = rig.snapshot()
    victim = rig.pipeline.forward_order[1]
    rig.device.fail(lambda r: isinstance(r, Apply) and r.slice == victim, DeviceError(f"apply slice {victim} failed"))
    present = rig.backward(1)
    rig.pipeline.stage_rest(present)
    rig.launch(present)
    with pytest.raises(DeviceError, match=f"slice {victim}"):
        rig.pipeline.finish()
    assert rig.failures == [False]
    assert all(torch.equal(p, b) for p, b in zip(rig.snapshot(), before))
    # The next step goes through.
    rig.sync_step(2)
    assert rig.failures == [False] and rig.pipeline.inflight is None


# ---------------------------------------------------------------------------------------------
# Abort


@pytest.mark.parametrize("speculate", [False, True], ids=["sync", "speculative"])
def test_abort_during_staging_drops_the_step_and_the_next_starts_clean(make_rig, speculate) -> None:
    rig = make_rig(Chain(), PipelineConfig(speculate=speculate))
    pipeline, device = rig.pipeline, rig.device
    if speculate:
        pipeline.attach_grad_hooks()
    pipeline.abort()  # nothing staged, nothing prefetched: nothing to tell the device
    assert device.requests == [] and pipeline.phase is Phase.IDLE
    present = rig.backward(1)
    pipeline.stage_rest(present)
    assert pipeline.phase is Phase.STAGING and all(pipeline.staged[i] for i in present)
    assert bool(device.of(Apply)) == speculate  # speculative: every slice was applied already
    since = len(device.requests)
    pipeline.abort()
    assert [type(r) for r in device.requests[since:]] == [Abort]
    assert pipeline.phase is Phase.IDLE and not any(pipeline.staged) and not pipeline.speculated
    assert rig.engine.step_state is StepState.IDLE and rig.engine.manifest.step == 0
    # The next step prefetches afresh and equals torch's first step on its own gradients.
    since = len(device.requests)
    present = rig.backward(2)
    pipeline.stage_rest(present)
    assert isinstance(device.requests[since], Prefetch)
    assert sorted(device.requests[since].slices) == list(range(len(rig.layout.slices)))
    rig.launch(present)
    pipeline.finish()
    rig.assert_matches_reference()
    assert rig.engine.manifest.step == 1


# ---------------------------------------------------------------------------------------------
# A weight written before its update landed


@pytest.mark.parametrize("via", ["land", "finish"])
def test_a_weight_written_before_landing_raises_stale_weight_error(make_rig, via) -> None:
    rig = make_rig(Chain())
    name = "c.weight"
    i = rig.index[name]
    present = rig.backward(1)
    rig.pipeline.stage_rest(present)
    rig.launch(present)
    with torch.no_grad():
        rig.params[i].add_(1)
    (k,) = rig.slices_of(i)
    with pytest.raises(StaleWeightError, match=repr(name)):
        rig.pipeline.land(k) if via == "land" else rig.pipeline.finish()
    if via == "land":
        assert rig.pipeline.finish() is not None  # the rest lands without complaint
    # The update has overwritten the write; the step itself did not fail.
    rig.assert_matches_reference()
    assert rig.failures == [] and rig.pipeline.inflight is None
    assert rig.engine.manifest.step == 1


def test_without_weight_tracking_a_write_before_landing_is_overwritten_silently(make_rig) -> None:
    rig = make_rig(Chain(), PipelineConfig(track_weights=False))
    i = rig.index["c.weight"]
    present = rig.backward(1)
    rig.pipeline.stage_rest(present)
    rig.launch(present)
    with torch.no_grad():
        rig.params[i].add_(1)
    rig.pipeline.finish()
    rig.assert_matches_reference()


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("arenas", [0, 3])
def test_pipeline_config_refuses_other_arena_counts(arenas) -> None:
    with pytest.raises(ValueError, match="arenas must be 1 or 2"):
        PipelineConfig(arenas=arenas)
    assert PipelineConfig(arenas=2).arenas == 2


def test_two_arenas_alternate_between_steps(make_rig) -> None:
    rig = make_rig(Chain(), PipelineConfig(arenas=2))
    assert len(rig.device.memories) == 2
    for step in (1, 2, 3):
        since = len(rig.device.requests)
        rig.sync_step(step)
        ids = {r.memory for r in rig.device.of(Apply, since)}
        assert ids == {rig.pipeline.arenas[(step - 1) % 2].id}
        rig.assert_matches_reference()
