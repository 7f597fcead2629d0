"""The sweeper and the janitor on a timer, for ``serve`` / ``api``, and for ``sdasync sweep`` on its own.

``Maintenance`` opens nothing: it runs on the backends it is given, from its own thread. That is safe with the
backends sdasync has: the SQLite ones open a connection per thread (the API's threadpool uses them the same
way), and boto3 clients are thread-safe. Several processes may each run one (every ``serve``, ``api`` and
``sweep``): the sweeper writes only by compare-and-set and the janitor's deletes are idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sdasync.config import Settings
from sdasync.janitor import PurgeReport, purge
from sdasync.service import Backends, open_backends
from sdasync.sweeper import SweepReport, sweep

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class MaintenanceReport:
    sweep: SweepReport
    purge: PurgeReport

    def to_dict(self) -> dict[str, object]:
        """Plain data for the CLI to print."""
        return {"requeued": list(self.sweep.requeued), "redriven": list(self.sweep.redriven),
                "stranded": list(self.sweep.stranded), "purged": {"tasks": self.purge.tasks,
                                                                   "images": self.purge.images,
                                                                   "payloads": self.purge.payloads,
                                                                   "orphans": self.purge.orphans,
                                                                   "deadLetters": self.purge.dead_letters},
                "errors": self.sweep.errors + self.purge.errors}


class Maintenance:
    """One pass is a sweep, then a purge; ``start_thread`` runs a pass every interval until told to stop."""

    def __init__(self, backends: Backends, *, retention_s: float, requeue_after_s: float, max_attempts: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.backends = backends
        self.retention_s = retention_s
        self.requeue_after_s = requeue_after_s
        self.max_attempts = max_attempts
        self.clock = clock

    @classmethod
    def from_settings(cls, backends: Backends, settings: Settings) -> Maintenance:
        return cls(backends, retention_s=settings.retention_s, requeue_after_s=settings.requeue_after,
                   max_attempts=settings.max_attempts)

    def run_once(self) -> MaintenanceReport:
        """One sweep and one purge. Backend failures are logged and counted, not raised."""
        now = self.clock()
        swept = sweep(self.backends, requeue_after_s=self.requeue_after_s, max_attempts=self.max_attempts, now=now)
        purged = purge(self.backends, retention_s=self.retention_s, now=now)
        report = MaintenanceReport(sweep=swept, purge=purged)
        if swept or purged:
            log.info("maintenance: requeued %d, redrove %d, failed %d stranded; purged %d tasks, %d images, "
                     "%d payloads, %d orphaned files; %d errors", len(swept.requeued), len(swept.redriven),
                     len(swept.stranded), purged.tasks, purged.images, purged.payloads, purged.orphans,
                     swept.errors + purged.errors)
        return report

    def run(self, interval_s: float, stop: threading.Event) -> None:
        """A pass now, then one every ``interval_s`` until ``stop`` is set. Never dies of a pass's exception:
        maintenance that stops silently would strand tasks again."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s}")
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # a bug in one pass must not end the loop: log it, try again next interval
                log.exception("maintenance pass failed; trying again in %.0f s", interval_s)
            stop.wait(interval_s)

    def start_thread(self, interval_s: float, stop: threading.Event) -> threading.Thread:
        """Run ``run`` in a daemon thread (started); set ``stop`` and join it to end it."""
        thread = threading.Thread(target=self.run, args=(interval_s, stop), name="sdasync-maintenance",
                                  daemon=True)
        thread.start()
        return thread


def run_command(settings: Settings, *, once: bool, stop: threading.Event | None = None) -> MaintenanceReport | None:
    """``sdasync sweep``: open the backends the settings name, then one pass (``once``; its report is returned)
    or passes every ``settings.sweep_interval`` until ``stop`` is set (None is returned)."""
    with open_backends(settings) as backends:
        maintenance = Maintenance.from_settings(backends, settings)
        if once:
            return maintenance.run_once()
        maintenance.run(settings.sweep_interval, stop or threading.Event())
    return None
