"""A whole-queue workload recorded for power cuts, and what each cut must keep.

``workload`` runs in a child interpreter on an empty directory: producers
(``send`` and ``send_batch``) on queues with durability "sync", "none" and
"interval", a pull consumer (pull, ack, retry with a delay, ack_all) and a
push consumer (``broker.run`` in a thread) whose handler fails some messages
until they reach a dead-letter queue; short retention, small segments and
frequent checkpoints, so that message and journal segments are deleted as it
goes; a hand-moved clock, so nothing waits for real time.  Every durable
write, whether the engine makes it (the syscall table) or Python code does
(``os`` inside ``qlog._state`` and ``qlog._queue`` is replaced by a recording
proxy), goes into one trace (``_powertrace``) together with markers of what
the workload did and was told:

    ("t", clock)                      the clock moved
    ("s<", queue, keys)               a send is about to start
    ("s>", queue, keys, ids)          that send returned
    ("p>", queue, [(id, key, attempts)])   a pull returned these
    ("a<", queue, ids) / ("a>", ...)  an ack (or ack_all) starts / returned
    ("r<", queue, ids) / ("r>", ...)  a retry starts / returned
    ("h", queue, id, key, attempts, fail)  the push handler got the message
                                      and is about to ack it (or retry it: fail)

``Facts`` folds the markers of a trace prefix (what the workload knew at a
cut) and the durable journal records (what the disk held at the cut) into the
expectations a reopened queue must meet (``check_after_cut``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import qlog
import qlog._queue
import qlog._state

SYNC_QUEUES = ("orders", "work")
QUEUES = ("orders", "fast", "ticks", "work", "work-dlq")
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
    if name == "work-dlq":
        return base  # default retention: dead letters stay
    base["message_retention"] = RETENTION
    if name == "fast":
        base["durability"] = "none"
    elif name == "ticks":
        base["durability"] = "interval"
    elif name == "work":
        base.update(max_retries=MAX_RETRIES_PUSH, dead_letter_queue="work-dlq", retry_delay=1.0,
                    max_batch_size=4, max_batch_timeout=0.0)
    else:
        base["max_retries"] = 100
    return base


def small_state(set_attr) -> None:
    """Checkpoint every CHECKPOINT_EVERY journal records, journal in
    JOURNAL_SEGMENT-byte segments (``set_attr``: setattr or monkeypatch's)."""
    assert hasattr(qlog._queue, "_JOURNAL_SEGMENT"), "the state journal's segment size moved"
    set_attr(qlog.Broker, "checkpoint_every", CHECKPOINT_EVERY)
    set_attr(qlog._queue, "_JOURNAL_SEGMENT", JOURNAL_SEGMENT)


def body_for(key: str, batch: str, i: int, n: int, fail: bool = False) -> Dict[str, Any]:
    """A message body that checks itself: ``x`` is a function of ``k``."""
    h = hashlib.sha1(key.encode()).hexdigest()
    return {"k": key, "b": batch, "i": i, "n": n, "fail": fail, "x": (h * 40)[: int(h[:2], 16) * 6]}


def body_ok(body: Any) -> bool:
    try:
        return body == body_for(body["k"], body["b"], body["i"], body["n"], body["fail"])
    except (TypeError, KeyError):
        return False


# ---- the child -------------------------------------------------------------------


def workload(path: str, trace: str, seed: int, steps: int) -> None:
    """Child main: run the workload on ``path`` (empty), then write the trace."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _powertrace import TraceRecorder
    from _simvfs import syscalls

    rng = random.Random(seed)
    small_state(setattr)
    rec = TraceRecorder(path)
    proxy = rec.os_proxy()
    qlog._state.os = proxy
    qlog._queue.os = proxy
    mark = rec.mark
    now = [1_000_000.0]
    mark(("t", now[0]))

    with syscalls(fatal=True, **rec.engine_hooks()):
        broker = qlog.open(path, clock=lambda: now[0])
        qs = {name: broker.queue(name, **settings(name)) for name in QUEUES}

        @broker.consumer("work", **settings("work"))
        def handle(batch) -> None:
            for m in batch:
                b = m.body
                mark(("h", "work", m.id, b["k"], m.attempts, b["fail"]))
                if b["fail"]:
                    m.retry()
                else:
                    m.ack()

        runner = threading.Thread(target=broker.run, kwargs=dict(handle_signals=False,
                                                                 shutdown_timeout=30.0))
        runner.start()
        counters = {name: 0 for name in QUEUES}

        def send(name: str, n: int, fail_share: float = 0.0) -> None:
            q = qs[name]
            c = counters[name]
            counters[name] += n
            keys = [f"{name}:{c + i}" for i in range(n)]
            bodies = [body_for(k, keys[0], i, n, rng.random() < fail_share) for i, k in enumerate(keys)]
            mark(("s<", name, keys))
            ids = [q.send(bodies[0])] if n == 1 and rng.random() < 0.7 else q.send_batch(bodies)
            mark(("s>", name, keys, ids))

        def consume(name: str) -> None:
            q = qs[name]
            batch = q.pull(batch_size=rng.randint(1, 10))
            if not batch:
                return
            mark(("p>", name, [(m.id, m.body["k"], m.attempts) for m in batch]))
            left = []
            for m in batch:
                x = rng.random()
                if x < 0.6:
                    mark(("a<", name, [m.id]))
                    m.ack()
                    mark(("a>", name, [m.id]))
                elif x < 0.75:
                    mark(("r<", name, [m.id]))
                    m.retry(delay_seconds=rng.choice([0, 0, 1, 5]))
                    mark(("r>", name, [m.id]))
                else:
                    left.append(m)
            if left and rng.random() < 0.3:
                ids = [m.id for m in left]
                mark(("a<", name, ids))
                batch.ack_all()
                mark(("a>", name, ids))

        for step in range(steps):
            now[0] += rng.uniform(0.1, 1.6)
            mark(("t", now[0]))
            x = rng.random()
            if x < 0.3:
                send("orders", rng.choice([1, 1, rng.randint(2, 12)]))
            elif x < 0.4:
                send(rng.choice(["fast", "ticks"]), rng.choice([1, rng.randint(2, 30)]))
            elif x < 0.52:
                send("work", rng.choice([1, rng.randint(2, 6)]), fail_share=0.3)
            elif x < 0.9:
                consume(rng.choice(["orders", "orders", "fast", "ticks"]))
        broker.stop()
        runner.join(60)
        assert not runner.is_alive(), "the push consumer did not stop"
        broker.close()
    rec.dump(trace)
    os.write(1, b"done %d %d\n" % (len(rec.events), rec.looks))


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
        self.begun: Dict[str, Tuple[str, float]] = {}        # key -> (queue, clock at send)
        self.sent: Dict[str, str] = {}                       # key -> id (send returned)
        self.queue_of: Dict[str, str] = {}
        self.batches: Dict[str, List[str]] = {}              # first key -> keys
        self.delivered: Dict[str, int] = {}                  # id -> highest attempts seen
        self.seen_keys: Set[str] = set()                     # keys of every message delivered
        self.ack_begun: Set[str] = set()
        self.acked: Set[str] = set()                         # ack returned
        self.failed_last: Set[str] = set()                   # handler failed its last attempt
        # durable journal records, per queue: acked seqs, highest attempts leased
        self.durable_acked: Dict[str, Set[int]] = {q: set() for q in QUEUES}
        self.durable_att: Dict[str, Dict[int, int]] = {q: {} for q in QUEUES}

    def on_mark(self, fact: tuple) -> None:
        kind = fact[0]
        if kind == "t":
            self.clock = fact[1]
        elif kind == "s<":
            _, q, keys = fact
            for k in keys:
                self.begun[k] = (q, self.clock)
            self.batches[keys[0]] = list(keys)
        elif kind == "s>":
            _, q, keys, ids = fact
            for k, i in zip(keys, ids):
                self.sent[k] = i
        elif kind == "p>":
            for mid, k, att in fact[2]:
                self.delivered[mid] = max(att, self.delivered.get(mid, 0))
                self.seen_keys.add(k)
        elif kind == "a<":
            self.ack_begun.update(fact[2])
        elif kind == "a>":
            self.acked.update(fact[2])
        elif kind == "h":
            _, q, mid, k, att, fail = fact
            self.delivered[mid] = max(att, self.delivered.get(mid, 0))
            self.seen_keys.add(k)
            if not fail:
                self.ack_begun.add(mid)
            elif att >= MAX_RETRIES_PUSH + 1:
                self.failed_last.add(mid)

    def on_durable(self, rel: str, data: bytes, ident: int, replay) -> None:
        """A file's image became durable: note the journal records it holds
        (when the file is durably named, they survive any cut from now on)."""
        parts = rel.split("/")
        if len(parts) != 4 or parts[0] != "queues" or parts[2] != "state" or not parts[3].endswith(".seg"):
            return
        if not replay.durably_named(ident):
            return
        from qlog import _pure

        q = parts[1]
        acked, att = self.durable_acked[q], self.durable_att[q]
        for r in _pure.iter_segment(data):
            tag, sc, ar = qlog._state.decode(r.payload)
            if tag == b"A":
                acked.update(ar[0])
            elif tag == b"P":
                for s in ar[0]:
                    att[s] = max(att.get(s, 0), 1)
                for s, a in zip(ar[2], ar[3]):
                    att[s] = max(att.get(s, 0), a)


class CutResult:
    def __init__(self) -> None:
        self.checked = 0        # messages whose fate was checked
        self.lost: List[str] = []
        self.corrupt: List[str] = []
        self.duplicates = 0
        self.problems: List[str] = []


def drain(broker, name: str) -> List[Tuple[str, Any, int, Optional[str]]]:
    """Every message the queue delivers now: ``(id, body or None when it does
    not decode, attempts, the queue a dead letter failed on)``; all acked.
    A dead letter's id is the id it had in that queue."""
    q = broker.queue(name, **settings(name))
    out = []
    while True:
        batch = q.pull(batch_size=1000)
        if not batch:
            return out
        for m in batch:
            try:
                body = m.body
            except Exception:
                body = None
            dl = m.dead_letter
            out.append((m.id, body, m.attempts, None if dl is None else dl.queue))
        batch.ack_all()


def check_after_cut(out_dir: str, facts: Facts, boot_hook) -> CutResult:
    """Reopen the directory a cut left (as after a reboot), drain every
    queue, and compare with what had to survive."""
    from _simvfs import syscalls

    res = CutResult()
    t_drain = facts.clock + DRAIN_AHEAD
    clock = [t_drain]
    got: Dict[str, List[Tuple[str, Any, int, Optional[str]]]] = {}
    with syscalls(boot_id=boot_hook):
        with qlog.open(out_dir, clock=lambda: clock[0]) as broker:
            for name in QUEUES:   # all first: a dead-letter transfer opens its queue too
                broker.queue(name, **settings(name))
            for name in QUEUES:
                got[name] = drain(broker, name)
            # the queues work after the cut
            for name in QUEUES:
                q = broker.queue(name, **settings(name))
                mid = q.send({"after": name})
                b = q.pull(batch_size=10)
                ids = [m.id for m in b]
                if ids != [mid]:
                    res.problems.append(f"queue {name}: after the cut, a new message {mid} came back as {ids}")
                b.ack_all()

    # what came back
    where: Dict[str, List[Tuple[str, str, int]]] = {}     # key -> [(queue, id, attempts)]
    for name, msgs in got.items():
        for mid, body, att, origin in msgs:
            if not body_ok(body):
                res.corrupt.append(f"{name} {mid}: {str(body)[:80]}")
                continue
            k = body["k"]
            if k not in facts.begun:
                res.corrupt.append(f"{name} {mid}: key {k} was never sent")
                continue
            home = facts.begun[k][0]
            if name == "work-dlq":
                if home != "work" or not body["fail"]:
                    res.problems.append(f"{k} ({mid}) is in the dead-letter queue but never failed")
                sent_id = facts.sent.get(k)
                if origin != "work" or (sent_id is not None and mid != sent_id):
                    res.problems.append(f"dead letter {k} says it was {mid} of {origin!r}, "
                                        f"send returned {sent_id} on 'work'")
            elif home != name:
                res.corrupt.append(f"{name} {mid}: key {k} was sent to {home}")
                continue
            else:
                sent_id = facts.sent.get(k)
                if sent_id is not None and sent_id != mid:
                    res.problems.append(f"{k}: send returned {sent_id}, delivered as {mid}")
                s = seq_of(mid)
                if s in facts.durable_acked[name]:
                    res.problems.append(f"{name} {mid} ({k}): its ack was durable, yet it came back")
                floor = facts.durable_att[name].get(s, 0)
                if att <= floor:
                    res.problems.append(
                        f"{name} {mid} ({k}): delivered with attempts {att} after a durable lease of attempt {floor}")
                if mid in facts.ack_begun:
                    res.duplicates += 1
            where.setdefault(k, []).append((name, mid, att))

    for k, copies in where.items():
        homes = [c for c in copies if c[0] != "work-dlq"]
        if len(homes) > 1:
            res.problems.append(f"{k} delivered {len(homes)} times after the cut: {homes}")
        if len(copies) > len(homes) and homes:
            res.duplicates += 1   # in the dead-letter queue and still pending: a transfer cut short
        if len(copies) - len(homes) > 1:
            res.duplicates += len(copies) - len(homes) - 1

    # every message whose sync send returned is there, or was settled
    for k, mid in facts.sent.items():
        q, t_sent = facts.begun[k]
        if q not in SYNC_QUEUES:
            continue
        res.checked += 1
        if k in where or mid in facts.ack_begun:
            continue
        if t_sent + RETENTION <= t_drain:
            continue   # may have expired
        if mid in facts.failed_last:
            res.lost.append(f"{q} {mid} ({k}): dead-lettered before the cut, in neither queue after it")
        else:
            res.lost.append(f"{q} {mid} ({k}): send returned before the cut, not there after it")

    # a batch nobody had been given before the cut (records are visible to
    # consumers before their send returns) is all there or all gone
    for first, keys in facts.batches.items():
        if len(keys) < 2 or any(k in facts.seen_keys for k in keys):
            continue
        there = sum(1 for k in keys if k in where)
        if there not in (0, len(keys)):
            res.problems.append(f"batch {first} of {len(keys)}: {there} there after the cut")
    return res
