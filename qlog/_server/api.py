"""Cloudflare Queues' REST API over a broker: the paths, request and
response shapes and error codes of ``api.cloudflare.com/client/v4``
(``/accounts/{account_id}/queues/...``), so that Cloudflare's SDKs and any
HTTP client reach a qlog store by changing their base URL.

Every response is Cloudflare's envelope ``{success, errors, messages,
result}``.  The account id is accepted whatever it is (a store is one
account).  A queue is named by its name or its id (``Queue.queue_id``).
Blocking broker calls run on Starlette's thread pool.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Tuple

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import errors
from .._message import MessageSendRequest
from .._queue import Broker, Queue
from .._settings import MAX_DELAY, MAX_PULL_BATCH
from .metrics import SendTimes

METRICS_TTL = 1.0
"""Seconds the backlog metrics in push and pull responses may be old
(Cloudflare calls them best effort; counting the backlog's bytes reads it)."""
MAX_WAIT_MS = 60_000
"""The longest ``wait_ms`` (qlog's long-poll extension of pull) taken."""

# Cloudflare's error codes (developers.cloudflare.com/queues/reference/error-codes)
QUEUE_NOT_FOUND = 10104
UNAUTHORIZED = 10106
QUEUE_ID_MALFORMED = 10107
BATCH_DELAY_INVALID = 10202
MESSAGE_METADATA_INVALID = 10203
MESSAGE_SIZE = 10204
BATCH_SIZE = 10205
BATCH_COUNT = 10206
BODY_INVALID = 10207
BODY_MALFORMED = 10208
# qlog's own, where Cloudflare documents none
QUEUE_EXISTS = 10190
DELIVERY_PAUSED = 10191
STORAGE = 10192
BODY_TOO_LARGE = 10193


class ApiError(Exception):
    """An error response: HTTP ``status``, Cloudflare ``code``, a message."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


try:  # the server extra brings orjson: a response's encoding is a tenth of json's
    import orjson

    _dumps: Callable[[Any], Any] = orjson.dumps
except ImportError:  # pragma: no cover - qlog[server] installs it
    def _dumps(doc: Any) -> Any:
        return json.dumps(doc, separators=(",", ":"))


def envelope(result: Any, status: int = 200, result_info: Optional[Dict[str, Any]] = None) -> Response:
    """Cloudflare's envelope around ``result`` (qlog's own documents only:
    message bodies in it are strings, so orjson and json give the same JSON)."""
    doc: Dict[str, Any] = {"success": True, "errors": [], "messages": [], "result": result}
    if result_info is not None:
        doc["result_info"] = result_info
    return Response(_dumps(doc), status, media_type="application/json")


def error_response(e: ApiError) -> Response:
    doc = {"success": False, "errors": [{"code": e.code, "message": e.message}], "messages": [], "result": None}
    headers = {}
    # The SDKs retry 408, 409, 429 and 5xx by themselves: say when that
    # would only repeat the same refusal.
    if e.status < 500 and e.status != 429:
        headers["x-should-retry"] = "false"
    return Response(json.dumps(doc), e.status, headers=headers, media_type="application/json")


def api_error(e: errors.QlogError) -> ApiError:
    """The response a qlog error gets (one place for the mapping)."""
    msg = str(e)
    if isinstance(e, errors.QueueNotFoundError):
        return ApiError(404, QUEUE_NOT_FOUND, msg)
    if isinstance(e, errors.InvalidQueueNameError):
        return ApiError(400, QUEUE_ID_MALFORMED, msg)
    if isinstance(e, errors.QueueExistsError):
        return ApiError(409, QUEUE_EXISTS, msg)
    if isinstance(e, errors.MessageTooLargeError):
        return ApiError(413, MESSAGE_SIZE, msg)
    if isinstance(e, errors.BatchTooLargeError):
        return ApiError(413 if "bytes" in msg else 400, BATCH_SIZE if "bytes" in msg else BATCH_COUNT, msg)
    if isinstance(e, (errors.DelayOutOfRangeError, errors.ContentTypeError, errors.BodyTypeError,
                      errors.PickleNotAllowedError)):
        return ApiError(400, MESSAGE_METADATA_INVALID, msg)
    if isinstance(e, (errors.InvalidLeaseError, errors.SettingsError, errors.QueueNotEmptyError)):
        return ApiError(400, BODY_INVALID, msg)
    if isinstance(e, errors.StorageError):
        return ApiError(503, STORAGE, msg)
    return ApiError(400, BODY_INVALID, msg)


def _iso(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _number(doc: Mapping[str, Any], key: str, lo: float, hi: float, code: int = BODY_INVALID,
            default: Optional[float] = None) -> Optional[float]:
    """``doc[key]``: a number from ``lo`` to ``hi`` (or ``default`` when absent)."""
    v = doc.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ApiError(400, code, f"{key} must be a number from {lo:g} to {hi:g}, got {v!r}")
    return float(v)


def _object(v: Any, what: str) -> Dict[str, Any]:
    if not isinstance(v, dict):
        raise ApiError(400, BODY_INVALID, f"{what} must be a JSON object, got {type(v).__name__}")
    return v


class Api:
    """The routes of Cloudflare's API over ``broker`` (mounted by ``app.py``)."""

    def __init__(self, broker: Broker, max_body: int) -> None:
        self.broker = broker
        self.max_body = max_body
        self._metrics: Dict[str, Tuple[float, int]] = {}  # queue -> (when, backlog bytes)
        self._ids: Dict[str, str] = {}  # queue id -> name
        self._purges: Dict[str, float] = {}  # queue -> when its last purge started
        self._open: Dict[str, Queue] = {}  # name -> its queue (a lookup costs a directory listing)
        self.inline = broker.engine != "postgresql"
        self.sends = SendTimes()  # this server's send durations (``/metrics``)

    # -- plumbing ------------------------------------------------------------

    async def body(self, request: Request) -> Dict[str, Any]:
        """The request's JSON object, refused before it is read whole when
        it is larger than ``max_body``."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise ApiError(413, BODY_TOO_LARGE,
                           f"request body of {int(declared)} bytes is larger than the server's limit of "
                           f"{self.max_body} bytes (qlog serve --max-body); nothing was written")
        chunks: List[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, BODY_TOO_LARGE,
                               f"request body is larger than the server's limit of {self.max_body} bytes "
                               "(qlog serve --max-body); nothing was written")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            return {}
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, BODY_MALFORMED, f"request body is not valid JSON ({e}); nothing was written") from None
        return _object(doc, "the request body")

    async def run(self, fn: Callable[[], Any], may_block: bool = True) -> Any:
        """``fn()``: on the event loop when it cannot block for long (on the
        local backend a lease, an ack or a send without fsync only writes
        to the page cache), else on the thread pool (a hop costs about
        100 µs, as much as the call)."""
        if self.inline and not may_block:
            return fn()
        return await run_in_threadpool(fn)

    def queue(self, ref: str) -> Queue:
        """The queue named ``ref`` or whose id is ``ref``; 10104 when none."""
        b = self.broker
        q = self._open.get(ref)
        if q is not None:
            return q
        if ref in self._ids:
            return b.queue(self._ids[ref])
        names = b.queues()
        if ref in names:
            q = self._open[ref] = b.queue(ref)
            return q
        for name in names:
            q = b.queue(name)
            self._ids[q.queue_id] = name
            if q.queue_id == ref:
                return q
        raise ApiError(404, QUEUE_NOT_FOUND, f"queue {ref!r} does not exist (by name or id)")

    def metrics_of(self, q: Queue) -> Dict[str, Any]:
        """Cloudflare's backlog metrics: the count and the oldest message
        read now; the bytes (which reads the backlog's records) at most
        METRICS_TTL seconds old."""
        now = time.monotonic()
        hit = self._metrics.get(q.name)
        fresh = hit is None or now - hit[0] >= METRICS_TTL
        m = q.metrics(count_bytes=fresh)
        if fresh:
            self._metrics[q.name] = (now, m.backlog_bytes)
        nbytes = m.backlog_bytes if fresh else hit[1]  # type: ignore[index]
        oldest = m.oldest_message_timestamp
        return {"backlog_count": m.backlog_count, "backlog_bytes": nbytes,
                "oldest_message_timestamp_ms": 0 if oldest is None else int(oldest * 1000)}

    def queue_doc(self, q: Queue) -> Dict[str, Any]:
        s = q.settings
        consumers = [consumer_doc(q, c) for c in q.consumers()]
        return {
            "queue_id": q.queue_id, "queue_name": q.name,
            "created_on": _iso(q.created), "modified_on": _iso(q.created),
            "producers": [], "producers_total_count": 0,
            "consumers": consumers, "consumers_total_count": len(consumers),
            "settings": {"delivery_delay": s.delivery_delay, "delivery_paused": q.paused,
                         "message_retention_period": s.message_retention},
        }

    # -- messages --------------------------------------------------------------

    def _send_request(self, m: Any, where: str) -> MessageSendRequest:
        m = _object(m, where)
        ct = m.get("content_type", "json")
        if ct not in ("json", "text", "bytes"):
            raise ApiError(400, MESSAGE_METADATA_INVALID,
                           f"content_type of {where} must be json, text or bytes, got {ct!r}")
        if "body" not in m:
            raise ApiError(400, BODY_INVALID, f"{where} has no body")
        body = m["body"]
        if ct == "text" and not isinstance(body, str):
            raise ApiError(400, MESSAGE_METADATA_INVALID, f"the body of {where} (content_type text) must be a string")
        if ct == "bytes":
            if not isinstance(body, str):
                raise ApiError(400, MESSAGE_METADATA_INVALID, f"the body of {where} (content_type bytes) must be base64")
            try:
                body = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, MESSAGE_METADATA_INVALID, f"the body of {where} is not valid base64") from None
        delay = _number(m, "delay_seconds", 0, MAX_DELAY, MESSAGE_METADATA_INVALID)
        return MessageSendRequest(body, content_type=ct, delay_seconds=delay)

    async def push(self, request: Request) -> Response:
        doc = await self.body(request)
        req = self._send_request(doc, "the message")
        return await self._send(request.path_params["queue"], [req], None)

    async def push_batch(self, request: Request) -> Response:
        doc = await self.body(request)
        msgs = doc.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, BATCH_COUNT, "messages must be a non-empty list of messages")
        delay = _number(doc, "delay_seconds", 0, MAX_DELAY, BATCH_DELAY_INVALID)
        reqs = [self._send_request(m, f"message {i}") for i, m in enumerate(msgs)]
        return await self._send(request.path_params["queue"], reqs, delay)

    async def _send(self, ref: str, reqs: List[MessageSendRequest], delay: Optional[float]) -> Response:
        """Send, and answer with the metrics: one call (off the loop when the send fsyncs)."""
        def send() -> Dict[str, Any]:
            q = self.queue(ref)
            with self.sends.timed(q.name):
                q.send_batch(reqs, delay_seconds=delay)
            return {"metadata": {"metrics": self.metrics_of(q)}}

        q = self._open.get(ref)
        return envelope(await self.run(send, may_block=q is None or q.durability == "sync"))

    async def pull(self, request: Request) -> Response:
        doc = await self.body(request)
        n = _number(doc, "batch_size", 1, MAX_PULL_BATCH)
        vt_ms = _number(doc, "visibility_timeout_ms", 1, 43_200_000)
        if vt_ms is None:
            vt_ms = _number(doc, "visibility_timeout", 1, 43_200_000)  # the older name, also ms
        wait_ms = _number(doc, "wait_ms", 0, MAX_WAIT_MS, default=0)
        assert wait_ms is not None
        ref = request.path_params["queue"]

        def pull() -> Dict[str, Any]:
            q = self.queue(ref)
            size = q.settings.max_batch_size if n is None else int(n)
            batch = q.pull(size, None if vt_ms is None else vt_ms / 1000, wait=wait_ms / 1000)
            if not batch.messages and batch.paused:
                raise ApiError(409, DELIVERY_PAUSED,
                               f"queue_delivery_paused: delivery of queue {q.name!r} is paused")
            metrics = self.metrics_of(q)
            return {"messages": [message_doc(m) for m in batch.messages],
                    "message_backlog_count": metrics["backlog_count"], "metadata": {"metrics": metrics}}

        return envelope(await self.run(pull, may_block=wait_ms > 0))

    async def ack(self, request: Request) -> Response:
        doc = await self.body(request)
        acks_in, retries_in = doc.get("acks", []), doc.get("retries", [])
        if not isinstance(acks_in, list) or not isinstance(retries_in, list):
            raise ApiError(400, BODY_INVALID, "acks and retries must be lists")
        acks = [_lease(a, "an ack") for a in acks_in]
        retries = []
        for r in retries_in:
            r = _object(r, "a retry")
            retries.append((_lease(r, "a retry"), _number(r, "delay_seconds", 0, MAX_DELAY, MESSAGE_METADATA_INVALID)))
        ref = request.path_params["queue"]
        # A retry at the last attempt dead-letters, which fsyncs: off the loop.
        res = await self.run(lambda: self.queue(ref).settle(acks=acks, retries=retries), may_block=bool(retries))
        warnings = dict(w.removeprefix("lease ").split(": ", 1) for w in res.warnings)
        return envelope({"ackCount": res.ack_count, "retryCount": res.retry_count, "warnings": warnings})

    async def peek(self, request: Request) -> Response:
        doc = await self.body(request)
        n = _number(doc, "batch_size", 1, MAX_PULL_BATCH, default=10)
        assert n is not None
        q = await run_in_threadpool(self.queue, request.path_params["queue"])
        got = await run_in_threadpool(q.peek, int(n))
        return envelope({"messages": [message_doc(m, peeked=True) for m in got]})

    async def purge_messages(self, request: Request) -> Response:
        doc = await self.body(request)
        refs = doc.get("refs")
        if not isinstance(refs, list):
            raise ApiError(400, BODY_INVALID, "refs must be a list of {ref} objects from peek")
        ids = []
        for r in refs:
            ref = _object(r, "a ref").get("ref")
            if not isinstance(ref, str):
                raise ApiError(400, BODY_INVALID, f"a ref must be a message id from peek, got {ref!r}")
            ids.append(ref)
        q = await run_in_threadpool(self.queue, request.path_params["queue"])
        n = await run_in_threadpool(q.delete_messages, ids)
        return envelope({"deleted_count": n})

    async def metrics(self, request: Request) -> Response:
        q = await run_in_threadpool(self.queue, request.path_params["queue"])
        return envelope(await run_in_threadpool(self.fresh_metrics, q))

    def fresh_metrics(self, q: Queue) -> Dict[str, Any]:
        """:meth:`metrics_of`, read now."""
        self._metrics.pop(q.name, None)
        return self.metrics_of(q)

    # -- queues ----------------------------------------------------------------

    async def list_queues(self, request: Request) -> Response:
        try:
            page = int(request.query_params.get("page", "1"))
            per_page = int(request.query_params.get("per_page", "100"))
        except ValueError:
            raise ApiError(400, BODY_INVALID, "page and per_page must be integers") from None
        if page < 1 or not 1 <= per_page <= 1000:
            raise ApiError(400, BODY_INVALID, "page must be at least 1 and per_page from 1 to 1000")

        def listing() -> Tuple[List[Dict[str, Any]], int]:
            names = self.broker.queues()
            chosen = names[(page - 1) * per_page: page * per_page]
            return [self.queue_doc(self.broker.queue(n)) for n in chosen], len(names)

        docs, total = await run_in_threadpool(listing)
        return envelope(docs, result_info={"page": page, "per_page": per_page, "count": len(docs),
                                           "total_count": total, "total_pages": -(-total // per_page)})

    async def create_queue(self, request: Request) -> Response:
        doc = await self.body(request)
        name = doc.get("queue_name")
        if not isinstance(name, str):
            raise ApiError(400, BODY_INVALID, f"queue_name must be a string, got {name!r}")
        settings = self._queue_settings(doc.get("settings"))

        def create() -> Dict[str, Any]:
            paused = settings.pop("_paused", None)
            q = self.broker.create_queue(name, **settings)
            if paused:
                q.pause_delivery()
            return self.queue_doc(q)

        return envelope(await run_in_threadpool(create))

    def _queue_settings(self, raw: Any) -> Dict[str, Any]:
        """Cloudflare's queue settings as qlog's (``_paused`` for delivery_paused)."""
        if raw is None:
            return {}
        raw = _object(raw, "settings")
        out: Dict[str, Any] = {}
        for key, v in raw.items():
            if key == "delivery_delay":
                out["delivery_delay"] = _number(raw, key, 0, MAX_DELAY)
            elif key == "message_retention_period":
                out["message_retention"] = _number(raw, key, 60, 14 * 86_400)
            elif key == "delivery_paused":
                if not isinstance(v, bool):
                    raise ApiError(400, BODY_INVALID, f"delivery_paused must be true or false, got {v!r}")
                out["_paused"] = v
            else:
                raise ApiError(400, BODY_INVALID,
                               f"unknown queue setting {key!r}; known: delivery_delay, delivery_paused, "
                               "message_retention_period")
        return out

    async def get_queue(self, request: Request) -> Response:
        q = await run_in_threadpool(self.queue, request.path_params["queue"])
        return envelope(await run_in_threadpool(self.queue_doc, q))

    async def update_queue(self, request: Request) -> Response:
        doc = await self.body(request)
        q = await run_in_threadpool(self.queue, request.path_params["queue"])
        name = doc.get("queue_name")
        if name is not None and name != q.name:
            raise ApiError(400, BODY_INVALID, f"queues cannot be renamed (queue {q.name!r}, asked {name!r})")
        settings = self._queue_settings(doc.get("settings"))

        def update() -> Dict[str, Any]:
            paused = settings.pop("_paused", None)
            if settings:
                self.broker.configure(q.name, **settings)
            if paused is True:
                q.pause_delivery()
            elif paused is False:
                q.resume_delivery()
            return self.queue_doc(q)

        return envelope(await run_in_threadpool(update))

    async def delete_queue(self, request: Request) -> Response:
        q = await run_in_threadpool(self.queue, request.path_params["queue"])
        await run_in_threadpool(lambda: self.broker.delete_queue(q.name, force=True))
        self._ids = {k: v for k, v in self._ids.items() if v != q.name}
        self._open.pop(q.name, None)
        return envelope(None)

    async def purge(self, request: Request) -> Response:
        doc = await self.body(request)
        if doc.get("delete_messages_permanently") is not True:
            raise ApiError(400, BODY_INVALID, "purge needs delete_messages_permanently: true")
        q = await run_in_threadpool(self.queue, request.path_params["queue"])
        started = time.time()
        await run_in_threadpool(q.purge)
        self._purges[q.name] = started
        return envelope(await run_in_threadpool(self.queue_doc, q))

    async def purge_status(self, request: Request) -> Response:
        q = await run_in_threadpool(self.queue, request.path_params["queue"])
        started = self._purges.get(q.name)
        return envelope({"started_at": _iso(started), "completed": "true" if started is not None else None})

    # -- consumers ---------------------------------------------------------------

    async def list_consumers(self, request: Request) -> Response:
        q = await run_in_threadpool(self.queue, request.path_params["queue"])
        docs = [consumer_doc(q, c) for c in await run_in_threadpool(q.consumers)]
        return envelope(docs, result_info={"page": 1, "per_page": len(docs), "count": len(docs),
                                           "total_count": len(docs), "total_pages": 1})

    async def create_consumer(self, request: Request) -> Response:
        doc = await self.body(request)
        q = await run_in_threadpool(self.queue, request.path_params["queue"])
        c = await run_in_threadpool(lambda: q.set_consumer(**consumer_args(doc)))
        return envelope(consumer_doc(q, c))

    async def get_consumer(self, request: Request) -> Response:
        q, c = await run_in_threadpool(self._consumer, request)
        return envelope(consumer_doc(q, c))

    async def update_consumer(self, request: Request) -> Response:
        doc = await self.body(request)
        q, c = await run_in_threadpool(self._consumer, request)
        c = await run_in_threadpool(lambda: q.set_consumer(**consumer_args(doc, c)))
        return envelope(consumer_doc(q, c))

    async def delete_consumer(self, request: Request) -> Response:
        q, c = await run_in_threadpool(self._consumer, request)
        await run_in_threadpool(q.remove_consumer)
        return envelope(None)

    def _consumer(self, request: Request) -> Tuple[Queue, Dict[str, Any]]:
        q = self.queue(request.path_params["queue"])
        cid = request.path_params["consumer"]
        for c in q.consumers():
            if c["consumer_id"] == cid:
                return q, c
        raise ApiError(404, QUEUE_NOT_FOUND, f"queue {q.name!r} has no consumer {cid!r}")

    def routes(self) -> List[Route]:
        base = "/accounts/{account}/queues"
        one = base + "/{queue}"

        def r(path: str, fn: Callable[[Request], Awaitable[Response]], *methods: str) -> Route:
            return Route(path, fn, methods=list(methods))

        return [
            r(base, self.list_queues, "GET"),
            r(base, self.create_queue, "POST"),
            r(one, self.get_queue, "GET"),
            r(one, self.update_queue, "PUT", "PATCH"),
            r(one, self.delete_queue, "DELETE"),
            r(one + "/messages", self.push, "POST"),
            r(one + "/messages/batch", self.push_batch, "POST"),
            r(one + "/messages/pull", self.pull, "POST"),
            r(one + "/messages/ack", self.ack, "POST"),
            r(one + "/messages/peek", self.peek, "POST"),
            r(one + "/messages/purge", self.purge_messages, "POST"),
            r(one + "/metrics", self.metrics, "GET"),
            r(one + "/purge", self.purge, "POST"),
            r(one + "/purge", self.purge_status, "GET"),
            r(one + "/consumers", self.list_consumers, "GET"),
            r(one + "/consumers", self.create_consumer, "POST"),
            r(one + "/consumers/{consumer}", self.get_consumer, "GET"),
            r(one + "/consumers/{consumer}", self.update_consumer, "PUT", "PATCH"),
            r(one + "/consumers/{consumer}", self.delete_consumer, "DELETE"),
        ]


def _lease(doc: Any, what: str) -> str:
    lid = _object(doc, what).get("lease_id")
    if not isinstance(lid, str):
        raise ApiError(400, BODY_INVALID, f"{what} needs a lease_id string, got {lid!r}")
    return lid


def message_doc(m: Any, peeked: bool = False) -> Dict[str, Any]:
    """A delivered (or peeked) message as Cloudflare shows it: text bodies
    plain, json and bytes bodies base64 of their stored bytes."""
    ct = m.content_type
    raw = m.raw_body
    body = raw.decode("utf-8") if ct == "text" else base64.b64encode(raw).decode("ascii")
    doc: Dict[str, Any] = {"id": m.id, "body": body, "timestamp_ms": int(m.timestamp.timestamp() * 1000),
                           "attempts": m.attempts, "metadata": {"CF-Content-Type": ct}}
    if peeked:
        doc["ref"] = m.ref
    else:
        doc["lease_id"] = m.lease_id
    return doc


CONSUMER_SETTINGS = {
    # Cloudflare's consumer setting -> (qlog's setting, factor to qlog's unit)
    "batch_size": ("max_batch_size", 1),
    "max_retries": ("max_retries", 1),
    "max_wait_time_ms": ("max_batch_timeout", 0.001),
    "retry_delay": ("retry_delay", 1),
    "visibility_timeout_ms": ("visibility_timeout", 0.001),
    "max_concurrency": ("max_concurrency", 1),
}


def consumer_args(doc: Dict[str, Any], current: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A consumer request as ``Queue.set_consumer``'s arguments."""
    ctype = doc.get("type", (current or {}).get("type"))
    if ctype not in ("worker", "http_pull"):
        raise ApiError(400, BODY_INVALID, f"consumer type must be worker or http_pull, got {ctype!r}")
    settings: Dict[str, Any] = {}
    raw = doc.get("settings") or {}
    for key in _object(raw, "settings"):
        if key not in CONSUMER_SETTINGS:
            raise ApiError(400, BODY_INVALID,
                           f"unknown consumer setting {key!r}; known: {', '.join(sorted(CONSUMER_SETTINGS))}")
        name, factor = CONSUMER_SETTINGS[key]
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ApiError(400, BODY_INVALID, f"consumer setting {key} must be a number, got {v!r}")
        settings[name] = v * factor if factor != 1 else v
    if "dead_letter_queue" in doc:
        settings["dead_letter_queue"] = doc["dead_letter_queue"] or None
    return {"type": ctype, "script_name": doc.get("script_name", (current or {}).get("script_name")),
            "settings": settings}


def consumer_doc(q: Queue, c: Dict[str, Any]) -> Dict[str, Any]:
    s = q.settings
    settings: Dict[str, Any] = {"batch_size": s.max_batch_size, "max_retries": s.max_retries,
                                "retry_delay": s.retry_delay}
    if c["type"] == "worker":
        settings.update(max_wait_time_ms=int(s.max_batch_timeout * 1000), max_concurrency=s.max_concurrency)
    else:
        settings["visibility_timeout_ms"] = int(s.visibility_timeout * 1000)
    doc = {"consumer_id": c["consumer_id"], "type": c["type"], "queue_name": q.name,
           "created_on": _iso(c.get("created")), "dead_letter_queue": s.dead_letter_queue or "",
           "settings": settings}
    if c["type"] == "worker":
        doc["script_name"] = c.get("script_name")
    return doc
