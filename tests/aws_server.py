"""A real ``moto_server`` process on a free loopback port, for the AWS backends' tests.

The tests talk to it over HTTP exactly as to AWS: boto3 finds it through ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from helpers import free_port, wait_until


#: What the AWS backends need in the environment to reach moto (credentials are fake; moto accepts any).
def aws_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }


@contextmanager
def moto_server(log_path: Path) -> Iterator[str]:
    """Start moto_server, wait until it answers, yield its endpoint URL, stop it."""
    port = free_port()
    script = Path(sys.executable).with_name("moto_server")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    with log_path.open("ab") as log:
        process = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, "MOTO_CALL_RESET_API": "true"})
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, f"moto_server exited with {process.returncode}: {log_path.read_text()}"
        try:
            return httpx.get(f"{endpoint}/moto-api/", timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=60, interval=0.05, message="moto_server did not start")
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
