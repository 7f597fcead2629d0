"""Control-plane overhead on the embedded backends: submit latency through the HTTP API and the time a worker
spends per task outside the engine (receive, claim, store images, complete, acknowledge), with ``fake://`` drawing
512x512 PNGs at zero cost.

    .venv/bin/python bench/bench_service.py [--tasks 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from sdasync.api.app import create_app
from sdasync.backends.registry import open_engine
from sdasync.config import Settings
from sdasync.models import TaskStatus
from sdasync.service import open_backends
from sdasync.worker.loop import Worker, WorkerConfig

BODY = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "benchmark", "steps": 20}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        latencies = []
        with TestClient(create_app(settings)) as client:
            for _ in range(args.tasks):
                start = time.perf_counter()
                response = client.post("/task", json=BODY)
                latencies.append(time.perf_counter() - start)
                assert response.status_code == 202
        with open_backends(settings) as backends, open_engine("fake://") as engine:
            worker = Worker(queue=backends.queue, store=backends.store, blobs=backends.blobs,
                            payloads=backends.payloads, engine=engine, config=WorkerConfig(wait_s=0))
            engine.setup()
            start = time.perf_counter()
            handled = worker.run(burst=True)
            elapsed = time.perf_counter() - start
            page = backends.store.list(status=TaskStatus.SUCCEEDED, limit=1000)
            assert handled == args.tasks == len(page.tasks)
    latencies.sort()
    print(f"POST /task (in-process HTTP, sqlite): p50 {statistics.median(latencies) * 1000:.2f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.2f} ms over {args.tasks} requests")
    print(f"worker, fake engine 512x512: {elapsed / args.tasks * 1000:.2f} ms per task "
          f"({args.tasks / elapsed:.1f} tasks/s, PNG encoding included)")


if __name__ == "__main__":
    main()
