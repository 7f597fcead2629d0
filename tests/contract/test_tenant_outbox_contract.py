"""Tenants and webhook outboxes on tasks: the TaskStore contract's part for issue 9, run against every store."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from sdasync.backends.base import TaskStore
from sdasync.errors import RequestError, TaskConflict, TaskNotFound
from sdasync.models import Task, TaskStatus
from sdasync.outbox import DeliveryAttempt, Event, Outbox, OutboxState, completed_outbox, new_event_id

from .backends import FakeClock
from .tasks import RECORD, C, F, Q, R, S, make_task


def _outbox(due_at: float | None, *, created_at: float = 1_700_000_000.0) -> Outbox:
    return Outbox(event_id=new_event_id(), event=Event.COMPLETED, created_at=created_at, due_at=due_at)


def _finish(store: TaskStore, task: Task, outbox: Outbox | None) -> Task:
    """queued -> running -> succeeded, the final write setting the outbox, as the worker does it."""
    store.transition(task.task_id, expected={Q}, to=R, changes={"attempts": 1})
    return store.transition(task.task_id, expected={R}, to=S, attempt=1,
                            changes={"outbox": outbox, "finished_at": 1_700_000_009.5})


def test_the_tenant_reads_back_and_no_transition_changes_it(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock, tenant="acme")
    plain = make_task(clock)
    store.create(task)
    store.create(plain)

    assert store.get(task.task_id) == task
    assert store.get(task.task_id).tenant == "acme"
    assert store.get(plain.task_id).tenant == ""
    running = store.transition(task.task_id, expected={Q}, to=R, changes={"attempts": 1, "history": (RECORD,)})
    failed = store.transition(task.task_id, expected={R}, to=F, changes={"error": {"code": "c", "message": "m"}})
    assert running.tenant == failed.tenant == store.get(task.task_id).tenant == "acme"
    with pytest.raises(ValueError, match="not a mutable task field"):
        store.transition(task.task_id, expected={F}, to=Q, changes={"tenant": "other"})
    assert store.get(task.task_id).tenant == "acme"


def _seed_tenants(store: TaskStore, clock: FakeClock) -> list[Task]:
    base = clock()
    tasks = [make_task(clock, created_at=base + i, status=(Q, R, S)[i % 3], tenant=("acme", "zeta", "")[i // 2 % 3])
             for i in range(12)]
    # Equal creation times within a tenant: the task id breaks the tie, as for the all-tenants listing.
    tasks += [make_task(clock, created_at=base + 4, task_id=f"tie-{c}", tenant="acme") for c in "ba"]
    for task in tasks:
        store.create(task)
    return sorted(tasks, key=lambda t: (t.created_at, t.task_id), reverse=True)


def _list_all(store: TaskStore, *, tenant: str | None, status: TaskStatus | None = None, limit: int) -> list[Task]:
    tasks: list[Task] = []
    cursor: str | None = None
    for _ in range(100):
        page = store.list(tenant=tenant, status=status, limit=limit, cursor=cursor)
        assert len(page.tasks) <= limit
        tasks += page.tasks
        cursor = page.next_cursor
        if cursor is None:
            return tasks
    raise AssertionError("pagination does not end")


def test_a_tenant_listing_sees_only_that_tenants_tasks(store: TaskStore, clock: FakeClock) -> None:
    newest_first = _seed_tenants(store, clock)

    for tenant in ("acme", "zeta", ""):
        own = [t for t in newest_first if t.tenant == tenant]
        assert own
        assert store.list(tenant=tenant, limit=1000).tasks == own
        for status in TaskStatus:
            assert store.list(tenant=tenant, status=status, limit=1000).tasks == [t for t in own if t.status == status]
        for limit in (1, 2, 5):
            assert _list_all(store, tenant=tenant, limit=limit) == own
            assert _list_all(store, tenant=tenant, status=Q, limit=limit) == [t for t in own if t.status == Q]
    assert store.list(tenant="nobody", limit=1000).tasks == []
    assert store.list(tenant="nobody", limit=1000).next_cursor is None


def test_no_tenant_filter_sees_every_task(store: TaskStore, clock: FakeClock) -> None:
    newest_first = _seed_tenants(store, clock)

    assert store.list(limit=1000).tasks == newest_first
    assert store.list(tenant=None, limit=1000).tasks == newest_first
    assert _list_all(store, tenant=None, limit=3) == newest_first


def test_a_cursor_only_continues_a_listing_of_the_same_tenant(store: TaskStore, clock: FakeClock) -> None:
    _seed_tenants(store, clock)
    acme = store.list(tenant="acme", limit=1).next_cursor
    everyone = store.list(limit=1).next_cursor
    keyless = store.list(tenant="", limit=1).next_cursor
    assert acme is not None and everyone is not None and keyless is not None

    refused = [("zeta", None, acme), (None, None, acme), ("", None, acme), ("acme", Q, acme), ("acme", None, everyone),
               ("", None, everyone), ("acme", None, keyless), (None, None, keyless)]
    for tenant, status, cursor in refused:
        with pytest.raises(RequestError) as caught:
            store.list(tenant=tenant, status=status, cursor=cursor)
        assert caught.value.field == "cursor"
    assert store.list(tenant="acme", limit=1000, cursor=acme).tasks  # and the right one goes on


def test_a_finished_tasks_outbox_is_due_until_it_is_settled(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock, tenant="acme")
    task = replace(task, extra={"webhook": {"url": "https://example.test/hook", "events": ["completed"]}})
    store.create(task)
    outbox = completed_outbox(task.extra, now=clock())
    assert outbox is not None

    done = _finish(store, task, outbox)

    assert done.outbox == outbox
    assert store.get(task.task_id).outbox == outbox
    assert store.due_outbox(before=outbox.created_at - 1) == []
    assert [t.task_id for t in store.due_outbox(before=clock() + 1)] == [task.task_id]
    assert store.due_outbox(before=clock() + 1)[0] == store.get(task.task_id)

    # A dispatcher claims it (due later: its lease), then records a delivered try.
    lease_end = clock() + 60
    claimed = store.update_outbox(task.task_id, replace(outbox, due_at=lease_end), expected=outbox)
    assert claimed.outbox is not None
    assert (claimed.outbox.version, claimed.outbox.due_at) == (1, lease_end)
    assert store.due_outbox(before=lease_end - 1) == []
    assert [t.task_id for t in store.due_outbox(before=lease_end + 1)] == [task.task_id]
    sent = DeliveryAttempt(at=clock(), status=204)
    delivered = claimed.outbox.tried(sent, due_at=None, state=OutboxState.DELIVERED)
    settled = store.update_outbox(task.task_id, delivered, expected=claimed.outbox)

    assert settled.outbox == replace(delivered, version=2)
    assert store.get(task.task_id) == settled
    assert settled.outbox is not None and settled.outbox.attempts == (sent,)
    assert store.due_outbox(before=clock() + 10**6) == []


def test_update_outbox_is_a_compare_and_set(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock)
    store.create(task)
    outbox = _outbox(clock())
    _finish(store, task, outbox)
    moved = store.update_outbox(task.task_id, replace(outbox, due_at=clock() + 30), expected=outbox)

    for stale in (outbox, replace(moved.outbox or outbox, event_id=new_event_id()),
                  replace(outbox, version=5)):
        with pytest.raises(TaskConflict) as caught:
            store.update_outbox(task.task_id, replace(outbox, due_at=None), expected=stale)
        assert caught.value.current == moved
    assert store.get(task.task_id) == moved

    bare = make_task(clock)
    store.create(bare)
    with pytest.raises(TaskConflict) as no_outbox:  # nothing to compare with: a task that owes no event
        store.update_outbox(bare.task_id, outbox, expected=outbox)
    assert no_outbox.value.current == bare
    assert store.get(bare.task_id).outbox is None
    with pytest.raises(TaskNotFound):
        store.update_outbox("no-such-task", outbox, expected=outbox)


def test_update_outbox_writes_the_next_version_and_leaves_the_rest_alone(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock, tenant="acme")
    store.create(task)
    done = _finish(store, task, _outbox(clock()))
    assert done.outbox is not None
    clock.advance(1.5)
    retry_at = clock() + 5

    # Whatever version the caller's outbox carries, the store writes expected.version + 1.
    updated = store.update_outbox(task.task_id, replace(done.outbox, due_at=retry_at, version=7),
                                  expected=done.outbox)

    assert updated.outbox == replace(done.outbox, due_at=retry_at, version=1)
    assert updated == replace(done, outbox=updated.outbox)  # status, updated_at, tenant, ... as they were
    assert (updated.status, updated.updated_at) == (S, done.updated_at)


def test_of_two_racing_dispatchers_one_wins(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock)
    store.create(task)
    outbox = _outbox(clock())
    _finish(store, task, outbox)
    contenders = 8
    barrier = threading.Barrier(contenders)
    won: list[Task] = []
    lost: list[TaskConflict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def claim(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            got = store.update_outbox(task.task_id, replace(outbox, due_at=clock() + n), expected=outbox)
            with lock:
                won.append(got)
        except TaskConflict as conflict:
            with lock:
                lost.append(conflict)
        except BaseException as error:
            with lock:
                errors.append(error)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(1, contenders + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert (len(won), len(lost)) == (1, contenders - 1)
    assert store.get(task.task_id) == won[0]
    assert won[0].outbox is not None and won[0].outbox.version == 1
    assert all(conflict.current == won[0] for conflict in lost)


def test_due_outbox_is_soonest_first_and_honours_its_limit(store: TaskStore, clock: FakeClock) -> None:
    base = clock() - 1000
    order = [3, 0, 4, 1, 2]
    tasks = []
    for offset in order:
        task = make_task(clock)
        store.create(task)
        _finish(store, task, _outbox(base + offset * 10))
        tasks.append((offset, task.task_id))
    settled = make_task(clock)
    store.create(settled)
    _finish(store, settled, replace(_outbox(None), state=OutboxState.ABANDONED))
    quiet = make_task(clock)
    store.create(quiet)
    store.transition(quiet.task_id, expected={Q}, to=C, changes={"outbox": None})
    soonest_first = [task_id for _, task_id in sorted(tasks)]

    assert [t.task_id for t in store.due_outbox(before=clock())] == soonest_first
    assert [t.task_id for t in store.due_outbox(before=clock(), limit=2)] == soonest_first[:2]
    assert [t.task_id for t in store.due_outbox(before=base + 25)] == soonest_first[:3]
    # Strictly before, as every ``*_before`` of the stores: one due at ``before`` itself is not due yet.
    assert [t.task_id for t in store.due_outbox(before=base + 20)] == soonest_first[:2]
    assert [t.task_id for t in store.due_outbox(before=base - 1)] == []
    for limit in (0, 1001):
        with pytest.raises(ValueError, match="limit"):
            store.due_outbox(before=clock(), limit=limit)


def test_a_transition_that_clears_the_outbox_takes_the_task_off_the_due_index(store: TaskStore,
                                                                             clock: FakeClock) -> None:
    task = make_task(clock)
    store.create(task)
    store.transition(task.task_id, expected={Q}, to=R, changes={"attempts": 1})
    store.transition(task.task_id, expected={R}, to=F, changes={"outbox": _outbox(clock() - 5)})
    assert [t.task_id for t in store.due_outbox(before=clock())] == [task.task_id]

    # An operator's redrive of the failed task: the old event is dropped with the result it reported.
    redriven = store.transition(task.task_id, expected={F}, to=Q, changes={"outbox": None})

    assert redriven.outbox is None
    assert store.due_outbox(before=clock() + 10**6) == []
