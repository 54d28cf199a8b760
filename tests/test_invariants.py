"""The invariant checker (tests/_invariants.py) passes a queue that kept its
guarantees and catches each kind of violation, naming the offending ids.

Each test builds a small history in-process, with real files, breaks one
guarantee on purpose (by doing to the queue what no fault may do, or by
recording a fact the queue never returned), and runs :func:`check`."""

from __future__ import annotations

import os
import shutil
import time

import pytest

import damage
import qlog
from _invariants import Fact, FactWriter, body_key, check, make_body, read_facts

Q, DLQ = "jobs", "jobs-dlq"
SETTINGS = {Q: dict(max_retries=1, dead_letter_queue=DLQ, message_retention=None), DLQ: dict(message_retention=None)}


def _send(q: qlog.Queue, w: FactWriter, batch: str, n: int, mode: str = "sync") -> list:
    w.sending(Q, batch, n, mode)
    ids = q.send_batch([make_body(batch, i, n, 40) for i in range(n)])
    w.sent(Q, batch, mode, ids)
    return ids


@pytest.fixture
def history(tmp_path):
    """A queue with three returned batches of four, one message acked, one
    retried twice (into the DLQ), one left leased; returns (path, side
    file, ids, writer)."""
    path, side = str(tmp_path / "q"), str(tmp_path / "facts.txt")
    w = FactWriter(side)
    with qlog.open(path) as broker:
        q = broker.queue(Q, **SETTINGS[Q])
        ids = [mid for b in range(3) for mid in _send(q, w, f"b{b}", 4)]
        batch = q.pull(batch_size=3)
        w.delivered(Q, batch)
        a, r, _leased = batch.messages
        w.acking(Q, [a.id])
        a.ack()
        w.acked(Q, [a.id])
        w.retrying(Q, [r.id])
        r.retry()
        w.retried(Q, [r.id])
        (r2,) = q.pull(batch_size=1).messages    # the retried message comes first, attempts 2
        assert (r2.id, r2.attempts) == (r.id, 2)
        w.delivered(Q, [r2])
        w.retrying(Q, [r2.id])
        r2.retry()          # max_retries=1: to the dead-letter queue
        w.retried(Q, [r2.id])
    return path, side, ids, w


def test_a_queue_that_kept_its_guarantees_passes_with_counts(history):
    path, side, ids, _w = history
    rep = check(path, read_facts([side]), settings=SETTINGS)
    assert (rep.checked, rep.lost, rep.corrupt, rep.duplicates_otherwise, rep.dead_lettered) == (12, 0, 0, 0, 1)
    assert rep.redelivered == 1          # the message left leased
    assert sorted(mid for mid, _a, _b in rep.drained[Q]) == sorted(ids[2:])
    assert [mid for mid, _a, _b in rep.drained[DLQ]] == [ids[1]]
    # The drain's own facts make the history whole: checking again finds everything accounted for.
    again = check(path, read_facts([side]) + rep.facts, settings=SETTINGS)
    assert (again.lost, again.drained[Q]) == (0, [])


def test_a_message_gone_without_an_ack_is_lost(history):
    path, side, ids, _w = history
    with qlog.open(path) as broker:
        q = broker.queue(Q, **SETTINGS[Q])
        gone = q.pull(batch_size=1)
        gone.ack_all()      # not recorded: as if the queue dropped it
    with pytest.raises(AssertionError, match=f"1 messages lost: {Q}/{gone.messages[0].id}"):
        check(path, read_facts([side]), settings=SETTINGS)


def test_only_facts_that_must_survive_count_as_lost(history):
    path, side, _ids, w = history
    with qlog.open(path) as broker:
        q = broker.queue(Q, **SETTINGS[Q])
        (solo,) = _send(q, w, "solo", 1)
        while True:     # ack it, unrecorded: as if a power cut took its send
            batch = q.pull(batch_size=1)
            if batch.messages[0].id == solo:
                batch.ack_all()
                break
            batch.messages[0].retry()
    facts = read_facts([side])
    durable = [f for f in facts if f.id != solo]   # the cut came before that send was durable
    shutil.copytree(path, path + "-copy")
    with pytest.raises(AssertionError, match=f"1 messages lost: {Q}/{solo} \\(solo/0\\)"):
        check(path + "-copy", facts, settings=SETTINGS)    # every fact must survive: it is lost
    rep = check(path, facts, settings=SETTINGS, must=durable)
    assert rep.lost == 0 and rep.checked == 13


def test_an_ack_that_returned_is_never_undone(history):
    path, side, ids, w = history
    w.acked(Q, [ids[5]])    # the queue never saw this ack: the message is delivered at the drain
    with pytest.raises(AssertionError, match=f"{Q}/{ids[5]} was delivered at the drain .* its ack"):
        check(path, read_facts([side]), settings=SETTINGS)


def test_attempts_never_go_back(history):
    path, side, ids, _w = history
    facts = read_facts([side]) + [Fact("deliver", Q, id=ids[6], attempts=5)]
    with pytest.raises(AssertionError, match=f"{Q}/{ids[6]}: attempts went back: 1 at the drain after 5"):
        check(path, facts, settings=SETTINGS)


def test_a_message_nobody_sent_is_caught(history):
    path, side, _ids, _w = history
    with qlog.open(path) as broker:
        stray = broker.queue(Q, **SETTINGS[Q]).send(make_body("never", 0, 1))
    with pytest.raises(AssertionError, match=f"{Q}/{stray} \\(never/0\\) was never sent"):
        check(path, read_facts([side]), settings=SETTINGS)


def test_an_unreturned_send_may_land_but_only_whole(history):
    path, side, _ids, w = history
    with qlog.open(path) as broker:
        q = broker.queue(Q, **SETTINGS[Q])
        w.sending(Q, "inflight", 3, "sync")
        q.send_batch([make_body("inflight", i, 3) for i in range(3)])   # landed, never reported
    assert check(path, read_facts([side]), settings=SETTINGS).sends_in_flight == 3
    with qlog.open(path) as broker:
        q = broker.queue(Q, **SETTINGS[Q])
        w.sending(Q, "half", 3, "sync")
        q.send_batch([make_body("half", i, 3) for i in range(2)])       # two of its three messages
    with pytest.raises(AssertionError, match="batch half of 'jobs' is half there: messages \\[0, 1\\] of 3"):
        check(path, read_facts([side]), settings=SETTINGS)


def test_a_body_that_is_not_what_was_sent_under_its_id_is_corrupt(history):
    path, side, ids, _w = history
    facts = [f if not (f.kind == "sent" and f.id == ids[4]) else Fact("sent", Q, id=ids[4], key="b1/3",
                                                                        batch="b1", n=4, mode="sync")
             for f in read_facts([side])]
    with pytest.raises(AssertionError, match=f"{Q}/{ids[4]}: body is b1/0, the sender sent b1/3"):
        check(path, facts, settings=SETTINGS)


def test_a_body_failing_its_self_check_is_corrupt(tmp_path):
    path, side = str(tmp_path / "q"), str(tmp_path / "facts.txt")
    w = FactWriter(side)
    body = make_body("b", 0, 1, 10)
    body["pad"] = "x" * 10
    with pytest.raises(ValueError, match="self-check"):
        body_key(body)
    with qlog.open(path) as broker:
        w.sending(Q, "b", 1, "sync")
        w.sent(Q, "b", "sync", [broker.queue(Q, **SETTINGS[Q]).send(body)])
    with pytest.raises(AssertionError, match="(?s)corrupt=1 .*fails its self-check"):
        check(path, read_facts([side]), settings=SETTINGS)


def test_a_damaged_record_in_a_message_log_is_corrupt(history):
    path, side, _ids, _w = history
    seg = damage.segments(os.path.join(path, "queues", Q, "messages"))[0]
    rec = damage.records(seg)[5]        # within the log: the tail is whole
    damage.flip_byte(seg, rec.offset + rec.size // 2)
    with pytest.raises(AssertionError, match="damaged records in the logs: \\['jobs/messages: record"):
        check(path, read_facts([side]), settings=SETTINGS)


def test_a_returned_send_cut_off_as_a_torn_tail_is_lost(history):
    path, side, ids, _w = history
    seg = damage.segments(os.path.join(path, "queues", Q, "messages"))[0]
    rec = damage.records(seg)[-1]       # the last record: reopening cuts its whole batch as a torn tail
    damage.flip_byte(seg, rec.offset + rec.size // 2)
    with pytest.raises(AssertionError, match=f"(?s)torn_tail_bytes=[1-9].*4 messages lost: {Q}/{ids[8]} \\(b2/0\\)"):
        check(path, read_facts([side]), settings=SETTINGS)


def test_a_dead_letter_written_twice_counts_as_an_in_flight_duplicate(tmp_path):
    """A dead-lettering cut between the dead-letter queue's write and the
    journal's leaves a copy with the original id: counted, not a violation."""
    path, side = str(tmp_path / "q"), str(tmp_path / "facts.txt")
    settings = {Q: dict(SETTINGS[Q], max_retries=0), DLQ: SETTINGS[DLQ]}
    w = FactWriter(side)
    with qlog.open(path) as broker:
        q = broker.queue(Q, **settings[Q])
        (mid,) = _send(q, w, "d", 1)
        (m,) = q.pull(batch_size=1, visibility_timeout=0.001).messages
        w.delivered(Q, [m])
        q._b._move_dead([m._seq], [m.attempts], q._now_us(), q._policy)   # the DLQ copy, and no journal record
    rep = check(path, read_facts([side]), settings=settings)
    assert (rep.duplicates_in_flight, rep.duplicates_otherwise, rep.dead_lettered) == (1, 0, 1)
    assert [x[0] for x in rep.drained[DLQ]] == [mid, mid]


def test_messages_past_retention_count_as_expired_not_lost(tmp_path):
    path = str(tmp_path / "q")
    settings = {Q: dict(message_retention=60)}
    w = FactWriter()    # in memory
    with qlog.open(path) as broker:
        q = broker.queue(Q, **settings[Q])
        w.sent(Q, "r", "sync", q.send_batch([make_body("r", i, 2) for i in range(2)]))
    assert [f.kind for f in w.facts] == ["sent", "sent"]
    rep = check(path, w.facts, settings=settings, clock=lambda: time.time() + 3600)
    assert (rep.expired, rep.lost, rep.checked) == (2, 0, 2)


def test_an_ordered_history_has_growing_attempts_and_no_delivery_after_an_ack(history):
    path, side, ids, _w = history
    facts = read_facts([side])
    shutil.copytree(path, path + "-copy")
    back = facts + [Fact("deliver", Q, id=ids[5], attempts=3), Fact("deliver", Q, id=ids[5], attempts=2)]
    with pytest.raises(AssertionError, match=f"{Q}/{ids[5]} was delivered with attempts 2 after attempts 3"):
        check(path, back, settings=SETTINGS, ordered=True)
    after_ack = facts + [Fact("deliver", Q, id=ids[0], attempts=2)]   # ids[0]'s ack returned before
    with pytest.raises(AssertionError, match=f"{Q}/{ids[0]} was delivered \\(attempts 2\\) after its ack returned"):
        check(path + "-copy", after_ack, settings=SETTINGS, ordered=True)
