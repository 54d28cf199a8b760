"""Soak: producers and consumers in several processes at a steady rate for
N minutes, with random SIGKILLs and restarts, then an accounting of every
message.

    python benchmarks/soak.py --minutes 30                 # 2,000 msg/s, a report row a minute
    python benchmarks/soak.py --minutes 1 --interval 15    # a short run, a row every 15 s
    python benchmarks/soak.py --minutes 5 --rate 500 --kill-every 5 --seed 7 --json out.json

One data directory (``--dir``, default a fresh directory under
./.soak-tmp, removed after a clean run) holds three queues, configured
through its ``qlog.toml``:

* ``jobs``: durability "sync", consumed by one ``python -m qlog worker
  soak:broker`` process (a push consumer) whose handler retries a few
  messages (1 in 5,000) until they are dead-lettered, and raises for a few
  others (1 in 2,000) on their first delivery, so the whole batch is retried;
* ``events``: durability "interval", consumed by pull-consumer processes
  that ack most messages, retry 1 in 100 and leave 1 in 500 leased until
  the lease runs out;
* ``dead``: the dead-letter queue of both, drained by the pull consumers.

Producer processes send to ``jobs`` and ``events`` (``send`` and
``send_batch`` of 2 to 100), paced to ``--rate`` messages per second in
all.  Every ``--kill-every`` seconds on average (uniformly 0.5x to 1.5x,
seeded) one process is killed with SIGKILL and a new one started in its
place: the worker, or a producer or pull consumer other than the first of
its kind (the first producer and the first pull consumer run throughout,
so their memory use shows a leak; a role with one process is killed too).

Every process records what qlog returned to it in a side file, one
``os.write`` of whole lines per returned call, so a line is in the kernel
before the next call starts and survives a SIGKILL (a line the kill cut
short has no newline and is ignored):

    s <t> <queue> <first seq> <n> <producer> <first k>    send/send_batch returned
    d <t> <queue> <seq>:<attempts>:<producer>:<k>:<latency us> ...   delivered
    a <t before> <t after> <queue> <seq> ...              ack returned
    h <t> <queue> <seq> ...          the push handler returns (the worker acks them next)
    r <t before> <queue> <seq> ...   retry returned
    x <t before> <queue> <seq> ...   the push handler raises (the worker retries them next)
    l <t> <queue> <seq> ...          left leased on purpose (delivered again after the lease)
    c <t> <queue> <seq> ...          a body that is not what was sent (then acked)
    D <t> <queue>:<seq>:<producer>:<k> ...   a dead letter, by its origin, delivered from ``dead``

Times are ``time.monotonic()``, one clock for every process on Linux; a
body carries its producer, its number ``k`` there, its send time and a
padding derived from both, so a consumer knows a damaged body.  The script
reads the side files as they grow and applies their events in time order
(10 s behind, so a line written late still comes in order).  At the end it
stops the producers, lets the consumers catch up, stops them, drains what
is left itself (with a clock far ahead, so leases of killed consumers have
run out), runs ``qlog verify`` on the directory, and states:

* lost: a message whose send returned and that was neither acked, nor
  handled by the push handler, nor dead-lettered, nor last held by a
  process killed before it settled it: must be 0;
* corrupt: a delivered body that is not what was sent, a message delivered
  under another message's number, one that no producer sent (other than
  the in-flight call of a killed producer), damage found by ``qlog
  verify``: must be 0;
* duplicates: deliveries of a message again while no retry or lease expiry
  was asked for; each must be of a message held by a process killed
  before it settled it (``unexplained`` duplicates, deliveries after an
  ack returned, and attempts that do not grow are counted as failures);
* kills made, per role, and children that exited on their own (failures).

Disk stays bounded only if acked messages are given back: the queues use
small segments (``--segment-bytes``, default 1 MiB, for the state journal
too) and checkpoint often (``--checkpoint-every`` journal records,
default 1,000), so checkpoints truncate journals and message logs within
seconds.  The report has one row per ``--interval`` seconds: messages sent
(returned) and acked (acked or handled) per second, the p50 and p99 latency
from the send call to the consumer getting the message (first deliveries),
the largest RSS of each role, the largest disk use of the data directory,
and the kills made.  Then the totals and a flatness verdict: the last row
against the first row after warm-up (the first fifth of the rows, at least
one): disk may grow to at most 2x + 16 MiB and each role's RSS to at most
1.5x + 16 MiB.

Exit status 1 when anything is lost or corrupt, a duplicate is not
explained by a kill, a child failed, or the verdict says disk or RSS grew
beyond those bounds; the seed is printed with the command to rerun.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from typing import Any, Dict, List, Optional, Sequence, Tuple

import qlog

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD_ENV = "QLOG_SOAK_CHILD"
JOBS, EVENTS, DEAD = "jobs", "events", "dead"
SOURCES = (JOBS, EVENTS)
VISIBILITY = 30.0            # seconds: leases of a killed consumer run out after this
LAG = 10.0                   # seconds the checker stays behind the side files
MAX_BATCH = 100
POISON, RAISE = 2, 7         # of 10,000: messages of jobs the handler retries always / raises for once
MiB = 1 << 20


# ---------------------------------------------------------------- messages


def pad(p: int, k: int) -> str:
    """The padding of message ``k`` of producer ``p`` (20 to 116 characters)."""
    unit = f"{p}-{k}|"
    n = (p * 131 + k * 7) % 97 + 20
    return (unit * (n // len(unit) + 1))[:n]


def body_of(p: int, k: int) -> Dict[str, Any]:
    return {"p": p, "k": k, "t": time.monotonic(), "x": pad(p, k)}


def intact(body: Any) -> bool:
    """Whether a delivered body is one a producer sent."""
    try:
        return (type(body) is dict and body.keys() == {"p", "k", "t", "x"}
                and type(body["t"]) is float and body["x"] == pad(body["p"], body["k"]))
    except (TypeError, ValueError):
        return False


def fate(p: int, k: int) -> int:
    """0 to 9,999, fixed per message: what the push handler does with it."""
    return (p * 2654435761 + k * 40503) % 10000


def toml_text(segment_bytes: int) -> str:
    """The data directory's qlog.toml: every process sees the same settings."""
    common = f"visibility_timeout = {VISIBILITY}\nsegment_bytes = {segment_bytes}\n"
    return (
        '[[queues.consumers]]\nqueue = "jobs"\ndurability = "sync"\nmax_retries = 2\n'
        f'dead_letter_queue = "dead"\nmax_batch_size = 50\nmax_batch_timeout = 0.05\n{common}\n'
        '[[queues.consumers]]\nqueue = "events"\ndurability = "interval"\nmax_retries = 3\n'
        f'dead_letter_queue = "dead"\n{common}\n'
        f'[[queues.consumers]]\nqueue = "dead"\ndurability = "interval"\n{common}'
    )


# ---------------------------------------------------------------- children
#
# A child reads its configuration from the environment: this file run with
# --child (producers, pull consumers), or `python -m qlog worker soak:broker`,
# which finds `broker` through the module __getattr__.


def child_config() -> Dict[str, Any]:
    raw = os.environ.get(CHILD_ENV)
    if not raw:
        raise RuntimeError(f"{CHILD_ENV} is not set: this module's `broker` exists only in the "
                           f"worker processes benchmarks/soak.py starts")
    return json.loads(raw)


def configure(checkpoint_every: int) -> None:
    """The soak's checkpoint interval, in this process (every process
    opening the directory, the script too)."""
    qlog.Broker.checkpoint_every = checkpoint_every


def open_broker(cfg: Dict[str, Any]) -> qlog.Broker:
    """The data directory, with the soak's checkpoint and journal sizes."""
    configure(cfg["checkpoint_every"])
    broker = qlog.open(cfg["path"], durability="interval")
    for name in (JOBS, EVENTS, DEAD):   # open before any dead-lettering opens one on its own
        broker.queue(name)
    return broker


class Side:
    """A side file: one os.write of whole lines per call."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, text: str) -> None:
        os.write(self.fd, text.encode())


def note_delivered(side: Side, qname: str, msgs: Sequence[qlog.Message]) -> Tuple[float, List[qlog.Message]]:
    """Record a delivery: the ``d`` line, then a ``c`` line for damaged
    bodies.  Returns the time and the intact messages."""
    t = time.monotonic()
    parts, bad, good = [], [], []
    for m in msgs:
        seq = int(m.id[16:], 16)
        b = m.body
        if intact(b):
            parts.append(f"{seq}:{m.attempts}:{b['p']}:{b['k']}:{int((t - b['t']) * 1e6)}")
            good.append(m)
        else:
            parts.append(f"{seq}:{m.attempts}:-1:-1:0")
            bad.append(str(seq))
    text = f"d {t:.6f} {qname} {' '.join(parts)}\n"
    if bad:
        text += f"c {t:.6f} {qname} {' '.join(bad)}\n"
    side.write(text)
    return t, good


def seqs_of(msgs: Sequence[qlog.Message]) -> str:
    return " ".join(str(int(m.id[16:], 16)) for m in msgs)


def settle_pulled(side: Side, qname: str, batch: qlog.MessageBatch, rng: Optional[random.Random]) -> None:
    """Pull consumer: ack the messages of ``batch``, retrying 1 in 100 and
    leaving 1 in 500 leased when ``rng`` is given (the final drain acks all)."""
    msgs = batch.messages
    _, good = note_delivered(side, qname, msgs)
    retry, leave = [], []
    if rng is not None:
        for m in good:
            x = rng.random()
            if x < 0.01:
                retry.append(m)
            elif x < 0.012:
                leave.append(m)
    if retry:
        t0 = time.monotonic()
        for m in retry:
            m.retry()
        side.write(f"r {t0:.6f} {qname} {seqs_of(retry)}\n")
    if leave:
        side.write(f"l {time.monotonic():.6f} {qname} {seqs_of(leave)}\n")
        skip = {id(m) for m in retry + leave}
        rest = [m for m in msgs if id(m) not in skip]
        t0 = time.monotonic()
        for m in rest:
            m.ack()
    else:
        skip = {id(m) for m in retry}
        rest = [m for m in msgs if id(m) not in skip]
        t0 = time.monotonic()
        batch.ack_all()
    if rest:
        side.write(f"a {t0:.6f} {time.monotonic():.6f} {qname} {seqs_of(rest)}\n")


def take_dead(side: Side, dead: qlog.Queue) -> int:
    """Pull dead letters, record them by their origin, ack them."""
    batch = dead.pull(batch_size=MAX_BATCH)
    if batch:
        t = time.monotonic()
        parts = []
        for m in batch:
            b = m.body
            ok = intact(b)
            parts.append(f"{m.dead_letter.queue}:{int(m.id[16:], 16)}:{b['p'] if ok else -1}:{b['k'] if ok else -1}")
        side.write(f"D {t:.6f} {' '.join(parts)}\n")
        batch.ack_all()
    return len(batch)


_stop = [False]


def _on_term(signum: int, frame: Any) -> None:
    _stop[0] = True


def child_producer(cfg: Dict[str, Any]) -> None:
    """Send to jobs and events at ``rate`` messages a second until SIGTERM."""
    rng = random.Random(cfg["seed"])
    broker = open_broker(cfg)
    qs = {name: broker.queue(name) for name in SOURCES}
    side = Side(cfg["side"])
    p, k, rate = cfg["inst"], 0, cfg["rate"]
    due = time.monotonic()
    while not _stop[0]:
        n = 1 if rng.random() < 0.3 else rng.randint(2, MAX_BATCH)
        name = rng.choice(SOURCES)
        due += n / rate
        while not _stop[0]:
            left = due - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.1))
        if _stop[0]:
            break
        if due < time.monotonic() - 1.0:   # far behind (a busy machine): no burst to catch up
            due = time.monotonic()
        q = qs[name]
        if n == 1:
            ids = [q.send(body_of(p, k))]
        else:
            ids = q.send_batch([body_of(p, k + i) for i in range(n)])
        side.write(f"s {time.monotonic():.6f} {name} {int(ids[0][16:], 16)} {n} {p} {k}\n")
        k += n
    broker.close()


def child_pull(cfg: Dict[str, Any]) -> None:
    """Pull events (and dead letters) until SIGTERM; settle each batch."""
    rng = random.Random(cfg["seed"])
    broker = open_broker(cfg)
    events, dead = broker.queue(EVENTS), broker.queue(DEAD)
    side = Side(cfg["side"])
    next_dead = 0.0
    while not _stop[0]:
        batch = events.pull(batch_size=rng.randint(1, MAX_BATCH), wait=0.2)
        if batch:
            settle_pulled(side, EVENTS, batch, rng)
        if time.monotonic() >= next_dead:
            take_dead(side, dead)
            next_dead = time.monotonic() + 0.5
    broker.close()


def make_broker(cfg: Dict[str, Any]) -> qlog.Broker:
    """The worker's broker: jobs' push consumer registered."""
    broker = open_broker(cfg)
    side = Side(cfg["side"])

    def handle(batch: qlog.MessageBatch) -> None:
        msgs = batch.messages
        _, good = note_delivered(side, JOBS, msgs)
        fates = {m.id: fate(m.body["p"], m.body["k"]) for m in good}
        if any(POISON <= fates[m.id] < RAISE and m.attempts == 1 for m in good):
            side.write(f"x {time.monotonic():.6f} {JOBS} {seqs_of(msgs)}\n")
            raise RuntimeError("soak: a handler failure on purpose (the batch is retried)")
        poison = [m for m in good if fates[m.id] < POISON]
        if poison:
            t0 = time.monotonic()
            for m in poison:
                m.retry()
            side.write(f"r {t0:.6f} {JOBS} {seqs_of(poison)}\n")
        skip = {id(m) for m in poison}
        rest = [m for m in msgs if id(m) not in skip]
        if rest:
            side.write(f"h {time.monotonic():.6f} {JOBS} {seqs_of(rest)}\n")

    broker.consumer(JOBS)(handle)
    return broker


_child_broker: Optional[qlog.Broker] = None


def __getattr__(name: str) -> Any:
    """``broker`` for `python -m qlog worker soak:broker`."""
    global _child_broker
    if name == "broker":
        if _child_broker is None:
            _child_broker = make_broker(child_config())
        return _child_broker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- the checker


RET, DELIV, ACK, SETTLED, DEAD_, HANDLED = 1, 2, 4, 8, 16, 32
GROW = 1 << 16


class Ledger:
    """Per message of one queue (by its number in the log): what happened
    to it, its attempts, who holds it and which (producer, k) was sent."""

    def __init__(self) -> None:
        self.state = bytearray()
        self.att = bytearray()
        self.holder = array("i")
        self.expect = array("q")

    def ensure(self, seq: int) -> None:
        if seq >= len(self.state):
            more = seq - len(self.state) + GROW
            self.state.extend(bytes(more))
            self.att.extend(bytes(more))
            self.holder.extend([0] * more)
            self.expect.extend([-1] * more)


def key(p: int, k: int) -> int:
    return (p << 40) | k


class Checker:
    """Applies the side files' events in time order and keeps the counts."""

    def __init__(self, side_dir: str, t0: float, interval: float, rows: int) -> None:
        self.dir = side_dir
        self.t0, self.interval, self.nrows = t0, interval, rows
        self.files: Dict[str, Tuple[int, bytes]] = {}  # name -> (offset, partial line)
        self.buf: List[Tuple[float, int, str, int, List[str]]] = []
        self.order = 0
        self.led = {JOBS: Ledger(), EVENTS: Ledger()}
        self.pending: Dict[Tuple[str, int], Tuple[int, int]] = {}  # delivered, not (yet) reported sent
        self.killed: set = set()
        self.prod_next: Dict[int, int] = {}
        self.dead_by: Dict[Tuple[str, int], int] = {}
        self.c = dict(sent=0, delivered=0, first_deliveries=0, acked=0, handled=0, retried=0,
                      left=0, raised=0, dead_lettered=0, redelivered_as_asked=0,
                      duplicates_in_flight=0, duplicates_unexplained=0, delivered_after_ack=0,
                      attempts_not_growing=0, corrupt=0, dead_letters_again=0,
                      first_seen_again=0)
        self.problems: List[str] = []
        self.sent_in = [0] * rows
        self.acked_in = [0] * rows
        self.lat_in: List[List[int]] = [[] for _ in range(rows)]

    def _row(self, t: float) -> int:
        r = int((t - self.t0) // self.interval)
        return r if 0 <= r < self.nrows else -1

    def problem(self, what: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(what)

    def read(self) -> None:
        """Take the new whole lines of every side file into the buffer
        (producer lines are applied at once: their order does not matter)."""
        for name in sorted(os.listdir(self.dir)):
            off, part = self.files.get(name, (0, b""))
            with open(os.path.join(self.dir, name), "rb") as f:
                f.seek(off)
                data = f.read()
            if not data:
                continue
            data = part + data
            cut = data.rfind(b"\n") + 1
            self.files[name] = (off + len(data) - len(part), data[cut:])
            inst = int(name.split("-")[0])
            for line in data[:cut].decode().splitlines():
                kind, t, *rest = line.split()
                if kind == "s":
                    self._sent(float(t), rest)
                else:
                    self.order += 1
                    self.buf.append((float(t), self.order, kind, inst, rest))

    def apply(self, upto: float) -> None:
        """Apply the buffered events stamped before ``upto``, in time order."""
        self.buf.sort()
        i = bisect.bisect_left(self.buf, (upto,))
        now, self.buf = self.buf[:i], self.buf[i:]
        for t, _, kind, inst, rest in now:
            getattr(self, "_" + kind if kind != "D" else "_dead")(t, inst, rest)

    # -- events

    def _sent(self, t: float, rest: List[str]) -> None:
        qname, first, n, p, k0 = rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4])
        led = self.led[qname]
        led.ensure(first + n)
        for i in range(n):
            s = first + i
            led.expect[s] = key(p, k0 + i)
            led.state[s] |= RET
            got = self.pending.pop((qname, s), None)
            if got is not None and got != (p, k0 + i):
                self.c["corrupt"] += 1
                self.problem(f"{qname} message {s} was delivered as {got}, sent as {(p, k0 + i)}")
        self.prod_next[p] = max(self.prod_next.get(p, 0), k0 + n)
        self.c["sent"] += n
        r = self._row(t)
        if r >= 0:
            self.sent_in[r] += n

    def _identity(self, qname: str, s: int, p: int, k: int) -> None:
        led = self.led[qname]
        if led.state[s] & RET:
            if led.expect[s] != key(p, k):
                self.c["corrupt"] += 1
                e = led.expect[s]
                self.problem(f"{qname} message {s} was delivered as {(p, k)}, sent as {(e >> 40, e & (2**40 - 1))}")
        else:
            self.pending[(qname, s)] = (p, k)

    def _d(self, t: float, inst: int, rest: List[str]) -> None:
        qname, led = rest[0], self.led[rest[0]]
        r = self._row(t)
        for part in rest[1:]:
            s, att, p, k, lat = map(int, part.split(":"))
            led.ensure(s)
            st = led.state[s]
            self.c["delivered"] += 1
            if st & DELIV:
                if att <= led.att[s] and led.att[s] < 255:
                    self.c["attempts_not_growing"] += 1
                    self.problem(f"{qname} message {s}: attempts {att} after {led.att[s]}")
                if st & SETTLED:
                    self.c["redelivered_as_asked"] += 1
                elif st & ACK:
                    self.c["delivered_after_ack"] += 1
                    self.problem(f"{qname} message {s} delivered to {inst} after its ack returned")
                elif led.holder[s] in self.killed:
                    self.c["duplicates_in_flight"] += 1
                else:
                    self.c["duplicates_unexplained"] += 1
                    self.problem(f"{qname} message {s} delivered to {inst} again while {led.holder[s]} "
                                 f"(not killed) held it")
            else:
                self.c["first_deliveries"] += 1
                if att > 1:   # an earlier delivery went to a process killed before it wrote it down
                    self.c["first_seen_again"] += 1
                if att == 1 and r >= 0:
                    self.lat_in[r].append(lat)
            led.state[s] = (st | DELIV) & ~(SETTLED | HANDLED)
            led.att[s] = min(att, 255)
            led.holder[s] = inst
            if p >= 0:
                self._identity(qname, s, p, k)

    def _settle(self, rest: List[str], flag: int, count: str) -> int:
        led = self.led[rest[0]]
        for part in rest[1:]:
            s = int(part)
            led.ensure(s)
            led.state[s] |= flag
        self.c[count] += len(rest) - 1
        return len(rest) - 1

    def _a(self, t: float, inst: int, rest: List[str]) -> None:
        n = self._settle(rest[1:], ACK, "acked")
        r = self._row(float(rest[0]))
        if r >= 0:
            self.acked_in[r] += n

    def _h(self, t: float, inst: int, rest: List[str]) -> None:
        n = self._settle(rest, HANDLED, "handled")
        r = self._row(t)
        if r >= 0:
            self.acked_in[r] += n

    def _r(self, t: float, inst: int, rest: List[str]) -> None:
        self._settle(rest, SETTLED, "retried")

    def _x(self, t: float, inst: int, rest: List[str]) -> None:
        self._settle(rest, SETTLED, "raised")

    def _l(self, t: float, inst: int, rest: List[str]) -> None:
        self._settle(rest, SETTLED, "left")

    def _c(self, t: float, inst: int, rest: List[str]) -> None:
        self.c["corrupt"] += len(rest) - 1
        self.problem(f"{rest[0]}: damaged bodies of messages {rest[1:6]}")

    def _dead(self, t: float, inst: int, rest: List[str]) -> None:
        for part in rest:
            qname, s, p, k = part.split(":")
            s, p, k = int(s), int(p), int(k)
            if qname not in self.led or p < 0:
                self.c["corrupt"] += 1
                self.problem(f"a dead letter {part} is not a message that was sent")
                continue
            led = self.led[qname]
            led.ensure(s)
            before = self.dead_by.get((qname, s))
            if before is not None:
                self.c["dead_letters_again"] += 1
                if before not in self.killed:
                    self.c["duplicates_unexplained"] += 1
                    self.problem(f"dead letter {qname} {s} delivered again while {before} (not killed) held it")
            else:
                self.c["dead_lettered"] += 1
            self.dead_by[(qname, s)] = inst
            led.state[s] |= DEAD_
            self._identity(qname, s, p, k)

    # -- the end

    def finish(self) -> Dict[str, int]:
        """Apply everything left and count the lost messages and the sends
        delivered though never reported (a killed producer's last call)."""
        self.apply(math.inf)
        lost = 0
        for qname, led in self.led.items():
            for s, st in enumerate(led.state):
                if not st & RET or st & (ACK | HANDLED | DEAD_):
                    continue
                if st & DELIV and not st & SETTLED and led.holder[s] in self.killed:
                    continue
                lost += 1
                self.problem(f"lost: {qname} message {s} (state {st:#x}, holder {led.holder[s]})")
        by_p: Dict[int, List[Tuple[str, int]]] = {}
        for (qname, s), (p, k) in self.pending.items():
            by_p.setdefault(p, []).append((qname, k))
        unreported = 0
        for p, got in by_p.items():
            ks = sorted(k for _, k in got)
            nxt = self.prod_next.get(p, 0)
            ok = (p in self.killed and len({q for q, _ in got}) == 1 and ks[0] >= nxt
                  and ks == list(range(ks[0], ks[0] + len(ks))) and ks[0] == nxt)
            if ok:
                unreported += len(ks)
            else:
                self.c["corrupt"] += len(ks)
                self.problem(f"producer {p}: messages {ks[:5]} delivered but never reported, and not "
                             f"the call in flight at a kill (next reported k {nxt})")
        return {"lost": lost, "in_flight_sends_delivered": unreported}


# ---------------------------------------------------------------- the parent


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def disk_bytes(path: str) -> int:
    """Space the files under ``path`` take (allocated blocks)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for n in files + dirs:
            try:
                total += os.lstat(os.path.join(root, n)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def oldest_segment(log_dir: str) -> Optional[int]:
    """The number of the first record of the oldest segment still kept."""
    bases = [int(n[:20]) for n in os.listdir(log_dir) if len(n) == 24 and n.endswith(".seg")]
    return min(bases) if bases else None


ROLES = ("producer", "pull", "worker")


class Proc:
    """A child process: its role, its slot in the role, its instance id."""

    def __init__(self, role: str, index: int, inst: int, popen: subprocess.Popen, log: str) -> None:
        self.role, self.index, self.inst, self.popen, self.log = role, index, inst, popen, log


class Soak:
    """The run's children: starting, killing (seeded victims and intervals),
    restarting and stopping them; the kills and failures made."""

    def __init__(self, args: argparse.Namespace, root: str) -> None:
        self.args = args
        self.root = root
        self.data = os.path.join(root, "data")
        self.side = os.path.join(root, "side")
        self.logs = os.path.join(root, "logs")
        for d in (self.data, self.side, self.logs):
            os.makedirs(d, exist_ok=True)
        self.rng = random.Random(args.seed)
        self.inst = 0
        self.procs: List[Proc] = []
        self.kills = {r: 0 for r in ROLES}
        self.failures: List[str] = []
        self.killed: set = set()   # instances killed (their holdings were in flight)

    def cfg(self, role: str, inst: int) -> Dict[str, Any]:
        return {"role": role, "inst": inst, "path": self.data, "checkpoint_every": self.args.checkpoint_every,
                "side": os.path.join(self.side, f"{inst:06d}-{role}"), "seed": self.rng.getrandbits(32),
                "rate": self.args.rate / self.args.producers}

    def start(self, role: str, index: int) -> Proc:
        self.inst += 1
        cfg = self.cfg(role, self.inst)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env[CHILD_ENV] = json.dumps(cfg)
        if role == "worker":
            argv = [sys.executable, "-m", "qlog", "worker", "soak:broker"]
        else:
            argv = [sys.executable, os.path.abspath(__file__), "--child"]
        log = os.path.join(self.logs, f"{self.inst:06d}-{role}.log")
        with open(log, "wb") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=env, cwd=self.root)
        p = Proc(role, index, self.inst, popen, log)
        self.procs.append(p)
        return p

    def killable(self) -> List[Proc]:
        count = {r: sum(p.role == r for p in self.procs) for r in ROLES}
        return [p for p in self.procs if p.role == "worker" or p.index > 0 or count[p.role] == 1]

    def kill_one(self) -> str:
        victim = self.rng.choice(self.killable())
        self.killed.add(victim.inst)   # before the kill: its holdings are in flight from now on
        os.kill(victim.popen.pid, signal.SIGKILL)
        victim.popen.wait()
        self.procs.remove(victim)
        self.kills[victim.role] += 1
        self.start(victim.role, victim.index)
        return victim.role

    def reap_failed(self) -> None:
        """A child that exited on its own is a failure; start another."""
        for p in list(self.procs):
            rc = p.popen.poll()
            if rc is not None:
                with open(p.log, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                self.failures.append(f"{p.role} {p.inst} exited with status {rc}: {tail}")
                self.procs.remove(p)
                if len(self.failures) > 5:
                    raise SystemExit("children keep failing:\n" + "\n".join(self.failures))
                self.start(p.role, p.index)

    def stop(self, roles: Sequence[str], timeout: float = 60.0) -> None:
        """SIGTERM the processes of ``roles`` and wait for their clean exit."""
        group = [p for p in self.procs if p.role in roles]
        for p in group:
            p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in group:
            try:
                rc = p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                rc = p.popen.wait()
                self.failures.append(f"{p.role} {p.inst} did not stop within {timeout:.0f} s of SIGTERM")
            else:
                if rc == -signal.SIGTERM:
                    # Stopped before its handler was installed: before it opened
                    # the directory (counted as killed all the same).
                    self.killed.add(p.inst)
                elif rc != 0:
                    with open(p.log, "rb") as f:
                        tail = f.read()[-2000:].decode(errors="replace")
                    self.failures.append(f"{p.role} {p.inst} exited with status {rc} on SIGTERM: {tail}")
            self.procs.remove(p)

    def kill_all(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()
        self.procs = []


def caught_up(path: str) -> bool:
    """Nothing visible is left unconsumed in any queue."""
    with qlog.open(path, durability="interval") as broker:
        for name in (JOBS, EVENTS, DEAD):
            st = broker.queue(name).stats()
            if st.backlog != st.in_flight + st.delayed:
                return False
    return True


def final_drain(path: str, side_path: str) -> None:
    """Pull and ack everything left, with a clock an hour ahead (every
    lease has run out, no message is past its retention), recording like a
    pull consumer."""
    side = Side(side_path)
    with qlog.open(path, durability="interval", clock=lambda: time.time() + 3600) as broker:
        dead = broker.queue(DEAD)
        for name in SOURCES:
            q = broker.queue(name)
            while True:
                batch = q.pull(batch_size=1000)
                if not batch:
                    break
                settle_pulled(side, name, batch, None)
        while take_dead(side, dead):
            pass


def pct(xs: List[int], p: float) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] / 1000.0


HEAD = ("time", "sent/s", "acked/s", "p50 ms", "p99 ms", "RSS producer", "RSS pull", "RSS worker",
        "disk MiB", "kills")
WIDTH = (6, 8, 8, 8, 8, 12, 9, 10, 9, 6)


def fmt_row(cells: Sequence[str]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cells, WIDTH))


def row_cells(row: Dict[str, Any]) -> List[str]:
    def ms(x: Optional[float]) -> str:
        return "-" if x is None else f"{x:.1f}"
    end = row["end_s"]
    return [f"{int(end // 60)}:{int(end % 60):02d}", f"{row['sent_per_s']:.0f}", f"{row['acked_per_s']:.0f}",
            ms(row["p50_ms"]), ms(row["p99_ms"]), f"{row['rss_mib']['producer']:.1f}",
            f"{row['rss_mib']['pull']:.1f}", f"{row['rss_mib']['worker']:.1f}", f"{row['disk_mib']:.1f}",
            str(row["kills"])]


def verdict(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The last row against the first row after warm-up (the first fifth)."""
    if len(rows) < 2:
        return {"ok": True, "note": "fewer than two rows: nothing to compare"}
    warm = max(1, math.ceil(len(rows) / 5))
    base = rows[min(warm, len(rows) - 1)]
    last = rows[-1]
    out: Dict[str, Any] = {"baseline_row": base["end_s"], "last_row": last["end_s"], "ok": True, "checks": []}
    pairs = [("disk MiB", base["disk_mib"], last["disk_mib"], 2.0)]
    pairs += [(f"RSS {r} MiB", base["rss_mib"][r], last["rss_mib"][r], 1.5) for r in ROLES]
    for what, b, l, factor in pairs:
        bound = factor * b + 16
        ok = l <= bound
        out["checks"].append({"what": what, "baseline": round(b, 2), "last": round(l, 2),
                              "bound": round(bound, 2), "ok": ok})
        out["ok"] &= ok
    return out


def run(args: argparse.Namespace, root: str) -> Dict[str, Any]:
    soak = Soak(args, root)
    configure(args.checkpoint_every)
    with open(os.path.join(soak.data, "qlog.toml"), "w") as f:
        f.write(toml_text(args.segment_bytes))
    with qlog.open(soak.data, durability="interval") as broker:   # the queues exist before any child
        for name in (JOBS, EVENTS, DEAD):
            broker.queue(name)
    nrows = max(1, math.ceil(args.minutes * 60 / args.interval))
    duration = args.minutes * 60
    t0 = time.monotonic()
    checker = Checker(soak.side, t0, args.interval, nrows)
    checker.killed = soak.killed
    samples = [{"rss": {r: 0.0 for r in ROLES}, "disk": 0, "kills": 0} for _ in range(nrows)]
    rows: List[Dict[str, Any]] = []
    try:
        soak.start("worker", 0)
        for i in range(args.consumers):
            soak.start("pull", i)
        for i in range(args.producers):
            soak.start("producer", i)
        print(fmt_row(HEAD), flush=True)
        print(fmt_row(["-" * w for w in WIDTH]), flush=True)

        def emit(r: int) -> None:
            lat = checker.lat_in[r]
            row = {"end_s": min((r + 1) * args.interval, duration),
                   "sent_per_s": checker.sent_in[r] / args.interval,
                   "acked_per_s": checker.acked_in[r] / args.interval,
                   "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
                   "rss_mib": samples[r]["rss"], "disk_mib": samples[r]["disk"] / MiB,
                   "kills": samples[r]["kills"]}
            checker.lat_in[r] = []   # later arrivals for this row are not shown
            rows.append(row)
            print(fmt_row(row_cells(row)), flush=True)

        next_kill = t0 + args.kill_every * soak.rng.uniform(0.5, 1.5)
        next_read = t0
        while True:
            now = time.monotonic()
            if now >= t0 + duration:
                break
            r = min(nrows - 1, int((now - t0) // args.interval))
            soak.reap_failed()
            for p in soak.procs:
                s = samples[r]["rss"]
                s[p.role] = max(s[p.role], rss_mib(p.popen.pid))
            samples[r]["disk"] = max(samples[r]["disk"], disk_bytes(soak.data))
            if args.kill_every > 0 and now >= next_kill:
                soak.kill_one()
                samples[r]["kills"] += 1
                next_kill = now + args.kill_every * soak.rng.uniform(0.5, 1.5)
            if now >= next_read:
                checker.read()
                checker.apply(time.monotonic() - LAG)
                while len(rows) < nrows and time.monotonic() >= t0 + (len(rows) + 1) * args.interval + LAG:
                    emit(len(rows))
                next_read = now + 2.0
            time.sleep(max(0.0, min(0.5, t0 + duration - time.monotonic(), next_kill - time.monotonic())))
        # The end: producers stop cleanly, consumers catch up and stop, the rest is drained here.
        t_end = time.monotonic()
        soak.stop(["producer"])
        deadline = time.monotonic() + VISIBILITY + 30
        while time.monotonic() < deadline and not caught_up(soak.data):
            soak.reap_failed()
            time.sleep(0.5)
        soak.stop(["pull", "worker"])
        soak.kill_all()
        final_drain(soak.data, os.path.join(soak.side, "000000-drain"))
        checker.read()
        end = checker.finish()
        while len(rows) < nrows:
            emit(len(rows))
        drain_s = time.monotonic() - t_end
        disk_end = disk_bytes(soak.data)
    finally:
        soak.kill_all()
    verify = subprocess.run([sys.executable, "-m", "qlog", "verify", "--json", soak.data],
                            capture_output=True, text=True, env=dict(os.environ), cwd=root)
    try:
        verified = json.loads(verify.stdout)
    except ValueError:
        verified = {"ok": False, "error": verify.stdout[-2000:] + verify.stderr[-2000:]}
    if not verified.get("ok"):
        checker.c["corrupt"] += 1
        checker.problem(f"qlog verify found damage: {json.dumps(verified)[:2000]}")
    with qlog.open(soak.data, durability="interval") as broker:
        qstats = {name: broker.queue(name).stats() for name in (JOBS, EVENTS, DEAD)}
    logs = {}
    for name in (JOBS, EVENTS, DEAD):
        for kind in ("messages", "state"):
            d = os.path.join(soak.data, "queues", name, kind)
            segs = [n for n in os.listdir(d) if n.endswith(".seg")]
            logs[f"{name}/{kind}"] = {"oldest_segment": oldest_segment(d), "segments": len(segs)}
    totals = dict(checker.c, **end, kills=sum(soak.kills.values()), kills_by_role=dict(soak.kills),
                  child_failures=len(soak.failures), drain_seconds=round(drain_s, 1),
                  disk_mib_at_end=disk_end / MiB,
                  queue_stats={n: {"acked": s.acked, "dead_lettered": s.dead_lettered, "backlog": s.backlog}
                               for n, s in qstats.items()},
                  logs=logs, verify_ok=bool(verified.get("ok")),
                  verify_records=verified.get("records"))
    flat = verdict(rows)
    ok = (totals["lost"] == 0 and totals["corrupt"] == 0 and totals["duplicates_unexplained"] == 0
          and totals["delivered_after_ack"] == 0 and totals["attempts_not_growing"] == 0
          and not soak.failures and flat["ok"])
    return {"config": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows,
            "totals": totals, "flatness": flat, "problems": checker.problems,
            "failures": soak.failures, "ok": ok}


def print_end(report: Dict[str, Any], args: argparse.Namespace, root: str) -> None:
    t = report["totals"]
    print()
    print(f"totals: {t['sent']} messages sent (returned), {t['delivered']} deliveries "
          f"({t['first_deliveries']} first), {t['acked']} acked by pull consumers, {t['handled']} handled by "
          f"the push worker, {t['dead_lettered']} dead-lettered")
    print(f"  retried {t['retried']}, handler raised for {t['raised']}, left leased {t['left']}; "
          f"redelivered as asked {t['redelivered_as_asked']}")
    print(f"  lost {t['lost']}, corrupt {t['corrupt']}, duplicates {t['duplicates_in_flight'] + t['first_seen_again']} "
          f"({t['duplicates_in_flight']} delivered again after a process killed while holding them wrote "
          f"their delivery down; {t['first_seen_again']} first seen with attempts > 1: an earlier delivery left "
          f"no line, as when a process is killed between taking a message and writing it down), "
          f"unexplained duplicates {t['duplicates_unexplained']}, "
          f"delivered after ack {t['delivered_after_ack']}, attempts not growing {t['attempts_not_growing']}")
    print(f"  kills {t['kills']} ({', '.join(f'{r} {n}' for r, n in t['kills_by_role'].items())}); "
          f"child failures {t['child_failures']}; sends of a killed producer's last call delivered "
          f"{t['in_flight_sends_delivered']}; dead letters delivered again {t['dead_letters_again']}")
    print(f"  qlog verify: {'ok' if t['verify_ok'] else 'DAMAGE'} ({t['verify_records']} records); disk at end "
          f"{t['disk_mib_at_end']:.1f} MiB; oldest kept segment: "
          + ", ".join(f"{k} {v['oldest_segment']}" for k, v in t["logs"].items() if k.endswith("messages"))
          + f"; drain {t['drain_seconds']} s")
    f = report["flatness"]
    if "checks" in f:
        print(f"flatness (row {fmt_time(f['last_row'])} against row {fmt_time(f['baseline_row'])}; bounds: "
              f"disk 2x + 16 MiB, RSS 1.5x + 16 MiB): "
              + "; ".join(f"{c['what']} {c['baseline']} -> {c['last']} (<= {c['bound']}) "
                          f"{'ok' if c['ok'] else 'GREW'}" for c in f["checks"]))
    else:
        print(f"flatness: {f['note']}")
    for p in report["problems"] + report["failures"]:
        print(f"  ! {p}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'OK' if report['ok'] else 'FAILED'} (seed {args.seed}; rerun: python benchmarks/soak.py "
          f"--minutes {args.minutes:g} --rate {args.rate:g} --producers {args.producers} --consumers "
          f"{args.consumers} --kill-every {args.kill_every:g} --interval {args.interval:g} --seed {args.seed})")
    if not report["ok"]:
        print(f"the run's directory is kept: {root}")


def fmt_time(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, help="how long producers send (required)")
    ap.add_argument("--rate", type=float, default=2000.0, help="messages a second, all producers (default 2000)")
    ap.add_argument("--producers", type=int, default=2, help="producer processes (default 2)")
    ap.add_argument("--consumers", type=int, default=2, help="pull consumer processes (default 2)")
    ap.add_argument("--kill-every", type=float, default=10.0,
                    help="seconds between SIGKILLs on average (default 10; 0: none)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the kills and the children (default: random)")
    ap.add_argument("--interval", type=float, default=60.0, help="seconds a report row covers (default 60)")
    ap.add_argument("--json", help="also write the report as JSON to this file")
    ap.add_argument("--dir", help="directory for the run (default: a new one under ./.soak-tmp)")
    ap.add_argument("--segment-bytes", type=int, default=1 << 20, help="message log segment size (default 1 MiB)")
    ap.add_argument("--checkpoint-every", type=int, default=1000,
                    help="journal records between checkpoints (default 1000)")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory after a clean run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        cfg = child_config()
        signal.signal(signal.SIGTERM, _on_term)
        {"producer": child_producer, "pull": child_pull}[cfg["role"]](cfg)
        return 0
    if args.minutes is None:
        ap.error("--minutes is required")
    if args.minutes <= 0 or args.rate <= 0 or args.interval <= 0 or args.producers < 1 or args.consumers < 1:
        ap.error("--minutes, --rate and --interval must be positive; --producers and --consumers at least 1")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    parent = args.dir or os.path.join(os.getcwd(), ".soak-tmp")
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="soak-", dir=parent)
    print(f"qlog soak: {args.minutes:g} min, {args.rate:g} msg/s, {args.producers} producers, {args.consumers} "
          f"pull consumers + 1 `qlog worker`, a SIGKILL every ~{args.kill_every:g} s, seed {args.seed}; "
          f"directory {root}", flush=True)
    report = run(args, root)
    print_end(report, args, root)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if report["ok"] and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
        if not args.dir:
            try:
                os.rmdir(parent)
            except OSError:
                pass
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
