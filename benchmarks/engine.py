"""Side-by-side benchmark of the qlog log engine against raw system calls.

    python benchmarks/engine.py            # full run (about 50 s)
    python benchmarks/engine.py --quick    # short run (under 30 s)
    python benchmarks/engine.py --dir DIR  # scratch space in DIR (default ./.bench-tmp)

Every figure is a ratio against a baseline measured in the same run,
interleaved with it (the order alternates between repetitions), with the
median of at least five repetitions.  The ratio column is the median of the
per-repetition ratios, so slow drift of the machine cancels out.  Records
carry 100-byte payloads (136 bytes framed).  This measures; it never fails
on a missed target (the exit status is 0 unless something breaks).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Callable, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import qlog  # noqa: E402
from qlog._log._qlog_c import lib  # noqa: E402

PAYLOAD = 100
FRAMED = (lib.QLOG_REC_HEADER_SIZE + PAYLOAD + lib.QLOG_REC_ALIGN - 1) & ~(lib.QLOG_REC_ALIGN - 1)
BATCH = 1000
CHUNK = 1 << 20
SINGLE_WRITE = 128
SEGMENT = lib.QLOG_DEFAULT_SEGMENT_BYTES


@dataclass(frozen=True)
class Plan:
    reps: int
    batches: int  # append_batch calls of BATCH records per repetition
    singles: int  # append / os.write calls per repetition
    sync_seconds: float  # length of one durability="sync" run
    sync_threads: int
    sync_reps: int
    reopen_segment: int  # segment_bytes of the reopen logs
    reopen_segments_big: int  # segments of the big log (the small one has one)
    reopen_reps: int


FULL = Plan(reps=9, batches=400, singles=200_000,
            sync_seconds=1.5, sync_threads=16, sync_reps=7,
            reopen_segment=SEGMENT, reopen_segments_big=16, reopen_reps=7)
QUICK = Plan(reps=5, batches=150, singles=60_000,
             sync_seconds=0.4, sync_threads=16, sync_reps=5,
             reopen_segment=16 << 20, reopen_segments_big=16, reopen_reps=5)


# ---------------------------------------------------------------- helpers


class Scratch:
    """Fresh, uniquely named paths under one directory; each measured file is
    deleted right after its repetition, so the page cache memory it used is
    recycled by the next one instead of touching new memory."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.n = 0

    def path(self, stem: str) -> str:
        self.n += 1
        return os.path.join(self.root, f"{stem}-{self.n}")


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def payloads() -> List[bytes]:
    """BATCH distinct 100-byte payloads."""
    seed = os.urandom(PAYLOAD + BATCH)
    return [seed[i:i + PAYLOAD] for i in range(BATCH)]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def interleave(reps: int, sides: Sequence[Callable[[], float]]) -> List[List[float]]:
    """Run every side once per repetition, rotating their order; returns
    one list of results per side."""
    out: List[List[float]] = [[] for _ in sides]
    for rep in range(reps):
        k = rep % len(sides)
        for i in list(range(k, len(sides))) + list(range(k)):
            out[i].append(sides[i]())
    return out


def check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"benchmark self-check failed: {what}")


def fmt_rate(x: float, unit: str) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.1f} {unit}"


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


@dataclass
class Figure:
    name: str
    qlog: str
    baseline: str
    ratio: float
    ratios: List[float]
    target: str
    met: bool
    notes: List[str] = field(default_factory=list)


def per_rep(label: str, xs: Sequence[float], scale: float, unit: str) -> str:
    def one(x: float) -> str:
        x *= scale
        return f"{x:.0f}" if x >= 100 else f"{x:.3g}"

    return f"{label}: {' '.join(map(one, xs))} {unit}"


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- machine


def fs_type(path: str) -> str:
    real = os.path.realpath(path)
    best, kind, dev = "", "?", "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = left.split()[4]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind, dev = mnt, right.split()[0], right.split()[1]
    return f"{kind} ({dev} on {best})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_info(bench_dir: str) -> List[str]:
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f"{kb / (1 << 20):.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return [
        f"cpus: {os.cpu_count()} x {cpu_model()}; memory {mem}",
        f"kernel: {platform.system()} {platform.release()} ({platform.machine()})",
        f"bench dir: {bench_dir}: {fs_type(bench_dir)}",
        f"load average (1/5/15 min) at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"python: {platform.python_implementation()} {platform.python_version()}; "
        f"qlog {getattr(qlog, '__version__', '?')}; "
        f"CRC32C in hardware: {bool(lib.qlog_crc32c_hw())}",
    ]


# ---------------------------------------------------------------- 1 + 4: append_batch, read


def qlog_batch_and_read(sc: Scratch, batch: List[bytes], n_batches: int):
    """append_batch n_batches x BATCH records (durability none), then read
    them back through a second handle in chunks of BATCH, touching every
    payload.  Returns (append seconds, read seconds, records)."""
    path = sc.path("batch")
    try:
        log = qlog.Log(path, durability="none")
        ab = log.append_batch
        t0 = time.perf_counter()
        for _ in repeat(None, n_batches):
            ab(batch)
        t_append = time.perf_counter() - t0
        n = log.next_seq
        log.close()

        reader = qlog.Log(path, durability="none")
        read = reader.read
        seq, got, nbytes = 0, 0, 0
        t0 = time.perf_counter()
        while True:
            recs = read(seq, max_records=BATCH)
            if not recs:
                break
            for _, p in recs:
                nbytes += len(p)
            got += len(recs)
            seq = recs[-1][0] + 1
        t_read = time.perf_counter() - t0
        reader.close()
        if got != n or nbytes != n * PAYLOAD:
            raise RuntimeError(f"read back {got} records / {nbytes} bytes, appended {n}")
        return t_append, t_read, n
    finally:
        remove(path)


def raw_write(sc: Scratch, chunk: bytes, total: int) -> float:
    """os.write of `total` bytes in CHUNK-sized writes to a new file."""
    path = sc.path("raw")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        mv = memoryview(chunk)
        w = os.write
        full, rest = divmod(total, CHUNK)
        t0 = time.perf_counter()
        for _ in repeat(None, full):
            w(fd, mv)
        if rest:
            w(fd, mv[:rest])
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)


def framed_chunk(sc: Scratch, batch: List[bytes]) -> bytes:
    """One MiB of real framed records, cut from a qlog segment."""
    path = sc.path("frames")
    try:
        with qlog.Log(path, durability="none") as log:
            for _ in range(CHUNK // (FRAMED * BATCH) + 1):
                log.append_batch(batch)
        seg = sorted(f for f in os.listdir(path) if f.endswith(".seg"))[0]
        with open(os.path.join(path, seg), "rb") as f:
            f.seek(lib.QLOG_SEG_HEADER_SIZE)
            data = f.read(CHUNK)
        assert len(data) == CHUNK
        return data
    finally:
        remove(path)


def bench_batch_and_read(sc: Scratch, plan: Plan) -> List[Figure]:
    batch = payloads()
    chunk = framed_chunk(sc, batch)
    n_batches = plan.batches
    total = n_batches * BATCH * FRAMED
    # warm-up: page cache memory, code paths
    qlog_batch_and_read(sc, batch, n_batches // 2)
    raw_write(sc, chunk, total // 2)

    ab_bps, raw_bps, rd_rps, ab_rps = [], [], [], []
    for rep in range(plan.reps):
        def q():
            ta, tr, n = qlog_batch_and_read(sc, batch, n_batches)
            ab_bps.append(n * FRAMED / ta)
            ab_rps.append(n / ta)
            rd_rps.append(n / tr)

        def r():
            raw_bps.append(total / raw_write(sc, chunk, total))

        for f in ((q, r) if rep % 2 == 0 else (r, q)):
            f()
    progress(f"append_batch/read: {plan.reps} reps of {n_batches * BATCH:,} records")

    r1 = [a / b for a, b in zip(ab_bps, raw_bps)]
    r4 = [a / b for a, b in zip(rd_rps, ab_rps)]
    f1 = Figure(
        "append_batch(1000) none, bytes/s vs os.write 1 MiB",
        fmt_rate(median(ab_bps), "B/s"), fmt_rate(median(raw_bps), "B/s"),
        median(r1), r1, ">= 0.5", median(r1) >= 0.5,
        [f"{n_batches * BATCH:,} records x {FRAMED} B framed = {total / (1 << 20):.1f} MiB "
         f"per rep; {1e6 * BATCH / median(ab_rps):.0f} us per batch of {BATCH}; os.write of "
         f"the same bytes: {1e6 * BATCH * FRAMED / median(raw_bps):.0f} us per {BATCH * FRAMED} B",
         per_rep("qlog per rep", ab_bps, 1e-6, "MB/s"),
         per_rep("os.write per rep", raw_bps, 1e-6, "MB/s")],
    )
    f4 = Figure(
        "read(1000) + len(payload), records/s vs append_batch",
        fmt_rate(median(rd_rps), "rec/s"), fmt_rate(median(ab_rps), "rec/s"),
        median(r4), r4, ">= 1.0", median(r4) >= 1.0,
        [f"{1e6 * BATCH / median(rd_rps):.0f} us per read of {BATCH} records (second handle, "
         f"page cache warm)",
         per_rep("read per rep", rd_rps, 1e-3, "krec/s"),
         per_rep("append_batch per rep", ab_rps, 1e-3, "krec/s")],
    )
    return [f1, f4]


# ---------------------------------------------------------------- 2: one record per call


def qlog_singles(sc: Scratch, p: bytes, n: int) -> float:
    path = sc.path("single")
    try:
        log = qlog.Log(path, durability="none")
        a = log.append
        t0 = time.perf_counter()
        for _ in repeat(None, n):
            a(p)
        dt = time.perf_counter() - t0
        if log.next_seq != n:
            raise RuntimeError(f"appended {n}, log says next_seq={log.next_seq}")
        log.close()
        return dt
    finally:
        remove(path)


def raw_singles(sc: Scratch, b: bytes, n: int) -> float:
    path = sc.path("rawsingle")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        w = os.write
        t0 = time.perf_counter()
        for _ in repeat(None, n):
            w(fd, b)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)


def bench_singles(sc: Scratch, plan: Plan) -> Figure:
    p = os.urandom(PAYLOAD)
    b = os.urandom(SINGLE_WRITE)
    n = plan.singles
    qlog_singles(sc, p, n // 4)
    raw_singles(sc, b, n // 4)
    q, r = [], []
    for rep in range(plan.reps):
        steps = [lambda: q.append(n / qlog_singles(sc, p, n)),
                 lambda: r.append(n / raw_singles(sc, b, n))]
        for f in (steps if rep % 2 == 0 else steps[::-1]):
            f()
    progress(f"append: {plan.reps} reps of {n:,} calls")
    ratios = [a / c for a, c in zip(q, r)]
    return Figure(
        "append() none, calls/s vs os.write(128 B)",
        fmt_rate(median(q), "call/s"), fmt_rate(median(r), "call/s"),
        median(ratios), ratios, ">= 1.0", median(ratios) >= 1.0,
        [f"{1e9 / median(q):.0f} ns per append, {1e9 / median(r):.0f} ns per os.write",
         per_rep("append per rep", q, 1e-3, "kcall/s"),
         per_rep("os.write per rep", r, 1e-3, "kcall/s")],
    )


# ---------------------------------------------------------------- 3: group commit


def sync_run(sc: Scratch, p: bytes, threads: int, seconds: float):
    """`threads` threads append to one durability="sync" log for `seconds`.
    Returns (records/s, fdatasyncs/s, mean append latency in s)."""
    path = sc.path(f"sync{threads}")
    try:
        log = qlog.Log(path, durability="sync")
        log.append(p)  # create the segment and the meta file outside the timing
        stop = threading.Event()
        counts = [0] * threads
        start = threading.Barrier(threads + 1)

        def worker(i: int) -> None:
            a = log.append
            is_set = stop.is_set
            c = 0
            start.wait()
            while not is_set():
                a(p)
                c += 1
            counts[i] = c

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        f0 = log.stats().fsyncs
        start.wait()
        t0 = time.perf_counter()
        stop.wait(seconds)
        stop.set()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        fs = log.stats().fsyncs - f0
        n = sum(counts)
        log.close()
        return n / dt, fs / dt, threads * dt / n
    finally:
        remove(path)


def bench_sync(sc: Scratch, plan: Plan) -> Figure:
    p = os.urandom(PAYLOAD)
    k = plan.sync_threads
    sync_run(sc, p, 1, plan.sync_seconds / 4)
    sync_run(sc, p, k, plan.sync_seconds / 4)
    one, many = [], []
    for rep in range(plan.sync_reps):
        steps = [lambda: one.append(sync_run(sc, p, 1, plan.sync_seconds)),
                 lambda: many.append(sync_run(sc, p, k, plan.sync_seconds))]
        for f in (steps if rep % 2 == 0 else steps[::-1]):
            f()
    progress(f"sync: {len(one)} reps of {plan.sync_seconds} s, 1 and {k} threads")
    ratios = [m[0] / o[0] for m, o in zip(many, one)]
    rps1, fps1, lat1 = (median(x) for x in zip(*one))
    rpsk, fpsk, latk = (median(x) for x in zip(*many))
    return Figure(
        f"sync append, {k} threads vs 1, records/s",
        fmt_rate(rpsk, "rec/s"), fmt_rate(rps1, "rec/s"),
        median(ratios), ratios, ">= 8", median(ratios) >= 8,
        [f"{k} threads: {fpsk:,.0f} fdatasync/s, {rpsk / fpsk:.2f} records per fdatasync, "
         f"{fmt_time(latk)} per append ({latk * fpsk:.1f} fdatasync periods)",
         f"1 thread:   {fps1:,.0f} fdatasync/s, {rps1 / fps1:.2f} records per fdatasync, "
         f"{fmt_time(lat1)} per append",
         per_rep(f"{k} threads per rep", [m[0] for m in many], 1, "rec/s"),
         per_rep("1 thread per rep", [o[0] for o in one], 1, "rec/s")],
    )


# ---------------------------------------------------------------- 5: reopen after kill -9

CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[4])
import qlog
path, n_batches, seg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
batch = [os.urandom(100) for _ in range(1000)]
log = qlog.Log(path, durability="none", segment_bytes=seg)
for _ in range(n_batches):
    log.append_batch(batch)
st = log.stats()
print(st.next_seq, st.segments, flush=True)
sys.stdin.read()   # killed here
"""


def append_then_kill(path: str, n_batches: int, segment: int) -> int:
    """A child process appends n_batches batches and is SIGKILLed with the
    log open.  Returns the log's next_seq as the child saw it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, path, str(n_batches), str(segment), ROOT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child appending to {path} exited with {proc.wait()}")
        return int(line.split()[0])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def timed_reopen(path: str, segment: int, expect_next: int) -> float:
    t0 = time.perf_counter()
    log = qlog.Log(path, durability="none", segment_bytes=segment)
    dt = time.perf_counter() - t0
    st = log.stats()
    log.close()
    if st.next_seq != expect_next:
        raise RuntimeError(f"reopened {path}: next_seq {st.next_seq}, expected {expect_next}")
    return dt


def bench_reopen(sc: Scratch, plan: Plan) -> Figure:
    seg = plan.reopen_segment
    per_seg = (seg - lib.QLOG_SEG_HEADER_SIZE) // (BATCH * FRAMED)  # batches a segment holds
    # The active (last) segment is what recovery scans: give both logs the
    # same, nearly full one, with room for one more batch per repetition.
    fill = per_seg - plan.reopen_reps - 2
    small_b, big_b = fill, (plan.reopen_segments_big - 1) * per_seg + fill
    small, big = sc.path("reopen-small"), sc.path("reopen-big")
    try:
        t0 = time.perf_counter()
        nxt = {small: append_then_kill(small, small_b, seg),
               big: append_then_kill(big, big_b, seg)}
        progress(f"reopen: built {small_b * BATCH * FRAMED / (1 << 20):.0f} MiB and "
                 f"{big_b * BATCH * FRAMED / (1 << 20):.0f} MiB logs "
                 f"in {time.perf_counter() - t0:.1f} s")
        sizes = {p: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p)
                        if f.endswith(".seg"))
                 for p in (small, big)}
        times = {small: [], big: []}
        for rep in range(plan.reopen_reps):
            order = (small, big) if rep % 2 == 0 else (big, small)
            for p in order:
                if rep:  # first rep: the building child was the one killed
                    nxt[p] = append_then_kill(p, 1, seg)
                times[p].append(timed_reopen(p, seg, nxt[p]))
        nsegs = {p: len([f for f in os.listdir(p) if f.endswith(".seg")]) for p in (small, big)}
    finally:
        remove(small)
        remove(big)
    ratios = [b / s for b, s in zip(times[big], times[small])]
    ts, tb = median(times[small]), median(times[big])
    return Figure(
        f"reopen after kill -9: {sizes[big] / (1 << 30):.2f} GiB vs "
        f"{sizes[small] / (1 << 20):.0f} MiB log",
        fmt_time(tb), fmt_time(ts), median(ratios), ratios, "<= 2x", median(ratios) <= 2,
        [f"{nsegs[big]} vs {nsegs[small]} segments of {seg >> 20} MiB; active segment "
         f"{(fill + plan.reopen_reps - 1) * BATCH * FRAMED / (1 << 20):.0f} MiB in both; "
         f"page cache warm (as after kill -9); Log(path) timed in the parent",
         per_rep("big per rep", times[big], 1e3, "ms"),
         per_rep("small per rep", times[small], 1e3, "ms")],
    )


# ---------------------------------------------------------------- report


def print_report(head: Sequence[str], cells: Sequence[Sequence[str]], rows: Sequence[Any]) -> None:
    """The figures as a table (first column left-aligned, the rest right),
    then each row's ratio per repetition and its notes (``rows``: objects
    with ``name``, ``ratios`` and ``notes``)."""
    w = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    line = "  ".join("-" * x for x in w)
    print("  ".join(h.ljust(x) for h, x in zip(head, w)))
    print(line)
    for c in cells:
        print("  ".join([c[0].ljust(w[0])] + [v.rjust(x) for v, x in zip(c[1:], w[1:])]))
    print(line)
    print()
    for r in rows:
        print(f"* {r.name}")
        if r.ratios:
            print(f"    ratio per rep: {' '.join(f'{x:.2f}' for x in r.ratios)}")
        for n in r.notes:
            print(f"    {n}")


def print_end(t_start: float) -> None:
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"wall time {time.perf_counter() - t_start:.1f} s")


def print_table(figs: List[Figure]) -> None:
    print_report(("figure", "qlog", "baseline", "ratio", "target", "met"),
                 [(f.name, f.qlog, f.baseline, f"{f.ratio:.2f}", f.target, "yes" if f.met else "NO")
                  for f in figs], figs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (under 30 s)")
    ap.add_argument("--dir", help="scratch directory (default: ./.bench-tmp, on the filesystem "
                                  "of the current directory)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL

    parent = args.dir or os.path.join(os.getcwd(), ".bench-tmp")
    made_parent = not os.path.exists(parent)
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="engine-", dir=parent)
    t_start = time.perf_counter()
    try:
        info = machine_info(root)
        sc = Scratch(root)
        figs: List[Figure] = []
        fb, fr = bench_batch_and_read(sc, plan)
        figs += [fb, bench_singles(sc, plan), bench_sync(sc, plan), fr, bench_reopen(sc, plan)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if made_parent:
            try:
                os.rmdir(parent)
            except OSError:
                pass
    print(f"qlog engine benchmark ({'quick' if args.quick else 'full'}): "
          f"{PAYLOAD}-byte payloads ({FRAMED} B framed), median of >= 5 interleaved reps")
    for line in info:
        print(f"  {line}")
    print()
    print_table(figs)
    print_end(t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
