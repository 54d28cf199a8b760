"""The ``qlog`` command's progress lines, size limits and qlog.toml checks,
run as real processes (``python -m qlog``) on real data directories, with
stderr on a real pseudo-terminal where a progress line is expected and on a
pipe where only the result may appear."""

from __future__ import annotations

import json
import pathlib
import time

import pytest
import test_cli
from test_cli import DLQ, Q, dead_letter, on_a_terminal, run_cli, stats_of, table, tree

import qlog
from qlog._cli.common import Progress
from qlog._settings import RANGES

DEFAULT_LIMIT = qlog.QueueSettings().max_message_size
data = test_cli.data  # the CLI tests' fixture: a data directory with an empty queue "jobs"


def fill_dlq(d: pathlib.Path, n: int) -> None:
    """``n`` messages of ``jobs`` failed once each into ``jobs-dlq``."""
    with qlog.open(d, durability="none") as b:
        q = b.queue(Q, max_retries=0, dead_letter_queue=DLQ)
        for i in range(0, n, 1000):
            q.send_batch(list(range(i, min(n, i + 1000))))
        while True:
            batch = q.pull(1000)
            if not batch.messages:
                break
            batch.retry_all()
        assert b.queue(DLQ).stats().backlog == n


# -- progress on a terminal, nothing on a pipe --------------------------------------


def test_purge_shows_a_spinner_on_a_terminal_and_only_the_result_on_a_pipe(data) -> None:
    with qlog.open(data) as b:
        b.queue(Q).send_batch(list(range(500)))
        b.queue("other").send_batch(list(range(7)))
    rc, out, shown = on_a_terminal("purge", data, Q, "--yes")
    assert rc == 0, shown
    assert out == f"purged 500 messages from {Q}\n"
    assert f"\r| purging {Q} 0.0s" in shown  # drawn as soon as the purge starts
    assert shown.endswith("\r\x1b[K")  # and wiped when it ends
    piped = run_cli("purge", data, "other", "--yes")
    assert piped.returncode == 0
    assert (piped.stdout, piped.stderr) == ("purged 7 messages from other\n", "")


def test_progress_is_redrawn_at_most_ten_times_a_second(data) -> None:
    fill_dlq(data, 3000)  # redrive reports after each batch of 100: 30 reports
    started = time.monotonic()
    rc, out, shown = on_a_terminal("dlq", "redrive", data, DLQ)
    elapsed = time.monotonic() - started  # covers the whole process, so the bound is generous
    assert rc == 0, shown
    assert out == f"moved 3000 messages from {DLQ} to {Q}\n"
    draws = shown.count("\r[")
    assert "\r[" + "#" * 30 + "] 3000/3000 done" in shown  # the last state is always drawn
    # One draw at the start, at most one per interval after it, and the last.
    assert draws <= elapsed / Progress.INTERVAL + 2, (draws, elapsed)
    assert stats_of(data, Q).backlog == 3000


@pytest.mark.parametrize("command", ["verify", "repair"])
def test_verify_and_repair_name_the_queue_they_are_on_with_the_elapsed_time(tmp_path, command) -> None:
    d = tmp_path / "data"
    with qlog.open(d, durability="none") as b:
        b.queue("big").send_batch(list(range(1000)))
    rc, out, shown = on_a_terminal(command, d)
    assert rc == 0, shown
    verb = "verifying" if command == "verify" else "repairing"
    assert f"] 0/1 {verb} big " in shown
    assert "\r[" + "#" * 30 + "] 1/1 done " in shown
    assert "\x1b" not in out and "\r" not in out
    piped = run_cli(command, d)
    assert (piped.returncode, piped.stdout, piped.stderr) == (0, out, "")


def test_repair_dry_run_progress_says_checking(tmp_path) -> None:
    d = tmp_path / "data"
    with qlog.open(d) as b:
        b.queue("one").send(1)
    rc, out, shown = on_a_terminal("repair", d, "--dry-run")
    assert rc == 0, shown
    assert "] 0/1 checking one " in shown
    assert out.endswith("dry run: 0 queues would be repaired; nothing was changed\n")


# -- send and the size limit ------------------------------------------------------------


def test_send_over_the_default_limit_to_a_new_directory_exits_2_and_creates_nothing(tmp_path) -> None:
    d = tmp_path / "new"
    body = json.dumps("x" * DEFAULT_LIMIT)  # the quotes make it 2 bytes too many
    p = run_cli("send", d, Q, "-", input=body)
    assert p.returncode == 2
    assert f"is {DEFAULT_LIMIT + 2} bytes stored, larger than max_message_size {DEFAULT_LIMIT} bytes" in p.stderr
    assert f"qlog queues create {d} {Q} --max-message-size BYTES" in p.stderr
    assert "nothing was written" in p.stderr
    assert not d.exists()


def test_send_over_the_default_limit_to_a_new_queue_creates_no_queue(data) -> None:
    before = tree(data)
    p = run_cli("send", data, "fresh", "-", input=json.dumps("y" * DEFAULT_LIMIT))
    assert p.returncode == 2
    assert "a new queue 'fresh' gets" in p.stderr
    assert tree(data) == before
    with qlog.open(data) as b:
        assert b.queues() == [Q]


def test_send_to_a_new_queue_obeys_the_limit_qlog_toml_gives_it(data) -> None:
    (data / "qlog.toml").write_text('[[queues.producers]]\nqueue = "roomy"\nmax_message_size = 300000\n'
                                    '[[queues.consumers]]\nqueue = "tight"\nmax_message_size = 10\n')
    big = json.dumps("z" * 200_000)
    p = run_cli("send", data, "roomy", "-", input=big)
    assert p.returncode == 0, p.stderr
    p = run_cli("send", data, "tight", json.dumps("more than ten"))
    assert p.returncode == 2
    assert "larger than max_message_size 10 bytes, the limit a new queue 'tight' gets" in p.stderr
    with qlog.open(data) as b:
        assert b.queues() == [Q, "roomy"]
        assert [m.body for m in b.queue("roomy").peek()] == ["z" * 200_000]


def test_send_over_the_highest_limit_says_no_queue_takes_it(data) -> None:
    top = RANGES["max_message_size"][2]
    p = run_cli("send", data, Q, "-", "--content-type", "bytes", binary_input=b"\0" * (top + 1))
    assert p.returncode == 2
    assert f"is {top + 1} bytes stored, larger than any queue takes" in p.stderr
    assert "--max-message-size" not in p.stderr  # raising the limit would not help
    assert stats_of(data, Q).sent == 0


def test_send_of_text_that_is_not_unicode_exits_2_and_creates_nothing(tmp_path) -> None:
    d = tmp_path / "new"
    # The byte 0xff on the command line reaches Python as the lone surrogate "\udcff".
    p = run_cli("send", d, Q, "--content-type", "text", "\udcff")
    assert p.returncode == 2
    assert "BODY cannot be sent: text body is not valid Unicode" in p.stderr
    assert not d.exists()


# -- qlog.toml ---------------------------------------------------------------------------


def test_two_consumer_blocks_for_one_queue_in_qlog_toml_are_refused_naming_both(data) -> None:
    toml = data / "qlog.toml"
    toml.write_text('[[queues.consumers]]\nqueue = "jobs"\nmax_retries = 1\n'
                    '[[queues.consumers]]\nqueue = "other"\n'
                    '[[queues.consumers]]\nqueue = "jobs"\nmax_batch_size = 5\n')
    before = tree(data)
    for args in (["stats", data], ["send", data, Q, "1"], ["queues", "info", data, Q]):
        p = run_cli(*args)
        assert p.returncode == 1, args
        assert (f"queue 'jobs' has two [[queues.consumers]] blocks in {toml} (#1 and #3)"
                in p.stderr), p.stderr
        assert "merge them into one block" in p.stderr
    assert tree(data) == before
    toml.unlink()
    assert stats_of(data, Q).sent == 0


# -- peek and purge wording ---------------------------------------------------------------


def test_peek_of_a_dlq_shows_attempt_1_whatever_the_deliveries_before(data) -> None:
    with qlog.open(data) as b:
        q = b.queue(Q, max_retries=2, dead_letter_queue=DLQ)
        q.send("tried thrice")
        for _ in range(3):
            q.pull(1).retry_all()
        assert b.queue(DLQ).stats().backlog == 1
    rows = table(run_cli("peek", data, DLQ).stdout)
    assert rows[1][2] == "1" and rows[1][5] == f"{Q} (3 attempts)"
    [m] = json.loads(run_cli("peek", data, DLQ, "--json").stdout)["messages"]
    assert (m["attempts"], m["deliveries"], m["dead_letter"]["attempts"]) == (1, 0, 3)


def test_purge_prompt_counts_one_message_in_the_singular(data) -> None:
    dead_letter(data, Q, ["only"])
    p = run_cli("purge", data, DLQ, input="n\n")
    assert p.returncode == 1
    assert f"Delete every message of queue '{DLQ}' (1 message not yet done)? [y/N] " in p.stderr
    assert stats_of(data, DLQ).backlog == 1


def test_redrive_stopped_part_way_says_how_many_messages_were_moved(data) -> None:
    fill_dlq(data, 1000)  # the first 1000 are checked before anything moves; the next is not
    with qlog.open(data) as b:
        b.queue(DLQ).send("sent here directly")
    p = run_cli("dlq", "redrive", data, DLQ)
    assert p.returncode == 1
    assert "has no queue it failed in: move it with --to QUEUE; 1000 messages were moved before it" \
        in p.stderr, p.stderr
    assert "(s)" not in p.stderr
    assert stats_of(data, Q).backlog == 1000
