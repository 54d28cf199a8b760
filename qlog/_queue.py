"""Broker and Queue: Cloudflare Queues' semantics on the log engine.

A broker is a directory; each queue is a subdirectory holding::

    messages/    the message log (one record per message, _message.py)
    state/       the state journal: leases, acks, retries (_local/state.py)
    checkpoint   the state at one journal position (so replay stays short)
    lock         flock'd while pulling, purging or checkpointing
    queue.json   the queue's id prefix and creation time
    paused       present while delivery is paused (pause_delivery())

Sending touches only the message log.  Pulling takes the queue's lock,
brings this process's replica of the state up to date with the journal,
picks the messages, and writes one journal record that leases them, so no
two consumers (threads or processes) hold one message at once.  Acks and
retries are journal records written without the lock; every replica applies
every record in journal order, so all of them agree.
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import functools
import io
import json
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NoReturn, Optional, Sequence, Tuple, Union

from . import errors
from ._log import Log, append1 as _append1, ids as _ids, scan_messages as _scan
from ._message import (
    CONTENT_TYPES,
    CT_BYTES,
    CT_JSON,
    CT_PICKLE,
    HEADER,
    VERSION,
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
    MAX_DELAY,
    MAX_PULL_BATCH,
    MAX_SEND_BATCH,
    MAX_SEND_BATCH_BYTES,
    QueueSettings,
    check_name,
    load_toml,
    resolve,
    validate,
)
from ._log.modes import DEFAULT_FILE_MODE, check_mode, makedirs
from ._local.state import ATT, DUE, LEASED, SENT, QueueState, encode, read_checkpoint, write_checkpoint

logger = logging.getLogger("qlog")

DATA_FORMAT = 1
_FORMAT_FILE = "qlog-format"
_JOURNAL_SEGMENT = 16 << 20
_SCAN_LIMIT = 10_000  # messages a pull looks past (delayed ones) before returning
_REC_HEAD = 32  # bytes of record header before each payload (FORMAT.md)
_READ_GAP = 64  # messages wanted this close together come in one read
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of a queue (``Queue.stats()``)."""

    backlog: int
    """Messages not yet done: waiting, in flight or delayed."""
    in_flight: int
    """Leased to a consumer whose visibility timeout has not run out."""
    delayed: int
    """Waiting out a retry delay or a delivery delay already seen by a consumer."""
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


def _delay_us(value: Optional[float], default: float, what: str) -> int:
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_DELAY:
        raise errors.DelayOutOfRangeError(
            f"{what} must be a number of seconds from 0 to {MAX_DELAY} (24 hours), got {value!r}"
        )
    return int(value * 1_000_000)


class Queue:
    """A named, durable queue in a :class:`Broker`'s directory.  Safe to
    share between threads; any number of processes may open it at once."""

    def __init__(self, broker: "Broker", name: str, settings: QueueSettings) -> None:
        self.name = name
        self.settings = settings
        self._broker = broker
        self._clock = broker._clock
        self._dir = os.path.join(broker.path, "queues", name)
        self._mode = broker.mode
        makedirs(self._dir, self._mode)
        # The queue's name must survive a power cut before anything in it
        # can: the engine syncs the directories it creates inside, not this
        # one's entry in queues/.
        _fsync_dir(os.path.dirname(self._dir))
        self._idpre = self._identity()
        self.durability = settings.durability or broker.durability
        self._msgs = Log(
            os.path.join(self._dir, "messages"),
            durability=self.durability,
            segment_bytes=settings.segment_bytes,
            mode=self._mode,
        )
        try:
            # Acks and leases need no fsync of their own: losing one to a
            # power cut means a redelivery, which at-least-once allows.
            self._journal = Log(
                os.path.join(self._dir, "state"),
                durability="none" if self.durability == "none" else "interval",
                segment_bytes=_JOURNAL_SEGMENT,
                mode=self._mode,
            )
        except BaseException:
            self._msgs.close()
            raise
        self._lockfd = os.open(os.path.join(self._dir, "lock"), os.O_RDWR | os.O_CREAT, self._mode)
        self._mu = threading.RLock()
        self._st: Optional[QueueState] = None
        self._ckpt_path = os.path.join(self._dir, "checkpoint")
        self._paused_path = os.path.join(self._dir, "paused")
        self._ckpt_pos = 0
        self._next_sweep = 0.0
        self._gaps: List[Tuple[int, int]] = []  # see _messages_in
        self._gaps_from = self._gaps_upto = 0
        self._closed = False

    def _identity(self) -> str:
        """The queue's id prefix, created once (atomically, whoever is first)."""
        path = os.path.join(self._dir, "queue.json")
        try:
            with io.open(path, "rb") as f:
                return json.loads(f.read())["id_prefix"]
        except FileNotFoundError:
            pass
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        doc = {"id_prefix": secrets.token_hex(8), "created": time.time(), "format": DATA_FORMAT}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self._mode)
        try:
            os.write(fd, json.dumps(doc).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process made it first
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        _fsync_dir(self._dir)
        with io.open(path, "rb") as f:
            return json.loads(f.read())["id_prefix"]

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
            if ct is None:
                content_type_code(content_type)  # raises
            if ct == CT_PICKLE and not self.settings.allow_pickle:
                self._refuse_pickle()
            data = encode_body(body, ct)
        settings = self.settings
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
        h = self._msgs._h
        if h is None:
            raise errors.LogClosedError(f"queue {self.name!r} is closed")
        seq = _append1(h, payload, len(payload))  # Log.append, minus a call
        if seq < 0:
            try:
                self._msgs._append_error(seq, len(payload))
            except errors.DiskFullError as e:
                self._disk_full(e, [payload])
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
        delay = _delay_us(delay_seconds, self.settings.delivery_delay, "delay_seconds")
        allow_pickle = self.settings.allow_pickle
        limit = self.settings.max_message_size
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
            try:
                seq = self._msgs.append_batch(bodies, prefix)
            except errors.DiskFullError as e:
                self._disk_full(e, bodies, len(prefix))
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
            try:
                seq = self._msgs.append_batch(payloads)
            except errors.DiskFullError as e:
                self._disk_full(e, payloads)
        if now > self._next_sweep:
            self._sweep(now)
        return _ids(self._idpre, seq, n)

    def _send_raw(self, items: Sequence[Tuple[int, bytes]]) -> List[str]:
        """Send stored bodies as they are: ``(content type code, body
        bytes)`` pairs, e.g. a dead-letter queue's messages moved back by
        ``qlog dlq redrive`` (no body is decoded, so pickles stay inert).
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
        try:
            seq = self._msgs.append_batch(payloads)
        except errors.DiskFullError as e:
            self._disk_full(e, payloads)
        return _ids(self._idpre, seq, len(items))

    def _disk_full(self, e: errors.DiskFullError, payloads: Sequence[bytes], extra: int = 0) -> NoReturn:
        """Raise ``e`` again, naming the queue and the space the send needed."""
        need = sum((_REC_HEAD + extra + len(p) + 7) & ~7 for p in payloads)
        what = "a message" if len(payloads) == 1 else f"a batch of {len(payloads)} messages"
        raise errors.DiskFullError(
            e.errno,
            f"no space left on device to send {what} to queue {self.name!r} "
            f"({need} bytes needed in {self._msgs.path}); nothing was sent: free space "
            "(consumed messages' segments are removed as the queue checkpoints) and send again",
        ) from None

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
        any process wakes it) or the time is up.

        A message neither acked nor retried before its lease runs out is
        delivered again with ``attempts + 1``."""
        n = self.settings.max_batch_size if batch_size is None else batch_size
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PULL_BATCH:
            raise errors.BatchTooLargeError(
                f"batch_size must be an integer from 1 to {MAX_PULL_BATCH}, got {batch_size!r}"
            )
        vt = self.settings.visibility_timeout if visibility_timeout is None else visibility_timeout
        validate({"visibility_timeout": vt}, "passed to pull()")
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 43_200:
            raise errors.SettingsError(f"wait must be from 0 to 43200 seconds, got {wait!r}")
        return MessageBatch(self, self._pull_wait(n, int(vt * 1_000_000), wait))

    def _pull_wait(
        self, n: int, vt_us: int, wait: float, stop: Optional[Callable[[], bool]] = None
    ) -> List[Message]:
        """``pull`` past its checks; ``stop()`` true ends a wait early (it is
        checked after every wake-up: poke the message log to wake it)."""
        end = time.monotonic() + wait
        while True:
            gen = self._msgs.notify_gen() if wait > 0 else 0
            if stop is not None and stop():
                return []
            got = self._pull_once(n, vt_us)
            if got or wait <= 0:
                return got
            left = end - time.monotonic()
            if left <= 0:
                return got
            self._msgs.wait_change(gen, self._due_wait(left))

    def _due_wait(self, left: float) -> float:
        """``left``, or less: until the next retry or lease comes due."""
        with self._mu:
            next_due = self._state().next_due()
        if next_due is not None:
            left = min(left, max(0.0, (next_due - self._now_us()) / 1e6) + 0.001)
        return left

    def _pull_once(self, n: int, vt_us: int) -> List[Message]:
        if os.path.exists(self._paused_path):
            return []
        with self._mu, self._locked():
            st = self._state()
            now = self._now_us()
            s = self.settings
            ret_us = None if s.message_retention is None else int(s.message_retention * 1_000_000)
            max_att = s.max_retries + 1
            deadline = now + vt_us
            pending = st.pending
            re: List[int] = []
            re_att: List[int] = []
            exp: List[int] = []
            dead: List[int] = []
            dead_att: List[int] = []
            cands: List[int] = []
            seen: set = set()
            while len(re) < n:
                # Expired or dead-lettered candidates take no room in the batch.
                more = st.due_candidates(now, n - len(re), seen)
                if not more:
                    break
                cands += more
                for sq in more:
                    e = pending[sq]
                    if ret_us is not None and e[SENT] + ret_us <= now:
                        exp.append(sq)
                    elif e[ATT] >= max_att:
                        dead.append(sq)
                        dead_att.append(e[ATT])
                    else:
                        re.append(sq)
                        re_att.append(e[ATT] + 1)
            for sq, e in st.dying.items():  # claimed by a process that died before moving them
                dead.append(sq)
                dead_att.append(e[ATT])
            new: List[int] = []
            new_sent: List[int] = []
            new_msgs: List[Message] = []
            dfr: List[int] = []
            dfr_due: List[int] = []
            dfr_sent: List[int] = []
            frm = cur = st.cursor
            need = n - len(re)
            scanned = 0
            ret = -1 if ret_us is None else ret_us

            def sort_read(data, seqs, offs, k, below=None):  # type: ignore[no-untyped-def]
                if below is not None:  # only the records numbered below `below`
                    k = bisect.bisect_left(memoryview(seqs).cast("B").cast("Q"), below, 0, k)
                    if k == 0:
                        return None
                last = int.from_bytes(seqs[8 * (k - 1):8 * k], "little")
                return _scan(data, seqs, offs, k, now, ret, Message, self), last, k

            # Messages whose fate a damaged journal hid (_local/state.py, "Replay")
            # come first, as if never delivered; the record names the
            # ranges read, so that every replica takes them out.
            acc = [new, new_sent, new_msgs, dfr, dfr_due, dfr_sent, exp]
            uk_read: List[int] = []
            try:
                for lo, hi in list(st.unknown) if need > 0 else ():
                    pos, need, scanned = self._scan_into(lo, hi, need, scanned, sort_read, acc)
                    if pos > lo:
                        uk_read += (lo, pos)
                    if need <= 0 or scanned >= _SCAN_LIMIT:
                        break
                cur, need, scanned = self._scan_into(cur, None, need, scanned, sort_read, acc)
                new, new_sent, new_msgs, dfr, dfr_due, dfr_sent, exp = acc
                re_pl = self._payloads(re)
                to_dlq = 0
                if dead:
                    to_dlq, dead, dead_att = self._dead_letter(dead, dead_att, now)
                if not (new or re or dfr or exp or dead or uk_read) and cur == frm:
                    return []
                arrays = [new, new_sent, re, re_att, dfr, dfr_due, dfr_sent, exp, dead]
                rec = encode(b"P", (deadline, frm, cur, to_dlq, now),
                             arrays + [uk_read] if uk_read else arrays)
                js = self._journal_append(rec, "a pull")
            except BaseException:
                st.requeue(cands)
                raise
            if js == st.applied:
                st.apply_pull(deadline, frm, cur, to_dlq, new, new_sent, re, re_att,
                              dfr, dfr_due, dfr_sent, exp, dead, now, uk_read)
                st.applied = js + 1
                got_re = re
            else:
                # Others' acks or retries landed in between: replay them in
                # order, then deliver only the leases that took effect.
                self._catch_up()
                st = self._st  # type: ignore[assignment]
                pending = st.pending
                new_msgs = [m for m in new_msgs if _holds(pending.get(m._seq), 1, deadline)]
                got_re = []
                kept_pl = []
                for q, a, p in zip(re, re_att, re_pl):
                    if _holds(pending.get(q), a, deadline):
                        got_re.append(q)
                        kept_pl.append(p)
                re_pl = kept_pl
            out: List[Message] = []
            lost = []
            for q, p in zip(got_re, re_pl):
                if p is None:
                    lost.append(q)
                else:
                    out.append(Message(self, q, pending[q][ATT], p))
            out.extend(new_msgs)
            if lost:
                logger.warning("queue %r: messages %s are missing from the message log "
                               "(damaged or deleted); dropping them", self.name, lost)
                self._ack(lost)
            if st.applied - self._ckpt_pos >= self._broker.checkpoint_every:
                self._checkpoint_locked()
            return out

    def _scan_into(self, pos: int, hi: Optional[int], need: int, scanned: int,
                   sort_read: Callable[..., Any], acc: List[list]) -> Tuple[int, int, int]:
        """Read the message log from ``pos`` (below ``hi`` when given), sorting
        what it holds into ``acc`` (new seqs, their sent times, their
        messages, deferred seqs, due and sent times, expired seqs: each an
        empty list is replaced, a list with items extended), until ``need``
        new messages are found or ``_SCAN_LIMIT`` records were scanned.
        Returns ``(where to read on, need, scanned)``; one read per batch
        of records."""
        unpack = sort_read if hi is None else functools.partial(sort_read, below=hi)
        read = self._msgs.read
        while need > 0 and scanned < _SCAN_LIMIT and (hi is None or pos < hi):
            got = read(pos, max_records=need, unpack=unpack)
            if not got:
                return (pos if hi is None else hi), need, scanned
            (a, b, c, d, e2, f, x), last, k = got
            if acc[0]:
                acc[0] += a
                acc[1] += b
                acc[2] += c
            else:
                acc[0], acc[1], acc[2] = a, b, c
            if d:
                acc[3] += d
                acc[4] += e2
                acc[5] += f
            if x:
                acc[6] += x
            need -= len(a)
            scanned += k
            pos = last + 1
        return pos, need, scanned

    def _payloads(self, seqs: Sequence[int]) -> List[Optional[bytes]]:
        """The stored records of messages ``seqs`` (None for one that is
        gone), in that order: one read per run of nearby numbers, not one
        per message."""
        found: Dict[int, bytes] = {}
        want = sorted(set(seqs))
        i = 0
        while i < len(want):
            j = i
            while j + 1 < len(want) and want[j + 1] - want[j] <= _READ_GAP and want[j + 1] - want[i] < 1000:
                j += 1
            for sq, p in self._msgs.read(want[i], max_records=want[j] - want[i] + 1):
                found[sq] = p
            i = j + 1
        return [found.get(sq) for sq in seqs]

    def peek(self, n: int = 10) -> List[Message]:
        """Up to ``n`` messages not yet done, oldest first, without leasing
        or changing them.  Their ``attempts`` is the deliveries so far; they
        cannot be acked or retried."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PULL_BATCH:
            raise errors.BatchTooLargeError(f"peek takes 1 to {MAX_PULL_BATCH} messages, got {n!r}")
        with self._mu:
            st = self._state()
            # The oldest n of the entries and of the unknown ranges'
            # messages (these as never delivered).
            first = [(sq, st.pending[sq][ATT]) for sq in sorted(st.pending)[:n]]
            hidden: List[Tuple[int, int]] = []
            for lo, hi in st.unknown:
                if len(hidden) >= n:
                    break
                recs = self._msgs.read(lo, max_records=n - len(hidden))
                hidden += [(sq, 0) for sq, _p in recs if sq < hi]
            first = sorted(first + hidden)[:n]
            out: List[Message] = []
            for (sq, att), p in zip(first, self._payloads([sq for sq, _ in first])):
                if p is not None:
                    out.append(Message(self, sq, att, p, True))
            cur = st.cursor
            while len(out) < n:
                recs = self._msgs.read(cur, max_records=n - len(out))
                if not recs:
                    break
                out.extend(Message(self, sq, 0, p, True) for sq, p in recs)
                cur = recs[-1][0] + 1
            return out

    def _messages_in(self, lo: int, hi: int) -> int:
        """How many messages the message log holds numbered ``lo`` to
        ``hi - 1``: numbers skipped after a reboot, or records lost to
        damage, are no messages.  Gaps never close, so each process looks
        for them once per number: what it has read is kept in
        ``self._gaps`` (the gaps found in ``_gaps_from .. _gaps_upto - 1``).
        Numbers past the last record (appends not yet visible, or numbers
        skipped after a reboot) are not counted, and are read again next
        time."""
        if hi <= lo:
            return 0
        if not self._gaps_from <= lo <= self._gaps_upto:
            self._gaps, self._gaps_from, self._gaps_upto = [], lo, lo  # a new stretch
        pos = self._gaps_upto
        while pos < hi:
            recs = self._msgs.read(pos, max_records=65536, unpack=_seq_run)
            if not recs:
                break
            first, last, k, holes = recs
            if first > pos:
                self._gaps.append((pos, first))
            self._gaps.extend(holes)
            pos = last + 1
        self._gaps_upto = max(self._gaps_upto, pos)
        skipped = sum(max(0, min(b, hi) - max(a, lo)) for a, b in self._gaps)
        return max(0, min(hi, self._gaps_upto) - lo - skipped)

    def stats(self) -> QueueStats:
        """Counts of the queue's messages as every process sees them."""
        with self._mu:
            st = self._state()
            now = self._now_us()
            in_flight = delayed = 0
            oldest = None
            for e in st.pending.values():
                if e[DUE] > now:
                    if e[LEASED]:
                        in_flight += 1
                    else:
                        delayed += 1
                if oldest is None or e[SENT] < oldest:
                    oldest = e[SENT]
            waiting = 0
            for lo, hi in [*st.unknown, (st.cursor, self._msgs.next_seq)]:
                k = self._messages_in(lo, hi)
                if k:
                    recs = self._msgs.read(lo, max_records=1)
                    if not recs or recs[0][0] >= hi:
                        continue
                    sent = _unpack_header(recs[0][1])[4]
                    if oldest is None or sent < oldest:
                        oldest = sent
                    waiting += k
            return QueueStats(
                backlog=len(st.pending) + len(st.dying) + waiting,
                in_flight=in_flight,
                delayed=delayed,
                acked=st.acked,
                dead_lettered=st.dead_lettered,
                deleted=st.deleted,
                expired=st.expired,
                purged=st.purged,
                oldest_age=None if oldest is None else max(0.0, (now - oldest) / 1e6),
                paused=self.paused,
            )

    # -- pausing -----------------------------------------------------------

    def pause_delivery(self) -> None:
        """Stop delivering messages, in every process, until
        :meth:`resume_delivery`: pulls return nothing (a waiting pull waits
        on) and push consumers get no batches.  Sends are still accepted.
        Messages already delivered can still be acked and retried.  Durable
        when it returns; idempotent."""
        if self._closed:
            raise errors.LogClosedError(f"queue {self.name!r} is closed")
        fd = os.open(self._paused_path, os.O_WRONLY | os.O_CREAT, self._mode)
        os.close(fd)
        _fsync_dir(self._dir)

    def resume_delivery(self) -> None:
        """Deliver again after :meth:`pause_delivery`; wakes waiting pulls
        in every process.  Durable when it returns; idempotent."""
        if self._closed:
            raise errors.LogClosedError(f"queue {self.name!r} is closed")
        try:
            os.unlink(self._paused_path)
        except FileNotFoundError:
            return
        _fsync_dir(self._dir)
        self._msgs.poke()

    @property
    def paused(self) -> bool:
        """Whether delivery is paused (as every process sees it)."""
        return os.path.exists(self._paused_path)

    # -- async producers ---------------------------------------------------

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
        with self._mu, self._locked():
            st = self._state()
            upto = self._msgs.next_seq
            before = st.purged
            # Messages, not numbers (a reboot skips numbers): every replica
            # counts what the record says.
            waiting = sum(self._messages_in(lo, min(hi, upto))
                          for lo, hi in [*st.unknown, (st.cursor, upto)])
            js = self._journal.append(encode(b"X", (upto, waiting), []))
            self._apply_own(js, lambda s: s.apply_purge(upto, waiting))
            n = self._st.purged - before  # type: ignore[union-attr]
            self._checkpoint_locked()
            return n

    # -- acks and retries (called by Message and MessageBatch) -----------

    def _journal_append(self, rec: bytes, what: str) -> int:
        """Append ``rec`` to the state journal; a full disk is reported
        naming the queue, what was refused and the space it needed."""
        try:
            return self._journal.append(rec)
        except errors.DiskFullError as e:
            raise errors.DiskFullError(
                e.errno,
                f"no space left on device to record {what} in the state journal of queue "
                f"{self.name!r} ({(_REC_HEAD + len(rec) + 7) & ~7} bytes needed in "
                f"{self._journal.path}); nothing was recorded: try again once space is freed",
            ) from None

    def _ack(self, seqs: List[int]) -> None:
        rec = encode(b"A", (), [seqs])
        with self._mu:
            self._state()
            js = self._journal_append(rec, f"an ack of {len(seqs)} message(s)")
            self._apply_own(js, lambda s: s.apply_ack(seqs))

    def _extend(self, messages: List[Message], deadline_us: int) -> None:
        """Extend the leases of delivered messages still open to
        ``deadline_us`` (a push consumer's handler is still at work on
        them).  A lease that has already passed to another delivery is left
        alone."""
        todo = [m for m in messages if not m._outcome]
        if not todo:
            return
        seqs = [m._seq for m in todo]
        atts = [m.attempts for m in todo]
        rec = encode(b"E", (deadline_us,), [seqs, atts])
        with self._mu:
            self._state()
            js = self._journal.append(rec)
            self._apply_own(js, lambda s: s.apply_extend(deadline_us, seqs, atts))

    def _retry_delay_us(self, delay_seconds: Optional[float]) -> int:
        return _delay_us(delay_seconds, self.settings.retry_delay, "delay_seconds")

    def _retry(self, messages: List[Message], delay_us: int) -> None:
        max_att = self.settings.max_retries + 1
        final = [m for m in messages if m.attempts >= max_att]
        normal = [m for m in messages if m.attempts < max_att]
        now = self._now_us()
        with self._mu:
            self._state()
            if normal:
                seqs = [m._seq for m in normal]
                atts = [m.attempts for m in normal]
                dues = [now + delay_us] * len(normal)
                js = self._journal_append(encode(b"R", (), [seqs, atts, dues]),
                                          f"a retry of {len(seqs)} message(s)")
                self._apply_own(js, lambda s: s.apply_retry(seqs, atts, dues))
            if final:
                # Under the lock, so that a pull finding the same lease run
                # out cannot dead-letter the message a second time; and only
                # deliveries still current (not acked or redelivered since).
                with self._locked():
                    st = self._state()
                    live = [m for m in final
                            if _holds_lease(st.pending.get(m._seq), m.attempts)]
                    if live:
                        to_dlq, seqs, atts = self._dead_letter(
                            [m._seq for m in live], [m.attempts for m in live], now,
                            [m._payload for m in live])
                    if live and seqs:
                        js = self._journal.append(encode(b"D", (to_dlq,), [seqs, atts]))
                        self._apply_own(js, lambda s: s.apply_dead(to_dlq, seqs, atts))
        self._msgs.poke()  # a waiting pull recomputes what is due

    def _dead_letter(
        self, seqs: List[int], atts: List[int], now: int, payloads: Optional[List[bytes]] = None
    ) -> Tuple[int, List[int], List[int]]:
        """Move failed messages (``seqs`` at deliveries ``atts``) towards the
        dead-letter queue; called with the queue's lock held.  Returns
        ``(1 when a DLQ takes them, 0 when they are simply deleted, the
        seqs and deliveries the caller's record must name as dead)``.

        With a DLQ they are claimed first (a K record): from then on no ack,
        retry or extension touches them, so a late ack landing before the
        caller's record cannot leave in the DLQ a copy of a message counted
        acked.  Only those claimed (an ack may have come first: it wins)
        are then copied into the DLQ, durably, before the caller's record
        says they left; a crash in between leaves them claimed, and the
        next pull copies them again (a duplicate with the same id in the
        DLQ, never a loss)."""
        name = self.settings.dead_letter_queue
        if not name:
            return 0, seqs, atts
        st = self._st
        assert st is not None
        fresh = [i for i, s in enumerate(seqs) if s not in st.dying]
        if fresh:
            ks, ka = [seqs[i] for i in fresh], [atts[i] for i in fresh]
            js = self._journal_append(encode(b"K", (), [ks, ka]),
                                      f"a dead-lettering of {len(ks)} message(s)")
            self._apply_own(js, lambda s_: s_.apply_claim(ks, ka))
            st = self._st
            assert st is not None
        dying = st.dying
        keep = [i for i, s in enumerate(seqs) if s in dying and dying[s][ATT] == atts[i]]
        seqs = [seqs[i] for i in keep]
        atts = [atts[i] for i in keep]
        payloads = self._payloads(seqs) if payloads is None else [payloads[i] for i in keep]
        dlq = self._broker.queue(name)
        out = []
        for s, a, p in zip(seqs, atts, payloads):
            if p is None:
                continue
            meta = split(p)[4]
            mid = meta["id"] if meta is not None else f"{self._idpre}{s:016x}"
            out.append(dead_letter_payload(p, mid, self.name, a, now))
        if out:
            dlq._msgs.append_batch(out)
            dlq._msgs.sync()
        return 1, seqs, atts

    # -- state replica ---------------------------------------------------

    def _state(self) -> QueueState:
        """This process's replica, brought up to date with the journal."""
        if self._closed:
            raise errors.LogClosedError(f"queue {self.name!r} is closed")
        if self._st is None:
            try:
                st = read_checkpoint(self._ckpt_path)
            except errors.QlogError as e:
                raise type(e)(f"{self._ckpt_path}: {e}") from None
            self._st = st if st is not None else QueueState()
            self._ckpt_pos = self._st.applied
        self._catch_up()
        return self._st

    def _catch_up(self) -> None:
        st = self._st
        assert st is not None
        j = self._journal
        if j.next_seq == st.applied:
            return  # nothing new: no read needed
        while True:
            recs = j.read(st.applied, max_records=4096)
            if not recs:
                return
            if recs[0][0] != st.applied:
                # The journal starts later: a newer checkpoint replaced the
                # records this replica had not applied (load it), numbers
                # were skipped after a reboot, or records were lost to a
                # power cut or damage.  Replay is safe past a lost record:
                # a lost pull turns what it handed out into an unknown
                # range, delivered again (_local/state.py, "Replay").
                ck = read_checkpoint(self._ckpt_path)
                if ck is not None and ck.applied > st.applied:
                    self._st = st = ck
                    self._ckpt_pos = ck.applied
                    continue
            for sq, p in recs:
                st.applied = sq
                st.apply(p)
            st.applied = recs[-1][0] + 1

    def _apply_own(self, js: int, fn: Callable[[QueueState], None]) -> None:
        st = self._st
        assert st is not None
        if js == st.applied:
            fn(st)
            st.applied = js + 1
        else:
            self._catch_up()

    def _locked(self) -> "_FileLock":
        """The queue's lock; call with self._mu held."""
        if self._closed:
            raise errors.LogClosedError(f"queue {self.name!r} is closed")
        return _FileLock(self._lockfd)

    def _checkpoint_locked(self) -> None:
        """Write the state to the checkpoint, then drop what it makes
        unneeded: journal records before it, message segments below the
        oldest message not done.  Called with the lock held."""
        st = self._st
        assert st is not None
        # Checkpoints are only written under the lock: any temporary one
        # here was left by a process killed while writing it.
        for name in os.listdir(self._dir):
            if name.startswith("checkpoint.") and name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(self._dir, name))
                except FileNotFoundError:
                    pass
        try:
            write_checkpoint(self._ckpt_path, st.snapshot(), self._mode)
        except errors.StorageError as e:
            # Upkeep, not the caller's operation: that one is done.  The
            # journal keeps every record after the previous checkpoint.
            logger.warning("queue %r: %s", self.name, e)
            return
        self._ckpt_pos = st.applied
        self._journal.truncate_before(st.applied)
        self._msgs.truncate_before(st.floor())

    def _sweep(self, now: int) -> None:
        """Producers' share of upkeep, at most every 10 seconds: when the
        oldest stored message is past retention, expire what is due."""
        self._next_sweep = now + 10_000_000
        ret = self.settings.message_retention
        if ret is None:
            return
        recs = self._msgs.read(self._msgs.first_seq, max_records=1)
        if not recs or _unpack_header(recs[0][1])[4] + int(ret * 1_000_000) > now:
            return
        self.expire()

    def expire(self) -> int:
        """Drop messages older than ``message_retention`` that wait at the
        front of the queue (pulls do this as they go); returns how many.
        Runs by itself from ``send`` at most every 10 seconds."""
        ret = self.settings.message_retention
        if ret is None:
            return 0
        with self._mu, self._locked():
            st = self._state()
            before = st.expired
            now = self._now_us()
            ret_us = int(ret * 1_000_000)
            exp = [s for s, e in st.pending.items() if e[SENT] + ret_us <= now and not (e[LEASED] and e[DUE] > now)]
            uk_read: List[int] = []  # unknown ranges read (_local/state.py, "Replay")
            for lo, hi in list(st.unknown):
                end = self._expired_run(lo, hi, ret_us, now, exp)
                if end > lo:
                    uk_read += (lo, end)
            frm = st.cursor
            cur = self._expired_run(frm, None, ret_us, now, exp)
            if exp or cur != frm or uk_read:
                arrays: List[Sequence[int]] = [[], [], [], [], [], [], [], exp, []]
                rec = encode(b"P", (0, frm, cur, 0, now), arrays + [uk_read] if uk_read else arrays)
                js = self._journal.append(rec)
                self._apply_own(js, lambda s: s.apply_pull(0, frm, cur, 0, [], [], [], [], [], [], [], exp, [],
                                                           now, uk_read))
                self._checkpoint_locked()
            return self._st.expired - before  # type: ignore[union-attr]

    def _expired_run(self, pos: int, hi: Optional[int], ret_us: int, now: int, exp: List[int]) -> int:
        """Add to ``exp`` the messages from ``pos`` on (below ``hi`` when
        given) sent ``ret_us`` or more before ``now``, up to the first that
        was not; returns where that run ends (no message lies between)."""
        while hi is None or pos < hi:
            recs = self._msgs.read(pos, max_records=1000)
            if not recs:
                return pos if hi is None else hi
            for sq, p in recs:
                if hi is not None and sq >= hi:
                    return hi
                if _unpack_header(p)[4] + ret_us > now:
                    return sq
                exp.append(sq)
                pos = sq + 1
        return pos

    # -- lifetime --------------------------------------------------------

    def close(self) -> None:
        """Checkpoint the state when no other process is busy with it, then
        close the logs.  Idempotent."""
        with self._mu:
            if self._closed:
                return
            try:
                if self._st is not None:
                    lock = _FileLock(self._lockfd, block=False)
                    if lock.acquire():
                        try:
                            self._catch_up()
                            if self._st.applied > self._ckpt_pos:
                                self._checkpoint_locked()
                        finally:
                            lock.release()
            finally:
                self._closed = True
                self._broker._forget(self)
                self._msgs.close()
                self._journal.close()
                os.close(self._lockfd)
                self._lockfd = -1

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Queue({self.name!r})"


def _seq_run(data: Any, seqs: Any, offs: Any, n: int) -> Tuple[int, int, int, List[Tuple[int, int]]]:
    """A read's ``(first seq, last seq, n, [(a, b): numbers a .. b-1 missing
    between its records])`` (an ``unpack`` for :meth:`Log.read`)."""
    sq = memoryview(seqs).cast("B").cast("Q")
    first, last = sq[0], sq[n - 1]
    holes: List[Tuple[int, int]] = []
    if last - first + 1 != n:
        holes = [(sq[i] + 1, sq[i + 1]) for i in range(n - 1) if sq[i + 1] != sq[i] + 1]
    return first, last, n, holes


def _holds_lease(e: Optional[list], attempts: int) -> bool:
    return e is not None and e[ATT] == attempts and e[LEASED]


def _holds(e: Optional[list], attempts: int, deadline: int) -> bool:
    return e is not None and e[ATT] == attempts and e[LEASED] and e[DUE] == deadline


class _FileLock:
    """flock on a queue's lock file: excludes other processes (threads are
    excluded by the queue's own mutex first)."""

    def __init__(self, fd: int, block: bool = True) -> None:
        self.fd = fd
        self.block = block

    def acquire(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.block else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def __enter__(self) -> "_FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _refuse_nfs(path: str) -> None:
    """The C engine's NFS check, made before anything is created (the
    pure-Python engine has its own, when it opens a log)."""
    try:
        from ._log.clog import refuse_nfs
    except ImportError:  # no compiled engine
        return
    refuse_nfs(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    ) -> None:
        check_mode(mode, errors.SettingsError)
        if durability is None:
            raise errors.SettingsError(
                "durability passed to qlog.open() must be one of 'interval', 'none', 'sync', got None"
            )
        validate({"durability": durability}, "passed to qlog.open()")
        self.path = os.fspath(path)
        self.durability = durability
        self._clock = clock or time.time
        self.mode = mode
        # Everything that can refuse the directory is checked before
        # anything is created in it.
        _refuse_nfs(self.path)
        self._file_settings = load_toml(self.path)
        self._check_format(create=False)
        makedirs(os.path.join(self.path, "queues"), mode)
        self._check_format()  # made after queues/: its directory fsync covers both
        self._queues: Dict[str, Queue] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._consumers: Dict[str, Any] = {}
        self._runner: Any = None
        self._sender_pool: Optional[ThreadPoolExecutor] = None

    # -- push consumers --------------------------------------------------

    def consumer(self, queue: str, **settings: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function as ``queue``'s push consumer.

        It is called with a :class:`MessageBatch` (a plain or an ``async``
        function) by :meth:`run` or ``qlog worker``.  ``settings`` are queue
        settings (``max_batch_size``, ``max_batch_timeout``, ``max_retries``,
        ``dead_letter_queue``, ``retry_delay``, ``max_concurrency``,
        ``visibility_timeout``...), checked now; the ones not given come from
        ``qlog.toml`` in the directory, then the defaults.  Returning acks
        every message not retried on its own; raising retries every message
        not acked on its own.  The function is returned unchanged."""
        from ._consumer import register

        return register(self, queue, settings)

    def run(self, *, shutdown_timeout: float = 30.0, handle_signals: Optional[bool] = None) -> bool:
        """Run every registered consumer until :meth:`stop`, SIGTERM or
        SIGINT (handled when called from the main thread; a second signal
        exits the process at once).  Stopping takes no new batches and waits
        up to ``shutdown_timeout`` seconds for running handlers; messages
        left unfinished are delivered again when their leases run out.
        Returns True when every handler finished."""
        from ._consumer import run

        return run(self, shutdown_timeout, handle_signals)

    def stop(self) -> None:
        """Make :meth:`run` stop taking batches and return (thread-safe)."""
        r = self._runner
        if r is not None:
            r.stop()

    def _senders(self) -> ThreadPoolExecutor:
        """Threads that run async sends (their fsyncs are shared)."""
        with self._lock:
            if self._closed:
                raise errors.LogClosedError(f"broker {self.path!r} is closed")
            if self._sender_pool is None:
                self._sender_pool = ThreadPoolExecutor(32, thread_name_prefix="qlog-send")
            return self._sender_pool

    def _check_format(self, create: bool = True) -> None:
        """Refuse a directory of another data format; with ``create``, mark
        a new one with this format, durably."""
        path = os.path.join(self.path, _FORMAT_FILE)
        try:
            if not create:
                raise FileExistsError(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.mode)
        except FileExistsError:
            try:
                with io.open(path, "rb") as f:
                    raw = f.read().strip()
            except FileNotFoundError:
                return  # not created yet (create=False)
            try:
                version = int(raw)
            except ValueError:
                raise errors.FormatError(
                    f"{path} does not hold a qlog data format version (got {raw[:40]!r})"
                ) from None
            if version != DATA_FORMAT:
                raise errors.FormatError(
                    f"{self.path} holds qlog data format {version}; this qlog reads format "
                    f"{DATA_FORMAT} only"
                )
            return
        try:
            os.write(fd, f"{DATA_FORMAT}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.path)

    def queue(self, name: str, **settings: Any) -> Queue:
        """The queue called ``name``, created if missing.  Settings come from
        the keyword arguments, then ``qlog.toml`` in the directory, then
        Cloudflare's defaults (see :class:`QueueSettings`)."""
        check_name(name)
        with self._lock:
            if self._closed:
                raise errors.LogClosedError(f"broker {self.path!r} is closed")
            fs = self._file_settings
            resolved = resolve(QueueSettings(), {**fs.get("*", {}), **fs.get(name, {})}, settings)
            if resolved.dead_letter_queue == name:
                raise errors.SettingsError(
                    f"queue {name!r} cannot be its own dead_letter_queue"
                )
            q = self._queues.get(name)
            if q is not None:
                if settings:
                    if (resolved.durability or self.durability) != q.durability or (
                        resolved.segment_bytes != q.settings.segment_bytes
                    ):
                        raise errors.SettingsError(
                            f"queue {name!r} is already open with durability {q.durability!r} and "
                            f"segment_bytes {q.settings.segment_bytes}; close it to change them"
                        )
                    q.settings = resolved
                return q
            q = Queue(self, name, resolved)
            self._queues[name] = q
            return q

    def _forget(self, q: Queue) -> None:
        with self._lock:
            if self._queues.get(q.name) is q:
                del self._queues[q.name]

    def queues(self) -> List[str]:
        """Names of every queue in the directory, sorted."""
        root = os.path.join(self.path, "queues")
        return sorted(
            d for d in os.listdir(root)
            if os.path.exists(os.path.join(root, d, "queue.json"))
        )

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
) -> Broker:
    """Open (or create) a directory of queues.

    ``durability`` is every queue's default ("sync": a send returns after
    fdatasync; "interval": after reaching the kernel, synced every 0.1 s;
    "none").  ``clock`` returns seconds since the epoch (default
    ``time.time``); tests pass their own to control delays and leases.

    ``mode`` is the permission of every file created in the directory
    (default ``0o600``, the owner only; ``0o600`` to ``0o666``, no execute
    bits); directories created get execute wherever read is set (``0o640``
    -> ``0o750``).  The umask still applies.  Directories and files that
    already exist keep their modes: pass ``mode`` when creating, or chmod
    them yourself."""
    return Broker(path, durability=durability, clock=clock, mode=mode)
