"""The data path: redundant training inputs found and removed next to the data.

Exact and near-duplicate documents (MinHash + LSH, clustered, one kept per
cluster or weighted), documents dominated by repetition, boilerplate lines,
and train/held-out leakage; a streaming dataset that runs the filter on the
device's cores while training reads the kept records. See ``docs/data.md``.
"""

from .filters import LineCensus, RepetitionRules, Rule
from .hashing import MinHasher, lsh_bands
from .lsh import BandIndex, Clusters
from .scan import Filter, FilterConfig, Kept, Leak, Policy, ScanReport, Verdict
from .sources import (ArrowCorpus, Corpus, CorpusChangedError, DataError, FolderCorpus, JsonlCorpus, MemoryCorpus,
                      Record, Skip, SkipReason, open_corpus)



def __getattr__(name: str):
    # The streaming dataset needs torch; the filter process imports this package without it.
    if name in ("FilteredDataset", "StreamConfig"):
        from . import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FilteredDataset", "StreamConfig",
    "ArrowCorpus", "BandIndex", "Clusters", "Corpus", "CorpusChangedError", "DataError", "Filter", "FilterConfig",
    "FolderCorpus", "JsonlCorpus", "Kept", "Leak", "LineCensus", "MemoryCorpus", "MinHasher", "Policy",
    "Record", "RepetitionRules", "Rule", "ScanReport", "Skip", "SkipReason", "Verdict", "lsh_bands", "open_corpus",
]
