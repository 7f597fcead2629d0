"""The worker registry's table in the task store's SQLite file, and its rows <-> ``WorkerRecord``.

One row per worker, overwritten at every heartbeat. ``expires_at`` is the record's end: ``workers()`` leaves out
records past it, and each write deletes those that expired more than ``PRUNE_AFTER_S`` ago, so the records of
dead workers vanish without a janitor (SQLite has no TTL).
"""

from __future__ import annotations

import json
from typing import Any

from sdasync.models import EngineHealth, WorkerRecord

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS workers (
        worker_id TEXT PRIMARY KEY,
        engine TEXT NOT NULL,
        health TEXT NOT NULL,        -- JSON object (EngineHealth.to_dict)
        task_id TEXT,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL
    )
    """,
)

COLUMNS = ("worker_id", "engine", "health", "task_id", "started_at", "heartbeat_at", "expires_at", "host", "pid")
#: An expired record is kept this long (for an operator looking at the file), then deleted by the next write.
PRUNE_AFTER_S = 3600.0

UPSERT = (f"INSERT INTO workers ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
          f" ON CONFLICT (worker_id) DO UPDATE SET "
          + ", ".join(f"{name} = excluded.{name}" for name in COLUMNS[1:]))
PRUNE = "DELETE FROM workers WHERE expires_at < ?"
SELECT_LIVE = f"SELECT {', '.join(COLUMNS)} FROM workers WHERE expires_at > ? ORDER BY worker_id"
DELETE = "DELETE FROM workers WHERE worker_id = ?"


def encode_worker(record: WorkerRecord) -> tuple[Any, ...]:
    # json.dumps keeps 1.0 a float and 1 an int, so a record reads back as written.
    health = json.dumps(record.health.to_dict(), separators=(",", ":"), allow_nan=False)
    return (record.worker_id, record.engine, health, record.task_id, float(record.started_at),
            float(record.heartbeat_at), float(record.expires_at), record.host, int(record.pid))


def decode_worker(row: tuple[Any, ...]) -> WorkerRecord:
    worker_id, engine, health, task_id, started_at, heartbeat_at, expires_at, host, pid = row
    return WorkerRecord(worker_id=worker_id, engine=engine, health=EngineHealth.from_dict(json.loads(health)),
                        task_id=task_id, started_at=started_at, heartbeat_at=heartbeat_at, expires_at=expires_at,
                        host=host, pid=pid)
