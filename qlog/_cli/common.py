"""What every ``qlog`` command shares: exit statuses and the two errors
that pick them, argument types with their limits in the message, finding
an existing data directory and queue without creating either, and the
output helpers (plurals, tables, ages, a progress line on a terminal)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from typing import Any, Callable, List, Mapping, Optional, Sequence, TextIO

from .._local.backend import FORMAT_FILE
from .._queue import Broker, Queue
from .._pg.conn import is_target, redact
from .._queue import open as open_broker
from .._settings import check_name, plural
from ..errors import InvalidQueueNameError

__all__ = [
    "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "UsageError", "Failed", "int_in", "seconds_in",
    "queue_name", "is_data_dir", "data_dir", "local_dir", "where", "open_existing", "open_broker", "existing_queue", "plural",
    "isatty", "Progress", "age", "table", "missing_subcommand",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage: exit status 2, nothing written."""


class Failed(Exception):
    """The operation failed: exit status 1."""


# -- argument types ------------------------------------------------------------


def int_in(lo: int, hi: Optional[int]) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            limit = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
            raise argparse.ArgumentTypeError(f"must be an integer {limit}, got {text!r}")
        return value

    return parse


def seconds_in(lo: float, hi: Optional[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (value >= lo and (hi is None or value <= hi)):  # also refuses nan
            limit = f"from {lo:g} to {hi:g}" if hi is not None else f"of at least {lo:g}"
            raise argparse.ArgumentTypeError(f"must be a number of seconds {limit}, got {text!r}")
        return value

    return parse


# -- data directories and queues ---------------------------------------------


def queue_name(name: str, what: str = "queue name") -> str:
    try:
        return check_name(name, what)
    except InvalidQueueNameError as e:
        raise UsageError(str(e)) from None


def is_data_dir(path: str) -> bool:
    """Whether ``path`` holds qlog data (its format file), or is a database
    URL (whose schema ``qlog.open`` creates).  Reads only."""
    return is_target(path) or os.path.isfile(os.path.join(path, FORMAT_FILE))


def where(path: str) -> str:
    """``path`` as messages show it: a database URL without its password."""
    return redact(path) if is_target(path) else path


def local_dir(path: str, command: str) -> str:
    """:func:`data_dir` for commands that read the local files; a database
    URL is refused (UsageError)."""
    if is_target(path):
        raise UsageError(f"qlog {command} checks a data directory's files; {where(path)!r} is a "
                         "database (PostgreSQL checks its own data)")
    return data_dir(path)


def data_dir(path: str) -> str:
    """``path`` when it is a data directory or a database URL; UsageError
    otherwise.  Reads only."""
    if is_target(path):
        return path
    if not os.path.exists(path):
        raise UsageError(f"data directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"data directory {path!r} is not a directory")
    if not is_data_dir(path):
        raise UsageError(f"{path!r} holds no qlog data (it has no {FORMAT_FILE} file)")
    return path


def open_existing(path: str) -> Broker:
    """The broker of an existing data directory; UsageError (and nothing
    created) when ``path`` is not one."""
    return open_broker(data_dir(path))


def existing_queue(broker: Broker, name: str) -> Queue:
    """The queue ``name`` of ``broker``; UsageError (and nothing created)
    naming the queues there when it does not exist."""
    queue_name(name)
    names = broker.queues()
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise UsageError(f"no queue {name!r} in {broker.path!r} (its queues: {known})")
    return broker.queue(name)


# -- output ----------------------------------------------------------------------


def isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """A progress line on stderr, only when stderr is a terminal (nothing at
    all on a pipe or a file, so a script reads only the result).

    With a ``total`` it is a bar, ``[#####.....] 50/100 label 1.2s``; without
    one (an operation that reports nothing until it ends) a spinner,
    ``| label 1.2s``.  It is redrawn in place at most every ``INTERVAL``
    seconds, whatever the rate of :meth:`update` calls, and by a ticker
    thread in between, so the elapsed time moves while a long call runs.
    :meth:`finish` (or leaving the ``with`` block) draws the last state and
    ends the line: a bar stays on the terminal, a spinner is wiped.  Call it
    before printing the result."""

    WIDTH = 30
    INTERVAL = 0.1  # seconds between redraws: at most 10 a second
    SPIN = "|/-\\"

    def __init__(self, total: Optional[int], label: str = "", stream: Optional[TextIO] = None) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.live = isatty(self.stream)
        self.started = time.monotonic()
        self.drawn_at = -math.inf
        self.frames = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.ticker: Optional[threading.Thread] = None
        if self.live:
            self.columns = self.width_of(self.stream)
            self.draw(self.started)
            self.ticker = threading.Thread(target=self.tick, name="qlog-progress", daemon=True)
            self.ticker.start()

    @staticmethod
    def width_of(stream: TextIO) -> int:
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
        return columns if columns > 0 else 80

    def line(self, now: float) -> str:
        elapsed = f"{now - self.started:.1f}s"
        if self.total is None:
            text = f"{self.SPIN[self.frames % len(self.SPIN)]} {self.label} {elapsed}"
        else:
            total = max(self.total, self.done)
            filled = self.WIDTH if total == 0 else self.WIDTH * self.done // total
            bar = "#" * filled + "." * (self.WIDTH - filled)
            text = f"[{bar}] {self.done}/{total}" + (f" {self.label}" if self.label else "") + f" {elapsed}"
        return text[:self.columns - 1]

    def draw(self, now: float) -> None:
        """Redraw the line (the caller holds the lock, or no ticker runs)."""
        self.stream.write("\r" + self.line(now) + "\x1b[K")  # \x1b[K: wipe what a longer line left
        self.stream.flush()
        self.drawn_at = now
        self.frames += 1

    def update(self, done: int, label: Optional[str] = None) -> None:
        """Record progress (``done`` of ``total``; a new label); redrawn now
        unless the line was drawn less than ``INTERVAL`` seconds ago."""
        if not self.live:
            return
        with self.lock:
            self.done = done
            if label is not None:
                self.label = label
            now = time.monotonic()
            if not self.stopped.is_set() and now - self.drawn_at >= self.INTERVAL:
                self.draw(now)

    def tick(self) -> None:
        while not self.stopped.wait(self.INTERVAL / 2):
            with self.lock:
                now = time.monotonic()
                if not self.stopped.is_set() and now - self.drawn_at >= self.INTERVAL:
                    self.draw(now)

    def finish(self) -> None:
        if not self.live or self.stopped.is_set():
            return
        with self.lock:
            self.stopped.set()
        if self.ticker is not None:
            self.ticker.join()
        if self.total is None:
            self.stream.write("\r\x1b[K")
        else:
            self.draw(time.monotonic())
            self.stream.write("\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(header: Sequence[str], rows: List[List[str]], left: Sequence[bool]) -> str:
    """Columns two spaces apart; ``left[i]`` aligns column i left, else right."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(cells, widths, left)]
        return "  ".join(out).rstrip()

    return "\n".join([line(header)] + [line(r) for r in rows])


def yes_no(value: Any) -> str:
    return "yes" if value else "no"


def print_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[Sequence[str]],
               left: Sequence[str], shown: Mapping[str, Callable[[Any], str]]) -> None:
    """Print ``rows`` (dicts) as a table of ``columns`` ``(title, key)``:
    each cell through ``shown[key]`` where given, else ``-`` for None and
    ``str`` otherwise; the keys in ``left`` aligned left."""
    cells: List[List[str]] = []
    for row in rows:
        line = []
        for _title, key in columns:
            value = row[key]
            fmt = shown.get(key)
            line.append(fmt(value) if fmt is not None else "-" if value is None else str(value))
        cells.append(line)
    print(table([t for t, _k in columns], cells, [k in left for _t, k in columns]))


def missing_subcommand(parser: argparse.ArgumentParser) -> int:
    """A command group (``qlog``, ``qlog dlq``, ``qlog queues``) run
    without its command: its help, and exit status 2."""
    parser.print_help(sys.stderr)
    print(f"qlog: error: {parser.prog} needs a command", file=sys.stderr)
    return EXIT_USAGE
