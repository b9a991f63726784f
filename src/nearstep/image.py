"""A slice's image: where its state lies in its file, in the device's slot and in staging.

One slice (see ``store.py``) has three images, all computed here from the same
four facts (its segments, their parameters' dtypes, the state names and the
state format), so that the store's tools, the engine and the host agree on
every offset without sending any:

- **on disk**: the slice's state file, one region per encoded tensor (master
  weights, then each moment, each starting on a page: :mod:`nearstep.formats`),
  over ``extent`` elements in which segment ``j`` starts at ``starts[j]``;
- **in the slot**: the file image as read, then (for a compressed format) the
  decoded fp32 state the kernel works on, then an fp32 gradient scratch area
  (see [Note: slot layout]);
- **in staging**: the slice's gradients and new weights in the model's dtype,
  one 64-byte-aligned run per segment (``StagingLayout`` in ``staging.py``
  places the slices' runs in the arena).

The codec of the store's format is reached through the image too
(:meth:`SliceImage.decode`, :meth:`SliceImage.encode`,
:meth:`SliceImage.coder`, which the device's pass decodes and encodes ranges with).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import aio, formats

__all__ = ["StagedSegment", "SliceImage", "staged_view", "slot_count", "STAGE_ALIGN", "TORCH_DTYPES", "SLOT_MARGIN_BYTES"]

STAGE_ALIGN = 64  # bytes: each segment's run in staging starts on a cache line
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class StagedSegment:
    """Where one segment's gradient and new weights sit in staging memory (model dtype)."""

    param: int
    start: int
    length: int
    group: int
    dtype: str
    offset: int  # bytes from the start of the slice's gradient (or weight) region


@dataclass(frozen=True, slots=True)
class SliceImage:
    """The layout of one slice on disk, in a device slot and in staging, and its format's codec.

    Attributes:
        index: the slice's index in the store.
        format: the store's state format.
        state_names: the state kept per element, ``master`` first.
        extent: elements of each state tensor in the file (the segments plus block padding).
        starts: where each segment starts within ``extent``.
        lengths: each segment's length.
        regions: the file's typed regions (``formats.RegionSpec``), in file order.
        file_bytes: size of the state file (page-aligned, at least one page).
        region_bytes: bytes of one fp32 working region in the slot (``extent`` floats, page-aligned).
        work_regions: fp32 regions the slot holds past the file image: one per state tensor that the
            format compresses (decoded there); none for an fp32 part, worked on in the file image.
        slot_bytes: bytes of a slot that holds this slice: file image, working regions, gradient scratch.
        staged: per segment, where its gradient and weights sit in the slice's staging runs.
        staging_bytes: bytes of the slice's gradient run (and of its weight run) in staging.
    """

    index: int
    format: formats.StateFormat
    state_names: tuple[str, ...]
    extent: int
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    regions: tuple[formats.RegionSpec, ...]
    file_bytes: int
    region_bytes: int
    work_regions: int
    slot_bytes: int
    staged: tuple[StagedSegment, ...]
    staging_bytes: int

    @staticmethod
    def build(index: int, segments: Sequence[tuple[int, int, int, int, str]], fmt: formats.StateFormat,
              state_names: Sequence[str]) -> SliceImage:
        """The image of a slice whose segments are ``(param, start, length, group, dtype name)``."""
        return _build(index, tuple(tuple(s) for s in segments), fmt, tuple(state_names))

    # -- on disk ---------------------------------------------------------------

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        """Per segment, its ``(first, stop)`` elements within ``extent``."""
        return tuple((a, a + n) for a, n in zip(self.starts, self.lengths))

    def views(self, buf: aio.AlignedBuffer) -> dict[str, torch.Tensor]:
        """Typed views of the file's regions in ``buf``, which holds the file image from byte 0."""
        return formats.views(self.format, buf.tensor(torch.uint8, 0, self.file_bytes), self.state_names, self.extent)

    @property
    def block(self) -> int:
        """Elements per quantisation block (1 for formats without blocks): the pass's chunks end on them."""
        return self.format.block if self.format.block_aligned else 1

    def crc_spans(self) -> list[tuple[int, int, int, int]]:
        """The file regions' data as ``(first byte, end, itemsize, per)`` in the file image: one
        ``itemsize``-byte value per ``per`` elements (for the pass checksums, ``engine.checked_pass``)."""
        return [(r.offset, r.end, r.dtype.itemsize, self.block if formats.per_block(r.name) else 1)
                for r in self.regions]

    def coder(self, slot: aio.AlignedBuffer, work: list[torch.Tensor],
              workspace: formats.Workspace) -> formats.SliceCoder:
        """Decodes and encodes element ranges of the file image in the slot to and from ``work``."""
        return formats.SliceCoder(self.format, self.views(slot), self.state_names, work, self.extent, workspace)

    def decode(self, buf: aio.AlignedBuffer) -> dict[str, torch.Tensor]:
        """Fresh fp32 tensors, one per state name, of the slice's elements in segment order,
        from the file image in ``buf``."""
        coded = self.views(buf)
        if self.format.is_identity:
            return {name: coded[name].clone() for name in self.state_names}
        laid_out = {name: torch.empty(self.extent, dtype=torch.float32) for name in self.state_names}
        formats.decode_(self.format, coded, self.state_names, laid_out)
        return {name: self._gather(t) for name, t in laid_out.items()}

    def encode(self, values: dict[str, torch.Tensor], buf: aio.AlignedBuffer, seed: int) -> None:
        """Write fp32 ``values`` (one per state name, the slice's elements in segment order) as the
        file image into ``buf``. ``values`` become what the store holds (lossy formats round them in place)."""
        coded = self.views(buf)
        if self.format.is_identity:
            for name in self.state_names:
                coded[name].copy_(values[name])
            return
        # Padding between segments stays zero: zeros encode exactly and never change.
        laid_out = {name: torch.zeros(self.extent, dtype=torch.float32) for name in self.state_names}
        for name, t in laid_out.items():
            offset = 0
            for (a, b) in self.bounds:
                t[a:b] = values[name][offset : offset + b - a]
                offset += b - a
        formats.encode_(self.format, laid_out, self.state_names, coded, seed)
        for name, t in laid_out.items():
            values[name].copy_(self._gather(t))

    def _gather(self, laid_out: torch.Tensor) -> torch.Tensor:
        return torch.cat([laid_out[a:b] for a, b in self.bounds]) if self.bounds else laid_out[:0].clone()

    # -- in the slot -----------------------------------------------------------

    def work(self, slot: aio.AlignedBuffer) -> list[torch.Tensor]:
        """The fp32 state the kernel updates, one tensor of ``extent`` elements per state name.

        [Note: slot layout] A slot holds the slice's file image as read from the store,
        then (for a compressed state format) the decoded fp32 state the kernel works
        on, then an fp32 gradient scratch area. For fp32 state the kernel works on the
        file image itself. A state tensor whose format part is fp32 (the master of ``8bit``, the moments of
        ``bf16-sr``) is worked on in the file image too; only the others get a working
        region, in state order.
        """
        if self.format.is_identity:
            return [slot.tensor(torch.float32, r * self.region_bytes, self.extent) for r in range(len(self.state_names))]
        by_name = {region.name: region for region in self.regions}
        out, k = [], 0
        for name in self.state_names:
            if _plain(self.format, name):
                out.append(slot.tensor(torch.float32, by_name[name].offset, self.extent))
            else:
                out.append(slot.tensor(torch.float32, self.file_bytes + k * self.region_bytes, self.extent))
                k += 1
        return out

    def scratch(self, slot: aio.AlignedBuffer) -> torch.Tensor:
        """The fp32 gradient scratch area of the slot (``extent`` elements)."""
        return slot.tensor(torch.float32, self.file_bytes + self.work_regions * self.region_bytes, self.extent)


def _plain(fmt: formats.StateFormat, name: str) -> bool:
    """Whether state tensor ``name`` is stored as plain fp32 (its region is its working copy)."""
    return (fmt.master_codec if name == formats.regions.MASTER else fmt.moment_codec).identity


def staged_view(arena: torch.Tensor, offset: int, seg: StagedSegment) -> torch.Tensor:
    """Segment ``seg``'s run in the uint8 staging ``arena``, where its slice's run starts at ``offset``."""
    dtype = TORCH_DTYPES[seg.dtype]
    start = offset + seg.offset
    return arena[start : start + seg.length * dtype.itemsize].view(dtype)


@functools.lru_cache(maxsize=8192)
def _build(index: int, segments: tuple[tuple[int, int, int, int, str], ...], fmt: formats.StateFormat,
           state_names: tuple[str, ...]) -> SliceImage:
    # [Note: quantisation blocks per parameter]
    # 8-bit moments share one scale per block. A block that held the tail of one
    # parameter and the head of the next would let the larger one's values set the
    # smaller one's scale, and re-encode a frozen parameter's moments (no gradient,
    # so no update) with a scale its neighbour just changed, drifting them step by
    # step. With 8-bit moments every segment therefore starts on a block boundary;
    # the few padding elements are zeros, which encode exactly and never change.
    # Other formats have no blocks and no padding.
    starts, end = [], 0
    staged, offset = [], 0
    for param, start, length, group, dtype in segments:
        if fmt.block_aligned:
            end = -(-end // fmt.block) * fmt.block
        starts.append(end)
        end += length
        staged.append(StagedSegment(param, start, length, group, dtype, offset))
        offset = aio.align_up(offset + length * TORCH_DTYPES[dtype].itemsize, STAGE_ALIGN)
    file_bytes = fmt.file_bytes(state_names, end)
    region_bytes = aio.align_up(end * 4)
    work_regions = sum(not _plain(fmt, name) for name in state_names)
    return SliceImage(
        index=index, format=fmt, state_names=state_names, extent=end, starts=tuple(starts),
        lengths=tuple(s[2] for s in segments), regions=fmt.regions(state_names, end), file_bytes=file_bytes,
        region_bytes=region_bytes, work_regions=work_regions,
        slot_bytes=file_bytes + (work_regions + 1) * region_bytes,
        staged=tuple(staged), staging_bytes=aio.align_up(max(offset, 1)),
    )


# Device memory that is not slots: the guards' block scratch, I/O bookkeeping, thread stacks.
SLOT_MARGIN_BYTES = 16 << 20


def slot_count(memory_budget: int, slot_bytes: int, *, store_exists: bool = True) -> int:
    """How many slots of ``slot_bytes`` a device with ``memory_budget`` bytes has; raises
    ValueError saying what to do when not even one fits.

    Slots get the budget less a margin for what else the engine allocates while it works
    (the guards' block scratch, I/O bookkeeping, thread stacks). ``store_exists``: the
    slices are a store's already (a resumed run), so ``slice_mb`` can no longer change them.
    """
    margin = max(SLOT_MARGIN_BYTES, memory_budget // 32)
    slots = max(memory_budget - margin, 0) // slot_bytes
    if slots < 1:
        need = slot_bytes + margin
        todo = (f"Raise memory_budget to at least {_mib(need)}. The store keeps the slices it was made with "
                f"(slice_mb shapes new stores only); to cut it finer, start a new store with a smaller slice_mb."
                if store_exists else f"Raise memory_budget to at least {_mib(need)}, or make slices smaller (slice_mb).")
        raise ValueError(
            f"memory_budget of {_mib(memory_budget)} cannot hold one slice's working set ({_mib(slot_bytes)}: its "
            f"state plus a gradient scratch area) and a {_mib(margin)} margin. {todo}"
        )
    return slots


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MiB"
