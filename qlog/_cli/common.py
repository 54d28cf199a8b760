"""What every ``qlog`` command shares: exit statuses and the two errors
that pick them, argument types with their limits in the message, finding
an existing data directory and queue without creating either, and the
output helpers (plurals, tables, ages, a progress bar)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, List, Mapping, Optional, Sequence, TextIO

from .._local.backend import FORMAT_FILE
from .._queue import Broker, Queue
from .._queue import open as open_broker
from .._settings import check_name, plural
from ..errors import InvalidQueueNameError

__all__ = [
    "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "UsageError", "Failed", "int_in", "seconds_in",
    "queue_name", "data_dir", "open_existing", "open_broker", "existing_queue", "plural",
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


def data_dir(path: str) -> str:
    """``path`` when it is a data directory; UsageError otherwise.  Reads only."""
    if not os.path.exists(path):
        raise UsageError(f"data directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"data directory {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, FORMAT_FILE)):
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
    """A progress bar on stderr, ``[#####.....] 50/100``, redrawn in place
    when stderr is a terminal; nothing at all when it is not."""

    WIDTH = 30

    def __init__(self, total: int, stream: Optional[TextIO] = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.live = isatty(self.stream)
        self.shown = False
        self.update(0)

    def update(self, done: int) -> None:
        if not self.live:
            return
        total = max(self.total, done)
        filled = self.WIDTH if total == 0 else self.WIDTH * done // total
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total}")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


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
