"""Side-by-side benchmark of qlog queues against a queue on stdlib sqlite3.

    python benchmarks/queues.py                  # full run (about 3 minutes)
    python benchmarks/queues.py --quick          # short run; backlog and history rows scaled down
    python benchmarks/queues.py --only pull,json # some rows (batch send none pull json sync rss reopen)
    python benchmarks/queues.py --dir DIR        # scratch space in DIR (default <repo>/.bench-tmp)
    python benchmarks/queues.py --only pull --profile   # also cProfile the qlog side

The baseline is a queue the script implements on the standard library's
sqlite3: one table (id INTEGER PRIMARY KEY, body), WAL mode,
synchronous=NORMAL; a send is an INSERT, a batch an executemany in one
transaction, a consume a SELECT of 100 and a DELETE of them in one
transaction.  persist-queue's SQLiteAckQueue is a third column where it is
installed (``pip install .[bench]``); the `none` row runs against queuelib's
FifoDiskQueue (Scrapy's disk queue), from the same extra.  Both sides get the same payloads:
100-byte bytes bodies, or ~100-byte dicts encoded and decoded with json.
Every ratio is the median of per-repetition ratios, the sides interleaved
(their order rotates between repetitions).  This measures; it never fails
on a missed target (the exit status is 0 unless something breaks).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.metadata
import io
import json
import os
import pstats
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import qlog  # noqa: E402
from engine import (  # noqa: E402
    Scratch, check, fmt_rate, fmt_time, interleave, machine_info, median, per_rep, print_end, print_report,
    progress, remove,
)

try:
    import persistqueue
    import persistqueue.serializers.json as pq_json
except ImportError:  # the optional `bench` extra
    persistqueue = None  # type: ignore[assignment]
try:  # the `none` row's baseline (pip install .[bench])
    import queuelib
except ImportError:  # pragma: no cover
    queuelib = None  # type: ignore[assignment]
    pq_json = None  # type: ignore[assignment]

PAYLOAD = 100
BATCH = 100
QUEUE = "jobs"
JSON_SEPARATORS = (",", ":")  # qlog's own encoding of json bodies


@dataclass(frozen=True)
class Plan:
    reps: int
    batch_msgs: int  # messages per repetition, qlog and sqlite alike
    single_msgs: int
    pull_msgs: int
    json_msgs: int
    pq_msgs: int  # persist-queue commits per message: fewer of them
    sync_seconds: float
    sync_threads: int
    sync_reps: int
    sqlite_sync_reps: int
    rss_big: int
    rss_small: int
    rss_consume: int  # messages each consumer process pulls and acks
    rss_reps: int
    history_big: int
    history_small: int
    reopen_reps: int


FULL = Plan(reps=7, batch_msgs=200_000, single_msgs=60_000, pull_msgs=200_000, json_msgs=100_000,
            pq_msgs=5_000, sync_seconds=1.5, sync_threads=16, sync_reps=7, sqlite_sync_reps=3,
            rss_big=2_000_000, rss_small=1_000, rss_consume=5_000, rss_reps=5,
            history_big=10_000_000, history_small=10_000, reopen_reps=7)
QUICK = Plan(reps=5, batch_msgs=50_000, single_msgs=20_000, pull_msgs=50_000, json_msgs=30_000,
             pq_msgs=2_000, sync_seconds=0.4, sync_threads=16, sync_reps=5, sqlite_sync_reps=3,
             rss_big=200_000, rss_small=1_000, rss_consume=5_000, rss_reps=5,
             history_big=1_000_000, history_small=10_000, reopen_reps=5)

ROWS = ("batch", "send", "none", "pull", "json", "sync", "rss", "reopen")


# ---------------------------------------------------------------- payloads


def bytes_bodies(n: int = BATCH) -> List[bytes]:
    seed = os.urandom(PAYLOAD + n)
    return [seed[i:i + PAYLOAD] for i in range(n)]


def json_bodies(n: int = BATCH) -> List[Dict[str, Any]]:
    """n distinct dicts of 101 bytes as compact JSON."""
    return [{"type": "send_email", "user_id": 100_000 + i, "to": f"user{100_000 + i}@example.com",
             "template": "welcome", "attempt": 1} for i in range(n)]


# ---------------------------------------------------------------- the sqlite3 baseline


class SqliteQueue:
    """A FIFO queue on one sqlite3 table: WAL mode, synchronous=NORMAL
    (a commit reaches the WAL file; the WAL is synced at checkpoints)."""

    def __init__(self, path: str, synchronous: str = "NORMAL") -> None:
        self.db = sqlite3.connect(path, isolation_level=None, timeout=60, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")

    def send(self, body: Any) -> None:
        """One INSERT, committed by itself (autocommit)."""
        self.db.execute("INSERT INTO q (body) VALUES (?)", (body,))

    def send_batch(self, bodies: Sequence[Any]) -> None:
        """executemany of the batch in one transaction."""
        db = self.db
        db.execute("BEGIN")
        db.executemany("INSERT INTO q (body) VALUES (?)", [(b,) for b in bodies])
        db.execute("COMMIT")

    def consume(self, n: int) -> List[Any]:
        """SELECT the oldest n and DELETE them in one transaction."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        rows = db.execute("SELECT id, body FROM q ORDER BY id LIMIT ?", (n,)).fetchall()
        if rows:
            db.execute("DELETE FROM q WHERE id <= ?", (rows[-1][0],))
        db.execute("COMMIT")
        return [r[1] for r in rows]

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM q").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def sqlite_path(dirpath: str) -> str:
    os.makedirs(dirpath, exist_ok=True)
    return os.path.join(dirpath, "queue.db")


# ---------------------------------------------------------------- persist-queue


def open_pq(dirpath: str, json_bodies: bool = False) -> Any:
    """SQLiteAckQueue with synchronous=NORMAL on its connection, the
    durability of the other two columns (its default, FULL in WAL mode,
    fsyncs every put)."""
    kw = {"serializer": pq_json} if json_bodies else {}
    pq = persistqueue.SQLiteAckQueue(dirpath, auto_resume=False, **kw)
    conn: Any = pq._putter  # the one connection (multithreading=False)
    conn.execute("PRAGMA synchronous=NORMAL")
    return pq


def pq_consume(pq: Any, n: int) -> List[Any]:
    """n x (get + ack): the library has no batch get or ack."""
    out = []
    get, ack = pq.get, pq.ack
    for _ in range(n):
        try:
            item = get(block=False, raw=True)
        except persistqueue.Empty:
            break
        out.append(item["data"])
        ack(id=item["pqid"])
    return out


# ---------------------------------------------------------------- figures


@dataclass
class Row:
    key: str
    name: str
    qlog: str
    baseline: str
    ratio: float
    ratios: List[float]
    target: str
    met: bool
    pq: str = "-"
    pq_ratio: str = "-"
    notes: List[str] = field(default_factory=list)
    profile: str = ""


def profiled(fn: Callable[[], Any], top: int = 25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime")
    st.print_stats(top)
    text = buf.getvalue()
    start = text.find("   ncalls")
    return text[start:].rstrip() if start >= 0 else text.rstrip()


def versus(key: str, name: str, q: List[float], s: List[float], p: Optional[List[float]],
           target: float, notes: List[str], pq_note: str = "") -> Row:
    """A row of msg/s figures: qlog against sqlite (the target), and
    against persist-queue when it ran."""
    ratios = [a / b for a, b in zip(q, s)]
    r = median(ratios)
    row = Row(key, name, fmt_rate(median(q), "msg/s"), fmt_rate(median(s), "msg/s"), r, ratios,
              f">= {target:g}x", r >= target, notes=list(notes))
    row.notes.append(per_rep("qlog per rep", q, 1e-3, "k msg/s"))
    row.notes.append(per_rep("sqlite3 per rep", s, 1e-3, "k msg/s"))
    if p:
        pr = median([a / b for a, b in zip(q, p)])
        row.pq, row.pq_ratio = fmt_rate(median(p), "msg/s"), f"{pr:.1f}"
        row.notes.append(per_rep("persist-queue per rep", p, 1e-3, "k msg/s")
                         + (f" ({pq_note})" if pq_note else ""))
    return row


def pq_sides(fn: Callable[[], float]) -> List[Callable[[], float]]:
    return [fn] if persistqueue is not None else []


# ---------------------------------------------------------------- 1: send_batch(100)


def bench_batch(sc: Scratch, plan: Plan, prof: bool) -> Row:
    bodies = bytes_bodies()
    n = plan.batch_msgs - plan.batch_msgs % BATCH

    def q_side(n: int = n) -> float:
        path = sc.path("batch-qlog")
        try:
            with qlog.open(path, durability="interval") as b:
                q = b.queue(QUEUE)
                q.send_batch(bodies, content_type="bytes")  # segment and files made untimed
                sb = q.send_batch
                t0 = time.perf_counter()
                for _ in range(n // BATCH):
                    sb(bodies, content_type="bytes")
                dt = time.perf_counter() - t0
                check(q.stats().backlog == n + BATCH, "qlog batch backlog")
            return n / dt
        finally:
            remove(path)

    def s_side() -> float:
        path = sc.path("batch-sqlite")
        try:
            sq = SqliteQueue(sqlite_path(path))
            sq.send_batch(bodies)
            t0 = time.perf_counter()
            for _ in range(n // BATCH):
                sq.send_batch(bodies)
            dt = time.perf_counter() - t0
            check(sq.count() == n + BATCH, "sqlite batch count")
            sq.close()
            return n / dt
        finally:
            remove(path)

    def p_side() -> float:
        path = sc.path("batch-pq")
        m = plan.pq_msgs - plan.pq_msgs % BATCH
        try:
            pq = open_pq(path)
            pq.put(bodies[0])
            put = pq.put
            t0 = time.perf_counter()
            for _ in range(m // BATCH):
                for body in bodies:
                    put(body)
            dt = time.perf_counter() - t0
            check(pq.qsize() == m + 1, "persist-queue batch size")
            pq.close()
            return m / dt
        finally:
            remove(path)

    q_side(n // 4)
    s_side()
    res = interleave(plan.reps, [q_side, s_side] + pq_sides(p_side))
    progress(f"send_batch: {plan.reps} reps of {n:,} messages")
    row = versus("batch", "send_batch(100), bytes, interval, vs executemany of 100",
                 res[0], res[1], res[2] if len(res) > 2 else None, 5,
                 [f"{n:,} messages of {PAYLOAD} B per rep in batches of {BATCH}; sqlite3: BEGIN, "
                  f"executemany, COMMIT per batch; {1e6 * BATCH / median(res[0]):.0f} us per qlog "
                  f"batch, {1e6 * BATCH / median(res[1]):.0f} us per sqlite3 batch"],
                 f"{plan.pq_msgs:,} put() per rep, one commit each: it has no batch put")
    if prof:
        row.profile = profiled(q_side)
    return row


# ---------------------------------------------------------------- 2: send one per call


def send_side(sc: Scratch, name: str, durability: str, first: bytes, seq: List[bytes]) -> float:
    """qlog's send() of one message per call, msg/s (the send and none rows)."""
    path = sc.path(name)
    try:
        with qlog.open(path, durability=durability) as b:
            q = b.queue(QUEUE)
            q.send(first, content_type="bytes")
            send = q.send
            t0 = time.perf_counter()
            for body in seq:
                send(body, content_type="bytes")
            dt = time.perf_counter() - t0
            check(q.stats().backlog == len(seq) + 1, "qlog send backlog")
        return len(seq) / dt
    finally:
        remove(path)


def bench_send(sc: Scratch, plan: Plan, prof: bool) -> Row:
    bodies = bytes_bodies()
    n = plan.single_msgs - plan.single_msgs % BATCH
    seq = bodies * (n // BATCH)

    def q_side(seq: List[bytes] = seq) -> float:
        return send_side(sc, "send-qlog", "interval", bodies[0], seq)

    def s_side() -> float:
        path = sc.path("send-sqlite")
        try:
            sq = SqliteQueue(sqlite_path(path))
            sq.send(bodies[0])
            send = sq.send
            t0 = time.perf_counter()
            for body in seq:
                send(body)
            dt = time.perf_counter() - t0
            check(sq.count() == n + 1, "sqlite send count")
            sq.close()
            return n / dt
        finally:
            remove(path)

    def p_side() -> float:
        path = sc.path("send-pq")
        m = plan.pq_msgs
        try:
            pq = open_pq(path)
            pq.put(bodies[0])
            put = pq.put
            t0 = time.perf_counter()
            for body in seq[:m]:
                put(body)
            dt = time.perf_counter() - t0
            check(pq.qsize() == m + 1, "persist-queue send size")
            pq.close()
            return m / dt
        finally:
            remove(path)

    q_side(seq[:n // 4])
    s_side()
    res = interleave(plan.reps, [q_side, s_side] + pq_sides(p_side))
    progress(f"send: {plan.reps} reps of {n:,} messages")
    row = versus("send", "send() one per call, bytes, interval, vs INSERT+COMMIT each",
                 res[0], res[1], res[2] if len(res) > 2 else None, 20,
                 [f"{n:,} messages of {PAYLOAD} B per rep; sqlite3: one autocommit INSERT per "
                  f"message (its own transaction); {1e6 / median(res[0]):.2f} us per qlog send, "
                  f"{1e6 / median(res[1]):.2f} us per sqlite3 INSERT+COMMIT"],
                 f"{plan.pq_msgs:,} put() per rep")
    if prof:
        row.profile = profiled(q_side)
    return row


# ---------------------------------------------------------------- 2b: send one per call, no fsync


def bench_none(sc: Scratch, plan: Plan, prof: bool) -> Optional[Row]:
    """qlog's send() with durability "none" against queuelib's
    FifoDiskQueue.push (Scrapy's disk queue: a file per chunk, no ack, no
    CRC, no fsync)."""
    if queuelib is None:
        progress("none: skipped: queuelib is not installed (pip install .[bench])")
        return None
    bodies = bytes_bodies()
    n = plan.single_msgs - plan.single_msgs % BATCH
    seq = bodies * (n // BATCH)

    def q_side(seq: List[bytes] = seq) -> float:
        return send_side(sc, "none-qlog", "none", bodies[0], seq)

    def l_side() -> float:
        path = sc.path("none-queuelib")
        try:
            fq = queuelib.FifoDiskQueue(path)
            fq.push(bodies[0])
            push = fq.push
            t0 = time.perf_counter()
            for body in seq:
                push(body)
            dt = time.perf_counter() - t0
            check(len(fq) == n + 1, "queuelib push count")
            fq.close()
            return n / dt
        finally:
            remove(path)

    q_side(seq[:n // 4])
    l_side()
    res = interleave(plan.reps, [q_side, l_side])
    progress(f"none: {plan.reps} reps of {n:,} messages")
    ratios = [a / b for a, b in zip(res[0], res[1])]
    r = median(ratios)
    row = Row("none", "send() one per call, bytes, none, vs queuelib FifoDiskQueue.push",
              fmt_rate(median(res[0]), "msg/s"), fmt_rate(median(res[1]), "msg/s"), r, ratios,
              ">= 1.25x", r >= 1.25,
              notes=[f"{n:,} messages of {PAYLOAD} B per rep; queuelib "
                     f"{importlib.metadata.version('queuelib')} FifoDiskQueue (no ack, no CRC, no "
                     f"fsync); {1e6 / median(res[0]):.2f} us per qlog send, "
                     f"{1e6 / median(res[1]):.2f} us per push",
                     per_rep("qlog per rep", res[0], 1e-3, "k msg/s"),
                     per_rep("queuelib per rep", res[1], 1e-3, "k msg/s")])
    if prof:
        row.profile = profiled(q_side)
    return row


# ---------------------------------------------------------------- 3: pull(100) + ack_all


def bench_pull(sc: Scratch, plan: Plan, prof: bool) -> Row:
    bodies = bytes_bodies(1000)
    n = plan.pull_msgs - plan.pull_msgs % 1000

    def q_fill(path: str, n: int) -> None:
        with qlog.open(path, durability="interval") as b:
            q = b.queue(QUEUE)
            for _ in range(n // 1000):
                q.send_batch(bodies, content_type="bytes")

    def q_drain(path: str, n: int) -> float:
        with qlog.open(path, durability="interval") as b:
            q = b.queue(QUEUE)
            check(q.stats().backlog == n, "qlog pull backlog before")  # state loaded untimed
            pull = q.pull
            got = nbytes = 0
            t0 = time.perf_counter()
            while True:
                batch = pull(BATCH)
                if not batch:
                    break
                for m in batch.messages:
                    nbytes += len(m.body)
                batch.ack_all()
                got += len(batch)
            dt = time.perf_counter() - t0
            st = q.stats()
            check(got == n and nbytes == n * PAYLOAD and st.backlog == 0 and st.acked == n,
                  f"qlog drained {got} of {n}, {st}")
        return n / dt

    def q_side(n: int = n) -> float:
        path = sc.path("pull-qlog")
        try:
            q_fill(path, n)
            return q_drain(path, n)
        finally:
            remove(path)

    def s_side() -> float:
        path = sc.path("pull-sqlite")
        try:
            sq = SqliteQueue(sqlite_path(path))
            for i in range(n // 1000):
                sq.send_batch(bodies)
            sq.close()
            sq = SqliteQueue(sqlite_path(path))
            consume = sq.consume
            got = nbytes = 0
            t0 = time.perf_counter()
            while True:
                rows = consume(BATCH)
                if not rows:
                    break
                for body in rows:
                    nbytes += len(body)
                got += len(rows)
            dt = time.perf_counter() - t0
            check(got == n and nbytes == n * PAYLOAD and sq.count() == 0, "sqlite drained")
            sq.close()
            return n / dt
        finally:
            remove(path)

    def p_side() -> float:
        path = sc.path("pull-pq")
        m = plan.pq_msgs
        try:
            pq = open_pq(path)
            for body in (bodies * (m // 1000 + 1))[:m]:
                pq.put(body)
            pq.close()
            pq = open_pq(path)
            got = nbytes = 0
            t0 = time.perf_counter()
            while True:
                items = pq_consume(pq, BATCH)
                if not items:
                    break
                for body in items:
                    nbytes += len(body)
                got += len(items)
            dt = time.perf_counter() - t0
            check(got == m and nbytes == m * PAYLOAD, "persist-queue drained")
            pq.close()
            return m / dt
        finally:
            remove(path)

    q_side(max(1000, n // 4000 * 1000))
    s_side()
    res = interleave(plan.reps, [q_side, s_side] + pq_sides(p_side))
    progress(f"pull: {plan.reps} reps of {n:,} messages")
    row = versus("pull", "pull(100) + ack_all, bytes, vs SELECT+DELETE of 100",
                 res[0], res[1], res[2] if len(res) > 2 else None, 3,
                 [f"a backlog of {n:,} messages of {PAYLOAD} B sent untimed, closed, reopened, "
                  f"drained 100 at a time (len() of every body); sqlite3: BEGIN IMMEDIATE, SELECT "
                  f"... LIMIT 100, DELETE WHERE id <= last, COMMIT; "
                  f"{1e6 * BATCH / median(res[0]):.0f} us per qlog pull+ack_all, "
                  f"{1e6 * BATCH / median(res[1]):.0f} us per sqlite3 transaction"],
                 f"{plan.pq_msgs:,} messages: get() + ack() each, no batch calls")
    if prof:
        path = sc.path("pull-profile")
        try:
            q_fill(path, n)
            row.profile = profiled(lambda: q_drain(path, n))
        finally:
            remove(path)
    return row


# ---------------------------------------------------------------- 4: json end to end


def bench_json(sc: Scratch, plan: Plan, prof: bool) -> Row:
    dicts = json_bodies()
    n = plan.json_msgs - plan.json_msgs % BATCH

    def q_side(n: int = n) -> float:
        path = sc.path("json-qlog")
        try:
            with qlog.open(path, durability="interval") as b:
                q = b.queue(QUEUE)
                q.send_batch(dicts)
                q.pull(BATCH).ack_all()
                sb, pull = q.send_batch, q.pull
                got: List[Any] = []
                t0 = time.perf_counter()
                for _ in range(n // BATCH):
                    sb(dicts)
                    batch = pull(BATCH)
                    got = [m.body for m in batch.messages]
                    batch.ack_all()
                dt = time.perf_counter() - t0
                check(got == dicts and q.stats().acked == n + BATCH, "qlog json round trip")
            return n / dt
        finally:
            remove(path)

    def s_side() -> float:
        path = sc.path("json-sqlite")
        dumps, loads = json.JSONEncoder(separators=JSON_SEPARATORS).encode, json.loads
        try:
            sq = SqliteQueue(sqlite_path(path))
            got: List[Any] = []
            t0 = time.perf_counter()
            for _ in range(n // BATCH):
                sq.send_batch([dumps(d) for d in dicts])
                got = [loads(s) for s in sq.consume(BATCH)]
            dt = time.perf_counter() - t0
            check(got == dicts and sq.count() == 0, "sqlite json round trip")
            sq.close()
            return n / dt
        finally:
            remove(path)

    def p_side() -> float:
        path = sc.path("json-pq")
        m = plan.pq_msgs - plan.pq_msgs % BATCH
        try:
            pq = open_pq(path, json_bodies=True)
            got: List[Any] = []
            t0 = time.perf_counter()
            for _ in range(m // BATCH):
                for d in dicts:
                    pq.put(d)
                got = pq_consume(pq, BATCH)
            dt = time.perf_counter() - t0
            check(got == dicts, "persist-queue json round trip")
            pq.close()
            return m / dt
        finally:
            remove(path)

    q_side(n // 4)
    s_side()
    res = interleave(plan.reps, [q_side, s_side] + pq_sides(p_side))
    progress(f"json: {plan.reps} reps of {n:,} messages")
    size = len(json.dumps(dicts[0], separators=JSON_SEPARATORS))
    row = versus("json", "json dicts: send_batch(100)+pull(100)+ack_all vs same on sqlite3",
                 res[0], res[1], res[2] if len(res) > 2 else None, 2,
                 [f"{n // BATCH:,} rounds per rep of: send 100 dicts ({size} B as JSON), "
                  f"consume 100, decode every body; qlog: send_batch + pull + [m.body] + ack_all "
                  f"(interval); sqlite3: json.dumps + executemany, SELECT + json.loads + DELETE"],
                 f"{plan.pq_msgs:,} messages, its json serializer: put() x 100, get()+ack() x 100")
    if prof:
        row.profile = profiled(q_side)
    return row


# ---------------------------------------------------------------- 5: group commit


def threaded_rate(make_send: Callable[[], Callable[[], Any]], threads: int, seconds: float) -> float:
    """Messages per second that `threads` threads send for `seconds`; each
    thread gets its sender from make_send() before the clock starts."""
    stop = threading.Event()
    counts = [0] * threads
    failures: List[BaseException] = []
    start = threading.Barrier(threads + 1)

    def worker(i: int) -> None:
        try:
            send = make_send()
            start.wait()
        except BaseException as e:  # noqa: BLE001  (reported below)
            failures.append(e)
            start.abort()
            return
        c = 0
        is_set = stop.is_set
        try:
            while not is_set():
                send()
                c += 1
        except BaseException as e:  # noqa: BLE001
            failures.append(e)
        counts[i] = c

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"a sending thread failed: {failures[0]!r}") from failures[0]
    return sum(counts) / dt


def qlog_sync_run(sc: Scratch, threads: int, seconds: float, body: bytes,
                  syncs: Optional[List[float]] = None) -> float:
    """msg/s of `threads` threads sending to one durability="sync" Queue;
    appends the message log's fdatasyncs per second to `syncs`."""
    path = sc.path(f"sync-qlog-{threads}")
    try:
        with qlog.open(path, durability="sync") as b:
            q = b.queue(QUEUE)
            q.send(body, content_type="bytes")
            log = getattr(q, "_msgs", None)  # the message log, for its fdatasync count
            f0 = log.stats().fsyncs if log is not None else 0

            def make() -> Callable[[], Any]:
                send = q.send
                return lambda: send(body, content_type="bytes")

            t0 = time.perf_counter()
            rate = threaded_rate(make, threads, seconds)
            if syncs is not None and log is not None:
                syncs.append((log.stats().fsyncs - f0) / (time.perf_counter() - t0))
            return rate
    finally:
        remove(path)


def sqlite_sync_run(sc: Scratch, threads: int, seconds: float, body: bytes) -> float:
    """Each thread its own connection (a shared one would serialise the
    threads in the module), synchronous=FULL: a commit fsyncs the WAL."""
    path = sc.path(f"sync-sqlite-{threads}")
    conns: List[SqliteQueue] = []
    lock = threading.Lock()
    try:
        db = sqlite_path(path)
        first = SqliteQueue(db, synchronous="FULL")
        first.send(body)
        first.close()

        def make() -> Callable[[], Any]:
            sq = SqliteQueue(db, synchronous="FULL")
            with lock:
                conns.append(sq)
            return lambda: sq.send(body)

        return threaded_rate(make, threads, seconds)
    finally:
        for c in conns:
            c.close()
        remove(path)


def bench_sync(sc: Scratch, plan: Plan, prof: bool) -> Row:
    body = os.urandom(PAYLOAD)
    k, secs = plan.sync_threads, plan.sync_seconds
    qlog_sync_run(sc, 1, secs / 4, body)
    qlog_sync_run(sc, k, secs / 4, body)
    syncs_k: List[float] = []
    syncs_1: List[float] = []
    many, one = interleave(plan.sync_reps, [lambda: qlog_sync_run(sc, k, secs, body, syncs_k),
                                            lambda: qlog_sync_run(sc, 1, secs, body, syncs_1)])
    progress(f"sync: {plan.sync_reps} reps of {secs} s, 1 and {k} threads (qlog)")
    s_many, s_one = interleave(plan.sqlite_sync_reps, [lambda: sqlite_sync_run(sc, k, secs, body),
                                                       lambda: sqlite_sync_run(sc, 1, secs, body)])
    progress(f"sync: {plan.sqlite_sync_reps} reps of {secs} s, 1 and {k} threads (sqlite3)")
    ratios = [a / b for a, b in zip(many, one)]
    s_ratio = median([a / b for a, b in zip(s_many, s_one)])
    r = median(ratios)
    row = Row("sync", f"send(), durability sync, {k} threads vs 1, one Queue",
              f"{k} thr: {fmt_rate(median(many), 'msg/s')}", f"1 thr: {fmt_rate(median(one), 'msg/s')}",
              r, ratios, ">= 8x", r >= 8)
    row.notes += [
        f"{k} threads calling send() on one Queue for {secs} s vs 1 thread; every send returns "
        f"after fdatasync (group commit); {fmt_time(k / median(many))} per send at {k} threads, "
        f"{fmt_time(1 / median(one))} at 1",
        f"sqlite3 with synchronous=FULL (an fsync per commit), {k} threads each with its own "
        f"connection: {fmt_rate(median(s_many), 'msg/s')} vs 1 thread "
        f"{fmt_rate(median(s_one), 'msg/s')} = {s_ratio:.2f}x; qlog at {k} threads is "
        f"{median(many) / median(s_many):.1f}x sqlite3 at {k} threads",
    ]
    if syncs_k and syncs_1:
        fk, f1 = median(syncs_k), median(syncs_1)
        row.notes.append(
            f"fdatasync of the message log: {fk:,.0f}/s at {k} threads ({median(many) / fk:.2f} "
            f"messages and {fmt_time(1 / fk)} each; a send waits {k / median(many) * fk:.2f} of "
            f"them), {f1:,.0f}/s at 1 thread ({fmt_time(1 / f1)} each)")
    row.notes += [
        per_rep(f"qlog {k} threads per rep", many, 1, "msg/s"),
        per_rep("qlog 1 thread per rep", one, 1, "msg/s"),
        per_rep(f"sqlite3 {k} threads per rep", s_many, 1, "msg/s"),
        per_rep("sqlite3 1 thread per rep", s_one, 1, "msg/s"),
    ]
    if prof:
        row.notes.append("no cProfile: the time is spent in the sending threads, waiting on "
                         "fdatasync (see the line above)")
    return row


# ---------------------------------------------------------------- 6: consumer memory

RSS_CHILD = r"""
import json, os, sys
sys.path[:0] = [sys.argv[4], sys.argv[5]]
kind, path, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out

bodies = [os.urandom(100) for _ in range(100)]
if kind == "qlog":
    import qlog
else:
    from queues import SqliteQueue, sqlite_path
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS, so the peak below is the consumer's own
    reset = True
except OSError:
    reset = False
base = status()
got = 0
if kind == "qlog":
    b = qlog.open(path, durability="interval")
    q = b.queue("jobs")
    for _ in range(rounds):
        batch = q.pull(100)
        for m in batch.messages:
            got += len(m.body)
        batch.ack_all()
        q.send_batch(bodies, content_type="bytes")
    backlog = q.stats().backlog
    mid = status()
    b.close()
else:
    sq = SqliteQueue(sqlite_path(path))
    for _ in range(rounds):
        for body in sq.consume(100):
            got += len(body)
        sq.send_batch(bodies)
    backlog = sq.count()
    mid = status()
    sq.close()
print(json.dumps({"base": base, "mid": mid, "end": status(), "reset": reset, "got": got, "backlog": backlog}))
"""


def run_child(code: str, *args: str, timeout: float = 600) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fill_qlog(path: str, n: int, body_list: List[bytes]) -> None:
    with qlog.open(path, durability="none") as b:
        q = b.queue(QUEUE)
        k = len(body_list)
        for _ in range(n // k):
            q.send_batch(body_list, content_type="bytes")
        check(q.stats().backlog == n, "qlog backlog fill")


def fill_sqlite(path: str, n: int, body_list: List[bytes]) -> None:
    sq = SqliteQueue(sqlite_path(path))
    for _ in range(n // len(body_list)):
        sq.send_batch(body_list)
    check(sq.count() == n, "sqlite backlog fill")
    sq.close()


def bench_rss(sc: Scratch, plan: Plan, prof: bool, quick: bool) -> Row:
    bodies = bytes_bodies(1000)
    big_n, small_n = plan.rss_big, plan.rss_small
    rounds = plan.rss_consume // BATCH
    dirs = {(kind, size): sc.path(f"rss-{kind}-{size}")
            for kind in ("qlog", "sqlite") for size in (big_n, small_n)}
    try:
        t0 = time.perf_counter()
        for (kind, size), path in dirs.items():
            (fill_qlog if kind == "qlog" else fill_sqlite)(path, size, bodies)
        progress(f"rss: built backlogs of {big_n:,} and {small_n:,} in {time.perf_counter() - t0:.1f} s")
        res: Dict[Tuple[str, int], List[Dict[str, Any]]] = {key: [] for key in dirs}

        def side(key: Tuple[str, int]) -> Callable[[], float]:
            def run() -> float:
                r = run_child(RSS_CHILD, key[0], dirs[key], str(rounds), ROOT, HERE)
                check(r["got"] == rounds * BATCH * PAYLOAD and r["backlog"] == key[1],
                      f"rss child {key}: {r}")
                res[key].append(r)
                return 0.0
            return run

        interleave(plan.rss_reps, [side(key) for key in dirs])
        sizes = {p: du(p) for p in dirs.values()}
    finally:
        for path in dirs.values():
            remove(path)
    progress(f"rss: {plan.rss_reps} reps of a consumer process per backlog")

    def growth(r: Dict[str, Any]) -> float:
        return max(r["end"]["VmHWM"] - r["base"]["VmRSS"], 0)

    def med(key: Tuple[str, int], f: Callable[[Dict[str, Any]], float]) -> float:
        return median([f(r) for r in res[key]])

    qb, qs = ("qlog", big_n), ("qlog", small_n)
    sb, ss = ("sqlite", big_n), ("sqlite", small_n)
    ratios = [growth(b) / max(growth(s), 1) for b, s in zip(res[qb], res[qs])]
    r = median(ratios)
    peak_ratio = median([b["end"]["VmHWM"] / s["end"]["VmHWM"] for b, s in zip(res[qb], res[qs])])
    mib = 1 << 20
    scaled = " (quick: full run uses 2,000,000)" if quick else ""
    row = Row("rss", f"consumer RSS growth, {big_n:,}-message backlog vs {small_n:,}",
              f"{med(qb, growth) / mib:.1f} MiB", f"{med(qs, growth) / mib:.1f} MiB", r, ratios,
              "<= 1.5x", r <= 1.5)
    row.notes += [
        f"backlog {big_n:,}{scaled} vs {small_n:,} messages of {PAYLOAD} B; a fresh process "
        f"opens the queue and runs {rounds} rounds of pull(100) + len(body) + ack_all + "
        f"send_batch(100) (the backlog stays at its size); growth = peak RSS (VmHWM, reset "
        f"after imports: {res[qb][0]['reset']}) minus VmRSS before qlog.open",
        f"qlog peak RSS {med(qb, lambda x: x['end']['VmHWM']) / mib:.1f} MiB vs "
        f"{med(qs, lambda x: x['end']['VmHWM']) / mib:.1f} MiB ({peak_ratio:.2f}x); before close: "
        f"anon {med(qb, lambda x: x['mid']['RssAnon']) / mib:.1f} vs "
        f"{med(qs, lambda x: x['mid']['RssAnon']) / mib:.1f} MiB, file-backed (mapped log) "
        f"{med(qb, lambda x: x['mid']['RssFile']) / mib:.1f} vs "
        f"{med(qs, lambda x: x['mid']['RssFile']) / mib:.1f} MiB; queue directory "
        f"{sizes[dirs[qb]] / mib:.0f} MiB vs {sizes[dirs[qs]] / mib:.1f} MiB",
        f"sqlite3, same consumer: growth {med(sb, growth) / mib:.1f} MiB vs "
        f"{med(ss, growth) / mib:.1f} MiB, peak {med(sb, lambda x: x['end']['VmHWM']) / mib:.1f} vs "
        f"{med(ss, lambda x: x['end']['VmHWM']) / mib:.1f} MiB; database "
        f"{sizes[dirs[sb]] / mib:.0f} MiB vs {sizes[dirs[ss]] / mib:.1f} MiB",
        per_rep("qlog big growth per rep", [growth(x) for x in res[qb]], 1 / mib, "MiB"),
        per_rep("qlog small growth per rep", [growth(x) for x in res[qs]], 1 / mib, "MiB"),
    ]
    return row


def du(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(d, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


# ---------------------------------------------------------------- 7: reopen

REOPEN_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
import qlog
t0 = time.perf_counter()
b = qlog.open(sys.argv[1])
q = b.queue("jobs")
st = q.stats()
dt = time.perf_counter() - t0
b.close()
print(json.dumps({"seconds": dt, "acked": st.acked, "backlog": st.backlog}))
"""


def build_history(path: str, n: int, bodies: List[bytes]) -> None:
    """n messages sent 1,000 at a time and acked 1,000 at a time."""
    k = len(bodies)
    with qlog.open(path, durability="none") as b:
        q = b.queue(QUEUE)
        for _ in range(n // k):
            q.send_batch(bodies, content_type="bytes")
            q.pull(k).ack_all()
        st = q.stats()
        check(st.acked == n and st.backlog == 0, f"history of {n}: {st}")


def bench_reopen(sc: Scratch, plan: Plan, prof: bool, quick: bool) -> Row:
    bodies = bytes_bodies(1000)
    big_n, small_n = plan.history_big, plan.history_small
    big, small = sc.path("reopen-big"), sc.path("reopen-small")
    try:
        t0 = time.perf_counter()
        build_history(small, small_n, bodies)
        t_small = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_history(big, big_n, bodies)
        t_big = time.perf_counter() - t0
        progress(f"reopen: built histories of {big_n:,} ({t_big:.1f} s) and {small_n:,} "
                 f"({t_small:.2f} s) acked messages")
        sizes = {p: du(p) for p in (big, small)}
        times: Dict[str, List[float]] = {big: [], small: []}

        def side(path: str, n: int) -> Callable[[], float]:
            def run() -> float:
                r = run_child(REOPEN_CHILD, path, ROOT)
                check(r["acked"] == n and r["backlog"] == 0, f"reopened {path}: {r}")
                times[path].append(r["seconds"])
                return r["seconds"]
            return run

        side(big, big_n)()  # warm-up: code paths, page cache
        side(small, small_n)()
        times[big].clear()
        times[small].clear()
        interleave(plan.reopen_reps, [side(big, big_n), side(small, small_n)])
        profile = ""
        if prof:
            def reopen() -> None:
                with qlog.open(big) as b:
                    b.queue(QUEUE).stats()
            profile = profiled(reopen)
    finally:
        remove(big)
        remove(small)
    progress(f"reopen: {plan.reopen_reps} reps per history")
    ratios = [b / s for b, s in zip(times[big], times[small])]
    r = median(ratios)
    scaled = " (quick: full run uses 10,000,000)" if quick else ""
    row = Row("reopen", f"reopen, {big_n:,} acked messages of history vs {small_n:,}",
              fmt_time(median(times[big])), fmt_time(median(times[small])), r, ratios, "<= 2x",
              r <= 2, profile=profile)
    row.notes += [
        f"histories{scaled}: send_batch(1000) + pull(1000) + ack_all, durability none, then "
        f"close; built in {t_big:.1f} s ({big_n / t_big / 1e3:.0f} k msg/s) and {t_small:.2f} s; "
        f"on disk {sizes[big] / (1 << 20):.1f} MiB vs {sizes[small] / (1 << 20):.1f} MiB",
        "timed in a fresh process (after its imports): qlog.open(path) + queue() + stats(); "
        "page cache warm",
        per_rep("big per rep", times[big], 1e3, "ms"),
        per_rep("small per rep", times[small], 1e3, "ms"),
    ]
    return row


# ---------------------------------------------------------------- report


def print_table(rows: List[Row]) -> None:
    print_report(("figure", "qlog", "baseline", "ratio", "target", "result", "persist-queue", "qlog/pq"),
                 [(r.name, r.qlog, r.baseline, f"{r.ratio:.2f}", r.target, "PASS" if r.met else "MISS",
                   r.pq, r.pq_ratio) for r in rows], rows)
    profiles = [r for r in rows if r.profile]
    for r in profiles:
        print(f"\n--- cProfile of the qlog side: {r.name} (sorted by own time)")
        print(r.profile)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a short run: smaller sizes; the backlog row uses 200,000 messages and "
                         "the history row 1,000,000")
    ap.add_argument("--dir", help="where to put data (default: a temporary directory under "
                                  "<repo>/.bench-tmp, removed at the end)")
    ap.add_argument("--only", help=f"comma-separated rows to run, of: {' '.join(ROWS)}")
    ap.add_argument("--profile", action="store_true",
                    help="also run the qlog side of each row once under cProfile")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    only = ROWS if not args.only else tuple(x.strip() for x in args.only.split(",") if x.strip())
    bad = [x for x in only if x not in ROWS]
    if bad:
        ap.error(f"unknown row(s) {', '.join(bad)}; rows are: {' '.join(ROWS)}")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill too
    parent = args.dir or os.path.join(ROOT, ".bench-tmp")
    made_parent = not os.path.exists(parent)
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="queues-", dir=parent)
    t_start = time.perf_counter()
    rows: List[Row] = []
    try:
        info = machine_info(root)
        sc = Scratch(root)
        benches: Dict[str, Callable[[], Optional[Row]]] = {
            "batch": lambda: bench_batch(sc, plan, args.profile),
            "send": lambda: bench_send(sc, plan, args.profile),
            "none": lambda: bench_none(sc, plan, args.profile),
            "pull": lambda: bench_pull(sc, plan, args.profile),
            "json": lambda: bench_json(sc, plan, args.profile),
            "sync": lambda: bench_sync(sc, plan, args.profile),
            "rss": lambda: bench_rss(sc, plan, args.profile, args.quick),
            "reopen": lambda: bench_reopen(sc, plan, args.profile, args.quick),
        }
        for key in ROWS:
            if key in only:
                got = benches[key]()
                if got is not None:
                    rows.append(got)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if made_parent:
            try:
                os.rmdir(parent)
            except OSError:
                pass
    pq = (f"persist-queue {persistqueue.__version__} (SQLiteAckQueue, synchronous=NORMAL)"
          if persistqueue is not None else "persist-queue: not installed (pip install .[bench]); "
                                            "its column is skipped")
    print(f"qlog queue benchmark ({'quick' if args.quick else 'full'}): medians of >= "
          f"{min(plan.reps, plan.rss_reps, plan.reopen_reps, plan.sqlite_sync_reps)} interleaved "
          f"reps; baseline: stdlib sqlite3 {sqlite3.sqlite_version} queue, WAL, synchronous=NORMAL")
    if args.quick:
        print(f"  quick mode: the backlog row uses {plan.rss_big:,} messages (full: "
              f"{FULL.rss_big:,}), the history row {plan.history_big:,} (full: "
              f"{FULL.history_big:,}); other rows use fewer messages per rep")
    for line in info + [pq]:
        print(f"  {line}")
    print()
    print_table(rows)
    print_end(t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
