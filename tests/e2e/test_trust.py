"""Keys and webhooks end to end, as a new user tries them: ``sdasync keys create`` and ``sdasync serve`` as real
processes on a non-loopback bind, a webhook receiver started here that checks Standard Webhooks signatures with
its own code, and a worker killed by SIGKILL right after it marked its task ``succeeded``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from e2e.conftest import Processes, log_tail, wait_healthy
from helpers import wait_until
from webhook_receiver import WebhookReceiver

BODY = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a lighthouse", "steps": 2}}


def create_key(procs: Processes, data_dir: Path, tenant: str, *extra: str) -> dict[str, Any]:
    done = procs.run("keys", "create", "--tenant", tenant, "--json", "--data-dir", str(data_dir), *extra)
    assert done.returncode == 0, done.stderr
    created: dict[str, Any] = json.loads(done.stdout)
    return created


def test_keys_webhooks_and_a_worker_killed_after_success(procs: Processes, tmp_path: Path, port: int) -> None:
    data = tmp_path / "data"
    acme = create_key(procs, data, "acme")
    other = create_key(procs, data, "other")
    assert acme["key"].startswith("sda_") and acme["webhook_secret"].startswith("whsec_")
    with WebhookReceiver(secret=acme["webhook_secret"]) as receiver:
        receiver.fail(2)
        # 0.0.0.0 is not loopback: keys are required. Every worker dies right after its task is succeeded.
        server = procs.start("serve", "--host", "0.0.0.0", "--port", str(port), "--data-dir", str(data),
                             "--engine", "fake://?seconds=0.2", "--webhook-allow", "127.0.0.1",
                             "--visibility-timeout", "5", name="serve",
                             env={"SDASYNC_FAULTS": "completed:1", "SDASYNC_PUBLIC_URL": f"http://127.0.0.1:{port}"})
        url = f"http://127.0.0.1:{port}"
        assert wait_healthy(url, server) == {"ok": True}  # nothing internal without an operator key
        assert "API keys required" in procs.log("serve")
        assert httpx.post(f"{url}/task", json=BODY).status_code == 401
        headers = {"Authorization": f"Bearer {acme['key']}"}
        body = {**BODY, "webhook": receiver.url, "webhookEventsFilter": ["completed"]}
        submitted = httpx.post(f"{url}/task", json=body, headers=headers)
        assert submitted.status_code == 202, submitted.text
        task_id = submitted.json()["taskId"]
        assert httpx.get(f"{url}/tasks/{task_id}",
                         headers={"Authorization": f"Bearer {other['key']}"}).status_code == 404

        def delivered() -> dict[str, Any] | None:
            assert server.poll() is None, log_tail(server)
            task: dict[str, Any] = httpx.get(f"{url}/tasks/{task_id}", headers=headers).json()
            webhook = task["webhook"]
            return task if webhook["state"] == "delivered" else None

        task = wait_until(delivered, timeout=120, interval=0.2, message="the completed event was never delivered")
        assert task["status"] == "succeeded"
        assert "injected" not in json.dumps(task)
        received = receiver.received
        assert [r.answered for r in received] == [500, 500, 200]
        assert {r.headers["webhook-id"] for r in received} == {task["webhook"]["eventId"]}
        assert all(r.valid for r in received), "a delivery failed the independent signature check"
        event = json.loads(received[-1].body)
        assert event["type"] == "task.completed"
        assert event["data"]["taskId"] == task_id and event["data"]["status"] == "succeeded"
        assert [d["status"] for d in task["webhook"]["deliveries"]] == [500, 500, 200]
        # The worker really was killed after the success write: serve restarted it.
        assert "exited with -9; restarting it" in procs.log("serve")
        usage = httpx.get(f"{url}/usage", headers=headers).json()
        assert usage["tasks"] == 1 and usage["gpuSeconds"] > 0


def test_a_task_with_cancel_after_behind_a_busy_worker_never_runs(procs: Processes, tmp_path: Path,
                                                                 port: int) -> None:
    data = tmp_path / "data"
    server = procs.start("serve", "--port", str(port), "--data-dir", str(data), "--engine", "fake://?seconds=6",
                         name="serve")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, server)
    assert "API keys NOT required" in procs.log("serve")
    busy = httpx.post(f"{url}/task", json=BODY).json()["taskId"]
    wait_until(lambda: httpx.get(f"{url}/tasks/{busy}").json()["status"] == "running", timeout=60, interval=0.1)
    late = httpx.post(f"{url}/task", json=BODY, headers={"Cancel-After": "2s"}).json()["taskId"]
    started = time.monotonic()

    def cancelled() -> dict[str, Any] | None:
        task: dict[str, Any] = httpx.get(f"{url}/tasks/{late}").json()
        return task if task["status"] == "cancelled" else None

    task = wait_until(cancelled, timeout=30, interval=0.2)
    assert time.monotonic() - started < 6, "cancelled only once the busy task was done"
    assert task["error"]["code"] == "deadline"
    assert task["attempts"] == 0 and task["history"] == []
    wait_until(lambda: httpx.get(f"{url}/tasks/{busy}").json()["status"] == "succeeded", timeout=60, interval=0.2)
    # The worker took the late task's message afterwards and left it alone.
    assert httpx.get(f"{url}/tasks/{late}").json()["attempts"] == 0
