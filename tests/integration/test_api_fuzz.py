"""Fuzzing the live API: schemathesis from its OpenAPI document, and a seeded fuzzer of raw bodies, paths and
query strings. Both are deterministic and bounded. No answer may be a 5xx, every error is JSON with a code, and
no refused request creates a task."""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from sdasync.api.app import create_app
from sdasync.config import Limits, Settings
from sdasync.service import TaskService, open_backends

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance  # noqa: E402

SEED = 20261125
VALID = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a lighthouse", "steps": 20}}

#: Key-less mode answers only requests addressed to a trusted host (a defence against DNS rebinding).
LOCAL_URL = "http://127.0.0.1:8080"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app with embedded backends in a temporary directory. The backends are opened here, so that the
    lifespans schemathesis runs for its own calls do not close them."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("fuzz"), limits=Limits(max_body_bytes=256 * 1024))
    with open_backends(settings) as backends:
        app = create_app(settings, backends=backends, health_checks={"engine": lambda: {"ok": True}})
        with TestClient(app, raise_server_exceptions=False, base_url=LOCAL_URL) as client:
            yield client


CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(live: TestClient, mode: str) -> None:
    """Every operation of the app's own OpenAPI document, with data that fits it (positive) and data that breaks
    it (negative). Each answer must be a documented status with a body that fits its documented schema."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", live.app)
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/task", "/tasks", "/tasks/{task_id}", "/results/{key}"}
    if generation is GenerationMode.NEGATIVE:
        # Only what has an input to break: /healthz takes none, and /tasks/{task_id} takes any string.
        operations = [op for op in operations if len(op.query) or len(op.body)]
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=generation))
        @settings(max_examples=8, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            case.call_and_validate(checks=CHECKS)

        run()


def service_of(client: TestClient) -> TaskService:
    app = client.app
    assert isinstance(app, FastAPI)
    service: TaskService = app.state.service
    return service


def task_ids(client: TestClient) -> set[str]:
    return {task.task_id for task in service_of(client).store.list(limit=1000).tasks}


def odd_text(rng: random.Random) -> str:
    pick = rng.randrange(8)
    if pick == 0:
        return "\ud800" + rng.choice(["", "x", "\udc00"])
    if pick == 1:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(1, 40)))
    if pick == 2:
        return "x" * rng.choice([201, 10_001, 70_000])
    if pick == 3:
        return rng.choice(["data:", "data:image/png;base64,", "http://169.254.169.254/", "file:///etc/passwd",
                           "../../etc/passwd", "%00", "\x00", "${jndi:x}"])
    return "".join(rng.choice(string.printable) for _ in range(rng.randrange(0, 20)))


def odd_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(10 if depth < 3 else 7)
    if pick == 0:
        return rng.choice([10**30, -(10**30), 2**63, 2**32, -2, 0, 1, 1.5, 1e308, -0.0])
    if pick == 1:
        return rng.choice([True, False, None])
    if pick in (2, 3, 4):
        return odd_text(rng)
    if pick == 5:
        return rng.choice([float("nan"), float("inf")])
    if pick == 6:
        return rng.randrange(-5, 5000)
    if pick == 7:
        return [odd_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {odd_text(rng): odd_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


FIELDS = ["prompt", "steps", "width", "height", "seed", "cfg_scale", "batch_size", "n_iter", "styles", "hr_prompt",
          "enable_hr", "hr_scale", "init_images", "mask", "override_settings", "script_name", "alwayson_scripts",
          "sampler_index", "comments", "infotext", "seed_resize_from_w", "hr_resize_x", "s_churn", "step"]


def odd_body(rng: random.Random) -> bytes:
    pick = rng.randrange(6)
    if pick == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if pick == 1:
        return rng.choice([b"[" * 40_000, b"{" * 5000, b'{"api": 1e99999}', b"9" * 5000, b"null", b'""', b"[]",
                           b'{"api": "/sdapi/v1/txt2img", "payload": {"seed": ' + b"9" * 5000 + b"}}"])
    payload = {rng.choice(FIELDS): odd_value(rng) for _ in range(rng.randrange(1, 5))}
    body: dict[str, Any] = {"api": rng.choice(["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options",
                                               odd_text(rng)]), "payload": payload}
    if pick == 2:
        body[odd_text(rng)] = odd_value(rng)
    if pick == 3:
        body["payload"] = odd_value(rng)
    text = json.dumps(body, allow_nan=True, ensure_ascii=rng.random() < 0.5)
    return text.encode("utf-8", "surrogatepass" if rng.random() < 0.2 else "backslashreplace")


CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/json; charset=utf-16", "", "*/*"]
PATHS = ["/tasks/{x}", "/task?taskId={x}", "/results/{x}", "/results/{x}/0.png", "/tasks?cursor={x}",
         "/tasks?limit={x}", "/tasks?status={x}", "/{x}", "/tasks/{x}/{x}"]


def odd_path_part(rng: random.Random) -> str:
    pick = rng.randrange(5)
    if pick == 0:
        return "%" + "".join(rng.choice("0123456789ABCDEFZ%") for _ in range(rng.randrange(1, 12)))
    if pick == 1:
        return "a" * rng.choice([31, 32, 33, 300, 5000])
    if pick == 2:
        return rng.choice(["..", "%2e%2e", "%2F", "%00", "%ED%A0%80", "%FF", "0" * 32, "-1", "1e999", "[]"])
    return "".join(rng.choice(string.ascii_letters + string.digits + "-_.~!$&'()*+,;=:@") for _ in range(8))


def check_answer(response: Any, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["code"], str) and error["code"], what


def test_raw_bodies_never_5xx_and_refusals_create_nothing(live: TestClient) -> None:
    rng = random.Random(SEED)
    for i in range(250):
        body = odd_body(rng)
        content_type = rng.choice(CONTENT_TYPES)
        headers = {"content-type": content_type} if content_type else {}
        before = task_ids(live)
        response = live.post(rng.choice(["/task", "/tasks"]), content=body, headers=headers)
        what = f"case {i}: {content_type!r} {body[:200]!r}"
        check_answer(response, what)
        after = task_ids(live)
        if response.status_code == 202:
            assert after - before == {response.json()["taskId"]}, what
        else:
            assert after == before, what


def test_paths_and_queries_never_5xx(live: TestClient) -> None:
    rng = random.Random(SEED + 1)
    live.post("/task", json=VALID)
    before = task_ids(live)
    for i in range(250):
        path = rng.choice(PATHS).replace("{x}", odd_path_part(rng))
        method = rng.choice(["GET", "GET", "DELETE", "PUT", "PATCH"])
        response = live.request(method, path)
        check_answer(response, f"case {i}: {method} {path[:200]}")
    assert task_ids(live) == before
