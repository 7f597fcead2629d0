"""What a request asks of sdasync itself, beside the engine's payload: its webhook and its deadline.

``deadline`` (ISO 8601 with a zone, or epoch seconds) and the ``Cancel-After`` header (a duration, as Replicate
spells it: ``90s``, ``5m``, ``1h30m``, ``500ms``, or bare seconds) bound how long the client will wait; the
operator's ``--max-task-age`` bounds every task. The earliest of the three is the task's deadline.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sdasync.errors import RequestError
from sdasync.outbox import ALL_EVENTS, Event, WebhookSpec

#: A deadline further out than this is refused: no task waits a month.
MAX_DEADLINE_S = 7 * 86400.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)", re.ASCII)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Submission:
    webhook: WebhookSpec | None
    #: Epoch seconds, or None.
    deadline: float | None


def parse_duration(text: str, *, field: str) -> float:
    """Seconds in ``text`` (``2s``, ``1m30s``, ``250ms``, ``12``). Raises RequestError naming ``field``."""
    raw = text.strip()
    try:
        seconds = float(raw) if re.fullmatch(r"\d+(?:\.\d+)?", raw) else _units(raw)
    except ValueError:
        raise RequestError(f"{field} must be a duration such as 30s, 5m, 1h30m or 500ms, not {raw[:40]!r}",
                           field=field) from None
    if not 0 < seconds <= MAX_DEADLINE_S:
        raise RequestError(f"{field} must be more than 0 and at most {MAX_DEADLINE_S:.0f} s", field=field)
    return seconds


def _units(raw: str) -> float:
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(raw):
        if match.start() != pos:
            raise ValueError(raw)
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(raw) or not raw:
        raise ValueError(raw)
    return total


def parse_deadline(value: Any, *, now: float) -> float:
    """The ``deadline`` field as epoch seconds. Raises RequestError."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RequestError("deadline must be an ISO 8601 time with a zone or epoch seconds", field="deadline")
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        except ValueError:
            raise RequestError(f"deadline {value[:40]!r} is not an ISO 8601 time", field="deadline") from None
        if parsed.tzinfo is None:
            raise RequestError("deadline needs a time zone (2026-01-01T12:00:00Z)", field="deadline")
        at = parsed.timestamp()
    else:
        try:
            at = float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise RequestError("deadline is not a time sdasync can wait for", field="deadline") from None
    if not math.isfinite(at) or at <= now:
        raise RequestError("deadline is in the past", field="deadline")
    if at - now > MAX_DEADLINE_S:
        raise RequestError(f"deadline is more than {MAX_DEADLINE_S / 86400:.0f} days away", field="deadline")
    return at


def _events(body: Mapping[str, Any]) -> frozenset[Event]:
    if "webhookEventsFilter" in body and "webhook_events_filter" in body:
        raise RequestError("give webhookEventsFilter or webhook_events_filter, not both",
                           field="webhook_events_filter")
    name = "webhookEventsFilter" if "webhookEventsFilter" in body else "webhook_events_filter"
    raw = body.get(name)
    if raw is None:
        return ALL_EVENTS
    if not isinstance(raw, list) or not raw:
        raise RequestError(f"{name} must be a non-empty list of: start, progress, completed", field=name)
    events = set()
    for item in raw:
        try:
            events.add(Event(item))
        except (ValueError, TypeError):
            raise RequestError(f"{name}: {str(item)[:40]!r} is not an event; use start, progress, completed",
                               field=name) from None
    return frozenset(events)


def submission(body: Mapping[str, Any], *, now: float, cancel_after: str | None,
               max_task_age: float | None) -> Submission:
    """The webhook (its URL is checked by the SSRF guard separately) and the deadline. Raises RequestError."""
    webhook = None
    url = body.get("webhook")
    if url is not None:
        if not isinstance(url, str) or not url or len(url) > 2048:
            raise RequestError("webhook must be an https URL of at most 2048 characters", field="webhook")
        webhook = WebhookSpec(url=url, events=_events(body))
    elif "webhookEventsFilter" in body or "webhook_events_filter" in body:
        raise RequestError("an events filter needs a webhook", field="webhook")
    candidates = []
    if body.get("deadline") is not None:
        candidates.append(parse_deadline(body["deadline"], now=now))
    if cancel_after is not None:
        candidates.append(now + parse_duration(cancel_after, field="cancel-after"))
    if max_task_age is not None:
        candidates.append(now + max_task_age)
    return Submission(webhook=webhook, deadline=min(candidates) if candidates else None)
