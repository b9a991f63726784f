"""The region layout of a state file: which typed regions it holds, in which order, at which offsets.

A state file holds, in ``state_names`` order, the regions of each state tensor
("master" for the master weights, every other name a moment), each starting on a
page boundary. Which regions a tensor needs (their names, dtypes and element
counts) is its codec's business (:meth:`MasterCodec.layout
<nearstep.formats.master.MasterCodec.layout>`, :meth:`MomentCodec.layout
<nearstep.formats.moments.MomentCodec.layout>`); this module names the state
tensors and places the regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from nearstep.aio import PAGE, align_up

from .master import MasterCodec
from .moments import MomentCodec

__all__ = ["MASTER", "RegionSpec", "check_names", "layout", "place", "per_block"]

MASTER = "master"  # the state name of the master weights; every other state name is a moment


class RegionSpec(NamedTuple):
    """One typed region of a state file: ``count`` elements of ``dtype`` at byte ``offset``."""

    name: str
    dtype: torch.dtype
    count: int
    offset: int

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def check_names(state_names: Sequence[str]) -> tuple[str, ...]:
    """``state_names`` as a tuple, checked: non-empty, distinct names without '.' (region suffixes use it)."""
    if isinstance(state_names, str) or not isinstance(state_names, Sequence):
        raise TypeError(f"state_names must be a sequence of names, got {state_names!r}")
    names = tuple(state_names)
    if not names:
        raise ValueError("state_names is empty; a state file holds at least one tensor")
    for name in names:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"state names are non-empty strings without '.', got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"state names must be distinct, got {list(names)}")
    return names


def layout(
    master: MasterCodec, moments: MomentCodec, names: tuple[str, ...], numel: int
) -> list[tuple[str, torch.dtype, int]]:
    """(region name, dtype, count) of every region, in file order: each state tensor's codec's regions."""
    entries: list[tuple[str, torch.dtype, int]] = []
    for name in names:
        entries.extend(master.layout(name, numel) if name == MASTER else moments.layout(name, numel))
    return entries


def place(entries: Sequence[tuple[str, torch.dtype, int]]) -> tuple[RegionSpec, ...]:
    """The regions of ``entries`` one after another, each starting on a page boundary."""
    specs, offset = [], 0
    for name, dtype, count in entries:
        specs.append(RegionSpec(name, dtype, count, offset))
        offset = align_up(offset + count * dtype.itemsize, PAGE)
    return tuple(specs)


def per_block(region: str) -> bool:
    """True for a region holding one value per block of elements (named ``<name>.scale``, as the
    blocked moment codecs name their scales); every other region holds one value per element."""
    return region.endswith(".scale")
