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
        log_dir, spawn_python) -> None:
    args = [log_dir, ROLL_APPENDS, ROLL_SEGMENT, ROLL_RECORD]
    qlog.Log(log_dir, durability="none", segment_bytes=ROLL_SEGMENT).close()
    readers = {mode: spawn_python(ROLL_READER, args + [mode]) for mode in ("past-end-1", "past-end-2", "tail")}
    for mode, r in readers.items():
        line = r.stdout.readline()
        assert line == "ready\n", f"{mode} reader: {line!r} {r.stderr.read()}"
    writer = spawn_python(ROLL_WRITER, args)
    out, err = writer.communicate(timeout=240)
    assert writer.returncode == 0, f"writer exited with {writer.returncode}: {err}"
    assert int(out) >= ROLL_APPENDS, f"the writer did not roll on every append ({out.strip()} segments)"
    for mode, r in readers.items():
        out, err = r.communicate(timeout=240)
        assert r.returncode == 0, f"{mode} reader exited with {r.returncode}: {err}"
        report = json.loads(out)
        assert report["read"] == ROLL_APPENDS, (mode, report)
        assert report["corrupt_while_racing"] == 0 and report["corrupt"] == 0, (mode, report)
        assert report["probes"] > 1, (mode, report)
    with qlog.Log(log_dir, durability="none", segment_bytes=ROLL_SEGMENT) as log:
        assert [s for s, _ in read_all(log)] == list(range(ROLL_APPENDS))
        assert log.stats().corrupt_records == 0
