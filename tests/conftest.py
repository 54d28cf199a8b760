"""Shared fixtures: fresh log directories, waiting on conditions, child
interpreters, a hand-moved clock, and a broker on every backend."""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence

import pytest
from _crashkit import child_env
from _pgcluster import free_port as free_port  # the tests' one free port

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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        _parametrize_backends(metafunc)
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


# ---- the clock ----------------------------------------------------------------

T0 = 1_700_000_000.0  # the hand clock's start; whole and half seconds from it are exact floats


class HandClock:
    """Seconds since the epoch, moved only by ``advance``: pass it as
    ``clock=`` to a broker and delays, leases and retention run on it."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> HandClock:
    """A fresh :class:`HandClock` at ``T0``; ``broker`` runs on it."""
    return HandClock()


def drain(q: qlog.Queue) -> List[qlog.Message]:
    """Pull and ack until nothing is visible; the messages delivered, in order."""
    out: List[qlog.Message] = []
    while True:
        batch = q.pull(batch_size=100)
        if not batch.messages:
            return out
        out += batch.messages
        batch.ack_all()


# ---- every backend ------------------------------------------------------------
#
# A queue semantics test asks for `broker` (a broker on a fresh store, on the
# `clock` fixture), `make_broker` (more brokers on the same store: a reopen, or
# another process's view) or `backend` (all of it, with `target` for child
# interpreters), and runs once per backend: [local-c] (the local backend on
# the C engine), [local-pure] (the same on qlog/_log/purelog.py).
#
# A backend is a name and a factory: given a scratch directory of the test's
# own, it returns a `Backend` whose store is fresh and empty.  A new backend
# (PostgreSQL: a fresh schema per test) is one more entry in BACKENDS.
#
# `@pytest.mark.local_only("why")` keeps a test on the local backends (it
# reads or damages the data directory's files, or reaches into the local
# backend's internals); such a test may ask for `data_dir`, the store's
# directory, and must open it only through `make_broker` so that every broker
# uses the engine under test.  `@pytest.mark.backends("local-c", ...)` picks
# backends explicitly (a slow test run on fewer of them).


class Backend:
    """One fresh store of one backend, for one test: every broker made opens
    the same queues, as a second process or a reopen would."""

    def __init__(self, name: str, target: str, opener: Callable[..., qlog.Broker],
                 env: Dict[str, Optional[str]], path: Optional[pathlib.Path] = None) -> None:
        self.name = name
        self.target = target
        """What ``qlog.open`` takes to reach this store, for a child
        interpreter (which gets ``env`` through the ``backend`` fixture)."""
        self.env = env
        """Environment variables a child needs to open ``target`` the same
        way (None: unset)."""
        self.path = path
        """The data directory (local backends); None elsewhere."""
        self._opener = opener
        self._brokers: List["weakref.ref[qlog.Broker]"] = []  # a test may drop one unclosed

    @property
    def local(self) -> bool:
        return self.path is not None

    def make_broker(self, *, clock: Optional[Callable[[], float]] = None, **kw: Any) -> qlog.Broker:
        """A new broker on this store (``clock`` default: the real time;
        ``kw``: ``qlog.open``'s other options); closed at teardown if the
        test does not close it."""
        b = self._opener(clock=clock, **kw)
        self._brokers.append(weakref.ref(b))
        return b

    def close(self) -> None:
        """Close every broker made and still alive (close is idempotent)."""
        for ref in self._brokers:
            b = ref()
            if b is not None:
                b.close()
        self._brokers.clear()

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, {self.target!r})"


def _local_backend(engine: str, scratch: pathlib.Path) -> Backend:
    """The local backend on ``engine`` ("c" or "pure"), in ``scratch``/data."""
    if engine == "c" and _c_log is None:
        pytest.skip("the compiled modules (qlog._log._qlog_c, qlog._log._glue) are not built")
    path = scratch / "data"
    return Backend(
        f"local-{engine}", str(path),
        functools.partial(qlog.open, path, engine=engine),
        # a child's plain qlog.open(target) picks the engine from QLOG_PURE
        env={"QLOG_PURE": "1" if engine == "pure" else None},
        path=path,
    )


_CLUSTER: List[Any] = []  # the session's PostgreSQL server, started when first needed


def pg_cluster() -> Any:
    """The session's throwaway PostgreSQL server (tests/_pgcluster.py),
    started on first use and stopped when the session ends."""
    if not _CLUSTER:
        from _pgcluster import Cluster

        _CLUSTER.append(Cluster())
    return _CLUSTER[0]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    while _CLUSTER:
        _CLUSTER.pop().destroy()


class _PgBackend(Backend):
    """A fresh schema of the session's server, dropped at teardown."""

    def close(self) -> None:
        super().close()
        import psycopg

        schema = self.target.rsplit("schema=", 1)[1]
        with psycopg.connect(pg_cluster().url, autocommit=True) as conn:
            for _ in range(50):  # a handler the test left running may still hold a lock
                try:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                    return
                except psycopg.errors.DeadlockDetected:
                    time.sleep(0.1)
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def pg_url(schema: Optional[str] = None) -> str:
    """A URL of the session's server with a fresh schema (``?schema=``)."""
    import secrets

    return f"{pg_cluster().url}?schema={schema or 't_' + secrets.token_hex(6)}"


def _postgres_backend(scratch: pathlib.Path) -> Backend:
    url = pg_url()
    return _PgBackend("postgresql", url, functools.partial(qlog.open, url), env={"QLOG_PURE": None})


BACKENDS: Dict[str, Callable[[pathlib.Path], Backend]] = {
    "local-c": functools.partial(_local_backend, "c"),
    "local-pure": functools.partial(_local_backend, "pure"),
    "postgresql": _postgres_backend,
}
LOCAL_BACKENDS = ("local-c", "local-pure")


def _parametrize_backends(metafunc: pytest.Metafunc) -> None:
    """Run the test once per backend its markers allow."""
    names = list(BACKENDS)
    local = metafunc.definition.get_closest_marker("local_only")
    if "data_dir" in metafunc.fixturenames and local is None:
        pytest.fail(f"{metafunc.definition.nodeid} uses data_dir (the local backend's files) "
                    "without @pytest.mark.local_only(reason)", pytrace=False)
    if local is not None:
        names = [n for n in names if n in LOCAL_BACKENDS]
    picked = metafunc.definition.get_closest_marker("backends")
    if picked is not None:
        unknown = set(picked.args) - set(BACKENDS)
        if unknown:
            pytest.fail(f"{metafunc.definition.nodeid}: unknown backend(s) {sorted(unknown)}, "
                        f"known: {sorted(BACKENDS)}", pytrace=False)
        names = [n for n in names if n in picked.args]
    metafunc.parametrize("backend_name", names, indirect=True)


@pytest.fixture
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend a test runs against (a key of BACKENDS, from its parameter)."""
    return request.param


@pytest.fixture
def backend(backend_name: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh store of the backend under test; its brokers close at teardown.
    Child interpreters started by the test get its ``env``."""
    b = BACKENDS[backend_name](tmp_path)
    for key, value in b.env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    yield b
    b.close()


@pytest.fixture
def make_broker(backend: Backend) -> Callable[..., qlog.Broker]:
    """``make_broker(clock=None, **kw)``: a new broker on the test's store."""
    return backend.make_broker


@pytest.fixture
def broker(make_broker: Callable[..., qlog.Broker], clock: HandClock) -> qlog.Broker:
    """A broker on a fresh store of the backend under test, on ``clock``."""
    return make_broker(clock=clock)


@pytest.fixture
def data_dir(backend: Backend) -> pathlib.Path:
    """The local store's data directory (not created until a broker opens
    it); only for tests marked ``local_only``."""
    assert backend.path is not None, f"{backend.name} has no data directory"
    return backend.path
