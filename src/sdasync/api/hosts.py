"""The base URL image URLs and ``Location`` are built from, and which Host headers may supply it.

A Host header is the client's to write. Built into an image URL as it came, a forged one (``Host: evil.example``)
would send a victim's browser or a cache elsewhere for the images. So, in this order:

1. ``settings.public_url``, when set, always (the address clients use behind a proxy or a CDN);
2. on Lambda, the API Gateway's own domain and stage from the event's request context (the handler puts it in
   the ASGI scope under ``GATEWAY_BASE_URL``), never the Host header;
3. the request's Host, when its host name is trusted (``settings.trusted_hosts``; by default the bind address,
   ``localhost``, ``127.0.0.1``, ``::1`` and the host of ``public_url``) and its port, if any, is the one the
   server listens on (behind a port mapping, set ``public_url``);
4. otherwise ``http://{settings.host}:{settings.port}/``.

A request with an untrusted Host is answered, not refused: nothing of the forged host reaches a URL either way,
and refusing would break every client that reaches the server under a name nobody listed (a container's
hostname, a test client) without protecting anything more. A deployment that wants such requests refused puts
a proxy with a host allowlist in front.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from starlette.requests import Request

from sdasync.config import Settings

#: ASGI scope key under which the Lambda handler passes the gateway's base URL.
GATEWAY_BASE_URL = "sdasync.base_url"
#: A host name or an IP literal, with an optional port: nothing else may come from a Host header into a URL.
HOST_HEADER = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(?::[0-9]{1,5})?",
                         re.ASCII)


def trusted_hosts(settings: Settings) -> frozenset[str]:
    if settings.trusted_hosts is not None:
        return frozenset(host.lower().strip("[]") for host in settings.trusted_hosts)
    hosts = {settings.host.lower(), "localhost", "127.0.0.1", "::1"}
    if settings.public_url:
        public = urlsplit(settings.public_url).hostname
        if public:
            hosts.add(public.lower())
    return frozenset(hosts)


def fallback_base_url(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}/"


def base_url(request: Request) -> str:
    """The absolute base URL (ending in ``/``) for URLs in this request's answer."""
    settings: Settings = request.app.state.settings
    if settings.public_url:
        return settings.public_url.rstrip("/") + "/"
    gateway = request.scope.get(GATEWAY_BASE_URL)
    if isinstance(gateway, str):
        return gateway
    header = request.headers.get("host", "")
    match = HOST_HEADER.fullmatch(header)
    if match is None or match["host"].lower().strip("[]") not in trusted_hosts(settings):
        return fallback_base_url(settings)
    port = header[len(match["host"]):].lstrip(":")
    # Port 0 asks the OS for one: whatever the client reached is it.
    if port and settings.port and int(port) != settings.port:
        return fallback_base_url(settings)
    scheme = "https" if request.url.scheme in {"https", "wss"} else "http"
    root = str(request.scope.get("root_path") or "").rstrip("/")
    return f"{scheme}://{header}{root}/"
