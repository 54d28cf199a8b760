"""Property tests: whatever is appended, in whatever batch shapes and sizes, reads back
exactly, through any window of the log, after a reopen, and in pure Python."""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from typing import List, Tuple, Union

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import qlog
from qlog._log import pure as _pure

MiB = 1 << 20
ALIGN_SIZES = [0, 1, 6, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 39, 40, 41]
BUDGET = 6 * MiB  # payload bytes per example, so that big records stay affordable

# An op: a single append (int size), a batch (list of sizes), or "reopen".
Op = Union[int, List[int], str]


@st.composite
def _size(draw: st.DrawFn, big_ok: bool) -> int:
    """Mostly small, often around the 8-byte alignment, sometimes up to 1 MiB."""
    bucket = draw(st.integers(0, 31))
    if bucket < 16:
        return draw(st.integers(0, 48))
    if bucket < 24:
        return draw(st.sampled_from(ALIGN_SIZES))
    if bucket < 30 or not big_ok:
        return draw(st.integers(49, 9000))
    return draw(st.integers(9001, MiB))


@st.composite
def _ops(draw: st.DrawFn) -> List[Op]:
    ops: List[Op] = []
    used = 0
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["append", "append", "batch", "batch", "batch", "reopen"]))
        if kind == "reopen":
            ops.append("reopen")
            continue
        n = 1 if kind == "append" else draw(st.integers(1, 50))
        sizes = [draw(_size(used < BUDGET)) for _ in range(n)]
        used += sum(sizes)
        ops.append(sizes[0] if kind == "append" else sizes)
    return ops


_reads = st.lists(
    st.tuples(
        st.floats(0.0, 1.1),                       # from_seq as a fraction of the log
        st.integers(1, 60),                        # max_records
        st.one_of(st.integers(1, 64), st.integers(1, 2 * MiB)),  # max_bytes
    ),
    min_size=1, max_size=8,
)


def _payload(seq: int, n: int) -> bytes:
    """Distinct content per record, so a record returned in another's place shows."""
    block = seq.to_bytes(8, "little") + bytes(range(1, 252))  # 259 bytes: not 8-aligned
    return (block * (n // len(block) + 1))[:n]


def _check_window(log: qlog.Log, model: List[bytes], from_seq: int, max_records: int,
                  max_bytes: int) -> None:
    """One read returns exactly the records the limits allow, never empty
    before the end of the log."""
    got = log.read(from_seq, max_records=max_records, max_bytes=max_bytes)
    want = [(s, model[s]) for s in range(from_seq, min(len(model), from_seq + max_records))]
    if not want:
        assert got == []
        return
    # Exactly what the limits allow: up to max_records, stopping before the
    # record that would pass max_bytes, but always at least one.
    allowed, total = [], 0
    for s, p in want:
        if allowed and total + len(p) > max_bytes:
            break
        allowed.append((s, p))
        total += len(p)
    assert got == allowed


def _read_all(log: qlog.Log, from_seq: int = 0) -> List[Tuple[int, bytes]]:
    out: List[Tuple[int, bytes]] = []
    while True:
        got = log.read(from_seq, max_records=1000)
        if not got:
            return out
        out.extend(got)
        from_seq = got[-1][0] + 1


def _check_log(log: qlog.Log, model: List[bytes], reads: List[Tuple[float, int, int]]) -> None:
    expected = list(enumerate(model))
    assert log.stats().next_seq == len(model)
    assert _read_all(log) == expected
    for frac, max_records, max_bytes in reads:
        from_seq = int(frac * len(model))
        _check_window(log, model, from_seq, max_records, max_bytes)
        assert _read_all(log, from_seq) == expected[from_seq:]


@pytest.mark.slow
@pytest.mark.engines("c")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops(), reads=_reads, segment_bytes=st.sampled_from([4096, 16384, 65536]))
def test_appended_records_read_back_exactly(ops: List[Op], reads: List[Tuple[float, int, int]],
                                            segment_bytes: int) -> None:
    _check_appends(ops, reads, segment_bytes)


@pytest.mark.engines("pure")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops(), reads=_reads, segment_bytes=st.sampled_from([4096, 16384, 65536]))
def test_appended_records_read_back_exactly_fewer_examples(
        ops: List[Op], reads: List[Tuple[float, int, int]], segment_bytes: int) -> None:
    """The same property with fewer examples, for the slower pure-Python engine."""
    _check_appends(ops, reads, segment_bytes)


def _check_appends(ops: List[Op], reads: List[Tuple[float, int, int]], segment_bytes: int) -> None:
    d = tempfile.mkdtemp(prefix="qlog-prop-")
    try:
        model: List[bytes] = []
        log = qlog.Log(d, durability="none", segment_bytes=segment_bytes)
        try:
            for op in ops:
                if op == "reopen":
                    log.close()
                    log = qlog.Log(d, durability="none", segment_bytes=segment_bytes)
                    _check_log(log, model, reads)
                    continue
                sizes = [op] if isinstance(op, int) else list(op)
                payloads = [_payload(len(model) + k, n) for k, n in enumerate(sizes)]
                if isinstance(op, int):
                    first = log.append(payloads[0])
                else:
                    first = log.append_batch(payloads)
                assert first == len(model)
                model.extend(payloads)
                if sum(map(_pure.record_size, sizes)) > segment_bytes:
                    event("a batch larger than a segment")
                if max(sizes) >= 64 << 10:
                    event("a record of 64 KiB or more")
            _check_log(log, model, reads)
            segments = log.stats().segments
            event(f"segments: {'5 or more' if segments >= 5 else segments}")
            assert _pure.read_log(d) == list(enumerate(model))  # while open
            assert log.stats().corrupt_records == 0
        finally:
            log.close()
        with qlog.Log(d, durability="none", segment_bytes=segment_bytes) as log:
            _check_log(log, model, reads)
            assert log.stats().recovered_bytes_dropped == 0
        damage: List[Tuple[int, _pure.Damage]] = []
        assert _pure.read_log(d, damage=damage) == list(enumerate(model))
        assert damage == []
    finally:
        shutil.rmtree(d)


def test_read_returns_every_record_its_limits_allow_after_a_smaller_read(tmp_path: pathlib.Path) -> None:
    with qlog.Log(tmp_path / "log", durability="none") as log:
        log.append_batch([b"0123456789"] * 100)
        assert len(log.read(0, max_bytes=10)) == 1
        # 100 records of 10 bytes: both limits allow all of them
        assert len(log.read(0, max_records=1000, max_bytes=16 * MiB)) == 100
