"""Rows of the ``tasks`` table <-> ``Task``, and the store's listing cursors: the SQLite store's plain data half.

JSON-valued fields are compact JSON text (``json.dumps`` keeps ``1.0`` a float and ``1`` an int). ``outbox_due``
is not a field of its own: it repeats ``outbox.due_at`` (NULL when there is no outbox or it is settled) so that a
partial index holds exactly the tasks with a webhook delivery due, and every write of ``outbox`` writes it too.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

from sdasync.backends.cursor import decode_cursor, encode_cursor
from sdasync.errors import RequestError
from sdasync.models import Api, Task, TaskError, TaskStatus, plain_field
from sdasync.outbox import Outbox

COLUMNS = ("task_id", "api", "payload", "status", "created_at", "updated_at", "started_at", "finished_at",
           "attempts", "images", "info", "error", "progress", "worker", "extra", "lease_until", "history", "tenant",
           "outbox", "outbox_due")
SELECT = f"SELECT {', '.join(COLUMNS)} FROM tasks"
INSERT = (f"INSERT INTO tasks ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
          " ON CONFLICT (task_id) DO NOTHING")
# The stored outbox is compared inside the UPDATE (json_extract), not read first: two dispatchers that both saw
# the same outbox are ordered by the write lock, and the second one's WHERE no longer matches.
UPDATE_OUTBOX = ("UPDATE tasks SET outbox = ?, outbox_due = ? WHERE task_id = ?"
                 " AND json_extract(outbox, '$.event_id') = ? AND json_extract(outbox, '$.version') = ?")
DUE_OUTBOX = f"{SELECT} WHERE outbox_due IS NOT NULL AND outbox_due < ? ORDER BY outbox_due, task_id LIMIT ?"

#: Fields kept as JSON text; the others are plain columns.
_JSON_FIELDS = frozenset({"images", "error", "info", "progress", "history", "outbox"})


def fetch(conn: sqlite3.Connection, task_id: str) -> Task | None:
    row = conn.execute(f"{SELECT} WHERE task_id = ?", (task_id,)).fetchone()
    return None if row is None else decode_task(row)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def encode_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """The column assignments of a transition's ``changes``. Raises ValueError for a value of the wrong shape."""
    columns: dict[str, Any] = {}
    for name, value in changes.items():
        plain = plain_field(name, value)
        columns[name] = _json(plain) if name in _JSON_FIELDS else plain
        if name == "outbox":
            columns["outbox_due"] = None if plain is None else plain["due_at"]
    return columns


def encode_outbox(outbox: Outbox) -> tuple[str | None, float | None]:
    """The ``outbox`` and ``outbox_due`` columns of an outbox."""
    plain = plain_field("outbox", outbox)
    return _json(plain), outbox.due_at


def encode_task(task: Task) -> tuple[Any, ...]:
    outbox, outbox_due = (None, None) if task.outbox is None else encode_outbox(task.outbox)
    return (
        task.task_id, str(Api(task.api)), _json(task.payload), str(TaskStatus(task.status)), task.created_at,
        task.updated_at, task.started_at, task.finished_at, task.attempts, _json(plain_field("images", task.images)),
        _json(plain_field("info", task.info)), _json(plain_field("error", task.error)),
        _json(plain_field("progress", task.progress)), task.worker, _json(task.extra), task.lease_until,
        _json(plain_field("history", task.history)), task.tenant, outbox, outbox_due,
    )


def decode_task(row: tuple[Any, ...]) -> Task:
    (task_id, api, payload, status, created_at, updated_at, started_at, finished_at, attempts, images, info, error,
     progress, worker, extra, lease_until, history, tenant, outbox, _outbox_due) = row
    return Task(
        task_id=task_id,
        api=Api(api),
        payload=json.loads(payload),
        status=TaskStatus(status),
        created_at=created_at,
        updated_at=updated_at,
        started_at=started_at,
        finished_at=finished_at,
        attempts=attempts,
        images=tuple(json.loads(images)),
        info=None if info is None else json.loads(info),
        error=None if error is None else TaskError.from_dict(json.loads(error)),
        progress=None if progress is None else json.loads(progress),
        worker=worker,
        extra=json.loads(extra),
        lease_until=lease_until,
        history=tuple(json.loads(history)),
        tenant=tenant,
        outbox=None if outbox is None else json.loads(outbox),
    )


def encode_cursor_of(task: Task, status: str | None, tenant: str | None) -> str:
    return encode_cursor({"c": task.created_at, "t": task.task_id, "s": status, "n": tenant})


def decode_list_cursor(cursor: str, status: str | None, tenant: str | None) -> tuple[float, str]:
    """The position a cursor names. Raises RequestError for anything this store did not hand out."""
    created_at, task_id, cursor_status, cursor_tenant = decode_cursor(cursor, ("c", "t", "s", "n"))
    if (isinstance(created_at, bool) or not isinstance(created_at, int | float) or not isinstance(task_id, str)
            or cursor_status != status or cursor_tenant != tenant):
        # A cursor from a listing with another filter would silently skip or repeat tasks, and one from another
        # tenant's listing would tell this tenant where that one's tasks are.
        raise RequestError("invalid cursor (or one from a listing with another status or tenant)", field="cursor")
    return float(created_at), task_id
