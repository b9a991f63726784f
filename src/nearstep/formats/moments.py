"""The moment codecs: how a state file stores each moment (Adam's ``exp_avg``, ``exp_avg_sq``, ...).

One :class:`MomentCodec` per moments part of a :class:`~nearstep.formats.StateFormat`:

* ``"fp32"`` (:class:`Fp32Moments`): the fp32 tensor itself.
* ``"8bit"`` (:class:`Int8Moments`): one byte per element plus one fp32 scale
  (the absolute maximum, at least 2**-100) per block of ``block`` elements, as in
  the block-wise 8-bit optimizers of Dettmers et al. 2022 ("8-bit Optimizers via
  Block-wise Quantization"). Moments named ``*_sq`` (Adam's second moment) are
  non-negative and use an unsigned map, the others a signed one. The maps
  (``qmap``, ``"dynamic"`` or ``"linear"``) are in :mod:`nearstep.formats.maps`.
* ``"16bit"`` (:class:`Bf16Moments`): bfloat16, rounded to nearest; 2 bytes, no blocks.
* ``"fp8"`` (:class:`Fp8Moments`): one fp8 byte per element plus one fp32 scale
  per block, E4M3 for signed moments and E5M2 for ``*_sq`` ones. FP8-LM (Peng et
  al. 2023, "FP8-LM: Training FP8 Large Language Models") keeps Adam's first
  moment in FP8 and its second in FP16: the second moment is a square and needs
  the range, so here it gets E5M2's 5 exponent bits (and a block scale).

Second moments never decode to 0 unless they are 0: a non-zero value below the
smallest code rounds *up* to it (with every codec but fp32, which needs no rule).
Adam divides by ``sqrt(v) + eps``; a tiny ``v`` that collapsed to 0 while the
same element's first moment survived (its map has less range to cover) would
blow the update up to ``m / eps``. Rounded up, it can only shrink that element's
update.

Rounding to nearest has a cost on slow averages: Adam's ``v`` changes by ~0.1%
a step (beta2 = 0.999), less than half a code step, so a stored ``v`` moves only
with its block's scale or a large gradient. In a 300-step AdamW test
(``tests/test_formats.py``) the dynamic map's ``v`` ends ~20% off fp32's
(median) and the weights' drift ~7%; the linear map, finer near the block
maximum, ~4% and ~1.5%. bf16 (8 significant bits) and fp8 (3 or 2 mantissa
bits) round in the same way.

Non-finite values: moments must be finite: a block holding an inf or nan stores a
non-finite scale and decodes as non-finite throughout (``"8bit"``, ``"fp8"``);
bf16 keeps inf and nan element by element.

A codec knows nothing of formats: it is given its qmap and block, the region name
and the tensors, and works through the chunks of :mod:`nearstep.formats.chunks`.
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .chunks import MAX_BLOCK, MIN_BLOCK, Workspace, block_spans, copy_, spans
from .maps import QMAPS, SCALE_FLOOR, UNSIGNED_NORM, dynamic_codes

__all__ = [
    "MomentCodec", "Fp32Moments", "Int8Moments", "Bf16Moments", "Fp8Moments",
    "FP8_SIGNED_NORM", "FP8_UNSIGNED_NORM",
]


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


_BF16_SMALLEST = 2.0**-133  # the smallest positive bf16 (pattern 0x0001), an fp32 subnormal


@dataclass(frozen=True, slots=True)
class Bf16Moments(MomentCodec):
    """bfloat16: ``<name>`` (bf16, one per element); 2 bytes, no blocks, no scale.

    Encoding is torch's own cast, ``x.to(torch.bfloat16)``: the upper 16 bits of
    the fp32 pattern, rounded to nearest, ties to even. Magnitudes from pattern
    0x7F7F8000 (about 3.396e38, halfway from bf16's largest finite value to inf) up
    round to inf, inf stays inf, and nan stays nan with the pattern the cast writes
    (0xFFFF for every nan on torch 2.13's CPU kernels). Moments named ``*_sq`` first
    go through ``torch.threshold(x, 0.0, 0.0)`` (negatives and -0.0 become +0.0, nan
    stays), and a positive value that the cast rounds to 0 (one of at most 2**-134)
    is stored as the smallest positive bf16, 2**-133 (pattern 0x0001), instead.
    Decoding is exact: bf16 -> fp32 appends 16 zero bits.
    """

    identity: ClassVar[bool] = False
    block_aligned: ClassVar[bool] = False

    @property
    def bytes_per_element(self) -> float:
        return 2.0

    def layout(self, name: str, numel: int) -> tuple[tuple[str, torch.dtype, int], ...]:
        return ((name, torch.bfloat16, numel),)

    def decode(self, name: str, regions: Mapping[str, Tensor], out: Tensor, workspace: Workspace) -> None:
        out.copy_(regions[name])  # bf16 -> fp32 is exact

    def encode_(
        self, name: str, values: Tensor, regions: Mapping[str, Tensor], workspace: Workspace, *, write_back: bool
    ) -> None:
        unsigned, region = _unsigned(name), regions[name]
        work_buf, lift_buf = workspace.buffers()[:2]
        for start, stop in spans(values.numel()):
            length = stop - start
            chunk, target = values[start:stop], region[start:stop]
            if not unsigned:
                target.copy_(chunk)  # round to nearest even
            else:
                work = torch.threshold(chunk, 0.0, 0.0, out=work_buf[:length])  # -0.0 becomes +0.0; nan stays
                # A non-zero second moment never decodes to 0. The cast rounds a positive
                # value to 0 exactly when it is at most 2**-134, and keeps 2**-133 (0x0001)
                # as it is, so lifting every positive value to at least 2**-133 first
                # stores 0x0001 where the cast gave 0 and changes no other pattern. Three
                # vectorised passes; masks from comparisons cost ~4x more. sign(w) is 0 for
                # +0.0, which stays 0; a nan stays nan (nan * 0 is nan).
                lifted = torch.clamp_min(work, _BF16_SMALLEST, out=lift_buf[:length])
                target.copy_(lifted.mul_(torch.sign(work, out=work)))
            if write_back:
                chunk.copy_(target)


# fp8 moments scale the block maximum to NORM, a power of two, so that it decodes to
# its scale exactly: NORM * (s * 2**-8) == s (E4M3; 2**15 for E5M2), since a product
# with a power of two is exact. fp8's largest finite values are not powers of two
# (448, 57344), so the codes above NORM (E4M3 288 .. 448, E5M2 40960 .. 57344) are
# given up, a little under one binade, and never written. What is left: E4M3 from
# 2**8 down to its smallest subnormal 2**-9 (17 binades, 5.1 decades, 3 mantissa
# bits down to 2**-6), E5M2 from 2**15 down to 2**-16 (31 binades, 9.3 decades, 2
# mantissa bits down to 2**-14): the second moment is a square, so it needs twice
# the first's range.
FP8_SIGNED_NORM, FP8_UNSIGNED_NORM = 256.0, 32768.0
# The one pattern a nan scale is stored as: amax may return any of a block's nans.
_NAN_SCALE_BITS = 0x7FC00000


@dataclass(frozen=True, slots=True)
class Fp8Moments(MomentCodec):
    """Block-wise fp8: ``<name>`` (uint8, one fp8 code per element) and ``<name>.scale`` (fp32, one per block).

    Signed moments are ``torch.float8_e4m3fn`` codes with ``NORM = 256``
    (:data:`FP8_SIGNED_NORM`); moments named ``*_sq`` are ``torch.float8_e5m2`` codes
    with ``NORM = 32768`` (:data:`FP8_UNSIGNED_NORM`). Per block of ``block``
    elements (the last block may be shorter), every operation in float32:

    1. ``w = x`` (signed), or ``w = torch.threshold(x, 0.0, 0.0)`` (``*_sq``:
       negatives and -0.0 become +0.0, nan stays).
    2. ``s = clamp(amax(|w|), min=SCALE_FLOOR)`` (2**-100; both keep nan). A nan
       ``s`` is stored as the pattern 0x7FC00000, whichever nan amax returned; an
       inf ``s`` as +inf.
    3. ``factor = torch.reciprocal(s) * NORM``. Where ``s`` is not finite:
       ``factor = 0`` and ``w = nan_to_num(w, 0, 0, 0)`` (its inf and nan elements
       become +0.0), so that block's codes are those of ``w * 0``: 0x00, or 0x80
       (-0.0) for a signed moment's negative finite elements.
    4. ``y = w * factor`` and ``code = y.to(dtype)``: torch's cast, round to
       nearest, ties to even. ``|y| <= NORM`` (``NORM * (1 + 2**-22)`` for scales
       above 2**126, whose reciprocal is subnormal), which rounds to NORM: the
       cast never meets a value beyond the format's range.
    5. ``*_sq`` only: where ``y > 0`` and the code is 0, the code is 0x01 (the
       smallest subnormal, 2**-16) instead.

    Decoding: ``code.view(dtype).to(float32) * m`` with ``m = torch.mul(s, 1 / NORM)``
    per block: one float32 multiply per element (E4M3 codes are looked up in a table
    of exactly what that cast gives, which is faster than the cast). The block
    maximum decodes to ``s`` exactly, and a block with a non-finite scale decodes as
    nan throughout (zero times inf or nan).

    Attributes:
        block: elements per block, a power of two in [32, 65536] (the format checks it).
    """

    identity: ClassVar[bool] = False
    block_aligned: ClassVar[bool] = True

    block: int

    def __post_init__(self) -> None:
        # StateFormat validates with its own messages; this guards direct construction.
        if not (MIN_BLOCK <= self.block <= MAX_BLOCK and self.block & (self.block - 1) == 0):
            raise ValueError(f"block must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {self.block!r}")

    @property
    def bytes_per_element(self) -> float:
        return 1.0 + 4.0 / self.block

    def layout(self, name: str, numel: int) -> tuple[tuple[str, torch.dtype, int], ...]:
        return ((name, torch.uint8, numel), (name + ".scale", torch.float32, -(-numel // self.block)))

    def decode(self, name: str, regions: Mapping[str, Tensor], out: Tensor, workspace: Workspace) -> None:
        dtype, norm = _fp8_kind(name)
        codes, scale = regions[name], regions[name + ".scale"]
        buffers = workspace.buffers()
        for start, stop, blocks in block_spans(out.numel(), self.block):
            first = start // self.block
            scales = scale[first : first + blocks]
            _fp8_decode_chunk(dtype, norm, codes[start:stop], scales, out[start:stop], buffers[2], buffers[5])

    def encode_(
        self, name: str, values: Tensor, regions: Mapping[str, Tensor], workspace: Workspace, *, write_back: bool
    ) -> None:
        unsigned, (dtype, norm) = _unsigned(name), _fp8_kind(name)
        codes, scale = regions[name], regions[name + ".scale"]
        work_buf, _, index_buf, _, _, factor_buf = workspace.buffers()
        masks = index_buf.view(torch.bool)
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
            torch.reciprocal(scales, out=factor).mul_(norm)
            # Signed codes carry the sign, so the signed values are scaled.
            source = work if unsigned else chunk
            if not math.isfinite(scales.sum().item()):  # also when the sum overflows: then merely slower
                # The stored bytes must not depend on which nan amax picked (a native
                # kernel could pick another), so a nan scale gets one pattern. The block
                # keeps its non-finite scale and decodes as non-finite; its codes are
                # computed from zeros (an inf scale already gives factor 0, a nan one
                # nan, set to 0 here), so they stay in range.
                scales.view(torch.int32).masked_fill_(torch.isnan(scales), _NAN_SCALE_BITS)
                factor.nan_to_num_(0.0, 0.0, 0.0)
                source = work.copy_(source).nan_to_num_(0.0, 0.0, 0.0)
            torch.mul(source.view(blocks, -1), factor.unsqueeze(1), out=work_rows)

            target = codes[start:stop]
            target.view(dtype).copy_(work)  # round to nearest even
            if unsigned:
                # A non-zero second moment never rounds to 0: y >= 0 here, codes are
                # 0 .. 0x78, and max(code, y > 0) lifts exactly the zero codes of y > 0.
                positive = torch.gt(work, 0.0, out=masks[:length])
                torch.maximum(target, positive.view(torch.uint8), out=target)
            if write_back:
                # Decoded from the codes as decode does, so even the sign of a zero agrees.
                _fp8_decode_chunk(dtype, norm, target, scales, chunk, index_buf, factor_buf)


def _fp8_kind(name: str) -> tuple[torch.dtype, float]:
    """The fp8 dtype and NORM of moment ``name``: E5M2 for ``*_sq`` (range), E4M3 for the others (precision)."""
    if _unsigned(name):
        return torch.float8_e5m2, FP8_UNSIGNED_NORM
    return torch.float8_e4m3fn, FP8_SIGNED_NORM


@functools.cache
def _fp8_values(dtype: torch.dtype) -> Tensor:
    """The fp32 value of each of the 256 codes of ``dtype``: torch's own cast of each."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()


def _fp8_decode_chunk(
    dtype: torch.dtype, norm: float, codes: Tensor, scales: Tensor, out: Tensor, index_buf: Tensor, factor_buf: Tensor
) -> None:
    """Decode one chunk of whole blocks (or one partial block) of fp8 codes with the blocks' scales into ``out``."""
    if dtype == torch.float8_e4m3fn:
        # torch's E4M3 -> fp32 cast branches on every code (~4.5 ns per element on one
        # core, for codes of real moments); looking its 256 results up gives the same
        # bits in ~0.8 ns. E5M2 codes are fp16 patterns cut short, and its cast is fast.
        index = index_buf[: codes.numel()]
        index.copy_(codes)
        torch.index_select(_fp8_values(dtype), 0, index, out=out)
    else:
        out.copy_(codes.view(dtype))  # fp8 -> fp32 is exact
    multiplier = torch.mul(scales, 1.0 / norm, out=factor_buf[: scales.numel()])  # exact: a power of two
    out.view(scales.numel(), -1).mul_(multiplier.unsqueeze(1))


def _unsigned(name: str) -> bool:
    """Moments named ``*_sq`` (Adam's second moment) are squares: non-negative, with an unsigned map."""
    return name.endswith("_sq")
