"""Decoding and encoding a whole state file: :func:`views`, :func:`decode_`, :func:`encode_`.

Every step the device reads a slice's state file, takes typed views of its
regions (:func:`views`), decodes them into fp32 working tensors (the master
weights and one tensor per moment), runs the fp32 kernel
(:func:`nearstep.kernels.update_`), encodes the tensors back and writes the file.
Each state tensor goes through its format part's codec
(:attr:`StateFormat.master_codec <nearstep.formats.StateFormat.master_codec>` for
"master", :attr:`StateFormat.moment_codec <nearstep.formats.StateFormat.moment_codec>`
for the others); this module checks the arguments and dispatches.

:func:`encode_` overwrites the fp32 working tensors with exactly what the file
now holds, so the master weights posted to the model, the next step's input and
a resumed run all agree bit for bit. Stochastic rounding is a pure function of
``seed`` and the element index (:func:`~nearstep.formats.sr_noise`).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from . import native
from .chunks import Workspace
from .regions import MASTER, check_names, layout, per_block
from .spec import StateFormat

__all__ = ["views", "decode_", "encode_", "window", "SliceCoder"]


def views(fmt: StateFormat | str, buf: Tensor, state_names: Sequence[str], numel: int) -> dict[str, Tensor]:
    """Typed 1-D views of each region of ``fmt.regions(state_names, numel)`` into ``buf``.

    Args:
        buf: a contiguous 1-D uint8 tensor of at least ``fmt.file_bytes(...)`` bytes,
            usually the page-aligned buffer the state file is read into.

    Returns:
        ``{region name: view}``, e.g. ``"master"`` and ``"exp_avg.scale"``.
    """
    fmt = StateFormat.parse(fmt)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"views needs a contiguous 1-D uint8 buffer, got {buf.dtype} of shape {tuple(buf.shape)}")
    need = fmt.file_bytes(state_names, numel)
    if buf.numel() < need:
        raise ValueError(f"the buffer holds {buf.numel()} bytes but format {fmt.name!r} needs {need}")
    return {
        spec.name: buf.narrow(0, spec.offset, spec.nbytes).view(spec.dtype)
        for spec in fmt.regions(state_names, numel)
    }


def window(fmt: StateFormat | str, regions: Mapping[str, Tensor], state_names: Sequence[str], numel: int,
           start: int, stop: int) -> dict[str, Tensor]:
    """The views of ``regions`` (a file of ``numel`` elements, from :func:`views`) that hold elements
    ``[start, stop)``: a file of ``stop - start`` elements to :func:`decode_` and :func:`encode_`
    (with ``first=start``).

    With blocked moments (``fmt.block_aligned``) ``start`` must be a multiple of ``fmt.block``, and
    ``stop`` one too or ``numel``: a block's scale belongs to all its elements.
    """
    fmt = StateFormat.parse(fmt)
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"window [{start}, {stop}) is not within the file's {numel} elements")
    block = fmt.block if fmt.block_aligned else 1
    if start % block or (stop % block and stop != numel):
        raise ValueError(f"window [{start}, {stop}) of format {fmt.name!r} must start and end on its "
                         f"{block}-element blocks (or end at the file's end, {numel})")
    out = {}
    for name, _dtype, _count in layout(fmt.master_codec, fmt.moment_codec, check_names(state_names), numel):
        region = regions[name]
        out[name] = region[start // block : -(-stop // block)] if per_block(name) else region[start:stop]
    return out


class SliceCoder:
    """Decode and encode element ranges of one file image, with the argument checks done once.

    The device's pass calls it once per chunk (see [Note: one pass per chunk] in ``engine.py``), where
    :func:`decode_` and :func:`encode_`, which check every tensor of every call, would cost more than
    the native codecs themselves. Each range is :func:`window` of the file; numbers and bytes are
    those of :func:`decode_` / :func:`encode_` over the whole file.

    Whether the native codecs serve it is decided when it is made (``native.disabled()`` around
    the construction gives the torch codecs).

    Args:
        regions: the views of :func:`views` of a file of ``numel`` elements.
        work: per state name, a contiguous 1-D float32 tensor of ``numel`` elements (the working state).
    """

    __slots__ = ("fmt", "names", "numel", "block", "regions", "work", "workspace", "_parts", "packed", "adam")

    def __init__(self, fmt: StateFormat | str, regions: Mapping[str, Tensor], state_names: Sequence[str],
                 work: Sequence[Tensor], numel: int, workspace: Workspace | None = None) -> None:
        self.fmt = StateFormat.parse(fmt)
        self.names = check_names(state_names)
        self.numel = int(numel)
        self.work = dict(zip(self.names, work))
        _check_fp32("work", self.work, self.names)
        _check_regions(self.fmt, regions, self.names, self.numel)
        self.block = self.fmt.block if self.fmt.block_aligned else 1
        self.regions = regions
        self.workspace = workspace or Workspace()
        master, moments = self.fmt.master_codec, self.fmt.moment_codec
        self._parts = []
        #: per state name, whether its working copy is separate memory (decoded there, a chunk at a
        #: time packed at the start, see :meth:`decode`'s ``at``); False where it is the file's own
        #: fp32 region, which decode and encode then leave alone.
        self.packed = {}
        for name in self.names:
            codec = master if name == MASTER else moments
            in_place = codec.identity and self.work[name].data_ptr() == regions[name].data_ptr()
            self.packed[name] = not in_place
            if not in_place:
                self._parts.append((name, codec, [(r, per_block(r)) for r, _d, _c in codec.layout(name, 1)],
                                    native.plan(codec, name, regions), self.work[name].data_ptr()))
        #: the fused Adam pass over this file (see [Note: Adam in the codecs' pass] in native.c), or None
        self.adam = native.adam_pass(master, moments, regions, self.names) if self._parts else None

    def span(self, start: int, stop: int) -> tuple[int, int]:
        """``[start, stop)`` widened to whole blocks (and cut at the file's end)."""
        b = self.block
        return start - start % b, min(-(-stop // b) * b, self.numel)

    def _window(self, regions: list[tuple[str, bool]], start: int, stop: int) -> dict[str, Tensor]:
        b = self.block
        return {r: self.regions[r][start // b : -(-stop // b)] if blocked else self.regions[r][start:stop]
                for r, blocked in regions}

    def decode(self, start: int, stop: int, at: int | None = None, workspace: Workspace | None = None) -> None:
        """Decode elements ``[start, stop)`` (whole blocks, see :meth:`span`) into the working state,
        at the same elements, or from element ``at`` on."""
        at = start if at is None else at
        for name, codec, regions, plan, work in self._parts:
            if plan is not None:
                plan.decode(start, stop - start, work + 4 * at)
                continue
            part, out = self._window(regions, start, stop), self.work[name][at : at + stop - start]
            codec.decode(name, part, out, workspace or self.workspace)

    def decode_master(self, start: int, stop: int, out: Tensor) -> None:
        """Decode the master weights ``[start, stop)`` (any range: the master has no blocks) into ``out``."""
        if not self.packed[MASTER]:
            out.copy_(self.work[MASTER][start:stop])
            return
        name, codec, regions, plan, _work = self._parts[0]
        if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != stop - start:
            raise ValueError(f"out must be a contiguous float32 tensor of {stop - start} elements")
        if plan is not None:
            plan.decode(start, stop - start, out.data_ptr())
            return
        codec.decode(name, {r: self.regions[r][start:stop] for r, _blocked in regions}, out, self.workspace)

    def encode_(self, start: int, stop: int, seed: int, at: int | None = None,
                workspace: Workspace | None = None) -> None:
        """Encode elements ``[start, stop)`` of the file from the working state at the same elements
        (or from element ``at`` on); the master there becomes what was stored (the moments' fp32
        copies are left as they were, as ``decode_moments=False``).

        Calls on disjoint ranges (and working areas) may run at once from several threads, each
        with its own ``workspace`` (the torch codecs' scratch; the native ones need none)."""
        at = start if at is None else at
        for name, codec, regions, plan, work in self._parts:
            if plan is not None:
                plan.encode(start, stop - start, work + 4 * at, seed)
                continue
            part, values = self._window(regions, start, stop), self.work[name][at : at + stop - start]
            if name == MASTER:
                codec.encode_(name, values, part, seed, workspace or self.workspace, first=start)
            else:
                codec.encode_(name, values, part, workspace or self.workspace, write_back=False)


def decode_(
    fmt: StateFormat | str,
    regions: Mapping[str, Tensor],
    state_names: Sequence[str],
    out: Mapping[str, Tensor],
    *,
    workspace: Workspace | None = None,
) -> None:
    """Fill the fp32 tensors ``out[name]`` from the region views of a state file.

    Args:
        regions: the views of :func:`views` (or any tensors of the same dtypes and sizes).
        state_names: the state's tensors, as given to :meth:`StateFormat.regions`.
        out: for each name, a contiguous 1-D float32 tensor of n elements.
        workspace: scratch to reuse across calls (see :class:`~nearstep.formats.Workspace`).
    """
    fmt = StateFormat.parse(fmt)
    names = check_names(state_names)
    numel = _check_fp32("out", out, names)
    _check_regions(fmt, regions, names, numel)
    workspace = workspace or Workspace()
    master, moments = fmt.master_codec, fmt.moment_codec
    for name in names:
        codec = master if name == MASTER else moments
        if not native.decode(codec, name, regions, out[name]):
            codec.decode(name, regions, out[name], workspace)


def encode_(
    fmt: StateFormat | str,
    values: Mapping[str, Tensor],
    state_names: Sequence[str],
    regions: Mapping[str, Tensor],
    seed: int,
    *,
    workspace: Workspace | None = None,
    decode_moments: bool = True,
    first: int = 0,
) -> None:
    """Encode the fp32 tensors ``values`` into the regions, and replace each by what was stored.

    Afterwards ``values[name]`` equals, bit for bit, what :func:`decode_` would read
    back from ``regions``.

    Args:
        values: for each name, a contiguous 1-D float32 tensor of n elements;
            overwritten in place with the representable (decoded) values.
        regions: the views of :func:`views`.
        seed: drives stochastic rounding; the same seed and values give the same
            bits. The engine derives it from the store, step and slice.
        workspace: scratch to reuse across calls (see :class:`~nearstep.formats.Workspace`).
        decode_moments: False leaves 8-bit moments' ``values`` as they were (the
            master is always replaced). A caller that decodes the moments afresh
            before it reads them again saves a pass (~0.5 ns per element).
        first: the element of the slice that ``values[...][0]`` is, when the regions are a
            :func:`window` of a larger file: stochastic rounding depends on each element's
            index in the slice, so a window encodes exactly as the whole file would.
    """
    fmt = StateFormat.parse(fmt)
    names = check_names(state_names)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r})")
    if isinstance(first, bool) or not isinstance(first, numbers.Integral) or first < 0:
        raise ValueError(f"first must be an int >= 0, got {first!r}")
    numel = _check_fp32("values", values, names)
    _check_regions(fmt, regions, names, numel)
    workspace = workspace or Workspace()
    master, moments = fmt.master_codec, fmt.moment_codec
    for name in names:
        if name == MASTER:
            if not native.encode_(master, name, values[name], regions, seed=int(seed), first=first):
                master.encode_(name, values[name], regions, int(seed), workspace, first=first)
        elif not native.encode_(moments, name, values[name], regions, write_back=decode_moments):
            moments.encode_(name, values[name], regions, workspace, write_back=decode_moments)


def _check_fp32(what: str, tensors: Mapping[str, Tensor], names: tuple[str, ...]) -> int:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{what} lacks the state tensors {missing}")
    numel = tensors[names[0]].numel()
    for name in names:
        t = tensors[name]
        if t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(
                f"{what}[{name!r}] must be a contiguous 1-D float32 CPU tensor, got {t.dtype} "
                f"of shape {tuple(t.shape)} on {t.device}"
            )
        if t.numel() != numel:
            raise ValueError(f"{what}[{name!r}] has {t.numel()} elements but {what}[{names[0]!r}] has {numel}")
    return numel


def _check_regions(fmt: StateFormat, regions: Mapping[str, Tensor], names: tuple[str, ...], numel: int) -> None:
    for name, dtype, count in layout(fmt.master_codec, fmt.moment_codec, names, numel):
        region = regions.get(name)
        if region is None:
            raise ValueError(f"format {fmt.name!r} needs a region {name!r}; build the regions with formats.views")
        if region.dtype != dtype or region.shape != (count,) or not region.is_contiguous():
            raise ValueError(
                f"region {name!r} of format {fmt.name!r} must be a contiguous {dtype} tensor of {count} elements, "
                f"got {region.dtype} of shape {tuple(region.shape)}"
            )
