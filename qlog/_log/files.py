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
from typing import Any, Optional, Tuple, Union

from .. import errors


def _syscall_table() -> Tuple[Any, Any]:
    """``(ffi, table)``: the engine's syscall table in use, read afresh (tests
    install others), or ``(None, None)`` on the pure engine (which loads no
    compiled module: only the C engine's are checked against the build id)."""
    from . import ENGINE

    if ENGINE != "c":
        return None, None
    from ._qlog_c import ffi, lib
    t = ffi.new("qlog_vfs *")
    lib.qlog_vfs_get(t)
    return ffi, t


def _failed(ffi: Any) -> OSError:
    e = ffi.errno or errno.EIO
    return OSError(e, os.strerror(e))


def _check(ffi: Any, r: int) -> int:
    if r < 0:
        raise _failed(ffi)
    return r


def fsync_dir(path: str) -> None:
    """fsync directory ``path``: makes the names created, renamed or removed
    in it durable.  Raises OSError."""
    ffi, t = _syscall_table()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if t is None:
            os.fsync(fd)
        else:
            _check(ffi, t.fsync(fd))
    finally:
        os.close(fd)


def _write_all(ffi: Any, t: Any, fd: int, data: Union[bytes, bytearray]) -> None:
    if t is None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return
    buf = ffi.from_buffer(data)
    off = 0
    while off < len(data):
        w = t.pwrite(fd, buf + off, len(data) - off, off)
        if w < 0:
            raise _failed(ffi)
        if w == 0:  # a short write that wrote nothing: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        off += w


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
    d = os.path.dirname(path) or "."
    if tmp is None:
        tmp = f"{path}.{os.getpid()}.{id(data):x}.tmp"
    ffi, t = _syscall_table()
    btmp, bpath = os.fsencode(tmp), os.fsencode(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    made = True
    try:
        fd = os.open(tmp, flags, mode) if t is None else _check(ffi, t.open(btmp, flags, mode))
        try:
            if exact_mode:
                os.fchmod(fd, mode)
            _write_all(ffi, t, fd, data)
            # the contents (and the size: fdatasync covers what reading them
            # needs), before any name points at them
            if t is None:
                os.fdatasync(fd)
            else:
                _check(ffi, t.fdatasync(fd))
        finally:
            if t is None:
                os.close(fd)
            else:
                t.close(fd)
        if exclusive:
            try:
                if t is None:
                    os.link(tmp, path)
                else:
                    _check(ffi, t.link(btmp, bpath))
            except FileExistsError:
                made = False
            if t is None:
                os.unlink(tmp)
            else:
                _check(ffi, t.unlink(btmp))
        elif t is None:
            os.rename(tmp, path)
        else:
            _check(ffi, t.rename(btmp, bpath))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(d)  # the new name
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
