"""Which log engine ``qlog`` uses: the C engine or the pure-Python one.

``ENGINE`` is ``"c"`` when the compiled modules (``qlog._qlog_c``,
``qlog._glue``) import, and ``"pure"`` when they do not or when the
environment has ``QLOG_PURE=1``.  The queue layer takes ``Log`` and its
batch helpers (``pack``, ``unpack``, ``scan_messages``, ``ids``,
``MessageBase``, ``append1``) from here.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ENGINE", "Log", "pack", "unpack", "scan_messages", "ids", "MessageBase", "append1"]


def _want_pure() -> bool:
    return os.environ.get("QLOG_PURE", "") not in ("", "0")


ENGINE = "pure" if _want_pure() else "c"
if ENGINE == "c":
    try:
        from ._glue import MessageBase, ids, pack, scan_messages, unpack
        from ._log import Log
        from ._qlog_c import lib as _lib
    except ImportError:
        ENGINE = "pure"
    else:
        append1 = _lib.qlog_append1
        """``append1(handle, payload, size)``: the C engine's one-record append
        (a sequence number, or an error code below 0 for ``Log._append_error``)."""

if ENGINE == "pure":
    from ._pureglue import MessageBase, ids, pack, scan_messages, unpack  # noqa: F811
    from ._purelog import Log  # noqa: F811

    def append1(h: Any, payload: bytes, size: int) -> int:  # noqa: F811
        """``append1(handle, payload, size)``: ``h.append(payload)`` (it raises
        on failure, so the result is never below 0)."""
        return h.append(payload)
