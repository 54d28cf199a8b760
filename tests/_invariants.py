"""The queue's guarantees after a fault, stated once: one checker for every
test that kills processes or cuts the power under a workload.

A workload records **facts**: what the queue returned to it (and, just
before a call, what it was about to do).  A test collects them, decides
which of them must have survived the fault, and calls :func:`check` on the
reopened data directory (or the PostgreSQL database a URL names):

- after a process crash (SIGKILL) every returned call must have survived,
  in every durability mode (``must=None``);
- after a power cut only what was durable at the cut's durable point must
  have survived: the caller passes that subset of the facts as ``must``;
- after a database server crash (PostgreSQL) the same: acks and retries
  commit with ``synchronous_commit = off``, so one that returned may be
  lost with the server; the caller leaves those out of ``must``.

Children record facts in a side file with :class:`FactWriter`: one
``os.write`` of whole lines on an O_APPEND descriptor per call, so a line
is in the kernel before the next call starts and survives a SIGKILL (a last
line without its newline was cut short and is ignored by
:func:`read_facts`).  A workload in the test's own process keeps them in
memory (``FactWriter()``, then ``.facts``).  Fact kinds (``Fact.kind``):

============  ===================================================================
``sending``   about to send batch ``batch`` of ``n`` messages (no id yet)
``sent``      ``send`` / ``send_batch`` returned ``id`` for message ``key``
``deliver``   a pull (or a push handler) got ``id`` with ``attempts`` (body ``key``)
``acking``    about to ack ``id`` (the ack may or may not take effect)
``ack``       ``ack()`` / ``ack_all()`` returned for ``id``
``retrying``  about to retry ``id`` (a push handler about to raise, a retry call)
``retry``     ``retry()`` returned for ``id``
``dead``      ``id`` was seen in the dead-letter queue ``queue``
============  ===================================================================

A power-cut test, for instance, records with ``w = FactWriter()``, cuts,
and calls ``check(path, w.facts, settings=..., must=[the facts returned
before the cut's durable point])``; a crash test reads its children's side
files and calls ``check(path, read_facts(paths), settings=...)``.

Bodies are :func:`make_body` dicts: they name their batch, their index and
the batch's size, and carry a digest of those, so a body read back is either
exactly what was sent or caught.  A message's key is ``"<batch>/<index>"``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

import qlog
import qlog._local.backend
from qlog._pg.conn import is_target
from qlog._settings import QueueSettings

# ---- bodies ----------------------------------------------------------------------


def _digest(batch: str, i: int, n: int) -> str:
    return hashlib.sha256(f"{batch}/{i}/{n}".encode()).hexdigest()


def make_body(batch: str, i: int, n: int, pad: int = 0) -> Dict[str, Any]:
    """The body of message ``i`` of batch ``batch`` (``n`` messages), with
    ``pad`` extra characters that are also checked.  ``batch`` names the
    batch uniquely in its queue (no spaces, no "/")."""
    assert batch and " " not in batch and "/" not in batch, f"bad batch name {batch!r}"
    d = _digest(batch, i, n)
    return {"b": batch, "i": i, "n": n, "h": d[:16], "pad": (d * (pad // 64 + 1))[:pad]}


def body_key(body: Any) -> Tuple[str, int, int]:
    """``(batch, index, n)`` of an intact :func:`make_body` body; ValueError otherwise."""
    try:
        batch, i, n, h, pad = body["b"], body["i"], body["n"], body["h"], body["pad"]
        d = _digest(batch, i, n)
        ok = (isinstance(i, int) and isinstance(n, int) and 0 <= i < n and h == d[:16]
              and pad == (d * (len(pad) // 64 + 1))[:len(pad)])
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a checked body ({e!r}): {str(body)[:120]}") from None
    if not ok:
        raise ValueError(f"body fails its self-check: {str(body)[:120]}")
    return batch, i, n


# ---- facts -----------------------------------------------------------------------


class Fact(NamedTuple):
    """One thing a workload saw (see the module docstring for ``kind``).
    ``key`` is ``"<batch>/<index>"`` for ``sent`` and ``deliver``; ``n`` is
    the batch size for ``sending`` and ``sent``; ``mode`` the durability the
    sender used.  Facts are values: equal fields, same fact."""

    kind: str
    queue: str
    id: str = ""
    attempts: int = 0
    key: str = ""
    batch: str = ""
    n: int = 0
    mode: str = ""


KINDS = ("sending", "sent", "deliver", "acking", "ack", "retrying", "retry", "dead")


def _key_of(body: Any) -> str:
    try:
        batch, i, _n = body_key(body)
    except ValueError:
        return "?"   # the checker finds the body at the drain (or finds it lost)
    return f"{batch}/{i}"


class FactWriter:
    """A child's side file: each method records one returned call (or one
    call about to be made) with a single ``os.write`` of whole lines.

    Without a ``path`` the facts are kept in memory instead, in order, in
    ``facts`` (for a workload in the test's own process, e.g. one whose
    power is cut: it picks the facts that must survive from that list)."""

    def __init__(self, path: Optional[str] = None) -> None:
        self.fd = -1 if path is None else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.facts: List[Fact] = []

    def _write(self, lines: Iterable[str]) -> None:
        lines = list(lines)
        if not lines:
            return
        if self.fd < 0:
            self.facts += parse_facts(lines)
            return
        data = "".join(line + "\n" for line in lines).encode()
        n = os.write(self.fd, data)
        assert n == len(data), f"short write to a side file: {n} of {len(data)} bytes"

    def sending(self, queue: str, batch: str, n: int, mode: str) -> None:
        self._write([f"sending {queue} {batch} {n} {mode}"])

    def sent(self, queue: str, batch: str, mode: str, ids: Sequence[str]) -> None:
        self._write([f"sent {queue} {batch} {mode} {' '.join(ids)}"])

    def delivered(self, queue: str, messages: Iterable[Any]) -> None:
        self._write(f"deliver {queue} {m.id} {m.attempts} {_key_of(m.body)}" for m in messages)

    def _ids(self, kind: str, queue: str, ids: Sequence[str]) -> None:
        if ids:
            self._write([f"{kind} {queue} {' '.join(ids)}"])

    def acking(self, queue: str, ids: Sequence[str]) -> None:
        self._ids("acking", queue, ids)

    def acked(self, queue: str, ids: Sequence[str]) -> None:
        self._ids("ack", queue, ids)

    def retrying(self, queue: str, ids: Sequence[str]) -> None:
        self._ids("retrying", queue, ids)

    def retried(self, queue: str, ids: Sequence[str]) -> None:
        self._ids("retry", queue, ids)

    def dead_seen(self, dlq: str, ids: Sequence[str]) -> None:
        self._ids("dead", dlq, ids)

    def settle(self, queue: str, batch: Any, rng: Any, ack: float, retry: float,
               ack_all: float) -> None:
        """A pull consumer's turn over ``batch``, each call recorded before
        and after it: each message is acked (probability ``ack``), retried
        (``retry``) or left leased; then, with probability ``ack_all``, the
        ones left are acked with ``batch.ack_all()``."""
        left = []
        for m in batch:
            x = rng.random()
            if x < ack:
                self.acking(queue, [m.id])
                m.ack()
                self.acked(queue, [m.id])
            elif x < ack + retry:
                self.retrying(queue, [m.id])
                m.retry()
                self.retried(queue, [m.id])
            else:
                left.append(m.id)
        if left and rng.random() < ack_all:
            self.acking(queue, left)
            batch.ack_all()
            self.acked(queue, left)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_facts(lines: Iterable[str]) -> List[Fact]:
    """Facts from side-file lines (as :class:`FactWriter` writes them)."""
    out: List[Fact] = []
    for line in lines:
        kind, queue, *rest = line.split()
        if kind == "sending":
            out.append(Fact(kind, queue, batch=rest[0], n=int(rest[1]), mode=rest[2]))
        elif kind == "sent":
            batch, mode, ids = rest[0], rest[1], rest[2:]
            out.extend(Fact(kind, queue, id=mid, key=f"{batch}/{i}", batch=batch, n=len(ids), mode=mode)
                       for i, mid in enumerate(ids))
        elif kind == "deliver":
            out.append(Fact(kind, queue, id=rest[0], attempts=int(rest[1]), key=rest[2]))
        elif kind in KINDS:
            out.extend(Fact(kind, queue, id=mid) for mid in rest)
        else:
            raise ValueError(f"unknown fact line {line!r}")
    return out


def read_facts(paths: Iterable[str]) -> List[Fact]:
    """Every fact of the side files ``paths``, file after file (a last line
    that a kill cut short is dropped; a missing file holds none)."""
    out: List[Fact] = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        out += parse_facts(data.decode().split("\n")[:-1])
    return out


# ---- the report ------------------------------------------------------------------


@dataclass
class Report:
    """What :func:`check` found.  ``lost``, ``corrupt`` and
    ``duplicates_otherwise`` are 0 whenever it returns.  ``checked``,
    ``acks_in_flight`` and ``expired`` count over the whole history given;
    the other counts are of what this drain found."""

    checked: int = 0
    """Distinct messages accounted for (sent ones and ones found at the drain)."""
    lost: int = 0
    corrupt: int = 0
    duplicates_in_flight: int = 0
    """Extra copies (same original id) of messages in flight at the fault: a
    dead-lettering cut between the dead-letter queue's write and the journal's."""
    duplicates_otherwise: int = 0
    expired: int = 0
    """Messages gone because their retention ran out (only with retention on)."""
    sends_in_flight: int = 0
    """Messages of sends in flight at the fault that landed (whole batches)."""
    acks_in_flight: int = 0
    """Messages gone whose ack was in flight at the fault."""
    redelivered: int = 0
    """Messages delivered again at the drain after an earlier delivery that
    no returned retry explains: leased to (or being acked or retried by) a
    process at the fault."""
    dead_lettered: int = 0
    """Messages found in a dead-letter queue at the drain (distinct ids)."""
    torn_tail_bytes: int = 0
    """Bytes of torn tails that reopening cut (not damage)."""
    damage_tolerated: int = 0
    """Damaged regions the caller's ``tolerate_damage`` explained (a power
    cut that wrote back some unsynced pages and not others)."""
    drained: Dict[str, List[Tuple[str, int, Any]]] = field(default_factory=dict, repr=False)
    """Per queue, ``(id, attempts, body)`` of every message the drain got."""
    facts: List[Fact] = field(default_factory=list, repr=False)
    """The drain's own facts (a ``deliver`` and an ``ack`` per message it
    got): a workload that goes on after the check adds them to its history."""

    def add(self, other: "Report") -> None:
        """Add ``other``'s counts to these (for totals over checks of
        separate histories; a history that goes on from check to check
        takes the history-wide counts from its last report instead)."""
        for name in ("checked", "lost", "corrupt", "duplicates_in_flight", "duplicates_otherwise", "expired",
                     "sends_in_flight", "acks_in_flight", "redelivered", "dead_lettered", "torn_tail_bytes",
                     "damage_tolerated"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def line(self) -> str:
        return (f"checked={self.checked} lost={self.lost} corrupt={self.corrupt} "
                f"duplicates_in_flight={self.duplicates_in_flight} "
                f"duplicates_otherwise={self.duplicates_otherwise} expired={self.expired} "
                f"sends_in_flight={self.sends_in_flight} acks_in_flight={self.acks_in_flight} "
                f"redelivered={self.redelivered} dead_lettered={self.dead_lettered} "
                f"torn_tail_bytes={self.torn_tail_bytes}"
                + (f" damage_tolerated={self.damage_tolerated}" if self.damage_tolerated else ""))


class InvariantViolation(AssertionError):
    """What :func:`check` raises: the message names the offending ids;
    ``report`` holds the counts it had reached (``lost``, ``corrupt``,
    ``duplicates_otherwise`` among them), so that a caller running many
    checks can total the violations too."""

    def __init__(self, message: str, report: "Report") -> None:
        super().__init__(message)
        self.report = report


class _Warnings(logging.Handler):
    """Collects the qlog logger's warnings during the drain (a message
    missing from its log is dropped with a warning: that is a loss)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def _ids(xs: Iterable[str], limit: int = 12) -> str:
    xs = sorted(xs)
    more = f" (+{len(xs) - limit} more)" if len(xs) > limit else ""
    return ", ".join(xs[:limit]) + more


# ---- the checker -------------------------------------------------------------------


def check_logs(path: str, tolerate: Optional[Callable[[str, Any], bool]] = None,
               tolerated: Optional[Dict[str, int]] = None,
               settings: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Tuple[int, List[str]]:
    """Reopen every queue's message log and state journal of the data
    directory ``path`` on its own (recovery cuts a torn tail) and verify the
    CRC of every record.  Returns ``(torn tail bytes cut, damage found)``.

    ``tolerate(log, damage)`` (``log`` is ``"<queue>/messages"`` or
    ``"<queue>/state"``, ``damage`` a ``Log.verify()`` item) true: the
    damage is not reported but counted in ``tolerated`` (per log).
    ``settings`` (by queue name): each log is opened with the segment size
    its queue uses, so that checking allocates no more than the queue would."""
    torn = 0
    damage: List[str] = []
    root = os.path.join(path, "queues")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for part in ("messages", "state"):
            d = os.path.join(root, name, part)
            if not os.path.isdir(d):
                continue
            seg: Dict[str, Any] = {}
            if settings is not None:
                seg["segment_bytes"] = (
                    settings.get(name, {}).get("segment_bytes", QueueSettings().segment_bytes)
                    if part == "messages" else qlog._local.backend._JOURNAL_SEGMENT)
            with qlog.Log(d, durability="none", **seg) as log:
                st = log.stats()
                torn += st.recovered_bytes_dropped
                rep = log.verify()
                for x in rep.damage:
                    if tolerate is not None and tolerate(f"{name}/{part}", x):
                        if tolerated is not None:
                            tolerated[f"{name}/{part}"] = tolerated.get(f"{name}/{part}", 0) + 1
                        continue
                    damage.append(f"{name}/{part}: {x.kind} at segment {x.segment} offset {x.offset} "
                                  f"({x.length} bytes, after record {x.after_seq})")
    return torn, damage


def check(
    path: str,
    facts: Sequence[Fact],
    *,
    settings: Mapping[str, Mapping[str, Any]],
    must: Optional[Iterable[Fact]] = None,
    durability: str = "sync",
    clock: Optional[Callable[[], float]] = None,
    probe: bool = True,
    ordered: bool = False,
    tolerate_damage: Optional[Callable[[str, Any], bool]] = None,
    may_have_expired: Optional[Callable[[str, str], bool]] = None,
) -> Report:
    """Reopen the data directory ``path`` after a fault, drain every queue
    and dead-letter queue (acking everything), and state the guarantees.
    ``path`` may also be a PostgreSQL URL (what ``qlog.open`` takes): the
    parts about the local backend's files (the logs' damage and torn tails,
    corrupt records skipped) are then left out, the rest is the same:

    1. every ``sent`` fact in ``must`` is accounted for: delivered at the
       drain, or acked (an ``ack`` or ``acking`` fact), or in a dead-letter
       queue with its original id, or expired by retention (when the queue
       has retention on; counted, and no more than the queue says expired);
    2. nothing is corrupt: every message log and state journal verifies with
       no damage (a torn tail cut by recovery is not damage, it is counted),
       every body at the drain passes its self-check and is the body the
       sender recorded for that id, no batch is half there, and no message
       was dropped as missing from its log;
    3. no duplicates except of messages in flight at the fault: a message
       found twice (in the dead-letter queue twice, or in the DLQ and its
       queue) carries the same original id in every copy; one body under
       two ids, an unknown message that no ``sending`` fact explains, and a
       message delivered at the drain after an ``ack`` in ``must`` returned
       are violations;
    4. attempts never go back: a message delivered at the drain has more
       attempts than every ``deliver`` fact in ``must`` for it;
    5. each queue still works: a send is accepted and delivered (``probe``).

    With ``ordered`` (the facts are in the order they happened: one
    process at a time), also: the ``deliver`` facts of a message in
    ``must`` have strictly growing attempts, and none comes after an
    ``ack`` of it in ``must`` (not checked in dead-letter queues, where an
    in-flight duplicate is a second message under the same id).

    ``facts``: everything the workload recorded, in any order; ``must``:
    the facts that must have survived (default: every returned call, right
    for a process crash).  ``settings``: the settings of every queue the
    workload used, by name (dead-letter queues included; a queue's
    ``dead_letter_queue`` makes it a source whose DLQ is drained after it).
    ``clock``: the drain's clock (default: 10 days ahead, so that every
    lease and retry delay has run out; pass one nearer when retention is on
    and only what retention dropped by then may be gone).

    ``tolerate_damage(log, damage)``: damage the caller can explain (a
    power cut writes back unsynced pages in any order, and recovery cannot
    tell a hole in them from bit rot): see :func:`check_logs`.  A log whose
    every damaged region is explained is not held to zero corrupt records
    skipped, nor to no "damaged record(s) found on open" warning.

    ``may_have_expired(queue, id)``: whether retention may have dropped the
    message by the drain's clock (the caller knows when it was sent).  When
    given, it decides instead of the queue's expired count, and a batch
    member it allows for counts as there.

    Returns a :class:`Report`; raises AssertionError naming the offending
    ids on any violation."""
    must_set: Set[Fact] = set(facts if must is None else must)
    clock = clock or (lambda: time.time() + 10 * 86_400)
    rep = Report()
    problems: List[str] = []

    database = is_target(os.fspath(path))   # a PostgreSQL URL: no log files to verify
    tolerated: Dict[str, int] = {}
    rep.torn_tail_bytes, damage = (0, []) if database else check_logs(path, tolerate_damage, tolerated,
                                                                      settings)
    rep.damage_tolerated = sum(tolerated.values())
    explained = {log for log in tolerated if not any(d.startswith(f"{log}:") for d in damage)}
    if damage:
        rep.corrupt += len(damage)
        problems.append(f"damaged records in the logs: {damage[:8]}")

    dlq_of = {q: s["dead_letter_queue"] for q, s in settings.items() if s.get("dead_letter_queue")}
    dlqs = set(dlq_of.values())
    sources = sorted(q for q in settings if q not in dlqs)
    order = sources + sorted(dlqs)

    drained: Dict[str, List[Tuple[str, int, Any, Optional[Any]]]] = {}
    corrupt_bodies: List[str] = []
    try:
        broker = qlog.open(path, durability=durability, clock=clock)
    except qlog.QlogError as e:
        raise AssertionError(f"reopening {path} failed: {e!r}") from e
    warn = _Warnings()
    qlog_logger = logging.getLogger("qlog")
    qlog_logger.addHandler(warn)
    try:
        with broker:
            on_disk = set(broker.queues())
            stray = on_disk - set(order)
            assert not stray, f"queues on disk that the workload did not declare: {sorted(stray)}"
            queues = {name: broker.queue(name, **settings[name]) for name in order}
            for name in order:
                q = queues[name]
                got = drained.setdefault(name, [])
                while True:
                    batch = q.pull(batch_size=100)
                    if not batch:
                        break
                    for m in batch:
                        try:
                            body = m.body
                        except Exception as e:  # noqa: BLE001 - any failure to decode is corruption
                            corrupt_bodies.append(f"{name}/{m.id}: {e!r}")
                            body = None
                        got.append((m.id, m.attempts, body, m.dead_letter))
                    batch.ack_all()
                st = q.stats()
                assert st.backlog == 0, f"queue {name!r} still holds {st.backlog} messages after the drain: {st}"
                corrupt_records = 0 if database else (
                    (0 if f"{name}/messages" in explained else q._b._msgs.stats().corrupt_records)
                    + (0 if f"{name}/state" in explained else q._b._journal.stats().corrupt_records))
                if corrupt_records:
                    rep.corrupt += corrupt_records
                    problems.append(f"queue {name!r}: {corrupt_records} corrupt records skipped while reading")
            expired_by_queue = {name: queues[name].stats().expired for name in order}
            if probe:
                for name in order:
                    _probe(queues[name], name, problems)
    except qlog.QlogError as e:
        raise AssertionError(f"draining {path} failed: {e!r}") from e
    finally:
        qlog_logger.removeHandler(warn)
    warn.records = [w for w in warn.records
                    if not ("damaged record(s) found on open" in w
                            and any(f"{os.sep}{log.replace('/', os.sep)}'" in w for log in explained))]
    if warn.records:
        rep.corrupt += len(warn.records)
        problems.append(f"the drain logged warnings (messages missing from their log): {warn.records[:5]}")

    # ---- index the facts -------------------------------------------------------
    sent: Dict[Tuple[str, str], Fact] = {}
    key_owner: Dict[Tuple[str, str], str] = {}
    intents: Dict[Tuple[str, str], int] = {}      # (queue, batch) -> n, for sends not returned
    returned_batches: Set[Tuple[str, str]] = set()
    acked: Set[Tuple[str, str]] = set()
    acking: Set[Tuple[str, str]] = set()
    dead_seen: Set[Tuple[str, str]] = set()       # (dead-letter queue, original id), must survive
    retried: Set[Tuple[str, str]] = set()
    max_att: Dict[Tuple[str, str], int] = defaultdict(int)
    ever_delivered: Set[Tuple[str, str]] = set()
    for f in facts:
        k = (f.queue, f.id)
        if f.kind == "sent":
            if k in sent and sent[k].key != f.key:
                problems.append(f"send returned id {f.id} twice: for {sent[k].key} and {f.key}")
            sent[k] = f
            owner = key_owner.setdefault((f.queue, f.key), f.id)
            if owner != f.id:
                rep.duplicates_otherwise += 1
                problems.append(f"body {f.key} in {f.queue!r} was returned under two ids: {owner} and {f.id}")
            returned_batches.add((f.queue, f.batch))
        elif f.kind == "sending":
            intents[(f.queue, f.batch)] = f.n
        elif f.kind == "dead":
            if f in must_set:
                dead_seen.add(k)
        elif f.kind == "retry":
            retried.add(k)
        elif f.kind in ("ack", "acking"):
            acking.add(k)
            if f.kind == "ack" and f in must_set:
                acked.add(k)
        elif f.kind == "deliver":
            ever_delivered.add(k)
            if f.key != "?":
                key_owner.setdefault((f.queue, f.key), f.id)
            if f in must_set:
                # (a dead-letter queue can hold two copies under one id: not checked there)
                if ordered and f.queue not in dlqs and f.attempts <= max_att[k]:
                    problems.append(f"{f.queue}/{f.id} was delivered with attempts {f.attempts} after "
                                    f"attempts {max_att[k]}")
                if ordered and f.queue not in dlqs and k in acked:
                    rep.duplicates_otherwise += 1
                    problems.append(f"{f.queue}/{f.id} was delivered (attempts {f.attempts}) after its "
                                    f"ack returned")
                max_att[k] = max(max_att[k], f.attempts)

    # ---- the drain, message by message -------------------------------------------
    present: Dict[Tuple[str, str], int] = Counter()      # (source queue, id) -> copies at the drain
    in_dlq: Dict[Tuple[str, str], int] = Counter()       # (source queue, original id) -> DLQ copies
    drain_key: Dict[Tuple[str, str], str] = {}
    batch_seen: Dict[Tuple[str, str], Dict[int, str]] = defaultdict(dict)
    batch_size: Dict[Tuple[str, str], int] = {}
    for name, got in drained.items():
        rep.drained[name] = [(mid, att, body) for mid, att, body, _dl in got]
        for mid, att, body, dl in got:
            try:
                batch, i, n = body_key(body)
                key = f"{batch}/{i}"
            except ValueError as e:
                if body is not None:
                    corrupt_bodies.append(f"{name}/{mid}: {e}")
                key = "?"
            rep.facts += [Fact("deliver", name, mid, att, key), Fact("ack", name, mid)]
            if dl is not None:
                rep.facts.append(Fact("dead", name, mid))
            src = dl.queue if dl is not None else name
            k = (src, mid)
            if dl is not None:
                if dlq_of.get(src) != name:
                    problems.append(f"{name}/{mid} is a dead letter of {src!r}, whose dead-letter queue is "
                                    f"{dlq_of.get(src)!r}")
                in_dlq[k] += 1
            else:
                present[k] += 1
                if k in acked or (dlq_of.get(name, ""), mid) in acked:
                    rep.duplicates_otherwise += 1
                    problems.append(f"{name}/{mid} was delivered at the drain (attempts {att}) although "
                                    f"its ack (or its dead letter's) returned")
                if att <= max_att.get(k, 0):
                    problems.append(f"{name}/{mid}: attempts went back: {att} at the drain after "
                                    f"{max_att[k]} before")
                if k in ever_delivered and k not in retried:
                    rep.redelivered += 1
            if key == "?":
                continue
            prev = drain_key.setdefault(k, key)
            if prev != key:
                corrupt_bodies.append(f"{name}/{mid}: copies hold {prev} and {key}")
            f = sent.get(k)
            if f is not None and f.key != key:
                corrupt_bodies.append(f"{name}/{mid}: body is {key}, the sender sent {f.key} under that id")
            owner = key_owner.setdefault((src, key), mid)
            if owner != mid:
                rep.duplicates_otherwise += 1
                problems.append(f"body {key} of {src!r} is stored under two ids: {owner} and {mid}")
            batch_seen[(src, batch)][i] = mid
            if batch_size.setdefault((src, batch), n) != n:
                corrupt_bodies.append(f"{name}/{mid}: batch {batch} holds messages saying n={n} "
                                      f"and n={batch_size[(src, batch)]}")
    if corrupt_bodies:
        rep.corrupt += len(corrupt_bodies)
        problems.append(f"corrupt or wrong bodies: {corrupt_bodies[:8]}")

    # duplicates: any copy beyond the first of one (source queue, id)
    dup_ids = []
    for k in set(present) | set(in_dlq):
        copies = present.get(k, 0) + in_dlq.get(k, 0)
        if copies > 1:
            if present.get(k, 0) > 1:
                rep.duplicates_otherwise += present[k] - 1
                problems.append(f"{k[0]}/{k[1]} was delivered {present[k]} times by one drain")
            else:
                rep.duplicates_in_flight += copies - 1
                dup_ids.append(k[1])
        if in_dlq.get(k, 0):
            rep.dead_lettered += 1
            if k in acked:
                rep.duplicates_otherwise += 1
                problems.append(f"{k[0]}/{k[1]} is in the dead-letter queue although its ack returned")

    # unknown messages: only the batches of sends in flight at the fault
    for k in set(present) | set(in_dlq):
        if k in sent:
            continue
        key = drain_key.get(k)
        batch = key.split("/")[0] if key else None
        if batch is None or (k[0], batch) not in intents or (k[0], batch) in returned_batches:
            rep.duplicates_otherwise += 1
            problems.append(f"{k[0]}/{k[1]} ({key}) was never sent, nor is it of a send in flight")
        else:
            rep.sends_in_flight += 1

    # half batches: a batch found at all is found whole (delivered, acked or dead-lettered)
    for (src, batch), got in batch_seen.items():
        n = batch_size[(src, batch)]
        have = set(got)
        for i in range(n):
            if i in have:
                continue
            mid = key_owner.get((src, f"{batch}/{i}"))
            if mid is not None and ((src, mid) in acking or (
                    may_have_expired is not None and may_have_expired(src, mid))):
                have.add(i)
        if have != set(range(n)):
            problems.append(f"batch {batch} of {src!r} is half there: messages {sorted(have)} of {n}")

    # losses
    retention = {q for q, s in settings.items() if s.get("message_retention") is not None}
    expired_ids: Dict[str, List[str]] = defaultdict(list)
    lost: List[str] = []
    for k, f in sent.items():
        rep.checked += 1
        dk = (dlq_of.get(k[0], ""), k[1])
        if dk in dead_seen or dk in acking:
            continue   # dead-lettered before (and maybe acked there): its DLQ copy is checked as a "dead" fact
        if present.get(k) or in_dlq.get(k) or k in acking:
            if k in acking and not present.get(k) and not in_dlq.get(k) and k not in acked:
                rep.acks_in_flight += 1
            continue
        if f not in must_set:
            continue
        if k[0] in retention and (may_have_expired is None or may_have_expired(k[0], k[1])):
            expired_ids[k[0]].append(k[1])
            continue
        lost.append(f"{k[0]}/{k[1]} ({f.key})")
    rep.checked += rep.sends_in_flight
    for q, ids in expired_ids.items():
        rep.expired += len(ids)
        if may_have_expired is None and len(ids) > expired_by_queue.get(q, 0):
            lost += [f"{q}/{mid} (gone; the queue counts only {expired_by_queue.get(q, 0)} expired)"
                     for mid in ids]
    # dead-letterings seen must stay (in the DLQ, or acked there)
    for f in must_set:
        if f.kind == "dead":
            srcs = [s for s, d in dlq_of.items() if d == f.queue]
            if not any(in_dlq.get((s, f.id)) for s in srcs) and (f.queue, f.id) not in acking:
                lost.append(f"{f.queue}/{f.id} (seen dead-lettered)")
    rep.lost = len(lost)
    if lost:
        problems.append(f"{len(lost)} messages lost: {_ids(lost)}")
    if problems:
        raise InvariantViolation(f"invariants violated ({rep.line()}):\n  " + "\n  ".join(problems)
                                 + (f"\n  in-flight duplicates: {_ids(dup_ids)}" if dup_ids else ""), rep)
    return rep


def _probe(q: "qlog.Queue", name: str, problems: List[str]) -> None:
    """The queue accepts a send and delivers it."""
    body = make_body(f"probe-{name}", 0, 1)
    mid = q.send(body)
    batch = q.pull(batch_size=10)
    got = [(m.id, m.body) for m in batch]
    batch.ack_all()
    if got != [(mid, body)]:
        problems.append(f"queue {name!r}: a probe sent after the fault ({mid}) came back as {got}")
