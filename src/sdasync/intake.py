"""Everything a submission passes before its task is queued, in this order:

1. the request itself (``validation``: route, payload; ``submission``: webhook, deadline) and the webhook's URL
   (the SSRF guard resolves it now, so a client learns at once that 127.0.0.1 is refused);
2. its ``Idempotency-Key``: a replay returns the original task here, before any quota is spent on it;
3. the key's rate (a token bucket), the queue's depth, and the tenant's cap on queued tasks;
4. the task is built: seed fixed, large payload offloaded, deadline and webhook kept in ``Task.extra``.

Any refusal after the key was claimed releases the claim, so the client's retry is a fresh try, not a replay of
a request that never made a task.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdasync.auth.quotas import Admission, RateLimiter
from sdasync.backends.base import Queue, TaskStore
from sdasync.backends.records import RecordStore
from sdasync.callers import Caller
from sdasync.config import Limits
from sdasync.errors import LimitExceeded, RequestError, TaskConflict, TaskNotFound
from sdasync.idempotency import Claim, Idempotency, body_hash
from sdasync.models import DEADLINE_KEY, KEY_ID_KEY, MAX_ACTIVE_KEY, Task, new_task_id
from sdasync.outbox import WEBHOOK_KEY
from sdasync.submission import submission
from sdasync.validation import SEED_MAX, validate_request
from sdasync.webhooks.guard import check_url

#: How long a replay waits for the original task to be written by the request that claimed the key.
REPLAY_WAIT_S = 10.0
#: Retry-After for a full queue: about the time a worker takes to start and drain some of it.
QUEUE_FULL_RETRY_S = 30.0


@dataclass(frozen=True)
class IntakeSettings:
    limits: Limits
    max_queue_depth: int | None = None
    max_task_age: float | None = None
    idempotency_ttl: float = 86400.0
    webhook_allow: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Accepted:
    """A task ready to be queued, or (``replay``) the original task of an Idempotency-Key."""

    task: Task
    replay: bool = False
    claim: Claim | None = None


class Intake:
    def __init__(self, *, queue: Queue, store: TaskStore, settings: IntakeSettings,
                 clock: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.store = store
        self.settings = settings
        self.clock = clock
        records = _records(store)
        self.idempotency = None if records is None else Idempotency(records, ttl_s=settings.idempotency_ttl,
                                                                    clock=clock)
        self.rates = None if records is None else RateLimiter(records, clock=clock)
        self.admission = None if records is None else Admission(store, clock=clock)

    def accept(self, body: Any, caller: Caller, *, idempotency_key: str | None = None,
               cancel_after: str | None = None) -> Accepted:
        """The task to queue (not yet sent nor written), or the original of a replay. Raises RequestError,
        LimitExceeded, TaskConflict (the key's first request is still being written), BackendError."""
        api, payload = validate_request(body, self.settings.limits)
        task_id = new_task_id()
        claim = None
        if idempotency_key is not None:
            # Before the checks that depend on time or DNS (a deadline now past, a resolver down): a retry of a
            # request that was accepted is answered with its task, whatever those would say now.
            if self.idempotency is None:
                raise RequestError("this task store keeps no idempotency keys", field="idempotency-key")
            claim = self.idempotency.claim(caller.tenant, idempotency_key, body_hash(body), task_id)
            if not claim.owner:
                found = self._original(claim)
                if isinstance(found, Task):
                    return Accepted(task=found, replay=True)
                claim = found
            task_id = claim.task_id
        try:
            now = self.clock()
            wanted = submission(body, now=now, cancel_after=cancel_after, max_task_age=self.settings.max_task_age)
            if wanted.webhook is not None:
                check_url(wanted.webhook.url, self.settings.webhook_allow)
            self._admit(caller, task_id)
        except BaseException:
            if claim is not None and self.idempotency is not None:
                self.idempotency.release(claim)
            raise
        if payload["seed"] == -1:
            # Fixed now, not by the engine, so a retried attempt draws the same images as the first one did and
            # overwriting them under the same keys changes nothing.
            payload["seed"] = secrets.randbelow(SEED_MAX + 1)
        extra: dict[str, Any] = {}
        if wanted.deadline is not None:
            extra[DEADLINE_KEY] = wanted.deadline
        if wanted.webhook is not None:
            extra[WEBHOOK_KEY] = wanted.webhook.to_dict()
        if caller.key is not None:
            extra[KEY_ID_KEY] = caller.key.key_id
            if caller.key.max_active is not None:
                extra[MAX_ACTIVE_KEY] = caller.key.max_active
        task = Task.new(api, payload, now=now, tenant=caller.tenant, extra=extra, task_id=task_id)
        return Accepted(task=task, claim=claim)

    def failed(self, accepted: Accepted, caller: Caller) -> None:
        """Undo what ``accept`` reserved: the submission failed before its message was sent."""
        if accepted.claim is not None and self.idempotency is not None:
            self.idempotency.release(accepted.claim)
        if self.admission is not None and caller.key is not None and caller.key.max_queued is not None:
            self.admission.forget(caller.tenant, accepted.task.task_id)

    def _original(self, claim: Claim) -> Task | Claim:
        """The task of someone else's claim, once it is written; or our own claim, after taking over one whose
        task never appeared (ours is then the one to create)."""
        deadline = time.monotonic() + REPLAY_WAIT_S
        delay = 0.02
        while True:
            try:
                return self.store.get(claim.task_id)
            except TaskNotFound:
                pass
            assert self.idempotency is not None
            if self.idempotency.stale(claim):
                taken = self.idempotency.take_over(claim)
                if taken is not None:
                    return taken
            if time.monotonic() >= deadline:
                raise TaskConflict("the first request with this Idempotency-Key is still being made; retry")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _admit(self, caller: Caller, task_id: str) -> None:
        key = caller.key
        if key is not None and self.rates is not None:
            self.rates.take(key)
        if self.settings.max_queue_depth is not None:
            depth = self.queue.depth()
            if depth.visible + depth.delayed >= self.settings.max_queue_depth:
                raise LimitExceeded(f"the queue holds {self.settings.max_queue_depth} or more tasks; retry later",
                                    code="queue_full", retry_after_s=QUEUE_FULL_RETRY_S)
        if key is not None and key.max_queued is not None and self.admission is not None:
            self.admission.admit_queued(caller.tenant, task_id, key.max_queued)


def _records(store: TaskStore) -> RecordStore | None:
    return store if isinstance(store, RecordStore) else None

