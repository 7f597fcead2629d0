"""The control loop with a fake queue and a fake fleet: what it observes, applies, remembers and logs."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from helpers import wait_until
from sdasync.backends.base import QueueDepth
from sdasync.errors import BackendError
from sdasync.scaler.actuators.base import Fleet
from sdasync.scaler.loop import ScalerLoop, initial_state
from sdasync.scaler.types import Decision, Observation, PolicyConfig, PolicyState


class FakeQueue:
    def __init__(self, visible: int = 0, in_flight: int = 0, delayed: int = 0) -> None:
        self.depth_value = QueueDepth(visible, in_flight, delayed)

    def depth(self) -> QueueDepth:
        return self.depth_value


class FakeFleet:
    capabilities = frozenset({"fake"})

    def __init__(self, running: int = 0, pending: int = 0) -> None:
        self.running, self.pending = running, pending
        self.calls: list[int] = []
        self.fail = False

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> FakeFleet:
        return cls()

    def capacity(self) -> tuple[int, int]:
        return self.running, self.pending

    def set_desired(self, n: int) -> None:
        if self.fail:
            raise BackendError("throttled")
        self.calls.append(n)

    def close(self) -> None:
        pass

    def __enter__(self) -> FakeFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class Recorder:
    """A stand-in policy: returns a scripted size and remembers what it was shown."""

    def __init__(self, *sizes: int) -> None:
        self.sizes = list(sizes)
        self.seen: list[tuple[Observation, PolicyState | None]] = []

    def __call__(self, obs: Observation, config: PolicyConfig, state: PolicyState | None) -> Decision:
        self.seen.append((obs, state))
        size = self.sizes.pop(0)
        return Decision(size, PolicyState(desired=size, last_busy_at=obs.now), f"scripted {size}")


def test_fake_fleet_satisfies_the_protocol() -> None:
    assert isinstance(FakeFleet(), Fleet)


def test_tick_observes_queue_and_fleet_and_applies_the_decision() -> None:
    fleet = FakeFleet(running=2, pending=1)
    policy = Recorder(4)
    loop = ScalerLoop(FakeQueue(visible=7, in_flight=2, delayed=1), fleet, PolicyConfig(), decide=policy,
                      clock=lambda: 100.0)
    decision = loop.tick()
    assert decision.desired == 4
    assert fleet.calls == [4]
    obs, state = policy.seen[0]
    assert obs == Observation(now=100.0, visible=7, in_flight=2, current=2, pending=1, delayed=1)
    # No memory yet: rebuilt from the fleet (its size is the last desired; a fleet with workers is busy now).
    assert state == PolicyState(desired=3, last_busy_at=100.0, last_backlog_at=100.0)


def test_state_carries_to_the_next_tick_and_set_desired_is_called_every_tick() -> None:
    fleet = FakeFleet()
    policy = Recorder(3, 3)
    loop = ScalerLoop(FakeQueue(visible=15), fleet, PolicyConfig(), decide=policy, clock=lambda: 5.0)
    loop.tick()
    loop.tick()
    assert fleet.calls == [3, 3]
    assert policy.seen[1][1] == PolicyState(desired=3, last_busy_at=5.0)


def test_a_failed_set_desired_keeps_the_previous_state() -> None:
    fleet = FakeFleet()
    loop = ScalerLoop(FakeQueue(), fleet, PolicyConfig(), decide=Recorder(2, 2), clock=lambda: 1.0,
                      state=PolicyState(desired=1))
    fleet.fail = True
    with pytest.raises(BackendError):
        loop.tick()
    assert loop.state == PolicyState(desired=1)


def test_run_survives_a_failing_tick_and_stops_on_the_event() -> None:
    fleet = FakeFleet()
    fleet.fail = True
    stop = threading.Event()
    policy = Recorder(*([1] * 1000))
    loop = ScalerLoop(FakeQueue(visible=1), fleet, PolicyConfig(), decide=policy)
    thread = loop.start_thread(interval_s=0.01, stop=stop)
    wait_until(lambda: loop.errors >= 2, timeout=5)
    fleet.fail = False
    wait_until(lambda: fleet.calls, timeout=5)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_each_decision_is_one_json_line_with_inputs_and_emf_metrics(caplog: pytest.LogCaptureFixture) -> None:
    loop = ScalerLoop(FakeQueue(visible=9, in_flight=1), FakeFleet(running=1), PolicyConfig(max_workers=4),
                      decide=Recorder(2), clock=lambda: 42.0, name="fake://")
    with caplog.at_level(logging.INFO, logger="sdasync.scaler"):
        loop.tick()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "sdasync.scaler"]
    record = json.loads(line)
    assert record["event"] == "scale_decision"
    assert (record["desired"], record["previous"], record["visible"], record["in_flight"], record["running"]) == \
        (2, 1, 9, 1, 1)
    assert record["reason"] == "scripted 2"
    assert record["DesiredWorkers"] == 2 and record["QueueVisible"] == 9
    names = {m["Name"] for m in record["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert {"DesiredWorkers", "RunningWorkers", "QueueVisible", "QueueInFlight"} <= names
    assert loop.metrics()["desired"] == 2


def test_with_the_real_policy_25_queued_tasks_ask_for_5_workers() -> None:
    pytest.importorskip("sdasync.scaler.policy")
    fleet = FakeFleet()
    loop = ScalerLoop(FakeQueue(visible=25), fleet, PolicyConfig(backlog_per_worker=5, max_workers=10))
    assert loop.tick().desired == 5
    assert fleet.calls == [5]


def test_initial_state_of_an_empty_idle_fleet_has_no_history() -> None:
    assert initial_state(Observation(now=1.0, visible=0, in_flight=0, current=0)) == PolicyState()
