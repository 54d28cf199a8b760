"""The worker that sends the welcome emails queued by app.py.

    qlog worker worker:broker     # from this directory; SIGTERM or Ctrl-C stops it

"Sending" an email appends it to outbox.jsonl in the data directory, after
SIGNUP_EMAIL_SECONDS (default 0) of pretend SMTP latency.  Addresses at
bounce.example are refused: those messages are retried every
SIGNUP_RETRY_DELAY seconds (default 5) and, after 3 retries, moved to
the queue "welcome-emails-dlq".  Settings: SIGNUP_DATA (default
./signup-data), SIGNUP_VISIBILITY_TIMEOUT (default 30).
"""

from __future__ import annotations

import json
import logging
import os
import time

import qlog

DATA = os.environ.get("SIGNUP_DATA", "./signup-data")
VISIBILITY_TIMEOUT = float(os.environ.get("SIGNUP_VISIBILITY_TIMEOUT", "30"))
RETRY_DELAY = float(os.environ.get("SIGNUP_RETRY_DELAY", "5"))
EMAIL_SECONDS = float(os.environ.get("SIGNUP_EMAIL_SECONDS", "0"))
MAX_RETRIES = 3
OUTBOX = os.path.join(DATA, "outbox.jsonl")
PROGRESS = os.path.join(DATA, "progress.log")

log = logging.getLogger("signup.worker")
broker = qlog.open(DATA)


class SmtpRejected(Exception):
    """The mail server refused the address."""


def append_line(path: str, line: str) -> None:
    """Append a line to a file, on disk when this returns."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def send_email(message_id: str, user_id: str, to: str, subject: str) -> None:
    """Stand in for an SMTP client: slow, and one domain bounces."""
    append_line(PROGRESS, f"started {message_id}")
    time.sleep(EMAIL_SECONDS)
    if to.rpartition("@")[2] == "bounce.example":
        raise SmtpRejected(f"550 no such mailbox: {to}")
    append_line(OUTBOX, json.dumps({"messageId": message_id, "userId": user_id, "to": to, "subject": subject}))


# Delivery is at least once: if a worker dies after an email went out but
# before its message was acked, the message is delivered again.  So the
# handler skips messages whose email is already in the outbox, by message
# id.  (The set is read once, at start: enough for one worker process; with
# several, check a unique key where the email is recorded instead.)
try:
    with open(OUTBOX, encoding="utf-8") as f:
        sent = {json.loads(line)["messageId"] for line in f}
except FileNotFoundError:
    sent = set()


broker.queue("welcome-emails")  # the queue this worker consumes, created here if the app has not yet


@broker.consumer("welcome-emails", max_batch_size=10, max_batch_timeout=1, max_retries=MAX_RETRIES,
                 dead_letter_queue="welcome-emails-dlq", retry_delay=RETRY_DELAY,
                 visibility_timeout=VISIBILITY_TIMEOUT)
def send_welcome(batch: qlog.MessageBatch) -> None:
    for m in batch.messages:
        if m.id in sent:
            log.info("message %s: welcome email already sent, skipping", m.id)
            continue
        user = m.body
        try:
            send_email(m.id, user["userId"], user["email"], f"Welcome, {user['name']}!")
        except SmtpRejected as e:
            log.warning("message %s, attempt %d of %d: %s", m.id, m.attempts, MAX_RETRIES + 1, e)
            m.retry()  # this message only: again after retry_delay, to the DLQ after max_retries
            continue
        sent.add(m.id)
    # Returning acks every message not retried above; raising would retry
    # them all (those already sent are then skipped, see above).
