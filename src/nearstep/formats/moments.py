"""The moment codecs: how a state file stores each moment (Adam's ``exp_avg``, ``exp_avg_sq``, ...).

One :class:`MomentCodec` per moments part of a :class:`~nearstep.formats.StateFormat`:

* ``"fp32"`` (:class:`Fp32Moments`): the fp32 tensor itself.
* ``"8bit"`` (:class:`Int8Moments`): one byte per element plus one fp32 scale
  (the absolute maximum, at least 2**-100) per block of ``block`` elements, as in
  the block-wise 8-bit optimizers of Dettmers et al. 2022 ("8-bit Optimizers via
  Block-wise Quantization"). Moments named ``*_sq`` (Adam's second moment) are
  non-negative and use an unsigned map, the others a signed one. The maps
  (``qmap``, ``"dynamic"`` or ``"linear"``) are in :mod:`nearstep.formats.maps`.

Second moments never decode to 0 unless they are 0: a non-zero value below the
smallest code rounds *up* to it (with either map). Adam divides by
``sqrt(v) + eps``; a tiny ``v`` that collapsed to 0 while the same element's
first moment survived (its map has less range to cover) would blow the update
up to ``m / eps``. Rounded up, it can only shrink that element's update.

Rounding to nearest has a cost on slow averages: Adam's ``v`` changes by ~0.1%
a step (beta2 = 0.999), less than half a code step, so a stored ``v`` moves only
with its block's scale or a large gradient. In a 300-step AdamW test
(``tests/test_formats.py``) the dynamic map's ``v`` ends ~20% off fp32's
(median) and the weights' drift ~7%; the linear map, finer near the block
maximum, ~4% and ~1.5%.

Non-finite values: moments must be finite: a block holding an inf or nan stores a
non-finite scale and decodes as non-finite throughout.

A codec knows nothing of formats: it is given its qmap and block, the region name
and the tensors, and works through the chunks of :mod:`nearstep.formats.chunks`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .chunks import MAX_BLOCK, MIN_BLOCK, Workspace, block_spans, copy_
from .maps import QMAPS, SCALE_FLOOR, UNSIGNED_NORM, dynamic_codes

__all__ = ["MomentCodec", "Fp32Moments", "Int8Moments"]


class MomentCodec(abc.ABC):
    """The moments part of a state format: each moment's regions, their decoding and encoding.

    Attributes:
        identity: a moment's region is the fp32 tensor itself (the engine may work in it in place).
        block_aligned: moments are quantised in blocks of ``block`` elements, so each
            parameter's segment of a slice must start on a block boundary (see
            [Note: quantisation blocks per parameter] in ``nearstep.image``).
    """

    __slots__ = ()

    identity: ClassVar[bool]
    block_aligned: ClassVar[bool]

    @property
    @abc.abstractmethod
    def bytes_per_element(self) -> float:
        """Bytes of the state file per element of one moment (page padding left out)."""

    @abc.abstractmethod
    def layout(self, name: str, numel: int) -> tuple[tuple[str, torch.dtype, int], ...]:
        """The regions holding moment ``name`` of ``numel`` elements: (region name, dtype, count) each."""

    @abc.abstractmethod
    def decode(self, name: str, regions: Mapping[str, Tensor], out: Tensor, workspace: Workspace) -> None:
        """Fill the fp32 tensor ``out`` from the regions of :meth:`layout`."""

    @abc.abstractmethod
    def encode_(
        self, name: str, values: Tensor, regions: Mapping[str, Tensor], workspace: Workspace, *, write_back: bool
    ) -> None:
        """Store the fp32 ``values`` in the regions; with ``write_back``, replace them by what was stored."""


@dataclass(frozen=True, slots=True)
class Fp32Moments(MomentCodec):
    """Plain fp32: decoding and encoding are copies (none where the region is the tensor)."""

    identity: ClassVar[bool] = True
    block_aligned: ClassVar[bool] = False

    @property
    def bytes_per_element(self) -> float:
        return 4.0

    def layout(self, name: str, numel: int) -> tuple[tuple[str, torch.dtype, int], ...]:
        return ((name, torch.float32, numel),)

    def decode(self, name: str, regions: Mapping[str, Tensor], out: Tensor, workspace: Workspace) -> None:
        copy_(out, regions[name])

    def encode_(
        self, name: str, values: Tensor, regions: Mapping[str, Tensor], workspace: Workspace, *, write_back: bool
    ) -> None:
        copy_(regions[name], values)  # fp32 is exact: values already are what was stored


@dataclass(frozen=True, slots=True)
class Int8Moments(MomentCodec):
    """Block-wise 8-bit codes: ``<name>`` (uint8, one code per element) and ``<name>.scale`` (fp32, one per block).

    Attributes:
        qmap: ``"dynamic"`` or ``"linear"`` (see :mod:`nearstep.formats.maps`).
        block: elements per block, a power of two in [32, 65536] (the format checks it).
    """

    identity: ClassVar[bool] = False
    block_aligned: ClassVar[bool] = True

    qmap: str
    block: int

    def __post_init__(self) -> None:
        # StateFormat validates with its own messages; this guards direct construction.
        if self.qmap not in QMAPS:
            raise ValueError(f"qmap must be one of {list(QMAPS)}, got {self.qmap!r}")
        if not (MIN_BLOCK <= self.block <= MAX_BLOCK and self.block & (self.block - 1) == 0):
            raise ValueError(f"block must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {self.block!r}")

    @property
    def bytes_per_element(self) -> float:
        return 1.0 + 4.0 / self.block

    def layout(self, name: str, numel: int) -> tuple[tuple[str, torch.dtype, int], ...]:
        return ((name, torch.uint8, numel), (name + ".scale", torch.float32, -(-numel // self.block)))

    def decode(self, name: str, regions: Mapping[str, Tensor], out: Tensor, workspace: Workspace) -> None:
        unsigned, codes, scale = _unsigned(name), regions[name], regions[name + ".scale"]
        buffers = workspace.buffers()
        for start, stop, blocks in block_spans(out.numel(), self.block):
            first = start // self.block
            scales = scale[first : first + blocks]
            self._decode_chunk(unsigned, codes[start:stop], scales, out[start:stop], buffers[4], buffers[5])

    def encode_(
        self, name: str, values: Tensor, regions: Mapping[str, Tensor], workspace: Workspace, *, write_back: bool
    ) -> None:
        unsigned, codes, scale = _unsigned(name), regions[name], regions[name + ".scale"]
        work_buf, round_buf, index_buf, _, half_buf, factor_buf = workspace.buffers()
        dynamic = self.qmap == "dynamic"
        if dynamic:
            norm = UNSIGNED_NORM if unsigned else 1.0
        else:
            norm = 255.0 if unsigned else 127.0
        typed = codes if (unsigned or dynamic) else codes.view(torch.int8)
        for start, stop, blocks in block_spans(values.numel(), self.block):
            length = stop - start
            chunk, work = values[start:stop], work_buf[:length]
            first = start // self.block
            scales, factor = scale[first : first + blocks], factor_buf[:blocks]
            work_rows = work.view(blocks, -1)

            if unsigned:
                torch.threshold(chunk, 0.0, 0.0, out=work)  # negatives and -0.0 become +0.0; nan stays
            else:
                torch.abs(chunk, out=work)
            torch.amax(work_rows, dim=1, out=scales)
            scales.clamp_(min=SCALE_FLOOR)  # nan stays nan
            if not dynamic:
                # Linear codes decode as code * (scale / 127): the block maximum comes back as
                # (scale / 127) * 127, which can be an ulp off scale. Storing that instead (it
                # maps to itself) makes re-encoding decoded values give the same bytes.
                scales.div_(norm).mul_(norm)
            torch.reciprocal(scales, out=factor).mul_(norm)
            # Signed codes carry the sign, so the signed values are scaled.
            source = work if unsigned else chunk
            if not math.isfinite(scales.sum().item()):  # also when the sum overflows: then merely slower
                # A block holding inf or nan keeps its non-finite scale, so it decodes as
                # non-finite; its codes are computed from zeros, so they stay in range.
                factor.nan_to_num_(0.0, 0.0, 0.0)
                source = work.copy_(source).nan_to_num_(0.0, 0.0, 0.0)
            torch.mul(source.view(blocks, -1), factor.unsqueeze(1), out=work_rows)

            target = typed[start:stop]
            if dynamic:
                dynamic_codes(work, unsigned, index_buf[:length], out=target)
            elif unsigned:
                # A non-zero second moment never rounds to 0: max(round(y), 1), but 0 where y == 0.
                rounded = torch.round(work, out=round_buf[:length]).clamp_(min=1.0)
                target.copy_(torch.minimum(rounded, work.ceil_(), out=rounded))
            else:
                target.copy_(work.round_())  # half to even
            if write_back:
                # Decoded from the codes as decode does, so even the sign of a zero agrees.
                self._decode_chunk(unsigned, codes[start:stop], scales, chunk, half_buf, factor_buf)

    def _decode_chunk(
        self, unsigned: bool, codes: Tensor, scales: Tensor, out: Tensor, half_buf: Tensor, factor_buf: Tensor
    ) -> None:
        """Decode one chunk of whole blocks (or one partial block) with the blocks' scales into ``out``."""
        if self.qmap == "dynamic":
            # See [Note: dynamic codes are truncated fp16 patterns] (maps.py).
            half = half_buf[: codes.numel()]
            if unsigned:
                half.copy_(codes).bitwise_left_shift_(7)
                multiplier = torch.mul(scales, 1.0 / UNSIGNED_NORM, out=factor_buf[: scales.numel()])
            else:
                # Sign-extended, the sign bit lands in bits 15 and 14 after the shift;
                # clearing bit 14 leaves the fp16 sign and a 4-bit exponent.
                half.copy_(codes.view(torch.int8)).bitwise_left_shift_(7).bitwise_and_(~0x4000)
                multiplier = scales
            out.copy_(half.view(torch.float16))
        else:
            out.copy_(codes if unsigned else codes.view(torch.int8))
            multiplier = torch.div(scales, 255.0 if unsigned else 127.0, out=factor_buf[: scales.numel()])
        out.view(scales.numel(), -1).mul_(multiplier.unsqueeze(1))


def _unsigned(name: str) -> bool:
    """Moments named ``*_sq`` (Adam's second moment) are squares: non-negative, with an unsigned map."""
    return name.endswith("_sq")
