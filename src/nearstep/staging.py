"""Staging memory: what crosses the host link.

Gradients go in and new weights come out through one arena that both the host
and the device address: every slice's gradients, then every slice's weights,
in the model's dtype (about 4 bytes per parameter per step for bf16 models).
Host and device compute the same :class:`StagingLayout` from the manifest, so
only offsets travel with the requests. Within a slice's run, each segment's
place is the slice's image's business (:class:`nearstep.image.SliceImage`).
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
from dataclasses import dataclass

import torch

from . import aio
from .errors import StagingSpaceError
from .image import StagedSegment, staged_view
from .store import Manifest

__all__ = ["StagedSlice", "StagingLayout", "SharedMemory", "StagingSpaceError"]


@dataclass(frozen=True, slots=True)
class StagedSlice:
    """Where one slice's gradient run and weight run start in the arena (see :class:`SliceImage`)."""

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
        images = [manifest.image(spec.index) for spec in manifest.slices]
        grads_total = sum(image.staging_bytes for image in images)
        slices = []
        offset = 0
        for image in images:
            slices.append(StagedSlice(image.index, offset, grads_total + offset, image.staging_bytes, image.staged))
            offset += image.staging_bytes
        return cls(tuple(slices), max(2 * grads_total, aio.PAGE))

    def grad_view(self, arena: torch.Tensor, seg: StagedSegment, slice_: StagedSlice) -> torch.Tensor:
        return staged_view(arena, slice_.grad_offset, seg)

    def weight_view(self, arena: torch.Tensor, seg: StagedSegment, slice_: StagedSlice) -> torch.Tensor:
        return staged_view(arena, slice_.weight_offset, seg)


def _reserve(fd: int, nbytes: int, where: str) -> None:
    """Give the file ``nbytes`` of real pages now, or raise saying what to do.

    [Note: staging that does not fit /dev/shm]
    A file on tmpfs gets its pages when they are first touched. Sized with ftruncate
    alone, a staging arena larger than what /dev/shm has free (Docker gives containers
    64 MiB) maps fine, and the first write past the free space kills the writer with
    SIGBUS: the device dies with an empty stderr, mid-step. fallocate reserves the pages
    up front and fails with ENOSPC instead, while the optimizer is being built.
    """
    os.ftruncate(fd, nbytes)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return  # a file system without fallocate: sized by ftruncate, as before
        free = os.statvfs(where)
        raise StagingSpaceError(
            f"the staging memory (gradients and weights of one step, shared with the device process) needs "
            f"{nbytes / 2**20:.1f} MiB but {where} has {free.f_bavail * free.f_frsize / 2**20:.1f} MiB free. Give it "
            f"more (docker run --shm-size=2g; or mount -o remount,size=4G {where}), or put staging elsewhere with "
            f"DeviceConfig(staging_dir='/a/local/disk/dir') (slower: the page cache writes it back), or use smaller "
            f"steps (fewer trainable parameters per optimizer)."
        ) from None


class SharedMemory:
    """Page-aligned memory both the host and the device process map (a file on tmpfs).

    The creator makes the file; the other side maps it by path; the creator unlinks
    the name as soon as both have mapped it, so nothing is left behind after a crash.
    """

    def __init__(self, nbytes: int, path: str | None = None, *, directory: str | os.PathLike | None = None) -> None:
        """Make ``nbytes`` of shared memory (``path`` None) in ``directory`` (default ``/dev/shm``),
        or map the one at ``path`` that the other side made."""
        self.nbytes = aio.align_up(nbytes)
        if path is None:
            base = str(directory) if directory is not None else "/dev/shm" if os.path.isdir("/dev/shm") else None
            try:
                fd, path = tempfile.mkstemp(prefix="nearstep-", dir=base)
            except OSError as exc:
                raise StagingSpaceError(
                    f"cannot create the staging memory in {base or tempfile.gettempdir()}: {exc.strerror}. Pass "
                    f"DeviceConfig(staging_dir=...) a writable directory (a tmpfs, or a local disk)."
                ) from None
            try:
                _reserve(fd, self.nbytes, base or tempfile.gettempdir())
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
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
