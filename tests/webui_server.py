"""An AUTOMATIC1111-compatible WebUI stand-in for tests: the documented API shape, on a free loopback port.

It answers ``POST /sdapi/v1/txt2img`` and ``/sdapi/v1/img2img`` with real PNGs of the requested size (a solid colour
derived from each image's seed) and an ``info`` JSON string like the WebUI's, and ``GET /sdapi/v1/sd-models`` as the
readiness probe. Like the real WebUI it answers 404 for an unknown sampler or a missing init image and 422 for a
body it cannot validate. Knobs on ``server.knobs`` make it slow, fail, hang or start late; every request is
recorded in ``server.requests``.

Generations run one at a time, as behind the WebUI's queue lock, each under its ``force_task_id``: queued while
another runs, then active for ``knobs.generation_s`` seconds, then completed. ``POST /internal/progress
{"id_task": ...}`` answers for one task as A1111 does (``active``, ``queued``, ``completed``, and while active a
``progress`` fraction growing with time and an ``eta``). ``POST /sdapi/v1/interrupt`` is global like the WebUI's: it
ends whichever job is active early, which then answers 200 with the images done so far; ``server.interrupts`` lists
the task that was active at each call (None when none was), so tests can tell whose job a client stopped.

Written independently of ``sdasync`` so that tests compare our engine against the documented format, not itself.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "LMS", "Heun", "UniPC")
MODEL_NAME = "test-webui-model"


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a timeout, a deadline) leaves a closed socket to write the late answer to: that is
        # the scenario under test, not a server error worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


@dataclass
class Knobs:
    #: Seconds to wait before answering a generation (waits on the shutdown event, so shutdown never blocks).
    delay_s: float = 0.0
    #: Answer generations with this HTTP status (500 gives the WebUI's error body, 422 a FastAPI validation error).
    fail_status: int | None = None
    #: Never answer generations (until shutdown): for read-timeout tests.
    hang: bool = False
    #: The probe answers 404 this many times before 200 (the WebUI mounts its API after its server starts).
    not_ready_probes: int = 0
    #: The probe never answers 200.
    never_ready: bool = False
    #: Return this instead of a valid body (e.g. b"not json" or an images list with bad base64).
    raw_body: bytes | None = None
    #: Return the info field as this string instead of JSON.
    raw_info: str | None = None
    #: Seconds each generation stays active (its progress fraction grows over them); an interrupt ends it early.
    generation_s: float = 0.0
    #: Answer /internal/progress with this HTTP status instead of the task's state.
    progress_status: int | None = None


@dataclass
class Recorded:
    method: str
    path: str
    body: Any


@dataclass
class WebuiTestServer:
    knobs: Knobs = field(default_factory=Knobs)
    requests: list[Recorded] = field(default_factory=list)
    #: For each /sdapi/v1/interrupt call, the task that was active then (None: no job was running).
    interrupts: list[str | None] = field(default_factory=list)
    #: Task ids whose job an interrupt ended early.
    interrupted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._changed = threading.Condition(self._lock)
        # The WebUI's queue lock: one generation at a time, the others wait as "queued".
        self._queue_lock = threading.Lock()
        self._pending: dict[str, float] = {}
        self._current: str | None = None
        self._current_started = 0.0
        self._current_interrupt = threading.Event()
        self._finished: list[str] = []
        self._httpd = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        # A short poll interval makes shutdown() (which waits for the serve loop to notice) take ms, not 0.5 s.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.02,), name="webui-test-server", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The engine URL for this server (``webui+http://127.0.0.1:PORT``)."""
        return f"webui+http://127.0.0.1:{self.port}"

    def record(self, method: str, path: str, body: Any) -> None:
        with self._changed:
            self.requests.append(Recorded(method, path, body))
            self._changed.notify_all()

    def paths(self) -> list[str]:
        with self._lock:
            return [r.path for r in self.requests]

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        """Block until ``predicate(self.requests)`` is true or ``timeout`` passes; returns the predicate's value."""
        with self._changed:
            return bool(self._changed.wait_for(lambda: predicate(self.requests), timeout))

    def take_probe(self) -> bool:
        """Whether this probe should say ready; counts down ``not_ready_probes``."""
        with self._lock:
            if self.knobs.never_ready:
                return False
            if self.knobs.not_ready_probes > 0:
                self.knobs.not_ready_probes -= 1
                return False
            return True

    def stopping_wait(self, seconds: float | None) -> None:
        self._stopping.wait(seconds)

    # --- the task queue ---------------------------------------------------------------------------------------

    def task_state(self, task_id: str) -> str | None:
        """``"queued"``, ``"active"``, ``"completed"`` or None (never seen)."""
        with self._lock:
            if task_id == self._current:
                return "active"
            if task_id in self._pending:
                return "queued"
            return "completed" if task_id in self._finished else None

    def enqueue(self, task_id: str) -> None:
        with self._changed:
            self._pending[task_id] = time.monotonic()
            self._changed.notify_all()

    def start(self, task_id: str) -> bool:
        """Wait for the queue lock (False if the server shuts down first), then make ``task_id`` the active job."""
        while not self._queue_lock.acquire(timeout=0.02):
            if self._stopping.is_set():
                return False
        with self._changed:
            self._pending.pop(task_id, None)
            self._current, self._current_started = task_id, time.monotonic()
            self._current_interrupt.clear()
            self._changed.notify_all()
        return True

    def run_active(self, seconds: float) -> float:
        """Spend up to ``seconds`` on the active job; returns the fraction done (less than 1 if interrupted)."""
        if seconds <= 0:
            return 0.0 if self._current_interrupt.is_set() else 1.0
        started = time.monotonic()
        self._current_interrupt.wait(seconds)
        if self._stopping.is_set() or self._current_interrupt.is_set():
            return min(1.0, (time.monotonic() - started) / seconds)
        return 1.0

    def finish(self, task_id: str) -> None:
        with self._changed:
            if self._current == task_id:
                self._current = None
            self._finished.append(task_id)
            self._changed.notify_all()
        self._queue_lock.release()

    def progress(self, task_id: str) -> dict[str, Any]:
        """What A1111's ``/internal/progress`` answers for this task."""
        with self._lock:
            active, queued, completed = task_id == self._current, task_id in self._pending, task_id in self._finished
            answer: dict[str, Any] = {
                "active": active, "queued": queued, "completed": completed, "progress": None, "eta": None,
                "live_preview": None, "id_live_preview": -1, "textinfo": "Waiting...",
            }
            if queued:
                order = sorted(self._pending, key=self._pending.__getitem__)
                answer["textinfo"] = f"In queue: {order.index(task_id) + 1}/{len(order)}"
            if not active:
                return answer
            elapsed = time.monotonic() - self._current_started
        duration = self.knobs.generation_s
        fraction = min(1.0, elapsed / duration) if duration > 0 else 0.0
        answer["progress"] = fraction
        # As A1111: the eta extrapolates the elapsed time from the fraction done; unknown at 0.
        answer["eta"] = elapsed / fraction - elapsed if fraction > 0 else None
        answer["textinfo"] = None
        return answer

    def interrupt(self) -> None:
        with self._changed:
            self.interrupts.append(self._current)
            if self._current is not None and not self._current_interrupt.is_set():
                self._current_interrupt.set()
                self.interrupted.append(self._current)
            self._changed.notify_all()

    def wait_state(self, predicate: Callable[[WebuiTestServer], bool], timeout: float = 5.0) -> bool:
        """Block until ``predicate(self)`` holds or ``timeout`` passes; re-checked on every request and task change
        (and every 50 ms, so a change between a check and the wait costs at most that)."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                self._changed.wait(min(remaining, 0.05))
        return True

    def close(self) -> None:
        self._stopping.set()  # releases hanging and delayed handlers first, so shutdown does not wait on them
        self._current_interrupt.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> WebuiTestServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def png_b64(seed: int, width: int, height: int) -> str:
    colour = hashlib.sha256(str(seed).encode()).digest()[:3]
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (colour[0], colour[1], colour[2])).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _validation_error(loc: str, msg: str) -> dict[str, Any]:
    return {"detail": [{"loc": ["body", loc], "msg": msg, "type": "type_error"}]}


def generate(route: str, body: dict[str, Any], done: float = 1.0) -> tuple[int, dict[str, Any]]:
    """What the WebUI would answer for this body: (status, JSON). ``done`` below 1 is an interrupted job: like the
    WebUI, it answers 200 with the batches started so far (at least one)."""
    for key in ("width", "height", "steps", "batch_size", "n_iter", "seed"):
        if key in body and not isinstance(body[key], int):
            return 422, _validation_error(key, "value is not a valid integer")
    sampler = body.get("sampler_name") or body.get("sampler_index") or "Euler"
    if sampler not in SAMPLERS:
        return 404, {"detail": "Sampler not found"}
    if route == "img2img" and not body.get("init_images"):
        return 404, {"detail": "Init image not found"}
    width, height = body.get("width", 512), body.get("height", 512)
    n_iter = body.get("n_iter", 1)
    batches = n_iter if done >= 1 else max(1, math.ceil(done * n_iter))
    count = body.get("batch_size", 1) * batches
    seed = body.get("seed", -1)
    if seed == -1:
        seed = random.randrange(4294967294)
    seeds = [seed + i for i in range(count)]
    prompt = body.get("prompt", "")
    info = {
        "prompt": prompt,
        "all_prompts": [prompt] * count,
        "seed": seed,
        "all_seeds": seeds,
        "sd_model_name": MODEL_NAME,
        "sampler_name": sampler,
        "width": width,
        "height": height,
        "infotexts": [f"{prompt}\nSteps: {body.get('steps', 20)}, Seed: {s}, Model: {MODEL_NAME}" for s in seeds],
    }
    return 200, {
        "images": [png_b64(s, width, height) for s in seeds],
        "parameters": body,
        "info": json.dumps(info),
    }


def _make_handler(server: WebuiTestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def _send(self, status: int, body: Any) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            server.record("GET", self.path, None)
            if self.path != "/sdapi/v1/sd-models":
                self._send(404, {"detail": "Not Found"})
            elif server.take_probe():
                self._send(200, [{"title": f"{MODEL_NAME}.safetensors", "model_name": MODEL_NAME}])
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            server.record("POST", self.path, body)
            if self.path == "/internal/progress":
                self._progress(body)
                return
            if self.path == "/sdapi/v1/interrupt":
                server.interrupt()
                self._send(200, {})
                return
            routes = {"/sdapi/v1/txt2img": "txt2img", "/sdapi/v1/img2img": "img2img"}
            if self.path not in routes:
                self._send(404, {"detail": "Not Found"})
                return
            task_id = body.get("force_task_id") if isinstance(body, dict) else None
            if not isinstance(task_id, str) or not task_id:
                task_id = f"task({random.randrange(10**12)})"
            # As the WebUI: the task is queued on arrival, runs under the queue lock, and is finished whatever
            # the outcome.
            server.enqueue(task_id)
            if not server.start(task_id):
                return
            try:
                self._generate(routes[self.path], body)
            finally:
                server.finish(task_id)

        def _progress(self, body: Any) -> None:
            if server.knobs.progress_status is not None:
                self._send(server.knobs.progress_status, {"detail": "forced progress failure"})
            elif not isinstance(body, dict) or not isinstance(body.get("id_task"), str):
                self._send(422, _validation_error("id_task", "field required"))
            else:
                self._send(200, server.progress(body["id_task"]))

        def _generate(self, route: str, body: Any) -> None:
            knobs = server.knobs
            if knobs.hang:
                server.stopping_wait(None)
                return
            if knobs.delay_s:
                server.stopping_wait(knobs.delay_s)
            done = server.run_active(knobs.generation_s)
            if knobs.fail_status == 500:
                self._send(500, {"error": "RuntimeError", "detail": "", "body": "", "errors": "CUDA out of memory"})
                return
            if knobs.fail_status == 422:
                self._send(422, _validation_error("steps", "value is not a valid integer"))
                return
            if knobs.fail_status is not None:
                self._send(knobs.fail_status, {"detail": f"forced {knobs.fail_status}"})
                return
            if knobs.raw_body is not None:
                self._send(200, knobs.raw_body)
                return
            if not isinstance(body, dict):
                self._send(422, _validation_error("body", "not a JSON object"))
                return
            status, answer = generate(route, body, done)
            if status == 200 and knobs.raw_info is not None:
                answer["info"] = knobs.raw_info
            self._send(status, answer)

    return Handler
