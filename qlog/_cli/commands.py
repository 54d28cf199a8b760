"""The commands that work on queues' messages: ``send``, ``stats``,
``peek``, ``dlq redrive``, ``pause``, ``resume`` and ``purge``.  Each is an
``add_*`` function that declares its arguments and a ``cmd_*`` function
that runs it over the public API of :mod:`qlog`."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .._message import CONTENT_TYPES, CT_BYTES, CT_JSON, CT_PICKLE, CT_TEXT, Message, encode_body
from .._settings import MAX_DELAY, MAX_PULL_BATCH, RANGES, QueueSettings, load_toml, toml_settings
from ..errors import BodyTypeError, MessageTooLargeError, QlogError, QueueNotFoundError
from .._pg.conn import is_target
from .common import (
    where,
    EXIT_OK,
    EXIT_FAILED,
    Failed,
    Progress,
    UsageError,
    age,
    existing_queue,
    int_in,
    is_data_dir,
    isatty,
    missing_subcommand,
    open_broker,
    open_existing,
    plural,
    queue_name,
    seconds_in,
    print_rows,
    table,
    yes_no,
)

if TYPE_CHECKING:  # pragma: no cover
    from .._queue import QueueStats

BODY_WIDTH = 60  # characters of a body shown in peek's table

# -- arguments ---------------------------------------------------------------


def add_send(sub: Any) -> None:
    """``qlog send DIR QUEUE BODY``"""
    s = sub.add_parser(
        "send", help="send one message; prints its id",
        description="Send BODY to QUEUE in the data directory DIR (both created if missing).",
    )
    s.add_argument("dir", metavar="DIR")
    s.add_argument("queue", metavar="QUEUE")
    s.add_argument("body", metavar="BODY", help="the body; '-' reads it from stdin")
    s.add_argument("--content-type", choices=("json", "text", "bytes"), default="json",
                   help="json (default: BODY is parsed as JSON), text, or bytes")
    s.add_argument("--delay", type=seconds_in(0, MAX_DELAY), default=None, metavar="SECONDS",
                   help=f"deliver after this many seconds (0 to {MAX_DELAY})")
    s.set_defaults(func=cmd_send)


def add_migrate(sub: Any) -> None:
    """``qlog migrate URL``"""
    m = sub.add_parser(
        "migrate", help="create or upgrade qlog's tables in a PostgreSQL database",
        description="Create qlog's schema in the PostgreSQL database URL (postgresql://..., "
        "?schema=NAME for a schema other than qlog), or upgrade it to this qlog's version. "
        "qlog.open() does the same on first use; this does only that.",
    )
    m.add_argument("url", metavar="URL")
    m.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from .._queue import migrate

    if not is_target(args.url):
        raise UsageError(f"qlog migrate takes a PostgreSQL URL (postgresql://...), got {args.url!r}")
    schema, before, after = migrate(args.url)
    if before == after:
        print(f"schema {schema!r} at {where(args.url)} is at version {after}: nothing to do")
    else:
        was = "created" if before is None else f"upgraded from version {before}"
        print(f"schema {schema!r} at {where(args.url)} {was}: now version {after}")
    return EXIT_OK


def add_stats(sub: Any) -> None:
    """``qlog stats DIR``"""
    st = sub.add_parser(
        "stats", help="counts and rates of every queue",
        description="Per queue: backlog, in flight, delayed, dead-lettered, deleted, acked, "
        "expired, purged, age of the oldest message and paused, at once; with --interval or "
        "--watch, also messages in and out per second.",
    )
    st.add_argument("dir", metavar="DIR")
    st.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    st.add_argument("--interval", type=seconds_in(0, 3600), default=None, metavar="S",
                    help="measure rates over S seconds before answering (default: answer at once, no rates)")
    st.add_argument("--watch", action="store_true",
                    help="answer again every --interval seconds (default 1), with rates, until Ctrl-C")
    st.set_defaults(func=cmd_stats)


def add_peek(sub: Any) -> None:
    """``qlog peek DIR QUEUE``"""
    pk = sub.add_parser(
        "peek", help="show messages without leasing them",
        description="Show up to N messages of QUEUE not yet done, oldest first, without leasing "
        "or changing them. Pickle bodies are never unpickled.",
    )
    pk.add_argument("dir", metavar="DIR")
    pk.add_argument("queue", metavar="QUEUE")
    pk.add_argument("-n", type=int_in(1, MAX_PULL_BATCH), default=10, metavar="N",
                    help=f"how many messages (1 to {MAX_PULL_BATCH}, default 10)")
    pk.add_argument("--json", action="store_true", help="one JSON object, bodies in full")
    pk.set_defaults(func=cmd_peek)


def add_dlq(sub: Any) -> None:
    """``qlog dlq redrive DIR DLQ``"""
    d = sub.add_parser("dlq", help="dead-letter queue tools (redrive)",
                       description="Dead-letter queue tools.")
    dsub = d.add_subparsers(dest="dlq_command", metavar="COMMAND")
    d.set_defaults(func=lambda args: missing_subcommand(d))
    r = dsub.add_parser(
        "redrive", help="move dead letters back into a queue",
        description="Move the messages of the dead-letter queue DLQ back into QUEUE (--to), or "
        "each into the queue it failed in. Bodies are copied as stored (never decoded); a crash "
        "part way leaves duplicates, never a loss.",
    )
    r.add_argument("dir", metavar="DIR")
    r.add_argument("dlq", metavar="DLQ")
    r.add_argument("--to", metavar="QUEUE", help="the queue to move them to (default: where each failed)")
    r.add_argument("--limit", type=int_in(1, None), default=None, metavar="N",
                   help="move at most N messages")
    r.add_argument("--create", action="store_true",
                   help="create a target queue that does not exist (without it, a typo is refused)")
    r.set_defaults(func=cmd_redrive)


def add_pause_resume(sub: Any) -> None:
    """``qlog pause DIR QUEUE`` and ``qlog resume DIR QUEUE``"""
    for name, func, what in (
        ("pause", cmd_pause, "stop delivering a queue's messages (sends are kept), in every process"),
        ("resume", cmd_resume, "deliver a paused queue's messages again"),
    ):
        pp = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        pp.add_argument("dir", metavar="DIR")
        pp.add_argument("queue", metavar="QUEUE")
        pp.set_defaults(func=func)


def add_purge(sub: Any) -> None:
    """``qlog purge DIR QUEUE``"""
    pu = sub.add_parser(
        "purge", help="delete every message of a queue",
        description="Delete every message of QUEUE. Asks first (reading the answer from stdin) "
        "unless --yes is given.",
    )
    pu.add_argument("dir", metavar="DIR")
    pu.add_argument("queue", metavar="QUEUE")
    pu.add_argument("--yes", "-y", action="store_true", help="do not ask")
    pu.set_defaults(func=cmd_purge)


# -- send ----------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _stored_size(body: Any, ct: str, source: str) -> int:
    """The bytes ``body`` takes as a message of content type ``ct`` (the
    size max_message_size limits)."""
    try:
        return len(encode_body(body, CONTENT_TYPES[ct]))
    except BodyTypeError as e:
        raise UsageError(f"{source} cannot be sent: {e}") from None


def _queue_exists(path: str, name: str) -> bool:
    """Whether ``path`` is a data directory holding queue ``name``; creates nothing."""
    if not is_data_dir(path):
        return False
    with open_broker(path) as broker:
        return name in broker.queues()


def _new_queue_limit(path: str, name: str) -> int:
    """The max_message_size a queue ``name`` created in ``path`` now would
    get: qlog.toml's, else the default."""
    value = toml_settings({} if is_target(path) else load_toml(path), name).get("max_message_size")
    return int(value) if value is not None else QueueSettings().max_message_size


def cmd_send(args: argparse.Namespace) -> int:
    name = queue_name(args.queue)
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise UsageError(f"data directory {where(args.dir)!r} is not a directory")
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
    size = _stored_size(body, ct, source)
    top = RANGES["max_message_size"][2]
    if size > top:
        raise UsageError(
            f"{source} is {size} bytes stored, larger than any queue takes (max_message_size is at "
            f"most {top:,} bytes); nothing was sent: send a reference to the data instead")
    if not _queue_exists(args.dir, name):
        limit = _new_queue_limit(args.dir, name)
        if size > limit:
            raise UsageError(
                f"{source} is {size} bytes stored, larger than max_message_size {limit} bytes, the "
                f"limit a new queue {name!r} gets; nothing was written (create the queue with a higher "
                f"limit, up to {top:,} bytes: qlog queues create {where(args.dir)} {name} "
                "--max-message-size BYTES)")
    with open_broker(args.dir) as broker:
        try:
            msg_id = broker.queue(name).send(body, content_type=ct, delay_seconds=args.delay)
        except MessageTooLargeError as e:
            raise UsageError(
                f"{e}; nothing was sent (raise the limit, up to {top:,} bytes, "
                f"with: qlog queues update {where(args.dir)} {name} --max-message-size BYTES)"
            ) from None
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
    ("PURGED", "purged"),
    ("OLDEST", "oldest_age"),
    ("PAUSED", "paused"),
    ("IN/S", "rate_in"),
    ("OUT/S", "rate_out"),
)


def _done(stats: QueueStats) -> int:
    """Messages that have left the queue, one way or another."""
    return stats.acked + stats.dead_lettered + stats.deleted + stats.expired + stats.purged


def cmd_stats(args: argparse.Namespace) -> int:
    interval = args.interval if args.interval is not None else (1.0 if args.watch else 0.0)
    if args.watch and interval <= 0:
        raise UsageError("--watch needs an --interval above 0 seconds")
    with open_existing(args.dir) as broker:
        queues = [broker.queue(n) for n in broker.queues()]
        snap = [q.stats() for q in queues]
        t0 = time.monotonic()
        try:
            while True:
                if interval > 0:
                    time.sleep(interval)  # the sampling period itself
                now = [q.stats() for q in queues]
                elapsed = time.monotonic() - t0
                _print_stats(args, queues, now, snap if interval > 0 else None, elapsed)
                if not args.watch:
                    return EXIT_OK
                snap, t0 = now, time.monotonic()
                sys.stdout.flush()
        except KeyboardInterrupt:
            return EXIT_OK


def _print_stats(args: argparse.Namespace, queues: List[Any], now: List[QueueStats],
                 before: Optional[List[QueueStats]], elapsed: float) -> None:
    out = []
    for i, (q, stats) in enumerate(zip(queues, now)):
        row: Dict[str, Any] = {"name": q.name}
        for key in ("backlog", "in_flight", "delayed", "dead_lettered", "deleted", "acked",
                    "expired", "purged", "oldest_age", "paused"):
            row[key] = getattr(stats, key)
        if before is not None:
            row["rate_in"] = round((stats.sent - before[i].sent) / elapsed, 3)
            row["rate_out"] = round((_done(stats) - _done(before[i])) / elapsed, 3)
        else:
            row["rate_in"] = row["rate_out"] = None
        out.append(row)
    if args.json:
        print(json.dumps({"queues": out}))
        return

    def rate(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.1f}"

    print_rows(out, _STAT_COLUMNS, ("name",),
               {"oldest_age": age, "paused": yes_no, "rate_in": rate, "rate_out": rate})


# -- peek ------------------------------------------------------------------------

_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _stored(m: Message) -> Tuple[int, bytes]:
    """A message's content type code (-1: unknown) and body bytes as
    stored, never decoded (``body`` decodes, and would unpickle)."""
    return CONTENT_TYPES.get(m.content_type, -1), m.raw_body


def _shown_body(m: Message) -> str:
    """A body for the table: never unpickled, one line, truncated."""
    ct, raw = _stored(m)
    if ct == CT_PICKLE:
        return f"<pickle, {plural(len(raw), 'byte')}>"
    if ct in (CT_JSON, CT_TEXT):
        try:
            text = raw.decode("utf-8").translate(_ESCAPES)
        except UnicodeDecodeError:
            text = repr(raw)
    elif ct == CT_BYTES:
        text = repr(raw)
    else:
        return f"<content type {m.content_type}, {plural(len(raw), 'byte')}>"
    if len(text) > BODY_WIDTH:
        text = text[:BODY_WIDTH - 3] + "..."
    return text


def _json_message(m: Message) -> Dict[str, Any]:
    ct, raw = _stored(m)
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
        "attempts": m.attempts + 1,
        "deliveries": m.attempts,
        "visible_at": m.visible_at.isoformat(),
        "delayed": m.visible_at > datetime.now(timezone.utc),
        "content_type": m.content_type,
        "body": body,
        "body_encoding": encoding,
        "dead_letter": None if dl is None else {
            "queue": dl.queue, "attempts": dl.attempts,
            "dead_lettered_at": dl.dead_lettered_at.isoformat(),
        },
    }


def cmd_peek(args: argparse.Namespace) -> int:
    with open_existing(args.dir) as broker:
        q = existing_queue(broker, args.queue)
        msgs = q.peek(args.n)
        if args.json:
            print(json.dumps({"queue": q.name, "messages": [_json_message(m) for m in msgs]}))
            return EXIT_OK
        header = ["ID", "SENT", "ATTEMPT", "TYPE", "VISIBLE", "BODY"]
        dead = any(m.dead_letter is not None for m in msgs)
        if dead:
            header.insert(5, "FAILED IN")
        now = datetime.now(timezone.utc)
        rows = []
        for m in msgs:
            # ATTEMPT: the attempts a pull would give it (deliveries so far + 1).
            shown = f"delayed until {_iso(m.visible_at)}" if m.visible_at > now else "now"
            row = [m.id, _iso(m.timestamp), str(m.attempts + 1), m.content_type, shown, _shown_body(m)]
            if dead:
                dl = m.dead_letter
                row.insert(5, "-" if dl is None else f"{dl.queue} ({plural(dl.attempts, 'attempt')})")
            rows.append(row)
        print(table(header, rows, [True, True, False, True] + [True] * (len(header) - 4)))
    return EXIT_OK


# -- dlq redrive -------------------------------------------------------------------


def cmd_redrive(args: argparse.Namespace) -> int:
    """Move the messages of a dead-letter queue back (:meth:`Broker.redrive`)."""
    to = None if args.to is None else queue_name(args.to, "queue name given to --to")
    if to is not None and to == args.dlq:
        raise UsageError(f"--to {to!r} is the dead-letter queue itself")
    with open_existing(args.dir) as broker:
        dlq = existing_queue(broker, args.dlq)
        if dlq.paused:
            raise Failed(f"queue {dlq.name!r} is paused, so nothing can be taken from it: "
                         f"run `qlog resume {where(args.dir)} {dlq.name}` first")
        total = dlq.stats().backlog
        if args.limit is not None:
            total = min(total, args.limit)
        bar = Progress(total, f"moving from {dlq.name}")
        try:
            moved = broker.redrive(args.dlq, to, create=args.create, limit=args.limit,
                                   progress=bar.update)
            bar.update(sum(moved.values()), "done")
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
            dest = f" to {to}" if to else ""
        elif len(moved) == 1:
            dest = f" to {next(iter(moved))}"
        else:
            dest = " to " + ", ".join(f"{k} ({v})" for k, v in sorted(moved.items()))
        print(f"moved {plural(count, 'message')} from {dlq.name}{dest}")
    return EXIT_OK


# -- pause, resume, purge ------------------------------------------------------------


def cmd_pause(args: argparse.Namespace) -> int:
    with open_existing(args.dir) as broker:
        q = existing_queue(broker, args.queue)
        was = q.paused
        q.pause_delivery()
    state = "was already paused" if was else "is paused"
    print(f"queue {q.name!r} {state}: sends are kept, nothing is delivered until "
          f"`qlog resume {where(args.dir)} {q.name}`")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    with open_existing(args.dir) as broker:
        q = existing_queue(broker, args.queue)
        was = q.paused
        q.resume_delivery()
    print(f"queue {q.name!r} {'is delivering again' if was else 'was not paused'}")
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    with open_existing(args.dir) as broker:
        q = existing_queue(broker, args.queue)
        if not args.yes:
            backlog = q.stats().backlog
            sys.stderr.write(f"Delete every message of queue {q.name!r} "
                             f"({plural(backlog, 'message')} not yet done)? [y/N] ")
            sys.stderr.flush()
            answer = sys.stdin.readline() if sys.stdin is not None else ""
            if not answer.endswith("\n") or not isatty(sys.stdin):
                sys.stderr.write("\n")  # the answer was not echoed: end the prompt's line
            if answer.strip().lower() not in ("y", "yes"):
                print("aborted; nothing was deleted", file=sys.stderr)
                return EXIT_FAILED
        # Queue.purge reports nothing until it is done: a spinner and the
        # elapsed time, on a terminal's stderr only.
        with Progress(None, f"purging {q.name}"):
            n = q.purge()
    print(f"purged {plural(n, 'message')} from {q.name}")
    return EXIT_OK
