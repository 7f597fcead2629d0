"""HTTP routes. Thin: parse, call TaskService, shape the JSON."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from sdasync.api.schemas import (
    ErrorResponse,
    SubmitResponse,
    TaskListResponse,
    TaskRequest,
    TaskResponse,
    task_json,
)
from sdasync.errors import BlobNotFound, RequestError, SdasyncError
from sdasync.models import TaskStatus
from sdasync.service import TaskService

router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 422, 503)
}
RESULT_KEY = re.compile(r"[A-Za-z0-9_-]+/[0-9]+\.png")
TASK_ID = Query(alias="taskId", description="the id POST /task returned")


def _service(request: Request) -> TaskService:
    service: TaskService = request.app.state.service
    return service


def _base_url(request: Request) -> str:
    public: str | None = request.app.state.settings.public_url
    return public or str(request.base_url)


def _task_response(request: Request, task_id: str) -> dict[str, Any]:
    service = _service(request)
    return task_json(service.get(task_id), service.blobs, _base_url(request))


@router.post("/task", status_code=202, response_model=SubmitResponse, responses=ERRORS, tags=["tasks"],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": TaskRequest.model_json_schema()}}}})
async def submit_task(request: Request, response: Response) -> dict[str, str]:
    """Queue a txt2img or img2img request; answers at once with the task id to poll."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, bad UTF-8 and integers past Python's digit limit.
        raise RequestError(f"the request body is not valid JSON: {exc}", field="body") from None
    task = await run_in_threadpool(_service(request).submit, body)
    response.headers["Location"] = f"/tasks/{task.task_id}"
    return {"taskId": task.task_id, "status": task.status.value}


router.add_api_route("/tasks", submit_task, methods=["POST"], status_code=202, response_model=SubmitResponse,
                     responses=ERRORS, tags=["tasks"], include_in_schema=False)


@router.get("/task", response_model=TaskResponse, responses=ERRORS, tags=["tasks"])
def get_task_by_query(request: Request, task_id: Annotated[str, TASK_ID]) -> dict[str, Any]:
    """The task's status, progress, image URLs and generation info (the original API's form)."""
    return _task_response(request, task_id)


@router.get("/tasks/{task_id}", response_model=TaskResponse, responses=ERRORS, tags=["tasks"])
def get_task(request: Request, task_id: str) -> dict[str, Any]:
    """The task's status, progress, image URLs and generation info."""
    return _task_response(request, task_id)


@router.get("/tasks", response_model=TaskListResponse, responses=ERRORS, tags=["tasks"])
def list_tasks(request: Request, status: TaskStatus | None = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 20, cursor: str | None = None) -> dict[str, Any]:
    """Tasks newest first; pass ``nextCursor`` back as ``cursor`` for the next page."""
    service = _service(request)
    page = service.list(status=status, limit=limit, cursor=cursor)
    base = _base_url(request)
    return {"tasks": [task_json(t, service.blobs, base) for t in page.tasks], "nextCursor": page.next_cursor}


def _cancel(request: Request, task_id: str) -> dict[str, Any]:
    service = _service(request)
    return task_json(service.cancel(task_id), service.blobs, _base_url(request))


@router.delete("/tasks/{task_id}", response_model=TaskResponse, responses=ERRORS, tags=["tasks"])
def cancel_task(request: Request, task_id: str) -> dict[str, Any]:
    """Cancel a queued or running task. A finished task answers 409."""
    return _cancel(request, task_id)


@router.delete("/task", response_model=TaskResponse, responses=ERRORS, tags=["tasks"])
def cancel_task_by_query(request: Request, task_id: Annotated[str, TASK_ID]) -> dict[str, Any]:
    """Cancel a queued or running task (query-string form)."""
    return _cancel(request, task_id)


@router.get("/healthz", tags=["operations"])
def healthz(request: Request) -> JSONResponse:
    """Each backend's and the engine's state; 503 when any is down."""
    report: dict[str, Any] = _service(request).health()
    for name, check in request.app.state.health_checks.items():
        try:
            report[name] = check()
        except Exception as exc:  # a health report must describe every failure, not raise it
            report[name] = {"ok": False, "detail": str(exc)}
    ok = all(part.get("ok", False) for part in report.values() if isinstance(part, dict))
    return JSONResponse({"ok": ok, **report}, status_code=200 if ok else 503)


@router.get("/results/{key:path}", tags=["results"], responses={404: {"model": ErrorResponse}},
            response_class=Response)
def get_result(request: Request, key: str) -> Response:
    """Result images, when the blob store is local files served by the API (embedded mode)."""
    blobs = _service(request).blobs
    if "served_by_api" not in blobs.capabilities:
        raise BlobNotFound("results are served by the blob store, not by the API")
    if not RESULT_KEY.fullmatch(key):
        # The blob store also keeps large request payloads; only result images are public.
        raise BlobNotFound(f"no result {key!r}")
    try:
        data = blobs.get(key)
    except RequestError:
        raise BlobNotFound(f"no result {key!r}") from None
    except SdasyncError:
        raise
    # Keys are deterministic per task and image index and never rewritten once a task succeeded.
    return Response(data, media_type="image/png", headers={"Cache-Control": "public, max-age=86400"})
