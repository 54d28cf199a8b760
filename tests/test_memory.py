"""Memory stays flat: writing and reading a log maps only the segments in
use, so a process's resident memory does not grow with the size of the log."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from _crashkit import child_env

import qlog

MiB = 1 << 20

# Appends 512 MiB in 1 MiB batches of 64 KiB records (16 MiB segments,
# durability "none"), then reads it all back, checking every record; prints
# VmRSS after the first 128 MiB and after all 512 MiB of each phase.
_CHILD = r"""
import json, os, struct, sys
import qlog

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

MiB = 1 << 20
REC, BATCH, TOTAL = 64 * 1024, 16, 512
filler = os.urandom(REC - 8)
log = qlog.Log(sys.argv[1], durability="none", segment_bytes=16 * MiB)
rss_at = {"start": rss()}
n = 0
for mb in range(1, TOTAL + 1):
    log.append_batch([struct.pack("<Q", n + i) + filler for i in range(BATCH)])
    n += BATCH
    if mb == 128:
        rss_at["write 128 MiB"] = rss()
rss_at["write 512 MiB"] = rss()
nxt = 0
while True:
    recs = log.read(nxt, max_records=64)
    if not recs:
        break
    for s, p in recs:
        assert s == nxt and p[:8] == struct.pack("<Q", s) and p[8:] == filler, f"record {s} is wrong"
        nxt += 1
    if nxt == 128 * BATCH:
        rss_at["read 128 MiB"] = rss()
    del recs, p
rss_at["read 512 MiB"] = rss()
assert nxt == n, f"read {nxt} records of {n}"
st = log.stats()
assert st.segments >= 30 and st.corrupt_records == 0, st
log.close()
print(json.dumps(rss_at))
"""


def test_resident_memory_does_not_grow_with_the_log(tmp_path):
    path = tmp_path / "log"
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                           text=True, env=child_env(), timeout=300)
    finally:
        shutil.rmtree(path, ignore_errors=True)    # 512 MiB: do not leave it in the temp dir
    assert r.returncode == 0, r.stderr[-3000:]
    rss = json.loads(r.stdout)
    grew_writing = rss["write 512 MiB"] - rss["write 128 MiB"]
    grew_reading = rss["read 512 MiB"] - rss["read 128 MiB"]
    assert grew_writing < 64 * MiB, f"writing 384 MiB more grew RSS by {grew_writing / MiB:.0f} MiB: {rss}"
    assert grew_reading < 64 * MiB, f"reading 384 MiB more grew RSS by {grew_reading / MiB:.0f} MiB: {rss}"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_reader_holds_few_descriptors_however_many_segments(tmp_path, engine):
    """Reading a log of 600 segments from end to end, in one call and in many,
    leaves open only the segment last read and the active one (Python's mmap
    holds a duplicate descriptor of its file, so four at most); a reader that
    kept every segment it had read open ran out of them under ulimit -n 1024."""
    path = str(tmp_path / "log")
    with qlog.Log(path, durability="none", segment_bytes=4096) as log:
        for i in range(600):
            log.append_batch([b"%04d" % i + b"x" * 3000])
        assert len([f for f in os.listdir(path) if f.endswith(".seg")]) >= 600
    with qlog.Log(path, durability="none", segment_bytes=4096) as log:
        before = _open_fds()
        got = log.read(0, max_records=10_000)
        assert [p[:4] for _, p in got] == [b"%04d" % i for i in range(600)]
        assert _open_fds() - before <= 4
        seq, seen = 0, 0
        while True:
            recs = log.read(seq, max_records=7)
            if not recs:
                break
            seen += len(recs)
            seq = recs[-1][0] + 1
            assert _open_fds() - before <= 4
        assert seen == 600
