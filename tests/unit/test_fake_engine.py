"""The fake engine: URL parsing, deterministic PNGs, progress, cancellation and simulated failures."""

from __future__ import annotations

import io
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from helpers import wait_until
from sdasync.backends.registry import resolve
from sdasync.engines.base import Engine, GenerationRequest, Progress
from sdasync.engines.fake import FakeEngine
from sdasync.errors import ConfigError, EngineRejected, EngineTimeout, EngineUnavailable, GenerationCancelled
from sdasync.models import Api, EngineHealth


def request(api: Api = Api.TXT2IMG, **payload: Any) -> GenerationRequest:
    return GenerationRequest(task_id="t1", api=api, payload=payload)


def sizes(images: list[bytes]) -> list[tuple[int, int]]:
    result = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            result.append(image.size)
    return result


def test_from_url_defaults_and_parameters(tmp_path: Path) -> None:
    engine = FakeEngine.from_url("fake://", models_dir=tmp_path)
    assert (engine.seconds, engine.fail_rate, engine.fail) == (0.0, 0.0, "transient")
    engine = FakeEngine.from_url("fake://?seconds=0.5&fail_rate=0.25&fail=permanent")
    assert (engine.seconds, engine.fail_rate, engine.fail) == (0.5, 0.25, "permanent")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("fake://?seconds=-1", "seconds"),
        ("fake://?seconds=soon", "seconds"),
        ("fake://?fail_rate=1.5", "fail_rate"),
        ("fake://?fail=sometimes", "transient, permanent"),
        ("fake://?sekonds=1", "valid: fail, fail_rate, seconds"),
        ("fake://host", "only query parameters"),
    ],
)
def test_bad_urls_fail_fast(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FakeEngine.from_url(url)


def test_registry_and_protocol() -> None:
    assert resolve("engine", "fake://") is FakeEngine
    with FakeEngine() as engine:
        assert isinstance(engine, Engine)
        assert engine.health() == EngineHealth(ok=True, detail="ready", model="fake", extra={"seconds": 0.0})
    assert engine.health().ok is False  # closed by the context manager


def test_images_have_the_requested_size_and_count() -> None:
    result = FakeEngine().generate(request(width=64, height=48, batch_size=2, n_iter=2, seed=1))
    assert sizes(result.images) == [(64, 48)] * 4
    assert result.info["all_seeds"] == [1, 2, 3, 4]
    assert len(result.info["infotexts"]) == 4
    assert result.info["sd_model_name"] == "fake"


def test_default_size_is_512() -> None:
    assert sizes(FakeEngine().generate(request(seed=1)).images) == [(512, 512)]


def test_same_seed_same_bytes_different_seed_or_prompt_differs() -> None:
    engine = FakeEngine()
    first = engine.generate(request(prompt="cat", seed=42, width=32, height=32)).images[0]
    assert engine.generate(request(prompt="cat", seed=42, width=32, height=32)).images[0] == first
    assert engine.generate(request(prompt="cat", seed=43, width=32, height=32)).images[0] != first
    assert engine.generate(request(prompt="dog", seed=42, width=32, height=32)).images[0] != first


def test_random_seed_is_reported() -> None:
    info = FakeEngine().generate(request(seed=-1, width=8, height=8)).info
    assert info["seed"] >= 0
    assert info["all_seeds"] == [info["seed"]]
    assert f"Seed: {info['seed']}," in info["infotexts"][0]


def test_progress_once_per_step_over_the_configured_time() -> None:
    seen: list[Progress] = []
    engine = FakeEngine(seconds=0.2)
    start = time.monotonic()
    engine.generate(GenerationRequest("t", Api.TXT2IMG, {"steps": 4, "width": 8, "height": 8}, seen.append))
    assert time.monotonic() - start >= 0.2
    assert [p.step for p in seen] == [1, 2, 3, 4]
    assert {p.steps for p in seen} == {4}
    etas = [p.eta_s for p in seen]
    assert all(e is not None for e in etas)
    assert etas == sorted(etas, reverse=True)
    assert seen[-1].fraction == 1.0


def test_cancel_stops_between_steps() -> None:
    seen: list[Progress] = []
    req = GenerationRequest(
        "t", Api.TXT2IMG, {"steps": 10, "width": 8, "height": 8}, seen.append, lambda: len(seen) >= 3
    )
    with pytest.raises(GenerationCancelled):
        FakeEngine().generate(req)
    assert [p.step for p in seen] == [1, 2, 3]


@pytest.mark.parametrize(("fail", "error"), [("transient", EngineUnavailable), ("permanent", EngineRejected)])
def test_simulated_failures(fail: str, error: type[Exception]) -> None:
    with pytest.raises(error, match="simulated"):
        FakeEngine(fail_rate=1.0, fail=fail).generate(request(width=8, height=8))
    assert EngineUnavailable.retryable
    assert not EngineRejected.retryable


def test_fail_rate_is_a_rate() -> None:
    engine = FakeEngine(fail_rate=0.5, rng=random.Random(1))
    outcomes = []
    for _ in range(40):
        try:
            engine.generate(request(width=8, height=8, seed=1))
            outcomes.append(True)
        except EngineUnavailable:
            outcomes.append(False)
    assert 5 < sum(outcomes) < 35


def test_img2img_needs_init_images() -> None:
    with pytest.raises(EngineRejected, match="init_images"):
        FakeEngine().generate(request(Api.IMG2IMG, width=8, height=8))
    result = FakeEngine().generate(request(Api.IMG2IMG, width=8, height=8, init_images=["x"], seed=1))
    assert result.info["denoising_strength"] == 0.75


def test_bad_payload_is_rejected() -> None:
    with pytest.raises(EngineRejected, match="width"):
        FakeEngine().generate(request(width="wide"))


def test_close_wakes_a_long_generation() -> None:
    engine = FakeEngine(seconds=60)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            engine.generate(request(width=8, height=8, steps=2))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: engine.calls == 1)
    engine.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], EngineUnavailable)


def test_deadline_stops_a_long_generation_quickly() -> None:
    seen: list[Progress] = []
    req = GenerationRequest("t", Api.TXT2IMG, {"steps": 4, "width": 8, "height": 8}, seen.append, deadline_s=0.5)
    start = time.monotonic()
    with pytest.raises(EngineTimeout, match=r"deadline of 0\.5 s") as caught:
        FakeEngine(seconds=5).generate(req)
    # Cut short inside a 1.25 s step, not at the step's end.
    assert 0.5 <= time.monotonic() - start < 1.0
    assert caught.value.retryable
    assert seen == []


def test_a_deadline_longer_than_the_work_changes_nothing() -> None:
    req = GenerationRequest("t", Api.TXT2IMG, {"steps": 2, "width": 8, "height": 8, "seed": 1}, deadline_s=5)
    assert FakeEngine(seconds=0.05).generate(req).images == FakeEngine().generate(request(
        steps=2, width=8, height=8, seed=1)).images
