"""The local backend: queues in a directory, on the log engine.

A store is a directory; each queue is a subdirectory holding::

    messages/      the message log (one record per message, _message.py)
    state/         the state journal: leases, acks, retries (state.py)
    checkpoint     the state at one journal position (so replay stays short)
    lock           flock'd while pulling, purging, checkpointing or storing settings
    queue.json     the queue's id prefix and creation time
    settings.json  the settings stored with the queue (only the keys ever set)
    settings.gen   8 bytes, mapped by every process: bumped after each change
                   of settings.json, so a handle sees a change at its next call
    paused         present while delivery is paused

Sending touches only the message log.  Leasing takes the queue's lock,
brings this process's replica of the state up to date with the journal,
picks the messages, and writes one journal record that leases them, so no
two consumers (threads or processes) hold one message at once.  Acks and
retries are journal records written without the lock; every replica applies
every record in journal order, so all of them agree.
"""

from __future__ import annotations

import bisect
import fcntl
import functools
import io
import json
import logging
import mmap
import os
import secrets
import shutil
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NoReturn, Optional, Sequence, Set, Tuple

from .. import errors
from .._backend import RECORD_HEADER, Counts, LeasePolicy, QueueBackend, Store
from .._log import ENGINE, Log as _DefaultLog, append1 as _default_append1, scan_messages as _scan
from .._log.files import fsync_dir, write_durable
from .._log.modes import makedirs
from .._log.types import plural
from .state import ATT, DUE, LEASED, SENT, QueueState, encode, read_checkpoint, write_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from .._log import MessageBase

logger = logging.getLogger("qlog")

DATA_FORMAT = 1
FORMAT_FILE = "qlog-format"
_JOURNAL_SEGMENT = 16 << 20  # the most a state journal segment holds (segment_bytes, when smaller)
_SCAN_LIMIT = 10_000  # messages a pull looks past (delayed ones) before returning
_REC_HEAD = 32  # bytes of record header before each payload (FORMAT.md)
_READ_GAP = 64  # messages wanted this close together come in one read
_unpack_header = RECORD_HEADER.unpack_from


def _engine(name: Optional[str]) -> Tuple[Any, Callable[..., int]]:
    """The ``Log`` class and one-record append of engine ``name`` ("c",
    "pure", or None for the one ``qlog.ENGINE`` names)."""
    if name is None or name == ENGINE:
        return _DefaultLog, _default_append1
    if name == "pure":
        from .._log.purelog import Log as PureLog

        return PureLog, lambda h, payload, size: h.append(payload)
    if name == "c":
        raise errors.SettingsError(
            "engine 'c' was asked for, but the compiled modules are not available "
            "(qlog.ENGINE is 'pure'): reinstall qlog with a C compiler"
        )
    raise errors.SettingsError(f"engine must be 'c' or 'pure', got {name!r}")


class LocalStore(Store):
    """A directory of queues (see the module docstring)."""

    def __init__(self, path: str, mode: int, engine: Optional[str] = None,
                 checkpoint_every: Callable[[], int] = lambda: 20_000) -> None:
        self.location = self.path = path
        self.mode = mode
        self.log_class, self.append1 = _engine(engine)
        self.engine = engine or ENGINE
        self.checkpoint_every = checkpoint_every
        """Journal records between checkpoints (a checkpoint also happens at close)."""
        # Everything that can refuse the directory is checked before
        # anything is created in it.
        _refuse_nfs(path)
        self._check_format(create=False)
        makedirs(os.path.join(path, "queues"), mode)
        self._check_format()  # made after queues/: its directory fsync covers both

    def _check_format(self, create: bool = True) -> None:
        """Refuse a directory of another data format; with ``create``, mark
        a new one with this format, durably."""
        path = os.path.join(self.path, FORMAT_FILE)
        if create and not os.path.exists(path):
            write_durable(path, f"{DATA_FORMAT}\n".encode(), self.mode, exclusive=True)
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

    def _qdir(self, name: str) -> str:
        return os.path.join(self.path, "queues", name)

    def queue_names(self) -> List[str]:
        root = os.path.join(self.path, "queues")
        return sorted(
            d for d in os.listdir(root)
            if os.path.exists(os.path.join(root, d, "queue.json"))
        )

    def exists(self, name: str) -> bool:
        return os.path.exists(os.path.join(self._qdir(name), "queue.json"))

    def create_queue(self, name: str) -> bool:
        if self.exists(name):
            return False  # nothing to write (a full disk must not stop opening a queue)
        d = self._qdir(name)
        makedirs(d, self.mode)
        # The queue's name must survive a power cut before anything in it
        # can: the engine syncs the directories it creates inside, not this
        # one's entry in queues/.
        fsync_dir(os.path.dirname(d))
        doc = {"id_prefix": secrets.token_hex(8), "created": time.time(), "format": DATA_FORMAT}
        return write_durable(os.path.join(d, "queue.json"), json.dumps(doc).encode(), self.mode,
                             exclusive=True)

    def delete_queue(self, name: str) -> None:
        """Rename the queue's directory out of ``queues/`` (atomic: other
        processes stop finding it at once), make that durable, then remove
        the files."""
        d = self._qdir(name)
        gone = os.path.join(self.path, "queues", f".deleted-{name}-{secrets.token_hex(4)}")
        os.rename(d, gone)
        fsync_dir(os.path.dirname(d))
        shutil.rmtree(gone, ignore_errors=True)

    def open_queue(self, name: str, owner: Any, message_class: type[MessageBase],
                   durability: str, segment_bytes: int) -> "LocalQueue":
        return LocalQueue(self, name, owner, message_class, durability, segment_bytes)

    def close(self) -> None:
        pass


class LocalQueue(QueueBackend):
    """One queue of a :class:`LocalStore` (see the module docstring)."""

    def __init__(self, store: LocalStore, name: str, owner: Any, message_class: type[MessageBase],
                 durability: str, segment_bytes: int) -> None:
        self.name = name
        self._owner = owner
        self._cls = message_class
        self._dir = d = store._qdir(name)
        self._mode = mode = store.mode
        self.id_prefix = self._identity()
        Log = store.log_class
        self._append1 = store.append1
        self._msgs = Log(os.path.join(d, "messages"), durability=durability,
                         segment_bytes=segment_bytes, mode=mode)
        try:
            # Acks and leases need no fsync of their own: losing one to a
            # power cut means a redelivery, which at-least-once allows.
            self._journal = Log(
                os.path.join(d, "state"),
                durability="none" if durability == "none" else "interval",
                segment_bytes=min(segment_bytes, _JOURNAL_SEGMENT),
                mode=mode,
            )
        except BaseException:
            self._msgs.close()
            raise
        self._lockfd = os.open(os.path.join(d, "lock"), os.O_RDWR | os.O_CREAT, mode)
        self._mu = threading.RLock()
        self._st: Optional[QueueState] = None
        self._ckpt_path = os.path.join(d, "checkpoint")
        self._paused_path = os.path.join(d, "paused")
        self._settings_path = os.path.join(d, "settings.json")
        self._gen_map, self._gen = self._map_settings_gen()  # see settings_counter
        self._ckpt_pos = 0
        self._gaps: List[Tuple[int, int]] = []  # see _messages_in
        self._gaps_from = self._gaps_upto = 0
        self._checkpoint_every = store.checkpoint_every
        self._closed = False

    def _identity(self) -> str:
        path = os.path.join(self._dir, "queue.json")
        try:
            with io.open(path, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            raise errors.QueueNotFoundError(f"queue {self.name!r} does not exist") from None
        created = doc.get("created")
        self.created_us = None if created is None else int(created * 1_000_000)
        return str(doc["id_prefix"])

    def _map_settings_gen(self) -> Tuple[mmap.mmap, memoryview]:
        fd = os.open(os.path.join(self._dir, "settings.gen"), os.O_RDWR | os.O_CREAT, self._mode)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)  # to the same size, whoever is first: harmless
            m = mmap.mmap(fd, 8)
        finally:
            os.close(fd)
        return m, memoryview(m).cast("Q")

    # -- producing -------------------------------------------------------

    def append_one(self, record: bytes) -> int:
        h = self._msgs._h
        if h is None:
            raise errors.LogClosedError(f"queue {self.name!r} is closed")
        seq: int = self._append1(h, record, len(record))
        if seq < 0:
            self.append_failed(seq, record)
        return seq

    def direct_append(self) -> Optional[Tuple[Callable[..., int], Any]]:
        h = self._msgs._h
        return None if h is None else (self._append1, h)

    def append_failed(self, code: int, record: bytes) -> int:
        try:
            self._msgs._append_error(code, len(record))
        except errors.DiskFullError as e:
            self._disk_full(e, [record])
        raise errors.StorageError(code, f"append to queue {self.name!r} failed (code {code})")

    def append(self, records: Sequence[bytes], prefix: bytes = b"") -> int:
        try:
            first: int = self._msgs.append_batch(records, prefix) if prefix else self._msgs.append_batch(records)
        except errors.DiskFullError as e:
            self._disk_full(e, records, len(prefix))
        return first

    def sync(self) -> None:
        self._msgs.sync()

    def oldest_sent_us(self) -> Optional[int]:
        """Send time of the oldest record the message log still holds."""
        recs = self._msgs.read(self._msgs.first_seq, max_records=1)
        return _unpack_header(recs[0][1])[4] if recs else None

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

    # -- consuming -------------------------------------------------------

    def lease(self, n: int, visibility_us: int, now_us: int, policy: LeasePolicy) -> List[Any]:
        if os.path.exists(self._paused_path):
            return []
        with self._mu, self._locked():
            st = self._state()
            plan = self._plan(st, n, now_us, policy)
            try:
                plan.scan_new(self, st, n - len(plan.re), now_us, policy.retention_us)
                re_pl = self._payloads(plan.re)
                if plan.dead:
                    plan.to_dlq, plan.dead, plan.dead_att = self._move_dead(
                        plan.dead, plan.dead_att, now_us, policy)
                if plan.empty(st.cursor):
                    return []
                deadline = now_us + visibility_us
                js = self._journal_append(plan.record(deadline, now_us), "a pull")
            except BaseException:
                st.requeue(plan.cands)
                raise
            return self._deliver(st, js, plan, deadline, now_us, re_pl)

    def _plan(self, st: QueueState, n: int, now: int, policy: LeasePolicy) -> "_PullPlan":
        """The redeliveries due now (expired or dead ones take no room)."""
        plan = _PullPlan(st.cursor)
        pending = st.pending
        ret_us = policy.retention_us
        max_att = policy.max_attempts
        seen: Set[int] = set()
        while len(plan.re) < n:
            more = st.due_candidates(now, n - len(plan.re), seen)
            if not more:
                break
            plan.cands += more
            for sq in more:
                e = pending[sq]
                if ret_us is not None and e[SENT] + ret_us <= now:
                    plan.exp.append(sq)
                elif e[ATT] >= max_att:
                    plan.dead.append(sq)
                    plan.dead_att.append(e[ATT])
                else:
                    plan.re.append(sq)
                    plan.re_att.append(e[ATT] + 1)
        for sq, e in st.dying.items():  # claimed by a process that died before moving them
            plan.dead.append(sq)
            plan.dead_att.append(e[ATT])
        return plan

    def _deliver(self, st: QueueState, js: int, plan: "_PullPlan", deadline: int, now: int,
                 re_pl: List[Optional[bytes]]) -> List[Any]:
        """Apply the pull record ``js`` and make the messages it leased."""
        new_msgs = plan.new_msgs
        if js == st.applied:
            plan.apply(st, deadline, now)
            st.applied = js + 1
            got_re = plan.re
        else:
            # Others' acks or retries landed in between: replay them in
            # order, then deliver only the leases that took effect.
            self._catch_up()
            st = self._st  # type: ignore[assignment]
            pending = st.pending
            new_msgs = [m for m in new_msgs if _holds(pending.get(m._seq), 1, deadline)]
            got_re = []
            kept_pl = []
            for q, a, p in zip(plan.re, plan.re_att, re_pl):
                if _holds(pending.get(q), a, deadline):
                    got_re.append(q)
                    kept_pl.append(p)
            re_pl = kept_pl
        pending = st.pending
        out: List[Any] = []
        lost = []
        cls, owner = self._cls, self._owner
        for q, p in zip(got_re, re_pl):
            if p is None:
                lost.append(q)
            else:
                out.append(cls(owner, q, pending[q][ATT], p))
        out.extend(new_msgs)
        if lost:
            logger.warning("queue %r: messages %s are missing from the message log "
                           "(damaged or deleted); dropping them", self.name, lost)
            self.ack(lost)
        if st.applied - self._ckpt_pos >= self._checkpoint_every():
            self._checkpoint_locked()
        return out

    def _scan_into(self, pos: int, hi: Optional[int], need: int, scanned: int,
                   sort_read: Callable[..., Any], acc: List[List[Any]]) -> Tuple[int, int, int]:
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

    def ack(self, numbers: Sequence[int]) -> int:
        seqs = list(numbers)
        rec = encode(b"A", (), [seqs])
        with self._mu:
            st = self._state()
            if seqs and max(seqs) >= st.cursor:
                # Messages no pull has reached (Queue.delete_messages): give
                # them entries first, as a pull passing over them does.
                with self._locked():
                    self._reach(self._state(), max(seqs) + 1)
                st = self._state()
            before = st.acked
            js = self._journal_append(rec, f"an ack of {plural(len(seqs), 'message')}")
            self._apply_own(js, lambda s: s.apply_ack(seqs))
            return self._st.acked - before  # type: ignore[union-attr]

    def _reach(self, st: QueueState, upto: int) -> None:
        """Move the cursor to ``upto`` (under the queue's lock), giving each
        message passed over an entry, not leased, due when it is visible:
        the record a pull writes for the delayed messages it passes."""
        frm = st.cursor
        if upto <= frm:
            return
        if upto - frm > _SCAN_LIMIT:
            raise errors.QlogError(
                f"message {upto - 1} of queue {self.name!r} is {upto - frm} messages past the "
                f"consumers' position; at most {_SCAN_LIMIT} can be deleted ahead of them")
        seqs: List[int] = []
        dues: List[int] = []
        sents: List[int] = []
        pos = frm
        while pos < upto:
            recs = self._msgs.read(pos, max_records=min(1000, upto - pos))
            if not recs:
                break
            for sq, p in recs:
                if sq >= upto:
                    break
                _v, _ct, _f, delay_ms, sent = _unpack_header(p)
                seqs.append(sq)
                sents.append(sent)
                dues.append(sent + delay_ms * 1000)
            pos = recs[-1][0] + 1
        upto = min(upto, pos)
        arrays: List[Sequence[int]] = [[], [], [], [], seqs, dues, sents, [], []]
        js = self._journal_append(encode(b"P", (0, frm, upto, 0, 0), arrays), "a deletion")
        self._apply_own(js, lambda s_: s_.apply_pull(0, frm, upto, 0, [], [], [], [], seqs, dues, sents, [], []))

    def retry(self, numbers: Sequence[int], attempts: Sequence[int], due_us: Sequence[int]) -> int:
        seqs, atts, dues = list(numbers), list(attempts), list(due_us)
        with self._mu:
            st = self._state()
            live = sum(1 for s, a in zip(seqs, atts) if _holds_lease(st.pending.get(s), a))
            js = self._journal_append(encode(b"R", (), [seqs, atts, dues]),
                                      f"a retry of {plural(len(seqs), 'message')}")
            self._apply_own(js, lambda s: s.apply_retry(seqs, atts, dues))
        self._msgs.poke()  # a waiting pull recomputes what is due
        return live

    def extend(self, numbers: Sequence[int], attempts: Sequence[int], deadline_us: int) -> int:
        seqs, atts = list(numbers), list(attempts)
        rec = encode(b"E", (deadline_us,), [seqs, atts])
        with self._mu:
            st = self._state()
            live = sum(1 for s, a in zip(seqs, atts) if _holds_lease(st.pending.get(s), a))
            js = self._journal_append(rec, f"an extension of {len(seqs)} lease(s)")
            self._apply_own(js, lambda s: s.apply_extend(deadline_us, seqs, atts))
        return live

    def lease_state(self, numbers: Sequence[int]) -> List[Optional[int]]:
        with self._mu:
            st = self._state()
            out: List[Optional[int]] = []
            for s in numbers:
                e = st.pending.get(s)
                if e is not None:
                    out.append(e[ATT] if e[LEASED] else 0)
                elif s >= st.cursor or any(lo <= s < hi for lo, hi in st.unknown):
                    out.append(0 if s < self._msgs.next_seq else None)
                else:
                    out.append(None)
            return out

    def dead_letter(self, numbers: Sequence[int], attempts: Sequence[int], now_us: int,
                    policy: LeasePolicy, records: Optional[Sequence[bytes]] = None) -> int:
        """Under the queue's lock, so that a pull finding the same lease run
        out cannot dead-letter the message a second time; and only
        deliveries still current (not acked or redelivered since)."""
        with self._mu, self._locked():
            st = self._state()
            keep = [i for i, (s, a) in enumerate(zip(numbers, attempts))
                    if _holds_lease(st.pending.get(s), a)]
            if not keep:
                return 0
            seqs = [numbers[i] for i in keep]
            atts = [attempts[i] for i in keep]
            recs = None if records is None else [records[i] for i in keep]
            to_dlq, seqs, atts = self._move_dead(seqs, atts, now_us, policy, recs)
            if seqs:
                js = self._journal_append(encode(b"D", (to_dlq,), [seqs, atts]),
                                          f"a dead-lettering of {plural(len(seqs), 'message')}")
                self._apply_own(js, lambda s: s.apply_dead(to_dlq, seqs, atts))
        self._msgs.poke()
        return len(seqs)

    def _move_dead(self, seqs: List[int], atts: List[int], now: int, policy: LeasePolicy,
                   payloads: Optional[List[bytes]] = None) -> Tuple[int, List[int], List[int]]:
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
        if policy.dead_letter_to is None:
            return 0, seqs, atts
        st = self._st
        assert st is not None
        fresh = [i for i, s in enumerate(seqs) if s not in st.dying]
        if fresh:
            ks, ka = [seqs[i] for i in fresh], [atts[i] for i in fresh]
            js = self._journal_append(encode(b"K", (), [ks, ka]),
                                      f"a dead-lettering of {plural(len(ks), 'message')}")
            self._apply_own(js, lambda s_: s_.apply_claim(ks, ka))
            st = self._st
            assert st is not None
        dying = st.dying
        keep = [i for i, s in enumerate(seqs) if s in dying and dying[s][ATT] == atts[i]]
        seqs = [seqs[i] for i in keep]
        atts = [atts[i] for i in keep]
        found: Sequence[Optional[bytes]] = (
            self._payloads(seqs) if payloads is None else [payloads[i] for i in keep])
        out = [policy.dead_letter_record(p, s, a, now)
               for s, a, p in zip(seqs, atts, found) if p is not None]
        if out:
            dlq = policy.dead_letter_to()
            dlq.append(out)
            dlq.sync()
        return 1, seqs, atts

    # -- looking, cleaning -------------------------------------------------

    def peek(self, n: int) -> List[Any]:
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
            cls, owner = self._cls, self._owner
            out: List[Any] = []
            for (sq, att), p in zip(first, self._payloads([sq for sq, _ in first])):
                if p is not None:
                    out.append(cls(owner, sq, att, p, True))
            cur = st.cursor
            while len(out) < n:
                recs = self._msgs.read(cur, max_records=n - len(out))
                if not recs:
                    break
                out.extend(cls(owner, sq, 0, p, True) for sq, p in recs)
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

    def _bytes_in(self, ranges: Sequence[Tuple[int, int]], seqs: Sequence[int]) -> int:
        """Bytes of the records numbered in ``ranges`` and in ``seqs``: one
        read per 1,000 records (this reads them all)."""
        total = 0
        for lo, hi in ranges:
            pos = lo
            while pos < hi:
                recs = self._msgs.read(pos, max_records=min(1000, hi - pos))
                if not recs:
                    break
                total += sum(len(p) for sq, p in recs if sq < hi)
                pos = recs[-1][0] + 1
        total += sum(len(p) for p in self._payloads(seqs) if p is not None)
        return total

    def counts(self, now_us: int, with_bytes: bool = False) -> Counts:
        with self._mu:
            st = self._state()
            now = now_us
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
            nxt = self._msgs.next_seq
            ranges = [*st.unknown, (st.cursor, nxt)]
            for lo, hi in ranges:
                k = self._messages_in(lo, hi)
                if k:
                    recs = self._msgs.read(lo, max_records=1)
                    if not recs or recs[0][0] >= hi:
                        continue
                    sent = _unpack_header(recs[0][1])[4]
                    if oldest is None or sent < oldest:
                        oldest = sent
                    waiting += k
            nbytes = self._bytes_in(ranges, [*st.pending, *st.dying]) if with_bytes else 0
            return Counts(
                backlog=len(st.pending) + len(st.dying) + waiting,
                backlog_bytes=nbytes,
                in_flight=in_flight,
                delayed=delayed,
                oldest_sent_us=oldest,
                acked=st.acked,
                dead_lettered=st.dead_lettered,
                deleted=st.deleted,
                expired=st.expired,
                purged=st.purged,
                sent=nxt,
                retried=st.retried,
                lease_expired=st.lease_expired,
                delivery_buckets=tuple(st.delivery),
                delivery_sum_us=st.delivery_sum,
            )

    def purge(self) -> int:
        with self._mu, self._locked():
            st = self._state()
            upto = self._msgs.next_seq
            before = st.purged
            # Messages, not numbers (a reboot skips numbers): every replica
            # counts what the record says.
            waiting = sum(self._messages_in(lo, min(hi, upto))
                          for lo, hi in [*st.unknown, (st.cursor, upto)])
            js = self._journal_append(encode(b"X", (upto, waiting), []), "a purge")
            self._apply_own(js, lambda s: s.apply_purge(upto, waiting))
            n = self._st.purged - before  # type: ignore[union-attr]
            self._checkpoint_locked()
            return n

    def expire(self, retention_us: int, now_us: int) -> int:
        with self._mu, self._locked():
            st = self._state()
            before = st.expired
            now = now_us
            ret_us = retention_us
            exp = [s for s, e in st.pending.items() if e[SENT] + ret_us <= now and not (e[LEASED] and e[DUE] > now)]
            uk_read: List[int] = []  # unknown ranges read (state.py, "Replay")
            for lo, hi in list(st.unknown):
                end = self._expired_run(lo, hi, ret_us, now, exp)
                if end > lo:
                    uk_read += (lo, end)
            frm = st.cursor
            cur = self._expired_run(frm, None, ret_us, now, exp)
            if exp or cur != frm or uk_read:
                arrays: List[Sequence[int]] = [[], [], [], [], [], [], [], exp, []]
                rec = encode(b"P", (0, frm, cur, 0, now), arrays + [uk_read] if uk_read else arrays)
                js = self._journal_append(rec, "an expiry")
                self._apply_own(js, lambda s: s.apply_pull(0, frm, cur, 0, [], [], [], [], [], [], [], exp, [],
                                                           now, uk_read))
                self._checkpoint_locked()
            return self._st.expired - before  # type: ignore[union-attr]

    def _expired_run(self, pos: int, hi: Optional[int], ret_us: int, now: int, exp: List[int]) -> int:
        """Add to ``exp`` the messages from ``pos`` on (below ``hi`` when
        given) sent ``ret_us`` or more before ``now``, up to the first that
        was not; returns where that run ends (no message lies between)."""
        while hi is None or pos < hi:
            recs: List[Tuple[int, bytes]] = self._msgs.read(pos, max_records=1000)
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

    # -- pausing, waiting ----------------------------------------------------

    def set_paused(self, paused: bool) -> None:
        if self._closed:
            raise errors.LogClosedError(f"queue {self.name!r} is closed")
        if paused:
            fd = os.open(self._paused_path, os.O_WRONLY | os.O_CREAT, self._mode)
            os.close(fd)
            fsync_dir(self._dir)
            return
        try:
            os.unlink(self._paused_path)
        except FileNotFoundError:
            return
        fsync_dir(self._dir)
        self._msgs.poke()

    def paused(self) -> bool:
        return os.path.exists(self._paused_path)

    def change_token(self) -> int:
        return int(self._msgs.notify_gen())

    def wait_change(self, token: int, timeout: float) -> None:
        self._msgs.wait_change(token, timeout)

    def wake(self) -> None:
        self._msgs.poke()

    def next_due_us(self) -> Optional[int]:
        with self._mu:
            return self._state().next_due()

    # -- settings ------------------------------------------------------------

    def load_settings(self) -> Dict[str, Any]:
        try:
            with io.open(self._settings_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
            stored = doc["settings"]
            if not isinstance(stored, dict):
                raise TypeError("not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise errors.CorruptStateError(
                f"{self._settings_path} does not hold qlog settings ({e}): restore it or remove it "
                "(the queue then uses qlog.toml and the defaults)"
            ) from None
        return stored

    def store_settings(self, changes: Dict[str, Any]) -> Dict[str, Any]:
        with self._mu, self._locked():
            stored = self.load_settings()
            stored.update(changes)
            data = json.dumps({"settings": stored}, sort_keys=True, indent=1).encode() + b"\n"
            write_durable(self._settings_path, data, self._mode)
            self._gen[0] += 1  # under the lock: no other writer; readers see it at their next call
            self._msgs.poke()  # waiting pulls look again (pause, retries, sizes)
            return stored

    def settings_counter(self) -> memoryview:
        return self._gen

    # -- state replica ---------------------------------------------------

    def _journal_append(self, rec: bytes, what: str) -> int:
        """Append ``rec`` to the state journal; a full disk is reported
        naming the queue, what was refused and the space it needed."""
        try:
            seq: int = self._journal.append(rec)
            return seq
        except errors.DiskFullError as e:
            raise errors.DiskFullError(
                e.errno,
                f"no space left on device to record {what} in the state journal of queue "
                f"{self.name!r} ({(_REC_HEAD + len(rec) + 7) & ~7} bytes needed in "
                f"{self._journal.path}); nothing was recorded: try again once space is freed",
            ) from None

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
                # range, delivered again (state.py, "Replay").
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

    # -- lifetime --------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

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
                self._msgs.close()
                self._journal.close()
                os.close(self._lockfd)
                self._lockfd = -1
                last = self._gen[0]
                self._gen.release()
                self._gen = [last]  # type: ignore[assignment]  # closed: no more changes
                self._gen_map.close()


class _PullPlan:
    """What one pull does, gathered before its journal record is written:
    the messages it leases again (``re`` at deliveries ``re_att``), the new
    ones it leases (``new``, sent at ``new_sent``, made as ``new_msgs``),
    the delayed ones it found (``dfr``, due at ``dfr_due``), the expired
    (``exp``) and the dead (``dead`` at ``dead_att``, towards the DLQ when
    ``to_dlq``), the unknown ranges it read (``uk_read``: lo, hi pairs) and
    the cursor before and after (``frm``, ``cur``)."""

    def __init__(self, cursor: int) -> None:
        self.frm = self.cur = cursor
        self.re: List[int] = []
        self.re_att: List[int] = []
        self.exp: List[int] = []
        self.dead: List[int] = []
        self.dead_att: List[int] = []
        self.cands: List[int] = []
        self.new: List[int] = []
        self.new_sent: List[int] = []
        self.new_msgs: List[Any] = []
        self.dfr: List[int] = []
        self.dfr_due: List[int] = []
        self.dfr_sent: List[int] = []
        self.uk_read: List[int] = []
        self.to_dlq = 0

    def scan_new(self, q: LocalQueue, st: QueueState, need: int, now: int, ret_us: Optional[int]) -> None:
        """Read new messages: first those whose fate a damaged journal hid
        (state.py, "Replay"), as if never delivered (the record names the
        ranges read, so that every replica takes them out), then past the
        cursor."""
        ret = -1 if ret_us is None else ret_us
        cls, owner = q._cls, q._owner

        def sort_read(data: Any, seqs: Any, offs: Any, k: int, below: Optional[int] = None,
                      ) -> Optional[Tuple[Tuple[List[Any], ...], int, int]]:
            if below is not None:  # only the records numbered below `below`
                k = bisect.bisect_left(memoryview(seqs).cast("B").cast("Q"), below, 0, k)
                if k == 0:
                    return None
            last = int.from_bytes(seqs[8 * (k - 1):8 * k], "little")
            return _scan(data, seqs, offs, k, now, ret, cls, owner), last, k

        acc = [self.new, self.new_sent, self.new_msgs, self.dfr, self.dfr_due, self.dfr_sent, self.exp]
        scanned = 0
        for lo, hi in list(st.unknown) if need > 0 else ():
            pos, need, scanned = q._scan_into(lo, hi, need, scanned, sort_read, acc)
            if pos > lo:
                self.uk_read += (lo, pos)
            if need <= 0 or scanned >= _SCAN_LIMIT:
                break
        self.cur, need, scanned = q._scan_into(self.cur, None, need, scanned, sort_read, acc)
        (self.new, self.new_sent, self.new_msgs, self.dfr, self.dfr_due, self.dfr_sent,
         self.exp) = acc

    def empty(self, cursor: int) -> bool:
        return not (self.new or self.re or self.dfr or self.exp or self.dead or self.uk_read) \
            and self.cur == self.frm

    def _arrays(self) -> List[List[int]]:
        return [self.new, self.new_sent, self.re, self.re_att, self.dfr, self.dfr_due,
                self.dfr_sent, self.exp, self.dead]

    def record(self, deadline: int, now: int) -> bytes:
        """The P record (docs/FORMAT.md, "State journal")."""
        arrays = self._arrays()
        return encode(b"P", (deadline, self.frm, self.cur, self.to_dlq, now),
                      arrays + [self.uk_read] if self.uk_read else arrays)

    def apply(self, st: QueueState, deadline: int, now: int) -> None:
        st.apply_pull(deadline, self.frm, self.cur, self.to_dlq, self.new, self.new_sent, self.re,
                      self.re_att, self.dfr, self.dfr_due, self.dfr_sent, self.exp, self.dead, now,
                      self.uk_read)


def _seq_run(data: Any, seqs: Any, offs: Any, n: int) -> Tuple[int, int, int, List[Tuple[int, int]]]:
    """A read's ``(first seq, last seq, n, [(a, b): numbers a .. b-1 missing
    between its records])`` (an ``unpack`` for :meth:`Log.read`)."""
    sq = memoryview(seqs).cast("B").cast("Q")
    first, last = sq[0], sq[n - 1]
    holes: List[Tuple[int, int]] = []
    if last - first + 1 != n:
        holes = [(sq[i] + 1, sq[i + 1]) for i in range(n - 1) if sq[i + 1] != sq[i] + 1]
    return first, last, n, holes


def _holds_lease(e: Optional[List[Any]], attempts: int) -> bool:
    return e is not None and e[ATT] == attempts and e[LEASED]


def _holds(e: Optional[List[Any]], attempts: int, deadline: int) -> bool:
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
    """The NFS check of the engine in use, made before anything is created
    (each engine checks again when it opens a log)."""
    if ENGINE == "c":
        from .._log.clog import refuse_nfs
    else:
        from .._log.purelog import refuse_nfs
    refuse_nfs(path)
