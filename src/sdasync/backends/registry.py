"""URL scheme -> implementation, imported lazily so optional dependencies load only when used.

A missing optional dependency becomes a ConfigError that says which extra to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from sdasync.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from sdasync.backends.base import BlobStore, Queue, TaskStore
    from sdasync.engines.base import Engine
    from sdasync.scaler.actuators.base import Fleet

#: role -> scheme -> ("module:Class", extra needed or None)
REGISTRY: dict[str, dict[str, tuple[str, str | None]]] = {
    "queue": {
        "sqlite": ("sdasync.backends.sqlite.queue:SqliteQueue", None),
        "sqs": ("sdasync.backends.aws.sqs:SqsQueue", "aws"),
    },
    "store": {
        "sqlite": ("sdasync.backends.sqlite.store:SqliteTaskStore", None),
        "dynamodb": ("sdasync.backends.aws.dynamodb:DynamoTaskStore", "aws"),
    },
    "blobs": {
        "file": ("sdasync.backends.local.files:FileBlobStore", None),
        "s3": ("sdasync.backends.aws.s3:S3BlobStore", "aws"),
    },
    "engine": {
        "fake": ("sdasync.engines.fake:FakeEngine", None),
        "webui+http": ("sdasync.engines.webui:WebuiEngine", None),
        "webui+https": ("sdasync.engines.webui:WebuiEngine", None),
        "diffusers": ("sdasync.engines.diffusers:DiffusersEngine", "diffusers"),
    },
    # What the scaler resizes (sdasync.scaler.actuators.base.Fleet).
    "fleet": {
        "spotfleet": ("sdasync.scaler.actuators.spotfleet:SpotFleetScaler", "aws"),
        "asg": ("sdasync.scaler.actuators.asg:AsgScaler", "aws"),
        "local": ("sdasync.scaler.actuators.local:LocalScaler", None),
    },
}


def scheme_of(url: str) -> str:
    if "://" not in url:
        raise ConfigError(f"not a URL: {url!r} (expected scheme://...)")
    return urlsplit(url).scheme.lower()


def resolve(role: str, url: str) -> type[Any]:
    """The class serving ``url`` for ``role``. Raises ConfigError naming the valid schemes."""
    schemes = REGISTRY[role]
    scheme = scheme_of(url)
    if scheme not in schemes:
        valid = ", ".join(f"{s}://" for s in sorted(schemes))
        raise ConfigError(f"unknown {role} URL scheme {scheme!r} in {url!r}; valid: {valid}")
    target, extra = schemes[scheme]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # Only a missing third-party package means "install the extra"; a broken sdasync module is a bug.
        if extra is None or (exc.name or "").split(".")[0] == "sdasync":
            raise
        raise ConfigError(f"{scheme}:// needs {exc.name}: pip install 'sdasync[{extra}]'") from exc
    cls: type[Any] = getattr(module, class_name)
    return cls


def open_backend(role: str, url: str, **kwargs: Any) -> object:
    """Build (not yet connect) the backend for ``url``; ``kwargs`` go to its ``from_url``. Callers use the typed
    front doors below."""
    built: object = resolve(role, url).from_url(url, **kwargs)
    return built


# Typed front doors over the one lazy table: what each returns is checked by the contract suites, so the casts
# only tell mypy what those suites hold every implementation to.
def open_queue(url: str) -> Queue:
    return cast("Queue", open_backend("queue", url))


def open_store(url: str, *, retention_days: float | None = None) -> TaskStore:
    """``retention_days``: the service's one retention setting; every store takes it (DynamoDB expires tasks by
    it, SQLite leaves that to the janitor)."""
    kwargs: dict[str, Any] = {} if retention_days is None else {"retention_days": retention_days}
    return cast("TaskStore", open_backend("store", url, **kwargs))


def open_blobs(url: str) -> BlobStore:
    return cast("BlobStore", open_backend("blobs", url))


def open_engine(url: str, *, models_dir: Path | None = None, cache_dir: Path | None = None) -> Engine:
    kwargs: dict[str, Any] = {}
    if models_dir is not None:
        kwargs["models_dir"] = models_dir
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    return cast("Engine", open_backend("engine", url, **kwargs))


def open_fleet(url: str, **kwargs: Any) -> Fleet:
    return cast("Fleet", open_backend("fleet", url, **kwargs))
