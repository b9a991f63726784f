"""The exceptions nearstep raises.

Every error says what went wrong, which file or parameter it concerns, and what
the user can do about it. They all derive from :class:`NearstepError`, and the
I/O ones also from the matching built-in (``OSError``, ``ValueError``) so code
that already catches those keeps working.
"""

from __future__ import annotations

__all__ = [
    "NearstepError",
    "MisalignedIOError",
    "StoreError",
    "StoreIOError",
    "DiskFullError",
    "StorePermissionError",
    "StoreCorruptError",
    "StoreLockedError",
    "StoreMismatchError",
    "StorePathError",
    "DeviceError",
    "DeviceDiedError",
    "DeviceStalledError",
    "StagingSpaceError",
    "CollectiveError",
    "ShardMismatchError",
    "StaleWeightError",
    "UnsupportedUsageError",
]


class NearstepError(Exception):
    """Base class of every error raised by nearstep."""


class MisalignedIOError(NearstepError, ValueError):
    """An O_DIRECT request whose buffer, offset or length is not 4096-aligned."""


class StoreError(NearstepError):
    """Something is wrong with a store directory."""


class StoreIOError(StoreError, OSError):
    """Reading or writing a store file failed (EIO and other I/O errors)."""


class DiskFullError(StoreIOError):
    """The file system holding the store ran out of space (ENOSPC)."""


class StorePermissionError(StoreIOError, PermissionError):
    """The store directory or one of its files cannot be accessed (EACCES/EPERM)."""


class StoreCorruptError(StoreError):
    """A state file or the manifest does not match what was committed."""


class StoreLockedError(StoreError):
    """Another live process holds the store's lock."""


class StoreMismatchError(StoreError, ValueError):
    """The store belongs to a different model or optimizer."""


class StorePathError(StoreError, ValueError):
    """The path given for a store cannot be one: empty, or a file rather than a directory."""


class DeviceError(NearstepError):
    """The storage device failed a request; the message carries its traceback."""


class DeviceDiedError(DeviceError):
    """The device process exited while work was queued on it."""


class StagingSpaceError(DeviceError, OSError):
    """The shared staging memory does not fit where it is made (``/dev/shm`` by default)."""


class DeviceStalledError(DeviceDiedError):
    """The device stopped answering (stopped, or stuck on its disk) for longer than its work
    could take; it was killed, and the store keeps its last committed step."""


class CollectiveError(NearstepError):
    """A collective with the other ranks failed or timed out: a rank died, hung, or left."""


class ShardMismatchError(StoreMismatchError):
    """The ranks' stores do not form one store set for this run (world size, steps, model)."""


class StaleWeightError(NearstepError, RuntimeError):
    """Code read or wrote a parameter whose update of the last step had not landed yet (overlap mode)."""


class UnsupportedUsageError(NearstepError, ValueError):
    """The training loop does something nearstep cannot follow exactly; the message says what to do instead."""
