"""A worker process whose WebUI never comes up: it says what it waits for, and SIGTERM ends it at once."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from conftest import Processes
from helpers import free_port, wait_until
from sdasync.backends.registry import open_store
from sdasync.models import WorkerRecord
from sdasync.urls import url_for_path


def test_sigterm_ends_a_wait_for_an_engine_that_never_came_up(procs: Processes, tmp_path: Path) -> None:
    engine_url = f"webui+http://127.0.0.1:{free_port()}"  # nothing listens there
    worker = procs.start("worker", "--data-dir", str(tmp_path), "--engine", engine_url, "--drain-timeout", "60",
                         name="worker")
    with open_store(url_for_path("sqlite", tmp_path / "sdasync.db")) as store:

        def waiting() -> WorkerRecord | None:
            assert worker.poll() is None, procs.log("worker")
            records = store.workers()
            return records[0] if records else None

        record = wait_until(waiting, timeout=60, interval=0.05)
        assert record.engine == engine_url
        assert record.health.ok is False
        assert record.health.detail.startswith(f"waiting for engine at {engine_url}")
        assert record.pid == worker.pid
        wait_until(lambda: "waiting for the WebUI" in procs.log("worker"), timeout=30)

        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        # Not the 60 s drain, and not a SIGKILL at its end: the wait ends as soon as the stop is asked for.
        assert worker.wait(timeout=20) == 0, procs.log("worker")
        assert time.monotonic() - signalled < 10
        assert store.workers() == []  # a clean exit leaves no record behind
    log = procs.log("worker")
    assert f"waiting for the WebUI at http://127.0.0.1:{engine_url.rsplit(':', 1)[1]}" in log
    assert f"stopped while waiting for engine at {engine_url}" in log
