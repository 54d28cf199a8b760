"""A whole-queue workload recorded for power cuts, and what each cut must keep.

``workload`` runs in a child interpreter on an empty directory: producers
(``send`` and ``send_batch``) on queues with durability "sync", "none" and
"interval", a pull consumer (pull, ack, retry with a delay, ack_all) and a
push consumer (``broker.run`` in a thread) whose handler fails some messages
until they reach a dead-letter queue; short retention, small segments and
frequent checkpoints, so that message and journal segments are deleted as it
goes; a hand-moved clock, so nothing waits for real time.  Every durable
write, whether the engine makes it (the syscall table) or Python code does
(``os`` inside ``qlog._local.state``, ``qlog._local.backend`` and ``qlog._log.files`` is replaced by a recording
proxy), goes into one trace (``_powertrace``) together with markers of what
the workload did and was told:

    ("t", clock)        the clock moved
    ("f", [Fact, ...])  ``_invariants.Fact``s: a call about to start
                        (sending, acking, retrying) or returned (sent,
                        deliver, ack, retry), in the order they happened
    ("burst", queue)    the burst's pull records are both in the journal's
                        unsynced tail (and the trace has looked at it)

Half-way through, a burst on the queue "bulk" leaves two pull records in
one file's unsynced tail whatever the threads' timing: "sync" send_batch of
BULK_SENT messages, then pulls of BULK_PULLS while the state journal's
flusher is held (``TraceRecorder.background_syncs_held``), so that no
fdatasync falls between them.  A cut there that keeps a later page of the
journal and loses an earlier one leaves a pull record whose cursor-before
lies above what the records before it reached (``journal_gaps``).

``Facts`` folds the markers of a trace prefix (what the workload knew at a
cut) and the durable journal records (what the disk held at the cut) into
the facts that must survive the cut; ``check_after_cut`` hands them to
``_invariants.check`` and adds what only a power cut can say (retention by
the clock at the cut, the journal gaps the cut left).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import struct
import sys
import threading
from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple

import crc32c

import qlog
import qlog._local.backend
import qlog._local.state
from _invariants import Fact, InvariantViolation, Report, body_key, check, make_body

SYNC_QUEUES = ("orders", "work", "bulk")
UNSYNCED_QUEUES = ("fast", "ticks")       # durability "none" and "interval"
QUEUES = ("orders", "fast", "ticks", "work", "work-dlq", "bulk")
BULK = "bulk"                   # the burst's queue (see the module docstring)
BULK_SENT = 620
BULK_PULLS = (600, 10)          # a pull record spanning pages, then one after it
RETENTION = 120.0
VISIBILITY = 30.0
MAX_RETRIES_PUSH = 2
SEGMENT = 1 << 16               # the smallest message segment
CHECKPOINT_EVERY = 25           # journal records between checkpoints
JOURNAL_SEGMENT = 4096          # the engine's smallest segment: the journal rolls often
DRAIN_AHEAD = 40.0              # the reopened queue's clock: past every lease and retry delay


def settings(name: str) -> Dict[str, Any]:
    """Each queue's settings, the same in the workload and after the cut."""
    base: Dict[str, Any] = dict(segment_bytes=SEGMENT, visibility_timeout=VISIBILITY)
    if name in ("work-dlq", BULK):
        return base  # default retention: dead letters and the burst stay
    base["message_retention"] = RETENTION
    if name == "work":
        base.update(max_retries=MAX_RETRIES_PUSH, dead_letter_queue="work-dlq", retry_delay=1.0,
                    max_batch_size=4, max_batch_timeout=0.0)
        return base
    # pulled queues: a message is never deleted for its retries (no dead-letter queue)
    base["max_retries"] = 100
    if name == "fast":
        base["durability"] = "none"
    elif name == "ticks":
        base["durability"] = "interval"
    return base


SETTINGS = {name: settings(name) for name in QUEUES}


def small_state(set_attr) -> None:
    """Checkpoint every CHECKPOINT_EVERY journal records, journal in
    JOURNAL_SEGMENT-byte segments (``set_attr``: setattr or monkeypatch's)."""
    assert hasattr(qlog._local.backend, "_JOURNAL_SEGMENT"), "the state journal's segment size moved"
    set_attr(qlog.Broker, "checkpoint_every", CHECKPOINT_EVERY)
    set_attr(qlog._local.backend, "_JOURNAL_SEGMENT", JOURNAL_SEGMENT)


def fails(key: str) -> bool:
    """Whether the push handler fails this message (a third of them), every time."""
    return hashlib.sha1(key.encode()).digest()[0] < 86


# ---- the child -------------------------------------------------------------------


def workload(path: str, trace: str, seed: int, steps: int) -> None:
    """Child main: run the workload on ``path`` (empty), then write the trace."""
    from _powertrace import TraceRecorder
    from _simvfs import syscalls

    rng = random.Random(seed)
    small_state(setattr)
    rec = TraceRecorder(path)
    proxy = rec.os_proxy()
    qlog._local.state.os = proxy
    qlog._local.backend.os = proxy
    qlog._log.files.os = proxy
    now = [1_000_000.0]
    rec.mark(("t", now[0]))

    def facts(*fs: Fact) -> None:
        rec.mark(("f", list(fs)))

    def delivered(name: str, msgs) -> List[Fact]:
        out = []
        for m in msgs:
            b, i, _n = body_key(m.body)
            out.append(Fact("deliver", name, id=m.id, attempts=m.attempts, key=f"{b}/{i}"))
        return out

    with syscalls(fatal=True, **rec.engine_hooks()):
        broker = qlog.open(path, clock=lambda: now[0])
        qs = {name: broker.queue(name, **SETTINGS[name]) for name in QUEUES}

        @broker.consumer("work", **SETTINGS["work"])
        def handle(batch) -> None:
            for m, f in zip(batch, delivered("work", batch)):
                if fails(f.key):
                    facts(f, Fact("retrying", "work", id=m.id))
                    m.retry()
                else:
                    facts(f, Fact("acking", "work", id=m.id))
                    m.ack()

        runner = threading.Thread(target=broker.run, kwargs=dict(handle_signals=False,
                                                                 shutdown_timeout=30.0))
        runner.start()
        counters = {name: 0 for name in QUEUES}

        def send(name: str, n: int) -> None:
            q = qs[name]
            batch = f"{name}-{counters[name]}"
            counters[name] += 1
            mode = SETTINGS[name].get("durability", "sync")
            bodies = [make_body(batch, i, n, rng.choice([0, 200, 1500, 4000])) for i in range(n)]
            facts(Fact("sending", name, batch=batch, n=n, mode=mode))
            ids = [q.send(bodies[0])] if n == 1 and rng.random() < 0.7 else q.send_batch(bodies)
            facts(*[Fact("sent", name, id=mid, key=f"{batch}/{i}", batch=batch, n=n, mode=mode)
                    for i, mid in enumerate(ids)])

        def consume(name: str) -> None:
            q = qs[name]
            batch = q.pull(batch_size=rng.randint(1, 10))
            if not batch:
                return
            facts(*delivered(name, batch))
            left = []
            for m in batch:
                x = rng.random()
                if x < 0.7:
                    facts(Fact("acking", name, id=m.id))
                    m.ack()
                    facts(Fact("ack", name, id=m.id))
                elif x < 0.85:
                    facts(Fact("retrying", name, id=m.id))
                    m.retry(delay_seconds=rng.choice([0, 0, 1, 5]))
                    facts(Fact("retry", name, id=m.id))
                else:
                    left.append(m)
            if left and rng.random() < 0.5:
                facts(*[Fact("acking", name, id=m.id) for m in left])
                batch.ack_all()
                facts(*[Fact("ack", name, id=m.id) for m in left])

        def burst() -> None:
            """The journal burst (module docstring).  It draws nothing from
            ``rng``: the rest of the workload makes the choices it made before."""
            q = qs[BULK]
            batch = f"{BULK}-0"
            facts(Fact("sending", BULK, batch=batch, n=BULK_SENT, mode="sync"))
            ids = q.send_batch([make_body(batch, i, BULK_SENT) for i in range(BULK_SENT)])
            facts(*[Fact("sent", BULK, id=mid, key=f"{batch}/{i}", batch=batch, n=BULK_SENT, mode="sync")
                    for i, mid in enumerate(ids)])
            got = []
            with rec.background_syncs_held(f"queues/{BULK}/state"):
                for n in BULK_PULLS:
                    b = q.pull(batch_size=n)
                    assert len(b) == n, f"the burst pulled {len(b)} messages, not {n}"
                    facts(*delivered(BULK, b))
                    got.append(b)
                rec.look()   # both pull records in the unsynced tail, nothing acked yet
                rec.mark(("burst", BULK))
            for b in got + [q.pull(batch_size=100)]:
                facts(*[Fact("acking", BULK, id=m.id) for m in b])
                b.ack_all()
                facts(*[Fact("ack", BULK, id=m.id) for m in b])

        for step in range(steps):
            now[0] += rng.uniform(0.1, 1.6)
            rec.mark(("t", now[0]))
            if step == steps // 2:
                burst()
            x = rng.random()
            if x < 0.3:
                send("orders", rng.choice([1, 1, rng.randint(2, 12)]))
            elif x < 0.4:
                send(rng.choice(["fast", "ticks"]), rng.choice([1, rng.randint(2, 30)]))
            elif x < 0.52:
                send("work", rng.choice([1, rng.randint(2, 6)]))
            elif x < 0.9:
                consume(rng.choice(["orders", "orders", "fast", "ticks"]))
        broker.stop()
        runner.join(60)
        assert not runner.is_alive(), "the push consumer did not stop"
        broker.close()
    rec.dump(trace)
    os.write(1, b"done %d %d\n" % (len(rec.events), rec.looks))


# ---- the journal-hole reproduction (test_powercut_queue.py) -------------------------


def pull_cursors(payload: bytes) -> Optional[Tuple[int, int]]:
    """``(from, to)`` of a pull record (FORMAT.md: its cursor before and
    after), None for another record."""
    if len(payload) < _JREC.size:
        return None
    tag, ns, _na = _JREC.unpack_from(payload)
    if tag != b"P" or ns < 3 or len(payload) < _JREC.size + 8 * ns:
        return None
    sc = struct.unpack_from(f"<{ns}q", payload, _JREC.size)
    return sc[1], sc[2]


def send_and_pull(path: str, queue: str, n: int, pulls: List[int]) -> None:
    """Child main: on a new data directory, one "sync" send_batch of ``n``
    messages ``{"n": i}`` to ``queue`` (the ids go to stdout as ``sent
    <json>``), then one pull per entry of ``pulls`` (nothing acked), then
    ``pulled``; then wait to be killed (stdin)."""
    b = qlog.open(path, durability="sync")
    q = b.queue(queue)
    ids = q.send_batch([{"n": i} for i in range(n)])
    os.write(1, b"sent " + json.dumps(ids).encode() + b"\n")
    for k in pulls:
        got = q.pull(batch_size=k)
        assert len(got) == k, f"pulled {len(got)}, not {k}"
    os.write(1, b"pulled\n")
    sys.stdin.read()


def drain_after_reboot(path: str, queue: str, boot_id: str, later: float) -> None:
    """Child main: open the data directory as after a reboot (the engine
    reads ``boot_id``: the C engine through its syscall table, the pure one
    from its one source of it) with the clock ``later`` seconds ahead, pull
    and ack ``queue`` until it is empty, and print JSON: the engine, the
    next sequence number of each log (past the reserve after a reboot), the
    ids delivered in order, and the warnings logged."""
    import contextlib
    import time
    from qlog import _log as _engine

    if _engine.ENGINE == "c":
        from _simvfs import boot_id_hook, syscalls
        ctx = syscalls(boot_id=boot_id_hook(boot_id))
    else:
        from qlog._log import purelog as _purelog
        _purelog._boot_id = lambda: boot_id
        ctx = contextlib.nullcontext()
    warnings: List[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    logging.getLogger("qlog").addHandler(Keep(logging.WARNING))
    got: List[str] = []
    with ctx:
        with qlog.open(path, clock=lambda: time.time() + later) as b:
            q = b.queue(queue)
            seqs = {"messages": q._b._msgs.next_seq, "state": q._b._journal.next_seq}
            while True:
                batch = q.pull(batch_size=100)
                if not batch:
                    break
                got += [m.id for m in batch]
                batch.ack_all()
    print(json.dumps({"engine": _engine.ENGINE, "next_seq": seqs, "got": got, "warnings": warnings}))


def child_main() -> None:
    func, kwargs = sys.argv[1], json.loads(sys.argv[2])
    globals()[func](**kwargs)


# ---- what a cut must keep --------------------------------------------------------


def seq_of(mid: str) -> int:
    return int(mid[-16:], 16)


class Facts:
    """What the workload knew at a cut (the markers before it), and which
    journal records were durable there (``on_durable``, from the replay)."""

    def __init__(self) -> None:
        self.clock = 0.0
        self.all: List[Fact] = []
        self.sent_at: Dict[Tuple[str, str], float] = {}      # (queue, batch) -> clock at send
        # durable journal records, per queue: acked seqs, highest attempts leased
        self.durable_acked: Dict[str, Set[int]] = {q: set() for q in QUEUES}
        self.durable_att: Dict[str, Dict[int, int]] = {q: {} for q in QUEUES}
        # message records durable in queues without "sync" (synced by a roll or a flush)
        self.durable_msgs: Dict[str, Set[int]] = {q: set() for q in QUEUES}

    def on_mark(self, marker: tuple) -> None:
        if marker[0] == "t":
            self.clock = marker[1]
            return
        if marker[0] != "f":
            return
        for f in marker[1]:
            self.all.append(f)
            if f.kind == "sending":
                self.sent_at[(f.queue, f.batch)] = self.clock

    def on_durable(self, rel: str, data: bytes, ident: int, replay) -> None:
        """A file's image became durable: note the journal records it holds,
        and the message records of a queue without "sync" (when the file is
        durably named, they survive any cut from now on)."""
        parts = rel.split("/")
        if len(parts) != 4 or parts[0] != "queues" or not parts[3].endswith(".seg"):
            return
        q = parts[1]
        if parts[2] == "messages" and q in UNSYNCED_QUEUES:
            if replay.durably_named(ident):
                from qlog._log import pure as _pure
                self.durable_msgs[q].update(r.seq for r in _pure.iter_segment(data))
            return
        if parts[2] != "state" or not replay.durably_named(ident):
            return
        from qlog._log import pure as _pure

        acked, att = self.durable_acked[q], self.durable_att[q]
        for r in _pure.iter_segment(data):
            tag, sc, ar = qlog._local.state.decode(r.payload)
            if tag == b"A":
                acked.update(ar[0])
            elif tag == b"P":
                for s in ar[0]:
                    att[s] = max(att.get(s, 0), 1)
                for s, a in zip(ar[2], ar[3]):
                    att[s] = max(att.get(s, 0), a)

    def must(self) -> Tuple[List[Fact], List[Fact]]:
        """``(facts, must)`` for ``_invariants.check`` at this cut.

        Must survive: every "sync" send that returned, and every other
        send that returned whose records a roll or a flush made durable in
        a durably named segment; every ack whose
        journal record was durable (also one whose call had not returned
        yet: the record is on disk); every delivery whose lease record was
        durable (attempts never go below it)."""
        facts = list(self.all)
        must: List[Fact] = []
        acks = set()
        for f in facts:
            if f.kind == "sent" and (f.mode == "sync" or seq_of(f.id) in self.durable_msgs[f.queue]):
                must.append(f)
            elif f.kind == "acking" and seq_of(f.id) in self.durable_acked[f.queue]:
                acks.add((f.queue, f.id))
            elif f.kind == "deliver" and f.attempts <= self.durable_att[f.queue].get(seq_of(f.id), 0):
                must.append(f)
        for q, mid in sorted(acks):
            f = Fact("ack", q, id=mid)
            facts.append(f)
            must.append(f)
        return facts, must


class DropsAfterCut(logging.Filter):
    """A power cut may take message records that the state journal already
    names (a send in flight, whose records consumers saw before its
    fdatasync; any send under "none" or "interval" whose lease or ack was
    synced first): the queue drops them with a warning, which is then no
    corruption.  This filter, on the "qlog" logger, lets through (to the
    checker, which counts it as corruption) only such a warning that names
    a message that had to survive; the others are counted in ``dropped``."""

    PREFIX = "queue %r: messages %s are missing from the message log"

    def __init__(self, must_seqs: Dict[str, Set[int]]) -> None:
        super().__init__()
        self.must_seqs = must_seqs
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIX)):
            return True
        name, seqs = record.args[0], list(record.args[1])
        if any(s in self.must_seqs.get(name, ()) for s in seqs):
            return True
        self.dropped += len(seqs)
        return False


def unsynced_damage(replay):
    """A ``tolerate_damage`` predicate for the cut at ``replay``'s position:
    damage that reaches past the end of its segment's durable image lies in
    bytes no fdatasync covered, where a power cut writes back some pages and
    not others (recovery cannot tell that from bit rot, and says damage).
    Damage wholly inside the durable image is never explained."""

    def tolerate(log: str, damage) -> bool:
        rel = f"queues/{log}"
        entry = replay.dirs.get(rel, {}).get(f"{damage.segment:020d}.seg")
        if entry is None or entry[0] != "f":
            return False
        durable_end = len(replay.durable.get(entry[1], b"").rstrip(b"\0"))
        return damage.offset + damage.length > durable_end

    return tolerate


# ---- gaps in a state journal ------------------------------------------------------

_JREC = struct.Struct("<cBB")           # docs/FORMAT.md: a journal record's tag, scalars, arrays
_CKPT = struct.Struct("<8sIqq")         # a checkpoint's magic, version, applied, cursor


def _checkpoint_position(path: str) -> Optional[Tuple[int, int]]:
    """``(applied, cursor)`` of the checkpoint at ``path`` ((0, 0) when there
    is none; None when it fails its CRC or magic)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0, 0
    if len(data) < _CKPT.size + 4 or struct.unpack_from("<I", data, len(data) - 4)[0] != crc32c.crc32c(data[:-4]):
        return None
    magic, _version, applied, cursor = _CKPT.unpack_from(data)
    return (applied, cursor) if magic == b"QLOGCKPT" else None


def journal_gaps(root: str) -> Dict[str, List[Tuple[int, int]]]:
    """Per queue of the data directory ``root``, the ranges ``[lo, hi)`` of
    message numbers its state journal skips: replaying the intact records
    from the checkpoint on (as the engine's recovery keeps them: damage in
    the middle is stepped over), a pull record whose cursor-before (FORMAT.md:
    scalars deadline, from, to) lies above the cursor the records before it
    reached (a purge's ``upto`` moves it too) shows that records handing out
    ``lo .. hi-1`` were lost.  Read from the files, before anything opens
    them; queues without such a range are left out."""
    from damage import records, segments

    out: Dict[str, List[Tuple[int, int]]] = {}
    qroot = os.path.join(root, "queues")
    for name in sorted(os.listdir(qroot)) if os.path.isdir(qroot) else []:
        start = _checkpoint_position(os.path.join(qroot, name, "checkpoint"))
        sdir = os.path.join(qroot, name, "state")
        if start is None or not os.path.isdir(sdir):
            continue
        applied, cursor = start
        recs = []
        for seg in segments(sdir):
            try:
                recs += records(seg)
            except ValueError:   # shorter than a header: holds no record
                continue
        for r in sorted(recs, key=lambda r: r.seq):
            if r.seq < applied or len(r.payload) < _JREC.size:
                continue
            tag, ns, _na = _JREC.unpack_from(r.payload)
            if len(r.payload) < _JREC.size + 8 * ns:
                continue
            sc = struct.unpack_from(f"<{ns}q", r.payload, _JREC.size)
            if tag == b"P" and ns >= 3:
                if sc[1] > cursor:
                    out.setdefault(name, []).append((cursor, sc[1]))
                cursor = max(cursor, sc[2])
            elif tag == b"X" and ns >= 1:
                cursor = max(cursor, sc[0])
    return out


class JournalGapWarnings(logging.Filter):
    """Replay warns when the state journal skips a range of messages (pull
    records lost before a surviving one).  After a cut whose own journal
    shows that range (``journal_gaps``) the warning is no corruption: this
    filter, on the "qlog" logger, keeps such a warning from the checker and
    counts it in ``seen``.  The messages of the range are held to the
    checker's guarantees like any other: one that had to survive and is not
    delivered is lost."""

    def __init__(self, gaps: Dict[str, List[Tuple[int, int]]]) -> None:
        super().__init__()
        self.ranges = {(lo, hi - 1) for rs in gaps.values() for lo, hi in rs}
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if (isinstance(record.msg, str) and record.msg.startswith("state journal ")
                and len(args) >= 2 and tuple(args[:2]) in self.ranges):
            self.seen += 1
            return False
        return True


class CutResult(NamedTuple):
    report: Report          # with the counts reached when the check failed
    dropped: int            # messages the queues dropped as missing from their logs
    must: int               # sent messages that had to survive
    gaps: Dict[str, List[Tuple[int, int]]]   # the journal gaps the cut left (``journal_gaps``)
    gap_warnings: int       # replay's warnings about them
    error: Optional[AssertionError]          # the violation, if any


def check_after_cut(out_dir: str, facts: Facts, replay, boot_hook) -> CutResult:
    """Reopen the directory a cut left, as after a reboot (another boot id),
    with the clock DRAIN_AHEAD seconds after the cut's, and state the
    invariants (``_invariants.check``: raises AssertionError on a violation)
    with what only the cut knows: which facts were durable (``Facts.must``),
    which messages are old enough to have expired by the drain (the clock
    when they were sent), which damage lies in bytes no fdatasync covered
    (``unsynced_damage``), which dropped messages were never durable
    (``DropsAfterCut``) and which ranges of messages the journal the cut
    left skips (``journal_gaps``, ``JournalGapWarnings``).  A violation is
    returned in ``error`` (with the counts the checker had reached in
    ``report``), so that a caller can go on with other cuts and total them."""
    from _simvfs import syscalls

    t_drain = facts.clock + DRAIN_AHEAD
    all_facts, must = facts.must()
    batch_of = {(f.queue, f.id): f.key.rsplit("/", 1)[0]
                for f in all_facts if f.kind in ("sent", "deliver") and f.key}

    def may_have_expired(queue: str, mid: str) -> bool:
        sent = facts.sent_at.get((queue, batch_of.get((queue, mid), "")))
        return sent is not None and sent + RETENTION <= t_drain

    must_seqs: Dict[str, Set[int]] = {}
    for f in must:
        if f.kind == "sent":
            must_seqs.setdefault(f.queue, set()).add(seq_of(f.id))
    drops = DropsAfterCut(must_seqs)
    gaps = journal_gaps(out_dir)
    gap_warnings = JournalGapWarnings(gaps)
    qlog_logger = logging.getLogger("qlog")
    qlog_logger.addFilter(drops)
    qlog_logger.addFilter(gap_warnings)
    error: Optional[AssertionError] = None
    try:
        with syscalls(boot_id=boot_hook):
            rep = check(out_dir, all_facts, settings=SETTINGS, must=must, clock=lambda: t_drain,
                        tolerate_damage=unsynced_damage(replay), may_have_expired=may_have_expired)
    except InvariantViolation as e:
        rep, error = e.report, e
    except AssertionError as e:     # the directory did not even open or drain
        rep, error = Report(), e
    finally:
        qlog_logger.removeFilter(gap_warnings)
        qlog_logger.removeFilter(drops)
    return CutResult(rep, drops.dropped, sum(1 for f in must if f.kind == "sent"), gaps,
                     gap_warnings.seen, error)
