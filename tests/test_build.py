"""The C code builds warning-free with -Wall -Wextra (as -Werror here)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENGINE = ["crc32c.c", "vfs.c", "format.c", "open.c", "append.c", "read.c"]


def _cc() -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "a C compiler is needed to install qlog, so the tests expect one too"
    return cc


@pytest.mark.parametrize("source", ENGINE + ["pyglue.c"])
def test_c_source_compiles_without_warnings(source: str, tmp_path: pathlib.Path) -> None:
    cmd = [_cc(), "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC",
           "-I", str(ROOT / "csrc"), "-c", str(ROOT / "csrc" / source),
           "-o", str(tmp_path / "out.o")]
    if source == "pyglue.c":
        cmd[1:1] = ["-I", sysconfig.get_paths()["include"]]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr
