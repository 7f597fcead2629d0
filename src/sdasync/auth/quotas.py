"""Quotas that hold across every API process, Lambda instance and worker: a rate limit per key, and caps on a
tenant's queued and running tasks. All state lives in the task store's backend, changed by compare-and-set.

**Rate** (``RateLimiter``): a token bucket per key id in a ``ratebucket`` record (tokens, time of the last take).
A take re-reads the record, refills it for the time passed, takes one token and writes it back conditional on
the version it read; a lost race re-reads. An absent (or expired) record is a full bucket, so each record
expires ``BUCKET_GRACE_S`` after it would have refilled anyway, never before. Clock skew between processes can
only delay refill (a time before the record's is taken as no time passed), never add tokens.

**Caps** (``Admission`` for queued tasks at submit, ``StartGate`` for running tasks at the worker): nothing is
counted up and down, so nothing can drift after a crash. The count is read from the tasks themselves, the
tenant's tasks in that status through the store's tenant index, united with a small *window* record per tenant
(``admit-queued`` / ``admit-running``, ``task_id -> time``) of recent admissions. The window covers only what
the index cannot show yet: a task admitted but not written yet, or written but not yet in an eventually
consistent index. An entry is kept while it is younger than ``window_s`` and its task, as a strongly
consistent ``get`` shows it, has not left the counted state (a task not found is one not written yet); then it
goes by itself. An admission appends its task to the window by a compare-and-set on the record's version, so
two admissions at once serialize: the second re-reads, sees the first, and counts it. A refusal writes nothing.

Error bound: the count is never below the truth (the window holds every admission until the index shows it),
so a cap is never exceeded; it can be above it by the window entries of tasks that never came to be (a submit
that crashed between admission and writing its task, a worker killed between entering the gate and claiming),
each for at most ``window_s`` seconds (30 by default). On SQLite the index is the table itself and has no lag;
on DynamoDB the window also rides out the global secondary index's replication lag.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection

from sdasync.auth.keys import ApiKey
from sdasync.backends.base import TaskStore
from sdasync.backends.records import RecordStore
from sdasync.errors import ConfigError, LimitExceeded, RecordConflict, TaskNotFound
from sdasync.models import MAX_ACTIVE_KEY, Task, TaskStatus

BUCKET_KIND = "ratebucket"
#: A bucket's record outlives its refill by this much. It would read as full by then anyway (refill is computed
#: from its time), so keeping it longer costs nothing, while expiring it early would hand out a full bucket: another
#: process whose clock runs ahead, or a slow store, must never see a drained bucket as expired.
BUCKET_GRACE_S = 300.0
QUEUED_KIND = "admit-queued"
RUNNING_KIND = "admit-running"
#: Compare-and-set rounds before giving up. Only admissions write, so a caller loses at most one round per
#: admission made meanwhile: this takes a burst of that many concurrent admissions for one tenant to exhaust.
CAS_ROUNDS = 32
#: Window entries a record may hold (far below the record size limit); more admissions in one window are refused.
MAX_ENTRIES = 1000
#: The store's page size limit.
_PAGE_MAX = 1000


class RateLimiter:
    """Token buckets per API key (see the module docstring)."""

    def __init__(self, records: RecordStore, *, clock: Callable[[], float] = time.time) -> None:
        self.records = records
        self.clock = clock

    def take(self, key: ApiKey) -> None:
        """Take one submit from the key's bucket. Returns at once, with no I/O, for a key without a rate. Raises
        LimitExceeded (``rate_limited``, ``retry_after_s``: when the next token is due), BackendError."""
        if key.rate is None:
            return
        rate = key.rate
        capacity = float(key.burst or max(1, math.ceil(rate)))
        for _ in range(CAS_ROUNDS):
            now = self.clock()
            record = self.records.get_record(BUCKET_KIND, key.key_id)
            tokens, at = capacity, now
            if record is not None:
                last = float(record.data["at"])
                tokens = min(capacity, float(record.data["tokens"]) + max(0.0, now - last) * rate)
                at = max(last, now)
            if tokens < 1.0:
                raise LimitExceeded(f"this key may submit {rate:g} tasks per second (bursts of {capacity:g}); "
                                    f"slow down", code="rate_limited", retry_after_s=(1.0 - tokens) / rate)
            left = tokens - 1.0
            try:
                self.records.put_record(BUCKET_KIND, key.key_id, {"tokens": left, "at": at},
                                        version=None if record is None else record.version,
                                        expires_at=at + (capacity - left) / rate + BUCKET_GRACE_S)
            except RecordConflict:
                continue
            return
        raise LimitExceeded("too many submits at once with this key; retry", code="rate_limited",
                            retry_after_s=1.0 / rate)


class _Window:
    """Counting a tenant's tasks in one status, with the window record of recent admissions beside it."""

    def __init__(self, store: TaskStore, *, kind: str, status: TaskStatus, live: Collection[TaskStatus],
                 clock: Callable[[], float], window_s: float) -> None:
        if not isinstance(store, RecordStore):
            raise ConfigError(f"{type(store).__name__} keeps no records, so it cannot hold quotas")
        self.tasks: TaskStore = store
        self.records: RecordStore = store
        self.kind = kind
        self.status = status
        #: Statuses in which a window entry's task still counts.
        self.live = frozenset(live)
        self.clock = clock
        self.window_s = window_s

    def try_enter(self, tenant: str, task_id: str, cap: int) -> bool | None:
        """Add ``task_id`` if the tenant's other tasks in the status number fewer than ``cap``: True when added,
        False when over the cap, None when the record kept changing for ``CAS_ROUNDS`` rounds."""
        key = _window_key(tenant)
        for _ in range(CAS_ROUNDS):
            listed = self._listed(tenant, task_id, cap)
            if len(listed) >= cap:
                return False
            record = self.records.get_record(self.kind, key)
            now = self.clock()
            entries = self._live_entries(dict(record.data.get("entries", {})) if record else {}, listed, now)
            entries.pop(task_id, None)
            if len(listed | set(entries)) >= cap or len(entries) >= MAX_ENTRIES:
                return False
            entries[task_id] = now
            try:
                self.records.put_record(self.kind, key, {"entries": entries},
                                      version=None if record is None else record.version,
                                      expires_at=now + 2 * self.window_s)
            except RecordConflict:
                continue
            return True
        return None

    def remove(self, tenant: str, task_id: str) -> None:
        key = _window_key(tenant)
        for _ in range(CAS_ROUNDS):
            record = self.records.get_record(self.kind, key)
            entries = dict(record.data.get("entries", {})) if record else {}
            if record is None or task_id not in entries:
                return
            del entries[task_id]
            try:
                self.records.put_record(self.kind, key, {"entries": entries}, version=record.version,
                                      expires_at=record.expires_at)
            except RecordConflict:
                continue
            return
        # Still there after that many rounds: it goes by itself within window_s, which the error bound allows.

    def _listed(self, tenant: str, task_id: str, cap: int) -> set[str]:
        """Ids of the tenant's tasks in the status, ``task_id`` left out, read until there are ``cap`` of them."""
        ids: set[str] = set()
        cursor: str | None = None
        while True:
            page = self.tasks.list(status=self.status, tenant=tenant, limit=min(cap + 1, _PAGE_MAX), cursor=cursor)
            ids.update(task.task_id for task in page.tasks if task.task_id != task_id)
            cursor = page.next_cursor
            if cursor is None or len(ids) >= cap:
                return ids

    def _live_entries(self, entries: dict[str, float], listed: set[str], now: float) -> dict[str, float]:
        live: dict[str, float] = {}
        for other, at in entries.items():
            at = float(at)
            # Older than the window (or stamped by a clock far ahead of ours): the index shows it by now.
            if not now - self.window_s < at <= now + self.window_s:
                continue
            # Already in the listing: kept (so a staler index read later cannot under-count) but not read again.
            if other in listed or self._still_counts(other):
                live[other] = at
        return live

    def _still_counts(self, task_id: str) -> bool:
        try:
            return self.tasks.get(task_id).status in self.live
        except TaskNotFound:
            return True  # admitted, not written yet (or never will be: then it ages out)


def _window_key(tenant: str) -> str:
    return "t:" + tenant


class Admission:
    """The cap on a tenant's queued tasks, checked at submit before the task is written. ``store`` must also be a
    RecordStore (every task store is; ConfigError otherwise)."""

    def __init__(self, store: TaskStore, *, clock: Callable[[], float] = time.time, window_s: float = 30.0,
                 retry_after_s: float = 5.0) -> None:
        self._window = _Window(store, kind=QUEUED_KIND, status=TaskStatus.QUEUED, live={TaskStatus.QUEUED},
                               clock=clock, window_s=window_s)
        #: What a refusal tells the client to wait: queued tasks leave the queue at the workers' pace.
        self.retry_after_s = retry_after_s

    def admit_queued(self, tenant: str, task_id: str, cap: int) -> None:
        """Count ``task_id`` in if fewer than ``cap`` of the tenant's other tasks are queued; call before writing
        the task, and ``forget`` if the submit then fails. Raises LimitExceeded (``max_queued``), BackendError."""
        admitted = self._window.try_enter(tenant, task_id, cap)
        if admitted is None:
            raise LimitExceeded("too many submits at once for this tenant; retry", code="max_queued",
                                retry_after_s=1.0)
        if not admitted:
            raise LimitExceeded(f"this tenant already has {cap} queued tasks, the most its key allows",
                                code="max_queued", retry_after_s=self.retry_after_s)

    def forget(self, tenant: str, task_id: str) -> None:
        """Take back an admission whose task was never written (the submit failed after ``admit_queued``)."""
        self._window.remove(tenant, task_id)


class StartGate:
    """The cap on a tenant's running tasks (``task.extra["max_active"]``, from the submitting key), checked by the
    worker before it claims a task. ``store`` must also be a RecordStore (every task store is; ConfigError
    otherwise)."""

    def __init__(self, store: TaskStore, *, clock: Callable[[], float] = time.time, window_s: float = 30.0,
                 retry_s: float = 5.0, rng: random.Random | None = None) -> None:
        # A running task's entry covers the time from the gate to the claim, and the index's lag after it.
        self._window = _Window(store, kind=RUNNING_KIND, status=TaskStatus.RUNNING,
                               live={TaskStatus.QUEUED, TaskStatus.RUNNING}, clock=clock, window_s=window_s)
        self.retry_s = retry_s
        self._rng = rng or random.Random()

    def enter(self, task: Task) -> float | None:
        """None: the task may start now and holds a slot (claim it, then ``leave`` when its attempt ends, or at
        once if the claim fails). Else the seconds to wait before trying again (``retry_s``, jittered by half
        either way, so handed-back tasks do not all return at once); nothing was taken. A task without
        ``max_active`` returns None at once, with no I/O. ``task`` itself never counts against its cap.
        Raises BackendError."""
        cap = _cap(task)
        if cap is None:
            return None
        if self._window.try_enter(task.tenant, task.task_id, cap):
            return None
        return self.retry_s * self._rng.uniform(0.5, 1.5)

    def leave(self, task: Task) -> None:
        """Give back the slot ``enter`` took (no I/O for a task without a cap). Raises BackendError."""
        if _cap(task) is not None:
            self._window.remove(task.tenant, task.task_id)


def _cap(task: Task) -> int | None:
    value = task.extra.get(MAX_ACTIVE_KEY)
    return None if value is None else int(value)
