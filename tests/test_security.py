"""Security basics: file modes, pickle opt-in, queue names that never reach a
path, a read-only ``qlog verify`` and ``qlog repair``.

Every command runs as a real ``python -m qlog`` process on real files; the
damage is done with the byte-level helpers of ``tests/damage.py``."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import time
from array import array
from typing import Dict, Iterator, List, Set, Tuple

import pytest
from damage import flip_byte, records, segment_base, segments, truncate_to
from test_cli import run_cli, tree

import qlog
from qlog._check import rebuild_state
from qlog._state import encode

BIG = 1 << 16  # segment_bytes: a few batches per segment, several segments


# -- helpers ------------------------------------------------------------------------


@pytest.fixture
def umask0() -> Iterator[None]:
    """Run with umask 0, so the modes seen are exactly the modes asked for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: pathlib.Path) -> Dict[str, int]:
    """Permission bits of every file and directory under ``root`` (itself included)."""
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(base, name)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


Snapshot = Dict[str, Tuple]


def snapshot(root: pathlib.Path) -> Snapshot:
    """Every file's bytes, mode and mtime_ns, every directory's mode, mtime_ns and listing."""
    out: Snapshot = {}
    for base, dirs, files in os.walk(root):
        st = os.stat(base)
        out[os.path.relpath(base, root) + "/"] = (st.st_mode, st.st_mtime_ns, tuple(sorted(dirs + files)))
        for name in files:
            p = os.path.join(base, name)
            st = os.stat(p)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = (f.read(), st.st_mode, st.st_mtime_ns)
    return out


def fill(d: pathlib.Path, name: str, batches: int = 16, per: int = 10, **settings: object) -> List[str]:
    """Send ``batches`` batches of ``per`` bodies ``b"<n>:xxx..."`` (about 1 KB
    each) to queue ``name``; returns the ids in order."""
    ids: List[str] = []
    with qlog.open(d) as b:
        q = b.queue(name, segment_bytes=BIG, **settings)
        for i in range(batches):
            ids += q.send_batch([b"%d:" % (i * per + j) + b"x" * 1000 for j in range(per)],
                                content_type="bytes")
    return ids


def drain(d: pathlib.Path, name: str, later: float = 0.0) -> List[int]:
    """Pull and ack every message of ``name`` (with the clock ``later`` seconds
    ahead, so leases taken before have run out); their numbers, in order."""
    got: List[int] = []
    with qlog.open(d, clock=lambda: time.time() + later) as b:
        q = b.queue(name)
        while True:
            batch = q.pull(100)
            if not batch.messages:
                return got
            got += [int(m.body.split(b":")[0]) for m in batch.messages]
            batch.ack_all()


def seq_of(msg_id: str) -> int:
    return int(msg_id[16:], 16)


# -- 1. file modes ---------------------------------------------------------------------


def _exercise(d: pathlib.Path, **open_args: object) -> None:
    """Create every kind of file a broker makes: segments and their indexes,
    meta, ctl, lock, queue.json, checkpoint, paused, a dead-letter queue."""
    with qlog.open(d, **open_args) as b:
        q = b.queue("jobs", segment_bytes=BIG, max_retries=0, dead_letter_queue="dead")
        for _ in range(3):  # more than a segment: the first is sealed
            q.send_batch([b"x" * 1000] * 30, content_type="bytes")
        assert len(q.pull(2).messages) == 2  # reads the sealed segment: its .idx is written
        q.pull(10).retry_all()  # max_retries=0: dead-lettered into "dead"
        assert len(b.queue("dead").peek(10)) == 10
        q.pause_delivery()


KINDS = ["qlog-format", "queues", "queues/jobs", "queues/jobs/queue.json", "queues/jobs/messages",
         "queues/jobs/state", "queues/jobs/lock", "queues/jobs/checkpoint", "queues/jobs/paused",
         "queues/jobs/messages/meta", "queues/jobs/messages/ctl", "queues/jobs/messages/lock",
         "queues/jobs/messages/00000000000000000000.seg", "queues/jobs/messages/00000000000000000000.idx",
         "queues/jobs/state/00000000000000000000.seg", "queues/dead/messages/00000000000000000000.seg"]


@pytest.mark.parametrize("mode, dmode", [(None, 0o700), (0o640, 0o750), (0o660, 0o770), (0o644, 0o755)])
def test_every_file_and_directory_gets_the_mode(tmp_path, umask0, mode, dmode) -> None:
    d = tmp_path / "data"
    _exercise(d, **({} if mode is None else {"mode": mode}))
    fmode = 0o600 if mode is None else mode
    seen = modes(d)
    for kind in KINDS:
        assert kind in seen, f"{kind} was not created: the test does not cover it"
    want = {p: (dmode if os.path.isdir(d / p) else fmode) for p in seen}
    assert seen == want


def test_the_log_alone_gets_the_mode(tmp_path, umask0) -> None:
    for mode, dmode in ((None, 0o700), (0o664, 0o775)):
        where = tmp_path / f"log{mode}"
        with qlog.Log(where, **({} if mode is None else {"mode": mode})) as log:
            log.append(b"a")
        assert modes(where) == {".": dmode, "lock": mode or 0o600, "ctl": mode or 0o600,
                                "meta": mode or 0o600, "00000000000000000000.seg": mode or 0o600}


def test_existing_directories_keep_their_mode(tmp_path, umask0) -> None:
    d = tmp_path / "data"
    d.mkdir(mode=0o755)
    _exercise(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755  # never chmod'ed
    assert stat.S_IMODE(os.stat(d / "queues").st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o400, 0o200, 0o4600, 0o1600, -1, 0o10600, True, "0o600", 1.5])
def test_a_bad_mode_is_refused_and_nothing_is_created(tmp_path, mode) -> None:
    with pytest.raises(qlog.SettingsError, match=r"mode must be a file mode from 0o600 to 0o666"):
        qlog.open(tmp_path / "data", mode=mode)
    with pytest.raises(ValueError, match=r"mode must be a file mode from 0o600 to 0o666"):
        qlog.Log(tmp_path / "log", mode=mode)
    assert tree(tmp_path) == []


# -- 2. pickle ----------------------------------------------------------------------


class _Trap:
    """Unpickling it creates a directory: proof that a body was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (self.marker,))


def test_a_pickle_body_is_never_unpickled_by_a_queue_that_did_not_opt_in(tmp_path) -> None:
    d, marker = tmp_path / "data", tmp_path / "unpickled"
    with qlog.open(d) as b:
        b.queue("p", allow_pickle=True).send(_Trap(str(marker)), content_type="pickle")
        b.queue("p", allow_pickle=True, max_retries=0, dead_letter_queue="dlq")
    with qlog.open(d) as b:  # opened again without allow_pickle
        q = b.queue("p", max_retries=0, dead_letter_queue="dlq")
        batch = q.pull(10)
        (m,) = batch.messages
        assert m.content_type == "pickle"
        with pytest.raises(qlog.PickleNotAllowedError, match="allow_pickle=True"):
            m.body
        batch.retry_all()  # dead-lettered: its bytes move, still not unpickled
        (dead,) = b.queue("dlq").pull(10).messages
        with pytest.raises(qlog.PickleNotAllowedError):
            dead.body
        assert q.peek(10) == []
    assert not marker.exists()
    p = run_cli("peek", d, "dlq", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["messages"][0]["body_encoding"] == "base64"
    assert not marker.exists()


def test_a_push_consumer_of_a_queue_that_did_not_opt_in_never_unpickles(tmp_path) -> None:
    d, marker = tmp_path / "data", tmp_path / "unpickled"
    with qlog.open(d) as b:
        b.queue("p", allow_pickle=True).send(_Trap(str(marker)), content_type="pickle")
    seen: List[str] = []
    with qlog.open(d) as b:

        @b.consumer("p", max_batch_timeout=0, max_retries=0)
        def handle(batch):  # type: ignore[no-untyped-def]
            for m in batch.messages:
                try:
                    m.body
                except qlog.PickleNotAllowedError as e:
                    seen.append(str(e))
            b.stop()

        b.run(handle_signals=False)
    assert len(seen) == 1 and "allow_pickle" in seen[0]
    assert not marker.exists()


def test_the_cli_cannot_send_a_pickle(tmp_path) -> None:
    p = run_cli("send", tmp_path / "data", "jobs", "x", "--content-type", "pickle", cwd=tmp_path)
    assert p.returncode == 2 and "invalid choice: 'pickle'" in p.stderr
    assert tree(tmp_path) == []


# -- 3. names never reach a path ----------------------------------------------------------

HOSTILE = ["../x", "a/b", "..", ".", "", "x" * 64, "a\x00b", "/etc", "a\\b", "a b", "jobs\n",
           "\uff4aobs", "j\u043ebs", "\u0661\u0662", "caf\u00e9", "a.b", "~", "$HOME"]


@pytest.mark.parametrize("name", HOSTILE, ids=[repr(n) for n in HOSTILE])
def test_a_hostile_queue_name_is_refused_and_creates_nothing(tmp_path, name) -> None:
    d = tmp_path / "data"
    with qlog.open(d) as b:
        before = tree(tmp_path)
        with pytest.raises(qlog.InvalidQueueNameError, match="use 1 to 63 characters"):
            b.queue(name)
        with pytest.raises(qlog.InvalidQueueNameError):
            b.queue("ok", dead_letter_queue=name)
        with pytest.raises(qlog.InvalidQueueNameError):
            b.consumer(name)(lambda batch: None)
        assert tree(tmp_path) == before


def test_the_longest_name_is_one_path_component(tmp_path) -> None:
    d = tmp_path / "data"
    with qlog.open(d) as b:
        b.queue("x" * 63).send(1)
    assert sorted(os.listdir(d / "queues")) == ["x" * 63]


def test_path_like_message_content_creates_no_file(tmp_path) -> None:
    d = tmp_path / "data"
    with qlog.open(d) as b:
        b.queue("jobs")
    before = tree(tmp_path)
    with qlog.open(d) as b:
        q = b.queue("jobs")
        q.send_batch([b"../../evil", b"/tmp/evil\x00x", b"a/b/c"], content_type="bytes")
        q.send("../../evil2", content_type="text")
        q.send({"path": "../../evil3", "queue": "../x"})
        assert len(q.pull(10).messages) == 5
    after = set(tree(tmp_path))
    # only the data files of the existing queue changed: no name holds the content
    assert not [p for p in after if "evil" in p or p.startswith("a")]
    assert {p.split(os.sep)[0] for p in after} == {"data"}
    assert set(before) <= after
    assert {p for p in after - set(before)} <= {p for p in after if p.startswith("data/queues/jobs/")}


CLI_NAMES = ["../x", "a/b", "..", "x" * 64, "\uff4aobs", ""]


@pytest.mark.parametrize("args", [
    *[["send", "{d}", n, "1"] for n in CLI_NAMES],
    ["peek", "{d}", "../x"], ["pause", "{d}", "a/b"], ["purge", "{d}", "..", "--yes"],
    ["verify", "{d}", "../x"], ["repair", "{d}", "../jobs"], ["repair", "{d}", "\uff4aobs", "--dry-run"],
    ["dlq", "redrive", "{d}", "../x"],
], ids=lambda a: " ".join(map(repr, a)))
def test_the_cli_refuses_a_hostile_name_with_exit_2_and_creates_nothing(tmp_path, args) -> None:
    d = tmp_path / "data"
    with qlog.open(d) as b:
        b.queue("jobs")
    before = snapshot(tmp_path)
    p = run_cli(*[a.format(d=d) for a in args], cwd=tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "invalid queue name" in p.stderr
    assert snapshot(tmp_path) == before


# -- 4. verify is read-only and names the damage ---------------------------------------------


def _damaged_dir(d: pathlib.Path) -> Dict[str, object]:
    """Five queues, each damaged one way; returns what was done to each."""
    for name in ("flip", "torn", "cut", "header", "ckpt"):
        fill(d, name)
        with qlog.open(d) as b:
            b.queue(name).pull(15).ack_all()  # a checkpoint at close
    out: Dict[str, object] = {}
    msgs = {n: d / "queues" / n / "messages" for n in ("flip", "torn", "cut", "header")}
    seg = segments(msgs["flip"])[0]  # sealed
    victim = records(seg)[5]
    flip_byte(seg, victim.offset + victim.size // 2)
    out["flip"] = (segment_base(seg), victim)
    active = segments(msgs["torn"])[-1]
    last = records(active)[-1]
    truncate_to(active, last.offset + last.size - 8)  # the last record cut short: a torn write
    out["torn"] = (segment_base(active), last)
    seg = segments(msgs["cut"])[1]  # sealed, in the middle of the log
    recs = records(seg)
    truncate_to(seg, recs[len(recs) // 2].offset + 40)
    out["cut"] = (segment_base(seg), recs, len(recs) // 2, segment_base(segments(msgs["cut"])[2]))
    seg = segments(msgs["header"])[1]
    flip_byte(seg, 40)  # a reserved byte of the header: the header CRC fails
    out["header"] = segment_base(seg)
    flip_byte(d / "queues" / "ckpt" / "checkpoint", 30)
    return out


def test_verify_is_read_only_and_names_every_damage(tmp_path) -> None:
    d = tmp_path / "data"
    what = _damaged_dir(d)
    before = snapshot(tmp_path)
    p = run_cli("verify", d)
    doc = json.loads(run_cli("verify", d, "--json").stdout)
    assert snapshot(tmp_path) == before  # no byte, mode, mtime or name changed; nothing created
    assert p.returncode == 1, p.stdout + p.stderr
    assert doc["ok"] is False
    dmg = {(e["queue"], e["log"]): e["damage"] for e in doc["logs"]}
    pre = {q["queue"]: q["id_prefix"] for q in doc["queues"]}

    base, victim = what["flip"]
    (x,) = dmg[("flip", "messages")]
    assert (x["segment"], x["offset"], x["length"], x["kind"]) == (base, victim.offset, victim.size, "record")
    assert (x["first_seq"], x["last_seq"]) == (victim.seq, victim.seq)
    assert x["first_id"] == f"{pre['flip']}{victim.seq:016x}"
    assert f"messages affected: seq {victim.seq} (ids {pre['flip']}{victim.seq:016x})" in p.stdout

    base, last = what["torn"]
    (x,) = dmg[("torn", "messages")]
    assert (x["segment"], x["kind"], x["last_seq"]) == (base, "torn-tail", None)
    assert x["first_seq"] <= last.seq and "recovery cuts it on the next open" in x["detail"]

    base, recs, k, next_base = what["cut"]
    (x,) = dmg[("cut", "messages")]
    assert (x["segment"], x["kind"], x["last_seq"]) == (base, "damaged-tail", next_base - 1)
    assert x["first_seq"] <= recs[k].seq  # from the end of the last whole batch kept

    (x,) = dmg[("header", "messages")]
    assert (x["segment"], x["offset"], x["kind"], x["first_seq"]) == (what["header"], 0, "segment-header", None)

    (ck,) = [q for q in doc["queues"] if q["queue"] == "ckpt"][0]["problems"]
    assert (ck["file"], ck["kind"]) == ("queues/ckpt/checkpoint", "checkpoint") and "CRC" in ck["detail"]
    assert "queues/ckpt: damage: queues/ckpt/checkpoint offset 0" in p.stdout
    for q in ("flip", "torn", "cut", "header", "ckpt"):
        assert not dmg[(q, "state")]


def test_verify_of_a_clean_directory_creates_and_locks_nothing(tmp_path) -> None:
    d = tmp_path / "data"
    fill(d, "jobs", batches=2)
    before = snapshot(tmp_path)
    p = run_cli("verify", d, "jobs")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1] == "ok: 20 records in 2 logs, no damage"
    assert snapshot(tmp_path) == before
