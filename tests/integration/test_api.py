from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sdasync.api.app import create_app
from sdasync.config import Limits, Settings

SEED_BODY = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "(masterpiece), portrait, chainmail", "steps": 20}}

#: Key-less mode answers only requests addressed to a trusted host (a defence against DNS rebinding).
LOCAL_URL = "http://127.0.0.1:8080"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, limits=Limits(max_body_bytes=64 * 1024))


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, health_checks={"engine": lambda: {"ok": True, "engine": "test"}})
    with TestClient(app, base_url=LOCAL_URL) as client:
        yield client


def task_count(client: TestClient) -> int:
    return len(client.get("/tasks", params={"limit": 1000}).json()["tasks"])


def test_submit_answers_at_once_with_a_task_id(client: TestClient) -> None:
    response = client.post("/task", json=SEED_BODY)
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    # "testserver" is not a trusted host: the URL is the bind address's, absolute so it works behind a stage.
    assert response.headers["location"] == f"http://127.0.0.1:8080/tasks/{body['taskId']}"
    task = client.get("/task", params={"taskId": body["taskId"]}).json()
    assert task["taskId"] == body["taskId"]
    assert task["status"] == "queued"
    assert task["api"] == "/sdapi/v1/txt2img"
    assert task["attempts"] == 0
    assert task["result"] is None and task["error"] is None
    assert task["createdAt"].endswith("Z")
    assert client.get(f"/tasks/{body['taskId']}").json() == task


def test_the_queue_holds_the_task(client: TestClient) -> None:
    client.post("/task", json=SEED_BODY)
    health = client.get("/healthz").json()
    assert health["ok"] is True
    assert health["queue"]["visible"] == 1
    assert health["engine"] == {"ok": True, "engine": "test"}


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"api": "/sdapi/v1/options", "payload": {"sd_model_checkpoint": "x"}}, 422, "api"),
    ({"api": "/sdapi/v1/txt2img", "payload": {"steps": 0}}, 422, "payload.steps"),
    ({"api": "/sdapi/v1/txt2img", "payload": {"steps": 1000}}, 422, "payload.steps"),
    ({"api": "/sdapi/v1/txt2img", "payload": {"width": 100000}}, 422, "payload.width"),
])
def test_refused_requests_create_no_task(client: TestClient, body: dict[str, Any], status: int, field: str) -> None:
    response = client.post("/task", json=body)
    assert response.status_code == status
    assert response.json()["error"]["field"] == field
    assert response.json()["error"]["code"] == "invalid_request"
    assert task_count(client) == 0


@pytest.mark.parametrize("raw", [
    b'{"api": "/sdapi/v1/txt2img", "payload": {"cfg_scale": NaN}}',
    b'{"api": "/sdapi/v1/txt2img", "payload": {"cfg_scale": Infinity}}',
])
def test_non_finite_numbers_refused(client: TestClient, raw: bytes) -> None:
    response = client.post("/task", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "payload.cfg_scale"
    assert task_count(client) == 0


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b'{"api": "/sdapi/v1/txt2img",'])
def test_malformed_json_refused(client: TestClient, raw: bytes) -> None:
    response = client.post("/task", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "body"
    assert task_count(client) == 0


def test_body_cap(client: TestClient) -> None:
    big = json.dumps({"api": "/sdapi/v1/txt2img", "payload": {"prompt": "x" * 70_000}}).encode()
    response = client.post("/task", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap applies while streaming
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    response = client.post("/task", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert task_count(client) == 0


def test_unknown_and_missing_ids(client: TestClient) -> None:
    response = client.get("/tasks/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "task_not_found"
    assert client.get("/task", params={"taskId": "nope"}).status_code == 404
    missing = client.get("/task")
    assert missing.status_code == 422
    assert missing.json()["error"]["field"] == "taskId"
    assert client.get("/no-such-route").json()["error"]["code"] == "not_found"


def test_cancel_queued_then_conflict(client: TestClient) -> None:
    task_id = client.post("/task", json=SEED_BODY).json()["taskId"]
    response = client.delete(f"/tasks/{task_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["finishedAt"] is not None
    again = client.delete("/task", params={"taskId": task_id})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"
    assert client.delete("/tasks/nope").status_code == 404


def test_list_newest_first_paginated_and_filtered(client: TestClient) -> None:
    ids = [client.post("/task", json=SEED_BODY).json()["taskId"] for _ in range(5)]
    client.delete(f"/tasks/{ids[0]}")
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/tasks", params=params).json()
        seen += [t["taskId"] for t in page["tasks"]]
        cursor = page["nextCursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    cancelled = client.get("/tasks", params={"status": "cancelled"}).json()["tasks"]
    assert [t["taskId"] for t in cancelled] == [ids[0]]
    assert client.get("/tasks", params={"status": "bogus"}).status_code == 422
    assert client.get("/tasks", params={"limit": 0}).status_code == 422
    assert client.get("/tasks", params={"cursor": "garbage"}).status_code == 422


def test_openapi_documents_the_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/task", "/tasks", "/tasks/{task_id}", "/healthz"} <= set(spec["paths"])
    assert "requestBody" in spec["paths"]["/task"]["post"]
    assert {"202", "413", "415", "422", "503"} <= set(spec["paths"]["/task"]["post"]["responses"])
    schemas = spec["components"]["schemas"]
    assert set(schemas["TaskRequest"]["discriminator"]["mapping"]) == {"/sdapi/v1/txt2img", "/sdapi/v1/img2img"}
    txt2img = schemas["Txt2ImgPayload"]
    assert txt2img["additionalProperties"] is False
    assert (txt2img["properties"]["steps"]["minimum"], txt2img["properties"]["steps"]["maximum"]) == (1, 150)
    assert {"sampler_index", "firstphase_width", "s_churn", "eta", "hr_prompt"} <= set(txt2img["properties"])
    assert "init_images" in schemas["Img2ImgPayload"]["required"]
    assert client.get("/docs").status_code == 200


def test_results_refuse_escaping_keys(client: TestClient, settings: Settings) -> None:
    (settings.data_dir / "secret.txt").write_text("no")
    assert client.get("/results/../secret.txt").status_code == 404
    assert client.get("/results/%2e%2e/secret.txt").status_code == 404


@pytest.mark.parametrize("raw", [
    b"[" * 50_000,
    b'{"api": "/sdapi/v1/txt2img", "payload": {"seed": ' + b"9" * 5000 + b"}}",
])
def test_pathological_json_is_a_4xx(client: TestClient, raw: bytes) -> None:
    response = client.post("/task", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "body"


def test_unexpected_errors_answer_json(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("kaput")

    with TestClient(app, raise_server_exceptions=False, base_url=LOCAL_URL) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
