"""The worker's ``start`` and ``progress`` events: sent directly, best effort, never in the worker's way.

Unlike ``completed`` (the outbox), these are not retried and not recorded: a lost ``progress`` is superseded by
the next one within seconds, and the outbox's ``completed`` says how the task ended. The worker's calls only put
an event on a small bounded queue (a full queue drops it, and says so once per overflow); one daemon thread
looks up the secret, signs and sends, so a slow receiver or a slow secret store costs the generation nothing.
``progress`` goes out at most once per ``progress_every_s`` per task. Each event has a webhook-id of its own.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sdasync.errors import SdasyncError
from sdasync.models import Task
from sdasync.outbox import Event, new_event_id, webhook_of
from sdasync.webhooks import signing
from sdasync.webhooks.dispatcher import SecretFor, Sender, event_body
from sdasync.webhooks.guard import Allowlist
from sdasync.webhooks.sender import send

log = logging.getLogger("sdasync.webhooks")

#: Tasks whose last progress time is remembered; a worker runs one task at a time, so this is plenty.
_REMEMBERED = 256


@dataclass(frozen=True)
class _Pending:
    url: str
    tenant: str
    event: Event
    at: float
    data: dict[str, object]


class DirectEvents:
    def __init__(self, *, secret_for: SecretFor, allow: frozenset[str], connect_timeout_s: float,
                 read_timeout_s: float, progress_every_s: float = 3.0, clock: Callable[[], float] = time.time,
                 max_queued: int = 32, sender: Sender = send) -> None:
        self._secret_for = secret_for
        self._allow = Allowlist.parse(allow)
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._progress_every_s = progress_every_s
        self._clock = clock
        self._send = sender
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=max_queued)
        self._last_progress: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self._overflowing = False
        self._closed = False
        #: Events sent (any answer) and dropped, for tests and metrics.
        self.sent = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="webhook-events", daemon=True)
        self._thread.start()

    def start(self, task: Task) -> None:
        """The task started running (an attempt claimed it)."""
        self._offer(task, Event.START, None)

    def progress(self, task: Task, fraction: float, step: int, steps: int) -> None:
        """How far the task has got; rate-limited per task, so call it as often as the engine reports."""
        now = self._clock()
        with self._lock:
            last = self._last_progress.get(task.task_id)
            if last is not None and now - last < self._progress_every_s:
                return
            self._last_progress[task.task_id] = now
            self._last_progress.move_to_end(task.task_id)
            while len(self._last_progress) > _REMEMBERED:
                self._last_progress.popitem(last=False)
        self._offer(task, Event.PROGRESS, {"fraction": float(fraction), "step": int(step), "steps": int(steps)})

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop taking events; send what is queued for up to ``timeout_s``, then leave the rest (best effort)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)

    def _offer(self, task: Task, event: Event, progress: dict[str, object] | None) -> None:
        spec = webhook_of(task.extra)
        if spec is None or event not in spec.events or self._closed:
            return
        data: dict[str, object] = {"taskId": task.task_id, "status": str(task.status), "progress": progress}
        try:
            self._queue.put_nowait(_Pending(spec.url, task.tenant, event, self._clock(), data))
        except queue.Full:
            with self._lock:
                self.dropped += 1
                first = not self._overflowing
                self._overflowing = True
            if first:
                log.warning("webhook events: the receivers are too slow, dropping start/progress events")
            return
        with self._lock:
            self._overflowing = False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._deliver(item)
            except Exception:  # best effort: one bad event never stops the thread
                log.exception("webhook event %s: unexpected failure", item.event)
            if self._closed and self._queue.empty():  # close() could not queue its sentinel: the queue was full
                return

    def _deliver(self, item: _Pending) -> None:
        try:
            secret = self._secret_for(item.tenant)
        except SdasyncError as exc:
            log.warning("webhook event %s task=%s: no secret (%s); not sent", item.event, item.data["taskId"],
                        exc.code)
            return
        if not secret:
            log.warning("webhook event %s task=%s: no signing secret for the tenant; not sent", item.event,
                        item.data["taskId"])
            return
        body = event_body(str(item.event), item.at, item.data)
        event_id = new_event_id()
        headers = signing.headers(secret, event_id, int(self._clock()), body)
        attempt = self._send(item.url, headers=headers, body=body, allow=self._allow,
                             connect_timeout_s=self._connect_timeout_s, read_timeout_s=self._read_timeout_s,
                             clock=self._clock)
        with self._lock:
            self.sent += 1
        result = f"HTTP {attempt.status}" if attempt.error is None else attempt.error
        log.info("webhook %s task=%s event=%s: %s", event_id, item.data["taskId"], item.event, result)
