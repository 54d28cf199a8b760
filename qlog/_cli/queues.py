"""``qlog queues list|create|info|update|delete``: a data directory's
queues and the settings stored with each.

The settings' flags are made from :class:`qlog.QueueSettings` (names,
types, defaults) and ``RANGES`` in ``qlog._settings`` (limits), leaving out
the keys that belong to each process's handle (``HANDLE_KEYS``); values
are checked by ``qlog._settings.validate``, the same check as
:meth:`qlog.Broker.configure`.  Delivery is paused and resumed with ``qlog
pause`` and ``qlog resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

from .._queue import Broker, Queue
from .._settings import HANDLE_KEYS, RANGES, UNLIMITED, QueueSettings, validate
from ..errors import InvalidQueueNameError, QueueExistsError, QueueNotEmptyError, SettingsError
from .common import (
    where,
    EXIT_OK,
    Failed,
    UsageError,
    age,
    existing_queue,
    missing_subcommand,
    open_broker,
    open_existing,
    plural,
    queue_name,
    print_rows,
    yes_no,
)

# -- the settings table ------------------------------------------------------------


def _setting_types() -> Dict[str, Tuple[type, bool]]:
    """Each queue setting's value type, and whether it may be None."""
    hints = typing.get_type_hints(QueueSettings)
    out = {}
    for f in dataclasses.fields(QueueSettings):
        if f.name in HANDLE_KEYS:
            continue
        args = typing.get_args(hints[f.name])
        kinds = [a for a in args if a is not type(None)] if args else [hints[f.name]]
        out[f.name] = (kinds[0], type(None) in args)
    return out


SETTINGS = _setting_types()
"""The settings stored with a queue, in :class:`QueueSettings` order:
``key: (type, may be None)``."""
DEFAULTS = QueueSettings()


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def known_flags() -> str:
    return "settings: " + ", ".join(flag(k) for k in SETTINGS)


def unknown_setting(option: str) -> str:
    """The error for an option of ``create`` or ``update`` that is no setting."""
    key = option.split("=", 1)[0].lstrip("-").replace("-", "_")
    if key in HANDLE_KEYS:
        why = (f"{key} belongs to each process's handle, not to the queue (qlog.open(), "
               "broker.queue() or qlog.toml set it)")
    elif key in ("paused", "pause", "resume"):
        why = "delivery is paused with `qlog pause DIR QUEUE` and resumed with `qlog resume DIR QUEUE`"
    else:
        why = known_flags()
    return f"unknown setting {option!r}: {why}"


def _help(key: str) -> str:
    typ, optional = SETTINGS[key]
    default = getattr(DEFAULTS, key)
    default_text = "none" if default is None and typ is str else show_value(key, default)
    if key in RANGES:
        _t, lo, hi = RANGES[key]
        what = f"{'an integer' if typ is int else 'seconds'} from {_number(lo)} to {_number(hi)}"
        if optional:
            what += f", or '{UNLIMITED}'"
    elif typ is str:
        what = "a queue name, or '' for none"
    else:
        what = typ.__name__
    return f"{what} (default {default_text})"


def _metavar(key: str) -> str:
    typ, _optional = SETTINGS[key]
    return {int: "N", float: "S", str: "QUEUE"}.get(typ, "VALUE")


def _add_setting_flags(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("settings", what)
    for key in SETTINGS:
        g.add_argument(flag(key), dest=key, default=None, metavar=_metavar(key), help=_help(key))
    p.set_defaults(settings_parser=p)


def _given(args: argparse.Namespace) -> Dict[str, Any]:
    """The settings named on the command line, checked and normalised; a
    UsageError naming the flag and the limit for a bad one."""
    out: Dict[str, Any] = {}
    for key, (typ, _optional) in SETTINGS.items():
        text = getattr(args, key)
        if text is None:
            continue
        value: Any = text
        if typ is str:
            value = None if text == "" else text
        elif typ in (int, float):
            try:
                value = typ(text)
            except ValueError:
                pass  # validate names what it wants
        try:
            out.update(validate({key: value}, f"given as {flag(key)}"))
        except (SettingsError, InvalidQueueNameError) as e:
            raise UsageError(str(e)) from None
    return out


def _number(value: float) -> str:
    """A number in full: 1209600, 0.001, 5 (never 1.2096e+06 or 5.0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else repr(value)


def show_value(key: str, value: Any) -> str:
    if value is None:
        typ, _optional = SETTINGS[key]
        return UNLIMITED if typ in (int, float) else "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return _number(value)
    return str(value)


def _settings_json(s: QueueSettings) -> Dict[str, Any]:
    return {key: getattr(s, key) for key in SETTINGS}


def _settings_text(s: QueueSettings) -> List[str]:
    width = max(map(len, SETTINGS))
    return ["settings:"] + [f"  {key.ljust(width)}  {show_value(key, getattr(s, key))}" for key in SETTINGS]


# -- arguments ---------------------------------------------------------------------


def add_queues(sub: Any) -> None:
    """``qlog queues list|create|info|update|delete DIR ...``"""
    qp = sub.add_parser("queues", help="list, create, inspect, change and delete queues",
                        description="Manage a data directory's queues and the settings stored "
                        "with each (every process that opens the queue obeys them).")
    qsub = qp.add_subparsers(dest="queues_command", metavar="COMMAND")
    qp.set_defaults(func=lambda args: missing_subcommand(qp))

    ls = qsub.add_parser("list", help="every queue with its counts and dead-letter queue",
                         description="Per queue: backlog, in flight, delayed, paused, and the "
                         "dead-letter queue it moves failed messages to.")
    ls.add_argument("dir", metavar="DIR")
    ls.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    ls.set_defaults(func=cmd_list)

    cp = qsub.add_parser("create", help="create a queue with its settings", allow_abbrev=False,
                         description="Create the queue NAME in DIR (the directory too, if missing), "
                         "with the settings given stored with it; the others keep their defaults "
                         "(or qlog.toml's). Refuses a queue that exists: change one with "
                         "`qlog queues update`.")
    cp.add_argument("dir", metavar="DIR")
    cp.add_argument("name", metavar="NAME")
    _add_setting_flags(cp, "stored with the queue")
    cp.set_defaults(func=cmd_create)

    ip = qsub.add_parser("info", help="a queue's settings, counts and metrics",
                         description="Show the settings every delivery of queue NAME obeys (defaults, "
                         "then qlog.toml, then those stored with the queue), its counts and its "
                         "backlog metrics.")
    ip.add_argument("dir", metavar="DIR")
    ip.add_argument("name", metavar="NAME")
    ip.add_argument("--json", action="store_true", help="one JSON object instead of text")
    ip.set_defaults(func=cmd_info)

    up = qsub.add_parser("update", help="change some of a queue's settings", allow_abbrev=False,
                         description="Change the settings given (only those) of queue NAME, for "
                         "every process that has it open, and print its settings.")
    up.add_argument("dir", metavar="DIR")
    up.add_argument("name", metavar="NAME")
    _add_setting_flags(up, "the settings to change; the others stay as they are")
    up.set_defaults(func=cmd_update)

    dp = qsub.add_parser("delete", help="delete a queue (refused while it holds messages)",
                         description="Delete queue NAME. Refused while it holds messages not yet "
                         "done, unless --force, which deletes them with it. Processes that have "
                         "the queue open must stop using it.")
    dp.add_argument("dir", metavar="DIR")
    dp.add_argument("name", metavar="NAME")
    dp.add_argument("--force", action="store_true", help="delete the queue's messages with it")
    dp.set_defaults(func=cmd_delete)


# -- commands ------------------------------------------------------------------------

_LIST_COLUMNS = (
    ("QUEUE", "name"),
    ("BACKLOG", "backlog"),
    ("IN-FLIGHT", "in_flight"),
    ("DELAYED", "delayed"),
    ("PAUSED", "paused"),
    ("DLQ", "dead_letter_queue"),
)


def cmd_list(args: argparse.Namespace) -> int:
    with open_existing(args.dir) as broker:
        out = []
        for name in broker.queues():
            q = broker.queue(name)
            st = q.stats()
            out.append({"name": name, "backlog": st.backlog, "in_flight": st.in_flight,
                        "delayed": st.delayed, "paused": st.paused,
                        "dead_letter_queue": q.settings.dead_letter_queue})
    if args.json:
        print(json.dumps({"queues": out}))
        return EXIT_OK
    print_rows(out, _LIST_COLUMNS, ("name", "paused", "dead_letter_queue"), {"paused": yes_no})
    return EXIT_OK


def cmd_create(args: argparse.Namespace) -> int:
    name = queue_name(args.name)
    values = _given(args)
    with open_broker(args.dir) as broker:
        try:
            q = broker.create_queue(name, **values)
        except QueueExistsError as e:
            raise Failed(f"{e}: change its settings with `qlog queues update {where(args.dir)} {name} "
                         "--KEY VALUE`") from None
        except SettingsError as e:
            raise UsageError(str(e)) from None
        settings = q.settings
    print(f"created queue {name!r}")
    print("\n".join(_settings_text(settings)))
    return EXIT_OK


def _iso(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    dt = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _info(broker: Broker, q: Queue) -> Dict[str, Any]:
    return {"queue": q.name, "path": broker.path, "settings": _settings_json(q.settings),
            "stats": dataclasses.asdict(q.stats()), "metrics": dataclasses.asdict(q.metrics())}


def cmd_info(args: argparse.Namespace) -> int:
    with open_existing(args.dir) as broker:
        doc = _info(broker, existing_queue(broker, args.name))
        settings = QueueSettings(**doc["settings"])
    if args.json:
        print(json.dumps(doc))
        return EXIT_OK
    lines = [f"queue {doc['queue']} in {doc['path']}"] + _settings_text(settings)
    for section in ("stats", "metrics"):
        values = doc[section]
        width = max(map(len, values))
        lines.append(f"{section}:")
        for key, value in values.items():
            if key == "oldest_age":
                shown = age(value)
            elif key == "oldest_message_timestamp":
                shown = _iso(value)
            elif isinstance(value, bool):
                shown = "yes" if value else "no"
            else:
                shown = str(value)
            lines.append(f"  {key.ljust(width)}  {shown}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_update(args: argparse.Namespace) -> int:
    values = _given(args)
    if not values:
        raise UsageError(f"name at least one setting to change ({known_flags()})")
    with open_existing(args.dir) as broker:
        before = existing_queue(broker, args.name).settings
        try:
            after = broker.configure(args.name, **values)
        except SettingsError as e:
            raise UsageError(str(e)) from None
    changed = [k for k in SETTINGS if getattr(before, k) != getattr(after, k)]
    if changed:
        print(f"updated queue {args.name!r}: " + ", ".join(
            f"{k} {show_value(k, getattr(before, k))} -> {show_value(k, getattr(after, k))}"
            for k in changed))
    else:
        print(f"queue {args.name!r} unchanged: its settings were already those")
    print("\n".join(_settings_text(after)))
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    with open_existing(args.dir) as broker:
        q = existing_queue(broker, args.name)
        backlog = q.stats().backlog
        try:
            broker.delete_queue(args.name, force=args.force)
        except QueueNotEmptyError:
            backlog = q.stats().backlog
            raise Failed(
                f"queue {args.name!r} holds {plural(backlog, 'message')} not yet done, so it was not "
                f"deleted: `qlog queues delete {where(args.dir)} {args.name} --force` deletes them with it "
                f"(or empty it first with `qlog purge {where(args.dir)} {args.name}`)") from None
    with_messages = f" and its {plural(backlog, 'message')} not yet done" if backlog else ""
    print(f"deleted queue {args.name!r}{with_messages}")
    return EXIT_OK
