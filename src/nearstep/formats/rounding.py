"""Stochastic-rounding noise: :func:`sr_noise`, a pure function of a seed and an element's index.

The bf16 master codecs (:mod:`nearstep.formats.master`) add it to the fp32 bit
pattern before they drop its low bits; see [Note: stochastic rounding].
"""

from __future__ import annotations

import functools
import numbers

import torch
from torch import Tensor

__all__ = ["sr_noise"]

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
    hash of each index ~1.7 ns, on one core (``nearstep bench codecs``).

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
