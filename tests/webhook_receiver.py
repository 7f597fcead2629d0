"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 that records every request.

It checks signatures with its own implementation of the Standard Webhooks scheme, written from the scheme and
sharing no code with ``sdasync.webhooks``: the key is the base64 after ``whsec_``, the signed content
``{webhook-id}.{webhook-timestamp}.{raw body}``, the signature header a space-separated list of ``v1,<base64
HMAC-SHA256>``, and a timestamp more than five minutes from now is refused.

Tell it what to answer next: ``fail(n)`` (500 n times), ``redirect(location)``, ``hang()`` (hold the request
until ``release()`` or ``close()``, then answer 200); after the script, 200.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from helpers import wait_until

TOLERANCE_S = 5 * 60


def standard_webhooks_valid(secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None
                            ) -> bool:
    """The independent verifier."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not msg_id or not stamp or not signatures:
        return False
    try:
        sent_at = int(stamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent_at) > TOLERANCE_S:
        return False
    key = base64.b64decode(secret[len("whsec_"):] if secret.startswith("whsec_") else secret)
    mac = hmac.new(key, msg_id.encode() + b"." + stamp.encode() + b"." + body, hashlib.sha256).digest()
    wanted = base64.b64encode(mac)
    for item in signatures.split(" "):
        version, sep, value = item.partition(",")
        if sep and version == "v1" and hmac.compare_digest(value.encode(), wanted):
            return True
    return False


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    #: Header names lower-cased.
    headers: dict[str, str]
    body: bytes
    at: float
    #: Checked against the receiver's secret; None when it was given none.
    valid: bool | None
    #: What it answered (0 for a request it held: answered 200 once released, if the client still waits).
    answered: int


@dataclass(frozen=True)
class _Reply:
    kind: str  # "status", "redirect" or "hang"
    status: int = 200
    location: str = ""


class WebhookReceiver:
    def __init__(self, *, secret: str | None = None, host: str = "127.0.0.1", path: str = "/hook",
                 tls: ssl.SSLContext | None = None) -> None:
        self.secret = secret
        self._path = path
        self._lock = threading.Lock()
        self._script: list[_Reply] = []
        self._received: list[Received] = []
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver._handle(self)

            do_GET = do_POST

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._scheme = "http"
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self._scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    # -- what to answer
    def fail(self, times: int, status: int = 500) -> None:
        with self._lock:
            self._script.extend(_Reply("status", status) for _ in range(times))

    def redirect(self, location: str, *, status: int = 302, times: int = 1) -> None:
        with self._lock:
            self._script.extend(_Reply("redirect", status, location) for _ in range(times))

    def hang(self, times: int = 1) -> None:
        with self._lock:
            self._script.extend(_Reply("hang") for _ in range(times))

    def release(self) -> None:
        self._release.set()

    # -- what came
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self._scheme}://{host!s}:{port}{self._path}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        wait_until(lambda: len(self.received) >= count, timeout=timeout,
                   message=f"the receiver did not get {count} requests")
        return self.received

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in handler.headers.items()}
        valid = None if self.secret is None else standard_webhooks_valid(self.secret, headers, body)
        with self._lock:
            reply = self._script.pop(0) if self._script else _Reply("status", 200)
        answered = 0 if reply.kind == "hang" else reply.status
        with self._lock:  # recorded before answering, so a test sees the request while it is held
            self._received.append(Received(handler.command, handler.path, headers, body, time.time(), valid,
                                           answered))
        if reply.kind == "hang":
            self._release.wait(60)
        try:
            handler.send_response(reply.status)
            if reply.kind == "redirect":
                handler.send_header("Location", reply.location)
            handler.send_header("Content-Type", "text/plain")
            handler.send_header("Content-Length", "2")
            handler.end_headers()
            handler.wfile.write(b"ok")
        except OSError:  # the client gave up (a timeout, a killed dispatcher)
            pass

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
