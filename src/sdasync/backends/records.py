"""Small records beside the tasks: API keys, tenants, rate buckets, admission windows, idempotency keys.

Every task store also implements ``RecordStore`` (SQLite: table ``records``; DynamoDB: items of the task table
under keys ``rec#<kind>#<key>``), so all of sdasync's state lives in the one backend an operator already runs,
and every change is a compare-and-set on the record's ``version``. A record whose ``expires_at`` has passed reads
as absent and may be replaced by a create, whether or not the backend has deleted it yet (DynamoDB's TTL lags by
up to days).

Kinds and keys are short strings of ``[A-Za-z0-9_.:@-]`` (and ``#`` in keys); ``data`` is a JSON object of plain
values (strings, numbers, booleans, None, lists, dicts), read back equal to what was written, ``1.0`` as a float.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

#: What a kind may be; keys may also hold ``#`` (``<tenant>#<idempotency key hash>``).
KIND_FORMAT = re.compile(r"[A-Za-z0-9_.:@-]{1,40}", re.ASCII)
KEY_FORMAT = re.compile(r"[A-Za-z0-9_.:@#-]{1,200}", re.ASCII)
#: The most a record's data may take, as compact JSON: far below DynamoDB's 400 KB item.
MAX_DATA_BYTES = 64 * 1024


@dataclass(frozen=True)
class Record:
    kind: str
    key: str
    data: dict[str, Any] = field(default_factory=dict)
    #: 1 when created, one more at every write.
    version: int = 1
    #: Epoch seconds after which the record reads as absent; None: kept until deleted.
    expires_at: float | None = None


@dataclass(frozen=True)
class RecordPage:
    records: list[Record]
    #: Pass back as ``cursor`` for the next page; None on the last one.
    next_cursor: str | None


@runtime_checkable
class RecordStore(Protocol):
    """Compare-and-set records, in the task store's backend."""

    def get_record(self, kind: str, key: str) -> Record | None:
        """The record, or None when absent or expired. Strongly consistent. Raises ValueError for a kind or key
        of the wrong format, BackendError."""
        ...

    def put_record(self, kind: str, key: str, data: dict[str, Any], *, version: int | None,
                   expires_at: float | None = None) -> Record:
        """Write the record if it is as the caller last saw it: ``version=None`` creates it (only where it is
        absent or expired), a number replaces the record of exactly that version. Returns the record written,
        its version one more than before (1 for a create). Raises RecordConflict (``current``: the record as it
        is, None if absent) when the condition fails, ValueError for a bad kind, key or data (not a JSON
        object, or over MAX_DATA_BYTES), BackendError."""
        ...

    def delete_record(self, kind: str, key: str, *, version: int | None = None) -> bool:
        """Delete the record (only of that ``version``, when given); returns whether one was deleted. An expired
        record counts as absent. Raises ValueError, BackendError."""
        ...

    def list_records(self, kind: str, *, limit: int = 100, cursor: str | None = None) -> RecordPage:
        """The live records of ``kind``, by key. Raises RequestError for a bad cursor, ValueError for a limit
        outside 1..1000, BackendError."""
        ...


def check_record_key(kind: str, key: str) -> None:
    """Raise ValueError unless ``kind`` and ``key`` have the documented formats; stores call it first."""
    if not isinstance(kind, str) or not KIND_FORMAT.fullmatch(kind):
        raise ValueError(f"invalid record kind {kind!r}")
    if not isinstance(key, str) or not KEY_FORMAT.fullmatch(key):
        raise ValueError(f"invalid record key {key!r}")


def encode_data(data: Any) -> str:
    """``data`` as the compact JSON both stores keep. Raises ValueError unless it is a dict of plain values (str
    keys; str, int, float, bool, None, list, dict) that fits MAX_DATA_BYTES."""
    if not isinstance(data, dict):
        raise ValueError(f"record data must be a dict, not {type(data).__name__}")
    _check_plain(data, depth=0)
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    if len(text.encode("utf-8")) > MAX_DATA_BYTES:
        raise ValueError(f"record data is over {MAX_DATA_BYTES} bytes as JSON")
    return text


def _check_plain(value: Any, *, depth: int) -> None:
    # What json.dumps would quietly change (tuples to lists, int keys to strings) is refused instead, so that
    # data reads back equal to what was written, on every backend alike.
    if depth > 32:
        raise ValueError("record data is nested too deeply")
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("record data may not hold NaN or infinity")
        return
    if isinstance(value, list):
        for item in value:
            _check_plain(item, depth=depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"record data keys must be strings, not {type(key).__name__}")
            _check_plain(item, depth=depth + 1)
        return
    raise ValueError(f"record data may not hold a {type(value).__name__}")


def check_expiry(expires_at: Any) -> float | None:
    """``expires_at`` as a float (or None). Raises ValueError for anything but a finite number or None."""
    if expires_at is None:
        return None
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float) or not math.isfinite(expires_at):
        raise ValueError("expires_at must be a finite number of epoch seconds or None")
    return float(expires_at)
