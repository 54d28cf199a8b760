"""kill -9 consumers and producers of a queue at random moments, reopen, and
state what survives, for durability "sync" and "none": a process crash loses
nothing in any mode.

Children are fresh interpreters running functions of this module
(``_crashkit.Child``).  Each records what the queue returned to it as facts
(``_invariants.FactWriter``: one ``os.write`` of whole lines on an O_APPEND
descriptor per call, so a line is in the kernel before the next call starts
and survives the SIGKILL; a line the kill cut short is ignored): a consumer
records each delivery with its attempts, and each ack and retry before and
after the call; a producer records each batch before and after ``send_batch``
(``send`` for a batch of one).  ``_invariants.check`` reopens the directory,
drains the queue and states the guarantees after every fault.

Consumers run one after another on one directory, each with a clock 100 s
ahead of the one before (``qlog.open(clock=...)``), so the leases a killed
consumer held have run out for the next one without real waiting.  They
checkpoint often and keep the state journal in small segments, so kills
also land in checkpoints, journal rolls and journal truncations.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from typing import Dict, List, Sequence, Tuple

import pytest

import qlog
import qlog._local.backend
from _crashkit import Child, jitter
from _invariants import Fact, FactWriter, body_key, check, make_body, read_facts

QUEUE = "jobs"
SETTINGS = dict(max_retries=100, message_retention=None, visibility_timeout=30.0)
MODES = ("sync", "none")
CLOCK_STEP = 100.0          # seconds each consumer's clock runs ahead of the previous one's
CONSUMER_KILLS = 16
MESSAGES = 4000
PRODUCER_KILLS = 12
CHECKPOINT_EVERY = 20     # journal records between checkpoints: kills land in checkpoints
JOURNAL_SEGMENT = 65536   # the smallest segment: kills land in journal rolls and truncations

BATCH = 500               # messages per send_batch of the consumer test's messages
Event = Tuple[str, str, int, int]   # (kind "d"/"a"/"r", id, attempts, body index)


def child_main() -> None:
    """Entry point of a child interpreter: ``<func>(**json)`` of this module."""
    func, kwargs = sys.argv[1], json.loads(sys.argv[2])
    globals()[func](**kwargs)


def small_journal(set_attr, checkpoint_every: int = CHECKPOINT_EVERY) -> None:
    """Checkpoint every ``checkpoint_every`` journal records, and keep the
    state journal in segments of JOURNAL_SEGMENT bytes, so that checkpoints
    delete journal segments (``set_attr``: ``setattr`` in a child, a test's
    ``monkeypatch.setattr`` in the parent)."""
    assert hasattr(qlog._local.backend, "_JOURNAL_SEGMENT"), "the state journal's segment size moved"
    set_attr(qlog.Broker, "checkpoint_every", checkpoint_every)
    set_attr(qlog._local.backend, "_JOURNAL_SEGMENT", JOURNAL_SEGMENT)


def side_file(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


def side_lines(path: str) -> List[str]:
    """The whole lines of a side file (a last line the kill cut short is dropped)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return data.decode().split("\n")[:-1]


def _kill_point(rng: random.Random, big: int) -> int:
    """How many side-file lines a child writes before it is killed."""
    return rng.choice([0, 1, rng.randint(1, big // 5), rng.randint(big // 5, big)])


def _kill_when(child: Child, ready, wait_until, what: str, rng: random.Random) -> List[str]:
    """Wait until ``ready()`` holds (or the child says "drained"), then SIGKILL
    the child at a random moment soon after; returns the lines it printed."""
    wait_until(lambda: ready() or "drained" in child.lines or child.proc.poll() is not None,
               timeout=60, what=what)
    assert child.proc.poll() is None, f"child exited with {child.proc.returncode}:\n{child.stderr}"
    jitter(rng)
    child.kill()
    return list(child.lines)


# ---- children ----------------------------------------------------------------


def consumer(path: str, durability: str, side: str, clock_offset: float, seed: int) -> None:
    """Child main: pull small batches; ack most messages one by one, retry a
    few, leave a few leased, sometimes ack_all the rest; record each call
    as facts in ``side``.  Prints "drained" and waits when nothing is visible."""
    rng = random.Random(seed)
    small_journal(setattr)
    broker = qlog.open(path, durability=durability, clock=lambda: time.time() + clock_offset)
    q = broker.queue(QUEUE, **SETTINGS)
    w = FactWriter(side)
    os.write(1, b"open\n")
    while True:
        batch = q.pull(batch_size=rng.randint(1, 20))
        if not batch:
            os.write(1, b"drained\n")
            sys.stdin.read()
            return
        w.delivered(QUEUE, batch)
        w.settle(QUEUE, batch, rng, ack=0.75, retry=0.1, ack_all=0.3)


def producer(path: str, durability: str, side: str, producer_id: int, seed: int) -> None:
    """Child main: send batches ``p<producer_id>.<k>`` of 1 to 1000 messages
    forever, recording each call before and after it in ``side``."""
    rng = random.Random(seed)
    broker = qlog.open(path, durability=durability)
    q = broker.queue(QUEUE, **SETTINGS)
    w = FactWriter(side)
    os.write(1, b"open\n")
    k = 0
    while True:
        n = rng.choice([1, rng.randint(2, 20), rng.randint(20, 200), rng.randint(200, 1000)])
        batch = f"p{producer_id}.{k}"
        bodies = [make_body(batch, i, n) for i in range(n)]
        w.sending(QUEUE, batch, n, durability)
        ids = [q.send(bodies[0])] if n == 1 else q.send_batch(bodies)
        w.sent(QUEUE, batch, durability, ids)
        k += 1


def checkpoint_victim(path: str) -> None:
    """Child main: ack what one pull got, then close the queue and die
    (SIGKILL) in the checkpoint's fdatasync, its temporary file written."""
    from _simvfs import fd_path, real, syscalls

    def fdatasync(fd: int) -> int:
        if os.path.basename(fd_path(fd)).startswith("checkpoint."):   # its temporary file, written
            os.kill(os.getpid(), signal.SIGKILL)
        return real.fdatasync(fd)

    with syscalls(fatal=True, fdatasync=fdatasync):
        with qlog.open(path, durability="none") as broker:
            q = broker.queue(QUEUE, **SETTINGS)
            q.pull(batch_size=10).ack_all()
            os.write(1, b"acked\n")
    os.write(1, b"closed\n")


# ---- checkers ------------------------------------------------------------------


def _index(key: str) -> int:
    """The consumer test's body index of a message key ``s<start>/<j>``."""
    batch, j = key.split("/")
    return int(batch[1:]) + int(j)


def consumer_events(facts: Sequence[Fact]) -> List[Event]:
    """One consumer's returned calls as events for :func:`check_deliveries`
    (calls it was about to make when killed are left out)."""
    out: List[Event] = []
    for f in facts:
        if f.kind == "deliver":
            out.append(("d", f.id, f.attempts, _index(f.key)))
        elif f.kind in ("ack", "retry"):
            out.append((f.kind[0], f.id, 0, -1))
    return out


def check_deliveries(ids: Sequence[str], runs: Sequence[Sequence[Event]]) -> Dict[str, List[int]]:
    """State the invariant of consumers killed one after another, ``runs``
    being what each reported, in order (the last: a final drain that acked
    everything it got).  ``ids[i]`` is what send returned for body ``i``.

    - a delivered message is a sent one, with the body it was sent with;
    - every sent message is delivered at least once;
    - a message whose ack() returned is never delivered again;
    - a message whose retry() returned is delivered again;
    - attempts grow with every delivery of a message: never back, never the same.
    Returns the attempts seen per id, in order."""
    sent = set(ids)
    attempts: Dict[str, List[int]] = {}
    acked: Dict[str, int] = {}
    retried = set()
    for r, events in enumerate(runs):
        for kind, mid, att, i in events:
            if kind == "d":
                assert mid in sent and ids[i] == mid, (
                    f"run {r} got message {mid} with body index {i}; send returned {ids[i]} for that body")
                assert mid not in acked, (
                    f"run {r} got message {mid} (attempts {att}) again: its ack returned in run {acked[mid]}")
                seen = attempts.setdefault(mid, [])
                assert att > (seen[-1] if seen else 0), (
                    f"run {r} got message {mid} with attempts {att} after attempts {seen}")
                seen.append(att)
                retried.discard(mid)
            else:
                assert mid in attempts, f"run {r} settled message {mid} it was never given"
                if kind == "a":
                    acked[mid] = r
                else:
                    retried.add(mid)
    missing = sent - set(attempts)
    assert not missing, f"{len(missing)} sent messages were never delivered, e.g. {sorted(missing)[:5]}"
    assert not retried, f"retried messages never delivered again: {sorted(retried)[:5]}"
    return attempts


# ---- tests ---------------------------------------------------------------------


def _drain(q: qlog.Queue) -> List[qlog.Message]:
    """Pull and ack every visible message; returns them."""
    out: List[qlog.Message] = []
    while True:
        batch = q.pull(batch_size=100)
        if not batch:
            return out
        out.extend(batch)
        batch.ack_all()


@pytest.mark.slow
@pytest.mark.parametrize("durability", MODES)
def test_killed_consumers_lose_nothing_and_acked_messages_stay_acked(tmp_path, durability, wait_until,
                                                                     monkeypatch):
    small_journal(monkeypatch.setattr)
    rng = random.Random(f"consumer-kill/{durability}")
    path = str(tmp_path / "q")
    sends = str(tmp_path / "sends.txt")
    w = FactWriter(sends)
    with qlog.open(path, durability=durability) as broker:
        q = broker.queue(QUEUE, **SETTINGS)
        ids = []
        for start in range(0, MESSAGES, BATCH):
            batch = f"s{start}"
            got = q.send_batch([make_body(batch, i, BATCH) for i in range(BATCH)])
            w.sent(QUEUE, batch, durability, got)
            ids += got
    facts = read_facts([sends])
    runs: List[List[Event]] = []
    killed_busy = 0
    for k in range(CONSUMER_KILLS):
        side = str(tmp_path / f"consumer{k}.txt")
        with Child("consumer", module="test_queue_crash", path=path, durability=durability, side=side,
                   clock_offset=(k + 1) * CLOCK_STEP, seed=rng.getrandbits(32)) as child:
            child.wait_line("open")
            acks = _kill_point(rng, 150)
            lines = _kill_when(child, lambda: sum(f.kind == "ack" for f in read_facts([side])) >= acks,
                               wait_until, f"consumer {k}: {acks} acks", rng)
        killed_busy += "drained" not in lines
        run = read_facts([side])
        facts += run
        runs.append(consumer_events(run))
    # A consumer killed after it found the queue empty still counts for the
    # checks below, but the scenario is kills of busy consumers: most must be.
    # (How far a consumer runs between its kill point and the kill depends on
    # the machine's speed, so the last ones may find the queue drained.)
    assert killed_busy >= CONSUMER_KILLS * 3 // 4, (
        f"scenario: only {killed_busy} of {CONSUMER_KILLS} consumers were busy when killed")
    final_clock = lambda: time.time() + (CONSUMER_KILLS + 1) * CLOCK_STEP  # noqa: E731
    report = check(path, facts, settings={QUEUE: SETTINGS}, durability=durability, clock=final_clock)
    assert report.checked == MESSAGES, report
    got = report.drained[QUEUE]
    runs.append([("d", mid, att, _index("/".join(map(str, body_key(body)[:2])))) for mid, att, body in got]
                + [("a", mid, 0, -1) for mid, _att, _body in got])
    attempts = check_deliveries(ids, runs)
    assert any(len(a) > 1 for a in attempts.values()), "scenario: no message was delivered twice"
    with qlog.open(path, durability=durability, clock=final_clock) as broker:
        q = broker.queue(QUEUE, **SETTINGS)
        assert not q.pull(batch_size=100), "a message came back after the final drain acked everything"
        st = q.stats()
        # the check's probe is one more acked message
        assert (st.acked, st.backlog, st.dead_lettered, st.deleted) == (MESSAGES + 1, 0, 0, 0), st


@pytest.mark.slow
@pytest.mark.parametrize("durability", MODES)
def test_producer_killed_mid_send_batch_leaves_whole_batches(tmp_path, durability, wait_until):
    """After each kill: every batch send_batch returned is all there under
    the ids it returned, the batch in flight is all there or not at all,
    and messages acked after earlier kills stay gone (``_invariants.check``)."""
    rng = random.Random(f"producer-kill/{durability}")
    path = str(tmp_path / "q")
    with qlog.open(path, durability=durability) as broker:
        broker.queue(QUEUE, **SETTINGS)   # the queue exists before the first producer
    total = 0
    for p in range(PRODUCER_KILLS):
        side = str(tmp_path / f"producer{p}.txt")
        with Child("producer", module="test_queue_crash", path=path, durability=durability, side=side,
                   producer_id=p, seed=rng.getrandbits(32)) as child:
            child.wait_line("open")
            calls = _kill_point(rng, 40)
            _kill_when(child, lambda: len({f.batch for f in read_facts([side]) if f.kind == "sent"}) >= calls,
                       wait_until, f"producer {p}: {calls} batches", rng)
        # This producer's facts are the whole history: an earlier producer's
        # message (acked by an earlier check) would be one nobody sent.
        report = check(path, read_facts([side]), settings={QUEUE: SETTINGS}, durability=durability)
        got = report.drained[QUEUE]
        assert all(body_key(body)[0].startswith(f"p{p}.") for _mid, _att, body in got), (
            f"messages of earlier producers (acked before) were delivered again after kill {p}")
        total += len(got)
    assert total > PRODUCER_KILLS * 100, f"scenario: the producers sent almost nothing ({total})"
    with qlog.open(path, durability=durability) as broker:
        st = broker.queue(QUEUE, **SETTINGS).stats()
        assert (st.acked, st.backlog) == (total + PRODUCER_KILLS, 0), st   # and one probe per check


def test_checkpoint_half_written_by_a_killed_process_is_removed(tmp_path):
    """A process killed while writing a checkpoint leaves its temporary file;
    the next checkpoint removes it (else every such crash leaks a file as
    large as the state)."""
    path = str(tmp_path / "q")
    qdir = tmp_path / "q" / "queues" / QUEUE
    with qlog.open(path, durability="none") as broker:
        broker.queue(QUEUE, **SETTINGS).send_batch([{"i": i} for i in range(30)])
    with Child("checkpoint_victim", module="test_queue_crash", path=path) as child:
        assert child.proc.wait(60) == -signal.SIGKILL, child.stderr
        child.kill()
    assert child.lines == ["acked"], child.lines
    assert list(qdir.glob("checkpoint*.tmp")), "scenario: the victim left no temporary checkpoint"
    with qlog.open(path, durability="none") as broker:
        q = broker.queue(QUEUE, **SETTINGS)
        assert q.stats().acked == 10
        assert [m.body["i"] for m in _drain(q)] == list(range(10, 30))
    leftovers = sorted(p.name for p in qdir.glob("checkpoint*.tmp"))
    assert (qdir / "checkpoint").exists() and not leftovers, (
        f"temporary checkpoints of dead processes are still there: {leftovers}")
