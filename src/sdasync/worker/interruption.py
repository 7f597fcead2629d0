"""Watch EC2 instance metadata (IMDSv2) for a spot interruption notice or a rebalance recommendation.

A spot instance gets a two-minute warning at ``latest/meta-data/spot/instance-action`` (404 until then, then
``{"action": "terminate|stop|hibernate", "time": "..."}``); a rebalance recommendation, which may come earlier, at
``latest/meta-data/events/recommendations/rebalance`` (``{"noticeTime": "..."}``). AWS suggests polling every 5 s.

Every read goes through ``sdasync.imds.ImdsClient`` (IMDSv2 only: a session token, cached until shortly before its
TTL, renewed after a 401).

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
import threading
from collections.abc import Callable
from typing import Any, Self

import httpx

from sdasync.errors import MetadataError, MetadataUnavailable
from sdasync.imds import MAX_TOKEN_TTL_S, TIMEOUT, ImdsClient

log = logging.getLogger(__name__)

INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
SPOT_INTERRUPTION = "spot-interruption"
REBALANCE_RECOMMENDATION = "rebalance-recommendation"

Notice = tuple[str, dict[str, Any]]


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
        """``base_url``: the metadata service (None: EC2's own address; ``Settings.imds_url`` in the worker).
        ``client`` replaces the default HTTP client (which ignores environment proxies)."""
        if interval_s <= 0 or unavailable_interval_s <= 0:
            raise ValueError("interval_s and unavailable_interval_s must be > 0")
        self.on_notice = on_notice
        self._imds = ImdsClient(base_url, token_ttl_s=token_ttl_s, timeout=TIMEOUT, client=client)
        self.base_url = self._imds.base_url
        self.interval_s = interval_s
        self.unavailable_interval_s = unavailable_interval_s
        self.token_ttl_s = token_ttl_s
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
        if not self.running:
            self._imds.close()  # a start() after this opens a fresh connection pool

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
        except MetadataUnavailable as exc:
            self._set_available(False, str(exc))
            return None
        except MetadataError as exc:
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

    def _get(self, path: str) -> dict[str, Any] | None:
        """The JSON document at ``path``, or None on 404."""
        text = self._imds.get(path)
        if text is None:
            return None
        try:
            body = json.loads(text)
        except ValueError:
            return {"raw": text}
        return body if isinstance(body, dict) else {"raw": text}
