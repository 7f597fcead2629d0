"""HTTP routes. Thin: parse, call TaskService, shape the JSON."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from sdasync.api.auth import Gate, caller
from sdasync.api.hosts import GATEWAY_BASE_URL, base_url
from sdasync.api.schemas import (
    ErrorResponse,
    SubmitResponse,
    TaskListResponse,
    TaskResponse,
    UsageResponse,
    health_json,
    task_json,
)
from sdasync.api.urlsign import UrlSigner, image_urls
from sdasync.auth.keys import check_tenant
from sdasync.callers import Caller
from sdasync.errors import BlobNotFound, RequestError, SdasyncError, TaskNotFound, UnsupportedMediaType
from sdasync.models import TaskStatus
from sdasync.service import TaskService
from sdasync.usage import MAX_DAYS, usage

router = APIRouter()
log = logging.getLogger(__name__)
CallerDep = Annotated[Caller, Depends(caller)]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


ERROR_DESCRIPTIONS = {400: "bad request", 401: "no API key, or not a valid one", 404: "no such task or result",
                      409: "the task is already finished", 429: "over a quota; Retry-After says when to retry",
                      413: "the body is over the size cap", 415: "the body is not application/json (UTF-8)",
                      422: "a field is refused; error.field names it", 503: "a backend is unavailable"}
#: What a task id is (``models.new_task_id``): anything else is a 404 decided here, before any backend sees it.
TASK_ID_FORMAT = re.compile(r"[0-9a-f]{32}", re.ASCII)
#: A result image's key: ``[<tenant>/]<taskId>/<n>.png``.
RESULT_KEY = re.compile(r"(?:(?P<tenant>[a-z0-9][a-z0-9_-]{0,62})/)?[0-9a-f]{32}/[0-9]{1,4}\.png", re.ASCII)
#: Bodies larger than this are parsed in a worker thread: a 20 MB JSON document holds the event loop for a while.
INLINE_PARSE_MAX = 64 * 1024
def _task_id_query() -> Any:
    # One Query per route: FastAPI builds a route's parameters on its first request, and two routes building from
    # one shared FieldInfo at once (concurrent first requests) race inside pydantic.
    return Query(alias="taskId", description="the id POST /task returned")


def _service(request: Request) -> TaskService:
    service: TaskService = request.app.state.service
    return service


def _task_id(task_id: str) -> str:
    if not TASK_ID_FORMAT.fullmatch(task_id):
        shown = task_id[:40] + "..." if len(task_id) > 40 else task_id
        raise TaskNotFound(f"no task {shown!r}")
    return task_id


def _url_for(request: Request) -> Callable[[str], str]:
    """Image URLs for this request: the blob store's, signed when the API serves them itself."""
    return image_urls(_service(request).blobs, request.app.state.signer, base_url(request))


def _task_response(request: Request, task_id: str, who: Caller) -> dict[str, Any]:
    return task_json(_service(request).get(_task_id(task_id), who), _url_for(request))


def _check_media_type(request: Request) -> None:
    """Only ``application/json`` in UTF-8: a web page can POST text/plain or a form to any origin without a
    preflight, and that must never queue GPU work (CSRF through a simple request)."""
    media_type, _, params = request.headers.get("content-type", "").partition(";")
    charset = "utf-8"
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if media_type.strip().lower() != "application/json" or charset not in {"utf-8", "utf8"}:
        raise UnsupportedMediaType("POST /task takes a JSON body: Content-Type: application/json (UTF-8)",
                                   field="content-type")


def _parse(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request body is not UTF-8 (byte {exc.start})", field="body") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers past Python's digit limit.
        message = str(exc) if isinstance(exc, json.JSONDecodeError) else "too deeply nested, or a number too long"
        raise RequestError(f"the request body is not valid JSON: {message}", field="body") from None


@router.post("/task", status_code=202, response_model=SubmitResponse,
             responses=_errors(401, 409, 413, 415, 422, 429, 503),
             tags=["tasks"], openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/TaskRequest"}}}}})
async def submit_task(request: Request, response: Response, who: CallerDep,
                      idempotency_key: Annotated[str | None, Header(description=(
                          "the same key and body within 24 h return the original task (200)"))] = None,
                      cancel_after: Annotated[str | None, Header(description=(
                          "a duration (30s, 5m, 1h): a task not finished by then ends cancelled"))] = None,
                      ) -> dict[str, str]:
    """Queue a txt2img or img2img request; answers at once with the task id to poll (also at ``Location``).
    A repeated ``Idempotency-Key`` answers 200 with the original task."""
    _check_media_type(request)
    raw = await request.body()
    body = await run_in_threadpool(_parse, raw) if len(raw) > INLINE_PARSE_MAX else _parse(raw)
    submitted = await run_in_threadpool(lambda: _service(request).submit_request(
        body, who, idempotency_key=idempotency_key, cancel_after=cancel_after))
    task = submitted.task
    response.headers["Location"] = f"{base_url(request)}tasks/{task.task_id}"
    if not submitted.created:
        response.status_code = 200
    return {"taskId": task.task_id, "status": task.status.value}


router.add_api_route("/tasks", submit_task, methods=["POST"], status_code=202, response_model=SubmitResponse,
                     responses=_errors(401, 409, 413, 415, 422, 429, 503), tags=["tasks"], include_in_schema=False)


@router.get("/task", response_model=TaskResponse, responses=_errors(401, 404, 422, 503), tags=["tasks"])
def get_task_by_query(request: Request, who: CallerDep,
                      task_id: Annotated[str, _task_id_query()]) -> dict[str, Any]:
    """The task's status, progress, image URLs and generation info (the original API's form)."""
    return _task_response(request, task_id, who)


@router.get("/tasks/{task_id}", response_model=TaskResponse, responses=_errors(401, 404, 503), tags=["tasks"])
def get_task(request: Request, who: CallerDep, task_id: str) -> dict[str, Any]:
    """The task's status, progress, image URLs and generation info."""
    return _task_response(request, task_id, who)


@router.get("/tasks", response_model=TaskListResponse, responses=_errors(401, 422, 503), tags=["tasks"])
def list_tasks(request: Request, who: CallerDep, status: TaskStatus | None = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 20,
               cursor: Annotated[str | None, Query(max_length=4096)] = None,
               tenant: Annotated[str | None, Query(max_length=63, description=(
                   "operators only: one tenant's tasks (default: everyone's)"))] = None) -> dict[str, Any]:
    """Your tasks newest first; pass ``nextCursor`` back as ``cursor`` for the next page."""
    page = _service(request).list(status=status, limit=limit, cursor=cursor, caller=who, tenant=_tenant(tenant))
    url = _url_for(request)
    return {"tasks": [task_json(t, url) for t in page.tasks], "nextCursor": page.next_cursor}


def _tenant(value: str | None) -> str | None:
    """An operator's ``?tenant=``: a tenant's name, or "" for the tasks of key-less mode."""
    return check_tenant(value) if value else value


def _cancel(request: Request, task_id: str, who: Caller) -> dict[str, Any]:
    return task_json(_service(request).cancel(_task_id(task_id), who), _url_for(request))


@router.delete("/tasks/{task_id}", response_model=TaskResponse, responses=_errors(401, 404, 409, 503),
               tags=["tasks"])
def cancel_task(request: Request, who: CallerDep, task_id: str) -> dict[str, Any]:
    """Cancel a queued or running task. A finished task answers 409."""
    return _cancel(request, task_id, who)


@router.delete("/task", response_model=TaskResponse, responses=_errors(401, 404, 409, 422, 503), tags=["tasks"])
def cancel_task_by_query(request: Request, who: CallerDep,
                         task_id: Annotated[str, _task_id_query()]) -> dict[str, Any]:
    """Cancel a queued or running task (query-string form)."""
    return _cancel(request, task_id, who)


@router.get("/usage", response_model=UsageResponse, responses=_errors(401, 422, 503), tags=["usage"])
def get_usage(request: Request, who: CallerDep, days: Annotated[int, Query(ge=1, le=MAX_DAYS)] = 30,
              tenant: Annotated[str | None, Query(max_length=63, description=(
                  "operators only: one tenant's usage (default: everyone's)"))] = None) -> dict[str, Any]:
    """Your tasks and GPU-seconds (engine time) per UTC day, newest first."""
    scope = _tenant(tenant) if who.admin else who.tenant
    report = usage(_service(request).store, tenant=scope, days=days)
    return {"tenant": scope, "days": [{"day": d.day, "tasks": d.tasks, "succeeded": d.succeeded,
                                       "gpuSeconds": d.gpu_seconds} for d in report],
            "gpuSeconds": round(sum(d.gpu_seconds for d in report), 3), "tasks": sum(d.tasks for d in report)}


@router.get("/healthz", tags=["operations"], responses={503: {"description": "a backend or the engine is down"}})
def healthz(request: Request) -> JSONResponse:
    """Each backend's state, the workers' engines as their registry records say, and the process's own sections
    (serve's worker processes, its scaler); 503 when a backend is down, or workers run but none's engine is
    ready. Only the operator (an admin key, or key-less mode addressed to a trusted host) sees more than
    ``ok``."""
    gate: Gate = request.app.state.gate
    who = gate.maybe(request.headers, via_gateway=GATEWAY_BASE_URL in request.scope)
    checks: dict[str, dict[str, Any]] = {}
    for name, check in request.app.state.health_checks.items():
        try:
            checks[name] = check()
        except Exception as exc:  # a health report must describe every failure, not raise it
            log.warning("health: %s failed: %s", name, exc)
            checks[name] = {"ok": False, "detail": "unexpected_error"}
    ok, body = health_json(_service(request).health(), checks)
    if who is None or not who.admin:
        body = {"ok": ok}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/results/{key:path}", tags=["results"], response_class=Response, responses={
    200: {"content": {"image/png": {}}, "description": "the PNG"}, **_errors(404, 503)})
def get_result(request: Request, key: str, exp: str | None = None, sig: str | None = None) -> Response:
    """Result images, when the blob store is local files served by the API (embedded mode). The URLs a task
    shows are signed and expire (``exp``, ``sig``); anything else is a 404."""
    blobs = _service(request).blobs
    signer: UrlSigner | None = request.app.state.signer
    if "served_by_api" not in blobs.capabilities or signer is None:
        raise BlobNotFound("results are served by the blob store, not by the API")
    match = RESULT_KEY.fullmatch(key)
    if match is None or not signer.valid(key, exp, sig):
        # Only result images are public; this also refuses the payloads that older versions kept here.
        raise BlobNotFound("no such result")
    gate: Gate = request.app.state.gate
    who = gate.maybe(request.headers, via_gateway=GATEWAY_BASE_URL in request.scope)
    if who is not None and not who.admin and who.tenant != (match.group("tenant") or ""):
        raise BlobNotFound("no such result")
    try:
        data = blobs.get(key)
    except RequestError:
        raise BlobNotFound("no such result") from None
    except SdasyncError:
        raise
    # Keys are deterministic per task and image index and never rewritten once a task succeeded; the URL expires,
    # so caches may keep it no longer than that.
    return Response(data, media_type="image/png", headers={"Cache-Control": f"private, max-age={int(signer.ttl_s)}"})
