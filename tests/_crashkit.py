"""Crash-test kit: self-checking payloads, appender children that report
every append as it returns, and the checker that states the invariant.

A payload carries its own identity and checksum::

    counter u64 | batch size u16 | index in batch u16 | filler length u32 |
    sha256(those 16 bytes) | filler (the digest repeated)

so a record read back is either exactly what some appender wrote, or it is
caught.  ``counter`` is ``child_id << 32 | n`` (the n-th record that child
appended), so every payload in a test is unique and names its writer.

A child reports one line per returned call: ``"<first seq> <n> <counter>"``
(``n`` records with counters ``counter .. counter+n-1`` got sequence
numbers ``first seq .. first seq+n-1``), written with one ``os.write`` to
its stdout pipe, i.e. already in the kernel when the next call starts.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import qlog

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Children import the very qlog the tests import (installed or in-tree).
_QLOG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(qlog.__file__)))

_HEAD = struct.Struct("<QHHI")   # counter, batch size, index in batch, filler length
HEAD_SIZE = _HEAD.size
PAYLOAD_MIN = HEAD_SIZE + 32


# ---- payloads ---------------------------------------------------------------


def make_payload(counter: int, batch: int = 1, index: int = 0, filler: int = 0) -> bytes:
    """The payload of record ``index`` of a ``batch``-record call; ``filler`` extra bytes."""
    head = _HEAD.pack(counter, batch, index, filler)
    digest = hashlib.sha256(head).digest()
    return head + digest + (digest * (filler // 32 + 1))[:filler]


def decode_payload(p: bytes) -> Tuple[int, int, int]:
    """``(counter, batch size, index)`` of an intact payload; AssertionError otherwise."""
    assert len(p) >= PAYLOAD_MIN, f"payload of {len(p)} bytes is shorter than {PAYLOAD_MIN}: {p[:64]!r}"
    counter, batch, index, filler = _HEAD.unpack_from(p)
    assert len(p) == PAYLOAD_MIN + filler and p == make_payload(counter, batch, index, filler), (
        f"payload fails its self-check (counter {counter:#x}, index {index}/{batch}): {p[:64]!r}..."
    )
    return counter, batch, index


def child_of(counter: int) -> int:
    return counter >> 32


# ---- the appender child -----------------------------------------------------


def _report(line: bytes) -> None:
    # One write(2) per line: atomic on a pipe, in the kernel before we go on.
    os.write(1, line)


def appender(path: str, durability: str, segment_bytes: int, child_id: int, seed: int,
             max_batch: int = 8, max_filler: int = 1500, limit: int = 1 << 30,
             single_share: float = 0.5, small_first: int = 0, pause: float = 0.0) -> None:
    """Child main: append forever (up to ``limit`` calls), mixing ``append`` and
    ``append_batch``, reporting each returned call; then wait for stdin to close.
    The first ``small_first`` calls append one smallest payload each; ``pause``
    seconds pass after each call (a steady writer rather than a flood)."""
    rng = random.Random(seed)
    log = qlog.Log(path, durability=durability, segment_bytes=segment_bytes)
    _report(b"open\n")
    n = 0
    for call in range(limit):
        base = (child_id << 32) | n
        if call < small_first:
            seq = log.append(make_payload(base))
            k = 1
        elif rng.random() < single_share:
            seq = log.append(make_payload(base, 1, 0, rng.randrange(max_filler)))
            k = 1
        else:
            k = rng.randint(1, max_batch)
            seq = log.append_batch([make_payload(base + i, k, i, rng.randrange(max_filler))
                                    for i in range(k)])
        _report(b"%d %d %d\n" % (seq, k, base))
        n += k
        if pause:
            time.sleep(pause)
    sys.stdin.read()


def child_main() -> None:
    """Entry point of a child interpreter: ``_crashkit.<func>(**json)``."""
    func, kwargs = sys.argv[1], json.loads(sys.argv[2])
    globals()[func](**kwargs)


# ---- running children -------------------------------------------------------


def child_env() -> dict:
    """The environment of a test's child interpreter: it imports the qlog
    this process imported (the installed package after a plain `pip install
    .`, whose source tree holds no compiled modules) and the tests' helpers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS_DIR, _QLOG_PARENT, env.get("PYTHONPATH")]))
    env.pop("PYTHONHASHSEED", None)
    return env


_BOOT = "import _crashkit; _crashkit.child_main()"


@dataclass
class Call:
    """One returned call as its child reported it."""

    seq: int
    n: int
    counter: int


class Child:
    """A child interpreter running a function of a module in tests/, whose
    stdout lines are collected as they come (``Call`` lines, or others)."""

    def __init__(self, func: str, module: str = "_crashkit", **kwargs: object) -> None:
        boot = _BOOT if module == "_crashkit" else f"import {module}; {module}.child_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot, func, json.dumps(kwargs)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_env(),
        )
        self.calls: List[Call] = []
        self.lines: List[str] = []
        self.eof = False
        self._cond = threading.Condition()
        self._err = bytearray()
        self._out_thread = threading.Thread(target=self._read_out, daemon=True)
        self._err_thread = threading.Thread(target=self._read_err, daemon=True)
        self._out_thread.start()
        self._err_thread.start()

    def _read_out(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode().strip()
            parts = line.split()
            with self._cond:
                if len(parts) == 3 and all(p.isdigit() for p in parts):
                    self.calls.append(Call(*map(int, parts)))
                else:
                    self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def _read_err(self) -> None:
        for raw in self.proc.stderr:
            self._err += raw

    @property
    def stderr(self) -> str:
        return self._err.decode(errors="replace")

    def wait_until(self, cond: Callable[["Child"], bool], what: str, timeout: float = 60.0) -> None:
        """Block until ``cond(self)`` holds; fail if the child exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not cond(self):
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    self._err_thread.join(5)
                    raise AssertionError(
                        f"child {self.proc.pid}: {what} did not happen "
                        f"({'it exited with ' + str(self.proc.wait()) if self.eof else f'within {timeout} s'});"
                        f" {len(self.calls)} calls reported; stderr:\n{self.stderr}"
                    )
                self._cond.wait(min(left, 1.0))

    def wait_calls(self, k: int, timeout: float = 60.0) -> None:
        self.wait_until(lambda c: len(c.calls) >= k, f"{k} reported calls", timeout)

    def wait_line(self, text: str, timeout: float = 60.0) -> None:
        self.wait_until(lambda c: text in c.lines, f"line {text!r}", timeout)

    def kill(self) -> List[Call]:
        """SIGKILL, reap, and return every call it reported (all of them: the
        pipe is drained to its end)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._out_thread.join(30)
        self._err_thread.join(30)
        assert not self._out_thread.is_alive(), "child stdout did not reach EOF"
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()
        return self.calls

    def finish(self, timeout: float = 120.0) -> int:
        """Close stdin and wait for a clean exit; returns the exit status."""
        self.proc.stdin.close()
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._out_thread.join(30)
        self._err_thread.join(30)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def jitter(rng: random.Random, upto: float = 0.002) -> None:
    """A random pause so that the kill lands at a random instruction of the
    child; the test is correct whatever it is."""
    time.sleep(rng.uniform(0, upto))


# ---- reading and checking ---------------------------------------------------


def read_all(log: qlog.Log, end: Optional[int] = None) -> List[Tuple[int, bytes]]:
    """Every record of the log (below ``end`` when given), in order."""
    out: List[Tuple[int, bytes]] = []
    nxt = 0
    while True:
        recs = log.read(nxt, max_records=20000)
        if end is not None:
            recs = [r for r in recs if r[0] < end]
        if not recs:
            return out
        assert recs[0][0] >= nxt, f"read({nxt}) returned {recs[0][0]} first"
        out.extend(recs)
        nxt = recs[-1][0] + 1
        if end is not None and nxt >= end:
            return out


@dataclass
class Ledger:
    """What the test knows was appended: every reported call, and for each
    child the counter its next call starts at."""

    acked: Dict[int, int] = field(default_factory=dict)       # seq -> counter
    next_counter: Dict[int, int] = field(default_factory=dict)  # child id -> counter
    batches: Dict[int, Tuple[int, int]] = field(default_factory=dict)  # base counter -> (seq, n)

    def add(self, child_id: int, calls: Iterable[Call]) -> None:
        for c in calls:
            if c.counter in self.batches:
                continue
            self.batches[c.counter] = (c.seq, c.n)
            for i in range(c.n):
                assert c.seq + i not in self.acked, (
                    f"seq {c.seq + i} returned twice: to counter {self.acked[c.seq + i]:#x} "
                    f"and to {c.counter + i:#x}")
                self.acked[c.seq + i] = c.counter + i
            self.next_counter[child_id] = c.counter + c.n
        self.next_counter.setdefault(child_id, child_id << 32)

    def adopt(self, recs: Iterable[Tuple[int, bytes]], killed: Iterable[int]) -> None:
        """Records of a killed child's in-flight call, once read, must stay."""
        killed = set(killed)
        for s, p in recs:
            if s not in self.acked:
                counter = decode_payload(p)[0]
                if child_of(counter) in killed:
                    self.acked[s] = counter


def check_log(log: qlog.Log, ledger: Ledger, *, killed: Iterable[int] = (), live: Iterable[int] = (),
              end: Optional[int] = None, dense: bool = True) -> List[Tuple[int, bytes]]:
    """State the invariant of a log after processes were killed:

    - no damage (``verify``), no record skipped as corrupt, every payload intact;
    - sequence numbers dense from 0 (``dense``) and each counter stored once;
    - every reported record there, at its reported number, with its payload;
    - a batch is all there or not at all;
    - a record nobody reported is the in-flight call of a killed child (its
      next batch, whole) or a call of a live child not yet reported.
    Returns the records read."""
    recs = read_all(log, end)
    seqs = [s for s, _ in recs]
    if dense:
        assert seqs == list(range(len(seqs))), _first_gap("sequence numbers are not dense from 0", seqs)
    seen: Dict[int, int] = {}
    by_seq: Dict[int, Tuple[int, int, int]] = {}
    for s, p in recs:
        counter, batch, index = decode_payload(p)
        assert counter not in seen, f"counter {counter:#x} stored twice: at {seen[counter]} and {s}"
        seen[counter] = s
        by_seq[s] = (counter, batch, index)
    last = seqs[-1] if seqs else -1
    for s, counter in ledger.acked.items():
        if end is not None and s >= end:
            continue
        assert s in by_seq, f"reported record {s} (counter {counter:#x}) is missing; log holds up to {last}"
        assert by_seq[s][0] == counter, (
            f"record {s} holds counter {by_seq[s][0]:#x}, reported as {counter:#x}")
    killed, live = set(killed), set(live)
    for s, (counter, batch, index) in by_seq.items():
        base = counter - index
        if index == 0:
            for i in range(1, batch):
                got = by_seq.get(s + i)
                assert got == (counter + i, batch, i), (
                    f"batch of {batch} at {s} (counter {counter:#x}) is incomplete: record {s + i} is {got}")
        else:
            assert by_seq.get(s - index, (None,))[0] == base, (
                f"record {s} is {index}/{batch} of a batch whose first record is not at {s - index}")
        if s in ledger.acked:
            continue
        child = child_of(counter)
        nxt = ledger.next_counter.get(child, child << 32)
        if child in killed:
            assert base == nxt, (
                f"record {s} (counter {counter:#x}) was never reported and is not the in-flight call "
                f"of killed child {child} (which starts at {nxt:#x})")
        else:
            assert child in live and base >= nxt, (
                f"record {s} (counter {counter:#x}, child {child}) was never reported by anyone")
    check_random_access(log, seqs)
    assert log.stats().corrupt_records == 0, f"corrupt records skipped: {log.stats()}"
    report = log.verify()
    assert report.ok, f"verify found damage: {report.damage}"
    return recs


def check_random_access(log: qlog.Log, seqs: Sequence[int], samples: int = 200) -> None:
    """A read may start anywhere: from any number it returns the first record
    at or above it.  Probed around every segment's base and at random."""
    if not seqs:
        return
    bases = [int(n[:20]) for n in os.listdir(log.path) if len(n) == 24 and n.endswith(".seg")]
    probes = {b + d for b in bases for d in (-2, -1, 0, 1, 2)}
    probes.update(random.Random(len(seqs)).sample(seqs, min(samples, len(seqs))))
    for p in sorted(x for x in probes if 0 <= x <= seqs[-1]):
        want = seqs[bisect.bisect_left(seqs, p)]
        got = log.read(p, max_records=1)
        assert got and got[0][0] == want, (
            f"read({p}) returned {got[0][0] if got else 'nothing'}, expected record {want}; "
            f"segment bases {sorted(bases)[-8:]}")


def _first_gap(what: str, seqs: Sequence[int]) -> str:
    for i, s in enumerate(seqs):
        if s != i:
            return f"{what}: position {i} holds {s} (previous {seqs[i - 1] if i else None}), {len(seqs)} records"
    return what


# ---- a writer that dies at a chosen system call of a segment roll -------------

ROLL_STEPS = {
    # step: (syscall, which matching call, kill before (False) or after (True) the real call)
    "before-seal-sync": ("fdatasync", 1, False),
    "after-seal-cut": ("ftruncate", 1, True),
    "after-seal-sync": ("fdatasync", 2, True),
    "after-create": ("open", 1, True),
    "after-allocate": ("fallocate", 1, True),
    "after-header": ("pwrite", 1, True),
    "after-header-sync": ("fdatasync", 3, True),
    "after-dir-sync": ("fsync", 1, True),
}


def roll_victim(path: str, segment_bytes: int, child_id: int, step: str, seed: int) -> None:
    """Child main: append (durability "none") and SIGKILL itself at ``step`` of
    the first segment roll it makes.  Reports calls like ``appender``."""
    import _simvfs
    from _simvfs import fd_path, real

    name, nth, after = ROLL_STEPS[step]
    seen = [0]

    def matches(*args) -> bool:
        if name == "open":
            return args[0].endswith(b".seg") and bool(args[1] & os.O_CREAT)
        if name == "fallocate":
            return os.fstat(args[0]).st_size == 0          # the new segment's first allocation
        if name == "pwrite":
            return args[3] == 0 and args[2] == 64 and fd_path(args[0]).endswith(".seg")
        return True

    def hook(*args):
        hit = armed[0] and matches(*args)
        if hit:
            seen[0] += 1
            hit = seen[0] == nth
        if hit and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        r = getattr(real, name)(*args)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return r

    armed = [False]
    from qlog._log._qlog_c import ffi

    if name == "open":
        inner = hook
        hook = lambda p, f, m: inner(ffi.string(p), f, m)  # noqa: E731
    rng = random.Random(seed)
    with _simvfs.syscalls(fatal=True, **{name: hook}):
        log = qlog.Log(path, durability="none", segment_bytes=segment_bytes)
        armed[0] = True
        _report(b"open\n")
        n = 0
        while True:
            base = (child_id << 32) | n
            k = rng.randint(2, 4)   # big batches: the roll leaves room for small records
            seq = log.append_batch([make_payload(base + i, k, i, rng.randrange(1000, 1500))
                                    for i in range(k)])
            _report(b"%d %d %d\n" % (seq, k, base))
            n += k


# ---- concurrent appenders ---------------------------------------------------


def barrier_appender(path: str, durability: str, child_id: int, count: int, out: str) -> None:
    """Child main: open the log, say "ready", wait for "go" on stdin, then
    append ``b"p<child>-<i>"`` for i < count with ``append``; write the
    sequence numbers (u64 each) to ``out`` and print the handle's stats."""
    from array import array

    log = qlog.Log(path, durability=durability)
    _report(b"ready\n")
    assert sys.stdin.readline().strip() == "go"
    seqs = array("Q")
    append = log.append
    for i in range(count):
        seqs.append(append(b"p%d-%d" % (child_id, i)))
    with open(out, "wb") as f:
        f.write(seqs.tobytes())
    st = log.stats()
    log.close()
    _report(b"stats %d %d\n" % (st.fsyncs, st.appends))
    sys.stdin.read()


def run_barrier_appenders(path: str, durability: str, procs: int, count: int, tmp: str):
    """Start ``procs`` barrier_appender children, release them together once
    all are ready, and return ``(seqs per child, (fsyncs, appends) per child)``."""
    from array import array

    children = [Child("barrier_appender", path=path, durability=durability, child_id=c,
                      count=count, out=os.path.join(tmp, f"seqs{c}")) for c in range(procs)]
    try:
        for c in children:
            c.wait_line("ready")
        for c in children:            # the barrier: nobody appends before all are open
            c.proc.stdin.write(b"go\n")
            c.proc.stdin.flush()
        stats = []
        for c in children:
            c.wait_until(lambda ch: any(x.startswith("stats ") for x in ch.lines), "the stats line", 300)
            line = next(x for x in c.lines if x.startswith("stats "))
            stats.append(tuple(map(int, line.split()[1:])))
            assert c.finish() == 0, c.stderr
        seqs = []
        for c in range(procs):
            a = array("Q")
            with open(os.path.join(tmp, f"seqs{c}"), "rb") as f:
                a.frombytes(f.read())
            seqs.append(list(a))
        return seqs, stats
    finally:
        for c in children:
            c.__exit__()
