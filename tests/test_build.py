"""The C code builds warning-free with -Wall -Wextra (as -Werror here)."""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _build_sources() -> list:
    """SOURCES of the checkout's qlog/_log/_build.py (read, not imported: the
    installed copy the tests import has no csrc/ beside it)."""
    tree = ast.parse((ROOT / "qlog" / "_log" / "_build.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SOURCES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("qlog/_log/_build.py defines no SOURCES")


ENGINE = _build_sources()


def test_every_engine_source_is_built() -> None:
    on_disk = {p.name for p in (ROOT / "csrc").glob("*.c")} - {"pyglue.c"}
    assert on_disk == set(ENGINE), "csrc/*.c and the cffi build's sources differ"


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
