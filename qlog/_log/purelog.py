"""The pure-Python log engine: :class:`Log`, written from ``docs/FORMAT.md``.

The second implementation of the on-disk format.  It has the public API and
the behaviour of the C engine's ``qlog.Log`` (``qlog/_log.py``) and writes
the same bytes (segments, records with their batch flags, ``.idx``, ``meta``
with the boot id and the sequence reserve), recovers a torn tail of the
active segment the same way and leaves the same gap after a reboot, with the
``crc32c`` package and the standard library only: no code is shared with
``csrc/``.  ``qlog.Log`` is this class when the environment has
``QLOG_PURE=1`` or when the compiled modules cannot be imported.

How processes coordinate (the C engine uses robust mutexes and futexes in a
shared mapping; this engine uses ``flock`` and polling):

- ``lock`` is ``flock``ed exclusively while a handle opens the log (as the C
  engine does) and while it writes: assigns sequence numbers, frames a batch
  into the active segment with one ``pwrite``, rolls or deletes segments.
  Readers take it shared for the instant they copy the published state.
- ``ctl`` holds the published state (the end of the last complete batch,
  the active segment, the synced mark, the change counter) in a layout of
  its own, marked ``QLOGPURE``; every open handle holds a shared ``flock``
  on it, and the handle that gets it exclusively at open is alone and
  rebuilds it from the segment files, exactly like the C engine.
- A writer killed while holding the lock leaves a flag in ``ctl``; the next
  writer zeroes the bytes of its unpublished batch, completes or undoes its
  segment roll, and goes on.
- The "sync" group commit's leader holds a POSIX record lock on the last
  byte of ``ctl`` while it runs fdatasync; appenders waiting for that lock
  find their records covered when they get it.
- ``wait``/``wait_change`` poll the shared state with a backoff from 0.5 ms
  doubling up to 20 ms: a waiter sees an append at most 20 ms late.  The
  "interval" flusher wakes every ``flush_interval`` and syncs if the log is
  dirty.

One directory is used by one engine at a time: a handle of either engine
that finds the log open in a process using the other engine (``ctl`` held
shared and marked by the other engine) refuses to open with
:class:`qlog.errors.EngineConflictError`.  This costs the C engine nothing
on its hot paths (the check is in its open, where it already refused).
"""

from __future__ import annotations

import errno as _errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
from array import array
from bisect import bisect_right
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

from . import pure as F
from .. import errors
from .modes import DEFAULT_FILE_MODE, dir_mode
from .types import (CTL_MAGIC_C, CTL_MAGIC_PURE, DEFAULT_SEGMENT_BYTES, DURABILITY_MODES, MAX_RECORD,
                     Damage, LogLifecycle, LogStats, VerifyReport, check_log_args, refuse_nfs as _refuse_nfs)

__all__ = ["Log", "LogStats", "Damage", "VerifyReport", "MAX_RECORD", "DURABILITY_MODES",
           "CTL_MAGIC_PURE", "CTL_MAGIC_C"]

BytesLike = Union[bytes, bytearray, memoryview]
logger = logging.getLogger("qlog")

_ALLOC_CHUNK = 4 << 20
_DROP_EVERY = 2 << 20  # bytes read through mappings before their pages are dropped
_POLL_MIN = 0.0005
_POLL_MAX = 0.020
_HDR = F.SEG_HEADER_SIZE
_RH = F.REC_HEADER_SIZE
_U32 = 0xFFFFFFFF

_CTL_SIZE = 4096
_CTL_VERSION = 1
_CTL_HEAD = struct.Struct("<8sII40s")  # magic, version, size, boot id

# u64 fields of ctl (offsets); those marked (*) change only under the writer lock.
_NOTIFY = 64        # change counter (low 32 bits): every publish and poke
_BUSY = 72          # (*) 1 while a writer holds the lock: 1 at acquire means its holder died
_WRITE_END = 80     # (*) end of the last complete batch in the active segment
_NEXT_SEQ = 88      # (*) every record below this is complete; stored right after _WRITE_END
_ACTIVE_BASE = 96   # (*)
_ACTIVE_SALT = 104  # (*)
_ACTIVE_CAP = 112   # (*) the active segment never grows past this
_PEND_END = 120     # (*) end of the batch being framed
_PEND_NEXT = 128    # (*)
_PEND_BASE = 136    # (*) the segment a roll is making active
_PEND_SALT = 144    # (*)
_PEND_CAP = 152     # (*)
_ALLOC_END = 160    # (*) bytes of the active segment allocated
_RESERVED = 168     # (*) durable high-water mark (file `meta`)
_SYNCED = 176       # (*) every record below this is on stable storage
_POISON = 184       # (*) bumped when an fsync or a write fails
_NEED_ROLL = 192    # (*) the next append starts a new segment
_REWRITE = 200      # (*) an fsync failed: rewrite the active segment before sealing it
_SEG_GEN = 208      # (*) bumped when segments are added or deleted
_READY = 216        # set last by the handle that built ctl
_SKIP_PENDING = 224 # (*) recovery skipped to _NEXT_SEQ and no record shows it yet

_Q = struct.Struct("<Q")
_QQ = struct.Struct("<QQ")
_REC = struct.Struct("<IIQqIBBH")
_REC_LEN = struct.Struct("<I")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read(64).strip().decode("ascii", "replace")[:36]
    except OSError:
        return ""


def _on_nfs(path: str) -> bool:
    """Whether ``path`` lies on an NFS mount (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                point = left.split()[4].replace("\\040", " ")
                if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, fstype = point, right.split()[0]
    except (OSError, IndexError):
        return False
    return fstype.startswith("nfs")


def refuse_nfs(path: str) -> None:
    """:func:`types.refuse_nfs` with this engine's check (mountinfo)."""
    _refuse_nfs(path, _on_nfs)


def _check(buf: Any, off: int, end: int, salt32: int, last: Optional[int]) -> Optional[Tuple[int, int, int, int]]:
    """``(size, seq, flags, length)`` when a valid record of the segment whose
    salt32 is given starts at ``off`` and ends by ``end``; else None.

    The checks of FORMAT.md "Reading a segment": salt32, a length that stays
    inside the data, type, reserved bytes, a sequence number above the
    previous record's, the CRC."""
    if end - off < _RH:
        return None
    crc, length, seq, _ts, s32, rtype, flags, reserved = _REC.unpack_from(buf, off)
    if s32 != salt32 or length > MAX_RECORD:
        return None
    size = (_RH + length + 7) & ~7
    if off + size > end or rtype != F.REC_TYPE_DATA or reserved or flags & ~F.FLAGS_KNOWN:
        return None
    if last is not None and seq <= last:
        return None
    if F.unmask_crc(crc) != F.crc32c(memoryview(buf)[off + 4:off + size]):
        return None
    return size, seq, flags, length


def _resync(buf: Any, off: int, end: int, salt32: int, last: Optional[int]) -> int:
    """The first 8-aligned offset after ``off`` (below ``end``) where a valid
    record starts, or ``end``."""
    pat = struct.pack("<I", salt32)
    pos = ((off + 8) & ~7) + 24
    while True:
        hit: int = buf.find(pat, pos, end)
        if hit < 0 or hit - 24 + _RH > end:
            return end
        cand = hit - 24
        if cand % 8 == 0 and _check(buf, cand, end, salt32, last):
            return cand
        pos = hit + 1


def _infer_salt(buf: Any, end: int, base: int, end_seq: Optional[int] = None) -> int:
    """The salt32 named by the first record that checks out under it and is
    numbered from the segment's ``base`` on and below ``end_seq`` (the next
    segment's base; None for the last segment): bytes of another segment
    copied over this one must not lend it their salt.  0 if none."""
    for off in range(_HDR, end - _RH + 1, 8):
        s32: int = _REC_LEN.unpack_from(buf, off + 24)[0]
        if s32:
            hit = _check(buf, off, end, s32, base - 1 if base else None)
            if hit and (end_seq is None or hit[1] < end_seq):
                return s32
    return 0


def _last_nonzero(buf: Any, frm: int, to: int) -> int:
    """Where the last nonzero byte of [frm, to) ends, rounded up to a multiple
    of 8 bytes counted back from ``to`` (``frm`` when every byte is zero)."""
    hi = to
    while hi > frm:
        lo = max(frm, hi - (1 << 20))
        piece = bytes(buf[lo:hi]).rstrip(b"\0")
        if piece:
            j = lo + len(piece) - 1
            return to - 8 * ((to - 1 - j) // 8)
        hi = lo
    return frm


def _mmap(fd: int, length: int) -> Any:
    return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ)


class _Seg:
    """A segment as a reader of this handle sees it."""

    __slots__ = ("base", "path", "fd", "map", "maplen", "salt32", "salt", "header_bad", "size",
                 "sealed", "iseq", "ioff", "scanned_to", "scan_last", "damage", "idx_saved")

    def __init__(self, base: int, path: str) -> None:
        self.base, self.path = base, path
        self.fd = -1
        self.map: Any = None
        self.maplen = 0
        self.salt32 = 0
        self.salt = 0
        self.header_bad = False
        self.size = 0
        self.sealed = False
        self.iseq: List[int] = []
        self.ioff: List[int] = []
        self.scanned_to = _HDR
        self.scan_last: Optional[int] = None
        self.damage: Set[int] = set()
        self.idx_saved = False

    def close(self) -> None:
        if isinstance(self.map, mmap.mmap):
            try:
                self.map.close()
            except BufferError:  # a payload view is still alive: the GC unmaps it
                pass
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Log(LogLifecycle):
    """A durable, append-only log of byte records in a directory (pure Python).

    The same contract as the C engine's ``qlog.Log``: any number of threads
    and processes (all using this engine) may open the same directory and
    append and read at once; sequence numbers are dense and unique across
    all of them; a batch is all there or not at all after any crash.

    ``durability``:

    - ``"sync"``: ``append`` returns after an fdatasync of the active segment
      that started after the record was stored (group commit: one fdatasync
      covers every appender waiting, in every process);
    - ``"interval"``: returns once the record is in the kernel; a background
      thread syncs every ``flush_interval`` seconds while the log is dirty;
    - ``"none"``: returns once the record is in the kernel.

    In every mode a returned append survives the process being killed.
    Waits poll the shared state (0.5 ms backoff doubling up to 20 ms).

    ``mode`` is the permission of every file the log creates (default
    ``0o600``), as for the C engine; a directory it creates gets execute
    wherever read is set.
    """

    engine = "pure"

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        *,
        durability: str = "sync",
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        flush_interval: float = 0.1,
        mode: int = DEFAULT_FILE_MODE,
    ) -> None:
        self._closed = True
        self._h: Optional[Log] = None
        self.path = check_log_args(path, durability, segment_bytes, flush_interval, mode)
        self.mode = mode
        self.durability = durability
        self.segment_bytes = segment_bytes
        self.flush_interval = float(flush_interval)
        self._boot = _boot_id()
        self._mu = threading.RLock()       # this handle's use of the lock fd, and writer state
        self._smu = threading.Lock()       # one fdatasync at a time in this handle
        self._rmu = threading.Lock()       # reader state
        self._life = threading.Condition()
        self._calls = 0
        self._n_fsyncs = self._n_appends = self._n_corrupt = 0
        self._touched = 0
        self._rec_bytes = self._rec_records = 0
        self._w_fd = -1
        self._w_base = -1
        self._segs: Dict[int, _Seg] = {}
        self._held: Set[int] = set()  # bases of the segments open and mapped
        self._read_abase = 0  # the active segment as the last read saw it
        self._seg_gen = -1
        self._bases: List[int] = []
        self._dirfd = self._lockfd = self._ctlfd = -1
        self._ctl: Any = None
        try:
            self._open()
        except BaseException:
            self._release_files()
            raise
        self._poison_gen = self._get(_POISON)
        self._closed = False
        self._h = self
        if self._rec_bytes:
            logger.info(
                "log %r: recovery dropped a torn tail of %d bytes (%d complete records of an "
                "unfinished batch)", self.path, self._rec_bytes, self._rec_records,
            )
        if self._n_corrupt:
            logger.warning(
                "log %r: %d damaged record(s) found on open; they are skipped, never returned "
                "(Log.verify() lists them)", self.path, self._n_corrupt,
            )
        self._stop = threading.Event()
        self._flusher: Optional[threading.Thread] = None
        if durability == "interval":
            self._flusher = threading.Thread(
                target=self._flush_loop, name=f"qlog-flush:{self.path}", daemon=True
            )
            self._flusher.start()

    # -- ctl -------------------------------------------------------------

    def _get(self, off: int) -> int:
        v: int = _Q.unpack_from(self._ctl, off)[0]
        return v

    def _set(self, off: int, v: int) -> None:
        _Q.pack_into(self._ctl, off, v)

    # -- opening and recovery ----------------------------------------------

    def _oserr(self, e: OSError, what: str) -> errors.StorageError:
        if e.errno == _errno.ENOSPC:
            return errors.DiskFullError(_errno.ENOSPC, f"{what}: no space left on device; nothing was written")
        if e.errno == _errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            return errors.StorageError(_errno.ELOOP, f"{what}: a segment file is a symbolic link, and qlog "
                                                     "does not follow links in a log directory")
        return errors.StorageError(e.errno or _errno.EIO, f"{what}: {e.strerror or e}")

    def _open(self) -> None:
        p = self.path
        try:
            try:
                os.mkdir(p, dir_mode(self.mode))
                pfd = os.open(os.path.join(p, ".."), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(pfd)  # the new directory's name is durable
                finally:
                    os.close(pfd)
            except FileExistsError:
                pass
            if _on_nfs(p):
                raise errors.UnsupportedFilesystemError(
                    f"cannot open log {p!r}: directory is on NFS, which qlog does not support"
                )
            self._dirfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
            self._lockfd = os.open(os.path.join(p, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.mode)
            fcntl.flock(self._lockfd, fcntl.LOCK_EX)
            self._ctlfd = os.open(os.path.join(p, "ctl"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.mode)
            if os.fstat(self._ctlfd).st_size != _CTL_SIZE:
                os.ftruncate(self._ctlfd, _CTL_SIZE)
            self._ctl = mmap.mmap(self._ctlfd, _CTL_SIZE, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise self._oserr(e, f"cannot open log {p!r}") from None
        try:
            try:
                fcntl.flock(self._ctlfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:
                alone = False
            if alone:
                self._rebuild()
            else:
                magic, version, size, boot = _CTL_HEAD.unpack_from(self._ctl, 0)
                if magic == CTL_MAGIC_C:
                    raise errors.EngineConflictError(
                        f"cannot open log {p!r} with the pure-Python engine: it is open (in this or "
                        f"another process) with the C engine; one directory is used by one "
                        f"engine at a time (close it there, or use the same engine: QLOG_PURE)"
                    )
                if (magic != CTL_MAGIC_PURE or version != _CTL_VERSION or size != _CTL_SIZE
                        or not self._get(_READY)
                        or boot.rstrip(b"\0").decode("ascii", "replace") != self._boot):
                    raise errors.CorruptStateError(
                        f"cannot open log {p!r}: control state is damaged (ctl is held by other "
                        f"processes but not initialised)"
                    )
            fcntl.flock(self._ctlfd, fcntl.LOCK_SH)
        except OSError as e:
            raise self._oserr(e, f"cannot open log {p!r}") from None
        finally:
            fcntl.flock(self._lockfd, fcntl.LOCK_UN)

    def _seg_path(self, base: int, ext: str = ".seg") -> str:
        return os.path.join(self.path, f"{base:020d}{ext}")

    def _list(self) -> List[int]:
        return [b for b, _ in F.segment_files(self.path)]

    def _fsync_dir(self) -> None:
        os.fsync(self._dirfd)

    def _meta_read(self) -> Optional[Tuple[int, str]]:
        try:
            with open(os.path.join(self.path, "meta"), "rb") as f:
                b = f.read(F.META_SIZE)
        except OSError:
            return None
        try:
            return F.decode_meta(b)
        except errors.FormatError:
            return None

    def _meta_write(self, reserved_upto: int, boot: Optional[str] = None) -> None:
        """``meta.tmp`` written and fdatasynced, renamed over ``meta``, the
        directory fsynced: a power cut leaves the old mark or the new one.
        ``boot=""`` writes a mark that names no boot: every open applies it,
        in this boot too."""
        boot_id = self._boot if boot is None else boot
        b = F.encode_meta(reserved_upto, boot_id)
        tmp = os.path.join(self.path, "meta.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.mode)
        try:
            try:
                if os.pwrite(fd, b, 0) != len(b):
                    raise OSError(_errno.EIO, "short write")
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        os.rename(tmp, os.path.join(self.path, "meta"))
        self._fsync_dir()

    def _seg_create(self, base: int, cap: int) -> Tuple[int, int, int]:
        """Create segment ``base``: space allocated, header written, fdatasync
        of the file, fsync of the directory.  Returns ``(fd, salt, alloc)``."""
        salt = int.from_bytes(os.urandom(8), "little")
        if salt & _U32 == 0:
            salt |= 1
        path = self._seg_path(base)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, self.mode)
        alloc = min(cap, _ALLOC_CHUNK)
        try:
            os.posix_fallocate(fd, 0, alloc)
            os.pwrite(fd, F.encode_segment_header(base, salt, time.time_ns()), 0)
            os.fdatasync(fd)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        try:
            self._fsync_dir()
        except OSError:
            os.close(fd)
            raise
        return fd, salt, alloc

    # Recovery of the active segment, in the steps of the C engine's
    # recover_active (csrc/open.c): _recover_header, _recover_scan,
    # _recover_cut, _recover_rewrite, _recover_finish.

    def _recover_active(self, base: int, rebooted: bool, rewrite: bool) -> Optional[Tuple[int, int, int, int]]:
        """Recover the last segment (FORMAT.md "Reading a segment", "Batches").

        Returns ``(salt, cap, valid_end, next_seq)``, or None when the file
        has no valid header and no record names its salt."""
        path = self._seg_path(base)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            fsize = os.fstat(fd).st_size
            buf = _mmap(fd, fsize) if fsize else b""
            try:
                hdr = self._recover_header(buf, fsize, base)
                if hdr is None:
                    return None
                salt, created, header_bad = hdr
                valid_end, committed, tail_recs, orphan_bytes, orphan_recs = self._recover_scan(
                    fd, buf, fsize, salt & _U32, rebooted)
                dropped = _last_nonzero(buf, valid_end, fsize) - valid_end
            finally:
                if isinstance(buf, mmap.mmap):
                    buf.close()
            self._rec_bytes += dropped + orphan_bytes
            self._rec_records += tail_recs + orphan_recs
            cap, alloc = self._recover_cut(fd, fsize, valid_end, dropped)
            if rewrite and valid_end > _HDR:
                self._recover_rewrite(fd, valid_end)
            self._recover_finish(fd, base, salt, created, header_bad)
        finally:
            os.close(fd)
        self._set(_ALLOC_END, alloc)
        return salt, cap, valid_end, (committed + 1 if committed is not None else base)

    def _recover_header(self, buf: Any, fsize: int, base: int) -> Optional[Tuple[int, int, bool]]:
        """``(salt, created_ns, header_bad)`` of segment ``base``: from its
        header, or inferred from its records when the header is damaged
        (``header_bad``); None when no record names the salt either."""
        try:
            h = F.decode_segment_header(buf)
            if h.base != base:
                raise errors.FormatError("base differs from the file name")
            return h.salt, h.created_ns, False
        except errors.FormatError:
            s32 = _infer_salt(buf, fsize, base) if fsize else 0
            if not s32:
                return None
            self._n_corrupt += 1
            return s32, time.time_ns(), True

    def _recover_scan(self, fd: int, buf: Any, fsize: int, salt32: int,
                      rebooted: bool) -> Tuple[int, Optional[int], int, int, int]:
        """Scan the records for the end of the last complete batch; after a
        reboot the parts of batches that damage broke are zeroed in the file.

        Returns ``(valid_end, committed, tail_recs, orphan_bytes,
        orphan_recs)``: the end of the last complete batch and the number of
        its last record (None: no batch), the complete records of an
        unfinished batch after it, and what was zeroed."""
        off = valid_end = batch_start = _HDR
        last: Optional[int] = None
        committed: Optional[int] = None
        batch_recs = orphan_bytes = orphan_recs = 0
        in_batch = orphans_follow = False
        while off + _RH <= fsize:
            hit = _check(buf, off, fsize, salt32, last)
            if hit:
                size, seq, flags, _ = hit
                last = seq
                if not flags & F.FLAG_BATCH_CONT:
                    orphans_follow = False
                    batch_start, batch_recs = off, 0
                elif orphans_follow and rebooted:
                    # the rest of a batch whose start went with the damage before it
                    os.pwrite(fd, bytes(size), off)
                    orphan_bytes += size
                    orphan_recs += 1
                    off += size
                    continue
                off += size
                batch_recs += 1
                in_batch = bool(flags & F.FLAG_BATCH_MORE)
                if not in_batch:
                    valid_end, committed, batch_recs = off, seq, 0
                continue
            nx = _resync(buf, off, fsize, salt32, last)
            if nx >= fsize:
                break  # no valid record after it: the torn tail
            if in_batch and rebooted:
                # a power cut wrote back some pages of a batch and not others
                os.pwrite(fd, bytes(off - batch_start), batch_start)
                orphan_bytes += off - batch_start
                orphan_recs += batch_recs
            in_batch, batch_recs, orphans_follow = False, 0, True
            self._n_corrupt += 1
            off = nx
        return valid_end, committed, batch_recs, orphan_bytes, orphan_recs

    def _recover_cut(self, fd: int, fsize: int, valid_end: int, dropped: int) -> Tuple[int, int]:
        """Cut the file at ``valid_end`` when ``dropped`` bytes of a torn tail
        follow it, and allocate the space again.  Returns ``(cap, alloc)``."""
        if dropped:
            os.ftruncate(fd, valid_end)
            fsize = valid_end
        cap = max(self.segment_bytes, fsize)
        alloc = max(min(valid_end + _ALLOC_CHUNK, cap), fsize)
        try:
            os.posix_fallocate(fd, 0, alloc)
        except OSError as e:
            if e.errno != _errno.ENOSPC:
                raise
            alloc = fsize  # appends find no room and report ENOSPC
        return cap, alloc

    def _recover_rewrite(self, fd: int, valid_end: int) -> None:
        """Write the records before ``valid_end`` again, from the page cache."""
        # an fsync failed in this boot: write the bytes again so the
        # fdatasync of _recover_finish really makes them durable
        for o in range(_HDR, valid_end, 1 << 20):
            k = min(1 << 20, valid_end - o)
            os.pwrite(fd, os.pread(fd, k, o), o)

    def _recover_finish(self, fd: int, base: int, salt: int, created: int, header_bad: bool) -> None:
        """Write a bad header again; fdatasync."""
        if header_bad:
            os.pwrite(fd, F.encode_segment_header(base, salt, created), 0)
        os.fdatasync(fd)  # the cut is durable before anything is appended after it

    def _seg_holds_no_data(self, path: str) -> bool:
        with open(path, "rb") as f:
            data = f.read()
        return not data[_HDR:].rstrip(b"\0")

    # Rebuilding ctl, in the steps of the C engine's rebuild (csrc/open.c):
    # _rebuild_reset_ctl, _remove_tmp_files, _rebuild_floor,
    # _rebuild_choose_active, _rebuild_fresh_segment, _rebuild_write_meta,
    # _rebuild_publish.

    def _rebuild(self) -> None:
        """Rebuild ctl from the files; the lock file is held and no other
        process has the log open."""
        rewrite = self._rebuild_reset_ctl()
        self._remove_tmp_files()
        floor_applies, floor = self._rebuild_floor()
        rec, floor = self._rebuild_choose_active(floor_applies, rewrite, floor)
        if rec is None:
            nxt = floor
            abase, salt, cap, valid_end = self._rebuild_fresh_segment(nxt)
            skipped = False
        else:
            abase, salt, cap, valid_end, kept = rec
            nxt = max(kept, floor)
            skipped = nxt > kept
        reserved = self._rebuild_write_meta(nxt, skipped)
        self._rebuild_publish(abase, salt, cap, valid_end, nxt, reserved, skipped)

    def _rebuild_reset_ctl(self) -> bool:
        """Zero ctl.  True when an fsync failed in this boot (the flag is then
        kept in ctl)."""
        c = self._ctl
        magic, version, _size, boot = _CTL_HEAD.unpack_from(c, 0)
        rewrite = (magic == CTL_MAGIC_PURE and version == _CTL_VERSION and bool(self._boot)
                   and boot.rstrip(b"\0").decode("ascii", "replace") == self._boot
                   and self._get(_REWRITE) == 1)
        c[:] = bytes(_CTL_SIZE)
        if rewrite:  # kept until recovery succeeds
            _CTL_HEAD.pack_into(c, 0, CTL_MAGIC_PURE, _CTL_VERSION, _CTL_SIZE, self._boot.encode())
            self._set(_REWRITE, 1)
        return rewrite

    def _remove_tmp_files(self) -> None:
        """Remove leftovers of interrupted renames (meta.tmp, *.idx.tmp)."""
        for name in os.listdir(self.path):
            if name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(self.path, name))
                except OSError:
                    pass

    def _rebuild_floor(self) -> Tuple[bool, int]:
        """``(applies, floor)``: whether the mark in ``meta`` applies (a reboot,
        or one cannot be ruled out), and the lowest number the next record
        may get (the mark when it applies, else 0)."""
        meta = self._meta_read()
        floor_applies = meta is None or not meta[1] or not self._boot or meta[1] != self._boot
        floor = meta[0] if meta is not None and floor_applies else 0
        return floor_applies, floor

    def _drop_empty_segment(self, base: int) -> None:
        """Remove the empty last segment ``base`` (and make that durable)."""
        os.unlink(self._seg_path(base))
        self._fsync_dir()

    def _set_aside_segment(self, base: int) -> None:
        """Rename segment ``base`` (no valid header) to .damaged, or remove it
        when it holds no data."""
        path = self._seg_path(base)
        if self._seg_holds_no_data(path):
            os.unlink(path)
        else:
            os.rename(path, path + ".damaged")

    def _rebuild_choose_active(self, floor_applies: bool, rewrite: bool,
                               floor: int) -> Tuple[Optional[Tuple[int, int, int, int, int]], int]:
        """Recover the last segment.  Returns ``(rec, floor)``: ``rec`` is
        ``(base, salt, cap, valid_end, next_seq)`` of the active segment, or
        None when no segment is left; ``floor`` has risen past every segment
        set aside."""
        bases = self._list()
        rec = None
        while bases and rec is None:
            base = bases[-1]
            rec = self._recover_active(base, floor_applies, rewrite)
            if rec is not None:
                if len(bases) >= 2 and rec[2] == _HDR and rec[3] == base:
                    # an empty last segment left by a roll: the one before is active again
                    self._drop_empty_segment(base)
                    bases.pop()
                    rec = None
                continue
            # no valid header: being created at a power cut, or rotted
            self._set_aside_segment(base)
            floor = max(floor, base)
            bases.pop()
        if rec is None:
            return None, floor
        return (bases[-1],) + rec, floor

    def _rebuild_fresh_segment(self, nxt: int) -> Tuple[int, int, int, int]:
        """No segment left: create the active one at ``nxt``.  Returns
        ``(base, salt, cap, valid_end)``."""
        cap = self.segment_bytes
        fd, salt, alloc = self._seg_create(nxt, cap)
        os.close(fd)
        self._set(_ALLOC_END, alloc)
        return nxt, salt, cap, _HDR

    def _rebuild_write_meta(self, nxt: int, skipped: bool) -> int:
        """Write the durable high-water mark for the next record ``nxt``;
        returns it."""
        # Skipped past the last record kept (a reboot): only `meta` knows it.
        # A mark with this boot's id would stop applying at the next open in
        # this boot, which would then number from the last record and hand
        # out again numbers seen before the power cut; so the mark names no
        # boot and ends at `nxt` until an append puts a record there.
        reserved = nxt if skipped else nxt + F.SEQ_RESERVE
        self._meta_write(reserved, boot="" if skipped else None)
        return reserved

    def _rebuild_publish(self, abase: int, salt: int, cap: int, valid_end: int, nxt: int,
                         reserved: int, skipped: bool) -> None:
        """Fill in ctl; _READY is set last."""
        c = self._ctl
        _CTL_HEAD.pack_into(c, 0, CTL_MAGIC_PURE, _CTL_VERSION, _CTL_SIZE, self._boot.encode())
        for off, v in ((_WRITE_END, valid_end), (_NEXT_SEQ, nxt), (_ACTIVE_BASE, abase),
                       (_ACTIVE_SALT, salt), (_ACTIVE_CAP, cap), (_PEND_END, valid_end),
                       (_PEND_NEXT, nxt), (_PEND_BASE, abase), (_PEND_SALT, salt),
                       (_PEND_CAP, cap), (_RESERVED, reserved), (_SKIP_PENDING, int(skipped)), (_SYNCED, nxt),
                       (_SEG_GEN, 1), (_REWRITE, 0), (_BUSY, 0)):
            self._set(off, v)
        self._set(_READY, 1)

    # -- the writer lock ---------------------------------------------------

    @contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        with self._mu:
            fcntl.flock(self._lockfd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                if shared:
                    yield
                    return
                if self._get(_BUSY):
                    self._repair()
                self._set(_BUSY, 1)
                try:
                    yield
                finally:
                    self._set(_BUSY, 0)
            finally:
                fcntl.flock(self._lockfd, fcntl.LOCK_UN)

    def _repair(self) -> None:
        """A writer died holding the lock: finish or undo what it left."""
        g = self._get
        if g(_PEND_BASE) != g(_ACTIVE_BASE):
            if os.path.exists(self._seg_path(g(_PEND_BASE))) and g(_PEND_BASE) > g(_ACTIVE_BASE):
                # died publishing a roll whose new segment was made and the old sealed
                for a, b in ((_ACTIVE_SALT, _PEND_SALT), (_ACTIVE_CAP, _PEND_CAP)):
                    self._set(a, g(b))
                self._set(_WRITE_END, _HDR)
                self._set(_ACTIVE_BASE, g(_PEND_BASE))
                self._set(_PEND_END, _HDR)
                self._set(_SEG_GEN, g(_SEG_GEN) + 1)
            self._set(_PEND_BASE, g(_ACTIVE_BASE))
            self._set(_PEND_SALT, g(_ACTIVE_SALT))
            self._set(_PEND_CAP, g(_ACTIVE_CAP))
        active = g(_ACTIVE_BASE)
        removed = False
        for b in self._list():
            if b > active:  # a roll's new segment never published: it holds no record
                try:
                    os.unlink(self._seg_path(b))
                    removed = True
                except OSError:
                    pass
        if removed:
            self._fsync_dir()
        if g(_WRITE_END) == g(_PEND_END) and g(_NEXT_SEQ) != g(_PEND_NEXT):
            self._set(_NEXT_SEQ, g(_PEND_NEXT))  # died between the two stores of a publish
        try:
            fd = os.open(self._seg_path(active), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            self._set(_NEED_ROLL, 1)
            return
        try:
            size = os.fstat(fd).st_size
            if size < g(_ALLOC_END):
                self._set(_ALLOC_END, max(size, g(_WRITE_END)))
            if g(_PEND_END) > g(_WRITE_END):
                # died framing a batch: its bytes go back to zeros
                n = g(_PEND_END) - g(_WRITE_END)
                if g(_WRITE_END) < size:
                    os.pwrite(fd, bytes(min(n, size - g(_WRITE_END))), g(_WRITE_END))
                self._rec_bytes += n
                self._set(_PEND_END, g(_WRITE_END))
                self._set(_PEND_NEXT, g(_NEXT_SEQ))
        finally:
            os.close(fd)

    # -- writing -----------------------------------------------------------

    def _poisoned(self) -> bool:
        return self._get(_POISON) != self._poison_gen

    def _poison(self) -> None:
        """A failed fsync or write: every handle refuses appends until reopened,
        and the next writer rewrites and seals the active segment."""
        self._set(_REWRITE, 1)
        self._set(_NEED_ROLL, 1)
        self._set(_POISON, self._get(_POISON) + 1)

    def _poisoned_error(self) -> errors.LogPoisonedError:
        return errors.LogPoisonedError(
            _errno.EIO, f"append to {self.path!r} failed: an earlier fsync or write failed; reopen the log"
        )

    def _writer_fd(self) -> int:
        base = self._get(_ACTIVE_BASE)
        if self._w_base != base or self._w_fd < 0:
            if self._w_fd >= 0:
                os.close(self._w_fd)
                self._w_fd = -1
            self._w_fd = os.open(self._seg_path(base), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            self._w_base = base
        return self._w_fd

    def _roll(self, need: int) -> None:
        """Start a new segment for a batch of ``need`` bytes (under the lock)."""
        g = self._get
        cap = max(self.segment_bytes, _HDR + need)
        cap = (cap + 4095) & ~4095
        if g(_WRITE_END) == _HDR and g(_ACTIVE_BASE) == g(_NEXT_SEQ):
            # the active segment is empty: grow it in place
            if cap > g(_ACTIVE_CAP):
                self._set(_PEND_CAP, cap)
                self._set(_ACTIVE_CAP, cap)
            self._set(_NEED_ROLL, 0)
            self._set(_REWRITE, 0)
            return
        fd_old = self._writer_fd()
        end = g(_WRITE_END)
        if g(_REWRITE):
            for o in range(_HDR, end, 1 << 20):
                k = min(1 << 20, end - o)
                os.pwrite(fd_old, os.pread(fd_old, k, o), o)
        base = g(_NEXT_SEQ)
        fd, salt, alloc = self._seg_create(base, cap)  # the next one first: ENOSPC leaves the old
        try:
            os.fdatasync(fd_old)
            os.ftruncate(fd_old, end)
            os.fdatasync(fd_old)
        except OSError:
            self._poison()
            os.close(fd)
            os.unlink(self._seg_path(base))
            raise
        self._n_fsyncs += 2
        os.close(self._w_fd)
        self._w_fd, self._w_base = fd, base
        self._set(_ALLOC_END, alloc)
        self._set(_PEND_END, _HDR)
        self._set(_PEND_NEXT, base)
        self._set(_PEND_SALT, salt)
        self._set(_PEND_CAP, cap)
        self._set(_PEND_BASE, base)
        # publish
        self._set(_ACTIVE_SALT, salt)
        self._set(_ACTIVE_CAP, cap)
        self._set(_WRITE_END, _HDR)
        self._set(_ACTIVE_BASE, base)
        if g(_SYNCED) < base:
            self._set(_SYNCED, base)  # the sealed segment is durable
        self._set(_SEG_GEN, g(_SEG_GEN) + 1)
        self._set(_NEED_ROLL, 0)
        self._set(_REWRITE, 0)

    # An append under the lock, in the steps of the C engine's append_locked
    # (csrc/append.c): _make_room, _reserve_blocks, _reserve_numbers,
    # _frame_records, _write_framed, _publish_batch.  Each runs once per
    # batch; only _frame_records loops over the records.

    def _make_room(self, need: int) -> int:
        """Roll when a roll is due or ``need`` bytes do not fit the active
        segment; returns the active segment's fd."""
        g = self._get
        if g(_NEED_ROLL) or g(_WRITE_END) + need > g(_ACTIVE_CAP):
            self._roll(need)
        return self._writer_fd()

    def _reserve_blocks(self, fd: int, end: int) -> None:
        """Allocate the active segment up to at least ``end`` (past _ALLOC_END)."""
        # reserve the space first: a full disk is reported with nothing written
        want = min(-(-end // _ALLOC_CHUNK) * _ALLOC_CHUNK, self._get(_ACTIVE_CAP))
        try:
            os.posix_fallocate(fd, 0, want)
        except OSError as e:
            if e.errno != _errno.ENOSPC or want <= end:
                raise
            os.posix_fallocate(fd, 0, end)
            want = end
        self._set(_ALLOC_END, want)

    def _reserve_numbers(self, seq: int, n: int) -> None:
        """Write the mark that reserves ``[seq, seq + n)`` and more (past _RESERVED)."""
        # Right after recovery skipped numbers no record shows
        # the skip: this batch's numbers get a mark that names
        # no boot; the next append writes the usual one.
        if self._get(_SKIP_PENDING):
            self._meta_write(seq + n, boot="")
            self._set(_RESERVED, seq + n)
            self._set(_SKIP_PENDING, 0)
        else:
            self._meta_write(seq + n + F.SEQ_RESERVE)
            self._set(_RESERVED, seq + n + F.SEQ_RESERVE)

    def _frame_records(self, payloads: Sequence[Any], lens: List[int], prefix: bytes, n: int,
                       seq: int, ts: int, salt32: int, need: int) -> bytearray:
        """The ``n`` records framed, numbered from ``seq``: ``need`` bytes."""
        out = bytearray(need)
        pos = 0
        for i, p in enumerate(payloads):
            length = lens[i]
            flags = (F.FLAG_BATCH_MORE if i + 1 < n else 0) | (F.FLAG_BATCH_CONT if i else 0)
            _REC.pack_into(out, pos, 0, length, seq + i, ts, salt32, F.REC_TYPE_DATA, flags, 0)
            body = pos + _RH
            if prefix:
                out[body:body + len(prefix)] = prefix
                body += len(prefix)
            out[body:body + length - len(prefix)] = p
            size = (_RH + length + 7) & ~7
            _REC_LEN.pack_into(out, pos, F.mask_crc(F.crc32c(memoryview(out)[pos + 4:pos + size])))
            pos += size
        return out

    def _write_framed(self, fd: int, out: bytearray, start: int, seq: int, need: int) -> None:
        """pwrite the framed batch at ``start``; a failed or short write is
        undone (zeros written back) before the error is raised."""
        try:
            w = os.pwrite(fd, out, start)
            if w != need:
                raise OSError(_errno.EIO, "short write")
        except OSError as e:
            # nothing of the batch remains; only ENOSPC leaves the log usable
            try:
                os.pwrite(fd, bytes(need), start)
            except OSError:
                pass
            self._set(_PEND_END, start)
            self._set(_PEND_NEXT, seq)
            if e.errno != _errno.ENOSPC:
                self._poison()
            raise self._oserr(e, f"append to {self.path!r} failed") from None

    def _publish_batch(self, end: int, nxt: int) -> None:
        # publish: readers see the whole batch or none of it
        _QQ.pack_into(self._ctl, _WRITE_END, end, nxt)
        self._set(_NOTIFY, (self._get(_NOTIFY) + 1) & _U32)

    def _append(self, payloads: Sequence[Any], prefix: bytes) -> int:
        lens = [memoryview(p).nbytes + len(prefix) for p in payloads]
        big = max(lens)
        if big > MAX_RECORD:
            raise errors.RecordTooLargeError(
                f"record of {big} bytes is larger than the limit of {MAX_RECORD} bytes"
            )
        need = sum((_RH + n + 7) & ~7 for n in lens)
        n = len(payloads)
        with self._call():
            if self._poisoned():
                raise self._poisoned_error()
            with self._locked():
                if self._poisoned():
                    raise self._poisoned_error()
                g = self._get
                try:
                    fd = self._make_room(need)
                    start = g(_WRITE_END)
                    end = start + need
                    if end > g(_ALLOC_END):
                        self._reserve_blocks(fd, end)
                    seq = g(_NEXT_SEQ)
                    if seq + n > g(_RESERVED):
                        self._reserve_numbers(seq, n)
                except OSError as e:
                    raise self._oserr(e, f"append to {self.path!r} failed") from None
                self._set(_PEND_END, end)
                self._set(_PEND_NEXT, seq + n)
                salt32 = g(_ACTIVE_SALT) & _U32
                ts = time.time_ns()
                out = self._frame_records(payloads, lens, prefix, n, seq, ts, salt32, need)
                self._write_framed(fd, out, start, seq, need)
                self._publish_batch(end, seq + n)
            self._n_appends += 1
            if self.durability == "sync":
                self._group_sync(seq + n)
        return seq

    def append(self, payload: BytesLike) -> int:
        """Append one record; returns its sequence number.

        Returns once the record is in the kernel ("none", "interval") or on
        stable storage ("sync")."""
        if self._closed:
            raise errors.LogClosedError(f"log {self.path!r} is closed")
        return self._append((payload,), b"")

    def append_batch(self, payloads: Sequence[BytesLike], prefix: bytes = b"") -> int:
        """Append records as one atomic batch; returns the first one's number.

        The others follow densely.  After any crash either the whole batch
        is in the log or none of it is.  ``prefix``, when given, is stored
        before every payload."""
        if self._closed:
            raise errors.LogClosedError(f"log {self.path!r} is closed")
        if not isinstance(payloads, (list, tuple)):
            payloads = list(payloads)
        if not payloads:
            raise ValueError("append_batch needs at least one record, got an empty batch")
        return self._append(payloads, bytes(prefix))

    def _append_error(self, rc: int, size: int) -> None:
        """Compatibility with the C engine's error path (never reached: this
        engine raises where it fails)."""
        raise errors.QlogError(f"append to {self.path!r} failed (code {rc})")

    def _group_sync(self, target: int) -> None:
        """Return once every record below ``target`` is on stable storage."""
        while self._get(_SYNCED) < target:
            if self._poisoned():
                raise self._poisoned_error()
            with self._smu:
                if self._get(_SYNCED) >= target:
                    return
                # the group commit's leader lock: a POSIX record lock on the
                # last byte of ctl (independent of the flocks); the processes
                # waiting for it find their records covered by its fdatasync
                fcntl.lockf(self._ctlfd, fcntl.LOCK_EX, 1, _CTL_SIZE - 1)
                try:
                    if self._get(_SYNCED) < target:
                        self._commit()
                finally:
                    fcntl.lockf(self._ctlfd, fcntl.LOCK_UN, 1, _CTL_SIZE - 1)

    def _commit(self) -> None:
        """One fdatasync of the active segment covering every record
        published before it started."""
        with self._locked():
            base = self._get(_ACTIVE_BASE)
            upto = self._get(_NEXT_SEQ)
            try:
                fd = os.open(self._seg_path(base), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as e:
                raise self._oserr(e, f"sync of {self.path!r} failed") from None
        try:
            os.fdatasync(fd)
            self._n_fsyncs += 1
        except OSError as e:
            with self._locked():
                self._poison()
            raise errors.StorageError(e.errno or _errno.EIO,
                                      f"sync of {self.path!r} failed: {e.strerror}") from None
        finally:
            os.close(fd)
        with self._locked():
            if self._get(_SYNCED) < upto:
                self._set(_SYNCED, upto)

    def sync(self) -> None:
        """Make every record appended so far, by any process, durable.

        Returns after fdatasync."""
        with self._call():
            if self._poisoned():
                raise self._poisoned_error()
            self._group_sync(self._get(_NEXT_SEQ))

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                if not self._closed and self._get(_SYNCED) < self._get(_NEXT_SEQ) and not self._poisoned():
                    self.sync()
            except Exception:  # poisoned: the next append raises it
                pass

    # -- reading -----------------------------------------------------------

    def _snapshot(self) -> Tuple[int, int, int, int, int]:
        """``(active_base, active_salt, write_end, next_seq, seg_gen)`` as published."""
        with self._locked(shared=True):
            g = self._get
            return g(_ACTIVE_BASE), g(_ACTIVE_SALT), g(_WRITE_END), g(_NEXT_SEQ), g(_SEG_GEN)

    def _refresh(self, gen: int) -> None:
        if gen == self._seg_gen:
            return
        bases = self._list()
        keep = set(bases)
        for b in list(self._segs):
            if b not in keep:
                self._segs.pop(b).close()
                self._held.discard(b)
        for b in bases:
            if b not in self._segs:
                self._segs[b] = _Seg(b, self._seg_path(b))
        self._bases = bases
        self._seg_gen = gen

    def _ready(self, s: _Seg, active_base: int, write_end: int) -> bool:
        """Open and map ``s`` far enough to read it to its bound; False if gone."""
        sealed = s.base < active_base
        if s.fd < 0:
            try:
                s.fd = os.open(s.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                return False
            except OSError as e:
                raise self._oserr(e, f"read of {self.path!r} failed") from None
            self._held.add(s.base)
        if sealed and not s.sealed:
            s.sealed = True
            s.size = os.fstat(s.fd).st_size
            if isinstance(s.map, mmap.mmap) and s.maplen < s.size:
                s.map.close()
                s.map = None
        bound = s.size if s.sealed else write_end
        if s.map is None or s.maplen < bound:
            if isinstance(s.map, mmap.mmap):
                try:
                    s.map.close()
                except BufferError:
                    pass
            while True:
                size = os.fstat(s.fd).st_size
                if size == 0:
                    s.map, s.maplen = b"", 0
                    break
                try:
                    s.map, s.maplen = _mmap(s.fd, size), size
                    break
                except ValueError:
                    # cut shorter between the fstat and the mapping: a roll
                    # sealed it (only preallocated space past the data goes)
                    continue
            if s.salt32 == 0:
                try:
                    h = F.decode_segment_header(s.map)
                    if h.base != s.base:
                        raise errors.FormatError("base differs from the file name")
                    s.salt, s.salt32 = h.salt, h.salt & _U32
                except errors.FormatError:
                    s.header_bad = True  # costs no record: the records name the salt
                    later = [b for b in self._bases if b > s.base]
                    s.salt32 = _infer_salt(s.map, min(bound, s.maplen), s.base,
                                           later[0] if later else None)
                    s.salt = s.salt32
                    self._n_corrupt += 1
        if s.sealed and not s.idx_saved and s.scanned_to == _HDR and not s.header_bad:
            self._idx_load(s)
        return True

    def _idx_load(self, s: _Seg) -> None:
        try:
            with open(self._seg_path(s.base, ".idx"), "rb") as f:
                idx = F.decode_index(f.read())
        except (OSError, errors.FormatError):
            return
        if idx.base != s.base or idx.salt != s.salt or idx.segment_length != s.size or not idx.entries:
            return
        # A cache: one that passes its CRC but is not what a scan would build
        # (entries out of order or outside the records, the last one not a
        # record with its number) is ignored, and the segment scanned instead.
        prev_seq = prev_off = -1
        for seq, off in idx.entries:
            if off % 8 or not _HDR <= off <= s.size - _RH or off <= prev_off or seq <= prev_seq:
                return
            prev_seq, prev_off = seq, off
        hit = _check(s.map, prev_off, s.size, s.salt32, None) if s.map is not None else None
        if not hit or hit[1] != prev_seq:
            return
        s.iseq = [e[0] for e in idx.entries]
        s.ioff = [e[1] for e in idx.entries]
        s.scanned_to = s.size
        s.idx_saved = True

    def _idx_save(self, s: _Seg) -> None:
        """Write NNN.idx beside a sealed segment (a cache: no fsync)."""
        body = b"".join(struct.pack("<QQ", q, o) for q, o in zip(s.iseq, s.ioff))
        head = struct.pack("<8sIIQQQI", F.IDX_MAGIC, F.FORMAT_VERSION, len(s.iseq), s.base,
                           s.salt, s.size, F.IDX_STRIDE)
        b = head + struct.pack("<I", F.mask_crc(F.crc32c(body, F.crc32c(head)))) + body
        path = self._seg_path(s.base, ".idx")
        tmp = path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.mode)
            try:
                os.write(fd, b)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError:
            pass
        s.idx_saved = True

    def _drop_resident(self) -> None:
        """Memory stays flat however much a handle reads: the mapped pages
        are dropped from this process (the data stays in the page cache and
        the file; a later access maps it again)."""
        self._touched = 0
        for s in self._segs.values():
            if isinstance(s.map, mmap.mmap) and s.maplen:
                s.map.madvise(mmap.MADV_DONTNEED)

    def _count_damage(self, s: _Seg, off: int) -> None:
        if off not in s.damage:
            s.damage.add(off)
            self._n_corrupt += 1

    def _idx_extend(self, s: _Seg, bound: int) -> None:
        """Extend the sparse index of ``s`` over [scanned_to, bound)."""
        buf, off, last = s.map, s.scanned_to, s.scan_last
        if not s.salt32:
            return
        while off + _RH <= bound:
            hit = _check(buf, off, bound, s.salt32, last)
            if hit:
                if not s.ioff or off - s.ioff[-1] >= F.IDX_STRIDE:
                    s.iseq.append(hit[1])
                    s.ioff.append(off)
                last = hit[1]
                off += hit[0]
                continue
            nx = _resync(buf, off, bound, s.salt32, last)
            if nx < bound:
                self._count_damage(s, off)
            off = nx
            if nx >= bound:
                break
        self._touched += max(0, off - s.scanned_to)
        s.scanned_to, s.scan_last = max(off, s.scanned_to), last
        if s.sealed and not s.idx_saved and not s.header_bad and s.iseq:
            self._idx_save(s)

    def read(
        self, from_seq: int, *, max_records: int = 1000, max_bytes: int = 16 << 20,
        unpack: Optional[Callable[..., Any]] = None,
    ) -> Any:
        """Records with sequence number >= ``from_seq``, in order.

        Returns up to ``max_records`` ``(seq, payload)`` pairs, with at most
        ``max_bytes`` of payload (but at least one record when there is
        one); an empty list at the end of the log.  Records appended by
        other processes are visible without reopening.  Damaged records are
        skipped and counted in ``stats()``, never returned.

        ``unpack``, when given, is called instead with ``(data, seqs,
        offsets, n)``: the payloads back to back, their sequence numbers and
        the n + 1 offsets into ``data`` as little-endian uint64 bytes, and
        its result returned; it is not called when nothing was read."""
        if from_seq < 0:
            raise ValueError(f"from_seq must be >= 0, got {from_seq}")
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        with self._call(), self._rmu:
            out = self._read(from_seq, max_records, max_bytes)
            self._release(out[-1][0] if out else None)
            if self._touched >= _DROP_EVERY:
                self._drop_resident()
        if not out:
            return []
        if unpack is None:
            return out
        offs = array("Q", [0])
        total = 0
        for _, p in out:
            total += len(p)
            offs.append(total)
        return unpack(b"".join(p for _, p in out), array("Q", [q for q, _ in out]).tobytes(),
                      offs.tobytes(), len(out))

    def _release(self, last_seq: Optional[int]) -> None:
        """Keep memory and descriptors flat: only the segment holding the
        last record read and the active one stay open and mapped."""
        if len(self._held) <= 1:
            return
        keep = {self._read_abase}
        if last_seq is not None:
            k = bisect_right(self._bases, last_seq) - 1
            if k >= 0:
                keep.add(self._bases[k])
        for b in list(self._held - keep):
            self._held.discard(b)
            s = self._segs.get(b)
            if s is not None:
                s.close()

    def _read(self, from_seq: int, max_records: int, max_bytes: int) -> List[Tuple[int, bytes]]:
        abase, _salt, wend, nxt, gen = self._snapshot()
        self._read_abase = abase
        if from_seq >= nxt:
            return []
        self._refresh(gen)
        bases = [b for b in self._bases if b <= abase]
        i = max(0, bisect_right(bases, from_seq) - 1)
        out: List[Tuple[int, bytes]] = []
        nbytes = 0
        while i < len(bases):
            s = self._segs[bases[i]]
            i += 1
            if not self._ready(s, abase, wend):
                continue
            bound = min(s.size if s.sealed else wend, s.maplen)
            if s.scanned_to < bound:
                self._idx_extend(s, bound)
            if not s.salt32:
                continue
            k = bisect_right(s.iseq, from_seq) - 1
            # Start at an entry whose record checks out with its number (one
            # damaged since, or one an index file got wrong, is passed over).
            while k >= 0:
                hit = _check(s.map, s.ioff[k], bound, s.salt32, None)
                if hit and hit[1] == s.iseq[k]:
                    break
                k -= 1
            off = s.ioff[k] if k >= 0 else _HDR
            last: Optional[int] = None
            buf = s.map
            while off + _RH <= bound:
                hit = _check(buf, off, bound, s.salt32, last)
                if not hit:
                    nx = _resync(buf, off, bound, s.salt32, last)
                    if nx < bound:
                        self._count_damage(s, off)
                    off = nx
                    continue
                size, seq, _flags, length = hit
                last = seq
                if seq >= from_seq:
                    if out and (len(out) >= max_records or nbytes + length > max_bytes):
                        return out
                    out.append((seq, bytes(buf[off + _RH:off + _RH + length])))
                    nbytes += length
                    self._touched += size
                off += size
            if len(out) >= max_records:
                return out
            if s.base != abase:  # read to its end: let it go before the next one
                self._held.discard(s.base)
                s.close()
        return out

    def _wait_for(self, cond: Callable[[], bool], timeout: Optional[float]) -> bool:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        nap = _POLL_MIN
        while True:
            if cond():
                return True
            if self._closed:
                raise errors.LogClosedError(f"wait on {self.path!r} ended: log is closed")
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                time.sleep(min(nap, left))
            else:
                time.sleep(nap)
            nap = min(nap * 2, _POLL_MAX)

    def wait(self, seq: int, timeout: Optional[float] = None) -> bool:
        """Block until a record with sequence number >= ``seq`` exists (appended
        by any process), or ``timeout`` seconds pass.  Returns whether one does.
        Polls the shared state (backoff up to 20 ms)."""
        with self._call():
            return self._wait_for(lambda: self._get(_NEXT_SEQ) > seq, timeout)

    def notify_gen(self) -> int:
        """The change counter that every append (by any process) and every
        :meth:`poke` bumps; pass it to :meth:`wait_change`."""
        with self._call():
            return self._get(_NOTIFY) & _U32

    def poke(self) -> None:
        """Bump the change counter: every :meth:`wait_change` caller, in every
        process, sees it."""
        with self._call(), self._locked():
            self._set(_NOTIFY, (self._get(_NOTIFY) + 1) & _U32)

    def wait_change(self, gen: int, timeout: Optional[float] = None) -> bool:
        """Block until the change counter differs from ``gen`` (an append or a
        :meth:`poke` by any process) or ``timeout`` seconds pass.  Returns
        whether it changed.  Polls the shared state (backoff up to 20 ms)."""
        with self._call():
            return self._wait_for(lambda: (self._get(_NOTIFY) & _U32) != gen, timeout)

    # -- space ---------------------------------------------------------------

    def truncate_before(self, seq: int) -> int:
        """Delete whole sealed segments whose records all lie below ``seq``.

        Oldest first, so a crash part-way leaves a shorter log, never a
        hole.  Returns how many segments were deleted."""
        with self._call(), self._locked():
            bases = self._list()
            active = self._get(_ACTIVE_BASE)
            deleted = 0
            try:
                for i in range(len(bases) - 1):
                    if bases[i + 1] > seq or bases[i] >= active:
                        break
                    try:
                        os.unlink(self._seg_path(bases[i], ".idx"))
                    except FileNotFoundError:
                        pass
                    try:
                        os.unlink(self._seg_path(bases[i]))
                    except FileNotFoundError:
                        pass
                    deleted += 1
                if deleted:
                    self._set(_SEG_GEN, self._get(_SEG_GEN) + 1)
                    self._fsync_dir()
            except OSError as e:
                raise self._oserr(e, f"truncate_before({seq}) on {self.path!r} failed") from None
            return deleted

    # -- state -------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """The lowest record number still in the log (records below it were
        given back by :meth:`truncate_before`); ``next_seq`` when empty."""
        return self.stats().first_seq

    @property
    def next_seq(self) -> int:
        """The number the next append gets (other processes may append at any time)."""
        with self._call():
            return self._get(_NEXT_SEQ)

    def stats(self) -> LogStats:
        """A snapshot of this log's counters (:class:`qlog.LogStats`): record
        numbers, segments, fsyncs and appends made by this handle, damage
        skipped and torn bytes dropped at open."""
        with self._call():
            bases = self._list()
            _ab, _s, _we, nxt, _g = self._snapshot()
            first = bases[0] if bases else nxt
            if first > nxt:
                first = nxt
            return LogStats(
                first_seq=first,
                next_seq=nxt,
                synced_seq=min(self._get(_SYNCED), nxt),
                segments=len(bases),
                corrupt_records=self._n_corrupt,
                recovered_bytes_dropped=self._rec_bytes,
                recovered_records_dropped=self._rec_records,
                fsyncs=self._n_fsyncs,
                appends=self._n_appends,
                poisoned=self._poisoned(),
            )

    def verify(self, *, max_damage: int = 1000) -> VerifyReport:
        """Check the CRC of every record of every segment; report the damage.

        Read-only: damaged records stay where they are (readers skip them)."""
        with self._call():
            abase, _salt, wend, _n, _g = self._snapshot()
            records = 0
            found: List[Damage] = []

            def add(d: Damage) -> None:
                if len(found) < max_damage:
                    found.append(d)

            listed = self._list()
            for i, base in enumerate(listed):
                if base > abase:
                    break
                try:
                    fd = os.open(self._seg_path(base), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                except FileNotFoundError:
                    continue
                try:
                    size = os.fstat(fd).st_size
                    end = min(wend, size) if base == abase else size
                    if end < _HDR:
                        add(Damage(base, 0, end, None, "not-a-segment"))
                        continue
                    buf = _mmap(fd, end)
                finally:
                    os.close(fd)
                try:
                    try:
                        h = F.decode_segment_header(buf)
                        if h.base != base:
                            raise errors.FormatError("base differs")
                        salt32 = h.salt & _U32
                    except errors.FormatError:
                        add(Damage(base, 0, _HDR, None, "segment-header"))
                        salt32 = _infer_salt(buf, end, base,
                                             listed[i + 1] if i + 1 < len(listed) else None)
                        if not salt32:
                            continue
                    off, last = _HDR, None
                    while off + _RH <= end:
                        hit = _check(buf, off, end, salt32, last)
                        if hit:
                            records += 1
                            last = hit[1]
                            off += hit[0]
                            continue
                        nx = _resync(buf, off, end, salt32, last)
                        add(Damage(base, off, nx - off, last if last else None,
                                   "torn-tail" if nx >= end else "record"))
                        off = nx
                finally:
                    buf.close()
            return VerifyReport(records=records, damage=found)

    # -- lifetime ------------------------------------------------------------

    @contextmanager
    def _call(self) -> Iterator[None]:
        with self._life:
            if self._closed:
                raise errors.LogClosedError(f"log {self.path!r} is closed")
            self._calls += 1
        try:
            yield
        finally:
            with self._life:
                self._calls -= 1
                if not self._calls:
                    self._life.notify_all()

    def _check(self) -> None:
        if self._closed:
            raise errors.LogClosedError(f"log {self.path!r} is closed")

    def close(self) -> None:
        """Close the handle ("interval" logs are synced first).  Idempotent."""
        with self._life:
            if self._closed:
                return
        err: Optional[BaseException] = None
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._stop.set()
            self._flusher.join()
        if self.durability == "interval" and not self._poisoned():
            try:
                self.sync()
            except errors.QlogError as e:
                err = e
        with self._life:
            if self._closed:
                return
            self._closed = True
            self._h = None
            while self._calls:  # waiters notice `closed` within 20 ms
                self._life.wait()
        self._release_files()
        if err is not None:
            raise err

    def _release_files(self) -> None:
        for s in self._segs.values():
            s.close()
        self._segs.clear()
        if self._w_fd >= 0:
            os.close(self._w_fd)
            self._w_fd = -1
        if self._ctl is not None:
            try:
                self._ctl.close()
            except BufferError:
                pass
            self._ctl = None
        for name in ("_ctlfd", "_lockfd", "_dirfd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)  # closing ctl drops the shared flock
                setattr(self, name, -1)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<qlog.Log {self.path!r} durability={self.durability!r} engine=pure {state}>"
