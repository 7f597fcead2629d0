"""The scaler as an AWS Lambda function: one decision per invocation, on an EventBridge schedule
(``rate(1 minute)``).

Settings come from the environment: ``SDASYNC_QUEUE`` (``sqs://…``), ``SDASYNC_FLEET`` (``spotfleet://…`` or
``asg://…``), ``SDASYNC_MIN_WORKERS`` (default 0), ``SDASYNC_MAX_WORKERS`` (10), ``SDASYNC_BACKLOG_PER_WORKER``
(5), ``SDASYNC_SCALE_IN_COOLDOWN`` (seconds, 60), ``SDASYNC_BOOT_TIME`` (seconds, 0), ``SDASYNC_TARGET_WAIT``
(seconds, 300), ``SDASYNC_SERVICE_TIME`` (seconds, unset), ``SDASYNC_MAX_SCALE_OUT_STEP`` (unset).

State between invocations: the loop (queue, fleet and PolicyState) lives at module level, so a warm container
carries the policy's memory from one minute to the next. A cold start has none and rebuilds it from the
observation (``loop.initial_state``): the fleet's current size is the last desired capacity and a fleet with
workers counts as busy now. The cost is at most one extra scale-in cooldown after a cold start; no DynamoDB
table or parameter is needed to remember two numbers, and there is nothing to go stale or to lock.

The decision is logged as an Embedded Metric Format line, which CloudWatch turns into metrics.
"""

from __future__ import annotations

import os
from typing import Any

from sdasync.backends.registry import open_fleet, open_queue
from sdasync.errors import ConfigError
from sdasync.scaler.loop import ScalerLoop
from sdasync.scaler.types import PolicyConfig

_loop: ScalerLoop | None = None


def _number(name: str, default: float | None, kind: type[int] | type[float] = int) -> Any:
    raw = os.environ.get(f"SDASYNC_{name}")
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"SDASYNC_{name}={raw!r} is not a number") from exc


def config_from_env() -> PolicyConfig:
    return PolicyConfig(min_workers=_number("MIN_WORKERS", 0), max_workers=_number("MAX_WORKERS", 10),
                        backlog_per_worker=_number("BACKLOG_PER_WORKER", 5),
                        scale_in_cooldown_s=_number("SCALE_IN_COOLDOWN", 60.0, float),
                        boot_time_s=_number("BOOT_TIME", 0.0, float),
                        target_wait_s=_number("TARGET_WAIT", 300.0, float),
                        service_time_s=_number("SERVICE_TIME", None, float),
                        max_scale_out_step=_number("MAX_SCALE_OUT_STEP", None))


def _open_loop() -> ScalerLoop:
    queue_url, fleet_url = os.environ.get("SDASYNC_QUEUE"), os.environ.get("SDASYNC_FLEET")
    if not queue_url or not fleet_url:
        raise ConfigError("set SDASYNC_QUEUE and SDASYNC_FLEET")
    queue = open_queue(queue_url).__enter__()
    fleet = open_fleet(fleet_url).__enter__()
    return ScalerLoop(queue, fleet, config_from_env(), name=fleet_url)


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """One decision. Returns it (and its inputs), which the EventBridge invocation record keeps."""
    global _loop
    if _loop is None:
        _loop = _open_loop()
    decision = _loop.tick()
    return {"desired": decision.desired, "reason": decision.reason, **_loop.metrics()}
