from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from PIL import Image

from sdasync.config import Limits
from sdasync.errors import RequestError
from sdasync.models import Api
from sdasync.validation import validate_request

SEED_PROMPT = "(masterpiece), portrait of a girl, (medieval armor), chainmail"


def png_b64(size: tuple[int, int] = (64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def refuse(body: Any, field: str, limits: Limits | None = None) -> RequestError:
    with pytest.raises(RequestError) as info:
        validate_request(body, limits or Limits())
    assert info.value.field == field, info.value.message
    return info.value


def test_seed_request_is_accepted_with_defaults() -> None:
    api, payload = validate_request({"api": "/sdapi/v1/txt2img", "payload": {"prompt": SEED_PROMPT, "steps": 20}},
                                    Limits())
    assert api is Api.TXT2IMG
    assert payload["width"] == payload["height"] == 512
    assert payload["steps"] == 20
    assert payload["seed"] == -1
    assert payload["prompt"] == SEED_PROMPT


@pytest.mark.parametrize("route", ["/sdapi/v1/options", "/sdapi/v1/cmd-flags", "/sdapi/v1/server-kill",
                                   "txt2img", "/sdapi/v1/txt2img/../options", "", 5])
def test_only_generation_routes(route: Any) -> None:
    refuse({"api": route, "payload": {}}, "api")


def test_api_missing() -> None:
    refuse({"payload": {}}, "api")


@pytest.mark.parametrize(("payload", "field"), [
    ({"steps": 0}, "payload.steps"),
    ({"steps": 1000}, "payload.steps"),
    ({"steps": 20.5}, "payload.steps"),
    ({"steps": True}, "payload.steps"),
    ({"steps": "20"}, "payload.steps"),
    ({"width": 100000}, "payload.width"),
    ({"width": 500}, "payload.width"),
    ({"height": 32}, "payload.height"),
    ({"cfg_scale": float("nan")}, "payload.cfg_scale"),
    ({"cfg_scale": float("inf")}, "payload.cfg_scale"),
    ({"extra": {"deep": [1.0, float("-inf")]}}, "payload.extra.deep[1]"),
    ({"seed": 1.5}, "payload.seed"),
    ({"seed": -2}, "payload.seed"),
    ({"seed": 2**40}, "payload.seed"),
    ({"batch_size": 4, "n_iter": 4}, "payload.batch_size"),
    ({"batch_size": 0}, "payload.batch_size"),
    ({"width": 2048, "height": 2048, "batch_size": 4}, "payload.width"),
    ({"prompt": "x" * 10_001}, "payload.prompt"),
    ({"prompt": 5}, "payload.prompt"),
    ({"script_name": "x/y/z plot"}, "payload.script_name"),
    ({"alwayson_scripts": {"controlnet": {"args": []}}}, "payload.alwayson_scripts"),
    ({"override_settings": {"sd_model_checkpoint": "other.safetensors"}},
     "payload.override_settings.sd_model_checkpoint"),
    ({"override_settings": "x"}, "payload.override_settings"),
    ({"init_images": [png_b64()]}, "payload.init_images"),
    ({"enable_hr": True, "hr_scale": 4.0, "width": 1024, "height": 1024}, "payload.hr_scale"),
    ({"restore_faces": "yes"}, "payload.restore_faces"),
    ({"styles": "anime"}, "payload.styles"),
    ({"denoising_strength": 1.5}, "payload.denoising_strength"),
    ({"prompt": "\ud800"}, "payload.prompt"),
    ({"extra": {"\udfff": 1}}, r"payload.extra.'\udfff'"),
    ({"width": 2048, "height": 64, "enable_hr": True, "hr_scale": 1, "hr_resize_y": 2048}, "payload.hr_scale"),
    ({"width": 512, "height": 512, "enable_hr": True, "hr_resize_x": 2048, "hr_resize_y": 4096}, "payload.hr_scale"),
    ({"enable_hr": True, "hr_second_pass_steps": 100000}, "payload.hr_second_pass_steps"),
    ({"infotext": "Steps: 20, Sampler: Euler"}, "payload.infotext"),
    ({"hr_checkpoint_name": "other.safetensors"}, "payload.hr_checkpoint_name"),
    ({"refiner_checkpoint": "refiner.safetensors"}, "payload.refiner_checkpoint"),
    ({"seed_resize_from_w": 100000}, "payload.seed_resize_from_w"),
    ({"seed": 2**32 - 1, "batch_size": 2}, "payload.seed"),
    ({"firstpass_image": "https://169.254.169.254/x.png"}, "payload.firstpass_image"),
    ({"hr_prompt": 5}, "payload.hr_prompt"),
    ({"comments": {"a": 1}}, "payload.comments.a"),
    ({"script_args": [1.0, float("nan")]}, "payload.script_args[1]"),
    ({"override_settings": {"CLIP_stop_at_last_layers": json.loads("[" * 33 + "1" + "]" * 33)}},
     "payload.override_settings.CLIP_stop_at_last_layers" + "[0]" * 30),
])
def test_txt2img_refusals(payload: dict[str, Any], field: str) -> None:
    refuse({"api": "/sdapi/v1/txt2img", "payload": payload}, field)


def test_body_shape() -> None:
    refuse([1, 2], "body")
    refuse({"api": "/sdapi/v1/txt2img", "payload": [1]}, "payload")
    refuse({"api": "/sdapi/v1/txt2img", "payload": {}, "callback": "http://x"}, "callback")


def test_configured_limits_apply() -> None:
    limits = Limits(max_width=1024, max_steps=50, max_images=2, allow_scripts=True,
                    override_settings_allowlist=frozenset({"sd_vae"}))
    refuse({"api": "/sdapi/v1/txt2img", "payload": {"width": 1032}}, "payload.width", limits)
    refuse({"api": "/sdapi/v1/txt2img", "payload": {"steps": 51}}, "payload.steps", limits)
    refuse({"api": "/sdapi/v1/txt2img", "payload": {"batch_size": 3}}, "payload.batch_size", limits)
    _, payload = validate_request({"api": "/sdapi/v1/txt2img", "payload": {
        "script_name": "x", "override_settings": {"sd_vae": "auto"}}}, limits)
    assert payload["script_name"] == "x"


def test_allowed_overrides_are_always_restored() -> None:
    _, payload = validate_request({"api": "/sdapi/v1/txt2img", "payload": {
        "override_settings": {"CLIP_stop_at_last_layers": 2}, "override_settings_restore_afterwards": False}},
        Limits())
    assert payload["override_settings_restore_afterwards"] is True


def test_one_hires_side_follows_the_aspect_ratio() -> None:
    _, payload = validate_request({"api": "/sdapi/v1/txt2img", "payload": {
        "width": 512, "height": 256, "enable_hr": True, "hr_resize_x": 1024}}, Limits())
    assert payload["hr_resize_x"] == 1024


def test_oversized_init_image_refused_before_decoding() -> None:
    refuse({"api": "/sdapi/v1/img2img", "payload": {"init_images": [png_b64((4200, 4200))]}},
           "payload.init_images[0]", Limits(max_width=1024, max_height=1024))


def test_server_fields_are_not_the_clients() -> None:
    _, payload = validate_request({"api": "/sdapi/v1/txt2img", "payload": {
        "force_task_id": "someone-elses-task", "send_images": False, "save_images": True}}, Limits())
    assert "force_task_id" not in payload
    assert "send_images" not in payload
    assert "save_images" not in payload


#: What webuiapi (sdwebuiapi) sends for ``api.txt2img(prompt=...)`` with its defaults: legacy fields included.
WEBUIAPI_TXT2IMG: dict[str, Any] = {
    "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_prompt": "",
    "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
    "prompt": SEED_PROMPT, "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": "Euler a", "sampler_index": "Euler a",
    "batch_size": 1, "n_iter": 1, "steps": 30, "cfg_scale": 7.0, "width": 512, "height": 512,
    "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
    "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
    "override_settings": {}, "override_settings_restore_afterwards": True, "script_args": [], "script_name": None,
    "send_images": True, "save_images": False, "alwayson_scripts": {},
}


def test_client_library_defaults_are_accepted() -> None:
    _, payload = validate_request({"api": "/sdapi/v1/txt2img", "payload": WEBUIAPI_TXT2IMG}, Limits())
    assert payload["s_churn"] == 0
    assert payload["sampler_index"] == "Euler a"
    assert payload["firstphase_width"] == 0
    assert payload["steps"] == 30
    assert "send_images" not in payload


def test_client_library_img2img_defaults_are_accepted() -> None:
    body = {key: value for key, value in WEBUIAPI_TXT2IMG.items()
            if not key.startswith(("hr_", "firstphase_", "enable_hr"))}
    body.update(init_images=[png_b64()], resize_mode=0, denoising_strength=0.75, image_cfg_scale=1.5,
                mask_blur=4, inpainting_fill=0, inpaint_full_res=True, inpaint_full_res_padding=0,
                inpainting_mask_invert=0, initial_noise_multiplier=1.0, include_init_images=False,
                mask=png_b64())
    api, payload = validate_request({"api": "/sdapi/v1/img2img", "payload": body}, Limits())
    assert api is Api.IMG2IMG
    assert payload["mask_blur"] == 4


def test_unknown_fields_are_refused_with_a_hint() -> None:
    error = refuse({"api": "/sdapi/v1/txt2img", "payload": {"step": 1}}, "payload.step")
    assert "steps" in error.message
    assert error.details["hint"] == "steps"
    error = refuse({"api": "/sdapi/v1/txt2img", "payload": {"zzzzzz": 1}}, "payload.zzzzzz")
    assert "did you mean" not in error.message
    error = refuse({"api": "/sdapi/v1/img2img", "payload": {"init_images": [png_b64()], "enable_hr": True}},
                   "payload.enable_hr")
    assert "txt2img" in error.message


@pytest.mark.parametrize("name", ["hr_prompt", "hr_negative_prompt", "negative_prompt", "infotext"])
def test_every_prompt_like_field_is_bounded(name: str) -> None:
    refuse({"api": "/sdapi/v1/txt2img", "payload": {name: "x" * 10_001}}, f"payload.{name}")


def test_prompt_bounds_follow_the_limits() -> None:
    refuse({"api": "/sdapi/v1/txt2img", "payload": {"styles": ["a", "x" * 101]}}, "payload.styles[1]",
           Limits(max_prompt_chars=100))
    refuse({"api": "/sdapi/v1/txt2img", "payload": {"comments": {"note": "x" * 101}}}, "payload.comments.note",
           Limits(max_prompt_chars=100))
    _, payload = validate_request({"api": "/sdapi/v1/txt2img", "payload": {"hr_prompt": "x" * 20_000}},
                                  Limits(max_prompt_chars=20_000))
    assert len(payload["hr_prompt"]) == 20_000


def test_names_and_lists_are_bounded() -> None:
    refuse({"api": "/sdapi/v1/txt2img", "payload": {"sampler_name": "x" * 201}}, "payload.sampler_name")
    refuse({"api": "/sdapi/v1/txt2img", "payload": {"styles": ["a"] * 65}}, "payload.styles")


def test_empty_script_fields_ask_for_nothing() -> None:
    _, payload = validate_request({"api": "/sdapi/v1/txt2img", "payload": {
        "script_name": None, "script_args": [], "alwayson_scripts": {}, "infotext": None}}, Limits())
    assert payload["script_args"] == []


def test_img2img_accepts_base64_and_data_urls() -> None:
    image = png_b64()
    wrapped = "\n".join(image[i:i + 76] for i in range(0, len(image), 76))
    api, payload = validate_request({"api": "/sdapi/v1/img2img", "payload": {
        "init_images": [image, "data:image/png;base64," + image, wrapped]}}, Limits())
    assert api is Api.IMG2IMG
    assert payload["denoising_strength"] == 0.75


@pytest.mark.parametrize(("payload", "field"), [
    ({}, "payload.init_images"),
    ({"init_images": []}, "payload.init_images"),
    ({"init_images": ["http://169.254.169.254/latest/meta-data"]}, "payload.init_images[0]"),
    ({"init_images": ["not base64!"]}, "payload.init_images[0]"),
    ({"init_images": [base64.b64encode(b"not an image").decode()]}, "payload.init_images[0]"),
    ({"init_images": [png_b64()], "mask": 5}, "payload.mask"),
    ({"init_images": ["data:image/png;base64"]}, "payload.init_images[0]"),
    ({"init_images": ["data:"]}, "payload.init_images[0]"),
    ({"init_images": ["data:text/html,<b>"]}, "payload.init_images[0]"),
    ({"init_images": ["=" * 7]}, "payload.init_images[0]"),
    ({"init_images": ["\u00e9\u00e9\u00e9\u00e9"]}, "payload.init_images[0]"),
    ({"init_images": [base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()]}, "payload.init_images[0]"),
    ({"init_images": [png_b64()] * 17}, "payload.init_images"),
    ({"init_images": [png_b64()], "latent_mask": "https://example.invalid/x.png"}, "payload.latent_mask"),
])
def test_img2img_refusals(payload: dict[str, Any], field: str) -> None:
    refuse({"api": "/sdapi/v1/img2img", "payload": payload}, field)
