"""The build id: which sources the compiled modules were built from.

``source_id()`` is a digest of the C sources (``csrc/*.c``, ``csrc/*.h``,
``pyglue.c`` among them) and of the cffi builder (``qlog/_log/_build.py``).
``setup.py`` compiles it into both compiled modules (``QLOG_BUILD_ID``:
``_qlog_c.lib.qlog_build_id()`` and ``_glue.BUILD_ID``) and writes it to
``_buildid.txt`` beside them, because an installed copy has no ``csrc/`` to
compute it from.  At import, ``qlog/_log/__init__.py`` compares the modules'
ids with ``expected()``, so that modules built from other sources (another
commit, an edited ``csrc/`` not rebuilt) never load silently.

This module is also loaded by path from ``setup.py``: it imports nothing
from qlog.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")
STAMP = "_buildid.txt"
"""The file, beside the compiled modules, that the build writes the id to."""

FIX = "rebuild the compiled modules: `python setup.py build_ext --inplace` in a source checkout, or `pip install .` again"


class BuildMismatchError(ImportError):
    """A compiled module was built from other sources than this qlog's.

    An ImportError (it is one), but ``qlog._log`` does not take it for an
    absent compiled module: it is raised, never answered with the pure engine."""


def in_checkout() -> bool:
    """Whether this package sits in a source tree (``csrc/`` beside ``qlog/``)."""
    return os.path.isfile(os.path.join(CSRC, "qlog.h"))


def source_id() -> str:
    """16 hex digits of the sha256 of the build's sources, in name order
    (each as its name, its length and its bytes).  Needs the source tree."""
    import hashlib

    files = [(n, os.path.join(CSRC, n)) for n in sorted(os.listdir(CSRC)) if n.endswith((".c", ".h"))]
    files.append(("qlog/_log/_build.py", os.path.join(HERE, "_build.py")))
    parts = []
    for name, path in files:
        with open(path, "rb") as f:
            data = f.read()
        parts.append(b"%s\0%d\0%s" % (name.encode(), len(data), data))
    return hashlib.sha256(b"".join(parts)).hexdigest()[:16]


def stamped_id(directory: str = HERE) -> str | None:
    """The id the build wrote to ``directory``'s stamp file, or None without one."""
    try:
        with open(os.path.join(directory, STAMP), encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def expected() -> tuple[str | None, str]:
    """The id the compiled modules must carry, and where it comes from: the
    source tree's ``source_id()`` in a checkout (its own stamp may be stale:
    it is not read), else the installed copy's stamp (nothing is hashed)."""
    if in_checkout():
        return source_id(), f"computed from the sources in {os.path.dirname(CSRC)}"
    path = os.path.join(HERE, STAMP)
    return stamped_id(), f"read from {path}, written when qlog was installed"


def check(modules: dict[str, tuple[str | None, str]]) -> None:
    """Raise :class:`BuildMismatchError` unless every compiled module, given
    as ``{name: (its build id or None, its file)}``, carries ``expected()``."""
    want, source = expected()
    for name, (got, path) in modules.items():
        if want is not None and got == want:
            continue
        mine = f"this qlog's is {want} ({source})" if want is not None else (
            f"this qlog has none: no {os.path.join(HERE, STAMP)} (not installed by its setup.py)")
        raise BuildMismatchError(
            f"{name} ({path}) was built from other sources than this qlog: its build id is "
            f"{got or 'none'}, {mine}; {FIX}",
            name=name,
            path=path,
        )
