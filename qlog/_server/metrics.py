"""``GET /metrics``: Prometheus' text format (version 0.0.4), named as
``prometheus_client`` names things (``_total`` counters, base units,
``# HELP`` and ``# TYPE`` before each family).

Every number is read from the store at scrape time (``Queue.stats``), the
state every process of the store shares, so the figures are right however
many processes use the queues.
"""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

from .._queue import Broker, QueueStats

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
    ("qlog_messages_dead_lettered_total", "counter", "Messages moved to the dead-letter queue.",
     lambda s: s.dead_lettered),
    ("qlog_messages_deleted_total", "counter",
     "Messages deleted after their last retry (the queue has no dead-letter queue).", lambda s: s.deleted),
    ("qlog_messages_expired_total", "counter", "Messages dropped after message_retention.",
     lambda s: s.expired),
    ("qlog_messages_purged_total", "counter", "Messages deleted by a purge.", lambda s: s.purged),
]


def prometheus(broker: Broker) -> str:
    """The metrics of every queue of ``broker``, as Prometheus text."""
    stats = [(name, broker.queue(name).stats()) for name in broker.queues()]
    out: List[str] = []
    for family, kind, help_text, get in _FAMILIES:
        out.append(f"# HELP {family} {help_text}")
        out.append(f"# TYPE {family} {kind}")
        for name, s in stats:
            out.append(f'{family}{{queue="{name}"}} {get(s)}')
    return "\n".join(out) + "\n"
