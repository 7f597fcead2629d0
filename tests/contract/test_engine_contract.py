"""One suite for every engine: fake, webui+http against the loopback test WebUI, and diffusers://tiny at 64x64.

What differs between engines is data (``capabilities``), so tests skip by capability, never by engine name.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdasync.backends.registry import REGISTRY, resolve
from sdasync.engines.base import Engine, GenerationRequest, GenerationResult, Progress
from sdasync.errors import ConfigError, EngineRejected, GenerationCancelled
from sdasync.models import Api, EngineHealth
from webui_server import WebuiTestServer

KINDS = ["fake", "webui", "diffusers"]
#: Schemes covered by this suite, and by which kind (webui+https is the same class, checked by parsing below).
COVERED = {"fake": "fake", "webui+http": "webui", "webui+https": "webui", "diffusers": "diffusers"}
SMALL = {"prompt": "a red cube", "width": 64, "height": 48, "steps": 3, "seed": 1234}


def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared with the diffusers integration module: the session builds the tiny model once.
    return tmp_path_factory.getbasetemp() / "engine-models"


@pytest.fixture(scope="module")
def diffusers_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """Loaded once per module: loading is the slow part, and generate keeps no state between calls."""
    engine: Engine = resolve("engine", "diffusers://tiny").from_url(
        "diffusers://tiny?device=cpu", models_dir=models_dir(tmp_path_factory)
    )
    with engine:
        engine.setup()
        yield engine


@pytest.fixture(params=KINDS)
def engine_url(request: pytest.FixtureRequest) -> Iterator[str]:
    kind: str = request.param
    if kind == "webui":
        with WebuiTestServer() as server:
            yield f"{server.url}?read_timeout=30&ready_timeout=10"
    elif kind == "fake":
        yield "fake://?seconds=0.01"
    else:
        yield "diffusers://tiny?device=cpu"


@pytest.fixture
def engine(engine_url: str, request: pytest.FixtureRequest) -> Iterator[Engine]:
    if engine_url.startswith("diffusers"):
        yield request.getfixturevalue("diffusers_engine")
        return
    with ExitStack() as stack:
        opened: Engine = stack.enter_context(resolve("engine", engine_url).from_url(engine_url, models_dir=None))
        opened.setup()
        yield opened


def needs(engine: Engine, capability: str) -> None:
    if capability not in engine.capabilities:
        pytest.skip(f"engine lacks {capability!r}")


def generate(engine: Engine, api: Api = Api.TXT2IMG, **changes: Any) -> GenerationResult:
    return engine.generate(GenerationRequest("task-c", api, {**SMALL, **changes}))


def init_image() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_every_registered_engine_scheme_is_covered() -> None:
    assert set(REGISTRY["engine"]) == set(COVERED)
    assert set(COVERED.values()) == set(KINDS)


def test_https_variant_parses_to_the_same_class() -> None:
    engine = resolve("engine", "webui+https://gpu-box:7860").from_url("webui+https://gpu-box:7860")
    assert engine.base_url == "https://gpu-box:7860"


def test_protocol_shape(engine: Engine) -> None:
    assert isinstance(engine, Engine)
    assert isinstance(engine.capabilities, frozenset)
    assert all(isinstance(c, str) for c in engine.capabilities)
    assert {"txt2img", "img2img"} <= engine.capabilities


def test_from_url_takes_models_dir_and_rejects_unknown_parameters(engine_url: str, tmp_path: Path) -> None:
    cls = resolve("engine", engine_url)
    built = cls.from_url(engine_url, models_dir=tmp_path)
    built.close()
    separator = "&" if "?" in engine_url else "?"
    with pytest.raises(ConfigError, match="valid:"):
        cls.from_url(f"{engine_url}{separator}no_such_parameter=1")


def test_health_is_an_engine_health_that_is_ok(engine: Engine) -> None:
    health = engine.health()
    assert type(health) is EngineHealth
    assert health.ok is True
    assert health.restart is False
    assert EngineHealth.from_dict(health.to_dict()) == health  # what the registry stores reads back the same


def test_txt2img_batch(engine: Engine) -> None:
    result = generate(engine, batch_size=2)
    assert len(result.images) == 2
    for data in result.images:
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.size) == ("PNG", (64, 48))
    info = result.info
    assert info["seed"] == 1234
    assert info["all_seeds"] == [1234, 1235]
    assert len(info["infotexts"]) == 2
    assert isinstance(info["sd_model_name"], str)


def test_seed_decides_the_image(engine: Engine) -> None:
    needs(engine, "deterministic")
    first = generate(engine).images[0]
    assert generate(engine).images[0] == first
    assert generate(engine, seed=1235).images[0] != first


def test_random_seed_is_made_concrete(engine: Engine) -> None:
    info = generate(engine, seed=-1).info
    assert isinstance(info["seed"], int)
    assert info["seed"] >= 0


def test_img2img(engine: Engine) -> None:
    result = generate(engine, Api.IMG2IMG, init_images=[init_image()], denoising_strength=0.7)
    assert len(result.images) == 1
    with Image.open(io.BytesIO(result.images[0])) as image:
        assert image.size == (64, 48)


def test_img2img_without_an_init_image_is_rejected(engine: Engine) -> None:
    with pytest.raises(EngineRejected):
        generate(engine, Api.IMG2IMG)


def test_progress_is_reported_per_step(engine: Engine) -> None:
    needs(engine, "progress")
    seen: list[Progress] = []
    engine.generate(GenerationRequest("task-c", Api.TXT2IMG, dict(SMALL), on_progress=seen.append))
    assert [p.step for p in seen] == [1, 2, 3]
    assert seen[-1].fraction == 1.0


def test_cancel_is_observed(engine: Engine) -> None:
    needs(engine, "cancel")
    seen: list[Progress] = []
    req = GenerationRequest("task-c", Api.TXT2IMG, dict(SMALL), seen.append, is_cancelled=lambda: len(seen) >= 1)
    with pytest.raises(GenerationCancelled):
        engine.generate(req)
    assert len(seen) == 1


def test_close_is_idempotent(engine_url: str) -> None:
    engine: Engine = resolve("engine", engine_url).from_url(engine_url)
    with engine as entered:
        assert entered is engine
    engine.close()
    assert isinstance(engine.health().ok, bool)
