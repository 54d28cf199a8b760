"""Fault injection through the syscall table: failing fdatasync, a full
disk, failing segment creation.  The engine reports each as a clear error,
never returns a record it did not store whole, and recovers as promised.

The Python table is installed before the log is opened (the table is
process-wide) and passes every call through to the real one until a fault
is armed; the ``faults`` fixture restores the default table whatever happens.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from typing import Callable, Dict, List, Optional

import pytest

import qlog
from _crashkit import check_random_access, child_env, make_payload, read_all
from _simvfs import fd_path, real, syscalls
from qlog._log._qlog_c import ffi

CHUNK = 4 << 20          # segments grow by this much (QLOG_ALLOC_CHUNK)


def rec_size(n: int) -> int:
    return (32 + n + 7) & ~7


class Faults:
    """Pass-through hooks with switchable faults; counts the calls it saw and
    the faults it injected."""

    def __init__(self) -> None:
        self.fdatasync: Optional[int] = None                       # errno to fail with
        self.fallocate: Optional[Callable[[int, int, int], Optional[int]]] = None
        self.pwrite: Optional[Callable[[int, int, int], Optional[int]]] = None
        self.open: Optional[Callable[[str, int], Optional[int]]] = None
        self.injected: Dict[str, int] = {}
        self.calls: Dict[str, int] = {}

    def _hit(self, name: str) -> None:
        self.injected[name] = self.injected.get(name, 0) + 1

    def _saw(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def hooks(self) -> Dict[str, Callable]:
        def fdatasync(fd):
            self._saw("fdatasync")
            if self.fdatasync is not None:
                self._hit("fdatasync")
                ffi.errno = self.fdatasync
                return -1
            return real.fdatasync(fd)

        def fallocate(fd, off, length):
            e = self.fallocate and self.fallocate(fd, off, length)
            if e:
                self._hit("fallocate")
                return e
            return real.fallocate(fd, off, length)

        def pwrite(fd, buf, n, off):
            e = self.pwrite and self.pwrite(fd, n, off)
            if e:
                self._hit("pwrite")
                ffi.errno = e
                return -1
            return real.pwrite(fd, buf, n, off)

        def open_(path, flags, mode):
            e = self.open and self.open(ffi.string(path).decode(), flags)
            if e:
                self._hit("open")
                ffi.errno = e
                return -1
            return real.open(path, flags, mode)

        return {"fdatasync": fdatasync, "fallocate": fallocate, "pwrite": pwrite, "open": open_}


@pytest.fixture
def faults():
    f = Faults()
    with syscalls(**f.hooks()):
        yield f


def _payloads(first: int, n: int, size: int) -> List[bytes]:
    return [make_payload(first + i, n, i, size - 48) for i in range(n)]


def _read_in_fresh_process(path: str) -> List[tuple]:
    """Open the log in a new interpreter (default syscalls) and return
    ``(seq, payload hex)`` of every record, after checking verify()."""
    code = (
        "import sys, json, qlog\n"
        "from _crashkit import read_all\n"
        "log = qlog.Log(sys.argv[1], durability='sync')\n"
        "assert log.verify().ok, log.verify()\n"
        "print(json.dumps([(s, p.hex()) for s, p in read_all(log)]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    return [(s, bytes.fromhex(h)) for s, h in json.loads(r.stdout)]


# ---- fdatasync fails ----------------------------------------------------------


def test_failed_fdatasync_raises_and_poisons_every_handle_until_reopen(faults, log_dir):
    a = qlog.Log(log_dir, durability="sync")
    b = qlog.Log(log_dir, durability="sync")
    before = [a.append(b"a%d" % i) for i in range(5)] + [b.append_batch([b"b0", b"b1"])]
    faults.fdatasync = errno.EIO
    with pytest.raises(qlog.StorageError) as e:
        a.append(b"lost?")
    assert e.type is qlog.StorageError and e.value.errno == errno.EIO
    assert faults.injected["fdatasync"] == 1
    faults.fdatasync = None         # the disk "works" again: a retried fsync could lie
    synced = faults.calls["fdatasync"]
    for h in (a, b):
        with pytest.raises(qlog.LogPoisonedError):
            h.append(b"after")
        with pytest.raises(qlog.LogPoisonedError):
            h.append_batch([b"x", b"y"])
        assert h.stats().poisoned
    assert faults.calls["fdatasync"] == synced, "a poisoned log must not fsync again"
    a.close()
    b.close()
    with qlog.Log(log_dir, durability="sync") as c:
        assert not c.stats().poisoned
        recs = dict(read_all(c))
        for i in range(5):
            assert recs[before[i]] == b"a%d" % i
        assert recs[before[5]] == b"b0" and recs[before[5] + 1] == b"b1"
        seq = c.append(b"works")
        assert c.read(seq) == [(seq, b"works")]
        assert c.verify().ok


# ---- the disk is full -----------------------------------------------------------


def _fill_to_chunk_end(log: qlog.Log, size: int) -> List[bytes]:
    """Append single records of ``size`` bytes while they fit in the first
    allocation chunk; returns them."""
    per = rec_size(size)
    n = (CHUNK - 64) // per
    recs = _payloads(0, n, size)
    for i in range(0, n, 500):
        log.append_batch(recs[i:i + 500])
    return recs


def test_disk_full_mid_batch_writes_nothing_and_the_batch_goes_in_once_space_is_freed(faults, log_dir):
    log = qlog.Log(log_dir, durability="sync")
    before = _fill_to_chunk_end(log, 1000)
    # The next batch crosses the end of the first 4 MiB chunk: it needs new space.
    faults.fallocate = lambda fd, off, length: errno.ENOSPC if off + length > CHUNK else None
    batch = _payloads(1 << 32, 10, 1000)
    nxt = log.next_seq
    for _ in range(2):
        with pytest.raises(qlog.DiskFullError) as e:
            log.append_batch(batch)
        assert e.value.errno == errno.ENOSPC and "no space" in str(e.value)
        assert log.next_seq == nxt and log.read(nxt) == []
    assert faults.injected["fallocate"] >= 2
    assert [p for _, p in read_all(log)] == before
    assert not log.stats().poisoned
    faults.fallocate = None         # space is freed
    first = log.append_batch(batch)
    assert first == nxt
    assert log.read(first, max_records=20) == list(zip(range(first, first + 10), batch))
    log.close()
    assert [p for _, p in _read_in_fresh_process(str(log_dir))] == before + batch


def test_disk_full_mid_batch_leaves_nothing_of_it_after_reopen_in_a_fresh_process(faults, log_dir):
    log = qlog.Log(log_dir, durability="none")
    before = _fill_to_chunk_end(log, 2000)
    faults.fallocate = lambda fd, off, length: errno.ENOSPC if off + length > CHUNK else None
    batch = _payloads(1 << 32, 7, 2000)
    with pytest.raises(qlog.DiskFullError):
        log.append_batch(batch)
    log.close()
    recs = _read_in_fresh_process(str(log_dir))
    assert [s for s, _ in recs] == list(range(len(before)))
    assert [p for _, p in recs] == before
    faults.fallocate = None
    with qlog.Log(log_dir, durability="sync") as log:
        first = log.append_batch(batch)
        assert first == len(before)
        assert [p for _, p in read_all(log)] == before + batch


def _fill_segment(log: qlog.Log, segment: int, size: int) -> List[bytes]:
    """Append records of ``size`` bytes while they fit in the first segment."""
    per = rec_size(size)
    recs = _payloads(0, (segment - 64) // per, size)
    log.append_batch(recs)
    return recs


def _segment_names(path) -> List[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".seg"))


def test_disk_full_when_a_batch_needs_a_new_segment_writes_nothing_and_recovers(faults, log_dir):
    seg = 256 << 10
    log = qlog.Log(log_dir, durability="sync", segment_bytes=seg)
    reader = qlog.Log(log_dir, durability="none", segment_bytes=seg)
    before = _fill_segment(log, seg, 3000)
    faults.fallocate = lambda fd, off, length: errno.ENOSPC   # the disk is full
    batch = _payloads(1 << 32, 5, 3000)
    nxt = log.next_seq
    with pytest.raises(qlog.DiskFullError):
        log.append_batch(batch)
    assert _segment_names(log_dir) == ["%020d.seg" % 0], "a half-made segment was left behind"
    for h in (log, reader):
        assert h.next_seq == nxt and h.read(nxt) == []
        assert [p for _, p in read_all(h)] == before
    faults.fallocate = None
    first = log.append_batch(batch)
    assert first == nxt and [p for _, p in read_all(reader)] == before + batch
    reader.close()
    log.close()
    assert [p for _, p in _read_in_fresh_process(str(log_dir))] == before + batch


_DISK_FULL_AT_ROLL_CHILD = """
import errno, sys
import qlog
from _simvfs import real, syscalls
full = [False]
def fallocate(fd, off, length):
    return errno.ENOSPC if full[0] else real.fallocate(fd, off, length)
path, seg = sys.argv[1], 256 << 10
with syscalls(fallocate=fallocate):
    log = qlog.Log(path, durability="none", segment_bytes=seg)
    n = (seg - 64) // 3032 - 1          # leaves room for a few small records
    log.append_batch([b"%06d" % i + bytes(2994) for i in range(n)])
    full[0] = True
    try:
        log.append_batch([bytes(3000)] * 5)
        raise SystemExit("the batch went in on a full disk")
    except qlog.DiskFullError:
        pass
    full[0] = False                       # space is freed
    for i in range(200):                  # small records: the first ones fit the old segment
        assert log.append(b"small-%d" % i) == n + i
    log.close()
print(n)
"""


def test_small_appends_after_a_disk_full_roll_survive_reopen(log_dir):
    """A batch that needs a new segment fails on a full disk; once space is
    freed, small records that still fit the old segment go in and are there
    after a reopen.  (Run in a child: a store past the end of a file mapping
    would kill the process with SIGBUS.)"""
    r = subprocess.run([sys.executable, "-c", _DISK_FULL_AT_ROLL_CHILD, str(log_dir)],
                       capture_output=True, text=True, env=child_env(), timeout=120)
    how = f"signal {signal.Signals(-r.returncode).name}" if r.returncode < 0 else f"status {r.returncode}"
    assert r.returncode == 0, f"the appending child died with {how}: {r.stderr[-2000:]}"
    n = int(r.stdout)
    recs = _read_in_fresh_process(str(log_dir))
    assert [s for s, _ in recs] == list(range(n + 200))
    assert [p for _, p in recs[n:]] == [b"small-%d" % i for i in range(200)]


# ---- creating a segment fails ---------------------------------------------------


@pytest.mark.parametrize("failing", ["header-write", "open"])
def test_failed_segment_creation_raises_and_leaves_no_half_made_segment(faults, log_dir, failing):
    seg = 256 << 10
    log = qlog.Log(log_dir, durability="sync", segment_bytes=seg)
    reader = qlog.Log(log_dir, durability="none", segment_bytes=seg)
    before = _fill_segment(log, seg, 3000)
    if failing == "header-write":
        want = errno.EIO
        faults.pwrite = lambda fd, n, off: want if off == 0 and fd_path(fd).endswith(".seg") else None
    else:
        want = errno.EMFILE
        faults.open = lambda path, flags: want if path.endswith(".seg") and flags & os.O_CREAT else None
    batch = _payloads(1 << 32, 3, 3000)
    nxt = log.next_seq
    with pytest.raises(qlog.StorageError) as e:
        log.append_batch(batch)
    assert e.value.errno == want, f"the error does not say why: {e.value!r}"
    assert faults.injected[failing.split("-")[-1].replace("write", "pwrite")] >= 1
    assert _segment_names(log_dir) == ["%020d.seg" % 0], "a half-made segment was left behind"
    fresh = qlog.Log(log_dir, durability="none", segment_bytes=seg)
    for h in (log, reader, fresh):
        assert h.next_seq == nxt and h.read(nxt) == []
        assert [p for _, p in read_all(h)] == before
    fresh.close()
    faults.pwrite = faults.open = None
    # The handle that saw the error may refuse until reopened; a reopened one works.
    try:
        first = log.append_batch(batch)
    except qlog.LogPoisonedError:
        log.close()
        log = qlog.Log(log_dir, durability="sync", segment_bytes=seg)
        first = log.append_batch(batch)
    assert first == nxt
    recs = read_all(reader)
    assert [p for _, p in recs] == before + batch
    check_random_access(reader, [s for s, _ in recs])
    assert len(_segment_names(log_dir)) == 2
    reader.close()
    log.close()
