"""Authentication at the API: which ``Caller`` a request is.

Keys are required whenever the API listens on anything but loopback (``--auth`` turns them on or off
explicitly) and always under Lambda. Without that requirement, a request with no key is the local operator
(``callers.LOCAL``, key-less mode for a first try); a request that presents a key is still checked and scoped to
its tenant. Every failure is the same 401, whatever was wrong with the key.

Key-less mode answers only requests whose Host is a trusted name (``api.hosts.trusted_hosts``: by default the
bind address, ``localhost``, ``127.0.0.1``, ``::1``). A web page that rebinds its own name to 127.0.0.1 (DNS
rebinding) makes the browser send that name as the Host: such a request is refused like one without a key,
so no page on the internet can drive a key-less API through a browser on the same machine.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from fastapi import Request

from sdasync.api.hosts import GATEWAY_BASE_URL, HOST_HEADER
from sdasync.auth.keys import KeyRing, presented_key
from sdasync.callers import LOCAL, Caller
from sdasync.config import Settings
from sdasync.errors import Unauthorized

MISSING = "an API key is required: send Authorization: Bearer <key> (or X-API-Key)"
UNTRUSTED_HOST = ("without an API key, this API answers only requests addressed to a trusted host name "
                  "(--trusted-hosts); send an API key")


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
    def __init__(self, keys: KeyRing | None, *, required: bool, trusted: frozenset[str] = frozenset()) -> None:
        self.keys = keys
        self.required = required
        #: Host names a key-less request may be addressed to.
        self.trusted = trusted

    def caller(self, headers: Mapping[str, str], *, via_gateway: bool = False) -> Caller:
        """Raises Unauthorized, BackendError. ``via_gateway``: the request came through API Gateway (Lambda),
        where no browser can be rebound to a loopback address, so its Host is not checked."""
        presented = presented_key(headers)
        if presented is None:
            if self.required:
                raise Unauthorized(MISSING)
            if not via_gateway and not self._trusted_host(headers.get("host", "")):
                raise Unauthorized(UNTRUSTED_HOST)
            return LOCAL
        if self.keys is None:
            raise Unauthorized("this task store keeps no API keys")
        key = self.keys.verify(presented)
        return Caller(tenant=key.tenant, admin=key.admin, key=key)

    def _trusted_host(self, header: str) -> bool:
        match = HOST_HEADER.fullmatch(header)
        return match is not None and match["host"].lower().strip("[]") in self.trusted

    def maybe(self, headers: Mapping[str, str], *, via_gateway: bool = False) -> Caller | None:
        """The caller, or None where an unauthenticated request is allowed to ask (``/healthz``)."""
        try:
            return self.caller(headers, via_gateway=via_gateway)
        except Unauthorized:
            return None


def caller(request: Request) -> Caller:
    """The FastAPI dependency of every route that reads or changes tasks."""
    gate: Gate = request.app.state.gate
    return gate.caller(request.headers, via_gateway=GATEWAY_BASE_URL in request.scope)
