"""Sections that a Ctrl-C must not cut in two.

A ``KeyboardInterrupt`` can arrive between any two bytecodes of the training loop's main
thread. Where that would leave two things that must agree disagreeing (the model's weights
and the store's committed step, or one request written half onto the device's socket), the
section holds SIGINT and delivers it once the section is whole.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

__all__ = ["interrupts_deferred"]


@contextlib.contextmanager
def interrupts_deferred(reraise: bool = True) -> Any:
    """Hold Ctrl-C (SIGINT) while a section that must run whole runs; then deliver it (to the
    handler that was installed: Python's raises KeyboardInterrupt), or, with ``reraise``
    False, drop it where that handler is Python's (an exception is on its way already).

    Only the main thread receives signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous) and (reraise or previous is not signal.default_int_handler):
            previous(signal.SIGINT, held[0])
        elif held and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)  # the default action (the process ends), now that it may
