"""LSH buckets and clusters: the two structures a scan keeps per document besides its signature."""

from __future__ import annotations

import numpy as np

from .hashing import mix64

__all__ = ["BandIndex", "Clusters"]


class BandIndex:
    """LSH buckets: per band, the band keys of the clustered documents, sorted, with their indices.

    16 bytes per document per band; no texts, no signatures.
    """

    def __init__(self, bands: int, rows: int, max_bucket: int, seed: int = 7) -> None:
        self.bands, self.rows, self.max_bucket = bands, rows, max_bucket
        rng = np.random.Generator(np.random.PCG64(seed))
        self._mul = rng.integers(0, 1 << 63, size=(bands, rows), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.keys = [np.zeros(0, dtype=np.uint64) for _ in range(bands)]
        self.ids = [np.zeros(0, dtype=np.int64) for _ in range(bands)]

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(documents, bands) uint64: one key per band of ``rows`` signature entries."""
        n = len(signatures)
        sig = signatures[:, : self.bands * self.rows].astype(np.uint64).reshape(n, self.bands, self.rows)
        with np.errstate(over="ignore"):
            return mix64((sig * self._mul[None]).sum(axis=2, dtype=np.uint64) ^ np.arange(self.bands, dtype=np.uint64))

    def candidates(self, keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(new, earlier) index pairs: documents ``ids`` (ascending) against the index and each other.

        Each document meets, per band, the earliest ``max_bucket`` documents of its
        bucket, whichever batch they came in.
        """
        news, olds = [], []
        m = self.max_bucket
        for band in range(self.bands):
            k = keys[:, band]
            hk, hid = self.keys[band], self.ids[band]
            lo = np.searchsorted(hk, k, side="left")
            hi = np.searchsorted(hk, k, side="right")
            have = hi - lo
            take = np.minimum(have, m)
            if take.any():
                rep = np.repeat(np.arange(len(k)), take)
                offs = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
                news.append(ids[rep])
                olds.append(hid[lo[rep] + offs])
            # Within the batch: a stable sort keeps equal keys in index order.
            order = np.argsort(k, kind="stable")
            sk = k[order]
            run_start = np.flatnonzero(np.concatenate(([True], sk[1:] != sk[:-1])))
            run_id = np.repeat(np.arange(len(run_start)), np.diff(np.concatenate((run_start, [len(sk)]))))
            rank = np.arange(len(sk)) - run_start[run_id]
            room = np.maximum(m - have[order], 0)
            cnt = np.minimum(rank, room)
            if cnt.any():
                rep = np.repeat(np.arange(len(sk)), cnt)
                offs = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
                news.append(ids[order[rep]])
                olds.append(ids[order[run_start[run_id[rep]] + offs]])
        if not news:
            z = np.zeros(0, dtype=np.int64)
            return z, z
        new, old = np.concatenate(news), np.concatenate(olds)
        pair = np.unique(np.stack((new, old), axis=1), axis=0)
        return pair[:, 0], pair[:, 1]

    def insert(self, keys: np.ndarray, ids: np.ndarray) -> None:
        for band in range(self.bands):
            k = np.concatenate((self.keys[band], keys[:, band]))
            i = np.concatenate((self.ids[band], ids))
            order = np.argsort(k, kind="stable")  # two sorted runs: a merge, earlier documents first
            self.keys[band], self.ids[band] = k[order], i[order]

    @property
    def nbytes(self) -> int:
        return int(sum(k.nbytes + i.nbytes for k, i in zip(self.keys, self.ids)))


class Clusters:
    """Union-find over the documents that have a duplicate, with the kept count per cluster.

    A cluster's kept count is the number of its members whose verdict is ``KEPT``
    or ``BOILERPLATE`` (a document emptied by boilerplate removal still took its
    place under the cap: the cap was decided before the lines were removed).
    """

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.kept: dict[int, int] = {}

    def add(self, i: int, kept: bool) -> None:
        if i not in self.parent:
            self.parent[i] = i
            self.kept[i] = int(kept)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(i, i) != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra  # the earliest document names the cluster
        self.kept[ra] = self.kept.get(ra, 0) + self.kept.pop(rb, 0)
        return ra
