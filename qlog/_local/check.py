"""Checking and repairing a data directory without the engine.

:func:`check_dir` is what ``qlog verify`` runs.  It reads every file with
the pure-Python reader of ``docs/FORMAT.md`` (:mod:`qlog._pure`), shares no
code with the writer's recovery, and changes nothing: every file is opened
read-only, nothing is created, locked, recovered or cut.  A torn tail is
reported as what recovery would cut on the next open, and left in place.

:func:`repair_dir` is what ``qlog repair`` runs.  With every lock of the
queue taken (so no process has it open), it replaces each damaged segment by
one holding the intact records with their sequence numbers, moves the
damaged file aside (``<name>.quarantined-<time>``, never deleted), and
rebuilds the consumer state when the checkpoint or the state journal was
damaged (:func:`rebuild_state`: never drops a message that is not done;
may deliver some again).
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .. import errors
from .._log.files import fsync_dir, replace_durably
from .._log.modes import DEFAULT_FILE_MODE
from .._log.pure import (
    FLAG_BATCH_CONT, FLAG_BATCH_MORE, Damage, Record, decode_index, decode_meta, encode_record,
    encode_segment_header, iter_segment, segment_files,
)
from .state import QueueState, check_record, decode as decode_journal_record, write_checkpoint

__all__ = ["Problem", "LogCheck", "QueueCheck", "check_dir", "check_queue", "repair_queue",
           "rebuild_state", "QueueBusyError", "lost_text"]

LOGS = ("messages", "state")


class QueueBusyError(errors.QlogError):
    """A process has the queue open: it cannot be repaired now."""


@dataclass
class Problem:
    """One thing wrong in a queue's files."""

    queue: str
    file: str
    """Path relative to the data directory."""
    offset: Optional[int]
    length: Optional[int]
    kind: str
    """'record', 'segment-header', 'not-a-segment', 'torn-tail' (the active
    segment's unfinished batch: what recovery would cut), 'damaged-tail' (a
    sealed segment ends in damage), 'truncated' (a sealed segment is shorter
    than its index says), 'journal-record', 'checkpoint', 'journal-gap',
    'meta', 'queue.json'."""
    detail: str
    first_seq: Optional[int] = None
    """First sequence number affected (message log: a message; state: a journal record)."""
    last_seq: Optional[int] = None
    """Last one affected; None when open-ended (an unfinished batch)."""
    segment: Optional[int] = None
    after_seq: Optional[int] = None

    @property
    def log(self) -> Optional[str]:
        """'messages' or 'state' when the problem is in one of the queue's logs."""
        parts = self.file.split(os.sep)
        return parts[2] if len(parts) > 2 and parts[0] == "queues" and parts[2] in LOGS else None

    def ids(self, id_prefix: Optional[str]) -> Optional[Tuple[str, Optional[str]]]:
        """Message ids of the first and last message affected (message log only)."""
        if id_prefix is None or self.first_seq is None or self.log != "messages":
            return None
        last = None if self.last_seq is None else f"{id_prefix}{self.last_seq:016x}"
        return f"{id_prefix}{self.first_seq:016x}", last

    def seq_text(self) -> str:
        if self.first_seq is None:
            return ""
        if self.last_seq is None:
            return f"seq {self.first_seq} onward (an unfinished batch)"
        if self.last_seq == self.first_seq:
            return f"seq {self.first_seq}"
        return f"seqs {self.first_seq}-{self.last_seq}"


@dataclass
class SegmentCheck:
    base: int
    path: str
    active: bool
    seqs: List[int]
    damage: List[Damage]


@dataclass
class LogCheck:
    """One log of a queue (``messages`` or ``state``)."""

    queue: str
    log: str
    path: str
    records: int = 0
    segments: List[SegmentCheck] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)
    error: Optional[str] = None


@dataclass
class QueueCheck:
    name: str
    path: str
    id_prefix: Optional[str]
    logs: List[LogCheck]
    problems: List[Problem]
    """Problems outside the two logs (checkpoint, journal coverage, queue.json)."""

    @property
    def all_problems(self) -> List[Problem]:
        out = [p for lg in self.logs for p in lg.problems]
        return out + self.problems


def _rel(root: str, path: str) -> str:
    return os.path.relpath(path, root)


def _read(path: str) -> bytes:
    """The bytes of ``path``, opened read-only."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def check_meta(data: bytes) -> Optional[str]:
    """What is wrong with a ``meta`` file's bytes (FORMAT.md), or None."""
    try:
        decode_meta(data)
    except errors.FormatError as e:
        return str(e)
    return None


def check_log(root: str, queue: str, log: str) -> LogCheck:
    """Read every segment of one log with the pure reader; report damage."""
    path = os.path.join(root, "queues", queue, log)
    out = LogCheck(queue, log, path)
    if not os.path.isdir(path):
        out.error = "directory is missing"
        out.problems.append(Problem(queue, _rel(root, path), None, None, "missing", "the log directory is missing"))
        return out
    segs = segment_files(path)
    for i, (base, seg) in enumerate(segs):
        found: List[Damage] = []
        active = i == len(segs) - 1
        try:
            seqs = [r.seq for r in iter_segment(seg, damage=found, sealed=not active,
                                                end_seq=None if active else segs[i + 1][0])]
        except OSError as e:
            out.problems.append(Problem(queue, _rel(root, seg), None, None, "unreadable", str(e), segment=base))
            continue
        out.segments.append(SegmentCheck(base, seg, active, seqs, found))
        out.records += len(seqs)
        next_base = segs[i + 1][0] if not active else None
        for d in found:
            out.problems.append(_problem(root, queue, seg, base, active, next_base, seqs, d))
        if not active:
            _check_index(root, queue, seg, base, seqs, next_base, out)
    meta = os.path.join(path, "meta")
    if os.path.exists(meta):
        why = check_meta(_read(meta))
        if why:
            out.problems.append(Problem(queue, _rel(root, meta), 0, None, "meta", why))
    return out


def _check_index(root: str, queue: str, seg: str, base: int, seqs: List[int],
                 next_base: Optional[int], out: LogCheck) -> None:
    """A sealed segment shorter than its (intact) index says was cut."""
    idx = seg[:-4] + ".idx"
    if not os.path.exists(idx):
        return
    try:
        ix = decode_index(_read(idx))
    except errors.FormatError:
        return  # a cache: rebuilt by the next reader
    size = os.path.getsize(seg)
    if ix.base == base and ix.segment_length > size:
        first = seqs[-1] + 1 if seqs else base
        last = next_base - 1 if next_base is not None else None
        if not any(p.kind in ("damaged-tail", "not-a-segment") and p.segment == base for p in out.problems):
            out.problems.append(Problem(
                queue, _rel(root, seg), size, ix.segment_length - size, "truncated",
                f"sealed segment is {size} bytes, its index says {ix.segment_length}",
                first_seq=first if last is None or first <= last else None,
                last_seq=last if last is None or first <= last else None,
                segment=base, after_seq=seqs[-1] if seqs else None))


def _problem(root: str, queue: str, seg: str, base: int, active: bool, next_base: Optional[int],
             seqs: List[int], d: Damage) -> Problem:
    rel = _rel(root, seg)
    after = d.after_seq
    first: Optional[int] = base if after is None else after + 1
    later = [s for s in seqs if s > (after if after is not None else base - 1)]
    last: Optional[int]
    if d.kind == "record":
        last = (later[0] - 1) if later else (next_base - 1 if next_base is not None else None)
        detail = "a damaged region in the middle of the segment (bit rot or an overwrite)"
    elif d.kind == "segment-header":
        return Problem(queue, rel, d.offset, d.length, d.kind,
                       "the segment header fails its checks; its records were read with the salt they carry",
                       segment=base)
    elif d.kind == "not-a-segment":
        last = next_base - 1 if next_base is not None else None
        detail = "the file is too short to be a segment or holds no readable record"
    elif active:
        return Problem(queue, rel, d.offset, d.length, "torn-tail",
                       f"an unfinished write of {d.length} bytes at the end of the active segment: "
                       "recovery cuts it on the next open (its batch was never acknowledged)",
                       first, None, segment=base, after_seq=after)
    else:
        last = next_base - 1 if next_base is not None else None
        d = d._replace(kind="damaged-tail")
        detail = "a sealed segment ends in damage (cut short or overwritten)"
    if first is not None and last is not None and last < first:
        first = last = None  # no sequence number lies in the damaged bytes
    return Problem(queue, rel, d.offset, d.length, d.kind, detail, first, last, segment=base, after_seq=after)


def _id_prefix(qdir: str) -> Tuple[Optional[str], Optional[str]]:
    path = os.path.join(qdir, "queue.json")
    try:
        doc = json.loads(_read(path))
        pre = doc["id_prefix"]
        if not (isinstance(pre, str) and len(pre) == 16 and all(c in "0123456789abcdef" for c in pre)):
            raise ValueError(f"id_prefix {pre!r} is not 16 hex digits")
        return pre, None
    except FileNotFoundError:
        return None, "queue.json is missing"
    except (ValueError, KeyError, TypeError) as e:
        return None, f"queue.json does not parse: {e}"


def journal_record_error(payload: bytes) -> Optional[str]:
    """Why a state journal record (that passed its CRC) cannot be applied,
    or None: the replica's own check (:func:`~qlog._local.state.check_record`)."""
    try:
        check_record(payload)
    except (ValueError, struct.error) as e:
        return str(e)
    return None


def _pull_gap(journal: LogCheck, applied: int, cursor: int) -> Optional[Tuple[int, int, int]]:
    """``(journal seq, cursor, frm)`` of the first pull record, replaying from
    ``applied`` with the message cursor at ``cursor``, that starts past the
    cursor: pull records before it are missing (FORMAT.md: each pull record
    holds the cursor before and after it; a purge raises the cursor)."""
    for sg in journal.segments:
        for r in iter_segment(sg.path, sealed=not sg.active):
            if r.seq < applied or journal_record_error(r.payload):
                continue
            tag, sc, _ = decode_journal_record(r.payload)
            if tag == b"P" and len(sc) >= 3:
                if sc[1] > cursor:
                    return r.seq, cursor, sc[1]
                cursor = max(cursor, sc[2])
            elif tag == b"X" and sc:
                cursor = max(cursor, sc[0])
    return None


def check_queue(root: str, name: str) -> QueueCheck:
    """Every check of one queue: both logs, journal records, checkpoint, coverage."""
    qdir = os.path.join(root, "queues", name)
    pre, why = _id_prefix(qdir)
    problems: List[Problem] = []
    if why:
        problems.append(Problem(name, _rel(root, os.path.join(qdir, "queue.json")), None, None, "queue.json", why))
    logs = [check_log(root, name, log) for log in LOGS]
    journal = logs[1]
    for sg in journal.segments:
        for r in iter_segment(sg.path, sealed=not sg.active):
            why = journal_record_error(r.payload)
            if why:
                journal.problems.append(Problem(
                    name, _rel(root, sg.path), None, None, "journal-record",
                    f"journal record {r.seq} passes its CRC but cannot be applied: {why}",
                    r.seq, r.seq, segment=sg.base))
    ck = os.path.join(qdir, "checkpoint")
    start: Optional[Tuple[int, int]] = (0, 0)  # (journal position, message cursor) replay starts at
    if os.path.exists(ck):
        try:
            st = QueueState.from_snapshot(_read(ck))
            start = (st.applied, st.cursor)
        except errors.QlogError as e:
            start = None
            problems.append(Problem(name, _rel(root, ck), 0, os.path.getsize(ck), "checkpoint", str(e)))
    if start is not None:
        gap = _pull_gap(journal, *start)
        if gap is not None:
            seq, cursor, frm = gap
            ids = "" if pre is None else f" (ids {pre}{cursor:016x} to {pre}{frm - 1:016x})"
            problems.append(Problem(
                name, _rel(root, journal.path), None, None, "journal-gap",
                f"pull records are missing before journal record {seq}: what became of messages "
                f"{cursor}-{frm - 1}{ids} is unknown, so replay delivers them again (duplicates "
                "possible, attempts start over)", seq, seq))
    return QueueCheck(name, qdir, pre, logs, problems)


def queue_names(root: str) -> List[str]:
    qroot = os.path.join(root, "queues")
    try:
        names = os.listdir(qroot)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if os.path.isdir(os.path.join(qroot, n)))


def check_dir(root: str, names: Optional[Sequence[str]] = None) -> List[QueueCheck]:
    """Check every queue of a data directory (or those named), read-only."""
    return [check_queue(root, n) for n in (queue_names(root) if names is None else names)]


# -- repair ---------------------------------------------------------------------------


class _Locks:
    """Every lock of a queue, taken exclusively without waiting: the queue's
    ``lock`` and each log's ``lock`` (held while a process opens the log)
    and ``ctl`` (every process with the log open holds a shared lock on
    it).  Only existing files are locked; none is created."""

    def __init__(self, qdir: str) -> None:
        self.fds: List[int] = []
        paths = [os.path.join(qdir, "lock")]
        for log in LOGS:
            paths += [os.path.join(qdir, log, "lock"), os.path.join(qdir, log, "ctl")]
        try:
            for p in paths:
                try:
                    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                self.fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise QueueBusyError(
                        f"queue {os.path.basename(qdir)!r} is open in another process ({p} is locked): "
                        "stop every producer and consumer of it, then run repair again; nothing was changed"
                    ) from None
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)  # drops the lock
        self.fds = []


def write_segment_records(path: str, base: int, records: Sequence[Record], mode: int) -> None:
    """Replace the segment file ``path`` atomically by one with segment base
    ``base`` holding ``records`` as they were (sequence numbers, timestamps,
    batch flags), with a new salt: temporary file, fsync, rename over
    ``path``, directory fsync."""
    salt = int.from_bytes(os.urandom(8), "little") | 1
    out = bytearray(encode_segment_header(base, salt, time.time_ns()))
    for r in records:
        out += encode_record(r.payload, r.seq, r.timestamp, salt,
                             more=bool(r.flags & FLAG_BATCH_MORE), cont=bool(r.flags & FLAG_BATCH_CONT))
    replace_durably(path, out, mode, tmp=path + ".repair.tmp", exact_mode=True)


def _quarantine(path: str, stamp: str) -> str:
    """Keep ``path``'s bytes under ``<path>.quarantined-<stamp>`` (a hard
    link: the original name stays until replaced)."""
    dest = f"{path}.quarantined-{stamp}"
    os.link(path, dest)
    fsync_dir(os.path.dirname(path))
    return dest


def rebuild_state(checkpoint: Optional[QueueState], messages: Dict[int, bytes],
                  journal: Sequence[Tuple[int, bytes]]) -> QueueState:
    """The consumer state after replaying ``journal`` (intact records, in
    order) on ``checkpoint`` (None when it was lost), without dropping a
    message that may not be done.

    This is the queue's own replay (``_local/state.py``, "Replay"): a range of
    messages the journal skips over (a pull record lost to damage) becomes
    an unknown range, delivered again.  Without a checkpoint the replay
    starts at the oldest intact message (``messages``: seq -> payload, the
    intact message log), so everything from there that the journal does not
    show as done is delivered again.  So a message that was not acked,
    dead-lettered, expired or purged is delivered again; one that was may
    be delivered again (at-least-once), and retry counts start over for
    the messages in such a range."""
    if checkpoint is None:
        st = QueueState()
        st.cursor = min(messages) if messages else 0
        st.applied = journal[0][0] if journal else 0
    else:
        st = checkpoint
    for seq, payload in journal:
        if seq < st.applied:
            continue
        st.applied = seq
        st.apply(payload)
        st.applied = seq + 1
    return st


def lost_text(p: Problem, pre: Optional[str]) -> str:
    ids = p.ids(pre)
    if not p.seq_text():
        return ""
    text = p.seq_text()
    if ids is not None:
        text += f" (ids {ids[0]}" + (f" to {ids[1]})" if ids[1] and ids[1] != ids[0] else
                                      ")" if ids[1] else " onward)")
    return text


def repair_queue(root: str, name: str, *, dry_run: bool = False,
                 stamp: Optional[str] = None) -> Tuple[QueueCheck, List[str]]:
    """Repair one queue (see the module docstring); returns the check made
    before and the lines describing what was done (or would be, with
    ``dry_run``).  Raises :class:`QueueBusyError` when a process has the
    queue open; nothing is changed then.

    Order, so that a crash part way leaves a queue that loses nothing more
    (and that a second run finishes): the rebuilt checkpoint is written
    first (from the intact records, which replacing segments does not
    change), then each damaged segment is replaced.  Every file replaced
    is first hard-linked to its quarantine name, then renamed over: its
    name always holds the old bytes or the new ones."""
    qdir = os.path.join(root, "queues", name)
    stamp = stamp or time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{os.getpid()}"
    locks = _Locks(qdir)
    try:
        chk = check_queue(root, name)
        lines: List[str] = []
        verb = "would " if dry_run else ""
        kept = "would be kept" if dry_run else "is kept"
        replace: List[Tuple[SegmentCheck, List[Record]]] = []
        rebuild = False
        for lg in chk.logs:
            bad = {p.segment for p in lg.problems if p.segment is not None}
            for s in lg.segments:
                if s.base not in bad:
                    continue
                rebuild = rebuild or lg.log == "state"
                for p in lg.problems:
                    if p.segment == s.base:
                        lost = lost_text(p, chk.id_prefix)
                        what = "message" if lg.log == "messages" else "journal record"
                        at = "" if p.offset is None else f" at offset {p.offset}"
                        lines.append(f"{_rel(root, s.path)}: {p.kind}{at}: " +
                                     (f"lost {what} {lost}" if lost else "no record lost"))
                recs = list(iter_segment(s.path, sealed=not s.active))
                if lg.log == "state":  # records replay would skip are not kept
                    recs = [r for r in recs if journal_record_error(r.payload) is None]
                lines.append(f"{_rel(root, s.path)}: {verb}keep {len(recs)} intact records in a replacement "
                             f"segment; the original {kept} as {os.path.basename(s.path)}.quarantined-{stamp}")
                replace.append((s, recs))
            for p in lg.problems:
                if p.segment is None and p.kind == "meta":
                    lines.append(f"{p.file}: {p.detail}: not repaired here: the engine writes a new one "
                                 "the next time the log is opened")
        ck = os.path.join(qdir, "checkpoint")
        ck_bad = any(p.kind == "checkpoint" for p in chk.problems)
        rebuild = rebuild or ck_bad or any(p.kind == "journal-gap" for p in chk.problems)
        if ck_bad:
            lines.append(f"{_rel(root, ck)}: damaged; {kept} as checkpoint.quarantined-{stamp}")
        if rebuild:
            msgs: Dict[int, bytes] = {}
            for s in chk.logs[0].segments:
                for r in iter_segment(s.path, sealed=not s.active):
                    msgs[r.seq] = r.payload
            journal = [(r.seq, r.payload) for s in chk.logs[1].segments
                       for r in iter_segment(s.path, sealed=not s.active)
                       if journal_record_error(r.payload) is None]
            base_state = None
            if os.path.exists(ck) and not ck_bad:
                base_state = QueueState.from_snapshot(_read(ck))
            st = rebuild_state(base_state, msgs, journal)
            lines.append(f"{_rel(root, ck)}: {verb}rebuild the consumer state from "
                         + ("the checkpoint" if base_state is not None else "the oldest intact message")
                         + f" and {len(journal)} intact journal records: {len(st.pending)} messages not done, "
                         f"cursor {st.cursor}; messages whose fate the damage hid are delivered again")
            if not dry_run:
                mode = DEFAULT_FILE_MODE
                if os.path.exists(ck):
                    mode = os.stat(ck).st_mode & 0o7777
                    _quarantine(ck, stamp)
                write_checkpoint(ck, st.snapshot(), mode)
        if not dry_run:
            for s, recs in replace:
                mode = os.stat(s.path).st_mode & 0o7777
                _quarantine(s.path, stamp)
                idx = s.path[:-4] + ".idx"
                if os.path.exists(idx):
                    os.rename(idx, f"{idx}.quarantined-{stamp}")  # a cache of the old bytes
                write_segment_records(s.path, s.base, recs, mode)
        for p in chk.problems:
            if p.kind == "queue.json":
                lines.append(f"{p.file}: {p.detail}: not repaired (message ids depend on it)")
        return chk, lines
    finally:
        locks.release()
