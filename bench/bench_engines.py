"""Engine timings on this machine: the tiny diffusers model (build, load, per-image time) and the fake engine.

Run: ``.venv/bin/python bench/bench_engines.py [--repeat N]``. Prints one line per measurement; the tiny model is
built into a fresh temporary folder so the build time is real, then loaded again as a worker would on restart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sdasync.engines import tiny
from sdasync.engines.base import GenerationRequest
from sdasync.engines.diffusers import DiffusersEngine
from sdasync.engines.fake import FakeEngine
from sdasync.models import Api


def timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def import_libraries() -> None:
    # The top-level packages import lazily; touching the classes is what costs.
    diffusers, transformers = tiny.import_untyped("diffusers"), tiny.import_untyped("transformers")
    _ = diffusers.StableDiffusionPipeline, diffusers.UNet2DConditionModel, transformers.CLIPTextModel


def report(name: str, samples: list[float]) -> None:
    if len(samples) == 1:
        print(f"{name:<44} {samples[0] * 1000:9.1f} ms")
    else:
        print(
            f"{name:<44} {statistics.median(samples) * 1000:9.1f} ms median"
            f"  (min {min(samples) * 1000:.1f}, max {max(samples) * 1000:.1f}, n={len(samples)})"
        )


def request(width: int, height: int, steps: int, seed: int) -> GenerationRequest:
    payload = {"prompt": "a photo of a cat", "width": width, "height": height, "steps": steps, "seed": seed}
    return GenerationRequest(task_id=f"bench-{seed}", api=Api.TXT2IMG, payload=payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="timed images per size (after one warm-up)")
    args = parser.parse_args()
    report("import torch + diffusers + transformers", [timed(import_libraries)])
    import torch

    print(f"{os.cpu_count()} CPUs visible, torch uses {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        models_dir = Path(scratch)
        report("tiny: build + save (first start)", [timed(tiny.ensure, models_dir)])
        engine = DiffusersEngine.from_url("diffusers://tiny", models_dir=models_dir)
        report("tiny: load (engine.setup, folder exists)", [timed(engine.setup)])
        print(f"tiny: device {engine.health().extra.get('device')}")
        for size, steps in ((512, 20), (64, 20), (64, 4)):
            engine.generate(request(size, size, steps, 0))  # warm-up: first-call allocations, kernel selection
            reqs = [request(size, size, steps, seed) for seed in range(1, args.repeat + 1)]
            samples = [timed(engine.generate, req) for req in reqs]
            report(f"tiny: {size}x{size} @ {steps} steps, per image", samples)
        engine.close()

    with FakeEngine.from_url("fake://?seconds=0") as fake:
        fake.setup()
        for size in (512, 64):
            samples = [timed(fake.generate, request(size, size, 20, seed)) for seed in range(50)]
            report(f"fake: {size}x{size} generate overhead", samples)


if __name__ == "__main__":
    main()
