"""The Protocols every backend implements. Contract tests in tests/contract hold each implementation to them.

Backends are context managers, take keyword arguments, and have a ``from_url()`` classmethod that only parses
(it opens nothing). What differs between backends is data: ``capabilities``, so tests skip by capability.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Self, runtime_checkable

from sdasync.models import Task, TaskStatus, WorkerRecord
from sdasync.outbox import Outbox


@dataclass(frozen=True)
class Message:
    message_id: str
    #: The task id: messages never carry the request itself.
    body: str
    #: Opaque handle for ack / nack / extend of this delivery; a later delivery gets a new one.
    receipt: str
    #: How many times this message has been received, this delivery included (SQS ApproximateReceiveCount).
    receive_count: int


@dataclass(frozen=True)
class DeadLetter:
    """A message in the dead-letter queue, as ``DeadLetterQueue.dead_letters`` lists it."""

    message_id: str
    #: The task id.
    body: str
    receive_count: int
    reason: str
    #: Epoch seconds when it was dead-lettered (SQS: when sdasync moved it, else its original send time).
    dead_at: float


@dataclass(frozen=True)
class QueueDepth:
    visible: int
    in_flight: int
    delayed: int


@runtime_checkable
class Queue(Protocol):
    """At-least-once queue with visibility timeouts and a dead-letter queue (SQS semantics)."""

    capabilities: frozenset[str]
    #: A message received this many times goes to the dead-letter queue on its next receive (SQS's
    #: maxReceiveCount). Workers resolve a task on its last delivery, so no task is left behind in the DLQ.
    max_receives: int

    def send(self, body: str, *, delay_s: float = 0) -> str:
        """Enqueue ``body``, visible after ``delay_s``; returns the message id. Raises BackendError."""
        ...

    def receive(self, *, max_messages: int = 1, wait_s: float = 0, visibility_timeout_s: float | None = None
                ) -> list[Message]:
        """Take up to ``max_messages`` visible messages, hiding each for the visibility timeout; waits up to
        ``wait_s`` for one to appear. A message received more than the queue's maximum receive count is moved
        to the dead-letter queue instead of being returned. Raises BackendError."""
        ...

    def ack(self, receipt: str) -> None:
        """Delete the delivered message. With a stale receipt (the message was redelivered since) the SQLite
        queue does nothing while SQS may still delete it, so callers ack only deliveries whose task they have
        finished. Raises BackendError."""
        ...

    def nack(self, receipt: str, *, delay_s: float = 0) -> None:
        """Make the message visible again after ``delay_s`` (0 = now); it stays in flight until then, as in SQS.
        Raises ReceiptInvalid for a stale receipt, BackendError."""
        ...

    def extend(self, receipt: str, *, timeout_s: float) -> None:
        """Restart the message's visibility clock at ``timeout_s`` from now. Raises ReceiptInvalid when the
        receipt is no longer the message's current delivery, BackendError."""
        ...

    def dead_letter(self, receipt: str, *, reason: str = "") -> None:
        """Move the delivered message to the dead-letter queue now. Raises ReceiptInvalid, BackendError."""
        ...

    def depth(self) -> QueueDepth:
        """Messages visible, in flight (received, not acknowledged) and delayed. Raises BackendError."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class DeadLetterQueue(Queue, Protocol):
    """A queue whose dead letters can be listed and moved back (capability ``redrive``)."""

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, oldest first, left in place. Raises ConfigError without a dead-letter queue,
        BackendError."""
        ...

    def redrive(self, message_ids: Collection[str] | None = None) -> int:
        """Move dead letters (all, or those named) back to the queue, visible now with a fresh receive count.
        Returns how many moved; ids that are not dead letters are ignored. Raises BackendError."""
        ...


@dataclass(frozen=True)
class TaskPage:
    tasks: list[Task]
    #: Pass back as ``cursor`` to get the next page; None on the last page.
    next_cursor: str | None


@runtime_checkable
class TaskStore(Protocol):
    """Where task state lives. Every state change is a compare-and-set.

    A task reads back equal to the one written, value for value and type for type (``1.0`` stays a float).
    Capability ``expires``: the store deletes tasks past the retention by itself (DynamoDB's TTL), so the janitor
    leaves it alone. The worker registry lives in the same store, apart from the tasks: no task read, listing or
    ``stale`` ever returns a worker record, whatever its id."""

    capabilities: frozenset[str]

    def create(self, task: Task) -> None:
        """Store a new task. Raises TaskConflict if the id exists, BackendError."""
        ...

    def get(self, task_id: str) -> Task:
        """Raises TaskNotFound, BackendError."""
        ...

    def transition(self, task_id: str, *, expected: Collection[TaskStatus], to: TaskStatus,
                   attempt: int | None = None, changes: Mapping[str, Any] | None = None,
                   lease_expired_before: float | None = None) -> Task:
        """Atomically move the task to ``to`` if its status is one of ``expected`` (and, when ``attempt`` is
        given, its attempt number equals it; and, when ``lease_expired_before`` is given, it is not ``running``
        under a lease that lasts until that time or later), applying ``changes`` (fields in
        ``models.MUTABLE_FIELDS``) and setting ``updated_at``. Returns the new task.

        Raises ValueError if ``expected -> to`` is not in ``models.TRANSITIONS``, TaskNotFound, TaskConflict
        (with ``current`` set to the task as it is) when the condition does not hold, BackendError."""
        ...

    def list(self, *, status: TaskStatus | None = None, limit: int = 50, cursor: str | None = None,
             tenant: str | None = None) -> TaskPage:
        """Tasks newest first, optionally of one status. ``tenant=None``: every task (operators); a string: only
        that tenant's, read through a tenant-keyed index (never a filter after the query), ``""`` included (the
        tasks of key-less mode). A cursor is valid only with the same status and tenant. Raises RequestError for
        a bad cursor, BackendError."""
        ...

    def due_outbox(self, *, before: float, limit: int = 100) -> builtins.list[Task]:
        """Up to ``limit`` tasks whose outbox is due (``outbox.due_at`` strictly before ``before``), soonest first,
        read through an index of pending outboxes only. Raises ValueError for a limit outside 1..1000, BackendError."""
        ...

    def update_outbox(self, task_id: str, outbox: Outbox, *, expected: Outbox) -> Task:
        """Replace the task's outbox if it is still ``expected`` (same ``event_id`` and ``version``): a
        compare-and-set, so two dispatchers never both claim or record one try. The outbox is written with
        ``version = expected.version + 1`` whatever ``outbox.version`` says. Leaves status and ``updated_at``
        alone, and the due index follows ``outbox.due_at`` (None: the task leaves it). Raises TaskNotFound,
        TaskConflict (``current`` set) when the outbox moved on, BackendError."""
        ...

    def stale(self, *, status: TaskStatus, updated_before: float, limit: int = 100) -> builtins.list[Task]:
        """Up to ``limit`` tasks in ``status`` whose ``updated_at`` is before ``updated_before``, oldest first (ties
        by id): the sweeper's stranded ``queued`` tasks, the janitor's expired finished ones. Read through an
        index, so it costs what it returns. Raises ValueError for a limit outside 1..1000, BackendError."""
        ...

    def delete(self, task_id: str, *, finished_before: float | None = None) -> bool:
        """Remove the task for good (retention); returns whether it was there to remove. With
        ``finished_before``, only if it is in a terminal state and its ``updated_at`` is before that, atomically:
        a task an operator redrove meanwhile stays. Raises BackendError."""
        ...

    def put_worker(self, record: WorkerRecord) -> None:
        """Write (or overwrite) a worker's registry record. Records of workers long expired may be dropped here
        or by the store's own expiry. Raises BackendRefused for a record it cannot hold, BackendError."""
        ...

    def workers(self, *, now: float | None = None) -> builtins.list[WorkerRecord]:
        """The registry's live records (``expires_at`` after ``now``, default the store's clock), by worker id.
        Raises BackendError."""
        ...

    def remove_worker(self, worker_id: str) -> None:
        """Delete a worker's record (it stopped cleanly); a missing one is not an error. Raises BackendError."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class BlobStore(Protocol):
    """Result images (and, in a store of their own, large request payloads). Keys are relative paths like
    ``<taskId>/0.png``. Capability ``expires``: blobs past the retention are deleted by the store itself (an S3
    lifecycle rule), so the janitor does not delete them one by one."""

    capabilities: frozenset[str]

    def put(self, key: str, data: bytes, *, content_type: str = "image/png") -> None:
        """Write (or overwrite) ``key``. Raises RequestError for a key that is not a safe relative path,
        BackendError."""
        ...

    def get(self, key: str) -> bytes:
        """Raises BlobNotFound, RequestError for an unsafe key, BackendError."""
        ...

    def url(self, key: str, *, base_url: str) -> str:
        """An absolute URL a browser can open. ``base_url`` is the API's own address, used by stores whose
        blobs the API serves itself (capability ``served_by_api``)."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error. Raises BackendError."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


def check_transition(expected: Collection[TaskStatus], to: TaskStatus) -> None:
    """Raise ValueError unless every ``expected -> to`` is allowed; backends call it before writing."""
    from sdasync.models import can_transition

    if not expected:
        raise ValueError("expected must name at least one status")
    bad = [s for s in expected if not can_transition(s, to)]
    if bad:
        raise ValueError(f"transition not allowed: {sorted(bad)} -> {to}")


def check_changes(changes: Mapping[str, Any] | None) -> dict[str, Any]:
    """``changes`` as a dict; ValueError for a field that is not in ``models.MUTABLE_FIELDS``."""
    from sdasync.models import MUTABLE_FIELDS

    checked = dict(changes or {})
    unknown = set(checked) - MUTABLE_FIELDS
    if unknown:
        raise ValueError(f"not a mutable task field: {sorted(unknown)}")
    return checked
