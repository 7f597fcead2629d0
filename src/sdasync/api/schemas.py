"""The HTTP JSON shapes. camelCase lives here and nowhere else."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from sdasync.models import Task, WorkerRecord
from sdasync.outbox import webhook_of
from sdasync.timefmt import iso

if TYPE_CHECKING:
    from sdasync.service import HealthReport


class SubmitResponse(BaseModel):
    taskId: str
    status: str


class TaskError(BaseModel):
    code: str
    message: str


class TaskResult(BaseModel):
    images: list[str] = Field(description="absolute URLs of the PNG images, in order")
    info: dict[str, Any] | None = Field(description="generation info: seeds, sampler, steps, size, model")


class ProgressInfo(BaseModel):
    fraction: float
    step: int
    steps: int
    etaSeconds: float | None = Field(description="seconds left, when the engine can tell")


class HistoryEntry(BaseModel):
    attempt: int
    worker: str | None
    startedAt: str | None
    endedAt: str | None
    outcome: str = Field(description="succeeded, failed, retried, lost, released, cancelled, redriven, requeued")
    error: TaskError | None


class DeliveryEntry(BaseModel):
    at: str
    status: int | None = Field(description="the receiver's HTTP status; null when it did not answer")
    error: str | None


class WebhookInfo(BaseModel):
    url: str
    events: list[str]
    eventId: str | None = Field(description="the completed event's webhook-id, the same on every retry")
    state: str | None = Field(description="pending, delivered or abandoned; null before the task finishes")
    nextTryAt: str | None
    deliveries: list[DeliveryEntry]


class TaskResponse(BaseModel):
    taskId: str
    status: str
    api: str
    createdAt: str
    updatedAt: str
    startedAt: str | None
    finishedAt: str | None
    attempts: int
    progress: ProgressInfo | None
    result: TaskResult | None
    error: TaskError | None
    history: list[HistoryEntry] = Field(description="one record per attempt, oldest first")
    deadline: str | None = Field(description="when the task must be finished, else it ends cancelled")
    gpuSeconds: float = Field(description="engine time over all attempts")
    webhook: WebhookInfo | None


class DayUsageEntry(BaseModel):
    day: str
    tasks: int
    succeeded: int
    gpuSeconds: float


class UsageResponse(BaseModel):
    tenant: str | None = Field(description="whose usage; null: every tenant's (operators)")
    tasks: int
    gpuSeconds: float
    days: list[DayUsageEntry] = Field(description="UTC days with tasks, newest first")


class TaskListResponse(BaseModel):
    tasks: list[TaskResponse]
    nextCursor: str | None


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def task_json(task: Task, url: Callable[[str], str]) -> dict[str, Any]:
    """The task as clients see it. Image URLs are minted now by ``url`` (signed URLs expire), never stored."""
    result = None
    if task.images or task.info is not None:
        result = {"images": [url(key) for key in task.images], "info": task.info}
    return {
        "taskId": task.task_id,
        "status": task.status.value,
        "api": task.api.value,
        "createdAt": iso(task.created_at),
        "updatedAt": iso(task.updated_at),
        "startedAt": iso(task.started_at),
        "finishedAt": iso(task.finished_at),
        "attempts": task.attempts,
        "progress": progress_json(task.progress),
        "result": result,
        "error": task.error.to_dict() if task.error else None,
        "history": [history_json(entry) for entry in task.history],
        "deadline": iso(task.deadline),
        "gpuSeconds": round(task.gpu_seconds, 3),
        "webhook": webhook_json(task),
    }


def webhook_json(task: Task) -> dict[str, Any] | None:
    spec = webhook_of(task.extra)
    if spec is None:
        return None
    outbox = task.outbox
    return {"url": spec.url, "events": sorted(str(e) for e in spec.events),
            "eventId": outbox.event_id if outbox else None, "state": str(outbox.state) if outbox else None,
            "nextTryAt": iso(outbox.due_at) if outbox else None,
            "deliveries": [{"at": iso(a.at), "status": a.status, "error": a.error}
                           for a in (outbox.attempts if outbox else ())]}


def _read(record: object, *names: str) -> Any:
    """The first of ``names`` that ``record`` has, as a key (stored dicts: snake_case, or the camelCase older
    versions wrote) or as an attribute (the typed records of ``models``)."""
    for name in names:
        if isinstance(record, Mapping):
            if name in record:
                return record[name]
        elif hasattr(record, name):
            return getattr(record, name)
    return None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def progress_json(progress: object) -> dict[str, Any] | None:
    if progress is None:
        return None
    return {"fraction": float(_read(progress, "fraction") or 0.0), "step": int(_read(progress, "step") or 0),
            "steps": int(_read(progress, "steps") or 0), "etaSeconds": _float(_read(progress, "eta_s", "etaSeconds"))}


def history_json(entry: object) -> dict[str, Any]:
    error = _read(entry, "error")
    if error is not None and not isinstance(error, Mapping):
        error = {"code": str(_read(error, "code")), "message": str(_read(error, "message"))}
    worker = _read(entry, "worker")
    outcome = _read(entry, "outcome")
    return {"attempt": int(_read(entry, "attempt") or 0), "worker": None if worker is None else str(worker),
            "startedAt": iso(_float(_read(entry, "started_at", "startedAt"))),
            "endedAt": iso(_float(_read(entry, "ended_at", "endedAt"))),
            "outcome": str(outcome.value if isinstance(outcome, Enum) else outcome), "error": error}


def _printable(text: str) -> str:
    # A client's lone surrogate echoed in a message would make the answer itself unencodable: a 500.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def health_json(report: HealthReport, checks: Mapping[str, Mapping[str, Any]]) -> tuple[bool, dict[str, Any]]:
    """``/healthz``: whether the service is healthy, and its report. ``checks`` are the sections the process adds
    (``serve``'s worker processes, its scaler), each ``{"ok": bool, ...}``."""
    queue: dict[str, Any] = {"ok": report.queue.ok}
    if report.depth is not None:
        queue.update(visible=report.depth.visible, inFlight=report.depth.in_flight, delayed=report.depth.delayed)
    body: dict[str, Any] = {
        "queue": _check(queue, report.queue.detail),
        "store": _check({"ok": report.store.ok}, report.store.detail),
        "blobs": {"ok": report.blobs.ok, "capabilities": list(report.blob_capabilities)},
        "engine": _engine_json(report),
        "registry": [worker_json(w) for w in report.workers],
    }
    for name, section in checks.items():
        body[name] = dict(section)
    ok = report.ok and report.engine_ready and all(bool(section.get("ok", False)) for section in checks.values())
    return ok, {"ok": ok, **body}


def _check(body: dict[str, Any], detail: str) -> dict[str, Any]:
    if detail:
        body["detail"] = detail
    return body


def _engine_json(report: HealthReport) -> dict[str, Any]:
    """The engines as the workers report them: the API process loads none of its own."""
    ready = [w for w in report.workers if w.health.ok]
    body: dict[str, Any] = {"ok": report.engine_ready, "workers": len(report.workers), "ready": len(ready)}
    if not report.workers:
        body["detail"] = "no worker is running; queued tasks wait until one starts"
    elif not ready:
        waiting = report.workers[0].health.detail or "not ready"
        body["detail"] = f"no worker's engine is ready: {waiting}"
    return body


def worker_json(worker: WorkerRecord) -> dict[str, Any]:
    return {"workerId": worker.worker_id, "engine": worker.engine, "health": worker.health.to_dict(),
            "taskId": worker.task_id, "host": worker.host, "pid": worker.pid, "startedAt": iso(worker.started_at),
            "heartbeatAt": iso(worker.heartbeat_at), "expiresAt": iso(worker.expires_at)}


def error_json(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": _printable(message)}
    if field is not None:
        body["field"] = _printable(field)
    return {"error": body}
