"""A PNG of a comparison with Pillow alone: instances over time and backlog over time, one line per policy.

One figure per trace, stacked; each has two panels sharing the time axis (hours). Pillow is already a dependency
for the images the service makes, so the simulator needs no plotting library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdasync.simulate.engine import Result

COLOURS = {"sdasync": (31, 119, 180), "seed-step": (214, 39, 40), "keda": (44, 160, 44),
           "target-tracking": (255, 127, 14)}
FALLBACK = [(148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]
WIDTH, PANEL_H, LEFT, RIGHT, TOP, GAP = 960, 200, 70, 20, 34, 46

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = max(span / ticks, 1e-9)
    magnitude: float = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, ylabel: str, series: dict[str, list[tuple[float, float]]],
           t_max: float, font: Font, colours: dict[str, tuple[int, int, int]]) -> None:
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, top, top + PANEL_H
    y_max = max((v for points in series.values() for _, v in points), default=1.0) or 1.0
    y_step = _nice_step(y_max)
    y_max = math.ceil(y_max / y_step) * y_step
    draw.text((x0, y0 - 18), title, fill="black", font=font)

    def sx(t: float) -> float:
        return x0 + (x1 - x0) * t / t_max

    def sy(v: float) -> float:
        return y1 - (y1 - y0) * v / y_max

    for k in range(round(y_max / y_step) + 1):
        v = k * y_step
        draw.line([(x0, sy(v)), (x1, sy(v))], fill=(225, 225, 225))
        draw.text((x0 - 6, sy(v)), f"{v:g}", fill="black", font=font, anchor="rm")
    hour_step = _nice_step(t_max / 3600, 12)
    h = 0.0
    while h * 3600 <= t_max + 1e-6:
        draw.line([(sx(h * 3600), y1), (sx(h * 3600), y1 + 4)], fill="black")
        draw.text((sx(h * 3600), y1 + 6), f"{h:g}", fill="black", font=font, anchor="mt")
        h += hour_step
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text((12, (y0 + y1) / 2), ylabel, fill="black", font=font, anchor="lm")
    for name, points in series.items():
        # Step lines: the count holds until the next decision.
        xy: list[tuple[float, float]] = []
        for t, v in points:
            if xy:
                xy.append((sx(t), xy[-1][1]))
            xy.append((sx(t), sy(v)))
        if len(xy) > 1:
            draw.line(xy, fill=colours[name], width=2 if name == "sdasync" else 1)


def plot(results: Sequence[Result], path: Path) -> None:
    """Write ``path`` (PNG): per trace, an instances panel and a backlog panel with every policy's line."""
    font: Font = ImageFont.load_default(size=13)
    trace_names = list(dict.fromkeys(r.trace for r in results))
    policy_names = list(dict.fromkeys(r.policy for r in results))
    colours = {n: COLOURS.get(n, FALLBACK[i % len(FALLBACK)]) for i, n in enumerate(policy_names)}
    block = 2 * (PANEL_H + GAP) + 10
    image = Image.new("RGB", (WIDTH, 40 + block * len(trace_names) + 10), "white")
    draw = ImageDraw.Draw(image)
    # The legend, once, across the top.
    x = LEFT
    for name in policy_names:
        draw.line([(x, 20), (x + 24, 20)], fill=colours[name], width=3)
        draw.text((x + 30, 20), name, fill="black", font=font, anchor="lm")
        x += 50 + int(draw.textlength(name, font=font))
    draw.text((WIDTH - RIGHT, 20), "x axis: simulated hours", fill="black", font=font, anchor="rm")
    for i, trace in enumerate(trace_names):
        rows = [r for r in results if r.trace == trace]
        t_max = max((t for r in rows for t, _, _ in r.timeline), default=1.0) or 1.0
        top = 40 + TOP + i * block
        _panel(draw, top, f"{trace}: instances (booting included)", "inst.",
               {r.policy: [(t, n) for t, n, _ in r.timeline] for r in rows}, t_max, font, colours)
        _panel(draw, top + PANEL_H + GAP, f"{trace}: backlog (visible tasks)", "tasks",
               {r.policy: [(t, b) for t, _, b in r.timeline] for r in rows}, t_max, font, colours)
    # A palette image: a handful of flat colours compress to a fraction of an RGB PNG.
    image.quantize(colors=32).save(path, format="PNG", optimize=True)
