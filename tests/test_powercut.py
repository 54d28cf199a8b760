"""Power cuts, simulated through the syscall table (``_simvfs``).

A child appends with durability "sync" (and hands out some numbers through
a second handle in "none", and reads) while a Python syscall table records
what each fdatasync and directory fsync makes durable.  The parent SIGKILLs
it at a random point, builds the directory a power cut would leave (only
durably named files, each with its durable bytes, sometimes plus a random
subset of the pages written later: a torn tail), and opens it as after a
reboot (another boot id).  Then:

- the open succeeds;
- every acknowledged record is there, intact, at its number;
- nothing corrupt is returned, and no record appears at a number that was
  handed out or read for another one; a batch is all there or not at all;
- the next append gets a number above every number acknowledged, handed
  out or read before the cut (numbers are never reused).

The rounds chain: each one continues on the directory the previous cut left.
"""

from __future__ import annotations

import random
from typing import Dict

import pytest

import qlog
from _crashkit import Child, decode_payload, jitter, make_payload, read_all
from _simvfs import Recorder, boot_id_hook, materialise, new_boot_id, syscalls

SEGMENT = 64 << 10
ROUNDS = 24
PARENT = 0xFFFF   # child id of the records the checker appends


def _cut_point(rng: random.Random) -> int:
    return rng.choice([0, 1, rng.randint(1, 20), rng.randint(10, 80), rng.randint(40, 160)])


@pytest.mark.slow
def test_power_cut_loses_no_acknowledged_record_and_reuses_no_number(tmp_path):
    rng = random.Random(20240601)
    acked: Dict[int, int] = {}      # seq -> counter, acknowledged durable
    known: Dict[int, int] = {}      # seq -> counter, every number handed out or read
    high = -1                       # highest number handed out or read so far
    boot = new_boot_id(rng)
    cur = tmp_path / "r0"
    cur.mkdir()
    parent_n = 0
    torn_rounds = segments = 0
    for r in range(ROUNDS):
        shadow = tmp_path / f"shadow{r}"
        with Child("powercut_child", module="_simvfs", path=str(cur), shadow=str(shadow),
                   boot_id=boot, child_id=r + 1, seed=rng.getrandbits(32),
                   segment_bytes=SEGMENT) as child:
            child.wait_line("open")
            child.wait_calls(_cut_point(rng))
            jitter(rng)
            calls = child.kill()
            lines = list(child.lines)
        for c in calls:
            for i in range(c.n):
                acked[c.seq + i] = known[c.seq + i] = c.counter + i
                high = max(high, c.seq + i)
        for line in lines:
            kind, *nums = line.split()
            if kind == "S":
                seq, n, counter = map(int, nums)
                for i in range(n):
                    known[seq + i] = counter + i
                high = max(high, seq + n - 1)
            elif kind == "R":
                high = max(high, int(nums[0]))

        out = tmp_path / f"r{r + 1}"
        tear = random.Random(rng.getrandbits(32)) if rng.random() < 0.7 else None
        files = materialise(str(cur), str(shadow), str(out), tear)
        torn_rounds += any(t for _, t in files.values())
        boot = new_boot_id(rng)   # the machine reboots
        with syscalls(boot_id=boot_id_hook(boot)):
            with qlog.Log(out, durability="sync", segment_bytes=SEGMENT) as log:
                recs = read_all(log)
                by_seq = {}
                where: Dict[int, int] = {}
                for s, p in recs:
                    counter, batch, index = by_seq[s] = decode_payload(p)
                    assert counter not in where, f"round {r}: counter {counter:#x} at {where[counter]} and {s}"
                    where[counter] = s
                    assert known.get(s, counter) == counter, (
                        f"round {r}: number {s} was {known[s]:#x} before the cut, now holds {counter:#x}")
                for s, (counter, batch, index) in by_seq.items():
                    first = s - index
                    whole = [by_seq.get(first + i) for i in range(batch)]
                    assert whole == [(counter - index + i, batch, i) for i in range(batch)], (
                        f"round {r}: batch of {batch} at {first} is not whole after the cut: {whole}")
                for s, counter in acked.items():
                    assert s in by_seq and by_seq[s][0] == counter, (
                        f"round {r}: acknowledged record {s} ({counter:#x}) is "
                        f"{'missing' if s not in by_seq else 'replaced'} after the cut; files {files}")
                for s, (counter, _, _) in by_seq.items():
                    known[s] = counter
                    high = max(high, s)
                seq = log.append(make_payload((PARENT << 32) | parent_n))
                assert seq > high, (
                    f"round {r}: after the cut the next append got {seq}, not above {high} "
                    f"(highest number acknowledged, handed out or read)")
                acked[seq] = known[seq] = (PARENT << 32) | parent_n
                high = seq
                parent_n += 1
                segments = max(segments, log.stats().segments)
        cur = out
    assert torn_rounds >= 5, f"only {torn_rounds} rounds tore a tail"
    assert segments >= 5, f"the log never rolled much ({segments} segments)"
    assert len(acked) > 3 * ROUNDS


def test_power_cut_writing_back_only_the_end_of_a_batch_leaves_it_whole_or_gone(tmp_path):
    """An unsynced batch spans several pages; the kernel wrote back its last
    pages but not its first before the power went.  After the reboot the
    batch is all there or not at all, the acknowledged record before it is
    intact, and the batch's numbers are not handed out again."""
    rng = random.Random(7)
    live, shadow, out = tmp_path / "live", tmp_path / "shadow", tmp_path / "after"
    live.mkdir()
    rec = Recorder(str(live), str(shadow), new_boot_id(rng))
    with syscalls(**rec.hooks()):
        slog = qlog.Log(live, durability="sync", segment_bytes=SEGMENT)
        nlog = qlog.Log(live, durability="none", segment_bytes=SEGMENT)
        acked = slog.append(make_payload(1 << 32))
        first = nlog.append_batch([make_payload((1 << 32) + 1 + i, 4, i, 3000) for i in range(4)])
        # The cut: of the pages the batch dirtied, all but the first reached the disk.
        files = materialise(str(live), str(shadow), str(out),
                            choose=lambda name, pages: pages[1:] if name.endswith(".seg") else [])
        slog.close()
        nlog.close()
    assert sum(t for _, t in files.values()) >= 2, f"the batch did not span pages: {files}"
    with syscalls(boot_id=boot_id_hook(new_boot_id(rng))):
        with qlog.Log(out, durability="sync", segment_bytes=SEGMENT) as log:
            recs = read_all(log)
            assert recs[0] == (acked, make_payload(1 << 32))
            batch = [s for s, _ in recs if first <= s < first + 4]
            assert batch in ([], [first, first + 1, first + 2, first + 3]), (
                f"after the cut the batch {first}..{first + 3} is partly there: {batch}")
            for s, p in recs:
                decode_payload(p)
            assert log.append(b"next") > first + 3


def test_after_a_reboot_reopening_without_appending_never_hands_out_a_number_again(tmp_path):
    """Records handed out in "none" never reached the disk; the power goes.
    After the reboot the log skips past every number that may have been
    seen, and keeps doing so when it is closed and opened again in the same
    boot before anything is appended (a process that only looked): the next
    append gets a number above the ones handed out before the cut."""
    rng = random.Random(11)
    live, shadow, out = tmp_path / "live", tmp_path / "shadow", tmp_path / "after"
    live.mkdir()
    rec = Recorder(str(live), str(shadow), new_boot_id(rng))
    with syscalls(**rec.hooks()):
        with qlog.Log(live, durability="none", segment_bytes=SEGMENT) as log:
            handed = [log.append(make_payload(i)) for i in range(5)]
            # the power goes: nothing but the directory and `meta` is durable
            materialise(str(live), str(shadow), str(out))
    with syscalls(boot_id=boot_id_hook(new_boot_id(rng))):
        for opened in range(3):
            with qlog.Log(out, durability="none", segment_bytes=SEGMENT) as log:
                assert read_all(log) == []
                assert log.next_seq > max(handed), (
                    f"open {opened} after the reboot would number from {log.next_seq}; "
                    f"{handed} were handed out before the cut")
        with qlog.Log(out, durability="none", segment_bytes=SEGMENT) as log:
            first = log.append(make_payload(100))
            assert first > max(handed)
            second = log.append(make_payload(101))
        with qlog.Log(out, durability="none", segment_bytes=SEGMENT) as log:
            # in the same boot, after records: dense again, nothing lost
            assert [s for s, _ in read_all(log)] == [first, second]
            assert log.next_seq == second + 1
