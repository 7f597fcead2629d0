"""How a worker settles a delivery: the writes that end an attempt, and what becomes of the message after them.

Every write that finishes a task (``succeeded``, ``failed``, ``cancelled`` by its deadline) goes through
``finishing``, which adds the task's ``completed`` webhook outbox to the SAME compare-and-set: a redelivered finished
task is only acknowledged, so an outbox written by a second write could be lost to a crash between the two.
The sweeper uses the same two functions for the tasks it finishes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sdasync.backends.base import BlobStore, Message, Queue, TaskStore
from sdasync.errors import ReceiptInvalid, SdasyncError, TaskConflict
from sdasync.models import AttemptRecord, Outcome, Task, TaskError, TaskStatus
from sdasync.outbox import completed_outbox
from sdasync.worker.attempt import HandleOutcome, record
from sdasync.worker.options import WorkerConfig

log = logging.getLogger(__name__)

QUEUED_OR_RUNNING = frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING})
#: The error code of a task cancelled because its deadline passed.
DEADLINE = "deadline"


def finishing(task: Task, now: float, changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` for a write that takes ``task`` to a terminal state, with its outbox when it subscribed to
    ``completed``."""
    outbox = completed_outbox(task.extra, now=now)
    return changes if outbox is None else {**changes, "outbox": outbox}


def deadline_error(task: Task) -> TaskError:
    deadline = task.deadline
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline)) if deadline is not None else "its deadline"
    return TaskError(DEADLINE, f"the task was not finished by its deadline ({when})")


def past_deadline(task: Task, now: float) -> bool:
    return task.deadline is not None and now >= task.deadline


def deadline_changes(task: Task, now: float, *, history: tuple[AttemptRecord, ...]) -> dict[str, Any]:
    """The changes of ``-> cancelled`` for a task whose deadline has passed; ``history`` already holds the record
    of the attempt it ended, if it was running."""
    return finishing(task, now, {"error": deadline_error(task), "finished_at": now, "progress": None,
                                 "lease_until": None, "history": history})


class Settle:
    """The worker's settling half (``Worker`` inherits it); reads the worker's backends and config."""

    queue: Queue
    store: TaskStore
    blobs: BlobStore
    config: WorkerConfig

    def _last_delivery(self, message: Message) -> bool:
        """The queue dead-letters this message if it comes back once more: the task must be settled now."""
        return message.receive_count >= self.queue.max_receives

    def _lost_claim(self, message: Message, exc: TaskConflict) -> HandleOutcome:
        current = exc.current
        if current is not None and current.status.is_terminal:
            self.queue.ack(message.receipt)
            return HandleOutcome.DUPLICATE
        # Another worker holds the task under a live lease (a duplicate delivery, or its extend failed). Look
        # again when that lease would have run out: by then it is finished, or its holder is gone.
        lease = current.lease_until if current is not None and current.lease_until else time.time()
        self._requeue(message, delay_s=max(1.0, lease - time.time() + 1.0))
        return HandleOutcome.CONTENDED

    def _requeue(self, message: Message, *, delay_s: float) -> None:
        """Make the task's message come back after ``delay_s``. On its last delivery, or when this delivery is no
        longer current, a fresh message replaces it: putting it back would let the queue dead-letter it, or fail,
        and either would leave the task with no message. A duplicate message is harmless by design."""
        if not self._last_delivery(message):
            try:
                self.queue.nack(message.receipt, delay_s=min(delay_s, 43_200.0))
                return
            except ReceiptInvalid:
                pass
        self.queue.send(message.body, delay_s=min(delay_s, 900.0))
        self.queue.ack(message.receipt)

    def _release(self, task: Task, message: Message, why: str, *, engine_s: float | None = None) -> HandleOutcome:
        """Hand the task back at once, without using up an attempt: the worker is the problem, not the task."""
        try:
            self.store.transition(task.task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.QUEUED,
                                  attempt=task.attempts, changes={
                                      "progress": None, "lease_until": None,
                                      "history": (*task.history, record(task, Outcome.RELEASED, engine_s=engine_s,
                                                                        error=TaskError("released", why)))})
        except TaskConflict:
            return self._after_conflict(task, message, keys=())
        self._requeue(message, delay_s=0)
        log.info("task %s released: %s", task.task_id, why)
        return HandleOutcome.RELEASED

    def _discard(self, task: Task, keys: tuple[str, ...]) -> None:
        """Delete images an attempt uploaded for a task that will not publish them. A delete that fails leaves an
        unreferenced blob (logged), never an outcome unsettled."""
        for key in keys:
            try:
                self.blobs.delete(key)
            except SdasyncError as exc:
                log.warning("task %s: image %s of an unpublished attempt not deleted: %s", task.task_id, key, exc)

    def _after_conflict(self, task: Task, message: Message, *, keys: tuple[str, ...]) -> HandleOutcome:
        """Our attempt's write was refused: the task was cancelled, or a newer attempt owns it."""
        current = self.store.get(task.task_id)
        match current.status:
            case TaskStatus.CANCELLED:
                self._discard(task, keys)
                self.queue.ack(message.receipt)
                log.info("task %s was cancelled; its images are discarded", task.task_id)
                return HandleOutcome.CANCELLED
            case TaskStatus.SUCCEEDED | TaskStatus.FAILED:
                self.queue.ack(message.receipt)
                return HandleOutcome.DUPLICATE
            case TaskStatus.QUEUED | TaskStatus.RUNNING:
                # A newer attempt holds the task: leave its message and its images alone (same keys as ours).
                log.warning("task %s attempt %d was fenced off by attempt %d", task.task_id, task.attempts,
                            current.attempts)
                return HandleOutcome.FENCED

    def _cancel_for_deadline(self, task: Task, message: Message, *, history: tuple[AttemptRecord, ...],
                             ours: bool, keys: tuple[str, ...] = ()) -> HandleOutcome:
        """``-> cancelled`` with reason deadline, fenced on the attempt: ``ours`` (our attempt is running), or
        the task as read before a claim (then, if it was running, on its lease having run out). Then the images
        ``keys`` of our attempt go, and the message with them."""
        now = time.time()
        try:
            self.store.transition(task.task_id, expected={task.status}, to=TaskStatus.CANCELLED,
                                  attempt=task.attempts, lease_expired_before=None if ours else now,
                                  changes=deadline_changes(task, now, history=history))
        except TaskConflict as exc:
            if ours:
                return self._after_conflict(task, message, keys=keys)
            return self._lost_claim(message, exc)
        self._discard(task, keys)
        self.queue.ack(message.receipt)
        log.info("task %s cancelled: its deadline passed", task.task_id)
        return HandleOutcome.DEADLINE

    def _succeed(self, task: Task, message: Message, *, keys: tuple[str, ...], changes: dict[str, Any],
                 engine_s: float | None) -> HandleOutcome:
        now = time.time()
        if past_deadline(task, now):
            # The deadline passed during the upload or just now: nobody waits for these images any more, and a
            # task must not end succeeded after its deadline. The deadline wins.
            attempt = record(task, Outcome.CANCELLED, error=deadline_error(task), now=now, engine_s=engine_s)
            return self._cancel_for_deadline(task, message, history=(*task.history, attempt), ours=True, keys=keys)
        try:
            self.store.transition(task.task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.SUCCEEDED,
                                  attempt=task.attempts, changes=finishing(task, now, {
                                      **changes, "images": keys, "finished_at": now, "error": None,
                                      "lease_until": None, "history": (*task.history, record(
                                          task, Outcome.SUCCEEDED, now=now, engine_s=engine_s))}))
        except TaskConflict:
            return self._after_conflict(task, message, keys=keys)
        return HandleOutcome.SUCCEEDED

    def _finish_failed(self, task: Task, message: Message, error: TaskError, *,
                       history: tuple[AttemptRecord, ...], attempt: int | None = None,
                       lease_expired_before: float | None = None) -> HandleOutcome:
        """``failed``, and the message to the dead-letter queue, where ``sdasync dlq`` shows it."""
        now = time.time()
        try:
            self.store.transition(task.task_id, expected=QUEUED_OR_RUNNING, to=TaskStatus.FAILED,
                                  attempt=task.attempts if attempt is None else attempt,
                                  lease_expired_before=lease_expired_before, changes=finishing(task, now, {
                                      "error": error, "finished_at": now, "progress": None,
                                      "lease_until": None, "history": history}))
        except TaskConflict as exc:
            if exc.current is not None and not exc.current.status.is_terminal:
                return self._lost_claim(message, exc)
            return self._after_conflict(task, message, keys=())
        self.queue.dead_letter(message.receipt, reason=error.code)
        return HandleOutcome.FAILED
