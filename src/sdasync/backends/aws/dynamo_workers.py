"""Worker registry records <-> DynamoDB items, in the tasks table. Pure: no client, no network.

A record is an item under the key ``taskId = "worker#<workerId>"``: task ids are 32 hex characters (and never hold
a ``#``), so the two cannot collide, and the store answers "not found" for such an id as a task. The item sits in
the ``byCreated`` index under the partition ``listAll = "workers"`` (sort key ``listKey = workerId``), so one Query
lists the registry by worker id, while task listings read only the partition ``"tasks"``. It has no ``status``
attribute, so neither ``byStatus`` nor ``byUpdated`` (``stale``) ever holds it. Attributes: ``workerId``,
``engine``, ``health`` (a map, with the ``healthFloats`` sidecar of ``dynamo_items``), ``currentTask`` (absent when
idle), ``startedAt`` / ``heartbeatAt`` / ``aliveUntil`` (epoch seconds), ``host``, ``pid`` and ``expiresAt``, the
table's TTL attribute: DynamoDB deletes the record of a worker that stopped refreshing it some time after
``aliveUntil`` (TTL runs late, up to days), and ``workers()`` leaves out expired records meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdasync.backends.aws.dynamo_items import (
    EXPIRES_AT,
    KEY,
    LIST_ALL_ATTR,
    LIST_KEY,
    deserialize,
    expires_at,
    free_form,
    restore_floats,
    serialize,
)
from sdasync.models import EngineHealth, WorkerRecord

#: Key prefix of worker records; task ids never contain ``#``.
WORKER_PREFIX = "worker#"
#: The ``listAll`` partition of the ``byCreated`` index that holds the registry.
WORKERS_PARTITION = "workers"


def is_worker_key(task_id: str) -> bool:
    return task_id.startswith(WORKER_PREFIX)


def worker_key(worker_id: str) -> dict[str, Any]:
    return {KEY: {"S": WORKER_PREFIX + worker_id}}


def worker_to_item(record: WorkerRecord) -> dict[str, Any]:
    """The item for ``record``, in typed form. Raises ValueError for an empty worker id (an index key cannot be
    empty) or values DynamoDB cannot hold."""
    if not record.worker_id:
        raise ValueError("a worker record needs a worker id")
    plain: dict[str, Any] = {
        KEY: WORKER_PREFIX + record.worker_id,
        LIST_ALL_ATTR: WORKERS_PARTITION,
        LIST_KEY: record.worker_id,
        "workerId": record.worker_id,
        "engine": record.engine,
        "startedAt": float(record.started_at),
        "heartbeatAt": float(record.heartbeat_at),
        "aliveUntil": float(record.expires_at),
        "host": record.host,
        "pid": int(record.pid),
        EXPIRES_AT: expires_at(record.expires_at, 0.0),
    }
    plain.update(free_form("health", record.health.to_dict())[0])
    if record.task_id is not None:
        plain["currentTask"] = record.task_id
    return {name: serialize(value) for name, value in plain.items()}


def item_to_worker(item: Mapping[str, Any]) -> WorkerRecord:
    """A WorkerRecord from a typed item. Raises KeyError or ValueError for an item that is not one."""
    plain = {name: deserialize(value) for name, value in item.items()}
    health = restore_floats(plain.get("health") or {}, plain.get("healthFloats"))
    task_id = plain.get("currentTask")
    return WorkerRecord(
        worker_id=str(plain["workerId"]),
        engine=str(plain.get("engine", "")),
        health=EngineHealth.from_dict(health),
        task_id=None if task_id is None else str(task_id),
        started_at=float(plain["startedAt"]),
        heartbeat_at=float(plain["heartbeatAt"]),
        expires_at=float(plain["aliveUntil"]),
        host=str(plain.get("host", "")),
        pid=int(plain.get("pid", 0)),
    )
