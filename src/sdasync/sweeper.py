"""The sweeper: finds tasks whose queue message is gone and sends them a new one.

A queue cannot be searched for a task's message, so the rule goes by age and by the dead-letter queue. One pass,
``sweep(backends, requeue_after_s=..., max_attempts=...)``:

1. every dead letter whose task is still ``queued``, or ``running`` under a lease that has run out, is redriven
   (the queue gave up on the message after ``max_receives`` deliveries, but the task was never settled);
2. a task still ``queued`` whose last change is older than ``requeue_after`` gets its message sent again;
3. a task ``running`` under a lease that ran out more than ``requeue_after`` ago likewise (its worker died and
   its message went with it: no later delivery will find the lease expired and take the task over).

Each time, the message goes out first and the task then records it (a ``requeued`` history record, written by a
compare-and-set on its status and attempt number, and for a running task on its lease still being expired). The
write also moves ``updated_at``, so the next pass leaves the task alone for another ``requeue_after``. If the
write fails, the task changed meanwhile (a worker claimed it, perhaps from this very message, so the requeue
worked and needs no record) and the message may be a duplicate: harmless, since every claim is conditional and
a delivery of a finished task is only acknowledged. So several sweepers may run at once, in several processes:
each sends at most one message per task per pass.

A task requeued ``max_attempts`` times already (since an operator's last redrive) is not requeued again: it goes
to ``failed`` with the error ``stranded``, so nothing stays queued forever, and its message (redriven or freshly
sent) reaches a worker that moves it to the dead-letter queue, where ``sdasync dlq list`` shows it and
``sdasync dlq redrive`` runs it again. ``requeue_after`` must therefore be well above any expected queue wait:
a task that merely waits in a long backlog is requeued too (a duplicate), and after ``max_attempts`` such
rounds it fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

from sdasync.backends.base import DeadLetter, DeadLetterQueue
from sdasync.errors import SdasyncError, TaskConflict, TaskNotFound
from sdasync.models import AttemptRecord, Outcome, Task, TaskError, TaskStatus
from sdasync.service import Backends

log = logging.getLogger(__name__)

#: Tasks read from the store per batch, and dead letters looked at per pass.
BATCH = 100
DEAD_LETTERS = 1000


@dataclass(frozen=True)
class SweepReport:
    """What one pass did: task ids requeued (a new message), redriven (their dead letters moved back), and
    failed as stranded; ``errors`` counts what a backend refused, left for the next pass."""

    requeued: tuple[str, ...] = ()
    redriven: tuple[str, ...] = ()
    stranded: tuple[str, ...] = ()
    errors: int = 0

    def __bool__(self) -> bool:
        return bool(self.requeued or self.redriven or self.stranded or self.errors)


@dataclass
class _Pass:
    backends: Backends
    now: float
    requeue_after_s: float
    max_attempts: int
    #: Tasks this pass has dealt with: a task found twice (a dead letter, then stale) gets one message.
    seen: set[str] = field(default_factory=set)
    requeued: list[str] = field(default_factory=list)
    redriven: list[str] = field(default_factory=list)
    stranded: list[str] = field(default_factory=list)
    errors: int = 0

    def report(self) -> SweepReport:
        return SweepReport(requeued=tuple(self.requeued), redriven=tuple(self.redriven),
                           stranded=tuple(self.stranded), errors=self.errors)


def requeues_since_redrive(history: Iterable[AttemptRecord]) -> int:
    """How many times the sweeper has requeued the task since an operator's last redrive."""
    count = 0
    for entry in history:
        if entry.outcome is Outcome.REDRIVEN:
            count = 0
        elif entry.outcome is Outcome.REQUEUED:
            count += 1
    return count


def sweep(backends: Backends, *, requeue_after_s: float, max_attempts: int, now: float | None = None,
          limit: int = BATCH) -> SweepReport:
    """One pass of the sweeper (see the module docstring). Never raises for a backend's failure: it is logged
    and counted in ``errors``, and the next pass tries again."""
    if requeue_after_s < 0:
        raise ValueError(f"requeue_after_s must be >= 0, not {requeue_after_s}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, not {max_attempts}")
    run = _Pass(backends=backends, now=time.time() if now is None else now, requeue_after_s=requeue_after_s,
                max_attempts=max_attempts)
    # Dead letters first: moving a task's dead letter back spares it a second, fresh message.
    _redrive_dead_letters(run)
    cutoff = run.now - requeue_after_s
    for status in (TaskStatus.QUEUED, TaskStatus.RUNNING):
        _sweep_stale(run, status, cutoff, limit)
    return run.report()


def _redrive_dead_letters(run: _Pass) -> None:
    queue = run.backends.queue
    if "redrive" not in queue.capabilities or not isinstance(queue, DeadLetterQueue):
        return
    try:
        letters = queue.dead_letters(limit=DEAD_LETTERS)
    except SdasyncError as exc:
        log.warning("sweeper: cannot list dead letters: %s", exc)
        run.errors += 1
        return
    by_task: dict[str, list[DeadLetter]] = {}
    for letter in letters:
        by_task.setdefault(letter.body, []).append(letter)
    for task_id, found in by_task.items():
        try:
            task = run.backends.store.get(task_id)
        except TaskNotFound:
            continue  # its task was never written, or the janitor purged it: nothing to run
        except SdasyncError as exc:
            log.warning("sweeper: cannot read task %s: %s", task_id, exc)
            run.errors += 1
            continue
        # Failed tasks' dead letters are where they belong (an operator redrives them); finished ones are inert.
        if _stranded(task, lease_expired_before=run.now):
            ids = [letter.message_id for letter in found]
            _resend(run, task, lease_expired_before=run.now, send=partial(_move_back, queue, ids),
                    done=run.redriven, has_dead_letter=True)


def _move_back(queue: DeadLetterQueue, message_ids: list[str]) -> None:
    queue.redrive(message_ids)


def _sweep_stale(run: _Pass, status: TaskStatus, cutoff: float, limit: int) -> None:
    tried: set[str] = set()
    while True:
        try:
            batch = run.backends.store.stale(status=status, updated_before=cutoff, limit=limit)
        except SdasyncError as exc:
            log.warning("sweeper: cannot list %s tasks: %s", status, exc)
            run.errors += 1
            return
        fresh = [task for task in batch if task.task_id not in tried]
        for task in fresh:
            tried.add(task.task_id)
            if task.task_id in run.seen or not _stranded(task, lease_expired_before=cutoff):
                continue
            _resend(run, task, lease_expired_before=cutoff,
                    send=partial(_send, run, task.task_id), done=run.requeued,
                    has_dead_letter=False)
        # Tasks requeued drop out of the next batch (their updated_at moved); ones that could not be would repeat.
        if len(batch) < limit or not fresh:
            return


def _send(run: _Pass, task_id: str) -> None:
    run.backends.queue.send(task_id)


def _stranded(task: Task, *, lease_expired_before: float) -> bool:
    """Whether the task may be waiting for a message that does not exist: queued, or running under a lease that
    ran out before ``lease_expired_before``."""
    if task.status is TaskStatus.QUEUED:
        return True
    return task.status is TaskStatus.RUNNING and (task.lease_until is None
                                                  or task.lease_until < lease_expired_before)


def _resend(run: _Pass, task: Task, *, lease_expired_before: float, send: Callable[[], None], done: list[str],
            has_dead_letter: bool) -> None:
    run.seen.add(task.task_id)
    # The lease condition only matters for a running task: a queued one holds no lease.
    lease = lease_expired_before if task.status is TaskStatus.RUNNING else None
    if requeues_since_redrive(task.history) >= run.max_attempts:
        _fail_stranded(run, task, lease=lease, has_dead_letter=has_dead_letter)
        return
    try:
        send()
    except SdasyncError as exc:
        log.warning("sweeper: cannot send a message for task %s: %s", task.task_id, exc)
        run.errors += 1
        return
    record = AttemptRecord(attempt=task.attempts, worker=None, started_at=None, ended_at=run.now,
                           outcome=Outcome.REQUEUED)
    try:
        run.backends.store.transition(task.task_id, expected={task.status}, to=task.status, attempt=task.attempts,
                                      lease_expired_before=lease, changes={"history": (*task.history, record)})
    except (TaskConflict, TaskNotFound):
        # It moved on meanwhile (claimed, finished, requeued by another sweeper): the message was a duplicate.
        return
    except SdasyncError as exc:
        log.warning("sweeper: task %s re-sent but not recorded: %s", task.task_id, exc)
        run.errors += 1
        return
    done.append(task.task_id)


def _fail_stranded(run: _Pass, task: Task, *, lease: float | None, has_dead_letter: bool) -> None:
    count = requeues_since_redrive(task.history)
    error = TaskError("stranded", f"the task's queue message went missing again after the sweeper had re-sent it "
                                  f"{count} times; giving up (sdasync dlq redrive runs it again)")
    record = AttemptRecord(attempt=task.attempts, worker=None, started_at=None, ended_at=run.now,
                           outcome=Outcome.FAILED, error=error)
    try:
        run.backends.store.transition(task.task_id, expected={task.status}, to=TaskStatus.FAILED,
                                      attempt=task.attempts, lease_expired_before=lease, changes={
                                          "error": error, "finished_at": run.now, "progress": None,
                                          "lease_until": None, "history": (*task.history, record)})
    except (TaskConflict, TaskNotFound):
        return  # it moved on meanwhile: it is not stranded after all
    except SdasyncError as exc:
        log.warning("sweeper: cannot fail stranded task %s: %s", task.task_id, exc)
        run.errors += 1
        return
    run.stranded.append(task.task_id)
    log.error("task %s failed: %s", task.task_id, error.message)
    if has_dead_letter:
        return  # its dead letter stays where `dlq redrive` finds it
    # Failed first, message second: a worker moves a failed task's message to the dead-letter queue. Were the
    # send to fail, the task is still settled, only missing from `dlq list`.
    try:
        run.backends.queue.send(task.task_id)
    except SdasyncError as exc:
        log.warning("sweeper: stranded task %s has no dead letter: %s", task.task_id, exc)
        run.errors += 1
