"""A small EC2 instance metadata client, IMDSv2 only: the spot watcher and the ASG scale-in protection share it.

Every read is ``GET <path>`` with a session token from ``PUT /latest/api/token`` (the TTL in
``X-aws-ec2-metadata-token-ttl-seconds``), sent back as ``X-aws-ec2-metadata-token``. Instances may require
tokens (``HttpTokens=required``, the default for new instance types), so IMDSv1 is never tried. The token is
kept until shortly before its TTL; a 401 (expired, or IMDS restarted) fetches a new one and retries once.

Errors: nothing answers (connection refused or timed out; a 403/404/405 to the token request, i.e. IMDS turned
off or something else at the address) -> MetadataUnavailable; any other surprise (an odd status, a broken
answer) -> MetadataError. Off EC2 the address belongs to nobody, so the timeouts are short: IMDS answers in
milliseconds where it exists.
"""

from __future__ import annotations

import time
from typing import Self

import httpx

from sdasync.errors import MetadataError, MetadataUnavailable

DEFAULT_BASE_URL = "http://169.254.169.254"
# ruff's S105 reads "TOKEN" in a name as a hardcoded secret; these are a URL path and header names.
TOKEN_PATH = "/latest/api/token"  # noqa: S105
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"  # noqa: S105
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105
#: The longest TTL IMDS grants (6 hours).
MAX_TOKEN_TTL_S = 21600
TIMEOUT = httpx.Timeout(2.0, connect=1.0)


class ImdsClient:
    """``get(path)`` reads one metadata document. Not thread-safe: one per thread that polls."""

    def __init__(self, base_url: str | None = None, *, token_ttl_s: int = MAX_TOKEN_TTL_S,
                 timeout: httpx.Timeout = TIMEOUT, client: httpx.Client | None = None) -> None:
        """``base_url``: None is EC2's own address. ``client`` replaces the default one (which ignores
        environment proxies: a proxy would answer for the link-local address, or swallow it)."""
        if not 1 <= token_ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"token_ttl_s must be between 1 and {MAX_TOKEN_TTL_S}, got {token_ttl_s}")
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.token_ttl_s = token_ttl_s
        self.timeout = timeout
        self._client = client
        self._owns_client = client is None
        self._token: str | None = None
        self._token_renew_at = 0.0

    @property
    def client(self) -> httpx.Client:
        if self._client is None or (self._owns_client and self._client.is_closed):
            self._client = httpx.Client(timeout=self.timeout, trust_env=False)
        return self._client

    def close(self) -> None:
        if self._owns_client and self._client is not None:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def token(self) -> str:
        now = time.monotonic()
        if self._token is not None and now < self._token_renew_at:
            return self._token
        try:
            response = self.client.put(f"{self.base_url}{TOKEN_PATH}",
                                       headers={TOKEN_TTL_HEADER: str(self.token_ttl_s)})
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise MetadataUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise MetadataError(f"token request failed: {type(exc).__name__}: {exc}") from exc
        # 403: IMDS is turned off for this instance; 404/405: whatever answers is not IMDSv2.
        if response.status_code in (403, 404, 405):
            raise MetadataUnavailable(f"token request answered HTTP {response.status_code}")
        token = response.text.strip()
        if response.status_code != 200 or not token:
            raise MetadataError(f"token request answered HTTP {response.status_code}")
        # Renew a little before IMDS expires it, so a token never dies between this check and its use.
        self._token, self._token_renew_at = token, now + self.token_ttl_s * 0.9
        return token

    def get(self, path: str) -> str | None:
        """The text at ``path`` (``/latest/meta-data/...``), or None on 404. Raises MetadataUnavailable,
        MetadataError."""
        for attempt in (1, 2):
            token = self.token()
            try:
                response = self.client.get(f"{self.base_url}{path}", headers={TOKEN_HEADER: token})
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise MetadataUnavailable(f"{type(exc).__name__}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise MetadataError(f"{path}: {type(exc).__name__}: {exc}") from exc
            if response.status_code == 401 and attempt == 1:
                # Expired or unknown to IMDS (a token does not survive an IMDS restart): a fresh one, one retry.
                self._token = None
                continue
            break
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise MetadataError(f"{path} answered HTTP {response.status_code}")
        return response.text
