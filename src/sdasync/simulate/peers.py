"""The policies the simulator compares: sdasync's own, and the peers as docs/REFERENCE.md describes them.

Every policy sees the same :class:`Observation` once per decision interval and answers a desired instance count.
How the simulator takes instances away differs, because it differs in the real systems (``victims``):

- ``idle``: sdasync's actuators remove booting, then idle workers, never a busy one.
- ``newest``: a Kubernetes ReplicaSet scaling down deletes not-yet-ready pods first, then the youngest
  (KEDA drives a Deployment through the HPA).
- ``random``: an Auto Scaling group in one zone with the default termination policy ends up choosing among
  identical instances at random; SageMaker does not document its choice, so it gets the same treatment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

from sdasync.scaler.policy import decide
from sdasync.scaler.types import Observation, PolicyConfig, PolicyState

Victims = Literal["idle", "newest", "random"]
NAMES = ("sdasync", "seed-step", "keda", "target-tracking")


class SimPolicy(Protocol):
    name: str
    victims: Victims

    def decide(self, obs: Observation, service_estimate_s: float | None) -> int:
        """The desired instance count (booting ones included)."""
        ...


@dataclass
class SdasyncPolicy:
    """:func:`sdasync.scaler.policy.decide` with its configuration as given (service and boot time included, as
    ``sdasync scaler --service-time --boot-time`` takes them); it learns nothing from the simulation."""

    config: PolicyConfig
    name: str = "sdasync"
    victims: Victims = "idle"
    state: PolicyState | None = None

    def decide(self, obs: Observation, service_estimate_s: float | None) -> int:
        decision = decide(obs, self.config, self.state)
        self.state = decision.state
        return decision.desired


@dataclass
class SeedStepPolicy:
    """The original sample: CloudWatch step scaling on *visible* messages only, minimum one instance.

    Out: <10 none, 10-50 +1, 50-100 +2, >=100 +3, then a 5-minute warm-up before the next step.
    In: -1 once the queue has been empty for 5 minutes, at most every 10 minutes, whatever is running."""

    max_workers: int
    name: str = "seed-step"
    victims: Victims = "random"
    desired: int = 1
    last_out_at: float = -math.inf
    last_in_at: float = -math.inf
    empty_since: float | None = None

    def decide(self, obs: Observation, service_estimate_s: float | None) -> int:
        v = obs.visible
        step = 0 if v < 10 else 1 if v < 50 else 2 if v < 100 else 3
        if step and obs.now - self.last_out_at >= 300:
            self.desired = min(self.desired + step, self.max_workers)
            self.last_out_at = obs.now
        if v == 0:
            if self.empty_since is None:
                self.empty_since = obs.now
            if obs.now - self.empty_since >= 300 and obs.now - self.last_in_at >= 600 and self.desired > 1:
                self.desired -= 1
                self.last_in_at = obs.now
        else:
            self.empty_since = None
        return self.desired


@dataclass
class KedaPolicy:
    """KEDA's SQS scaler as the EKS sample sets it: ceil(visible / 10) replicas, in-flight ignored, min 0.

    Scale-out is immediate; a lower count takes effect only after it has been the highest recommendation for the
    60 s cooldown (the HPA's stabilisation window: the max over the window wins)."""

    max_workers: int
    cooldown_s: float = 60.0
    name: str = "keda"
    victims: Victims = "newest"
    history: list[tuple[float, int]] = field(default_factory=list)

    def decide(self, obs: Observation, service_estimate_s: float | None) -> int:
        wanted = min(math.ceil(obs.visible / 10), self.max_workers)
        self.history.append((obs.now, wanted))
        self.history = [(t, n) for t, n in self.history if obs.now - t <= self.cooldown_s]
        return max(n for _, n in self.history)


@dataclass
class TargetTrackingPolicy:
    """SageMaker asynchronous inference as AWS's sample configures it.

    Target tracking on ApproximateBacklogSizePerInstance (queued + processing per instance) with the target
    ``target_per_instance``: out after 3 one-minute datapoints above target (its 300 s scale-out cooldown does not
stop a further scale-out that the metric asks for, as Application Auto Scaling documents), in after
    15 datapoints below 90% of it (600 s scale-in cooldown), to ceil(backlog / target) -- zero when the backlog
    is gone. Target tracking cannot leave zero (the metric is per instance), so a step policy on
    HasBacklogWithoutCapacity adds one instance after 2 datapoints of backlog with no instance."""

    max_workers: int
    target_per_instance: float
    name: str = "target-tracking"
    victims: Victims = "random"
    desired: int = 0
    above: int = 0
    below: int = 0
    no_capacity: int = 0
    last_out_at: float = -math.inf
    last_in_at: float = -math.inf

    def decide(self, obs: Observation, service_estimate_s: float | None) -> int:
        backlog = obs.visible + obs.in_flight
        if self.desired == 0:
            self.above = self.below = 0
            self.no_capacity = self.no_capacity + 1 if backlog > 0 else 0
            if self.no_capacity >= 2:
                self.desired, self.no_capacity, self.last_out_at = 1, 0, obs.now
            return self.desired
        per_instance = backlog / self.desired
        self.above = self.above + 1 if per_instance > self.target_per_instance else 0
        self.below = self.below + 1 if per_instance < 0.9 * self.target_per_instance else 0
        wanted = min(math.ceil(backlog / self.target_per_instance), self.max_workers)
        # Application Auto Scaling keeps scaling out during the scale-out cooldown when the metric asks for more
        # than the capacity already added (that capacity counts in `desired`): the cooldown does not freeze it.
        if self.above >= 3 and wanted > self.desired:
            self.desired, self.last_out_at, self.above = wanted, obs.now, 0
        elif self.below >= 15 and wanted < self.desired and obs.now - self.last_in_at >= 600:
            self.desired, self.last_in_at, self.below = wanted, obs.now, 0
        return self.desired


def make(name: str, config: PolicyConfig) -> SimPolicy:
    """A fresh policy by name; the peers take only the sizes they would be configured with."""
    if name == "sdasync":
        return SdasyncPolicy(config)
    if name == "seed-step":
        return SeedStepPolicy(max_workers=config.max_workers)
    if name == "keda":
        return KedaPolicy(max_workers=config.max_workers)
    if name == "target-tracking":
        return TargetTrackingPolicy(max_workers=config.max_workers, target_per_instance=config.backlog_per_worker)
    raise ValueError(f"unknown policy {name!r}: use one of {', '.join(NAMES)}")
