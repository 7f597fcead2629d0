"""DiffusersEngine with the real diffusers pipeline code and the tiny random-weight model, on CPU, small sizes."""

from __future__ import annotations

import base64
import importlib.util
import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdasync.backends.registry import resolve
from sdasync.engines import tiny
from sdasync.engines.base import Engine, GenerationRequest, Progress
from sdasync.engines.diffusers import DiffusersEngine
from sdasync.errors import ConfigError, EngineRejected, EngineTimeout, GenerationCancelled
from sdasync.models import Api, EngineHealth


def png_b64(size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


SMALL = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 2, "seed": 11}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiffusersEngine]:
    # The same folder as the contract suite's, so the session builds the tiny model once.
    models_dir = tmp_path_factory.getbasetemp() / "engine-models"
    with DiffusersEngine.from_url("diffusers://tiny?device=cpu", models_dir=models_dir) as eng:
        eng.setup()
        yield eng


def run(engine: DiffusersEngine, api: Api = Api.TXT2IMG, **changes: Any) -> Any:
    return engine.generate(GenerationRequest("t", api, {**SMALL, **changes}))


def png_sizes(images: list[bytes]) -> list[tuple[int, int]]:
    result = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            result.append(image.size)
    return result


# --- URL parsing (no torch needed) --------------------------------------------------------------------------------


def test_from_url_forms(tmp_path: Path) -> None:
    assert DiffusersEngine.from_url("diffusers://tiny", models_dir=tmp_path).model == "tiny"
    assert DiffusersEngine.from_url("diffusers:///models/sd15").model == Path("models/sd15")
    assert DiffusersEngine.from_url("diffusers:////srv/models/sd15").model == Path("/srv/models/sd15")
    engine = DiffusersEngine.from_url("diffusers://runwayml/stable-diffusion-v1-5?device=cuda:1&dtype=float16")
    assert (engine.model, engine.device, engine.dtype) == ("runwayml/stable-diffusion-v1-5", "cuda:1", "float16")
    assert engine.model_name == "stable-diffusion-v1-5"
    assert resolve("engine", "diffusers://tiny") is DiffusersEngine


def test_models_live_under_the_cache_dir_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment is the entry point's business: an engine reads only what it is passed.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ignored"))
    engine = DiffusersEngine.from_url("diffusers://tiny", cache_dir=tmp_path / "cache")
    assert engine.models_dir == tmp_path / "cache" / "sdasync" / "models"
    assert DiffusersEngine.from_url("diffusers://tiny").models_dir == Path.home() / ".cache" / "sdasync" / "models"
    assert DiffusersEngine.from_url("diffusers://tiny", models_dir=tmp_path, cache_dir=tmp_path / "c").models_dir \
        == tmp_path


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("diffusers://tiny?device=tpu", "device must be"),
        ("diffusers://tiny?dtype=int8", "dtype must be"),
        ("diffusers://tiny?steps=3", "valid: device, dtype"),
        ("diffusers://org/name/extra", "not a hub id"),
        ("diffusers://", "names no path"),
    ],
)
def test_bad_urls_fail_fast(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DiffusersEngine.from_url(url)


def test_missing_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'sdasync\[diffusers\]'"):
        DiffusersEngine.from_url("diffusers://tiny")


def test_parsing_and_health_import_no_torch() -> None:
    code = (
        "import sys; from sdasync.engines.diffusers import DiffusersEngine\n"
        "e = DiffusersEngine.from_url('diffusers://tiny')\n"
        "h = e.health(); assert h.ok is True and h.loaded is False, h\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- setup and the tiny model folder ------------------------------------------------------------------------------


def test_tiny_folder_is_built_once_then_reloaded(tmp_path: Path) -> None:
    with DiffusersEngine.from_url("diffusers://tiny", models_dir=tmp_path) as first:
        first.setup()
        image = run(first).images[0]
    weights = tmp_path / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    built = {p: p.stat().st_mtime_ns for p in (tmp_path / "tiny").rglob("*")}
    assert weights in built
    with DiffusersEngine.from_url("diffusers://tiny", models_dir=tmp_path) as second:
        second.setup()
        assert run(second).images[0] == image
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "tiny").rglob("*")} == built
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary folders left behind


def test_tiny_builds_are_identical_and_racing_builders_agree(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tiny.ensure(tmp_path / "race"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [tmp_path / "race" / "tiny"] * 3
    assert sorted(p.name for p in (tmp_path / "race").iterdir()) == ["tiny"]
    tiny.build(tmp_path / "again")
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "race" / "tiny" / name).read_bytes()


def test_tokenizer_uses_the_written_vocabulary(engine: DiffusersEngine) -> None:
    tokenizer = engine._txt2img.tokenizer
    ids = tokenizer("the cat").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 4  # "the" and "cat" are single merged tokens
    assert tokenizer.model_max_length == 77


def test_missing_models_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no model_index\.json"):
        DiffusersEngine(tmp_path / "nothing-here", device="cpu").setup()
    with pytest.raises(ConfigError, match="cannot load model"):
        DiffusersEngine("sdasync-tests/not-in-the-cache", device="cpu").setup()


def test_health_after_setup(engine: DiffusersEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.health() == EngineHealth(ok=True, detail="ready", loaded=True, model="sdasync-tiny",
                                           extra={"device": "cpu"})


# --- generation ---------------------------------------------------------------------------------------------------


def test_txt2img_sizes_count_and_info(engine: DiffusersEngine) -> None:
    result = run(engine, width=64, height=48, batch_size=2, n_iter=2, negative_prompt="blurry")
    assert png_sizes(result.images) == [(64, 48)] * 4
    info = result.info
    assert info["sd_model_name"] == "sdasync-tiny"
    assert info["all_seeds"] == [11, 12, 13, 14]
    assert (info["steps"], info["cfg_scale"], info["sampler_name"], info["n_iter"]) == (2, 7.0, "Euler", 2)
    assert info["infotexts"][3] == (
        "a photo of a cat\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 14, "
        "Size: 64x48, Model: sdasync-tiny, Batch size: 2, Batch pos: 1"
    )


def test_seeds_decide_the_image(engine: DiffusersEngine) -> None:
    first = run(engine).images[0]
    assert run(engine).images[0] == first
    assert run(engine, seed=12).images[0] != first
    info = run(engine, seed=-1).info
    assert info["seed"] >= 0
    assert info["all_seeds"] == [info["seed"]]


def test_img2img_uses_the_init_image_at_the_requested_size(engine: DiffusersEngine) -> None:
    init = "data:image/png;base64," + png_b64((100, 80), (250, 20, 20))
    result = run(engine, Api.IMG2IMG, init_images=[init], steps=4, denoising_strength=0.5)
    assert png_sizes(result.images) == [(64, 64)]
    assert result.info["denoising_strength"] == 0.5
    other = [png_b64((64, 64), (20, 20, 250))]
    changed = run(engine, Api.IMG2IMG, init_images=other, steps=4, denoising_strength=0.5)
    assert changed.images[0] != result.images[0]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"init_images": []}, "init_images"),
        ({"init_images": ["not base64!"]}, "init_images"),
        ({"init_images": ["aGVsbG8="], "mask": "aGVsbG8="}, "mask"),
        ({"init_images": [png_b64((8, 8), (1, 2, 3))], "steps": 2, "denoising_strength": 0.1}, "denoising_strength"),
    ],
)
def test_bad_img2img_requests_are_rejected(engine: DiffusersEngine, payload: dict[str, Any], field: str) -> None:
    with pytest.raises(EngineRejected, match=field):
        run(engine, Api.IMG2IMG, **payload)


@pytest.mark.parametrize(
    ("sampler", "scheduler"),
    [
        ("Euler a", None),
        ("DPM++ 2M", "Karras"),
        ("DPM++ 2M Karras", None),
        ("DPM++ SDE", None),
        ("DDIM", None),
        ("UniPC", None),
        ("Heun", None),
        ("PNDM", None),
        ("LMS", None),
        ("dpm++ 2m sde", "Automatic"),
    ],
)
def test_samplers(engine: DiffusersEngine, sampler: str, scheduler: str | None) -> None:
    result = run(engine, sampler_name=sampler, scheduler=scheduler)
    assert png_sizes(result.images) == [(64, 64)]
    assert result.info["sampler_name"] == sampler


def test_samplers_differ(engine: DiffusersEngine) -> None:
    assert run(engine, sampler_name="Euler a").images[0] != run(engine, sampler_name="DDIM").images[0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sampler_name": "Restart"}, "supported: Euler, Euler a"),
        ({"sampler_name": "Euler", "scheduler": "Align Your Steps"}, "schedule type"),
        ({"sampler_name": "DDIM", "scheduler": "Karras"}, "Karras does not work with DDIMScheduler"),
    ],
)
def test_unsupported_samplers_are_rejected(engine: DiffusersEngine, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(EngineRejected, match=message):
        run(engine, **changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"enable_hr": True},
        {"restore_faces": True},
        {"tiling": True},
        {"subseed_strength": 0.3},
        {"styles": ["s"]},
        {"override_settings": {"CLIP_stop_at_last_layers": 2}},
        {"alwayson_scripts": {"controlnet": {}}},
    ],
)
def test_fields_that_would_change_the_image_are_refused(engine: DiffusersEngine, changes: dict[str, Any]) -> None:
    (field,) = changes
    with pytest.raises(EngineRejected, match=field):
        run(engine, **changes)


def test_neutral_values_of_those_fields_are_fine(engine: DiffusersEngine) -> None:
    neutral = {
        "enable_hr": False,
        "restore_faces": False,
        "tiling": False,
        "subseed_strength": 0,
        "styles": [],
        "override_settings": {},
        "seed_resize_from_w": -1,
        "send_images": True,
        "eta": 0,
    }
    assert run(engine, **neutral).images[0] == run(engine).images[0]


def test_size_must_be_a_multiple_of_8(engine: DiffusersEngine) -> None:
    with pytest.raises(EngineRejected, match="multiples of 8"):
        run(engine, width=60)


def test_progress_once_per_step_across_iterations(engine: DiffusersEngine) -> None:
    seen: list[Progress] = []
    engine.generate(GenerationRequest("t", Api.TXT2IMG, {**SMALL, "steps": 3, "n_iter": 2}, seen.append))
    assert [p.step for p in seen] == [1, 2, 3, 4, 5, 6]
    assert {p.steps for p in seen} == {6}
    assert seen[-1].eta_s == 0


def test_cancel_stops_the_pipeline_and_the_engine_still_works(engine: DiffusersEngine) -> None:
    seen: list[Progress] = []
    req = GenerationRequest("t", Api.TXT2IMG, {**SMALL, "steps": 10}, seen.append, lambda: len(seen) >= 2)
    with pytest.raises(GenerationCancelled):
        engine.generate(req)
    assert len(seen) == 2
    assert png_sizes(run(engine).images) == [(64, 64)]


def test_deadline_stops_the_pipeline_at_a_step_and_the_engine_still_works(engine: DiffusersEngine) -> None:
    seen: list[Progress] = []

    def slow_first_step(progress: Progress) -> None:
        # The first step's report outlasts the deadline, so the engine must notice at the next step and not run
        # the remaining 999; the deadline leaves a loaded machine seconds to reach that first step.
        seen.append(progress)
        if len(seen) == 1:
            time.sleep(3.5)

    req = GenerationRequest("t", Api.TXT2IMG, {**SMALL, "steps": 1000}, slow_first_step, deadline_s=3.0)
    start = time.monotonic()
    with pytest.raises(EngineTimeout, match=r"deadline of 3 s at step \d+ of batch 1") as caught:
        engine.generate(req)
    assert time.monotonic() - start < 30.0
    assert caught.value.retryable
    assert 1 <= len(seen) <= 3
    assert png_sizes(run(engine).images) == [(64, 64)]


def test_a_tiny_deadline_stops_before_the_first_batch(engine: DiffusersEngine) -> None:
    with pytest.raises(EngineTimeout, match="before batch 1"):
        engine.generate(GenerationRequest("t", Api.TXT2IMG, dict(SMALL), deadline_s=1e-9))
