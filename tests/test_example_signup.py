"""examples/signup: the web app and the welcome-email worker as real
processes, driven over real HTTP and stopped with real signals."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from _crashkit import child_env

import qlog

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "signup"
QUEUE, DLQ = "welcome-emails", "welcome-emails-dlq"
DEADLINE = 30.0  # seconds to wait for a condition before the test fails


def read_lines(path: Path) -> List[str]:
    """The complete lines of a file another process may be appending to."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line[:-1] for line in text.splitlines(keepends=True) if line.endswith("\n")]


class Example:
    """One test's data directory and the example's processes on it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.data = tmp_path / "signup-data"
        self.procs: List[subprocess.Popen] = []
        self.port = 0
        self._broker: Optional[qlog.Broker] = None
        self._logs: Dict[int, Path] = {}  # pid -> its stderr

    def env(self, **knobs: object) -> Dict[str, str]:
        env = {k: v for k, v in child_env().items() if not k.startswith("SIGNUP_")}
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ in examples/
        env["SIGNUP_DATA"] = str(self.data)
        env.update({k: str(v) for k, v in knobs.items()})
        return env

    def _start(self, cmd: List[str], stdout: int, knobs: Dict[str, object]) -> subprocess.Popen:
        log = self.tmp / f"stderr-{len(self.procs)}.log"
        with open(log, "wb") as err:
            p = subprocess.Popen(cmd, cwd=EXAMPLE, env=self.env(**knobs), stdin=subprocess.DEVNULL,
                                 stdout=stdout, stderr=err)
        self._logs[p.pid] = log
        self.procs.append(p)
        return p

    def start_app(self) -> subprocess.Popen:
        p = self._start([sys.executable, "app.py"], subprocess.PIPE, {"SIGNUP_PORT": 0})
        assert p.stdout is not None
        line = b""
        end = time.monotonic() + DEADLINE
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, end - time.monotonic()))
            chunk = os.read(p.stdout.fileno(), 1024) if ready else b""
            if not chunk:
                raise AssertionError(f"the app printed {line!r} and no port; stderr: {self.log_of(p)}")
            line += chunk
        prefix = "listening on http://127.0.0.1:"
        assert line.decode().startswith(prefix), line
        self.port = int(line.decode().strip()[len(prefix):])
        return p

    def start_worker(self, **knobs: object) -> subprocess.Popen:
        return self._start([sys.executable, "-m", "qlog", "worker", "worker:broker"], subprocess.DEVNULL, knobs)

    def log_of(self, p: subprocess.Popen) -> str:
        return self._logs[p.pid].read_text(errors="replace")[-3000:]

    def request(self, method: str, path: str, body: Optional[bytes] = None) -> Tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=DEADLINE) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def signup(self, email: str, name: str) -> Tuple[int, dict]:
        return self.request("POST", "/signup", json.dumps({"email": email, "name": name}).encode())

    def queue(self, name: str = QUEUE) -> qlog.Queue:
        if self._broker is None:
            self._broker = qlog.open(str(self.data))
        return self._broker.queue(name)

    def users(self) -> List[dict]:
        return [json.loads(line) for line in read_lines(self.data / "users.jsonl")]

    def outbox(self) -> List[dict]:
        return [json.loads(line) for line in read_lines(self.data / "outbox.jsonl")]

    def started(self) -> List[str]:
        return read_lines(self.data / "progress.log")

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
        """Signal ``p`` and return its exit status."""
        p.send_signal(sig)
        try:
            return p.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {p.pid} did not exit after {sig!r}; stderr: {self.log_of(p)}") from None

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        if self._broker is not None:
            self._broker.close()


@pytest.fixture
def ex(tmp_path: Path):
    example = Example(tmp_path)
    try:
        yield example
    finally:
        example.cleanup()


def done(q: qlog.Queue, acked: int, dead_lettered: int = 0) -> bool:
    s = q.stats()
    return s.backlog == 0 and s.in_flight == 0 and s.acked == acked and s.dead_lettered == dead_lettered


def test_signup_is_saved_and_its_welcome_email_sent_once(ex: Example, wait_until) -> None:
    app = ex.start_app()
    worker = ex.start_worker()
    status, body = ex.signup("ada@example.com", "Ada")
    assert status == 202, body
    assert set(body) == {"userId", "messageId"}
    assert ex.users() == [{"userId": body["userId"], "email": "ada@example.com", "name": "Ada"}]

    wait_until(ex.outbox, what="the welcome email")
    wait_until(lambda: done(ex.queue(), acked=1), what="the message acked")
    assert ex.outbox() == [{"messageId": body["messageId"], "userId": body["userId"],
                            "to": "ada@example.com", "subject": "Welcome, Ada!"}]
    out = subprocess.run([sys.executable, "-m", "qlog", "stats", str(ex.data), "--json", "--interval", "0"],
                         env=ex.env(), capture_output=True, text=True, check=True).stdout
    [row] = [r for r in json.loads(out)["queues"] if r["name"] == QUEUE]
    assert (row["backlog"], row["in_flight"], row["acked"]) == (0, 0, 1)
    assert ex.stop(worker) == 0, ex.log_of(worker)
    assert ex.stop(app) == 0, ex.log_of(app)


def test_bounced_email_ends_in_the_dlq_while_a_good_one_is_sent(ex: Example, wait_until) -> None:
    ex.start_app()
    ex.start_worker(SIGNUP_RETRY_DELAY=0)
    bad_status, bad = ex.signup("bob@bounce.example", "Bob")
    good_status, good = ex.signup("ada@example.com", "Ada")
    assert (bad_status, good_status) == (202, 202), (bad, good)

    wait_until(lambda: done(ex.queue(), acked=1, dead_lettered=1), what="Bob's message dead-lettered")
    [dead] = ex.queue(DLQ).peek(10)
    assert dead.id == bad["messageId"]
    assert dead.body == {"userId": bad["userId"], "email": "bob@bounce.example", "name": "Bob"}
    assert dead.dead_letter is not None and dead.dead_letter.queue == QUEUE
    assert dead.dead_letter.attempts == 4  # max_retries=3: the first attempt and three retries
    assert ex.started().count(f"started {bad['messageId']}") == 4
    assert [e["messageId"] for e in ex.outbox()] == [good["messageId"]]


@pytest.mark.parametrize("body, field, words", [
    pytest.param(b"{not json", "body", "JSON", id="invalid-json"),
    pytest.param(b'["ada@example.com", "Ada"]', "body", "JSON object", id="not-an-object"),
    pytest.param(b'{"name": "Ada"}', "email", "254", id="missing-email"),
    pytest.param(b'{"email": "ada.example.com", "name": "Ada"}', "email", "one '@'", id="email-without-at"),
    pytest.param(b'{"email": "ada@@example.com", "name": "Ada"}', "email", "one '@'", id="email-with-two-ats"),
    pytest.param(b'{"email": "@example.com", "name": "Ada"}', "email", "both sides", id="email-without-user"),
    pytest.param(b'{"email": "ada@' + b"x" * 250 + b'.com", "name": "Ada"}', "email", "254", id="email-too-long"),
    pytest.param(b'{"email": "ada@example.com", "name": ""}', "name", "non-empty", id="empty-name"),
    pytest.param(b'{"email": "ada@example.com", "name": "' + b"x" * 101 + b'"}', "name", "100",
                 id="name-too-long"),
])
def test_bad_signup_is_refused_naming_the_field_and_nothing_is_saved_or_sent(
    ex: Example, body: bytes, field: str, words: str
) -> None:
    ex.start_app()
    status, reply = ex.request("POST", "/signup", body)
    assert status == 400
    assert reply["field"] == field
    assert field in reply["error"]
    assert words in reply["error"]
    assert ex.users() == []
    assert ex.queue().stats().backlog == 0

    # The same app saves and sends a good one, so the checks above can see it.
    status, reply = ex.signup("ada@example.com", "A" * 100)
    assert status == 202, reply
    assert [u["userId"] for u in ex.users()] == [reply["userId"]]
    assert ex.queue().stats().backlog == 1


def test_health_check_and_unknown_paths(ex: Example) -> None:
    ex.start_app()
    assert ex.request("GET", "/healthz") == (200, {"ok": True})
    assert ex.request("GET", "/signup")[0] == 404
    assert ex.request("POST", "/nope", b"{}")[0] == 404


def test_email_of_a_killed_worker_is_sent_once_by_the_next(ex: Example, wait_until) -> None:
    ex.start_app()
    first = ex.start_worker(SIGNUP_EMAIL_SECONDS=30, SIGNUP_VISIBILITY_TIMEOUT=2)
    status, body = ex.signup("ada@example.com", "Ada")
    assert status == 202, body
    mid = body["messageId"]
    wait_until(lambda: f"started {mid}" in ex.started(), what="the first worker to start the email")
    assert ex.stop(first, signal.SIGKILL) == -signal.SIGKILL
    assert ex.outbox() == []
    assert ex.queue().stats().acked == 0

    ex.start_worker(SIGNUP_EMAIL_SECONDS=0, SIGNUP_VISIBILITY_TIMEOUT=2)
    wait_until(lambda: done(ex.queue(), acked=1), what="the message acked")
    assert [e["messageId"] for e in ex.outbox()] == [mid]
    assert ex.started() == [f"started {mid}"] * 2  # delivered to each worker


def test_redelivered_message_whose_email_went_out_is_not_sent_again(ex: Example, wait_until) -> None:
    # A worker that died between sending the email and acking its message:
    # the outbox has the email, the queue still has the message.
    ex.start_app()
    status, body = ex.signup("ada@example.com", "Ada")
    assert status == 202, body
    line = {"messageId": body["messageId"], "userId": body["userId"], "to": "ada@example.com",
            "subject": "Welcome, Ada!"}
    ex.data.joinpath("outbox.jsonl").write_text(json.dumps(line) + "\n")

    ex.start_worker()
    wait_until(lambda: done(ex.queue(), acked=1), what="the message acked")
    assert ex.outbox() == [line]
    assert ex.started() == []


def test_sigterm_stops_an_idle_worker(ex: Example, wait_until) -> None:
    worker = ex.start_worker()
    wait_until(lambda: "consuming welcome-emails" in ex.log_of(worker), what="the worker to start consuming")
    assert ex.stop(worker) == 0, ex.log_of(worker)


def test_sigterm_mid_email_lets_the_email_finish_then_exits_0(ex: Example, wait_until) -> None:
    ex.start_app()
    worker = ex.start_worker(SIGNUP_EMAIL_SECONDS=2)
    status, body = ex.signup("ada@example.com", "Ada")
    assert status == 202, body
    wait_until(lambda: f"started {body['messageId']}" in ex.started(), what="the worker to start the email")
    assert ex.stop(worker) == 0, ex.log_of(worker)
    assert [e["messageId"] for e in ex.outbox()] == [body["messageId"]]
    assert done(ex.queue(), acked=1)
