"""Queue settings: Cloudflare's keys and defaults, checked once, in one place."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, TypedDict

from . import errors
from ._backend import MAX_APPEND
from ._log.types import DURABILITY_MODES, plural as plural  # qlog's one wording of counts, re-exported

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
MAX_DELAY = 86_400  # seconds: Cloudflare's limit on a message or retry delay
MAX_SEND_BATCH = MAX_APPEND  # a send_batch is one append
MAX_SEND_BATCH_BYTES = 256 << 20  # bodies of one send_batch, in all
MAX_PULL_BATCH = 1000
UNLIMITED = "unlimited"
HANDLE_KEYS = frozenset({"durability", "allow_pickle", "segment_bytes"})
"""Settings of a handle (each process chooses), not stored with the queue."""
CONSUMER_TYPES = ("worker", "http_pull")
CONSUMER_KEY = "consumer"
"""The key of the stored settings that holds the queue's consumer record
(``Queue.set_consumer``): stored with the settings, not one of them."""


def delay_us(value: Optional[float], default: float, what: str) -> int:
    """A delay in seconds (``default`` when None) as microseconds; the one
    check of every send, retry and redrive delay."""
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_DELAY:
        raise errors.DelayOutOfRangeError(
            f"{what} must be a number of seconds from 0 to {MAX_DELAY} (24 hours), got {value!r}"
        )
    return int(value * 1_000_000)


def check_name(name: object, what: str = "queue name") -> str:
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise errors.InvalidQueueNameError(
            f"invalid {what} {name!r}: use 1 to 63 characters of A-Z, a-z, 0-9, '_' and '-'"
        )
    return name


@dataclass(frozen=True)
class QueueSettings:
    """A queue's settings (``Queue.settings``).  Names and defaults are
    Cloudflare Queues'; times are seconds."""

    max_batch_size: int = 10
    """Messages per push-consumer batch, 1 to 100."""
    max_batch_timeout: float = 5.0
    """Seconds a push consumer waits to fill a batch, 0 to 60."""
    max_retries: int = 3
    """Retries before a message is dead-lettered (or deleted), 0 to 100."""
    dead_letter_queue: Optional[str] = None
    retry_delay: float = 0
    """Default delay of a retry, 0 to 86,400 seconds."""
    delivery_delay: float = 0
    """Default delay of a send, 0 to 86,400 seconds."""
    message_retention: Optional[float] = 4 * 86_400
    """Seconds a message is kept, 60 to 1,209,600 (14 days); ``None`` (or
    "unlimited" in qlog.toml) keeps messages until they are consumed."""
    visibility_timeout: float = 30.0
    """Default lease of a pulled message, 0.001 to 43,200 seconds (12 hours)."""
    max_message_size: int = 128 * 1024
    """Largest body in bytes, 1 to 16 MiB."""
    max_concurrency: int = 1
    """Batches a push consumer runs at once, 1 to 250."""
    durability: Optional[str] = None
    """"sync", "interval" or "none"; ``None``: the broker's."""
    allow_pickle: bool = False
    """Let ``content_type="pickle"`` bodies be sent and decoded.  Unpickling
    data from an untrusted producer can run arbitrary code."""
    segment_bytes: int = 16 << 20
    """Size of the message log's segment files: the unit in which space is
    given back, and what reopening after a crash scans at most."""


class StoredSettings(TypedDict, total=False):
    """The keyword arguments that set a queue's stored settings
    (:meth:`Broker.configure`), typed so that a checker catches a misspelt
    key; :class:`QueueSettings` documents each."""

    max_batch_size: int
    max_batch_timeout: float
    max_retries: int
    dead_letter_queue: Optional[str]
    retry_delay: float
    delivery_delay: float
    message_retention: Optional[float]
    visibility_timeout: float
    max_message_size: int
    max_concurrency: int


class Settings(StoredSettings, total=False):
    """The keyword arguments of :meth:`Broker.queue`, :meth:`Broker.consumer`
    and :meth:`Broker.create_queue`: the stored settings and this handle's
    own (``durability``, ``allow_pickle``, ``segment_bytes``)."""

    durability: str
    allow_pickle: bool
    segment_bytes: int


RANGES = {
    "max_batch_size": (int, 1, 100),
    "max_batch_timeout": (float, 0, 60),
    "max_retries": (int, 0, 100),
    "retry_delay": (float, 0, MAX_DELAY),
    "delivery_delay": (float, 0, MAX_DELAY),
    "message_retention": (float, 60, 14 * 86_400),
    "visibility_timeout": (float, 0.001, 43_200),
    "max_message_size": (int, 1, 16 << 20),
    "max_concurrency": (int, 1, 250),
    "segment_bytes": (int, 1 << 16, 1 << 40),
}
"""The type and limits of each numeric setting, ``key: (int or float,
lowest, highest)``: what :func:`validate` checks (and ``qlog queues``
shows in its help)."""
KEYS = frozenset(f.name for f in fields(QueueSettings))


def validate(values: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """Check setting names, types and ranges; returns normalised values."""
    out: Dict[str, Any] = {}
    for key, v in values.items():
        if key not in KEYS:
            raise errors.SettingsError(
                f"unknown setting {key!r} {where}; known settings: {', '.join(sorted(KEYS))}"
            )
        if key == "dead_letter_queue":
            if v is not None:
                check_name(v, "dead_letter_queue name")
        elif key == "durability":
            if v is not None and v not in DURABILITY_MODES:
                raise errors.SettingsError(
                    f"setting 'durability' {where} must be one of {sorted(DURABILITY_MODES)}, got {v!r}"
                )
        elif key == "allow_pickle":
            if not isinstance(v, bool):
                raise errors.SettingsError(f"setting 'allow_pickle' {where} must be true or false, got {v!r}")
        elif key == "message_retention" and (v is None or v == UNLIMITED):
            v = None
        else:
            typ, lo, hi = RANGES[key]
            ok_type = isinstance(v, int) if typ is int else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok_type:
                raise errors.SettingsError(
                    f"setting {key!r} {where} must be {'an integer' if typ is int else 'a number'}, "
                    f"got {v!r}"
                )
            if not lo <= v <= hi:
                raise errors.SettingsError(
                    f"setting {key!r} {where} must be from {lo} to {hi}, got {v!r}"
                )
            v = typ(v)
        out[key] = v
    return out


def toml_settings(configured: Mapping[str, Dict[str, Any]], name: str) -> Dict[str, Any]:
    """The settings ``load_toml``'s result gives queue ``name``: the
    top-level ones, then its own block's."""
    return {**configured.get("*", {}), **configured.get(name, {})}


def load_toml(directory: str) -> Dict[str, Dict[str, Any]]:
    """Per-queue settings from ``qlog.toml`` in the data directory.

    Shaped like Cloudflare's configuration: ``[[queues.consumers]]`` and
    ``[[queues.producers]]`` tables, each naming its ``queue``.  A top-level
    ``durability`` applies to every queue."""
    path = os.path.join(directory, "qlog.toml")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        raise errors.SettingsError(
            f"{path} needs Python 3.11 or newer (tomllib) to be read"
        ) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise errors.SettingsError(f"{path} is not valid TOML: {e}") from None
    top_unknown = set(doc) - {"queues", "durability"}
    if top_unknown:
        raise errors.SettingsError(
            f"unknown key {sorted(top_unknown)[0]!r} at the top of {path}; "
            "expected [[queues.consumers]], [[queues.producers]] or durability"
        )
    per: Dict[str, Dict[str, Any]] = {}
    base: Dict[str, Any] = {}
    if "durability" in doc:
        base = validate({"durability": doc["durability"]}, f"in {path}")
    queues = doc.get("queues", {})
    if not isinstance(queues, dict):
        raise errors.SettingsError(f"'queues' in {path} must be a table")
    unknown = set(queues) - {"consumers", "producers"}
    if unknown:
        raise errors.SettingsError(
            f"unknown key 'queues.{sorted(unknown)[0]}' in {path}; expected consumers or producers"
        )
    for section in ("producers", "consumers"):
        entries = queues.get(section, [])
        if not isinstance(entries, list):
            raise errors.SettingsError(f"'queues.{section}' in {path} must be an array of tables ([[queues.{section}]])")
        seen: Dict[str, int] = {}
        for i, entry in enumerate(entries):
            where = f"in [[queues.{section}]] #{i + 1} of {path}"
            if not isinstance(entry, dict) or "queue" not in entry:
                raise errors.SettingsError(f"missing key 'queue' {where}")
            name = check_name(entry["queue"])
            if section == "consumers" and name in seen:
                raise errors.SettingsError(
                    f"queue {name!r} has two [[queues.consumers]] blocks in {path} (#{seen[name]} and "
                    f"#{i + 1}); a queue has one consumer: merge them into one block")
            seen[name] = i + 1
            rest = _wrangler_keys(section, {k: v for k, v in entry.items() if k != "queue"}, where)
            per.setdefault(name, dict(base)).update(validate(rest, where))
    if base:
        per["*"] = base
    return per


def _wrangler_keys(section: str, entry: Dict[str, Any], where: str) -> Dict[str, Any]:
    """wrangler's keys that mean something here, as qlog's: a consumer's
    ``type`` ("worker" or "http_pull": both are served by the same queue)
    and ``visibility_timeout_ms``; a producer's ``binding`` (a Worker's
    variable name: nothing to do here)."""
    out = dict(entry)
    if section == "producers":
        b = out.pop("binding", None)
        if b is not None and not isinstance(b, str):
            raise errors.SettingsError(f"key 'binding' {where} must be a string, got {b!r}")
        return out
    t = out.pop("type", None)
    if t is not None and t not in CONSUMER_TYPES:
        raise errors.SettingsError(
            f"key 'type' {where} must be one of {', '.join(map(repr, CONSUMER_TYPES))}, got {t!r}")
    if "visibility_timeout_ms" in out:
        ms = out.pop("visibility_timeout_ms")
        if "visibility_timeout" in out:
            raise errors.SettingsError(
                f"{where} gives both visibility_timeout and visibility_timeout_ms: keep one")
        if isinstance(ms, bool) or not isinstance(ms, (int, float)):
            raise errors.SettingsError(
                f"key 'visibility_timeout_ms' {where} must be a number of milliseconds, got {ms!r}")
        out["visibility_timeout"] = ms / 1000
    return out
