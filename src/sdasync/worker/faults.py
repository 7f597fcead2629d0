"""Fault injection for the fault-injection suite: a worker kills itself with SIGKILL at named points.

Off unless ``configure()`` turns it on; the worker's command calls it with ``Settings.faults``,
``fault_errors`` and ``fault_seed`` (``SDASYNC_FAULTS`` etc. in the environment of a worker process). ``faults``
is e.g. ``"claimed:0.05,generating:0.05,uploaded:0.1"``: at each named point the process dies with that
probability, as a crash or an OOM kill would take it, without cleanup. ``fault_errors="upload:0.1"`` makes the
blob store's writes fail (a retryable BackendError) with that probability instead. ``seed`` makes the draws
repeatable (mixed with the process id, so workers differ). Points:

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


def _parse(setting: str, value: str, points: tuple[str, ...]) -> dict[str, float]:
    rates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, _, rate = part.partition(":")
        if name not in points:
            raise ValueError(f"{setting}: unknown point {name!r}; valid: {', '.join(points)}")
        rates[name] = float(rate or 1)
    return rates


_RATES: dict[str, float] = {}
_ERROR_RATES: dict[str, float] = {}
_RNG = random.Random()


def configure(*, faults: str = "", fault_errors: str = "", seed: str = "") -> None:
    """Turn fault injection on (or off, with empty strings) for this process. Raises ValueError for an unknown
    point or a rate that is not a number."""
    global _RNG
    rates, error_rates = _parse("faults", faults, POINTS), _parse("fault_errors", fault_errors, ERROR_POINTS)
    _RATES.clear()
    _RATES.update(rates)
    _ERROR_RATES.clear()
    _ERROR_RATES.update(error_rates)
    _RNG = random.Random(f"{seed}:{os.getpid()}")


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
