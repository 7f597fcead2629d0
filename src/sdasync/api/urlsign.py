"""Signed, expiring URLs for the images the API serves itself (the embedded file blob store).

An image URL is ``<base>results/<key>?exp=<epoch>&sig=<hmac>``: HMAC-SHA256 over the key and the expiry with a
secret every API process shares, so a link cannot be guessed, enumerated or extended, and stops working at
``exp``. Expiries are rounded up (to the minute, or a tenth of a shorter TTL), so a client polling a task sees
the same URLs for a while and its browser cache keeps working. S3 presigned URLs do the same for the S3 store; a
CDN's signed URLs come with the deployment.

The secret is ``--url-secret`` (SDASYNC_URL_SECRET), or else one generated on first use into
``<data-dir>/secrets/url.key`` (mode 0600), which every process on the machine then reads.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from sdasync.backends.base import BlobStore
from sdasync.config import Settings

#: Expiries are rounded up to at most this many seconds.
ROUND_S = 60


class UrlSigner:
    def __init__(self, secret: bytes, *, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("the URL signing secret must have at least 16 bytes")
        self._secret = secret
        self.ttl_s = ttl_s
        self.clock = clock

    def _mac(self, key: str, expires: int) -> str:
        digest = hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")

    def query(self, key: str) -> str:
        """``exp=...&sig=...`` for ``key``."""
        step = max(1, min(ROUND_S, int(self.ttl_s / 10)))
        expires = math.ceil((self.clock() + self.ttl_s) / step) * step
        return f"exp={expires}&sig={self._mac(key, expires)}"

    def valid(self, key: str, exp: str | None, sig: str | None) -> bool:
        if exp is None or sig is None or not exp.isdigit() or len(exp) > 12:
            return False
        expires = int(exp)
        return expires > self.clock() and hmac.compare_digest(self._mac(key, expires), sig)


def signer_for(blobs: BlobStore, settings: Settings) -> UrlSigner | None:
    """The signer of ``blobs``' URLs: one when the API serves them itself, None for a store whose URLs are its
    own (S3 presigned)."""
    if "served_by_api" not in blobs.capabilities:
        return None
    return UrlSigner(load_secret(settings.url_secret, settings.url_secret_path), ttl_s=settings.url_ttl)


def image_urls(blobs: BlobStore, signer: UrlSigner | None, base_url: str) -> Callable[[str], str]:
    """``url(key)``: a result image's absolute URL, signed when ``signer`` is given."""

    def url(key: str) -> str:
        plain = blobs.url(key, base_url=base_url)
        return plain if signer is None else f"{plain}?{signer.query(key)}"

    return url


def load_secret(configured: str | None, path: Path) -> bytes:
    """The configured secret, or the machine's shared one in ``path``, made on first use (atomically: written
    to a private temporary file, then linked into place, so no process ever reads a half-written secret)."""
    if configured:
        return configured.encode()
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process made it first: use theirs
    finally:
        tmp.unlink()
    return _read(path)


def _read(path: Path) -> bytes:
    data = path.read_bytes().strip()
    if len(data) < 32:
        raise ValueError(f"the URL signing secret in {path} is too short")
    return data
