"""Slow and half-sent requests against a real uvicorn on 127.0.0.1 (``api.server.build_server``), with raw
sockets: header and body timeouts, the cap on incomplete requests, and a quiet log for a client that leaves."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import free_port, wait_until
from sdasync.api.app import create_app
from sdasync.api.server import SlowClientGuard, build_server, guard_of
from sdasync.config import Settings

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
MAX_INCOMPLETE = 3
#: Scheduling slack on a loaded machine: a timer firing late is fine, a connection held forever is not.
SLACK = 4.0


@dataclass
class Live:
    port: int
    guard: SlowClientGuard

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=HEADER_TIMEOUT + SLACK + 5)
        return sock

    def get(self, path: str = "/healthz") -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        finally:
            conn.close()


@pytest.fixture
def live(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Live]:
    settings = Settings(data_dir=tmp_path, host="127.0.0.1", port=free_port(), header_timeout=HEADER_TIMEOUT,
                        body_timeout=BODY_TIMEOUT, max_incomplete_requests=MAX_INCOMPLETE)
    app = create_app(settings, health_checks={"engine": lambda: {"ok": True}})

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        # A handler slower than both timeouts: they bound reading the request, never answering it.
        await asyncio.sleep(HEADER_TIMEOUT + BODY_TIMEOUT + 0.5)
        return {"ok": True}

    server = build_server(app, settings)
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(caplog.handler)  # uvicorn's loggers do not propagate to the root
    caplog.set_level(logging.INFO)
    thread = threading.Thread(target=server.run, name="uvicorn-under-test", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=20, message="uvicorn did not start")
        yield Live(port=settings.port, guard=guard_of(server))
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        uvicorn_logger.removeHandler(caplog.handler)
    assert not thread.is_alive()


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``sock`` (reading what it sent, if anything); fails past ``seconds``."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for more than {seconds} s") from None
    return time.monotonic() - start


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length (head and body may come in separate segments)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_half_sent_head_is_dropped_within_the_header_timeout(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    with live.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        elapsed = closed_within(sock, HEADER_TIMEOUT + SLACK)
    assert elapsed >= HEADER_TIMEOUT * 0.8
    wait_until(lambda: not live.guard.incomplete, timeout=5)
    assert live.get() == 200
    assert errors_logged(caplog) == []


def test_a_silent_connection_is_dropped_too(live: Live) -> None:
    with live.connect() as sock:
        assert closed_within(sock, HEADER_TIMEOUT + SLACK) >= HEADER_TIMEOUT * 0.8


def test_incomplete_requests_are_capped_and_others_still_served(live: Live) -> None:
    stalled = []
    try:
        for n in range(1, MAX_INCOMPLETE):
            stalled.append(live.connect())
            stalled[-1].sendall(b"POST /task HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            wait_until(lambda n=n: len(live.guard.incomplete) == n, timeout=5)
        assert live.get() == 200  # under the cap: a complete request is served meanwhile
        stalled.append(live.connect())
        stalled[-1].sendall(b"GET / HTTP/1.1\r\n")
        wait_until(lambda: len(live.guard.incomplete) == MAX_INCOMPLETE, timeout=5)
        with live.connect() as extra:
            closed_within(extra, SLACK)  # closed at once, long before any timeout
        assert live.guard.refused == 1
        assert len(live.guard.incomplete) == MAX_INCOMPLETE
        for sock in stalled:  # the stalled ones then run out of time as well
            closed_within(sock, HEADER_TIMEOUT + SLACK)
        wait_until(lambda: not live.guard.incomplete, timeout=5)
        assert live.get() == 200
    finally:
        for sock in stalled:
            sock.close()


def test_a_trickled_body_gets_a_408(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    with live.connect() as sock:
        sock.sendall(b"POST /task HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"api\": ")
        sock.settimeout(BODY_TIMEOUT + SLACK)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert errors_logged(caplog) == []
    wait_until(lambda: not live.guard.incomplete, timeout=5)


def test_slow_answers_are_not_cut(live: Live) -> None:
    assert live.get("/slow") == 200
    with live.connect() as sock:  # kept alive: a second request on the same connection is timed afresh
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")


def test_a_client_leaving_mid_body_is_a_quiet_log_line(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    with live.connect() as sock:
        sock.sendall(b"POST /task HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"api\": ")
        wait_until(lambda: bool(live.guard.incomplete), timeout=5)
    wait_until(lambda: any("disconnected" in r.getMessage() for r in caplog.records), timeout=10,
               message="no log line for the client that left")
    assert errors_logged(caplog) == []
    assert not any(r.exc_info for r in caplog.records)
