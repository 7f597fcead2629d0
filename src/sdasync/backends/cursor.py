"""Opaque listing cursors: URL-safe base64 of a small JSON object. Each store puts its own position in it."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from sdasync.errors import RequestError


def encode_cursor(position: dict[str, Any]) -> str:
    raw = json.dumps(position, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, keys: tuple[str, ...]) -> tuple[Any, ...]:
    """The values of ``keys`` in the cursor. Raises RequestError (field ``cursor``) for anything malformed; the
    caller checks the values' types and meaning."""
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return tuple(data[key] for key in keys)
    except (ValueError, TypeError, KeyError, binascii.Error) as exc:
        raise RequestError("invalid cursor", field="cursor") from exc
