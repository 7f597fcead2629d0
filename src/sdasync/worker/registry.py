"""A worker's entry in the task store's registry, kept fresh by a heartbeat thread.

The API's ``/healthz`` reads the registry rather than an engine of its own: what counts is what the workers see.
A record is written when the worker starts (its engine not ready yet), at every heartbeat, and removed when the
worker stops cleanly. Its ``expires_at`` lies a few heartbeats ahead, so a worker that died (a kill, a lost
machine) drops out of the registry by itself. A failed write is logged and tried again at the next beat: the
registry is for operators, and a worker must never stop working because its store hiccuped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from sdasync.backends.base import TaskStore
from sdasync.errors import SdasyncError
from sdasync.models import EngineHealth, WorkerRecord

log = logging.getLogger(__name__)

#: A record lives this many heartbeats: one late beat (a slow store, a GC pause) does not drop a live worker.
EXPIRY_BEATS = 3


def public_url(url: str) -> str:
    """``url`` without any ``user:password@``: the registry is shown on ``/healthz``."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    # Not urlunsplit: it turns "fake://?x" (an empty host) into "fake:?x". The netloc's first occurrence is the one
    # right after "scheme://".
    return url.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)


class Heartbeat:
    """Writes the worker's registry record now and every ``interval_s`` on a daemon thread.

    ``snapshot()`` says what to publish: the engine's health and the id of the task in hand. It is called from
    the heartbeat thread, so it must be cheap and must not raise (what it raises is logged as not ok)."""

    def __init__(self, store: TaskStore, *, worker_id: str, engine_url: str,
                 snapshot: Callable[[], tuple[EngineHealth, str | None]], interval_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.store = store
        self.worker_id = worker_id
        self.engine_url = public_url(engine_url)
        self.snapshot = snapshot
        self.interval_s = interval_s
        self.clock = clock
        self.started_at = clock()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> WorkerRecord:
        try:
            health, task_id = self.snapshot()
        except Exception as exc:  # a broken probe is itself news for the registry
            health, task_id = EngineHealth(ok=False, detail=f"{type(exc).__name__}: {exc}"), None
        now = self.clock()
        return WorkerRecord(worker_id=self.worker_id, engine=self.engine_url, health=health, task_id=task_id,
                            started_at=self.started_at, heartbeat_at=now,
                            expires_at=now + EXPIRY_BEATS * self.interval_s, host=self.host, pid=self.pid)

    def beat(self) -> bool:
        """Write the record once; False (logged) when the store refused."""
        try:
            self.store.put_worker(self.record())
        except SdasyncError as exc:
            log.warning("worker %s: registry record not written: %s", self.worker_id, exc)
            return False
        except Exception:  # a bug in a store must not end the heartbeat, nor the worker
            log.exception("worker %s: registry record not written", self.worker_id)
            return False
        return True

    def nudge(self) -> None:
        """Write the record soon rather than at the next interval (the worker's state just changed)."""
        self._wake.set()

    def start(self) -> None:
        """The first record at once, on the caller's thread (so it exists before a long engine setup), then a
        thread for the rest."""
        self._stop.clear()  # a worker may run more than once (tests, burst mode)
        self._wake.clear()
        self.beat()
        self._thread = threading.Thread(target=self._run, name="sdasync-worker-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.beat()

    def stop(self, *, remove: bool = True) -> None:
        """Stop beating and, for a clean exit, remove the record."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            # A beat in flight is bounded by the store's own timeouts; a stuck one is left behind (daemon).
            self._thread.join(timeout=self.interval_s)
        if remove:
            try:
                self.store.remove_worker(self.worker_id)
            except SdasyncError as exc:
                log.warning("worker %s: registry record not removed (it expires by itself): %s", self.worker_id,
                            exc)
            except Exception:
                log.exception("worker %s: registry record not removed", self.worker_id)
