"""The task store in a DynamoDB table.

URL: ``dynamodb://<table>?region=<region>``

- ``table``: the table name (3-255 characters of ``A-Z a-z 0-9 _ . -``), e.g. ``dynamodb://sd_tasks``.
- ``region``: overrides the region of the standard AWS chain (``AWS_REGION``, shared config, instance metadata).

How long a task is kept is the one retention setting of every backend (``--retention-days``, default 30), given
to ``from_url`` as the ``retention_days`` keyword; DynamoDB's TTL deletes the task afterwards (capability
``expires``: the janitor leaves this store alone). The URL's former ``retention_days`` parameter is refused with a
word on the setting, so two retentions can never disagree.

Items are plain attributes under the partition key ``taskId`` (string), the key the original README creates by
hand, so such a table works for create / get / transition as it is: ``api``, ``status``, ``payload`` (a map),
``createdAt`` / ``updatedAt`` / ``startedAt`` / ``finishedAt`` (epoch seconds), ``attempts``, ``images`` (a list of
blob keys), ``info`` / ``progress`` / ``extra`` (maps), ``error`` (a map ``{code, message}``), ``worker``,
``leaseUntil`` (epoch seconds), ``history`` (a list of maps, one per finished attempt), ``<field>Floats`` (which
numbers of a free-form field are floats, see ``dynamo_items``), ``expiresAt`` (the TTL: creation + retention,
restarted when the task reaches a terminal state, so a finished task stays readable for the whole retention, and
when an operator's redrive takes it out of one), and the index keys below. Optional fields that are unset are
absent. A task reads back equal to the one written, type for type (``1.0`` stays a float, ``1`` an int).

The same table holds the worker registry (``put_worker`` / ``workers``), under keys ``worker#<id>`` that no task
id can take and that no task listing or ``stale`` ever returns; see ``dynamo_workers``.

Listing uses two global secondary indexes, both with projection ALL (a page is one Query, no GetItem per task):

- ``byCreated``: partition ``listAll`` (always ``"tasks"``), sort ``listKey`` = ``f"{createdAt:020.6f}#{taskId}"``;
- ``byStatus``: partition ``status``, sort ``listKey``: a transition moves the task between partitions by itself.

``stale`` queries a third, keys-only index ``byUpdated`` (partition ``status``, sort ``updatedAt``), then reads the
tasks it names strongly (BatchGetItem) and keeps those that still match.

The constant ``listAll`` partition is deliberate: newest-first over all tasks is then one Query, in order. Its cost
is a hot partition: every task write also writes that one index partition, which takes about 1,000 writes/s
before it throttles (and an index that throttles throttles the table). Image generation runs at a few tasks per
second per GPU, far below that. If it ever matters, shard it: ``listAll = f"tasks#{crc32(taskId) % N}"`` and merge
N Queries by ``listKey`` (the cursor then holds N positions). ``byStatus`` has the same shape per status.

Consistency: ``get`` reads strongly (a worker claims a task right after the API wrote it), and ``transition`` is
one UpdateItem with a ConditionExpression, so it is a compare-and-set. Index reads are eventually consistent on
AWS: a task created a moment ago may be missing from ``list`` (or appear with its previous status) for a short
while; moto is consistent. ``ensure()`` (``sdasync aws bootstrap``) creates the table with its three indexes and
TTL, and adds what is missing to an existing table (one made by hand, or by a version before ``byUpdated``): see
``dynamo_setup``. Without the indexes ``list``, ``stale`` and ``workers`` raise ConfigError.

Items are bounded by DynamoDB's 400 KB: the service moves payloads over 64 KB to the payload store; an item that
is still too large is refused with BackendRefused.
"""

from __future__ import annotations

import builtins
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from botocore.exceptions import ClientError

from sdasync.awsclient import aws_client, error_code, translate_errors
from sdasync.backends.aws.dynamo_items import (
    CHANGE_ATTRS,
    EXPIRES_AT,
    FREE_FORM_ATTRS,
    INDEX_ALL,
    INDEX_STATUS,
    INDEX_UPDATED,
    KEY,
    LIST_ALL_ATTR,
    LIST_ALL_VALUE,
    LIST_KEY,
    UPDATED_AT,
    conflict_message,
    decode_cursor,
    encode_change,
    encode_cursor,
    expires_at,
    free_form,
    item_to_task,
    serialize,
    task_to_item,
    transition_condition,
    update_expression,
)
from sdasync.backends.aws.dynamo_queries import batch_get, query_items
from sdasync.backends.aws.dynamo_setup import ensure_table
from sdasync.backends.aws.dynamo_workers import (
    WORKERS_PARTITION,
    is_worker_key,
    item_to_worker,
    worker_key,
    worker_to_item,
)
from sdasync.backends.base import TaskPage, check_changes, check_transition
from sdasync.errors import BackendRefused, ConfigError, RequestError, TaskConflict, TaskNotFound
from sdasync.models import TERMINAL, Task, TaskStatus, WorkerRecord
from sdasync.urls import query_params

MAX_LIMIT = 1000
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{3,255}")


class DynamoTaskStore:
    """Tasks in a DynamoDB table; see the module docstring for the URL and the item layout."""

    #: ``expires``: TTL deletes tasks past the retention by itself (the janitor skips this store).
    capabilities: frozenset[str] = frozenset({"list", "cas", "ttl", "expires"})

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
        """Parse ``url`` (no network); ``kwargs`` (e.g. ``retention_days``, ``client``) go to the constructor."""
        parts = urlsplit(url)
        if "retention_days" in parse_qs(parts.query):
            raise ConfigError(f"{url!r}: retention_days is no longer a URL parameter; set --retention-days "
                              f"(SDASYNC_RETENTION_DAYS), the one retention of every backend")
        params = query_params(url, {"region": str})
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
        if is_worker_key(task.task_id):
            raise BackendRefused(f"task id {task.task_id!r} is reserved for the worker registry")
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
        if is_worker_key(task_id):
            raise TaskNotFound(f"task {task_id} not found")
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
        if is_worker_key(task_id):
            raise TaskNotFound(f"task {task_id} not found")
        now = self._clock()
        sets: dict[str, Any] = {"status": str(TaskStatus(to)), UPDATED_AT: float(now)}
        removes: list[str] = []
        for field, value in changes.items():
            encoded = encode_change(field, value)
            if field in FREE_FORM_ATTRS:
                # The field and its float sidecar change together (see dynamo_items).
                field_sets, field_removes = free_form(CHANGE_ATTRS[field], encoded)
                sets.update(field_sets)
                removes.extend(field_removes)
            # REMOVE rather than SET NULL: an unset field is an absent attribute, as create() writes it.
            elif encoded is None:
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
        with self._call(f"list tasks (index {index})"):
            # One more than asked tells whether a next page exists, so next_cursor is None exactly on the last
            # page (a LastEvaluatedKey alone may point past the end).
            items = query_items(self.client, request, limit=limit + 1)
        tasks = [item_to_task(item) for item in items[:limit]]
        next_cursor = None
        if len(items) > limit:
            last = tasks[-1]
            next_cursor = encode_cursor(items[limit - 1][LIST_KEY]["S"], last.task_id, status_value)
        return TaskPage(tasks=tasks, next_cursor=next_cursor)

    def stale(self, *, status: TaskStatus, updated_before: float, limit: int = 100) -> builtins.list[Task]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be an integer in 1..{MAX_LIMIT}")
        status_value = str(TaskStatus(status))
        request: dict[str, Any] = {
            "TableName": self.table, "IndexName": INDEX_UPDATED, "KeyConditionExpression": "#p = :p AND #u < :u",
            "ExpressionAttributeNames": {"#p": "status", "#u": UPDATED_AT},
            "ExpressionAttributeValues": {":p": {"S": status_value}, ":u": serialize(float(updated_before))},
            "ScanIndexForward": True,  # oldest first
        }
        with self._call(f"list stale {status_value} tasks (index {INDEX_UPDATED})"):
            keys = query_items(self.client, request, limit=limit)
            items = batch_get(self.client, self.table, [key[KEY]["S"] for key in keys])
        tasks = [item_to_task(item) for item in items]
        # The index lags the table on AWS: keep only what a strong read still finds stale.
        found = [task for task in tasks if task.status == status_value and task.updated_at < updated_before]
        return sorted(found, key=lambda task: (task.updated_at, task.task_id))

    def delete(self, task_id: str, *, finished_before: float | None = None) -> bool:
        if is_worker_key(task_id):
            return False  # not a task: a registry record is removed by remove_worker only
        request: dict[str, Any] = {"TableName": self.table, "Key": {KEY: {"S": task_id}}, "ReturnValues": "ALL_OLD"}
        if finished_before is not None:
            terminal = sorted(str(s) for s in TERMINAL)
            request.update(
                ConditionExpression=f"#u < :u AND #s IN ({', '.join(f':s{i}' for i in range(len(terminal)))})",
                ExpressionAttributeNames={"#u": UPDATED_AT, "#s": "status"},
                ExpressionAttributeValues={":u": serialize(float(finished_before)),
                                           **{f":s{i}": {"S": s} for i, s in enumerate(terminal)}})
        with self._call(f"delete task {task_id}"):
            try:
                response = self.client.delete_item(**request)
            except ClientError as exc:
                if error_code(exc) != "ConditionalCheckFailedException":
                    raise
                return False
        return bool(response.get("Attributes"))

    # Worker registry -------------------------------------------------------------------------------------------

    def put_worker(self, record: WorkerRecord) -> None:
        with _refused():
            item = worker_to_item(record)
        with self._call(f"put worker record {record.worker_id}"):
            self.client.put_item(TableName=self.table, Item=item)

    def workers(self, *, now: float | None = None) -> builtins.list[WorkerRecord]:
        now = self._clock() if now is None else now
        request: dict[str, Any] = {
            "TableName": self.table, "IndexName": INDEX_ALL, "KeyConditionExpression": "#p = :p",
            "ExpressionAttributeNames": {"#p": LIST_ALL_ATTR},
            "ExpressionAttributeValues": {":p": {"S": WORKERS_PARTITION}},
        }
        with self._call(f"list worker records (index {INDEX_ALL})"):
            records = [item_to_worker(item) for item in query_items(self.client, request)]
        # TTL deletes expired records late (up to days): leave them out here.
        return sorted((r for r in records if r.expires_at > now), key=lambda r: r.worker_id)

    def remove_worker(self, worker_id: str) -> None:
        with self._call(f"remove worker record {worker_id}"):
            self.client.delete_item(TableName=self.table, Key=worker_key(worker_id))

    # Setup -----------------------------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the table, its indexes and TTL where missing (see ``dynamo_setup``), waiting until all are
        ACTIVE. Idempotent: on a ready table it only reads. Raises ConfigError when an index of the same name has
        other keys or TTL is on another attribute (a table has one TTL attribute), BackendError (also when the
        wait times out)."""
        with self._call(f"ensure table {self.table}"):
            ensure_table(self.client, self.table, timeout_s=self._ensure_timeout_s)

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


def _response(exc: ClientError) -> dict[str, Any]:
    # ReturnValuesOnConditionCheckFailure puts the current item next to the error, untyped in the stubs.
    response: dict[str, Any] = dict(exc.response)
    return response
