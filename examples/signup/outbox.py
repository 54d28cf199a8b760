"""Print the emails the worker has sent (signup-data/outbox.jsonl).

    python outbox.py             # what is there now
    python outbox.py --wait 1    # first wait (up to 30 s) until it holds 1 email

Exits 1 if the wait runs out.  SIGNUP_DATA as for app.py and worker.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

OUTBOX = os.path.join(os.environ.get("SIGNUP_DATA", "./signup-data"), "outbox.jsonl")


def lines() -> list[str]:
    try:
        with open(OUTBOX, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wait", type=int, default=0, metavar="N", help="wait until the outbox holds N emails")
    ap.add_argument("--timeout", type=float, default=30.0, metavar="S", help="how long to wait (default 30)")
    args = ap.parse_args()
    deadline = time.monotonic() + args.timeout
    while len(lines()) < args.wait:
        if time.monotonic() >= deadline:
            print(f"the outbox holds {len(lines())} of {args.wait} emails after {args.timeout:g} s "
                  "(is `qlog worker worker:broker` running?)", file=sys.stderr)
            return 1
        time.sleep(0.05)  # a file written by another process: look again shortly
    for line in lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
