"""A discrete-event simulation of a queue, a fleet of instances and a scaling policy.

The model:

- Tasks arrive as the trace says and wait in one FIFO queue; an idle, booted instance takes the oldest one at
  once and works on it for the task's service time (one task at a time per instance, like one GPU worker).
- Every ``interval_s`` the policy sees visible, in-flight, running and booting counts and answers a desired
  instance count. Launched instances bill from launch and serve after ``boot_delay_s``.
- Fewer instances than running: the simulator removes them the way the policy's real system would (see
  :mod:`sdasync.simulate.peers`). A busy instance removed takes its task with it: the task goes back to the head
  of the queue, its work is lost, and it counts in ``interrupted``.
- Spot reclaims (``spot_rate_per_hour`` per instance, exponential lifetimes, default 0) also requeue the task, but
  count in ``reclaimed``: they are the cloud's doing, not the policy's, and no policy can avoid them.
- A task's wait is from its arrival to the start of the attempt that completes it, so lost work shows up as
  wait. Arrivals stop at the trace's duration; the run goes on for ``tail_s`` to drain, and instance-hours are
  counted until then. A task never started by the end waits until the end.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field

from sdasync.scaler.types import Observation
from sdasync.simulate.peers import SimPolicy
from sdasync.simulate.traces import Trace

# Same-time events run in this order: work finishes before new work arrives, and both before the policy looks.
_DONE, _READY, _RECLAIM, _ARRIVAL, _TICK = range(5)


@dataclass(frozen=True)
class SimConfig:
    boot_delay_s: float = 120.0
    interval_s: float = 60.0
    spot_rate_per_hour: float = 0.0
    price_per_hour: float = 1.0
    tail_s: float = 3600.0
    target_wait_s: float = 300.0
    seed: int = 0


@dataclass
class Result:
    policy: str
    trace: str
    instance_hours: float
    cost: float
    wait_p50_s: float
    wait_p95_s: float
    wait_p99_s: float
    max_backlog: int
    interrupted: int
    reclaimed: int
    tasks: int
    meets_target: bool
    #: (time, instances alive, visible) at each decision, for the plot.
    timeline: list[tuple[float, int, int]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, object]:
        return {"policy": self.policy, "trace": self.trace, "instance_hours": round(self.instance_hours, 3),
                "cost": round(self.cost, 2), "wait_p50_s": round(self.wait_p50_s, 1),
                "wait_p95_s": round(self.wait_p95_s, 1), "wait_p99_s": round(self.wait_p99_s, 1),
                "max_backlog": self.max_backlog, "interrupted": self.interrupted, "reclaimed": self.reclaimed,
                "tasks": self.tasks, "meets_target": self.meets_target}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class _Instance:
    id: int
    launched_at: float
    ready: bool = False
    task: int | None = None
    #: Bumped when the instance's task is taken away, so its pending completion event is ignored.
    attempt: int = 0
    ended_at: float | None = None


class _Run:
    def __init__(self, trace: Trace, policy: SimPolicy, config: SimConfig) -> None:
        self.trace, self.policy, self.config = trace, policy, config
        # Its own stream per policy, so a policy's random victims or reclaims do not shift another's.
        self.rng = random.Random(f"sim:{policy.name}:{trace.name}:{config.seed}")
        self.end = trace.duration + config.tail_s
        self.events: list[tuple[float, int, int, int, int]] = []
        self.seq = itertools.count()
        self.instances: dict[int, _Instance] = {}
        self.ids = itertools.count()
        self.queue: deque[int] = deque()
        self.started: dict[int, float] = {}
        self.done = 0
        self.service_sum = 0.0
        self.interrupted = self.reclaimed = self.max_backlog = 0
        self.timeline: list[tuple[float, int, int]] = []

    def push(self, t: float, kind: int, a: int = 0, b: int = 0) -> None:
        heapq.heappush(self.events, (t, kind, next(self.seq), a, b))

    def alive(self) -> list[_Instance]:
        return [i for i in self.instances.values() if i.ended_at is None]

    def dispatch(self, now: float) -> None:
        for inst in self.alive():
            if not self.queue:
                return
            if inst.ready and inst.task is None:
                task = self.queue.popleft()
                inst.task = task
                self.started[task] = now
                self.push(now + self.trace.service_times[task], _DONE, inst.id, inst.attempt)

    def launch(self, now: float) -> None:
        inst = _Instance(next(self.ids), now)
        self.instances[inst.id] = inst
        self.push(now + self.config.boot_delay_s, _READY, inst.id)
        if self.config.spot_rate_per_hour > 0:
            self.push(now + self.rng.expovariate(self.config.spot_rate_per_hour / 3600), _RECLAIM, inst.id)

    def end_instance(self, inst: _Instance, now: float) -> bool:
        """Terminate ``inst``; True when it took a running task with it (which goes back to the queue)."""
        inst.ended_at = now
        if inst.task is None:
            return False
        self.queue.appendleft(inst.task)
        self.started.pop(inst.task, None)
        inst.task, inst.attempt = None, inst.attempt + 1
        return True

    def victims(self, count: int) -> list[_Instance]:
        alive = self.alive()
        booting = sorted((i for i in alive if not i.ready), key=lambda i: -i.launched_at)
        if self.policy.victims == "idle":
            idle = sorted((i for i in alive if i.ready and i.task is None), key=lambda i: -i.launched_at)
            return (booting + idle)[:count]
        if self.policy.victims == "newest":
            ready = sorted((i for i in alive if i.ready), key=lambda i: -i.launched_at)
            return (booting + ready)[:count]
        return self.rng.sample(alive, min(count, len(alive)))

    def tick(self, now: float) -> None:
        alive = self.alive()
        busy = sum(1 for i in alive if i.task is not None)
        ready = sum(1 for i in alive if i.ready)
        obs = Observation(now=now, visible=len(self.queue), in_flight=busy, current=ready, pending=len(alive) - ready)
        estimate = self.service_sum / self.done if self.done else None
        desired = self.policy.decide(obs, estimate)
        if desired > len(alive):
            for _ in range(desired - len(alive)):
                self.launch(now)
        elif desired < len(alive):
            for inst in self.victims(len(alive) - desired):
                self.interrupted += self.end_instance(inst, now)
        self.dispatch(now)
        self.timeline.append((now, len(self.alive()), len(self.queue)))

    def run(self) -> Result:
        for index, t in enumerate(self.trace.arrivals):
            self.push(t, _ARRIVAL, index)
        for k in range(int(self.end // self.config.interval_s) + 1):
            self.push(k * self.config.interval_s, _TICK)
        while self.events and self.events[0][0] <= self.end:
            now, kind, _, a, b = heapq.heappop(self.events)
            if kind == _ARRIVAL:
                self.queue.append(a)
                self.max_backlog = max(self.max_backlog, len(self.queue))
                self.dispatch(now)
            elif kind == _TICK:
                self.tick(now)
            else:
                inst = self.instances[a]
                if inst.ended_at is not None:
                    continue
                if kind == _READY:
                    inst.ready = True
                elif kind == _DONE:
                    if b != inst.attempt or inst.task is None:
                        continue
                    self.done += 1
                    self.service_sum += self.trace.service_times[inst.task]
                    inst.task = None
                else:  # _RECLAIM
                    self.reclaimed += self.end_instance(inst, now)
                self.dispatch(now)
        return self.result()

    def result(self) -> Result:
        waits = [self.started.get(i, self.end) - t for i, t in enumerate(self.trace.arrivals)]
        seconds = sum(min(i.ended_at if i.ended_at is not None else self.end, self.end) - i.launched_at
                      for i in self.instances.values())
        hours = seconds / 3600
        p95 = percentile(waits, 95)
        return Result(policy=self.policy.name, trace=self.trace.name, instance_hours=hours,
                      cost=hours * self.config.price_per_hour, wait_p50_s=percentile(waits, 50), wait_p95_s=p95,
                      wait_p99_s=percentile(waits, 99), max_backlog=self.max_backlog, interrupted=self.interrupted,
                      reclaimed=self.reclaimed, tasks=len(waits), meets_target=p95 <= self.config.target_wait_s,
                      timeline=self.timeline)


def simulate(trace: Trace, policy: SimPolicy, config: SimConfig) -> Result:
    """Run ``policy`` against ``trace``; deterministic for the same inputs."""
    return _Run(trace, policy, config).run()
