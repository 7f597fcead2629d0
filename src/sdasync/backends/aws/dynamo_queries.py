"""The paginated reads ``DynamoTaskStore`` makes: an index Query to its end (or a number of items), and a strongly
consistent BatchGetItem. botocore errors pass through, but for a missing index, which is a ConfigError."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

from botocore.exceptions import ClientError

from sdasync.awsclient import error_code
from sdasync.backends.aws.dynamo_items import KEY
from sdasync.errors import ConfigError

#: BatchGetItem takes at most this many keys.
BATCH_GET_MAX = 100


def query_items(client: Any, request: Mapping[str, Any], *, limit: int | None = None) -> list[dict[str, Any]]:
    """The items ``request`` (a Query's arguments) selects, following pages until ``limit`` items (all if None).
    Raises ConfigError when the table lacks the request's index."""
    request = dict(request)
    items: list[dict[str, Any]] = []
    # A Query stops at 1 MB (or its Limit), hence the loop.
    while limit is None or len(items) < limit:
        page_limit = {} if limit is None else {"Limit": limit - len(items)}
        try:
            response = client.query(**request, **page_limit)
        except ClientError as exc:
            index = str(request.get("IndexName", ""))
            # AWS says ValidationException ("does not have the specified index"), moto ResourceNotFound.
            if index and error_code(exc) in {"ValidationException", "ResourceNotFoundException"} \
                    and index in str(exc):
                raise ConfigError(f"DynamoDB table {request.get('TableName')!r} lacks the index {index!r}: run "
                                  f"`sdasync aws bootstrap` ({exc})") from exc
            raise
        items.extend(response.get("Items", []))
        if "LastEvaluatedKey" not in response:
            break
        request["ExclusiveStartKey"] = response["LastEvaluatedKey"]
    return items


def batch_get(client: Any, table: str, ids: Collection[str]) -> list[dict[str, Any]]:
    """The items of the task ids ``ids``, read strongly; missing ones are left out, the order is DynamoDB's."""
    items: list[dict[str, Any]] = []
    pending = [{KEY: {"S": task_id}} for task_id in dict.fromkeys(ids)]
    delay = 0.05
    while pending:
        chunk, pending = pending[:BATCH_GET_MAX], pending[BATCH_GET_MAX:]
        response = client.batch_get_item(RequestItems={table: {"Keys": chunk, "ConsistentRead": True}})
        items.extend(response.get("Responses", {}).get(table, []))
        unprocessed = response.get("UnprocessedKeys", {}).get(table, {}).get("Keys", [])
        if unprocessed:
            # Throttled keys come back unprocessed rather than as an error: back off and ask again.
            pending = [*unprocessed, *pending]
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    return items
