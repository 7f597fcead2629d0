"""What the scaling policy sees and decides. Shared by the policy, the control loop and the simulator."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Observation:
    """One look at the system, at time ``now`` (epoch seconds, or simulated seconds)."""

    now: float
    #: Tasks waiting (visible messages) and being worked on (in-flight messages).
    visible: int
    in_flight: int
    #: Workers running now, and workers launched but not yet running (booting instances).
    current: int
    pending: int = 0
    #: Messages delayed (retry backoff); they will become visible work.
    delayed: int = 0


@dataclass(frozen=True)
class PolicyConfig:
    min_workers: int = 0
    max_workers: int = 10
    #: Queued + running tasks one worker is expected to carry. With no history the policy asks for
    #: clamp(ceil((visible + in_flight) / backlog_per_worker), min, max).
    backlog_per_worker: int = 5
    #: A task should not wait longer than this before it starts (p95 target).
    target_wait_s: float = 300.0
    #: Mean seconds a worker spends per task, if known; with it the policy sizes for the target wait.
    service_time_s: float | None = None
    #: Scale-out rate limit: at most this many workers added per decision (None: no limit beyond max_workers).
    max_scale_out_step: int | None = None
    #: Scale in only after the queue has had no visible work for this long. Short, because the policy never
    #: removes a busy worker: a cooldown only has to absorb gaps between arrivals (the simulator's comparison uses
    #: the same 60 s).
    scale_in_cooldown_s: float = 60.0
    #: Seconds from launch to a worker's first task (boot, driver, model load). Capacity bought now serves only
    #: after this, so the policy sizes the backlog to drain in the part of the target wait that remains.
    boot_time_s: float = 0.0


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between decisions (returned by each decision, passed to the next)."""

    desired: int = 0
    #: When visible or in-flight work was last seen (None: never).
    last_busy_at: float | None = None
    #: When visible (or delayed) work was last seen (None: never). The scale-in cooldown counts from here:
    #: in-flight work alone does not hold idle workers, it only sets the floor.
    last_backlog_at: float | None = None


@dataclass(frozen=True)
class Decision:
    desired: int
    state: PolicyState
    #: One line saying why, for the decision log.
    reason: str
