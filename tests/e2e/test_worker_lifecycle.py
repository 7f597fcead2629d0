"""Worker behaviour a user sees: drain on SIGTERM, a spot notice, cancel and progress, a poisoned task."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_cli import TERMINAL, task, wait_status

from conftest import Processes, wait_healthy
from helpers import wait_until
from imds_server import ImdsServer

BODY = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "x", "steps": 20, "width": 64, "height": 64}}


def start_api(procs: Processes, port: int, data: Path) -> str:
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, procs.start("api", "--port", str(port), "--data-dir", str(data), name="api"), timeout=60)
    return url


def submit(url: str, body: dict[str, Any] = BODY) -> str:
    task_id: str = httpx.post(f"{url}/task", json=body, timeout=5).json()["taskId"]
    return task_id


def test_sigterm_mid_task_drains_and_the_task_completes(procs: Processes, port: int, tmp_path: Path) -> None:
    url = start_api(procs, port, tmp_path)
    worker = procs.start("worker", "--data-dir", str(tmp_path), "--engine", "fake://?seconds=2", name="worker")
    task_id = submit(url)
    wait_status(url, task_id, {"running"}, timeout=60)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    done = task(url, task_id)
    assert done["status"] == "succeeded", procs.log("worker")
    assert done["attempts"] == 1


def test_spot_notice_drains_and_another_worker_finishes(procs: Processes, port: int, tmp_path: Path) -> None:
    url = start_api(procs, port, tmp_path)
    with ImdsServer() as imds:
        spot = procs.start("worker", "--data-dir", str(tmp_path), "--engine", "fake://?seconds=30",
                           "--watch-spot", "--drain-timeout", "1", name="spot",
                           env={"SDASYNC_IMDS_URL": imds.url})
        task_id = submit(url)
        wait_status(url, task_id, {"running"}, timeout=60)
        imds.interrupt()
        noticed = time.monotonic()
        assert spot.wait(timeout=30) == 0, procs.log("spot")
        # The IMDS poll runs every 5 s and the drain takes 1 s: far inside the two-minute notice.
        assert time.monotonic() - noticed < 15
    released = task(url, task_id)
    assert released["status"] == "queued"
    procs.start("worker", "--data-dir", str(tmp_path), "--engine", "fake://?seconds=0.5", name="other")
    done = wait_status(url, task_id, TERMINAL, timeout=60)
    assert done["status"] == "succeeded"


def test_cancel_stops_a_running_task_within_two_seconds(procs: Processes, port: int, tmp_path: Path) -> None:
    url = start_api(procs, port, tmp_path)
    procs.start("worker", "--data-dir", str(tmp_path), "--engine", "fake://?seconds=30", name="worker")
    task_id = submit(url)
    running = wait_until(lambda: (t := task(url, task_id))["progress"] and t["progress"]["step"] >= 1 and t,
                         timeout=60, interval=0.05)
    assert running["status"] == "running"
    assert 0 < running["progress"]["fraction"] < 1
    assert running["progress"]["steps"] == 20
    cancelled_at = time.monotonic()
    assert httpx.delete(f"{url}/tasks/{task_id}", timeout=5).json()["status"] == "cancelled"
    # One worker: the next task starts only once the cancelled generation has stopped.
    next_id = submit(url, {**BODY, "payload": {**BODY["payload"], "steps": 2}})
    wait_status(url, next_id, {"running", "succeeded"}, timeout=30)
    assert time.monotonic() - cancelled_at < 2.5
    assert task(url, task_id)["result"] is None


@pytest.mark.slow
def test_a_poisoned_task_fails_and_can_be_redriven(procs: Processes, port: int, tmp_path: Path) -> None:
    url = start_api(procs, port, tmp_path)
    data = ["--data-dir", str(tmp_path)]
    task_id = submit(url)
    poisoned = procs.run("worker", *data, "--engine", "fake://?fail_rate=1", "--max-idle", "8")
    assert poisoned.returncode == 0, poisoned.stderr
    failed = task(url, task_id)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "engine_unavailable"
    assert "3 attempts" in failed["error"]["message"]
    assert [h["outcome"] for h in failed["history"]] == ["retried", "retried", "failed"]
    assert all(h["error"]["code"] == "engine_unavailable" and h["endedAt"].endswith("Z") for h in failed["history"])
    listed = procs.run("dlq", "list", *data)
    assert [row["taskId"] for row in json.loads(listed.stdout)] == [task_id]

    redriven = procs.run("dlq", "redrive", task_id, *data)
    assert json.loads(redriven.stdout) == [{"taskId": task_id, "result": "requeued"}]
    assert task(url, task_id)["status"] == "queued"
    assert procs.run("worker", *data, "--engine", "fake://", "--burst").returncode == 0
    assert task(url, task_id)["status"] == "succeeded"
    assert json.loads(procs.run("dlq", "list", *data).stdout) == []
