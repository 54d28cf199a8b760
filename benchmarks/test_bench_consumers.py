"""Micro-benchmarks of push consumers (pytest-benchmark).

    pytest benchmarks/ --benchmark-only

Not part of the test suite (pyproject's testpaths is tests/).  A broker
runs a push consumer (``max_batch_timeout=0``) on a thread of this process;
a round sends and returns once the handler has seen what it sent.  100-byte
bytes bodies, durability "interval", as in benchmarks/queues.py.
benchmarks/consumers.py measures the same across processes.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Iterator, List

import pytest

import qlog
from queues import BATCH, PAYLOAD, bytes_bodies

WAIT = 10.0  # seconds a round may wait for the handler before the benchmark fails


class Running:
    """A broker running one push consumer that counts what it handles."""

    def __init__(self, broker: qlog.Broker, queue: qlog.Queue) -> None:
        self.broker = broker
        self.queue = queue
        self.handled = 0
        self.cond = threading.Condition()
        self.result: List[bool] = []
        self.thread = threading.Thread(target=self._run, name="bench-runner")

    def handle(self, batch: qlog.MessageBatch) -> None:
        with self.cond:
            self.handled += len(batch.messages)
            self.cond.notify_all()

    def _run(self) -> None:
        self.result.append(self.broker.run(handle_signals=False, shutdown_timeout=WAIT))

    def wait_handled(self, n: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.handled >= n, WAIT)

    def wait_acked(self, n: int) -> bool:
        deadline = time.monotonic() + WAIT
        while self.queue.stats().acked < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def running(tmp_path, max_batch_size: int) -> Iterator[Running]:
    with qlog.open(tmp_path / "broker", durability="interval") as broker:
        r = Running(broker, broker.queue("jobs"))
        broker.consumer("jobs", max_batch_size=max_batch_size, max_batch_timeout=0)(r.handle)
        r.thread.start()
        try:
            yield r
        finally:
            broker.stop()
            r.thread.join(WAIT)
        assert r.result == [True]  # the runner stopped and every handler finished


@pytest.fixture
def batches(tmp_path) -> Iterator[Running]:
    yield from running(tmp_path, BATCH)


@pytest.fixture
def singles(tmp_path) -> Iterator[Running]:
    yield from running(tmp_path, 1)


def test_push_consumer_handles_a_sent_batch_of_100(benchmark, batches: Running) -> None:
    bodies = bytes_bodies()
    sent = [0]

    def send_and_wait_for_handler() -> bool:
        batches.queue.send_batch(bodies, content_type="bytes")
        sent[0] += BATCH
        return batches.wait_handled(sent[0])

    assert benchmark.pedantic(send_and_wait_for_handler, rounds=300, iterations=1, warmup_rounds=10)
    # every call sent a batch and the handler saw all of it (however many calls the benchmark made)
    assert sent[0] >= BATCH and batches.handled == sent[0]
    assert batches.wait_acked(sent[0])


def test_push_consumer_handles_one_sent_message(benchmark, singles: Running) -> None:
    body = os.urandom(PAYLOAD)
    sent = [0]

    def send_and_wait_for_handler() -> bool:
        singles.queue.send(body, content_type="bytes")
        sent[0] += 1
        return singles.wait_handled(sent[0])

    assert benchmark.pedantic(send_and_wait_for_handler, rounds=500, iterations=1, warmup_rounds=10)
    assert sent[0] >= 1 and singles.handled == sent[0]
    assert singles.wait_acked(sent[0])
