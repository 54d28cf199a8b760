"""The on-disk format: docs/FORMAT.md, the C headers, the engine and the pure-Python
reader/writer all say the same thing, byte for byte."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import struct
import time
from typing import Dict, List, Sequence, Tuple

import pytest
from damage import flip_byte

import qlog
from qlog._backend import DELIVERY_BUCKETS_US
from qlog._log import pure as _pure
from qlog._log._qlog_c import lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORMAT_MD = (ROOT / "docs" / "FORMAT.md").read_text()
FORMAT_H = (ROOT / "csrc" / "format.h").read_text()


# ---- helpers ---------------------------------------------------------------


def _tables(text: str) -> List[Tuple[str, List[str], List[List[str]]]]:
    """Every markdown table: (the heading above it, header cells, rows)."""
    out: List[Tuple[str, List[str], List[List[str]]]] = []
    heading, lines = "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| ]+\|$", lines[i + 1]):
            head = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            out.append((heading, head, rows))
            continue
        i += 1
    return out


def _table(heading: str, first_column: str) -> List[List[str]]:
    found = [rows for h, head, rows in _tables(FORMAT_MD) if h == heading and head[0] == first_column]
    assert len(found) == 1, f"FORMAT.md must have one '{first_column}' table under '{heading}'"
    return found[0]


def _defines(prefix: str) -> Dict[str, int]:
    return {m.group(1): int(m.group(2), 0)
            for m in re.finditer(rf"^#define\s+({prefix}\w*)\s+(\S+)", FORMAT_H, re.M)}


def _field_offsets(rows: List[List[str]], names: Dict[str, str]) -> Dict[str, int]:
    """Map each row to a C name by the start of its field text; offsets by C name."""
    out = {}
    for row in rows:
        field = row[2]
        keys = [k for k in names if field.startswith(k)]
        assert len(keys) == 1, f"FORMAT.md field {field!r} matches {keys} of {sorted(names)}"
        if names[keys[0]]:
            out[names[keys[0]]] = int(row[0])
    return out


def _assert_contiguous(rows: List[List[str]], total: int) -> None:
    """Fields follow each other without gap or overlap and end at `total`."""
    off = 0
    for row in rows:
        assert int(row[0]) == off, f"field {row[2]!r} should start at {off}"
        off += int(row[1])
    assert off == total


def _segments(d: str) -> List[Tuple[int, str]]:
    return _pure.segment_files(d)


def _payload(i: int, n: int) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


def _fill(log: qlog.Log, batches: Sequence[Sequence[int]]) -> Tuple[List[Tuple[int, bytes]], Dict[int, int]]:
    """Append each batch of sizes (one append for a batch of one); the
    expected records and the expected flags by sequence number."""
    expected: List[Tuple[int, bytes]] = []
    flags: Dict[int, int] = {}
    for sizes in batches:
        payloads = [_payload(len(expected) + k, n) for k, n in enumerate(sizes)]
        first = log.append(payloads[0]) if len(payloads) == 1 else log.append_batch(payloads)
        assert first == len(expected)
        for k, p in enumerate(payloads):
            expected.append((first + k, p))
            flags[first + k] = (lib.QLOG_REC_FLAG_BATCH_MORE if k + 1 < len(payloads) else 0) | (
                lib.QLOG_REC_FLAG_BATCH_CONT if k > 0 else 0
            )
    return expected, flags


def _read_all(log: qlog.Log, from_seq: int = 0) -> List[Tuple[int, bytes]]:
    out: List[Tuple[int, bytes]] = []
    while True:
        got = log.read(from_seq, max_records=100000)
        if not got:
            return out
        out.extend(got)
        from_seq = got[-1][0] + 1


MIXED = [[5], [0], [1, 2, 3], [8], [9, 15, 16, 17], [300] * 7, [0, 0], [4000], [23, 24, 25]] * 6


# ---- (a) FORMAT.md, qlog.h and format.h agree --------------------------------

CONSTANTS = {
    "segment header size": ("QLOG_SEG_HEADER_SIZE", _pure.SEG_HEADER_SIZE),
    "record header size": ("QLOG_REC_HEADER_SIZE", _pure.REC_HEADER_SIZE),
    "record alignment": ("QLOG_REC_ALIGN", _pure.REC_ALIGN),
    "record type data": ("QLOG_REC_TYPE_DATA", _pure.REC_TYPE_DATA),
    "flag BATCH_MORE": ("QLOG_REC_FLAG_BATCH_MORE", _pure.FLAG_BATCH_MORE),
    "flag BATCH_CONT": ("QLOG_REC_FLAG_BATCH_CONT", _pure.FLAG_BATCH_CONT),
    "flags known": ("QLOG_REC_FLAGS_KNOWN", _pure.FLAGS_KNOWN),
    "largest payload": ("QLOG_MAX_RECORD", _pure.MAX_RECORD),
    "CRC mask delta": ("QLOG_CRC_MASK_DELTA", _pure.CRC_MASK_DELTA),
    "index header size": ("QLOG_IDX_HEADER_SIZE", _pure.IDX_HEADER_SIZE),
    "index entry size": ("QLOG_IDX_ENTRY_SIZE", _pure.IDX_ENTRY_SIZE),
    "index stride": ("QLOG_IDX_STRIDE", _pure.IDX_STRIDE),
    "meta size": ("QLOG_META_SIZE", _pure.META_SIZE),
    "sequence reserve": ("QLOG_SEQ_RESERVE", _pure.SEQ_RESERVE),
    "format version": ("QLOG_FORMAT_VERSION", _pure.FORMAT_VERSION),
}


def test_constants_table_agrees_with_the_c_header_and_the_pure_module() -> None:
    rows = _table("Record", "constant")
    doc = {name: int(value, 0) for name, value in rows}
    assert sorted(doc) == sorted(CONSTANTS), "a constant was added to or removed from FORMAT.md"
    for name, value in doc.items():
        c_name, pure_value = CONSTANTS[name]
        assert getattr(lib, c_name) == value, f"{c_name} disagrees with FORMAT.md's {name!r}"
        assert pure_value == value, f"qlog._pure disagrees with FORMAT.md's {name!r}"


def test_python_copies_of_engine_constants_equal_the_c_values() -> None:
    """The limits, defaults and markers the Python side keeps for the pure
    engine (which runs without the compiled module) equal the C engine's."""
    from qlog._log import modes, purelog, types

    assert (types.MIN_SEGMENT, types.MAX_SEGMENT, types.DEFAULT_SEGMENT_BYTES) == (
        lib.QLOG_MIN_SEGMENT_BYTES, lib.QLOG_MAX_SEGMENT_BYTES, lib.QLOG_DEFAULT_SEGMENT_BYTES)
    assert types.MAX_RECORD == lib.QLOG_MAX_RECORD == _pure.MAX_RECORD
    assert types.DURABILITY_MODES == {"none": lib.QLOG_DURABILITY_NONE,
                                      "interval": lib.QLOG_DURABILITY_INTERVAL,
                                      "sync": lib.QLOG_DURABILITY_SYNC}
    assert modes.DEFAULT_FILE_MODE == lib.QLOG_DEFAULT_FILE_MODE
    internal = (ROOT / "csrc" / "log_internal.h").read_text()

    def define(name: str) -> str:
        m = re.search(rf"^#define\s+{name}\s+(.+?)\s*(?:/\*.*)?$", internal, re.M)
        assert m, f"log_internal.h defines no {name}"
        return m.group(1)

    magic = define("QLOG_CTL_MAGIC")
    assert ast.literal_eval("b" + magic) == types.CTL_MAGIC_C
    for name, value in (("QLOG_DROP_EVERY", purelog._DROP_EVERY), ("QLOG_ALLOC_CHUNK", purelog._ALLOC_CHUNK)):
        m = re.fullmatch(r"\((\d+)u << (\d+)\)", define(name))
        assert m, f"{name} is not written as (Nu << M)"
        assert int(m.group(1)) << int(m.group(2)) == value, f"purelog's copy of {name} differs"


def test_meta_rule_is_one_for_every_reader(tmp_path) -> None:
    """A ``meta`` whose size field is wrong (CRC valid) holds no mark for the
    format module, for ``qlog verify``'s check, and for both engines."""
    from qlog._local.check import check_meta
    from qlog._log import clog, purelog

    good = _pure.encode_meta(5_000_000, "")
    assert _pure.decode_meta(good) == (5_000_000, "") and check_meta(good) is None
    bad = bytearray(good)
    struct.pack_into("<I", bad, 12, 63)
    struct.pack_into("<I", bad, 60, _pure.mask_crc(_pure.crc32c(bytes(bad[:60]))))
    with pytest.raises(qlog.FormatError, match="size 63"):
        _pure.decode_meta(bytes(bad))
    assert "size 63" in (check_meta(bytes(bad)) or "")
    for cls, bytes_ in ((clog.Log, good), (clog.Log, bytes(bad)), (purelog.Log, good), (purelog.Log, bytes(bad))):
        d = tmp_path / f"{cls.__module__}-{bytes_ is good}"
        with cls(str(d), durability="sync") as log:
            log.append(b"x")
        (d / "meta").write_bytes(bytes_)
        with cls(str(d), durability="sync") as log:  # a mark no boot id names applies in this boot
            nxt = log.next_seq
        assert (nxt == 5_000_000) == (bytes_ is good), (cls.__module__, nxt)


def test_magics_agree_with_format_h() -> None:
    for name, doc_text, pure in (
        ("QLOG_SEG_MAGIC", r"`QLOGSEG\0`", _pure.SEG_MAGIC),
        ("QLOG_IDX_MAGIC", r"`QLOGIDX\0`", _pure.IDX_MAGIC),
        ("QLOG_META_MAGIC", "`QLOGMETA`", _pure.META_MAGIC),
    ):
        assert doc_text in FORMAT_MD
        m = re.search(rf'^#define\s+{name}\s+"([^"]*)"', FORMAT_H, re.M)
        assert m, f"format.h defines no {name}"
        assert m.group(1).encode().decode("unicode_escape").encode("latin-1") == pure
        assert len(pure) == 8
    assert "`51 4c 4f 47 53 45 47 00`" in FORMAT_MD
    assert bytes.fromhex("514c4f4753454700") == _pure.SEG_MAGIC


def test_segment_header_table_agrees_with_format_h() -> None:
    rows = _table("Segment header", "offset")
    _assert_contiguous(rows, lib.QLOG_SEG_HEADER_SIZE)
    offsets = _field_offsets(rows, {
        "magic": "", "format version": "SEG_OFF_VERSION", "header size": "SEG_OFF_HDRSIZE",
        "base sequence number": "SEG_OFF_BASE", "salt": "SEG_OFF_SALT",
        "created": "SEG_OFF_CREATED", "reserved": "", "header CRC": "SEG_OFF_CRC",
    })
    assert offsets == _defines("SEG_OFF_")
    values = {row[2]: row[3] for row in rows}
    assert values["format version"] == f"`{lib.QLOG_FORMAT_VERSION}`"
    assert values["header size"] == f"`{lib.QLOG_SEG_HEADER_SIZE}`"
    assert f"bytes [0, {offsets['SEG_OFF_CRC']})" in values["header CRC"]
    assert f"Records start at offset {lib.QLOG_SEG_HEADER_SIZE}." in FORMAT_MD


def test_record_table_agrees_with_format_h() -> None:
    rows = _table("Record", "offset")
    header = [r for r in rows if r[2] not in ("payload", "padding")]
    _assert_contiguous(header, lib.QLOG_REC_HEADER_SIZE)
    offsets = _field_offsets(header, {
        "CRC": "REC_OFF_CRC", "length": "REC_OFF_LEN", "sequence number": "REC_OFF_SEQ",
        "timestamp": "REC_OFF_TS", "salt32": "REC_OFF_SALT", "type": "REC_OFF_TYPE",
        "flags": "REC_OFF_FLAGS", "reserved": "",
    })
    assert offsets == _defines("REC_OFF_")
    by_field = {r[2]: r for r in rows}
    assert by_field["payload"][0] == str(lib.QLOG_REC_HEADER_SIZE)
    assert by_field["padding"][1] == f"0–{lib.QLOG_REC_ALIGN - 1}"
    assert f"at most {lib.QLOG_MAX_RECORD}" in by_field["length"][3]
    assert by_field["type"][3].startswith(f"`{lib.QLOG_REC_TYPE_DATA}` = data")
    assert f"bit 0 (`{lib.QLOG_REC_FLAG_BATCH_MORE}`): BATCH_MORE" in by_field["flags"][3]
    assert f"bit 1 (`{lib.QLOG_REC_FLAG_BATCH_CONT}`): BATCH_CONT" in by_field["flags"][3]
    assert (f"Record size = `({lib.QLOG_REC_HEADER_SIZE} + length + {lib.QLOG_REC_ALIGN - 1})"
            f" & ~{lib.QLOG_REC_ALIGN - 1}`") in FORMAT_MD


def test_index_table_agrees_with_format_h() -> None:
    rows = _table("Sparse index (`.idx`)", "offset")
    header, entries = rows[:-1], rows[-1]
    _assert_contiguous(header, lib.QLOG_IDX_HEADER_SIZE)
    offsets = _field_offsets([[r[0], r[1], r[2]] for r in header], {
        "magic": "", "format version": "IDX_OFF_VERSION", "entry count": "IDX_OFF_COUNT",
        "segment base sequence number": "IDX_OFF_BASE", "segment salt": "IDX_OFF_SALT",
        "segment length": "IDX_OFF_SEGLEN", "stride": "IDX_OFF_STRIDE", "masked CRC32C": "IDX_OFF_CRC",
    })
    assert offsets == _defines("IDX_OFF_")
    assert entries[0] == str(lib.QLOG_IDX_HEADER_SIZE)
    assert entries[1] == f"{lib.QLOG_IDX_ENTRY_SIZE} × count"
    crc_row = [r for r in header if r[2].startswith("masked CRC32C")][0]
    assert f"bytes [0, {offsets['IDX_OFF_CRC']}) followed by all entries" in crc_row[2]
    assert [r for r in header if r[2].startswith("stride")][0][2] == f"stride: `{lib.QLOG_IDX_STRIDE}`"


def test_meta_table_agrees_with_format_h() -> None:
    rows = _table("Meta file (`meta`)", "offset")
    _assert_contiguous(rows, lib.QLOG_META_SIZE)
    offsets = _field_offsets(rows, {
        "magic": "", "format version": "META_OFF_VERSION", "size": "META_OFF_SIZE",
        "reserved_upto": "META_OFF_RESERVE", "boot id": "META_OFF_BOOT", "masked CRC32C": "META_OFF_CRC",
    })
    assert offsets == _defines("META_OFF_")
    boot = [r for r in rows if r[2].startswith("boot id")][0]
    assert int(boot[1]) == _defines("QLOG_BOOT_ID_SIZE")["QLOG_BOOT_ID_SIZE"]
    assert [r for r in rows if r[2].startswith("size")][0][2] == f"size `{lib.QLOG_META_SIZE}`"


def test_meta_file_written_by_the_engine_parses_per_format_md(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "log")
    with qlog.Log(d, durability="none") as log:
        log.append(b"x")
        next_seq = log.stats().next_seq
    b = (tmp_path / "log" / "meta").read_bytes()
    assert len(b) == lib.QLOG_META_SIZE
    magic, version, size, reserved_upto = struct.unpack_from("<8sIIQ", b)
    assert (magic, version, size) == (_pure.META_MAGIC, lib.QLOG_FORMAT_VERSION, lib.QLOG_META_SIZE)
    assert reserved_upto >= next_seq  # no number at or above it was handed out
    with open("/proc/sys/kernel/random/boot_id", "rb") as f:
        assert b[24:60] == f.read().strip()
    assert _pure.unmask_crc(struct.unpack_from("<I", b, 60)[0]) == _pure.crc32c(b[:60])


# ---- (b) the engine and the pure module read each other's bytes --------------


def test_pure_module_imports_nothing_of_the_engine() -> None:
    tree = ast.parse((ROOT / "qlog" / "_log" / "pure.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.update(f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names)
    assert not [m for m in imported if "_qlog_c" in m or "clog" in m or "_glue" in m], imported


def test_records_written_by_the_engine_are_read_identically_in_pure_python(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "log")
    with qlog.Log(d, durability="none", segment_bytes=8192) as log:
        expected, _ = _fill(log, MIXED)
        assert len(_segments(d)) > 3
        assert _pure.read_log(d) == expected  # while open: the active segment is preallocated
        assert _read_all(log) == expected
    damage: List[Tuple[int, _pure.Damage]] = []
    assert _pure.read_log(d, damage=damage) == expected
    assert damage == []


def test_all_but_the_last_record_of_a_batch_carry_batch_more(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "log")
    with qlog.Log(d, durability="none", segment_bytes=8192) as log:
        expected, flags = _fill(log, MIXED)
    seen: Dict[int, int] = {}
    stamps: Dict[int, int] = {}
    for _, path in _segments(d):
        for rec in _pure.iter_segment(path):
            seen[rec.seq] = rec.flags
            stamps[rec.seq] = rec.timestamp
    assert seen == flags
    # every record of a batch has the batch's timestamp
    seq = 0
    for sizes in MIXED:
        assert len({stamps[s] for s in range(seq, seq + len(sizes))}) == 1
        seq += len(sizes)


def test_engine_segments_are_byte_identical_to_pure_encoding(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "log")
    with qlog.Log(d, durability="none", segment_bytes=8192) as log:
        _fill(log, MIXED)
    sealed = _segments(d)[:-1]
    assert sealed
    for base, path in sealed:
        data = pathlib.Path(path).read_bytes()
        h = _pure.decode_segment_header(data)
        rebuilt = _pure.encode_segment_header(h.base, h.salt, h.created_ns)
        for rec in _pure.iter_segment(data):
            rebuilt += _pure.encode_record(rec.payload, rec.seq, rec.timestamp, h.salt,
                                           more=bool(rec.flags & _pure.FLAG_BATCH_MORE),
                                           cont=bool(rec.flags & _pure.FLAG_BATCH_CONT))
        assert rebuilt == data, f"segment {base} differs from its pure-Python encoding"


def test_segments_written_in_pure_python_are_read_by_the_engine(tmp_path: pathlib.Path) -> None:
    d = tmp_path / "log"
    d.mkdir()
    first = [b"one", [b"", b"two", b"x" * 9], _payload(7, 5000), [b"y" * 8] * 30]
    second = [[b"z" * k for k in range(20)], b"last"]
    _pure.write_segment(d, 0, first)
    _pure.write_segment(d, 35, second)
    expected = _pure.read_log(d)
    assert [s for s, _ in expected] == list(range(56))
    with qlog.Log(d, durability="none") as log:
        assert _read_all(log) == expected
        assert log.stats().corrupt_records == 0
        report = log.verify()
        assert report.ok and report.records == 56
        assert log.append(b"after") == 56
        assert log.read(56) == [(56, b"after")]
    assert _pure.read_log(d) == expected + [(56, b"after")]


def test_pure_segment_with_a_nonzero_base_starts_the_log_there(tmp_path: pathlib.Path) -> None:
    d = tmp_path / "log"
    d.mkdir()
    _pure.write_segment(d, 1000, [b"a", [b"b", b"c"]])
    with qlog.Log(d, durability="none") as log:
        assert log.stats().first_seq == 1000
        assert log.read(0) == [(1000, b"a"), (1001, b"b"), (1002, b"c")]
        assert log.append(b"d") == 1003


def test_pure_segment_with_an_unfinished_last_batch_loses_that_batch_on_open(tmp_path: pathlib.Path) -> None:
    d = tmp_path / "log"
    d.mkdir()
    salt = 0x1234_5678_9ABC_DEF1
    seg = bytearray(_pure.encode_segment_header(0, salt, time.time_ns()))
    seg += _pure.encode_record(b"whole", 0, 1, salt)
    torn = [_pure.encode_record(b"part%d" % i, 1 + i, 2, salt, more=True, cont=i > 0)
            for i in range(3)]
    for rec in torn:
        seg += rec
    (d / f"{0:020d}.seg").write_bytes(bytes(seg))
    damage: List[_pure.Damage] = []
    assert list(_pure.iter_segment(d / f"{0:020d}.seg", damage=damage)) == [
        _pure.Record(0, 1, 0, b"whole")
    ]
    assert damage == [_pure.Damage(64 + 40, sum(map(len, torn)), "torn-tail", 0)]
    with qlog.Log(d, durability="none") as log:
        st = log.stats()
        assert (st.recovered_records_dropped, st.recovered_bytes_dropped) == (3, sum(map(len, torn)))
        assert log.read(0) == [(0, b"whole")]
        assert log.append(b"next") == 1


# ---- (c) names, headers, padding, the index -------------------------------


def test_segment_files_are_named_by_their_base_and_sort_in_log_order(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "log")
    t0 = time.time_ns()
    with qlog.Log(d, durability="none", segment_bytes=4096) as log:
        expected, _ = _fill(log, MIXED)
    t1 = time.time_ns()
    names = [n for n in os.listdir(d) if n.endswith(".seg")]
    assert len(names) >= 5
    assert all(re.fullmatch(r"\d{20}\.seg", n) for n in names)
    bases = [int(n[:20]) for n in sorted(names)]
    assert bases == sorted(bases) and len(set(bases)) == len(bases)
    salts = []
    for base, path in _segments(d):
        assert os.path.basename(path) == "%020d.seg" % base
        h = _pure.decode_segment_header(pathlib.Path(path).read_bytes())
        assert h.base == base
        assert next(iter(_pure.iter_segment(path))).seq == base  # its first record
        assert h.salt & 0xFFFFFFFF != 0
        assert t0 <= h.created_ns <= t1
        salts.append(h.salt)
    assert len(set(salts)) == len(salts)
    assert [s for s, _ in _pure.read_log(d)] == [s for s, _ in expected]


def test_decode_segment_header_names_what_is_wrong() -> None:
    good = _pure.encode_segment_header(7, 0xABCDEF01, 123)
    assert _pure.decode_segment_header(good) == _pure.SegmentHeader(7, 0xABCDEF01, 123)
    cases = {
        "short": (good[:40], "40 bytes"),
        "magic": (b"NOTQLOG\0" + good[8:], "magic"),
        "crc": (good[:30] + bytes([good[30] ^ 1]) + good[31:], "CRC mismatch"),
    }
    for name, (b, words) in cases.items():
        with pytest.raises(qlog.FormatError, match=words):
            _pure.decode_segment_header(b)
    v2 = bytearray(good)
    struct.pack_into("<I", v2, 8, 2)
    struct.pack_into("<I", v2, 60, _pure.mask_crc(_pure.crc32c(bytes(v2[:60]))))
    with pytest.raises(qlog.FormatError, match="version is 2"):
        _pure.decode_segment_header(bytes(v2))
    with pytest.raises(ValueError, match="low 32 bits"):
        _pure.encode_segment_header(0, 0xFFFF_0000_0000, 0)


def _log_with_sealed_segments(d: str, sizes: Sequence[int] = (5,) * 400, segment_bytes: int = 4096,
                              ) -> List[Tuple[int, bytes]]:
    with qlog.Log(d, durability="none", segment_bytes=segment_bytes) as log:
        expected, _ = _fill(log, [[n] for n in sizes])
    assert len(_segments(d)) >= 3
    return expected


def test_record_crc_covers_the_padding(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "log")
    expected = _log_with_sealed_segments(d)
    base, path = _segments(d)[1]  # sealed
    # records of 5 bytes take 40: 32 header + 5 payload + 3 padding
    victim = base + 3
    off = 64 + 3 * 40
    assert struct.unpack_from("<Q", pathlib.Path(path).read_bytes(), off + 8)[0] == victim
    flip_byte(path, off + 32 + 5 + 1, 0x01)  # a padding byte
    want = [r for r in expected if r[0] != victim]
    with qlog.Log(d, durability="none") as log:
        assert _read_all(log) == want
        assert log.stats().corrupt_records == 1
        assert [(x.segment, x.offset, x.kind) for x in log.verify().damage] == [(base, off, "record")]
    damage: List[Tuple[int, _pure.Damage]] = []
    assert _pure.read_log(d, damage=damage) == want
    assert damage == [(base, _pure.Damage(off, 40, "record", victim - 1))]


def test_bit_rot_in_a_sealed_segment_whose_index_exists_is_counted(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "log")
    expected = _log_with_sealed_segments(d)
    with qlog.Log(d, durability="none") as log:
        assert _read_all(log) == expected  # writes the .idx files
    base, path = _segments(d)[1]
    assert os.path.exists(path[:-4] + ".idx")
    flip_byte(path, 64 + 3 * 40 + 32, 0x01)  # a payload byte of the 4th record
    with qlog.Log(d, durability="none") as log:
        assert _read_all(log) == [r for r in expected if r[0] != base + 3]
        assert log.stats().corrupt_records == 1


def _sealed_with_index(d: str) -> Tuple[List[Tuple[int, bytes]], Dict[int, bytes]]:
    """A log with several sealed segments of several index entries each,
    read once so that every sealed segment has its .idx; returns the
    records and the .idx bytes by segment base."""
    sizes = [(i * 37) % 700 for i in range(300)]
    expected = _log_with_sealed_segments(d, sizes, segment_bytes=24576)
    with qlog.Log(d, durability="none") as log:
        assert _read_all(log) == expected
    idx = {}
    segs = _segments(d)
    for base, path in segs[:-1]:
        idx[base] = pathlib.Path(path[:-4] + ".idx").read_bytes()
    assert not os.path.exists(segs[-1][1][:-4] + ".idx"), "the active segment has no index"
    return expected, idx


def test_index_of_a_sealed_segment_is_as_format_md_says(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "log")
    _, idx = _sealed_with_index(d)
    for base, path in _segments(d)[:-1]:
        data = pathlib.Path(path).read_bytes()
        ix = _pure.decode_index(idx[base])
        h = _pure.decode_segment_header(data)
        assert (ix.base, ix.salt, ix.segment_length, ix.stride) == (base, h.salt, len(data), 4096)
        assert len(ix.entries) >= 3
        assert ix.entries[0] == (base, 64)
        for (s0, o0), (s1, o1) in zip(ix.entries, ix.entries[1:]):
            assert s1 > s0 and o1 - o0 >= 4096
        for seq, off in ix.entries:
            assert struct.unpack_from("<Q", data, off + 8)[0] == seq
        assert idx[base] == _pure.encode_index(data)


def _reads_from_every_seq_are_right(d: str, expected: List[Tuple[int, bytes]]) -> None:
    with qlog.Log(d, durability="none") as log:
        for i in range(0, len(expected), 3):
            assert log.read(expected[i][0], max_records=5) == expected[i:i + 5]
        assert log.stats().corrupt_records == 0


def test_deleted_index_is_rebuilt(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "log")
    expected, idx = _sealed_with_index(d)
    for base in idx:
        os.unlink(os.path.join(d, "%020d.idx" % base))
    _reads_from_every_seq_are_right(d, expected)
    for base, b in idx.items():
        assert pathlib.Path(d, "%020d.idx" % base).read_bytes() == b


def _refresh_crc(b: bytearray) -> bytearray:
    crc = _pure.crc32c(bytes(b[48:]), _pure.crc32c(bytes(b[:44])))
    struct.pack_into("<I", b, 44, _pure.mask_crc(crc))
    return b


DAMAGE = {
    "truncated": lambda b: b[:-5],
    "empty": lambda b: bytearray(),
    "entry-byte-flipped": lambda b: b[:60] + bytes([b[60] ^ 0x40]) + b[61:],
    "header-crc-flipped": lambda b: b[:44] + bytes([b[44] ^ 1]) + b[45:],
    "other-salt": lambda b: _refresh_crc(b[:24] + bytes([b[24] ^ 1]) + b[25:]),
    "other-length": lambda b: _refresh_crc(b[:32] + struct.pack("<Q", struct.unpack_from("<Q", b, 32)[0] + 8)
                                           + b[40:]),
    "other-base": lambda b: _refresh_crc(b[:16] + struct.pack("<Q", struct.unpack_from("<Q", b, 16)[0] + 1)
                                         + b[24:]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_or_mismatched_index_is_rebuilt(tmp_path: pathlib.Path, damage: str) -> None:
    d = str(tmp_path / "log")
    expected, idx = _sealed_with_index(d)
    for base, b in idx.items():
        bad = bytes(DAMAGE[damage](bytearray(b)))
        assert bad != b
        pathlib.Path(d, "%020d.idx" % base).write_bytes(bad)
    _reads_from_every_seq_are_right(d, expected)
    for base, b in idx.items():
        assert pathlib.Path(d, "%020d.idx" % base).read_bytes() == b


def _engine_and_pure_damage(d: str) -> Tuple[list, list]:
    with qlog.Log(d, durability="none") as log:
        engine = [(x.segment, x.offset, x.length, x.kind, x.after_seq) for x in log.verify().damage]
        records = _read_all(log)
        corrupt = log.stats().corrupt_records
    found: List[Tuple[int, _pure.Damage]] = []
    assert _pure.read_log(d, damage=found) == records
    pure = [(base, x.offset, x.length, x.kind, x.after_seq) for base, x in found]
    assert corrupt == len(engine)
    return engine, pure


def test_pure_reader_resyncs_over_damage_like_the_engine(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "log")
    expected = _log_with_sealed_segments(d)
    base, path = _segments(d)[1]
    # records of 5 bytes take 40; damage the 3rd (CRC), the 6th (length: runs
    # far past the data), the 7th (salt32) and the 10th and 11th together.
    at = [64 + 40 * k for k in (2, 5, 6, 9, 10)]
    flip_byte(path, at[0] + 1, 0x01)
    flip_byte(path, at[1] + 6, 0x10)
    flip_byte(path, at[2] + 24, 0x01)
    flip_byte(path, at[3] + 33, 0x01)
    flip_byte(path, at[4] + 33, 0x01)
    engine, pure = _engine_and_pure_damage(d)
    assert engine == pure == [
        (base, at[0], 40, "record", base + 1),
        (base, at[1], 80, "record", base + 4),
        (base, at[3], 80, "record", base + 8),
    ]
    lost = {base + k for k in (2, 5, 6, 9, 10)}
    assert _pure.read_log(d) == [r for r in expected if r[0] not in lost]


def test_damaged_segment_header_costs_no_records(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "log")
    expected = _log_with_sealed_segments(d)
    base, path = _segments(d)[1]
    flip_byte(path, 33, 0x01)  # the creation time: covered by the header CRC only
    engine, pure = _engine_and_pure_damage(d)
    assert engine == pure == [(base, 0, 64, "segment-header", None)]
    assert _pure.read_log(d) == expected
    with pytest.raises(qlog.FormatError, match="CRC mismatch"):
        _pure.decode_segment_header(pathlib.Path(path).read_bytes())


# ---- the queue structures: FORMAT.md against the code that writes them -----


def _field_table(heading: str) -> List[Tuple[str, int, int]]:
    return [(r[0], int(r[1]), int(r[2])) for r in _table(heading, "field")
            if r[1].isdigit() and r[2].isdigit()]


def test_message_header_table_matches_the_struct_that_packs_it() -> None:
    from qlog import _message

    rows = _field_table("Message record")
    assert [name for name, _, _ in rows] == ["version", "content type", "flags", "delay", "sent"]
    offsets = [off for _, off, _ in rows]
    sizes = [size for _, _, size in rows]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
    assert sum(sizes) == _message.HEADER.size == 16
    packed = _message.HEADER.pack(1, 2, 0x0304, 0x05060708, 0x1112131415161718)
    for (name, off, size), value in zip(rows, [1, 2, 0x0304, 0x05060708, 0x1112131415161718]):
        assert int.from_bytes(packed[off:off + size], "little") == value, name


def test_checkpoint_header_table_matches_the_struct_that_packs_it() -> None:
    from qlog._local import state as _state

    rows = _field_table("Checkpoint")
    offsets = [off for _, off, _ in rows]
    sizes = [size for _, _, size in rows]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
    assert sum(sizes) == _state._CKPT_HEAD.size
    st = _state.QueueState()
    st.applied, st.cursor, st.acked = 77, 65, 9  # every entry is below the cursor
    st.pending[60] = [2, True, 123, 45]
    st.unknown = [(3, 9), (61, 64)]  # below the cursor, holding no entry
    snap = st.snapshot()
    by_name = {name: (off, size) for name, off, size in rows}
    off, size = by_name["journal position"]
    assert int.from_bytes(snap[off:off + size], "little") == 77
    off, size = by_name["entries"]
    assert int.from_bytes(snap[off:off + size], "little") == 1
    off, size = by_name["unknown ranges"]
    assert int.from_bytes(snap[off:off + size], "little") == 2
    off, size = by_name["version"]
    assert int.from_bytes(snap[off:off + size], "little") == _state._CKPT_VERSION == 3
    off, size = by_name["latency buckets"]
    nb = int.from_bytes(snap[off:off + size], "little")
    assert nb == len(DELIVERY_BUCKETS_US) + 1 == 13
    assert snap[:8] == b"QLOGCKPT"
    assert len(snap) == _state._CKPT_HEAD.size + 5 * 8 + 2 * 16 + 8 * (3 + nb) + 4
    pairs = snap[_state._CKPT_HEAD.size + 5 * 8:-4 - 8 * (3 + nb)]
    assert [int.from_bytes(pairs[i:i + 8], "little", signed=True) for i in range(0, 32, 8)] == [3, 9, 61, 64]
    back = _state.QueueState.from_snapshot(snap)
    assert (back.applied, back.cursor, back.acked, back.pending) == (77, 65, 9, {60: [2, True, 123, 45]})
    assert back.unknown == [(3, 9), (61, 64)]


def test_checkpoint_keeps_the_retry_lease_expiry_and_latency_counters() -> None:
    from qlog._local import state as _state

    st = _state.QueueState()
    st.cursor = 10
    st.retried, st.lease_expired, st.delivery_sum = 5, 6, 7_000
    st.delivery[0], st.delivery[-1] = 3, 4
    snap = st.snapshot()
    tail = struct.unpack_from(f"<{3 + len(st.delivery)}q", snap, len(snap) - 4 - 8 * (3 + len(st.delivery)))
    assert tail == (5, 6, 7_000, 3, *[0] * (len(st.delivery) - 2), 4)
    back = _state.QueueState.from_snapshot(snap)
    assert (back.retried, back.lease_expired, back.delivery_sum, back.delivery) == (5, 6, 7_000, st.delivery)


def test_a_send_stamped_after_the_pull_counts_as_latency_zero_and_still_checkpoints() -> None:
    """A producer's clock may read later than the puller's: the latency sum
    must not go negative (a checkpoint refuses a negative counter)."""
    from qlog._local import state as _state

    st = _state.QueueState()
    now = 10_000_000
    st.apply(_state.encode(b"P", [now + 30_000_000, 0, 3, 0, now],
                           [[0, 1, 2], [now - 2_000_000, now + 5, now + 9_000_000]] + [[]] * 7))
    assert st.delivery_sum == 2_000_000
    assert st.delivery[0] == 2 and sum(st.delivery) == 3
    back = _state.QueueState.from_snapshot(st.snapshot())
    assert (back.delivery_sum, back.delivery) == (st.delivery_sum, st.delivery)


def test_format_md_states_the_latency_bounds_the_code_uses() -> None:
    stated = re.search(r"the bounds, in µs, are (.*?) \(`DELIVERY_BUCKETS_US`\)", FORMAT_MD, re.S)
    assert stated is not None
    nums = [int(x.replace(",", "")) for x in re.findall(r"[\d,]*\d", stated.group(1))]
    assert tuple(nums) == DELIVERY_BUCKETS_US


def test_a_version_2_checkpoint_loads_with_its_new_counters_at_zero() -> None:
    import crc32c

    from qlog._local import state as _state

    head = _state._CKPT_HEADS[2].pack(b"QLOGCKPT", 2, 77, 65, 9, 0, 0, 0, 0, 4, 1, 1)
    body = head + struct.pack("<5q", 60, 2, 1, 123, 45) + struct.pack("<2q", 3, 9)
    st = _state.QueueState.from_snapshot(body + struct.pack("<I", crc32c.crc32c(body)))
    assert (st.applied, st.cursor, st.acked, st.hidden, st.unknown) == (77, 65, 9, 4, [(3, 9)])
    assert (st.retried, st.lease_expired, st.delivery_sum, sum(st.delivery)) == (0, 0, 0, 0)


def test_a_version_1_checkpoint_still_loads_with_no_unknown_ranges() -> None:
    import struct

    import crc32c

    from qlog._local import state as _state

    head = _state._CKPT_HEADS[1].pack(b"QLOGCKPT", 1, 77, 65, 9, 0, 0, 0, 0, 4, 1)
    body = head + struct.pack("<5q", 60, 2, 1, 123, 45)
    st = _state.QueueState.from_snapshot(body + struct.pack("<I", crc32c.crc32c(body)))
    assert (st.applied, st.cursor, st.acked, st.hidden, st.unknown) == (77, 65, 9, 4, [])
    assert st.pending == {60: [2, True, 123, 45]}


def test_journal_record_tags_in_format_md_are_the_ones_replay_knows() -> None:
    from qlog._local import state as _state

    rows = _table("State journal record", "tag")
    tags = {r[0].strip("`").encode() for r in rows}
    assert tags == set(_state._APPLY)
