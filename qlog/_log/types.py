"""The value types both log engines return (``Log.stats()``, ``Log.verify()``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Self, Union

from .. import errors
from .modes import check_mode, makedirs

__all__ = ["LogStats", "Damage", "VerifyReport", "MAX_RECORD", "DURABILITY_MODES",
           "check_log_args", "LogLifecycle", "plural"]

MAX_RECORD: int = 1073741824
"""The largest payload a record holds: 1 GiB (docs/FORMAT.md)."""
DURABILITY_MODES = {"none": 0, "interval": 1, "sync": 2}
MIN_SEGMENT = 4096
MAX_SEGMENT = 1 << 40
DEFAULT_SEGMENT_BYTES = 64 << 20
"""Every copy of a C constant here equals it (tests/test_format.py)."""

CTL_MAGIC_PURE = b"QLOGPURE"
"""``ctl`` of a log open in processes using the pure-Python engine."""
CTL_MAGIC_C = b"QLOGCTL\0"
"""``ctl`` of a log open in processes using the C engine (QLOG_CTL_MAGIC)."""


def refuse_nfs(path: str, on_nfs: Callable[[str], bool]) -> None:
    """Raise :class:`~qlog.UnsupportedFilesystemError` if ``path`` (or, while
    it does not exist, its nearest existing parent) is on NFS, as the engine's
    ``on_nfs(existing path)`` says."""
    p = os.path.abspath(path)
    while not os.path.isdir(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    if on_nfs(p):
        raise errors.UnsupportedFilesystemError(
            f"{path} is on NFS, which qlog does not support (its file locks and shared "
            "mappings are not safe there): use a local filesystem"
        )


def plural(n: int, noun: str) -> str:
    """A count with its noun, for messages: "1 message", "2 messages",
    "3 running batches"."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}es" if noun.endswith(("s", "sh", "ch", "x")) else f"{n} {noun}s"


def check_log_args(path: Union[str, "os.PathLike[str]"], durability: str, segment_bytes: int,
                   flush_interval: float, mode: int) -> str:
    """Check the arguments of either engine's ``Log()`` and create the log
    directory's missing parents (as ``qlog.open`` creates its directory's);
    returns the path as a string.  Raises ValueError naming the argument
    and its limits."""
    check_mode(mode)
    if durability not in DURABILITY_MODES:
        raise ValueError(
            f"durability must be one of {sorted(DURABILITY_MODES)}, got {durability!r}"
        )
    if not isinstance(segment_bytes, int) or not MIN_SEGMENT <= segment_bytes <= MAX_SEGMENT:
        raise ValueError(
            f"segment_bytes must be an int from {MIN_SEGMENT} to {MAX_SEGMENT}, got {segment_bytes!r}"
        )
    if not (isinstance(flush_interval, (int, float)) and 0.001 <= flush_interval <= 3600):
        raise ValueError(
            f"flush_interval must be from 0.001 to 3600 seconds, got {flush_interval!r}"
        )
    p = os.fspath(path)
    if not p or len(os.fsencode(p)) > 4000:
        raise ValueError(f"path must be 1 to 4000 bytes long, got {len(os.fsencode(p))}")
    makedirs(os.path.dirname(os.path.abspath(p)), mode)
    return p


class LogLifecycle:
    """``with`` support and close-on-collection, shared by both engines'
    ``Log`` (each defines ``close()``)."""

    def close(self) -> None:  # pragma: no cover - each engine defines it
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@dataclass(frozen=True)
class LogStats:
    """A snapshot of a log's counters (``Log.stats()``)."""

    first_seq: int
    """Lowest sequence number still on disk."""
    next_seq: int
    """The number the next append gets."""
    synced_seq: int
    """Every record below this number is on stable storage."""
    segments: int
    corrupt_records: int
    """Damaged records this handle skipped (never returned)."""
    recovered_bytes_dropped: int
    """Bytes of a torn tail dropped when this handle opened the log."""
    recovered_records_dropped: int
    """Complete records dropped with the torn tail: the rest of their batch was missing."""
    fsyncs: int
    appends: int
    poisoned: bool


@dataclass(frozen=True)
class Damage:
    """One damaged region found by ``Log.verify()``."""

    segment: int
    """Base sequence number of the segment file."""
    offset: int
    length: int
    after_seq: Optional[int]
    """Last intact record before the damage, if any."""
    kind: str
    """'record', 'segment-header', 'torn-tail' or 'not-a-segment'."""


@dataclass(frozen=True)
class VerifyReport:
    records: int
    damage: List[Damage]

    @property
    def ok(self) -> bool:
        return not self.damage
