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
``leaseUntil`` (epoch seconds), ``history`` (a list of maps, one per finished attempt), ``tenant`` (``"-"`` for
tenant "") and ``tenantStatus`` (see ``dynamo_tenants``), ``outbox`` (a map) with the due index's ``outboxPart`` /
``outboxDue`` (see ``dynamo_outbox``), ``<field>Floats`` (which numbers of a free-form field are floats, see
``dynamo_items``), ``expiresAt`` (the TTL: creation + retention, restarted when the task reaches a terminal state,
so a finished task stays readable for the whole retention, and when an operator's redrive takes it out of one),
and the index keys below. Optional fields that are unset are
absent. A task reads back equal to the one written, type for type (``1.0`` stays a float, ``1`` an int).

The same table holds the worker registry (``put_worker`` / ``workers``) and the records (``RecordStore``), under
keys ``worker#<id>`` and ``rec#<kind>#<key>`` that no task id can take and that no task read, listing, ``stale`` or
``due_outbox`` ever returns; see ``dynamo_workers`` and ``dynamo_records``.

Listing uses global secondary indexes with projection ALL (a page is one Query, no GetItem per task):

- ``byCreated``: partition ``listAll`` (always ``"tasks"``), sort ``listKey`` = ``f"{createdAt:020.6f}#{taskId}"``;
- ``byStatus``: partition ``status``, sort ``listKey``: a transition moves the task between partitions by itself;
- ``byTenant`` / ``byTenantStatus``: the same, within one tenant (``list(tenant=...)``; see ``dynamo_tenants``).

``stale`` queries a third, keys-only index ``byUpdated`` (partition ``status``, sort ``updatedAt``), then reads the
tasks it names strongly (BatchGetItem) and keeps those that still match.

The constant ``listAll`` partition is deliberate: newest-first over all tasks is then one Query, in order. Its cost
is a hot partition: every task write also writes that one index partition, which takes about 1,000 writes/s
before it throttles (and an index that throttles throttles the table). Image generation runs at a few tasks per
second per GPU, far below that. If it ever matters, shard it: ``listAll = f"tasks#{crc32(taskId) % N}"`` and merge
N Queries by ``listKey`` (the cursor then holds N positions). ``byStatus`` has the same shape per status. The API's
tenant listings read the tenant indexes, whose partitions are one per tenant.

Consistency: ``get`` reads strongly (a worker claims a task right after the API wrote it), and ``transition`` is
one UpdateItem with a ConditionExpression, so it is a compare-and-set. Index reads are eventually consistent on
AWS: a task created a moment ago may be missing from ``list`` (or appear with its previous status) for a short
while; moto is consistent. ``ensure()`` (``sdasync aws bootstrap``) creates the table with its six indexes and
TTL, and adds what is missing to an existing table (one made by hand, or by an older version): see
``dynamo_setup``. Without the indexes ``list``, ``stale``, ``due_outbox``, ``workers`` and ``list_records`` raise
ConfigError.

Items are bounded by DynamoDB's 400 KB: the service moves payloads over 64 KB to the payload store; an item that
is still too large is refused with BackendRefused.
"""

from __future__ import annotations

import builtins
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from botocore.exceptions import ClientError

from sdasync.awsclient import aws_client, error_code
from sdasync.backends.aws.dynamo_calls import dynamo_call, failed_item, refused
from sdasync.backends.aws.dynamo_items import (
    EXPIRES_AT,
    INDEX_ALL,
    INDEX_OUTBOX,
    INDEX_UPDATED,
    KEY,
    LIST_ALL_ATTR,
    LIST_KEY,
    UPDATED_AT,
    change_attrs,
    conflict_message,
    decode_cursor,
    encode_cursor,
    expires_at,
    item_to_task,
    serialize,
    task_to_item,
    tenant_token,
    transition_condition,
    update_expression,
)
from sdasync.backends.aws.dynamo_outbox import due_outbox, update_outbox
from sdasync.backends.aws.dynamo_queries import query_items, stale_tasks
from sdasync.backends.aws.dynamo_records import delete_record, get_record, is_reserved_key, list_records, put_record
from sdasync.backends.aws.dynamo_setup import ensure_table
from sdasync.backends.aws.dynamo_tenants import (
    TenantCache,
    listing_index,
    read_token,
    tenant_condition,
    tenant_sets,
    token_of_item,
)
from sdasync.backends.aws.dynamo_workers import WORKERS_PARTITION, item_to_worker, worker_key, worker_to_item
from sdasync.backends.base import TaskPage, check_changes, check_transition
from sdasync.backends.records import Record, RecordPage
from sdasync.errors import BackendRefused, ConfigError, RequestError, TaskConflict, TaskNotFound
from sdasync.models import TERMINAL, Task, TaskStatus, WorkerRecord
from sdasync.outbox import Outbox
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
        self._tenants = TenantCache()

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
        if is_reserved_key(task.task_id):
            raise BackendRefused(f"task id {task.task_id!r} is reserved for the worker registry and records")
        with refused():
            item = task_to_item(task, retention_s=self.retention_s)
        old: Mapping[str, Any] | None = None
        with dynamo_call(f"create task {task.task_id}"):
            try:
                self.client.put_item(
                    TableName=self.table, Item=item, ConditionExpression="attribute_not_exists(#key)",
                    ExpressionAttributeNames={"#key": KEY}, ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
            except ClientError as exc:
                if error_code(exc) != "ConditionalCheckFailedException":
                    raise
                old = failed_item(exc)
        if old is not None:
            # ALL_OLD hands back the item that won, atomically; an empty one would mean it vanished meanwhile.
            raise TaskConflict(f"task {task.task_id} already exists", current=self._task(old) if old else None)
        self._tenants.put(task.task_id, tenant_token(task.tenant))

    def get(self, task_id: str) -> Task:
        if is_reserved_key(task_id):
            raise TaskNotFound(f"task {task_id} not found")
        with dynamo_call(f"get task {task_id}"):
            # Strongly consistent: a worker reads the task right after the API wrote it.
            response = self.client.get_item(TableName=self.table, Key={KEY: {"S": task_id}}, ConsistentRead=True)
        if "Item" not in response:
            raise TaskNotFound(f"task {task_id} not found")
        return self._task(response["Item"])

    def transition(self, task_id: str, *, expected: Collection[TaskStatus], to: TaskStatus,
                   attempt: int | None = None, changes: Mapping[str, Any] | None = None,
                   lease_expired_before: float | None = None) -> Task:
        check_transition(expected, to)
        changes = check_changes(changes)
        if is_reserved_key(task_id):
            raise TaskNotFound(f"task {task_id} not found")
        now = self._clock()
        change_sets, removes = change_attrs(changes)
        sets: dict[str, Any] = {"status": str(TaskStatus(to)), UPDATED_AT: float(now), **change_sets}
        if TaskStatus(to).is_terminal or any(TaskStatus(s).is_terminal for s in expected):
            # Retention counts from the end; a redrive restarts it too, lest an old failure expire mid-run.
            sets[EXPIRES_AT] = expires_at(now, self.retention_s)
        statuses = sorted({str(TaskStatus(s)) for s in expected})
        condition = transition_condition(statuses, attempt, lease_expired_before)

        def write(token: str) -> Task | dict[str, Any]:
            return self._update(task_id, {**sets, **tenant_sets(token, str(TaskStatus(to)))}, removes,
                                [condition, tenant_condition(token)])

        token = self._tenant_of(task_id)
        old = write(token)
        if isinstance(old, dict) and old and token_of_item(old) != token:
            # A stale cache entry (the id was reused by another tenant): once more, with the tenant it has.
            old = write(token_of_item(old))
        if isinstance(old, Task):
            return old
        if not old:
            raise TaskNotFound(f"task {task_id} not found")
        current = self._task(old)
        raise TaskConflict(conflict_message(current, statuses, attempt, lease_expired_before), current=current)

    def _update(self, task_id: str, sets: Mapping[str, Any], removes: builtins.list[str],
                conditions: builtins.list[tuple[str, dict[str, str], dict[str, Any]]]) -> Task | dict[str, Any]:
        """One conditional UpdateItem: the task written, or the item as the failed condition saw it ({}: none)."""
        with refused():
            update, names, values = update_expression(sets, removes)
        for _, condition_names, condition_values in conditions:
            names.update(condition_names)
            values.update(condition_values)
        with dynamo_call(f"transition task {task_id}"):
            try:
                response = self.client.update_item(
                    TableName=self.table, Key={KEY: {"S": task_id}}, UpdateExpression=update,
                    ConditionExpression=" AND ".join(condition for condition, _, _ in conditions),
                    ExpressionAttributeNames=names, ExpressionAttributeValues=values, ReturnValues="ALL_NEW",
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
            except ClientError as exc:
                if error_code(exc) != "ConditionalCheckFailedException":
                    raise
                # The item as it was when the condition failed: the same snapshot the condition saw.
                return failed_item(exc)
        return self._task(response["Attributes"])

    def _tenant_of(self, task_id: str) -> str:
        """The task's tenant token, remembered or read (see dynamo_tenants). Raises TaskNotFound."""
        token = self._tenants.get(task_id)
        if token is None:
            with dynamo_call(f"get task {task_id}"):
                token = read_token(self.client, self.table, task_id)
            if token is None:
                raise TaskNotFound(f"task {task_id} not found")
            self._tenants.put(task_id, token)
        return token

    def _task(self, item: Mapping[str, Any]) -> Task:
        task = item_to_task(item)
        self._tenants.put(task.task_id, token_of_item(item))
        return task

    def list(self, *, status: TaskStatus | None = None, limit: int = 50, cursor: str | None = None,
             tenant: str | None = None) -> TaskPage:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise RequestError(f"limit must be an integer in 1..{MAX_LIMIT}", field="limit")
        status_value = None if status is None else str(TaskStatus(status))
        index, partition_attr, partition = listing_index(status_value, tenant)
        request: dict[str, Any] = {
            "TableName": self.table, "IndexName": index, "KeyConditionExpression": "#p = :p",
            "ExpressionAttributeNames": {"#p": partition_attr}, "ExpressionAttributeValues": {":p": {"S": partition}},
            "ScanIndexForward": False,  # newest first
        }
        if cursor is not None:
            sort_key, task_id = decode_cursor(cursor, status_value, tenant)
            request["ExclusiveStartKey"] = {
                KEY: {"S": task_id}, partition_attr: {"S": partition}, LIST_KEY: {"S": sort_key},
            }
        with dynamo_call(f"list tasks (index {index})"):
            # One more than asked tells whether a next page exists, so next_cursor is None exactly on the last
            # page (a LastEvaluatedKey alone may point past the end).
            items = query_items(self.client, request, limit=limit + 1)
        tasks = [self._task(item) for item in items[:limit]]
        next_cursor = None
        if len(items) > limit:
            last = tasks[-1]
            next_cursor = encode_cursor(items[limit - 1][LIST_KEY]["S"], last.task_id, status_value, tenant)
        return TaskPage(tasks=tasks, next_cursor=next_cursor)

    def due_outbox(self, *, before: float, limit: int = 100) -> builtins.list[Task]:
        with dynamo_call(f"list due outboxes (index {INDEX_OUTBOX})"):
            return due_outbox(self.client, self.table, before=before, limit=limit)

    def update_outbox(self, task_id: str, outbox: Outbox, *, expected: Outbox) -> Task:
        if is_reserved_key(task_id):
            raise TaskNotFound(f"task {task_id} not found")
        with dynamo_call(f"update the outbox of task {task_id}"), refused():
            return update_outbox(self.client, self.table, task_id, outbox, expected=expected)

    def stale(self, *, status: TaskStatus, updated_before: float, limit: int = 100) -> builtins.list[Task]:
        with dynamo_call(f"list stale {status} tasks (index {INDEX_UPDATED})"):
            return stale_tasks(self.client, self.table, status=status, updated_before=updated_before, limit=limit)

    def delete(self, task_id: str, *, finished_before: float | None = None) -> bool:
        if is_reserved_key(task_id):
            return False  # not a task: registry and records are removed by their own methods only
        request: dict[str, Any] = {"TableName": self.table, "Key": {KEY: {"S": task_id}}, "ReturnValues": "ALL_OLD"}
        if finished_before is not None:
            terminal = sorted(str(s) for s in TERMINAL)
            request.update(
                ConditionExpression=f"#u < :u AND #s IN ({', '.join(f':s{i}' for i in range(len(terminal)))})",
                ExpressionAttributeNames={"#u": UPDATED_AT, "#s": "status"},
                ExpressionAttributeValues={":u": serialize(float(finished_before)),
                                           **{f":s{i}": {"S": s} for i, s in enumerate(terminal)}})
        with dynamo_call(f"delete task {task_id}"):
            try:
                response = self.client.delete_item(**request)
            except ClientError as exc:
                if error_code(exc) != "ConditionalCheckFailedException":
                    raise
                return False
        self._tenants.forget(task_id)
        return bool(response.get("Attributes"))

    # Worker registry -------------------------------------------------------------------------------------------

    def put_worker(self, record: WorkerRecord) -> None:
        with refused():
            item = worker_to_item(record)
        with dynamo_call(f"put worker record {record.worker_id}"):
            self.client.put_item(TableName=self.table, Item=item)

    def workers(self, *, now: float | None = None) -> builtins.list[WorkerRecord]:
        now = self._clock() if now is None else now
        request: dict[str, Any] = {
            "TableName": self.table, "IndexName": INDEX_ALL, "KeyConditionExpression": "#p = :p",
            "ExpressionAttributeNames": {"#p": LIST_ALL_ATTR},
            "ExpressionAttributeValues": {":p": {"S": WORKERS_PARTITION}},
        }
        with dynamo_call(f"list worker records (index {INDEX_ALL})"):
            records = [item_to_worker(item) for item in query_items(self.client, request)]
        # TTL deletes expired records late (up to days): leave them out here.
        return sorted((r for r in records if r.expires_at > now), key=lambda r: r.worker_id)

    def remove_worker(self, worker_id: str) -> None:
        with dynamo_call(f"remove worker record {worker_id}"):
            self.client.delete_item(TableName=self.table, Key=worker_key(worker_id))

    # Records (see dynamo_records) ----------------------------------------------------------------------------------

    def get_record(self, kind: str, key: str) -> Record | None:
        with dynamo_call(f"get record {kind}/{key}"):
            return get_record(self.client, self.table, kind, key, now=self._clock())

    def put_record(self, kind: str, key: str, data: dict[str, Any], *, version: int | None,
                   expires_at: float | None = None) -> Record:
        with dynamo_call(f"put record {kind}/{key}"):
            return put_record(self.client, self.table, kind, key, data, version=version, expires_at=expires_at,
                              now=self._clock())

    def delete_record(self, kind: str, key: str, *, version: int | None = None) -> bool:
        with dynamo_call(f"delete record {kind}/{key}"):
            return delete_record(self.client, self.table, kind, key, version=version, now=self._clock())

    def list_records(self, kind: str, *, limit: int = 100, cursor: str | None = None) -> RecordPage:
        with dynamo_call(f"list records {kind} (index {INDEX_ALL})"):
            return list_records(self.client, self.table, kind, limit=limit, cursor=cursor, now=self._clock())

    # Setup -----------------------------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the table, its indexes and TTL where missing (see ``dynamo_setup``), waiting until all are
        ACTIVE. Idempotent: on a ready table it only reads. Raises ConfigError when an index of the same name has
        other keys or TTL is on another attribute (a table has one TTL attribute), BackendError (also when the
        wait times out)."""
        with dynamo_call(f"ensure table {self.table}"):
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
