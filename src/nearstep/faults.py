"""Failures injected at named points of a step, for the reliability tests and for anyone who
wants to see what nearstep does when a step is interrupted there.

A fault is ``WHEN:WHAT:STEP:ACTION``:

- ``WHEN:WHAT``: ``before:Apply`` / ``after:Apply`` (the first update request of the step,
  ``after`` meaning handled but not yet answered), likewise ``Prefetch`` and ``Commit``;
  ``before:rename`` / ``after:rename`` (the manifest's rename, the commit point);
  ``at:dir-fsync`` (the directory's fsync after that rename).
- ``STEP``: the optimizer step (1 is the first) whose request or commit it hits.
- ``ACTION``: ``kill`` (the process dies at once, as by SIGKILL), ``raise`` (an ``OSError``
  EIO at that point), ``stop`` (the process stops itself with SIGSTOP, as a hung disk
  would leave it), ``interrupt`` (a ``KeyboardInterrupt`` there: a Ctrl-C reaching the
  inline device).

The emulated device installs the fault named by ``NEARSTEP_FAULT`` in its environment
when it starts (so a test sets it before opening the optimizer); :func:`install` puts one
into the current process (for the inline device). A fault fires once.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Fault", "install", "install_from_env", "ENV", "POINTS", "ACTIONS"]

ENV = "NEARSTEP_FAULT"
POINTS = ("before:Prefetch", "after:Prefetch", "before:Apply", "after:Apply", "before:Commit", "after:Commit",
          "before:rename", "after:rename", "at:dir-fsync")
ACTIONS = ("kill", "raise", "stop", "interrupt")


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected failure: at ``point`` of optimizer step ``step``, do ``action``."""

    point: str
    step: int
    action: str

    @classmethod
    def parse(cls, text: str) -> Fault:
        parts = text.split(":")
        if len(parts) != 4 or ":".join(parts[:2]) not in POINTS or parts[3] not in ACTIONS or not parts[2].isdigit():
            raise ValueError(f"cannot read the fault {text!r}: write WHEN:WHAT:STEP:ACTION with WHEN:WHAT one of "
                             f"{', '.join(POINTS)} and ACTION one of {', '.join(ACTIONS)}, e.g. after:rename:3:kill")
        return cls(":".join(parts[:2]), int(parts[2]), parts[3])

    def __str__(self) -> str:
        return f"{self.point}:{self.step}:{self.action}"

    def fire(self) -> None:
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            return  # resumed by SIGCONT: go on as if the disk had come back
        if self.action == "interrupt":
            raise KeyboardInterrupt(f"injected at {self}")
        raise OSError(errno.EIO, f"Input/output error (injected at {self})")


def install(fault: Fault | str) -> Callable[[], None]:
    """Arm ``fault`` in this process; returns a function that disarms it."""
    from . import engine, store  # late: the device imports this module before the engine
    from .protocol import Apply, Commit, Prefetch

    fault = Fault.parse(fault) if isinstance(fault, str) else fault
    fired = [False]
    when, what = fault.point.split(":")
    kinds = {"Apply": Apply, "Prefetch": Prefetch, "Commit": Commit}
    undo: list[Callable[[], None]] = []

    def due(step: int) -> bool:
        if fired[0] or step != fault.step:
            return False
        fired[0] = True
        return True

    if what in kinds:
        # Inside the engine's handling (its _dispatch), so that the engine reacts to the fault as to
        # any failure of that request: the step is dropped, the error goes back as the reply.
        real_handle = engine.Engine._dispatch

        def handle(self: Any, request: Any) -> Any:
            kind = kinds[what]
            step = request.step if isinstance(request, Commit) else self.manifest.step + 1
            hit = isinstance(request, kind) and not fired[0] and step == fault.step
            if hit and when == "before" and due(step):
                fault.fire()
            result = real_handle(self, request)
            if hit and when == "after" and due(step):
                fault.fire()
            return result

        engine.Engine._dispatch = handle  # type: ignore[method-assign]
        undo.append(lambda: setattr(engine.Engine, "_dispatch", real_handle))
    elif what == "rename":
        real_replace = os.replace

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            step = _manifest_step(src) if str(dst).endswith(store.MANIFEST) else None
            if step is not None and when == "before" and due(step):
                fault.fire()
            real_replace(src, dst, *args, **kwargs)
            if step is not None and when == "after" and due(step):
                fault.fire()

        store.os.replace = replace  # type: ignore[assignment]  # os itself: only store.py renames in the device
        undo.append(lambda: setattr(store.os, "replace", real_replace))
    else:  # at:dir-fsync
        real_fsync = store.fsync_path

        def fsync_path(path: Any) -> None:
            manifest = os.path.join(path, store.MANIFEST)
            if os.path.isdir(path) and os.path.exists(manifest):
                if due(_manifest_step(manifest) or -1):
                    fault.fire()
            real_fsync(path)

        store.fsync_path = fsync_path  # type: ignore[assignment]
        undo.append(lambda: setattr(store, "fsync_path", real_fsync))

    def disarm() -> None:
        for step in undo:
            step()

    return disarm


def _manifest_step(path: Any) -> int | None:
    import json

    try:
        with open(path) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def install_from_env() -> None:
    """Arm the fault ``NEARSTEP_FAULT`` names, if any (the emulated device calls this at start)."""
    text = os.environ.get(ENV)
    if text:
        install(text)
