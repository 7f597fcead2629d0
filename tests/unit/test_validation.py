from __future__ import annotations

import base64
import io
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


def test_unknown_webui_fields_pass_through() -> None:
    _, payload = validate_request({"api": "/sdapi/v1/txt2img", "payload": {"s_churn": 0.5}}, Limits())
    assert payload["s_churn"] == 0.5


def test_img2img_accepts_base64_and_data_urls() -> None:
    image = png_b64()
    api, payload = validate_request({"api": "/sdapi/v1/img2img", "payload": {
        "init_images": [image, "data:image/png;base64," + image]}}, Limits())
    assert api is Api.IMG2IMG
    assert payload["denoising_strength"] == 0.75


@pytest.mark.parametrize(("payload", "field"), [
    ({}, "payload.init_images"),
    ({"init_images": []}, "payload.init_images"),
    ({"init_images": ["http://169.254.169.254/latest/meta-data"]}, "payload.init_images[0]"),
    ({"init_images": ["not base64!"]}, "payload.init_images[0]"),
    ({"init_images": [base64.b64encode(b"not an image").decode()]}, "payload.init_images[0]"),
    ({"init_images": [png_b64()], "mask": 5}, "payload.mask"),
])
def test_img2img_refusals(payload: dict[str, Any], field: str) -> None:
    refuse({"api": "/sdapi/v1/img2img", "payload": payload}, field)
