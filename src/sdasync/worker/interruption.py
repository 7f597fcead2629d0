"""Watch EC2 instance metadata (IMDSv2) for a spot interruption notice or a rebalance recommendation.

A spot instance gets a two-minute warning at ``latest/meta-data/spot/instance-action`` (404 until then, then
``{"action": "terminate|stop|hibernate", "time": "..."}``); a rebalance recommendation, which may come earlier, at
``latest/meta-data/events/recommendations/rebalance`` (``{"noticeTime": "..."}``). AWS suggests polling every 5 s.

Every read uses IMDSv2: ``PUT latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` gives a session token,
sent back as ``X-aws-ec2-metadata-token``. Instances may require it (``HttpTokens=required``, the default for new
instance types), so IMDSv1 is never tried. The token is cached until shortly before its TTL; a 401 (expired, or IMDS
restarted) fetches a new one and retries once.

The first notice calls ``on_notice(kind, detail)`` once, with kind ``"spot-interruption"`` or
``"rebalance-recommendation"`` (an interruption wins if both are present), and the watcher stops: the worker's
answer to either is the same (stop taking tasks, finish or hand back the current one), so a second notice would ask
for nothing new.

Off EC2 the metadata address belongs to nobody: connections fail after a short timeout (connect 1 s, read 2 s).
That is logged once at INFO, the watcher keeps checking every ``unavailable_interval_s`` (60 s) in case the network
comes up late, and it never raises. Other surprises (an unexpected HTTP status from a reachable IMDS) are logged
once per streak and polling goes on at the normal interval, since an instance that really is being interrupted
cannot afford a slow poll.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import httpx

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://169.254.169.254"
BASE_URL_ENV = "SDASYNC_IMDS_URL"
# ruff's S105 reads "TOKEN" in a name as a hardcoded secret; these are a URL path and header names.
TOKEN_PATH = "/latest/api/token"  # noqa: S105
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"  # noqa: S105
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105
#: The longest TTL IMDS grants (6 hours).
MAX_TOKEN_TTL_S = 21600
SPOT_INTERRUPTION = "spot-interruption"
REBALANCE_RECOMMENDATION = "rebalance-recommendation"
#: IMDS answers in milliseconds on EC2; anything slower means it is not there.
TIMEOUT = httpx.Timeout(2.0, connect=1.0)

Notice = tuple[str, dict[str, Any]]


class _Unreachable(Exception):
    """Nothing answers at the metadata address (or it refuses tokens): most likely not on EC2."""


class _Unexpected(Exception):
    """IMDS answered, but not as documented."""


class SpotInterruptionWatcher:
    """A daemon thread polling IMDSv2 for spot notices; see the module docstring."""

    def __init__(
        self,
        on_notice: Callable[[str, dict[str, Any]], None],
        *,
        base_url: str | None = None,
        interval_s: float = 5.0,
        unavailable_interval_s: float = 60.0,
        token_ttl_s: int = MAX_TOKEN_TTL_S,
        client: httpx.Client | None = None,
    ) -> None:
        """``base_url`` defaults to ``$SDASYNC_IMDS_URL``, else ``http://169.254.169.254``. ``client`` replaces the
        default one (no environment proxies: a proxy would answer for the link-local address, or swallow it)."""
        if interval_s <= 0 or unavailable_interval_s <= 0:
            raise ValueError("interval_s and unavailable_interval_s must be > 0")
        if not 1 <= token_ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"token_ttl_s must be between 1 and {MAX_TOKEN_TTL_S}, got {token_ttl_s}")
        self.on_notice = on_notice
        self.base_url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        self.interval_s = interval_s
        self.unavailable_interval_s = unavailable_interval_s
        self.token_ttl_s = token_ttl_s
        self._client = client or httpx.Client(timeout=TIMEOUT, trust_env=False)
        self._owns_client = client is None
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The notice delivered, once there is one.
        self.notice: Notice | None = None
        #: Whether IMDS answered the last check; None before the first.
        self.available: bool | None = None
        #: Checks done so far (for tests and diagnostics).
        self.checks = 0
        self._unexpected_logged = False

    # --- lifecycle -----------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start polling on a daemon thread (the first check at once). Starting a running watcher does nothing."""
        if self.running:
            return
        if self._owns_client and self._client.is_closed:  # started again after a stop()
            self._client = httpx.Client(timeout=TIMEOUT, trust_env=False)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="spot-interruption-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling and wait (at most ``timeout``) for the thread: it waits on an event between checks, so this
        takes at most one in-flight request (bounded by the 1 s / 2 s timeouts), usually nothing."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if self._owns_client and not self.running:
            self._client.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            notice = self.check()
            if notice is not None:
                self._deliver(notice)
                return
            if self._stop.wait(self.interval_s if self.available else self.unavailable_interval_s):
                return

    def _deliver(self, notice: Notice) -> None:
        self.notice = notice
        kind, detail = notice
        log.warning("instance metadata reports a %s: %s", kind, detail)
        try:
            self.on_notice(kind, detail)
        except Exception:  # the callback's failure is the caller's; the watcher must not die noisily twice
            log.exception("on_notice raised for %s", kind)

    # --- one check -----------------------------------------------------------------------------------------------

    def check(self) -> Notice | None:
        """Ask IMDS once: the notice if there is one, else None. Never raises."""
        self.checks += 1
        try:
            action = self._get(INSTANCE_ACTION_PATH)
            notice = (SPOT_INTERRUPTION, action) if action is not None else None
            if notice is None:
                rebalance = self._get(REBALANCE_PATH)
                notice = (REBALANCE_RECOMMENDATION, rebalance) if rebalance is not None else None
        except _Unreachable as exc:
            self._set_available(False, str(exc))
            return None
        except _Unexpected as exc:
            self._set_available(True)
            if not self._unexpected_logged:
                log.warning("instance metadata at %s answered unexpectedly: %s; still watching", self.base_url, exc)
                self._unexpected_logged = True
            return None
        except Exception:  # a bug here must not kill the thread that is to warn of an interruption
            log.exception("spot interruption check failed")
            return None
        self._set_available(True)
        self._unexpected_logged = False
        return notice

    def _set_available(self, available: bool, reason: str = "") -> None:
        if available and self.available is False:
            log.info("instance metadata at %s reachable again; watching for spot notices", self.base_url)
        elif available and self.available is None:
            log.debug("instance metadata at %s reachable; watching for spot notices", self.base_url)
        elif not available and self.available is not False:
            # Once per outage, not per check: off EC2 this is the normal state, not news every minute.
            log.info(
                "instance metadata at %s unavailable (%s); not on EC2? checking every %g s",
                self.base_url, reason, self.unavailable_interval_s,
            )
        self.available = available

    def _token_value(self) -> str:
        now = time.monotonic()
        if self._token is not None and now < self._token_renew_at:
            return self._token
        try:
            response = self._client.put(
                f"{self.base_url}{TOKEN_PATH}", headers={TOKEN_TTL_HEADER: str(self.token_ttl_s)}
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Unreachable(f"{type(exc).__name__}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise _Unexpected(f"token request failed: {type(exc).__name__}: {exc}") from exc
        # 403: IMDS is turned off for this instance; 404/405: whatever answers is not IMDSv2.
        if response.status_code in (403, 404, 405):
            raise _Unreachable(f"token request answered HTTP {response.status_code}")
        token = response.text.strip()
        if response.status_code != 200 or not token:
            raise _Unexpected(f"token request answered HTTP {response.status_code}")
        # Renew a little before IMDS expires it, so a token never dies between this check and its use.
        self._token, self._token_renew_at = token, now + self.token_ttl_s * 0.9
        return token

    def _get(self, path: str) -> dict[str, Any] | None:
        """The JSON document at ``path``, or None on 404."""
        for attempt in (1, 2):
            token = self._token_value()
            try:
                response = self._client.get(f"{self.base_url}{path}", headers={TOKEN_HEADER: token})
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise _Unreachable(f"{type(exc).__name__}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise _Unexpected(f"{path}: {type(exc).__name__}: {exc}") from exc
            if response.status_code == 401 and attempt == 1:
                # Expired or unknown to IMDS (a token does not survive an IMDS restart): a fresh one, one retry.
                self._token = None
                continue
            break
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise _Unexpected(f"{path} answered HTTP {response.status_code}")
        try:
            body = json.loads(response.text)
        except ValueError:
            return {"raw": response.text}
        return body if isinstance(body, dict) else {"raw": response.text}
