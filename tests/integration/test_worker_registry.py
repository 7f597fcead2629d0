"""The worker's registry record in the SQLite task store, and waits for an engine that a stop request ends."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import wait_until
from sdasync.config import Settings
from sdasync.engines.base import GenerationRequest, GenerationResult
from sdasync.engines.fake import FakeEngine
from sdasync.errors import BackendError, EngineUnavailable
from sdasync.models import EngineHealth, TaskStatus, WorkerRecord
from sdasync.service import Backends, TaskService, open_backends
from sdasync.worker.loop import Worker, WorkerConfig
from sdasync.worker.registry import EXPIRY_BEATS, Heartbeat, public_url

BODY = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a cat", "steps": 20, "width": 64, "height": 64}}
WEBUI_URL = "webui+http://127.0.0.1:7860"


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Backends]:
    with open_backends(Settings(data_dir=tmp_path)) as opened:
        yield opened


def make_worker(backends: Backends, engine: Any, **config: Any) -> Worker:
    config = {"visibility_timeout_s": 5, "wait_s": 0.05, "heartbeat_s": 0.1, "engine_probe_s": 0.05,
              "engine_url": "fake://?seconds=1", **config}
    return Worker(queue=backends.queue, store=backends.store, blobs=backends.blobs, payloads=backends.payloads,
                  engine=engine, config=WorkerConfig(**config))


def run_in_thread(worker: Worker, **kwargs: Any) -> threading.Thread:
    thread = threading.Thread(target=worker.run, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def only_record(backends: Backends) -> WorkerRecord | None:
    records = backends.store.workers()
    assert len(records) <= 1, records
    return records[0] if records else None


class StalledEngine(FakeEngine):
    """An engine whose setup waits for a remote engine that never comes: only the stop event ends it."""

    def setup(self, stop: threading.Event | None = None) -> None:
        assert stop is not None, "the worker must hand its stop event to the engine"
        stop.wait(60)
        raise EngineUnavailable("stopped while waiting")

    def health(self) -> EngineHealth:
        return EngineHealth(ok=False, detail="ConnectError")


def test_public_url_strips_credentials() -> None:
    assert public_url("webui+http://user:secret@127.0.0.1:7860/sd?read_timeout=5") == \
        "webui+http://127.0.0.1:7860/sd?read_timeout=5"
    assert public_url("webui+http://token@gpu:7860") == "webui+http://gpu:7860"
    assert public_url(WEBUI_URL) == WEBUI_URL
    assert public_url("diffusers://tiny") == "diffusers://tiny"


def test_a_working_worker_publishes_its_engine_and_task_then_leaves(backends: Backends) -> None:
    task = TaskService(backends).submit(BODY)
    worker = make_worker(backends, FakeEngine(seconds=1.0),
                         engine_url="fake://me:pw@?seconds=1")  # credentials must not reach the registry
    thread = run_in_thread(worker, max_tasks=1)

    busy = wait_until(lambda: (r := only_record(backends)) is not None and r.task_id == task.task_id and r,
                      timeout=10)
    assert busy.worker_id == worker.config.worker_id
    assert busy.engine == "fake://?seconds=1"
    assert busy.health.ok is True and busy.health.model == "fake"
    assert (busy.host, busy.pid) == (socket.gethostname(), os.getpid())
    assert busy.expires_at == pytest.approx(busy.heartbeat_at + EXPIRY_BEATS * 0.1)
    assert busy.started_at <= busy.heartbeat_at
    # The heartbeat keeps it fresh.
    later = wait_until(lambda: (r := only_record(backends)) is not None and r.heartbeat_at > busy.heartbeat_at and r)
    assert later.started_at == busy.started_at

    thread.join(timeout=10)
    assert not thread.is_alive()
    assert TaskStatus.SUCCEEDED is TaskService(backends).get(task.task_id).status
    assert backends.store.workers() == []  # a clean exit removes the record


def test_a_record_that_is_not_refreshed_expires(backends: Backends) -> None:
    beat = Heartbeat(backends.store, worker_id="w1", engine_url=WEBUI_URL, interval_s=5.0,
                     snapshot=lambda: (EngineHealth(ok=True), None))
    assert beat.beat()
    record = backends.store.workers()[0]
    assert backends.store.workers(now=record.expires_at - 0.1) == [record]
    assert backends.store.workers(now=record.expires_at + 0.1) == []  # its worker is gone


def test_a_worker_waiting_for_its_engine_says_so_and_stops_at_once(backends: Backends,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sdasync.worker")
    service = TaskService(backends)
    worker = make_worker(backends, StalledEngine(), engine_url="webui+http://u:p@127.0.0.1:9/")
    thread = run_in_thread(worker)

    waiting = wait_until(lambda: only_record(backends), timeout=10)
    assert waiting.health.ok is False and waiting.health.loaded is False
    assert waiting.health.detail == "waiting for engine at webui+http://127.0.0.1:9/"
    assert waiting.task_id is None
    task = service.submit(BODY)  # sits queued, and the registry says why

    started = time.monotonic()
    worker.request_stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2
    assert service.get(task.task_id).status is TaskStatus.QUEUED  # untouched: still there for a worker with an engine
    assert backends.store.workers() == []
    assert any("webui+http://127.0.0.1:9/" in r.getMessage() and "waiting" in r.getMessage()
               for r in caplog.records)
    assert not any("u:p@" in r.getMessage() for r in caplog.records)


def test_an_engine_that_is_not_ready_yet_is_waited_for_and_the_record_says_why(backends: Backends) -> None:
    attempts = {"n": 0}

    class LateEngine(FakeEngine):
        def setup(self, stop: threading.Event | None = None) -> None:
            attempts["n"] += 1
            if attempts["n"] < 4:
                raise EngineUnavailable("not ready after 0.1 s: ConnectError")
            super().setup(stop)

    task = TaskService(backends).submit({**BODY, "payload": {**BODY["payload"], "steps": 2}})
    worker = make_worker(backends, LateEngine(), engine_url=WEBUI_URL)
    thread = run_in_thread(worker, max_tasks=1)
    waiting = wait_until(lambda: (r := only_record(backends)) is not None and "ConnectError" in r.health.detail and r,
                         timeout=10)
    assert waiting.health.ok is False
    assert waiting.health.detail.startswith(f"waiting for engine at {WEBUI_URL} (")
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert attempts["n"] == 4
    assert TaskService(backends).get(task.task_id).status is TaskStatus.SUCCEEDED


def test_a_stop_ends_the_wait_for_an_engine_that_went_down(backends: Backends) -> None:
    class Dies(FakeEngine):
        def generate(self, request: GenerationRequest) -> GenerationResult:
            raise EngineUnavailable("connection refused")

        def health(self) -> EngineHealth:
            return EngineHealth(ok=False, detail="ConnectError: refused")

    task = TaskService(backends).submit(BODY)
    worker = make_worker(backends, Dies(), engine_probe_s=0.05)
    thread = run_in_thread(worker)
    # Before setup the record says it waits for the engine, and a heartbeat may carry the engine's own word
    # ("refused"): wait for the wait that follows the failed task, which says both.
    down = wait_until(lambda: worker.engine_down.is_set() and (r := only_record(backends)) is not None
                      and "waiting for engine at" in r.health.detail and "refused" in r.health.detail and r,
                      timeout=10)
    assert down.health.ok is False and "waiting for engine at fake://?seconds=1" in down.health.detail
    assert worker.engine_down.is_set()
    started = time.monotonic()
    worker.request_stop()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - started < 2
    assert TaskService(backends).get(task.task_id).status is TaskStatus.QUEUED  # handed back, no attempt used


def test_a_registry_that_fails_is_logged_never_fatal(backends: Backends, caplog: pytest.LogCaptureFixture) -> None:
    class FailingRegistry:
        def __init__(self) -> None:
            self.tries = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(backends.store, name)

        def put_worker(self, record: WorkerRecord) -> None:
            self.tries += 1
            raise BackendError("store unavailable")

        def remove_worker(self, worker_id: str) -> None:
            raise BackendError("store unavailable")

    store = FailingRegistry()
    task = TaskService(backends).submit({**BODY, "payload": {**BODY["payload"], "steps": 2}})
    worker = Worker(queue=backends.queue, store=store, blobs=backends.blobs,  # type: ignore[arg-type]
                    payloads=backends.payloads, engine=FakeEngine(),
                    config=WorkerConfig(wait_s=0.05, heartbeat_s=0.05))
    assert worker.run(max_tasks=1) == 1
    assert TaskService(backends).get(task.task_id).status is TaskStatus.SUCCEEDED
    assert store.tries >= 1
    assert any("registry record not written" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert any("registry record not removed" in r.getMessage() for r in caplog.records)
