"""The PostgreSQL backend: queues in tables (``schema.py``), for many machines.

Every transition is one SQL statement, so one transaction (``conn.py`` says
why READ COMMITTED is the level):

- an append inserts its rows with numbers from one ``nextval``;
- a lease picks visible rows ``FOR UPDATE SKIP LOCKED`` and sets their
  deadline and attempts in the same statement, which also expires the
  messages past retention and finds those leased ``max_attempts`` times;
- ack deletes the rows; retry and extend update only the rows whose
  attempts match the lease (``leased`` still set), so a stale lease id
  changes nothing;
- the dead-letter move deletes the rows here and inserts, in the same
  statement, the copies of only the rows it deleted: an ack that came first
  wins, and a crash leaves the message in exactly one queue.

Time: a store opened without a clock of its own uses the database server's:
it reads ``clock_timestamp()`` and keeps the offset from this machine's
clock (read again every :data:`CLOCK_REFRESH` seconds), so machines whose
clocks disagree agree on visibility, delays and retention to within a round
trip.  A hand clock (tests) is used as given.

Waking: a consumer that waits records it in ``waiters`` (with an expiry,
:data:`WAIT_FLAG_US`), and removes the record when it finds messages again.
An append or retry sends a NOTIFY in its own statement only while a record
is there, so a busy queue sends none and a burst of sends to idle consumers
sends a few (a NOTIFY takes a database-wide lock at commit).  Waiters in
this process are woken at once.  Rare changes (resume, settings, a
deletion) notify always, and :meth:`PgQueue.wake` and dead-letter moves
through this process's sender thread, which coalesces them.  One listener
thread per process receives NOTIFYs; a wait never lasts longer than
:data:`SAFETY_POLL` seconds, the safety net if one is lost.
"""

from __future__ import annotations

import atexit
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from .. import errors
from .._backend import DELIVERY_BUCKETS_US, RECORD_HEADER, Counts, LeasePolicy, QueueBackend, Store
from .conn import Connections, redact, split_target
from .schema import COUNTER_SHARDS, migrate

if TYPE_CHECKING:  # pragma: no cover
    from .._log import MessageBase

SAFETY_POLL = 1.0
"""The longest a waiting consumer goes without looking again (seconds)."""
CLOCK_REFRESH = 30.0
"""Seconds between readings of the server's clock."""
_DEAD_LIMIT = 1000  # messages one lease expires or finds dead, at most
_NO_CUT = -(1 << 63)  # "no retention": no send time is at or before it
_unpack_header = RECORD_HEADER.unpack_from
_NOW = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"  # the server's time, µs
WAIT_FLAG_US = 2_000_000
"""How long a waiting consumer's flag (``queues.waiting_until``) lasts: it
is set again while the consumer still waits."""
FIRST_WAIT = 0.02
"""Seconds the first wait after setting the flag lasts at most: a send whose
statement began before the flag was committed did not see it, so the
consumer looks again this soon rather than at the safety poll."""


def _shard() -> str:
    return f"pg_backend_pid() %% {COUNTER_SHARDS}"


class _Sql:
    """The statements of one schema, made once per store."""

    def __init__(self, psycopg: Any, schema: str) -> None:
        s = psycopg.sql.Identifier(schema).as_string(None)
        sh = _shard()

        def q(text: str) -> Any:
            return psycopg.sql.SQL(text.replace("{s}", s))

        # pg_notify(), only while a consumer waits (a NOTIFY takes a
        # database-wide lock at commit): an expression to AND more onto.
        def notify_if_waiting(cond: str) -> str:
            return (f"(SELECT pg_notify(%(ch)s, %(payload)s) WHERE {cond} AND EXISTS ("
                    f"SELECT 1 FROM {s}.waiters WHERE queue = %(q)s AND until_us > {_NOW})) IS NULL")

        # The append checks that the queue exists (there is no foreign
        # key, schema.py) and sends a NOTIFY, in the same transaction, only
        # while a consumer says it is waiting.
        self.append = q(f"""
            WITH b AS (SELECT nextval('{{s}}.message_seq') AS base),
            qq AS (SELECT 1 FROM {{s}}.queues WHERE name = %(q)s),
            ins AS (
                INSERT INTO {{s}}.messages (queue, seq, sent_us, due_us, record)
                SELECT %(q)s, b.base + u.i - 1, u.sent, u.sent + u.delay, u.rec
                FROM b, unnest(%(sent)s::bigint[], %(delay)s::bigint[], %(recs)s::bytea[])
                     WITH ORDINALITY AS u(sent, delay, rec, i)
                WHERE EXISTS (SELECT 1 FROM qq))
            SELECT base, EXISTS (SELECT 1 FROM qq), {notify_if_waiting("EXISTS (SELECT 1 FROM qq)")}
            FROM b""")
        self.append_one = q(f"""
            WITH qq AS (SELECT 1 FROM {{s}}.queues WHERE name = %(q)s),
            ins AS (
                INSERT INTO {{s}}.messages (queue, seq, sent_us, due_us, record)
                SELECT %(q)s, nextval('{{s}}.message_seq'), %(sent)s, %(due)s, %(rec)s
                WHERE EXISTS (SELECT 1 FROM qq) RETURNING seq)
            SELECT (SELECT seq FROM ins), EXISTS (SELECT 1 FROM qq), {notify_if_waiting("EXISTS (SELECT 1 FROM qq)")}""")
        self.wait_flag = q(f"""
            WITH old AS (DELETE FROM {{s}}.waiters WHERE queue = %(q)s AND until_us < {_NOW} - 3600000000)
            INSERT INTO {{s}}.waiters VALUES (%(q)s, %(w)s, {_NOW} + {WAIT_FLAG_US})
            ON CONFLICT (queue, waiter) DO UPDATE SET until_us = excluded.until_us""")
        self.wait_done = q("DELETE FROM {s}.waiters WHERE queue = %(q)s AND waiter = %(w)s")
        # The lease, in one statement: lock the first ``n`` visible rows
        # (``head``), then expire those past retention, lease those below
        # max_attempts and return the rest as dead (to be moved next).  The
        # three sets split ``head`` by its own columns, so no row is in two.
        # Only ``n`` rows are looked at: the caller leases again for the
        # room that expired and dead rows took (see PgQueue.lease).
        # The same statement counts, in one update of the counters row
        # (a statement may change a row once): expiries, leases found run
        # out (leased rows in ``head``) and first deliveries by latency
        # bucket (``width_bucket`` over the bounds plus 1 µs counts the
        # bounds below a latency: bucket i holds latencies <= bound i, as
        # _backend.delivery_bucket).
        nb = len(DELIVERY_BUCKETS_US) + 1
        bounds = "ARRAY[" + ",".join(str(b + 1) for b in DELIVERY_BUCKETS_US) + "]::bigint[]"
        self.lease = q(f"""
            WITH head AS (
                SELECT seq, sent_us, attempts, leased FROM {{s}}.messages
                WHERE queue = %(q)s AND due_us <= %(now)s AND lease_until <= %(now)s
                  AND EXISTS (SELECT 1 FROM {{s}}.queues WHERE name = %(q)s AND NOT paused)
                ORDER BY due_us, seq LIMIT %(n)s FOR UPDATE SKIP LOCKED),
            exp AS (
                DELETE FROM {{s}}.messages m USING head h
                WHERE m.queue = %(q)s AND m.seq = h.seq AND h.sent_us <= %(cut)s
                RETURNING 1),
            first AS (
                SELECT greatest(%(now)s - sent_us, 0) AS lat FROM head
                WHERE attempts = 0 AND sent_us > %(cut)s AND attempts < %(max)s),
            hist AS (SELECT width_bucket(lat, {bounds}) + 1 AS b, count(*) AS c, sum(lat) AS t
                     FROM first GROUP BY 1),
            lx AS (SELECT count(*) AS n FROM head WHERE leased AND sent_us > %(cut)s),
            bump AS (
                UPDATE {{s}}.counters c SET
                    expired = expired + (SELECT count(*) FROM exp),
                    lease_expired = lease_expired + (SELECT n FROM lx),
                    delivery_sum_us = delivery_sum_us + coalesce((SELECT sum(t) FROM hist), 0),
                    delivery = CASE WHEN EXISTS (SELECT 1 FROM hist) THEN (
                        SELECT array_agg(coalesce(c.delivery[i], 0)
                                         + coalesce((SELECT h.c FROM hist h WHERE h.b = i), 0) ORDER BY i)
                        FROM generate_series(1, {nb}) i) ELSE delivery END
                WHERE queue = %(q)s AND shard = {sh}
                  AND (EXISTS (SELECT 1 FROM exp) OR EXISTS (SELECT 1 FROM hist) OR (SELECT n FROM lx) > 0)),
            leased AS (
                UPDATE {{s}}.messages m
                SET attempts = m.attempts + 1, leased = true, lease_until = %(deadline)s
                FROM head h
                WHERE m.queue = %(q)s AND m.seq = h.seq AND h.sent_us > %(cut)s AND h.attempts < %(max)s
                RETURNING m.seq, m.attempts, m.record)
            SELECT 0, seq, attempts, record FROM leased
            UNION ALL
            SELECT 1, m.seq, m.attempts, m.record FROM {{s}}.messages m JOIN head h ON m.seq = h.seq
            WHERE m.queue = %(q)s AND h.sent_us > %(cut)s AND h.attempts >= %(max)s
            UNION ALL
            SELECT 2, count(*), 0, NULL FROM exp""")
        self.ack = q(f"""
            WITH d AS (DELETE FROM {{s}}.messages WHERE queue = %(q)s AND seq = ANY(%(seqs)s::bigint[])
                       RETURNING 1),
            c AS (SELECT count(*) AS n FROM d),
            bump AS (UPDATE {{s}}.counters SET acked = acked + (SELECT n FROM c)
                     WHERE queue = %(q)s AND shard = {sh} AND (SELECT n FROM c) > 0)
            SELECT n FROM c""")
        self.retry = q(f"""
            WITH u AS (
                UPDATE {{s}}.messages m SET leased = false, lease_until = 0, due_us = u.due
                FROM unnest(%(seqs)s::bigint[], %(atts)s::int[], %(dues)s::bigint[]) AS u(seq, att, due)
                WHERE m.queue = %(q)s AND m.seq = u.seq AND m.attempts = u.att AND m.leased
                RETURNING 1),
            c AS (SELECT count(*) AS n FROM u),
            bump AS (UPDATE {{s}}.counters SET retried = retried + (SELECT n FROM c)
                     WHERE queue = %(q)s AND shard = {sh} AND (SELECT n FROM c) > 0)
            SELECT (SELECT n FROM c), {notify_if_waiting("EXISTS (SELECT 1 FROM u)")}""")
        self.extend = q("""
            UPDATE {s}.messages m SET lease_until = %(deadline)s
            FROM unnest(%(seqs)s::bigint[], %(atts)s::int[]) AS u(seq, att)
            WHERE m.queue = %(q)s AND m.seq = u.seq AND m.attempts = u.att AND m.leased""")
        self.records = q("""
            SELECT seq, record FROM {s}.messages m
            WHERE queue = %(q)s AND seq = ANY(%(seqs)s::bigint[])""")
        # The dead-letter move: rows leave here only at the delivery named
        # (``leased`` for a retry at the last attempt, visible for those a
        # lease found), and the DLQ gets copies of exactly the rows deleted.
        move = f"""
            WITH gone AS (
                DELETE FROM {{s}}.messages m
                USING unnest(%(seqs)s::bigint[], %(atts)s::int[]) AS u(seq, att)
                WHERE m.queue = %(q)s AND m.seq = u.seq AND m.attempts = u.att
                  AND (m.leased OR NOT %(leased_only)s) AND (%(leased_only)s OR (m.due_us <= %(now)s AND m.lease_until <= %(now)s))
                RETURNING m.seq),
            c AS (SELECT count(*) AS n FROM gone),
            bump AS (UPDATE {{s}}.counters SET {{what}} = {{what}} + (SELECT n FROM c)
                     WHERE queue = %(q)s AND shard = {sh} AND (SELECT n FROM c) > 0)
            {{insert}}
            SELECT n FROM c"""
        self.move = q(move.replace("{what}", "dead_lettered").replace("{insert}", """,
            b AS (SELECT nextval('{s}.message_seq') AS base),
            ins AS (
                INSERT INTO {s}.messages (queue, seq, sent_us, due_us, record)
                SELECT %(dlq)s, b.base + v.i - 1, v.sent, v.sent + v.delay, v.rec
                FROM b, unnest(%(seqs)s::bigint[], %(sent)s::bigint[], %(delay)s::bigint[],
                               %(recs)s::bytea[]) WITH ORDINALITY AS v(seq, sent, delay, rec, i)
                WHERE v.seq IN (SELECT seq FROM gone))"""))
        self.delete_dead = q(move.replace("{what}", "deleted").replace("{insert}", ""))
        self.lease_state = q("""
            SELECT seq, attempts, leased FROM {s}.messages
            WHERE queue = %(q)s AND seq = ANY(%(seqs)s::bigint[])""")
        self.peek = q("""
            SELECT seq, attempts, record FROM {s}.messages WHERE queue = %(q)s
            ORDER BY seq LIMIT %(n)s""")
        self.purge = q(f"""
            WITH d AS (DELETE FROM {{s}}.messages WHERE queue = %(q)s RETURNING 1),
            c AS (SELECT count(*) AS n FROM d),
            bump AS (UPDATE {{s}}.counters SET purged = purged + (SELECT n FROM c)
                     WHERE queue = %(q)s AND shard = {sh} AND (SELECT n FROM c) > 0)
            SELECT n FROM c""")
        self.expire = q(f"""
            WITH d AS (DELETE FROM {{s}}.messages
                       WHERE queue = %(q)s AND sent_us <= %(cut)s AND NOT (leased AND lease_until > %(now)s)
                       RETURNING 1),
            c AS (SELECT count(*) AS n FROM d),
            bump AS (UPDATE {{s}}.counters SET expired = expired + (SELECT n FROM c)
                     WHERE queue = %(q)s AND shard = {sh} AND (SELECT n FROM c) > 0)
            SELECT n FROM c""")
        self.oldest = q("SELECT sent_us FROM {s}.messages WHERE queue = %(q)s ORDER BY seq LIMIT 1")
        self.counts = q("""
            SELECT count(*), CASE WHEN %(bytes)s THEN coalesce(sum(length(record)), 0) ELSE 0 END,
                   count(*) FILTER (WHERE lease_until > %(now)s),
                   count(*) FILTER (WHERE lease_until <= %(now)s AND due_us > %(now)s),
                   min(sent_us),
                   (SELECT row(sum(acked), sum(dead_lettered), sum(deleted), sum(expired), sum(purged),
                               sum(retried), sum(lease_expired), sum(delivery_sum_us))
                    FROM {s}.counters WHERE queue = %(q)s),
                   (SELECT array_agg(n ORDER BY i) FROM (
                        SELECT i, sum(coalesce(c.delivery[i], 0)) AS n
                        FROM {s}.counters c, generate_series(1, %(nb)s) i
                        WHERE c.queue = %(q)s GROUP BY i) h)
            FROM {s}.messages WHERE queue = %(q)s""")
        self.next_due = q("""
            SELECT least(
                (SELECT min(due_us) FROM {s}.messages WHERE queue = %(q)s AND due_us > %(now)s),
                (SELECT min(lease_until) FROM {s}.messages
                 WHERE queue = %(q)s AND due_us <= %(now)s AND lease_until > %(now)s))""")
        self.set_paused = q("UPDATE {s}.queues SET paused = %(p)s WHERE name = %(q)s")
        self.queue_row = q(
            "SELECT id_prefix, paused, settings, settings_gen, created_us FROM {s}.queues WHERE name = %(q)s")
        self.paused = q("SELECT paused FROM {s}.queues WHERE name = %(q)s")
        self.store_settings = q("""
            UPDATE {s}.queues SET settings = settings || %(changes)s::jsonb, settings_gen = settings_gen + 1
            WHERE name = %(q)s RETURNING settings, settings_gen""")
        self.settings_gens = q("SELECT name, settings_gen FROM {s}.queues WHERE name = ANY(%(names)s::text[])")
        self.exists = q("SELECT 1 FROM {s}.queues WHERE name = %(q)s")
        self.names = q("SELECT name FROM {s}.queues ORDER BY name")
        self.create = q(f"""
            WITH ins AS (
                INSERT INTO {{s}}.queues (name, id_prefix, created_us)
                VALUES (%(q)s, %(prefix)s, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
                ON CONFLICT (name) DO NOTHING RETURNING name),
            c AS (INSERT INTO {{s}}.counters (queue, shard)
                  SELECT name, g FROM ins, generate_series(0, {COUNTER_SHARDS - 1}) g),
            orphans AS (DELETE FROM {{s}}.messages WHERE queue = %(q)s AND EXISTS (SELECT 1 FROM ins))
            SELECT count(*) FROM ins""")
        self.delete = q("""
            WITH m AS (DELETE FROM {s}.messages WHERE queue = %(q)s)
            DELETE FROM {s}.queues WHERE name = %(q)s""")
        self.server_time = q("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
        # A commit that wrote WAL, durably: the flush covers every earlier
        # commit (a commit that writes no WAL is not flushed synchronously).
        self.commit_point = q("UPDATE {s}.meta SET value = value WHERE key = 'schema_version'")
        self.notify = q("SELECT pg_notify(%(ch)s, p) FROM unnest(%(payloads)s::text[]) AS p")


class _Notifier:
    """Change counters of one database schema, shared by every store of
    this process on it (see the module docstring, "Waking")."""

    _all: Dict[Tuple[str, str], "_Notifier"] = {}
    _all_lock = threading.Lock()

    @classmethod
    def get(cls, conns: Connections, schema: str, sql: _Sql) -> "_Notifier":
        key = (conns.conninfo, schema)
        with cls._all_lock:
            n = cls._all.get(key)
            if n is None or n._stopping:
                n = cls._all[key] = cls(conns, key, sql)
            n._users += 1
            return n

    def __init__(self, conns: Connections, key: Tuple[str, str], sql: _Sql) -> None:
        self._conns = Connections(conns.conninfo, conns.location)  # its own, closed with it
        self._sql = sql
        self._key = key
        self.channel = f"qlog_{key[1]}"
        self._cv = threading.Condition()
        self._gens: Dict[str, int] = {}
        self.settings: Dict[str, List[int]] = {}
        self.seen: Dict[str, int] = {}  # the stored settings counters last read
        self._dirty: Set[str] = set()
        self._users = 0
        self._stopping = False
        self._listening = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="qlog-pg-listen", daemon=True)
        self._sender = threading.Thread(target=self._send, name="qlog-pg-notify", daemon=True)
        self._listener.start()
        self._sender.start()
        self._listening.wait(10.0)

    def release(self) -> None:
        with self._all_lock:
            self._users -= 1
            if self._users > 0:
                return
            self._stopping = True
            if self._all.get(self._key) is self:
                del self._all[self._key]
        with self._cv:
            self._cv.notify_all()
        # The sender sends what is pending first (a process that stores a
        # setting and exits must still tell the others); the listener ends
        # within SAFETY_POLL and closes its connection.
        self._sender.join(5.0)

    def settings_counter(self, name: str) -> List[int]:
        with self._cv:
            return self.settings.setdefault(name, [0])

    def token(self, name: str) -> int:
        with self._cv:
            return self._gens.get(name, 0)

    def wait(self, name: str, token: int, timeout: float) -> None:
        end = time.monotonic() + min(timeout, SAFETY_POLL)
        with self._cv:
            while self._gens.get(name, 0) == token and not self._stopping:
                left = end - time.monotonic()
                if left <= 0:
                    return
                self._cv.wait(left)

    def changed(self, name: str, settings: bool = False) -> None:
        """Bump ``name``'s counters here, and have the sender tell the other processes."""
        with self._cv:
            self._bump(name, settings)
            self._dirty.add(("s" if settings else "c") + name)
            self._cv.notify_all()

    def changed_here(self, name: str) -> None:
        """Bump ``name``'s counter for this process's waiters only (the
        statement that made the change sent the NOTIFY, if anyone waits)."""
        with self._cv:
            self._bump(name, False)
            self._cv.notify_all()

    def changed_now(self, name: str, settings: bool = False) -> None:
        """:meth:`changed` for rare changes (settings, resume, a deletion):
        the NOTIFY is sent before this returns, so a
        process that exits next still tells the others."""
        with self._cv:
            self._bump(name, settings)
            self._cv.notify_all()
        self._conns.run(self._sql.notify, {"ch": self.channel, "payloads": [("s" if settings else "c") + name]},
                        durable=False, what="a NOTIFY")

    @classmethod
    def flush_all(cls) -> None:
        """At exit: send the NOTIFYs still pending (a producer that sends
        and exits without closing its broker still wakes the consumers)."""
        with cls._all_lock:
            pending = list(cls._all.values())
        for n in pending:
            with n._cv:
                n._stopping = True
                n._cv.notify_all()
            n._sender.join(2.0)

    def _bump(self, name: str, settings: bool) -> None:
        self._gens[name] = self._gens.get(name, 0) + 1
        if settings:
            self.settings.setdefault(name, [0])[0] += 1

    def _send(self) -> None:
        while True:
            with self._cv:
                while not self._dirty and not self._stopping:
                    self._cv.wait(SAFETY_POLL)
                if not self._dirty:
                    break
                payloads, self._dirty = sorted(self._dirty), set()
            try:
                self._conns.run(self._sql.notify, {"ch": self.channel, "payloads": payloads},
                                durable=False, what="a NOTIFY")
            except Exception:  # this thread must outlive any failure
                pass  # the waiters' safety poll covers a lost NOTIFY
        self._conns.close()

    def _listen(self) -> None:
        conn = None
        while not self._stopping:
            try:
                if conn is None:
                    conn = self._conns.connect()
                    conn.execute(self._conns.psycopg.sql.SQL("LISTEN {}").format(
                        self._conns.psycopg.sql.Identifier(self.channel)))
                    with self._cv:  # anything may have changed while no one listened
                        for name in list(self._gens):
                            self._bump(name, False)
                        self._cv.notify_all()
                    self._listening.set()
                got = False
                for n in conn.notifies(timeout=SAFETY_POLL):
                    got = True
                    with self._cv:
                        self._bump(n.payload[1:], n.payload[0] == "s")
                        self._cv.notify_all()
                if not got:
                    self._poll_settings(conn)
            except (errors.QlogError, self._conns.psycopg.Error):
                self._listening.set()
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
                conn = None
                time.sleep(0.2)
        if conn is not None:
            conn.close()

    def _poll_settings(self, conn: Any) -> None:
        """The safety net for settings: compare the stored counters."""
        with self._cv:
            names = list(self.settings)
        if not names:
            return
        rows = conn.execute(self._sql.settings_gens, {"names": names}).fetchall()
        with self._cv:
            for name, gen in rows:
                if self.seen.get(name, gen) != gen:
                    self._bump(name, True)
                self.seen[name] = gen


class PgStore(Store):
    """Queues in a PostgreSQL schema (see the module docstring)."""

    engine = "postgresql"

    def __init__(self, target: str, clock: Optional[Callable[[], float]] = None) -> None:
        conninfo, self.schema = split_target(target)
        self.location = redact(target)
        self.conns = Connections(conninfo, self.location)
        psycopg = self.conns.psycopg
        self.sql = _Sql(psycopg, self.schema)
        self._offset = 0.0
        self._offset_at = -CLOCK_REFRESH
        self.clock: Callable[[], float] = clock or self._server_clock
        migrate(self.conns, self.schema)
        self.notifier = _Notifier.get(self.conns, self.schema, self.sql)
        self._closed = False

    def _server_clock(self) -> float:
        now = time.monotonic()
        if now - self._offset_at >= CLOCK_REFRESH:
            self._offset_at = now
            t0 = time.time()
            row = self.conns.run(self.sql.server_time, fetch="one", what="reading the server's clock")
            t1 = time.time()
            self._offset = row[0] / 1e6 - (t0 + t1) / 2
        return time.time() + self._offset

    def now_us(self) -> int:
        return int(self.clock() * 1_000_000)

    def exists(self, name: str) -> bool:
        return self.conns.run(self.sql.exists, {"q": name}, fetch="one", what="a queue lookup") is not None

    def queue_names(self) -> List[str]:
        return [r[0] for r in self.conns.run(self.sql.names, what="listing queues")]

    def create_queue(self, name: str) -> bool:
        row = self.conns.run(self.sql.create, {"q": name, "prefix": secrets.token_hex(8)},
                             fetch="one", what=f"creating queue {name!r}")
        return bool(row[0])

    def delete_queue(self, name: str) -> None:
        self.conns.run(self.sql.delete, {"q": name}, fetch="count", what=f"deleting queue {name!r}")
        self.notifier.changed_now(name)

    def open_queue(self, name: str, owner: Any, message_class: type[MessageBase],
                   durability: str, segment_bytes: int) -> "PgQueue":
        return PgQueue(self, name, owner, message_class, durability)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.notifier.release()
        self.conns.close()


class PgQueue(QueueBackend):
    """One queue of a :class:`PgStore` (see the module docstring)."""

    def __init__(self, store: PgStore, name: str, owner: Any, message_class: type[MessageBase],
                 durability: str) -> None:
        self.name = name
        self._store = store
        self._run = store.conns.run
        self._sql = store.sql
        self._owner = owner
        self._cls = message_class
        self._durable = durability == "sync"
        self._notifier = store.notifier
        self._q = {"q": name}
        self._payload = "c" + name
        self._flag_until = 0.0  # monotonic time our waiting flag runs out (see wait_change)
        self._waiter = {"q": name, "w": secrets.token_hex(8)}
        row = self._run(self._sql.queue_row, self._q, fetch="one", what=f"opening queue {name!r}")
        if row is None:
            raise errors.QueueNotFoundError(f"queue {name!r} does not exist in {store.location}")
        self.id_prefix = row[0]
        self.created_us = int(row[4])
        self._notifier.seen.setdefault(name, row[3])  # the safety poll's baseline
        self._gen = self._notifier.settings_counter(name)
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise errors.LogClosedError(f"queue {self.name!r} is closed")

    # -- producing -------------------------------------------------------

    def append_one(self, record: bytes) -> int:
        self._check()
        _v, _ct, _f, delay_ms, sent = _unpack_header(record)
        return self._append(self._sql.append_one, {"sent": sent, "due": sent + delay_ms * 1000, "rec": record},
                            "a send")

    def _append(self, sql: Any, params: Dict[str, Any], what: str) -> int:
        """Run an append statement; its first number (the queue gone: refused)."""
        params.update(q=self.name, ch=self._notifier.channel, payload=self._payload)
        row = self._run(sql, params, durable=self._durable, idempotent=False, fetch="one",
                        what=f"{what} to queue {self.name!r}")
        if not row[1]:
            raise errors.QueueNotFoundError(
                f"queue {self.name!r} was deleted from {self._store.location}; nothing was sent")
        self._notifier.changed_here(self.name)
        return int(row[0])

    def append(self, records: Sequence[bytes], prefix: bytes = b"") -> int:
        self._check()
        if prefix:
            _v, _ct, _f, delay_ms, sent = _unpack_header(prefix)
            n = len(records)
            sents, delays = [sent] * n, [delay_ms * 1000] * n
            recs = [prefix + r for r in records]
        else:
            heads = [_unpack_header(r) for r in records]
            sents = [h[4] for h in heads]
            delays = [h[3] * 1000 for h in heads]
            recs = list(records)
        what = "a send" if len(recs) == 1 else f"a send of {len(recs)} messages"
        return self._append(self._sql.append, {"sent": sents, "delay": delays, "recs": recs}, what)

    def sync(self) -> None:
        # Every commit so far is durable once a synchronous commit returns
        # (the WAL is flushed in order).
        self._run(self._sql.commit_point, fetch="one", what="a sync")

    # -- consuming -------------------------------------------------------

    def lease(self, n: int, visibility_us: int, now_us: int, policy: LeasePolicy) -> List[Any]:
        self._check()
        ret = policy.retention_us
        params = {"q": self.name, "now": now_us, "cut": _NO_CUT if ret is None else now_us - ret,
                  "max": policy.max_attempts, "n": n, "deadline": now_us + visibility_us}
        got: List[Tuple[bool, int, int, bytes]] = []
        while True:
            rows = self._run(self._sql.lease, params, durable=False, what=f"a pull from queue {self.name!r}")
            got += [(att == 1, seq, att, rec) for kind, seq, att, rec in rows if kind == 0]
            dead = [(seq, att, rec) for kind, seq, att, rec in rows if kind == 1]
            expired = sum(seq for kind, seq, _att, _rec in rows if kind == 2)
            if dead:
                self._move([d[0] for d in dead], [d[1] for d in dead], now_us, policy,
                           [d[2] for d in dead], leased_only=False)
            # Expired and dead rows took room in this batch: look again for
            # as many (they are gone now, so each round makes progress).
            if len(got) >= n or not (dead or expired):
                break
            params["n"] = n - len(got)
        if got and self._flag_until:
            self._stop_waiting()  # busy now: sends need not NOTIFY for this handle
        cls, owner = self._cls, self._owner
        return [cls(owner, seq, att, rec) for _new, seq, att, rec in sorted(got)]

    def _stop_waiting(self) -> None:
        self._flag_until = 0.0
        self._run(self._sql.wait_done, self._waiter, durable=False, fetch="count",
                  what=f"waiting on queue {self.name!r}")

    def ack(self, numbers: Sequence[int]) -> int:
        row = self._run(self._sql.ack, {"q": self.name, "seqs": list(numbers)}, durable=False,
                        fetch="one", what=f"an ack on queue {self.name!r}")
        return int(row[0])

    def retry(self, numbers: Sequence[int], attempts: Sequence[int], due_us: Sequence[int]) -> int:
        row = self._run(self._sql.retry, {"q": self.name, "seqs": list(numbers), "atts": list(attempts),
                                          "dues": list(due_us), "ch": self._notifier.channel,
                                          "payload": self._payload},
                        durable=False, fetch="one", what=f"a retry on queue {self.name!r}")
        if row[0]:
            self._notifier.changed_here(self.name)
        return int(row[0])

    def extend(self, numbers: Sequence[int], attempts: Sequence[int], deadline_us: int) -> int:
        n = self._run(self._sql.extend, {"q": self.name, "seqs": list(numbers), "atts": list(attempts),
                                         "deadline": deadline_us},
                      durable=False, fetch="count", what=f"an extension on queue {self.name!r}")
        return int(n)

    def dead_letter(self, numbers: Sequence[int], attempts: Sequence[int], now_us: int,
                    policy: LeasePolicy, records: Optional[Sequence[bytes]] = None) -> int:
        seqs, atts = list(numbers), list(attempts)
        if records is None and policy.dead_letter_to is not None:
            found = {s: bytes(r) for s, r in self._run(self._sql.records, {"q": self.name, "seqs": seqs},
                                                     what=f"reading queue {self.name!r}")}
            keep = [i for i, s in enumerate(seqs) if s in found]
            seqs, atts = [seqs[i] for i in keep], [atts[i] for i in keep]
            records = [found[s] for s in seqs]
        return self._move(seqs, atts, now_us, policy, records, leased_only=True)

    def _move(self, seqs: List[int], atts: List[int], now: int, policy: LeasePolicy,
              records: Optional[Sequence[bytes]], leased_only: bool) -> int:
        """Dead-letter these deliveries in one statement (module docstring)."""
        if not seqs:
            return 0
        params: Dict[str, Any] = {"q": self.name, "seqs": seqs, "atts": atts, "now": now,
                                  "leased_only": leased_only}
        what = f"a dead-letter move from queue {self.name!r}"
        if policy.dead_letter_to is None:
            row = self._run(self._sql.delete_dead, params, durable=False, fetch="one", what=what)
            return int(row[0])
        dlq = policy.dead_letter_to()
        assert records is not None
        out = [policy.dead_letter_record(r, s, a, now) for s, a, r in zip(seqs, atts, records)]
        heads = [_unpack_header(r) for r in out]
        params.update(dlq=dlq.name, recs=out, sent=[h[4] for h in heads], delay=[h[3] * 1000 for h in heads])
        row = self._run(self._sql.move, params, durable=False, fetch="one", what=what)
        if row[0]:
            self._notifier.changed(dlq.name)
        return int(row[0])

    def lease_state(self, numbers: Sequence[int]) -> List[Optional[int]]:
        rows = self._run(self._sql.lease_state, {"q": self.name, "seqs": list(numbers)},
                         what=f"reading queue {self.name!r}")
        found = {seq: (att if leased else 0) for seq, att, leased in rows}
        return [found.get(s) for s in numbers]

    # -- looking, cleaning -------------------------------------------------

    def peek(self, n: int) -> List[Any]:
        rows = self._run(self._sql.peek, {"q": self.name, "n": n}, what=f"a peek at queue {self.name!r}")
        return [self._cls(self._owner, seq, att, bytes(rec), True) for seq, att, rec in rows]

    def purge(self) -> int:
        row = self._run(self._sql.purge, self._q, fetch="one", what=f"a purge of queue {self.name!r}")
        return int(row[0])

    def expire(self, retention_us: int, now_us: int) -> int:
        row = self._run(self._sql.expire, {"q": self.name, "cut": now_us - retention_us, "now": now_us},
                        durable=False, fetch="one", what=f"an expiry on queue {self.name!r}")
        return int(row[0])

    def oldest_sent_us(self) -> Optional[int]:
        row = self._run(self._sql.oldest, self._q, fetch="one", what=f"reading queue {self.name!r}")
        return None if row is None else int(row[0])

    def counts(self, now_us: int, with_bytes: bool = False) -> Counts:
        nb = len(DELIVERY_BUCKETS_US) + 1
        backlog, nbytes, in_flight, delayed, oldest, totals, hist = self._run(
            self._sql.counts, {"q": self.name, "now": now_us, "bytes": with_bytes, "nb": nb},
            fetch="one", what=f"counting queue {self.name!r}")
        acked, dead, deleted, expired, purged, retried, lease_expired, delivery_sum = (
            int(x or 0) for x in (totals or (0,) * 8))
        return Counts(
            backlog=int(backlog), backlog_bytes=int(nbytes), in_flight=int(in_flight),
            delayed=int(delayed), oldest_sent_us=None if oldest is None else int(oldest),
            acked=acked, dead_lettered=dead, deleted=deleted, expired=expired, purged=purged,
            sent=int(backlog) + acked + dead + deleted + expired + purged,
            retried=retried, lease_expired=lease_expired,
            delivery_buckets=tuple(int(x) for x in hist) if hist else (0,) * nb,
            delivery_sum_us=delivery_sum,
        )

    # -- pausing, waiting ----------------------------------------------------

    def set_paused(self, paused: bool) -> None:
        self._check()
        self._run(self._sql.set_paused, {"q": self.name, "p": paused}, fetch="count",
                  what=f"{'pausing' if paused else 'resuming'} queue {self.name!r}")
        if not paused:
            self._notifier.changed_now(self.name)

    def paused(self) -> bool:
        row = self._run(self._sql.paused, self._q, fetch="one", what=f"reading queue {self.name!r}")
        return bool(row and row[0])

    def change_token(self) -> int:
        return self._notifier.token(self.name)

    def wait_change(self, token: int, timeout: float) -> None:
        # Say that a consumer waits (sends NOTIFY only then), for a while;
        # the first wait after saying so is short (FIRST_WAIT).
        now = time.monotonic()
        if now >= self._flag_until - WAIT_FLAG_US / 2e6:
            self._run(self._sql.wait_flag, self._waiter, durable=False, fetch="count",
                      what=f"waiting on queue {self.name!r}")
            first = now >= self._flag_until
            self._flag_until = now + WAIT_FLAG_US / 1e6
            if first:
                timeout = min(timeout, FIRST_WAIT)
        self._notifier.wait(self.name, token, timeout)

    def wake(self) -> None:
        self._notifier.changed(self.name)  # this process's waiters at once, the others by the sender

    def next_due_us(self) -> Optional[int]:
        row = self._run(self._sql.next_due, {"q": self.name, "now": self._store.now_us()},
                        fetch="one", what=f"reading queue {self.name!r}")
        return None if row is None or row[0] is None else int(row[0])

    # -- settings ------------------------------------------------------------

    def load_settings(self) -> Dict[str, Any]:
        row = self._run(self._sql.queue_row, self._q, fetch="one", what=f"reading queue {self.name!r}")
        if row is None:
            return {}
        stored = row[2]
        if not isinstance(stored, dict):
            raise errors.CorruptStateError(
                f"the settings of queue {self.name!r} in {self._store.location} are not a JSON object")
        return stored

    def store_settings(self, changes: Dict[str, Any]) -> Dict[str, Any]:
        jsonb = self._store.conns.psycopg.types.json.Jsonb
        row = self._run(self._sql.store_settings, {"q": self.name, "changes": jsonb(changes)},
                        fetch="one", what=f"storing the settings of queue {self.name!r}")
        if row is None:
            raise errors.QueueNotFoundError(f"queue {self.name!r} does not exist in {self._store.location}")
        self._notifier.seen[self.name] = row[1]
        self._notifier.changed_now(self.name, settings=True)
        return dict(row[0])

    def settings_counter(self) -> List[int]:
        return self._gen

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flag_until:
            try:
                self._stop_waiting()
            except errors.QlogError:
                pass  # the flag runs out by itself


atexit.register(_Notifier.flush_all)
