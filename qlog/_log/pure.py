"""A pure-Python reader and writer of the on-disk format in ``docs/FORMAT.md``.

The fallback where no compiler exists, and the cross-check that the format
is what the document says: everything here is written from FORMAT.md with
the ``crc32c`` package, and shares no code with the C engine.

- :func:`iter_segment` yields the valid records of one segment file and
  reports damage, resynchronising over it the way the engine's reader does;
- :func:`read_log` returns every valid record of a log directory;
- :func:`write_segment` writes a sealed segment file;
- :func:`encode_index` / :func:`decode_index` spell the ``.idx`` file.
"""

from __future__ import annotations

import os
import re
import struct
import time
from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union, cast

import crc32c as _crc32c

from ..errors import FormatError, RecordTooLargeError
from .files import replace_durably
from .modes import DEFAULT_FILE_MODE

__all__ = [
    "SegmentHeader", "Record", "Damage", "IndexFile",
    "mask_crc", "unmask_crc", "crc32c", "record_size",
    "encode_segment_header", "decode_segment_header", "encode_record",
    "iter_segment", "segment_files", "read_log", "write_segment",
    "encode_index", "decode_index", "encode_meta", "decode_meta",
]

BytesLike = Union[bytes, bytearray, memoryview]
Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

# ---- constants: the "constant | value" table of FORMAT.md ----------------
FORMAT_VERSION = 1
SEG_HEADER_SIZE = 64
REC_HEADER_SIZE = 32
REC_ALIGN = 8
REC_TYPE_DATA = 1
FLAG_BATCH_MORE = 1
FLAG_BATCH_CONT = 2
FLAGS_KNOWN = FLAG_BATCH_MORE | FLAG_BATCH_CONT
"""Every other flag bit is reserved: a record with one set is damage (FORMAT.md)."""
MAX_RECORD = 1073741824
CRC_MASK_DELTA = 0xA282EAD8
IDX_HEADER_SIZE = 48
IDX_ENTRY_SIZE = 16
IDX_STRIDE = 4096
META_SIZE = 64
SEQ_RESERVE = 1048576

SEG_MAGIC = b"QLOGSEG\0"
IDX_MAGIC = b"QLOGIDX\0"
META_MAGIC = b"QLOGMETA"

# magic 8 | version u32 | header size u32 | base u64 | salt u64 | created i64 |
# reserved 20 | crc u32 (masked CRC32C of bytes [0, 60))
_SEG_HEADER = struct.Struct("<8sIIQQq20sI")
# crc u32 | length u32 | seq u64 | timestamp i64 | salt32 u32 | type u8 | flags u8 | reserved u16
_REC_HEADER = struct.Struct("<IIQqIBBH")
# magic 8 | version u32 | count u32 | base u64 | salt u64 | segment length u64 | stride u32 | crc u32
_IDX_HEADER = struct.Struct("<8sIIQQQII")
_IDX_ENTRY = struct.Struct("<QQ")
# magic 8 | version u32 | size u32 | reserved up to u64 | boot id 36 | crc u32 (of bytes [0, 60))
_META = struct.Struct("<8sIIQ36sI")
_REC_OFF_SALT = 24
_U32 = 0xFFFFFFFF
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")

assert _SEG_HEADER.size == SEG_HEADER_SIZE and _REC_HEADER.size == REC_HEADER_SIZE
assert _IDX_HEADER.size == IDX_HEADER_SIZE and _IDX_ENTRY.size == IDX_ENTRY_SIZE
assert _META.size == META_SIZE


class SegmentHeader(NamedTuple):
    """The decoded 64-byte header of a segment file."""

    base: int
    """Sequence number of the segment's first record (the number in its name)."""
    salt: int
    """Random per segment; its low 32 bits are in every record (``salt32``)."""
    created_ns: int
    """Creation time, nanoseconds since the Unix epoch."""


class Record(NamedTuple):
    """One valid record of a segment."""

    seq: int
    timestamp: int
    """Append time, nanoseconds since the Unix epoch; the same for a whole batch."""
    flags: int
    """Bit 0 is BATCH_MORE: another record of the same batch follows."""
    payload: bytes


class Damage(NamedTuple):
    """A region of a segment that holds no valid record (the engine's ``Damage``)."""

    offset: int
    length: int
    kind: str
    """'record', 'segment-header', 'torn-tail' or 'not-a-segment'."""
    after_seq: Optional[int]
    """The last valid record before the region, if any."""


class IndexFile(NamedTuple):
    """The decoded ``.idx`` file of a sealed segment."""

    base: int
    salt: int
    segment_length: int
    stride: int
    entries: List[Tuple[int, int]]
    """``(seq, offset)`` pairs in log order."""


# ---- masked CRC32C --------------------------------------------------------


def crc32c(data: BytesLike, value: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data``, continuing from the finished CRC ``value``."""
    return int(_crc32c.crc32c(data, value=value))


def mask_crc(crc: int) -> int:
    """The masked form of a CRC stored next to the data it covers: rotr15 + delta."""
    crc &= _U32
    return ((((crc >> 15) | (crc << 17)) & _U32) + CRC_MASK_DELTA) & _U32


def unmask_crc(masked: int) -> int:
    """Undo :func:`mask_crc`: the CRC itself."""
    r = (masked - CRC_MASK_DELTA) & _U32
    return ((r << 15) | (r >> 17)) & _U32


# ---- segment header -------------------------------------------------------


def encode_segment_header(base: int, salt: int, created_ns: int) -> bytes:
    """The 64 bytes at offset 0 of a segment whose first record is ``base``.

    Raises ``ValueError`` when the salt's low 32 bits are 0 (zeroed space
    could then pass the salt check)."""
    if salt & _U32 == 0:
        raise ValueError(f"the low 32 bits of a segment salt must not be 0, got {salt:#x}")
    head = _SEG_HEADER.pack(SEG_MAGIC, FORMAT_VERSION, SEG_HEADER_SIZE, base, salt,
                            created_ns, bytes(20), 0)[:60]
    return head + struct.pack("<I", mask_crc(crc32c(head)))


def decode_segment_header(b: BytesLike) -> SegmentHeader:
    """Decode the header at the start of ``b`` (a whole segment will do).

    Raises :class:`qlog.errors.FormatError` naming what is wrong: too short,
    not a segment (magic), header CRC mismatch, another version or size."""
    if len(b) < SEG_HEADER_SIZE:
        raise FormatError(f"segment header is {len(b)} bytes long, a header needs {SEG_HEADER_SIZE}")
    magic, version, hsize, base, salt, created, _, crc = _SEG_HEADER.unpack_from(b, 0)
    if magic != SEG_MAGIC:
        raise FormatError(f"not a qlog segment: magic is {magic!r}, expected {SEG_MAGIC!r}")
    want = crc32c(memoryview(b)[:60])
    if unmask_crc(crc) != want:
        raise FormatError(
            f"segment header CRC mismatch: stored {unmask_crc(crc):#010x}, computed {want:#010x}"
        )
    if version != FORMAT_VERSION:
        raise FormatError(f"segment format version is {version}, this reader knows {FORMAT_VERSION}")
    if hsize != SEG_HEADER_SIZE:
        raise FormatError(f"segment header size is {hsize}, expected {SEG_HEADER_SIZE}")
    return SegmentHeader(base, salt, created)


# ---- records --------------------------------------------------------------


def record_size(length: int) -> int:
    """Bytes a record with a payload of ``length`` bytes takes: header + payload, 8-aligned."""
    return (REC_HEADER_SIZE + length + REC_ALIGN - 1) & ~(REC_ALIGN - 1)


def encode_record(
    payload: BytesLike, seq: int, ts_ns: int, salt: int, more: bool = False, cont: bool = False
) -> bytes:
    """One framed record: header, payload, zero padding; the CRC covers all but itself.

    ``salt`` is the segment's salt (only its low 32 bits are stored);
    ``more`` sets BATCH_MORE (another record of the same batch follows)."""
    n = len(payload)
    if n > MAX_RECORD:
        raise RecordTooLargeError(f"record of {n} bytes is larger than the limit of {MAX_RECORD} bytes")
    if salt & _U32 == 0:
        raise ValueError(f"the low 32 bits of a segment salt must not be 0, got {salt:#x}")
    flags = (FLAG_BATCH_MORE if more else 0) | (FLAG_BATCH_CONT if cont else 0)
    body = bytearray(_REC_HEADER.pack(0, n, seq, ts_ns, salt & _U32, REC_TYPE_DATA, flags, 0))
    body += payload
    body += bytes(record_size(n) - REC_HEADER_SIZE - n)
    struct.pack_into("<I", body, 0, mask_crc(crc32c(memoryview(body)[4:])))
    return bytes(body)


def _record_at(data: bytes, off: int, salt32: int, min_seq: Optional[int]) -> Optional[Tuple[int, Record]]:
    """``(size, record)`` when a valid record of this segment starts at ``off``.

    Checks salt32, a length that stays inside the data, type, reserved
    bytes, a sequence number above ``min_seq``, and the CRC."""
    if len(data) - off < REC_HEADER_SIZE:
        return None  # short header: torn, or the end of the data
    crc, length, seq, ts, s32, rtype, flags, reserved = _REC_HEADER.unpack_from(data, off)
    if s32 != salt32:
        return None  # zeros, or bytes of another segment
    size = record_size(length)
    if length > MAX_RECORD or off + size > len(data):
        return None  # runs past the data: torn
    if rtype != REC_TYPE_DATA or reserved or flags & ~FLAGS_KNOWN:
        return None  # not a record of this format (reserved bytes and flag bits are 0)
    if min_seq is not None and seq <= min_seq:
        return None  # a stale record
    if unmask_crc(crc) != crc32c(memoryview(data)[off + 4:off + size]):
        return None  # bit rot, or a write torn mid-record
    payload = data[off + REC_HEADER_SIZE:off + REC_HEADER_SIZE + length]
    return size, Record(seq, ts, flags, payload)


def _resync(data: bytes, off: int, salt32: int, min_seq: Optional[int]) -> int:
    """The first 8-aligned offset after ``off`` where a valid record starts, or the end."""
    pat = struct.pack("<I", salt32)
    pos = ((off + REC_ALIGN) & ~(REC_ALIGN - 1)) + _REC_OFF_SALT
    while True:
        hit = data.find(pat, pos)  # only offsets holding this salt32 can be records
        if hit < 0 or hit + REC_HEADER_SIZE - _REC_OFF_SALT > len(data):
            return len(data)
        cand = hit - _REC_OFF_SALT
        if cand % REC_ALIGN == 0 and _record_at(data, cand, salt32, min_seq):
            return cand
        pos = hit + 1


def _walk(data: bytes, salt32: int) -> Iterator[Tuple[int, int, Optional[Record]]]:
    """``(offset, end, record)`` for each record from offset 64, and
    ``(offset, end, None)`` for each region that is not one."""
    off, last = SEG_HEADER_SIZE, None
    while off + REC_HEADER_SIZE <= len(data):
        hit = _record_at(data, off, salt32, last)
        if hit:
            size, rec = hit
            yield off, off + size, rec
            last, off = rec.seq, off + size
        else:
            nx = _resync(data, off, salt32, last)
            yield off, nx, None
            off = nx


# ---- reading segments -----------------------------------------------------


def _load(source: Source) -> Tuple[bytes, Optional[int]]:
    """The bytes of a segment and the base its file name gives (None for bytes)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None
    path = os.fspath(source)
    m = _SEGMENT_NAME.match(os.path.basename(path))
    with open(path, "rb") as f:
        return f.read(), int(m.group(1)) if m else None


def _segment_salt(data: bytes, base: Optional[int], damage: List[Damage],
                  end_seq: Optional[int] = None) -> Optional[int]:
    """salt32 from the header; from the first record that checks out when the
    header is damaged (or names another base than the file), reported.  Only
    a record numbered from the segment's base on and below ``end_seq`` (the
    next segment's base) can be one of its own."""
    try:
        h = decode_segment_header(data)
        if base is None or h.base == base:
            return h.salt & _U32
    except FormatError:
        pass
    damage.append(Damage(0, SEG_HEADER_SIZE, "segment-header", None))
    for off in range(SEG_HEADER_SIZE, len(data) - REC_HEADER_SIZE + 1, REC_ALIGN):
        s32: int = struct.unpack_from("<I", data, off + _REC_OFF_SALT)[0]
        # only a record numbered from the segment's base on is one of its own
        hit = _record_at(data, off, s32, base - 1 if base else None) if s32 else None
        if hit and (end_seq is None or hit[1].seq < end_seq):
            return s32
    return None


def iter_segment(source: Source, *, damage: Optional[List[Damage]] = None,
                 sealed: bool = False, end_seq: Optional[int] = None) -> Iterator[Record]:
    """The valid records of one segment (a path, or its bytes), in order.

    Damage in the middle is skipped by trying each following 8-aligned
    offset until a valid record with a higher sequence number checks out,
    and is appended once to ``damage``.  Zeros after the data are its end.
    Records of a batch whose last record never came (a torn tail) are not
    yielded: the tail from the end of the last complete batch up to the
    last nonzero byte is reported as 'torn-tail', as recovery drops it.

    ``sealed=True`` reads a sealed segment (any but a log's last) the way
    the engine does: a sealed segment is never cut, so only damage is
    skipped, and the records of a batch whose end was damaged away are
    yielded too.  ``end_seq`` is the next segment's base, when there is one:
    a damaged header's salt is then taken only from a record numbered below
    it (bytes of a later segment copied over this one are not its records).
    """
    found: List[Damage] = [] if damage is None else damage
    data, base = _load(source)
    if len(data) < SEG_HEADER_SIZE:
        found.append(Damage(0, len(data), "not-a-segment", None))
        return
    salt32 = _segment_salt(data, base, found, end_seq)
    if salt32 is None:
        return
    pending: List[Record] = []  # records of a batch not yet complete
    held: List[Damage] = []  # damage met inside that batch
    valid_end, committed = SEG_HEADER_SIZE, None
    last: Optional[int] = None
    for off, end, rec in _walk(data, salt32):
        if rec is None:
            if end < len(data):
                (held if pending else found).append(Damage(off, end - off, "record", last))
            continue
        last = rec.seq
        pending.append(rec)
        if sealed or not rec.flags & FLAG_BATCH_MORE:
            found.extend(held)
            yield from pending
            pending, held = [], []
            valid_end, committed = end, rec.seq
    tail = len(data[valid_end:].rstrip(b"\0"))
    if tail:
        tail_end = min(valid_end + (tail + REC_ALIGN - 1) // REC_ALIGN * REC_ALIGN, len(data))
        found.append(Damage(valid_end, tail_end - valid_end, "torn-tail", committed))


def segment_files(directory: Union[str, "os.PathLike[str]"]) -> List[Tuple[int, str]]:
    """``(base, path)`` of every ``%020d.seg`` file of a log directory, in log order."""
    out = []
    for name in os.listdir(directory):
        m = _SEGMENT_NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(os.fspath(directory), name)))
    return sorted(out)


def read_log(directory: Union[str, "os.PathLike[str]"], *,
             damage: Optional[List[Tuple[int, Damage]]] = None) -> List[Tuple[int, bytes]]:
    """``(seq, payload)`` of every valid record of every segment, in log order.

    Damage found is appended to ``damage`` as ``(segment base, Damage)``.
    Reads the files as they are: a batch being framed by a live writer at
    that moment reads as a torn tail of the last (active) segment; the
    others are read as sealed (``iter_segment(..., sealed=True)``)."""
    out: List[Tuple[int, bytes]] = []
    segs = segment_files(directory)
    for i, (base, path) in enumerate(segs):
        found: List[Damage] = []
        recs = iter_segment(path, damage=found, sealed=i + 1 < len(segs),
                            end_seq=segs[i + 1][0] if i + 1 < len(segs) else None)
        out.extend((r.seq, r.payload) for r in recs)
        if damage is not None:
            damage.extend((base, d) for d in found)
    return out


# ---- writing segments -----------------------------------------------------


def write_segment(directory: Union[str, "os.PathLike[str]"], base: int,
                  records: Iterable[Union[BytesLike, Sequence[BytesLike]]],
                  salt: Optional[int] = None, mode: int = DEFAULT_FILE_MODE) -> str:
    """Write a sealed segment file ``%020d.seg`` holding ``records``; returns its path.

    Each item of ``records`` is a payload (a batch of one) or a list/tuple
    of payloads (one batch: all but its last record carry BATCH_MORE).
    Sequence numbers run densely from ``base``; ``salt`` is random when not
    given; ``mode``: its permission bits (less the umask).  The file is
    written durably (:func:`~qlog._log.files.replace_durably`); an existing
    segment is never overwritten (``FileExistsError``)."""
    if salt is None:
        salt = int.from_bytes(os.urandom(8), "little") | 1
    out = bytearray(encode_segment_header(base, salt, time.time_ns()))
    seq = base
    for item in records:
        if isinstance(item, (list, tuple)):
            batch: List[BytesLike] = list(item)
        else:
            batch = [cast(BytesLike, item)]
        if not batch:
            raise ValueError("a batch needs at least one record, got an empty one")
        ts = time.time_ns()
        for i, payload in enumerate(batch):
            out += encode_record(payload, seq, ts, salt, more=i + 1 < len(batch), cont=i > 0)
            seq += 1
    path = os.path.join(os.fspath(directory), f"{base:020d}.seg")
    if not replace_durably(path, out, mode, exclusive=True):
        raise FileExistsError(f"segment {path!r} already exists")
    return path


# ---- the sequence number mark (meta) --------------------------------------


def encode_meta(reserved_upto: int, boot_id: str) -> bytes:
    """The 64 bytes of a log's ``meta`` file: numbers below ``reserved_upto``
    may have been handed out in boot ``boot_id`` ("" names no boot)."""
    head = _META.pack(META_MAGIC, FORMAT_VERSION, META_SIZE, reserved_upto,
                      boot_id.encode("ascii")[:36], 0)[:META_SIZE - 4]
    return head + struct.pack("<I", mask_crc(crc32c(head)))


def decode_meta(data: bytes) -> Tuple[int, str]:
    """``(reserved_upto, boot_id)`` of a ``meta`` file's bytes; raises
    FormatError saying what is wrong with them."""
    if len(data) != META_SIZE:
        raise FormatError(f"meta is {len(data)} bytes long, expected {META_SIZE}")
    magic, version, size, reserved, boot, crc = _META.unpack(data)
    if magic != META_MAGIC:
        raise FormatError(f"meta magic is {magic!r}, expected {META_MAGIC!r}")
    if unmask_crc(crc) != crc32c(data[:META_SIZE - 4]):
        raise FormatError("meta fails its CRC")
    if version != FORMAT_VERSION or size != META_SIZE:
        raise FormatError(f"meta has version {version} and size {size}, expected "
                          f"{FORMAT_VERSION} and {META_SIZE}")
    return reserved, boot.rstrip(b"\0").decode("ascii", "replace")


# ---- the sparse index (.idx) ----------------------------------------------


def encode_index(source: Source) -> bytes:
    """The ``.idx`` file a reader writes beside this sealed segment.

    An entry for the first valid record, then for the first record at least
    ``IDX_STRIDE`` bytes after the previous entry.  Raises ``FormatError``
    when the segment header is unreadable (no index is kept for it)."""
    data, _ = _load(source)
    h = decode_segment_header(data)
    entries: List[Tuple[int, int]] = []
    for off, _, rec in _walk(data, h.salt & _U32):
        if rec is not None and (not entries or off - entries[-1][1] >= IDX_STRIDE):
            entries.append((rec.seq, off))
    body = b"".join(_IDX_ENTRY.pack(s, o) for s, o in entries)
    head = _IDX_HEADER.pack(IDX_MAGIC, FORMAT_VERSION, len(entries), h.base, h.salt,
                            len(data), IDX_STRIDE, 0)[:44]
    crc = crc32c(body, crc32c(head))
    return head + struct.pack("<I", mask_crc(crc)) + body


def decode_index(b: BytesLike) -> IndexFile:
    """Decode a ``.idx`` file; raises ``FormatError`` naming what is wrong."""
    if len(b) < IDX_HEADER_SIZE:
        raise FormatError(f"index file is {len(b)} bytes long, its header needs {IDX_HEADER_SIZE}")
    magic, version, count, base, salt, seglen, stride, crc = _IDX_HEADER.unpack_from(b, 0)
    if magic != IDX_MAGIC:
        raise FormatError(f"not a qlog index: magic is {magic!r}, expected {IDX_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise FormatError(f"index format version is {version}, this reader knows {FORMAT_VERSION}")
    if len(b) != IDX_HEADER_SIZE + count * IDX_ENTRY_SIZE:
        raise FormatError(
            f"index of {count} entries must be {IDX_HEADER_SIZE + count * IDX_ENTRY_SIZE} bytes, "
            f"file is {len(b)}"
        )
    mv = memoryview(b)
    want = crc32c(mv[IDX_HEADER_SIZE:], crc32c(mv[:44]))
    if unmask_crc(crc) != want:
        raise FormatError(f"index CRC mismatch: stored {unmask_crc(crc):#010x}, computed {want:#010x}")
    entries = [_IDX_ENTRY.unpack_from(b, IDX_HEADER_SIZE + i * IDX_ENTRY_SIZE) for i in range(count)]
    return IndexFile(base, salt, seglen, stride, entries)
