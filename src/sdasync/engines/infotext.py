"""WebUI-shaped generation parameters, info dict and infotext, shared by the in-process engines.

The AUTOMATIC1111 WebUI answers every generation with an ``info`` object (seed, all_seeds, infotexts,
sd_model_name, ...) and writes a one-paragraph "infotext" per image, which tools parse back into settings::

    a cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 123, Size: 512x512, Model: sdasync-tiny

``FakeEngine`` and ``DiffusersEngine`` produce both in the same shape, so a client cannot tell them from a WebUI by
the result's fields. Defaults are the WebUI API's: steps 20, cfg_scale 7, 512x512, sampler "Euler" (the API's
``sampler_index`` default; the UI's default differs), batch_size 1, n_iter 1, denoising_strength 0.75 for img2img.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, PngImagePlugin

from sdasync.errors import EngineRejected
from sdasync.models import Api

DEFAULT_STEPS = 20
DEFAULT_CFG_SCALE = 7.0
DEFAULT_SIZE = 512
DEFAULT_SAMPLER = "Euler"
DEFAULT_DENOISING_STRENGTH = 0.75
#: The WebUI draws random seeds below 2**32 - 2; so do we, so a seed always fits the WebUI's own fields.
MAX_SEED = 4294967294
#: A request for more pixels than this is refused before anything allocates memory for it.
MAX_SIDE = 4096


def random_seed(rng: random.Random | None = None) -> int:
    return (rng or random).randrange(MAX_SEED)


def _number(payload: Mapping[str, Any], key: str, default: float, kind: type[int] | type[float]) -> Any:
    value = payload.get(key)
    if value is None:
        return kind(default)
    # bool is an int in Python; a JSON true for "steps" is a client bug, not 1 step.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise EngineRejected(f"{key} must be a number, got {value!r}", field=key)
    try:
        number = float(value)
    except ValueError as exc:
        raise EngineRejected(f"{key} must be a number, got {value!r}", field=key) from exc
    if kind is int:
        if not number.is_integer():
            raise EngineRejected(f"{key} must be a whole number, got {value!r}", field=key)
        return int(number)
    return number


def _text(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EngineRejected(f"{key} must be a string, got {type(value).__name__}", field=key)
    return value


@dataclass(frozen=True)
class GenerationParams:
    """The fields of a WebUI payload that decide the images, with defaults applied and seeds made concrete."""

    api: Api
    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    seed: int
    subseed: int
    sampler_name: str
    #: The A1111 1.9+ "Schedule type" (Karras, Exponential, ...); None means the sampler's own default.
    scheduler: str | None
    batch_size: int
    n_iter: int
    #: img2img only; None for txt2img.
    denoising_strength: float | None

    @classmethod
    def from_payload(
        cls, api: Api, payload: Mapping[str, Any], *, rng: random.Random | None = None
    ) -> GenerationParams:
        """Read and check the payload. Raises EngineRejected naming the bad field."""
        steps = _number(payload, "steps", DEFAULT_STEPS, int)
        width = _number(payload, "width", DEFAULT_SIZE, int)
        height = _number(payload, "height", DEFAULT_SIZE, int)
        batch_size = _number(payload, "batch_size", 1, int)
        n_iter = _number(payload, "n_iter", 1, int)
        for key, value, low, high in (
            ("steps", steps, 1, 1000),
            ("width", width, 8, MAX_SIDE),
            ("height", height, 8, MAX_SIDE),
            ("batch_size", batch_size, 1, 100),
            ("n_iter", n_iter, 1, 100),
        ):
            if not low <= value <= high:
                raise EngineRejected(f"{key} must be between {low} and {high}, got {value}", field=key)
        seed = _number(payload, "seed", -1, int)
        subseed = _number(payload, "subseed", -1, int)
        denoising: float | None = None
        if api is Api.IMG2IMG:
            denoising = _number(payload, "denoising_strength", DEFAULT_DENOISING_STRENGTH, float)
            if not 0.0 <= denoising <= 1.0:
                raise EngineRejected(
                    f"denoising_strength must be in [0, 1], got {denoising}", field="denoising_strength"
                )
        # The WebUI reads sampler_name first and falls back to the legacy sampler_index (a name, despite its name).
        sampler = payload.get("sampler_name") or payload.get("sampler_index") or DEFAULT_SAMPLER
        scheduler = payload.get("scheduler") or None
        if not isinstance(sampler, str):
            raise EngineRejected(f"sampler_name must be a string, got {sampler!r}", field="sampler_name")
        if scheduler is not None and not isinstance(scheduler, str):
            raise EngineRejected(f"scheduler must be a string, got {scheduler!r}", field="scheduler")
        return cls(
            api=api,
            prompt=_text(payload, "prompt"),
            negative_prompt=_text(payload, "negative_prompt"),
            steps=steps,
            cfg_scale=_number(payload, "cfg_scale", DEFAULT_CFG_SCALE, float),
            width=width,
            height=height,
            seed=seed if seed >= 0 else random_seed(rng),
            subseed=subseed if subseed >= 0 else random_seed(rng),
            sampler_name=sampler,
            scheduler=scheduler,
            batch_size=batch_size,
            n_iter=n_iter,
            denoising_strength=denoising,
        )

    @property
    def count(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def all_seeds(self) -> list[int]:
        # The WebUI's rule: image i of the whole job (all batches) gets seed + i.
        return [self.seed + i for i in range(self.count)]

    @property
    def all_subseeds(self) -> list[int]:
        return [self.subseed + i for i in range(self.count)]


def _fmt(value: float) -> str:
    """7.0 -> "7", 7.5 -> "7.5": how the WebUI's infotexts read for whole-number settings."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _quote(value: str) -> str:
    # Infotext values are comma-separated; the WebUI JSON-quotes any value that would break that.
    if "," in value or ":" in value or "\n" in value:
        return json.dumps(value, ensure_ascii=False)
    return value


def infotext(params: GenerationParams, index: int, model_name: str) -> str:
    """The WebUI's per-image parameters text for image ``index`` of the job."""
    fields: list[tuple[str, str]] = [
        ("Steps", str(params.steps)),
        ("Sampler", params.sampler_name),
    ]
    if params.scheduler and params.scheduler.lower() != "automatic":
        fields.append(("Schedule type", params.scheduler))
    fields += [
        ("CFG scale", _fmt(params.cfg_scale)),
        ("Seed", str(params.all_seeds[index])),
        ("Size", f"{params.width}x{params.height}"),
        ("Model", model_name),
    ]
    if params.batch_size > 1:
        fields += [("Batch size", str(params.batch_size)), ("Batch pos", str(index % params.batch_size))]
    if params.denoising_strength is not None:
        fields.append(("Denoising strength", _fmt(params.denoising_strength)))
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def build_info(params: GenerationParams, model_name: str, **extra: Any) -> dict[str, Any]:
    """The WebUI's ``info`` object (what its API returns JSON-encoded in the ``info`` string), as a dict."""
    count = params.count
    info: dict[str, Any] = {
        "prompt": params.prompt,
        "all_prompts": [params.prompt] * count,
        "negative_prompt": params.negative_prompt,
        "all_negative_prompts": [params.negative_prompt] * count,
        "seed": params.seed,
        "all_seeds": params.all_seeds,
        "subseed": params.subseed,
        "all_subseeds": params.all_subseeds,
        "subseed_strength": 0,
        "width": params.width,
        "height": params.height,
        "sampler_name": params.sampler_name,
        "scheduler": params.scheduler,
        "cfg_scale": params.cfg_scale,
        "steps": params.steps,
        "batch_size": params.batch_size,
        "n_iter": params.n_iter,
        "restore_faces": False,
        "sd_model_name": model_name,
        "sd_model_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": params.denoising_strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [infotext(params, i, model_name) for i in range(count)],
        "styles": [],
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
    }
    info.update(extra)
    return info


def encode_png(image: Image.Image, text: str | None = None, *, compress_level: int = 6) -> bytes:
    """PNG bytes with the infotext in a ``parameters`` text chunk, where the WebUI puts it (PNG Info reads it)."""
    meta: PngImagePlugin.PngInfo | None = None
    if text is not None:
        meta = PngImagePlugin.PngInfo()
        meta.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta, compress_level=compress_level)
    return buffer.getvalue()
