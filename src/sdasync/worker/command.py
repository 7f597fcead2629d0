"""``sdasync worker``: one worker process, its signals, its parent and its spot-interruption watch."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from sdasync.auth.quotas import StartGate
from sdasync.backends.registry import open_engine
from sdasync.config import Settings
from sdasync.errors import ConfigError
from sdasync.service import Backends, open_backends
from sdasync.webhooks.direct import DirectEvents
from sdasync.worker import faults
from sdasync.worker.interruption import SpotInterruptionWatcher
from sdasync.worker.loop import Worker, WorkerConfig

if TYPE_CHECKING:
    from sdasync.scaler.actuators.asg import InstanceProtection

log = logging.getLogger(__name__)

#: A spot instance gets two minutes' notice; drain well inside it, leaving time to hand the task back.
SPOT_DRAIN_S = 80.0


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    drain_timeout = float(args.drain_timeout if getattr(args, "drain_timeout", None) is not None
                          else settings.drain_timeout)
    generation_timeout = getattr(args, "generation_timeout", None) or settings.generation_timeout
    config = WorkerConfig(visibility_timeout_s=settings.visibility_timeout, max_attempts=settings.max_attempts,
                          drain_timeout_s=drain_timeout, generation_timeout_s=generation_timeout,
                          engine_url=settings.engine)
    faults.configure(faults=settings.faults, fault_errors=settings.fault_errors, seed=settings.fault_seed)
    with open_backends(settings) as backends, \
            open_engine(settings.engine, models_dir=settings.models_dir, cache_dir=settings.cache_dir) as engine:
        if backends.queue.max_receives <= settings.max_attempts:
            raise ConfigError(f"the queue dead-letters a message after {backends.queue.max_receives} receives, "
                              f"which leaves no room for --max-attempts {settings.max_attempts}; raise the "
                              f"queue's max_receives above it")
        protection = _asg_protection(args, settings)
        events = _events(backends, settings)
        worker = Worker(queue=backends.queue, store=backends.store, blobs=backends.blobs, engine=engine,
                        config=config, on_busy=protection.busy if protection is not None else None,
                        payloads=backends.payloads, gate=StartGate(backends.store), events=events)
        install_stop_handlers(worker.request_stop)
        if args.parent_pid:
            from sdasync.supervisor import watch_parent

            watch_parent(args.parent_pid, worker.request_stop)
        watcher = _spot_watcher(args, settings, worker, config)
        try:
            # Flags are moving into Settings: one given on the command line still wins, until that is done.
            worker.run(burst=bool(getattr(args, "burst", False) or settings.burst),
                       max_tasks=getattr(args, "max_tasks", None) or settings.max_tasks,
                       max_idle_s=_max_idle(args, settings))
        finally:
            events.close()
            if watcher is not None:
                watcher.stop()
            if protection is not None:
                protection.close()
    return worker.exit_code


def _events(backends: Backends, settings: Settings) -> DirectEvents:
    """The start and progress webhook events, sent by this worker directly (best effort)."""
    from sdasync.trust import secret_source

    return DirectEvents(secret_for=secret_source(backends.store, settings), allow=settings.webhook_allow,
                        connect_timeout_s=settings.webhook_timeout, read_timeout_s=settings.webhook_timeout)


def _max_idle(args: argparse.Namespace, settings: Settings) -> float | None:
    value = getattr(args, "max_idle", None)
    return settings.max_idle if value is None else float(value)


def _asg_protection(args: argparse.Namespace, settings: Settings) -> InstanceProtection | None:
    """Scale-in protection while busy, for workers in an Auto Scaling group (see scaler/actuators/asg.py)."""
    group = getattr(args, "asg_protect", None) or settings.asg_protect
    if not group:
        return None
    from sdasync.scaler.actuators.asg import InstanceProtection, instance_id_from_imds

    return InstanceProtection(group, instance_id_from_imds(base_url=settings.imds_url,
                                                           instance_id=settings.instance_id))


def _spot_watcher(args: argparse.Namespace, settings: Settings, worker: Worker,
                  config: WorkerConfig) -> SpotInterruptionWatcher | None:
    """Watch instance metadata for a spot interruption or rebalance notice, and drain on the first one.

    On only when asked (``--watch-spot``, or an explicit ``imds_url``): off EC2 the metadata address belongs to
    nobody, and a worker should not probe it unasked."""
    imds_url = settings.imds_url
    if not (getattr(args, "watch_spot", False) or settings.watch_spot or imds_url):
        return None
    drain_s = min(config.drain_timeout_s, SPOT_DRAIN_S)

    def on_notice(kind: str, detail: dict[str, object]) -> None:
        log.warning("%s notice (%s): draining within %.0f s", kind, detail, drain_s)
        worker.request_stop(drain_timeout_s=drain_s)

    watcher = SpotInterruptionWatcher(on_notice=on_notice, base_url=imds_url)
    watcher.start()
    return watcher


def install_stop_handlers(request_stop: Callable[[], None]) -> None:
    """First SIGTERM/SIGINT: drain (finish the current task within the drain timeout, else hand it back), then
    exit. A second: exit now; the task's lease and message visibility run out and another worker takes it."""
    received = 0

    def handler(signum: int, _: FrameType | None) -> None:
        nonlocal received
        received += 1
        if received > 1:
            log.warning("second signal: exiting without finishing the current task")
            os._exit(128 + signum)
        log.info("signal %d: draining, then exiting", signum)
        request_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
