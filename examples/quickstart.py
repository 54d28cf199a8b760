"""A producer and a consumer, in two processes, on one qlog queue.

    python examples/quickstart.py [DIR]

The producer process sends 20,000 jobs (durability "sync", the default: each
``send_batch`` returns once its messages are on stable storage), a few of
them one by one with ``send``.  The consumer process pulls batches, woken by
each send without polling, "fails" every 100th job once (``retry``) and acks
the rest; retried jobs come back with ``attempts == 2`` and are acked then.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import tempfile
import time

import qlog

N = 20_000
BATCH = 100


def produce(path: str) -> None:
    with qlog.open(path) as broker:
        q = broker.queue("jobs")
        for start in range(0, N - 10, BATCH):
            q.send_batch([{"job": i} for i in range(start, min(start + BATCH, N - 10))])
        for i in range(N - 10, N):
            q.send({"job": i})


def consume(path: str, ready) -> None:
    done = set()
    retried = 0
    with qlog.open(path) as broker:
        q = broker.queue("jobs")
        ready.set()
        while len(done) < N:
            batch = q.pull(batch_size=100, visibility_timeout=30, wait=10.0)
            if not batch.messages:
                sys.exit(f"consumer: nothing for 10 s after {len(done)} jobs")
            for m in batch.messages:
                job = m.body["job"]
                if job % 100 == 0 and m.attempts == 1:
                    m.retry()           # delivered again, attempts + 1
                    retried += 1
                else:
                    done.add(job)
            batch.ack_all()             # acks every message not retried above
        print(f"consumer: {len(done)} jobs done, {retried} retried once; stats: {q.stats()}")


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="qlog-quickstart-")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    consumer = ctx.Process(target=consume, args=(path, ready))
    consumer.start()
    ready.wait(30)
    t0 = time.perf_counter()
    producer = ctx.Process(target=produce, args=(path,))
    producer.start()
    producer.join()
    consumer.join()
    dt = time.perf_counter() - t0
    if producer.exitcode or consumer.exitcode:
        sys.exit(f"failed: producer exit {producer.exitcode}, consumer exit {consumer.exitcode}")
    print(f"{N} jobs sent and consumed across two processes in {dt:.2f} s ({path})")


if __name__ == "__main__":
    main()
