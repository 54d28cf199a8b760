"""Builds the C engine (cffi) and the batch helpers (csrc/pyglue.c).

With QLOG_NO_COMPILE=1 in the environment nothing is compiled: the install
is pure Python and qlog runs on its pure-Python engine (same files, same
guarantees, slower)."""

import os

from setuptools import Extension, setup

if os.environ.get("QLOG_NO_COMPILE", "") not in ("", "0"):
    setup()
else:
    setup(
        cffi_modules=["qlog/_log/_build.py:ffibuilder"],
        ext_modules=[
            Extension(
                "qlog._log._glue",
                ["csrc/pyglue.c"],
                extra_compile_args=["-O2", "-Wall", "-Wextra"],
            )
        ],
    )
