"""Push consumers: the batching rule, implicit ack and retry, precedence,
dead-letter routing, max_concurrency, lease renewal, sync and async
handlers, pausing, async producers, and a real worker process stopped by
SIGTERM.

The batching rule is checked step by step with a hand clock: ``step()``
is the consumer's own batching code, run without its threads.  The other
tests run ``broker.run()`` for real.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import signal
import threading
import time
from typing import Callable, List, Optional

import pytest
from conftest import HandClock

import qlog
from qlog._consumer import PushBatch, Runner

Q = "jobs"
DLQ = "jobs-dlq"


def stepper(broker: qlog.Broker, handler: Callable = lambda batch: None, **settings):
    """The consumer of ``Q`` with ``settings``, ready to be stepped by hand."""
    broker.consumer(Q, **settings)(handler)
    runner = Runner(broker, list(broker._push._consumers.values()), shutdown_timeout=0)
    return runner.work[0]


def bodies(batch: Optional[PushBatch]) -> List[object]:
    assert batch is not None
    return [m.body for m in batch.messages]


# -- the batching rule ---------------------------------------------------------


def test_full_batch_is_handed_over_at_once(broker, clock):
    w = stepper(broker, max_batch_size=5, max_batch_timeout=60)
    broker.queue(Q).send_batch(list(range(5)))
    assert bodies(w.step()) == [0, 1, 2, 3, 4]


def test_partial_batch_waits_max_batch_timeout_from_its_first_message(broker, clock):
    w = stepper(broker, max_batch_size=10, max_batch_timeout=5)
    q = broker.queue(Q)
    q.send_batch([0, 1, 2])
    assert w.step() is None
    clock.advance(4.5)
    q.send_batch([3, 4])  # later messages do not restart the timer
    assert w.step() is None
    clock.advance(0.49)
    assert w.step() is None
    clock.advance(0.01)
    assert bodies(w.step()) == [0, 1, 2, 3, 4]
    assert w.step() is None  # nothing left: no empty batch


def test_batch_timeout_counts_from_when_the_message_became_visible_not_when_pulled(broker, clock):
    w = stepper(broker, max_batch_size=10, max_batch_timeout=5)
    broker.queue(Q).send_batch(["a", "b"])
    clock.advance(5)  # the worker was busy: the messages waited already
    assert bodies(w.step()) == ["a", "b"]


def test_delivery_delay_starts_the_batch_timer_when_the_message_is_due(broker, clock):
    w = stepper(broker, max_batch_size=10, max_batch_timeout=5)
    broker.queue(Q).send("late", delay_seconds=10)
    assert w.step() is None
    clock.advance(10)
    assert w.step() is None  # visible now; its batch is due 5 s later
    clock.advance(4.9)
    assert w.step() is None
    clock.advance(0.1)
    assert bodies(w.step()) == ["late"]


def test_a_backlog_is_cut_into_full_batches_then_a_timed_one(broker, clock):
    w = stepper(broker, max_batch_size=10, max_batch_timeout=2)
    broker.queue(Q).send_batch(list(range(25)))
    assert bodies(w.step()) == list(range(10))
    assert bodies(w.step()) == list(range(10, 20))
    assert w.step() is None
    clock.advance(2)
    assert bodies(w.step()) == list(range(20, 25))


def test_no_batch_is_ever_empty(broker, clock):
    w = stepper(broker, max_batch_size=3, max_batch_timeout=0)
    for _ in range(3):
        assert w.step() is None
        clock.advance(100)
    broker.queue(Q).send("x")
    assert bodies(w.step()) == ["x"]


def test_zero_batch_timeout_hands_over_whatever_is_visible(broker, clock):
    w = stepper(broker, max_batch_size=10, max_batch_timeout=0)
    broker.queue(Q).send_batch([1, 2, 3])
    assert bodies(w.step()) == [1, 2, 3]


def test_forming_batch_is_leased(broker, clock):
    w = stepper(broker, max_batch_size=10, max_batch_timeout=5, visibility_timeout=30)
    q = broker.queue(Q)
    q.send_batch([1, 2])
    assert w.step() is None
    assert q.stats().in_flight == 2
    assert q.pull(10).messages == ()  # no one else gets them meanwhile


# -- outcomes ------------------------------------------------------------------


def handled(w, clock: HandClock) -> PushBatch:
    """Step until a batch is due and run its handler (inline, as a worker does)."""
    batch = w.step()
    if batch is None:
        clock.advance(w.timeout)
        batch = w.step()
    assert batch is not None
    w._dispatch(batch)
    return batch


def redelivered(q: qlog.Queue, clock: HandClock) -> dict:
    clock.advance(1)
    return {m.body: m.attempts for m in q.pull(100, visibility_timeout=60).messages}


def test_returning_acks_every_message(broker, clock):
    w = stepper(broker, max_batch_size=3)
    q = broker.queue(Q)
    q.send_batch([1, 2, 3])
    handled(w, clock)
    s = q.stats()
    assert (s.acked, s.backlog) == (3, 0)
    assert redelivered(q, clock) == {}


def test_raising_retries_every_message_with_retry_delay_and_logs_ids_and_attempts(broker, clock, caplog):
    def handler(batch):
        raise ValueError("smtp down")

    w = stepper(broker, handler, max_batch_size=2, retry_delay=30)
    q = broker.queue(Q)
    ids = q.send_batch(["a", "b"])
    with caplog.at_level(logging.ERROR, logger="qlog"):
        handled(w, clock)
    record = next(r for r in caplog.records if "raised" in r.getMessage())
    text = record.getMessage()
    assert "'jobs'" in text and "ValueError" in text
    assert f"{ids[0]}:1" in text and f"{ids[1]}:1" in text
    assert record.exc_info is not None and record.exc_info[0] is ValueError
    assert q.stats().acked == 0
    clock.advance(29)
    assert q.pull(10).messages == ()  # retry_delay holds them back
    assert redelivered(q, clock) == {"a": 2, "b": 2}


def test_a_failed_last_attempt_is_logged_as_dead_lettered_not_retried(broker, clock, caplog):
    def handler(batch):
        batch.messages[0].ack()
        raise ValueError("smtp down")

    w = stepper(broker, handler, max_batch_size=3, max_retries=0, dead_letter_queue=DLQ)
    q = broker.queue(Q)
    ids = q.send_batch(["done", "last"])
    with caplog.at_level(logging.ERROR, logger="qlog"):
        handled(w, clock)
    text = next(r for r in caplog.records if "raised" in r.getMessage()).getMessage()
    assert "on a batch of 2 messages" in text and "retrying" not in text
    assert f"dead-lettering 1 message to '{DLQ}' after their last attempt (id:attempts {ids[1]}:1)" in text
    assert ids[0] not in text.split(";", 1)[1]  # acked on its own: neither retried nor dead-lettered
    assert broker.queue(DLQ).stats().backlog == 1


def test_explicit_retry_in_a_handler_that_returns_retries_that_message_only(broker, clock):
    def handler(batch):
        batch.messages[1].retry()

    w = stepper(broker, handler, max_batch_size=3)
    q = broker.queue(Q)
    q.send_batch(["a", "b", "c"])
    handled(w, clock)
    assert q.stats().acked == 2
    assert redelivered(q, clock) == {"b": 2}


def test_explicit_ack_in_a_handler_that_raises_keeps_that_message_acked(broker, clock):
    def handler(batch):
        batch.messages[0].ack()
        raise RuntimeError("second one failed")

    w = stepper(broker, handler, max_batch_size=3)
    q = broker.queue(Q)
    q.send_batch(["a", "b", "c"])
    handled(w, clock)
    assert q.stats().acked == 1
    assert redelivered(q, clock) == {"b": 2, "c": 2}


@pytest.mark.parametrize(
    "calls, raises, acked, retried",
    [
        # a single-message call beats a batch-level call, whatever the order
        (["m0.retry", "ack_all"], False, ["b", "c"], ["a"]),
        (["ack_all", "m0.retry"], False, ["b", "c"], ["a"]),
        (["retry_all", "m0.ack"], False, ["a"], ["b", "c"]),
        (["m0.ack", "retry_all"], True, ["a"], ["b", "c"]),
        # the first call on a message wins
        (["m0.retry", "m0.ack"], False, ["b", "c"], ["a"]),
        (["m0.ack", "m0.retry"], True, ["a"], ["b", "c"]),
        # the first batch-level call wins, and beats the implicit outcome
        (["retry_all", "ack_all"], False, [], ["a", "b", "c"]),
        (["ack_all", "retry_all"], True, ["a", "b", "c"], []),
        (["ack_all"], True, ["a", "b", "c"], []),
        (["retry_all"], False, [], ["a", "b", "c"]),
    ],
)
def test_precedence_of_explicit_calls(broker, clock, calls, raises, acked, retried):
    def handler(batch):
        for c in calls:
            if c == "ack_all":
                batch.ack_all()
            elif c == "retry_all":
                batch.retry_all()
            else:
                getattr(batch.messages[0], c.split(".")[1])()
        if raises:
            raise RuntimeError("after the calls")

    w = stepper(broker, handler, max_batch_size=3)
    q = broker.queue(Q)
    q.send_batch(["a", "b", "c"])
    handled(w, clock)
    assert q.stats().acked == len(acked)
    assert redelivered(q, clock) == {b: 2 for b in retried}


def test_batch_level_retry_delay_is_kept(broker, clock):
    def handler(batch):
        batch.retry_all(delay_seconds=100)

    w = stepper(broker, handler, max_batch_size=1)
    q = broker.queue(Q)
    q.send("a")
    handled(w, clock)
    clock.advance(99)
    assert q.pull(10).messages == ()
    assert redelivered(q, clock) == {"a": 2}


def test_bad_retry_all_delay_raises_in_the_handler_and_the_batch_is_retried(broker, clock):
    seen = []

    def handler(batch):
        try:
            batch.retry_all(delay_seconds=-1)
        except qlog.DelayOutOfRangeError as e:
            seen.append(str(e))
            raise

    w = stepper(broker, handler, max_batch_size=1)
    q = broker.queue(Q)
    q.send("a")
    handled(w, clock)
    assert "86400" in seen[0]
    assert redelivered(q, clock) == {"a": 2}


def test_failing_max_retries_times_moves_the_message_to_the_dead_letter_queue(broker, clock):
    def handler(batch):
        raise RuntimeError("always")

    w = stepper(broker, handler, max_batch_size=1, max_retries=2, dead_letter_queue=DLQ)
    q = broker.queue(Q)
    mid = q.send({"userId": 7})
    for attempt in (1, 2, 3):
        batch = handled(w, clock)
        assert [m.attempts for m in batch.messages] == [attempt]
        clock.advance(1)
    s = q.stats()
    assert (s.dead_lettered, s.backlog) == (1, 0)
    [dead] = broker.queue(DLQ).pull(10).messages
    assert (dead.id, dead.body, dead.attempts) == (mid, {"userId": 7}, 1)
    assert (dead.dead_letter.queue, dead.dead_letter.attempts) == (Q, 3)


def test_failing_max_retries_times_without_a_dead_letter_queue_deletes_and_counts(broker, clock):
    def handler(batch):
        raise RuntimeError("always")

    w = stepper(broker, handler, max_batch_size=1, max_retries=1)
    q = broker.queue(Q)
    q.send("x")
    for _ in range(2):
        handled(w, clock)
        clock.advance(1)
    s = q.stats()
    assert (s.deleted, s.dead_lettered, s.backlog) == (1, 0, 0)


def test_async_handler_outcomes_match_sync_ones(broker, clock):
    async def handler(batch):
        await asyncio.sleep(0)
        batch.messages[0].retry()

    w = stepper(broker, handler, max_batch_size=2)
    q = broker.queue(Q)
    q.send_batch(["a", "b"])
    batch = w.step()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(w._run_async(batch))
    finally:
        loop.close()
    assert q.stats().acked == 1
    assert redelivered(q, clock) == {"a": 2}


# -- registration --------------------------------------------------------------


def test_a_queue_has_one_consumer_per_broker(broker):
    broker.consumer(Q)(lambda b: None)
    with pytest.raises(qlog.SettingsError, match="already has a consumer"):
        broker.consumer(Q)(lambda b: None)


def test_consumer_settings_are_checked_when_decorating(broker):
    with pytest.raises(qlog.SettingsError, match="'max_batch_size'.*1 to 100"):
        broker.consumer(Q, max_batch_size=101)
    with pytest.raises(qlog.SettingsError, match="unknown setting 'batch_size'"):
        broker.consumer(Q, batch_size=5)
    with pytest.raises(qlog.SettingsError, match="own dead_letter_queue"):
        broker.consumer(Q, dead_letter_queue=Q)
    with pytest.raises(qlog.InvalidQueueNameError):
        broker.consumer("../etc")
    assert broker.consumers == ()


def test_broker_consumers_lists_the_registered_queues_in_order(broker):
    assert broker.consumers == ()
    broker.consumer("b")(lambda batch: None)
    broker.consumer("a", max_retries=0)(lambda batch: None)
    assert broker.consumers == ("b", "a")


def test_decorator_returns_the_function_unchanged(broker):
    def handle(batch):
        return 42

    assert broker.consumer(Q)(handle) is handle


def test_run_without_consumers_is_a_clear_error(broker):
    with pytest.raises(qlog.SettingsError, match="no consumers"):
        broker.run(handle_signals=False)


@pytest.mark.local_only("qlog.toml lives in the data directory")
def test_consumer_settings_come_from_qlog_toml(data_dir, make_broker, clock):
    data_dir.mkdir()
    (data_dir / "qlog.toml").write_text(
        '[[queues.consumers]]\nqueue = "jobs"\nmax_batch_size = 2\nmax_batch_timeout = 7\n'
        'max_retries = 1\ndead_letter_queue = "jobs-dlq"\nretry_delay = 3\nmax_concurrency = 4\n'
    )
    with make_broker(clock=clock) as b:
        w = stepper(b)
        s = w.q.settings
        assert (w.size, w.timeout, w.concurrency) == (2, 7, 4)
        assert (s.max_retries, s.dead_letter_queue, s.retry_delay) == (1, DLQ, 3)


@pytest.mark.local_only("qlog.toml lives in the data directory")
def test_unknown_consumer_key_in_qlog_toml_names_the_key(data_dir, make_broker):
    data_dir.mkdir()
    (data_dir / "qlog.toml").write_text('[[queues.consumers]]\nqueue = "jobs"\nmax_batch_sise = 2\n')
    with pytest.raises(qlog.SettingsError, match="unknown setting 'max_batch_sise'"):
        make_broker()


# -- running for real ----------------------------------------------------------


class Running:
    """``broker.run()`` on a thread; ``stop()`` stops it and returns its result."""

    def __init__(self, broker: qlog.Broker, **kwargs) -> None:
        self.broker = broker
        self.result: List[bool] = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(broker.run(handle_signals=False, **kwargs)), daemon=True
        )
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.broker._push._runner is None and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
        self.broker.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run() did not return"
        return self.result[0]


@pytest.fixture
def real(make_broker) -> qlog.Broker:
    """A broker on the real clock (threads and timeouts run for real)."""
    return make_broker()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_never_more_than_max_concurrency_batches_at_once(real, wait_until, kind):
    lock = threading.Lock()
    active = [0]
    peak = [0]
    release = threading.Event()

    def enter():
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])

    def leave():
        with lock:
            active[0] -= 1

    if kind == "sync":
        def handler(batch):
            enter()
            release.wait(30)
            leave()
    else:
        async def handler(batch):
            enter()
            while not release.is_set():
                await asyncio.sleep(0.002)
            leave()

    real.consumer(Q, max_batch_size=2, max_batch_timeout=0, max_concurrency=3)(handler)
    q = real.queue(Q)
    q.send_batch(list(range(40)))
    run = Running(real)
    wait_until(lambda: active[0] == 3, what="three batches running")
    # With three handlers held, the rest stays visible and unleased.
    assert q.stats().in_flight == 6
    release.set()
    wait_until(lambda: q.stats().acked == 40, what="every message acked")
    assert run.stop() is True
    assert peak[0] == 3


def test_slow_batch_does_not_hold_up_the_others(real, wait_until):
    done: List[int] = []
    release = threading.Event()

    def handler(batch):
        if batch.messages[0].body == "slow":
            release.wait(30)
        done.append(len(batch))

    real.consumer(Q, max_batch_size=1, max_batch_timeout=0, max_concurrency=2)(handler)
    q = real.queue(Q)
    q.send("slow")
    run = Running(real)
    wait_until(lambda: q.stats().in_flight == 1, what="the slow batch running")
    q.send_batch(list(range(20)))
    wait_until(lambda: q.stats().acked == 20, what="the others acked past the slow one")
    release.set()
    wait_until(lambda: q.stats().acked == 21)
    assert run.stop() is True


def test_lease_is_renewed_while_a_long_handler_runs(real, make_broker, wait_until):
    calls: List[int] = []
    release = threading.Event()

    def handler(batch):
        calls.append(batch.messages[0].attempts)
        release.wait(30)

    real.consumer(Q, max_batch_size=1, max_batch_timeout=0, visibility_timeout=0.3)(handler)
    q = real.queue(Q)
    q.send("long job")
    run = Running(real)
    wait_until(lambda: calls, what="the handler started")
    # Another process's view (a second broker): for five lease lengths the
    # message stays in flight and no pull gets it.
    with make_broker() as other:
        oq = other.queue(Q)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            assert oq.pull(10, visibility_timeout=30).messages == ()
            assert oq.stats().in_flight == 1
            time.sleep(0.02)
    release.set()
    wait_until(lambda: q.stats().acked == 1, what="the long job acked")
    assert run.stop() is True
    assert calls == [1]


def test_waiting_worker_is_woken_by_a_send_from_another_process(real, backend, wait_until, run_python):
    got: List[object] = []
    real.consumer(Q, max_batch_size=10, max_batch_timeout=0)(lambda batch: got.extend(m.body for m in batch))
    run = Running(real)
    wait_until(lambda: real._push._runner is not None and real._push._runner.work[0].q.stats().backlog == 0)
    r = run_python("import qlog, sys; qlog.open(sys.argv[1]).queue('jobs').send({'from': 'child'})",
                   [backend.target])
    assert r.returncode == 0, r.stderr
    wait_until(lambda: got == [{"from": "child"}], what="the child's message handled")
    assert run.stop() is True


def test_stop_hands_a_forming_batch_to_the_handler_and_waits_for_it(real, wait_until):
    got: List[object] = []
    real.consumer(Q, max_batch_size=10, max_batch_timeout=60)(lambda batch: got.extend(m.body for m in batch))
    q = real.queue(Q)
    q.send_batch([1, 2, 3])
    run = Running(real)
    wait_until(lambda: q.stats().in_flight == 3, what="the batch forming")
    assert got == []
    assert run.stop() is True
    assert got == [1, 2, 3]
    assert q.stats().acked == 3


def test_run_returns_false_when_a_handler_outlives_shutdown_timeout(real, wait_until):
    release = threading.Event()
    started = threading.Event()

    def handler(batch):
        started.set()
        release.wait(30)

    real.consumer(Q, max_batch_size=1, max_batch_timeout=0, max_concurrency=2)(handler)
    q = real.queue(Q)
    q.send("stuck")
    run = Running(real, shutdown_timeout=0.2)
    wait_until(started.is_set)
    assert run.stop() is False
    assert q.stats().acked == 0
    release.set()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_idle_worker_stops_cleanly_with_shutdown_timeout_zero(real, kind):
    if kind == "sync":
        real.consumer(Q, max_concurrency=3)(lambda batch: None)
    else:
        async def handler(batch):
            pass
        real.consumer(Q, max_concurrency=3)(handler)
    run = Running(real, shutdown_timeout=0)
    assert run.stop() is True  # no batch was running: nothing left behind


def test_paused_queue_delivers_nothing_until_resumed(real, make_broker, wait_until):
    got: List[object] = []
    real.consumer(Q, max_batch_size=10, max_batch_timeout=0)(lambda batch: got.extend(m.body for m in batch))
    q = real.queue(Q)
    with make_broker() as other:
        other.queue(Q).pause_delivery()
    assert q.paused and q.stats().paused
    run = Running(real)
    q.send_batch([1, 2])  # sends are accepted while paused
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        assert got == [] and q.stats().in_flight == 0
        time.sleep(0.02)
    with make_broker() as other:
        other.queue(Q).resume_delivery()
    wait_until(lambda: got == [1, 2], what="delivery after resume")
    assert run.stop() is True


# -- pausing and async producers -----------------------------------------------


def test_pause_is_persisted_and_seen_by_other_brokers(make_broker):
    with make_broker() as b:
        q = b.queue(Q)
        q.send("x")
        q.pause_delivery()
        q.pause_delivery()  # idempotent
    with make_broker() as b:
        q = b.queue(Q)
        assert q.paused
        assert q.pull(10).messages == ()
        assert q.stats().backlog == 1
        q.resume_delivery()
        q.resume_delivery()
        assert not q.paused
        assert [m.body for m in q.pull(10).messages] == ["x"]


def test_messages_delivered_before_a_pause_can_still_be_acked(make_broker):
    with make_broker() as b:
        q = b.queue(Q)
        q.send("x")
        batch = q.pull(10)
        q.pause_delivery()
        batch.ack_all()
        assert q.stats().acked == 1


def test_resume_wakes_a_waiting_pull(make_broker):
    with make_broker() as b:
        q = b.queue(Q)
        q.pause_delivery()
        q.send("x")
        out: List[object] = []
        t = threading.Thread(target=lambda: out.extend(m.body for m in q.pull(10, wait=30).messages))
        t.start()
        with make_broker() as other:
            other.queue(Q).resume_delivery()
        t.join(30)
        assert out == ["x"]


def test_send_async_runs_off_the_event_loop_and_returns_the_id(make_broker):
    threads: List[str] = []

    def clock() -> float:
        threads.append(threading.current_thread().name)
        return time.time()

    async def main(q):
        loop_thread = threading.current_thread().name
        ids = await asyncio.gather(*(q.send_async({"n": i}) for i in range(20)))
        ids += await q.send_batch_async([{"n": i} for i in range(20, 30)])
        ids += await q.send_batch_async(({"n": i} for i in range(30, 35)), delay_seconds=0)
        return loop_thread, ids

    with make_broker(clock=clock) as b:
        q = b.queue(Q)
        loop_thread, ids = asyncio.run(main(q))
        assert threads and loop_thread not in threads
        assert all(t.startswith("qlog-send") for t in threads)
        got = q.pull(100).messages
        assert sorted(m.body["n"] for m in got) == list(range(35))
        assert sorted(m.id for m in got) == sorted(ids) and len(set(ids)) == 35


def test_send_async_bad_input_raises_the_same_error_and_writes_nothing(make_broker):
    async def main(q):
        with pytest.raises(qlog.BodyTypeError):
            await q.send_async(object())
        with pytest.raises(qlog.BatchTooLargeError):
            await q.send_batch_async([])
        with pytest.raises(qlog.DelayOutOfRangeError):
            await q.send_async("x", delay_seconds=-1)

    with make_broker() as b:
        q = b.queue(Q)
        asyncio.run(main(q))
        assert q.stats().backlog == 0


# -- a real worker process -----------------------------------------------------

WORKER = """
import logging, os, sys, time, qlog
logging.basicConfig(level=logging.INFO)
data, out, hold, vt = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[5])
broker = qlog.open(data)

@broker.consumer("jobs", max_batch_size=5, max_batch_timeout=0, visibility_timeout=vt)
def handle(batch):
    for m in batch.messages:
        with open(out, "a") as f:
            f.write(f"start {m.body}\\n")
    while not os.path.exists(hold):
        time.sleep(0.005)
    with open(out, "a") as f:
        f.write("done " + " ".join(str(m.body) for m in batch.messages) + "\\n")

print("running", flush=True)
ok = broker.run(shutdown_timeout=float(sys.argv[4]))
broker.close()
print("finished" if ok else "gave up", flush=True)
os._exit(0)
"""


def lines(path: pathlib.Path) -> List[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_sigterm_lets_the_running_batch_finish_takes_nothing_new_and_exits_0(
        backend, make_broker, tmp_path, spawn_python, wait_until):
    data, out, hold = backend.target, tmp_path / "out", tmp_path / "hold"
    with make_broker() as b:
        b.queue(Q).send_batch([1, 2, 3, 4, 5])
    p = spawn_python(WORKER, [data, out, hold, 30, 60])
    assert p.stdout.readline().strip() == "running"
    wait_until(lambda: len(lines(out)) == 5, what="the batch started")
    p.send_signal(signal.SIGTERM)
    with make_broker() as b:
        b.queue(Q).send_batch([6, 7])  # after SIGTERM: not taken
    assert p.poll() is None  # still finishing its batch
    hold.touch()
    assert p.wait(30) == 0
    assert p.stdout.read().strip() == "finished"
    assert lines(out) == ["start 1", "start 2", "start 3", "start 4", "start 5", "done 1 2 3 4 5"]
    with make_broker() as b:
        s = b.queue(Q).stats()
        assert (s.acked, s.backlog, s.in_flight) == (5, 2, 0)


def test_unfinished_batch_after_shutdown_timeout_is_not_acked_and_comes_back(
        backend, make_broker, tmp_path, spawn_python, wait_until):
    data, out, hold = backend.target, tmp_path / "out", tmp_path / "hold"
    with make_broker() as b:
        b.queue(Q).send_batch([1, 2])
    p = spawn_python(WORKER, [data, out, hold, 0.2, 1.0])
    assert p.stdout.readline().strip() == "running"
    wait_until(lambda: len(lines(out)) == 2, what="the batch started")
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert p.stdout.read().strip() == "gave up"
    assert "done" not in " ".join(lines(out))
    with make_broker() as b:
        q = b.queue(Q)
        assert q.stats().acked == 0
        got = q.pull(10, visibility_timeout=5, wait=60)  # once the 1 s lease runs out
        assert sorted(m.body for m in got.messages) == [1, 2]
        assert {m.attempts for m in got.messages} == {2}


def test_second_signal_exits_at_once(backend, make_broker, tmp_path, spawn_python, wait_until):
    data, out, hold = backend.target, tmp_path / "out", tmp_path / "hold"
    with make_broker() as b:
        b.queue(Q).send("x")
    p = spawn_python(WORKER, [data, out, hold, 600, 60])
    assert p.stdout.readline().strip() == "running"
    err: List[str] = []
    threading.Thread(target=lambda: err.extend(p.stderr), daemon=True).start()
    wait_until(lambda: lines(out) == ["start x"], what="the batch started")
    p.send_signal(signal.SIGINT)
    wait_until(lambda: any("SIGINT: stopping" in line for line in err), what="the first signal noted")
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 128 + signal.SIGTERM
    with make_broker() as b:
        assert b.queue(Q).stats().acked == 0


SHARED_WORKER = """
import os, sys, time, qlog
data, out = sys.argv[1], sys.argv[2]
broker = qlog.open(data)

@broker.consumer("jobs", max_batch_size=10, max_batch_timeout=0.01, max_concurrency=2, visibility_timeout=60)
def handle(batch):
    time.sleep(0.002)  # some work, so that both workers get a share
    with open(out, "a") as f:
        f.write("".join(f"{m.body} {m.attempts}\\n" for m in batch.messages))

print("running", flush=True)
broker.run()
broker.close()
"""


def test_two_worker_processes_share_a_queue_without_double_delivery(
        backend, make_broker, tmp_path, spawn_python, wait_until):
    data = backend.target
    with make_broker() as b:
        b.queue(Q)
    outs = [tmp_path / "w0", tmp_path / "w1"]
    procs = [spawn_python(SHARED_WORKER, [data, o]) for o in outs]
    for p in procs:
        assert p.stdout.readline().strip() == "running"
    with make_broker() as b:
        q = b.queue(Q)
        for start in range(0, 2000, 50):
            q.send_batch(list(range(start, start + 50)))
        wait_until(lambda: q.stats().acked == 2000, timeout=60, what="2,000 messages acked")
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert [p.wait(30) for p in procs] == [0, 0]
    handled = [line.split() for o in outs for line in lines(o)]
    assert sorted(int(body) for body, _ in handled) == list(range(2000))  # each exactly once
    assert {att for _, att in handled} == {"1"}
    assert all(lines(o) for o in outs), "both workers got work"


def test_run_async_runs_async_handlers_on_the_callers_loop_until_stop(make_broker):
    broker = make_broker()
    loops = []
    seen: List[object] = []

    @broker.consumer(Q, max_batch_size=5, max_batch_timeout=0)
    async def handle(batch):
        loops.append(asyncio.get_running_loop())
        seen.extend(m.body for m in batch.messages)

    async def main() -> bool:
        task = asyncio.ensure_future(broker.run_async(shutdown_timeout=5))
        await broker.queue(Q).send_batch_async(list(range(20)))
        deadline = time.monotonic() + 30
        while broker.queue(Q).stats().acked < 20:
            assert time.monotonic() < deadline, "not consumed in 30 s"
            await asyncio.sleep(0.01)  # the loop must stay free for the handlers
        assert loops and all(lp is asyncio.get_running_loop() for lp in loops)
        broker.stop()
        return await asyncio.wait_for(task, 30)

    assert asyncio.run(main()) is True
    assert sorted(seen) == list(range(20))


def test_run_async_cancelled_stops_the_consumers_and_can_run_again(make_broker):
    broker = make_broker()
    got: List[object] = []
    broker.consumer(Q, max_batch_size=1, max_batch_timeout=0)(lambda batch: got.extend(m.body for m in batch))

    async def main() -> None:
        task = asyncio.ensure_future(broker.run_async(shutdown_timeout=5))
        broker.queue(Q).send("a")
        deadline = time.monotonic() + 30
        while not got:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        again = asyncio.ensure_future(broker.run_async(shutdown_timeout=5))  # released: runs again
        broker.queue(Q).send("b")
        while len(got) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        broker.stop()
        assert await asyncio.wait_for(again, 30) is True

    asyncio.run(main())
    assert got == ["a", "b"]
