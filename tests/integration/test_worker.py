"""Worker scenarios on the real SQLite backends, with a scripted engine for exact control over failures."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest
from PIL import Image

from sdasync.config import Settings
from sdasync.engines.base import GenerationRequest, GenerationResult, Progress
from sdasync.errors import EngineRejected, EngineUnavailable, GenerationCancelled, SdasyncError
from sdasync.models import EngineHealth, Outcome, TaskError, TaskStatus
from sdasync.service import Backends, TaskService, open_backends
from sdasync.urls import url_for_path
from sdasync.worker.loop import Worker, WorkerConfig

BODY = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a cat", "steps": 4, "width": 64, "height": 64,
                                                  "batch_size": 2}}


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class ScriptedEngine:
    """Fails as told, then draws solid PNGs; reports every step."""

    failures: list[SdasyncError | Exception] = field(default_factory=list)
    calls: int = 0
    on_step: Callable[[int], None] | None = None
    capabilities: frozenset[str] = frozenset()

    def setup(self, stop: threading.Event | None = None) -> None: ...

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        steps = int(request.payload["steps"])
        for step in range(1, steps + 1):
            if self.on_step:
                self.on_step(step)
            if request.is_cancelled and request.is_cancelled():
                raise GenerationCancelled("cancelled")
            if request.on_progress:
                request.on_progress(Progress(step, steps))
        count = int(request.payload["batch_size"])
        return GenerationResult(images=[png(request.payload["width"], request.payload["height"])] * count,
                                info={"seed": request.payload["seed"], "steps": steps})

    def health(self) -> EngineHealth:
        return EngineHealth(ok=True)

    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None: ...


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Backends]:
    with open_backends(Settings(data_dir=tmp_path)) as opened:
        yield opened


@pytest.fixture
def service(backends: Backends) -> TaskService:
    return TaskService(backends)


def make_worker(backends: Backends, engine: ScriptedEngine, **config: Any) -> Worker:
    config = {"visibility_timeout_s": 5, "max_attempts": 3, "wait_s": 0.05, "backoff_base_s": 0.01,
              "backoff_max_s": 0.02, "progress_interval_s": 0, **config}
    return Worker(queue=backends.queue, store=backends.store, blobs=backends.blobs, engine=engine,
                  config=WorkerConfig(**config), payloads=backends.payloads)


def drain(worker: Worker) -> None:
    """Run until the queue has been empty for a moment (retries come back after tiny backoffs)."""
    worker.run(max_idle_s=0.3, max_tasks=50)


def test_success_publishes_images_and_info(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    drain(make_worker(backends, ScriptedEngine()))
    done = service.get(task.task_id)
    assert done.status is TaskStatus.SUCCEEDED
    assert done.images == (f"{task.task_id}/0.png", f"{task.task_id}/1.png")
    assert done.attempts == 1
    assert done.info == {"seed": task.payload["seed"], "steps": 4}
    assert done.progress is not None and done.progress.fraction == 1.0
    assert done.started_at is not None and done.finished_at is not None
    assert Image.open(io.BytesIO(backends.blobs.get(done.images[1]))).size == (64, 64)
    assert backends.queue.depth().visible == backends.queue.depth().in_flight == 0


def test_random_seed_is_fixed_at_submit(service: TaskService) -> None:
    task = service.submit(BODY)
    assert 0 <= task.payload["seed"] < 2**32


def test_transient_errors_are_retried(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    engine = ScriptedEngine(failures=[EngineUnavailable("down"), RuntimeError("CUDA hiccup")])
    drain(make_worker(backends, engine))
    done = service.get(task.task_id)
    assert done.status is TaskStatus.SUCCEEDED
    assert done.attempts == 3
    assert engine.calls == 3
    assert done.error is None


def test_attempts_exhausted_fail_and_dead_letter(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    engine = ScriptedEngine(failures=[EngineUnavailable("down")] * 5)
    drain(make_worker(backends, engine))
    done = service.get(task.task_id)
    assert done.status is TaskStatus.FAILED
    assert done.error is not None and done.error.code == "engine_unavailable"
    assert "3 attempts" in done.error.message
    assert engine.calls == 3
    assert done.images == ()
    depth = backends.queue.depth()
    assert (depth.visible, depth.in_flight, depth.delayed) == (0, 0, 0)
    dead = backends.queue.dead_letters()  # type: ignore[attr-defined]
    assert [d.body for d in dead] == [task.task_id]


def test_permanent_error_fails_at_once(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    engine = ScriptedEngine(failures=[EngineRejected("unknown sampler 'Foo'")])
    drain(make_worker(backends, engine))
    done = service.get(task.task_id)
    assert done.status is TaskStatus.FAILED
    assert done.error is not None and done.error.code == "engine_rejected"
    assert engine.calls == 1


def test_cancelled_queued_task_never_runs(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    service.cancel(task.task_id)
    engine = ScriptedEngine()
    drain(make_worker(backends, engine))
    assert engine.calls == 0
    assert service.get(task.task_id).status is TaskStatus.CANCELLED
    assert backends.queue.depth().visible == 0


def test_cancel_while_running_publishes_nothing(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    engine = ScriptedEngine(on_step=lambda step: service.cancel(task.task_id) if step == 2 else None)
    drain(make_worker(backends, engine))
    done = service.get(task.task_id)
    assert done.status is TaskStatus.CANCELLED
    assert done.images == ()
    with pytest.raises(SdasyncError):
        backends.blobs.get(f"{task.task_id}/0.png")


def test_duplicate_delivery_of_a_finished_task_is_acknowledged(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    backends.queue.send(task.task_id)  # a second copy, as SQS may deliver
    engine = ScriptedEngine()
    drain(make_worker(backends, engine))
    assert engine.calls == 1
    assert service.get(task.task_id).status is TaskStatus.SUCCEEDED
    assert backends.queue.depth().visible == 0


def test_crashed_attempt_is_taken_over_and_the_old_worker_fenced(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    worker = make_worker(backends, ScriptedEngine(), visibility_timeout_s=1)
    # Attempt 1 claims the task and "dies": its message is never acknowledged.
    first = backends.queue.receive(visibility_timeout_s=1)[0]
    claimed = backends.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING,
                                        attempt=0, changes={"attempts": 1})
    assert claimed.attempts == 1
    # The message reappears after its visibility timeout; another worker runs attempt 2.
    assert worker.run(max_tasks=1, max_idle_s=5) == 1
    done = service.get(task.task_id)
    assert done.status is TaskStatus.SUCCEEDED and done.attempts == 2
    # The first worker wakes up and tries to write: its attempt is stale, so nothing changes.
    from sdasync.errors import TaskConflict

    with pytest.raises(TaskConflict):
        backends.store.transition(task.task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.FAILED, attempt=1,
                                  changes={})
    assert first.receipt
    assert service.get(task.task_id).status is TaskStatus.SUCCEEDED


def test_crash_loop_ends_failed(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    lost = [{"attempt": n, "worker": "w", "startedAt": 1.0, "endedAt": 2.0, "outcome": "lost", "error": None}
            for n in (1, 2)]
    # Attempt 3 is running under a lease that has run out: its worker died like the two before it.
    backends.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING, attempt=0,
                              changes={"attempts": 3, "history": tuple(lost), "lease_until": 1.0})
    engine = ScriptedEngine()
    drain(make_worker(backends, engine))
    done = service.get(task.task_id)
    assert engine.calls == 0
    assert done.status is TaskStatus.FAILED
    assert done.error is not None and done.error.code == "attempts_exhausted"
    assert [h.outcome for h in done.history] == [Outcome.LOST] * 3


def test_a_live_lease_is_not_taken_over(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    backends.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING, attempt=0,
                              changes={"attempts": 1, "lease_until": time.time() + 60})
    engine = ScriptedEngine()
    worker = make_worker(backends, engine)
    assert worker.handle(backends.queue.receive()[0]) == "contended"
    assert engine.calls == 0
    assert service.get(task.task_id).attempts == 1


def test_stop_request_finishes_the_current_task(backends: Backends, service: TaskService) -> None:
    tasks = [service.submit(BODY) for _ in range(3)]
    worker = make_worker(backends, ScriptedEngine())
    stop_once = threading.Event()

    def stop_on_first_step(step: int) -> None:
        if not stop_once.is_set():
            stop_once.set()
            worker.request_stop()

    worker.engine = ScriptedEngine(on_step=stop_on_first_step)
    assert worker.run() == 1
    statuses = [service.get(t.task_id).status for t in tasks]
    assert statuses.count(TaskStatus.SUCCEEDED) == 1
    assert statuses.count(TaskStatus.QUEUED) == 2


def test_large_payloads_travel_through_the_blob_store(backends: Backends) -> None:
    service = TaskService(backends, inline_payload_max=1024)
    big = {"api": "/sdapi/v1/txt2img", "payload": {**BODY["payload"], "prompt": "x" * 5000}}  # type: ignore[dict-item]
    task = service.submit(big)
    stored = service.get(task.task_id)
    assert stored.payload == {}
    assert stored.extra["payload_ref"] == f"{task.task_id}.json"
    assert backends.payloads.get(f"{task.task_id}.json")  # in the payload store, not among the results
    seen: list[dict[str, Any]] = []

    class Recording(ScriptedEngine):
        def generate(self, request: GenerationRequest) -> GenerationResult:
            seen.append(request.payload)
            return super().generate(request)

    drain(make_worker(backends, Recording()))
    assert seen[0]["prompt"] == "x" * 5000
    done = service.get(task.task_id)
    assert done.status is TaskStatus.SUCCEEDED
    assert done.progress is not None and done.progress.steps == 4


def test_a_message_may_arrive_before_its_task(backends: Backends, service: TaskService) -> None:
    # The API sends first and writes second; a worker can see the message in between.
    backends.queue.send("not-yet-written")
    worker = make_worker(backends, ScriptedEngine())
    message = backends.queue.receive()[0]
    assert worker.handle(message) == "early"
    depth = backends.queue.depth()
    assert depth.in_flight == 1  # back after a short delay, not dropped


def test_a_message_whose_task_never_appears_is_dropped(backends: Backends) -> None:
    from sdasync.backends.base import Message

    worker = make_worker(backends, ScriptedEngine())
    backends.queue.send("never-written")
    delivered = backends.queue.receive()[0]
    late = Message(delivered.message_id, delivered.body, delivered.receipt, receive_count=5)
    assert worker.handle(late) == "orphan"
    assert backends.queue.depth() == type(backends.queue.depth())(0, 0, 0)


def test_a_failed_send_stores_nothing(backends: Backends) -> None:
    class BrokenQueue:
        def __getattr__(self, name: str) -> Any:
            return getattr(backends.queue, name)

        def send(self, body: str, *, delay_s: float = 0) -> str:
            raise SdasyncError("queue down")

    service = TaskService(Backends(queue=BrokenQueue(), store=backends.store, blobs=backends.blobs,
                                   payloads=backends.payloads))
    with pytest.raises(SdasyncError):
        service.submit(BODY)
    assert backends.store.list().tasks == []


def test_the_last_delivery_settles_the_task(tmp_path: Path) -> None:
    # The queue dead-letters after 2 receives; even with more attempts allowed the task must not be left behind.
    settings = Settings(data_dir=tmp_path, queue=url_for_path("sqlite", tmp_path / "q.db") + "?max_receives=2")
    with open_backends(settings) as backends:
        service = TaskService(backends)
        task = service.submit(BODY)
        engine = ScriptedEngine(failures=[EngineUnavailable("down")] * 5)
        drain(make_worker(backends, engine, max_attempts=5))
        done = service.get(task.task_id)
        assert done.status is TaskStatus.FAILED
        assert engine.calls == 2
        assert [d.body for d in backends.queue.dead_letters()] == [task.task_id]  # type: ignore[attr-defined]


def test_a_broken_engine_hands_the_task_back_and_stops(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)

    class Broken(ScriptedEngine):
        def health(self) -> EngineHealth:
            return EngineHealth(ok=self.calls == 0, restart=True, detail="CUDA context lost")

    worker = make_worker(backends, Broken(failures=[EngineUnavailable("CUDA error: an illegal memory access")]))
    worker.run(max_idle_s=0.3)
    from sdasync.worker.loop import EXIT_ENGINE_BROKEN

    assert worker.exit_code == EXIT_ENGINE_BROKEN
    released = service.get(task.task_id)
    assert released.status is TaskStatus.QUEUED
    assert backends.queue.depth().visible == 1
    drain(make_worker(backends, ScriptedEngine()))
    assert service.get(task.task_id).status is TaskStatus.SUCCEEDED


def test_cancel_clears_progress(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    backends.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING, attempt=0,
                              changes={"attempts": 1, "progress": {"fraction": 0.5, "step": 2, "steps": 4}})
    assert service.cancel(task.task_id).progress is None


def test_a_worker_refuses_attempts_the_queue_cannot_hold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdasync.cli import main

    queue = url_for_path("sqlite", tmp_path / "q.db") + "?max_receives=3"
    code = main(["worker", "--data-dir", str(tmp_path), "--queue", queue, "--max-attempts", "3", "--engine",
                 "fake://", "--burst"])
    assert code == 2
    assert "max_receives" in capsys.readouterr().err


def test_an_engine_that_is_down_costs_no_attempts(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    probes = {"n": 0}

    class Flaky(ScriptedEngine):
        def health(self) -> EngineHealth:
            probes["n"] += 1
            return EngineHealth(ok=probes["n"] > 3)  # down for the first probes, then back

    engine = Flaky(failures=[EngineUnavailable("connection refused")])
    worker = make_worker(backends, engine, engine_probe_s=0.01)
    worker.run(max_idle_s=0.5)
    done = service.get(task.task_id)
    assert done.status is TaskStatus.SUCCEEDED
    assert [h.outcome for h in done.history] == ["released", "succeeded"]
    assert not worker.engine_down.is_set()


def test_drain_hands_a_long_task_back(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    worker = make_worker(backends, ScriptedEngine(), drain_timeout_s=0.05)
    started = threading.Event()

    def step(n: int) -> None:
        started.set()
        time.sleep(0.1)  # a slow step: the drain timeout runs out mid-generation

    worker.engine = ScriptedEngine(on_step=step)
    threading.Thread(target=lambda: (started.wait(5), worker.request_stop()), daemon=True).start()
    worker.run()
    released = service.get(task.task_id)
    assert released.status is TaskStatus.QUEUED
    assert released.history[-1].outcome is Outcome.RELEASED
    assert backends.queue.depth().visible == 1  # handed back at once, not after the visibility timeout


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[Backends]:
    """A queue that dead-letters on the 4th receive: hand-backs must not walk a task into the DLQ."""
    settings = Settings(data_dir=tmp_path, queue=url_for_path("sqlite", tmp_path / "q.db") + "?max_receives=4")
    with open_backends(settings) as opened:
        yield opened


def test_hand_backs_never_walk_a_task_into_the_dead_letter_queue(tight: Backends) -> None:
    service = TaskService(tight)
    task = service.submit(BODY)

    class Down(ScriptedEngine):
        def health(self) -> EngineHealth:
            return EngineHealth(ok=False)

    for _ in range(6):  # more hand-backs than the queue allows receives
        worker = make_worker(tight, Down(failures=[EngineUnavailable("refused")]))
        assert worker.handle(tight.queue.receive(visibility_timeout_s=5)[0]) == "released"
    assert tight.queue.dead_letters() == []  # type: ignore[attr-defined]
    drain(make_worker(tight, ScriptedEngine()))
    assert service.get(task.task_id).status is TaskStatus.SUCCEEDED


def test_a_contended_last_delivery_keeps_a_message(tight: Backends) -> None:
    service = TaskService(tight)
    task = service.submit(BODY)
    tight.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING, attempt=0,
                           changes={"attempts": 1, "lease_until": time.time() + 0.5})
    message = tight.queue.receive()[0]
    last = type(message)(message.message_id, message.body, message.receipt, receive_count=4)
    assert make_worker(tight, ScriptedEngine()).handle(last) == "contended"
    # The holder dies; once its lease has run out the fresh message lets another worker finish the task.
    make_worker(tight, ScriptedEngine()).run(max_idle_s=3)
    assert service.get(task.task_id).status is TaskStatus.SUCCEEDED


def test_a_stop_while_waiting_gives_the_message_back(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    engine = ScriptedEngine()
    worker = make_worker(backends, engine)

    class StopOnReceive:
        def __getattr__(self, name: str) -> Any:
            return getattr(backends.queue, name)

        def receive(self, **kwargs: Any) -> Any:
            messages = backends.queue.receive(**kwargs)
            worker.request_stop()  # the stop arrives while the long poll returns a message
            return messages

    worker.queue = StopOnReceive()  # type: ignore[assignment]
    worker.run()
    assert engine.calls == 0
    assert service.get(task.task_id).status is TaskStatus.QUEUED
    assert backends.queue.depth().visible == 1


def test_a_failed_task_redelivered_is_dead_lettered(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    backends.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.FAILED, changes={
        "error": TaskError("engine_unavailable", "down")})
    assert make_worker(backends, ScriptedEngine()).handle(backends.queue.receive()[0]) == "duplicate"
    assert [d.body for d in backends.queue.dead_letters()] == [task.task_id]  # type: ignore[attr-defined]
