"""An AUTOMATIC1111-compatible WebUI (also Forge and SD.Next) over its HTTP API, started with ``--api``.

URL: ``webui+http://host:port[/base]?connect_timeout=5&read_timeout=600&ready_timeout=300`` (``webui+https`` for
TLS). ``/base`` is the WebUI's ``--subpath``, if any. All timeouts are in seconds:

- ``connect_timeout`` (default 5): to open a connection.
- ``read_timeout`` (default 600): the longest wait for data. The WebUI sends nothing until its images are done, so
  this bounds one generation (queueing behind others included): a hung WebUI costs at most this long.
- ``ready_timeout`` (default 300): how long ``setup()`` waits for the WebUI to come up (model loading included).

Only ``POST /sdapi/v1/txt2img`` and ``POST /sdapi/v1/img2img`` are ever called to generate, with ``send_images``
forced on, ``save_images`` off and ``force_task_id`` set to the task id. Readiness and ``health()`` use
``GET /sdapi/v1/sd-models``: documented, read-only and cheap (it lists checkpoints already known in memory), and
present in A1111 (with or without ``--nowebui``), Forge and SD.Next; ``/internal/ping`` exists only when the Gradio
UI is mounted. The WebUI mounts its API routes after its HTTP server starts, so a 404 there means "not yet".

While a generation runs, ``sdasync.engines.webui_progress`` polls ``POST /internal/progress`` for this task every
``progress_interval`` seconds (a constructor argument, default 0.5) to feed ``on_progress`` (from that thread), and
carries out ``is_cancelled``: ``POST /sdapi/v1/interrupt`` (global) only when the per-task answer says our job is the
active one; a queued job is interrupted as soon as it starts. An interrupted job's partial images are never
returned: GenerationCancelled. A request's ``deadline_s`` caps the read timeout; when it passes, our job is
interrupted the same way and EngineTimeout is raised.

Errors: no connection (refused, DNS, connect timeout, dropped mid-answer), HTTP 5xx, 408 and 429 ->
EngineUnavailable; a read timeout or the deadline -> EngineTimeout; other HTTP 4xx (422 validation, 404 unknown
sampler or missing init image) -> EngineRejected with the WebUI's detail; a 200 whose body is not the documented
shape -> EngineError; a cancel -> GenerationCancelled.

Credentials do not belong in URLs: for ``--api-auth``, pass a ready ``httpx.Client`` (``client=``) with ``auth`` set.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from sdasync.engines.base import GenerationRequest, GenerationResult
from sdasync.engines.deadline import Deadline
from sdasync.engines.webui_progress import TaskMonitor
from sdasync.errors import (
    ConfigError,
    EngineError,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    GenerationCancelled,
)
from sdasync.models import EngineHealth
from sdasync.urls import query_params

log = logging.getLogger(__name__)

PROBE_PATH = "/sdapi/v1/sd-models"
PARAMS: dict[str, type[Any]] = {"connect_timeout": float, "read_timeout": float, "ready_timeout": float}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Probe spacing while waiting for readiness: starts short (a WebUI restarting fast is seen quickly), grows to 2 s.
PROBE_INTERVAL_S = (0.05, 2.0)
HEALTH_TIMEOUT_S = 2.0
#: How often a readiness wait says in the log that it is still waiting.
WAIT_LOG_EVERY_S = 15.0


def _wait_any(events: tuple[threading.Event | None, ...], timeout: float) -> bool:
    """Wait up to ``timeout`` for any of ``events``; True as soon as one is set. Short slices: Event has no
    multi-wait, and a stop request should end the wait within a fraction of a second."""
    deadline = time.monotonic() + timeout
    present = [event for event in events if event is not None]
    while True:
        if any(event.is_set() for event in present):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        present[0].wait(min(left, 0.1))


def decode_image(data: object) -> bytes:
    """A base64 image from the WebUI as PNG bytes. Tolerates a data-URL prefix; re-encodes JPEG/WebP to PNG
    (the WebUI encodes with its ``samples_format`` setting). Raises EngineError."""
    if not isinstance(data, str):
        raise EngineError(f"WebUI returned an image that is not a base64 string: {type(data).__name__}")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EngineError(f"WebUI returned an image that is not valid base64: {exc}") from exc
    if raw.startswith(PNG_MAGIC):
        return raw
    try:
        with Image.open(io.BytesIO(raw)) as image:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()
    except (UnidentifiedImageError, OSError) as exc:
        raise EngineError(f"WebUI returned an image that cannot be decoded: {exc}") from exc


def parse_info(info: object) -> dict[str, Any]:
    """The WebUI's ``info`` (a JSON string) as a dict; unparseable text is kept as ``{"raw": text}``."""
    if isinstance(info, dict):
        return info
    if not isinstance(info, str):
        return {} if info is None else {"raw": info}
    try:
        parsed = json.loads(info)
    except ValueError:
        return {"raw": info}
    return parsed if isinstance(parsed, dict) else {"raw": info}


def error_detail(response: httpx.Response) -> str:
    """A short human message from a WebUI error body: FastAPI's ``detail`` (a string or a list of validation
    errors) or the WebUI's ``{"error", "errors"}``, else the start of the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("errors") or body.get("error")
        if isinstance(detail, list):
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                    parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg", item)))
                else:
                    parts.append(str(item))
            return "; ".join(parts)
        if detail:
            return str(detail)[:500]
    return json.dumps(body)[:500]


class WebuiEngine:
    capabilities: frozenset[str] = frozenset({"txt2img", "img2img", "remote"})

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
        ready_timeout: float = 300.0,
        progress_interval: float = 0.5,
        client: httpx.Client | None = None,
    ) -> None:
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("read_timeout", read_timeout),
            ("ready_timeout", ready_timeout),
            ("progress_interval", progress_interval),
        ):
            if value <= 0:
                raise ConfigError(f"webui: {name} must be > 0, got {value}")
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ready_timeout = ready_timeout
        self.progress_interval = progress_interval
        self._client = client
        self._owns_client = client is None
        self._closed = threading.Event()

    @classmethod
    def from_url(
        cls, url: str, *, models_dir: Path | None = None, client: httpx.Client | None = None, **_: object
    ) -> Self:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("webui+http", "webui+https"):
            raise ConfigError(f"not a webui+http:// or webui+https:// URL: {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(f"{scheme}://: no credentials in URLs; pass a client with auth instead")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{url!r}: bad port: {exc}") from exc
        if not parts.hostname:
            raise ConfigError(f"{url!r} names no host; e.g. {scheme}://127.0.0.1:7860")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        netloc = host if port is None else f"{host}:{port}"
        base = f"{scheme.removeprefix('webui+')}://{netloc}{parts.path.rstrip('/')}"
        return cls(base, client=client, **query_params(url, PARAMS))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            timeout = httpx.Timeout(self.read_timeout, connect=self.connect_timeout)
            # No environment proxies: the WebUI is almost always on loopback or a private network.
            self._client = httpx.Client(timeout=timeout, trust_env=False)
        return self._client

    def _probe(self, timeout: float) -> httpx.Response:
        return self.client.get(f"{self.base_url}{PROBE_PATH}", timeout=httpx.Timeout(timeout))

    def setup(self, stop: threading.Event | None = None) -> None:
        """Wait until the WebUI answers the probe route, for at most ``ready_timeout`` seconds; ``stop`` (or
        ``close()``) ends the wait at once. The log says what it waits for, at the start and every
        ``WAIT_LOG_EVERY_S``: a worker stuck here otherwise looks idle while tasks queue up."""
        start = time.monotonic()
        deadline = start + self.ready_timeout
        interval, max_interval = PROBE_INTERVAL_S
        last = "no answer yet"
        next_log = start + WAIT_LOG_EVERY_S
        log.info("waiting for the WebUI at %s to answer %s (up to %g s)", self.base_url, PROBE_PATH,
                 self.ready_timeout)
        while True:
            remaining = deadline - time.monotonic()
            try:
                response = self._probe(max(0.01, min(self.connect_timeout, remaining)))
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    log.info("the WebUI at %s is ready after %.1f s", self.base_url, time.monotonic() - start)
                    return
                if response.status_code in (401, 403):
                    raise ConfigError(
                        f"WebUI at {self.base_url} refused the probe (HTTP {response.status_code}): "
                        "it needs credentials; pass a client with auth"
                    )
                last = f"HTTP {response.status_code} from {PROBE_PATH}"
                if response.status_code == 404:
                    last += " (is the WebUI started with --api?)"
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise EngineUnavailable(f"WebUI at {self.base_url} not ready after {self.ready_timeout:g} s: {last}")
            if now >= next_log:
                log.warning("still waiting for the WebUI at %s: %.0f s so far, %.0f s left; last: %s",
                            self.base_url, now - start, remaining, last)
                next_log = now + WAIT_LOG_EVERY_S
            # Waiting on the events both paces the probes and lets a stop request or close() end the wait.
            if _wait_any((self._closed, stop), min(interval, remaining)):
                raise EngineUnavailable(f"stopped while waiting for the WebUI at {self.base_url} ({last})")
            interval = min(interval * 2, max_interval)

    def health(self) -> EngineHealth:
        try:
            response = self._probe(min(HEALTH_TIMEOUT_S, self.connect_timeout))
        except Exception as exc:  # health must never raise, whatever the transport does
            return EngineHealth(ok=False, detail=f"{type(exc).__name__}: {exc}", extra={"url": self.base_url})
        ok = response.status_code == 200
        return EngineHealth(ok=ok, detail="ready" if ok else f"HTTP {response.status_code}",
                            extra={"url": self.base_url})

    def close(self) -> None:
        self._closed.set()
        if self._client is not None and self._owns_client:
            self._client.close()
            self._client = None

    def generate(self, request: GenerationRequest) -> GenerationResult:
        deadline = Deadline(request.deadline_s, task_id=request.task_id)
        if request.is_cancelled is not None and request.is_cancelled():
            raise GenerationCancelled(f"task {request.task_id} cancelled before it was sent to the WebUI")
        payload = dict(request.payload)
        # force_task_id is what makes /internal/progress answer for this task, so progress and cancel are per task.
        payload.update(send_images=True, save_images=False, force_task_id=request.task_id)
        url = f"{self.base_url}{request.api.value}"
        # The WebUI sends nothing until its images are done, so the read timeout bounds the whole wait: the
        # deadline caps it. A deadline already spent (a long wait before this call) fails before sending anything.
        read_timeout = deadline.cap(self.read_timeout)
        if read_timeout <= 0:
            raise deadline.error("before the request was sent")
        timeout = httpx.Timeout(read_timeout, connect=min(self.connect_timeout, read_timeout))
        monitor = TaskMonitor(self.client, self.base_url, request, interval_s=self.progress_interval)
        monitor.start()
        try:
            response = self.client.post(url, json=payload, timeout=timeout)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                monitor.finish()  # nothing reached the WebUI: nothing to interrupt
                raise EngineUnavailable(f"WebUI at {self.base_url} unreachable: connect timed out") from exc
            # The WebUI goes on with a job whose client left: stop it (now if running, else once it starts) so a
            # hung or abandoned job does not hold the GPU, and a retry does not queue behind it.
            monitor.give_up(self.read_timeout)
            if monitor.cancel_requested:
                raise GenerationCancelled(f"task {request.task_id} cancelled while waiting for the WebUI") from exc
            if read_timeout < self.read_timeout:  # the deadline, not the engine's own timeout, set this wait
                raise deadline.error("waiting for the WebUI") from exc
            raise EngineTimeout(
                f"WebUI at {self.base_url} gave no answer in time ({type(exc).__name__}, read_timeout="
                f"{self.read_timeout:g} s)"
            ) from exc
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.ConnectError):
                monitor.finish()
            else:  # dropped mid-answer (a proxy, a reset): the job may still run there, as after a timeout
                monitor.give_up(self.read_timeout)
            if monitor.cancel_requested:
                raise GenerationCancelled(f"task {request.task_id} cancelled; the WebUI connection failed") from exc
            raise EngineUnavailable(f"WebUI at {self.base_url} unreachable: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            monitor.finish()
            raise
        monitor.finish()
        # An interrupted job comes back as a 200 with partial images: they must not pass for the result. A cancel
        # seen only now (the job finished meanwhile) wins too, as in the in-process engines.
        if monitor.cancel_requested or (request.is_cancelled is not None and request.is_cancelled()):
            raise GenerationCancelled(f"task {request.task_id} cancelled (interrupted in the WebUI)")
        result = self._result(response)
        monitor.report_done()
        return result

    def _result(self, response: httpx.Response) -> GenerationResult:
        status = response.status_code
        # 408/429 come from proxies in front of a busy WebUI: the request itself is fine, so retry it later.
        if status >= 500 or status in (408, 429):
            raise EngineUnavailable(f"WebUI error (HTTP {status}): {error_detail(response)}", status=status)
        if status >= 400:
            raise EngineRejected(f"WebUI refused the request (HTTP {status}): {error_detail(response)}", status=status)
        if status != 200:
            raise EngineError(f"WebUI answered HTTP {status}, expected 200")
        try:
            body = response.json()
        except ValueError as exc:
            raise EngineError(f"WebUI answered with a body that is not JSON: {response.text[:200]!r}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("images"), list):
            raise EngineError(f"WebUI answer has no 'images' list: {str(body)[:200]}")
        images = [decode_image(item) for item in body["images"]]
        return GenerationResult(images=images, info=parse_info(body.get("info")))
