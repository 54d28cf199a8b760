"""Every bad input a user, a configuration file or a damaged disk can give
a queue, in one table.

Each row expects a specific exception class whose message names the
problem and the limit, and a queue left exactly as it was: every file's
bytes and the directory listing under the data directory are the same
before and after (the ``lock`` files, which exist already and are only
flock'd, included).  A few damaged-disk rows expect a documented outcome
instead of an exception (the ``outcome`` column); their docstrings say
what it is.

More detailed tests of some rows live in test_queue.py and
test_queue_settings.py; this table is the list of them all.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import crc32c
import pytest

import qlog
from _simvfs import syscalls
from qlog._settings import MAX_SEND_BATCH_BYTES
from qlog._local.state import _CKPT_VERSION

N_MESSAGES = 70      # in the queue before each row: three segments
SEG = 64 << 10       # message segments: several, so that one can be damaged


class Env:
    """A data directory with queue ``q`` holding N_MESSAGES messages, one of
    them delivered and held (``msg``), under an open broker (``broker``).

    Durability "none": no background fsync updates the logs' control files
    while a row runs (input checks do not depend on the mode)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.broker = qlog.open(path, durability="none")
        self.q = self.broker.queue("q", segment_bytes=SEG)
        for i in range(N_MESSAGES):
            self.q.send(b"%04d" % i + b"." * 3000, content_type="bytes")
        self.batch = self.q.pull(1)
        self.msg = self.batch.messages[0]
        self.qdir = os.path.join(path, "queues", "q")

    def close(self) -> None:
        self.broker.close()

    def reopen(self) -> qlog.Queue:
        self.broker = qlog.open(self.path, durability="none")
        self.q = self.broker.queue("q", segment_bytes=SEG)
        return self.q

    def segments(self) -> List[str]:
        d = os.path.join(self.qdir, "messages")
        return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".seg"))


def snapshot(root: str) -> Dict[str, Any]:
    """Every file's bytes (a symlink: its target) and every directory under ``root``."""
    out: Dict[str, Any] = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root) + "/"] = "dir"
        for name in files:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            else:
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


def diff(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ---- damage to files, done with the broker closed ------------------------------------


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def toml(text: str) -> Callable[[Env], None]:
    return lambda env: write(os.path.join(env.path, "qlog.toml"), text.encode())


def format_file(text: bytes) -> Callable[[Env], None]:
    return lambda env: write(os.path.join(env.path, "qlog-format"), text)


def checkpoint(fn: Callable[[bytes], bytes]) -> Callable[[Env], None]:
    def damage(env: Env) -> None:
        p = os.path.join(env.qdir, "checkpoint")
        with open(p, "rb") as f:
            write(p, fn(f.read()))
    return damage


def recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", crc32c.crc32c(body))


def flip_crc(b: bytes) -> bytes:
    return b[:-1] + bytes([b[-1] ^ 0xFF])


def magic(b: bytes) -> bytes:
    return recrc(b"NOTACKPT" + b[8:-4])


def newer_version(b: bytes) -> bytes:
    return recrc(b[:8] + struct.pack("<I", _CKPT_VERSION + 1) + b[12:-4])


def only(name: str, data: bytes) -> Callable[[Env], None]:
    """Empty the data directory but for one file."""
    def damage(env: Env) -> None:
        shutil.rmtree(env.path)
        os.mkdir(env.path)
        write(os.path.join(env.path, name), data)
    return damage


def symlink_middle_segment(env: Env) -> None:
    seg = env.segments()[1]
    target = os.path.join(env.path, "elsewhere.seg")
    os.rename(seg, target)
    os.symlink(target, seg)


# ---- the rows --------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    act: Callable[[Env], Any]
    exc: Type[BaseException]
    words: Tuple[str, ...]          # each must appear in the message
    damage: Optional[Callable[[Env], None]] = None   # done with the broker closed; act reopens
    prep: Optional[Callable[[Env], None]] = None     # done before the snapshot (e.g. settings)


def R(id: str, act: Callable[[Env], Any], exc: Type[BaseException], *words: str,
      damage: Optional[Callable[[Env], None]] = None,
      prep: Optional[Callable[[Env], None]] = None) -> Row:
    return Row(id, act, exc, words, damage, prep)


def big_messages(env: Env) -> None:
    """Let queue "q" take 16 MiB bodies (a setting stored with the queue)."""
    env.broker.queue("q", max_message_size=16 * MiB, segment_bytes=SEG)


def send(body: Any, **kw: Any) -> Callable[[Env], Any]:
    return lambda env: env.q.send(body, **kw)


def batch(items: Any, **kw: Any) -> Callable[[Env], Any]:
    return lambda env: env.q.send_batch(items, **kw)


def queue_kw(**kw: Any) -> Callable[[Env], Any]:
    return lambda env: env.broker.queue("q", **kw)


def opened(env: Env) -> Any:
    """Open the directory afresh and use the queue as a consumer would."""
    b = qlog.open(env.path, durability="none")
    try:
        q = b.queue("q", segment_bytes=SEG)
        q.stats()
        return q.pull(100)
    finally:
        b.close()


class CommandFailed(Exception):
    """``qlog`` (the command) exited non-zero: ``args`` = (status, stderr)."""


def cli(*argv: str) -> Callable[[Env], Any]:
    """Run the ``qlog`` command in this process; raise CommandFailed with its
    exit status and error output unless it succeeds."""
    def act(env: Env) -> None:
        from qlog._cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main([a.replace("{dir}", env.path) for a in argv])
            except SystemExit as e:     # argparse's own usage errors
                code = e.code
        if code:
            raise CommandFailed(f"exit status {code}: {err.getvalue()}")
    return act


def on_nfs(act: Callable[[Env], Any]) -> Callable[[Env], Any]:
    """``act`` with every filesystem reported as NFS (statfs through the
    engine's syscall table)."""
    def nfs(path, out):  # type: ignore[no-untyped-def]
        out[0] = 0x6969   # NFS_SUPER_MAGIC
        return 0

    def run(env: Env) -> Any:
        with syscalls(fs_type=nfs):
            return act(env)
    return run


def nothing(env: Env) -> None:
    """No damage: the row only needs the broker closed."""


MiB = 1 << 20
Req = qlog.MessageSendRequest
LIMIT = "131072"     # the default max_message_size
big = b"x" * (128 * 1024 + 1)


circ: List[Any] = []
circ.append(circ)

HOSTILE_NAMES = ["../x", "a/b", "", "x" * 64, "a\0b", ".", "..", "a b", "q\n", "ä", None, 7]

ROWS: List[Row] = [
    # -- sizes
    R("message-too-large", send(big, content_type="bytes"), qlog.MessageTooLargeError, "131073", LIMIT),
    R("json-message-too-large", send("x" * (128 * 1024)), qlog.MessageTooLargeError, "131074", LIMIT),
    R("text-message-too-large", send("é" * 65537, content_type="text"), qlog.MessageTooLargeError, "131074", LIMIT),
    R("batch-message-too-large", batch([b"ok", big], content_type="bytes"), qlog.MessageTooLargeError,
      "message 1 of the batch", LIMIT, "nothing was sent"),
    R("batch-request-too-large", batch([Req(b"ok", content_type="bytes"), Req(big, content_type="bytes")]),
      qlog.MessageTooLargeError, "message 1 of the batch", LIMIT),
    R("batch-1001-messages", batch([1] * 1001), qlog.BatchTooLargeError, "1001", "1000"),
    R("batch-empty", batch([]), qlog.BatchTooLargeError, "1 to 1000", "none"),
    R("batch-too-many-bytes", lambda env: env.broker.queue("q").send_batch(
        [b"x" * MiB] * 257, content_type="bytes"), qlog.BatchTooLargeError,
      str(257 * MiB), str(MAX_SEND_BATCH_BYTES), "nothing was sent", prep=big_messages),
    R("batch-requests-too-many-bytes", lambda env: env.broker.queue("q").send_batch(
        [Req(b"x" * MiB, content_type="bytes")] * 257), qlog.BatchTooLargeError, str(MAX_SEND_BATCH_BYTES),
      prep=big_messages),
    # -- content types and bodies
    R("unknown-content-type", send("x", content_type="yaml"), qlog.ContentTypeError, "'yaml'", "json"),
    R("content-type-not-a-string", send("x", content_type=5), qlog.ContentTypeError, "5", "json"),
    R("batch-unknown-content-type", batch(["x"], content_type="xml"), qlog.ContentTypeError, "'xml'"),
    R("request-unknown-content-type", batch([Req("x", content_type="xml")]), qlog.ContentTypeError, "'xml'"),
    R("text-body-not-str", send(5, content_type="text"), qlog.BodyTypeError, "'text'", "str", "int"),
    R("bytes-body-not-bytes", send("x", content_type="bytes"), qlog.BodyTypeError, "'bytes'"),
    R("json-unserialisable", send(object()), qlog.BodyTypeError, "JSON", "object"),
    R("json-set", send({"a": {1, 2}}), qlog.BodyTypeError, "JSON", "set"),
    R("json-nan", send(float("nan")), qlog.BodyTypeError, "JSON", "float"),
    R("json-infinity", send([float("inf")]), qlog.BodyTypeError, "JSON", "float"),
    R("json-circular", send(circ), qlog.BodyTypeError, "JSON", "ircular"),
    R("batch-json-nan", batch([1, 2, float("nan")]), qlog.BodyTypeError, "message 2 of the batch", "JSON"),
    R("batch-json-circular", batch([1, circ]), qlog.BodyTypeError, "message 1 of the batch", "ircular"),
    R("pickle-not-allowed", send(1, content_type="pickle"), qlog.PickleNotAllowedError, "allow_pickle"),
    R("batch-pickle-not-allowed", batch([Req(1, content_type="pickle")]), qlog.PickleNotAllowedError,
      "allow_pickle"),
    # -- delays
    *[R(f"send-delay-{v!r}", send(1, delay_seconds=v), qlog.DelayOutOfRangeError, "delay_seconds", "86400")
      for v in (-1, 86_401, float("nan"), float("inf"), "5", True)],
    R("batch-delay", batch([1], delay_seconds=86_401), qlog.DelayOutOfRangeError, "86400"),
    R("request-delay", batch([Req(1, delay_seconds=-0.5)]), qlog.DelayOutOfRangeError,
      "delay_seconds of message 0", "86400"),
    *[R(f"retry-delay-{v!r}", lambda env, v=v: env.msg.retry(delay_seconds=v), qlog.DelayOutOfRangeError,
        "delay_seconds", "86400") for v in (-1, 86_401, float("nan"))],
    R("retry-all-delay", lambda env: env.batch.retry_all(delay_seconds=10 ** 6), qlog.DelayOutOfRangeError,
      "86400"),
    # -- pull options
    *[R(f"pull-batch-size-{v!r}", lambda env, v=v: env.q.pull(v), qlog.BatchTooLargeError, "batch_size", "1000")
      for v in (0, 1001, True, 2.0)],
    *[R(f"pull-visibility-{v!r}", lambda env, v=v: env.q.pull(1, visibility_timeout=v), qlog.SettingsError,
        "visibility_timeout", "43200") for v in (0, 43_201, float("nan"))],
    R("pull-wait", lambda env: env.q.pull(1, wait=-1), qlog.SettingsError, "wait", "43200"),
    # -- queue settings
    *[R(f"setting-{k}-{v!r}", queue_kw(**{k: v}), qlog.SettingsError, repr(k), *limit)
      for k, v, limit in [
          ("max_retries", -1, ("100",)), ("max_retries", 101, ("100",)), ("max_retries", "3", ("integer",)),
          ("max_retries", True, ("integer",)), ("max_batch_size", 0, ("100",)), ("max_batch_size", 101, ("100",)),
          ("max_batch_timeout", 61, ("60",)), ("retry_delay", -1, ("86400",)), ("retry_delay", 86_401, ("86400",)),
          ("retry_delay", float("nan"), ("86400",)), ("delivery_delay", -1, ("86400",)),
          ("visibility_timeout", 0, ("0.001", "43200")), ("visibility_timeout", 43_201, ("43200",)),
          ("message_retention", 59, ("60", "1209600")), ("message_retention", 1_209_601, ("1209600",)),
          ("message_retention", "forever", ("number",)), ("max_message_size", 0, ("1",)),
          ("max_message_size", 16 * MiB + 1, (str(16 * MiB),)), ("max_concurrency", 251, ("250",)),
          ("segment_bytes", 1000, ("65536",)), ("durability", "fast", ("sync",)),
          ("allow_pickle", "yes", ("true or false",)), ("colour", "red", ("known settings",)),
      ]],
    R("own-dead-letter-queue", queue_kw(dead_letter_queue="q"), qlog.SettingsError, "own dead_letter_queue"),
    R("open-durability", lambda env: qlog.open(env.path, durability="fast"), qlog.SettingsError,
      "durability", "sync"),
    # -- names: queue(), consumer registration, dead-letter queue, qlog.toml
    *[R(f"queue-name-{n!r}", lambda env, n=n: env.broker.queue(n), qlog.InvalidQueueNameError,
        "1 to 63 characters") for n in HOSTILE_NAMES],
    *[R(f"consumer-name-{n!r}", lambda env, n=n: env.broker.consumer(n), qlog.InvalidQueueNameError,
        "1 to 63 characters") for n in HOSTILE_NAMES],
    *[R(f"dlq-name-{n!r}", lambda env, n=n: env.broker.queue("q", dead_letter_queue=n),
        qlog.InvalidQueueNameError, "dead_letter_queue", "1 to 63 characters") for n in HOSTILE_NAMES[:-2]],
    *[R(f"consumer-dlq-name-{n!r}", lambda env, n=n: env.broker.consumer("q", dead_letter_queue=n),
        qlog.InvalidQueueNameError, "dead_letter_queue", "1 to 63 characters") for n in ("../x", "a/b", "x" * 64)],
    *[R(f"cli-send-name-{n!r}", cli("send", "{dir}", n, "1"), CommandFailed, "exit status 2", "1 to 63 characters")
      for n in HOSTILE_NAMES[:-2]],
    R("cli-send-body-not-json", cli("send", "{dir}", "q", "{nope"), CommandFailed, "exit status", "JSON"),
    R("cli-send-delay", cli("send", "{dir}", "q", "1", "--delay", "86401"), CommandFailed, "exit status 2",
      "86400"),
    R("toml-queue-name", opened, qlog.InvalidQueueNameError, "'../x'", "1 to 63",
      damage=toml('[[queues.consumers]]\nqueue = "../x"\n')),
    R("toml-dlq-name", opened, qlog.InvalidQueueNameError, "'a/b'", "1 to 63",
      damage=toml('[[queues.consumers]]\nqueue = "q"\ndead_letter_queue = "a/b"\n')),
    # -- qlog.toml
    R("toml-unknown-top-key", opened, qlog.SettingsError, "'colour'", "qlog.toml", damage=toml('colour = "red"\n')),
    R("toml-unknown-section", opened, qlog.SettingsError, "'queues.workers'",
      damage=toml('[[queues.workers]]\nqueue = "q"\n')),
    R("toml-unknown-setting", opened, qlog.SettingsError, "'max_retriez'", "known settings",
      damage=toml('[[queues.consumers]]\nqueue = "q"\nmax_retriez = 3\n')),
    R("toml-wrong-type", opened, qlog.SettingsError, "'max_retries'", "integer",
      damage=toml('[[queues.consumers]]\nqueue = "q"\nmax_retries = "3"\n')),
    R("toml-out-of-range", opened, qlog.SettingsError, "'max_retries'", "100",
      damage=toml('[[queues.consumers]]\nqueue = "q"\nmax_retries = 101\n')),
    R("toml-durability", opened, qlog.SettingsError, "'durability'", "sync", damage=toml('durability = "fast"\n')),
    R("toml-queues-not-a-table", opened, qlog.SettingsError, "'queues'", "table", damage=toml("queues = 5\n")),
    R("toml-consumers-not-an-array", opened, qlog.SettingsError, "queues.consumers", "array",
      damage=toml('[queues.consumers]\nqueue = "q"\n')),
    R("toml-missing-queue", opened, qlog.SettingsError, "'queue'", damage=toml("[[queues.consumers]]\nmax_retries = 1\n")),
    R("toml-syntax", opened, qlog.SettingsError, "not valid TOML", damage=toml("max_retries = = 3\n")),
    R("toml-not-utf8", opened, qlog.SettingsError, "not valid TOML",
      damage=lambda env: write(os.path.join(env.path, "qlog.toml"), b"durability = \"\xff\"\n")),
    R("new-dir-bad-toml", opened, qlog.SettingsError, "'max_retries'", "100",
      damage=only("qlog.toml", b'[[queues.consumers]]\nqueue = "q"\nmax_retries = 101\n')),
    # -- the data directory's format
    R("new-dir-format-newer", opened, qlog.FormatError, "format 7", "format 1", damage=only("qlog-format", b"7\n")),
    R("format-newer", opened, qlog.FormatError, "format 2", "format 1", damage=format_file(b"2\n")),
    R("format-garbage", opened, qlog.FormatError, "qlog-format", "b'banana'", damage=format_file(b"banana\n")),
    R("format-empty", opened, qlog.FormatError, "qlog-format", damage=format_file(b"")),
    # -- a damaged state checkpoint: refused, naming the file; nothing is guessed
    R("checkpoint-bad-crc", opened, qlog.CorruptStateError, "checkpoint", "CRC", damage=checkpoint(flip_crc)),
    R("checkpoint-wrong-magic", opened, qlog.CorruptStateError, "checkpoint", "magic", damage=checkpoint(magic)),
    R("checkpoint-truncated", opened, qlog.CorruptStateError, "checkpoint", "CRC",
      damage=checkpoint(lambda b: b[:-3])),
    R("checkpoint-shorter-than-header", opened, qlog.CorruptStateError, "checkpoint", "shorter than its header",
      damage=checkpoint(lambda b: b[:10])),
    R("checkpoint-empty", opened, qlog.CorruptStateError, "checkpoint", "shorter than its header",
      damage=checkpoint(lambda b: b"")),
    R("checkpoint-newer-version", opened, qlog.FormatError, f"checkpoint format version {_CKPT_VERSION + 1}",
      f"1 to {_CKPT_VERSION}",
      damage=checkpoint(newer_version)),
    # -- NFS (refused by qlog.open before anything is created, and by the engine)
    R("nfs-data-dir", on_nfs(opened), qlog.UnsupportedFilesystemError, "NFS", "local filesystem", damage=nothing),
    R("nfs-new-data-dir", on_nfs(lambda env: qlog.open(os.path.join(env.path, "new", "dir"))),
      qlog.UnsupportedFilesystemError, "NFS", damage=nothing),
    R("nfs-log", on_nfs(lambda env: qlog.Log(os.path.join(env.path, "log"))), qlog.UnsupportedFilesystemError,
      "NFS", damage=nothing),
    # -- a segment that is a symbolic link: refused, the link is not followed
    R("segment-symlink", opened, qlog.StorageError, "symbolic link", "does not follow",
      damage=symlink_middle_segment),
]


def _ids() -> List[str]:
    seen = set()
    for r in ROWS:
        assert r.id not in seen, f"duplicate row id {r.id}"
        seen.add(r.id)
    return [r.id for r in ROWS]


@pytest.fixture
def env(tmp_path):
    e = Env(str(tmp_path / "data"))
    yield e
    e.close()


@pytest.mark.parametrize("row", ROWS, ids=_ids())
def test_bad_input_raises_a_specific_error_and_changes_nothing(env, row):
    if row.damage is not None:
        env.close()                   # checkpoints the state
        # Opening a log after writes settles its bookkeeping once (the
        # sequence reservation in `meta`, the active segment's allocation);
        # do that before the snapshot, then damage the files.
        env.reopen()
        env.close()
        row.damage(env)
    if row.prep is not None:
        row.prep(env)
    before = snapshot(env.path)
    with pytest.raises(row.exc) as e:
        row.act(env)
    msg = str(e.value)
    for w in row.words:
        assert w in msg, f"{row.id}: {w!r} is not in the message {msg!r}"
    if row.exc is qlog.StorageError:
        assert e.value.errno == errno.ELOOP, repr(e.value)
    changed = diff(before, snapshot(env.path))
    assert not changed, f"{row.id}: the queue changed: {changed}"
    if row.damage is None:
        # the queue still works: every message is delivered, intact
        env.msg.ack()
        got = []
        while True:
            b = env.q.pull(100)
            if not b.messages:
                break
            got += [m.body for m in b.messages]
            b.ack_all()
        assert sorted(got) == [b"%04d" % i + b"." * 3000 for i in range(1, N_MESSAGES)]


# ---- damaged disk rows with an outcome rather than an exception ------------------------


def test_segment_truncated_in_the_middle_opens_and_delivers_every_intact_message(env):
    """A sealed segment cut short (its tail gone): the queue opens, every
    intact message is delivered exactly once, the messages of the missing
    part are not (and nothing corrupt is); the damaged file itself is left
    as it was for inspection, and the log's ``verify()`` reports the damage
    (``qlog verify`` names the messages affected).

    The queue does not count the skipped messages itself: a gap in message
    numbers is also what a reboot leaves (numbers reserved before it are
    skipped), so only ``verify`` can tell damage from a gap."""
    env.msg.ack()
    env.close()
    seg = env.segments()[1]
    os.truncate(seg, os.path.getsize(seg) // 2)
    damaged = open(seg, "rb").read()
    q = env.reopen()
    assert open(seg, "rb").read() == damaged, "opening changed the damaged segment"
    assert [d.kind for d in q._b._msgs.verify().damage], "verify() does not report the damage"
    got = []
    while True:
        b = q.pull(100)
        if not b.messages:
            break
        got += [m.body for m in b.messages]
        b.ack_all()
    nums = [int(g[:4]) for g in got]
    assert all(g == b"%04d" % n + b"." * 3000 for g, n in zip(got, nums)), "a corrupt message was delivered"
    assert len(nums) == len(set(nums)), "a message was delivered twice"
    missing = sorted(set(range(1, N_MESSAGES)) - set(nums))
    # exactly a run of messages of the damaged segment, none of the others
    first = int(os.path.basename(seg)[:20])
    assert missing and missing == list(range(missing[0], missing[-1] + 1)), missing
    assert first <= missing[0] and missing[-1] < int(os.path.basename(env.segments()[2])[:20]), missing
    assert q.stats().backlog == 0


def test_zz_count():
    """The size of the table, for the record."""
    print(f"\nbad inputs in the table: {len(ROWS)} rows + 1 outcome test")
    assert len(ROWS) >= 100
