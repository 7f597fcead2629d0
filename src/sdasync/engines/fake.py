"""A deterministic engine for tests and benchmarks: no model, just PNGs after a configurable delay.

URL: ``fake://?seconds=S&fail_rate=P&fail=transient|permanent``

- ``seconds`` (float, default 0): how long each generate call takes, spread evenly over ``steps`` progress steps.
- ``fail_rate`` (float in [0, 1], default 0): the chance that a call fails, drawn per call before any work.
- ``fail`` (``transient`` or ``permanent``, default ``transient``): transient raises EngineUnavailable (retryable),
  permanent raises EngineRejected.

A request's ``deadline_s`` is checked at every step (and cuts a step's wait short): past it, EngineTimeout.

Each image is a two-colour gradient whose colours and direction come from a hash of its seed and the prompt, so the
same seed and prompt give the same bytes and different seeds (almost surely) differ. A 512x512 PNG takes a few
milliseconds. The result's ``info`` has the WebUI's shape (see ``sdasync.engines.infotext``), with model name
``fake``.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from PIL import Image, ImageOps

from sdasync.engines.base import GenerationRequest, GenerationResult, Progress
from sdasync.engines.deadline import Deadline
from sdasync.engines.infotext import GenerationParams, build_info, encode_png, infotext
from sdasync.errors import ConfigError, EngineRejected, EngineUnavailable, GenerationCancelled
from sdasync.models import Api, EngineHealth
from sdasync.urls import query_params

MODEL_NAME = "fake"
FAIL_MODES = ("transient", "permanent")
PARAMS: dict[str, type[Any]] = {"seconds": float, "fail_rate": float, "fail": str}


def render(seed: int, prompt: str, width: int, height: int) -> Image.Image:
    """The fake's picture for one seed: deterministic, cheap, and visibly different between seeds."""
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    gradient = Image.linear_gradient("L")
    if digest[6] & 1:
        gradient = gradient.transpose(Image.Transpose.ROTATE_90)
    gradient = gradient.resize((width, height), Image.Resampling.BILINEAR)
    return ImageOps.colorize(gradient, (digest[0], digest[1], digest[2]), (digest[3], digest[4], digest[5]))


class FakeEngine:
    capabilities: frozenset[str] = frozenset({"txt2img", "img2img", "progress", "cancel", "deterministic"})

    def __init__(
        self,
        *,
        seconds: float = 0.0,
        fail_rate: float = 0.0,
        fail: str = "transient",
        rng: random.Random | None = None,
    ) -> None:
        if seconds < 0:
            raise ConfigError(f"fake://: seconds must be >= 0, got {seconds}")
        if not 0.0 <= fail_rate <= 1.0:
            raise ConfigError(f"fake://: fail_rate must be in [0, 1], got {fail_rate}")
        if fail not in FAIL_MODES:
            raise ConfigError(f"fake://: fail must be one of {', '.join(FAIL_MODES)}, got {fail!r}")
        self.seconds = seconds
        self.fail_rate = fail_rate
        self.fail = fail
        self._rng = rng or random.Random()
        # Random draws happen from whichever thread calls generate; Random is not documented as thread-safe.
        self._rng_lock = threading.Lock()
        self._closed = threading.Event()
        self.calls = 0

    @classmethod
    def from_url(cls, url: str, *, models_dir: Path | None = None, **_: object) -> Self:
        parts = urlsplit(url)
        if parts.scheme != "fake":
            raise ConfigError(f"not a fake:// URL: {url!r}")
        if parts.netloc or parts.path not in ("", "/"):
            raise ConfigError(f"{url!r}: the fake engine takes only query parameters, e.g. fake://?seconds=0.1")
        return cls(**query_params(url, PARAMS))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self, stop: threading.Event | None = None) -> None:
        self._closed.clear()

    def health(self) -> EngineHealth:
        ok = not self._closed.is_set()
        return EngineHealth(ok=ok, detail="ready" if ok else "closed", model=MODEL_NAME,
                            extra={"seconds": self.seconds})

    def close(self) -> None:
        # Wakes a generate that is waiting out its delay, so shutdown is not held up by a long fake job.
        self._closed.set()

    def generate(self, request: GenerationRequest) -> GenerationResult:
        deadline = Deadline(request.deadline_s, task_id=request.task_id)
        self.calls += 1
        with self._rng_lock:
            failing = self.fail_rate > 0 and self._rng.random() < self.fail_rate
            params = GenerationParams.from_payload(request.api, request.payload, rng=self._rng)
        if failing:
            if self.fail == "permanent":
                raise EngineRejected(f"fake engine: simulated permanent failure (fail_rate={self.fail_rate})")
            raise EngineUnavailable(f"fake engine: simulated transient failure (fail_rate={self.fail_rate})")
        if request.api is Api.IMG2IMG and not request.payload.get("init_images"):
            raise EngineRejected("img2img needs init_images", field="init_images")
        self._wait_steps(request, params.steps, deadline)
        images = []
        for index, seed in enumerate(params.all_seeds):
            image = render(seed, params.prompt, params.width, params.height)
            images.append(encode_png(image, infotext(params, index, MODEL_NAME), compress_level=1))
        return GenerationResult(images=images, info=build_info(params, MODEL_NAME))

    def _wait_steps(self, request: GenerationRequest, steps: int, deadline: Deadline) -> None:
        """Spend ``seconds`` in ``steps`` slices, reporting progress and honouring cancellation and the deadline at
        each one."""
        start = time.monotonic()
        for step in range(1, steps + 1):
            if request.is_cancelled is not None and request.is_cancelled():
                raise GenerationCancelled(f"task {request.task_id} cancelled at step {step - 1}/{steps}")
            deadline.check(f"at step {step - 1}/{steps}")
            # Deadlines from the start, not per-slice sleeps, so rounding errors do not add up over many steps.
            step_end = start + self.seconds * step / steps
            # A step longer than what is left of the deadline is cut short, so the timeout is as punctual as a
            # real engine's step callback would make it, not late by up to one (possibly long) step.
            remaining = deadline.cap(step_end - time.monotonic())
            if remaining > 0 and self._closed.wait(remaining):
                raise EngineUnavailable("fake engine closed during a generation")
            deadline.check(f"at step {step - 1}/{steps}")
            if request.on_progress is not None:
                eta = max(0.0, start + self.seconds - time.monotonic())
                request.on_progress(Progress(step, steps, eta))
        if request.is_cancelled is not None and request.is_cancelled():
            raise GenerationCancelled(f"task {request.task_id} cancelled after the last step")
