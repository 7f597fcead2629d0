"""The outbox dispatcher as an AWS Lambda function, on an EventBridge schedule (``rate(1 minute)``).

Settings come from the environment, under the same names as ``sdasync webhooks``: ``SDASYNC_STORE``
(``dynamodb://…``), ``SDASYNC_WEBHOOK_ALLOW``, ``SDASYNC_WEBHOOK_TIMEOUT``, ``SDASYNC_WEBHOOK_RETRY_FOR``, and what
the wiring needs to render tasks and find secrets (``SDASYNC_BLOBS``, ``SDASYNC_SECRETS``). Each invocation
sends what is due, pass after pass while full batches come, and stops while a pass still fits in the time left;
an invocation cut short loses nothing (the lease brings its claimed events back). Several invocations may
overlap: claims are compare-and-sets.

The seam: ``WIRING`` builds the two things only the service knows, how a task renders as the API's JSON and a
tenant's signing secret, from the settings and the open store: by default ``trust.lambda_wiring`` (image URLs
for ``SDASYNC_PUBLIC_URL``, secrets sealed by ``SDASYNC_SECRETS``); ``configure`` replaces it. The dispatcher
and the store live at module level, so a warm container reuses them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from sdasync.backends.base import TaskStore
from sdasync.config import Settings, settings_from
from sdasync.errors import ConfigError
from sdasync.webhooks.command import dispatcher_from
from sdasync.webhooks.dispatcher import Dispatcher, Render, SecretFor

Wiring = Callable[[Settings, TaskStore], tuple[Render, SecretFor]]
#: Milliseconds of the invocation kept free after the last pass: one pass can take a whole webhook timeout.
_MARGIN_MS = 5_000
_BATCH = 100


def _default(settings: Settings, store: TaskStore) -> tuple[Render, SecretFor]:
    from sdasync.trust import lambda_wiring

    return lambda_wiring(settings, store)


WIRING: Wiring = _default
_dispatcher: Dispatcher | None = None


def configure(wiring: Wiring) -> None:
    """Set how tasks render and where secrets come from; the next cold start uses it."""
    global WIRING, _dispatcher
    WIRING, _dispatcher = wiring, None


def _open() -> Dispatcher:
    from sdasync.backends.registry import open_store

    settings = settings_from({}, os.environ)
    if not settings.store:
        raise ConfigError("set SDASYNC_STORE")
    store = open_store(settings.store_url, retention_days=settings.retention_days).__enter__()
    render, secret_for = WIRING(settings, store)
    return dispatcher_from(settings, store, render=render, secret_for=secret_for, batch=_BATCH)


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Deliver what is due; returns ``{"sent": N, "passes": P}``, which the invocation record keeps."""
    global _dispatcher
    if _dispatcher is None:
        _dispatcher = _open()
    remaining: Callable[[], int] | None = getattr(context, "get_remaining_time_in_millis", None)
    sent = passes = 0
    started = time.monotonic()
    while True:
        count = _dispatcher.run_once()
        sent, passes = sent + count, passes + 1
        pass_ms = (time.monotonic() - started) * 1000 / passes
        if count < _BATCH or remaining is None or remaining() < pass_ms + _MARGIN_MS:
            return {"sent": sent, "passes": passes}
