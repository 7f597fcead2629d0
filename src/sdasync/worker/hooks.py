"""What a worker lets others plug in, and the blob keys of a task's results.

- ``StartGate``: the running cap. The worker asks it before claiming a task and tells it when the attempt ends,
  whatever the outcome (``auth/quotas.py`` implements it over the task store's records).
- ``EventSink``: the ``start`` and ``progress`` webhook events, which the worker sends directly and best effort
  (``webhooks/direct.py``). ``completed`` is not among them: it goes through the outbox, in the final write.
- ``result_key``: where an attempt writes its images, for the worker to write and the API to find.
"""

from __future__ import annotations

import logging
from typing import Protocol

from sdasync.models import Task

log = logging.getLogger(__name__)


class StartGate(Protocol):
    """Whether a task may start now, given what else of its tenant runs."""

    def enter(self, task: Task) -> float | None:
        """None: the task may start now and holds a slot until ``leave``; else the seconds to wait before asking
        again (the worker hands the message back with that delay, the task stays queued). Raises BackendError
        (the delivery is then left to reappear)."""
        ...

    def leave(self, task: Task) -> None:
        """The task's attempt has ended (whatever the outcome): its slot is free. Raises BackendError; a slot
        that was not freed must not hold forever (the implementation's windows expire)."""
        ...


class EventSink(Protocol):
    """Where the worker reports a task's start and progress. Implementations must return at once (queue the
    event, send it from their own thread): they are called from the loop and from the engine's progress
    callback. The worker still guards itself against one that raises (``SafeEvents``)."""

    def start(self, task: Task) -> None: ...

    def progress(self, task: Task, fraction: float, step: int, steps: int) -> None: ...


class SafeEvents:
    """An EventSink that never raises into the worker: best effort means a broken sink costs a log line, not a
    task. Logs the first failure of each kind at WARNING, later ones at DEBUG, so a dead sink cannot flood the
    log with a line per progress step."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self._warned: set[str] = set()

    def start(self, task: Task) -> None:
        try:
            self.sink.start(task)
        except Exception as exc:  # any failure of a best-effort sink is the sink's, never the task's
            self._failed("start", task, exc)

    def progress(self, task: Task, fraction: float, step: int, steps: int) -> None:
        try:
            self.sink.progress(task, fraction, step, steps)
        except Exception as exc:  # as above
            self._failed("progress", task, exc)

    def _failed(self, event: str, task: Task, exc: Exception) -> None:
        level = logging.DEBUG if event in self._warned else logging.WARNING
        self._warned.add(event)
        log.log(level, "task %s: %s event not sent: %s: %s", task.task_id, event, type(exc).__name__, exc)


def result_key(task: Task, index: int) -> str:
    """The blob key of a task's ``index``-th image: ``<tenant>/<taskId>/<n>.png``, or ``<taskId>/<n>.png`` for
    tasks without a tenant. Deterministic, so a retried attempt overwrites the keys of the one before it, and
    prefixed by the tenant, so one tenant's results are a prefix an operator (or a bucket policy) can scope."""
    if index < 0:
        raise ValueError(f"image index must be >= 0, not {index}")
    return f"{task.tenant}/{task.task_id}/{index}.png" if task.tenant else f"{task.task_id}/{index}.png"
