"""The chunks the codecs work in, and the scratch buffers a chunk needs (:class:`Workspace`).

The lowest module of the package: the codecs (``master``, ``moments``) import it,
and it imports none of them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["CHUNK", "MIN_BLOCK", "MAX_BLOCK", "Workspace", "spans", "block_spans", "copy_"]

# [Note: formats work in chunks]
# Encoding takes ~10 elementwise passes. Run over a whole slice, each pass would
# stream the slice through memory again; run over chunks of CHUNK elements, the
# chunk and its scratch (~1 MiB) stay in L2 across the passes. Chunks hold whole
# blocks (CHUNK is a multiple of every allowed block size), and every number is
# the same whatever the chunk size: rounding is elementwise and the noise is a
# function of the element's index in the slice.
CHUNK = 1 << 16
# The block sizes of 8-bit moments a chunk holds whole (StateFormat checks a format's
# block against them); the smallest one sets how many block scales a chunk can hold.
MIN_BLOCK, MAX_BLOCK = 32, 1 << 16

# Every reader below looks CHUNK up when it runs, not when it is imported, so that
# a test can set a smaller chunk (nearstep.formats.chunks.CHUNK) and check that no
# bit changes.


class Workspace:
    """Chunk-sized scratch buffers for :func:`~nearstep.formats.encode_` and :func:`~nearstep.formats.decode_`.

    About 1 MiB, allocated on first use. Pass the same workspace to every call of
    one thread to avoid allocating (and faulting in) fresh pages per call; never
    share one between threads.
    """

    __slots__ = ("_buffers",)

    def __init__(self) -> None:
        self._buffers: tuple[Tensor, ...] | None = None

    def buffers(self) -> tuple[Tensor, ...]:
        """float32, float32, int32, int32, int16 [chunk] and float32 [blocks per chunk]."""
        if self._buffers is None:
            self._buffers = (
                torch.empty(CHUNK), torch.empty(CHUNK),
                torch.empty(CHUNK, dtype=torch.int32), torch.empty(CHUNK, dtype=torch.int32),
                torch.empty(CHUNK, dtype=torch.int16), torch.empty(CHUNK // MIN_BLOCK),
            )
        return self._buffers


def spans(numel: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each chunk of ``numel`` elements."""
    for start in range(0, numel, CHUNK):
        yield start, min(start + CHUNK, numel)


def block_spans(numel: int, block: int) -> Iterator[tuple[int, int, int]]:
    """(start, stop, blocks): chunks of whole blocks, then the last, partial block on its own."""
    whole = numel - numel % block
    for start in range(0, whole, CHUNK):
        stop = min(start + CHUNK, whole)
        yield start, stop, (stop - start) // block
    if whole < numel:
        yield whole, numel, 1


def copy_(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)``, skipped where both are the same memory (fp32 regions used in place)."""
    if dst.data_ptr() != src.data_ptr():
        dst.copy_(src)
