"""The value types both log engines return (``Log.stats()``, ``Log.verify()``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

__all__ = ["LogStats", "Damage", "VerifyReport", "MAX_RECORD", "DURABILITY_MODES"]

MAX_RECORD: int = 1073741824
"""The largest payload a record holds: 1 GiB (docs/FORMAT.md)."""
DURABILITY_MODES = {"none": 0, "interval": 1, "sync": 2}


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
