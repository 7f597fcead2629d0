"""Quotas on real stores: token buckets over a fake clock, and the queued and running caps under concurrent
admissions from many threads, each with its own store handle (as separate API processes or workers would)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Protocol, cast

import pytest

from sdasync.auth.keys import ApiKey
from sdasync.auth.quotas import QUEUED_KIND, RUNNING_KIND, Admission, RateLimiter, StartGate
from sdasync.backends.base import TaskStore
from sdasync.backends.records import RecordStore
from sdasync.backends.sqlite.store import SqliteTaskStore
from sdasync.errors import LimitExceeded
from sdasync.models import MAX_ACTIVE_KEY, Api, Task, TaskStatus

Q, R = TaskStatus.QUEUED, TaskStatus.RUNNING


class Store(TaskStore, RecordStore, Protocol):
    """What the tests call on a handle: every task store is also a record store."""


class Ticker:
    """A clock the test moves; it starts at the real time, so the store's own expiry reads stay consistent."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@contextmanager
def sqlite_handles(tmp_path: Path) -> Iterator[Callable[[], Store]]:
    with ExitStack() as stack:
        yield lambda: stack.enter_context(SqliteTaskStore(path=tmp_path / "sdasync.db"))


@contextmanager
def dynamodb_handles(tmp_path: Path) -> Iterator[Callable[[], Store]]:
    from sdasync.backends.aws.dynamodb import DynamoTaskStore

    table = f"sd_quotas-{uuid.uuid4().hex[:12]}"
    with DynamoTaskStore(table=table) as first:
        first.ensure()
        with ExitStack() as stack:
            handles = iter([first])

            def open_handle() -> Store:
                made = next(handles, None) or stack.enter_context(DynamoTaskStore(table=table))
                return cast(Store, made)

            yield open_handle


@pytest.fixture(params=["sqlite", "dynamodb"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens another handle on one store: a second API process, or a worker."""
    if request.param == "dynamodb":
        pytest.importorskip("boto3")
        request.getfixturevalue("aws_endpoint")
        handles = dynamodb_handles(tmp_path)
    else:
        handles = sqlite_handles(tmp_path)
    with handles as opener:
        yield opener


def task(tenant: str, *, status: TaskStatus = Q, max_active: int | None = None, created: float = 0.0) -> Task:
    extra: dict[str, Any] = {} if max_active is None else {MAX_ACTIVE_KEY: max_active}
    made = Task.new(Api.TXT2IMG, {"prompt": "a cat"}, tenant=tenant, extra=extra, now=created or time.time())
    return Task(**{**made.__dict__, "status": status})


def key(key_id: str = "aaaaaaaaaaaa", *, rate: float | None, burst: int | None = None) -> ApiKey:
    return ApiKey(key_id=key_id, tenant="acme", rate=rate, burst=burst)


def run_at_once(count: int, work: Callable[[int], object]) -> list[object]:
    """Run ``work(i)`` on ``count`` threads released together; return what each returned or raised."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def one(i: int) -> None:
        barrier.wait(timeout=60)
        try:
            results[i] = work(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(thread.is_alive() for thread in threads)
    return results


# -- the rate limit

def test_a_token_bucket_over_a_fake_clock(tmp_path: Path) -> None:
    clock = Ticker()
    with SqliteTaskStore(path=tmp_path / "a.db") as one, SqliteTaskStore(path=tmp_path / "a.db") as two:
        first, second = RateLimiter(one, clock=clock), RateLimiter(two, clock=clock)
        limited = key(rate=2.0)  # capacity ceil(2) = 2
        first.take(limited)
        second.take(limited)  # another process draws from the same bucket
        with pytest.raises(LimitExceeded) as over:
            first.take(limited)
        assert over.value.code == "rate_limited" and over.value.http_status == 429
        assert over.value.retry_after_s == pytest.approx(0.5)
        clock.now += 0.25
        with pytest.raises(LimitExceeded) as still:
            second.take(limited)
        assert still.value.retry_after_s == pytest.approx(0.25)
        clock.now += 0.25
        first.take(limited)
        clock.now += 3600  # a long quiet spell refills to the capacity, no more
        for _ in range(2):
            second.take(limited)
        with pytest.raises(LimitExceeded):
            first.take(limited)
        clock.now -= 100  # a process whose clock is behind gets no tokens from it
        with pytest.raises(LimitExceeded):
            first.take(limited)


def test_burst_sizes_the_bucket_and_no_rate_means_no_limit(tmp_path: Path) -> None:
    clock = Ticker()
    with SqliteTaskStore(path=tmp_path / "a.db") as store:
        limiter = RateLimiter(store, clock=clock)
        bursty = key("bbbbbbbbbbbb", rate=0.1, burst=5)
        for _ in range(5):
            limiter.take(bursty)
        with pytest.raises(LimitExceeded) as over:
            limiter.take(bursty)
        assert over.value.retry_after_s == pytest.approx(10.0)
        free = key("cccccccccccc", rate=None)
        for _ in range(50):
            limiter.take(free)
        assert store.get_record("ratebucket", "cccccccccccc") is None, "no rate, no record"
        assert limiter.take(key("dddddddddddd", rate=0.5)) is None  # a fractional rate still allows one
        with pytest.raises(LimitExceeded):
            limiter.take(key("dddddddddddd", rate=0.5))


def test_concurrent_takes_never_overdraw_the_bucket(open_store: Callable[[], Store]) -> None:
    clock = Ticker()  # frozen: no refill while they race
    handles = [open_store() for _ in range(10)]
    limited = key("eeeeeeeeeeee", rate=1.0, burst=5)
    results = run_at_once(30, lambda i: RateLimiter(handles[i % 10], clock=clock).take(limited))
    refused = [r for r in results if isinstance(r, LimitExceeded)]
    assert [r for r in results if r is not None and not isinstance(r, LimitExceeded)] == []
    assert results.count(None) == 5 and len(refused) == 25


# -- the queued cap

def test_fifty_concurrent_admissions_with_a_cap_of_five_admit_exactly_five(
        open_store: Callable[[], Store]) -> None:
    handles = [open_store() for _ in range(10)]
    ids = [uuid.uuid4().hex for _ in range(50)]
    results = run_at_once(50, lambda i: Admission(handles[i % 10]).admit_queued("acme", ids[i], 5))
    admitted = [ids[i] for i, r in enumerate(results) if r is None]
    refused = [r for r in results if isinstance(r, LimitExceeded)]
    assert len(admitted) == 5, results
    assert len(refused) == 45 and {r.code for r in refused} == {"max_queued"}, \
        [r for r in results if r is not None and not isinstance(r, LimitExceeded)]
    # Those five now exist as tasks (the submit goes on); the next admission still counts them.
    for task_id in admitted:
        handles[0].create(Task.new(Api.TXT2IMG, {"prompt": "a cat"}, tenant="acme", task_id=task_id))
    with pytest.raises(LimitExceeded):
        Admission(handles[1]).admit_queued("acme", uuid.uuid4().hex, 5)
    Admission(handles[2]).admit_queued("other", uuid.uuid4().hex, 5)  # another tenant is unaffected


def test_the_count_comes_from_the_tasks_and_the_window_ages_out(tmp_path: Path) -> None:
    clock = Ticker()
    with SqliteTaskStore(path=tmp_path / "a.db") as store:
        admission = Admission(store, clock=clock, window_s=30, retry_after_s=7)
        queued = [task("acme") for _ in range(3)]
        for made in (*queued, task("other"), task("acme", status=R)):
            store.create(made)
        late, fifth, sixth, seventh = (task("acme") for _ in range(4))
        admission.admit_queued("acme", late.task_id, 5)  # 4: its submit has not written the task yet
        admission.admit_queued("acme", queued[0].task_id, 5)  # one already counted, admitted again: still 4
        admission.admit_queued("acme", fifth.task_id, 5)  # 5
        with pytest.raises(LimitExceeded) as full:
            admission.admit_queued("acme", sixth.task_id, 5)
        assert full.value.code == "max_queued" and full.value.retry_after_s == 7
        assert "5 queued tasks" in full.value.message
        store.create(fifth)
        clock.now += 31  # the late one never came (its submit crashed): it over-counted for window_s at most
        admission.admit_queued("acme", sixth.task_id, 5)
        with pytest.raises(LimitExceeded):
            admission.admit_queued("acme", seventh.task_id, 5)  # 3 queued + the fifth + the sixth's admission


def test_a_task_that_leaves_the_queue_frees_its_slot(tmp_path: Path) -> None:
    clock = Ticker()
    with SqliteTaskStore(path=tmp_path / "a.db") as store:
        admission = Admission(store, clock=clock, window_s=30)
        first, second = task("acme"), task("acme")
        admission.admit_queued("acme", first.task_id, 2)
        store.create(first)
        admission.admit_queued("acme", second.task_id, 2)  # not written yet: its window entry counts
        with pytest.raises(LimitExceeded):
            admission.admit_queued("acme", "t-third", 2)
        admission.forget("acme", second.task_id)  # its submit failed after admission
        admission.admit_queued("acme", "t-third", 2)
        with pytest.raises(LimitExceeded):
            admission.admit_queued("acme", "t-fourth", 2)
        store.transition(first.task_id, expected={Q}, to=R, attempt=0, changes={"attempts": 1})
        admission.admit_queued("acme", "t-fourth", 2)  # the first one started: its slot is free
        with pytest.raises(LimitExceeded):
            admission.admit_queued("acme", "t-fifth", 2)  # t-third and t-fourth, never written, count while young
        clock.now += 31  # ...and age out: an admission whose submit crashed over-counts for window_s at most
        admission.admit_queued("acme", "t-fifth", 2)
        record = store.get_record(QUEUED_KIND, "t:acme")
        assert record is not None and set(record.data["entries"]) == {"t-fifth"}


# -- the running cap

def test_the_start_gate_counts_running_tasks_but_not_the_task_itself(tmp_path: Path) -> None:
    clock = Ticker()
    with SqliteTaskStore(path=tmp_path / "a.db") as store:
        gate = StartGate(store, clock=clock, retry_s=4.0)
        running = [task("acme", status=R, max_active=2) for _ in range(2)]
        waiting = task("acme", max_active=2)
        for made in (*running, waiting):
            store.create(made)
        assert gate.enter(running[0]) is None, "a running task re-entering (a re-claim) does not count itself"
        wait = gate.enter(waiting)
        assert wait is not None and 2.0 <= wait <= 6.0
        assert gate.enter(task("other", max_active=2)) is None, "other tenants are unaffected"
        store.transition(running[1].task_id, expected={R}, to=TaskStatus.SUCCEEDED)
        gate.leave(running[0])
        assert gate.enter(waiting) is None
        wait = gate.enter(task("acme", max_active=2))
        assert wait is not None, "the slot is taken from the gate on, before the claim shows in the index"
        gate.leave(waiting)
        assert gate.enter(task("acme", max_active=2)) is None


def test_a_task_without_a_cap_passes_the_gate_without_any_io() -> None:
    class NoStore:
        """Has every method the gate could call, and fails the test if one is."""

        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)

            def called(*args: object, **kwargs: object) -> None:
                raise AssertionError(f"the gate called the store's {name}")

            return called

    store = cast(TaskStore, NoStore())
    assert isinstance(store, RecordStore)
    gate = StartGate(store)
    free = task("acme")
    assert gate.enter(free) is None
    gate.leave(free)


def test_concurrent_workers_start_at_most_the_cap(open_store: Callable[[], Store]) -> None:
    handles = [open_store() for _ in range(10)]
    tasks = [task("acme", max_active=3) for _ in range(20)]
    for made in tasks:
        handles[0].create(made)
    results = run_at_once(20, lambda i: StartGate(handles[i % 10]).enter(tasks[i]))
    assert [r for r in results if not isinstance(r, float | type(None))] == []
    assert results.count(None) == 3
    record = handles[0].get_record(RUNNING_KIND, "t:acme")
    assert record is not None and len(record.data["entries"]) == 3
