"""AWS Lambda entry point: ``sdasync.api.lambda_handler.handler`` serves the same FastAPI app as ``sdasync api``,
for API Gateway REST (payload v1) and HTTP API (payload v2) events, through Mangum.

Settings come from the environment (``SDASYNC_QUEUE``, ``SDASYNC_STORE``, ``SDASYNC_BLOBS``, limits...), read once
per cold start: this is an entry point, the one place that may read ``os.environ``. Backends open lazily and are
reused across invocations. Nothing here imports torch or diffusers: the API never loads an engine.

Image URLs and ``Location`` are built from the gateway's own domain and stage, as the event's request context
names them (``https://<domainName>/<stage>/``), never from the Host header; ``SDASYNC_PUBLIC_URL`` (a custom
domain, a CDN) wins over both.

API keys are always required here (``SDASYNC_AUTH`` cannot turn them off): a Lambda is on the internet.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from sdasync.api.app import create_app
from sdasync.api.hosts import GATEWAY_BASE_URL, HOST_HEADER
from sdasync.config import Settings, settings_from
from sdasync.service import open_backends

_handler: Any = None
#: Holds the backends for the life of the execution environment; Lambda freezes and discards it. Closed at exit
#: where a process does exit (tests, local runs), before the interpreter tears down what closing needs.
_stack = ExitStack()
atexit.register(_stack.close)


def gateway_base_url(event: Mapping[str, Any], app_path: str) -> str | None:
    """``https://<domainName><prefix>/`` for an API Gateway event, where the prefix is what the gateway's path
    has before the path the app sees (the stage, a base path mapping); None without a usable domain name."""
    context = event.get("requestContext")
    if not isinstance(context, Mapping):
        return None
    domain = context.get("domainName")
    if not isinstance(domain, str) or not HOST_HEADER.fullmatch(domain):
        return None
    http = context.get("http")
    v2 = isinstance(http, Mapping)
    full = http.get("path") if isinstance(http, Mapping) else context.get("path")
    stage = context.get("stage")
    if isinstance(full, str) and app_path and full.endswith(app_path):
        prefix = full[:len(full) - len(app_path)]
    elif isinstance(stage, str) and stage and not (v2 and stage == "$default"):
        prefix = f"/{stage}"
    else:
        prefix = ""
    prefix = "/".join(part for part in prefix.split("/") if part)
    return f"https://{domain}/{prefix + '/' if prefix else ''}"


class GatewayBaseUrl:
    """Puts the gateway's base URL into each request's ASGI scope, for ``api.hosts.base_url``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        event = scope.get("aws.event")
        if scope["type"] == "http" and isinstance(event, Mapping):
            url = gateway_base_url(event, str(scope.get("path", "")))
            if url is not None:
                scope = {**scope, GATEWAY_BASE_URL: url}
        await self.app(scope, receive, send)


def make_handler(settings: Settings) -> Any:
    """A Mangum handler for ``settings``. Backends are opened once here, not per event."""
    from mangum import Mangum

    backends = _stack.enter_context(open_backends(settings))
    # Behind API Gateway a stage prefix ("/prod/task") is stripped by Mangum when api_base_path names it.
    return Mangum(GatewayBaseUrl(create_app(settings, backends=backends)), lifespan="auto",
                  api_gateway_base_path=settings.api_base_path)


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    global _handler
    if _handler is None:
        _handler = make_handler(settings_from({"auth": True}, os.environ))
    result: dict[str, Any] = _handler(event, context)
    return result
