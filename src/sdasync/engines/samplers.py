"""WebUI sampler names and schedule types -> diffusers schedulers, and the payload fields the diffusers engine
refuses because it would otherwise silently draw a different image than the WebUI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdasync.errors import EngineRejected

#: WebUI sampler name -> (diffusers scheduler class, its extra config, the schedule "Automatic" means).
SAMPLERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "Euler": ("EulerDiscreteScheduler", {}, "Uniform"),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}, "Uniform"),
    "LMS": ("LMSDiscreteScheduler", {}, "Uniform"),
    "Heun": ("HeunDiscreteScheduler", {}, "Uniform"),
    "DPM2": ("KDPM2DiscreteScheduler", {}, "Uniform"),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}, "Uniform"),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "Karras"),
    "DPM++ SDE": (
        "DPMSolverSinglestepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "lower_order_final": True},
        "Karras",
    ),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "Exponential"),
    "DDIM": ("DDIMScheduler", {}, "Uniform"),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}, "Uniform"),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}, "Uniform"),
    "UniPC": ("UniPCMultistepScheduler", {}, "Uniform"),
}
#: Schedule type -> the sigma flag it turns on (all others are turned off).
SCHEDULES: dict[str, str | None] = {
    "Uniform": None,
    "Karras": "use_karras_sigmas",
    "Exponential": "use_exponential_sigmas",
}
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


#: Fields that change the image and that this engine does not implement: field -> "is it really asked for?".
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "enable_hr": bool,
    "restore_faces": bool,
    "tiling": bool,
    "subseed_strength": lambda v: v not in (None, 0),
    "seed_resize_from_w": lambda v: v not in (None, 0, -1),
    "seed_resize_from_h": lambda v: v not in (None, 0, -1),
    "styles": bool,
    "script_name": bool,
    "alwayson_scripts": bool,
    "override_settings": bool,
    "refiner_checkpoint": bool,
    "mask": bool,
    "resize_mode": lambda v: v not in (None, 0),
    "initial_noise_multiplier": lambda v: v not in (None, 1),
}


def check_unsupported(payload: dict[str, Any]) -> None:
    for key, asked in UNSUPPORTED.items():
        if key in payload and asked(payload[key]):
            raise EngineRejected(
                f"{key}={payload[key]!r} is not supported by the diffusers engine (it would change the image)",
                field=key,
            )


def scheduler_choice(sampler_name: str, schedule: str | None) -> tuple[str, dict[str, Any], str]:
    """(scheduler class name, config overrides, schedule) for a WebUI sampler and schedule type.
    Raises EngineRejected listing what is supported."""
    by_lower = {name.lower(): name for name in SAMPLERS}
    name, suffix = sampler_name.strip(), None
    for candidate in ("Karras", "Exponential"):
        if name.lower().endswith(" " + candidate.lower()):
            name, suffix = name[: -len(candidate) - 1], candidate
    if name.lower() not in by_lower:
        supported = ", ".join(SAMPLERS)
        raise EngineRejected(
            f"sampler {sampler_name!r} is not supported by the diffusers engine; supported: {supported} "
            "(optionally with a Karras or Exponential schedule)",
            field="sampler_name",
        )
    class_name, extra, automatic = SAMPLERS[by_lower[name.lower()]]
    wanted = schedule if schedule and schedule.lower() != "automatic" else suffix or automatic
    schedules = {s.lower(): s for s in SCHEDULES}
    if wanted.lower() not in schedules:
        raise EngineRejected(
            f"schedule type {wanted!r} is not supported; supported: Automatic, {', '.join(SCHEDULES)}",
            field="scheduler",
        )
    return class_name, dict(extra), schedules[wanted.lower()]
