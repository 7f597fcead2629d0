"""The ``sdasync`` command: an entry point, so it reads the environment, once, into one Settings.

Every setting option can also come from ``SDASYNC_<OPTION>`` (``--max-attempts`` <-> ``SDASYNC_MAX_ATTEMPTS``);
options given on the command line win. Options that are not settings (a prompt, ``--once``) are arguments only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sdasync import __version__
from sdasync.config import ENV_PREFIX, LOCAL_SCALER_DEFAULTS, Limits, Settings, settings_from
from sdasync.errors import ConfigError, SdasyncError

log = logging.getLogger("sdasync")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _env(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _set(parser: argparse.ArgumentParser | Any, flag: str, *, type: Callable[[str], Any] = str,
         help: str, dest: str | None = None, aliases: Sequence[str] = ()) -> None:
    """A setting's option: None when not given, so ``settings_from`` falls back to the environment, then to the
    one default in config.py."""
    name = dest or flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, *aliases, type=type, default=None, dest=name, help=f"{help} [{_env('--' + name)}]")


def _switch(parser: argparse.ArgumentParser | Any, flag: str, *, help: str) -> None:
    parser.add_argument(flag, action="store_const", const=True, default=None, help=f"{help} [{_env(flag)}]")


def _log_level(parser: argparse.ArgumentParser) -> None:
    _set(parser, "--log-level", type=str.upper, help=f"one of {', '.join(LOG_LEVELS)} (default INFO)")


def _location_options(parser: argparse.ArgumentParser, *, blobs: bool = True) -> None:
    _set(parser, "--data-dir", type=Path, help="embedded data: <dir>/sdasync.db, <dir>/results, <dir>/requests "
         "(default ./data)")
    _set(parser, "--queue", help="queue URL (default sqlite:///<data-dir>/sdasync.db)")
    _set(parser, "--store", help="task store URL (default sqlite:///<data-dir>/sdasync.db)")
    if blobs:
        _set(parser, "--blobs", help="result images URL (default file:///<data-dir>/results)")
        _set(parser, "--payloads", help="large request payloads URL, never served (default file:///<data-dir>/"
             "requests; with s3://bucket/prefix results, s3://bucket/requests)")


def _task_options(parser: argparse.ArgumentParser) -> None:
    _set(parser, "--engine", help="engine URL: diffusers://tiny (default), diffusers://<model>, "
         "webui+http://host:port, fake://?seconds=S")
    _set(parser, "--visibility-timeout", type=float, help="seconds a received task stays hidden between "
         "heartbeats (default 60)")
    _set(parser, "--max-attempts", type=int, help="attempts before a task fails (default 3)")
    _set(parser, "--drain-timeout", type=float, help="after SIGTERM, seconds a worker's current task may still "
         "run before it is handed back (default 90)")


def _api_options(parser: argparse.ArgumentParser) -> None:
    _set(parser, "--host", help="bind address (default 127.0.0.1)")
    _set(parser, "--port", type=int, help="default 8080")
    _set(parser, "--public-url", help="the API's address as clients see it, for image URLs")
    _set(parser, "--trusted-hosts", help="comma-separated Host names image URLs may be built from (default: the "
         "bind address, localhost, 127.0.0.1, ::1)")
    _set(parser, "--header-timeout", type=float, help="seconds a client may take to send its headers (default 10)")
    _set(parser, "--body-timeout", type=float, help="seconds a client may take to send its body (default 30)")
    _set(parser, "--max-incomplete-requests", type=int, help="connections still sending a request before new "
         "ones are refused (default 64)")
    _set(parser, "--inline-payload-max", type=int, help="payloads over this many bytes go to the payload store "
         "(default 65536)")
    _set(parser, "--retention-days", type=float, help="days a finished task, its payload and images are kept "
         "(default 30)")
    _set(parser, "--requeue-after", type=float, help="seconds a task may stay queued unchanged before its message "
         "is sent again (default 3600)")
    _set(parser, "--sweep-interval", type=float, help="seconds between sweeps for stranded and expired tasks "
         "(default 60; 0 = off)")
    trust = parser.add_argument_group("keys, quotas and webhooks (docs/security.md)")
    _set(trust, "--auth", help="true/false: require API keys (default: on unless bound to loopback)")
    _set(trust, "--url-ttl", type=float, help="seconds an embedded image URL stays valid (default 3600)")
    _set(trust, "--url-secret", help="secret signing image URLs, the same on every API process (default: one "
         "made in <data-dir>/secrets/url.key)")
    _set(trust, "--max-queue-depth", type=int, help="refuse submissions (429) while this many tasks wait")
    _set(trust, "--max-task-age", type=float, help="seconds after submission by which every task must finish, "
         "else it ends cancelled (deadline)")
    _set(trust, "--idempotency-ttl", type=float, help="seconds an Idempotency-Key is remembered (default 86400)")
    _webhook_options(trust)
    limits = parser.add_argument_group("request limits")
    for name, info in Limits.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if info.annotation in (bool, "bool"):
            _switch(limits, flag, help="allow it")
        elif name == "override_settings_allowlist":
            _set(limits, flag, help=f"comma-separated keys (default {','.join(sorted(info.default))})")
        else:
            _set(limits, flag, type=int, help=f"default {info.default}")


def _webhook_options(parser: argparse.ArgumentParser | Any) -> None:
    _set(parser, "--secrets", help="what encrypts webhook secrets: file:///path/to/key (default <data-dir>/"
         "secrets/master.key) or kms://<key id or alias>?region=R")
    _set(parser, "--webhook-allow", help="comma-separated hosts, addresses or networks webhooks may reach despite "
         "the SSRF guard (and over http)")
    _set(parser, "--webhook-timeout", type=float, help="seconds a webhook receiver has to connect and to answer "
         "(default 10)")
    _set(parser, "--webhook-retry-for", type=float, help="seconds a completed event is retried (default 86400)")


def _scaler_options(parser: argparse.ArgumentParser, *, local: bool) -> None:
    defaults: Mapping[str, object] = LOCAL_SCALER_DEFAULTS if local else {}
    fields = Settings.SECTIONS["scaler"].model_fields

    def default(name: str) -> object:
        return defaults.get(name, fields[name].default)

    _set(parser, "--max-workers", type=int, aliases=() if local else ("--max",),
         help=f"the most workers (default {default('max_workers')})")
    _set(parser, "--backlog-per-worker", type=int, help=f"queued + running tasks per worker before another "
         f"starts (default {default('backlog_per_worker')})")
    _set(parser, "--scale-in-cooldown", type=float, help="seconds without work before idle workers go (default 60; "
         "busy ones never do)")
    _set(parser, "--scale-interval", type=float, aliases=() if local else ("--interval",),
         help=f"seconds between decisions (default {default('scale_interval')})")
    if local:
        return
    _set(parser, "--fleet", help="spotfleet://<request id>, asg://<group>, local://?max=N")
    _set(parser, "--min-workers", type=int, aliases=("--min",), help="fewest workers (default 0)")
    _set(parser, "--target-wait", type=float, help="seconds a task should wait at most (default 300)")
    _set(parser, "--service-time", type=float, help="mean seconds per task, if known: sizes for the wait target")
    _set(parser, "--boot-time", type=float, help="seconds from launch to a ready worker (default 0)")
    _set(parser, "--max-scale-out-step", type=int, help="most workers added per decision")


def _client_options(parser: argparse.ArgumentParser) -> None:
    _set(parser, "--url", dest="api_url", help="the sdasync API (default http://127.0.0.1:8080)")
    _set(parser, "--timeout", dest="wait_timeout", type=float, help="seconds to wait for a task (default 600)")
    _set(parser, "--key", dest="api_key", help="the API key to send")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdasync", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"sdasync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from sdasync.simulate.command import add_parser as add_simulate  # pure Python: cheap to import

    add_simulate(sub)

    serve = sub.add_parser("serve", help="the API and N workers in one command")
    for options in (_location_options, _task_options, _api_options, _log_level):
        options(serve)
    _set(serve, "--workers", type=int, help="worker processes (default 1)")
    _switch(serve, "--autoscale", help="start with no workers and grow to --max-workers with the queue (local:// "
            "fleet), back to zero when it drains")
    _scaler_options(serve, local=True)

    api = sub.add_parser("api", help="the HTTP API alone (and the sweeper)")
    for options in (_location_options, _api_options, _log_level):
        options(api)
    _set(api, "--max-attempts", type=int, help="dead-letterings of one queued task before the sweeper fails it "
         "(default 3)")

    worker = sub.add_parser("worker", help="one worker process")
    for options in (_location_options, _task_options, _log_level):
        options(worker)
    _switch(worker, "--burst", help="exit when the queue is empty")
    _set(worker, "--max-tasks", type=int, help="exit after this many tasks")
    _set(worker, "--max-idle", type=float, help="exit after this many seconds without a task")
    _set(worker, "--generation-timeout", type=float, help="seconds a generation may take before it is "
         "interrupted and retried (default: derived from steps, size and images)")
    _switch(worker, "--watch-spot", help="poll EC2 instance metadata (IMDSv2) for spot interruption and rebalance "
            "notices, and drain on one")
    _set(worker, "--imds-url", help="instance metadata base URL (default EC2's own)")
    _set(worker, "--asg-protect", help="Auto Scaling group name: protect this instance from scale-in while it has "
         "a task (instance id from IMDS or --instance-id)")
    _set(worker, "--instance-id", help="this machine's EC2 instance id, if known")
    _webhook_options(worker)
    worker.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by serve's supervisor

    scaler = sub.add_parser("scaler", help="size a fleet of workers to the queue")
    _set(scaler, "--queue", help="queue URL")
    _scaler_options(scaler, local=False)
    scaler.add_argument("--once", action="store_true", help="make one decision, apply it and exit")
    _log_level(scaler)

    sweep = sub.add_parser("sweep", help="re-send stranded tasks' messages and delete expired tasks")
    _location_options(sweep)
    _set(sweep, "--max-attempts", type=int, help="sweeps of one task before it fails as stranded (default 3)")
    _set(sweep, "--requeue-after", type=float, help="seconds a task may stay queued unchanged (default 3600)")
    _set(sweep, "--retention-days", type=float, help="days a finished task is kept (default 30)")
    _set(sweep, "--sweep-interval", type=float, help="seconds between sweeps without --once (default 60)")
    sweep.add_argument("--once", action="store_true", help="sweep once and exit")
    _log_level(sweep)

    submit = sub.add_parser("submit", help="submit a txt2img request to a running API")
    submit.add_argument("prompt")
    _client_options(submit)
    submit.add_argument("--negative-prompt", default="", help="what the image should not show")
    submit.add_argument("--steps", type=int, default=20, help="sampling steps")
    submit.add_argument("--width", type=int, default=512, help="image width")
    submit.add_argument("--height", type=int, default=512, help="image height")
    submit.add_argument("--seed", type=int, default=-1, help="-1 = random")
    submit.add_argument("--sampler", help="WebUI sampler name, e.g. 'Euler a'")
    submit.add_argument("--batch-size", type=int, default=1, help="images per task")
    submit.add_argument("--wait", action="store_true", help="wait for the task to finish and print it")
    submit.add_argument("--out", type=Path, help="with --wait: save the images into this folder")

    status = sub.add_parser("status", help="show a task")
    status.add_argument("task_id")
    _client_options(status)

    aws = sub.add_parser("aws", help="AWS helpers").add_subparsers(dest="aws_command", required=True)
    boot = aws.add_parser("bootstrap", help="create the SQS queues, DynamoDB table and S3 buckets the URLs name, "
                          "with their retention (idempotent)")
    _set(boot, "--queue", help="sqs://<name>")
    _set(boot, "--store", help="dynamodb://<table>")
    _set(boot, "--blobs", help="s3://<bucket>/<prefix> for the results")
    _set(boot, "--payloads", help="s3://<bucket>/<prefix> for large request payloads (default s3://<bucket>/"
         "requests)")
    _set(boot, "--retention-days", type=float, help="days tasks, payloads and images are kept (default 30)")

    dlq = sub.add_parser("dlq", help="dead-lettered tasks").add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq.add_parser("list", help="tasks whose messages are in the dead-letter queue")
    _location_options(dlq_list, blobs=False)
    dlq_redrive = dlq.add_parser("redrive", help="run dead-lettered tasks again (all, or those named)")
    dlq_redrive.add_argument("task_ids", nargs="*", metavar="TASK_ID")
    _location_options(dlq_redrive, blobs=False)

    cancel = sub.add_parser("cancel", help="cancel a queued or running task")
    cancel.add_argument("task_id")
    _client_options(cancel)

    from sdasync.auth.commands import add_parser as add_keys
    from sdasync.webhooks.command import add_parser as add_webhooks

    _log_level(add_keys(sub))  # its subcommands take the store options themselves
    hooks = add_webhooks(sub, options=(_location_options, _webhook_options, _log_level))
    _set(hooks, "--public-url", help="the API's address as clients see it, for image URLs in events")
    _set(hooks, "--url-ttl", type=float, help="seconds an embedded image URL stays valid (default 3600)")
    _set(hooks, "--url-secret", help="secret signing image URLs, as the API's")
    return parser


def settings_of(args: argparse.Namespace, *, defaults: Mapping[str, object] | None = None) -> Settings:
    return settings_from(vars(args), os.environ, defaults=defaults)


def _logging(level: str) -> None:
    if level not in LOG_LEVELS:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    # One line per HTTP request from the client and from boto3's connection pool is noise at INFO.
    for noisy in ("httpx", "httpcore", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from sdasync.serving import serve

    return serve(settings, workers=settings.workers if args.command == "serve" else 0)


def cmd_scaler(args: argparse.Namespace, settings: Settings) -> int:
    from sdasync.serving import run_scaler

    return run_scaler(settings, once=args.once)


def cmd_sweep(args: argparse.Namespace, settings: Settings) -> int:
    from sdasync.serving import run_sweeper

    return run_sweeper(settings, once=args.once)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from sdasync.worker.command import run_worker

    return run_worker(args, settings)


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from sdasync.client import Client

    payload: dict[str, Any] = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
                               "width": args.width, "height": args.height, "seed": args.seed,
                               "batch_size": args.batch_size}
    if args.sampler:
        payload["sampler_name"] = args.sampler
    with Client(settings.api_url, api_key=settings.api_key) as client:
        task_id = client.submit(payload)
        if not args.wait:
            _print({"taskId": task_id, "status": "queued"})
            return 0
        print(f"task {task_id} queued; waiting", file=sys.stderr)
        try:
            task = client.wait(task_id, timeout_s=settings.wait_timeout)
        except KeyboardInterrupt:
            print(f"\nstopped waiting; the task goes on: sdasync status {task_id}", file=sys.stderr)
            return 130
        if args.out and task["status"] == "succeeded":
            saved = [str(client.download(url, args.out / f"{task_id}-{i}.png"))
                     for i, url in enumerate(task["result"]["images"])]
            task["saved"] = saved
        _print(task)
        return 0 if task["status"] == "succeeded" else 1


def cmd_aws(args: argparse.Namespace, settings: Settings) -> int:
    from sdasync.bootstrap import bootstrap

    payloads = settings.payloads_url if settings.blobs and settings.blobs.startswith("s3://") else settings.payloads
    urls = {"queue": settings.queue, "store": settings.store, "blobs": settings.blobs, "payloads": payloads}
    for line in bootstrap(urls, retention_days=settings.retention_days):
        print(f"ready  {line}")
    return 0


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from sdasync import dlq
    from sdasync.service import open_backends

    with open_backends(settings) as backends:
        if args.dlq_command == "list":
            _print(dlq.list_dead(backends))
        else:
            _print(dlq.redrive(backends, args.task_ids or None))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from sdasync.client import Client

    with Client(settings.api_url, api_key=settings.api_key) as client:
        _print(client.get(args.task_id))
    return 0


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from sdasync.client import Client

    with Client(settings.api_url, api_key=settings.api_key) as client:
        _print(client.cancel(args.task_id))
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from sdasync.auth.commands import run

    return run(args, settings)


def cmd_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    from sdasync.service import open_backends
    from sdasync.trust import renderer, secret_source
    from sdasync.webhooks.command import run

    with open_backends(settings) as backends:
        return run(args, settings, render=renderer(backends.blobs, settings),
                   secret_for=secret_source(backends.store, settings), store=backends.store)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


COMMANDS: Mapping[str, Callable[[argparse.Namespace, Settings], int]] = {
    "serve": cmd_serve, "api": cmd_serve, "worker": cmd_worker, "submit": cmd_submit, "status": cmd_status,
    "cancel": cmd_cancel, "aws": cmd_aws, "dlq": cmd_dlq, "scaler": cmd_scaler, "sweep": cmd_sweep,
    "keys": cmd_keys, "webhooks": cmd_webhooks,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "simulate":
            from sdasync.simulate.command import run

            logging.basicConfig(level=logging.INFO)
            return run(args)
        # serve's scaler sizes a local fleet: its own defaults, below whatever the options and environment say.
        settings = settings_of(args, defaults=LOCAL_SCALER_DEFAULTS if args.command == "serve" else None)
        _logging(settings.log_level)
        return COMMANDS[args.command](args, settings)
    except SdasyncError as exc:
        print(f"sdasync: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
