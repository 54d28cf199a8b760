"""Byte-damage helpers for tests: flip, truncate, zero and scramble log files.

Each helper does one thing to one file, the way a crash or a disk does it,
and returns what it did so a test can state what it expects.  The record
layout is parsed here straight from docs/FORMAT.md (struct + the ``crc32c``
package), so damage is placed by the specification, not by the engine.
"""

from __future__ import annotations

import os
import random
import re
import struct
from typing import List, NamedTuple, Optional, Union

import crc32c as _crc32c

PathLike = Union[str, "os.PathLike[str]"]

SEG_HEADER_SIZE = 64
REC_HEADER_SIZE = 32
REC_ALIGN = 8
REC_OFF_LEN = 4
REC_OFF_SALT = 24
FLAG_BATCH_MORE = 1
MAX_RECORD = 1 << 30
_CRC_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF

# crc u32 | length u32 | seq u64 | timestamp i64 | salt32 u32 | type u8 | flags u8 | reserved u16
_REC = struct.Struct("<IIQqIBBH")
_SEGMENT_NAME = re.compile(r"^\d{20}\.seg$")


class Span(NamedTuple):
    """Where one record lies in a segment file."""

    offset: int
    size: int


class RecordInfo(NamedTuple):
    """One valid record of a segment file, with its place."""

    offset: int
    size: int
    seq: int
    flags: int
    payload: bytes

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def batch_more(self) -> bool:
        """Another record of the same batch follows this one."""
        return bool(self.flags & FLAG_BATCH_MORE)


# ---- damaging a file --------------------------------------------------------


def flip_byte(path: PathLike, offset: int, mask: int = 0xFF) -> int:
    """XOR the byte at ``offset`` with ``mask``; returns the byte's old value."""
    if not 0 < mask <= 0xFF:
        raise ValueError(f"mask must be 1..255, got {mask}")
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        if len(old) != 1:
            raise ValueError(f"offset {offset} is past the end of {os.fspath(path)!r}")
        f.seek(offset)
        f.write(bytes([old[0] ^ mask]))
    return old[0]


def truncate_by(path: PathLike, n: int) -> int:
    """Cut the last ``n`` bytes off the file; returns its new size."""
    size = max(0, os.path.getsize(path) - n)
    os.truncate(path, size)
    return size


def truncate_to(path: PathLike, size: int) -> int:
    """Cut (or extend with zeros) the file to ``size`` bytes; returns ``size``."""
    os.truncate(path, size)
    return size


def zero_tail(path: PathLike, from_offset: int) -> int:
    """Overwrite every byte from ``from_offset`` to the end with zeros (size kept);
    returns how many bytes were zeroed."""
    size = os.path.getsize(path)
    n = max(0, size - from_offset)
    with open(path, "r+b") as f:
        f.seek(from_offset)
        left = n
        while left:
            chunk = min(left, 1 << 20)
            f.write(bytes(chunk))
            left -= chunk
    return n


def zero_pages_inside(path: PathLike, start: int, end: int, page: int = 4096) -> List[int]:
    """Zero every whole ``page``-byte page of the file (at a multiple of
    ``page``) lying inside ``[start, end)``, as a power cut leaves a page
    of an unsynced tail that the page cache had not written back while it
    had written back the pages around it; returns the pages' offsets."""
    first = (start + page - 1) // page * page
    offs = list(range(first, end - page + 1, page))
    with open(path, "r+b") as f:
        for off in offs:
            f.seek(off)
            f.write(bytes(page))
    return offs


def fill_random(path: PathLike, from_offset: int, n: int, rng: random.Random) -> bytes:
    """Overwrite ``n`` bytes from ``from_offset`` with bytes from ``rng`` (the file
    grows if they run past its end); returns the bytes written."""
    data = rng.randbytes(n)
    with open(path, "r+b") as f:
        f.seek(from_offset)
        f.write(data)
    return data


def write_random_file(path: PathLike, size: int, rng: random.Random) -> bytes:
    """Create (or replace) ``path`` holding ``size`` bytes from ``rng``; returns them."""
    data = rng.randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


# ---- finding what to damage -------------------------------------------------


def segments(directory: PathLike) -> List[str]:
    """Paths of the ``%020d.seg`` files of a log directory, in log order."""
    names = sorted(n for n in os.listdir(directory) if _SEGMENT_NAME.match(n))
    return [os.path.join(os.fspath(directory), n) for n in names]


def segment_base(path: PathLike) -> int:
    """The base sequence number a segment's file name gives."""
    return int(os.path.basename(os.fspath(path))[:20])


def _crc(data: bytes) -> int:
    return _crc32c.crc32c(data)


def _unmask(masked: int) -> int:
    r = (masked - _CRC_MASK_DELTA) & _U32
    return ((r << 15) | (r >> 17)) & _U32


def _record_at(data: bytes, off: int, salt32: int, min_seq: Optional[int]) -> Optional[RecordInfo]:
    if len(data) - off < REC_HEADER_SIZE:
        return None
    crc, length, seq, _ts, s32, rtype, flags, reserved = _REC.unpack_from(data, off)
    if s32 != salt32 or length > MAX_RECORD or rtype != 1 or reserved:
        return None
    size = (REC_HEADER_SIZE + length + REC_ALIGN - 1) & ~(REC_ALIGN - 1)
    if off + size > len(data) or (min_seq is not None and seq <= min_seq):
        return None
    if _unmask(crc) != _crc(data[off + 4:off + size]):
        return None
    return RecordInfo(off, size, seq, flags, data[off + REC_HEADER_SIZE:off + REC_HEADER_SIZE + length])


def segment_salt32(path: PathLike) -> int:
    """The low 32 bits of the salt in a segment's header (bytes 24..28)."""
    with open(path, "rb") as f:
        head = f.read(SEG_HEADER_SIZE)
    if len(head) < SEG_HEADER_SIZE:
        raise ValueError(f"{os.fspath(path)!r} is {len(head)} bytes long, shorter than a segment header")
    return struct.unpack_from("<I", head, 24)[0]


def records(path: PathLike, salt32: Optional[int] = None) -> List[RecordInfo]:
    """Every valid record of a segment file, with offsets, in file order.

    A position that is not a valid record is skipped by trying the
    following 8-aligned offsets (as a reader resynchronises); the zeros
    after the data end the walk.  ``salt32`` defaults to the header's."""
    with open(path, "rb") as f:
        data = f.read()
    if salt32 is None:
        salt32 = segment_salt32(path)
    pat = struct.pack("<I", salt32)
    out: List[RecordInfo] = []
    off, last = SEG_HEADER_SIZE, None
    while off + REC_HEADER_SIZE <= len(data):
        rec = _record_at(data, off, salt32, last)
        if rec is not None:
            out.append(rec)
            last, off = rec.seq, rec.end
            continue
        # resync: only offsets whose salt field holds this segment's salt can be records
        pos = off + REC_ALIGN + REC_OFF_SALT
        while True:
            hit = data.find(pat, pos)
            if hit < 0:
                return out
            cand = hit - REC_OFF_SALT
            if cand % REC_ALIGN == 0 and cand > off and _record_at(data, cand, salt32, last):
                off = cand
                break
            pos = hit + 1
    return out


def record_offsets(path: PathLike) -> List[Span]:
    """``Span(offset, size)`` of every valid record of a segment file, in file order."""
    return [Span(r.offset, r.size) for r in records(path)]


def data_end(path: PathLike) -> int:
    """End of the last valid record of a segment (64 when it holds none)."""
    recs = records(path)
    return recs[-1].end if recs else SEG_HEADER_SIZE
