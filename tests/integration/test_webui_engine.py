"""WebuiEngine against a real HTTP server on loopback that speaks the AUTOMATIC1111 API (tests/webui_server.py)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from helpers import free_port, wait_until
from sdasync.backends.registry import resolve
from sdasync.engines.base import Engine, GenerationRequest
from sdasync.engines.webui import WebuiEngine
from sdasync.errors import ConfigError, EngineError, EngineRejected, EngineTimeout, EngineUnavailable
from sdasync.models import Api
from webui_server import WebuiTestServer, png_b64


@pytest.fixture
def server() -> Iterator[WebuiTestServer]:
    with WebuiTestServer() as srv:
        yield srv


@pytest.fixture
def engine(server: WebuiTestServer) -> Iterator[WebuiEngine]:
    with WebuiEngine.from_url(f"{server.url}?read_timeout=5&ready_timeout=5") as eng:
        yield eng


def request(api: Api = Api.TXT2IMG, task_id: str = "task-1", **payload: Any) -> GenerationRequest:
    return GenerationRequest(task_id=task_id, api=api, payload=payload)


def posts(server: WebuiTestServer) -> list[str]:
    return [r.path for r in server.requests if r.method == "POST"]


# --- URL parsing --------------------------------------------------------------------------------------------------


def test_from_url_maps_schemes_base_path_and_timeouts() -> None:
    engine = WebuiEngine.from_url("webui+https://sd.internal:7861/sd/?connect_timeout=2&read_timeout=30")
    assert engine.base_url == "https://sd.internal:7861/sd"
    assert (engine.connect_timeout, engine.read_timeout, engine.ready_timeout) == (2.0, 30.0, 300.0)
    assert WebuiEngine.from_url("webui+http://127.0.0.1:7860").base_url == "http://127.0.0.1:7860"
    assert WebuiEngine.from_url("webui+http://[::1]:7860").base_url == "http://[::1]:7860"
    assert resolve("engine", "webui+https://x") is WebuiEngine


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("webui+http://127.0.0.1:7860?timeout=3", "valid: connect_timeout, read_timeout, ready_timeout"),
        ("webui+http://127.0.0.1:7860?read_timeout=0", "read_timeout must be > 0"),
        ("webui+http://user:secret@127.0.0.1:7860", "no credentials"),
        ("webui+http://:7860", "names no host"),
        ("webui+http://127.0.0.1:port", "bad port"),
        ("http://127.0.0.1:7860", "not a webui"),
    ],
)
def test_bad_urls_fail_fast(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        WebuiEngine.from_url(url)


# --- generation ---------------------------------------------------------------------------------------------------


def test_txt2img_calls_only_its_route_with_forced_fields(server: WebuiTestServer, engine: WebuiEngine) -> None:
    assert isinstance(engine, Engine)
    result = engine.generate(
        request(prompt="a cat", width=64, height=48, batch_size=2, seed=7, send_images=False, save_images=True)
    )
    assert posts(server) == ["/sdapi/v1/txt2img"]
    sent = server.requests[-1].body
    assert sent["send_images"] is True
    assert sent["save_images"] is False
    assert sent["force_task_id"] == "task-1"
    assert sent["prompt"] == "a cat"
    assert len(result.images) == 2
    for data in result.images:
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.size) == ("PNG", (64, 48))
    assert result.info["seed"] == 7
    assert result.info["all_seeds"] == [7, 8]
    assert result.info["sd_model_name"] == "test-webui-model"


def test_img2img_calls_only_its_route(server: WebuiTestServer, engine: WebuiEngine) -> None:
    result = engine.generate(request(Api.IMG2IMG, init_images=[png_b64(1, 8, 8)], width=16, height=16, seed=1))
    assert posts(server) == ["/sdapi/v1/img2img"]
    assert len(result.images) == 1


def test_the_callers_payload_is_not_modified(engine: WebuiEngine) -> None:
    payload = {"prompt": "x", "width": 8, "height": 8}
    engine.generate(GenerationRequest("t", Api.TXT2IMG, payload))
    assert payload == {"prompt": "x", "width": 8, "height": 8}


def test_data_url_prefix_and_jpeg_images_are_tolerated(server: WebuiTestServer, engine: WebuiEngine) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(jpeg, format="JPEG")
    images = [f"data:image/png;base64,{png_b64(3, 8, 8)}", base64.b64encode(jpeg.getvalue()).decode()]
    server.knobs.raw_body = json.dumps({"images": images, "parameters": {}, "info": "{}"}).encode()
    result = engine.generate(request())
    assert [data[:8] for data in result.images] == [b"\x89PNG\r\n\x1a\n"] * 2
    assert result.images[0] == base64.b64decode(png_b64(3, 8, 8))


def test_unparseable_info_is_kept_raw(server: WebuiTestServer, engine: WebuiEngine) -> None:
    server.knobs.raw_info = "not json"
    assert engine.generate(request(width=8, height=8)).info == {"raw": "not json"}


# --- error mapping ------------------------------------------------------------------------------------------------


def test_http_500_is_unavailable_with_the_webui_message(server: WebuiTestServer, engine: WebuiEngine) -> None:
    server.knobs.fail_status = 500
    with pytest.raises(EngineUnavailable, match="CUDA out of memory") as caught:
        engine.generate(request())
    assert caught.value.retryable


@pytest.mark.parametrize("status", [502, 503, 408, 429])
def test_busy_or_broken_gateways_are_retryable(server: WebuiTestServer, engine: WebuiEngine, status: int) -> None:
    server.knobs.fail_status = status
    with pytest.raises(EngineUnavailable, match=f"HTTP {status}"):
        engine.generate(request())


def test_http_422_is_rejected_with_the_validation_detail(server: WebuiTestServer, engine: WebuiEngine) -> None:
    server.knobs.fail_status = 422
    with pytest.raises(EngineRejected, match=r"HTTP 422.*steps: value is not a valid integer") as caught:
        engine.generate(request())
    assert not caught.value.retryable


def test_webui_404s_for_requests_it_cannot_serve_are_rejected(engine: WebuiEngine) -> None:
    with pytest.raises(EngineRejected, match="Sampler not found"):
        engine.generate(request(sampler_name="Nope"))
    with pytest.raises(EngineRejected, match="Init image not found"):
        engine.generate(request(Api.IMG2IMG))


def test_unreachable_webui_is_unavailable() -> None:
    with WebuiEngine.from_url(f"webui+http://127.0.0.1:{free_port()}?connect_timeout=1") as engine:
        with pytest.raises(EngineUnavailable, match="unreachable"):
            engine.generate(request())
        health = engine.health()
    assert health["ok"] is False
    assert "ConnectError" in health["detail"]


def test_a_hung_webui_times_out(server: WebuiTestServer) -> None:
    server.knobs.hang = True
    with WebuiEngine.from_url(f"{server.url}?read_timeout=0.3") as engine:
        start = time.monotonic()
        with pytest.raises(EngineTimeout, match="no answer in time"):
            engine.generate(request())
        assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "body",
    [
        b"<html>proxy error</html>",
        b'{"images": ["###"], "info": "{}"}',
        b'{"images": ["aGVsbG8="], "info": "{}"}',
        b'{"info": "{}"}',
    ],
)
def test_malformed_answers_are_engine_errors(server: WebuiTestServer, engine: WebuiEngine, body: bytes) -> None:
    server.knobs.raw_body = body
    with pytest.raises(EngineError) as caught:
        engine.generate(request())
    assert type(caught.value) is EngineError


# --- readiness and health -----------------------------------------------------------------------------------------


def test_setup_waits_for_a_late_webui(server: WebuiTestServer, engine: WebuiEngine) -> None:
    server.knobs.not_ready_probes = 3
    engine.setup()
    assert server.paths() == ["/sdapi/v1/sd-models"] * 4


def test_setup_gives_up_at_the_ready_timeout(server: WebuiTestServer) -> None:
    server.knobs.never_ready = True
    with WebuiEngine.from_url(f"{server.url}?ready_timeout=0.5") as engine:
        start = time.monotonic()
        with pytest.raises(EngineUnavailable, match=r"not ready after 0.5 s.*HTTP 404.*--api"):
            engine.setup()
        assert 0.5 <= time.monotonic() - start < 3
    assert len(server.requests) >= 2


def test_setup_against_nothing_gives_up_too() -> None:
    engine = WebuiEngine.from_url(f"webui+http://127.0.0.1:{free_port()}?ready_timeout=0.3")
    with engine, pytest.raises(EngineUnavailable, match="ConnectError"):
        engine.setup()


def test_close_aborts_a_readiness_wait(server: WebuiTestServer) -> None:
    server.knobs.never_ready = True
    engine = WebuiEngine.from_url(f"{server.url}?ready_timeout=60")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            engine.setup()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    server.wait_for(lambda requests: len(requests) >= 2)
    engine.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], EngineUnavailable)


def test_health_reports_without_raising(server: WebuiTestServer, engine: WebuiEngine) -> None:
    assert engine.health() == {"ok": True, "url": engine.base_url, "detail": "ready"}
    server.knobs.never_ready = True
    assert engine.health() == {"ok": False, "url": engine.base_url, "detail": "HTTP 404"}
    server.close()
    wait_until(lambda: engine.health()["ok"] is False)


def test_no_other_route_is_ever_called(server: WebuiTestServer, engine: WebuiEngine) -> None:
    engine.setup()
    engine.health()
    engine.generate(request(width=8, height=8))
    engine.generate(request(Api.IMG2IMG, init_images=[png_b64(1, 8, 8)], width=8, height=8))
    allowed = {("GET", "/sdapi/v1/sd-models"), ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/img2img")}
    assert {(r.method, r.path) for r in server.requests} <= allowed
