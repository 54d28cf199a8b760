"""The two engines against each other: the C engine (``qlog._log``) and the
pure-Python one (``qlog._log.purelog``) read each other's files record for
record, write the same bytes but for salts and timestamps, recover each
other's torn tails, refuse a directory the other has open, and the queue
layer runs on the pure engine alone (``QLOG_PURE=1``, or the compiled
modules missing)."""

from __future__ import annotations

import json
import os
import pathlib
import random
import struct
import threading
from typing import Dict, List, Tuple

import pytest
from damage import data_end, records, segment_base, segments

import qlog
from qlog._log import pure as _pure, purelog as _purelog

try:
    from qlog._log.clog import Log as CLog
except ImportError:  # pragma: no cover - the compiled modules are not built
    CLog = None

needs_c = pytest.mark.skipif(CLog is None, reason="the compiled modules (qlog._log._qlog_c) are not built")
ENGINES = {"c": CLog, "pure": _purelog.Log}
PAIRS = [("c", "pure"), ("pure", "c")]
SEGMENT = 4096


def _plan(seed: int) -> List[List[bytes]]:
    """Batches of payloads (a batch of one is a single append): empty, small,
    unaligned, and some larger than a segment."""
    rng = random.Random(seed)
    out = []
    for b in range(120):
        n = rng.choice([1, 1, 1, 2, 3, 7])
        sizes = [rng.choice([0, 1, 7, 8, 9, 100, 1000, rng.randint(0, 3000)]) for _ in range(n)]
        if b % 40 == 39:
            sizes[0] = 9000  # a record larger than the segment: a segment of its own
        out.append([bytes([b & 0xFF, i & 0xFF]) * (s // 2) + b"x" * (s % 2) for i, s in enumerate(sizes)])
    return out


def _write(engine: str, path: str, plan: List[List[bytes]], prefix: bytes = b"") -> List[Tuple[int, bytes]]:
    want = []
    with ENGINES[engine](path, durability="none", segment_bytes=SEGMENT) as log:
        for batch in plan:
            if len(batch) == 1 and not prefix:
                first = log.append(batch[0])
            else:
                first = log.append_batch(batch, prefix=prefix)
            want.extend((first + k, prefix + p) for k, p in enumerate(batch))
    return want


def _flags(path: str) -> Dict[int, int]:
    """Each record's batch flags, by sequence number, from the files."""
    return {r.seq: r.flags for seg in segments(path) for r in records(seg)}


def _expected_flags(plan: List[List[bytes]]) -> Dict[int, int]:
    out, seq = {}, 0
    for batch in plan:
        for k in range(len(batch)):
            out[seq] = (_pure.FLAG_BATCH_MORE if k + 1 < len(batch) else 0) | (
                _pure.FLAG_BATCH_CONT if k else 0)
            seq += 1
    return out


def _read_all(log) -> List[Tuple[int, bytes]]:
    out: List[Tuple[int, bytes]] = []
    while True:
        got = log.read(out[-1][0] + 1 if out else 0, max_records=97)
        if not got:
            return out
        out.extend(got)


@needs_c
@pytest.mark.parametrize("writer,reader", PAIRS)
def test_each_engine_reads_what_the_other_wrote_record_for_record(tmp_path, writer, reader) -> None:
    path = str(tmp_path / "log")
    plan = _plan(1)
    want = _write(writer, path, plan)
    assert _flags(path) == _expected_flags(plan), "batch boundaries in the files differ from the appends"
    with ENGINES[reader](path, durability="none", segment_bytes=SEGMENT) as log:
        assert _read_all(log) == want
        assert log.next_seq == len(want)
        for frm in (0, 1, len(want) // 2, len(want) - 1):
            assert log.read(frm, max_records=5) == want[frm:frm + 5]
        rep = log.verify()
        assert rep.ok and rep.records == len(want), rep
        seq = log.append_batch([b"one", b"two"], prefix=b"P")
        assert seq == len(want)
    with ENGINES[writer](path, durability="none", segment_bytes=SEGMENT) as log:
        assert _read_all(log) == want + [(seq, b"Pone"), (seq + 1, b"Ptwo")]
        assert log.verify().ok


@needs_c
def test_both_engines_write_the_same_bytes_but_for_salts_and_timestamps(tmp_path) -> None:
    plan = _plan(2)
    dirs = {e: str(tmp_path / e) for e in ENGINES}
    for e, d in dirs.items():
        _write(e, d, plan, prefix=b"pre:")
    names = {e: sorted(n for n in os.listdir(d) if n.endswith((".seg", ".idx"))) for e, d in dirs.items()}
    segs = {e: segments(d) for e, d in dirs.items()}
    assert [segment_base(p) for p in segs["c"]] == [segment_base(p) for p in segs["pure"]]
    assert len(segs["c"]) >= 5
    for pc, pp in zip(segs["c"], segs["pure"]):
        bc, bp = pathlib.Path(pc).read_bytes(), pathlib.Path(pp).read_bytes()
        hc, hp = _pure.decode_segment_header(bc), _pure.decode_segment_header(bp)
        assert hc.base == hp.base
        assert bc[8:16] == bp[8:16] and bc[40:60] == bp[40:60] == bytes(20)
        # sealed segments are cut to the same length; the active one holds the same data
        if pc != segs["c"][-1]:
            assert len(bc) == len(bp), pc
        assert data_end(pc) == data_end(pp)
        rc, rp = records(pc), records(pp)
        assert [(r.offset, r.size, r.seq, r.flags, r.payload) for r in rc] == \
               [(r.offset, r.size, r.seq, r.flags, r.payload) for r in rp]
        # record by record the bytes differ only in the CRC, timestamp and salt32
        for a, b in zip(rc, rp):
            x, y = bytearray(bc[a.offset:a.offset + a.size]), bytearray(bp[b.offset:b.offset + b.size])
            for lo, hi in ((0, 4), (16, 28)):
                x[lo:hi] = y[lo:hi] = bytes(hi - lo)
            assert x == y, (pc, a.seq)
    # the sparse indexes name the same entries (readers wrote them on both sides)
    for e in ENGINES:
        with ENGINES[e](dirs[e], durability="none", segment_bytes=SEGMENT) as log:
            _read_all(log)
    idx = {e: sorted(n for n in os.listdir(d) if n.endswith(".idx")) for e, d in dirs.items()}
    assert idx["c"] == idx["pure"] and idx["c"], (names, idx)
    for n in idx["c"]:
        ic = _pure.decode_index(pathlib.Path(dirs["c"], n).read_bytes())
        ip = _pure.decode_index(pathlib.Path(dirs["pure"], n).read_bytes())
        assert (ic.base, ic.segment_length, ic.stride, ic.entries) == \
               (ip.base, ip.segment_length, ip.stride, ip.entries)


def _tear(path: str) -> Tuple[int, int]:
    """Append an unfinished batch (two whole records and half a third, all
    flagged as one batch) after the data of the active segment, as a writer
    killed mid-write leaves it.  Returns (bytes written, next seq)."""
    seg = segments(path)[-1]
    recs = records(seg)
    salt = _pure.decode_segment_header(pathlib.Path(seg).read_bytes()).salt
    nxt = recs[-1].seq + 1 if recs else segment_base(seg)
    ts = 1_700_000_000_000_000_000
    torn = b"".join(_pure.encode_record(b"T%d" % k * 10, nxt + k, ts, salt, more=True, cont=k > 0)
                    for k in range(3))
    torn = torn[:len(torn) - 20]
    with open(seg, "r+b") as f:
        f.seek(data_end(seg))
        f.write(torn)
    return len(torn), nxt


@needs_c
@pytest.mark.parametrize("writer,recoverer", PAIRS)
def test_a_torn_tail_left_in_one_engines_files_is_recovered_by_the_other(tmp_path, writer, recoverer) -> None:
    path = str(tmp_path / "log")
    want = _write(writer, path, _plan(3)[:30])
    torn, nxt = _tear(path)
    assert nxt == len(want)
    with ENGINES[recoverer](path, durability="sync", segment_bytes=SEGMENT) as log:
        st = log.stats()
        assert st.recovered_bytes_dropped == (torn + 7) // 8 * 8
        assert st.recovered_records_dropped == 2
        assert _read_all(log) == want
        assert log.append(b"after") == nxt  # numbers stay dense after a process crash
    with ENGINES[writer](path, durability="none", segment_bytes=SEGMENT) as log:
        assert _read_all(log) == want + [(nxt, b"after")]
        assert log.verify().ok


def _meta_of_another_boot(path: str) -> int:
    """Rewrite ``meta`` as a previous boot of the machine left it; returns its mark."""
    b = pathlib.Path(path, "meta").read_bytes()
    reserved = struct.unpack_from("<Q", b, 16)[0]
    head = b[:24] + b"00000000-0000-4000-8000-000000000000"
    pathlib.Path(path, "meta").write_bytes(head + struct.pack("<I", _pure.mask_crc(_pure.crc32c(head))))
    return reserved


def _meta(path: str) -> Tuple[int, str]:
    b = pathlib.Path(path, "meta").read_bytes()
    return struct.unpack_from("<Q", b, 16)[0], b[24:60].rstrip(b"\0").decode()


@pytest.mark.parametrize("writer,reopener", [("pure", "pure"), ("c", "pure"), ("pure", "c"), ("c", "c")])
def test_after_a_reboot_the_log_continues_at_the_reserved_mark(tmp_path, writer, reopener) -> None:
    if CLog is None and "c" in (writer, reopener):
        pytest.skip("the compiled modules (qlog._log._qlog_c) are not built")
    path = str(tmp_path / "log")
    with ENGINES[writer](path, durability="sync", segment_bytes=SEGMENT) as log:
        log.append_batch([b"a", b"b", b"c"])
    mark = _meta_of_another_boot(path)
    assert mark == _pure.SEQ_RESERVE  # raised by the first open, before any append
    boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    # Opened and closed again in this boot before any append: no record shows
    # the gap yet, so `meta` must keep it for every later open (a mark naming
    # no boot), or the next open would number from the last record.
    for _ in range(2):
        with ENGINES[reopener](path, durability="sync", segment_bytes=SEGMENT) as log:
            assert log.next_seq == mark  # a gap, never a reuse
        assert _meta(path) == (mark, "")
    with ENGINES[writer](path, durability="sync", segment_bytes=SEGMENT) as log:
        assert log.append(b"d") == mark
        assert _meta(path) == (mark + 1, "")  # the first append still names no boot
        assert log.append(b"e") == mark + 1
        assert _read_all(log) == [(0, b"a"), (1, b"b"), (2, b"c"), (mark, b"d"), (mark + 1, b"e")]
    assert _meta(path) == (mark + 2 + _pure.SEQ_RESERVE, boot)  # the usual mark again


_HOLDER = r"""
import sys, qlog
log = qlog.Log(sys.argv[1], durability="none")
log.append(b"held by " + qlog.ENGINE.encode())
print(qlog.ENGINE, flush=True)
sys.stdin.readline()
log.close()
print("closed", flush=True)
"""


@needs_c
@pytest.mark.parametrize("holder,opener", PAIRS)
def test_a_directory_open_in_one_engine_is_refused_by_the_other(
        tmp_path, holder, opener, spawn_python, monkeypatch) -> None:
    path = str(tmp_path / "log")
    if holder == "pure":
        monkeypatch.setenv("QLOG_PURE", "1")
    else:
        monkeypatch.delenv("QLOG_PURE", raising=False)
    child = spawn_python(_HOLDER, [path])
    assert child.stdout.readline().strip() == holder
    other = "C" if holder == "c" else "pure-Python"
    with pytest.raises(qlog.EngineConflictError, match=f"with the {other} engine"):
        ENGINES[opener](path, durability="none")
    with ENGINES[holder](path, durability="none") as log:  # the same engine joins
        assert log.read(0) == [(0, b"held by " + holder.encode())]
    child.stdin.write("\n")
    assert child.stdout.readline().strip() == "closed"
    assert child.wait(30) == 0
    with ENGINES[opener](path, durability="none") as log:  # alone now: it opens and recovers
        assert log.read(0) == [(0, b"held by " + holder.encode())]


def test_close_wakes_a_pure_engine_waiter_with_log_closed_error(log_dir, wait_until) -> None:
    log = _purelog.Log(log_dir, durability="none")
    log.append(b"x")
    outcome: List[str] = []

    def waiter() -> None:
        try:
            outcome.append(repr(log.wait(10 ** 6)))
        except qlog.LogClosedError:
            outcome.append("LogClosedError")

    t = threading.Thread(target=waiter)
    t.start()
    wait_until(lambda: log._calls == 1, what="the waiter is inside wait()")
    log.close()
    t.join(30)
    assert not t.is_alive() and outcome == ["LogClosedError"]


_HIDE_COMPILED = r"""
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("qlog._log._qlog_c", "qlog._log._glue"):
            raise ImportError(f"{name} is hidden")
        return None

sys.meta_path.insert(0, Refuse())
"""

_QUEUE_SMOKE = r"""
import json, sys, time
import qlog
assert "qlog._log._qlog_c" not in sys.modules and "qlog._log._glue" not in sys.modules, sorted(sys.modules)
path = sys.argv[1]
out = {"engine": qlog.ENGINE, "log": qlog.Log.__module__}
b = qlog.open(path)
q = b.queue("jobs", max_retries=1, dead_letter_queue="dlq", retry_delay=0)
ids = [q.send({"n": 1}), q.send("two", content_type="text"), q.send(b"\x00three", content_type="bytes")]
ids += q.send_batch([{"n": i} for i in range(4, 9)])
assert len(set(ids)) == 8
batch = q.pull(batch_size=10, visibility_timeout=30)
out["first_pull"] = [{"hex": m.body.hex()} if isinstance(m.body, bytes) else m.body
                     for m in batch.messages]
for m in batch.messages:
    if m.body == {"n": 1}:
        m.retry()
    else:
        m.ack()
again = q.pull(batch_size=10, visibility_timeout=30)
out["second_pull"] = [(m.body, m.attempts) for m in again.messages]
for m in again.messages:
    m.retry()
b.close()
b = qlog.open(path)
dlq = b.queue("dlq")
dead = dlq.pull(batch_size=10, visibility_timeout=30)
out["dead"] = [(m.body, m.dead_letter is not None) for m in dead.messages]
for m in dead.messages:
    m.ack()
q = b.queue("jobs")
q.send("after reopen", content_type="text")
out["after_reopen"] = [m.body for m in q.pull(batch_size=10, visibility_timeout=30).messages]
st = q.stats()
out["stats"] = {"acked": st.acked, "dead_lettered": st.dead_lettered}
b.close()
print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("how", ["QLOG_PURE=1", "compiled modules hidden"])
def test_the_queue_runs_on_the_pure_engine_alone(tmp_path, run_python, monkeypatch, how) -> None:
    """send, send_batch, pull, ack, retry, dead-lettering and reopening, in a
    child interpreter that never imports the compiled modules."""
    if how == "QLOG_PURE=1":
        monkeypatch.setenv("QLOG_PURE", "1")
        code = _QUEUE_SMOKE
    else:
        monkeypatch.delenv("QLOG_PURE", raising=False)
        code = _HIDE_COMPILED + _QUEUE_SMOKE
    r = run_python(code, [str(tmp_path / "data")])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["engine"] == "pure" and out["log"] == "qlog._log.purelog"
    assert out["first_pull"] == [{"n": 1}, "two", {"hex": b"\x00three".hex()}] + [{"n": i} for i in range(4, 9)]
    assert out["second_pull"] == [[{"n": 1}, 2]]
    assert out["dead"] == [[{"n": 1}, True]]
    assert out["after_reopen"] == ["after reopen"]
    assert out["stats"] == {"acked": 7, "dead_lettered": 1}


_ROLL_VICTIM = r"""
import json, os, signal, sys
from qlog._log import purelog as P
path, step = sys.argv[1], int(sys.argv[2])
log = P.Log(path, durability="none", segment_bytes=4096)
rec = b"v" * 600
acked = []
while log._get(P._WRITE_END) + P._RH + len(rec) <= log._get(P._ACTIVE_CAP):
    acked.append(log.append(rec))
print(json.dumps(acked), flush=True)
calls = [0]

def dies_at_step(fn):
    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), signal.SIGKILL)   # dies holding the writers' lock
        return fn(*args, **kwargs)
    return call

for name in ("open", "close", "posix_fallocate", "pwrite", "fdatasync", "fsync", "ftruncate", "unlink"):
    setattr(os, name, dies_at_step(getattr(os, name)))
seq = log.append(rec)   # this one rolls
print(json.dumps({"seq": seq, "calls": calls[0]}), flush=True)
"""

_IDLE = r"""
import sys
from qlog._log import purelog as _purelog
log = _purelog.Log(sys.argv[1], durability="none", segment_bytes=4096)
print("open", flush=True)
sys.stdin.readline()
log.close()
"""


def _roll_calls(tmp_path, run_python) -> int:
    """How many of the watched system calls an uninterrupted roll makes."""
    r = run_python(_ROLL_VICTIM, [str(tmp_path / "count"), 10 ** 9])
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[1])["calls"]


def test_a_pure_writer_killed_at_each_system_call_of_a_roll_is_repaired(tmp_path, run_python, spawn_python) -> None:
    """The writer (pure engine) is SIGKILLed at each system call of a segment
    roll, holding the writers' lock, while another process keeps the log
    open.  The next writer repairs what it left: the records it appended
    before are all there, numbers stay dense, nothing reads as damage; the
    same after a reopen alone, and the C engine reads the same records."""
    total = _roll_calls(tmp_path, run_python)
    assert total >= 6, f"a roll made only {total} watched calls"
    for step in range(1, total + 1):
        path = str(tmp_path / f"step{step}")
        idle = spawn_python(_IDLE, [path])
        assert idle.stdout.readline().strip() == "open"
        r = run_python(_ROLL_VICTIM, [path, step])
        assert r.returncode == -9, (step, r.returncode, r.stderr[-2000:])
        acked = json.loads(r.stdout.splitlines()[0])
        want = [(s, b"v" * 600) for s in acked]
        assert acked == list(range(len(acked))) and len(acked) >= 5
        with _purelog.Log(path, durability="none", segment_bytes=4096) as log:  # joins: repairs
            seq = log.append(b"survivor")
            assert seq == len(acked), f"step {step}: the survivor got {seq} after {len(acked)} records"
            assert _read_all(log) == want + [(seq, b"survivor")], f"step {step}"
            assert log.verify().ok, (step, log.verify())
            assert log.append(b"v" * 3000) == seq + 1  # and it rolls again
        idle.stdin.write("\n")
        assert idle.wait(30) == 0
        want += [(seq, b"survivor"), (seq + 1, b"v" * 3000)]
        with _purelog.Log(path, durability="none", segment_bytes=4096) as log:  # alone: rebuilt
            assert _read_all(log) == want, f"step {step}"
            assert log.stats().recovered_records_dropped == 0
        if CLog is not None:
            with CLog(path, durability="none", segment_bytes=4096) as log:
                assert _read_all(log) == want, f"step {step} (read by the C engine)"
                assert log.verify().ok


@pytest.mark.parametrize("which", ["sealed", "active"])
@pytest.mark.parametrize("eng", ["c", "pure"])
def test_both_engines_refuse_a_segment_replaced_by_a_symbolic_link(tmp_path, eng, which) -> None:
    if CLog is None and eng == "c":
        pytest.skip("the compiled modules (qlog._log._qlog_c) are not built")
    path = tmp_path / "log"
    with ENGINES[eng](str(path), durability="none", segment_bytes=SEGMENT) as log:
        for i in range(100):
            log.append(b"r%d" % i + b"x" * 200)
    segs = segments(path)
    assert len(segs) >= 2
    seg = pathlib.Path(segs[0] if which == "sealed" else segs[-1])
    target = tmp_path / "elsewhere.seg"
    seg.rename(target)
    seg.symlink_to(target)
    before = target.read_bytes()
    with pytest.raises(qlog.StorageError, match="symbolic link"):
        with ENGINES[eng](str(path), durability="none", segment_bytes=SEGMENT) as log:
            log.read(0, max_records=1000)
    assert target.read_bytes() == before  # never written through the link
