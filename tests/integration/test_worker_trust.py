"""The worker's part of issue 9 on the real embedded backends (SQLite queue and store, files) with the fake engine:
deadlines, the running cap's start gate, the outbox in final writes, GPU-seconds, tenant blob keys, event hooks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helpers import wait_until
from sdasync.backends.base import BlobStore
from sdasync.config import Settings
from sdasync.engines.base import GenerationRequest, GenerationResult
from sdasync.engines.fake import FakeEngine
from sdasync.errors import BlobNotFound, EngineRejected, EngineUnavailable
from sdasync.models import Api, Outcome, Task, TaskStatus
from sdasync.outbox import Event, OutboxState, WebhookSpec
from sdasync.service import Backends, open_backends
from sdasync.worker.attempt import HandleOutcome
from sdasync.worker.hooks import result_key
from sdasync.worker.loop import Worker, WorkerConfig

PAYLOAD = {"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64, "batch_size": 2, "seed": 7}


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Backends]:
    with open_backends(Settings(data_dir=tmp_path)) as opened:
        yield opened


def put_task(backends: Backends, *, deadline: float | None = None, tenant: str = "",
             events: frozenset[Event] | None = None, payload: dict[str, Any] | None = None) -> Task:
    """A task as the API stores one (message first, then the task), with the extras of issue 9."""
    extra: dict[str, Any] = {}
    if deadline is not None:
        extra["deadline"] = deadline
    if events is not None:
        extra["webhook"] = WebhookSpec(url="https://hooks.example.test/in", events=events).to_dict()
    task = Task.new(Api.TXT2IMG, dict(payload or PAYLOAD), tenant=tenant, extra=extra)
    backends.queue.send(task.task_id)
    backends.store.create(task)
    return task


def make_worker(backends: Backends, engine: Any, **kwargs: Any) -> Worker:
    config = WorkerConfig(visibility_timeout_s=5, max_attempts=3, wait_s=0.05, backoff_base_s=0.01,
                          backoff_max_s=0.02, progress_interval_s=0)
    return Worker(queue=backends.queue, store=backends.store, blobs=backends.blobs, payloads=backends.payloads,
                  engine=engine, config=config, **kwargs)


def drain(worker: Worker) -> None:
    worker.run(max_idle_s=0.3, max_tasks=50)


def no_message_left(backends: Backends) -> bool:
    depth = backends.queue.depth()
    return (depth.visible, depth.in_flight, depth.delayed) == (0, 0, 0)


@dataclass
class CountingGate:
    """A start gate with a cap on tasks running at once, counting every call."""

    cap: int = 1
    wait_s: float = 5.0
    active: set[str] = field(default_factory=set)
    enters: list[str] = field(default_factory=list)
    leaves: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, task: Task) -> float | None:
        with self.lock:
            self.enters.append(task.task_id)
            if len(self.active - {task.task_id}) >= self.cap:
                return self.wait_s
            self.active.add(task.task_id)
            return None

    def leave(self, task: Task) -> None:
        with self.lock:
            self.leaves.append(task.task_id)
            self.active.discard(task.task_id)


@dataclass
class RecordingSink:
    started: list[Task] = field(default_factory=list)
    reports: list[tuple[str, float, int, int]] = field(default_factory=list)

    def start(self, task: Task) -> None:
        self.started.append(task)

    def progress(self, task: Task, fraction: float, step: int, steps: int) -> None:
        self.reports.append((task.task_id, fraction, step, steps))


class FailingFirst(FakeEngine):
    """Fails its first ``n`` calls after spending ``seconds`` in them, like an engine that dies late."""

    def __init__(self, n: int, error: Exception, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n, self.error = n, error

    def generate(self, request: GenerationRequest) -> GenerationResult:
        result = super().generate(request)
        if self.calls <= self.n:
            raise self.error
        return result


# -- deadlines --------------------------------------------------------------------------------------------------

def test_a_queued_task_past_its_deadline_is_cancelled_and_never_runs(backends: Backends) -> None:
    task = put_task(backends, deadline=time.time() - 1)
    engine = FakeEngine()
    worker = make_worker(backends, engine)
    drain(worker)
    done = backends.store.get(task.task_id)
    assert engine.calls == 0
    assert done.status is TaskStatus.CANCELLED
    assert done.error is not None and done.error.code == "deadline"
    assert done.finished_at is not None and done.attempts == 0 and done.history == ()
    assert worker.counts == {HandleOutcome.DEADLINE: 1}
    assert no_message_left(backends)


def test_a_task_abandoned_past_its_deadline_is_cancelled_not_retried(backends: Backends) -> None:
    task = put_task(backends, deadline=time.time() - 1)
    # Attempt 1 claimed it and died: its lease has run out, and so has the deadline.
    backends.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING, attempt=0,
                              changes={"attempts": 1, "worker": "gone", "lease_until": time.time() - 1})
    engine = FakeEngine()
    drain(make_worker(backends, engine))
    done = backends.store.get(task.task_id)
    assert engine.calls == 0
    assert done.status is TaskStatus.CANCELLED and done.lease_until is None
    assert [(h.outcome, h.worker, h.error.code if h.error else None) for h in done.history] == [
        (Outcome.CANCELLED, "gone", "deadline")]
    assert no_message_left(backends)


def test_a_running_task_is_interrupted_at_its_deadline_and_publishes_nothing(backends: Backends) -> None:
    deadline = time.time() + 1.0
    task = put_task(backends, deadline=deadline, payload={**PAYLOAD, "steps": 60})
    engine = FakeEngine(seconds=30)  # far longer than the deadline allows
    worker = make_worker(backends, engine)
    started = time.monotonic()
    drain(worker)
    assert time.monotonic() - started < 10  # stopped at the deadline, not after 30 s
    done = backends.store.get(task.task_id)
    assert engine.calls == 1
    assert done.status is TaskStatus.CANCELLED
    assert done.error is not None and done.error.code == "deadline"
    assert done.images == () and done.progress is None and done.lease_until is None
    assert done.finished_at is not None and done.finished_at >= deadline
    last = done.history[-1]
    assert last.outcome is Outcome.CANCELLED and last.error is not None and last.error.code == "deadline"
    assert last.engine_s is not None and 0.5 < last.engine_s < 10
    assert worker.counts == {HandleOutcome.DEADLINE: 1}
    for index in range(2):
        with pytest.raises(BlobNotFound):
            backends.blobs.get(result_key(done, index))
    assert no_message_left(backends)


class SlowBlobs:
    """The results store, whose writes last until ``until`` has passed on the wall clock."""

    def __init__(self, inner: BlobStore, until: float) -> None:
        self.inner, self.until = inner, until

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put(self, key: str, data: bytes, *, content_type: str = "image/png") -> None:
        self.inner.put(key, data, content_type=content_type)
        wait_until(lambda: time.time() > self.until, timeout=5)


def test_a_deadline_passing_during_the_upload_wins_over_the_success(backends: Backends) -> None:
    deadline = time.time() + 0.5
    task = put_task(backends, deadline=deadline)
    worker = make_worker(backends, FakeEngine())
    worker.blobs = SlowBlobs(backends.blobs, until=deadline)
    drain(worker)
    done = backends.store.get(task.task_id)
    assert done.status is TaskStatus.CANCELLED
    assert done.error is not None and done.error.code == "deadline"
    assert done.images == ()
    for index in range(2):  # uploaded, then deleted: nothing of the attempt is left
        with pytest.raises(BlobNotFound):
            backends.blobs.get(result_key(done, index))
    assert no_message_left(backends)


def test_a_task_with_a_later_deadline_succeeds(backends: Backends) -> None:
    task = put_task(backends, deadline=time.time() + 60)
    drain(make_worker(backends, FakeEngine()))
    assert backends.store.get(task.task_id).status is TaskStatus.SUCCEEDED


# -- the start gate ---------------------------------------------------------------------------------------------

def test_a_gate_that_says_wait_leaves_the_task_queued_and_its_message_delayed(backends: Backends) -> None:
    task = put_task(backends)
    gate = CountingGate(cap=1, wait_s=5.0, active={"another-task"})
    engine = FakeEngine()
    worker = make_worker(backends, engine, gate=gate)
    assert worker.handle(backends.queue.receive(visibility_timeout_s=5)[0]) is HandleOutcome.THROTTLED
    after = backends.store.get(task.task_id)
    assert after == backends.store.get(task.task_id) and after.updated_at == task.updated_at  # nothing written
    assert (after.status, after.attempts, after.history) == (TaskStatus.QUEUED, 0, ())
    assert engine.calls == 0
    assert (gate.enters, gate.leaves) == ([task.task_id], [])  # no slot was taken, so none is given back
    assert backends.queue.receive(visibility_timeout_s=5) == []  # delayed, not visible
    assert backends.queue.depth().in_flight + backends.queue.depth().delayed == 1


def test_a_throttled_task_runs_once_its_tenant_has_a_free_slot(backends: Backends) -> None:
    task = put_task(backends)
    gate = CountingGate(cap=1, wait_s=0.2, active={"another-task"})
    worker = make_worker(backends, FakeEngine(), gate=gate)
    thread = threading.Thread(target=lambda: worker.run(max_idle_s=3, max_tasks=20), daemon=True)
    thread.start()
    wait_until(lambda: worker.counts.get(HandleOutcome.THROTTLED, 0) >= 2, timeout=5)
    assert backends.store.get(task.task_id).status is TaskStatus.QUEUED
    gate.leave(Task.new(Api.TXT2IMG, {}, task_id="another-task"))
    wait_until(lambda: backends.store.get(task.task_id).status is TaskStatus.SUCCEEDED, timeout=5)
    worker.request_stop()
    thread.join(10)
    assert backends.store.get(task.task_id).attempts == 1
    assert gate.active == set()


def test_the_gate_is_left_whatever_the_attempt_ends_with(backends: Backends) -> None:
    # First in line, so that it is claimed before its deadline and interrupted by it.
    late = put_task(backends, deadline=time.time() + 1.5, payload={**PAYLOAD, "steps": 60})
    ok = put_task(backends)
    rejected = put_task(backends)
    retried = put_task(backends)
    gate = CountingGate(cap=1)

    class Mixed(FakeEngine):
        blipped = False
        held: list[bool] = []

        def generate(self, request: GenerationRequest) -> GenerationResult:
            self.held.append(gate.active == {request.task_id})  # the slot is held while the engine runs
            if request.task_id == rejected.task_id:
                raise EngineRejected("unknown sampler")
            if request.task_id == retried.task_id and not self.blipped:
                self.blipped = True
                raise EngineUnavailable("a blip")
            self.seconds = 30.0 if request.task_id == late.task_id else 0.0
            return super().generate(request)

    engine = Mixed()
    drain(make_worker(backends, engine, gate=gate))
    statuses = {t.task_id: backends.store.get(t.task_id).status for t in (ok, rejected, late, retried)}
    assert statuses == {ok.task_id: TaskStatus.SUCCEEDED, rejected.task_id: TaskStatus.FAILED,
                        late.task_id: TaskStatus.CANCELLED, retried.task_id: TaskStatus.SUCCEEDED}
    assert engine.held == [True] * 5  # four tasks, one of them twice (its retry)
    assert gate.active == set()
    assert sorted(gate.enters) == sorted(gate.leaves) and len(gate.enters) == 5  # every slot taken was given back


def test_a_throttled_task_comes_back_by_its_deadline_and_ends_then(backends: Backends) -> None:
    task = put_task(backends, deadline=time.time() + 0.5)
    gate = CountingGate(cap=1, wait_s=60.0, active={"another-task"})
    worker = make_worker(backends, FakeEngine(), gate=gate)
    started = time.monotonic()
    worker.run(max_idle_s=1.5, max_tasks=10)
    assert time.monotonic() - started < 10  # not after the gate's 60 s
    done = backends.store.get(task.task_id)
    assert done.status is TaskStatus.CANCELLED and done.error is not None and done.error.code == "deadline"
    assert worker.counts == {HandleOutcome.THROTTLED: 1, HandleOutcome.DEADLINE: 1}
    assert no_message_left(backends)


def test_a_gate_that_fails_to_take_the_slot_back_costs_no_task(backends: Backends,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    task = put_task(backends)

    class Sticky(CountingGate):
        def leave(self, task: Task) -> None:
            raise RuntimeError("records down")

    drain(make_worker(backends, FakeEngine(), gate=Sticky()))
    assert backends.store.get(task.task_id).status is TaskStatus.SUCCEEDED
    assert "start gate was not told" in caplog.text


# -- the outbox -------------------------------------------------------------------------------------------------

def test_terminal_writes_carry_the_outbox_exactly_when_subscribed(backends: Backends) -> None:
    done_ok = put_task(backends, events=frozenset({Event.COMPLETED}))
    done_failed = put_task(backends, events=frozenset(Event), payload={**PAYLOAD, "sampler_name": "bad"})
    done_late = put_task(backends, events=frozenset({Event.COMPLETED}), deadline=time.time() - 1)
    start_only = put_task(backends, events=frozenset({Event.START}))
    plain = put_task(backends)

    class Picky(FakeEngine):
        def generate(self, request: GenerationRequest) -> GenerationResult:
            if request.payload.get("sampler_name") == "bad":
                raise EngineRejected("unknown sampler")
            return super().generate(request)

    before = time.time()
    drain(make_worker(backends, Picky()))
    expected = {done_ok.task_id: TaskStatus.SUCCEEDED, done_failed.task_id: TaskStatus.FAILED,
                done_late.task_id: TaskStatus.CANCELLED, start_only.task_id: TaskStatus.SUCCEEDED,
                plain.task_id: TaskStatus.SUCCEEDED}
    ids = set()
    for task_id, status in expected.items():
        done = backends.store.get(task_id)
        assert done.status is status
        if task_id in (start_only.task_id, plain.task_id):
            assert done.outbox is None
            continue
        outbox = done.outbox
        assert outbox is not None, task_id
        assert (outbox.event, outbox.state, outbox.attempts, outbox.version) == (
            Event.COMPLETED, OutboxState.PENDING, (), 0)
        assert outbox.due_at is not None and before <= outbox.created_at <= outbox.due_at <= time.time()
        ids.add(outbox.event_id)
    assert len(ids) == 3  # one event id per task
    due = {t.task_id for t in backends.store.due_outbox(before=time.time() + 1)}
    assert due == {done_ok.task_id, done_failed.task_id, done_late.task_id}


def test_attempts_exhausted_carries_the_outbox(backends: Backends) -> None:
    task = put_task(backends, events=frozenset({Event.COMPLETED}))
    lost = [{"attempt": n, "worker": "w", "started_at": 1.0, "ended_at": 2.0, "outcome": "lost"} for n in (1, 2)]
    backends.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING, attempt=0,
                              changes={"attempts": 3, "history": tuple(lost), "lease_until": 1.0})
    drain(make_worker(backends, FakeEngine()))
    done = backends.store.get(task.task_id)
    assert done.status is TaskStatus.FAILED and done.error is not None
    assert done.error.code == "attempts_exhausted"
    assert done.outbox is not None and done.outbox.event is Event.COMPLETED


# -- GPU-seconds ------------------------------------------------------------------------------------------------

def test_engine_seconds_are_recorded_for_every_attempt_that_ran(backends: Backends) -> None:
    task = put_task(backends)
    engine = FailingFirst(1, EngineUnavailable("the engine fell over at the end"), seconds=0.2)
    drain(make_worker(backends, engine))
    done = backends.store.get(task.task_id)
    assert done.status is TaskStatus.SUCCEEDED
    assert [h.outcome for h in done.history] == [Outcome.RETRIED, Outcome.SUCCEEDED]
    seconds = [h.engine_s for h in done.history]
    assert all(s is not None and 0.2 <= s < 5 for s in seconds), seconds
    assert done.gpu_seconds == pytest.approx(sum(s for s in seconds if s is not None))


def test_a_cancelled_claim_records_no_engine_time(backends: Backends) -> None:
    task = put_task(backends, deadline=time.time() - 1)
    drain(make_worker(backends, FakeEngine()))
    assert backends.store.get(task.task_id).gpu_seconds == 0.0


# -- tenant keys ------------------------------------------------------------------------------------------------

def test_results_of_a_tenant_live_under_its_prefix(backends: Backends) -> None:
    mine = put_task(backends, tenant="acme")
    keyless = put_task(backends)
    drain(make_worker(backends, FakeEngine()))
    done = backends.store.get(mine.task_id)
    assert done.images == (f"acme/{mine.task_id}/0.png", f"acme/{mine.task_id}/1.png")
    assert backends.blobs.get(done.images[1]).startswith(b"\x89PNG")
    assert backends.store.get(keyless.task_id).images == (f"{keyless.task_id}/0.png", f"{keyless.task_id}/1.png")


def test_result_key() -> None:
    task = Task.new(Api.TXT2IMG, {}, tenant="t-1", task_id="abc")
    assert result_key(task, 3) == "t-1/abc/3.png"
    assert result_key(Task.new(Api.TXT2IMG, {}, task_id="abc"), 0) == "abc/0.png"
    with pytest.raises(ValueError, match="index"):
        result_key(task, -1)


# -- event hooks ------------------------------------------------------------------------------------------------

def test_start_and_progress_events_reach_the_sink(backends: Backends) -> None:
    task = put_task(backends)
    sink = RecordingSink()
    drain(make_worker(backends, FakeEngine(), events=sink))
    assert [(t.task_id, t.status, t.attempts) for t in sink.started] == [(task.task_id, TaskStatus.RUNNING, 1)]
    assert [step for _, _, step, _ in sink.reports] == [1, 2, 3, 4]
    assert sink.reports[-1] == (task.task_id, 1.0, 4, 4)
    assert backends.store.get(task.task_id).status is TaskStatus.SUCCEEDED


def test_a_broken_sink_costs_no_task(backends: Backends, caplog: pytest.LogCaptureFixture) -> None:
    task = put_task(backends)

    class Broken:
        def start(self, task: Task) -> None:
            raise RuntimeError("sink down")

        def progress(self, task: Task, fraction: float, step: int, steps: int) -> None:
            raise OSError("sink down")

    drain(make_worker(backends, FakeEngine(), events=Broken()))
    done = backends.store.get(task.task_id)
    assert done.status is TaskStatus.SUCCEEDED and done.attempts == 1
    assert "start event not sent" in caplog.text and "progress event not sent" in caplog.text


def test_the_real_start_gate_holds_a_tenant_to_its_running_cap(backends: Backends) -> None:
    from sdasync.auth.quotas import StartGate

    def capped(tenant: str) -> Task:
        # 60 steps: the busy engine looks at the cancel twice a second.
        task = Task.new(Api.TXT2IMG, {**PAYLOAD, "steps": 60}, tenant=tenant, extra={"max_active": 1})
        backends.queue.send(task.task_id)
        backends.store.create(task)
        return task

    first, second, other = capped("acme"), capped("acme"), capped("globex")
    store: Any = backends.store  # a TaskStore that is also a RecordStore, as every task store is
    busy = make_worker(backends, FakeEngine(seconds=30), gate=StartGate(store))
    messages = {m.body: m for m in backends.queue.receive(max_messages=3, visibility_timeout_s=5)}
    thread = threading.Thread(target=busy.handle, args=(messages[first.task_id],), daemon=True)
    thread.start()
    wait_until(lambda: backends.store.get(first.task_id).status is TaskStatus.RUNNING, timeout=5)

    other_worker = make_worker(backends, FakeEngine(), gate=StartGate(store, retry_s=0.2))
    assert other_worker.handle(messages[second.task_id]) is HandleOutcome.THROTTLED
    assert backends.store.get(second.task_id).attempts == 0
    assert other_worker.handle(messages[other.task_id]) is HandleOutcome.SUCCEEDED  # another tenant is unaffected

    backends.store.transition(first.task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.CANCELLED,
                              changes={"finished_at": time.time(), "lease_until": None})
    thread.join(10)
    assert busy.counts == {HandleOutcome.CANCELLED: 1}
    # The slot is free again: the throttled task's message comes back after the gate's short delay, and runs.
    other_worker.run(max_idle_s=1, max_tasks=10)
    done = backends.store.get(second.task_id)
    assert done.status is TaskStatus.SUCCEEDED and done.attempts == 1
