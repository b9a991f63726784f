"""The training loop borrows the device's cores while the device has nothing to do.

An emulated device is pinned to cores of the training machine. On a model the
device updates in a tenth of a step, holding the loop off those cores for the
whole step leaves them idle nine tenths of the time; letting the loop's threads
run there all the time makes the two compete exactly when the device works.
:class:`CoreLending` does neither: the loop runs its full thread count while
the device is idle and steps down to the cores the device does not use from
the moment a step's first update is queued until its commit is done.

[Note: lending cores to the loop]
The switch is ``torch.set_num_threads``, which sets the calling thread's
OpenMP team size: only the thread that built the lending (the training loop's)
may switch, and calls from any other thread (autograd's device threads, the
device client's) are ignored. It is called at points the loop passes anyway:
when the pipeline queues an update (busy), and in forward pre-hooks, gradient
hooks and ``step()`` once the commit is done (idle) -- never inside a
kernel. Forward and backward kernels may round differently with another
thread count (a reduction split in two sums in another order), so a run that
lends cores equals one that does not within rounding; the optimizer's update
runs on the device and is the same either way.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

import torch

__all__ = ["CoreLending"]


class CoreLending:
    """Switches the training loop's torch threads between the device's idle and busy phases.

    ``idle_threads`` is the loop's thread count when the lending is built (torch's default: one
    per core); ``busy_threads`` leaves out the cores of ``device_cores`` the loop may run on (at
    least one thread stays). Where they are equal there is nothing to lend and nothing switches.
    """

    def __init__(self, device_cores: Iterable[int]) -> None:
        self._owner = threading.get_ident()
        self.idle_threads = torch.get_num_threads()
        shared = len(os.sched_getaffinity(0) & set(device_cores))
        self.busy_threads = max(1, self.idle_threads - shared)
        self.busy = False
        self.switches = 0

    @property
    def lends(self) -> bool:
        """Whether the device's cores are lent at all (the loop could run on them)."""
        return self.busy_threads < self.idle_threads

    def _set(self, busy: bool) -> None:
        if busy == self.busy or not self.lends or threading.get_ident() != self._owner:
            return
        torch.set_num_threads(self.busy_threads if busy else self.idle_threads)
        self.busy = busy
        self.switches += 1

    def device_busy(self) -> None:
        """The device has work queued: give its cores back to it."""
        self._set(True)

    def device_idle(self) -> None:
        """The device's last queued work is done: the loop may use its cores."""
        self._set(False)

    def close(self) -> None:
        """Leave the loop with the thread count it had before (from the owning thread)."""
        self._set(False)
