"""``serve`` drains its workers on Ctrl-C while the API keeps answering, so clients can still poll the tasks being
finished; ``/healthz`` answers at once meanwhile, and says it is stopping."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx

from e2e.conftest import Processes, wait_healthy
from helpers import wait_until
from sdasync.config import Settings
from sdasync.models import Outcome, TaskStatus
from sdasync.service import open_backends

BODY = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64}}


def status(url: str, task_id: str) -> str:
    state: str = httpx.get(f"{url}/tasks/{task_id}", timeout=10).json()["status"]
    return state


def test_the_api_answers_while_serve_drains_its_workers(procs: Processes, port: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{port}"
    serve = procs.start("serve", "--data-dir", str(tmp_path / "data"), "--port", str(port),
                        "--engine", "fake://?seconds=15", "--drain-timeout", "120", name="serve")
    wait_healthy(url, serve)
    task_id = httpx.post(f"{url}/task", json=BODY, timeout=10).json()["taskId"]
    wait_until(lambda: status(url, task_id) == "running", timeout=60, message="the task never started")

    serve.send_signal(signal.SIGINT)

    # The worker is still generating (15 s, far longer than this takes): the API answers, and its health says
    # it is stopping, at once.
    health = httpx.get(f"{url}/healthz", timeout=5)
    assert health.status_code == 503
    assert health.json()["workers"]["stopping"] is True
    assert status(url, task_id) in {"running", "succeeded"}
    # serve stops its API as soon as the worker is gone: the outcome is read from the store afterwards.
    assert serve.wait(timeout=120) == 0
    with open_backends(Settings(data_dir=tmp_path / "data")) as backends:
        done = backends.store.get(task_id)
    assert done.status is TaskStatus.SUCCEEDED
    assert [entry.outcome for entry in done.history] == [Outcome.SUCCEEDED]
