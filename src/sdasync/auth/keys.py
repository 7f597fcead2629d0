"""API keys: made once, stored only as a hash, checked on every request, revoked at once everywhere.

A key reads ``sda_<key id>_<secret>``: the key id is 12 random hex digits, public (``keys list`` shows it, logs
may name it), and the secret is 32 random bytes, URL-safe base64 (256 bits). The id in the key lets ``verify``
fetch the one record it needs by a strongly consistent read (``apikey`` records keyed by the id), and lets an
operator revoke by id without ever seeing a key; the id is drawn independently of the secret, so knowing it
helps nobody guess the rest. The record holds the SHA-256 of the whole key, never the key.

``verify`` reads the record on every call, with no cache: a revoke written by one process is seen by the next
request on every other one.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from sdasync.backends.records import Record, RecordStore
from sdasync.errors import RecordConflict, RequestError, Unauthorized
from sdasync.models import TENANT_FORMAT

KIND = "apikey"
PREFIX = "sda_"
#: One message for every way a key can be wrong (missing, malformed, unknown, revoked): no oracle.
UNAUTHORIZED_MESSAGE = "a valid API key is required: Authorization: Bearer <key> (or X-API-Key: <key>)"
_ID_HEX = 12
_MAX_KEY_LENGTH = 100
#: Compared against when the key id is unknown, so that case costs the same hash and comparison as a wrong key.
_NO_HASH = "0" * 64
#: Compare-and-set rounds before a revoke gives up (only a flood of concurrent writes to one key gets there).
_CAS_ROUNDS = 10


@dataclass(frozen=True)
class ApiKey:
    """What a key allows; ``None`` limits mean unlimited."""

    key_id: str
    tenant: str
    #: An operator key: may see across tenants (listings, dead letters, metrics).
    admin: bool = False
    #: Submits per second, refilled continuously (token bucket); None: no rate limit.
    rate: float | None = None
    #: The bucket's size (submits at once after a quiet spell); None: ``max(1, ceil(rate))``.
    burst: int | None = None
    #: The tenant's tasks that may run at once under this key (workers enforce it); None: no cap.
    max_active: int | None = None
    #: The tenant's tasks that may wait in the queue when this key submits; None: no cap.
    max_queued: int | None = None
    created_at: float = 0.0
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def hash_key(presented: str) -> str:
    """The SHA-256 of a key, hex. A fast hash is right here, unlike for passwords: a key is 256 random bits, so
    no dictionary or brute force can invert its hash, and a slow hash would only cost every request CPU."""
    return hashlib.sha256(presented.encode("utf-8")).hexdigest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>``, else ``X-API-Key: <key>`` (header names in any
    case). None when neither is there (or ``Authorization`` holds another scheme and there is no X-API-Key)."""
    bearer: str | None = None
    api_key: str | None = None
    for name, value in headers.items():
        lowered = name.lower()
        if lowered == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif lowered == "x-api-key" and value.strip():
            api_key = value.strip()
    return bearer or api_key


#: The tenant whose webhook secret signs the events of key-less mode's tasks: no key is ever made for it, so no
#: client's tasks share that secret.
LOCAL_TENANT = "local"


def check_tenant(tenant: str) -> str:
    """Return ``tenant`` if it is a valid tenant name (``models.TENANT_FORMAT``); else raise RequestError."""
    if not isinstance(tenant, str) or not TENANT_FORMAT.fullmatch(tenant):
        raise RequestError(f"tenant {tenant!r} is not a valid name: 1 to 63 characters of a-z, 0-9, '_' and '-', "
                           f"starting with a letter or digit", field="tenant")
    return tenant


def check_key_tenant(tenant: str) -> str:
    """``check_tenant``, and not the reserved ``LOCAL_TENANT``: the tenants keys may be made for."""
    if check_tenant(tenant) == LOCAL_TENANT:
        raise RequestError(f"tenant {LOCAL_TENANT!r} is reserved: its secret signs key-less mode's webhooks",
                           field="tenant")
    return tenant


class KeyRing:
    """API keys in a RecordStore (the task store's backend)."""

    def __init__(self, records: RecordStore, *, clock: Callable[[], float] = time.time) -> None:
        self.records = records
        self.clock = clock

    def create(self, tenant: str, *, admin: bool = False, rate: float | None = None, burst: int | None = None,
               max_active: int | None = None, max_queued: int | None = None) -> tuple[str, ApiKey]:
        """A new key for ``tenant``: returns the key (shown once, never stored) and what it allows. Raises
        RequestError (naming the field) for a bad tenant name or limit, BackendError."""
        check_key_tenant(tenant)
        check_limits(rate=rate, burst=burst, max_active=max_active, max_queued=max_queued)
        for _ in range(_CAS_ROUNDS):
            key_id = secrets.token_hex(_ID_HEX // 2)
            presented = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
            api_key = ApiKey(key_id=key_id, tenant=tenant, admin=admin, rate=None if rate is None else float(rate),
                             burst=burst, max_active=max_active, max_queued=max_queued, created_at=self.clock())
            try:
                self.records.put_record(KIND, key_id, _to_data(api_key, hash_key(presented)), version=None)
            except RecordConflict:
                continue  # 48 random bits collided with an existing id: draw another
            return presented, api_key
        raise RecordConflict("could not find a free key id; try again")

    def verify(self, presented: str | None) -> ApiKey:
        """The live key ``presented`` is. Raises Unauthorized, with one message whatever is wrong (missing,
        malformed, unknown, revoked), BackendError."""
        key_id = _key_id_of(presented)
        record = self.records.get_record(KIND, key_id) if key_id else None
        stored = str(record.data.get("hash", _NO_HASH)) if record else _NO_HASH
        # Constant time, so response times do not reveal how much of a guessed key's hash matched.
        matches = hmac.compare_digest(hash_key(presented or ""), stored)
        if record is None or not matches:
            raise Unauthorized(UNAUTHORIZED_MESSAGE)
        api_key = _from_record(record)
        if api_key.revoked:
            raise Unauthorized(UNAUTHORIZED_MESSAGE)
        return api_key

    def get(self, key_id: str) -> ApiKey:
        """The key with that id, revoked or not. Raises RequestError (field ``key_id``) when there is none."""
        return _from_record(self._record(key_id))

    def list(self) -> builtins.list[ApiKey]:
        """Every key, revoked ones included, oldest first. Raises BackendError."""
        keys: list[ApiKey] = []
        cursor: str | None = None
        while True:
            page = self.records.list_records(KIND, limit=1000, cursor=cursor)
            keys.extend(_from_record(record) for record in page.records)
            cursor = page.next_cursor
            if cursor is None:
                return sorted(keys, key=lambda key: (key.created_at, key.key_id))

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke the key (idempotent: a revoked key stays revoked at its first time). Effective at once for
        every process, since ``verify`` never caches. Raises RequestError (field ``key_id``) for an unknown id,
        BackendError."""
        for _ in range(_CAS_ROUNDS):
            record = self._record(key_id)
            api_key = _from_record(record)
            if api_key.revoked:
                return api_key
            revoked = replace(api_key, revoked_at=self.clock())
            try:
                self.records.put_record(KIND, key_id, _to_data(revoked, str(record.data["hash"])),
                                        version=record.version)
            except RecordConflict:
                continue
            return revoked
        raise RecordConflict(f"API key {key_id} kept changing while it was revoked; try again")

    def _record(self, key_id: str) -> Record:
        record = None
        if isinstance(key_id, str) and _is_key_id(key_id):
            record = self.records.get_record(KIND, key_id)
        if record is None:
            raise RequestError(f"no API key has the id {key_id!r} (see 'sdasync keys list')", field="key_id")
        return record


def check_limits(*, rate: float | None = None, burst: int | None = None, max_active: int | None = None,
                 max_queued: int | None = None) -> None:
    """Raise RequestError (naming the field) unless the limits are valid for ``KeyRing.create``."""
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate)
                             or rate <= 0):
        raise RequestError("rate must be a number of submits per second above 0", field="rate")
    for name, value in (("burst", burst), ("max_active", max_active), ("max_queued", max_queued)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RequestError(f"{name} must be a whole number of at least 1", field=name)
    if burst is not None and rate is None:
        raise RequestError("burst sizes the rate limit's bucket: give a rate too", field="burst")


def _is_key_id(text: str) -> bool:
    return len(text) == _ID_HEX and all(c in "0123456789abcdef" for c in text)


def _key_id_of(presented: str | None) -> str | None:
    """The key id inside a well-formed key, else None (without saying why: the caller answers one way)."""
    if not isinstance(presented, str) or len(presented) > _MAX_KEY_LENGTH or not presented.startswith(PREFIX):
        return None
    key_id, sep, secret = presented[len(PREFIX):].partition("_")
    return key_id if sep and secret and _is_key_id(key_id) else None


def _to_data(key: ApiKey, key_hash: str) -> dict[str, Any]:
    return {"hash": key_hash, "tenant": key.tenant, "admin": key.admin, "rate": key.rate, "burst": key.burst,
            "max_active": key.max_active, "max_queued": key.max_queued, "created_at": key.created_at,
            "revoked_at": key.revoked_at}


def _from_record(record: Record) -> ApiKey:
    data = record.data

    def number(name: str) -> float | None:
        value = data.get(name)
        return None if value is None else float(value)

    def whole(name: str) -> int | None:
        value = data.get(name)
        return None if value is None else int(value)

    return ApiKey(key_id=record.key, tenant=str(data.get("tenant", "")), admin=bool(data.get("admin", False)),
                  rate=number("rate"), burst=whole("burst"), max_active=whole("max_active"),
                  max_queued=whole("max_queued"), created_at=float(data.get("created_at", 0.0)),
                  revoked_at=number("revoked_at"))
