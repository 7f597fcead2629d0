"""Fixtures that run every contract suite once per backend in the factory tables of ``backends.py``.

``open_queue()`` (and ``open_store()``, ``open_blobs()``) opens another handle on the same backend, as a second
worker would; every handle is closed when the test ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from sdasync.backends.base import BlobStore, Queue, TaskStore

from .backends import BLOB_FACTORIES, NEEDS_AWS, QUEUE_FACTORIES, STORE_FACTORIES, FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def backend_dir(tmp_path: Path) -> Path:
    # A directory that does not exist yet: backends must create what they need.
    return tmp_path / "backend"


@pytest.fixture(params=sorted(QUEUE_FACTORIES))
def queue_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    if kind in NEEDS_AWS:
        request.getfixturevalue("aws_endpoint")
    return kind


@pytest.fixture
def open_queue(queue_kind: str, backend_dir: Path, clock: FakeClock) -> Iterator[Callable[[], Queue]]:
    with ExitStack() as stack:
        yield lambda: stack.enter_context(QUEUE_FACTORIES[queue_kind](backend_dir, clock))


@pytest.fixture
def queue(open_queue: Callable[[], Queue]) -> Queue:
    return open_queue()


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    if kind in NEEDS_AWS:
        request.getfixturevalue("aws_endpoint")
    return kind


@pytest.fixture
def open_store(store_kind: str, backend_dir: Path, clock: FakeClock) -> Iterator[Callable[[], TaskStore]]:
    with ExitStack() as stack:
        yield lambda: stack.enter_context(STORE_FACTORIES[store_kind](backend_dir, clock))


@pytest.fixture
def store(open_store: Callable[[], TaskStore]) -> TaskStore:
    return open_store()


@pytest.fixture(params=sorted(BLOB_FACTORIES))
def blobs_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    if kind in NEEDS_AWS:
        request.getfixturevalue("aws_endpoint")
    return kind


@pytest.fixture
def open_blobs(blobs_kind: str, backend_dir: Path, clock: FakeClock) -> Iterator[Callable[[], BlobStore]]:
    with ExitStack() as stack:
        yield lambda: stack.enter_context(BLOB_FACTORIES[blobs_kind](backend_dir, clock))


@pytest.fixture
def blobs(open_blobs: Callable[[], BlobStore]) -> BlobStore:
    return open_blobs()
