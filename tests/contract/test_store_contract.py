"""The TaskStore contract, run against every backend in ``backends.STORE_FACTORIES``."""

from __future__ import annotations

import base64
import itertools
import json
import threading
from typing import Any

import pytest

from sdasync.backends.base import TaskStore
from sdasync.errors import RequestError, TaskConflict, TaskNotFound
from sdasync.models import Api, AttemptRecord, Task, TaskError, TaskStatus, can_transition, plain_field

from .backends import FakeClock
from .tasks import RECORD, RECORD_READ, C, F, Q, R, S, make_task, next_id


def requires(store: TaskStore, capability: str) -> None:
    if capability not in store.capabilities:
        pytest.skip(f"backend lacks capability {capability!r}")


def test_implements_the_protocol(store: TaskStore) -> None:
    assert isinstance(store, TaskStore)
    assert isinstance(store.capabilities, frozenset)
    assert store.__enter__() is store


def test_create_then_get_returns_an_equal_task(store: TaskStore, clock: FakeClock) -> None:
    full = Task(
        task_id="full-task", api=Api.IMG2IMG,
        payload={"prompt": "ünïcode ☃", "steps": 20, "cfg_scale": 7.5, "init_images": ["aGk="], "seed": -1,
                 "override_settings": {"nested": [1, 2.5, None, True, {"k": "v"}]}},
        status=TaskStatus.FAILED, created_at=1_700_000_000.123456, updated_at=1_700_000_012.654321,
        started_at=1_700_000_001.5, finished_at=1_700_000_012.25, attempts=3, images=("full-task/0.png", "x/1.png"),
        info={"seed": 42, "all_seeds": [42, 43]}, error=TaskError(code="engine_error", message="boom"),
        progress={"fraction": 0.5, "eta_s": None}, worker="host-1:123", extra={"client": "cli", "tags": ["a"]},
        lease_until=1_700_000_072.5, history=(RECORD, {**RECORD, "attempt": 2, "outcome": "lost", "error": None}),
    )
    minimal = Task.new(Api.TXT2IMG, {}, now=clock())

    for task in (full, minimal):
        store.create(task)
        got = store.get(task.task_id)
        assert got == task
        assert type(got.api) is Api
        assert type(got.status) is TaskStatus
        assert isinstance(got.images, tuple)
        assert got.error is None or type(got.error) is TaskError
        assert isinstance(got.history, tuple)


def _typed(value: Any) -> Any:
    """``value`` with every scalar paired with its type, so equality also compares types (``1.0 == 1`` does not)."""
    if isinstance(value, dict):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_typed(item) for item in value]
    return (type(value).__name__, value)


def _plain(task: Task) -> dict[str, Any]:
    return {"payload": task.payload, "info": task.info, "extra": task.extra,
            **{name: plain_field(name, getattr(task, name)) for name in ("progress", "history")}}


def test_numbers_read_back_with_their_types(store: TaskStore, clock: FakeClock) -> None:
    # SQLite keeps JSON text, DynamoDB one number type that turns 1.0 into 1: both must give back what was written.
    numbers: dict[str, Any] = {"one": 1.0, "zero": 0, "zero_f": 0.0, "half": 0.5, "neg": -2.0, "big": 2**53 + 1,
                               "flag": True, "nested": [1.0, 0, [2.0, {"x": 0.0, "y": [3, 4.0]}], {"z": 1}]}
    record = {**RECORD, "started_at": 1_700_000_000.0, "ended_at": 1_700_000_002.0}
    task = Task(task_id=next_id(), api=Api.TXT2IMG, payload={"cfg_scale": 7.0, "seed": 0, "denoising_strength": 0.5,
                                                            "grid": numbers}, created_at=clock(),
                updated_at=clock(), info={"cfg_scale": 1.0, "all_seeds": [0, 1], "deep": numbers},
                progress={"fraction": 1.0, "step": 20, "steps": 20, "eta_s": 0.0}, extra={"weight": 1.0, "n": 1},
                history=(record,))
    store.create(task)

    got = store.get(task.task_id)
    assert _typed(_plain(got)) == _typed(_plain(task))

    changes = {"info": {"cfg_scale": 2.0, "list": [0.0, 1]}, "history": (record, {**record, "attempt": 2}),
               "progress": {"fraction": 0.0, "step": 0, "steps": 20, "eta_s": 3.0}}
    moved = store.transition(task.task_id, expected={Q}, to=R, changes=changes)
    again = store.get(task.task_id)
    for read in (moved, again):
        assert _typed(_plain(read)) == _typed(_plain(task.with_changes(R, changes, read.updated_at)))
    # And back to none: a field set to None leaves nothing behind that could retype a later value.
    store.transition(task.task_id, expected={R}, to=R, changes={"info": None, "progress": None})
    cleared = store.transition(task.task_id, expected={R}, to=R, changes={"info": {"cfg_scale": 3}})
    assert _typed(store.get(task.task_id).info) == _typed({"cfg_scale": 3}) == _typed(cleared.info)


def test_get_of_an_unknown_task_raises_not_found(store: TaskStore) -> None:
    with pytest.raises(TaskNotFound):
        store.get("no-such-task")


def test_duplicate_create_conflicts_and_keeps_the_original(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock)
    store.create(task)

    with pytest.raises(TaskConflict):
        store.create(Task(task_id=task.task_id, api=Api.IMG2IMG, payload={"other": True}))
    assert store.get(task.task_id) == task


def test_transitions_follow_the_table(store: TaskStore, clock: FakeClock) -> None:
    for src, dst in itertools.product(TaskStatus, repeat=2):
        task = make_task(clock, status=src)
        store.create(task)
        if can_transition(src, dst):
            assert store.transition(task.task_id, expected={src}, to=dst).status == dst, (src, dst)
        else:
            with pytest.raises(ValueError, match="not allowed"):
                store.transition(task.task_id, expected={src}, to=dst)
            assert store.get(task.task_id) == task, (src, dst)


def test_transition_refuses_bad_arguments_before_writing(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock)
    store.create(task)

    with pytest.raises(ValueError, match="at least one"):
        store.transition(task.task_id, expected=set(), to=R)
    with pytest.raises(ValueError, match="mutable"):
        store.transition(task.task_id, expected={Q}, to=R, changes={"payload": {}})
    with pytest.raises(ValueError, match="mutable"):
        store.transition(task.task_id, expected={Q}, to=R, changes={"status": "succeeded"})
    assert store.get(task.task_id) == task


def test_transition_of_an_unknown_task_raises_not_found(store: TaskStore) -> None:
    with pytest.raises(TaskNotFound):
        store.transition("no-such-task", expected={Q}, to=R)


def test_transition_applies_changes_and_returns_the_stored_task(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock, status=R)
    store.create(task)

    done = store.transition(task.task_id, expected={R}, to=S, changes={
        "images": ("a/0.png", "a/1.png"), "info": {"seed": 7}, "finished_at": 1_700_000_100.5,
        "progress": None, "worker": "w1", "error": None, "attempts": 1, "started_at": 1_700_000_050.0,
    })

    assert done == store.get(task.task_id)
    assert (done.status, done.images, done.info, done.finished_at, done.worker, done.attempts) == (
        S, ("a/0.png", "a/1.png"), {"seed": 7}, 1_700_000_100.5, "w1", 1)
    assert (done.payload, done.created_at) == (task.payload, task.created_at)

    failed = make_task(clock, status=R)
    store.create(failed)
    error = TaskError(code="engine_timeout", message="no answer in 600 s")
    assert store.transition(failed.task_id, expected={R}, to=F, changes={"error": error}).error == error
    assert store.get(failed.task_id).error == error


def test_lost_compare_and_set_carries_the_current_task(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock)
    store.create(task)
    cancelled = store.transition(task.task_id, expected={Q}, to=C)

    with pytest.raises(TaskConflict) as caught:
        store.transition(task.task_id, expected={Q, R}, to=F)

    assert caught.value.current == cancelled == store.get(task.task_id)


def test_a_stale_attempt_cannot_write(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock)
    store.create(task)
    store.transition(task.task_id, expected={Q}, to=R, attempt=0, changes={"attempts": 1, "worker": "old"})
    # The old worker looked dead; another one re-claims the task with the next attempt number.
    store.transition(task.task_id, expected={R}, to=R, attempt=1, changes={"attempts": 2, "worker": "new"})

    with pytest.raises(TaskConflict) as caught:
        store.transition(task.task_id, expected={R}, to=S, attempt=1, changes={"images": ("late.png",)})
    assert caught.value.current is not None
    assert (caught.value.current.attempts, caught.value.current.worker) == (2, "new")

    done = store.transition(task.task_id, expected={R}, to=S, attempt=2, changes={"images": ("x/0.png",)})
    assert (done.status, done.images, done.worker) == (S, ("x/0.png",), "new")


def test_lease_and_history_round_trip_through_transitions(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock)
    store.create(task)
    lease = clock() + 60.25

    claimed = store.transition(task.task_id, expected={Q}, to=R, attempt=0,
                               changes={"attempts": 1, "worker": "w1", "lease_until": lease})
    assert (claimed.lease_until, claimed.history) == (lease, ())
    retried = store.transition(task.task_id, expected={R}, to=Q, attempt=1,
                               changes={"lease_until": None, "history": (RECORD,)})

    assert (retried.lease_until, retried.history) == (None, (RECORD_READ,))
    assert store.get(task.task_id) == retried
    assert all(type(record) is AttemptRecord for record in store.get(task.task_id).history)


def test_a_live_lease_keeps_other_workers_out(store: TaskStore, clock: FakeClock) -> None:
    now = clock()
    task = make_task(clock)
    store.create(task)
    store.transition(task.task_id, expected={Q}, to=R, attempt=0, changes={"attempts": 1, "worker": "w1"})
    # The holder's heartbeat: running -> running on its own attempt, pushing the lease forward.
    held = store.transition(task.task_id, expected={R}, to=R, attempt=1, changes={"lease_until": now + 100})
    claim = {"attempts": 2, "worker": "w2", "lease_until": now + 300}

    for before in (now, now + 100):  # the lease runs until now + 100 inclusive
        with pytest.raises(TaskConflict) as caught:
            store.transition(task.task_id, expected={Q, R}, to=R, attempt=1, changes=claim,
                             lease_expired_before=before)
        assert caught.value.current == held == store.get(task.task_id)

    taken = store.transition(task.task_id, expected={Q, R}, to=R, attempt=1, changes=claim,
                             lease_expired_before=now + 200)
    assert (taken.attempts, taken.worker, taken.lease_until) == (2, "w2", now + 300)
    # The old holder's next heartbeat is fenced off by the attempt number.
    with pytest.raises(TaskConflict):
        store.transition(task.task_id, expected={R}, to=R, attempt=1, changes={"lease_until": now + 400})


def test_a_running_task_without_a_lease_is_claimable(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock, status=R)
    store.create(task)

    taken = store.transition(task.task_id, expected={R}, to=R, changes={"attempts": 1},
                             lease_expired_before=clock())

    assert (taken.status, taken.attempts) == (R, 1)


def test_a_queued_task_is_claimable_whatever_its_lease(store: TaskStore, clock: FakeClock) -> None:
    now = clock()
    # A lease left over from an attempt that put the task back in the queue does not hold a queued task.
    leftover = Task(task_id=next_id(), api=Api.TXT2IMG, payload={}, created_at=now, updated_at=now,
                    lease_until=now + 100)
    store.create(leftover)
    fresh = make_task(clock)
    store.create(fresh)

    for task in (leftover, fresh):
        taken = store.transition(task.task_id, expected={Q, R}, to=R, attempt=0, lease_expired_before=now,
                                 changes={"attempts": 1, "lease_until": now + 60})
        assert (taken.status, taken.attempts, taken.lease_until) == (R, 1, now + 60)


def test_the_lease_condition_leaves_other_transitions_alone(store: TaskStore, clock: FakeClock) -> None:
    # Cancelling a queued task, say: only a running task's lease can fail the condition.
    task = make_task(clock)
    store.create(task)

    with pytest.raises(TaskConflict):  # and the status condition still applies
        store.transition(task.task_id, expected={R}, to=F, lease_expired_before=clock())
    assert store.transition(task.task_id, expected={Q}, to=C, lease_expired_before=clock()).status == C


def test_an_operator_may_redrive_a_failed_task_but_nothing_else_ends_undone(store: TaskStore,
                                                                          clock: FakeClock) -> None:
    failed, succeeded, cancelled = (make_task(clock, status=status) for status in (F, S, C))
    for task in (failed, succeeded, cancelled):
        store.create(task)

    assert store.transition(failed.task_id, expected={F}, to=Q, changes={"error": None}).status == Q
    for task in (succeeded, cancelled):
        with pytest.raises(ValueError, match="not allowed"):
            store.transition(task.task_id, expected={task.status}, to=Q)
        assert store.get(task.task_id) == task
    with pytest.raises(ValueError, match="not allowed"):
        store.transition(failed.task_id, expected={F, S}, to=Q)


def test_transition_sets_updated_at(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock)
    store.create(task)
    before = clock()
    clock.advance(0.05)

    moved = store.transition(task.task_id, expected={Q}, to=R)

    assert moved.updated_at >= before + 0.05 - 1e-6
    assert moved.updated_at > task.updated_at
    assert moved.created_at == task.created_at
    if not clock.is_real:
        assert moved.updated_at == clock()


def _race_to_claim(store: TaskStore, task_id: str, contenders: int, *, attempt: int = 0,
                   lease_expired_before: float | None = None) -> tuple[list[str], list[TaskConflict]]:
    """``contenders`` threads released together, each claiming ``task_id`` (queued, or running at ``attempt``) for
    the next attempt."""
    barrier = threading.Barrier(contenders)
    winners: list[str] = []
    losers: list[TaskConflict] = []
    unexpected: list[BaseException] = []

    def claim(worker: str) -> None:
        barrier.wait(timeout=10)
        try:
            store.transition(task_id, expected={Q, R}, to=R, attempt=attempt, lease_expired_before=lease_expired_before,
                             changes={"attempts": attempt + 1, "worker": worker})
            winners.append(worker)
        except TaskConflict as conflict:
            losers.append(conflict)
        except BaseException as error:
            unexpected.append(error)

    threads = [threading.Thread(target=claim, args=(f"w{n}",)) for n in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert unexpected == []
    return winners, losers


def test_concurrent_claims_from_threads_have_one_winner(store: TaskStore, clock: FakeClock) -> None:
    for _ in range(5):
        task = make_task(clock)
        store.create(task)

        winners, losers = _race_to_claim(store, task.task_id, contenders=8)

        assert len(winners) == 1
        assert len(losers) == 7
        assert store.get(task.task_id).worker == winners[0]
        assert all(conflict.current is not None and conflict.current.status == R for conflict in losers)


def test_concurrent_claims_of_an_expired_lease_have_one_winner(store: TaskStore, clock: FakeClock) -> None:
    task = make_task(clock)
    store.create(task)
    store.transition(task.task_id, expected={Q}, to=R, attempt=0,
                     changes={"attempts": 1, "worker": "dead", "lease_until": clock() - 1})

    winners, losers = _race_to_claim(store, task.task_id, contenders=8, attempt=1, lease_expired_before=clock())

    assert len(winners) == 1
    assert len(losers) == 7
    assert (store.get(task.task_id).attempts, store.get(task.task_id).worker) == (2, winners[0])


def _list_all(store: TaskStore, *, status: TaskStatus | None = None, limit: int) -> list[list[Task]]:
    pages: list[list[Task]] = []
    cursor: str | None = None
    while True:
        page = store.list(status=status, limit=limit, cursor=cursor)
        assert len(page.tasks) <= limit
        pages.append(page.tasks)
        if page.next_cursor is None:
            return pages
        assert len(pages) < 100, "pagination does not end"
        cursor = page.next_cursor


def _seed(store: TaskStore, clock: FakeClock) -> list[Task]:
    base = clock()
    tasks = [make_task(clock, created_at=base + i, status=(Q, R, S)[i % 3]) for i in range(11)]
    # Equal creation times: the task id breaks the tie.
    tasks += [make_task(clock, created_at=base + 5, status=Q, task_id=f"tie-{c}") for c in "bca"]
    for task in tasks:
        store.create(task)
    return sorted(tasks, key=lambda t: (t.created_at, t.task_id), reverse=True)


def test_list_is_newest_first_and_filters_by_status(store: TaskStore, clock: FakeClock) -> None:
    requires(store, "list")
    newest_first = _seed(store, clock)

    assert store.list(limit=1000).tasks == newest_first
    for status in TaskStatus:
        assert store.list(status=status, limit=1000).tasks == [t for t in newest_first if t.status == status]


@pytest.mark.parametrize("limit", [1, 4, 14, 50])
def test_pagination_covers_every_task_exactly_once(store: TaskStore, clock: FakeClock, limit: int) -> None:
    requires(store, "list")
    newest_first = _seed(store, clock)

    assert [t for page in _list_all(store, limit=limit) for t in page] == newest_first
    queued = [t for page in _list_all(store, status=Q, limit=limit) for t in page]
    assert queued == [t for t in newest_first if t.status == Q]


def test_pages_stay_stable_when_tasks_are_added_between_them(store: TaskStore, clock: FakeClock) -> None:
    requires(store, "list")
    newest_first = _seed(store, clock)
    first = store.list(limit=5)
    store.create(make_task(clock, created_at=clock() + 1000))  # newer than everything: belongs before page 1
    assert first.next_cursor is not None

    rest = store.list(limit=1000, cursor=first.next_cursor).tasks

    assert first.tasks + rest == newest_first


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize("cursor", [
    "not a cursor!", "", "%%%", _b64(b"not json"), _b64(json.dumps([1, 2]).encode()),
    _b64(json.dumps({"x": 1}).encode()), _b64(b"\xff\xfe"),
])
def test_a_bad_cursor_is_a_request_error(store: TaskStore, cursor: str) -> None:
    requires(store, "list")
    with pytest.raises(RequestError) as caught:
        store.list(cursor=cursor)
    assert caught.value.field == "cursor"


@pytest.mark.parametrize("limit", [0, -1, 1001])
def test_limit_out_of_range_is_a_request_error(store: TaskStore, limit: int) -> None:
    requires(store, "list")
    with pytest.raises(RequestError) as caught:
        store.list(limit=limit)
    assert caught.value.field == "limit"
