"""Micro-benchmarks of queues (pytest-benchmark).

    pytest benchmarks/ --benchmark-only

Not part of the test suite (pyproject's testpaths is tests/).  100-byte
bytes bodies and ~100-byte dicts, durability "interval", as in
benchmarks/queues.py; every queue stays below one segment.
"""

from __future__ import annotations

import os
from typing import Iterator, List

import pytest

import qlog
from queues import BATCH, PAYLOAD, bytes_bodies, json_bodies


@pytest.fixture
def queue(tmp_path) -> Iterator[qlog.Queue]:
    with qlog.open(tmp_path / "broker", durability="interval") as broker:
        yield broker.queue("jobs")


@pytest.fixture
def bodies() -> List[bytes]:
    return bytes_bodies()


def test_send_one_bytes_message(benchmark, queue: qlog.Queue) -> None:
    body = os.urandom(PAYLOAD)
    benchmark.pedantic(queue.send, args=(body,), kwargs={"content_type": "bytes"},
                       rounds=100, iterations=500, warmup_rounds=5)
    # every timed call sent a message (the benchmark may make extra calls)
    assert queue.stats().backlog >= 105 * 500
    assert queue.peek(1)[0].body == body


def test_send_batch_of_100_bytes_messages(benchmark, queue: qlog.Queue, bodies) -> None:
    ids = benchmark.pedantic(queue.send_batch, args=(bodies,), kwargs={"content_type": "bytes"},
                             rounds=500, iterations=1, warmup_rounds=10)
    assert len(ids) == BATCH
    assert queue.stats().backlog == 510 * BATCH


def test_pull_100_and_ack_all(benchmark, queue: qlog.Queue, bodies) -> None:
    rounds, warmup = 300, 10
    for _ in range(rounds + warmup):
        queue.send_batch(bodies, content_type="bytes")

    def pull_and_ack() -> int:
        batch = queue.pull(BATCH)
        n = sum(len(m.body) for m in batch.messages)
        batch.ack_all()
        return n

    got = benchmark.pedantic(pull_and_ack, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert got == BATCH * PAYLOAD
    st = queue.stats()
    assert st.acked == (rounds + warmup) * BATCH and st.backlog == 0


def test_json_send_batch_pull_and_ack_round_trip(benchmark, queue: qlog.Queue) -> None:
    dicts = json_bodies()

    def round_trip() -> list:
        queue.send_batch(dicts)
        batch = queue.pull(BATCH)
        out = [m.body for m in batch.messages]
        batch.ack_all()
        return out

    got = benchmark.pedantic(round_trip, rounds=300, iterations=1, warmup_rounds=10)
    assert got == dicts
    assert queue.stats().acked == 310 * BATCH


def test_send_one_message_durability_sync(benchmark, tmp_path) -> None:
    body = os.urandom(PAYLOAD)
    with qlog.open(tmp_path / "broker", durability="sync") as broker:
        q = broker.queue("jobs")
        benchmark.pedantic(q.send, args=(body,), kwargs={"content_type": "bytes"},
                           rounds=300, iterations=1, warmup_rounds=10)
        assert q.stats().backlog == 310
