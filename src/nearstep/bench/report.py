"""What the benchmarks share: the machine line, table lines, verdicts, a scratch directory, worker processes."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["machine", "read_text", "scratch", "table_line", "verdict", "WorkerError", "run_worker"]


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


class WorkerError(RuntimeError):
    """A worker process failed; the message carries the end of its output."""


def run_worker(entry: str, spec: dict[str, Any], out: pathlib.Path, *, label: str, timeout: float,
               store: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``entry`` (a module with ``_worker_entry``) in a fresh interpreter on ``spec`` (JSON),
    and return the JSON it wrote to ``out``, with ``process_seconds`` added.

    The worker gets a session of its own, so on timeout or interrupt it goes with its
    device process; ``store`` is removed afterwards whatever happened (a big model's is GBs).
    """
    env = dict(os.environ if env is None else env)
    package_root = str(pathlib.Path(__file__).resolve().parents[2])  # importable without an install, as device.py does
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from {entry} import _worker_entry; _worker_entry()", json.dumps(spec), str(out)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WorkerError(f"the {label} worker ran past {timeout:.0f} s") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(store, ignore_errors=True)
    if proc.returncode != 0 or not out.exists():
        tail = output.decode(errors="replace")[-4000:]
        raise WorkerError(f"the {label} worker exited with code {proc.returncode}:\n{tail}")
    result = json.loads(out.read_text())
    out.unlink()
    result["process_seconds"] = time.perf_counter() - started  # interpreter, imports and device start included
    return result
