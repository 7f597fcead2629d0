"""URL parsing shared by every ``from_url``.

Paths follow SQLAlchemy's rule, for ``sqlite://`` and ``file://`` alike: three slashes then a relative path
(``sqlite:///data/sdasync.db`` is ``./data/sdasync.db``), four slashes for an absolute one
(``sqlite:////var/lib/sdasync/sdasync.db``). Query parameters are checked against what the backend accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import TypeAdapter, ValidationError

from sdasync.errors import ConfigError


def path_from_url(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc:
        raise ConfigError(f"{url!r}: use {parts.scheme}:///relative/path or {parts.scheme}:////absolute/path")
    if not parts.path or parts.path == "/":
        raise ConfigError(f"{url!r} names no path")
    # "/data/x" -> "data/x" (relative); "//abs/x" -> "/abs/x" (absolute)
    return Path(parts.path[1:])


def url_for_path(scheme: str, path: Path | str) -> str:
    """The inverse of ``path_from_url``: absolute paths get four slashes, relative ones three."""
    # An absolute posix path starts with "/", which makes the fourth slash.
    return f"{scheme}:///{Path(path).as_posix()}"


_BOOL = TypeAdapter(bool)


def parse_bool(raw: str) -> bool:
    """The one boolean parser, pydantic's, which also parses the settings: ``1/0``, ``true/false``, ``yes/no``,
    ``on/off`` in any case. Raises ValueError."""
    try:
        return _BOOL.validate_python(raw.strip())
    except ValidationError:
        raise ValueError(f"not a boolean: {raw!r} (use true/false, 1/0, yes/no, on/off)") from None


CONVERTERS: dict[type[Any], Callable[[str], Any]] = {int: int, float: float, str: str, bool: parse_bool}


def query_params(url: str, allowed: Mapping[str, type[Any]]) -> dict[str, Any]:
    """The URL's query as typed values. Unknown or malformed parameters raise ConfigError listing the valid ones."""
    result: dict[str, Any] = {}
    for key, raw in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key not in allowed:
            valid = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(f"unknown parameter {key!r} in {url!r}; valid: {valid}")
        try:
            result[key] = CONVERTERS[allowed[key]](raw)
        except ValueError as exc:
            raise ConfigError(f"parameter {key!r} in {url!r}: {exc}") from exc
    return result
