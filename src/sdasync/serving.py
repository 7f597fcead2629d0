"""The long-running commands: ``serve`` / ``api`` (the API, its workers, its scaler and its sweeper), ``scaler``
and ``sweep``. Each takes the one Settings its entry point built.

Stopping ``serve``: the first SIGINT/SIGTERM tells every worker to drain (finish its task within
``drain_timeout``, else hand it back) while the API keeps answering, so clients can still poll the tasks being
finished; the API stops once the workers are gone. A second signal kills the workers and stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from contextlib import ExitStack
from types import FrameType
from typing import Any

import uvicorn

from sdasync.config import Settings
from sdasync.errors import ConfigError

log = logging.getLogger("sdasync")

#: Seconds past the workers' own drain timeout that ``serve`` waits before it SIGKILLs one: time to hand back.
DRAIN_MARGIN_S = 30.0


def worker_args(settings: Settings) -> list[str]:
    """The resolved settings, passed on explicitly so every worker sees exactly what the API sees."""
    args = ["--data-dir", str(settings.data_dir), "--queue", settings.queue_url, "--store", settings.store_url,
            "--blobs", settings.blobs_url, "--payloads", settings.payloads_url, "--engine", settings.engine,
            "--visibility-timeout", str(settings.visibility_timeout), "--max-attempts", str(settings.max_attempts),
            "--drain-timeout", str(settings.drain_timeout), "--log-level", settings.log_level,
            "--secrets", settings.secrets_url, "--webhook-timeout", str(settings.webhook_timeout)]
    if settings.webhook_allow:
        args += ["--webhook-allow", ",".join(sorted(settings.webhook_allow))]
    return args


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first signal runs ``drain`` (in a thread, the API still serving) before the server stops;
    a second one runs ``kill`` and stops it now."""

    def __init__(self, config: uvicorn.Config, *, drain: Callable[[], None], kill: Callable[[], None]) -> None:
        super().__init__(config)
        self._drain = drain
        self._kill = kill
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            log.warning("signal %d during the drain: stopping now", sig)
            self._kill()
            self.should_exit = True
            return
        self._draining = True
        log.info("signal %d: draining the workers; the API answers until they are done", sig)

        def drain_then_exit() -> None:
            try:
                self._drain()
            finally:
                self.should_exit = True

        threading.Thread(target=drain_then_exit, name="sdasync-drain", daemon=True).start()


def serve(settings: Settings, *, workers: int) -> int:
    from sdasync.api.app import create_app
    from sdasync.api.server import build_server
    from sdasync.service import open_backends
    from sdasync.supervisor import WorkerSupervisor

    autoscale = settings.autoscale and workers > 0
    supervisor = None
    if workers or autoscale:
        supervisor = WorkerSupervisor(worker_args(settings), 0 if autoscale else workers,
                                      drain_timeout_s=settings.drain_timeout + DRAIN_MARGIN_S)
    checks: dict[str, Callable[[], dict[str, Any]]] = {}
    if supervisor is not None:
        checks["workers"] = supervisor.health
    stop = threading.Event()
    with ExitStack() as stack:
        if autoscale and supervisor is not None:
            scaler = _local_scaler(settings, supervisor, stack)
            checks["scaler"] = scaler.metrics
        backends = stack.enter_context(open_backends(settings))
        app = create_app(settings, backends=backends, health_checks=checks)
        config = build_server(app, settings).config
        _log_auth(settings)
        if settings.sweep_interval > 0:
            maintenance = _start_maintenance(backends, settings, stop)
            # Registered after the backends, so it runs first: a pass in progress ends before they close.
            stack.callback(maintenance.join, timeout=30.0)
        dispatcher = threading.Thread(target=_dispatch, args=(backends, settings, stop), name="sdasync-webhooks",
                                      daemon=True)
        dispatcher.start()
        stack.callback(dispatcher.join, timeout=30.0)

        def drain() -> None:
            # Called by the first signal and again once the server is down; only the first does anything.
            if stop.is_set():
                return
            stop.set()
            if supervisor is not None:
                log.info("stopping workers")
                supervisor.stop()

        server = DrainingServer(config, drain=drain, kill=supervisor.kill if supervisor else lambda: None)
        if supervisor is not None:
            supervisor.start()
        if autoscale and supervisor is not None:
            scaler.start_thread(interval_s=settings.scaler.scale_interval, stop=stop)
        try:
            server.run()
        finally:
            drain()
    return 0 if server.started else 1


def _log_auth(settings: Settings) -> None:
    from sdasync.api.auth import auth_required

    if auth_required(settings):
        log.info("API keys required on every route but /healthz ('sdasync keys create --tenant NAME' makes one)")
    elif settings.auth is False:
        log.warning("API keys NOT required (--auth false) on %s: anyone who can reach it can use the API, from "
                    "the host names --trusted-hosts lists", settings.host)
    else:
        log.warning("API keys NOT required: listening on loopback (%s) for a first try; anyone on this machine can "
                    "use the API. --auth true (or any other bind address) turns keys on", settings.host)


def _dispatcher(backends: Any, settings: Settings) -> Any:
    from sdasync.trust import renderer, secret_source
    from sdasync.webhooks.command import dispatcher_from

    return dispatcher_from(settings, backends.store, render=renderer(backends.blobs, settings),
                           secret_for=secret_source(backends.store, settings))


def _dispatch(backends: Any, settings: Settings, stop: threading.Event) -> None:
    """The webhook dispatcher inside ``serve``/``api``: a failure is logged, never the end of the API."""
    try:
        _dispatcher(backends, settings).run(stop, interval_s=WEBHOOK_INTERVAL_S)
    except Exception:  # a thread of its own: log it, the API goes on (and the next serve picks the events up)
        log.exception("webhook dispatcher stopped")


#: Seconds between two looks at the outbox when nothing is due.
WEBHOOK_INTERVAL_S = 1.0


def _start_maintenance(backends: Any, settings: Settings, stop: threading.Event) -> threading.Thread:
    from sdasync.maintenance import Maintenance

    return Maintenance.from_settings(backends, settings).start_thread(interval_s=settings.sweep_interval, stop=stop)


def _local_scaler(settings: Settings, supervisor: Any, stack: ExitStack) -> Any:
    from sdasync.backends.registry import open_queue, open_store
    from sdasync.scaler.actuators.local import LocalScaler, running_worker_pids
    from sdasync.scaler.loop import ScalerLoop

    # The scaler's own handles: the API's are opened by create_app and used from its threads.
    queue = stack.enter_context(open_queue(settings.queue_url))
    store = stack.enter_context(open_store(settings.store_url))
    supervisor.busy_pids = lambda: running_worker_pids(store)
    max_workers = settings.scaler.max_workers
    fleet = LocalScaler(max=max_workers, supervisor=supervisor)
    return ScalerLoop(queue, fleet, settings.scaler.policy(min_workers=0), name=f"local://?max={max_workers}")


def run_scaler(settings: Settings, *, once: bool) -> int:
    from sdasync.backends.registry import open_fleet, open_queue
    from sdasync.scaler.loop import ScalerLoop

    fleet_url = settings.scaler.fleet
    if not settings.queue or not fleet_url:
        raise ConfigError("sdasync scaler needs --queue and --fleet")
    if once and fleet_url.startswith("local:"):
        raise ConfigError("--once with local:// would stop the workers it starts as it exits")
    # A local fleet runs workers on this queue, with the default local backends for the rest.
    fleet_kwargs: dict[str, Any] = {"worker_args": ["--queue", settings.queue]} \
        if fleet_url.startswith("local:") else {}
    with open_queue(settings.queue) as queue, open_fleet(fleet_url, **fleet_kwargs) as fleet:
        loop = ScalerLoop(queue, fleet, settings.scaler.policy(), name=fleet_url)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        loop.run(interval_s=settings.scaler.scale_interval, stop=stop, once=once)
    return 0


def run_sweeper(settings: Settings, *, once: bool) -> int:
    """``sdasync sweep``: one pass with ``--once`` (its report printed as JSON), else a pass every
    ``sweep_interval`` until SIGINT/SIGTERM."""
    import json

    from sdasync.maintenance import run_command

    stop = threading.Event()
    if not once:
        if settings.sweep_interval <= 0:
            raise ConfigError("sdasync sweep without --once needs a positive --sweep-interval")
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
    report = run_command(settings, once=once, stop=stop)
    if report is not None:
        print(json.dumps(report.to_dict(), indent=2))
    return 0
