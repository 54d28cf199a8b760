"""Security basics: file modes, pickle opt-in, queue names that never reach a
path, a read-only ``qlog verify`` and ``qlog repair``.

Every command runs as a real ``python -m qlog`` process on real files; the
damage is done with the byte-level helpers of ``tests/damage.py``."""

from __future__ import annotations

import json
import os
import shutil
import pathlib
import stat
import time
from array import array
from typing import Dict, Iterator, List, Tuple

import pytest
from damage import flip_byte, records, segment_base, segments, truncate_to
from test_cli import run_cli, tree

import qlog
from qlog._local.check import rebuild_state
from qlog._local.state import encode

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


@pytest.mark.parametrize("entry", ['queue = "../x"', 'queue = "ok"\ndead_letter_queue = "../y"'])
def test_a_hostile_name_in_qlog_toml_is_refused_and_creates_nothing(tmp_path, entry) -> None:
    d = tmp_path / "data"
    qlog.open(d).close()
    (d / "qlog.toml").write_text(f"[[queues.consumers]]\n{entry}\n")
    before = snapshot(tmp_path)
    with pytest.raises(qlog.InvalidQueueNameError, match="use 1 to 63 characters"):
        qlog.open(d)
    assert snapshot(tmp_path) == before


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


# -- 5. repair ------------------------------------------------------------------------------


def test_repair_keeps_every_intact_message_and_names_the_lost_ones(tmp_path) -> None:
    d = tmp_path / "data"
    ids = fill(d, "jobs", batches=24)
    with qlog.open(d) as b:
        b.queue("jobs").pull(15).ack_all()  # messages 0..14 done
    msgs = d / "queues" / "jobs" / "messages"
    segs = segments(msgs)
    assert len(segs) >= 4
    victim = records(segs[0])[20]  # a record in the middle of a sealed segment
    flip_byte(segs[0], victim.offset + victim.size // 2)
    recs = records(segs[2])  # a sealed segment cut in the middle of a batch
    k = len(recs) // 2 + 3
    assert recs[k].flags & 2  # not a batch's first record
    truncate_to(segs[2], recs[k].offset + 40)
    last_batch_start = max(i for i, r in enumerate(records(segs[-1])) if not r.flags & 2)
    tail = records(segs[-1])
    truncate_to(segs[-1], tail[-1].offset + 16)  # torn tail of the active segment
    lost = {victim.seq}
    # a sealed segment is never cut back to a batch boundary: the cut
    # segment keeps every intact record, those of the cut batch too, as the
    # engine reads it
    whole = k
    lost |= {r.seq for r in recs[whole:]}
    lost |= {r.seq for r in tail[last_batch_start:]}
    before = snapshot(tmp_path)

    p = run_cli("repair", d, "--dry-run")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "would keep" in p.stdout and "nothing was changed" in p.stdout
    assert snapshot(tmp_path) == before

    p = run_cli("repair", d)
    assert p.returncode == 0, p.stdout + p.stderr
    pre = ids[0][:16]
    assert f"lost message seq {victim.seq} (ids {pre}{victim.seq:016x})" in p.stdout
    assert f"{pre}{recs[whole].seq:016x} to {pre}{segment_base(segs[3]) - 1:016x}" in p.stdout
    quarantined = sorted(n for n in os.listdir(msgs) if ".quarantined-" in n and ".seg." in n)
    assert [n[:24] for n in quarantined] == [os.path.basename(s) for s in (segs[0], segs[2], segs[-1])]
    for n in quarantined:  # the damaged originals, byte for byte
        assert (msgs / n).read_bytes() == before[os.path.relpath(msgs / n[:24], tmp_path)][0]
    v = run_cli("verify", d)
    assert v.returncode == 0, v.stdout + v.stderr

    got = drain(d, "jobs", later=3600)
    want = sorted(set(range(len(ids))) - lost - set(range(15)))
    assert sorted(got) == want  # every intact message not done, once
    with qlog.open(d) as b:  # and the queue takes new messages after the repaired tail
        new = b.queue("jobs").send(b"new:", content_type="bytes")
    assert seq_of(new) > max(seq_of(i) for i in ids[:-10])


def test_repair_rebuilds_the_state_after_a_damaged_checkpoint_without_losing_a_message(tmp_path) -> None:
    d = tmp_path / "data"
    fill(d, "jobs", batches=3)  # 30 messages
    with qlog.open(d) as b:
        q = b.queue("jobs")
        done = [m for m in q.pull(10).messages]
        for m in done:
            m.ack()
        held = q.pull(5).messages  # leased, never acked: not done
        assert len(held) == 5
    ck = d / "queues" / "jobs" / "checkpoint"
    flip_byte(ck, 40)
    before = ck.read_bytes()
    p = run_cli("repair", d)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "checkpoint: damaged; is kept as checkpoint.quarantined-" in p.stdout
    (q_name,) = [n for n in os.listdir(ck.parent) if n.startswith("checkpoint.quarantined-")]
    assert (ck.parent / q_name).read_bytes() == before
    assert run_cli("verify", d).returncode == 0
    got = drain(d, "jobs", later=3600)
    assert set(got) >= set(range(10, 30))  # nothing that was not done is lost
    assert len(got) == len(set(got))


def test_repair_refuses_while_a_process_has_the_queue_open(tmp_path, spawn_python) -> None:
    d = tmp_path / "data"
    fill(d, "jobs", batches=8)
    seg = segments(d / "queues" / "jobs" / "messages")[0]
    flip_byte(seg, records(seg)[3].offset + 40)
    child = spawn_python(
        "import sys, qlog\n"
        "b = qlog.open(sys.argv[1]); q = b.queue('jobs')\n"
        "print('open', flush=True)\n"
        "sys.stdin.readline()\n"
        "b.close()\n", [str(d)])
    assert child.stdout.readline().strip() == "open"
    before = snapshot(tmp_path)
    p = run_cli("repair", d)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "queue 'jobs' is open in another process" in p.stderr and "nothing was changed" in p.stderr
    assert snapshot(tmp_path) == before
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.wait(timeout=60) == 0
    p = run_cli("repair", d)
    assert p.returncode == 0, p.stdout + p.stderr
    assert run_cli("verify", d).returncode == 0


def _pull(deadline: int, frm: int, to: int, new: List[int], sent: int = 1) -> bytes:
    """A pull record leasing ``new`` until ``deadline`` (µs), moving the cursor ``frm`` -> ``to``."""
    e: List[int] = []
    return encode(b"P", [deadline, frm, to, 0, 0], [new, [sent] * len(new), e, e, e, e, e, e, e])


def test_rebuild_state_delivers_again_what_a_lost_pull_record_hid() -> None:
    msgs = {s: bytes(16) for s in range(12)}  # header: version 0 is not read; sent 0, delay 0
    journal = [
        (0, _pull(99, 0, 5, [0, 1, 2, 3, 4])),
        (1, encode(b"A", [], [array("q", [0, 1])])),
        # record 2, the pull of 5..7, was lost to damage
        (3, _pull(99, 8, 10, [8, 9])),
        (4, encode(b"A", [], [array("q", [6, 8])])),
    ]
    st = rebuild_state(None, msgs, journal)
    assert st.applied == 5 and st.cursor == 10
    assert sorted(st.pending) == [2, 3, 4, 9]
    assert st.unknown == [(5, 6), (7, 8)]  # delivered again; 6 acked after the gap still counts
    assert st.floor() == 2 and st.acked == 4


def test_repair_of_a_damaged_state_journal_delivers_again_what_the_damage_hid(tmp_path) -> None:
    d = tmp_path / "data"
    fill(d, "jobs", batches=3)  # 30 messages
    with qlog.open(d) as b:
        q = b.queue("jobs")
        q.pull(5).ack_all()  # 0..4 done
        held = q.pull(5).messages  # 5..9: leased, not done; this pull record gets damaged
        q.pull(5).ack_all()  # 10..14 done
    assert [int(m.body.split(b":")[0]) for m in held] == list(range(5, 10))
    (seg,) = segments(d / "queues" / "jobs" / "state")
    pulls = [r for r in records(seg) if r.payload[:1] == b"P"]
    flip_byte(seg, pulls[1].offset + pulls[1].size - 12)
    (ck,) = [n for n in os.listdir(d / "queues" / "jobs") if n == "checkpoint"]
    os.unlink(d / "queues" / "jobs" / ck)  # replay from the journal alone
    p = run_cli("verify", d)
    assert p.returncode == 1 and "queues/jobs/state: " in p.stdout and "kind record" in p.stdout
    p = run_cli("repair", d)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"lost journal record seq {pulls[1].seq}" in p.stdout and "rebuild the consumer state" in p.stdout
    assert run_cli("verify", d).returncode == 0
    got = drain(d, "jobs", later=3600)
    assert set(got) >= set(range(5, 10)) | set(range(15, 30))  # the hidden pull's messages come back
    assert len(got) == len(set(got))


def test_a_sealed_segment_cut_at_a_batch_boundary_is_found_through_its_index(tmp_path) -> None:
    d = tmp_path / "data"
    fill(d, "jobs", batches=20)
    with qlog.open(d) as b:
        assert len(b.queue("jobs").peek(1000)) == 200  # reads every segment: sealed ones get an index
    msgs = d / "queues" / "jobs" / "messages"
    segs = segments(msgs)
    seg = segs[1]
    assert os.path.exists(seg[:-4] + ".idx")
    recs = records(seg)
    starts = [i for i, r in enumerate(recs) if not r.flags & 2]  # first record of each batch
    k = starts[len(starts) // 2]
    truncate_to(seg, recs[k].offset)  # no torn bytes: only the index knows
    p = run_cli("verify", d, "--json")
    assert p.returncode == 1
    (x,) = json.loads(p.stdout)["logs"][0]["damage"]
    assert (x["kind"], x["segment"], x["first_seq"], x["last_seq"]) == (
        "truncated", segment_base(seg), recs[k].seq, segment_base(segs[2]) - 1)
    p = run_cli("repair", d)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"lost message seqs {recs[k].seq}-{segment_base(segs[2]) - 1}" in p.stdout
    assert run_cli("verify", d).returncode == 0
    assert sorted(drain(d, "jobs")) == sorted(set(range(200)) - set(range(recs[k].seq, segment_base(segs[2]))))


@pytest.mark.parametrize("payload", [b"\x01", b"Z\x00\x00", b"A\x00\x01\x05\x00\x00\x00"],
                         ids=["short", "unknown-tag", "array-past-end"])
def test_a_journal_record_that_cannot_be_applied_is_reported_and_repaired(tmp_path, payload) -> None:
    d = tmp_path / "data"
    fill(d, "jobs", batches=2)
    with qlog.open(d) as b:
        b.queue("jobs").pull(5).ack_all()
    with qlog.Log(d / "queues" / "jobs" / "state", durability="none") as log:
        bad = log.append(payload)  # a valid record (CRC and all) that replay cannot apply
    p = run_cli("verify", d)
    assert p.returncode == 1 and f"journal record {bad} passes its CRC but cannot be applied" in p.stdout
    p = run_cli("repair", d)
    assert p.returncode == 0, p.stdout + p.stderr
    assert run_cli("verify", d).returncode == 0
    assert sorted(drain(d, "jobs", later=3600)) == list(range(5, 20))


def test_missing_pull_records_are_a_journal_gap_and_repair_delivers_what_they_hid(tmp_path) -> None:
    d = tmp_path / "data"
    ids = fill(d, "jobs", batches=3)  # 30 messages
    with qlog.open(d) as b:
        b.queue("jobs").pull(10).ack_all()  # cursor 10
    with qlog.Log(d / "queues" / "jobs" / "state", durability="none") as log:
        gap = log.append(_pull(0, 20, 22, [20, 21], sent=int(time.time() * 1e6)))  # as if the pulls of 10..19 had been lost
    p = run_cli("verify", d, "--json")
    assert p.returncode == 1
    (x,) = json.loads(p.stdout)["queues"][0]["problems"]
    assert (x["kind"], x["first_seq"]) == ("journal-gap", gap)
    assert f"messages 10-19 (ids {ids[10]} to {ids[19]}) is unknown, so replay delivers them again" in x["detail"]
    unrepaired = tmp_path / "unrepaired"
    shutil.copytree(d, unrepaired)
    p = run_cli("repair", d)
    assert p.returncode == 0, p.stdout + p.stderr
    assert run_cli("verify", d).returncode == 0
    assert sorted(drain(d, "jobs", later=3600)) == list(range(10, 30))
    # Opening without a repair delivers them again too (the replay rule).
    assert sorted(drain(unrepaired, "jobs", later=3600)) == list(range(10, 30))
