"""Many appenders at once, in processes and threads: every append gets its
own number, the numbers are dense, every payload is stored exactly once,
and with durability "sync" one fsync serves many appenders (group commit)."""

from __future__ import annotations

import threading

import qlog
from _crashkit import read_all, run_barrier_appenders


def _check_exactly_once(path, seqs_by_child, count):
    with qlog.Log(path, durability="none") as log:
        assert log.verify().ok
        recs = read_all(log)
        assert log.stats().corrupt_records == 0
    total = len(seqs_by_child) * count
    assert [s for s, _ in recs] == list(range(total)), "numbers are not dense from 0"
    payloads = [p for _, p in recs]
    want = {b"p%d-%d" % (c, i) for c in range(len(seqs_by_child)) for i in range(count)}
    assert len(set(payloads)) == total and set(payloads) == want, "a payload is missing or stored twice"
    for c, seqs in enumerate(seqs_by_child):
        assert len(seqs) == count
        assert all(a < b for a, b in zip(seqs, seqs[1:])), f"process {c} got decreasing numbers"
        for i in (0, count // 3, count // 2, count - 1):
            assert recs[seqs[i]][1] == b"p%d-%d" % (c, i), f"process {c}'s append {i} is not at {seqs[i]}"
        assert all(recs[s][1] == b"p%d-%d" % (c, i) for i, s in enumerate(seqs)), (
            f"process {c}: a returned number holds another payload")


def test_four_processes_appending_50000_each_get_dense_unique_numbers(tmp_path, engine):
    path = str(tmp_path / "log")
    count = 50_000 if engine == "c" else 10_000  # the pure engine: fewer, same contention
    seqs, stats = run_barrier_appenders(path, "none", 4, count, str(tmp_path))
    assert [a for _, a in stats] == [count] * 4
    _check_exactly_once(path, seqs, count)


def test_sync_appends_from_four_processes_share_fsyncs(tmp_path):
    path = str(tmp_path / "log")
    seqs, stats = run_barrier_appenders(path, "sync", 4, 500, str(tmp_path))
    _check_exactly_once(path, seqs, 500)
    fsyncs = sum(f for f, _ in stats)
    assert sum(a for _, a in stats) == 2000
    assert 0 < fsyncs < 2000, f"{fsyncs} fsyncs for 2000 sync appends from 4 processes: no group commit"
    with qlog.Log(path, durability="none") as log:
        assert log.stats().synced_seq == 2000


def test_sync_appends_from_sixteen_threads_share_fsyncs(tmp_path):
    threads, count = 16, 150
    log = qlog.Log(tmp_path / "log", durability="sync")
    barrier = threading.Barrier(threads)
    got = [None] * threads
    errors = []

    def work(t):
        try:
            barrier.wait()
            got[t] = [log.append(b"p%d-%d" % (t, i)) for i in range(count)]
        except BaseException as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    st = log.stats()
    log.close()
    _check_exactly_once(str(tmp_path / "log"), got, count)
    assert st.appends == threads * count and st.synced_seq == threads * count
    assert 0 < st.fsyncs < threads * count, f"{st.fsyncs} fsyncs for {threads * count} appends: no group commit"
