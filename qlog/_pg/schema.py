"""qlog's tables in PostgreSQL: one schema (default ``qlog``) per store.

``meta``      one row per key; ``schema_version`` is the version below
``queues``    one row per queue: its id prefix, pause flag and stored settings
``waiters``   one row per consumer handle waiting for a send: until when
              (server time, µs) it waits; sends NOTIFY only while one does
``counters``  16 rows per queue (acked, dead-lettered, deleted, expired,
              purged, retried, leases found run out, and the first-delivery
              latency histogram: the sum in µs and ``delivery``, the counts
              per bucket of ``DELIVERY_BUCKETS_US``; since version 2), so
              that concurrent acks update different rows
``messages``  one row per message not done: its record, send time, the
              time it is due (visible: indexed), attempts, whether its current
              delivery is leased and until when (``lease_until``, not indexed,
              so that a lease is a HOT update: no index entry written; the
              table keeps 30% of each page free for them)
``message_seq``  numbers: one ``nextval`` per append gives a block of
              :data:`~qlog._backend.MAX_APPEND` consecutive numbers

Done messages are deleted; their counts live in ``counters``.  ``messages``
has no foreign key to ``queues``: checking one would lock the queue's row
for every insert.  An append checks that the queue exists in its own
statement instead; rows that a send racing the queue's deletion still
wrote are deleted when a queue of that name is created again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Tuple

from .. import errors
from .._backend import MAX_APPEND

if TYPE_CHECKING:  # pragma: no cover
    from .conn import Connections

SCHEMA_VERSION = 2
"""The schema version this qlog writes and reads."""
COUNTER_SHARDS = 16

_V1 = f"""
CREATE TABLE {{s}}.queues (
    name text PRIMARY KEY,
    id_prefix text NOT NULL,
    created_us bigint NOT NULL,
    paused boolean NOT NULL DEFAULT false,
    settings jsonb NOT NULL DEFAULT '{{{{}}}}',
    settings_gen bigint NOT NULL DEFAULT 0
);
CREATE TABLE {{s}}.waiters (
    queue text NOT NULL,
    waiter text NOT NULL,
    until_us bigint NOT NULL,
    PRIMARY KEY (queue, waiter)
);
CREATE TABLE {{s}}.counters (
    queue text NOT NULL REFERENCES {{s}}.queues (name) ON DELETE CASCADE,
    shard int NOT NULL,
    acked bigint NOT NULL DEFAULT 0,
    dead_lettered bigint NOT NULL DEFAULT 0,
    deleted bigint NOT NULL DEFAULT 0,
    expired bigint NOT NULL DEFAULT 0,
    purged bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, shard)
);
CREATE TABLE {{s}}.messages (
    queue text NOT NULL,
    seq bigint NOT NULL,
    sent_us bigint NOT NULL,
    due_us bigint NOT NULL,
    attempts int NOT NULL DEFAULT 0,
    leased boolean NOT NULL DEFAULT false,
    lease_until bigint NOT NULL DEFAULT 0,
    record bytea NOT NULL,
    PRIMARY KEY (queue, seq)
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX messages_due ON {{s}}.messages (queue, due_us, seq);
CREATE SEQUENCE {{s}}.message_seq INCREMENT BY {MAX_APPEND} MINVALUE 0 START 0;
"""

_V2 = """
ALTER TABLE {s}.counters
    ADD COLUMN retried bigint NOT NULL DEFAULT 0,
    ADD COLUMN lease_expired bigint NOT NULL DEFAULT 0,
    ADD COLUMN delivery_sum_us bigint NOT NULL DEFAULT 0,
    ADD COLUMN delivery bigint[] NOT NULL DEFAULT '{{}}'
"""

MIGRATIONS = {1: _V1, 2: _V2}
"""Version -> the DDL that brings the schema from the version before to it."""


def schema_version(conn: Any, schema: str) -> Optional[int]:
    """The version recorded in ``schema``, or None when qlog has no tables there."""
    row = conn.execute(
        "SELECT to_regclass(quote_ident(%s) || '.meta') IS NOT NULL", (schema,)).fetchone()
    if not row[0]:
        return None
    import psycopg

    got = conn.execute(psycopg.sql.SQL("SELECT value FROM {}.meta WHERE key = 'schema_version'")
                       .format(psycopg.sql.Identifier(schema))).fetchone()
    return None if got is None else int(got[0])


def migrate(conns: "Connections", schema: str) -> Tuple[Optional[int], int]:
    """Create or upgrade qlog's tables in ``schema`` on a connection of its
    own, in one transaction that holds an advisory lock (so concurrent
    first opens do it once); returns ``(version before, version after)``.
    A newer schema than this qlog's is refused with
    :class:`~qlog.errors.SchemaVersionError`; a database error is a
    :class:`~qlog.errors.StorageError`."""
    conn = conns.connect()
    try:
        return _migrate(conn, schema, conns.location)
    except conns.psycopg.Error as e:
        raise errors.StorageError(
            f"cannot set up the qlog schema {schema!r} at {conns.location}: {conns._clean(e)}") from None
    finally:
        conn.close()


def _migrate(conn: Any, schema: str, location: str) -> Tuple[Optional[int], int]:
    import psycopg

    s = psycopg.sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('qlog schema ' || %s))", (schema,))
        before = schema_version(conn, schema)
        if before is not None and before > SCHEMA_VERSION:
            raise errors.SchemaVersionError(
                f"the qlog schema {schema!r} at {location} is version {before}; this qlog reads "
                f"version {SCHEMA_VERSION} at most: upgrade qlog")
        if before == SCHEMA_VERSION:
            return before, before
        conn.execute(psycopg.sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
        conn.execute(psycopg.sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.meta (key text PRIMARY KEY, value text NOT NULL)").format(s))
        for v in range((before or 0) + 1, SCHEMA_VERSION + 1):
            for stmt in MIGRATIONS[v].split(";\n"):
                if stmt.strip():
                    conn.execute(psycopg.sql.SQL(stmt.strip()).format(s=s))
        conn.execute(psycopg.sql.SQL(
            "INSERT INTO {}.meta VALUES ('schema_version', %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value").format(s), (str(SCHEMA_VERSION),))
    return before, SCHEMA_VERSION
