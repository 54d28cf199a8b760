"""qlog: an embedded, durable message queue built on a C-accelerated,
CRC-checked, segmented log.

``qlog.open(path)`` gives a :class:`Broker`, a directory of named queues
with Cloudflare Queues' semantics; :class:`Log` is the engine beneath.
"""

from ._log import ENGINE, Log
from ._log.types import DURABILITY_MODES, MAX_RECORD, Damage, LogStats, VerifyReport
from ._message import DeadLetterInfo, Message, MessageBatch, MessageSendRequest
from ._local import backend as _local_backend  # noqa: F401  (the default backend: its imports are paid by `import qlog`, not by the first qlog.open)
from ._queue import Broker, Queue, QueueMetrics, QueueStats, SettleResult, open
from ._settings import QueueSettings
from .errors import (
    BatchTooLargeError,
    BodyTypeError,
    ContentTypeError,
    CorruptStateError,
    DelayOutOfRangeError,
    InvalidLeaseError,
    InvalidQueueNameError,
    MessageTooLargeError,
    PickleNotAllowedError,
    SettingsError,
    DiskFullError,
    EngineConflictError,
    FormatError,
    LogClosedError,
    LogPoisonedError,
    QlogError,
    QueueExistsError,
    QueueNotEmptyError,
    QueueNotFoundError,
    RecordTooLargeError,
    StorageError,
    UnsupportedFilesystemError,
)

from ._version import __version__ as __version__  # (qlog.__version__: an explicit re-export)

__all__ = [
    "open",
    "ENGINE",
    "Broker",
    "Queue",
    "QueueSettings",
    "QueueStats",
    "QueueMetrics",
    "SettleResult",
    "Message",
    "MessageBatch",
    "MessageSendRequest",
    "DeadLetterInfo",
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
]
