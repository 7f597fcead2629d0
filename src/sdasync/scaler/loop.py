"""The control loop: each tick reads the queue and the fleet, asks the policy, and sets the fleet's size.

Every tick calls ``fleet.set_desired`` with the decision, changed or not: the actuators skip writes that
change nothing, and a target someone edited by hand (or a worker that died) is put back on the next tick
instead of waiting for the decision to change.

Metrics: each decision is logged as one JSON line on the ``sdasync.scaler`` logger, with its inputs and its
reason. The line is also a CloudWatch Embedded Metric Format record (the ``_aws`` key), so under Lambda, or any
log shipper that speaks EMF, it becomes the metrics ``DesiredWorkers``, ``RunningWorkers``, ``PendingWorkers``,
``QueueVisible``, ``QueueInFlight`` and ``QueueDelayed`` (namespace ``sdasync``) with no API call and no
endpoint to scrape. ``ScalerLoop.metrics()`` returns the same numbers for ``/healthz``.

State between ticks is the ``PolicyState`` each decision returns. A fresh loop (a restart, a Lambda cold
start) has none, so ``initial_state`` rebuilds it from what it sees: the fleet's current size is the last
desired capacity, and a fleet that has workers counts as busy now, which restarts the scale-in cooldown
instead of dropping workers the moment a scaler restarts. (The policy's own no-history rule, ``state=None``,
sizes from the queue alone and would scale an idle fleet in at once; an empty fleet gets the same answer
either way.)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sdasync.backends.base import Queue
from sdasync.errors import SdasyncError
from sdasync.scaler.actuators.base import Fleet
from sdasync.scaler.types import Decision, Observation, PolicyConfig, PolicyState

log = logging.getLogger("sdasync.scaler")

Decide = Callable[[Observation, PolicyConfig, PolicyState | None], Decision]
NAMESPACE = "sdasync"
METRICS = {"DesiredWorkers": "desired", "RunningWorkers": "running", "PendingWorkers": "pending",
           "QueueVisible": "visible", "QueueInFlight": "in_flight", "QueueDelayed": "delayed"}


def initial_state(obs: Observation) -> PolicyState:
    """What a scaler with no memory assumes (see the module docstring)."""
    size = obs.current + obs.pending
    busy = size > 0 or obs.visible + obs.in_flight > 0
    backlog = size > 0 or obs.visible + obs.delayed > 0
    return PolicyState(desired=size, last_busy_at=obs.now if busy else None,
                       last_backlog_at=obs.now if backlog else None)


class ScalerLoop:
    def __init__(self, queue: Queue, fleet: Fleet, config: PolicyConfig, *, decide: Decide | None = None,
                 state: PolicyState | None = None, clock: Callable[[], float] = time.time,
                 name: str = "") -> None:
        if decide is None:
            # Imported here so the loop module loads before (and without) the policy's own imports.
            from sdasync.scaler.policy import decide as policy_decide

            decide = policy_decide
        self.queue = queue
        self.fleet = fleet
        self.config = config
        self.decide = decide
        self.state = state
        self.clock = clock
        self.name = name
        self.last: dict[str, Any] = {}
        self.errors = 0
        self._lock = threading.Lock()

    def observe(self) -> Observation:
        depth = self.queue.depth()
        running, pending = self.fleet.capacity()
        return Observation(now=self.clock(), visible=depth.visible, in_flight=depth.in_flight, current=running,
                           pending=pending, delayed=depth.delayed)

    def tick(self) -> Decision:
        """One decision, applied. Raises whatever the queue or fleet raise (SdasyncError), state unchanged."""
        obs = self.observe()
        state = self.state if self.state is not None else initial_state(obs)
        decision = self.decide(obs, self.config, state)
        self.fleet.set_desired(decision.desired)
        # Only once applied: a failed set_desired leaves the previous state for the retry.
        self.state = decision.state
        record = self._record(obs, state, decision)
        with self._lock:
            self.last = record
        log.info("%s", json.dumps(record, separators=(",", ":")))
        return decision

    def _record(self, obs: Observation, before: PolicyState, decision: Decision) -> dict[str, Any]:
        values = {"desired": decision.desired, "previous": before.desired, "running": obs.current,
                  "pending": obs.pending, "visible": obs.visible, "in_flight": obs.in_flight,
                  "delayed": obs.delayed}
        return {
            "event": "scale_decision", "time": obs.now, "fleet": self.name, **values, "reason": decision.reason,
            "min": self.config.min_workers, "max": self.config.max_workers,
            **{metric: values[key] for metric, key in METRICS.items()},
            "_aws": {"Timestamp": int(obs.now * 1000), "CloudWatchMetrics": [{
                "Namespace": NAMESPACE, "Dimensions": [["fleet"]],
                "Metrics": [{"Name": metric, "Unit": "Count"} for metric in METRICS]}]},
        }

    def metrics(self) -> dict[str, Any]:
        """The last decision's numbers, for a health endpoint: ``{"ok", "desired", "running", ...}``."""
        with self._lock:
            last = dict(self.last)
        body: dict[str, Any] = {"ok": True, "errors": self.errors}
        for key in ("desired", "running", "pending", "visible", "in_flight", "delayed", "reason", "time"):
            if key in last:
                body[key] = last[key]
        return body

    def run(self, *, interval_s: float, stop: threading.Event | None = None, once: bool = False) -> None:
        """Tick every ``interval_s`` until ``stop`` is set (or once). A failing tick is logged and retried on
        the next one: the fleet keeps its size meanwhile, which is the safe thing to do blind."""
        stop = stop or threading.Event()
        while True:
            started = time.monotonic()
            try:
                self.tick()
            except Exception as exc:  # the scaler must outlive any one failure, not freeze the fleet silently
                if once:
                    raise
                self.errors += 1
                log.warning("scaler tick failed: %s", exc, exc_info=not isinstance(exc, SdasyncError))
            if once:
                return
            if stop.wait(max(0.0, interval_s - (time.monotonic() - started))):
                return

    def start_thread(self, *, interval_s: float, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, kwargs={"interval_s": interval_s, "stop": stop},
                                  name="sdasync-scaler", daemon=True)
        thread.start()
        return thread
