"""The Lambda handler answers API Gateway events (REST v1, HTTP API v2) as the HTTP server answers requests."""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sdasync.api.app import create_app
from sdasync.api.lambda_handler import make_handler
from sdasync.config import Settings
from sdasync.service import open_backends

FIXTURES = Path(__file__).parents[1] / "fixtures"

#: Key-less mode answers only requests addressed to a trusted host (a defence against DNS rebinding).
LOCAL_URL = "http://127.0.0.1:8080"


class Context:
    function_name = "sdasync-api"
    aws_request_id = "4b2d9a52-0000-4000-8000-000000000000"
    memory_limit_in_mb = 512

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def event(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


def post_event(body: str, *, v2: bool = False) -> dict[str, Any]:
    if not v2:
        e = event("apigw_v1_post_task.json")
        e["body"] = body
        return e
    e = event("apigw_v2_get_task.json")
    e.update(routeKey="POST /task", rawQueryString="", queryStringParameters=None, body=body)
    e["requestContext"]["http"]["method"] = "POST"
    e["headers"]["content-type"] = "application/json"
    return e


def get_event(task_id: str, *, v2: bool = True) -> dict[str, Any]:
    if v2:
        e = event("apigw_v2_get_task.json")
        e["rawQueryString"] = f"taskId={task_id}"
        e["queryStringParameters"] = {"taskId": task_id}
        return e
    e = event("apigw_v1_post_task.json")
    e.update(httpMethod="GET", body=None, queryStringParameters={"taskId": task_id},
             multiValueQueryStringParameters={"taskId": [task_id]})
    e["requestContext"]["httpMethod"] = "GET"
    return e


def body_of(response: dict[str, Any]) -> Any:
    raw = response["body"]
    if response.get("isBase64Encoded"):
        raw = base64.b64decode(raw).decode()
    return json.loads(raw)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
def handler(settings: Settings) -> Any:
    return make_handler(settings)


@pytest.mark.parametrize("v2", [False, True])
def test_submit_then_poll(handler: Any, v2: bool) -> None:
    submit_body = event("apigw_v1_post_task.json")["body"]
    answer = handler(post_event(submit_body, v2=v2), Context())
    assert answer["statusCode"] == 202
    task_id = body_of(answer)["taskId"]
    polled = handler(get_event(task_id, v2=not v2), Context())
    assert polled["statusCode"] == 200
    task = body_of(polled)
    assert task["taskId"] == task_id
    assert task["status"] == "queued"
    assert task["api"] == "/sdapi/v1/txt2img"  # plain JSON, never DynamoDB's typed form


@pytest.mark.parametrize("v2", [False, True])
def test_errors_are_json(handler: Any, v2: bool) -> None:
    refused = handler(post_event(json.dumps({"api": "/sdapi/v1/options", "payload": {}}), v2=v2), Context())
    assert refused["statusCode"] == 422
    assert body_of(refused)["error"]["field"] == "api"
    malformed = handler(post_event("{nope", v2=v2), Context())
    assert malformed["statusCode"] == 422
    assert body_of(malformed)["error"]["field"] == "body"
    missing = handler(get_event("does-not-exist", v2=v2), Context())
    assert missing["statusCode"] == 404
    assert body_of(missing)["error"]["code"] == "task_not_found"


def test_same_answers_as_the_http_server(handler: Any, settings: Settings) -> None:
    submit_body = event("apigw_v1_post_task.json")["body"]
    task_id = body_of(handler(post_event(submit_body), Context()))["taskId"]
    via_lambda = body_of(handler(get_event(task_id), Context()))
    with open_backends(settings) as backends, \
            TestClient(create_app(settings, backends=backends), base_url=LOCAL_URL) as client:
        via_http = client.get("/task", params={"taskId": task_id}).json()
    assert via_lambda == via_http
    bad = {"api": "/sdapi/v1/txt2img", "payload": {"steps": 0}}
    with open_backends(settings) as backends, \
            TestClient(create_app(settings, backends=backends), base_url=LOCAL_URL) as client:
        http_error = client.post("/task", json=bad)
    lambda_error = handler(post_event(json.dumps(bad)), Context())
    assert lambda_error["statusCode"] == http_error.status_code
    assert body_of(lambda_error) == http_error.json()


def test_module_handler_reads_the_environment_and_imports_no_torch(tmp_path: Path) -> None:
    e = copy.deepcopy(event("apigw_v1_post_task.json"))
    script = (
        "import json, sys\n"
        "from sdasync.api.lambda_handler import handler\n"
        f"event = json.loads({json.dumps(json.dumps(e))})\n"
        "class C: aws_request_id = 'x'\n"
        # Keys are always required under Lambda, whatever the environment says.
        "r = handler(event, C())\n"
        "assert r['statusCode'] == 401, r\n"
        "from sdasync.auth.keys import KeyRing\n"
        "from sdasync.backends.sqlite.store import SqliteTaskStore\n"
        f"key, _ = KeyRing(SqliteTaskStore(path={str(tmp_path / 'lambda' / 'sdasync.db')!r})).create('acme')\n"
        "event['headers']['Authorization'] = 'Bearer ' + key\n"
        "event['multiValueHeaders']['Authorization'] = ['Bearer ' + key]\n"
        "r = handler(event, C())\n"
        "assert r['statusCode'] == 202, r\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(json.loads(r['body'])['taskId'])\n"
    )
    env = {**os.environ, "SDASYNC_DATA_DIR": str(tmp_path / "lambda"), "SDASYNC_AUTH": "false"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "lambda" / "sdasync.db").exists()


def succeed(settings: Settings, task_id: str) -> None:
    from sdasync.models import TaskStatus

    with open_backends(settings) as backends:
        backends.store.transition(task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING)
        backends.store.transition(task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.SUCCEEDED,
                                  changes={"images": (f"{task_id}/0.png",)})


def test_urls_come_from_the_gateway_not_the_host_header(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_base_path="/prod")
    handler = make_handler(settings)
    e = event("apigw_v1_post_task.json")
    e["path"] = "/task"
    e["headers"]["Host"] = "evil.example"
    e["multiValueHeaders"]["Host"] = ["evil.example"]
    answer = handler(e, Context())
    assert answer["statusCode"] == 202
    task_id = body_of(answer)["taskId"]
    location = answer.get("headers", {}).get("location") or answer["multiValueHeaders"]["location"][0]
    assert location == f"https://a1b2c3d4e5.execute-api.us-east-1.amazonaws.com/prod/tasks/{task_id}"
    succeed(settings, task_id)
    polled = get_event(task_id)
    polled["headers"]["host"] = "evil.example"
    images = body_of(handler(polled, Context()))["result"]["images"]
    # Signed (the embedded store's URLs expire): the address before the query is the gateway's.
    assert [url.split("?")[0] for url in images] == [
        f"https://f6g7h8i9j0.execute-api.us-east-1.amazonaws.com/results/{task_id}/0.png"]


def test_a_named_http_api_stage_is_in_the_urls(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_base_path="/live")
    handler = make_handler(settings)
    e = post_event(event("apigw_v1_post_task.json")["body"], v2=True)
    e["rawPath"] = e["requestContext"]["http"]["path"] = "/live/task"
    e["requestContext"]["stage"] = "live"
    answer = handler(e, Context())
    assert answer["statusCode"] == 202, answer
    location = answer["headers"]["location"]
    assert location.startswith("https://f6g7h8i9j0.execute-api.us-east-1.amazonaws.com/live/tasks/")


def test_public_url_wins_on_lambda(tmp_path: Path) -> None:
    handler = make_handler(Settings(data_dir=tmp_path, public_url="https://sd.example"))
    answer = handler(post_event(event("apigw_v1_post_task.json")["body"], v2=True), Context())
    assert answer["headers"]["location"].startswith("https://sd.example/tasks/")
