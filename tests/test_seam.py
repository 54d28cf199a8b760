"""Settings stored with the queue, lease ids, settle and extend, and queue
management: the behaviour the backend contract gives every process."""

from __future__ import annotations

import json
import pathlib

import pytest

import qlog
from qlog._consumer import Runner

Q = "jobs"
DLQ = "jobs-dlq"


@pytest.fixture
def reopen(make_broker):
    """A second broker on the same store: another process's view."""
    def second(broker: qlog.Broker, clock) -> qlog.Broker:
        return make_broker(clock=clock)
    return second


# ---- settings belong to the queue ------------------------------------------


def test_second_queue_call_keeps_delivery_delay(broker, clock):
    broker.queue(Q, delivery_delay=100)
    q = broker.queue(Q, max_retries=1)
    assert (q.settings.delivery_delay, q.settings.max_retries) == (100, 1)
    q.send("x")
    assert not q.pull(1).messages
    clock.advance(100)
    assert len(q.pull(1).messages) == 1


def test_consumer_start_keeps_producers_delivery_delay(broker, clock):
    producer = broker.queue(Q, delivery_delay=100)
    broker.consumer(Q, max_retries=0, max_batch_size=5)(lambda batch: None)
    Runner(broker, list(broker._push._consumers.values()), shutdown_timeout=0)  # starting the consumer stores its settings
    assert producer.settings.delivery_delay == 100
    assert (producer.settings.max_retries, producer.settings.max_batch_size) == (0, 5)
    producer.send("x")
    assert not producer.pull(1).messages
    clock.advance(100)
    assert len(producer.pull(1).messages) == 1


def test_producer_settings_keep_consumers_dead_letter_policy(broker, clock):
    consumer = broker.queue(Q, max_retries=0, dead_letter_queue=DLQ)
    producer = broker.queue(Q, delivery_delay=0)
    producer.send({"n": 1})
    batch = consumer.pull(1)
    assert [m.attempts for m in batch.messages] == [1]
    batch.messages[0].retry()
    assert consumer.stats().backlog == 0
    dead = broker.queue(DLQ).pull(10).messages
    assert [m.body for m in dead] == [{"n": 1}]
    assert dead[0].dead_letter is not None and dead[0].dead_letter.queue == Q


def test_another_process_pull_obeys_stored_dead_letter_policy(broker, clock, reopen):
    broker.queue(Q, max_retries=1, dead_letter_queue=DLQ, visibility_timeout=10)
    other = reopen(broker, clock)
    try:
        q = other.queue(Q)  # no settings given: the stored ones apply
        assert (q.settings.max_retries, q.settings.dead_letter_queue) == (1, DLQ)
        q.send("fails")
        for attempt in (1, 2):
            got = q.pull(1).messages
            assert [m.attempts for m in got] == [attempt]
            clock.advance(11)  # the lease runs out: a failed delivery
        assert not q.pull(1).messages
        assert q.stats().backlog == 0
        assert [m.body for m in broker.queue(DLQ).pull(10).messages] == ["fails"]
    finally:
        other.close()


def test_settings_change_reaches_an_open_handle_in_another_broker(broker, clock, reopen):
    q = broker.queue(Q)
    other = reopen(broker, clock)
    try:
        other.configure(Q, delivery_delay=30)
        assert q.settings.delivery_delay == 30
        q.send("later")
        assert not q.pull(1).messages
        clock.advance(30)
        assert len(q.pull(1).messages) == 1
    finally:
        other.close()


def test_settings_survive_reopen(broker, clock, reopen):
    broker.queue(Q, max_retries=5, retry_delay=7, dead_letter_queue=DLQ, message_retention=600)
    broker.close()
    with reopen(broker, clock) as b:
        s = b.queue(Q).settings
        assert (s.max_retries, s.retry_delay, s.dead_letter_queue, s.message_retention) == (5, 7, DLQ, 600)


def test_configure_changes_only_named_keys(broker):
    broker.queue(Q, max_retries=2, retry_delay=4)
    s = broker.configure(Q, retry_delay=9)
    assert (s.max_retries, s.retry_delay) == (2, 9)


def test_configure_refuses_missing_queue_and_handle_keys(broker):
    with pytest.raises(qlog.errors.QueueNotFoundError, match="'nope' does not exist"):
        broker.configure("nope", max_retries=1)
    assert "nope" not in broker.queues()
    broker.queue(Q)
    with pytest.raises(qlog.errors.SettingsError, match="durability"):
        broker.configure(Q, durability="none")
    with pytest.raises(qlog.errors.SettingsError, match="its own dead_letter_queue"):
        broker.configure(Q, dead_letter_queue=Q)
    with pytest.raises(qlog.errors.SettingsError, match="max_retries"):
        broker.configure(Q, max_retries=-1)
    assert broker.queue(Q).settings.max_retries == 3


@pytest.mark.local_only("qlog.toml is a file in the data directory")
def test_explicit_settings_win_over_qlog_toml(data_dir, make_broker, clock):
    d = data_dir
    d.mkdir()
    (d / "qlog.toml").write_text('[[queues.consumers]]\nqueue = "jobs"\nmax_retries = 7\nretry_delay = 2\n')
    with make_broker(clock=clock) as b:
        assert b.queue(Q).settings.max_retries == 7
        b.configure(Q, max_retries=1)
    with make_broker(clock=clock) as b:
        s = b.queue(Q).settings
        assert (s.max_retries, s.retry_delay) == (1, 2)  # stored wins; toml fills the rest


@pytest.mark.local_only("qlog.toml is a file in the data directory")
def test_wrangler_keys_in_qlog_toml(data_dir, make_broker, clock):
    d = data_dir
    d.mkdir()
    (d / "qlog.toml").write_text(
        '[[queues.producers]]\nqueue = "jobs"\nbinding = "JOBS"\n'
        '[[queues.consumers]]\nqueue = "jobs"\ntype = "http_pull"\nvisibility_timeout_ms = 2500\n'
    )
    with make_broker(clock=clock) as b:
        assert b.queue(Q).settings.visibility_timeout == 2.5
    (d / "qlog.toml").write_text('[[queues.consumers]]\nqueue = "jobs"\ntype = "cron"\n')
    with pytest.raises(qlog.errors.SettingsError, match="type"):
        make_broker(clock=clock)


# ---- lease ids, settle and extend -------------------------------------------


def test_every_delivery_has_its_own_lease_id(broker, clock):
    q = broker.queue(Q, visibility_timeout=10)
    q.send_batch([1, 2])
    first = q.pull(2).messages
    ids = [m.lease_id for m in first]
    assert len(set(ids)) == 2 and all(isinstance(i, str) for i in ids)
    clock.advance(11)
    again = q.pull(2).messages
    assert {m.id for m in again} == {m.id for m in first}
    assert not {m.lease_id for m in again} & set(ids)


def test_settle_from_another_process(broker, clock, reopen):
    q = broker.queue(Q, retry_delay=0)
    q.send_batch(["a", "b", "c"])
    leased = {m.body: m.lease_id for m in q.pull(3).messages}
    other = reopen(broker, clock)
    try:
        r = other.queue(Q).settle(acks=[leased["a"], leased["b"]], retries=[(leased["c"], 5)])
        assert (r.ack_count, r.retry_count, r.warnings) == (2, 1, [])
    finally:
        other.close()
    assert q.stats().backlog == 1
    assert not q.pull(3).messages  # c waits out its retry delay
    clock.advance(5)
    got = q.pull(3).messages
    assert [(m.body, m.attempts) for m in got] == [("c", 2)]


def test_stale_ack_counts_and_warns(broker, clock):
    q = broker.queue(Q, visibility_timeout=10)
    q.send("x")
    old = q.pull(1).messages[0].lease_id
    clock.advance(11)
    new = q.pull(1).messages[0]
    r = q.settle(acks=[old])
    assert r.ack_count == 1 and len(r.warnings) == 1 and "stale" in r.warnings[0]
    assert q.stats().backlog == 0
    r = q.settle(acks=[new.lease_id])
    assert r.ack_count == 0 and "done already" in r.warnings[0]


def test_stale_retry_never_disturbs_the_new_lease(broker, clock):
    q = broker.queue(Q, visibility_timeout=10)
    q.send("x")
    old = q.pull(1).messages[0].lease_id
    clock.advance(11)
    new = q.pull(1).messages[0]
    assert new.attempts == 2
    r = q.settle(retries=[(old, 0)])
    assert r.retry_count == 0 and "not the current lease" in r.warnings[0]
    assert q.stats().in_flight == 1
    assert not q.pull(1).messages  # still leased to the new delivery
    new.ack()
    assert q.stats().backlog == 0


def test_extend_keeps_attempts_and_the_message_hidden(broker, clock):
    q = broker.queue(Q, visibility_timeout=10)
    q.send("x")
    m = q.pull(1).messages[0]
    clock.advance(8)
    m.extend(30)
    clock.advance(20)  # past the first lease, inside the extension
    assert not q.pull(1).messages
    assert q.extend([m.lease_id], 30) == 1
    clock.advance(29)
    assert not q.pull(1).messages
    clock.advance(2)
    again = q.pull(1).messages
    assert [x.attempts for x in again] == [2]
    assert q.extend([m.lease_id], 30) == 0  # the old lease is stale now
    clock.advance(5)
    assert q.settle(acks=[again[0].lease_id]).ack_count == 1


def test_extend_from_another_process(broker, clock, reopen):
    q = broker.queue(Q, visibility_timeout=10)
    q.send("x")
    m = q.pull(1).messages[0]
    other = reopen(broker, clock)
    try:
        assert other.queue(Q).extend([m.lease_id], 100) == 1
    finally:
        other.close()
    clock.advance(50)
    assert not q.pull(1).messages
    assert q.stats().in_flight == 1


@pytest.mark.parametrize("bad", ["", "nonsense", 42, None, "0" * 16 + "0" * 16 + ".1"])
def test_invalid_lease_id_settles_nothing(broker, bad):
    q = broker.queue(Q)
    q.send("x")
    good = q.pull(1).messages[0].lease_id
    with pytest.raises(qlog.errors.InvalidLeaseError, match="not a lease id of queue 'jobs'"):
        q.settle(acks=[good, bad])
    with pytest.raises(qlog.errors.InvalidLeaseError):
        q.extend([bad])
    assert q.stats().in_flight == 1


def test_lease_id_of_another_queue_is_refused(broker):
    a, b = broker.queue("a"), broker.queue("b")
    a.send("x")
    lid = a.pull(1).messages[0].lease_id
    with pytest.raises(qlog.errors.InvalidLeaseError, match="queue 'b'"):
        b.settle(acks=[lid])
    assert a.stats().in_flight == 1


def test_settled_retry_at_last_attempt_goes_to_dead_letter_queue(broker):
    q = broker.queue(Q, max_retries=0, dead_letter_queue=DLQ)
    q.send("x")
    lid = q.pull(1).messages[0].lease_id
    assert q.settle(retries=[lid]).retry_count == 1
    assert [m.body for m in broker.queue(DLQ).pull(1).messages] == ["x"]


def test_bad_retry_delay_settles_nothing(broker):
    q = broker.queue(Q)
    q.send_batch(["a", "b"])
    ids = [m.lease_id for m in q.pull(2).messages]
    with pytest.raises(qlog.errors.DelayOutOfRangeError, match="delay_seconds must be .* 0 to 86400"):
        q.settle(acks=[ids[0]], retries=[(ids[1], -1)])
    assert q.stats().in_flight == 2


# ---- managing queues ----------------------------------------------------------


def test_create_and_delete_queue(broker):
    q = broker.create_queue("made", max_retries=2)
    assert q.settings.max_retries == 2
    assert "made" in broker.queues()
    with pytest.raises(qlog.errors.QueueExistsError, match="'made' already exists"):
        broker.create_queue("made")
    q.send("x")
    with pytest.raises(qlog.errors.QueueNotEmptyError, match="1 message"):
        broker.delete_queue("made")
    assert "made" in broker.queues()
    broker.delete_queue("made", force=True)
    assert "made" not in broker.queues()
    with pytest.raises(qlog.errors.QueueNotFoundError):
        broker.delete_queue("made")
    fresh = broker.create_queue("made")  # a new queue: no old messages, default settings
    assert fresh.stats().backlog == 0 and fresh.settings.max_retries == 3


def test_delete_empty_queue_needs_no_force(broker):
    q = broker.queue(Q)
    q.send("x")
    q.pull(1).ack_all()
    broker.delete_queue(Q)
    assert Q not in broker.queues()


def test_redrive_refuses_missing_target_unless_create(broker):
    q = broker.queue(Q, max_retries=0, dead_letter_queue=DLQ)
    q.send("x")
    q.pull(1).retry_all()
    with pytest.raises(qlog.errors.QueueNotFoundError, match="'typo' does not exist"):
        broker.redrive(DLQ, "typo")
    assert "typo" not in broker.queues()
    assert broker.queue(DLQ).stats().backlog == 1
    assert broker.redrive(DLQ, "typo", create=True) == {"typo": 1}
    assert [m.body for m in broker.queue("typo").pull(1).messages] == ["x"]


def test_redrive_back_to_origin(broker):
    q = broker.queue(Q, max_retries=0, dead_letter_queue=DLQ)
    q.send_batch([1, 2, 3])
    q.pull(3).retry_all()
    seen = []
    assert broker.redrive(DLQ, progress=seen.append) == {Q: 3}
    assert seen and seen[-1] == 3
    got = q.pull(3).messages
    assert sorted(m.body for m in got) == [1, 2, 3] and {m.attempts for m in got} == {1}


@pytest.mark.local_only("reads the local backend's settings file")
def test_stored_settings_file_is_json(broker):
    broker.queue(Q, max_retries=4)
    path = pathlib.Path(broker.path) / "queues" / Q / "settings.json"
    assert json.loads(path.read_text())["settings"] == {"max_retries": 4}
