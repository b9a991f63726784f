"""The filter: exact and near duplicates, repetition and boilerplate, decided in one ordered pass.

[Note: one decision per document, in corpus order]
The scan reads records in corpus order and decides each document once, using
only documents before it: that is what lets the streaming dataset hand out a
kept record as soon as it is decided, and what makes the offline tool and the
stream agree exactly (they run this same code). For document ``i``:

1. no words: skipped (``EMPTY``); unreadable or malformed: skipped, counted.
2. its exact hash (normalised words) was seen: dropped (``EXACT``), joined to
   the cluster of the first copy.
3. it fails a repetition rule: dropped (``REPETITION``), not clustered.
4. its MinHash bands collide with earlier clustered documents (at most
   ``max_bucket`` of the earliest per band bucket) and the signatures of at least
   one of them agree on a share >= ``threshold`` of entries: it joins their
   clusters (union-find, so clusters merge). Under ``Policy.CAP`` it is kept only
   while its cluster holds fewer than ``cap`` kept documents (``NEAR`` when
   dropped); under ``Policy.WEIGHT`` it is kept and weighted ``min(1, cap/size)``
   with ``size`` the kept members of its final cluster.
5. a kept document loses its boilerplate lines (lines in at least
   ``boilerplate_min_docs`` documents of the line census, taken first over every
   document that is not an exact copy); one left without words is ``BOILERPLATE``.

Batching (``batch``) changes only how many documents are hashed at once, never a
decision (tested).

[Note: the state on disk]
``state_dir`` holds ``state.json`` (the corpus fingerprint and the config
digest), ``census.npz``, and one ``part-NNNNNN.npz`` + ``.json`` per batch, the
``.json`` renamed into place last so a part is there whole or not at all. A scan
killed mid-way resumes after its last part; a finished scan (``complete`` in
``state.json``) is replayed without hashing anything. A different corpus listing
or config makes the state stale: it is removed and the scan starts over.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .filters import LineCensus, RepetitionRules, repetition
from .hashing import MinHasher, WordBatch, doc_hashes, line_hashes, lsh_bands, lsh_error_rates, mix64, shingles, words
from .lsh import BandIndex, Clusters
from .sources import Corpus, DataError, Record, Skip, SkipReason

__all__ = [
    "Policy",
    "Verdict",
    "FilterConfig",
    "Kept",
    "Leak",
    "ScanReport",
    "Filter",
]

STATE_VERSION = 2  # raised whenever a decision rule changes: older states are rescanned


class Policy(StrEnum):
    """What happens to the members of a near-duplicate cluster beyond the first ``cap``."""

    CAP = "cap"  # dropped
    WEIGHT = "weight"  # kept, with sample weights that sum to min(size, cap) per cluster


class Verdict(IntEnum):
    KEPT = 0
    EXACT = 1
    NEAR = 2
    REPETITION = 3
    BOILERPLATE = 4
    EMPTY = 5
    UNREADABLE = 6
    BAD_RECORD = 7


_SKIP_VERDICT = {SkipReason.UNREADABLE: Verdict.UNREADABLE, SkipReason.EMPTY: Verdict.EMPTY,
                 SkipReason.BAD_RECORD: Verdict.BAD_RECORD}


@functools.lru_cache(maxsize=64)
def _bands(threshold: float, num_perm: int, fp_weight: float, fn_weight: float) -> tuple[int, int]:
    return lsh_bands(threshold, num_perm, fp_weight, fn_weight)


@dataclass(frozen=True, kw_only=True, slots=True)
class FilterConfig:
    """What the filter removes.

    Attributes:
        threshold: Jaccard similarity of word ``ngram`` shingle sets at which two
            documents are near duplicates. The LSH banding is chosen for it (see
            ``bands``); candidates are then verified on the signatures, so the
            share of MinHash entries that agree must reach it too. Pairs near the
            threshold are found about half the time either way: the estimate's
            spread is ``sqrt(J(1-J)/num_perm)`` (0.035 at 0.8 with 128).
        num_perm: MinHash functions; more narrows that spread, costs linearly.
        ngram: words per shingle.
        seed: seed of the MinHash functions.
        policy: ``cap`` drops cluster members beyond ``cap``; ``weight`` keeps them
            with weights.
        cap: kept members per near-duplicate cluster (``cap``), or the total weight
            of a cluster (``weight``). Exact copies are always dropped.
        boilerplate_min_docs: a line in at least this many documents is removed
            from the kept ones; None turns it off.
        repetition: rules for documents dominated by repetition; None turns it off.
        max_bucket: earlier documents compared per LSH bucket (bounds the work on
            huge clusters of templated documents).
        batch: documents hashed at once (memory against per-call overhead).
        fp_weight, fn_weight: how the banding trades candidates below the threshold
            (time) against near duplicates missed (recall).
    """

    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    seed: int = 1
    policy: Policy = Policy.CAP
    cap: int = 1
    boilerplate_min_docs: int | None = 5
    repetition: RepetitionRules | None = field(default_factory=RepetitionRules)
    max_bucket: int = 256
    batch: int = 2048
    # Why recall-leaning weights: every candidate is verified on the signatures,
    # so a pair below the threshold that collides costs one comparison, while a
    # pair above it that never collides is lost for good. At 0.8 with 128
    # functions 0.2/0.8 picks 12 bands of 10 rows (a pair at 0.84 missed with
    # probability 0.09) instead of 0.5/0.5's 9 of 13 (0.36).
    fp_weight: float = 0.2
    fn_weight: float = 0.8

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be a Jaccard similarity between 0 and 1 (exclusive), got {self.threshold!r}")
        for name in ("num_perm", "ngram", "cap", "max_bucket", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.boilerplate_min_docs is not None and (not isinstance(self.boilerplate_min_docs, int) or self.boilerplate_min_docs < 2):
            raise ValueError(f"boilerplate_min_docs must be an integer >= 2 or None, got {self.boilerplate_min_docs!r}")
        object.__setattr__(self, "policy", Policy(self.policy))

    @property
    def bands(self) -> tuple[int, int]:
        """(bands, rows) of the LSH banding for ``threshold``."""
        return _bands(float(self.threshold), self.num_perm, self.fp_weight, self.fn_weight)

    def digest(self) -> str:
        """A digest of everything that changes a decision (``batch`` does not)."""
        fields = asdict(self)
        fields.pop("batch")
        return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Kept:
    """A record the filter keeps: its text without boilerplate lines, and its sample weight."""

    index: int
    text: str
    where: str
    fields: dict[str, Any]
    weight: float = 1.0
    removed_words: int = 0


@dataclass(frozen=True, slots=True)
class Leak:
    """A held-out document with a near (or exact) duplicate among the scanned ones."""

    held: int
    held_where: str
    train: int
    train_where: str
    similarity: float


@dataclass(frozen=True, slots=True)
class ScanReport:
    """What a scan found. ``to_dict()`` is what ``nearstep data scan --json`` prints."""

    corpus: str
    config: dict[str, Any]
    records: int
    bytes: int
    verdicts: dict[str, int]
    invalid_utf8: int
    skips: list[dict[str, Any]]
    clusters: int
    clustered_docs: int
    cluster_sizes: dict[int, int]
    largest: list[dict[str, Any]]
    repetition_rules: dict[str, int]
    boilerplate_lines: int
    boilerplate_words: int
    kept_words: int
    boilerplate_samples: list[dict[str, Any]]
    bands: int
    rows: int
    false_positive_area: float
    false_negative_area: float
    memory: dict[str, float]
    seconds: float
    resumed_from: int

    @property
    def kept(self) -> int:
        return self.verdicts.get(Verdict.KEPT.name.lower(), 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cluster_sizes"] = {str(k): v for k, v in self.cluster_sizes.items()}
        return d


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


_WORDY = None


def _worded(line: str) -> bool:
    """Whether a line has a word by the hashing's definition (an ASCII letter, digit, ``_`` or non-ASCII char)."""
    global _WORDY
    if _WORDY is None:
        import re

        _WORDY = re.compile(r"[0-9a-z_\u0080-\U0010ffff]")
    return _WORDY.search(line.lower()) is not None


class Filter:
    """The data filter over one corpus, with its state next to the data.

    Args:
        corpus: what to read (see ``nearstep.data.open_corpus``).
        config: what to remove.
        state_dir: where the scan's state lives; default next to the data
            (``<folder>/.nearstep-data``, ``<file>.nearstep-data``), in a
            sub-folder named by the config digest.

    Example:
        >>> f = Filter(open_corpus("articles/"), FilterConfig(threshold=0.7))
        >>> report = f.scan()           # resumes or replays a saved scan
        >>> for kept in f.records():    # the kept documents, boilerplate removed
        ...     train_on(kept.text, kept.weight)
    """

    def __init__(self, corpus: Corpus, config: FilterConfig | None = None, state_dir: str | os.PathLike | None = None) -> None:
        self.corpus = corpus
        self.config = config or FilterConfig()
        base = Path(state_dir) if state_dir is not None else corpus.default_state_dir()
        self.state_dir = base / f"filter-{self.config.digest()}"
        self._reset_memory()

    # -- state ---------------------------------------------------------------------------------

    def _reset_memory(self) -> None:
        cfg = self.config
        bands, rows = cfg.bands
        self._hasher = MinHasher(cfg.num_perm, cfg.seed)
        self._index = BandIndex(bands, rows, cfg.max_bucket, seed=cfg.seed + 6)
        self._sig_ids = np.zeros(0, dtype=np.int64)  # sorted corpus indices with a signature row
        self._sigs = np.zeros((0, cfg.num_perm), dtype=np.uint32)
        self._sig_parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._exact_keys = np.zeros(0, dtype=np.uint64)
        self._exact_ids = np.zeros(0, dtype=np.int64)
        self._clusters = Clusters()
        self._flags = np.zeros(0, dtype=np.int8)  # verdict by corpus index, for earlier documents
        self._verdicts: list[np.ndarray] = []
        self._indices: list[np.ndarray] = []
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self._census: LineCensus | None = None
        self._boiler: np.ndarray = np.zeros(0, dtype=np.uint64)
        self._stats: dict[str, Any] = self._empty_stats()
        self._next = 0
        self._part = 0
        self._complete = False
        self._resumed_from = 0

    @staticmethod
    def _empty_stats() -> dict[str, Any]:
        return {"records": 0, "bytes": 0, "invalid_utf8": 0, "skips": [], "rules": {}, "boiler_lines": 0,
                "boiler_words": 0, "kept_words": 0, "samples": {}, "seconds": 0.0}

    def _meta(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self.corpus.fingerprint(), "config": self.config.digest(),
                "corpus": self.corpus.name}

    def _open_state(self) -> None:
        """Load what a previous scan left, or start afresh when it is stale. See [Note: the state on disk]."""
        self._reset_memory()
        meta_path = self.state_dir / "state.json"
        meta = None
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = None
        want = self._meta()
        if meta is None or any(meta.get(k) != v for k, v in want.items()):
            if self.state_dir.exists():
                shutil.rmtree(self.state_dir)
            try:
                self.state_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DataError(f"cannot keep the scan's state in {self.state_dir} ({exc.strerror or exc}); "
                                f"pass state_dir= (or --state) a writable folder") from exc
            _atomic_write(meta_path, json.dumps({**want, "complete": False}).encode())
            return
        census = self.state_dir / "census.npz"
        if census.is_file():
            with np.load(census) as z:
                self._census = LineCensus(z["hashes"], z["counts"])
            self._set_boiler()
        part = 0
        while (self.state_dir / f"part-{part:06d}.json").is_file():
            self._load_part(part)
            part += 1
        self._part = part
        self._resumed_from = self._next
        self._complete = bool(meta.get("complete")) and self._census is not None

    def _load_part(self, part: int) -> None:
        info = json.loads((self.state_dir / f"part-{part:06d}.json").read_text())
        with np.load(self.state_dir / f"part-{part:06d}.npz") as z:
            arrays = {k: z[k] for k in z.files}
        self._absorb(arrays, replay=True)
        self._add_stats(info)
        self._next = info["next"]

    def _add_stats(self, info: dict[str, Any]) -> None:
        """Add one part's counts to the scan's (the same for a fresh part and a loaded one)."""
        st = self._stats
        for key in ("records", "bytes", "invalid_utf8", "boiler_lines", "boiler_words", "kept_words", "seconds"):
            st[key] += info[key]
        st["skips"].extend(info["skips"])
        for rule, n in info["rules"].items():
            st["rules"][rule] = st["rules"].get(rule, 0) + n
        for h, text in info["samples"].items():
            st["samples"].setdefault(h, text)

    def _absorb(self, a: dict[str, np.ndarray], replay: bool) -> None:
        """Fold one batch's decisions into memory; ``replay`` for a part loaded from disk.

        A fresh batch has already updated the clusters while it was decided; a loaded
        one rebuilds them from its edges and the final verdicts, which gives the same
        partition and kept counts (see ``Clusters``).
        """
        self._indices.append(a["indices"])
        self._verdicts.append(a["verdicts"])
        self._edges.append((a["edge_new"], a["edge_old"]))
        self._set_flags(a["indices"], a["verdicts"])
        if len(a["sig_ids"]):
            self._index.insert(self._index.band_keys(a["sigs"]), a["sig_ids"])
            self._sig_parts.append((a["sig_ids"], a["sigs"]))
        if len(a["exact_ids"]):
            k = np.concatenate((self._exact_keys, a["exact_keys"]))
            i = np.concatenate((self._exact_ids, a["exact_ids"]))
            order = np.argsort(k, kind="stable")
            self._exact_keys, self._exact_ids = k[order], i[order]
        if replay:
            clusters = self._clusters
            for i, j in zip(a["edge_new"].tolist(), a["edge_old"].tolist()):
                clusters.add(j, self._holds_place(j))
                clusters.add(i, self._holds_place(i))
                clusters.union(i, j)

    def _set_flags(self, indices: np.ndarray, verdicts: np.ndarray) -> None:
        if len(indices) == 0:
            return
        top = int(indices.max()) + 1
        if top > len(self._flags):
            grown = np.full(max(top, 2 * len(self._flags)), -1, dtype=np.int8)
            grown[: len(self._flags)] = self._flags
            self._flags = grown
        self._flags[indices] = verdicts

    def _holds_place(self, i: int) -> bool:
        return int(self._flags[i]) in (Verdict.KEPT, Verdict.BOILERPLATE)

    def _signature_of(self, ids: np.ndarray) -> np.ndarray:
        if self._sig_parts:
            self._sig_ids = np.concatenate([self._sig_ids] + [p[0] for p in self._sig_parts])
            self._sigs = np.concatenate([self._sigs] + [p[1] for p in self._sig_parts])
            self._sig_parts = []
        pos = np.searchsorted(self._sig_ids, ids)
        return self._sigs[pos]

    def _set_boiler(self) -> None:
        if self.config.boilerplate_min_docs is None or self._census is None:
            self._boiler = np.zeros(0, dtype=np.uint64)
        else:
            self._boiler = self._census.frequent(self.config.boilerplate_min_docs)

    # -- the census ------------------------------------------------------------------------------

    def _batches(self, start: int) -> Iterator[list[Record | Skip]]:
        batch: list[Record | Skip] = []
        for item in self.corpus.records(start):
            batch.append(item)
            if len(batch) >= self.config.batch:
                yield batch
                batch = []
        if batch:
            yield batch

    def _take_census(self) -> None:
        """Count lines over every document that is not an exact copy of an earlier one."""
        census = LineCensus()
        if self.config.boilerplate_min_docs is not None:
            seen = np.zeros(0, dtype=np.uint64)
            for batch in self._batches(0):
                texts = [r.text for r in batch if isinstance(r, Record)]
                wb = words(texts)
                h = doc_hashes(wb)
                _, first = np.unique(h, return_index=True)
                include = np.zeros(len(h), dtype=bool)
                include[first] = True
                include &= ~np.isin(h, seen) & (wb.doc_words > 0)
                census.add(wb, include)
                seen = np.union1d(seen, h[include])
        _save_npz(self.state_dir / "census.npz", hashes=census.hashes, counts=census.counts)
        self._census = census
        self._set_boiler()

    # -- the pass ----------------------------------------------------------------------------------

    def _decide(self, batch: list[Record | Skip]) -> tuple[list[Kept], dict[str, np.ndarray], dict[str, Any]]:
        """One batch through [Note: one decision per document, in corpus order]."""
        t0 = time.perf_counter()
        cfg = self.config
        n = len(batch)
        indices = np.array([r.index for r in batch], dtype=np.int64)
        verdicts = np.full(n, Verdict.KEPT, dtype=np.int8)
        info: dict[str, Any] = {"records": n, "bytes": 0, "invalid_utf8": 0, "skips": [], "rules": {},
                                "boiler_lines": 0, "boiler_words": 0, "kept_words": 0, "samples": {}}
        rec_pos = [p for p, r in enumerate(batch) if isinstance(r, Record)]
        for p, r in enumerate(batch):
            if isinstance(r, Skip):
                verdicts[p] = _SKIP_VERDICT[r.reason]
                info["skips"].append({"index": r.index, "where": r.where, "reason": str(r.reason), "detail": r.detail})
        records = [batch[p] for p in rec_pos]
        texts = [r.text for r in records]
        info["bytes"] = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        info["invalid_utf8"] = sum(1 for r in records if r.invalid_utf8)
        wb = words(texts)
        rp = np.array(rec_pos, dtype=np.int64)
        ridx = indices[rp] if len(rp) else np.zeros(0, dtype=np.int64)
        empty = wb.doc_words == 0
        for q in np.flatnonzero(empty):
            verdicts[rp[q]] = Verdict.EMPTY
            info["skips"].append({"index": int(ridx[q]), "where": records[q].where, "reason": str(SkipReason.EMPTY), "detail": "no words"})
        # Exact copies: of an earlier batch, or of an earlier document of this one.
        h = doc_hashes(wb)
        live = np.flatnonzero(~empty)
        exact_of = np.full(len(records), -1, dtype=np.int64)
        if len(self._exact_keys) and len(live):
            pos = np.minimum(np.searchsorted(self._exact_keys, h[live]), len(self._exact_keys) - 1)
            hit = self._exact_keys[pos] == h[live]
            exact_of[live[hit]] = self._exact_ids[pos[hit]]
        fresh = live[exact_of[live] < 0]
        _, first, inv = np.unique(h[fresh], return_index=True, return_inverse=True)
        firsts = fresh[first][inv]
        within = firsts != fresh
        exact_of[fresh[within]] = ridx[firsts[within]]
        new_exact = fresh[~within]
        dup = np.flatnonzero(exact_of >= 0)
        verdicts[rp[dup]] = Verdict.EXACT
        # Repetition, on the documents that are not copies.
        candidates = new_exact
        if cfg.repetition is not None and len(candidates):
            failed = repetition(wb, cfg.repetition)
            bad = np.array([failed[q] is not None for q in candidates], dtype=bool)
            for q in candidates[bad]:
                verdicts[rp[q]] = Verdict.REPETITION
                rule = str(failed[q])
                info["rules"][rule] = info["rules"].get(rule, 0) + 1
            candidates = candidates[~bad]
        # Near duplicates: signatures of the clustered documents of this batch.
        g, c = shingles(wb, cfg.ngram)
        keep_sh = np.zeros(len(records), dtype=bool)
        keep_sh[candidates] = True
        sig_all = self._hasher.signatures(g[np.repeat(keep_sh, c)], np.where(keep_sh, c, 0))
        sig_ids = ridx[candidates]
        sigs = sig_all[candidates]
        keys = self._index.band_keys(sigs) if len(sigs) else np.zeros((0, self._index.bands), dtype=np.uint64)
        new, old = self._index.candidates(keys, sig_ids)
        edge_new, edge_old = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if len(new):
            in_batch = np.searchsorted(sig_ids, new)
            sig_new = sigs[in_batch]
            old_in_batch = np.isin(old, sig_ids)
            sig_old = np.empty_like(sig_new)
            if old_in_batch.any():
                sig_old[old_in_batch] = sigs[np.searchsorted(sig_ids, old[old_in_batch])]
            if (~old_in_batch).any():
                sig_old[~old_in_batch] = self._signature_of(old[~old_in_batch])
            sim = (sig_new == sig_old).mean(axis=1)
            ok = sim >= cfg.threshold
            edge_new, edge_old = new[ok], old[ok]
        # Sequential decisions for the documents with a partner; the rest are new singletons.
        partners: dict[int, list[int]] = {}
        for i, j in zip(edge_new.tolist(), edge_old.tolist()):
            partners.setdefault(i, []).append(j)
        cl = self._clusters
        pos_of = {int(ridx[q]): int(rp[q]) for q in range(len(records))}
        exact_pairs = [(int(ridx[q]), int(exact_of[q])) for q in dup]
        todo = sorted([(i, "near") for i in partners] + [(i, "exact") for i, _ in exact_pairs])
        exact_map = dict(exact_pairs)
        # Verdicts of this batch so far, for partners decided earlier in it.
        self._set_flags(indices, verdicts)
        for i, kind in todo:
            if kind == "exact":
                first = exact_map[i]
                cl.add(first, self._holds_place(first))
                cl.add(i, False)
                cl.union(first, i)
                continue
            cl.add(i, False)
            for j in partners[i]:
                cl.add(j, self._holds_place(j))
                cl.union(i, j)
            r = cl.find(i)
            if cfg.policy is Policy.CAP and cl.kept[r] >= cfg.cap:
                verdicts[pos_of[i]] = Verdict.NEAR
                self._flags[i] = Verdict.NEAR
            else:
                cl.kept[r] += 1
        # Boilerplate lines out of the kept documents.
        kept_q = [q for q in range(len(records)) if verdicts[rp[q]] == Verdict.KEPT]
        kept: list[Kept] = []
        stripped = self._strip(wb, records, kept_q, info)
        for q, (text, removed) in zip(kept_q, stripped):
            if text is None:
                verdicts[rp[q]] = Verdict.BOILERPLATE
                continue
            r = records[q]
            kept.append(Kept(r.index, text, r.where, r.fields, 1.0, removed))
        arrays = {"indices": indices, "verdicts": verdicts, "sig_ids": sig_ids, "sigs": sigs,
                  "exact_keys": h[new_exact], "exact_ids": ridx[new_exact],
                  "edge_new": np.concatenate((edge_new, np.array([p[0] for p in exact_pairs], dtype=np.int64))),
                  "edge_old": np.concatenate((edge_old, np.array([p[1] for p in exact_pairs], dtype=np.int64)))}
        info["seconds"] = time.perf_counter() - t0
        return kept, arrays, info

    def _strip(self, wb: WordBatch, records: list[Record], kept_q: list[int], info: dict[str, Any]) -> list[tuple[str | None, int]]:
        """(text without boilerplate lines or None when nothing is left, words removed) per kept document."""
        out: list[tuple[str | None, int]] = []
        lh, ldoc, lwords = line_hashes(wb)
        boiler = np.isin(lh, self._boiler) if len(self._boiler) and len(lh) else np.zeros(len(lh), dtype=bool)
        per_doc_words = wb.doc_words
        line_starts = np.searchsorted(ldoc, np.arange(wb.docs + 1))
        for q in kept_q:
            a, b = line_starts[q], line_starts[q + 1]
            flags = boiler[a:b]
            total = int(per_doc_words[q])
            if not flags.any():
                info["kept_words"] += total
                out.append((records[q].text, 0))
                continue
            removed = int(lwords[a:b][flags].sum())
            info["boiler_lines"] += int(flags.sum())
            info["boiler_words"] += removed
            lines = records[q].text.split("\n")
            worded = [k for k, line in enumerate(lines) if _worded(line)]
            if len(worded) != b - a:
                raise AssertionError("line split disagrees with the hashing's lines")  # a bug, never input
            drop = {worded[k] for k in np.flatnonzero(flags).tolist()}
            for k in sorted(drop):
                key = str(int(lh[a + worded.index(k)]))
                if key not in info["samples"] and len(info["samples"]) < 50:
                    info["samples"][key] = lines[k].strip()[:200]
            if removed == total:
                out.append((None, removed))
                continue
            info["kept_words"] += total - removed
            out.append(("\n".join(line for k, line in enumerate(lines) if k not in drop), removed))
        return out

    def _scan_records(self) -> Iterator[Kept]:
        """Continue the scan from its saved progress, yielding each kept record as it is decided."""
        if self._census is None:
            self._take_census()
        for batch in self._batches(self._next):
            kept, arrays, info = self._decide(batch)
            self._absorb(arrays, replay=False)
            info["next"] = int(batch[-1].index) + 1
            # The part's arrays first, its .json last: the .json says the part is whole.
            _save_npz(self.state_dir / f"part-{self._part:06d}.npz", **arrays)
            _atomic_write(self.state_dir / f"part-{self._part:06d}.json", json.dumps(info).encode())
            self._add_stats(info)
            self._part += 1
            self._next = info["next"]
            yield from kept
        self._finish()

    def _finish(self) -> None:
        _atomic_write(self.state_dir / "state.json", json.dumps({**self._meta(), "complete": True}).encode())
        self._complete = True

    # -- public --------------------------------------------------------------------------------------

    def scan(self) -> ScanReport:
        """Scan the corpus, resuming a saved scan, or load a finished one; returns what it found."""
        self._open_state()
        if not self._complete:
            for _ in self._scan_records():
                pass
        return self.report()

    def records(self) -> Iterator[Kept]:
        """The kept records in corpus order, boilerplate lines removed.

        A finished scan is replayed (no hashing); otherwise the scan runs and, under
        ``Policy.CAP``, each record is yielded as soon as it is decided. Under
        ``Policy.WEIGHT`` the weights need every cluster's final size, so the scan
        completes before the first record.
        """
        self._open_state()
        if not self._complete and self.config.policy is Policy.CAP:
            yield from self._replay(stop=self._next)  # what an interrupted scan already decided
            yield from self._scan_records()
            return
        if not self._complete:
            for _ in self._scan_records():
                pass
        yield from self._replay()

    def _replay(self, stop: int | None = None) -> Iterator[Kept]:
        """The kept records of the scanned part of the corpus (indices below ``stop``), read again."""
        if stop == 0:
            return
        verdict = self.verdicts()
        weights = self.weights()
        pending: list[Record] = []

        def flush() -> Iterator[Kept]:
            wb = words([r.text for r in pending])
            info = {"boiler_lines": 0, "boiler_words": 0, "kept_words": 0, "samples": {}}
            for r, (text, removed) in zip(pending, self._strip(wb, pending, list(range(len(pending))), info)):
                if text is not None:
                    yield Kept(r.index, text, r.where, r.fields, float(weights.get(r.index, 1.0)), removed)
            pending.clear()

        for item in self.corpus.records(0):
            if stop is not None and item.index >= stop:
                break
            if isinstance(item, Record) and item.index < len(verdict) and verdict[item.index] == Verdict.KEPT:
                pending.append(item)
                if len(pending) >= self.config.batch:
                    yield from flush()
        if pending:
            yield from flush()

    def verdicts(self) -> np.ndarray:
        """The verdict (a ``Verdict`` value) of every scanned record, by index."""
        if not self._indices:
            return np.zeros(0, dtype=np.int8)
        idx = np.concatenate(self._indices)
        out = np.full(int(idx.max()) + 1, Verdict.BAD_RECORD, dtype=np.int8)
        out[idx] = np.concatenate(self._verdicts)
        return out

    def pairs(self) -> np.ndarray:
        """(k, 2) array of (later, earlier) index pairs the scan joined: verified near duplicates, and
        each exact copy with the first document of its text. Clusters are these pairs' connected parts."""
        if not self._edges:
            return np.zeros((0, 2), dtype=np.int64)
        return np.stack((np.concatenate([e[0] for e in self._edges]), np.concatenate([e[1] for e in self._edges])), axis=1)

    def cluster_of(self) -> dict[int, int]:
        """Cluster (its earliest document) of every document that has a duplicate; others are alone."""
        cl = self._clusters
        return {i: cl.find(i) for i in list(cl.parent)}

    def clusters(self) -> dict[int, list[int]]:
        """Clusters with two or more members (exact copies included): earliest document -> members."""
        out: dict[int, list[int]] = {}
        for i, r in self.cluster_of().items():
            out.setdefault(r, []).append(i)
        return {r: sorted(m) for r, m in sorted(out.items()) if len(m) > 1}

    def weights(self) -> dict[int, float]:
        """Sample weights below 1 (``Policy.WEIGHT``): ``min(1, cap / kept members of the cluster)``."""
        if self.config.policy is not Policy.WEIGHT:
            return {}
        verdict = self.verdicts()
        size: dict[int, int] = {}
        roots = self.cluster_of()
        for i, r in roots.items():
            if verdict[i] == Verdict.KEPT:
                size[r] = size.get(r, 0) + 1
        return {i: min(1.0, self.config.cap / size[r]) for i, r in roots.items()
                if verdict[i] == Verdict.KEPT and size[r] > self.config.cap}

    def split(self, held_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
        """(train, held-out) indices of the kept documents, every cluster wholly on one side.

        A cluster goes to the held-out side when a hash of its earliest document and
        ``seed`` falls below ``held_fraction``, so the split is the same on every
        machine and does not move when documents are added.
        """
        if not 0.0 < held_fraction < 1.0:
            raise ValueError(f"held_fraction must be between 0 and 1, got {held_fraction}")
        verdict = self.verdicts()
        roots = self.cluster_of()
        kept = np.flatnonzero(verdict == Verdict.KEPT)
        root = np.array([roots.get(int(i), int(i)) for i in kept], dtype=np.uint64)
        with np.errstate(over="ignore"):
            u = mix64(root * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)) >> np.uint64(11)
        held = u.astype(np.float64) / float(1 << 53) < held_fraction
        return kept[~held].tolist(), kept[held].tolist()

    def leaks(self, held: Corpus, among: np.ndarray | list[int] | None = None) -> list[Leak]:
        """Documents of ``held`` with an exact or near duplicate among the scanned documents.

        ``among`` restricts the scanned side to those indices (for example a
        training split). Call after ``scan()``.
        """
        if not self._complete:
            self.scan()
        restrict = None if among is None else set(np.asarray(among, dtype=np.int64).tolist())
        members_of: dict[int, list[int]] = {}
        for i, r in self.cluster_of().items():
            members_of.setdefault(r, []).append(i)
        roots = self._clusters
        out: list[Leak] = []
        batch_records: list[Record] = []

        def check(recs: list[Record]) -> None:
            wb = words([r.text for r in recs])
            h = doc_hashes(wb)
            g, c = shingles(wb, self.config.ngram)
            sigs = self._hasher.signatures(g, c)
            ids = np.arange(len(recs), dtype=np.int64)
            live = wb.doc_words > 0
            matches: dict[int, list[tuple[float, int]]] = {}
            if len(self._exact_keys):
                pos = np.minimum(np.searchsorted(self._exact_keys, h), len(self._exact_keys) - 1)
                for q in np.flatnonzero((self._exact_keys[pos] == h) & live):
                    matches.setdefault(int(q), []).append((1.0, int(self._exact_ids[pos[q]])))
            # Query only: the held documents are not added to the index.
            keys = self._index.band_keys(sigs[live])
            qids = ids[live]
            m = self._index.max_bucket
            for band in range(self._index.bands):
                hk, hid = self._index.keys[band], self._index.ids[band]
                lo = np.searchsorted(hk, keys[:, band], side="left")
                hi = np.minimum(np.searchsorted(hk, keys[:, band], side="right"), lo + m)
                for q, a, b in zip(qids.tolist(), lo.tolist(), hi.tolist()):
                    if b <= a:
                        continue
                    others = hid[a:b]
                    sim = (self._signature_of(others) == sigs[q]).mean(axis=1)
                    for j, s in zip(others[sim >= self.config.threshold].tolist(), sim[sim >= self.config.threshold].tolist()):
                        matches.setdefault(q, []).append((float(s), int(j)))
            for q in sorted(matches):
                # The most similar match whose cluster has a member on the scanned side asked for.
                for s, j in sorted(matches[q], key=lambda sj: (-sj[0], sj[1])):
                    members = sorted(members_of[roots.find(j)]) if j in roots.parent else [j]
                    if restrict is not None:
                        members = [x for x in members if x in restrict]
                    if members:
                        out.append(Leak(recs[q].index, recs[q].where, members[0], self.corpus.where(members[0]), s))
                        break

        for item in held.records(0):
            if isinstance(item, Record):
                batch_records.append(item)
                if len(batch_records) >= self.config.batch:
                    check(batch_records)
                    batch_records = []
        if batch_records:
            check(batch_records)
        return out

    def report(self, largest: int = 10) -> ScanReport:
        cfg = self.config
        verdict = self.verdicts()
        counts = {v.name.lower(): int((verdict == v).sum()) for v in Verdict}
        clusters = self.clusters()
        sizes: dict[int, int] = {}
        for m in clusters.values():
            sizes[len(m)] = sizes.get(len(m), 0) + 1
        big = sorted(clusters.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:largest]
        st = self._stats
        bands, rows = cfg.bands
        fp, fn = lsh_error_rates(cfg.threshold, bands, rows)
        indexed = max(int(len(self._sig_ids) + sum(len(p[0]) for p in self._sig_parts)), 1)
        records = max(st["records"], 1)
        census = self._census.nbytes if self._census is not None else 0
        memory = {
            "signature_bytes_per_doc": cfg.num_perm * 4,
            "index_bytes_per_doc": self._index.nbytes / indexed,
            "exact_bytes_per_doc": (self._exact_keys.nbytes + self._exact_ids.nbytes) / records,
            "census_bytes": census,
            "held_bytes_per_doc": (cfg.num_perm * 4 * indexed + self._index.nbytes + self._exact_keys.nbytes
                                   + self._exact_ids.nbytes + len(verdict)) / records,
        }
        samples = sorted(st["samples"].items())
        counted = self._census.count(np.array([int(k) for k, _ in samples], dtype=np.uint64)) if samples and self._census else []
        sample_list = sorted(({"line": text, "documents": int(n)} for (_, text), n in zip(samples, counted)),
                             key=lambda d: -d["documents"])[:20]
        return ScanReport(
            corpus=self.corpus.name, config={**{k: (str(v) if isinstance(v, StrEnum) else v) for k, v in asdict(cfg).items()}},
            records=st["records"], bytes=st["bytes"], verdicts=counts, invalid_utf8=st["invalid_utf8"],
            skips=st["skips"][:100], clusters=len(clusters), clustered_docs=sum(len(m) for m in clusters.values()),
            cluster_sizes=dict(sorted(sizes.items())),
            largest=[{"size": len(m), "members": [int(x) for x in m[:8]]} for _, m in big],
            repetition_rules=dict(st["rules"]), boilerplate_lines=st["boiler_lines"], boilerplate_words=st["boiler_words"],
            kept_words=st["kept_words"], boilerplate_samples=sample_list, bands=bands, rows=rows,
            false_positive_area=fp, false_negative_area=fn, memory=memory, seconds=st["seconds"],
            resumed_from=self._resumed_from,
        )

