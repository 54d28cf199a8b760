"""A sign-up endpoint that saves the user and queues their welcome email.

    python app.py                 # then: qlog worker worker:broker

POST /signup with {"email": ..., "name": ...} saves the user, sends a
message to the queue "welcome-emails" and answers 202 at once: the email
goes out from the worker (worker.py), whatever the mail server's mood.
Settings: SIGNUP_DATA (default ./signup-data), SIGNUP_HOST (127.0.0.1),
SIGNUP_PORT (8000; 0 picks a free port).  SIGTERM or Ctrl-C stops it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import qlog

DATA = os.environ.get("SIGNUP_DATA", "./signup-data")
MAX_EMAIL, MAX_NAME, MAX_BODY = 254, 100, 4096

broker = qlog.open(DATA)  # the directory is created if missing
welcome = broker.queue("welcome-emails")
users_lock = threading.Lock()


class Invalid(Exception):
    """A bad request: which field, and what is wrong with it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


def parse_signup(body: bytes) -> dict:
    """The sign-up in a request body; Invalid when it is not one."""
    try:
        data = json.loads(body)
    except ValueError as e:  # bad JSON or bad UTF-8
        raise Invalid("body", f"the body must be a JSON object: {e}") from None
    if not isinstance(data, dict):
        raise Invalid("body", "the body must be a JSON object")
    email, name = data.get("email"), data.get("name")
    if not isinstance(email, str):
        email = ""
    local, at, domain = email.partition("@")
    if not (local and at and domain and "@" not in domain and len(email) <= MAX_EMAIL):
        raise Invalid("email", f"email must be an address like ada@example.com (one '@', "
                               f"text on both sides), at most {MAX_EMAIL} characters")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise Invalid("name", f"name must be a non-empty string of at most {MAX_NAME} characters")
    return {"email": email, "name": name}


def save_user(user: dict) -> str:
    """Append the user to users.jsonl, on disk when this returns."""
    user_id = str(uuid.uuid4())
    line = json.dumps({"userId": user_id, **user}) + "\n"
    with users_lock, open(os.path.join(DATA, "users.jsonl"), "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return user_id


class Handler(BaseHTTPRequestHandler):
    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.reply(200, {"ok": True})
        else:
            self.reply(404, {"error": f"no such path: {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/signup":
            return self.reply(404, {"error": f"no such path: {self.path}"})
        size = self.headers.get("Content-Length", "0")
        if not size.isdigit():
            return self.reply(400, {"error": "Content-Length must be a number of bytes", "field": "body"})
        if int(size) > MAX_BODY:
            return self.reply(413, {"error": f"the body must be at most {MAX_BODY} bytes", "field": "body"})
        try:
            user = parse_signup(self.rfile.read(int(size)))
        except Invalid as e:
            return self.reply(400, {"error": str(e), "field": e.field})
        user_id = save_user(user)
        # Two writes, not one transaction: should the process die between
        # them, the user is saved and gets no welcome email.
        message_id = welcome.send({"userId": user_id, **user})  # durable when it returns
        self.reply(202, {"userId": user_id, "messageId": message_id})


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for requests in progress


def main() -> None:
    server = Server((os.environ.get("SIGNUP_HOST", "127.0.0.1"), int(os.environ.get("SIGNUP_PORT", "8000"))),
                    Handler)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.socket.getsockname()[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    broker.close()


if __name__ == "__main__":
    main()
