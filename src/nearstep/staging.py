"""Staging memory: what crosses the host link.

Gradients go in and new weights come out through one arena that both the host
and the device address: every slice's gradients, then every slice's weights,
in the model's dtype (about 4 bytes per parameter per step for bf16 models).
Host and device compute the same :class:`StagingLayout` from the manifest, so
only offsets travel with the requests.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass

import torch

from . import aio
from .store import Manifest

__all__ = ["StagedSegment", "StagedSlice", "StagingLayout", "SharedMemory"]

_STAGE_ALIGN = 64


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
class StagedSlice:
    index: int
    grad_offset: int
    weight_offset: int
    nbytes: int
    segments: tuple[StagedSegment, ...]


@dataclass(frozen=True, slots=True)
class StagingLayout:
    """The layout of the staging arena: every slice's gradients, then every slice's weights.

    Host and device compute it from the same manifest, so only offsets travel.
    """

    slices: tuple[StagedSlice, ...]
    nbytes: int

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> StagingLayout:
        sizes = []
        seg_tables = []
        for spec in manifest.slices:
            offset = 0
            segs = []
            for seg in spec.segments:
                p = manifest.params[seg.param]
                segs.append(StagedSegment(seg.param, seg.start, seg.length, p.group, p.dtype, offset))
                offset = aio.align_up(offset + seg.length * p.torch_dtype.itemsize, _STAGE_ALIGN)
            sizes.append(aio.align_up(max(offset, 1)))
            seg_tables.append(tuple(segs))
        grads_total = sum(sizes)
        slices = []
        offset = 0
        for spec, size, segs in zip(manifest.slices, sizes, seg_tables):
            slices.append(StagedSlice(spec.index, offset, grads_total + offset, size, segs))
            offset += size
        return cls(tuple(slices), max(2 * grads_total, aio.PAGE))

    def grad_view(self, arena: torch.Tensor, seg: StagedSegment, slice_: StagedSlice) -> torch.Tensor:
        return _typed_view(arena, slice_.grad_offset + seg.offset, seg)

    def weight_view(self, arena: torch.Tensor, seg: StagedSegment, slice_: StagedSlice) -> torch.Tensor:
        return _typed_view(arena, slice_.weight_offset + seg.offset, seg)


def _typed_view(arena: torch.Tensor, offset: int, seg: StagedSegment) -> torch.Tensor:
    dtype = _TORCH_DTYPES[seg.dtype]
    nbytes = seg.length * dtype.itemsize
    return arena[offset : offset + nbytes].view(dtype)


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SharedMemory:
    """Page-aligned memory both the host and the device process map (a file on tmpfs).

    The creator makes the file; the other side maps it by path; the creator unlinks
    the name as soon as both have mapped it, so nothing is left behind after a crash.
    """

    def __init__(self, nbytes: int, path: str | None = None) -> None:
        self.nbytes = aio.align_up(nbytes)
        if path is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, path = tempfile.mkstemp(prefix="nearstep-", dir=base)
            os.ftruncate(fd, self.nbytes)
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, self.nbytes)
        finally:
            os.close(fd)
        self.path = path
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.bytes = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:
            pass  # views still alive; the mapping goes with them
