"""The outbox dispatcher: delivers every finished task's ``completed`` event, at least once, retrying for a day.

Each due task goes through two compare-and-sets on its outbox (``TaskStore.update_outbox``), with one try
between them:

1. CLAIM: move ``due_at`` to now + ``lease_s``. A TaskConflict means another dispatcher claimed or recorded it
   first: skip it. The lease outlasts a whole try, so nobody else sends while this one does.
2. SEND: one signed POST (``sender.send``), with the event's ``webhook-id`` and this try's own timestamp.
3. RECORD: append the attempt; 2xx -> ``delivered``; else ``due_at`` = now + a backoff with full jitter (5 s
   doubling, capped at an hour), or ``abandoned`` once the event is older than ``retry_for_s``.

A dispatcher killed after 1 leaves a claimed outbox that falls due again when the lease passes; killed after 2,
the event is sent again with the same ``webhook-id``, which receivers deduplicate on. A dispatcher slower than its
lease finds its record refused (the outbox moved on): the try is not logged, and the event is sent again by
whoever took it over. So a try may be repeated, never lost, and two dispatchers never log the same try.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from sdasync.backends.base import TaskStore
from sdasync.errors import SdasyncError, TaskConflict, TaskNotFound
from sdasync.models import Task
from sdasync.outbox import DeliveryAttempt, Outbox, OutboxState, webhook_of
from sdasync.timefmt import iso
from sdasync.webhooks import signing
from sdasync.webhooks.guard import Allowlist
from sdasync.webhooks.sender import send

log = logging.getLogger("sdasync.webhooks")

#: The event's ``data`` for a task: the API's JSON of it (camelCase), built by the caller.
Render = Callable[[Task], Mapping[str, object]]
#: A tenant's signing secret(s); ``""`` is key-less mode's tenant, for which the caller passes a server-wide
#: secret. None: no secret for that tenant (the try fails and is retried, nothing is sent unsigned).
SecretFor = Callable[[str], str | list[str] | None]
Sender = Callable[..., DeliveryAttempt]
#: Called between send and record, with the task id: the fault suite's hook.
AfterSend = Callable[[str], None]


def event_body(event: str, at: float, data: Mapping[str, object]) -> bytes:
    """The JSON body of every webhook: ``{"type": "task.<event>", "timestamp": <ISO>, "data": {...}}``."""
    return json.dumps({"type": f"task.{event}", "timestamp": iso(at), "data": dict(data)},
                      separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class Dispatcher:
    def __init__(self, store: TaskStore, *, secret_for: SecretFor, render: Render, allow: frozenset[str],
                 connect_timeout_s: float, read_timeout_s: float, retry_for_s: float = 86400.0,
                 lease_s: float | None = None, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, backoff_base_s: float = 5.0, backoff_cap_s: float = 3600.0,
                 batch: int = 100, concurrency: int = 8, sender: Sender = send,
                 after_send: AfterSend | None = None) -> None:
        self._store = store
        self._secret_for = secret_for
        self._render = render
        self._allow = Allowlist.parse(allow)
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._retry_for_s = retry_for_s
        # A try lasts at most connect + read timeout (the sender's deadline); the lease leaves room to record it.
        self._lease_s = lease_s if lease_s is not None else 2 * (connect_timeout_s + read_timeout_s) + 30.0
        self._clock = clock
        self._rng = rng or random.Random()
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._batch = batch
        self._concurrency = max(1, concurrency)
        self._send = sender
        self._after_send = after_send

    def backoff(self, tries: int) -> float:
        """Seconds before the next try after ``tries`` failed ones: full jitter over a doubling, capped window."""
        window = min(self._backoff_cap_s, self._backoff_base_s * 2 ** max(0, tries - 1))
        return self._rng.uniform(0.0, window)

    def run_once(self) -> int:
        """One pass over the outboxes due now; returns how many tries were sent. Raises BackendError when the
        store cannot be read (a failed claim or record only skips that task)."""
        due = self._store.due_outbox(before=self._clock(), limit=self._batch)
        if not due:
            return 0
        if self._concurrency == 1 or len(due) == 1:
            return sum(self._deliver(task) for task in due)
        # One slow receiver must not hold up the others' events: each try has its own lease.
        with ThreadPoolExecutor(max_workers=min(self._concurrency, len(due)),
                                thread_name_prefix="webhooks") as pool:
            return sum(pool.map(self._deliver, due))

    def run(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Run passes until ``stop`` is set: back-to-back while full batches are due, else every ``interval_s``."""
        while not stop.is_set():
            try:
                sent = self.run_once()
            except SdasyncError as exc:
                log.warning("webhooks: cannot read due outboxes: %s", exc)
                sent = 0
            if sent < self._batch:
                stop.wait(interval_s)

    def _deliver(self, task: Task) -> int:
        try:
            return self._try(task)
        except Exception:  # one task's trouble (a store outage mid-pass, a bug in render) never stops the pass
            log.exception("webhook for task %s: unexpected failure; the outbox falls due again", task.task_id)
            return 0

    def _try(self, task: Task) -> int:
        outbox = task.outbox
        if outbox is None or outbox.state is not OutboxState.PENDING:
            return 0
        now = self._clock()
        try:
            claimed_task = self._store.update_outbox(task.task_id, replace(outbox, due_at=now + self._lease_s),
                                                     expected=outbox)
        except (TaskConflict, TaskNotFound):
            return 0  # another dispatcher has it, or the janitor took the task
        claimed = claimed_task.outbox
        assert claimed is not None
        attempt = self._attempt(claimed_task, claimed)
        if self._after_send is not None:
            self._after_send(task.task_id)
        self._record(claimed_task, claimed, attempt)
        return 1

    def _attempt(self, task: Task, outbox: Outbox) -> DeliveryAttempt:
        spec = webhook_of(task.extra)
        started = self._clock()
        if spec is None:
            return DeliveryAttempt(at=started, status=None, error="the task has no webhook")
        try:
            body = event_body(str(outbox.event), outbox.created_at, self._render(task))
            secret = self._secret_for(task.tenant)
            headers = None if not secret else signing.headers(secret, outbox.event_id, int(started), body)
        except SdasyncError as exc:
            return DeliveryAttempt(at=started, status=None, error=f"could not prepare the event: {exc.code}")
        except Exception:  # a bug or a bad secret: logged, and the try counts, so the event ends abandoned, not looping
            log.exception("webhook %s task=%s: could not prepare the event", outbox.event_id, task.task_id)
            return DeliveryAttempt(at=started, status=None, error="could not prepare the event")
        if headers is None:
            return DeliveryAttempt(at=started, status=None, error="no signing secret for the tenant")
        return self._send(spec.url, headers=headers, body=body, allow=self._allow,
                          connect_timeout_s=self._connect_timeout_s, read_timeout_s=self._read_timeout_s,
                          clock=self._clock)

    def _record(self, task: Task, claimed: Outbox, attempt: DeliveryAttempt) -> None:
        now = self._clock()
        tries = len(claimed.attempts) + 1
        if attempt.error is None:
            state, due = OutboxState.DELIVERED, None
        elif now - claimed.created_at >= self._retry_for_s or webhook_of(task.extra) is None:
            state, due = OutboxState.ABANDONED, None
        else:
            state, due = OutboxState.PENDING, now + self.backoff(tries)
        try:
            self._store.update_outbox(task.task_id, claimed.tried(attempt, due_at=due, state=state),
                                      expected=claimed)
        except (TaskConflict, TaskNotFound):
            log.warning("webhook %s task=%s try=%d: sent, but the outbox moved on (lease passed); not logged",
                        claimed.event_id, task.task_id, tries)
            return
        result = f"HTTP {attempt.status}" if attempt.error is None else attempt.error
        next_try = "" if due is None else f", next try in {due - now:.1f} s"
        log.info("webhook %s task=%s tenant=%s event=%s try=%d: %s -> %s%s", claimed.event_id, task.task_id,
                 task.tenant or "-", claimed.event, tries, result, state, next_try)
