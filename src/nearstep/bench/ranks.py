"""``nearstep bench step --nproc N``: one rank against N ranks on the same global batch.

For each nearstep variant (default ``sync`` and ``overlap``) and round, the same
model and global batches run first as one process (no process group: the
single-process optimizer) and then as N gloo ranks on this machine, each rank
with half (1/N) of every batch, its own store and its own device process. Per
rank it reports the store's size, the bytes over the host link (gradients to the
device, weights back) and over the collectives; for the run, steps/s (the
slowest rank's) against one rank.

On one machine the N ranks share its cores (and its disk): they are spread over
the cores, each with one torch thread, and so are their devices. Steps/s against
one rank is then a measure of what sharding costs and saves here, not of what
N machines would gain.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

import torch

from nearstep.bench import workload
from nearstep.bench.report import WorkerError, table_line

__all__ = ["run", "shard_batch"]

RANK_VARIANTS = ("sync", "overlap")
MiB = 2**20


def shard_batch(batch: Any, rank: int, world: int) -> Any:
    """Rank ``rank``'s part of a batch: every tensor cut along dim 0 into ``world`` parts."""
    if isinstance(batch, torch.Tensor):
        return batch.tensor_split(world, dim=0)[rank]
    if isinstance(batch, Mapping):
        return {k: shard_batch(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(v, rank, world) for v in batch)
    return batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------
# One rank


def _rank_entry() -> None:
    """``python -c ... SPEC_JSON RANK WORLD PORT RESULT_PATH``: one rank of one run."""

    spec = workload.WorkerSpec(**json.loads(sys.argv[1]))
    rank, world, port = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    result = _rank_worker(spec, rank, world, port)
    pathlib.Path(sys.argv[5]).write_text(json.dumps(result))


def _rank_worker(spec: Any, rank: int, world: int, port: int) -> dict[str, Any]:
    import torch.distributed as dist

    import nearstep

    device = nearstep.DeviceConfig(cores=(spec.device_core,), memory_budget=spec.memory_budget)
    os.sched_setaffinity(0, {spec.compute_core})
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    work = workload.build_workload(spec, spec.warmup)
    model = work.model
    model.train()
    extra = {"model": model} if spec.variant == "overlap" else {}
    opt = nearstep.AdamW(model.named_parameters(), lr=workload.LR, store=spec.store, mode=spec.variant, device=device,
                         slice_mb=spec.slice_mb, **extra)

    def one_step(batch: Any) -> float:
        loss = work.loss(model, shard_batch(batch, rank, world))
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    try:
        torch.manual_seed(workload.SEED)
        for batch in work.warm:
            one_step(batch)
        opt.synchronize()
        if world > 1:
            dist.barrier()  # every rank starts the timed steps together
        before = opt.stats()
        start = time.perf_counter()
        losses = [one_step(batch) for batch in work.timed]
        opt.synchronize()  # inside the timed region: nothing left in flight
        seconds = time.perf_counter() - start
        after = opt.stats()
        manifest = opt.device.manifest()
        per = spec.steps

        def delta(key: str) -> float:
            return (after.get(key, 0) - before.get(key, 0)) / per

        result = {
            "rank": rank, "world": world, "variant": spec.variant, "round": spec.round,
            "ms_per_step": seconds * 1e3 / per, "losses": losses,
            "params": sum(p.numel() for p in model.parameters()),
            "store_elements": sum(p.numel for p in manifest.params),
            "store_bytes_per_generation": manifest.state_bytes,
            "store_bytes_on_disk": 2 * manifest.state_bytes,
            "link_bytes_per_step": delta("device_link_in_bytes") + delta("device_link_out_bytes"),
            "store_io_bytes_per_step": delta("device_store_read_bytes") + delta("device_store_write_bytes"),
            "collective_bytes_sent_per_step": (after.get("collective_bytes_sent_per_step", 0) * after["host_steps"]
                                               - before.get("collective_bytes_sent_per_step", 0) * before["host_steps"]) / per,
            "collective_bytes_received_per_step": (after.get("collective_bytes_received_per_step", 0) * after["host_steps"]
                                                   - before.get("collective_bytes_received_per_step", 0) * before["host_steps"]) / per,
            "compute_core": spec.compute_core, "device_core": spec.device_core, "describe": work.describe,
        }
    finally:
        opt.close()
        if world > 1:
            dist.destroy_process_group()
    return result


# ---------------------------------------------------------------------------
# The parent


def _launch(spec: Any, world: int, work: pathlib.Path, timeout: float) -> list[dict[str, Any]]:
    """One run of ``world`` ranks (processes of their own); returns each rank's result."""
    env = dict(os.environ)
    package_root = str(pathlib.Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    available = sorted(os.sched_getaffinity(0))
    port = _free_port()
    procs, outs = [], []
    for r in range(world):
        # Ranks spread over the cores, each rank's device on the next one over.
        rspec = replace(spec, compute_core=available[r % len(available)],
                        device_core=available[(r + 1) % len(available)] if world > 1 else spec.device_core)
        out = work / f"rank-{spec.variant}-{spec.round}-{world}-{r}.json"
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", "from nearstep.bench.ranks import _rank_entry; _rank_entry()",
             json.dumps(asdict(rspec)), str(r), str(world), str(port), str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for r, proc in enumerate(procs):
            try:
                output, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                raise WorkerError(f"rank {r} of the {world}-rank {spec.variant} run ran past {timeout:.0f} s") from None
            logs.append(output.decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(spec.store, ignore_errors=True)
    results = []
    for r, (proc, out) in enumerate(zip(procs, outs)):
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(logs)[-4000:]
            raise WorkerError(f"rank {r} of the {world}-rank {spec.variant} run exited with code {proc.returncode}:\n{tail}")
        results.append(json.loads(out.read_text()))
        out.unlink()
    return results


def _summarize(runs: dict[tuple[str, int], list[list[dict[str, Any]]]]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for (variant, world), rounds in runs.items():
        # A step of N ranks ends when the slowest rank's ends.
        ms = statistics.median(max(r["ms_per_step"] for r in ranks) for ranks in rounds)
        last = rounds[-1]
        rows[f"{variant}/{world}"] = {
            "variant": variant, "ranks": world, "ms_per_step": ms, "steps_per_second": 1e3 / ms,
            "round_ms_per_step": [max(r["ms_per_step"] for r in ranks) for ranks in rounds],
            "per_rank": [{k: r[k] for k in ("rank", "ms_per_step", "store_elements", "store_bytes_per_generation",
                                              "store_bytes_on_disk", "link_bytes_per_step", "store_io_bytes_per_step",
                                              "collective_bytes_sent_per_step", "collective_bytes_received_per_step",
                                              "compute_core", "device_core")} for r in last],
            "losses": [r["losses"] for r in last],
        }
    for key, row in rows.items():
        one = rows.get(f"{row['variant']}/1")
        if one is not None:
            row["speedup_vs_one_rank"] = row["steps_per_second"] / one["steps_per_second"]
            row["store_fraction_vs_one_rank"] = (max(r["store_bytes_on_disk"] for r in row["per_rank"])
                                                 / one["per_rank"][0]["store_bytes_on_disk"])
    return rows


def _render(res: dict[str, Any]) -> str:
    o = res["options"]
    out = [f"nearstep bench step --nproc {o['nproc']} --model {o['model']}",
           f"machine: {res['machine']}, {res['date']}",
           f"workload: {res['describe']}; {res['params'] / 1e6:.1f} M params; the global batch is split over the ranks",
           f"{o['steps']} timed steps after {o['warmup']} warm-up, {o['rounds']} round(s), 1 rank then {o['nproc']} ranks, "
           f"fresh processes, gloo on 127.0.0.1",
           f"CAVEAT: all ranks and their devices share this machine's {res['cores']} cores and its disk; steps/s against "
           f"one rank shows what sharding costs here, not what {o['nproc']} machines would gain.",
           "",
           f"  {'variant':<9}{'ranks':>6}{'ms/step':>10}{'steps/s':>9}{'vs 1 rank':>11}  {'rank':>4}{'store MiB':>11}"
           f"{'link MiB/step':>15}{'coll. MiB/step':>16}   (per rank; store: two generations on disk)"]
    for row in res["rows"].values():
        for i, r in enumerate(row["per_rank"]):
            head = (f"  {row['variant']:<9}{row['ranks']:>6}{row['ms_per_step']:>10.1f}{row['steps_per_second']:>9.3f}"
                    f"{row.get('speedup_vs_one_rank', float('nan')):>10.3f}x") if i == 0 else " " * 46
            coll = r["collective_bytes_sent_per_step"] + r["collective_bytes_received_per_step"]
            out.append(f"{head}  {r['rank']:>4}{r['store_bytes_on_disk'] / MiB:>11.2f}{r['link_bytes_per_step'] / MiB:>15.2f}"
                       f"{coll / MiB:>16.2f}")
    out.append("")
    for row in res["rows"].values():
        if row["ranks"] > 1 and "store_fraction_vs_one_rank" in row:
            out.append(table_line(f"{row['variant']}: largest rank store", f"{row['store_fraction_vs_one_rank']:.3f}",
                                  f"of the 1-rank store (ideal 1/{row['ranks']} = {1 / row['ranks']:.3f})"))
    return "\n".join(out)


def run(opts: Any, nproc: int) -> int:
    """Run the rank comparison for ``opts`` (``nearstep bench step`` options); print the table, write the JSON."""
    import datetime

    import nearstep
    from nearstep.bench.report import machine, scratch

    variants = tuple(v for v in opts.variants if v in RANK_VARIANTS) or RANK_VARIANTS
    missing = workload.missing_packages(opts.model)
    if missing:
        print(f"nearstep bench step: --model {opts.model} needs {', '.join(missing)}, not installed here.\n"
              f"Install them with: {workload.INSTALL[opts.model]}", file=sys.stderr)
        return 2
    if opts.batch % nproc:
        print(f"nearstep bench step: --batch {opts.batch} does not split evenly over {nproc} ranks", file=sys.stderr)
        return 2
    compute_core, device_core = workload.cores()
    runs: dict[tuple[str, int], list[list[dict[str, Any]]]] = {}
    started = time.perf_counter()
    res: dict[str, Any] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "options": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in asdict(opts).items()},
                           "cores": len(os.sched_getaffinity(0)), "lr": workload.LR,
                           "source": {"version": nearstep.__version__, "sha1": workload.source_digest()}}
    res["options"]["nproc"] = nproc
    with scratch(opts.dir) as work:
        res["machine"] = machine(opts.dir)
        try:
            for r in range(opts.rounds):
                for variant in variants:
                    for world in (1, nproc):
                        spec = workload.WorkerSpec(model=opts.model, variant=variant, round=r + 1, batch=opts.batch,
                                               seq_len=opts.seq_len, width=opts.width, steps=opts.steps,
                                               warmup=opts.warmup, memory_budget=opts.memory_budget,
                                               slice_mb=opts.slice_mb, store=str((work / f"store-{variant}-{world}-{r}").resolve()),
                                               compute_core=compute_core, device_core=device_core, trace=None)
                        ranks = _launch(spec, world, work, workload.WORKER_TIMEOUT)
                        runs.setdefault((variant, world), []).append(ranks)
                        worst = max(x["ms_per_step"] for x in ranks)
                        print(f"nearstep bench step: round {r + 1}/{opts.rounds} {variant} x {world} rank(s): "
                              f"{worst:.1f} ms/step", file=sys.stderr, flush=True)
        except WorkerError as exc:
            print(f"nearstep bench step: {exc}", file=sys.stderr)
            return 1
    res["run_seconds"] = time.perf_counter() - started
    first = next(iter(runs.values()))[0][0]
    res["describe"], res["params"] = first["describe"], first["params"]
    res["rows"] = _summarize(runs)
    print(_render(res))
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0
