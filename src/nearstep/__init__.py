"""nearstep: the optimizer step runs next to the optimizer state on the SSD."""

from .device import DeviceConfig, open_device
from .protocol import Device, DeviceInfo
from .distributed import ShardingConfig
from .errors import (CollectiveError, DeviceDiedError, DeviceError, DeviceStalledError, DiskFullError,
                     MisalignedIOError, NearstepError, ShardMismatchError, StagingSpaceError, StaleWeightError,
                     StoreCorruptError, StoreError, StoreIOError, StoreLockedError, StoreMismatchError,
                     StorePathError, StorePermissionError, UnsupportedUsageError)
from .formats import StateFormat
from .rules import Guards
from .sensitivity import SensitivityReport
from .optim import SGD, Adam, AdamW, Lion, Mode, NearstepOptimizer, ParamTelemetry
from .store import Store
from .tools import convert_store, export_safetensors, inspect_store, resume, verify_store

__version__ = "0.1.0"

__all__ = [
    "AdamW", "Adam", "SGD", "Lion", "Mode", "NearstepOptimizer", "Guards", "ParamTelemetry", "StateFormat",
    "SensitivityReport", "Store", "resume", "inspect_store", "verify_store", "export_safetensors", "convert_store",
    "open_device", "Device", "DeviceConfig", "DeviceInfo", "ShardingConfig",
    "NearstepError", "StoreError", "StoreLockedError", "StoreMismatchError", "StoreCorruptError", "DiskFullError",
    "StoreIOError", "StorePermissionError", "MisalignedIOError", "DeviceError", "DeviceDiedError", "DeviceStalledError",
    "StagingSpaceError", "StorePathError",
    "CollectiveError", "ShardMismatchError", "StaleWeightError", "UnsupportedUsageError",
]
