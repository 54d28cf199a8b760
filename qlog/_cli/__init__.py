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
    qlog queues list|create|info|update|delete DIR ...   manage queues and their settings
    qlog migrate URL                            create or upgrade qlog's tables in PostgreSQL
    qlog serve DIR [--port 8787]                Cloudflare's HTTP API, a dashboard, /metrics

DIR may also be a PostgreSQL URL (``postgresql://user@host/db?schema=qlog``)
everywhere except verify and repair.

Exit status: 0 success; 1 the operation failed (damage found, purge
aborted, an error while working); 2 bad usage (bad arguments, a data
directory or queue that does not exist), in which case nothing was written.

Commands that only read a directory never create it: they check for the
``qlog-format`` file first (``qlog.open`` would create the directory).

Layout: this module wires the parser and runs a command; ``common`` holds
what every command shares; ``commands`` the message commands (send, stats,
peek, dlq, pause, resume, purge); ``queues`` the queue-management commands;
``verify`` the checks of a directory's files; ``worker`` the consumers'
processes and their supervisor.  Commands use the public API of
:mod:`qlog` (``Broker``, ``Queue``), never a queue's backend.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import NoReturn, Optional, Sequence

from .. import __version__
from ..errors import QlogError
from . import commands, queues, serve, verify, worker
from .common import EXIT_FAILED, EXIT_USAGE, Failed, UsageError, missing_subcommand

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with one error line, ``qlog: error: ...``, naming the help to read."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"qlog: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qlog",
        description="Run qlog workers and look after a qlog data directory. Wherever a command "
        "takes DIR, a PostgreSQL URL (postgresql://...) names the queues in that database.",
        epilog="Exit status: 0 success, 1 the operation failed, 2 bad usage (nothing written).",
    )
    p.add_argument("--version", action="version", version=f"qlog {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    worker.add_worker(sub)
    commands.add_send(sub)
    commands.add_stats(sub)
    commands.add_peek(sub)
    commands.add_dlq(sub)
    verify.add_verify(sub)
    verify.add_repair(sub)
    commands.add_pause_resume(sub)
    commands.add_purge(sub)
    queues.add_queues(sub)
    commands.add_migrate(sub)
    serve.add_serve(sub)
    return p


def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """``parser.parse_args``, except that an unknown option of a command
    that takes settings is refused by that command, naming its settings."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        settings_parser = getattr(args, "settings_parser", None)
        if settings_parser is not None and extra[0].startswith("-"):
            settings_parser.error(queues.unknown_setting(extra[0]))
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``qlog`` command; returns its exit status."""
    parser = build_parser()
    args = _parse(parser, argv)
    if args.command is None:
        return missing_subcommand(parser)
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
