"""``sdasync dlq list`` and ``sdasync dlq redrive``: see dead-lettered tasks and run them again.

Redrive order: the task goes ``failed -> queued`` first, then its message leaves the dead-letter queue. If the
second step fails, the dead letter is still there and running redrive again finishes the job (a ``queued`` task's
dead letter is simply moved back). The other order could lose the redrive: a worker would receive the message
while the task still says ``failed``, and acknowledge it.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from sdasync.backends.base import DeadLetter, DeadLetterQueue
from sdasync.errors import ConfigError, TaskConflict, TaskNotFound
from sdasync.models import AttemptRecord, Outcome, Task, TaskStatus
from sdasync.service import Backends
from sdasync.timefmt import iso


def _dead_letter_queue(backends: Backends) -> DeadLetterQueue:
    queue = backends.queue
    if "redrive" not in queue.capabilities or not isinstance(queue, DeadLetterQueue):
        raise ConfigError("this queue backend cannot list or redrive dead letters")
    return queue


def _dead_letters(backends: Backends, limit: int) -> list[DeadLetter]:
    return _dead_letter_queue(backends).dead_letters(limit=limit)


def dead_letter_json(letter: DeadLetter, status: str) -> dict[str, Any]:
    """One row of ``dlq list``: JSON like the API's (camelCase keys, ISO-8601 UTC times), built only here."""
    return {"taskId": letter.body, "status": status, "reason": letter.reason, "deliveries": letter.receive_count,
            "deadAt": iso(letter.dead_at), "messageId": letter.message_id}


def list_dead(backends: Backends, *, limit: int = 100) -> list[dict[str, Any]]:
    """The dead letters, oldest first, each with its task's current status (``missing`` when the task is gone).

    ``deliveries`` is how many times the queue handed the message to a worker before it was dead-lettered (SQS's
    ApproximateReceiveCount): a task that failed on its first try shows 1; a count at the queue's
    ``max_receives`` means the queue gave up on the message by itself. ``deadAt`` is when it was dead-lettered
    (on SQS, when SQS's own redrive policy moved it: the message's original send time)."""
    rows = []
    for letter in _dead_letters(backends, limit):
        try:
            status: str = backends.store.get(letter.body).status.value
        except TaskNotFound:
            status = "missing"
        rows.append(dead_letter_json(letter, status))
    return rows


def redriven_record(task: Task, now: float) -> AttemptRecord:
    """The history record an operator's redrive appends: it resets the count of attempts used (the worker's and
    the sweeper's alike count only since the last one)."""
    return AttemptRecord(attempt=task.attempts, worker=None, started_at=None, ended_at=now,
                         outcome=Outcome.REDRIVEN)


def redrive(backends: Backends, task_ids: Collection[str] | None = None, *, limit: int = 1000) -> list[dict[str, str]]:
    """Requeue the dead-lettered tasks named (all when None). Returns what happened to each."""
    report: list[dict[str, str]] = []
    move: list[str] = []
    try:
        for letter in _dead_letters(backends, limit):
            if task_ids is not None and letter.body not in task_ids:
                continue
            try:
                task = backends.store.get(letter.body)
                if task.status is TaskStatus.FAILED:
                    marker = redriven_record(task, time.time())
                    backends.store.transition(task.task_id, expected={TaskStatus.FAILED}, to=TaskStatus.QUEUED,
                                              changes={"finished_at": None, "history": (*task.history, marker)})
                elif task.status.is_terminal:
                    report.append({"taskId": task.task_id, "result": f"skipped: {task.status.value}"})
                    continue
            except TaskNotFound:
                report.append({"taskId": letter.body, "result": "skipped: no such task"})
                continue
            except TaskConflict:
                report.append({"taskId": letter.body, "result": "skipped: it changed meanwhile; run again"})
                continue
            move.append(letter.message_id)
            report.append({"taskId": task.task_id, "result": "requeued"})
    finally:
        # Whatever was requeued above gets its message back, even if a later task raised.
        if move:
            _dead_letter_queue(backends).redrive(move)
    missing = set(task_ids or ()) - {row["taskId"] for row in report}
    report += [{"taskId": task_id, "result": "skipped: not in the dead-letter queue"} for task_id in sorted(missing)]
    return report
