"""Blob keys: the one rule every blob store applies before touching storage."""

from __future__ import annotations

from sdasync.errors import RequestError

#: S3 takes 1024 bytes of key; a file system's name limit (255 bytes a segment) comes sooner for files.
MAX_KEY_CHARS = 512
MAX_SEGMENT_CHARS = 200


def check_key(key: str) -> None:
    """Raise RequestError (field ``key``) unless ``key`` is a safe relative path like ``<taskId>/0.png``.
    Messages do not repeat the key: it may be a client's, of any length."""
    if not isinstance(key, str) or not key:
        raise RequestError("blob key must be a non-empty string", field="key")
    if len(key) > MAX_KEY_CHARS:
        raise RequestError(f"blob key is longer than {MAX_KEY_CHARS} characters", field="key")
    if "\\" in key or any(ord(c) < 0x20 or c == "\x7f" for c in key):
        raise RequestError("blob key contains a backslash or a control character", field="key")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("blob key is not valid Unicode text", field="key") from None
    if key.startswith("/"):
        raise RequestError(f"blob key {key!r} must be relative", field="key")
    segments = key.split("/")
    if any(segment in {"", ".", ".."} for segment in segments):
        raise RequestError(f"blob key {key!r} has an empty, '.' or '..' segment", field="key")
    if any(len(segment) > MAX_SEGMENT_CHARS for segment in segments):
        raise RequestError(f"blob key has a segment longer than {MAX_SEGMENT_CHARS} characters", field="key")
