"""Producers and consumers in many processes on one queue directory: with
nothing crashing every message is delivered and acked exactly once; with
consumers SIGKILLed and restarted, the leases they held run out and every
message is still acked, none lost.

Children are fresh interpreters running functions of this module
(``_crashkit.Child``), each writing what the queue returned to it to a file
of its own, one ``os.write`` of whole lines on an O_APPEND descriptor per
returned call (so the lines survive a SIGKILL):

- a producer writes ``<id> <p> <i>`` for each message of a ``send_batch``
  once it returned (``{"p": p, "i": i}`` is the body);
- a consumer writes ``b <id>:<attempts>:<p>:<i> ...`` for the batch a pull
  returned, then ``a`` once ``ack_all()`` returned.
"""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Dict, List, Optional, Sequence, Set, Tuple

import pytest

import qlog
from _crashkit import Child, jitter
from test_queue_crash import side_file, side_lines, small_journal

QUEUE = "work"
SETTINGS = dict(max_retries=100, message_retention=None)
BATCH = 100
CHECKPOINT_EVERY = 100   # journal records between checkpoints: they delete journal segments
                         # other consumers have not replayed yet, who then reload the checkpoint


def child_main() -> None:
    """Entry point of a child interpreter: ``<func>(**json)`` of this module."""
    func, kwargs = sys.argv[1], json.loads(sys.argv[2])
    globals()[func](**kwargs)


# ---- children ----------------------------------------------------------------


def producer(path: str, durability: str, out: str, p: int, count: int = 0) -> None:
    """Child main: send ``{"p": p, "i": i}`` for i < count with send_batch of
    BATCH; with no ``count``, as many batches as each line read from stdin
    says, until stdin closes."""
    chunks = [count // BATCH] if count else (int(line) for line in sys.stdin)
    with qlog.open(path, durability=durability) as broker:
        q = broker.queue(QUEUE, **SETTINGS)
        fd = side_file(out)
        i = 0
        for k in chunks:
            for _ in range(k):
                ids = q.send_batch([{"p": p, "i": j} for j in range(i, i + BATCH)])
                os.write(fd, "".join(f"{mid} {p} {i + j}\n" for j, mid in enumerate(ids)).encode())
                i += BATCH


def consumer(path: str, durability: str, out: str, total: int, visibility_timeout: float,
             hold_after: int = -1) -> None:
    """Child main: pull batches of BATCH (waiting for sends), ack_all each,
    until the queue's ``stats().acked`` reaches ``total``.  With
    ``hold_after`` >= 0: after that many batches, pull one more, print
    "holding" and never settle it (the parent kills the process)."""
    small_journal(setattr, CHECKPOINT_EVERY)
    with qlog.open(path, durability=durability) as broker:
        q = broker.queue(QUEUE, **SETTINGS)
        fd = side_file(out)
        os.write(1, b"open\n")
        done = 0
        while True:
            batch = q.pull(BATCH, visibility_timeout=visibility_timeout, wait=0.5)
            if not batch:
                if q.stats().acked >= total:
                    return
                continue
            os.write(fd, ("b " + " ".join(
                f"{m.id}:{m.attempts}:{m.body['p']}:{m.body['i']}" for m in batch) + "\n").encode())
            if done == hold_after:
                os.write(1, b"holding\n")
                sys.stdin.read()
            batch.ack_all()
            os.write(fd, b"a\n")
            done += 1


# ---- reading the children's files ----------------------------------------------


def read_sent(outs: Sequence[str]) -> Dict[str, Tuple[int, int]]:
    """id -> (p, i) of every message the producers' send_batch returned; each id once."""
    sent: Dict[str, Tuple[int, int]] = {}
    for out in outs:
        for line in side_lines(out):
            mid, p, i = line.split()
            assert mid not in sent, f"send_batch returned id {mid} twice"
            sent[mid] = (int(p), int(i))
    assert len(set(sent.values())) == len(sent), "two ids for one (p, i)"
    return sent


Delivery = Tuple[str, int, int, int]   # id, attempts, p, i


def read_consumer(out: str) -> Tuple[List[List[Delivery]], Optional[List[Delivery]]]:
    """(batches whose ack_all returned, the last batch if its ack_all did not)."""
    acked: List[List[Delivery]] = []
    open_batch: Optional[List[Delivery]] = None
    for line in side_lines(out):
        if line == "a":
            assert open_batch is not None, f"{out}: an ack line with no batch before it"
            acked.append(open_batch)
            open_batch = None
        else:
            assert open_batch is None, f"{out}: a batch pulled while the one before was not acked"
            open_batch = []
            for item in line.split()[1:]:
                mid, att, p, i = item.split(":")
                open_batch.append((mid, int(att), int(p), int(i)))
    return acked, open_batch


def check_deliveries(sent: Dict[str, Tuple[int, int]], deliveries: Sequence[Delivery]) -> None:
    """Every delivery is of a sent message, with its body, and a first or later attempt."""
    for mid, att, p, i in deliveries:
        assert sent.get(mid) == (p, i), f"delivered {mid} with body {(p, i)}; sent as {sent.get(mid)}"
        assert att >= 1, f"{mid} delivered with attempts {att}"


def check_queue_done(path: str, durability: str, total: int) -> None:
    """Reopened, the queue has every message acked, none left, none dropped."""
    with qlog.open(path, durability=durability) as broker:
        q = broker.queue(QUEUE, **SETTINGS)
        st = q.stats()
        assert (st.acked, st.backlog, st.in_flight, st.dead_lettered, st.deleted, st.expired) == (
            total, 0, 0, 0, 0, 0), st
        assert not q.pull(BATCH), "a message is still deliverable after all were acked"


def _start(kind: str, **kwargs: object) -> Child:
    return Child(kind, module="test_queue_multiprocess", **kwargs)


def _finish_all(children: Sequence[Child], what: str) -> None:
    for c in children:
        rc = c.finish(timeout=180)
        assert rc == 0, f"{what} {c.proc.pid} exited with {rc}:\n{c.stderr}"


# ---- tests -----------------------------------------------------------------------


@pytest.mark.slow
def test_four_producers_and_four_consumers_deliver_200000_messages_exactly_once(tmp_path, monkeypatch):
    small_journal(monkeypatch.setattr, CHECKPOINT_EVERY)
    path, procs, per_producer = str(tmp_path / "q"), 4, 50_000
    total = procs * per_producer
    durability = "interval"
    with qlog.open(path, durability=durability) as broker:
        broker.queue(QUEUE, **SETTINGS)
    prod_outs = [str(tmp_path / f"producer{p}.txt") for p in range(procs)]
    cons_outs = [str(tmp_path / f"consumer{c}.txt") for c in range(procs)]
    children = []
    try:
        consumers = [_start("consumer", path=path, durability=durability, out=out, total=total,
                            visibility_timeout=3600.0) for out in cons_outs]
        children += consumers
        producers = [_start("producer", path=path, durability=durability, out=out, p=p,
                            count=per_producer) for p, out in enumerate(prod_outs)]
        children += producers
        _finish_all(producers, "producer")
        _finish_all(consumers, "consumer")
    finally:
        for c in children:
            c.__exit__()
    sent = read_sent(prod_outs)
    assert len(sent) == total
    got: List[Delivery] = []
    for out in cons_outs:
        acked, open_batch = read_consumer(out)
        assert open_batch is None, f"{out}: a batch pulled and never acked"
        assert acked, f"{out}: this consumer got nothing (the four did not share the work)"
        got += [d for batch in acked for d in batch]
    check_deliveries(sent, got)
    ids = [d[0] for d in got]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} messages were delivered twice"
    assert set(ids) == set(sent), f"{len(set(sent) - set(ids))} messages were never delivered"
    assert all(d[1] == 1 for d in got), "a message was delivered with attempts > 1: a lease was lost"
    check_queue_done(path, durability, total)


def test_consumers_killed_and_restarted_lose_no_message(tmp_path, wait_until, monkeypatch):
    """Two "holders" each pull a batch and stall until killed; consumers are
    killed at random moments (while there is work: the producers send in
    chunks the test releases) and replaced.  Leases last 1.5 s of real time,
    so what the dead held is delivered again to the living."""
    small_journal(monkeypatch.setattr, CHECKPOINT_EVERY)
    rng = random.Random("consumer-kills")
    path, durability, total, vt = str(tmp_path / "q"), "none", 20_000, 1.5
    kills, slots, producers_n, chunk = 8, 4, 2, 3    # chunk: batches per producer per release
    budget = total // (producers_n * BATCH)          # batches each producer sends in all
    prod_outs = [str(tmp_path / f"producer{p}.txt") for p in range(producers_n)]
    outs: List[str] = []
    killed: Set[str] = set()
    children: List[Child] = []
    released = [0]

    def start_consumer(hold_after: int = -1) -> Tuple[Child, str]:
        out = str(tmp_path / f"consumer{len(outs)}.txt")
        outs.append(out)
        c = _start("consumer", path=path, durability=durability, out=out, total=total,
                   visibility_timeout=vt, hold_after=hold_after)
        children.append(c)
        return c, out

    def release(batches: int) -> None:
        released[0] += batches
        for c in producers:
            c.proc.stdin.write(b"%d\n" % batches)
            c.proc.stdin.flush()

    def caught_up() -> bool:
        return (all(len(side_lines(out)) == released[0] * BATCH for out in prod_outs)
                and q.stats().backlog == 0)

    def feed_until(cond, what: str) -> None:
        """Release chunks of messages until ``cond()`` holds."""
        while not cond():
            assert released[0] < budget, f"scenario: {what} did not happen before all messages were sent"
            release(chunk)
            wait_until(lambda: cond() or caught_up(), timeout=60, what=what)

    def batches_pulled(out: str) -> int:
        acked, open_batch = read_consumer(out)
        return len(acked) + (open_batch is not None)

    broker = qlog.open(path, durability=durability)
    q = broker.queue(QUEUE, **SETTINGS)
    try:
        holders = [start_consumer(hold_after=h) for h in (0, 1)]
        running = [start_consumer() for _ in range(slots)]
        producers = [_start("producer", path=path, durability=durability, out=out, p=p)
                     for p, out in enumerate(prod_outs)]
        children += producers
        for c, _ in holders + running:
            c.wait_line("open")
        for c, out in holders:
            feed_until(lambda: "holding" in c.lines, f"holder {c.proc.pid} holding a batch")
            c.kill()
            killed.add(out)
        for _ in range(kills):
            v = rng.randrange(slots)
            c, out = running[v]
            c.wait_line("open")
            more = batches_pulled(out) + rng.randint(1, 2)
            feed_until(lambda: batches_pulled(out) >= more, f"consumer {c.proc.pid} pulling {more} batches")
            jitter(rng, 0.005)
            assert c.proc.poll() is None, f"consumer {c.proc.pid} exited before the last message was sent"
            c.kill()
            killed.add(out)
            running[v] = start_consumer()
        release(budget - released[0])
        _finish_all(producers, "producer")
        _finish_all([c for c, _ in running], "consumer")
    finally:
        for c in children:
            c.__exit__()
        broker.close()
    sent = read_sent(prod_outs)
    assert len(sent) == total
    acked_ids: Set[str] = set()
    unconfirmed: Set[str] = set()
    held: Set[str] = set()
    redelivered: Set[str] = set()
    for out in outs:
        acked, open_batch = read_consumer(out)
        delivered = [d for batch in acked for d in batch] + (open_batch or [])
        check_deliveries(sent, delivered)
        redelivered.update(d[0] for d in delivered if d[1] >= 2)
        acked_ids.update(d[0] for batch in acked for d in batch)
        if open_batch:
            assert out in killed, f"{out}: a consumer that was not killed left a batch unacked"
            unconfirmed.update(d[0] for d in open_batch)
            if out in (h[1] for h in holders):
                held.update(d[0] for d in open_batch)
    for _, out in holders:
        assert read_consumer(out)[1], f"scenario: holder {out} held no batch when it was killed"
    # A holder never settles its batch: the only way on is its lease running
    # out and another consumer getting the messages with attempts >= 2.
    assert held <= redelivered, (
        f"{len(held - redelivered)} messages a killed holder leased were never delivered again")
    missing = set(sent) - acked_ids - unconfirmed
    assert not missing, f"{len(missing)} messages were never delivered, e.g. {sorted(missing)[:5]}"
    # Batches whose ack_all may not have returned before a kill were acked by
    # someone: the queue counts every message acked, none left.
    check_queue_done(path, durability, total)
