"""Pure-Python equivalents of ``qlog._glue`` (``csrc/pyglue.c``).

Used with the pure-Python engine: the same functions and the same results,
at Python speed.  See ``csrc/pyglue.c`` for the contract of each.
"""

from __future__ import annotations

import struct
from array import array
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from .._message import Parts

__all__ = ["pack", "unpack", "scan_messages", "ids", "MessageBase"]

_CT_BYTES = 2
_DELAY_SENT = struct.Struct("<Iq")


def pack(payloads: Sequence[Any], prefix: bytes = b"") -> Optional[Tuple[bytes, bytes]]:
    """``(joined, uint32 lengths)`` with ``prefix`` before every payload, or
    None when an item is not ``bytes``."""
    if not all(type(p) is bytes for p in payloads):
        return None
    lens = [len(p) + len(prefix) for p in payloads]
    if lens and max(lens) > 0xFFFFFFFF:
        raise OverflowError(f"record of {max(lens)} bytes does not fit a 32-bit length")
    joined = b"".join(prefix + p for p in payloads) if prefix else b"".join(payloads)
    return joined, array("I", lens).tobytes()


def _views(data: Any, seqs: Any, offs: Any, n: int, fn: str) -> Tuple[memoryview, memoryview, memoryview]:
    d = memoryview(data).cast("B")
    sq = memoryview(seqs).cast("B")
    of = memoryview(offs).cast("B")
    if n < 0 or len(sq) < 8 * n or len(of) < 8 * (n + 1):
        raise ValueError(f"{fn}: buffers shorter than n records")
    sq = sq[:8 * n].cast("Q")
    of = of[:8 * (n + 1)].cast("Q")
    for i in range(n):
        if of[i] > of[i + 1] or of[i + 1] > len(d):
            raise ValueError(f"{fn}: offsets out of range")
    return d, sq, of


def unpack(data: Any, seqs: Any, offs: Any, n: int) -> List[Tuple[int, bytes]]:
    """``[(seq, payload bytes), ...]`` from a read's buffers."""
    d, sq, of = _views(data, seqs, offs, n, "unpack")
    return [(sq[i], bytes(d[of[i]:of[i + 1]])) for i in range(n)]


def ids(prefix: str, first: int, n: int) -> List[str]:
    """``[prefix + 16 lowercase hex digits of seq, ...]`` for ``first .. first + n - 1``."""
    if not prefix.isascii():
        raise ValueError("ids: prefix must be ASCII")
    if n < 0:
        raise ValueError("ids: n must be >= 0")
    return [f"{prefix}{s:016x}" for s in range(first, first + n)]


class MessageBase:
    """The fields of a delivered message (``qlog._glue.MessageBase`` in C)."""

    __slots__ = ("_q", "_seq", "_attempts", "_outcome", "_payload", "_body", "_split", "__weakref__")

    _body: Any
    """The decoded body (unset until :attr:`body` is first read)."""

    if TYPE_CHECKING:  # pragma: no cover
        def _decode_body(self) -> Any:
            """The body decoded for its content type (``qlog.Message`` defines it)."""

    def __init__(self, q: Any, seq: int, attempts: int, payload: bytes, peeked: bool = False) -> None:
        if type(payload) is not bytes:
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        self._q: Any = q
        self._seq = seq
        self._attempts = attempts
        self._outcome = 3 if peeked else 0
        self._payload = payload
        self._split: Optional[Parts] = None

    @property
    def attempts(self) -> int:
        """Deliveries of this message so far, this one included (read-only)."""
        return self._attempts

    @property
    def body(self) -> Any:
        """The body, decoded back to the type it was sent as."""
        try:
            return self._body
        except AttributeError:
            pass
        p = self._payload
        if len(p) >= 16 and p[0] == 1 and p[1] == _CT_BYTES and p[2] == 0 and p[3] == 0:
            b = p[16:]
        else:
            b = self._decode_body()
        self._body = b
        return b


def _make(cls: type[MessageBase], q: Any, seq: int, payload: bytes) -> MessageBase:
    m = cls.__new__(cls)
    MessageBase.__init__(m, q, seq, 1, payload)
    return m


def scan_messages(data: Any, seqs: Any, offs: Any, n: int, now: int, ret: int,
                  cls: Optional[type[MessageBase]] = None, q: Any = None,
                  ) -> Tuple[List[int], List[int], List[Any], List[int], List[int], List[int], List[int]]:
    """Sort a read of a message log by each message's header: ``(new, new_sent,
    new_payloads, deferred, deferred_due, deferred_sent, expired)``; with
    ``(cls, q)`` new_payloads holds new messages of ``cls`` instead."""
    if cls is not None and (not isinstance(cls, type) or not issubclass(cls, MessageBase) or q is None):
        raise TypeError("scan_messages: cls must be a MessageBase subclass, with q")
    d, sq, of = _views(data, seqs, offs, n, "scan_messages")
    new: List[int] = []
    new_sent: List[int] = []
    new_p: List[Any] = []
    dfr: List[int] = []
    dfr_due: List[int] = []
    dfr_sent: List[int] = []
    exp: List[int] = []
    unpack_from = _DELAY_SENT.unpack_from
    for i in range(n):
        a, b = of[i], of[i + 1]
        sent, delay_us = now, 0
        if b - a >= 16:
            delay_ms, sent = unpack_from(d, a + 4)
            delay_us = delay_ms * 1000
        seq = sq[i]
        if ret >= 0 and sent + ret <= now:
            exp.append(seq)
        elif delay_us and sent + delay_us > now:
            dfr.append(seq)
            dfr_due.append(sent + delay_us)
            dfr_sent.append(sent)
        else:
            p = bytes(d[a:b])
            new_p.append(_make(cls, q, seq, p) if cls is not None else p)
            new.append(seq)
            new_sent.append(sent)
    return new, new_sent, new_p, dfr, dfr_due, dfr_sent, exp
