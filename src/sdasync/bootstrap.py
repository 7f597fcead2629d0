"""``sdasync aws bootstrap``: create the cloud resources that backend URLs name, idempotently.

Each backend that owns cloud resources has an ``ensure()`` method (the SQS queue with its dead-letter queue and
redrive policy, the DynamoDB table with its indexes and TTL, the private S3 bucket with a lifecycle rule per
prefix). Running it again changes nothing.

Roles are ``queue``, ``store``, ``blobs`` (the results) and ``payloads`` (large request payloads, a blob store of
its own). The one retention setting goes to the task store (DynamoDB's TTL) and to every S3 blob store (its
lifecycle rule), so tasks, results and payloads expire together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, Self, runtime_checkable

from sdasync.backends.registry import open_backend, resolve
from sdasync.config import Settings
from sdasync.errors import ConfigError

#: bootstrap role -> registry role
ROLES: Mapping[str, str] = {"queue": "queue", "store": "store", "blobs": "blobs", "payloads": "blobs"}
#: Registry roles whose backends take the retention.
_RETAINED = frozenset({"store", "blobs"})


def bootstrap(urls: Mapping[str, str | None], *, retention_days: float | None = None) -> list[str]:
    """Ensure every resource named by ``urls`` (role -> URL; None skips the role), with ``retention_days`` (the
    ``Settings`` value; None: its default) for the store and the S3 blob stores. Returns what was ensured.
    Raises ConfigError for an unknown role or a URL whose backend has nothing to create, BackendError."""
    if retention_days is None:
        retention_days = float(Settings.model_fields["retention_days"].default)
    given = {role: url for role, url in urls.items() if url}
    if not given:
        raise ConfigError("name at least one of --queue, --store, --blobs")
    unknown = sorted(set(given) - set(ROLES))
    if unknown:
        raise ConfigError(f"unknown bootstrap role(s) {unknown}; valid: {', '.join(ROLES)}")
    ensurable: dict[str, Ensurable] = {}
    for role, url in given.items():
        kind = ROLES[role]
        # Checked on the class first: backends without cloud resources (sqlite, file) take no retention keyword.
        if not callable(getattr(resolve(kind, url), "ensure", None)):
            raise ConfigError(f"{url} has no cloud resources to create; bootstrap takes sqs://, dynamodb:// and "
                              f"s3:// URLs")
        kwargs: dict[str, Any] = {"retention_days": retention_days} if kind in _RETAINED else {}
        backend = open_backend(kind, url, **kwargs)
        if not isinstance(backend, Ensurable):
            raise ConfigError(f"{url} has no cloud resources to create")
        ensurable[role] = backend
    done = []
    for role, backend in ensurable.items():
        with backend:
            backend.ensure()
        done.append(f"{role}: {given[role]}")
    return done


@runtime_checkable
class Ensurable(Protocol):
    """A backend that owns cloud resources and can create them."""

    def ensure(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...
