"""The backends the contract suites run against: one factory per URL scheme of ``sdasync.backends.registry``.

To put a new backend under the contracts, add its factory to the table of its role, keyed by its scheme; the
suites in this folder then run against it unchanged, and ``test_registry_coverage`` fails until every registered
scheme has an entry.

A factory is ``factory(directory, clock)`` and returns a context manager that yields a ready backend. Rules:

- Deterministic in ``directory``: called again with the same directory, in this process or another, it opens the
  same queue, table or bucket. Tests rely on this for a second handle (another thread, another process). Remote
  backends derive their resource names from the directory (e.g. a hash of it).
- Backends that accept an injected clock get ``clock``, and tests then move time instantly with
  ``clock.advance()``. A factory whose backend reads real time (SQS, DynamoDB, ...) calls
  ``clock.use_real_time()``, and ``advance()`` then sleeps.
- Queues use ``MAX_RECEIVES`` as their maximum receive count and poll often (tests wait on them).

This module must import without pytest and without ``tests/`` being a package: ``test_queue_contract`` loads it
in subprocesses as ``contract.backends``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from sdasync.backends.base import BlobStore, Queue, TaskStore
from sdasync.backends.local.files import FileBlobStore
from sdasync.backends.sqlite.queue import SqliteQueue
from sdasync.backends.sqlite.store import SqliteTaskStore

#: Every contract queue dead-letters a message on the receive after its third.
MAX_RECEIVES = 3


class FakeClock:
    """Time for contract tests: a manual clock, or the real one for backends that cannot take a clock."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._real = False
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return time.time() if self._real else self._now

    @property
    def is_real(self) -> bool:
        return self._real

    def use_real_time(self) -> None:
        self._real = True

    def advance(self, seconds: float) -> None:
        if self._real:
            time.sleep(seconds)
            return
        with self._lock:
            self._now += seconds


QueueFactory = Callable[[Path, FakeClock], AbstractContextManager[Queue]]
StoreFactory = Callable[[Path, FakeClock], AbstractContextManager[TaskStore]]
BlobFactory = Callable[[Path, FakeClock], AbstractContextManager[BlobStore]]


@contextmanager
def sqlite_queue(directory: Path, clock: FakeClock) -> Iterator[Queue]:
    with SqliteQueue(path=directory / "sdasync.db", max_receives=MAX_RECEIVES, poll_interval=0.02,
                     clock=clock) as queue:
        yield queue


@contextmanager
def sqlite_store(directory: Path, clock: FakeClock) -> Iterator[TaskStore]:
    with SqliteTaskStore(path=directory / "sdasync.db", clock=clock) as store:
        yield store


@contextmanager
def file_blobs(directory: Path, clock: FakeClock) -> Iterator[BlobStore]:
    with FileBlobStore(root=directory / "results") as blobs:
        yield blobs


def aws_name(directory: Path, prefix: str) -> str:
    """A resource name unique to the test's directory and stable across processes (queue, table, bucket)."""
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return f"{prefix}-{digest}"


@contextmanager
def sqs_queue(directory: Path, clock: FakeClock) -> Iterator[Queue]:
    # Imported here: the embedded backends' tests must not need boto3.
    from sdasync.backends.aws.sqs import SqsQueue

    clock.use_real_time()
    with SqsQueue(queue=aws_name(directory, "q"), max_receives=MAX_RECEIVES, wait_s=1) as queue:
        queue.ensure()
        yield queue


@contextmanager
def dynamodb_store(directory: Path, clock: FakeClock) -> Iterator[TaskStore]:
    from sdasync.backends.aws.dynamodb import DynamoTaskStore

    clock.use_real_time()
    with DynamoTaskStore(table=aws_name(directory, "tasks")) as store:
        store.ensure()
        yield store


@contextmanager
def s3_blobs(directory: Path, clock: FakeClock) -> Iterator[BlobStore]:
    from sdasync.backends.aws.s3 import S3BlobStore

    with S3BlobStore(bucket=aws_name(directory, "results"), prefix="results") as blobs:
        blobs.ensure()
        yield blobs


#: Backends that need the session's moto_server (the ``aws_endpoint`` fixture).
NEEDS_AWS = frozenset({"sqs", "dynamodb", "s3"})

QUEUE_FACTORIES: dict[str, QueueFactory] = {"sqlite": sqlite_queue, "sqs": sqs_queue}
STORE_FACTORIES: dict[str, StoreFactory] = {"sqlite": sqlite_store, "dynamodb": dynamodb_store}
BLOB_FACTORIES: dict[str, BlobFactory] = {"file": file_blobs, "s3": s3_blobs}
