"""``qlog worker``: run an application's consumers in this process, or in
N processes under a supervisor that forwards stop signals and restarts a
worker that dies."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from typing import Any, Dict

from .._queue import Broker
from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Failed, UsageError, int_in, plural, seconds_in

logger = logging.getLogger("qlog.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
RESTART_BACKOFF = 0.5  # seconds before a worker that exited is replaced, doubled per failed start
RESTART_BACKOFF_MAX = 30.0
STARTUP_GRACE = 10.0  # a worker that exits sooner than this after starting failed to start
STARTUP_FAILURES = 5  # failed starts in a row of one worker slot: the supervisor gives up
_SUPERVISOR_ENV = "QLOG_SUPERVISOR_PID"


def add_worker(sub: Any) -> None:
    """``qlog worker TARGET``"""
    w = sub.add_parser(
        "worker", help="run the consumers of an application's broker",
        description="Import TARGET ('module:attribute', the module looked up from the current "
        "directory first) and run the consumers registered on that qlog.Broker until SIGTERM or "
        "SIGINT. The first signal stops taking batches and lets running handlers finish (up to "
        "--shutdown-timeout); a second exits at once.",
    )
    w.add_argument("target", metavar="TARGET", help="module:attribute of a qlog.Broker, e.g. app:broker")
    w.add_argument("--processes", type=int_in(1, 1024), default=1, metavar="N",
                   help="run N worker processes under a supervisor that restarts any that dies "
                   "(default 1: this process is the worker)")
    w.add_argument("--shutdown-timeout", type=seconds_in(0, None), default=30.0, metavar="S",
                   help="seconds to wait for running handlers after a stop signal (default 30)")
    w.add_argument("--create", action="store_true",
                   help="consume even when the data directory holds none of the queues yet (they are created empty)")
    w.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=None, metavar="LEVEL",
                   help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default: the application's logging "
                   "configuration, else INFO)")
    w.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="text lines, or JSON lines (one object per record: time, level, logger, "
                   "message, process, exception); default: the application's, else text")
    w.set_defaults(func=cmd_worker)


# -- running -----------------------------------------------------------------------


def load_target(target: str) -> Broker:
    """The broker named by ``module:attribute`` (the module imported with
    the current directory first on sys.path); UsageError when it is not
    one with consumers."""
    mod_name, sep, attr = target.rpartition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(f"worker target {target!r} must be 'module:attribute' or 'file.py:attribute', "
                         "e.g. 'app:broker' or './app.py:broker'")
    cwd = os.getcwd()
    if mod_name.endswith(".py") or os.sep in mod_name:
        # A file: its directory goes first on sys.path, its stem is the module.
        path = os.path.abspath(mod_name)
        if not os.path.isfile(path):
            raise UsageError(f"worker target {target!r}: no file {path}")
        cwd = os.path.dirname(path)
        mod_name = os.path.splitext(os.path.basename(path))[0]
        sys.path.insert(0, cwd)
    elif not sys.path or os.path.abspath(sys.path[0] or ".") != cwd:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise UsageError(
                f"cannot import {mod_name!r} of worker target {target!r}: no module named "
                f"{e.name!r} in {cwd} or on sys.path"
            ) from None
        traceback.print_exc()
        raise Failed(f"importing {mod_name!r} failed: {e}") from None
    except Exception as e:  # the application's own code raised
        traceback.print_exc()
        raise Failed(f"importing {mod_name!r} failed: {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {mod_name!r} has no attribute {attr!r} (worker target {target!r})") from None
    if not isinstance(obj, Broker):
        raise UsageError(
            f"worker target {target!r} is {_a(type(obj).__name__)}, not a qlog.Broker: point it at "
            "what qlog.open() returned"
        )
    # A broker without consumers is bad usage (exit 2), found before anything runs.
    if not obj.consumers:
        raise UsageError(
            f"the broker {target!r} has no consumers: decorate a function with @broker.consumer(queue)"
        )
    return obj


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "an int", "a function"."""
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def check_queues_exist(broker: Broker, target: str, create: bool) -> None:
    """Refuse to consume from a data directory that holds none of the
    consumed queues (started from the wrong directory, a relative path
    points at a new, empty one), unless ``create``."""
    where = broker.path if broker.engine == "postgresql" else os.path.abspath(broker.path)
    existing = set(broker.queues())
    if create or any(name in existing for name in broker.consumers):
        return
    raise UsageError(
        f"none of the queues {', '.join(broker.consumers)} of {target!r} exists in the data directory "
        f"{where} (the current directory is {os.getcwd()}); start the worker where the app's data "
        f"lives, create the queues (qlog queues create {where} NAME, or broker.create_queue() in the "
        "app), or pass --create to create them empty"
    )


def _watch_supervisor(broker: Broker) -> None:
    """A worker started by ``--processes`` runs in a session of its own (so
    a terminal's Ctrl-C reaches it once, through the supervisor); should the
    supervisor die without stopping it, it stops by itself."""
    value = os.environ.pop(_SUPERVISOR_ENV, None)
    if not value or not value.isdigit():
        return
    parent = int(value)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        logger.warning("the supervisor (pid %d) is gone: stopping", parent)
        while True:  # until run() has started and stops
            broker.stop()
            time.sleep(1.0)

    threading.Thread(target=watch, name="qlog-supervisor-watch", daemon=True).start()


class JsonLines(logging.Formatter):
    """One JSON object per log record."""

    def format(self, record: logging.LogRecord) -> str:
        doc: Dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(args: argparse.Namespace) -> None:
    """Log to stderr, unless the application configured logging itself
    (root handlers in place after its import): then its handlers, format
    and level stay, but for what --log-level and --log-format ask."""
    root = logging.getLogger()
    fmt = JsonLines() if args.log_format == "json" else logging.Formatter(LOG_FORMAT)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(fmt)
        root.addHandler(handler)
        root.setLevel(args.log_level or "INFO")
        return
    if args.log_format is not None:
        for h in root.handlers:
            h.setFormatter(fmt)
    if args.log_level is not None:
        root.setLevel(args.log_level)


def cmd_worker(args: argparse.Namespace) -> int:
    if args.processes > 1:
        setup_logging(args)
        return _Supervisor(args).run()
    broker = load_target(args.target)
    setup_logging(args)
    check_queues_exist(broker, args.target, args.create)
    logger.info("qlog worker: %s %s, engine %s, queues %s",
                *(("database", broker.path) if broker.engine == "postgresql"
                  else ("data directory", os.path.abspath(broker.path))),
                broker.engine, ", ".join(broker.consumers))
    _watch_supervisor(broker)
    finished = broker.run(shutdown_timeout=args.shutdown_timeout, handle_signals=True)
    if not finished:
        # Handlers still running after the timeout: their threads could hold
        # the exit (or close()) up indefinitely.  Their messages come again
        # when the leases run out.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(EXIT_OK)
    broker.close()
    logger.info("stopped")
    return EXIT_OK


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


class _Supervisor:
    """``qlog worker --processes N``: N worker processes, restarted when one
    exits on its own, stopped together by SIGTERM or SIGINT (forwarded to
    them; a second signal kills them and exits at once)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.n = args.processes
        self.cmd = [
            sys.executable, "-m", "qlog", "worker", args.target, "--processes", "1",
            "--shutdown-timeout", repr(args.shutdown_timeout),
        ] + (["--create"] if args.create else []) + (["--log-level", args.log_level] if args.log_level else []) + (
            ["--log-format", args.log_format] if args.log_format else [])
        self.log = logging.getLogger("qlog.supervisor")
        self.children: Dict[int, subprocess.Popen[bytes]] = {}  # slot -> process
        self.restart_at: Dict[int, float] = {}  # slot -> monotonic time
        self.stopping = False
        self.stop_signal = 0
        self.failed = False  # a worker exited badly after the stop
        self.usage = False  # a worker refused its arguments: no restarts
        self.started_at: Dict[int, float] = {}  # slot -> monotonic time of its last start
        self.failed_starts: Dict[int, int] = {}  # slot -> failed starts in a row
        self.gave_up = ""  # why the supervisor stopped on its own

    def _start(self, slot: int) -> None:
        env = dict(os.environ)
        env[_SUPERVISOR_ENV] = str(os.getpid())
        p = subprocess.Popen(self.cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.children[slot] = p
        self.started_at[slot] = time.monotonic()
        self.log.info("started worker %d (pid %d)", slot + 1, p.pid)
        if self.stopping:  # a signal came while it was starting
            self._signal(p, self.stop_signal)

    def _signal(self, p: subprocess.Popen[bytes], signum: int) -> None:
        if p.returncode is None:
            try:
                os.kill(p.pid, signum)
            except ProcessLookupError:
                pass

    def _stop(self, signum: int) -> None:
        self.stopping = True
        self.stop_signal = signum
        self.restart_at.clear()
        for p in list(self.children.values()):
            self._signal(p, signum)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            for p in list(self.children.values()):
                self._signal(p, signal.SIGKILL)
            self.log.warning("second %s: killed the workers; exiting now", name)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(128 + signum)
        self.log.info("%s: stopping %s (send it again to kill them at once)", name,
                      plural(len(self.children), "worker"))
        self._stop(signum)

    def _reap(self) -> None:
        for slot, p in list(self.children.items()):
            rc = p.poll()
            if rc is None:
                continue
            del self.children[slot]
            if self.stopping:
                # Killed by the forwarded signal itself: it had not begun
                # consuming (its handlers were not yet installed).
                if rc in (0, -self.stop_signal) or (self.usage and rc == EXIT_USAGE):
                    self.log.info("worker %d (pid %d) stopped", slot + 1, p.pid)
                else:
                    self.failed = True
                    self.log.warning("worker %d (pid %d) %s while stopping", slot + 1, p.pid, _exit_text(rc))
            elif rc == EXIT_USAGE:
                self.usage = True
                self.log.error("worker %d (pid %d) exited with status 2 (bad usage, see above): "
                               "stopping the others", slot + 1, p.pid)
                self._stop(signal.SIGTERM)
            else:
                ran = time.monotonic() - self.started_at.get(slot, 0.0)
                fails = self.failed_starts[slot] = self.failed_starts.get(slot, 0) + 1 if ran < STARTUP_GRACE else 0
                if fails >= STARTUP_FAILURES:
                    self.gave_up = (f"worker {slot + 1} {_exit_text(rc)} within {STARTUP_GRACE:g} s of "
                                    f"starting, {fails} times in a row (its error is above): giving up")
                    self.log.error("%s; stopping the others", self.gave_up)
                    self._stop(signal.SIGTERM)
                    continue
                delay = min(RESTART_BACKOFF * 2 ** max(0, fails - 1), RESTART_BACKOFF_MAX)
                self.log.warning("worker %d (pid %d) %s; starting another in %g s", slot + 1, p.pid,
                                 _exit_text(rc), delay)
                self.restart_at[slot] = time.monotonic() + delay

    def run(self) -> int:
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        old_fd = signal.set_wakeup_fd(wfd)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda s, f: None)  # wakes select()
        try:
            self.log.info("supervising %d workers: %s", self.n, " ".join(self.cmd[1:]))
            for slot in range(self.n):
                self._start(slot)
            while True:
                self._reap()
                if self.stopping and not self.children:
                    break
                now = time.monotonic()
                for slot, at in sorted(self.restart_at.items()):
                    if at <= now and not self.stopping:
                        del self.restart_at[slot]
                        self._start(slot)
                timeout = 1.0  # a missed wake-up costs at most this
                if self.restart_at:
                    timeout = max(0.0, min(timeout, min(self.restart_at.values()) - now))
                select.select([rfd], [], [], timeout)
                try:
                    while os.read(rfd, 512):
                        pass
                except BlockingIOError:
                    pass
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_fd)
            os.close(rfd)
            os.close(wfd)
        if self.usage:
            return EXIT_USAGE
        if self.gave_up:
            raise Failed(self.gave_up)
        self.log.info("all workers stopped")
        return EXIT_FAILED if self.failed else EXIT_OK
