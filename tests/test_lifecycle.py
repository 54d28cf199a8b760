"""A handle's life: close() racing calls in other threads, buffers that are
not bytes, and what a fresh handle can still do after an fsync failed.

The close races run in a child interpreter, so that a crash (a call
touching freed memory, a SIGSEGV) shows as the child's exit status instead
of taking pytest down with it.  Failed fsyncs are injected through the
syscall table (``_simvfs``); the power-cut model there is extended with a
disk that drops the pages a failed fdatasync could not write.
"""

from __future__ import annotations

import errno
import json
import os
import random
from array import array
from typing import Callable, Dict, List

import pytest

import qlog
from _crashkit import read_all
from _simvfs import (PAGE, _SIZE, Recorder, _load_image, _put, boot_id_hook, materialise, new_boot_id,
                     real, syscalls)
from qlog._log._qlog_c import ffi

# ---- close() while other threads are inside the engine ------------------------

# The waiter sleeps in qlog_wait with no timeout, so only close() can end its
# wait.  The main thread closes once the waiter is asleep on the futex word in
# the log's control file: /proc/self/task/<tid>/syscall names the blocking
# syscall's first argument, the futex address, which must lie in the mapping
# of <log>/ctl.
CLOSE_WAKES_WAITER = r"""
import os, sys, threading, time
import qlog

path = sys.argv[1]
log = qlog.Log(path, durability="none")
log.append(b"x")
outcome = []

def waiter():
    try:
        outcome.append(("returned", log.wait(10**6)))
    except qlog.LogClosedError:
        outcome.append(("LogClosedError", None))
    except BaseException as e:
        outcome.append(("other", repr(e)))

def ctl_range():
    ctl = os.path.realpath(os.path.join(path, "ctl"))
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip() == ctl:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                return lo, hi
    raise SystemExit("the control file is not mapped")

def asleep_on_ctl(tid, lo, hi):
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            fields = f.read().split()
    except FileNotFoundError:
        return False
    if len(fields) < 2 or not fields[0].isdigit():
        return False   # "running"
    return lo <= int(fields[1], 16) < hi

t = threading.Thread(target=waiter)
t.start()
lo, hi = ctl_range()
deadline = time.monotonic() + 30
while not asleep_on_ctl(t.native_id, lo, hi):
    if not t.is_alive() or time.monotonic() > deadline:
        print("waiter never slept in the engine:", outcome, flush=True)
        sys.exit(3)
    time.sleep(0.001)
log.close()
t.join(30)
if t.is_alive():
    print("waiter still blocked after close()", flush=True)
    os._exit(4)
print(outcome[0][0], flush=True)
"""


@pytest.mark.c_only("checks that the waiter sleeps on a futex in the C engine's mapped control file; the pure engine's waiters poll (test_engines.py covers close waking them)")
def test_close_wakes_a_thread_blocked_in_wait_with_log_closed_error(log_dir, run_python) -> None:
    r = run_python(CLOSE_WAKES_WAITER, [log_dir], timeout=90)
    assert r.returncode == 0, f"child exited with {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert r.stdout.split() == ["LogClosedError"], r.stdout + r.stderr


# Threads call append, append_batch, read (head and tail), stats, wait and
# sync in a loop until the first LogClosedError; the main thread closes the
# log once every one of them has made a few successful calls.  Several
# rounds, each on a fresh handle of the same log.  Reports, per round and
# thread, how the loop ended and what each successful append returned.
CLOSE_UNDER_FIRE = r"""
import json, os, sys, threading, time
import qlog

path, rounds, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
report = []

for rnd in range(rounds):
    log = qlog.Log(path, durability="none")
    start = threading.Barrier(8)
    ok = {}
    ends = {}
    acked = []          # (seq, payload hex) of every append that returned

    def loop(name, call):
        ok[name] = 0
        start.wait()
        i = 0
        try:
            while True:
                call(i)
                i += 1
                ok[name] = i
        except qlog.LogClosedError:
            ends[name] = "LogClosedError"
        except BaseException as e:
            ends[name] = "other: " + repr(e)

    def append(i):
        p = b"r%d-append-%d" % (rnd, i)
        acked.append((log.append(p), p.hex()))

    def batch(i):
        ps = [b"r%d-batch-%d-%d" % (rnd, i, k) for k in range(3)]
        s = log.append_batch(ps)
        acked.extend((s + k, p.hex()) for k, p in enumerate(ps))

    def read_head(i):
        log.read(0, max_records=50)

    def read_tail(i):
        log.read(max(0, log.next_seq - 5))

    def stats(i):
        log.stats()

    def wait(i):
        log.wait(log.next_seq, timeout=0.001)

    def sync(i):
        log.sync()

    calls = dict(append=append, batch=batch, read_head=read_head, read_tail=read_tail,
                 stats=stats, wait=wait, sync=sync)
    threads = [threading.Thread(target=loop, args=(n, c)) for n, c in calls.items()]
    for t in threads:
        t.start()
    start.wait()
    deadline = time.monotonic() + 60
    while min(ok.get(n, 0) for n in calls) < warmup:
        if time.monotonic() > deadline or not all(t.is_alive() for t in threads):
            print(json.dumps({"stuck": ok, "ends": ends}), flush=True)
            os._exit(3)
        time.sleep(0.001)
    log.close()
    for t in threads:
        t.join(30)
        if t.is_alive():
            print(json.dumps({"hung": t.name, "ends": ends}), flush=True)
            os._exit(4)
    report.append({"ends": ends, "acked": acked})

print(json.dumps(report), flush=True)
"""


def test_close_while_threads_append_read_and_stat_ends_each_call_cleanly(log_dir, run_python) -> None:
    rounds = 6
    r = run_python(CLOSE_UNDER_FIRE, [log_dir, rounds, 20], timeout=150)
    assert r.returncode == 0, f"child exited with {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr}"
    report = json.loads(r.stdout)
    assert len(report) == rounds
    acked: Dict[int, bytes] = {}
    for n, rnd in enumerate(report):
        assert set(rnd["ends"].values()) == {"LogClosedError"}, f"round {n}: {rnd['ends']}"
        assert len(rnd["ends"]) == 7
        for seq, hexp in rnd["acked"]:
            assert seq not in acked, f"number {seq} was returned twice"
            acked[seq] = bytes.fromhex(hexp)
    # Every append that returned is in the log at its number, and nothing
    # else is: a call that raised LogClosedError wrote nothing.
    with qlog.Log(log_dir, durability="none") as log:
        assert dict(read_all(log)) == acked
        assert log.verify().ok
        assert log.stats().corrupt_records == 0


# ---- buffers that are not bytes -----------------------------------------------


def test_append_of_a_memoryview_of_wide_items_stores_every_byte(log_dir) -> None:
    a = array("I", [1, 2, 3])
    with qlog.Log(log_dir, durability="none") as log:
        s = log.append(memoryview(a))
        after = log.append(b"next")
        assert log.read(s) == [(s, a.tobytes()), (after, b"next")]
        assert len(log.read(s)[0][1]) == 12


@pytest.mark.parametrize("reopen", [False, True], ids=["same-handle", "after-reopen"])
def test_append_batch_of_memoryviews_of_wide_items_stores_each_views_bytes(log_dir, reopen) -> None:
    views = [
        memoryview(array("I", [1, 2])),                    # 8 bytes, itemsize 4
        memoryview(array("d", [1.5, -2.25, 3.0])),         # 24 bytes, itemsize 8
        memoryview(array("h", [7, 8, 9])),                 # 6 bytes, itemsize 2
        memoryview(bytearray(b"0123456789ab")).cast("I"),  # 12 bytes seen as 3 items
        b"plain bytes",
        memoryview(array("q")),                            # empty
        memoryview(array("i", range(1000))),               # 4000 bytes
    ]
    expected: List[bytes] = [bytes(memoryview(v).tobytes()) for v in views]
    log = qlog.Log(log_dir, durability="none")
    first = log.append_batch(views)
    after = log.append(b"next")
    assert after == first + len(views)
    if reopen:
        log.close()
        log = qlog.Log(log_dir, durability="none")
    try:
        got = log.read(first)
        assert got == [(first + i, p) for i, p in enumerate(expected)] + [(after, b"next")]
        assert log.verify().ok
    finally:
        log.close()


# ---- after a failed fdatasync -------------------------------------------------


@pytest.mark.parametrize("failed_call", ["append", "append_batch"])
@pytest.mark.parametrize("failed_handle", ["still-open", "closed"])
@pytest.mark.c_only("fault injection and boot ids through the C engine's syscall table (_simvfs)")
def test_after_failed_fdatasync_a_fresh_handle_syncs_and_appends_and_no_acknowledged_record_is_lost(
        log_dir, failed_call, failed_handle) -> None:
    armed = [0]
    injected = [0]

    def fdatasync(fd):
        if armed[0]:
            armed[0] -= 1
            injected[0] += 1
            ffi.errno = errno.EIO   # as Linux reports a failed writeback
            return -1
        return real.fdatasync(fd)

    acked: Dict[int, bytes] = {}
    failed = [b"raised-%d" % i for i in range(1 if failed_call == "append" else 4)]
    with syscalls(fdatasync=fdatasync):
        h1 = qlog.Log(log_dir, durability="sync")
        for i in range(5):
            p = b"acked-%d" % i
            acked[h1.append(p)] = p
        batch = [b"acked-batch-%d" % i for i in range(3)]
        first = h1.append_batch(batch)
        acked.update((first + i, p) for i, p in enumerate(batch))

        armed[0] = 1
        with pytest.raises(qlog.StorageError) as e:
            if failed_call == "append":
                h1.append(failed[0])
            else:
                h1.append_batch(failed)
        assert injected[0] == 1 and armed[0] == 0
        assert e.value.errno == errno.EIO
        if failed_handle == "closed":
            h1.close()

        h2 = qlog.Log(log_dir, durability="sync")
        h2.sync()
        s = h2.append(b"after the failure")
        assert s > max(acked)
        assert h2.read(s) == [(s, b"after the failure")]
        h2.sync()
        acked[s] = b"after the failure"
        assert not h2.stats().poisoned
        for seq, p in acked.items():
            assert h2.read(seq, max_records=1) == [(seq, p)]
        h2.close()
        h1.close()
    assert injected[0] == 1

    with qlog.Log(log_dir, durability="sync") as log:
        recs = read_all(log)
        assert log.verify().ok
        assert log.stats().corrupt_records == 0
        nxt = log.append(b"reopened")
        assert log.read(nxt) == [(nxt, b"reopened")]
    got = dict(recs)
    for seq, p in acked.items():
        assert got.get(seq) == p, f"acknowledged record {seq} is {got.get(seq)!r} after reopen, not {p!r}"
    extra = [(seq, p) for seq, p in recs if seq not in acked]
    # The records whose append raised: all there, whole and in order, or none.
    assert [p for _, p in extra] in ([], failed), f"records besides the acknowledged ones: {extra}"
    if extra:
        assert [seq for seq, _ in extra] == list(range(extra[0][0], extra[0][0] + len(failed)))


class DroppingWriteback(Recorder):
    """The power-cut recorder of ``_simvfs`` for a disk whose failed
    fdatasync drops what it could not write, as Linux does: the dirty pages
    are marked clean, so they stay at their last durable content through
    later fdatasyncs until they are written again (by ``pwrite``, or by a
    store through a mapping, seen as changed bytes).  ``fail_next`` makes
    the next fdatasync fail with EIO."""

    def __init__(self, log_dir: str, shadow: str, boot_id: str) -> None:
        super().__init__(log_dir, shadow, boot_id)
        self.fail_next = False
        self.failed = 0
        self.dropped: Dict[int, Dict[int, bytes]] = {}   # inode -> page offset -> bytes when dropped

    def hooks(self) -> Dict[str, Callable]:
        return dict(super().hooks(), pwrite=self.pwrite)

    def fdatasync(self, fd: int) -> int:
        if not self.fail_next:
            return super().fdatasync(fd)
        self.fail_next = False
        self.failed += 1
        st = os.fstat(fd)
        cur = os.pread(fd, st.st_size, 0)
        durable = _load_image(self.shadow, st.st_ino)
        pages = self.dropped.setdefault(st.st_ino, {})
        for p in range(0, len(cur), PAGE):
            if cur[p:p + PAGE] != bytes(durable[p:p + PAGE]):
                pages[p] = cur[p:p + PAGE]
        ffi.errno = errno.EIO
        return -1

    def pwrite(self, fd: int, buf, n: int, off: int) -> int:
        r = real.pwrite(fd, buf, n, off)
        if r > 0:
            pages = self.dropped.get(os.fstat(fd).st_ino, {})
            for p in range(off - off % PAGE, off + r, PAGE):
                pages.pop(p, None)
        return r

    def _image(self, fd: int) -> None:
        st = os.fstat(fd)
        pages = self.dropped.get(st.st_ino)
        if not pages:
            return super()._image(fd)
        data = bytearray(os.pread(fd, st.st_size, 0))
        durable = _load_image(self.shadow, st.st_ino)
        for p, when_dropped in list(pages.items()):
            now = bytes(data[p:p + PAGE])
            if now != when_dropped[:len(now)]:
                del pages[p]            # stored to again since: dirty, written back now
                continue
            old = bytes(durable[p:p + len(now)])
            data[p:p + len(now)] = old + bytes(len(now) - len(old))
        _put(os.path.join(self.shadow, f"ino-{st.st_ino}"),
             _SIZE.pack(st.st_size) + bytes(data).rstrip(b"\0"))


@pytest.mark.parametrize("failed_handle", ["still-open", "closed"])
@pytest.mark.c_only("fault injection and boot ids through the C engine's syscall table (_simvfs)")
def test_record_read_after_a_failed_fdatasync_survives_a_power_cut_once_sync_returns(
        tmp_path, failed_handle) -> None:
    """The failed fdatasync dropped the pages of the record being appended;
    the page cache still holds it, so a fresh handle reads it.  Once that
    handle's sync() returns, every record it read is on stable storage: a
    power cut right then loses none of them."""
    rng = random.Random(5)
    live, shadow, out = tmp_path / "live", tmp_path / "shadow", tmp_path / "after"
    live.mkdir()
    rec = DroppingWriteback(str(live), str(shadow), new_boot_id(rng))
    acked: Dict[int, bytes] = {}
    with syscalls(**rec.hooks()):
        h1 = qlog.Log(live, durability="sync")
        for i in range(5):
            p = b"acked-%d" % i
            acked[h1.append(p)] = p
        rec.fail_next = True
        with pytest.raises(qlog.StorageError):
            h1.append(b"raised" * (3 * PAGE // 6))   # spans pages the next records do not touch
        assert rec.failed == 1 and rec.dropped
        if failed_handle == "closed":
            h1.close()
        h2 = qlog.Log(live, durability="sync")
        seen = dict(read_all(h2))
        h2.sync()
        s = h2.append(b"after the failure")
        acked[s] = b"after the failure"
        synced = h2.stats().synced_seq
        assert synced > max(seen)
        materialise(str(live), str(shadow), str(out))   # the power goes now
        h2.close()
        h1.close()
    with syscalls(boot_id=boot_id_hook(new_boot_id(rng))):
        with qlog.Log(out, durability="sync") as log:
            recs = dict(read_all(log))
            report = log.verify()
    for seq, p in acked.items():
        assert recs.get(seq) == p, f"acknowledged record {seq} is {recs.get(seq)!r} after the cut"
    lost = {seq: len(p) for seq, p in seen.items() if recs.get(seq) != p}
    assert not lost, (f"records read before sync() returned are gone after the cut "
                      f"(seq: payload length): {lost}; {report}")
    assert report.ok, report
