"""Messages: the bytes a queue stores per message, and the objects a consumer gets.

A message is one record of its queue's message log::

    +---------+--------------+-----------+-----------+-------------------+
    | version | content type | flags     | delay ms  | sent (µs, epoch)  |
    | u8 = 1  | u8           | u16       | u32       | i64               |
    +---------+--------------+-----------+-----------+-------------------+
    then, when flags & DEAD_LETTER: u32 length + that many bytes of JSON
    (original id, queue, attempts, timestamp, when dead-lettered),
    then the body, encoded for its content type.

All fields little-endian; the header is 16 bytes (docs/FORMAT.md).
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

from . import errors
from ._backend import RECORD_HEADER as HEADER, RECORD_VERSION as VERSION
from ._log import MessageBase

if TYPE_CHECKING:  # pragma: no cover
    from ._queue import Queue

FLAG_DEAD_LETTER = 1

CONTENT_TYPES = {"json": 0, "text": 1, "bytes": 2, "pickle": 3}
CT_JSON, CT_TEXT, CT_BYTES, CT_PICKLE = 0, 1, 2, 3
_CT_NAMES = {v: k for k, v in CONTENT_TYPES.items()}

_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, check_circular=True, separators=(",", ":")
)
_json_encode: Callable[[Any], str] = _encoder.encode
_decode = json.JSONDecoder()
json_decode: Callable[[str], Any] = json.loads

try:
    # The C encoder and scanner behind json.dumps/loads, called directly:
    # the Python layers around them cost as much as the encoding of a small
    # message.  One encoder per thread (its circular-reference markers must
    # not be shared); json.dumps/loads semantics otherwise.
    import threading as _threading

    import _json as _cjson

    _tls = _threading.local()

    def _make_encoder() -> Callable[..., Any]:
        return _cjson.make_encoder(
            {}, _encoder.default, _cjson.encode_basestring, None, ":", ",", False, False, False
        )

    def _fast_encode(body: Any) -> str:
        try:
            enc = _tls.enc
        except AttributeError:
            enc = _tls.enc = _make_encoder()
        return "".join(enc(body, 0))

    # (typeshed wants a make_scanner as the context: it reads a JSONDecoder's attributes)
    _scan = _cjson.make_scanner(_decode)  # type: ignore[arg-type]

    def _fast_decode(text: str) -> Any:
        try:
            obj, end = _scan(text, 0)
        except StopIteration:
            return json.loads(text)  # raises the usual error
        if end != len(text):
            return json.loads(text)
        return obj

    if _fast_encode({"a": [1, 2.5, "é", None, True]}) != _json_encode({"a": [1, 2.5, "é", None, True]}):
        raise ImportError("C encoder disagrees")
    _json_encode = _fast_encode  # noqa: F811
    json_decode = _fast_decode
except (ImportError, AttributeError, TypeError):  # another Python: the plain path
    pass


def content_type_code(content_type: object) -> int:
    """The code of a content type name, matched case-insensitively as
    Cloudflare's runtime does (``"JSON"`` is ``"json"``)."""
    code = CONTENT_TYPES.get(content_type.lower()) if isinstance(content_type, str) else None
    if code is None:
        raise errors.ContentTypeError(
            f"unknown content_type {content_type!r}: use one of 'json', 'text', 'bytes', 'pickle'"
        )
    return code


def encode_body(body: Any, ct: int) -> bytes:
    """The stored bytes of a body; :class:`~qlog.errors.BodyTypeError` when
    the body does not fit its content type."""
    if ct == CT_JSON:
        try:
            return _json_encode(body).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as e:
            raise errors.BodyTypeError(
                f"body is not JSON-serialisable for content_type 'json': {e}"
            ) from None
        except UnicodeEncodeError as e:
            raise errors.BodyTypeError(f"body has text that is not valid Unicode: {e}") from None
    if ct == CT_BYTES:
        if type(body) is bytes:
            return body
        if isinstance(body, (bytearray, memoryview)):
            return bytes(body)
        raise errors.BodyTypeError(
            f"content_type 'bytes' needs a bytes-like body, got {type(body).__name__}"
        )
    if ct == CT_TEXT:
        if not isinstance(body, str):
            raise errors.BodyTypeError(
                f"content_type 'text' needs a str body, got {type(body).__name__}"
            )
        try:
            return body.encode("utf-8")
        except UnicodeEncodeError as e:
            raise errors.BodyTypeError(f"text body is not valid Unicode: {e}") from None
    try:
        return pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # pickle raises many kinds
        raise errors.BodyTypeError(f"body cannot be pickled: {e}") from None


def decode_body(data: bytes, ct: int, allow_pickle: bool) -> Any:
    if ct == CT_JSON:
        return json_decode(data.decode("utf-8"))
    if ct == CT_BYTES:
        return data
    if ct == CT_TEXT:
        return data.decode("utf-8")
    if ct == CT_PICKLE:
        if not allow_pickle:
            raise errors.PickleNotAllowedError(
                "message has content_type 'pickle' but the queue was opened without "
                "allow_pickle=True (unpickling untrusted data can run arbitrary code)"
            )
        return pickle.loads(data)
    raise errors.ContentTypeError(f"message has unknown content type code {ct}")


Parts = Tuple[int, int, int, int, Optional[Dict[str, Any]], int]
"""What :func:`split` returns."""


def split(payload: bytes) -> Parts:
    """(content type, flags, delay ms, sent µs, dead-letter metadata, body offset)."""
    ver, ct, flags, delay, sent = HEADER.unpack_from(payload)
    if ver != VERSION:
        raise errors.FormatError(f"message format version {ver} is not supported (only {VERSION})")
    off = HEADER.size
    meta: Optional[Dict[str, Any]] = None
    if flags & FLAG_DEAD_LETTER:
        (n,) = struct.unpack_from("<I", payload, off)
        meta = json.loads(payload[off + 4:off + 4 + n])
        off += 4 + n
    return ct, flags, delay, sent, meta, off


@dataclass(frozen=True)
class MessageSendRequest:
    """One message of a ``send_batch`` with its own options."""

    body: Any
    content_type: Optional[str] = None
    delay_seconds: Optional[float] = None


@dataclass(frozen=True)
class DeadLetterInfo:
    """Where a dead-lettered message came from (``Message.dead_letter``)."""

    queue: str
    """The queue the message failed on."""
    attempts: int
    """Deliveries made there."""
    dead_lettered_at: datetime


_ACK, _RETRY, _PEEKED = 1, 2, 3
_OUTCOME_NAMES = {_ACK: "ack", _RETRY: "retry"}


class Message(MessageBase):
    """A message delivered by :meth:`Queue.pull` or a push consumer (or
    shown by :meth:`Queue.peek`), as Cloudflare's ``Message``: ``id``,
    ``timestamp``, ``body``, ``attempts``, ``ack()`` and ``retry()`` (the
    first of the two wins), plus ``lease_id``, ``content_type`` and
    ``extend()``."""

    __slots__ = ()

    def _parts(self) -> Parts:
        sp = self._split
        if sp is None:
            sp = self._split = split(self._payload)
        return sp

    def _decode_body(self) -> Any:
        ct, _f, _d, _s, _m, off = self._parts()
        return decode_body(self._payload[off:], ct, self._q._allow_pickle)

    @property
    def id(self) -> str:
        """The message's id (32 hex digits), unique in its queue; a message
        keeps its id in a dead-letter queue."""
        meta = self._parts()[4]
        if meta is not None:
            mid: str = meta["id"]
            return mid
        return f"{self._q._idpre}{self._seq:016x}"

    @property
    def timestamp(self) -> datetime:
        """When the message was sent (UTC; for a dead-lettered message, when
        it was first sent to its original queue)."""
        meta = self._parts()[4]
        us = meta["sent_us"] if meta is not None else self._parts()[3]
        return datetime.fromtimestamp(us / 1e6, tz=timezone.utc)

    @property
    def visible_at(self) -> datetime:
        """When the message first became deliverable (UTC): its send time
        plus its delivery delay; in a dead-letter queue, when it was moved
        there.  Later than now for a delayed message shown by peek."""
        _ct, _fl, delay_ms, sent_us, _meta, _off = self._parts()
        return datetime.fromtimestamp(sent_us / 1e6 + delay_ms / 1e3, tz=timezone.utc)

    @property
    def raw_body(self) -> bytes:
        """The body's bytes as stored, never decoded (nor unpickled): UTF-8
        JSON text for ``json``, UTF-8 for ``text``, the bytes themselves for
        ``bytes``, the pickle for ``pickle``."""
        return self._payload[self._parts()[5]:]

    @property
    def content_type(self) -> str:
        """How the body was encoded when sent: ``"json"``, ``"text"``,
        ``"bytes"`` or ``"pickle"``."""
        return _CT_NAMES.get(self._parts()[0], "unknown")

    @property
    def dead_letter(self) -> Optional[DeadLetterInfo]:
        """Set on a message in a dead-letter queue: where it failed."""
        meta = self._parts()[4]
        if meta is None:
            return None
        return DeadLetterInfo(
            queue=meta["queue"], attempts=meta["attempts"],
            dead_lettered_at=datetime.fromtimestamp(meta["dead_us"] / 1e6, tz=timezone.utc),
        )

    @property
    def outcome(self) -> Optional[str]:
        """``"ack"`` or ``"retry"`` once :meth:`ack` or :meth:`retry` (or a
        batch's) was called on this delivery; ``None`` while it is open
        (and for a message shown by peek)."""
        return _OUTCOME_NAMES.get(self._outcome)

    @property
    def ref(self) -> str:
        """The message in this queue: its id here, which
        :meth:`Queue.delete_messages` takes (Cloudflare's ``ref``).  It is
        :attr:`id` except for a dead letter, which keeps the id it had in
        the queue it failed in."""
        return f"{self._q._idpre}{self._seq:016x}"

    @property
    def lease_id(self) -> str:
        """This delivery's lease, as an opaque string: :meth:`Queue.settle`
        and :meth:`Queue.extend` take it, in any process that opens the queue."""
        return f"{self._q._idpre}{self._seq:016x}.{self.attempts}"

    def extend(self, visibility_timeout: Optional[float] = None) -> None:
        """Renew this delivery's lease for ``visibility_timeout`` seconds from
        now (default the queue's), without adding an attempt.  A no-op once
        acked or retried, or when the lease has passed to another delivery."""
        self._check_live()
        if not self._outcome:
            q = self._q
            q._extend([self], q._deadline(visibility_timeout))

    def ack(self) -> None:
        """Mark the message done: it is never delivered again (unless a
        power cut takes the ack before it was synced).  Returns once the ack
        is in the kernel.  A no-op after an earlier ``ack`` or ``retry``."""
        if self._outcome:
            self._check_live()
            return
        self._q._ack([self._seq])
        self._outcome = _ACK

    def retry(self, delay_seconds: Optional[float] = None) -> None:
        """Deliver the message again after ``delay_seconds`` (default: the
        queue's ``retry_delay``), with ``attempts + 1``; after ``max_retries``
        retries it goes to the dead-letter queue.  A no-op after an earlier
        ``ack`` or ``retry``."""
        if self._outcome:
            self._check_live()
            return
        q = self._q
        q._retry([self], q._retry_delay_us(delay_seconds))
        self._outcome = _RETRY

    def _check_live(self) -> None:
        if self._outcome == _PEEKED:
            raise errors.QlogError("a message shown by peek() cannot be acked or retried")

    def __repr__(self) -> str:
        return f"Message(id={self.id!r}, attempts={self.attempts})"


class MessageBatch:
    """Messages delivered together, as Cloudflare's ``MessageBatch``:
    ``queue`` is the queue's name and ``messages`` a read-only tuple.  Acks
    and retries are recorded on each message, so ``ack_all`` and
    ``retry_all`` reach every message delivered in the batch.  ``paused`` is
    True when a pull found the queue's delivery paused (the batch is then
    empty: :meth:`Queue.resume_delivery` lets it deliver again)."""

    __slots__ = ("queue", "_messages", "_q", "paused")

    def __init__(self, q: "Queue", messages: Sequence[Message], paused: bool = False) -> None:
        self._q = q
        self.queue = q.name
        self._messages = tuple(messages)
        self.paused = paused

    @property
    def messages(self) -> Tuple[Message, ...]:
        """The messages of the batch, in delivery order (read-only)."""
        return self._messages

    def ack_all(self) -> None:
        """Ack every message not already acked or retried, in one journal write."""
        todo = [m for m in self._messages if not m._outcome]
        if todo:
            self._q._ack([m._seq for m in todo])
            for m in todo:
                m._outcome = _ACK

    def retry_all(self, delay_seconds: Optional[float] = None) -> None:
        """Retry every message not already acked or retried."""
        todo = [m for m in self._messages if not m._outcome]
        if not todo:
            return
        self._q._retry(todo, self._q._retry_delay_us(delay_seconds))
        for m in todo:
            m._outcome = _RETRY

    def extend(self, visibility_timeout: Optional[float] = None) -> None:
        """Renew the leases of every message not acked or retried, for
        ``visibility_timeout`` seconds from now (default the queue's), in one
        journal write; attempts unchanged."""
        todo = [m for m in self._messages if not m._outcome]
        if todo:
            self._q._extend(todo, self._q._deadline(visibility_timeout))

    def __len__(self) -> int:
        return len(self._messages)

    def __iter__(self) -> Iterator[Message]:
        return iter(self._messages)

    def __bool__(self) -> bool:
        return bool(self._messages)

    def __repr__(self) -> str:
        return f"MessageBatch(queue={self.queue!r}, messages={len(self.messages)})"


def dead_letter_payload(payload: bytes, msg_id: str, queue: str, attempts: int, now_us: int) -> bytes:
    """The record a message becomes in its dead-letter queue: same body and
    content type, the original id and timestamp in the metadata, `sent` set
    to now (retention there counts from the move)."""
    ct, flags, _delay, sent, meta, off = split(payload)
    if meta is not None:  # a dead-letter queue's own dead letters keep the first origin
        sent = meta["sent_us"]
    info = json.dumps(
        {"id": msg_id, "queue": queue, "attempts": attempts, "sent_us": sent, "dead_us": now_us},
        separators=(",", ":"),
    ).encode()
    return (
        HEADER.pack(VERSION, ct, FLAG_DEAD_LETTER, 0, now_us)
        + struct.pack("<I", len(info)) + info + payload[off:]
    )

