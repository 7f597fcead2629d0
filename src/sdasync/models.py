"""The task model and its state machine. No I/O, no framework.

A task moves through these states (see docs/architecture.md for the diagram)::

    queued -> running -> succeeded
       |         |-----> failed
       |         |-----> queued     (a transient failure, retried later)
       |         |-----> running    (re-claimed once its worker's lease has passed; the attempt number fences
       |         |                   the old worker)
       |         '-----> cancelled
       |-------> cancelled
       '-------> failed             (attempts exhausted before a claim, or the queue refused the message)

    failed -> queued only by an operator's redrive (``sdasync dlq redrive``); succeeded and cancelled are final.

Every change of state is a compare-and-set on the current status (and, for a worker's writes, on the attempt
number), so a duplicate delivery or a stale worker can never overwrite a newer outcome. A running task is held
under a lease (``lease_until``) that its worker's heartbeat extends; another worker may claim it only once the
lease has passed (``TaskStore.transition(..., lease_expired_before=now)``), so a slow worker is not doubled.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


class TaskStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})

#: The only allowed transitions. Terminal states have no way out, but for failed -> queued: an operator's redrive
#: of a dead-lettered task. No worker writes it, so for a worker ``failed`` is as final as the others.
TRANSITIONS: Mapping[TaskStatus, frozenset[TaskStatus]] = {
    # queued -> queued: the sweeper re-sent a stranded task's message and says so in its history.
    TaskStatus.QUEUED: frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.RUNNING, TaskStatus.QUEUED, TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED}
    ),
    TaskStatus.SUCCEEDED: frozenset(),
    TaskStatus.FAILED: frozenset({TaskStatus.QUEUED}),
    TaskStatus.CANCELLED: frozenset(),
}


def can_transition(src: TaskStatus, dst: TaskStatus) -> bool:
    return dst in TRANSITIONS[src]


class Api(enum.StrEnum):
    """The WebUI routes a task may run. Nothing else is ever forwarded to an engine."""

    TXT2IMG = "/sdapi/v1/txt2img"
    IMG2IMG = "/sdapi/v1/img2img"

    @property
    def kind(self) -> str:
        return self.rsplit("/", 1)[1]


@dataclass(frozen=True)
class TaskError:
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskError:
        return cls(code=str(data["code"]), message=str(data["message"]))


#: Fields of a Task that a transition may change (besides status and updated_at, which it always sets).
MUTABLE_FIELDS = frozenset(
    {"attempts", "started_at", "finished_at", "images", "info", "error", "progress", "worker", "lease_until",
     "history"}
)


@dataclass(frozen=True)
class Task:
    task_id: str
    api: Api
    payload: dict[str, Any]
    status: TaskStatus = TaskStatus.QUEUED
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    #: Blob keys of the result images, in order.
    images: tuple[str, ...] = ()
    info: dict[str, Any] | None = None
    error: TaskError | None = None
    progress: dict[str, Any] | None = None
    #: Which worker holds (or last held) the task, for operators.
    worker: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Epoch seconds until which the worker holding the current attempt owns the task; its heartbeat extends it.
    lease_until: float | None = None
    #: One record per finished attempt, oldest first: ``{"attempt": int, "worker": str | None, "startedAt":
    #: float | None, "endedAt": float, "outcome": "succeeded" | "failed" | "retried" | "released" | "cancelled" |
    #: "lost", "error": {"code", "message"} | None}``. The worker writes the whole tuple; stores only keep it.
    history: tuple[dict[str, Any], ...] = ()

    @classmethod
    def new(cls, api: Api, payload: dict[str, Any], *, now: float | None = None) -> Task:
        ts = time.time() if now is None else now
        return cls(task_id=new_task_id(), api=api, payload=payload, created_at=ts, updated_at=ts)

    def with_changes(self, status: TaskStatus, changes: Mapping[str, Any], now: float) -> Task:
        unknown = set(changes) - MUTABLE_FIELDS
        if unknown:
            raise ValueError(f"not a mutable task field: {sorted(unknown)}")
        return replace(self, status=status, updated_at=now, **changes)


def history_records(value: Any) -> list[dict[str, Any]]:
    """A task's ``history`` as a list of plain dicts, for a store to write. Raises ValueError unless it is a
    sequence of mappings (the records' keys are the worker's business: stores keep whatever it wrote)."""
    try:
        valid = not isinstance(value, str | bytes | Mapping) and all(isinstance(item, Mapping) for item in value)
    except TypeError:  # not iterable at all
        valid = False
    if not valid:
        raise ValueError("history must be a sequence of attempt records (mappings)")
    return [dict(record) for record in value]


def plain_field(name: str, value: Any) -> Any:
    """A mutable field's value as plain data (lists, dicts, numbers, strings, None) for a store to encode: one
    rule for every store. Raises ValueError for a value of the wrong shape."""
    if name == "images":
        if isinstance(value, str) or not all(isinstance(key, str) for key in value):
            raise ValueError("images must be a sequence of blob keys")
        return list(value)
    if name == "error":
        if value is None:
            return None
        try:
            error = value if isinstance(value, TaskError) else TaskError.from_dict(value)
        except (KeyError, TypeError) as exc:
            raise ValueError("error must be a TaskError, a {code, message} mapping or None") from exc
        return error.to_dict()
    if name in {"info", "progress"}:
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a mapping or None")
        return None if value is None else dict(value)
    if name == "attempts":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("attempts must be an integer")
        return value
    if name in {"started_at", "finished_at", "lease_until"}:
        return None if value is None else float(value)
    if name == "worker":
        return None if value is None else str(value)
    if name == "history":
        return history_records(value)
    raise ValueError(f"not a mutable task field: {name!r}")


@dataclass(frozen=True)
class EngineHealth:
    """What an engine says of itself (``Engine.health()``), and what a worker publishes in its registry record."""

    ok: bool
    #: Why it is not ok, or a word on its state ("ready", "loading").
    detail: str = ""
    #: Whether the model is in memory (in-process engines); None for remote ones.
    loaded: bool | None = None
    #: The engine cannot recover in this process: its worker exits to be restarted.
    restart: bool = False
    #: The model the engine serves, when it can tell.
    model: str | None = None
    #: Engine-specific facts (device, url, seconds ...): plain JSON values.
    extra: Mapping[str, str | int | float | bool | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ok": self.ok, **self.extra}
        if self.detail:
            data["detail"] = self.detail
        if self.loaded is not None:
            data["loaded"] = self.loaded
        if self.restart:
            data["restart"] = True
        if self.model is not None:
            data["model"] = self.model
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineHealth:
        known = {"ok", "detail", "loaded", "restart", "model"}
        loaded = data.get("loaded")
        model = data.get("model")
        return cls(ok=bool(data.get("ok", False)), detail=str(data.get("detail") or ""),
                   loaded=None if loaded is None else bool(loaded), restart=bool(data.get("restart", False)),
                   model=None if model is None else str(model),
                   extra={k: v for k, v in data.items() if k not in known
                          and (v is None or isinstance(v, str | int | float | bool))})


@dataclass(frozen=True)
class WorkerRecord:
    """A worker's entry in the task store's registry: who it is, its engine and what it is doing. Written on
    start and at every heartbeat; a record whose ``expires_at`` has passed belongs to a worker that is gone."""

    worker_id: str
    #: The engine URL, without any credentials (``webui+http://127.0.0.1:7860``, ``diffusers://tiny``).
    engine: str
    health: EngineHealth
    #: The task it holds now, if any.
    task_id: str | None
    started_at: float
    heartbeat_at: float
    expires_at: float
    host: str = ""
    pid: int = 0


def new_task_id() -> str:
    """A random, URL-safe id whose prefix sorts by creation time (uuid7-like)."""
    ms = int(time.time() * 1000)
    return f"{ms:012x}{uuid.uuid4().hex[:20]}"
