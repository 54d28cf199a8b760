"""Files written durably: one helper for every file qlog writes whole beside
its logs (checkpoints, queue identities, settings, markers, repaired
segments).

Every call goes through the engine's syscall table when the C engine is in
use (the same table the logs use, so that fault injection and the
power-cut traces reach these files too), and through plain system calls
without it."""

from __future__ import annotations

import errno
import os
from typing import Optional, Union

from .. import errors


class _OsCalls:
    """Plain system calls (the pure engine)."""

    open = staticmethod(os.open)
    close = staticmethod(os.close)
    fdatasync = staticmethod(os.fdatasync)
    fsync = staticmethod(os.fsync)
    rename = staticmethod(os.rename)
    link = staticmethod(os.link)
    unlink = staticmethod(os.unlink)

    @staticmethod
    def write_all(fd: int, data: Union[bytes, bytearray]) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


class _TableCalls:
    """The same calls through the C engine's syscall table, raising OSError."""

    def __init__(self) -> None:
        from ._qlog_c import ffi, lib

        self.ffi, self.t = ffi, ffi.new("qlog_vfs *")
        lib.qlog_vfs_get(self.t)  # read afresh: tests install other tables

    def _ok(self, r: int) -> int:
        if r < 0:
            e = self.ffi.errno or errno.EIO
            raise OSError(e, os.strerror(e))
        return r

    def open(self, path: str, flags: int, mode: int) -> int:
        return self._ok(self.t.open(os.fsencode(path), flags, mode))

    def close(self, fd: int) -> None:
        self.t.close(fd)

    def fdatasync(self, fd: int) -> None:
        self._ok(self.t.fdatasync(fd))

    def fsync(self, fd: int) -> None:
        self._ok(self.t.fsync(fd))

    def rename(self, a: str, b: str) -> None:
        self._ok(self.t.rename(os.fsencode(a), os.fsencode(b)))

    def link(self, a: str, b: str) -> None:
        self._ok(self.t.link(os.fsencode(a), os.fsencode(b)))

    def unlink(self, path: str) -> None:
        self._ok(self.t.unlink(os.fsencode(path)))

    def write_all(self, fd: int, data: Union[bytes, bytearray]) -> None:
        buf = self.ffi.from_buffer(data)
        off = 0
        while off < len(data):
            w = self._ok(self.t.pwrite(fd, buf + off, len(data) - off, off))
            if w == 0:  # a short write that wrote nothing: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            off += w


def _calls() -> Union[_OsCalls, _TableCalls]:
    """The calls to make: through the syscall table on the C engine, plain
    ones on the pure engine (which loads no compiled module: only the C
    engine's are checked against the build id)."""
    from . import ENGINE

    return _TableCalls() if ENGINE == "c" else _OsCalls()


def fsync_dir(path: str) -> None:
    """fsync directory ``path``: makes the names created, renamed or removed
    in it durable.  Raises OSError."""
    calls = _calls()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        calls.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: str, data: Union[bytes, bytearray], mode: int, *, exclusive: bool = False,
                    tmp: Optional[str] = None, exact_mode: bool = False) -> bool:
    """Make ``path`` hold ``data`` durably and atomically: a temporary file
    beside it (``tmp``, or a name of this process's) is written and synced,
    then renamed over ``path`` (with ``exclusive``: linked to ``path``, so
    that the first writer wins and an existing file is never replaced), then
    the directory is fsynced.  A power cut leaves the old contents or the
    new, never a torn file.  ``mode``: the permission bits of the new file,
    less the umask (``exact_mode``: whatever the umask, for a file that
    replaces one whose mode it keeps).

    Returns False when ``exclusive`` and ``path`` already existed (nothing
    changed).  Raises OSError; the temporary file is removed first, so
    nothing half-written stays."""
    if tmp is None:
        tmp = f"{path}.{os.getpid()}.{id(data):x}.tmp"
    calls = _calls()
    made = True
    try:
        fd = calls.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            if exact_mode:
                os.fchmod(fd, mode)
            calls.write_all(fd, data)
            # the contents (and the size: fdatasync covers what reading them
            # needs), before any name points at them
            calls.fdatasync(fd)
        finally:
            calls.close(fd)
        if exclusive:
            try:
                calls.link(tmp, path)
            except FileExistsError:
                made = False
            calls.unlink(tmp)
        else:
            calls.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(path) or ".")  # the new name
    return made


def write_durable(path: str, data: bytes, mode: int, *, exclusive: bool = False) -> bool:
    """:func:`replace_durably`, its failure raised as
    :class:`~qlog.DiskFullError` or :class:`~qlog.StorageError` naming the
    path (nothing half-written stays)."""
    try:
        return replace_durably(path, data, mode, exclusive=exclusive)
    except OSError as e:
        raise storage_error(e, f"cannot write {path} ({len(data)} bytes)") from None


def storage_error(e: OSError, what: str, then: str = "") -> errors.QlogError:
    """The error to raise for OSError ``e`` met doing ``what``: DiskFullError
    for a full disk, StorageError otherwise; ``then`` says what was kept."""
    code = e.errno or errno.EIO
    tail = f"; {then}" if then else ""
    if code == errno.ENOSPC:
        return errors.DiskFullError(code, f"{what}: no space left on device{tail}")
    return errors.StorageError(code, f"{what}: {os.strerror(code)}{tail}")
