"""The Python face of the C engine: :class:`Log`.

One call into C per batch: ``append_batch`` hands C one buffer plus an
array of lengths; ``read`` gets back one buffer, an array of sequence
numbers and an array of offsets.  Python never parses a record header.
"""

from __future__ import annotations

import errno as _errno
import logging
import math
import os
import threading
from array import array
from typing import Any, Callable, NoReturn, Optional, Sequence, Union

from .. import errors
from .modes import DEFAULT_FILE_MODE
from ._glue import pack as _pack, unpack as _unpack
from ._qlog_c import ffi, lib
from .types import (CTL_MAGIC_PURE, DEFAULT_SEGMENT_BYTES, Damage, LogLifecycle, LogStats, VerifyReport,
                    check_log_args, refuse_nfs as _refuse_nfs)

__all__ = ["Log", "LogStats", "Damage", "MAX_RECORD", "DURABILITY_MODES"]

BytesLike = Union[bytes, bytearray, memoryview]

MAX_RECORD: int = lib.QLOG_MAX_RECORD
DURABILITY_MODES = {
    "none": lib.QLOG_DURABILITY_NONE,
    "interval": lib.QLOG_DURABILITY_INTERVAL,
    "sync": lib.QLOG_DURABILITY_SYNC,
}
_DAMAGE_KINDS = {
    lib.QLOG_DAMAGE_RECORD: "record",
    lib.QLOG_DAMAGE_SEG_HEADER: "segment-header",
    lib.QLOG_DAMAGE_TORN_TAIL: "torn-tail",
    lib.QLOG_DAMAGE_NOT_SEGMENT: "not-a-segment",
}
_alloc = ffi.new_allocator(should_clear_after_alloc=False)
logger = logging.getLogger("qlog")


NFS_SUPER_MAGIC = 0x6969


def _on_nfs(path: str) -> bool:
    """Whether ``path`` is on NFS, asked through the engine's syscall table."""
    t = ffi.new("qlog_vfs *")
    lib.qlog_vfs_get(t)
    out = ffi.new("int64_t *")
    return bool(t.fs_type(os.fsencode(path), out) == 0 and out[0] == NFS_SUPER_MAGIC)


def refuse_nfs(path: str) -> None:
    """:func:`types.refuse_nfs` with this engine's check (statfs through the
    syscall table)."""
    _refuse_nfs(path, _on_nfs)


def _strerror(err: int) -> str:
    if err == _errno.ELOOP:  # the engine opens segments with O_NOFOLLOW
        return "a segment file is a symbolic link, and qlog does not follow links in a log directory"
    return os.strerror(err)


def _raise(code: int, what: str, h: Any = None) -> NoReturn:
    msg = ffi.string(lib.qlog_strerror(code)).decode()
    if code == lib.QLOG_ENOSPC:
        raise errors.DiskFullError(_errno.ENOSPC, f"{what}: {msg}; nothing was written")
    if code == lib.QLOG_EPOISONED:
        raise errors.LogPoisonedError(_errno.EIO, f"{what}: {msg}")
    if code == lib.QLOG_EIO:
        err = lib.qlog_errno(h) if h is not None else 0
        raise errors.StorageError(err, f"{what}: {_strerror(err) if err else msg}")
    if code == lib.QLOG_EFORMAT:
        raise errors.FormatError(f"{what}: {msg}")
    if code == lib.QLOG_ENFS:
        raise errors.UnsupportedFilesystemError(f"{what}: {msg}")
    if code == lib.QLOG_ECORRUPT:
        raise errors.CorruptStateError(f"{what}: {msg}")
    if code == lib.QLOG_ECLOSED:
        raise errors.LogClosedError(f"{what}: {msg}")
    if code == lib.QLOG_ENOMEM:
        raise MemoryError(f"{what}: {msg}")
    raise errors.QlogError(f"{what}: {msg} (code {code})")


def _held_by_pure_engine(path: str) -> bool:
    """Whether the control file of the log at ``path`` is marked by the
    pure-Python engine (qlog/_log/purelog.py), which keeps its own layout there."""
    try:
        with open(os.path.join(path, "ctl"), "rb") as f:
            return f.read(8) == CTL_MAGIC_PURE
    except OSError:
        return False


class Log(LogLifecycle):
    """A durable, append-only log of byte records in a directory.

    Any number of threads and processes may open the same directory and
    append and read at once; sequence numbers are dense and unique across
    all of them.

    ``durability``:

    - ``"sync"``: ``append`` returns after the record is on stable storage
      (fdatasync), one fsync shared by every concurrent appender;
    - ``"interval"``: returns once the record is in the kernel; a background
      thread syncs every ``flush_interval`` seconds;
    - ``"none"``: returns once the record is in the kernel.

    In every mode a returned append survives the process being killed.

    ``mode`` is the permission of every file the log creates (default
    ``0o600``: the owner only); the directory, when created, gets the same
    bits plus execute wherever read is set (``0o640`` -> ``0o750``).  The
    umask still applies, and an existing directory or file keeps its mode.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        *,
        durability: str = "sync",
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        flush_interval: float = 0.1,
        mode: int = DEFAULT_FILE_MODE,
    ) -> None:
        self.path = check_log_args(path, durability, segment_bytes, flush_interval, mode)
        self.durability = durability
        self.segment_bytes = segment_bytes
        self.flush_interval = float(flush_interval)
        self.mode = mode
        out = ffi.new("qlog_log **")
        rc = lib.qlog_open(os.fsencode(self.path), DURABILITY_MODES[durability], segment_bytes,
                           mode, out)
        if rc:
            if rc == lib.QLOG_EIO:
                err = ffi.errno
                raise errors.StorageError(err, f"cannot open log {self.path!r}: {_strerror(err)}")
            if rc == lib.QLOG_ECORRUPT and _held_by_pure_engine(self.path):
                raise errors.EngineConflictError(
                    f"cannot open log {self.path!r} with the C engine: it is open (in this or another "
                    f"process) with the pure-Python engine; one directory is used by one "
                    f"engine at a time (close it there, or use the same engine: QLOG_PURE)"
                )
            _raise(rc, f"cannot open log {self.path!r}")
        # Freed when the last reference goes (a call racing close() holds one).
        self._h = ffi.gc(out[0], lib.qlog_free)
        self._read_lock = threading.Lock()
        self._rcap = 0
        self._rbuf: Any = None
        self._rseqs: Any = None
        self._roffs: Any = None
        self._rmax = 0
        self._needed = ffi.new("uint64_t *")
        st = self.stats()
        if st.recovered_bytes_dropped:
            logger.info(
                "log %r: recovery dropped a torn tail of %d bytes (%d complete records of an "
                "unfinished batch)", self.path, st.recovered_bytes_dropped,
                st.recovered_records_dropped,
            )
        if st.corrupt_records:
            logger.warning(
                "log %r: %d damaged record(s) found on open; they are skipped, never returned "
                "(Log.verify() lists them)", self.path, st.corrupt_records,
            )
        self._closed = False
        self._stop = threading.Event()
        self._flusher: Optional[threading.Thread] = None
        if durability == "interval":
            self._flusher = threading.Thread(
                target=self._flush_loop, name=f"qlog-flush:{self.path}", daemon=True
            )
            self._flusher.start()

    # -- writing ---------------------------------------------------------

    def append(self, payload: BytesLike) -> int:
        """Append one record; returns its sequence number.

        Returns once the record is in the kernel ("none", "interval") or on
        stable storage ("sync")."""
        h = self._h
        if h is None:
            raise errors.LogClosedError(f"log {self.path!r} is closed")
        if type(payload) is bytes:
            seq: int = lib.qlog_append1(h, payload, len(payload))
            if seq < 0:
                self._append_error(seq, len(payload))
        else:
            size = memoryview(payload).nbytes
            seq = lib.qlog_append1(h, ffi.from_buffer(payload), size)
            if seq < 0:
                self._append_error(seq, size)
        return seq

    def append_batch(self, payloads: Sequence[BytesLike], prefix: bytes = b"") -> int:
        """Append records as one atomic batch; returns the first one's number.

        The others follow densely.  After any crash either the whole batch
        is in the log or none of it is.  One call into C for the batch.
        ``prefix``, when given, is stored before every payload."""
        h = self._h
        if h is None:
            raise errors.LogClosedError(f"log {self.path!r} is closed")
        if not isinstance(payloads, (list, tuple)):
            payloads = list(payloads)
        n = len(payloads)
        if n == 0:
            raise ValueError("append_batch needs at least one record, got an empty batch")
        try:
            packed = _pack(payloads, prefix)
            if packed is not None:
                buf, lens = packed
            else:  # not all `bytes`: bytearray, memoryview, ...
                if prefix:
                    payloads = [prefix + bytes(p) for p in payloads]
                buf = b"".join(payloads)
                lens = array("I", [memoryview(p).nbytes for p in payloads]).tobytes()
        except OverflowError:
            big = max(memoryview(p).nbytes for p in payloads)
            raise errors.RecordTooLargeError(
                f"record of {big} bytes is larger than the limit of {MAX_RECORD} bytes"
            ) from None
        seq: int = lib.qlog_append(h, buf, ffi.from_buffer("uint32_t[]", lens), n)
        if seq < 0:
            self._append_error(seq, len(prefix) + max(memoryview(p).nbytes for p in payloads))
        return seq

    def _append_error(self, rc: int, size: int) -> NoReturn:
        if rc == lib.QLOG_EINVAL and size > MAX_RECORD:
            raise errors.RecordTooLargeError(
                f"record of {size} bytes is larger than the limit of {MAX_RECORD} bytes"
            )
        _raise(rc, f"append to {self.path!r} failed", self._h)  # None once closed: no errno

    def sync(self) -> None:
        """Make every record appended so far, by any process, durable.

        Returns after fdatasync."""
        h = self._handle()
        rc = lib.qlog_sync(h)
        if rc:
            _raise(rc, f"sync of {self.path!r} failed", h)

    def _flush_loop(self) -> None:
        # Idle, it sleeps until an append (by any process) makes the log
        # dirty, then syncs flush_interval later: no wake-ups while nothing
        # is written.
        h = self._h
        while h is not None:
            gen = lib.qlog_notify_gen(h)
            if self._stop.is_set():
                return
            if not lib.qlog_dirty(h):
                lib.qlog_wait_gen(h, gen, -1)  # close() pokes
                continue
            if self._stop.wait(self.flush_interval):
                return  # close() syncs
            if lib.qlog_dirty(h):
                # An error here is not lost: the log is poisoned and the
                # next append raises it.
                lib.qlog_sync(h)

    # -- reading ---------------------------------------------------------

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

        ``unpack``, when given, is called instead with the read's buffers
        ``(data, seqs, offsets, n)`` (as ``qlog_read`` fills them) and its
        result returned; it is not called when nothing was read."""
        self._check()
        if from_seq < 0:
            raise ValueError(f"from_seq must be >= 0, got {from_seq}")
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        with self._read_lock:
            h = self._h
            if h is None:
                raise errors.LogClosedError(f"log {self.path!r} is closed")
            if self._rmax < max_records:
                self._rmax = max_records
                self._rseqs = _alloc("uint64_t[]", max_records)
                self._roffs = _alloc("uint64_t[]", max_records + 1)
            if self._rbuf is None:
                self._rcap = min(max_bytes, 1 << 20)
                self._rbuf = _alloc("char[]", self._rcap)
            while True:
                n = lib.qlog_read(
                    h, from_seq, max_records, max_bytes, self._rbuf, self._rcap,
                    self._rseqs, self._roffs, self._needed,
                )
                needed = self._needed[0]
                if needed and (n == lib.QLOG_EBUFFER or (0 <= n < max_records)):
                    # The buffer, not a limit, cut the read short: grow it
                    # (it is kept for later reads) and read again.
                    self._rcap = max(needed, min(max_bytes, self._rcap * 4))
                    self._rbuf = _alloc("char[]", self._rcap)
                    continue
                break
            if n < 0:
                _raise(n, f"read of {self.path!r} failed", h)
            if n == 0:
                return []
            return (unpack or _unpack)(
                ffi.buffer(self._rbuf, self._rcap),
                ffi.buffer(self._rseqs, 8 * n),
                ffi.buffer(self._roffs, 8 * (n + 1)),
                n,
            )

    def wait(self, seq: int, timeout: Optional[float] = None) -> bool:
        """Block until a record with sequence number >= ``seq`` exists (appended
        by any process), or ``timeout`` seconds pass.  Returns whether one does.
        Sleeps on a futex: no polling."""
        self._check()
        # Rounded up: a wait that ended a fraction of a millisecond early
        # would be followed by a zero-length one, a spin.
        ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
        h = self._h
        if h is None:
            raise errors.LogClosedError(f"log {self.path!r} is closed")
        rc = lib.qlog_wait(h, seq, ms)
        if rc < 0:
            _raise(rc, f"wait on {self.path!r} ended")
        return bool(rc)

    def notify_gen(self) -> int:
        """The change counter that every append (by any process) and every
        :meth:`poke` bumps; pass it to :meth:`wait_change`."""
        gen: int = lib.qlog_notify_gen(self._handle())
        return gen

    def poke(self) -> None:
        """Bump the change counter and wake every :meth:`wait_change` caller,
        in every process."""
        lib.qlog_poke(self._handle())

    def wait_change(self, gen: int, timeout: Optional[float] = None) -> bool:
        """Block until the change counter differs from ``gen`` (an append or a
        :meth:`poke` by any process) or ``timeout`` seconds pass.  Returns
        whether it changed.  Sleeps on a futex: no polling."""
        # Rounded up: a wait that ended a fraction of a millisecond early
        # would be followed by a zero-length one, a spin.
        ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
        rc = lib.qlog_wait_gen(self._handle(), gen, ms)
        if rc < 0:
            _raise(rc, f"wait on {self.path!r} ended")
        return bool(rc)

    # -- space -----------------------------------------------------------

    def truncate_before(self, seq: int) -> int:
        """Delete whole sealed segments whose records all lie below ``seq``.

        Oldest first, so a crash part-way leaves a shorter log, never a
        hole.  Returns how many segments were deleted."""
        h = self._handle()
        rc: int = lib.qlog_truncate_before(h, seq)
        if rc < 0:
            _raise(rc, f"truncate_before({seq}) on {self.path!r} failed", h)
        return rc

    # -- state -----------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """The lowest record number still in the log (records below it were
        given back by :meth:`truncate_before`); ``next_seq`` when empty."""
        return self.stats().first_seq

    @property
    def next_seq(self) -> int:
        """The number the next append gets (read without a lock or a system
        call; other processes may append at any time)."""
        n: int = lib.qlog_next_seq(self._handle())
        if n < 0:
            _raise(n, f"next_seq of {self.path!r}")
        return n

    def stats(self) -> LogStats:
        """A snapshot of this log's counters (:class:`qlog.LogStats`): record
        numbers, segments, fsyncs and appends made by this handle, damage
        skipped and torn bytes dropped at open."""
        self._check()
        st = ffi.new("qlog_stats *")
        rc = lib.qlog_get_stats(self._handle(), st)
        if rc:
            _raise(rc, "stats failed")
        return LogStats(
            first_seq=st.first_seq,
            next_seq=st.next_seq,
            synced_seq=st.synced_seq,
            segments=st.segments,
            corrupt_records=st.corrupt_records,
            recovered_bytes_dropped=st.recovered_bytes_dropped,
            recovered_records_dropped=st.recovered_records_dropped,
            fsyncs=st.fsyncs,
            appends=st.appends,
            poisoned=bool(st.poisoned),
        )

    def verify(self, *, max_damage: int = 1000) -> VerifyReport:
        """Check the CRC of every record of every segment; report the damage.

        Read-only: damaged records stay where they are (readers skip them)."""
        self._check()
        out = ffi.new("qlog_damage[]", max_damage)
        recs = ffi.new("uint64_t *")
        h = self._handle()
        rc = lib.qlog_verify(h, out, max_damage, recs)
        if rc < 0:
            _raise(rc, f"verify of {self.path!r} failed", h)
        damage = [
            Damage(
                segment=out[i].segment_base,
                offset=out[i].offset,
                length=out[i].length,
                after_seq=out[i].after_seq if out[i].after_seq else None,
                kind=_DAMAGE_KINDS.get(out[i].kind, "unknown"),
            )
            for i in range(min(rc, max_damage))
        ]
        return VerifyReport(records=recs[0], damage=damage)

    # -- lifetime --------------------------------------------------------

    def _check(self) -> None:
        self._handle()

    def _handle(self) -> Any:
        h = self._h
        if h is None:
            raise errors.LogClosedError(f"log {self.path!r} is closed")
        return h

    def close(self) -> None:
        """Close the handle ("interval" logs are synced first).  Idempotent."""
        h = self._h
        if h is None:
            return
        self._stop.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            lib.qlog_poke(h)  # wake the flusher from its wait for an append
            self._flusher.join()
        with self._read_lock:
            self._h = None
            rc = lib.qlog_close(h)
        if rc:
            _raise(rc, f"close of {self.path!r} failed")

    def __repr__(self) -> str:
        state = "closed" if self._h is None else "open"
        return f"<qlog.Log {self.path!r} durability={self.durability!r} {state}>"
