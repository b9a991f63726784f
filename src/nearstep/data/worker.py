"""The filter process of ``FilteredDataset``: numpy and ``nearstep.data`` only, no torch.

It starts in a fresh interpreter (see ``nearstep.data.stream``). Importing
``nearstep`` itself would import torch and the optimizer (seconds before the
first record), so the child registers the package by its path without running
its ``__init__`` and imports only this sub-package.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import sys
from dataclasses import dataclass, replace

from .scan import Filter, Kept

__all__ = ["StreamConfig", "child_command"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamConfig:
    """Where and how the filter process runs.

    Attributes:
        cores: CPU cores the filter process is pinned to; None: the last core when
            the machine has more than one (the emulated device's default), else all.
        niceness: added to the process's nice value, so the optimizer's device work
            on the same cores goes first.
        batch_records: kept records per message to the trainer.
        scan_batch: documents the filter hashes at once; smaller than the offline
            tool's default so the first records arrive sooner (no decision depends on it).
    """

    cores: tuple[int, ...] | None = None
    niceness: int = 5
    batch_records: int = 64
    scan_batch: int = 256

    def resolved_cores(self) -> tuple[int, ...]:
        if self.cores is not None:
            return tuple(self.cores)
        cores = sorted(os.sched_getaffinity(0))
        return (cores[-1],) if len(cores) > 1 else tuple(cores)


def child_command(package_dir: str, fd: int) -> list[str]:
    """The filter process's command line; ``package_dir`` is the folder holding ``nearstep/``'s files."""
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "import sys, types\n"
        "pkg = types.ModuleType('nearstep'); pkg.__path__ = [sys.argv[2]]; sys.modules['nearstep'] = pkg\n"
        "from nearstep.data.worker import filter_main; filter_main()\n"
    )
    return [sys.executable, "-c", code, str(fd), package_dir]


def filter_main() -> None:
    """Entry point of the filter process: ``python -c ... CONN_FD PACKAGE_DIR``."""
    conn = multiprocessing.connection.Connection(int(sys.argv[1]))
    corpus, config, state_dir, stream, skip = conn.recv()
    try:
        os.sched_setaffinity(0, stream.resolved_cores())
    except OSError:
        pass
    try:
        os.nice(stream.niceness)
    except OSError:
        pass
    try:
        f = Filter(corpus, replace(config, batch=stream.scan_batch), state_dir)
        out: list[Kept] = []
        n = 0
        for kept in f.records():
            n += 1
            if n <= skip:
                continue
            out.append(kept)
            if len(out) >= stream.batch_records:
                conn.send(("records", out))
                out = []
        if out:
            conn.send(("records", out))
        conn.send(("done", f.report().to_dict()))
    except (BrokenPipeError, ConnectionResetError):
        return  # the trainer stopped reading: the saved state keeps the scan's progress
    except BaseException as exc:
        try:
            conn.send(("error", (type(exc).__name__, str(exc))))
        except OSError:
            pass
