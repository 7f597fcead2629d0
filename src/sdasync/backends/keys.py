"""Blob keys: the one rule every blob store applies before touching storage."""

from __future__ import annotations

from sdasync.errors import RequestError


def check_key(key: str) -> None:
    """Raise RequestError (field ``key``) unless ``key`` is a safe relative path like ``<taskId>/0.png``."""
    if not isinstance(key, str) or not key:
        raise RequestError("blob key must be a non-empty string", field="key")
    if "\\" in key or "\x00" in key:
        raise RequestError(f"blob key {key!r} contains a backslash or NUL", field="key")
    if key.startswith("/"):
        raise RequestError(f"blob key {key!r} must be relative", field="key")
    if any(segment in {"", ".", ".."} for segment in key.split("/")):
        raise RequestError(f"blob key {key!r} has an empty, '.' or '..' segment", field="key")
