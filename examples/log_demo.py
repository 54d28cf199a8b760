"""A producer and a consumer, in two processes, on one qlog log.

    python examples/log_demo.py [DIR]

The producer appends 100,000 records (durability "sync": each batch returns
once it is on stable storage); the consumer, another process, is woken by
each batch without polling and reads everything back in order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
import time

import qlog

N = 100_000
BATCH = 1_000


def consume(path: str, start: int, ready) -> None:
    with qlog.Log(path) as log:
        ready.set()
        seq, seen = start, 0
        while seen < N:
            if not log.wait(seq, timeout=10.0):
                sys.exit("consumer: no record for 10 s")
            for s, payload in log.read(seq, max_records=BATCH):
                assert s == seq and payload == b"job %d" % seen, (s, payload)
                seq, seen = seq + 1, seen + 1
        print(f"consumer: read {seen:,} records in order, last seq {seq - 1}")


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "demo-log")
    with qlog.Log(path, durability="sync") as log:
        start = log.next_seq
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        consumer = ctx.Process(target=consume, args=(path, start, ready))
        consumer.start()
        ready.wait(30)
        t0 = time.perf_counter()
        for i in range(0, N, BATCH):
            log.append_batch([b"job %d" % j for j in range(i, i + BATCH)])
        dt = time.perf_counter() - t0
        st = log.stats()
        print(f"producer: appended {N:,} records in {dt:.2f} s "
              f"({N / dt:,.0f}/s, {st.fsyncs} fsyncs) to {path}")
    consumer.join(60)
    if consumer.exitcode != 0:
        sys.exit(f"consumer failed with exit code {consumer.exitcode}")
    with qlog.Log(path) as log:
        report = log.verify()
        print(f"verify: {report.records:,} records intact, damage: {report.damage or 'none'}")


if __name__ == "__main__":
    main()
