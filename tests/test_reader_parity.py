"""Every reader of a record follows one rule (docs/FORMAT.md, "Reading a
segment"): the C engine, the pure engine and `qlog verify`'s reader return
the same records of the same bytes, and count the same damage.  Each case
writes a real log, changes one record's bytes (re-computing its CRC where
the case is a CRC-valid record), and reads a copy with each reader."""

from __future__ import annotations

import pathlib
import shutil
import struct
from typing import Callable, Dict, List, Tuple

import pytest

from qlog._log import pure as F
from qlog._log.clog import Log as CLog
from qlog._log.purelog import Log as PureLog

N = 6
VICTIM = 2  # the sequence number of the record changed (the log starts at 0)
SEG = 1 << 20


def _offsets(data: bytes) -> List[int]:
    off, out = F.SEG_HEADER_SIZE, []
    for _ in range(N):
        out.append(off)
        (length,) = struct.unpack_from("<I", data, off + 4)
        off += F.record_size(length)
    return out


def _recrc(buf: bytearray, off: int) -> None:
    (length,) = struct.unpack_from("<I", buf, off + 4)
    size = F.record_size(length)
    struct.pack_into("<I", buf, off, F.mask_crc(F.crc32c(bytes(buf[off + 4:off + size]))))


def _set_flags(bits: int, crc: bool = True) -> Callable[[bytearray, int], None]:
    def change(buf: bytearray, off: int) -> None:
        buf[off + 29] |= bits
        if crc:
            _recrc(buf, off)
    return change


def _set_byte(at: int, value: int) -> Callable[[bytearray, int], None]:
    def change(buf: bytearray, off: int) -> None:
        buf[off + at] = value
        _recrc(buf, off)
    return change


CASES: Dict[str, Tuple[Callable[[bytearray, int], None], bool]] = {
    # name: (the change, whether the record stays valid)
    "unchanged": (lambda buf, off: None, True),
    "unknown flag bit 2, CRC valid": (_set_flags(4), False),
    "unknown flag bit 7, CRC valid": (_set_flags(0x80), False),
    "a known flag bit, CRC valid": (_set_flags(F.FLAG_BATCH_MORE), True),
    "reserved byte set, CRC valid": (_set_byte(30, 1), False),
    "unknown record type, CRC valid": (_set_byte(28, 9), False),
    "payload bit flipped (bad CRC)": (lambda buf, off: buf.__setitem__(off + 40, buf[off + 40] ^ 1), False),
}


def _make(tmp: pathlib.Path, change: Callable[[bytearray, int], None]) -> pathlib.Path:
    src = tmp / "log"
    with CLog(str(src), durability="none", segment_bytes=SEG) as log:
        for i in range(N):
            log.append(b"record %d " % (i + 1) + b"x" * 40)
    ((_, seg_path),) = F.segment_files(src)
    seg = pathlib.Path(seg_path)
    buf = bytearray(seg.read_bytes())
    change(buf, _offsets(bytes(buf))[VICTIM])
    seg.write_bytes(bytes(buf))
    return src


def _copy(src: pathlib.Path, name: str) -> str:
    dst = src.parent / name
    shutil.copytree(src, dst)
    return str(dst)


def _engine_seqs(cls, path: str) -> Tuple[List[int], int]:
    with cls(path, durability="none", segment_bytes=SEG) as log:
        seqs = [s for s, _ in log.read(0, max_records=100)]
        damage = len(log.verify().damage)
    return seqs, damage


def _verify_seqs(path: str) -> Tuple[List[int], int]:
    ((_, seg),) = F.segment_files(path)
    found: List[F.Damage] = []
    seqs = [r.seq for r in F.iter_segment(seg, damage=found, sealed=False, end_seq=None)]
    return seqs, len(found)


@pytest.mark.parametrize("case", list(CASES))
def test_every_reader_returns_the_same_records(tmp_path, case):
    change, stays_valid = CASES[case]
    src = _make(tmp_path, change)
    verify = _verify_seqs(_copy(src, "v"))  # first: the engines may repair their copies
    c = _engine_seqs(CLog, _copy(src, "c"))
    pure = _engine_seqs(PureLog, _copy(src, "p"))
    assert c[0] == pure[0] == verify[0], f"{case}: C {c}, pure {pure}, verify {verify}"
    assert (VICTIM in verify[0]) == stays_valid, f"{case}: record {VICTIM} read as {verify[0]}"
    if stays_valid:
        assert verify[0] == list(range(N))
        assert verify[1] == 0
    else:
        assert verify[1] >= 1, f"{case}: verify's reader reported no damage"
