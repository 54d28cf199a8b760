"""Small files written durably: one helper for every small file qlog keeps
beside its logs (checkpoints, queue identities, settings, markers)."""

from __future__ import annotations

import errno
import os

from .. import errors


def fsync_dir(path: str) -> None:
    """fsync directory ``path``: makes the names created, renamed or removed
    in it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str, data: bytes, mode: int, *, exclusive: bool = False) -> bool:
    """Make ``path`` hold ``data`` durably and atomically: a temporary file
    beside it is written and fsync'd, then renamed over ``path`` (with
    ``exclusive``: linked to ``path``, so that the first writer wins), then
    the directory is fsync'd.  A power cut leaves the old contents or the new,
    never a torn file.  Returns False when ``exclusive`` and ``path`` already
    existed (nothing changed).  Raises :class:`~qlog.DiskFullError` or
    :class:`~qlog.StorageError` naming the path; nothing half-written stays."""
    d = os.path.dirname(path) or "."
    tmp = f"{path}.{os.getpid()}.{id(data):x}.tmp"
    made = True
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # the contents, before any name points at them
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                made = False
            os.unlink(tmp)
        else:
            os.rename(tmp, path)
        fsync_dir(d)  # the new name
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        code = e.errno or errno.EIO
        if code == errno.ENOSPC:
            raise errors.DiskFullError(
                code, f"cannot write {path} ({len(data)} bytes): no space left on device"
            ) from None
        raise errors.StorageError(code, f"cannot write {path}: {os.strerror(code)}") from None
    return made
