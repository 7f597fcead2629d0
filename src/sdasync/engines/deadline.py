"""How long a generation may take: the worker's default deadline and a small clock every engine checks.

The default deadline is a budget, not a prediction. It must be generous enough that a slow GPU (a T4 running SDXL,
a WebUI with a model still loading) never trips it on honest work, and short enough that a hung engine frees the
worker in minutes rather than hours::

    deadline_s = base_s + per_step_megapixel_s x sampler_factor x images x (steps x MP + hires_steps x hires_MP)

- ``MP`` is width x height / 1e6; ``images`` is batch_size x n_iter.
- ``sampler_factor`` is 2 for samplers that call the model twice per step (Heun, DPM2, DPM++ SDE, DPM++ 2S,
  Restart), else 1.
- ``hires_steps`` and ``hires_MP`` count the WebUI's hires fix when ``enable_hr`` is set: ``hr_second_pass_steps``
  (0 means "as many as steps") at the upscaled size (``hr_scale`` or ``hr_resize_x`` x ``hr_resize_y``).
- ``base_s`` (default 60) covers fixed costs: text encoding, VAE decoding, PNG encoding, a model swap in the WebUI.
- ``per_step_megapixel_s`` (default 4.0) is seconds per sampling step per megapixel per image. Roughly, SD 1.5 at
  512x512 takes 0.15-0.2 s per step on a T4 (under 0.8 s per step-megapixel) and SDXL at 1024x1024 up to 2 s per
  step there (about 1.9 s per step-megapixel), so 4.0 leaves at least 2x on the slowest common card, and far more
  on an A10G or better, before the base is even counted.

Examples with the defaults: SD 1.5, 20 steps, 512x512, one image: 60 + 4 x 20 x 0.26 = 81 s. SDXL, 30 steps,
1024x1024, batch of 4: 60 + 4 x 4 x 30 x 1.05 = 563 s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from sdasync.errors import EngineTimeout

DEFAULT_BASE_S = 60.0
DEFAULT_PER_STEP_MEGAPIXEL_S = 4.0
#: Samplers that evaluate the model twice per step; matched as lower-case prefixes of ``sampler_name``.
SECOND_ORDER_SAMPLERS = ("heun", "dpm2", "dpm++ sde", "dpm++ 2s", "restart")


def _positive(payload: Mapping[str, Any], key: str, default: float) -> float:
    """A positive number from the payload, else the default: the deadline must never fail on a field the engine
    itself will refuse with a better message."""
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return default
    return float(value)


def _hires_work(payload: Mapping[str, Any], steps: float, width: float, height: float) -> float:
    """Step-megapixels of the WebUI's hires-fix second pass, 0 without ``enable_hr``."""
    if payload.get("enable_hr") is not True:
        return 0.0
    hr_steps = _positive(payload, "hr_second_pass_steps", steps)
    hr_width = _positive(payload, "hr_resize_x", 0.0)
    hr_height = _positive(payload, "hr_resize_y", 0.0)
    if not (hr_width and hr_height):
        scale = _positive(payload, "hr_scale", 2.0)
        hr_width, hr_height = width * scale, height * scale
    return hr_steps * hr_width * hr_height / 1e6


def default_deadline_s(
    payload: Mapping[str, Any],
    *,
    base_s: float = DEFAULT_BASE_S,
    per_step_megapixel_s: float = DEFAULT_PER_STEP_MEGAPIXEL_S,
) -> float:
    """The worker's default deadline for one generation of this WebUI payload (see the module docstring).
    Missing or malformed fields count as the WebUI's defaults (20 steps, 512x512, one image); never raises."""
    steps = _positive(payload, "steps", 20)
    width = _positive(payload, "width", 512)
    height = _positive(payload, "height", 512)
    images = _positive(payload, "batch_size", 1) * _positive(payload, "n_iter", 1)
    sampler = payload.get("sampler_name") or payload.get("sampler_index") or ""
    factor = 2.0 if isinstance(sampler, str) and sampler.lower().startswith(SECOND_ORDER_SAMPLERS) else 1.0
    work = steps * width * height / 1e6 + _hires_work(payload, steps, width, height)
    return base_s + per_step_megapixel_s * factor * images * work


class Deadline:
    """A monotonic-clock deadline started when a generation starts; ``None`` seconds means no deadline."""

    def __init__(self, seconds: float | None, *, task_id: str = "") -> None:
        self.seconds = seconds
        self.task_id = task_id
        self.expires_at = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        """Seconds left (0 when passed), or None without a deadline."""
        return None if self.expires_at is None else max(0.0, self.expires_at - time.monotonic())

    def cap(self, seconds: float) -> float:
        """``seconds``, shortened to what is left of the deadline."""
        remaining = self.remaining()
        return seconds if remaining is None else min(seconds, remaining)

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and time.monotonic() >= self.expires_at

    def error(self, where: str = "") -> EngineTimeout:
        suffix = f" {where}" if where else ""
        return EngineTimeout(f"task {self.task_id} exceeded its deadline of {self.seconds:g} s{suffix}")

    def check(self, where: str = "") -> None:
        """Raise EngineTimeout if the deadline has passed."""
        if self.expired:
            raise self.error(where)
