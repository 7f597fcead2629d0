"""Runs N ``sdasync worker`` processes beside the API for ``sdasync serve``, restarting any that die.

Workers start in their own session so a Ctrl-C in the terminal reaches only ``serve``, which then sends each
worker exactly one SIGTERM: a worker takes a second signal as "exit now", which would skip its drain.

``resize(n)`` changes N while running (the local fleet of ``serve --autoscale``): new workers start at once;
extra ones get their one SIGTERM and move to a draining list, where they finish their task and are never
restarted. Which worker is idle cannot be seen from here, so the newest go first: they have had the least time
to pick up a long task, and the oldest keep their warm engines.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


class WorkerSupervisor:
    def __init__(self, args: Sequence[str], count: int, *, drain_timeout_s: float = 90.0,
                 check_interval_s: float = 0.5) -> None:
        self.command = [sys.executable, "-m", "sdasync", "worker", *args, "--parent-pid", str(os.getpid())]
        self.count = count
        self.drain_timeout_s = drain_timeout_s
        self.check_interval_s = check_interval_s
        self.processes: list[subprocess.Popen[bytes]] = []
        #: Workers told to stop by ``resize``: they drain and exit, and nobody restarts them.
        self.draining: list[subprocess.Popen[bytes]] = []
        #: Pids of workers holding a task, when known (serve --autoscale reads them from the task store).
        self.busy_pids: Callable[[], set[int]] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="sdasync-supervisor", daemon=True)
        self._restarts: list[float] = []

    def start(self) -> None:
        with self._lock:
            self.processes = [self._spawn() for _ in range(self.count)]
        self._thread.start()

    def resize(self, count: int) -> None:
        """Run ``count`` workers: start the missing ones, SIGTERM the newest extra ones (they drain)."""
        if count < 0:
            raise ValueError(f"worker count must be >= 0, not {count}")
        with self._lock:
            if self._stopping.is_set():
                return
            if count != self.count:
                log.info("workers: %d -> %d", self.count, count)
            self.count = count
            while len(self.processes) < count:
                self.processes.append(self._spawn())
            if len(self.processes) > count:
                busy = self._busy()
                # Idle workers go first (newest first), busy ones only if there are not enough idle ones: a
                # busy worker drains too, but it may have to hand its task back.
                order = sorted(range(len(self.processes)), key=lambda i: (self.processes[i].pid in busy, -i))
                leaving = set(order[:len(self.processes) - count])
                for i in sorted(leaving):
                    process = self.processes[i]
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)
                        self.draining.append(process)
                        log.info("worker pid %d: draining", process.pid)
                self.processes = [p for i, p in enumerate(self.processes) if i not in leaving]

    def _busy(self) -> set[int]:
        if self.busy_pids is None:
            return set()
        try:
            return set(self.busy_pids())
        except Exception as exc:  # without the information, fall back to the newest-first order
            log.warning("cannot tell busy workers from idle ones: %s", exc)
            return set()

    def draining_count(self) -> int:
        with self._lock:
            return self._reap_drained()

    def _reap_drained(self) -> int:
        # Popen.poll() also reaps the zombie, so a drained worker does not linger in the process table.
        self.draining = [p for p in self.draining if p.poll() is None]
        return len(self.draining)

    def _spawn(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(self.command, start_new_session=True)
        log.info("started worker pid %d", process.pid)
        return process

    def _watch(self) -> None:
        while not self._stopping.wait(self.check_interval_s):
            with self._lock:
                self._reap_drained()
                for i, process in enumerate(self.processes):
                    code = process.poll()
                    if code is None or self._stopping.is_set():
                        continue
                    # A crash loop (a broken engine URL, say) must not spin: at most 5 restarts a minute.
                    now = time.monotonic()
                    self._restarts = [t for t in self._restarts if now - t < 60]
                    if len(self._restarts) >= 5:
                        continue
                    log.warning("worker pid %d exited with %s; restarting it", process.pid, code)
                    self._restarts.append(now)
                    self.processes[i] = self._spawn()

    def alive(self) -> int:
        with self._lock:
            return sum(1 for p in self.processes if p.poll() is None)

    def health(self) -> dict[str, object]:
        """Never waits on a drain (``stop`` holds no lock while it waits): a health probe must answer at once. While
        draining it is not ok, so a load balancer stops sending new work here."""
        with self._lock:
            pids = [p.pid for p in self.processes if p.poll() is None]
            draining = self._reap_drained()
        stopping = self._stopping.is_set()
        return {"ok": (bool(pids) or self.count == 0) and not stopping, "running": len(pids), "desired": self.count,
                "pids": pids, "draining": draining + (len(pids) if stopping else 0), "stopping": stopping}

    def kill(self) -> None:
        """SIGKILL every worker now. Takes no lock: it runs from a signal handler while ``stop`` holds it."""
        for process in [*self.processes, *self.draining]:
            if process.poll() is None:
                process.kill()

    def stop(self) -> None:
        """SIGTERM every worker (they drain), then SIGKILL whatever is left after the drain timeout. The lock is
        held only to take the list: waiting under it would block every ``health`` call for the whole drain."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            running = list(self.processes)
            # Draining workers already had their one SIGTERM; they are only waited for.
            waiting = [*running, *self.draining]
            for process in running:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout_s
        for process in waiting:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not drain in time; killing it", process.pid)
                process.kill()
                process.wait()
        if self._thread.is_alive():
            self._thread.join(timeout=self.check_interval_s * 4)


def watch_parent(parent_pid: int, on_orphaned: Callable[[], None], *, interval_s: float = 1.0) -> threading.Thread:
    """Call ``on_orphaned`` once the process that started this one is gone (it was SIGKILLed, say): a worker in
    its own session would otherwise poll the queue forever with nobody to stop it."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        log.warning("parent process %d is gone; stopping", parent_pid)
        on_orphaned()

    thread = threading.Thread(target=watch, name="sdasync-parent-watch", daemon=True)
    thread.start()
    return thread
