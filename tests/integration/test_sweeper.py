"""The sweeper on the real embedded backends (SQLite in a tmp dir), a message lost behind sdasync's back each time:
received and acknowledged by someone else, or dead-lettered. A fake-engine worker drains the queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import wait_until
from sdasync import dlq
from sdasync.backends.base import Message
from sdasync.config import Settings
from sdasync.engines.fake import FakeEngine
from sdasync.maintenance import Maintenance, MaintenanceReport
from sdasync.models import Api, Outcome, Task, TaskStatus
from sdasync.outbox import Event, WebhookSpec
from sdasync.service import Backends, TaskService, open_backends
from sdasync.sweeper import sweep
from sdasync.worker.loop import Worker, WorkerConfig

BODY = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64}}
REQUEUE_AFTER_S = 60.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
def backends(settings: Settings) -> Iterator[Backends]:
    with open_backends(settings) as opened:
        yield opened


@pytest.fixture
def service(backends: Backends) -> TaskService:
    return TaskService(backends)


def worker(backends: Backends, engine: FakeEngine | None = None) -> Worker:
    return Worker(queue=backends.queue, store=backends.store, blobs=backends.blobs, payloads=backends.payloads,
                  engine=engine or FakeEngine(),
                  config=WorkerConfig(visibility_timeout_s=10, wait_s=0.05, max_attempts=3))


def lose_message(backends: Backends, task: Task) -> None:
    """Take the task's message out of the queue the way a stray consumer would: receive it and delete it."""
    messages = backends.queue.receive(max_messages=10)
    assert [m.body for m in messages] == [task.task_id]
    backends.queue.ack(messages[0].receipt)


def later(seconds: float = REQUEUE_AFTER_S + 1) -> float:
    return time.time() + seconds


def outcomes(backends: Backends, task_id: str) -> list[Outcome]:
    return [entry.outcome for entry in backends.store.get(task_id).history]


def test_a_task_whose_message_was_deleted_succeeds_after_one_sweep(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    lose_message(backends, task)
    assert worker(backends).run(burst=True) == 0  # nothing left to deliver: stranded
    assert not sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3)  # not old enough yet

    report = sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3, now=later())

    assert report.requeued == (task.task_id,) and not report.stranded
    assert outcomes(backends, task.task_id) == [Outcome.REQUEUED]
    assert worker(backends).run(burst=True) == 1
    assert backends.store.get(task.task_id).status is TaskStatus.SUCCEEDED
    assert outcomes(backends, task.task_id) == [Outcome.REQUEUED, Outcome.SUCCEEDED]


def test_a_requeued_task_is_left_alone_for_another_requeue_after(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    lose_message(backends, task)
    assert sweep(backends, requeue_after_s=0.5, max_attempts=3, now=later(1)).requeued == (task.task_id,)
    # The record moved updated_at to now (real time): a pass right after finds nothing stale.
    assert not sweep(backends, requeue_after_s=0.5, max_attempts=3)
    assert backends.queue.depth().visible == 1


def test_a_dead_lettered_message_of_a_queued_task_is_redriven(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    message = backends.queue.receive()[0]
    backends.queue.dead_letter(message.receipt, reason="behind sdasync's back")
    assert [row["taskId"] for row in dlq.list_dead(backends)] == [task.task_id]

    # A dead letter needs no waiting: its task is queued, and nothing else will deliver it.
    report = sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3)

    assert report.redriven == (task.task_id,) and not report.requeued
    assert dlq.list_dead(backends) == []
    assert worker(backends).run(burst=True) == 1
    assert backends.store.get(task.task_id).status is TaskStatus.SUCCEEDED


def test_dead_letters_of_failed_tasks_stay_for_the_operator(backends: Backends, service: TaskService) -> None:
    engine = FakeEngine(fail_rate=1.0, fail="permanent")
    task = service.submit(BODY)
    assert worker(backends, engine).run(burst=True) == 1
    assert backends.store.get(task.task_id).status is TaskStatus.FAILED

    assert not sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3, now=later())
    assert [row["taskId"] for row in dlq.list_dead(backends)] == [task.task_id]


def test_a_running_task_whose_worker_died_is_requeued(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    message = backends.queue.receive()[0]
    now = time.time()
    backends.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING, attempt=0,
                              changes={"attempts": 1, "started_at": now, "worker": "dead", "lease_until": now - 1})
    backends.queue.ack(message.receipt)  # the worker's message went with it (say, a queue without redelivery)

    # Its lease has not run out long enough ago: a slow worker is left alone.
    assert not sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3, now=later(REQUEUE_AFTER_S - 5))
    report = sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3, now=later(REQUEUE_AFTER_S + 10))

    assert report.requeued == (task.task_id,)
    assert worker(backends).run(burst=True) == 1
    done = backends.store.get(task.task_id)
    assert done.status is TaskStatus.SUCCEEDED and done.attempts == 2
    assert outcomes(backends, task.task_id) == [Outcome.REQUEUED, Outcome.LOST, Outcome.SUCCEEDED]


def dead_letter(backends: Backends, task: Task) -> None:
    """The queue gives up on the task's message (its own redrive policy, say during a task-store outage)."""
    messages = backends.queue.receive(max_messages=10)
    assert [m.body for m in messages] == [task.task_id]
    backends.queue.dead_letter(messages[0].receipt, reason="behind sdasync's back")


def test_a_task_dead_lettered_past_max_attempts_fails_as_stranded_and_can_be_redriven(
        backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    for _ in range(2):
        dead_letter(backends, task)
        assert sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=2).redriven == (task.task_id,)
    dead_letter(backends, task)

    report = sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=2)

    assert report.stranded == (task.task_id,) and not report.redriven
    failed = backends.store.get(task.task_id)
    assert failed.status is TaskStatus.FAILED and failed.error is not None
    assert failed.error.code == "stranded" and "3 times" in failed.error.message
    # Its dead letter stays where the operator finds it.
    assert [row["taskId"] for row in dlq.list_dead(backends)] == [task.task_id]
    assert dlq.redrive(backends) == [{"taskId": task.task_id, "result": "requeued"}]
    assert worker(backends).run(burst=True) == 1
    assert backends.store.get(task.task_id).status is TaskStatus.SUCCEEDED
    history = backends.store.get(task.task_id).history
    assert history[-2].outcome is Outcome.REDRIVEN and history[-2].started_at is None


def put_task(backends: Backends, *, deadline: float | None = None, completed_hook: bool = False) -> Task:
    """A task as the API stores one (message, then task), with a deadline or a ``completed`` webhook."""
    extra: dict[str, object] = {} if deadline is None else {"deadline": deadline}
    if completed_hook:
        extra["webhook"] = WebhookSpec(url="https://hooks.example.test/in", events=frozenset({Event.COMPLETED})
                                       ).to_dict()
    task = Task.new(Api.TXT2IMG, dict(BODY["payload"]), extra=extra)  # type: ignore[arg-type]
    backends.queue.send(task.task_id)
    backends.store.create(task)
    return task


def test_a_stranded_failure_carries_the_outbox(backends: Backends) -> None:
    task = put_task(backends, completed_hook=True)
    dead_letter(backends, task)
    assert sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=1).redriven == (task.task_id,)
    dead_letter(backends, task)
    assert sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=1).stranded == (task.task_id,)
    failed = backends.store.get(task.task_id)
    assert failed.status is TaskStatus.FAILED and failed.outbox is not None
    assert failed.outbox.event is Event.COMPLETED and failed.outbox.due_at is not None
    assert [t.task_id for t in backends.store.due_outbox(before=time.time() + 1)] == [task.task_id]


def test_a_lost_task_past_its_deadline_is_cancelled_not_resent(backends: Backends) -> None:
    task = put_task(backends, deadline=later(30), completed_hook=True)  # passed by the time the sweep runs
    lose_message(backends, task)

    report = sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3, now=later())

    assert report.expired == (task.task_id,) and not report.requeued
    done = backends.store.get(task.task_id)
    assert done.status is TaskStatus.CANCELLED and done.error is not None and done.error.code == "deadline"
    assert done.history == () and done.outbox is not None and done.outbox.event is Event.COMPLETED
    depth = backends.queue.depth()
    assert (depth.visible, depth.in_flight, depth.delayed) == (0, 0, 0)  # no message was sent


def test_old_queued_tasks_past_their_deadline_are_cancelled_even_while_in_line(backends: Backends) -> None:
    expired = [put_task(backends, deadline=later(30)) for _ in range(2)]
    waiting = put_task(backends)  # every task's message is in the queue: they wait in line, none is re-sent

    report = sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3, now=later())

    assert sorted(report.expired) == sorted(t.task_id for t in expired) and not report.requeued
    assert backends.store.get(waiting.task_id).status is TaskStatus.QUEUED
    assert backends.queue.depth().visible == 3
    engine = FakeEngine()
    assert worker(backends, engine).run(burst=True) == 3  # the cancelled ones' messages are only acknowledged
    assert engine.calls == 1


def test_a_dead_task_past_its_deadline_is_cancelled_with_its_attempt_recorded(backends: Backends) -> None:
    task = put_task(backends, deadline=later(30))
    backends.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING, attempt=0,
                              changes={"attempts": 1, "worker": "gone", "lease_until": time.time()})
    lose_message(backends, task)

    report = sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3, now=later(2 * REQUEUE_AFTER_S))

    assert report.expired == (task.task_id,)
    done = backends.store.get(task.task_id)
    assert done.status is TaskStatus.CANCELLED and done.lease_until is None
    assert [(h.outcome, h.worker, h.error.code if h.error else None) for h in done.history] == [
        (Outcome.CANCELLED, "gone", "deadline")]


def test_age_alone_never_fails_a_task(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    for round_ in range(1, 6):
        lose_message(backends, task)
        report = sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=2, now=later(round_ * 100))
        assert report.requeued == (task.task_id,) and not report.stranded
    assert worker(backends).run(burst=True) == 1
    assert backends.store.get(task.task_id).status is TaskStatus.SUCCEEDED


def test_old_queued_tasks_whose_messages_wait_in_line_get_no_duplicates(backends: Backends,
                                                                          service: TaskService) -> None:
    tasks = [service.submit(BODY) for _ in range(3)]
    # A fleet scaled to zero, an engine that is down: old, but their messages are all there.
    assert not sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3, now=later())
    assert backends.queue.depth().visible == len(tasks)
    # One of them loses its message: fewer messages than old tasks, so they are all re-sent (duplicates are
    # harmless) and every task runs once.
    lose_one = backends.queue.receive()[0]
    backends.queue.ack(lose_one.receipt)
    assert len(sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3, now=later()).requeued) == 3
    engine = FakeEngine()
    worker(backends, engine).run(burst=True)
    assert engine.calls == len(tasks)
    assert all(backends.store.get(t.task_id).status is TaskStatus.SUCCEEDED for t in tasks)


def test_two_sweepers_at_once_send_bounded_duplicates_and_each_task_runs_once(settings: Settings,
                                                                                backends: Backends,
                                                                                service: TaskService) -> None:
    tasks = [service.submit(BODY) for _ in range(5)]
    for _ in tasks:
        message = backends.queue.receive()[0]
        backends.queue.ack(message.receipt)
    start = threading.Barrier(2)
    reports = []

    def sweeper() -> None:
        # Each its own handles, as another process would have.
        with open_backends(settings) as own:
            start.wait(timeout=10)
            reports.append(sweep(own, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3, now=later()))

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(reports) == 2

    ids = {task.task_id for task in tasks}
    assert ids <= {task_id for report in reports for task_id in report.requeued}
    assert len(tasks) <= backends.queue.depth().visible <= 2 * len(tasks)
    engine = FakeEngine()
    worker(backends, engine).run(burst=True)
    assert engine.calls == len(tasks)  # duplicates were acknowledged, never run
    for task in tasks:
        done = backends.store.get(task.task_id)
        assert done.status is TaskStatus.SUCCEEDED
        assert [entry.outcome for entry in done.history].count(Outcome.SUCCEEDED) == 1
    assert backends.queue.depth().visible == 0


def test_maintenance_in_the_background_recovers_a_deleted_message(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    lose_message(backends, task)
    stop = threading.Event()
    background = Maintenance(backends, retention_s=86_400, requeue_after_s=0.5, max_attempts=3)
    engine = FakeEngine()
    runner = worker(backends, engine)
    threads = [background.start_thread(0.2, stop),
               threading.Thread(target=runner.run, kwargs={"max_idle_s": 30}, daemon=True)]
    threads[1].start()
    try:
        # Within requeue_after plus a sweep interval, with room for a loaded machine.
        wait_until(lambda: backends.store.get(task.task_id).status is TaskStatus.SUCCEEDED, timeout=15)
    finally:
        stop.set()
        runner.request_stop(drain_timeout_s=5)
        for thread in threads:
            thread.join(timeout=15)
    assert not any(thread.is_alive() for thread in threads)
    # Once, whatever duplicates the passes sent meanwhile. (Its history may lack the "requeued" record: a worker
    # that claims the task between the sweeper's send and its record wins, and the record is dropped.)
    assert engine.calls == 1


def test_maintenance_survives_a_failing_pass(backends: Backends, caplog: pytest.LogCaptureFixture) -> None:
    passes = []

    class Broken(Maintenance):
        def run_once(self) -> MaintenanceReport:
            passes.append(time.monotonic())
            raise RuntimeError("boom")

    stop = threading.Event()
    thread = Broken(backends, retention_s=1, requeue_after_s=1, max_attempts=1).start_thread(0.05, stop)
    try:
        wait_until(lambda: len(passes) >= 3, timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert "maintenance pass failed" in caplog.text



@pytest.mark.usefixtures("aws_endpoint")
def test_on_sqs_a_deleted_and_a_dead_lettered_message_are_both_recovered(tmp_path: Path) -> None:
    from contract.backends import FakeClock, sqs_queue
    from sdasync.backends.local.files import FileBlobStore
    from sdasync.backends.sqlite.store import SqliteTaskStore

    with sqs_queue(tmp_path, FakeClock()) as queue, SqliteTaskStore(path=tmp_path / "sdasync.db") as store:
        backends = Backends(queue=queue, store=store, blobs=FileBlobStore(root=tmp_path / "results"),
                            payloads=FileBlobStore(root=tmp_path / "requests"))
        service = TaskService(backends)
        deleted, dead = service.submit(BODY), service.submit(BODY)
        messages: dict[str, Message] = {}

        def received_both() -> bool:
            messages.update((m.body, m) for m in queue.receive(max_messages=10, wait_s=1, visibility_timeout_s=60))
            return len(messages) == 2

        wait_until(received_both, timeout=20)
        queue.ack(messages[deleted.task_id].receipt)
        queue.dead_letter(messages[dead.task_id].receipt, reason="behind sdasync's back")

        report = sweep(backends, requeue_after_s=REQUEUE_AFTER_S, max_attempts=3, now=later())

        assert (report.requeued, report.redriven) == ((deleted.task_id,), (dead.task_id,))
        runner = worker(backends)
        handled = 0

        def both_succeeded() -> bool:
            nonlocal handled
            handled += runner.run(max_tasks=1, max_idle_s=1)
            return all(store.get(t.task_id).status is TaskStatus.SUCCEEDED for t in (deleted, dead))

        wait_until(both_succeeded, timeout=30)
        assert handled >= 2
