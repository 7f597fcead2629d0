"""One attempt's companions: the guard that keeps its lease and notices when it must stop, and its history record.

The guard ticks twice a second. Each tick reads the task, so a cancel (or a newer attempt taking over) is seen
within half a second and the engine, which polls ``interrupted`` between steps, stops within the 2 s promised.
The task's deadline (an absolute time, so read on the wall clock) is checked at every tick and at every poll of
``interrupted``: past it, the engine stops at its next step.
Every third of the visibility timeout it extends both the message's visibility and the task's lease: one keeps
the queue from handing the message to another worker, the other keeps another worker's claim from succeeding if
the message comes back anyway (a duplicate delivery, a failed extend).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from sdasync.backends.base import Queue, TaskStore
from sdasync.engines.base import Progress
from sdasync.errors import ReceiptInvalid, SdasyncError, TaskConflict
from sdasync.models import COUNTED_OUTCOMES, AttemptRecord, Outcome, Task, TaskError, TaskProgress, TaskStatus
from sdasync.worker.faults import fault_point
from sdasync.worker.hooks import EventSink

log = logging.getLogger(__name__)


class GuardReason(enum.StrEnum):
    """Why a running attempt was told to stop."""

    #: The task was cancelled.
    CANCELLED = "cancelled"
    #: A newer attempt owns the task (this one's lease ran out and another worker claimed it).
    FENCED = "fenced"
    #: The worker's drain timeout ran out: the task is handed back.
    DRAIN = "drain"
    #: The task's deadline passed: it ends cancelled, with reason deadline.
    DEADLINE = "deadline"


class HandleOutcome(enum.StrEnum):
    """What ``Worker.handle`` did with one delivery (the worker's counters, and the tests' assertions)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRIED = "retried"
    #: Handed back without using an attempt (drain, engine down).
    RELEASED = "released"
    CANCELLED = "cancelled"
    #: A newer attempt owns the task: this one published nothing.
    FENCED = "fenced"
    #: The task was already finished: the message was acknowledged (or dead-lettered).
    DUPLICATE = "duplicate"
    #: The task is not written yet: the message comes back shortly.
    EARLY = "early"
    #: The task was never written: the message was dropped.
    ORPHAN = "orphan"
    #: A backend failed mid-way: the message is left to reappear.
    DEFERRED = "deferred"
    #: Another worker holds the task under a live lease: the message comes back when that lease would end.
    CONTENDED = "contended"
    #: The task's deadline passed (before its claim or during its attempt): it ended cancelled, nothing published.
    DEADLINE = "deadline"
    #: The start gate said wait (its tenant runs as many tasks as it may): the message comes back later, the task
    #: stays queued, no attempt is used.
    THROTTLED = "throttled"


def record(task: Task, outcome: Outcome, *, error: TaskError | None = None, now: float | None = None,
           attempt: int | None = None, worker: str | None = None, engine_s: float | None = None) -> AttemptRecord:
    return AttemptRecord(attempt=task.attempts if attempt is None else attempt, worker=worker or task.worker,
                         started_at=task.started_at, ended_at=time.time() if now is None else now,
                         outcome=outcome, error=error,
                         engine_s=None if engine_s is None else round(engine_s, 3))


def used_attempts(history: Iterable[AttemptRecord]) -> int:
    """Attempts that count against ``--max-attempts``: since the operator's last redrive, if any."""
    used = 0
    for entry in history:
        if entry.outcome is Outcome.REDRIVEN:
            used = 0
        elif entry.outcome in COUNTED_OUTCOMES:
            used += 1
    return used


class AttemptGuard:
    def __init__(self, *, queue: Queue, store: TaskStore, task: Task, receipt: str, visibility_timeout_s: float,
                 progress_interval_s: float = 1.0, tick_s: float = 0.5,
                 clock: Callable[[], float] = time.time, deadline: float | None = None,
                 events: EventSink | None = None) -> None:
        self.queue = queue
        self.store = store
        self.task = task
        self.receipt = receipt
        self.visibility_timeout_s = visibility_timeout_s
        self.progress_interval_s = progress_interval_s
        self.tick_s = tick_s
        self.clock = clock
        #: Epoch seconds (on ``clock``) by which the task must be finished, or None.
        self.deadline = deadline
        self.events = events
        #: Why the attempt must stop, or None.
        self.reason: GuardReason | None = None
        self._interrupted = threading.Event()
        self._stop = threading.Event()
        self._last_progress = 0.0
        self._thread = threading.Thread(target=self._run, name="sdasync-attempt-guard", daemon=True)

    @property
    def attempt(self) -> int:
        return self.task.attempts

    def interrupted(self) -> bool:
        # Checked here too, not only at the ticks: the engine polls this between steps, so the deadline is honoured
        # to within one step rather than one tick.
        self._check_deadline()
        return self._interrupted.is_set()

    def past_deadline(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def _check_deadline(self) -> None:
        if self.reason is None and self.past_deadline():
            log.info("task %s: its deadline passed; stopping the engine", self.task.task_id)
            self.interrupt(GuardReason.DEADLINE)

    def interrupt(self, reason: GuardReason) -> None:
        if self.reason is None:
            self.reason = reason
        self._interrupted.set()

    def __enter__(self) -> AttemptGuard:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=self.visibility_timeout_s)

    def _run(self) -> None:
        extend_every = self.visibility_timeout_s / 3
        next_extend = time.monotonic() + extend_every
        while not self._stop.wait(self.tick_s):
            self._check_deadline()
            if time.monotonic() >= next_extend:
                next_extend = time.monotonic() + extend_every
                self._extend()
            else:
                self._check()

    def _check(self) -> None:
        try:
            current = self.store.get(self.task.task_id)
        except SdasyncError as exc:
            log.debug("task %s: guard could not read the task: %s", self.task.task_id, exc)
            return
        self._judge(current)

    def _judge(self, current: Task) -> None:
        if current.status is TaskStatus.CANCELLED:
            self.interrupt(GuardReason.CANCELLED)
        elif current.status is not TaskStatus.RUNNING or current.attempts != self.attempt:
            self.interrupt(GuardReason.FENCED)

    def _extend(self) -> None:
        try:
            self.queue.extend(self.receipt, timeout_s=self.visibility_timeout_s)
        except ReceiptInvalid:
            # The message went to someone else; the task's lease still keeps them from claiming it.
            log.warning("task %s: message visibility lost; holding on by the task lease", self.task.task_id)
        except SdasyncError as exc:
            log.warning("task %s: visibility not extended: %s", self.task.task_id, exc)
        self._write({"lease_until": self.clock() + self.visibility_timeout_s})

    def report(self, progress: Progress) -> None:
        """The engine's progress callback: written at most once per interval, and a chance to notice a cancel."""
        fault_point("generating")
        now = time.monotonic()
        if now - self._last_progress < self.progress_interval_s and progress.step < progress.steps:
            return
        self._last_progress = now
        fraction = round(progress.fraction, 4)
        self._write({"progress": TaskProgress(fraction=fraction, step=progress.step, steps=progress.steps,
                                              eta_s=progress.eta_s)})
        if self.events is not None:
            # At the cadence of the progress writes, not per step; the sink rate-limits its webhooks further.
            self.events.progress(self.task, fraction, progress.step, progress.steps)

    def _write(self, changes: dict[str, Any]) -> None:
        try:
            self.store.transition(self.task.task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.RUNNING,
                                  attempt=self.attempt, changes=changes)
        except TaskConflict as exc:
            if isinstance(exc.current, Task):
                self._judge(exc.current)
            else:
                self.interrupt(GuardReason.FENCED)
        except SdasyncError as exc:
            log.warning("task %s: %s not written: %s", self.task.task_id, ", ".join(changes), exc)
