"""Opaque listing cursors: URL-safe base64 of a small flat JSON object. Each store puts its own position in it.

A cursor comes back from a client, so decoding assumes nothing: any text at all decodes to a RequestError (field
``cursor``), or to a tuple of plain scalars that a store can bind in a query without surprise (bounded ints,
finite floats, short UTF-8 strings, booleans, None).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re

from sdasync.errors import RequestError

CursorValue = str | int | float | bool | None
#: Far above any cursor a store hands out (a few positions of ~100 characters), far below anything costly.
MAX_CURSOR_CHARS = 4096
MAX_STRING_CHARS = 512
#: SQLite and DynamoDB both take 64-bit integers; a bigger one would fail in the store, not here.
MAX_INT = 2**63 - 1
_ALPHABET = re.compile(r"[A-Za-z0-9_-]*", re.ASCII)


def encode_cursor(position: dict[str, CursorValue]) -> str:
    raw = json.dumps(position, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, keys: tuple[str, ...]) -> tuple[CursorValue, ...]:
    """The values of ``keys`` in the cursor. Raises RequestError (field ``cursor``) for anything malformed; the
    caller checks the values' types and meaning."""
    if not isinstance(cursor, str) or len(cursor) > MAX_CURSOR_CHARS or not _ALPHABET.fullmatch(cursor):
        raise RequestError("invalid cursor", field="cursor")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
        # parse_constant: NaN and Infinity are no position; ValueError also covers over-long integers.
        data = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, TypeError, RecursionError, binascii.Error):
        raise RequestError("invalid cursor", field="cursor") from None
    if not isinstance(data, dict) or not all(key in data for key in keys):
        raise RequestError("invalid cursor", field="cursor")
    values = tuple(data[key] for key in keys)
    if not all(_plain(value) for value in values):
        raise RequestError("invalid cursor", field="cursor")
    return values


def _refuse_constant(name: str) -> float:
    raise ValueError(name)


def _plain(value: object) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -MAX_INT <= value <= MAX_INT
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # a "\ud800" escape decodes to a lone surrogate no database driver takes
        except UnicodeEncodeError:
            return False
        return len(value) <= MAX_STRING_CHARS and "\x00" not in value
    return False
