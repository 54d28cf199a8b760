"""Per-queue consumer state, and the journal records that change it.

Every process that consumes from a queue keeps a replica of this state,
built by loading the latest checkpoint and replaying the queue's state
journal (a :class:`~qlog.Log` of its own) from the checkpoint's position.
Records are applied in journal order by every replica, and applying them is
deterministic, so every process reaches the same state.

What is kept, per queue::

    cursor     next message number never handed out: messages >= cursor
               were never delivered and need no entry
    pending    one entry per message below the cursor that is not done
               (leased, waiting out a retry delay, or deferred by its own
               delivery delay); a message below the cursor with no entry is
               done: acked, dead-lettered, expired or purged
    dying      entries claimed for the dead-letter queue (a K record) and
               not yet moved: no ack, retry or lease touches them; the
               record that moves them (P's dead seqs, or D) takes them out
    unknown    ranges of message numbers below the cursor whose fate the
               journal does not show (see "Replay" below): delivered again
               as if never delivered
    counters   acked, dead-lettered, deleted (failed with no dead-letter
               queue), expired, purged, hidden (numbers put in unknown ranges),
               retried, lease expiries (leases a later pull found run out),
               and the first-delivery latency histogram (counts per bucket of
               DELIVERY_BUCKETS_US, and their sum): a pull record names
               its time and each new message's send time

So memory grows with what is in flight or delayed, never with the backlog.

Replay.  A power cut can leave a hole in the journal's unsynced tail (the
page cache writes pages back in any order, so a later page may reach the
disk without an earlier one), and bit rot can damage a record anywhere.  A
lost record can only hide an advance of the cursor: every pull record names
the cursor before it, so a pull record whose cursor-before lies above the
replica's cursor shows that records moving the cursor were lost.  What
became of those messages is unknown, so they go into an unknown range and
are delivered again; they are never taken as done.  Only a surviving record
takes a message out of an unknown range: an ack, a dead-lettering, an
expiry, a purge, or a pull that handed it out again (its scanned ranges say
which numbers it looked at).  Retries and extensions of a message in an
unknown range change nothing (it is delivered again at once, attempts
starting over).  Every process that replays the same records reaches the
same state; a lost ack, retry or lease only means a redelivery.

A pending entry is a list, for speed::

    +----------+--------+---------------------------+-----------------+
    | attempts | leased | due (µs since the epoch)  | sent (µs)       |
    +----------+--------+---------------------------+-----------------+
    attempts   deliveries so far (0: never delivered, delayed at send)
    leased     True: a consumer holds it until `due` (its lease deadline);
               False: it becomes visible at `due` (delay or retry delay)
    sent       the message's timestamp (retention, oldest-message age)

Journal records (one log record each; little-endian)::

    +-----+-----------+-------------+--------------------+------------------+
    | tag | n scalars | n arrays    | scalars: int64 x S | lengths: u32 x A |
    | 1 B | u8        | u8          |                    |                  |
    +-----+-----------+-------------+--------------------+------------------+
    followed by the A arrays of int64, back to back.

    P pull     scalars deadline, from, to, to_dlq, now
               arrays  new seqs, new sent, re seqs, re attempts, deferred
                       seqs, deferred due, deferred sent, expired seqs,
                       dead seqs, [scanned unknown ranges: lo, hi pairs]
    A ack      arrays  seqs
    R retry    arrays  seqs, attempts, due
    K claim    arrays  seqs, attempts: claimed for the dead-letter queue,
                       before their copies are written there
    D dead     scalars to_dlq;  arrays seqs, attempts
    E extend   scalars deadline; arrays seqs, attempts
    X purge    scalars upto, [messages below upto with no entry]
"""

from __future__ import annotations

import bisect
import errno
import heapq
import logging
import os
import struct
from array import array
from collections import deque
from itertools import repeat
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

import crc32c as _crc32c

from .. import errors
from .._backend import DELIVERY_BUCKETS_US, delivery_bucket
from .._log.files import replace_durably, storage_error
from .._log.modes import DEFAULT_FILE_MODE

logger = logging.getLogger("qlog")

ATT, LEASED, DUE, SENT = 0, 1, 2, 3

_HEAD = struct.Struct("<cBB")


def encode(tag: bytes, scalars: Sequence[int], arrays: Sequence[Sequence[int]]) -> bytes:
    """One journal record."""
    parts = [
        _HEAD.pack(tag, len(scalars), len(arrays)),
        struct.pack(f"<{len(scalars)}q{len(arrays)}I", *scalars, *map(len, arrays)),
    ]
    for a in arrays:
        parts.append(a.tobytes() if isinstance(a, array) else array("q", a).tobytes())
    return b"".join(parts)


def decode(payload: bytes) -> Tuple[bytes, Tuple[int, ...], List[memoryview]]:
    """Split a journal record; raises ValueError when its shape is wrong."""
    if len(payload) < 3:
        raise ValueError("record shorter than its header")
    tag, ns, na = _HEAD.unpack_from(payload)
    fmt = f"<{ns}q{na}I"
    if len(payload) < 3 + struct.calcsize(fmt):
        raise ValueError(f"record of {len(payload)} bytes is shorter than its {ns} scalars "
                         f"and {na} array lengths")
    fields = struct.unpack_from(fmt, payload, 3)
    scalars, lens = fields[:ns], fields[ns:]
    off = 3 + struct.calcsize(fmt)
    mv = memoryview(payload)
    arrays = []
    for n in lens:
        end = off + 8 * n
        if end > len(payload):
            raise ValueError("array runs past the end of the record")
        arrays.append(mv[off:end].cast("q"))
        off = end
    if off != len(payload):
        raise ValueError("bytes left over after the last array")
    return tag, scalars, arrays


class QueueState:
    """The replicated consumer state of one queue (see the module docstring)."""

    def __init__(self) -> None:
        self.applied = 0  # next journal sequence number to apply
        self.cursor = 0
        self.pending: Dict[int, List[Any]] = {}  # [attempts, leased (a bool), due, sent]
        self.dying: Dict[int, List[Any]] = {}  # claimed for the dead-letter queue (K), not yet moved
        # Candidates to become visible: a heap of (due, seq) for waiting
        # entries and odd leases, and one deque of (deadline, seq) per lease
        # length, whose deadlines only grow.  Stale items (the entry moved
        # on) are skipped when popped.
        self.heap: List[Tuple[int, int]] = []
        self.leases: List[Deque[Tuple[int, List[int]]]] = []
        self.lease_items = 0  # seqs held by the lease groups, stale ones too
        self.acked = 0
        self.dead_lettered = 0
        self.deleted = 0
        self.expired = 0
        self.purged = 0
        self.hidden = 0  # message numbers put in unknown ranges by a damaged journal
        self.retried = 0
        self.lease_expired = 0
        self.delivery = [0] * (len(DELIVERY_BUCKETS_US) + 1)  # first deliveries per latency bucket
        self.delivery_sum = 0  # their latencies' sum, µs
        # Ranges [lo, hi) below the cursor whose fate the journal lost:
        # ascending, disjoint, never holding a pending entry.
        self.unknown: List[Tuple[int, int]] = []

    # -- applying records ------------------------------------------------

    def apply(self, payload: bytes) -> None:
        try:
            tag, sc, ar = check_record(payload)
            fn = _APPLY[tag]
            fn(self, sc, ar)
        except (ValueError, struct.error, IndexError, TypeError) as e:
            # A record that passed its CRC but does not parse was written by
            # a newer version or by a bug; skipping it is the only way on.
            logger.warning("state journal record %d skipped: %s", self.applied, e)

    def apply_pull(
        self, deadline: int, frm: int, to: int, to_dlq: int,
        new: Sequence[int], new_sent: Sequence[int],
        re: Sequence[int], re_att: Sequence[int],
        dfr: Sequence[int], dfr_due: Sequence[int], dfr_sent: Sequence[int],
        exp: Sequence[int], dead: Sequence[int], now: Optional[int] = None,
        scanned: Sequence[int] = (),
    ) -> None:
        """Apply a pull record.  ``scanned``: the unknown ranges the puller
        read, as ``lo, hi`` pairs; every message it found there is in the
        record's new, deferred or expired seqs."""
        pending = self.pending
        old = self.cursor
        if frm > old:
            # Records that moved the cursor from `old` to `frm` were lost
            # (module docstring, "Replay"): deliver those messages again.
            logger.warning("state journal lost the records that handed out messages %d to %d; "
                           "they are delivered again", old, frm - 1)
            self._unknown_add(old, frm)
            old = self.cursor = frm
        if to > self.cursor:
            self.cursor = to
        ranges = list(zip(scanned[0::2], scanned[1::2])) if scanned else ()
        # Below `old`, only a message the puller found in an unknown range.
        known = self._unknown_found
        if new:
            if new[0] < old:  # (only from unknown ranges, or after damage)
                keep = [i for i, s_ in enumerate(new) if s_ >= old or known(s_, ranges)]
                new_sent = [new_sent[i] for i in keep]
                new = [new[i] for i in keep]
            for s_, t in zip(new, new_sent):
                pending[s_] = [1, True, deadline, t]
            self._add_leases(deadline, list(new))
            if now:
                self._delivered(now, new_sent)
        if re:
            got = []
            first = []
            for s, a in zip(re, re_att):
                e = pending.get(s)
                # Only as the puller saw it: due by `now` (a retry landing
                # in between may have set a later time).
                if e is not None and e[ATT] == a - 1 and (now is None or e[DUE] <= now):
                    if e[LEASED]:
                        self.lease_expired += 1
                    elif a == 1:
                        first.append(e[SENT])
                    e[ATT] = a
                    e[LEASED] = True
                    e[DUE] = deadline
                    got.append(s)
            self._add_leases(deadline, got)
            if first and now:
                self._delivered(now, first)
        for s, d, t in zip(dfr, dfr_due, dfr_sent):
            if s >= old or known(s, ranges):
                pending[s] = [0, False, d, t]
                heapq.heappush(self.heap, (d, s))
        for s in exp:
            if pending.pop(s, None) is not None or s >= old or known(s, ranges):
                self.expired += 1
        for lo, hi in ranges:
            self._unknown_remove(lo, hi)
        dying = self.dying
        for s in dead:
            # A pull names a message dead when it found it visible at its
            # last attempt: leased means that lease ran out.
            e = pending.pop(s, None) or dying.pop(s, None)
            if e is not None or self._unknown_take(s):
                if e is not None and e[LEASED]:
                    self.lease_expired += 1
                if to_dlq:
                    self.dead_lettered += 1
                else:
                    self.deleted += 1

    def _delivered(self, now: int, sent: Sequence[int]) -> None:
        """Count first deliveries at ``now`` of messages sent at ``sent``.
        A send time after ``now`` (another process's clock, or a send
        stamped after the puller read its clock) counts as latency 0."""
        n = len(sent)
        newest = max(sent)
        if newest > now:
            sent = [min(t, now) for t in sent]
            newest = now
        self.delivery_sum += n * now - sum(sent)
        lo, hi = delivery_bucket(now - newest), delivery_bucket(now - min(sent))
        if lo == hi:  # the usual case: one bucket for the whole batch
            self.delivery[lo] += n
        else:
            for t in sent:
                self.delivery[delivery_bucket(now - t)] += 1

    # -- unknown ranges (module docstring, "Replay") -----------------------

    def _unknown_add(self, lo: int, hi: int) -> None:
        """Put ``lo .. hi-1`` (at or above every range, with no entries) in
        an unknown range."""
        uk = self.unknown
        self.hidden += hi - lo
        if uk and uk[-1][1] >= lo:  # adjoining the last range: one range
            lo = min(lo, uk[-1][0])
            uk.pop()
        uk.append((lo, hi))

    def _unknown_found(self, s: int, scanned: Sequence[Tuple[int, int]]) -> bool:
        """Whether message ``s`` is in an unknown range: in one of the
        ``scanned`` ranges (taken out whole afterwards), or else taken out
        of its range now."""
        return bool(self.unknown) and (_in_ranges(scanned, s) or self._unknown_take(s))

    def _unknown_take(self, s: int) -> bool:
        """Take message ``s`` out of the unknown ranges; whether it was in one."""
        uk = self.unknown
        if not uk:
            return False
        i = bisect.bisect_right(uk, (s, _I64_MAX)) - 1
        if i < 0 or s >= uk[i][1]:
            return False
        lo, hi = uk[i]
        uk[i:i + 1] = [r for r in ((lo, s), (s + 1, hi)) if r[0] < r[1]]
        return True

    def _unknown_remove(self, lo: int, hi: int) -> None:
        """Take ``lo .. hi-1`` out of the unknown ranges."""
        uk = self.unknown
        if not uk or hi <= lo:
            return
        out = []
        for a, b in uk:
            if b <= lo or a >= hi:
                out.append((a, b))
                continue
            if a < lo:
                out.append((a, lo))
            if b > hi:
                out.append((hi, b))
        uk[:] = out

    def _add_leases(self, deadline: int, seqs: List[int]) -> None:
        """Index leased messages by deadline: one (deadline, seqs) group per
        pull, in a deque whose deadlines only grow (one deque per lease
        length in use; out-of-order deadlines go to the heap)."""
        if not seqs:
            return
        self.lease_items += len(seqs)
        if self.lease_items > 2 * len(self.pending) + 10_000:
            self._reindex()
            return
        for q in self.leases:
            if not q or q[-1][0] <= deadline:
                q.append((deadline, seqs))
                return
        if len(self.leases) < 8:
            self.leases.append(deque([(deadline, seqs)]))
        else:
            for s in seqs:
                heapq.heappush(self.heap, (deadline, s))

    def _reindex(self) -> None:
        """Rebuild the candidate indexes from the entries, dropping every
        stale item (acked messages linger there until their due time)."""
        self.heap = [(e[DUE], s) for s, e in self.pending.items()]
        heapq.heapify(self.heap)
        self.leases = []
        self.lease_items = 0

    def apply_ack(self, seqs: Sequence[int]) -> None:
        gone = list(map(self.pending.pop, seqs, repeat(None, len(seqs))))
        n = len(gone) - gone.count(None)
        if self.unknown and n < len(gone):
            n += sum(1 for s, e in zip(seqs, gone) if e is None and self._unknown_take(s))
        self.acked += n

    def apply_retry(self, seqs: Sequence[int], atts: Sequence[int], dues: Sequence[int]) -> None:
        pending = self.pending
        for s, a, d in zip(seqs, atts, dues):
            e = pending.get(s)
            if e is not None and e[ATT] == a and e[LEASED]:
                e[LEASED] = False
                e[DUE] = d
                heapq.heappush(self.heap, (d, s))
                self.retried += 1

    def apply_claim(self, seqs: Sequence[int], atts: Sequence[int]) -> None:
        """Claim messages for the dead-letter queue, each only at the
        delivery named: from here no ack, retry or extension touches it,
        so the copy about to be written there is never of a message
        acked meanwhile."""
        pending, dying = self.pending, self.dying
        for s, a in zip(seqs, atts):
            e = pending.get(s)
            if e is not None and e[ATT] == a:
                dying[s] = pending.pop(s)

    def apply_dead(self, to_dlq: int, seqs: Sequence[int], atts: Sequence[int]) -> None:
        pending, dying = self.pending, self.dying
        for s, a in zip(seqs, atts):
            e = pending.get(s)
            if e is not None:
                if e[ATT] != a:
                    continue
                del pending[s]
            elif s in dying:
                if dying[s][ATT] != a:
                    continue
                del dying[s]
            elif not self._unknown_take(s):
                continue
            if to_dlq:
                self.dead_lettered += 1
            else:
                self.deleted += 1

    def apply_extend(self, deadline: int, seqs: Sequence[int], atts: Sequence[int]) -> None:
        pending = self.pending
        got = []
        for s, a in zip(seqs, atts):
            e = pending.get(s)
            if e is not None and e[ATT] == a and e[LEASED]:
                e[DUE] = deadline
                got.append(s)
        self._add_leases(deadline, got)

    def apply_purge(self, upto: int, waiting: Optional[int] = None) -> None:
        """Apply a purge record: every message below ``upto`` is done;
        ``waiting``: how many of them had no entry (in unknown ranges or
        never handed out), as the purger counted them (older records: the
        numbers are counted)."""
        pending = self.pending
        gone = [s for s in pending if s < upto]
        for s in gone:
            del pending[s]
        dead = [s for s in self.dying if s < upto]
        for s in dead:
            del self.dying[s]
        gone += dead
        numbers = max(0, upto - self.cursor) + sum(max(0, min(b, upto) - a) for a, b in self.unknown)
        # never more messages than numbers (a record only a bug could write)
        n = len(gone) + (numbers if waiting is None else min(max(0, waiting), numbers))
        self._unknown_remove(0, upto)
        self.purged += n
        if upto > self.cursor:
            self.cursor = upto

    # -- queries ---------------------------------------------------------

    def due_candidates(self, now: int, limit: int, seen: Optional[Set[int]] = None) -> List[int]:
        """Pop up to ``limit`` messages whose due time has passed (a lease
        that expired, a delay that ran out), oldest due first; none of
        ``seen`` (which gets the ones returned)."""
        out: List[int] = []
        if seen is None:
            seen = set()  # an entry can be indexed twice (a checkpoint, a requeue)
        pending = self.pending
        heap = self.heap
        while heap and heap[0][0] <= now and len(out) < limit:
            d, s = heapq.heappop(heap)
            e = pending.get(s)
            if e is not None and e[DUE] == d and s not in seen:
                seen.add(s)
                out.append(s)
        for q in self.leases:
            while q and q[0][0] <= now and len(out) < limit:
                d, seqs = q.popleft()
                self.lease_items -= len(seqs)
                for i, s in enumerate(seqs):
                    e = pending.get(s)
                    if e is not None and e[DUE] == d and e[LEASED] and s not in seen:
                        if len(out) == limit:
                            rest = seqs[i:]
                            q.appendleft((d, rest))
                            self.lease_items += len(rest)
                            break
                        seen.add(s)
                        out.append(s)
        return out

    def requeue(self, seqs: Sequence[int]) -> None:
        """Put back candidates popped by :meth:`due_candidates` but not used."""
        for s in seqs:
            e = self.pending.get(s)
            if e is not None:
                heapq.heappush(self.heap, (e[DUE], s))

    def next_due(self) -> Optional[int]:
        """The earliest time (µs) something pending may become visible (may
        be early: a lease group's deadline counts even if its messages were
        acked since)."""
        best = None
        pending = self.pending
        heap = self.heap
        while heap:
            d, s = heap[0]
            e = pending.get(s)
            if e is not None and e[DUE] == d:
                best = d
                break
            heapq.heappop(heap)
        for q in self.leases:
            if q and (best is None or q[0][0] < best):
                best = q[0][0]
        return best

    def floor(self) -> int:
        """Every message below this number is done."""
        f = min(self.pending) if self.pending else self.cursor
        if self.dying:
            f = min(f, min(self.dying))
        return min(f, self.unknown[0][0]) if self.unknown else f

    # -- checkpoints -----------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state as bytes (a checkpoint's body, CRC included)."""
        items = sorted([*self.pending.items(), *self.dying.items()])
        seqs = array("q", [s for s, _ in items])
        att = array("q", [e[ATT] for _, e in items])
        leased = array("q", [_DYING if s in self.dying else 1 if e[LEASED] else 0 for s, e in items])
        due = array("q", [e[DUE] for _, e in items])
        sent = array("q", [e[SENT] for _, e in items])
        unknown = array("q", [x for r in self.unknown for x in r])
        # Counters saturate at the largest int64: only journal records that
        # a bug wrote (with absurd message numbers) could take them there.
        counters = [min(c, _I64_MAX) for c in (self.acked, self.dead_lettered, self.deleted,
                                                self.expired, self.purged, self.hidden)]
        more = [min(c, _I64_MAX) for c in (self.retried, self.lease_expired, self.delivery_sum,
                                            *self.delivery)]
        head = _CKPT_HEAD.pack(
            _CKPT_MAGIC, _CKPT_VERSION, self.applied, self.cursor, *counters, len(items),
            len(self.unknown), len(self.delivery),
        )
        body = (head + seqs.tobytes() + att.tobytes() + leased.tobytes() + due.tobytes()
                + sent.tobytes() + unknown.tobytes() + array("q", more).tobytes())
        return body + struct.pack("<I", _crc32c.crc32c(body))

    @classmethod
    def from_snapshot(cls, data: bytes) -> "QueueState":
        """The state a checkpoint holds (version 3; version 2 has no
        retry, lease expiry and latency counters, version 1 no unknown
        ranges either: they start at 0).  Raises CorruptStateError for one that
        :meth:`snapshot` cannot have written (CRC, magic, length, a
        negative position, counter or message number, entries not in
        strictly ascending order or at or above the cursor, a leased flag
        other than 0, 1 or 2, unknown ranges empty, out of order, overlapping,
        reaching past the cursor or holding an entry), FormatError for
        another version."""
        if len(data) < _CKPT_HEADS[1].size + 4:
            raise errors.CorruptStateError("checkpoint is shorter than its header")
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        body = data[:-4]
        if _crc32c.crc32c(body) != crc:
            raise errors.CorruptStateError("checkpoint fails its CRC")
        magic, version = struct.unpack_from("<8sI", body)
        if magic != _CKPT_MAGIC:
            raise errors.CorruptStateError("checkpoint has the wrong magic")
        if version in _CKPT_HEADS:
            head = _CKPT_HEADS[version]
            if len(body) < head.size:
                raise errors.CorruptStateError("checkpoint is shorter than its header")
        else:
            raise errors.FormatError(
                f"checkpoint format version {version} is not a supported version (1 to {_CKPT_VERSION})"
            )
        f = head.unpack_from(body)
        st = cls()
        (st.applied, st.cursor, st.acked, st.dead_lettered, st.deleted, st.expired,
         st.purged, st.hidden, n) = f[2:11]
        u = f[11] if version >= 2 else 0
        nb = f[12] if version >= 3 else 0
        if min(f[2:]) < 0:
            raise errors.CorruptStateError("checkpoint holds a negative position, counter or count")
        if version >= 3 and nb != len(st.delivery):
            raise errors.CorruptStateError(
                f"checkpoint holds {nb} latency buckets; the format has {len(st.delivery)}")
        extra = 8 * (3 + nb) if version >= 3 else 0
        if len(body) != head.size + extra + 40 * n + 16 * u:
            raise errors.CorruptStateError(
                "checkpoint length does not match its entry and unknown range counts")
        mv = memoryview(body)[head.size:].cast("q")
        if extra:
            more = mv[5 * n + 2 * u:]
            if min(more) < 0:
                raise errors.CorruptStateError("checkpoint holds a negative position, counter or count")
            st.retried, st.lease_expired, st.delivery_sum = more[0], more[1], more[2]
            st.delivery = list(more[3:])
        seqs, att, leased, due, sent = (mv[i * n:(i + 1) * n] for i in range(5))
        if any(a >= b for a, b in zip(seqs, seqs[1:])):
            raise errors.CorruptStateError("checkpoint entries are not in ascending order")
        if n and seqs[0] < 0:
            raise errors.CorruptStateError("checkpoint holds a negative message number")
        if n and seqs[n - 1] >= st.cursor:
            raise errors.CorruptStateError(
                f"checkpoint holds an entry for message {seqs[n - 1]}, at or above its cursor "
                f"{st.cursor} (messages there were never handed out)")
        if not set(leased) <= {0, 1, _DYING}:
            raise errors.CorruptStateError(
                "checkpoint holds a leased flag other than 0, 1 or 2 (claimed for the dead-letter queue)")
        flat = mv[5 * n:5 * n + 2 * u]
        ranges = list(zip(flat[0::2], flat[1::2]))
        prev = 0
        for lo, hi in ranges:
            if not prev <= lo < hi <= st.cursor:
                raise errors.CorruptStateError(
                    f"checkpoint holds an unknown range {lo}-{hi} that is empty, negative, out of "
                    f"order, overlapping or past its cursor {st.cursor}")
            i = bisect.bisect_left(seqs, lo)
            if i < n and seqs[i] < hi:
                raise errors.CorruptStateError(
                    f"checkpoint holds an entry for message {seqs[i]} inside its unknown range "
                    f"{lo}-{hi}")
            prev = hi
        st.unknown = ranges
        for i in range(n):
            if leased[i] == _DYING:
                st.dying[seqs[i]] = [att[i], True, due[i], sent[i]]
                continue
            st.pending[seqs[i]] = [att[i], bool(leased[i]), due[i], sent[i]]
            st.heap.append((due[i], seqs[i]))
        heapq.heapify(st.heap)
        return st


_I64_MAX = (1 << 63) - 1
_CKPT_MAGIC = b"QLOGCKPT"
_DYING = 2  # a checkpoint entry's leased flag: claimed for the dead-letter queue
_CKPT_VERSION = 3
_CKPT_HEADS = {
    1: struct.Struct("<8sI9q"),   # magic, version, position, cursor, 6 counters, entries
    2: struct.Struct("<8sI10q"),  # the same, then the number of unknown ranges
    3: struct.Struct("<8sI11q"),  # the same, then the number of latency buckets; after the
                                  # unknown ranges: retried, lease expiries, latency sum, buckets
}
_CKPT_HEAD = _CKPT_HEADS[_CKPT_VERSION]


# Which arrays of each record hold message numbers (never negative).
_SEQ_ARRAYS = {b"P": (0, 2, 4, 7, 8, 9), b"A": (0,), b"R": (0,), b"K": (0,), b"D": (0,), b"E": (0,),
               b"X": ()}


def check_record(payload: bytes) -> Tuple[bytes, Tuple[int, ...], List[memoryview]]:
    """A state journal record (one that passed its CRC) split into ``(tag,
    scalars, arrays)``, or ValueError saying why it cannot be applied: the
    one check of a journal record, used by the replica (:meth:`QueueState.apply`)
    and by ``qlog verify`` alike (FORMAT.md, "State journal record")."""
    tag, sc, ar = decode(payload)
    if tag not in _APPLY:
        raise ValueError(f"unknown record tag {tag!r}")
    for i in _SEQ_ARRAYS[tag]:
        if i < len(ar) and len(ar[i]) and min(ar[i]) < 0:
            raise ValueError(f"a negative message number, {min(ar[i])}")
    if tag == b"P" and len(sc) >= 3:
        # new and deferred messages are those the pull moved the cursor
        # past: each is below the cursor after it
        for i in (0, 4):
            if i < len(ar) and len(ar[i]) and max(ar[i]) >= sc[2]:
                raise ValueError(f"a pull record hands out message {max(ar[i])} at or "
                                 f"above its cursor after, {sc[2]}")
    return tag, sc, ar


def _pull(st: QueueState, sc: Tuple[int, ...], ar: List[memoryview]) -> None:
    if len(ar) > 10 or (len(ar) == 10 and len(ar[9]) % 2):
        raise ValueError(f"a pull record of {len(ar)} arrays (9, or 10 with scanned lo, hi pairs)")
    # ar[:9] are new .. dead; mypy cannot count them (a short record raises TypeError: apply() skips it)
    st.apply_pull(sc[0], sc[1], sc[2], sc[3], *ar[:9],  # type: ignore[misc, arg-type]
                  now=sc[4] if len(sc) > 4 else None, scanned=ar[9] if len(ar) > 9 else ())


def _in_ranges(ranges: Sequence[Tuple[int, int]], s: int) -> bool:
    return any(lo <= s < hi for lo, hi in ranges)


_APPLY: Dict[bytes, Callable[[QueueState, Tuple[int, ...], List[memoryview]], None]] = {
    b"P": _pull,
    b"A": lambda st, sc, ar: st.apply_ack(ar[0]),
    b"R": lambda st, sc, ar: st.apply_retry(ar[0], ar[1], ar[2]),
    b"K": lambda st, sc, ar: st.apply_claim(ar[0], ar[1]),
    b"D": lambda st, sc, ar: st.apply_dead(sc[0], ar[0], ar[1]),
    b"E": lambda st, sc, ar: st.apply_extend(sc[0], ar[0], ar[1]),
    b"X": lambda st, sc, ar: st.apply_purge(sc[0], sc[1] if len(sc) > 1 else None),
}


def write_checkpoint(path: str, data: bytes, mode: int = DEFAULT_FILE_MODE) -> None:
    """Atomically replace the checkpoint at ``path``: temporary file,
    fdatasync, rename, directory fsync.  A power cut leaves the old one or
    the new one, never a torn one.  ``mode``: the file's permission bits.

    A failed write or sync (a full disk: :class:`~qlog.DiskFullError`, any
    other error: :class:`~qlog.StorageError`) removes the temporary file and
    leaves the previous checkpoint in place; the caller must then keep
    every journal record after the previous one."""
    try:
        replace_durably(path, data, mode, tmp=f"{path}.{os.getpid()}.tmp")
    except OSError as e:
        if (e.errno or errno.EIO) == errno.ENOSPC:
            raise storage_error(e, f"cannot write checkpoint {path} of {len(data)} bytes",
                                "the previous checkpoint is kept") from None
        raise storage_error(e, f"cannot write checkpoint {path}",
                            "it may not be durable, so the journal records it covers are kept") from None


def read_checkpoint(path: str) -> Optional[QueueState]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return QueueState.from_snapshot(data)
