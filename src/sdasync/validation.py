"""Checks a submitted request before any task exists. Every refusal is a RequestError naming the field.

Only the two generation routes are ever forwarded (the original design forwarded any ``api`` verbatim, so a client
could change the WebUI's global options). Fields the WebUI reads from us, not from clients (``send_images``,
``save_images``, ``force_task_id``), are overwritten or dropped. Unknown fields pass through: WebUI versions and
forks add fields, and the WebUI itself ignores the ones it does not know.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping
from typing import Any

from sdasync.config import Limits
from sdasync.errors import RequestError
from sdasync.models import Api

DEFAULTS: Mapping[str, Any] = {
    "prompt": "", "negative_prompt": "", "steps": 20, "width": 512, "height": 512,
    "batch_size": 1, "n_iter": 1, "seed": -1, "cfg_scale": 7.0,
}
SEED_MAX = 2**32 - 1
SCRIPT_FIELDS = ("script_name", "script_args", "alwayson_scripts")
#: Fields that load another checkpoint: allowed only where switching models is (``sd_model_checkpoint`` in the
#: override allowlist), since a switch stalls every other task on that WebUI.
MODEL_FIELDS = ("hr_checkpoint_name", "refiner_checkpoint")
#: Set by sdasync on every call, so a client cannot, e.g., pick another task's id to interrupt it.
SERVER_FIELDS = ("force_task_id", "send_images", "save_images")
MAX_DEPTH = 32


def validate_request(body: Any, limits: Limits) -> tuple[Api, dict[str, Any]]:
    """The route and the payload with defaults filled in. Raises RequestError."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object with 'api' and 'payload'", field="body")
    unknown = set(body) - {"api", "payload"}
    if unknown:
        raise RequestError(f"unknown top-level field(s): {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
    api = _api(body.get("api"))
    payload = body.get("payload", {})
    if not isinstance(payload, Mapping):
        raise RequestError("payload must be a JSON object of WebUI fields", field="payload")
    _check_finite(payload, "payload", 0)
    return api, validate_payload(api, dict(payload), limits)


def _api(value: Any) -> Api:
    valid = ", ".join(a.value for a in Api)
    if value is None:
        raise RequestError(f"api is required; one of: {valid}", field="api")
    try:
        return Api(value)
    except ValueError:
        raise RequestError(f"api {value!r} is not allowed; one of: {valid}", field="api") from None


def _check_finite(value: Any, path: str, depth: int) -> None:
    # Python's json module accepts NaN and Infinity; nothing downstream should ever see them.
    if depth > MAX_DEPTH:
        raise RequestError(f"{path} is nested too deeply", field=path)
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{path} must be a finite number, not {value}", field=path)
    if isinstance(value, str):
        _check_text(value, path)
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_text(str(key), f"{path}.{key!r}")
            _check_finite(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{path}[{i}]", depth + 1)


def _check_text(value: str, path: str) -> None:
    # JSON escapes can smuggle lone surrogates ("\ud800") that no encoder downstream accepts.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{path} is not valid Unicode text", field=path) from None


def _int(payload: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = payload[name]
    # bool is an int in Python and 512.0 is a float in JSON: neither is what the WebUI expects.
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"payload.{name} must be an integer", field=f"payload.{name}")
    if not low <= value <= high:
        raise RequestError(f"payload.{name} must be between {low} and {high}, got {value}", field=f"payload.{name}")
    return value


def _number(payload: Mapping[str, Any], name: str, low: float, high: float) -> float:
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"payload.{name} must be a number", field=f"payload.{name}")
    if not low <= value <= high:
        raise RequestError(f"payload.{name} must be between {low} and {high}, got {value}", field=f"payload.{name}")
    return float(value)


def _text(payload: Mapping[str, Any], name: str, max_chars: int) -> str:
    value = payload[name]
    if not isinstance(value, str):
        raise RequestError(f"payload.{name} must be a string", field=f"payload.{name}")
    if len(value) > max_chars:
        raise RequestError(f"payload.{name} is longer than {max_chars} characters", field=f"payload.{name}")
    return value


def validate_payload(api: Api, payload: dict[str, Any], limits: Limits) -> dict[str, Any]:
    for key, value in DEFAULTS.items():
        payload.setdefault(key, value)
    for name in SERVER_FIELDS:
        payload.pop(name, None)

    for name in ("prompt", "negative_prompt"):
        _text(payload, name, limits.max_prompt_chars)
    for name in ("sampler_name", "sampler_index", "scheduler"):
        if name in payload:
            _text(payload, name, 100)
    if "styles" in payload and not (
        isinstance(payload["styles"], list) and all(isinstance(s, str) for s in payload["styles"])
    ):
        raise RequestError("payload.styles must be a list of strings", field="payload.styles")

    width = _size(payload, "width", limits.max_width)
    height = _size(payload, "height", limits.max_height)
    _int(payload, "steps", limits.min_steps, limits.max_steps)
    images = _int(payload, "batch_size", 1, limits.max_images) * _int(payload, "n_iter", 1, limits.max_images)
    if images > limits.max_images:
        raise RequestError(f"batch_size x n_iter must be at most {limits.max_images}, got {images}",
                           field="payload.batch_size")
    _pixel_budget(payload, width, height, images, limits)

    _seed(payload, "seed")
    if payload["seed"] + images - 1 > SEED_MAX:
        # Image i uses seed + i, as in the WebUI.
        raise RequestError(f"payload.seed + images - 1 must stay below 2^32, got {payload['seed']}",
                           field="payload.seed")
    if "subseed" in payload:
        _seed(payload, "subseed")
    _number(payload, "cfg_scale", 0.0, 30.0)
    for name in ("subseed_strength", "denoising_strength"):
        if name in payload:
            _number(payload, name, 0.0, 1.0)
    for name in ("restore_faces", "tiling", "enable_hr"):
        if name in payload and not isinstance(payload[name], bool):
            raise RequestError(f"payload.{name} must be true or false", field=f"payload.{name}")

    _scripts(payload, limits)
    _override_settings(payload, limits)
    if "infotext" in payload:
        # A1111 applies an infotext's settings as overrides, around the allowlist.
        raise RequestError("payload.infotext is not accepted; send the fields themselves", field="payload.infotext")
    for name in MODEL_FIELDS:
        if payload.get(name) and "sd_model_checkpoint" not in limits.override_settings_allowlist:
            raise RequestError(f"payload.{name} would load another checkpoint, which this server does not allow",
                               field=f"payload.{name}")
    for name, maximum in (("seed_resize_from_w", limits.max_width), ("seed_resize_from_h", limits.max_height)):
        if name in payload:
            _int(payload, name, -1, maximum)
    if api is Api.IMG2IMG:
        _img2img(payload, limits)
    else:
        for name in ("init_images", "mask"):
            if name in payload:
                raise RequestError(f"payload.{name} is only for /sdapi/v1/img2img", field=f"payload.{name}")
    return payload


def _size(payload: Mapping[str, Any], name: str, maximum: int) -> int:
    value = _int(payload, name, 64, maximum)
    if value % 8:
        raise RequestError(f"payload.{name} must be a multiple of 8, got {value}", field=f"payload.{name}")
    return value


def _pixel_budget(payload: Mapping[str, Any], width: int, height: int, images: int, limits: Limits) -> None:
    if payload.get("enable_hr"):
        # The high-resolution pass renders a second, larger image: that is what costs memory and time.
        width, height = _hires_size(payload, width, height, limits)
        if width > limits.max_width or height > limits.max_height:
            raise RequestError(f"the high-resolution pass would render {width}x{height}, over the limit of "
                               f"{limits.max_width}x{limits.max_height}", field="payload.hr_scale")
        if "hr_second_pass_steps" in payload:
            _int(payload, "hr_second_pass_steps", 0, limits.max_steps)
    total = width * height * images
    if total > limits.max_total_pixels:
        raise RequestError(f"width x height x images = {total} pixels, over the budget of "
                           f"{limits.max_total_pixels}", field="payload.width")


def _hires_size(payload: Mapping[str, Any], width: int, height: int, limits: Limits) -> tuple[int, int]:
    """The size the WebUI's second pass renders. One resize side given: the other follows the aspect ratio; both
    given: the image is scaled to cover both, then cropped, so the render is the larger cover."""
    scale = _number(payload, "hr_scale", 1.0, 4.0) if "hr_scale" in payload else 2.0
    big = 4 * max(limits.max_width, limits.max_height)
    x = _int(payload, "hr_resize_x", 0, big) if "hr_resize_x" in payload else 0
    y = _int(payload, "hr_resize_y", 0, big) if "hr_resize_y" in payload else 0
    if not x and not y:
        return int(width * scale), int(height * scale)
    if x and not y:
        return x, x * height // width
    if y and not x:
        return y * width // height, y
    cover = max(x / width, y / height)
    return max(x, int(width * cover)), max(y, int(height * cover))


def _seed(payload: Mapping[str, Any], name: str) -> None:
    _int(payload, name, -1, SEED_MAX)


def _scripts(payload: Mapping[str, Any], limits: Limits) -> None:
    for name in SCRIPT_FIELDS:
        if name in payload and payload[name] not in (None, "", [], {}) and not limits.allow_scripts:
            raise RequestError(f"payload.{name} is disabled on this server (allow_scripts)", field=f"payload.{name}")


def _override_settings(payload: dict[str, Any], limits: Limits) -> None:
    overrides = payload.get("override_settings")
    if overrides is None:
        return
    if not isinstance(overrides, Mapping):
        raise RequestError("payload.override_settings must be an object", field="payload.override_settings")
    refused = sorted(set(overrides) - limits.override_settings_allowlist)
    if refused:
        allowed = ", ".join(sorted(limits.override_settings_allowlist)) or "none"
        raise RequestError(f"override_settings key(s) not allowed: {', '.join(refused)}; allowed: {allowed}",
                           field=f"payload.override_settings.{refused[0]}")
    # Otherwise an override would stay in the WebUI's settings for everyone's later tasks.
    payload["override_settings_restore_afterwards"] = True


def _img2img(payload: dict[str, Any], limits: Limits) -> None:
    # Init images are resized to the output size; anything over 4x the largest output is only a cost.
    max_pixels = 4 * limits.max_width * limits.max_height
    images = payload.get("init_images")
    if not isinstance(images, list) or not images:
        raise RequestError("payload.init_images must be a non-empty list of base64 images",
                           field="payload.init_images")
    for i, item in enumerate(images):
        _check_image(item, f"payload.init_images[{i}]", max_pixels)
    if payload.get("mask") is not None:
        _check_image(payload["mask"], "payload.mask", max_pixels)
    payload.setdefault("denoising_strength", 0.75)


def _check_image(value: Any, path: str, max_pixels: int) -> None:
    if not isinstance(value, str):
        raise RequestError(f"{path} must be a base64-encoded image", field=path)
    if value.startswith(("http://", "https://", "file:")):
        # The WebUI would fetch it: a server-side request forgery channel.
        raise RequestError(f"{path}: URLs are not accepted, send the image as base64", field=path)
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{path} is not valid base64", field=path) from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            # The header alone tells the size: refuse a decompression bomb before anything decodes it.
            if img.width * img.height > max_pixels:
                raise RequestError(f"{path} is {img.width}x{img.height}, over {max_pixels} pixels", field=path)
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise RequestError(f"{path} is not a PNG, JPEG or WebP image", field=path) from None
