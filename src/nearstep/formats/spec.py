"""What a state format is: :class:`StateFormat`, its parts (:class:`MasterPart`, :class:`MomentPart`,
:class:`QMap`) and its names.

A format is a frozen value made of closed sets; each part is backed by a codec
object (:attr:`StateFormat.master_codec`, :attr:`StateFormat.moment_codec`) that
owns that part's regions, decoding and encoding, so nothing outside the codecs
compares part names. The store records only :attr:`StateFormat.name`.
"""

from __future__ import annotations

import enum
import functools
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass

from nearstep.aio import PAGE, align_up

from .chunks import MAX_BLOCK, MIN_BLOCK
from .master import Bf16KahanMaster, Bf16SrMaster, Fp32Master, MasterCodec
from .moments import Bf16Moments, Fp8Moments, Fp32Moments, Int8Moments, MomentCodec
from .regions import MASTER, RegionSpec, check_names, layout, place

__all__ = ["StateFormat", "MasterPart", "MomentPart", "QMap", "FORMAT_NAMES", "DEFAULT_BLOCK"]

DEFAULT_BLOCK: int = 2048  # Dettmers et al. 2022 quantise moments in blocks of 2048
FORMAT_NAMES: tuple[str, ...] = (
    "fp32", "bf16-kahan", "bf16-sr", "8bit", "8bit-linear",
    "bf16-kahan+8bit", "bf16-kahan+8bit-linear", "bf16-sr+8bit", "bf16-sr+8bit-linear",
    "16bit", "fp8", "bf16-kahan+fp8", "bf16-sr+16bit", "bf16-sr+fp8",
)


class _Part(enum.StrEnum):
    """A part of a format: a str (``MasterPart.BF16_SR == "bf16-sr"``) that also reprs as one.

    The repr is the plain string's so that a StateFormat's repr, and any message
    quoting a part with ``!r``, read as they did when the parts were plain strings.
    """

    def __repr__(self) -> str:
        return repr(self.value)


class MasterPart(_Part):
    """How the master weights are stored (see :mod:`nearstep.formats.master`)."""

    FP32 = "fp32"
    BF16_KAHAN = "bf16-kahan"  # bf16 + an 8-bit compensation byte: 3 bytes
    BF16_SR = "bf16-sr"  # bf16 with stochastic rounding: 2 bytes


class MomentPart(_Part):
    """How the moments are stored (see :mod:`nearstep.formats.moments`)."""

    FP32 = "fp32"
    INT8 = "8bit"  # one byte per element + an fp32 scale per block
    BF16 = "16bit"  # bf16, rounded to nearest: 2 bytes, no blocks
    FP8 = "fp8"  # one fp8 byte per element (E4M3, E5M2 for *_sq) + an fp32 scale per block


class QMap(_Part):
    """The map of 8-bit moments (see :mod:`nearstep.formats.maps`)."""

    DYNAMIC = "dynamic"  # also the normalised value of formats without a map (fp32, 16bit, fp8)
    LINEAR = "linear"


@dataclass(frozen=True, slots=True)
class StateFormat:
    """How a state file stores the master weights and the moments.

    Attributes:
        master: ``"fp32"``, ``"bf16-kahan"`` (3 bytes: bf16 + an 8-bit compensation
            byte) or ``"bf16-sr"`` (2 bytes, stochastic rounding); a :class:`MasterPart`
            (a plain string is converted).
        moments: ``"fp32"``, ``"8bit"`` (1 byte + a block scale), ``"16bit"`` (bf16, 2
            bytes) or ``"fp8"`` (1 fp8 byte + a block scale); a :class:`MomentPart`.
        qmap: the 8-bit map, ``"dynamic"`` or ``"linear"``; ignored (normalised to
            ``"dynamic"``) for fp32, 16bit and fp8 moments; a :class:`QMap`.
        block: elements per quantisation block of 8-bit and fp8 moments, a power of
            two in [32, 65536]; ignored (normalised to 2048) for fp32 and 16bit moments.

    ``StateFormat.parse("bf16-sr+8bit")`` builds one from its name; ``.name`` is the
    canonical name, which the store records.
    """

    master: MasterPart = MasterPart.FP32
    moments: MomentPart = MomentPart.FP32
    qmap: QMap = QMap.DYNAMIC
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        for field, part in (("master", MasterPart), ("moments", MomentPart), ("qmap", QMap)):
            value, allowed = getattr(self, field), [member.value for member in part]
            if value not in allowed:
                raise ValueError(f"StateFormat.{field} must be one of {allowed}, got {value!r}")
            object.__setattr__(self, field, part(value))
        block = self.block
        if isinstance(block, bool) or not isinstance(block, numbers.Integral):
            raise TypeError(f"StateFormat.block must be an int, got {type(block).__name__} ({block!r})")
        if not (MIN_BLOCK <= block <= MAX_BLOCK and block & (block - 1) == 0):
            raise ValueError(
                f"StateFormat.block must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {block!r}"
            )
        object.__setattr__(self, "block", int(block))
        # Settings that change nothing must not make two equal formats compare unequal.
        if self.moments is not MomentPart.INT8:
            object.__setattr__(self, "qmap", QMap.DYNAMIC)  # only 8-bit moments have a map
        if self.moments in (MomentPart.FP32, MomentPart.BF16):
            object.__setattr__(self, "block", DEFAULT_BLOCK)  # no blocks

    @classmethod
    def parse(cls, spec: str | StateFormat | None) -> StateFormat:
        """A format from its name ("bf16-sr+8bit", ...), a StateFormat, or None (fp32).

        A name joins a master part (``bf16-kahan``, ``bf16-sr``) and a moments part
        (``8bit``, ``8bit-linear``, ``fp8``, each optionally ``-b<block>`` as in
        ``8bit-b1024`` or ``fp8-b1024``; ``16bit``) with "+", in either order;
        ``fp32`` alone means no compression.

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
        hint = (f"valid state formats: {choices} (8bit and fp8 parts may end in -b<block>, "
                "e.g. '8bit-b1024', 'fp8-b1024')")
        text = spec.strip()
        if text == "fp32":
            return cls()
        fields: dict[str, object] = {}
        for part in text.split("+"):
            part = part.strip()
            if part in (MasterPart.BF16_KAHAN, MasterPart.BF16_SR):
                key = "master"
            elif (match := re.fullmatch(r"(8bit(-linear)?|fp8)(?:-b(\d{1,6}))?|16bit", part)) is not None:
                key = "moments"
            else:
                raise ValueError(f"unknown state format {spec!r} (part {part!r}); {hint}")
            if key in fields:
                raise ValueError(f"state format {spec!r} names the {key} twice; {hint}")
            if key == "master":
                fields["master"] = MasterPart(part)
            elif part == MomentPart.BF16:
                fields["moments"] = MomentPart.BF16
            else:
                fields["moments"] = MomentPart.FP8 if match.group(1) == MomentPart.FP8 else MomentPart.INT8
                fields["qmap"] = QMap.LINEAR if match.group(2) else QMap.DYNAMIC
                if match.group(3):
                    fields["block"] = int(match.group(3))
        try:
            return cls(**fields)
        except ValueError as err:
            raise ValueError(f"state format {spec!r}: {err}") from None

    @property
    def name(self) -> str:
        """The canonical name; ``StateFormat.parse(fmt.name) == fmt``."""
        parts = [] if self.master is MasterPart.FP32 else [self.master.value]
        if self.moments is MomentPart.BF16:
            parts.append(self.moments.value)
        elif self.moments is not MomentPart.FP32:
            moments = "8bit-linear" if self.qmap is QMap.LINEAR else self.moments.value
            if self.block != DEFAULT_BLOCK:
                moments += f"-b{self.block}"
            parts.append(moments)
        return "+".join(parts) or "fp32"

    @property
    def master_codec(self) -> MasterCodec:
        """The codec of the master weights (one shared object per format)."""
        return _codecs(self)[0]

    @property
    def moment_codec(self) -> MomentCodec:
        """The codec of every moment (one shared object per format)."""
        return _codecs(self)[1]

    @property
    def is_identity(self) -> bool:
        """True when the file holds plain fp32 tensors, which the engine may use in place."""
        master, moments = _codecs(self)
        return master.identity and moments.identity

    @property
    def lossy_master(self) -> bool:
        """True when the master weights are rounded on the way to the file (any master but fp32)."""
        return not self.master_codec.identity

    @property
    def block_aligned(self) -> bool:
        """True when moments are blocked codes (8bit, fp8), so each parameter's segment of a slice
        must start on a multiple of :attr:`block` (see [Note: quantisation blocks per parameter]
        in ``nearstep.image``)."""
        return self.moment_codec.block_aligned

    def regions(self, state_names: Sequence[str], numel: int) -> tuple[RegionSpec, ...]:
        """The file's regions, in ``state_names`` order, each starting on a page boundary.

        ``state_names`` names the fp32 tensors of the state ("master" for the master
        weights, every other name a moment); ``numel`` is the elements of each.
        """
        names = check_names(state_names)
        if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 0:
            raise ValueError(f"numel must be an int >= 0, got {numel!r}")
        master, moments = _codecs(self)
        return place(layout(master, moments, names, int(numel)))

    def file_bytes(self, state_names: Sequence[str], numel: int) -> int:
        """Size of the state file: the last region's end rounded up to a page (at least one page)."""
        specs = self.regions(state_names, numel)
        return max(PAGE, align_up(specs[-1].end, PAGE))

    def bytes_per_param(self, state_names: Sequence[str]) -> float:
        """State bytes per parameter for large slices (page padding left out)."""
        names = check_names(state_names)
        master, moments = _codecs(self)
        master_bytes, moment_bytes = master.bytes_per_element, moments.bytes_per_element
        return sum(master_bytes if name == MASTER else moment_bytes for name in names)


_MASTER_CODECS: dict[MasterPart, type[MasterCodec]] = {
    MasterPart.FP32: Fp32Master, MasterPart.BF16_KAHAN: Bf16KahanMaster, MasterPart.BF16_SR: Bf16SrMaster,
}


@functools.cache
def _codecs(fmt: StateFormat) -> tuple[MasterCodec, MomentCodec]:
    # A frozen slots dataclass has no room for a cached attribute, so the codecs are
    # cached here, keyed by the (hashable, immutable) format. The codecs take their
    # parameters explicitly and never see a StateFormat: the codec modules sit below
    # this one.
    master = _MASTER_CODECS[fmt.master]()
    if fmt.moments is MomentPart.INT8:
        moments: MomentCodec = Int8Moments(qmap=fmt.qmap.value, block=fmt.block)
    elif fmt.moments is MomentPart.FP8:
        moments = Fp8Moments(block=fmt.block)
    elif fmt.moments is MomentPart.BF16:
        moments = Bf16Moments()
    else:
        moments = Fp32Moments()
    return master, moments
