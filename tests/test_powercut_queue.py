"""Power cuts of a whole broker: messages, state journal, checkpoints,
dead-letter transfers, retention and segment deletion together.

A child interpreter runs ``_powercut_queue.workload`` once on an empty
directory while a recorder (``_powertrace``) logs every durable image, every
durable directory map and a marker per thing the workload did or was told.
Then many cuts are taken from that one trace: each cut is a prefix of it.
For each, the directory the power cut leaves is built (durable names,
durable bytes, and in most cuts a random subset of the pages written since:
a torn tail), reopened as after a reboot (another boot id), drained, and
compared with what had to survive (``check_after_cut``):

- every message whose "sync" send returned before the cut is delivered, or
  was acked or dead-lettered before it (or is old enough to have expired);
- no message comes back corrupt or unsent; a batch nobody had seen is all
  there or all gone;
- an ack whose journal record was durable is never undone, and a lease
  whose record was durable is never delivered again with fewer attempts;
- a message is pending at most once, and in the dead-letter queue too only
  as the same message (its original id);
- every queue takes a send and delivers it after the cut.

``QLOG_POWERCUT_SEED=<n>`` reruns one child's workload and cuts (the push
consumer runs in a thread: a rerun repeats every choice of the workload and
of the cuts, not the exact interleaving of the threads);
``QLOG_POWERCUT_CUTS=<n>`` takes n cuts per child instead of CUTS.
"""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import tempfile

import pytest

import _powercut_queue as pq
import qlog
import qlog._queue
import qlog._state
from _crashkit import Child
from _invariants import Report
from _powertrace import Replay, TraceRecorder, load
from _simvfs import boot_id_hook, new_boot_id, syscalls

SEED = 20261129
CHILDREN = 4
STEPS = 260
CUTS = 130


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


def _cut_points(rng: random.Random, events, k: int):
    """``k`` trace positions, sorted; half of them just after a durable
    event (the moments where what is durable changes)."""
    n = len(events)
    durable = [i + 1 for i, e in enumerate(events) if e[0] in ("S", "D")]
    pts = [rng.randint(0, n) for _ in range(k - k // 2)]
    pts += [rng.choice(durable) + rng.choice([0, 0, 1]) for _ in range(k // 2)]
    return sorted(min(p, n) for p in pts)


def run_child(tmp_path, seed: int):
    live = tmp_path / f"live-{seed}"
    live.mkdir()
    trace = tmp_path / f"trace-{seed}.pickle"
    with Child("workload", module="_powercut_queue", path=str(live), trace=str(trace),
               seed=seed, steps=STEPS) as child:
        child.wait_until(lambda c: any(line.startswith("done") for line in c.lines),
                         "the workload to finish", timeout=300)
    return load(str(trace))


def cut_many(tmp_path, seed: int, cuts: int, total: Report, stats: dict) -> None:
    events = run_child(tmp_path, seed)
    rng = random.Random(seed)
    facts = pq.Facts()
    replay = Replay(events, on_durable=facts.on_durable)
    kinds = {k: sum(1 for e in events if e[0] == k) for k in "WSDMX"}
    for n, pos in enumerate(_cut_points(rng, events, cuts)):
        replay.advance(pos, facts.on_mark)
        out = str(tmp_path / f"cut-{seed}-{n}")
        tear = random.Random(rng.getrandbits(32)) if rng.random() < 0.7 else None
        torn = replay.materialise(out, tear)
        where = (f"seed {seed}, cut {n} at trace position {pos} of {len(events)} "
                 f"({kinds}); torn pages {torn}; rerun with QLOG_POWERCUT_SEED={seed}")
        try:
            rep, dropped, must = pq.check_after_cut(out, facts, replay, boot_id_hook(new_boot_id(rng)))
        except Exception as e:
            raise AssertionError(f"{where}: {e}") from e
        total.add(rep)
        stats["cuts"] += 1
        stats["torn"] += bool(torn)
        stats["dropped_unsynced"] += dropped
        stats["must_survive"] += must
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


def test_power_cuts_of_a_whole_broker(work_dir, monkeypatch, capsys):
    """CHILDREN workloads, CUTS cuts of each; every cut passes the invariant
    checker, and the cuts covered torn tails, deleted message and journal
    segments, checkpoints and dead-letter transfers."""
    pq.small_state(monkeypatch.setattr)
    env_seed = os.environ.get("QLOG_POWERCUT_SEED")
    seeds = [int(env_seed)] if env_seed else [SEED + i for i in range(CHILDREN)]
    cuts = int(os.environ.get("QLOG_POWERCUT_CUTS", CUTS))
    total = Report()
    stats = dict(cuts=0, torn=0, must_survive=0, dropped_unsynced=0, events=0, durable_acks=0, segments_deleted=0,
                 journal_segments_deleted=0, checkpoints=0, dead_letter_transfers=0)
    for seed in seeds:
        cut_many(work_dir, seed, cuts, total, stats)
    with capsys.disabled():
        print(f"\npower cuts (seeds {seeds}): {stats}\n  {total.line()}")
    assert stats["cuts"] == cuts * len(seeds)
    assert total.lost == 0 and total.corrupt == 0 and total.duplicates_otherwise == 0
    # the cuts landed where they matter
    assert stats["torn"] > stats["cuts"] // 4, stats
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
    monkeypatch.setattr(qlog._state, "os", proxy)
    monkeypatch.setattr(qlog._queue, "os", proxy)
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
