"""The webhook outbox of ``DynamoTaskStore``: the due index's query and the outbox's own compare-and-set.

A task's ``Outbox`` is the attribute ``outbox``, a plain map (``event_id``, ``event``, ``created_at``, ``state``,
``due_at``, ``attempts``, ``version``; see ``sdasync.outbox``), written by the transition that finishes the task
(``transition(changes={"outbox": ...})``, the same UpdateItem as the status, so the event cannot be lost between two
writes) and by ``update_outbox``. While ``outbox.due_at`` is set the item also carries ``outboxPart = "due"`` and
``outboxDue = due_at``, the keys of the sparse, keys-only index ``byOutboxDue``: every write of the outbox sets or
removes them in the same UpdateItem, so the index holds exactly the pending outboxes (eventually: GSIs lag).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from botocore.exceptions import ClientError

from sdasync.awsclient import error_code
from sdasync.backends.aws.dynamo_calls import failed_item
from sdasync.backends.aws.dynamo_items import (
    CHANGE_ATTRS,
    INDEX_OUTBOX,
    KEY,
    OUTBOX_DUE,
    OUTBOX_PART,
    OUTBOX_PART_VALUE,
    encode_change,
    item_to_task,
    outbox_attrs,
    serialize,
    update_expression,
)
from sdasync.backends.aws.dynamo_queries import batch_get, query_items
from sdasync.errors import TaskConflict, TaskNotFound
from sdasync.models import Task
from sdasync.outbox import Outbox

MAX_LIMIT = 1000
OUTBOX = CHANGE_ATTRS["outbox"]


def due_outbox(client: Any, table: str, *, before: float, limit: int) -> list[Task]:
    """The tasks whose outbox is due before ``before``, soonest first (ties by id). Raises ValueError for a bad
    limit, ConfigError without the index; botocore errors pass through."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer in 1..{MAX_LIMIT}")
    request: dict[str, Any] = {
        "TableName": table, "IndexName": INDEX_OUTBOX, "KeyConditionExpression": "#p = :p AND #d < :d",
        "ExpressionAttributeNames": {"#p": OUTBOX_PART, "#d": OUTBOX_DUE},
        "ExpressionAttributeValues": {":p": {"S": OUTBOX_PART_VALUE}, ":d": serialize(float(before))},
        "ScanIndexForward": True,  # soonest first
    }
    keys = query_items(client, request, limit=limit)
    tasks = [item_to_task(item) for item in batch_get(client, table, [key[KEY]["S"] for key in keys])]
    # The index lags the table on AWS: keep only what a strong read still finds due (another dispatcher may have
    # claimed or delivered it since).
    found = [(task.outbox.due_at, task) for task in tasks
             if task.outbox is not None and task.outbox.due_at is not None and task.outbox.due_at < before]
    return [task for _, task in sorted(found, key=lambda pair: (pair[0], pair[1].task_id))]


def update_outbox(client: Any, table: str, task_id: str, outbox: Outbox, *, expected: Outbox) -> Task:
    """Replace the outbox if the stored one has ``expected``'s event id and version; see
    ``TaskStore.update_outbox``. Raises TaskNotFound, TaskConflict, ValueError for values DynamoDB cannot hold;
    botocore errors pass through."""
    written = replace(outbox, version=expected.version + 1)
    plain: Mapping[str, Any] = encode_change("outbox", written)
    index_sets, removes = outbox_attrs(plain)
    # Neither status nor updatedAt: delivering a webhook changes nothing the task's poller or sweeper reads.
    update, names, values = update_expression({OUTBOX: plain, **index_sets}, removes)
    names.update({"#key": KEY, "#o": OUTBOX, "#oid": "event_id", "#over": "version"})
    values.update({":oid": {"S": expected.event_id}, ":over": {"N": str(int(expected.version))}})
    old: Mapping[str, Any] | None = None
    try:
        response = client.update_item(
            TableName=table, Key={KEY: {"S": task_id}}, UpdateExpression=update,
            ConditionExpression="attribute_exists(#key) AND #o.#oid = :oid AND #o.#over = :over",
            ExpressionAttributeNames=names, ExpressionAttributeValues=values, ReturnValues="ALL_NEW",
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )
    except ClientError as exc:
        if error_code(exc) != "ConditionalCheckFailedException":
            raise
        old = failed_item(exc)
    if old is None:
        return item_to_task(response["Attributes"])
    if not old:
        raise TaskNotFound(f"task {task_id} not found")
    current = item_to_task(old)
    seen = "no outbox" if current.outbox is None else \
        f"outbox {current.outbox.event_id} at version {current.outbox.version}"
    raise TaskConflict(f"task {task_id} has {seen}, expected {expected.event_id} at version {expected.version}",
                       current=current)
