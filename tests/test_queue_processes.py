"""Queues across real processes: consumers and producers killed with SIGKILL
mid-batch, and 4 producers with 4 consumers sharing one directory.

Children write what they saw to append-only files (one os.write per line:
a line written is in the kernel, so it survives the SIGKILL that follows).
One checker states the invariants after the files are reopened:

- every message whose send returned is delivered at least once;
- no message whose ack() returned is delivered again;
- a message's attempts only grow from one delivery to the next;
- a send_batch is all there or not at all.
"""

from __future__ import annotations

import pathlib
import random
import signal
import time
from collections import defaultdict
from typing import Dict, List, Set

import pytest

import qlog

QUEUE = "jobs"

CONSUMER = r"""
import os, sys, qlog
path, out, durability, vt = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
b = qlog.open(path, durability=durability)
q = b.queue("jobs", visibility_timeout=vt)
os.write(fd, b"ready\n")
idle = 0
while idle < 3:
    batch = q.pull(batch_size=10, wait=0.5)
    if not batch.messages:
        idle += 1
        continue
    idle = 0
    for m in batch.messages:
        os.write(fd, b"D %s %d\n" % (m.id.encode(), m.attempts))
        m.ack()
        os.write(fd, b"A %s\n" % m.id.encode())
b.close()
os.write(fd, b"done\n")
"""

PRODUCER = r"""
import os, sys, qlog
path, out, durability, first = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
q = qlog.open(path, durability=durability).queue("jobs")
os.write(fd, b"ready\n")
k = first
while True:
    n = 1 + k % 37
    ids = q.send_batch([{"batch": k, "i": i, "n": n} for i in range(n)])
    os.write(fd, b"B %d %s\n" % (k, " ".join(ids).encode()))
    k += 1
"""


def _lines(path: pathlib.Path) -> List[List[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line]


def _drain(path: pathlib.Path) -> List[qlog.Message]:
    """Every message still in the queue, leases of dead consumers run out
    (the checker's clock is an hour ahead)."""
    got: List[qlog.Message] = []
    with qlog.open(path, clock=lambda: time.time() + 3600) as b:
        q = b.queue(QUEUE)
        while True:
            batch = q.pull(batch_size=1000, visibility_timeout=3600)
            if not batch.messages:
                break
            for m in batch.messages:
                m.body  # every one reads back (its CRC held)
            got += batch.messages
        assert q.stats().backlog == q.stats().in_flight
    return got


def check_deliveries(sent: Set[str], lines: List[List[str]], left: List[qlog.Message]) -> None:
    acked: Set[str] = set()
    attempts: Dict[str, int] = {}
    for rec in lines:
        if rec[0] == "D":
            mid, a = rec[1], int(rec[2])
            assert mid not in acked, f"{mid} delivered again after its ack() returned"
            assert a > attempts.get(mid, 0), f"{mid}: attempts went from {attempts.get(mid)} to {a}"
            attempts[mid] = a
        elif rec[0] == "A":
            acked.add(rec[1])
    for m in left:
        assert m.id not in acked, f"{m.id} still in the queue after its ack() returned"
        assert m.attempts > attempts.get(m.id, 0), f"{m.id}: attempts went backwards"
    delivered = set(attempts) | {m.id for m in left}
    assert sent <= delivered, f"{len(sent - delivered)} sent messages lost, e.g. {sorted(sent - delivered)[:3]}"
    assert delivered <= sent, f"unknown ids delivered: {sorted(delivered - sent)[:3]}"


def _wait_for_growth(path: pathlib.Path, proc, at_least: int, timeout: float = 60.0) -> bool:
    """Wait until the child wrote ``at_least`` lines in all; False if it
    finished (exit 0) first."""
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while len(_lines(path)) < at_least:
        rc = proc.poll()
        if rc == 0:
            return False
        assert rc is None, f"child failed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"child wrote fewer than {at_least} lines in {timeout} s"
        time.sleep(pause)
        pause = min(pause * 2, 0.002)
    return True


@pytest.mark.parametrize("durability", ["sync", "none"])
def test_consumers_killed_mid_batch_lose_nothing_and_never_undo_an_ack(tmp_path, spawn_python, durability):
    data = tmp_path / "data"
    with qlog.open(data, durability=durability) as b:
        q = b.queue(QUEUE)
        sent = set()
        for k in range(100):
            sent.update(q.send_batch([{"n": k * 100 + i} for i in range(100)]))
    out = tmp_path / "consumers.log"
    rng = random.Random(f"consumer-kill/{durability}")
    kills = 0
    for _ in range(12):
        before = len(_lines(out))
        p = spawn_python(CONSUMER, [data, out, durability, 0.3])
        if not _wait_for_growth(out, p, before + 1 + rng.randrange(1, 200)):
            break  # it consumed everything left before the kill came
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    assert kills >= 6
    check_deliveries(sent, _lines(out), _drain(data))


@pytest.mark.parametrize("durability", ["sync", "none"])
def test_producers_killed_mid_send_batch_leave_whole_batches(tmp_path, spawn_python, durability):
    data = tmp_path / "data"
    out = tmp_path / "producers.log"
    rng = random.Random(f"producer-kill/{durability}")
    for gen in range(6):
        before = len(_lines(out))
        p = spawn_python(PRODUCER, [data, out, durability, gen * 100_000])
        assert _wait_for_growth(out, p, before + 1 + rng.randrange(1, 60))
        p.send_signal(signal.SIGKILL)
        p.wait()
    returned: Dict[int, List[str]] = {int(r[1]): r[2:] for r in _lines(out) if r[0] == "B"}
    left = _drain(data)
    by_batch: Dict[int, Dict[int, str]] = defaultdict(dict)
    for m in left:
        body = m.body
        assert m.id not in by_batch[body["batch"]].values()
        by_batch[body["batch"]][body["i"]] = m.id
    for k, ids in returned.items():
        assert [by_batch[k].get(i) for i in range(len(ids))] == ids, f"batch {k} is not whole"
    for k, got in by_batch.items():
        n = 1 + k % 37
        assert sorted(got) == list(range(n)), f"batch {k} is half there: {sorted(got)} of {n}"
    # The queue takes sends and delivers after all that.
    with qlog.open(data) as b:
        q = b.queue(QUEUE)
        mid = q.send("after")
        assert [m.id for m in q.pull(batch_size=1).messages] == [mid]


MP_CONSUMER = r"""
import os, sys, qlog
path, out, done_flag, vt, size = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
b = qlog.open(path, durability="none")
q = b.queue("jobs", visibility_timeout=vt)
while True:
    batch = q.pull(batch_size=size, wait=0.2)
    if not batch.messages:
        if os.path.exists(done_flag) and q.stats().backlog == 0:
            break
        continue
    os.write(fd, b"".join(m.body + b"\n" for m in batch.messages))  # then the ack
    batch.ack_all()
b.close()
"""

MP_PRODUCER = r"""
import sys, qlog
path, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with qlog.open(path, durability="interval") as b:
    q = b.queue("jobs")
    for start in range(first, first + count, 100):
        q.send_batch([b"%d" % i for i in range(start, min(start + 100, first + count))],
                     content_type="bytes")
"""


def _delivered_counts(outs: List[pathlib.Path]) -> Dict[int, int]:
    counts: Dict[int, int] = defaultdict(int)
    for path in outs:
        if path.exists():
            for line in path.read_bytes().split():
                counts[int(line)] += 1
    return counts


def test_four_producers_and_four_consumers_deliver_each_message_exactly_once(tmp_path, spawn_python):
    total, each = 200_000, 50_000
    data = tmp_path / "data"
    qlog.open(data).queue(QUEUE).close()
    done = tmp_path / "producers-done"
    outs = [tmp_path / f"consumer{i}.out" for i in range(4)]
    consumers = [spawn_python(MP_CONSUMER, [data, outs[i], done, 600, 100]) for i in range(4)]
    producers = [spawn_python(MP_PRODUCER, [data, i * each, each]) for i in range(4)]
    for p in producers:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    done.touch()
    for p in consumers:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    counts = _delivered_counts(outs)
    assert len(counts) == total
    assert set(counts) == set(range(total))
    dupes = {k: v for k, v in counts.items() if v != 1}
    assert not dupes, f"{len(dupes)} messages delivered twice while their leases held"
    with qlog.open(data) as b:
        st = b.queue(QUEUE).stats()
        assert (st.acked, st.backlog) == (total, 0)


def test_consumers_killed_at_random_still_ack_every_message(tmp_path, spawn_python):
    total = 100_000
    data = tmp_path / "data"
    with qlog.open(data, durability="none") as b:
        q = b.queue(QUEUE)
        for start in range(0, total, 100):
            q.send_batch([b"%d" % i for i in range(start, start + 100)], content_type="bytes")
    done = tmp_path / "producers-done"
    done.touch()
    rng = random.Random("mp-kill")
    outs = [tmp_path / f"consumer{i}.out" for i in range(4)]
    args = [data, None, done, 1.0, 10]  # short leases, small batches

    def start(i: int):
        return spawn_python(MP_CONSUMER, [*args[:1], outs[i], *args[2:]])

    procs = [start(i) for i in range(4)]
    kills = 0
    for _ in range(12):
        i = rng.randrange(4)
        before = outs[i].stat().st_size if outs[i].exists() else 0
        _wait_for_bytes(outs[i], procs[i], before + rng.randrange(1, 3000))
        if procs[i].poll() is not None:
            break  # the work ran out before this kill
        procs[i].send_signal(signal.SIGKILL)
        procs[i].wait()
        kills += 1
        procs[i] = start(i)
    for p in procs:
        p.wait(timeout=240)
    for p in procs:
        assert p.returncode == 0, p.stderr.read()
    assert kills >= 6
    counts = _delivered_counts(outs)  # deliveries, each recorded before its ack
    assert set(counts) == set(range(total)), f"{total - len(counts)} messages never delivered"
    with qlog.open(data) as b:
        assert b.queue(QUEUE).stats().backlog == 0


def _wait_for_bytes(path: pathlib.Path, proc, at_least: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while (path.stat().st_size if path.exists() else 0) < at_least:
        if proc.poll() is not None:
            return  # it finished its share: nothing to kill
        assert time.monotonic() < deadline, f"no output from a consumer in {timeout} s"
        time.sleep(pause)
        pause = min(pause * 2, 0.002)
