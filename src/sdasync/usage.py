"""``GET /usage``: a tenant's tasks and GPU-seconds per day, summed from the tasks themselves.

Each attempt's history record holds the seconds its engine worked (``AttemptRecord.engine_s``), so a task's
GPU-seconds are exact and written in the same conditional write that ends the attempt: there is no counter
beside the tasks to drift after a crash. The report reads the tenant's tasks through the tenant index, newest
first, and stops at the first one created before the window: its cost is one read per task in the window.
Days are UTC and a task counts on the day it was created.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from sdasync.backends.base import TaskStore
from sdasync.models import TaskStatus

MAX_DAYS = 92
PAGE = 500


@dataclass(frozen=True)
class DayUsage:
    day: str
    tasks: int
    succeeded: int
    gpu_seconds: float


def usage(store: TaskStore, *, tenant: str | None, days: int, now: float | None = None) -> list[DayUsage]:
    """One entry per UTC day of the last ``days`` (today included) that has tasks, newest first. ``tenant`` None:
    every tenant's (operators)."""
    now = time.time() if now is None else now
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    since = today.timestamp() - (days - 1) * 86400.0
    tasks: dict[str, int] = defaultdict(int)
    succeeded: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = defaultdict(float)
    cursor = None
    while True:
        page = store.list(tenant=tenant, limit=PAGE, cursor=cursor)
        for task in page.tasks:
            if task.created_at < since:
                return _report(tasks, succeeded, seconds)
            day = datetime.fromtimestamp(task.created_at, UTC).date().isoformat()
            tasks[day] += 1
            succeeded[day] += task.status is TaskStatus.SUCCEEDED
            seconds[day] += task.gpu_seconds
        if page.next_cursor is None:
            return _report(tasks, succeeded, seconds)
        cursor = page.next_cursor


def _report(tasks: dict[str, int], succeeded: dict[str, int], seconds: dict[str, float]) -> list[DayUsage]:
    return [DayUsage(day=day, tasks=tasks[day], succeeded=succeeded[day], gpu_seconds=round(seconds[day], 3))
            for day in sorted(tasks, reverse=True)]
