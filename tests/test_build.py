"""The C code builds warning-free with -Wall -Wextra (as -Werror here), and
the compiled modules carry the build id of the sources they were built from
(qlog/_log/_buildid.py), which ``import qlog`` checks."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
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


# ---- the build id -------------------------------------------------------------


def _buildid_of(root: pathlib.Path = ROOT):  # type: ignore[no-untyped-def]
    """The tree's qlog/_log/_buildid.py (the checkout's by default), loaded by
    path: the installed copy the tests may import has no csrc/ beside it to
    compute an id from."""
    spec = importlib.util.spec_from_file_location("_tree_buildid", root / "qlog" / "_log" / "_buildid.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _c_build_id(qlog_c) -> str:  # type: ignore[no-untyped-def]
    return qlog_c.ffi.string(qlog_c.lib.qlog_build_id()).decode()


def test_the_compiled_modules_carry_the_checkouts_build_id() -> None:
    try:
        from qlog._log import _glue, _qlog_c
    except ImportError:
        pytest.skip("the compiled modules (qlog._log._qlog_c, qlog._log._glue) are not built")
    bid = _buildid_of()
    want = bid.source_id()
    assert len(want) == 16 and int(want, 16) >= 0
    assert _c_build_id(_qlog_c) == want
    assert _glue.BUILD_ID == want
    # the stamp the build wrote beside them (what an installed copy checks against)
    assert bid.stamped_id(os.path.dirname(_glue.__file__)) == want


IDS = """
import json, sys
try:
    import qlog
except ImportError as e:
    print(json.dumps({"import_error": str(e), "type": type(e).__name__}))
    sys.exit(3)
out = {"file": qlog.__file__, "engine": qlog.ENGINE}
if qlog.ENGINE == "c":
    from qlog._log import _buildid, _glue, _qlog_c
    out.update(glue=_glue.BUILD_ID, c=_qlog_c.ffi.string(_qlog_c.lib.qlog_build_id()).decode(),
               source=_buildid.source_id(), stamp=_buildid.stamped_id())
print(json.dumps(out))
"""


def _import_from(src: pathlib.Path, **env: str) -> dict:
    """What ``import qlog`` gives a child interpreter that takes qlog from the
    tree ``src`` (PYTHONPATH; run from its parent, which holds no qlog)."""
    e = {k: v for k, v in os.environ.items() if k not in ("QLOG_PURE", "PYTHONPATH")}
    e.update(PYTHONPATH=str(src), **env)
    r = subprocess.run([sys.executable, "-c", IDS], cwd=src.parent, env=e, capture_output=True, check=False,
                       text=True, timeout=120)
    assert r.returncode in (0, 3) and r.stdout, r.stderr[-3000:]
    out = json.loads(r.stdout)
    if "file" in out:
        assert out["file"] == str(src / "qlog" / "__init__.py"), out
    return out


def _build_in_place(src: pathlib.Path) -> None:
    # --force: compile every source again, whatever the timestamps say (an
    # edit in the same clock tick as the last build would look older).
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--force"], cwd=src, check=False,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def built_copy(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A copy of the source tree without its compiled modules, built in place
    (once for this module's tests)."""
    src = tmp_path_factory.mktemp("buildid") / "src"
    skip = shutil.ignore_patterns("*.so", "__pycache__", "_buildid.txt")
    for name in ("csrc", "qlog"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _build_in_place(src)
    return src


@pytest.mark.slow
def test_the_build_stamps_its_id_into_both_modules_and_the_stamp_file(built_copy: pathlib.Path) -> None:
    out = _import_from(built_copy)
    assert out["engine"] == "c"
    assert out["c"] == out["glue"] == out["source"] == out["stamp"]
    assert (built_copy / "qlog" / "_log" / "_buildid.txt").read_text().strip() == out["source"]


@pytest.mark.slow
def test_modules_built_from_other_sources_are_refused_at_import_until_rebuilt(built_copy: pathlib.Path) -> None:
    built = _import_from(built_copy)["c"]
    # Change one byte inside the first comment of a C source of the engine only
    # (pyglue.c is untouched: the rebuild must still restamp _glue).
    c = built_copy / "csrc" / "crc32c.c"
    data = bytearray(c.read_bytes())
    i = data.index(b"/*") + 2
    assert data.index(b"*/", i) > i, "the first comment of crc32c.c is empty"
    data[i] = ord("#") if data[i] != ord("#") else ord("%")
    c.write_bytes(bytes(data))

    out = _import_from(built_copy)
    assert out.get("type") == "BuildMismatchError", out  # an ImportError (it caught it as one)
    # QLOG_PURE=1 imports no compiled module, so there is none to check
    assert _import_from(built_copy, QLOG_PURE="1")["engine"] == "pure"
    msg = out["import_error"]
    source = _buildid_of(built_copy).source_id()
    assert built in msg and source in msg and built != source, msg
    assert "python setup.py build_ext --inplace" in msg and "pip install ." in msg, msg

    _build_in_place(built_copy)
    out = _import_from(built_copy)
    assert out["engine"] == "c"
    assert out["c"] == out["glue"] == out["stamp"] == out["source"] == source
