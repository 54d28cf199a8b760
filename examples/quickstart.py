"""A producer and a push consumer, in two processes, on one qlog queue.

    python examples/quickstart.py [DIR]

The consumer process registers a handler with ``@broker.consumer`` and runs
it with ``broker.run()`` (what ``qlog worker`` does): batches of up to 100
jobs, handed over when full or 0.1 s after their first job arrived, two
batches at once.  Woken by each send, it never polls.

The producer process sends 20,000 jobs (durability "sync", the default:
each ``send_batch`` returns once its messages are on stable storage), the
last few one by one with ``send``.  Every 100th job fails once: the handler
retries it on its own with ``m.retry()``, and it comes back with
``attempts == 2``.  Returning from the handler acks everything else.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import tempfile
import threading
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
    broker = qlog.open(path)
    done = set()
    retried = []
    lock = threading.Lock()

    @broker.consumer("jobs", max_batch_size=100, max_batch_timeout=0.1, max_concurrency=2)
    def handle(batch: qlog.MessageBatch) -> None:
        for m in batch.messages:
            job = m.body["job"]
            if job % 100 == 0 and m.attempts == 1:
                m.retry()               # delivered again, attempts + 1
                with lock:
                    retried.append(job)
            else:
                with lock:
                    done.add(job)
        if len(done) == N:
            broker.stop()               # or SIGTERM / Ctrl-C, as for `qlog worker`
        # returning acks every message not retried above

    ready.set()
    broker.run()
    print(f"consumer: {len(done)} jobs done, {len(retried)} retried once; "
          f"stats: {broker.queue('jobs').stats()}")
    broker.close()


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
    consumer.join(120)
    dt = time.perf_counter() - t0
    if consumer.is_alive():
        consumer.kill()
        sys.exit("failed: the consumer did not finish within 120 s")
    if producer.exitcode or consumer.exitcode:
        sys.exit(f"failed: producer exit {producer.exitcode}, consumer exit {consumer.exitcode}")
    print(f"{N} jobs sent and consumed across two processes in {dt:.2f} s ({path})")


if __name__ == "__main__":
    main()
