"""``sdasync simulate``: compare scaling policies on arrival traces (``add_parser`` and ``run`` for the CLI)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sdasync.scaler.types import PolicyConfig
from sdasync.simulate import peers, traces
from sdasync.simulate.engine import SimConfig
from sdasync.simulate.report import compare, to_json, to_table


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``simulate`` to ``subparsers`` (what ``ArgumentParser.add_subparsers()`` returned)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "simulate", help="compare scaling policies on arrival traces (discrete-event simulation)",
        description="Replay arrival traces against scaling policies and report instance-hours, waits and "
                    "interrupted tasks per policy.")
    p.add_argument("--trace", action="append", metavar="NAME|FILE.csv",
                   help=f"{', '.join(traces.BUILTIN)} or a CSV of arrival times in seconds; repeatable "
                        f"(default: the three built-in traces)")
    p.add_argument("--policy", action="append", choices=peers.NAMES,
                   help="repeatable (default: all four)")
    p.add_argument("--format", choices=["table", "json", "markdown"], default="table")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw instances and backlog over time")
    p.add_argument("--seed", type=int, default=0, help="trace and simulation seed (default 0)")
    p.add_argument("--boot-delay", type=float, default=120.0, help="seconds from launch to first task (120)")
    p.add_argument("--service-time", type=float, default=20.0,
                   help="mean seconds per task; lognormal, sigma 0.5 on the log scale (20)")
    p.add_argument("--spot-interruption-rate", type=float, default=0.0,
                   help="spot reclaims per instance-hour; counted as 'reclaimed', not 'interrupted' (0)")
    p.add_argument("--price", type=float, default=1.0, help="price per instance-hour (1.0)")
    p.add_argument("--target-wait", type=float, default=300.0, help="p95 wait target in seconds (300)")
    p.add_argument("--min", type=int, default=0, dest="min_workers", help="minimum workers, sdasync only (0)")
    p.add_argument("--max", type=int, default=20, dest="max_workers", help="maximum workers, every policy (20)")
    p.add_argument("--backlog-per-worker", type=int, default=5,
                   help="sdasync's sizing before it knows a service time; target-tracking's target (5)")
    p.add_argument("--scale-in-cooldown", type=float, default=60.0,
                   help="sdasync: seconds without queued work before idle workers go (60)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between decisions (60)")
    p.add_argument("--tail", type=float, default=3600.0, help="seconds simulated after the last arrival (3600)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the comparison ``args`` describes, print it; 0, or 2 for a bad trace or option."""
    if args.min_workers < 0 or args.max_workers < max(args.min_workers, 1):
        print("sdasync simulate: need 0 <= --min <= --max and --max >= 1", file=sys.stderr)
        return 2
    if args.service_time <= 0 or args.interval <= 0 or args.boot_delay < 0 or args.spot_interruption_rate < 0:
        print("sdasync simulate: --service-time and --interval must be > 0, --boot-delay and "
              "--spot-interruption-rate >= 0", file=sys.stderr)
        return 2
    # sdasync is configured as an operator would run `sdasync scaler`: with the model's mean time per task
    # (--service-time) and the instances' boot time (--boot-time), both known before deploying. Nothing is
    # learned from the simulation's own truth. The peers have no such settings in the systems they model.
    policy = policy_config(args)
    sim = SimConfig(boot_delay_s=args.boot_delay, interval_s=args.interval,
                    spot_rate_per_hour=args.spot_interruption_rate, price_per_hour=args.price, tail_s=args.tail,
                    target_wait_s=args.target_wait, seed=args.seed)
    try:
        results = compare(args.trace or list(traces.BUILTIN), args.policy or list(peers.NAMES), policy, sim,
                          service_mean_s=args.service_time)
    except (ValueError, OSError) as exc:
        print(f"sdasync simulate: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(to_json(results))
    else:
        print(to_table(results, markdown=args.format == "markdown"))
    if args.plot is not None:
        from sdasync.simulate.plot import plot

        plot(results, args.plot)
    return 0


def policy_config(args: argparse.Namespace) -> PolicyConfig:
    """sdasync's configuration for a run, as an operator would pass it to ``sdasync scaler``."""
    return PolicyConfig(min_workers=args.min_workers, max_workers=args.max_workers,
                        backlog_per_worker=args.backlog_per_worker, target_wait_s=args.target_wait,
                        scale_in_cooldown_s=args.scale_in_cooldown, boot_time_s=args.boot_delay,
                        service_time_s=args.service_time)
