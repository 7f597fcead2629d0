"""SqliteTaskStore beyond the contract: its URL, its file shared with the queue, the upgrade of old files, the
indexes its listings read, the pruning of expired records."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from sdasync.backends.sqlite import records as record_rows
from sdasync.backends.sqlite.queue import SqliteQueue
from sdasync.backends.sqlite.store import ADDED_INDEXES, SqliteTaskStore
from sdasync.errors import BackendError, ConfigError, RequestError
from sdasync.models import Api, Task, TaskError, TaskProgress, TaskStatus
from sdasync.outbox import Event, Outbox

from .backends import FakeClock
from .tasks import RECORD, F, Q, R, S, make_task


def test_sqlite_store_from_url_parses_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    assert SqliteTaskStore.from_url("sqlite:///data/sdasync.db").path == Path("data/sdasync.db")
    assert SqliteTaskStore.from_url(f"sqlite:///{tmp_path}/x.db").path == tmp_path / "x.db"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="valid: none"):
        SqliteTaskStore.from_url("sqlite:///data/sdasync.db?name=tasks")


def test_sqlite_store_shares_its_file_with_the_queue(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "deep" / "er" / "sdasync.db"
    with SqliteTaskStore(path=path, clock=clock) as store, SqliteQueue(path=path, clock=clock) as queue:
        task = make_task(clock)
        store.create(task)
        queue.send(task.task_id)

        assert queue.receive()[0].body == task.task_id
        assert store.get(task.task_id) == task
    with SqliteTaskStore(path=path, clock=clock) as store:
        assert store.get(task.task_id) == task  # and it persists


def test_sqlite_store_refuses_a_cursor_from_another_status_filter(tmp_path: Path, clock: FakeClock) -> None:
    with SqliteTaskStore(path=tmp_path / "s.db", clock=clock) as store:
        for i in range(3):
            store.create(make_task(clock, created_at=clock() + i))
        cursor = store.list(status=Q, limit=1).next_cursor
        assert cursor is not None

        with pytest.raises(RequestError) as caught:
            store.list(limit=1, cursor=cursor)
        assert caught.value.field == "cursor"


def test_sqlite_store_refuses_changes_of_the_wrong_shape(tmp_path: Path, clock: FakeClock) -> None:
    with SqliteTaskStore(path=tmp_path / "s.db", clock=clock) as store:
        task = make_task(clock)
        store.create(task)
        for changes in ({"images": "0.png"}, {"attempts": "1"}, {"error": {"code": "x"}}, {"info": [1]}):
            with pytest.raises(ValueError, match="must be"):
                store.transition(task.task_id, expected={Q}, to=R, changes=changes)
        assert store.get(task.task_id) == task
        moved = store.transition(task.task_id, expected={Q}, to=F, changes={"error": {"code": "c", "message": "m"}})
        assert moved.error == TaskError(code="c", message="m")


def test_sqlite_errors_become_backend_errors(tmp_path: Path, clock: FakeClock) -> None:
    with SqliteTaskStore(path=tmp_path, clock=clock) as store, pytest.raises(BackendError) as caught:  # a directory
        store.get("x")
    assert isinstance(caught.value.__cause__, sqlite3.Error)


#: The tasks table as versions before leases and histories created it, copied verbatim.
OLD_SCHEMA = """
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY, api TEXT NOT NULL, payload TEXT NOT NULL, status TEXT NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0, images TEXT NOT NULL, info TEXT, error TEXT, progress TEXT, worker TEXT,
        extra TEXT NOT NULL
    )
"""
OLD_COLUMNS = ("task_id", "api", "payload", "status", "created_at", "updated_at", "started_at", "finished_at",
               "attempts", "images", "info", "error", "progress", "worker", "extra")


def _insert_old_row(conn: sqlite3.Connection, task_id: str, status: TaskStatus = R) -> None:
    # The column list an older process still running against the same file would use.
    conn.execute(f"INSERT INTO tasks ({', '.join(OLD_COLUMNS)}) VALUES ({', '.join('?' * len(OLD_COLUMNS))})",
                 (task_id, str(Api.TXT2IMG), '{"prompt":"old"}', str(status), 1_600_000_000.0, 1_600_000_001.0,
                  1_600_000_000.5, None, 1, '["a/0.png"]', None, None, '{"fraction":0.5}', "w-old", "{}"))


def _old_database(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(OLD_SCHEMA)
        _insert_old_row(conn, "old-1")
    conn.close()


def test_sqlite_store_upgrades_a_file_of_the_old_schema(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "old.db"
    _old_database(path)

    with SqliteTaskStore(path=path, clock=clock) as store:
        old = store.get("old-1")
        assert (old.status, old.attempts, old.images, old.progress, old.worker) == (
            R, 1, ("a/0.png",), TaskProgress(fraction=0.5), "w-old")
        assert (old.lease_until, old.history, old.tenant, old.outbox) == (None, (), "", None)
        assert [t.task_id for t in store.list(tenant="", limit=10).tasks] == ["old-1"]
        assert store.due_outbox(before=clock()) == []
        # A lease-conditional claim works on the upgraded rows: no lease counts as an expired one.
        taken = store.transition("old-1", expected={R}, to=R, attempt=1, lease_expired_before=clock(),
                                 changes={"attempts": 2, "lease_until": clock() + 60, "history": (RECORD,)})
        assert store.get("old-1") == taken
        new = make_task(clock)
        store.create(new)
        assert store.get(new.task_id) == new

    with sqlite3.connect(path) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        # A process of the old version, still running, can go on inserting rows: the new columns have defaults.
        _insert_old_row(conn, "old-2", status=Q)
    conn.close()
    assert {"lease_until", "history", "tenant", "outbox", "outbox_due"} <= columns
    assert set(ADDED_INDEXES) <= indexes
    with SqliteTaskStore(path=path, clock=clock) as store:
        assert (store.get("old-2").lease_until, store.get("old-2").history, store.get("old-2").tenant) == (None, (), "")
        assert store.get("old-1") == taken


def test_sqlite_stores_opening_an_old_file_at_once_all_upgrade_it(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "old.db"
    _old_database(path)
    contenders = 8
    barrier = threading.Barrier(contenders)
    got: list[Task] = []
    errors: list[BaseException] = []

    def open_and_read() -> None:
        # A store of its own, as another process would have: separate connections, no shared upgrade flag.
        with SqliteTaskStore(path=path, clock=clock) as store:
            barrier.wait(timeout=10)
            try:
                got.append(store.get("old-1"))
            except BaseException as error:
                errors.append(error)

    threads = [threading.Thread(target=open_and_read) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert len(got) == contenders
    assert all((task.lease_until, task.history) == (None, ()) for task in got)


def test_sqlite_upgrade_tolerates_columns_added_behind_its_back(tmp_path: Path, clock: FakeClock,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.db"
    with SqliteTaskStore(path=path, clock=clock) as store:
        store.create(make_task(clock, task_id="t"))
    # As if another writer added the columns between the check and the ALTER: "duplicate column name".
    monkeypatch.setattr("sdasync.backends.sqlite.store._columns", lambda conn: set())

    with SqliteTaskStore(path=path, clock=clock) as store:
        assert store.get("t").history == ()


def _plans(store: SqliteTaskStore, run: Callable[[], object]) -> list[str]:
    """The query plans of the SELECTs that ``run`` makes the store execute (through its own connection)."""
    statements: list[str] = []
    with store._db.read() as conn:  # this thread's connection: the one ``run`` uses below
        conn.set_trace_callback(statements.append)
        try:
            run()
        finally:
            conn.set_trace_callback(None)
        selects = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT") and "FROM tasks" in sql]
        return [" | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")) for sql in selects]


def test_tenant_listings_and_due_outboxes_walk_their_indexes(tmp_path: Path, clock: FakeClock) -> None:
    with SqliteTaskStore(path=tmp_path / "s.db", clock=clock) as store:
        for i in range(6):
            store.create(make_task(clock, created_at=clock() + i, tenant=("acme", "zeta")[i % 2]))
        cursor = store.list(tenant="acme", status=Q, limit=1).next_cursor
        plans = {
            "tasks_tenant_newest": lambda: store.list(tenant="acme", limit=2),
            "tasks_tenant_status_newest": lambda: store.list(tenant="acme", status=Q, limit=1, cursor=cursor),
            "tasks_outbox_due": lambda: store.due_outbox(before=clock()),
        }
        for index, run in plans.items():
            (plan,) = _plans(store, run)
            assert index in plan
            assert "TEMP B-TREE" not in plan  # read in the index's order: no sort of the tenant's rows


def test_update_outbox_keeps_the_due_column_in_step(tmp_path: Path, clock: FakeClock) -> None:
    with SqliteTaskStore(path=tmp_path / "s.db", clock=clock) as store:
        task = make_task(clock)
        store.create(task)
        outbox = Outbox(event_id="msg_1", event=Event.COMPLETED, created_at=clock(), due_at=clock() + 5)
        store.transition(task.task_id, expected={Q}, to=R)
        store.transition(task.task_id, expected={R}, to=S, changes={"outbox": outbox})
        store.update_outbox(task.task_id, Outbox(event_id="msg_1", event=Event.COMPLETED, created_at=clock()),
                            expected=outbox)
    with sqlite3.connect(tmp_path / "s.db") as conn:
        (due, version), = conn.execute("SELECT outbox_due, json_extract(outbox, '$.version') FROM tasks").fetchall()
    conn.close()
    assert (due, version) == (None, 1)


def test_writes_prune_expired_records_a_batch_at_a_time(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "s.db"
    expiring = record_rows.PRUNE_BATCH + 20
    with SqliteTaskStore(path=path, clock=clock) as store:
        for i in range(expiring):
            store.put_record("bucket", f"b{i:04d}", {}, version=None, expires_at=clock() + 10)
        store.put_record("apikey", "kept", {}, version=None)
        clock.advance(11)

        def rows() -> int:
            with sqlite3.connect(path) as conn:
                (count,), = conn.execute("SELECT count(*) FROM records").fetchall()
            conn.close()
            return int(count)

        assert rows() == expiring + 1  # expired, but nothing has written since
        store.put_record("apikey", "new", {}, version=None)
        assert rows() == expiring + 2 - record_rows.PRUNE_BATCH  # one bounded batch per write
        store.delete_record("apikey", "new")
        assert rows() == 1
        assert store.get_record("apikey", "kept") is not None
