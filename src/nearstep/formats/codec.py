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

from .chunks import Workspace
from .regions import MASTER, check_names, layout
from .spec import StateFormat

__all__ = ["views", "decode_", "encode_"]


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
    """
    fmt = StateFormat.parse(fmt)
    names = check_names(state_names)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r})")
    numel = _check_fp32("values", values, names)
    _check_regions(fmt, regions, names, numel)
    workspace = workspace or Workspace()
    master, moments = fmt.master_codec, fmt.moment_codec
    for name in names:
        if name == MASTER:
            master.encode_(name, values[name], regions, int(seed), workspace)
        else:
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
