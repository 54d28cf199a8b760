"""qlog.Log: the basic behaviours of the engine's Python face, one failure mode each."""

from __future__ import annotations

import errno
import json
import mmap
import os
import time
from typing import List, Tuple

import pytest
from damage import records, segment_base, segments

import qlog
from qlog._log._qlog_c import ffi, lib

SMALL = 4096  # the smallest segment: rolls after a few dozen records


def payload(seq: int, size: int = 100) -> bytes:
    """``size`` bytes that tell record ``seq`` apart from every other."""
    return (f"record {seq}:".encode() + bytes((seq * 31 + i) % 251 for i in range(size)))[:size]


def read_all(log: qlog.Log, from_seq: int = 0, chunk: int = 1000) -> List[Tuple[int, bytes]]:
    out: List[Tuple[int, bytes]] = []
    while True:
        got = log.read(from_seq, max_records=chunk)
        if not got:
            return out
        out.extend(got)
        from_seq = got[-1][0] + 1


def fill(log: qlog.Log, n: int, start: int = 0, size: int = 100) -> List[Tuple[int, bytes]]:
    """Append records start..start+n-1 one by one; returns what was appended."""
    out = []
    for seq in range(start, start + n):
        assert log.append(payload(seq, size)) == seq
        out.append((seq, payload(seq, size)))
    return out


# ---- appending ------------------------------------------------------------------


def test_append_returns_dense_sequence_numbers_from_zero(log_dir) -> None:
    with qlog.Log(log_dir, durability="none") as log:
        assert [log.append(b"r%d" % i) for i in range(50)] == list(range(50))
        assert log.next_seq == 50


def test_append_batch_returns_the_first_number_and_numbers_the_batch_densely(log_dir) -> None:
    with qlog.Log(log_dir, durability="none") as log:
        assert log.append(b"single") == 0
        assert log.append_batch([b"a", b"b", b"c"]) == 1
        assert log.append_batch([b"d"]) == 4
        assert log.append(b"e") == 5
        assert log.read(0) == [(0, b"single"), (1, b"a"), (2, b"b"), (3, b"c"), (4, b"d"), (5, b"e")]


def test_zero_length_payload_is_a_record(log_dir) -> None:
    with qlog.Log(log_dir, durability="none") as log:
        assert log.append(b"") == 0
        assert log.append_batch([b"", b"x", b""]) == 1
        assert log.read(0) == [(0, b""), (1, b""), (2, b"x"), (3, b"")]


def test_bytes_bytearray_and_memoryview_are_accepted(log_dir) -> None:
    raw = bytearray(b"0123456789")
    with qlog.Log(log_dir, durability="none") as log:
        assert log.append(b"bytes") == 0
        assert log.append(bytearray(b"bytearray")) == 1
        assert log.append(memoryview(b"memoryview")) == 2
        assert log.append(memoryview(raw)[2:5]) == 3
        assert log.append_batch([b"b", bytearray(b"ba"), memoryview(raw)[7:]]) == 4
        got = log.read(0)
    assert got == [(0, b"bytes"), (1, b"bytearray"), (2, b"memoryview"), (3, b"234"),
                   (4, b"b"), (5, b"ba"), (6, b"789")]
    assert all(type(p) is bytes for _, p in got)


def test_record_larger_than_max_record_is_refused_and_nothing_is_written(log_dir, tmp_path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(qlog.MAX_RECORD + 1)  # sparse: no space used, no memory touched
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as log, \
            open(big, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert log.append(b"before") == 0
        [active] = segments(log_dir)
        with open(active, "rb") as a:
            bytes_before = a.read()
        view = memoryview(m)
        try:
            assert len(view) == qlog.MAX_RECORD + 1
            with pytest.raises(qlog.RecordTooLargeError) as exc:
                log.append(view)
        finally:
            view.release()
        assert str(qlog.MAX_RECORD) in str(exc.value)
        assert log.next_seq == 1
        with open(active, "rb") as a:
            assert a.read() == bytes_before
        assert log.append(b"after") == 1
        assert log.read(0) == [(0, b"before"), (1, b"after")]


@pytest.mark.c_only("calls the C engine's qlog_append with a length array")
def test_batch_claiming_a_record_over_the_limit_is_refused_by_the_engine(log_dir) -> None:
    # append_batch hands C one buffer and the lengths; a length over the limit is refused
    # before the buffer is touched (the buffer here is far smaller than the claim).
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as log:
        assert log.append(b"before") == 0
        buf = ffi.new("char[]", b"small")
        lens = ffi.new("uint32_t[]", [1, qlog.MAX_RECORD + 1])
        assert lib.qlog_append(log._h, buf, lens, 2) == lib.QLOG_EINVAL
        assert log.next_seq == 1
        assert log.verify().records == 1
        assert log.append_batch([b"x", b"y"]) == 1
        assert log.read(0) == [(0, b"before"), (1, b"x"), (2, b"y")]


def test_empty_batch_is_refused(log_dir) -> None:
    with qlog.Log(log_dir, durability="none") as log:
        with pytest.raises(ValueError, match="empty"):
            log.append_batch([])
        assert log.next_seq == 0


@pytest.mark.parametrize("kwargs, limit", [
    (dict(durability="fast"), "sync"),
    (dict(durability="SYNC"), "interval"),
    (dict(segment_bytes=4095), "4096"),
    (dict(segment_bytes=(1 << 40) + 1), str(1 << 40)),
    (dict(segment_bytes=8192.0), "4096"),
    (dict(flush_interval=0), "0.001"),
    (dict(flush_interval=3601), "3600"),
], ids=["durability-unknown", "durability-case", "segment-too-small", "segment-too-large",
        "segment-not-int", "flush-zero", "flush-too-long"])
def test_bad_option_raises_value_error_naming_the_limit(tmp_path, kwargs, limit) -> None:
    path = tmp_path / "never"
    with pytest.raises(ValueError) as exc:
        qlog.Log(path, **kwargs)
    assert limit in str(exc.value)
    assert not path.exists()


def test_log_refuses_a_path_that_is_a_file(tmp_path) -> None:
    path = tmp_path / "a-file"
    path.write_bytes(b"not a log")
    with pytest.raises(qlog.StorageError) as exc:
        qlog.Log(path)
    assert exc.value.errno == errno.ENOTDIR
    assert isinstance(exc.value, qlog.QlogError)
    assert path.read_bytes() == b"not a log"


# ---- reading --------------------------------------------------------------------


def test_read_from_any_sequence_number(log_dir) -> None:
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as log:
        want = fill(log, 120)
        for seq in range(120):
            assert log.read(seq, max_records=1) == [want[seq]]
            assert log.read(seq) == want[seq:]


def test_read_stops_at_max_records(log_dir) -> None:
    with qlog.Log(log_dir, durability="none") as log:
        want = fill(log, 10)
        assert log.read(2, max_records=3) == want[2:5]


def test_read_stops_at_max_bytes(log_dir) -> None:
    with qlog.Log(log_dir, durability="none") as log:
        want = fill(log, 10, size=100)
        assert log.read(0, max_bytes=250) == want[:2]
        assert log.read(0, max_bytes=300) == want[:3]


def test_read_returns_one_record_larger_than_max_bytes(log_dir) -> None:
    with qlog.Log(log_dir, durability="none") as log:
        want = fill(log, 3, size=5000)
        assert log.read(1, max_bytes=1) == [want[1]]


def test_read_at_the_end_is_empty(log_dir) -> None:
    with qlog.Log(log_dir, durability="none") as log:
        assert log.read(0) == []
        fill(log, 3)
        assert log.read(3) == []
        assert log.read(1000) == []


def test_segments_roll_at_segment_bytes_and_reads_cross_them(log_dir) -> None:
    rec_size = (32 + 100 + 7) & ~7
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as log:
        want = fill(log, 150, size=100)
        paths = segments(log_dir)
        assert len(paths) >= 4
        assert log.stats().segments == len(paths)
        for path in paths[:-1]:  # sealed: cut to their exact length, rolled when full
            size = os.path.getsize(path)
            assert size <= SMALL < size + rec_size
        for path in paths:
            recs = records(path)
            assert recs[0].seq == segment_base(path)
        seams = [segment_base(p) for p in paths[1:]]
        for seam in seams:
            assert log.read(seam - 2, max_records=4) == want[seam - 2:seam + 2]
        assert read_all(log, chunk=7) == want


def test_record_larger_than_segment_bytes_starts_a_segment_of_its_size(log_dir) -> None:
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as log:
        assert log.append(b"small") == 0
        big = os.urandom(3 * SMALL)
        assert log.append(big) == 1
        assert log.append(b"after") == 2
        assert log.read(0) == [(0, b"small"), (1, big), (2, b"after")]
    assert [segment_base(p) for p in segments(log_dir)][:2] == [0, 1]


# ---- truncate_before ------------------------------------------------------------------


def test_truncate_before_deletes_only_whole_sealed_segments_below_seq(log_dir) -> None:
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as log:
        want = fill(log, 200)
        paths = segments(log_dir)
        bases = [segment_base(p) for p in paths]
        assert len(bases) >= 5
        assert log.truncate_before(bases[2] + 1) == 2  # segment 2 holds records >= seq: kept
        assert segments(log_dir) == paths[2:]
        assert log.first_seq == bases[2]
        assert log.truncate_before(bases[2]) == 0
        assert log.truncate_before(bases[3]) == 1
        assert log.first_seq == bases[3]
        assert log.read(0, max_records=3) == want[bases[3]:bases[3] + 3]
        assert log.read(bases[1]) == want[bases[3]:]


def test_truncate_before_never_deletes_the_active_segment(log_dir) -> None:
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as log:
        want = fill(log, 150)
        paths = segments(log_dir)
        assert log.truncate_before(10 ** 12) == len(paths) - 1
        assert segments(log_dir) == paths[-1:]
        active_base = segment_base(paths[-1])
        assert log.first_seq == active_base
        assert log.read(0) == want[active_base:]
        assert log.append(b"still appendable") == 150
        assert log.read(149) == [want[149], (150, b"still appendable")]


def test_truncate_before_on_an_empty_log_deletes_nothing(log_dir) -> None:
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as log:
        assert log.truncate_before(10 ** 6) == 0
        assert len(segments(log_dir)) == 1
        assert log.append(b"x") == 0


def test_reader_in_another_handle_survives_truncate_before(log_dir) -> None:
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as writer, \
            qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as reader:
        want = fill(writer, 200)
        bases = [segment_base(p) for p in segments(log_dir)]
        first_chunk = reader.read(0, max_records=10)  # the reader has segment 0 open and mapped
        assert first_chunk == want[:10]
        assert writer.truncate_before(bases[3]) == 3
        assert reader.read(10, max_records=5) == want[bases[3]:bases[3] + 5]
        assert read_all(reader, bases[3] + 5) == want[bases[3] + 5:]
        assert reader.first_seq == bases[3]
        fill(writer, 100, start=200)
        assert read_all(reader, 200)[-1] == (299, payload(299))


# ---- sharing a log between handles and processes ---------------------------------------


def test_second_handle_sees_new_records_without_reopening(log_dir) -> None:
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as a, \
            qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as b:
        assert b.read(0) == []
        want = fill(a, 5)
        assert b.read(0) == want
        want += fill(a, 150, start=5)  # several rolls since b last looked
        assert read_all(b) == want
        assert b.append(b"from b") == 155
        assert a.read(155) == [(155, b"from b")]


APPENDER = r"""
import sys, qlog
path, start, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
log = qlog.Log(path, durability="none", segment_bytes=4096)
print("ready", flush=True)
sys.stdin.readline()
for seq in range(start, start + n):
    got = log.append(b"child %d " % seq + bytes(90))
    assert got == seq, (got, seq)
print("done", flush=True)
sys.stdin.readline()
log.close()
"""


def expect_line(child, want: str) -> None:
    """The child's next line of output is ``want`` (its stderr is shown when it is not)."""
    line = child.stdout.readline()
    if line != want:
        child.kill()
        pytest.fail(f"child said {line!r}, expected {want!r}; exit {child.wait()}; stderr:\n{child.stderr.read()}")


def child_payload(seq: int) -> bytes:
    return b"child %d " % seq + bytes(90)


def test_records_appended_by_another_process_are_seen_without_reopening(log_dir, spawn_python) -> None:
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as log:
        want = fill(log, 3)
        assert log.read(0) == want  # this handle has looked at the log before
        child = spawn_python(APPENDER, [log_dir, 3, 150])
        expect_line(child, "ready\n")
        child.stdin.write("go\n")
        expect_line(child, "done\n")
        assert read_all(log) == want + [(s, child_payload(s)) for s in range(3, 153)]
        assert log.append(b"parent again") == 153
        child.stdin.write("bye\n")
        child.stdin.close()
        assert child.wait(timeout=60) == 0, child.stderr.read()


READER = r"""
import json, sys, qlog
path = sys.argv[1]
log = qlog.Log(path, durability="none", segment_bytes=4096)
print(json.dumps(log.read(0)), flush=True)
sys.stdin.readline()
got, seq = [], 0
while True:
    batch = log.read(seq)
    if not batch:
        break
    got += [[s, p.decode()] for s, p in batch]
    seq = batch[-1][0] + 1
print(json.dumps(got), flush=True)
log.close()
"""


def test_another_process_sees_records_appended_after_it_opened(log_dir, spawn_python) -> None:
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as log:
        child = spawn_python(READER, [log_dir])
        assert json.loads(child.stdout.readline()) == []
        want = [(log.append(b"parent %d" % i + b"." * 90), (b"parent %d" % i + b"." * 90).decode())
                for i in range(120)]
        child.stdin.write("go\n")
        child.stdin.flush()
        assert [tuple(x) for x in json.loads(child.stdout.readline())] == want
        assert child.wait(timeout=60) == 0, child.stderr.read()


WAKER = r"""
import sys, qlog
log = qlog.Log(sys.argv[1], durability="none")
print("ready", flush=True)
sys.stdin.readline()
print(log.append(b"wake up"), flush=True)
log.close()
"""


def test_wait_returns_true_when_another_process_appends(log_dir, spawn_python) -> None:
    with qlog.Log(log_dir, durability="none") as log:
        assert log.append(b"first") == 0
        child = spawn_python(WAKER, [log_dir])
        expect_line(child, "ready\n")
        deadline = 60.0
        child.stdin.write("go\n")
        t0 = time.monotonic()
        assert log.wait(1, timeout=deadline) is True
        # woken by the append, not by the deadline running out
        assert time.monotonic() - t0 < deadline
        expect_line(child, "1\n")
        assert log.read(1) == [(1, b"wake up")]
        assert child.wait(timeout=60) == 0, child.stderr.read()


def test_wait_returns_false_on_timeout(log_dir) -> None:
    with qlog.Log(log_dir, durability="none") as log:
        assert log.wait(0, timeout=0.05) is False
        assert log.append(b"x") == 0
        assert log.wait(0, timeout=0) is True
        assert log.wait(1, timeout=0.05) is False


# ---- lifetime --------------------------------------------------------------------


CALLS = {
    "append": lambda log: log.append(b"x"),
    "append_batch": lambda log: log.append_batch([b"x"]),
    "read": lambda log: log.read(0),
    "sync": lambda log: log.sync(),
    "wait": lambda log: log.wait(0, timeout=0),
    "truncate_before": lambda log: log.truncate_before(1),
    "stats": lambda log: log.stats(),
    "verify": lambda log: log.verify(),
    "next_seq": lambda log: log.next_seq,
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_use_after_close_raises_log_closed_error(log_dir, call) -> None:
    log = qlog.Log(log_dir, durability="none")
    log.append(b"x")
    log.close()
    log.close()  # idempotent
    with pytest.raises(qlog.LogClosedError):
        call(log)


def test_context_manager_closes_the_log(log_dir) -> None:
    with qlog.Log(log_dir, durability="none") as log:
        assert log.append(b"inside") == 0
    with pytest.raises(qlog.LogClosedError):
        log.append(b"outside")
    with pytest.raises(RuntimeError, match="boom"):
        with qlog.Log(log_dir, durability="none") as log2:
            raise RuntimeError("boom")
    with pytest.raises(qlog.LogClosedError):
        log2.read(0)


def test_sequence_numbers_continue_after_close_and_reopen(log_dir) -> None:
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as log:
        want = fill(log, 70)
    with qlog.Log(log_dir, durability="none", segment_bytes=SMALL) as log:
        assert log.next_seq == 70
        assert log.append(payload(70)) == 70
        assert log.append_batch([payload(71), payload(72)]) == 71
        assert read_all(log) == want + [(s, payload(s)) for s in (70, 71, 72)]


# ---- durability ------------------------------------------------------------------


def test_interval_mode_syncs_in_the_background(log_dir, wait_until) -> None:
    with qlog.Log(log_dir, durability="interval", flush_interval=0.01) as log:
        for i in range(20):
            assert log.append(b"r%d" % i) == i
        st = wait_until(lambda: (lambda s: s if s.synced_seq == s.next_seq == 20 else None)(log.stats()),
                        what="synced_seq reaching next_seq")
        assert st.fsyncs >= 1  # the handle's background flush, not an explicit sync()


def _switches(thread) -> int:
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


@pytest.mark.c_only("the C engine's flusher sleeps on a futex until an append; the pure engine's polls every flush_interval")
def test_interval_flusher_sleeps_while_idle_and_wakes_on_the_next_append(log_dir, wait_until) -> None:
    with qlog.Log(log_dir, durability="interval", flush_interval=0.01) as log:
        log.append(b"first")
        wait_until(lambda: log.stats().synced_seq == 1, what="the first record synced")
        flusher = log._flusher
        assert flusher is not None
        before = _switches(flusher)
        time.sleep(0.3)  # the observation window: 30 flush intervals with nothing written
        assert _switches(flusher) - before <= 1
        log.append(b"second")  # after the idle spell, still synced in the background
        wait_until(lambda: log.stats().synced_seq == 2, what="the second record synced")


def test_interval_handle_syncs_what_another_handle_appends(log_dir, wait_until) -> None:
    with qlog.Log(log_dir, durability="interval", flush_interval=0.01) as log:
        with qlog.Log(log_dir, durability="none") as other:
            other.append_batch([b"a", b"b"])
            wait_until(lambda: log.stats().synced_seq == 2, what="the other handle's records synced")


def test_sync_mode_append_returns_after_the_record_is_synced(log_dir) -> None:
    with qlog.Log(log_dir, durability="sync") as log:
        for i in range(5):
            seq = log.append(b"r%d" % i)
            assert log.stats().synced_seq > seq
        first = log.append_batch([b"a", b"b", b"c"])
        assert log.stats().synced_seq >= first + 3
        assert log.stats().fsyncs >= 1


def test_none_mode_records_are_synced_by_sync(log_dir) -> None:
    with qlog.Log(log_dir, durability="none") as log:
        seqs = [log.append(b"r%d" % i) for i in range(5)]
        log.sync()
        st = log.stats()
        assert st.synced_seq > seqs[-1]
        assert st.synced_seq == st.next_seq
