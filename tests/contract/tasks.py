"""Tasks and attempt records the store suites share (``test_store_contract``, ``test_sqlite_store``, ...)."""

from __future__ import annotations

import itertools

from sdasync.models import Api, AttemptRecord, Task, TaskStatus

from .backends import FakeClock

Q, R, S, F, C = (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.SUCCEEDED, TaskStatus.FAILED,
                 TaskStatus.CANCELLED)
_ids = itertools.count()

#: An attempt record as the worker writes it into ``Task.history``, and as a store hands it back.
RECORD = {"attempt": 1, "worker": "host-0:9", "started_at": 1_700_000_000.5, "ended_at": 1_700_000_001.75,
          "outcome": "retried", "error": {"code": "engine_unavailable", "message": "connection refused"}}
RECORD_READ = AttemptRecord.from_dict(RECORD)


def next_id() -> str:
    return f"t{next(_ids):06d}"


def make_task(clock: FakeClock, *, status: TaskStatus = Q, created_at: float | None = None,
              task_id: str | None = None, tenant: str = "") -> Task:
    now = clock() if created_at is None else created_at
    return Task(task_id=task_id or next_id(), api=Api.TXT2IMG, payload={"prompt": "a cat"},
                status=status, created_at=now, updated_at=now, tenant=tenant)
