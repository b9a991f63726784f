"""Redundant tokens inside documents: repetition rules and boilerplate lines.

Two kinds of redundancy the near-duplicate search does not see:

* **Documents dominated by repetition** (the same lines, the same phrases over
  and over), judged by the rules of the Gopher quality filter (Rae et al. 2021,
  table A1), computed for a whole batch of documents with array operations.
* **Boilerplate lines**: a line that occurs in many different documents (a
  by-line, a copyright notice, a newsletter footer) carries no information about
  the document it is in. A :class:`LineCensus` counts, for every normalised line,
  the number of documents it occurs in; lines in at least ``min_docs`` documents
  are removed from the documents that are kept.

Definitions (the slow references in ``tests/test_data.py`` follow them word for
word): a document's *words* are its normalised words (see ``nearstep.data.hashing``);
a word's *chars* are its UTF-8 bytes; a *line* is the text between newlines, and
a line without words does not count; a line or n-gram *occurrence is a
duplicate* when an earlier line or n-gram of the same document is equal to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from .hashing import WordBatch, combine, line_hashes, mix64

__all__ = ["Rule", "RepetitionRules", "repetition", "LineCensus"]


class Rule(StrEnum):
    """The repetition rule a document failed (the first one, in this order)."""

    DUP_LINES = "dup_lines"
    DUP_LINE_CHARS = "dup_line_chars"
    TOP_NGRAM = "top_ngram"
    DUP_NGRAM = "dup_ngram"


@dataclass(frozen=True, kw_only=True, slots=True)
class RepetitionRules:
    """Thresholds of the repetition filter; a document over any of them is dropped.

    Attributes:
        dup_lines: most share of a document's lines that may be duplicates.
        dup_line_chars: most share of its chars that may lie in duplicate lines.
        top_ngram: for n = 2, 3, 4: most share of chars the occurrences of its most
            frequent n-gram may cover (occurrences times the n-gram's chars); the most
            frequent is the one with most occurrences (ties: most chars), and an
            n-gram that occurs once does not count (so a document that repeats
            nothing never fails this rule).
        dup_ngram: for n = 5..10: most share of chars that may lie in duplicate
            n-gram occurrences (each char counted once however many cover it).
        min_words: documents with fewer words are not judged (the shares mean little).
    """

    dup_lines: float = 0.30
    dup_line_chars: float = 0.20
    top_ngram: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngram: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    min_words: int = 20

    def __post_init__(self) -> None:
        for name, value in (("dup_lines", self.dup_lines), ("dup_line_chars", self.dup_line_chars)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a share between 0 and 1, got {value}")
        for n, share in self.top_ngram + self.dup_ngram:
            if n < 1 or not 0.0 <= share <= 1.0:
                raise ValueError(f"n-gram rules need n >= 1 and a share between 0 and 1, got ({n}, {share})")


def _first_in_doc(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is-duplicate per element, count of its key per element) for keys already salted with the document.

    One unstable sort (numpy's SIMD quicksort) instead of ``np.unique``'s stable one:
    the first occurrence of a key is found as the smallest position in its run.
    """
    n = len(keys)
    order = np.argsort(keys)
    sk = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], sk[1:] != sk[:-1])))
    run = np.repeat(np.arange(len(starts)), np.diff(np.concatenate((starts, [n]))))
    first = np.minimum.reduceat(order, starts)
    counts = np.diff(np.concatenate((starts, [n])))
    dup = np.empty(n, dtype=bool)
    dup[order] = order != first[run]
    count = np.empty(n, dtype=np.int64)
    count[order] = counts[run]
    return dup, count


def _salt(hashes: np.ndarray, doc: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return mix64(hashes ^ (doc.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)))


def repetition(batch: WordBatch, rules: RepetitionRules) -> list[Rule | None]:
    """The first rule each document of ``batch`` fails, or None."""
    docs = batch.docs
    failed: list[Rule | None] = [None] * docs
    if len(batch.hashes) == 0:
        return failed
    total = np.bincount(batch.doc, weights=batch.chars, minlength=docs)
    judged = batch.doc_words >= rules.min_words
    verdict = np.zeros(docs, dtype=np.int8)  # 0: passes; else 1 + index into order

    def mark(mask: np.ndarray, rule_index: int) -> None:
        hit = mask & judged & (verdict == 0)
        verdict[hit] = rule_index + 1

    order = [Rule.DUP_LINES, Rule.DUP_LINE_CHARS, Rule.TOP_NGRAM, Rule.DUP_NGRAM]
    lh, ldoc, lwords = line_hashes(batch)
    if len(lh):
        line_chars = np.add.reduceat(batch.chars, np.concatenate(([0], np.cumsum(lwords)[:-1])))
        dup, _ = _first_in_doc(_salt(lh, ldoc))
        lines = np.bincount(ldoc, minlength=docs)
        dup_lines = np.bincount(ldoc, weights=dup, minlength=docs)
        dup_chars = np.bincount(ldoc, weights=dup * line_chars, minlength=docs)
        with np.errstate(invalid="ignore", divide="ignore"):
            mark(dup_lines > rules.dup_lines * lines, 0)
            mark(dup_chars > rules.dup_line_chars * total, 1)
    char_prefix = np.concatenate(([0], np.cumsum(batch.chars)))
    for n, share in rules.top_ngram:
        grams = combine(batch.hashes, n)
        m = len(grams)
        if m == 0:
            continue
        valid = batch.doc[:m] == batch.doc[n - 1 : n - 1 + m]
        pos = np.flatnonzero(valid)
        owner = batch.doc[pos]
        _, counts = _first_in_doc(_salt(grams[pos], owner))
        chars = char_prefix[pos + n] - char_prefix[pos]
        best = np.zeros(docs)
        if len(pos):
            # The most frequent n-gram of each document (ties: the one covering most chars),
            # counted only when it occurs at least twice.
            cuts = np.flatnonzero(np.concatenate(([True], owner[1:] != owner[:-1])))  # owners ascend
            top = np.zeros(docs, dtype=np.int64)
            top[owner[cuts]] = np.maximum.reduceat(counts, cuts)
            value = np.where((counts == top[owner]) & (counts >= 2), counts * chars, 0)
            best[owner[cuts]] = np.maximum.reduceat(value, cuts)
        mark(best > share * total, 2)
    # Words in a duplicate n-gram are in a duplicate (n-1)-gram too, so each n's share is at
    # most the previous one's: only documents still over some later threshold go on.
    alive = judged & (verdict == 0)
    rules_up = sorted(rules.dup_ngram)
    for k, (n, share) in enumerate(rules_up):
        if not alive.any():
            break
        grams = combine(batch.hashes, n)
        m = len(grams)
        if m == 0:
            continue
        valid = (batch.doc[:m] == batch.doc[n - 1 : n - 1 + m]) & alive[batch.doc[:m]]
        pos = np.flatnonzero(valid)
        dup, _ = _first_in_doc(_salt(grams[pos], batch.doc[pos]))
        starts = pos[dup]
        size = len(batch.hashes) + 1
        cover = np.bincount(starts, minlength=size) - np.bincount(starts + n, minlength=size)
        covered = np.cumsum(cover[:-1]) > 0
        dup_chars = np.bincount(batch.doc, weights=batch.chars * covered, minlength=docs)
        mark(dup_chars > share * total, 3)
        later = min((s for _, s in rules_up[k + 1 :]), default=1.0)
        alive &= (verdict == 0) & (dup_chars > later * total)
    for d in np.flatnonzero(verdict):
        failed[d] = order[verdict[d] - 1]
    return failed


@dataclass(slots=True)
class LineCensus:
    """How many documents each normalised line occurs in (each line counted once per document).

    Held as two sorted arrays, 12 bytes per distinct line, never the text.
    """

    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint32))

    def add(self, batch: WordBatch, include: np.ndarray | None = None) -> None:
        """Count the lines of the documents of ``batch`` (those where ``include`` is true)."""
        lh, ldoc, _ = line_hashes(batch)
        if include is not None and len(lh):
            keep = include[ldoc]
            lh, ldoc = lh[keep], ldoc[keep]
        if len(lh) == 0:
            return
        per_doc = np.unique(_salt(lh, ldoc), return_index=True)[1]  # each line once per document
        new, counts = np.unique(lh[per_doc], return_counts=True)
        merged = np.concatenate((self.hashes, new))
        weights = np.concatenate((self.counts, counts.astype(np.uint32)))
        keys, inverse = np.unique(merged, return_inverse=True)
        self.hashes = keys
        self.counts = np.bincount(inverse, weights=weights, minlength=len(keys)).astype(np.uint32)

    def frequent(self, min_docs: int) -> np.ndarray:
        """Sorted hashes of the lines in at least ``min_docs`` documents."""
        return self.hashes[self.counts >= min_docs]

    def count(self, hashes: np.ndarray) -> np.ndarray:
        """Documents each of ``hashes`` occurs in (0 for lines never seen)."""
        pos = np.searchsorted(self.hashes, hashes)
        pos = np.minimum(pos, max(len(self.hashes) - 1, 0))
        if len(self.hashes) == 0:
            return np.zeros(len(hashes), dtype=np.uint32)
        return np.where(self.hashes[pos] == hashes, self.counts[pos], 0).astype(np.uint32)

    @property
    def nbytes(self) -> int:
        return int(self.hashes.nbytes + self.counts.nbytes)
