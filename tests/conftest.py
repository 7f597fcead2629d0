"""Session-wide test setup: never reach the network for models; a moto_server for the AWS backends."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def aws_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto_server process for the whole session; the environment points boto3 at it while it runs."""
    pytest.importorskip("boto3")
    from aws_server import aws_environment, moto_server

    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        saved = {key: os.environ.get(key) for key in aws_environment(endpoint)}
        os.environ.update(aws_environment(endpoint))
        try:
            yield endpoint
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
