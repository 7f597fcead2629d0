"""The sweeper: finds tasks whose queue message is gone and sends them a new one.

A queue cannot be searched for a task's message, so the rule goes by age and by the dead-letter queue. One pass,
``sweep(backends, requeue_after_s=..., max_attempts=...)``:

1. every dead letter whose task is still ``queued``, or ``running`` under a lease that has run out, is redriven
   (the queue gave up on the message after ``max_receives`` deliveries, but the task was never settled);
2. a task still ``queued`` whose last change is older than ``requeue_after`` gets its message sent again;
3. a task ``running`` under a lease that ran out more than ``requeue_after`` ago likewise (its worker died and
   its message went with it: no later delivery will find the lease expired and take the task over).

A task among those whose deadline has passed is not re-sent: it goes to ``cancelled`` with the error ``deadline``
(and its ``completed`` webhook outbox, in the same write), fenced like a re-send. The old queued tasks are looked
at for this even while the queue holds enough messages for them (one batch per pass then): their messages may be
far back in line, and nobody waits for their answers any more.

Each time, the message goes out first and the task then records it (a ``requeued`` history record, written by a
compare-and-set on its status and attempt number, and for a running task on its lease still being expired). The
write also moves ``updated_at``, so the next pass leaves the task alone for another ``requeue_after``. If the
write fails, the task changed meanwhile (a worker claimed it, perhaps from this very message, so the requeue
worked and needs no record) and the message may be a duplicate: harmless, since every claim is conditional and
a delivery of a finished task is only acknowledged. So several sweepers may run at once, in several processes:
each sends at most one message per task per pass.

Only the queue's own dead-lettering counts against a task. A task whose dead letter the sweeper has moved back
``max_attempts`` times since it was last claimed (and since an operator's last redrive) is not moved back again:
it goes to ``failed`` with the error ``stranded``, its dead letter stays where ``sdasync dlq list`` shows it and
``sdasync dlq redrive`` runs it again. Age never fails a task: one that merely waits behind a long backlog (a
fleet scaled to zero, an engine that is down) is re-sent at most once per ``requeue_after``, and not at all while
the queue holds at least as many waiting messages as there are such tasks (then they are most likely waiting in
line, not lost); a duplicate message costs a worker one cheap delivery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from sdasync.backends.base import DeadLetter, DeadLetterQueue
from sdasync.errors import SdasyncError, TaskConflict, TaskNotFound
from sdasync.models import AttemptRecord, Outcome, Task, TaskError, TaskStatus
from sdasync.service import Backends
from sdasync.worker.settle import deadline_changes, deadline_error, finishing, past_deadline

log = logging.getLogger(__name__)

#: Tasks read from the store per batch, and dead letters looked at per pass.
BATCH = 100
DEAD_LETTERS = 1000


@dataclass(frozen=True)
class SweepReport:
    """What one pass did: task ids requeued (a new message), redriven (their dead letters moved back), failed as
    stranded, and cancelled because their deadline had passed (``expired``); ``errors`` counts what a backend
    refused, left for the next pass."""

    requeued: tuple[str, ...] = ()
    redriven: tuple[str, ...] = ()
    stranded: tuple[str, ...] = ()
    errors: int = 0
    expired: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.requeued or self.redriven or self.stranded or self.expired or self.errors)


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
    expired: list[str] = field(default_factory=list)
    errors: int = 0

    def report(self) -> SweepReport:
        return SweepReport(requeued=tuple(self.requeued), redriven=tuple(self.redriven),
                           stranded=tuple(self.stranded), errors=self.errors, expired=tuple(self.expired))


#: The error a ``requeued`` record carries when the sweeper moved a dead letter back (age-based re-sends carry none).
DEAD_LETTERED = "dead_lettered"


def redrives_since_claim(task: Task) -> int:
    """How many times the sweeper has moved the task's dead letter back since its last claim (the records of the
    current attempt number) and since an operator's last redrive."""
    count = 0
    for entry in task.history:
        if entry.outcome is Outcome.REDRIVEN:
            count = 0
        elif entry.outcome is Outcome.REQUEUED and entry.attempt == task.attempts and entry.error is not None \
                and entry.error.code == DEAD_LETTERED:
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
    # Tasks waiting in line get no new message, but those past their deadline are still ended: one batch.
    waiting = status is TaskStatus.QUEUED and _probably_waiting(run, cutoff, limit)
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
            if past_deadline(task, run.now):
                _cancel_expired(run, task, lease=cutoff if task.status is TaskStatus.RUNNING else None)
            elif not waiting:
                _resend(run, task, lease_expired_before=cutoff,
                        send=partial(_send, run, task.task_id), done=run.requeued,
                        has_dead_letter=False)
        # Tasks requeued drop out of the next batch (their updated_at moved); ones that could not be would repeat.
        if waiting or len(batch) < limit or not fresh:
            return


def _probably_waiting(run: _Pass, cutoff: float, limit: int) -> bool:
    """True when the queue holds at least as many waiting messages as there are old queued tasks: they are most
    likely in line behind a backlog, and re-sending would only double it. Counted up to ``limit`` tasks."""
    try:
        found = run.backends.store.stale(status=TaskStatus.QUEUED, updated_before=cutoff, limit=limit)
        # Tasks this pass already gave a message (their dead letters moved back) are not counted, nor those
        # messages.
        old = len([task for task in found if task.task_id not in run.seen])
        if not old:
            return True
        depth = run.backends.queue.depth()
    except SdasyncError as exc:
        log.warning("sweeper: cannot compare old queued tasks with the queue's depth: %s", exc)
        run.errors += 1
        return True
    waiting = max(0, depth.visible + depth.delayed - len(run.redriven))
    if waiting >= old:
        log.info("sweeper: %d queued task(s) unchanged for over %.0f s, and %d message(s) waiting in the queue: "
                 "leaving them in line", old, run.requeue_after_s, waiting)
        return True
    return False


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
    if past_deadline(task, run.now):
        _cancel_expired(run, task, lease=lease)
        return
    if has_dead_letter and redrives_since_claim(task) >= run.max_attempts:
        _fail_stranded(run, task, lease=lease)
        return
    try:
        send()
    except SdasyncError as exc:
        log.warning("sweeper: cannot send a message for task %s: %s", task.task_id, exc)
        run.errors += 1
        return
    why = TaskError(DEAD_LETTERED, "the queue dead-lettered its message; the sweeper moved it back") \
        if has_dead_letter else None
    record = AttemptRecord(attempt=task.attempts, worker=None, started_at=None, ended_at=run.now,
                           outcome=Outcome.REQUEUED, error=why)
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


def _fail_stranded(run: _Pass, task: Task, *, lease: float | None) -> None:
    count = redrives_since_claim(task)
    error = TaskError("stranded", f"the queue dead-lettered the task's message {count + 1} times without a worker "
                                  f"taking it; giving up (sdasync dlq redrive runs it again)")
    record = AttemptRecord(attempt=task.attempts, worker=None, started_at=None, ended_at=run.now,
                           outcome=Outcome.FAILED, error=error)
    try:
        run.backends.store.transition(task.task_id, expected={task.status}, to=TaskStatus.FAILED,
                                      attempt=task.attempts, lease_expired_before=lease, changes=finishing(
                                          task, run.now, {"error": error, "finished_at": run.now,
                                                          "progress": None, "lease_until": None,
                                                          "history": (*task.history, record)}))
    except (TaskConflict, TaskNotFound):
        return  # it moved on meanwhile: it is not stranded after all
    except SdasyncError as exc:
        log.warning("sweeper: cannot fail stranded task %s: %s", task.task_id, exc)
        run.errors += 1
        return
    # Its dead letter stays where `sdasync dlq list` shows it and `dlq redrive` finds it.
    run.stranded.append(task.task_id)
    log.error("task %s failed: %s", task.task_id, error.message)


def _cancel_expired(run: _Pass, task: Task, *, lease: float | None) -> None:
    """``-> cancelled`` (reason deadline) instead of a new message: nobody waits for the answer any more. For a
    running task, fenced on its lease still being expired and its attempt, whose history record this writes."""
    run.seen.add(task.task_id)
    history = task.history
    if task.status is TaskStatus.RUNNING:
        history = (*history, AttemptRecord(attempt=task.attempts, worker=task.worker, started_at=task.started_at,
                                           ended_at=run.now, outcome=Outcome.CANCELLED, error=deadline_error(task)))
    try:
        run.backends.store.transition(task.task_id, expected={task.status}, to=TaskStatus.CANCELLED,
                                      attempt=task.attempts, lease_expired_before=lease,
                                      changes=deadline_changes(task, run.now, history=history))
    except (TaskConflict, TaskNotFound):
        return  # it moved on meanwhile (claimed, cancelled, finished): its new state settles it
    except SdasyncError as exc:
        log.warning("sweeper: cannot cancel task %s past its deadline: %s", task.task_id, exc)
        run.errors += 1
        return
    # A dead letter it may have stays: a delivery of a cancelled task is only acknowledged.
    run.expired.append(task.task_id)
    log.info("task %s cancelled by the sweeper: its deadline passed", task.task_id)
