"""cffi builder for the C engine in csrc/ (API mode, compiled by ``pip install``).

The declarations are read from ``csrc/qlog.h`` itself (the part between the
cdef markers), so they cannot drift from the C.  The ``extern "Python"``
entries let the tests install a syscall table written in Python; the package
itself never installs one.
"""

from __future__ import annotations

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")
SOURCES = ["crc32c.c", "vfs.c", "format.c", "segment.c", "open.c", "append.c", "read.c"]


def _cdef_from_header() -> str:
    with open(os.path.join(CSRC, "qlog.h"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"/\* cdef-begin \*/(.*)/\* cdef-end \*/", text, re.S)
    if not m:
        raise RuntimeError("csrc/qlog.h has no cdef-begin/cdef-end markers")
    return m.group(1)


PY_SYSCALLS = """
extern "Python" {
    int     qlog_py_open(const char *path, int flags, int mode);
    int     qlog_py_close(int fd);
    int64_t qlog_py_pread(int fd, void *buf, size_t n, int64_t off);
    int64_t qlog_py_pwrite(int fd, const void *buf, size_t n, int64_t off);
    int     qlog_py_fdatasync(int fd);
    int     qlog_py_fsync(int fd);
    int     qlog_py_rename(const char *from, const char *to);
    int     qlog_py_unlink(const char *path);
    int     qlog_py_ftruncate(int fd, int64_t len);
    int     qlog_py_fallocate(int fd, int64_t off, int64_t len);
    int     qlog_py_boot_id(char *out, size_t n);
    int     qlog_py_writeback(int fd, int64_t off, int64_t len);
    int     qlog_py_fs_type(const char *path, int64_t *type);
    int     qlog_py_link(const char *from, const char *to);
}
"""

# The build id setup.py passes as QLOG_BUILD_ID (qlog/_log/_buildid.py); a
# build without it (``python _build.py``) gets "", which qlog refuses at import.
BUILD_ID_CDEF = """
const char *qlog_build_id(void);
"""
BUILD_ID_C = """
#ifndef QLOG_BUILD_ID
#define QLOG_BUILD_ID ""
#endif
const char *qlog_build_id(void) { return QLOG_BUILD_ID; }
"""

ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header() + PY_SYSCALLS + BUILD_ID_CDEF)
ffibuilder.set_source(
    "qlog._log._qlog_c",
    '#include "qlog.h"\n' + BUILD_ID_C,
    sources=[os.path.relpath(os.path.join(CSRC, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(CSRC)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fvisibility=hidden"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
