"""The ``qlog`` command: run an application's consumers, and look after a
data directory from the shell.

::

    qlog worker app:broker [--processes N]      run the consumers of app.broker
    qlog send DIR QUEUE BODY                    send one message, print its id
    qlog stats DIR [--json]                     counts and rates of every queue
    qlog peek DIR QUEUE [-n N] [--json]         look at messages without leasing them
    qlog dlq redrive DIR DLQ [--to QUEUE]       move dead letters back to be consumed
    qlog verify DIR [QUEUE ...] [--json]        check every record, read-only
    qlog repair DIR [QUEUE ...] [--dry-run]     set damaged files aside, keep intact messages
    qlog pause DIR QUEUE / qlog resume DIR QUEUE
    qlog purge DIR QUEUE [--yes]                delete every message of a queue

Exit status: 0 success; 1 the operation failed (damage found, purge
aborted, an error while working); 2 bad usage (bad arguments, a data
directory or queue that does not exist), in which case nothing was written.

Commands that only read a directory never create it: they check for the
``qlog-format`` file first (``qlog.open`` would create the directory).
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, TextIO, Tuple

from .. import __version__
from .._local.check import Problem, QueueBusyError, lost_text, check_queue, queue_names, repair_queue
from .._message import CT_BYTES, CT_JSON, CT_PICKLE, CT_TEXT, Message
from .._local.backend import FORMAT_FILE as _FORMAT_FILE
from .._queue import Broker, Queue
from .._queue import open as _open_broker
from .._settings import MAX_DELAY, MAX_PULL_BATCH, check_name
from ..errors import InvalidQueueNameError, QlogError, QueueNotFoundError

logger = logging.getLogger("qlog.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
BODY_WIDTH = 60  # characters of a body shown in peek's table
RESTART_BACKOFF = 1.0  # seconds between a worker's exit and its replacement
_SUPERVISOR_ENV = "QLOG_SUPERVISOR_PID"


class UsageError(Exception):
    """Bad usage: exit status 2, nothing written."""


class Failed(Exception):
    """The operation failed: exit status 1."""


# -- argument parsing ------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one error line, ``qlog: error: ...``, naming the help to read."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"qlog: error: {message} (see '{self.prog} --help')\n")


def _int_in(lo: int, hi: Optional[int]) -> Callable[[str], int]:
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


def _seconds_in(lo: float, hi: Optional[float]) -> Callable[[str], float]:
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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qlog",
        description="Run qlog workers and look after a qlog data directory.",
        epilog="Exit status: 0 success, 1 the operation failed, 2 bad usage (nothing written).",
    )
    p.add_argument("--version", action="version", version=f"qlog {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    w = sub.add_parser(
        "worker", help="run the consumers of an application's broker",
        description="Import TARGET ('module:attribute', the module looked up from the current "
        "directory first) and run the consumers registered on that qlog.Broker until SIGTERM or "
        "SIGINT. The first signal stops taking batches and lets running handlers finish (up to "
        "--shutdown-timeout); a second exits at once.",
    )
    w.add_argument("target", metavar="TARGET", help="module:attribute of a qlog.Broker, e.g. app:broker")
    w.add_argument("--processes", type=_int_in(1, 1024), default=1, metavar="N",
                   help="run N worker processes under a supervisor that restarts any that dies "
                   "(default 1: this process is the worker)")
    w.add_argument("--shutdown-timeout", type=_seconds_in(0, None), default=30.0, metavar="S",
                   help="seconds to wait for running handlers after a stop signal (default 30)")
    w.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO", metavar="LEVEL",
                   help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL")
    w.set_defaults(func=cmd_worker)

    s = sub.add_parser(
        "send", help="send one message; prints its id",
        description="Send BODY to QUEUE in the data directory DIR (both created if missing).",
    )
    s.add_argument("dir", metavar="DIR")
    s.add_argument("queue", metavar="QUEUE")
    s.add_argument("body", metavar="BODY", help="the body; '-' reads it from stdin")
    s.add_argument("--content-type", choices=("json", "text", "bytes"), default="json",
                   help="json (default: BODY is parsed as JSON), text, or bytes")
    s.add_argument("--delay", type=_seconds_in(0, MAX_DELAY), default=None, metavar="SECONDS",
                   help=f"deliver after this many seconds (0 to {MAX_DELAY})")
    s.set_defaults(func=cmd_send)

    st = sub.add_parser(
        "stats", help="counts and rates of every queue",
        description="Per queue: backlog, in flight, delayed, dead-lettered, deleted, acked, "
        "expired, age of the oldest message, paused, and messages in and out per second "
        "measured over --interval.",
    )
    st.add_argument("dir", metavar="DIR")
    st.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    st.add_argument("--interval", type=_seconds_in(0, 3600), default=1.0, metavar="S",
                    help="seconds over which rates are measured (default 1; 0: no rates)")
    st.set_defaults(func=cmd_stats)

    pk = sub.add_parser(
        "peek", help="show messages without leasing them",
        description="Show up to N messages of QUEUE not yet done, oldest first, without leasing "
        "or changing them. Pickle bodies are never unpickled.",
    )
    pk.add_argument("dir", metavar="DIR")
    pk.add_argument("queue", metavar="QUEUE")
    pk.add_argument("-n", type=_int_in(1, MAX_PULL_BATCH), default=10, metavar="N",
                    help=f"how many messages (1 to {MAX_PULL_BATCH}, default 10)")
    pk.add_argument("--json", action="store_true", help="one JSON object, bodies in full")
    pk.set_defaults(func=cmd_peek)

    d = sub.add_parser("dlq", help="dead-letter queue tools (redrive)",
                       description="Dead-letter queue tools.")
    dsub = d.add_subparsers(dest="dlq_command", metavar="COMMAND")
    d.set_defaults(func=lambda args: _missing_subcommand(d))
    r = dsub.add_parser(
        "redrive", help="move dead letters back into a queue",
        description="Move the messages of the dead-letter queue DLQ back into QUEUE (--to), or "
        "each into the queue it failed in. Bodies are copied as stored (never decoded); a crash "
        "part way leaves duplicates, never a loss.",
    )
    r.add_argument("dir", metavar="DIR")
    r.add_argument("dlq", metavar="DLQ")
    r.add_argument("--to", metavar="QUEUE", help="the queue to move them to (default: where each failed)")
    r.add_argument("--limit", type=_int_in(1, None), default=None, metavar="N",
                   help="move at most N messages")
    r.add_argument("--create", action="store_true",
                   help="create a target queue that does not exist (without it, a typo is refused)")
    r.set_defaults(func=cmd_redrive)

    v = sub.add_parser(
        "verify", help="check every record's CRC; exit 1 on damage",
        description="Check every record of every queue's message log and state journal, the "
        "state journal's records and the checkpoint, with a reader that shares no code with the "
        "writer. Read-only: opens every file read-only, creates, locks and cuts nothing (a torn "
        "tail is reported as what recovery would cut, and left as it is). Prints each problem "
        "with its file, offset, kind and the message seqs and ids affected. Exit status 1 when "
        "damage is found, 0 when clean.",
    )
    v.add_argument("dir", metavar="DIR")
    v.add_argument("queues", metavar="QUEUE", nargs="*", help="check only these queues")
    v.add_argument("--json", action="store_true", help="one JSON object instead of text")
    v.set_defaults(func=cmd_verify)

    rp = sub.add_parser(
        "repair", help="set damaged files aside, keep every intact message",
        description="Repair damaged queues: each damaged segment is replaced by one holding its "
        "intact records under their own sequence numbers, and the damaged file is kept as "
        "<name>.quarantined-<time> (never deleted). A damaged checkpoint or state journal is set "
        "aside the same way and the consumer state rebuilt so that no message that is not done "
        "is dropped (messages whose fate the damage hid are delivered again). Prints the seqs "
        "and ids of the messages lost. Refuses (exit 1, nothing changed) while any process has "
        "the queue open.",
    )
    rp.add_argument("dir", metavar="DIR")
    rp.add_argument("queues", metavar="QUEUE", nargs="*", help="repair only these queues (default: all)")
    rp.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    rp.set_defaults(func=cmd_repair)

    for name, func, what in (
        ("pause", cmd_pause, "stop delivering a queue's messages (sends are kept), in every process"),
        ("resume", cmd_resume, "deliver a paused queue's messages again"),
    ):
        pp = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        pp.add_argument("dir", metavar="DIR")
        pp.add_argument("queue", metavar="QUEUE")
        pp.set_defaults(func=func)

    pu = sub.add_parser(
        "purge", help="delete every message of a queue",
        description="Delete every message of QUEUE. Asks first (reading the answer from stdin) "
        "unless --yes is given.",
    )
    pu.add_argument("dir", metavar="DIR")
    pu.add_argument("queue", metavar="QUEUE")
    pu.add_argument("--yes", "-y", action="store_true", help="do not ask")
    pu.set_defaults(func=cmd_purge)
    return p


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    print(f"qlog: error: {parser.prog} needs a command", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``qlog`` command; returns its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        return _missing_subcommand(parser)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"qlog: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (Failed, QlogError) as e:
        print(f"qlog: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`qlog peek ... | head`): no traceback, and no
        # second error when Python flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as e:
        print(f"qlog: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("qlog: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


# -- data directories and queues ---------------------------------------------


def _queue_name(name: str, what: str = "queue name") -> str:
    try:
        return check_name(name, what)
    except InvalidQueueNameError as e:
        raise UsageError(str(e)) from None


def _open_existing(path: str) -> Broker:
    """The broker of an existing data directory; UsageError (and nothing
    created) when ``path`` is not one."""
    if not os.path.exists(path):
        raise UsageError(f"data directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"data directory {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, _FORMAT_FILE)):
        raise UsageError(f"{path!r} holds no qlog data (it has no {_FORMAT_FILE} file)")
    return _open_broker(path)


def _existing_queue(broker: Broker, name: str) -> Queue:
    _queue_name(name)
    names = broker.queues()
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise UsageError(f"no queue {name!r} in {broker.path!r} (its queues: {known})")
    return broker.queue(name)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Progress:
    """A progress bar on stderr, ``[#####.....] 50/100``, redrawn in place
    when stderr is a terminal; nothing at all when it is not."""

    WIDTH = 30

    def __init__(self, total: int, stream: Optional[TextIO] = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.live = _isatty(self.stream)
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


# -- send ----------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def cmd_send(args: argparse.Namespace) -> int:
    name = _queue_name(args.queue)
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise UsageError(f"data directory {args.dir!r} is not a directory")
    ct = args.content_type
    if args.body == "-":
        raw = sys.stdin.buffer.read() if sys.stdin is not None else b""
        source = "the body read from stdin"
        if ct == "bytes":
            body: Any = raw
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{source} is not valid UTF-8 ({e}); use --content-type bytes") from None
            body = text
    else:
        source = "BODY"
        body = os.fsencode(args.body) if ct == "bytes" else args.body
    if ct == "json":
        try:
            body = json.loads(body, parse_constant=_no_constant)
        except ValueError as e:
            raise UsageError(
                f"{source} is not valid JSON ({e}); to send it as a string use --content-type text"
            ) from None
    with _open_broker(args.dir) as broker:
        msg_id = broker.queue(name).send(body, content_type=ct, delay_seconds=args.delay)
    print(msg_id)
    return EXIT_OK


# -- stats -----------------------------------------------------------------------

_STAT_COLUMNS = (
    ("QUEUE", "name"),
    ("BACKLOG", "backlog"),
    ("IN-FLIGHT", "in_flight"),
    ("DELAYED", "delayed"),
    ("DEAD-LETTERED", "dead_lettered"),
    ("DELETED", "deleted"),
    ("ACKED", "acked"),
    ("EXPIRED", "expired"),
    ("OLDEST", "oldest_age"),
    ("PAUSED", "paused"),
    ("IN/S", "rate_in"),
    ("OUT/S", "rate_out"),
)


def _done(stats: Any) -> int:
    """Messages that have left the queue, one way or another."""
    return stats.acked + stats.dead_lettered + stats.deleted + stats.expired + stats.purged


def _age(seconds: Optional[float]) -> str:
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


def _table(header: Sequence[str], rows: List[List[str]], left: Sequence[bool]) -> str:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(cells, widths, left)]
        return "  ".join(out).rstrip()

    return "\n".join([line(header)] + [line(r) for r in rows])


def cmd_stats(args: argparse.Namespace) -> int:
    with _open_existing(args.dir) as broker:
        queues = [broker.queue(n) for n in broker.queues()]
        first: List[Tuple[int, int]] = []
        elapsed = 0.0
        if args.interval > 0:
            t0 = time.monotonic()
            first = [(q.stats().sent, _done(q.stats())) for q in queues]
            time.sleep(args.interval)
            elapsed = time.monotonic() - t0
        out = []
        for i, q in enumerate(queues):
            stats = q.stats()
            row: Dict[str, Any] = {"name": q.name}
            for key in ("backlog", "in_flight", "delayed", "dead_lettered", "deleted", "acked",
                        "expired", "purged", "oldest_age", "paused"):
                row[key] = getattr(stats, key)
            if first:
                seq0, done0 = first[i]
                row["rate_in"] = round((stats.sent - seq0) / elapsed, 3)
                row["rate_out"] = round((_done(stats) - done0) / elapsed, 3)
            else:
                row["rate_in"] = row["rate_out"] = None
            out.append(row)
    if args.json:
        print(json.dumps({"queues": out}))
        return EXIT_OK
    rows = []
    for row in out:
        cells = []
        for _title, key in _STAT_COLUMNS:
            value = row[key]
            if key == "oldest_age":
                cells.append(_age(value))
            elif key == "paused":
                cells.append("yes" if value else "no")
            elif key in ("rate_in", "rate_out"):
                cells.append("-" if value is None else f"{value:.1f}")
            else:
                cells.append(str(value))
        rows.append(cells)
    print(_table([t for t, _k in _STAT_COLUMNS], rows, [k == "name" for _t, k in _STAT_COLUMNS]))
    return EXIT_OK


# -- peek ------------------------------------------------------------------------

_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _iso(dt: Any) -> str:
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _shown_body(m: Message) -> str:
    """A body for the table: never unpickled, one line, truncated."""
    ct = m._parts()[0]
    raw = m._raw_body()
    if ct == CT_PICKLE:
        return f"<pickle, {_plural(len(raw), 'byte')}>"
    if ct in (CT_JSON, CT_TEXT):
        try:
            text = raw.decode("utf-8").translate(_ESCAPES)
        except UnicodeDecodeError:
            text = repr(raw)
    elif ct == CT_BYTES:
        text = repr(raw)
    else:
        return f"<content type {ct}, {_plural(len(raw), 'byte')}>"
    if len(text) > BODY_WIDTH:
        text = text[:BODY_WIDTH - 3] + "..."
    return text


def _json_message(m: Message) -> Dict[str, Any]:
    ct = m._parts()[0]
    raw = m._raw_body()
    body: Any = None
    encoding: Optional[str] = "base64"
    if ct in (CT_JSON, CT_TEXT):
        try:
            text = raw.decode("utf-8")
            body = json.loads(text) if ct == CT_JSON else text
            encoding = None
        except ValueError:  # damaged or foreign bytes: shown as they are
            pass
    if encoding is not None:
        body = base64.b64encode(raw).decode("ascii")
    dl = m.dead_letter
    return {
        "id": m.id,
        "timestamp": m.timestamp.isoformat(),
        "attempts": m.attempts,
        "content_type": m.content_type,
        "body": body,
        "body_encoding": encoding,
        "dead_letter": None if dl is None else {
            "queue": dl.queue, "attempts": dl.attempts,
            "dead_lettered_at": dl.dead_lettered_at.isoformat(),
        },
    }


def cmd_peek(args: argparse.Namespace) -> int:
    with _open_existing(args.dir) as broker:
        q = _existing_queue(broker, args.queue)
        msgs = q.peek(args.n)
        if args.json:
            print(json.dumps({"queue": q.name, "messages": [_json_message(m) for m in msgs]}))
            return EXIT_OK
        header = ["ID", "SENT", "ATTEMPTS", "TYPE", "BODY"]
        dead = any(m.dead_letter is not None for m in msgs)
        if dead:
            header.insert(4, "FAILED IN")
        rows = []
        for m in msgs:
            row = [m.id, _iso(m.timestamp), str(m.attempts), m.content_type, _shown_body(m)]
            if dead:
                dl = m.dead_letter
                row.insert(4, "-" if dl is None else f"{dl.queue} ({_plural(dl.attempts, 'attempt')})")
            rows.append(row)
        print(_table(header, rows, [True, True, False, True] + [True] * (len(header) - 4)))
    return EXIT_OK


# -- dlq redrive -------------------------------------------------------------------


def cmd_redrive(args: argparse.Namespace) -> int:
    """Move the messages of a dead-letter queue back (:meth:`Broker.redrive`)."""
    to = None if args.to is None else _queue_name(args.to, "queue name given to --to")
    if to is not None and to == args.dlq:
        raise UsageError(f"--to {to!r} is the dead-letter queue itself")
    with _open_existing(args.dir) as broker:
        dlq = _existing_queue(broker, args.dlq)
        if dlq.paused:
            raise Failed(f"queue {dlq.name!r} is paused, so nothing can be taken from it: "
                         f"run `qlog resume {args.dir} {dlq.name}` first")
        total = dlq.stats().backlog
        if args.limit is not None:
            total = min(total, args.limit)
        bar = _Progress(total)
        try:
            moved = broker.redrive(args.dlq, to, create=args.create, limit=args.limit,
                                   progress=bar.update)
        except QueueNotFoundError as e:
            raise Failed(str(e).replace("pass create=True (qlog dlq redrive --create)", "pass --create")
                         .replace("pass create=True", "pass --create")) from None
        except QlogError as e:
            raise Failed(str(e).replace("name the queue to move the messages to",
                                        "say where to move the messages with --to QUEUE")
                         .replace("name the queue to move it to", "move it with --to QUEUE")) from None
        finally:
            bar.finish()
        count = sum(moved.values())
        if not moved:
            where = f" to {to}" if to else ""
        elif len(moved) == 1:
            where = f" to {next(iter(moved))}"
        else:
            where = " to " + ", ".join(f"{k} ({v})" for k, v in sorted(moved.items()))
        print(f"moved {_plural(count, 'message')} from {dlq.name}{where}")
    return EXIT_OK


# -- verify and repair -------------------------------------------------------------


def _data_dir(path: str) -> str:
    """``path`` when it is a data directory; UsageError otherwise.  Reads only."""
    if not os.path.exists(path):
        raise UsageError(f"data directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"data directory {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, _FORMAT_FILE)):
        raise UsageError(f"{path!r} holds no qlog data (it has no {_FORMAT_FILE} file)")
    return path


def _named_queues(root: str, names: Sequence[str]) -> List[str]:
    """The queues to work on: every queue of ``root``, or the existing ones named."""
    have = queue_names(root)
    if not names:
        return have
    for n in names:
        _queue_name(n)
        if n not in have:
            known = ", ".join(have) if have else "none"
            raise UsageError(f"no queue {n!r} in {root!r} (its queues: {known})")
    return list(dict.fromkeys(names))


def _problem_json(p: Problem, pre: Optional[str]) -> Dict[str, Any]:
    ids = p.ids(pre)
    return {"file": p.file, "segment": p.segment, "offset": p.offset, "length": p.length,
            "after_seq": p.after_seq, "kind": p.kind, "detail": p.detail,
            "first_seq": p.first_seq, "last_seq": p.last_seq,
            "first_id": None if ids is None else ids[0], "last_id": None if ids is None else ids[1]}


def _problem_text(p: Problem, pre: Optional[str]) -> str:
    where = f"{p.file}" + ("" if p.offset is None else f" offset {p.offset}") + \
        ("" if p.length is None else f" length {p.length}")
    if p.segment is not None:
        at = "" if p.offset is None else f" offset {p.offset} length {p.length}"
        head = f"damage: segment {p.segment}{at} kind {p.kind}"
        if p.after_seq is not None:
            head += f" (after record {p.after_seq})"
    else:
        head = f"damage: {where} kind {p.kind}"
    lost = lost_text(p, pre)
    what = "messages" if p.log == "messages" else "records"
    return head + f": {p.detail}" + (f"; {what} affected: {lost}" if lost else "")


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every queue with the pure-Python reader: read-only (no file is
    created, locked, recovered or cut).  Exit 1 on any problem."""
    root = _data_dir(args.dir)
    names = _named_queues(root, args.queues)
    bar = _Progress(len(names))
    checks = []
    try:
        for name in names:
            checks.append(check_queue(root, name))
            bar.update(len(checks))
    finally:
        bar.finish()
    records = sum(lg.records for c in checks for lg in c.logs)
    nlogs = sum(len(c.logs) for c in checks)
    bad = [c for c in checks if c.all_problems]
    if args.json:
        print(json.dumps({
            "ok": not bad, "records": records,
            "logs": [{"queue": c.name, "log": lg.log, "path": lg.path, "records": lg.records,
                      "error": lg.error, "damage": [_problem_json(p, c.id_prefix) for p in lg.problems]}
                     for c in checks for lg in c.logs],
            "queues": [{"queue": c.name, "id_prefix": c.id_prefix,
                        "problems": [_problem_json(p, c.id_prefix) for p in c.problems]} for c in checks],
        }))
        return EXIT_FAILED if bad else EXIT_OK
    for c in checks:
        for lg in c.logs:
            rel = os.path.join("queues", c.name, lg.log)
            extra = f", {_plural(len(lg.problems), 'damaged region')}" if lg.problems else ""
            print(f"{rel}: {_plural(lg.records, 'record')}{extra}")
            for p in lg.problems:
                print(f"  {_problem_text(p, c.id_prefix)}")
        for p in c.problems:
            print(f"queues/{c.name}: {_problem_text(p, c.id_prefix)}")
    if bad:
        n = sum(len(c.all_problems) for c in checks)
        print(f"damage: {_plural(n, 'problem')} in {_plural(len(bad), 'queue')} of {len(checks)} "
              f"({_plural(records, 'intact record')}); `qlog repair {args.dir}` sets damaged files aside "
              "and keeps the intact records")
        return EXIT_FAILED
    print(f"ok: {_plural(records, 'record')} in {_plural(nlogs, 'log')}, no damage")
    return EXIT_OK


def cmd_repair(args: argparse.Namespace) -> int:
    root = _data_dir(args.dir)
    names = _named_queues(root, args.queues)
    changed = 0
    for name in names:
        try:
            chk, lines = repair_queue(root, name, dry_run=args.dry_run)
        except QueueBusyError as e:
            raise Failed(str(e)) from None
        if not lines:
            print(f"queues/{name}: no damage")
            continue
        changed += 1
        for line in lines:
            print(line)
    if args.dry_run:
        print(f"dry run: {_plural(changed, 'queue')} would be repaired; nothing was changed")
    elif changed:
        print(f"repaired {_plural(changed, 'queue')}; damaged files were kept as *.quarantined-*")
    else:
        print("nothing to repair")
    return EXIT_OK


# -- pause, resume, purge ------------------------------------------------------------


def cmd_pause(args: argparse.Namespace) -> int:
    with _open_existing(args.dir) as broker:
        q = _existing_queue(broker, args.queue)
        was = q.paused
        q.pause_delivery()
    state = "was already paused" if was else "is paused"
    print(f"queue {q.name!r} {state}: sends are kept, nothing is delivered until "
          f"`qlog resume {args.dir} {q.name}`")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    with _open_existing(args.dir) as broker:
        q = _existing_queue(broker, args.queue)
        was = q.paused
        q.resume_delivery()
    print(f"queue {q.name!r} {'is delivering again' if was else 'was not paused'}")
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    with _open_existing(args.dir) as broker:
        q = _existing_queue(broker, args.queue)
        if not args.yes:
            backlog = q.stats().backlog
            sys.stderr.write(f"Delete every message of queue {q.name!r} ({backlog} not yet done)? [y/N] ")
            sys.stderr.flush()
            answer = sys.stdin.readline() if sys.stdin is not None else ""
            if not answer.endswith("\n") or not _isatty(sys.stdin):
                sys.stderr.write("\n")  # the answer was not echoed: end the prompt's line
            if answer.strip().lower() not in ("y", "yes"):
                print("aborted; nothing was deleted", file=sys.stderr)
                return EXIT_FAILED
        n = q.purge()
    print(f"purged {_plural(n, 'message')} from {q.name}")
    return EXIT_OK


# -- worker ------------------------------------------------------------------------


def load_target(target: str) -> Broker:
    """The broker named by ``module:attribute`` (the module imported with
    the current directory first on sys.path); UsageError when it is not
    one with consumers."""
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(f"worker target {target!r} must be 'module:attribute', e.g. 'app:broker'")
    cwd = os.getcwd()
    if not sys.path or os.path.abspath(sys.path[0] or ".") != cwd:
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
            f"worker target {target!r} is a {type(obj).__name__}, not a qlog.Broker: point it at "
            "what qlog.open() returned"
        )
    if not obj._consumers:
        raise UsageError(
            f"the broker {target!r} has no consumers: decorate a function with @broker.consumer(queue)"
        )
    return obj


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


def cmd_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level), format=LOG_FORMAT)
    if args.processes > 1:
        return _Supervisor(args).run()
    broker = load_target(args.target)
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
            "--shutdown-timeout", repr(args.shutdown_timeout), "--log-level", args.log_level,
        ]
        self.log = logging.getLogger("qlog.supervisor")
        self.children: Dict[int, subprocess.Popen] = {}  # slot -> process
        self.restart_at: Dict[int, float] = {}  # slot -> monotonic time
        self.stopping = False
        self.stop_signal = 0
        self.failed = False  # a worker exited badly after the stop
        self.usage = False  # a worker refused its arguments: no restarts

    def _start(self, slot: int) -> None:
        env = dict(os.environ)
        env[_SUPERVISOR_ENV] = str(os.getpid())
        p = subprocess.Popen(self.cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.children[slot] = p
        self.log.info("started worker %d (pid %d)", slot + 1, p.pid)
        if self.stopping:  # a signal came while it was starting
            self._signal(p, self.stop_signal)

    def _signal(self, p: subprocess.Popen, signum: int) -> None:
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
                      _plural(len(self.children), "worker"))
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
                self.log.warning("worker %d (pid %d) %s; starting another in %g s", slot + 1, p.pid,
                                 _exit_text(rc), RESTART_BACKOFF)
                self.restart_at[slot] = time.monotonic() + RESTART_BACKOFF

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
        self.log.info("all workers stopped")
        return EXIT_FAILED if self.failed else EXIT_OK
