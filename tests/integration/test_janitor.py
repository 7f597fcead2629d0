"""The janitor on the real embedded backends (SQLite and files in a tmp dir), with the fake engine's worker."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from sdasync import dlq
from sdasync.api.app import create_app
from sdasync.backends.base import BlobStore
from sdasync.backends.local.files import FileBlobStore
from sdasync.config import Settings
from sdasync.engines.fake import FakeEngine
from sdasync.errors import BackendError, BlobNotFound, TaskNotFound
from sdasync.janitor import purge
from sdasync.models import Task, TaskStatus
from sdasync.service import PAYLOAD_REF, Backends, TaskService, open_backends
from sdasync.worker.loop import Worker, WorkerConfig

BODY = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a lighthouse at dusk " * 20, "steps": 2, "width": 64,
                                                  "height": 64, "batch_size": 2}}
RETENTION_S = 60.0

#: Key-less mode answers only requests addressed to a trusted host (a defence against DNS rebinding).
LOCAL_URL = "http://127.0.0.1:8080"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
def backends(settings: Settings) -> Iterator[Backends]:
    with open_backends(settings) as opened:
        yield opened


@pytest.fixture
def service(backends: Backends) -> TaskService:
    # A tiny inline limit, so every payload goes to the payload store and its purge can be checked.
    return TaskService(backends, inline_payload_max=16)


def drain(backends: Backends) -> int:
    worker = Worker(queue=backends.queue, store=backends.store, blobs=backends.blobs, payloads=backends.payloads,
                    engine=FakeEngine(),
                    config=WorkerConfig(visibility_timeout_s=10, wait_s=0.05))
    return worker.run(burst=True)


def payload_ref(task: Task) -> str:
    return str(task.extra[PAYLOAD_REF])


def exists(blobs: BlobStore, key: str) -> bool:
    try:
        blobs.get(key)
    except BlobNotFound:
        return False
    return True


def claim(backends: Backends, task: Task) -> Task:
    """Take the task to ``running`` the way a worker does, under a lease that is still live."""
    message = backends.queue.receive(visibility_timeout_s=60)[0]
    assert message.body == task.task_id
    now = time.time()
    return backends.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING,
                                     attempt=0, changes={"attempts": 1, "started_at": now, "worker": "w",
                                                         "lease_until": now + 3600})


def test_a_finished_task_its_payload_and_its_images_are_gone_after_the_retention(
        backends: Backends, service: TaskService) -> None:
    done = service.submit(BODY)
    assert drain(backends) == 1
    done = backends.store.get(done.task_id)
    assert done.status is TaskStatus.SUCCEEDED and len(done.images) == 2
    assert exists(backends.payloads, payload_ref(done)) and all(exists(backends.blobs, k) for k in done.images)

    # Within the retention nothing goes.
    assert not purge(backends, retention_s=RETENTION_S)
    assert backends.store.get(done.task_id).status is TaskStatus.SUCCEEDED

    report = purge(backends, retention_s=RETENTION_S, now=time.time() + RETENTION_S + 1)
    assert (report.tasks, report.images, report.payloads, report.errors) == (1, 2, 1, 0)
    with pytest.raises(TaskNotFound):
        backends.store.get(done.task_id)
    assert not exists(backends.payloads, payload_ref(done))
    assert not any(exists(backends.blobs, key) for key in done.images)
    assert not purge(backends, retention_s=RETENTION_S, now=time.time() + RETENTION_S + 1)


def test_queued_and_running_tasks_are_never_purged(backends: Backends, service: TaskService) -> None:
    running = claim(backends, service.submit(BODY))
    queued = service.submit(BODY)
    failed = service.submit(BODY)
    backends.store.transition(failed.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.FAILED,
                              changes={"finished_at": time.time()})
    cancelled = service.cancel(service.submit(BODY).task_id)

    report = purge(backends, retention_s=RETENTION_S, now=time.time() + 10 * RETENTION_S)

    assert report.tasks == 2
    for gone in (failed, cancelled):
        with pytest.raises(TaskNotFound):
            backends.store.get(gone.task_id)
        assert not exists(backends.payloads, payload_ref(gone))
    for kept, status in ((running, TaskStatus.RUNNING), (queued, TaskStatus.QUEUED)):
        assert backends.store.get(kept.task_id).status is status
        assert exists(backends.payloads, payload_ref(kept))


def test_a_blob_whose_delete_fails_is_expired_later_as_an_orphan(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    assert drain(backends) == 1
    task = backends.store.get(task.task_id)
    flaky = FlakyBlobs(backends.blobs, failures=1)
    later = time.time() + RETENTION_S + 1

    first = purge(Backends(queue=backends.queue, store=backends.store, blobs=flaky, payloads=backends.payloads),
                  retention_s=RETENTION_S, now=later)

    # The task went first (a conditional delete): nothing points at the image left behind.
    assert first.errors == 1
    with pytest.raises(TaskNotFound):
        backends.store.get(task.task_id)
    assert any(exists(backends.blobs, key) for key in task.images)
    second = purge(backends, retention_s=RETENTION_S, now=later + 10, orphan_margin_s=0)
    assert second.orphans >= 1
    assert not any(exists(backends.blobs, key) for key in task.images)


def test_a_task_redriven_after_it_was_listed_is_not_deleted(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    backends.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.FAILED,
                              changes={"finished_at": time.time()})
    cutoff = time.time() + 1
    listed = backends.store.stale(status=TaskStatus.FAILED, updated_before=cutoff)
    assert [t.task_id for t in listed] == [task.task_id]
    # The operator's redrive lands between the janitor's listing and its delete.
    backends.store.transition(task.task_id, expected={TaskStatus.FAILED}, to=TaskStatus.QUEUED)

    assert backends.store.delete(task.task_id, finished_before=cutoff) is False
    assert backends.store.get(task.task_id).status is TaskStatus.QUEUED


def test_files_no_task_refers_to_expire_after_the_retention_and_a_margin(backends: Backends) -> None:
    payloads = backends.payloads
    assert isinstance(payloads, FileBlobStore)
    payloads.put("orphan.json", b"{}")
    payloads.put("fresh.json", b"{}")
    old = time.time() - 3 * RETENTION_S
    os.utime(payloads.path("orphan.json"), (old, old))

    report = purge(backends, retention_s=RETENTION_S, orphan_margin_s=RETENTION_S)

    assert report.orphans == 1
    assert not exists(payloads, "orphan.json") and exists(payloads, "fresh.json")


def test_file_store_expire_by_mtime(tmp_path: Path) -> None:
    store = FileBlobStore(root=tmp_path / "blobs")
    assert store.expire(time.time()) == 0  # no root yet: nothing to do, nothing created
    store.put("a/0.png", b"old")
    store.put("a/1.png", b"new")
    store.put("b/0.png", b"old")
    writing = store.root / "a" / ".tmp-in-progress"
    writing.write_bytes(b"half")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not ours")
    (store.root / "link.png").symlink_to(outside)
    old = time.time() - 100
    for path in (store.path("a/0.png"), store.path("b/0.png"), outside):
        os.utime(path, (old, old))

    assert store.expire(time.time() - 50) == 2

    assert store.get("a/1.png") == b"new" and writing.exists()
    assert not (store.root / "b").exists()  # left empty, so removed
    assert outside.read_bytes() == b"not ours"  # a symlink is never followed
    assert store.root.is_dir()


def test_purged_tasks_and_images_answer_404_through_the_api(settings: Settings, backends: Backends) -> None:
    with TestClient(create_app(settings, backends=backends), base_url=LOCAL_URL) as client:
        created = client.post("/task", json=BODY)
        assert created.status_code == 202
        task_id = created.json()["taskId"]
        assert drain(backends) == 1
        shown = client.get(f"/tasks/{task_id}").json()
        assert shown["status"] == "succeeded"
        # Path and query: the query is the URL's signature.
        image_paths = [f"{urlsplit(url).path}?{urlsplit(url).query}" for url in shown["result"]["images"]]
        assert image_paths and all(client.get(path).status_code == 200 for path in image_paths)

        assert purge(backends, retention_s=RETENTION_S, now=time.time() + RETENTION_S + 1).tasks == 1

        assert client.get(f"/tasks/{task_id}").status_code == 404
        assert client.get("/task", params={"taskId": task_id}).status_code == 404
        assert [client.get(path).status_code for path in image_paths] == [404] * len(image_paths)


@dataclass
class FlakyBlobs:
    """A real blob store whose next ``failures`` deletes fail as a backend outage would."""

    inner: BlobStore
    failures: int
    capabilities: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        self.capabilities = self.inner.capabilities

    def put(self, key: str, data: bytes, *, content_type: str = "image/png") -> None:
        self.inner.put(key, data, content_type=content_type)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def url(self, key: str, *, base_url: str) -> str:
        return self.inner.url(key, base_url=base_url)

    def delete(self, key: str) -> None:
        if self.failures:
            self.failures -= 1
            raise BackendError(f"injected: cannot delete {key}")
        self.inner.delete(key)

    def close(self) -> None: ...

    def __enter__(self) -> FlakyBlobs:
        return self

    def __exit__(self, *exc: object) -> None: ...


def test_dead_letters_past_the_retention_are_deleted(backends: Backends, service: TaskService) -> None:
    task = service.submit(BODY)
    message = backends.queue.receive()[0]
    backends.queue.dead_letter(message.receipt, reason="poisoned")
    assert purge(backends, retention_s=RETENTION_S).dead_letters == 0  # not old enough

    assert purge(backends, retention_s=RETENTION_S, now=time.time() + RETENTION_S + 1).dead_letters == 1

    assert dlq.list_dead(backends) == []
    assert backends.store.get(task.task_id).status is TaskStatus.QUEUED  # a live task is never deleted
