"""Power cuts of a whole broker: messages, state journal, checkpoints,
dead-letter transfers, retention and segment deletion together.

A child interpreter runs ``_powercut_queue.workload`` once on an empty
directory while a recorder (``_powertrace``) logs every durable image, every
durable directory map and a marker per thing the workload did or was told.
Then many cuts are taken from that one trace: each cut is a prefix of it.
For each, the directory the power cut leaves is built (durable names,
durable bytes, and in most cuts what the page cache may have written back
of each file's unsynced tail: any subset of its dirty pages, some of them
in an earlier version or torn at a sector), reopened as after a reboot
(another boot id), drained, and compared with what had to survive
(``check_after_cut``):

- every message whose "sync" send returned before the cut is delivered, or
  was acked or dead-lettered before it (or is old enough to have expired);
- no message comes back corrupt or unsent; a batch nobody had seen is all
  there or all gone;
- an ack whose journal record was durable is never undone, and a lease
  whose record was durable is never delivered again with fewer attempts;
- a message is pending at most once, and in the dead-letter queue too only
  as the same message (its original id);
- every queue takes a send and delivers it after the cut.

Besides the random cuts, every run makes cuts that write back a file's
unsynced tail out of order on purpose (``_explicit_cuts``): a later dirty
page kept and an earlier one lost (or torn), in the state journal (at the
workload's burst, whose pull records span pages) and in message segments;
and cuts that leave a checkpoint's temporary file named and torn.

``QLOG_POWERCUT_SEED=<n>`` reruns one child's workload and cuts (the push
consumer runs in a thread: a rerun repeats every choice of the workload and
of the cuts, not the exact interleaving of the threads);
``QLOG_POWERCUT_CUTS=<n>`` takes n cuts per child instead of CUTS.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import signal
import tempfile
from collections import Counter
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest

import _powercut_queue as pq
import qlog
import qlog._local.backend
import qlog._local.state
from _crashkit import Child
from _invariants import Report
from _powertrace import SECTOR, Replay, TraceRecorder, load, out_of_order_writeback
from _simvfs import boot_id_hook, new_boot_id, syscalls
from damage import records, segments, zero_pages_inside
from qlog._log import pure as _pure
from test_cli import run_cli

SEED = 20261129
CHILDREN = 4
STEPS = 260
CUTS = 130
MESSAGE_CUTS = 3        # out-of-order cuts of message segments, per child
JOURNAL_CUTS = 2        # out-of-order cuts of journal segments besides the burst's, per child
JOURNAL_POLICIES = ("journal", "journal-torn")   # the first dirty page lost, or torn


@pytest.fixture
def work_dir(tmp_path):
    """Where the workloads run and the cuts are built: a tmpfs when there is
    one (fsync is nearly free there; what a cut keeps comes from the trace,
    not from the filesystem), else ``tmp_path``."""
    base = "/dev/shm"
    if not (os.path.isdir(base) and os.access(base, os.W_OK)):
        yield tmp_path
        return
    d = tempfile.mkdtemp(prefix="qlog-powercut-", dir=base)
    try:
        yield pathlib.Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Cut(NamedTuple):
    pos: int                # trace position: events before it happened
    kind: str               # "random", a JOURNAL_POLICIES entry (the burst), "journal-other",
                            # "messages", "checkpoint-tmp"
    target: str = ""        # the file written back on purpose (relpath)
    ident: int = -1


def _cut_points(rng: random.Random, events, k: int):
    """``k`` trace positions, sorted; half of them just after a durable
    event (the moments where what is durable changes)."""
    n = len(events)
    durable = [i + 1 for i, e in enumerate(events) if e[0] in ("S", "D")]
    pts = [rng.randint(0, n) for _ in range(k - k // 2)]
    pts += [rng.choice(durable) + rng.choice([0, 0, 1]) for _ in range(k // 2)]
    return sorted(min(p, n) for p in pts)


_CHECKPOINT_TMP = re.compile(r"^queues/[^/]+/checkpoint\.\d+\.tmp$")


def _explicit_cuts(events, rng: random.Random) -> List[Cut]:
    """The cuts every run makes on purpose (their write-back: ``_writeback_for``):

    - at the workload's burst (its ``("burst", queue)`` marker: both pull
      records in the journal's unsynced tail), one cut with each of
      JOURNAL_POLICIES;
    - JOURNAL_CUTS more of state journal segments and MESSAGE_CUTS of
      message segments (one of a "sync" queue when there is one: a send in
      flight), each at a moment its unsynced tail spans two or more pages
      (between two of its fdatasyncs: the first such moment, and the one
      just before the fdatasync);
    - one moment a checkpoint's temporary file was written but not yet
      synced."""
    scan = Replay(events)
    burst: List[Cut] = []
    journal: List[Cut] = []
    msgs: List[Cut] = []
    tmps: List[Cut] = []
    first: Dict[int, int] = {}      # identity -> first multi-page moment since its last sync

    def segment(ident: int) -> Optional[str]:
        parts = scan.path.get(ident, "").split("/")
        if (len(parts) == 4 and parts[0] == "queues" and parts[3].endswith(".seg")
                and parts[2] in ("state", "messages") and scan.durably_named(ident)):
            return parts[2]
        return None

    def note(pos: int, ident: int) -> None:
        c = Cut(pos, "", scan.path[ident], ident)
        (journal if segment(ident) == "state" else msgs).append(c)

    for i, ev in enumerate(events):
        if ev[0] == "S":
            ident = ev[1]
            rel = scan.path.get(ident, "")
            if segment(ident) and len(scan.dirty(ident)[0]) >= 2 and first.get(ident) != i:
                note(i, ident)
            elif _CHECKPOINT_TMP.match(rel) and scan.live.get(ident) and ident not in scan.durable:
                tmps.append(Cut(i, "checkpoint-tmp", rel, ident))
            first.pop(ident, None)
        scan.advance(i + 1)
        if ev[0] == "W" and ev[1] not in first and segment(ev[1]) and len(scan.dirty(ev[1])[0]) >= 2:
            first[ev[1]] = i + 1
            note(i + 1, ev[1])
        elif ev[0] == "M" and ev[1][0] == "burst":
            prefix = f"queues/{ev[1][1]}/state/"
            tails = [k for k, rel in scan.path.items() if rel.startswith(prefix)
                     and segment(k) and len(scan.dirty(k)[0]) >= 2]
            assert len(tails) == 1, f"at the burst, {prefix} has {len(tails)} segments with a multi-page tail"
            burst += [Cut(i + 1, k, scan.path[tails[0]], tails[0]) for k in JOURNAL_POLICIES]
    out = burst + [c._replace(kind="journal-other") for c in rng.sample(journal, min(len(journal), JOURNAL_CUTS))]
    synced = [c for c in msgs if c.target.split("/")[1] in pq.SYNC_QUEUES]
    pick = rng.sample(synced, 1) if synced else []
    rest = [c for c in msgs if c not in pick]
    pick += rng.sample(rest, min(len(rest), MESSAGE_CUTS - len(pick)))
    out += [c._replace(kind="messages") for c in pick]
    out += rng.sample(tmps, min(len(tmps), 1))
    return out


def _writeback_for(cut: Cut, rng: random.Random):
    """``(choose, extra_names)`` for ``Replay.materialise`` at an explicit cut."""
    if cut.kind == "checkpoint-tmp":
        def torn_tmp(rel, dirty, versions):
            if rel != cut.target:
                return None
            # a named temporary file holding a prefix of its sectors (none
            # when it has only one: a sector is written whole or not at all)
            n = -(-len(versions[dirty[0]][-1]) // SECTOR) if dirty else 0
            return {dirty[0]: (-1, rng.randint(1, n - 1))} if n > 1 else {}
        return torn_tmp, {cut.target: cut.ident}
    tear_first = cut.kind == "journal-torn" or (cut.kind != "journal" and rng.random() < 0.5)
    policy = out_of_order_writeback(rng, tear_first=tear_first)
    return (lambda rel, dirty, versions: policy(rel, dirty, versions) if rel == cut.target else None), None


def run_child(tmp_path, seed: int):
    live = tmp_path / f"live-{seed}"
    live.mkdir()
    trace = tmp_path / f"trace-{seed}.pickle"
    with Child("workload", module="_powercut_queue", path=str(live), trace=str(trace),
               seed=seed, steps=STEPS) as child:
        child.wait_until(lambda c: any(line.startswith("done") for line in c.lines),
                         "the workload to finish", timeout=300)
    return load(str(trace))


def cut_many(tmp_path, seed: int, cuts: int, total: Report, stats: Counter,
             failures: List[Tuple[str, str]]) -> None:
    events = run_child(tmp_path, seed)
    rng = random.Random(seed)
    facts = pq.Facts()
    replay = Replay(events, on_durable=facts.on_durable)
    kinds = {k: sum(1 for e in events if e[0] == k) for k in "WSDMX"}
    plan = [Cut(p, "random") for p in _cut_points(rng, events, cuts)]
    explicit = _explicit_cuts(events, random.Random(seed ^ 0x5EED))
    plan = sorted(plan + explicit, key=lambda c: c.pos)
    for n, cut in enumerate(plan):
        replay.advance(cut.pos, facts.on_mark)
        out = str(tmp_path / f"cut-{seed}-{n}")
        explicit_cut = cut.kind != "random"
        tear = random.Random(rng.getrandbits(32)) if explicit_cut or rng.random() < 0.7 else None
        choose, extra = _writeback_for(cut, random.Random(rng.getrandbits(32))) if explicit_cut else (None, None)
        files = replay.materialise(out, tear, choose=choose, extra_names=extra)
        disorder = sorted(rel for rel, fc in files.items() if fc.out_of_order)
        torn = sorted(rel for rel, fc in files.items() if fc.torn)
        res = pq.check_after_cut(out, facts, replay, boot_id_hook(new_boot_id(rng)))
        total.add(res.report)
        stats["cuts"] += 1
        stats[f"cuts_{cut.kind}"] += 1
        stats["out_of_order"] += bool(disorder)
        stats["out_of_order_journal"] += any("/state/" in r for r in disorder)
        stats["out_of_order_messages"] += any("/messages/" in r for r in disorder)
        stats["torn_pages"] += bool(torn)
        stats["older_versions"] += any(fc.older for fc in files.values())
        stats["journal_gaps"] += bool(res.gaps)
        stats["gap_warnings"] += res.gap_warnings
        stats["dropped_unsynced"] += res.dropped
        stats["must_survive"] += res.must
        target = files.get(cut.target)
        if cut.kind not in ("random", "checkpoint-tmp"):
            # the explicit cut did what it is for
            stats["explicit_out_of_order"] += bool(target and target.out_of_order)
        if cut.kind in JOURNAL_POLICIES:
            stats["burst_gaps"] += res.gaps.get(pq.BULK) == [(0, pq.BULK_PULLS[0])]
        if res.error is not None:
            stats["failed_cuts"] += 1
            where = (f"seed {seed}, cut {n} ({cut.kind}{' of ' + cut.target if cut.target else ''}) "
                     f"at trace position {cut.pos} of {len(events)} ({kinds}); out of order {disorder}; "
                     f"torn {torn}; journal gaps {res.gaps}; rerun with QLOG_POWERCUT_SEED={seed}")
            failures.append((where, str(res.error)[:1500]))
        shutil.rmtree(out)
    stats["events"] += len(events)
    stats["durable_acks"] += sum(len(s) for s in facts.durable_acked.values())
    paths = {e[1]: e[2] for e in events if e[0] == "W"}
    gone = [paths[e[1]] for e in events if e[0] == "X" and paths.get(e[1], "").endswith(".seg")]
    stats["segments_deleted"] += sum(1 for p in gone if "/messages/" in p)
    stats["journal_segments_deleted"] += sum(1 for p in gone if "/state/" in p)
    stats["checkpoints"] += sum(1 for e in events if e[0] == "S" and "/checkpoint." in paths.get(e[1], ""))
    stats["dead_letter_transfers"] += sum(
        1 for e in events if e[0] == "M" and e[1][0] == "f" for f in e[1][1]
        if f.kind == "deliver" and f.queue == "work" and f.attempts == pq.MAX_RETRIES_PUSH + 1
        and pq.fails(f.key))


@pytest.mark.slow
def test_power_cuts_of_a_whole_broker(work_dir, monkeypatch, capsys):
    """CHILDREN workloads, CUTS random cuts of each plus the explicit ones;
    every cut passes the invariant checker, and the cuts covered out-of-order
    write-back (journal and message segments), torn pages, journal gaps,
    deleted message and journal segments, checkpoints (and their torn
    temporary files) and dead-letter transfers."""
    pq.small_state(monkeypatch.setattr)
    env_seed = os.environ.get("QLOG_POWERCUT_SEED")
    seeds = [int(env_seed)] if env_seed else [SEED + i for i in range(CHILDREN)]
    cuts = int(os.environ.get("QLOG_POWERCUT_CUTS", CUTS))
    total = Report()
    stats: Counter = Counter()
    failures: List[Tuple[str, str]] = []
    for seed in seeds:
        cut_many(work_dir, seed, cuts, total, stats, failures)
    with capsys.disabled():
        print(f"\npower cuts (seeds {seeds}): {dict(sorted(stats.items()))}\n  {total.line()}\n"
              f"  cuts={stats['cuts']} out_of_order={stats['out_of_order']} "
              f"(journal {stats['out_of_order_journal']}, message log {stats['out_of_order_messages']}) "
              f"torn_pages={stats['torn_pages']} journal_gaps={stats['journal_gaps']} "
              f"must_survive={stats['must_survive']} lost={total.lost} corrupt={total.corrupt} "
              f"duplicates={total.duplicates_in_flight + total.duplicates_otherwise} "
              f"(in flight {total.duplicates_in_flight}, otherwise {total.duplicates_otherwise}) "
              f"redelivered={total.redelivered} failed_cuts={stats['failed_cuts']}\n")
    assert not failures, (f"{len(failures)} of {stats['cuts']} cuts broke an invariant:\n  "
                          + "\n  ".join(f"{w}: {d.splitlines()[0]}" for w, d in failures)
                          + "\nthe first ones in full:\n" + "\n".join(f"{w}:\n{d}" for w, d in failures[:2]))
    assert stats["cuts_random"] == cuts * len(seeds)
    assert total.lost == 0 and total.corrupt == 0 and total.duplicates_otherwise == 0
    # the explicit cuts: out of order as meant; each burst cut left the gap
    # of the first pull record (0..599) before the second
    nexplicit = stats["cuts"] - stats["cuts_random"] - stats["cuts_checkpoint-tmp"]
    assert stats["explicit_out_of_order"] == nexplicit, stats
    assert stats["cuts_journal"] == stats["cuts_journal-torn"] == len(seeds), stats
    assert stats["burst_gaps"] == len(JOURNAL_POLICIES) * len(seeds), stats
    assert stats["gap_warnings"] >= stats["burst_gaps"], stats
    assert stats["cuts_journal-other"] == JOURNAL_CUTS * len(seeds), stats
    assert stats["cuts_messages"] == MESSAGE_CUTS * len(seeds), stats
    assert stats["cuts_checkpoint-tmp"] == len(seeds), stats
    # the cuts landed where they matter
    assert stats["out_of_order"] > stats["cuts"] // 4 and stats["torn_pages"] > stats["cuts"] // 10, stats
    assert stats["older_versions"], stats
    assert stats["segments_deleted"] and stats["journal_segments_deleted"] and stats["checkpoints"], stats
    assert total.dead_lettered and total.checked > stats["cuts"], total.line()


def test_a_new_queue_and_a_message_sent_to_it_survive_a_power_cut_right_after_the_send(
        tmp_path, monkeypatch):
    """The queue's directory is created, a "sync" send returns, and the
    power goes at once: after the reboot the queue is there with the message.
    (Its entry in queues/ must be made durable: the engine syncs only the
    directories below it.)"""
    live, out = tmp_path / "live", tmp_path / "after"
    live.mkdir()
    rec = TraceRecorder(str(live))
    proxy = rec.os_proxy()
    monkeypatch.setattr(qlog._local.state, "os", proxy)
    monkeypatch.setattr(qlog._local.backend, "os", proxy)
    monkeypatch.setattr(qlog._log.files, "os", proxy)
    with syscalls(**rec.engine_hooks()):
        broker = qlog.open(live)
        mid = broker.queue("jobs").send({"n": 1})
        replay = Replay(list(rec.events))   # the cut: now
        replay.advance(len(replay.events))
        replay.materialise(str(out))
        broker.close()
    monkeypatch.undo()
    with syscalls(boot_id=boot_id_hook(new_boot_id(random.Random(5)))):
        with qlog.open(out) as broker:
            assert broker.queues() == ["jobs"], f"after the cut the broker holds {broker.queues()}"
            got = broker.queue("jobs").pull()
            assert [(m.id, m.body) for m in got] == [(mid, {"n": 1})]


# ---- a hole in the state journal before a surviving pull record ---------------------
#
# The case an outside fault-injecting filesystem found: the page cache wrote
# back a later page of the journal's unsynced tail and not an earlier one.

HOLE_QUEUE = "jobs"
HOLE_SENT = 620
HOLE_PULLS = (600, 10)      # journal record 0: cursor 0 -> 600; record 1: 600 -> 610


def _use_engine(monkeypatch, engine: str) -> None:
    """Children run ``engine`` (they take it from QLOG_PURE)."""
    if engine == "pure":
        monkeypatch.setenv("QLOG_PURE", "1")
    else:
        monkeypatch.delenv("QLOG_PURE", raising=False)


def _cut_a_hole_before_the_second_pull(tmp_path: pathlib.Path) -> Tuple[pathlib.Path, List[str], int]:
    """A child sends HOLE_SENT messages ("sync"), pulls HOLE_PULLS (no ack)
    and is SIGKILLed; then the power cut: every whole page lying inside the
    journal's record 0 is zeroed (the page after it, holding the end of
    record 0 and all of record 1, reached the disk).  Returns the data
    directory, the ids sent and the journal sequence number of record 1."""
    d = tmp_path / "data"
    with Child("send_and_pull", module="_powercut_queue", path=str(d), queue=HOLE_QUEUE,
               n=HOLE_SENT, pulls=list(HOLE_PULLS)) as child:
        child.wait_line("pulled", timeout=120)
        child.kill()
        assert child.proc.returncode == -signal.SIGKILL, child.stderr
        (line,) = [x for x in child.lines if x.startswith("sent ")]
    ids = json.loads(line[len("sent "):])
    assert len(ids) == HOLE_SENT
    seg = segments(d / "queues" / HOLE_QUEUE / "state")[-1]
    recs = records(seg)
    assert [pq.pull_cursors(r.payload) for r in recs] == [(0, 600), (600, 610)], (
        f"the journal holds {[(r.seq, r.payload[:1], pq.pull_cursors(r.payload)) for r in recs]}")
    zeroed = zero_pages_inside(seg, recs[0].offset, recs[0].end)
    assert zeroed, f"record 0 ({recs[0].offset}..{recs[0].end}) holds no whole page"
    after = records(seg)
    assert [(r.seq, r.offset, r.payload) for r in after] == [(recs[1].seq, recs[1].offset, recs[1].payload)], (
        "the cut should leave record 1 intact and record 0 gone")
    return d, ids, recs[1].seq


def _drain_after_reboot(d: pathlib.Path, engine: str) -> Dict:
    """Reopen as after a reboot, in a child of ``engine``, and drain (leases
    of the killed process run out: the clock is an hour ahead)."""
    with Child("drain_after_reboot", module="_powercut_queue", path=str(d), queue=HOLE_QUEUE,
               boot_id=new_boot_id(random.Random(77)), later=3600.0) as child:
        child.wait_until(lambda c: c.eof, "the drain", timeout=180)
        assert child.finish() == 0, child.stderr
        (line,) = [x for x in child.lines if x.startswith("{")]
    out = json.loads(line)
    assert out["engine"] == engine
    # the engine took it for a reboot: both logs numbered past the reserve
    assert min(out["next_seq"].values()) >= _pure.SEQ_RESERVE, out["next_seq"]
    return out


def _assert_all_delivered(out: Dict, ids: List[str]) -> None:
    got = out["got"]
    assert set(got) <= set(ids), f"unknown ids delivered: {sorted(set(got) - set(ids))[:5]}"
    missing = [i for i, mid in enumerate(ids) if mid not in set(got)]
    assert not missing, (
        f"{len(missing)} of {len(ids)} messages whose \"sync\" send returned were never delivered "
        f"after the power cut (messages {missing[0]}..{missing[-1]}); {len(set(got))} came back; "
        f"warnings: {out['warnings'][:3]}")


@pytest.mark.parametrize("engine", ["c", "pure"])
def test_journal_hole_before_a_surviving_pull_redelivers_the_range(tmp_path, monkeypatch, engine):
    """620 messages sent ("sync"), 600 pulled (journal record 0), then 10
    (record 1), none acked; SIGKILL; the power cut loses the page inside
    record 0 and keeps record 1; reboot.  Record 1's cursor-before (600)
    lies above the replica's (0): what became of 0..599 is unknown, so they
    must be delivered again (duplicates and restarted attempts are allowed,
    loss is not): every one of the 620 is delivered at least once."""
    _use_engine(monkeypatch, engine)
    d, ids, _ = _cut_a_hole_before_the_second_pull(tmp_path)
    _assert_all_delivered(_drain_after_reboot(d, engine), ids)


def _tree_digest(d: pathlib.Path) -> Dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("engine", ["c", "pure"])
def test_qlog_verify_reports_the_journal_hole_then_the_range_is_redelivered(tmp_path, monkeypatch, engine):
    """The same cut, checked with ``qlog verify`` before anything opens it:
    a ``journal-gap`` at journal record 1 naming messages 0..599 (by number
    and by id), and nothing changed on disk; then the drain after the
    reboot delivers all 620."""
    _use_engine(monkeypatch, engine)
    d, ids, second = _cut_a_hole_before_the_second_pull(tmp_path)
    before = _tree_digest(d)
    p = run_cli("verify", d, "--json")
    assert p.returncode == 1, p.stdout + p.stderr
    (q,) = json.loads(p.stdout)["queues"]
    gaps = [x for x in q["problems"] if x["kind"] == "journal-gap"]
    assert [x["first_seq"] for x in gaps] == [second], q["problems"]
    detail = gaps[0]["detail"]
    assert re.search(r"(?<![\d-])0-599(?![\d-])", detail) and ids[0] in detail and ids[599] in detail, detail
    assert _tree_digest(d) == before, "qlog verify changed the data directory"
    _assert_all_delivered(_drain_after_reboot(d, engine), ids)
