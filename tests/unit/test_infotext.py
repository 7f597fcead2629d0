"""WebUI-shaped parameters, info and infotexts shared by the fake and diffusers engines."""

from __future__ import annotations

import io
import random
from typing import Any

import pytest
from PIL import Image

from sdasync.engines.infotext import MAX_SEED, GenerationParams, build_info, encode_png, infotext
from sdasync.errors import EngineRejected
from sdasync.models import Api


def params(api: Api = Api.TXT2IMG, **payload: Any) -> GenerationParams:
    return GenerationParams.from_payload(api, payload)


def test_defaults_are_the_webui_apis() -> None:
    p = params(seed=1)
    assert (p.steps, p.cfg_scale, p.width, p.height) == (20, 7.0, 512, 512)
    assert (p.sampler_name, p.scheduler, p.batch_size, p.n_iter) == ("Euler", None, 1, 1)
    assert (p.prompt, p.negative_prompt, p.denoising_strength) == ("", "", None)
    assert params(Api.IMG2IMG).denoising_strength == 0.75


def test_random_seed_is_concrete_and_follows_the_rng() -> None:
    p = GenerationParams.from_payload(Api.TXT2IMG, {"seed": -1}, rng=random.Random(7))
    again = GenerationParams.from_payload(Api.TXT2IMG, {"seed": -1}, rng=random.Random(7))
    assert 0 <= p.seed < MAX_SEED
    assert 0 <= p.subseed < MAX_SEED
    assert p.seed == again.seed


def test_seeds_count_up_across_batches_and_iterations() -> None:
    p = params(seed=10, subseed=3, batch_size=2, n_iter=3)
    assert p.count == 6
    assert p.all_seeds == [10, 11, 12, 13, 14, 15]
    assert p.all_subseeds == [3, 4, 5, 6, 7, 8]


def test_sampler_index_is_the_legacy_fallback() -> None:
    assert params(sampler_index="DDIM").sampler_name == "DDIM"
    assert params(sampler_name="Euler a", sampler_index="DDIM").sampler_name == "Euler a"


def test_numbers_given_as_floats_or_strings_are_accepted() -> None:
    p = params(steps=4.0, width="64", cfg_scale="7.5")
    assert (p.steps, p.width, p.cfg_scale) == (4, 64, 7.5)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"steps": "many"}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"width": 4}, "width"),
        ({"height": 100_000}, "height"),
        ({"batch_size": 0}, "batch_size"),
        ({"n_iter": [1]}, "n_iter"),
        ({"prompt": 5}, "prompt"),
        ({"sampler_name": 3}, "sampler_name"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_fields_are_rejected_by_name(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(EngineRejected, match=field) as caught:
        params(**payload)
    assert caught.value.details["field"] == field


def test_denoising_strength_range_is_checked_for_img2img() -> None:
    with pytest.raises(EngineRejected, match="denoising_strength"):
        params(Api.IMG2IMG, denoising_strength=1.5)


def test_infotext_matches_the_webui_format() -> None:
    p = params(prompt="a cat", negative_prompt="blurry", seed=123, sampler_name="Euler a")
    assert infotext(p, 0, "tiny") == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model: tiny"
    )


def test_infotext_omits_an_empty_negative_prompt_and_keeps_fractions() -> None:
    text = infotext(params(prompt="x", seed=1, cfg_scale=7.5, width=64, height=48), 0, "m")
    assert text == "x\nSteps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 64x48, Model: m"


def test_infotext_per_image_seed_batch_position_schedule_and_denoising() -> None:
    p = params(Api.IMG2IMG, seed=5, batch_size=2, n_iter=2, scheduler="Karras", denoising_strength=0.5)
    text = infotext(p, 3, "m")
    assert "Seed: 8," in text
    assert "Schedule type: Karras" in text
    assert "Batch size: 2, Batch pos: 1" in text
    assert text.endswith("Denoising strength: 0.5")
    assert "Schedule type" not in infotext(params(seed=1, scheduler="Automatic"), 0, "m")


def test_values_that_would_break_the_list_are_quoted_like_the_webui() -> None:
    assert infotext(params(seed=1), 0, "a, b").endswith('Model: "a, b"')


def test_info_has_the_webui_shape() -> None:
    p = params(prompt="p", negative_prompt="n", seed=9, batch_size=3)
    info = build_info(p, "model-x", extra_field=1)
    assert info["all_seeds"] == [9, 10, 11]
    assert info["all_prompts"] == ["p"] * 3
    assert info["all_negative_prompts"] == ["n"] * 3
    assert len(info["infotexts"]) == 3
    assert info["infotexts"][2] == infotext(p, 2, "model-x")
    assert info["sd_model_name"] == "model-x"
    assert info["n_iter"] == 1
    assert info["denoising_strength"] is None
    assert info["extra_field"] == 1


def test_png_carries_the_infotext_where_the_webui_puts_it() -> None:
    data = encode_png(Image.new("RGB", (8, 8)), "a cat\nSteps: 1")
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.text["parameters"] == "a cat\nSteps: 1"  # type: ignore[attr-defined]
