"""Authentication at the API: which ``Caller`` a request is.

Keys are required whenever the API listens on anything but loopback (``--auth`` turns them on or off
explicitly) and always under Lambda. Without that requirement, a request with no key is the local operator
(``callers.LOCAL``, key-less mode for a first try); a request that presents a key is still checked and scoped to
its tenant. Every failure is the same 401, whatever was wrong with the key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from fastapi import Request

from sdasync.auth.keys import KeyRing, presented_key
from sdasync.callers import LOCAL, Caller
from sdasync.config import Settings
from sdasync.errors import Unauthorized

MISSING = "an API key is required: send Authorization: Bearer <key> (or X-API-Key)"


def auth_required(settings: Settings) -> bool:
    if settings.auth is not None:
        return settings.auth
    return not is_loopback(settings.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Gate:
    def __init__(self, keys: KeyRing | None, *, required: bool) -> None:
        self.keys = keys
        self.required = required

    def caller(self, headers: Mapping[str, str]) -> Caller:
        """Raises Unauthorized, BackendError."""
        presented = presented_key(headers)
        if presented is None:
            if self.required:
                raise Unauthorized(MISSING)
            return LOCAL
        if self.keys is None:
            raise Unauthorized("this task store keeps no API keys")
        key = self.keys.verify(presented)
        return Caller(tenant=key.tenant, admin=key.admin, key=key)

    def maybe(self, headers: Mapping[str, str]) -> Caller | None:
        """The caller, or None where an unauthenticated request is allowed to ask (``/healthz``)."""
        try:
            return self.caller(headers)
        except Unauthorized:
            return None


def caller(request: Request) -> Caller:
    """The FastAPI dependency of every route that reads or changes tasks."""
    gate: Gate = request.app.state.gate
    return gate.caller(request.headers)
