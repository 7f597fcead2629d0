"""The ``RecordStore`` half of ``DynamoTaskStore``: records are items of the tasks table.

A record is the item ``taskId = "rec#<kind>#<key>"``: task ids are 32 hex characters and never hold a ``#``, so no
task can take the key, and the store answers "not found" for such an id as a task. Attributes: ``data`` (the
record's JSON object as one compact string: records are internal, small, and read whole, so typed attributes and
float sidecars would buy nothing), ``version`` (N, the compare-and-set counter), ``expiresAt`` (N, the table's TTL
attribute; absent for a record kept until deleted), and ``listAll = "rec#<kind>"`` / ``listKey = <key>``, which put
the record in the ``byCreated`` index under a partition of its kind, sorted by key (the way worker records sit
under ``"workers"``). No ``status``, ``tenant`` or ``outboxPart``: no task listing, ``stale`` or ``due_outbox``
ever meets a record.

Every condition is in the write itself: a create is a PutItem conditional on ``attribute_not_exists(taskId) OR
expiresAt <= :now``, a replace or a versioned delete conditional on ``version = :v`` and the record being live.
DynamoDB's TTL deletes an expired item late (up to days), so every read and condition treats ``expiresAt <= now``
as absent. ``get_record`` reads strongly; ``list_records`` reads a global secondary index, which DynamoDB only
reads eventually consistently: a record written a moment ago may be missing from a listing, or listed as it was,
for a short while (moto is consistent).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from botocore.exceptions import ClientError

from sdasync.awsclient import error_code
from sdasync.backends.aws.dynamo_calls import failed_item
from sdasync.backends.aws.dynamo_items import EXPIRES_AT, INDEX_ALL, KEY, LIST_ALL_ATTR, LIST_KEY, serialize
from sdasync.backends.aws.dynamo_queries import query_items
from sdasync.backends.aws.dynamo_workers import is_worker_key
from sdasync.backends.cursor import decode_cursor, encode_cursor
from sdasync.backends.records import Record, RecordPage, check_expiry, check_record_key, encode_data
from sdasync.errors import RecordConflict, RequestError

RECORD_PREFIX = "rec#"
MAX_LIMIT = 1000
#: The record is live: kept until deleted, or not expired yet (TTL deletes late).
_LIVE = "(attribute_not_exists(#exp) OR #exp > :now)"


def is_reserved_key(task_id: str) -> bool:
    """Whether ``task_id`` names a registry or record item, never a task."""
    return is_worker_key(task_id) or task_id.startswith(RECORD_PREFIX)


def record_key(kind: str, key: str) -> dict[str, Any]:
    return {KEY: {"S": f"{RECORD_PREFIX}{kind}#{key}"}}


def item_to_record(item: Mapping[str, Any]) -> Record:
    """A Record from a typed item. Raises KeyError or ValueError for an item that is not one."""
    expiry = item.get(EXPIRES_AT)
    return Record(kind=str(item[LIST_ALL_ATTR]["S"])[len(RECORD_PREFIX):], key=str(item[LIST_KEY]["S"]),
                  data=json.loads(item["data"]["S"]), version=int(item["version"]["N"]),
                  expires_at=None if expiry is None else float(expiry["N"]))


def _live(item: Mapping[str, Any] | None, now: float) -> Record | None:
    if not item:
        return None
    record = item_to_record(item)
    return None if record.expires_at is not None and record.expires_at <= now else record


def get_record(client: Any, table: str, kind: str, key: str, *, now: float) -> Record | None:
    check_record_key(kind, key)
    response = client.get_item(TableName=table, Key=record_key(kind, key), ConsistentRead=True)
    return _live(response.get("Item"), now)


def put_record(client: Any, table: str, kind: str, key: str, data: Any, *, version: int | None,
               expires_at: float | None, now: float) -> Record:
    """Create (``version=None``) or replace the record; see ``RecordStore.put_record``. Raises RecordConflict,
    ValueError; botocore errors pass through."""
    check_record_key(kind, key)
    text = encode_data(data)
    expiry = check_expiry(expires_at)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ValueError("version must be a positive integer or None")
    record = Record(kind=kind, key=key, data=json.loads(text), version=1 if version is None else version + 1,
                    expires_at=expiry)
    item = {**record_key(kind, key), LIST_ALL_ATTR: {"S": RECORD_PREFIX + kind}, LIST_KEY: {"S": key},
            "data": {"S": text}, "version": {"N": str(record.version)}}
    if expiry is not None:
        item[EXPIRES_AT] = serialize(expiry)
    names = {"#exp": EXPIRES_AT}
    values: dict[str, Any] = {":now": serialize(float(now))}
    if version is None:
        # Absent, or present but expired and not yet deleted by TTL.
        names["#key"] = KEY
        condition = "attribute_not_exists(#key) OR #exp <= :now"
    else:
        names["#v"] = "version"
        values[":v"] = {"N": str(version)}
        condition = f"#v = :v AND {_LIVE}"
    try:
        client.put_item(TableName=table, Item=item, ConditionExpression=condition, ExpressionAttributeNames=names,
                        ExpressionAttributeValues=values, ReturnValuesOnConditionCheckFailure="ALL_OLD")
    except ClientError as exc:
        if error_code(exc) != "ConditionalCheckFailedException":
            raise
        # The item the condition saw, atomically; an expired one is absent to the caller.
        current = _live(failed_item(exc), now)
        wanted = "absent" if version is None else f"at version {version}"
        found = "absent" if current is None else f"at version {current.version}"
        raise RecordConflict(f"record {kind}/{key} is {found}, expected {wanted}", current=current) from None
    return record


def delete_record(client: Any, table: str, kind: str, key: str, *, version: int | None, now: float) -> bool:
    check_record_key(kind, key)
    names = {"#key": KEY, "#exp": EXPIRES_AT}
    values: dict[str, Any] = {":now": serialize(float(now))}
    condition = f"attribute_exists(#key) AND {_LIVE}"
    if version is not None:
        names["#v"] = "version"
        values[":v"] = {"N": str(int(version))}
        condition += " AND #v = :v"
    try:
        client.delete_item(TableName=table, Key=record_key(kind, key), ConditionExpression=condition,
                           ExpressionAttributeNames=names, ExpressionAttributeValues=values)
    except ClientError as exc:
        if error_code(exc) != "ConditionalCheckFailedException":
            raise
        return False
    return True


def list_records(client: Any, table: str, kind: str, *, limit: int, cursor: str | None, now: float) -> RecordPage:
    check_record_key(kind, "x")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer in 1..{MAX_LIMIT}")
    partition = RECORD_PREFIX + kind
    request: dict[str, Any] = {
        "TableName": table, "IndexName": INDEX_ALL, "KeyConditionExpression": "#p = :p",
        # Expired records not yet deleted are left out by the query, so they count against no page's limit.
        "FilterExpression": _LIVE,
        "ExpressionAttributeNames": {"#p": LIST_ALL_ATTR, "#exp": EXPIRES_AT},
        "ExpressionAttributeValues": {":p": {"S": partition}, ":now": serialize(float(now))},
        "ScanIndexForward": True,  # by key
    }
    if cursor is not None:
        after = _decode_cursor(cursor, kind)
        request["ExclusiveStartKey"] = {**record_key(kind, after), LIST_ALL_ATTR: {"S": partition},
                                        LIST_KEY: {"S": after}}
    # One more than asked tells whether a next page exists.
    items = query_items(client, request, limit=limit + 1)
    records = [item_to_record(item) for item in items[:limit]]
    next_cursor = encode_cursor({"k": kind, "a": records[-1].key}) if len(items) > limit else None
    return RecordPage(records=records, next_cursor=next_cursor)


def _decode_cursor(cursor: str, kind: str) -> str:
    cursor_kind, after = decode_cursor(cursor, ("k", "a"))
    if cursor_kind != kind or not isinstance(after, str):
        # A cursor of another kind's listing would start in another index partition.
        raise RequestError("invalid cursor (or one from a listing of another kind)", field="cursor")
    try:
        check_record_key(kind, after)
    except ValueError:
        raise RequestError("invalid cursor", field="cursor") from None
    return after
