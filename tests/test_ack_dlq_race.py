"""A late ack (or a final retry) racing a pull that dead-letters the same message.

Message M is leased on its final delivery (attempts = max_retries + 1) and
its lease runs out.  A pull (holding the queue's lock) finds M due with no
retries left: it copies M into the dead-letter queue, durably, then appends
a pull record naming M in its ``dead`` array.  Meanwhile the consumer that
held M acks it, appending an ack record without the lock, or retries it,
which for a final delivery dead-letters under the lock.

Every replica applies the journal in order, so whichever record comes first
decides M's fate.  The rule these tests hold the queue to:

- no loss: M ends acked, or dead-lettered with a copy in the DLQ;
- M is never delivered again from its own queue;
- the DLQ holds exactly as many copies as the queue counts dead-lettered
  (an extra copy is documented only for a crash between the DLQ write and
  the journal record); acked + dead_lettered = 1;
- a dead-lettering claims the message (a K record) before it writes the
  DLQ copy: an ack recorded before the claim wins (no copy), one recorded
  after it does nothing (the copy is counted dead-lettered);
- two brokers on the directory, a fresh opener, and a reopen agree.

Interleavings are forced, not hoped for: time is a hand clock passed to
``qlog.open(clock=...)``, and where a step must land inside another one's
critical section (between a pull's DLQ write and its journal record) the
puller's state-journal ``append`` is wrapped on that one Queue instance, as
test_queue.py's interleaving tests do; nothing else runs in between.  One
test sends the ack from a separate process, to show that the window is
open across processes (acks do not take the queue's lock).
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import pytest
from conftest import T0, HandClock, drain

import qlog

# Where the ack lands in a dead-lettering (the K claim record, the DLQ
# copy, then the record that moves the message): before the claim (the ack
# wins: acked, no copy), or after the copy, before the moving record (the
# claim wins: the ack does nothing, one copy).  (skip, DLQ at that point,
# (acked, dead_lettered)).
WHERE = {"before-the-claim": (0, False, (1, 0)), "after-the-dlq-write": (1, True, (0, 1))}
from qlog._local.backend import _FileLock

QUEUE = "jobs"
DLQ = "jobs-dlq"
LEASE = 1.0


# Forcing an interleaving wraps the local backend's state-journal append (or
# its lock); the tests that do so run on the local backends only.
HOOKED = pytest.mark.local_only("forces the interleaving through the local backend's journal append or lock")


@pytest.fixture
def two(make_broker, clock) -> Tuple[qlog.Broker, qlog.Broker]:
    """Two brokers on one store: two replicas of every queue's state."""
    return make_broker(clock=clock), make_broker(clock=clock)


def settings(max_retries: int, dlq: bool = True) -> dict:
    s = {"max_retries": max_retries}
    if dlq:
        s["dead_letter_queue"] = DLQ
    return s


def counts(s: qlog.QueueStats) -> Tuple[int, int, int, int, int]:
    return (s.acked, s.dead_lettered, s.deleted, s.backlog, s.in_flight)


def lease_final_delivery(qa: qlog.Queue, qb: qlog.Queue, clock: HandClock, max_retries: int):
    """Send M and deliver it max_retries + 1 times, letting each lease run
    out; the deliveries alternate between the two queues' consumers and the
    last one (the final one) is ``qa``'s.  Returns (id, deliveries); M's
    final lease has run out when this returns."""
    mid = qa.send({"job": "M"})
    deliveries = []
    for i in range(max_retries + 1):
        puller = qa if (max_retries - i) % 2 == 0 else qb
        (m,) = puller.pull(batch_size=1, visibility_timeout=LEASE).messages
        assert (m.id, m.attempts) == (mid, i + 1)
        deliveries.append(m)
        clock.advance(LEASE + 1)  # this lease runs out
    return mid, deliveries


def wrap_next_append(q: qlog.Queue, before: Callable[[], None], skip: int = 0) -> List[bool]:
    """Make ``q``'s next state-journal append (after ``skip`` others) run
    ``before()`` first (then append as usual); returns a flag list that gets
    True when it ran."""
    real = q._b._journal.append
    ran: List[bool] = []
    left = [skip]

    def append(record: bytes) -> int:
        if left[0]:
            left[0] -= 1
            return real(record)
        q._b._journal.append = real
        before()
        ran.append(True)
        return real(record)

    q._b._journal.append = append
    return ran


def dlq_ids(broker: qlog.Broker) -> List[str]:
    """Ids of the messages waiting in the DLQ (peek: nothing is leased)."""
    return [m.id for m in broker.queue(DLQ).peek(100)]


def fresh_stats(make_broker, clock, s: dict) -> qlog.QueueStats:
    """The queue's stats as a broker opened now replays them."""
    c = make_broker(clock=clock)
    try:
        return c.queue(QUEUE, **s).stats()
    finally:
        c.close()


def assert_settled(make_broker, clock, s, queues, mid) -> Tuple[Tuple[int, ...], List[qlog.Message]]:
    """Check what holds in every interleaving, and return the agreed counts
    and the DLQ's contents (drained after a reopen):

    replicas agree (every open queue, a fresh opener), M is not in flight
    nor waiting, it is never delivered again from its own queue, and a
    reopen (replaying from the checkpoint written at close) agrees too."""
    seen = [counts(q.stats()) for q in queues] + [counts(fresh_stats(make_broker, clock, s))]
    assert all(c == seen[0] for c in seen), f"replicas disagree: {seen}"
    acked, dead, deleted, backlog, in_flight = seen[0]
    assert (backlog, in_flight) == (0, 0), seen[0]
    clock.advance(3600)  # any lease or retry delay still around has run out
    for q in queues:
        assert q.pull(batch_size=100).messages == (), "M came back from its own queue"
    for q in queues:
        q._broker.close()
    r = make_broker(clock=clock)
    try:
        q = r.queue(QUEUE, **s)
        assert counts(q.stats()) == seen[0], "a reopen disagrees with the replicas"
        assert drain(q) == [], "M came back from its own queue after a reopen"
        in_dlq = drain(r.queue(DLQ)) if s.get("dead_letter_queue") else []
    finally:
        r.close()
    for m in in_dlq:
        assert m.id == mid and m.dead_letter is not None and m.dead_letter.queue == QUEUE
    return seen[0], in_dlq


def assert_outcome(make_broker, clock, s, queues, mid, outcome: Tuple[int, int]) -> None:
    """:func:`assert_settled`, then: the counts are ``outcome`` (acked,
    dead-lettered; none deleted), and the DLQ holds exactly one copy per
    message counted dead-lettered."""
    (acked, dead, deleted, _, _), in_dlq = assert_settled(make_broker, clock, s, queues, mid)
    assert (acked, dead, deleted) == (*outcome, 0)
    assert len(in_dlq) == dead, (
        f"the DLQ holds {len(in_dlq)} copy(ies) of M but the queue counts {dead} dead-lettered "
        f"(acked={acked}): a DLQ copy of an acked message, with no crash between the DLQ write "
        "and the journal record")


# ---- a late ack against a pull that dead-letters ---------------------------


def test_late_ack_after_pull_dead_letters_keeps_one_dlq_copy(two, make_broker, clock):
    """Journal order P(dead M), A(M): the pull wins; the late ack is a no-op."""
    a, b = two
    s = settings(max_retries=1)
    qa, qb = a.queue(QUEUE, **s), b.queue(QUEUE, **s)
    mid, deliveries = lease_final_delivery(qa, qb, clock, 1)
    final = deliveries[-1]
    assert final.attempts == 2
    assert qb.pull().messages == ()      # M is due with no retries left: dead-lettered
    assert dlq_ids(a) == dlq_ids(b) == [mid]
    final.ack()                          # the late ack, after the pull record
    (acked, dead, deleted, _, _), in_dlq = assert_settled(make_broker, clock, s, [qa, qb], mid)
    assert (acked, dead, deleted) == (0, 1, 0)
    assert [(m.id, m.dead_letter.attempts, m.attempts) for m in in_dlq] == [(mid, 2, 1)]


@pytest.mark.parametrize("where", sorted(WHERE))
@HOOKED
def test_ack_landing_inside_a_pulls_dead_lettering_leaves_no_unaccounted_dlq_copy(
        two, make_broker, clock, where):
    """The pull read M as due with no retries left; a lock-free ack of M's
    final delivery lands before the pull's claim, or after its DLQ write and
    before its record.  Either the ack wins (acked, no copy) or the claim
    does (dead-lettered, one copy): never a DLQ copy of a message counted
    acked (found with the claim missing: acked 1, dead-lettered 0, a copy)."""
    skip, copied, outcome = WHERE[where]
    a, b = two
    s = settings(max_retries=1)
    qa, qb = a.queue(QUEUE, **s), b.queue(QUEUE, **s)
    mid, deliveries = lease_final_delivery(qa, qb, clock, 1)
    final = deliveries[-1]
    at_hook: List[List[str]] = []

    def ack_now() -> None:
        at_hook.append(dlq_ids(a))
        final.ack()

    ran = wrap_next_append(qb, ack_now, skip)
    assert qb.pull().messages == ()
    assert ran == [True] and at_hook == [[mid] if copied else []], "the interleaving was not the one forced"
    assert_outcome(make_broker, clock, s, [qa, qb], mid, outcome)


@pytest.mark.parametrize("where", sorted(WHERE))
@HOOKED
def test_ack_from_another_process_inside_a_pulls_dead_lettering_leaves_no_unaccounted_dlq_copy(
        backend, make_broker, clock, spawn_python, where):
    """The same interleavings with the consumer in a separate process: its
    ack is not held back by the pulling process's lock."""
    skip, copied, outcome = WHERE[where]
    s = settings(max_retries=0)
    b = make_broker(clock=clock)
    qb = b.queue(QUEUE, **s)
    mid = qb.send({"job": "M"})
    child = spawn_python(CONSUMER, [backend.target, T0])
    line = child.stdout.readline().split()
    assert line == ["held", mid, "1"], (line, child.stderr.read() if child.poll() is not None else "")
    clock.advance(LEASE + 1)             # the child's (final) lease runs out
    at_hook: List[List[str]] = []

    def child_acks() -> None:
        at_hook.append(dlq_ids(b))
        child.stdin.write("ack\n")
        child.stdin.flush()
        reply = child.stdout.readline().strip()
        assert reply == "acked", (reply, child.stderr.read())

    ran = wrap_next_append(qb, child_acks, skip)
    assert qb.pull().messages == ()
    assert child.wait(timeout=60) == 0, child.stderr.read()
    assert ran == [True] and at_hook == [[mid] if copied else []], "the interleaving was not the one forced"
    assert_outcome(make_broker, clock, s, [qb], mid, outcome)


CONSUMER = """
import sys, qlog
path, t0 = sys.argv[1], float(sys.argv[2])
b = qlog.open(path, clock=lambda: t0)
q = b.queue("jobs", max_retries=0, dead_letter_queue="jobs-dlq")
(m,) = q.pull(batch_size=1, visibility_timeout=1.0).messages
print("held", m.id, m.attempts, flush=True)
assert sys.stdin.readline() == "ack\\n"
m.ack()
print("acked", flush=True)
b.close()
"""


@HOOKED
def test_ack_landing_between_a_pulls_read_and_its_record_wins_when_there_is_no_dlq(
        two, make_broker, clock):
    """Without a DLQ the pull writes no copy before its record, and an ack
    landing in the same place simply wins: acked, not deleted."""
    a, b = two
    s = settings(max_retries=1, dlq=False)
    qa, qb = a.queue(QUEUE, **s), b.queue(QUEUE, **s)
    mid, deliveries = lease_final_delivery(qa, qb, clock, 1)
    ran = wrap_next_append(qb, deliveries[-1].ack)
    assert qb.pull().messages == ()
    assert ran == [True]
    (acked, dead, deleted, _, _), _ = assert_settled(make_broker, clock, s, [qa, qb], mid)
    assert (acked, dead, deleted) == (1, 0, 0)


# ---- a final retry against a pull that dead-letters -------------------------


def test_final_retry_after_the_pull_dead_lettered_adds_no_second_dlq_copy(two, make_broker, clock):
    a, b = two
    s = settings(max_retries=1)
    qa, qb = a.queue(QUEUE, **s), b.queue(QUEUE, **s)
    mid, deliveries = lease_final_delivery(qa, qb, clock, 1)
    assert qb.pull().messages == ()      # dead-letters M
    deliveries[-1].retry()               # the final retry, late: finds M gone
    (acked, dead, deleted, _, _), in_dlq = assert_settled(make_broker, clock, s, [qa, qb], mid)
    assert (acked, dead, deleted) == (0, 1, 0)
    assert [m.id for m in in_dlq] == [mid]


def test_final_retry_before_the_pull_dead_letters_once(two, make_broker, clock):
    a, b = two
    s = settings(max_retries=1)
    qa, qb = a.queue(QUEUE, **s), b.queue(QUEUE, **s)
    mid, deliveries = lease_final_delivery(qa, qb, clock, 1)
    deliveries[-1].retry()               # lease ran out, but no pull took M yet: this dead-letters it
    assert dlq_ids(b) == [mid]
    assert qb.pull().messages == ()      # finds M gone: no second copy
    (acked, dead, deleted, _, _), in_dlq = assert_settled(make_broker, clock, s, [qa, qb], mid)
    assert (acked, dead, deleted) == (0, 1, 0)
    assert [m.id for m in in_dlq] == [mid]


@HOOKED
def test_pull_dead_lettering_while_a_final_retry_waits_for_the_lock_leaves_one_dlq_copy(
        two, make_broker, clock):
    """The final retry has checked its replica (M still leased to it) and is
    about to take the queue's lock when the other broker's pull runs whole
    and dead-letters M; under the lock the retry catches up, finds M gone and
    writes nothing."""
    a, b = two
    s = settings(max_retries=1)
    qa, qb = a.queue(QUEUE, **s), b.queue(QUEUE, **s)
    mid, deliveries = lease_final_delivery(qa, qb, clock, 1)
    real_locked = qa._b._locked
    ran: List[int] = []

    def locked_after_bs_pull():
        qa._b._locked = real_locked
        ran.append(len(qb.pull().messages))
        return real_locked()

    qa._b._locked = locked_after_bs_pull
    deliveries[-1].retry()
    assert ran == [0], "the pull did not run inside the retry"
    (acked, dead, deleted, _, _), in_dlq = assert_settled(make_broker, clock, s, [qa, qb], mid)
    assert (acked, dead, deleted) == (0, 1, 0)
    assert [m.id for m in in_dlq] == [mid]


@pytest.mark.parametrize("where", sorted(WHERE))
@HOOKED
def test_late_ack_of_an_earlier_delivery_inside_a_final_retrys_dead_lettering_leaves_no_unaccounted_dlq_copy(
        two, make_broker, clock, where):
    """The final retry's dead-lettering has the same windows: a lock-free
    ack of M (here by the consumer of M's first delivery, whose lease ran
    out long ago) lands before the retry's claim, or after its DLQ write and
    before its D record."""
    skip, copied, outcome = WHERE[where]
    a, b = two
    s = settings(max_retries=1)
    qa, qb = a.queue(QUEUE, **s), b.queue(QUEUE, **s)
    mid, (first, final) = lease_final_delivery(qa, qb, clock, 1)
    assert (first.attempts, final.attempts, first._q is qb, final._q is qa) == (1, 2, True, True)
    at_hook: List[List[str]] = []

    def first_acks() -> None:
        at_hook.append(dlq_ids(b))
        first.ack()

    ran = wrap_next_append(qa, first_acks, skip)
    final.retry()
    assert ran == [True] and at_hook == [[mid] if copied else []], "the interleaving was not the one forced"
    assert_outcome(make_broker, clock, s, [qa, qb], mid, outcome)


# ---- two pulls ----------------------------------------------------------------


@HOOKED
def test_second_pull_cannot_dead_letter_while_the_first_is_between_its_dlq_write_and_record(
        two, make_broker, clock):
    """While one pull holds the queue's lock between its DLQ write and its
    journal record, another broker's pull cannot take the lock; once it can,
    it has caught up and finds M gone."""
    a, b = two
    s = settings(max_retries=1)
    qa, qb = a.queue(QUEUE, **s), b.queue(QUEUE, **s)
    mid, _ = lease_final_delivery(qa, qb, clock, 1)
    probe: List[bool] = []

    def try_as_locks() -> None:
        lock = _FileLock(qa._b._lockfd, block=False)
        got = lock.acquire()
        if got:
            lock.release()
        probe.append(got)

    ran = wrap_next_append(qb, try_as_locks, skip=1)  # between the DLQ write and the record
    assert qb.pull().messages == ()
    assert ran == [True] and probe == [False], "another pull could have run inside this one"
    assert qa.pull().messages == ()
    (acked, dead, deleted, _, _), in_dlq = assert_settled(make_broker, clock, s, [qa, qb], mid)
    assert (acked, dead, deleted) == (0, 1, 0)
    assert [m.id for m in in_dlq] == [mid]


PULLER = """
import sys, qlog
path, now = sys.argv[1], float(sys.argv[2])
b = qlog.open(path, clock=lambda: now)
q = b.queue("jobs", max_retries=0, dead_letter_queue="jobs-dlq")
print("ready", flush=True)
assert sys.stdin.readline() == "go\\n"
got = 0
while True:
    batch = q.pull(batch_size=7)
    if not batch:
        break
    got += len(batch)
print("got", got, flush=True)
b.close()
"""


def test_pulls_in_separate_processes_dead_letter_each_message_once(backend, make_broker, clock, spawn_python):
    """Many messages on their final delivery, their leases run out, and four
    processes pull at once: whatever the interleaving, each message is in the
    DLQ once, counted once, and delivered to none of them."""
    s = settings(max_retries=0)
    b = make_broker(clock=clock)
    q = b.queue(QUEUE, **s)
    ids = q.send_batch(list(range(200)))
    held = []
    while len(held) < len(ids):
        held += q.pull(batch_size=100, visibility_timeout=LEASE).messages
    b.close()
    clock.advance(LEASE + 1)
    kids = [spawn_python(PULLER, [backend.target, clock.now]) for _ in range(4)]
    for k in kids:
        assert k.stdout.readline().strip() == "ready", k.stderr.read()
    for k in kids:
        k.stdin.write("go\n")
        k.stdin.flush()
    for k in kids:
        assert k.stdout.readline().split() == ["got", "0"], k.stderr.read()
        assert k.wait(timeout=60) == 0, k.stderr.read()
    r = make_broker(clock=clock)
    try:
        st = r.queue(QUEUE, **s).stats()
        assert (st.acked, st.dead_lettered, st.backlog) == (0, len(ids), 0)
        moved = drain(r.queue(DLQ))
        assert sorted(m.id for m in moved) == sorted(ids)
        assert drain(r.queue(QUEUE, **s)) == []
    finally:
        r.close()


# ---- a dead-lettering cut short by SIGKILL ------------------------------------

DIES_DEAD_LETTERING = """
import os, signal, sys, qlog
path, t0, where = sys.argv[1], float(sys.argv[2]), sys.argv[3]
now = [t0]
b = qlog.open(path, clock=lambda: now[0])
q = b.queue("jobs", max_retries=0, dead_letter_queue="jobs-dlq")
mid = q.send({"job": "M"})
(m,) = q.pull(batch_size=1, visibility_timeout=1.0).messages
print(mid, flush=True)
now[0] += 2  # the only delivery's lease runs out: the next pull dead-letters M
dlq = b.queue("jobs-dlq")
if where == "after-the-claim":  # killed before the DLQ copy is written
    dlq._b._msgs.append_batch = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
else:  # "after-the-dlq-write": killed before the record that moves M
    real_sync = dlq._b._msgs.sync
    def sync():
        real_sync()
        os.kill(os.getpid(), signal.SIGKILL)
    dlq._b._msgs.sync = sync
q.pull()
"""


@pytest.mark.local_only("the child hooks the local message log to die part way; reads the local replica")
@pytest.mark.parametrize("where, copies", [("after-the-claim", 1), ("after-the-dlq-write", 2)])
def test_a_dead_lettering_killed_part_way_is_finished_by_the_next_pull(
        backend, make_broker, clock, run_python, where, copies):
    """A puller killed after claiming M (and maybe after copying it) leaves
    M claimed: no ack or redelivery takes it, and the next pull copies it to
    the DLQ and records it dead-lettered.  A kill after the copy leaves a
    second copy with the same id (the documented crash duplicate), never a
    loss."""
    p = run_python(DIES_DEAD_LETTERING, [backend.target, T0, where])
    assert p.returncode == -9, p.stderr
    mid = p.stdout.split()[0]
    clock.advance(2)
    s = settings(max_retries=0)
    with make_broker(clock=clock) as b:
        q = b.queue(QUEUE, **s)
        st = q._b._state()
        assert list(st.dying) == [int(mid[16:], 16)] and not st.pending  # claimed, not moved
        assert q.stats().backlog == 1
        assert q.pull().messages == ()  # finishes the dead-lettering
    (acked, dead, deleted, _, _), in_dlq = assert_settled(make_broker, clock, s, [], mid)
    assert (acked, dead, deleted) == (0, 1, 0)
    assert [m.id for m in in_dlq] == [mid] * copies
