"""What only the PostgreSQL backend has: its schema and migrations, the
server's clock, commit modes, credentials kept out of output, coalesced
NOTIFYs, and the CLI and worker on a database URL.  (The queue semantics
run on it through every test that takes ``broker``: conftest's BACKENDS.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List

import psycopg
import pytest
from _crashkit import child_env
from conftest import pg_cluster, pg_url

import qlog
from qlog._pg.schema import SCHEMA_VERSION

Q = "jobs"


def _schema(url: str) -> str:
    return url.rsplit("schema=", 1)[1]


@pytest.fixture
def url():
    """A fresh schema of the session's server, dropped afterwards."""
    u = pg_url()
    yield u
    with psycopg.connect(pg_cluster().url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{_schema(u)}" CASCADE')


def _sql(query: str, *params: Any) -> List[Any]:
    with psycopg.connect(pg_cluster().url, autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


# ---- schema -----------------------------------------------------------------------


def test_first_open_creates_the_schema_beside_the_applications_tables(url) -> None:
    s = _schema(url)
    _sql(f'CREATE SCHEMA "{s}"')
    _sql(f'CREATE TABLE "{s}".orders (id int)')  # the application's own table, same schema
    with qlog.open(url) as b:
        b.queue(Q).send({"n": 1})
    tables = {r[0] for r in _sql("SELECT table_name FROM information_schema.tables WHERE table_schema = %s", s)}
    assert {"orders", "meta", "queues", "counters", "messages"} <= tables
    assert _sql(f"SELECT value FROM \"{s}\".meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]


def test_migrate_creates_then_has_nothing_to_do(url) -> None:
    s = _schema(url)
    assert qlog.migrate(url) == (s, None, SCHEMA_VERSION)
    assert qlog.migrate(url) == (s, SCHEMA_VERSION, SCHEMA_VERSION)


def test_a_version_1_schema_is_upgraded_keeping_its_queues_messages_and_counts(url) -> None:
    from qlog._pg import schema

    s = _schema(url)
    _sql(f'CREATE SCHEMA "{s}"')
    _sql(f'CREATE TABLE "{s}".meta (key text PRIMARY KEY, value text NOT NULL)')
    with psycopg.connect(pg_cluster().url, autocommit=True) as conn:
        for stmt in schema.MIGRATIONS[1].split(";\n"):
            if stmt.strip():
                conn.execute(psycopg.sql.SQL(stmt.strip()).format(s=psycopg.sql.Identifier(s)))
    _sql(f"INSERT INTO \"{s}\".meta VALUES ('schema_version', '1')")
    with qlog.open(url) as b:  # a queue made at version 1 keeps its rows
        q = b.queue(Q)
        q.send_batch([1, 2])
        q.pull(1).ack_all()
    _sql(f"UPDATE \"{s}\".meta SET value = '1' WHERE key = 'schema_version'")
    _sql(f'ALTER TABLE "{s}".counters DROP COLUMN retried, DROP COLUMN lease_expired, '
         f'DROP COLUMN delivery_sum_us, DROP COLUMN delivery')
    assert qlog.migrate(url) == (s, 1, SCHEMA_VERSION)
    with qlog.open(url) as b:
        q = b.queue(Q)
        st = q.stats()
        assert (st.backlog, st.acked, st.retried, sum(st.delivery_buckets)) == (1, 1, 0, 0)
        q.pull(1).retry_all(delay_seconds=60)
        st = q.stats()
        assert (st.retried, sum(st.delivery_buckets)) == (1, 1)


def test_a_newer_schema_is_refused_naming_both_versions(url) -> None:
    qlog.migrate(url)
    _sql(f"UPDATE \"{_schema(url)}\".meta SET value = %s WHERE key = 'schema_version'", str(SCHEMA_VERSION + 1))
    with pytest.raises(qlog.SchemaVersionError, match=rf"version {SCHEMA_VERSION + 1}.*version {SCHEMA_VERSION} at most"):
        qlog.open(url)
    with pytest.raises(qlog.SchemaVersionError):
        qlog.migrate(url)


@pytest.mark.parametrize("schema", ["Upper", "has-dash", "1digit", "x" * 64, ""])
def test_a_bad_schema_name_is_refused_before_connecting(schema) -> None:
    with pytest.raises(qlog.SettingsError, match="schema must be"):
        qlog.open(f"postgresql://nobody@127.0.0.1:1/db?schema={schema}")


def test_concurrent_first_opens_create_the_schema_once(url) -> None:
    errors: List[BaseException] = []

    def opener() -> None:
        try:
            with qlog.open(url) as b:
                b.queue(Q)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert qlog.migrate(url)[1:] == (SCHEMA_VERSION, SCHEMA_VERSION)


# ---- time -----------------------------------------------------------------------


def test_machines_with_skewed_clocks_agree_on_the_servers_clock(url, monkeypatch) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # this "machine" is an hour behind
    early = qlog.open(url)
    q_early = early.queue(Q)
    q_early.send("now")
    q_early.send("in 60 s", delay_seconds=60)
    monkeypatch.setattr(time, "time", real)
    with qlog.open(url) as b:
        got = b.queue(Q).pull(10)
        # Sent "an hour ago" by its own clock, but at once by the server's:
        # retention would not count that hour, and the delay is still ahead.
        assert [m.body for m in got.messages] == ["now"]
        assert abs(got.messages[0].timestamp.timestamp() - real()) < 60
        got.ack_all()
    early.close()


def test_a_clock_passed_in_is_used_as_given(url) -> None:
    # The contrast to the test above: a clock of its own an hour ahead puts
    # the send an hour ahead, so a consumer on the server's clock sees a
    # message that is not due for an hour.
    with qlog.open(url, clock=lambda: time.time() + 3600) as ahead:
        ahead.queue(Q).send("later", delay_seconds=1)
    with qlog.open(url) as b:
        q = b.queue(Q)
        assert not q.pull(10).messages
        assert q.stats().delayed == 1


# ---- commit modes -----------------------------------------------------------------


@pytest.mark.parametrize("durability, send_durable", [("sync", True), ("interval", False), ("none", False)])
def test_each_step_commits_as_the_readme_says(url, durability, send_durable) -> None:
    seen: Dict[str, bool] = {}
    with qlog.open(url, durability=durability) as b:
        q = b.queue(Q)
        real = b._store.conns.run

        def spy(sql: Any, params: Any = None, **kw: Any) -> Any:
            words = kw.get("what", "").split()
            seen[words[1] if words[0] in ("a", "an") else words[0]] = kw.get("durable", True)
            return real(sql, params, **kw)

        b._store.conns.run = spy  # type: ignore[method-assign]
        q._b._run = spy
        q.send(1)
        q.send_batch([2, 3], delay_seconds=0)
        batch = q.pull(2)
        batch.messages[0].ack()
        batch.messages[1].retry()
        q.pause_delivery()
        q.resume_delivery()
    assert seen["send"] is send_durable
    assert seen["pull"] is False  # a lost lease is a redelivery (README, "Durability")
    assert seen["ack"] is False   # a lost ack is a redelivery
    assert seen["retry"] is False  # a lost retry: the lease runs out instead
    assert seen["pausing"] is True and seen["resuming"] is True


# ---- numbers, queues --------------------------------------------------------------


def test_a_batch_gets_consecutive_numbers_and_queues_never_share_ids(url) -> None:
    with qlog.open(url) as b:
        a, c = b.queue("a"), b.queue("c")
        ids = a.send_batch(list(range(10)))
        nums = [int(i[16:], 16) for i in ids]
        assert nums == list(range(nums[0], nums[0] + 10))
        other = c.send_batch(list(range(10)))
        assert not set(ids) & set(other)
        assert a.send(99) > ids[-1]


def test_a_send_to_a_queue_deleted_meanwhile_is_refused_and_writes_nothing(url) -> None:
    with qlog.open(url) as b, qlog.open(url) as other:
        q = b.queue(Q)
        q.send(1)
        other.delete_queue(Q, force=True)
        with pytest.raises(qlog.QueueNotFoundError, match="was deleted"):
            q.send(2)
    assert _sql(f'SELECT count(*) FROM "{_schema(url)}".messages') == [(0,)]


def test_a_settings_change_reaches_a_broker_of_another_process(url, wait_until) -> None:
    with qlog.open(url) as b:
        q = b.queue(Q)
        assert q.settings.max_retries == 3
        code = "import qlog, sys; qlog.open(sys.argv[1]).configure('jobs', max_retries=7)"
        subprocess.run([sys.executable, "-c", code, url], check=True, env=child_env(), timeout=60)
        wait_until(lambda: q.settings.max_retries == 7, timeout=10, what="the new max_retries")


# ---- waking -----------------------------------------------------------------------


def _notifications(url: str, action) -> int:
    """How many NOTIFYs on the store's channel ``action()`` causes."""
    listener = psycopg.connect(pg_cluster().url, autocommit=True)
    try:
        listener.execute(f'LISTEN "qlog_{_schema(url)}"')
        action()
        # NOTIFYs are delivered at commit, before the sending call returns;
        # one more round trip brings any that are in flight.
        listener.execute("SELECT 1")
        return len(list(listener.notifies(timeout=0.5)))
    finally:
        listener.close()


def test_sends_notify_only_while_a_consumer_waits(url, wait_until) -> None:
    with qlog.open(url) as b, qlog.open(f"{url}&application_name=other") as other:
        q = b.queue(Q)
        assert _notifications(url, lambda: [q.send(i) for i in range(100)]) == 0
        waiting = other.queue(Q)
        waiting.pull(100).ack_all()
        got: List[Any] = []
        t = threading.Thread(target=lambda: got.append(waiting.pull(1, wait=30)))
        t.start()
        wait_until(lambda: _sql(f'SELECT count(*) FROM "{_schema(url)}".waiters WHERE until_us > 0')[0][0] == 1,
                   what="the consumer's waiting flag")
        assert _notifications(url, lambda: q.send("wake")) == 1
        t.join(30)
        assert [m.body for m in got[0].messages] == ["wake"]
        # Woken and busy: its flag is gone, so sends are quiet again.
        assert _sql(f'SELECT count(*) FROM "{_schema(url)}".waiters') == [(0,)]
        assert _notifications(url, lambda: [q.send(i) for i in range(10)]) == 0


def test_a_pull_waiting_in_another_process_wakes_on_a_send(url, spawn_python) -> None:
    with qlog.open(url) as b:
        q = b.queue(Q)
        child = spawn_python(
            "import qlog, sys, time\n"
            "q = qlog.open(sys.argv[1]).queue('jobs')\n"
            "print('ready', flush=True)\n"
            "got = q.pull(1, wait=30)\n"
            "print(got.messages[0].body if got.messages else 'none', flush=True)\n",
            [url])
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.05)  # not needed for correctness: lets the child start waiting first
        q.send("hello")
        assert child.stdout.readline().strip() == "hello"
        assert child.wait(30) == 0


# ---- credentials ------------------------------------------------------------------


def test_a_password_never_appears_in_paths_errors_or_cli_output(url, tmp_path) -> None:
    secret = "s3cr3t-pw"
    with_pw = url.replace("postgres@", f"postgres:{secret}@")  # the test server trusts loopback
    with qlog.open(with_pw) as b:
        b.queue(Q).send(1)
        assert secret not in b.path and secret not in repr(b)
        assert "***" in b.path
    unreachable = f"postgresql://app:{secret}@127.0.0.1:1/db"
    with pytest.raises(qlog.StorageError) as e:
        qlog.open(unreachable)
    assert secret not in str(e.value) and "127.0.0.1" in str(e.value)
    for args in (["stats", with_pw], ["stats", with_pw, "--json"], ["peek", with_pw, Q],
                 ["queues", "info", with_pw, Q], ["pause", with_pw, Q], ["stats", unreachable],
                 ["verify", with_pw]):
        r = subprocess.run([sys.executable, "-m", "qlog", *args], capture_output=True, text=True,
                           env=child_env(), timeout=60)
        assert secret not in r.stdout + r.stderr, args
        assert r.returncode in (0, 1, 2)
    kv = f"host=127.0.0.1 port={pg_cluster().port} user=postgres password={secret} dbname=postgres schema={_schema(url)}"
    with qlog.open(kv) as b:
        assert b.queues() == [Q]
        assert secret not in b.path


# ---- the CLI and the worker -------------------------------------------------------


def _qlog(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlog", *args], capture_output=True, text=True,
                          env=child_env(), timeout=60)


def test_cli_migrate_send_stats_and_refusals_on_a_url(url) -> None:
    r = _qlog("migrate", url)
    assert r.returncode == 0 and f"created: now version {SCHEMA_VERSION}" in r.stdout
    assert "nothing to do" in _qlog("migrate", url).stdout
    r = _qlog("send", url, Q, '{"a": 1}')
    assert r.returncode == 0, r.stderr
    stats = json.loads(_qlog("stats", url, "--json").stdout)
    assert stats["queues"][0]["name"] == Q and stats["queues"][0]["backlog"] == 1
    r = _qlog("verify", url)
    assert r.returncode == 2 and "is a database" in r.stderr
    r = _qlog("migrate", "./not-a-url")
    assert r.returncode == 2 and "takes a PostgreSQL URL" in r.stderr


APP = """
import os, qlog
broker = qlog.open({url!r})

@broker.consumer("jobs", max_batch_size=5, max_batch_timeout=0.05)
def handle(batch):
    with open({out!r}, "a") as f:
        for m in batch.messages:
            f.write(f"{{m.body}} {{os.getpid()}}\\n")
"""


def test_worker_processes_share_one_database(url, tmp_path, wait_until) -> None:
    out = tmp_path / "out.txt"
    (tmp_path / "app.py").write_text(APP.format(url=url, out=str(out)))
    with qlog.open(url) as b:
        q = b.queue(Q)
        with open(tmp_path / "worker.log", "ab") as log:
            w = subprocess.Popen([sys.executable, "-m", "qlog", "worker", "app:broker", "--processes", "2"],
                                 cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=log)
        try:
            q.send_batch(list(range(200)))
            wait_until(lambda: q.stats().acked == 200, timeout=60, what="all 200 acked")
            w.send_signal(signal.SIGTERM)
            assert w.wait(60) == 0
        finally:
            if w.poll() is None:
                w.kill()
                w.wait()
    lines = [ln.split() for ln in out.read_text().splitlines()]
    assert sorted(int(body) for body, _ in lines) == list(range(200))
    text = (tmp_path / "worker.log").read_text()
    assert "qlog worker: database postgresql://" in text and "engine postgresql" in text


def test_a_lease_statement_holds_no_lock_past_its_commit(url) -> None:
    # Autocommit: after a pull returns, no transaction of qlog's is open
    # (a long transaction would hold back vacuum; README, "On PostgreSQL").
    with qlog.open(url) as b:
        q = b.queue(Q)
        q.send(1)
        q.pull(1).ack_all()
        rows = _sql("SELECT state FROM pg_stat_activity WHERE application_name = 'qlog' "
                    "AND state LIKE 'idle in transaction%%'")
        assert rows == []
