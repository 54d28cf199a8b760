"""Model-based test of a queue's delivery contract.

A hypothesis state machine drives random sequences of send, send_batch (with
per-message and per-batch delays), pull, ack, retry, ack_all, retry_all,
clock advances and reopens (closing the broker, or opening a second broker on
the same directory and carrying on with it while the first stays open) against
a small in-memory model of what the queue promises.  Checkpoints come every 5
journal records, state journal segments are 4 KiB and message segments 64 KiB,
so journal truncation and segment deletion happen along the way (and a
lagging second broker can find its journal truncated under it).

The model's rules:

- a pull returns only visible messages (never one whose lease is still valid,
  never one still waiting out a delay), as many as it may: min(batch_size,
  visible); which redeliveries and which new messages fill a short batch is
  the queue's choice, but a message never delivered before is not passed over
  for a later-sent one that became visible no earlier;
- delivery n has ``attempts == n``; a lease that runs out makes the message
  visible again, and the next delivery has ``attempts + 1``;
- the failure of delivery max_retries + 1 (a retry, or the lease running out)
  moves the message to the dead-letter queue (same id, body, timestamp,
  ``attempts`` starting again at 1, ``dead_letter`` naming the origin) or
  deletes it when the queue has none;
- the first ``ack()`` / ``retry()`` on a delivered message wins; an ack from
  any delivery finishes the message, a retry from a delivery that has been
  superseded by a later one changes nothing;
- ``stats()`` counts agree with the model (``delayed``: retry delays, and
  delivery delays a pull has already passed over), through the current broker
  after every step and through the other open one now and then; so do
  ``peek()`` and the dead-letter queue's contents.

The model is written from that contract, not from qlog's internals.  Where
the contract leaves a choice to the queue (which messages fill a short batch,
when a pull gets round to dead-lettering a message whose last lease ran out),
the machine accepts any allowed choice and follows the one the queue made.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

import pytest
from conftest import BACKENDS, HandClock
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import qlog
from qlog._local import backend as _queue

QUEUE = "jobs"
DLQ = "jobs-dlq"
DEFAULT_VT = 30.0               # the queue's visibility_timeout (default)

# Whole seconds only, so that leases, delays and retries often end at the
# same instant (ties are where ordering and bookkeeping slip); None is the
# queue's default (visibility_timeout 30 s, retry_delay and delivery_delay 0).
PADS = st.sampled_from([0, 16, 8000, 24000])  # body sizes: 64 KiB segments fill within a run
DELAYS = st.sampled_from([0, None, 1, 2])
VTS = st.sampled_from([1, 2, 3, None])
WAITS = st.sampled_from([0, 1, 2, 3])
BATCH_SIZES = st.sampled_from([1, 2, 3, 100])
STEPS = st.sampled_from([1, 2, 3])


def _us(t: float) -> int:
    return int(t * 1_000_000)


def _when(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc)


@dataclass
class Msg:
    """The model of one message."""

    seq: int                  # send order
    id: str
    body: Dict[str, Any]
    sent: int                 # µs
    due: int                  # µs: visible at (new, waiting) or lease deadline (leased)
    state: str = "new"        # new (never delivered) | leased | waiting (retried) | done
    attempts: int = 0         # deliveries so far
    seen: bool = False        # new and delayed, and a pull has already passed over it


@dataclass
class Delivery:
    """One delivered Message object, as a consumer holds it."""

    msg: Msg
    attempts: int
    handle: qlog.Message
    broker: int               # which broker it came through
    settled: bool = False     # ack() or retry() already called on it


@dataclass
class DeadLetter:
    id: str
    body: Dict[str, Any]
    sent: int
    dead_at: int
    attempts: int


class QueueMachine(RuleBasedStateMachine):
    """The machine on a fresh store of backend ``backend_name`` (a key of
    conftest's BACKENDS), new for every run."""

    def __init__(self, backend_name: str) -> None:
        super().__init__()
        self.saved_checkpoint_every = qlog.Broker.checkpoint_every
        qlog.Broker.checkpoint_every = 5  # checkpoints and journal truncation every few records
        # Small state journal segments (the engine's minimum), so that the
        # truncation after a checkpoint deletes some.  No public setting for it.
        assert isinstance(_queue._JOURNAL_SEGMENT, int)
        self.saved_journal_segment = _queue._JOURNAL_SEGMENT
        _queue._JOURNAL_SEGMENT = 4096
        self.dir = tempfile.mkdtemp(prefix="qlog-model-")
        self.store = BACKENDS[backend_name](pathlib.Path(self.dir))
        # The local backend counts a delivery delay in stats().delayed once a
        # pull has passed over the message; PostgreSQL sees every row's due time.
        self.every_delay_counts = backend_name == "postgresql"
        self.clock = HandClock()
        self.brokers: List[Tuple[int, qlog.Broker]] = []  # open brokers, current last
        self.generation = 0
        self.msgs: List[Msg] = []
        self.deliveries: List[Delivery] = []
        self.batches: List[Tuple[qlog.MessageBatch, List[Delivery]]] = []
        self.acked = 0
        self.dead = 0
        self.retried = 0
        self.lease_expired = 0  # leases a pull found run out (leased again, or killed)
        self.first_deliveries = 0
        self.first_latency_us = 0
        self.dead_letters: List[DeadLetter] = []  # in the DLQ, not yet consumed there
        self.dlq_consumed = 0
        self.dlq: Optional[str] = None
        self.max_retries = 0
        self.pulls_since_open = 0

    # -- helpers -----------------------------------------------------------

    def now(self) -> int:
        return _us(self.clock.now)

    def queue_of(self, broker: qlog.Broker) -> qlog.Queue:
        return broker.queue(QUEUE, max_retries=self.max_retries, dead_letter_queue=self.dlq,
                            segment_bytes=65536)

    @property
    def q(self) -> qlog.Queue:
        return self.queue_of(self.brokers[-1][1])

    def open_broker(self) -> None:
        self.generation += 1
        self.pulls_since_open = 0
        b = self.store.make_broker(clock=self.clock, durability="none")
        self.brokers.append((self.generation, b))
        self.queue_of(b)

    def close_broker(self, index: int) -> None:
        gen, b = self.brokers.pop(index)
        b.close()
        # Its Message objects are gone with it; their leases run out in the queue.
        self.deliveries = [d for d in self.deliveries if d.broker != gen]
        self.batches = [(bt, ds) for bt, ds in self.batches if not ds or ds[0].broker != gen]

    def visible(self, m: Msg, now: int) -> bool:
        if m.state in ("new", "waiting"):
            return m.due <= now
        return m.state == "leased" and m.due <= now and m.attempts <= self.max_retries

    def doomed(self, m: Msg, now: int) -> bool:
        """Its last allowed lease ran out: a pull will dead-letter (or delete) it."""
        return m.state == "leased" and m.due <= now and m.attempts > self.max_retries

    def kill(self, m: Msg, now: int) -> None:
        """The failure of delivery max_retries + 1."""
        m.state = "done"
        self.dead += 1
        if self.dlq is not None:
            self.dead_letters.append(DeadLetter(m.id, m.body, m.sent, now, m.attempts))

    def settle_ack(self, d: Delivery) -> None:
        if d.settled:
            return  # first call wins
        d.settled = True
        if d.msg.state != "done":
            d.msg.state = "done"
            self.acked += 1

    def settle_retry(self, d: Delivery, delay: Optional[float], now: int) -> None:
        if d.settled:
            return  # first call wins
        d.settled = True
        m = d.msg
        if m.state == "done" or m.attempts != d.attempts:
            return  # finished, or delivered again since: this delivery has no say
        if d.attempts > self.max_retries:
            self.kill(m, now)
        else:
            self.retried += 1
            m.state = "waiting"
            m.due = now + _us(delay or 0)

    def record_send(self, mid: str, body: Dict[str, Any], sent: int, delay: float) -> None:
        self.msgs.append(Msg(seq=len(self.msgs), id=mid, body=body, sent=sent, due=sent + _us(delay)))

    def pick(self, items: List[Any], back: int) -> Any:
        return items[-1 - min(back, len(items) - 1)]

    def pick_delivery(self, back: int, settled_too: bool) -> Delivery:
        """A delivery counted back from the newest; mostly one not yet
        settled (a settled one tests that the first call wins)."""
        pool = [d for d in self.deliveries if not d.settled]
        return self.pick(pool if pool and not settled_too else self.deliveries, back)

    def body(self, pad: int) -> Dict[str, Any]:
        return {"n": len(self.msgs), "pad": "x" * pad}

    # -- setup -------------------------------------------------------------

    @initialize(use_dlq=st.booleans(), max_retries=st.sampled_from([0, 1, 2]), backlog=st.integers(0, 8))
    def start(self, use_dlq: bool, max_retries: int, backlog: int) -> None:
        self.dlq = DLQ if use_dlq else None
        self.max_retries = max_retries
        self.open_broker()
        if backlog:
            self.send([(16, "plain")] * backlog, None)

    def teardown(self) -> None:
        try:
            self.store.close()  # every broker still open
        finally:
            qlog.Broker.checkpoint_every = self.saved_checkpoint_every
            _queue._JOURNAL_SEGMENT = self.saved_journal_segment
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- producing ---------------------------------------------------------

    @rule(
        items=st.lists(st.tuples(PADS, st.sampled_from(["plain", None, 0, 1, 2])), min_size=1, max_size=4),
        delay=DELAYS,
    )
    def send(self, items: List[Tuple[int, Any]], delay: Optional[float]) -> None:
        """One plain message: send(); otherwise send_batch() of plain bodies
        (the batch's delay) and MessageSendRequests (their own delay, or the
        batch's when None)."""
        reqs: List[Any] = []
        bodies = []
        delays = []
        for i, (pad, own) in enumerate(items):
            body = {"n": len(self.msgs) + i, "pad": "x" * pad}
            bodies.append(body)
            if own == "plain":
                reqs.append(body)
                delays.append(delay or 0)
            else:
                reqs.append(qlog.MessageSendRequest(body, delay_seconds=own))
                delays.append((delay or 0) if own is None else own)
        if len(items) == 1 and items[0][1] == "plain":
            ids = [self.q.send(bodies[0], delay_seconds=delay)]
        else:
            ids = self.q.send_batch(reqs, delay_seconds=delay)
        assert len(ids) == len(items)
        for mid, body, dl in zip(ids, bodies, delays):
            self.record_send(mid, body, self.now(), dl)

    # -- consuming ---------------------------------------------------------

    @rule(wait=WAITS, n=BATCH_SIZES, vt=VTS,
          then=st.lists(st.sampled_from(["ack", "retry", "leave"]), min_size=1, max_size=4), delay=DELAYS)
    def pull(self, wait: float, n: int, vt: Optional[float], then: List[str], delay: Optional[float]) -> None:
        """A consumer that settles at once: after ``wait`` seconds, pull a
        batch, then ack, retry or leave each of its first messages; the rest
        are left to their leases."""
        self.pull_batch(wait, n, vt, then, delay)

    @rule(wait=WAITS, n=BATCH_SIZES, vt=VTS)
    def poll(self, wait: float, n: int, vt: Optional[float]) -> None:
        """A consumer that settles later (see ``settle``) or never: after
        ``wait`` seconds, pull a batch and leave it to its leases."""
        self.pull_batch(wait, n, vt, [], None)

    def pull_batch(self, wait: float, n: int, vt: Optional[float], then: List[str],
                   delay: Optional[float]) -> None:
        self.clock.advance(wait)
        self.pulls_since_open += 1
        now = self.now()
        visible = [m for m in self.msgs if self.visible(m, now)]
        doomed = [m for m in self.msgs if self.doomed(m, now)]
        batch = self.q.pull(batch_size=n, visibility_timeout=vt)
        got = batch.messages
        ids = [h.id for h in got]
        assert len(set(ids)) == len(ids), f"one message delivered twice in one batch: {ids}"
        by_id = {m.id: m for m in visible}
        for h in got:
            assert h.id in by_id, f"pull returned {h.id} which is not visible: {self.describe(h.id, now)}"
        assert len(got) == min(n, len(visible)), (
            f"pull(batch_size={n}) returned {len(got)} messages while {len(visible)} were visible"
        )
        chosen = set(ids)
        for x in (by_id[i] for i in ids if by_id[i].state == "new"):
            for y in visible:
                if y.state == "new" and y.id not in chosen and y.seq < x.seq and y.due <= x.due:
                    raise AssertionError(
                        f"never-delivered message {y.id} (sent earlier, visible no later) was passed "
                        f"over for {x.id}"
                    )
        for h in got:
            m = by_id[h.id]
            assert h.attempts == m.attempts + 1, f"{h.id}: attempts {h.attempts}, model {m.attempts + 1}"
            assert h.body == m.body
            assert h.timestamp == _when(m.sent)
            assert h.dead_letter is None
        assert batch.queue == QUEUE

        # Which never-delivered messages the pull passed over (a delayed one
        # then counts in stats().delayed): all of them up to the last new
        # one it took, or every one when it could not fill the batch.
        fresh = [by_id[i] for i in ids if by_id[i].state == "new" and not by_id[i].seen]
        unseen = [m for m in self.msgs if m.state == "new" and not m.seen]
        if len(got) < n:
            limit = len(self.msgs)
        elif fresh:
            limit = max(m.seq for m in fresh) + 1
        else:
            limit = 0
        for m in unseen:
            if m.seq < limit:
                m.seen = True

        deadline = now + _us(DEFAULT_VT if vt is None else vt)
        gen = self.brokers[-1][0]
        ds = []
        for h in got:
            m = by_id[h.id]
            if m.state == "leased":
                self.lease_expired += 1
            if m.attempts == 0:
                self.first_deliveries += 1
                self.first_latency_us += now - m.sent
            m.attempts += 1
            m.state = "leased"
            m.due = deadline
            ds.append(Delivery(m, m.attempts, h, gen))
        self.deliveries.extend(ds)
        self.batches.append((batch, ds))

        # Doomed messages this pull dead-lettered are the ones no longer
        # listed by peek(); a pull with room for everything due takes all.
        still = {p.id for p in self.q.peek(1000)}
        for m in doomed:
            if m.id not in still:
                self.lease_expired += 1
                self.kill(m, now)
        if n >= len(visible) + len(doomed):
            left = [m.id for m in doomed if m.state != "done"]
            assert not left, f"pull(batch_size={n}) left {left} pending after their last lease ran out"

        for d, action in zip(ds, then):
            if action == "ack":
                d.handle.ack()
                self.settle_ack(d)
            elif action == "retry":
                d.handle.retry(delay_seconds=delay)
                self.settle_retry(d, delay, now)

    def describe(self, mid: str, now: int) -> str:
        for m in self.msgs:
            if m.id == mid:
                return (f"state={m.state} attempts={m.attempts} due_in={(m.due - now) / 1e6}s "
                        f"seen={m.seen}")
        return "unknown id"

    def pick_batch(self, back: int, settled_too: bool) -> Tuple[qlog.MessageBatch, List[Delivery]]:
        pool = [b for b in self.batches if not all(d.settled for d in b[1])]
        return self.pick(pool if pool and not settled_too else self.batches, back)

    @precondition(lambda self: self.deliveries)
    @rule(what=st.sampled_from(["ack", "retry", "ack_all", "retry_all"]), back=st.integers(0, 30),
          settled_too=st.booleans(), delay=DELAYS)
    def settle(self, what: str, back: int, settled_too: bool, delay: Optional[float]) -> None:
        """m.ack() / m.retry(delay) on a message delivered earlier (perhaps
        long ago: its lease may have run out, it may be delivered again), or
        batch.ack_all() / batch.retry_all(delay), which settle only the
        messages of the batch not settled yet."""
        now = self.now()
        if what in ("ack", "retry"):
            ds = [self.pick_delivery(back, settled_too)]
            if what == "ack":
                ds[0].handle.ack()
            else:
                ds[0].handle.retry(delay_seconds=delay)
        else:
            batch, ds = self.pick_batch(back, settled_too)
            if what == "ack_all":
                batch.ack_all()
            else:
                batch.retry_all(delay_seconds=delay)
        for d in ds:
            if what.startswith("ack"):
                self.settle_ack(d)
            else:
                self.settle_retry(d, delay, now)

    @rule(dt=STEPS)
    def advance_clock(self, dt: float) -> None:
        self.clock.advance(dt)

    # -- reopening ---------------------------------------------------------

    @precondition(lambda self: self.pulls_since_open >= 2)  # something to carry over
    @rule(second=st.booleans())
    def reopen(self, second: bool) -> None:
        """Close the broker and open the directory again; or open a second
        broker on it that becomes the current one while the first stays open
        (its Message objects still settle, through its own replica)."""
        if second:
            if len(self.brokers) == 2:
                self.close_broker(0)
        else:
            while self.brokers:
                self.close_broker(0)
        self.open_broker()

    # -- the dead-letter queue ---------------------------------------------

    @precondition(lambda self: self.dlq is not None and self.dead_letters)
    @rule()
    def consume_dlq(self) -> None:
        dq = self.brokers[-1][1].queue(DLQ)
        batch = dq.pull(batch_size=1000)
        self.check_dead_letter_ids(batch.messages)
        for h in batch:
            assert h.attempts == 1, f"dead letter {h.id} delivered with attempts {h.attempts}"
        self.check_dead_letters(batch.messages)
        batch.ack_all()
        self.dlq_consumed += len(self.dead_letters)
        self.dead_letters = []
        assert dq.stats().acked == self.dlq_consumed

    def check_dead_letter_ids(self, got: List[qlog.Message]) -> None:
        have = Counter(h.id for h in got)
        want = Counter(d.id for d in self.dead_letters)
        assert have == want, f"dead-letter queue holds {dict(have)}, model {dict(want)}"

    def check_dead_letters(self, got: List[qlog.Message]) -> None:
        want = {d.id: d for d in self.dead_letters}
        for h in got:
            d = want[h.id]
            assert h.body == d.body
            assert h.content_type == "json"
            assert h.timestamp == _when(d.sent)
            info = h.dead_letter
            assert info is not None
            assert info.queue == QUEUE
            assert info.attempts == d.attempts
            assert info.dead_lettered_at == _when(d.dead_at)

    # -- invariants ----------------------------------------------------------

    def check_stats(self, gen: int, broker: qlog.Broker) -> None:
        now = self.now()
        live = [m for m in self.msgs if m.state != "done"]
        want = dict(
            backlog=len(live),
            in_flight=sum(m.state == "leased" and m.due > now for m in live),
            delayed=sum(m.due > now and (m.state == "waiting" or m.state == "new"
                                          and (m.seen or self.every_delay_counts)) for m in live),
            acked=self.acked,
            dead_lettered=self.dead if self.dlq is not None else 0,
            deleted=self.dead if self.dlq is None else 0,
            expired=0,
            purged=0,
            oldest_age=None if not live else max(0.0, (now - min(m.sent for m in live)) / 1e6),
        )
        want.update(retried=self.retried, lease_expired=self.lease_expired)
        s = self.queue_of(broker).stats()
        got = {k: getattr(s, k) for k in want}
        assert got == want, f"stats through broker {gen}: {got} != model {want}"
        assert sum(s.delivery_buckets) == self.first_deliveries
        assert s.delivery_seconds == pytest.approx(self.first_latency_us / 1e6, abs=1e-6)

    @invariant()
    def stats_match_the_model(self) -> None:
        if self.brokers:
            self.check_stats(*self.brokers[-1])

    @precondition(lambda self: len(self.brokers) == 2)
    @rule()
    def stats_through_the_other_broker(self) -> None:
        """The older broker's replica, after lagging for a while (its journal
        may have been truncated past it meanwhile), agrees too."""
        self.check_stats(*self.brokers[0])

    @invariant()
    def peek_lists_what_is_not_done(self) -> None:
        if not self.brokers:
            return
        got = [(p.id, p.attempts, p.body["n"]) for p in self.q.peek(1000)]
        want = [(m.id, m.attempts, m.body["n"]) for m in self.msgs if m.state != "done"]
        assert got == want, f"peek() lists {got}, model {want}"

    @invariant()
    def dead_letter_queue_holds_each_dead_message_once(self) -> None:
        if not self.brokers:
            return
        names = self.brokers[-1][1].queues()
        if self.dlq is None:
            assert DLQ not in names
            return
        if DLQ not in names:
            assert not self.dead_letters
            return
        got = self.brokers[-1][1].queue(DLQ).peek(1000)
        self.check_dead_letter_ids(got)
        assert all(h.attempts == 0 for h in got)
        self.check_dead_letters(got)


RANDOM_USE = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.slow
def test_delivery_contract_holds_under_random_use(backend_name: str) -> None:
    run_state_machine_as_test(lambda: QueueMachine(backend_name), settings=RANDOM_USE)


# Fixed replays of sequences the machine has found, each a failure mode of
# its own; the model judges them exactly as in a random run.

Step = Tuple[str, Dict[str, Any]]


def _replay(backend_name: str, start: Dict[str, Any], steps: List[Step]) -> None:
    """Run the machine through ``steps`` after ``start``, checking every
    invariant after each step, as a hypothesis run does."""
    m = QueueMachine(backend_name)
    try:
        for name, kwargs in [("start", start), *steps]:
            getattr(m, name)(**kwargs)
            m.stats_match_the_model()
            m.peek_lists_what_is_not_done()
            m.dead_letter_queue_holds_each_dead_message_once()
    finally:
        m.teardown()


def test_dead_lettered_candidate_takes_no_room_from_a_due_redelivery(backend_name: str) -> None:
    # a's last lease and b's first run out together: pull(1) deletes a and
    # must still deliver b (again), not return an empty batch.
    _replay(backend_name, dict(use_dlq=False, max_retries=1, backlog=0), [
        ("send", dict(items=[(0, "plain")], delay=None)),
        ("pull", dict(wait=0, n=1, vt=1, then=["retry"], delay=0)),
        ("send", dict(items=[(0, "plain")], delay=None)),
        ("poll", dict(wait=0, n=1, vt=1)),   # a, attempt 2: the last
        ("poll", dict(wait=0, n=1, vt=1)),   # b, attempt 1
        ("poll", dict(wait=1, n=1, vt=1)),
    ])


def test_dead_lettered_candidate_does_not_let_a_later_message_jump_the_queue(backend_name: str) -> None:
    # d's lease runs out as delayed a becomes visible; c, sent after a, is
    # visible as early: pull(1) deletes d and delivers a, not c.
    _replay(backend_name, dict(use_dlq=False, max_retries=0, backlog=1), [
        ("poll", dict(wait=0, n=1, vt=1)),                            # d
        ("send", dict(items=[(0, "plain")], delay=2)),                # a, visible at +2
        ("poll", dict(wait=0, n=1, vt=1)),                            # nothing yet
        ("reopen", dict(second=False)),
        ("advance_clock", dict(dt=2)),
        ("send", dict(items=[(0, "plain")], delay=None)),             # c
        ("poll", dict(wait=0, n=1, vt=1)),
    ])


def test_lease_ending_with_an_earlier_cut_short_lease_delivers_the_message_once(backend_name: str) -> None:
    # Leased until +3, retried at once, leased again at +1 for 2 s: both
    # leases end at +3, and the next pull must hold the message once.
    _replay(backend_name, dict(use_dlq=False, max_retries=2, backlog=1), [
        ("pull", dict(wait=0, n=1, vt=3, then=["retry"], delay=0)),
        ("poll", dict(wait=1, n=1, vt=2)),
        ("poll", dict(wait=2, n=2, vt=1)),
    ])


def test_last_lease_ending_with_an_earlier_cut_short_lease_dead_letters_once(backend_name: str) -> None:
    _replay(backend_name, dict(use_dlq=True, max_retries=1, backlog=1), [
        ("pull", dict(wait=0, n=1, vt=2, then=["retry"], delay=0)),
        ("poll", dict(wait=1, n=1, vt=1)),   # attempt 2, the last, until +2
        ("poll", dict(wait=1, n=2, vt=1)),
        ("consume_dlq", dict()),
    ])
