"""WebuiEngine against a real HTTP server on loopback that speaks the AUTOMATIC1111 API (tests/webui_server.py)."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from helpers import free_port, wait_until
from sdasync.backends.registry import resolve
from sdasync.engines import webui
from sdasync.engines.base import Engine, GenerationRequest, GenerationResult, Progress
from sdasync.engines.webui import WebuiEngine
from sdasync.errors import (
    ConfigError,
    EngineError,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    GenerationCancelled,
)
from sdasync.models import Api, EngineHealth
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
    assert health.ok is False
    assert "ConnectError" in health.detail


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


def test_a_stop_request_ends_a_readiness_wait_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sdasync.engines.webui")
    engine = WebuiEngine.from_url(f"webui+http://127.0.0.1:{free_port()}?ready_timeout=60")
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            engine.setup(stop)
        except BaseException as exc:
            errors.append(exc)

    with engine:
        thread = threading.Thread(target=run)
        thread.start()
        wait_until(lambda: any("waiting for the WebUI" in r.getMessage() for r in caplog.records))
        started = time.monotonic()
        stop.set()
        thread.join(timeout=5)
        assert not thread.is_alive()
        assert time.monotonic() - started < 1.0
    assert len(errors) == 1 and isinstance(errors[0], EngineUnavailable)
    assert "stopped while waiting" in errors[0].message
    assert engine.base_url in caplog.records[0].getMessage()  # the log names what it waits for


def test_a_long_readiness_wait_says_so_in_the_log(server: WebuiTestServer, caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webui, "WAIT_LOG_EVERY_S", 0.2)
    server.knobs.never_ready = True
    with WebuiEngine.from_url(f"{server.url}?ready_timeout=1") as engine, pytest.raises(EngineUnavailable):
        engine.setup()
    waits = [r for r in caplog.records if "still waiting for the WebUI" in r.getMessage()]
    assert waits and all(r.levelno == logging.WARNING for r in waits)
    assert engine.base_url in waits[0].getMessage() and "s so far" in waits[0].getMessage()
    assert "HTTP 404" in waits[-1].getMessage()


def test_health_reports_without_raising(server: WebuiTestServer, engine: WebuiEngine) -> None:
    assert engine.health() == EngineHealth(ok=True, detail="ready", extra={"url": engine.base_url})
    server.knobs.never_ready = True
    assert engine.health() == EngineHealth(ok=False, detail="HTTP 404", extra={"url": engine.base_url})
    server.close()
    wait_until(lambda: engine.health().ok is False)


def test_no_other_route_is_ever_called(server: WebuiTestServer, engine: WebuiEngine) -> None:
    engine.setup()
    engine.health()
    engine.generate(request(width=8, height=8))
    engine.generate(request(Api.IMG2IMG, init_images=[png_b64(1, 8, 8)], width=8, height=8))
    allowed = {
        ("GET", "/sdapi/v1/sd-models"),
        ("POST", "/sdapi/v1/txt2img"),
        ("POST", "/sdapi/v1/img2img"),
        ("POST", "/internal/progress"),  # per task and read-only; /sdapi/v1/interrupt only ever on a cancel
    }
    assert {(r.method, r.path) for r in server.requests} <= allowed


# --- per-task progress, cancel and deadline -----------------------------------------------------------------------


class Background:
    """Runs one call on a thread and keeps its outcome, so a test can act while the call blocks."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the call did not end"


def direct_generation(server: WebuiTestServer, task_id: str, **payload: Any) -> Background:
    """Somebody else's job, sent straight to the WebUI (the WebUI's own UI, another client)."""
    body = {"prompt": "not ours", "width": 8, "height": 8, "force_task_id": task_id, **payload}

    def post() -> Any:
        with httpx.Client(trust_env=False, timeout=30) as client:
            return client.post(f"http://127.0.0.1:{server.port}/sdapi/v1/txt2img", json=body).json()

    return Background(post)


def polls_for(server: WebuiTestServer, task_id: str) -> list[Any]:
    return [r.body for r in list(server.requests) if r.path == "/internal/progress" and r.body["id_task"] == task_id]


@pytest.fixture
def fast_engine(server: WebuiTestServer) -> Iterator[WebuiEngine]:
    """Polls progress every 0.1 s instead of 0.5 s, so progress tests need less generation time."""
    with WebuiEngine(f"http://127.0.0.1:{server.port}", read_timeout=10, progress_interval=0.1) as eng:
        yield eng


def test_progress_is_polled_per_task_while_a_slow_generation_runs(
    server: WebuiTestServer, fast_engine: WebuiEngine
) -> None:
    server.knobs.generation_s = 1.0
    seen: list[Progress] = []
    payload = {"width": 8, "height": 8, "steps": 10, "n_iter": 2}
    result = fast_engine.generate(GenerationRequest("task-p", Api.TXT2IMG, payload, seen.append))
    assert len(result.images) == 2
    steps = [p.step for p in seen]
    assert len(steps) >= 4, steps  # several values while it ran, not just the final one
    assert steps == sorted(set(steps)), "steps only grow, each reported once"
    assert {p.steps for p in seen} == {20}  # the fraction covers all n_iter batches
    assert seen[-1] == Progress(20, 20, 0.0)
    assert any(p.eta_s is not None and p.eta_s > 0 for p in seen[:-1])
    assert polls_for(server, "task-p")[0] == {"id_task": "task-p", "live_preview": False}
    assert server.interrupts == []


def test_no_progress_polls_for_a_quick_generation(server: WebuiTestServer, engine: WebuiEngine) -> None:
    seen: list[Progress] = []
    engine.generate(GenerationRequest("task-q", Api.TXT2IMG, {"width": 8, "height": 8, "steps": 5}, seen.append))
    assert seen == [Progress(5, 5, 0.0)]
    assert polls_for(server, "task-q") == []


@pytest.mark.parametrize("status", [500, 404])
def test_failing_progress_polls_do_not_fail_the_generation(
    server: WebuiTestServer, fast_engine: WebuiEngine, status: int
) -> None:
    server.knobs.generation_s = 0.5
    server.knobs.progress_status = status  # 404: a WebUI build without /internal/progress
    seen: list[Progress] = []
    result = fast_engine.generate(GenerationRequest("task-f", Api.TXT2IMG, {"width": 8, "height": 8}, seen.append))
    assert len(result.images) == 1
    assert len(polls_for(server, "task-f")) >= 2
    assert seen == [Progress(20, 20, 0.0)]


def test_cancel_mid_generation_interrupts_our_job_within_2_s(server: WebuiTestServer, engine: WebuiEngine) -> None:
    server.knobs.generation_s = 30
    cancel = threading.Event()
    seen: list[Progress] = []
    req = GenerationRequest("task-c", Api.TXT2IMG, {"width": 8, "height": 8}, seen.append, cancel.is_set)
    call = Background(lambda: engine.generate(req))
    wait_until(lambda: seen, message="no progress reported")  # the job is running and polled
    cancelled_at = time.monotonic()
    cancel.set()
    call.join()
    assert isinstance(call.error, GenerationCancelled), call.error
    assert call.ended_at is not None
    assert call.ended_at - cancelled_at < 2.0
    assert server.interrupts == ["task-c"]
    assert server.interrupted == ["task-c"]
    assert server.task_state("task-c") == "completed"


def test_cancel_while_another_task_is_active_does_not_interrupt_it(
    server: WebuiTestServer, engine: WebuiEngine
) -> None:
    server.knobs.generation_s = 1.5
    other = direct_generation(server, "other", batch_size=2, n_iter=2)
    wait_until(lambda: server.task_state("other") == "active")
    cancel = threading.Event()
    req = GenerationRequest("mine", Api.TXT2IMG, {"width": 8, "height": 8}, is_cancelled=cancel.is_set)
    call = Background(lambda: engine.generate(req))
    wait_until(lambda: server.task_state("mine") == "queued")
    polled_before = len(polls_for(server, "mine"))
    cancel.set()
    # The engine asked about its own task after the cancel, was told "queued", and left the other job alone.
    assert server.wait_state(lambda srv: len(polls_for(srv, "mine")) > polled_before)
    assert server.task_state("other") == "active"
    assert server.interrupts == []
    # Once ours starts, it is ours to stop: interrupted at once, and the cancel is reported.
    call.join()
    other.join()
    assert isinstance(call.error, GenerationCancelled), call.error
    assert server.interrupts == ["mine"]
    assert server.interrupted == ["mine"]
    assert len(other.result["images"]) == 4  # the other job ran to the end


def test_partial_images_of_an_interrupted_job_are_never_returned(
    server: WebuiTestServer, fast_engine: WebuiEngine
) -> None:
    server.knobs.generation_s = 30
    # The cancel turns True at the first progress report: the WebUI answers 200 with the batches started so far.
    seen: list[Progress] = []
    req = GenerationRequest("task-x", Api.TXT2IMG, {"width": 8, "height": 8, "n_iter": 3}, seen.append,
                            lambda: bool(seen))
    with pytest.raises(GenerationCancelled):
        fast_engine.generate(req)
    assert server.interrupted == ["task-x"]


def test_cancel_before_sending_sends_nothing(server: WebuiTestServer, engine: WebuiEngine) -> None:
    with pytest.raises(GenerationCancelled):
        engine.generate(GenerationRequest("t", Api.TXT2IMG, {}, is_cancelled=lambda: True))
    assert server.requests == []


def test_deadline_interrupts_our_job_and_times_out(server: WebuiTestServer, engine: WebuiEngine) -> None:
    server.knobs.generation_s = 30
    start = time.monotonic()
    with pytest.raises(EngineTimeout, match=r"deadline of 0\.5 s") as caught:
        engine.generate(GenerationRequest("task-d", Api.TXT2IMG, {"width": 8, "height": 8}, deadline_s=0.5))
    assert 0.5 <= time.monotonic() - start < 1.5
    assert caught.value.retryable
    # The job was ours and active: stopped, so it does not hold the GPU for the rest of its 30 s.
    assert server.wait_state(lambda srv: srv.interrupted == ["task-d"])
    assert server.interrupts == ["task-d"]


def test_deadline_while_queued_stops_our_job_once_it_starts(server: WebuiTestServer, engine: WebuiEngine) -> None:
    server.knobs.generation_s = 1.0
    other = direct_generation(server, "other")
    wait_until(lambda: server.task_state("other") == "active")
    with pytest.raises(EngineTimeout):
        engine.generate(GenerationRequest("late", Api.TXT2IMG, {"width": 8, "height": 8}, deadline_s=0.3))
    assert server.task_state("late") == "queued"
    assert server.interrupts == []
    other.join()
    assert len(other.result["images"]) == 1
    # Abandoned but still queued in the WebUI: interrupted as soon as it became active, never the other job.
    assert server.wait_state(lambda srv: srv.interrupted == ["late"])
    assert server.interrupts == ["late"]


def test_a_spent_deadline_sends_nothing(server: WebuiTestServer, engine: WebuiEngine) -> None:
    with pytest.raises(EngineTimeout, match="before the request was sent"):
        engine.generate(GenerationRequest("t", Api.TXT2IMG, {}, deadline_s=0))
    assert server.requests == []


def test_a_generous_deadline_changes_nothing(server: WebuiTestServer, engine: WebuiEngine) -> None:
    result: GenerationResult = engine.generate(GenerationRequest("t", Api.TXT2IMG, {"width": 8}, deadline_s=60))
    assert len(result.images) == 1
    assert server.interrupts == []
