"""The scaler as an AWS Lambda function: one decision per invocation, on an EventBridge schedule
(``rate(1 minute)``).

Settings come from the environment, read into the same Settings as ``sdasync scaler`` and under the same names:
``SDASYNC_QUEUE`` (``sqs://…``), ``SDASYNC_FLEET`` (``spotfleet://…`` or ``asg://…``), ``SDASYNC_MIN_WORKERS``
(default 0), ``SDASYNC_MAX_WORKERS`` (10), ``SDASYNC_BACKLOG_PER_WORKER`` (5), ``SDASYNC_SCALE_IN_COOLDOWN``
(seconds, 60), ``SDASYNC_BOOT_TIME`` (seconds, 0), ``SDASYNC_TARGET_WAIT`` (seconds, 300), ``SDASYNC_SERVICE_TIME``
(seconds, unset), ``SDASYNC_MAX_SCALE_OUT_STEP`` (unset).

State between invocations: the loop (queue, fleet and PolicyState) lives at module level, so a warm container
carries the policy's memory from one minute to the next. A cold start has none and rebuilds it from the
observation (``loop.initial_state``): the fleet's current size is the last desired capacity and a fleet with
workers counts as busy now. The cost is at most one extra scale-in cooldown after a cold start; no DynamoDB
table or parameter is needed to remember two numbers, and there is nothing to go stale or to lock.

The decision is logged as an Embedded Metric Format line, which CloudWatch turns into metrics.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from sdasync.backends.registry import open_fleet, open_queue
from sdasync.config import settings_from
from sdasync.errors import ConfigError
from sdasync.scaler.loop import ScalerLoop
from sdasync.scaler.types import PolicyConfig

_loop: ScalerLoop | None = None


def config_from_env(environ: Mapping[str, str] | None = None) -> PolicyConfig:
    return settings_from({}, os.environ if environ is None else environ).scaler.policy()


def _open_loop() -> ScalerLoop:
    settings = settings_from({}, os.environ)
    if not settings.queue or not settings.scaler.fleet:
        raise ConfigError("set SDASYNC_QUEUE and SDASYNC_FLEET")
    queue = open_queue(settings.queue).__enter__()
    fleet = open_fleet(settings.scaler.fleet).__enter__()
    return ScalerLoop(queue, fleet, settings.scaler.policy(), name=settings.scaler.fleet)


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """One decision. Returns it (and its inputs), which the EventBridge invocation record keeps."""
    global _loop
    if _loop is None:
        _loop = _open_loop()
    decision = _loop.tick()
    return {"desired": decision.desired, "reason": decision.reason, **_loop.metrics()}
