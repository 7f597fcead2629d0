"""A chaos run: worker processes on real backends, killed and stopped at random while tasks flow; then the books
must balance. Used by test_fault_injection.py for each backend family."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sdasync.config import Settings
from sdasync.errors import BlobNotFound, TaskConflict
from sdasync.models import Outcome, Task, TaskStatus
from sdasync.service import Backends, TaskService

#: SIGKILL points inside the worker (see sdasync.worker.faults) and their rates.
FAULTS = "received:0.02,claimed:0.04,generating:0.02,uploaded:0.06,completed:0.06"
FAULT_ERRORS = "upload:0.08"


@dataclass
class Chaos:
    settings: Settings
    backend_args: list[str]
    log_dir: Path
    workers: int = 4
    tasks: int = 40
    seed: int = 7
    engine: str = "fake://?seconds=0.3&fail_rate=0.15"
    visibility_timeout: int = 2
    max_attempts: int = 4
    imds_url: str | None = None
    counts: Counter[str] = field(default_factory=Counter)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def _spawn(self, index: int, *, spot: bool = False) -> subprocess.Popen[bytes]:
        env = {**os.environ, "SDASYNC_FAULTS": FAULTS, "SDASYNC_FAULT_ERRORS": FAULT_ERRORS,
               "SDASYNC_FAULT_SEED": f"{self.seed}-{index}", "PYTHONUNBUFFERED": "1"}
        env.pop("SDASYNC_IMDS_URL", None)
        if spot and self.imds_url:
            env["SDASYNC_IMDS_URL"] = self.imds_url
        log = (self.log_dir / f"worker-{index}.log").open("ab")
        command = [sys.executable, "-m", "sdasync", "worker", *self.backend_args, "--engine", self.engine,
                   "--visibility-timeout", str(self.visibility_timeout), "--max-attempts", str(self.max_attempts),
                   "--drain-timeout", "1", "--log-level", "INFO"]
        self.counts["workers started"] += 1
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def run(self, backends: Backends, *, timeout_s: float = 100.0, spot_notice: Any = None) -> list[Task]:
        rng = random.Random(self.seed)
        service = TaskService(backends)
        bodies = [{"api": "/sdapi/v1/txt2img", "payload": {"prompt": f"task {i}", "steps": 6, "width": 64,
                                                           "height": 64, "batch_size": 1 + i % 3}}
                  for i in range(self.tasks)]
        ids = [service.submit(body).task_id for body in bodies]
        for task_id in rng.sample(ids, k=max(1, self.tasks // 8)):  # duplicate deliveries, as SQS may make
            backends.queue.send(task_id)
            self.counts["duplicate messages"] += 1
        to_cancel = set(rng.sample(ids, k=max(1, self.tasks // 10)))
        slots = [self._spawn(i) for i in range(self.workers)]
        self.processes = list(slots)
        spawned = self.workers
        deadline = time.monotonic() + timeout_s
        spot_sent = False
        try:
            while time.monotonic() < deadline:
                tasks = [service.get(task_id) for task_id in ids]
                if all(t.status.is_terminal for t in tasks):
                    break
                for task_id in list(to_cancel):
                    if rng.random() < 0.1:
                        to_cancel.discard(task_id)
                        try:
                            service.cancel(task_id)
                            self.counts["cancel requests"] += 1
                        except TaskConflict:
                            pass
                for i, process in enumerate(slots):
                    code = process.poll()
                    if code is not None:
                        self.counts[_exit_kind(code)] += 1
                        spawned += 1
                        slots[i] = self._spawn(spawned)
                        self.processes.append(slots[i])
                    elif rng.random() < 0.02:
                        process.kill()
                        self.counts["external SIGKILL"] += 1
                    elif rng.random() < 0.02:
                        process.send_signal(signal.SIGTERM)
                        self.counts["SIGTERM"] += 1
                if spot_notice is not None and not spot_sent and time.monotonic() > deadline - timeout_s + 5:
                    spawned += 1
                    spotted = self._spawn(spawned, spot=True)
                    self.processes.append(spotted)
                    slots.append(spotted)
                    spot_notice()
                    spot_sent = True
                    self.counts["spot notices"] += 1
                time.sleep(0.2)  # the chaos loop's pace, not a wait for a result
        finally:
            for process in self.processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in self.processes:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        return [service.get(task_id) for task_id in ids]


def _exit_kind(code: int) -> str:
    if code == -signal.SIGKILL:
        return "worker deaths by SIGKILL (injected or external)"
    if code == 0:
        return "workers drained and exited"
    return f"worker exits with {code}"


def audit(tasks: list[Task], backends: Backends, counts: Counter[str]) -> Counter[str]:
    """Every task ends in exactly one terminal status with exactly its images; returns the counts to print."""
    statuses = Counter(t.status.value for t in tasks)
    counts["tasks lost"] = sum(1 for t in tasks if t is None)
    counts["tasks stuck (queued or running)"] = sum(1 for t in tasks if not t.status.is_terminal)
    counts["tasks with duplicated or missing results"] = sum(1 for t in tasks if not _results_exact(t, backends))
    for task in tasks:
        history = task.history
        counts["retries"] += sum(1 for h in history if h.outcome is Outcome.RETRIED)
        counts["lost attempts (worker died)"] += sum(1 for h in history if h.outcome is Outcome.LOST)
        counts["released attempts (drain)"] += sum(1 for h in history if h.outcome is Outcome.RELEASED)
        if task.status is TaskStatus.SUCCEEDED:
            # The write that made it succeed came from the attempt that holds it, not from a fenced-off one.
            assert history and history[-1].outcome is Outcome.SUCCEEDED, history
            assert history[-1].attempt == task.attempts, (history, task.attempts)
            assert task.info is not None and task.info["all_seeds"][0] == task.payload["seed"]
        elif task.status is TaskStatus.FAILED:
            assert task.error is not None and task.error.code, task
    counts.update({f"tasks {status}": n for status, n in statuses.items()})
    counts["tasks"] = len(tasks)
    assert counts["tasks lost"] == 0
    assert counts["tasks stuck (queued or running)"] == 0, [t for t in tasks if not t.status.is_terminal]
    assert counts["tasks with duplicated or missing results"] == 0
    return counts


def _results_exact(task: Task, backends: Backends) -> bool:
    """Succeeded: exactly ``batch_size`` images under their keys, decodable, no extra one. Otherwise none."""
    if task.status is not TaskStatus.SUCCEEDED:
        return task.images == ()
    images = int(task.payload["batch_size"])
    if task.images != tuple(f"{task.task_id}/{i}.png" for i in range(images)):
        return False
    for key in task.images:
        if Image.open(io.BytesIO(backends.blobs.get(key))).size != (64, 64):
            return False
    try:
        backends.blobs.get(f"{task.task_id}/{images}.png")
    except BlobNotFound:
        return True
    return False
