"""Running a comparison and printing it: a fixed-width table or a JSON list."""

from __future__ import annotations

import json
from collections.abc import Sequence

from sdasync.scaler.types import PolicyConfig
from sdasync.simulate import peers, traces
from sdasync.simulate.engine import Result, SimConfig, simulate

COLUMNS = ("trace", "policy", "instance_hours", "cost", "wait_p50_s", "wait_p95_s", "wait_p99_s", "max_backlog",
           "interrupted", "reclaimed", "tasks", "meets_target")


def compare(trace_names: Sequence[str], policy_names: Sequence[str], policy: PolicyConfig, sim: SimConfig,
            service_mean_s: float = 20.0) -> list[Result]:
    """Every policy on every trace, each from a fresh state on the same tasks."""
    results: list[Result] = []
    for name in trace_names:
        trace = traces.load(name, sim.seed, service_mean_s)
        results.extend(simulate(trace, peers.make(p, policy), sim) for p in policy_names)
    return results


def cheapest_meeting_target(results: Sequence[Result]) -> dict[str, str | None]:
    """Per trace, the policy with the fewest instance-hours among those meeting the wait target."""
    best: dict[str, str | None] = {}
    for trace in dict.fromkeys(r.trace for r in results):
        meeting = [r for r in results if r.trace == trace and r.meets_target]
        best[trace] = min(meeting, key=lambda r: r.instance_hours).policy if meeting else None
    return best


def to_json(results: Sequence[Result]) -> str:
    return json.dumps([r.to_json() for r in results], indent=2)


def to_table(results: Sequence[Result], markdown: bool = False) -> str:
    rows = [[_cell(r.to_json()[c]) for c in COLUMNS] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    sep = " | " if markdown else "  "

    def line(cells: Sequence[str]) -> str:
        padded = (c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        text = sep.join(padded)
        return f"| {text} |" if markdown else text.rstrip()

    out = [line(COLUMNS)]
    if markdown:
        out.append("|" + "|".join("-" * (w + 1) + (":" if i >= 2 else "-") for i, w in enumerate(widths)) + "|")
    out.extend(line(row) for row in rows)
    return "\n".join(out)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)
