"""qlog: an embedded, durable message queue built on a C-accelerated,
CRC-checked, segmented log.

``qlog.open(path)`` gives a :class:`Broker`, a directory of named queues
with Cloudflare Queues' semantics; :class:`Log` is the engine beneath.
"""

import os as _os
import sys as _sys

if _os.environ.get("QLOG_PURE", "") in ("", "0"):
    try:
        from . import _glue, _qlog_c  # noqa: F401  (the compiled modules)
    except ImportError:  # pragma: no cover - depends on how Python was started
        # Imported from a source checkout (the current directory comes first
        # on sys.path, e.g. `python -c` at the top of the tree) after a plain
        # `pip install .`: the compiled modules live in the installed copy.
        # Let this package find them there.  Without them anywhere, qlog
        # runs on the pure-Python engine (qlog.ENGINE == "pure").
        _here = _os.path.dirname(_os.path.abspath(__file__))
        for _entry in _sys.path:
            _cand = _os.path.join(_entry or ".", "qlog")
            if _os.path.abspath(_cand) != _here and _os.path.isdir(_cand) and any(
                _f.startswith("_qlog_c") for _f in _os.listdir(_cand)
            ):
                __path__.append(_cand)
                break

from ._engine import ENGINE, Log
from ._types import DURABILITY_MODES, MAX_RECORD, Damage, LogStats, VerifyReport
from ._message import DeadLetterInfo, Message, MessageBatch, MessageSendRequest
from ._queue import Broker, Queue, QueueStats, open
from ._settings import QueueSettings
from .errors import (
    BatchTooLargeError,
    BodyTypeError,
    ContentTypeError,
    CorruptStateError,
    DelayOutOfRangeError,
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
    RecordTooLargeError,
    StorageError,
    UnsupportedFilesystemError,
)

__version__ = "0.1.0"

__all__ = [
    "open",
    "ENGINE",
    "Broker",
    "Queue",
    "QueueSettings",
    "QueueStats",
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
]
