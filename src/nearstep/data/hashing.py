"""Vectorised text hashing: words, lines, word n-gram shingles, MinHash signatures, LSH bands.

Every hash here is computed for a whole batch of documents at once with numpy,
never per word in Python: the batch is joined into one byte array, word and
line boundaries are found with array operations, and each word's hash is a
polynomial over its bytes read off prefix sums (see ``[Note: word hashes from
prefix sums]``). The hashes are deterministic across processes and machines
(no ``PYTHONHASHSEED``), so a scan's persisted state stays valid.

Normalisation: text is lower-cased; a word is a maximal run of ASCII letters,
digits, ``_`` and non-ASCII characters (so accented and non-Latin words stay
whole); everything else separates words. Two documents that differ only in
case, punctuation or spacing have the same words and so the same exact hash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "MASK64",
    "mix64",
    "WordBatch",
    "words",
    "combine",
    "shingles",
    "doc_hashes",
    "line_hashes",
    "MinHasher",
    "lsh_bands",
    "collision_probability",
    "lsh_error_rates",
    "expected_std",
]

MASK64 = (1 << 64) - 1
_BASE = 0x100000001B3  # odd, so it has an inverse modulo 2**64
_SEP = 0  # the byte that separates documents in a batch (NUL is replaced by a space first)

# Bytes that belong to a word: [0-9a-z_] after lower-casing, and every byte of a
# multi-byte UTF-8 character.
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[ord("0") : ord("9") + 1] = True
_WORD_BYTE[ord("a") : ord("z") + 1] = True
_WORD_BYTE[ord("_")] = True
_WORD_BYTE[128:] = True


def _inverse64(odd: int) -> int:
    inv = odd
    for _ in range(6):  # Newton's iteration doubles the correct low bits each time
        inv = (inv * (2 - odd * inv)) & MASK64
    return inv


_BASE_INV = _inverse64(_BASE)


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on uint64 (a bijection that spreads every bit)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_POWER_TABLES: dict[int, np.ndarray] = {}


def _powers(base: int, n: int) -> np.ndarray:
    """``base**i mod 2**64`` for i < n, from a table that grows by doubling (batches reuse it)."""
    table = _POWER_TABLES.get(base)
    if table is None or len(table) < n:
        size = max(n, 2 * len(table) if table is not None else 1 << 16)
        out = np.full(size, base, dtype=np.uint64)
        out[0] = 1
        with np.errstate(over="ignore"):
            table = np.cumprod(out, dtype=np.uint64)  # wraps modulo 2**64, the arithmetic wanted
        _POWER_TABLES[base] = table
    return table[:n]


@dataclass(frozen=True, slots=True)
class WordBatch:
    """The words of a batch of documents.

    Attributes:
        hashes: one uint64 per word, in document order.
        doc: the document (index in the batch) of each word.
        line: a running line number of each word, unique across the batch.
        chars: the length of each word in bytes.
        doc_words: words per document.
    """

    hashes: np.ndarray
    doc: np.ndarray
    line: np.ndarray
    chars: np.ndarray
    doc_words: np.ndarray

    @property
    def docs(self) -> int:
        return len(self.doc_words)

    def starts(self) -> np.ndarray:
        """Index of each document's first word (documents without words repeat the next start)."""
        return np.concatenate(([0], np.cumsum(self.doc_words)[:-1])).astype(np.int64)


# [Note: word hashes from prefix sums]
# With F[i] = sum_{j<i} c_j * B^-j (a cumulative sum, all modulo 2**64), the
# polynomial hash of the bytes [s, e) is sum_j c_j * B^(e-1-j) = B^(e-1) * (F[e] - F[s]).
# One cumsum and two power tables give every word's hash without a Python loop;
# numpy's uint64 arithmetic wraps modulo 2**64, which is exactly the ring the
# polynomial lives in. The result goes through mix64 because a polynomial hash's
# low bits are weak.
def words(texts: Sequence[str]) -> WordBatch:
    """Split a batch of documents into normalised words and hash them."""
    joined = "\x00".join(t.replace("\x00", " ") if "\x00" in t else t for t in texts)
    raw = np.frombuffer(joined.lower().encode("utf-8", "surrogatepass"), dtype=np.uint8)
    n = len(raw)
    is_word = _WORD_BYTE[raw] if n else np.zeros(0, dtype=bool)
    padded = np.concatenate(([False], is_word, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    seps = np.flatnonzero(raw == _SEP)
    newlines = np.flatnonzero((raw == 10) | (raw == _SEP))
    doc = np.searchsorted(seps, starts).astype(np.int64)
    line = np.searchsorted(newlines, starts).astype(np.int64)
    doc_words = np.bincount(doc, minlength=len(texts)).astype(np.int64)
    if len(starts) == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return WordBatch(empty, doc, line, np.zeros(0, dtype=np.int64), doc_words)
    codes = raw.astype(np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        scaled = codes * _powers(_BASE_INV, n)
        prefix = np.concatenate((np.zeros(1, dtype=np.uint64), np.cumsum(scaled, dtype=np.uint64)))
        pw = _powers(_BASE, n)
        hashes = pw[ends - 1] * (prefix[ends] - prefix[starts])
        hashes = mix64(hashes ^ (ends - starts).astype(np.uint64))
    return WordBatch(hashes, doc, line, (ends - starts).astype(np.int64), doc_words)


_SHINGLE_MUL = np.uint64(0x9E3779B97F4A7C15)


def combine(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every run of ``n`` consecutive elements (``len - n + 1`` of them), order-sensitive."""
    m = len(hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = hashes[:m].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            out = mix64(out * _SHINGLE_MUL + hashes[k : k + m])
    return out


def _segment_hash(values: np.ndarray, segment: np.ndarray, count: int) -> np.ndarray:
    """One order-sensitive hash per segment of ``values`` (segments contiguous, sorted): the prefix trick again."""
    out = np.zeros(count, dtype=np.uint64)
    if len(values) == 0:
        return out
    n = len(values)
    with np.errstate(over="ignore"):
        scaled = values * _powers(_BASE_INV, n)
        prefix = np.concatenate((np.zeros(1, dtype=np.uint64), np.cumsum(scaled, dtype=np.uint64)))
        bounds = np.flatnonzero(np.concatenate(([True], segment[1:] != segment[:-1], [True])))
        s, e = bounds[:-1], bounds[1:]
        h = _powers(_BASE, n)[e - 1] * (prefix[e] - prefix[s])
        out[segment[s]] = mix64(h ^ (e - s).astype(np.uint64))
    return out


def doc_hashes(batch: WordBatch) -> np.ndarray:
    """The exact-duplicate hash of each document: its normalised word sequence (0 for a document without words)."""
    return _segment_hash(batch.hashes, batch.doc, batch.docs)


def line_hashes(batch: WordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash, document, words) of every line that has words; lines are in document order."""
    if len(batch.hashes) == 0:
        z = np.zeros(0, dtype=np.int64)
        return np.zeros(0, dtype=np.uint64), z, z
    bounds = np.flatnonzero(np.concatenate(([True], batch.line[1:] != batch.line[:-1])))
    ids = np.repeat(np.arange(len(bounds)), np.diff(np.concatenate((bounds, [len(batch.line)]))))
    hashes = _segment_hash(batch.hashes, ids, len(bounds))
    counts = np.diff(np.concatenate((bounds, [len(batch.line)])))
    return hashes, batch.doc[bounds], counts


def shingles(batch: WordBatch, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, per-document counts) of the word ``n``-gram shingles, documents in order.

    A document with fewer than ``n`` words (but at least one) has one shingle: all
    its words. A document without words has none.
    """
    grams = combine(batch.hashes, n)
    m = len(grams)
    if m:
        valid = batch.doc[:m] == batch.doc[n - 1 : n - 1 + m]
        grams, owner = grams[valid], batch.doc[:m][valid]
    else:
        owner = np.zeros(0, dtype=np.int64)
    short = np.flatnonzero((batch.doc_words > 0) & (batch.doc_words < n))
    if len(short):
        whole = doc_hashes(batch)[short]
        grams = np.concatenate((grams, whole))
        owner = np.concatenate((owner, short))
        order = np.argsort(owner, kind="stable")
        grams, owner = grams[order], owner[order]
    return grams, np.bincount(owner, minlength=batch.docs).astype(np.int64)


class MinHasher:
    """MinHash signatures with ``num_perm`` hash functions ``x -> a*x + b mod 2**32``.

    The shingle hashes are already mixed 64-bit values; their top 32 bits are the
    keys. Each affine map with an odd ``a`` is a bijection of the 32-bit keys, a
    different pseudo-random ordering of them, so the minimum under it picks a
    uniformly random shingle of the document. 32-bit arithmetic moves half the
    bytes of 64-bit arithmetic; ``tests/test_data.py`` checks that the estimate
    is unbiased with the binomial spread ``sqrt(J(1-J)/num_perm)``.
    Estimated Jaccard = the fraction of equal entries of two signatures.
    """

    def __init__(self, num_perm: int = 128, seed: int = 1, block: int = 4096) -> None:
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        rng = np.random.Generator(np.random.PCG64(seed))
        self.num_perm = num_perm
        self.a = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        self.b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint32)
        # Shingles per matrix: block * num_perm * 4 bytes of scratch, sized to stay in cache.
        self.block = block

    def signatures(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(documents, num_perm) uint32; a document without shingles gets all 0xFFFFFFFF."""
        docs = len(counts)
        out = np.full((docs, self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        if docs == 0 or len(hashes) == 0:
            return out
        keys = (hashes >> np.uint64(32)).astype(np.uint32)
        ends = np.cumsum(counts)
        starts = ends - counts
        owners = np.flatnonzero(counts)
        wide = np.empty((self.num_perm, self.block), dtype=np.uint32)
        tall = np.empty((self.block, self.num_perm), dtype=np.uint32)
        with np.errstate(over="ignore"):
            for s0 in range(0, len(keys), self.block):
                s1 = min(s0 + self.block, len(keys))
                # The documents with shingles in [s0, s1), cut to the block.
                lo = int(np.searchsorted(ends[owners], s0, side="right"))
                hi = int(np.searchsorted(starts[owners], s1, side="left"))
                seg = owners[lo:hi]
                cuts = np.maximum(starts[seg], s0) - s0
                # numpy's reduceat is fast along a contiguous axis with few segments and
                # slow per segment there; many short documents take the other layout.
                if len(seg) <= 16:
                    vals = wide[:, : s1 - s0]
                    np.multiply(self.a[:, None], keys[None, s0:s1], out=vals)
                    vals += self.b[:, None]
                    mins = np.minimum.reduceat(vals, cuts, axis=1).T
                else:
                    vals = tall[: s1 - s0]
                    np.multiply(keys[s0:s1, None], self.a[None, :], out=vals)
                    vals += self.b[None, :]
                    mins = np.minimum.reduceat(vals, cuts, axis=0)
                out[seg] = np.minimum(out[seg], mins)
        return out


def collision_probability(similarity: np.ndarray | float, bands: int, rows: int) -> np.ndarray:
    """P(two documents of Jaccard ``similarity`` share at least one of ``bands`` bands of ``rows`` rows)."""
    s = np.asarray(similarity, dtype=np.float64)
    return 1.0 - (1.0 - s**rows) ** bands


def lsh_error_rates(threshold: float, bands: int, rows: int, points: int = 2001) -> tuple[float, float]:
    """(false-positive area, false-negative area) of a banding for ``threshold``.

    False-positive area: the integral of the collision probability over
    similarities below the threshold (pairs below it that still become candidates);
    false-negative area: the integral of the miss probability above it.
    """
    lo = np.linspace(0.0, threshold, points)
    hi = np.linspace(threshold, 1.0, points)
    fp = float(np.trapezoid(collision_probability(lo, bands, rows), lo))
    fn = float(np.trapezoid(1.0 - collision_probability(hi, bands, rows), hi))
    return fp, fn


def lsh_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """The (bands, rows) with ``bands * rows <= num_perm`` that minimise the weighted error areas.

    Raising ``fn_weight`` finds more of the true near duplicates at the price of
    more candidates to verify; raising ``fp_weight`` the reverse. Candidates are
    verified against the signatures afterwards, so false positives cost time,
    false negatives cost recall.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"the Jaccard threshold must be between 0 and 1 (exclusive), got {threshold}")
    best: tuple[float, int, int] | None = None
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp, fn = lsh_error_rates(threshold, bands, rows, points=201)
            err = fp_weight * fp + fn_weight * fn
            if best is None or err < best[0] - 1e-15:
                best = (err, bands, rows)
    assert best is not None
    return best[1], best[2]


def expected_std(similarity: float, num_perm: int) -> float:
    """Standard deviation of the MinHash estimate of ``similarity`` with ``num_perm`` functions."""
    return math.sqrt(max(similarity * (1.0 - similarity), 0.0) / num_perm)
