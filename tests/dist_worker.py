"""One rank of the multi-rank tests: ``python dist_worker.py RANK WORLD INIT_FILE PLAN_JSON OUT_DIR``.

Joins a gloo process group through ``INIT_FILE``, runs the scenarios of the plan in
order, and leaves one ``<scenario>.rank<R>.pt`` per scenario in ``OUT_DIR``: the
final weights (full tensors), what the rank's store holds, or the error raised.
Every rank gets its half of each global batch, so a run of N ranks should end
where a single process on the whole batch ends (``reference_weights``).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import nearstep

GLOBAL_BATCH = 16
LR = 1e-2
SLICE_MB = 0.02  # several slices per store even for this small model


class Net(nn.Module):
    """An embedding (split across units), linears and a norm: about 25k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 64)
        self.proj = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.head = nn.Linear(128, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).mean(dim=1)
        return self.head(self.norm(torch.relu(self.proj(h))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def global_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (GLOBAL_BATCH, 6), generator=g), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g))
            for _ in range(n)]


def shard_of(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    per = GLOBAL_BATCH // world
    return batch[0][rank * per : (rank + 1) * per], batch[1][rank * per : (rank + 1) * per]


def reference_weights(steps: int, clip: float | None, store: Path, mode: str = "sync",
                      warmup: int = 10) -> dict[str, torch.Tensor]:
    """A single process on the whole batch (nearstep, inline device; sync mode unless asked)."""
    model = make_net()
    with nearstep.AdamW(model.named_parameters(), lr=LR, store=store, device="inline", slice_mb=SLICE_MB,
                        max_grad_norm=clip, mode=mode, warmup_steps=warmup) as opt:
        for x, y in global_batches(steps):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        opt.synchronize()
        state_elements = sum(p.numel for p in opt.store.manifest.params)
        state_bytes = opt.store.manifest.state_bytes
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["__state_elements__"] = torch.tensor(state_elements)
    out["__state_bytes__"] = torch.tensor(state_bytes)
    return out


# ---------------------------------------------------------------------------
# Scenarios


def _wrap(kind: str, model: Net) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for m in (model.embed, model.proj, model.head):
            fully_shard(m)
        fully_shard(model)
    return model


def _full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return out


def train(sc: dict, rank: int, world: int, *, start: int = 0, steps: int | None = None, group=None):
    model = _wrap(sc["kind"], make_net())
    sharding = nearstep.ShardingConfig(timeout=sc["timeout"]) if sc.get("timeout") else None
    opt = nearstep.AdamW(model.named_parameters(), lr=LR, store=sc["store"], device=sc.get("backend", "inline"),
                         slice_mb=SLICE_MB, mode=sc["mode"], model=model, max_grad_norm=sc.get("clip"),
                         process_group=group, sharding=sharding, warmup_steps=sc.get("warmup", 10))
    steps = sc["steps"] if steps is None else steps
    unpublished = []  # pieces layout: parameters not yet sent to every rank, after step() and after forward
    with opt:
        for i, batch in enumerate(global_batches(start + steps)[start:]):
            if rank == sc.get("victim", 1) and start + i == sc.get("die_at"):
                os.kill(os.getpid(), signal.SIGKILL)  # a rank dies mid-run, without a word
            if rank == sc.get("victim", 1) and start + i == sc.get("hang_at"):
                time.sleep(600)  # a rank stops answering (the test kills it)
            x, y = shard_of(batch, rank, world)
            out = model(x)
            if i:
                unpublished.append(len(getattr(opt.sharding, "pending", ())))
            nn.functional.cross_entropy(out, y).backward()
            opt.step()
            unpublished.append(len(getattr(opt.sharding, "pending", ())))
            opt.zero_grad()
        read_early = None
        if sc.get("probe_state_dict") and rank == 0:
            try:  # one rank alone, between step() and the next forward: refused, never a hang
                model.state_dict()
            except nearstep.NearstepError as exc:
                read_early = str(exc)
        opt.synchronize()
        if rank == 0:
            model.state_dict()  # one rank alone, after synchronize(): fine
        stats = opt.stats()
        manifest = opt.store.manifest
        info = {"step": stats["step"], "state_elements": sum(p.numel for p in manifest.params),
                "state_bytes": manifest.state_bytes, "store": str(opt.store_path), "stats": stats,
                "unpublished": unpublished, "read_early": read_early}
    return _full_weights(model), info


def run_scenario(sc: dict, rank: int, world: int) -> dict:
    if sc.get("resume"):
        train(sc, rank, world, steps=sc["steps"] // 2)
        weights, info = train(sc, rank, world, start=sc["steps"] // 2, steps=sc["steps"] - sc["steps"] // 2)
        return {"weights": weights, "info": info}
    if sc.get("other_world_size"):
        train(sc, rank, world)
        solo = dist.new_group([0])  # every rank makes it; only rank 0 is in it
        if rank != 0:
            return {"skipped": True}
        try:
            train(sc, rank, world, group=solo)
        except nearstep.NearstepError as exc:
            return {"error": type(exc).__name__, "message": str(exc)}
        return {"error": None}
    if sc.get("reshard_to_one"):
        half = sc["steps"] // 2
        train(sc, rank, world, steps=half)
        dist.barrier()  # both stores are closed: the set can be re-sharded
        solo = dist.new_group([0])
        if rank != 0:
            return {"skipped": True}
        from nearstep.reshard import reshard

        result = reshard(sc["store"], sc["store"] + "-1", 1)
        weights, info = train({**sc, "store": sc["store"] + "-1"}, 0, 1, start=half, steps=sc["steps"] - half, group=solo)
        return {"weights": weights, "info": info, "resharded": result}
    if sc.get("steps_differ"):
        train(sc, rank, world, steps=3)
        mine = Path(sc["store"]) / f"rank{rank}"
        if rank == 1:
            shutil.copytree(mine, mine.with_name("rank1-at-3"))
        train(sc, rank, world, start=3, steps=2)
        if rank == 1:  # rank 1's store goes back to step 3, rank 0's stays at step 5
            shutil.rmtree(mine)
            mine.with_name("rank1-at-3").rename(mine)
        dist.barrier()
        try:
            train(sc, rank, world, start=5, steps=1)
        except nearstep.NearstepError as exc:
            return {"error": type(exc).__name__, "message": str(exc)}
        return {"error": None}
    started = time.monotonic()
    try:
        weights, info = train(sc, rank, world)
    except nearstep.NearstepError as exc:
        return {"error": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - started}
    return {"weights": weights, "info": info, "seconds": time.monotonic() - started}


def main() -> int:
    rank, world, init_file, plan_json, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    for sc in json.loads(Path(plan_json).read_text()):
        try:
            result = run_scenario(sc, rank, world)
        except BaseException:
            result = {"crash": traceback.format_exc()}
        torch.save(result, out_dir / f"{sc['name']}.rank{rank}.pt")
        if "crash" in result or "error" in result and result.get("error") == "CollectiveError":
            return 0  # the group is unusable now
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
