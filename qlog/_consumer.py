"""Push consumers: ``@broker.consumer(queue)`` and ``broker.run()``.

A running consumer leases visible messages into a forming batch and hands
the batch to the handler as soon as it holds ``max_batch_size`` messages,
or ``max_batch_timeout`` seconds after its first message became visible.
Between pulls it sleeps on the queue's futex (a send or retry in any
process wakes it), so an idle consumer costs no CPU.

A sync handler runs on ``max_concurrency`` threads of its own: they take
turns forming a batch (one at a time, so batches fill) and each runs the
batch it formed, with no hand-over between threads.  Async handlers run as
tasks on one event loop thread shared by the broker's async consumers; the
forming happens on that loop too, and only the wait for a send runs on a
thread.  The runner's own thread renews the leases of every batch still
forming or being handled, three times per visibility timeout.

When a handler returns, every message of its batch not acked or retried on
its own is acked; when it raises, they are retried, and the exception is
logged with the queue, ids and attempts.  A batch-level ``ack_all`` or
``retry_all`` made inside the handler takes effect when it finishes, so a
call on a single message wins over it whatever the order.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from . import errors
from ._message import _ACK, _RETRY, Message, MessageBatch
from ._settings import delay_us, plural as _plural, validate

if TYPE_CHECKING:  # pragma: no cover
    from ._queue import Broker, Queue

logger = logging.getLogger("qlog.consumer")

Handler = Callable[[MessageBatch], Any]


class PushBatch(MessageBatch):
    """The batch a push consumer's handler gets.  ``ack()`` and ``retry()``
    on a message take effect at once; ``ack_all()`` and ``retry_all()``
    take effect when the handler finishes, for the messages not acked or
    retried on their own by then (the first batch-level call wins)."""

    __slots__ = ("_intent",)

    def __init__(self, q: "Queue", messages: List[Message]) -> None:
        super().__init__(q, messages)
        self._intent: Optional[Tuple[int, Optional[float]]] = None

    def ack_all(self) -> None:
        """Ack, when the handler finishes, every message not acked or retried on its own."""
        if self._intent is None:
            self._intent = (_ACK, 0)

    def retry_all(self, delay_seconds: Optional[float] = None) -> None:
        """Retry, when the handler finishes, every message not acked or
        retried on its own (after ``delay_seconds``, default the queue's
        ``retry_delay``)."""
        delay_us(delay_seconds, self._q.settings.retry_delay, "delay_seconds")  # bad input raises here
        if self._intent is None:
            self._intent = (_RETRY, delay_seconds)


def settle(batch: PushBatch, exc: Optional[BaseException]) -> None:
    """Apply a finished handler's outcome to the messages still open: the
    batch-level call if one was made, else ack on return, retry on raise."""
    intent = batch._intent
    if intent is None:
        intent = (_ACK, 0) if exc is None else (_RETRY, None)
    # MessageBatch's own ack_all and retry_all act at once, and pass over
    # the messages already settled one by one.
    if intent[0] == _ACK:
        MessageBatch.ack_all(batch)
    else:
        MessageBatch.retry_all(batch, intent[1])


class Consumer:
    """A handler registered with ``@broker.consumer(queue, **settings)``."""

    def __init__(self, queue: str, handler: Handler, settings: Dict[str, Any]) -> None:
        self.queue = queue
        self.handler = handler
        self.settings = settings
        self.is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)
        )

    def __repr__(self) -> str:
        name = getattr(self.handler, "__qualname__", repr(self.handler))
        return f"Consumer({self.queue!r}, {name})"


class Registry:
    """The push consumers registered in one broker, and the run of them
    (:meth:`Broker.consumer`, :meth:`Broker.run` and :meth:`Broker.stop`
    call it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._consumers: Dict[str, Consumer] = {}
        self._runner: Optional[Runner] = None

    def queues(self) -> Tuple[str, ...]:
        with self._lock:
            return tuple(self._consumers)

    def register(self, queue: str, settings: Dict[str, Any]) -> Callable[[Handler], Handler]:
        from ._settings import check_name

        check_name(queue)
        validate(settings, "passed to consumer()")
        if settings.get("dead_letter_queue") == queue:
            raise errors.SettingsError(f"queue {queue!r} cannot be its own dead_letter_queue")

        def decorate(handler: Handler) -> Handler:
            if not callable(handler):
                raise TypeError(f"@consumer({queue!r}) needs a function taking a MessageBatch, got {handler!r}")
            with self._lock:
                if queue in self._consumers:
                    raise errors.SettingsError(
                        f"queue {queue!r} already has a consumer in this broker "
                        f"({self._consumers[queue]!r}); a queue has one consumer"
                    )
                self._consumers[queue] = Consumer(queue, handler, dict(settings))
            return handler

        return decorate

    def _claim(self, broker: "Broker", shutdown_timeout: float,
               loop: Optional[asyncio.AbstractEventLoop] = None) -> "Runner":
        with self._lock:
            consumers = list(self._consumers.values())
        if not consumers:
            raise errors.SettingsError(
                f"broker {broker.path!r} has no consumers: decorate a function with @broker.consumer(queue)"
            )
        if isinstance(shutdown_timeout, bool) or not isinstance(shutdown_timeout, (int, float)) or shutdown_timeout < 0:
            raise errors.SettingsError(f"shutdown_timeout must be a number of seconds >= 0, got {shutdown_timeout!r}")
        with self._lock:
            if self._runner is not None:
                raise errors.QlogError(f"broker {broker.path!r} is already running its consumers")
            self._runner = Runner(broker, consumers, float(shutdown_timeout), loop)
            return self._runner

    def _release(self) -> None:
        with self._lock:
            self._runner = None

    def run(self, broker: "Broker", shutdown_timeout: float, handle_signals: Optional[bool]) -> bool:
        runner = self._claim(broker, shutdown_timeout)
        try:
            return _run_with_signals(runner, handle_signals)
        finally:
            self._release()

    async def run_async(self, broker: "Broker", shutdown_timeout: float) -> bool:
        """:meth:`run` on the running event loop: async handlers run as tasks
        on it, sync ones on their threads; the runner's own waiting (lease
        renewals, the shutdown wait) runs on a thread.  Cancelling stops the
        consumers as :meth:`stop` does, waits for the shutdown, and re-raises."""
        loop = asyncio.get_running_loop()
        runner = self._claim(broker, shutdown_timeout, loop)
        try:
            done = loop.run_in_executor(None, runner.run)
            try:
                return await asyncio.shield(done)
            except asyncio.CancelledError:
                runner.stop()
                await done
                raise
        finally:
            self._release()

    def stop(self) -> None:
        r = self._runner
        if r is not None:
            r.stop()


class _Running:
    """One consumer at work on its queue."""

    def __init__(self, runner: "Runner", consumer: Consumer) -> None:
        self.runner = runner
        self.consumer = consumer
        self.q = runner.broker.queue(consumer.queue, **consumer.settings)
        s = self.q.settings
        self.size = s.max_batch_size
        self.timeout = s.max_batch_timeout
        self.vt = s.visibility_timeout
        self.vt_us = int(self.vt * 1_000_000)
        self.concurrency = s.max_concurrency
        self.clock = runner.broker.clock
        self.forming: List[Message] = []
        self.first_at = 0.0
        self.running: Dict[int, PushBatch] = {}
        self.cond = threading.Condition()
        self.turn = threading.Lock()  # held by the thread forming a batch
        self.alive = 0
        self.batches = 0
        self.failures = 0
        self.done = False  # the fetcher has left
        self.slot = asyncio.Event()  # async consumers: a batch finished
        self.tasks: Set[asyncio.Task[None]] = set()  # async consumers: handlers running

    # -- batching ----------------------------------------------------------

    def _pull(self, need: int, wait: float) -> Sequence[Message]:
        """Lease up to ``need`` messages, waiting up to ``wait`` seconds for
        one (a stop ends the wait: it wakes the queue)."""
        q = self.q
        if wait <= 0:
            return [] if self.runner.stopping else q.pull(need, self.vt).messages
        end = time.monotonic() + wait
        while True:
            token = q.change_token()
            if self.runner.stopping:
                return []
            got = q.pull(need, self.vt).messages
            if got:
                return got
            left = end - time.monotonic()
            if left <= 0:
                return got
            q.wait_change(token, left)

    def step(self, wait: float = 0.0) -> Optional[PushBatch]:
        """Lease what is visible into the forming batch (waiting up to
        ``wait`` seconds for a first message); return the batch once it is
        due: full, or ``max_batch_timeout`` after its first message became
        visible.  Never returns an empty batch."""
        need = self.size - len(self.forming)
        if need > 0:
            got = self._pull(need, wait)
            if got:
                if not self.forming:
                    self.first_at = self._visible_since(got)
                self.forming += got
        if self.forming and (
            len(self.forming) >= self.size or self.clock() >= self.first_at + self.timeout
        ):
            batch = PushBatch(self.q, self.forming)
            self.forming = []
            return batch
        return None

    def _visible_since(self, got: Sequence[Message]) -> float:
        """When the earliest of these messages became visible: its send time
        plus delivery delay on a first delivery; now for a redelivery."""
        now = self.clock()
        if len(got) >= self.size or not self.timeout:
            return now  # due at once anyway
        first = now
        for m in got:
            if m.attempts == 1:
                first = min(first, m.visible_at.timestamp())
        return first

    def _wait_for_batch(self) -> float:
        tick = self.runner.tick
        if self.forming:
            return max(0.0, min(tick, self.first_at + self.timeout - self.clock()))
        return tick

    # -- running handlers --------------------------------------------------

    def start(self) -> None:
        if self.consumer.is_async:
            loop = self.runner.loop()
            self.waiter = ThreadPoolExecutor(1, thread_name_prefix=f"qlog-wait-{self.q.name}")
            asyncio.run_coroutine_threadsafe(self._fetch_async(), loop)
            return
        self.alive = self.concurrency
        for i in range(self.concurrency):
            threading.Thread(target=self._sync_loop, name=f"qlog-{self.q.name}-{i}", daemon=True).start()

    def _sync_loop(self) -> None:
        """One of a sync consumer's ``max_concurrency`` threads: take the
        turn to form a batch (one forms at a time, so batches fill), then
        run the handler on it here, with no hand-over between threads."""
        runner = self.runner
        backoff = 0.1
        try:
            while not runner.stopping:
                batch = None
                try:
                    with self.turn:
                        while batch is None and not runner.stopping:
                            batch = self.step(self._wait_for_batch())
                        if batch is None and self.forming:
                            # Stopping with messages leased already: hand them
                            # to the handler rather than make them wait out
                            # their lease (and count an attempt) for nothing.
                            batch = PushBatch(self.q, self.forming)
                            self.forming = []
                    backoff = 0.1
                except errors.LogClosedError:
                    if runner.stopping:
                        break
                    raise
                except Exception:
                    logger.exception("queue %r: fetching a batch failed; trying again in %.1f s",
                                     self.q.name, backoff)
                    runner.stopped.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                if batch is not None:
                    self._dispatch(batch)
        finally:
            with self.cond:
                self.alive -= 1
                self.done = self.alive == 0
            runner.progress.set()

    async def _fetch_async(self) -> None:
        """The fetcher of an async consumer, on the event loop itself: no
        thread hop per batch.  Only the wait for a send runs on a thread."""
        runner = self.runner
        loop = asyncio.get_running_loop()
        q = self.q
        backoff = 0.1
        try:
            while not runner.stopping:
                try:
                    if len(self.running) >= self.concurrency:
                        self.slot.clear()
                        try:
                            await asyncio.wait_for(self.slot.wait(), runner.tick)
                        except asyncio.TimeoutError:
                            pass
                        continue
                    token = q.change_token()
                    batch = self.step(0.0)
                    if batch is not None:
                        self._dispatch(batch)
                        await asyncio.sleep(0)  # let the handler start
                        continue
                    wait = self._wait_for_batch()
                    if wait > 0 and not runner.stopping:
                        await loop.run_in_executor(self.waiter, q.wait_change, token, wait)
                    backoff = 0.1
                except errors.LogClosedError:
                    if runner.stopping:
                        break
                    raise
                except Exception:
                    logger.exception("queue %r: fetching a batch failed; trying again in %.1f s",
                                     self.q.name, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            if self.forming:
                batch = PushBatch(self.q, self.forming)
                self.forming = []
                self._dispatch(batch)
        finally:
            self.waiter.shutdown(wait=False)
            self.done = True
            runner.progress.set()

    def _dispatch(self, batch: PushBatch) -> None:
        with self.cond:
            self.running[id(batch)] = batch
        if self.consumer.is_async:
            task = asyncio.get_running_loop().create_task(self._run_async(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            self._run_sync(batch)

    def _run_sync(self, batch: PushBatch) -> None:
        exc: Optional[BaseException] = None
        try:
            self.consumer.handler(batch)
        except BaseException as e:  # noqa: B902 - a handler's failure is the batch's outcome
            exc = e
        self._finish(batch, exc)

    async def _run_async(self, batch: PushBatch) -> None:
        exc: Optional[BaseException] = None
        try:
            await self.consumer.handler(batch)
        except BaseException as e:  # noqa: B902
            exc = e
        retrying = exc is not None or (batch._intent is not None and batch._intent[0] == _RETRY)
        if retrying and any(m.attempts > self.q.settings.max_retries for m in batch.messages):
            # The outcome may move messages to a dead-letter queue (an
            # fsync): keep it off the event loop.
            await asyncio.get_running_loop().run_in_executor(None, self._finish, batch, exc)
        else:
            self._finish(batch, exc)  # journal appends only
        self.slot.set()

    def _finish(self, batch: PushBatch, exc: Optional[BaseException]) -> None:
        try:
            retrying = exc is not None or (batch._intent is not None and batch._intent[0] == _RETRY)
            if retrying:
                self._log_failure(batch, exc)
            settle(batch, exc)
        except Exception:
            logger.exception(
                "queue %r: recording the outcome of a batch of %d failed; its messages "
                "will be delivered again when their leases run out", self.q.name, len(batch.messages))
        finally:
            with self.cond:
                self.running.pop(id(batch), None)
                self.batches += 1
                self.cond.notify_all()
            self.runner.progress.set()

    def _log_failure(self, batch: PushBatch, exc: Optional[BaseException]) -> None:
        """Say what happens to a failed batch's open messages: which are
        retried and which, on their last attempt, are dead-lettered (or
        deleted, with no dead-letter queue)."""
        s = self.q.settings
        open_msgs = [m for m in batch.messages if m.outcome is None]
        dead = [m for m in open_msgs if m.attempts > s.max_retries]
        retried = [m for m in open_msgs if m.attempts <= s.max_retries]

        def listed(ms: List[Message]) -> str:
            return " ".join(f"{m.id}:{m.attempts}" for m in ms)

        parts = []
        if retried:
            parts.append(f"retrying {_plural(len(retried), 'message')} (id:attempts {listed(retried)})")
        if dead:
            where = (f"dead-lettering {_plural(len(dead), 'message')} to {s.dead_letter_queue!r}"
                     if s.dead_letter_queue else
                     f"deleting {_plural(len(dead), 'message')} (no dead_letter_queue)")
            parts.append(f"{where} after their last attempt (id:attempts {listed(dead)})")
        if exc is not None:
            self.failures += 1
            logger.error("queue %r: handler %s raised %s on a batch of %s; %s", self.q.name,
                         getattr(self.consumer.handler, "__qualname__", "?"), type(exc).__name__,
                         _plural(len(batch.messages), "message"), "; ".join(parts) or "all were settled",
                         exc_info=exc)
        elif dead:
            logger.warning("queue %r: %s", self.q.name, "; ".join(parts))

    # -- leases ------------------------------------------------------------

    def extend(self) -> None:
        """Renew the lease of every message forming or being handled."""
        with self.cond:
            held = [m for b in self.running.values() for m in b.messages]
        held += self.forming
        if held:
            MessageBatch(self.q, held).extend(self.vt)

    def busy(self) -> int:
        with self.cond:
            return len(self.running)


class Runner:
    """Runs a broker's consumers until :meth:`stop`."""

    def __init__(self, broker: "Broker", consumers: List[Consumer], shutdown_timeout: float,
                 loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self.broker = broker
        self.shutdown_timeout = shutdown_timeout
        self.stopping = False
        self.stopped = threading.Event()
        self.progress = threading.Event()  # a batch finished or a fetcher left
        self._loop: Optional[asyncio.AbstractEventLoop] = loop  # the caller's (run_async), else ours
        self._own_loop = loop is None
        self._loop_thread: Optional[threading.Thread] = None
        self.work = [_Running(self, c) for c in consumers]
        vts = [w.vt for w in self.work]
        # Wake at least three times per lease, and once a second at most
        # (a waiting worker costs no CPU to speak of).
        self.tick = min([1.0] + [v / 3 for v in vts])
        self.lease_every = min([v / 3 for v in vts] or [1.0])

    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(self._loop)
                self._loop.call_soon(ready.set)  # type: ignore[union-attr]
                self._loop.run_forever()  # type: ignore[union-attr]

            self._loop_thread = threading.Thread(target=run, name="qlog-async", daemon=True)
            self._loop_thread.start()
            ready.wait()
        return self._loop

    def stop(self) -> None:
        """Stop taking new batches (thread-safe; returns at once)."""
        if self.stopping:
            return
        self.stopping = True
        self.stopped.set()
        for w in self.work:
            with w.cond:
                w.cond.notify_all()
            if w.consumer.is_async and self._loop is not None:
                self._loop.call_soon_threadsafe(w.slot.set)
            try:
                w.q.wake()  # wake a fetcher waiting for messages
            except errors.QlogError:
                pass

    def run(self) -> bool:
        """Run until :meth:`stop`, then wait up to ``shutdown_timeout`` for
        running handlers.  Returns True when every handler finished."""
        if any(w.consumer.is_async for w in self.work):
            self.loop()
        for w in self.work:
            w.start()
        logger.info("consuming %s", ", ".join(
            f"{w.q.name} (batches of {w.size}, {w.timeout:g} s, concurrency {w.concurrency})"
            for w in self.work))
        next_lease = time.monotonic() + self.lease_every
        while not self.stopped.wait(min(self.tick, max(0.0, next_lease - time.monotonic()))):
            if time.monotonic() >= next_lease:
                self._extend_all()
                next_lease = time.monotonic() + self.lease_every
        # Stopping: the fetchers hand over what they hold, then handlers finish.
        end = time.monotonic() + self.shutdown_timeout
        busy = sum(w.busy() for w in self.work)
        if busy:
            logger.info("stopping: waiting up to %g s for %s", self.shutdown_timeout,
                        _plural(busy, "running batch"))
        # A fetcher holding no batch leaves within moments of the stop's
        # wake-up: give it a second even with shutdown_timeout=0.
        fetchers_end = max(end, time.monotonic() + 1.0)
        while True:
            busy = sum(w.busy() for w in self.work)
            if not busy and all(w.done for w in self.work):
                break
            limit = end if busy else fetchers_end
            now = time.monotonic()
            if now >= limit:
                break
            self.progress.wait(min(self.tick, limit - now))
            self.progress.clear()
            if time.monotonic() >= next_lease:
                self._extend_all()
                next_lease = time.monotonic() + self.lease_every
        left = sum(w.busy() for w in self.work)
        if self._loop is not None and self._own_loop:
            if not left:
                self._loop.call_soon_threadsafe(self._loop.stop)
                assert self._loop_thread is not None
                self._loop_thread.join(5)
        if left:
            logger.warning("stopped with %s still running after %g s; their messages "
                           "will be delivered again when their leases run out",
                           _plural(left, "batch"), self.shutdown_timeout)
        return not left

    def _extend_all(self) -> None:
        for w in self.work:
            try:
                w.extend()
            except Exception:
                logger.exception("queue %r: renewing leases failed", w.q.name)


def _run_with_signals(runner: Runner, handle_signals: Optional[bool]) -> bool:
    main = threading.current_thread() is threading.main_thread()
    if handle_signals is None:
        handle_signals = main
    old: Dict[signal.Signals, Any] = {}
    if handle_signals:
        if not main:
            raise errors.QlogError("signal handlers can only be installed from the main thread")

        def on_signal(signum: int, frame: Any) -> None:
            if runner.stopping:
                logger.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(128 + signum)
            logger.info("%s: stopping (send it again to exit at once)", signal.Signals(signum).name)
            runner.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, on_signal)
    try:
        return runner.run()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
