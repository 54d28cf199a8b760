"""The release artifacts: an sdist that builds a wheel which installs and
runs the C engine (and checks its compiled modules against the build id stamp
it carries), and an install that compiles nothing (QLOG_NO_COMPILE=1) and runs
the pure engine."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

ROUNDTRIP = """
import os, sys, tempfile, qlog
assert qlog.__file__.startswith(os.path.join(sys.argv[1], "")), qlog.__file__   # the installed copy
b = qlog.open(tempfile.mkdtemp())
q = b.queue("jobs")
q.send({"n": 1})
batch = q.pull(1)
assert [m.body for m in batch.messages] == [{"n": 1}]
batch.ack_all()
print(qlog.ENGINE, qlog.__version__)
"""


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def install(what: pathlib.Path, target: pathlib.Path, tmp: pathlib.Path, **env: str) -> None:
    """pip-install ``what`` (no dependencies, nothing downloaded: this
    interpreter has cffi, crc32c and setuptools) into the directory ``target``."""
    e = {**os.environ, **env}
    e.pop("QLOG_PURE", None)
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(what)], cwd=tmp, env=e)


def installed_engine(target: pathlib.Path, tmp: pathlib.Path) -> str:
    e = {k: v for k, v in os.environ.items() if k != "QLOG_PURE"}
    e["PYTHONPATH"] = str(target)
    r = run([sys.executable, "-c", ROUNDTRIP, str(target)], cwd=tmp, env=e)
    return r.stdout.split()[0]


def checkout_build_id() -> str:
    """``source_id()`` of the checkout (its qlog/_log/_buildid.py, loaded by path)."""
    spec = importlib.util.spec_from_file_location("_checkout_buildid", ROOT / "qlog" / "_log" / "_buildid.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.source_id()


def version() -> str:
    ns: dict = {}
    exec((ROOT / "qlog" / "_version.py").read_text(), ns)
    return ns["__version__"]


@pytest.mark.slow
def test_sdist_builds_a_wheel_that_runs_the_c_engine(tmp_path):
    out = tmp_path / "dist"
    run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=ROOT)
    (sdist,) = out.glob("qlog-*.tar.gz")
    assert sdist.name == f"qlog-{version()}.tar.gz"
    with tarfile.open(sdist) as t:
        names = t.getnames()
        t.extractall(tmp_path / "src", filter="data")
    top = f"qlog-{version()}"
    for need in ("csrc/qlog.h", "csrc/log_internal.h", "csrc/format.h", "csrc/vfs.h",
                 "LICENSE", "qlog/py.typed", "docs/FORMAT.md"):
        assert f"{top}/{need}" in names, f"{need} is missing from the sdist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(out), str(tmp_path / "src" / top)], cwd=tmp_path)
    (wheel,) = out.glob("qlog-*.whl")
    install(wheel, tmp_path / "site", tmp_path)
    assert installed_engine(tmp_path / "site", tmp_path) == "c"
    # The wheel holds the build id stamp (the installed copy has no csrc/ to
    # compute one from): the checkout's id; a wrong one refuses the modules.
    assert not any(n.endswith("_buildid.txt") for n in names), "the sdist carries a build stamp"
    stamp = tmp_path / "site" / "qlog" / "_log" / "_buildid.txt"
    assert stamp.read_text().strip() == checkout_build_id()
    stamp.write_text("0123456789abcdef\n")
    e = {k: v for k, v in os.environ.items() if k != "QLOG_PURE"}
    e["PYTHONPATH"] = str(tmp_path / "site")
    r = subprocess.run([sys.executable, "-c", "import qlog"], cwd=tmp_path, env=e, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode != 0 and "BuildMismatchError" in r.stderr, r.stderr[-3000:]
    assert "0123456789abcdef" in r.stderr and checkout_build_id() in r.stderr and str(stamp) in r.stderr


@pytest.mark.slow
def test_no_compile_install_runs_the_pure_engine(tmp_path):
    # From a copy of the sdist's files, so the checkout's own compiled modules
    # cannot be picked up.
    out = tmp_path / "dist"
    run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=ROOT)
    (sdist,) = out.glob("qlog-*.tar.gz")
    with tarfile.open(sdist) as t:
        t.extractall(tmp_path / "src", filter="data")
    install(tmp_path / "src" / f"qlog-{version()}", tmp_path / "site", tmp_path, QLOG_NO_COMPILE="1")
    compiled = [f for f in os.listdir(tmp_path / "site" / "qlog" / "_log") if f.endswith(".so")]
    assert not compiled, f"QLOG_NO_COMPILE=1 installed compiled modules: {compiled}"
    assert installed_engine(tmp_path / "site", tmp_path) == "pure"
