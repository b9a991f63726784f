"""The 8-bit maps of quantised moments: the code of a value, and the value of a code.

Quantisation maps (``qmap``; a code's value is multiplied by its block's scale):

* ``"linear"``: ``round(x / absmax * 127)`` as a signed byte, or
  ``round(x / absmax * 255)`` unsigned; decodes as ``code * (absmax / 127)``
  (or ``/ 255``). The stored absmax is ``(absmax / 127) * 127`` in fp32, an ulp
  off at most, so that the block maximum decodes to it exactly.
* ``"dynamic"`` (the default): floating-point codes in the spirit of the dynamic
  quantisation of Dettmers et al.: a sign (signed map only), an exponent and 3
  mantissa bits; each code is an fp16 bit pattern cut short (see [Note: dynamic
  codes are truncated fp16 patterns]). Signed: the block maximum maps to 1.0,
  magnitudes 2**-14 .. 1 plus k * 2**-17 (k = 1..7) below them, 5.1 decades, like
  fp8 E4M3. Unsigned: values 2**-29 .. 1 of the block maximum, 8.7 decades (the
  second moment is a square, so it needs twice the range of the first). Zero and
  the block maximum are exact; rounding is to the nearest code, ties away from
  zero (below 2**-14 the signed map rounds to 4 significant bits first), and the
  relative error within the range is at most 2**-4.

  Why this map, measured on one core (``nearstep bench codecs``, a shared
  machine, so roughly): decoding is three vectorised integer / fp16 steps and a
  multiply (~0.7 ns per element), encoding integer arithmetic on the fp32 bit
  pattern (plus a 4096-entry table for the signed map): ~2.2-2.6 ns per element
  with the write-back, ~1.5-1.9 without. Dettmers' dynamic tree has a base-10
  exponent and linear fractions, so encoding it means searching a 256-entry
  codebook (``torch.bucketize``: ~40 ns per element); torch's own fp8 casts
  decode slowly (E4M3 to fp32: ~5 ns per element) and have no unsigned variant.
  Against the dynamic tree this map gives up precision near the block maximum
  (at most 6% error instead of about 1%) for the same relative error over its
  whole range.

The block codec that applies these maps (scales, chunks, write-back) is
:class:`nearstep.formats.moments.Int8Moments`.
"""

from __future__ import annotations

import functools
import math
import struct

import torch
from torch import Tensor

__all__ = [
    "QMAPS", "SIGNED_ONE", "UNSIGNED_ONE", "UNSIGNED_SMALLEST", "UNSIGNED_NORM", "SCALE_FLOOR",
    "code_table", "dynamic_codes",
]

# The values of nearstep.formats.spec.QMap: the maps sit below the format spec and
# do not import it.
QMAPS: tuple[str, ...] = ("dynamic", "linear")

# [Note: dynamic codes are truncated fp16 patterns]
# A dynamic code is the top of an fp16 bit pattern with the low 7 mantissa bits
# dropped, so decoding is three cheap vectorised steps (widen to int16, shift,
# convert fp16 -> fp32) and a multiply by the block's scale, with no table lookup.
#   signed:   code = s eeee mmm  ->  fp16 pattern s 0 eeee mmm 0000000
#             magnitudes k * 2**-17 (k = 1..7, fp16 subnormals) and
#             2**(e - 15) * (1 + m/8); the block maximum is scaled to 1.0 (code 120).
#   unsigned: code = eeeee mmm  ->  fp16 pattern 0 eeeee mmm 0000000
#             values 2**(e - 15) * (1 + m/8); the block maximum is scaled to 2**15
#             (code 240), and encoding uses codes >= 8 (2**-14), the normal range.
# The scale is the block's absolute maximum, which decodes exactly. Codes above the
# maximum's (121..127, 241..255) are never written.
SIGNED_ONE, UNSIGNED_ONE, UNSIGNED_SMALLEST = 120, 240, 8
UNSIGNED_NORM = 2.0**15
# Scales are at least this (a block of moments below it is stored relative to it),
# so that 1 / scale, times 2**15 or 255, stays finite.
SCALE_FLOOR = 2.0**-100


def _fp16_pattern_value(pattern: int) -> float:
    return struct.unpack("<e", struct.pack("<H", pattern & 0xFFFF))[0]


def _dynamic_code_value(code: int, signed: bool) -> float:
    """The normalised value of one dynamic code (1.0 for the block maximum)."""
    if signed:
        pattern = (code & 0x80) << 8 | (code & 0x7F) << 7
        return _fp16_pattern_value(pattern)
    return _fp16_pattern_value(code << 7) / UNSIGNED_NORM


@functools.cache
def _signed_encode_lut() -> Tensor:
    """Signed code of each fp32 value rounded to 4 significant bits, by its top 12 bits.

    Index: sign, 8 exponent bits, 3 mantissa bits. Values the map holds exactly
    (2**-14 .. 1) get their own code; smaller ones the nearest of 0 and the
    subnormal codes k * 2**-17 (ties away from zero); larger ones the top code.
    """
    table = []
    for index in range(4096):
        sign, exponent, mantissa = index >> 11, (index >> 3) & 0xFF, index & 7
        value = 0.0 if exponent == 0 else math.ldexp(1.0 + mantissa / 8, exponent - 127)
        if exponent == 255 or value >= 1.0:
            magnitude = SIGNED_ONE
        else:
            half = struct.unpack("<H", struct.pack("<e", value))[0]  # exact above 2**-21
            magnitude = (half + 64) >> 7  # round the fp16 pattern to 3 mantissa bits, half up
        table.append(sign << 7 | magnitude)
    return torch.tensor(table, dtype=torch.uint8)


def code_table(qmap: str, signed: bool) -> Tensor:
    """The normalised value of each of the 256 codes (1.0 is the block's scale).

    Signed dynamic codes are sign-magnitude (0x80 is -0.0); signed linear codes are
    two's-complement bytes (0x80, -128, is never written). Decoding multiplies by
    the block's scale in a way that can differ from ``value * scale`` in the last
    bit: dynamic codes as ``fp16 value * scale`` (unsigned: ``* (scale * 2**-15)``),
    linear codes as ``code * (scale / 127)`` (or ``/ 255``).
    """
    if qmap == "dynamic":
        return torch.tensor([_dynamic_code_value(code, bool(signed)) for code in range(256)], dtype=torch.float32)
    if qmap == "linear":
        codes = torch.arange(256, dtype=torch.int32)
        if signed:
            return torch.where(codes < 128, codes, codes - 256).float() / 127
        return codes.float() / 255
    raise ValueError(f"qmap must be one of {list(QMAPS)}, got {qmap!r}")


# Unsigned dynamic codes from the fp32 pattern of y in [0, 2**15]: adding half a
# code step (1 << 19) and shifting out 20 bits rounds y to 4 significant bits
# (ties away from zero; a mantissa carry moves to the next binade, which is the
# next code) and leaves 8 * exponent + mantissa; fp16's exponent bias is 112 below
# fp32's, hence 896. Signed codes look up the same 12 bits (with the sign) in a table.
_ROUND_UNSIGNED = (1 << 19) - (896 << 20)


def dynamic_codes(y: Tensor, unsigned: bool, index: Tensor, *, out: Tensor) -> None:
    """Write the dynamic codes of the scaled, finite ``y`` (clobbered) to the uint8 ``out``.

    ``y`` is scaled so that the block maximum is 1.0 (signed) or 2**15 (unsigned);
    ``index`` is int32 scratch of the same length.
    """
    bits = y.view(torch.int32)
    if not unsigned:
        torch.add(bits, 1 << 19, out=index)
        index.bitwise_right_shift_(20).bitwise_and_(0xFFF)
        torch.index_select(_signed_encode_lut(), 0, index, out=out)
        return
    torch.add(bits, _ROUND_UNSIGNED, out=index)
    index.bitwise_right_shift_(20).clamp_(UNSIGNED_SMALLEST, UNSIGNED_ONE)
    # The pattern of any y > 0 is >= 1 and that of y == 0 is 0, so this minimum is 0
    # exactly for y == 0: a non-zero second moment below the smallest code rounds
    # up to it (to a subnormal code k < 8 only if its own pattern is k, y < 2**-146).
    torch.minimum(index, bits, out=index)
    out.copy_(index)
