"""Which log engine ``qlog`` uses: the C engine or the pure-Python one.

``ENGINE`` is ``"c"`` when the compiled modules (``qlog._log._qlog_c``,
``qlog._log._glue``) import, and ``"pure"`` when they do not or when the
environment has ``QLOG_PURE=1``; compiled modules built from other sources
than this qlog's (their build id, ``_buildid.py``, differs) are an
ImportError, not the pure engine.  The queue layer takes ``Log`` and its
batch helpers (``pack``, ``unpack``, ``scan_messages``, ``ids``,
``MessageBase``, ``append1``) from here.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from . import _buildid

__all__ = ["ENGINE", "Log", "pack", "unpack", "scan_messages", "ids", "MessageBase", "append1"]


def _want_pure() -> bool:
    return os.environ.get("QLOG_PURE", "") not in ("", "0")


def _find_compiled() -> None:
    """Imported from a source checkout (the current directory comes first on
    sys.path, e.g. ``python -c`` at the top of the tree) after a plain ``pip
    install .``: the compiled modules live in the installed copy.  Let this
    package find them there."""
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(here)), "csrc", "qlog.h")):
        return  # an installed copy: it never borrows another install's modules
    for entry in sys.path:
        cand = os.path.join(entry or ".", "qlog", "_log")
        if os.path.abspath(cand) != here and os.path.isdir(cand) and any(
            f.startswith("_qlog_c") for f in os.listdir(cand)
        ):
            __path__.append(cand)
            return


if TYPE_CHECKING:  # pragma: no cover
    from .purelog import Log as _PureLog


def _check_build() -> None:
    """Raise ``_buildid.BuildMismatchError`` unless both compiled modules
    carry this qlog's build id (a module built before build ids has none)."""
    from . import _glue, _qlog_c

    lib = _qlog_c.lib
    c_id = _qlog_c.ffi.string(lib.qlog_build_id()).decode() if hasattr(lib, "qlog_build_id") else None
    _buildid.check({
        "qlog._log._qlog_c": (c_id, _qlog_c.__file__),
        "qlog._log._glue": (getattr(_glue, "BUILD_ID", None), _glue.__file__),
    })


# Compiled modules that import are checked against the build id (_buildid.py):
# ones of another build raise BuildMismatchError out of `import qlog`, never
# the pure engine in their place.  Compiled modules that are absent (a
# QLOG_NO_COMPILE=1 install, a checkout not built yet) leave the pure engine,
# as before, with nothing to check.  QLOG_PURE=1 imports no compiled module
# here, so none is checked (the durable writes of files.py then make plain
# system calls, and the local backend's NFS pre-check is the pure engine's).
ENGINE = "pure" if _want_pure() else "c"
if ENGINE == "c":
    try:
        try:
            from . import _glue as _glue, _qlog_c as _qlog_c  # (the compiled modules)
        except ImportError:  # pragma: no cover - depends on how Python was started
            _find_compiled()
        if TYPE_CHECKING:  # pragma: no cover
            # The compiled _glue is untyped: its names get the types of their
            # pure-Python equivalents (the same contract, csrc/pyglue.c).
            from .pureglue import MessageBase, ids, pack, scan_messages, unpack
        else:
            from ._glue import MessageBase, ids, pack, scan_messages, unpack
        _check_build()
        from .clog import Log
        from ._qlog_c import lib as _lib
    except _buildid.BuildMismatchError:
        raise
    except ImportError:
        ENGINE = "pure"
    else:
        append1 = _lib.qlog_append1
        """``append1(handle, payload, size)``: the C engine's one-record append
        (a sequence number, or an error code below 0 for ``Log._append_error``)."""

if ENGINE == "pure":
    # For mypy, Log stays the C engine's class (a name holds one class): this
    # one has the same API.
    from .pureglue import MessageBase, ids, pack, scan_messages, unpack  # noqa: F811
    from .purelog import Log  # type: ignore[assignment]  # noqa: F811

    def append1(h: _PureLog, payload: bytes, size: int) -> int:  # noqa: F811
        """``append1(handle, payload, size)``: ``h.append(payload)`` (it raises
        on failure, so the result is never below 0)."""
        return h.append(payload)
