"""``qlog serve``: Cloudflare's Queues API driven by the official
``cloudflare`` SDK against a real server process, plain HTTP for the shapes
the SDK does not reach (errors, limits, auth, paused), and /metrics."""

from __future__ import annotations

import base64
import contextlib
import json
import pathlib
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional

import httpx
import pytest
from _crashkit import child_env
from cloudflare import Cloudflare
from conftest import free_port

import qlog

TOKEN = "test-token-0123456789"
ACCOUNT = "local"


@contextlib.contextmanager
def serving(target: str, *args: str, token: Optional[str] = TOKEN) -> Iterator[str]:
    """``qlog serve TARGET`` on a free port; yields its base URL once it answers."""
    port = free_port()
    env = child_env()
    env.pop("QLOG_TOKEN", None)
    if token is not None:
        env["QLOG_TOKEN"] = token
    p = subprocess.Popen([sys.executable, "-m", "qlog", "serve", target, "--port", str(port), *args],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60.0
        while True:
            if p.poll() is not None:
                pytest.fail(f"qlog serve exited {p.returncode}: {p.stdout.read() if p.stdout else ''}")
            try:
                httpx.get(base + "/metrics", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > end:
                    pytest.fail("qlog serve did not answer within 60 s")
                time.sleep(0.05)
        yield base
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout:
            p.stdout.close()


@pytest.fixture
def data(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "data"


@pytest.fixture
def server(data: pathlib.Path) -> Iterator[str]:
    with serving(str(data)) as base:
        yield base


@pytest.fixture
def cf(server: str) -> Cloudflare:
    return Cloudflare(api_token=TOKEN, base_url=server + "/client/v4", max_retries=0)


def _api(server: str, method: str, path: str, body: Any = None, token: Optional[str] = TOKEN,
         **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    headers.update(kw.pop("headers", {}))
    return httpx.request(method, f"{server}/client/v4/accounts/{ACCOUNT}/queues{path}",
                         json=body, headers=headers, timeout=30, **kw)


# ---- the SDK, endpoint by endpoint -------------------------------------------------


def test_sdk_push_pull_ack_retry_round_trip(cf: Cloudflare, data: pathlib.Path) -> None:
    created = cf.queues.create(account_id=ACCOUNT, queue_name="jobs")
    assert created.queue_name == "jobs" and created.queue_id and len(created.queue_id) == 16
    cf.queues.messages.push("jobs", account_id=ACCOUNT, body={"userId": 42}, content_type="json")
    cf.queues.messages.push(created.queue_id, account_id=ACCOUNT, body="plain text", content_type="text")
    bulk = cf.queues.messages.bulk_push("jobs", account_id=ACCOUNT, messages=[
        {"body": {"n": 1}, "content_type": "json"}, {"body": "two", "content_type": "text"}])
    assert bulk.metadata.metrics.backlog_count == 4
    pulled = cf.queues.messages.pull("jobs", account_id=ACCOUNT, batch_size=10, visibility_timeout_ms=30000)
    assert len(pulled.messages) == 4
    by_type = {m.metadata["CF-Content-Type"]: m for m in pulled.messages}
    bodies = []
    for m in pulled.messages:
        if m.metadata["CF-Content-Type"] == "json":
            bodies.append(json.loads(base64.b64decode(m.body)))
        else:
            bodies.append(m.body)
        assert m.attempts == 1 and m.lease_id and m.timestamp_ms > 0
    assert sorted(map(str, bodies)) == sorted(map(str, [{"userId": 42}, "plain text", {"n": 1}, "two"]))
    assert by_type["text"].body in ("plain text", "two")
    first, *rest = pulled.messages
    res = cf.queues.messages.ack("jobs", account_id=ACCOUNT, acks=[{"lease_id": m.lease_id} for m in rest],
                                 retries=[{"lease_id": first.lease_id, "delay_seconds": 0}])
    assert (res.ack_count, res.retry_count) == (3, 1)
    again = cf.queues.messages.pull("jobs", account_id=ACCOUNT, batch_size=10, visibility_timeout_ms=30000)
    assert [(m.id, m.attempts) for m in again.messages] == [(first.id, 2)]
    with qlog.open(data) as b:  # the same store, through the Python API
        st = b.queue("jobs").stats()
        assert (st.sent, st.acked, st.in_flight) == (4, 3, 1)


def test_sdk_stale_ack_warns_and_retry_of_a_stale_lease_changes_nothing(cf: Cloudflare) -> None:
    cf.queues.create(account_id=ACCOUNT, queue_name="jobs")
    cf.queues.messages.push("jobs", account_id=ACCOUNT, body={"a": 1}, content_type="json")
    m = cf.queues.messages.pull("jobs", account_id=ACCOUNT, batch_size=1, visibility_timeout_ms=1).messages[0]
    m2 = cf.queues.messages.pull("jobs", account_id=ACCOUNT, batch_size=1, visibility_timeout_ms=30000,
                                 extra_body={"wait_ms": 5000}).messages[0]
    assert m2.id == m.id and m2.attempts == 2
    res = cf.queues.messages.ack("jobs", account_id=ACCOUNT, acks=[], retries=[{"lease_id": m.lease_id}])
    assert res.retry_count == 0 and m.lease_id in (res.warnings or {})
    res = cf.queues.messages.ack("jobs", account_id=ACCOUNT, acks=[{"lease_id": m2.lease_id}], retries=[])
    assert res.ack_count == 1


def test_sdk_queues_list_get_update_metrics_peek_purge_delete(cf: Cloudflare, data: pathlib.Path) -> None:
    for name in ("a", "b", "c"):
        cf.queues.create(account_id=ACCOUNT, queue_name=name)
    assert [q.queue_name for q in cf.queues.list(account_id=ACCOUNT)] == ["a", "b", "c"]
    got = cf.queues.get("b", account_id=ACCOUNT)
    assert got.queue_name == "b" and got.settings.delivery_paused is False
    upd = cf.queues.update(got.queue_id, account_id=ACCOUNT, queue_name="b",
                           settings={"delivery_delay": 5, "message_retention_period": 3600})
    assert (upd.settings.delivery_delay, upd.settings.message_retention_period) == (5, 3600)
    edited = cf.queues.edit("b", account_id=ACCOUNT, settings={"delivery_paused": True})
    assert edited.settings.delivery_paused is True
    with qlog.open(data) as br:
        q = br.queue("b")
        assert (q.settings.delivery_delay, q.settings.message_retention, q.paused) == (5, 3600, True)
    cf.queues.messages.bulk_push("a", account_id=ACCOUNT, messages=[{"body": {"i": i}, "content_type": "json"}
                                                                   for i in range(5)])
    metrics = cf.queues.get_metrics("a", account_id=ACCOUNT)
    assert metrics.backlog_count == 5 and metrics.backlog_bytes > 0 and metrics.oldest_message_timestamp_ms > 0
    peeked = cf.queues.messages.peek("a", account_id=ACCOUNT, batch_size=3)
    assert len(peeked.messages) == 3 and all(m.ref for m in peeked.messages)
    cf.queues.messages.purge("a", account_id=ACCOUNT, refs=[{"ref": peeked.messages[2].ref}])
    assert cf.queues.get_metrics("a", account_id=ACCOUNT).backlog_count == 4
    left = cf.queues.messages.pull("a", account_id=ACCOUNT, batch_size=10, visibility_timeout_ms=30000)
    assert peeked.messages[2].id not in {m.id for m in left.messages} and len(left.messages) == 4
    cf.queues.purge.start("a", account_id=ACCOUNT, delete_messages_permanently=True)
    assert cf.queues.purge.status("a", account_id=ACCOUNT).completed == "true"
    assert cf.queues.get_metrics("a", account_id=ACCOUNT).backlog_count == 0
    cf.queues.delete("c", account_id=ACCOUNT)
    assert [q.queue_name for q in cf.queues.list(account_id=ACCOUNT)] == ["a", "b"]


def test_sdk_consumers_create_list_get_update_delete(cf: Cloudflare, data: pathlib.Path) -> None:
    cf.queues.create(account_id=ACCOUNT, queue_name="jobs")
    c = cf.queues.consumers.create("jobs", account_id=ACCOUNT, type="http_pull", dead_letter_queue="jobs-dlq",
                                   settings={"batch_size": 20, "max_retries": 2, "visibility_timeout_ms": 5000})
    assert c.type == "http_pull" and c.dead_letter_queue == "jobs-dlq"
    assert (c.settings.batch_size, c.settings.max_retries, c.settings.visibility_timeout_ms) == (20, 2, 5000)
    with qlog.open(data) as b:
        s = b.queue("jobs").settings
        assert (s.max_batch_size, s.max_retries, s.visibility_timeout, s.dead_letter_queue) == (20, 2, 5, "jobs-dlq")
    assert [x.consumer_id for x in cf.queues.consumers.list("jobs", account_id=ACCOUNT)] == [c.consumer_id]
    assert cf.queues.consumers.get(c.consumer_id, account_id=ACCOUNT, queue_id="jobs").type == "http_pull"
    w = cf.queues.consumers.update(c.consumer_id, account_id=ACCOUNT, queue_id="jobs", type="worker",
                                   script_name="my-worker", settings={"max_wait_time_ms": 250, "max_concurrency": 4})
    assert w.type == "worker" and w.script_name == "my-worker" and w.consumer_id == c.consumer_id
    assert (w.settings.max_wait_time_ms, w.settings.max_concurrency) == (250, 4)
    cf.queues.consumers.delete(c.consumer_id, account_id=ACCOUNT, queue_id="jobs")
    assert list(cf.queues.consumers.list("jobs", account_id=ACCOUNT)) == []


# ---- errors, limits, auth (plain HTTP) ---------------------------------------------


def _error(r: httpx.Response) -> Dict[str, Any]:
    doc = r.json()
    assert doc["success"] is False and doc["result"] is None and len(doc["errors"]) == 1
    return doc["errors"][0]


@pytest.mark.parametrize("path, body, status, code, words", [
    ("/nope/messages", {"body": 1}, 404, 10104, "does not exist"),
    ("/jobs/messages", {"body": 1, "delay_seconds": 86401}, 400, 10203, "delay_seconds"),
    ("/jobs/messages", {"body": 1, "content_type": "v8"}, 400, 10203, "content_type"),
    ("/jobs/messages", {"body": 5, "content_type": "text"}, 400, 10203, "must be a string"),
    ("/jobs/messages/batch", {"messages": [{"body": 1}], "delay_seconds": -1}, 400, 10202, "delay_seconds"),
    ("/jobs/messages/batch", {"messages": [{"body": i} for i in range(1001)]}, 400, 10206, "1000"),
    ("/jobs/messages/batch", {"messages": []}, 400, 10206, "non-empty"),
    ("/jobs/messages", {"body": "x" * 200_000, "content_type": "text"}, 413, 10204, "max_message_size"),
    ("/jobs/messages/pull", {"batch_size": 0}, 400, 10207, "batch_size"),
    ("/jobs/messages/ack", {"acks": [{"lease_id": "bogus"}]}, 400, 10207, "not a lease id"),
])
def test_bad_requests_get_cloudflares_codes_and_write_nothing(server, data, path, body, status, code,
                                                              words) -> None:
    _api(server, "POST", "", {"queue_name": "jobs"})
    r = _api(server, "POST", path, body)
    assert r.status_code == status, r.text
    err = _error(r)
    assert err["code"] == code and words in err["message"], err
    assert r.headers["x-should-retry"] == "false"
    with qlog.open(data) as b:
        assert b.queue("jobs").stats().sent == 0


def test_malformed_json_is_10208_and_writes_nothing(server, data) -> None:
    _api(server, "POST", "", {"queue_name": "jobs"})
    r = httpx.post(f"{server}/client/v4/accounts/x/queues/jobs/messages", content=b"{not json",
                   headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    assert r.status_code == 400 and _error(r)["code"] == 10208
    with qlog.open(data) as b:
        assert b.queue("jobs").stats().sent == 0


def test_a_body_over_the_limit_is_refused_without_being_read(data) -> None:
    with serving(str(data), "--max-body", "65536") as server:
        _api(server, "POST", "", {"queue_name": "jobs"})
        # Declared larger than the limit: refused on the headers alone (the
        # client sends only a little of what it declares).
        with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=30) as s:
            s.sendall(b"POST /client/v4/accounts/x/queues/jobs/messages HTTP/1.1\r\nHost: x\r\n"
                      + f"Authorization: Bearer {TOKEN}\r\n".encode()
                      + b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{\"body\":")
            got = b""
            while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < int(
                    got.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
                chunk = s.recv(65536)
                assert chunk, f"the server closed the connection early: {got!r}"
                got += chunk
        head = got.decode("latin-1")
        assert head.startswith("HTTP/1.1 413") and "10193" in head and "65536" in head
        # Not declared (chunked): refused once the limit is crossed.
        def chunks() -> Iterator[bytes]:
            yield b'{"body": "'
            for _ in range(100):
                yield b"x" * 1024
            yield b'"}'

        r = httpx.post(f"{server}/client/v4/accounts/x/queues/jobs/messages", content=chunks(),
                       headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 413 and _error(r)["code"] == 10193
    with qlog.open(data) as b:
        assert b.queue("jobs").stats().sent == 0


def test_pull_from_a_paused_queue_is_409_not_retried(server, data) -> None:
    _api(server, "POST", "", {"queue_name": "jobs", "settings": {"delivery_paused": True}})
    _api(server, "POST", "/jobs/messages", {"body": 1})
    r = _api(server, "POST", "/jobs/messages/pull", {"batch_size": 1})
    assert r.status_code == 409 and "queue_delivery_paused" in _error(r)["message"]
    assert r.headers["x-should-retry"] == "false"
    _api(server, "PATCH", "/jobs", {"settings": {"delivery_paused": False}})
    r = _api(server, "POST", "/jobs/messages/pull", {"batch_size": 1})
    assert r.status_code == 200 and len(r.json()["result"]["messages"]) == 1


@pytest.mark.parametrize("token, status", [(None, 401), ("wrong-token", 403), (TOKEN, 200)])
def test_the_token_is_required_everywhere(server, token, status) -> None:
    r = _api(server, "GET", "", token=token)
    assert r.status_code == status
    if status != 200:
        assert _error(r)["code"] == 10106
    r = httpx.get(server + "/metrics", headers={"authorization": f"Bearer {token}"} if token else {})
    assert r.status_code == status


def test_root_paths_serve_the_api_too(server) -> None:
    r = httpx.get(f"{server}/accounts/x/queues", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["result_info"]["total_count"] == 0


def test_without_a_token_it_listens_on_loopback_only(data) -> None:
    env = child_env()
    env.pop("QLOG_TOKEN", None)
    r = subprocess.run([sys.executable, "-m", "qlog", "serve", str(data), "--host", "0.0.0.0"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "loopback only" in r.stderr
    with serving(str(data), token=None) as server:
        assert httpx.get(f"{server}/accounts/x/queues").status_code == 200


def test_a_long_poll_pull_wakes_on_a_push_from_another_client(server) -> None:
    _api(server, "POST", "", {"queue_name": "jobs"})
    out: List[httpx.Response] = []
    t = threading.Thread(target=lambda: out.append(
        _api(server, "POST", "/jobs/messages/pull", {"batch_size": 1, "wait_ms": 20000})))
    t.start()
    _api(server, "POST", "/jobs/messages", {"body": "hello", "content_type": "text"})
    t.join(30)
    assert [m["body"] for m in out[0].json()["result"]["messages"]] == ["hello"]


def test_metrics_are_prometheus_text_read_at_scrape_time(server, data) -> None:
    _api(server, "POST", "", {"queue_name": "jobs"})
    _api(server, "POST", "/jobs/messages", {"body": "a", "content_type": "text"})
    _api(server, "POST", "/jobs/messages/batch", {"messages": [{"body": "b"}, {"body": "c"}]})
    with qlog.open(data) as b:  # another process's changes count too
        q = b.queue("jobs")
        q.pull(1).ack_all()
        q.pull(1).retry_all(delay_seconds=3600)
        lost = q.pull(1, visibility_timeout=0.05).messages  # its lease runs out ...
        again = q.pull(1, wait=30).messages  # ... and a pull finds it
        assert [m.id for m in again] == [m.id for m in lost] and again[0].attempts == 2
    text = httpx.get(server + "/metrics", headers={"authorization": f"Bearer {TOKEN}"}).text
    assert "# TYPE qlog_messages_sent_total counter" in text
    assert "# TYPE qlog_delivery_latency_seconds histogram" in text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    for family, want in [("qlog_messages_sent_total", "3"), ("qlog_messages_acked_total", "1"),
                         ("qlog_messages_retried_total", "1"), ("qlog_lease_expired_total", "1"),
                         ("qlog_queue_backlog_messages", "2"), ("qlog_queue_delayed_messages", "1"),
                         ("qlog_queue_in_flight_messages", "1")]:
        assert samples[f'{family}{{queue="jobs"}}'] == want, family
    for family, calls in [("qlog_delivery_latency_seconds", 3), ("qlog_send_duration_seconds", 2)]:
        buckets = [(line.split('le="')[1].split('"')[0], int(v)) for line, v in samples.items()
                   if line.startswith(family + '_bucket{queue="jobs"')]
        assert buckets[-1] == ("+Inf", calls), family
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), family  # cumulative
        assert [float(le) for le, _ in buckets[:-1]] == sorted(float(le) for le, _ in buckets[:-1])
        assert samples[f'{family}_count{{queue="jobs"}}'] == str(calls)
        assert float(samples[f'{family}_sum{{queue="jobs"}}']) > 0


def test_serves_a_postgresql_store_with_the_sdk() -> None:
    from conftest import pg_cluster, pg_url

    url = pg_url()
    try:
        with serving(url) as server:
            cf = Cloudflare(api_token=TOKEN, base_url=server + "/client/v4", max_retries=0)
            cf.queues.create(account_id=ACCOUNT, queue_name="jobs")
            cf.queues.messages.push("jobs", account_id=ACCOUNT, body={"userId": 42}, content_type="json")
            got = cf.queues.messages.pull("jobs", account_id=ACCOUNT, batch_size=10, visibility_timeout_ms=30000)
            assert [json.loads(base64.b64decode(m.body)) for m in got.messages] == [{"userId": 42}]
            res = cf.queues.messages.ack("jobs", account_id=ACCOUNT,
                                         acks=[{"lease_id": m.lease_id} for m in got.messages], retries=[])
            assert res.ack_count == 1
        with qlog.open(url) as b:
            assert b.queue("jobs").stats().acked == 1
    finally:
        import psycopg

        with psycopg.connect(pg_cluster().url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{url.rsplit("schema=", 1)[1]}" CASCADE')


def test_tls_with_cert_and_key(data, tmp_path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    port = free_port()
    env = child_env()
    env["QLOG_TOKEN"] = TOKEN
    p = subprocess.Popen([sys.executable, "-m", "qlog", "serve", str(data), "--port", str(port),
                          "--cert", str(cert), "--key", str(key)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/client/v4/accounts/x/queues", verify=str(cert),
                              headers={"authorization": f"Bearer {TOKEN}"}, timeout=2)
                break
            except httpx.ConnectError:
                assert p.poll() is None, p.stderr.read() if p.stderr else ""
                assert time.monotonic() < end, "the TLS server did not answer within 60 s"
                time.sleep(0.05)
        assert r.status_code == 200 and r.json()["success"] is True
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is not served
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        p.terminate()
        p.wait(30)
        if p.stderr:
            p.stderr.close()
    r = subprocess.run([sys.executable, "-m", "qlog", "serve", str(data), "--cert", str(cert)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "both --cert and --key" in r.stderr


def test_a_login_replaces_a_stale_cookie(server) -> None:
    stale = {"qlog_token": "an-old-token"}
    assert httpx.get(server + "/", cookies=stale).status_code == 403
    r = httpx.get(server + f"/?token={TOKEN}", cookies=stale)
    assert r.status_code in (200, 303) and r.cookies.get("qlog_token") == TOKEN
