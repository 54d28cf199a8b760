"""Behaviour tests of the queue contract: send, pull, ack, retry, delays,
dead-letter queues, retention, stats, persistence and waiting pulls.

Every test runs on real files in its own directory.  Where time matters the
broker gets a clock the test moves by hand, so leases and delays run out
without real waiting.
"""

from __future__ import annotations

import gc
import json
import math
import os
import pathlib
import pickle
import threading
from datetime import datetime, timedelta, timezone
from typing import Callable, List

import pytest

from conftest import T0, HandClock

import qlog

QUEUE = "jobs"
DLQ = "jobs-dlq"
MAX_DELAY = 86_400


@pytest.fixture
def q(broker: qlog.Broker) -> qlog.Queue:
    return broker.queue(QUEUE)


def ids_of(batch) -> List[str]:
    return [m.id for m in batch]


def bodies_of(batch) -> list:
    return [m.body for m in batch]


def segments(directory: pathlib.Path) -> List[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".seg"))


def tree(root: pathlib.Path) -> List[str]:
    """Every path below ``root``, relative, sorted."""
    out = []
    for d, dirs, files in os.walk(root):
        out.extend(os.path.relpath(os.path.join(d, n), root) for n in dirs + files)
    return sorted(out)


def snapshot(queue: qlog.Queue) -> tuple:
    """What a failed send must leave as it was: backlog, waiting ids, message numbers given out."""
    s = queue.stats()
    return s.backlog, ids_of(queue.peek(100)), s.sent


def assert_nothing_written(queue: qlog.Queue, before: tuple) -> None:
    assert snapshot(queue) == before


# -- sending ----------------------------------------------------------------


def test_send_and_send_batch_return_unique_string_ids(broker, make_broker, clock):
    q = broker.queue(QUEUE)
    ids = [q.send({"n": i}) for i in range(3)]
    ids += q.send_batch([{"n": i} for i in range(3, 8)])
    other = broker.queue("other").send({"n": 0})
    broker.close()
    with make_broker(clock=clock) as again:
        ids += again.queue(QUEUE).send_batch([{"n": 8}, {"n": 9}])
    assert all(type(i) is str and i for i in ids + [other])
    assert len(set(ids + [other])) == 11


def test_pulled_messages_carry_the_ids_send_returned(q):
    ids = [q.send("a", content_type="text")] + q.send_batch(["b", "c"], content_type="text")
    assert ids_of(q.pull(batch_size=10)) == ids


@pytest.mark.parametrize(
    "body, content_type",
    [
        ({"user": 42, "tags": ["a", "é"], "ok": True, "none": None, "x": 1.5}, "json"),
        ([1, "two", 3.0], "json"),
        ("plain text, ünïcode ✓", "text"),
        (b"\x00\xffraw bytes", "bytes"),
        (b"", "bytes"),
        ({"set": {1, 2}, "tuple": (1, 2), "when": datetime(2024, 1, 2, tzinfo=timezone.utc)}, "pickle"),
    ],
    ids=["json-object", "json-list", "text", "bytes", "empty-bytes", "pickle"],
)
def test_body_round_trips_for_its_content_type(broker, body, content_type):
    q = broker.queue(QUEUE, allow_pickle=True)
    q.send(body, content_type=content_type)
    q.send_batch([body], content_type=content_type)
    batch = q.pull()
    assert bodies_of(batch) == [body, body]
    assert [m.content_type for m in batch] == [content_type, content_type]
    expected = {"json": lambda b: json.dumps(b, separators=(",", ":"), ensure_ascii=False).encode(),
                "text": str.encode, "bytes": bytes,
                "pickle": lambda b: pickle.dumps(b, protocol=pickle.HIGHEST_PROTOCOL)}[content_type]
    assert [m.raw_body for m in batch] == [expected(body)] * 2


def test_bytearray_and_memoryview_bodies_arrive_as_bytes(q):
    q.send(bytearray(b"ab"), content_type="bytes")
    q.send(memoryview(b"cd"), content_type="bytes")
    assert bodies_of(q.pull()) == [b"ab", b"cd"]


@pytest.mark.parametrize(
    "body, content_type",
    [(b"bytes", "text"), ("str", "bytes"), (object(), "json"), ({1: object()}, "json"), (42, "text"),
     ("\ud800", "text"), ({"s": "\ud800"}, "json")],
    ids=["bytes-as-text", "str-as-bytes", "object-as-json", "nested-object-as-json", "int-as-text",
         "lone-surrogate-text", "lone-surrogate-json"],
)
def test_body_of_the_wrong_type_raises_body_type_error_and_writes_nothing(q, body, content_type):
    q.send("earlier", content_type="text")
    before = snapshot(q)
    with pytest.raises(qlog.BodyTypeError) as e:
        q.send(body, content_type=content_type)
    assert isinstance(e.value, TypeError)
    with pytest.raises(qlog.BodyTypeError):
        q.send_batch([body], content_type=content_type)
    assert_nothing_written(q, before)


def test_content_type_may_be_a_str_subclass(q):
    """send() takes what send_batch() takes (it used to pickle the body, then
    fail packing the header with struct.error)."""

    class Name(str):
        pass

    q.send({"a": 1}, content_type=Name("json"))
    q.send_batch([{"b": 2}], content_type=Name("json"))
    batch = q.pull()
    assert bodies_of(batch) == [{"a": 1}, {"b": 2}]
    assert [m.content_type for m in batch] == ["json", "json"]
    with pytest.raises(qlog.PickleNotAllowedError):
        q.send("x", content_type=Name("pickle"))


@pytest.mark.parametrize("name, code", [("JSON", "json"), ("Text", "text"), ("BYTES", "bytes")])
def test_content_type_names_match_case_insensitively_as_on_cloudflare(q, name, code):
    body = b"\x00raw" if code == "bytes" else ("hello" if code == "text" else {"a": [1]})
    q.send(body, content_type=name)
    q.send_batch([body], content_type=name)
    q.send_batch([qlog.MessageSendRequest(body, content_type=name)])
    batch = q.pull()
    assert [m.content_type for m in batch] == [code] * 3
    assert bodies_of(batch) == [body] * 3


@pytest.mark.parametrize("content_type", ["xml", "jsonx", "", b"json", 1])
def test_unknown_content_type_raises_content_type_error(q, content_type):
    before = snapshot(q)
    with pytest.raises(qlog.ContentTypeError, match="json"):
        q.send("x", content_type=content_type)
    with pytest.raises(qlog.ContentTypeError):
        q.send_batch(["x"], content_type=content_type)
    with pytest.raises(qlog.ContentTypeError):
        q.send_batch([qlog.MessageSendRequest("x", content_type=content_type)])
    assert_nothing_written(q, before)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_number_in_json_body_raises_body_type_error(q, value):
    before = snapshot(q)
    with pytest.raises(qlog.BodyTypeError):
        q.send({"x": value})
    with pytest.raises(qlog.BodyTypeError):
        q.send_batch([{"x": [value]}])
    assert_nothing_written(q, before)


def test_circular_json_body_raises_body_type_error(q):
    loop: list = []
    loop.append(loop)
    before = snapshot(q)
    with pytest.raises(qlog.BodyTypeError):
        q.send(loop)
    with pytest.raises(qlog.BodyTypeError):
        q.send_batch([{"a": loop}])
    assert_nothing_written(q, before)


def test_message_over_max_message_size_raises_naming_the_limit(broker):
    q = broker.queue(QUEUE, max_message_size=1000)
    q.send(b"x" * 1000, content_type="bytes")  # exactly the limit is allowed
    before = snapshot(q)
    with pytest.raises(qlog.MessageTooLargeError, match="1000") as e:
        q.send(b"x" * 1001, content_type="bytes")
    assert "1001" in str(e.value)
    with pytest.raises(qlog.MessageTooLargeError, match="1000"):
        q.send("y" * 1001, content_type="text")
    with pytest.raises(qlog.MessageTooLargeError, match="1000"):
        q.send_batch([b"ok", b"x" * 1001], content_type="bytes")
    assert_nothing_written(q, before)


def test_default_max_message_size_is_128_kib(q):
    q.send(b"x" * 131072, content_type="bytes")
    with pytest.raises(qlog.MessageTooLargeError, match="131072"):
        q.send(b"x" * 131073, content_type="bytes")


def test_send_batch_of_more_than_1000_messages_raises_batch_too_large(q):
    before = snapshot(q)
    with pytest.raises(qlog.BatchTooLargeError, match="1000"):
        q.send_batch([b""] * 1001, content_type="bytes")
    assert_nothing_written(q, before)
    assert len(q.send_batch([b""] * 1000, content_type="bytes")) == 1000


def test_empty_send_batch_raises_batch_too_large(q):
    with pytest.raises(qlog.BatchTooLargeError):
        q.send_batch([])
    with pytest.raises(qlog.BatchTooLargeError):
        q.send_batch(iter(()))
    assert snapshot(q) == (0, [], 0)


@pytest.mark.parametrize(
    "bad",
    [
        b"not json",
        {"nan": math.nan},
        qlog.MessageSendRequest(b"x", content_type="yaml"),
        qlog.MessageSendRequest(123, content_type="text"),
        qlog.MessageSendRequest("x", delay_seconds=-1),
        qlog.MessageSendRequest({"p": 1}, content_type="pickle"),
        qlog.MessageSendRequest(b"x" * 2000, content_type="bytes"),
    ],
    ids=["body-type", "nan", "content-type", "request-body-type", "delay", "pickle", "too-large"],
)
def test_batch_with_one_bad_message_writes_none_of_them(broker, bad):
    q = broker.queue(QUEUE, max_message_size=1000)
    q.send({"earlier": True})
    before = snapshot(q)
    good = [{"n": 1}, qlog.MessageSendRequest("two", content_type="text")]
    with pytest.raises(qlog.QlogError):
        q.send_batch([*good, bad, {"n": 4}])
    assert_nothing_written(q, before)
    assert bodies_of(q.pull()) == [{"earlier": True}]


@pytest.mark.parametrize("delay", [-1, -0.001, MAX_DELAY + 1, "5", math.nan, math.inf, True],
                         ids=["-1", "-0.001", "86401", "str", "nan", "inf", "bool"])
def test_delay_out_of_range_raises_naming_86400(q, delay):
    before = snapshot(q)
    with pytest.raises(qlog.DelayOutOfRangeError, match="86400"):
        q.send("x", content_type="text", delay_seconds=delay)
    with pytest.raises(qlog.DelayOutOfRangeError, match="86400"):
        q.send_batch(["x"], content_type="text", delay_seconds=delay)
    with pytest.raises(qlog.DelayOutOfRangeError, match="86400"):
        q.send_batch([qlog.MessageSendRequest("x", content_type="text", delay_seconds=delay)])
    assert_nothing_written(q, before)


@pytest.mark.parametrize("delay", [-1, MAX_DELAY + 1, "5"])
def test_retry_with_delay_out_of_range_raises_and_leaves_the_message_open(q, delay):
    q.send_batch([1, 2])
    a, b = q.pull().messages
    with pytest.raises(qlog.DelayOutOfRangeError, match="86400"):
        a.retry(delay_seconds=delay)
    with pytest.raises(qlog.DelayOutOfRangeError, match="86400"):
        qlog.MessageBatch(q, [b]).retry_all(delay_seconds=delay)
    a.ack()
    b.ack()
    assert q.stats().acked == 2


def test_delay_of_exactly_86400_is_accepted(q, clock):
    q.send("x", content_type="text", delay_seconds=MAX_DELAY)
    assert len(q.pull()) == 0
    clock.advance(MAX_DELAY)
    assert bodies_of(q.pull()) == ["x"]


def test_pickle_without_opt_in_is_refused_on_send(q):
    before = snapshot(q)
    with pytest.raises(qlog.PickleNotAllowedError, match="allow_pickle"):
        q.send({"a": 1}, content_type="pickle")
    with pytest.raises(qlog.PickleNotAllowedError):
        q.send_batch([{"a": 1}], content_type="pickle")
    with pytest.raises(qlog.PickleNotAllowedError):
        q.send_batch([qlog.MessageSendRequest({"a": 1}, content_type="pickle")])
    assert_nothing_written(q, before)


def test_pickle_without_opt_in_is_refused_on_decode(broker, make_broker, clock):
    broker.queue(QUEUE, allow_pickle=True).send({"a": 1}, content_type="pickle")
    with make_broker(clock=clock) as other:
        q = other.queue(QUEUE)
        (m,) = q.peek()
        with pytest.raises(qlog.PickleNotAllowedError, match="allow_pickle"):
            m.body
        (m,) = q.pull().messages
        with pytest.raises(qlog.PickleNotAllowedError):
            m.body
        assert m.content_type == "pickle"


# -- queue names ------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "Jobs_2024-high", "x" * 63, "-", "_"])
def test_valid_queue_names_are_accepted(broker, name):
    q = broker.queue(name)
    q.send("hi", content_type="text")
    assert bodies_of(q.pull()) == ["hi"]
    assert broker.queues() == [name]


BAD_NAMES = pytest.mark.parametrize(
    "name",
    ["", "../x", "a/b", "x" * 64, "a\x00b", "é", ".", "..", "a b", "/abs", "a\n", 5, None],
    ids=["empty", "dotdot-slash", "slash", "64-chars", "nul", "non-ascii", "dot", "dotdot",
         "space", "absolute", "newline", "int", "none"],
)


@BAD_NAMES
def test_invalid_queue_name_raises_and_creates_no_queue(broker, name):
    with pytest.raises(qlog.InvalidQueueNameError, match="63"):
        broker.queue(name)
    assert broker.queues() == []


@pytest.mark.local_only("looks at the files below the data directory")
@BAD_NAMES
def test_invalid_queue_name_creates_no_file(broker, tmp_path, name):
    before = tree(tmp_path)
    with pytest.raises(qlog.InvalidQueueNameError):
        broker.queue(name)
    assert tree(tmp_path) == before


# -- messages ---------------------------------------------------------------


def test_timestamp_is_the_utc_send_time_from_the_clock(q, clock):
    q.send("first", content_type="text")
    clock.advance(2.5)
    q.send_batch(["second"], content_type="text")
    clock.advance(100)
    first, second = q.pull().messages
    assert first.timestamp == datetime.fromtimestamp(T0, tz=timezone.utc)
    assert second.timestamp == first.timestamp + timedelta(seconds=2.5)
    assert first.timestamp.tzinfo is not None and first.timestamp.utcoffset() == timedelta(0)


def test_timestamp_is_near_send_time_with_the_real_clock(make_broker):
    import time

    with make_broker() as b:
        q = b.queue(QUEUE)
        before = time.time()
        q.send(1)
        after = time.time()
        (m,) = q.pull().messages
    assert m.timestamp.utcoffset() == timedelta(0)
    assert before - 1e-6 <= m.timestamp.timestamp() <= after + 1e-6


def test_first_delivery_has_attempts_one_and_no_dead_letter_info(q):
    q.send_batch([1, 2, 3])
    batch = q.pull()
    assert [m.attempts for m in batch] == [1, 1, 1]
    assert [m.dead_letter for m in batch] == [None, None, None]
    assert batch.queue == QUEUE and len(batch) == 3 and tuple(batch) == batch.messages


# -- first call wins --------------------------------------------------------


def test_ack_then_retry_keeps_the_ack(q, clock):
    q.send("x", content_type="text")
    (m,) = q.pull().messages
    m.ack()
    m.retry()
    clock.advance(3600)
    assert len(q.pull()) == 0
    s = q.stats()
    assert (s.acked, s.backlog) == (1, 0)


def test_retry_then_ack_keeps_the_retry(q):
    q.send("x", content_type="text")
    (m,) = q.pull().messages
    m.retry()
    m.ack()
    (again,) = q.pull().messages
    assert (again.id, again.attempts) == (m.id, 2)
    assert q.stats().acked == 0


@pytest.mark.parametrize("single, batch_call, left", [("ack", "retry_all", 2), ("retry", "ack_all", 1)])
def test_single_message_call_beats_a_later_batch_call(q, single, batch_call, left):
    q.send_batch([1, 2])
    batch = q.pull()
    getattr(batch.messages[0], single)()
    getattr(batch, batch_call)()  # settles only the message left open
    assert [(m.body, m.attempts) for m in q.pull()] == [(left, 2)]
    assert q.stats().acked == 1


def test_second_ack_all_or_retry_all_changes_nothing(q, clock):
    q.send_batch([1, 2])
    batch = q.pull()
    batch.ack_all()
    batch.retry_all()
    batch.ack_all()
    clock.advance(3600)
    assert len(q.pull()) == 0
    assert q.stats().acked == 2


def deliver_twice(q: qlog.Queue, clock: HandClock, second_lease: float = 1) -> tuple:
    """Send one message, let its first 1-second lease run out, pull it again:
    (first delivery, second delivery)."""
    q.send("x", content_type="text")
    (first,) = q.pull(visibility_timeout=1).messages
    clock.advance(1)
    (second,) = q.pull(visibility_timeout=second_lease).messages
    assert (first.attempts, second.attempts) == (1, 2)
    return first, second


def test_ack_from_a_superseded_delivery_still_finishes_the_message(q, clock):
    old, _new = deliver_twice(q, clock)
    old.ack()
    clock.advance(10)
    assert len(q.pull()) == 0
    assert q.stats().acked == 1


def test_retry_from_a_superseded_delivery_changes_nothing(q, clock):
    old, _new = deliver_twice(q, clock, second_lease=30)
    old.retry()
    assert len(q.pull()) == 0  # the new lease still holds
    assert q.stats().in_flight == 1


def test_peeked_message_cannot_be_acked_or_retried(q):
    q.send("x", content_type="text")
    (m,) = q.peek()
    with pytest.raises(qlog.QlogError):
        m.ack()
    with pytest.raises(qlog.QlogError):
        m.retry()
    assert [(m.body, m.attempts) for m in q.pull()] == [("x", 1)]


# -- leases -----------------------------------------------------------------


def test_expired_lease_is_redelivered_with_attempts_plus_one(q, clock):
    q.send("x", content_type="text")
    (first,) = q.pull(visibility_timeout=10).messages
    clock.advance(10)
    (second,) = q.pull(visibility_timeout=10).messages
    clock.advance(10)
    (third,) = q.pull().messages
    assert [first.attempts, second.attempts, third.attempts] == [1, 2, 3]
    assert first.id == second.id == third.id


def test_message_under_a_valid_lease_is_not_delivered_to_a_second_pull(q, make_broker, clock):
    q.send("x", content_type="text")
    assert len(q.pull(visibility_timeout=10)) == 1
    clock.advance(9.5)
    assert len(q.pull()) == 0
    with make_broker(clock=clock) as other:
        assert len(other.queue(QUEUE).pull()) == 0
        assert other.queue(QUEUE).stats().in_flight == 1


def test_queue_visibility_timeout_is_the_default_lease(broker, clock):
    q = broker.queue(QUEUE, visibility_timeout=5)
    q.send("x", content_type="text")
    assert len(q.pull()) == 1
    clock.advance(4.5)
    assert len(q.pull()) == 0
    clock.advance(0.5)
    assert [m.attempts for m in q.pull()] == [2]


def test_pull_batch_size_limits_the_batch(q):
    q.send_batch(list(range(25)))
    assert len(q.pull()) == 10  # max_batch_size default
    assert len(q.pull(batch_size=3)) == 3
    assert len(q.pull(batch_size=1000)) == 12
    for bad in (0, 1001, 2.0, True):
        with pytest.raises(qlog.BatchTooLargeError):
            q.pull(batch_size=bad)


# -- delays -----------------------------------------------------------------


def test_retry_delay_hides_the_message_until_it_passes(q, clock):
    q.send("x", content_type="text")
    (m,) = q.pull().messages
    m.retry(delay_seconds=10)
    assert q.stats().delayed == 1
    clock.advance(9.5)
    assert len(q.pull()) == 0
    clock.advance(0.5)
    assert [(m.body, m.attempts) for m in q.pull()] == [("x", 2)]


def test_retry_without_delay_uses_the_queue_retry_delay(broker, clock):
    q = broker.queue(QUEUE, retry_delay=30)
    q.send_batch([1, 2])
    a, b = q.pull().messages
    a.retry()
    qlog.MessageBatch(q, [b]).retry_all()
    clock.advance(29.5)
    assert len(q.pull()) == 0
    clock.advance(0.5)
    assert [(m.body, m.attempts) for m in q.pull()] == [(1, 2), (2, 2)]


def test_retry_delay_zero_overrides_the_queue_retry_delay(broker):
    q = broker.queue(QUEUE, retry_delay=30)
    q.send(1)
    (m,) = q.pull().messages
    m.retry(delay_seconds=0)
    assert [m.attempts for m in q.pull()] == [2]


def test_retry_all_delay_applies_to_every_message(q, clock):
    q.send_batch([1, 2, 3])
    q.pull().retry_all(delay_seconds=60)
    assert q.stats().delayed == 3
    clock.advance(59.5)
    assert len(q.pull()) == 0
    clock.advance(0.5)
    assert [(m.body, m.attempts) for m in q.pull()] == [(1, 2), (2, 2), (3, 2)]


def test_send_delay_seconds_hides_the_message_until_it_passes(q, clock):
    q.send("late", content_type="text", delay_seconds=5)
    q.send("now", content_type="text")
    assert bodies_of(q.pull()) == ["now"]
    clock.advance(4.5)
    assert len(q.pull()) == 0
    clock.advance(0.5)
    assert [(m.body, m.attempts) for m in q.pull()] == [("late", 1)]


def test_send_batch_delay_applies_to_every_message_and_requests_may_override_it(q, clock):
    q.send_batch(
        [1, qlog.MessageSendRequest(2, delay_seconds=0), qlog.MessageSendRequest(3, delay_seconds=20)],
        delay_seconds=10,
    )
    assert bodies_of(q.pull()) == [2]
    clock.advance(10)
    assert bodies_of(q.pull()) == [1]
    clock.advance(10)
    assert bodies_of(q.pull()) == [3]


def test_delivery_delay_setting_delays_every_send(broker, clock):
    q = broker.queue(QUEUE, delivery_delay=30)
    q.send(1)
    q.send_batch([2, 3])
    q.send_batch([qlog.MessageSendRequest(4)])
    q.send(5, delay_seconds=0)  # an explicit delay beats the default
    now = q.pull()
    assert bodies_of(now) == [5]
    now.ack_all()
    clock.advance(29.5)
    assert len(q.pull()) == 0
    clock.advance(0.5)
    assert bodies_of(q.pull()) == [1, 2, 3, 4]


def test_delayed_messages_are_delivered_in_send_order(q, clock):
    for i in range(5):
        q.send(i, delay_seconds=5)
    assert len(q.pull()) == 0  # the pull has seen them: they wait as deferred entries
    for i in range(5, 10):
        q.send(i, delay_seconds=5)
    clock.advance(5)
    assert bodies_of(q.pull(batch_size=100)) == list(range(10))


def test_messages_with_shorter_delays_become_visible_first(q, clock):
    q.send("ten", content_type="text", delay_seconds=10)
    q.send("five", content_type="text", delay_seconds=5)
    clock.advance(5)
    assert bodies_of(q.pull()) == ["five"]
    clock.advance(5)
    assert bodies_of(q.pull()) == ["ten"]


# -- dead-letter queues -----------------------------------------------------


def test_fourth_failure_moves_message_to_dlq(broker, clock):
    q = broker.queue(QUEUE, max_retries=3, dead_letter_queue=DLQ)
    q.send({"job": 1})
    attempts = []
    for _ in range(4):
        (m,) = q.pull().messages
        attempts.append(m.attempts)
        m.retry()
    assert attempts == [1, 2, 3, 4]
    assert len(q.pull()) == 0
    assert bodies_of(broker.queue(DLQ).pull()) == [{"job": 1}]
    s = q.stats()
    assert (s.dead_lettered, s.backlog, s.deleted) == (1, 0, 0)


def test_fourth_lease_expiry_moves_message_to_dlq(broker, clock):
    q = broker.queue(QUEUE, max_retries=3, dead_letter_queue=DLQ)
    q.send({"job": 1})
    attempts = []
    for _ in range(4):
        (m,) = q.pull(visibility_timeout=10).messages
        attempts.append(m.attempts)
        clock.advance(10)
    assert attempts == [1, 2, 3, 4]
    assert len(q.pull()) == 0
    assert bodies_of(broker.queue(DLQ).pull()) == [{"job": 1}]
    assert q.stats().dead_lettered == 1


def test_attempts_is_read_only(q):
    q.send(1)
    (m,) = q.pull().messages
    with pytest.raises(AttributeError):
        m.attempts = 5
    assert m.attempts == 1


def test_batch_messages_is_read_only_and_ack_all_reaches_every_message(q):
    q.send_batch([1, 2, 3])
    batch = q.pull()
    with pytest.raises(AttributeError):
        batch.messages.pop()  # a tuple: no pop
    with pytest.raises(AttributeError):
        batch.messages = []
    assert len(batch.messages) == 3
    batch.ack_all()
    assert q.stats().acked == 3 and q.stats().backlog == 0


def test_pull_on_a_paused_queue_says_paused_and_an_empty_one_does_not(q):
    empty = q.pull()
    assert not empty and empty.paused is False
    q.send(1)
    q.pause_delivery()
    paused = q.pull()
    assert not paused and paused.paused is True
    q.resume_delivery()
    got = q.pull()
    assert bodies_of(got) == [1] and got.paused is False


def test_visible_at_is_the_send_time_plus_the_delay_and_the_move_time_in_a_dlq(broker, clock):
    assert broker.clock is clock
    q = broker.queue(QUEUE, max_retries=0, dead_letter_queue=DLQ)
    q.send("now", content_type="text")
    q.send("later", content_type="text", delay_seconds=30)
    (waiting,) = [m for m in q.peek() if m.body == "later"]
    assert waiting.visible_at == datetime.fromtimestamp(T0 + 30, tz=timezone.utc)
    assert waiting.visible_at > datetime.fromtimestamp(clock(), tz=timezone.utc)
    clock.advance(5)
    (m,) = q.pull().messages
    assert m.visible_at == m.timestamp == datetime.fromtimestamp(T0, tz=timezone.utc)
    m.retry()  # past max_retries: moved to the DLQ now
    clock.advance(1)
    (d,) = broker.queue(DLQ).peek()
    assert d.timestamp == m.timestamp
    assert d.visible_at == datetime.fromtimestamp(T0 + 5, tz=timezone.utc)


def test_dead_lettered_message_keeps_id_timestamp_body_and_content_type(broker, clock):
    q = broker.queue(QUEUE, max_retries=1, dead_letter_queue=DLQ)
    sent_id = q.send("payload", content_type="text")
    clock.advance(7)
    for _ in range(2):
        (m,) = q.pull().messages
        m.retry()
    moved_at = clock()
    clock.advance(3)
    (d,) = broker.queue(DLQ).pull().messages
    assert (d.id, d.body, d.content_type) == (sent_id, "payload", "text")
    assert d.timestamp == datetime.fromtimestamp(T0, tz=timezone.utc)
    assert d.attempts == 1
    assert d.dead_letter == qlog.DeadLetterInfo(
        queue=QUEUE, attempts=2, dead_lettered_at=datetime.fromtimestamp(moved_at, tz=timezone.utc)
    )


def test_dead_lettered_message_is_a_normal_message_of_its_new_queue(broker, clock):
    q = broker.queue(QUEUE, max_retries=0, dead_letter_queue=DLQ)
    q.send(1)
    q.pull().retry_all()
    dlq = broker.queue(DLQ)
    (d,) = dlq.pull(visibility_timeout=5).messages
    clock.advance(5)
    (again,) = dlq.pull().messages
    assert (again.id, again.attempts, again.dead_letter.queue) == (d.id, 2, QUEUE)
    again.ack()
    assert dlq.stats().acked == 1


def test_failed_message_without_dlq_is_deleted_and_counted(broker, clock):
    q = broker.queue(QUEUE, max_retries=2)
    q.send_batch([1, 2])
    for _ in range(3):
        q.pull().messages[0].retry()  # message 1 by retry
        clock.advance(30)             # message 2 by lease expiry
    assert len(q.pull()) == 0
    s = q.stats()
    assert (s.deleted, s.dead_lettered, s.backlog) == (2, 0, 0)
    assert broker.queues() == [QUEUE]


def test_max_retries_zero_ends_a_message_at_its_first_failure(broker, clock):
    q = broker.queue(QUEUE, max_retries=0, dead_letter_queue=DLQ)
    q.send_batch([1, 2])
    a, b = q.pull(visibility_timeout=10).messages
    a.retry()
    clock.advance(10)  # b's only lease runs out
    assert len(q.pull()) == 0
    moved = broker.queue(DLQ).pull()
    assert sorted((m.body, m.attempts, m.dead_letter.attempts) for m in moved) == [(1, 1, 1), (2, 1, 1)]
    assert q.stats().dead_lettered == 2


def test_final_retry_of_a_message_acked_through_an_earlier_delivery_does_not_dead_letter_it(broker, clock):
    q = broker.queue(QUEUE, max_retries=1, dead_letter_queue=DLQ)
    old, last = deliver_twice(q, clock)
    old.ack()      # finishes the message
    last.retry()   # would be its final failure, but it is already done
    s = q.stats()
    assert (s.acked, s.dead_lettered) == (1, 0)
    assert broker.queue(DLQ).peek() == []


def test_final_retry_after_the_lease_ran_out_leaves_one_copy_in_the_dlq(broker, clock):
    q = broker.queue(QUEUE, max_retries=0, dead_letter_queue=DLQ)
    sent_id = q.send(1)
    (m,) = q.pull(visibility_timeout=1).messages
    clock.advance(1)
    assert len(q.pull()) == 0  # the lease ran out: this pull moved it to the DLQ
    m.retry()                  # the late retry of that same failed delivery
    assert q.stats().dead_lettered == 1
    assert ids_of(broker.queue(DLQ).peek()) == [sent_id]


# -- retention --------------------------------------------------------------


def test_never_delivered_message_past_retention_is_dropped_and_counted(broker, clock):
    q = broker.queue(QUEUE, message_retention=60)
    q.send_batch([1, 2])
    clock.advance(30)
    q.send(3)
    clock.advance(30)
    assert bodies_of(q.pull()) == [3]
    s = q.stats()
    assert (s.expired, s.backlog) == (2, 1)


def test_message_just_younger_than_retention_is_delivered(broker, clock):
    q = broker.queue(QUEUE, message_retention=60)
    q.send(1)
    clock.advance(59.5)
    assert bodies_of(q.pull()) == [1]
    assert q.stats().expired == 0


def test_redelivery_candidate_past_retention_is_dropped_and_counted(broker, clock):
    q = broker.queue(QUEUE, message_retention=60)
    q.send_batch([1, 2])
    a, b = q.pull(visibility_timeout=10).messages
    a.retry(delay_seconds=30)  # waiting out a retry delay
    clock.advance(60)          # b's lease ran out long ago
    assert len(q.pull()) == 0
    s = q.stats()
    assert (s.expired, s.backlog, s.delayed, s.in_flight) == (2, 0, 0, 0)


def test_expire_drops_old_messages_without_a_pull(broker, clock):
    q = broker.queue(QUEUE, message_retention=120)
    q.send_batch([1, 2, 3])
    clock.advance(60)
    q.send(4)
    assert q.expire() == 0
    clock.advance(60)
    assert q.expire() == 3
    s = q.stats()
    assert (s.expired, s.backlog) == (3, 1)
    assert bodies_of(q.peek()) == [4]


def test_send_expires_old_messages_on_its_own(broker, clock):
    q = broker.queue(QUEUE, message_retention=60)
    q.send(1)
    clock.advance(61)
    q.send(2)
    assert q.stats().expired == 1
    assert bodies_of(q.peek()) == [2]


def test_unlimited_retention_keeps_old_messages(broker, clock):
    q = broker.queue(QUEUE, message_retention=None)
    q.send_batch([1, 2])
    q.pull(batch_size=1).retry_all()
    clock.advance(30 * 86_400)
    assert q.expire() == 0
    assert [(m.body, m.attempts) for m in q.pull()] == [(1, 2), (2, 1)]
    assert q.stats().expired == 0


def test_default_retention_is_four_days(q, clock):
    q.send(1)
    clock.advance(4 * 86_400 - 1)
    q.send(2)
    assert bodies_of(q.peek()) == [1, 2]
    clock.advance(1)
    assert bodies_of(q.pull()) == [2]
    assert q.stats().expired == 1


# -- ordering ---------------------------------------------------------------


def test_messages_become_visible_in_send_order(q):
    sent = []
    for i in range(12):
        sent.append(q.send(i))
    sent += q.send_batch(list(range(12, 40)))
    for i in range(40, 45):
        sent.append(q.send(i))
    got = []
    while True:
        batch = q.pull(batch_size=7)
        if not batch:
            break
        got += ids_of(batch)
        assert bodies_of(batch) == sorted(bodies_of(batch))
        batch.ack_all()
    assert got == sent


# -- stats, peek, purge, listing -------------------------------------------


def test_stats_count_backlog_in_flight_delayed_and_acked(q):
    q.send_batch([1, 2, 3, 4])
    a, b = q.pull(batch_size=2).messages
    s = q.stats()
    assert (s.backlog, s.in_flight, s.delayed, s.acked) == (4, 2, 0, 0)
    a.retry(delay_seconds=10)
    s = q.stats()
    assert (s.backlog, s.in_flight, s.delayed, s.acked) == (4, 1, 1, 0)
    b.ack()
    s = q.stats()
    assert (s.backlog, s.in_flight, s.delayed, s.acked) == (3, 0, 1, 1)


def test_stats_in_flight_drops_when_a_lease_runs_out(q, clock):
    q.send(1)
    q.pull(visibility_timeout=5)
    assert q.stats().in_flight == 1
    clock.advance(5)
    s = q.stats()
    assert (s.in_flight, s.backlog) == (0, 1)


def test_stats_oldest_age_follows_the_clock(q, clock):
    assert q.stats().oldest_age is None
    q.send(1)
    clock.advance(7)
    q.send(2)
    assert q.stats().oldest_age == pytest.approx(7.0)
    q.pull(batch_size=1).ack_all()
    assert q.stats().oldest_age == pytest.approx(0.0)
    clock.advance(2)
    assert q.stats().oldest_age == pytest.approx(2.0)
    q.pull().ack_all()
    assert q.stats().oldest_age is None


def test_fresh_queue_stats_are_all_zero(q):
    assert q.stats() == qlog.QueueStats(0, 0, 0, 0, 0, 0, 0, 0, None,
                                        delivery_buckets=(0,) * (len(qlog.DELIVERY_BUCKETS) + 1))


def test_stats_count_retries_lease_expiries_and_first_delivery_latency(broker, make_broker, clock):
    q = broker.queue(QUEUE, max_retries=1)
    q.send_batch([1, 2, 3])
    clock.advance(1.0)  # exactly on a bound: counted at or below it
    a, b = q.pull(2, visibility_timeout=10).messages
    a.retry(delay_seconds=5)
    clock.advance(1.0)
    (c,) = q.pull(1, visibility_timeout=10).messages  # message 3 after 2 s
    assert c.body == 3
    clock.advance(10)  # b's and c's leases run out
    again = q.pull(10, visibility_timeout=10).messages  # a (retried), b and c again
    assert sorted(m.body for m in again) == [1, 2, 3] and {m.attempts for m in again} == {2}
    clock.advance(10)  # and again: now at max_retries, so a pull deletes them
    assert not q.pull(10).messages
    at_1s = qlog.DELIVERY_BUCKETS.index(1.0)
    for s in (q.stats(), make_broker(clock=clock).queue(QUEUE).stats()):  # another broker reads the same
        assert (s.retried, s.lease_expired, s.deleted) == (1, 2 + 3, 3)
        want = [0] * (len(qlog.DELIVERY_BUCKETS) + 1)
        want[at_1s] = 2
        want[at_1s + 1] = 1  # 2 s: above 1 s, at most the next bound
        assert list(s.delivery_buckets) == want
        assert s.delivery_seconds == pytest.approx(4.0)


def test_peek_shows_messages_without_leasing_or_changing_them(q):
    q.send_batch([1, 2, 3])
    shown = q.peek()
    assert [(m.body, m.attempts) for m in shown] == [(1, 0), (2, 0), (3, 0)]
    before = q.stats()
    assert q.peek(2) and bodies_of(q.peek(2)) == [1, 2]
    assert q.stats() == before
    batch = q.pull(batch_size=1)
    assert [(m.body, m.attempts) for m in q.peek()] == [(1, 1), (2, 0), (3, 0)]
    assert ids_of(q.peek()) == ids_of(shown)
    assert [m.attempts for m in batch] == [1]
    assert [m.attempts for m in q.pull()] == [1, 1]


def test_peek_leaves_out_finished_messages(q):
    q.send_batch([1, 2, 3])
    q.pull(batch_size=2).messages[0].ack()
    assert bodies_of(q.peek()) == [2, 3]


def test_purge_drops_every_message_and_returns_how_many(q, clock):
    q.send_batch([1, 2, 3, 4])
    q.send(5, delay_seconds=60)
    q.pull(batch_size=2).messages[0].ack()  # one done, one in flight
    assert q.purge() == 4
    clock.advance(3600)
    assert len(q.pull()) == 0
    assert q.peek() == []
    s = q.stats()
    assert (s.purged, s.backlog, s.in_flight, s.acked) == (4, 0, 0, 1)
    q.send(6)
    assert bodies_of(q.pull()) == [6]


def test_broker_lists_its_queues_sorted(broker, make_broker, clock):
    assert broker.queues() == []
    for name in ("zeta", "Alpha", "mid-1"):
        broker.queue(name)
    assert broker.queues() == ["Alpha", "mid-1", "zeta"]
    with make_broker(clock=clock) as other:
        assert other.queues() == ["Alpha", "mid-1", "zeta"]


@pytest.mark.local_only("the local backend's log engine")
def test_every_log_of_a_local_queue_is_on_the_backends_engine(backend, broker):
    engine = {"local-c": "qlog._log.clog", "local-pure": "qlog._log.purelog"}[backend.name]
    q = broker.queue(QUEUE, max_retries=0, dead_letter_queue=DLQ)
    dlq = broker.queue(DLQ)
    assert {type(log).__module__ for log in (q._b._msgs, q._b._journal, dlq._b._msgs)} == {engine}


@pytest.mark.local_only("the layout of the data directory")
def test_queue_is_created_as_a_directory_of_the_broker(broker, data_dir):
    broker.queue(QUEUE)
    assert (data_dir / "qlog-format").read_text().strip() == "1"
    assert {"messages", "state", "lock", "queue.json"} <= set(os.listdir(data_dir / "queues" / QUEUE))


@pytest.mark.parametrize(
    "use",
    [lambda q: q.send(2), lambda q: q.send_batch([2]), lambda q: q.pull(), lambda q: q.peek(),
     lambda q: q.stats(), lambda q: q.purge(), lambda q: q.expire()],
    ids=["send", "send_batch", "pull", "peek", "stats", "purge", "expire"],
)
def test_queue_of_a_closed_broker_raises_log_closed_error(broker, use):
    q = broker.queue(QUEUE, message_retention=60)
    q.send(1)
    broker.close()
    broker.close()  # idempotent
    with pytest.raises(qlog.LogClosedError):
        use(q)
    with pytest.raises(qlog.LogClosedError):
        broker.queue(QUEUE)


def test_queue_closed_on_its_own_can_be_opened_again_from_its_broker(broker):
    q = broker.queue(QUEUE)
    q.send(1)
    q.close()
    again = broker.queue(QUEUE)
    again.send(2)
    assert bodies_of(again.pull()) == [1, 2]


def test_closing_the_dead_letter_queue_object_does_not_stop_dead_lettering(broker, clock):
    q = broker.queue(QUEUE, max_retries=0, dead_letter_queue=DLQ)
    broker.queue(DLQ).close()
    q.send_batch([1, 2])
    a, b = q.pull(visibility_timeout=1).messages
    a.retry()
    clock.advance(1)
    assert len(q.pull()) == 0  # b's only lease ran out: it moves too
    assert q.stats().dead_lettered == 2


# -- persistence ------------------------------------------------------------


def test_acks_attempts_and_leases_survive_close_and_reopen(broker, make_broker, clock):
    q = broker.queue(QUEUE)
    q.send_batch([1, 2, 3, 4])
    a, b, c = q.pull(batch_size=3, visibility_timeout=60).messages
    a.ack()
    b.retry(delay_seconds=10)
    broker.close()
    with make_broker(clock=clock) as again:
        q = again.queue(QUEUE)
        fourth = q.pull()
        assert bodies_of(fourth) == [4]  # c's lease and b's delay still hold
        fourth.ack_all()
        clock.advance(10)
        second = q.pull()
        assert [(m.body, m.attempts) for m in second] == [(2, 2)]
        second.ack_all()
        clock.advance(50)
        assert [(m.body, m.attempts) for m in q.pull()] == [(3, 2)]
        assert q.stats().acked == 3


def test_second_broker_on_the_same_store_shares_the_state(broker, make_broker, clock):
    q = broker.queue(QUEUE)
    q.send_batch([1, 2, 3])
    with make_broker(clock=clock) as other:
        q2 = other.queue(QUEUE)
        a, b = q.pull(batch_size=2, visibility_timeout=10).messages
        assert bodies_of(q2.pull()) == [3]
        a.ack()
        clock.advance(10)
        assert [(m.body, m.attempts) for m in q2.pull()] == [(2, 2)]
        assert q.stats() == q2.stats()
        assert q2.stats().acked == 1


def test_state_survives_dropping_the_broker_without_close(make_broker, clock):
    b = make_broker(clock=clock)
    q = b.queue(QUEUE)
    q.send_batch([1, 2, 3])
    x, y, z = q.pull(visibility_timeout=10).messages
    x.ack()
    y.retry(delay_seconds=5)
    del b, q, x, y, z
    gc.collect()
    with make_broker(clock=clock) as again:
        q = again.queue(QUEUE)
        assert len(q.pull()) == 0
        clock.advance(10)
        assert [(m.body, m.attempts) for m in q.pull()] == [(2, 2), (3, 2)]
        assert q.stats().acked == 1


def _churn(q: qlog.Queue, clock: HandClock, rounds: int) -> None:
    """Sends, pulls, acks, retries and lets leases run out, in a fixed pattern."""
    for r in range(rounds):
        q.send_batch([{"r": r, "i": i} for i in range(6)])
        batch = q.pull(batch_size=5, visibility_timeout=3)
        for i, m in enumerate(batch):
            if i % 3 == 0:
                m.ack()
            elif i % 3 == 1:
                m.retry(delay_seconds=1)
        clock.advance(1)


@pytest.mark.local_only("checkpoints of the local state journal")
def test_state_survives_reopen_across_checkpoints(data_dir, make_broker, clock, monkeypatch):
    monkeypatch.setattr(qlog.Broker, "checkpoint_every", 3)
    b = make_broker(clock=clock)
    q = b.queue(QUEUE)
    _churn(q, clock, 25)
    assert (data_dir / "queues" / QUEUE / "checkpoint").exists()
    with make_broker(clock=clock) as fresh:
        q2 = fresh.queue(QUEUE)
        assert q2.stats() == q.stats()
        assert [(m.id, m.attempts) for m in q2.peek(1000)] == [(m.id, m.attempts) for m in q.peek(1000)]
    expected = q.stats()
    pending = [(m.id, m.attempts) for m in q.peek(1000)]
    b.close()
    with make_broker(clock=clock) as again:
        q3 = again.queue(QUEUE)
        assert q3.stats() == expected
        assert [(m.id, m.attempts) for m in q3.peek(1000)] == pending


@pytest.mark.local_only("truncation of the local state journal")
def test_checkpoint_truncates_the_journal_and_a_lagging_replica_catches_up(data_dir, make_broker, clock,
                                                                           monkeypatch):
    monkeypatch.setattr(qlog.Broker, "checkpoint_every", 4)
    monkeypatch.setattr(qlog._local.backend, "_JOURNAL_SEGMENT", 1 << 16)
    b = make_broker(clock=clock)
    lagging = make_broker(clock=clock)
    try:
        q = b.queue(QUEUE)
        q_lag = lagging.queue(QUEUE)
        assert q_lag.stats().backlog == 0  # its replica starts at journal record 0
        journal = data_dir / "queues" / QUEUE / "state"
        peak = 0
        for r in range(20):  # about 500 KB of journal: 8 segments, were none deleted
            q.send_batch([r] * 1000)
            q.pull(batch_size=1000).ack_all()
            peak = max(peak, len(segments(journal)))
        assert q._b._journal.first_seq > 0
        assert peak <= 3
        assert q_lag.stats() == q.stats()
        q.send(1)
        assert [(m.body, m.attempts) for m in q_lag.pull()] == [(1, 1)]
    finally:
        lagging.close()
        b.close()


@pytest.mark.local_only("segments of the local message log")
def test_acked_segments_of_the_message_log_are_deleted(broker, data_dir, monkeypatch):
    monkeypatch.setattr(qlog.Broker, "checkpoint_every", 4)
    q = broker.queue(QUEUE, segment_bytes=65536)
    messages = data_dir / "queues" / QUEUE / "messages"
    pad = b"x" * 1000
    peak = 0
    for _ in range(40):
        q.send_batch([pad] * 50, content_type="bytes")
        q.pull(batch_size=50).ack_all()
        peak = max(peak, len(segments(messages)))
    # 2 MB went through 64 KiB segments; only the last few are kept.
    assert q._b._msgs.first_seq > 0
    assert peak <= 4
    assert q.stats().acked == 2000


@pytest.mark.local_only("segments of the local message log")
def test_pending_message_keeps_its_segment(broker, monkeypatch, clock):
    monkeypatch.setattr(qlog.Broker, "checkpoint_every", 4)
    q = broker.queue(QUEUE, segment_bytes=65536)
    q.send(b"first", content_type="bytes")
    (held,) = q.pull(visibility_timeout=3600).messages
    for _ in range(20):
        q.send_batch([b"x" * 1000] * 50, content_type="bytes")
        q.pull(batch_size=50).ack_all()
    clock.advance(3600)
    (again,) = q.pull().messages
    assert (again.id, again.body, again.attempts) == (held.id, b"first", 2)


# -- waiting pulls ----------------------------------------------------------


def _signal_when_waiting(monkeypatch, q: qlog.Queue, on_wait: Callable[[], None]) -> None:
    """Call ``on_wait`` each time ``q``'s pull is about to block."""
    log = q._b._msgs
    real = log.wait_change

    def wait_change(gen, timeout=None):
        on_wait()
        return real(gen, timeout)

    monkeypatch.setattr(log, "wait_change", wait_change)


@pytest.mark.local_only("hooks the local message log's wait for a change")
def test_waiting_pull_is_woken_by_a_send_from_another_thread(make_broker, monkeypatch):
    with make_broker() as b:
        q = b.queue(QUEUE)
        waiting = threading.Event()
        _signal_when_waiting(monkeypatch, q, waiting.set)
        got: list = []
        t = threading.Thread(target=lambda: got.append(q.pull(wait=60)))
        t.start()
        assert waiting.wait(60), "the pull never waited"
        q.send({"wake": 1})
        t.join(60)
        assert not t.is_alive()
        assert [bodies_of(batch) for batch in got] == [[{"wake": 1}]]


SENDER = """
import sys, qlog
sys.stdin.readline()
with qlog.open(sys.argv[1]) as b:
    b.queue(sys.argv[2]).send({"from": "child"})
print("sent", flush=True)
"""


@pytest.mark.local_only("hooks the local message log's wait for a change")
def test_waiting_pull_is_woken_by_a_send_from_another_process(backend, make_broker, monkeypatch, spawn_python):
    with make_broker() as b:
        q = b.queue(QUEUE)
        child = spawn_python(SENDER, [backend.target, QUEUE])

        def go() -> None:
            if not child.stdin.closed:
                child.stdin.write("go\n")
                child.stdin.close()

        _signal_when_waiting(monkeypatch, q, go)
        batch = q.pull(wait=60)
        assert child.stdout.readline().strip() == "sent"
        assert child.wait(60) == 0, child.stderr.read()
        assert bodies_of(batch) == [{"from": "child"}]


def test_waiting_pull_wakes_when_a_retry_delay_runs_out(make_broker):
    with make_broker() as b:
        q = b.queue(QUEUE)
        q.send(1)
        (m,) = q.pull().messages
        m.retry(delay_seconds=0.2)
        assert [(m.body, m.attempts) for m in q.pull(wait=60)] == [(1, 2)]


def test_waiting_pull_wakes_when_a_lease_runs_out(make_broker):
    with make_broker() as b:
        q = b.queue(QUEUE)
        q.send(1)
        q.pull(visibility_timeout=0.2)
        assert [(m.body, m.attempts) for m in q.pull(wait=60)] == [(1, 2)]


def test_waiting_pull_returns_an_empty_batch_when_the_wait_ends(make_broker):
    with make_broker() as b:
        batch = b.queue(QUEUE).pull(wait=0.05)
        assert len(batch) == 0 and batch.messages == ()


# -- data format ------------------------------------------------------------


@pytest.mark.local_only("the data directory's format file")
@pytest.mark.parametrize("content", ["2\n", "0\n", "not a number\n"])
def test_directory_of_another_data_format_is_refused(data_dir, make_broker, content):
    data_dir.mkdir()
    (data_dir / "qlog-format").write_text(content)
    with pytest.raises(qlog.FormatError):
        make_broker()
    assert (data_dir / "qlog-format").read_text() == content


@pytest.mark.local_only("the data directory's format file")
def test_format_error_names_the_version_found(data_dir, make_broker):
    data_dir.mkdir()
    (data_dir / "qlog-format").write_text("2\n")
    with pytest.raises(qlog.FormatError, match="format 2"):
        make_broker()


# ---- replicas: memory and interleaving -------------------------------------


@pytest.mark.local_only("counts the local backend's replica entries")
def test_consumer_state_grows_with_messages_in_flight_not_with_the_backlog(broker):
    q = broker.queue(QUEUE, durability="none")
    for _ in range(50):
        q.send_batch([b"m"] * 1000, content_type="bytes")
    batch = q.pull(batch_size=10)
    assert len(batch) == 10
    st = q._b._st
    assert len(st.pending) == 10  # one entry per leased message; the 49,990 waiting have none
    batch.ack_all()
    assert len(st.pending) == 0
    assert q.stats().backlog == 49_990


@pytest.mark.local_only("wraps the local state journal's append to force the interleaving")
def test_ack_landing_between_a_pulls_read_and_its_lease_wins(make_broker, clock):
    """Another process's ack written after a pull read the state but before
    its lease record: replay puts the ack first, and the pull does not
    deliver the acked message."""
    a = make_broker(clock=clock)
    b = make_broker(clock=clock)
    try:
        qa, qb = a.queue(QUEUE), b.queue(QUEUE)
        qa.send_batch([1, 2])
        held = qb.pull(batch_size=1, visibility_timeout=1).messages  # message 1, leased by b
        assert [m.body for m in held] == [1]
        clock.advance(2)  # b's lease runs out: a pull may take message 1 again
        journal_append = qa._b._journal.append

        def append_after_bs_ack(record: bytes) -> int:
            qa._b._journal.append = journal_append
            held[0].ack()  # lands between a's read of the state and its lease
            return journal_append(record)

        qa._b._journal.append = append_after_bs_ack
        got = qa.pull(batch_size=10)
        assert [m.body for m in got] == [2]
        assert [m.attempts for m in got] == [1]
        st = qa.stats()
        assert (st.acked, st.in_flight, st.backlog) == (1, 1, 1)
        assert qb.stats() == st
    finally:
        a.close()
        b.close()


@pytest.mark.local_only("wraps the local state journal's append to force the interleaving")
def test_retry_landing_between_a_pulls_read_and_its_lease_keeps_its_delay(make_broker, clock):
    a = make_broker(clock=clock)
    b = make_broker(clock=clock)
    try:
        qa, qb = a.queue(QUEUE), b.queue(QUEUE)
        qa.send("job")
        held = qb.pull(batch_size=1, visibility_timeout=1).messages
        clock.advance(2)  # b's lease ran out: the message is due again
        journal_append = qa._b._journal.append

        def append_after_bs_retry(record: bytes) -> int:
            qa._b._journal.append = journal_append
            held[0].retry(delay_seconds=100)  # lands before a's lease record
            return journal_append(record)

        qa._b._journal.append = append_after_bs_retry
        assert qa.pull(batch_size=10).messages == ()
        assert qa.stats().delayed == 1
        clock.advance(101)
        (m,) = qa.pull(batch_size=10).messages
        assert (m.body, m.attempts) == ("job", 2)
    finally:
        a.close()
        b.close()


def test_pull_async_leases_off_the_loop_and_a_wait_ends_with_a_send_from_another_thread(broker):
    import asyncio
    import threading

    q = broker.queue(QUEUE)

    async def main() -> tuple:
        empty = await q.pull_async(10)
        threading.Timer(0.05, lambda: q.send({"late": True})).start()
        waited = await q.pull_async(10, visibility_timeout=5, wait=30)
        ticks = 0

        async def tick() -> None:  # the loop keeps running while a pull_async waits
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.get_running_loop().create_task(tick())
        q.send(2)
        got = await q.pull_async(wait=30)
        t.cancel()
        return empty, waited, got, ticks

    empty, waited, got, ticks = asyncio.run(main())
    assert not empty and empty.paused is False
    assert bodies_of(waited) == [{"late": True}]
    assert bodies_of(got) == [2] and ticks >= 1
    waited.ack_all()
    got.ack_all()
    assert q.stats().acked == 2
    with pytest.raises(qlog.SettingsError, match="wait"):
        asyncio.run(q.pull_async(wait=-1))
