"""Many ranks: each rank keeps its share of the optimizer state in a store of its own.

With an initialised ``torch.distributed`` process group (``torchrun``), or with an
explicit ``process_group=``, a nearstep optimizer is *sharded*: every rank builds
the same plan, owns a part of the state, and keeps that part in its own store on
its local disk, updated by its own device. The existing store, device and
kernels run unchanged on that part; this module only decides what each rank
owns and moves gradients and weights between ranks with torch.distributed
(gloo on CPU, NCCL on GPU). There is no communication layer of nearstep's own.

Two layouts:

- ``pieces`` (plain data parallel and DDP): every rank holds every full parameter.
  The parameters are cut into units of about 1/(8N) of the model each (whole
  small parameters packed together, large ones split), and each unit goes to
  the least-loaded rank, largest first. A rank's units become *pieces*: flat
  1-D views ``name[start:stop]`` of the parameters' own storage. The rank's store
  is an ordinary store over its pieces, about 1/N of the whole. Gradients are
  averaged over the ranks (reduce-scatter, so each rank receives only its
  pieces) or, under DDP, already are; the new pieces are broadcast by their
  owners into every rank's parameters.
- ``fsdp2`` (``torch.distributed.fsdp.fully_shard``): the parameters are DTensors
  sharded on dim 0 and FSDP2 already gives each rank a local shard and that
  shard's averaged gradient. The rank's store holds its local shards; nothing
  is gathered, because FSDP2 all-gathers the parameters itself before forward.

[Note: collective ordering]
Collectives match by their order: every rank must issue the same ones, on the
same group, in the same order. nearstep's run only at these points, which every
rank reaches:

1. Construction: the default store path (broadcast, only for ``store=None``),
   the store-set check (all-gather), the outcome of opening (all-gather), and in
   the pieces layout the weights of every piece (one broadcast per owner).
2. ``step()``, after the previous step is finished: the gradients (one
   reduce-scatter; pieces layout, unless they are averaged already), then the
   global gradient norm (one all-reduce of a scalar, when clipping or
   ``skip_nonfinite`` need it; a rank without gradients contributes 0), then in
   sync mode (and delayed mode's warm-up) the new weights (one broadcast per
   owner and dtype).
3. Overlap mode, pieces layout: the forward pre-hook of each module broadcasts
   that module's new pieces the first time it runs after a step. Modules run in
   the same order on every rank, so the broadcasts match. Whatever no hook
   published goes out at the next ``step()``, ``synchronize()``,
   ``state_dict()``, ``load_state_dict()`` or ``close()``, on every rank.

Every decision that changes which collectives run (skip a step for a
non-finite norm, whether the step has any gradient at all, which parameters
to publish) is taken from values all ranks hold after a reduction, never from
local ones. Under DDP, DDP's own all-reduces run inside backward and ours
outside it, so the two never interleave; with ``ShardingConfig(timeout=...)``
ours also run on a group of their own.

[Note: what cannot overlap]
- Under DDP the gradients are final only when backward ends (DDP finishes its
  bucket all-reduces in backward's last callback), so staging to the device
  starts at ``step()``; DDP itself overlaps its all-reduce with backward.
- Plain data parallel reduces the gradients in ``step()``: one reduce-scatter
  on the critical path. Wrap the model in DDP to hide it behind backward.
- A module's broadcast in overlap mode waits for the owning rank's device to
  finish that module's slices, then for the broadcast itself. Later modules'
  updates still run while earlier modules compute.
- Under FSDP2, gradients are staged during backward as FSDP2's reduce-scatter
  delivers them (post-accumulate-grad hooks), and each sharded module's new
  local shards land just before FSDP2 all-gathers them (a pre-hook that runs
  first); the only barrier is the one scalar all-reduce of the norm. Explicit
  forward prefetching (``set_modules_to_forward_prefetch``) all-gathers a module
  before its own pre-hook runs: use sync mode with it.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist

from .device import DeviceConfig
from .errors import CollectiveError, NearstepError, ShardMismatchError, StoreError, UnsupportedUsageError
from .pipeline import Pipeline
from .store import MANIFEST, ParamSpec, Store, read_manifest
from .storeset import (ShardInfo, check_store_set, local_pieces, plan_digest, plan_pieces, probe_store, store_path_for,
                       write_shard_file)

__all__ = [
    "ShardingConfig",
    "Sharding",
    "Unsharded",
    "RankSharding",
    "PieceSharding",
    "LocalShardSharding",
    "build_sharding",
    "store_set_optimizer",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardingConfig:
    """How a sharded optimizer works with the other ranks.

    Attributes:
        timeout: seconds nearstep's collectives wait for the other ranks before failing
            with :class:`~nearstep.CollectiveError`. ``None`` uses the process group's own
            timeout (``init_process_group(timeout=...)``; torch's default is 30 minutes for
            gloo, 10 for NCCL). A number gives nearstep a process group of its own with that
            timeout (``torch.distributed.new_group``, which every rank of the default group
            reaches, since the optimizer is built on every rank). A rank that dies is noticed
            at once by gloo (its connections close); the timeout is for a rank that hangs.
        gradients: ``"auto"``: already averaged when ``model=`` is a
            ``DistributedDataParallel``, else reduced here. ``"reduce"``: each rank holds
            its own gradients and nearstep averages them. ``"averaged"``: they are averaged
            already (DDP without ``model=``). Ignored under FSDP2, which averages them itself.
    """

    timeout: float | None = None
    gradients: Literal["auto", "reduce", "averaged"] = "auto"

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {self.timeout!r}")
        if self.gradients not in ("auto", "reduce", "averaged"):
            raise ValueError(f"gradients must be 'auto', 'reduce' or 'averaged', got {self.gradients!r}")


# ---------------------------------------------------------------------------
# The runtime


def _alias(view: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A leaf tensor over ``view``'s memory: writing it writes the parameter; ``.grad`` can be set."""
    return torch.nn.Parameter(view.detach(), requires_grad=requires_grad)


class Sharding(ABC):
    """This process's share of an optimizer's state, and what keeps the shares in step.

    The optimizer works on :attr:`local_params` and calls the methods below at the
    points [Note: collective ordering] names. One process (:class:`Unsharded`) goes
    through the same calls, which then do nothing: there is one code path for one
    rank and many.
    """

    layout: ClassVar[str]
    #: Whether this process holds the whole optimizer. It may then decide alone what only it
    #: can see: gradients or weights edited after staging (speculation is validated here),
    #: parameters unfrozen since the store was made, param groups added. With many ranks these
    #: would need every rank to agree through collectives nearstep does not issue, so they are
    #: refused or left out there (see the optimizer's docs).
    alone: ClassVar[bool] = False

    local_params: list[torch.Tensor]
    local_names: list[str]
    local_specs: tuple[ParamSpec, ...]

    @abstractmethod
    def open_store(self, store: Any, default: Callable[[], Path],
                   opener: Callable[[Any], tuple[Store, bool]]) -> tuple[Store, bool]:
        """Open (or create) this process's store with ``opener``; returns it and whether it was resumed."""

    def device_config(self, config: DeviceConfig) -> DeviceConfig:
        """The device configuration for this process's store."""
        return config

    @property
    @abstractmethod
    def any_gradient(self) -> bool:
        """Whether another rank has a gradient this step (the caller checks its own)."""

    def take_gradients(self) -> None:
        """Set each local parameter's ``.grad`` to its averaged gradient (or None)."""

    def global_norm(self, local: torch.Tensor) -> torch.Tensor:
        """The gradient norm over all ranks from this process's."""
        return local

    def launched(self) -> None:
        """A step was launched on every rank (its weights are to be published)."""

    def publish_pending(self) -> None:
        """Every landed piece not yet sent goes to every rank."""

    def publish_all(self) -> None:
        """Every piece goes to every rank (after loading weights from the stores)."""

    def abandon(self) -> None:
        """Unwinding after an error: publish nothing more (the other ranks may be gone)."""

    def before_state_dict(self, synchronize: Callable[[], None]) -> None:
        """``model.state_dict()`` is about to read the weights (on this rank only, perhaps)."""
        synchronize()

    def release_gradients(self) -> None:
        """The step is over: drop what :meth:`take_gradients` set."""

    @abstractmethod
    def attach_forward_hooks(self, model: torch.nn.Module, pipeline: Pipeline) -> None:
        """Land new weights before the modules that read them (overlap mode)."""

    def attach_grad_hooks(self, pipeline: Pipeline) -> None:
        """Stage gradients during backward where they are final only here (FSDP2)."""

    def stats(self, steps: int) -> dict[str, Any]:
        """What the sharding did, for ``opt.stats()``."""
        return {}


class Unsharded(Sharding):
    """One process holds the whole optimizer: every call is the identity or does nothing."""

    layout = "none"
    alone = True

    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str], specs: Sequence[ParamSpec]) -> None:
        self.local_params, self.local_names, self.local_specs = list(params), list(names), tuple(specs)

    def open_store(self, store: Any, default: Callable[[], Path],
                   opener: Callable[[Any], tuple[Store, bool]]) -> tuple[Store, bool]:
        return opener(store if store is not None else default())

    @property
    def any_gradient(self) -> bool:
        return False  # there is no other rank

    def attach_forward_hooks(self, model: torch.nn.Module, pipeline: Pipeline) -> None:
        held = {id(p) for p in model.parameters()}
        missing = [n for n, p in zip(self.local_names, self.local_params) if id(p) not in held]
        if missing:
            raise UnsupportedUsageError(
                f"mode='overlap' lands each parameter's new weights just before the forward of the module in "
                f"model= that holds it, but {len(missing)} of the optimizer's parameters ({', '.join(map(repr, missing[:3]))}"
                f"{' ...' if len(missing) > 3 else ''}) are not in {type(model).__name__}.parameters(). Pass the "
                f"module that holds all of them (the whole model), or use mode='sync'."
            )
        pipeline.attach_forward_hooks(model)


class RankSharding(Sharding):
    """Many ranks, each with its own store: the shares and the collectives between them."""

    def __init__(self, group: Any, config: ShardingConfig, params: Sequence[torch.Tensor], specs: Sequence[ParamSpec]) -> None:
        if config.timeout is not None:
            # Our own group: its timeout is ours to choose, and our collectives never queue behind the user's.
            group = dist.new_group(ranks=dist.get_process_group_ranks(group),
                                   timeout=datetime.timedelta(seconds=config.timeout))
        self.group = group
        self.config = config
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.params = list(params)
        self.specs = tuple(specs)
        self.plan = plan_digest(specs, self.world_size, self.layout)
        self.local_params: list[torch.Tensor] = []
        self.local_names: list[str] = []
        self.local_specs: tuple[ParamSpec, ...] = ()
        self.present = [False] * len(self.params)  # per parameter: has a gradient on some rank this step
        self.counters = {"collectives": 0, "collective_bytes_sent": 0, "collective_bytes_received": 0,
                         "collective_seconds": 0.0}

    # -- collectives ---------------------------------------------------------

    def _collective(self, what: str, fn: Callable[..., Any], *args: Any, sent: int = 0, received: int = 0, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            result = fn(*args, group=self.group, **kwargs)
        except RuntimeError as exc:  # DistBackendError and gloo's errors are RuntimeErrors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            waited = (f"ShardingConfig(timeout={self.config.timeout:g})" if self.config.timeout is not None
                      else "the process group's timeout")
            raise CollectiveError(
                f"rank {self.rank} of {self.world_size}: the {what} with the other ranks failed after "
                f"{time.perf_counter() - start:.1f} s: {first}. Another rank has probably died or stopped (see its "
                f"log); one that only hangs counts as failed after {waited}. Every rank's store keeps its last "
                f"committed step: restart all ranks with the same world size and the same store= to resume."
            ) from exc
        self.counters["collectives"] += 1
        self.counters["collective_bytes_sent"] += sent
        self.counters["collective_bytes_received"] += received
        self.counters["collective_seconds"] += time.perf_counter() - start
        return result

    def _all_gather_object(self, obj: Any, what: str) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._collective(what, dist.all_gather_object, out, obj)
        return out

    # -- the store set -------------------------------------------------------

    def open_store(self, store: Any, default: Callable[[], Path], opener: Callable[[Path], tuple[Store, bool]]) -> tuple[Store, bool]:
        """Agree on the store set, then open (or create) this rank's store with ``opener``.

        Collective. Raises :class:`~nearstep.ShardMismatchError` on every rank when the
        stores found do not form one store set for this run; when one rank cannot open
        its store, every rank raises (that rank its own error, the others a StoreError naming it).
        """
        if isinstance(store, Store):
            raise TypeError(
                "with many ranks, store= must be a path: a template with {rank} (like '/ssd/run/{rank}'), "
                "or a directory that gets one rank<N> subdirectory per rank; not an open Store"
            )
        if store is None:
            # Rank 0 names the run's directory, so all ranks' default stores land side by side.
            chosen = [str(default()) if self.rank == 0 else None]
            self._collective("choice of the default store directory", dist.broadcast_object_list, chosen,
                             src=dist.get_global_rank(self.group, 0))
            store = chosen[0]
        path = store_path_for(store, self.rank, self.world_size)
        # Every rank sees what every other found before any opens: all refuse a bad set together.
        probes = self._all_gather_object(probe_store(path, self.rank), "check of the store set")
        problem = check_store_set(probes, self.world_size, self.layout, self.plan)
        if problem is not None:
            raise ShardMismatchError(problem)
        opened: tuple[Store, bool] | None = None
        error: Exception | None = None
        try:
            opened = opener(path)
            if not opened[1]:
                write_shard_file(path, ShardInfo(self.layout, self.rank, self.world_size, self.plan, self.specs))
        except Exception as exc:
            error = exc
        # Also on failure: a rank that cannot open its store must not leave the others waiting in the next collective.
        outcomes = self._all_gather_object(None if error is None else f"{type(error).__name__}: {error}", "opening of the stores")
        if error is not None:
            if opened is not None:
                opened[0].close()
            raise error
        failed = [(r, text) for r, text in enumerate(outcomes) if text]
        if failed:
            assert opened is not None
            opened[0].close()
            if not opened[1]:
                shutil.rmtree(path, ignore_errors=True)  # made just now, at step 0: no half-made set stays behind
            r, text = failed[0]
            raise StoreError(f"rank {r} could not open its store ({probes[r].host}:{probes[r].path}): {text}. "
                             f"The ranks open their stores together; fix that one and restart all ranks.")
        assert opened is not None
        return opened

    def device_config(self, config: DeviceConfig) -> DeviceConfig:
        """Pin each local rank's emulated device to a core of its own (from the last core down)."""
        if config.backend != "emulated" or config.cores is not None:
            return config
        available = sorted(os.sched_getaffinity(0))
        if len(available) <= 1:
            return config
        local = int(os.environ.get("LOCAL_RANK", self.rank))
        return replace(config, cores=(available[-1 - local % len(available)],))

    # -- a step --------------------------------------------------------------

    @property
    def any_gradient(self) -> bool:
        """Whether some rank has a gradient for some parameter this step (the same on every rank)."""
        return any(self.present)

    def global_norm(self, local: torch.Tensor) -> torch.Tensor:
        """The gradient norm over all ranks from this rank's (each element is on one rank only)."""
        squared = local.detach().to(torch.float64).square().reshape(1)
        # Every rank, every step it checks the norm: the sum of squares, then the root.
        self._collective("all-reduce of the gradient norm", dist.all_reduce, squared, op=dist.ReduceOp.SUM,
                         sent=8, received=8)
        return squared.sqrt().to(torch.float32).reshape(())

    def release_gradients(self) -> None:
        # The local parameters are this module's aliases: their .grad is ours to drop.
        for p in self.local_params:
            p.grad = None

    def stats(self, steps: int) -> dict[str, Any]:
        per = max(steps, 1)
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "sharding": self.layout,
            "local_elements": sum(p.numel for p in self.local_specs),
            "collectives_per_step": self.counters["collectives"] / per,
            "collective_bytes_sent_per_step": self.counters["collective_bytes_sent"] / per,
            "collective_bytes_received_per_step": self.counters["collective_bytes_received"] / per,
            "collective_ms_per_step": 1e3 * self.counters["collective_seconds"] / per,
        }


def _landing_hook(pipeline: Pipeline, own: tuple[int, ...]) -> Callable[[], None]:
    """Land this rank's slices ``own`` of the launched step, if they have not landed."""

    def land() -> None:
        inflight = pipeline.inflight
        if inflight is not None:
            for k in own:
                if k not in inflight.landed and k in inflight.applies:
                    pipeline.land(k)

    return land


class PieceSharding(RankSharding):
    """The pieces layout: plain data parallel and DDP (see the module docstring)."""

    layout = "pieces"

    def __init__(self, group: Any, config: ShardingConfig, params: Sequence[torch.Tensor], names: Sequence[str],
                 specs: Sequence[ParamSpec], *, averaged: bool) -> None:
        super().__init__(group, config, params, specs)
        self.averaged = averaged
        self.pieces = plan_pieces(self.specs, self.world_size)
        table = local_pieces(self.specs, self.layout, self.world_size, self.rank)
        with torch.no_grad():
            self.local_params = [_alias(self.params[pc.param].detach().view(-1)[pc.start : pc.start + pc.length],
                                        self.params[pc.param].requires_grad) for pc in table]
        self.local_names = [pc.spec.name for pc in table]
        self.local_specs = tuple(pc.spec for pc in table)
        self.owners: list[list[tuple[int, int, int]]] = [[] for _ in self.params]  # per parameter: (rank, start, length)
        for r, segs in enumerate(self.pieces):
            for s in segs:
                self.owners[s.param].append((r, s.start, s.length))
        self.counts = [sum(s.length for s in segs) for segs in self.pieces]
        # Reduce-scatter chunk of rank r: its pieces' gradients, then one presence count per parameter.
        self.chunk = max(self.counts) + len(self.params)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pending: set[int] = set()

    # -- gradients -------------------------------------------------------------

    @torch.no_grad()
    def take_gradients(self) -> None:
        for p in self.params:
            g = p.grad
            if g is not None and (g.is_sparse or g.shape != p.shape):
                raise ValueError(f"a gradient has shape {tuple(g.shape)}{' (sparse)' if g.is_sparse else ''}, its "
                                 f"parameter {tuple(p.shape)} dense; nothing was updated")
        if self.averaged:
            self.present = [p.grad is not None for p in self.params]
            for alias, s in zip(self.local_params, self.pieces[self.rank]):
                g = self.params[s.param].grad
                alias.grad = None if g is None else g.detach().reshape(-1)[s.start : s.start + s.length]
            return
        self._reduce_scatter()

    def _reduce_scatter(self) -> None:
        """Average the gradients over the ranks; each rank receives only its own pieces.

        One reduce-scatter of an fp32 buffer of ``world_size`` chunks, each a rank's pieces
        padded to the largest share, plus per-parameter presence counts (so every rank
        learns which parameters have a gradient on any rank). A ring reduce-scatter moves
        about (N-1)/N of the buffer per rank: half of what an all-reduce moves.
        """
        n_params = len(self.params)
        device = self.params[0].device
        if self._buffers is None:  # kept across steps: the local .grads are views of `out` only until step() returns
            self._buffers = (torch.empty(self.world_size * self.chunk, dtype=torch.float32, device=device),
                             torch.empty(self.chunk, dtype=torch.float32, device=device))
        buf, out = self._buffers
        buf.zero_()
        flags = torch.tensor([float(p.grad is not None) for p in self.params], dtype=torch.float32, device=device)
        for r, segs in enumerate(self.pieces):
            offset = r * self.chunk
            for s in segs:
                g = self.params[s.param].grad
                if g is not None:
                    buf[offset : offset + s.length].copy_(g.detach().reshape(-1)[s.start : s.start + s.length])
                offset += s.length
            base = r * self.chunk + self.counts[r]
            buf[base : base + n_params].copy_(flags)
        # Every rank, every step (also one with no gradient of its own): the pieces' sums.
        self._collective("reduce-scatter of the gradients", dist.reduce_scatter_tensor, out, buf, op=dist.ReduceOp.SUM,
                         sent=4 * (self.world_size - 1) * self.chunk, received=4 * (self.world_size - 1) * self.chunk)
        mine = self.counts[self.rank]
        out[:mine].div_(self.world_size)  # averaged, as DDP averages
        self.present = (out[mine : mine + n_params] > 0).tolist()
        offset = 0
        for alias, s in zip(self.local_params, self.pieces[self.rank]):
            if self.present[s.param]:
                g = out[offset : offset + s.length]
                alias.grad = g if g.dtype == alias.dtype else g.to(alias.dtype)
            else:
                alias.grad = None
            offset += s.length

    # -- weights -----------------------------------------------------------------

    def launched(self) -> None:
        self.pending = {i for i, has in enumerate(self.present) if has}

    def publish_pending(self) -> None:
        if self.pending:
            self._publish(sorted(self.pending), "the new weights")
            self.pending.clear()

    def publish_all(self) -> None:
        self._publish(range(len(self.params)), "the weights in the stores")
        self.pending.clear()

    def abandon(self) -> None:
        self.pending.clear()

    def before_state_dict(self, synchronize: Callable[[], None]) -> None:
        if self.pending:
            raise NearstepError(
                f"model.state_dict() was called on rank {self.rank} while {len(self.pending)} parameters of the last "
                f"step have not reached every rank (overlap mode publishes them in the next forward). Publishing is a "
                f"collective: call opt.synchronize() on every rank first, then read the state dict where you like."
            )

    @torch.no_grad()
    def _publish(self, params: Iterable[int], what: str) -> None:
        """Each owner broadcasts its pieces of ``params``: one broadcast per (owner, dtype)."""
        groups: dict[tuple[int, str], list[tuple[torch.Tensor, int]]] = {}
        for i in sorted(params):
            p = self.params[i]
            flat = p.detach().view(-1)
            for owner, start, length in self.owners[i]:
                groups.setdefault((owner, str(p.dtype)), []).append((flat[start : start + length], i))
        for (owner, _dtype), views in sorted(groups.items()):
            tensors = [v for v, _ in views]
            mine = owner == self.rank
            if len(tensors) == 1:
                buf = tensors[0]  # contiguous: broadcast in place, no copies
            elif mine:
                buf = torch.cat(tensors)
            else:
                buf = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
            nbytes = buf.numel() * buf.element_size()
            # Every rank, in (owner, dtype) order: the owner's new pieces into everyone's parameters.
            self._collective(f"broadcast of {what} from rank {owner}", dist.broadcast, buf,
                             src=dist.get_global_rank(self.group, owner),
                             sent=nbytes * (self.world_size - 1) if mine else 0, received=0 if mine else nbytes)
            if not mine and len(tensors) > 1:
                offset = 0
                for t in tensors:
                    t.copy_(buf[offset : offset + t.numel()])
                    offset += t.numel()

    # -- hooks -------------------------------------------------------------------

    def attach_forward_hooks(self, model: torch.nn.Module, pipeline: Pipeline) -> None:
        """A pre-hook on each module with parameters here: land its slices, then broadcast its pieces."""
        index = {id(p): i for i, p in enumerate(self.params)}
        mine = self.pieces[self.rank]
        slices_of: list[set[int]] = [set() for _ in self.params]
        for staged in pipeline.layout.slices:
            for seg in staged.segments:
                slices_of[mine[seg.param].param].add(staged.index)
        for name, module in model.named_modules():
            members = tuple(sorted({index[id(p)] for p in module.parameters(recurse=False) if id(p) in index}))
            if members:
                own = tuple(sorted(set().union(*(slices_of[i] for i in members))))
                hook = self._pre_forward(members, _landing_hook(pipeline, own), name or type(module).__name__)
                pipeline.add_handle(module.register_forward_pre_hook(hook))

    def _pre_forward(self, members: tuple[int, ...], land: Callable[[], None], name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            todo = [i for i in members if i in self.pending]
            if not todo:
                return
            land()  # this rank's new pieces of the module are in its parameters...
            self._publish(todo, f"the new weights of {name}")  # ...and now everyone's are
            self.pending.difference_update(todo)

        return hook


class LocalShardSharding(RankSharding):
    """The fsdp2 layout: the optimizer works on each DTensor parameter's local shard."""

    layout = "fsdp2"

    def __init__(self, group: Any, config: ShardingConfig, params: Sequence[torch.Tensor], names: Sequence[str],
                 specs: Sequence[ParamSpec]) -> None:
        super().__init__(group, config, params, specs)
        locals_ = [_local_tensor(p, n) for p, n in zip(self.params, names)]
        table = local_pieces(self.specs, self.layout, self.world_size, self.rank)
        for t, pc in zip(locals_, table):
            if tuple(t.shape) != pc.spec.shape:
                raise TypeError(
                    f"the local shard of {pc.spec.name.split('[')[0]!r} on rank {self.rank} has shape {tuple(t.shape)}, "
                    f"not the {pc.spec.shape} of FSDP2's even dim-0 cut; nearstep handles fully_shard's default sharding"
                )
        self.local_params = [_alias(t, p.requires_grad) for t, p in zip(locals_, self.params)]
        self.local_names = [pc.spec.name for pc in table]
        self.local_specs = tuple(pc.spec for pc in table)

    @torch.no_grad()
    def take_gradients(self) -> None:
        self.present = [p.grad is not None for p in self.params]
        for i, (p, alias) in enumerate(zip(self.params, self.local_params)):
            self._check_same_memory(i)
            alias.grad = None if p.grad is None else self._local_grad(p, alias)

    def _local_grad(self, p: torch.Tensor, alias: torch.Tensor) -> torch.Tensor:
        g = p.grad.to_local()  # type: ignore[union-attr]  # FSDP2 reduce-scattered and averaged it
        return g if g.dtype == alias.dtype and g.is_contiguous() else g.to(alias.dtype).contiguous()

    def _check_same_memory(self, i: int) -> None:
        local = self.params[i].to_local()  # type: ignore[attr-defined]
        alias = self.local_params[i]
        if local.numel() and (local.data_ptr() != alias.data_ptr() or local.shape != alias.shape):
            raise NearstepError(
                f"the local shard of parameter {self.local_names[i]!r} is no longer the tensor the optimizer was "
                f"given (model.load_state_dict(assign=True), model.to() or a re-shard replaced it). Build the "
                f"optimizer after those, on every rank."
            )

    def attach_forward_hooks(self, model: torch.nn.Module, pipeline: Pipeline) -> None:
        """Before FSDP2 all-gathers a module's parameters, land this rank's new shards of them."""
        from torch.distributed.fsdp import FSDPModule

        index = {id(p): i for i, p in enumerate(self.params)}
        slices_of: list[set[int]] = [set() for _ in self.params]
        for staged in pipeline.layout.slices:
            for seg in staged.segments:
                slices_of[seg.param].add(staged.index)
        for module in model.modules():
            if not isinstance(module, FSDPModule):
                continue
            members: set[int] = set()
            stack = [module]
            while stack:  # the parameters this FSDP2 module all-gathers: not those of nested ones
                m = stack.pop()
                members.update(index[id(p)] for p in m.parameters(recurse=False) if id(p) in index)
                stack.extend(c for c in m.children() if not isinstance(c, FSDPModule))
            own = tuple(sorted(set().union(*(slices_of[i] for i in members)))) if members else ()
            if own:
                land = _landing_hook(pipeline, own)
                # prepend: FSDP2's own pre-forward hook (the all-gather) must see the new shards.
                pipeline.add_handle(module.register_forward_pre_hook(lambda _m, _a, land=land: land(), prepend=True))

    def attach_grad_hooks(self, pipeline: Pipeline) -> None:
        for p, alias in zip(self.params, self.local_params):
            if p.requires_grad:
                pipeline.add_handle(p.register_post_accumulate_grad_hook(self._on_grad(pipeline, alias)))

    def _on_grad(self, pipeline: Pipeline, alias: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            # FSDP2 calls this after its reduce-scatter: the local gradient is final and averaged.
            alias.grad = self._local_grad(p, alias)
            pipeline.gradient_ready(alias)

        return hook


def _local_tensor(p: torch.Tensor, name: str) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        raise TypeError(
            f"parameter {name!r} is a plain tensor while others are DTensors. Under FSDP2 every parameter given to "
            f"the optimizer must be sharded: call fully_shard on the root module too."
        )
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise TypeError(
            f"parameter {name!r} is a DTensor placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; nearstep "
            f"handles FSDP2's 1-D dim-0 sharding (fully_shard on a 1-D mesh, without shard_placement_fn)."
        )
    with torch.no_grad():
        local = p.to_local()
    if local.numel() and not local.is_contiguous():
        raise TypeError(f"the local shard of {name!r} is not contiguous; nearstep updates flat contiguous memory")
    return local


def build_sharding(params: Sequence[torch.Tensor], names: Sequence[str], specs: Sequence[ParamSpec], *,
                   model: torch.nn.Module | None, process_group: Any, config: ShardingConfig | None) -> Sharding:
    """The sharding for this run: :class:`Unsharded` for a single process (no group given, none initialised).

    DTensor parameters mean FSDP2 (the local shards); otherwise pieces, with gradients
    averaged already when ``model`` is a ``DistributedDataParallel``.
    """
    config = ShardingConfig() if config is None else config
    if not isinstance(config, ShardingConfig):
        raise TypeError(f"sharding must be a nearstep.ShardingConfig or None, got {type(config).__name__}")
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return Unsharded(params, names, specs)
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        mesh = next(p for p in params if isinstance(p, DTensor)).device_mesh
        group = process_group if process_group is not None else mesh.get_group()
        return LocalShardSharding(group, config, params, names, specs)
    group = process_group if process_group is not None else dist.group.WORLD
    if config.gradients == "auto":
        from torch.nn.parallel import DistributedDataParallel

        averaged = isinstance(model, DistributedDataParallel)
    else:
        averaged = config.gradients == "averaged"
    return PieceSharding(group, config, params, names, specs, averaged=averaged)


def store_set_optimizer(store: str | os.PathLike, process_group: Any = None) -> str | None:
    """The optimizer kind a store set holds (for ``nearstep.resume``), or None on a single process.

    Collective: every rank reads its own store's manifest and all agree on the kind,
    so a rank whose store is missing still reaches the store-set check that names it.
    """
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    path = store_path_for(store, dist.get_rank(group), dist.get_world_size(group))
    try:
        kind = read_manifest(path).optimizer if (path / MANIFEST).exists() else None
    except NearstepError:
        kind = None  # the store-set check says what is wrong with it
    kinds: list[Any] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(kinds, kind, group=group)
    except RuntimeError as exc:
        raise CollectiveError(f"the ranks could not agree on the store set at {os.fspath(store)}: {exc}") from exc
    found = sorted({k for k in kinds if k})
    if not found:
        raise StoreError(
            f"no rank found a store under {os.fspath(store)} (this rank looked at {path}): there is nothing to resume. "
            f"To start a new store set there, construct the optimizer, e.g. nearstep.AdamW(params, store=...)."
        )
    return found[0]
