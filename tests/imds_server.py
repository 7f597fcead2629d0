"""An EC2 instance metadata (IMDSv2-only) stand-in for tests, on a free loopback port.

- ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` (1..21600) answers a session token as
  text; without the header (or out of range) 400, and with ``X-Forwarded-For`` 403, as IMDS does.
- ``GET`` anything needs a live token in ``X-aws-ec2-metadata-token``, else 401 (an instance with
  ``HttpTokens=required``).
- ``/latest/meta-data/spot/instance-action`` and ``/latest/meta-data/events/recommendations/rebalance`` answer 404
  until a test sets a notice (``set_instance_action``, ``set_rebalance``), then 200 with the JSON document.

``revoke_tokens()`` forgets every token issued (as an IMDS restart would). ``counts`` tallies requests by kind:
``"token"``, ``"unauthorized"``, and ``"GET <path>"`` for authorized reads.

Written independently of ``sdasync``, from AWS's documentation of the service.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_PATH = "/latest/api/token"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"


class ImdsTestServer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._documents: dict[str, dict[str, Any]] = {}
        self.counts: Counter[str] = Counter()
        #: The TTL header of every token request, as sent.
        self.token_ttls: list[str | None] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), name="imds-test-server",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def count(self, key: str) -> int:
        with self._lock:
            return self.counts[key]

    def set_instance_action(self, action: str = "terminate", when: str = "2026-11-25T12:00:00Z") -> None:
        with self._lock:
            self._documents[INSTANCE_ACTION_PATH] = {"action": action, "time": when}

    def interrupt(self) -> None:
        """Post a two-minute "terminate" notice (what the fault-injection harness calls)."""
        self.set_instance_action("terminate")

    def set_rebalance(self, notice_time: str = "2026-11-25T11:58:00Z") -> None:
        with self._lock:
            self._documents[REBALANCE_PATH] = {"noticeTime": notice_time}

    def revoke_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def issue_token(self, ttl_header: str | None, forwarded: bool) -> tuple[int, str]:
        with self._lock:
            self.token_ttls.append(ttl_header)
            self.counts["token"] += 1
            if forwarded:
                return 403, "Forbidden"
            try:
                ttl = int(ttl_header or "")
            except ValueError:
                return 400, "Bad Request"
            if not 1 <= ttl <= 21600:
                return 400, "Bad Request"
            token = secrets.token_urlsafe(32)
            self._tokens[token] = time.monotonic() + ttl
            return 200, token

    def read(self, path: str, token: str | None) -> tuple[int, str]:
        with self._lock:
            expires = self._tokens.get(token or "")
            if expires is None or expires < time.monotonic():
                self.counts["unauthorized"] += 1
                return 401, "Unauthorized"
            self.counts[f"GET {path}"] += 1
            document = self._documents.get(path)
        return (404, "Not Found") if document is None else (200, json.dumps(document))

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ImdsTestServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_handler(server: ImdsTestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def _send(self, status: int, text: str) -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != TOKEN_PATH:
                self._send(405, "Method Not Allowed")
                return
            forwarded = self.headers.get("X-Forwarded-For") is not None
            self._send(*server.issue_token(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"), forwarded))

        def do_GET(self) -> None:
            self._send(*server.read(self.path, self.headers.get("X-aws-ec2-metadata-token")))

    return Handler


#: The name the fault-injection suite imports.
ImdsServer = ImdsTestServer
