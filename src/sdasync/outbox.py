"""Webhook subscriptions and the outbox: what a task owes its webhook, as plain data. No I/O.

A task submitted with a ``webhook`` keeps its ``WebhookSpec`` in ``Task.extra["webhook"]``. When the task reaches
a terminal state, the same conditional write that records the state sets ``Task.outbox`` to a pending ``Outbox``
for the ``completed`` event (``completed_outbox``): the event cannot be lost between two writes, since there is
only one. The dispatcher (``webhooks/dispatcher.py``) finds pending outboxes through the store's due index
(``TaskStore.due_outbox``), sends, and records each try with ``TaskStore.update_outbox``, conditional on the
tries it saw, so two dispatchers never record the same try twice.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


class Event(enum.StrEnum):
    """Webhook events, Replicate's ``start`` and ``completed`` with ``progress`` for its ``output``/``logs``."""

    START = "start"
    PROGRESS = "progress"
    COMPLETED = "completed"


ALL_EVENTS = frozenset(Event)
#: The key of a task's subscription in ``Task.extra``.
WEBHOOK_KEY = "webhook"


class OutboxState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    #: Retried for the whole retry period without a 2xx.
    ABANDONED = "abandoned"


@dataclass(frozen=True)
class WebhookSpec:
    url: str
    events: frozenset[Event] = ALL_EVENTS

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "events": sorted(str(e) for e in self.events)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WebhookSpec:
        return cls(url=str(data["url"]), events=frozenset(Event(e) for e in data.get("events", ALL_EVENTS)))


@dataclass(frozen=True)
class DeliveryAttempt:
    """One try at delivering an event."""

    at: float
    #: The receiver's HTTP status; None when there was no answer (refused, timed out, blocked by the guard).
    status: int | None
    #: Why the try failed, in a few words; None for a 2xx.
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "status": self.status, "error": self.error}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeliveryAttempt:
        status = data.get("status")
        error = data.get("error")
        return cls(at=float(data["at"]), status=None if status is None else int(status),
                   error=None if error is None else str(error))


@dataclass(frozen=True)
class Outbox:
    """The ``completed`` event a finished task owes its webhook, and the log of its deliveries."""

    #: The ``webhook-id`` header: the same on every retry, so receivers can deduplicate.
    event_id: str
    event: Event
    created_at: float
    state: OutboxState = OutboxState.PENDING
    #: When the next try is due; None once delivered or abandoned (the task leaves the due index then).
    due_at: float | None = None
    attempts: tuple[DeliveryAttempt, ...] = ()
    #: 0 when set by the task's final write, one more at each ``TaskStore.update_outbox`` (its compare-and-set).
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "event": str(self.event), "created_at": self.created_at,
                "state": str(self.state), "due_at": self.due_at, "attempts": [a.to_dict() for a in self.attempts],
                "version": self.version}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Outbox:
        """Raises ValueError for data of the wrong shape."""
        try:
            due = data.get("due_at")
            return cls(event_id=str(data["event_id"]), event=Event(data["event"]),
                       created_at=float(data["created_at"]), state=OutboxState(data.get("state", "pending")),
                       due_at=None if due is None else float(due),
                       attempts=tuple(a if isinstance(a, DeliveryAttempt) else DeliveryAttempt.from_dict(a)
                                      for a in data.get("attempts", ())), version=int(data.get("version", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"outbox must be a mapping of event_id, event, created_at, state, due_at, attempts: "
                             f"{exc}") from exc

    def tried(self, attempt: DeliveryAttempt, *, due_at: float | None, state: OutboxState) -> Outbox:
        return replace(self, attempts=(*self.attempts, attempt), due_at=due_at, state=state)


def new_event_id() -> str:
    """A ``webhook-id``: ``msg_`` and 128 random bits, as the Standard Webhooks examples spell them."""
    return f"msg_{secrets.token_hex(16)}"


def webhook_of(extra: Mapping[str, Any]) -> WebhookSpec | None:
    """The subscription a task's ``extra`` holds, if any."""
    spec = extra.get(WEBHOOK_KEY)
    return WebhookSpec.from_dict(spec) if isinstance(spec, Mapping) else None


def completed_outbox(extra: Mapping[str, Any], *, now: float) -> Outbox | None:
    """The outbox to set in the write that finishes a task, when it subscribed to ``completed``; else None."""
    spec = webhook_of(extra)
    if spec is None or Event.COMPLETED not in spec.events:
        return None
    return Outbox(event_id=new_event_id(), event=Event.COMPLETED, created_at=now, due_at=now)


def as_outbox(value: Any) -> Outbox | None:
    if value is None or isinstance(value, Outbox):
        return value
    if not isinstance(value, Mapping):
        raise ValueError("outbox must be an Outbox, a mapping or None")
    return Outbox.from_dict(value)
