"""The one place that opens SQLite connections for the queue and the task store.

Several worker processes (and the API's threads) share one database file, so:

- WAL mode: readers never block the writer and the writer never blocks readers.
- ``busy_timeout``: a writer that finds the write lock taken waits for it instead of failing at once.
- ``BEGIN IMMEDIATE`` for every read-modify-write: the write lock is taken before the first read. A plain
  ``BEGIN`` starts as a reader and upgrades at the first write; two such transactions that both read first can
  deadlock on the upgrade, and SQLite then answers SQLITE_BUSY at once, without waiting out ``busy_timeout``.
- One connection per thread (and per process: a connection must not cross a ``fork``), opened on first use.

``sqlite3`` errors become ``BackendError`` (retryable) here, once.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sdasync.errors import BackendError


class _Handle:
    """A thread's connection and the lock that keeps ``close()`` from closing it in the middle of a statement
    (closing a connection another thread is using can crash the interpreter). Only its own thread and
    ``close()`` ever take the lock, so it is uncontended in normal use; reentrant, so that a nested use on the
    same thread waits for nothing."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.lock = threading.RLock()


class SqliteDatabase:
    """Per-thread connections to one database file, its schema created on first use."""

    def __init__(self, path: str | Path, *, schema: Sequence[str] = (), busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self._schema = tuple(schema)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._handles: list[_Handle] = []
        self._pid = os.getpid()
        self._schema_ready = False
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _handle(self) -> _Handle:
        handle: _Handle | None = getattr(self._local, "handle", None)
        pid = os.getpid()
        if handle is not None and self._pid == pid and not self._closed:
            return handle
        with self._lock:
            if self._closed:
                raise BackendError(f"sqlite database {self.path} is closed")
            if self._pid != pid:
                # A forked child inherited the parent's connections; SQLite forbids using them across fork, so
                # forget them (without closing: that could disturb the parent's locks) and start afresh.
                self._pid, self._handles, self._schema_ready = pid, [], False
                self._local = threading.local()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit, so that transactions are only the explicit ones below.
            # check_same_thread=False only so that close() may close connections opened by other threads.
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            handle = _Handle(conn)
            self._handles.append(handle)
            self._local.handle = handle
        with handle.lock:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable across application crashes in WAL mode; a power loss may drop the last commits.
            conn.execute("PRAGMA synchronous = NORMAL")
            if not self._schema_ready:
                self._create_schema(conn)
        return handle

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in self._schema:
                conn.execute(statement)
        except BaseException:
            _rollback(conn)
            raise
        conn.execute("COMMIT")
        self._schema_ready = True

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A connection for single statements (each its own snapshot)."""
        try:
            handle = self._handle()
            with handle.lock:
                yield handle.conn
        except (sqlite3.Error, OSError) as exc:
            raise BackendError(f"sqlite {self.path}: {exc}") from exc

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed when the block ends, rolled back if it raises."""
        try:
            handle = self._handle()
            with handle.lock:
                conn = handle.conn
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
        except (sqlite3.Error, OSError) as exc:
            raise BackendError(f"sqlite {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close every thread's connection, each once its current statement is done. Later use raises
        BackendError."""
        with self._lock:
            self._closed = True
            handles, self._handles = self._handles, []
        for handle in handles:
            with handle.lock, contextlib.suppress(sqlite3.Error):  # closing is best effort
                handle.conn.close()


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        # The original error is the one worth reporting; a failed rollback ends with the connection anyway.
        pass
