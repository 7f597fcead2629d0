"""What ``DynamoTaskStore.ensure()`` (``sdasync aws bootstrap``) creates: the table, its six indexes and TTL.

- the table: partition key ``taskId`` (string), on-demand billing;
- ``byCreated`` (partition ``listAll``, sort ``listKey``, projection ALL): every task newest first, and, under the
  partitions ``listAll = "workers"`` and ``"rec#<kind>"``, the worker registry and the records of each kind;
- ``byStatus`` (partition ``status``, sort ``listKey``, projection ALL): the tasks of one status, newest first;
- ``byUpdated`` (partition ``status``, sort ``updatedAt``, a number; projection KEYS_ONLY): the tasks of one status
  that have not changed since a time, oldest first, for the sweeper (``stale``). Keys only, because the sweeper
  reads a few ids per minute and a third full copy of every item would cost a write per task change for nothing;
- ``byTenant`` (partition ``tenant``, sort ``listKey``, ALL) and ``byTenantStatus`` (partition ``tenantStatus``, sort
  ``listKey``, ALL): one tenant's tasks newest first, of any status or of one;
- ``byOutboxDue`` (partition ``outboxPart``, sort ``outboxDue``, a number; KEYS_ONLY): a sparse index of the tasks
  whose webhook outbox is due, soonest first, for the dispatcher (``due_outbox``);
- TTL on ``expiresAt``.

An index missing from an existing table (one made by hand, or by an older version) is added, one per UpdateTable as
DynamoDB requires, and backfilled from the items that carry its keys. Items written before tenants existed carry
no ``tenant``: they are in no tenant listing until their next transition writes it (as tenant "", the only one
they can have). Run again on a ready table, ``ensure_table`` only reads.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

from botocore.exceptions import ClientError

from sdasync.awsclient import error_code
from sdasync.backends.aws.dynamo_items import (
    EXPIRES_AT,
    INDEX_ALL,
    INDEX_OUTBOX,
    INDEX_STATUS,
    INDEX_TENANT,
    INDEX_TENANT_STATUS,
    INDEX_UPDATED,
    KEY,
    LIST_ALL_ATTR,
    LIST_KEY,
    OUTBOX_DUE,
    OUTBOX_PART,
    TENANT,
    TENANT_STATUS,
    UPDATED_AT,
)
from sdasync.errors import BackendError, ConfigError

#: index name -> (partition attribute, sort attribute)
INDEXES: Mapping[str, tuple[str, str]] = {
    INDEX_ALL: (LIST_ALL_ATTR, LIST_KEY), INDEX_STATUS: ("status", LIST_KEY), INDEX_UPDATED: ("status", UPDATED_AT),
    INDEX_TENANT: (TENANT, LIST_KEY), INDEX_TENANT_STATUS: (TENANT_STATUS, LIST_KEY),
    INDEX_OUTBOX: (OUTBOX_PART, OUTBOX_DUE),
}
#: index name -> projection type
PROJECTIONS: Mapping[str, str] = {
    INDEX_ALL: "ALL", INDEX_STATUS: "ALL", INDEX_UPDATED: "KEYS_ONLY", INDEX_TENANT: "ALL",
    INDEX_TENANT_STATUS: "ALL", INDEX_OUTBOX: "KEYS_ONLY",
}
#: Key attributes of the table and its indexes, with their DynamoDB types; the rest is schemaless.
KEY_TYPES: Mapping[str, str] = {
    KEY: "S", LIST_ALL_ATTR: "S", LIST_KEY: "S", "status": "S", UPDATED_AT: "N", TENANT: "S", TENANT_STATUS: "S",
    OUTBOX_PART: "S", OUTBOX_DUE: "N",
}


def ensure_table(client: Any, table: str, *, timeout_s: float) -> None:
    """Create ``table``, its indexes and TTL where missing, waiting until all are ACTIVE. Raises ConfigError when
    an index of the same name has other keys or TTL is on another attribute, BackendError when the wait times
    out; botocore errors pass through (the caller translates them)."""
    deadline = time.monotonic() + timeout_s
    description = describe(client, table)
    if description is None:
        _create_table(client, table)
        description = _wait_active(client, table, deadline, timeout_s)
    existing = {index["IndexName"]: index for index in description.get("GlobalSecondaryIndexes", [])}
    for name, keys in INDEXES.items():
        if name in existing:
            schema = {key["KeyType"]: key["AttributeName"] for key in existing[name]["KeySchema"]}
            if (schema.get("HASH"), schema.get("RANGE")) != keys:
                raise ConfigError(f"table {table!r} has an index {name!r} keyed on {schema}, not {keys}")
            continue
        _wait_active(client, table, deadline, timeout_s)
        _add_index(client, table, name, description)
        description = _wait_active(client, table, deadline, timeout_s)
    _ensure_ttl(client, table)


def describe(client: Any, table: str) -> dict[str, Any] | None:
    try:
        description: dict[str, Any] = client.describe_table(TableName=table)["Table"]
    except ClientError as exc:
        if error_code(exc) == "ResourceNotFoundException":
            return None
        raise
    return description


def _create_table(client: Any, table: str) -> None:
    try:
        client.create_table(
            TableName=table, BillingMode="PAY_PER_REQUEST", KeySchema=[{"AttributeName": KEY, "KeyType": "HASH"}],
            AttributeDefinitions=_attribute_definitions(), GlobalSecondaryIndexes=[_index_spec(n) for n in INDEXES],
        )
    except ClientError as exc:
        if error_code(exc) != "ResourceInUseException":  # another process created it first: fine
            raise


def _add_index(client: Any, table: str, name: str, description: Mapping[str, Any]) -> None:
    spec = _index_spec(name)
    if description.get("BillingModeSummary", {}).get("BillingMode") != "PAY_PER_REQUEST":
        # A provisioned table (the console's default) needs capacity for the index too: mirror the table's.
        throughput = description.get("ProvisionedThroughput", {})
        spec["ProvisionedThroughput"] = {
            "ReadCapacityUnits": max(1, int(throughput.get("ReadCapacityUnits") or 1)),
            "WriteCapacityUnits": max(1, int(throughput.get("WriteCapacityUnits") or 1)),
        }
    # The table's own definitions (those of indexes not ours included) plus the new index's keys: DynamoDB wants
    # every definition used by some key, and moto replaces the table's list with the one given.
    definitions = [dict(d) for d in description.get("AttributeDefinitions", [])]
    known = {d["AttributeName"] for d in definitions}
    definitions += [d for d in _attribute_definitions({KEY, *INDEXES[name]}) if d["AttributeName"] not in known]
    try:
        client.update_table(TableName=table, AttributeDefinitions=definitions,
                            GlobalSecondaryIndexUpdates=[{"Create": spec}])
    except ClientError as exc:
        # Another process added it first: waiting for it is all that is left. (Another process adding some other
        # index is a LimitExceededException: retryable, and ensure() is safe to run again.)
        code = error_code(exc)
        if not (code == "ResourceInUseException" or (code == "ValidationException" and "exists" in str(exc))):
            raise


def _wait_active(client: Any, table: str, deadline: float, timeout_s: float) -> dict[str, Any]:
    """Poll until the table and all its indexes are ACTIVE (and backfilled); the description then."""
    delay = 0.05
    while True:
        description = describe(client, table)
        if description is not None and description.get("TableStatus") == "ACTIVE" and all(
                index.get("IndexStatus") == "ACTIVE" and not index.get("Backfilling")
                for index in description.get("GlobalSecondaryIndexes", [])):
            return description
        if time.monotonic() + delay > deadline:
            raise BackendError(f"table {table!r} is not ACTIVE after {timeout_s:g} s "
                               f"(status {None if description is None else description.get('TableStatus')})")
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _ensure_ttl(client: Any, table: str) -> None:
    ttl = client.describe_time_to_live(TableName=table).get("TimeToLiveDescription", {})
    state, attribute = ttl.get("TimeToLiveStatus"), ttl.get("AttributeName")
    if state in {"ENABLED", "ENABLING"}:
        if attribute != EXPIRES_AT:
            raise ConfigError(f"table {table!r} expires items by {attribute!r}; sdasync needs TTL on "
                              f"{EXPIRES_AT!r} (a table has one TTL attribute)")
        return
    try:
        client.update_time_to_live(TableName=table,
                                   TimeToLiveSpecification={"Enabled": True, "AttributeName": EXPIRES_AT})
    except ClientError as exc:
        if error_code(exc) != "ValidationException" or "already enabled" not in str(exc).lower():
            raise


def _attribute_definitions(names: Collection[str] | None = None) -> list[dict[str, str]]:
    return [{"AttributeName": name, "AttributeType": kind} for name, kind in KEY_TYPES.items()
            if names is None or name in names]


def _index_spec(name: str) -> dict[str, Any]:
    partition, sort = INDEXES[name]
    return {
        "IndexName": name,
        "KeySchema": [{"AttributeName": partition, "KeyType": "HASH"}, {"AttributeName": sort, "KeyType": "RANGE"}],
        "Projection": {"ProjectionType": PROJECTIONS[name]},
    }
