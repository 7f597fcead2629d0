"""Times as people and clients read them: ISO-8601 in UTC with milliseconds and a ``Z``, the one format the API and
the CLI print (``2026-12-01T20:00:00.000Z``). Stores and the worker keep epoch seconds; only output converts."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(ts: float | None) -> str | None:
    """``ts`` (epoch seconds) as ISO-8601 UTC with milliseconds, or None for None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
