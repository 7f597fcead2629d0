"""Fault injection for the fault-injection suite: a worker kills itself with SIGKILL at named points.

Off unless ``SDASYNC_FAULTS`` is set, e.g. ``SDASYNC_FAULTS="claimed:0.05,generating:0.05,uploaded:0.1"``: at each
named point the process dies with that probability, as a crash or an OOM kill would take it, without cleanup.
``SDASYNC_FAULT_ERRORS="upload:0.1"`` makes the blob store's writes fail (a retryable BackendError) with that
probability instead. ``SDASYNC_FAULT_SEED`` makes the draws repeatable (mixed with the process id, so workers
differ). Points:

- ``received``: a message was received, nothing else happened
- ``claimed``: the task was claimed (``running``, attempt incremented)
- ``generating``: mid-generation (at a progress report)
- ``uploaded``: images are stored, the task is not yet ``succeeded``
- ``completed``: the task is ``succeeded``, the message not yet acknowledged
"""

from __future__ import annotations

import os
import random
import signal

from sdasync.errors import BackendError

POINTS = ("received", "claimed", "generating", "uploaded", "completed")
ERROR_POINTS = ("upload",)


def _parse(variable: str, points: tuple[str, ...]) -> dict[str, float]:
    rates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in os.environ.get(variable, "").split(","))):
        name, _, rate = part.partition(":")
        if name not in points:
            raise ValueError(f"{variable}: unknown point {name!r}; valid: {', '.join(points)}")
        rates[name] = float(rate or 1)
    return rates


_RATES = _parse("SDASYNC_FAULTS", POINTS)
_ERROR_RATES = _parse("SDASYNC_FAULT_ERRORS", ERROR_POINTS)
_RNG = random.Random(f"{os.environ.get('SDASYNC_FAULT_SEED', '')}:{os.getpid()}")


def fault_point(name: str) -> None:
    """Die here with the configured probability. Costs a dict lookup when fault injection is off."""
    rate = _RATES.get(name)
    if rate and _RNG.random() < rate:
        os.kill(os.getpid(), signal.SIGKILL)


def fault_error(name: str) -> None:
    """Raise a retryable BackendError here with the configured probability."""
    rate = _ERROR_RATES.get(name)
    if rate and _RNG.random() < rate:
        raise BackendError(f"injected fault at {name}")
