"""Shared fixtures: fresh log directories, waiting on conditions, child interpreters."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time
from typing import Callable, Sequence

import pytest
from _crashkit import child_env

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
