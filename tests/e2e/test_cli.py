"""The CLI as a new user runs it: real processes, real HTTP, the README's own request."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import Processes, wait_healthy
from helpers import wait_until

README = Path(__file__).parents[2] / "README.md"
TERMINAL = {"succeeded", "failed", "cancelled"}


def readme_curl() -> list[str]:
    """The README's POST /task curl command, as a new user would paste it."""
    text = README.read_text()
    match = re.search(r"```bash\n(curl -X POST .*?/task.*?)\n```", text, re.S)
    assert match, "README.md has no curl example for POST /task"
    return shlex.split(match.group(1).replace("\\\n", " "))


def task(url: str, task_id: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/tasks/{task_id}", timeout=5).json()
    return body


def wait_status(url: str, task_id: str, statuses: set[str], timeout: float = 120) -> dict[str, Any]:
    return wait_until(lambda: (t := task(url, task_id))["status"] in statuses and t, timeout=timeout, interval=0.05,
                      message=f"task {task_id} never reached {statuses}")


@pytest.mark.slow
def test_readme_request_end_to_end(procs: Processes, port: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{port}"
    serve = procs.start("serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--workers", "1",
                        name="serve")
    health = wait_healthy(url, serve)
    assert health["ok"] is True

    command = readme_curl()
    command = [re.sub(r"^https?://[^/]+", url, part) if part.startswith("http") else part for part in command]
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    answer = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    task_id = json.loads(answer.stdout)["taskId"]

    done = wait_status(url, task_id, TERMINAL, timeout=180)
    assert done["status"] == "succeeded", (done, procs.log("serve"))
    assert done["result"]["info"]["steps"] == 20
    assert done["result"]["info"]["width"] == 512
    assert isinstance(done["result"]["info"]["all_seeds"], list)
    (image_url,) = done["result"]["images"]
    assert image_url.startswith(url)
    image = httpx.get(image_url, timeout=10)
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (512, 512)

    shown = procs.run("status", task_id, "--url", url)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "succeeded"

    out = tmp_path / "out"
    submitted = procs.run("submit", "a red fox", "--steps", "2", "--width", "128", "--height", "128", "--wait",
                          "--out", str(out), "--url", url)
    assert submitted.returncode == 0, submitted.stderr
    saved = json.loads(submitted.stdout)["saved"]
    assert len(saved) == 1
    assert Image.open(saved[0]).size == (128, 128)

    # Ctrl-C stops the API and its workers cleanly.
    serve.send_signal(signal.SIGINT)
    assert serve.wait(timeout=60) == 0
    assert "stopping workers" in procs.log("serve")


def test_sigkilled_worker_loses_no_task(procs: Processes, port: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{port}"
    data = ["--data-dir", str(tmp_path / "data")]
    api = procs.start("api", "--port", str(port), *data, name="api")
    wait_healthy(url, api, timeout=60)
    worker_args = ["worker", "--engine", "fake://?seconds=4", "--visibility-timeout", "2", *data]
    first = procs.start(*worker_args, name="worker1")
    task_id = httpx.post(f"{url}/task", json={"api": "/sdapi/v1/txt2img", "payload": {
        "prompt": "x", "steps": 20, "width": 64, "height": 64}}, timeout=5).json()["taskId"]
    wait_status(url, task_id, {"running"}, timeout=60)
    first.kill()
    first.wait(timeout=10)
    assert task(url, task_id)["status"] == "running"

    procs.start(*worker_args, name="worker2")
    done = wait_status(url, task_id, TERMINAL, timeout=60)
    assert done["status"] == "succeeded", procs.log("worker2")
    assert done["attempts"] == 2
    assert len(done["result"]["images"]) == 1


def test_cancelled_queued_task_never_runs(procs: Processes, port: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{port}"
    data = ["--data-dir", str(tmp_path / "data")]
    api = procs.start("api", "--port", str(port), *data, name="api")
    wait_healthy(url, api, timeout=60)
    submitted = procs.run("submit", "never drawn", "--url", url)
    task_id = json.loads(submitted.stdout)["taskId"]
    cancelled = procs.run("cancel", task_id, "--url", url)
    assert json.loads(cancelled.stdout)["status"] == "cancelled"

    worker = procs.run("worker", "--engine", "fake://", "--burst", *data)
    assert worker.returncode == 0, worker.stderr
    final = task(url, task_id)
    assert final["status"] == "cancelled"
    assert final["attempts"] == 0
    assert final["result"] is None
    assert not (tmp_path / "data" / "results" / task_id).exists()
    again = procs.run("cancel", task_id, "--url", url)
    assert again.returncode == 2
    assert "already cancelled" in again.stderr


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: its parent, init here, may not reap it at once)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in {"Z", "X"}


def test_workers_stop_when_serve_is_killed(procs: Processes, port: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{port}"
    serve = procs.start("serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--workers", "2",
                        "--engine", "fake://", name="serve")
    health = wait_until(lambda: (h := wait_healthy(url, serve))["workers"]["running"] == 2 and h,  # type: ignore[index]
                        timeout=60)
    pids = health["workers"]["pids"]
    serve.kill()
    serve.wait(timeout=10)
    wait_until(lambda: all(gone(pid) for pid in pids), timeout=30, message=f"orphaned workers {pids} kept running")


def test_simulate_json(procs: Processes, tmp_path: Path) -> None:
    done = procs.run("simulate", "--trace", "poisson", "--policy", "sdasync", "--policy", "keda", "--format", "json",
                     "--plot", str(tmp_path / "plot.png"))
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["policy"] for r in rows] == ["sdasync", "keda"]
    for key in ("trace", "instance_hours", "wait_p50_s", "wait_p95_s", "wait_p99_s", "max_backlog", "interrupted"):
        assert key in rows[0]
    assert rows[0]["interrupted"] == 0
    assert Image.open(tmp_path / "plot.png").format == "PNG"
