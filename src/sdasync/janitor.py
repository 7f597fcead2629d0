"""The janitor: deletes finished tasks, their stored request payloads and their images past the retention period.

One pass is ``purge(backends, retention_s=...)``; ``maintenance.Maintenance`` runs it periodically inside
``serve`` / ``api``. Only terminal tasks (succeeded, failed, cancelled) whose last change is older than the
retention go; a queued or running task is never touched, however old.

Order per task: the task record first, by a conditional delete (still terminal, still unchanged since the
cutoff), then its image blobs and its stored payload. So a task an operator redrove meanwhile keeps everything,
and a task never points at images that are gone; a blob whose delete fails (or a crash between the two) is left
behind, and the sweep of unreferenced files below, or the S3 lifecycle rule, removes it later.

What expires by itself is left alone: a task store with the ``expires`` capability (DynamoDB with TTL) deletes
its tasks, a blob store with ``expires`` (S3 with a lifecycle rule) its blobs. File blob stores also get a sweep by
age (``FileBlobStore.expire``) for blobs left behind, such as the payload of a submit whose message could not be
sent: files older than the retention plus a margin (a day) go, whoever refers to them. A task still waiting that
long (the sweeper re-sends, and gives up on, stranded work long before) would lose its payload, as on S3, whose
lifecycle rule counts from each object's creation too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from sdasync.backends.base import BlobStore
from sdasync.errors import SdasyncError
from sdasync.models import TERMINAL, Task, TaskStatus
from sdasync.service import LEGACY_PAYLOAD_REF, PAYLOAD_REF, Backends

log = logging.getLogger(__name__)

#: Files no task refers to are deleted this long after the retention period, so a task that is still waiting
#: (queued for days, then redriven) keeps its payload.
ORPHAN_MARGIN_S = 86_400.0
#: Tasks read from the store per batch.
BATCH = 100


@runtime_checkable
class ExpiringDeadLetters(Protocol):
    """A queue whose dead letters are kept until deleted (``SqliteQueue``; SQS's expire by its own retention)."""

    def expire_dead_letters(self, before: float) -> int: ...


@runtime_checkable
class ExpiringBlobStore(Protocol):
    """A blob store that can delete blobs by age (``FileBlobStore``)."""

    def expire(self, before: float) -> int: ...


@dataclass
class PurgeReport:
    """What one pass deleted, and how many tasks it had to leave for the next pass because a delete failed. The
    pass counts into it as it goes."""

    tasks: int = 0
    images: int = 0
    payloads: int = 0
    #: Files deleted by age that no task referred to.
    orphans: int = 0
    #: Dead letters past the retention.
    dead_letters: int = 0
    errors: int = 0

    def __bool__(self) -> bool:
        return any((self.tasks, self.images, self.payloads, self.orphans, self.dead_letters, self.errors))


def purge(backends: Backends, *, retention_s: float, now: float | None = None, limit: int = BATCH,
          orphan_margin_s: float = ORPHAN_MARGIN_S) -> PurgeReport:
    """Delete terminal tasks last changed more than ``retention_s`` before ``now``, then their blobs; then files
    older than the retention plus ``orphan_margin_s`` in file blob stores, and dead letters past the retention.
    Never raises for a backend's failure: it is logged and counted in ``errors``, and the next pass tries again."""
    if retention_s < 0:
        raise ValueError(f"retention_s must be >= 0, not {retention_s}")
    now = time.time() if now is None else now
    cutoff = now - retention_s
    tally = PurgeReport()
    if "expires" not in backends.store.capabilities:
        for status in sorted(TERMINAL):
            _purge_status(backends, status, cutoff, limit, tally)
    _expire_files(backends, cutoff - orphan_margin_s, tally)
    _expire_dead_letters(backends, cutoff, tally)
    return tally


def _expire_dead_letters(backends: Backends, before: float, tally: PurgeReport) -> None:
    """Dead letters past the retention: their tasks are gone by now (a failed task is purged after the same
    retention), and left alone they would crowd out the sweeper's view of the dead-letter queue."""
    queue = backends.queue
    if not isinstance(queue, ExpiringDeadLetters):
        return
    try:
        tally.dead_letters += queue.expire_dead_letters(before)
    except SdasyncError as exc:
        log.warning("janitor: cannot expire dead letters: %s", exc)
        tally.errors += 1


def _purge_status(backends: Backends, status: TaskStatus, cutoff: float, limit: int, tally: PurgeReport) -> None:
    seen: set[str] = set()
    while True:
        try:
            batch = backends.store.stale(status=status, updated_before=cutoff, limit=limit)
        except SdasyncError as exc:
            log.warning("janitor: cannot list %s tasks: %s", status, exc)
            tally.errors += 1
            return
        fresh = [task for task in batch if task.task_id not in seen]
        for task in fresh:
            seen.add(task.task_id)
            _purge_task(backends, task, cutoff, tally)
        # A short batch is the last one; a batch of tasks already tried (their deletes failed) would repeat.
        if len(batch) < limit or not fresh:
            return


def _purge_task(backends: Backends, listed: Task, cutoff: float, tally: PurgeReport) -> None:
    try:
        # The delete is conditional (still terminal, still unchanged since the cutoff), so a task an operator
        # redrove since it was listed stays, with its payload. Its blobs go only once it is gone: a task never
        # points at missing images, and a blob whose delete fails is expired later as an orphan.
        if not backends.store.delete(listed.task_id, finished_before=cutoff):
            return
        images = _delete_blobs(backends.blobs, listed.images)
        payloads = _delete_blobs(backends.payloads, _refs(listed, PAYLOAD_REF))
        payloads += _delete_blobs(backends.blobs, _refs(listed, LEGACY_PAYLOAD_REF))
    except SdasyncError as exc:
        log.warning("janitor: task %s left for the next pass: %s", listed.task_id, exc)
        tally.errors += 1
        return
    tally.tasks += 1
    tally.images += images
    tally.payloads += payloads


def _refs(task: Task, name: str) -> tuple[str, ...]:
    ref = task.extra.get(name)
    return (str(ref),) if ref else ()


def _delete_blobs(blobs: BlobStore, keys: tuple[str, ...]) -> int:
    """Delete ``keys`` unless the store expires blobs by itself; how many deletes were issued."""
    if "expires" in blobs.capabilities:
        return 0
    for key in keys:
        blobs.delete(key)
    return len(keys)


def _expire_files(backends: Backends, before: float, tally: PurgeReport) -> None:
    stores: list[BlobStore] = [backends.blobs]
    if backends.payloads is not backends.blobs:
        stores.append(backends.payloads)
    for store in stores:
        if isinstance(store, ExpiringBlobStore) and "expires" not in store.capabilities:
            try:
                tally.orphans += store.expire(before)
            except SdasyncError as exc:
                log.warning("janitor: cannot expire old files: %s", exc)
                tally.errors += 1
