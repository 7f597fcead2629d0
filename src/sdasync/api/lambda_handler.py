"""AWS Lambda entry point: ``sdasync.api.lambda_handler.handler`` serves the same FastAPI app as ``sdasync api``,
for API Gateway REST (payload v1) and HTTP API (payload v2) events, through Mangum.

Settings come from the environment (``SDASYNC_QUEUE``, ``SDASYNC_STORE``, ``SDASYNC_BLOBS``, limits...), read once
per cold start; backends open lazily and are reused across invocations. Nothing here imports torch or diffusers:
the API never loads an engine.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

from sdasync.api.app import create_app
from sdasync.config import Settings, settings_from
from sdasync.service import open_backends

_handler: Any = None
#: Holds the backends for the life of the execution environment; Lambda freezes and discards it, never closes it.
_stack = ExitStack()


def make_handler(settings: Settings) -> Any:
    """A Mangum handler for ``settings``. Backends are opened once here, not per event."""
    from mangum import Mangum

    backends = _stack.enter_context(open_backends(settings))
    # Behind API Gateway a stage prefix ("/prod/task") is stripped by Mangum when SDASYNC_API_BASE_PATH names it.
    return Mangum(create_app(settings, backends=backends), lifespan="auto",
                  api_gateway_base_path=os.environ.get("SDASYNC_API_BASE_PATH", "/"))


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    global _handler
    if _handler is None:
        _handler = make_handler(settings_from({}))
    result: dict[str, Any] = _handler(event, context)
    return result
