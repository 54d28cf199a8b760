"""Side-by-side benchmark of push consumers against pull loops, across processes.

    python benchmarks/consumers.py                      # full run (about 1 minute)
    python benchmarks/consumers.py --quick              # short run (about 15 s)
    python benchmarks/consumers.py --only latency,idle  # some rows (throughput latency idle)
    python benchmarks/consumers.py --dir DIR            # scratch space in DIR (default <repo>/.bench-tmp)
    python benchmarks/consumers.py --only throughput --profile   # also cProfile both consumers
    python benchmarks/consumers.py --worker run         # worker processes run broker.run() (default:
                                                        # `python -m qlog worker` where it exists)

Every consumer runs in a process of its own, started by this script, and
every baseline too, so both pay the same process costs:

* throughput: a backlog of 100-byte bytes messages, sent beforehand with
  send_batch, durability "interval", drained by a worker process running
  ``@broker.consumer(q, max_batch_size=100, max_batch_timeout=0)`` with a
  handler that only counts the messages, against a process running a
  ``pull(100)`` + ``ack_all()`` loop on the same backlog (neither reads a
  body).  Each side times itself from its first batch to the batch that
  completes the count.  The sides are interleaved, their order rotating
  between repetitions; the ratio is the median of per-repetition ratios.
* latency: one producer (this process) sends one message at a time, paced,
  to several idle consumer processes in turn; the body carries the send
  time on CLOCK_MONOTONIC (``time.monotonic_ns()``, one clock for every
  process on Linux), and the consumer notes the time on entering its
  handler.  Push consumer against a ``pull(10, wait=1.0)`` loop, with
  durability "sync" (the default: a send returns after fdatasync) and
  "none"; an os.pipe between two processes is the floor.
* idle: the CPU time of waiting workers over a few seconds, from
  /proc/<pid>/task/*/schedstat.

This measures; it never fails on a missed target (the exit status is 0
unless something breaks).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import resource
import select
import shutil
import signal
import struct
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

PAYLOAD = 100
BATCH = 100
QUEUE = "jobs"
MARK = "QLOG_BENCH"  # a child's report: one stdout line "QLOG_BENCH <kind> <json>"
CHILD_ENV = "QLOG_BENCH_CHILD"  # a child's configuration, as JSON
STAMP = struct.Struct("<qq")  # a latency message: index (< 0 for warm-up), send time in ns


@dataclass(frozen=True)
class Plan:
    reps: int
    drain_msgs: int  # backlog per throughput repetition
    latency_msgs: int  # measured messages per latency side
    warm: int  # warm-up messages per latency side
    gap: float  # seconds between two sends, at least
    jitter: float  # plus up to this much, at random
    idle_seconds: float


FULL = Plan(reps=5, drain_msgs=500_000, latency_msgs=2_000, warm=20, gap=0.0015, jitter=0.001,
            idle_seconds=3.0)
QUICK = Plan(reps=3, drain_msgs=50_000, latency_msgs=200, warm=5, gap=0.0015, jitter=0.001,
             idle_seconds=1.0)

ROWS = ("throughput", "latency", "idle")


# ---------------------------------------------------------------- the child processes
#
# A child reads its configuration from the environment; it is either this
# file run with --child, or (for a push consumer) `python -m qlog worker
# consumers:broker`, which finds `broker` through the module __getattr__.


def emit(kind: str, payload: Dict[str, Any]) -> None:
    sys.stdout.write(f"{MARK} {kind} {json.dumps(payload, separators=(',', ':'))}\n")
    sys.stdout.flush()


class Recorder:
    """What a consumer saw.  ``throughput``: the time and CPU time of its
    first batch and of the batch completing ``expect`` messages (bodies
    untouched).  ``latency``: the entry time of every message's batch,
    reported once ``expect`` have come; ``warm`` warm-up messages first,
    then a "ready" report."""

    def __init__(self, cfg: Dict[str, Any]) -> None:
        self.kind = cfg["kind"]
        self.expect = cfg.get("expect") or 0
        self.warm = cfg.get("warm", 0)
        self.lock = threading.Lock()
        self.count = 0
        self.batches = 0
        self.first: Optional[Tuple[float, float, int]] = None
        self.switches = 0
        self.seen_warm = 0
        self.recv: List[List[int]] = []
        self.biggest = 0
        self.done = False

    def batch(self, msgs: Sequence[qlog.Message]) -> None:
        if self.kind == "throughput":
            now, cpu = time.perf_counter(), time.process_time()
            with self.lock:
                if self.first is None:
                    self.first = (now, cpu, len(msgs))
                    self.switches = switches()
                self.count += len(msgs)
                self.batches += 1
                if self.count >= self.expect and not self.done:
                    self.done = True
                    t0, c0, n0 = self.first
                    emit("done", {"seconds": now - t0, "cpu": cpu - c0, "msgs": self.count - n0,
                                  "count": self.count, "batches": self.batches,
                                  "switches": switches() - self.switches})
            return
        now_ns = time.monotonic_ns()
        unpack = STAMP.unpack
        with self.lock:
            self.biggest = max(self.biggest, len(msgs))
            for m in msgs:
                idx, _sent = unpack(m.body)
                if idx < 0:
                    self.seen_warm += 1
                    if self.seen_warm == self.warm:
                        emit("ready", {"pid": os.getpid()})
                    continue
                self.recv.append([idx, now_ns])
                if len(self.recv) == self.expect and not self.done:
                    self.done = True
                    emit("done", {"recv": self.recv, "biggest": self.biggest})


def switches() -> int:
    """Context switches of this process so far, voluntary or not."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_nvcsw + ru.ru_nivcsw


_child_broker: Optional[qlog.Broker] = None


def child_config() -> Dict[str, Any]:
    raw = os.environ.get(CHILD_ENV)
    if not raw:
        raise RuntimeError(f"{CHILD_ENV} is not set: this module's `broker` exists only in the "
                           f"worker processes benchmarks/consumers.py starts")
    return json.loads(raw)


def make_broker(cfg: Dict[str, Any]) -> qlog.Broker:
    """A broker with the configured push consumer registered."""
    rec = Recorder(cfg)
    broker = qlog.open(cfg["path"], durability=cfg["durability"])
    record = rec.batch
    if cfg.get("async"):
        async def handle(batch: qlog.MessageBatch) -> None:
            record(batch.messages)
    else:
        def handle(batch: qlog.MessageBatch) -> None:  # type: ignore[misc]
            record(batch.messages)
    broker.consumer(cfg["queue"], **cfg["settings"])(handle)
    return broker


def __getattr__(name: str) -> Any:
    """``broker`` for `python -m qlog worker consumers:broker`."""
    global _child_broker
    if name == "broker":
        if _child_broker is None:
            _child_broker = make_broker(child_config())
        return _child_broker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def profile_consumer_threads(cfg: Dict[str, Any]) -> List[Tuple[str, cProfile.Profile]]:
    """cProfile every thread the push consumer starts for its queue (a sync
    consumer's threads each form batches and run the handler on them).
    Read the profiles once broker.run() has returned: its threads are done."""
    profs: List[Tuple[str, cProfile.Profile]] = []
    prefix = f"qlog-{cfg['queue']}-"

    def first_call(frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(None)  # threading set this hook for the new thread: replace it
        name = threading.current_thread().name
        if name.startswith(prefix):
            prof = cProfile.Profile()
            profs.append((name, prof))
            prof.enable()

    threading.setprofile(first_call)
    return profs


def profile_text(prof: cProfile.Profile, top: int) -> str:
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime")
    st.print_stats(top)
    text = buf.getvalue()
    start = text.find("   ncalls")
    head = text[:start].strip().splitlines()
    total = next((ln.strip() for ln in head if "function calls" in ln), "")
    return (total + "\n" + text[start:].rstrip()) if start >= 0 else text.rstrip()


def child_push(cfg: Dict[str, Any]) -> int:
    """A worker process: the push consumer run by broker.run() until SIGTERM."""
    profs = profile_consumer_threads(cfg) if cfg.get("profile") else []
    broker = make_broker(cfg)
    try:
        ok = broker.run()
    finally:
        broker.close()
    for name, prof in profs:
        emit("profile", {"thread": f"consumer thread {name}", "text": profile_text(prof, cfg.get("top", 30))})
    return 0 if ok else 1


def child_pull(cfg: Dict[str, Any]) -> int:
    """The baseline consumer: pull + ack_all in a loop, in this process's
    main thread, until ``expect`` messages (or, with none, until killed)."""
    rec = Recorder(cfg)
    size, wait = cfg["size"], cfg["wait"]
    prof = cProfile.Profile() if cfg.get("profile") else None
    with qlog.open(cfg["path"], durability=cfg["durability"]) as broker:
        q = broker.queue(cfg["queue"])
        pull = q.pull
        if prof is not None:
            prof.enable()
        while not rec.done or not rec.expect:
            batch = pull(size)
            if not batch and wait:
                batch = pull(size, wait=wait)
            if batch:
                rec.batch(batch.messages)
                batch.ack_all()
        if prof is not None:
            prof.disable()
            emit("profile", {"thread": "pull loop", "text": profile_text(prof, cfg.get("top", 30))})
    return 0


def child_pipe(cfg: Dict[str, Any]) -> int:
    """The floor: 16-byte stamps read from a pipe, blocking."""
    fd = cfg["fd"]
    warm, expect = cfg["warm"], cfg["expect"]
    seen_warm = 0
    recv: List[List[int]] = []
    buf = b""
    while len(recv) < expect:
        data = os.read(fd, 4096)
        now_ns = time.monotonic_ns()
        if not data:
            return 1
        buf += data
        while len(buf) >= STAMP.size:
            idx, _sent = STAMP.unpack_from(buf)
            buf = buf[STAMP.size:]
            if idx < 0:
                seen_warm += 1
                if seen_warm == warm:
                    emit("ready", {"pid": os.getpid()})
            else:
                recv.append([idx, now_ns])
    emit("done", {"recv": recv, "biggest": 1})
    return 0


def child_main() -> int:
    cfg = child_config()
    role = cfg["role"]
    return {"push": child_push, "pull": child_pull, "pipe": child_pipe}[role](cfg)


# ---------------------------------------------------------------- running children


def child_env(cfg: Dict[str, Any]) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env[CHILD_ENV] = json.dumps(cfg)
    return env


def worker_cli_available() -> bool:
    """Whether `python -m qlog worker` exists in this checkout."""
    try:
        r = subprocess.run([sys.executable, "-m", "qlog", "worker", "--help"], capture_output=True,
                           env=child_env({}), cwd=ROOT, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


class Child:
    """A child process of this script, reporting on its stdout."""

    live: List["Child"] = []  # killed on the way out if still running

    def __init__(self, name: str, argv: List[str], cfg: Dict[str, Any], pass_fds: Sequence[int] = ()) -> None:
        self.name = name
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.err, env=child_env(cfg),
                                     cwd=ROOT, pass_fds=tuple(pass_fds))
        self.buf = b""
        Child.live.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace").strip()[-3000:]

    def expect(self, kind: str, timeout: float) -> Dict[str, Any]:
        """The next report of this kind, waiting up to ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                parts = line.decode(errors="replace").split(" ", 2)
                if len(parts) == 3 and parts[0] == MARK and parts[1] == kind:
                    return json.loads(parts[2])
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: no {kind!r} report in {timeout:g} s; "
                                   f"stderr: {self.stderr_tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 1 << 16)
                if not data:
                    self.proc.wait(10)
                    raise RuntimeError(f"{self.name} exited {self.proc.returncode} before its {kind!r} "
                                       f"report; stderr: {self.stderr_tail()}")
                self.buf += data

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (if still running), then wait for the exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"{self.name} did not exit within {timeout:g} s; stderr: {self.stderr_tail()}")
        self.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()

    def close(self) -> None:
        if self in Child.live:
            Child.live.remove(self)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()


def start_push(name: str, cfg: Dict[str, Any], cli: bool) -> Child:
    cfg = dict(cfg, role="push")
    if cli and not cfg.get("profile"):
        argv = [sys.executable, "-m", "qlog", "worker", "consumers:broker"]
    else:
        argv = [sys.executable, os.path.abspath(__file__), "--child"]
    return Child(name, argv, cfg)


def start_child(name: str, cfg: Dict[str, Any], pass_fds: Sequence[int] = ()) -> Child:
    return Child(name, [sys.executable, os.path.abspath(__file__), "--child"], cfg, pass_fds)


def cpu_of(pid: int) -> Dict[str, Any]:
    """Time on CPU of every thread of a process (schedstat, ns) and their
    context switches, by thread id; and the process's utime+stime (clock
    ticks, threads that ended included)."""
    threads: Dict[str, Tuple[int, int]] = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            sw = 0
            with open(f"{base}/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        sw += int(line.split()[1])
            threads[tid] = (ns, sw)
        except (FileNotFoundError, ProcessLookupError):
            pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return {"threads": threads, "ticks": ticks / os.sysconf("SC_CLK_TCK")}


def cpu_used(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, Any]:
    """What each thread alive at both ends used in between, busiest first."""
    per = sorted(((a[0] - before["threads"][t][0], a[1] - before["threads"][t][1])
                  for t, a in after["threads"].items() if t in before["threads"]), reverse=True)
    return {"on_cpu": sum(x[0] for x in per) / 1e9, "switches": sum(x[1] for x in per),
            "per_thread": per, "ticks": after["ticks"] - before["ticks"]}


# ---------------------------------------------------------------- figures


@dataclass
class Row:
    key: str
    name: str
    qlog: str
    baseline: str
    ratio: str
    target: str
    result: str
    ratios: List[float] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    profile: str = ""


def bytes_bodies(n: int) -> List[bytes]:
    seed = os.urandom(PAYLOAD + n)
    return [seed[i:i + PAYLOAD] for i in range(n)]


def pct(xs: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of xs."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


# ---------------------------------------------------------------- 1: throughput


VARIANTS: Tuple[Tuple[str, str, Dict[str, Any], bool], ...] = (  # key, label, more settings, async
    ("push", "push consumer, sync handler, max_concurrency=1", {}, False),
    ("push4", "push consumer, sync handler, max_concurrency=4", {"max_concurrency": 4}, False),
    ("async", "push consumer, async def handler", {}, True),
)


def bench_throughput(sc: Scratch, plan: Plan, cli: bool, prof: bool) -> List[Row]:
    bodies = bytes_bodies(1000)
    n = plan.drain_msgs - plan.drain_msgs % 1000
    budget = 60 + n / 5_000  # seconds a drain may take before the run gives up
    info: Dict[str, List[Dict[str, Any]]] = {}

    def fill(path: str) -> None:
        with qlog.open(path, durability="interval") as b:
            q = b.queue(QUEUE)
            for _ in range(n // 1000):
                q.send_batch(bodies, content_type="bytes")
            check(q.stats().backlog == n, "throughput backlog")

    def drained(path: str, what: str) -> None:
        with qlog.open(path, durability="interval") as b:
            st = b.queue(QUEUE).stats()
            check(st.acked == n and st.backlog == 0 and st.in_flight == 0, f"{what} left {st}")

    def pull_side() -> float:
        path = sc.path("tp-pull")
        try:
            fill(path)
            c = start_child("pull loop", {"role": "pull", "kind": "throughput", "path": path,
                                          "queue": QUEUE, "durability": "interval", "expect": n,
                                          "size": BATCH, "wait": 1.0})
            r = c.expect("done", budget)
            r["rc"] = c.wait()
            drained(path, "pull loop")
            info.setdefault("pull", []).append(r)
            return r["msgs"] / r["seconds"]
        finally:
            remove(path)

    def push_side(key: str, settings: Dict[str, Any], is_async: bool) -> Callable[[], float]:
        def run() -> float:
            path = sc.path(f"tp-{key}")
            try:
                fill(path)
                cfg = {"kind": "throughput", "path": path, "queue": QUEUE, "durability": "interval",
                       "expect": n, "async": is_async,
                       "settings": dict({"max_batch_size": BATCH, "max_batch_timeout": 0}, **settings)}
                c = start_push(f"{key} worker", cfg, cli)
                r = c.expect("done", budget)
                r["rc"] = c.stop()
                drained(path, f"{key} worker")
                info.setdefault(key, []).append(r)
                return r["msgs"] / r["seconds"]
            finally:
                remove(path)
        return run

    sides = [pull_side] + [push_side(k, s, a) for k, _, s, a in VARIANTS]
    for side in sides:  # warm-up: imports, page cache, the file system's allocator
        side()
    info.clear()
    res = interleave(plan.reps, sides)
    progress(f"throughput: {plan.reps} reps of {n:,} messages, {len(sides)} consumer processes each")
    pull = res[0]
    rows = []
    for (key, label, settings, _a), push in zip(VARIANTS, res[1:]):
        ratios = [a / b for a, b in zip(push, pull)]
        r = median(ratios)
        main = key == "push"
        row = Row(key, f"drain: {label} vs pull(100)+ack_all loop", fmt_rate(median(push), "msg/s"),
                  fmt_rate(median(pull), "msg/s"), f"{r:.2f}", ">= 0.7" if main else "-",
                  ("PASS" if r >= 0.7 else "MISS") if main else "-", ratios)
        cpu = median([x["cpu"] / x["seconds"] for x in info[key]])
        pcpu = median([x["cpu"] / x["seconds"] for x in info["pull"]])
        batches = median([x["batches"] for x in info[key]])
        sw = median([x["switches"] / x["batches"] for x in info[key]])
        psw = median([x["switches"] / x["batches"] for x in info["pull"]])
        if main:
            row.notes.append(
                f"{n:,} messages of {PAYLOAD} B per rep, sent beforehand (send_batch of 1,000, "
                f"durability interval); each side a process of its own ({'`python -m qlog worker`' if cli else 'broker.run()'} "
                f"for the push consumer), timed by itself from its first batch to the one completing "
                f"{n:,} (that first batch not counted); the handler and the loop count messages and "
                f"read no body; max_batch_size=100, max_batch_timeout=0")
        row.notes.append(
            f"{1e6 * BATCH / median(push):.0f} us per batch of 100 pushed, "
            f"{1e6 * BATCH / median(pull):.0f} us per pull+ack_all; CPU / wall in the timed span: "
            f"{cpu:.2f} vs {pcpu:.2f}; context switches per batch {sw:.2f} vs {psw:.2f}; "
            f"{batches:.0f} handler calls per rep; worker exit status "
            f"{sorted(set(x['rc'] for x in info[key]))}")
        row.notes.append(per_rep(f"{key} per rep", push, 1e-3, "k msg/s"))
        if main:
            row.notes.append(per_rep("pull loop per rep", pull, 1e-3, "k msg/s"))
        rows.append(row)
    if prof:
        rows[0].profile = profile_throughput(sc, n, fill, budget)
    return rows


def profile_throughput(sc: Scratch, n: int, fill: Callable[[str], None], budget: float) -> str:
    """One more drain on each side under cProfile: the push consumer's
    thread and the pull loop."""
    out = []
    for key in ("push", "pull"):
        path = sc.path(f"tp-prof-{key}")
        try:
            fill(path)
            cfg: Dict[str, Any] = {"kind": "throughput", "path": path, "queue": QUEUE,
                                   "durability": "interval", "expect": n, "profile": True}
            if key == "push":
                cfg["settings"] = {"max_batch_size": BATCH, "max_batch_timeout": 0}
                c = start_push("profiled worker", cfg, cli=False)
                r = c.expect("done", budget * 3)
                c.proc.send_signal(signal.SIGTERM)
            else:
                cfg.update(role="pull", size=BATCH, wait=1.0)
                c = start_child("profiled pull loop", cfg)
                r = c.expect("done", budget * 3)
            p = c.expect("profile", 60)
            c.wait()
            out.append(f"--- {p['thread']}: {r['msgs'] / r['seconds'] / 1e3:.0f} k msg/s under the "
                       f"profiler\n{p['text']}")
        finally:
            remove(path)
    return "\n\n".join(out)


# ---------------------------------------------------------------- 2: latency


@dataclass
class LatSide:
    key: str
    label: str
    child: Child
    send: Callable[[bytes], Any]
    sent: Dict[int, Tuple[int, int]] = field(default_factory=dict)  # idx -> (before, after) send, ns
    lat: List[float] = field(default_factory=list)  # seconds, by index
    send_s: List[float] = field(default_factory=list)
    biggest: int = 0


def bench_latency(sc: Scratch, plan: Plan, cli: bool) -> List[Row]:
    m, warm = plan.latency_msgs, plan.warm
    sides: List[LatSide] = []
    brokers: List[qlog.Broker] = []
    paths: List[str] = []
    fds: List[int] = []
    try:
        for durability in ("sync", "none"):
            for kind in ("push", "pull"):
                path = sc.path(f"lat-{kind}-{durability}")
                paths.append(path)
                b = qlog.open(path, durability=durability)
                brokers.append(b)
                q = b.queue(QUEUE)  # made here first, so no process races to create it
                cfg: Dict[str, Any] = {"kind": "latency", "path": path, "queue": QUEUE,
                                       "durability": durability, "expect": m, "warm": warm}
                if kind == "push":
                    cfg["settings"] = {"max_batch_size": 10, "max_batch_timeout": 0}
                    child = start_push(f"push worker ({durability})", cfg, cli)
                    label = f"push consumer, durability {durability}"
                else:
                    cfg.update(role="pull", size=10, wait=1.0)
                    child = start_child(f"pull loop ({durability})", cfg)
                    label = f"pull(10, wait=1.0) loop, durability {durability}"

                def send(body: bytes, _send: Callable[..., Any] = q.send) -> Any:
                    return _send(body, content_type="bytes")
                sides.append(LatSide(f"{kind}-{durability}", label, child, send))
        r_fd, w_fd = os.pipe()
        fds += [r_fd, w_fd]
        pipe = start_child("pipe reader", {"role": "pipe", "fd": r_fd, "warm": warm, "expect": m}, [r_fd])
        os.close(r_fd)
        fds.remove(r_fd)
        sides.append(LatSide("pipe", "os.pipe, a process blocked in read()", pipe,
                             lambda body: os.write(w_fd, body)))

        rng = random.Random(1)
        gap, jitter = plan.gap, plan.jitter
        for i in range(warm):
            for s in sides:
                s.send(STAMP.pack(-1 - i, time.monotonic_ns()))
                time.sleep(gap + rng.random() * jitter)
        for s in sides:
            s.child.expect("ready", 60)
        t0 = time.perf_counter()
        for i in range(m):
            k = i % len(sides)
            for s in sides[k:] + sides[:k]:
                before = time.monotonic_ns()
                s.send(STAMP.pack(i, before))
                after = time.monotonic_ns()
                s.sent[i] = (before, after)
                time.sleep(gap + rng.random() * jitter)
        span = time.perf_counter() - t0
        for s in sides:
            r = s.child.expect("done", 60)
            recv = {idx: ns for idx, ns in r["recv"]}
            check(sorted(recv) == list(range(m)), f"{s.key}: got {len(recv)} of {m} messages")
            s.lat = [(recv[i] - s.sent[i][0]) / 1e9 for i in range(m)]
            s.send_s = [(s.sent[i][1] - s.sent[i][0]) / 1e9 for i in range(m)]
            s.biggest = r["biggest"]
        for s in sides:
            if s.key.startswith("push"):
                s.child.stop()
            else:
                s.child.wait()
    finally:
        for b in brokers:
            b.close()
        for fd in fds:
            os.close(fd)
        for p in paths:
            remove(p)
    progress(f"latency: {m:,} messages to each of {len(sides)} consumers in turn, {span:.1f} s")

    by = {s.key: s for s in sides}
    floor = by["pipe"]
    chunks = 5

    def chunked_p50_ratios(a: List[float], b: List[float]) -> List[float]:
        size = len(a) // chunks
        return [median(a[j * size:(j + 1) * size]) / median(b[j * size:(j + 1) * size])
                for j in range(chunks)]

    def summary(s: LatSide) -> str:
        return (f"p50 {fmt_time(pct(s.lat, 50))}, p90 {fmt_time(pct(s.lat, 90))}, p99 "
                f"{fmt_time(pct(s.lat, 99))}, max {fmt_time(max(s.lat))}")

    rows = []
    for durability in ("sync", "none"):
        push, pull = by[f"push-{durability}"], by[f"pull-{durability}"]
        p50, b50 = pct(push.lat, 50), pct(pull.lat, 50)
        ratios = chunked_p50_ratios(push.lat, pull.lat)
        row = Row(f"latency-{durability}", f"send->handler p50, other process, durability {durability}",
                  fmt_time(p50), fmt_time(b50), f"{median(ratios):.2f}", "p50 <= 2 ms",
                  "PASS" if p50 <= 0.002 else "MISS", ratios)
        if durability == "sync":
            row.notes.append(
                f"{m:,} messages per consumer, sent one at a time from this process to {len(sides)} "
                f"idle consumer processes in turn (rotating order), {gap * 1e3:g} ms + up to "
                f"{jitter * 1e3:g} ms between sends (each consumer waits >= "
                f"{len(sides) * gap * 1e3:g} ms for its next); time.monotonic_ns() in the body "
                f"before send(), read again on entering the handler (the batch's first line); "
                f"{warm} warm-up messages each first, not counted")
            row.notes.append(
                f"push: @consumer(max_batch_size=10, max_batch_timeout=0) run by "
                f"{'`python -m qlog worker`' if cli else 'broker.run()'}; baseline: a process "
                f"looping pull(10) then pull(10, wait=1.0) + ack_all; ratio: push p50 / pull p50 "
                f"per fifth of the messages")
        row.notes.append(f"push: {summary(push)}; largest batch {push.biggest}")
        row.notes.append(f"pull: {summary(pull)}; largest batch {pull.biggest}")
        early = sum(a < b for a, b in zip(push.lat, push.send_s)) / len(push.lat)
        row.notes.append(
            f"send() itself (both sides): p50 {fmt_time(pct(push.send_s + pull.send_s, 50))}, p99 "
            f"{fmt_time(pct(push.send_s + pull.send_s, 99))}; the push handler was entered before "
            f"send() returned for {100 * early:.0f}% of the messages"
            + (" (a record is published to readers before the fdatasync that makes it durable)"
               if durability == "sync" else ""))
        rows.append(row)
    rows[-1].notes.append(f"floor, {floor.label}: {summary(floor)} ({m:,} stamps, same pacing)")
    return rows


# ---------------------------------------------------------------- 3: idle CPU


FLOOR_IDLE = r"""
import sys, threading
print("QLOG_BENCH ready {}", flush=True)
stop = threading.Event()
while not stop.wait(1.0):  # one wake-up a second, as a worker's tick
    pass
"""


def bench_idle(sc: Scratch, plan: Plan, cli: bool) -> Row:
    secs = plan.idle_seconds
    specs = [("push", "push consumer (default settings), sync handler", False),
             ("async", "push consumer (default settings), async def handler", True),
             ("pull", "pull(10, wait=1.0) loop", None)]
    children: Dict[str, Child] = {}
    queues: Dict[str, qlog.Queue] = {}
    brokers: List[qlog.Broker] = []
    paths: List[str] = []
    try:
        for key, _label, is_async in specs:
            path = sc.path(f"idle-{key}")
            paths.append(path)
            b = qlog.open(path)
            brokers.append(b)
            queues[key] = b.queue(QUEUE)
            cfg: Dict[str, Any] = {"kind": "latency", "path": path, "queue": QUEUE,
                                   "durability": "sync", "expect": 0, "warm": 1}
            if is_async is None:
                cfg.update(role="pull", size=10, wait=1.0)
                children[key] = start_child("idle pull loop", cfg)
            else:
                cfg.update({"settings": {}, "async": is_async})
                children[key] = start_push(f"idle {key} worker", cfg, cli)
        children["floor"] = Child("idle floor", [sys.executable, "-c", FLOOR_IDLE], {})
        for key, q in queues.items():
            q.send(STAMP.pack(-1, time.monotonic_ns()), content_type="bytes")
        for key, c in children.items():
            c.expect("ready", 60)
        deadline = time.monotonic() + 30
        while not all(q.stats().acked == 1 for q in queues.values()):  # the warm-up batch settled
            check(time.monotonic() < deadline, "idle warm-up message not acked in 30 s")
            time.sleep(0.01)
        before = {k: cpu_of(c.pid) for k, c in children.items()}
        t0 = time.monotonic()
        time.sleep(secs)  # the measured window: the workers wait, nothing is sent
        after = {k: cpu_of(c.pid) for k, c in children.items()}
        window = time.monotonic() - t0
        for key, c in children.items():
            if key in ("push", "async"):
                c.stop()
            else:
                c.kill()  # they wait forever
    finally:
        for c in list(children.values()):
            c.kill()
        for b in brokers:
            b.close()
        for p in paths:
            remove(p)
    progress(f"idle: {len(children)} waiting processes for {window:.1f} s")

    used = {k: cpu_used(before[k], after[k]) for k in children}
    push, pull = used["push"], used["pull"]
    row = Row("idle", f"idle worker CPU over {window:.1f} s (push consumer vs pull wait loop)",
              f"{push['on_cpu'] * 1e3:.2f} ms", f"{pull['on_cpu'] * 1e3:.2f} ms",
              f"{push['on_cpu'] / max(pull['on_cpu'], 1e-9):.2f}", "-", "-")
    row.notes.append(
        "CPU time of every thread of each process (sum of /proc/<pid>/task/*/schedstat), from "
        "after a warm-up message was handled and acked to the end of the window; nothing sent "
        "meanwhile; per thread: ms on CPU / wake-ups (context switches), busiest first")
    labels = [(k, lab) for k, lab, _a in specs] + [
        ("floor", "floor: a Python process waiting on threading.Event().wait(1.0) in a loop")]
    for key, label in labels:
        u = used[key]
        threads = ", ".join(f"{ns / 1e6:.2f}/{sw}" for ns, sw in u["per_thread"])
        row.notes.append(
            f"{label}: {u['on_cpu'] * 1e3:.2f} ms CPU in {window:.1f} s "
            f"({100 * u['on_cpu'] / window:.3f}% of a core; utime+stime {u['ticks']:.2f} s), "
            f"{u['switches']} wake-ups ({u['switches'] / window:.1f}/s); threads: {threads}")
    return row


# ---------------------------------------------------------------- report


def print_table(rows: List[Row]) -> None:
    print_report(("figure", "qlog push", "baseline", "ratio", "target", "result"),
                 [(r.name, r.qlog, r.baseline, r.ratio, r.target, r.result) for r in rows], rows)
    for r in rows:
        if r.profile:
            print(f"\n--- cProfile (sorted by own time): {r.name}")
            print(r.profile)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--child"]:
        return child_main()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run: fewer messages and repetitions")
    ap.add_argument("--dir", help="where to put data (default: a temporary directory under "
                                  "<repo>/.bench-tmp, removed at the end)")
    ap.add_argument("--only", help=f"comma-separated rows to run, of: {' '.join(ROWS)}")
    ap.add_argument("--profile", action="store_true",
                    help="also drain one backlog under cProfile on each throughput side")
    ap.add_argument("--worker", choices=("auto", "cli", "run"), default="auto",
                    help="how push consumers run: `python -m qlog worker consumers:broker` (cli), "
                         "this script calling broker.run() (run), or cli where it exists (auto)")
    args = ap.parse_args(args_in)
    plan = QUICK if args.quick else FULL
    only = ROWS if not args.only else tuple(x.strip() for x in args.only.split(",") if x.strip())
    bad = [x for x in only if x not in ROWS]
    if bad:
        ap.error(f"unknown row(s) {', '.join(bad)}; rows are: {' '.join(ROWS)}")
    cli = worker_cli_available() if args.worker == "auto" else args.worker == "cli"
    if args.worker == "cli" and not worker_cli_available():
        ap.error("`python -m qlog worker --help` fails in this checkout; use --worker run")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill too
    parent = args.dir or os.path.join(ROOT, ".bench-tmp")
    made_parent = not os.path.exists(parent)
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="consumers-", dir=parent)
    t_start = time.perf_counter()
    rows: List[Row] = []
    try:
        info = machine_info(root)
        sc = Scratch(root)
        if "throughput" in only:
            rows += bench_throughput(sc, plan, cli, args.profile)
        if "latency" in only:
            rows += bench_latency(sc, plan, cli)
        if "idle" in only:
            rows.append(bench_idle(sc, plan, cli))
    finally:
        for c in list(Child.live):
            c.kill()
        shutil.rmtree(root, ignore_errors=True)
        if made_parent:
            try:
                os.rmdir(parent)
            except OSError:
                pass
    cmd = " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), os.getcwd())] + args_in)
    print(f"qlog push consumer benchmark ({'quick' if args.quick else 'full'}): {cmd}")
    print(f"  every consumer in a process of its own; push consumers run by "
          f"{'`python -m qlog worker consumers:broker`' if cli else 'a process calling broker.run()'}; "
          f"throughput: medians of {plan.reps} interleaved reps")
    for line in info:
        print(f"  {line}")
    print()
    print_table(rows)
    print_end(t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
