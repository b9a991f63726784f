"""The engine driven directly by scripted request sequences (see [Note: a step on the device]).

Every test builds a small store, an engine in this process and a staging arena it
maps itself, then queues requests one by one through ``Engine.handle`` and checks
the new weights the engine posts (and the store commits) against
``torch.optim.AdamW`` run on the same random inputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nearstep import aio, rules
from nearstep.engine import Engine, EngineConfig
from nearstep.errors import StoreCorruptError
from nearstep.protocol import Abort, Apply, Commit, Lane, LoadState, Prefetch, Query, QueryKind, Stage, StepState
from nearstep.staging import StagingLayout
from nearstep.store import Store, param_specs

# 256 fp32 elements per slice: p1 is split over three slices, slice 0 holds three segments
# (p3, p2 and the head of p1) and slice 2 two (the tail of p1 and the head of p0).
SHAPES = ((300,), (20, 30), (50,), (7, 9))
SLICE_BYTES = 1024
LR, WD = 1e-2, 1e-2
HYPER = rules.AdamWHyper(lr=LR, weight_decay=WD)
HPARAMS = ({"lr": LR, "weight_decay": WD},)
MEM = 1
BUDGET = 64 << 20
STATE = ("master", "exp_avg", "exp_avg_sq")
SENTINEL = 123.0  # written into the weight staging before a request: where it survives, nothing was posted


def initial_values(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in SHAPES]


def random_grads(seed: int, skip: tuple[int, ...] = ()) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(1000 + seed)
    return [None if i in skip else torch.randn(shape, generator=g) for i, shape in enumerate(SHAPES)]


def create_store(path: Path, values: list[torch.Tensor], state_format: str = "fp32") -> Store:
    specs = param_specs([[(f"p{i}", v) for i, v in enumerate(values)]])
    return Store.create(path, params=specs, masters=lambda i: values[i], optimizer="adamw",
                        state_names=rules.state_names(rules.AdamWHyper), hyperparameters=HPARAMS,
                        slice_bytes=SLICE_BYTES, state_format=state_format)


class Rig:
    """An engine on a store, with a staging arena mapped as memory ``MEM``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = Engine(store, EngineConfig(memory_budget=BUDGET))
        self.layout = StagingLayout.from_manifest(store.manifest)
        self.buf = aio.AlignedBuffer(self.layout.nbytes)
        self.arena = self.buf.tensor(torch.uint8)
        self.engine.memory[MEM] = self.arena

    @property
    def slices(self) -> range:
        return range(len(self.layout.slices))

    def handle(self, request):
        return self.engine.handle(request)

    def write_grads(self, grads: list[torch.Tensor | None]) -> None:
        for staged in self.layout.slices:
            for seg in staged.segments:
                g = grads[seg.param]
                view = self.layout.grad_view(self.arena, seg, staged)
                if g is None:
                    view.fill_(float("nan"))  # never read: a segment without a step is left alone
                else:
                    view.copy_(g.reshape(-1)[seg.start : seg.start + seg.length])

    def fill_weights(self, value: float = SENTINEL) -> None:
        for staged in self.layout.slices:
            for seg in staged.segments:
                self.layout.weight_view(self.arena, seg, staged).fill_(value)

    def weight_views(self, k: int) -> list[torch.Tensor]:
        staged = self.layout.slices[k]
        return [self.layout.weight_view(self.arena, seg, staged) for seg in staged.segments]

    def posted(self) -> list[torch.Tensor]:
        """The new weights in staging, reassembled per parameter (flat)."""
        out = [torch.full((torch.Size(s).numel(),), float("nan")) for s in SHAPES]
        for staged in self.layout.slices:
            for seg in staged.segments:
                out[seg.param][seg.start : seg.start + seg.length] = self.layout.weight_view(self.arena, seg, staged)
        return out

    def apply_request(self, k: int, param_steps: tuple[int, ...], has: set[int], scale: float = 1.0) -> Apply:
        steps = tuple(param_steps[seg.param] + 1 if seg.param in has else 0 for seg in self.layout.slices[k].segments)
        return Apply(k, (HYPER,), steps, scale, rules.Guards(), MEM)

    def full_step(self, step: int, param_steps: tuple[int, ...], grads: list[torch.Tensor | None],
                  scale: float = 1.0):
        """Prefetch every slice, apply each, commit; returns (new param steps, the committed manifest)."""
        has = {i for i, g in enumerate(grads) if g is not None}
        self.write_grads(grads)
        self.fill_weights()
        order = tuple(self.slices)
        self.handle(Prefetch(order))
        for k in order:
            reports = self.handle(self.apply_request(k, param_steps, has, scale))
            assert len(reports) == len(self.layout.slices[k].segments)
        assert self.engine.step_state is StepState.OPEN
        new_steps = tuple(s + 1 if i in has else s for i, s in enumerate(param_steps))
        manifest = self.handle(Commit(step, new_steps, HPARAMS))
        assert self.engine.step_state is StepState.IDLE
        return new_steps, manifest

    def close(self) -> None:
        if self.buf is not None:
            self.engine.close()
            self.buf.close()
            self.buf = None


class Reference:
    """torch.optim.AdamW (the slow, for-loop implementation) on copies of the initial values."""

    def __init__(self, values: list[torch.Tensor]) -> None:
        self.params = [torch.nn.Parameter(v.clone()) for v in values]
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=WD, foreach=False, fused=False)

    def step(self, grads: list[torch.Tensor | None], scale: float = 1.0) -> list[torch.Tensor]:
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.clone().reshape(p.shape) * scale
        self.opt.step()
        return self.flat()

    def flat(self) -> list[torch.Tensor]:
        return [p.detach().reshape(-1).clone() for p in self.params]

    def moment(self, i: int, name: str) -> torch.Tensor:
        state = self.opt.state[self.params[i]]
        return state[name].reshape(-1) if name in state else torch.zeros(self.params[i].numel())


def assert_params_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float = 1e-5,
                        atol: float = 1e-6) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.reshape(-1), b.reshape(-1), rtol=rtol, atol=atol, msg=lambda m: f"p{i}: {m}")


def reopened_params(path: Path, names: tuple[str, ...] = ("master",)) -> tuple[int, dict[str, list[torch.Tensor]]]:
    with Store.open(path) as store:
        return store.manifest.step, store.read_params(names)


@pytest.fixture
def values() -> list[torch.Tensor]:
    return initial_values()


@pytest.fixture
def rig(tmp_path, values):
    r = Rig(create_store(tmp_path / "s", values))
    yield r
    r.close()


def test_the_layout_has_split_and_shared_slices(rig) -> None:
    # The other tests rely on this shape: a split parameter and slices with several segments.
    segs = [len(s.segments) for s in rig.layout.slices]
    assert len(segs) >= 3 and max(segs) >= 3
    assert sum(1 for s in rig.layout.slices for seg in s.segments if seg.param == 1) >= 3


def test_full_steps_equal_torch_adamw(tmp_path, values) -> None:
    path = tmp_path / "s"
    rig = Rig(create_store(path, values))
    ref = Reference(values)
    assert rig.engine.step_state is StepState.IDLE
    param_steps = (0,) * len(SHAPES)
    try:
        for step in (1, 2, 3):
            grads = random_grads(step)
            param_steps, manifest = rig.full_step(step, param_steps, grads)
            want = ref.step(grads)
            assert_params_close(rig.posted(), want)
            assert manifest.step == step and manifest.param_steps == (step,) * len(SHAPES)
            assert rig.handle(Query(QueryKind.MANIFEST)).step == step
            if step == 1:
                # The store's masters after one step, read back through the engine's store.
                assert_params_close(rig.store.read_params()["master"], want)
            # Generations alternate with every commit.
            assert all(c.generation == step % 2 for c in manifest.committed)
    finally:
        rig.close()
    step, state = reopened_params(path, STATE)
    assert step == 3
    assert_params_close(state["master"], ref.flat())
    for name in ("exp_avg", "exp_avg_sq"):
        assert_params_close(state[name], [ref.moment(i, name) for i in range(len(SHAPES))])


@pytest.mark.parametrize("reopen", [False, True], ids=["same-engine", "reopened"])
def test_an_abort_mid_step_leaves_no_trace(tmp_path, values, reopen) -> None:
    path = tmp_path / "s"
    rig = Rig(create_store(path, values))
    try:
        half = len(rig.layout.slices) // 2
        rig.write_grads(random_grads(1))
        rig.handle(Prefetch(tuple(rig.slices)))
        for k in range(half):
            rig.handle(rig.apply_request(k, (0,) * 4, {0, 1, 2, 3}))
        assert rig.engine.step_state is StepState.OPEN
        assert rig.handle(Abort()) is None
        assert rig.engine.step_state is StepState.IDLE
        manifest = rig.handle(Query(QueryKind.MANIFEST))
        assert manifest.step == 0 and all(c.generation == 0 for c in manifest.committed)
        stats = rig.handle(Query(QueryKind.STATS))
        assert stats["slices_applied"] == half and stats["steps_committed"] == 0
        if reopen:
            rig.close()
            step, state = reopened_params(path)
            assert step == 0
            assert all(torch.equal(a, b.reshape(-1)) for a, b in zip(state["master"], values))
            rig = Rig(Store.open(path))
        # A full step with other gradients equals torch's first step: nothing of the aborted one stayed.
        grads = random_grads(2)
        rig.full_step(1, (0,) * 4, grads)
        want = Reference(values).step(grads)
        assert_params_close(rig.posted(), want)
    finally:
        rig.close()
    step, state = reopened_params(path, STATE)
    assert step == 1
    assert_params_close(state["master"], want)
    # The moments are those of one step: (1 - beta1) * g and (1 - beta2) * g**2.
    assert_params_close(state["exp_avg"], [0.1 * g.reshape(-1) for g in grads])
    assert_params_close(state["exp_avg_sq"], [0.001 * g.reshape(-1) ** 2 for g in grads])


def bad_apply(rig: Rig, kind: str) -> tuple[Apply, str]:
    good = rig.apply_request(1, (0,) * 4, {0, 1, 2, 3})
    if kind == "no-such-slice":
        return Apply(99, good.hypers, good.steps, 1.0, good.guards, MEM), "ValueError: slice 99 does not exist"
    if kind == "wrong-steps":
        return Apply(1, good.hypers, good.steps + (1,), 1.0, good.guards, MEM), "ValueError: slice 1 has"
    return Apply(1, good.hypers, good.steps, 1.0, good.guards, 7), "ValueError: staging memory 7 is not mapped"


@pytest.mark.parametrize("end", ["commit", "abort"])
@pytest.mark.parametrize("kind", ["no-such-slice", "wrong-steps", "unmapped-memory"])
def test_after_a_failed_request_the_step_is_refused_until_it_ends(rig, values, kind, end) -> None:
    everything = {0, 1, 2, 3}
    rig.write_grads(random_grads(1))
    rig.handle(Prefetch(tuple(rig.slices)))
    rig.handle(rig.apply_request(0, (0,) * 4, everything))  # one slice of the step went through
    bad, first_failure = bad_apply(rig, kind)
    with pytest.raises(ValueError):
        rig.handle(bad)
    assert rig.engine.step_state is StepState.FAILED
    # A query neither fails nor changes the state.
    assert rig.handle(Query(QueryKind.STATS))["steps_committed"] == 0
    assert rig.engine.step_state is StepState.FAILED
    # A valid apply of the same step is refused, naming the first failure.
    rig.fill_weights()
    with pytest.raises(RuntimeError, match=f"{first_failure}.*step is dropped") as refused:
        rig.handle(rig.apply_request(2, (0,) * 4, everything))
    assert "store stays at step 0" in str(refused.value)
    assert all(torch.all(w == SENTINEL) for w in rig.weight_views(2))  # nothing was posted
    assert rig.engine.step_state is StepState.FAILED
    if end == "commit":
        with pytest.raises(RuntimeError, match=f"{first_failure}.*step is dropped"):
            rig.handle(Commit(1, (1,) * 4, HPARAMS))
    else:
        rig.handle(Abort())
    assert rig.engine.step_state is StepState.IDLE
    assert rig.handle(Query(QueryKind.MANIFEST)).step == 0
    # The next step starts afresh and equals torch's first step.
    grads = random_grads(2)
    _steps, manifest = rig.full_step(1, (0,) * 4, grads)
    assert manifest.step == 1
    assert_params_close(rig.posted(), Reference(values).step(grads))
    assert_params_close(rig.store.read_params()["master"], Reference(values).step(grads))


def test_a_slice_applied_twice_in_one_step_is_refused(rig, values) -> None:
    rig.write_grads(random_grads(1))
    rig.handle(rig.apply_request(0, (0,) * 4, {0, 1, 2, 3}))
    with pytest.raises(RuntimeError, match="slice 0 was already applied in this step"):
        rig.handle(rig.apply_request(0, (0,) * 4, {0, 1, 2, 3}))
    assert rig.engine.step_state is StepState.FAILED
    rig.handle(Abort())
    assert rig.engine.step_state is StepState.IDLE
    assert rig.handle(Query(QueryKind.MANIFEST)).step == 0
    # After the abort the slice may be applied again (a new step).
    grads = random_grads(3)
    rig.full_step(1, (0,) * 4, grads)
    assert_params_close(rig.posted(), Reference(values).step(grads))


@pytest.mark.parametrize("scale", [0.25, 0.7071])
def test_grad_scale_equals_torch_on_scaled_gradients(rig, values, scale) -> None:
    # Adam's update hardly depends on a gradient scale common to every step: the first step is
    # unscaled, so that the scaled ones that follow weigh differently in the moments.
    ref = Reference(values)
    param_steps = (0,) * 4
    for step, s in ((1, 1.0), (2, scale), (3, scale)):
        grads = random_grads(10 + step)
        param_steps, _m = rig.full_step(step, param_steps, grads, scale=s)
        assert_params_close(rig.posted(), ref.step(grads, scale=s))


def test_a_segment_with_steps_zero_is_left_unchanged(rig, values) -> None:
    ref = Reference(values)
    # Step 1: p2 (a segment of slice 0, which holds two others) has no gradient.
    grads = random_grads(1, skip=(2,))
    param_steps, manifest = rig.full_step(1, (0,) * 4, grads)
    assert param_steps == (1, 1, 0, 1) and manifest.param_steps == (1, 1, 0, 1)
    want = ref.step(grads)
    posted = rig.posted()
    assert torch.all(posted[2] == SENTINEL)  # no weights posted for it
    assert_params_close([posted[i] for i in (0, 1, 3)], [want[i] for i in (0, 1, 3)])
    state = rig.store.read_params(STATE)
    assert torch.equal(state["master"][2], values[2].reshape(-1))
    assert not state["exp_avg"][2].any() and not state["exp_avg_sq"][2].any()
    # Step 2: p2 takes its first step (bias correction of step 1), the others their second.
    grads = random_grads(2)
    param_steps, manifest = rig.full_step(2, param_steps, grads)
    assert param_steps == (2, 2, 1, 2)
    assert_params_close(rig.posted(), ref.step(grads))
    # A slice applied with no step at all changes nothing and opens no step.
    rig.fill_weights()
    reports = rig.handle(Apply(0, (HYPER,), (0,) * len(rig.layout.slices[0].segments), 1.0, rules.Guards(), MEM))
    assert len(reports) == len(rig.layout.slices[0].segments)
    assert all(r.spike_clipped == 0 and math.isnan(r.update_rms) and not r.update_clipped for r in reports)
    assert all(torch.all(w == SENTINEL) for w in rig.weight_views(0))
    assert rig.engine.step_state is StepState.IDLE


def test_stats_count_applies_stages_and_commits(rig) -> None:
    n = len(rig.layout.slices)
    stats = rig.handle(Query(QueryKind.STATS))
    assert stats["slices_applied"] == 0 and stats["steps_committed"] == 0 and stats["step"] == 0
    rig.handle(Query(QueryKind.TRACE))  # drain
    for k in rig.slices:
        rig.handle(Stage(k))
    rig.full_step(1, (0,) * 4, random_grads(1))
    stats = rig.handle(Query(QueryKind.STATS))
    assert stats["slices_applied"] == n and stats["slices_staged"] == n
    assert stats["steps_committed"] == 1 and stats["step"] == 1
    assert stats["link_in_bytes"] == stats["link_out_bytes"] == 4 * sum(torch.Size(s).numel() for s in SHAPES)
    events = rig.handle(Query(QueryKind.TRACE))
    assert sum(1 for e in events if e.lane is Lane.DEVICE_COMPUTE) == n
    # An aborted half step counts its applies, not a commit.
    rig.write_grads(random_grads(2))
    rig.handle(rig.apply_request(0, (1,) * 4, {0, 1, 2, 3}))
    rig.handle(Abort())
    stats = rig.handle(Query(QueryKind.STATS))
    assert stats["slices_applied"] == n + 1 and stats["steps_committed"] == 1 and stats["step"] == 1
    # A refused commit counts nothing either.
    with pytest.raises(ValueError):
        rig.handle(Stage(99))
    with pytest.raises(RuntimeError, match="step is dropped"):
        rig.handle(Commit(2, (2,) * 4, HPARAMS))
    assert rig.handle(Query(QueryKind.STATS))["steps_committed"] == 1


def test_query_rejects_an_unknown_kind_on_construction() -> None:
    with pytest.raises(ValueError):
        Query("no-such-kind")
    assert Query("stats").kind is QueryKind.STATS


@pytest.mark.parametrize("state_format", ["fp32", "bf16-sr+8bit"])
def test_a_corrupted_slice_file_is_refused_and_nothing_is_written(tmp_path, values, state_format) -> None:
    path = tmp_path / "s"
    rig = Rig(create_store(path, values, state_format))
    try:
        k = 2
        manifest = rig.handle(Query(QueryKind.MANIFEST))
        committed = rig.store.slice_path(k, manifest.committed[k].generation)
        other = rig.store.slice_path(k, manifest.committed[k].generation ^ 1)
        other_before = other.read_bytes()
        with open(committed, "r+b") as f:
            byte = f.read(1)[0]
            f.seek(0)
            f.write(bytes([byte ^ 0x40]))
        rig.write_grads(random_grads(1))
        rig.fill_weights()
        rig.handle(Prefetch(tuple(rig.slices)))
        for j in range(k):
            rig.handle(rig.apply_request(j, (0,) * 4, {0, 1, 2, 3}))
        with pytest.raises(StoreCorruptError, match=f"slice {k} .*Nothing was updated"):
            rig.handle(rig.apply_request(k, (0,) * 4, {0, 1, 2, 3}))
        assert rig.engine.step_state is StepState.FAILED
        assert all(torch.all(w == SENTINEL) for w in rig.weight_views(k))  # no weights posted
        assert rig.handle(Query(QueryKind.STATS))["slices_applied"] == k
        with pytest.raises(RuntimeError, match="StoreCorruptError"):
            rig.handle(Commit(1, (1,) * 4, HPARAMS))
        assert rig.engine.step_state is StepState.IDLE
        assert rig.handle(Query(QueryKind.MANIFEST)).committed == manifest.committed
        assert other.read_bytes() == other_before  # the slice's other generation was not written
    finally:
        rig.close()
    with Store.open(path) as store:
        assert store.manifest.step == 0 and store.manifest.committed == manifest.committed


def test_a_compressed_format_step_and_its_image_round_trip(tmp_path, values) -> None:
    path = tmp_path / "s"
    rig = Rig(create_store(path, values, "bf16-sr+8bit"))
    try:
        start = rig.store.read_params()["master"]  # bf16: the initial values rounded
        assert any(not torch.equal(a, b.reshape(-1)) for a, b in zip(start, values))
        grads = random_grads(1)
        _steps, manifest = rig.full_step(1, (0,) * 4, grads)
        assert manifest.step == 1 and manifest.state_format == "bf16-sr+8bit"
        ref = Reference(start)
        want = ref.step(grads)
        posted = rig.posted()
        assert_params_close(posted, want, rtol=1e-2, atol=1e-6)  # bf16: 8 significant bits
        assert all(torch.equal(p.bfloat16().float(), p) for p in posted)  # posted weights are bf16 values
        state = rig.store.read_params(STATE)
        # The posted weights are exactly the master a resumed run reads back.
        assert all(torch.equal(a, b) for a, b in zip(state["master"], posted))
        for name in ("exp_avg", "exp_avg_sq"):
            for i in range(len(SHAPES)):
                want_m = ref.moment(i, name)
                # 8-bit block-wise dynamic map: a few per cent of each value, tiny ones rounded up.
                bound = 0.07 * want_m.abs() + 1e-3 * want_m.abs().max()
                assert torch.all((state[name][i] - want_m).abs() <= bound), (name, i)
        # The image's codec: encode rounds the values in place to exactly what decode gives back.
        m = rig.store.manifest
        for k in rig.slices:
            image = m.image(k)
            numel = m.slices[k].numel
            g = torch.Generator().manual_seed(50 + k)
            values_k = {"master": torch.randn(numel, generator=g), "exp_avg": 0.1 * torch.randn(numel, generator=g),
                        "exp_avg_sq": 0.01 * torch.rand(numel, generator=g)}
            original = {name: t.clone() for name, t in values_k.items()}
            with aio.AlignedBuffer(image.file_bytes) as buf:
                image.encode(values_k, buf, seed=1234 + k)
                decoded = image.decode(buf)
            for name in STATE:
                assert torch.equal(decoded[name], values_k[name]), (k, name)
                # bf16 master: 8 significant bits; 8-bit moments: a few per cent (see above).
                rtol, atol = (1e-2, 1e-6) if name == "master" else (0.07, 1e-3 * original[name].abs().max().item())
                torch.testing.assert_close(values_k[name], original[name], rtol=rtol, atol=atol)
            assert not torch.equal(values_k["master"], original["master"])  # lossy: it did round
            # A bf16 master encodes exactly: rounding what is already rounded changes nothing.
            again = {name: t.clone() for name, t in values_k.items()}
            with aio.AlignedBuffer(image.file_bytes) as buf:
                image.encode(again, buf, seed=99)
            assert torch.equal(again["master"], values_k["master"])
    finally:
        rig.close()


def slice_arrays(rig: Rig, k: int, seed: int) -> dict[str, np.ndarray]:
    numel = rig.store.manifest.slices[k].numel
    g = torch.Generator().manual_seed(seed)
    return {"master": torch.randn(numel, generator=g).numpy(), "exp_avg": torch.randn(numel, generator=g).numpy(),
            "exp_avg_sq": torch.rand(numel, generator=g).numpy()}


def test_load_state_then_commit_replaces_every_slice(tmp_path, values) -> None:
    path = tmp_path / "s"
    rig = Rig(create_store(path, values))
    try:
        arrays = {k: slice_arrays(rig, k, 70 + k) for k in rig.slices}
        for k in rig.slices:
            assert rig.handle(LoadState(k, arrays[k])) is None
        assert rig.engine.step_state is StepState.OPEN
        manifest = rig.handle(Commit(5, (5,) * 4, HPARAMS))
        assert manifest.step == 5 and rig.engine.step_state is StepState.IDLE
    finally:
        rig.close()
    with Store.open(path) as store:
        for k in range(len(store.manifest.slices)):
            state = store.read_slice(k)
            for name in STATE:
                assert torch.equal(state[name], torch.from_numpy(arrays[k][name])), (k, name)


@pytest.mark.parametrize("first", ["apply", "load-state"])
def test_a_load_state_after_a_failure_is_refused_too(rig, values, first) -> None:
    rig.write_grads(random_grads(1))
    if first == "apply":
        rig.handle(rig.apply_request(0, (0,) * 4, {0, 1, 2, 3}))
        with pytest.raises(ValueError):
            rig.handle(Apply(99, (HYPER,), (1,), 1.0, rules.Guards(), MEM))
    else:
        rig.handle(LoadState(0, slice_arrays(rig, 0, 1)))
        with pytest.raises(ValueError):
            rig.handle(LoadState(1, {"master": slice_arrays(rig, 1, 2)["master"]}))  # the moments are missing
    assert rig.engine.step_state is StepState.FAILED
    try:
        with pytest.raises(RuntimeError, match="step is dropped"):
            rig.handle(LoadState(2, slice_arrays(rig, 2, 3)))
        assert rig.engine.step_state is StepState.FAILED
        with pytest.raises(RuntimeError, match="step is dropped"):
            rig.handle(Commit(1, (1,) * 4, HPARAMS))
    finally:
        # Whatever happened, a step is committed whole or not at all: the store stays at step 0.
        assert rig.handle(Query(QueryKind.MANIFEST)).step == 0
