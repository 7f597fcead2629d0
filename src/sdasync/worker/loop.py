"""The worker loop. One message at a time, in this order, so a crash at any step loses nothing:

1. receive (the message is hidden for the visibility timeout)
2. claim: ``queued|running -> running`` conditional on the attempt number, which it increments
3. generate, while a heartbeat keeps the message hidden
4. write the images under deterministic keys ``<taskId>/<n>.png`` (a retry overwrites, never adds)
5. ``running -> succeeded`` conditional on this worker's attempt, with the image keys and info
6. only then acknowledge (delete) the message

A crash before 6 leaves the message to reappear after the visibility timeout; the next worker claims the task
again with a higher attempt number, which fences off any write the first one might still make.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sdasync.backends.base import BlobStore, Message, Queue, TaskStore
from sdasync.engines.base import Engine, GenerationRequest, Progress
from sdasync.errors import BlobNotFound, GenerationCancelled, SdasyncError, TaskConflict, TaskNotFound, UnexpectedError
from sdasync.models import Task, TaskError, TaskStatus
from sdasync.service import load_payload
from sdasync.worker.lease import Heartbeat

log = logging.getLogger(__name__)

QUEUED_OR_RUNNING = frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING})
#: Exit status of a worker that stopped because its engine broke: restart the process.
EXIT_ENGINE_BROKEN = 3
#: Deliveries of a message whose task does not exist before it is dropped (0.5 + 1 + 2 + 4 s of backoff).
ORPHAN_RECEIVES = 5


@dataclass(frozen=True)
class WorkerConfig:
    visibility_timeout_s: float = 60.0
    max_attempts: int = 3
    #: Long-poll wait per receive; also how quickly an idle worker notices a stop request.
    wait_s: float = 1.0
    backoff_base_s: float = 2.0
    backoff_max_s: float = 120.0
    #: Progress is written to the task store at most this often.
    progress_interval_s: float = 1.0
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")


class Worker:
    def __init__(self, *, queue: Queue, store: TaskStore, blobs: BlobStore, engine: Engine,
                 config: WorkerConfig | None = None) -> None:
        self.queue = queue
        self.store = store
        self.blobs = blobs
        self.engine = engine
        self.config = config or WorkerConfig()
        self.stop_event = threading.Event()
        self.counts: dict[str, int] = {}
        #: What the worker process should exit with: 0, or EXIT_ENGINE_BROKEN.
        self.exit_code = 0
        self._engine_ready = False

    def request_stop(self) -> None:
        """Finish the current task, then leave ``run``."""
        self.stop_event.set()

    def run(self, *, burst: bool = False, max_tasks: int | None = None, max_idle_s: float | None = None) -> int:
        """Process messages until stopped. ``burst``: leave when the queue has nothing visible; ``max_tasks``:
        leave after that many messages; ``max_idle_s``: leave after that long without one. Returns the number of
        messages handled."""
        if not self._engine_ready:
            self.engine.setup()
            self._engine_ready = True
        handled = 0
        idle_since = time.monotonic()
        log.info("worker %s ready", self.config.worker_id)
        while not self.stop_event.is_set():
            if max_tasks is not None and handled >= max_tasks:
                break
            try:
                messages = self.queue.receive(max_messages=1, wait_s=0 if burst else self.config.wait_s,
                                              visibility_timeout_s=self.config.visibility_timeout_s)
            except SdasyncError as exc:
                log.warning("receive failed: %s", exc)
                self.stop_event.wait(self.config.wait_s)
                continue
            if not messages:
                if burst or (max_idle_s is not None and time.monotonic() - idle_since >= max_idle_s):
                    break
                continue
            for message in messages:
                self.handle(message)
                handled += 1
            idle_since = time.monotonic()
        log.info("worker %s stopping after %d message(s): %s", self.config.worker_id, handled, self.counts)
        return handled

    def _count(self, outcome: str) -> str:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        return outcome

    def handle(self, message: Message) -> str:
        """Process one delivery; returns what happened. Never raises for a task's failure."""
        try:
            return self._count(self._handle(message))
        except SdasyncError as exc:
            # A backend failed mid-way: leave the message to reappear; the attempt number keeps the retry safe.
            log.warning("message %s left for redelivery: %s", message.message_id, exc)
            return self._count("deferred")

    def _handle(self, message: Message) -> str:
        try:
            task = self.store.get(message.body)
        except TaskNotFound:
            return self._unknown_task(message)
        if task.status.is_terminal:
            self.queue.ack(message.receipt)
            return "duplicate"
        if task.attempts >= self.config.max_attempts:
            # Every earlier attempt died without recording an outcome (a crash loop): stop here.
            self._finish_failed(task, message, task.attempts, TaskError(
                "attempts_exhausted", f"the task was started {task.attempts} times and never finished"))
            return "failed"
        try:
            claimed = self.store.transition(task.task_id, expected=QUEUED_OR_RUNNING, to=TaskStatus.RUNNING,
                                            attempt=task.attempts, changes={
                                                "attempts": task.attempts + 1, "started_at": time.time(),
                                                "worker": self.config.worker_id, "progress": None})
        except TaskConflict as exc:
            return self._lost_claim(message, exc)
        return self._run(claimed, message)

    def _unknown_task(self, message: Message) -> str:
        """The API sends a task's message before it writes the task (see ``TaskService.submit``): a message can
        arrive a moment early, or name a task whose write failed. Look again a few times, then drop it."""
        if message.receive_count < ORPHAN_RECEIVES:
            self.queue.nack(message.receipt, delay_s=min(0.5 * 2.0 ** (message.receive_count - 1), 30.0))
            return "early"
        log.warning("message %s names task %s, which was never written; dropping it", message.message_id,
                    message.body)
        self.queue.ack(message.receipt)
        return "orphan"

    def _last_delivery(self, message: Message) -> bool:
        """The queue dead-letters this message if it comes back once more: the task must be settled now."""
        return message.receive_count >= self.queue.max_receives

    def _lost_claim(self, message: Message, exc: TaskConflict) -> str:
        current = exc.current
        if (isinstance(current, Task) and current.status.is_terminal) or self._last_delivery(message):
            # On its last delivery a copy is not put back: the claim's winner holds the task and its own message.
            self.queue.ack(message.receipt)
            return "duplicate"
        # Someone else claimed it between our read and our write (a duplicate delivery). Look again later: by
        # then it is finished and this copy is acknowledged, or its worker died and this copy takes over.
        self.queue.nack(message.receipt, delay_s=self.config.visibility_timeout_s)
        return "contended"

    def _run(self, task: Task, message: Message) -> str:
        attempt = task.attempts
        try:
            payload = load_payload(task, self.blobs)
        except BlobNotFound:
            error = TaskError("payload_missing", "the request's payload is gone from the blob store")
            self._finish_failed(task, message, attempt, error, dead_letter=False)
            return "failed"
        except SdasyncError as exc:
            return self._failed_attempt(task, message, exc)
        reporter = _ProgressReporter(self.store, task.task_id, attempt, self.config.progress_interval_s)
        request = GenerationRequest(task_id=task.task_id, api=task.api, payload=payload,
                                    on_progress=reporter.report, is_cancelled=reporter.cancelled.is_set)
        log.info("task %s attempt %d: generating", task.task_id, attempt)
        with Heartbeat(self.queue, message.receipt, visibility_timeout_s=self.config.visibility_timeout_s):
            try:
                result = self.engine.generate(request)
                keys = tuple(f"{task.task_id}/{i}.png" for i in range(len(result.images)))
                for key, png in zip(keys, result.images, strict=True):
                    self.blobs.put(key, png, content_type="image/png")
            except GenerationCancelled:
                return self._after_conflict(task, message, keys=())
            except SdasyncError as exc:
                return self._failed_attempt(task, message, exc)
            except Exception as exc:  # an engine bug or a library error: retried like any transient failure
                log.exception("task %s attempt %d: unexpected error", task.task_id, attempt)
                return self._failed_attempt(task, message, UnexpectedError(f"{type(exc).__name__}: {exc}"))
        try:
            self.store.transition(task.task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.SUCCEEDED,
                                  attempt=attempt, changes={
                                      "images": keys, "info": result.info, "finished_at": time.time(),
                                      "error": None, "progress": _done(payload)})
        except TaskConflict:
            return self._after_conflict(task, message, keys=keys)
        self.queue.ack(message.receipt)
        log.info("task %s succeeded with %d image(s)", task.task_id, len(keys))
        return "succeeded"

    def _after_conflict(self, task: Task, message: Message, *, keys: tuple[str, ...]) -> str:
        """Our attempt's write was refused: the task was cancelled, or a newer attempt owns it."""
        current = self.store.get(task.task_id)
        if current.status is TaskStatus.CANCELLED:
            for key in keys:
                self.blobs.delete(key)
            self.queue.ack(message.receipt)
            log.info("task %s was cancelled; its images are discarded", task.task_id)
            return "cancelled"
        if current.status.is_terminal:
            self.queue.ack(message.receipt)
            return "duplicate"
        # A newer attempt holds the task: leave its message and its images alone.
        log.warning("task %s attempt %d was fenced off by attempt %d", task.task_id, task.attempts,
                    current.attempts)
        return "fenced"

    def _failed_attempt(self, task: Task, message: Message, exc: SdasyncError) -> str:
        attempt = task.attempts
        error = TaskError(exc.code, exc.message)
        if exc.retryable and not self._engine_healthy():
            # The engine broke (a lost CUDA context, say): this worker cannot serve anyone. Hand the task back now
            # and exit, so a fresh process (restarted by serve, systemd or the fleet) takes over.
            log.error("engine unhealthy after %s; releasing task %s and stopping", exc, task.task_id)
            self.exit_code = EXIT_ENGINE_BROKEN
            self.request_stop()
            try:
                self.store.transition(task.task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.QUEUED,
                                      attempt=attempt, changes={"error": error, "progress": None})
            except TaskConflict:
                return self._after_conflict(task, message, keys=())
            self.queue.nack(message.receipt, delay_s=0)
            return "released"
        if exc.retryable and attempt < self.config.max_attempts and not self._last_delivery(message):
            delay = self.backoff_s(attempt)
            log.warning("task %s attempt %d failed (%s), retrying in %.1f s", task.task_id, attempt, exc, delay)
            try:
                self.store.transition(task.task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.QUEUED,
                                      attempt=attempt, changes={"error": error, "progress": None})
            except TaskConflict:
                return self._after_conflict(task, message, keys=())
            self.queue.nack(message.receipt, delay_s=delay)
            return "retried"
        if exc.retryable:
            error = TaskError(exc.code, f"{exc.message} (gave up after {attempt} attempts)")
        log.error("task %s failed: %s", task.task_id, error.message)
        self._finish_failed(task, message, attempt, error, dead_letter=exc.retryable)
        return "failed"

    def _finish_failed(self, task: Task, message: Message, attempt: int, error: TaskError, *,
                       dead_letter: bool = True) -> None:
        try:
            self.store.transition(task.task_id, expected=QUEUED_OR_RUNNING, to=TaskStatus.FAILED, attempt=attempt,
                                  changes={"error": error, "finished_at": time.time(), "progress": None})
        except TaskConflict:
            self._after_conflict(task, message, keys=())
            return
        if dead_letter:
            self.queue.dead_letter(message.receipt, reason=error.code)
        else:
            self.queue.ack(message.receipt)

    def _engine_healthy(self) -> bool:
        try:
            return bool(self.engine.health().get("ok", True))
        except Exception:  # a health probe that raises is itself a sign of trouble
            return False

    def backoff_s(self, attempt: int) -> float:
        """Exponential backoff with full jitter: spreads retries of a burst of failures over time."""
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def _done(payload: dict[str, Any]) -> dict[str, Any]:
    steps = int(payload.get("steps", 0))
    return {"fraction": 1.0, "step": steps, "steps": steps, "etaSeconds": 0.0}


class _ProgressReporter:
    """Writes progress at most once per interval; notices a cancel when the task is no longer ours to write."""

    def __init__(self, store: TaskStore, task_id: str, attempt: int, interval_s: float) -> None:
        self.store = store
        self.task_id = task_id
        self.attempt = attempt
        self.interval_s = interval_s
        self.cancelled = threading.Event()
        self._last = 0.0

    def report(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s and progress.step < progress.steps:
            return
        self._last = now
        try:
            self.store.transition(self.task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.RUNNING,
                                  attempt=self.attempt, changes={"progress": {
                                      "fraction": round(progress.fraction, 4), "step": progress.step,
                                      "steps": progress.steps, "etaSeconds": progress.eta_s}})
        except TaskConflict:
            # Cancelled, or fenced off by a newer attempt: either way this generation's result is not wanted.
            self.cancelled.set()
        except SdasyncError as exc:
            log.warning("task %s: progress not written: %s", self.task_id, exc)
