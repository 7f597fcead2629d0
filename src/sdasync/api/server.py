"""``build_server``: uvicorn for the API, guarded against clients that send their request slowly or never.

A connection is *incomplete* from its first byte (or from its accept, for a new connection) until its request
is fully read. While it is:

- the request head (request line and headers) must be complete within ``settings.header_timeout`` seconds, or
  the connection is closed (no answer: HTTP has none for half a request line);
- the whole body must arrive within ``settings.body_timeout`` seconds of the head: one deadline for the body, not
  one per chunk, so a client trickling a byte a second cannot hold the connection either. Past it the client gets
  ``408 {"error": {"code": "request_timeout"}}`` (if nothing was answered yet) and the connection is closed;
- at most ``settings.max_incomplete_requests`` connections may be incomplete at once: beyond it a new connection
  is closed as soon as it is accepted, so half-sent requests cannot take every socket and task the server has.

Both timers stop once the request is read: a slow handler or a long-lived response (an event stream) is not
affected by them. An idle kept-alive connection is not incomplete; uvicorn's keep-alive timeout closes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, ClassVar, Literal

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from sdasync.api.schemas import error_json
from sdasync.config import Settings

log = logging.getLogger(__name__)

Phase = Literal["idle", "head", "body", "done"]


class SlowClientGuard:
    """The limits and the set of incomplete connections of one server (one event loop: no locking)."""

    def __init__(self, *, header_timeout: float, body_timeout: float, max_incomplete: int) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_incomplete = max_incomplete
        self.incomplete: set[GuardedH11Protocol] = set()
        self.refused = 0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the guard's timers and cap. Subclassed per server to bind its ``guard``."""

    guard: ClassVar[SlowClientGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: Phase = "idle"
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.guard.incomplete) >= self.guard.max_incomplete:
            self._refused = True
            self.transport = transport
            self.guard.refused += 1
            log.info("refusing a connection: %d connections are still sending their request",
                     len(self.guard.incomplete))
            transport.close()
            return
        super().connection_made(transport)
        self._begin("head")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._finish()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":  # the first bytes of the next request on a kept-alive connection
            self._begin("head")
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """Move the phase along with what h11 has parsed of the client's side."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._phase == "done":  # answered; uvicorn started the next cycle and its keep-alive timer
                self._phase = "idle"
        elif state is h11.SEND_BODY:
            if self._phase in ("idle", "head"):
                self._begin("body")
        elif self._phase != "done":
            self._finish()

    def _begin(self, phase: Literal["head", "body"]) -> None:
        self._cancel_timer()
        self._phase = phase
        self.guard.incomplete.add(self)
        timeout = self.guard.header_timeout if phase == "head" else self.guard.body_timeout
        self._timer = self.loop.call_later(timeout, self._expired, phase)

    def _finish(self) -> None:
        self._cancel_timer()
        self._phase = "done"
        self.guard.incomplete.discard(self)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, phase: Literal["head", "body"]) -> None:
        self._timer = None
        if self._phase != phase or self.transport.is_closing():
            return
        self._finish()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        cycle = self.cycle
        if phase == "body" and cycle is not None and not cycle.response_started:
            log.info("%s sent no complete request body in %s s: 408", client, self.guard.body_timeout)
            self.loop.create_task(_answer_timeout(cycle))
            return
        log.info("%s sent no complete request %s in %s s: closing", client, phase,
                 self.guard.header_timeout if phase == "head" else self.guard.body_timeout)
        self.transport.close()


async def _answer_timeout(cycle: RequestResponseCycle) -> None:
    body = json.dumps(error_json("request_timeout", "the request was not received in time")).encode()
    cycle.keep_alive = False
    await cycle.send({"type": "http.response.start", "status": 408, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await cycle.send({"type": "http.response.body", "body": body, "more_body": False})
    # Before the app runs again: its pending receive() now reports a disconnect, and whatever it answers to that
    # is dropped instead of colliding with the 408 already sent.
    cycle.disconnected = True
    cycle.message_event.set()


def build_server(app: ASGIApp, settings: Settings) -> uvicorn.Server:
    """A uvicorn server for ``app`` on ``settings.host:port`` with the slow-client guard of this module."""
    guard = SlowClientGuard(header_timeout=settings.header_timeout, body_timeout=settings.body_timeout,
                            max_incomplete=settings.max_incomplete_requests)

    class Protocol(GuardedH11Protocol):
        pass

    Protocol.guard = guard
    # No proxy headers: behind a proxy, --public-url says what clients see, and a client on this machine must not
    # choose the scheme of image URLs with X-Forwarded-Proto.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            lifespan="on", http=Protocol, proxy_headers=False)
    return uvicorn.Server(config)


def guard_of(server: uvicorn.Server) -> SlowClientGuard:
    """The guard of a server ``build_server`` made (for tests and health reports)."""
    protocol = server.config.http
    if not (isinstance(protocol, type) and issubclass(protocol, GuardedH11Protocol)):
        raise TypeError("not a server build_server made")
    return protocol.guard
