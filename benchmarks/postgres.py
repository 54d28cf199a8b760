"""Side-by-side benchmark of qlog on PostgreSQL against a plain SKIP LOCKED queue table.

    python benchmarks/postgres.py                 # full run (about 2 minutes)
    python benchmarks/postgres.py --quick         # smoke run (about 15 s)
    python benchmarks/postgres.py --only send,pull  # some rows (send batch pull send4 pull4 latency)
    python benchmarks/postgres.py --rounds 5      # more interleaved rounds (default 3, quick 1)
    python benchmarks/postgres.py --no-anatomy    # skip "where the time goes"
    python benchmarks/postgres.py --only pull --profile   # also cProfile the qlog side

A throwaway PostgreSQL server (``tests/_pgcluster.py``: initdb in a
temporary directory, reached over loopback TCP) holds both sides.  qlog is
``qlog.open(url + "?schema=...")`` with its default durability "sync", a
fresh schema per repetition.  The baseline is the queue table PostgreSQL
queue projects write: ``jobs (id bigserial primary key, body jsonb,
created_at)``, psycopg 3 with prepared statements; a send is one autocommit
INSERT (synchronous_commit on), a batch one INSERT of unnest(jsonb[]), a
consume ``SELECT id, body ... ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED``
and ``DELETE ... WHERE id = ANY(...)`` in one transaction; the table is
truncated between repetitions.  Bodies are ~100-byte JSON dicts, decoded by
every consumer.  The sides alternate round by round; the figures are
medians over the rounds, the ratio the median of per-round ratios.  Then
"where the time goes": round trips, time waiting on the server and the
server's commits, WAL fsyncs and WAL bytes per operation, for both sides.
This measures; it never fails on a missed target (the exit status is 0
unless something breaks).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import psycopg  # noqa: E402
from psycopg.types.json import Jsonb  # noqa: E402

from queues import profiled  # noqa: E402  (the cProfile table every benchmark prints)
import qlog  # noqa: E402
from engine import (  # noqa: E402
    check, fmt_rate, machine_info, median, per_rep, print_end, print_report, progress,
)

BATCH = 100
QUEUE = "jobs"
TABLE = "jobs"
VT = 30  # visibility_timeout of every pull
PREFILL = 1000  # messages per prefill statement, both sides
ROWS = ("send", "batch", "pull", "send4", "pull4", "latency")


@dataclass(frozen=True)
class Plan:
    rounds: int
    send_seconds: float  # rows 1 and 4: send for this long
    batch_seconds: float
    pull_msgs: int  # row 3: backlog drained per repetition
    procs: int
    pull4_msgs: int  # row 5
    lat_msgs: int  # row 6: messages per repetition
    anatomy_seconds: float  # per operation and side in "where the time goes"
    settle: float  # seconds for the server's statistics to come in (0: not read)


FULL = Plan(rounds=3, send_seconds=2.0, batch_seconds=1.5, pull_msgs=30_000, procs=4,
            pull4_msgs=40_000, lat_msgs=300, anatomy_seconds=1.0, settle=1.5)
QUICK = Plan(rounds=1, send_seconds=0.3, batch_seconds=0.3, pull_msgs=2_000, procs=4,
             pull4_msgs=4_000, lat_msgs=40, anatomy_seconds=0.2, settle=0.0)


# ---------------------------------------------------------------- payloads


def json_bodies(n: int = BATCH) -> List[Dict[str, Any]]:
    """n distinct dicts of 101 bytes as compact JSON (those of queues.py)."""
    return [{"type": "send_email", "user_id": 100_000 + i, "to": f"user{100_000 + i}@example.com",
             "template": "welcome", "attempt": 1} for i in range(n)]


# ---------------------------------------------------------------- the baseline


class SkipLockedQueue:
    """The queue table as PostgreSQL queue projects write it, on psycopg 3:
    one autocommit connection, every statement prepared."""

    CREATE = (f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, body jsonb NOT NULL, "
              "created_at timestamptz NOT NULL DEFAULT now())")
    INSERT = f"INSERT INTO {TABLE} (body) VALUES (%s)"
    INSERT_MANY = f"INSERT INTO {TABLE} (body) SELECT unnest(%s::jsonb[])"
    SELECT = f"SELECT id, body FROM {TABLE} ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
    DELETE = f"DELETE FROM {TABLE} WHERE id = ANY(%s)"
    NOTIFY = "SELECT pg_notify('jobs', '')"

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True, application_name="baseline")

    def send(self, body: Any) -> None:
        """One INSERT, its own transaction, synchronous_commit on."""
        self.conn.execute(self.INSERT, (Jsonb(body),), prepare=True)

    def send_notify(self, body: Any) -> None:
        """INSERT and NOTIFY in one transaction."""
        conn = self.conn
        with conn.transaction():
            conn.execute(self.INSERT, (Jsonb(body),), prepare=True)
            conn.execute(self.NOTIFY, prepare=True)

    def send_batch(self, bodies: Sequence[Any]) -> None:
        """One INSERT of them all (one statement, so one transaction)."""
        self.conn.execute(self.INSERT_MANY, ([Jsonb(b) for b in bodies],), prepare=True)

    def consume(self, n: int) -> List[Any]:
        """BEGIN, SELECT ... FOR UPDATE SKIP LOCKED, DELETE, COMMIT; the
        bodies (psycopg decodes jsonb)."""
        conn = self.conn
        with conn.transaction():
            rows = conn.execute(self.SELECT, (n,), prepare=True).fetchall()
            if rows:
                conn.execute(self.DELETE, ([r[0] for r in rows],), prepare=True)
        return [r[1] for r in rows]

    def close(self) -> None:
        self.conn.close()


class Server:
    """The throwaway cluster, an admin connection, fresh qlog schemas."""

    def __init__(self) -> None:
        from _pgcluster import Cluster

        self.cluster = Cluster(settings=["-c", "track_wal_io_timing=on"])
        self.url = self.cluster.url
        self.admin = psycopg.connect(self.url, autocommit=True, application_name="bench-admin")
        self.admin.execute(SkipLockedQueue.CREATE)
        self.n = 0

    def setting(self, name: str) -> str:
        return str(self.admin.execute(f"SHOW {name}").fetchone()[0])

    def fresh_qlog(self) -> str:
        """The URL of a new, empty qlog schema (its tables made now, untimed)."""
        self.n += 1
        url = f"{self.url}?schema=bench_{self.n}"
        with qlog.open(url) as b:
            b.queue(QUEUE)
        return url

    def drop_qlog(self, url: str) -> None:
        schema = url.rsplit("=", 1)[1]
        self.admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    def fresh_baseline(self) -> None:
        self.admin.execute(f"TRUNCATE {TABLE} RESTART IDENTITY")

    def baseline_count(self) -> int:
        return int(self.admin.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0])

    def close(self) -> None:
        try:
            self.admin.close()
        finally:
            self.cluster.destroy()


def server_cpu(srv: Server) -> float:
    """CPU seconds the server has used: the postmaster's own and its
    reaped children's (cutime, cstime), plus every live child's."""
    pm = int(open(os.path.join(srv.cluster.data, "postmaster.pid")).readline())
    ticks = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(name) == pm:
            ticks += sum(int(x) for x in fields[11:15])
        elif int(fields[1]) == pm:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class Cpu:
    """CPU seconds per message of the client (this process, every thread)
    and of the server over timed sections, kept per side."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.per_msg: Dict[str, List[Tuple[float, float]]] = {"qlog": [], "baseline": []}

    def start(self) -> Tuple[float, float]:
        return time.process_time(), server_cpu(self.srv)

    def stop(self, side: str, t0: Tuple[float, float], msgs: int, client: Optional[float] = None) -> None:
        c = time.process_time() - t0[0] if client is None else client
        self.per_msg[side].append((c / msgs, (server_cpu(self.srv) - t0[1]) / msgs))

    def note(self) -> str:
        def one(side: str) -> str:
            xs = self.per_msg[side]
            c, v = median([x[0] for x in xs]), median([x[1] for x in xs])
            return f"{side} {1e6 * c:.0f} + {1e6 * v:.0f} = {1e6 * (c + v):.0f} us"
        return (f"CPU per message, client + server (medians; {os.cpu_count()} cpus): "
                f"{one('qlog')}; {one('baseline')}")


def prefill_qlog(url: str, n: int) -> None:
    bodies = json_bodies(PREFILL)
    with qlog.open(url, durability="none") as b:
        q = b.queue(QUEUE)
        for _ in range(n // PREFILL):
            q.send_batch(bodies)
        check(q.stats().backlog == n, "qlog prefill")


def prefill_baseline(url: str, n: int) -> None:
    bq = SkipLockedQueue(url)
    bodies = json_bodies(PREFILL)
    for _ in range(n // PREFILL):
        bq.send_batch(bodies)
    bq.close()


# ---------------------------------------------------------------- figures


@dataclass
class Row:
    key: str
    name: str
    qlog: str
    baseline: str
    ratio: float
    ratios: List[float]
    notes: List[str] = field(default_factory=list)
    profile: str = ""


def rounds(n: int, q_side: Callable[[], float], b_side: Callable[[], float]) -> Tuple[List[float], List[float]]:
    """n rounds, the two sides alternating which goes first."""
    qs: List[float] = []
    bs: List[float] = []
    for r in range(n):
        if r % 2 == 0:
            qs.append(q_side())
            bs.append(b_side())
        else:
            bs.append(b_side())
            qs.append(q_side())
    return qs, bs


def rate_row(key: str, name: str, q: List[float], b: List[float], notes: List[str]) -> Row:
    ratios = [x / y for x, y in zip(q, b)]
    row = Row(key, name, fmt_rate(median(q), "msg/s"), fmt_rate(median(b), "msg/s"), median(ratios), ratios,
              list(notes))
    row.notes.append(per_rep("qlog per round", q, 1e-3, "k msg/s"))
    row.notes.append(per_rep("baseline per round", b, 1e-3, "k msg/s"))
    return row


def timed_loop(seconds: float, op: Callable[[int], int]) -> Tuple[int, float]:
    """Call op(i) until `seconds` have passed; (messages, elapsed)."""
    n = i = 0
    clock = time.perf_counter
    t0 = clock()
    end = t0 + seconds
    while True:
        n += op(i)
        i += 1
        t = clock()
        if t >= end:
            return n, t - t0


# ---------------------------------------------------------------- rows 1 and 2: one client sending


def bench_send(srv: Server, plan: Plan, prof: bool, batch: bool) -> Row:
    bodies = json_bodies()
    secs = plan.batch_seconds if batch else plan.send_seconds
    cpu = Cpu(srv)
    timed = [True]

    def q_side(secs: float = secs) -> float:
        url = srv.fresh_qlog()
        try:
            with qlog.open(url) as b:
                q = b.queue(QUEUE)
                if batch:
                    q.send_batch(bodies)  # statements prepared, untimed
                    c0 = cpu.start()
                    n, dt = timed_loop(secs, lambda i: len(q.send_batch(bodies)) and BATCH)
                else:
                    q.send(bodies[0])
                    send = q.send
                    c0 = cpu.start()
                    n, dt = timed_loop(secs, lambda i: send(bodies[i % BATCH]) and 1)
                if timed[0]:
                    cpu.stop("qlog", c0, n)
                check(q.stats().backlog == n + (BATCH if batch else 1), "qlog send backlog")
            return n / dt
        finally:
            srv.drop_qlog(url)

    def b_side() -> float:
        srv.fresh_baseline()
        bq = SkipLockedQueue(srv.url)
        try:
            if batch:
                bq.send_batch(bodies)
                c0 = cpu.start()
                n, dt = timed_loop(secs, lambda i: bq.send_batch(bodies) or BATCH)
            else:
                bq.send(bodies[0])
                send = bq.send
                c0 = cpu.start()
                n, dt = timed_loop(secs, lambda i: send(bodies[i % BATCH]) or 1)
            if timed[0]:
                cpu.stop("baseline", c0, n)
            check(srv.baseline_count() == n + (BATCH if batch else 1), "baseline send count")
            return n / dt
        finally:
            bq.close()

    timed[0] = False
    q_side(secs / 4)  # warm-up: server caches, code paths
    b_side()
    timed[0] = True
    q, b = rounds(plan.rounds, q_side, b_side)
    timed[0] = False
    progress(f"{'send_batch' if batch else 'send'}: {plan.rounds} rounds of {secs:g} s per side")
    if batch:
        row = rate_row("batch", "send_batch(100), 1 client, vs INSERT of unnest(100)", q, b, [
            f"for {secs:g} s per round; {1e6 * BATCH / median(q):.0f} us per qlog batch, "
            f"{1e6 * BATCH / median(b):.0f} us per baseline INSERT ... SELECT unnest(%s::jsonb[]) "
            "(one statement, its own transaction, synchronous_commit on)", cpu.note()])
    else:
        row = rate_row("send", "send() one by one, sync, 1 client, vs INSERT each", q, b, [
            f"for {secs:g} s per round; {1e6 / median(q):.0f} us per qlog send (durability sync), "
            f"{1e6 / median(b):.0f} us per baseline autocommit INSERT (synchronous_commit on)", cpu.note()])
    if prof:
        row.profile = profiled(q_side)
    return row


# ---------------------------------------------------------------- row 3: one client consuming


def drain_qlog(q: Any, counted: List[int]) -> None:
    pull = q.pull
    while True:
        batch = pull(BATCH, visibility_timeout=VT)
        if not batch:
            return
        for m in batch.messages:
            counted[1] += len(m.body)
        batch.ack_all()
        counted[0] += len(batch)


def drain_baseline(bq: SkipLockedQueue, counted: List[int]) -> None:
    consume = bq.consume
    while True:
        rows = consume(BATCH)
        if not rows:
            return
        for body in rows:
            counted[1] += len(body)
        counted[0] += len(rows)


def bench_pull(srv: Server, plan: Plan, prof: bool) -> Row:
    n = plan.pull_msgs - plan.pull_msgs % PREFILL
    cpu = Cpu(srv)

    def q_side(n: int = n, profile: bool = False, timed: bool = True) -> float:
        url = srv.fresh_qlog()
        try:
            prefill_qlog(url, n + PREFILL)
            with qlog.open(url) as b:
                q = b.queue(QUEUE)
                for _ in range(PREFILL // BATCH):  # statements prepared, untimed
                    q.pull(BATCH, visibility_timeout=VT).ack_all()
                counted = [0, 0]
                c0 = cpu.start()
                t0 = time.perf_counter()
                if profile:
                    prof_text[0] = profiled(lambda: drain_qlog(q, counted))
                else:
                    drain_qlog(q, counted)
                dt = time.perf_counter() - t0
                if timed and not profile:
                    cpu.stop("qlog", c0, n)
                st = q.stats()
                check(counted[0] == n and counted[1] == n * 5 and st.backlog == 0,
                      f"qlog drained {counted} of {n}: {st}")
            return n / dt
        finally:
            srv.drop_qlog(url)

    def b_side() -> float:
        srv.fresh_baseline()
        prefill_baseline(srv.url, n + PREFILL)
        bq = SkipLockedQueue(srv.url)
        try:
            for _ in range(PREFILL // BATCH):
                bq.consume(BATCH)
            counted = [0, 0]
            c0 = cpu.start()
            t0 = time.perf_counter()
            drain_baseline(bq, counted)
            dt = time.perf_counter() - t0
            cpu.stop("baseline", c0, n)
            check(counted[0] == n and counted[1] == n * 5 and srv.baseline_count() == 0,
                  f"baseline drained {counted} of {n}")
            return n / dt
        finally:
            bq.close()

    prof_text = [""]
    q_side(max(PREFILL, n // 4 // PREFILL * PREFILL), timed=False)
    q, b = rounds(plan.rounds, q_side, b_side)
    progress(f"pull: {plan.rounds} rounds of {n:,} messages per side")
    row = rate_row("pull", "pull(100) + ack_all, 1 client, vs SELECT SKIP LOCKED + DELETE", q, b, [
        f"a backlog of {n:,} messages sent untimed (plus {PREFILL} pulled first, untimed), drained "
        f"100 at a time, every body decoded; {1e6 * BATCH / median(q):.0f} us per qlog pull + "
        f"ack_all, {1e6 * BATCH / median(b):.0f} us per baseline transaction (BEGIN, SELECT ... "
        "FOR UPDATE SKIP LOCKED, DELETE WHERE id = ANY, COMMIT)", cpu.note()])
    if prof:
        q_side(profile=True)
        row.profile = prof_text[0]
    return row


# ---------------------------------------------------------------- rows 4 and 5: four processes


def _mp_worker(kind: str, role: str, url: str, seconds: float, start: Any, out: Any) -> None:
    """A client process: open its own broker or connection, wait at the
    barrier, send for `seconds` or drain until a pull comes back empty;
    report (messages, body chars, start, end, error) on `out`."""
    try:
        bodies = json_bodies()
        counted = [0, 0]
        if kind == "qlog":
            b = qlog.open(url)
            q = b.queue(QUEUE)
            if role == "send":
                q.send(bodies[0])  # prepared, untimed (counted below)
            start.wait(120)
            t0, c0 = time.monotonic(), time.process_time()
            if role == "send":
                send = q.send
                n, _ = timed_loop(seconds, lambda i: send(bodies[i % BATCH]) and 1)
                counted[0] = n
            else:
                drain_qlog(q, counted)
            t1, c1 = time.monotonic(), time.process_time()
            b.close()
        else:
            bq = SkipLockedQueue(url)
            if role == "send":
                bq.send(bodies[0])
            start.wait(120)
            t0, c0 = time.monotonic(), time.process_time()
            if role == "send":
                send = bq.send
                n, _ = timed_loop(seconds, lambda i: send(bodies[i % BATCH]) or 1)
                counted[0] = n
            else:
                drain_baseline(bq, counted)
            t1, c1 = time.monotonic(), time.process_time()
            bq.close()
        out.put((counted[0], counted[1], t0, t1, None, c1 - c0))
    except BaseException as e:  # noqa: BLE001  (reported to the parent)
        try:
            start.abort()
        except Exception:
            pass
        out.put((0, 0, 0.0, 0.0, f"{type(e).__name__}: {e}", 0.0))


def run_procs(kind: str, role: str, url: str, procs: int, seconds: float,
              cpu: Optional[Cpu] = None, expect: int = 0) -> Tuple[int, int, float]:
    """(messages, body chars, seconds from the first start to the last end);
    the CPU per message of the processes and the server go to `cpu`."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(procs + 1)
    out = ctx.Queue()
    ps = [ctx.Process(target=_mp_worker, args=(kind, role, url, seconds, start, out), daemon=True)
          for _ in range(procs)]
    for p in ps:
        p.start()
    try:
        try:
            start.wait(120)
        except threading.BrokenBarrierError:
            pass
        c0 = (0.0, server_cpu(cpu.srv)) if cpu is not None else (0.0, 0.0)
        res = [out.get(timeout=300) for _ in ps]
    finally:
        for p in ps:
            p.join(30)
            if p.is_alive():
                p.kill()
    errs = [r[4] for r in res if r[4]]
    if errs:
        raise RuntimeError(f"a {kind} {role} process failed: {errs[0]}")
    if cpu is not None:
        cpu.stop(kind, c0, max(sum(r[0] for r in res), 1), client=sum(r[5] for r in res))
    return (sum(r[0] for r in res), sum(r[1] for r in res),
            max(r[3] for r in res) - min(r[2] for r in res))


def bench_send4(srv: Server, plan: Plan) -> Row:
    k, secs = plan.procs, plan.send_seconds
    cpu = Cpu(srv)

    def q_side() -> float:
        url = srv.fresh_qlog()
        try:
            n, _, dt = run_procs("qlog", "send", url, k, secs, cpu)
            with qlog.open(url) as b:
                check(b.queue(QUEUE).stats().backlog == n + k, "qlog send4 backlog")
            return n / dt
        finally:
            srv.drop_qlog(url)

    def b_side() -> float:
        srv.fresh_baseline()
        n, _, dt = run_procs("baseline", "send", srv.url, k, secs, cpu)
        check(srv.baseline_count() == n + k, "baseline send4 count")
        return n / dt

    q, b = rounds(plan.rounds, q_side, b_side)
    progress(f"send x{k}: {plan.rounds} rounds of {secs:g} s per side")
    return rate_row("send4", f"send() one by one, sync, {k} processes, vs INSERT each", q, b, [
        f"{k} spawned processes, each with its own broker (qlog) or connection (baseline), send "
        f"for {secs:g} s from a common barrier; time from the first start to the last end; "
        f"{k * 1e6 / median(q):.0f} us per qlog send, {k * 1e6 / median(b):.0f} us per "
        "baseline INSERT (per process)", cpu.note()])


def bench_pull4(srv: Server, plan: Plan) -> Row:
    k = plan.procs
    n = plan.pull4_msgs - plan.pull4_msgs % PREFILL
    cpu = Cpu(srv)

    def q_side() -> float:
        url = srv.fresh_qlog()
        try:
            prefill_qlog(url, n)
            got, chars, dt = run_procs("qlog", "pull", url, k, 0, cpu)
            with qlog.open(url) as b:
                st = b.queue(QUEUE).stats()
            check(got == n and chars == 5 * n and st.backlog == 0, f"qlog pull4 {got} of {n}: {st}")
            return n / dt
        finally:
            srv.drop_qlog(url)

    def b_side() -> float:
        srv.fresh_baseline()
        prefill_baseline(srv.url, n)
        got, chars, dt = run_procs("baseline", "pull", srv.url, k, 0, cpu)
        check(got == n and chars == 5 * n and srv.baseline_count() == 0, f"baseline pull4 {got} of {n}")
        return n / dt

    q, b = rounds(plan.rounds, q_side, b_side)
    progress(f"pull x{k}: {plan.rounds} rounds of {n:,} messages per side")
    return rate_row("pull4", f"pull(100) + ack_all, {k} processes, vs SELECT SKIP LOCKED + DELETE", q, b, [
        f"a backlog of {n:,} messages sent untimed, drained by {k} spawned processes (each stops "
        "at its first empty pull), every body decoded; time from the common barrier to the last "
        "process's end", cpu.note()])


# ---------------------------------------------------------------- row 6: send -> handler latency


def _lat_consumer(kind: str, url: str, pipe: Any) -> None:
    """Wait for one message at a time; after acking it, report (now - the
    body's send time, the time of the statement that delivered it) in ns on
    `pipe`; stop at a body with "stop"."""
    try:
        clock = time.monotonic_ns
        if kind == "qlog":
            from qlog._pg.backend import PgQueue

            lease0 = PgQueue.lease  # the backend's lease call, timed: the delivering statement
            last = [0]

            def lease(this: Any, *a: Any, **kw: Any) -> Any:
                t = clock()
                got = lease0(this, *a, **kw)
                last[0] = clock() - t
                return got

            PgQueue.lease = lease  # type: ignore[method-assign]  # in this process only
            b = qlog.open(url)
            q = b.queue(QUEUE)
            pull = q.pull
            pipe.send("ready")
            while True:
                batch = pull(1, visibility_timeout=VT, wait=5)
                if not batch:
                    continue
                now = clock()
                body = batch.messages[0].body
                batch.ack_all()
                if "stop" in body:
                    break
                pipe.send((now - body["t"], last[0]))
            b.close()
        else:
            bq = SkipLockedQueue(url)
            conn = bq.conn
            conn.execute("LISTEN jobs")
            pipe.send("ready")
            while True:
                with conn.transaction():
                    t = clock()
                    rows = conn.execute(bq.SELECT, (1,), prepare=True).fetchall()
                    now = clock()
                    if rows:
                        conn.execute(bq.DELETE, ([rows[0][0]],), prepare=True)
                if not rows:
                    for _ in conn.notifies(timeout=5, stop_after=1):
                        pass
                    continue
                body = rows[0][1]
                if "stop" in body:
                    break
                pipe.send((now - body["t"], now - t))
            bq.close()
    except BaseException as e:  # noqa: BLE001
        pipe.send(f"error: {type(e).__name__}: {e}")


def pct(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def latency_run(kind: str, url: str, n: int, sends: List[float], delivers: List[float]) -> List[float]:
    """Latencies in us of n messages, sent one at a time by this process
    to a consumer process; the send() durations go to `sends`, those of
    the statements that delivered them to `delivers`."""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    p = ctx.Process(target=_lat_consumer, args=(kind, url, there), daemon=True)
    p.start()
    rng = random.Random(7)
    out: List[float] = []
    b: Any = None
    bq: Optional[SkipLockedQueue] = None
    try:
        if kind == "qlog":
            b = qlog.open(url)
            send = b.queue(QUEUE).send
        else:
            bq = SkipLockedQueue(url)
            send = bq.send_notify
        if not here.poll(60):
            raise RuntimeError(f"the {kind} latency consumer did not start")
        got = here.recv()
        if got != "ready":
            raise RuntimeError(f"the {kind} latency consumer: {got}")
        warm = 20
        for i in range(warm + n):
            time.sleep(rng.uniform(0.002, 0.004))  # the consumer is back in its wait
            t = time.monotonic_ns()
            send({"t": t, "i": i, "pad": "x" * 70})
            t1 = time.monotonic_ns()
            if not here.poll(30):
                raise RuntimeError(f"the {kind} latency consumer did not report message {i}")
            got = here.recv()
            if isinstance(got, str):
                raise RuntimeError(f"the {kind} latency consumer: {got}")
            if i >= warm:
                out.append(got[0] / 1e3)
                delivers.append(got[1] / 1e3)
                sends.append((t1 - t) / 1e3)
        send({"stop": True, "t": 0})
        p.join(30)
    finally:
        if b is not None:
            b.close()
        if bq is not None:
            bq.close()
        if p.is_alive():
            p.kill()
            p.join(5)
    return out


def bench_latency(srv: Server, plan: Plan) -> List[Row]:
    n = plan.lat_msgs
    res: Dict[str, List[Tuple[float, float]]] = {"qlog": [], "baseline": []}
    sends: Dict[str, List[float]] = {"qlog": [], "baseline": []}
    delivers: Dict[str, List[float]] = {"qlog": [], "baseline": []}

    def side(kind: str) -> Callable[[], float]:
        def run() -> float:
            if kind == "qlog":
                url = srv.fresh_qlog()
            else:
                srv.fresh_baseline()
                url = srv.url
            try:
                lats = latency_run(kind, url, n, sends[kind], delivers[kind])
            finally:
                if kind == "qlog":
                    srv.drop_qlog(url)
            res[kind].append((pct(lats, 50), pct(lats, 99)))
            return 0.0
        return run

    rounds(plan.rounds, side("qlog"), side("baseline"))
    progress(f"latency: {plan.rounds} rounds of {n} messages per side")
    rows = []
    for i, label in ((0, "p50"), (1, "p99")):
        q = [x[i] for x in res["qlog"]]
        b = [x[i] for x in res["baseline"]]
        ratios = [x / y for x, y in zip(q, b)]
        row = Row(f"latency-{label}", f"send -> handler latency {label}, across processes (lower is better)",
                  f"{median(q):.0f} us", f"{median(b):.0f} us", median(ratios), ratios)
        if i == 0:
            row.notes += [
                f"{n} messages per round (after 20 untimed), one at a time, 2 to 4 ms apart, from "
                "this process to one consumer process, which reports each after acking it; the "
                "time runs from monotonic_ns() before the send (carried in the body) to the return "
                "of the consumer's pull (qlog: pull(1, wait=5), woken by LISTEN/NOTIFY) or of its "
                "SELECT ... FOR UPDATE SKIP LOCKED (baseline: LISTEN, the producer INSERT + "
                "pg_notify() in one transaction)",
                f"p50 of the send call itself: qlog {pct(sends['qlog'], 50):.0f} us (its NOTIFY goes "
                f"after it, from its sender thread), baseline {pct(sends['baseline'], 50):.0f} us "
                "(BEGIN, INSERT, pg_notify, COMMIT); p50 of the consumer's delivering statement: "
                f"qlog's lease {pct(delivers['qlog'], 50):.0f} us (a durable commit), the baseline's "
                f"SELECT {pct(delivers['baseline'], 50):.0f} us (no commit before the handler)",
            ]
        row.notes.append(per_rep("qlog per round", q, 1, "us"))
        row.notes.append(per_rep("baseline per round", b, 1, "us"))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- where the time goes


class Tally:
    """Round trips by thread and statement, counted in psycopg: every
    exchange with the server goes through ``Connection.wait`` (a statement
    is one, BEGIN and COMMIT one each); qlog's statements are labelled by
    what ``Connections.run`` is told they are, the baseline's by their
    first word.  The listener threads' waits are left out."""

    def __init__(self) -> None:
        self.count: Dict[Tuple[str, str], int] = defaultdict(int)
        self.secs: Dict[Tuple[str, str], float] = defaultdict(float)
        self._local = threading.local()
        self._saved: List[Tuple[Any, str, Any]] = []

    def __enter__(self) -> "Tally":
        from qlog._pg import conn as qconn

        tally = self
        wait0 = psycopg.Connection.wait
        exec0 = psycopg.Cursor.execute
        run0 = qconn.Connections.run

        def wait(conn: Any, gen: Any, *a: Any, **kw: Any) -> Any:
            th = threading.current_thread().name
            if th == "qlog-pg-listen":
                return wait0(conn, gen, *a, **kw)
            label = getattr(tally._local, "label", None) or "BEGIN/COMMIT"
            t0 = time.perf_counter()
            try:
                return wait0(conn, gen, *a, **kw)
            finally:
                key = (th, label)
                tally.secs[key] += time.perf_counter() - t0
                tally.count[key] += 1

        def execute(cur: Any, query: Any, *a: Any, **kw: Any) -> Any:
            outer = getattr(tally._local, "label", None)
            if outer is None and isinstance(query, str):
                tally._local.label = query.split(None, 1)[0].upper()
            try:
                return exec0(cur, query, *a, **kw)
            finally:
                tally._local.label = outer

        def run(conns: Any, sql: Any, params: Any = None, **kw: Any) -> Any:
            what = kw.get("what", "a statement")
            tally._local.label = " ".join(what.split()[:2])
            try:
                return run0(conns, sql, params, **kw)
            finally:
                tally._local.label = None

        for owner, name, new in ((psycopg.Connection, "wait", wait), (psycopg.Cursor, "execute", execute),
                                 (qconn.Connections, "run", run)):
            self._saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, new)
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, old in reversed(self._saved):
            setattr(owner, name, old)

    def reset(self) -> None:
        self.count.clear()
        self.secs.clear()


def server_stats(srv: Server) -> Dict[str, float]:
    """Commits of the database and the WAL figures of the cluster."""
    row = srv.admin.execute(
        "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()), "
        "wal_records, wal_bytes, wal_write, wal_sync, wal_sync_time FROM pg_stat_wal").fetchone()
    return dict(zip(("commits", "wal_records", "wal_bytes", "wal_write", "wal_sync", "wal_sync_ms"),
                    (float(x) for x in row)))


def settled_stats(srv: Server, settle: float) -> Optional[Dict[str, float]]:
    """The counters once the backends measured have reported: they are
    closed first (a backend flushes its statistics as it exits; an idle one
    may hold them for 10 s), and the WAL writer reports about once a second."""
    if settle <= 0:
        return None
    srv.admin.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(settle)
    return server_stats(srv)


@dataclass
class Anatomy:
    side: str
    op: str
    per_op_us: float
    msgs_per_op: int
    trips: List[Tuple[str, str, float, float]]  # thread, label, per op, us each
    server: Optional[Dict[str, float]]


def anatomy_one(srv: Server, tally: Tally, side: str, op: str, seconds: float, settle: float,
                backlog: int, null: Optional[Dict[str, float]]) -> Anatomy:
    """One operation of one side for `seconds`, counted (see Tally); pulls
    drain a backlog of `backlog` messages (full batches only).  The server's
    counters span opening the side, 10 calls to warm it, the calls timed
    and closing it; `null` (opening and closing alone) is taken off."""
    bodies = json_bodies()
    url = ""
    b: Any = None
    bq: Optional[SkipLockedQueue] = None
    try:
        if side == "qlog":
            url = srv.fresh_qlog()
            if op == "pull":
                prefill_qlog(url, backlog)
        else:
            srv.fresh_baseline()
            if op == "pull":
                prefill_baseline(srv.url, backlog)
        s0 = settled_stats(srv, settle)
        if side == "qlog":
            b = qlog.open(url)
            q = b.queue(QUEUE)
            ops: Dict[str, Callable[[], Any]] = {
                "send": lambda: q.send(bodies[0]),
                "batch": lambda: q.send_batch(bodies),
                "pull": lambda: check(drain_one(q.pull(BATCH, visibility_timeout=VT)) == BATCH, "full pull"),
            }
        else:
            bq = SkipLockedQueue(srv.url)
            ops = {"send": lambda: bq.send(bodies[0]), "batch": lambda: bq.send_batch(bodies),
                   "pull": lambda: check(len([len(x) for x in bq.consume(BATCH)]) == BATCH, "full consume")}
        fn = ops[op]
        warm = 10
        for _ in range(warm):  # prepared, warm
            fn()
        limit = backlog // BATCH - warm - 5 if op == "pull" else 1 << 60
        tally.reset()
        k = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while k < limit and time.perf_counter() < end:
            fn()
            k += 1
        dt = time.perf_counter() - t0
        counts, secs = dict(tally.count), dict(tally.secs)
    finally:
        if b is not None:
            b.close()
        if bq is not None:
            bq.close()
    s1 = settled_stats(srv, settle)
    if url:
        srv.drop_qlog(url)
    server = None
    if s0 is not None and s1 is not None:
        calls = k + warm
        server = {key: (s1[key] - s0[key] - (null or {}).get(key, 0.0)) / calls for key in s0}
        server["commits"] -= 1 / calls  # the first reading's own transaction
        server["wal_sync_us_each"] = (1e3 * (s1["wal_sync_ms"] - s0["wal_sync_ms"])
                                      / max(s1["wal_sync"] - s0["wal_sync"], 1))
    trips = sorted(((th, label, c / k, 1e6 * secs[(th, label)] / c) for (th, label), c in counts.items()),
                   key=lambda x: (x[0] != "MainThread", -x[2] * x[3]))
    return Anatomy(side, op, 1e6 * dt / k, 1 if op == "send" else BATCH, trips, server)


def null_stats(srv: Server, side: str, settle: float) -> Optional[Dict[str, float]]:
    """The server's counters for opening and closing a side alone."""
    url = srv.fresh_qlog() if side == "qlog" else ""
    s0 = settled_stats(srv, settle)
    if side == "qlog":
        with qlog.open(url) as b:
            b.queue(QUEUE)
    else:
        SkipLockedQueue(srv.url).close()
    s1 = settled_stats(srv, settle)
    if url:
        srv.drop_qlog(url)
    if s0 is None or s1 is None:
        return None
    out = {key: s1[key] - s0[key] for key in s0}
    out["commits"] -= 1  # the first reading's
    return out


def drain_one(batch: Any) -> int:
    for m in batch.messages:
        len(m.body)
    batch.ack_all()
    return len(batch)


def floors(srv: Server) -> Tuple[float, float]:
    """(us of a prepared SELECT 1 round trip, us of an INSERT of one row
    into a one-column table with synchronous_commit on)."""
    conn = psycopg.connect(srv.url, autocommit=True)
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_floor (x int)")
        out = []
        for sql in ("SELECT 1", "INSERT INTO bench_floor VALUES (1)"):
            for _ in range(20):
                conn.execute(sql, prepare=True)
            n = 500
            t0 = time.perf_counter()
            for _ in range(n):
                conn.execute(sql, prepare=True)
            out.append(1e6 * (time.perf_counter() - t0) / n)
        conn.execute("DROP TABLE bench_floor")
        return out[0], out[1]
    finally:
        conn.close()


OPS = {"send": "send()", "batch": "send_batch(100)", "pull": "pull(100) + ack_all"}


def anatomy(srv: Server, plan: Plan, only: Sequence[str]) -> List[str]:
    ops = [op for op in OPS if op in only or f"{op}4" in only]
    if not ops:
        return []
    rtt, insert = floors(srv)
    out = [f"floors: a prepared SELECT 1 round trip {rtt:.0f} us; an autocommit one-row INSERT "
           f"(synchronous_commit on: a WAL fsync) {insert:.0f} us"]
    null = {side: null_stats(srv, side, plan.settle) for side in ("qlog", "baseline")}
    with Tally() as tally:
        for op in ops:
            for side in ("qlog", "baseline"):
                a = anatomy_one(srv, tally, side, op, plan.anatomy_seconds, plan.settle, plan.pull_msgs,
                                null[side])
                own = [t for t in a.trips if t[0] == "MainThread"]
                other = [t for t in a.trips if t[0] != "MainThread"]
                waited = sum(t[2] * t[3] for t in own)
                s = a.server
                line = (f"{side} {OPS[op]}: {a.per_op_us:.0f} us per call; {sum(t[2] for t in own):.2f} "
                        f"round trips from the caller, {waited:.0f} us waiting on them ("
                        + ", ".join(f"{lab} {n:.2f} x {us:.0f} us" for _, lab, n, us in own)
                        + f"), {a.per_op_us - waited:.0f} us in Python")
                if other:
                    line += "; other threads: " + ", ".join(
                        f"{th} {lab} {n:.2f} x {us:.0f} us" for th, lab, n, us in other)
                if s is not None:
                    line += (f"; server per call: {s['commits']:.2f} transactions, {s['wal_sync']:.2f} WAL "
                             f"fsyncs ({s['wal_sync_us_each']:.0f} us each), {s['wal_records']:.1f} WAL "
                             f"records, {s['wal_bytes'] / a.msgs_per_op:.0f} WAL bytes per message")
                out.append(line)
            progress(f"anatomy: {OPS[op]}")
    return out


# ---------------------------------------------------------------- report


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: one round, small sizes")
    ap.add_argument("--only", help=f"comma-separated rows to run, of: {' '.join(ROWS)}")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per row (default 3, quick 1)")
    ap.add_argument("--no-anatomy", action="store_true", help='skip "where the time goes"')
    ap.add_argument("--profile", action="store_true",
                    help="also run the qlog side of the one-client rows once under cProfile")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds})
    only = ROWS if not args.only else tuple(x.strip() for x in args.only.split(",") if x.strip())
    bad = [x for x in only if x not in ROWS]
    if bad:
        ap.error(f"unknown row(s) {', '.join(bad)}; rows are: {' '.join(ROWS)}")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the server is removed on kill too
    t_start = time.perf_counter()
    srv = Server()
    rows: List[Row] = []
    try:
        info = machine_info(srv.cluster.root)
        pg = (f"PostgreSQL {srv.setting('server_version')} (throwaway cluster, loopback TCP): "
              f"synchronous_commit={srv.setting('synchronous_commit')}, fsync={srv.setting('fsync')}, "
              f"wal_sync_method={srv.setting('wal_sync_method')}, "
              f"shared_buffers={srv.setting('shared_buffers')}; psycopg {psycopg.__version__} "
              f"({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})")
        benches: Dict[str, Callable[[], List[Row]]] = {
            "send": lambda: [bench_send(srv, plan, args.profile, batch=False)],
            "batch": lambda: [bench_send(srv, plan, args.profile, batch=True)],
            "pull": lambda: [bench_pull(srv, plan, args.profile)],
            "send4": lambda: [bench_send4(srv, plan)],
            "pull4": lambda: [bench_pull4(srv, plan)],
            "latency": lambda: bench_latency(srv, plan),
        }
        for key in ROWS:
            if key in only:
                rows += benches[key]()
        where = [] if args.no_anatomy else anatomy(srv, plan, only)
    finally:
        srv.close()
    print(f"qlog PostgreSQL benchmark ({'quick' if args.quick else 'full'}): medians of {plan.rounds} "
          "interleaved round(s); baseline: a jobs table with FOR UPDATE SKIP LOCKED on psycopg 3")
    for line in info + [pg]:
        print(f"  {line}")
    print()
    print_report(("figure", "qlog", "baseline", "qlog/baseline"),
                 [(r.name, r.qlog, r.baseline, f"{r.ratio:.2f}") for r in rows], rows)
    for r in rows:
        if r.profile:
            print(f"\n--- cProfile of the qlog side: {r.name} (sorted by own time)")
            print(r.profile)
    if where:
        print("\nwhere the time goes (one client, counted in psycopg and in the server's statistics):")
        for line in where:
            print(f"  {line}")
    print_end(t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
