"""``sdasync webhooks``: the outbox dispatcher alone (``add_parser`` and ``run`` for the CLI).

Embedded, ``serve`` runs the same dispatcher in a thread; this command is for running it apart (on AWS, beside
the workers, or as many copies as wanted: claims are compare-and-sets, so they never send one try twice at once).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

from sdasync.backends.base import TaskStore
from sdasync.config import Settings
from sdasync.webhooks.dispatcher import Dispatcher, Render, SecretFor

log = logging.getLogger("sdasync.webhooks")


def add_parser(subparsers: Any, *, options: Sequence[Callable[[argparse.ArgumentParser], object]] = ()
               ) -> argparse.ArgumentParser:
    """Add ``webhooks`` to ``subparsers`` (what ``ArgumentParser.add_subparsers()`` returned), with ``--once`` and
    ``--interval``. The setting options (where the store is, ``--webhook-allow``, ``--webhook-timeout``,
    ``--webhook-retry-for``, the log level) are the CLI's shared groups: pass them as ``options`` or add them to
    the returned parser, so ``settings_from`` sees them."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "webhooks", help="deliver finished tasks' webhook events (the outbox dispatcher)",
        description="Send every due 'completed' webhook event, signed, retrying with backoff until delivered or "
                    "the retry period has passed.")
    for add in options:
        add(p)
    p.add_argument("--once", action="store_true", help="one pass over the due events, then exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between passes when idle (default 1)")
    return p


def dispatcher_from(settings: Settings, store: TaskStore, *, render: Render, secret_for: SecretFor,
                    **kwargs: Any) -> Dispatcher:
    """The dispatcher the settings describe. ``kwargs`` go to ``Dispatcher`` (a clock, a fault hook)."""
    return Dispatcher(store, secret_for=secret_for, render=render, allow=settings.webhook_allow,
                      connect_timeout_s=settings.webhook_timeout, read_timeout_s=settings.webhook_timeout,
                      retry_for_s=settings.webhook_retry_for, **kwargs)


def run(args: argparse.Namespace, settings: Settings, *, render: Render, secret_for: SecretFor,
        store: TaskStore | None = None) -> int:
    """Run the dispatcher: one pass with ``--once`` (``{"sent": N}`` printed), else until SIGINT/SIGTERM.
    ``store``: an open task store to use (else the settings' one is opened and closed here)."""
    if args.interval <= 0:
        raise SystemExit("sdasync webhooks: --interval must be > 0")
    if store is None:
        from sdasync.backends.registry import open_store

        with open_store(settings.store_url, retention_days=settings.retention_days) as opened:
            return _run(args, dispatcher_from(settings, opened, render=render, secret_for=secret_for))
    return _run(args, dispatcher_from(settings, store, render=render, secret_for=secret_for))


def _run(args: argparse.Namespace, dispatcher: Dispatcher) -> int:
    if args.once:
        print(json.dumps({"sent": dispatcher.run_once()}))
        return 0
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    log.info("webhooks: dispatching every %.1f s until SIGINT/SIGTERM", args.interval)
    dispatcher.run(stop, args.interval)
    return 0
