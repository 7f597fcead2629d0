"""The HTTP JSON shapes. camelCase lives here and nowhere else."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdasync.backends.base import BlobStore
from sdasync.models import Task


class TaskRequest(BaseModel):
    """``POST /task``: the route to run and its WebUI fields, as in the AUTOMATIC1111 API."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a lighthouse at dusk", "steps": 20}},
    ]})

    api: str = Field(description="/sdapi/v1/txt2img or /sdapi/v1/img2img")
    payload: dict[str, Any] = Field(default_factory=dict, description="AUTOMATIC1111 WebUI request fields")


class SubmitResponse(BaseModel):
    taskId: str
    status: str


class TaskError(BaseModel):
    code: str
    message: str


class TaskResult(BaseModel):
    images: list[str] = Field(description="absolute URLs of the PNG images, in order")
    info: dict[str, Any] | None = Field(description="generation info: seeds, sampler, steps, size, model")


class TaskResponse(BaseModel):
    taskId: str
    status: str
    api: str
    createdAt: str
    updatedAt: str
    startedAt: str | None
    finishedAt: str | None
    attempts: int
    progress: dict[str, Any] | None
    result: TaskResult | None
    error: TaskError | None
    history: list[dict[str, Any]] = Field(description="one record per attempt: attempt, worker, startedAt, "
                                          "endedAt, outcome (succeeded, failed, retried, lost, released, "
                                          "redriven), error")


class TaskListResponse(BaseModel):
    tasks: list[TaskResponse]
    nextCursor: str | None


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def task_json(task: Task, blobs: BlobStore, base_url: str) -> dict[str, Any]:
    """The task as clients see it. Image URLs are minted now (presigned URLs expire), never stored."""
    result = None
    if task.images or task.info is not None:
        result = {"images": [blobs.url(key, base_url=base_url) for key in task.images], "info": task.info}
    return {
        "taskId": task.task_id,
        "status": task.status.value,
        "api": task.api.value,
        "createdAt": iso(task.created_at),
        "updatedAt": iso(task.updated_at),
        "startedAt": iso(task.started_at),
        "finishedAt": iso(task.finished_at),
        "attempts": task.attempts,
        "progress": task.progress,
        "result": result,
        "error": task.error.to_dict() if task.error else None,
        "history": [{**entry, "startedAt": iso(entry.get("startedAt")), "endedAt": iso(entry.get("endedAt"))}
                    for entry in task.history],
    }


def error_json(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return {"error": body}
