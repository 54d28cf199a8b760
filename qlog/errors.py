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
    "MessageTooLargeError",
    "BatchTooLargeError",
    "ContentTypeError",
    "BodyTypeError",
    "DelayOutOfRangeError",
    "InvalidQueueNameError",
    "SettingsError",
    "PickleNotAllowedError",
    "EngineConflictError",
    "QueueNotFoundError",
    "QueueExistsError",
    "QueueNotEmptyError",
    "InvalidLeaseError",
    "CommitUnknownError",
    "SchemaVersionError",
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


class MessageTooLargeError(RecordTooLargeError):
    """A message body is larger than its queue's ``max_message_size``."""


class BatchTooLargeError(QlogError, ValueError):
    """A ``send_batch`` or ``pull`` asked for more messages (or bytes) than the limit it names."""


class ContentTypeError(QlogError, ValueError):
    """An unknown ``content_type``; the message names the known ones."""


class BodyTypeError(QlogError, TypeError):
    """A body does not serialise for its content type (``text`` needs a
    ``str``, ``bytes`` a bytes-like object, ``json`` a JSON-serialisable
    value)."""


class DelayOutOfRangeError(QlogError, ValueError):
    """A ``delay_seconds`` outside 0 to 86,400 (24 hours)."""


class InvalidQueueNameError(QlogError, ValueError):
    """A queue name that is not 1 to 63 characters of ``[A-Za-z0-9_-]``."""


class SettingsError(QlogError, ValueError):
    """An unknown setting, a setting of the wrong type, or one out of range."""


class PickleNotAllowedError(QlogError, ValueError):
    """A ``pickle`` body sent to or received from a queue that has not opted
    in with ``allow_pickle=True``."""


class EngineConflictError(QlogError):
    """The log directory is open in another process that uses the other
    engine (the C engine or the pure-Python one): one directory is used by
    one engine at a time."""


class QueueNotFoundError(QlogError, LookupError):
    """The queue named does not exist (and the call does not create it)."""


class QueueExistsError(QlogError):
    """``create_queue`` of a queue that already exists."""


class QueueNotEmptyError(QlogError):
    """``delete_queue`` of a queue that still holds messages, without ``force``."""


class InvalidLeaseError(QlogError, ValueError):
    """A lease id that this queue never gave out (malformed, or another queue's)."""


class CommitUnknownError(StorageError):
    """The connection to the database was lost after a change was sent and
    before its commit was confirmed: it may or may not have happened.  qlog
    does not send it again by itself (a send would be duplicated)."""


class SchemaVersionError(FormatError):
    """The database's qlog schema is newer than this qlog understands (or
    older, where ``qlog migrate`` must run first)."""
