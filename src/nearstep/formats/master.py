"""The master codecs: how a state file stores the fp32 master weights.

One :class:`MasterCodec` per master part of a :class:`~nearstep.formats.StateFormat`:

* ``"fp32"`` (:class:`Fp32Master`): the fp32 tensor itself, 4 bytes.
* ``"bf16-sr"`` (:class:`Bf16SrMaster`): bf16 (the upper 16 bits of the fp32 bit
  pattern) with stochastic rounding, 2 bytes.
* ``"bf16-kahan"`` (:class:`Bf16KahanMaster`): bf16 plus an 8-bit compensation
  byte holding the next 8 bits of the pattern (a compensated, 24-bit float with 16
  significant bits, relative error < 2**-15) whose last bit is rounded
  stochastically, 3 bytes. See [Note: stochastic rounding] (``rounding.py``).

Non-finite values: a master that is inf or nan stays inf or nan, and a finite one
stays finite (it is clamped to the largest finite value the format holds, never
rounded up to inf).

A codec knows nothing of formats: it is given the region name, the tensors and
the seed, and works through the chunks of :mod:`nearstep.formats.chunks`.
"""

from __future__ import annotations

import abc
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .chunks import Workspace, copy_, spans
from .rounding import sr_noise

__all__ = ["MasterCodec", "Fp32Master", "Bf16SrMaster", "Bf16KahanMaster"]

class MasterCodec(abc.ABC):
    """The master part of a state format: its regions, their decoding and encoding.

    Attributes:
        identity: the region is the fp32 tensor itself (the engine may work in it in place).
        bytes_per_element: bytes of the state file per master weight (page padding left out).
    """

    __slots__ = ()

    identity: ClassVar[bool]
    bytes_per_element: ClassVar[float]

    @abc.abstractmethod
    def layout(self, name: str, numel: int) -> tuple[tuple[str, torch.dtype, int], ...]:
        """The regions holding ``numel`` master weights named ``name``: (region name, dtype, count) each."""

    @abc.abstractmethod
    def decode(self, name: str, regions: Mapping[str, Tensor], out: Tensor, workspace: Workspace) -> None:
        """Fill the fp32 tensor ``out`` from the regions of :meth:`layout`."""

    @abc.abstractmethod
    def encode_(
        self, name: str, values: Tensor, regions: Mapping[str, Tensor], seed: int, workspace: Workspace, *,
        first: int = 0,
    ) -> None:
        """Store the fp32 ``values`` in the regions, and replace them by what was stored (bit for bit).

        ``first``: the element of the slice ``values[0]`` is (stochastic rounding depends on it).
        """


@dataclass(frozen=True, slots=True)
class Fp32Master(MasterCodec):
    """Plain fp32: decoding and encoding are copies (none where the region is the tensor)."""

    identity: ClassVar[bool] = True
    bytes_per_element: ClassVar[float] = 4.0

    def layout(self, name: str, numel: int) -> tuple[tuple[str, torch.dtype, int], ...]:
        return ((name, torch.float32, numel),)

    def decode(self, name: str, regions: Mapping[str, Tensor], out: Tensor, workspace: Workspace) -> None:
        copy_(out, regions[name])

    def encode_(
        self, name: str, values: Tensor, regions: Mapping[str, Tensor], seed: int, workspace: Workspace, *,
        first: int = 0,
    ) -> None:
        copy_(regions[name], values)


@dataclass(frozen=True, slots=True)
class Bf16SrMaster(MasterCodec):
    """bf16, the upper 16 bits of the pattern, rounded stochastically over the lower 16."""

    identity: ClassVar[bool] = False
    bytes_per_element: ClassVar[float] = 2.0

    def layout(self, name: str, numel: int) -> tuple[tuple[str, torch.dtype, int], ...]:
        return ((name, torch.bfloat16, numel),)

    def decode(self, name: str, regions: Mapping[str, Tensor], out: Tensor, workspace: Workspace) -> None:
        out.copy_(regions[name])  # bf16 -> fp32 is exact: the low 16 bits become 0

    def encode_(
        self, name: str, values: Tensor, regions: Mapping[str, Tensor], seed: int, workspace: Workspace, *,
        first: int = 0,
    ) -> None:
        _encode_rounded_(values, regions[name], None, seed, workspace, first)


@dataclass(frozen=True, slots=True)
class Bf16KahanMaster(MasterCodec):
    """bf16 plus a compensation byte (``<name>.lo``, pattern bits 8..15), rounded stochastically over bits 0..7."""

    identity: ClassVar[bool] = False
    bytes_per_element: ClassVar[float] = 3.0

    def layout(self, name: str, numel: int) -> tuple[tuple[str, torch.dtype, int], ...]:
        return ((name, torch.bfloat16, numel), (name + ".lo", torch.uint8, numel))

    def decode(self, name: str, regions: Mapping[str, Tensor], out: Tensor, workspace: Workspace) -> None:
        high, low, scratch = regions[name], regions[name + ".lo"], workspace.buffers()[3]
        out_bits = out.view(torch.int32)
        for start, stop in spans(out.numel()):
            out[start:stop].copy_(high[start:stop])
            work = scratch[: stop - start]
            work.copy_(low[start:stop]).bitwise_left_shift_(8)
            out_bits[start:stop].bitwise_or_(work)

    def encode_(
        self, name: str, values: Tensor, regions: Mapping[str, Tensor], seed: int, workspace: Workspace, *,
        first: int = 0,
    ) -> None:
        _encode_rounded_(values, regions[name], regions[name + ".lo"], seed, workspace, first)


# The largest finite patterns bf16 (16 bits kept) and bf16-kahan (24 bits kept)
# hold, by the number of bits dropped: finite values above them are clamped there,
# so no noise can carry them to inf.
_MAX_KEPT = {16: 0x7F7F0000, 8: 0x7F7FFF00}
_INF_BITS, _QUIET_NAN_BITS, _SIGN_BIT = 0x7F800000, 0x7FC00000, -(1 << 31)


def _bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _encode_rounded_(values: Tensor, high_region: Tensor, low: Tensor | None, seed: int, workspace: Workspace,
                     first: int = 0) -> None:
    """Round ``values`` stochastically to bf16 (``low`` None) or bf16 + a compensation byte, in chunks.

    Both share one pass: clamp, add the noise to the pattern, split off the kept
    bits, and mask the working copy down to exactly what was stored.
    """
    dropped = 16 if low is None else 8
    limit_bits = _MAX_KEPT[dropped]
    limit = _bits_to_float(limit_bits)
    keep_mask = -(1 << dropped)
    high = high_region.view(torch.int16)
    noise_buf, work_buf = workspace.buffers()[2:4]
    for start, stop in spans(values.numel()):
        chunk = values[start:stop]
        bits = chunk.view(torch.int32)
        least, most = torch.aminmax(chunk)  # nan makes both comparisons false
        if not (least.item() >= -limit and most.item() <= limit):
            _clamp_master_bits_(bits, limit_bits)
        noise = sr_noise(seed, first + start, stop - start, dropped, out=noise_buf[: stop - start])
        bits.add_(noise)  # see [Note: stochastic rounding]; cannot overflow after the clamp
        work = work_buf[: stop - start]
        if low is not None:
            torch.bitwise_right_shift(bits, 8, out=work)
            low[start:stop].copy_(work)  # int32 -> uint8 keeps the low 8 bits: pattern bits 8..15
            work.bitwise_right_shift_(8)
        else:
            torch.bitwise_right_shift(bits, 16, out=work)
        high[start:stop].copy_(work)
        bits.bitwise_and_(keep_mask)  # the working copy becomes exactly what was stored


def _clamp_master_bits_(bits: Tensor, limit_bits: int) -> None:
    """Prepare a chunk holding nan, inf or huge finite values for rounding, in place.

    nan becomes a quiet nan whose payload survives truncation (a nan with payload
    only in the dropped bits would become inf); finite values beyond the largest
    finite stored value are clamped to it; inf is left alone (its dropped bits are
    zero, so it stays inf).
    """
    magnitude = bits & 0x7FFFFFFF
    sign = bits & _SIGN_BIT
    nan = magnitude > _INF_BITS
    huge = (magnitude > limit_bits) & (magnitude < _INF_BITS)
    bits.copy_(torch.where(nan, sign | _QUIET_NAN_BITS, torch.where(huge, sign | limit_bits, bits)))
