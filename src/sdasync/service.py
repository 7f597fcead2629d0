"""TaskService: submit, get, list and cancel tasks. The HTTP API, the Lambda handler and the CLI all go through it.

Submission order: the message is sent first, then the task is written (see ``TaskService.submit``), so no task is
ever left ``queued`` with no message behind it (the original design's first defect).

Large request payloads live in a blob store of their own (``Settings.payloads_url``), never under the results,
which the API or a CDN serves: a task names its payload's key there in ``Task.extra["payload_ref"]``. Tasks of
older versions name it ``extra["payloadRef"]``, a key in the results store; both are still read.
"""

from __future__ import annotations

import builtins
import json
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

from sdasync.backends.base import BlobStore, Queue, QueueDepth, TaskPage, TaskStore
from sdasync.backends.registry import open_blobs, open_queue, open_store
from sdasync.callers import LOCAL, Caller
from sdasync.config import Limits, Settings
from sdasync.errors import SdasyncError, TaskConflict, TaskNotFound
from sdasync.intake import Intake, IntakeSettings
from sdasync.models import AttemptRecord, Outcome, Task, TaskError, TaskStatus, WorkerRecord
from sdasync.outbox import completed_outbox

log = logging.getLogger(__name__)

#: Payloads larger than this (JSON bytes) are kept in the payload store; the task refers to them.
INLINE_PAYLOAD_MAX: int = Settings.model_fields["inline_payload_max"].default
#: The key in ``Task.extra`` naming the payload's blob in the payload store.
PAYLOAD_REF = "payload_ref"
#: The key older versions used, naming a blob in the results store.
LEGACY_PAYLOAD_REF = "payloadRef"
#: A cancel that keeps losing its compare-and-set to a busy worker gives up after this many reads.
CANCEL_TRIES = 20


def payload_key(task_id: str) -> str:
    """The payload's key in the payload store."""
    return f"{task_id}.json"


def load_payload(task: Task, payloads: BlobStore, *, results: BlobStore | None = None) -> dict[str, Any]:
    """The task's payload, fetched from the payload store when it was too large to keep inline (or, for a task of
    an older version, from ``results``, where those kept it). Raises BlobNotFound, BackendError."""
    ref = task.extra.get(PAYLOAD_REF)
    store = payloads
    if not ref:
        ref, store = task.extra.get(LEGACY_PAYLOAD_REF), results or payloads
    if not ref:
        return task.payload
    loaded: dict[str, Any] = json.loads(store.get(str(ref)))
    return loaded


def _cancelled_attempt(task: Task, now: float, error: TaskError | None = None) -> AttemptRecord:
    """The history record of a running attempt that a cancel ends."""
    # The worker cannot write to a cancelled task, so its engine time is taken as the whole attempt: the GPU was
    # that attempt's until the worker saw the cancel (an upper bound, for usage).
    engine_s = None if task.started_at is None else max(0.0, now - task.started_at)
    return AttemptRecord(attempt=task.attempts, worker=task.worker, started_at=task.started_at, ended_at=now,
                         outcome=Outcome.CANCELLED, error=error, engine_s=engine_s)


#: Why a task past its deadline ended ``cancelled``.
DEADLINE_ERROR = TaskError("deadline", "the task was not finished by its deadline")


@dataclass
class Backends:
    queue: Queue
    store: TaskStore
    #: The results: what the API or a CDN serves.
    blobs: BlobStore
    #: Large request payloads, never served.
    payloads: BlobStore


@contextmanager
def open_backends(settings: Settings) -> Iterator[Backends]:
    """Open the backends the settings name (the store with the retention), closing them on exit."""
    with ExitStack() as stack:
        queue = stack.enter_context(open_queue(settings.queue_url))
        store = stack.enter_context(open_store(settings.store_url, retention_days=settings.retention_days))
        blobs = stack.enter_context(open_blobs(settings.blobs_url))
        payloads = stack.enter_context(open_blobs(settings.payloads_url))
        yield Backends(queue=queue, store=store, blobs=blobs, payloads=payloads)


@dataclass(frozen=True)
class Submitted:
    task: Task
    #: False when an Idempotency-Key gave back a task made by an earlier request.
    created: bool


class TaskService:
    def __init__(self, backends: Backends, *, limits: Limits | None = None,
                 inline_payload_max: int = INLINE_PAYLOAD_MAX, intake: IntakeSettings | None = None) -> None:
        self.queue = backends.queue
        self.store = backends.store
        self.blobs = backends.blobs
        self.payloads = backends.payloads
        self.limits = limits or Limits()
        self.inline_payload_max = inline_payload_max
        self.intake = Intake(queue=self.queue, store=self.store, settings=intake or IntakeSettings(self.limits))

    @classmethod
    def from_settings(cls, backends: Backends, settings: Settings) -> TaskService:
        return cls(backends, limits=settings.limits, inline_payload_max=settings.inline_payload_max,
                   intake=IntakeSettings(limits=settings.limits, max_queue_depth=settings.max_queue_depth,
                                         max_task_age=settings.max_task_age,
                                         idempotency_ttl=settings.idempotency_ttl,
                                         webhook_allow=settings.webhook_allow))

    def submit(self, body: Any, caller: Caller = LOCAL) -> Task:
        """``submit_request`` without the request's headers: the task it queued."""
        return self.submit_request(body, caller).task

    def submit_request(self, body: Any, caller: Caller = LOCAL, *, idempotency_key: str | None = None,
                       cancel_after: str | None = None) -> Submitted:
        """Check, enqueue, then store (see ``intake`` for the checks). Raises RequestError and LimitExceeded
        (nothing stored), TaskConflict (a replay whose original is still being written), BackendError.

        The message goes out before the task is written: if the send fails, nothing exists and the client gets
        a 503; if the write fails (or this process dies) after the send, the message names a task that never
        existed, and workers drop it after a few deliveries. Either way no task can wait in ``queued`` for a
        message that was never sent."""
        accepted = self.intake.accept(body, caller, idempotency_key=idempotency_key, cancel_after=cancel_after)
        if accepted.replay:
            return Submitted(task=accepted.task, created=False)
        try:
            task = self._offload(accepted.task)
            self.queue.send(task.task_id)
        except BaseException:
            self.intake.failed(accepted, caller)
            raise
        try:
            self.store.create(task)
        except TaskConflict as exc:
            if accepted.claim is None:
                raise
            # Our Idempotency-Key claim was taken over (we were slow) and the taker wrote this very task id
            # first: it is the one task of the key.
            return Submitted(task=exc.current or self.store.get(task.task_id), created=False)
        return Submitted(task=task, created=True)

    def _offload(self, task: Task) -> Task:
        """Keep a large payload (base64 init images) in the payload store, so task items and queue messages stay
        small: a DynamoDB item holds at most 400 KB, and the original design failed on exactly this."""
        data = json.dumps(task.payload, separators=(",", ":")).encode()
        if len(data) <= self.inline_payload_max:
            return task
        key = payload_key(task.task_id)
        self.payloads.put(key, data, content_type="application/json")
        return replace(task, payload={}, extra={**task.extra, PAYLOAD_REF: key})

    def get(self, task_id: str, caller: Caller = LOCAL) -> Task:
        """The task, if the caller may see it: another tenant's task is not found, exactly like a missing one. A
        queued task past its deadline is cancelled here, on the read, rather than left for a worker to find.
        Raises TaskNotFound, BackendError."""
        task = self.store.get(task_id)
        if not caller.sees(task):
            raise TaskNotFound(f"task {task_id} not found")
        if task.status is TaskStatus.QUEUED and task.deadline is not None and task.deadline <= time.time():
            try:
                return self._cancel(task, error=DEADLINE_ERROR)
            except TaskConflict as exc:
                return exc.current or self.store.get(task_id)
        return task

    def list(self, *, status: TaskStatus | None = None, limit: int = 20, cursor: str | None = None,
             caller: Caller = LOCAL, tenant: str | None = None) -> TaskPage:
        """Newest first: a tenant's own tasks, or for an operator every task (or one ``tenant``'s)."""
        scope = tenant if caller.admin else caller.tenant
        return self.store.list(status=status, limit=limit, cursor=cursor, tenant=scope)

    def cancel(self, task_id: str, caller: Caller = LOCAL) -> Task:
        """Cancel a queued or running task. A worker holding it finds the task cancelled when it writes its result
        and publishes nothing. Cancelling a running task ends its attempt: the history gets a ``cancelled``
        record for it. Raises TaskNotFound, TaskConflict (already finished), BackendError."""
        return self._cancel(self.get(task_id, caller))

    def _cancel(self, task: Task, *, error: TaskError | None = None) -> Task:
        task_id = task.task_id
        for _ in range(CANCEL_TRIES):
            if task.status.is_terminal:
                raise TaskConflict(f"task {task_id} is already {task.status} and cannot be cancelled", current=task)
            now = time.time()
            changes: dict[str, Any] = {"finished_at": now, "progress": None, "error": error}
            outbox = completed_outbox(task.extra, now=now)
            if outbox is not None:
                changes["outbox"] = outbox
            if task.status == TaskStatus.RUNNING:
                # The history is rewritten whole, so the write is fenced on the attempt (and the status) this
                # record was built from: a worker's write in between (a heartbeat's progress, a result, a new
                # claim) makes it conflict, and the record is built again from the task as it is then.
                changes["lease_until"] = None
                changes["history"] = (*task.history, _cancelled_attempt(task, now, error))
            try:
                return self.store.transition(task_id, expected={task.status}, to=TaskStatus.CANCELLED,
                                             attempt=task.attempts, changes=changes)
            except TaskConflict as exc:
                if exc.current is None:
                    raise
                task = exc.current
        raise TaskConflict(f"task {task_id} kept changing while being cancelled; try again", current=task)

    def workers(self) -> builtins.list[WorkerRecord]:
        """The live workers of the registry, by id; never raises (a store that cannot answer is logged and counts
        as no workers: /healthz reports that, it does not fail on it)."""
        try:
            return self.store.workers()
        except SdasyncError as exc:
            log.warning("worker registry unreadable: %s", exc)
            return []

    def health(self) -> HealthReport:
        """Each backend's state and the worker registry; never raises. Failure details are error codes, not
        messages (which can name server paths); the log has the messages."""
        try:
            depth: QueueDepth | None = self.queue.depth()
            queue = Check(ok=True)
        except Exception as exc:  # a health report must describe every failure, not raise it
            depth, queue = None, _failed("queue", exc)
        try:
            self.store.list(limit=1)
            store = Check(ok=True)
        except Exception as exc:
            store = _failed("store", exc)
        return HealthReport(queue=queue, depth=depth, store=store, blobs=Check(ok=True),
                            blob_capabilities=tuple(sorted(self.blobs.capabilities)), workers=tuple(self.workers()))


@dataclass(frozen=True)
class Check:
    ok: bool
    #: An error code when not ok.
    detail: str = ""


@dataclass(frozen=True)
class HealthReport:
    queue: Check
    depth: QueueDepth | None
    store: Check
    blobs: Check
    blob_capabilities: tuple[str, ...]
    #: The live workers of the registry.
    workers: tuple[WorkerRecord, ...]

    @property
    def ok(self) -> bool:
        return self.queue.ok and self.store.ok and self.blobs.ok

    @property
    def engine_ready(self) -> bool:
        """Some worker's engine can generate now; True with no workers at all (a fleet scaled to zero starts one
        when tasks arrive)."""
        return not self.workers or any(w.health.ok for w in self.workers)


def _failed(part: str, exc: Exception) -> Check:
    log.warning("health: %s failed: %s", part, exc)
    return Check(ok=False, detail=exc.code if isinstance(exc, SdasyncError) else "unexpected_error")
