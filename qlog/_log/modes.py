"""The permission bits of the files and directories qlog creates."""

from __future__ import annotations

import os

class FileMode(int):
    """A file mode that shows itself in octal (``help()`` shows ``0o600``)."""

    def __repr__(self) -> str:
        return oct(self)


DEFAULT_FILE_MODE: int = FileMode(0o600)


def check_mode(mode: object, error: type = ValueError) -> int:
    """Return ``mode`` when it is a valid file mode for qlog's files; raise
    ``error`` (a ``ValueError`` subclass) naming the allowed range otherwise.

    Allowed: ``0o600`` to ``0o666`` with the owner's read and write bits
    set, and no execute, setuid, setgid or sticky bit."""
    if isinstance(mode, bool) or not isinstance(mode, int) or mode & ~0o666 or mode & 0o600 != 0o600:
        shown = oct(mode) if isinstance(mode, int) and not isinstance(mode, bool) else repr(mode)
        raise error(
            "mode must be a file mode from 0o600 to 0o666 with owner read and write and no "
            f"execute or special bits (directories get execute where read is set), got {shown}"
        )
    return mode


def dir_mode(mode: int) -> int:
    """The directory mode matching file mode ``mode``: execute wherever read is set."""
    return mode | ((mode & 0o444) >> 2)


def makedirs(path: str, mode: int) -> None:
    """Create directory ``path`` and any missing parents, each with
    ``dir_mode(mode)`` (less the umask); directories that exist are left
    as they are (never chmod'ed)."""
    parent = os.path.dirname(os.path.abspath(path))
    if parent != path and not os.path.isdir(parent):
        makedirs(parent, mode)
    try:
        os.mkdir(path, dir_mode(mode))
    except FileExistsError:
        if not os.path.isdir(path):
            raise
