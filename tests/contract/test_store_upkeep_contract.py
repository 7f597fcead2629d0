"""The TaskStore methods the sweeper, the janitor and the worker registry use (``stale``, ``delete``,
``put_worker``, ``workers``, ``remove_worker``), run against every backend in ``backends.STORE_FACTORIES``.

Times are explicit (tasks created in the past, ``workers(now=...)``), so the suite runs the same on stores with an
injected clock and on those that read real time.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from sdasync.backends.base import TaskStore
from sdasync.errors import TaskNotFound
from sdasync.models import EngineHealth, Task, TaskStatus, WorkerRecord

from .backends import FakeClock
from .tasks import C, F, Q, R, S, make_task


def _ids(tasks: Iterable[Task]) -> list[str]:
    return [task.task_id for task in tasks]


def _worker(worker_id: str, *, expires_at: float, task_id: str | None = None, ok: bool = True) -> WorkerRecord:
    health = EngineHealth(ok=ok, detail="ready" if ok else "connection refused", loaded=True, model="tiny",
                          extra={"device": "cpu", "vram_gb": 1.0, "seconds": 0.25, "count": 0, "url": None})
    return WorkerRecord(worker_id=worker_id, engine="fake://", health=health, task_id=task_id,
                        started_at=expires_at - 100.0, heartbeat_at=expires_at - 15.0, expires_at=expires_at,
                        host="gpu-1", pid=4242)


def test_stale_returns_old_tasks_of_one_status_oldest_first(store: TaskStore, clock: FakeClock) -> None:
    base = clock() - 10_000
    old_queued = [make_task(clock, created_at=base + i) for i in (3, 0, 2)]
    tie = make_task(clock, created_at=base + 2, task_id="t-tie")  # equal times: the id decides
    fresh = make_task(clock, created_at=base + 500)
    others = [make_task(clock, created_at=base + 1, status=status) for status in (R, S, F, C)]
    for task in (*old_queued, tie, fresh, *others):
        store.create(task)
    cutoff = base + 100

    expected = sorted([*old_queued, tie], key=lambda t: (t.updated_at, t.task_id))
    assert store.stale(status=Q, updated_before=cutoff) == expected
    assert _ids(store.stale(status=Q, updated_before=cutoff, limit=2)) == _ids(expected[:2])
    assert store.stale(status=Q, updated_before=base) == []  # strictly before
    for task in others:
        assert store.stale(status=task.status, updated_before=cutoff) == [task]


def test_a_transition_makes_a_stale_task_fresh(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock, created_at=clock() - 10_000)
    store.create(task)
    assert _ids(store.stale(status=Q, updated_before=clock() - 5_000)) == [task.task_id]

    # The sweeper's re-send: queued -> queued records the change, so the task is not swept again at once.
    store.transition(task.task_id, expected={Q}, to=Q)

    assert store.stale(status=Q, updated_before=clock() - 5_000) == []
    store.transition(task.task_id, expected={Q}, to=C)
    assert store.stale(status=Q, updated_before=clock() + 60) == []
    assert _ids(store.stale(status=C, updated_before=clock() + 60)) == [task.task_id]


def test_delete_removes_the_task_for_good(store: TaskStore, clock: FakeClock) -> None:
    gone, kept = make_task(clock, created_at=clock() - 1000, status=F), make_task(clock, created_at=clock() - 999)
    store.create(gone)
    store.create(kept)

    store.delete(gone.task_id)

    with pytest.raises(TaskNotFound):
        store.get(gone.task_id)
    with pytest.raises(TaskNotFound):
        store.transition(gone.task_id, expected={F}, to=Q)
    assert store.stale(status=F, updated_before=clock() + 60) == []
    assert store.get(kept.task_id) == kept
    store.delete(gone.task_id)  # a missing task is not an error
    store.delete("never-existed")
    if "list" in store.capabilities:
        assert _ids(store.list(limit=10).tasks) == [kept.task_id]
    store.create(gone)  # and the id is free again
    assert store.get(gone.task_id) == gone


def test_worker_records_round_trip_and_expire(store: TaskStore, clock: FakeClock) -> None:
    now = clock()
    live_b = _worker("w-b", expires_at=now + 30, task_id="t-1")
    live_a = _worker("w-a", expires_at=now + 15, ok=False)
    dead = _worker("w-dead", expires_at=now - 1)
    for record in (live_b, dead, live_a):
        store.put_worker(record)

    got = store.workers(now=now)

    assert got == [live_a, live_b]  # by worker id, the expired one left out
    assert type(got[1].health.extra["vram_gb"]) is float and type(got[1].health.extra["count"]) is int
    assert store.workers(now=now + 20) == [live_b]
    assert store.workers(now=now + 30) == []  # expires_at is the first moment it is gone
    assert store.workers(now=now - 10) == [live_a, live_b, dead]


def test_a_conditional_delete_takes_only_a_finished_task_unchanged_since_the_cutoff(store: TaskStore,
                                                                                    clock: FakeClock) -> None:
    old_failed = make_task(clock, created_at=clock() - 1000, status=F)
    old_queued = make_task(clock, created_at=clock() - 1000)
    store.create(old_failed)
    store.create(old_queued)

    assert store.delete(old_queued.task_id, finished_before=clock()) is False
    assert store.delete(old_failed.task_id, finished_before=old_failed.updated_at) is False  # not before it
    assert store.get(old_failed.task_id) == old_failed
    assert store.delete(old_failed.task_id, finished_before=clock()) is True
    with pytest.raises(TaskNotFound):
        store.get(old_failed.task_id)
    assert store.delete(old_failed.task_id, finished_before=clock()) is False
    assert store.get(old_queued.task_id) == old_queued


def test_a_heartbeat_overwrites_the_record_and_remove_deletes_it(store: TaskStore, clock: FakeClock) -> None:
    now = clock()
    store.put_worker(_worker("w1", expires_at=now + 15, task_id="t-1"))
    beat = _worker("w1", expires_at=now + 30, task_id=None)

    store.put_worker(beat)

    assert store.workers(now=now) == [beat]
    store.remove_worker("w1")
    assert store.workers(now=now) == []
    store.remove_worker("w1")  # a missing record is not an error
    store.remove_worker("never-registered")


def test_worker_records_never_mix_with_tasks(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock, created_at=clock() - 10_000)
    store.create(task)
    # The same id for a worker as for a task: two registries, no collision.
    store.put_worker(_worker(task.task_id, expires_at=clock() + 30))
    store.put_worker(_worker("w2", expires_at=clock() + 30))

    assert store.get(task.task_id) == task
    assert _ids(store.stale(status=Q, updated_before=clock() + 60)) == [task.task_id]
    if "list" in store.capabilities:
        assert store.list(limit=100).tasks == [task]
        assert store.list(status=Q, limit=100).tasks == [task]
    with pytest.raises(TaskNotFound):
        store.get("w2")
    store.delete(task.task_id)
    assert [record.worker_id for record in store.workers(now=clock())] == sorted([task.task_id, "w2"])


def test_stale_and_workers_may_be_empty(store: TaskStore, clock: FakeClock) -> None:
    assert store.stale(status=TaskStatus.QUEUED, updated_before=clock()) == []
    assert store.workers(now=clock()) == []
