"""The scaling policy, table-tested rule by rule, plus invariants over random observations."""

from __future__ import annotations

import math
import random

import pytest

from sdasync.scaler.policy import decide
from sdasync.scaler.types import Observation, PolicyConfig, PolicyState

CFG = PolicyConfig(min_workers=0, max_workers=10, backlog_per_worker=5, scale_in_cooldown_s=300.0)
# With a service time: ready workers give a task the whole 300 s target (15 tasks each at 20 s), booting ones
# the 180 s left after a 120 s boot (9 tasks each).
SVC = PolicyConfig(min_workers=0, max_workers=10, service_time_s=20.0, boot_time_s=120.0, target_wait_s=300.0)
BUSY = PolicyState(desired=2, last_busy_at=1000.0, last_backlog_at=1000.0)


def obs(visible: int = 0, in_flight: int = 0, current: int = 0, pending: int = 0, now: float = 1000.0,
        delayed: int = 0) -> Observation:
    return Observation(now=now, visible=visible, in_flight=in_flight, current=current, pending=pending,
                       delayed=delayed)


@pytest.mark.parametrize(("o", "config", "state", "expected"), [
    # No history: clamp(ceil((visible + in_flight) / backlog_per_worker), min, max), never below in_flight.
    pytest.param(obs(), CFG, None, 0, id="none-empty"),
    pytest.param(obs(visible=1), CFG, None, 1, id="none-one-task"),
    pytest.param(obs(visible=12, in_flight=3), CFG, None, 3, id="none-formula"),
    pytest.param(obs(visible=100), CFG, None, 10, id="none-clamped-max"),
    pytest.param(obs(), PolicyConfig(min_workers=2), None, 2, id="none-clamped-min"),
    pytest.param(obs(in_flight=4, current=4), CFG, None, 4, id="none-never-below-in-flight"),
    pytest.param(obs(in_flight=14, current=14), CFG, None, 10, id="none-in-flight-clamped-max"),
    # 0 -> 1 at once, whatever the rate limit and the cooldown.
    pytest.param(obs(visible=1), PolicyConfig(max_scale_out_step=0), PolicyState(), 1, id="zero-to-one-rate-limit"),
    pytest.param(obs(visible=1), CFG, PolicyState(last_backlog_at=999.0), 1, id="zero-to-one-in-cooldown"),
    # Scale out to the size; the rate limit caps the step from the capacity already bought.
    pytest.param(obs(visible=20, current=1), CFG, BUSY, 4, id="out-backlog-per-worker"),
    pytest.param(obs(visible=40, current=1), PolicyConfig(max_scale_out_step=2), BUSY, 3, id="out-rate-limited"),
    pytest.param(obs(visible=40), PolicyConfig(max_scale_out_step=2), PolicyState(), 2, id="out-from-zero-step"),
    pytest.param(obs(visible=200, current=2), CFG, BUSY, 10, id="out-clamped-max"),
    pytest.param(obs(visible=2, delayed=8, current=1), CFG, BUSY, 2, id="out-counts-delayed"),
    # Pending capacity counts as bought: no second launch while instances boot.
    pytest.param(obs(visible=20, pending=4), CFG, BUSY, 4, id="pending-counts"),
    pytest.param(obs(visible=20, current=1, pending=3), CFG, BUSY, 4, id="pending-plus-current"),
    # Service-time sizing: ready workers drain 15 tasks each in the target, booting ones 9.
    pytest.param(obs(visible=28, in_flight=2, current=2), SVC, BUSY, 2, id="svc-ready-drain-in-time"),
    pytest.param(obs(visible=37, in_flight=2, current=2), SVC, BUSY, 3, id="svc-one-more-booting"),
    pytest.param(obs(visible=39, in_flight=2, current=2), SVC, BUSY, 4, id="svc-two-more-booting"),
    pytest.param(obs(visible=9), SVC, PolicyState(), 1, id="svc-from-zero"),
    pytest.param(obs(visible=10), SVC, PolicyState(), 2, id="svc-from-zero-two"),
    # Scale in: held during the cooldown (counted from the last visible work), then down to the busy workers.
    pytest.param(obs(in_flight=1, current=4, now=1200.0), CFG, BUSY, 4, id="in-held-in-cooldown"),
    pytest.param(obs(in_flight=1, current=4, now=1300.0), CFG, BUSY, 1, id="in-after-cooldown"),
    pytest.param(obs(in_flight=3, current=4, now=1300.0), CFG, BUSY, 3, id="in-never-below-in-flight"),
    pytest.param(obs(current=4, now=1300.0), CFG, BUSY, 0, id="in-to-zero"),
    pytest.param(obs(current=4, now=1300.0), PolicyConfig(min_workers=1), BUSY, 1, id="in-to-min"),
    pytest.param(obs(current=4, now=1300.0, delayed=1), CFG, BUSY, 4, id="in-held-by-delayed"),
    pytest.param(obs(in_flight=2, current=4, now=5000.0), CFG,
                 PolicyState(desired=4, last_busy_at=4990.0, last_backlog_at=1000.0), 2, id="in-flight-holds-no-idle"),
    pytest.param(obs(current=3), CFG, PolicyState(desired=3), 0, id="in-never-busy"),
    # Steady: size equals capacity.
    pytest.param(obs(visible=5, in_flight=5, current=5), CFG, BUSY, 5, id="steady"),
    pytest.param(obs(current=12, now=1100.0), CFG, BUSY, 10, id="over-max-clamped"),
])
def test_decide_table(o: Observation, config: PolicyConfig, state: PolicyState | None, expected: int) -> None:
    decision = decide(o, config, state)
    assert decision.desired == expected, decision.reason
    assert decision.state.desired == expected
    assert decision.reason


def test_state_remembers_backlog_and_busy_times() -> None:
    first = decide(obs(visible=3, now=10.0), CFG, None)
    assert first.state.last_backlog_at == 10.0
    assert first.state.last_busy_at == 10.0
    second = decide(obs(in_flight=1, current=1, now=70.0), CFG, first.state)
    assert second.state.last_backlog_at == 10.0
    assert second.state.last_busy_at == 70.0


def test_invariants_over_random_observations() -> None:
    rng = random.Random(1234)
    for _ in range(5000):
        lo = rng.randint(0, 3)
        config = PolicyConfig(min_workers=lo, max_workers=rng.randint(max(lo, 1), 12),
                              backlog_per_worker=rng.randint(1, 10), target_wait_s=rng.choice([30.0, 300.0]),
                              service_time_s=rng.choice([None, 1.0, 20.0, 400.0]),
                              boot_time_s=rng.choice([0.0, 120.0, 600.0]),
                              max_scale_out_step=rng.choice([None, 0, 1, 3]),
                              scale_in_cooldown_s=rng.choice([0.0, 60.0, 300.0]))
        o = obs(visible=rng.randint(0, 50), in_flight=rng.randint(0, 15), current=rng.randint(0, 15),
                pending=rng.randint(0, 5), delayed=rng.randint(0, 3), now=rng.uniform(0, 10_000))
        state = rng.choice([None, PolicyState(), PolicyState(desired=rng.randint(0, 12),
                                                             last_busy_at=rng.uniform(0, 10_000),
                                                             last_backlog_at=rng.uniform(0, 10_000))])
        desired = decide(o, config, state).desired
        assert config.min_workers <= desired <= config.max_workers
        assert desired >= min(o.in_flight, config.max_workers)
        if o.visible > 0:
            assert desired >= 1
        if state is None:
            formula = math.ceil((o.visible + o.in_flight) / config.backlog_per_worker)
            expected = max(config.min_workers, min(formula, config.max_workers))
            assert desired == max(expected, min(o.in_flight, config.max_workers))
