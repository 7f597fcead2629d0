"""A queue with SQS semantics in a SQLite file, safe for several worker processes sharing the file.

URL: ``sqlite:///path/to.db?name=tasks&max_receives=10&visibility_timeout=30&poll_interval=0.2``
(three slashes: a path relative to the working directory; four: an absolute path).

Query parameters:

``name`` (default ``tasks``)
    Several named queues can share one file; each is its own queue with its own dead letters.
``max_receives`` (default 10, 1..1000)
    A message already received this many times goes to the dead-letter queue instead of being delivered again,
    as SQS's redrive policy does when ReceiveCount would exceed maxReceiveCount.
``visibility_timeout`` (seconds, default 30)
    How long a received message stays hidden unless ``receive`` names another timeout.
``poll_interval`` (seconds, default 0.2)
    How often a waiting ``receive`` looks again. Sends from this same object wake it at once.

Semantics are SQS's: at-least-once delivery, a new receipt per delivery, ``receive_count`` per message, and
``nack``/``extend`` as ChangeMessageVisibility. Messages are delivered in the order they became visible, so a
backlog that was never delayed or retried is FIFO. Dead letters stay in the same table, marked by ``dead_at``;
``dead_letters()`` lists them and ``redrive()`` puts them back. ``close()`` ends a waiting ``receive`` with no
messages.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Self

from sdasync.backends.base import DeadLetter, Message, QueueDepth
from sdasync.backends.sqlite.db import SqliteDatabase
from sdasync.errors import BackendError, ConfigError, ReceiptInvalid
from sdasync.urls import path_from_url, query_params

URL_PARAMS: dict[str, type[Any]] = {"name": str, "max_receives": int, "visibility_timeout": float,
                                    "poll_interval": float}

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS queue_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- the tie-break that keeps delivery order stable
        message_id TEXT NOT NULL UNIQUE,
        queue TEXT NOT NULL,
        body TEXT NOT NULL,
        sent_at REAL NOT NULL,
        visible_at REAL NOT NULL,
        receive_count INTEGER NOT NULL DEFAULT 0,
        receipt TEXT,                            -- the current delivery's receipt; NULL before the first
        dead_at REAL,                            -- set: the message is in the dead-letter queue
        dead_reason TEXT
    )
    """,
    # Receive scans live messages in the order they became visible; a partial index keeps dead letters out.
    """CREATE INDEX IF NOT EXISTS queue_messages_visible
       ON queue_messages (queue, visible_at, seq) WHERE dead_at IS NULL""",
    """CREATE INDEX IF NOT EXISTS queue_messages_dead
       ON queue_messages (queue, dead_at, seq) WHERE dead_at IS NOT NULL""",
    """CREATE UNIQUE INDEX IF NOT EXISTS queue_messages_receipt
       ON queue_messages (receipt) WHERE receipt IS NOT NULL""",
)

#: Keeps ``IN (...)`` lists well under SQLite's bound-variable limit.
_CHUNK = 500


class SqliteQueue:
    """An SQS-like queue in a SQLite table; see the module docstring for the URL and its parameters."""

    capabilities: frozenset[str] = frozenset({"dead_letter", "delay", "redrive"})

    def __init__(self, *, path: str | Path, name: str = "tasks", max_receives: int = 10,
                 visibility_timeout: float = 30.0, poll_interval: float = 0.2, busy_timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not name:
            raise ConfigError("sqlite queue: name must not be empty")
        if not 1 <= max_receives <= 1000:
            raise ConfigError(f"sqlite queue: max_receives must be 1..1000, not {max_receives}")
        if visibility_timeout < 0:
            raise ConfigError(f"sqlite queue: visibility_timeout must be >= 0, not {visibility_timeout}")
        if poll_interval <= 0:
            raise ConfigError(f"sqlite queue: poll_interval must be > 0, not {poll_interval}")
        self.name = name
        self.max_receives = max_receives
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self._clock = clock
        # Connections open on first use, so building the object (and from_url) touches no disk.
        self._db = SqliteDatabase(path, schema=SCHEMA, busy_timeout_s=busy_timeout_s)
        # Wakes receivers of this object when it sends; other processes are seen by polling.
        self._wakeup = threading.Condition()
        self._sends = 0
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        """Parse ``url`` (opens nothing). ``kwargs`` (e.g. ``clock``) override the URL's parameters."""
        params = query_params(url, URL_PARAMS)
        return cls(path=path_from_url(url), **{**params, **kwargs})

    @property
    def path(self) -> Path:
        return self._db.path

    def send(self, body: str, *, delay_s: float = 0) -> str:
        _check_non_negative("delay_s", delay_s)
        message_id = uuid.uuid4().hex
        now = self._clock()
        with self._db.write() as conn:
            conn.execute(
                "INSERT INTO queue_messages (message_id, queue, body, sent_at, visible_at) VALUES (?, ?, ?, ?, ?)",
                (message_id, self.name, body, now, now + delay_s),
            )
        with self._wakeup:
            self._sends += 1
            self._wakeup.notify_all()
        return message_id

    def receive(self, *, max_messages: int = 1, wait_s: float = 0, visibility_timeout_s: float | None = None
                ) -> list[Message]:
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, not {max_messages}")
        timeout = self.visibility_timeout if visibility_timeout_s is None else visibility_timeout_s
        _check_non_negative("visibility_timeout_s", timeout)
        # The wait is measured in real time even when tests inject a clock for visibility.
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            sends_seen = self._sends
            try:
                messages = self._receive_once(max_messages, timeout)
            except BackendError:
                if self._closed:
                    return []  # closed under a waiting receive (a worker shutting down): nothing was taken
                raise
            remaining = deadline - time.monotonic()
            if messages or remaining <= 0:
                return messages
            with self._wakeup:
                if self._sends == sends_seen and not self._closed:
                    self._wakeup.wait(min(self.poll_interval, remaining))
                if self._closed:
                    return []

    def _receive_once(self, max_messages: int, timeout: float) -> list[Message]:
        now = self._clock()
        # Idle workers poll often: a plain read first keeps them from taking the write lock for nothing.
        with self._db.read() as conn:
            if conn.execute("SELECT 1 FROM queue_messages WHERE queue = ? AND dead_at IS NULL AND visible_at <= ?"
                            " LIMIT 1", (self.name, now)).fetchone() is None:
                return []
        delivered: list[Message] = []
        seen: list[int] = []
        # BEGIN IMMEDIATE makes select-then-update one step: no other process can pick the same rows between.
        with self._db.write() as conn:
            while len(delivered) < max_messages:
                # Dead-lettered rows drop out by dead_at, delivered ones by visible_at, except with a zero timeout:
                # those stay visible, so they are excluded by seq (at most max_messages of them).
                exclude = f"AND seq NOT IN ({', '.join('?' * len(seen))})" if seen else ""
                rows = conn.execute(
                    "SELECT seq, message_id, body, receive_count FROM queue_messages"
                    f" WHERE queue = ? AND dead_at IS NULL AND visible_at <= ? {exclude}"
                    " ORDER BY visible_at, seq LIMIT ?",
                    (self.name, now, *seen, max_messages - len(delivered)),
                ).fetchall()
                if not rows:
                    break
                for seq, message_id, body, receive_count in rows:
                    if receive_count >= self.max_receives:
                        # SQS redrive: the receive that would exceed maxReceiveCount moves it to the DLQ instead.
                        conn.execute(
                            "UPDATE queue_messages SET dead_at = ?, dead_reason = ?, receipt = NULL WHERE seq = ?",
                            (now, f"received {receive_count} times (max_receives={self.max_receives})", seq),
                        )
                        continue
                    receipt = uuid.uuid4().hex
                    conn.execute(
                        "UPDATE queue_messages SET receipt = ?, receive_count = receive_count + 1, visible_at = ?"
                        " WHERE seq = ?",
                        (receipt, now + timeout, seq),
                    )
                    seen.append(seq)
                    delivered.append(Message(message_id=message_id, body=body, receipt=receipt,
                                             receive_count=receive_count + 1))
        return delivered

    def ack(self, receipt: str) -> None:
        # A stale receipt matches no row (the message was redelivered or is gone): nothing to do, by contract.
        with self._db.write() as conn:
            conn.execute("DELETE FROM queue_messages WHERE receipt = ? AND queue = ? AND dead_at IS NULL",
                         (receipt, self.name))

    def nack(self, receipt: str, *, delay_s: float = 0) -> None:
        _check_non_negative("delay_s", delay_s)
        self._set_visible_at(receipt, delay_s)

    def extend(self, receipt: str, *, timeout_s: float) -> None:
        _check_non_negative("timeout_s", timeout_s)
        self._set_visible_at(receipt, timeout_s)

    def _set_visible_at(self, receipt: str, seconds: float) -> None:
        # receive_count stays > 0, so until then the message counts as in flight, as with ChangeMessageVisibility.
        now = self._clock()
        with self._db.write() as conn:
            cursor = conn.execute(
                "UPDATE queue_messages SET visible_at = ? WHERE receipt = ? AND queue = ? AND dead_at IS NULL",
                (now + seconds, receipt, self.name),
            )
            changed = cursor.rowcount
        if changed != 1:
            raise ReceiptInvalid(f"queue {self.name!r}: receipt is not the message's current delivery")

    def dead_letter(self, receipt: str, *, reason: str = "") -> None:
        now = self._clock()
        with self._db.write() as conn:
            cursor = conn.execute(
                "UPDATE queue_messages SET dead_at = ?, dead_reason = ?, receipt = NULL"
                " WHERE receipt = ? AND queue = ? AND dead_at IS NULL",
                (now, reason, receipt, self.name),
            )
            changed = cursor.rowcount
        if changed != 1:
            raise ReceiptInvalid(f"queue {self.name!r}: receipt is not the message's current delivery")

    def depth(self) -> QueueDepth:
        now = self._clock()
        with self._db.read() as conn:
            visible, in_flight, delayed = conn.execute(
                "SELECT COALESCE(SUM(visible_at <= :now), 0),"
                " COALESCE(SUM(visible_at > :now AND receive_count > 0), 0),"
                " COALESCE(SUM(visible_at > :now AND receive_count = 0), 0)"
                " FROM queue_messages WHERE queue = :queue AND dead_at IS NULL",
                {"now": now, "queue": self.name},
            ).fetchone()
        return QueueDepth(visible=int(visible), in_flight=int(in_flight), delayed=int(delayed))

    # Beyond the Queue Protocol: inspecting and redriving dead letters (capability "redrive").

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Dead letters of this queue, oldest first. Raises BackendError."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT message_id, body, receive_count, dead_reason, dead_at FROM queue_messages"
                " WHERE queue = ? AND dead_at IS NOT NULL ORDER BY dead_at, seq LIMIT ?",
                (self.name, limit),
            ).fetchall()
        return [DeadLetter(message_id=m, body=b, receive_count=c, reason=r or "", dead_at=d) for m, b, c, r, d in rows]

    def redrive(self, message_ids: Collection[str] | None = None) -> int:
        """Move dead letters (all, or those named) back to the queue, visible now with receive_count reset.
        Returns how many moved; ids that are not dead letters of this queue are ignored. Raises BackendError."""
        if isinstance(message_ids, str):
            raise TypeError("message_ids must be a collection of ids, not one string")
        now = self._clock()
        update = ("UPDATE queue_messages SET dead_at = NULL, dead_reason = NULL, receipt = NULL, receive_count = 0,"
                  " visible_at = ? WHERE queue = ? AND dead_at IS NOT NULL")
        moved = 0
        with self._db.write() as conn:
            if message_ids is None:
                moved = conn.execute(update, (now, self.name)).rowcount
            else:
                ids = list(message_ids)
                for start in range(0, len(ids), _CHUNK):
                    chunk = ids[start:start + _CHUNK]
                    sql = f"{update} AND message_id IN ({', '.join('?' * len(chunk))})"
                    moved += conn.execute(sql, (now, self.name, *chunk)).rowcount
        if moved:
            with self._wakeup:
                self._sends += 1
                self._wakeup.notify_all()
        return moved

    def expire_dead_letters(self, before: float) -> int:
        """Delete dead letters dead-lettered before ``before`` (retention: SQS's dead-letter queue drops its
        messages after its own retention period, SQLite keeps them until told). Returns how many went.
        Raises BackendError."""
        with self._db.write() as conn:
            return int(conn.execute("DELETE FROM queue_messages WHERE queue = ? AND dead_at IS NOT NULL"
                                    " AND dead_at < ?", (self.name, before)).rowcount)

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify_all()
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
