"""Broker and Queue: Cloudflare Queues' semantics over a backend.

This is the layer every backend shares (``_backend.py`` is the contract it
drives; ``_local/backend.py`` the local log): validation, encoding, ids,
delay precedence, the settings' precedence, first call wins, the
dead-letter policy, lease ids, and errors that name the queue.

Settings.  A queue's settings are stored with the queue, so every process
obeys the same ones.  What a handle sees, lowest first: Cloudflare's
defaults, then ``qlog.toml`` in the data directory, then the settings
stored with the queue (each key set by ``broker.queue(name, key=...)``,
``@broker.consumer(name, key=...)``, :meth:`Broker.configure` or ``qlog
queues update``; an update changes only the keys it names).  Three keys
belong to the handle, not the queue: ``durability``, ``allow_pickle`` and
``segment_bytes`` (keyword arguments, then qlog.toml, then defaults).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import errors
from ._backend import RECORD_HEADER as HEADER, RECORD_VERSION as VERSION
from ._backend import DELIVERY_BUCKETS_US, LeasePolicy, QueueBackend, Store
from ._log import ids as _ids
from ._log.modes import DEFAULT_FILE_MODE, check_mode
from ._pg.conn import is_target
from ._message import (
    CONTENT_TYPES,
    CT_BYTES,
    CT_JSON,
    CT_PICKLE,
    Message,
    MessageBatch,
    MessageSendRequest,
    content_type_code,
    _json_encode,
    dead_letter_payload,
    encode_body,
    split,
)
from ._settings import (
    CONSUMER_KEY,
    CONSUMER_TYPES,
    HANDLE_KEYS,
    MAX_PULL_BATCH,
    MAX_SEND_BATCH,
    MAX_SEND_BATCH_BYTES,
    QueueSettings,
    Settings,
    StoredSettings,
    check_name,
    delay_us as _delay_us,
    load_toml,
    plural,
    toml_settings,
    validate,
)

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack  # typing.Unpack from Python 3.12

_pack_header = HEADER.pack


def _moved(n: int) -> str:
    return f"{plural(n, 'message')} {'was' if n == 1 else 'were'}"


def _check_wait(wait: object) -> None:
    """The one check of a pull's ``wait``."""
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 43_200:
        raise errors.SettingsError(f"wait must be from 0 to 43200 seconds, got {wait!r}")
_LEASE_RE = re.compile(r"([0-9a-f]{16})([0-9a-f]{16})\.([1-9][0-9]*)")


DELIVERY_BUCKETS: Tuple[float, ...] = tuple(b / 1e6 for b in DELIVERY_BUCKETS_US)
"""Upper bounds, in seconds, of :attr:`QueueStats.delivery_buckets`."""


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of a queue (``Queue.stats()``)."""

    backlog: int
    """Messages not yet done: waiting, in flight or delayed."""
    in_flight: int
    """Leased to a consumer whose visibility timeout has not run out."""
    delayed: int
    """Waiting out a retry delay or a delivery delay.  The local backend
    counts a delivery delay once a pull has passed over the message (it does
    not read ahead); PostgreSQL counts every one."""
    acked: int
    dead_lettered: int
    """Moved to the dead-letter queue after max_retries."""
    deleted: int
    """Failed max_retries times with no dead-letter queue: deleted."""
    expired: int
    """Dropped by message_retention."""
    purged: int
    oldest_age: Optional[float]
    """Seconds since the oldest message not yet done was sent; None when empty."""
    paused: bool = False
    """Delivery is paused (:meth:`Queue.pause_delivery`): sends are kept, nothing is delivered."""
    sent: int = 0
    """Message numbers given out so far (every message ever sent)."""
    retried: int = 0
    """Deliveries retried (``retry()``, ``retry_all()``, a failed handler);
    a retry at the last attempt is counted as dead-lettered or deleted."""
    lease_expired: int = 0
    """Leases that ran out with no ack or retry (found by a later pull)."""
    delivery_buckets: Tuple[int, ...] = ()
    """First deliveries by latency (send to first lease, delivery delay
    included): one count per bound of :data:`DELIVERY_BUCKETS` (latencies
    at most that bound and above the one before), then one for the rest."""
    delivery_seconds: float = 0.0
    """The sum of those latencies."""


@dataclass(frozen=True)
class QueueMetrics:
    """Cloudflare's queue metrics (``Queue.metrics()``)."""

    backlog_count: int
    backlog_bytes: int
    oldest_message_timestamp: Optional[float]
    """Seconds since the epoch when the oldest message not done was sent."""


@dataclass(frozen=True)
class SettleResult:
    """What :meth:`Queue.settle` did: Cloudflare's ``/messages/ack`` answer."""

    ack_count: int
    """Messages acked by this call (not done before)."""
    retry_count: int
    """Deliveries retried (or dead-lettered, after max_retries) by this call."""
    warnings: List[str]
    """One line per lease id that changed nothing, and why."""


class Queue:
    """A named, durable queue of a :class:`Broker`.  Safe to share between
    threads; any number of processes may open it at once."""

    def __init__(self, broker: "Broker", name: str, handle: Dict[str, Any]) -> None:
        self.name = name
        self._broker = broker
        self._clock = broker._clock
        self._handle = handle
        self.durability = handle.get("durability") or broker.durability
        self._b: QueueBackend = broker._store.open_queue(
            name, self, Message, self.durability,
            handle.get("segment_bytes", QueueSettings.segment_bytes))
        self._idpre = self._b.id_prefix
        self._direct = self._b.direct_append()  # see send; None once closed
        self._gen = self._b.settings_counter()  # see settings
        self._gen_seen = -1
        self._next_sweep = 0.0
        self._closed = False
        self._refresh()

    # -- settings ----------------------------------------------------------

    def _refresh(self) -> None:
        """Resolve the settings again (see the module docstring)."""
        self._gen_seen = self._gen[0]  # before the load: a change during it reloads next call
        stored = self._b.load_settings()
        fs = self._broker._file_settings
        base = toml_settings(fs, self.name)
        try:
            stored = validate({k: v for k, v in stored.items() if k not in HANDLE_KEYS and k != CONSUMER_KEY},
                              f"stored with queue {self.name!r}")
        except errors.SettingsError as e:
            raise errors.CorruptStateError(str(e)) from None
        s = replace(QueueSettings(), **{**base, **stored, **self._handle})
        self._settings = s
        # A handle's own key (never stored): decoding a body reads it
        # without the per-call check of `settings`.
        self._allow_pickle = s.allow_pickle
        dlq = s.dead_letter_queue
        self._policy = LeasePolicy(
            max_attempts=s.max_retries + 1,
            retention_us=None if s.message_retention is None else int(s.message_retention * 1_000_000),
            dead_letter_to=None if not dlq else functools.partial(self._dead_letter_queue, dlq),
            dead_letter_record=self._dead_letter_record,
        )

    @property
    def settings(self) -> QueueSettings:
        """The settings every delivery obeys now (see the module docstring
        for where each comes from)."""
        if self._gen[0] != self._gen_seen:
            self._refresh()
        return self._settings

    def _dead_letter_queue(self, name: str) -> QueueBackend:
        return self._broker.queue(name)._b

    def _dead_letter_record(self, record: bytes, seq: int, attempts: int, now: int) -> bytes:
        meta = split(record)[4]
        mid = meta["id"] if meta is not None else f"{self._idpre}{seq:016x}"
        return dead_letter_payload(record, mid, self.name, attempts, now)

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    # -- producing -------------------------------------------------------

    def send(self, body: Any, *, content_type: str = "json", delay_seconds: Optional[float] = None) -> str:
        """Send one message; returns its id.

        Returns once the message is on stable storage (durability "sync",
        shared fsync with every concurrent sender) or in the kernel
        ("interval", "none").  Bad input raises before anything is written."""
        ct = CONTENT_TYPES.get(content_type) if type(content_type) is str else None
        if ct == CT_BYTES and type(body) is bytes:
            data = body
        else:
            if ct is None:  # not a str naming a content type: raises, unless a str subclass
                ct = content_type_code(content_type)
            if ct == CT_PICKLE and not self.settings.allow_pickle:
                self._refuse_pickle()
            data = encode_body(body, ct)
        if self._gen[0] != self._gen_seen:
            self._refresh()
        settings = self._settings
        if len(data) > settings.max_message_size:
            raise errors.MessageTooLargeError(
                f"message body of {len(data)} bytes is larger than max_message_size "
                f"{settings.max_message_size} bytes of queue {self.name!r}"
            )
        if delay_seconds is None and not settings.delivery_delay:
            delay_ms = 0
        else:
            delay_ms = _delay_us(delay_seconds, settings.delivery_delay, "delay_seconds") // 1000
        now = int(self._clock() * 1_000_000)
        payload = _pack_header(VERSION, ct, 0, delay_ms, now) + data
        direct = self._direct
        if direct is not None:
            seq = direct[0](direct[1], payload, len(payload))
            if seq < 0:
                self._b.append_failed(seq, payload)
        else:
            seq = self._b.append_one(payload)
        if now > self._next_sweep:
            self._sweep(now)
        return f"{self._idpre}{seq:016x}"

    def send_batch(
        self,
        messages: Iterable[Union[Any, MessageSendRequest]],
        *,
        content_type: str = "json",
        delay_seconds: Optional[float] = None,
    ) -> List[str]:
        """Send up to 1,000 messages (256 MiB of bodies in all) as one atomic, durable write: after any
        crash all of them are in the queue or none.  Items are bodies (of
        ``content_type``) or :class:`MessageSendRequest` with their own
        options.  Returns the ids in order."""
        if not isinstance(messages, (list, tuple)):
            messages = list(messages)
        n = len(messages)
        if n == 0:
            raise errors.BatchTooLargeError("send_batch needs 1 to 1000 messages, got none")
        if n > MAX_SEND_BATCH:
            raise errors.BatchTooLargeError(
                f"send_batch of {n} messages is more than the limit of {MAX_SEND_BATCH}"
            )
        ct = content_type_code(content_type)
        settings = self.settings
        delay = _delay_us(delay_seconds, settings.delivery_delay, "delay_seconds")
        allow_pickle = settings.allow_pickle
        limit = settings.max_message_size
        now = self._now_us()
        if ct == CT_PICKLE and not allow_pickle:
            self._refuse_pickle()
        types = set(map(type, messages))
        if MessageSendRequest not in types:
            if ct == CT_BYTES and len(types) == 1 and bytes in types:
                bodies: Sequence[bytes] = messages  # type: ignore[assignment]
            elif ct == CT_JSON:
                try:
                    bodies = [_json_encode(m).encode("utf-8") for m in messages]
                except Exception:  # find the culprit, say which one
                    bodies = [self._encode_at(m, ct, i) for i, m in enumerate(messages)]
            else:
                bodies = [self._encode_at(m, ct, i) for i, m in enumerate(messages)]
            big = max(map(len, bodies))
            if big > limit:
                i = next(i for i, b in enumerate(bodies) if len(b) > limit)
                self._too_large(i, len(bodies[i]), limit)
            if big * n > MAX_SEND_BATCH_BYTES:
                self._batch_bytes(sum(map(len, bodies)))
            prefix = HEADER.pack(VERSION, ct, 0, delay // 1000, now)
            seq = self._b.append(bodies, prefix)
        else:
            payloads = []
            for i, m in enumerate(messages):
                if type(m) is MessageSendRequest:
                    mct = ct if m.content_type is None else content_type_code(m.content_type)
                    if mct == CT_PICKLE and not allow_pickle:
                        self._refuse_pickle()
                    mdelay = delay if m.delay_seconds is None else _delay_us(
                        m.delay_seconds, 0, f"delay_seconds of message {i}"
                    )
                    data = self._encode_at(m.body, mct, i)
                else:
                    mct, mdelay, data = ct, delay, self._encode_at(m, ct, i)
                if len(data) > limit:
                    self._too_large(i, len(data), limit)
                payloads.append(HEADER.pack(VERSION, mct, 0, mdelay // 1000, now) + data)
            self._batch_bytes(sum(map(len, payloads)) - HEADER.size * n)
            seq = self._b.append(payloads)
        if now > self._next_sweep:
            self._sweep(now)
        return _ids(self._idpre, seq, n)

    def _send_raw(self, items: Sequence[Tuple[int, bytes]]) -> List[str]:
        """Send stored bodies as they are: ``(content type code, body
        bytes)`` pairs, e.g. a dead-letter queue's messages moved back by
        :meth:`Broker.redrive` (no body is decoded, so pickles stay inert).
        One atomic write of 1 to 1,000 messages; returns the new ids."""
        if not 1 <= len(items) <= MAX_SEND_BATCH:
            raise errors.BatchTooLargeError(
                f"a batch needs 1 to {MAX_SEND_BATCH} messages, got {len(items)}"
            )
        self._batch_bytes(sum(len(d) for _, d in items))
        now = self._now_us()
        limit = self.settings.max_message_size
        payloads = []
        for i, (ct, data) in enumerate(items):
            if len(data) > limit:
                self._too_large(i, len(data), limit)
            payloads.append(HEADER.pack(VERSION, ct, 0, 0, now) + data)
        seq = self._b.append(payloads)
        return _ids(self._idpre, seq, len(items))

    def _batch_bytes(self, total: int) -> None:
        if total > MAX_SEND_BATCH_BYTES:
            raise errors.BatchTooLargeError(
                f"send_batch of {total} bytes of message bodies is more than the limit of "
                f"{MAX_SEND_BATCH_BYTES} bytes; nothing was sent"
            )

    def _encode_at(self, body: Any, ct: int, i: int) -> bytes:
        try:
            return encode_body(body, ct)
        except errors.BodyTypeError as e:
            raise errors.BodyTypeError(f"message {i} of the batch: {e}") from None

    def _too_large(self, i: int, size: int, limit: int) -> None:
        raise errors.MessageTooLargeError(
            f"message {i} of the batch has a body of {size} bytes, larger than "
            f"max_message_size {limit} bytes of queue {self.name!r}; nothing was sent"
        )

    def _refuse_pickle(self) -> None:
        raise errors.PickleNotAllowedError(
            f"queue {self.name!r} does not accept content_type 'pickle': open it with "
            "allow_pickle=True (unpickling untrusted data can run arbitrary code)"
        )

    # -- consuming -------------------------------------------------------

    def pull(
        self,
        batch_size: Optional[int] = None,
        visibility_timeout: Optional[float] = None,
        *,
        wait: float = 0.0,
    ) -> MessageBatch:
        """Lease up to ``batch_size`` visible messages (default
        ``max_batch_size``, at most 1,000) for ``visibility_timeout``
        seconds (default the queue's).  Returns at once, with an empty batch
        when nothing is visible, unless ``wait`` seconds are given: then it
        blocks until a message can be delivered (a send, retry or expiry in
        any process wakes it) or the time is up.  An empty batch's
        ``paused`` tells a paused queue (:meth:`pause_delivery`) from an
        empty one.

        A message neither acked nor retried before its lease runs out is
        delivered again with ``attempts + 1``.  Each message carries a
        ``lease_id`` that :meth:`settle` and :meth:`extend` take, in any
        process."""
        s = self.settings
        n = s.max_batch_size if batch_size is None else batch_size
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PULL_BATCH:
            raise errors.BatchTooLargeError(
                f"batch_size must be an integer from 1 to {MAX_PULL_BATCH}, got {batch_size!r}"
            )
        vt = s.visibility_timeout
        if visibility_timeout is not None and visibility_timeout != vt:  # the queue's own was checked when set
            validate({"visibility_timeout": visibility_timeout}, "passed to pull()")
            vt = visibility_timeout
        _check_wait(wait)
        got = self._pull_wait(n, int(vt * 1_000_000), wait)
        return MessageBatch(self, got, paused=not got and self._b.paused())

    def _pull_wait(self, n: int, vt_us: int, wait: float) -> List[Message]:
        end = time.monotonic() + wait
        while True:
            token = self._b.change_token() if wait > 0 else 0
            got = self._lease(n, vt_us)
            if got or wait <= 0:
                return got
            left = end - time.monotonic()
            if left <= 0:
                return got
            self.wait_change(token, left)

    def _lease(self, n: int, vt_us: int) -> List[Message]:
        if self._gen[0] != self._gen_seen:
            self._refresh()
        return self._b.lease(n, vt_us, self._now_us(), self._policy)

    def change_token(self) -> int:
        """A token for :meth:`wait_change`; take it before pulling."""
        return self._b.change_token()

    def wait_change(self, token: int, timeout: float) -> None:
        """Block until something may be deliverable that was not when
        ``token`` was taken: a send, retry, resume or :meth:`wake` in any
        process, or the next retry, delay or lease coming due; at most
        ``timeout`` seconds.  For consumers built on :meth:`pull`."""
        next_due = self._b.next_due_us()
        if next_due is not None:
            timeout = min(timeout, max(0.0, (next_due - self._now_us()) / 1e6) + 0.001)
        if timeout > 0:
            self._b.wait_change(token, timeout)

    def wake(self) -> None:
        """Wake every :meth:`wait_change` and waiting :meth:`pull` on this
        queue, in every process (they look again, then wait on)."""
        self._b.wake()

    @property
    def queue_id(self) -> str:
        """The queue's id: the 16 hex digits its message ids start with
        (Cloudflare's ``queue_id``; a deleted and re-created queue gets a new one)."""
        return self._idpre

    @property
    def created(self) -> Optional[float]:
        """When the queue was created, in seconds since the epoch (None when unknown)."""
        c = self._b.created_us
        return None if c is None else c / 1e6

    def delete_messages(self, ids: Iterable[str]) -> int:
        """Delete these messages (their :attr:`Message.ref`, from
        :meth:`peek` or a delivery) whatever their state, as acked:
        Cloudflare's purge by ``ref``.  Returns how many were not done yet;
        refs of other queues are refused
        (:class:`~qlog.errors.InvalidLeaseError`) before anything changes."""
        nums = []
        for i in ids:
            if not isinstance(i, str) or len(i) != 32 or not i.startswith(self._idpre):
                raise errors.InvalidLeaseError(
                    f"{i!r} is not a message id of queue {self.name!r}; nothing was deleted")
            try:
                nums.append(int(i[16:], 16))
            except ValueError:
                raise errors.InvalidLeaseError(
                    f"{i!r} is not a message id of queue {self.name!r}; nothing was deleted") from None
        return self._b.ack(nums) if nums else 0

    # -- consumer records (Cloudflare's consumers API) --------------------------

    def consumers(self) -> List[Dict[str, Any]]:
        """The consumer record stored with the queue (none or one: a queue
        has one consumer): ``consumer_id``, ``type`` ("worker" or
        "http_pull"), ``script_name``, ``created``.  Its settings are the
        queue's."""
        c = self._b.load_settings().get(CONSUMER_KEY)
        return [dict(c)] if isinstance(c, dict) else []

    def set_consumer(self, type: str, script_name: Optional[str] = None,
                     settings: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Record the queue's consumer (replacing any), storing ``settings``
        (qlog's names) with the queue; returns the record."""
        if type not in CONSUMER_TYPES:
            raise errors.SettingsError(f"consumer type must be one of {', '.join(CONSUMER_TYPES)}, got {type!r}")
        if script_name is not None and not isinstance(script_name, str):
            raise errors.SettingsError(f"script_name must be a string, got {script_name!r}")
        if settings:
            self._broker.configure(self.name, **settings)
        old = self.consumers()
        record = {"consumer_id": old[0]["consumer_id"] if old else secrets.token_hex(16),
                  "type": type, "script_name": script_name,
                  "created": old[0]["created"] if old else self._clock()}
        self._b.store_settings({CONSUMER_KEY: record})
        return record

    def remove_consumer(self) -> None:
        """Forget the queue's consumer record (its settings stay)."""
        self._b.store_settings({CONSUMER_KEY: None})

    def peek(self, n: int = 10) -> List[Message]:
        """Up to ``n`` messages not yet done, oldest first, without leasing
        or changing them.  Their ``attempts`` is the deliveries so far; they
        cannot be acked or retried."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PULL_BATCH:
            raise errors.BatchTooLargeError(f"peek takes 1 to {MAX_PULL_BATCH} messages, got {n!r}")
        return self._b.peek(n)

    # -- settling by lease id -------------------------------------------------

    def _lease_key(self, lease_id: object) -> Tuple[int, int]:
        m = _LEASE_RE.fullmatch(lease_id) if isinstance(lease_id, str) else None
        if m is None or m.group(1) != self._idpre:
            raise errors.InvalidLeaseError(
                f"{lease_id!r} is not a lease id of queue {self.name!r} (lease ids come from "
                "Message.lease_id of a message this queue delivered); nothing was settled"
            )
        return int(m.group(2), 16), int(m.group(3))

    def settle(
        self,
        acks: Iterable[str] = (),
        retries: Iterable[Union[str, Tuple[str, Optional[float]]]] = (),
    ) -> SettleResult:
        """Ack and retry delivered messages by lease id, from any process
        that opens the queue: the shape of Cloudflare's ``/messages/ack``.
        ``retries`` holds lease ids or ``(lease_id, delay_seconds)`` pairs
        (``None``: the queue's ``retry_delay``).

        A lease id that is not this queue's raises
        :class:`~qlog.errors.InvalidLeaseError` before anything changes.
        Stale lease ids: an ack counts even after the lease ran out or the
        message was delivered again (the work was done; at-least-once), as
        on Cloudflare; a retry of a delivery that is no longer current
        changes nothing, so it never disturbs the message's new lease.
        Both are reported in ``warnings``.  A lease id in both lists is
        acked."""
        ack_keys = [self._lease_key(x) for x in acks]
        retry_keys: List[Tuple[int, int, int]] = []
        for r in retries:
            lid, delay = (r, None) if isinstance(r, str) else r
            seq, att = self._lease_key(lid)
            retry_keys.append((seq, att, self._retry_delay_us(delay)))
        acked_seqs = {s for s, _ in ack_keys}
        warnings: List[str] = []
        ack_count = 0
        if ack_keys:
            seqs = sorted(acked_seqs)
            state = dict(zip(seqs, self._b.lease_state(seqs)))
            for s, a in ack_keys:
                if state.get(s) is None:
                    warnings.append(f"lease {self._lease_id(s, a)}: the message is done already")
                elif state[s] != a:
                    warnings.append(f"lease {self._lease_id(s, a)}: stale (the message was delivered "
                                    "again since); the message is acked")
            ack_count = self._b.ack(seqs)
        retry_keys = [k for k in retry_keys if k[0] not in acked_seqs]
        retry_count = 0
        if retry_keys:
            state = dict(zip([k[0] for k in retry_keys], self._b.lease_state([k[0] for k in retry_keys])))
            live = []
            for s, a, d in retry_keys:
                if state.get(s) == a:
                    live.append((s, a, d))
                else:
                    warnings.append(f"lease {self._lease_id(s, a)}: not the current lease of its message "
                                    "(it ran out and the message was delivered again, or it is done); "
                                    "not retried")
            retry_count = self._retry_keys(live)
        return SettleResult(ack_count, retry_count, warnings)

    def extend(self, lease_ids: Iterable[str], visibility_timeout: Optional[float] = None) -> int:
        """Renew leases by id for ``visibility_timeout`` seconds from now
        (default the queue's), attempts unchanged; returns how many were
        current (stale ones change nothing)."""
        keys = [self._lease_key(x) for x in lease_ids]
        if not keys:
            return 0
        return self._b.extend([s for s, _ in keys], [a for _, a in keys], self._deadline(visibility_timeout))

    def _deadline(self, visibility_timeout: Optional[float]) -> int:
        vt = self.settings.visibility_timeout if visibility_timeout is None else visibility_timeout
        validate({"visibility_timeout": vt}, "passed to extend()")
        return self._now_us() + int(vt * 1_000_000)

    def _lease_id(self, seq: int, attempts: int) -> str:
        return f"{self._idpre}{seq:016x}.{attempts}"

    # -- acks and retries (called by Message and MessageBatch) -----------

    def _ack(self, seqs: List[int]) -> None:
        self._b.ack(seqs)

    def _extend(self, messages: List[Message], deadline_us: int) -> None:
        """Extend the leases of delivered messages still open to
        ``deadline_us``.  A lease that has already passed to another
        delivery is left alone."""
        todo = [m for m in messages if not m._outcome]
        if todo:
            self._b.extend([m._seq for m in todo], [m.attempts for m in todo], deadline_us)

    def _retry_delay_us(self, delay_seconds: Optional[float]) -> int:
        return _delay_us(delay_seconds, self.settings.retry_delay, "delay_seconds")

    def _retry(self, messages: List[Message], delay_us: int) -> None:
        self._retry_keys([(m._seq, m.attempts, delay_us) for m in messages],
                         {m._seq: m._payload for m in messages})

    def _retry_keys(self, keys: List[Tuple[int, int, int]],
                    records: Optional[Dict[int, bytes]] = None) -> int:
        """Retry deliveries ``(seq, attempts, delay µs)``; those at their
        last attempt go to the dead-letter queue (or are deleted): the
        queue's DLQ policy."""
        s = self.settings
        policy = self._policy
        max_att = s.max_retries + 1
        now = self._now_us()
        normal = [k for k in keys if k[1] < max_att]
        final = [k for k in keys if k[1] >= max_att]
        n = 0
        if normal:
            n += self._b.retry([k[0] for k in normal], [k[1] for k in normal],
                               [now + k[2] for k in normal])
        if final:
            recs = None if records is None else [records[k[0]] for k in final]
            n += self._b.dead_letter([k[0] for k in final], [k[1] for k in final], now, policy, recs)
        return n

    # -- counts ------------------------------------------------------------

    def stats(self) -> QueueStats:
        """Counts of the queue's messages as every process sees them."""
        now = self._now_us()
        c = self._b.counts(now)
        return QueueStats(
            backlog=c.backlog,
            in_flight=c.in_flight,
            delayed=c.delayed,
            acked=c.acked,
            dead_lettered=c.dead_lettered,
            deleted=c.deleted,
            expired=c.expired,
            purged=c.purged,
            oldest_age=None if c.oldest_sent_us is None else max(0.0, (now - c.oldest_sent_us) / 1e6),
            paused=self.paused,
            sent=c.sent,
            retried=c.retried,
            lease_expired=c.lease_expired,
            delivery_buckets=c.delivery_buckets or (0,) * (len(DELIVERY_BUCKETS_US) + 1),
            delivery_seconds=c.delivery_sum_us / 1e6,
        )

    def metrics(self, count_bytes: bool = True) -> QueueMetrics:
        """Cloudflare's backlog metrics: messages not done, their bytes, and
        when the oldest was sent.  Reads the backlog's records to count
        their bytes (one read per 1,000); ``count_bytes=False`` does not
        (``backlog_bytes`` is then 0)."""
        c = self._b.counts(self._now_us(), with_bytes=count_bytes)
        return QueueMetrics(c.backlog, c.backlog_bytes,
                            None if c.oldest_sent_us is None else c.oldest_sent_us / 1e6)

    # -- pausing -----------------------------------------------------------

    def pause_delivery(self) -> None:
        """Stop delivering messages, in every process, until
        :meth:`resume_delivery`: pulls return an empty batch whose
        ``paused`` is True (a waiting pull waits on) and push consumers get
        no batches.  Sends are still accepted.
        Messages already delivered can still be acked and retried.  Durable
        when it returns; idempotent."""
        self._b.set_paused(True)

    def resume_delivery(self) -> None:
        """Deliver again after :meth:`pause_delivery`; wakes waiting pulls
        in every process.  Durable when it returns; idempotent."""
        self._b.set_paused(False)

    @property
    def paused(self) -> bool:
        """Whether delivery is paused (as every process sees it)."""
        return self._b.paused()

    # -- async producers ---------------------------------------------------

    async def pull_async(
        self,
        batch_size: Optional[int] = None,
        visibility_timeout: Optional[float] = None,
        *,
        wait: float = 0.0,
    ) -> MessageBatch:
        """:meth:`pull` for asyncio code: the lease runs on the broker's
        sender threads (a dead-letter move may fsync), and a ``wait`` sleeps
        there in steps of at most a second, so the event loop never blocks
        and cancelling the task ends the wait soon."""
        _check_wait(wait)
        loop = asyncio.get_running_loop()
        pool = self._broker._senders()
        end = time.monotonic() + wait
        while True:
            token = self.change_token()
            batch = await loop.run_in_executor(pool, functools.partial(self.pull, batch_size, visibility_timeout))
            left = end - time.monotonic()
            if batch.messages or left <= 0:
                return batch
            await loop.run_in_executor(pool, self.wait_change, token, min(left, 1.0))

    async def send_async(
        self, body: Any, *, content_type: str = "json", delay_seconds: Optional[float] = None
    ) -> str:
        """:meth:`send` for asyncio code: the write and its fsync run on the
        broker's sender threads, so the event loop never blocks on them.
        Concurrent sends share fsyncs (group commit) as threads do."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._broker._senders(),
            functools.partial(self.send, body, content_type=content_type, delay_seconds=delay_seconds),
        )

    async def send_batch_async(
        self,
        messages: Iterable[Union[Any, MessageSendRequest]],
        *,
        content_type: str = "json",
        delay_seconds: Optional[float] = None,
    ) -> List[str]:
        """:meth:`send_batch` for asyncio code, off the event loop like
        :meth:`send_async`."""
        if not isinstance(messages, (list, tuple)):
            messages = list(messages)  # iterate here, not on another thread
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._broker._senders(),
            functools.partial(self.send_batch, messages, content_type=content_type,
                              delay_seconds=delay_seconds),
        )

    def purge(self) -> int:
        """Delete every message sent so far; returns how many were not yet done."""
        return self._b.purge()

    def _sweep(self, now: int) -> None:
        """Producers' share of upkeep, at most every 10 seconds: when the
        oldest stored message is past retention, expire what is due."""
        self._next_sweep = now + 10_000_000
        ret = self._settings.message_retention
        if ret is None:
            return
        oldest = self._b.oldest_sent_us()
        if oldest is None or oldest + int(ret * 1_000_000) > now:
            return
        self.expire()

    def expire(self) -> int:
        """Drop messages older than ``message_retention`` that wait at the
        front of the queue (pulls do this as they go); returns how many.
        Runs by itself from ``send`` at most every 10 seconds."""
        ret = self.settings.message_retention
        if ret is None:
            return 0
        return self._b.expire(int(ret * 1_000_000), self._now_us())

    # -- lifetime --------------------------------------------------------

    def close(self) -> None:
        """Checkpoint the state when no other process is busy with it, then
        close the logs.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._direct = None  # sends now reach append_one, which says the queue is closed
        self._gen = (self._gen_seen,)  # the backend's counter goes with it
        try:
            self._b.close()
        finally:
            self._broker._forget(self)

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Queue({self.name!r})"


class Broker:
    """A directory of named queues.  Open with :func:`qlog.open`."""

    checkpoint_every = 20_000
    """Journal records between checkpoints (a checkpoint also happens at close)."""

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        *,
        durability: str = "sync",
        clock: Optional[Callable[[], float]] = None,
        mode: int = DEFAULT_FILE_MODE,
        engine: Optional[str] = None,
    ) -> None:
        check_mode(mode, errors.SettingsError)
        if durability is None:
            raise errors.SettingsError(
                "durability passed to qlog.open() must be one of 'interval', 'none', 'sync', got None"
            )
        validate({"durability": durability}, "passed to qlog.open()")
        self.durability = durability
        self.mode = mode
        target = os.fspath(path)
        self._store: Store
        if is_target(target):
            if engine is not None:
                raise errors.SettingsError(
                    f"engine {engine!r} is for a data directory; a database URL has no log engine")
            from ._pg.backend import PgStore

            store = PgStore(target, clock)
            self._store, self._clock = store, store.clock
            self._file_settings: Dict[str, Any] = {}
        else:
            from ._local.backend import LocalStore

            self._clock = clock or time.time
            self._file_settings = load_toml(target)
            self._store = LocalStore(target, mode, engine, lambda: self.checkpoint_every)
        self.path = self._store.location
        """Where the queues are: the data directory, or the database URL
        with any password replaced by ``***``."""
        self._queues: Dict[str, Queue] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._push: Any = None  # the consumer registry (qlog._consumer), made on first use
        self._sender_pool: Optional[ThreadPoolExecutor] = None

    # -- push consumers --------------------------------------------------

    @property
    def engine(self) -> str:
        """The engine that holds this broker's queues: ``"c"`` or ``"pure"``."""
        return self._store.engine

    @property
    def clock(self) -> Callable[[], float]:
        """The clock every timestamp, delay and lease of this broker uses:
        seconds since the epoch (``qlog.open``'s ``clock``, default
        :func:`time.time`)."""
        return self._clock

    @property
    def consumers(self) -> Tuple[str, ...]:
        """The queues that have a push consumer registered in this broker,
        in the order they were registered (what :meth:`run` would start)."""
        return () if self._push is None else self._push.queues()

    def _consumer_registry(self) -> Any:
        with self._lock:
            if self._push is None:
                from ._consumer import Registry

                self._push = Registry()
            return self._push

    def consumer(self, queue: str, **settings: Unpack[Settings]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function as ``queue``'s push consumer.

        It is called with a :class:`MessageBatch` (a plain or an ``async``
        function) by :meth:`run` or ``qlog worker``.  ``settings`` are queue
        settings (``max_batch_size``, ``max_batch_timeout``, ``max_retries``,
        ``dead_letter_queue``, ``retry_delay``, ``max_concurrency``,
        ``visibility_timeout``...), checked now and stored with the queue
        when the consumer starts (only the keys given); the others are the
        queue's.  Returning acks every message not retried on its own;
        raising retries every message not acked on its own.  The function
        is returned unchanged."""
        reg: Callable[[Callable[..., Any]], Callable[..., Any]] = self._consumer_registry().register(queue, settings)
        return reg

    def run(self, *, shutdown_timeout: float = 30.0, handle_signals: Optional[bool] = None) -> bool:
        """Run every registered consumer until :meth:`stop`, SIGTERM or
        SIGINT (handled when called from the main thread; a second signal
        exits the process at once).  Stopping takes no new batches and waits
        up to ``shutdown_timeout`` seconds for running handlers; messages
        left unfinished are delivered again when their leases run out.
        Returns True when every handler finished."""
        ok: bool = self._consumer_registry().run(self, shutdown_timeout, handle_signals)
        return ok

    async def run_async(self, *, shutdown_timeout: float = 30.0) -> bool:
        """:meth:`run` for asyncio applications: ``await broker.run_async()``
        runs every registered consumer on the running event loop (async
        handlers are tasks on it; plain functions run on their threads) until
        :meth:`stop`, or until the awaiting task is cancelled (which stops
        the consumers the same way, then re-raises).  No signal handlers are
        installed: the application owns them.  Returns True when every
        handler finished within ``shutdown_timeout``."""
        ok: bool = await self._consumer_registry().run_async(self, shutdown_timeout)
        return ok

    def stop(self) -> None:
        """Make :meth:`run` stop taking batches and return (thread-safe)."""
        if self._push is not None:
            self._push.stop()

    def _senders(self) -> ThreadPoolExecutor:
        """Threads that run async sends (their fsyncs are shared)."""
        with self._lock:
            self._check_open()
            if self._sender_pool is None:
                self._sender_pool = ThreadPoolExecutor(32, thread_name_prefix="qlog-send")
            return self._sender_pool

    def _check_open(self) -> None:
        if self._closed:
            raise errors.LogClosedError(f"broker {self.path!r} is closed")

    # -- queues --------------------------------------------------------------

    def queue(self, name: str, **settings: Unpack[Settings]) -> Queue:
        """The queue called ``name``, created if missing.  Keyword
        arguments are settings (see :class:`QueueSettings`): ``durability``,
        ``allow_pickle`` and ``segment_bytes`` apply to this handle; every
        other key given is stored with the queue (the others stay as they
        are), so every process obeys it."""
        check_name(name)
        values = validate(settings, "passed to queue()")
        if values.get("dead_letter_queue") == name:
            raise errors.SettingsError(f"queue {name!r} cannot be its own dead_letter_queue")
        handle = {k: v for k, v in values.items() if k in HANDLE_KEYS}
        stored = {k: v for k, v in values.items() if k not in HANDLE_KEYS}
        with self._lock:
            self._check_open()
            q = self._queues.get(name)
            if q is None:
                from_file = toml_settings(self._file_settings, name)
                if from_file.get("dead_letter_queue") == name:
                    raise errors.SettingsError(
                        f"queue {name!r} cannot be its own dead_letter_queue (qlog.toml in {self.path})")
                self._store.create_queue(name)
                file_handle = {k: v for k, v in from_file.items() if k in HANDLE_KEYS}
                q = Queue(self, name, {**file_handle, **handle})
                self._queues[name] = q
            elif handle:
                durability = handle.get("durability") or self.durability
                segment_bytes = handle.get("segment_bytes", q.settings.segment_bytes)
                if durability != q.durability or segment_bytes != q.settings.segment_bytes:
                    raise errors.SettingsError(
                        f"queue {name!r} is already open with durability {q.durability!r} and "
                        f"segment_bytes {q.settings.segment_bytes}; close it to change them"
                    )
                q._handle = {**q._handle, **handle}
                q._refresh()
        if stored:
            self._store_settings(q, stored)
        return q

    def _store_settings(self, q: Queue, changes: Dict[str, Any]) -> None:
        """Store the keys of ``changes`` that differ from the queue's."""
        current = q.settings
        diff = {k: v for k, v in changes.items() if getattr(current, k) != v}
        if diff:
            q._b.store_settings(diff)
            q._refresh()

    def configure(self, name: str, **settings: Unpack[StoredSettings]) -> QueueSettings:
        """Change settings stored with the existing queue ``name`` (only the
        keys given), for every process; returns the queue's settings now.
        ``durability``, ``allow_pickle`` and ``segment_bytes`` are not
        stored (they belong to each handle)."""
        values = validate(settings, "passed to configure()")
        local = sorted(set(values) & HANDLE_KEYS)
        if local:
            raise errors.SettingsError(
                f"{', '.join(local)} belong to each handle, not to the queue: pass them to "
                "broker.queue() instead"
            )
        if values.get("dead_letter_queue") == name:
            raise errors.SettingsError(f"queue {name!r} cannot be its own dead_letter_queue")
        q = self._existing(name)
        self._store_settings(q, values)
        return q.settings

    def _existing(self, name: str) -> Queue:
        check_name(name)
        with self._lock:
            self._check_open()
            q = self._queues.get(name)
            if q is None and not self._store.exists(name):
                raise errors.QueueNotFoundError(
                    f"queue {name!r} does not exist in {self.path}; existing queues: "
                    f"{', '.join(self.queues()) or 'none'}"
                )
        return q if q is not None else self.queue(name)

    def create_queue(self, name: str, **settings: Unpack[Settings]) -> Queue:
        """Create the queue ``name``, with ``settings`` stored with it;
        :class:`~qlog.errors.QueueExistsError` if it exists already."""
        check_name(name)
        validate(settings, "passed to create_queue()")
        with self._lock:
            self._check_open()
            if name in self._queues or self._store.exists(name):
                raise errors.QueueExistsError(f"queue {name!r} already exists in {self.path}")
            return self.queue(name, **settings)

    def delete_queue(self, name: str, *, force: bool = False) -> None:
        """Delete the queue ``name`` and every message in it.  Refuses
        (:class:`~qlog.errors.QueueNotEmptyError`) while it holds messages
        not done, unless ``force``.  Processes that still have it open must
        not use it any more: their sends would be lost."""
        q = self._existing(name)
        if not force:
            backlog = q.stats().backlog
            if backlog:
                raise errors.QueueNotEmptyError(
                    f"queue {name!r} holds {plural(backlog, 'message')} not done; purge it first, or "
                    "delete with force=True (qlog queues delete --force)"
                )
        q.close()
        self._store.delete_queue(name)

    def queues(self) -> List[str]:
        """Names of every queue in the directory, sorted."""
        return self._store.queue_names()

    def redrive(self, dlq: str, to: Optional[str] = None, *, create: bool = False,
                limit: Optional[int] = None,
                progress: Optional[Callable[[int], None]] = None) -> Dict[str, int]:
        """Move the messages of dead-letter queue ``dlq`` back into ``to``,
        or each into the queue it failed in; returns how many went where.

        Batch by batch: lease up to 100 messages of the DLQ, send their
        stored bytes to their targets (one atomic write per target, bodies
        not decoded, so pickles stay inert), then ack the batch.  A crash
        between the send and the ack leaves the batch in both queues (a
        duplicate, delivered again from the DLQ when its lease runs out),
        never in neither.  The moved messages get new ids and start at
        attempt 1.  A target that does not exist is refused
        (:class:`~qlog.errors.QueueNotFoundError`) unless ``create``; a
        message sent to the DLQ directly (it failed nowhere) without ``to``
        is refused before anything moves."""
        if to is not None:
            check_name(to, "queue name given as the redrive target")
            if to == dlq:
                raise errors.SettingsError(f"the redrive target {to!r} is the dead-letter queue itself")
        src = self._existing(dlq)
        if src.paused:
            raise errors.QlogError(f"queue {dlq!r} is paused, so nothing can be taken from it: "
                                   "resume it first")
        probe = src.peek(MAX_PULL_BATCH)
        if to is None:
            for m in probe:
                if m.dead_letter is None:
                    raise errors.QlogError(
                        f"message {m.id} of {dlq!r} was not dead-lettered (it has no queue it failed "
                        "in): name the queue to move the messages to; nothing was moved")
        targets = {to} if to is not None else {m.dead_letter.queue for m in probe if m.dead_letter}
        if not create:
            for t in sorted(targets):
                if t not in self._queues and not self._store.exists(t):
                    raise errors.QueueNotFoundError(
                        f"queue {t!r} does not exist in {self.path}: create it first, or pass "
                        "create=True (qlog dlq redrive --create); nothing was moved")
        moved: Dict[str, int] = {}
        left = limit
        while left is None or left > 0:
            n = 100 if left is None else min(100, left)
            batch = src.pull(n, visibility_timeout=300.0)
            if not batch.messages:
                break
            groups: Dict[str, List[Tuple[int, bytes]]] = {}
            for m in batch.messages:
                dest = to
                if dest is None and m.dead_letter is not None and m.dead_letter.queue != dlq:
                    dest = m.dead_letter.queue
                if dest is None:
                    raise errors.QlogError(
                        f"message {m.id} of {dlq!r} has no queue it failed in: name the queue "
                        f"to move it to; {_moved(sum(moved.values()))} moved before it")
                if not create and dest not in self._queues and not self._store.exists(dest):
                    raise errors.QueueNotFoundError(
                        f"queue {dest!r} (where message {m.id} failed) does not exist in "
                        f"{self.path}: pass create=True; {_moved(sum(moved.values()))} moved")
                groups.setdefault(dest, []).append((m._parts()[0], m.raw_body))
            for dest, items in groups.items():
                self.queue(dest)._send_raw(items)
                moved[dest] = moved.get(dest, 0) + len(items)
            batch.ack_all()
            if left is not None:
                left -= len(batch.messages)
            if progress is not None:
                progress(sum(moved.values()))
        return moved

    def redrive_messages(self, dlq: str, refs: Iterable[str]) -> Dict[str, int]:
        """Move the messages ``refs`` (their :attr:`Message.ref`) of
        dead-letter queue ``dlq`` each back to the queue it failed in, as
        :meth:`redrive` does: stored bytes sent undecoded, then deleted from
        ``dlq`` (a crash between leaves a duplicate, never a loss).  Only
        refs among the oldest 1,000 messages of ``dlq`` are found; returns
        how many went where.  Refused before anything moves when one of them
        was not dead-lettered from another queue or its queue is gone."""
        src = self._existing(dlq)
        wanted = set(refs)
        found = [m for m in src.peek(MAX_PULL_BATCH) if m.ref in wanted]
        groups: Dict[str, List[Message]] = {}
        for m in found:
            dl = m.dead_letter
            if dl is None or dl.queue == dlq:
                raise errors.QlogError(f"message {m.id} was not dead-lettered from another queue, so it has "
                                       "none to go back to; nothing was moved")
            groups.setdefault(dl.queue, []).append(m)
        existing = set(self.queues())
        for origin in sorted(groups):
            if origin not in existing:
                raise errors.QueueNotFoundError(
                    f"queue {origin!r}, where {len(groups[origin])} of them failed, does not exist any "
                    "more: create it first; nothing was moved")
        moved: Dict[str, int] = {}
        stuck = 0
        for origin, ms in sorted(groups.items()):
            target = self.queue(origin)
            for i in range(0, len(ms), MAX_SEND_BATCH):
                chunk = ms[i:i + MAX_SEND_BATCH]
                target._send_raw([(m._parts()[0], m.raw_body) for m in chunk])
                stuck += len(chunk) - src.delete_messages([m.ref for m in chunk])
            moved[origin] = len(ms)
        if stuck:
            raise errors.QlogError(
                f"moved {sum(moved.values()):,}, but {plural(stuck, 'message')} could not be deleted from "
                f"{dlq} (done meanwhile): those may now be in both queues")
        return moved

    def _forget(self, q: Queue) -> None:
        with self._lock:
            if self._queues.get(q.name) is q:
                del self._queues[q.name]

    def close(self) -> None:
        """Close every queue opened through this broker.  Idempotent."""
        with self._lock:
            self._closed = True
            qs = list(self._queues.values())
            self._queues.clear()
            pool, self._sender_pool = self._sender_pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for q in qs:
            q.close()
        self._store.close()

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Broker({self.path!r})"


def open(
    path: Union[str, "os.PathLike[str]"],
    *,
    durability: str = "sync",
    clock: Optional[Callable[[], float]] = None,
    mode: int = DEFAULT_FILE_MODE,
    engine: Optional[str] = None,
) -> Broker:
    """Open (or create) a directory of queues, or the queues in a PostgreSQL
    database: ``path`` is then a ``postgresql://`` URL or a libpq
    ``key=value`` string, with ``?schema=NAME`` (default ``qlog``) for the
    schema that holds qlog's tables, created on first open (README, "On
    PostgreSQL").  Without a ``clock``, a database store runs on the
    database server's clock.

    ``durability`` is every queue's default ("sync": a send returns after
    fdatasync; "interval": after reaching the kernel, synced every 0.1 s;
    "none").  ``clock`` returns seconds since the epoch (default
    ``time.time``); tests pass their own to control delays and leases.

    ``mode`` is the permission of every file created in the directory
    (default ``0o600``, the owner only; ``0o600`` to ``0o666``, no execute
    bits); directories created get execute wherever read is set (``0o640``
    -> ``0o750``).  The umask still applies.  Directories and files that
    already exist keep their modes: pass ``mode`` when creating, or chmod
    them yourself.

    ``engine`` picks the log engine for this broker's files: ``"c"`` or
    ``"pure"`` (default: ``qlog.ENGINE``).  Both write the same bytes; one
    directory is used by one engine at a time."""
    return Broker(path, durability=durability, clock=clock, mode=mode, engine=engine)


def migrate(target: str) -> Tuple[str, Optional[int], int]:
    """Create or upgrade qlog's tables in the PostgreSQL database ``target``
    (a URL or key=value string, as :func:`open` takes); returns ``(schema,
    version before or None when there were no tables, version after)``.
    :func:`open` does the same on first use; this does only that."""
    if not is_target(target):
        raise errors.SettingsError(f"qlog.migrate takes a PostgreSQL URL, got {target!r}")
    from ._pg.conn import Connections, redact, split_target
    from ._pg.schema import migrate as _migrate

    conninfo, schema = split_target(target)
    before, after = _migrate(Connections(conninfo, redact(target)), schema)
    return schema, before, after
