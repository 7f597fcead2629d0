"""Runs the ``sdasync`` CLI as real processes on free loopback ports, and always cleans them up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import free_port, wait_until

#: Each started process's log file, so that a failure message can show why a server died.
_LOGS: dict[int, Path] = {}


def log_tail(process: subprocess.Popen[bytes], chars: int = 4000) -> str:
    path = _LOGS.get(process.pid)
    if path is None or not path.exists():
        return "(no log)"
    return path.read_text(errors="replace")[-chars:]


class Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        path = self.log_dir / f"{name}.log"
        with path.open("ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "sdasync", *args], stdout=log,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _LOGS[process.pid] = path
        self.started.append(process)
        return process

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        return subprocess.run([sys.executable, "-m", "sdasync", *args], capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                # The whole session: serve's worker children included.
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, object]:
    def healthy() -> dict[str, object] | None:
        assert process.poll() is None, f"server exited with {process.returncode}:\n{log_tail(process)}"
        try:
            response = httpx.get(f"{url}/healthz", timeout=2)
        except httpx.HTTPError:
            return None
        body: dict[str, object] = response.json()
        return body if response.status_code == 200 else None

    return wait_until(healthy, timeout=timeout, interval=0.05, message=f"{url} never became healthy")


@pytest.fixture
def port() -> int:
    return free_port()
