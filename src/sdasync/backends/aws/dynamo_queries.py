"""The paginated reads ``DynamoTaskStore`` makes: an index Query to its end (or a number of items), and a strongly
consistent BatchGetItem. botocore errors pass through, but for a missing index, which is a ConfigError."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

from botocore.exceptions import ClientError

from sdasync.awsclient import error_code
from sdasync.backends.aws.dynamo_items import INDEX_UPDATED, KEY, UPDATED_AT, item_to_task, serialize
from sdasync.errors import ConfigError
from sdasync.models import Task, TaskStatus

#: BatchGetItem takes at most this many keys.
BATCH_GET_MAX = 100
MAX_LIMIT = 1000


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


def stale_tasks(client: Any, table: str, *, status: TaskStatus, updated_before: float, limit: int) -> list[Task]:
    """``TaskStore.stale``: the keys-only ``byUpdated`` index, then a strong read of what it names. Raises
    ValueError for a bad limit, ConfigError without the index."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer in 1..{MAX_LIMIT}")
    status_value = str(TaskStatus(status))
    request: dict[str, Any] = {
        "TableName": table, "IndexName": INDEX_UPDATED, "KeyConditionExpression": "#p = :p AND #u < :u",
        "ExpressionAttributeNames": {"#p": "status", "#u": UPDATED_AT},
        "ExpressionAttributeValues": {":p": {"S": status_value}, ":u": serialize(float(updated_before))},
        "ScanIndexForward": True,  # oldest first
    }
    keys = query_items(client, request, limit=limit)
    tasks = [item_to_task(item) for item in batch_get(client, table, [key[KEY]["S"] for key in keys])]
    # The index lags the table on AWS: keep only what a strong read still finds stale.
    found = [task for task in tasks if task.status == status_value and task.updated_at < updated_before]
    return sorted(found, key=lambda task: (task.updated_at, task.task_id))
