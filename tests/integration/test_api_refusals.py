"""What the API refuses, and how: media types, encodings, bad ids and cursors, forged hosts, hostile payloads.
Every refusal is a 4xx JSON error naming the field and creates no task."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sdasync.api.app import create_app
from sdasync.backends.cursor import encode_cursor
from sdasync.config import Settings
from sdasync.errors import BackendError
from sdasync.models import TaskStatus
from sdasync.service import TaskService

SEED_BODY = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "(masterpiece), portrait, chainmail", "steps": 20}}

#: What webuiapi (sdwebuiapi) sends for ``api.txt2img(prompt=...)`` by default, legacy fields included.
WEBUIAPI_TXT2IMG: dict[str, Any] = {
    "enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
    "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_prompt": "", "hr_negative_prompt": "",
    "prompt": "a lighthouse at dusk", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1,
    "steps": 30, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": False, "tiling": False,
    "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0,
    "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
    "script_args": [], "sampler_index": "Euler a", "script_name": None, "send_images": True, "save_images": False,
    "alwayson_scripts": {},
}

#: Key-less mode answers only requests addressed to a trusted host (a defence against DNS rebinding).
LOCAL_URL = "http://127.0.0.1:8080"


def make_client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings, health_checks={"engine": lambda: {"ok": True}}), base_url=LOCAL_URL)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with make_client(settings) as client:
        yield client


def service_of(client: TestClient) -> TaskService:
    app = client.app
    assert isinstance(app, FastAPI)
    service: TaskService = app.state.service
    return service


def task_count(client: TestClient) -> int:
    return len(service_of(client).store.list(limit=1000).tasks)


def refused(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"]
    if field is not None:
        assert error["field"] == field, error
    return error


@pytest.mark.parametrize("route", ["/task", "/tasks"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/json; charset=latin-1", "application/jsonx", "", "json"])
def test_only_json_queues_work(client: TestClient, route: str, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    error = refused(client.post(route, content=json.dumps(SEED_BODY).encode(), headers=headers), 415)
    assert error["code"] == "unsupported_media_type"
    assert task_count(client) == 0


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON; Charset=\"UTF-8\""])
def test_json_in_utf8_is_accepted(client: TestClient, content_type: str) -> None:
    response = client.post("/task", content=json.dumps(SEED_BODY).encode(), headers={"content-type": content_type})
    assert response.status_code == 202, response.text
    assert task_count(client) == 1


@pytest.mark.parametrize("raw", [
    b'{"api": "/sdapi/v1/txt2img", "payload": {"prompt": "\xff\xfe"}}',
    json.dumps(SEED_BODY).encode("utf-16"),
    b"\xef\xbb\xbf" + json.dumps(SEED_BODY).encode(),
])
def test_body_must_be_utf8_json(client: TestClient, raw: bytes) -> None:
    refused(client.post("/task", content=raw, headers={"content-type": "application/json"}), 422, "body")
    assert task_count(client) == 0


@pytest.mark.parametrize(("raw", "field"), [
    (b'{"api": "/sdapi/v1/txt2img", "payload": {"prompt": "\\ud800"}}', "payload.prompt"),
    (b'{"api": "/sdapi/v1/txt2img", "payload": {"styles": ["ok", "\\udfff"]}}', "payload.styles[1]"),
    (b'{"api": "\\ud800", "payload": {}}', "api"),
    (b'{"api": "/sdapi/v1/txt2img", "payload": {"\\ud800": 1}}', "payload.'\\ud800'"),
    (b'{"\\ud800x": 1}', "'\\ud800x'"),
])
def test_lone_surrogates_are_refused_naming_the_field(client: TestClient, raw: bytes, field: str) -> None:
    refused(client.post("/task", content=raw, headers={"content-type": "application/json"}), 422, field)
    assert task_count(client) == 0


def test_a_5_mb_hr_prompt_is_refused(client: TestClient) -> None:
    body = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "ok", "enable_hr": True, "hr_prompt": "x" * 5_000_000}}
    response = client.post("/task", json=body)
    assert response.status_code in {413, 422}, response.text
    if response.status_code == 422:
        assert response.json()["error"]["field"] == "payload.hr_prompt"
    assert task_count(client) == 0


def test_a_client_library_request_is_accepted(client: TestClient) -> None:
    response = client.post("/task", json={"api": "/sdapi/v1/txt2img", "payload": WEBUIAPI_TXT2IMG})
    assert response.status_code == 202, response.text
    task = service_of(client).get(response.json()["taskId"])
    assert task.payload["sampler_index"] == "Euler a"
    assert "send_images" not in task.payload


def test_a_misspelt_field_is_refused_with_a_hint(client: TestClient) -> None:
    error = refused(client.post("/task", json={"api": "/sdapi/v1/txt2img", "payload": {"step": 1}}), 422,
                    "payload.step")
    assert "steps" in error["message"]
    assert task_count(client) == 0


@pytest.mark.parametrize("init_image", ["data:", "data:image/png;base64", "data:image/png,AAAA", "data:;base64,",
                                        "data:image/png;base64,%%%%", "A", "====", "\u00e9" * 8,
                                        base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\xff" * 64).decode()])
def test_odd_init_images_are_a_4xx(client: TestClient, init_image: str) -> None:
    body = {"api": "/sdapi/v1/img2img", "payload": {"init_images": [init_image]}}
    refused(client.post("/task", json=body), 422, "payload.init_images[0]")
    assert task_count(client) == 0


@pytest.mark.parametrize("task_id", ["nope", "a" * 10_000, "0" * 31, "0" * 33, "A" * 32, "%00", "%ED%A0%80",
                                     "..%2F..%2Fetc", "0123456789abcdef0123456789abcdeg"])
def test_malformed_task_ids_are_404_without_the_backend(settings: Settings, task_id: str) -> None:
    with make_client(settings) as client:
        service = service_of(client)
        service.store.close()  # a backend call would now fail with a 5xx: a bad id must never get that far
        for response in (client.get(f"/tasks/{task_id}"), client.delete(f"/tasks/{task_id}"),
                         client.get("/task", params={"taskId": task_id}),
                         client.delete("/task", params={"taskId": task_id})):
            error = refused(response, 404)
            # "not_found": a path that no longer matches the route once its %2F are decoded.
            assert error["code"] in {"task_not_found", "not_found"}
            assert len(error["message"]) < 200
        assert client.get(f"/tasks/{'0' * 32}").status_code >= 500  # the backend really is gone


@pytest.mark.parametrize("key", ["x" * 5000 + "/0.png", "%00/0.png", "%ED%A0%80/0.png",
                                 "0123456789abcdef0123456789abcdef/" + "9" * 400 + ".png",
                                 "0123456789abcdef0123456789abcdef/0.png/../../x", "requests/abc.json"])
def test_odd_result_keys_are_404(client: TestClient, key: str) -> None:
    response = client.get(f"/results/{key}")
    assert refused(response, 404)["code"] in {"blob_not_found", "not_found"}


@pytest.mark.parametrize("cursor", [
    "garbage!", "%ED%A0%80", "x" * 5000, base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
    encode_cursor({"c": 10**300, "t": "x", "s": None}), encode_cursor({"c": 1.0, "t": 5, "s": None}),
    encode_cursor({"c": True, "t": "x", "s": None}), encode_cursor({"c": 1.0, "t": "\ud800", "s": None}),
    encode_cursor({"c": 1.0, "t": "a\x00b", "s": None}), encode_cursor({"c": 1.0, "t": "x", "s": "running"}),
    base64.urlsafe_b64encode(b'{"c": 1e999, "t": "x", "s": null}').decode(),
    base64.urlsafe_b64encode(b'{"c": NaN, "t": "x", "s": null}').decode(),
    base64.urlsafe_b64encode(b"[" * 3000).decode(), base64.urlsafe_b64encode(b'{"c": [[[1]]], "t": "x"}').decode(),
    base64.urlsafe_b64encode(b'{"c": ' + b"9" * 5000 + b', "t": "x", "s": null}').decode(),
    base64.urlsafe_b64encode(b'"just a string"').decode(), base64.urlsafe_b64encode(b"null").decode(),
])
def test_crafted_cursors_are_a_422(client: TestClient, cursor: str) -> None:
    client.post("/task", json=SEED_BODY)
    refused(client.get("/tasks", params={"cursor": cursor}), 422, "cursor")


def succeeded_task(client: TestClient, headers: dict[str, str] | None = None) -> str:
    task_id: str = client.post("/task", json=SEED_BODY, headers=headers).json()["taskId"]
    store = service_of(client).store
    store.transition(task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING, changes={"attempts": 1})
    store.transition(task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.SUCCEEDED,
                     changes={"images": (f"{task_id}/0.png",), "info": {"seed": 1}})
    return task_id


def keyed(settings: Settings) -> tuple[TestClient, dict[str, str]]:
    """A client of an API that requires keys, and a key's header: a forged Host reaches only such an API (key-less
    mode refuses untrusted hosts outright)."""
    from sdasync.auth.keys import KeyRing
    from sdasync.backends.sqlite.store import SqliteTaskStore

    with SqliteTaskStore(path=settings.data_dir / "sdasync.db") as store:
        key, _ = KeyRing(store).create("acme")
    return make_client(settings.model_copy(update={"auth": True})), {"Authorization": f"Bearer {key}"}


def image_urls(client: TestClient, task_id: str, host: str, key: dict[str, str]) -> list[str]:
    headers = {"host": host, **key}
    answers = [client.get(f"/tasks/{task_id}", headers=headers),
               client.get("/task", params={"taskId": task_id}, headers=headers),
               client.get("/tasks", headers=headers)]
    assert all(answer.status_code == 200 for answer in answers)
    urls = list(answers[0].json()["result"]["images"]) + list(answers[1].json()["result"]["images"])
    urls += [url for task in answers[2].json()["tasks"] for url in (task["result"] or {}).get("images", [])]
    return urls


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "localhost@evil.example",
                                  "127.0.0.1.evil.example", "localhost/evil.example", "[::1]evil.example"])
def test_a_forged_host_never_appears_in_urls(settings: Settings, client: TestClient, host: str) -> None:
    # Key-less, a request addressed to an untrusted name is refused (DNS rebinding through a browser).
    refused(client.get("/tasks", headers={"host": host}), 401)
    refused(client.post("/task", json=SEED_BODY, headers={"host": host}), 401)
    with_keys, key = keyed(settings)
    with with_keys as client:
        task_id = succeeded_task(client, key)
        urls = image_urls(client, task_id, host, key)
        response = client.post("/task", json=SEED_BODY, headers={"host": host, **key})
    assert urls and all(url.startswith("http://127.0.0.1:8080/results/") for url in urls), urls
    assert response.status_code == 202
    assert response.headers["location"].startswith("http://127.0.0.1:8080/tasks/")
    assert "evil" not in response.headers["location"]


def test_trusted_hosts_and_public_url(tmp_path: Path) -> None:
    with_keys, key = keyed(Settings(data_dir=tmp_path / "a"))
    with with_keys as client:
        task_id = succeeded_task(client, key)
        # Image URLs are signed (exp, sig): the part before the query is what the Host header decides.
        assert image_urls(client, task_id, "localhost:8080", key)[0].split("?")[0] == \
            f"http://localhost:8080/results/{task_id}/0.png"
        assert image_urls(client, task_id, "[::1]:8080", key)[0].startswith("http://[::1]:8080/results/")
        # A trusted name with another port than the one served is forged too.
        assert image_urls(client, task_id, "localhost:1234", key)[0].split("?")[0] == \
            f"http://127.0.0.1:8080/results/{task_id}/0.png"
    with_keys, key = keyed(Settings(data_dir=tmp_path / "b", trusted_hosts=frozenset({"api.example"})))
    with with_keys as client:
        task_id = succeeded_task(client, key)
        assert image_urls(client, task_id, "api.example", key)[0].startswith("http://api.example/results/")
        assert image_urls(client, task_id, "localhost", key)[0].startswith("http://127.0.0.1:8080/results/")
    public = "https://sd.example/base"
    with_keys, key = keyed(Settings(data_dir=tmp_path / "c", public_url=public))
    with with_keys as client:
        task_id = succeeded_task(client, key)
        for host in ("localhost", "sd.example", "evil.example"):
            assert image_urls(client, task_id, host, key)[0].split("?")[0] == f"{public}/results/{task_id}/0.png"
        location = client.post("/task", json=SEED_BODY, headers={"host": "localhost", **key}).headers["location"]
        assert location.startswith(f"{public}/tasks/")


def test_backend_failures_do_not_leak_paths(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/fails")
    def fails() -> None:
        raise BackendError(f"cannot read blob under {settings.data_dir}/results: permission denied")

    with TestClient(app, base_url=LOCAL_URL) as client:
        response = client.get("/fails")
    error = refused(response, 503)
    assert error["code"] == "backend_unavailable"
    assert str(settings.data_dir) not in response.text


def test_a_client_gone_mid_body_is_a_quiet_log_line(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    app = client.app
    chunks: list[dict[str, Any]] = [{"type": "http.request", "body": b'{"api": "/sdapi', "more_body": True},
                                    {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return chunks.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/task", "raw_path": b"/task", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"host", b"127.0.0.1")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080), "state": {}}
    with caplog.at_level(logging.DEBUG):
        asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "disconnected" in caplog.text
    assert task_count(client) == 0
