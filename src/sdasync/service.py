"""TaskService: submit, get, list and cancel tasks. The HTTP API, the Lambda handler and the CLI all go through it.

Submission order: the message is sent first, then the task is written (see ``TaskService.submit``), so no task is
ever left ``queued`` with no message behind it (the original design's first defect).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

from sdasync.backends.base import BlobStore, Queue, TaskPage, TaskStore
from sdasync.backends.registry import open_blobs, open_queue, open_store
from sdasync.config import Limits, Settings
from sdasync.errors import TaskConflict
from sdasync.models import Task, TaskStatus
from sdasync.validation import SEED_MAX, validate_request

log = logging.getLogger(__name__)

#: Payloads larger than this (JSON bytes) are kept in the blob store; the task refers to them.
INLINE_PAYLOAD_MAX = Settings.inline_payload_max
#: The key in ``Task.extra`` naming the blob that holds the payload.
PAYLOAD_REF = "payloadRef"


def payload_key(task_id: str) -> str:
    return f"requests/{task_id}.json"


def load_payload(task: Task, blobs: BlobStore) -> dict[str, Any]:
    """The task's payload, fetched from the blob store when it was too large to keep inline.
    Raises BlobNotFound, BackendError."""
    ref = task.extra.get(PAYLOAD_REF)
    if not ref:
        return task.payload
    loaded: dict[str, Any] = json.loads(blobs.get(str(ref)))
    return loaded


@dataclass
class Backends:
    queue: Queue
    store: TaskStore
    blobs: BlobStore


@contextmanager
def open_backends(settings: Settings) -> Iterator[Backends]:
    """Open the three backends the settings name, closing them on exit."""
    with ExitStack() as stack:
        queue = stack.enter_context(open_queue(settings.queue_url))
        store = stack.enter_context(open_store(settings.store_url))
        blobs = stack.enter_context(open_blobs(settings.blobs_url))
        yield Backends(queue=queue, store=store, blobs=blobs)


class TaskService:
    def __init__(self, backends: Backends, *, limits: Limits | None = None,
                 inline_payload_max: int = INLINE_PAYLOAD_MAX) -> None:
        self.queue = backends.queue
        self.store = backends.store
        self.blobs = backends.blobs
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
        """Keep a large payload (base64 init images) in the blob store, so task items and queue messages stay
        small: a DynamoDB item holds at most 400 KB, and the original design failed on exactly this."""
        data = json.dumps(task.payload, separators=(",", ":")).encode()
        if len(data) <= self.inline_payload_max:
            return task
        key = payload_key(task.task_id)
        self.blobs.put(key, data, content_type="application/json")
        return replace(task, payload={}, extra={**task.extra, PAYLOAD_REF: key})

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
                                         to=TaskStatus.CANCELLED,
                                         changes={"finished_at": time.time(), "progress": None})
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
