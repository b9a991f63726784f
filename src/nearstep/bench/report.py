"""What the benchmarks share: the machine line, table lines, verdicts, a scratch directory."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator

__all__ = ["machine", "read_text", "scratch", "table_line", "verdict"]


def machine(where: pathlib.Path) -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {fs_type(where)} at {where.resolve()}"


def fs_type(path: pathlib.Path) -> str:
    """The file system type of ``path`` as ``df -T`` prints it: that of the longest mount point above it."""
    real, best, kind = os.path.realpath(path), "", "unknown"
    for line in read_text("/proc/self/mounts").splitlines():
        _dev, mount, fstype, *_ = line.split()
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mount)  # "\040" is a space
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fstype  # >=: a later mount on the same point hides the earlier one
    return kind


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""  # e.g. the process whose /proc entry this was has exited


def verdict(ok: bool, rule: str) -> str:
    return f"{'PASS' if ok else 'MISS'} ({rule})"


def table_line(label: str, value: str, note: str = "") -> str:
    return f"  {label:<30}{value:>16}  {note}".rstrip()




@contextlib.contextmanager
def scratch(base: pathlib.Path) -> Iterator[pathlib.Path]:
    """A fresh ``run-*`` directory under ``base``, removed on the way out, also on error;
    so are the directories above it that this made, if nothing else landed in them."""
    made = [p for p in (base, *base.parents) if not p.exists()]
    base.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="run-", dir=base))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for p in made:  # deepest first; stops at the first one something else has landed in
            try:
                p.rmdir()
            except OSError:
                break
