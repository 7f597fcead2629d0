"""The task store in a DynamoDB table.

URL: ``dynamodb://<table>?region=<region>&retention_days=30``

- ``table``: the table name (3-255 characters of ``A-Z a-z 0-9 _ . -``), e.g. ``dynamodb://sd_tasks``.
- ``region``: overrides the region of the standard AWS chain (``AWS_REGION``, shared config, instance metadata).
- ``retention_days`` (default 30): how long a task is kept; DynamoDB's TTL deletes it afterwards.

Items are plain attributes under the partition key ``taskId`` (string), the key the original README creates by
hand, so such a table works for create / get / transition as it is: ``api``, ``status``, ``payload`` (a map),
``createdAt`` / ``updatedAt`` / ``startedAt`` / ``finishedAt`` (epoch seconds), ``attempts``, ``images`` (a list of
blob keys), ``info`` / ``progress`` / ``extra`` (maps), ``error`` (a map ``{code, message}``), ``worker``,
``leaseUntil`` (epoch seconds), ``history`` (a list of maps, one per finished attempt), ``expiresAt`` (the TTL:
creation + retention, restarted when the task reaches a terminal state, so a finished task stays readable for the
whole retention, and when an operator's redrive takes it out of one), and the index keys below. Optional fields
that are unset are absent.
See ``dynamo_items`` for the conversion (numbers come back as int or float, never Decimal).

Listing uses two global secondary indexes, both with projection ALL (a page is one Query, no GetItem per task):

- ``byCreated``: partition ``listAll`` (always ``"tasks"``), sort ``listKey`` = ``f"{createdAt:020.6f}#{taskId}"``;
- ``byStatus``: partition ``status``, sort ``listKey``: a transition moves the task between partitions by itself.

The constant ``listAll`` partition is deliberate: newest-first over all tasks is then one Query, in order. Its cost
is a hot partition: every task write also writes that one index partition, which takes about 1,000 writes/s
before it throttles (and an index that throttles throttles the table). Image generation runs at a few tasks per
second per GPU, far below that. If it ever matters, shard it: ``listAll = f"tasks#{crc32(taskId) % N}"`` and merge
N Queries by ``listKey`` (the cursor then holds N positions). ``byStatus`` has the same shape per status.

Consistency: ``get`` reads strongly (a worker claims a task right after the API wrote it), and ``transition`` is
one UpdateItem with a ConditionExpression, so it is a compare-and-set. Index reads are eventually consistent on
AWS: a task created a moment ago may be missing from ``list`` (or appear with its previous status) for a short
while; moto is consistent. ``ensure()`` (``sdasync aws bootstrap``) creates the table, adds missing indexes to a
table made by hand, and enables TTL; without the indexes ``list`` raises ConfigError.

Items are bounded by DynamoDB's 400 KB: the service moves payloads over 64 KB to the blob store; an item that is
still too large is refused with BackendRefused.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Self
from urllib.parse import urlsplit

from botocore.exceptions import ClientError

from sdasync.awsclient import aws_client, error_code, translate_errors
from sdasync.backends.aws.dynamo_items import (
    CHANGE_ATTRS,
    EXPIRES_AT,
    INDEX_ALL,
    INDEX_STATUS,
    KEY,
    LIST_ALL_ATTR,
    LIST_ALL_VALUE,
    LIST_KEY,
    conflict_message,
    decode_cursor,
    encode_change,
    encode_cursor,
    expires_at,
    item_to_task,
    task_to_item,
    transition_condition,
    update_expression,
)
from sdasync.backends.base import TaskPage, check_changes, check_transition
from sdasync.errors import BackendError, BackendRefused, ConfigError, RequestError, TaskConflict, TaskNotFound
from sdasync.models import Task, TaskStatus
from sdasync.urls import query_params

MAX_LIMIT = 1000
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{3,255}")
#: index name -> (partition attribute, sort attribute)
INDEXES: Mapping[str, tuple[str, str]] = {INDEX_ALL: (LIST_ALL_ATTR, LIST_KEY), INDEX_STATUS: ("status", LIST_KEY)}


class DynamoTaskStore:
    """Tasks in a DynamoDB table; see the module docstring for the URL and the item layout."""

    capabilities: frozenset[str] = frozenset({"list", "cas", "ttl"})

    def __init__(self, *, table: str, region: str | None = None, retention_days: float = 30, client: Any = None,
                 clock: Callable[[], float] = time.time, ensure_timeout_s: float = 600.0) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise ConfigError(f"invalid DynamoDB table name {table!r}: 3-255 characters of A-Z a-z 0-9 _ . -")
        if not retention_days > 0:
            raise ConfigError(f"retention_days must be positive, not {retention_days!r}")
        self.table = table
        self.region = region
        self.retention_s = float(retention_days) * 86400.0
        self._clock = clock
        self._ensure_timeout_s = ensure_timeout_s
        self._client = client
        self._owns_client = client is None
        # boto3 clients are thread-safe; the lock only keeps threads from building two on first use.
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        """Parse ``url`` (no network); ``kwargs`` (e.g. ``client``) go to the constructor."""
        parts = urlsplit(url)
        params = query_params(url, {"region": str, "retention_days": float})
        if parts.path not in {"", "/"}:
            raise ConfigError(f"{url!r}: use dynamodb://<table>, without a path")
        return cls(table=parts.netloc, **params, **kwargs)

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = aws_client("dynamodb", region=self.region)
        return self._client

    # TaskStore -------------------------------------------------------------------------------------------------

    def create(self, task: Task) -> None:
        with _refused():
            item = task_to_item(task, retention_s=self.retention_s)
        old: Mapping[str, Any] | None = None
        with self._call(f"create task {task.task_id}"):
            try:
                self.client.put_item(
                    TableName=self.table, Item=item, ConditionExpression="attribute_not_exists(#key)",
                    ExpressionAttributeNames={"#key": KEY}, ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
            except ClientError as exc:
                if error_code(exc) != "ConditionalCheckFailedException":
                    raise
                old = _response(exc).get("Item") or {}
        if old is not None:
            # ALL_OLD hands back the item that won, atomically; an empty one would mean it vanished meanwhile.
            raise TaskConflict(f"task {task.task_id} already exists", current=item_to_task(old) if old else None)

    def get(self, task_id: str) -> Task:
        with self._call(f"get task {task_id}"):
            # Strongly consistent: a worker reads the task right after the API wrote it.
            response = self.client.get_item(TableName=self.table, Key={KEY: {"S": task_id}}, ConsistentRead=True)
        if "Item" not in response:
            raise TaskNotFound(f"task {task_id} not found")
        return item_to_task(response["Item"])

    def transition(self, task_id: str, *, expected: Collection[TaskStatus], to: TaskStatus,
                   attempt: int | None = None, changes: Mapping[str, Any] | None = None,
                   lease_expired_before: float | None = None) -> Task:
        check_transition(expected, to)
        changes = check_changes(changes)
        now = self._clock()
        sets: dict[str, Any] = {"status": str(TaskStatus(to)), "updatedAt": float(now)}
        removes: list[str] = []
        for field, value in changes.items():
            encoded = encode_change(field, value)
            # REMOVE rather than SET NULL: an unset field is an absent attribute, as create() writes it.
            if encoded is None:
                removes.append(CHANGE_ATTRS[field])
            else:
                sets[CHANGE_ATTRS[field]] = encoded
        if TaskStatus(to).is_terminal or any(TaskStatus(s).is_terminal for s in expected):
            # Retention counts from the end; a redrive restarts it too, lest an old failure expire mid-run.
            sets[EXPIRES_AT] = expires_at(now, self.retention_s)
        with _refused():
            update, names, values = update_expression(sets, removes)
        statuses = sorted({str(TaskStatus(s)) for s in expected})
        condition, condition_names, condition_values = transition_condition(statuses, attempt, lease_expired_before)
        names.update(condition_names)
        values.update(condition_values)

        old: Mapping[str, Any] | None = None
        with self._call(f"transition task {task_id}"):
            try:
                response = self.client.update_item(
                    TableName=self.table, Key={KEY: {"S": task_id}}, UpdateExpression=update,
                    ConditionExpression=condition, ExpressionAttributeNames=names,
                    ExpressionAttributeValues=values, ReturnValues="ALL_NEW",
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
            except ClientError as exc:
                if error_code(exc) != "ConditionalCheckFailedException":
                    raise
                # The item as it was when the condition failed: the same snapshot the condition saw.
                old = _response(exc).get("Item") or {}
        if old is None:
            return item_to_task(response["Attributes"])
        if not old:
            raise TaskNotFound(f"task {task_id} not found")
        current = item_to_task(old)
        raise TaskConflict(conflict_message(current, statuses, attempt, lease_expired_before), current=current)

    def list(self, *, status: TaskStatus | None = None, limit: int = 50, cursor: str | None = None) -> TaskPage:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise RequestError(f"limit must be an integer in 1..{MAX_LIMIT}", field="limit")
        status_value = None if status is None else str(TaskStatus(status))
        if status_value is None:
            index, partition_attr, partition = INDEX_ALL, LIST_ALL_ATTR, LIST_ALL_VALUE
        else:
            index, partition_attr, partition = INDEX_STATUS, "status", status_value
        request: dict[str, Any] = {
            "TableName": self.table, "IndexName": index, "KeyConditionExpression": "#p = :p",
            "ExpressionAttributeNames": {"#p": partition_attr}, "ExpressionAttributeValues": {":p": {"S": partition}},
            "ScanIndexForward": False,  # newest first
        }
        if cursor is not None:
            sort_key, task_id = decode_cursor(cursor, status_value)
            request["ExclusiveStartKey"] = {
                KEY: {"S": task_id}, partition_attr: {"S": partition}, LIST_KEY: {"S": sort_key},
            }
        items: list[Mapping[str, Any]] = []
        with self._call(f"list tasks (index {index})"):
            # One more than asked tells whether a next page exists, so next_cursor is None exactly on the last
            # page (a LastEvaluatedKey alone may point past the end). A Query stops at 1 MB, hence the loop.
            while len(items) <= limit:
                try:
                    response = self.client.query(**request, Limit=limit + 1 - len(items))
                except ClientError as exc:
                    # AWS says ValidationException ("does not have the specified index"), moto ResourceNotFound.
                    if error_code(exc) in {"ValidationException", "ResourceNotFoundException"} and index in str(exc):
                        raise ConfigError(f"DynamoDB table {self.table!r} lacks the index {index!r} that listing "
                                          f"needs: run `sdasync aws bootstrap` ({exc})") from exc
                    raise
                items.extend(response.get("Items", []))
                if "LastEvaluatedKey" not in response:
                    break
                request["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        tasks = [item_to_task(item) for item in items[:limit]]
        next_cursor = None
        if len(items) > limit:
            last = tasks[-1]
            next_cursor = encode_cursor(items[limit - 1][LIST_KEY]["S"], last.task_id, status_value)
        return TaskPage(tasks=tasks, next_cursor=next_cursor)

    # Setup -----------------------------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the table, its listing indexes and TTL where missing, waiting until all are ACTIVE. Idempotent:
        on a ready table it only reads. Raises ConfigError when an index of the same name has other keys or TTL is
        on another attribute (a table has one TTL attribute), BackendError (also when the wait times out)."""
        deadline = time.monotonic() + self._ensure_timeout_s
        with self._call(f"ensure table {self.table}"):
            description = self._describe()
            if description is None:
                self._create_table()
                description = self._wait_active(deadline)
            existing = {index["IndexName"]: index for index in description.get("GlobalSecondaryIndexes", [])}
            for name, keys in INDEXES.items():
                if name in existing:
                    schema = {key["KeyType"]: key["AttributeName"] for key in existing[name]["KeySchema"]}
                    if (schema.get("HASH"), schema.get("RANGE")) != keys:
                        raise ConfigError(f"table {self.table!r} has an index {name!r} keyed on {schema}, not {keys}")
                    continue
                # A table made by hand (the original README: taskId only). DynamoDB adds one index per UpdateTable
                # and backfills it from the items, which already carry the key attributes.
                self._wait_active(deadline)
                self._add_index(name, description)
                description = self._wait_active(deadline)
            self._ensure_ttl()

    def _describe(self) -> dict[str, Any] | None:
        try:
            table: dict[str, Any] = self.client.describe_table(TableName=self.table)["Table"]
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return None
            raise
        return table

    def _create_table(self) -> None:
        try:
            self.client.create_table(
                TableName=self.table, BillingMode="PAY_PER_REQUEST",
                KeySchema=[{"AttributeName": KEY, "KeyType": "HASH"}],
                AttributeDefinitions=_attribute_definitions(),
                GlobalSecondaryIndexes=[_index_spec(name) for name in INDEXES],
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceInUseException":  # another process created it first: fine
                raise

    def _add_index(self, name: str, description: Mapping[str, Any]) -> None:
        spec = _index_spec(name)
        if description.get("BillingModeSummary", {}).get("BillingMode") != "PAY_PER_REQUEST":
            # A provisioned table (the console's default) needs capacity for the index too: mirror the table's.
            throughput = description.get("ProvisionedThroughput", {})
            spec["ProvisionedThroughput"] = {
                "ReadCapacityUnits": max(1, int(throughput.get("ReadCapacityUnits") or 1)),
                "WriteCapacityUnits": max(1, int(throughput.get("WriteCapacityUnits") or 1)),
            }
        try:
            self.client.update_table(TableName=self.table, AttributeDefinitions=_attribute_definitions(),
                                     GlobalSecondaryIndexUpdates=[{"Create": spec}])
        except ClientError as exc:
            # Another process added it first: waiting for it is all that is left. (Another process adding some
            # other index is a LimitExceededException: retryable, and ensure() is safe to run again.)
            code = error_code(exc)
            if not (code == "ResourceInUseException" or (code == "ValidationException" and "exists" in str(exc))):
                raise

    def _wait_active(self, deadline: float) -> dict[str, Any]:
        """Poll until the table and all its indexes are ACTIVE (and backfilled); the description then."""
        delay = 0.05
        while True:
            description = self._describe()
            if description is not None and description.get("TableStatus") == "ACTIVE" and all(
                    index.get("IndexStatus") == "ACTIVE" and not index.get("Backfilling")
                    for index in description.get("GlobalSecondaryIndexes", [])):
                return description
            if time.monotonic() + delay > deadline:
                raise BackendError(f"table {self.table!r} is not ACTIVE after {self._ensure_timeout_s:g} s "
                                   f"(status {None if description is None else description.get('TableStatus')})")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _ensure_ttl(self) -> None:
        ttl = self.client.describe_time_to_live(TableName=self.table).get("TimeToLiveDescription", {})
        state, attribute = ttl.get("TimeToLiveStatus"), ttl.get("AttributeName")
        if state in {"ENABLED", "ENABLING"}:
            if attribute != EXPIRES_AT:
                raise ConfigError(f"table {self.table!r} expires items by {attribute!r}; sdasync needs TTL on "
                                  f"{EXPIRES_AT!r} (a table has one TTL attribute)")
            return
        try:
            self.client.update_time_to_live(
                TableName=self.table, TimeToLiveSpecification={"Enabled": True, "AttributeName": EXPIRES_AT})
        except ClientError as exc:
            if error_code(exc) != "ValidationException" or "already enabled" not in str(exc).lower():
                raise

    # Lifecycle -------------------------------------------------------------------------------------------------

    def close(self) -> None:
        if not self._owns_client:
            return  # a client we were given is its owner's to close
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _call(self, action: str) -> Iterator[None]:
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
def _refused() -> Iterator[None]:
    """Values DynamoDB cannot hold (NaN, 40-digit numbers, objects) are a refusal, not a retryable failure."""
    try:
        yield
    except ValueError as exc:
        raise BackendRefused(str(exc)) from exc


def _attribute_definitions() -> list[dict[str, str]]:
    # Only key attributes are declared: DynamoDB is schemaless for the rest.
    return [{"AttributeName": name, "AttributeType": "S"} for name in (KEY, LIST_ALL_ATTR, LIST_KEY, "status")]


def _index_spec(name: str) -> dict[str, Any]:
    partition, sort = INDEXES[name]
    return {
        "IndexName": name,
        "KeySchema": [{"AttributeName": partition, "KeyType": "HASH"}, {"AttributeName": sort, "KeyType": "RANGE"}],
        # ALL: a page of tasks is one Query, with no GetItem per task; the items are small.
        "Projection": {"ProjectionType": "ALL"},
    }


def _response(exc: ClientError) -> dict[str, Any]:
    # ReturnValuesOnConditionCheckFailure puts the current item next to the error, untyped in the stubs.
    response: dict[str, Any] = dict(exc.response)
    return response
