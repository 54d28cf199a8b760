"""qlog: a durable message queue in a directory, with Cloudflare Queues'
semantics, on a C-accelerated, CRC-checked, segmented log.  For example::

    import qlog

    broker = qlog.open("./data")          # a directory of queues, created if missing
    jobs = broker.queue("jobs", max_retries=3, dead_letter_queue="jobs-dlq")
    jobs.send({"userId": 42})             # on stable storage when it returns

    batch = jobs.pull(10, visibility_timeout=30)   # a pull consumer
    for m in batch.messages:
        print(m.id, m.attempts, m.body)
    batch.ack_all()                       # or m.ack(), m.retry(delay_seconds=...)

    @broker.consumer("jobs", max_batch_size=10)    # a push consumer
    def handle(batch: qlog.MessageBatch) -> None:
        ...                               # returning acks the batch, raising retries it

    # broker.run(), or `qlog worker app:broker`, runs the push consumers.

``qlog.open(path)`` gives a :class:`Broker`; :class:`Queue`,
:class:`MessageBatch` and :class:`Message` follow Cloudflare's API;
:class:`Log` is the engine beneath.  README.md has the whole guide.
"""

from ._log import ENGINE, Log
from ._log.types import DURABILITY_MODES, MAX_RECORD, Damage, LogStats, VerifyReport
from ._message import DeadLetterInfo, Message, MessageBatch, MessageSendRequest
from ._local import backend as _local_backend  # noqa: F401  (the default backend: its imports are paid by `import qlog`, not by the first qlog.open)
from ._queue import DELIVERY_BUCKETS, Broker, Queue, QueueMetrics, QueueStats, SettleResult, migrate, open
from ._settings import QueueSettings
from .errors import (
    BatchTooLargeError,
    BodyTypeError,
    CommitUnknownError,
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
    SchemaVersionError,
    StorageError,
    UnsupportedFilesystemError,
)

from ._version import __version__ as __version__  # (qlog.__version__: an explicit re-export)

__all__ = [
    "open",
    "migrate",
    "ENGINE",
    "Broker",
    "Queue",
    "QueueSettings",
    "QueueStats",
    "DELIVERY_BUCKETS",
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
    "CommitUnknownError",
    "SchemaVersionError",
]
