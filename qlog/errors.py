"""qlog's exceptions: one hierarchy rooted at :class:`QlogError`.

Every message names the problem and, where there is one, the limit.
"""

from __future__ import annotations

__all__ = [
    "QlogError",
    "LogClosedError",
    "RecordTooLargeError",
    "DiskFullError",
    "LogPoisonedError",
    "FormatError",
    "UnsupportedFilesystemError",
    "CorruptStateError",
    "StorageError",
]


class QlogError(Exception):
    """Base of every error qlog raises on purpose."""


class LogClosedError(QlogError, ValueError):
    """The log (or queue) was used after ``close()``."""


class RecordTooLargeError(QlogError, ValueError):
    """A record or message is larger than the limit it names."""


class StorageError(QlogError, OSError):
    """A system call on the log's files failed (``errno`` is set)."""


class DiskFullError(StorageError):
    """No space left to store the record; nothing of it was written.

    The log stays usable: appends succeed again once space is freed."""


class LogPoisonedError(StorageError):
    """An earlier fsync or write failed.

    Data the kernel could not write may be lost although it still reads
    back, and a second fsync could falsely report success, so every later
    append raises this until the log is reopened."""


class FormatError(QlogError):
    """A file is not a qlog file, or was written by another format version."""


class UnsupportedFilesystemError(QlogError):
    """The directory is on a filesystem qlog refuses (NFS)."""


class CorruptStateError(QlogError):
    """The shared control file is damaged while other processes use it."""
