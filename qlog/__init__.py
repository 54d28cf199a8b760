"""qlog: an embedded, durable message queue built on a C-accelerated,
CRC-checked, segmented log.

This release provides the log engine, :class:`Log`.
"""

from ._log import DURABILITY_MODES, MAX_RECORD, Damage, Log, LogStats, VerifyReport
from .errors import (
    CorruptStateError,
    DiskFullError,
    FormatError,
    LogClosedError,
    LogPoisonedError,
    QlogError,
    RecordTooLargeError,
    StorageError,
    UnsupportedFilesystemError,
)

__version__ = "0.1.0"

__all__ = [
    "Log",
    "LogStats",
    "Damage",
    "VerifyReport",
    "MAX_RECORD",
    "DURABILITY_MODES",
    "QlogError",
    "LogClosedError",
    "RecordTooLargeError",
    "StorageError",
    "DiskFullError",
    "LogPoisonedError",
    "FormatError",
    "UnsupportedFilesystemError",
    "CorruptStateError",
]
