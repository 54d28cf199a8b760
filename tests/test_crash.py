"""kill -9 at random moments: a returned append is never lost, whatever the
durability mode, and a writer killed while others use the log is repaired
by the survivors.

Each child is a fresh interpreter that appends (single records and small
batches of self-checking payloads) and reports every returned call on a
pipe; the parent SIGKILLs it once it has reported a random number of calls,
then reopens the log with a new ``Log`` and states the invariant
(``_crashkit.check_log``): nothing damaged, numbers dense from 0, every
reported record there with its payload, batches whole, and nothing nobody
appended.  The next child carries on in the same directory.  Segments are
small so that kills also land in segment rolls.
"""

from __future__ import annotations

import random
import signal

import pytest

import damage
import qlog
from _crashkit import ROLL_STEPS, Call, Child, Ledger, check_log, jitter, make_payload

SEGMENT = 128 << 10
KILLS = 20
KILLS_PURE = 7  # the pure engine's runs are slower: fewer kills keep the suite's CPU budget
MODES = ("sync", "interval", "none")

VICTIM_LIMIT = 5000  # calls a victim makes at most: far past any kill point


def _kill_point(rng: random.Random) -> int:
    """How many calls the child reports before it is killed (0: right after open)."""
    return rng.choice([0, 1, rng.randint(1, 30), rng.randint(30, 300), rng.randint(100, 600)])


@pytest.mark.slow
@pytest.mark.parametrize("durability", MODES)
def test_kill_9_never_loses_a_returned_append(tmp_path, durability, engine):
    rng = random.Random(f"kill-9/{durability}")
    path = str(tmp_path / "log")
    ledger = Ledger()
    killed = []
    kills = KILLS if engine == "c" else KILLS_PURE
    for k in range(kills):
        child_id = k + 1
        with Child("appender", path=path, durability=durability, segment_bytes=SEGMENT,
                   child_id=child_id, seed=rng.getrandbits(32)) as child:
            child.wait_line("open")
            child.wait_calls(_kill_point(rng))
            jitter(rng)
            calls = child.kill()
        ledger.add(child_id, calls)
        killed.append(child_id)
        with qlog.Log(path, durability=durability, segment_bytes=SEGMENT) as log:
            recs = check_log(log, ledger, killed=killed)
            ledger.adopt(recs, killed)
            segments = log.stats().segments
    assert len(ledger.acked) > kills, "the children appended almost nothing"
    assert segments >= 4, f"the log never rolled much ({segments} segments): kills missed the rolls"


@pytest.mark.slow
def test_writer_killed_while_another_appends_is_repaired_and_the_survivor_goes_on(tmp_path, engine):
    """Two writers share the log; one is SIGKILLed again and again (possibly
    holding the writers' lock or the group-commit lock, mid-batch or mid-roll).
    The survivor keeps appending after every kill, and the log stays dense
    and intact, for readers that join meanwhile and after a final reopen."""
    rng = random.Random("two-writers")
    path = str(tmp_path / "log")
    ledger = Ledger()
    killed = []
    survivor_id = 1000
    # The survivor appends with durability "sync": it contends for the group-commit
    # lock as well as the writers' lock.  Its pace (a pause after each call) and the
    # victims' limit keep the log small however slow this machine is: the checks
    # below read it all after every kill, and a log that grew with the time they
    # took made them slower still (thousands of segments under the sanitizers).
    with Child("appender", path=path, durability="sync", segment_bytes=SEGMENT,
               child_id=survivor_id, seed=rng.getrandbits(32), single_share=0.7,
               pause=0.002) as survivor:
        survivor.wait_line("open")
        for k in range(KILLS if engine == "c" else KILLS_PURE):
            victim_id = k + 1
            with Child("appender", path=path, durability=rng.choice(MODES), segment_bytes=SEGMENT,
                       child_id=victim_id, seed=rng.getrandbits(32), limit=VICTIM_LIMIT) as victim:
                victim.wait_line("open")
                victim.wait_calls(_kill_point(rng))
                jitter(rng)
                calls = victim.kill()
            ledger.add(victim_id, calls)
            killed.append(victim_id)
            # The survivor is not stuck behind a lock the victim died holding.
            survivor.wait_calls(len(survivor.calls) + 50)
            ledger.add(survivor_id, list(survivor.calls))
            with qlog.Log(path, durability="none", segment_bytes=SEGMENT) as log:
                end = log.next_seq
                recs = check_log(log, ledger, killed=killed, live=[survivor_id], end=end)
                ledger.adopt(recs, killed)
        calls = survivor.kill()
    ledger.add(survivor_id, calls)
    killed.append(survivor_id)
    with qlog.Log(path, durability="sync", segment_bytes=SEGMENT) as log:
        check_log(log, ledger, killed=killed)
        assert log.stats().segments >= 4
        seq = log.append(b"after")
        assert seq == log.next_seq - 1 and log.read(seq) == [(seq, b"after")]


@pytest.mark.c_only("the victim dies at a chosen system call of the C engine's roll (its syscall table)")
@pytest.mark.parametrize("step", list(ROLL_STEPS))
def test_writer_killed_at_each_step_of_a_roll_is_repaired(tmp_path, step):
    """The writer dies (SIGKILL) at a chosen system call of a segment roll,
    holding the writers' lock, while another process has the log open.  A
    survivor repairs the log and appends small records that fit the segment
    the victim was sealing: readers see them all, from any starting number.
    Then, reopened alone, the log holds them and hands out no number twice;
    and it goes on through further rolls."""
    rng = random.Random(f"roll/{step}")
    path = str(tmp_path / "log")
    ledger = Ledger()
    victim_id, survivor_id, idle_id, parent_id, later_id = 1, 2, 3, 4, 5
    killed = [victim_id, survivor_id, later_id]
    with Child("appender", path=path, durability="none", segment_bytes=SEGMENT,
               child_id=idle_id, seed=0, limit=0) as idle:
        # An idle handle keeps the control block alive across the victim's death.
        idle.wait_line("open")
        # Seed 7: the victim's last batch leaves 792 bytes free in the
        # segment it seals, room for the survivor's first small records.
        with Child("roll_victim", path=path, segment_bytes=SEGMENT, child_id=victim_id,
                   step=step, seed=7) as victim:
            assert victim.proc.wait(60) == -signal.SIGKILL, victim.stderr
            ledger.add(victim_id, victim.kill())
        with Child("appender", path=path, durability="none", segment_bytes=SEGMENT,
                   child_id=survivor_id, seed=0, small_first=5, limit=5) as survivor:
            survivor.wait_calls(5)
            ledger.add(survivor_id, survivor.kill())
        first = survivor.calls[0].seq
        assert first in [r.seq for r in damage.records(damage.segments(path)[0])], (
            "scenario: the survivor's first record should lie in the segment the victim sealed")
        with qlog.Log(path, durability="none", segment_bytes=SEGMENT) as log:
            check_log(log, ledger, killed=killed)
        idle.kill()
    with qlog.Log(path, durability="sync", segment_bytes=SEGMENT) as log:
        recs = check_log(log, ledger, killed=killed)
        seq = log.append(make_payload(parent_id << 32))
        assert seq == len(recs), f"reopened alone, the log handed out {seq} after {len(recs)} records"
        ledger.add(parent_id, [Call(seq, 1, parent_id << 32)])
    with Child("appender", path=path, durability="none", segment_bytes=SEGMENT,
               child_id=later_id, seed=rng.getrandbits(32)) as later:
        later.wait_calls(400)   # through two more rolls
        ledger.add(later_id, later.kill())
    with qlog.Log(path, durability="none", segment_bytes=SEGMENT) as log:
        check_log(log, ledger, killed=killed)
        assert log.stats().segments >= 3
