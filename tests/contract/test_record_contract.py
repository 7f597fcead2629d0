"""The RecordStore contract (``backends/records.py``), run against every task store in ``backends.STORE_FACTORIES``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from sdasync.backends.base import TaskStore
from sdasync.backends.records import MAX_DATA_BYTES, Record, RecordStore
from sdasync.errors import RecordConflict, RequestError

from .backends import FakeClock
from .tasks import Q, make_task


def records(store: TaskStore) -> RecordStore:
    assert isinstance(store, RecordStore)
    return store


def _typed(value: Any) -> Any:
    """``value`` with every scalar paired with its type, so equality also compares types (``1.0 == 1`` does not)."""
    if isinstance(value, dict):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    return (type(value).__name__, value)


def test_every_task_store_is_a_record_store(store: TaskStore) -> None:
    assert isinstance(store, RecordStore)


def test_a_create_then_get_returns_the_record_and_a_second_create_conflicts(store: TaskStore) -> None:
    rs = records(store)
    assert rs.get_record("apikey", "k1") is None

    created = rs.put_record("apikey", "k1", {"tenant": "acme"}, version=None)

    assert created == Record(kind="apikey", key="k1", data={"tenant": "acme"}, version=1, expires_at=None)
    assert rs.get_record("apikey", "k1") == created
    with pytest.raises(RecordConflict) as caught:
        rs.put_record("apikey", "k1", {"tenant": "other"}, version=None)
    assert caught.value.current == created
    assert rs.get_record("apikey", "k1") == created


def test_a_replace_needs_the_current_version(store: TaskStore) -> None:
    rs = records(store)
    rs.put_record("bucket", "acme", {"tokens": 1}, version=None)

    second = rs.put_record("bucket", "acme", {"tokens": 2}, version=1)

    assert (second.version, second.data) == (2, {"tokens": 2})
    with pytest.raises(RecordConflict) as caught:
        rs.put_record("bucket", "acme", {"tokens": 3}, version=1)  # stale: someone wrote version 2 meanwhile
    assert caught.value.current == second
    with pytest.raises(RecordConflict) as absent:
        rs.put_record("bucket", "nobody", {"tokens": 3}, version=1)
    assert absent.value.current is None
    assert rs.get_record("bucket", "nobody") is None
    assert rs.put_record("bucket", "acme", {"tokens": 4}, version=2).version == 3


def test_floats_and_nested_data_read_back_as_written(store: TaskStore) -> None:
    rs = records(store)
    data = {"f": 1.0, "i": 1, "neg": -2.5, "big": 2**53, "t": True, "n": None, "s": "ünïcode ☃", "empty": {},
            "nested": {"list": [1, 2.0, "x", None, False, {"deep": [0.5, []]}], "k#:.@-": "v"}}

    written = rs.put_record("tenant", "acme", data, version=None, expires_at=1_900_000_000.5)

    for got in (written, rs.get_record("tenant", "acme")):
        assert got is not None
        assert _typed(got.data) == _typed(data)
        assert got.expires_at == 1_900_000_000.5


def test_an_expired_record_reads_as_absent_and_can_be_created_again(store: TaskStore, clock: FakeClock) -> None:
    rs = records(store)
    rs.put_record("idem", "acme#abc", {"task": "t1"}, version=None, expires_at=clock() + 1)
    live = rs.put_record("idem", "acme#live", {"task": "t2"}, version=None, expires_at=clock() + 3600)
    assert rs.get_record("idem", "acme#abc") is not None

    clock.advance(1.5)

    assert rs.get_record("idem", "acme#abc") is None
    assert rs.get_record("idem", "acme#live") == live
    assert [r.key for r in rs.list_records("idem").records] == ["acme#live"]
    with pytest.raises(RecordConflict) as caught:  # an expired record cannot be replaced either: it is absent
        rs.put_record("idem", "acme#abc", {"task": "t3"}, version=1)
    assert caught.value.current is None
    assert rs.delete_record("idem", "acme#abc") is False
    again = rs.put_record("idem", "acme#abc", {"task": "t4"}, version=None)
    assert (again.version, again.data, again.expires_at) == (1, {"task": "t4"}, None)
    assert rs.get_record("idem", "acme#abc") == again


def test_a_record_expiring_now_is_already_absent(store: TaskStore, clock: FakeClock) -> None:
    if clock.is_real:
        pytest.skip("the boundary needs a clock the test controls")
    rs = records(store)
    rs.put_record("win", "w", {}, version=None, expires_at=clock() + 10)
    clock.advance(10)
    assert rs.get_record("win", "w") is None
    assert rs.put_record("win", "w", {"n": 1}, version=None).version == 1


def test_delete_with_a_version_deletes_only_that_version(store: TaskStore) -> None:
    rs = records(store)
    rs.put_record("apikey", "k", {"v": 1}, version=None)
    current = rs.put_record("apikey", "k", {"v": 2}, version=1)

    assert rs.delete_record("apikey", "k", version=1) is False
    assert rs.get_record("apikey", "k") == current
    assert rs.delete_record("apikey", "k", version=2) is True
    assert rs.get_record("apikey", "k") is None
    assert rs.delete_record("apikey", "k") is False
    rs.put_record("apikey", "k2", {}, version=None)
    assert rs.delete_record("apikey", "k2") is True
    assert rs.get_record("apikey", "k2") is None


def test_list_pages_through_one_kind_by_key(store: TaskStore) -> None:
    rs = records(store)
    keys = [f"acme#{i:02d}" for i in (5, 3, 0, 6, 1, 4, 2)]
    for key in keys:
        rs.put_record("apikey", key, {"k": key}, version=None)
    for key in ("a", "b", "c"):
        rs.put_record("tenant", key, {}, version=None)
    rs.put_record("apikeys", "acme#99", {}, version=None)  # a kind whose name extends the other's

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        page = rs.list_records("apikey", limit=3, cursor=cursor)
        assert len(page.records) <= 3
        assert all(r.kind == "apikey" and r.data == {"k": r.key} for r in page.records)
        seen += [r.key for r in page.records]
        cursor = page.next_cursor
        if cursor is None:
            break

    assert seen == sorted(keys)
    assert [r.key for r in rs.list_records("tenant").records] == ["a", "b", "c"]
    assert rs.list_records("nothing") == rs.list_records("nothing", limit=1)
    assert rs.list_records("nothing").records == []
    assert rs.list_records("nothing").next_cursor is None


def test_list_refuses_bad_cursors_and_limits(store: TaskStore) -> None:
    rs = records(store)
    for key in ("a", "b"):
        rs.put_record("one", key, {}, version=None)
        rs.put_record("two", key, {}, version=None)
    cursor = rs.list_records("one", limit=1).next_cursor
    assert cursor is not None

    for bad in ("not a cursor!", "eyJ4IjoxfQ"):
        with pytest.raises(RequestError) as caught:
            rs.list_records("one", cursor=bad)
        assert caught.value.field == "cursor"
    with pytest.raises(RequestError) as other_kind:  # a cursor of another kind's listing
        rs.list_records("two", cursor=cursor)
    assert other_kind.value.field == "cursor"
    for limit in (0, 1001):
        with pytest.raises(ValueError, match="limit"):
            rs.list_records("one", limit=limit)


@pytest.mark.parametrize(("kind", "key"), [
    ("", "k"), ("a b", "k"), ("k" * 41, "k"), ("a#b", "k"), ("apikey", ""), ("apikey", "a/b"),
    ("apikey", "x" * 201), ("apikey", "ünï"),
])
def test_bad_kinds_and_keys_are_value_errors(store: TaskStore, kind: str, key: str) -> None:
    rs = records(store)
    # The message of check_record_key, which every store calls first.
    with pytest.raises(ValueError, match="invalid record"):
        rs.get_record(kind, key)
    with pytest.raises(ValueError, match="invalid record"):
        rs.put_record(kind, key, {}, version=None)
    with pytest.raises(ValueError, match="invalid record"):
        rs.delete_record(kind, key)


@pytest.mark.parametrize("data", [
    ["a list"], "text", None, {"set": {1, 2}}, {"blob": "x" * (MAX_DATA_BYTES + 1)},
])
def test_bad_data_is_a_value_error_and_writes_nothing(store: TaskStore, data: Any) -> None:
    rs = records(store)
    # Each store words its own reason; all of them name what is wrong with the data.
    with pytest.raises(ValueError, match=r"(?i)data|json|bytes|serializ"):
        rs.put_record("apikey", "k", data, version=None)
    assert rs.get_record("apikey", "k") is None


def test_data_at_the_size_limit_is_stored(store: TaskStore) -> None:
    rs = records(store)
    data = {"blob": "x" * (MAX_DATA_BYTES - len('{"blob":""}'))}
    assert rs.put_record("apikey", "big", data, version=None).data == data
    got = rs.get_record("apikey", "big")
    assert got is not None and got.data == data


def test_records_are_not_tasks(store: TaskStore, clock: FakeClock) -> None:
    rs = records(store)
    rs.put_record("tenant", "acme", {"q": 1}, version=None)
    task = make_task(clock)
    store.create(task)

    assert store.list(limit=1000).tasks == [task]
    assert store.stale(status=Q, updated_before=clock() + 10**6) == [task]
    assert store.due_outbox(before=clock() + 10**6) == []


def _race(contenders: int, attempt: Callable[[], Record]) -> tuple[list[Record], list[RecordConflict]]:
    barrier = threading.Barrier(contenders)
    won: list[Record] = []
    lost: list[RecordConflict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            barrier.wait(timeout=30)
            record = attempt()
            with lock:
                won.append(record)
        except RecordConflict as conflict:
            with lock:
                lost.append(conflict)
        except BaseException as error:
            with lock:
                errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    return won, lost


def test_of_fifty_threads_creating_one_record_exactly_one_succeeds(store: TaskStore,
                                                                   open_store: Callable[[], TaskStore]) -> None:
    # A few handles, as several API processes would have, each shared by several threads.
    handles = [records(store)] + [records(open_store()) for _ in range(3)]
    counter = iter(range(10**6))
    lock = threading.Lock()

    def create() -> Record:
        with lock:
            n = next(counter)
        return handles[n % len(handles)].put_record("idem", "acme#same", {"by": n}, version=None)

    won, lost = _race(50, create)

    assert len(won) == 1
    assert len(lost) == 49
    assert records(store).get_record("idem", "acme#same") == won[0]
    # Every loser is told what beat it: the record as the winner wrote it.
    assert all(conflict.current == won[0] for conflict in lost)


def test_of_threads_replacing_one_version_exactly_one_succeeds(store: TaskStore) -> None:
    rs = records(store)
    rs.put_record("bucket", "acme", {"n": 0}, version=None)

    won, lost = _race(10, lambda: rs.put_record("bucket", "acme", {"n": 1}, version=1))

    assert (len(won), len(lost)) == (1, 9)
    assert rs.get_record("bucket", "acme") == won[0]
    assert won[0].version == 2
