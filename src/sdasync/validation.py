"""Checks a submitted request before any task exists. Every refusal is a RequestError naming the field.

The rules live in ``payloads.py`` (pydantic models of the WebUI's txt2img and img2img payloads, also the OpenAPI
schema); this module is the adapter ``TaskService.submit`` calls. It checks what no model can (the JSON itself:
NaN, lone surrogates, depth), picks the route's model, and translates pydantic's errors into one RequestError.

Only the two generation routes are ever forwarded (the original design forwarded any ``api`` verbatim, so a client
could change the WebUI's global options). Fields the WebUI reads from us, not from clients (``send_images``,
``save_images``, ``force_task_id``), are dropped. A field the WebUI does not know is refused with the nearest
known name: a typo (``step``) would otherwise be silently ignored and the client would get 20 steps.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from sdasync.config import Limits
from sdasync.errors import RequestError
from sdasync.models import Api
from sdasync.payloads import PAYLOADS, SEED_MAX, Txt2ImgPayload

__all__ = ["DEFAULTS", "SEED_MAX", "validate_payload", "validate_request"]

#: Filled in when absent, so the task records what it ran with: the models' defaults, which the schema shows.
DEFAULTS: Mapping[str, Any] = {name: Txt2ImgPayload.model_fields[name].default for name in (
    "prompt", "negative_prompt", "steps", "width", "height", "batch_size", "n_iter", "seed", "cfg_scale")}
#: Set by sdasync on every call, so a client cannot, e.g., pick another task's id to interrupt it.
SERVER_FIELDS = ("force_task_id", "send_images", "save_images")
MAX_DEPTH = 32
#: A request's top-level fields: the route, the engine's payload and what the request asks of sdasync itself
#: (``submission.py`` reads those).
TOP_LEVEL_FIELDS = frozenset({"api", "payload", "webhook", "webhookEventsFilter", "webhook_events_filter",
                              "deadline"})
#: How much of a client's value or field name an error message repeats.
ECHO_CHARS = 80


def validate_request(body: Any, limits: Limits) -> tuple[Api, dict[str, Any]]:
    """The route and the payload with defaults filled in. Raises RequestError."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object with 'api' and 'payload'", field="body")
    _check_json(body, "", 0)
    unknown = sorted(set(body) - TOP_LEVEL_FIELDS)
    if unknown:
        raise RequestError(f"unknown top-level field(s): {', '.join(_short(k) for k in unknown)}",
                           field=_short(unknown[0]))
    api = _api(body.get("api"))
    payload = body.get("payload", {})
    if not isinstance(payload, Mapping):
        raise RequestError("payload must be a JSON object of WebUI fields", field="payload")
    return api, validate_payload(api, dict(payload), limits)


def validate_payload(api: Api, payload: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The payload as the engine gets it: the client's fields, the defaults, none of the server's fields.
    Raises RequestError."""
    model = PAYLOADS[api]
    try:
        model.model_validate(payload, strict=True, context={"limits": limits})
    except ValidationError as exc:
        raise _request_error(api, exc.errors(include_url=False)) from None
    checked = {**DEFAULTS, **payload}
    for name in SERVER_FIELDS:
        checked.pop(name, None)
    if checked.get("override_settings") is not None:
        # Otherwise an override would stay in the WebUI's settings for everyone's later tasks.
        checked["override_settings_restore_afterwards"] = True
    if api is Api.IMG2IMG:
        checked.setdefault("denoising_strength", 0.75)
    return checked


def _api(value: Any) -> Api:
    valid = ", ".join(a.value for a in Api)
    if value is None:
        raise RequestError(f"api is required; one of: {valid}", field="api")
    try:
        return Api(value)
    except (ValueError, TypeError):
        raise RequestError(f"api {_short(value)} is not allowed; one of: {valid}", field="api") from None


def _short(value: Any) -> str:
    """A client's value, as an error message may repeat it: repr (which escapes lone surrogates), cut short."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_json(value: Any, path: str, depth: int) -> None:
    # Python's json module accepts NaN and Infinity; nothing downstream should ever see them.
    if depth > MAX_DEPTH:
        raise RequestError(f"{path or 'body'} is nested too deeply", field=path or "body")
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{path} must be a finite number, not {value}", field=path)
    if isinstance(value, str):
        _check_text(value, path)
    if isinstance(value, Mapping):
        for key, item in value.items():
            key = str(key)
            _check_text(key, _join(path, _short(key) if key.isprintable() else repr(key)))
            _check_json(item, _join(path, _short(key)), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]", depth + 1)


def _check_text(value: str, path: str) -> None:
    # JSON escapes can smuggle lone surrogates ("\ud800") that no encoder downstream accepts.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{path} is not valid Unicode text", field=path) from None


def _field(loc: tuple[int | str, ...]) -> str:
    path = "payload"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{_short(part)}"
    return path


def _request_error(api: Api, errors: list[ErrorDetails]) -> RequestError:
    first = errors[0]
    loc = tuple(first["loc"])
    field = _field(loc)
    if first["type"] == "extra_forbidden" and len(loc) == 1:
        name = str(loc[0])
        other = next(a for a in Api if a is not api)
        if name in PAYLOADS[other].model_fields:
            return RequestError(f"{field} is only for {other.value}", field=field)
        close = difflib.get_close_matches(name, list(PAYLOADS[api].model_fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return RequestError(f"{field} is not a field of {api.value}{hint}", field=field,
                            hint=close[0] if close else None)
    if first["type"] == "missing":
        return RequestError(f"{field} is required", field=field)
    return RequestError(f"{field}: {first['msg']}", field=field)
