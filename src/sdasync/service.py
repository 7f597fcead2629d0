"""TaskService: submit, get, list and cancel tasks. The HTTP API, the Lambda handler and the CLI all go through it.

Submission order: the task is written first, then its message is sent. A task whose message could not be sent is
marked ``failed`` (``queue_unavailable``) before the error reaches the client, so no task is left ``queued`` with
no message behind it (the original design's first defect).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from sdasync.backends.base import BlobStore, Queue, TaskPage, TaskStore
from sdasync.backends.registry import open_backend
from sdasync.config import Limits, Settings
from sdasync.errors import BackendError, SdasyncError, TaskConflict
from sdasync.models import Task, TaskError, TaskStatus
from sdasync.validation import SEED_MAX, validate_request

log = logging.getLogger(__name__)


@dataclass
class Backends:
    queue: Queue
    store: TaskStore
    blobs: BlobStore


@contextmanager
def open_backends(settings: Settings) -> Iterator[Backends]:
    """Open the three backends the settings name, closing them on exit."""
    with ExitStack() as stack:
        queue = stack.enter_context(open_backend("queue", settings.queue_url))
        store = stack.enter_context(open_backend("store", settings.store_url))
        blobs = stack.enter_context(open_backend("blobs", settings.blobs_url))
        yield Backends(queue=queue, store=store, blobs=blobs)


class TaskService:
    def __init__(self, backends: Backends, *, limits: Limits | None = None) -> None:
        self.queue = backends.queue
        self.store = backends.store
        self.blobs = backends.blobs
        self.limits = limits or Limits()

    def submit(self, body: Any) -> Task:
        """Validate, store and enqueue. Raises RequestError (nothing stored), BackendError."""
        api, payload = validate_request(body, self.limits)
        if payload["seed"] == -1:
            # Fixed now, not by the engine, so a retried attempt draws the same images as the first one did and
            # overwriting them under the same keys changes nothing.
            payload["seed"] = secrets.randbelow(SEED_MAX + 1)
        task = Task.new(api, payload)
        self.store.create(task)
        try:
            self.queue.send(task.task_id)
        except SdasyncError as exc:
            self._fail_unsent(task, exc)
            raise BackendError(f"the queue refused the task; it is marked failed: {exc.message}") from exc
        return task

    def _fail_unsent(self, task: Task, exc: SdasyncError) -> None:
        try:
            self.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.FAILED, changes={
                "finished_at": time.time(),
                "error": TaskError("queue_unavailable", f"the task could not be queued: {exc.message}"),
            })
        except SdasyncError:
            log.exception("task %s: could not mark unsent task failed", task.task_id)

    def get(self, task_id: str) -> Task:
        """Raises TaskNotFound, BackendError."""
        return self.store.get(task_id)

    def list(self, *, status: TaskStatus | None = None, limit: int = 20, cursor: str | None = None) -> TaskPage:
        return self.store.list(status=status, limit=limit, cursor=cursor)

    def cancel(self, task_id: str) -> Task:
        """Cancel a queued or running task. A worker holding it finds the task cancelled when it writes its result
        and publishes nothing. Raises TaskNotFound, TaskConflict (already finished), BackendError."""
        try:
            return self.store.transition(task_id, expected={TaskStatus.QUEUED, TaskStatus.RUNNING},
                                         to=TaskStatus.CANCELLED, changes={"finished_at": time.time()})
        except TaskConflict as exc:
            current = exc.current.status if isinstance(exc.current, Task) else "finished"
            raise TaskConflict(f"task {task_id} is already {current} and cannot be cancelled",
                               current=exc.current) from None

    def health(self) -> dict[str, Any]:
        """Each backend's state; never raises."""
        report: dict[str, Any] = {}
        try:
            depth = self.queue.depth()
            report["queue"] = {"ok": True, "visible": depth.visible, "inFlight": depth.in_flight,
                               "delayed": depth.delayed}
        except Exception as exc:  # a health report must describe every failure, not raise it
            report["queue"] = {"ok": False, "detail": str(exc)}
        try:
            self.store.list(limit=1)
            report["store"] = {"ok": True}
        except Exception as exc:
            report["store"] = {"ok": False, "detail": str(exc)}
        report["blobs"] = {"ok": True, "capabilities": sorted(self.blobs.capabilities)}
        return report
