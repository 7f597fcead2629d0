"""``Idempotency-Key`` on ``POST /task``: the same key and body within the retention give back the original task.

A key is claimed by creating a record (kind ``idem``, key ``<tenant>#<sha256 of the header>``) that names the
task about to be created and a hash of the body. The create is a compare-and-set, so of any number of concurrent
requests with one key, across processes, exactly one claims it and submits; the others read the record and
return its task (waiting a moment for it to be written: the winner sends the message, then writes the task). A
different body under a claimed key is refused. A claim whose task has not appeared after ``TAKEOVER_S`` (its
process died between the claim and the write, or is very slow) is taken over under the SAME task id: if the first
request does write its task after all, the two writes collide on the id and the later one answers as a replay
(``TaskService.submit_request``), so one key never makes two tasks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdasync.backends.records import Record, RecordStore
from sdasync.errors import RecordConflict, RequestError

KIND = "idem"
MAX_KEY_CHARS = 255
#: A claim this old whose task was never written is taken over by the next request with the key.
TAKEOVER_S = 30.0


def body_hash(body: Any) -> str:
    """A hash of the request body as JSON with sorted keys: key order and whitespace do not make it another."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Claim:
    #: The task this key names: ours to create when ``owner``, else the original's.
    task_id: str
    owner: bool
    record: Record


class Idempotency:
    def __init__(self, records: RecordStore, *, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.records = records
        self.ttl_s = ttl_s
        self.clock = clock

    @staticmethod
    def check_key(key: str) -> str:
        if not key or len(key) > MAX_KEY_CHARS or not key.isprintable() or not key.isascii():
            raise RequestError(f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable ASCII characters",
                               field="idempotency-key")
        return key

    def _record_key(self, tenant: str, key: str) -> str:
        return f"{tenant or '-'}#{hashlib.sha256(key.encode()).hexdigest()[:48]}"

    def claim(self, tenant: str, key: str, digest: str, task_id: str) -> Claim:
        """Claim ``key`` for ``task_id``, or find the task that holds it. Raises RequestError (field
        ``idempotency-key``) when the key holds another body, BackendError."""
        record_key = self._record_key(tenant, self.check_key(key))
        for _ in range(5):
            now = self.clock()
            data = {"body": digest, "task_id": task_id, "at": now}
            try:
                record = self.records.put_record(KIND, record_key, data, version=None, expires_at=now + self.ttl_s)
                return Claim(task_id=task_id, owner=True, record=record)
            except RecordConflict as exc:
                current = exc.current
            if current is None:
                continue  # it expired or was released meanwhile: try to claim it again
            if current.data.get("body") != digest:
                raise RequestError("this Idempotency-Key was used with a different request body",
                                   field="idempotency-key")
            return Claim(task_id=str(current.data["task_id"]), owner=False, record=current)
        raise RequestError("this Idempotency-Key keeps changing hands; try again", field="idempotency-key")

    def take_over(self, claim: Claim) -> Claim | None:
        """Own a stale claim (its task not written), keeping its task id; None when someone else took it first."""
        now = self.clock()
        data = {**claim.record.data, "at": now}
        try:
            record = self.records.put_record(KIND, claim.record.key, data, version=claim.record.version,
                                             expires_at=now + self.ttl_s)
        except RecordConflict:
            return None
        return Claim(task_id=claim.task_id, owner=True, record=record)

    def stale(self, claim: Claim) -> bool:
        return self.clock() - float(claim.record.data.get("at", 0.0)) > TAKEOVER_S

    def release(self, claim: Claim) -> None:
        """Give up our claim (the submission failed before anything was sent), so a retry can make the task."""
        if claim.owner:
            self.records.delete_record(KIND, claim.record.key, version=claim.record.version)
