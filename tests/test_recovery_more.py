"""Recovery edge cases: a damaged header on the active segment, a machine
with no boot id, and readers racing a writer that rolls on every append."""

from __future__ import annotations

import json
from typing import List, Tuple

import pytest
from damage import flip_byte, records, segments

import qlog
from _crashkit import read_all
from _simvfs import Recorder, boot_id_hook, materialise, syscalls

# ---- a damaged header on the active segment -----------------------------------


def _fill(log: qlog.Log) -> List[Tuple[int, bytes]]:
    for i in range(6):
        log.append(b"%d" % i * 1000)      # 1032-byte records: three to a 4 KiB segment
    return read_all(log)


@pytest.mark.parametrize("offset", [32, 39, 40, 50, 59],
                         ids=["created-low", "created-high", "reserved-first", "reserved-mid",
                              "reserved-last"])
@pytest.mark.parametrize("segment_bytes", [4096, 1 << 20], ids=["after-rolls", "only-segment"])
def test_flipped_bit_in_active_segment_header_loses_no_record_and_keeps_numbers_dense(
        log_dir, offset, segment_bytes) -> None:
    opts = dict(durability="sync", segment_bytes=segment_bytes)
    with qlog.Log(log_dir, **opts) as log:
        before = _fill(log)
    assert [s for s, _ in before] == list(range(6))
    segs = segments(log_dir)
    assert len(segs) == (2 if segment_bytes == 4096 else 1)
    active = segs[-1]
    assert len(records(active)) >= 3           # the damaged header sits above records
    flip_byte(active, offset, 0x01)

    with qlog.Log(log_dir, **opts) as log:     # alone: recovery rebuilds from the files
        assert read_all(log) == before
        seq = log.append(b"next")
        assert seq == len(before)
        assert log.read(seq) == [(seq, b"next")]
    after = before + [(seq, b"next")]
    with qlog.Log(log_dir, **opts) as log:
        assert read_all(log) == after
        report = log.verify()
        assert report.ok, report
        assert report.records == len(after)
        assert log.stats().corrupt_records == 0
        assert log.append(b"again") == seq + 1
    assert segments(log_dir) == segs


# ---- no boot id ---------------------------------------------------------------

BOOT_A = "0f0e0d0c-0b0a-4908-8706-050403020100"
BOOT_B = "10111213-1415-4617-8819-1a1b1c1d1e1f"


@pytest.mark.parametrize("boot_before, boot_after", [("", ""), ("", BOOT_B), (BOOT_A, "")],
                         ids=["none-then-none", "none-then-some", "some-then-none"])
@pytest.mark.c_only("fault injection and boot ids through the C engine's syscall table (_simvfs)")
def test_no_boot_id_never_reuses_a_number_handed_out_before_a_power_cut(
        tmp_path, boot_before, boot_after) -> None:
    """Without a boot id the engine cannot tell a restart from a reboot, so
    it must assume a reboot: records it had handed out but not synced may
    be gone, and their numbers must not be given to new records."""
    live, shadow, out = tmp_path / "live", tmp_path / "shadow", tmp_path / "after"
    live.mkdir()
    rec = Recorder(str(live), str(shadow), boot_before)
    with syscalls(**rec.hooks()):
        log = qlog.Log(live, durability="none")
        durable = log.append(b"durable")
        log.sync()
        log.append(b"handed out 1")
        log.append_batch([b"handed out 2", b"handed out 3"])
        seen = log.read(0)
        assert [p for _, p in seen] == [b"durable", b"handed out 1", b"handed out 2", b"handed out 3"]
        high = seen[-1][0]
        materialise(str(live), str(shadow), str(out))   # the power goes: unsynced records are lost
        log.close()
    with syscalls(boot_id=boot_id_hook(boot_after)):
        with qlog.Log(out, durability="none") as log:
            assert read_all(log) == [(durable, b"durable")], "the cut did not lose the unsynced records"
            seq = log.append(b"after the cut")
            assert seq > high, f"number {seq} was handed out before the cut (up to {high})"
            assert log.read(seq) == [(seq, b"after the cut")]
            log.sync()
        with qlog.Log(out, durability="none") as log:
            assert read_all(log) == [(durable, b"durable"), (seq, b"after the cut")]
            assert log.append(b"later") > seq


# ---- readers racing rolls -----------------------------------------------------

ROLL_SEGMENT = 12288
ROLL_RECORD = 7000       # one record per segment: every append rolls
ROLL_APPENDS = 600

ROLL_WRITER = r"""
import sys, qlog
path, n, seg, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = qlog.Log(path, durability="none", segment_bytes=seg)
for i in range(n):
    assert log.append((b"%08d" % i) * (size // 8)) == i
st = log.stats()
log.close()
print(st.segments, flush=True)
"""

# mode "past-end-*": probe read(far past the end) until the writer is done;
# mode "tail": follow the tail as records arrive.  Then both read the whole
# log from 0 and check every record.
ROLL_READER = r"""
import json, sys, qlog
path, n, seg, size, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
log = qlog.Log(path, durability="none", segment_bytes=seg)

def payload(s):
    return (b"%08d" % s) * (size // 8)

print("ready", flush=True)
probes = 0
nxt = 0
while True:
    probes += 1
    if mode.startswith("past-end"):
        got = log.read(10**12)
        assert got == [], [(s, len(p)) for s, p in got[:3]]
        if probes % 8 == 0 and log.stats().next_seq >= n:
            break
    else:
        for s, p in log.read(nxt, max_records=100):
            assert s == nxt and p == payload(s), (nxt, s, len(p))
            nxt += 1
        if nxt >= n:
            break
corrupt_while_racing = log.stats().corrupt_records
got = 0
while True:
    recs = log.read(got, max_records=100)
    if not recs:
        break
    for s, p in recs:
        assert s == got and p == payload(s), (got, s, len(p))
        got += 1
print(json.dumps({"probes": probes, "read": got, "corrupt_while_racing": corrupt_while_racing,
                  "corrupt": log.stats().corrupt_records}), flush=True)
"""


def test_readers_racing_a_writer_that_rolls_on_every_append_neither_crash_nor_see_damage(
        log_dir, spawn_python, engine) -> None:
    appends = ROLL_APPENDS if engine == "c" else ROLL_APPENDS // 3  # the pure engine: fewer rolls
    args = [log_dir, appends, ROLL_SEGMENT, ROLL_RECORD]
    qlog.Log(log_dir, durability="none", segment_bytes=ROLL_SEGMENT).close()
    readers = {mode: spawn_python(ROLL_READER, args + [mode]) for mode in ("past-end-1", "past-end-2", "tail")}
    for mode, r in readers.items():
        line = r.stdout.readline()
        assert line == "ready\n", f"{mode} reader: {line!r} {r.stderr.read()}"
    writer = spawn_python(ROLL_WRITER, args)
    out, err = writer.communicate(timeout=240)
    assert writer.returncode == 0, f"writer exited with {writer.returncode}: {err}"
    assert int(out) >= appends, f"the writer did not roll on every append ({out.strip()} segments)"
    for mode, r in readers.items():
        out, err = r.communicate(timeout=240)
        assert r.returncode == 0, f"{mode} reader exited with {r.returncode}: {err}"
        report = json.loads(out)
        assert report["read"] == appends, (mode, report)
        assert report["corrupt_while_racing"] == 0 and report["corrupt"] == 0, (mode, report)
        assert report["probes"] > 1, (mode, report)
    with qlog.Log(log_dir, durability="none", segment_bytes=ROLL_SEGMENT) as log:
        assert [s for s, _ in read_all(log)] == list(range(appends))
        assert log.stats().corrupt_records == 0


# ---- a pending rewrite survives a reopen that fails ---------------------------

import os   # noqa: E402
from typing import Callable, Dict   # noqa: E402

from _simvfs import fd_path   # noqa: E402
from test_lifecycle import DroppingWriteback   # noqa: E402

REWRITE_BOOT = "20212223-2425-4627-8829-2a2b2c2d2e2f"
AFTER_CUT_BOOT = "30313233-3435-4637-8839-3a3b3c3d3e3f"


class SegmentSyscalls(DroppingWriteback):
    """``DroppingWriteback`` that fails the next ``fail_segment_syncs``
    fdatasyncs of segment files (EIO, pages dropped) and notes, in order,
    every pwrite to a segment (``("pwrite", name, off, n)``) and every
    fdatasync of one (``("sync", name, ok)``)."""

    def __init__(self, log_dir: str, shadow: str, boot_id: str) -> None:
        super().__init__(log_dir, shadow, boot_id)
        self.fail_segment_syncs = 0
        self.events: List[tuple] = []

    def hooks(self) -> Dict[str, Callable]:
        return dict(super().hooks(), pwrite=self.pwrite)

    def fdatasync(self, fd: int) -> int:
        name = os.path.basename(fd_path(fd))
        if name.endswith(".seg") and self.fail_segment_syncs > 0:
            self.fail_segment_syncs -= 1
            self.fail_next = True
        r = super().fdatasync(fd)
        if name.endswith(".seg"):
            self.events.append(("sync", name, r == 0))
        return r

    def pwrite(self, fd: int, buf, n: int, off: int) -> int:
        name = os.path.basename(fd_path(fd))
        r = super().pwrite(fd, buf, n, off)
        if name.endswith(".seg"):
            self.events.append(("pwrite", name, off, r))
        return r


@pytest.mark.c_only("fault injection and boot ids through the C engine's syscall table (_simvfs)")
def test_reopen_after_a_reopen_failed_in_recovery_still_rewrites_the_segment_a_failed_fsync_dropped(
        tmp_path) -> None:
    """A failed fdatasync dropped the segment's dirty pages; an open whose
    recovery then fails (its own fdatasync: EIO) must not forget that the
    segment has to be written again.  The old engine cleared the control
    block (and with it the pending rewrite) before recovery and lost it when
    recovery failed, so the next open synced without a pwrite to the
    segment and reported as synced a record that a power cut then lost."""
    live, shadow, out = tmp_path / "live", tmp_path / "shadow", tmp_path / "after"
    live.mkdir()
    rec = SegmentSyscalls(str(live), str(shadow), REWRITE_BOOT)
    with syscalls(**rec.hooks()):
        log = qlog.Log(live, durability="sync")
        acked = {log.append(b"acked-%d" % i): b"acked-%d" % i for i in range(3)}
        rec.fail_segment_syncs = 1
        with pytest.raises(qlog.StorageError):
            log.append(b"raised" * 100)
        assert rec.failed == 1 and rec.dropped, "the failed fdatasync dropped no page"
        log.close()

        rec.fail_segment_syncs = 1          # recovery's own fdatasync fails
        with pytest.raises(qlog.StorageError):
            qlog.Log(live, durability="sync")
        assert rec.failed == 2, "the open did not fail in recovery's fdatasync of the segment"

        rec.events.clear()
        log = qlog.Log(live, durability="sync")
        seen = dict(read_all(log))
        st = log.stats()
        events = list(rec.events)
        materialise(str(live), str(shadow), str(out))   # the power goes now
        log.close()
    assert set(acked) <= set(seen), seen
    assert st.synced_seq >= max(seen) + 1, st
    ok_syncs = [i for i, e in enumerate(events) if e[0] == "sync" and e[2]]
    assert ok_syncs, f"the open synced no segment: {events}"
    rewrites = [e for e in events[:ok_syncs[0]] if e[0] == "pwrite" and e[3] > 0]
    assert rewrites, f"the open synced the segment without writing it again first: {events}"
    with syscalls(boot_id=boot_id_hook(AFTER_CUT_BOOT)):
        with qlog.Log(out, durability="sync") as log:
            after = dict(read_all(log))
    lost = {seq: len(p) for seq, p in seen.items() if after.get(seq) != p}
    assert not lost, f"records reported synced are gone after the power cut (seq: length): {lost}"


# ---- more than 64 batches broken by damage after a reboot ---------------------


@pytest.mark.parametrize("damaged", [0, 1, 2], ids=["first-record", "middle-record", "last-record"])
@pytest.mark.c_only("fault injection and boot ids through the C engine's syscall table (_simvfs)")
def test_every_batch_broken_by_damage_after_a_reboot_is_dropped_whole_beyond_64_batches(
        log_dir, damaged) -> None:
    """After a reboot a batch broken by damage in the active segment is
    dropped whole.  The old engine noted the broken parts in a fixed table
    of 64 ranges and left every broken batch past it on disk, so its
    intact records were served as half a batch."""
    n_batches, per_batch = 160, 3
    with qlog.Log(log_dir, durability="none") as log:
        for i in range(n_batches):
            assert log.append_batch([b"%04d-%d-" % (i, j) + b"x" * 90 for j in range(per_batch)]) == i * per_batch
    (seg,) = segments(log_dir)
    recs = records(seg)
    assert len(recs) == n_batches * per_batch
    broken = set(range(0, n_batches, 2))        # 80 broken batches, each with an intact neighbour after
    for b in broken:
        r = recs[b * per_batch + damaged]
        flip_byte(seg, r.offset + r.size - 16, 0xFF)   # inside the payload
    intact = [(r.seq, r.payload) for r in recs if r.seq // per_batch not in broken]

    with syscalls(boot_id=boot_id_hook(BOOT_B)):      # the log was written under another boot id
        with qlog.Log(log_dir, durability="none") as log:
            st = log.stats()                          # what recovery found, before any read
            got = read_all(log)
            half = sorted({s // per_batch for s, _ in got if s // per_batch in broken})
            assert not half, f"{len(half)} broken batches served in part, e.g. batches {half[:5]}"
            assert got == intact
            assert st.corrupt_records == len(broken), st
            assert st.recovered_records_dropped == len(broken) * (per_batch - 1), st
        with qlog.Log(log_dir, durability="none") as log:   # same boot: nothing comes back
            assert read_all(log) == intact
            seq = log.append(b"after")
            assert seq >= n_batches * per_batch
            assert log.read(seq) == [(seq, b"after")]
