"""Many ranks: 2 gloo ranks on CPU end where one process on the whole batch ends.

Each launch starts ``dist_worker.py`` once per rank (a fresh interpreter, a gloo
group through a file in tmp_path) and runs several scenarios in it, so the cost
of starting torch twice is paid a few times, not once per test. Every launch has
a hard timeout: a hang fails the test, it never stalls CI.

Tolerance: the ranks average two half-batch gradients where one process takes
the mean over the whole batch, so the numbers differ in the last bits of fp32;
after 10 AdamW steps at lr 1e-2 the weights agree to ``atol=2e-5, rtol=1e-4``
(measured: at most 5e-6 apart).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import nearstep
import nearstep.cli
from nearstep.store import ParamSpec, Store
from nearstep.storeset import (
    ShardInfo,
    StoreProbe,
    check_store_set,
    local_pieces,
    plan_digest,
    plan_pieces,
    read_shard_file,
    store_path_for,
)
from nearstep.reshard import reshard

import dist_worker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
LAUNCH_TIMEOUT = 240  # seconds for one launch of both ranks, everything included
ATOL, RTOL = 2e-5, 1e-4
SRC = Path(__file__).resolve().parents[1] / "src"

EQUIVALENCE = [  # (name, kind, mode, clip, backend): each layout in both modes, clipping and early apply, both devices
    ("dp-sync", "dp", "sync", 1.0, "inline"),
    ("dp-overlap", "dp", "overlap", None, "emulated"),
    ("ddp-sync", "ddp", "sync", None, "inline"),
    ("ddp-overlap", "ddp", "overlap", 1.0, "inline"),
    ("fsdp2-sync", "fsdp2", "sync", 1.0, "inline"),
    ("fsdp2-overlap", "fsdp2", "overlap", None, "inline"),
]


def launch(tmp: Path, plan: list[dict], *, wait_for: tuple[int, ...] = tuple(range(WORLD)),
           timeout: float = LAUNCH_TIMEOUT) -> tuple[dict[tuple[str, int], dict], list[int | None]]:
    """Run ``plan`` on WORLD ranks; returns {(scenario, rank): result} and the exit codes.

    Ranks not in ``wait_for`` are killed once those are done (a rank that hangs on purpose).
    """
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "plan.json").write_text(json.dumps(plan))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "dist_worker.py"), str(r), str(WORLD),
                               str(tmp / "rendezvous"), str(tmp / "plan.json"), str(tmp)],
                              env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)  # a session each: a timeout kills the rank and its device
             for r in range(WORLD)]
    deadline = time.monotonic() + timeout
    outputs: dict[int, str] = {}
    try:
        for r in wait_for:
            try:
                out, _ = procs[r].communicate(timeout=max(deadline - time.monotonic(), 1))
                outputs[r] = out.decode(errors="replace")
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} did not finish within {timeout} s (a hang): the launch was killed")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    results = {}
    for f in tmp.glob("*.rank*.pt"):
        name, rank = f.name[: -len(".pt")].rsplit(".rank", 1)
        results[(name, int(rank))] = torch.load(f, weights_only=False)
    for key, res in results.items():
        assert "crash" not in res, f"{key} crashed:\n{res['crash']}\n" + "\n".join(outputs.values())[-3000:]
    return results, [p.returncode for p in procs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict]:
    tmp = tmp_path_factory.mktemp("ranks")
    plan = [dict(name=name, kind=kind, mode=mode, clip=clip, backend=backend, steps=10, store=str(tmp / name),
                 probe_state_dict=True) for name, kind, mode, clip, backend in EQUIVALENCE]
    plan += [
        dict(name="dp-delayed", kind="dp", mode="delayed", clip=1.0, steps=10, warmup=3, store=str(tmp / "dl")),
        dict(name="dp-resume", kind="dp", mode="sync", clip=1.0, steps=10, store=str(tmp / "r-dp" / "{rank}"), resume=True),
        dict(name="fsdp2-resume", kind="fsdp2", mode="overlap", clip=1.0, steps=10, store=str(tmp / "r-fsdp2"), resume=True),
        dict(name="other-world-size", kind="dp", mode="sync", clip=1.0, steps=2, store=str(tmp / "ws"), other_world_size=True),
        dict(name="steps-differ", kind="ddp", mode="sync", clip=1.0, steps=2, store=str(tmp / "sd"), steps_differ=True),
        dict(name="reshard-to-one", kind="dp", mode="overlap", clip=1.0, steps=10, store=str(tmp / "rs"), reshard_to_one=True),
    ]
    results, codes = launch(tmp, plan)
    assert codes == [0] * WORLD, codes
    return results


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[float | None, dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("single")
    refs: dict[object, dict[str, torch.Tensor]] = {
        clip: dist_worker.reference_weights(10, clip, tmp / f"clip-{clip}") for clip in (None, 1.0)}
    refs["delayed"] = dist_worker.reference_weights(10, 1.0, tmp / "delayed", mode="delayed", warmup=3)
    return refs


@pytest.mark.parametrize("name,kind,mode,clip,backend", EQUIVALENCE, ids=[e[0] for e in EQUIVALENCE])
def test_two_ranks_end_where_one_process_ends(runs, references, name, kind, mode, clip, backend) -> None:
    ref = references[clip]
    first = runs[(name, 0)]
    assert "error" not in first, first
    for rank in range(WORLD):
        res = runs[(name, rank)]
        assert res["info"]["step"] == 10 and res["info"]["stats"]["backend"] == backend
        for n, w in res["weights"].items():
            torch.testing.assert_close(w, ref[n], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name} rank {rank} {n}: {m}")
            assert torch.equal(w, first["weights"][n]), f"{name}: ranks 0 and {rank} disagree on {n}"


@pytest.mark.parametrize("name", [e[0] for e in EQUIVALENCE])
def test_each_rank_store_holds_about_half_the_state(runs, references, name) -> None:
    ref = references[1.0]
    total, total_bytes = int(ref["__state_elements__"]), int(ref["__state_bytes__"])
    infos = [runs[(name, r)]["info"] for r in range(WORLD)]
    assert sum(i["state_elements"] for i in infos) == total  # every element on exactly one rank
    for info in infos:
        assert 0.45 <= info["state_elements"] / total <= 0.55, info["state_elements"]
        # Bytes include each slice's page padding, so the bound is looser.
        assert 0.35 <= info["state_bytes"] / total_bytes <= 0.65, (info["state_bytes"], total_bytes)
        assert Path(info["store"]).name in ("rank0", "rank1")
        assert info["stats"]["world_size"] == WORLD


@pytest.mark.parametrize("name", ["dp-overlap", "ddp-overlap"])
def test_overlap_mode_sends_each_module_in_its_forward_pre_hook(runs, name) -> None:
    unpublished = runs[(name, 0)]["info"]["unpublished"]
    after_step, after_forward = unpublished[0::2], unpublished[1::2]
    assert all(n > 0 for n in after_step), after_step  # step() returns before the weights went out...
    assert all(n == 0 for n in after_forward), after_forward  # ...the forward's pre-hooks sent them all


def test_sync_mode_has_sent_every_weight_when_step_returns(runs) -> None:
    assert set(runs[("dp-sync", 0)]["info"]["unpublished"]) == {0}


def test_delayed_mode_sends_the_weights_at_the_next_step_and_matches_one_process(runs, references) -> None:
    res = runs[("dp-delayed", 0)]
    assert res["info"]["unpublished"][-1] > 0  # after the last step(), until synchronize()
    for n, w in res["weights"].items():
        torch.testing.assert_close(w, references["delayed"][n], atol=ATOL, rtol=RTOL)


def test_reading_the_model_on_one_rank_mid_overlap_is_refused_not_a_hang(runs) -> None:
    for name in ("dp-overlap", "ddp-overlap"):
        assert "call opt.synchronize() on every rank first" in runs[(name, 0)]["info"]["read_early"]
    for name in ("dp-sync", "fsdp2-overlap"):  # nothing to send (sync), or nothing nearstep sends (FSDP2)
        assert runs[(name, 0)]["info"]["read_early"] is None


def test_resume_with_the_same_world_size_continues_to_the_same_weights(runs) -> None:
    for rank in range(WORLD):
        resumed = runs[("dp-resume", rank)]
        assert resumed["info"]["step"] == 10 and resumed["info"]["stats"]["host_steps"] == 5
        for n, w in resumed["weights"].items():  # sync mode: bit for bit the uninterrupted run
            assert torch.equal(w, runs[("dp-sync", rank)]["weights"][n]), n
        assert resumed["info"]["store"].endswith(f"r-dp/{rank}")  # the {rank} template
        fsdp2 = runs[("fsdp2-resume", rank)]
        for n, w in fsdp2["weights"].items():  # overlap mode is exact: the same as the uninterrupted sync run
            assert torch.equal(w, runs[("fsdp2-sync", rank)]["weights"][n]), n


def test_a_store_set_of_another_world_size_is_refused(runs) -> None:
    res = runs[("other-world-size", 0)]
    assert res["error"] == "ShardMismatchError"
    assert "written by a run of 2 ranks, and this run has 1" in res["message"]
    assert "ws/rank0" in res["message"] and "nearstep reshard" in res["message"]


def test_stores_at_different_steps_are_refused_on_every_rank(runs) -> None:
    for rank in range(WORLD):
        res = runs[("steps-differ", rank)]
        assert res["error"] == "ShardMismatchError"
        assert "different committed steps" in res["message"]
        assert "sd/rank0 at step 5" in res["message"] and "sd/rank1 at step 3" in res["message"]


def test_a_store_set_resharded_to_one_rank_continues_to_the_same_weights(runs, references) -> None:
    res = runs[("reshard-to-one", 0)]
    assert res["resharded"].world_size == 1 and res["resharded"].step == 5
    assert res["info"]["step"] == 10 and res["info"]["stats"]["world_size"] == 1
    for n, w in res["weights"].items():
        torch.testing.assert_close(w, references[1.0][n], atol=ATOL, rtol=RTOL)


def _whole_state(store_set: Path) -> dict[str, object]:
    """Every rank store's committed state, reassembled by parameter name."""
    first = read_shard_file(store_set / "rank0")
    assert first is not None
    out: dict[str, object] = {}
    for r in range(first.world_size):
        with Store.open(store_set / f"rank{r}") as store:
            m = store.manifest
            out["step"] = m.step
            state = store.read_params(m.state_names)
            for j, pc in enumerate(local_pieces(first.params, first.layout, first.world_size, r)):
                for n in m.state_names:
                    out[f"{first.params[pc.param].name}/{n}/{pc.start}"] = state[n][j]
                out[f"{first.params[pc.param].name}/steps"] = m.param_steps[j]
    return out


def test_reshard_round_trip_keeps_every_number(runs, tmp_path) -> None:
    source = Path(runs[("dp-sync", 0)]["info"]["store"]).parent
    three = reshard(source, tmp_path / "three", 3)
    assert three.world_size == 3 and three.step == 10 and len(three.paths) == 3
    assert sum(three.elements) == sum(runs[("dp-sync", r)]["info"]["state_elements"] for r in range(WORLD))
    back = reshard(tmp_path / "three", tmp_path / "two", 2, slice_mb=dist_worker.SLICE_MB)
    before, after = _whole_state(source), _whole_state(tmp_path / "two")
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert (torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key]), key
    assert back.paths[1] == tmp_path / "two" / "rank1"


def test_reshard_turns_an_fsdp2_set_into_pieces_holding_the_trained_weights(runs, tmp_path) -> None:
    source = Path(runs[("fsdp2-sync", 0)]["info"]["store"]).parent
    result = reshard(source, tmp_path / "one", 1, layout="pieces")
    assert result.layout == "pieces" and result.step == 10
    info = read_shard_file(tmp_path / "one" / "rank0")
    assert info is not None and info.world_size == 1 and info.layout == "pieces"
    weights = runs[("fsdp2-sync", 0)]["weights"]
    with Store.open(tmp_path / "one" / "rank0") as store:
        masters = store.read_params()["master"]
        for j, pc in enumerate(local_pieces(info.params, "pieces", 1, 0)):
            name = info.params[pc.param].name
            assert torch.equal(masters[j], weights[name].reshape(-1)[pc.start : pc.start + pc.length]), name


def test_reshard_refuses_an_occupied_destination_and_a_single_process_store(runs, tmp_path) -> None:
    source = Path(runs[("dp-sync", 0)]["info"]["store"]).parent
    (tmp_path / "busy" / "rank0").mkdir(parents=True)
    (tmp_path / "busy" / "rank0" / "x").write_text("x")
    with pytest.raises(nearstep.StoreError, match="not empty"):
        reshard(source, tmp_path / "busy", 2)
    with nearstep.AdamW(dist_worker.make_net().parameters(), store=tmp_path / "single", device="inline"):
        pass
    assert nearstep.cli.main(["reshard", str(tmp_path / "single"), str(tmp_path / "d"), "--world-size", "2"]) == 2
    assert not (tmp_path / "d").exists()


def test_a_killed_rank_makes_the_other_fail_with_a_clear_error(tmp_path) -> None:
    plan = [dict(name="kill", kind="dp", mode="overlap", clip=1.0, backend="emulated", steps=10,
                 store=str(tmp_path / "k"), die_at=3, timeout=30)]
    results, codes = launch(tmp_path, plan, timeout=120)
    assert codes[1] == -signal.SIGKILL
    res = results[("kill", 0)]
    assert res["error"] == "CollectiveError", res
    assert res["message"].startswith("rank 0 of 2:") and "restart all ranks" in res["message"]
    assert res["seconds"] < 30  # gloo notices the closed connections; no waiting for the timeout
    for store in (tmp_path / "k").iterdir():  # both stores hold a whole committed step
        assert nearstep.inspect_store(store).step >= 2


def test_a_hung_rank_makes_the_other_fail_after_the_timeout(tmp_path) -> None:
    plan = [dict(name="hang", kind="dp", mode="sync", clip=None, backend="inline", steps=10,
                 store=str(tmp_path / "h"), hang_at=2, timeout=3)]
    results, _codes = launch(tmp_path, plan, wait_for=(0,), timeout=120)
    res = results[("hang", 0)]
    assert res["error"] == "CollectiveError", res
    assert "ShardingConfig(timeout=3)" in res["message"]
    assert res["seconds"] < 60


# ---------------------------------------------------------------------------
# The plan and the store-set check, without processes


def _specs(*numels: int) -> tuple[ParamSpec, ...]:
    return tuple(ParamSpec(f"p{i}", (n,), "float32", 0) for i, n in enumerate(numels))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_the_plan_covers_every_element_once_and_balances(world) -> None:
    specs = _specs(100_000, 7, 3, 40_000, 1, 12_345, 64)
    pieces = plan_pieces(specs, world)
    assert pieces == plan_pieces(specs, world)  # the same on every rank
    covered = [[0] * p.numel for p in specs]
    for segs in pieces:
        assert segs, "every rank owns something"
        for s in segs:
            for k in range(s.start, s.start + s.length):
                covered[s.param][k] += 1
    assert all(c == 1 for row in covered for c in row)
    loads = [sum(s.length for s in segs) for segs in pieces]
    mean = sum(loads) / world
    assert max(loads) <= mean * 1.2 + 1, loads


def test_the_plan_needs_an_element_per_rank() -> None:
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        plan_pieces(_specs(1, 2), 4)


def test_store_paths_per_rank() -> None:
    assert store_path_for("runs/x", 3, 4) == Path("runs/x/rank3")
    assert store_path_for("/ssd/{rank}-of-{world_size}", 1, 2) == Path("/ssd/1-of-2")
    with pytest.raises(ValueError, match="only {rank} and {world_size}"):
        store_path_for("/ssd/{node}", 0, 2)


def _probe(rank: int, step: int | None = 4, world: int = 2, layout: str = "pieces", plan: str = "P",
           shard_rank: int | None = None) -> StoreProbe:
    if step is None:
        return StoreProbe(rank, "h", f"/s/rank{rank}", False)
    shard = None if world == 0 else ShardInfo(layout, rank if shard_rank is None else shard_rank, world, plan)
    return StoreProbe(rank, "h", f"/s/rank{rank}", True, step, shard)


@pytest.mark.parametrize("probes,expect", [
    ([_probe(0, None), _probe(1, None)], None),
    ([_probe(0), _probe(1)], None),
    ([_probe(0), _probe(1, None)], "incomplete: rank 0: h:/s/rank0 (step 4) has a store, but rank 1: h:/s/rank1 has none"),
    ([_probe(0, world=3), _probe(1, world=3)], "written by a run of 3 ranks, and this run has 2"),
    ([_probe(0, world=0), _probe(1, world=0)], "written by a single process"),
    ([_probe(0, shard_rank=1), _probe(1, shard_rank=0)], "rank 0: h:/s/rank0 holds the store of rank 1"),
    ([_probe(0, layout="fsdp2"), _probe(1, layout="fsdp2")], "sharded for fsdp2 layout"),
    ([_probe(0, plan="Q"), _probe(1, plan="Q")], "a different parameter table"),
    ([_probe(0, step=5), _probe(1, step=4)], "different committed steps: rank 0: h:/s/rank0 at step 5, rank 1: h:/s/rank1 at step 4"),
], ids=["fresh", "whole", "incomplete", "world-size", "single-process", "swapped", "layout", "plan", "steps"])
def test_the_store_set_check_names_what_is_wrong(probes, expect) -> None:
    problem = check_store_set(probes, 2, "pieces", "P")
    if expect is None:
        assert problem is None
    else:
        assert problem is not None and expect in problem


def test_the_plan_digest_changes_with_what_decides_the_plan() -> None:
    specs = _specs(10, 20)
    assert plan_digest(specs, 2, "pieces") != plan_digest(specs, 3, "pieces")
    assert plan_digest(specs, 2, "pieces") != plan_digest(specs, 2, "fsdp2")
    assert plan_digest(specs, 2, "pieces") != plan_digest(_specs(10, 21), 2, "pieces")


def test_without_a_process_group_nothing_is_sharded(tmp_path) -> None:
    assert not dist.is_initialized()
    model = dist_worker.make_net()
    with nearstep.AdamW(model.parameters(), store=tmp_path / "s", device="inline") as opt:
        assert opt.sharding.alone and not (tmp_path / "s" / "shard.json").exists()
        assert "world_size" not in opt.stats()


def test_sharding_config_is_checked() -> None:
    with pytest.raises(ValueError, match="timeout"):
        nearstep.ShardingConfig(timeout=0)
    with pytest.raises(ValueError, match="gradients"):
        nearstep.ShardingConfig(gradients="sum")  # type: ignore[arg-type]
