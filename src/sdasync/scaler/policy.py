"""The scaling policy: a pure function from one observation (and what the last decision remembered) to a size.

No I/O and no clock reads: the clock is ``obs.now``, so the control loop, the simulator and the tests drive it
the same way. The rules, in the order they apply:

1. **No history** (``state is None``): exactly ``clamp(ceil((visible + in_flight) / backlog_per_worker), min, max)``,
   and never below the in-flight count (clamped to max).
2. **Sizing**: with a service-time estimate the fleet is sized so that the queued plus running work drains within
   the part of the target wait that is left once new capacity has booted:
   ``ceil((visible + delayed + in_flight) * service_time / (target_wait - boot_time))``. Without one it falls back
   to ``backlog_per_worker``. Either way the size is never below the in-flight count: a running task is never
   killed to save money.
3. **Scale out** when the size exceeds the capacity already bought (running *plus* booting workers, so a boot in
   progress is not launched twice), by at most ``max_scale_out_step`` per decision, except that the first worker
   (0 -> 1) is never held back.
4. **Scale in** only once no visible or delayed work has been seen for ``scale_in_cooldown_s``; until then the
   capacity is held. After the cooldown it goes down *at once* to the size (which, with an empty queue, is the
   busy workers): idle workers cost money and the cooldown already filtered out a momentary lull. Gradual steps
   would only keep idle instances longer; the actuators remove idle workers only.
5. Everything is clamped to ``[min_workers, max_workers]``.
"""

from __future__ import annotations

import math

from sdasync.scaler.types import Decision, Observation, PolicyConfig, PolicyState

__all__ = ["decide", "size_for"]


def size_for(obs: Observation, config: PolicyConfig) -> int:
    """Workers needed for the work in ``obs`` (rule 2), before clamping and before any cooldown or rate limit."""
    work = obs.visible + obs.delayed + obs.in_flight
    if work == 0:
        return 0
    service = config.service_time_s
    if service is None or service <= 0:
        need = math.ceil(work / max(config.backlog_per_worker, 1))
    else:
        # Running workers can give the work the whole target wait; workers launched now only after the boot,
        # so whatever the running ones cannot drain in time needs more of the later, shorter-lived kind.
        # (Never a budget under one service time, or a tiny target would ask for more workers than tasks.)
        seconds = work * service
        target = max(config.target_wait_s, service)
        late = max(config.target_wait_s - config.boot_time_s, service)
        need = math.ceil(seconds / target)
        if need > obs.current:
            need = obs.current + math.ceil((seconds - obs.current * target) / late)
    return max(need, obs.in_flight)


def _clamp(value: int, config: PolicyConfig) -> int:
    return max(config.min_workers, min(value, config.max_workers))


def decide(obs: Observation, config: PolicyConfig, state: PolicyState | None = None) -> Decision:
    """The desired worker count for ``obs``; pass the returned ``state`` to the next call."""
    running_floor = min(obs.in_flight, config.max_workers)
    if state is None:
        wanted = math.ceil((obs.visible + obs.in_flight) / max(config.backlog_per_worker, 1))
        desired = max(_clamp(wanted, config), running_floor)
        fresh = PolicyState(desired=desired,
                            last_busy_at=obs.now if obs.visible or obs.in_flight else None,
                            last_backlog_at=obs.now if obs.visible or obs.delayed else None)
        return Decision(desired, fresh, f"no history: {obs.visible}+{obs.in_flight} tasks at "
                                        f"{config.backlog_per_worker} per worker -> {desired}")

    backlog = obs.visible + obs.delayed
    last_backlog_at = obs.now if backlog else state.last_backlog_at
    last_busy_at = obs.now if backlog or obs.in_flight else state.last_busy_at
    capacity = obs.current + obs.pending
    need = size_for(obs, config)

    if need > capacity:
        if capacity == 0:
            # Work with no worker at all: the first one goes now, whatever the rate limit says.
            step = max(need if config.max_scale_out_step is None else config.max_scale_out_step, 1)
        else:
            step = config.max_scale_out_step if config.max_scale_out_step is not None else need
        target = min(need, capacity + step)
        reason = f"scale out: {obs.visible} queued, {obs.in_flight} running need {need}, have {capacity}"
        if target < need:
            reason += f" (rate limit {step} per decision)"
    elif need < capacity:
        quiet_for = math.inf if last_backlog_at is None else obs.now - last_backlog_at
        if quiet_for < config.scale_in_cooldown_s:
            target = capacity
            reason = f"hold {capacity}: queue quiet for {quiet_for:.0f}s < cooldown {config.scale_in_cooldown_s:.0f}s"
        else:
            target = need
            reason = f"scale in: queue quiet for {quiet_for:.0f}s, {obs.in_flight} running -> {need}"
    else:
        target = capacity
        reason = f"steady at {capacity}"

    desired = max(_clamp(target, config), running_floor)
    return Decision(desired, PolicyState(desired=desired, last_busy_at=last_busy_at, last_backlog_at=last_backlog_at),
                    reason)
