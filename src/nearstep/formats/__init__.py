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
* ``moments``: ``"fp32"``; ``"8bit"``: one byte per element plus one fp32 scale
  (the absolute maximum, at least 2**-100) per block of ``block`` elements, as in
  the block-wise 8-bit optimizers of Dettmers et al. 2022 ("8-bit Optimizers via
  Block-wise Quantization"); moments named ``*_sq`` (Adam's second moment) are
  non-negative and use an unsigned map, the others a signed one. ``"16bit"``:
  bf16, rounded to nearest, 2 bytes, no blocks. ``"fp8"``: one fp8 byte per
  element plus an fp32 scale per block, as ``"8bit"``: E4M3 for signed moments,
  E5M2 (more range, for squares) for ``*_sq`` ones, after FP8-LM (Peng et al.
  2023). Second moments never decode to 0 unless they are 0, in every format.

State bytes per parameter (AdamW: master + ``exp_avg`` + ``exp_avg_sq``; a step
reads and writes them, so it moves twice as many)::

    format               master  moments          state  moved per step
    fp32                 4       8                12     24
    8bit, fp8            4       2 * (1 + 4/2048) ~6.004 ~12.008
    16bit                4       2 * 2            8      16
    bf16-kahan           3       8                11     22
    bf16-sr              2       8                10     20
    bf16-kahan+8bit      3       2 * (1 + 4/2048) ~5.004 ~10.008
    bf16-kahan+fp8       3       2 * (1 + 4/2048) ~5.004 ~10.008
    bf16-sr+8bit         2       2 * (1 + 4/2048) ~4.004 ~8.008
    bf16-sr+fp8          2       2 * (1 + 4/2048) ~4.004 ~8.008
    bf16-sr+16bit        2       2 * 2            6      12

SGD with momentum and Lion keep one moment, so their 8-bit and fp8 moments cost
~1.002 bytes, their 16bit moments 2.

Where each concept lives (each module imports only those above it in this list):

* ``chunks``: the chunk size (:data:`CHUNK`) and the scratch of a chunk
  (:class:`Workspace`); [Note: formats work in chunks].
* ``maps``: the 8-bit quantisation maps (``qmap``: ``"dynamic"``, ``"linear"``),
  their code tables (:func:`code_table`) and why the dynamic map is built as it is;
  [Note: dynamic codes are truncated fp16 patterns].
* ``rounding``: stochastic-rounding noise (:func:`sr_noise`); [Note: stochastic rounding].
* ``master``: the master codecs (:class:`MasterCodec`: fp32, bf16-sr, bf16-kahan),
  non-finite masters.
* ``moments``: the moment codecs (:class:`MomentCodec`: fp32, 8-bit, bf16, fp8),
  non-finite moments, what rounding to nearest costs slow averages.
* ``regions``: the region layout of a file (:class:`RegionSpec`).
* ``spec``: :class:`StateFormat`, its parts (:class:`MasterPart`,
  :class:`MomentPart`, :class:`QMap`) and names (:data:`FORMAT_NAMES`).
* ``native``: the same codecs as C loops over a range, built with the machine's C
  compiler on first use and bit for bit the torch ones, which run where no compiler
  is present; [Note: why the codecs have a native pass].
* ``codec``: :func:`views`, :func:`decode_` and :func:`encode_` over a whole file;
  :func:`window` and :class:`SliceCoder` over element ranges (the device's pass,
  [Note: one pass per chunk] in ``nearstep.engine``).

The codecs' speed is measured by ``nearstep bench codecs``; the device's pass with
them by ``nearstep bench io`` (per-format rows).
"""

from __future__ import annotations

from .chunks import CHUNK, Workspace
from .codec import SliceCoder, decode_, encode_, views, window
from .maps import code_table
from .master import MasterCodec
from .moments import MomentCodec
from .regions import RegionSpec, per_block
from .rounding import sr_noise
from .spec import DEFAULT_BLOCK, FORMAT_NAMES, MasterPart, MomentPart, QMap, StateFormat

__all__ = [
    "StateFormat", "RegionSpec", "Workspace", "FORMAT_NAMES", "DEFAULT_BLOCK",
    "views", "decode_", "encode_", "code_table", "sr_noise",
    "MasterPart", "MomentPart", "QMap", "MasterCodec", "MomentCodec", "CHUNK", "SliceCoder", "window", "per_block",
]
