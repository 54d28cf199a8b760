"""Crashes and faults of the PostgreSQL backend, with real processes and a
real server, stated by the same checker as the local crash tests
(``_invariants.check`` on the database URL):

- consumers SIGKILLed mid-run and replaced lose nothing, corrupt nothing,
  and duplicate only as at-least-once allows;
- the database server crashing (``pg_ctl stop -m immediate``) under senders
  and consumers loses no send that returned; the children go on once it is
  back (a send whose commit was unconfirmed raises CommitUnknownError);
- a server restart while a broker is idle is invisible to it;
- CommitUnknownError is raised when a send's connection dies mid-statement,
  and the send is not repeated behind the caller's back;
- a waiting ``pull(wait=...)`` whose connection is terminated still
  completes, and one whose NOTIFY never comes is woken by the safety poll.

Children are fresh interpreters running functions of this module
(``_crashkit.Child``); they record facts in side files
(``_invariants.FactWriter``).  Tests that crash or restart the server, or
terminate qlog's connections, run on a server of this module's own
(:func:`own_cluster`), not the session's shared one.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import sys
import threading
import time
from typing import Callable, Dict, List, Sequence, Tuple

import psycopg
import pytest
from _crashkit import Child, jitter
from _invariants import Fact, FactWriter, check, make_body, parse_facts, read_facts
from conftest import pg_url

import qlog
from qlog import errors
from qlog._pg import backend as pg_backend

QUEUE = "jobs"
# No retention: the check drains with a clock 10 days ahead.  max_retries at
# its limit: a message is never dropped as dead within a run.
SETTINGS = dict(max_retries=100, message_retention=None, visibility_timeout=1.0, retry_delay=0)
MODULE = "test_pg_faults"
SEED = int(os.environ.get("QLOG_PG_FAULT_SEED", "20240611"))


def child_main() -> None:
    """Entry point of a child interpreter: ``<func>(**json)`` of this module."""
    func, kwargs = sys.argv[1], json.loads(sys.argv[2])
    globals()[func](**kwargs)


# ---- children ----------------------------------------------------------------


def producer(url: str, side: str, prefix: str, seed: int, total: int, max_batch: int = 20,
             paced: bool = False) -> None:
    """Child main: send batches ``<prefix>.<k>`` (``send`` for one message,
    ``send_batch`` for more) until ``total`` messages were sent, recording
    each call before and after it; a send whose outcome is unknown
    (CommitUnknownError) keeps only its ``sending`` fact and is reported on
    stdout ("unknown <batch>").  Prints "done" and waits at the end.

    ``paced``: send no more messages in all than the last number read from
    stdin allows (a line each; the test keeps a backlog in the queue)."""
    rng = random.Random(seed)
    broker = qlog.open(url)
    q = broker.queue(QUEUE, **SETTINGS)
    w = FactWriter(side)
    os.write(1, b"open\n")
    sent = k = 0
    allowed = 0 if paced else total
    while sent < total:
        while sent >= allowed:
            allowed = int(sys.stdin.readline())
        n = min(total - sent, allowed - sent, rng.choice([1, rng.randint(2, max_batch)]))
        batch = f"{prefix}.{k}"
        k += 1
        bodies = [make_body(batch, i, n) for i in range(n)]
        w.sending(QUEUE, batch, n, "sync")
        try:
            ids = [q.send(bodies[0])] if n == 1 else q.send_batch(bodies)
        except errors.CommitUnknownError:
            os.write(1, f"unknown {batch}\n".encode())
            continue
        w.sent(QUEUE, batch, "sync", ids)
        sent += n
    os.write(1, b"done\n")
    sys.stdin.read()


def consumer(url: str, side: str, seed: int) -> None:
    """Child main: pull batches of 1 to 10 (leases of 1 s); ack most
    messages, retry some, leave some leased, sometimes ack_all the rest,
    each call recorded before and after it.  Runs until killed."""
    rng = random.Random(seed)
    broker = qlog.open(url)
    q = broker.queue(QUEUE, **SETTINGS)
    w = FactWriter(side)
    os.write(1, b"open\n")
    while True:
        batch = q.pull(batch_size=rng.randint(1, 10), wait=0.5)
        if batch:
            w.delivered(QUEUE, batch)
            w.settle(QUEUE, batch, rng, ack=0.7, retry=0.15, ack_all=0.3)


# ---- helpers -------------------------------------------------------------------


def _lines(path: str, prefix: bytes) -> int:
    """How many lines of the side file ``path`` start with ``prefix`` (cheap)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    return data.count(b"\n" + prefix) + data.startswith(prefix)


def _acked(path: str) -> int:
    """How many message ids the ``ack`` lines of side file ``path`` name."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    return sum(line.count(b" ") - 1 for line in data.split(b"\n")[:-1] if line.startswith(b"ack "))


def _wait(cond: Callable[[], object], what: str, children: Sequence[Child] = (), timeout: float = 60.0,
          pause: float = 0.01) -> None:
    """Wait until ``cond()`` holds; fail at the deadline, or at once when one
    of ``children`` exits (with its stderr)."""
    deadline = time.monotonic() + timeout
    while not cond():
        for c in children:
            if c.proc.poll() is not None:
                c._err_thread.join(5)
                pytest.fail(f"child {c.proc.pid} exited with {c.proc.returncode} while waiting for {what}; "
                            f"stdout: {c.lines[-5:]}\nstderr:\n{c.stderr}")
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(pause)


def _waiting_pull(q: qlog.Queue, wait: float) -> Tuple[threading.Thread, Dict[str, object], List[int]]:
    """A ``q.pull(batch_size=10, wait=wait)`` on a thread of its own, once
    it waits: ``(the thread, its result ("got": (id, body) pairs, or
    "error"), the change tokens it waited on)``."""
    notifier = q._b._notifier
    tokens: List[int] = []
    waiting = threading.Event()
    real_wait = notifier.wait

    def spy(name: str, token: int, timeout: float) -> None:
        tokens.append(token)
        waiting.set()
        real_wait(name, token, timeout)

    notifier.wait = spy
    out: Dict[str, object] = {}

    def pull() -> None:
        try:
            out["got"] = [(m.id, m.body) for m in q.pull(batch_size=10, wait=wait)]
        except BaseException as e:  # noqa: B902 - the test looks at it
            out["error"] = e

    t = threading.Thread(target=pull, daemon=True)
    t.start()
    assert waiting.wait(wait), "the pull never waited"
    return t, out, tokens


def _start(func: str, **kwargs: object) -> Child:
    """A child interpreter running ``func(**kwargs)`` of this module."""
    return Child(func, module=MODULE, **kwargs)


def _drop_schema(server_url: str, url: str) -> None:
    schema = url.rsplit("schema=", 1)[1]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _running(cluster) -> bool:
    return cluster._run("pg_ctl", "-D", cluster.data, "status", check=False).returncode == 0


def _pids(admin, where: str = "") -> List[int]:
    """Backend pids of qlog's connections (application_name 'qlog')."""
    return [r[0] for r in admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'qlog' AND pid <> pg_backend_pid() "
        + where).fetchall()]


@pytest.fixture(scope="module")
def own_cluster():
    """A PostgreSQL server of this module's own, to crash, restart and
    terminate connections on; destroyed at the end."""
    from _pgcluster import Cluster

    c = Cluster()
    try:
        yield c
    finally:
        c.destroy()


@pytest.fixture
def own_url(own_cluster):
    """A fresh schema on :func:`own_cluster` (started again if a test left it down)."""
    if not _running(own_cluster):
        own_cluster.start()
    url = f"{own_cluster.url}?schema=t_{secrets.token_hex(6)}"
    yield url
    if not _running(own_cluster):
        own_cluster.start()
    _drop_schema(own_cluster.url, url)


@pytest.fixture
def shared_url():
    """A fresh schema on the session's shared server, dropped at the end."""
    url = pg_url()
    yield url
    _drop_schema(url.split("?", 1)[0], url)


def _redelivered_by_expiry(facts: Sequence[Fact]) -> int:
    """Messages delivered more than once with no retry of theirs recorded:
    redeliveries after a lease ran out (a kill, or a message left leased)."""
    deliveries: Dict[str, int] = {}
    retried = set()
    for f in facts:
        if f.kind == "deliver":
            deliveries[f.id] = deliveries.get(f.id, 0) + 1
        elif f.kind in ("retrying", "retry"):
            retried.add(f.id)
    return sum(1 for mid, n in deliveries.items() if n > 1 and mid not in retried)


# ---- 1. consumers killed -------------------------------------------------------

MESSAGES = 4000
CONSUMERS = 3
CONSUMER_KILLS = 12


@pytest.mark.slow
def test_killed_consumers_lose_nothing(tmp_path, shared_url):
    """A producer sends MESSAGES; three consumers pull with 1 s leases and
    ack, retry or leave messages; consumers are SIGKILLed at random moments
    (after a random number of acks) and replaced.  Then every consumer is
    killed and the check drains: nothing lost, nothing corrupt, duplicates
    only of messages whose lease ran out (at-least-once)."""
    rng = random.Random(f"pg-consumer-kill/{SEED}")
    url = shared_url
    with qlog.open(url) as b:
        b.queue(QUEUE, **SETTINGS)
    sides: List[str] = []
    children: List[Child] = []

    def new_consumer() -> Child:
        side = str(tmp_path / f"consumer{len(sides)}.txt")
        sides.append(side)
        c = _start("consumer", url=url, side=side, seed=rng.getrandbits(32))
        children.append(c)
        return c

    def acks() -> int:
        return sum(_acked(p) for p in sides)

    def allow(n: int) -> None:
        """Let the producer have sent ``n`` messages in all (at most MESSAGES)."""
        prod.proc.stdin.write(b"%d\n" % min(n, MESSAGES))
        prod.proc.stdin.flush()

    prod_side = str(tmp_path / "producer.txt")
    try:
        prod = _start("producer", url=url, side=prod_side, prefix="p0", seed=rng.getrandbits(32),
                      total=MESSAGES, paced=True)
        children.append(prod)
        live = [new_consumer() for _ in range(CONSUMERS)]
        for c in [prod, *live]:
            c.wait_line("open")
        for k in range(CONSUMER_KILLS):
            # Kill after a random number of acks more; the producer is let
            # ahead of that, so the consumers are busy when the kill comes
            # (every message sent is acked in the end: the target is reached).
            target = acks() + rng.randint(10, 150)
            allow(target + 150)
            _wait(lambda: acks() >= target, f"kill {k}: {target} acks", [prod, *live])
            jitter(rng, 0.01)
            i = rng.randrange(len(live))
            live[i].kill()
            live[i] = new_consumer()
            live[i].wait_line("open")
        allow(MESSAGES)
        prod.wait_line("done")
        # the scenario: a lease ran out and its message went to someone else
        # (messages left leased, leases of killed consumers)
        _wait(lambda: _redelivered_by_expiry(read_facts(sides)) > 0, "a redelivery after a lease ran out",
              live, pause=0.1)
        for c in live:
            jitter(rng, 0.05)
            c.kill()
    finally:
        for c in children:
            c.__exit__()
    facts = read_facts([prod_side, *sides])
    assert prod.lines[-1] == "done" and not [x for x in prod.lines if x.startswith("unknown")], prod.lines
    # a process crash: every returned call must have survived (must=None)
    report = check(url, facts, settings={QUEUE: SETTINGS})
    assert report.checked == MESSAGES, report.line()


# ---- 2. the database crashes ------------------------------------------------------

DB_CRASHES = 6


def _split_at(path: str, mark: int) -> tuple:
    """The facts of side file ``path`` before byte ``mark`` and after it."""
    with open(path, "rb") as f:
        data = f.read()
    early = parse_facts(data[:mark].decode().split("\n")[:-1])
    late = parse_facts(data[mark:].decode().split("\n")[:-1])
    return early, late


def _mark(path: str) -> int:
    """The end of the last whole line of a side file now."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    return data.rfind(b"\n") + 1


@pytest.mark.slow
def test_database_crash_loses_no_returned_send(tmp_path, own_cluster, own_url):
    """Two producers (durability "sync") and two consumers run while the
    server crashes DB_CRASHES times (``stop("immediate")``, then
    ``start()``); after each crash every child goes on (qlog reconnects).
    Then the children are killed and the check drains: every send that
    returned survived, nothing corrupt, no batch half there."""
    rng = random.Random(f"pg-db-crash/{SEED}")
    cluster, url = own_cluster, own_url
    with qlog.open(url) as b:
        b.queue(QUEUE, **SETTINGS)
    prod_sides = [str(tmp_path / f"producer{p}.txt") for p in range(2)]
    cons_sides = [str(tmp_path / f"consumer{c}.txt") for c in range(2)]
    children: List[Child] = []
    unknown = 0
    try:
        prods = [_start("producer", url=url, side=s, prefix=f"p{p}", seed=rng.getrandbits(32), total=1 << 30)
                 for p, s in enumerate(prod_sides)]
        cons = [_start("consumer", url=url, side=s, seed=rng.getrandbits(32)) for s in cons_sides]
        children = prods + cons
        for c in children:
            c.wait_line("open")

        def progress(at: Dict[str, int]) -> bool:
            return (all(_lines(s, b"sent ") > at[s] for s in prod_sides)
                    and all(_lines(s, b"ack ") > at[s] for s in cons_sides))

        start = {s: 2 for s in prod_sides + cons_sides}
        _wait(lambda: progress(start), "the first sends and acks", children)
        marks: Dict[str, int] = {}
        for k in range(DB_CRASHES):
            jitter(rng, 0.05)
            cluster.stop("immediate")    # a crash: WAL not yet written is gone
            cluster.start()
            marks = {s: _mark(s) for s in prod_sides + cons_sides}
            at = {s: _lines(s, b"sent ") for s in prod_sides}
            at.update({s: _lines(s, b"ack ") for s in cons_sides})
            _wait(lambda: progress(at), f"sends and acks after crash {k}", children)
        for c in children:
            jitter(rng, 0.02)
            c.kill()
        unknown = sum(x.startswith("unknown ") for c in prods for x in c.lines)
    finally:
        if not _running(cluster):
            cluster.start()
        for c in children:
            c.__exit__()
    # What must have survived: every fact but the acks that may have died with
    # the server.  Acks (and retries) commit with synchronous_commit = off, so
    # one that returned before a crash may be lost (its message is delivered
    # again: at-least-once).  ``check`` holds an ``ack`` fact in ``must`` to
    # "never delivered again", so only the acks whose call started after the
    # last restart (their ``acking`` line is after the mark taken once
    # ``start()`` returned) are in ``must``.  Sends returned with a
    # synchronous commit and leases commit synchronously (attempts never go
    # back): all of those must survive.  A lost retry leaves its message
    # leased until its lease runs out: no fact to drop.
    facts: List[Fact] = []
    must: List[Fact] = []
    for s in prod_sides + cons_sides:
        early, late = _split_at(s, marks[s])
        late_acking = {f.id for f in late if f.kind == "acking"}
        facts += early + late
        must += [f for f in early if f.kind != "ack"]
        must += [f for f in late if f.kind != "ack" or f.id in late_acking]
    report = check(url, facts, settings={QUEUE: SETTINGS}, must=must)
    sends = sum(1 for f in facts if f.kind == "sent")
    assert report.checked >= sends > 0, report.line()
    acked = {f.id for f in facts if f.kind == "ack"}
    lost_acks = sum(1 for mid, _att, _body in report.drained[QUEUE] if mid in acked)
    print(f"{DB_CRASHES} crashes: {sends} messages sent, {unknown} sends of unknown outcome "
          f"(messages of in-flight sends that landed: {report.sends_in_flight}); returned acks lost "
          f"with the server: {lost_acks}; {report.line()}")


# ---- 3. a restart while idle ------------------------------------------------------


@pytest.mark.slow
def test_restart_while_idle_is_invisible(own_cluster, own_url):
    """A broker that sent, pulled and acked (so it holds a connection per
    commit mode) stays idle through a clean server restart; then its pull,
    ack and send work without an error: each idle socket the server closed
    is found dead before anything is sent on it, and replaced."""
    with qlog.open(own_url) as broker:
        q = broker.queue(QUEUE)
        first = q.send({"n": 0})
        b = q.pull(batch_size=10)
        assert [m.id for m in b] == [first]
        b.ack_all()
        second = q.send({"n": 1})
        conns = broker._store.conns
        before = (conns._local.d, conns._local.a)
        assert all(c is not None for c in before), "scenario: no connection of each commit mode"
        own_cluster.restart("fast")
        b = q.pull(batch_size=10)
        assert [(m.id, m.body) for m in b] == [(second, {"n": 1})]
        b.ack_all()
        third = q.send({"n": 2})
        b = q.pull(batch_size=10)
        assert [m.id for m in b] == [third]
        b.ack_all()
        st = q.stats()
        assert (st.backlog, st.acked) == (0, 3), st
        after = (conns._local.d, conns._local.a)
        assert all(x is not y for x, y in zip(before, after)), "scenario: the restart left the connections"


# ---- 4. CommitUnknownError ------------------------------------------------------


@pytest.mark.slow
def test_send_whose_connection_dies_raises_commit_unknown_and_is_not_repeated(own_cluster, own_url):
    """A send blocked on a table lock has its backend terminated: it raises
    CommitUnknownError, and once the lock is gone the queue holds nothing
    of it (qlog did not send it again); the next send works."""
    schema = own_url.rsplit("schema=", 1)[1]
    with qlog.open(own_url) as broker, psycopg.connect(own_cluster.url, autocommit=True) as admin:
        q = broker.queue(QUEUE)
        locker = psycopg.connect(own_cluster.url)          # a transaction left open
        try:
            locker.execute(f'LOCK TABLE "{schema}".messages IN ACCESS EXCLUSIVE MODE')
            out: Dict[str, object] = {}

            def send() -> None:
                try:
                    out["id"] = q.send({"n": 1})
                except BaseException as e:  # noqa: B902 - the test looks at it
                    out["error"] = e

            t = threading.Thread(target=send, daemon=True)
            t.start()
            found: List[int] = []

            def blocked() -> List[int]:
                found[:] = _pids(admin, "AND state = 'active' AND wait_event_type = 'Lock'")
                return found

            _wait(blocked, "the send blocked on the lock")
            assert len(found) == 1, found
            assert admin.execute("SELECT pg_terminate_backend(%s)", (found[0],)).fetchone()[0]
            t.join(30)
            assert not t.is_alive(), "the send did not return after its backend was terminated"
            assert isinstance(out.get("error"), errors.CommitUnknownError), out
        finally:
            locker.rollback()
            locker.close()
        n = admin.execute(f'SELECT count(*) FROM "{schema}".messages').fetchone()[0]
        assert n == 0, f"the send of unknown outcome was sent again: {n} messages in the table"
        assert q.stats().backlog == 0
        mid = q.send({"n": 2})
        b = q.pull(batch_size=10)
        assert [(m.id, m.body) for m in b] == [(mid, {"n": 2})]
        b.ack_all()


# ---- 5. a waiting pull's connection terminated ---------------------------------------


@pytest.mark.slow
def test_waiting_pull_survives_terminated_connections(own_cluster, own_url, run_python):
    """A pull(wait=30) waits; every idle qlog connection (its own, the
    NOTIFY listener's) is terminated; a message another process sends then
    is still received by that pull."""
    with qlog.open(own_url) as broker, psycopg.connect(own_cluster.url, autocommit=True) as admin:
        q = broker.queue(QUEUE)
        t, out, _tokens = _waiting_pull(q, 30)
        store_pids = {c.info.backend_pid for c in list(broker._store.conns._all)}
        killed: List[int] = []

        def terminate_idle() -> bool:
            """Terminate the idle qlog connections (a lease in progress is
            left to finish: the next round gets its connection)."""
            for pid in _pids(admin, "AND state = 'idle'"):
                if pid not in killed:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    killed.append(pid)
            return store_pids <= set(killed)

        _wait(terminate_idle, "the store's connections terminated while idle")
        assert len(killed) > len(store_pids), f"scenario: the listener's connection was not terminated: {killed}"
        _wait(lambda: not set(killed) & set(_pids(admin)), "the terminated backends gone")
        assert t.is_alive(), f"the pull returned before anything was sent: {out}"
        r = run_python("import sys, qlog\nwith qlog.open(sys.argv[1]) as b:\n"
                       f"    print(b.queue({QUEUE!r}).send({{'n': 1}}))\n", [own_url])
        assert r.returncode == 0, r.stderr
        mid = r.stdout.strip()
        t.join(40)
        assert not t.is_alive(), "the pull did not return"
        assert out == {"got": [(mid, {"n": 1})]}, out


# ---- 6. a lost NOTIFY -----------------------------------------------------------


def test_lost_notify_is_covered_by_the_safety_poll(shared_url):
    """The sender's NOTIFY never goes out (the consumer's waiting flag is
    deleted before the send, so the send sees no one waiting); a consumer waiting in pull(wait=10) in another broker (with a
    notifier of its own) still gets the message, by its safety poll
    (SAFETY_POLL seconds), with no wake-up from a NOTIFY."""
    assert pg_backend.SAFETY_POLL < 10
    # Another connection string for the same database: the sender's store
    # gets a notifier (and a listener) of its own, as in another process.
    sender_url = shared_url + "&connect_timeout=30"
    with qlog.open(shared_url) as consumer_broker, qlog.open(sender_url) as sender_broker:
        q = consumer_broker.queue(QUEUE)
        sq = sender_broker.queue(QUEUE)
        notifier, sender_notifier = q._b._notifier, sq._b._notifier
        assert notifier is not sender_notifier

        t, out, tokens = _waiting_pull(q, 10)
        # The consumer's waiting flag lost (as a NOTIFY would be): the send sends none.
        schema = shared_url.rsplit("schema=", 1)[1]
        with psycopg.connect(shared_url.split("?")[0], autocommit=True) as conn:
            conn.execute(f'DELETE FROM "{schema}".waiters')
        mid = sq.send({"n": 1})
        t.join(15)
        assert not t.is_alive(), "the pull did not return"
        assert out == {"got": [(mid, {"n": 1})]}, out
        # no NOTIFY woke it: the change counter it waited on never moved
        assert notifier.token(QUEUE) == tokens[-1], (tokens, notifier.token(QUEUE))
