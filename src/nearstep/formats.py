"""State formats: how a slice's optimizer state is laid out and encoded in its state file.

Every step the device reads a slice's state file, decodes it into fp32 working
tensors (the master weights and one tensor per moment), runs the fp32 kernel
(:func:`nearstep.kernels.update_`), encodes the tensors back and writes the file.
On SSD-resident state the step is bound by those bytes, so a
:class:`StateFormat` trades a little precision for fewer of them:

* ``master``: ``"fp32"``; ``"bf16-sr"``, bf16 (the upper 16 bits of the fp32 bit
  pattern) with stochastic rounding; ``"bf16-kahan"``, bf16 plus an 8-bit
  compensation byte holding the next 8 bits of the pattern (a compensated, 24-bit
  float with 16 significant bits, relative error < 2**-15) whose last bit is
  rounded stochastically. See [Note: stochastic rounding].
* ``moments``: ``"fp32"``, or ``"8bit"``: one byte per element plus one fp32 scale
  (the absolute maximum, at least 2**-100) per block of ``block`` elements, as in
  the block-wise 8-bit optimizers of Dettmers et al. 2022 ("8-bit Optimizers via
  Block-wise Quantization"). Moments named ``*_sq`` (Adam's second moment) are
  non-negative and use an unsigned map, the others a signed one.

State bytes per parameter (AdamW: master + ``exp_avg`` + ``exp_avg_sq``; a step
reads and writes them, so it moves twice as many)::

    format               master  moments          state  moved per step
    fp32                 4       8                12     24
    8bit                 4       2 * (1 + 4/2048) ~6.004 ~12.008
    bf16-kahan           3       8                11     22
    bf16-sr              2       8                10     20
    bf16-kahan+8bit      3       2 * (1 + 4/2048) ~5.004 ~10.008
    bf16-sr+8bit         2       2 * (1 + 4/2048) ~4.004 ~8.008

SGD with momentum and Lion keep one moment, so their 8-bit moments cost ~1.002.

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

  Why this map, measured on one core (``python -m nearstep.formats``, a shared
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

Non-finite values: a master that is inf or nan stays inf or nan, and a finite
one stays finite (it is clamped to the largest finite value the format holds,
never rounded up to inf). Moments must be finite: a block holding an inf or nan
stores a non-finite scale and decodes as non-finite throughout.

:func:`encode_` overwrites the fp32 working tensors with exactly what the file
now holds, so the master weights posted to the model, the next step's input and
a resumed run all agree bit for bit. Stochastic rounding is a pure function of
``seed`` and the element index (:func:`sr_noise`).
"""

from __future__ import annotations

import functools
import math
import numbers
import re
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from nearstep.aio import PAGE, align_up

__all__ = [
    "StateFormat", "RegionSpec", "Workspace", "FORMAT_NAMES", "DEFAULT_BLOCK",
    "views", "decode_", "encode_", "code_table", "sr_noise",
]

DEFAULT_BLOCK: int = 2048  # Dettmers et al. 2022 quantise moments in blocks of 2048
FORMAT_NAMES: tuple[str, ...] = (
    "fp32", "bf16-kahan", "bf16-sr", "8bit", "8bit-linear",
    "bf16-kahan+8bit", "bf16-kahan+8bit-linear", "bf16-sr+8bit", "bf16-sr+8bit-linear",
)
_MASTERS = ("fp32", "bf16-kahan", "bf16-sr")
_MOMENTS = ("fp32", "8bit")
_QMAPS = ("dynamic", "linear")
_MIN_BLOCK, _MAX_BLOCK = 32, 1 << 16

# [Note: formats work in chunks]
# Encoding takes ~10 elementwise passes. Run over a whole slice, each pass would
# stream the slice through memory again; run over chunks of _CHUNK elements, the
# chunk and its scratch (~1 MiB) stay in L2 across the passes. Chunks hold whole
# blocks (_CHUNK is a multiple of every allowed block size), and every number is
# the same whatever the chunk size: rounding is elementwise and the noise is a
# function of the element's index in the slice.
_CHUNK = 1 << 16


# --------------------------------------------------------------------------- format and layout


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


@dataclass(frozen=True, slots=True)
class StateFormat:
    """How a state file stores the master weights and the moments.

    Attributes:
        master: ``"fp32"``, ``"bf16-kahan"`` (3 bytes: bf16 + an 8-bit compensation
            byte) or ``"bf16-sr"`` (2 bytes, stochastic rounding).
        moments: ``"fp32"`` or ``"8bit"`` (1 byte + a block scale).
        qmap: the 8-bit map, ``"dynamic"`` or ``"linear"``; ignored (normalised to
            ``"dynamic"``) for fp32 moments.
        block: elements per quantisation block of 8-bit moments, a power of two in
            [32, 65536]; ignored (normalised to 2048) for fp32 moments.

    ``StateFormat.parse("bf16-sr+8bit")`` builds one from its name; ``.name`` is the
    canonical name, which the store records.
    """

    master: str = "fp32"
    moments: str = "fp32"
    qmap: str = "dynamic"
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        for field, allowed in (("master", _MASTERS), ("moments", _MOMENTS), ("qmap", _QMAPS)):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"StateFormat.{field} must be one of {list(allowed)}, got {value!r}")
        block = self.block
        if isinstance(block, bool) or not isinstance(block, numbers.Integral):
            raise TypeError(f"StateFormat.block must be an int, got {type(block).__name__} ({block!r})")
        if not (_MIN_BLOCK <= block <= _MAX_BLOCK and block & (block - 1) == 0):
            raise ValueError(
                f"StateFormat.block must be a power of two in [{_MIN_BLOCK}, {_MAX_BLOCK}], got {block!r}"
            )
        object.__setattr__(self, "block", int(block))
        if self.moments == "fp32":
            # Settings that change nothing must not make two equal formats compare unequal.
            object.__setattr__(self, "qmap", "dynamic")
            object.__setattr__(self, "block", DEFAULT_BLOCK)

    @classmethod
    def parse(cls, spec: str | StateFormat | None) -> StateFormat:
        """A format from its name ("bf16-sr+8bit", ...), a StateFormat, or None (fp32).

        A name joins a master part (``bf16-kahan``, ``bf16-sr``) and a moments part
        (``8bit``, ``8bit-linear``, optionally ``-b<block>`` as in ``8bit-b1024``)
        with "+", in either order; ``fp32`` alone means no compression.

        Raises:
            ValueError: an unknown or contradictory name; the message lists the choices.
            TypeError: ``spec`` is neither a str, a StateFormat nor None.
        """
        if spec is None:
            return cls()
        if isinstance(spec, StateFormat):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"a state format is a name (str), a StateFormat or None, got {type(spec).__name__}")
        choices = ", ".join(repr(name) for name in FORMAT_NAMES)
        hint = f"valid state formats: {choices} (8-bit parts may end in -b<block>, e.g. '8bit-b1024')"
        text = spec.strip()
        if text == "fp32":
            return cls()
        fields: dict[str, object] = {}
        for part in text.split("+"):
            part = part.strip()
            if part in ("bf16-kahan", "bf16-sr"):
                key = "master"
            elif (match := re.fullmatch(r"8bit(-linear)?(?:-b(\d{1,6}))?", part)) is not None:
                key = "moments"
            else:
                raise ValueError(f"unknown state format {spec!r} (part {part!r}); {hint}")
            if key in fields:
                raise ValueError(f"state format {spec!r} names the {key} twice; {hint}")
            if key == "master":
                fields["master"] = part
            else:
                fields["moments"] = "8bit"
                fields["qmap"] = "linear" if match.group(1) else "dynamic"
                if match.group(2):
                    fields["block"] = int(match.group(2))
        try:
            return cls(**fields)
        except ValueError as err:
            raise ValueError(f"state format {spec!r}: {err}") from None

    @property
    def name(self) -> str:
        """The canonical name; ``StateFormat.parse(fmt.name) == fmt``."""
        parts = [] if self.master == "fp32" else [self.master]
        if self.moments == "8bit":
            moments = "8bit-linear" if self.qmap == "linear" else "8bit"
            if self.block != DEFAULT_BLOCK:
                moments += f"-b{self.block}"
            parts.append(moments)
        return "+".join(parts) or "fp32"

    @property
    def is_identity(self) -> bool:
        """True when the file holds plain fp32 tensors, which the engine may use in place."""
        return self.master == "fp32" and self.moments == "fp32"

    def regions(self, state_names: Sequence[str], numel: int) -> tuple[RegionSpec, ...]:
        """The file's regions, in ``state_names`` order, each starting on a page boundary.

        ``state_names`` names the fp32 tensors of the state ("master" for the master
        weights, every other name a moment); ``numel`` is the elements of each.
        """
        names = _check_names(state_names)
        if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 0:
            raise ValueError(f"numel must be an int >= 0, got {numel!r}")
        numel = int(numel)
        specs, offset = [], 0
        for name, dtype, count in self._layout(names, numel):
            specs.append(RegionSpec(name, dtype, count, offset))
            offset = align_up(offset + count * dtype.itemsize, PAGE)
        return tuple(specs)

    def file_bytes(self, state_names: Sequence[str], numel: int) -> int:
        """Size of the state file: the last region's end rounded up to a page (at least one page)."""
        specs = self.regions(state_names, numel)
        return max(PAGE, align_up(specs[-1].end, PAGE))

    def bytes_per_param(self, state_names: Sequence[str]) -> float:
        """State bytes per parameter for large slices (page padding left out)."""
        names = _check_names(state_names)
        master = {"fp32": 4.0, "bf16-kahan": 3.0, "bf16-sr": 2.0}[self.master]
        moment = 4.0 if self.moments == "fp32" else 1.0 + 4.0 / self.block
        return sum(master if name == "master" else moment for name in names)

    def _layout(self, names: tuple[str, ...], numel: int) -> list[tuple[str, torch.dtype, int]]:
        layout = []
        for name in names:
            if name == "master":
                if self.master == "fp32":
                    layout.append((name, torch.float32, numel))
                else:
                    layout.append((name, torch.bfloat16, numel))
                    if self.master == "bf16-kahan":
                        layout.append((name + ".lo", torch.uint8, numel))
            elif self.moments == "fp32":
                layout.append((name, torch.float32, numel))
            else:
                layout.append((name, torch.uint8, numel))
                layout.append((name + ".scale", torch.float32, -(-numel // self.block)))
        return layout


def _check_names(state_names: Sequence[str]) -> tuple[str, ...]:
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


# --------------------------------------------------------------------------- 8-bit maps

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
_SIGNED_ONE, _UNSIGNED_ONE, _UNSIGNED_SMALLEST = 120, 240, 8
_UNSIGNED_NORM = 2.0**15
# Scales are at least this (a block of moments below it is stored relative to it),
# so that 1 / scale, times 2**15 or 255, stays finite.
_SCALE_FLOOR = 2.0**-100


def _bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _fp16_pattern_value(pattern: int) -> float:
    return struct.unpack("<e", struct.pack("<H", pattern & 0xFFFF))[0]


def _dynamic_code_value(code: int, signed: bool) -> float:
    """The normalised value of one dynamic code (1.0 for the block maximum)."""
    if signed:
        pattern = (code & 0x80) << 8 | (code & 0x7F) << 7
        return _fp16_pattern_value(pattern)
    return _fp16_pattern_value(code << 7) / _UNSIGNED_NORM


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
            magnitude = _SIGNED_ONE
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
    raise ValueError(f"qmap must be one of {list(_QMAPS)}, got {qmap!r}")


# --------------------------------------------------------------------------- stochastic rounding noise

# [Note: stochastic rounding]
# bf16 keeps 8 significant bits: near 1.0 a step is 2**-7. Rounded to nearest, a
# weight moves only when one update exceeds half a step, so with lr * update
# below ulp / 2 (lr 1e-5 against 2**-8 near 1.0) every update is rounded away and
# training stagnates, however many steps it runs. Stochastic rounding rounds up
# with probability (x - down) / ulp, so the stored value is x in expectation and
# small updates accumulate on average. On the bit pattern this is one addition:
# add a uniform integer in [0, 2**k) to the fp32 pattern and drop the low k bits.
# Patterns are sign-magnitude and evenly spaced within a binade (and across the
# subnormal / normal boundary), so the carry rounds the *magnitude* up with
# exactly that probability, for negative numbers too, and a carry out of the
# mantissa lands on the next binade's first value, which is the next step up.
# Representable values (low k bits zero) never move. bf16-kahan drops only 8
# bits, so its steps are 2**-15 relative and it stays unbiased below that.

_NOISE_PERIOD = 1 << 16
_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """A 64-bit mixing function (the SplitMix64 finaliser): a bijection with good avalanche."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
    return z ^ (z >> 31)


@functools.cache
def _noise_table(bits: int) -> Tensor:
    # Two periods back to back, so a rotated period is one contiguous slice.
    mask = (1 << bits) - 1
    shift = 16 if bits == 8 else 0  # the 8- and 16-bit tables use different bits of the hash
    period = [(_mix64(i + 0x632BE59BD9B4E019) >> shift) & mask for i in range(_NOISE_PERIOD)]
    table = torch.tensor(period, dtype=torch.int32)
    return torch.cat([table, table])


def _period_key(seed: int, period: int, bits: int) -> tuple[int, int]:
    z = _mix64((seed * 0x9E3779B97F4A7C15 + period * 0xD1B54A32D192ED03 + bits) & _MASK64)
    return z & (_NOISE_PERIOD - 1), (z >> 32) & ((1 << bits) - 1)


def sr_noise(seed: int, start: int, count: int, bits: int, *, out: Tensor | None = None) -> Tensor:
    """Uniform random integers in [0, 2**bits) for elements ``start .. start + count - 1``.

    A pure function of ``(seed, element index)``: the same element gets the same
    noise whichever range it is asked for in. Element ``i`` in period
    ``p = i // 65536`` gets ``table[(i % 65536 + offset_p) % 65536] ^ key_p``, where
    ``table`` is a fixed table of hashed values and ``(offset_p, key_p)`` a 64-bit
    hash of ``(seed, p)``. For each element, the noise is uniform over seeds
    (XOR with a uniform key), and a fresh seed per step draws fresh noise. This
    costs one XOR per element (~0.3 ns with the table read), where
    ``torch.randint`` with a seeded generator costs ~4 ns and a two-round integer
    hash of each index ~1.7 ns, on one core.

    Args:
        seed: any int (taken modulo 2**64).
        bits: 16 (bf16-sr) or 8 (bf16-kahan).
        out: an int32 tensor of ``count`` elements to fill, or None for a new one.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r})")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits!r}")
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got {start}, {count}")
    if out is None:
        out = torch.empty(count, dtype=torch.int32)
    elif out.dtype != torch.int32 or out.shape != (count,):
        raise ValueError(f"out must be an int32 tensor of shape ({count},), got {out.dtype} {tuple(out.shape)}")
    table, seed = _noise_table(bits), int(seed) & _MASK64
    position, stop = start, start + count
    while position < stop:
        period, local = divmod(position, _NOISE_PERIOD)
        length = min(stop - position, _NOISE_PERIOD - local)
        offset, key = _period_key(seed, period, bits)
        source = table[local + offset : local + offset + length]
        torch.bitwise_xor(source, key, out=out[position - start : position - start + length])
        position += length
    return out


# --------------------------------------------------------------------------- encode and decode


class Workspace:
    """Chunk-sized scratch buffers for :func:`encode_` and :func:`decode_`.

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
                torch.empty(_CHUNK), torch.empty(_CHUNK),
                torch.empty(_CHUNK, dtype=torch.int32), torch.empty(_CHUNK, dtype=torch.int32),
                torch.empty(_CHUNK, dtype=torch.int16), torch.empty(_CHUNK // _MIN_BLOCK),
            )
        return self._buffers


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
        workspace: scratch to reuse across calls (see :class:`Workspace`).
    """
    fmt = StateFormat.parse(fmt)
    names = _check_names(state_names)
    numel = _check_fp32("out", out, names)
    _check_regions(fmt, regions, names, numel)
    workspace = workspace or Workspace()
    for name in names:
        if name == "master":
            _decode_master(fmt, regions, out[name], workspace)
        elif fmt.moments == "fp32":
            _copy_(out[name], regions[name])
        else:
            _decode_moment(fmt, name.endswith("_sq"), regions[name], regions[name + ".scale"], out[name], workspace)


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
        workspace: scratch to reuse across calls (see :class:`Workspace`).
        decode_moments: False leaves 8-bit moments' ``values`` as they were (the
            master is always replaced). A caller that decodes the moments afresh
            before it reads them again saves a pass (~0.5 ns per element).
    """
    fmt = StateFormat.parse(fmt)
    names = _check_names(state_names)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r})")
    numel = _check_fp32("values", values, names)
    _check_regions(fmt, regions, names, numel)
    workspace = workspace or Workspace()
    for name in names:
        if name == "master":
            _encode_master_(fmt, values[name], regions, int(seed), workspace)
        elif fmt.moments == "fp32":
            _copy_(regions[name], values[name])
        else:
            _encode_moment_(
                fmt, name.endswith("_sq"), values[name], regions[name], regions[name + ".scale"], workspace,
                decode_moments,
            )


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
    for name, dtype, count in fmt._layout(names, numel):
        region = regions.get(name)
        if region is None:
            raise ValueError(f"format {fmt.name!r} needs a region {name!r}; build the regions with formats.views")
        if region.dtype != dtype or region.shape != (count,) or not region.is_contiguous():
            raise ValueError(
                f"region {name!r} of format {fmt.name!r} must be a contiguous {dtype} tensor of {count} elements, "
                f"got {region.dtype} of shape {tuple(region.shape)}"
            )


def _copy_(dst: Tensor, src: Tensor) -> None:
    if dst.data_ptr() != src.data_ptr():
        dst.copy_(src)


def _chunks(numel: int):
    for start in range(0, numel, _CHUNK):
        yield start, min(start + _CHUNK, numel)


# ---- master weights

# The largest finite patterns bf16 (16 bits kept) and bf16-kahan (24 bits kept)
# hold: finite values above them are clamped there, so no noise can carry them to inf.
_MAX_KEPT = {16: 0x7F7F0000, 8: 0x7F7FFF00}
_INF_BITS, _QUIET_NAN_BITS, _SIGN_BIT = 0x7F800000, 0x7FC00000, -(1 << 31)


def _decode_master(fmt: StateFormat, regions: Mapping[str, Tensor], out: Tensor, workspace: Workspace) -> None:
    if fmt.master == "fp32":
        _copy_(out, regions["master"])
        return
    if fmt.master == "bf16-sr":
        out.copy_(regions["master"])  # bf16 -> fp32 is exact: the low 16 bits become 0
        return
    high, low, scratch = regions["master"], regions["master.lo"], workspace.buffers()[3]
    out_bits = out.view(torch.int32)
    for start, stop in _chunks(out.numel()):
        out[start:stop].copy_(high[start:stop])
        work = scratch[: stop - start]
        work.copy_(low[start:stop]).bitwise_left_shift_(8)
        out_bits[start:stop].bitwise_or_(work)


def _encode_master_(
    fmt: StateFormat, values: Tensor, regions: Mapping[str, Tensor], seed: int, workspace: Workspace
) -> None:
    if fmt.master == "fp32":
        _copy_(regions["master"], values)
        return
    kahan = fmt.master == "bf16-kahan"
    dropped = 8 if kahan else 16
    limit_bits = _MAX_KEPT[dropped]
    limit = _bits_to_float(limit_bits)
    keep_mask = -(1 << dropped)
    high = regions["master"].view(torch.int16)
    low = regions["master.lo"] if kahan else None
    noise_buf, work_buf = workspace.buffers()[2:4]
    for start, stop in _chunks(values.numel()):
        chunk = values[start:stop]
        bits = chunk.view(torch.int32)
        least, most = torch.aminmax(chunk)  # nan makes both comparisons false
        if not (least.item() >= -limit and most.item() <= limit):
            _clamp_master_bits_(bits, limit_bits)
        noise = sr_noise(seed, start, stop - start, dropped, out=noise_buf[: stop - start])
        bits.add_(noise)  # see [Note: stochastic rounding]; cannot overflow after the clamp
        work = work_buf[: stop - start]
        if kahan:
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


# ---- 8-bit moments


def _moment_chunks(numel: int, block: int):
    """(start, stop, blocks): chunks of whole blocks, then the last, partial block on its own."""
    whole = numel - numel % block
    for start in range(0, whole, _CHUNK):
        stop = min(start + _CHUNK, whole)
        yield start, stop, (stop - start) // block
    if whole < numel:
        yield whole, numel, 1


def _decode_moment(
    fmt: StateFormat, unsigned: bool, codes: Tensor, scale: Tensor, out: Tensor, workspace: Workspace
) -> None:
    buffers = workspace.buffers()
    for start, stop, blocks in _moment_chunks(out.numel(), fmt.block):
        first = start // fmt.block
        scales = scale[first : first + blocks]
        _decode_chunk(fmt, unsigned, codes[start:stop], scales, out[start:stop], buffers[4], buffers[5])


def _decode_chunk(
    fmt: StateFormat, unsigned: bool, codes: Tensor, scales: Tensor, out: Tensor, half_buf: Tensor, factor_buf: Tensor
) -> None:
    """Decode one chunk of whole blocks (or one partial block) with the blocks' scales into ``out``."""
    if fmt.qmap == "dynamic":
        # See [Note: dynamic codes are truncated fp16 patterns].
        half = half_buf[: codes.numel()]
        if unsigned:
            half.copy_(codes).bitwise_left_shift_(7)
            multiplier = torch.mul(scales, 1.0 / _UNSIGNED_NORM, out=factor_buf[: scales.numel()])
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


def _encode_moment_(
    fmt: StateFormat, unsigned: bool, values: Tensor, codes: Tensor, scale: Tensor, workspace: Workspace,
    write_back: bool,
) -> None:
    work_buf, round_buf, index_buf, _, half_buf, factor_buf = workspace.buffers()
    dynamic = fmt.qmap == "dynamic"
    if dynamic:
        norm = _UNSIGNED_NORM if unsigned else 1.0
    else:
        norm = 255.0 if unsigned else 127.0
    typed = codes if (unsigned or dynamic) else codes.view(torch.int8)
    for start, stop, blocks in _moment_chunks(values.numel(), fmt.block):
        length = stop - start
        chunk, work = values[start:stop], work_buf[:length]
        first = start // fmt.block
        scales, factor = scale[first : first + blocks], factor_buf[:blocks]
        work_rows = work.view(blocks, -1)

        if unsigned:
            torch.threshold(chunk, 0.0, 0.0, out=work)  # negatives and -0.0 become +0.0; nan stays
        else:
            torch.abs(chunk, out=work)
        torch.amax(work_rows, dim=1, out=scales)
        scales.clamp_(min=_SCALE_FLOOR)  # nan stays nan
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
            _dynamic_codes(work, unsigned, index_buf[:length], out=target)
        elif unsigned:
            # A non-zero second moment never rounds to 0: max(round(y), 1), but 0 where y == 0.
            rounded = torch.round(work, out=round_buf[:length]).clamp_(min=1.0)
            target.copy_(torch.minimum(rounded, work.ceil_(), out=rounded))
        else:
            target.copy_(work.round_())  # half to even
        if write_back:
            # Decoded from the codes as decode_ does, so even the sign of a zero agrees.
            _decode_chunk(fmt, unsigned, codes[start:stop], scales, chunk, half_buf, factor_buf)


# Unsigned dynamic codes from the fp32 pattern of y in [0, 2**15]: adding half a
# code step (1 << 19) and shifting out 20 bits rounds y to 4 significant bits
# (ties away from zero; a mantissa carry moves to the next binade, which is the
# next code) and leaves 8 * exponent + mantissa; fp16's exponent bias is 112 below
# fp32's, hence 896. Signed codes look up the same 12 bits (with the sign) in a table.
_ROUND_UNSIGNED = (1 << 19) - (896 << 20)


def _dynamic_codes(y: Tensor, unsigned: bool, index: Tensor, *, out: Tensor) -> None:
    """Write the dynamic codes of the scaled, finite ``y`` (clobbered) to the uint8 ``out``."""
    bits = y.view(torch.int32)
    if not unsigned:
        torch.add(bits, 1 << 19, out=index)
        index.bitwise_right_shift_(20).bitwise_and_(0xFFF)
        torch.index_select(_signed_encode_lut(), 0, index, out=out)
        return
    torch.add(bits, _ROUND_UNSIGNED, out=index)
    index.bitwise_right_shift_(20).clamp_(_UNSIGNED_SMALLEST, _UNSIGNED_ONE)
    # The pattern of any y > 0 is >= 1 and that of y == 0 is 0, so this minimum is 0
    # exactly for y == 0: a non-zero second moment below the smallest code rounds
    # up to it (to a subnormal code k < 8 only if its own pattern is k, y < 2**-146).
    torch.minimum(index, bits, out=index)
    out.copy_(index)


# --------------------------------------------------------------------------- benchmark


def _bench(numel: int = 1 << 22, repeat: int = 5, compare: bool = True) -> dict[str, float]:
    """Time decode and encode of each region kind on one thread; print and return ns per element.

    With ``compare``, also times the alternatives the design rejected (see the
    module docstring): seeded ``torch.randint`` noise, a per-element integer hash,
    ``torch.bucketize`` over a 256-entry codebook and torch's fp8 E4M3 casts.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workspace = Workspace()
        generator = torch.Generator().manual_seed(0)
        results: dict[str, float] = {}

        def timed(label: str, fn) -> None:
            fn()
            best = math.inf
            for _ in range(repeat):
                begin = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - begin)
            results[label] = best / numel * 1e9

        cases = [
            ("master fp32 (a copy)", "fp32", "master"),
            ("master bf16-sr", "bf16-sr", "master"),
            ("master bf16-kahan", "bf16-kahan", "master"),
            ("moment 8bit dynamic signed", "8bit", "exp_avg"),
            ("moment 8bit dynamic unsigned", "8bit", "exp_avg_sq"),
            ("moment 8bit linear signed", "8bit-linear", "exp_avg"),
            ("moment 8bit linear unsigned", "8bit-linear", "exp_avg_sq"),
        ]
        for label, name, state in cases:
            fmt = StateFormat.parse(name)
            buf = torch.zeros(fmt.file_bytes([state], numel), dtype=torch.uint8)
            regions = views(fmt, buf, [state], numel)
            values = {state: torch.randn(numel, generator=generator)}
            if state.endswith("_sq"):
                values[state].square_()
            encode_(fmt, values, [state], regions, seed=1, workspace=workspace)
            timed(f"{label}: decode", lambda: decode_(fmt, regions, [state], values, workspace=workspace))
            timed(f"{label}: encode", lambda: encode_(fmt, values, [state], regions, seed=2, workspace=workspace))
            if state != "master":
                timed(f"{label}: encode, decode_moments=False", lambda: encode_(
                    fmt, values, [state], regions, seed=2, workspace=workspace, decode_moments=False))
        if compare:
            x, scratch = torch.randn(numel, generator=generator), torch.empty(numel, dtype=torch.int32)
            timed("alt: sr_noise (16 bits)", lambda: sr_noise(3, 0, numel, 16, out=scratch))
            timed("alt: torch.randint noise", lambda: torch.randint(
                0, 1 << 16, (numel,), generator=generator, dtype=torch.int32, out=scratch))
            timed("alt: integer hash noise", lambda: _hash_noise(3, scratch))
            codebook = code_table("dynamic", True).sort().values
            timed("alt: bucketize over 256 codes", lambda: torch.bucketize(x, codebook, out_int32=True, out=scratch))
            fp8 = torch.empty(numel, dtype=torch.float8_e4m3fn)
            timed("alt: fp32 -> fp8 e4m3 cast", lambda: fp8.copy_(x))
            timed("alt: fp8 e4m3 -> fp32 cast", lambda: x.copy_(fp8))
    finally:
        torch.set_num_threads(threads)
    width = max(map(len, results))
    print(f"{'one thread, ' + format(numel, ',') + ' elements':{width}}  ns/element")
    for label, ns in results.items():
        print(f"{label:{width}}  {ns:6.2f}")
    return results


def _hash_noise(seed: int, out: Tensor) -> None:
    """The rejected alternative to sr_noise: hash each element's index (two multiply-xorshift rounds)."""
    index = torch.arange(_CHUNK, dtype=torch.int32)
    shifted = torch.empty(_CHUNK, dtype=torch.int32)
    for start, stop in _chunks(out.numel()):
        h, t = out[start:stop], shifted[: stop - start]
        torch.add(index[: stop - start], (start ^ seed) & 0x7FFFFFFF, out=h).mul_(-1640531535)
        h.bitwise_xor_(torch.bitwise_right_shift(h, 15, out=t).bitwise_and_(0x1FFFF)).mul_(0x2C1B3C6D)
        h.bitwise_xor_(torch.bitwise_right_shift(h, 12, out=t).bitwise_and_(0xFFFFF))
        h.bitwise_right_shift_(16).bitwise_and_(0xFFFF)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Time nearstep's state-format codecs on one thread.")
    parser.add_argument("--numel", type=int, default=1 << 22)
    parser.add_argument("--json", help="also write the results to this file")
    arguments = parser.parse_args()
    timings = _bench(arguments.numel)
    if arguments.json:
        with open(arguments.json, "w") as file:
            json.dump({"unit": "ns/element", "threads": 1, "numel": arguments.numel, **timings}, file, indent=1)
