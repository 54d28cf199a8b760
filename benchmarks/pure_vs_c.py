"""Throughput of the pure-Python engine as a ratio of the C engine's.

    python benchmarks/pure_vs_c.py           # about 20 s
    python benchmarks/pure_vs_c.py --n 5000  # fewer records per run

Both engines append the same records (100-byte payloads, durability "none")
one at a time and in batches of 100, then read them back 1000 at a time.
The runs alternate between the engines, five repetitions each; every
figure is the median of the per-repetition ratios (C time / pure time:
the pure engine's share of the C engine's throughput).  This measures;
it never fails on a missed target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from qlog._log.clog import Log as CLog  # noqa: E402
from qlog._log.purelog import Log as PureLog  # noqa: E402

PAYLOAD = b"x" * 100


def _append1(cls: type, path: str, n: int) -> None:
    with cls(path, durability="none") as log:
        for _ in range(n):
            log.append(PAYLOAD)


def _batch(cls: type, path: str, n: int) -> None:
    with cls(path, durability="none") as log:
        batch = [PAYLOAD] * 100
        for _ in range(n // 100):
            log.append_batch(batch)


def _read(cls: type, path: str, n: int) -> None:
    with cls(path, durability="none") as log:
        seq, got = 0, 0
        while True:
            recs = log.read(seq, max_records=1000)
            if not recs:
                break
            got += len(recs)
            seq = recs[-1][0] + 1
        assert got == n, (got, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="records per run (default 20000)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    n = args.n - args.n % 100
    root = tempfile.mkdtemp(prefix="qlog-pure-vs-c-")
    ratios: Dict[str, List[float]] = {"append (1 record)": [], "append_batch (100)": [], "read": []}
    try:
        for rep in range(args.reps):
            order = [CLog, PureLog] if rep % 2 == 0 else [PureLog, CLog]
            times: Dict[str, Dict[type, float]] = {k: {} for k in ratios}
            for cls in order:
                for name, fn in (("append (1 record)", _append1), ("append_batch (100)", _batch)):
                    path = os.path.join(root, f"{rep}-{cls.__module__}-{name[:6]}")
                    t = time.perf_counter()
                    fn(cls, path, n)
                    times[name][cls] = time.perf_counter() - t
                    if name.startswith("append_batch"):
                        t = time.perf_counter()
                        _read(cls, path, n)
                        times["read"][cls] = time.perf_counter() - t
                    shutil.rmtree(path)
            for name in ratios:
                ratios[name].append(times[name][CLog] / times[name][PureLog])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{n} records of {len(PAYLOAD)} bytes, durability 'none', median of {args.reps}")
    print(f"{'operation':<22} pure throughput / C throughput")
    for name, r in ratios.items():
        print(f"{name:<22} {statistics.median(r):.3f}  (1/{1 / statistics.median(r):.0f})")


if __name__ == "__main__":
    main()
