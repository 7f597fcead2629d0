"""Keys, tenants, quotas, idempotency and deadlines at the HTTP API, over a real SQLite store.

Each test builds the app as ``sdasync api`` would (``create_app(settings)`` opens the backends the settings name)
and makes keys with a second handle on the same file, as ``sdasync keys create`` in another process would.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from helpers import wait_until
from sdasync.api.app import create_app
from sdasync.auth.keys import KeyRing
from sdasync.backends.sqlite.store import SqliteTaskStore
from sdasync.config import Settings
from sdasync.models import TaskStatus
from sdasync.service import open_backends
from sdasync.trust import records_of

BODY = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a lighthouse", "steps": 2}}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, auth=True)


@pytest.fixture
def store(settings: Settings) -> Iterator[SqliteTaskStore]:
    with SqliteTaskStore(path=settings.data_dir / "sdasync.db") as store:
        yield store


@pytest.fixture
def keys(store: SqliteTaskStore) -> KeyRing:
    return KeyRing(store)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ROUTES = [("GET", "/openapi.json"), ("GET", "/docs"),
          ("GET", "/task?taskId=" + "0" * 32), ("GET", "/tasks/" + "0" * 32), ("GET", "/tasks"),
          ("DELETE", "/tasks/" + "0" * 32), ("DELETE", "/task?taskId=" + "0" * 32), ("GET", "/usage"),
          ("POST", "/task")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("key", [None, "sda_nonsense", "Bearer", ""])
def test_every_route_but_healthz_is_a_401_without_a_valid_key(client: TestClient, method: str, path: str,
                                                              key: str | None) -> None:
    headers = {} if key is None else bearer(key)
    response = client.request(method, path, headers=headers, json=BODY if method == "POST" else None)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_x_api_key_works_too(client: TestClient, keys: KeyRing) -> None:
    key, _ = keys.create("acme")
    assert client.get("/tasks", headers={"X-API-Key": key}).status_code == 200
    assert client.get("/openapi.json", headers={"X-API-Key": key}).json()["info"]["title"] == "sdasync"


def test_healthz_reveals_nothing_internal_without_an_operator_key(client: TestClient, keys: KeyRing) -> None:
    assert client.get("/healthz").json() == {"ok": True}
    tenant, _ = keys.create("acme")
    assert client.get("/healthz", headers=bearer(tenant)).json() == {"ok": True}
    admin, _ = keys.create("ops", admin=True)
    assert "queue" in client.get("/healthz", headers=bearer(admin)).json()


def test_a_tenant_never_sees_another_tenants_tasks(client: TestClient, keys: KeyRing) -> None:
    a, _ = keys.create("tenant-a")
    b, _ = keys.create("tenant-b")
    admin, _ = keys.create("ops", admin=True)
    theirs = client.post("/task", json=BODY, headers=bearer(b)).json()["taskId"]
    mine = client.post("/task", json=BODY, headers=bearer(a)).json()["taskId"]
    for method, path in [("GET", f"/tasks/{theirs}"), ("GET", f"/task?taskId={theirs}"),
                         ("DELETE", f"/tasks/{theirs}"), ("DELETE", f"/task?taskId={theirs}")]:
        response = client.request(method, path, headers=bearer(a))
        assert response.status_code == 404, (method, path)
        # The same answer as for an id that never existed: no oracle.
        assert response.json()["error"]["code"] == "task_not_found"
    listed = [t["taskId"] for t in client.get("/tasks", headers=bearer(a)).json()["tasks"]]
    assert listed == [mine]
    assert [t["taskId"] for t in client.get("/tasks?tenant=tenant-b", headers=bearer(a)).json()["tasks"]] == [mine]
    everyone = {t["taskId"] for t in client.get("/tasks", headers=bearer(admin)).json()["tasks"]}
    assert everyone == {mine, theirs}
    assert client.get(f"/tasks/{theirs}", headers=bearer(admin)).status_code == 200
    # B's task is untouched by A's attempts to cancel it.
    assert client.get(f"/tasks/{theirs}", headers=bearer(b)).json()["status"] == "queued"


def test_a_revoked_key_is_refused_at_once_by_every_api_process(settings: Settings, keys: KeyRing,
                                                               client: TestClient) -> None:
    key, api_key = keys.create("acme")
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as other:
        assert client.get("/tasks", headers=bearer(key)).status_code == 200
        assert other.get("/tasks", headers=bearer(key)).status_code == 200
        keys.revoke(api_key.key_id)
        assert client.get("/tasks", headers=bearer(key)).status_code == 401
        assert other.get("/tasks", headers=bearer(key)).status_code == 401


def test_over_the_rate_is_a_429_with_retry_after_and_others_are_unaffected(client: TestClient,
                                                                           keys: KeyRing) -> None:
    slow, _ = keys.create("slow", rate=0.01, burst=2)
    other, _ = keys.create("other")
    assert [client.post("/task", json=BODY, headers=bearer(slow)).status_code for _ in range(2)] == [202, 202]
    refused = client.post("/task", json=BODY, headers=bearer(slow))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert client.post("/task", json=BODY, headers=bearer(other)).status_code == 202
    assert len(client.get("/tasks", headers=bearer(slow)).json()["tasks"]) == 2


def test_over_the_queued_cap_is_a_429_until_a_task_leaves_the_queue(client: TestClient, keys: KeyRing) -> None:
    capped, _ = keys.create("capped", max_queued=2)
    other, _ = keys.create("other")
    ids = [client.post("/task", json=BODY, headers=bearer(capped)).json()["taskId"] for _ in range(2)]
    refused = client.post("/task", json=BODY, headers=bearer(capped))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "max_queued"
    assert "retry-after" in refused.headers
    assert client.post("/task", json=BODY, headers=bearer(other)).status_code == 202
    client.delete(f"/tasks/{ids[0]}", headers=bearer(capped))
    assert client.post("/task", json=BODY, headers=bearer(capped)).status_code == 202


def test_the_queue_depth_cap_refuses_everyone(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_queue_depth=2)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as client:
        assert [client.post("/task", json=BODY).status_code for _ in range(2)] == [202, 202]
        refused = client.post("/task", json=BODY)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "queue_full"


def aws_settings(tmp_path: Path) -> Settings:
    from sdasync.bootstrap import bootstrap

    suffix = uuid.uuid4().hex[:8]
    urls = {"queue": f"sqs://trust-{suffix}", "store": f"dynamodb://trust_{suffix}",
            "blobs": f"s3://trust-{suffix}/results"}
    bootstrap(urls)
    return Settings(data_dir=tmp_path, auth=True, queue=urls["queue"], store=urls["store"], blobs=urls["blobs"])


@pytest.mark.parametrize("backend", ["sqlite", "aws"])
def test_fifty_concurrent_submits_with_one_idempotency_key_make_one_task(tmp_path: Path, backend: str,
                                                                         request: pytest.FixtureRequest) -> None:
    if backend == "aws":
        request.getfixturevalue("aws_endpoint")
        settings = aws_settings(tmp_path)
    else:
        settings = Settings(data_dir=tmp_path, auth=True)
    # Two API processes' worth of apps, each with its own backends, sharing the one store and queue.
    with open_backends(settings) as backends, \
            TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as first, \
            TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as second:
        key, _ = KeyRing(records_of(backends.store)).create("acme")
        headers = {**bearer(key), "Idempotency-Key": "order-1234"}
        for client in (first, second):
            # FastAPI builds its routes' parameters on the first request. Under uvicorn that happens on the one
            # event loop; TestClient runs each calling thread's request on a loop of its own, so fifty first
            # requests at once would build them concurrently, which pydantic does not support. One request each
            # first (refused: it makes nothing).
            assert client.post("/task", json={}, headers=bearer(key)).status_code == 422
        start = threading.Barrier(50)

        def submit(i: int) -> tuple[int, str]:
            start.wait()
            response = (first if i % 2 else second).post("/task", json=BODY, headers=headers)
            assert response.status_code in (200, 202), response.text
            return response.status_code, response.json()["taskId"]

        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(submit, range(50)))
        assert len({task_id for _, task_id in answers}) == 1
        assert sorted(status for status, _ in answers) == [200] * 49 + [202]
        assert len(backends.store.list(tenant="acme").tasks) == 1
        depth = backends.queue.depth()
        assert depth.visible + depth.delayed + depth.in_flight == 1, "one message, for the one task"


def test_an_idempotency_key_with_another_body_is_a_422_and_keys_are_per_tenant(client: TestClient,
                                                                               keys: KeyRing) -> None:
    a, _ = keys.create("tenant-a")
    b, _ = keys.create("tenant-b")
    first = client.post("/task", json=BODY, headers={**bearer(a), "Idempotency-Key": "k1"})
    assert first.status_code == 202
    again = client.post("/task", json=BODY, headers={**bearer(a), "Idempotency-Key": "k1"})
    assert again.status_code == 200
    assert again.json()["taskId"] == first.json()["taskId"]
    other_body = {**BODY, "payload": {"prompt": "something else"}}
    refused = client.post("/task", json=other_body, headers={**bearer(a), "Idempotency-Key": "k1"})
    assert refused.status_code == 422
    assert refused.json()["error"]["field"] == "idempotency-key"
    # Another tenant's identical key is another key.
    theirs = client.post("/task", json=BODY, headers={**bearer(b), "Idempotency-Key": "k1"})
    assert theirs.status_code == 202
    assert theirs.json()["taskId"] != first.json()["taskId"]


@pytest.mark.parametrize("url", ["https://169.254.169.254/latest/meta-data", "http://127.0.0.1:9/hook",
                                 "https://127.0.0.1/hook", "https://[::1]/hook", "https://10.1.2.3/hook",
                                 "ftp://example.com/hook", "https://user:pw@127.0.0.1/x"])
def test_a_webhook_to_a_private_address_is_refused_at_submit(client: TestClient, keys: KeyRing, url: str) -> None:
    key, _ = keys.create("acme")
    response = client.post("/task", json={**BODY, "webhook": url}, headers=bearer(key))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "webhook"
    assert client.get("/tasks", headers=bearer(key)).json()["tasks"] == []


def test_webhook_fields_sit_beside_the_payload_never_inside(client: TestClient, keys: KeyRing) -> None:
    key, _ = keys.create("acme")
    inside = {"api": BODY["api"], "payload": {**BODY["payload"], "webhook": "https://example.com/h"}}
    response = client.post("/task", json=inside, headers=bearer(key))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "payload.webhook"
    bad_filter = {**BODY, "webhook_events_filter": ["done"]}
    response = client.post("/task", json=bad_filter, headers=bearer(key))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "webhook"  # a filter without a webhook


@pytest.mark.parametrize(("headers", "extra", "field"), [
    ({"Cancel-After": "soon"}, {}, "cancel-after"),
    ({"Cancel-After": "0s"}, {}, "cancel-after"),
    ({}, {"deadline": "2020-01-01T00:00:00Z"}, "deadline"),
    ({}, {"deadline": "tomorrow"}, "deadline"),
    ({}, {"deadline": "2030-01-01T00:00:00"}, "deadline"),
])
def test_bad_deadlines_are_refused(client: TestClient, keys: KeyRing, headers: dict[str, str],
                                   extra: dict[str, Any], field: str) -> None:
    key, _ = keys.create("acme")
    response = client.post("/task", json={**BODY, **extra}, headers={**bearer(key), **headers})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == field


def test_a_queued_task_past_its_deadline_ends_cancelled_and_never_runs(client: TestClient, keys: KeyRing,
                                                                      store: SqliteTaskStore) -> None:
    key, _ = keys.create("acme")
    task_id = client.post("/task", json=BODY, headers={**bearer(key), "Cancel-After": "1s"}).json()["taskId"]
    assert client.get(f"/tasks/{task_id}", headers=bearer(key)).json()["deadline"] is not None

    def ended() -> dict[str, Any] | None:
        task: dict[str, Any] = client.get(f"/tasks/{task_id}", headers=bearer(key)).json()
        return task if task["status"] == "cancelled" else None

    task = wait_until(ended, timeout=10)
    assert task["error"]["code"] == "deadline"
    assert task["attempts"] == 0
    assert store.get(task_id).status is TaskStatus.CANCELLED


def test_embedded_image_urls_are_signed_and_expire(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, auth=True, url_ttl=2)
    with SqliteTaskStore(path=tmp_path / "sdasync.db") as store, \
            TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as client:
        keys = KeyRing(store)
        a, _ = keys.create("tenant-a")
        b, _ = keys.create("tenant-b")
        task_id = client.post("/task", json=BODY, headers=bearer(b)).json()["taskId"]
        image_key = f"tenant-b/{task_id}/0.png"
        (tmp_path / "results" / "tenant-b" / task_id).mkdir(parents=True)
        (tmp_path / "results" / image_key).write_bytes(b"\x89PNG fake")
        claimed = store.transition(task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING,
                                   changes={"attempts": 1})
        store.transition(task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.SUCCEEDED, attempt=claimed.attempts,
                         changes={"images": (image_key,), "info": {}})
        url = client.get(f"/tasks/{task_id}", headers=bearer(b)).json()["result"]["images"][0]
        assert "sig=" in url and "exp=" in url
        path = url.removeprefix("http://127.0.0.1:8080")
        assert client.get(path).status_code == 200  # a browser: no key, the signature is the capability
        assert client.get(path, headers=bearer(b)).status_code == 200
        assert client.get(path, headers=bearer(a)).status_code == 404  # another tenant's key: not theirs
        assert client.get(path.split("?")[0]).status_code == 404  # unsigned: cannot be guessed
        assert client.get(path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB")).status_code == 404
        wait_until(lambda: client.get(path).status_code == 404, timeout=10, interval=0.2,
                   message="the image URL still works after its TTL")


def test_usage_reports_the_tenants_gpu_seconds(client: TestClient, keys: KeyRing, store: SqliteTaskStore) -> None:
    key, _ = keys.create("acme")
    other, _ = keys.create("other")
    task_id = client.post("/task", json=BODY, headers=bearer(key)).json()["taskId"]
    client.post("/task", json=BODY, headers=bearer(other))
    claimed = store.transition(task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING,
                               changes={"attempts": 1, "started_at": time.time()})
    store.transition(task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.SUCCEEDED, attempt=claimed.attempts,
                     changes={"history": [{"attempt": 1, "worker": "w", "started_at": 1.0, "ended_at": 2.5,
                                           "outcome": "succeeded", "engine_s": 1.25}]})
    usage = client.get("/usage", headers=bearer(key)).json()
    assert usage["tenant"] == "acme"
    assert usage["tasks"] == 1
    assert usage["gpuSeconds"] == 1.25
    assert usage["days"][0]["succeeded"] == 1
    assert client.get(f"/tasks/{task_id}", headers=bearer(key)).json()["gpuSeconds"] == 1.25
    assert client.get("/usage", headers=bearer(other)).json()["gpuSeconds"] == 0


def test_a_slow_first_request_and_a_takeover_still_make_one_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """The first request under a key stalls between its claim and its write (a slow send) longer than the
    takeover time: the retry takes the claim over under the same task id, so the two writes collide and the key
    still names one task."""
    from sdasync import idempotency
    from sdasync.callers import Caller
    from sdasync.service import TaskService

    monkeypatch.setattr(idempotency, "TAKEOVER_S", 0.2)
    settings = Settings(data_dir=tmp_path)
    with open_backends(settings) as slow_backends, open_backends(settings) as backends:
        sent = threading.Event()
        release = threading.Event()
        real_send = slow_backends.queue.send

        def stalled_send(body: str, *, delay_s: float = 0) -> str:
            sent.set()
            release.wait(10)
            return real_send(body, delay_s=delay_s)

        monkeypatch.setattr(slow_backends.queue, "send", stalled_send)
        caller = Caller(tenant="acme")
        slow, fast = TaskService(slow_backends), TaskService(backends)
        results: list[Any] = []
        first = threading.Thread(target=lambda: results.append(
            slow.submit_request(BODY, caller, idempotency_key="k")))
        first.start()
        assert sent.wait(10)
        time.sleep(0.3)  # past the (shortened) takeover time: the claim is stale now
        retry = fast.submit_request(BODY, caller, idempotency_key="k")
        release.set()
        first.join(10)
        assert retry.created and not results[0].created
        assert results[0].task.task_id == retry.task.task_id
        assert len(backends.store.list(tenant="acme").tasks) == 1


def test_a_retry_after_its_deadline_passed_is_still_a_replay(client: TestClient, keys: KeyRing) -> None:
    key, _ = keys.create("acme")
    headers = {**bearer(key), "Idempotency-Key": "k2"}
    deadline = time.time() + 1.5
    first = client.post("/task", json={**BODY, "deadline": deadline}, headers=headers)
    assert first.status_code == 202
    wait_until(lambda: time.time() > deadline + 0.1, timeout=5)
    again = client.post("/task", json={**BODY, "deadline": deadline}, headers=headers)
    assert again.status_code == 200 and again.json()["taskId"] == first.json()["taskId"]


def test_odd_values_are_422s_naming_the_field(client: TestClient, keys: KeyRing) -> None:
    key, _ = keys.create("acme")
    admin, _ = keys.create("ops", admin=True)
    huge = b'{"api":"/sdapi/v1/txt2img","payload":{},"deadline":1' + b"0" * 400 + b"}"
    response = client.post("/task", content=huge, headers={**bearer(key), "content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "deadline"
    for path in ("/tasks?tenant=../x", "/usage?tenant=BAD"):
        response = client.get(path, headers=bearer(admin))
        assert response.status_code == 422 and response.json()["error"]["field"] == "tenant", path
    assert client.get("/tasks?tenant=", headers=bearer(admin)).status_code == 200
    assert client.get("/tasks", headers=bearer(key)).json()["tasks"] == []


def test_the_local_tenant_is_reserved(keys: KeyRing) -> None:
    from sdasync.errors import RequestError

    with pytest.raises(RequestError, match="reserved"):
        keys.create("local")


def test_key_less_mode_answers_only_a_trusted_host(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(data_dir=tmp_path)), base_url="http://127.0.0.1:8080") as client:
        assert client.get("/tasks").status_code == 200
        assert "queue" in client.get("/healthz").json()
        rebound = {"host": "attacker.example:8080"}  # a page that rebound its name to 127.0.0.1
        assert client.get("/tasks", headers=rebound).status_code == 401
        assert client.post("/task", json=BODY, headers=rebound).status_code == 401
        assert client.get("/healthz", headers=rebound).json() == {"ok": True}
