"""The worker loop. One message at a time, in this order, so a crash at any step loses nothing:

1. receive (the message is hidden for the visibility timeout)
2. a task past its deadline never runs: ``-> cancelled`` (reason deadline); one whose tenant runs as many tasks
   as it may waits: the start gate says how long, and the message comes back then (no attempt used)
3. claim: ``queued -> running``, or ``running -> running`` once the previous holder's lease has run out;
   conditional on the attempt number, which it increments, and on the lease
4. generate, while the attempt guard keeps the message hidden and the lease alive, and watches for a cancel,
   a takeover and the deadline
5. write the images under deterministic keys (``hooks.result_key``: a retry overwrites, never adds)
6. ``running -> succeeded`` conditional on this worker's attempt, with the image keys, the info and the
   ``completed`` webhook outbox, in one write (see ``settle.py``); unless the deadline passed meanwhile
7. only then acknowledge (delete) the message

A crash before 6 leaves the message to reappear after the visibility timeout; the next worker claims the task
again with a higher attempt number, which fences off any write the first one might still make.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from sdasync.backends.base import BlobStore, Message, Queue, TaskStore
from sdasync.engines.base import Engine, GenerationRequest
from sdasync.engines.deadline import default_deadline_s
from sdasync.errors import (
    BlobNotFound,
    EngineUnavailable,
    GenerationCancelled,
    SdasyncError,
    TaskConflict,
    TaskNotFound,
    UnexpectedError,
)
from sdasync.models import EngineHealth, Outcome, Task, TaskError, TaskProgress, TaskStatus
from sdasync.service import load_payload
from sdasync.worker.attempt import AttemptGuard, GuardReason, HandleOutcome, record, used_attempts
from sdasync.worker.engine_wait import EngineWatch
from sdasync.worker.faults import fault_error, fault_point
from sdasync.worker.hooks import EventSink, SafeEvents, StartGate, result_key
from sdasync.worker.options import WorkerConfig as WorkerConfig  # where its callers have always found it
from sdasync.worker.registry import Heartbeat, public_url
from sdasync.worker.settle import QUEUED_OR_RUNNING, Settle, deadline_error, past_deadline

log = logging.getLogger(__name__)

#: Exit status of a worker that stopped because its engine broke beyond repair: restart the process.
EXIT_ENGINE_BROKEN = 3
#: Deliveries of a message whose task does not exist before it is dropped (0.5 + 1 + 2 + 4 s of backoff).
ORPHAN_RECEIVES = 5


class Worker(Settle):
    def __init__(self, *, queue: Queue, store: TaskStore, blobs: BlobStore, engine: Engine,
                 config: WorkerConfig | None = None, on_busy: Callable[[bool], None] | None = None,
                 payloads: BlobStore | None = None, gate: StartGate | None = None,
                 events: EventSink | None = None) -> None:
        self.queue = queue
        #: The running cap: asked before each claim, told when each attempt ends. None: no cap.
        self.gate = gate
        #: Where ``start`` and ``progress`` events go (webhooks, best effort); never raises into the worker.
        self.events = None if events is None else SafeEvents(events)
        #: Told True when a task arrives and False when a receive comes back empty (ASG scale-in protection).
        self.on_busy = on_busy
        self.store = store
        self.blobs = blobs
        #: Where large request payloads live; callers that keep them with the results pass nothing.
        self.payloads = blobs if payloads is None else payloads
        self._engine = engine
        self.config = config or WorkerConfig()
        self.stop_event = threading.Event()
        self.counts: dict[HandleOutcome, int] = {}
        self.heartbeat = Heartbeat(store, worker_id=self.config.worker_id, engine_url=self.config.engine_url,
                                   snapshot=self._snapshot, interval_s=self.config.heartbeat_s)
        self.engine_watch = EngineWatch(engine, stop=self.stop_event,
                                        label=public_url(self.config.engine_url) or type(engine).__name__,
                                        probe_s=self.config.engine_probe_s, log_every_s=self.config.wait_log_s,
                                        on_change=self.heartbeat.nudge)
        #: What the worker process should exit with: 0, or EXIT_ENGINE_BROKEN.
        self.exit_code = 0
        #: Set while the engine is down: the loop probes it instead of receiving.
        self.engine_down = threading.Event()
        self._guard: AttemptGuard | None = None
        self._drain_timer: threading.Timer | None = None
        self._drain_deadline: float | None = None
        self._stop_lock = threading.Lock()
        #: Set when the drain timeout has run out: any running or starting attempt is handed back.
        self.drain_expired = threading.Event()

    @property
    def engine(self) -> Engine:
        return self._engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        # Tests swap the engine of a built worker; its watch must probe the same one.
        self._engine = self.engine_watch.engine = engine

    def request_stop(self, *, drain_timeout_s: float | None = None) -> None:
        """Stop receiving; let the current task finish within the drain timeout, else interrupt it and hand it
        back to the queue at once. Safe to call from a signal handler or another thread; a later call with an
        earlier deadline (a spot notice after a SIGTERM) moves the deadline up."""
        timeout = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        deadline = time.monotonic() + timeout
        with self._stop_lock:
            if self._drain_deadline is not None and self._drain_deadline <= deadline:
                return
            self._drain_deadline = deadline
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            self.stop_event.set()
            self._drain_timer = threading.Timer(timeout, self._drain_expired)
            self._drain_timer.daemon = True
            self._drain_timer.start()

    def _drain_expired(self) -> None:
        # The event first: an attempt that starts right now checks it after publishing its guard.
        self.drain_expired.set()
        guard = self._guard
        if guard is not None:
            log.warning("task %s: drain timeout reached", guard.task.task_id)
            guard.interrupt(GuardReason.DRAIN)

    def run(self, *, burst: bool = False, max_tasks: int | None = None, max_idle_s: float | None = None) -> int:
        """Process messages until stopped. ``burst``: leave when the queue has nothing visible; ``max_tasks``:
        leave after that many messages; ``max_idle_s``: leave after that long without one. Returns the number of
        messages handled."""
        handled = 0
        self.heartbeat.start()
        try:
            ready = self.engine_watch.ready or self.engine_watch.setup()
            idle_since = time.monotonic()
            if ready:
                log.info("worker %s ready", self.config.worker_id)
            while ready and not self.stop_event.is_set():
                if self.engine_down.is_set():
                    if self.engine_watch.wait_until_up():
                        self.engine_down.clear()
                    elif self.engine_watch.broken:
                        self.exit_code = EXIT_ENGINE_BROKEN
                        self.stop_event.set()
                    continue
                if max_tasks is not None and handled >= max_tasks:
                    break
                try:
                    messages = self.queue.receive(max_messages=1, wait_s=0 if burst else self.config.wait_s,
                                                  visibility_timeout_s=self.config.visibility_timeout_s)
                except SdasyncError as exc:
                    log.warning("receive failed: %s", exc)
                    self.stop_event.wait(self.config.wait_s)
                    continue
                if self.stop_event.is_set():
                    # Asked to stop while waiting: give back what just arrived instead of starting it.
                    for message in messages:
                        self.queue.nack(message.receipt, delay_s=0)
                    break
                if self.on_busy is not None:
                    self.on_busy(bool(messages))
                if not messages:
                    if burst or (max_idle_s is not None and time.monotonic() - idle_since >= max_idle_s):
                        break
                    continue
                for message in messages:
                    self.handle(message)
                    handled += 1
                idle_since = time.monotonic()
        finally:
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            self.heartbeat.stop()
        log.info("worker %s stopping after %d message(s): %s", self.config.worker_id, handled,
                 {str(k): v for k, v in self.counts.items()})
        return handled

    def _snapshot(self) -> tuple[EngineHealth, str | None]:
        """The registry record's engine health and task, from the heartbeat thread."""
        guard = self._guard
        return self.engine_watch.current(), (guard.task.task_id if guard else None)

    def _count(self, outcome: HandleOutcome) -> HandleOutcome:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        return outcome

    def handle(self, message: Message) -> HandleOutcome:
        """Process one delivery; returns what happened. Never raises for a task's failure."""
        fault_point("received")
        try:
            return self._count(self._handle(message))
        except SdasyncError as exc:
            # A backend failed mid-way: leave the message to reappear; the attempt number keeps the retry safe.
            log.warning("message %s left for redelivery: %s", message.message_id, exc)
            return self._count(HandleOutcome.DEFERRED)
        except Exception:  # a bug must not take the worker down with the task: the lease recovers it
            log.exception("message %s: unexpected error; left for redelivery", message.message_id)
            return self._count(HandleOutcome.DEFERRED)

    def _handle(self, message: Message) -> HandleOutcome:
        try:
            task = self.store.get(message.body)
        except TaskNotFound:
            return self._unknown_task(message)
        if task.status is TaskStatus.FAILED:
            # Every failed task's message belongs in the dead-letter queue (where `dlq redrive` finds it); this
            # delivery may be the one whose dead-lettering failed.
            self.queue.dead_letter(message.receipt, reason=task.error.code if task.error else "failed")
            return HandleOutcome.DUPLICATE
        if task.status.is_terminal:
            self.queue.ack(message.receipt)
            return HandleOutcome.DUPLICATE
        now = time.time()
        history = task.history
        abandoned = task.status is TaskStatus.RUNNING and (task.lease_until is None or task.lease_until < now)
        if past_deadline(task, now):
            if task.status is TaskStatus.RUNNING and not abandoned:
                # Its holder is alive: its guard stops it at the deadline. Look again once its lease would end.
                self._requeue(message, delay_s=max(1.0, (task.lease_until or now) - now + 1.0))
                return HandleOutcome.CONTENDED
            if abandoned:
                # Its attempt died holding it; the deadline, not the crash, is what ends the task.
                history = (*history, record(task, Outcome.CANCELLED, error=deadline_error(task), now=now))
            return self._cancel_for_deadline(task, message, history=history, ours=False)
        if abandoned:
            # Its holder stopped renewing the lease: that attempt died (a crash, a kill, a lost machine).
            history = (*history, record(task, Outcome.LOST, now=now))
        if used_attempts(history) >= self.config.max_attempts:
            error = TaskError("attempts_exhausted", f"the task failed {used_attempts(history)} times")
            return self._finish_failed(task, message, error, history=history, lease_expired_before=now)
        wait = None if self.gate is None else self.gate.enter(task)
        if wait is not None:
            # Its tenant runs as many tasks as it may. Nothing is written: the task stays queued as it was. Back
            # by its deadline at the latest, so that a task which will not run in time ends then, not later.
            deadline = task.deadline
            self._requeue(message, delay_s=max(0.0, wait if deadline is None else min(wait, deadline - now)))
            return HandleOutcome.THROTTLED
        try:
            try:
                claimed = self.store.transition(
                    task.task_id, expected=QUEUED_OR_RUNNING, to=TaskStatus.RUNNING, attempt=task.attempts,
                    lease_expired_before=now, changes={
                        "attempts": task.attempts + 1, "started_at": now, "worker": self.config.worker_id,
                        "progress": None, "lease_until": now + self.config.visibility_timeout_s,
                        "history": history})
            except TaskConflict as exc:
                return self._lost_claim(message, exc)
            fault_point("claimed")
            if self.events is not None:
                self.events.start(claimed)
            return self._run(claimed, message)
        finally:
            if self.gate is not None:
                _leave(self.gate, task)
    def _unknown_task(self, message: Message) -> HandleOutcome:
        """The API sends a task's message before it writes the task (see ``TaskService.submit``): a message can
        arrive a moment early, or name a task whose write failed. Look again a few times, then drop it."""
        if message.receive_count < ORPHAN_RECEIVES:
            self.queue.nack(message.receipt, delay_s=min(0.5 * 2.0 ** (message.receive_count - 1), 30.0))
            return HandleOutcome.EARLY
        log.warning("message %s names task %s, which was never written; dropping it", message.message_id,
                    message.body)
        self.queue.ack(message.receipt)
        return HandleOutcome.ORPHAN

    def _run(self, task: Task, message: Message) -> HandleOutcome:
        try:
            payload = load_payload(task, self.payloads, results=self.blobs)
        except (BlobNotFound, ValueError) as exc:
            error = TaskError("payload_missing", f"the request's payload cannot be read from the blob store: {exc}")
            return self._finish_failed(task, message, error, history=(*task.history, record(task, Outcome.FAILED)),
                                       attempt=task.attempts)
        except SdasyncError as exc:
            return self._failed_attempt(task, message, exc)
        guard = AttemptGuard(queue=self.queue, store=self.store, task=task, receipt=message.receipt,
                             visibility_timeout_s=self.config.visibility_timeout_s,
                             progress_interval_s=self.config.progress_interval_s, deadline=task.deadline,
                             events=self.events)
        deadline = self.config.generation_timeout_s or default_deadline_s(payload)
        request = GenerationRequest(task_id=task.task_id, api=task.api, payload=payload, on_progress=guard.report,
                                    is_cancelled=guard.interrupted, deadline_s=deadline)
        log.info("task %s attempt %d: generating", task.task_id, task.attempts)
        self._guard = guard
        if self.drain_expired.is_set():
            guard.interrupt(GuardReason.DRAIN)  # the drain timeout ran out as this attempt began
        #: Seconds in engine.generate (the task's GPU time); None until the engine has been called.
        engine_s: float | None = None
        keys: tuple[str, ...] = ()
        try:
            with guard:
                try:
                    started = time.monotonic()
                    try:
                        result = self.engine.generate(request)
                    finally:
                        engine_s = time.monotonic() - started
                    keys = tuple(result_key(task, i) for i in range(len(result.images)))
                    for key, png in zip(keys, result.images, strict=True):
                        fault_error("upload")
                        self.blobs.put(key, png, content_type="image/png")
                except GenerationCancelled:
                    return self._interrupted(task, message, guard.reason, engine_s=engine_s)
                except SdasyncError as exc:
                    return self._failed_attempt(task, message, exc, engine_s=engine_s)
                except Exception as exc:  # an engine bug or a library error: retried like any transient failure
                    log.exception("task %s attempt %d: unexpected error", task.task_id, task.attempts)
                    return self._failed_attempt(task, message, UnexpectedError(f"{type(exc).__name__}: {exc}"),
                                                engine_s=engine_s)
        finally:
            self._guard = None
        fault_point("uploaded")
        outcome = self._succeed(task, message, keys=keys, engine_s=engine_s,
                                changes={"info": result.info, "progress": _done(payload)})
        if outcome is HandleOutcome.SUCCEEDED:
            fault_point("completed")
            self.queue.ack(message.receipt)
            log.info("task %s succeeded with %d image(s)", task.task_id, len(keys))
        return outcome

    def _interrupted(self, task: Task, message: Message, reason: GuardReason | None, *,
                     engine_s: float | None) -> HandleOutcome:
        match reason:
            case GuardReason.DRAIN:
                return self._release(task, message, "the worker was stopped", engine_s=engine_s)
            case GuardReason.DEADLINE:
                attempt = record(task, Outcome.CANCELLED, error=deadline_error(task), engine_s=engine_s)
                return self._cancel_for_deadline(task, message, history=(*task.history, attempt), ours=True)
            case GuardReason.CANCELLED | GuardReason.FENCED:
                return self._after_conflict(task, message, keys=())
            case None:
                # Someone else interrupted the engine (a global WebUI interrupt): retry like any transient failure.
                error = UnexpectedError("the engine stopped the generation unasked")
                return self._failed_attempt(task, message, error, engine_s=engine_s)

    def _failed_attempt(self, task: Task, message: Message, exc: SdasyncError, *,
                        engine_s: float | None = None) -> HandleOutcome:
        error = TaskError(exc.code, exc.message)
        if past_deadline(task, time.time()):
            # A retry would only be cancelled at its claim: end the task now, as its deadline says.
            attempt = record(task, Outcome.CANCELLED, error=deadline_error(task), engine_s=engine_s)
            return self._cancel_for_deadline(task, message, history=(*task.history, attempt), ours=True)
        health = self.engine_watch.health() if isinstance(exc, EngineUnavailable) else None
        if health is not None and not health.ok:
            # The engine is down, not this task: hand the task back and wait for the engine.
            self.engine_watch.went_down(health)
            self.engine_down.set()
            log.error("engine down (%s); task %s handed back", exc, task.task_id)
            return self._release(task, message, f"engine down: {exc.message}", engine_s=engine_s)
        used = used_attempts(task.history) + 1
        if exc.retryable and used < self.config.max_attempts and not self._last_delivery(message):
            delay = self.backoff_s(used)
            log.warning("task %s attempt %d failed (%s), retrying in %.1f s", task.task_id, task.attempts, exc,
                        delay)
            try:
                self.store.transition(task.task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.QUEUED,
                                      attempt=task.attempts, changes={
                                          "error": error, "progress": None, "lease_until": None,
                                          "history": (*task.history, record(task, Outcome.RETRIED, error=error,
                                                                            engine_s=engine_s))})
            except TaskConflict:
                return self._after_conflict(task, message, keys=())
            self._requeue(message, delay_s=delay)
            return HandleOutcome.RETRIED
        if exc.retryable:
            error = TaskError(exc.code, f"{exc.message} (gave up after {used} attempts)")
        log.error("task %s failed: %s", task.task_id, error.message)
        history = (*task.history, record(task, Outcome.FAILED, error=error, engine_s=engine_s))
        return self._finish_failed(task, message, error, history=history, attempt=task.attempts)

    def backoff_s(self, attempt: int) -> float:
        """Exponential backoff with full jitter: spreads retries of a burst of failures over time."""
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def _leave(gate: StartGate, task: Task) -> None:
    try:
        gate.leave(task)
    except Exception as exc:  # the outcome is settled already; a slot not freed expires by itself
        log.warning("task %s: the start gate was not told the attempt ended: %s", task.task_id, exc)


def _done(payload: dict[str, Any]) -> TaskProgress:
    steps = int(payload.get("steps", 0))
    return TaskProgress(fraction=1.0, step=steps, steps=steps, eta_s=0.0)
