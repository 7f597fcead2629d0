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
import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

from sdasync.backends.base import BlobStore, Queue, QueueDepth, TaskPage, TaskStore
from sdasync.backends.registry import open_blobs, open_queue, open_store
from sdasync.config import Limits, Settings
from sdasync.errors import SdasyncError, TaskConflict
from sdasync.models import AttemptRecord, Outcome, Task, TaskStatus, WorkerRecord
from sdasync.validation import SEED_MAX, validate_request

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


def _cancelled_attempt(task: Task, now: float) -> AttemptRecord:
    """The history record of a running attempt that a cancel ends."""
    return AttemptRecord(attempt=task.attempts, worker=task.worker, started_at=task.started_at, ended_at=now,
                         outcome=Outcome.CANCELLED)


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


class TaskService:
    def __init__(self, backends: Backends, *, limits: Limits | None = None,
                 inline_payload_max: int = INLINE_PAYLOAD_MAX) -> None:
        self.queue = backends.queue
        self.store = backends.store
        self.blobs = backends.blobs
        self.payloads = backends.payloads
        self.limits = limits or Limits()
        self.inline_payload_max = inline_payload_max

    def submit(self, body: Any) -> Task:
        """Validate, enqueue, then store. Raises RequestError (nothing stored), BackendError.

        The message goes out before the task is written: if the send fails, nothing exists and the client gets
        a 503; if the write fails (or this process dies) after the send, the message names a task that never
        existed, and workers drop it after a few deliveries. Either way no task can wait in ``queued`` for a
        message that was never sent."""
        api, payload = validate_request(body, self.limits)
        if payload["seed"] == -1:
            # Fixed now, not by the engine, so a retried attempt draws the same images as the first one did and
            # overwriting them under the same keys changes nothing.
            payload["seed"] = secrets.randbelow(SEED_MAX + 1)
        task = self._offload(Task.new(api, payload))
        self.queue.send(task.task_id)
        self.store.create(task)
        return task

    def _offload(self, task: Task) -> Task:
        """Keep a large payload (base64 init images) in the payload store, so task items and queue messages stay
        small: a DynamoDB item holds at most 400 KB, and the original design failed on exactly this."""
        data = json.dumps(task.payload, separators=(",", ":")).encode()
        if len(data) <= self.inline_payload_max:
            return task
        key = payload_key(task.task_id)
        self.payloads.put(key, data, content_type="application/json")
        return replace(task, payload={}, extra={**task.extra, PAYLOAD_REF: key})

    def get(self, task_id: str) -> Task:
        """Raises TaskNotFound, BackendError."""
        return self.store.get(task_id)

    def list(self, *, status: TaskStatus | None = None, limit: int = 20, cursor: str | None = None) -> TaskPage:
        return self.store.list(status=status, limit=limit, cursor=cursor)

    def cancel(self, task_id: str) -> Task:
        """Cancel a queued or running task. A worker holding it finds the task cancelled when it writes its result
        and publishes nothing. Cancelling a running task ends its attempt: the history gets a ``cancelled``
        record for it. Raises TaskNotFound, TaskConflict (already finished), BackendError."""
        task = self.store.get(task_id)
        for _ in range(CANCEL_TRIES):
            if task.status.is_terminal:
                raise TaskConflict(f"task {task_id} is already {task.status} and cannot be cancelled", current=task)
            now = time.time()
            changes: dict[str, Any] = {"finished_at": now, "progress": None}
            if task.status == TaskStatus.RUNNING:
                # The history is rewritten whole, so the write is fenced on the attempt (and the status) this
                # record was built from: a worker's write in between (a heartbeat's progress, a result, a new
                # claim) makes it conflict, and the record is built again from the task as it is then.
                changes["lease_until"] = None
                changes["history"] = (*task.history, _cancelled_attempt(task, now))
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
