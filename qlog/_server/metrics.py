"""``GET /metrics``: Prometheus' text format (version 0.0.4), named as
``prometheus_client`` names things (``_total`` counters, base units,
``# HELP`` and ``# TYPE`` before each family).

Every queue figure is read from the store at scrape time (``Queue.stats``),
the state every process of the store shares, so the figures are right
however many processes use the queues: the delivery latency histogram
(send to first lease) too.  One family is this server's own:
``qlog_send_duration_seconds``, how long the sends it served took (a send
is timed where it is made, and the store does not record it).
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

from .._queue import DELIVERY_BUCKETS, Broker, QueueStats

_FAMILIES: List[Tuple[str, str, str, Callable[[QueueStats], Any]]] = [
    ("qlog_queue_backlog_messages", "gauge", "Messages not done: waiting, in flight or delayed.",
     lambda s: s.backlog),
    ("qlog_queue_in_flight_messages", "gauge", "Messages leased to a consumer whose lease has not run out.",
     lambda s: s.in_flight),
    ("qlog_queue_delayed_messages", "gauge", "Messages waiting out a delivery or retry delay.",
     lambda s: s.delayed),
    ("qlog_queue_oldest_message_age_seconds", "gauge", "Age of the oldest message not done (0: none).",
     lambda s: s.oldest_age or 0),
    ("qlog_queue_paused", "gauge", "1 while delivery is paused.", lambda s: int(s.paused)),
    ("qlog_messages_sent_total", "counter", "Messages sent to the queue.", lambda s: s.sent),
    ("qlog_messages_acked_total", "counter", "Messages acked.", lambda s: s.acked),
    ("qlog_messages_retried_total", "counter", "Deliveries retried (a retry at the last attempt "
     "counts as dead-lettered or deleted).", lambda s: s.retried),
    ("qlog_lease_expired_total", "counter",
     "Leases that ran out with no ack or retry (counted when a later pull finds them).",
     lambda s: s.lease_expired),
    ("qlog_messages_dead_lettered_total", "counter", "Messages moved to the dead-letter queue.",
     lambda s: s.dead_lettered),
    ("qlog_messages_deleted_total", "counter",
     "Messages deleted after their last retry (the queue has no dead-letter queue).", lambda s: s.deleted),
    ("qlog_messages_expired_total", "counter", "Messages dropped after message_retention.",
     lambda s: s.expired),
    ("qlog_messages_purged_total", "counter", "Messages deleted by a purge.", lambda s: s.purged),
]


SEND_BUCKETS: Tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds, in seconds, of ``qlog_send_duration_seconds``."""


class SendTimes:
    """How long this server's send calls took, per queue: a histogram."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._by_queue: Dict[str, List[float]] = {}  # counts per bucket, then the sum

    def timed(self, queue: str) -> "_Timer":
        return _Timer(self, queue)

    def observe(self, queue: str, seconds: float) -> None:
        i = bisect.bisect_left(SEND_BUCKETS, seconds)
        with self._mu:
            h = self._by_queue.get(queue)
            if h is None:
                h = self._by_queue[queue] = [0] * (len(SEND_BUCKETS) + 2)
            h[i] += 1
            h[-1] += seconds

    def snapshot(self) -> Dict[str, List[float]]:
        with self._mu:
            return {q: list(h) for q, h in self._by_queue.items()}


class _Timer:
    def __init__(self, times: SendTimes, queue: str) -> None:
        self.times, self.queue = times, queue

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None:
            self.times.observe(self.queue, time.perf_counter() - self.t0)


def _histogram(family: str, help_text: str, bounds: Sequence[float],
               rows: Sequence[Tuple[str, Sequence[float], float]]) -> Iterator[str]:
    """A histogram family: ``rows`` of (queue, counts per bucket with one
    more for the rest, sum), written cumulatively as Prometheus wants."""
    yield f"# HELP {family} {help_text}"
    yield f"# TYPE {family} histogram"
    for name, counts, total in rows:
        acc = 0
        for bound, c in zip([*map(_le, bounds), "+Inf"], counts):
            acc += int(c)
            yield f'{family}_bucket{{queue="{name}",le="{bound}"}} {acc}'
        yield f'{family}_count{{queue="{name}"}} {acc}'
        yield f'{family}_sum{{queue="{name}"}} {total!r}'


def _le(bound: float) -> str:
    return repr(float(bound))


def prometheus(broker: Broker, sends: SendTimes) -> str:
    """The metrics of every queue of ``broker``, and of the sends this
    server made (``sends``), as Prometheus text."""
    stats = [(name, broker.queue(name).stats()) for name in broker.queues()]
    out: List[str] = []
    for family, kind, help_text, get in _FAMILIES:
        out.append(f"# HELP {family} {help_text}")
        out.append(f"# TYPE {family} {kind}")
        for name, s in stats:
            out.append(f'{family}{{queue="{name}"}} {get(s)}')
    out += _histogram(
        "qlog_delivery_latency_seconds",
        "Time from a message's send to its first delivery, its delivery delay included.",
        DELIVERY_BUCKETS, [(name, s.delivery_buckets, s.delivery_seconds) for name, s in stats])
    taken = sends.snapshot()
    out += _histogram(
        "qlog_send_duration_seconds",
        "How long the send calls this server made took (one per push or batch push), fsync included.",
        SEND_BUCKETS, [(name, h[:-1], h[-1]) for name, h in sorted(taken.items())])
    return "\n".join(out) + "\n"
