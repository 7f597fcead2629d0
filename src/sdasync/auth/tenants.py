"""Tenants and their webhook secrets, sealed at rest.

A tenant is a ``tenant`` record keyed by its name, made when its first key is (``ensure``). It holds the
tenant's Standard Webhooks signing secret, ``whsec_`` + base64 of 32 random bytes, sealed by a ``SecretBox``:
a secret that signs cannot be stored as a hash, so whoever reads the store without the box's key (the key file,
or the KMS key) learns nothing from it.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from sdasync.auth.keys import check_tenant
from sdasync.auth.secretbox import SecretBox
from sdasync.backends.records import Record, RecordStore
from sdasync.errors import RecordConflict, RequestError

KIND = "tenant"
SECRET_PREFIX = "whsec_"  # noqa: S105 (the Standard Webhooks prefix, not a secret)
#: Seconds a process keeps a tenant's opened secret. Senders then cost no read (and no KMS call) per delivery; a
#: rotation reaches every process within this time, and receivers keep accepting the old secret's signatures
#: meanwhile only if they were told both (Standard Webhooks allows several ``v1,`` signatures).
CACHE_S = 5.0
_CAS_ROUNDS = 10
#: After a rotation the old secret signs too, for this long by default: every delivery carries both signatures
#: (Standard Webhooks allows several ``v1,``), so receivers can switch to the new secret without missing events.
ROTATION_OVERLAP_S = 86400.0


def new_webhook_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


class Tenants:
    """Tenant records in a RecordStore; ``box`` seals their webhook secrets."""

    def __init__(self, records: RecordStore, box: SecretBox, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.records = records
        self.box = box
        self.clock = clock
        self._monotonic = monotonic
        self._cache: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def ensure(self, tenant: str) -> str | None:
        """Make the tenant if it does not exist yet. Returns its new webhook secret when it was made now (show it
        once), None when it existed. Raises RequestError for a bad name, ConfigError, BackendError."""
        check_tenant(tenant)
        if self.records.get_record(KIND, tenant) is not None:
            return None
        secret = new_webhook_secret()
        try:
            self.records.put_record(KIND, tenant, self._data(secret), version=None)
        except RecordConflict:
            return None  # made meanwhile by another process, with its own secret
        self._forget(tenant)
        return secret

    def exists(self, tenant: str) -> bool:
        check_tenant(tenant)
        return self.records.get_record(KIND, tenant) is not None

    def rotate_secret(self, tenant: str, *, overlap_s: float = ROTATION_OVERLAP_S) -> str:
        """Replace the tenant's webhook secret with a new one and return it (show it once). The old one keeps
        signing beside it for ``overlap_s`` seconds (0: not at all). Raises RequestError for a bad name, a negative
        overlap or a tenant that does not exist (no key was ever made for it), ConfigError, BackendError."""
        check_tenant(tenant)
        if not overlap_s >= 0:
            raise RequestError("the overlap must be 0 or more seconds", field="overlap")
        for _ in range(_CAS_ROUNDS):
            record = self._record(tenant)
            secret = new_webhook_secret()
            data = {**record.data, **self._data(secret), "created_at": record.data.get("created_at", self.clock())}
            data.pop("previous", None)
            data.pop("previous_until", None)
            if overlap_s > 0:
                data["previous"], data["previous_until"] = record.data["secret"], self.clock() + overlap_s
            try:
                self.records.put_record(KIND, tenant, data, version=record.version)
            except RecordConflict:
                continue
            self._forget(tenant)
            return secret
        raise RecordConflict(f"tenant {tenant} kept changing while its secret was rotated; try again")

    def webhook_secret(self, tenant: str) -> str | None:
        """The tenant's current webhook secret, opened; None when the tenant does not exist."""
        secrets_ = self.webhook_secrets(tenant)
        return secrets_[0] if secrets_ else None

    def webhook_secrets(self, tenant: str) -> list[str]:
        """The secrets that sign the tenant's events, opened: the current one, then the one before it while its
        rotation overlap lasts; empty when the tenant does not exist. Kept in this process for ``CACHE_S``
        seconds (see there). Raises ConfigError (a secret that does not open), BackendError."""
        now = self._monotonic()
        with self._lock:
            cached = self._cache.get(tenant)
        if cached is not None and cached[0] > now:
            return list(cached[1])
        record = self.records.get_record(KIND, tenant) if _valid(tenant) else None
        opened: list[str] = []
        if record is not None:
            opened.append(self.box.open(str(record.data["secret"])).decode("utf-8"))
            until = record.data.get("previous_until")
            if record.data.get("previous") and until is not None and float(until) > self.clock():
                opened.append(self.box.open(str(record.data["previous"])).decode("utf-8"))
        with self._lock:
            self._cache[tenant] = (now + CACHE_S, tuple(opened))
        return opened

    def _record(self, tenant: str) -> Record:
        record = self.records.get_record(KIND, tenant)
        if record is None:
            raise RequestError(f"there is no tenant {tenant!r}: 'sdasync keys create --tenant {tenant}' makes it",
                               field="tenant")
        return record

    def _data(self, secret: str) -> dict[str, Any]:
        now = self.clock()
        return {"secret": self.box.seal(secret.encode("utf-8")), "created_at": now, "rotated_at": now}

    def _forget(self, tenant: str) -> None:
        with self._lock:
            self._cache.pop(tenant, None)


def _valid(tenant: str) -> bool:
    try:
        check_tenant(tenant)
    except RequestError:
        return False
    return True
