"""An in-process Stable Diffusion 1.x/2.x pipeline from Hugging Face diffusers, fed WebUI payloads.

URL: ``diffusers://<model>?device=auto|cpu|cuda|mps&dtype=auto|float32|float16|bfloat16``

- ``diffusers://tiny``: the built-in tiny random-weight model (``sdasync.engines.tiny``; it draws noise), built
  once into ``<models_dir>/tiny``. ``models_dir`` defaults to ``<cache_dir>/sdasync/models``
  (``cache_dir``: a constructor and ``from_url`` keyword, default ``~/.cache``).
- ``diffusers:///relative/folder`` or ``diffusers:////absolute/folder``: a diffusers-format folder
  (``model_index.json``), three slashes relative to the working directory, four absolute.
- ``diffusers://org/name``: a hub id, read from the local Hugging Face cache only; nothing is ever downloaded.
- ``device``: ``auto`` (default) is cuda if available, else mps, else cpu; ``cuda:N`` picks a GPU.
- ``dtype``: ``auto`` (default) is float16 on cuda, float32 elsewhere.

Payloads use the WebUI's fields and defaults (see ``sdasync.engines.infotext``): prompt, negative_prompt, steps,
cfg_scale, width, height, seed (-1 random; image i gets seed + i), batch_size, n_iter, sampler_name and
``scheduler`` (A1111 1.9+'s schedule type: Automatic, Uniform, Karras, Exponential; a "Karras" suffix on the
sampler name works too), and for img2img init_images (the first is used, resized to width x height) and
denoising_strength. "Automatic" is the sampler's own default as in A1111 1.9+: Karras for DPM++ 2M and DPM++ SDE,
Exponential for DPM++ 2M SDE, uniform otherwise. DPM++ SDE runs as diffusers' second-order singlestep SDE
DPM-Solver++ (the closest method that needs no torchsde); LMS needs scipy and is refused where it is missing.
Latent noise comes from CPU generators, so a seed gives the same image on any device. Fields that would change the image
but are not implemented (hires fix, face restoration, tiling, variation seeds, styles, scripts, override_settings,
inpainting masks, resize modes other than "just resize") are refused with EngineRejected naming the field; sampler
tuning knobs (s_churn, s_tmin, s_tmax, s_noise; eta except for DDIM) are ignored.

Errors: out of GPU memory -> EngineUnavailable (retryable: the cache is emptied, and another attempt, possibly on
another worker, may fit; the worker's attempt limit bounds the retries); other CUDA/MPS runtime errors ->
EngineUnavailable and ``health()`` turns not ok, since the device context is usually unusable until the process
restarts; invalid inputs -> EngineRejected; anything else -> EngineError. A request's ``deadline_s`` (counted from
the call, waiting for the engine's lock included) is checked before each batch and after each step: past it,
EngineTimeout (retryable).
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import inspect
import io
import logging
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError

from sdasync.engines import tiny
from sdasync.engines.base import GenerationRequest, GenerationResult, Progress
from sdasync.engines.deadline import Deadline
from sdasync.engines.infotext import GenerationParams, build_info, encode_png, infotext
from sdasync.engines.samplers import SCHEDULES, SIGMA_FLAGS, check_unsupported, scheduler_choice
from sdasync.errors import ConfigError, EngineError, EngineRejected, EngineUnavailable, GenerationCancelled
from sdasync.models import Api, EngineHealth
from sdasync.urls import path_from_url, query_params

PARAMS: dict[str, type[Any]] = {"device": str, "dtype": str}
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "float16", "bfloat16")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
REQUIRED_MODULES = ("torch", "diffusers", "transformers")

log = logging.getLogger(__name__)


def default_models_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or Path.home() / ".cache") / "sdasync" / "models"


def decode_init_image(data: object, width: int, height: int) -> Any:
    """The first init image as an RGB PIL image of the requested size (the WebUI's "just resize")."""
    if not isinstance(data, str):
        raise EngineRejected("init_images must hold base64 strings", field="init_images")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as opened:
            image = opened.convert("RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
        raise EngineRejected(f"init_images[0] is not a base64 image: {exc}", field="init_images") from exc
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


class DiffusersEngine:
    capabilities: frozenset[str] = frozenset({"txt2img", "img2img", "progress", "cancel", "deterministic", "local"})

    def __init__(
        self, model: str | Path, *, device: str = "auto", dtype: str = "auto", models_dir: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        """``model``: "tiny", a hub id (str), or a diffusers folder (Path)."""
        if not DEVICE.match(device):
            raise ConfigError(f"diffusers://: device must be auto, cpu, mps, cuda or cuda:N, got {device!r}")
        if dtype not in DTYPES:
            raise ConfigError(f"diffusers://: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if isinstance(model, str) and model != "tiny" and not HUB_ID.match(model):
            raise ConfigError(f"diffusers://: {model!r} is not a hub id (org/name); pass a Path for a folder")
        self.model = model
        self.device = device
        self.dtype = dtype
        self.models_dir = models_dir or default_models_dir(cache_dir)
        self.model_name = tiny.MODEL_NAME if model == "tiny" else Path(model).name or str(model)
        self._lock = threading.RLock()
        self._txt2img: Any = None
        self._img2img: Any = None
        self._resolved_device: str | None = None
        self._broken: str | None = None

    @classmethod
    def from_url(cls, url: str, *, models_dir: Path | None = None, cache_dir: Path | None = None,
                 **_: object) -> Self:
        missing = [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError("diffusers:// needs torch and diffusers: pip install 'sdasync[diffusers]'")
        parts = urlsplit(url)
        if parts.scheme != "diffusers":
            raise ConfigError(f"not a diffusers:// URL: {url!r}")
        params = query_params(url, PARAMS)
        model: str | Path
        if not parts.netloc:
            model = path_from_url(url)
        elif parts.netloc == "tiny" and parts.path in ("", "/"):
            model = "tiny"
        else:
            model = parts.netloc + parts.path.rstrip("/")
            if not HUB_ID.match(model):
                raise ConfigError(
                    f"{url!r}: not a hub id (org/name); use diffusers://tiny, diffusers:///relative/folder or "
                    "diffusers:////absolute/folder"
                )
        return cls(model, models_dir=models_dir, cache_dir=cache_dir, **params)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _source(self) -> str:
        """Where from_pretrained reads: a folder, or a hub id resolved in the local cache."""
        if self.model == "tiny":
            try:
                return str(tiny.ensure(self.models_dir))
            except OSError as exc:
                raise ConfigError(f"cannot build the tiny model in {self.models_dir}: {exc}") from exc
        if isinstance(self.model, str):
            return self.model
        if (self.model / "model_index.json").is_file():
            return str(self.model)
        if self.model.is_file():
            raise ConfigError(f"{self.model} is a single-file checkpoint; convert it to a diffusers folder")
        raise ConfigError(f"{self.model} is not a diffusers model folder (no model_index.json)")

    def setup(self, stop: threading.Event | None = None) -> None:
        """Load the model. A load cannot be interrupted half-way; a stop requested before it begins skips it."""
        with self._lock:
            if self._txt2img is not None:
                return
            if stop is not None and stop.is_set():
                raise EngineUnavailable(f"stopped before loading model {self.model!r}")
            log.info("loading model %r", self.model)
            import torch

            diffusers = tiny.import_untyped("diffusers")
            StableDiffusionPipeline = diffusers.StableDiffusionPipeline
            StableDiffusionImg2ImgPipeline = diffusers.StableDiffusionImg2ImgPipeline

            device = self._pick_device(torch)
            dtype = self.dtype
            if dtype == "auto":
                dtype = "float16" if device.startswith("cuda") else "float32"
            kwargs: dict[str, Any] = {
                "torch_dtype": getattr(torch, dtype),
                "safety_checker": None,
                "requires_safety_checker": False,
            }
            if importlib.util.find_spec("accelerate") is None:
                kwargs["low_cpu_mem_usage"] = False  # saying so avoids a warning per load
            source = self._source()
            with tiny.quiet_progress():
                try:
                    with warnings.catch_warnings():
                        # Newer diffusers renamed torch_dtype to dtype; older ones know only torch_dtype.
                        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                        # local_files_only: a hub id must already be in the cache; a worker never downloads.
                        pipe = StableDiffusionPipeline.from_pretrained(source, local_files_only=True, **kwargs)
                except Exception as exc:  # missing files, bad configs, bad weights: all a wrong model setting
                    raise ConfigError(f"cannot load model {self.model!r} from {source}: {exc}") from exc
            try:
                pipe = pipe.to(device)
            except RuntimeError as exc:
                raise EngineUnavailable(f"cannot move model {self.model!r} to {device}: {exc}") from exc
            pipe.set_progress_bar_config(disable=True)
            img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
            img2img.set_progress_bar_config(disable=True)
            self._txt2img, self._img2img, self._resolved_device = pipe, img2img, device

    def _pick_device(self, torch: Any) -> str:
        cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
        if self.device == "auto":
            return "cuda" if cuda else "mps" if mps else "cpu"
        if self.device.startswith("cuda") and not cuda:
            raise ConfigError(f"diffusers://: device {self.device} asked for, but torch sees no CUDA device")
        if self.device == "mps" and not mps:
            raise ConfigError("diffusers://: device mps asked for, but torch sees no MPS device")
        return self.device

    def health(self) -> EngineHealth:
        loaded = self._txt2img is not None
        device = self._resolved_device or self.device
        if self._broken is not None:
            # The device context does not come back in this process: the worker exits to be restarted.
            return EngineHealth(ok=False, detail=self._broken, loaded=loaded, restart=True, model=self.model_name,
                                extra={"device": device})
        # Not loaded is healthy: a worker reports "loading" in its registry record until setup() returns.
        return EngineHealth(ok=True, detail="ready" if loaded else "not loaded", loaded=loaded,
                            model=self.model_name, extra={"device": device})

    def close(self) -> None:
        with self._lock:
            loaded, self._txt2img, self._img2img = self._txt2img is not None, None, None
            if loaded:
                self._empty_cache()

    def generate(self, request: GenerationRequest) -> GenerationResult:
        # Started before the lock: time spent waiting for another generation in this process counts too.
        deadline = Deadline(request.deadline_s, task_id=request.task_id)
        payload = request.payload
        params = GenerationParams.from_payload(request.api, payload)
        check_unsupported(payload)
        class_name, extra, schedule = scheduler_choice(params.sampler_name, params.scheduler)
        if params.width % 8 or params.height % 8:
            raise EngineRejected(
                f"width and height must be multiples of 8, got {params.width}x{params.height}",
                field="width" if params.width % 8 else "height",
            )
        init_image = None
        if request.api is Api.IMG2IMG:
            init_images = payload.get("init_images")
            if not isinstance(init_images, list) or not init_images:
                raise EngineRejected("img2img needs init_images", field="init_images")
            init_image = decode_init_image(init_images[0], params.width, params.height)
            if int(params.steps * (params.denoising_strength or 0)) < 1:
                raise EngineRejected("steps x denoising_strength leaves no step to run", field="denoising_strength")
        with self._lock:
            if self._txt2img is None:
                raise EngineUnavailable("diffusers engine is not set up (or was closed)")
            pipe = self._img2img if init_image is not None else self._txt2img
            pipe.scheduler = self._scheduler(class_name, extra, schedule)
            try:
                images = self._run(pipe, request, params, init_image, deadline)
            except EngineError:  # GenerationCancelled and EngineTimeout included
                raise
            except Exception as exc:
                raise self._translate(exc) from exc
        pngs = [encode_png(image, infotext(params, i, self.model_name)) for i, image in enumerate(images)]
        return GenerationResult(images=pngs, info=build_info(params, self.model_name))

    def _scheduler(self, class_name: str, extra: dict[str, Any], schedule: str) -> Any:
        cls = getattr(tiny.import_untyped("diffusers"), class_name)
        accepted = inspect.signature(cls.__init__).parameters
        flag = SCHEDULES[schedule]
        if flag is not None and flag not in accepted:
            raise EngineRejected(f"schedule type {schedule} does not work with {class_name}", field="scheduler")
        overrides = dict(extra)
        # Set every sigma flag explicitly: a model's saved config may turn one on, and two on at once is an error.
        overrides.update({name: name == flag for name in SIGMA_FLAGS if name in accepted})
        try:
            return cls.from_config(self._txt2img.scheduler.config, **overrides)
        except ImportError as exc:
            # diffusers exports a placeholder that raises here when an optional dependency (LMS: scipy) is missing.
            reason = " ".join(str(exc).split())
            raise EngineRejected(f"{class_name} is unavailable on this worker: {reason}", field="sampler_name") from exc

    def _run(
        self, pipe: Any, request: GenerationRequest, params: GenerationParams, init_image: Any, deadline: Deadline
    ) -> list[Any]:
        import torch

        images: list[Any] = []
        started = time.monotonic()
        for iteration in range(params.n_iter):
            if request.is_cancelled is not None and request.is_cancelled():
                raise GenerationCancelled(f"task {request.task_id} cancelled before batch {iteration + 1}")
            deadline.check(f"before batch {iteration + 1}")
            seeds = params.all_seeds[iteration * params.batch_size : (iteration + 1) * params.batch_size]
            # One CPU generator per image: image i's noise depends only on its own seed, on any device.
            generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
            kwargs: dict[str, Any] = {
                "prompt": params.prompt,
                "negative_prompt": params.negative_prompt or None,
                "num_inference_steps": params.steps,
                "guidance_scale": params.cfg_scale,
                "num_images_per_prompt": params.batch_size,
                "generator": generators,
                "callback_on_step_end": self._callback(request, iteration, params.n_iter, started, deadline),
                "output_type": "pil",
            }
            if params.sampler_name.upper() == "DDIM" and request.payload.get("eta") is not None:
                kwargs["eta"] = float(request.payload["eta"])
            if init_image is not None:
                kwargs.update(image=init_image, strength=params.denoising_strength)
            else:
                kwargs.update(width=params.width, height=params.height)
            images.extend(pipe(**kwargs).images)
        return images

    @staticmethod
    def _callback(request: GenerationRequest, iteration: int, n_iter: int, started: float, deadline: Deadline) -> Any:
        def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if request.is_cancelled is not None and request.is_cancelled():
                # Raising here unwinds the pipeline call at once; nothing else holds state across calls.
                raise GenerationCancelled(f"task {request.task_id} cancelled at step {index + 1}")
            # The same way out for the deadline: a step is the finest grain at which diffusers lets us stop.
            deadline.check(f"at step {index + 1} of batch {iteration + 1}")
            if request.on_progress is not None:
                # num_timesteps counts what really runs (fewer for img2img, more for second-order samplers).
                per_iter = int(pipe.num_timesteps)
                step, steps = iteration * per_iter + index + 1, per_iter * n_iter
                elapsed = time.monotonic() - started
                request.on_progress(Progress(step, steps, elapsed / step * (steps - step)))
            return tensors

        return on_step_end

    def _translate(self, exc: Exception) -> EngineError:
        message = f"{type(exc).__name__}: {exc}"
        if "out of memory" in message.lower() or "not enough memory" in message.lower():
            self._empty_cache()
            return EngineUnavailable(f"out of memory on {self._resolved_device}: {message}")
        if isinstance(exc, RuntimeError) and ("CUDA" in message or "MPS" in message):
            self._broken = message
            return EngineUnavailable(f"device error, this worker should restart: {message}")
        if isinstance(exc, ValueError | TypeError):
            return EngineRejected(f"diffusers refused the request: {message}")
        return EngineError(f"generation failed: {message}")

    def _empty_cache(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
