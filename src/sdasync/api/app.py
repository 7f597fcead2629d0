"""``create_app``: the FastAPI application, its error handling and its request-size cap."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import ExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdasync import __version__
from sdasync.api.auth import Gate, auth_required
from sdasync.api.hosts import trusted_hosts
from sdasync.api.routes import router
from sdasync.api.schemas import error_json
from sdasync.api.urlsign import signer_for
from sdasync.auth.keys import KeyRing
from sdasync.backends.records import RecordStore
from sdasync.config import Settings
from sdasync.errors import LimitExceeded, RequestError, SdasyncError, Unauthorized
from sdasync.payloads import TaskRequest
from sdasync.service import Backends, TaskService, open_backends

log = logging.getLogger(__name__)

#: HTTP status -> error code for errors raised by the framework rather than by sdasync.
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
              415: "unsupported_media_type", 422: "invalid_request"}


def create_app(settings: Settings | None = None, *, backends: Backends | None = None,
               health_checks: Mapping[str, Callable[[], dict[str, Any]]] | None = None) -> FastAPI:
    """The API. Backends are opened from ``settings`` at startup unless given ready (tests, Lambda reuse).
    ``health_checks`` add sections to ``/healthz`` (the engine, the worker processes), each ``{"ok": bool, …}``."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with ExitStack() as stack:
            opened = backends or stack.enter_context(open_backends(settings))
            app.state.service = TaskService.from_settings(opened, settings)
            store = opened.store
            app.state.gate = Gate(KeyRing(store) if isinstance(store, RecordStore) else None,
                                  required=auth_required(settings), trusted=trusted_hosts(settings))
            app.state.signer = signer_for(opened.blobs, settings)
            yield

    app = FastAPI(title="sdasync", version=__version__, lifespan=lifespan,
                  description="Asynchronous Stable Diffusion inference: submit a WebUI request, poll for the images.")
    app.state.settings = settings
    app.state.health_checks = dict(health_checks or {})
    app.include_router(router)
    app.add_middleware(DocsNeedKey)
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    @app.exception_handler(SdasyncError)
    async def sdasync_error(_: Request, exc: SdasyncError) -> JSONResponse:
        if exc.http_status >= 500:
            log.warning("request failed: %s", exc, exc_info=exc.http_status == 500)
            # A backend's message names files, buckets and hosts: the log has it, the client gets the code.
            message = SERVER_MESSAGES.get(exc.code, "the server failed; the server log has the details")
            return JSONResponse(error_json(exc.code, message), status_code=exc.http_status)
        field = exc.field if isinstance(exc, RequestError) else None
        headers = {}
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = 'Bearer realm="sdasync"'
        if isinstance(exc, LimitExceeded):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return JSONResponse(error_json(exc.code, exc.message, field), status_code=exc.http_status, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _: ClientDisconnect) -> Response:
        # Nobody is left to answer: a client's own doing, not a server error worth a traceback.
        log.info("client disconnected before sending the whole request: %s %s", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc)[:200] or None
        # pydantic's own message only: its "input" would echo the client's value, however long.
        message = f"{field}: {first.get('msg', 'invalid')}" if field else str(first.get("msg", "invalid request"))
        return JSONResponse(error_json("invalid_request", message, field), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return JSONResponse(error_json(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(error_json("internal_error", "internal error; the server log has the details"), 500)

    return app


SERVER_MESSAGES = {
    "backend_unavailable": "a backend (queue, task store or blob store) is unavailable; try again later",
    "backend_refused": "a backend refused the request; the server log has the details",
}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request body's models, which the route reads itself (for its 415 and its
    errors naming fields) and so does not declare as a parameter."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        body = TypeAdapter(TaskRequest).json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        components["TaskRequest"] = {**body, "examples": [
            {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a lighthouse at dusk", "steps": 20}}]}
        app.openapi_schema = schema
    return app.openapi_schema


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413, by Content-Length or while streaming (chunked bodies)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except RequestTooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(error_json("payload_too_large",
                                           f"the request body is larger than {self.max_bytes} bytes"), 413)
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


class RequestTooLarge(Exception):
    pass


#: FastAPI's own pages, which take no dependencies of ours.
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class DocsNeedKey:
    """Where keys are required, the schema and its pages are like every other route but /healthz: a 401
    without a valid key."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") in DOC_PATHS:
            gate: Gate | None = getattr(scope["app"].state, "gate", None)
            if gate is not None and gate.required:
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
                try:
                    await run_in_threadpool(gate.caller, headers)
                except SdasyncError as exc:
                    response = JSONResponse(error_json(exc.code, exc.message), status_code=exc.http_status,
                                            headers={"WWW-Authenticate": 'Bearer realm="sdasync"'}
                                            if isinstance(exc, Unauthorized) else None)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
