"""The task store in a SQLite file (by default the queue's file; the table is ``tasks``).

URL: ``sqlite:///path/to.db`` (three slashes: relative to the working directory; four: absolute). No query
parameters. ``from_url`` takes the service's ``retention_days`` like every store; SQLite does not expire rows by
itself (no capability ``expires``), so the janitor deletes finished tasks past it through ``stale`` and ``delete``.

The same file holds the worker registry (table ``workers``, see ``workers.py``).

Every state change is one ``UPDATE ... WHERE task_id = ? AND status IN (...) [AND attempts = ?] [AND <lease
passed>]`` checked by its row count, inside a ``BEGIN IMMEDIATE`` transaction that also reads the row back, so the
caller gets either the task it wrote or, on a lost compare-and-set, the task as it is now.

A file made by an older version (without ``lease_until``, ``history``, ``tenant``, ``outbox``) is upgraded in place
on first use: ``ADDED_COLUMNS`` are added by ``ALTER TABLE``, which leaves old rows with a NULL lease, an empty
history, no tenant and no outbox, then ``ADDED_INDEXES`` are created. The ``tasks_status_updated`` index and the
``workers`` and ``records`` tables are ``IF NOT EXISTS`` statements of the schema, so an older file gains them on
first use too.

The same file also holds the ``RecordStore`` records (table ``records``, see ``records.py``); row encoding and
listing cursors are in ``task_rows.py``.
"""

from __future__ import annotations

import builtins
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

from sdasync.backends.base import TaskPage, check_changes, check_transition
from sdasync.backends.records import Record, RecordPage, check_record_key, encode_data
from sdasync.backends.sqlite import records as record_rows
from sdasync.backends.sqlite import task_rows as rows
from sdasync.backends.sqlite import workers as worker_rows
from sdasync.backends.sqlite.db import SqliteDatabase
from sdasync.errors import BackendRefused, RequestError, TaskConflict, TaskNotFound
from sdasync.models import TERMINAL, Task, TaskStatus, WorkerRecord
from sdasync.outbox import Outbox
from sdasync.urls import path_from_url, query_params

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS tasks (
        task_id TEXT PRIMARY KEY,
        api TEXT NOT NULL,
        payload TEXT NOT NULL,       -- JSON object
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        images TEXT NOT NULL,        -- JSON list of blob keys
        info TEXT,                   -- JSON object or NULL
        error TEXT,                  -- JSON {"code", "message"} or NULL
        progress TEXT,               -- JSON object or NULL
        worker TEXT,
        extra TEXT NOT NULL,         -- JSON object
        lease_until REAL,
        history TEXT NOT NULL DEFAULT '[]', -- JSON list of attempt records
        tenant TEXT NOT NULL DEFAULT '',    -- '': no tenant (key-less mode); never changed after create
        outbox TEXT,                 -- JSON Outbox or NULL
        outbox_due REAL              -- outbox.due_at, NULL when no delivery is due (see task_rows)
    )
    """,
    # list() walks one of these in order and stops after a page: no sort, whatever the table's size.
    "CREATE INDEX IF NOT EXISTS tasks_newest ON tasks (created_at DESC, task_id DESC)",
    "CREATE INDEX IF NOT EXISTS tasks_status_newest ON tasks (status, created_at DESC, task_id DESC)",
    # stale() walks this one from its oldest entry: the sweeper's and the janitor's queries stay index range scans.
    "CREATE INDEX IF NOT EXISTS tasks_status_updated ON tasks (status, updated_at, task_id)",
    *worker_rows.SCHEMA,
    *record_rows.SCHEMA,
)

#: Columns later versions added, with their definitions for ``ALTER TABLE ... ADD COLUMN`` (the same as in
#: SCHEMA: ADD COLUMN allows NOT NULL only with a default, which then fills the old rows, and lets a process of
#: the older version, still running, go on inserting rows without them).
ADDED_COLUMNS: Mapping[str, str] = {"lease_until": "REAL", "history": "TEXT NOT NULL DEFAULT '[]'",
                                    "tenant": "TEXT NOT NULL DEFAULT ''", "outbox": "TEXT", "outbox_due": "REAL"}
#: Indexes on added columns: created by ``_upgrade`` once the columns exist (in SCHEMA they would fail on an old
#: file, whose table lacks them when the schema runs).
ADDED_INDEXES: Mapping[str, str] = {
    # list(tenant=...) walks one of these, as list() does the two above: a tenant's page costs its own rows only.
    "tasks_tenant_newest": "ON tasks (tenant, created_at DESC, task_id DESC)",
    "tasks_tenant_status_newest": "ON tasks (tenant, status, created_at DESC, task_id DESC)",
    # Partial: only tasks owing a webhook delivery are in it, so the dispatcher's poll costs what is due.
    "tasks_outbox_due": "ON tasks (outbox_due, task_id) WHERE outbox_due IS NOT NULL",
}
MAX_LIMIT = 1000


class SqliteTaskStore:
    """Tasks in a SQLite table; see the module docstring for the URL."""

    capabilities: frozenset[str] = frozenset({"list", "cas"})

    def __init__(self, *, path: str | Path, busy_timeout_s: float = 10.0, retention_days: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        #: Kept for callers to read; the janitor, not this store, acts on it.
        self.retention_days = retention_days
        self._clock = clock
        # Connections open on first use, so building the object (and from_url) touches no disk.
        self._db = SqliteDatabase(path, schema=SCHEMA, busy_timeout_s=busy_timeout_s)
        self._upgraded = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        """Parse ``url`` (opens nothing); ``kwargs`` (e.g. ``retention_days``, ``clock``) go to the constructor."""
        query_params(url, {})
        return cls(path=path_from_url(url), **kwargs)

    @property
    def path(self) -> Path:
        return self._db.path

    def create(self, task: Task) -> None:
        row = rows.encode_task(task)
        with self._write() as conn:
            inserted = conn.execute(rows.INSERT, row).rowcount
            current = None if inserted else rows.fetch(conn, task.task_id)
        if not inserted:
            raise TaskConflict(f"task {task.task_id} already exists", current=current)

    def get(self, task_id: str) -> Task:
        with self._read() as conn:
            task = rows.fetch(conn, task_id)
        if task is None:
            raise TaskNotFound(f"task {task_id} not found")
        return task

    def transition(self, task_id: str, *, expected: Collection[TaskStatus], to: TaskStatus,
                   attempt: int | None = None, changes: Mapping[str, Any] | None = None,
                   lease_expired_before: float | None = None) -> Task:
        check_transition(expected, to)
        changes = check_changes(changes)
        assignments = {"status": str(TaskStatus(to)), "updated_at": self._clock()}
        assignments.update(rows.encode_changes(changes))
        statuses = sorted({str(TaskStatus(s)) for s in expected})
        sql = (f"UPDATE tasks SET {', '.join(f'{name} = ?' for name in assignments)}"
               f" WHERE task_id = ? AND status IN ({', '.join('?' * len(statuses))})")
        params: list[Any] = [*assignments.values(), task_id, *statuses]
        if attempt is not None:
            sql += " AND attempts = ?"
            params.append(attempt)
        if lease_expired_before is not None:
            # In the WHERE, not in a read before the UPDATE: a claim and the holder's heartbeat (conditional on its
            # attempt) are then ordered, so either the claim sees the extended lease or the heartbeat finds its
            # attempt superseded; both going ahead, two workers on one task, cannot happen.
            sql += " AND (status != ? OR lease_until IS NULL OR lease_until < ?)"
            params.extend((str(TaskStatus.RUNNING), float(lease_expired_before)))
        with self._write() as conn:
            updated = conn.execute(sql, params).rowcount
            # Read back in the same transaction: on success the row we wrote, on failure the row that beat us.
            task = rows.fetch(conn, task_id)
        if task is None:
            raise TaskNotFound(f"task {task_id} not found")
        if not updated:
            raise TaskConflict(_conflict_message(task, statuses, attempt, lease_expired_before), current=task)
        return task

    def list(self, *, status: TaskStatus | None = None, limit: int = 50, cursor: str | None = None,
             tenant: str | None = None) -> TaskPage:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise RequestError(f"limit must be an integer in 1..{MAX_LIMIT}", field="limit")
        if tenant is not None and not isinstance(tenant, str):
            raise RequestError("tenant must be a string", field="tenant")
        status_value = None if status is None else str(TaskStatus(status))
        where: list[str] = []
        params: list[Any] = []
        # Equality on the leading columns of one of the four "newest" indexes, so the ORDER BY below is that
        # index's order: no sort, and a tenant's listing never reads another tenant's rows.
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if status_value is not None:
            where.append("status = ?")
            params.append(status_value)
        if cursor is not None:
            created_at, task_id = rows.decode_list_cursor(cursor, status_value, tenant)
            # Keyset pagination: strictly after the last row of the previous page in (created_at, task_id) order,
            # so rows inserted meanwhile neither shift nor repeat the pages.
            where.append("(created_at, task_id) < (?, ?)")
            params.extend((created_at, task_id))
        sql = rows.SELECT + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY created_at DESC, task_id DESC LIMIT ?"
        params.append(limit + 1)  # one more than asked tells whether a next page exists
        with self._read() as conn:
            found = conn.execute(sql, params).fetchall()
        tasks = [rows.decode_task(row) for row in found[:limit]]
        next_cursor = rows.encode_cursor_of(tasks[-1], status_value, tenant) if len(found) > limit else None
        return TaskPage(tasks=tasks, next_cursor=next_cursor)

    def due_outbox(self, *, before: float, limit: int = 100) -> builtins.list[Task]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be an integer in 1..{MAX_LIMIT}")
        with self._read() as conn:
            found = conn.execute(rows.DUE_OUTBOX, (float(before), limit)).fetchall()
        return [rows.decode_task(row) for row in found]

    def update_outbox(self, task_id: str, outbox: Outbox, *, expected: Outbox) -> Task:
        written = replace(outbox, version=expected.version + 1)
        text, due = rows.encode_outbox(written)
        with self._write() as conn:
            updated = conn.execute(rows.UPDATE_OUTBOX,
                                   (text, due, task_id, expected.event_id, expected.version)).rowcount
            task = rows.fetch(conn, task_id)
        if task is None:
            raise TaskNotFound(f"task {task_id} not found")
        if not updated:
            now = "none" if task.outbox is None else f"{task.outbox.event_id} at version {task.outbox.version}"
            raise TaskConflict(f"task {task_id} has outbox {now}, expected {expected.event_id} at version "
                               f"{expected.version}", current=task)
        return task

    def stale(self, *, status: TaskStatus, updated_before: float, limit: int = 100) -> builtins.list[Task]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be an integer in 1..{MAX_LIMIT}")
        with self._read() as conn:
            found = conn.execute(f"{rows.SELECT} WHERE status = ? AND updated_at < ? ORDER BY updated_at, task_id"
                                 " LIMIT ?", (str(TaskStatus(status)), float(updated_before), limit)).fetchall()
        return [rows.decode_task(row) for row in found]

    def delete(self, task_id: str, *, finished_before: float | None = None) -> bool:
        with self._write() as conn:
            if finished_before is None:
                cursor = conn.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
            else:
                terminal = sorted(str(s) for s in TERMINAL)
                cursor = conn.execute(
                    f"DELETE FROM tasks WHERE task_id = ? AND updated_at < ? "
                    f"AND status IN ({', '.join('?' * len(terminal))})", (task_id, finished_before, *terminal))
            return cursor.rowcount > 0

    def put_worker(self, record: WorkerRecord) -> None:
        try:
            row = worker_rows.encode_worker(record)
        except ValueError as exc:  # NaN in the health's facts: no retry makes it storable
            raise BackendRefused(f"worker record {record.worker_id}: {exc}") from exc
        with self._write() as conn:
            conn.execute(worker_rows.UPSERT, row)
            # Dead workers' records go here, a while after they expired: SQLite has no TTL.
            conn.execute(worker_rows.PRUNE, (self._clock() - worker_rows.PRUNE_AFTER_S,))

    def workers(self, *, now: float | None = None) -> builtins.list[WorkerRecord]:
        now = self._clock() if now is None else now
        with self._read() as conn:
            rows = conn.execute(worker_rows.SELECT_LIVE, (float(now),)).fetchall()
        return [worker_rows.decode_worker(row) for row in rows]

    def remove_worker(self, worker_id: str) -> None:
        with self._write() as conn:
            conn.execute(worker_rows.DELETE, (worker_id,))

    def get_record(self, kind: str, key: str) -> Record | None:
        check_record_key(kind, key)
        with self._read() as conn:
            return record_rows.fetch(conn, kind, key, self._clock())

    def put_record(self, kind: str, key: str, data: dict[str, Any], *, version: int | None,
                   expires_at: float | None = None) -> Record:
        # Validated before the write lock is taken: bad input costs no lock.
        check_record_key(kind, key)
        encode_data(data)
        with self._write() as conn:
            return record_rows.put(conn, kind, key, data, version=version, expires_at=expires_at,
                                   now=self._clock())

    def delete_record(self, kind: str, key: str, *, version: int | None = None) -> bool:
        check_record_key(kind, key)
        with self._write() as conn:
            return record_rows.delete(conn, kind, key, version=version, now=self._clock())

    def list_records(self, kind: str, *, limit: int = 100, cursor: str | None = None) -> RecordPage:
        with self._read() as conn:
            return record_rows.list_page(conn, kind, limit=limit, cursor=cursor, now=self._clock())

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        self._upgrade()
        with self._db.read() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._upgrade()
        with self._db.write() as conn:
            yield conn

    def _upgrade(self) -> None:
        """Add the columns a file from an older version lacks, once per store. Raises BackendError."""
        if self._upgraded:
            return
        with self._db.read() as conn:
            missing = set(ADDED_COLUMNS) - _columns(conn)
            missing_indexes = set(ADDED_INDEXES) - _indexes(conn)
        if missing:
            # Checked again under the write lock: another process (all take it with BEGIN IMMEDIATE) may have
            # added them meanwhile. "duplicate column name" is tolerated all the same, in case one did not.
            with self._db.write() as conn:
                for name in sorted(set(ADDED_COLUMNS) - _columns(conn)):
                    try:
                        conn.execute(f"ALTER TABLE tasks ADD COLUMN {name} {ADDED_COLUMNS[name]}")
                    except sqlite3.OperationalError as exc:
                        if "duplicate column name" not in str(exc):
                            raise
        if missing or missing_indexes:
            with self._db.write() as conn:
                for name, definition in ADDED_INDEXES.items():
                    conn.execute(f"CREATE INDEX IF NOT EXISTS {name} {definition}")
        # Racing threads may each check once more: harmless, and it spares a lock on the hot path.
        self._upgraded = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}


def _indexes(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?",
                                           ("tasks",))}


def _conflict_message(task: Task, statuses: list[str], attempt: int | None, lease_expired_before: float | None
                      ) -> str:
    wanted = f"status in {statuses}" + ("" if attempt is None else f" and attempt {attempt}")
    if lease_expired_before is not None:
        wanted += f" and no running lease at or after {lease_expired_before}"
    lease = "" if task.lease_until is None else f", leased until {task.lease_until}"
    return f"task {task.task_id} is {task.status} (attempt {task.attempts}{lease}), expected {wanted}"
