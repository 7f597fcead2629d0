"""One attempt's companions: the guard that keeps its lease and notices when it must stop, and its history record.

The guard ticks twice a second. Each tick reads the task, so a cancel (or a newer attempt taking over) is seen
within half a second and the engine, which polls ``interrupted`` between steps, stops within the 2 s promised.
Every third of the visibility timeout it extends both the message's visibility and the task's lease: one keeps
the queue from handing the message to another worker, the other keeps another worker's claim from succeeding if
the message comes back anyway (a duplicate delivery, a failed extend).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from sdasync.backends.base import Queue, TaskStore
from sdasync.engines.base import Progress
from sdasync.errors import ReceiptInvalid, SdasyncError, TaskConflict
from sdasync.models import Task, TaskError, TaskStatus
from sdasync.worker.faults import fault_point

log = logging.getLogger(__name__)

#: History outcomes that use up one of a task's attempts. A ``released`` attempt (drain, spot notice, engine down)
#: was the worker's doing, not the task's, and costs nothing.
COUNTED = frozenset({"retried", "failed", "lost"})
#: Why a running attempt was told to stop.
CANCELLED, FENCED, DRAIN = "cancelled", "fenced", "drain"


def record(task: Task, outcome: str, *, error: TaskError | None = None, now: float | None = None,
           attempt: int | None = None, worker: str | None = None) -> dict[str, Any]:
    return {"attempt": task.attempts if attempt is None else attempt, "worker": worker or task.worker,
            "startedAt": task.started_at, "endedAt": time.time() if now is None else now, "outcome": outcome,
            "error": error.to_dict() if error else None}


def used_attempts(history: Iterable[Mapping[str, Any]]) -> int:
    """Attempts that count against ``--max-attempts``: since the operator's last redrive, if any."""
    used = 0
    for entry in history:
        if entry.get("outcome") == "redriven":
            used = 0
        elif entry.get("outcome") in COUNTED:
            used += 1
    return used


class AttemptGuard:
    def __init__(self, *, queue: Queue, store: TaskStore, task: Task, receipt: str, visibility_timeout_s: float,
                 progress_interval_s: float = 1.0, tick_s: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.store = store
        self.task = task
        self.receipt = receipt
        self.visibility_timeout_s = visibility_timeout_s
        self.progress_interval_s = progress_interval_s
        self.tick_s = tick_s
        self.clock = clock
        #: Why the attempt must stop (CANCELLED, FENCED, DRAIN), or None.
        self.reason: str | None = None
        self._interrupted = threading.Event()
        self._stop = threading.Event()
        self._last_progress = 0.0
        self._thread = threading.Thread(target=self._run, name="sdasync-attempt-guard", daemon=True)

    @property
    def attempt(self) -> int:
        return self.task.attempts

    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    def interrupt(self, reason: str) -> None:
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
            self.interrupt(CANCELLED)
        elif current.status is not TaskStatus.RUNNING or current.attempts != self.attempt:
            self.interrupt(FENCED)

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
        self._write({"progress": {"fraction": round(progress.fraction, 4), "step": progress.step,
                                  "steps": progress.steps, "etaSeconds": progress.eta_s}})

    def _write(self, changes: dict[str, Any]) -> None:
        try:
            self.store.transition(self.task.task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.RUNNING,
                                  attempt=self.attempt, changes=changes)
        except TaskConflict as exc:
            if isinstance(exc.current, Task):
                self._judge(exc.current)
            else:
                self.interrupt(FENCED)
        except SdasyncError as exc:
            log.warning("task %s: %s not written: %s", self.task.task_id, ", ".join(changes), exc)
