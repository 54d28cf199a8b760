"""Fuzzing the readers and the state loaders with Hypothesis.

Targets, each fed random bytes and mutations of real files (bit flips, byte
runs overwritten, truncation, garbage appended, pieces of another segment
spliced in, a header field changed, a length field made huge):

- the C engine (``qlog.Log``: open and recovery, ``read``, ``verify``, an
  append after recovery), run in a forked child per example so that a
  crash fails the example (and Hypothesis shrinks it) instead of killing
  the test run;
- the pure-Python reader (``qlog._log.pure.iter_segment`` / ``read_log``), which
  must agree with the engine on the records of the same bytes;
- the state journal (``qlog._local.state.decode`` / ``QueueState.apply``) and the
  checkpoint loader (``QueueState.from_snapshot``), and a queue opened over
  a directory whose checkpoint or journal was mutated.

What must hold: no crash, no exception but the documented ones, and every
record returned is byte-equal to the payload written at its sequence
number (nothing that fails its CRC is ever returned).

The example counts are small for CI; ``QLOG_FUZZ_EXAMPLES=N`` runs N
examples per target (``QLOG_FUZZ_SEED=S`` picks another seed; by default
the run is derandomized, so a CI failure reproduces as is).
"""

from __future__ import annotations

import os
import pickle
import select
import shutil
import signal
import struct
import tempfile
import traceback
from array import array
from typing import Any, Callable, Dict, List, Optional, Tuple

import damage
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import qlog
from qlog import errors
from qlog._backend import DELIVERY_BUCKETS_US
from qlog._local import check as _check, state as _state
from qlog._log import pure as _pure, purelog as _purelog

SEG_HEADER_SIZE = 64
REC_HEADER_SIZE = 32
SEGMENT_BYTES = 4096
CHILD_TIMEOUT = 120.0  # seconds for one example's engine calls: only a hang reaches it

_ENV_EXAMPLES = os.environ.get("QLOG_FUZZ_EXAMPLES")
_ENV_SEED = os.environ.get("QLOG_FUZZ_SEED")


def fuzz_settings(examples: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Hypothesis settings for one target: ``examples`` in CI, or the number
    ``QLOG_FUZZ_EXAMPLES`` gives; derandomized unless ``QLOG_FUZZ_SEED`` is set."""
    n = int(_ENV_EXAMPLES) if _ENV_EXAMPLES else examples
    s = settings(
        max_examples=n, deadline=None, database=None, print_blob=True,
        derandomize=_ENV_SEED is None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
    )

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = s(fn)
        return seed(int(_ENV_SEED))(fn) if _ENV_SEED is not None else fn

    return apply


# ---- running engine calls in a child ------------------------------------------


class ChildCrashed(AssertionError):
    pass


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a forked child; returns its result or re-raises its
    exception.  A child killed by a signal (a segfault, a sanitizer abort)
    or one that hangs fails the example with ``ChildCrashed``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(r)
            try:
                out = ("ok", fn(*args))
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                out = ("raised", e, traceback.format_exc())
            try:
                data = pickle.dumps(out)
            except Exception as e:  # an exception that does not pickle
                data = pickle.dumps(("raised", RuntimeError(repr(out[1])), repr(e)))
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([r], [], [], CHILD_TIMEOUT)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise ChildCrashed(f"the engine hung: no result within {CHILD_TIMEOUT} s")
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise ChildCrashed(f"the engine crashed: child killed by signal {os.WTERMSIG(status)}")
    assert os.WEXITSTATUS(status) == 0 and chunks, f"child exited with status {os.WEXITSTATUS(status)}"
    kind, *rest = pickle.loads(b"".join(chunks))
    if kind == "ok":
        return rest[0]
    exc, tb = rest
    exc.child_traceback = tb
    raise exc


# ---- template logs --------------------------------------------------------------


def payload(seq: int, n: int) -> bytes:
    """Distinct content per record, so a record returned in another's place shows."""
    block = seq.to_bytes(8, "little") + bytes(range(1, 252))
    return (block * (n // len(block) + 1))[:n]


# Batches (lists of payload sizes) of the template logs: sizes around the
# 8-byte alignment, empty records, and records larger than a page.
_SHAPES = [[5], [0, 7, 8, 9], [120] * 6, [1500], [33, 31], [200, 0, 300], [2100],
           [64] * 9, [17], [900, 900], [3], [40] * 5, [700], [8, 16, 24], [1],
           [250, 250, 250], [0], [1200, 11], [90] * 4, [5]]


class Template:
    """A log written by the engine: its files' bytes and every payload by seq."""

    def __init__(self, files: Dict[str, bytes], expected: Dict[int, bytes]) -> None:
        self.files = files
        self.expected = expected
        self.segments = sorted(n for n in files if n.endswith(".seg"))
        self.record_offsets = {n: [r.offset for r in _walk_records(files[n])] for n in self.segments}


def _walk_records(data: bytes) -> List[damage.RecordInfo]:
    """The valid records of a segment's bytes, with their offsets (tests/damage.py)."""
    fd, path = tempfile.mkstemp(prefix="qlog-fuzz-walk-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return damage.records(path)
    finally:
        os.unlink(path)


def _build_template(root: str, name: str, shapes: List[List[int]]) -> Template:
    d = os.path.join(root, name)
    expected: Dict[int, bytes] = {}
    with qlog.Log(d, durability="none", segment_bytes=SEGMENT_BYTES) as log:
        for sizes in shapes:
            first = log.next_seq
            batch = [payload(first + k, n) for k, n in enumerate(sizes)]
            got = log.append_batch(batch) if len(batch) > 1 else log.append(batch[0])
            assert got == first
            expected.update((first + k, p) for k, p in enumerate(batch))
        assert log.read(0, max_records=10_000) == sorted(expected.items())  # writes the .idx files
    files = {}
    for n in os.listdir(d):
        if n.endswith((".seg", ".idx")) or n == "meta":
            with open(os.path.join(d, n), "rb") as f:
                files[n] = f.read()
    return Template(files, expected)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Template, Template]:
    """The log the mutations start from (several segments, sealed and
    active, with indexes), and a second log whose segments are spliced in."""
    root = str(tmp_path_factory.mktemp("fuzz-templates"))
    main = _build_template(root, "main", _SHAPES)
    other = _build_template(root, "other", _SHAPES[::-1][:8])
    assert len(main.segments) >= 4 and any(n.endswith(".idx") for n in main.files)
    return main, other


# ---- mutations -------------------------------------------------------------------

_U16 = st.integers(0, 0xFFFF)
_HEADER_FIELDS = [(0, 8), (8, 4), (12, 4), (16, 8), (24, 8), (32, 8), (40, 20), (60, 4)]
_HUGE_LENGTHS = [0xFFFFFFFF, 0x80000000, _pure.MAX_RECORD, _pure.MAX_RECORD + 1,
                 SEGMENT_BYTES, SEGMENT_BYTES - 31, 0x7FFFFFF8]

segment_mutation = st.one_of(
    st.tuples(st.just("flip"), _U16, _U16, st.integers(0, 7)),
    st.tuples(st.just("run"), _U16, _U16, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("fill"), _U16, _U16, st.integers(1, 600), st.sampled_from([0, 0xFF, 0x5A])),
    st.tuples(st.just("truncate"), _U16, _U16),
    st.tuples(st.just("extend"), _U16, st.one_of(st.binary(min_size=1, max_size=300),
                                                 st.integers(1, 5000).map(bytes))),
    st.tuples(st.just("splice"), _U16, st.booleans(), _U16, st.integers(8, 1200), _U16, _U16),
    st.tuples(st.just("header"), _U16, st.integers(0, len(_HEADER_FIELDS) - 1),
              st.integers(0, (1 << 64) - 1), st.booleans()),
    st.tuples(st.just("length"), _U16, _U16, st.one_of(st.sampled_from(_HUGE_LENGTHS),
                                                       st.integers(0, 0xFFFFFFFF))),
    st.tuples(st.just("seqfield"), _U16, _U16, st.integers(0, (1 << 64) - 1)),
)
mutation = st.one_of(
    segment_mutation,
    st.tuples(st.just("meta"), st.sampled_from(["delete", "garbage", "flip"]), _U16),
    st.tuples(st.just("idx"), _U16, st.sampled_from(["delete", "flip", "forge"]), _U16,
              st.integers(0, (1 << 64) - 1)),
)


def _pick(names: List[str], k: int) -> str:
    return names[k % len(names)]


def _at(data: bytes, k: int, extra: int = 0) -> int:
    """A position in ``data`` (up to ``extra`` past its end) from a 16-bit number."""
    return k * (len(data) + extra) // 0x10000


def _put(buf: bytearray, off: int, data: bytes) -> None:
    if off > len(buf):
        buf.extend(bytes(off - len(buf)))
    buf[off:off + len(data)] = data


def apply_mutations(t: Template, other: Template, muts: List[tuple]) -> Dict[str, bytes]:
    """The template's files after ``muts``, in order (a name mapped to None is deleted)."""
    files: Dict[str, Optional[bytes]] = dict(t.files)
    segs = t.segments
    for m in muts:
        kind = m[0]
        if kind == "meta":
            _, how, k = m
            if how == "delete":
                files["meta"] = None
            elif how == "garbage":
                files["meta"] = bytes((k * 7 + i) & 0xFF for i in range(64))
            elif files.get("meta"):
                b = bytearray(files["meta"])
                b[_at(b, k)] ^= 0x10
                files["meta"] = bytes(b)
            continue
        if kind == "idx":
            _, f, how, k, value = m
            idxs = sorted(n for n in t.files if n.endswith(".idx"))
            name = _pick(idxs, f)
            if files.get(name) is None:
                continue
            b = bytearray(files[name])
            if how == "delete":
                files[name] = None
                continue
            if how == "flip":
                b[_at(b, k)] ^= 1 << (k % 8)
            else:
                # A well-formed index (its CRC recomputed) whose entry lies:
                # any seq or offset, even past the end of the file.
                count = (len(b) - _pure.IDX_HEADER_SIZE) // _pure.IDX_ENTRY_SIZE
                if count:
                    e = _pure.IDX_HEADER_SIZE + (k % count) * _pure.IDX_ENTRY_SIZE + 8 * (k & 1)
                    struct.pack_into("<Q", b, e, value)
                    crc = _pure.crc32c(b[_pure.IDX_HEADER_SIZE:], _pure.crc32c(b[:44]))
                    struct.pack_into("<I", b, 44, _pure.mask_crc(crc))
            files[name] = bytes(b)
            continue
        name = _pick(segs, m[1])
        cur = files.get(name)
        if cur is None:
            continue
        b = bytearray(cur)
        if kind == "flip":
            if b:
                b[_at(b, m[2])] ^= 1 << m[3]
        elif kind == "run":
            _put(b, _at(b, m[2]), m[3])
        elif kind == "fill":
            _put(b, _at(b, m[2]), bytes([m[4]]) * m[3])
        elif kind == "truncate":
            del b[_at(b, m[2]):]
        elif kind == "extend":
            b += m[2]
        elif kind == "splice":
            _, _, from_other, src_k, n, src_off_k, dst_k = m
            src_t = other if from_other else t
            src = src_t.files[_pick(src_t.segments, src_k)]
            so = _at(src, src_off_k)
            # Aligned pieces land where whole records could start.
            so -= so % 8 if src_off_k & 1 else 0
            do = _at(b, dst_k, 64)
            do -= do % 8 if dst_k & 1 else 0
            _put(b, do, src[so:so + n])
        elif kind == "header":
            _, _, field, value, fix_crc = m
            off, size = _HEADER_FIELDS[field]
            if len(b) >= SEG_HEADER_SIZE:
                v = value.to_bytes(8, "little") * 3
                b[off:off + size] = v[:size]
                if fix_crc and off != 60:
                    struct.pack_into("<I", b, 60, _pure.mask_crc(_pure.crc32c(bytes(b[:60]))))
        elif kind == "length" or kind == "seqfield":
            offs = t.record_offsets[name]
            if offs:
                off = offs[m[2] % len(offs)]
                if off + REC_HEADER_SIZE <= len(b):
                    if kind == "length":
                        struct.pack_into("<I", b, off + 4, m[3])
                    else:
                        struct.pack_into("<Q", b, off + 8, m[3])
        files[name] = bytes(b)
    return {n: v for n, v in files.items() if v is not None}


def materialise(files: Dict[str, bytes]) -> str:
    d = tempfile.mkdtemp(prefix="qlog-fuzz-")
    for n, data in files.items():
        with open(os.path.join(d, n), "wb") as f:
            f.write(data)
    return d


# ---- checking what a reader returned ------------------------------------------------


def check_records(recs: List[Tuple[int, bytes]], expected: Dict[int, bytes], what: str,
                  spliced: Optional[Dict[int, bytes]] = None) -> None:
    """Every record is a payload written at its seq (in the log, or in the
    other log when pieces of its segments were ``spliced`` in); seqs
    strictly increase."""
    last = -1
    for s, p in recs:
        assert s > last, f"{what}: seq {s} after {last}: out of order or repeated"
        assert s in expected, f"{what}: seq {s} was never written"
        assert p == expected[s] or (spliced is not None and p == spliced.get(s)), (
            f"{what}: seq {s} does not hold the payload written there: {p[:40]!r}")
        last = s


def read_all(log: qlog.Log, from_seq: int = 0, max_records: int = 1000) -> List[Tuple[int, bytes]]:
    out: List[Tuple[int, bytes]] = []
    for _ in range(100_000):
        got = log.read(from_seq, max_records=max_records)
        if not got:
            return out
        out.extend(got)
        if got[-1][0] < from_seq:
            return out  # went backwards: check_records reports it
        from_seq = got[-1][0] + 1
    raise AssertionError("read did not reach the end of the log")


APPENDED = [b"appended after recovery, 1", b"appended after recovery, 2"]


ENGINES = {"c": lambda: qlog.Log, "pure": lambda: _purelog.Log}


def engine_examines(d: str, starts: List[int], max_records: int, engine: str = "c") -> Dict[str, Any]:
    """What an engine (``qlog.Log``, or the pure-Python one) makes of
    directory ``d`` (runs in the child)."""
    out: Dict[str, Any] = {}
    with ENGINES[engine]()(d, durability="none", segment_bytes=SEGMENT_BYTES) as log:
        out["full"] = read_all(log, 0, max_records)
        out["windows"] = [(s, read_all(log, s, max_records)) for s in starts]
        rep = log.verify()
        out["verify"] = (rep.records, [(x.segment, x.offset, x.length, x.kind) for x in rep.damage])
        out["first"] = log.append_batch(APPENDED)
        out["after"] = read_all(log, 0)
        out["stats"] = log.stats()
    return out


# ---- the C engine and the pure reader on mutated logs ---------------------------------------


@fuzz_settings(examples=100)
@given(muts=st.lists(mutation, min_size=1, max_size=4),
       starts=st.lists(st.integers(0, 120), max_size=3),
       max_records=st.sampled_from([1, 3, 1000]))
def test_mutated_logs_never_crash_the_readers_nor_yield_a_bad_record(
    templates: Tuple[Template, Template], muts: List[tuple], starts: List[int], max_records: int,
) -> None:
    check_mutated_log(templates, muts, starts, max_records, "c")


@fuzz_settings(examples=40)
@given(muts=st.lists(mutation, min_size=1, max_size=4),
       starts=st.lists(st.integers(0, 120), max_size=3),
       max_records=st.sampled_from([1, 3, 1000]))
def test_mutated_logs_in_the_pure_engine(
    templates: Tuple[Template, Template], muts: List[tuple], starts: List[int], max_records: int,
) -> None:
    """The same for the pure-Python engine (qlog/_log/purelog.py)."""
    check_mutated_log(templates, muts, starts, max_records, "pure")


def check_mutated_log(templates: Tuple[Template, Template], muts: List[tuple], starts: List[int],
                      max_records: int, engine: str) -> None:
    t, other = templates
    files = apply_mutations(t, other, muts)
    d = materialise(files)
    try:
        # The pure reader on the bytes as mutated (it changes nothing).
        pure_damage: List[Tuple[int, _pure.Damage]] = []
        pure_before = _pure.read_log(d, damage=pure_damage)
        check_records(pure_before, t.expected, "pure reader", other.expected)

        out = in_child(engine_examines, d, starts, max_records, engine)  # open: recovery
        check_records(out["full"], t.expected, "engine read", other.expected)
        full = out["full"]
        for s, got in out["windows"]:
            assert got == [r for r in full if r[0] >= s], f"a read from {s} disagrees with a read from 0"
        # An append after recovery gets a number above every record left
        # and reads back after them.
        first = out["first"]
        assert all(s < first for s, _ in full), f"append got seq {first}, already in the log"
        assert out["after"] == full + [(first, APPENDED[0]), (first + 1, APPENDED[1])]
        assert out["verify"][0] >= len(full)

        # The pure reader agrees with the engine on the files as recovery left them.
        assert _pure.read_log(d) == out["after"]
    finally:
        shutil.rmtree(d)


@fuzz_settings(examples=40)
@given(segments=st.lists(st.tuples(st.integers(0, 300), st.booleans(),
                                   st.binary(min_size=0, max_size=3000)), min_size=1, max_size=3),
       meta=st.one_of(st.none(), st.binary(min_size=0, max_size=80)))
def test_random_files_never_crash_the_readers(
    segments: List[Tuple[int, bool, bytes]], meta: Optional[bytes],
) -> None:
    """Segment files of random bytes, some behind a valid header, hold no
    record: both readers return none and the engine opens the directory."""
    files: Dict[str, bytes] = {}
    for base, with_header, body in segments:
        head = _pure.encode_segment_header(base, 0x1234567 + base, 0) if with_header else b""
        files[f"{base:020d}.seg"] = head + body
    if meta is not None:
        files["meta"] = meta
    d = materialise(files)
    try:
        assert _pure.read_log(d) == []
        for name, data in files.items():
            if name.endswith(".seg"):
                assert list(_pure.iter_segment(data)) == []
        out = in_child(engine_examines, d, [0, 5], 1000)
        assert out["full"] == []
        assert out["after"] == [(out["first"], APPENDED[0]), (out["first"] + 1, APPENDED[1])]
        assert _pure.read_log(d) == out["after"]
    finally:
        shutil.rmtree(d)


@fuzz_settings(examples=400)
@given(muts=st.lists(segment_mutation, min_size=1, max_size=5),
       which=_U16)
def test_pure_iter_segment_on_mutated_segment_bytes(templates: Tuple[Template, Template],
                                                    muts: List[tuple], which: int) -> None:
    """``iter_segment`` over the bytes of one mutated segment: never raises,
    yields only records written there, reports damage it skipped."""
    t, other = templates
    name = _pick(t.segments, which)
    files = apply_mutations(t, other, [(m[0], which) + tuple(m[2:]) for m in muts])
    data = files.get(name, b"")
    found: List[_pure.Damage] = []
    recs = list(_pure.iter_segment(data, damage=found))
    check_records([(r.seq, r.payload) for r in recs], t.expected, "iter_segment", other.expected)
    if data == t.files[name]:
        assert found == [] and len(recs) == len(t.record_offsets[name])
    for dmg in found:
        assert 0 <= dmg.offset and dmg.offset + dmg.length <= max(len(data), SEG_HEADER_SIZE)


# ---- the state journal --------------------------------------------------------------------

_I64 = st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.integers(-3, 60),
                 st.sampled_from([0, 1, (1 << 63) - 1, -(1 << 63), 1 << 62]))
_TAGS = [b"P", b"A", b"R", b"K", b"D", b"E", b"X"]
_SHAPE = {b"P": (5, 9), b"A": (0, 1), b"R": (0, 3), b"K": (0, 2), b"D": (1, 2), b"E": (1, 2), b"X": (1, 0)}


@st.composite
def journal_record(draw: st.DrawFn) -> bytes:
    """A journal record: well formed (documented shape, wild values), of
    another shape, or mangled bytes."""
    how = draw(st.integers(0, 9))
    if how == 0:
        return draw(st.binary(max_size=120))
    tag = draw(st.sampled_from(_TAGS + [b"Z", b"\0"]))
    ns, na = _SHAPE.get(tag, (1, 1))
    if tag == b"P" and how == 3:
        na = 10  # with the unknown ranges it read
    if how == 1:
        ns, na = draw(st.integers(0, 6)), draw(st.integers(0, 10))
    small = st.integers(0, 40)
    scalars = [draw(st.one_of(small, _I64)) for _ in range(ns)]
    arrays = [draw(st.lists(st.one_of(small, _I64), max_size=6)) for _ in range(na)]
    rec = _state.encode(tag, scalars, arrays)
    if how == 2 and rec:
        cut = draw(st.integers(0, len(rec)))
        rec = rec[:cut] + draw(st.binary(max_size=12))
    return rec


@fuzz_settings(examples=400)
@given(payload_=st.one_of(st.binary(max_size=200), journal_record()))
def test_journal_record_decoding_raises_only_valueerror(payload_: bytes) -> None:
    """``decode`` splits a record or raises ValueError naming the problem."""
    try:
        tag, scalars, arrays = _state.decode(payload_)
    except ValueError as e:
        assert str(e)
        return
    assert len(tag) == 1 and payload_[0:1] == tag
    assert _state.encode(tag, scalars, [list(a) for a in arrays]) == payload_


def _entries(stt: _state.QueueState) -> Dict[int, list]:
    return {**{s: [e[0], bool(e[1]), e[2], e[3]] for s, e in stt.pending.items()},
            **{s: ["dying", e[0], e[2], e[3]] for s, e in stt.dying.items()}}


def _counters(stt: _state.QueueState) -> tuple:
    return (stt.applied, stt.cursor, stt.acked, stt.dead_lettered, stt.deleted, stt.expired,
            stt.purged, stt.hidden, tuple(stt.unknown))


@pytest.mark.slow
@fuzz_settings(examples=300)
@given(records=st.lists(journal_record(), min_size=1, max_size=12), now=_I64)
def test_journal_replay_of_any_records_gives_a_state_that_checkpoints(
    records: List[bytes], now: int,
) -> None:
    """Replaying any records never raises (one that does not parse is skipped),
    and the state reached is a valid one: it checkpoints and loads back
    equal, and its queries work."""
    stt = _state.QueueState()
    for i, r in enumerate(records):
        stt.applied = i
        stt.apply(r)
    stt.applied = len(records)
    loaded = _state.QueueState.from_snapshot(stt.snapshot())
    assert _counters(loaded) == _counters(stt)
    assert _entries(loaded) == _entries(stt)
    stt.next_due()
    got = stt.due_candidates(now, 1000)
    assert len(got) == len(set(got)) and all(s in stt.pending for s in got)
    stt.floor()


@st.composite
def checkpoint_bytes(draw: st.DrawFn) -> bytes:
    """A checkpoint of a state built from random records, then maybe mangled
    (with or without its CRC recomputed), or random bytes."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=300))
    stt = _state.QueueState()
    k = draw(st.integers(0, 6))
    if k:  # a pull that leaves k entries, so that the arrays are there to mangle
        stt.apply(_state.encode(b"P", [10**15, 0, k, 0, 0],
                                [list(range(k)), [10**15] * k] + [[]] * 7))
    for i, r in enumerate(draw(st.lists(journal_record(), max_size=6))):
        stt.applied = i
        stt.apply(r)
    data = bytearray(stt.snapshot())
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.integers(0, 3))
        pos = draw(_U16) * len(data) // 0x10000
        if not data:
            break
        if how == 0:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif how == 1:
            _put(data, pos, draw(st.binary(min_size=1, max_size=16)))
        elif how == 2:
            del data[pos:]
        else:
            # a counter, the entry count or an array slot set to any int64
            slot = 12 + 8 * draw(st.integers(0, max(0, (len(data) - 20) // 8)))
            if slot + 8 <= len(data):
                struct.pack_into("<q", data, slot, draw(_I64))
    if draw(st.booleans()) and len(data) >= 4:
        body = bytes(data[:-4])
        data = bytearray(body + struct.pack("<I", _pure.crc32c(body)))
    return bytes(data)


@fuzz_settings(examples=300)
@given(data=checkpoint_bytes())
def test_checkpoint_loader_gives_a_valid_state_or_a_documented_error(data: bytes) -> None:
    try:
        stt = _state.QueueState.from_snapshot(data)
    except (errors.CorruptStateError, errors.FormatError) as e:
        assert str(e)
        return
    # A state that loads is one a checkpoint can hold: it checkpoints again
    # to the same bytes, and it works.
    assert stt.snapshot() == data
    stt.next_due()
    stt.due_candidates(1 << 62, 100)
    stt.floor()


# ---- a queue over a mutated checkpoint or state journal ------------------------------------


class QueueTemplate:
    """A broker directory, copied while a queue in it was busy: a checkpoint
    and journal records after it; ``bodies`` maps every message id sent."""

    def __init__(self, files: Dict[str, bytes], bodies: Dict[str, Any]) -> None:
        self.files = files
        self.bodies = bodies
        self.targets = sorted(n for n in files if n == "queues/jobs/checkpoint"
                              or (n.startswith("queues/jobs/state/") and n.endswith(".seg")))


@pytest.fixture(scope="module")
def queue_template(tmp_path_factory: pytest.TempPathFactory) -> QueueTemplate:
    d = str(tmp_path_factory.mktemp("fuzz-queue") / "data")
    bodies: Dict[str, Any] = {}
    with qlog.open(d, durability="none") as broker:
        broker.checkpoint_every = 6  # checkpoints, and journal records after the last one
        q = broker.queue("jobs")
        for k in range(4):
            ids = q.send_batch([{"n": k * 10 + i, "pad": "x" * (i * 7)} for i in range(10)])
            bodies.update(zip(ids, ({"n": k * 10 + i, "pad": "x" * (i * 7)} for i in range(10))))
            batch = list(q.pull(6, visibility_timeout=3600))
            for i, m in enumerate(batch):
                if i % 3 == 0:
                    m.ack()
                elif i % 3 == 1:
                    m.retry(delay_seconds=0)
        files = {}
        for dirpath, _, names in os.walk(d):
            for n in names:
                if n in ("lock", "ctl"):
                    continue
                path = os.path.join(dirpath, n)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, d)] = f.read()
    t = QueueTemplate(files, bodies)
    assert "queues/jobs/checkpoint" in t.targets and len(t.targets) >= 2
    return t


byte_mutation = st.one_of(
    st.tuples(st.just("flip"), _U16, _U16, st.integers(0, 7)),
    st.tuples(st.just("run"), _U16, _U16, st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("truncate"), _U16, _U16),
    st.tuples(st.just("extend"), _U16, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("int64"), _U16, _U16, _I64, st.booleans()),
)


def mutate_queue_files(t: QueueTemplate, muts: List[tuple]) -> Dict[str, bytes]:
    files = dict(t.files)
    for m in muts:
        name = _pick(t.targets, m[1])
        b = bytearray(files[name])
        if m[0] == "flip" and b:
            b[_at(b, m[2])] ^= 1 << m[3]
        elif m[0] == "run":
            _put(b, _at(b, m[2]), m[3])
        elif m[0] == "truncate":
            del b[_at(b, m[2]):]
        elif m[0] == "extend":
            b += m[2]
        elif m[0] == "int64" and name.endswith("checkpoint") and len(b) >= _state._CKPT_HEAD.size:
            # a field of the checkpoint set to any int64, its CRC recomputed
            # or not
            slot = 12 + 8 * (m[2] % ((len(b) - 16) // 8))
            struct.pack_into("<q", b, slot, m[3])
            if m[4]:
                struct.pack_into("<I", b, len(b) - 4, _pure.crc32c(bytes(b[:-4])))
        files[name] = bytes(b)
    return files


def queue_examines(d: str) -> Dict[str, Any]:
    """Open the queue, pull and ack until nothing is visible (runs in the child)."""
    out: Dict[str, Any] = {"delivered": [], "error": None}
    try:
        with qlog.open(d, durability="none") as broker:
            q = broker.queue("jobs")
            q.stats()
            for _ in range(10):
                batch = list(q.pull(100, visibility_timeout=3600))
                if not batch:
                    break
                out["delivered"].extend((m.id, m.body, m.attempts) for m in batch)
                for m in batch:
                    m.ack()
            out["stats"] = q.stats()
    except (errors.CorruptStateError, errors.FormatError) as e:
        out["error"] = (type(e), str(e))
    return out


@fuzz_settings(examples=30)
@given(muts=st.lists(byte_mutation, min_size=1, max_size=3))
def test_queue_over_a_mutated_checkpoint_or_journal(queue_template: QueueTemplate,
                                                    muts: List[tuple]) -> None:
    """A damaged checkpoint is refused with CorruptStateError (or FormatError
    for another version) naming the file; damaged journal records are
    skipped.  Whatever is delivered is a message that was sent, with its
    body, once per pull-and-ack pass."""
    t = queue_template
    files = mutate_queue_files(t, muts)
    d = materialise_tree(files)
    try:
        out = in_child(queue_examines, d)
        if out["error"] is not None:
            kind, msg = out["error"]
            assert files["queues/jobs/checkpoint"] != t.files["queues/jobs/checkpoint"], msg
            assert "checkpoint" in msg, msg
            return
        ids = [i for i, _, _ in out["delivered"]]
        assert len(ids) == len(set(ids)), "a message delivered twice although it was acked"
        for mid, body, attempts in out["delivered"]:
            assert mid in t.bodies and body == t.bodies[mid], f"message {mid} is not one sent: {body!r}"
            assert attempts >= 1
    finally:
        shutil.rmtree(d)


def materialise_tree(files: Dict[str, bytes]) -> str:
    d = tempfile.mkdtemp(prefix="qlog-fuzz-q-")
    for n, data in files.items():
        path = os.path.join(d, n)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return d


# ---- regressions: what the fuzzers found, pinned -----------------------------------------------


def test_decode_of_a_record_shorter_than_its_counts_raises_valueerror() -> None:
    with pytest.raises(ValueError, match="shorter than its 0 scalars and 1 array lengths"):
        _state.decode(b"\x00\x00\x01")


def test_counters_pushed_past_int64_by_absurd_journal_records_still_checkpoint() -> None:
    stt = _state.QueueState()
    for _ in range(2):  # the first hides 2**63 - 1 messages it never saw; the second, none
        stt.apply(_state.encode(b"P", [0, (1 << 63) - 1, 0, 0, 0], [[]] * 9))
    stt.acked = stt.purged = 1 << 70  # as only a bug could count
    loaded = _state.QueueState.from_snapshot(stt.snapshot())
    assert loaded.hidden == (1 << 63) - 1 and loaded.cursor == stt.cursor == (1 << 63) - 1
    assert loaded.unknown == [(0, (1 << 63) - 1)]
    assert loaded.acked == loaded.purged == (1 << 63) - 1  # saturated


def _checkpoint_with(seqs: List[int], leased: List[int], counters: Tuple[int, ...] = (0,) * 6,
                     unknown: Tuple[Tuple[int, int], ...] = ()) -> bytes:
    n = len(seqs)
    nb = len(DELIVERY_BUCKETS_US) + 1
    body = _state._CKPT_HEAD.pack(b"QLOGCKPT", _state._CKPT_VERSION, 0, 10, *counters, n, len(unknown), nb) + array(
        "q", seqs + [1] * n + leased + [5] * n + [6] * n + [x for r in unknown for x in r] + [0] * (3 + nb)).tobytes()
    return body + struct.pack("<I", _pure.crc32c(body))


@pytest.mark.parametrize("seqs, leased, counters, unknown, problem", [
    ([0, 0, 2], [1, 1, 1], (0,) * 6, (), "not in ascending order"),
    ([3, 1], [0, 0], (0,) * 6, (), "not in ascending order"),
    ([3, 12], [0, 0], (0,) * 6, (), "at or above its cursor"),
    ([0, 1], [1, 5], (0,) * 6, (), "leased flag other than 0, 1 or 2"),
    ([0], [0], (-1, 0, 0, 0, 0, 0), (), "negative position, counter or count"),
    ([-1, 4], [0, 0], (0,) * 6, (), "negative message number"),
    ([1], [0], (0,) * 6, ((4, 4),), "unknown range 4-4 that is empty"),
    ([1], [0], (0,) * 6, ((5, 7), (2, 3)), "unknown range 2-3 that is empty, negative, out of order"),
    ([1], [0], (0,) * 6, ((2, 5), (4, 6)), "unknown range 4-6 .* overlapping"),
    ([1], [0], (0,) * 6, ((8, 11),), "unknown range 8-11 .* past its cursor 10"),
    ([1], [0], (0,) * 6, ((-2, 0),), "unknown range -2-0 .* negative"),
    ([1], [0], (0,) * 6, ((-1, 0),), "unknown range -1-0 .* negative"),
    ([3], [0], (0,) * 6, ((2, 5),), "entry for message 3 inside its unknown range 2-5"),
])
def test_checkpoint_that_passes_its_crc_but_no_snapshot_could_be_is_refused(
    seqs: List[int], leased: List[int], counters: Tuple[int, ...], unknown, problem: str,
) -> None:
    with pytest.raises(errors.CorruptStateError, match=problem):
        _state.QueueState.from_snapshot(_checkpoint_with(seqs, leased, counters, unknown))
    fixed = sorted({abs(s) % 10 for s in seqs})  # below the cursor, 10
    good = _checkpoint_with(fixed, [0] * len(fixed))
    assert _state.QueueState.from_snapshot(good).snapshot() == good
    with_ranges = _checkpoint_with([1, 6], [0, 2], unknown=((2, 4), (7, 10)))
    back = _state.QueueState.from_snapshot(with_ranges)
    assert back.unknown == [(2, 4), (7, 10)]
    assert (list(back.pending), list(back.dying)) == ([1], [6])  # flag 2: claimed for the DLQ
    assert back.snapshot() == with_ranges


def test_pull_record_handing_out_messages_above_its_own_cursor_is_skipped() -> None:
    """Found by the fuzzer (a checkpoint's cursor set to 0, CRC recomputed):
    entries at or above the cursor made the queue hand those messages out as
    new and as redeliveries, twice.  A pull record cannot name a new or
    deferred message at or above its cursor after; one that does is skipped,
    so no such entry reaches a checkpoint."""
    stt = _state.QueueState()
    stt.apply(_state.encode(b"P", [100, 0, 2, 0, 0], [[0, 1], [7, 7]] + [[]] * 7))
    before = (_counters(stt), _entries(stt))
    stt.apply(_state.encode(b"P", [100, 2, 4, 0, 0], [[2, 9], [7, 7]] + [[]] * 7))
    stt.apply(_state.encode(b"P", [100, 2, 4, 0, 0], [[]] * 4 + [[4], [5], [7]] + [[]] * 2))
    assert (_counters(stt), _entries(stt)) == before
    assert stt.cursor == 2
    assert _state.QueueState.from_snapshot(stt.snapshot()).cursor == 2
    assert "at or above its cursor" in (_check.journal_record_error(
        _state.encode(b"P", [100, 2, 4, 0, 0], [[2, 9], [7, 7]] + [[]] * 7)) or "")


def test_journal_record_naming_a_negative_message_is_skipped() -> None:
    stt = _state.QueueState()
    stt.apply(_state.encode(b"P", [100, 0, 2, 0, 0], [[0, 1], [7, 7]] + [[]] * 7))
    before = (_counters(stt), _entries(stt))
    stt.apply(_state.encode(b"P", [100, 2, 4, 0, 0], [[3, -2], [7, 7]] + [[]] * 7))
    stt.apply(_state.encode(b"A", [], [[-1, 0]]))
    assert (_counters(stt), _entries(stt)) == before
    assert _state.QueueState.from_snapshot(stt.snapshot()).floor() == 0


BAD_JOURNAL_RECORDS = {
    "negative message in a pull": (_state.encode(b"P", [100, 2, 4, 0, 0], [[3, -2], [7, 7]] + [[]] * 7),
                                   "negative message number"),
    "negative message in an ack": (_state.encode(b"A", [], [[-1, 0]]), "negative message number"),
    "negative message in a retry": (_state.encode(b"R", [], [[-5], [1], [0]]), "negative message number"),
    "negative message in an extend": (_state.encode(b"E", [10], [[-3], [1]]), "negative message number"),
    "unknown tag": (_state.encode(b"Z", [], []), "unknown record tag"),
    "pull above its cursor": (_state.encode(b"P", [100, 2, 4, 0, 0], [[2, 9], [7, 7]] + [[]] * 7),
                              "at or above its cursor"),
    "truncated": (_state.encode(b"A", [], [[1, 2]])[:-3], ""),
}


@pytest.mark.parametrize("case", list(BAD_JOURNAL_RECORDS))
def test_replica_and_verify_judge_a_journal_record_alike(case: str) -> None:
    """One validator: what the replica skips, `qlog verify` reports, with
    the same reason (verify used to miss a negative message number)."""
    payload, why = BAD_JOURNAL_RECORDS[case]
    stt = _state.QueueState()
    stt.apply(_state.encode(b"P", [100, 0, 2, 0, 0], [[0, 1], [7, 7]] + [[]] * 7))
    before = (_counters(stt), _entries(stt))
    stt.apply(payload)
    assert (_counters(stt), _entries(stt)) == before, f"the replica applied a bad record ({case})"
    reason = _check.journal_record_error(payload)
    assert reason is not None, f"verify passed a record the replica skips ({case})"
    assert why in reason
    with pytest.raises(ValueError, match=why or "."):
        _state.check_record(payload)


def test_a_good_journal_record_passes_both() -> None:
    good = _state.encode(b"A", [], [[0, 1]])
    assert _check.journal_record_error(good) is None
    stt = _state.QueueState()
    stt.apply(_state.encode(b"P", [100, 0, 2, 0, 0], [[0, 1], [7, 7]] + [[]] * 7))
    stt.apply(good)
    assert stt.acked == 2


def test_queue_over_a_checkpoint_naming_a_negative_message_refuses_it(
    queue_template: QueueTemplate,
) -> None:
    """Found by the queue fuzzer: such a checkpoint (CRC intact) loaded, and
    the queue then failed at close with OverflowError when it truncated its
    message log below message -1."""
    head = _state._CKPT_HEAD.size
    first_seq_slot = (head - 12) // 8  # the first entry's message number
    files = mutate_queue_files(queue_template, [("int64", 0, first_seq_slot, -1, True)])
    assert struct.unpack_from("<q", files["queues/jobs/checkpoint"], head)[0] == -1
    d = materialise_tree(files)
    try:
        out = in_child(queue_examines, d)
    finally:
        shutil.rmtree(d)
    kind, msg = out["error"]
    assert kind is errors.CorruptStateError
    assert "checkpoint" in msg and "negative message number" in msg


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("entry_field, value", [
    ("offset", (1 << 64) - 64),   # before the mapping, once added to it
    ("offset", 1 << 40),          # far past the end of the file
    ("offset", 65),               # inside the first record
    ("seq", 9),                   # a number the record there does not have
])
def test_index_file_that_passes_its_crc_but_lies_is_not_trusted(
    tmp_path: Any, entry_field: str, value: int, engine: str,
) -> None:
    """A sealed segment's .idx is a cache: an entry pointing outside the
    file or at another record must cost no record (and read no memory
    outside the segment)."""
    d = str(tmp_path / "log")
    with qlog.Log(d, durability="none", segment_bytes=SEGMENT_BYTES) as log:
        for k in range(12):
            log.append_batch([payload(3 * k + i, 300) for i in range(3)])
        want = log.read(0, max_records=1000)
    idx = os.path.join(d, f"{0:020d}.idx")
    b = bytearray(open(idx, "rb").read())
    struct.pack_into("<Q", b, _pure.IDX_HEADER_SIZE + (8 if entry_field == "offset" else 0), value)
    crc = _pure.crc32c(b[_pure.IDX_HEADER_SIZE:], _pure.crc32c(b[:44]))
    struct.pack_into("<I", b, 44, _pure.mask_crc(crc))
    open(idx, "wb").write(bytes(b))

    def reads(d: str) -> List[Any]:
        with ENGINES[engine]()(d, durability="none", segment_bytes=SEGMENT_BYTES) as log:
            return [read_all(log, s) for s in (0, 1, 5)] + [log.stats().corrupt_records]

    got = in_child(reads, d)
    assert got == [want, want[1:], want[5:], 0]


def test_pure_reader_reads_a_sealed_segment_as_the_engine_does(tmp_path: Any) -> None:
    """A sealed segment cut short in the middle of a batch: the engine
    returns the batch's surviving records (only damage is skipped in a
    sealed segment), and so does the pure reader."""
    d = str(tmp_path / "log")
    with qlog.Log(d, durability="none", segment_bytes=SEGMENT_BYTES) as log:
        log.append(payload(0, 10))
        log.append_batch([payload(1 + i, 900) for i in range(3)])
        log.append_batch([payload(4 + i, 900) for i in range(5)])  # rolls: a second segment
    first = os.path.join(d, f"{0:020d}.seg")
    os.truncate(first, 64 + 48 + 2 * (32 + 904))  # the batch's last record gone
    with qlog.Log(d, durability="none", segment_bytes=SEGMENT_BYTES) as log:
        engine = read_all(log)
    assert [s for s, _ in engine] == [0, 1, 2, 4, 5, 6, 7, 8]
    assert _pure.read_log(d) == engine
    # Read alone (as the last segment of a log) the cut batch is a torn tail.
    assert [r.seq for r in _pure.iter_segment(first)] == [0]


def test_an_earlier_segments_record_copied_over_a_damaged_header_lends_no_salt(
    templates: Tuple[Template, Template],
) -> None:
    """Found by the fuzzer: the first 97 bytes of segment 0 (its header and
    first record) copied over the start of the next segment.  Its header
    then names base 0, not the file's, so the salt is taken from the first
    record that checks out, which was record 0: every reader returned seq 0
    a second time and lost the segment's own records.  Only a record
    numbered from the segment's base on may give the salt."""
    t, other = templates
    second = t.segments[1]
    files = apply_mutations(t, other, [("splice", 1, False, 0, 97, 0, 0)])
    assert files[second][:97] == t.files[t.segments[0]][:97]
    d = materialise(files)
    try:
        own = [s for s in sorted(t.expected) if int(second[:20]) <= s < int(t.segments[2][:20])]
        pure = _pure.read_log(d)
        check_records(pure, t.expected, "pure reader")
        out = in_child(engine_examines, d, [own[1]], 1000)
        check_records(out["full"], t.expected, "engine read")
        # the damaged first record is lost, the segment's others are read
        for got in ([s for s, _ in pure], [s for s, _ in out["full"]]):
            assert set(own[1:]) <= set(got) and own[0] not in got
        assert out["windows"] == [(own[1], [r for r in out["full"] if r[0] >= own[1]])]
        assert _pure.read_log(d) == out["after"]
    finally:
        shutil.rmtree(d)


def test_a_later_segments_header_and_records_copied_over_the_first_lend_no_salt(
    templates: Tuple[Template, Template],
) -> None:
    """Found by the fuzzer: a piece of the last segment, its header and first
    records, copied over the start of segment 0.  The header then names
    another base, so the salt came from the first record that checks out,
    one numbered far past segment 0: readers returned that record first and
    then the log's earlier ones, out of order, and a read from 0 skipped
    every record below it.  A record may give the salt only when numbered
    below the next segment's base."""
    muts = [("splice", 0, False, 3, 332, 320, 822)]
    for engine in ("c", "pure"):
        check_mutated_log(templates, muts, [], 1, engine)
    t, other = templates
    d = materialise(apply_mutations(t, other, muts))
    try:
        seqs = [s for s, _ in _pure.read_log(d)]
        assert seqs == sorted(set(seqs))  # in order, none twice
    finally:
        shutil.rmtree(d)


def test_a_purge_record_claiming_more_messages_than_numbers_counts_no_more_than_the_numbers() -> None:
    """Found by the fuzzer: a purge record's message count of 2**63 - 1
    pushed the purged counter past int64, so a checkpoint saturated it and
    loaded back different."""
    stt = _state.QueueState()
    stt.apply(_state.encode(b"X", [1], []))
    stt.apply(_state.encode(b"X", [2, (1 << 63) - 1], []))
    assert stt.purged == 2 and stt.cursor == 2
    assert _counters(_state.QueueState.from_snapshot(stt.snapshot())) == _counters(stt)
