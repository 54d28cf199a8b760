"""kill -9 at random moments, for every role and every durability mode, one
role at a time and all three at once: nothing a returned call reported is
lost on a process crash, nothing corrupt is delivered, and the only
duplicates are of messages in flight at the kill.

Roles (each under "none", "interval" and "sync"):

- producer: ``send`` and ``send_batch`` of 1 to 40 messages;
- pull consumer: ``pull``, ``ack``, ``retry``, ``ack_all`` (some messages
  left leased), retries running into the dead-letter queue;
- push consumer: a real ``python -m qlog worker app:broker`` whose handler
  acks most messages itself and raises for some (they are retried, then
  dead-lettered after ``max_retries``).  In about half of the worker's
  rounds (at least one per durability mode) the kill is arranged to land
  inside a batch: the handler of a chosen batch marks that it started it
  (a file named for its process), settles a chosen number of its messages
  and then never returns; the test waits for the mark and kills.  In the
  other rounds the kill comes after a chosen number of deliveries, whatever
  the worker is doing then (or after it ran out of work).

Producers and pull consumers are forked from one long-lived child
interpreter (:func:`zygote`) that imported qlog once, so a kill costs a
fork, not an interpreter start; each forked process is a real process that
opens the queue itself and is SIGKILLed by its pid.  Workers are fresh
``qlog worker`` processes.  After every kill (every round of three kills
when all roles run at once) the data directory is reopened and
:func:`_invariants.check` states the guarantees and drains the queues (so
each round starts from empty queues and a history that goes on).

The randomness is seeded (``QLOG_KILL_SEED`` overrides the default seed of
each test); the seed is printed, and named in every failure.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import List, Optional, Tuple

import pytest

import qlog
from _crashkit import Child, child_env, jitter
from _invariants import Fact, FactWriter, Report, check, make_body, read_facts
from test_queue_crash import small_journal

QUEUE = "jobs"
DLQ = "jobs-dlq"
MAX_RETRIES = 2
SETTINGS = {
    QUEUE: dict(max_retries=MAX_RETRIES, dead_letter_queue=DLQ, message_retention=None,
                visibility_timeout=30.0, retry_delay=0),
    DLQ: dict(message_retention=None),
}
MODES = ("none", "interval", "sync")
KILLS = {"producer": 12, "consumer": 12, "worker": 7}   # per durability mode: 93 kills in all
ALL_AT_ONCE_ROUNDS = 3    # per durability mode: rounds of three kills (27 more)
PRODUCER_LIMIT = 30       # batches a producer sends in a round with the others
ROUND_MESSAGES = 60       # sent before each consumer or worker round
CHECKPOINT_EVERY = 20     # journal records between checkpoints: kills land in checkpoints
FAIL_EVERY = 4            # the worker's handler fails every message whose index in its batch is a multiple
WORKER_BATCH = 8          # the worker's max_batch_size
HOLD_ENV = "QLOG_KILL_MATRIX_HOLD"   # "<deliveries> <settled>": the worker's batch to be killed inside

# ---- the zygote: one interpreter, a fork per victim -----------------------------


def child_main() -> None:
    """Entry point of a child interpreter: ``<func>(**json)`` of this module."""
    func, kwargs = sys.argv[1], json.loads(sys.argv[2])
    globals()[func](**kwargs)


def zygote() -> None:
    """Child main: for each JSON line on stdin, ``{"func", "kwargs"}``: fork
    a process running ``func(**kwargs)`` and print ``pid <pid>`` (it prints
    ``failed <pid>`` if it raises); ``{"reap": pid}``: wait for that process
    and print ``reaped <pid> <wait status>``.  Returns at the end of stdin."""
    small_journal(setattr, CHECKPOINT_EVERY)
    os.write(1, b"ready\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if "reap" in cmd:
            _, status = os.waitpid(cmd["reap"], 0)
            os.write(1, b"reaped %d %d\n" % (cmd["reap"], status))
            continue
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                globals()[cmd["func"]](**cmd["kwargs"])
            except BaseException:   # noqa: B902 - reported on stderr and stdout, seen by the test
                import traceback
                traceback.print_exc()
                os.write(1, b"failed %d\n" % os.getpid())
                code = 1
            finally:
                os._exit(code)
        os.write(1, b"pid %d\n" % pid)


def _idle() -> None:
    """Say "drained" and wait to be killed."""
    os.write(1, b"drained %d\n" % os.getpid())
    while True:
        time.sleep(3600)


def producer(path: str, durability: str, side: str, prefix: str, seed: int, limit: int = 1 << 30) -> None:
    """Forked main: send batches ``<prefix>.<k>`` of 1 to 40 messages
    (``send`` for one), recording each call before and after; after
    ``limit`` batches say "drained" and wait."""
    rng = random.Random(seed)
    broker = qlog.open(path, durability=durability)
    q = broker.queue(QUEUE, **SETTINGS[QUEUE])
    w = FactWriter(side)
    for k in range(limit):
        n = rng.choice([1, 1, rng.randint(2, 10), rng.randint(10, 40)])
        batch = f"{prefix}.{k}"
        bodies = [make_body(batch, i, n, rng.randrange(300)) for i in range(n)]
        w.sending(QUEUE, batch, n, durability)
        ids = [q.send(bodies[0])] if n == 1 else q.send_batch(bodies)
        w.sent(QUEUE, batch, durability, ids)
    _idle()


def consumer(path: str, durability: str, side: str, seed: int) -> None:
    """Forked main: pull batches of 1 to 15; ack most messages one by one,
    retry some (the third retry dead-letters), leave some leased, sometimes
    ack_all the rest; records every call before and after it."""
    rng = random.Random(seed)
    broker = qlog.open(path, durability=durability)
    q = broker.queue(QUEUE, **SETTINGS[QUEUE])
    w = FactWriter(side)
    while True:
        batch = q.pull(batch_size=rng.randint(1, 15))
        if not batch:
            _idle()
        w.delivered(QUEUE, batch)
        w.settle(QUEUE, batch, rng, ack=0.6, retry=0.25, ack_all=0.5)


# ---- the push consumer's application ------------------------------------------------

APP = """
import os
import time

import qlog
import qlog._local.backend
from _invariants import FactWriter, body_key

qlog.Broker.checkpoint_every = {checkpoint_every}
qlog._local.backend._JOURNAL_SEGMENT = 65536

broker = qlog.open({data!r}, durability={durability!r})
facts = FactWriter(os.path.join({side_dir!r}, "worker-%d.txt" % os.getpid()))
# {hold_env}="<deliveries> <settled>": the batch that brings this process's
# deliveries to <deliveries> is held: its handler marks that it started it,
# settles its first <settled> messages and never returns (until SIGKILL).
hold = os.environ.get({hold_env!r})
hold_deliveries, hold_settled = map(int, hold.split()) if hold else (0, 0)
deliveries = 0


def failing(m):
    return body_key(m.body)[1] % {fail_every} == 0


def inside_for_good():
    while True:
        time.sleep(3600)


@broker.consumer({queue!r}, max_batch_size={batch_size}, max_batch_timeout=0, **{settings!r})
def handle(batch):
    global deliveries
    facts.delivered({queue!r}, batch.messages)
    held = bool(hold) and deliveries < hold_deliveries <= deliveries + len(batch.messages)
    deliveries += len(batch.messages)
    if held:
        os.close(os.open(os.path.join({side_dir!r}, "inside-%d" % os.getpid()), os.O_WRONLY | os.O_CREAT, 0o600))
    bad = []
    for j, m in enumerate(batch.messages):
        if held and j == hold_settled:
            inside_for_good()
        if failing(m):
            bad.append(m.id)
        else:
            facts.acking({queue!r}, [m.id])
            m.ack()
            facts.acked({queue!r}, [m.id])
    if held:
        inside_for_good()
    if bad:
        facts.retrying({queue!r}, bad)
        raise RuntimeError("failing on purpose: %d messages" % len(bad))
"""


# ---- the test ------------------------------------------------------------------------


class Zygote:
    """The long-lived child that forks the producers and consumers."""

    def __init__(self) -> None:
        self.child = Child("zygote", module="test_kill_matrix")
        self.live: List[int] = []
        self.child.wait_line("ready")

    def _send(self, cmd: dict) -> None:
        self.child.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.child.proc.stdin.flush()

    def start(self, func: str, **kwargs: object) -> int:
        before = sum(x.startswith("pid ") for x in self.child.lines)
        self._send({"func": func, "kwargs": kwargs})
        self.child.wait_until(lambda c: sum(x.startswith("pid ") for x in c.lines) > before, "a fork")
        pid = int([x for x in self.child.lines if x.startswith("pid ")][-1].split()[1])
        self.live.append(pid)
        return pid

    def failed(self, pid: int) -> bool:
        return f"failed {pid}" in self.child.lines

    def drained(self, pid: int) -> bool:
        return f"drained {pid}" in self.child.lines

    def _reap(self, pid: int) -> int:
        self._send({"reap": pid})
        self.child.wait_until(lambda c: any(x.startswith(f"reaped {pid} ") for x in c.lines),
                              f"process {pid} reaped")
        self.live.remove(pid)
        return int(next(x for x in self.child.lines if x.startswith(f"reaped {pid} ")).split()[2])

    def kill(self, pid: int) -> None:
        """SIGKILL the forked process ``pid`` and reap it; fail if it had failed on its own."""
        assert not self.failed(pid), f"process {pid} failed:\n{self.child.stderr}"
        os.kill(pid, signal.SIGKILL)
        status = self._reap(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"process {pid} ended with wait status {status}, not by SIGKILL:\n{self.child.stderr}")

    def close(self) -> None:
        """Kill the forked processes still running (a test that failed half-way), then end the zygote."""
        for pid in list(self.live):
            os.kill(pid, signal.SIGKILL)
            self._reap(pid)
        assert self.child.finish() == 0, self.child.stderr


def _seed(role: str, durability: str) -> int:
    env = os.environ.get("QLOG_KILL_SEED")
    return int(env) if env else random.Random(f"kill-matrix/{role}/{durability}").getrandbits(32)


def _count(side: str, kind: str) -> int:
    return sum(f.kind == kind for f in read_facts([side]))


def _send_round(path: str, durability: str, side: str, prefix: str, rng: random.Random) -> None:
    """Send ROUND_MESSAGES messages in batches, recorded in ``side``."""
    w = FactWriter(side)
    with qlog.open(path, durability=durability) as broker:
        q = broker.queue(QUEUE, **SETTINGS[QUEUE])
        left, k = ROUND_MESSAGES, 0
        while left:
            n = min(left, rng.randint(1, 20))
            batch = f"{prefix}.{k}"
            w.sending(QUEUE, batch, n, durability)
            w.sent(QUEUE, batch, durability, q.send_batch([make_body(batch, i, n) for i in range(n)]))
            left -= n
            k += 1
    w.close()


class Matrix:
    """One test: its data directory, its seeded randomness, the history so
    far; kill, check, add up."""

    def __init__(self, tmp_path, role: str, durability: str, seed: int) -> None:
        self.tmp, self.role, self.durability, self.seed = tmp_path, role, durability, seed
        self.path = str(tmp_path / "q")
        self.rng = random.Random(seed)
        self.facts: List[Fact] = []
        self.total = Report()
        self.kills: Counter = Counter()   # role -> kills
        self.sent: set = set()   # (queue, id) of every message a returned send reported
        self.busy_kills = 0   # kills that landed before the victim ran out of work
        self.held_kills = 0   # worker kills that landed inside a batch by construction (held)
        self.app: Optional[pathlib.Path] = None
        with qlog.open(self.path, durability=durability) as broker:   # the queues exist before any victim
            for name, s in SETTINGS.items():
                broker.queue(name, **s)

    def rerun(self) -> str:
        return (f"seed {self.seed}; rerun with QLOG_KILL_SEED={self.seed} python -m pytest -s "
                f"tests/test_kill_matrix.py -k '{self.role} and {self.durability}'")

    def check(self, sides: List[str], ordered: bool = True) -> Report:
        """Run the checker on the history so far plus the facts in ``sides``
        (``ordered``: one victim at a time, so the facts are in order)."""
        self.facts += read_facts(sides)
        try:
            rep = check(self.path, self.facts, settings=SETTINGS, durability=self.durability, ordered=ordered)
        except AssertionError as e:
            raise AssertionError(f"after kill {sum(self.kills.values())} ({self.role}, {self.durability}): "
                                 f"{e}\n{self.rerun()}") from None
        self.facts += rep.facts
        self.total.add(rep)
        # The history goes on from check to check: its history-wide counts are the last check's,
        # and the messages of sends in flight each check found are added to the ones sent.
        self.sent.update((f.queue, f.id) for f in self.facts if f.kind == "sent")
        self.total.checked = len(self.sent) + self.total.sends_in_flight
        self.total.acks_in_flight, self.total.expired = rep.acks_in_flight, rep.expired
        return rep

    def summary(self) -> str:
        t = self.total
        kills = " ".join(f"{r}={n}" for r, n in sorted(self.kills.items()))
        return (f"kill matrix {self.role}/{self.durability}: kills {kills} busy={self.busy_kills} "
                f"held={self.held_kills} "
                f"checked={t.checked} lost={t.lost} corrupt={t.corrupt} "
                f"duplicates_in_flight={t.duplicates_in_flight} redelivered_in_flight={t.redelivered} "
                f"duplicates_otherwise={t.duplicates_otherwise} sends_in_flight={t.sends_in_flight} "
                f"acks_in_flight={t.acks_in_flight} dead_lettered={t.dead_lettered} "
                f"torn_tail_bytes={t.torn_tail_bytes} seed={self.seed}")

    def start_worker(self, hold: Optional[Tuple[int, int]] = None) -> Tuple[subprocess.Popen, str]:
        """``python -m qlog worker app:broker`` on this directory; returns it and its side file.
        ``hold=(deliveries, settled)``: the batch that brings its deliveries to ``deliveries``
        is held (see APP); :meth:`inside` tells when it started."""
        app = self.tmp / "app"
        if self.app is None:
            app.mkdir()
            (app / "app.py").write_text(APP.format(
                checkpoint_every=CHECKPOINT_EVERY, data=self.path, durability=self.durability,
                side_dir=str(app), queue=QUEUE, settings=SETTINGS[QUEUE], fail_every=FAIL_EVERY,
                batch_size=WORKER_BATCH, hold_env=HOLD_ENV))
            self.app = app
        env = child_env()
        env.pop("QLOG_SUPERVISOR_PID", None)
        env.pop(HOLD_ENV, None)
        if hold is not None:
            env[HOLD_ENV] = "%d %d" % hold
        with open(app / "worker.log", "ab") as log:
            w = subprocess.Popen([sys.executable, "-m", "qlog", "worker", "app:broker"], cwd=app, env=env,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return w, str(app / f"worker-{w.pid}.txt")

    def inside(self, w: subprocess.Popen) -> bool:
        """The worker ``w`` started its held batch (and so is inside it until killed)."""
        return (self.tmp / "app" / f"inside-{w.pid}").exists()

    def kill_worker(self, w: subprocess.Popen) -> None:
        assert w.poll() is None, f"worker exited with {w.returncode}:\n{(self.tmp / 'app' / 'worker.log').read_text()}"
        w.send_signal(signal.SIGKILL)
        assert w.wait(60) == -signal.SIGKILL, f"worker ended with {w.returncode}, not by SIGKILL"
        self.kills["worker"] += 1


def _kill_point(rng: random.Random, big: int) -> int:
    """How many facts of the awaited kind a victim records before its kill."""
    return rng.choice([0, 1, rng.randint(1, big // 4), rng.randint(big // 4, big)])


def _run_forked(m: Matrix, z: Zygote, wait_until) -> None:
    for r in range(KILLS[m.role]):
        side = str(m.tmp / f"{m.role}{r}.txt")
        sides = [side]
        if m.role == "producer":
            pid = z.start("producer", path=m.path, durability=m.durability, side=side, prefix=f"p{r}",
                          seed=m.rng.getrandbits(32))
            want, kind = _kill_point(m.rng, 30), "sent"
        else:
            sends = str(m.tmp / f"sends{r}.txt")
            _send_round(m.path, m.durability, sends, f"c{r}", m.rng)
            sides.insert(0, sends)
            pid = z.start("consumer", path=m.path, durability=m.durability, side=side,
                          seed=m.rng.getrandbits(32))
            want, kind = _kill_point(m.rng, ROUND_MESSAGES // 2), "ack"
        wait_until(lambda: _count(side, kind) >= want or z.drained(pid) or z.failed(pid),
                   timeout=60, what=f"{m.role} {r}: {want} {kind} facts")
        jitter(m.rng)
        m.busy_kills += not z.drained(pid)
        z.kill(pid)
        m.kills[m.role] += 1
        m.check(sides)


def _run_held_worker(m: Matrix, r: int, wait_until) -> str:
    """A round whose kill lands inside a batch by construction: the worker
    holds the batch that brings its deliveries to a chosen number (at most
    ROUND_MESSAGES, so it is reached: every message of the round is
    delivered at least once), after settling a chosen number of its
    messages; the test waits for the handler's mark and kills.  Returns
    the worker's side file."""
    want = m.rng.choice([1, m.rng.randint(1, 20), m.rng.randint(20, ROUND_MESSAGES)])
    settled = m.rng.randint(0, WORKER_BATCH)
    w, side = m.start_worker(hold=(want, settled))
    try:
        wait_until(lambda: m.inside(w) or w.poll() is not None, timeout=60,
                   what=f"worker {r}: the handler starts the batch of delivery {want}")
        assert m.inside(w), (f"worker {r} ended (status {w.returncode}) before delivery {want}:\n"
                             f"{(m.tmp / 'app' / 'worker.log').read_text()}\n{m.rerun()}")
        jitter(m.rng)
        m.kill_worker(w)   # asserts it was still running: inside the held batch, which it never leaves
        m.busy_kills += 1
        m.held_kills += 1
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    return side


def _run_workers(m: Matrix, wait_until) -> None:
    rounds = KILLS["worker"]
    held = set(m.rng.sample(range(rounds), (rounds + 1) // 2))   # at least one: busy by construction
    for r in range(rounds):
        sends = str(m.tmp / f"sends{r}.txt")
        _send_round(m.path, m.durability, sends, f"w{r}", m.rng)
        if r in held:
            m.check([sends, _run_held_worker(m, r, wait_until)])
            continue
        want = m.rng.choice([1, m.rng.randint(1, 20), m.rng.randint(20, 2 * ROUND_MESSAGES)])
        w, side = m.start_worker()
        sent = [f for f in read_facts([sends]) if f.kind == "sent"]
        good = {f.id for f in sent if int(f.key.split("/")[1]) % FAIL_EVERY != 0}

        def done() -> bool:
            """Every good message acked and every failing one dead-lettered (its last retry asked for)."""
            fs = read_facts([side])
            last = {f.id: f.attempts for f in fs if f.kind == "deliver"}
            acked = {f.id for f in fs if f.kind == "ack"}
            return good <= acked and all(last.get(f.id, 0) > MAX_RETRIES for f in sent if f.id not in good)

        try:
            wait_until(lambda: _count(side, "deliver") >= want or done() or w.poll() is not None,
                       timeout=60, what=f"worker {r}: {want} deliveries")
            jitter(m.rng)
            m.busy_kills += not done()
            m.kill_worker(w)
        finally:
            if w.poll() is None:
                w.kill()
                w.wait()
        m.check([sends, side])


def _run_all_at_once(m: Matrix, z: Zygote, wait_until) -> None:
    """Rounds in which a worker, a producer and a pull consumer share the
    queue: the worker starts alone on the round's messages; once it handled
    a few, the producer and the consumer start; once each did a few calls
    (or ran out of work), all three are killed in a random order."""
    for r in range(ALL_AT_ONCE_ROUNDS):
        sends = str(m.tmp / f"sends{r}.txt")
        _send_round(m.path, m.durability, sends, f"a{r}", m.rng)
        prod, cons = str(m.tmp / f"producer{r}.txt"), str(m.tmp / f"consumer{r}.txt")
        w, wside = m.start_worker()
        try:
            n = m.rng.randint(1, 10)   # of the round's messages, all its own until now
            wait_until(lambda: _count(wside, "deliver") >= n or w.poll() is not None, timeout=60,
                       what=f"round {r}: the worker handles {n} messages")
            pids = {"producer": z.start("producer", path=m.path, durability=m.durability, side=prod,
                                        prefix=f"p{r}", seed=m.rng.getrandbits(32), limit=PRODUCER_LIMIT),
                    "consumer": z.start("consumer", path=m.path, durability=m.durability, side=cons,
                                        seed=m.rng.getrandbits(32))}
            for role, side, kind in (("producer", prod, "sent"), ("consumer", cons, "ack")):
                n = m.rng.randint(0, 10)
                wait_until(lambda: _count(side, kind) >= n or z.drained(pids[role]) or z.failed(pids[role]),
                           timeout=60, what=f"round {r}: the {role} records {n} {kind} facts")
            order = ["worker", "producer", "consumer"]
            m.rng.shuffle(order)
            for role in order:
                jitter(m.rng)
                if role == "worker":
                    m.kill_worker(w)
                else:
                    m.busy_kills += not z.drained(pids[role])
                    z.kill(pids[role])
                    m.kills[role] += 1
        finally:
            if w.poll() is None:
                w.kill()
                w.wait()
        m.check([sends, prod, cons, wside], ordered=False)   # three processes at once: no one order


@pytest.mark.slow
@pytest.mark.parametrize("durability", MODES)
@pytest.mark.parametrize("role", ["producer", "consumer", "worker"])
def test_kill_minus_9_loses_nothing_returned(tmp_path, role, durability, wait_until, monkeypatch):
    small_journal(monkeypatch.setattr, CHECKPOINT_EVERY)
    m = Matrix(tmp_path, role, durability, _seed(role, durability))
    print(f"\nkill matrix {role}/{durability}: {m.rerun()}")
    if role == "worker":
        _run_workers(m, wait_until)
    else:
        z = Zygote()
        try:
            _run_forked(m, z, wait_until)
        finally:
            z.close()
    print(m.summary())
    t = m.total
    assert m.kills == {role: KILLS[role]}, m.summary()
    assert (t.lost, t.corrupt, t.duplicates_otherwise) == (0, 0, 0), m.summary()
    # The scenario did what it is for: kills landed mid-work, and the checker saw messages.
    assert m.busy_kills > 0 and t.checked > 0, f"scenario: no kill landed mid-work; {m.summary()}"
    if role != "producer":
        assert t.dead_lettered > 0, f"scenario: nothing reached the dead-letter queue; {m.summary()}"


@pytest.mark.slow
@pytest.mark.parametrize("durability", MODES)
def test_kill_minus_9_of_all_roles_at_once_loses_nothing_returned(tmp_path, durability, wait_until, monkeypatch):
    small_journal(monkeypatch.setattr, CHECKPOINT_EVERY)
    m = Matrix(tmp_path, "all", durability, _seed("all", durability))
    print(f"\nkill matrix all/{durability}: {m.rerun()}")
    z = Zygote()
    try:
        _run_all_at_once(m, z, wait_until)
    finally:
        z.close()
    print(m.summary())
    t = m.total
    assert m.kills == {r: ALL_AT_ONCE_ROUNDS for r in ("producer", "consumer", "worker")}, m.summary()
    assert (t.lost, t.corrupt, t.duplicates_otherwise) == (0, 0, 0), m.summary()
    assert t.checked > 0, m.summary()
