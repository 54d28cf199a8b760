"""Reaching PostgreSQL: what a target names, connections per thread, and
which statements are sent again after a lost connection.

Credentials come the way libpq takes them (the URL or key=value string,
``PG*`` environment variables, ``~/.pgpass``); qlog never prints them: a
store names its database by :func:`redact`'s form, and errors raised here
are reworded with it.

Every statement runs in autocommit mode, so each is one transaction at
PostgreSQL's default isolation level, READ COMMITTED: every transition is a
single statement (``backend.py``), whose rows are locked by ``FOR UPDATE
SKIP LOCKED`` or by the UPDATE/DELETE itself, and READ COMMITTED re-checks a
row's condition after waiting for its lock, which is what a transition
wants.  No statement needs a snapshot across several statements.
"""

from __future__ import annotations

import re
import select
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple

from .. import errors

DEFAULT_SCHEMA = "qlog"
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_URL_RE = re.compile(r"(?i)^postgres(?:ql)?://")
_CONNINFO_RE = re.compile(r"^\s*[A-Za-z_]+\s*=")
RECONNECT_FOR = 30.0
"""Seconds a statement that is safe to send again keeps trying to reconnect."""


def is_target(target: str) -> bool:
    """Whether ``target`` names a PostgreSQL database (a ``postgresql://``
    or ``postgres://`` URL, or a libpq ``key=value`` string), not a directory."""
    return bool(_URL_RE.match(target) or _CONNINFO_RE.match(target))


def split_target(target: str) -> Tuple[str, str]:
    """``(what libpq is given, the schema)``: qlog's own ``schema`` parameter
    (``?schema=`` in a URL, ``schema=`` in a key=value string; default
    ``qlog``) is taken out, libpq gets the rest unchanged."""
    schema = DEFAULT_SCHEMA
    if _URL_RE.match(target):
        parts = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        rest = [(k, v) for k, v in query if k != "schema"]
        for k, v in query:
            if k == "schema":
                schema = v
        conninfo = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    else:
        found = re.search(r"(?:^|\s)schema\s*=\s*(\S+)", target)
        if found:
            schema = found.group(1).strip("'")
        conninfo = re.sub(r"(?:^|\s)schema\s*=\s*\S+", " ", target).strip()
    check_schema(schema)
    return conninfo, schema


def check_schema(schema: str) -> None:
    """Refuse a schema name that is not a plain lowercase identifier."""
    if not _SCHEMA_RE.fullmatch(schema):
        raise errors.SettingsError(
            f"schema must be 1 to 63 of a-z, 0-9 and _ (not starting with a digit), got {schema!r}")


def redact(target: str) -> str:
    """``target`` with any password replaced by ``***``."""
    if _URL_RE.match(target):
        parts = urllib.parse.urlsplit(target)
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            user = parts.username or ""
            parts = parts._replace(netloc=f"{user}:***@{host}")
        query = [(k, "***" if k == "password" else v)
                 for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, safe="*")))
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", target)


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise errors.SettingsError(
            "a PostgreSQL target needs psycopg 3: pip install 'qlog[postgres]'") from None
    return psycopg


class Connections:
    """Connections to one database, one per thread and commit mode, made
    when first needed.

    ``durable`` statements commit with ``synchronous_commit = on`` (the
    commit is on the server's disk when the call returns); the others with
    ``off`` (the server writes the WAL within ``3 × wal_writer_delay``; a
    server crash may lose the last of them, which the caller allows)."""

    def __init__(self, conninfo: str, location: str) -> None:
        self.psycopg = _import_psycopg()
        self.errors = self.psycopg.errors
        self.conninfo = conninfo
        self.location = location
        self._local = threading.local()
        self._all: List[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def connect(self, autocommit: bool = True, synchronous_commit: bool = True) -> Any:
        """A new connection (the caller owns it)."""
        conn = None
        try:
            conn = self.psycopg.connect(self.conninfo, autocommit=autocommit,
                                        application_name="qlog")
            if not synchronous_commit:
                conn.execute("SET synchronous_commit = off")
        except self.psycopg.Error as e:
            if conn is not None:
                conn.close()
            raise errors.StorageError(
                f"cannot connect to PostgreSQL at {self.location}: {self._clean(e)}") from None
        return conn

    def _clean(self, e: BaseException) -> str:
        """The error's text, without any password it may quote."""
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return redact(text)

    def _get(self, durable: bool) -> Any:
        slot = "d" if durable else "a"
        conn = getattr(self._local, slot, None)
        if conn is not None and (conn.closed or conn.broken or _dead(conn)):
            self._drop(conn)
            conn = None
        if conn is None:
            if self._closed:
                raise errors.LogClosedError(f"the store at {self.location} is closed")
            conn = self.connect(synchronous_commit=durable)
            setattr(self._local, slot, conn)
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self, conn: Any) -> None:
        for slot in ("d", "a"):
            if getattr(self._local, slot, None) is conn:
                setattr(self._local, slot, None)
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        try:
            conn.close()
        except Exception:  # already broken
            pass

    def run(self, sql: Any, params: Optional[Dict[str, Any]] = None, *, durable: bool = True,
            idempotent: bool = True, fetch: str = "all", what: str = "a statement") -> Any:
        """Run one statement (one transaction, see the module docstring);
        returns its rows (``fetch="all"``), its first row or None
        (``"one"``), or its row count (``"count"``).

        A lost connection is reconnected.  A statement that is safe to send
        twice (``idempotent``: reads, acks, retries, leases, moves whose
        conditions make a second run a no-op) is sent again for up to
        :data:`RECONNECT_FOR` seconds.  One that is not (an append) raises
        :class:`~qlog.errors.CommitUnknownError` when the connection was lost
        after it was sent, since it may have committed; it is sent again
        only when the connection was found dead before sending."""
        deadline = time.monotonic() + RECONNECT_FOR
        while True:
            try:
                conn = self._get(durable)
            except errors.StorageError:
                # nothing was sent: the server is down or restarting
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
                continue
            try:
                cur = conn.execute(sql, params, prepare=True, binary=True)
                if fetch == "all":
                    return cur.fetchall()
                if fetch == "one":
                    return cur.fetchone()
                return cur.rowcount
            except self.psycopg.OperationalError as e:
                if not conn.broken and not conn.closed:
                    raise errors.StorageError(
                        f"{what} failed in PostgreSQL at {self.location}: {self._clean(e)}") from None
                self._drop(conn)
                if not idempotent:
                    raise errors.CommitUnknownError(
                        f"the connection to PostgreSQL at {self.location} was lost during {what}: "
                        "it may or may not have committed; it was not sent again") from None
                if time.monotonic() >= deadline:
                    raise errors.StorageError(
                        f"{what} failed: PostgreSQL at {self.location} is unreachable "
                        f"({self._clean(e)}), tried for {RECONNECT_FOR:g} s") from None
                time.sleep(0.2)
            except self.errors.ForeignKeyViolation:
                raise  # the caller names it (a queue deleted meanwhile)
            except self.psycopg.Error as e:
                raise errors.StorageError(
                    f"{what} failed in PostgreSQL at {self.location}: {self._clean(e)}") from e

    def close(self) -> None:
        """Close every connection made (in every thread); idempotent."""
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for c in conns:
            try:
                c.close()
            except Exception:
                pass


def _dead(conn: Any) -> bool:
    """Whether an idle connection's socket is readable: the server has closed
    it (a restart, ``pg_terminate_backend``), so nothing sent on it would
    arrive.  Checked before each statement, so that the common case of a
    connection lost while idle is reconnected before anything is sent."""
    try:
        r, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(r)
