"""Micro-benchmarks of the log engine (pytest-benchmark).

    pytest benchmarks/ --benchmark-only

Not part of the test suite (pyproject's testpaths is tests/).  Each log
stays below one segment, so no segment roll (with its fdatasync) lands in a
timed round.  100-byte payloads, as in benchmarks/engine.py.
"""

from __future__ import annotations

import os
from itertools import count
from typing import Iterator, List

import pytest

import qlog

PAYLOAD = 100
BATCH = 1000


@pytest.fixture
def payloads() -> List[bytes]:
    return [os.urandom(PAYLOAD) for _ in range(BATCH)]


@pytest.fixture
def log_none(tmp_path) -> Iterator[qlog.Log]:
    with qlog.Log(tmp_path / "log", durability="none") as log:
        yield log


def test_append_one_record_durability_none(benchmark, log_none: qlog.Log) -> None:
    payload = os.urandom(PAYLOAD)
    benchmark.pedantic(log_none.append, args=(payload,), rounds=100, iterations=1000,
                       warmup_rounds=5)
    # every timed call appended a record (the benchmark may make extra calls)
    assert log_none.next_seq >= 105 * 1000
    assert log_none.read(log_none.next_seq - 1)[0][1] == payload


def test_append_batch_of_1000_durability_none(benchmark, log_none: qlog.Log, payloads) -> None:
    benchmark.pedantic(log_none.append_batch, args=(payloads,), rounds=300, iterations=1,
                       warmup_rounds=10)
    assert log_none.next_seq == 310 * BATCH


def test_read_1000_records(benchmark, log_none: qlog.Log, payloads) -> None:
    chunks = 100
    for _ in range(chunks):
        log_none.append_batch(payloads)
    starts = count()

    def read_next_chunk() -> int:
        recs = log_none.read((next(starts) % chunks) * BATCH, max_records=BATCH)
        return sum(len(p) for _, p in recs)

    got = benchmark.pedantic(read_next_chunk, rounds=500, iterations=1, warmup_rounds=10)
    assert got == BATCH * PAYLOAD


def test_append_one_record_durability_sync(benchmark, tmp_path) -> None:
    payload = os.urandom(PAYLOAD)
    with qlog.Log(tmp_path / "log", durability="sync") as log:
        benchmark.pedantic(log.append, args=(payload,), rounds=300, iterations=1,
                           warmup_rounds=10)
        st = log.stats()
        assert st.synced_seq == st.next_seq == 310
