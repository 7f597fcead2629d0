"""``sdasync aws bootstrap``: create the cloud resources that backend URLs name, idempotently.

Each backend that owns cloud resources has an ``ensure()`` method (the SQS queue with its dead-letter queue and
redrive policy, the DynamoDB table with its indexes and TTL, the private S3 bucket). Running it again changes
nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, Self, runtime_checkable

from sdasync.backends.registry import open_backend
from sdasync.errors import ConfigError


def bootstrap(urls: Mapping[str, str | None]) -> list[str]:
    """Ensure every resource named by ``urls`` (role -> URL; None skips the role). Returns what was ensured.
    Raises ConfigError for a URL whose backend has nothing to create, BackendError."""
    given = {role: url for role, url in urls.items() if url}
    if not given:
        raise ConfigError("name at least one of --queue, --store, --blobs")
    backends = {role: open_backend(role, url) for role, url in given.items()}
    ensurable: dict[str, Ensurable] = {}
    for role, backend in backends.items():
        if not isinstance(backend, Ensurable):
            raise ConfigError(f"{given[role]} has no cloud resources to create; bootstrap takes sqs://, "
                              f"dynamodb:// and s3:// URLs")
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
