"""TaskService against the embedded backends: where large payloads go, the retention the store is opened with,
a cancel that ends a running attempt on the record, and the worker registry."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdasync.backends.base import TaskStore
from sdasync.backends.local.files import FileBlobStore
from sdasync.backends.sqlite.store import SqliteTaskStore
from sdasync.config import Settings
from sdasync.errors import BlobNotFound, TaskConflict
from sdasync.models import Api, AttemptRecord, EngineHealth, Outcome, Task, TaskStatus, WorkerRecord
from sdasync.service import (
    LEGACY_PAYLOAD_REF,
    PAYLOAD_REF,
    Backends,
    TaskService,
    load_payload,
    open_backends,
    payload_key,
)

Q, R = TaskStatus.QUEUED, TaskStatus.RUNNING
#: A request whose payload is over the services' inline limit below.
BIG = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "x" * 5000}}
INLINE_MAX = 1024


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Backends]:
    with open_backends(Settings(data_dir=tmp_path, retention_days=12.5)) as opened:
        yield opened


def claim(store: TaskStore, task: Task, worker: str, now: float) -> Task:
    """What a worker's claim writes."""
    return store.transition(task.task_id, expected={Q, R}, to=R, attempt=task.attempts, lease_expired_before=now,
                            changes={"attempts": task.attempts + 1, "started_at": now, "worker": worker,
                                     "lease_until": now + 60, "progress": None})


def test_open_backends_keeps_payloads_outside_the_results(backends: Backends, tmp_path: Path) -> None:
    assert isinstance(backends.blobs, FileBlobStore) and isinstance(backends.payloads, FileBlobStore)
    assert (backends.blobs.root, backends.payloads.root) == (tmp_path / "results", tmp_path / "requests")
    assert isinstance(backends.store, SqliteTaskStore)
    assert backends.store.retention_days == 12.5  # the one retention setting reaches the store

    task = TaskService(backends, inline_payload_max=INLINE_MAX).submit(BIG)

    stored = backends.store.get(task.task_id)
    assert (stored.payload, stored.extra) == ({}, {PAYLOAD_REF: payload_key(task.task_id)})
    assert json.loads(backends.payloads.get(payload_key(task.task_id)))["prompt"] == "x" * 5000
    assert (tmp_path / "requests" / f"{task.task_id}.json").is_file()
    assert not (tmp_path / "results").exists()  # nothing a results server or CDN could hand out
    assert load_payload(stored, backends.payloads, results=backends.blobs)["prompt"] == "x" * 5000


def test_a_small_payload_stays_inline(backends: Backends, tmp_path: Path) -> None:
    task = TaskService(backends, inline_payload_max=INLINE_MAX).submit({"api": "/sdapi/v1/txt2img",
                                                                       "payload": {"prompt": "a cat"}})

    stored = backends.store.get(task.task_id)
    assert stored.payload["prompt"] == "a cat" and PAYLOAD_REF not in stored.extra
    assert load_payload(stored, backends.payloads) == stored.payload
    assert not (tmp_path / "requests").exists()


def test_a_payload_an_older_version_kept_with_the_results_is_still_read(backends: Backends) -> None:
    backends.blobs.put("requests/old.json", json.dumps({"prompt": "old"}).encode(), content_type="application/json")
    old = Task(task_id="old", api=Api.TXT2IMG, payload={}, extra={LEGACY_PAYLOAD_REF: "requests/old.json"})

    assert load_payload(old, backends.payloads, results=backends.blobs) == {"prompt": "old"}
    with pytest.raises(BlobNotFound):  # without the results store it is looked for among the payloads
        load_payload(old, backends.payloads)


def test_cancelling_a_running_task_records_the_attempt_it_ends(backends: Backends) -> None:
    service = TaskService(backends)
    task = service.submit({"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a cat"}})
    claimed = claim(backends.store, task, "gpu-1:7", now=1_700_000_000.0)

    cancelled = service.cancel(task.task_id)

    assert cancelled == backends.store.get(task.task_id)
    assert (cancelled.status, cancelled.attempts, cancelled.lease_until) == (TaskStatus.CANCELLED, 1, None)
    assert len(cancelled.history) == 1
    record = cancelled.history[0]
    assert isinstance(record, AttemptRecord)
    assert (record.attempt, record.worker, record.started_at, record.outcome, record.error) == (
        1, "gpu-1:7", claimed.started_at, Outcome.CANCELLED, None)
    assert record.ended_at == cancelled.finished_at


def test_cancelling_a_queued_task_adds_no_attempt(backends: Backends) -> None:
    service = TaskService(backends)
    task = service.submit({"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a cat"}})

    cancelled = service.cancel(task.task_id)

    assert (cancelled.status, cancelled.attempts, cancelled.history) == (TaskStatus.CANCELLED, 0, ())
    with pytest.raises(TaskConflict, match="already cancelled") as caught:
        service.cancel(task.task_id)
    assert caught.value.current == cancelled


class RacingStore:
    """A store whose next ``transition`` from the service is beaten by a worker's write, as if it landed between
    the cancel's read and its write."""

    def __init__(self, store: TaskStore, race: Any) -> None:
        self._store = store
        self._race = race

    def transition(self, task_id: str, **kwargs: Any) -> Task:
        race, self._race = self._race, None
        if race is not None:
            race()
        return self._store.transition(task_id, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_cancel_that_loses_to_a_worker_rereads_and_keeps_the_workers_history(backends: Backends) -> None:
    task = TaskService(backends).submit({"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a cat"}})
    first = claim(backends.store, task, "old-worker", now=1_700_000_000.0)
    lost = {"attempt": 1, "worker": "old-worker", "started_at": first.started_at, "ended_at": 1_700_000_100.0,
            "outcome": "lost", "error": None}

    def reclaim() -> None:
        # The first worker's lease ran out; another worker claims the task and records the attempt lost.
        taken = claim(backends.store, first, "new-worker", now=1_700_000_100.0)
        backends.store.transition(task.task_id, expected={R}, to=R, attempt=2,
                                  changes={"history": (*taken.history, lost)})

    racing = Backends(queue=backends.queue, store=RacingStore(backends.store, reclaim),  # type: ignore[arg-type]
                      blobs=backends.blobs, payloads=backends.payloads)

    cancelled = TaskService(racing).cancel(task.task_id)

    assert (cancelled.status, cancelled.attempts) == (TaskStatus.CANCELLED, 2)
    assert [(r.attempt, r.worker, r.outcome) for r in cancelled.history] == [
        (1, "old-worker", Outcome.LOST), (2, "new-worker", Outcome.CANCELLED)]


def test_workers_lists_the_registry_and_never_raises(backends: Backends, caplog: pytest.LogCaptureFixture) -> None:
    service = TaskService(backends)
    record = WorkerRecord(worker_id="w1", engine="fake://", health=EngineHealth(ok=True), task_id=None,
                          started_at=1.0, heartbeat_at=2.0, expires_at=4_000_000_000.0)
    backends.store.put_worker(record)

    assert service.workers() == [record]

    backends.store.close()  # every call on it is a BackendError now
    with caplog.at_level(logging.WARNING, logger="sdasync.service"):
        assert service.workers() == []
    assert "worker registry unreadable" in caplog.text
