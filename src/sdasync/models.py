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
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sdasync.outbox import Outbox, as_outbox


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


class Outcome(enum.StrEnum):
    """How one attempt of a task ended, as its history records it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: A transient failure; the task went back to the queue after a backoff.
    RETRIED = "retried"
    #: Handed back by its worker (drain, spot notice, engine down): not the task's fault.
    RELEASED = "released"
    CANCELLED = "cancelled"
    #: Its worker stopped renewing the lease (a crash, a kill); found by the next claim.
    LOST = "lost"
    #: An operator's redrive of a failed task: the attempts before it no longer count.
    REDRIVEN = "redriven"
    #: The sweeper sent a stranded task's message again.
    REQUEUED = "requeued"


#: Outcomes that use up one of a task's attempts. A released attempt was the worker's doing and costs nothing.
COUNTED_OUTCOMES = frozenset({Outcome.RETRIED, Outcome.FAILED, Outcome.LOST})
_HISTORY_SHAPE = "history must be a sequence of attempt records (mappings with attempt and outcome)"


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class AttemptRecord:
    """One entry of ``Task.history``: an attempt (or an operator's act on the task) and how it ended."""

    attempt: int
    worker: str | None
    started_at: float | None
    ended_at: float | None
    outcome: Outcome
    error: TaskError | None = None
    #: Seconds the engine spent on this attempt (GPU time, for usage accounting); None when it never ran.
    engine_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"attempt": self.attempt, "worker": self.worker, "started_at": self.started_at,
                "ended_at": self.ended_at, "outcome": str(self.outcome),
                "error": None if self.error is None else self.error.to_dict()}
        if self.engine_s is not None:
            data["engine_s"] = self.engine_s
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttemptRecord:
        """Reads snake_case keys, and the camelCase ``startedAt``/``endedAt`` that older versions stored.
        Raises ValueError for a record without an attempt number or a known outcome."""
        try:
            attempt, outcome = data["attempt"], Outcome(data["outcome"])
            if isinstance(attempt, bool) or not isinstance(attempt, int | float) or attempt != int(attempt):
                raise ValueError(f"attempt must be an integer, not {attempt!r}")
            error = data.get("error")
            worker = data.get("worker")
            return cls(attempt=int(attempt), worker=None if worker is None else str(worker),
                       started_at=_optional_float(data.get("started_at", data.get("startedAt"))),
                       ended_at=_optional_float(data.get("ended_at", data.get("endedAt"))), outcome=outcome,
                       error=None if error is None else error if isinstance(error, TaskError)
                       else TaskError.from_dict(error), engine_s=_optional_float(data.get("engine_s")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{_HISTORY_SHAPE}: {exc}") from exc


@dataclass(frozen=True)
class TaskProgress:
    """How far the running attempt has got, written by the worker about once a second."""

    fraction: float = 0.0
    step: int = 0
    steps: int = 0
    #: Seconds left, if the engine can tell.
    eta_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "step": self.step, "steps": self.steps, "eta_s": self.eta_s}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskProgress:
        """Reads ``eta_s``, and the camelCase ``etaSeconds`` that older versions stored. Raises ValueError."""
        try:
            return cls(fraction=float(data.get("fraction", 0.0)), step=int(data.get("step", 0)),
                       steps=int(data.get("steps", 0)), eta_s=_optional_float(data.get("eta_s",
                                                                                      data.get("etaSeconds"))))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"progress must be a mapping of fraction, step, steps, eta_s: {exc}") from exc


def _attempt_record(value: Any) -> AttemptRecord:
    if isinstance(value, AttemptRecord):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(_HISTORY_SHAPE)
    return AttemptRecord.from_dict(value)


def _task_progress(value: Any) -> TaskProgress | None:
    if value is None or isinstance(value, TaskProgress):
        return value
    if not isinstance(value, Mapping):
        raise ValueError("progress must be a TaskProgress, a mapping or None")
    return TaskProgress.from_dict(value)


#: Fields of a Task that a transition may change (besides status and updated_at, which it always sets).
MUTABLE_FIELDS = frozenset(
    {"attempts", "started_at", "finished_at", "images", "info", "error", "progress", "worker", "lease_until",
     "history", "outbox"}
)
#: What a tenant's name may be: it prefixes blob keys and index keys, so nothing that needs escaping.
TENANT_FORMAT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}", re.ASCII)
#: Keys of ``Task.extra`` that sdasync itself sets at submission (the rest is free for future use).
DEADLINE_KEY = "deadline"
KEY_ID_KEY = "key_id"
MAX_ACTIVE_KEY = "max_active"


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
    progress: TaskProgress | None = None
    #: Which worker holds (or last held) the task, for operators.
    worker: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Epoch seconds until which the worker holding the current attempt owns the task; its heartbeat extends it.
    lease_until: float | None = None
    #: One record per finished attempt, oldest first. The worker writes the whole tuple; stores only keep it.
    history: tuple[AttemptRecord, ...] = ()
    #: The tenant that owns the task ("": none, tasks submitted without API keys). Set at creation, never changed.
    tenant: str = ""
    #: The ``completed`` webhook event this task owes, set in the write that finishes it (see ``outbox``).
    outbox: Outbox | None = None

    def __post_init__(self) -> None:
        # Stores build tasks from plain data (decoded JSON, DynamoDB maps): the records and the progress become
        # their types here, once, so every store reads the same way and keeps working with dicts.
        object.__setattr__(self, "history", tuple(history_records(self.history)))
        object.__setattr__(self, "progress", _task_progress(self.progress))
        object.__setattr__(self, "outbox", as_outbox(self.outbox))

    @classmethod
    def new(cls, api: Api, payload: dict[str, Any], *, now: float | None = None, tenant: str = "",
            extra: Mapping[str, Any] | None = None, task_id: str | None = None) -> Task:
        ts = time.time() if now is None else now
        return cls(task_id=task_id or new_task_id(), api=api, payload=payload, created_at=ts, updated_at=ts,
                   tenant=tenant, extra=dict(extra or {}))

    @property
    def deadline(self) -> float | None:
        """Epoch seconds by which the task must be finished, else it ends ``cancelled`` with reason
        ``deadline``."""
        value = self.extra.get(DEADLINE_KEY)
        return None if value is None else float(value)

    @property
    def gpu_seconds(self) -> float:
        """Engine time over all attempts."""
        return sum(record.engine_s or 0.0 for record in self.history)

    def with_changes(self, status: TaskStatus, changes: Mapping[str, Any], now: float) -> Task:
        unknown = set(changes) - MUTABLE_FIELDS
        if unknown:
            raise ValueError(f"not a mutable task field: {sorted(unknown)}")
        return replace(self, status=status, updated_at=now, **changes)


def history_records(value: Any) -> list[AttemptRecord]:
    """A task's ``history`` as a list of AttemptRecords (mappings are read with ``AttemptRecord.from_dict``).
    Raises ValueError unless it is a sequence of records or mappings."""
    try:
        if isinstance(value, str | bytes | Mapping):
            raise TypeError
        return [_attempt_record(item) for item in value]
    except TypeError as exc:  # not iterable at all
        raise ValueError(_HISTORY_SHAPE) from exc


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
    if name == "info":
        if value is not None and not isinstance(value, Mapping):
            raise ValueError("info must be a mapping or None")
        return None if value is None else dict(value)
    if name == "progress":
        progress = _task_progress(value)
        return None if progress is None else progress.to_dict()
    if name == "attempts":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("attempts must be an integer")
        return value
    if name in {"started_at", "finished_at", "lease_until"}:
        return None if value is None else float(value)
    if name == "worker":
        return None if value is None else str(value)
    if name == "history":
        return [record.to_dict() for record in history_records(value)]
    if name == "outbox":
        outbox = as_outbox(value)
        return None if outbox is None else outbox.to_dict()
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
