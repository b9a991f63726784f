"""The filter next to the data, overlapped with training: a dataset whose scan runs on the device's cores.

:class:`FilteredDataset` is a torch ``IterableDataset``. Iterating it starts a
filter process of its own (a fresh interpreter, like the emulated device's,
pinned to the device's cores at a lower CPU priority) that reads the corpus
itself, decides each document (``nearstep.data.scan``) and sends the kept records
to the training process while it trains. What the stream yields is exactly what
``Filter.records()`` (and ``nearstep data dedup``) keeps: the process runs that
same code.

[Note: the stream's flow control]
Kept records cross a socket in small batches; when the trainer falls behind,
the socket's buffer fills, the filter process blocks in ``send`` and stops
reading, so memory on both sides stays bounded by the batch and the socket
buffer whatever the corpus size. When the trainer stops iterating (a ``break``,
an exception, the end of the program) its end of the socket closes; the filter
process's next ``send`` fails and it exits. The scan's state on disk is written
per batch of documents, so whatever stopped it, the next iteration resumes the
scan from its last whole part and a finished scan is replayed without hashing.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from .scan import Filter, FilterConfig, Kept, ScanReport
from .sources import Corpus, CorpusChangedError, DataError, open_corpus
from .worker import StreamConfig, child_command

__all__ = ["StreamConfig", "FilteredDataset"]

_ERRORS = {"CorpusChangedError": CorpusChangedError, "DataError": DataError}

class FilteredDataset(IterableDataset):
    """The kept records of a corpus, filtered by a process on the device's cores while training reads them.

    Args:
        source: a path (folder of ``.txt``, ``.jsonl``, saved dataset) or a ``Corpus``.
        config: what the filter removes.
        state_dir: where the scan's state lives (default next to the data).
        text_field: the text field of JSONL records and dataset rows.
        stream: where the filter process runs.
        transform: applied to each ``Kept`` record in the training process (for
            example, to a ``(text, label)`` pair); default: the record itself.

    Use it with ``DataLoader(dataset, batch_size=..., collate_fn=...)`` and
    ``num_workers=0`` (the filtering already runs in a process of its own).
    ``state_dict()``/``load_state_dict()`` carry how many records were handed out,
    so a resumed run continues where it stopped without rescanning.

    Example:
        >>> data = FilteredDataset("articles/", FilterConfig(threshold=0.8), transform=lambda k: k.text)
        >>> for batch in DataLoader(data, batch_size=16, collate_fn=list):
        ...     train_step(batch)
    """

    def __init__(self, source: str | os.PathLike | Corpus, config: FilterConfig | None = None, *,
                 state_dir: str | os.PathLike | None = None, text_field: str = "text",
                 stream: StreamConfig | None = None, transform: Callable[[Kept], Any] | None = None) -> None:
        super().__init__()
        self.corpus = source if isinstance(source, Corpus) else open_corpus(source, text_field)
        self.config = config or FilterConfig()
        self.state_dir = state_dir
        self.stream = stream or StreamConfig()
        self.transform = transform
        self._consumed = 0
        self._report: dict[str, Any] | None = None

    def filter(self) -> Filter:
        """The same filter in this process (for ``scan()``, ``report()``, ``split()``, ``leaks()``)."""
        return Filter(self.corpus, self.config, self.state_dir)

    @property
    def last_report(self) -> dict[str, Any] | None:
        """The filter process's report at the end of the last full iteration."""
        return self._report

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._consumed = int(state["consumed"])

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise DataError("FilteredDataset runs its filter in a process of its own; use it with num_workers=0 "
                            "(or 1): several loader workers would each filter the whole corpus")
        skip = self._consumed
        parent, child = socket.socketpair()
        # A session of its own and SIGINT ignored, for the reasons of
        # [Note: interrupts reach the training process only] in nearstep.device: its
        # life is tied to ours through the socket, see [Note: the stream's flow control].
        proc = subprocess.Popen(
            child_command(str(Path(__file__).resolve().parent.parent), child.fileno()),
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True,
        )
        child.close()
        conn = multiprocessing.connection.Connection(parent.detach())
        try:
            conn.send((self.corpus, self.config, self.state_dir, self.stream, skip))
            while True:
                try:
                    tag, payload = conn.recv()
                except (EOFError, OSError):
                    code = proc.wait(30)
                    raise DataError(f"the filter process exited unexpectedly (exit code {code}); see its output above. "
                                    f"Its saved progress stays: iterating again resumes the scan.") from None
                if tag == "records":
                    for kept in payload:
                        self._consumed += 1
                        yield kept if self.transform is None else self.transform(kept)
                elif tag == "done":
                    self._report = payload
                    self._consumed = 0  # an epoch is over: the next one starts from the first record
                    return
                else:
                    name, message = payload
                    raise _ERRORS.get(name, DataError)(f"the filter process failed: {name}: {message}")
        finally:
            conn.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def report(self) -> ScanReport:
        """What the scan found (scans here first if no scan has finished)."""
        return self.filter().scan()
