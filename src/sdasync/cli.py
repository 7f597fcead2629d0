"""The ``sdasync`` command. Every option can also come from ``SDASYNC_<OPTION>`` (``--max-attempts`` <->
``SDASYNC_MAX_ATTEMPTS``); options given on the command line win."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from types import FrameType
from typing import Any

from sdasync import __version__
from sdasync.config import ENV_PREFIX, Limits, Settings, settings_from
from sdasync.errors import ConfigError as SdasyncConfigError
from sdasync.errors import SdasyncError

log = logging.getLogger("sdasync")


def _env(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _opt(parser: argparse.ArgumentParser, flag: str, *, type: Callable[[str], Any] = str, default: Any = None,
         help: str) -> None:
    """An option whose default comes from its environment variable, then from ``default``."""
    raw = os.environ.get(_env(flag))
    # A string default is converted by argparse only when this subcommand runs, and a bad one is reported as a
    # usage error, not a traceback in every other subcommand.
    parser.add_argument(flag, type=type, default=raw if raw is not None else default, help=f"{help} [{_env(flag)}]")


def _flag(parser: argparse.ArgumentParser, flag: str, *, help: str) -> None:
    raw = os.environ.get(_env(flag), "").strip().lower()
    parser.add_argument(flag, action="store_true", default=raw in {"1", "true", "yes", "on"},
                        help=f"{help} [{_env(flag)}]")


def _backend_options(parser: argparse.ArgumentParser, *, engine: bool = True) -> None:
    # Settings options default to None here: settings_from() then reads the environment and the defaults.
    parser.add_argument("--data-dir", type=Path, help=f"embedded data: <dir>/sdasync.db and <dir>/results "
                        f"(default ./data) [{_env('data-dir')}]")
    parser.add_argument("--queue", help=f"queue URL (default sqlite:///<data-dir>/sdasync.db) [{_env('queue')}]")
    parser.add_argument("--store", help=f"task store URL (default sqlite:///<data-dir>/sdasync.db) "
                        f"[{_env('store')}]")
    parser.add_argument("--blobs", help=f"blob store URL (default file:///<data-dir>/results) [{_env('blobs')}]")
    if engine:
        parser.add_argument("--engine", help=f"engine URL: diffusers://tiny (default), diffusers://<model>, "
                            f"webui+http://host:port, fake://?seconds=S [{_env('engine')}]")
    parser.add_argument("--visibility-timeout", type=float, help=f"seconds a received task stays hidden between "
                        f"heartbeats (default 60) [{_env('visibility-timeout')}]")
    parser.add_argument("--max-attempts", type=int, help=f"attempts before a task fails (default 3) "
                        f"[{_env('max-attempts')}]")
    parser.add_argument("--log-level", default=os.environ.get(_env("log-level"), "INFO"), type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help=f"[{_env('log-level')}]")


def _api_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help=f"default 127.0.0.1 [{_env('host')}]")
    parser.add_argument("--port", type=int, help=f"default 8080 [{_env('port')}]")
    parser.add_argument("--public-url", help=f"the API's address as clients see it, for image URLs "
                        f"[{_env('public-url')}]")
    parser.add_argument("--inline-payload-max", type=int, help=f"payloads over this many bytes are kept in the blob "
                        f"store (default 65536) [{_env('inline-payload-max')}]")
    limits = parser.add_argument_group("request limits")
    for f in fields(Limits):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            limits.add_argument(flag, action="store_const", const=True, help=f"[{_env(flag)}]")
        elif f.name == "override_settings_allowlist":
            limits.add_argument(flag, type=lambda s: frozenset(x for x in s.split(",") if x),
                                help=f"comma-separated keys (default {','.join(sorted(f.default))}) "  # type: ignore[arg-type]
                                f"[{_env(flag)}]")
        else:
            limits.add_argument(flag, type=int, help=f"default {f.default} [{_env(flag)}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdasync", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"sdasync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from sdasync.simulate.command import add_parser as add_simulate  # pure Python: cheap to import

    add_simulate(sub)

    serve = sub.add_parser("serve", help="the API and N workers in one command")
    _backend_options(serve)
    _api_options(serve)
    _opt(serve, "--workers", type=int, default=1, help="worker processes (default 1)")
    _flag(serve, "--autoscale", help="start with no workers and grow to --max-workers with the queue (local:// "
          "fleet), back to zero when it drains")
    _opt(serve, "--max-workers", type=int, default=1, help="with --autoscale: the most workers (default 1)")
    _opt(serve, "--backlog-per-worker", type=int, default=1, help="with --autoscale: queued + running tasks per "
         "worker before another starts (default 1)")
    _opt(serve, "--scale-in-cooldown", type=float, default=60.0, help="with --autoscale: seconds without work "
         "before workers stop (default 60)")
    _opt(serve, "--scale-interval", type=float, default=2.0, help="with --autoscale: seconds between scaling "
         "decisions (default 2)")

    api = sub.add_parser("api", help="the HTTP API alone")
    _backend_options(api)
    _api_options(api)

    worker = sub.add_parser("worker", help="one worker process")
    _backend_options(worker)
    _flag(worker, "--burst", help="exit when the queue is empty")
    _opt(worker, "--max-tasks", type=int, help="exit after this many tasks")
    _opt(worker, "--max-idle", type=float, help="exit after this many seconds without a task")
    _opt(worker, "--drain-timeout", type=float, default=90.0, help="after SIGTERM, seconds the current task may "
         "still run before it is handed back (default 90)")
    _opt(worker, "--generation-timeout", type=float, help="seconds a generation may take before it is "
         "interrupted and retried (default: derived from steps, size and images)")
    _flag(worker, "--watch-spot", help="poll EC2 instance metadata (IMDSv2, SDASYNC_IMDS_URL) for spot "
          "interruption and rebalance notices, and drain on one")
    _opt(worker, "--asg-protect", help="Auto Scaling group name: protect this instance from scale-in while it "
         "has a task (instance id from IMDS or SDASYNC_INSTANCE_ID)")
    worker.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by serve's supervisor

    scaler = sub.add_parser("scaler", help="size a fleet of workers to the queue")
    scaler.add_argument("--queue", default=os.environ.get(_env("queue")), help=f"queue URL [{_env('queue')}]")
    _opt(scaler, "--fleet", help="spotfleet://<request id>, asg://<group>, local://?max=N")
    _opt(scaler, "--min", type=int, default=0, help="fewest workers (default 0)")
    _opt(scaler, "--max", type=int, default=10, help="most workers (default 10)")
    _opt(scaler, "--backlog-per-worker", type=int, default=5, help="queued + running tasks per worker (default 5)")
    _opt(scaler, "--scale-in-cooldown", type=float, default=60.0, help="seconds without work before idle workers "
         "go (default 60; busy ones never do)")
    _opt(scaler, "--target-wait", type=float, default=300.0, help="seconds a task should wait at most (default 300)")
    _opt(scaler, "--service-time", type=float, help="mean seconds per task, if known: sizes for the wait target")
    _opt(scaler, "--boot-time", type=float, default=0.0, help="seconds from launch to a ready worker (default 0)")
    _opt(scaler, "--max-scale-out-step", type=int, help="most workers added per decision")
    _opt(scaler, "--interval", type=float, default=30.0, help="seconds between decisions (default 30)")
    _flag(scaler, "--once", help="make one decision, apply it and exit")
    scaler.add_argument("--log-level", default=os.environ.get(_env("log-level"), "INFO"), type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help=f"[{_env('log-level')}]")

    submit = sub.add_parser("submit", help="submit a txt2img request to a running API")
    submit.add_argument("prompt")
    _client_options(submit)
    _opt(submit, "--negative-prompt", default="", help="what the image should not show")
    _opt(submit, "--steps", type=int, default=20, help="sampling steps")
    _opt(submit, "--width", type=int, default=512, help="image width")
    _opt(submit, "--height", type=int, default=512, help="image height")
    _opt(submit, "--seed", type=int, default=-1, help="-1 = random")
    _opt(submit, "--sampler", help="WebUI sampler name, e.g. 'Euler a'")
    _opt(submit, "--batch-size", type=int, default=1, help="images per task")
    _flag(submit, "--wait", help="wait for the task to finish and print it")
    _opt(submit, "--out", type=Path, help="with --wait: save the images into this folder")

    status = sub.add_parser("status", help="show a task")
    status.add_argument("task_id")
    _client_options(status)

    aws = sub.add_parser("aws", help="AWS helpers").add_subparsers(dest="aws_command", required=True)
    boot = aws.add_parser("bootstrap", help="create the SQS queues, DynamoDB table and S3 bucket the URLs name "
                          "(idempotent)")
    boot.add_argument("--queue", help=f"sqs://<name> [{_env('queue')}]", default=os.environ.get(_env("queue")))
    boot.add_argument("--store", help=f"dynamodb://<table> [{_env('store')}]", default=os.environ.get(_env("store")))
    boot.add_argument("--blobs", help=f"s3://<bucket>/<prefix> [{_env('blobs')}]",
                      default=os.environ.get(_env("blobs")))

    dlq = sub.add_parser("dlq", help="dead-lettered tasks").add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq.add_parser("list", help="tasks whose messages are in the dead-letter queue")
    _backend_options(dlq_list, engine=False)
    dlq_redrive = dlq.add_parser("redrive", help="run dead-lettered tasks again (all, or those named)")
    dlq_redrive.add_argument("task_ids", nargs="*", metavar="TASK_ID")
    _backend_options(dlq_redrive, engine=False)

    cancel = sub.add_parser("cancel", help="cancel a queued or running task")
    cancel.add_argument("task_id")
    _client_options(cancel)
    return parser


def _client_options(parser: argparse.ArgumentParser) -> None:
    _opt(parser, "--url", default="http://127.0.0.1:8080", help="the sdasync API")
    _opt(parser, "--timeout", type=float, default=600.0, help="seconds to wait for a task")


def _settings(args: argparse.Namespace) -> Settings:
    return settings_from(vars(args))


def _logging(args: argparse.Namespace) -> None:
    level = getattr(args, "log_level", "INFO")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    # One line per HTTP request from the client and from boto3's connection pool is noise at INFO.
    for noisy in ("httpx", "httpcore", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _worker_args(args: argparse.Namespace, settings: Settings) -> list[str]:
    """The resolved settings, passed on explicitly so every worker sees exactly what the API sees."""
    return ["--data-dir", str(settings.data_dir), "--queue", settings.queue_url, "--store", settings.store_url,
            "--blobs", settings.blobs_url, "--engine", settings.engine,
            "--visibility-timeout", str(settings.visibility_timeout), "--max-attempts", str(settings.max_attempts),
            "--log-level", args.log_level,
            # Well inside the supervisor's 90 s before SIGKILL, so a long task is handed back, not killed.
            "--drain-timeout", "75"]


def cmd_api(args: argparse.Namespace, *, workers: int = 0) -> int:
    import threading

    import uvicorn

    from sdasync.api.app import create_app
    from sdasync.backends.registry import open_engine
    from sdasync.supervisor import WorkerSupervisor

    settings = _settings(args)
    engine = open_engine(settings.engine, models_dir=settings.models_dir)
    autoscale = bool(getattr(args, "autoscale", False))
    # With --autoscale the supervisor starts empty and the scaler thread below resizes it.
    supervisor = WorkerSupervisor(_worker_args(args, settings), 0 if autoscale else workers) \
        if workers or autoscale else None

    checks: dict[str, Callable[[], dict[str, Any]]] = {"engine": engine.health}
    if supervisor is not None:
        checks["workers"] = supervisor.health
    scaler_stop = threading.Event()
    if autoscale and supervisor is not None:
        scaler = _local_scaler(args, settings, supervisor)
        checks["scaler"] = scaler.metrics
    app = create_app(settings, health_checks=checks)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                           lifespan="on"))
    stopping = False

    def after_server(signum: int, _: FrameType | None) -> None:
        # uvicorn handles SIGINT/SIGTERM while it runs, then re-raises the signal into the handler it found:
        # this one. That first call is ignored so the workers drain; a signal during the drain kills them.
        if stopping and supervisor is not None:
            log.warning("signal %d during the drain: killing the workers", signum)
            supervisor.kill()

    signal.signal(signal.SIGINT, after_server)
    signal.signal(signal.SIGTERM, after_server)
    if supervisor is not None:
        supervisor.start()
    if autoscale and supervisor is not None:
        scaler.start_thread(interval_s=args.scale_interval, stop=scaler_stop)
    try:
        server.run()
    finally:
        stopping = True
        scaler_stop.set()
        if supervisor is not None:
            log.info("stopping workers")
            supervisor.stop()
    return 0 if server.started else 1


def _local_scaler(args: argparse.Namespace, settings: Settings, supervisor: Any) -> Any:
    from sdasync.backends.registry import open_queue, open_store
    from sdasync.scaler.actuators.local import LocalScaler, running_worker_pids
    from sdasync.scaler.loop import ScalerLoop
    from sdasync.scaler.types import PolicyConfig

    if args.max_workers < 1:
        raise SdasyncConfigError(f"--max-workers must be at least 1, not {args.max_workers}")
    # The scaler's own handle on the queue: the API's is opened by create_app and used from its threads.
    queue = open_queue(settings.queue_url).__enter__()
    store = open_store(settings.store_url).__enter__()
    supervisor.busy_pids = lambda: running_worker_pids(store)
    fleet = LocalScaler(max=args.max_workers, supervisor=supervisor)
    config = PolicyConfig(min_workers=0, max_workers=args.max_workers, backlog_per_worker=args.backlog_per_worker,
                          scale_in_cooldown_s=args.scale_in_cooldown)
    return ScalerLoop(queue, fleet, config, name=f"local://?max={args.max_workers}")


def cmd_scaler(args: argparse.Namespace) -> int:
    import threading

    from sdasync.backends.registry import open_fleet, open_queue
    from sdasync.scaler.loop import ScalerLoop
    from sdasync.scaler.types import PolicyConfig

    if not args.queue or not args.fleet:
        raise SdasyncConfigError("sdasync scaler needs --queue and --fleet")
    if not 0 <= args.min <= args.max:
        raise SdasyncConfigError(f"need 0 <= --min <= --max, got --min {args.min} --max {args.max}")
    if args.max_scale_out_step is not None and args.max_scale_out_step < 1:
        raise SdasyncConfigError("--max-scale-out-step must be at least 1")
    if args.once and args.fleet.startswith("local:"):
        raise SdasyncConfigError("--once with local:// would stop the workers it starts as it exits")
    config = PolicyConfig(min_workers=args.min, max_workers=args.max, backlog_per_worker=args.backlog_per_worker,
                          scale_in_cooldown_s=args.scale_in_cooldown, target_wait_s=args.target_wait,
                          service_time_s=args.service_time, max_scale_out_step=args.max_scale_out_step,
                          boot_time_s=args.boot_time)
    # A local fleet runs workers on this queue, with the default local backends for the rest.
    fleet_kwargs: dict[str, Any] = {"worker_args": ["--queue", args.queue]} \
        if args.fleet.startswith("local:") else {}
    with open_queue(args.queue) as queue, open_fleet(args.fleet, **fleet_kwargs) as fleet:
        loop = ScalerLoop(queue, fleet, config, name=args.fleet)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        loop.run(interval_s=args.interval, stop=stop, once=args.once)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from sdasync.worker.command import run_worker

    return run_worker(args, _settings(args))


def cmd_submit(args: argparse.Namespace) -> int:
    from sdasync.client import Client

    payload: dict[str, Any] = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
                               "width": args.width, "height": args.height, "seed": args.seed,
                               "batch_size": args.batch_size}
    if args.sampler:
        payload["sampler_name"] = args.sampler
    with Client(args.url) as client:
        task_id = client.submit(payload)
        if not args.wait:
            _print({"taskId": task_id, "status": "queued"})
            return 0
        print(f"task {task_id} queued; waiting", file=sys.stderr)
        try:
            task = client.wait(task_id, timeout_s=args.timeout)
        except KeyboardInterrupt:
            print(f"\nstopped waiting; the task goes on: sdasync status {task_id}", file=sys.stderr)
            return 130
        if args.out and task["status"] == "succeeded":
            saved = [str(client.download(url, args.out / f"{task_id}-{i}.png"))
                     for i, url in enumerate(task["result"]["images"])]
            task["saved"] = saved
        _print(task)
        return 0 if task["status"] == "succeeded" else 1


def cmd_aws(args: argparse.Namespace) -> int:
    from sdasync.bootstrap import bootstrap

    for line in bootstrap({"queue": args.queue, "store": args.store, "blobs": args.blobs}):
        print(f"ready  {line}")
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from sdasync import dlq
    from sdasync.service import open_backends

    with open_backends(_settings(args)) as backends:
        if args.dlq_command == "list":
            _print(dlq.list_dead(backends))
        else:
            _print(dlq.redrive(backends, args.task_ids or None))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from sdasync.simulate.command import run

    return run(args)


def cmd_status(args: argparse.Namespace) -> int:
    from sdasync.client import Client

    with Client(args.url) as client:
        _print(client.get(args.task_id))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from sdasync.client import Client

    with Client(args.url) as client:
        _print(client.cancel(args.task_id))
    return 0


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _logging(args)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": lambda a: cmd_api(a, workers=a.workers), "api": cmd_api, "worker": cmd_worker,
        "submit": cmd_submit, "status": cmd_status, "cancel": cmd_cancel, "aws": cmd_aws,
        "dlq": cmd_dlq, "scaler": cmd_scaler, "simulate": cmd_simulate,
    }
    try:
        return commands[args.command](args)
    except SdasyncError as exc:
        print(f"sdasync: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
