"""Per-task progress and cancellation for one WebUI generation, beside its blocking POST.

The WebUI answers ``POST /sdapi/v1/txt2img`` only when the images are done, so everything that happens meanwhile
runs on a ``TaskMonitor`` thread:

- Every ``interval_s`` (0.5 s) it asks ``POST /internal/progress {"id_task": <task id>, "live_preview": false}``.
  That answer is per task (the ``force_task_id`` we send with the generation): ``active``, ``queued``,
  ``completed``, ``progress`` (a fraction of the whole job, all ``n_iter`` batches and the hires pass included) and
  ``eta`` (seconds). While our task is active, the fraction is turned into steps of the payload and passed to
  ``on_progress`` each time the step count grows. ``on_progress`` is therefore called from this thread.
- Every ``CANCEL_CHECK_S`` (0.1 s) it calls ``is_cancelled``; when that turns True it polls at once and, if our task
  is the active one, calls ``POST /sdapi/v1/interrupt``. That route is global (it stops whatever runs), which is why
  it is sent only right after the per-task answer said "active" for our id. A queued task cannot be taken out of the
  WebUI's queue, so the cancel is remembered: the monitor keeps polling and interrupts our job as soon as it starts.
  The WebUI answers an interrupted job with 200 and the partial images; the engine turns that into
  GenerationCancelled.
- When the POST gives up waiting (a deadline or the read timeout), ``give_up`` turns the thread into a reaper: it
  interrupts our job if it is active, or waits (bounded) for it to leave the queue and interrupts it then, so an
  abandoned job does not hold the GPU.

A failed poll never fails the generation: it is logged (a warning once, then at debug) and the next poll tries
again. Once the POST is over (``finish``), no interrupt is ever sent: the next active job is someone else's.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from sdasync.engines.base import GenerationRequest, Progress

log = logging.getLogger(__name__)

PROGRESS_PATH = "/internal/progress"
INTERRUPT_PATH = "/sdapi/v1/interrupt"
#: How often ``is_cancelled`` is asked: it is a cheap local check, and it bounds the cancel latency.
CANCEL_CHECK_S = 0.1
#: A progress poll or interrupt call that takes longer than this is abandoned (the next poll tries again).
CALL_TIMEOUT = httpx.Timeout(2.0, connect=1.0)
#: A job still active this long after our interrupt gets another one (it may have been sent between two jobs'
#: state resets); less often would slow the cancel, more often would only add calls.
REINTERRUPT_S = 1.0


@dataclass(frozen=True)
class TaskState:
    """One answer of ``/internal/progress`` for our task."""

    active: bool
    queued: bool
    completed: bool
    #: Fraction of the whole job done, 0..1; None while not active.
    progress: float | None
    eta_s: float | None

    @classmethod
    def parse(cls, body: object) -> TaskState:
        """Raises ValueError when the body is not the documented shape."""
        if not isinstance(body, dict):
            raise ValueError(f"progress answer is not an object: {str(body)[:200]}")

        def number(key: str) -> float | None:
            value = body.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                return None
            return float(value)

        return cls(
            active=body.get("active") is True,
            queued=body.get("queued") is True,
            completed=body.get("completed") is True,
            progress=number("progress"),
            eta_s=number("eta"),
        )


def _count(payload: Mapping[str, Any], key: str, default: int) -> int:
    value = payload.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def total_steps(payload: Mapping[str, Any]) -> int:
    """Steps the WebUI's progress fraction stands for: ``steps`` per batch times ``n_iter`` batches, plus the hires
    pass (``hr_second_pass_steps``, 0 meaning as many as ``steps``), which the WebUI counts as a job of its own."""
    steps = _count(payload, "steps", 20)
    per_batch = steps
    if payload.get("enable_hr") is True:
        per_batch += _count(payload, "hr_second_pass_steps", steps)
    return per_batch * _count(payload, "n_iter", 1)


class TaskMonitor:
    """Polls one task's progress and carries out its cancel while its generation POST is in flight."""

    def __init__(
        self, client: httpx.Client, base_url: str, request: GenerationRequest, *, interval_s: float = 0.5
    ) -> None:
        self._client = client
        self._base_url = base_url
        self.task_id = request.task_id
        self._on_progress: Callable[[Progress], None] | None = request.on_progress
        self._is_cancelled = request.is_cancelled
        self._steps = total_steps(request.payload)
        self._interval_s = interval_s
        # Guards _finished and the decision to interrupt: finish() cannot return while an interrupt is being sent,
        # and after it returns none is sent (the WebUI's next job is not ours to stop).
        self._lock = threading.Lock()
        self._finished = False
        self._wake = threading.Event()
        self._cancel = threading.Event()
        self._reap_until: float | None = None
        self._last_step = 0
        self._last_interrupt: float | None = None
        self._failures = 0
        #: Interrupts sent for this task (for logs and tests).
        self.interrupts = 0
        self._thread = threading.Thread(target=self._run, name=f"webui-progress-{self.task_id}", daemon=True)

    @property
    def cancel_requested(self) -> bool:
        """Whether ``is_cancelled`` was seen True during the generation."""
        return self._cancel.is_set()

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> None:
        """The POST is over: stop polling, report nothing more, interrupt nothing more. Does not wait for the thread
        (it may be inside a poll); what it does afterwards is checked against ``_finished``."""
        with self._lock:
            self._finished = True
        self._wake.set()

    def report_done(self) -> None:
        """After a successful POST: report the last step, which polling (by flooring) never reports."""
        with self._lock:
            callback, step = self._on_progress, self._last_step
            self._last_step = self._steps
        if callback is not None and step < self._steps:
            callback(Progress(self._steps, self._steps, 0.0))

    def give_up(self, limit_s: float) -> None:
        """The POST stopped waiting, but the WebUI may still run or queue our job: interrupt it when it is (or
        becomes) active, for at most ``limit_s`` seconds. Returns at once; the thread does the work."""
        with self._lock:
            self._on_progress = None
            self._reap_until = time.monotonic() + limit_s
        self._wake.set()

    # --- the thread --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        next_poll = time.monotonic() + self._interval_s
        while True:
            woken = self._wake.wait(CANCEL_CHECK_S)
            self._wake.clear()
            with self._lock:
                finished, reap_until = self._finished, self._reap_until
            now = time.monotonic()
            if (finished and reap_until is None) or (reap_until is not None and now > reap_until):
                return
            try:
                if self._step(now >= next_poll or woken, reaping=reap_until is not None):
                    return
            except Exception:  # the monitor must outlive any surprise; the generation does not depend on it
                log.exception("task %s: progress monitor error", self.task_id)
            if woken or now >= next_poll:
                next_poll = now + self._interval_s

    def _step(self, poll_due: bool, *, reaping: bool) -> bool:
        """One tick; returns True when the thread has nothing left to do."""
        if not self._cancel.is_set() and self._cancelled():
            self._cancel.set()
            poll_due = True  # act on a cancel now, not at the next progress poll
        if not poll_due:
            return False
        if reaping and self._client.is_closed:
            return True  # the engine was closed: nobody is left to poll for
        state = self._poll()
        if state is None:
            return False
        if reaping:
            if state.active:
                return self._interrupt(force=True)
            # Still queued: wait for it to start. Completed or unknown: nothing of ours is left to stop.
            return not state.queued
        self._report(state)
        if self._cancel.is_set() and state.active:
            self._interrupt()
        return False

    def _cancelled(self) -> bool:
        if self._is_cancelled is None:
            return False
        try:
            return bool(self._is_cancelled())
        except Exception:
            log.exception("task %s: is_cancelled raised; treated as not cancelled", self.task_id)
            return False

    def _poll(self) -> TaskState | None:
        try:
            response = self._client.post(
                f"{self._base_url}{PROGRESS_PATH}",
                json={"id_task": self.task_id, "live_preview": False},
                timeout=CALL_TIMEOUT,
            )
            response.raise_for_status()
            return TaskState.parse(response.json())
        except Exception as exc:  # httpx errors, a closed client, a body of the wrong shape: all just "no news"
            self._failures += 1
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            log.log(level, "task %s: progress poll failed (%s: %s); generation continues without progress",
                    self.task_id, type(exc).__name__, exc)
            return None

    def _report(self, state: TaskState) -> None:
        if not state.active or state.progress is None:
            return
        # Floor: a step counts once it is done, and the last one only when the WebUI says the job is complete.
        step = min(self._steps, max(0, int(state.progress * self._steps)))
        with self._lock:
            callback = self._on_progress
            if self._finished or callback is None or step <= self._last_step:
                return
            self._last_step = step
            try:
                callback(Progress(step, self._steps, state.eta_s))
            except Exception:
                log.exception("task %s: on_progress raised; ignored", self.task_id)

    def _interrupt(self, *, force: bool = False) -> bool:
        """Interrupt the WebUI's current job, which the caller has just seen to be ours. ``force`` is for the
        reaper, which runs after the POST is over. Returns whether an interrupt was sent."""
        with self._lock:
            if self._finished and not force:
                return False
            now = time.monotonic()
            if not force and self._last_interrupt is not None and now - self._last_interrupt < REINTERRUPT_S:
                return False
            self._last_interrupt = now
            try:
                response = self._client.post(f"{self._base_url}{INTERRUPT_PATH}", timeout=CALL_TIMEOUT)
                response.raise_for_status()
            except Exception as exc:
                log.warning("task %s: interrupt failed (%s: %s); retrying while it runs",
                            self.task_id, type(exc).__name__, exc)
                self._last_interrupt = None
                return False
            self.interrupts += 1
            log.info("task %s: interrupted in the WebUI", self.task_id)
            return True
