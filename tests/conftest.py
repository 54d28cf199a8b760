"""Shared fixtures: fresh log directories, waiting on conditions, child interpreters."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time
from typing import Callable, Sequence

import pytest
from _crashkit import child_env

import qlog
from qlog._log import purelog as _purelog

try:
    from qlog._log import clog as _c_log
except ImportError:  # the compiled modules are missing: only the pure engine runs
    _c_log = None

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def log_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A fresh, empty directory for one log (it exists; ``qlog.Log`` fills it)."""
    d = tmp_path / "log"
    d.mkdir()
    return d


def _wait_until(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Return ``cond()``'s first truthy value; fail the test if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} did not hold within {timeout} s")
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


@pytest.fixture
def wait_until() -> Callable[..., object]:
    """``wait_until(cond, timeout=30.0, what="...")``: poll ``cond`` until it holds or fail at the deadline."""
    return _wait_until


def _run_python(code: str, args: Sequence[str] = (), timeout: float = 60.0,
                input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (``sys.argv[1:]`` = ``args``); return the finished process."""
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=child_env(), input=input,
    )


def _spawn_python(code: str, args: Sequence[str] = ()) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter with pipes on stdin/stdout/stderr (text, line-buffered)."""
    return subprocess.Popen(
        [sys.executable, "-u", "-c", code, *map(str, args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, bufsize=1, env=child_env(),
    )


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess]:
    """``run_python(code, args=(), timeout=60.0, input=None)``: a finished child interpreter."""
    return _run_python


@pytest.fixture
def spawn_python():
    """``spawn_python(code, args=())``: a running child interpreter; killed at teardown if still alive."""
    procs: list[subprocess.Popen] = []

    def spawn(code: str, args: Sequence[str] = ()) -> subprocess.Popen:
        p = _spawn_python(code, args)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass  # a pipe to a dead child


# ---- both engines -----------------------------------------------------------
#
# Every test of these modules runs twice, as [c] (the C engine) and [pure]
# (qlog/_log/purelog.py): `qlog.Log` is the engine under test, and child
# interpreters get QLOG_PURE to match.  A test that needs the C engine's
# internals (its syscall table, tests/_simvfs.py; its cffi handle) is marked
# `@pytest.mark.c_only("why")` and runs as [c] only; `@pytest.mark.engines("pure")`
# picks the engines explicitly (a cheaper variant of a slow test for one engine).

ENGINE_MODULES = {
    "test_log", "test_recovery", "test_recovery_more", "test_lifecycle", "test_crash",
    "test_property", "test_multiprocess", "test_memory", "test_format",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "c_only(reason): the test needs the C engine's internals; it runs as [c] only")
    config.addinivalue_line(
        "markers", "engines(*names): the engines (of 'c', 'pure') a test of an engine module runs against")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.rsplit(".", 1)[-1] not in ENGINE_MODULES:
        return
    engines = ["c", "pure"]
    only = metafunc.definition.get_closest_marker("engines")
    if only is not None:
        engines = list(only.args)
    if metafunc.definition.get_closest_marker("c_only"):
        engines = ["c"]
    if "engine" not in metafunc.fixturenames:
        metafunc.fixturenames.append("engine")
    metafunc.parametrize("engine", engines, indirect=True)


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The engine a test runs against: "c" or "pure" (from the test's parameter)."""
    return getattr(request, "param", "c")


@pytest.fixture(autouse=True)
def _engine_under_test(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or "engine" not in callspec.params:
        return
    which = callspec.params["engine"]
    if which == "pure":
        monkeypatch.setattr(qlog, "Log", _purelog.Log)
        monkeypatch.setenv("QLOG_PURE", "1")
    else:
        if _c_log is None:
            pytest.skip("the compiled modules (qlog._log._qlog_c, qlog._log._glue) are not built")
        monkeypatch.setattr(qlog, "Log", _c_log.Log)
        monkeypatch.delenv("QLOG_PURE", raising=False)
