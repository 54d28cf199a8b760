"""Recovery and damage: torn tails are cut at the last complete batch, bit rot is
skipped and reported without losing neighbours, garbage files never crash the
engine nor yield a record whose CRC fails."""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence, Tuple

import pytest
from damage import (
    SEG_HEADER_SIZE,
    RecordInfo,
    fill_random,
    flip_byte,
    records,
    segment_base,
    segments,
    truncate_to,
    write_random_file,
    zero_tail,
)

import qlog
from qlog._log import pure as _pure

SEGMENT_BYTES = 4096  # the smallest segment: small files, cheap copies, many rolls
OPTS = dict(durability="none", segment_bytes=SEGMENT_BYTES)


def payload(seq: int) -> bytes:
    """The payload appended as record ``seq``: distinct per seq, 10 to 40 bytes."""
    return f"record {seq}:".encode() + random.Random(seq).randbytes(seq % 29)


def read_all(log: qlog.Log, from_seq: int = 0) -> List[Tuple[int, bytes]]:
    out: List[Tuple[int, bytes]] = []
    while True:
        got = log.read(from_seq, max_records=500)
        if not got:
            return out
        out.extend(got)
        from_seq = got[-1][0] + 1


def fresh_copy(template: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(template, dest)
    return dest


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---- torn tail ---------------------------------------------------------------


@pytest.fixture(scope="module")
def torn_template(tmp_path_factory: pytest.TempPathFactory) -> Tuple[pathlib.Path, str, List[RecordInfo]]:
    """A closed one-segment log: records 0..6 appended one by one, then 7 and 8 as one batch."""
    d = tmp_path_factory.mktemp("torn") / "log"
    with qlog.Log(d, **OPTS) as log:
        for seq in range(7):
            assert log.append(payload(seq)) == seq
        assert log.append_batch([payload(7), payload(8)]) == 7
    [seg] = segments(d)
    recs = records(seg)
    assert [(r.seq, r.payload) for r in recs] == [(s, payload(s)) for s in range(9)]
    assert [r.batch_more for r in recs[-3:]] == [False, True, False]
    return d, os.path.basename(seg), recs


def split_at(recs: Sequence[RecordInfo], cut: int) -> Tuple[List[RecordInfo], List[RecordInfo]]:
    """(records of batches complete before ``cut``, complete records of the batch torn by it)."""
    keep: List[RecordInfo] = []
    pending: List[RecordInfo] = []
    for r in recs:
        if r.end > cut:
            break
        pending.append(r)
        if not r.batch_more:
            keep += pending
            pending = []
    return keep, pending


def first_change(original: bytes, damaged: bytes) -> int:
    """The first offset where ``damaged`` differs from ``original`` (its end when it is a
    shorter prefix; past both when nothing changed)."""
    n = min(len(original), len(damaged))
    for i in range(n):
        if original[i] != damaged[i]:
            return i
    return n if len(damaged) < len(original) else max(len(original), len(damaged)) + 1


def check_torn_tail_recovery(d: pathlib.Path, seg: str, recs: Sequence[RecordInfo], original: bytes) -> None:
    """Open a log whose active segment was damaged from some offset to its end
    (``original`` is its intact content), and check that exactly the batches complete
    before the first changed byte survive, the drop is reported, and the log goes on
    densely."""
    data = file_bytes(seg)
    cut = first_change(original, data)
    keep, orphans = split_at(recs, cut)
    valid_end = keep[-1].end if keep else SEG_HEADER_SIZE
    partial = len(data[valid_end:].rstrip(b"\0"))  # nonzero bytes after the last complete batch
    where = f"damage from offset {cut}"
    with qlog.Log(d, **OPTS) as log:
        st = log.stats()
        assert read_all(log) == [(r.seq, r.payload) for r in keep], where
        assert st.next_seq == len(keep), where
        if partial:
            # the engine reports dropped bytes to 8-byte-word granularity
            upper = min(len(data), valid_end + partial + 7) - valid_end
            assert partial <= st.recovered_bytes_dropped <= upper, where
        else:
            assert st.recovered_bytes_dropped == 0, where
        assert st.recovered_records_dropped == len(orphans), where
        assert st.corrupt_records == 0, where  # a torn tail is not bit rot
        seq = log.append(b"after recovery")
        assert seq == len(keep), where
        assert log.read(seq) == [(seq, b"after recovery")], where
    with qlog.Log(d, **OPTS) as log:
        assert read_all(log) == [(r.seq, r.payload) for r in keep] + [(seq, b"after recovery")], where
        assert log.stats().recovered_bytes_dropped == 0, where  # the cut was clean
        assert log.verify().damage == [], where


def last_three_span(recs: Sequence[RecordInfo]) -> range:
    return range(recs[-3].offset, recs[-1].end + 1)


def damage_points(recs: Sequence[RecordInfo]) -> List[int]:
    """Every record boundary of the last three records, and offsets inside each
    record's header fields, payload and last byte."""
    pts = set()
    for r in recs[-3:]:
        pts.update({r.offset, r.offset + 1, r.offset + 5, r.offset + 12, r.offset + 24,
                    r.offset + 32, r.end - 1})
    pts.add(recs[-1].end)
    return sorted(pts)


def test_torn_tail_is_truncated_on_open_at_every_byte_offset(torn_template, tmp_path) -> None:
    template, name, recs = torn_template
    original = file_bytes(str(template / name))
    for i, cut in enumerate(last_three_span(recs)):
        d = fresh_copy(template, tmp_path / f"cut{i}")
        truncate_to(d / name, cut)
        check_torn_tail_recovery(d, str(d / name), recs, original)


def test_zeroed_tail_is_dropped_on_open(torn_template, tmp_path) -> None:
    template, name, recs = torn_template
    original = file_bytes(str(template / name))
    for i, start in enumerate(damage_points(recs)):
        d = fresh_copy(template, tmp_path / f"zero{i}")
        assert zero_tail(d / name, start) > 0
        check_torn_tail_recovery(d, str(d / name), recs, original)


def test_random_tail_is_dropped_on_open(torn_template, tmp_path) -> None:
    template, name, recs = torn_template
    original = file_bytes(str(template / name))
    rng = random.Random(20240611)
    end = recs[-1].end
    for i, start in enumerate(damage_points(recs)):
        d = fresh_copy(template, tmp_path / f"rand{i}")
        fill_random(d / name, start, end - start + rng.randint(1, 96), rng)
        check_torn_tail_recovery(d, str(d / name), recs, original)


def test_batch_with_torn_last_record_is_dropped_whole(log_dir) -> None:
    with qlog.Log(log_dir, **OPTS) as log:
        assert log.append(b"alone") == 0
        assert log.append_batch([b"batch-1", b"batch-2", b"batch-3" * 5]) == 1
    [seg] = segments(log_dir)
    recs = records(seg)
    assert [r.seq for r in recs] == [0, 1, 2, 3]
    truncate_to(seg, recs[3].offset + recs[3].size // 2)
    with qlog.Log(log_dir, **OPTS) as log:
        assert read_all(log) == [(0, b"alone")]
        st = log.stats()
        assert st.recovered_records_dropped == 2
        assert st.recovered_bytes_dropped >= recs[3].offset - recs[1].offset
        assert log.append_batch([b"x", b"y"]) == 1
        assert read_all(log) == [(0, b"alone"), (1, b"x"), (2, b"y")]


# ---- bit rot ------------------------------------------------------------------

ROT_RECORDS = 300


@pytest.fixture(scope="module")
def rot_template(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A closed log of ROT_RECORDS records over several 4 KiB segments."""
    d = tmp_path_factory.mktemp("rot") / "log"
    with qlog.Log(d, **OPTS) as log:
        for seq in range(ROT_RECORDS):
            assert log.append(payload(seq)) == seq
    assert len(segments(d)) >= 4
    return d


def expected_without(*gone: int) -> List[Tuple[int, bytes]]:
    return [(s, payload(s)) for s in range(ROT_RECORDS) if s not in gone]


@pytest.mark.parametrize("indexed", [False, True], ids=["fresh", "after-index-written"])
def test_bit_rot_in_sealed_segment_skips_and_counts_only_that_record(rot_template, tmp_path, indexed) -> None:
    d = fresh_copy(rot_template, tmp_path / "log")
    if indexed:
        # a reader scanned the log before the rot: the sealed segments have .idx files
        with qlog.Log(d, **OPTS) as log:
            assert read_all(log) == expected_without()
        assert any(name.endswith(".idx") for name in os.listdir(d))
    seg = segments(d)[1]
    size_before = os.path.getsize(seg)
    victim = records(seg)[5]
    flip_byte(seg, victim.offset + 32 + 3)  # a payload byte
    damaged = file_bytes(seg)
    with qlog.Log(d, **OPTS) as log:
        assert read_all(log) == expected_without(victim.seq)
        assert log.read(victim.seq, max_records=1) == [(victim.seq + 1, payload(victim.seq + 1))]
        assert log.stats().corrupt_records >= 1
        report = log.verify()
        assert report.records == ROT_RECORDS - 1
        assert report.damage == [qlog.Damage(segment=segment_base(seg), offset=victim.offset,
                                              length=victim.size, after_seq=victim.seq - 1,
                                              kind="record")]
    with qlog.Log(d, **OPTS) as log:  # reopening does not cut or repair it
        assert read_all(log) == expected_without(victim.seq)
    assert os.path.getsize(seg) == size_before
    assert file_bytes(seg) == damaged


@pytest.mark.parametrize("field_byte", [4, 5, 7], ids=["length-low", "length-mid", "length-high"])
def test_flipped_length_field_resyncs_to_the_next_record(rot_template, tmp_path, field_byte) -> None:
    d = fresh_copy(rot_template, tmp_path / "log")
    seg = segments(d)[2]
    victim = records(seg)[3]
    flip_byte(seg, victim.offset + field_byte)
    with qlog.Log(d, **OPTS) as log:
        assert read_all(log) == expected_without(victim.seq)
        assert log.stats().corrupt_records >= 1
        report = log.verify()
        assert [(x.segment, x.offset, x.kind) for x in report.damage] == [
            (segment_base(seg), victim.offset, "record")]
        assert report.records == ROT_RECORDS - 1


@pytest.mark.parametrize("offset", [0, 9, 16, 26, 33, 44, 61],
                         ids=["magic", "version", "base", "salt", "created", "reserved", "crc"])
def test_damaged_header_of_sealed_segment_loses_no_record(rot_template, tmp_path, offset) -> None:
    d = fresh_copy(rot_template, tmp_path / "log")
    seg = segments(d)[1]
    flip_byte(seg, offset)
    with qlog.Log(d, **OPTS) as log:
        assert read_all(log) == expected_without()
        assert log.stats().corrupt_records >= 1
        report = log.verify()
        assert report.records == ROT_RECORDS
        assert [(x.segment, x.kind) for x in report.damage] == [(segment_base(seg), "segment-header")]
    assert os.path.exists(seg)  # a sealed segment is never set aside


def test_damage_mid_active_segment_is_kept_and_skipped_not_truncated(rot_template, tmp_path) -> None:
    d = fresh_copy(rot_template, tmp_path / "log")
    active = segments(d)[-1]
    recs = records(active)
    assert len(recs) >= 6
    victim = recs[len(recs) // 2]
    flip_byte(active, victim.offset + 32)
    survivors = expected_without(victim.seq)
    with qlog.Log(d, **OPTS) as log:
        st = log.stats()
        assert st.recovered_bytes_dropped == 0
        assert st.recovered_records_dropped == 0
        assert st.next_seq == ROT_RECORDS
        assert read_all(log) == survivors
        assert log.stats().corrupt_records >= 1
        assert [(x.segment, x.offset, x.kind) for x in log.verify().damage] == [
            (segment_base(active), victim.offset, "record")]
        assert log.append(b"next") == ROT_RECORDS
    with qlog.Log(d, **OPTS) as log:
        assert read_all(log) == survivors + [(ROT_RECORDS, b"next")]
        assert log.stats().recovered_bytes_dropped == 0


# ---- garbage files --------------------------------------------------------------

GARBAGE_CHILD = r"""
import json, sys
import qlog

path, starts = sys.argv[1], json.loads(sys.argv[2])
out = {"full": None, "reads": [], "error": None}

def finish():
    print(json.dumps(out))
    sys.exit(0)

try:
    log = qlog.Log(path, durability="none", segment_bytes=4096)
except qlog.QlogError as e:
    out["error"] = f"open: {type(e).__name__}: {e}"
    finish()
try:
    out["full"] = [[s, p.hex()] for s, p in log.read(0, max_records=100000, max_bytes=1 << 30)]
    for start in starts:
        seq, got = start, []
        for _ in range(1000):
            batch = log.read(seq, max_records=64)
            if not batch:
                break
            got.extend([s, p.hex()] for s, p in batch)
            seq = batch[-1][0] + 1
        out["reads"].append([start, got])
    log.verify()
    log.stats()
except qlog.QlogError as e:
    out["error"] = f"read: {type(e).__name__}: {e}"
    finish()
try:
    new = log.append(b"after garbage")
    assert log.read(new, max_records=1) == [(new, b"after garbage")], "append does not read back"
    log.close()
except qlog.QlogError as e:
    out["error"] = f"append: {type(e).__name__}: {e}"
finish()
"""

GARBAGE_RECORDS = 200


@pytest.fixture(scope="module")
def garbage_template(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("garbage") / "log"
    with qlog.Log(d, **OPTS) as log:
        for seq in range(GARBAGE_RECORDS):
            assert log.append(payload(seq)) == seq
    assert len(segments(d)) >= 3
    return d


def garbage_bytes(size: int, content: str, base: int, rng: random.Random) -> bytes:
    """``size`` bytes of junk: all random, or after a valid segment header, or a valid
    header followed by record headers that carry the right salt but random fields."""
    if content == "random" or size < SEG_HEADER_SIZE:
        return rng.randbytes(size)
    salt = rng.getrandbits(64) | 1
    out = bytearray(_pure.encode_segment_header(base, salt, 0))
    while len(out) < size:
        if content == "salted":
            head = bytearray(rng.randbytes(32))
            head[4:8] = rng.choice([rng.getrandbits(32), rng.getrandbits(12), 0xFFFFFFFF,
                                    (1 << 30) + 1]).to_bytes(4, "little")
            head[24:28] = (salt & 0xFFFFFFFF).to_bytes(4, "little")
            head[28] = 1
            if rng.random() < 0.7:
                head[30:32] = b"\0\0"  # reserved bytes as a real record has them
            out += head + rng.randbytes(rng.choice([0, 8, 24, 120]))
        else:
            out += rng.randbytes(size - len(out))
    return bytes(out[:size])


def garbage_cases() -> List[dict]:
    """~30 cases: size (0, under a header, small, large) x placement (the only segment,
    between sealed segments, after the active one) x content, with valid-looking and
    invalid file names."""
    rng = random.Random(7919)
    cases = []
    sizes = {"empty": lambda: 0, "short": lambda: rng.randint(1, 63),
             "small": lambda: rng.randint(64, 8192), "large": lambda: rng.randint(1 << 20, 3 << 20)}
    contents = ["random", "header", "salted"]
    n = 0
    for placement in ("only", "middle", "last"):
        for size_kind, size_fn in sizes.items():
            for content in (contents if size_kind in ("small", "large") else ["random"]):
                cases.append(dict(id=f"{placement}-{size_kind}-{content}", placement=placement,
                                  size=size_fn(), content=content, named=True, seed=n))
                n += 1
    for placement in ("only", "middle"):
        for size_kind in ("empty", "small", "large"):
            cases.append(dict(id=f"{placement}-{size_kind}-badname", placement=placement,
                              size=sizes[size_kind](), content="header", named=False, seed=n))
            n += 1
    return cases


GARBAGE_CASES = garbage_cases()
# names the engine must ignore, and a junk index beside a real sealed segment 0
BAD_NAMES = ["garbage.seg", "123.seg", "0000000000000000001x.seg", "00000000000000000001.seg.old",
             "000000000000000000001.seg", "00000000000000000000.idx"]


def run_garbage_case(case: dict, template: pathlib.Path, root: pathlib.Path, run_python) -> Tuple[dict, object]:
    rng = random.Random(case["seed"])
    d = root / case["id"]
    if case["placement"] == "only":
        d.mkdir()
        bases = []
    else:
        fresh_copy(template, d)
        bases = [segment_base(p) for p in segments(d)]
    if case["placement"] == "only":
        base = rng.randint(0, 10 ** 6)
    elif case["placement"] == "middle":
        base = (bases[0] + bases[1]) // 2 + 1
    else:
        base = bases[-1] + 1000
    name = f"{base:020d}.seg" if case["named"] else rng.choice(BAD_NAMES)
    if case["content"] == "random":
        write_random_file(d / name, case["size"], rng)
    else:
        (d / name).write_bytes(garbage_bytes(case["size"], case["content"], base, rng))
    starts = sorted({0, rng.randint(0, GARBAGE_RECORDS), base, base + 1,
                     *(b for b in bases), *(b + 3 for b in bases)})
    proc = run_python(GARBAGE_CHILD, [str(d), json.dumps(starts)], timeout=120)
    return dict(case, name=name), proc


@pytest.mark.slow
def test_garbage_segment_files_never_crash_nor_yield_bad_records(garbage_template, tmp_path, run_python) -> None:
    expected: Dict[int, bytes] = {s: payload(s) for s in range(GARBAGE_RECORDS)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: run_garbage_case(c, garbage_template, tmp_path, run_python),
                                GARBAGE_CASES))
    assert len(results) >= 30
    for case, proc in results:
        where = f"case {case['id']} ({case['name']}, {case['size']} bytes):\n{proc.stderr[-3000:]}"
        assert proc.returncode == 0, where  # a signal (segfault) or an exception that is not a QlogError
        out = json.loads(proc.stdout)
        if out["error"] is not None:
            # a clear error is acceptable; a garbage file with a name the engine ignores is not one
            assert case["named"], f"{where}\n{out['error']}"
            continue
        for start, got in [(0, out["full"])] + out["reads"]:
            seqs = [s for s, _ in got]
            assert seqs == sorted(set(seqs)), where
            assert all(s >= start for s in seqs), where
            for s, hexed in got:
                assert s in expected and bytes.fromhex(hexed) == expected[s], f"{where}\nseq {s} is not a record"
        # garbage is skipped, not contagious: one read from 0 yields every record of the intact segments
        want = [] if case["placement"] == "only" else list(range(GARBAGE_RECORDS))
        assert [s for s, _ in out["full"]] == want, where
