"""``qlog queues list|create|info|update|delete``, run as a real process
against real data directories; each test checks the output and exit status,
then opens the directory here and checks what is stored."""

from __future__ import annotations

import json
import pathlib

import pytest
from test_cli import run_cli, table, tree

import qlog

Q = "jobs"
DLQ = "jobs-dlq"
SUBCOMMANDS = ["queues", "queues list", "queues create", "queues info", "queues update", "queues delete"]


def settings_of(d: pathlib.Path, name: str) -> qlog.QueueSettings:
    with qlog.open(d) as b:
        assert name in b.queues()
        return b.queue(name).settings


@pytest.fixture
def data(tmp_path: pathlib.Path) -> pathlib.Path:
    """A data directory with queue ``jobs``: max_retries 7, DLQ ``jobs-dlq``, retry_delay 5."""
    d = tmp_path / "data"
    with qlog.open(d) as b:
        b.queue(Q, max_retries=7, dead_letter_queue=DLQ, retry_delay=5)
    return d


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_queues_subcommand_has_help(sub, tmp_path) -> None:
    p = run_cli(*sub.split(), "--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"usage: qlog {sub}")
    assert tree(tmp_path) == []


def test_queues_without_a_command_prints_help_and_exits_2(tmp_path) -> None:
    p = run_cli("queues", cwd=tmp_path)
    assert p.returncode == 2
    assert "qlog queues needs a command" in p.stderr
    for name in ("list", "create", "info", "update", "delete"):
        assert name in p.stderr


def test_create_flags_show_each_settings_limits_and_default(tmp_path) -> None:
    p = run_cli("queues", "create", "--help", cwd=tmp_path)
    text = " ".join(p.stdout.split())
    assert "--max-retries N an integer from 0 to 100 (default 3)" in text
    assert "--visibility-timeout S seconds from 0.001 to 43200 (default 30)" in text
    assert "--message-retention S seconds from 60 to 1209600, or 'unlimited' (default 345600)" in text
    assert "--dead-letter-queue QUEUE" in text
    for handle_key in ("--durability", "--allow-pickle", "--segment-bytes"):
        assert handle_key not in text


# -- create ------------------------------------------------------------------------


def test_create_makes_the_directory_and_stores_the_settings_given(tmp_path) -> None:
    d = tmp_path / "data"
    p = run_cli("queues", "create", d, Q, "--max-retries", "5", "--dead-letter-queue", DLQ,
                "--delivery-delay", "2.5", "--message-retention", "unlimited", "--max-batch-size", "50")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"created queue {Q!r}\nsettings:\n")
    assert ["max_retries", "5"] in table(p.stdout)
    s = settings_of(d, Q)
    assert (s.max_retries, s.dead_letter_queue, s.delivery_delay, s.message_retention, s.max_batch_size) == \
        (5, DLQ, 2.5, None, 50)
    defaults = qlog.QueueSettings()
    assert (s.visibility_timeout, s.retry_delay, s.max_concurrency) == \
        (defaults.visibility_timeout, defaults.retry_delay, defaults.max_concurrency)


def test_create_refuses_an_existing_queue_and_changes_nothing(data) -> None:
    with qlog.open(data) as b:
        b.queue(Q).send("kept")
    p = run_cli("queues", "create", data, Q, "--max-retries", "1")
    assert p.returncode == 1
    assert f"queue {Q!r} already exists" in p.stderr
    assert "qlog queues update" in p.stderr
    assert settings_of(data, Q).max_retries == 7
    with qlog.open(data) as b:
        assert b.queue(Q).stats().backlog == 1


@pytest.mark.parametrize("flag, value, expected", [
    ("--max-retries", "101", "setting 'max_retries' given as --max-retries must be from 0 to 100, got 101"),
    ("--max-retries", "1.5", "setting 'max_retries' given as --max-retries must be an integer, got '1.5'"),
    ("--max-batch-size", "0", "must be from 1 to 100, got 0"),
    ("--visibility-timeout", "0", "setting 'visibility_timeout' given as --visibility-timeout must be from 0.001 to 43200"),
    ("--delivery-delay", "soon", "setting 'delivery_delay' given as --delivery-delay must be a number, got 'soon'"),
    ("--message-retention", "30", "must be from 60 to 1209600"),
    ("--dead-letter-queue", "a/b", "invalid dead_letter_queue name 'a/b'"),
])
def test_create_refuses_a_bad_value_naming_the_setting_and_limit_and_creates_nothing(
        flag, value, expected, tmp_path) -> None:
    p = run_cli("queues", "create", tmp_path / "data", Q, flag, value, cwd=tmp_path)
    assert p.returncode == 2
    assert expected in p.stderr
    assert tree(tmp_path) == []


def test_create_refuses_an_invalid_queue_name_and_creates_nothing(tmp_path) -> None:
    p = run_cli("queues", "create", tmp_path / "data", "../escape", cwd=tmp_path)
    assert p.returncode == 2
    assert "invalid queue name '../escape'" in p.stderr
    assert tree(tmp_path) == []


# -- list ----------------------------------------------------------------------------


def test_list_shows_each_queues_counts_paused_and_dead_letter_queue(data) -> None:
    with qlog.open(data) as b:
        q = b.queue(Q)
        q.send_batch([1, 2, 3, 4])
        assert len(q.pull(1, visibility_timeout=300)) == 1
        q.pull(1, visibility_timeout=300).retry_all(delay_seconds=3600)
        b.queue("other").pause_delivery()
        expected = {n: b.queue(n).stats() for n in (Q, "other")}
    assert (expected[Q].backlog, expected[Q].in_flight, expected[Q].delayed) == (4, 1, 1)
    p = run_cli("queues", "list", data, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"queues": [
        {"name": Q, "backlog": 4, "in_flight": 1, "delayed": 1, "paused": False, "dead_letter_queue": DLQ},
        {"name": "other", "backlog": 0, "in_flight": 0, "delayed": 0, "paused": True, "dead_letter_queue": None},
    ]}
    p = run_cli("queues", "list", data)
    assert p.returncode == 0, p.stderr
    assert table(p.stdout) == [
        ["QUEUE", "BACKLOG", "IN-FLIGHT", "DELAYED", "PAUSED", "DLQ"],
        [Q, "4", "1", "1", "no", DLQ],
        ["other", "0", "0", "0", "yes", "-"],
    ]


def test_list_of_a_missing_directory_exits_2_and_creates_nothing(tmp_path) -> None:
    p = run_cli("queues", "list", tmp_path / "nowhere", cwd=tmp_path)
    assert p.returncode == 2
    assert "does not exist" in p.stderr
    assert tree(tmp_path) == []


# -- info ------------------------------------------------------------------------------


def test_info_shows_settings_counts_and_metrics(data) -> None:
    with qlog.open(data) as b:
        q = b.queue(Q)
        q.send_batch(["a", "bb"], content_type="text")
        q.pull(1, visibility_timeout=300)
        metrics = q.metrics()
    p = run_cli("queues", "info", data, Q, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["queue"] == Q
    s = doc["settings"]
    assert (s["max_retries"], s["dead_letter_queue"], s["retry_delay"], s["max_batch_size"]) == (7, DLQ, 5, 10)
    assert set(s) == {"max_batch_size", "max_batch_timeout", "max_retries", "dead_letter_queue", "retry_delay",
                      "delivery_delay", "message_retention", "visibility_timeout", "max_message_size",
                      "max_concurrency"}
    st = doc["stats"]
    assert (st["backlog"], st["in_flight"], st["delayed"], st["sent"], st["paused"]) == (2, 1, 0, 2, False)
    assert doc["metrics"]["backlog_count"] == 2
    assert doc["metrics"]["backlog_bytes"] == metrics.backlog_bytes > 0
    assert doc["metrics"]["oldest_message_timestamp"] == metrics.oldest_message_timestamp

    p = run_cli("queues", "info", data, Q)
    assert p.returncode == 0, p.stderr
    rows = table(p.stdout)
    assert rows[0] == [f"queue {Q} in {data}"]
    for row in (["settings:"], ["max_retries", "7"], ["dead_letter_queue", DLQ], ["stats:"],
                ["backlog", "2"], ["in_flight", "1"], ["metrics:"], ["backlog_bytes", str(metrics.backlog_bytes)]):
        assert row in rows


def test_info_shows_settings_from_qlog_toml(data) -> None:
    (data / "qlog.toml").write_text('[[queues.consumers]]\nqueue = "other"\nmax_batch_timeout = 9\n')
    with qlog.open(data) as b:
        b.queue("other")
    p = run_cli("queues", "info", data, "other", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["settings"]["max_batch_timeout"] == 9


def test_info_of_a_missing_queue_names_it_and_creates_nothing(data) -> None:
    p = run_cli("queues", "info", data, "nope")
    assert p.returncode == 2
    assert f"no queue 'nope' in {str(data)!r} (its queues: {Q})" in p.stderr
    with qlog.open(data) as b:
        assert b.queues() == [Q]


# -- update ------------------------------------------------------------------------------


def test_update_changes_only_the_keys_named_for_a_handle_already_open(data) -> None:
    with qlog.open(data) as b:
        q = b.queue(Q)
        assert q.settings.max_batch_size == 10
        p = run_cli("queues", "update", data, Q, "--max-batch-size", "50", "--visibility-timeout", "2.5")
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines()[0] == \
            f"updated queue {Q!r}: max_batch_size 10 -> 50, visibility_timeout 30 -> 2.5"
        assert ["max_batch_size", "50"] in table(p.stdout)
        s = q.settings  # the handle open here sees the change
        assert (s.max_batch_size, s.visibility_timeout) == (50, 2.5)
        assert (s.max_retries, s.dead_letter_queue, s.retry_delay) == (7, DLQ, 5)


def test_update_clears_the_dead_letter_queue_and_retention_limit(data) -> None:
    p = run_cli("queues", "update", data, Q, "--dead-letter-queue", "", "--message-retention", "unlimited")
    assert p.returncode == 0, p.stderr
    assert ["dead_letter_queue", "-"] in table(p.stdout)
    assert ["message_retention", "unlimited"] in table(p.stdout)
    s = settings_of(data, Q)
    assert (s.dead_letter_queue, s.message_retention, s.max_retries) == (None, None, 7)


def test_update_to_the_same_values_says_so(data) -> None:
    p = run_cli("queues", "update", data, Q, "--max-retries", "7")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"queue {Q!r} unchanged")


@pytest.mark.parametrize("args, expected", [
    (["--max-concurrency", "251"], "setting 'max_concurrency' given as --max-concurrency must be from 1 to 250, got 251"),
    (["--max-retries", "5", "--retry-delay", "86401"], "must be from 0 to 86400, got 86401.0"),
    (["--dead-letter-queue", Q], f"queue {Q!r} cannot be its own dead_letter_queue"),
    ([], "name at least one setting to change (settings: --max-batch-size,"),
    (["--max-retry", "5"], "unknown setting '--max-retry': settings: --max-batch-size,"),
    (["--durability", "none"], "durability belongs to each process's handle, not to the queue"),
    (["--paused"], "delivery is paused with `qlog pause DIR QUEUE`"),
])
def test_update_refuses_bad_settings_and_changes_nothing(data, args, expected) -> None:
    p = run_cli("queues", "update", data, Q, *args)
    assert p.returncode == 2
    assert expected in p.stderr
    s = settings_of(data, Q)
    assert (s.max_retries, s.dead_letter_queue, s.retry_delay, s.max_concurrency) == (7, DLQ, 5, 1)


def test_update_of_a_missing_queue_names_it_and_creates_nothing(data) -> None:
    p = run_cli("queues", "update", data, "nope", "--max-retries", "1")
    assert p.returncode == 2
    assert "no queue 'nope'" in p.stderr
    with qlog.open(data) as b:
        assert b.queues() == [Q]


# -- delete --------------------------------------------------------------------------------


def test_delete_refuses_a_queue_with_messages_without_force(data) -> None:
    with qlog.open(data) as b:
        b.queue(Q).send_batch([1, 2, 3])
    p = run_cli("queues", "delete", data, Q)
    assert p.returncode == 1
    assert f"queue {Q!r} holds 3 messages not yet done, so it was not deleted" in p.stderr
    assert "--force` deletes them" in p.stderr
    with qlog.open(data) as b:
        assert b.queues() == [Q]
        assert b.queue(Q).stats().backlog == 3


def test_delete_with_force_deletes_the_queue_and_its_messages(data) -> None:
    with qlog.open(data) as b:
        b.queue(Q).send_batch([1, 2, 3])
        b.queue("other")
    p = run_cli("queues", "delete", data, Q, "--force")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"deleted queue {Q!r} and its 3 messages not yet done"
    with qlog.open(data) as b:
        assert b.queues() == ["other"]
    assert not (data / "queues" / Q).exists()


def test_delete_of_an_empty_queue_needs_no_force(data) -> None:
    with qlog.open(data) as b:
        q = b.queue(Q)
        q.send("done")
        q.pull(1).ack_all()
    p = run_cli("queues", "delete", data, Q)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"deleted queue {Q!r}"
    with qlog.open(data) as b:
        assert b.queues() == []


def test_delete_of_a_missing_queue_names_it(data) -> None:
    p = run_cli("queues", "delete", data, "nope", "--force")
    assert p.returncode == 2
    assert "no queue 'nope'" in p.stderr
    with qlog.open(data) as b:
        assert b.queues() == [Q]
