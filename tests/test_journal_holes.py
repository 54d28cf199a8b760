"""A state journal with holes: replay delivers again what the lost records hid.

A power cut may write back a later page of the journal's unsynced tail and
not an earlier one, and bit rot may damage any record; recovery keeps the
valid records after the damage.  The rule (docs/FORMAT.md, "Replay past a
hole"): a message whose send returned stays deliverable unless a surviving
record says it was acked, dead-lettered, expired or purged.  Duplicates and
restarted attempt counts are allowed; loss is not.

The power-cut tests (test_powercut_queue.py) reach holes through a real
reboot; these reach them by zeroing records of a killed process's journal
(the reader skips them as damage in the middle) and by replaying any subset
of a real journal's records.
"""

from __future__ import annotations

import json
import pathlib
import signal
import struct
import subprocess
import sys
from typing import Dict, List, Set, Tuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import qlog
from _crashkit import child_env
from damage import records, segments
from qlog._log import pure as _pure
from qlog._local.state import QueueState, decode

QUEUE = "jobs"

# A child that sends, pulls and acks as its arguments say, then dies by
# SIGKILL (no close, so no checkpoint covers the journal it wrote).
_CHILD = r"""
import json, os, signal, sys
import qlog
path, ops = sys.argv[1], json.loads(sys.argv[2])
b = qlog.open(path, durability="sync")
q = b.queue("jobs", visibility_timeout=3600, message_retention=None, segment_bytes=65536)
for op, n in ops:
    if op == "send":
        q.send_batch([{"n": i} for i in range(n)])
    elif op == "pull":
        q.pull(n)
    elif op == "pull_ack":
        q.pull(n).ack_all()
print(q.stats().backlog, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _env(engine: str) -> Dict[str, str]:
    env = child_env()
    env.pop("QLOG_PURE", None)
    if engine == "pure":
        env["QLOG_PURE"] = "1"
    return env


def _run_child(path: pathlib.Path, ops: List[Tuple[str, int]], engine: str = "c") -> None:
    p = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(ops)],
                       capture_output=True, text=True, timeout=120, env=_env(engine))
    assert p.returncode == -signal.SIGKILL, p.stderr


_DRAIN = r"""
import json, sys
import qlog
with qlog.open(sys.argv[1]) as b:
    q = b.queue("jobs")
    s = q.stats()
    out = {"engine": qlog.ENGINE, "backlog": s.backlog, "in_flight": s.in_flight,
           "peek": [int(m.id[16:], 16) for m in q.peek(3)], "got": []}
    while True:
        batch = q.pull(100, visibility_timeout=3600)
        if not batch.messages:
            break
        out["got"] += [int(m.id[16:], 16) for m in batch.messages]
        batch.ack_all()
print(json.dumps(out))
"""


def _journal_records(path: pathlib.Path):
    out = []
    for seg in segments(path / "queues" / QUEUE / "state"):
        out += [(seg, r) for r in records(seg)]
    return out


def _zero(seg: str, r) -> None:
    with open(seg, "r+b") as f:
        f.seek(r.offset)
        f.write(bytes(r.size))


def _as_if_rebooted(log_dir: pathlib.Path) -> None:
    """Rewrite a log's ``meta`` as a previous boot left it: the log then
    continues at its reserved mark, a gap in the numbering."""
    meta = log_dir / "meta"
    head = meta.read_bytes()[:24] + b"00000000-0000-4000-8000-000000000000"
    meta.write_bytes(head + struct.pack("<I", _pure.mask_crc(_pure.crc32c(head))))


def _drain(path: pathlib.Path) -> List[int]:
    """Every message number delivered by pulls until none is left (each acked)."""
    got: List[int] = []
    with qlog.open(path) as b:
        q = b.queue(QUEUE)
        while True:
            batch = q.pull(100, visibility_timeout=3600)
            if not batch.messages:
                break
            got += [int(m.id[16:], 16) for m in batch.messages]
            batch.ack_all()
    return got


@pytest.mark.parametrize("engine", ["c", "pure"])
def test_a_lost_pull_record_before_a_surviving_one_redelivers_its_messages(tmp_path, engine) -> None:
    d = tmp_path / "data"
    _run_child(d, [("send", 100), ("send", 100), ("pull", 60), ("pull", 10)], engine)
    recs = _journal_records(d)
    assert [r.payload[:1] for _, r in recs] == [b"P", b"P"]
    _zero(*recs[0])  # the pull of 0..59 is lost; the pull of 60..69 survives
    p = subprocess.run([sys.executable, "-c", _DRAIN, str(d)], capture_output=True, text=True,
                       timeout=120, env=_env(engine))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["engine"] == engine
    assert (out["backlog"], out["in_flight"]) == (200, 10)  # 60 hidden ones are waiting again
    assert out["peek"] == [0, 1, 2]
    got = out["got"]
    assert sorted(got) == [n for n in range(200) if not 60 <= n < 70]  # 60..69: still leased
    assert got[:60] == list(range(60))  # the hidden range first, oldest first


def test_an_ack_that_survives_a_hole_keeps_its_message_done(tmp_path) -> None:
    d = tmp_path / "data"
    # pull 0..19 (lost), pull+ack 20..29 (the ack survives), then the lost
    # pull's messages have no record but the ack's
    _run_child(d, [("send", 50), ("pull", 20), ("pull_ack", 10)])
    recs = _journal_records(d)
    assert [r.payload[:1] for _, r in recs] == [b"P", b"P", b"A"]
    _zero(*recs[0])
    assert sorted(_drain(d)) == list(range(20)) + list(range(30, 50))


def test_the_hidden_range_survives_checkpoints_and_segment_deletion(tmp_path) -> None:
    d = tmp_path / "data"
    # 0..999 pulled (this record is lost), 1000..1999 pulled and acked,
    # 2000..2009 pulled and left leased
    _run_child(d, [("send", 1000)] * 5 + [("pull", 1000), ("pull_ack", 1000), ("pull", 10)])
    msgs = d / "queues" / QUEUE / "messages"
    before = segments(msgs)
    assert len(before) >= 4  # small segments: 0..999 fill the first ones
    recs = _journal_records(d)
    assert [r.payload[:1] for _, r in recs] == [b"P", b"P", b"A", b"P"]
    _zero(*recs[0])
    with qlog.open(d) as b:
        q = b.queue(QUEUE)
        assert q.stats().backlog == 4000
        q.pull(5).ack_all()  # messages 0..4 (the hidden range first)
    # close wrote a checkpoint past every journal record; the hidden range is in it
    ck = QueueState.from_snapshot((d / "queues" / QUEUE / "checkpoint").read_bytes())
    assert (ck.cursor, ck.unknown, ck.hidden) == (2010, [(5, 1000)], 1000)
    assert ck.floor() == 5
    assert segments(msgs) == before  # no segment holding them was deleted
    got = _drain(d)
    assert sorted(got) == list(range(5, 1000)) + list(range(2010, 5000))


def test_every_replica_replaying_the_same_damaged_journal_reaches_the_same_state(tmp_path) -> None:
    d = tmp_path / "data"
    _run_child(d, [("send", 80), ("pull", 20), ("pull_ack", 10), ("pull", 10), ("pull_ack", 5)])
    recs = _journal_records(d)
    _zero(*recs[0])
    _zero(*recs[3])
    with qlog.open(d) as b1, qlog.open(d) as b2:
        q1, q2 = b1.queue(QUEUE), b2.queue(QUEUE)
        s1, s2 = q1._b._state(), q2._b._state()
        assert (s1.cursor, s1.unknown, sorted(s1.pending)) == (s2.cursor, s2.unknown, sorted(s2.pending))
        assert s1.unknown == [(0, 20), (30, 40)]
        # a pull by one replica reaches the other as the same change
        q1.pull(25)
        assert q2._b._state().unknown == q1._b._state().unknown == [(35, 40)]


def test_backlog_counts_messages_not_the_numbers_a_reboot_skipped(tmp_path) -> None:
    d = tmp_path / "data"
    _run_child(d, [("send", 20), ("pull", 5)])
    _as_if_rebooted(d / "queues" / QUEUE / "messages")
    with qlog.open(d) as b:
        q = b.queue(QUEUE)
        assert q._b._msgs.next_seq >= _pure.SEQ_RESERVE  # the reboot's gap
        assert q.stats().backlog == 20
        q.send_batch([{"n": i} for i in range(3)])
        assert q.stats().backlog == 23
        q.pull(100).ack_all()  # 15 left of the 20, then the 3
        assert q.stats().backlog == 5  # the 5 leased by the killed process
    got = _drain(d)
    assert got == []


# ---- any subset of a real journal -----------------------------------------------

_OPS = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(1, 30)),
    st.tuples(st.just("pull"), st.integers(1, 25)),
    st.tuples(st.just("ack"), st.integers(0, 5)),
    st.tuples(st.just("retry"), st.integers(0, 5)),
    st.tuples(st.just("expire_leases"), st.just(0)),
), min_size=3, max_size=25)


def _done_by(payloads: List[bytes]) -> Tuple[Set[int], int]:
    """Messages that a record of ``payloads`` shows done, and the purge mark."""
    done: Set[int] = set()
    purge = 0
    for p in payloads:
        tag, sc, ar = decode(p)
        if tag == b"A":
            done.update(ar[0])
        elif tag == b"D":
            done.update(ar[0])
        elif tag == b"P":
            done.update(ar[7])
            done.update(ar[8])
        elif tag == b"X":
            purge = max(purge, sc[0])
    return done, purge


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS, keep=st.lists(st.booleans(), min_size=40, max_size=40))
def test_replaying_any_subset_of_the_journal_never_takes_an_unfinished_message_as_done(
        tmp_path_factory, ops, keep) -> None:
    d = tmp_path_factory.mktemp("holes")
    t = [1_700_000_000.0]
    sent: List[int] = []
    with qlog.open(d, durability="none", clock=lambda: t[0]) as b:
        q = b.queue(QUEUE, visibility_timeout=10, max_retries=2, dead_letter_queue="dlq",
                    message_retention=None)
        held: List[qlog.Message] = []
        for op, n in ops:
            if op == "send":
                sent += [int(i[16:], 16) for i in q.send_batch(list(range(n)))]
            elif op == "pull":
                held += q.pull(n).messages
            elif op in ("ack", "retry"):
                for m in held[:n]:
                    m.ack() if op == "ack" else m.retry()
                held = held[n:]
            else:
                t[0] += 11  # every lease runs out
        with qlog.Log(d / "queues" / QUEUE / "state", durability="none") as j:
            journal = j.read(0, max_records=10_000)
    kept = [(s, p) for i, (s, p) in enumerate(journal) if i >= len(keep) or keep[i]]
    replica = QueueState()
    for s, p in kept:
        replica.applied = s
        replica.apply(p)
        replica.applied = s + 1
    done, purge = _done_by([p for _, p in kept])
    for s in sent:
        if s in done or s < purge:
            continue
        assert (s in replica.pending or s in replica.dying or s >= replica.cursor
                or any(lo <= s < hi for lo, hi in replica.unknown)), (
            f"message {s} is taken as done though no surviving record says so")
    assert replica.floor() <= min([s for s in sent if s not in done and s >= purge], default=replica.floor())
    back = QueueState.from_snapshot(replica.snapshot())
    assert (back.cursor, back.unknown, sorted(back.pending)) == (
        replica.cursor, replica.unknown, sorted(replica.pending))


def test_expiry_takes_messages_of_a_hidden_range_past_retention(tmp_path) -> None:
    import time

    d = tmp_path / "data"
    _run_child(d, [("send", 50), ("pull", 20), ("pull", 10)])
    recs = _journal_records(d)
    _zero(*recs[0])  # 0..19 hidden; 20..29 leased for an hour; 30..49 never pulled
    later = time.time() + 1800  # past a minute's retention, within the leases
    with qlog.open(d, clock=lambda: later) as b:
        q = b.queue(QUEUE, message_retention=60)
        assert q._b._state().unknown == [(0, 20)]
        assert q.expire() == 40
        st = q._b._state()
        assert (st.unknown, sorted(st.pending), st.cursor) == ([], list(range(20, 30)), 50)
        s = q.stats()
        assert (s.backlog, s.in_flight, s.expired) == (10, 10, 40)


def test_purge_after_a_reboot_counts_messages_not_skipped_numbers(tmp_path) -> None:
    d = tmp_path / "data"
    _run_child(d, [("send", 20), ("pull", 5)])
    _as_if_rebooted(d / "queues" / QUEUE / "messages")
    with qlog.open(d) as b:
        q = b.queue(QUEUE)
        q.send_batch([{"n": i} for i in range(3)])  # numbered past the reboot's gap
        assert q.purge() == 23  # 15 never pulled, 5 leased, 3 after the gap
        assert (q.stats().backlog, q.stats().purged) == (0, 23)
    with qlog.open(d) as b:  # a replica replaying the record counts the same
        assert b.queue(QUEUE).stats().purged == 23
