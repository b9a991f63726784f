"""Where documents come from: a folder of text files, a JSONL file, a saved Hugging Face dataset, or memory.

Every corpus lists its records once, when it is opened, and reads them in that
order; a record's *index* is its position in the listing, skipped records
included, so indices stay stable across a scan, its resumption and a replay.
Bad records are never dropped silently: each is either an error
(:class:`CorpusChangedError` when the corpus changes under a scan) or a counted
skip with its place named (:class:`Skip`).
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import NearstepError

__all__ = [
    "DataError",
    "CorpusChangedError",
    "SkipReason",
    "Skip",
    "Record",
    "Corpus",
    "FolderCorpus",
    "JsonlCorpus",
    "ArrowCorpus",
    "MemoryCorpus",
    "open_corpus",
]


class DataError(NearstepError, ValueError):
    """A corpus cannot be read as asked (wrong path, unknown format, missing field)."""


class CorpusChangedError(DataError):
    """A corpus changed while it was being scanned; the scan's saved progress stays valid up to that point."""


class SkipReason(StrEnum):
    UNREADABLE = "unreadable"  # the file could not be opened or read
    EMPTY = "empty"  # no words at all
    BAD_RECORD = "bad_record"  # a JSONL line that is not a JSON object, or lacks the text field


@dataclass(frozen=True, slots=True)
class Skip:
    """A record that was not read, and why."""

    index: int
    where: str
    reason: SkipReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Record:
    """One document.

    Attributes:
        index: position in the corpus listing.
        text: the text (bytes that are not UTF-8 replaced by U+FFFD, and counted).
        where: a path, or ``file:line`` for JSONL, or ``#row`` for a dataset.
        fields: other fields of the record (JSONL, datasets) or ``{"folder": ...}``
            for text files in sub-folders (the class of a classification corpus).
        invalid_utf8: the source bytes were not valid UTF-8.
    """

    index: int
    text: str
    where: str
    fields: dict[str, Any] = field(default_factory=dict)
    invalid_utf8: bool = False


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


class Corpus(ABC):
    """A listed, ordered collection of records."""

    @property
    @abstractmethod
    def name(self) -> str:
        """What to call the corpus in reports."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A digest of the listing (names, sizes, modification times): a scan's state is valid for it only."""

    @abstractmethod
    def records(self, start: int = 0) -> Iterator[Record | Skip]:
        """Every record from index ``start`` on, in order; a bad one as a :class:`Skip`.

        Raises:
            CorpusChangedError: a file was changed, removed or replaced after the listing.
        """

    def where(self, index: int) -> str:
        """Where record ``index`` comes from (a path, ``file:line``, ``#row``), without reading it."""
        return f"#{index}"

    def default_state_dir(self) -> Path:
        """Where a scan keeps its state unless told otherwise: next to the data."""
        raise DataError(f"{self.name} has no place on disk for a scan's state; pass state_dir=")


def _digest(items: Sequence[tuple]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(repr(item).encode())
    return h.hexdigest()[:32]


class FolderCorpus(Corpus):
    """Every ``*.txt`` file under a folder (recursively, sorted by relative path); one file, one document."""

    def __init__(self, root: str | os.PathLike, suffix: str = ".txt") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder")
        self._files: list[tuple[str, int, int]] = []
        for path in sorted(self.root.rglob(f"*{suffix}")):
            rel = path.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts):
                continue  # a scan's own state, editor files
            try:
                st = path.stat()
            except OSError:
                self._files.append((rel.as_posix(), -1, -1))
                continue
            if path.is_file():
                self._files.append((rel.as_posix(), st.st_size, st.st_mtime_ns))
        if not self._files:
            raise DataError(f"{self.root} holds no {suffix} files; give a folder of text files, a .jsonl file "
                            f"or a dataset saved with datasets' save_to_disk")

    @property
    def name(self) -> str:
        return str(self.root)

    def __len__(self) -> int:
        return len(self._files)

    def fingerprint(self) -> str:
        return _digest([("folder",)] + self._files)

    def default_state_dir(self) -> Path:
        return self.root / ".nearstep-data"

    def where(self, index: int) -> str:
        return self._files[index][0]

    def records(self, start: int = 0) -> Iterator[Record | Skip]:
        for index in range(start, len(self._files)):
            rel, size, mtime = self._files[index]
            path = self.root / rel
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    raw = f.read()
            except FileNotFoundError:
                if size < 0:
                    yield Skip(index, rel, SkipReason.UNREADABLE, "could not be listed")
                    continue
                raise CorpusChangedError(f"{path} was removed during the scan (listed at the start). "
                                         f"Scan again once the corpus has stopped changing.") from None
            except IsADirectoryError:
                if size >= 0:
                    raise CorpusChangedError(f"{path} was replaced by a folder during the scan (listed as a file). "
                                             f"Scan again once the corpus has stopped changing.") from None
                yield Skip(index, rel, SkipReason.UNREADABLE, "is a folder")
                continue
            except OSError as exc:
                yield Skip(index, rel, SkipReason.UNREADABLE, exc.strerror or str(exc))
                continue
            if size >= 0 and (st.st_size != size or st.st_mtime_ns != mtime or len(raw) != size):
                raise CorpusChangedError(f"{path} changed during the scan (size or modification time differs "
                                         f"from the listing). Scan again once the corpus has stopped changing.")
            text, bad = _decode(raw)
            parent = Path(rel).parent.as_posix()
            yield Record(index, text, rel, {"folder": parent} if parent != "." else {}, bad)


class JsonlCorpus(Corpus):
    """One JSON object per line of a file; the document is its ``text_field``."""

    def __init__(self, path: str | os.PathLike, text_field: str = "text") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path} is not a file")
        self.text_field = text_field
        st = self.path.stat()
        self._stamp = (st.st_size, st.st_mtime_ns)

    @property
    def name(self) -> str:
        return str(self.path)

    def fingerprint(self) -> str:
        return _digest([("jsonl", self.text_field, self._stamp)])

    def default_state_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".nearstep-data")

    def where(self, index: int) -> str:
        return f"{self.path.name}:{index + 1}"

    def _check(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise CorpusChangedError(f"{self.path} was removed during the scan") from None
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise CorpusChangedError(f"{self.path} changed during the scan. Scan again once it has stopped changing.")

    def records(self, start: int = 0) -> Iterator[Record | Skip]:
        self._check()
        with open(self.path, "rb") as f:
            for index, line in enumerate(f):
                if index < start:
                    continue
                if index % 4096 == 0:
                    self._check()
                where = f"{self.path.name}:{index + 1}"
                if index == 0 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]  # a UTF-8 byte-order mark, as some editors write
                if not line.strip():
                    yield Skip(index, where, SkipReason.EMPTY, "blank line")
                    continue
                text, bad = _decode(line)
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield Skip(index, where, SkipReason.BAD_RECORD, f"not JSON: {exc.msg}")
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get(self.text_field), str):
                    yield Skip(index, where, SkipReason.BAD_RECORD, f"no string field {self.text_field!r}")
                    continue
                body = obj.pop(self.text_field)
                yield Record(index, body, where, obj, bad)
        self._check()


class ArrowCorpus(Corpus):
    """A Hugging Face ``datasets`` dataset written with ``save_to_disk`` (read with pyarrow, no ``datasets`` needed)."""

    def __init__(self, root: str | os.PathLike, text_field: str = "text") -> None:
        self.root = Path(root)
        state = self.root / "state.json"
        if not state.is_file():
            raise DataError(f"{self.root} has no state.json, so it is not a dataset saved with save_to_disk "
                            f"(a DatasetDict's splits are its sub-folders: give one of them)")
        try:
            import pyarrow

            del pyarrow  # imported here only to say early that it is missing
        except ImportError as exc:
            raise DataError("reading a saved Hugging Face dataset needs pyarrow: pip install pyarrow") from exc
        files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        self.text_field = text_field
        self._files = []
        for name in files:
            st = (self.root / name).stat()
            self._files.append((name, st.st_size, st.st_mtime_ns))

    @property
    def name(self) -> str:
        return str(self.root)

    def fingerprint(self) -> str:
        return _digest([("arrow", self.text_field)] + self._files)

    def default_state_dir(self) -> Path:
        return self.root / ".nearstep-data"

    def records(self, start: int = 0) -> Iterator[Record | Skip]:
        import pyarrow as pa

        index = 0
        for name, size, mtime in self._files:
            path = self.root / name
            st = path.stat()
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                raise CorpusChangedError(f"{path} changed during the scan")
            with pa.memory_map(str(path)) as source:
                reader = pa.ipc.open_stream(source)
                if self.text_field not in reader.schema.names:
                    raise DataError(f"{self.root} has no column {self.text_field!r} (columns: {', '.join(reader.schema.names)}); "
                                    f"name the text column with text_field=")
                for batch in reader:
                    if index + batch.num_rows <= start:
                        index += batch.num_rows
                        continue
                    rows = batch.to_pylist()
                    for row in rows:
                        if index >= start:
                            text = row.pop(self.text_field)
                            if not isinstance(text, str):
                                yield Skip(index, f"#{index}", SkipReason.BAD_RECORD, f"{self.text_field!r} is not a string")
                            else:
                                yield Record(index, text, f"#{index}", row)
                        index += 1


class MemoryCorpus(Corpus):
    """Documents already in memory (tests, the demo's in-process split)."""

    def __init__(self, texts: Sequence[str], fields: Sequence[dict] | None = None, name: str = "memory") -> None:
        self._texts = list(texts)
        self._fields = list(fields) if fields is not None else [{} for _ in self._texts]
        if len(self._fields) != len(self._texts):
            raise DataError(f"{len(self._texts)} texts but {len(self._fields)} field dicts")
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def __len__(self) -> int:
        return len(self._texts)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in self._texts:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        return h.hexdigest()[:32]

    def records(self, start: int = 0) -> Iterator[Record | Skip]:
        for index in range(start, len(self._texts)):
            yield Record(index, self._texts[index], f"#{index}", dict(self._fields[index]))


def open_corpus(path: str | os.PathLike, text_field: str = "text") -> Corpus:
    """The corpus at ``path``: a folder of ``.txt`` files, a ``.jsonl`` file, or a saved dataset."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p} does not exist")
    if p.is_dir():
        if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
            return ArrowCorpus(p, text_field)
        if (p / "dataset_dict.json").is_file():
            raise DataError(f"{p} is a DatasetDict; give one split's folder, e.g. {p / 'train'}")
        return FolderCorpus(p)
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        return JsonlCorpus(p, text_field)
    raise DataError(f"{p} is neither a folder of text files, a .jsonl file nor a saved dataset")
