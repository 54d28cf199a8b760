"""The backend contract: what a queue's storage must do, at the level of leases.

The semantics layer (``_queue.py``: validation, encoding, ids, delay
precedence, settings precedence, the dead-letter policy, errors that name
the queue) drives one :class:`QueueBackend` per open queue, made by a
:class:`Store` (a broker's storage: a directory, a database).  The local
log (``_local/backend.py``) is the first backend.

Words used below:

- A message is stored as its **record**: the bytes ``_message.py``
  describes (a 16-byte header with version, content type, flags, delay and
  send time, then the body).  Backends store records as they are given and
  hand them back unchanged; they read the header only for the send time
  (retention), the delay (visibility) and nothing else.
- A message's **number** (``seq``) is given by the backend when the record
  is appended: unique within the queue, increasing in send order.  Its id is
  ``id_prefix`` + the number as 16 hex digits.
- A **delivery** is a (number, attempts) pair: the ``attempts``-th lease of
  that message.  A lease id names a delivery; the backend's ack, retry and
  extend take deliveries, so a stale one (the message was delivered again
  since) never disturbs the current lease.  Acks take numbers only: an ack
  after the lease ran out still counts, as on Cloudflare.
- Times are integer microseconds since the epoch, read from the clock the
  semantics layer passes in (so tests can drive every backend's clock).

Durability: "appended" means what the queue's durability mode says (after
fdatasync for ``sync``; in the kernel for ``interval`` and ``none``).  Every
other change returns once every process of the store sees it and a process
crash cannot lose it; only a power cut may lose the last state changes,
which at-least-once delivery allows (a redelivery).
"""

from __future__ import annotations

import abc
import bisect
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from ._log import MessageBase

RECORD_HEADER = struct.Struct("<BBHIq")
"""A message record's header (docs/FORMAT.md, "Message records"): version,
content type, flags, delay in ms, send time in µs."""
RECORD_VERSION = 1
MAX_APPEND = 1000
"""The most records one :meth:`QueueBackend.append` is given (a
``send_batch``, a redrive step, a dead-letter move)."""
DELIVERY_BUCKETS_US: Tuple[int, ...] = (
    1_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000, 5_000_000, 10_000_000,
    60_000_000, 300_000_000, 3_600_000_000)
"""Upper bounds (µs) of the delivery latency histogram's buckets: the time
from a message's send to its first delivery, its delivery delay included.
Bucket ``i`` counts latencies ``<= DELIVERY_BUCKETS_US[i]`` and above the
bound before; one more bucket holds the rest.  Every backend stores the
counts per bucket (the local checkpoint, PostgreSQL's ``counters``), so the
bounds are part of both formats."""


def delivery_bucket(latency_us: int) -> int:
    """The histogram bucket of one delivery latency (the one rule)."""
    return bisect.bisect_left(DELIVERY_BUCKETS_US, latency_us)


@dataclass(frozen=True)
class Counts:
    """A queue's counts at one moment (``QueueBackend.counts``)."""

    backlog: int
    """Messages not done yet: waiting, in flight or delayed."""
    backlog_bytes: int
    """Bytes of the records of the backlog's messages."""
    in_flight: int
    delayed: int
    oldest_sent_us: Optional[int]
    """Send time of the oldest message not done; None when there is none."""
    acked: int
    dead_lettered: int
    deleted: int
    expired: int
    purged: int
    sent: int
    """Messages ever appended (numbers given out)."""
    retried: int = 0
    """Deliveries a consumer asked to retry (a retry at the last attempt
    dead-letters instead, and is counted there)."""
    lease_expired: int = 0
    """Leases that ran out without an ack or retry, found by a later lease."""
    delivery_buckets: Tuple[int, ...] = ()
    """First deliveries per bucket of :data:`DELIVERY_BUCKETS_US` (one more
    for the rest); empty: none yet."""
    delivery_sum_us: int = 0
    """The sum of those deliveries' latencies."""


@dataclass(frozen=True)
class LeasePolicy:
    """What the semantics layer decides for one lease call."""

    max_attempts: int
    """A message leased this many times already is not leased again: it goes
    to ``dead_letter_to``, or is deleted when that is None."""
    retention_us: Optional[int]
    """Messages sent this long ago are expired instead of leased; None keeps them."""
    dead_letter_to: Optional[Callable[[], "QueueBackend"]]
    """The dead-letter queue (opened when first needed); None: delete."""
    dead_letter_record: Callable[[bytes, int, int, int], bytes]
    """``(record, number, attempts, now_us)`` -> the record its copy in the
    dead-letter queue gets."""


class QueueBackend(abc.ABC):
    """One queue's storage.  Safe to call from many threads; every method
    is atomic with respect to every other process using the same store."""

    name: str
    id_prefix: str
    created_us: Optional[int]
    """When the queue was created (None when the store does not know)."""

    # -- producing --------------------------------------------------------

    @abc.abstractmethod
    def append(self, records: Sequence[bytes], prefix: bytes = b"") -> int:
        """Append ``prefix + r`` for each record as one atomic write: after
        any crash all of them are there or none.  Returns the first number;
        the others follow it.  Durable per the durability mode on return."""

    @abc.abstractmethod
    def append_one(self, record: bytes) -> int:
        """``append([record])``, on the shortest path the backend has."""

    def direct_append(self) -> Optional[Tuple[Callable[..., int], Any]]:
        """``(fn, handle)`` where ``fn(handle, record, len(record))`` is
        :meth:`append_one` with no Python frame of its own (the local C
        engine's call, made straight from ``Queue.send``): it returns the
        number, or a negative error code that the caller hands to
        :meth:`append_failed`, which raises.  Valid until :meth:`close`;
        None (the default) when the backend has no such path."""
        return None

    def append_failed(self, code: int, record: bytes) -> int:
        """Raise the error of a failed :meth:`direct_append` call (``code`` < 0)."""
        raise NotImplementedError

    @abc.abstractmethod
    def sync(self) -> None:
        """Make every record appended so far durable (fdatasync or commit)."""

    # -- consuming --------------------------------------------------------

    @abc.abstractmethod
    def lease(self, n: int, visibility_us: int, now_us: int, policy: LeasePolicy) -> List[Any]:
        """Lease up to ``n`` visible messages until ``now_us + visibility_us``,
        atomically: no two leases of one message overlap, in any process.
        Returns a message (see :meth:`Store.open_queue`) for each, redeliveries
        (attempts > 1) first.  Messages found past ``policy`` (expired, or
        leased ``max_attempts`` times) are expired or moved to the
        dead-letter queue in the same step and are not returned."""

    @abc.abstractmethod
    def ack(self, numbers: Sequence[int]) -> int:
        """Mark these messages done, whatever delivery holds them; returns
        how many were not done yet."""

    @abc.abstractmethod
    def retry(self, numbers: Sequence[int], attempts: Sequence[int], due_us: Sequence[int]) -> int:
        """End these deliveries: each message is visible again at its due
        time.  A delivery that is no longer the current lease (acked, or
        delivered again since) is left alone.  Returns how many took effect."""

    @abc.abstractmethod
    def extend(self, numbers: Sequence[int], attempts: Sequence[int], deadline_us: int) -> int:
        """Move the deadline of these deliveries' leases, attempts unchanged;
        stale deliveries are left alone.  Returns how many took effect."""

    @abc.abstractmethod
    def dead_letter(self, numbers: Sequence[int], attempts: Sequence[int], now_us: int,
                    policy: LeasePolicy, records: Optional[Sequence[bytes]] = None) -> int:
        """Take these deliveries out of the queue: copied to the policy's
        dead-letter queue (durably, before they leave here) or deleted when
        it has none.  Only current deliveries move; an ack that came first
        wins.  A crash part-way leaves a copy in ``to`` and the message
        here, never neither.  Returns how many left."""

    @abc.abstractmethod
    def lease_state(self, numbers: Sequence[int]) -> List[Optional[int]]:
        """For each message: the attempts of its current lease, 0 when it is
        not done but not leased, None when it is done or unknown."""

    # -- looking, cleaning -----------------------------------------------

    @abc.abstractmethod
    def peek(self, n: int) -> List[Any]:
        """Up to ``n`` messages not done, oldest first, changing nothing
        (messages made with ``peeked=True``; attempts: the deliveries so far)."""

    @abc.abstractmethod
    def purge(self) -> int:
        """Delete every message appended so far; returns how many were not done."""

    @abc.abstractmethod
    def expire(self, retention_us: int, now_us: int) -> int:
        """Drop messages sent ``retention_us`` or more before ``now_us``
        that are not leased; returns how many."""

    @abc.abstractmethod
    def oldest_sent_us(self) -> Optional[int]:
        """Send time of the oldest record the queue still stores (done or
        not: a cheap lower bound, for deciding whether to :meth:`expire`)."""

    @abc.abstractmethod
    def counts(self, now_us: int, with_bytes: bool = False) -> Counts:
        """The queue's counts, as every process sees them now
        (``backlog_bytes`` only ``with_bytes``: it may read the backlog)."""

    # -- pausing, waiting --------------------------------------------------

    @abc.abstractmethod
    def set_paused(self, paused: bool) -> None:
        """Pause (leases return nothing) or resume delivery, for every process."""

    @abc.abstractmethod
    def paused(self) -> bool:
        """Whether delivery is paused."""

    @abc.abstractmethod
    def change_token(self) -> int:
        """A token for :meth:`wait_change`: take it before looking."""

    @abc.abstractmethod
    def wait_change(self, token: int, timeout: float) -> None:
        """Block until an append, retry or resume in any process since
        ``token`` was taken, or ``timeout`` seconds, or :meth:`wake`."""

    @abc.abstractmethod
    def wake(self) -> None:
        """Wake every :meth:`wait_change` on this queue, in every process."""

    @abc.abstractmethod
    def next_due_us(self) -> Optional[int]:
        """When the next retry, delayed message or lease comes due, if known."""

    # -- settings, lifetime -------------------------------------------------

    @abc.abstractmethod
    def load_settings(self) -> Dict[str, Any]:
        """The settings stored with the queue (only the keys ever set)."""

    @abc.abstractmethod
    def store_settings(self, changes: Dict[str, Any]) -> Dict[str, Any]:
        """Set the keys named (others stay), durably and atomically against
        other writers; returns the stored settings after the change."""

    @abc.abstractmethod
    def settings_counter(self) -> Any:
        """The stored settings' change counter: an object ``c`` whose
        ``c[0]`` is an int that changes whenever :meth:`store_settings`
        runs, in any process, and stays put until :meth:`close`.  Reading
        ``c[0]`` is a plain memory read, so the semantics layer compares it
        with the value it read before its last :meth:`load_settings` on
        every call (a send included) and reloads when it moved."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the queue's resources; idempotent."""


class Store(abc.ABC):
    """A broker's storage: where its queues live."""

    location: str
    engine: str
    """What holds the queues, for people to read: ``"c"`` or ``"pure"`` (the
    local log's engines)."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """Whether the queue ``name`` exists."""

    @abc.abstractmethod
    def queue_names(self) -> List[str]:
        """Names of every queue, sorted."""

    @abc.abstractmethod
    def create_queue(self, name: str) -> bool:
        """Create the queue ``name`` if missing, durably; True when this call made it."""

    @abc.abstractmethod
    def delete_queue(self, name: str) -> None:
        """Delete the queue and every message in it, durably."""

    @abc.abstractmethod
    def open_queue(self, name: str, owner: Any, message_class: type[MessageBase],
                   durability: str, segment_bytes: int) -> QueueBackend:
        """A backend for the existing queue ``name``.  The messages it hands
        out are ``message_class(owner, number, attempts, record[, peeked])``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store; idempotent."""
