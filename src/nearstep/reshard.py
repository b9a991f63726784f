"""Re-sharding: a store set's state cut for another number of ranks (``nearstep reshard``).

A tool over finished runs, not part of training: it reads every rank's store of
a set (:mod:`nearstep.storeset`), reassembles the whole model's state, and
writes a new set through the inline device (:mod:`nearstep.device`), so the new
stores are written, checksummed and committed exactly as a run writes them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import DeviceConfig, InlineDevice
from .errors import NearstepError, ShardMismatchError, StoreError
from .protocol import Commit, LoadState
from .store import MANIFEST, Store, auto_slice_mb
from .storeset import (LAYOUTS, SHARD_FILE, LocalPiece, ShardInfo, check_store_set, local_pieces, plan_digest,
                       probe_store, read_shard_file, store_path_for, write_shard_file)

__all__ = ["ReshardResult", "reshard", "main"]


@dataclass(frozen=True, slots=True)
class ReshardResult:
    """What :func:`reshard` wrote.

    Attributes:
        step: the committed step of the source set, now of the new one.
        optimizer: the optimizer kind.
        world_size, layout: of the new store set.
        paths: the new stores, by rank.
        elements: per new rank, how many elements of the state it holds.
    """

    step: int
    optimizer: str
    world_size: int
    layout: str
    paths: tuple[Path, ...]
    elements: tuple[int, ...]


def _source_paths(src: str | os.PathLike, src_world_size: int | None) -> tuple[list[Path], ShardInfo]:
    text = os.fspath(src)
    if "{world_size}" in text and src_world_size is None:
        raise ValueError(f"{text} names {{world_size}}: give the source's world size (--src-world-size)")
    first = store_path_for(src, 0, src_world_size or 1)
    info = read_shard_file(first) if (first / MANIFEST).exists() else None
    if info is None:
        raise StoreError(f"{first} holds no rank store (no {MANIFEST} and {SHARD_FILE}): SRC must be the store= of a "
                         f"sharded run (a directory of rank<N> stores, or a template with {{rank}}).")
    if not info.params:
        raise StoreError(f"{first / SHARD_FILE} does not record the model's parameter table; it cannot be re-sharded.")
    return [store_path_for(src, r, info.world_size) for r in range(info.world_size)], info


def reshard(src: str | os.PathLike, dst: str | os.PathLike, world_size: int, *, layout: str | None = None,
            src_world_size: int | None = None, slice_mb: float | None = None) -> ReshardResult:
    """Write a new store set for ``world_size`` ranks holding the same state as the set at ``src``.

    The source set must be whole and at one step (the check a run makes when it opens
    it); each of its stores is opened with its lock, so a set in use is refused. The
    new stores are made at ``dst`` (a template with ``{rank}``, or a directory that
    gets ``rank<N>`` subdirectories), which must not hold stores yet; if anything
    fails, what was written there is removed. Master weights, moments, per-parameter
    step counts, hyperparameters and the guard counters carry over; a run with
    ``world_size`` ranks continues from them as the old one would have.

    Args:
        src: the source set's ``store=``.
        dst: the new set's ``store=``.
        world_size: ranks of the new set.
        layout: ``pieces`` (DP/DDP) or ``fsdp2``; default the source's.
        src_world_size: needed only when ``src`` names ``{world_size}``.
        slice_mb: slice size of the new stores (default: automatic, as the optimizer picks).

    Example::

        nearstep.reshard.reshard("runs/exp1/state", "runs/exp1/state-4", 4)
    """
    paths, info = _source_paths(src, src_world_size)
    layout = layout or info.layout
    if layout not in LAYOUTS or world_size < 1:
        raise ValueError(f"layout must be one of {LAYOUTS} and world_size >= 1; got {layout!r}, {world_size}")
    specs = info.params
    probes = [probe_store(p, r) for r, p in enumerate(paths)]
    problem = check_store_set(probes, info.world_size, info.layout, info.plan)
    if problem is not None:
        raise ShardMismatchError(f"the source store set cannot be re-sharded: {problem}")
    targets = [store_path_for(dst, r, world_size) for r in range(world_size)]
    taken = [t for t in targets if t.exists() and any(t.iterdir())]
    if taken:
        raise StoreError(f"{', '.join(map(str, taken))} already exist and are not empty; re-shard into new directories.")

    # Read every source store (under its lock) into whole-model flat tensors.
    full: dict[str, list[torch.Tensor]] = {}
    covered = [torch.zeros(p.numel, dtype=torch.int32) for p in specs]
    steps = [0] * len(specs)
    counters: dict[str, int] = {}
    manifest0 = None
    for r, path in enumerate(paths):
        with Store.open(path) as store:
            m = store.manifest
            manifest0 = manifest0 or m
            table = local_pieces(specs, info.layout, info.world_size, r)
            if [pc.spec.name for pc in table] != [p.name for p in m.params]:
                raise StoreError(f"{path} does not hold what {SHARD_FILE} says rank {r} owns; it cannot be re-sharded.")
            if m.dormant:
                # Their pieces have no state to carry, and the new cut may put a frozen piece
                # and a trained one of the same parameter on one rank.
                raise StoreError(f"{path} holds {len(m.dormant)} frozen parameters without state (first "
                                 f"{m.params[m.dormant[0]].name!r}); re-sharding such stores is not supported yet. "
                                 f"Continue with {info.world_size} ranks.")
            if not full:
                full = {n: [torch.zeros(p.numel, dtype=torch.float32) for p in specs] for n in m.state_names}
            state = store.read_params(m.state_names)
            for j, pc in enumerate(table):
                for n in m.state_names:
                    full[n][pc.param][pc.start : pc.start + pc.length] = state[n][j]
                covered[pc.param][pc.start : pc.start + pc.length] += 1
                steps[pc.param] = max(steps[pc.param], m.param_steps[j])
            for k, v in m.counters.items():
                counters[k] = v if k == "skipped_steps" else counters.get(k, 0) + v
    assert manifest0 is not None
    if any(bool((c != 1).any()) for c in covered):
        raise StoreError(f"the stores at {os.fspath(src)} do not cover every element exactly once; they cannot be re-sharded.")

    # Write the new set: create each store, load its state, commit the source's step.
    made: list[Path] = []
    elements = []
    try:
        for r, target in enumerate(targets):
            table = local_pieces(specs, layout, world_size, r)
            local = tuple(pc.spec for pc in table)
            made.append(target)

            def master(j: int, table: tuple[LocalPiece, ...] = table) -> torch.Tensor:
                pc = table[j]
                return full[manifest0.state_names[0]][pc.param][pc.start : pc.start + pc.length]

            store = Store.create(target, params=local, masters=master, optimizer=manifest0.optimizer,
                                 state_names=manifest0.state_names[1:], hyperparameters=manifest0.hyperparameters,
                                 slice_bytes=int((slice_mb or auto_slice_mb(local)) * 2**20),
                                 # The source's format: its decoded master values encode exactly; 8-bit
                                 # moments are re-quantised once over the new pieces' blocks.
                                 state_format=manifest0.state_format)
            device = InlineDevice(store, DeviceConfig(backend="inline"))
            try:
                for spec in store.manifest.slices:
                    arrays = {n: torch.cat([full[n][table[g.param].param][table[g.param].start + g.start :
                                                                         table[g.param].start + g.start + g.length]
                                            for g in spec.segments]).numpy() for n in manifest0.state_names}
                    device.submit(LoadState(spec.index, arrays)).wait()
                mine = {k: (v if k == "skipped_steps" or r == 0 else 0) for k, v in counters.items()}
                device.submit(Commit(manifest0.step, tuple(steps[pc.param] for pc in table),
                                     manifest0.hyperparameters, mine)).wait()
            finally:
                device.close()  # and the store
            write_shard_file(target, ShardInfo(layout, r, world_size, plan_digest(specs, world_size, layout), specs))
            elements.append(sum(pc.length for pc in table))
    except BaseException:
        for target in made:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return ReshardResult(manifest0.step, manifest0.optimizer, world_size, layout, tuple(targets), tuple(elements))


def main(argv: Sequence[str]) -> int:
    """``nearstep reshard SRC DST --world-size N [--layout pieces|fsdp2] [--slice-mb X]``."""
    parser = argparse.ArgumentParser(
        prog="nearstep reshard",
        description="Write a store set for another number of ranks holding the same optimizer state. "
                    "Exit codes: 0 done, 1 failed, 2 usage or unreadable source.")
    parser.add_argument("src", help="the store= of the run that wrote the set (a directory of rank<N> stores or a {rank} template)")
    parser.add_argument("dst", help="the store= for the new set; must not hold stores yet")
    parser.add_argument("--world-size", type=int, required=True, help="ranks of the new set")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="pieces (plain data parallel, DDP) or fsdp2; default the source's")
    parser.add_argument("--src-world-size", type=int, default=None, help="only when SRC names {world_size}")
    parser.add_argument("--slice-mb", type=float, default=None, help="slice size of the new stores (default automatic)")
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        result = reshard(args.src, args.dst, args.world_size, layout=args.layout, src_world_size=args.src_world_size,
                         slice_mb=args.slice_mb)
    except (StoreError, ValueError) as exc:
        print(f"nearstep reshard: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, ShardMismatchError) else 1
    except NearstepError as exc:
        print(f"nearstep reshard: {exc}", file=sys.stderr)
        return 1
    print(f"re-sharded {result.optimizer} state at step {result.step} into {result.world_size} {result.layout} stores:")
    for r, (path, n) in enumerate(zip(result.paths, result.elements)):
        print(f"  rank {r}: {path} ({n:,} elements)")
    print(f"Continue with {result.world_size} ranks and store={os.fspath(args.dst)!r}.")
    return 0
