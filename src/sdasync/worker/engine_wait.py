"""The worker's side of its engine: setting it up, waiting while it is down, and what to say about it meanwhile.

Both waits end as soon as the worker is asked to stop (``stop`` is its stop event, which the engine's own
``setup`` watches too), so a worker whose engine never came up exits at once on SIGTERM instead of being killed
at the end of its drain. Both say in the log what they wait for, and ``waiting`` is what the worker's registry
record shows meanwhile ("waiting for engine at <url> ..."), so a task that sits ``queued`` has a visible reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sdasync.engines.base import Engine
from sdasync.errors import EngineUnavailable
from sdasync.models import EngineHealth

log = logging.getLogger(__name__)


class EngineWatch:
    def __init__(self, engine: Engine, *, stop: threading.Event, label: str, probe_s: float = 2.0,
                 log_every_s: float = 15.0, on_change: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.stop = stop
        #: The engine's URL without credentials (or its class name), for the log and the registry.
        self.label = label
        self.probe_s = probe_s
        self.log_every_s = log_every_s
        #: Called when what the registry should say changed (the heartbeat writes it at once).
        self.on_change = on_change or (lambda: None)
        self.ready = False
        #: The engine said it cannot recover in this process: the worker exits to be restarted.
        self.broken = False
        #: What the registry record says of the engine while the worker waits for it; None when it is up.
        self.waiting: EngineHealth | None = EngineHealth(ok=False, detail=f"waiting for engine at {label}",
                                                         loaded=False)
        self._down_since: float | None = None

    def health(self) -> EngineHealth:
        try:
            return self.engine.health()
        except Exception as exc:  # a probe that raises is itself a sign of trouble
            return EngineHealth(ok=False, detail=f"{type(exc).__name__}: {exc}")

    def current(self) -> EngineHealth:
        """What the registry should say now: the wait, or the engine's own word."""
        waiting = self.waiting
        return self.health() if waiting is None else waiting

    def _waiting(self, since: float, why: str, report: EngineHealth | None = None) -> float:
        waited = time.monotonic() - since
        base = report or EngineHealth(ok=False, loaded=False)
        self.waiting = EngineHealth(ok=False, loaded=base.loaded, model=base.model, extra=base.extra,
                                    detail=f"waiting for engine at {self.label} ({waited:.0f} s): {why}")
        self.on_change()
        return waited

    def setup(self) -> bool:
        """Set the engine up, trying again while it is unavailable; False when asked to stop meanwhile. A
        ConfigError (a wrong model, credentials needed) is not waited out: it propagates."""
        delay, since = self.probe_s, time.monotonic()
        log.info("setting up engine %s", self.label)
        while not self.stop.is_set():
            try:
                self.engine.setup(self.stop)
            except EngineUnavailable as exc:
                if self.stop.is_set():
                    break
                waited = self._waiting(since, exc.message)
                log.warning("engine at %s not ready after %.0f s (%s); trying again in %.0f s", self.label, waited,
                            exc.message, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, self.probe_s * 8)
                continue
            self.ready, self.waiting = True, None
            self.on_change()
            return True
        log.info("stopped while waiting for engine at %s (%.0f s)", self.label, time.monotonic() - since)
        return False

    def went_down(self, report: EngineHealth) -> None:
        """The engine failed a task and its health is not ok: the registry says so from now on."""
        self._down_since = time.monotonic()
        self._waiting(self._down_since, report.detail or "not ok", report)

    def wait_until_up(self) -> bool:
        """Probe the engine (``probe_s``, doubling to 8 times that) until it answers: True. False when asked to
        stop, or when the engine says it cannot recover here (``broken``)."""
        delay, since, logged = self.probe_s, self._down_since or time.monotonic(), 0.0
        while not self.stop.wait(delay):
            report = self.health()
            if report.ok:
                log.info("engine at %s is back after %.0f s", self.label, time.monotonic() - since)
                self.waiting, self._down_since = None, None
                self.on_change()
                return True
            if report.restart:
                log.error("engine cannot recover in this process (%s); exiting to be restarted", report.detail)
                self.broken = True
                return False
            waited = self._waiting(since, report.detail, report)
            if waited - logged >= self.log_every_s:
                logged = waited
                log.warning("engine at %s still down after %.0f s: %s", self.label, waited, report.detail)
            delay = min(delay * 2, self.probe_s * 8)
        return False
