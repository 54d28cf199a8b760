"""A full disk and failing writes, seen from the queue: a real small
filesystem filled by a real producer process, and ENOSPC and EIO injected
through the engine's syscall table.

What is promised, and checked here:

- A send or send_batch that raises :class:`qlog.DiskFullError` wrote
  nothing; the error names the problem, the queue and the bytes it needed;
  the queue stays usable and the same send succeeds once space is freed.
  A batch is all or nothing.
- Consumers keep pulling and acking while the message log cannot grow; an
  ack, retry or pull the state journal has no room for raises
  ``DiskFullError``, records nothing and leaves the message open (ack it
  again later).
- A failed write or fdatasync of the message log raises
  :class:`qlog.StorageError` (with its ``errno``) from the send, and every
  later send raises :class:`qlog.LogPoisonedError` until the queue is
  reopened by a new broker.  After the reopen, the messages in the queue are
  exactly those whose send returned, plus at most the one whose
  *fdatasync* failed (its bytes reached the kernel, the disk did not confirm
  them: it may be there, whole, or not at all); a message whose *write*
  failed is never there.  A batch counts as one message in this rule.
- The same for the state journal: an ack that raised is not recorded and
  the message is delivered again after the reopen; an ack that returned is
  kept (a power cut could still undo it: at least once).
- A checkpoint that cannot be written (full disk, EIO on write, fdatasync
  or the directory fsync) is logged, removes its temporary file, keeps the
  previous checkpoint and every journal record after it: nothing is lost,
  and the operation that triggered it is not failed.

``CASES`` counts the cases run and any message lost or corrupt (each also
fails its test); the counts are printed when the module's tests are done.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
from typing import Callable, Dict, List, Optional

import pytest
from conftest import drain

import qlog
import qlog._local.backend
from _simvfs import fd_path, real, syscalls
from qlog._log._qlog_c import ffi

SEG = 64 << 10   # the smallest message segment: a roll soon needs new space

CASES = {"disk_full": 0, "eio": 0, "lost": 0, "corrupt": 0}


def body(i: int, size: int = 1000) -> bytes:
    """Message ``i``'s body: its number repeated, so that any damage shows."""
    unit = b"%08d" % i
    return (unit * (size // 8 + 1))[:size]


def index_of(b: bytes) -> int:
    """The number of a body made by ``body``; counts a corrupt one."""
    i = int(b[:8])
    if b != body(i, len(b)):
        CASES["corrupt"] += 1
        raise AssertionError(f"message {i} is corrupt: {b[:40]!r}...")
    return i


def drained_numbers(q: qlog.Queue) -> List[int]:
    """Pull and ack until nothing is visible (conftest's ``drain``); the
    numbers delivered, in order, each body checked."""
    return [index_of(m.body) for m in drain(q)]


def reopened_contents(path: str, name: str = "q", **settings) -> List[int]:
    """Open the directory with a new broker (default syscalls by now) and
    drain ``name``; the numbers delivered."""
    with qlog.open(path) as b:
        return drained_numbers(b.queue(name, **settings))


def check_exactly(delivered: List[int], returned: List[int], maybe: Optional[List[int]] = None) -> None:
    """``delivered`` holds each number of ``returned`` once, plus possibly
    all of ``maybe`` (together, once each) and nothing else."""
    lost = set(returned) - set(delivered)
    CASES["lost"] += len(lost)
    assert not lost, f"messages whose send returned are missing: {sorted(lost)[:20]}"
    assert len(delivered) == len(set(delivered)), "a message was delivered twice"
    extra = set(delivered) - set(returned)
    if maybe:
        assert extra in (set(), set(maybe)), f"unexpected messages {sorted(extra)[:20]} (maybe: {maybe})"
    else:
        assert not extra, f"messages whose send raised were stored: {sorted(extra)[:20]}"


class Faults:
    """Pass-through hooks with switchable faults, by path.  ``fallocate``,
    ``pwrite``, ``fdatasync``, ``fsync``: ``{path substring: errno}``; the
    first matching substring of the file's path decides ("=path": that path
    only)."""

    def __init__(self) -> None:
        self.fallocate: Dict[str, int] = {}
        self.pwrite: Dict[str, int] = {}
        self.fdatasync: Dict[str, int] = {}
        self.fsync: Dict[str, int] = {}
        self.injected: Dict[str, int] = {}

    def _fault(self, table: Dict[str, int], name: str, fd: int) -> int:
        if not table:
            return 0
        path = fd_path(fd)
        for part, e in table.items():
            if path == part[1:] if part.startswith("=") else part in path:
                self.injected[name] = self.injected.get(name, 0) + 1
                return e
        return 0

    def hooks(self) -> Dict[str, Callable]:
        def fallocate(fd, off, length):
            return self._fault(self.fallocate, "fallocate", fd) or real.fallocate(fd, off, length)

        def pwrite(fd, buf, n, off):
            e = self._fault(self.pwrite, "pwrite", fd)
            if e:
                ffi.errno = e
                return -1
            return real.pwrite(fd, buf, n, off)

        def fdatasync(fd):
            e = self._fault(self.fdatasync, "fdatasync", fd)
            if e:
                ffi.errno = e
                return -1
            return real.fdatasync(fd)

        def fsync(fd):
            e = self._fault(self.fsync, "fsync", fd)
            if e:
                ffi.errno = e
                return -1
            return real.fsync(fd)

        return {"fallocate": fallocate, "pwrite": pwrite, "fdatasync": fdatasync, "fsync": fsync}


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """Report the counts once the module's tests have run (any order)."""
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\ntest_disk_full: disk-full cases {CASES['disk_full']}, EIO cases {CASES['eio']}, "
              f"messages lost {CASES['lost']}, corrupt {CASES['corrupt']}")


@pytest.fixture
def faults():
    f = Faults()
    with syscalls(**f.hooks()):
        yield f


@pytest.fixture
def data(tmp_path) -> str:
    return str(tmp_path / "data")


MSGS = "/queues/q/messages/"
STATE = "/queues/q/state/"


def fill_first_segment(q: qlog.Queue, size: int = 1000) -> List[int]:
    """Send messages one by one until the next one needs a new segment."""
    per = (32 + 16 + size + 7) & ~7
    n = (SEG - 64) // per
    for i in range(n):
        q.send(body(i, size), content_type="bytes")
    assert q._b._msgs.next_seq == n and len([f for f in os.listdir(q._b._msgs.path) if f.endswith(".seg")]) == 1
    return list(range(n))


def assert_disk_full(e: pytest.ExceptionInfo, what: str) -> None:
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert "no space left on device" in msg and "'q'" in msg and "bytes needed" in msg, msg
    assert what in msg, msg


# ---- a full disk, through the syscall table --------------------------------------


@pytest.mark.parametrize("how", ["send", "send_batch", "send_batch_requests", "send_header",
                                 "big_send", "big_batch"])
def test_disk_full_send_writes_nothing_and_works_once_space_is_freed(faults, data, how):
    """ENOSPC when the send needs a new segment (its blocks: fallocate, or
    its header: pwrite) or when a large record is written into the current
    one (pwrite): DiskFullError naming the queue and size, nothing stored,
    the queue not poisoned, the same send succeeds after."""
    b = qlog.open(data)
    q = b.queue("q", segment_bytes=SEG)
    big = how.startswith("big")
    if big:
        for i in range(3):
            q.send(body(i), content_type="bytes")
        returned = list(range(3))
        faults.pwrite[MSGS] = errno.ENOSPC       # records of 4 KiB and more are written with pwrite
    else:
        returned = fill_first_segment(q)
        if how == "send_header":
            faults.pwrite[MSGS] = errno.ENOSPC   # the new segment's header cannot be written
        else:
            faults.fallocate[MSGS] = errno.ENOSPC    # the next segment cannot get its blocks
    size = 9000 if big else 1000
    first = len(returned)
    k = 1 if how in ("send", "send_header", "big_send") else 5
    items = [body(first + j, size) for j in range(k)]

    def attempt() -> List[str]:
        if k == 1:
            return [q.send(items[0], content_type="bytes")]
        if how == "send_batch_requests":
            return q.send_batch([qlog.MessageSendRequest(x, content_type="bytes") for x in items])
        return q.send_batch(items, content_type="bytes")

    nxt = q._b._msgs.next_seq
    for _ in range(2):   # and again: a full disk does not poison the queue
        with pytest.raises(qlog.DiskFullError) as e:
            attempt()
        assert_disk_full(e, "a message" if k == 1 else f"a batch of {k} messages")
        need = sum((32 + 16 + len(x) + 7) & ~7 for x in items)
        assert f"({need} bytes needed" in str(e.value)
        assert q._b._msgs.next_seq == nxt and q._b._msgs.read(nxt) == []
        assert not q._b._msgs.stats().poisoned
    assert q.stats().backlog == len(returned)
    CASES["disk_full"] += 1
    faults.fallocate.clear()
    faults.pwrite.clear()
    ids = attempt()
    assert len(ids) == k
    returned += [first + j for j in range(k)]
    b.close()
    check_exactly(reopened_contents(data, segment_bytes=SEG), returned)


def test_disk_full_in_the_state_journal_refuses_the_ack_which_succeeds_later(faults, data, monkeypatch):
    """The journal cannot grow: pulls and acks raise DiskFullError naming
    the queue; a refused ack records nothing (the message is still open and
    acked later); sends are unaffected; nothing is lost."""
    monkeypatch.setattr(qlog._local.backend, "_JOURNAL_SEGMENT", 64 << 10)
    b = qlog.open(data)
    q = b.queue("q")
    n = 8000
    for i in range(0, n, 1000):
        q.send_batch([body(j, 16) for j in range(i, i + 1000)], content_type="bytes")
    faults.fallocate[STATE] = errno.ENOSPC
    held = []
    while True:        # leases of 1,000 messages (16 KiB records) until the journal is full
        assert len(held) < n // 1000, "every message was leased before the journal filled"
        try:
            held.append(q.pull(1000))
        except qlog.DiskFullError as e:
            assert "a pull" in str(e) and "'q'" in str(e) and "bytes needed" in str(e), str(e)
            break
    assert held and q.stats().in_flight == 1000 * len(held)
    with pytest.raises(qlog.DiskFullError) as e:
        held[0].ack_all()
    assert "an ack of 1000 messages" in str(e.value) and "'q'" in str(e.value), str(e.value)
    assert all(not m._outcome for m in held[0].messages), "a refused ack marked messages done"
    with pytest.raises(qlog.DiskFullError) as e:
        held[0].retry_all()
    assert "a retry of 1000 messages" in str(e.value), str(e.value)
    assert faults.injected["fallocate"] >= 3
    CASES["disk_full"] += 3
    q.send(body(n, 16), content_type="bytes")     # the message log has room
    assert q.stats().in_flight == 1000 * len(held)
    faults.fallocate.clear()
    acked: List[int] = []
    for batch in held:                             # the refused acks go in now
        batch.ack_all()
        acked += [index_of(m.body) for m in batch.messages]
    b.close()
    check_exactly(acked + reopened_contents(data), list(range(n + 1)))


def test_disk_full_while_writing_a_checkpoint_keeps_the_old_one_and_loses_nothing(faults, data, caplog):
    b = qlog.open(data)
    q = b.queue("q")
    for i in range(50):
        q.send(body(i, 100), content_type="bytes")
    acked = ack_next(q, 20)
    q.close()                                            # a first checkpoint, written fine
    ckpt = os.path.join(data, "queues", "q", "checkpoint")
    old = open(ckpt, "rb").read()
    q = b.queue("q")
    acked += ack_next(q, 10)
    faults.pwrite["/queues/q/checkpoint."] = errno.ENOSPC
    first_journal = q._b._journal.first_seq
    with caplog.at_level(logging.WARNING, logger="qlog"):
        q.close()                                        # does not raise: upkeep only
    assert faults.injected["pwrite"] == 1
    assert any("no space left on device" in r.getMessage() and "checkpoint" in r.getMessage()
               for r in caplog.records), caplog.text
    assert open(ckpt, "rb").read() == old, "the previous checkpoint was replaced"
    assert not [f for f in os.listdir(os.path.dirname(ckpt)) if f.endswith(".tmp")]
    j = qlog.Log(os.path.join(data, "queues", "q", "state"), durability="none")
    assert j.first_seq == first_journal, "journal records not in any checkpoint were dropped"
    j.close()
    CASES["disk_full"] += 1
    faults.pwrite.clear()
    b.close()
    check_exactly(acked + reopened_contents(data), list(range(50)))


def ack_next(q: qlog.Queue, n: int) -> List[int]:
    """Pull exactly ``n`` messages and ack them; their numbers."""
    batch = q.pull(n)
    assert len(batch.messages) == n
    batch.ack_all()
    return [index_of(m.body) for m in batch.messages]


# ---- EIO, through the syscall table ---------------------------------------------


@pytest.mark.parametrize("call, k", [("fdatasync", 1), ("fdatasync", 5), ("pwrite", 1), ("pwrite", 5)])
def test_eio_on_send_poisons_the_queue_until_a_new_broker_opens_it(faults, data, call, k):
    """EIO from the message log's fdatasync or write: the send raises
    StorageError with errno EIO; every later send, from this broker or
    another, raises LogPoisonedError; reads and acks go on; after a reopen
    the queue holds exactly the returned messages, plus at most the failed
    fdatasync's message (or whole batch), never a failed write's."""
    b = qlog.open(data)
    q = b.queue("q")
    other = qlog.open(data).queue("q")
    for i in range(10):
        q.send(body(i), content_type="bytes")
    returned = list(range(10))
    size = 9000 if call == "pwrite" else 1000        # pwrite: records of 4 KiB and more
    failed = [10 + j for j in range(k)]
    getattr(faults, call)[MSGS] = errno.EIO
    with pytest.raises(qlog.StorageError) as e:
        if k == 1:
            q.send(body(10, size), content_type="bytes")
        else:
            q.send_batch([body(i, size) for i in failed], content_type="bytes")
    assert e.type is qlog.StorageError and e.value.errno == errno.EIO, repr(e.value)
    assert "/queues/q/messages" in str(e.value)
    getattr(faults, call).clear()        # the disk "works" again: a retried fsync could lie
    for h in (q, other):
        with pytest.raises(qlog.LogPoisonedError):
            h.send(body(99), content_type="bytes")
        with pytest.raises(qlog.LogPoisonedError):
            h.send_batch([body(98), body(97)], content_type="bytes")
    seen = [index_of(m.body) for m in other.peek(100)]     # reading goes on
    assert set(returned) <= set(seen)
    if call == "pwrite":
        assert not set(failed) & set(seen), "a failed write is readable"
    b.close()
    other._broker.close()
    CASES["eio"] += 1
    with qlog.open(data) as b2:           # a new broker: the queue takes sends again
        b2.queue("q").send(body(50), content_type="bytes")
    check_exactly(reopened_contents(data), returned + [50],
                  maybe=failed if call == "fdatasync" else None)


@pytest.mark.parametrize("call", ["fdatasync", "pwrite"])
def test_eio_in_the_state_journal_refuses_acks_until_reopened_and_loses_nothing(faults, data, wait_until, call):
    """EIO while writing the state journal: an ack that raised is not
    recorded and its messages come again after the reopen; acks that
    returned are kept; nothing is lost."""
    b = qlog.open(data)
    q = b.queue("q")
    q.send_batch([body(i, 16) for i in range(600)], content_type="bytes")
    first = q.pull(50, visibility_timeout=0.001)
    first.ack_all()
    acked = [index_of(m.body) for m in first.messages]
    batch = q.pull(1000, visibility_timeout=0.001)
    assert len(batch.messages) == 550
    getattr(faults, call)[STATE] = errno.EIO
    if call == "pwrite":
        # An ack of 550 messages is a record of over 4 KiB: written with pwrite.
        with pytest.raises(qlog.StorageError) as e:
            batch.ack_all()
        assert e.type is qlog.StorageError and e.value.errno == errno.EIO, repr(e.value)
        assert all(not m._outcome for m in batch.messages), "a failed ack marked messages done"
    else:
        # Journal records are synced in the background: the ack returns, the
        # next sync fails and the journal refuses what follows.
        batch.messages[0].ack()
        acked.append(index_of(batch.messages[0].body))
        wait_until(lambda: q._b._journal.stats().poisoned, what="the journal's background fdatasync")
    getattr(faults, call).clear()
    with pytest.raises(qlog.LogPoisonedError):
        batch.messages[1].ack()
    with pytest.raises(qlog.LogPoisonedError):
        batch.messages[2].retry()
    with pytest.raises(qlog.LogPoisonedError):
        q.pull(10)
    q.send(body(600, 16), content_type="bytes")   # the message log is not affected
    b.close()
    CASES["eio"] += 1
    rest = reopened_contents(data)
    check_exactly(acked + rest, list(range(601)))


@pytest.mark.parametrize("call", ["pwrite", "fdatasync", "fsync-dir"])
def test_eio_while_writing_a_checkpoint_keeps_the_journal_and_loses_nothing(faults, data, caplog, call):
    b = qlog.open(data)
    q = b.queue("q")
    for i in range(40):
        q.send(body(i, 100), content_type="bytes")
    acked = ack_next(q, 15)
    qdir = os.path.join(data, "queues", "q")
    first_journal = q._b._journal.first_seq
    if call == "fsync-dir":
        faults.fsync["=" + qdir] = errno.EIO
    else:
        getattr(faults, call)["/queues/q/checkpoint."] = errno.EIO
    with caplog.at_level(logging.WARNING, logger="qlog"):
        q.close()
    assert any("checkpoint" in r.getMessage() and "Input/output error" in r.getMessage()
               for r in caplog.records), caplog.text
    assert sum(faults.injected.values()) == 1
    assert not [f for f in os.listdir(qdir) if f.endswith(".tmp")]
    if call != "fsync-dir":
        assert not os.path.exists(os.path.join(qdir, "checkpoint"))
    j = qlog.Log(os.path.join(qdir, "state"), durability="none")
    assert j.first_seq == first_journal and j.next_seq > first_journal
    j.close()
    faults.fsync.clear()
    faults.pwrite.clear()
    faults.fdatasync.clear()
    b.close()
    CASES["eio"] += 1
    check_exactly(acked + reopened_contents(data), list(range(40)))


# ---- a real, small filesystem ------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs mounted for the test; unmounted whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (euid is %d)" % os.geteuid())
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


_PRODUCER = r"""
import sys, qlog
sys.path.insert(0, sys.argv[2])
from test_disk_full import body
q = qlog.open(sys.argv[1]).queue("q", segment_bytes=64 << 10)
i = 0
def send():
    global i
    try:
        q.send(body(i, 3000), content_type="bytes")
    except qlog.DiskFullError as e:
        print("FULL", i, str(e).replace("\n", " "), flush=True)
        return False
    print("SENT", i, flush=True)
    i += 1
    return True
while send():
    pass
for line in sys.stdin:          # "again": try the next send; "more N": send until N more went in
    cmd = line.split()
    if cmd[0] == "again":
        send()
    else:
        for _ in range(int(cmd[1])):
            if not send():
                break
        print("DONE", flush=True)
"""

_CONSUMER = r"""
import json, sys, qlog
sys.path.insert(0, sys.argv[2])
from test_disk_full import drained_numbers
with qlog.open(sys.argv[1]) as b:
    print(json.dumps(drained_numbers(b.queue("q", segment_bytes=64 << 10))))
"""


def _line(p: subprocess.Popen) -> List[str]:
    line = p.stdout.readline()
    assert line, f"the producer died: {p.stderr.read()[-2000:]}"
    return line.split(maxsplit=2)


def test_a_real_full_filesystem(small_fs, spawn_python, run_python):
    """A producer process fills an 8 MiB tmpfs with sync sends until one
    raises DiskFullError (naming the queue and size); a consumer process
    reads and acks every returned message while the disk is full (to the
    last block); once a ballast file is deleted and a checkpoint drops the
    consumed segments,
    the same producer sends again, more than the ballast alone made room
    for; every returned message is delivered exactly once, intact."""
    here = os.path.dirname(os.path.abspath(__file__))
    data = os.path.join(small_fs, "data")
    with qlog.open(data) as b:               # creates the queue's files
        b.queue("q", segment_bytes=SEG)
    ballast = os.path.join(small_fs, "ballast")
    with open(ballast, "wb") as f:
        f.write(b"\1" * (256 << 10))
        os.fsync(f.fileno())
    prod = spawn_python(_PRODUCER, [data, here])
    sent: List[int] = []
    while True:
        tag, i, *rest = _line(prod)
        if tag == "FULL":
            break
        sent.append(int(i))
    assert int(i) == len(sent) == sent[-1] + 1 if sent else False
    msg = rest[0]
    assert "no space left on device" in msg and "'q'" in msg and "bytes needed" in msg, msg
    assert len(sent) > 500, f"only {len(sent)} messages fit before the disk was full"
    CASES["disk_full"] += 1
    prod.stdin.write("again\n")
    assert _line(prod)[0] == "FULL", "a send succeeded on a full disk"
    # Take the last free blocks too (less than a segment is left): now
    # nothing at all can be written.
    filler = os.path.join(small_fs, "filler")
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"\2" * 4096)
                f.flush()
    except OSError as e:
        assert e.errno == errno.ENOSPC, e

    # A consumer process drains and acks while the disk is still full (the
    # state journal's space was allocated with it); its closing checkpoint
    # finds no space, says so, and loses nothing.
    r = run_python(_CONSUMER, [data, here], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cannot write checkpoint" in r.stderr and "no space left on device" in r.stderr, r.stderr
    delivered = json.loads(r.stdout)
    check_exactly(delivered, sent)
    prod.stdin.write("again\n")
    assert _line(prod)[0] == "FULL", "space appeared without anything freeing it"

    # Free space: the ballast, then a checkpoint that drops consumed segments.
    segs = lambda: len([f for f in os.listdir(os.path.join(data, "queues", "q", "messages")) if f.endswith(".seg")])
    before = segs()
    os.unlink(ballast)
    if os.path.exists(filler):
        os.unlink(filler)
    r = run_python(_CONSUMER, [data, here], timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr[-3000:]
    assert segs() <= 2 < before, f"{before} segments before the checkpoint, {segs()} after"
    more = 2 * (256 << 10) // 3000
    prod.stdin.write(f"more {more}\n")
    while True:
        tag, *rest = _line(prod)
        if tag == "DONE":
            break
        assert tag == "SENT", f"the send after space was freed failed: {rest}"
        sent.append(int(rest[0]))
    assert len(sent) == len(delivered) + more
    prod.stdin.close()
    assert prod.wait(timeout=120) == 0, prod.stderr.read()[-2000:]
    r = run_python(_CONSUMER, [data, here], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    check_exactly(delivered + json.loads(r.stdout), sent)


# ---- the small files beside the logs --------------------------------------------


@pytest.mark.parametrize("call", ["pwrite", "fdatasync", "fsync-dir"])
@pytest.mark.parametrize("file", ["format", "queue.json", "settings.json"])
def test_eio_writing_a_small_file_names_it_and_leaves_the_old_one(faults, data, call, file):
    """The data format mark, a queue's identity and its stored settings are
    written through the engine's syscall table (as checkpoints and logs are):
    an injected EIO raises StorageError naming the file, and no temporary
    file or half-written file stays."""
    if file == "format":
        target, where = os.path.join(data, qlog._local.backend.FORMAT_FILE), data
    else:
        with qlog.open(data) as b:
            b.queue("q", delivery_delay=5)
        target, where = os.path.join(data, "queues", "new" if file == "queue.json" else "q", file), None
    where = where or os.path.dirname(target)
    before = open(target, "rb").read() if os.path.exists(target) else None
    if call == "fsync-dir":
        faults.fsync["=" + where] = errno.EIO
    else:
        getattr(faults, call)[target + "."] = errno.EIO   # its temporary file
    with pytest.raises(qlog.StorageError, match=re.escape(target) + ".*Input/output error"):
        if file == "format":
            qlog.open(data).close()
        else:
            with qlog.open(data) as b:
                if file == "queue.json":
                    b.create_queue("new")
                else:
                    b.configure("q", delivery_delay=7)
    assert sum(faults.injected.values()) >= 1
    faults.fsync.clear()
    faults.pwrite.clear()
    faults.fdatasync.clear()
    if os.path.isdir(os.path.dirname(target)):
        assert not [f for f in os.listdir(os.path.dirname(target)) if f.endswith(".tmp")]
    if call != "fsync-dir":  # a failed directory fsync comes after the rename
        now = open(target, "rb").read() if os.path.exists(target) else None
        assert now == before
    CASES["eio"] += 1
