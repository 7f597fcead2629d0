"""The service on AWS backends, as a new user would run it against a moto_server: bootstrap, serve, submit."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
from PIL import Image
from test_cli import TERMINAL, readme_curl, wait_status

from conftest import Processes, wait_healthy

pytestmark = pytest.mark.usefixtures("aws_endpoint")


def noise_png_b64(megabytes: float) -> str:
    """A PNG of random pixels (incompressible), about ``megabytes`` large once base64-encoded."""
    side = int((megabytes * 1024 * 1024 * 3 / 4 / 3) ** 0.5)
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=0)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_bootstrap_serve_and_download(procs: Processes, port: int, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    urls = ["--queue", f"sqs://sd-tasks-{suffix}", "--store", f"dynamodb://sd_tasks_{suffix}",
            "--blobs", f"s3://sd-results-{suffix}/results"]
    first = procs.run("aws", "bootstrap", *urls)
    assert first.returncode == 0, first.stderr
    again = procs.run("aws", "bootstrap", *urls)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout

    url = f"http://127.0.0.1:{port}"
    serve = procs.start("serve", "--port", str(port), "--data-dir", str(tmp_path / "local"), *urls, name="serve")
    health = wait_healthy(url, serve)
    assert health["queue"]["ok"] is True  # type: ignore[index]

    command = [re.sub(r"^https?://[^/]+", url, part) if part.startswith("http") else part for part in readme_curl()]
    answer = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    task_id = json.loads(answer.stdout)["taskId"]
    done = wait_status(url, task_id, TERMINAL, timeout=180)
    assert done["status"] == "succeeded", (done, procs.log("serve"))
    (image_url,) = done["result"]["images"]
    assert "X-Amz-Signature=" in image_url  # presigned, minted when read
    image = httpx.get(image_url, timeout=10)
    assert image.status_code == 200, image.text
    assert Image.open(io.BytesIO(image.content)).size == (512, 512)

    # The task item holds plain attributes keyed by taskId, never DynamoDB-typed JSON in a string.
    item = boto3.client("dynamodb").get_item(TableName=f"sd_tasks_{suffix}", Key={"taskId": {"S": task_id}})["Item"]
    assert item["status"] == {"S": "succeeded"}
    assert "M" in item["payload"]
    assert item["payload"]["M"]["steps"] == {"N": "20"}
    assert "M" in item["info"]

    # A 10 MB img2img request: the payload goes to S3, the item and the message stay small.
    big = {"api": "/sdapi/v1/img2img", "payload": {"prompt": "a castle", "init_images": [noise_png_b64(10)],
                                                   "steps": 4, "width": 64, "height": 64,
                                                   "denoising_strength": 0.5}}
    body = json.dumps(big).encode()
    assert len(body) > 10 * 1024 * 1024
    submitted = httpx.post(f"{url}/task", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert submitted.status_code == 202, submitted.text
    big_id = submitted.json()["taskId"]
    big_done = wait_status(url, big_id, TERMINAL, timeout=180)
    assert big_done["status"] == "succeeded", (big_done, procs.log("serve"))
    assert Image.open(io.BytesIO(httpx.get(big_done["result"]["images"][0], timeout=10).content)).size == (64, 64)
    big_item = boto3.client("dynamodb").get_item(TableName=f"sd_tasks_{suffix}", Key={"taskId": {"S": big_id}})
    assert len(json.dumps(big_item["Item"])) < 16 * 1024
