"""The ``qlog`` command, run as a real process (``python -m qlog``) against
real data directories: send, stats, peek, dlq redrive, verify, pause and
resume, purge, bad usage (exit 2, nothing created), and ``qlog worker`` with
one process and with a supervisor of two, stopped by real signals.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import pickle
import pty
import re
import signal
import subprocess
import sys
import threading
from typing import Dict, Iterator, List, Optional, Sequence

import pytest
from _crashkit import child_env
from damage import flip_byte, records, segment_base, segments

import qlog

ROOT = pathlib.Path(__file__).resolve().parents[1]
Q = "jobs"
DLQ = "jobs-dlq"
_SUPERVISOR_ENV = "QLOG_SUPERVISOR_PID"  # set by `qlog worker --processes` for its workers
SUBCOMMANDS = ["worker", "send", "stats", "peek", "dlq", "dlq redrive", "verify", "repair", "pause", "resume", "purge"]


def cli_env() -> Dict[str, str]:
    env = child_env()
    env.pop(_SUPERVISOR_ENV, None)
    return env


def run_cli(*args: object, input: Optional[str] = None, cwd: Optional[os.PathLike] = None,
            timeout: float = 60.0, binary_input: Optional[bytes] = None) -> subprocess.CompletedProcess:
    """``python -m qlog ARGS``, finished; text stdout/stderr."""
    cmd = [sys.executable, "-m", "qlog", *map(str, args)]
    if binary_input is not None:
        p = subprocess.run(cmd, input=binary_input, capture_output=True, env=cli_env(), cwd=cwd,
                           timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(), p.stderr.decode())
    return subprocess.run(cmd, input=input if input is not None else "", capture_output=True, text=True,
                          env=cli_env(), cwd=cwd, timeout=timeout)


def tree(path: pathlib.Path) -> List[str]:
    """Every file and directory under ``path`` (relative), sorted."""
    out = []
    for base, dirs, files in os.walk(path):
        for name in dirs + files:
            out.append(os.path.relpath(os.path.join(base, name), path))
    return sorted(out)


@pytest.fixture
def data(tmp_path: pathlib.Path) -> pathlib.Path:
    """A data directory with an empty queue ``jobs``."""
    d = tmp_path / "data"
    with qlog.open(d) as b:
        b.queue(Q)
    return d


def stats_of(d: pathlib.Path, name: str) -> qlog.QueueStats:
    with qlog.open(d) as b:
        return b.queue(name).stats()


def table(stdout: str) -> List[List[str]]:
    """A table printed by the command, as rows of cells (header first)."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip()]


def dead_letter(d: pathlib.Path, queue: str, bodies: Sequence[object], content_type: str = "json",
                **settings: object) -> None:
    """Send ``bodies`` to ``queue`` and fail each once: with max_retries=0
    they go straight to ``jobs-dlq``."""
    with qlog.open(d) as b:
        q = b.queue(queue, max_retries=0, dead_letter_queue=DLQ, **settings)
        q.send_batch(list(bodies), content_type=content_type)
        batch = q.pull(1000)
        assert len(batch) == len(bodies)
        batch.retry_all()
        assert q.stats().dead_lettered == len(bodies)


# -- the command itself -----------------------------------------------------------


def test_pyproject_declares_the_qlog_script() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        section = re.search(r"^\[project\.scripts\]\n((?:[^\[].*\n?)*)", text, re.M)
        assert section and re.search(r'^qlog\s*=\s*"qlog\._cli:main"\s*$', section.group(1), re.M)
    else:
        assert tomllib.loads(text)["project"]["scripts"] == {"qlog": "qlog._cli:main"}


def test_version_prints_the_package_version() -> None:
    p = run_cli("--version")
    assert p.returncode == 0
    assert p.stdout.strip() == f"qlog {qlog.__version__}"


def test_no_subcommand_prints_help_and_exits_2(tmp_path) -> None:
    p = run_cli(cwd=tmp_path)
    assert p.returncode == 2
    assert "usage: qlog" in p.stderr
    for name in ("worker", "send", "stats", "peek", "dlq", "verify", "repair", "pause", "resume", "purge"):
        assert name in p.stderr
    assert tree(tmp_path) == []


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help(sub, tmp_path) -> None:
    p = run_cli(*sub.split(), "--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"usage: qlog {sub}")
    assert tree(tmp_path) == []


# -- send ------------------------------------------------------------------------


def test_send_creates_directory_and_queue_and_prints_the_id(tmp_path) -> None:
    d = tmp_path / "new" / "data"
    p = run_cli("send", d, Q, '{"user": 42, "tags": ["a", "b"]}')
    assert p.returncode == 0, p.stderr
    msg_id = p.stdout.strip()
    with qlog.open(d) as b:
        assert b.queues() == [Q]
        [m] = b.queue(Q).pull(10).messages
        assert (m.id, m.body, m.content_type) == (msg_id, {"user": 42, "tags": ["a", "b"]}, "json")


def test_send_text_and_bytes_keep_their_content_type(data) -> None:
    assert run_cli("send", data, Q, "plain words", "--content-type", "text").returncode == 0
    assert run_cli("send", data, Q, "raw", "--content-type", "bytes").returncode == 0
    assert run_cli("send", data, Q, "123").returncode == 0
    with qlog.open(data) as b:
        got = [(m.content_type, m.body) for m in b.queue(Q).pull(10).messages]
    assert got == [("text", "plain words"), ("bytes", b"raw"), ("json", 123)]


@pytest.mark.parametrize("content_type, stdin, body", [
    ("json", b'{"from": "stdin"}\n', {"from": "stdin"}),
    ("text", "line one\nline two\n".encode(), "line one\nline two\n"),
    ("bytes", bytes(range(256)), bytes(range(256))),
])
def test_send_dash_reads_the_body_from_stdin(data, content_type, stdin, body) -> None:
    p = run_cli("send", data, Q, "-", "--content-type", content_type, binary_input=stdin)
    assert p.returncode == 0, p.stderr
    with qlog.open(data) as b:
        [m] = b.queue(Q).pull(10).messages
    assert (m.id, m.content_type, m.body) == (p.stdout.strip(), content_type, body)


def test_send_with_delay_is_not_delivered_before_it(data) -> None:
    p = run_cli("send", data, Q, '"later"', "--delay", "3600")
    assert p.returncode == 0, p.stderr
    with qlog.open(data) as b:
        q = b.queue(Q)
        assert q.pull(10).messages == ()
        assert [m.body for m in q.peek()] == ["later"]
        assert q.stats().backlog == 1


@pytest.mark.parametrize("body, why", [
    ("{'single': 'quotes'}", "Expecting property name"),
    ("not json", "Expecting value"),
    ("NaN", "NaN is not valid JSON"),
])
def test_send_invalid_json_exits_2_and_creates_nothing(tmp_path, body, why) -> None:
    p = run_cli("send", tmp_path / "data", Q, body)
    assert p.returncode == 2
    assert p.stderr.startswith("qlog: error: BODY is not valid JSON")
    assert why in p.stderr
    assert tree(tmp_path) == []


# -- stats -----------------------------------------------------------------------


def test_stats_json_equals_queue_stats(data) -> None:
    with qlog.open(data) as b:
        q = b.queue(Q, max_retries=0, dead_letter_queue=DLQ)
        q.send_batch(list(range(10)))
        q.send("later", delay_seconds=3600)
        q.pull(3).ack_all()
        q.pull(2).retry_all()  # dead-lettered
        q.pull(1, visibility_timeout=3600)  # in flight
        b.queue("paused-one").pause_delivery()
    p = run_cli("stats", data, "--json", "--interval", "0")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert [r["name"] for r in doc["queues"]] == [Q, DLQ, "paused-one"]
    for row in doc["queues"]:
        want = stats_of(data, row["name"])
        for key in ("backlog", "in_flight", "delayed", "dead_lettered", "deleted", "acked",
                    "expired", "purged", "paused"):
            assert row[key] == getattr(want, key), (row["name"], key)
        assert (row["oldest_age"] is None) == (want.oldest_age is None)
        assert row["rate_in"] is None and row["rate_out"] is None
    jobs = doc["queues"][0]
    assert (jobs["backlog"], jobs["acked"], jobs["dead_lettered"], jobs["in_flight"]) == (6, 3, 2, 1)
    assert doc["queues"][2]["paused"] is True


def test_stats_table_has_a_header_and_a_row_per_queue(data) -> None:
    with qlog.open(data) as b:
        b.queue(Q).send_batch([1, 2, 3])
        b.queue("other").send("x")
        b.queue(Q).pull(1).ack_all()
    p = run_cli("stats", data, "--interval", "0")
    assert p.returncode == 0, p.stderr
    rows = table(p.stdout)
    header = rows[0]
    assert header == ["QUEUE", "BACKLOG", "IN-FLIGHT", "DELAYED", "DEAD-LETTERED", "DELETED", "ACKED",
                      "EXPIRED", "PURGED", "OLDEST", "PAUSED", "IN/S", "OUT/S"]
    by_name = {r[0]: dict(zip(header, r)) for r in rows[1:]}
    assert sorted(by_name) == [Q, "other"]
    assert (by_name[Q]["BACKLOG"], by_name[Q]["ACKED"], by_name[Q]["PAUSED"]) == ("2", "1", "no")
    assert by_name["other"]["BACKLOG"] == "1"
    assert by_name[Q]["IN/S"] == by_name[Q]["OUT/S"] == "-"


def test_stats_of_a_directory_without_queues_is_empty(tmp_path) -> None:
    d = tmp_path / "data"
    qlog.open(d).close()
    p = run_cli("stats", d, "--interval", "0")
    assert p.returncode == 0, p.stderr
    assert [r[0] for r in table(p.stdout)] == ["QUEUE"]
    p = run_cli("stats", d, "--json", "--interval", "0")
    assert json.loads(p.stdout) == {"queues": []}


def test_stats_rates_count_messages_sent_and_done_during_the_interval(data) -> None:
    stop = threading.Event()
    moved = [0]

    def traffic() -> None:
        with qlog.open(data, durability="none") as b:
            q = b.queue(Q)
            while not stop.is_set():
                q.send_batch([1, 2, 3])
                q.pull(3).ack_all()
                moved[0] += 3

    t = threading.Thread(target=traffic)
    t.start()
    try:
        p = run_cli("stats", data, "--json", "--interval", "0.5")
    finally:
        stop.set()
        t.join()
    assert p.returncode == 0, p.stderr
    [row] = json.loads(p.stdout)["queues"]
    assert moved[0] > 0
    assert row["rate_in"] > 0 and row["rate_out"] > 0


# -- peek ------------------------------------------------------------------------


def test_peek_shows_messages_without_leasing_them(data) -> None:
    long_text = "x" * 500
    with qlog.open(data) as b:
        q = b.queue(Q)
        ids = [q.send({"n": 1}), q.send(long_text, content_type="text"), q.send(b"\x00\x01", content_type="bytes")]
    p = run_cli("peek", data, Q)
    assert p.returncode == 0, p.stderr
    rows = table(p.stdout)
    assert rows[0] == ["ID", "SENT", "ATTEMPT", "TYPE", "VISIBLE", "BODY"]
    assert [r[0] for r in rows[1:]] == ids
    assert [r[2:5] for r in rows[1:]] == [["1", t, "now"] for t in ("json", "text", "bytes")]
    assert rows[1][5] == '{"n":1}'
    assert rows[2][5].startswith("xxxx") and rows[2][5].endswith("...") and len(rows[2][5]) < 100
    assert rows[3][5] == repr(b"\x00\x01")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rows[1][1])
    with qlog.open(data) as b:  # nothing was leased
        got = b.queue(Q).pull(10).messages
    assert [(m.id, m.attempts) for m in got] == [(i, 1) for i in ids]


def test_peek_json_has_full_bodies_and_base64_for_bytes(data) -> None:
    long_text = "y" * 500
    with qlog.open(data) as b:
        q = b.queue(Q)
        q.send([1, {"a": None}])
        q.send(long_text, content_type="text")
        q.send(b"\xff\x00raw", content_type="bytes")
        sent = [m.timestamp for m in q.peek()]
    p = run_cli("peek", data, Q, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["queue"] == Q
    msgs = doc["messages"]
    assert [(m["content_type"], m["body"], m["body_encoding"]) for m in msgs] == [
        ("json", [1, {"a": None}], None),
        ("text", long_text, None),
        ("bytes", base64.b64encode(b"\xff\x00raw").decode(), "base64"),
    ]
    assert [(m["attempts"], m["deliveries"], m["delayed"]) for m in msgs] == [(1, 0, False)] * 3
    assert [m["dead_letter"] for m in msgs] == [None, None, None]
    assert [m["timestamp"] for m in msgs] == [t.isoformat() for t in sent]


def test_peek_marks_delayed_messages_and_shows_the_attempt_a_pull_gives(data) -> None:
    with qlog.open(data) as b:
        q = b.queue(Q)
        q.send("later", delay_seconds=3600)
        q.send("again")
        assert [m.body for m in q.pull(10, visibility_timeout=0.001)] == ["again"]  # one delivery
    p = run_cli("peek", data, Q)
    rows = {r[5]: r for r in table(p.stdout)[1:]}
    assert rows['"later"'][2:5] == ["1", "json", rows['"later"'][4]]
    assert rows['"later"'][4].startswith("delayed until ")
    assert rows['"again"'][2] == "2" and rows['"again"'][4] == "now"
    msgs = {m["body"]: m for m in json.loads(run_cli("peek", data, Q, "--json").stdout)["messages"]}
    assert (msgs["later"]["delayed"], msgs["again"]["delayed"]) == (True, False)
    assert (msgs["again"]["deliveries"], msgs["again"]["attempts"]) == (1, 2)


def test_send_over_the_size_limit_exits_2_and_names_the_fix(data) -> None:
    with qlog.open(data) as b:
        b.queue(Q, max_message_size=100)
    p = run_cli("send", data, Q, json.dumps("x" * 200))
    assert p.returncode == 2, p.stderr
    assert "max_message_size 100" in p.stderr and "--max-message-size" in p.stderr
    assert stats_of(data, Q).backlog == 0


def test_stats_answers_at_once_by_default_and_watch_repeats_with_rates(data) -> None:
    with qlog.open(data) as b:
        b.queue(Q).send(1)
    p = run_cli("stats", data, "--json")
    assert p.returncode == 0, p.stderr
    [row] = json.loads(p.stdout)["queues"]
    assert row["rate_in"] is None and row["backlog"] == 1
    w = subprocess.Popen([sys.executable, "-m", "qlog", "stats", str(data), "--json", "--watch",
                          "--interval", "0.05"], stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        answers = [json.loads(w.stdout.readline()) for _ in range(2)]  # blocks until each is printed
        w.send_signal(signal.SIGINT)
        assert w.wait(30) == 0
    finally:
        if w.poll() is None:
            w.kill()
    assert all(a["queues"][0]["rate_in"] == 0 for a in answers)


def test_peek_n_limits_the_messages_shown(data) -> None:
    with qlog.open(data) as b:
        ids = b.queue(Q).send_batch(list(range(30)))
    p = run_cli("peek", data, Q, "-n", "4", "--json")
    assert [m["id"] for m in json.loads(p.stdout)["messages"]] == ids[:4]
    p = run_cli("peek", data, Q)
    assert len(table(p.stdout)) == 1 + 10  # the default


class _Trap:
    """Unpickling it creates a directory: proof that a body was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (self.marker,))


def test_peek_never_unpickles_a_pickle_body(data, tmp_path) -> None:
    marker = tmp_path / "unpickled"
    with qlog.open(data) as b:
        b.queue(Q, allow_pickle=True).send(_Trap(str(marker)), content_type="pickle")
    stored = pickle.dumps(_Trap(str(marker)), protocol=pickle.HIGHEST_PROTOCOL)
    p = run_cli("peek", data, Q)
    assert p.returncode == 0, p.stderr
    assert table(p.stdout)[1][3:] == ["pickle", "now", f"<pickle, {len(stored)} bytes>"]
    p = run_cli("peek", data, Q, "--json")
    [m] = json.loads(p.stdout)["messages"]
    assert (m["content_type"], m["body_encoding"]) == ("pickle", "base64")
    assert base64.b64decode(m["body"]) == stored
    assert not marker.exists()


def test_peek_of_a_dead_letter_queue_shows_where_messages_failed(data) -> None:
    dead_letter(data, Q, ["a", "b"])
    p = run_cli("peek", data, DLQ)
    rows = table(p.stdout)
    assert rows[0] == ["ID", "SENT", "ATTEMPT", "TYPE", "VISIBLE", "FAILED IN", "BODY"]
    assert [r[2] for r in rows[1:]] == ["1", "1"]  # what a pull of the DLQ gives them
    assert [r[5:] for r in rows[1:]] == [["jobs (1 attempt)", '"a"'], ["jobs (1 attempt)", '"b"']]
    msgs = json.loads(run_cli("peek", data, DLQ, "--json").stdout)["messages"]
    assert [(m["dead_letter"]["queue"], m["dead_letter"]["attempts"]) for m in msgs] == [(Q, 1), (Q, 1)]
    assert all(m["dead_letter"]["dead_lettered_at"] for m in msgs)


# -- dlq redrive ---------------------------------------------------------------------


def test_redrive_moves_each_dead_letter_back_to_the_queue_it_failed_in(data, tmp_path) -> None:
    marker = tmp_path / "unpickled"
    dead_letter(data, Q, [{"n": i} for i in range(150)])
    dead_letter(data, "other", [_Trap(str(marker))], content_type="pickle", allow_pickle=True)
    p = run_cli("dlq", "redrive", data, DLQ)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"moved 151 messages from {DLQ} to {Q} (150), other (1)"
    assert "\r" not in p.stderr  # not a terminal: no progress redraws
    with qlog.open(data) as b:
        assert b.queue(DLQ).stats().backlog == 0
        assert b.queue(DLQ).pull(10).messages == ()
        assert [m.body for m in b.queue(Q).pull(1000).messages] == [{"n": i} for i in range(150)]
        [m] = b.queue("other").pull(10).messages
        assert m.content_type == "pickle"
        assert m.raw_body == pickle.dumps(_Trap(str(marker)), protocol=pickle.HIGHEST_PROTOCOL)
    assert not marker.exists()


def on_a_terminal(*args: object) -> tuple:
    """``python -m qlog ARGS`` with stderr on a pseudo-terminal: (exit
    status, stdout, what the terminal showed)."""
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([sys.executable, "-m", "qlog", *map(str, args)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=slave, env=cli_env())
        os.close(slave)
        slave = -1
        shown = b""
        while True:  # until the command closes the terminal
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: no writer left
                break
            if not chunk:
                break
            shown += chunk
        out = p.communicate(timeout=120)[0].decode()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return p.returncode, out, shown.decode()


@pytest.mark.parametrize("command", ["verify", "repair"])
def test_verify_and_repair_draw_progress_on_a_terminal_and_only_results_on_a_pipe(tmp_path, command) -> None:
    d = tmp_path / "data"
    with qlog.open(d) as b:
        for i in range(3):
            b.queue(f"q{i}").send_batch(list(range(100)))
    rc, out, shown = on_a_terminal(command, d)
    assert rc == 0, shown
    assert "\r[" + "." * 30 + "] 0/3" in shown and "\r[" + "#" * 30 + "] 3/3" in shown
    piped = run_cli(command, d)
    assert piped.returncode == 0 and piped.stderr == ""
    assert piped.stdout == out and "[" + "#" * 30 not in piped.stdout


def test_redrive_draws_a_progress_bar_when_stderr_is_a_terminal(data) -> None:
    dead_letter(data, Q, list(range(250)))
    rc, out, bar = on_a_terminal("dlq", "redrive", data, DLQ)
    assert rc == 0
    assert out.strip() == f"moved 250 messages from {DLQ} to {Q}"
    assert "\r[" + "." * 30 + "] 0/250" in bar
    assert "\r[" + "#" * 30 + "] 250/250" in bar


def test_redrive_to_moves_every_dead_letter_into_the_given_queue(data) -> None:
    dead_letter(data, Q, ["a", "b", "c"])
    p = run_cli("dlq", "redrive", data, DLQ, "--to", "fixed", "--create")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"moved 3 messages from {DLQ} to fixed"
    with qlog.open(data) as b:
        assert [m.body for m in b.queue("fixed").pull(10).messages] == ["a", "b", "c"]
        assert b.queue(Q).stats().backlog == 0
        assert b.queue(DLQ).stats().backlog == 0


def test_redrive_limit_moves_at_most_that_many(data) -> None:
    dead_letter(data, Q, list(range(5)))
    p = run_cli("dlq", "redrive", data, DLQ, "--limit", "2")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"moved 2 messages from {DLQ} to {Q}"
    with qlog.open(data) as b:
        assert [m.body for m in b.queue(Q).pull(10).messages] == [0, 1]
        assert [m.body for m in b.queue(DLQ).peek()] == [2, 3, 4]


def test_redrive_without_to_refuses_messages_that_were_never_dead_lettered(data) -> None:
    dead_letter(data, Q, ["failed"])
    with qlog.open(data) as b:
        b.queue(DLQ).send("sent here directly")
    p = run_cli("dlq", "redrive", data, DLQ)
    assert p.returncode == 1
    assert "--to" in p.stderr and "nothing was moved" in p.stderr
    assert stats_of(data, DLQ).backlog == 2
    assert stats_of(data, Q).backlog == 0


# -- verify -----------------------------------------------------------------------


def test_verify_of_a_clean_directory_exits_0(data) -> None:
    with qlog.open(data) as b:
        q = b.queue(Q)
        q.send_batch(list(range(7)))
        q.pull(3).ack_all()
    with qlog.open(data) as b:
        q = b.queue(Q)
        want = q._b._msgs.verify().records + q._b._journal.verify().records
    p = run_cli("verify", data)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1] == f"ok: {want} records in 2 logs, no damage"
    doc = json.loads(run_cli("verify", data, "--json").stdout)
    assert doc["ok"] is True and doc["records"] == want
    assert [(e["queue"], e["log"], e["damage"]) for e in doc["logs"]] == [(Q, "messages", []), (Q, "state", [])]


def test_verify_reports_a_damaged_record_and_exits_1(data) -> None:
    with qlog.open(data) as b:
        big = b.queue("big", segment_bytes=1 << 16)
        for _ in range(20):  # a batch stays in one segment: several batches, several segments
            big.send_batch([b"m" * 1000] * 10, content_type="bytes")
    segs = segments(data / "queues" / "big" / "messages")
    assert len(segs) >= 3
    seg = segs[0]  # sealed
    victim = records(seg)[5]
    flip_byte(seg, victim.offset + victim.size // 2)
    p = run_cli("verify", data)
    assert p.returncode == 1
    assert (f"damage: segment {segment_base(seg)} offset {victim.offset} length {victim.size} "
            f"kind record") in p.stdout
    assert "queues/big/messages: 199 records, 1 damaged region" in p.stdout
    assert "queues/jobs/messages: 0 records" in p.stdout
    doc = json.loads(run_cli("verify", data, "--json").stdout)
    assert doc["ok"] is False
    (x,) = doc["logs"][0]["damage"]
    assert {k: x[k] for k in ("segment", "offset", "length", "after_seq", "kind", "first_seq", "last_seq")} == {
        "segment": segment_base(seg), "offset": victim.offset, "length": victim.size,
        "after_seq": victim.seq - 1, "kind": "record", "first_seq": victim.seq, "last_seq": victim.seq}


# -- pause, resume, purge -------------------------------------------------------------


def test_pause_and_resume_are_seen_by_every_process(data) -> None:
    with qlog.open(data) as b:
        q = b.queue(Q)
        q.send("waiting")
        p = run_cli("pause", data, Q)
        assert p.returncode == 0, p.stderr
        assert "paused" in p.stdout
        assert q.paused
        assert q.pull(10).messages == ()
        assert stats_of(data, Q).paused
        p = run_cli("resume", data, Q)
        assert p.returncode == 0, p.stderr
        assert "delivering again" in p.stdout
        assert not q.paused
        assert [m.body for m in q.pull(10).messages] == ["waiting"]


def test_purge_yes_deletes_every_message(data) -> None:
    with qlog.open(data) as b:
        b.queue(Q).send_batch([1, 2, 3])
    p = run_cli("purge", data, Q, "--yes")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"purged 3 messages from {Q}"
    st = stats_of(data, Q)
    assert (st.backlog, st.purged) == (0, 3)


@pytest.mark.parametrize("answer", ["n\n", "no\n", "\n", "", "maybe\n"], ids=["n", "no", "empty", "eof", "other"])
def test_purge_without_yes_asks_and_aborts_unless_told_yes(data, answer) -> None:
    with qlog.open(data) as b:
        b.queue(Q).send_batch([1, 2])
    p = run_cli("purge", data, Q, input=answer)
    assert p.returncode == 1
    assert f"Delete every message of queue '{Q}' (2 messages not yet done)? [y/N] " in p.stderr
    assert "aborted; nothing was deleted" in p.stderr
    assert stats_of(data, Q).backlog == 2


@pytest.mark.parametrize("answer", ["y\n", "YES\n"])
def test_purge_without_yes_deletes_when_answered_yes(data, answer) -> None:
    with qlog.open(data) as b:
        b.queue(Q).send_batch([1, 2])
    p = run_cli("purge", data, Q, input=answer)
    assert p.returncode == 0, p.stderr
    assert "[y/N]" in p.stderr
    assert p.stdout.strip() == f"purged 2 messages from {Q}"
    assert stats_of(data, Q).backlog == 0


# -- bad usage ---------------------------------------------------------------------

BAD_USAGE = [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["send"], "the following arguments are required: DIR, QUEUE, BODY"),
    (["send", "{d}", Q, "1", "--content-type", "xml"], "argument --content-type: invalid choice: 'xml'"),
    (["send", "{d}", Q, "1", "--delay", "-1"], "argument --delay: must be a number of seconds from 0 to 86400"),
    (["send", "{d}", "bad/name", "1"], "invalid queue name 'bad/name'"),
    (["stats", "{missing}"], "does not exist"),
    (["stats", "{empty}"], "holds no qlog data"),
    (["stats", "{d}", "--interval", "x"], "argument --interval"),
    (["peek", "{d}"], "the following arguments are required: QUEUE"),
    (["peek", "{d}", Q, "-n", "0"], "argument -n: must be an integer from 1 to 1000, got '0'"),
    (["peek", "{d}", Q, "-n", "1001"], "argument -n: must be an integer from 1 to 1000"),
    (["peek", "{missing}", Q], "does not exist"),
    (["peek", "{d}", "nosuch"], "no queue 'nosuch'"),
    (["dlq"], "qlog dlq needs a command"),
    (["dlq", "redrive", "{d}", "nosuch"], "no queue 'nosuch'"),
    (["dlq", "redrive", "{missing}", DLQ], "does not exist"),
    (["dlq", "redrive", "{d}", Q, "--to", "a b"], "invalid queue name given to --to 'a b'"),
    (["dlq", "redrive", "{d}", Q, "--to", Q], "is the dead-letter queue itself"),
    (["dlq", "redrive", "{d}", Q, "--limit", "0"], "argument --limit: must be an integer of at least 1"),
    (["verify", "{missing}"], "does not exist"),
    (["verify", "{empty}"], "holds no qlog data"),
    (["pause", "{d}", "nosuch"], "no queue 'nosuch'"),
    (["resume", "{missing}", Q], "does not exist"),
    (["purge", "{d}", "nosuch", "--yes"], "no queue 'nosuch'"),
    (["purge", "{d}", "../escape", "--yes"], "invalid queue name '../escape'"),
    (["worker"], "the following arguments are required: TARGET"),
    (["worker", "app:broker", "--processes", "0"], "argument --processes: must be an integer from 1"),
    (["worker", "app:broker", "--log-level", "LOUD"], "argument --log-level: invalid choice: 'LOUD'"),
]


@pytest.mark.parametrize("args, message", BAD_USAGE, ids=[" ".join(a) for a, _m in BAD_USAGE])
def test_bad_usage_exits_2_with_a_clear_message_and_creates_nothing(data, tmp_path, args, message) -> None:
    (tmp_path / "empty").mkdir()
    where = {"d": data, "missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    before = tree(tmp_path)
    p = run_cli(*[a.format(**where) for a in args], cwd=tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("qlog: error:")]
    assert len(errors) == 1, p.stderr
    assert message in errors[0]
    assert tree(tmp_path) == before


# -- worker ------------------------------------------------------------------------

APP = """
import os
import time

import qlog

broker = qlog.open({data!r})


@broker.consumer("jobs", max_batch_size=1, max_batch_timeout=0.05)
def handle(batch):
    for m in batch.messages:
        with open({out!r}, "a") as f:
            f.write(f"{{m.body}} {{os.getpid()}}\\n")
    # Held until the test lets go, so that another worker takes the next.
    deadline = time.monotonic() + 60
    while not os.path.exists({release!r}) and time.monotonic() < deadline:
        time.sleep(0.01)


idle = qlog.open({data!r})
QLOG_INT = 5
"""


@pytest.fixture
def app(tmp_path: pathlib.Path, data: pathlib.Path) -> Dict[str, pathlib.Path]:
    """``app.py`` in tmp_path: ``app:broker`` has a consumer of ``jobs`` that
    appends "<body> <pid>" lines to ``out`` and holds each batch until
    ``release`` exists; ``app:idle`` is a broker without consumers."""
    paths = {"data": data, "out": tmp_path / "out.txt", "release": tmp_path / "release", "dir": tmp_path}
    (tmp_path / "app.py").write_text(APP.format(**{k: str(v) for k, v in paths.items()}))
    return paths


def handled(out: pathlib.Path) -> List[List[str]]:
    if not out.exists():
        return []
    return [line.split() for line in out.read_text().splitlines()]


@contextlib.contextmanager
def running_worker(app: Dict[str, pathlib.Path], *args: str) -> Iterator[subprocess.Popen]:
    """``qlog worker app:broker ARGS`` logging to worker.log; killed on the
    way out if the test left it running."""
    with open(app["dir"] / "worker.log", "ab") as err:
        w = subprocess.Popen([sys.executable, "-m", "qlog", "worker", "app:broker", *args],
                             cwd=app["dir"], env=cli_env(), stdin=subprocess.DEVNULL,
                             stdout=err, stderr=err)
    try:
        yield w
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()


def children(pid: int) -> List[int]:
    """Live child processes of ``pid`` (zombies left out)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(name))
    return sorted(out)


def test_worker_runs_the_consumers_until_sigterm_and_exits_0(app, wait_until) -> None:
    app["release"].touch()
    with qlog.open(app["data"]) as b:
        q = b.queue(Q)
        with running_worker(app) as w:
            q.send_batch([1, 2, 3, 4, 5])
            wait_until(lambda: len(handled(app["out"])) == 5, timeout=30, what="all five handled")
            wait_until(lambda: q.stats().acked == 5, timeout=30, what="all five acked")
            w.send_signal(signal.SIGTERM)
            assert w.wait(30) == 0
        assert sorted(int(body) for body, _pid in handled(app["out"])) == [1, 2, 3, 4, 5]
        assert {pid for _body, pid in handled(app["out"])} == {str(w.pid)}
        st = q.stats()
        assert (st.acked, st.backlog) == (5, 0)
    log = (app["dir"] / "worker.log").read_text()
    assert "SIGTERM: stopping" in log


def test_worker_sigterm_mid_batch_finishes_it_takes_nothing_new_and_exits_0(app, wait_until) -> None:
    with qlog.open(app["data"]) as b:
        q = b.queue(Q)
        with running_worker(app, "--shutdown-timeout", "60") as w:
            q.send("first")
            wait_until(lambda: len(handled(app["out"])) == 1, timeout=30, what="the handler started")
            w.send_signal(signal.SIGTERM)
            wait_until(lambda: "SIGTERM: stopping" in (app["dir"] / "worker.log").read_text(),
                       timeout=30, what="the signal taken")
            q.send("second")  # sent after the signal: not taken
            assert w.poll() is None  # still in its handler
            assert q.stats().acked == 0  # nothing acked before the handler returns
            app["release"].touch()
            assert w.wait(30) == 0
        assert [body for body, _pid in handled(app["out"])] == ["first"]
        st = q.stats()
        assert (st.acked, st.backlog, st.in_flight) == (1, 1, 0)
        assert [m.body for m in q.pull(10).messages] == ["second"]


def test_worker_processes_supervises_and_restarts_its_workers(app, wait_until) -> None:
    seen: set = set()
    with running_worker(app, "--processes", "2", "--shutdown-timeout", "20") as sup:

        def two_children() -> List[int]:
            kids = children(sup.pid)
            seen.update(kids)
            return kids if len(kids) == 2 else []

        try:
            first = wait_until(two_children, timeout=30, what="two workers")
            os.kill(first[0], signal.SIGKILL)  # a worker dies: another takes its place
            wait_until(lambda: first[0] not in two_children() and two_children(), timeout=30,
                       what="a replacement worker")
            workers = two_children()
            assert first[1] in workers
            with qlog.open(app["data"]) as b:
                q = b.queue(Q)
                q.send_batch(["a", "b"])  # the first taken is held: the other worker takes the second
                wait_until(lambda: len(handled(app["out"])) == 2, timeout=30, what="both messages taken")
                assert {int(pid) for _body, pid in handled(app["out"])} == set(workers)
                app["release"].touch()
                wait_until(lambda: q.stats().acked == 2, timeout=30, what="both acked")
            sup.send_signal(signal.SIGTERM)
            assert sup.wait(30) == 0
            assert children(sup.pid) == []
            for pid in seen:
                assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived its supervisor"
        finally:
            for pid in seen:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    log = (app["dir"] / "worker.log").read_text()
    assert f"(pid {first[0]}) was killed by SIGKILL; starting another" in log


@pytest.mark.parametrize("target, message", [
    ("nosuch:broker", "no module named 'nosuch'"),
    ("app:missing", "module 'app' has no attribute 'missing'"),
    ("app:handle", "is a function, not a qlog.Broker"),
    ("app:idle", "has no consumers"),
    ("app:QLOG_INT", "is an int, not a qlog.Broker"),
    ("app", "must be 'module:attribute' or 'file.py:attribute'"),
    ("./nothere.py:broker", "no file"),
])
def test_worker_with_a_bad_target_exits_2_naming_the_problem(app, target, message) -> None:
    p = run_cli("worker", target, cwd=app["dir"])
    assert p.returncode == 2
    assert "qlog: error: " in p.stderr and message in p.stderr


@pytest.mark.parametrize("form", ["./app.py:broker", "app.py:broker", "{dir}/app.py:broker"])
def test_worker_takes_a_file_path_target_and_logs_where_it_consumes(app, wait_until, form, tmp_path) -> None:
    app["release"].touch()
    target = form.format(dir=app["dir"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = elsewhere if target.startswith("/") else app["dir"]
    with qlog.open(app["data"]) as b:
        q = b.queue(Q)
        q.send("x")
        with open(app["dir"] / "worker.log", "wb") as err:
            w = subprocess.Popen([sys.executable, "-m", "qlog", "worker", target], cwd=cwd, env=cli_env(),
                                 stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            wait_until(lambda: q.stats().acked == 1, timeout=30, what="the message handled")
            w.send_signal(signal.SIGTERM)
            assert w.wait(30) == 0
        finally:
            if w.poll() is None:
                w.kill()
    log = (app["dir"] / "worker.log").read_text()
    assert f"data directory {os.path.abspath(app['data'])}, engine {qlog.ENGINE}, queues jobs" in log


def test_worker_refuses_a_data_directory_without_its_queues_unless_create(app, wait_until) -> None:
    with qlog.open(app["data"]) as b:
        b.delete_queue(Q)  # as if started where nothing ever created "jobs"
    p = run_cli("worker", "app:broker", cwd=app["dir"])
    assert p.returncode == 2
    assert f"none of the queues jobs of 'app:broker' exists in the data directory {app['data']}" in p.stderr
    assert "--create" in p.stderr and "qlog queues create" in p.stderr
    with qlog.open(app["data"]) as b:
        assert b.queues() == []  # the refusal created nothing
    app["release"].touch()
    with running_worker(app, "--create") as w:
        with qlog.open(app["data"]) as b:
            b.queue(Q).send("y")
            wait_until(lambda: b.queue(Q).stats().acked == 1, timeout=30, what="consumed with --create")
        w.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0


LOGGING_APP = """
import logging, qlog
logging.basicConfig(format="APP %(levelname)s %(name)s | %(message)s", level=logging.WARNING)
broker = qlog.open({data!r})

@broker.consumer("jobs", max_batch_size=1, max_batch_timeout=0)
def handle(batch):
    logging.getLogger("app").warning("handled %s", batch.messages[0].body)
"""


@pytest.mark.parametrize("flags", [[], ["--log-level", "INFO"], ["--log-format", "json"]])
def test_worker_keeps_the_applications_logging_unless_asked(tmp_path, data, wait_until, flags) -> None:
    (tmp_path / "logapp.py").write_text(LOGGING_APP.format(data=str(data)))
    with qlog.open(data) as b:
        q = b.queue(Q)
        q.send("one")
        w = subprocess.Popen([sys.executable, "-m", "qlog", "worker", "logapp:broker", *flags], cwd=tmp_path,
                             env=cli_env(), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: q.stats().acked == 1, timeout=30, what="handled")
            w.send_signal(signal.SIGTERM)
            err = w.communicate(timeout=30)[1]
        finally:
            if w.poll() is None:
                w.kill()
    assert w.returncode == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if flags == ["--log-format", "json"]:
        docs = [json.loads(ln) for ln in lines]  # every line is one JSON object
        assert {"time", "level", "logger", "message", "process"} <= set(docs[0])
        assert any(d["logger"] == "app" and d["message"] == "handled one" for d in docs)
        assert not any(d["level"] == "INFO" for d in docs)  # the application's WARNING level kept
        return
    assert "APP WARNING app | handled one" in lines
    assert all(ln.startswith("APP ") for ln in lines), lines  # its format, no second handler
    startup = [ln for ln in lines if "data directory" in ln]
    assert startup == ([] if not flags else [startup[0]]) and (not flags or startup[0].startswith("APP INFO"))


def test_worker_processes_back_off_a_worker_that_fails_to_start_then_give_up(tmp_path) -> None:
    (tmp_path / "broken.py").write_text("import qlog\nraise RuntimeError('the config server is down')\n")
    p = run_cli("worker", "broken:broker", "--processes", "2", cwd=tmp_path, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "the config server is down" in p.stderr
    assert "5 times in a row" in p.stderr and "giving up" in p.stderr
    starts = p.stderr.count("started worker")
    assert 5 <= starts <= 10, p.stderr  # one slot's five failed starts end it, never a loop
    delays = [float(x) for x in re.findall(r"starting another in ([\d.]+) s", p.stderr)]
    assert delays and max(delays) >= 4 * min(delays), delays  # the wait doubles


def test_worker_processes_with_a_bad_target_exits_2_without_restarting(app) -> None:
    p = run_cli("worker", "app:missing", "--processes", "2", cwd=app["dir"])
    assert p.returncode == 2
    assert "module 'app' has no attribute 'missing'" in p.stderr
    assert "starting another" not in p.stderr
