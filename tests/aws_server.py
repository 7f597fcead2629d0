"""A real moto server process on a loopback port the OS picked, for the AWS backends' tests.

The tests talk to it over HTTP exactly as to AWS: boto3 finds it through ``AWS_ENDPOINT_URL``. The process is
``tests/moto_serial.py``, moto's own WSGI app with DynamoDB requests serialized the way DynamoDB makes a
conditional write atomic (its docstring says why), rather than plain ``moto_server``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from helpers import wait_until

LAUNCHER = Path(__file__).with_name("moto_serial.py")


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
    """Start the serializing moto server, wait until it answers, yield its endpoint URL, stop it."""
    port_file = log_path.with_name(log_path.name + ".port")
    port_file.unlink(missing_ok=True)
    # Port 0: the launcher binds a port the OS picks and reports it, so no other process can take it first.
    command = [sys.executable, str(LAUNCHER), "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "MOTO_CALL_RESET_API": "true"})

    def bound() -> str:
        assert process.poll() is None, f"moto server exited with {process.returncode}: {log_path.read_text()}"
        text = port_file.read_text().strip() if port_file.exists() else ""
        return f"http://127.0.0.1:{int(text)}" if text else ""

    try:
        # Importing moto takes seconds, many more on a loaded machine: generous, but bounded.
        endpoint = wait_until(bound, timeout=120, interval=0.05, message="moto server did not bind a port")

        def up() -> bool:
            assert process.poll() is None, f"moto server exited with {process.returncode}: {log_path.read_text()}"
            try:
                return httpx.get(f"{endpoint}/moto-api/", timeout=5).status_code < 500
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=60, interval=0.05, message="moto server bound its port but does not answer")
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
