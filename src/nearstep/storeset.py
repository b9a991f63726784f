"""The store set: one store per rank, what each holds, whether they fit together.

A sharded run (see ``distributed.py``) keeps one ordinary store per rank, each
on its rank's local disk, each holding only that rank's part of the optimizer
state. Together they are a *store set*. This module has what is decided without
talking to other ranks: the plan of who owns which elements (the same on every
rank), each rank's path, the ``shard.json`` that records whose store it is and
the whole model's parameter table, and the check that the stores found form one
set the run can resume. Rebuilding a set for another world size is
:mod:`nearstep.reshard` (``nearstep reshard``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import NearstepError, StoreError
from .store import MANIFEST, ParamSpec, Segment, fsync_path, plan_slices, read_manifest

__all__ = [
    "SHARD_FILE",
    "LAYOUTS",
    "ShardInfo",
    "LocalPiece",
    "StoreProbe",
    "plan_pieces",
    "plan_digest",
    "local_pieces",
    "store_path_for",
    "read_shard_file",
    "write_shard_file",
    "probe_store",
    "check_store_set",
]

SHARD_FILE = "shard.json"
SHARD_FORMAT = 1
LAYOUTS = ("pieces", "fsdp2")
UNITS_PER_RANK = 8  # units of the plan per rank: greedy largest-first keeps every rank within ~1/8 of the mean
MAX_UNIT_ELEMENTS = 16 << 20  # 64 MiB of fp32 master weights


# ---------------------------------------------------------------------------
# The plan: which rank owns what (pure functions, the same on every rank)


def plan_pieces(params: Sequence[ParamSpec], world_size: int) -> tuple[tuple[Segment, ...], ...]:
    """Per rank, the pieces it owns, as (parameter, start, length) segments in parameter order.

    The parameters are cut into about ``8 * world_size`` units (``plan_slices`` with a
    unit size of 1/(8N) of all elements, at most 64 MiB of fp32), and the units go,
    largest first, to the rank with the least so far (ties to the lowest rank). Every
    rank gets at least one unit when there are at least ``world_size`` elements.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total = sum(p.numel for p in params)
    if total < world_size:
        raise ValueError(
            f"the optimizer's parameters have {total} elements in all, fewer than the {world_size} ranks; "
            f"every rank must own some. Use fewer ranks, or a single process for this model."
        )
    unit = min(MAX_UNIT_ELEMENTS, -(-total // (UNITS_PER_RANK * world_size)))
    units = plan_slices(params, unit * 4)
    loads = [0] * world_size
    owned: list[list[Segment]] = [[] for _ in range(world_size)]
    for u in sorted(units, key=lambda u: (-u.numel, u.index)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        loads[r] += u.numel
        owned[r].extend(u.segments)
    return tuple(tuple(sorted(segs, key=lambda s: (s.param, s.start))) for segs in owned)


def plan_digest(params: Sequence[ParamSpec], world_size: int, layout: str) -> str:
    """A short digest of what decides the plan: the parameter table, the world size, the layout."""
    table = [[p.name, list(p.shape), p.dtype, p.group] for p in params]
    text = json.dumps({"params": table, "world_size": world_size, "layout": layout, "units": UNITS_PER_RANK,
                       "max_unit": MAX_UNIT_ELEMENTS}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class LocalPiece:
    """One tensor of a rank's store: which elements of which parameter it is.

    Attributes:
        spec: the tensor as the rank's store knows it (named ``name[start:stop]``).
        param: its parameter's index in the whole model's table.
        start, length: the flat elements of that parameter it holds.
    """

    spec: ParamSpec
    param: int
    start: int
    length: int


def local_pieces(params: Sequence[ParamSpec], layout: str, world_size: int, rank: int) -> tuple[LocalPiece, ...]:
    """What rank ``rank``'s store holds, in its order.

    ``pieces``: its share of :func:`plan_pieces`, flat. ``fsdp2``: one local shard per
    parameter, rows cut as FSDP2 (``torch.chunk``) cuts dim 0: ceil(rows/N) per rank,
    the last ranks' short or empty.
    """
    out = []
    if layout == "pieces":
        for s in plan_pieces(params, world_size)[rank]:
            p = params[s.param]
            out.append(LocalPiece(ParamSpec(f"{p.name}[{s.start}:{s.start + s.length}]", (s.length,), p.dtype, p.group),
                                  s.param, s.start, s.length))
        return tuple(out)
    if layout != "fsdp2":
        raise ValueError(f"layout must be 'pieces' or 'fsdp2', got {layout!r}")
    for i, p in enumerate(params):
        if not p.shape:
            raise ValueError(f"parameter {p.name!r} is a scalar; FSDP2 shards dim 0 of each parameter")
        rows = -(-p.shape[0] // world_size)
        first = min(rank * rows, p.shape[0])
        count = min(rows, p.shape[0] - first)
        per_row = math.prod(p.shape[1:])
        start, length = first * per_row, count * per_row
        out.append(LocalPiece(ParamSpec(f"{p.name}[{start}:{start + length}]", (count, *p.shape[1:]), p.dtype, p.group),
                              i, start, length))
    return tuple(out)


def store_path_for(store: str | os.PathLike, rank: int, world_size: int) -> Path:
    """This rank's store directory: ``store`` with ``{rank}``/``{world_size}`` filled in, or
    ``store/rank{rank}`` when it names neither."""
    text = os.fspath(store)
    if "{" not in text:
        return Path(text) / f"rank{rank}"
    try:
        return Path(text.format(rank=rank, world_size=world_size))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"store={text!r} is a template, but only {{rank}} and {{world_size}} can be filled in ({exc!r})"
        ) from None


# ---------------------------------------------------------------------------
# The store set: one store per rank, and a small file that says whose it is


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """What ``shard.json`` in a rank's store records about the run that made it.

    Attributes:
        layout: ``pieces`` or ``fsdp2``.
        rank: the rank that owns this store.
        world_size: how many ranks the store set has.
        plan: :func:`plan_digest` of the parameter table, world size and layout.
        params: the whole model's parameter table (every rank's store holds only its
            pieces of it), as (name, shape, dtype, group): what ``reshard`` rebuilds from.
        format: the version of this file.
    """

    layout: str
    rank: int
    world_size: int
    plan: str
    params: tuple[ParamSpec, ...] = ()
    format: int = SHARD_FORMAT


def read_shard_file(path: Path) -> ShardInfo | None:
    """The store's ``shard.json``, or None when it has none (a single-process store)."""
    where = Path(path) / SHARD_FILE
    try:
        doc = json.loads(where.read_text())
        params = tuple(ParamSpec(str(p["name"]), tuple(int(d) for d in p["shape"]), str(p["dtype"]), int(p["group"]))
                       for p in doc.get("params", ()))
        return ShardInfo(str(doc["layout"]), int(doc["rank"]), int(doc["world_size"]), str(doc["plan"]), params,
                         int(doc.get("format", SHARD_FORMAT)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{where} cannot be read ({type(exc).__name__}: {exc}); the store set cannot be checked. "
                         f"Restore it from a copy, or give the run a new store path.") from None


def write_shard_file(path: Path, info: ShardInfo) -> None:
    """Write ``shard.json`` whole or not at all (temporary file, fsync, rename, fsync the directory)."""
    tmp = Path(path) / (SHARD_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=1, sort_keys=True) + "\n")
    fsync_path(tmp)
    os.replace(tmp, Path(path) / SHARD_FILE)
    fsync_path(Path(path))


@dataclass(frozen=True, slots=True)
class StoreProbe:
    """What one rank found where its store should be, before opening it (sent to every rank)."""

    rank: int
    host: str
    path: str
    exists: bool
    step: int | None = None
    shard: ShardInfo | None = None
    problem: str | None = None


def probe_store(path: Path, rank: int) -> StoreProbe:
    host = socket.gethostname()
    if not (path / MANIFEST).exists():
        return StoreProbe(rank, host, str(path), False)
    try:
        return StoreProbe(rank, host, str(path), True, read_manifest(path).step, read_shard_file(path))
    except NearstepError as exc:
        return StoreProbe(rank, host, str(path), True, problem=str(exc))


def _where(p: StoreProbe) -> str:
    return f"rank {p.rank}: {p.host}:{p.path}"


def check_store_set(probes: Sequence[StoreProbe], world_size: int, layout: str, plan: str) -> str | None:
    """Whether the ranks' stores form one store set this run can resume (or none exists yet).

    Returns None when they do, else a message naming the ranks, paths and steps, and what to do.
    """
    broken = [p for p in probes if p.problem]
    if broken:
        return "; ".join(f"{_where(p)}: {p.problem}" for p in broken)
    have = [p for p in probes if p.exists]
    if not have:
        return None
    written = sorted({p.shard.world_size for p in have if p.shard is not None})
    if written and written != [world_size]:
        sizes = " and ".join(map(str, written))
        return (
            f"the store set was written by a run of {sizes} ranks, and this run has {world_size} "
            f"({', '.join(_where(p) + (f' [of {p.shard.world_size}]' if p.shard else '') for p in have)}). "
            f"Each rank's store holds only that rank's share of the state, so a store set resumes with the "
            f"world size that wrote it: restart with {written[0]} ranks (torchrun --nproc-per-node/--nnodes), "
            f"re-shard it with `nearstep reshard SRC DST --world-size {world_size}`, or give this run a new store path."
        )
    missing = [p for p in probes if not p.exists]
    if missing:
        return (
            f"the store set is incomplete: {', '.join(_where(p) + f' (step {p.step})' for p in have)} "
            f"{'has a store' if len(have) == 1 else 'have stores'}, but {', '.join(_where(p) for p in missing)} "
            f"{'has' if len(missing) == 1 else 'have'} none. Every rank needs its own store on its own disk: "
            f"copy the missing ones back (same paths), or give this run a new store path."
        )
    alone = [p for p in have if p.shard is None]
    if alone:
        return (
            f"{', '.join(_where(p) for p in alone)}: this store was written by a single process (it has no "
            f"{SHARD_FILE}), or a sharded run stopped while creating it; a run of {world_size} ranks needs one store "
            f"per rank from one sharded run. Give this run a new store path (or delete a store that is still at step 0)."
        )
    wrong_rank = [p for p in have if p.shard is not None and p.shard.rank != p.rank]
    if wrong_rank:
        return (
            f"{', '.join(f'{_where(p)} holds the store of rank {p.shard.rank}' for p in wrong_rank if p.shard)}: "
            f"the ranks must each open their own store. Put {{rank}} in store= (or keep the rank<N> directories "
            f"where the run that wrote them put them)."
        )
    other = [p for p in have if p.shard is not None and (p.shard.layout, p.shard.plan) != (layout, plan)]
    if other:
        p = other[0]
        assert p.shard is not None
        how = (f"{p.shard.layout} layout" if p.shard.layout != layout
               else "a different parameter table (names, shapes, dtypes or param groups)")
        return (
            f"{_where(p)}: the store set was sharded for {how}, not for this run's {layout} layout and "
            f"parameters. Pass the same model and parameters as the run that wrote it "
            f"({'FSDP2 again' if p.shard.layout == 'fsdp2' else 'plain data parallel or DDP again'}), or a new store path."
        )
    steps = sorted({p.step for p in have if p.step is not None})
    if len(steps) > 1:
        return (
            f"the ranks' stores are at different committed steps: {', '.join(f'{_where(p)} at step {p.step}' for p in have)}. "
            f"A rank stopped after some ranks had committed a step and before it had; the step in between "
            f"exists on only some ranks and cannot be completed. Restore the whole store set from a copy taken "
            f"at one step, or give this run a new store path."
        )
    return None
