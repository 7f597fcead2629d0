"""Arrival traces for the simulator: seeded, deterministic, and a CSV reader for recorded ones.

A trace is the arrival times (simulated seconds from 0, sorted) and one service time per task. Service times are
drawn here, with the arrivals, so every policy replays exactly the same tasks.

Built-in traces (rates chosen so a handful of workers carry the load at a 20 s mean service time):

- ``poisson``: 12 hours of steady arrivals, 6 tasks a minute.
- ``bursty``: 12 hours of a trickle (one task every 3 minutes on average) broken by bursts of 20-80 tasks
  arriving within 30 seconds, about every 40 minutes (exponential gaps).
- ``diurnal``: a 24-hour sinusoidal day, from nearly nothing at midnight to 12 tasks a minute at noon
  (a non-homogeneous Poisson process, sampled by thinning).

CSV format: one arrival time in seconds per line, in the first column; an optional header line (any first line
whose first field is not a number); other columns are ignored; the rows need not be sorted. Service times for a
CSV trace are drawn from the same distribution, with the same seed.

Service times are lognormal with the given mean and ``sigma`` 0.5 on the log scale (median about 0.88 x mean,
p99 about 2.8 x mean): generation time varies with steps and size, with a long right tail.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

BUILTIN = ("poisson", "bursty", "diurnal")
SERVICE_SIGMA = 0.5
HOUR = 3600.0


@dataclass(frozen=True)
class Trace:
    name: str
    arrivals: list[float]
    service_times: list[float]
    #: Arrivals happen in [0, duration); the simulation runs on for a quiet tail after it.
    duration: float


def _poisson(rng: random.Random, rate_per_s: float, start: float, end: float) -> list[float]:
    times: list[float] = []
    t = start + rng.expovariate(rate_per_s)
    while t < end:
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times


def poisson(rng: random.Random) -> tuple[list[float], float]:
    duration = 12 * HOUR
    return _poisson(rng, 6 / 60, 0.0, duration), duration


def bursty(rng: random.Random) -> tuple[list[float], float]:
    duration = 12 * HOUR
    times = _poisson(rng, 1 / 180, 0.0, duration)
    t = rng.expovariate(1 / (40 * 60))
    while t < duration:
        size = rng.randint(20, 80)
        times.extend(t + rng.uniform(0.0, 30.0) for _ in range(size))
        t += 30.0 + rng.expovariate(1 / (40 * 60))
    return sorted(x for x in times if x < duration), duration


def diurnal(rng: random.Random) -> tuple[list[float], float]:
    duration = 24 * HOUR
    peak = 12 / 60
    times: list[float] = []
    # Thinning: draw at the peak rate, keep each arrival with probability rate(t) / peak.
    for t in _poisson(rng, peak, 0.0, duration):
        rate = peak * (0.02 + 0.98 * (1 - math.cos(2 * math.pi * t / duration)) / 2)
        if rng.random() < rate / peak:
            times.append(t)
    return times, duration


def read_csv(path: Path) -> list[float]:
    """Arrival times from the first column of ``path``; a non-numeric first line is a header."""
    times: list[float] = []
    with path.open(newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not row[0].strip():
                continue
            try:
                value = float(row[0])
            except ValueError:
                if lineno == 1:
                    continue  # the header
                raise ValueError(f"{path}:{lineno}: not a number of seconds: {row[0]!r}") from None
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{path}:{lineno}: arrival time must be a finite number >= 0, got {row[0]!r}")
            times.append(value)
    return sorted(times)


def service_times(rng: random.Random, count: int, mean_s: float) -> list[float]:
    # Lognormal with this mean: mu = ln(mean) - sigma^2 / 2.
    mu = math.log(mean_s) - SERVICE_SIGMA**2 / 2
    return [rng.lognormvariate(mu, SERVICE_SIGMA) for _ in range(count)]


def load(name: str, seed: int, service_mean_s: float = 20.0) -> Trace:
    """The named built-in trace, or a CSV file when ``name`` is not one of :data:`BUILTIN`."""
    rng = random.Random(f"{name}:{seed}")
    if name == "poisson":
        arrivals, duration = poisson(rng)
    elif name == "bursty":
        arrivals, duration = bursty(rng)
    elif name == "diurnal":
        arrivals, duration = diurnal(rng)
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"unknown trace {name!r}: use one of {', '.join(BUILTIN)} or a CSV file")
        arrivals = read_csv(path)
        duration = (arrivals[-1] + 1.0) if arrivals else 0.0
        name = path.name
    # A separate stream for service times, so they do not shift when a trace's arrival draws change.
    svc_rng = random.Random(f"service:{name}:{seed}")
    return Trace(name, arrivals, service_times(svc_rng, len(arrivals), service_mean_s), duration)
