"""How ``DynamoTaskStore``'s calls fail: botocore errors translated once, and the refusals that are not retryable."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from botocore.exceptions import ClientError

from sdasync.awsclient import error_code, translate_errors
from sdasync.errors import BackendRefused


@contextmanager
def dynamo_call(action: str) -> Iterator[None]:
    """translate_errors, plus a clearer word for DynamoDB's item-size refusal."""
    with translate_errors(action):
        try:
            yield
        except ClientError as exc:
            if error_code(exc) == "ValidationException" and "size" in str(exc).lower():
                raise BackendRefused(f"{action}: the task exceeds DynamoDB's 400 KB item limit; payloads this "
                                     f"large belong in the blob store ({exc})") from exc
            raise


@contextmanager
def refused() -> Iterator[None]:
    """Values DynamoDB cannot hold (NaN, 40-digit numbers, objects) are a refusal, not a retryable failure."""
    try:
        yield
    except ValueError as exc:
        raise BackendRefused(str(exc)) from exc


def failed_item(exc: ClientError) -> dict[str, Any]:
    """The item a failed condition saw ({}: none), which ReturnValuesOnConditionCheckFailure puts next to the
    error, untyped in the stubs."""
    response: dict[str, Any] = dict(exc.response)
    item: dict[str, Any] = response.get("Item") or {}
    return item
