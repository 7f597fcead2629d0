"""Wiring for the entry points: webhook secrets, the dispatcher and the worker's hooks, from one Settings.

Tasks of key-less mode (tenant ``""``) are signed with the secret of the tenant ``local``, made on first use:
``sdasync keys rotate-secret --tenant local`` shows a new one to give a receiver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sdasync.auth.keys import LOCAL_TENANT
from sdasync.auth.secretbox import open_secret_box
from sdasync.auth.tenants import Tenants
from sdasync.backends.base import BlobStore, TaskStore
from sdasync.backends.records import RecordStore
from sdasync.config import Settings
from sdasync.errors import ConfigError
from sdasync.models import Task

log = logging.getLogger(__name__)



def records_of(store: TaskStore) -> RecordStore:
    if not isinstance(store, RecordStore):
        raise ConfigError(f"the task store {type(store).__name__} keeps no records (keys, quotas, webhooks)")
    return store


def secret_source(store: TaskStore, settings: Settings) -> Callable[[str], list[str] | None]:
    """``secret_for(tenant)``: the secrets that sign the tenant's events (the current one, and the one before it
    while a rotation's overlap lasts), opened; for ``""``, the ``local`` tenant's; None for no tenant."""
    tenants = Tenants(records_of(store), open_secret_box(settings.secrets_url))
    made: list[bool] = []

    def secret_for(tenant: str) -> list[str] | None:
        if not tenant:
            if not made:  # once per process: it exists from then on
                tenants.ensure(LOCAL_TENANT)
                made.append(True)
            tenant = LOCAL_TENANT
        return tenants.webhook_secrets(tenant) or None

    return secret_for


def renderer(blobs: BlobStore, settings: Settings) -> Callable[[Task], dict[str, Any]]:
    """The ``data`` of an event: the task as ``GET /tasks/{id}`` shows it, image URLs minted for the API's public
    address (signed, for the embedded store)."""
    from sdasync.api.hosts import fallback_base_url
    from sdasync.api.schemas import task_json
    from sdasync.api.urlsign import image_urls, signer_for

    base = (settings.public_url or fallback_base_url(settings)).rstrip("/") + "/"
    url = image_urls(blobs, signer_for(blobs, settings), base)
    return lambda task: task_json(task, url)


def lambda_wiring(settings: Settings, store: TaskStore) -> tuple[Callable[[Task], dict[str, Any]],
                                                                 Callable[[str], list[str] | None]]:
    """What the dispatcher's Lambda needs: the renderer (over the results store the settings name, opened for
    the life of the execution environment) and the secrets."""
    from sdasync.backends.registry import open_blobs

    blobs = open_blobs(settings.blobs_url).__enter__()
    return renderer(blobs, settings), secret_source(store, settings)
