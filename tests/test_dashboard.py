"""The dashboard of ``qlog serve`` (qlog/_server/dashboard.py) in a real
headless Chromium driven by Selenium, against a real ``qlog serve`` process
on a free port with a token, over a temporary data directory that this
process opens too: what the pages show is checked against qlog's Python
API, and what their buttons do is checked through it.

Chromium and its driver are Debian's ``chromium`` and ``chromium-driver``
(.ci/run installs them); without them these tests fail, never skip.
``QLOG_SCREENSHOT=1`` makes :func:`test_screenshot` write docs/dashboard.png
(the README shows it); otherwise it writes into its tmp_path.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import secrets
import shutil
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from _crashkit import child_env
from conftest import _wait_until, free_port

import qlog
from qlog._server.app import form_digest

from selenium import webdriver  # the test extra's browser driver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "dashboard.png"
DEADLINE = 30.0
"""Seconds any awaited condition gets before the test fails."""


# -- a real server -------------------------------------------------------------


class Server:
    """``qlog serve DIR --port P`` with ``$QLOG_TOKEN``, and a broker of
    this process over the same directory."""

    def __init__(self, data: pathlib.Path, relative: bool = False) -> None:
        """``relative``: the server is given DIR relative to its working directory (its pages show that)."""
        self.data = data
        self.token = secrets.token_urlsafe(24)
        self.broker = qlog.open(str(data))
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.log = data.parent / f"{data.name}-serve.log"
        for _ in range(5):  # another process may take the free port first
            self.port = free_port()
            env = child_env()
            env["QLOG_TOKEN"] = self.token
            with open(self.log, "wb") as err:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "qlog", "serve", data.name if relative else str(data),
                     "--port", str(self.port)], cwd=data.parent,
                    env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
            proc = self.proc
            _wait_until(lambda: proc.poll() is not None or self._answers(), timeout=DEADLINE, what="qlog serve answering")
            if proc.poll() is None:
                return
        pytest.fail(f"qlog serve did not start: {self.log.read_text(errors='replace')}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        try:
            return self.request("/metrics")[0] == 200
        except OSError:
            return False

    def request(self, path: str, *, token: Optional[str] = "", cookie: Optional[str] = None,
                form: Optional[Dict[str, Any]] = None) -> Tuple[int, Dict[str, str], bytes]:
        """(status, headers, body) of a GET (or a POST of ``form``), with the
        bearer token (``token=""``), another one, or none (``None``)."""
        headers = {}
        if token is not None:
            headers["authorization"] = f"Bearer {token or self.token}"
        if cookie is not None:
            headers["cookie"] = f"qlog_token={cookie}"
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form, doseq=True).encode()
            headers["content-type"] = "application/x-www-form-urlencoded"
        req = urllib.request.Request(self.base + path, data=data, headers=headers)

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a: Any, **k: Any) -> None:
                return None

        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(req, timeout=DEADLINE) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def stats(self) -> Dict[str, Any]:
        status, _h, body = self.request("/dashboard/api/stats")
        assert status == 200, body
        doc: Dict[str, Any] = json.loads(body)
        return doc

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.broker.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("dashboard") / "data")
    yield s
    s.close()


# -- a real browser ------------------------------------------------------------


def _chromium(javascript: bool = True, size: Tuple[int, int] = (1280, 900)) -> WebDriver:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail("the dashboard's tests need Chromium and its driver: "
                    "apt-get install chromium chromium-driver", pytrace=False)
    opts = Options()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                f"--window-size={size[0]},{size[1]}"):
        opts.add_argument(arg)
    if not javascript:
        opts.add_argument("--blink-settings=scriptEnabled=false")
        opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def _login(browser: WebDriver, server: Server) -> None:
    browser.get(f"{server.base}/?token={urllib.parse.quote(server.token)}")
    _wait(browser, lambda b: b.current_url == server.base + "/", "the redirect to / after the token")


@pytest.fixture(scope="module")
def browser(server: Server) -> Iterator[WebDriver]:
    b = _chromium()
    try:
        _login(b, server)
        yield b
    finally:
        b.quit()


@pytest.fixture(scope="module")
def nojs(server: Server) -> Iterator[WebDriver]:
    """A browser with JavaScript off."""
    b = _chromium(javascript=False)
    try:
        _login(b, server)
        yield b
    finally:
        b.quit()


def _wait(browser: WebDriver, cond: Callable[[WebDriver], Any], what: str) -> Any:
    return WebDriverWait(browser, DEADLINE, poll_frequency=0.05).until(cond, f"waiting for {what}")


def _row(browser: WebDriver, queue: str) -> WebElement:
    return browser.find_element(By.CSS_SELECTOR, f"tr[data-queue='{queue}']")


def _cell(browser: WebDriver, queue: str, key: str) -> str:
    return str(_row(browser, queue).find_element(By.CSS_SELECTOR, f"[data-k='{key}']").text)


def _press(browser: WebDriver, button: WebElement) -> None:
    """Click ``button`` and wait for the page it loads (the one shown now goes stale)."""
    page = browser.find_element(By.TAG_NAME, "html")
    button.click()
    _wait(browser, EC.staleness_of(page), "the next page")


def _flash(browser: WebDriver, kind: str = "ok") -> str:
    """The text of the message the page shows after an action (``ok`` or ``err``)."""
    from selenium.common.exceptions import StaleElementReferenceException

    def read(b: WebDriver) -> Any:
        try:  # the live update may redraw the page between finding and reading
            found = b.find_elements(By.CSS_SELECTOR, ".flash")
            return found and (str(found[0].text), found[0].get_attribute("class") or "")
        except StaleElementReferenceException:
            return None

    text, classes = _wait(browser, read, "the result of the action")
    assert kind in classes.split(), f"expected a .flash.{kind}, got: {text}"
    return text


def _open_queue(browser: WebDriver, server: Server, name: str) -> None:
    browser.get(f"{server.base}/dashboard/queues/{name}")
    _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, f"tr[data-queue='{name}']"), f"the page of {name}")


def _dead_letters(server: Server, origin: str, dlq: str, bodies: List[Tuple[Any, str]]) -> qlog.Queue:
    """Queue ``origin`` (max_retries 0) whose messages ``bodies`` failed once into ``dlq``."""
    b = server.broker
    q = b.queue(origin, max_retries=0, dead_letter_queue=dlq)
    b.queue(dlq)
    for body, ct in bodies:
        q.send(body, content_type=ct)
    batch = q.pull(len(bodies))
    assert len(batch) == len(bodies)
    batch.retry_all()
    assert b.queue(dlq).stats().backlog == len(bodies)
    assert q.stats().backlog == 0
    return q


# -- the tests -----------------------------------------------------------------


def test_lists_queues_with_counts_and_live_rates(server: Server, browser: WebDriver) -> None:
    b = server.broker
    a = b.queue("t1-a", dead_letter_queue="t1-a-dlq")
    a.send_batch([{"n": i} for i in range(3)])
    assert len(a.pull(1)) == 1  # one in flight
    c = b.queue("t1-b")
    c.send_batch(["later", "later"], content_type="text", delay_seconds=600)
    assert not c.pull(10)  # passes over them: the local backend counts them delayed now
    c.pause_delivery()
    b.queue("t1-a-dlq").send_batch([1, 2, 3, 4])

    browser.get(server.base + "/")
    _wait(browser, lambda br: br.find_elements(By.CSS_SELECTOR, "tr[data-queue='t1-b']"), "the queue t1-b")
    for name in ("t1-a", "t1-b", "t1-a-dlq"):
        s = b.queue(name).stats()
        assert _cell(browser, name, "backlog") == str(s.backlog)
        assert _cell(browser, name, "in_flight") == str(s.in_flight)
        assert _cell(browser, name, "delayed") == str(s.delayed)
        assert _cell(browser, name, "state") == ("paused" if s.paused else "active")
    assert (_cell(browser, "t1-a", "backlog"), _cell(browser, "t1-a", "in_flight")) == ("3", "1")
    assert (_cell(browser, "t1-b", "delayed"), _cell(browser, "t1-b", "state")) == ("2", "paused")
    assert _cell(browser, "t1-a", "dlq_backlog") == "4"
    assert "t1-a-dlq" in _row(browser, "t1-a").text
    assert re.fullmatch(r"\d+(\.\d)? s", _cell(browser, "t1-a", "oldest"))
    for kind in ("in", "out"):
        assert _row(browser, "t1-a").find_elements(By.CSS_SELECTOR, f"[data-k='{kind}'] svg polyline")

    # With JavaScript on, the numbers and graphs follow without a reload.
    _wait(browser, lambda br: br.find_element(By.ID, "live").text == "live", "the live indicator")
    row = _row(browser, "t1-a")
    a.send_batch([{"n": i} for i in range(5)])
    _wait(browser, lambda br: _cell(br, "t1-a", "backlog") == "8", "the new backlog, polled")
    assert _row(browser, "t1-a") == row  # the same element: redrawn, not reloaded

    def rose(br: WebDriver) -> bool:
        pts = _row(br, "t1-a").find_element(By.CSS_SELECTOR, "[data-k='in'] polyline").get_attribute("points")
        return any(float(p.split(",")[1]) < 22.0 for p in (pts or "").split())

    _wait(browser, rose, "the sends in the in-rate graph")
    assert max(next(q for q in server.stats()["queues"] if q["name"] == "t1-a")["rate_in"]) > 0


def test_redrive_selected_then_a_group(server: Server, browser: WebDriver) -> None:
    bodies: List[Tuple[Any, str]] = [({"order": 1}, "json"), ({"order": 2}, "json"), ("three", "text"),
                                     (b"\x00\xff4", "bytes")]
    origin = _dead_letters(server, "t2-work", "t2-dlq", bodies)
    dlq = server.broker.queue("t2-dlq")
    _open_queue(browser, server, "t2-dlq")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.messages tbody tr")
    assert len(rows) == 4
    for r in rows:
        assert "t2-work" in r.text and "after 1 attempt" in r.text
    text = browser.find_element(By.CSS_SELECTOR, "table.messages").text
    assert '"order": 1' in text and "three" in text  # json pretty-printed, text as it is
    assert base64.b64encode(b"\x00\xff4").decode() in text and "bytes: 3 bytes" in text

    for box in browser.find_elements(By.CSS_SELECTOR, "table.messages input[name=id]")[:3]:
        box.click()
    _press(browser, browser.find_element(By.ID, "redrive-selected"))
    assert _flash(browser) == "moved 3 to t2-work"
    assert dlq.stats().backlog == 1
    back = origin.peek(10)
    assert [(m.raw_body, m.content_type) for m in back] == [(b'{"order":1}', "json"), (b'{"order":2}', "json"),
                                                            (b"three", "text")]
    assert all(m.dead_letter is None for m in back)

    # The one left, as its group (by the queue it failed in).
    _press(browser, browser.find_element(By.CSS_SELECTOR, "button[data-group='t2-work']"))
    assert _flash(browser) == "moved 1 to t2-work"
    assert dlq.stats().backlog == 0 and dlq.peek(10) == []
    assert sorted((m.raw_body, m.content_type) for m in origin.peek(10)) == sorted(
        [(b'{"order":1}', "json"), (b'{"order":2}', "json"), (b"three", "text"), (b"\x00\xff4", "bytes")])
    assert _cell(browser, "t2-dlq", "backlog") == "0"
    assert "no messages" in browser.find_element(By.TAG_NAME, "main").text


def test_redrive_all_and_delete_selected(server: Server, browser: WebDriver) -> None:
    origin = _dead_letters(server, "t2b-work", "t2b-dlq", [(i, "json") for i in range(5)])
    dlq = server.broker.queue("t2b-dlq")
    _open_queue(browser, server, "t2b-dlq")
    for box in browser.find_elements(By.CSS_SELECTOR, "table.messages input[name=id]")[:2]:
        box.click()
    _press(browser, browser.find_element(By.ID, "delete-selected"))
    assert _flash(browser) == "deleted 2 messages"
    assert [m.raw_body for m in dlq.peek(10)] == [b"2", b"3", b"4"]
    _press(browser, browser.find_element(By.ID, "redrive-all"))
    assert _flash(browser) == "moved 3 to t2b-work"
    assert dlq.stats().backlog == 0
    assert [m.raw_body for m in origin.peek(10)] == [b"2", b"3", b"4"]
    # Nothing selected: said so, nothing changed.
    origin.send("x", content_type="text")
    _open_queue(browser, server, "t2b-work")
    _press(browser, browser.find_element(By.ID, "delete-selected"))
    assert "select messages first" in _flash(browser, "err")
    assert origin.stats().backlog == 4


def test_pause_then_resume(server: Server, browser: WebDriver) -> None:
    q = server.broker.queue("t3")
    q.send("hi", content_type="text")
    _open_queue(browser, server, "t3")
    assert _cell(browser, "t3", "state") == "active"
    _press(browser, browser.find_element(By.ID, "pause"))
    assert _flash(browser) == "paused delivery of t3"
    assert q.paused is True
    assert _cell(browser, "t3", "state") == "paused"
    _press(browser, browser.find_element(By.ID, "resume"))
    assert _flash(browser) == "resumed delivery of t3"
    assert q.paused is False
    assert _cell(browser, "t3", "state") == "active"


def test_send_a_message(server: Server, browser: WebDriver) -> None:
    q = server.broker.queue("t3-send")
    _open_queue(browser, server, "t3-send")
    browser.find_element(By.NAME, "body").send_keys('{"hello": ["world", 1]}')
    _press(browser, browser.find_element(By.ID, "send"))
    assert _flash(browser).startswith("sent message ")
    [m] = q.peek(10)
    assert (m.body, m.content_type) == ({"hello": ["world", 1]}, "json")
    # Not JSON: refused, shown, nothing sent; as text it goes.
    browser.find_element(By.NAME, "body").send_keys("not json\nat all")
    _press(browser, browser.find_element(By.ID, "send"))
    assert "not valid JSON" in _flash(browser, "err")
    assert q.stats().backlog == 1
    browser.find_element(By.CSS_SELECTOR, "select[name=content_type] option[value=text]").click()
    browser.find_element(By.NAME, "body").send_keys("not json\nat all")
    _press(browser, browser.find_element(By.ID, "send"))
    _flash(browser)
    assert [(m.body, m.content_type) for m in q.peek(10)][1] == ("not json\nat all", "text")


def test_purge_needs_confirmation(server: Server, nojs: WebDriver) -> None:
    """Without JavaScript: the confirmation is a page of its own."""
    q = server.broker.queue("t4")
    q.send_batch(list(range(5)))
    _open_queue(nojs, server, "t4")
    _press(nojs, nojs.find_element(By.ID, "purge"))
    _wait(nojs, lambda b: b.current_url.endswith("/dashboard/queues/t4/purge"), "the confirmation page")
    assert q.stats().backlog == 5
    field = nojs.find_element(By.NAME, "confirm")
    field.send_keys("t4-wrong")
    _press(nojs, nojs.find_element(By.ID, "confirm-purge"))
    assert "to confirm the purge; nothing was deleted" in _flash(nojs, "err")
    assert nojs.current_url.split("?")[0].endswith("/dashboard/queues/t4/purge")
    assert q.stats().backlog == 5
    nojs.find_element(By.NAME, "confirm").send_keys("t4")
    _press(nojs, nojs.find_element(By.ID, "confirm-purge"))
    assert _flash(nojs) == "purged t4: 5 messages deleted"
    assert q.stats().backlog == 0
    # A post without the confirmation, even with the digest, deletes nothing.
    q.send(1)
    status, headers, _ = server.request("/dashboard/queues/t4/purge", form={"_digest": form_digest(server.token)})
    assert status == 303 and "err=" in headers["location"]
    assert q.stats().backlog == 1


def test_reading_works_without_javascript(server: Server, nojs: WebDriver) -> None:
    b = server.broker
    q = b.queue("t5", dead_letter_queue="t5-dlq")
    q.send({"k": "v"})
    _dead_letters(server, "t5-fail", "t5-dlq", [("oops", "text")])
    nojs.get(server.base + "/")
    # The browser parsed <noscript>'s content as elements: scripting is off.
    assert nojs.find_element(By.CSS_SELECTOR, "noscript .nojs").is_displayed()
    assert nojs.find_element(By.ID, "live").text == "snapshot"
    assert _cell(nojs, "t5", "backlog") == "1" and _cell(nojs, "t5", "dlq_backlog") == "1"
    assert _cell(nojs, "t5-dlq", "backlog") == "1"
    _press(nojs, nojs.find_element(By.LINK_TEXT, "t5-dlq"))
    _wait(nojs, lambda br: br.current_url.endswith("/dashboard/queues/t5-dlq"), "the DLQ's page")
    row = nojs.find_element(By.CSS_SELECTOR, "table.messages tbody tr")
    assert "oops" in row.text and "t5-fail" in row.text and "text" in row.text
    # Forms work without JavaScript too.
    _press(nojs, nojs.find_element(By.ID, "pause"))
    assert _flash(nojs) == "paused delivery of t5-dlq"
    assert b.queue("t5-dlq").paused


def test_without_the_token(server: Server, browser: WebDriver) -> None:
    # The dashboard's pages: a login form, 401.
    for path in ("/", "/dashboard", "/dashboard/queues/t3", "/dashboard/api/stats"):
        status, headers, body = server.request(path, token=None)
        assert status == 401 and headers["content-type"].startswith("text/html")
        assert b"name='token'" in body and b"<form" in body
    # The API and metrics: 401 without a token, 403 with another one.
    for path in ("/accounts/x/queues", "/client/v4/accounts/x/queues", "/metrics"):
        assert server.request(path, token=None)[0] == 401
        assert server.request(path, token="not-it")[0] == 403
    assert server.request("/", token=None, cookie="not-it")[0] == 403
    assert server.request("/accounts/x/queues")[0] == 200
    # A form without the digest (another site's) changes nothing.
    q = server.broker.queue("t6")
    q.send(1)
    for form in ({}, {"_digest": "0" * 32}, {"_digest": form_digest("other")}):
        status, _h, body = server.request("/dashboard/queues/t6/pause", form=form)
        assert status == 403 and b"did not come from this dashboard" in body
        status, _h, _b = server.request("/dashboard/queues/t6/purge", form={**form, "confirm": "t6"})
        assert status == 403
    assert not q.paused and q.stats().backlog == 1

    # In the browser: no cookie, the login form; the token typed in, the dashboard.
    try:
        browser.delete_all_cookies()
        browser.get(server.base + "/")
        field = browser.find_element(By.NAME, "token")
        assert not browser.find_elements(By.CSS_SELECTOR, "table.queues")
        field.send_keys(server.token)
        _press(browser, browser.find_element(By.CSS_SELECTOR, "main form button"))
        _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "tr[data-queue='t6']"), "the dashboard")
        assert browser.current_url == server.base + "/"  # the token is not left in the address bar
        [cookie] = browser.get_cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == ("qlog_token", True, "Strict")
        # Log out: the login form again.
        _press(browser, browser.find_element(By.CSS_SELECTOR, "header form button"))
        _wait(browser, lambda b: b.find_elements(By.NAME, "token"), "the login form after logging out")
        assert browser.get_cookies() == []
    finally:
        _login(browser, server)


def _png_size(path: pathlib.Path) -> Tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_screenshot(tmp_path: pathlib.Path) -> None:
    """The README's picture: a few queues with traffic, their rates drawn."""
    s = Server(tmp_path / "qlog-data", relative=True)
    b = s.broker
    orders = b.queue("orders", max_retries=2, dead_letter_queue="orders-dlq")
    emails = b.queue("emails")
    b.queue("orders-dlq").send_batch([{"order": 7, "error": "card declined"}] * 3)
    thumbs = b.queue("thumbnails")
    thumbs.send_batch([{"image": f"img/{i}.jpg"} for i in range(40)])
    thumbs.pause_delivery()
    emails.send_batch([f"reminder {k}" for k in range(6)], content_type="text", delay_seconds=3600)
    stop = threading.Event()
    failed: List[BaseException] = []

    def traffic() -> None:
        """One round of sends, acks and retries per server-side sample (so
        every sample sees some) until the picture is taken."""
        try:
            sample, i = s.stats()["sample"], 0
            while not stop.is_set():
                orders.send_batch([{"order": i * 100 + k, "total": 9.5 + k} for k in range(6 + (i * 7) % 11)])
                emails.send_batch([f"mail {i}-{k}" for k in range(3 + (i * 5) % 7)], content_type="text")
                for k, m in enumerate(orders.pull(5 + i % 7)):
                    if k == 0 and i % 3 == 0:
                        m.retry()
                    else:
                        m.ack()
                emails.pull(3 + (i * 3) % 6).ack_all()
                i += 1
                sample = _wait_until(lambda: stop.is_set() or s.stats()["sample"] > sample and s.stats()["sample"],
                                     timeout=DEADLINE, what="a new sample")
        except BaseException as e:  # noqa: BLE001 (re-raised by the test)
            failed.append(e)

    thread = threading.Thread(target=traffic, daemon=True)
    browser = None
    try:
        orders.send_batch([{"order": k, "total": 20} for k in range(3)])
        assert len(orders.pull(3, visibility_timeout=3600)) == 3  # in flight
        thread.start()
        browser = _chromium()
        _login(browser, s)

        def drawn(br: WebDriver) -> bool:
            line = _row(br, "orders").find_element(By.CSS_SELECTOR, "[data-k='in'] polyline")
            return len((line.get_attribute("points") or "").split()) >= 10

        _wait(browser, drawn, "ten samples in the graphs")
        height = int(browser.execute_script("return Math.ceil(document.querySelector('main')"
                                            ".getBoundingClientRect().bottom)")) + 8
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
        out = SCREENSHOT if os.environ.get("QLOG_SCREENSHOT") == "1" else tmp_path / "dashboard.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(out))
        assert _png_size(out) == (1280, height) and out.stat().st_size > 10_000
    finally:
        stop.set()
        thread.join(DEADLINE)
        if browser is not None:
            browser.quit()
        s.close()
    assert not failed, failed
