"""``qlog verify`` and ``qlog repair``: check every record of a data
directory with a reader that shares no code with the writer, and set damaged
files aside.  These work on the local backend's files themselves (a
directory, not a :class:`qlog.Broker`), through :mod:`qlog._local.check`."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._local.check import Problem, QueueBusyError, QueueCheck, check_queue, lost_text, queue_names, repair_queue
from .common import EXIT_FAILED, EXIT_OK, Failed, Progress, UsageError, local_dir, plural, queue_name

# -- arguments ---------------------------------------------------------------


def add_verify(sub: Any) -> None:
    """``qlog verify DIR [QUEUE ...]``"""
    v = sub.add_parser(
        "verify", help="check every record's CRC; exit 1 on damage",
        description="Check every record of every queue's message log and state journal, the "
        "state journal's records and the checkpoint, with a reader that shares no code with the "
        "writer. Read-only: opens every file read-only, creates, locks and cuts nothing (a torn "
        "tail is reported as what recovery would cut, and left as it is). Prints each problem "
        "with its file, offset, kind and the message seqs and ids affected. Exit status 1 when "
        "damage is found, 0 when clean.",
    )
    v.add_argument("dir", metavar="DIR")
    v.add_argument("queues", metavar="QUEUE", nargs="*", help="check only these queues")
    v.add_argument("--json", action="store_true", help="one JSON object instead of text")
    v.set_defaults(func=cmd_verify)


def add_repair(sub: Any) -> None:
    """``qlog repair DIR [QUEUE ...]``"""
    rp = sub.add_parser(
        "repair", help="set damaged files aside, keep every intact message",
        description="Repair damaged queues: each damaged segment is replaced by one holding its "
        "intact records under their own sequence numbers, and the damaged file is kept as "
        "<name>.quarantined-<time> (never deleted). A damaged checkpoint or state journal is set "
        "aside the same way and the consumer state rebuilt so that no message that is not done "
        "is dropped (messages whose fate the damage hid are delivered again). Prints the seqs "
        "and ids of the messages lost. Refuses (exit 1, nothing changed) while any process has "
        "the queue open.",
    )
    rp.add_argument("dir", metavar="DIR")
    rp.add_argument("queues", metavar="QUEUE", nargs="*", help="repair only these queues (default: all)")
    rp.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    rp.set_defaults(func=cmd_repair)


# -- verify and repair -------------------------------------------------------------


def _named_queues(root: str, names: Sequence[str]) -> List[str]:
    """The queues to work on: every queue of ``root``, or the existing ones named."""
    have = queue_names(root)
    if not names:
        return have
    for n in names:
        queue_name(n)
        if n not in have:
            known = ", ".join(have) if have else "none"
            raise UsageError(f"no queue {n!r} in {root!r} (its queues: {known})")
    return list(dict.fromkeys(names))


def _problem_json(p: Problem, pre: Optional[str]) -> Dict[str, Any]:
    ids = p.ids(pre)
    return {"file": p.file, "segment": p.segment, "offset": p.offset, "length": p.length,
            "after_seq": p.after_seq, "kind": p.kind, "detail": p.detail,
            "first_seq": p.first_seq, "last_seq": p.last_seq,
            "first_id": None if ids is None else ids[0], "last_id": None if ids is None else ids[1]}


def _problem_text(p: Problem, pre: Optional[str]) -> str:
    where = f"{p.file}" + ("" if p.offset is None else f" offset {p.offset}") + \
        ("" if p.length is None else f" length {p.length}")
    if p.segment is not None:
        at = "" if p.offset is None else f" offset {p.offset} length {p.length}"
        head = f"damage: segment {p.segment}{at} kind {p.kind}"
        if p.after_seq is not None:
            head += f" (after record {p.after_seq})"
    else:
        head = f"damage: {where} kind {p.kind}"
    lost = lost_text(p, pre)
    what = "messages" if p.log == "messages" else "records"
    return head + f": {p.detail}" + (f"; {what} affected: {lost}" if lost else "")


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every queue with the pure-Python reader: read-only (no file is
    created, locked, recovered or cut).  Exit 1 on any problem."""
    root = local_dir(args.dir, "verify")
    names = _named_queues(root, args.queues)
    checks: List[QueueCheck] = []
    # Per queue: check_queue reports nothing until a queue is done, so within
    # one large queue only the elapsed time moves.
    with Progress(len(names), " ".join(["verifying"] + names[:1])) as bar:
        for name in names:
            bar.update(len(checks), f"verifying {name}")
            checks.append(check_queue(root, name))
            bar.update(len(checks))
        bar.update(len(checks), "done")
    records = sum(lg.records for c in checks for lg in c.logs)
    nlogs = sum(len(c.logs) for c in checks)
    bad = [c for c in checks if c.all_problems]
    if args.json:
        print(json.dumps({
            "ok": not bad, "records": records,
            "logs": [{"queue": c.name, "log": lg.log, "path": lg.path, "records": lg.records,
                      "error": lg.error, "damage": [_problem_json(p, c.id_prefix) for p in lg.problems]}
                     for c in checks for lg in c.logs],
            "queues": [{"queue": c.name, "id_prefix": c.id_prefix,
                        "problems": [_problem_json(p, c.id_prefix) for p in c.problems]} for c in checks],
        }))
        return EXIT_FAILED if bad else EXIT_OK
    for c in checks:
        for lg in c.logs:
            rel = os.path.join("queues", c.name, lg.log)
            extra = f", {plural(len(lg.problems), 'damaged region')}" if lg.problems else ""
            print(f"{rel}: {plural(lg.records, 'record')}{extra}")
            for p in lg.problems:
                print(f"  {_problem_text(p, c.id_prefix)}")
        for p in c.problems:
            print(f"queues/{c.name}: {_problem_text(p, c.id_prefix)}")
    if bad:
        n = sum(len(c.all_problems) for c in checks)
        print(f"damage: {plural(n, 'problem')} in {plural(len(bad), 'queue')} of {len(checks)} "
              f"({plural(records, 'intact record')}); `qlog repair {args.dir}` sets damaged files aside "
              "and keeps the intact records")
        return EXIT_FAILED
    print(f"ok: {plural(records, 'record')} in {plural(nlogs, 'log')}, no damage")
    return EXIT_OK


def cmd_repair(args: argparse.Namespace) -> int:
    root = local_dir(args.dir, "repair")
    names = _named_queues(root, args.queues)
    changed = 0
    results: List[Tuple[str, List[str]]] = []
    verb = "checking" if args.dry_run else "repairing"
    # On a terminal's stderr; the results follow it on stdout.
    with Progress(len(names), " ".join([verb] + names[:1])) as bar:
        for name in names:
            bar.update(len(results), f"{verb} {name}")
            try:
                results.append((name, repair_queue(root, name, dry_run=args.dry_run)[1]))
            except QueueBusyError as e:
                raise Failed(str(e)) from None
            bar.update(len(results))
        bar.update(len(results), "done")
    for name, lines in results:
        if not lines:
            print(f"queues/{name}: no damage")
            continue
        changed += 1
        for line in lines:
            print(line)
    if args.dry_run:
        print(f"dry run: {plural(changed, 'queue')} would be repaired; nothing was changed")
    elif changed:
        print(f"repaired {plural(changed, 'queue')}; damaged files were kept as *.quarantined-*")
    else:
        print("nothing to repair")
    return EXIT_OK
