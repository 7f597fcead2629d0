"""Fault injection: worker processes SIGKILLed at every step of a task's life, SIGTERMed, told of a spot
interruption, failing engines and blob stores, duplicate deliveries and cancels, on SQLite and on the AWS
backends (moto_server). Afterwards every task is in exactly one terminal state with exactly its images.

Each run prints its counts (tasks, kills, retries, terminal statuses), past pytest's output capture.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Chaos, audit

from sdasync.config import Settings
from sdasync.service import open_backends
from sdasync.urls import url_for_path

pytestmark = pytest.mark.slow


def report(name: str, counts: dict[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    # Printed past pytest's capture: the counts are part of what this suite shows, in `make test` too.
    with capsys.disabled():
        print(f"\n[fault injection: {name}]")
        for key in sorted(counts):
            print(f"  {key:48} {counts[key]}")


@pytest.fixture
def imds() -> Iterator[object]:
    from imds_server import ImdsServer

    with ImdsServer() as server:
        yield server


def test_sqlite_backends(tmp_path: Path, imds: object, capsys: pytest.CaptureFixture[str]) -> None:
    db = url_for_path("sqlite", tmp_path / "sdasync.db")
    settings = Settings(data_dir=tmp_path, queue=db, store=db, blobs=url_for_path("file", tmp_path / "results"))
    chaos = Chaos(settings=settings, log_dir=tmp_path, imds_url=imds.url,  # type: ignore[attr-defined]
                  backend_args=["--data-dir", str(tmp_path), "--queue", db, "--store", db,
                                "--blobs", settings.blobs_url])
    with open_backends(settings) as backends:
        tasks = chaos.run(backends, spot_notice=imds.interrupt)  # type: ignore[attr-defined]
        counts = audit(tasks, backends, chaos.counts)
    report("sqlite", counts, capsys)
    assert counts["worker deaths by SIGKILL (injected or external)"] > 0  # the chaos really happened
    assert counts["tasks succeeded"] > 0


@pytest.mark.usefixtures("aws_endpoint")
def test_aws_backends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(data_dir=tmp_path, queue=f"sqs://chaos-{suffix}?wait=1", store=f"dynamodb://chaos_{suffix}",
                        blobs=f"s3://chaos-{suffix}/results")
    from sdasync.bootstrap import bootstrap

    bootstrap({"queue": settings.queue, "store": settings.store, "blobs": settings.blobs})
    chaos = Chaos(settings=settings, log_dir=tmp_path, tasks=24,
                  backend_args=["--data-dir", str(tmp_path), "--queue", settings.queue_url,
                                "--store", settings.store_url, "--blobs", settings.blobs_url])
    with open_backends(settings) as backends:
        tasks = chaos.run(backends)
        counts = audit(tasks, backends, chaos.counts)
    report("aws (moto_server)", counts, capsys)
    assert counts["tasks succeeded"] > 0


