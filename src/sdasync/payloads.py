"""The txt2img and img2img payloads as pydantic models: the one source of validation and of the OpenAPI schema.

Field names and meanings are the AUTOMATIC1111 WebUI API's (``/sdapi/v1/txt2img``, ``/sdapi/v1/img2img``),
including the legacy ones its client libraries still send (``sampler_index``, ``firstphase_width``, ``s_churn``,
``eta`` ...), and the Forge additions (``distilled_cfg_scale``, ``hr_cfg``). A field the WebUI does not know is
refused (``extra="forbid"``); the adapter in ``validation.py`` turns that into a "did you mean".

Bounds that depend on the server's ``config.Limits`` (sizes, steps, images, prompt length) are runtime values:
``LimitRange`` and ``PromptText`` read them from the validation context (``{"limits": Limits}``) and show the
defaults in the JSON schema. Rules across fields (pixel budget, the high-resolution pass, scripts, overrides,
model switches) raise ``RequestError`` naming the field from ``model_validator``s; pydantic lets that exception
through unchanged.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    JsonValue,
    ValidationInfo,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from sdasync.config import Limits
from sdasync.errors import RequestError
from sdasync.models import Api

SEED_MAX = 2**32 - 1
DEFAULT_LIMITS = Limits()
#: Names: samplers, schedulers, upscalers, scripts, checkpoints, override keys.
NAME_CHARS = 200
#: Most entries in a list or object field (styles, script_args, override_settings ...).
MAX_ITEMS = 64
MAX_INIT_IMAGES = 16
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]{1,32};base64,", re.ASCII)


def limits_of(info: ValidationInfo) -> Limits:
    context = info.context
    limits = context.get("limits") if isinstance(context, dict) else None
    return limits if isinstance(limits, Limits) else DEFAULT_LIMITS


Bound = int | float | str | Callable[[Limits], int]


def _resolve(bound: Bound, limits: Limits) -> int | float:
    if isinstance(bound, str):
        value: int = getattr(limits, bound)
        return value
    if callable(bound):
        return bound(limits)
    return bound


@dataclass(frozen=True)
class LimitRange:
    """A numeric field bounded by ``Limits`` values (attribute names or functions of them) read at validation
    time; the schema shows the bounds of the default limits."""

    low: Bound
    high: Bound

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.with_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema.update(minimum=_resolve(self.low, DEFAULT_LIMITS), maximum=_resolve(self.high, DEFAULT_LIMITS))
        return json_schema

    def _check(self, value: int | float, info: ValidationInfo) -> int | float:
        limits = limits_of(info)
        low, high = _resolve(self.low, limits), _resolve(self.high, limits)
        if not low <= value <= high:
            raise PydanticCustomError("out_of_range", "must be between {low} and {high}, got {value}",
                                      {"low": low, "high": high, "value": value})
        return value


@dataclass(frozen=True)
class PromptLength:
    """Prompt-like text: at most ``Limits.max_prompt_chars`` characters, read at validation time."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.with_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["maxLength"] = DEFAULT_LIMITS.max_prompt_chars
        return json_schema

    def _check(self, value: str, info: ValidationInfo) -> str:
        maximum = limits_of(info).max_prompt_chars
        if len(value) > maximum:
            raise PydanticCustomError("too_long", "is longer than {maximum} characters", {"maximum": maximum})
        return value


@dataclass(frozen=True)
class Base64Image:
    """A base64 image (optionally a ``data:image/...;base64,`` URL) whose header names a size within 4x the
    largest output; URLs are refused, since the WebUI would fetch them (a server-side request forgery channel)."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.with_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema.update(contentEncoding="base64", description="a PNG, JPEG or WebP image, base64 or a data: URL")
        return json_schema

    def _check(self, value: str, info: ValidationInfo) -> str:
        limits = limits_of(info)
        check_image(value, 4 * limits.max_width * limits.max_height)
        return value


def check_image(value: str, max_pixels: int) -> None:
    """Raises PydanticCustomError unless ``value`` is a base64 image of at most ``max_pixels`` pixels."""
    if value[:8].lower().startswith(("http://", "https://", "file:", "ftp:")):
        raise PydanticCustomError("image_url", "URLs are not accepted, send the image as base64")
    data = value
    if value[:5].lower() == "data:":
        prefix = _DATA_URL.match(value)
        if prefix is None:
            raise PydanticCustomError("image_data_url", "is not a data:image/...;base64, URL")
        data = value[prefix.end():]
    try:
        # Clients wrap base64 at 76 columns (base64.encodebytes); the WebUI's own decoder ignores whitespace too.
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise PydanticCustomError("image_base64", "is not valid base64") from None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            if width * height <= max_pixels:
                img.verify()
    except Exception:  # hostile image bytes make PIL raise almost anything; none of it is the server's fault
        raise PydanticCustomError("image_format", "is not a PNG, JPEG or WebP image") from None
    # The header alone tells the size: a decompression bomb is refused before anything decodes it.
    if width * height > max_pixels:
        raise PydanticCustomError("image_too_large", "is {width}x{height}, over {maximum} pixels",
                                  {"width": width, "height": height, "maximum": max_pixels})


PromptText = Annotated[str, PromptLength()]
Name = Annotated[str, Field(max_length=NAME_CHARS)]
Image = Annotated[str, Base64Image()]
Size = Annotated[int, Field(multiple_of=8), LimitRange(64, "max_width")]
Seed = Annotated[int, Field(ge=-1, le=SEED_MAX)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Scale = Annotated[float, Field(ge=0.0, le=30.0)]
Sigma = Annotated[float, Field(ge=0.0, le=10_000.0)]
Count = Annotated[int, LimitRange(1, "max_images")]
Pixels = Annotated[int, Field(ge=0, le=1024)]


def _hires_bound(limits: Limits) -> int:
    return 4 * max(limits.max_width, limits.max_height)


class _Payload(BaseModel):
    """Fields common to txt2img and img2img. Optional fields default to None: unset, as in the WebUI."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    prompt: PromptText = ""
    negative_prompt: PromptText = ""
    styles: list[PromptText] | None = Field(default=None, max_length=MAX_ITEMS)
    seed: Seed = -1
    subseed: Seed | None = None
    subseed_strength: Fraction | None = None
    seed_resize_from_h: Annotated[int, LimitRange(-1, "max_height")] | None = None
    seed_resize_from_w: Annotated[int, LimitRange(-1, "max_width")] | None = None
    sampler_name: Name | None = None
    sampler_index: Name | None = Field(default=None, description="legacy name of sampler_name")
    scheduler: Name | None = None
    batch_size: Count = 1
    n_iter: Count = 1
    steps: Annotated[int, LimitRange("min_steps", "max_steps")] = 20
    cfg_scale: Scale = 7.0
    distilled_cfg_scale: Scale | None = Field(default=None, description="Forge (Flux)")
    width: Size = 512
    height: Annotated[int, Field(multiple_of=8), LimitRange(64, "max_height")] = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = None
    do_not_save_grid: bool | None = None
    eta: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    denoising_strength: Fraction | None = None
    s_min_uncond: Sigma | None = None
    s_churn: Sigma | None = None
    s_tmax: Sigma | None = None
    s_tmin: Sigma | None = None
    s_noise: Sigma | None = None
    override_settings: dict[Name, JsonValue] | None = Field(default=None, max_length=MAX_ITEMS)
    override_settings_restore_afterwards: bool | None = Field(default=None, description="always true on this server")
    refiner_checkpoint: Name | None = None
    refiner_switch_at: Fraction | None = None
    disable_extra_networks: bool | None = None
    comments: dict[Name, PromptText] | None = Field(default=None, max_length=MAX_ITEMS)
    script_name: Name | None = None
    script_args: list[JsonValue] | None = Field(default=None, max_length=256)
    alwayson_scripts: dict[Name, JsonValue] | None = Field(default=None, max_length=MAX_ITEMS)
    infotext: PromptText | None = Field(default=None, description="refused: send the fields themselves")
    send_images: bool | None = Field(default=None, description="set by the server")
    save_images: bool | None = Field(default=None, description="set by the server")
    force_task_id: Name | None = Field(default=None, description="set by the server")

    @model_validator(mode="after")
    def _policy(self, info: ValidationInfo) -> _Payload:
        limits = limits_of(info)
        images = self.batch_size * self.n_iter
        if images > limits.max_images:
            raise RequestError(f"batch_size x n_iter must be at most {limits.max_images}, got {images}",
                               field="payload.batch_size")
        if self.seed + images - 1 > SEED_MAX:
            # Image i uses seed + i, as in the WebUI.
            raise RequestError(f"payload.seed + images - 1 must stay below 2^32, got {self.seed}",
                               field="payload.seed")
        width, height = self.render_size(limits)
        total = width * height * images
        if total > limits.max_total_pixels:
            raise RequestError(f"width x height x images = {total} pixels, over the budget of "
                               f"{limits.max_total_pixels}", field="payload.width")
        if not limits.allow_scripts:
            for name in ("script_name", "script_args", "alwayson_scripts"):
                if getattr(self, name):  # None, "", [] and {} ask for nothing: client libraries send them
                    raise RequestError(f"payload.{name} is disabled on this server (allow_scripts)",
                                       field=f"payload.{name}")
        refused = sorted(set(self.override_settings or ()) - limits.override_settings_allowlist)
        if refused:
            allowed = ", ".join(sorted(limits.override_settings_allowlist)) or "none"
            raise RequestError(f"override_settings key(s) not allowed: {', '.join(refused)}; allowed: {allowed}",
                               field=f"payload.override_settings.{refused[0]}")
        if self.infotext:
            # A1111 applies an infotext's settings as overrides, around the allowlist.
            raise RequestError("payload.infotext is not accepted; send the fields themselves",
                               field="payload.infotext")
        for name in self.switching_fields():
            # A switch stalls every other task on that WebUI: allowed only where switching models is.
            if getattr(self, name) and "sd_model_checkpoint" not in limits.override_settings_allowlist:
                raise RequestError(f"payload.{name} would load another checkpoint, which this server does not "
                                   "allow", field=f"payload.{name}")
        return self

    def render_size(self, limits: Limits) -> tuple[int, int]:
        """The largest image the request renders (the second pass's, for txt2img with ``enable_hr``)."""
        return self.width, self.height

    @classmethod
    def switching_fields(cls) -> tuple[str, ...]:
        """Fields that load another checkpoint."""
        return ("refiner_checkpoint",)


class Txt2ImgPayload(_Payload):
    """``/sdapi/v1/txt2img``."""

    enable_hr: bool | None = None
    firstphase_width: Annotated[int, LimitRange(0, "max_width")] | None = Field(default=None, description="legacy")
    firstphase_height: Annotated[int, LimitRange(0, "max_height")] | None = Field(default=None, description="legacy")
    hr_scale: Annotated[float, Field(ge=1.0, le=4.0)] | None = None
    hr_upscaler: Name | None = None
    hr_second_pass_steps: Annotated[int, LimitRange(0, "max_steps")] | None = None
    hr_resize_x: Annotated[int, LimitRange(0, _hires_bound)] | None = None
    hr_resize_y: Annotated[int, LimitRange(0, _hires_bound)] | None = None
    hr_checkpoint_name: Name | None = None
    hr_sampler_name: Name | None = None
    hr_scheduler: Name | None = None
    hr_prompt: PromptText | None = None
    hr_negative_prompt: PromptText | None = None
    hr_cfg: Scale | None = Field(default=None, description="Forge")
    hr_distilled_cfg: Scale | None = Field(default=None, description="Forge")
    firstpass_image: Image | None = None

    def render_size(self, limits: Limits) -> tuple[int, int]:
        if not self.enable_hr:
            return self.width, self.height
        # The high-resolution pass renders a second, larger image: that is what costs memory and time.
        width, height = self._hires_size()
        if width > limits.max_width or height > limits.max_height:
            raise RequestError(f"the high-resolution pass would render {width}x{height}, over the limit of "
                               f"{limits.max_width}x{limits.max_height}", field="payload.hr_scale")
        return width, height

    def _hires_size(self) -> tuple[int, int]:
        """The size the WebUI's second pass renders. One resize side given: the other follows the aspect ratio;
        both given: the image is scaled to cover both, then cropped, so the render is the larger cover."""
        width, height = self.width, self.height
        x, y = self.hr_resize_x or 0, self.hr_resize_y or 0
        if not x and not y:
            scale = 2.0 if self.hr_scale is None else self.hr_scale
            return int(width * scale), int(height * scale)
        if x and not y:
            return x, x * height // width
        if y and not x:
            return y * width // height, y
        cover = max(x / width, y / height)
        return max(x, int(width * cover)), max(y, int(height * cover))

    @classmethod
    def switching_fields(cls) -> tuple[str, ...]:
        return ("hr_checkpoint_name", "refiner_checkpoint")


class Img2ImgPayload(_Payload):
    """``/sdapi/v1/img2img``."""

    init_images: list[Image] = Field(min_length=1, max_length=MAX_INIT_IMAGES)
    mask: Image | None = None
    latent_mask: Image | None = None
    resize_mode: Annotated[int, Field(ge=0, le=3)] | None = None
    image_cfg_scale: Scale | None = None
    mask_blur: Pixels | None = None
    mask_blur_x: Pixels | None = None
    mask_blur_y: Pixels | None = None
    mask_round: bool | None = None
    inpainting_fill: Annotated[int, Field(ge=0, le=3)] | None = None
    inpaint_full_res: bool | Literal[0, 1] | None = None
    inpaint_full_res_padding: Pixels | None = None
    inpainting_mask_invert: Literal[0, 1] | None = None
    initial_noise_multiplier: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    include_init_images: bool | None = None


PAYLOADS: dict[Api, type[_Payload]] = {Api.TXT2IMG: Txt2ImgPayload, Api.IMG2IMG: Img2ImgPayload}


EventName = Literal["start", "progress", "completed"]


class _TaskOptions(BaseModel):
    """What a request asks of sdasync itself, beside the engine's payload (never inside it)."""

    model_config = ConfigDict(extra="forbid")

    webhook: str | None = Field(default=None, max_length=2048, description=(
        "an https URL that receives this task's events, signed the Standard Webhooks way; plain http only to hosts "
        "on the operator's allowlist"))
    webhookEventsFilter: list[EventName] | None = Field(default=None, description=(
        "which events to send (default all): start, progress, completed; Replicate's webhook_events_filter "
        "spelling is accepted too"))
    deadline: str | float | None = Field(default=None, description=(
        "when the task must be finished (ISO 8601 with a zone, or epoch seconds), else it ends cancelled with "
        "reason deadline; the Cancel-After header (a duration: 30s, 5m, 1h) does the same"))


class Txt2ImgRequest(_TaskOptions):
    model_config = ConfigDict(extra="forbid")

    api: Literal[Api.TXT2IMG]
    payload: Txt2ImgPayload = Field(default_factory=lambda: Txt2ImgPayload())


class Img2ImgRequest(_TaskOptions):
    model_config = ConfigDict(extra="forbid")

    api: Literal[Api.IMG2IMG]
    payload: Img2ImgPayload


#: ``POST /task``'s body, for the OpenAPI schema.
TaskRequest = Annotated[Txt2ImgRequest | Img2ImgRequest, Field(discriminator="api")]
