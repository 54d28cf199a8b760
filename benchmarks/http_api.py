"""qlog over HTTP (``qlog serve``, Cloudflare's Queues API) against the same
operations through the Python API in-process.

    python benchmarks/http_api.py                  # full run (under 2 minutes)
    python benchmarks/http_api.py --quick          # smoke run: one round, small sizes (a few seconds)
    python benchmarks/http_api.py --only batch,pull  # some rows (batch single pull)
    python benchmarks/http_api.py --conns 1,2,4    # connections (client processes) per row (default 1,4)
    python benchmarks/http_api.py --durability none  # both sides (the server through qlog.toml)
    python benchmarks/http_api.py --client httpx   # httpx.Client instead of http.client in the clients
    python benchmarks/http_api.py --no-anatomy     # skip "where the time goes"
    python benchmarks/http_api.py --keep-profiles DIR  # keep py-spy's raw samples of the server
    python benchmarks/http_api.py --server-pythonpath DIR  # prepend DIR to the server's PYTHONPATH
                                               # (e.g. a pip --target with httptools and uvloop)

The script starts a real ``python -m qlog serve DIR --port P`` subprocess
on a free loopback port (local backend, a temporary data directory, bearer
token in ``QLOG_TOKEN``).  ``qlog serve`` has no durability flag: its queues
get qlog's default, "sync" (a push returns after fdatasync); ``--durability``
writes a top-level ``durability`` into the data directory's ``qlog.toml``,
which qlog serve's broker applies to every queue.  Clients are separate
processes (one keep-alive connection each, stdlib ``http.client`` unless
``--client httpx``), so that they share no GIL with each other or this script.
The in-process side runs as many threads on one ``qlog.open()`` broker as
the HTTP side has connections, with the same durability.

Rows: push of batches of 100 (~100-byte JSON bodies, ``/messages/batch``
against ``send_batch``), single pushes (``/messages`` against ``send``),
``pull(100)`` + ack of a backlog pushed beforehand (``/messages/pull`` +
``/messages/ack`` with the lease ids, against ``pull`` + ``ack_all``); every
consumer decodes every body.  The sides alternate which goes first, round
by round; the figures are medians, the ratio the median of per-round ratios
(HTTP / in-process).  2 cores are shared by the server and the clients: the
notes give the CPU of each.  Then "where the time goes": a request that
reaches no qlog code as the floor, the cost of one thread-pool hop, the
server sampled with py-spy (``--nonblocking``), the HTTP rows against two
patched servers whose handlers make fewer thread-pool hops (a
sitecustomize.py on their PYTHONPATH replaces ``run_in_threadpool`` in
qlog/_server/api.py; qlog's files are not changed), and the handler's parts
timed in-process.  This measures; it never fails on a missed target (the
exit status is 0 unless something breaks).
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# This file is benchmarks/http_api.py: with its directory first on sys.path it
# would shadow the standard library's http package (http.client, and
# whatever imports it).  Put the directory last: engine.py is still found.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.append(HERE)

import http.client  # noqa: E402

import qlog  # noqa: E402
from engine import check, fmt_rate, machine_info, median, print_end, print_report, progress  # noqa: E402

BATCH = 100
TOKEN = "bench-token"
ACCOUNT = "bench"
TARGET = 50_000  # msg/s over loopback: batched push, and pull + ack
VT_MS = 30_000
ROWS = ("batch", "single", "pull")


@dataclass(frozen=True)
class Plan:
    rounds: int
    conns: Tuple[int, ...]
    push_seconds: float  # rows batch and single: push for this long
    pull_msgs: int  # row pull: backlog drained per repetition, both sides
    profile_seconds: float  # per operation under py-spy
    floor_requests: int
    whatif_rounds: int
    whatif_seconds: float
    whatif_pull_msgs: int


FULL = Plan(rounds=3, conns=(1, 4), push_seconds=1.5, pull_msgs=50_000, profile_seconds=2.0,
            floor_requests=2_000, whatif_rounds=1, whatif_seconds=1.0, whatif_pull_msgs=30_000)
QUICK = Plan(rounds=1, conns=(1, 4), push_seconds=0.25, pull_msgs=3_000, profile_seconds=0.5,
             floor_requests=300, whatif_rounds=1, whatif_seconds=0.25, whatif_pull_msgs=3_000)


def json_bodies(n: int = BATCH) -> List[Dict[str, Any]]:
    """n distinct dicts of 101 bytes as compact JSON (those of queues.py)."""
    return [{"type": "send_email", "user_id": 100_000 + i, "to": f"user{100_000 + i}@example.com",
             "template": "welcome", "attempt": 1} for i in range(n)]


def compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def batch_request(bodies: Sequence[Any]) -> bytes:
    return compact({"messages": [{"body": b, "content_type": "json"} for b in bodies]})


PULL_REQUEST = compact({"batch_size": BATCH, "visibility_timeout_ms": VT_MS})


# ---------------------------------------------------------------- CPU from /proc


def threads_cpu(pid: int) -> Dict[int, int]:
    """Nanoseconds on CPU of each live thread of ``pid`` (schedstat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def cpu_between(before: Dict[int, int], after: Dict[int, int], only: Optional[int] = None) -> float:
    """CPU seconds between two ``threads_cpu`` snapshots (threads born in
    between count from zero), of every thread or of thread ``only``."""
    return sum(ns - before.get(tid, 0) for tid, ns in after.items() if only is None or tid == only) / 1e9


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What-if variants of the server for "where the time goes": a sitecustomize.py
# on the server's PYTHONPATH replaces run_in_threadpool in qlog/_server/api.py
# (qlog's own code is not changed).
PATCHES = {
    "one-hop": (
        "Api.queue and Api.metrics_of inline on the event loop, the queue call still on the thread pool",
        "import qlog._server.api as _api\n"
        "_real = _api.run_in_threadpool\n"
        "async def _run(fn, *args, **kwargs):\n"
        "    if isinstance(getattr(fn, '__self__', None), _api.Api) and fn.__name__ in ('queue', 'metrics_of'):\n"
        "        return fn(*args, **kwargs)\n"
        "    return await _real(fn, *args, **kwargs)\n"
        "_api.run_in_threadpool = _run\n"),
    "no-hop": (
        "every call of the handlers inline on the event loop (an fdatasync then stalls the loop)",
        "import qlog._server.api as _api\n"
        "async def _run(fn, *args, **kwargs):\n"
        "    return fn(*args, **kwargs)\n"
        "_api.run_in_threadpool = _run\n"),
}


class Server:
    """``python -m qlog serve DIR --port P`` in a subprocess, and an admin
    connection of this process to it."""

    def __init__(self, root: str, durability: str, pythonpath: Optional[str], patch: Optional[str] = None) -> None:
        name = "served" if patch is None else f"served-{patch}"
        self.dir = os.path.join(root, name)
        if patch is not None:
            pdir = os.path.join(root, f"patch-{patch}")
            os.makedirs(pdir, exist_ok=True)
            with open(os.path.join(pdir, "sitecustomize.py"), "w") as f:
                f.write(PATCHES[patch][1])
            pythonpath = os.pathsep.join(x for x in (pdir, pythonpath) if x)
        if durability != "sync":  # qlog serve has no flag for it: qlog.toml of the data directory
            qlog.open(self.dir).close()
            with open(os.path.join(self.dir, "qlog.toml"), "w") as f:
                f.write(f'durability = "{durability}"\n')
            b = qlog.open(self.dir)
            try:
                check(b.queue("probe").durability == durability, "qlog.toml durability taken")
                b.delete_queue("probe", force=True)
            finally:
                b.close()
        self.port = free_port()
        env = dict(os.environ, QLOG_TOKEN=TOKEN)
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(x for x in (pythonpath, ROOT, env.get("PYTHONPATH")) if x)
        else:
            env["PYTHONPATH"] = os.pathsep.join(x for x in (ROOT, env.get("PYTHONPATH")) if x)
        self.env = env
        self.log = open(os.path.join(root, f"{name}.log"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qlog", "serve", self.dir, "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, cwd=root, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.conn: Optional[http.client.HTTPConnection] = None
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qlog serve exited with {self.proc.returncode}: {self.output()}")
            try:
                self.request("GET", self.base)
                break
            except OSError:
                self.conn = None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"qlog serve did not answer in 30 s: {self.output()}") from None
                time.sleep(0.05)
        self.stack = self._stack()
        check((patch is not None) == ("[patched" in self.stack), f"server patch {patch} in place: {self.stack}")

    base = f"/client/v4/accounts/{ACCOUNT}/queues"

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().strip()

    def _stack(self) -> str:
        code = ("import uvicorn, h11, starlette, importlib.metadata as md\n"
                "try:\n import httptools; h = 'httptools ' + httptools.__version__\n"
                "except ImportError:\n h = 'h11 ' + h11.__version__\n"
                "try:\n import uvloop; lp = 'uvloop ' + uvloop.__version__\n"
                "except ImportError:\n lp = 'asyncio'\n"
                "import qlog._server.api as api\n"
                "p = ' [patched: ' + api.run_in_threadpool.__module__ + ']' "
                "if api.run_in_threadpool.__module__ == 'sitecustomize' else ''\n"
                "print(f'uvicorn {uvicorn.__version__} (HTTP parser {h}, loop {lp}), starlette "
                "{starlette.__version__}, anyio {md.version(\"anyio\")}{p}')")
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True)
        return out.stdout.strip() or out.stderr.strip()

    def request(self, method: str, path: str, doc: Any = None, ok: Tuple[int, ...] = (200,)) -> Any:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        body = None if doc is None else compact(doc)
        self.conn.request(method, path, body, {"authorization": f"Bearer {TOKEN}",
                                               "content-type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        if r.status not in ok:
            raise RuntimeError(f"{method} {path}: HTTP {r.status}: {data[:300]!r}")
        return json.loads(data) if data else None

    def create(self, name: str) -> str:
        self.request("POST", self.base, {"queue_name": name})
        return f"{self.base}/{name}"

    def delete(self, name: str) -> None:
        self.request("DELETE", f"{self.base}/{name}")

    def cpu(self) -> Dict[int, int]:
        """A snapshot of the server's CPU, for ``cpu_between``: the main thread is the event loop."""
        return threads_cpu(self.pid)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------- client processes


class Connection:
    """A client's keep-alive connection: stdlib http.client or httpx."""

    def __init__(self, port: int, kind: str) -> None:
        self.kind = kind
        self.headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
        self.conn: Any = None
        self.connect(port)

    def connect(self, port: int) -> None:
        self.close()
        if self.kind == "httpx":
            import httpx

            self.conn = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=self.headers, timeout=60)
        else:
            self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            self.conn.connect()
            # http.client sends the headers and the body with two send()s: do not hold the body back
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = port

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, body: Optional[bytes] = None) -> Tuple[int, bytes]:
        if self.kind == "httpx":
            r = self.conn.request(method, path, content=body)
            return r.status_code, r.content
        self.conn.request(method, path, body, self.headers)
        r = self.conn.getresponse()
        return r.status, r.read()


def client_main(pipe: Any, port: int, kind: str) -> None:
    """One client process: one keep-alive connection, commands from ``pipe``."""
    conn = Connection(port, kind)

    def post(path: str, body: bytes) -> bytes:
        status, data = conn.request("POST", path, body)
        if status != 200:
            raise RuntimeError(f"POST {path}: HTTP {status}: {data[:300]!r}")
        return data

    def get(path: str) -> int:
        return conn.request("GET", path)[0]

    def reconnect() -> None:
        conn.connect(conn.port)

    loads, b64decode = json.loads, base64.b64decode
    last = time.monotonic()
    pipe.send("ready")
    while True:
        cmd = pipe.recv()
        op = cmd[0]
        if op == "quit":
            return
        if time.monotonic() - last > 1.0:  # uvicorn closes a connection idle for 5 s
            reconnect()
        c0 = time.process_time()
        n = reqs = 0
        try:
            if op == "push":  # ("push", path, [request bodies], messages per request, t0, seconds)
                _, path, bodies, per, t0, seconds = cmd
                time.sleep(max(0.0, t0 - time.monotonic()))
                end = t0 + seconds
                k = len(bodies)
                while time.monotonic() < end:
                    post(path, bodies[reqs % k])
                    reqs += 1
                n = reqs * per
            elif op == "fill":  # ("fill", path, request body, requests)
                _, path, body, count = cmd
                for _ in range(count):
                    post(path, body)
                reqs = count
            elif op == "pull":  # ("pull", queue path, t0): drain until a pull comes back empty
                _, qpath, t0 = cmd
                time.sleep(max(0.0, t0 - time.monotonic()))
                while True:
                    got = loads(post(qpath + "/messages/pull", PULL_REQUEST))["result"]["messages"]
                    reqs += 1
                    if not got:
                        break
                    for m in got:
                        loads(b64decode(m["body"]))  # every body decoded, as m.body does in-process
                    acks = [{"lease_id": m["lease_id"]} for m in got]
                    res = loads(post(qpath + "/messages/ack", compact({"acks": acks, "retries": []})))
                    reqs += 1
                    if res["result"]["ackCount"] != len(got):
                        raise RuntimeError(f"ack of {len(got)} acked {res['result']['ackCount']}")
                    n += len(got)
            elif op == "port":  # ("port", port): another server from now on
                conn.connect(cmd[1])
            elif op == "get":  # ("get", path, requests): the floor
                _, path, count = cmd
                for _ in range(count):
                    get(path)
                reqs = count
            else:
                raise ValueError(op)
        except Exception as e:  # reported to the parent, which raises
            pipe.send({"error": f"{type(e).__name__}: {e}"})
            last = 0.0
            continue
        last = time.monotonic()
        pipe.send({"msgs": n, "reqs": reqs, "end": last, "cpu": time.process_time() - c0})


class Clients:
    def __init__(self, n: int, port: int, kind: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes = []
        self.procs = []
        for _ in range(n):
            a, b = ctx.Pipe()
            p = ctx.Process(target=client_main, args=(b, port, kind), daemon=True)
            p.start()
            self.pipes.append(a)
            self.procs.append(p)
        for pipe in self.pipes:  # started, imported and connected
            check(pipe.recv() == "ready", "client process ready")

    def use(self, port: int) -> None:
        """Connect every client to the server on ``port``."""
        self.run([("port", port)] * len(self.pipes))

    def run(self, cmds: Sequence[Tuple[Any, ...]]) -> List[Dict[str, Any]]:
        """One command per client (the first len(cmds) clients); their results."""
        for pipe, cmd in zip(self.pipes, cmds):
            pipe.send(cmd)
        out = [pipe.recv() for pipe in self.pipes[:len(cmds)]]
        for r in out:
            if "error" in r:
                raise RuntimeError(f"client: {r['error']}")
        return out

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("quit",))
            except OSError:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()


# ---------------------------------------------------------------- one measurement each side


@dataclass
class Run:
    rate: float  # msg/s
    msgs: int
    wall: float
    reqs: int = 0
    server_cpu: float = 0.0  # seconds, whole process
    server_loop_cpu: float = 0.0  # seconds, main thread
    client_cpu: float = 0.0  # seconds, all clients (or the in-process side's process)


def http_run(srv: Server, cl: Clients, cmds: List[Tuple[Any, ...]], t0: float) -> Run:
    c0 = srv.cpu()
    res = cl.run(cmds)
    c1 = srv.cpu()
    msgs = sum(r["msgs"] for r in res)
    check(msgs > 0, "the clients sent or pulled something")
    wall = max(r["end"] for r in res) - t0
    return Run(msgs / wall, msgs, wall, sum(r["reqs"] for r in res), cpu_between(c0, c1),
               cpu_between(c0, c1, srv.pid), sum(r["cpu"] for r in res))


class InProc:
    """The in-process side: a fresh data directory per repetition."""

    def __init__(self, root: str, durability: str) -> None:
        self.root = root
        self.durability = durability
        self.k = 0

    def open(self) -> Tuple[Any, Any, str]:
        self.k += 1
        d = os.path.join(self.root, f"inproc-{self.k}")
        b = qlog.open(d, durability=self.durability)
        return b, b.queue("jobs"), d

    @staticmethod
    def threads(n: int, body: Callable[[int], int]) -> Run:
        """``body(i)`` on n threads from a common start; msg/s over the slowest."""
        counts = [0] * n
        ends = [0.0] * n
        errs: List[BaseException] = []
        barrier = threading.Barrier(n + 1)

        def work(i: int) -> None:
            barrier.wait()
            try:
                counts[i] = body(i)
            except BaseException as e:  # re-raised below
                errs.append(e)
            ends[i] = time.monotonic()

        ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        c0 = time.process_time()
        t0 = time.monotonic()
        barrier.wait()
        for t in ts:
            t.join()
        cpu = time.process_time() - c0
        if errs:
            raise errs[0]
        wall = max(ends) - t0
        return Run(sum(counts) / wall, sum(counts), wall, client_cpu=cpu)


# ---------------------------------------------------------------- the rows


@dataclass
class Row:
    key: str
    conns: int
    name: str
    http: List[Run] = field(default_factory=list)
    inproc: List[Run] = field(default_factory=list)
    ratios: List[float] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def http_rate(self) -> float:
        return median([r.rate for r in self.http])

    @property
    def inproc_rate(self) -> float:
        return median([r.rate for r in self.inproc])

    @property
    def ratio(self) -> float:
        return median(self.ratios)


class Bench:
    def __init__(self, srv: Server, cl: Clients, inproc: InProc, plan: Plan) -> None:
        self.srv, self.cl, self.inproc, self.plan = srv, cl, inproc, plan
        self.bodies = json_bodies()
        self.batch_req = batch_request(self.bodies)
        self.single_reqs = [compact({"body": b, "content_type": "json"}) for b in self.bodies]
        self.k = 0

    def qname(self, key: str) -> str:
        self.k += 1
        return f"{key}-{self.k}"

    # -- HTTP

    def http_push(self, conns: int, single: bool, seconds: float, srv: Optional[Server] = None) -> Run:
        srv = srv or self.srv
        name = self.qname("single" if single else "batch")
        path = srv.create(name) + ("/messages" if single else "/messages/batch")
        try:
            t0 = time.monotonic() + 0.05
            reqs = self.single_reqs if single else [self.batch_req]
            per = 1 if single else BATCH
            return http_run(srv, self.cl, [("push", path, reqs, per, t0, seconds)] * conns, t0)
        finally:
            srv.delete(name)

    def http_fill(self, qpath: str, msgs: int) -> None:
        """Push ``msgs`` (a multiple of 100) through every client, untimed."""
        n = len(self.cl.pipes)
        reqs = msgs // BATCH
        share = [reqs // n + (1 if i < reqs % n else 0) for i in range(n)]
        self.cl.run([("fill", qpath + "/messages/batch", self.batch_req, s) for s in share])

    def http_pull(self, conns: int, msgs: int, srv: Optional[Server] = None) -> Run:
        srv = srv or self.srv
        name = self.qname("pull")
        qpath = srv.create(name)
        try:
            self.http_fill(qpath, msgs)
            t0 = time.monotonic() + 0.05
            run = http_run(srv, self.cl, [("pull", qpath, t0)] * conns, t0)
            check(run.msgs == msgs, f"HTTP pull drained {run.msgs} of {msgs}")
            return run
        finally:
            srv.delete(name)

    # -- in-process

    def inproc_push(self, conns: int, single: bool, seconds: float) -> Run:
        b, q, d = self.inproc.open()
        bodies = self.bodies
        try:
            def body(_: int) -> int:
                end = time.monotonic() + seconds
                n = 0
                if single:
                    send = q.send
                    while time.monotonic() < end:
                        send(bodies[n % BATCH])
                        n += 1
                else:
                    send_batch = q.send_batch
                    while time.monotonic() < end:
                        send_batch(bodies)
                        n += BATCH
                return n

            return InProc.threads(conns, body)
        finally:
            b.close()
            shutil.rmtree(d, ignore_errors=True)

    def inproc_pull(self, conns: int, msgs: int) -> Run:
        b, q, d = self.inproc.open()
        try:
            for _ in range(msgs // BATCH):
                q.send_batch(self.bodies)

            def body(_: int) -> int:
                n = 0
                while True:
                    batch = q.pull(BATCH, VT_MS / 1000)
                    if not batch.messages:
                        return n
                    for m in batch.messages:
                        m.body
                    batch.ack_all()
                    n += len(batch.messages)

            run = InProc.threads(conns, body)
            check(run.msgs == msgs, f"in-process pull drained {run.msgs} of {msgs}")
            return run
        finally:
            b.close()
            shutil.rmtree(d, ignore_errors=True)

    def sides(self, key: str, conns: int) -> Tuple[Callable[[], Run], Callable[[], Run]]:
        p = self.plan
        if key == "pull":
            return lambda: self.http_pull(conns, p.pull_msgs), lambda: self.inproc_pull(conns, p.pull_msgs)
        single = key == "single"
        return (lambda: self.http_push(conns, single, p.push_seconds),
                lambda: self.inproc_push(conns, single, p.push_seconds))


ROW_NAMES = {"batch": "push batch(100)", "single": "single push", "pull": "pull(100) + ack"}
API_NAMES = {"batch": "send_batch(100)", "single": "send()", "pull": "pull(100) + ack_all()"}


def run_rows(bench: Bench, plan: Plan, only: Sequence[str]) -> List[Row]:
    rows = [Row(key, c, f"{ROW_NAMES[key]}, {c} conn{'s' if c > 1 else ''}") for key in ROWS if key in only
            for c in plan.conns]
    for rnd in range(plan.rounds):
        for row in rows:
            progress(f"round {rnd + 1}/{plan.rounds}: {row.name}")
            h, i = bench.sides(row.key, row.conns)
            if rnd % 2 == 0:
                a, b = h(), i()
            else:
                b, a = i(), h()
            row.http.append(a)
            row.inproc.append(b)
            row.ratios.append(a.rate / b.rate)
    per_msg = 1e6  # us
    for row in rows:
        unit = {"batch": ", {:.0f} us per request of 100", "single": "",
                "pull": ", {:.0f} us per pull(100) + ack(100)"}[row.key]
        row.notes.append("HTTP msg/s per round: " + " ".join(fmt_rate(r.rate, "") for r in row.http)
                         + "; in-process: " + " ".join(fmt_rate(r.rate, "") for r in row.inproc))
        srv_us = median([r.server_cpu / r.msgs * per_msg for r in row.http])
        loop_us = median([r.server_loop_cpu / r.msgs * per_msg for r in row.http])
        cli_us = median([r.client_cpu / r.msgs * per_msg for r in row.http])
        srv_cores = median([r.server_cpu / r.wall for r in row.http])
        cli_cores = median([r.client_cpu / r.wall for r in row.http])
        rq = median([r.msgs / r.reqs for r in row.http])
        row.notes.append(
            f"HTTP CPU: server {srv_us:.1f} us/msg{unit.format(srv_us * BATCH)} ({loop_us:.1f} on the event loop thread, "
            f"{srv_us - loop_us:.1f} on the thread pool), {srv_cores:.2f} cores; clients {cli_us:.1f} us/msg, "
            f"{cli_cores:.2f} cores; {rq:.1f} msg per request")
        ip_us = median([r.client_cpu / r.msgs * per_msg for r in row.inproc])
        ip_cores = median([r.client_cpu / r.wall for r in row.inproc])
        row.notes.append(f"in-process CPU: {ip_us:.1f} us/msg, {ip_cores:.2f} cores ({API_NAMES[row.key]} on "
                         f"{row.conns} thread{'s' if row.conns > 1 else ''})")
    return rows


# ---------------------------------------------------------------- where the time goes

CORE_FILES = ("qlog/_queue.py", "qlog/_message.py", "qlog/_backend.py", "qlog/_settings.py", "qlog/_local/",
              "qlog/_log/", "qlog/errors.py",
              "backend.py", "_local/", "_log/")  # py-spy shows qlog/_local/backend.py as backend.py
HOP_FUNCS = ("call_soon_threadsafe", "_write_to_self", "_read_from_self", "_process_self_data")
RATE = 250  # py-spy samples per second
# py-spy takes these for busy: a worker thread waiting for work, the loop in epoll_wait
IDLE_LEAVES = {("wait", "threading.py"), ("select", "selectors.py"), ("_wait_for_tstate_lock", "threading.py")}
CATEGORIES = (
    "qlog queue call (send_batch / send / pull / settle)",
    "Api.queue (name lookup: broker.queues())",
    "Api.metrics_of (backlog metrics of the response)",
    "message_doc (base64 of bodies, ids, timestamps)",
    "request validation (_send_request + MessageSendRequest, _lease)",
    "JSON parse of the request (json.loads)",
    "JSON encode of the response (json.dumps)",
    "thread-pool hops (anyio run_sync, loop wake-ups)",
    "HTTP/1.1 protocol (uvicorn's h11 or httptools, h11)",
    "ASGI stack (Starlette routing, middleware, Request/Response, auth)",
    "event loop and socket I/O (asyncio)",
    "other",
)


def classify(frames: Sequence[Tuple[str, str]]) -> int:
    """The category of one sample: ``frames`` are (function, file), root first."""
    files = [p for _, p in frames]

    def has(pred: Callable[[str, str], bool]) -> bool:
        return any(pred(f, p) for f, p in frames)

    if has(lambda f, p: f.endswith("message_doc")):
        return 3
    if has(lambda f, p: f == "Api.queue"):
        return 1
    if has(lambda f, p: f in ("Api.metrics_of", "Api.fresh_metrics")):
        return 2
    if has(lambda f, p: f in ("Api._send_request", "_lease", "_number", "_object")):
        return 4
    if any(p.startswith(CORE_FILES) for p in files):
        return 0
    if has(lambda f, p: p.startswith("json/decoder") or (f == "loads" and p.startswith("json/"))):
        return 5
    if has(lambda f, p: p.startswith("json/encoder") or (f == "dumps" and p.startswith("json/"))
           or f in ("envelope", "error_response")):
        return 6
    if has(lambda f, p: p.startswith(("anyio/", "starlette/concurrency", "concurrent/")) or f.endswith(HOP_FUNCS)):
        return 7
    for f, p in reversed(frames):
        if p.startswith(("h11/", "httptools/", "uvicorn/protocols/")):
            return 8
        if p.startswith(("starlette/", "uvicorn/", "qlog/_server/")):
            return 9
        if p.startswith(("asyncio/", "selectors", "socket", "uvloop/")):
            return 10
    return 11


def parse_frame(frame: str) -> Tuple[str, str]:
    """py-spy's ``func (path/file.py:line)`` as (func, shortened path)."""
    func, _, rest = frame.rpartition(" (")
    path = rest.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3":
                path = path.split("/", 1)[1] if "/" in path else path
    return func or frame, path


@dataclass
class Profile:
    run: Run
    loop: Counter  # category -> busy samples of the event loop (main) thread
    pool: Counter  # category -> busy samples of the thread-pool threads
    idle: int
    note: str = ""


def pyspy_profile(srv: Server, out: str, work: Callable[[], Run], keep: Optional[str]) -> Profile:
    """Run ``work`` with py-spy recording the server; busy samples by
    thread and category."""
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        return Profile(work(), Counter(), Counter(), 0, "py-spy not found")
    spy = subprocess.Popen([exe, "record", "--pid", str(srv.pid), "--rate", str(RATE), "--format", "raw",
                            "--output", out, "--duration", "600", "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)  # attached
    try:
        run = work()
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    prof = Profile(run, Counter(), Counter(), 0)
    if not os.path.exists(out):
        prof.note = f"py-spy wrote nothing: {err.strip()[-300:]}"
        return prof
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(out, keep)
    with open(out) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                continue
            frames = [parse_frame(x) for x in stack.split(";")]
            func, path = frames[-1]
            if (func.rpartition(".")[2], path) in IDLE_LEAVES:
                prof.idle += int(n)
                continue
            pool = any(f == "Thread._bootstrap" for f, _ in frames)
            (prof.pool if pool else prof.loop)[classify(frames)] += int(n)
    if not prof.loop and not prof.pool:
        prof.note = "py-spy took no busy samples"
    return prof


def hop_cost(n: int) -> Tuple[float, float]:
    """Wall and CPU microseconds of one ``await run_in_threadpool(noop)``
    on an idle asyncio loop (what every hop of the server's handlers pays)."""
    import anyio
    from starlette.concurrency import run_in_threadpool

    async def main() -> Tuple[float, float]:
        for _ in range(50):
            await run_in_threadpool(int)
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            await run_in_threadpool(int)
        return (time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6

    return anyio.run(main)


def timeit_us(fn: Callable[[], Any], seconds: float = 0.15) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return dt / n * 1e6


def handler_parts(root: str, durability: str, backlog: int) -> List[Tuple[str, float]]:
    """The server's own functions (qlog/_server/api.py) on one request's
    data, timed in this process without HTTP."""
    from qlog._server.api import Api, envelope, message_doc

    b = qlog.open(os.path.join(root, "parts"), durability=durability)
    try:
        q = b.queue("jobs")
        api = Api(b, 8 << 20)
        bodies = json_bodies()
        raw = batch_request(bodies)
        doc = json.loads(raw)
        out: List[Tuple[str, float]] = []
        out.append((f"json.loads of a push batch(100) request ({len(raw):,} bytes)", timeit_us(lambda: json.loads(raw))))
        try:
            import orjson  # not a dependency: shown where it is importable

            out.append(("  the same with orjson.loads", timeit_us(lambda: orjson.loads(raw))))
        except ImportError:
            pass
        out.append(("MessageSendRequest(body, content_type='json') x 100 (what the push routes build)",
                    timeit_us(lambda: [qlog.MessageSendRequest(m["body"], content_type="json")
                                       for m in doc["messages"]])))
        out.append(("Api.queue('jobs') (broker.queues() lists the queues)", timeit_us(lambda: api.queue("jobs"))))
        out.append(("Api.metrics_of(q), cached bytes (count_bytes=False)", timeit_us(lambda: api.metrics_of(q))))
        for _ in range(backlog // 1000):
            q.send_batch(bodies * 10)
        out.append((f"q.metrics(count_bytes=True) on a {backlog:,}-message backlog (at most once a second)",
                    timeit_us(lambda: q.metrics(count_bytes=True), 0.3)))
        batch = q.pull(BATCH, VT_MS / 1000)
        msgs = batch.messages
        out.append(("message_doc x 100 (base64, id, timestamp_ms, lease_id)",
                    timeit_us(lambda: [message_doc(m) for m in msgs])))
        docs = [message_doc(m) for m in msgs]
        out.append(("  of which base64.b64encode(m.raw_body).decode() x 100",
                    timeit_us(lambda: [base64.b64encode(m.raw_body).decode("ascii") for m in msgs])))
        out.append(("  of which int(m.timestamp.timestamp() * 1000) x 100",
                    timeit_us(lambda: [int(m.timestamp.timestamp() * 1000) for m in msgs])))
        result = {"messages": docs, "message_backlog_count": 0, "metadata": {"metrics": {}}}
        out.append(("envelope() of a pull(100) result (json.dumps)", timeit_us(lambda: envelope(result))))
        try:
            import orjson

            out.append(("  the same with orjson.dumps", timeit_us(lambda: orjson.dumps(result))))
        except ImportError:
            pass
        ack_raw = compact({"acks": [{"lease_id": m.lease_id} for m in msgs], "retries": []})
        out.append((f"json.loads of an ack(100) request ({len(ack_raw):,} bytes)", timeit_us(lambda: json.loads(ack_raw))))
        batch.ack_all()

        n_pulls = 300

        def pulls(settle: bool) -> float:
            """us per pull(100) + ack of a full batch, over n_pulls of them."""
            for _ in range(n_pulls // 10):
                q.send_batch(bodies * 10)
            t0 = time.perf_counter()
            for _ in range(n_pulls):
                got = q.pull(BATCH, VT_MS / 1000)
                if settle:  # what the pull and ack routes call
                    q.settle(acks=[m.lease_id for m in got.messages], retries=[])
                else:
                    got.ack_all()
                check(len(got.messages) == BATCH, "a full batch pulled")
            return (time.perf_counter() - t0) / n_pulls * 1e6

        out.append(("q.pull(100) + q.settle(acks=lease ids) (the routes' calls)", pulls(True)))
        out.append(("q.pull(100) + ack_all() (in-process)", pulls(False)))
        return out
    finally:
        b.close()


def what_if(bench: Bench, plan: Plan, root: str, only: Sequence[str], durability: str,
            pythonpath: Optional[str]) -> List[str]:
    """The HTTP rows against servers whose handlers make fewer thread-pool
    hops (PATCHES), back to back with the server as it is."""
    conns = max(plan.conns)
    servers: List[Tuple[str, Server]] = [("as served", bench.srv)]
    try:
        for name in PATCHES:
            servers.append((name, Server(root, durability, pythonpath, patch=name)))
        rates: Dict[Tuple[str, str], List[float]] = {}
        for rnd in range(plan.whatif_rounds):
            for key in ROWS:
                if key not in only:
                    continue
                order = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
                for name, srv in order:
                    progress(f"where the time goes: what-if, {key}, {name}")
                    bench.cl.use(srv.port)
                    if key == "pull":
                        run = bench.http_pull(conns, plan.whatif_pull_msgs, srv)
                    else:
                        run = bench.http_push(conns, key == "single", plan.whatif_seconds, srv)
                    rates.setdefault((key, name), []).append(run.rate)
    finally:
        bench.cl.use(bench.srv.port)
        for name, srv in servers[1:]:
            srv.close()
    lines = ["", f"what-if: the HTTP rows, {conns} conns, against qlog serve with its handlers' "
             "run_in_threadpool replaced (a sitecustomize.py on the server's PYTHONPATH; qlog's code unchanged), "
             f"{plan.whatif_rounds} round(s), the servers in turn:"]
    for name, _ in servers[1:]:
        lines.append(f"  {name}: {PATCHES[name][0]}")
    head = ["row"] + [n for n, _ in servers]
    cells = []
    for key in ROWS:
        if key in only:
            base_rate = median(rates[(key, "as served")])
            cells.append([ROW_NAMES[key]] + [
                fmt_rate(median(rates[(key, n)]), "msg/s") + ("" if n == "as served" else
                                                               f" ({median(rates[(key, n)]) / base_rate:.2f}x)")
                for n, _ in servers])
    w = [max(len(c[i]) for c in [head] + cells) for i in range(len(head))]
    lines.append("  " + "  ".join(h.ljust(x) if i == 0 else h.rjust(x) for i, (h, x) in enumerate(zip(head, w))))
    for c in cells:
        lines.append("  " + "  ".join(v.ljust(x) if i == 0 else v.rjust(x) for i, (v, x) in enumerate(zip(c, w))))
    return lines


def anatomy(bench: Bench, plan: Plan, root: str, only: Sequence[str], durability: str,
            keep: Optional[str], pythonpath: Optional[str]) -> List[str]:
    srv, cl = bench.srv, bench.cl
    lines: List[str] = []
    conns = max(plan.conns)
    # the floor: a request that is refused by the router (auth, routing, 404), no qlog code, no hop
    progress("where the time goes: floor")
    c0 = srv.cpu()
    res = cl.run([("get", "/client/v4/none", plan.floor_requests)])[0]
    floor = cpu_between(c0, srv.cpu()) / res["reqs"] * 1e6
    cfloor = res["cpu"] / res["reqs"] * 1e6
    hop_wall, hop_cpu = hop_cost(2000 if plan is FULL else 300)
    lines.append(f"floor: GET /client/v4/none (bearer check, routing, a 404 envelope; no qlog call, no thread "
                 f"hop), 1 conn: {floor:.0f} us of server CPU per request (client {cfloor:.0f} us)")
    lines.append(f"one thread-pool hop (await run_in_threadpool(int) on an idle loop, this process): "
                 f"{hop_wall:.0f} us wall, {hop_cpu:.0f} us CPU; push and push batch make 3 hops (Api.queue, "
                 "send_batch, metrics_of), pull 3 (Api.queue, pull, metrics_of), ack 2 (Api.queue, settle)")
    lines.append("")
    units = {"batch": "push batch(100) request", "single": "push request", "pull": "pull(100) + ack(100)"}
    profiles: List[Tuple[str, Profile, float]] = []
    for key in ROWS:
        if key not in only:
            continue
        progress(f"where the time goes: py-spy, {key}")
        if key == "pull":
            name = bench.qname("prof-pull")
            qpath = srv.create(name)
            bench.http_fill(qpath, plan.pull_msgs)

            def work() -> Run:
                t0 = time.monotonic() + 0.05
                return http_run(srv, cl, [("pull", qpath, t0)] * conns, t0)
        else:
            name = bench.qname("prof-" + key)
            single = key == "single"
            path = srv.create(name) + ("/messages" if single else "/messages/batch")

            def work() -> Run:
                t0 = time.monotonic() + 0.05
                reqs = bench.single_reqs if single else [bench.batch_req]
                return http_run(srv, cl, [("push", path, reqs, 1 if single else BATCH, t0,
                                           plan.profile_seconds)] * conns, t0)
        try:
            prof = pyspy_profile(srv, os.path.join(root, f"pyspy-{key}.txt"), work, keep)
        finally:
            srv.delete(name)
        run = prof.run
        n_units = run.msgs / BATCH if key == "pull" else run.reqs
        profiles.append((key, prof, n_units))
        loop_us = run.server_loop_cpu / n_units * 1e6
        pool_us = (run.server_cpu - run.server_loop_cpu) / n_units * 1e6
        lines.append(f"  {ROW_NAMES[key]}: {fmt_rate(run.rate, 'msg/s')} under py-spy; server CPU per "
                     f"{units[key]}: {loop_us + pool_us:.0f} us ({loop_us:.0f} event loop thread, {pool_us:.0f} "
                     f"thread pool); busy samples: loop {sum(prof.loop.values())}, pool {sum(prof.pool.values())} "
                     f"(over {sum(prof.pool.values()) / RATE / n_units * 1e6:.0f} us per {units[key]}), "
                     f"{prof.idle} idle dropped{'; ' + prof.note if prof.note else ''}")
    profiles = [p for p in profiles if p[1].loop or p[1].pool]
    if profiles:
        lines.append("")
        lines.append("  us per unit: [loop] rows share the event loop thread's measured CPU by its samples; [pool] "
                     f"rows are the thread pool's busy samples at {RATE} Hz (wall time: a thread in fdatasync or "
                     "waiting for the GIL is busy to py-spy)")
        head = ["part of the server"] + [f"{ROW_NAMES[k]}" for k, *_ in profiles]
        cats = [("loop", i) for i in range(len(CATEGORIES))] + [("pool", i) for i in range(len(CATEGORIES))]
        names = [f"[{t}] {CATEGORIES[i]}" for t, i in cats]
        w0 = max(len(x) for x in names + [head[0]])
        widths = [max(len(h), 12) for h in head[1:]]
        lines.append("  " + head[0].ljust(w0) + "  " + "  ".join(h.rjust(w) for h, w in zip(head[1:], widths)))
        totals = [0.0] * len(profiles)
        for (t, i), label in zip(cats, names):
            cells = []
            shown = False
            for j, (key, prof, n_units) in enumerate(profiles):
                c = prof.loop if t == "loop" else prof.pool
                if t == "loop":
                    us = c[i] / max(1, sum(c.values())) * prof.run.server_loop_cpu / n_units * 1e6
                else:
                    us = c[i] / RATE / n_units * 1e6
                totals[j] += us
                shown = shown or us >= 5
                cells.append(f"{us:.0f}")
            if shown:
                lines.append("  " + label.ljust(w0) + "  " + "  ".join(x.rjust(w) for x, w in zip(cells, widths)))
        lines.append("  " + "total".ljust(w0) + "  " + "  ".join(f"{x:.0f}".rjust(w) for x, w in zip(totals, widths)))
    lines.extend(what_if(bench, plan, root, only, durability, pythonpath))
    progress("where the time goes: the handler's parts in-process")
    lines.append("")
    lines.append("the handler's parts, timed in this process on one request's data (us per call):")
    for what, us in handler_parts(root, durability, 100_000 if plan is FULL else 20_000):
        lines.append(f"  {what}: {us:.0f} us")
    return lines


# ---------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: one round, small sizes")
    ap.add_argument("--only", help=f"comma-separated rows to run, of: {' '.join(ROWS)}")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per row (default 3, quick 1)")
    ap.add_argument("--conns", help="comma-separated connection counts per row (default 1,4)")
    ap.add_argument("--durability", choices=("sync", "interval", "none"), default="sync",
                    help="of both sides (default sync, qlog serve's; set in the served directory's qlog.toml)")
    ap.add_argument("--client", choices=("stdlib", "httpx"), default="stdlib",
                    help="HTTP client of the client processes (default stdlib http.client)")
    ap.add_argument("--server-pythonpath", metavar="DIR", help="prepend DIR to the server's PYTHONPATH")
    ap.add_argument("--no-anatomy", action="store_true", help='skip "where the time goes"')
    ap.add_argument("--keep-profiles", metavar="DIR", help="copy py-spy's raw samples of the server into DIR")
    ap.add_argument("--dir", help="scratch directory (default <repo>/.bench-tmp; removed at the end)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds})
    if args.conns:
        plan = Plan(**{**plan.__dict__, "conns": tuple(int(x) for x in args.conns.split(","))})
    only = ROWS if not args.only else tuple(x.strip() for x in args.only.split(",") if x.strip())
    bad = [x for x in only if x not in ROWS]
    if bad:
        ap.error(f"unknown row(s) {', '.join(bad)}; rows are: {' '.join(ROWS)}")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the server and scratch are removed on kill too
    t_start = time.perf_counter()
    base = args.dir or os.path.join(ROOT, ".bench-tmp")
    os.makedirs(base, exist_ok=True)
    root = tempfile.mkdtemp(prefix="http-", dir=base)
    srv: Optional[Server] = None
    cl: Optional[Clients] = None
    try:
        srv = Server(root, args.durability, args.server_pythonpath)
        cl = Clients(max(plan.conns), srv.port, args.client)
        info = machine_info(root)
        bench = Bench(srv, cl, InProc(root, args.durability), plan)
        rows = run_rows(bench, plan, only)
        where = [] if args.no_anatomy else anatomy(bench, plan, root, only, args.durability, args.keep_profiles,
                                                     args.server_pythonpath)
    finally:
        if cl is not None:
            cl.close()
        if srv is not None:
            srv.close()
        shutil.rmtree(root, ignore_errors=True)
    client = "stdlib http.client" if args.client == "stdlib" else "httpx " + __import__("httpx").__version__
    print(f"qlog over HTTP ({'quick' if args.quick else 'full'}): medians of {plan.rounds} interleaved round(s); "
          f"HTTP / in-process")
    for line in info:
        print(f"  {line}")
    print(f"  server: python -m qlog serve (local backend), loopback; {srv.stack}")
    print(f"  durability {args.durability!r} on both sides"
          + (" (qlog serve's default: it has no durability flag)" if args.durability == "sync"
             else " (the server's through qlog.toml: qlog serve has no durability flag)"))
    print(f"  clients: {max(plan.conns)} processes, one keep-alive connection each ({client}); "
          "the in-process side: as many threads on one broker")
    print()
    print_report(("row", "HTTP", "in-process", "HTTP / in-process"),
                 [(r.name, fmt_rate(r.http_rate, "msg/s"), fmt_rate(r.inproc_rate, "msg/s"),
                  f"{r.ratio:.2f}" if r.ratio >= 0.1 else f"{r.ratio:.3f}")
                  for r in rows], rows)
    print()
    for key in ("batch", "pull"):
        got = [r for r in rows if r.key == key]
        if got:
            best = max(got, key=lambda r: r.http_rate)
            print(f"target >= {fmt_rate(TARGET, 'msg/s')} over loopback, {ROW_NAMES[key]}: "
                  f"{'met' if best.http_rate >= TARGET else 'MISSED'} (best {fmt_rate(best.http_rate, 'msg/s')}, "
                  f"{best.conns} conn{'s' if best.conns > 1 else ''})")
    if where:
        print("\nwhere the time goes:")
        for line in where:
            print(f"  {line}" if line else "")
    print_end(t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
