"""The soak (benchmarks/soak.py) for one minute: producers, pull consumers
and a ``qlog worker`` in processes of their own, SIGKILLed and restarted at
random, and every message accounted for at the end.

The run is the script itself, as a user runs it, at a modest rate (it
shares the machine with the rest of the suite); what is asserted comes from
its JSON report, never from a timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _crashkit import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOAK = os.path.join(ROOT, "benchmarks", "soak.py")
SEED = 20261129
SEGMENT = 256 << 10   # small message segments, so a minute gives some back


@pytest.mark.slow
def test_one_minute_soak_loses_nothing_and_stays_bounded(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, SOAK, "--minutes", "1", "--interval", "15", "--rate", "300",
           "--kill-every", "5", "--seed", str(SEED), "--segment-bytes", str(SEGMENT),
           "--json", str(out), "--dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=str(tmp_path),
                          timeout=600)
    rerun = f"rerun: {' '.join(cmd[1:])}\nstdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert out.exists(), f"no report written (exit status {proc.returncode}); {rerun}"
    report = json.loads(out.read_text())
    t = report["totals"]

    assert t["lost"] == 0, rerun
    assert t["corrupt"] == 0, rerun
    assert t["verify_ok"], rerun
    assert t["kills"] >= 1, rerun
    # A message delivered again without a retry or an expired lease asked
    # for it was held by a process killed before it settled it.
    assert t["duplicates_unexplained"] == 0, rerun
    assert t["delivered_after_ack"] == 0 and t["attempts_not_growing"] == 0, rerun
    assert t["child_failures"] == 0, rerun
    assert report["ok"] and proc.returncode == 0, rerun

    # Every message whose send returned was consumed: acked by a pull
    # consumer or the final drain, handled by the worker, or dead-lettered.
    assert t["sent"] > 1000, f"scenario: the producers sent almost nothing; {rerun}"
    assert t["first_deliveries"] >= t["sent"], rerun
    assert t["acked"] > 0 and t["handled"] > 0, f"scenario: a consumer role did nothing; {rerun}"
    assert t["redelivered_as_asked"] > 0, f"scenario: no retry was delivered again; {rerun}"
    for name in ("jobs", "events", "dead"):
        assert t["queue_stats"][name]["backlog"] == 0, (name, t["queue_stats"], rerun)

    rows = report["rows"]
    assert [r["end_s"] for r in rows] == [15, 30, 45, 60], rerun
    for r in rows:
        assert set(r) >= {"sent_per_s", "acked_per_s", "p50_ms", "p99_ms", "rss_mib", "disk_mib", "kills"}
        assert r["disk_mib"] > 0 and all(r["rss_mib"][role] > 0 for role in ("producer", "pull", "worker")), r
    assert sum(r["kills"] for r in rows) == t["kills"], rerun

    # Disk stays bounded: acks and checkpoints gave segments of both
    # message logs back, and the verdict's bound (2x + 16 MiB) held.
    for name in ("jobs", "events"):
        oldest = t["logs"][f"{name}/messages"]["oldest_segment"]
        assert oldest is not None and oldest > 0, f"{name}: no message segment was given back; {rerun}"
    assert report["flatness"]["ok"], rerun
    written_mib = t["sent"] * 200 / (1 << 20)   # under 200 bytes a message on disk
    assert max(r["disk_mib"] for r in rows) < written_mib + 16, rerun


def _checker(tmp_path, lines_by_file, killed=()):
    """The soak's checker over hand-written side files."""
    sys.path.insert(0, os.path.dirname(SOAK))
    try:
        import soak
    finally:
        sys.path.pop(0)
    side = tmp_path / "side"
    side.mkdir()
    for name, lines in lines_by_file.items():
        (side / name).write_text("".join(line + "\n" for line in lines))
    c = soak.Checker(str(side), 0.0, 10.0, 1)
    c.killed = set(killed)
    c.read()
    end = c.finish()
    return dict(c.c, **end)


def test_checker_counts_a_clean_history_as_clean(tmp_path):
    t = _checker(tmp_path, {
        "000001-producer": ["s 1.0 events 0 3 1 0"],
        "000002-pull": ["d 2.0 events 0:1:1:0:5 1:1:1:1:5 2:1:1:2:5", "r 2.1 events 1",
                        "a 2.2 2.3 events 0 2", "d 3.0 events 1:2:1:1:5", "a 3.1 3.2 events 1"],
    })
    assert (t["lost"], t["corrupt"], t["duplicates_unexplained"], t["redelivered_as_asked"]) == (0, 0, 0, 1), t


def test_checker_finds_a_lost_message(tmp_path):
    t = _checker(tmp_path, {
        "000001-producer": ["s 1.0 events 0 2 1 0"],
        "000002-pull": ["d 2.0 events 0:1:1:0:5", "a 2.2 2.3 events 0"],
    })
    assert t["lost"] == 1, t


def test_checker_finds_a_retried_message_never_delivered_again(tmp_path):
    t = _checker(tmp_path, {
        "000001-producer": ["s 1.0 jobs 0 1 1 0"],
        "000002-worker": ["d 2.0 jobs 0:1:1:0:5", "x 2.1 jobs 0"],
    })
    assert t["lost"] == 1, t


def test_checker_finds_a_message_delivered_under_another_number(tmp_path):
    t = _checker(tmp_path, {
        "000001-producer": ["s 1.0 events 0 2 1 0"],
        "000002-pull": ["d 2.0 events 0:1:1:1:5 1:1:1:0:5", "a 2.2 2.3 events 0 1"],
    })
    assert t["corrupt"] == 2 and t["lost"] == 0, t


def test_checker_tells_duplicates_of_a_killed_holder_from_unexplained_ones(tmp_path):
    files = {
        "000001-producer": ["s 1.0 events 0 1 1 0"],
        "000002-pull": ["d 2.0 events 0:1:1:0:5"],
        "000003-pull": ["d 40.0 events 0:2:1:0:5", "a 40.1 40.2 events 0"],
    }
    t = _checker(tmp_path, files, killed={2})
    assert (t["duplicates_in_flight"], t["duplicates_unexplained"], t["lost"]) == (1, 0, 0), t
    (tmp_path / "alive").mkdir()
    t = _checker(tmp_path / "alive", files)
    assert (t["duplicates_in_flight"], t["duplicates_unexplained"]) == (0, 1), t


def test_checker_finds_a_delivery_after_the_ack_returned(tmp_path):
    t = _checker(tmp_path, {
        "000001-producer": ["s 1.0 events 0 1 1 0"],
        "000002-pull": ["d 2.0 events 0:1:1:0:5", "a 2.1 2.2 events 0"],
        "000003-pull": ["d 40.0 events 0:2:1:0:5", "a 40.1 40.2 events 0"],
    })
    assert t["delivered_after_ack"] == 1, t


def test_checker_allows_only_the_call_in_flight_of_a_killed_producer_unreported(tmp_path):
    files = {
        "000001-producer": ["s 1.0 events 0 2 1 0"],
        "000002-pull": ["d 2.0 events 0:1:1:0:5 1:1:1:1:5 2:1:1:2:5 3:1:1:3:5", "a 2.1 2.2 events 0 1 2 3"],
    }
    t = _checker(tmp_path, files, killed={1})
    assert (t["corrupt"], t["in_flight_sends_delivered"]) == (0, 2), t
    (tmp_path / "alive").mkdir()
    t = _checker(tmp_path / "alive", files)
    assert t["corrupt"] == 2, t
